"""Exits non-zero, saying why, unless the extension and each named backend run here.

    python -m bench.gpu.readiness cuda,triton,cpu

Each backend must be available AND run one small op on its device against the reference: a
build that imports but cannot launch (wrong architecture, missing symbols) fails here, at once,
rather than as a scatter of test errors later."""
from __future__ import annotations

import sys

import torch


def _device_type(backend: str) -> str:
    if backend == "triton":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return backend


def check(backend: str) -> str | None:
    """None when `backend` runs groupnorm_silu on its device like the reference, else why not."""
    import sr3fast
    from sr3fast import backends, ops, reference
    device_type = _device_type(backend)
    reason = backends.unavailable_reason(backend, device_type)
    if reason:
        return reason
    generator = torch.Generator(device=device_type).manual_seed(0)
    x = torch.randn(2, 64, 8, 8, device=device_type, generator=generator)
    weight = 1 + 0.1 * torch.randn(64, device=device_type, generator=generator)
    bias = 0.1 * torch.randn(64, device=device_type, generator=generator)
    with sr3fast.backend(backend):
        got = ops.groupnorm_silu(x, 32, weight, bias, 1e-5, None)
    want = reference.groupnorm_silu(x, 32, weight, bias, 1e-5, None)
    error = (got - want).abs().max().item()
    # fp32 against fp32 differs only by summation order over a group's 128 values: about
    # eps32 * sqrt(128) per unit of output, times 8 for the operations after the sums (the rule
    # of tests/support.py). Any indexing or statistics bug gives errors of order 1.
    tolerance = 8 * torch.finfo(torch.float32).eps * 128 ** 0.5 * want.abs().max().item()
    if not error <= tolerance:
        return f"groupnorm_silu differs from the reference by {error:.3e} (> {tolerance:.1e})"
    return None


def main(argv: list[str]) -> int:
    names = [name for arg in argv for name in arg.split(",") if name]
    try:
        import sr3fast._C  # noqa: F401
        print("sr3fast._C imports")
    except ImportError as err:
        print(f"FAILED: sr3fast._C does not import: {err}")
        return 1
    from sr3fast import explain_backend
    print(explain_backend("cuda" if torch.cuda.is_available() else "cpu"))
    failed = 0
    for name in names:
        problem = check(name)
        print(f"{name}: {'ok' if problem is None else 'FAILED: ' + problem}")
        failed += problem is not None
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
