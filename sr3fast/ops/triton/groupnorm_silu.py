"""Triton backend of groupnorm_silu, registered with torch.library so torch.compile, export and
CUDA graphs see its kernels (kernels/groupnorm_silu.py).

Two ops, both `triton_op`s:
  sr3fast::groupnorm_silu_triton           (x, ...) -> (y, mean, rstd)
  sr3fast::groupnorm_silu_backward_triton  (dy, x, mean, rstd, ...) -> (dx, dweight, dbias, dshift)
The forward saves x, mean and rstd (fp32, (B, G)) plus references to shift/weight/bias; the
backward recomputes x̂ and SiLU from them. dx is always computed; dshift, and dweight/dbias
(one flag: they come from the same sums), only when asked for, and otherwise returned as empty
tensors (op schemas cannot return None).

Fake implementations: triton_op derives one by running the launcher with its kernels skipped;
we register the launchers' own output-allocation step instead. It is the same code, costs no
planning, and, unlike the derived one, also works where the kernels run in Triton's CPU
interpreter (which would execute them on fake tensors).
"""
from __future__ import annotations

from torch import Tensor
from torch.library import triton_op

from sr3fast.kernels import groupnorm_silu as kernels


@triton_op("sr3fast::groupnorm_silu_triton", mutates_args=())
def _forward(x: Tensor, num_groups: int, weight: Tensor | None, bias: Tensor | None,
             eps: float, shift: Tensor | None, act: bool) -> tuple[Tensor, Tensor, Tensor]:
    return kernels.forward(x, num_groups, weight, bias, eps, shift, act)


@_forward.register_fake
def _forward_fake(x, num_groups, weight, bias, eps, shift, act):
    return kernels.forward_outputs(x, num_groups)


def _schema_outputs(x: Tensor, grads) -> tuple[Tensor, ...]:
    """Gradients with None (not computed) as empty tensors, which the op schema can return;
    one each, as outputs of an op may not alias one another."""
    return tuple(x.new_empty(0) if g is None else g for g in grads)


@triton_op("sr3fast::groupnorm_silu_backward_triton", mutates_args=())
def _backward_op(dy: Tensor, x: Tensor, mean: Tensor, rstd: Tensor, num_groups: int,
                 weight: Tensor | None, bias: Tensor | None, shift: Tensor | None, act: bool,
                 shift_grad: bool, affine_grad: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    return _schema_outputs(x, kernels.backward(dy, x, mean, rstd, num_groups, weight, bias,
                                               shift, act, shift_grad, affine_grad))


@_backward_op.register_fake
def _backward_fake(dy, x, mean, rstd, num_groups, weight, bias, shift, act, shift_grad,
                   affine_grad):
    return _schema_outputs(x, kernels.backward_outputs(x, weight, bias, shift, shift_grad,
                                                       affine_grad))


def _setup_context(ctx, inputs, output):
    x, num_groups, weight, bias, _eps, shift, act = inputs
    _y, mean, rstd = output
    ctx.mark_non_differentiable(mean, rstd)
    ctx.save_for_backward(x, weight, bias, shift, mean, rstd)
    ctx.num_groups, ctx.act = num_groups, act


def _backward(ctx, dy, _dmean, _drstd):
    x, weight, bias, shift, mean, rstd = ctx.saved_tensors
    needs_x, _, needs_weight, needs_bias, _, needs_shift, _ = ctx.needs_input_grad
    dx, dweight, dbias, dshift = _backward_op(
        dy, x, mean, rstd, ctx.num_groups, weight, bias, shift, ctx.act,
        shift_grad=needs_shift, affine_grad=needs_weight or needs_bias)
    return (dx if needs_x else None, None, dweight if needs_weight else None,
            dbias if needs_bias else None, None, dshift if needs_shift else None, None)


_forward.register_autograd(_backward, setup_context=_setup_context)


def groupnorm_silu(x: Tensor, num_groups: int, weight: Tensor | None = None,
                   bias: Tensor | None = None, eps: float = 1e-5,
                   shift: Tensor | None = None, act: bool = True) -> Tensor:
    """SiLU(GroupNorm(x + shift)) through the Triton kernels; the contract and maths are
    sr3fast.reference.groupnorm_silu's."""
    return _forward(x, num_groups, weight, bias, eps, shift, act)[0]
