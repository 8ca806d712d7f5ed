"""sr3fast::groupnorm_silu (csrc/groupnorm_silu/): fake kernels, autograd, the backend function."""
from __future__ import annotations

import torch

import sr3fast._C  # noqa: F401  (registers torch.ops.sr3fast.*)

from ._layout import kernel_layout


@torch.library.register_fake("sr3fast::groupnorm_silu")
def _groupnorm_silu_fake(x, num_groups, weight=None, bias=None, eps=1e-5, shift=None, act=True):
    stats = x.new_empty((x.shape[0], num_groups), dtype=torch.float32)
    return torch.empty_like(kernel_layout(x)), stats, torch.empty_like(stats)


@torch.library.register_fake("sr3fast::groupnorm_silu_backward")
def _groupnorm_silu_backward_fake(grad_y, x, mean, rstd, num_groups, weight, bias, shift, act):
    batch, channels = x.shape[:2]

    def like(param, shape):
        return x.new_empty(shape, dtype=x.dtype if param is None else param.dtype)

    return (torch.empty_like(kernel_layout(x)), like(weight, (channels,)), like(bias, (channels,)),
            like(shift, (batch, channels)))


def _setup_context(ctx, inputs, output):
    x, num_groups, weight, bias, _eps, shift, act = inputs
    _, mean, rstd = output
    ctx.save_for_backward(x, weight, bias, shift, mean, rstd)
    ctx.num_groups, ctx.act = num_groups, act
    ctx.mark_non_differentiable(mean, rstd)


def _backward(ctx, grad_y, _grad_mean, _grad_rstd):
    x, weight, bias, shift, mean, rstd = ctx.saved_tensors
    grad_x, grad_weight, grad_bias, grad_shift = torch.ops.sr3fast.groupnorm_silu_backward(
        grad_y, x, mean, rstd, ctx.num_groups, weight, bias, shift, ctx.act)
    return (grad_x, None, grad_weight if weight is not None else None,
            grad_bias if bias is not None else None, None,
            grad_shift if shift is not None else None, None)


torch.library.register_autograd("sr3fast::groupnorm_silu", _backward, setup_context=_setup_context)


def groupnorm_silu(x: torch.Tensor, num_groups: int, weight: torch.Tensor | None = None,
                   bias: torch.Tensor | None = None, eps: float = 1e-5,
                   shift: torch.Tensor | None = None, act: bool = True) -> torch.Tensor:
    """SiLU(GroupNorm(x + shift)) by the compiled kernels; see sr3fast.reference.groupnorm_silu."""
    return torch.ops.sr3fast.groupnorm_silu(x, num_groups, weight, bias, eps, shift, act)[0]
