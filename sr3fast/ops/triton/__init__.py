"""Triton implementations of the fused ops: `sr3fast.ops.triton.<op>.<op>`, kernels in kernels/."""
