import os

import pytest
import torch

# Without a GPU, Triton kernels run on CPU tensors through Triton's interpreter. This must be set
# before triton is first imported (sr3fast imports it lazily, on first use of the triton backend).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

REQUIRE_VARIABLE = "SR3FAST_REQUIRE_BACKENDS"


def required_backend_problems(names: list[str]) -> list[str]:
    """Why each of the backends `names` cannot run here ([] when all can). The triton backend is
    checked on the device under test (the GPU if one is visible, else the CPU interpreter)."""
    from sr3fast import backends
    device_type = "cuda" if torch.cuda.is_available() else "cpu"
    problems = []
    for name in names:
        reason = backends.unavailable_reason(name, device_type if name == "triton" else name)
        if reason:
            problems.append(f"{name}: {reason}")
    return problems


def pytest_configure(config):
    """SR3FAST_REQUIRE_BACKENDS=cuda,triton,cpu: a run where one of these backends is missing
    fails at once instead of skipping its tests (a failed extension build would otherwise turn
    every cuda-backend test into a quiet skip). bench/gpu/run.sh sets it."""
    names = [n.strip() for n in os.environ.get(REQUIRE_VARIABLE, "").split(",") if n.strip()]
    problems = required_backend_problems(names) if names else []
    if problems:
        raise pytest.UsageError(f"{REQUIRE_VARIABLE}={','.join(names)}, but this machine cannot run "
                                "them: " + "; ".join(problems))
