"""Whether an sr3fast backend can be benchmarked on a device, and if not, why."""
from __future__ import annotations

import os

import torch

from sr3fast import backends


def backend_unavailable(name: str, device: torch.device, ops: tuple[str, ...]) -> str | None:
    """None when backend `name` runs on `device` and has a kernel for at least one of `ops`;
    else the reason, for the row that says it was skipped."""
    if name == "reference":
        return None
    if name == "triton" and device.type == "cpu":
        # The interpreter makes Triton available on CPU for tests; its times mean nothing.
        if os.environ.get("TRITON_INTERPRET") == "1":
            return "Triton on CPU runs in its interpreter (TRITON_INTERPRET=1), a test tool: not timed"
        return "Triton kernels need a GPU here (on CPU only its interpreter runs them, a test tool: not timed)"
    reason = backends.unavailable_reason(name, device.type)
    if reason:
        return reason
    if not any(backends.implements(name, op) for op in ops):
        return f"the {name} backend has no kernel yet for {' or '.join(ops)}"
    return None
