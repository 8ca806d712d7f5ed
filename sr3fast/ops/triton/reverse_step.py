"""Triton backend of reverse_step, registered as two custom ops over one kernel:

    sr3fast::reverse_step_triton(y_t, eps, coefs, noise?, seed?, clip?) -> y_prev
    sr3fast::reverse_step_multistep_triton(y_t, eps, coefs, x0_prev, noise?, seed?, clip?,
                                           x0_prev2?) -> (y_prev, x0)

The first is every single-step sampler's update (coefs (B, 5), (B, 6) or (B, 7), columns 0..4
read); the second adds the multistep history term, y_prev = ((m0·x0 + m1·y_t) + m2·x0_prev) +
sigma·z with coefs (B, 6) or (B, 7) (and + m3·x0_prev2 before the noise term when x0_prev2 is
given, coefs (B, 7)), and returns this step's clamped x0 (y_t's dtype and layout) for the next
step. Both launch kernels/reverse_step.py's one kernel (HAS_HISTORY off / on) and are pure
functions of their inputs. Randomness enters only through `seed`, a (1,) int64 device tensor that
`reverse_step` draws per call with torch's own RNG, the same way for both ops (so one generator
state gives the same z with and without history):

    seed = torch.randint(0, 2**63 - 1, (1,), generator=generator, device=y_t.device)

and that the kernel reads from device memory as its Philox key. Why this way:
  - no host round trip and no Python number per step: compiled graphs do not recompile, and a
    CUDA graph captures the draw like any other torch random op, so each replay draws a fresh
    key from the generator's advancing offset, and re-seeding the generator reproduces a run;
  - `generator=` (or the device's default generator) is the only source of randomness, so
    torch.manual_seed / a seeded torch.Generator make sampling reproducible;
  - statistically: each call gets an independent 63-bit key (a collision between any two of
    n calls has probability about n²/2⁶⁴), and within a call each element has its own Philox
    counter (see kernels/reverse_step.py), so z is independent across elements and calls up to
    the quality of Philox4x32-10, a counter-based generator designed for exactly this use.
    torch.compile's own generated kernels draw random numbers the same way.
The in-kernel z is a different stream from torch.randn's, so it is tested statistically. It
follows memory order, so one seed gives different (equally valid) noise to a contiguous and a
channels-last y_t. The cost is one 8-byte randint launch per step, which a CUDA graph absorbs.

Autograd: the update is linear in y_t and eps (through the clamp's mask), so the single-step
op's backward is implemented for those two (plain torch ops, recomputing x0 for the mask; not
a hot path). Gradients for coefs or noise raise NotImplementedError; use the reference backend
for them. The multistep op has no backward (samplers run without gradients): its autograd
registration raises NotImplementedError saying so, and where to differentiate instead.

Fake (meta) implementations: triton_op registers each op's own body as its fake, so shapes,
dtypes and strides under FakeTensor / torch.compile are the launcher's own.
"""
# No `from __future__ import annotations`: triton_op infers the schema from real annotations.
from typing import Optional, Tuple

import torch
from torch.library import triton_op

from sr3fast.kernels.reverse_step import launch_reverse_step

_SEED_HIGH = 2**63 - 1  # keys in [0, 2**63 - 1): 63 random bits of Philox's 64-bit key


@triton_op("sr3fast::reverse_step_triton", mutates_args=())
def reverse_step_triton(y_t: torch.Tensor, eps: torch.Tensor, coefs: torch.Tensor,
                        noise: Optional[torch.Tensor], seed: Optional[torch.Tensor],
                        clip: Optional[float]) -> torch.Tensor:
    """y_prev; z is `noise` when given, else drawn in-kernel from Philox keyed by `seed`."""
    return launch_reverse_step(y_t, eps, coefs, noise, seed, clip)


def _setup_context(ctx, inputs, output):
    y_t, eps, coefs, noise, seed, clip = inputs
    ctx.clip = clip
    ctx.dtypes = (y_t.dtype, eps.dtype)
    # y_t and eps only decide the clamp's mask; without a clip they are not needed.
    ctx.save_for_backward(coefs, *((y_t, eps) if clip is not None else ()))


def _backward(ctx, grad):
    if ctx.needs_input_grad[2] or ctx.needs_input_grad[3]:
        raise NotImplementedError(
            "sr3fast reverse_step (triton backend) has no gradient for coefs or noise, only for "
            "y_t and eps; run it under sr3fast.backend('reference') to differentiate through them")
    coefs, *y_and_eps = ctx.saved_tensors
    shape = (coefs.shape[0],) + (1,) * (grad.dim() - 1)
    a, b, m0, m1 = (coefs[:, k].reshape(shape) for k in range(4))
    if ctx.clip is not None:
        y_t, eps = y_and_eps
        x0 = a * y_t.float() - b * eps.float()
        m0 = torch.where((x0 >= -ctx.clip) & (x0 <= ctx.clip), m0, 0.0)  # clamp passes or blocks
    grad = grad.float()
    grad_y = grad * (m0 * a + m1) if ctx.needs_input_grad[0] else None
    grad_eps = grad * (-m0 * b) if ctx.needs_input_grad[1] else None
    return (None if grad_y is None else grad_y.to(ctx.dtypes[0]),
            None if grad_eps is None else grad_eps.to(ctx.dtypes[1]),
            None, None, None, None)


reverse_step_triton.register_autograd(_backward, setup_context=_setup_context)


@triton_op("sr3fast::reverse_step_multistep_triton", mutates_args=())
def reverse_step_multistep_triton(y_t: torch.Tensor, eps: torch.Tensor, coefs: torch.Tensor,
                                  x0_prev: torch.Tensor, noise: Optional[torch.Tensor],
                                  seed: Optional[torch.Tensor],
                                  clip: Optional[float], x0_prev2: Optional[torch.Tensor] = None
                                  ) -> Tuple[torch.Tensor, torch.Tensor]:
    """(y_prev, x0) of the multistep update; coefs (B, 6) or (B, 7), x0_prev (and x0_prev2, coefs
    then (B, 7)) shaped like y_t (any float dtype); z as in reverse_step_triton (the same z for
    the same seed)."""
    return launch_reverse_step(y_t, eps, coefs, noise, seed, clip, x0_prev=x0_prev,
                               x0_prev2=x0_prev2)


def _multistep_backward(ctx, grad_y_prev, grad_x0):
    raise NotImplementedError(
        "sr3fast reverse_step with x0_prev (the multistep update, triton backend) has no "
        "gradient: samplers run under torch.no_grad(). To differentiate through it, run it under "
        "sr3fast.backend('reference')")


# Registered only to raise that clear error on backward (instead of torch's generic one).
reverse_step_multistep_triton.register_autograd(_multistep_backward)


def draw_seed(device: torch.device, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """A (1,) int64 Philox key on `device`, drawn with `generator` (default: the device's)."""
    return torch.randint(0, _SEED_HIGH, (1,), generator=generator, device=device,
                         dtype=torch.int64)


def reverse_step(y_t: torch.Tensor, eps: torch.Tensor, coefs: torch.Tensor,
                 noise: Optional[torch.Tensor] = None, clip: Optional[float] = None,
                 generator: Optional[torch.Generator] = None,
                 x0_prev: Optional[torch.Tensor] = None,
                 x0_prev2: Optional[torch.Tensor] = None):
    """sr3fast.reference.reverse_step run by one Triton kernel; arguments checked by sr3fast.ops.

    Returns y_prev, or (y_prev, x0) when x0_prev is given (coefs (B, 6) or (B, 7); (B, 7) with
    x0_prev2)."""
    seed = draw_seed(y_t.device, generator) if noise is None else None
    if x0_prev is None:
        return reverse_step_triton(y_t, eps, coefs, noise, seed, clip)
    y_prev, x0 = reverse_step_multistep_triton(y_t, eps, coefs, x0_prev, noise, seed, clip,
                                               x0_prev2)
    return y_prev, x0
