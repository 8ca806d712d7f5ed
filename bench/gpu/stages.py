"""What one GPU session runs, in priority order, with each stage's time budget.

A stage is one command with its own timeout, so a hang or a crash in one still leaves the others
their time. `gpu` is the command on the GPU machine; `smoke` is the same stage in miniature on a
CPU (Triton's interpreter, the tiny model, a few tests), which CI runs so the script is known to
work before a GPU ever sees it. Commands are argv lists; "{python}" and "{out}" are filled in by
the runner (the interpreter running it, the folder for results).

Budgets add up to at most TOTAL_BUDGET_S; time a stage leaves unused passes to the next ones.
"""
from __future__ import annotations

from dataclasses import dataclass, field

TOTAL_BUDGET_S = 480

# Ops tests check every fast backend; a backend missing on the GPU machine is a failure there.
GPU_BACKENDS = "cuda,triton,cpu"
CPU_BACKENDS = "triton,cpu"
# Tests pin Triton's autotuning to one config per kernel (kernels/autotuning.py): they check
# results, and a storm of config compiles would eat the session. The benchmark autotunes.
PINNED = {"SR3FAST_TRITON_AUTOTUNE": "pinned"}


@dataclass(frozen=True)
class Stage:
    name: str
    budget_s: int                 # 0: runs only on time earlier stages left unused
    group: str                    # log file: build, tests or bench
    what: str                     # one line for --dry-run and the summary
    gpu: tuple[str, ...]
    smoke: tuple[str, ...]
    env: dict = field(default_factory=dict)
    tests: bool = False           # a pytest run: counts and failures are read from its junit XML


def _pytest(*selection: str, workers: int = 0) -> tuple[str, ...]:
    parallel = ("-n", str(workers)) if workers else ()
    return ("{python}", "-m", "pytest", *selection, *parallel, "-q", "-rfEs", "-p", "no:cacheprovider",
            "--junitxml={out}/junit-{stage}.xml")


def _bench(*args: str) -> tuple[str, ...]:
    return ("{python}", "bench/run.py", *args, "--json", "{out}/bench-{stage}.json")


def _tests(name, budget, what, gpu_selection, smoke_selection, workers=0) -> Stage:
    return Stage(name, budget, "tests", what, _pytest(*gpu_selection, workers=workers),
                 _pytest(*smoke_selection), env={**PINNED, "SR3FAST_REQUIRE_BACKENDS": GPU_BACKENDS},
                 tests=True)


# Tests that killed their pytest process on the H200 (2026-11-30); see bench/results.
CRASHED_BEFORE = (  # each: ids run in one process, the tests that ran before the crash first
    "tests/test_extension.py::test_groupnorm_silu_cuda_graph_replay_matches_eager,"
    "tests/test_extension.py::test_groupnorm_silu_errors_say_what_is_wrong",
    "tests/test_loops.py::test_cpp_loop_with_a_package_reproduces_the_python_loop",
)
MODEL = ("--model-only", "--no-ceilings", "--config", "public-16-128")


def _smoke_model(impls: str, *more: str) -> tuple[str, ...]:
    return _bench("--model-only", "--device", "cpu", "--config", "tiny", "--batch", "1", "--repeats", "2",
                  "--impl", impls, *more)


def _compiled(name: str, batch: int, impls: str, smoke_impls: str) -> Stage:
    return Stage(name, 0, "bench", f"on time left over: 16->128 step, B={batch}: {impls} (torch.compile "
                 "default mode, Triton autotuning pinned)",
                 _bench(*MODEL, "--batch", str(batch), "--repeats", "10", "--compile-mode", "default",
                        "--impl", impls),
                 _smoke_model(smoke_impls), env=PINNED)


OP_TESTS = ("tests/test_groupnorm_silu.py", "tests/test_attention.py", "tests/test_reverse_step.py",
            "tests/test_reverse_step_multistep.py", "tests/test_autotuning.py")
EVERY_CONFIG = "every_config"   # name part of the tests that force each autotuning config once
EARLIER_TEST_FILES = (*OP_TESTS, "tests/test_extension.py", "tests/test_backends.py", "tests/test_loops.py")

STAGES = (
    Stage("environment", 5, "build", "GPU, driver, clocks; torch, triton and nvcc versions",
          ("{python}", "-m", "bench.gpu.environment"), ("{python}", "-m", "bench.gpu.environment")),
    Stage("install", 150, "build",
          "pip install --no-build-isolation --no-deps -e . (sr3fast._C for sm_90, all cores)",
          ("{python}", "-m", "pip", "install", "--no-build-isolation", "--no-deps", "-e", "."),
          ("{python}", "-c", "import torch, sr3fast._C; print('smoke: extension built by scripts/setup.sh "
                             "imports; the GPU run rebuilds it with pip install -e .')"),
          env={"TORCH_CUDA_ARCH_LIST": "9.0", "SR3FAST_REQUIRE_EXT": "1"}),
    Stage("readiness", 15, "build", f"fail loudly unless the extension and backends {GPU_BACKENDS} run here",
          ("{python}", "-m", "bench.gpu.readiness", GPU_BACKENDS),
          ("{python}", "-m", "bench.gpu.readiness", CPU_BACKENDS)),
    # Test stages run under pytest-xdist even where serial would do: a segfaulting test then
    # costs its worker (reported as a failure, the worker replaced), not the stage's results.
    _tests("test-extension", 30, "C++/CUDA ops against the reference (fp32, bf16, backward, graphs)",
           ("tests/test_extension.py", "tests/test_backends.py", "-k", "not cmake and not aoti"),
           ("tests/test_extension.py", "-k", "reverse_step_sigma_zero or statistics_are_float32"), workers=4),
    _tests("test-triton-ops", 90, "Triton ops at SR3 shapes: fwd+bwd, fp32 and bf16 (three-way rule), "
           "compile(fullgraph=True), graphs",
           (*OP_TESTS, "-k", f"not {EVERY_CONFIG}"),
           ("tests/test_groupnorm_silu.py", "tests/test_reverse_step.py",
            "-k", "test_triton_rejects_integer_input or test_clip_propagates_nan"), workers=8),
    _tests("test-loops", 40, "graph loop == python loop; C++ loop on CUDA; package run",
           ("tests/test_loops.py",), ("tests/test_loops.py", "-k", "unknown_loop or graph_loop_on_a_cpu"),
           workers=4),
    _tests("test-export", 30, "AOTInductor export of the fused ops and the C++ loop over it",
           ("tests/test_extension.py", "-k", "aoti"), ("tests/test_extension.py", "-k", "aoti_registration"),
           workers=4),
    Stage("bench-ops", 50, "bench",
          "copy GB/s + bf16 GEMM ceilings; groupnorm_silu, attention (vs SDPA kernels, bmm), reverse_step",
          _bench("--ops-only", "--op", "groupnorm_silu,attention,reverse_step", "--repeats", "30",
                 "--compile-mode", "default"),
          _bench("--ops-only", "--quick", "--device", "cpu", "--op", "groupnorm_silu,attention,reverse_step")),
    # The U-Net's many GroupNorm shapes would each autotune (compile and time every candidate):
    # minutes. Model rows run the pinned config, which the test stages have compiled already.
    Stage("bench-model-eager", 40, "bench",
          "16->128 U-Net step, B=1,16: reference fp32/bf16, fused triton/cuda bf16, fused + CUDA graph "
          "(Triton autotuning pinned)",
          _bench(*MODEL, "--batch", "1", "--batch", "16", "--repeats", "10",
                 "--impl", "reference-eager,reference-eager-bf16,fused-cuda,fused-triton,fused-graph"),
          _smoke_model("reference-eager,reference-eager-bf16,fused-cpu,fused-graph"), env=PINNED),
    Stage("bench-loops", 30, "bench",
          "loop overhead per step (python/cpp/graph, stand-in denoiser); 100-step 16->128 samples",
          _bench(*MODEL, "--batch", "1", "--repeats", "3", "--impl", "loop-python,loop-cpp,loop-graph",
                 "--loop-steps", "100"),
          _smoke_model("loop-python,loop-cpp,loop-graph", "--loop-steps", "3"), env=PINNED),
    # On time left over, first: native backtraces of the tests that segfaulted in an earlier
    # session (their Python frames alone did not explain them).
    Stage("crash-backtraces", 0, "tests", "on time left over: native backtraces of earlier segfaults",
          ("{python}", "-m", "bench.gpu.backtrace", *CRASHED_BEFORE),
          ("{python}", "-m", "bench.gpu.backtrace", "tests/test_io.py::test_atomic_path_replaces_only_on_success"),
          env=PINNED),
    # On time left over: what users feel. The end-to-end row (bench/end_to_end.py) and one 4096x4096
    # output of the default model (bench/large_image.py: tiling chosen from the GPU's memory).
    Stage("bench-end-to-end", 0, "bench",
          "on time left over: seconds per 64->256 image, the public default (2000 ancestral steps, eager "
          "fp32) vs the ancestral reference vs sr3fast's default",
          _bench("--end-to-end-only", "--end-to-end", "64"),
          _bench("--end-to-end-only", "--end-to-end", "4", "--public-steps", "20", "--device", "cpu")),
    Stage("bench-large-image", 0, "bench",
          "on time left over: 1024x1024 -> 4096x4096 with the default model, tile chosen from memory",
          ("{python}", "bench/large_image.py", "--low", "1024", "--json", "{out}/large-image.json"),
          ("{python}", "bench/large_image.py", "--device", "cpu", "--low", "8", "--steps", "2",
           "--json", "{out}/large-image.json")),
    # On time left over: compiled rows, one stage each so a slow compile loses one row, not the
    # others. Inductor's default mode: max-autotune's GEMM and convolution searches would take the
    # whole session. fused-compiled-graph compiles the graph of fused-compiled again (cached).
    _compiled("bench-fused-compiled-b16", 16, "fused-compiled,fused-compiled-graph", "fused-compiled"),
    _compiled("bench-reference-compiled-b16", 16, "reference-compiled-bf16", "reference-compiled-bf16"),
    _compiled("bench-fused-compiled-b1", 1, "fused-compiled,fused-compiled-graph", "fused-compiled-graph"),
    _compiled("bench-reference-compiled-b1", 1, "reference-compiled-bf16", "reference-compiled-bf16"),
    _tests("test-every-config", 0, "on time left over: each Triton autotuning config forced once",
           (*OP_TESTS, "-k", EVERY_CONFIG), ("tests/test_autotuning.py",), workers=8),
    _tests("test-rest", 0, "on time left over: model, diffusion, API, accelerate, train tests",
           ("tests", *(f"--ignore={path}" for path in EARLIER_TEST_FILES)),
           ("tests/test_io.py", "-k", "atomic"), workers=8),
)


def check_budget() -> int:
    total = sum(stage.budget_s for stage in STAGES)
    assert total <= TOTAL_BUDGET_S, f"stage budgets add up to {total} s > {TOTAL_BUDGET_S} s"
    return total
