"""CTest sr3fast_sample_tiny: the C++ program sr3fast_sample against the Python samplers.

    python csrc/tests/sample_tiny.py PATH/TO/sr3fast_sample WORK_DIR

Exports the "tiny" preset (4->16 px) as a package, writes inputs for a few samplers with
sr3fast.export.save_sampling_inputs, runs the program on each and compares its y_0 with
sr3fast.diffusion.sample driven by the same package and seed. Exit status 0 when all agree.
The interpreter needs sr3fast with its extension sr3fast._C (the "cpu" backend).

Why bit for bit: both sides run the same compiled U-Net (one package, the same AOTInductor code
in either process), draw y_T and every z from the same CPU generator stream in the same order,
and do each step with the extension's reverse_step CPU kernel (the C++ loop calls it through the
dispatcher; the Python loop gets it from the "cpu" backend). With the "reference" backend the
Python loop is the same to the bit as well, as that kernel is bit-identical to the reference;
both are checked.
"""
from __future__ import annotations

import subprocess
import sys
import time
import types
from pathlib import Path

import torch
import torch.nn.functional as F

import sr3fast
from sr3fast.diffusion import NoiseSchedule, respace, sample
from sr3fast.export import export, load_package, save_sampling_inputs

# (sampler, respaced steps, seed, whether the inputs carry y_T): posterior clips and adds noise,
# ddim neither (no "clip" key, stochastic False), sr3 starts from a given y_T; the multistep
# solvers carry x0 from step to step ("history" 1 for 2M, 2 for 3M), the SDE forms adding noise
# as well.
CASES = [("posterior", 8, 1, False), ("ddim", 8, 2, False), ("sr3", 5, 3, True),
         ("dpmpp_2m", 6, 4, False), ("dpmpp_2m_sde", 6, 5, False), ("dpmpp_3m", 6, 6, False),
         ("dpmpp_3m_sde", 6, 7, False)]
PYTHON_BACKENDS = ("cpu", "reference")  # the first must match the program exactly; so must all


def run_program(program: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([program, *args], capture_output=True, text=True, timeout=600)


def condition(seed: int) -> torch.Tensor:
    """The upsampled condition x (1, 3, 16, 16) of a random 4x4 image, as upscale makes it."""
    low = torch.rand(1, 3, 4, 4, generator=torch.Generator().manual_seed(seed)) * 2 - 1
    return F.interpolate(low, size=(16, 16), mode="bicubic", align_corners=False)


def check_case(program: str, work: Path, package: Path, runner, schedule_full, case) -> list[str]:
    """Runs one sampler both ways; returns the failures (empty when they agree)."""
    sampler, steps, seed, with_y_T = case
    schedule = respace(schedule_full, steps)
    x = condition(seed)
    y_T = None
    if with_y_T:
        y_T = torch.randn(x.shape, generator=torch.Generator().manual_seed(100 + seed))
    inputs = save_sampling_inputs(work / f"{sampler}.inputs.pt", x, schedule, sampler,
                                  seed=seed, y_T=y_T)
    output = work / f"{sampler}.y0.pt"
    output.unlink(missing_ok=True)
    result = run_program(program, str(package), str(inputs), str(output))
    if result.returncode != 0:
        return [f"{sampler}: sr3fast_sample exited {result.returncode}:\n{result.stderr}"]
    print("  ", result.stdout.strip())
    got = torch.load(output)
    failures = []
    if got.dtype != torch.float32 or got.shape != x.shape:
        failures.append(f"{sampler}: y_0 is {got.dtype} {tuple(got.shape)}, "
                        f"want float32 {tuple(x.shape)}")
    model = types.SimpleNamespace(predict_noise=runner)
    for backend in PYTHON_BACKENDS:
        with sr3fast.backend(backend):
            want = sample(sampler, model, x, schedule, y_T=y_T,
                          generator=torch.Generator("cpu").manual_seed(seed))
        error = (got - want).abs().max().item() if got.shape == want.shape else float("inf")
        same = torch.equal(got, want)
        print(f"   {sampler:9s} {steps} steps: max abs error vs Python loop ({backend:9s} backend) "
              f"{error:.3e} {'bit-identical' if same else 'DIFFERENT'}")
        if not same:
            failures.append(f"{sampler}: differs from the Python loop on the {backend} backend "
                            f"(max abs error {error:.3e})")
    # The comparison means something only if the seed reaches y_0: another seed must differ.
    with sr3fast.backend(PYTHON_BACKENDS[0]):
        other = sample(sampler, model, x, schedule, y_T=y_T,
                       generator=torch.Generator("cpu").manual_seed(seed + 1000))
    if torch.equal(got, other):
        failures.append(f"{sampler}: y_0 does not depend on the seed; the comparison is vacuous")
    return failures


def check_errors(program: str, work: Path, package: Path) -> list[str]:
    """A usage error exits 2 with the usage line; a broken inputs file exits 1 naming the key."""
    failures = []
    usage = run_program(program, str(package))
    print(f"   usage error: exit {usage.returncode}: {usage.stderr.strip()!r}")
    usage_line = "usage: sr3fast_sample PACKAGE.pt2 INPUTS.pt OUTPUT.pt"
    if usage.returncode != 2 or usage_line not in usage.stderr:
        failures.append(f"a missing argument should exit 2 with the usage line, got "
                        f"{usage.returncode}: {usage.stderr!r}")
    broken = work / "broken.inputs.pt"
    record = torch.load(work / "posterior.inputs.pt")
    del record["coefs"]
    torch.save(record, broken)
    missing = run_program(program, str(package), str(broken), str(work / "broken.y0.pt"))
    print(f"   missing key: exit {missing.returncode}: {missing.stderr.strip()!r}")
    if missing.returncode != 1 or "has no 'coefs'" not in missing.stderr:
        failures.append(f"inputs without coefs should exit 1 naming 'coefs', got "
                        f"{missing.returncode}: {missing.stderr!r}")
    if (work / "broken.y0.pt").exists() or (work / "broken.y0.pt.tmp").exists():
        failures.append("a failed run left an output file behind")
    record = torch.load(work / "dpmpp_3m.inputs.pt")
    record["history"] = torch.tensor(3)
    torch.save(record, broken)
    deep = run_program(program, str(package), str(broken), str(work / "broken.y0.pt"))
    print(f"   history 3: exit {deep.returncode}: {deep.stderr.strip()!r}")
    if deep.returncode != 1 or '"history" must be 0, 1 or 2, got 3' not in deep.stderr:
        failures.append(f"history 3 should exit 1 saying what history may be, got "
                        f"{deep.returncode}: {deep.stderr!r}")
    return failures


def check_older_inputs(program: str, work: Path, package: Path) -> list[str]:
    """A file from before "history" (the bool "multistep" only, true for 2M) runs as history 1:
    the same y_0 as the current file of the same sampler and seed."""
    record = torch.load(work / "dpmpp_2m.inputs.pt")
    del record["history"]
    older = work / "older.inputs.pt"
    torch.save(record, older)
    output = work / "older.y0.pt"
    result = run_program(program, str(package), str(older), str(output))
    if result.returncode != 0:
        return [f"an inputs file with only 'multistep': exit {result.returncode}: {result.stderr}"]
    same = torch.equal(torch.load(output), torch.load(work / "dpmpp_2m.y0.pt"))
    print(f"   'multistep' only (older file): {'same y_0 as history 1' if same else 'DIFFERENT'}")
    return [] if same else ["an inputs file with only 'multistep' true did not run as history 1"]


def main(program: str, work_dir: str) -> int:
    work = Path(work_dir)
    work.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    model = sr3fast.load("tiny")
    package = work / "tiny.pt2"
    start = time.perf_counter()
    # Reference backend: the package holds only aten ops, nothing tied to this process's backend.
    with sr3fast.backend("reference"):
        export(model, package)
    print(f"exported tiny to {package} in {time.perf_counter() - start:.1f} s")
    runner, info = load_package(package)
    schedule = NoiseSchedule.from_config(model.config.schedule)
    failures = []
    for case in CASES:
        failures += check_case(program, work, package, runner, schedule, case)
    failures += check_errors(program, work, package)
    failures += check_older_inputs(program, work, package)
    for failure in failures:
        print("FAILED:", failure)
    print("all agree" if not failures else f"{len(failures)} failure(s)")
    return 1 if failures else 0


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(f"usage: {sys.argv[0]} PATH/TO/sr3fast_sample WORK_DIR")
    sys.exit(main(*sys.argv[1:]))
