"""`accelerate(module)`: fused ops inside another codebase's SR3 U-Net, in place.

Modules are recognised by structure, not by class name, and each recognised module is converted
by swapping its class for a subclass whose `forward` calls sr3fast's dispatch ops. Parameters,
buffers, submodule names (so state_dict keys) and `isinstance` answers stay exactly the same.
Each conversion is checked on a small probe input against the module's own forward and undone
if the outputs differ, so a look-alike module with other semantics is left alone, not broken.

Recognised (the structure of the public SR3 code, Janspiry/Image-Super-Resolution-via-Iterative-
Refinement, and of U-Nets written like it):
  residual block  children block1, block2, noise_func (additive: Linear inside `noise_func.noise_func`),
                  res_conv; block2.block = Sequential(GroupNorm, SiLU/Swish, ...): the noise-level
                  bias is fused into block2's GroupNorm+SiLU as `shift`
  self-attention  children norm (GroupNorm), qkv (1x1 Conv C->3C), out (1x1 Conv C->C), `n_head`:
                  GroupNorm, then q/k/v read in place from the qkv output, one fused attention
  GroupNorm+SiLU  consecutive children of an nn.Sequential: one fused groupnorm_silu
  convolution     every nn.Conv2d: `ops.conv2d` (sr3fast.model.layers.Conv2d), which the CPU
                  backend runs with prepacked weights
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from . import ops
from .model.layers import Conv2d


# ---------------------------------------------------------------- fused forwards

class _FusedGroupNormSiLU(nn.GroupNorm):
    """A GroupNorm whose following SiLU was folded into it (the SiLU became nn.Identity)."""

    def forward(self, x):
        return ops.groupnorm_silu(x, self.num_groups, self.weight, self.bias, self.eps)


def _residual_block_forward(self, x, time_emb):
    norm = self.block2.block[0]
    shift = self.noise_func.noise_func(time_emb).reshape(x.shape[0], -1)      # (B, C)
    h = self.block1(x)
    h = ops.groupnorm_silu(h, norm.num_groups, norm.weight, norm.bias, norm.eps, shift=shift)
    for layer in list(self.block2.block)[2:]:                               # dropout, conv
        h = layer(h)
    return h + self.res_conv(x)


def _self_attention_forward(self, x):
    batch, channels, height, width = x.shape
    heads = self.n_head
    normed = ops.groupnorm_silu(x, self.norm.num_groups, self.norm.weight, self.norm.bias,
                                self.norm.eps, act=False)
    qkv = self.qkv(normed).reshape(batch, heads, 3 * (channels // heads), height * width)
    # (B, heads, L, d) views of the qkv output: stride 1 along L, no copies
    q, k, v = (part.transpose(-1, -2) for part in qkv.chunk(3, dim=2))
    # the public code scales by 1/sqrt(channels), not 1/sqrt(head width)
    out = ops.attention(q, k, v, scale=1.0 / math.sqrt(channels))
    return self.out(out.transpose(-1, -2).reshape(batch, channels, height, width)) + x


_FUSED_CLASSES: dict[tuple[type, str], type] = {}


def _fused_class(cls: type, kind: str, forward) -> type:
    key = (cls, kind)
    if key not in _FUSED_CLASSES:
        _FUSED_CLASSES[key] = type(f"Fused{cls.__name__}", (cls,), {
            "forward": forward, "_sr3fast_original_class": cls, "__module__": __name__})
    return _FUSED_CLASSES[key]


# ---------------------------------------------------------------- recognising structure

def _is_silu(module: nn.Module) -> bool:
    """A parameter-free module that computes x·sigmoid(x) (nn.SiLU, a hand-written Swish, ...)."""
    if isinstance(module, nn.SiLU):
        return True
    if any(True for _ in module.parameters()) or list(module.children()):
        return False
    probe = torch.linspace(-6, 6, 97)
    try:
        with torch.no_grad():
            return torch.allclose(module(probe), F.silu(probe), atol=1e-6)
    except Exception:
        return False


def _starts_with_groupnorm_silu(module) -> bool:
    return (isinstance(module, nn.Sequential) and len(module) >= 2
            and isinstance(module[0], nn.GroupNorm) and _is_silu(module[1]))


def _is_residual_block(module: nn.Module) -> bool:
    noise = getattr(module, "noise_func", None)
    inner = getattr(noise, "noise_func", None)
    return (all(hasattr(module, name) for name in ("block1", "block2", "res_conv"))
            and noise is not None and not getattr(noise, "use_affine_level", False)
            and isinstance(inner, nn.Sequential) and len(inner) == 1 and isinstance(inner[0], nn.Linear)
            and _starts_with_groupnorm_silu(getattr(module.block2, "block", None)))


def _is_self_attention(module: nn.Module) -> bool:
    norm, qkv, out = (getattr(module, name, None) for name in ("norm", "qkv", "out"))
    return (isinstance(norm, nn.GroupNorm) and isinstance(qkv, nn.Conv2d) and isinstance(out, nn.Conv2d)
            and isinstance(getattr(module, "n_head", None), int)
            and qkv.kernel_size == (1, 1) and out.kernel_size == (1, 1)
            and qkv.in_channels == norm.num_channels and qkv.out_channels == 3 * norm.num_channels
            and out.in_channels == out.out_channels == norm.num_channels
            and norm.num_channels % module.n_head == 0)


# ---------------------------------------------------------------- the report

@dataclass
class AccelerationReport:
    """What `accelerate` replaced and what it left alone, by module path."""
    replaced: list[tuple[str, str]] = field(default_factory=list)     # (path, what)
    left_alone: list[tuple[str, str]] = field(default_factory=list)   # (path, why)

    def __str__(self) -> str:
        counts: dict[str, int] = {}
        for _, what in self.replaced:
            counts[what] = counts.get(what, 0) + 1
        lines = [f"sr3fast.accelerate: replaced {len(self.replaced)} module(s)"
                 + (f" ({', '.join(f'{n} {w}' for w, n in counts.items())})" if counts else "")]
        lines += [f"  left alone: {path or '<root>'}: {why}" for path, why in self.left_alone]
        return "\n".join(lines)


# ---------------------------------------------------------------- the walk

def _probe_parameters(module: nn.Module):
    parameter = next(module.parameters())
    return parameter.device, parameter.dtype


def _matches(module: nn.Module, fused: type, make_inputs, tolerance: float) -> bool:
    """Swap `module` to `fused` and keep it only if the outputs agree on a probe input."""
    original = module.__class__
    generator = torch.Generator().manual_seed(0)
    device, dtype = _probe_parameters(module)
    inputs = [t.to(device=device, dtype=dtype) for t in make_inputs(generator)]
    was_training = module.training
    module.eval()                                       # dropout off for the comparison
    try:
        with torch.no_grad():
            expected = module(*inputs)
            module.__class__ = fused
            actual = module(*inputs)
        scale = expected.float().abs().max().clamp(min=1.0)
        if (actual.float() - expected.float()).abs().max() <= tolerance * scale:
            return True
        module.__class__ = original
        return False
    except Exception:
        module.__class__ = original
        raise
    finally:
        module.train(was_training)


def accelerate(module: nn.Module, verify: bool = True) -> AccelerationReport:
    """Replace, in place, the parts of an SR3 U-Net that sr3fast fuses (see the module docstring).

    Returns an AccelerationReport (print it to see what changed). state_dict keys, parameter
    objects and outputs stay the same; `verify=False` skips the probe comparison.
    """
    report = AccelerationReport()
    if not any(True for _ in module.parameters()):
        report.left_alone.append(("", "the module has no parameters"))
        return report
    device, dtype = _probe_parameters(module)
    # probe tolerance: fused and unfused differ only by fp rounding
    tolerance = 1e-3 if dtype == torch.float32 else 5e-2
    covered: set[int] = set()

    def convert(path, child, kind, forward, make_inputs):
        fused = _fused_class(type(child), kind, forward)
        if not verify or _matches(child, fused, make_inputs, tolerance):
            child.__class__ = fused
            report.replaced.append((path, kind))
            return True
        report.left_alone.append((path, f"looks like a {kind} but computes something else"))
        return False

    for path, child in module.named_modules():
        if getattr(type(child), "_sr3fast_original_class", None) is not None:  # accelerated already
            covered.add(id(child.block2.block[0]) if _is_residual_block(child) else id(child.norm))
            continue
        if _is_residual_block(child):
            linear = child.noise_func.noise_func[0]
            channels = child.block1.block[0].num_channels if _starts_with_groupnorm_silu(
                getattr(child.block1, "block", None)) else None
            if channels is not None and convert(
                    path, child, "residual block", _residual_block_forward,
                    lambda g, c=channels, e=linear.in_features: (
                        torch.randn(2, c, 4, 4, generator=g), torch.randn(2, e, generator=g))):
                covered.add(id(child.block2.block[0]))
        elif _is_self_attention(child):
            channels = child.norm.num_channels
            if convert(path, child, "self-attention", _self_attention_forward,
                       lambda g, c=channels: (torch.randn(2, c, 3, 5, generator=g),)):
                covered.add(id(child.norm))

    for path, child in module.named_modules():
        if not isinstance(child, nn.Sequential):
            continue
        for index in range(len(child) - 1):
            norm, act = child[index], child[index + 1]
            if (isinstance(norm, nn.GroupNorm) and type(norm) is nn.GroupNorm
                    and id(norm) not in covered and _is_silu(act)):
                norm.__class__ = _FusedGroupNormSiLU
                child[index + 1] = nn.Identity()
                covered.add(id(norm))
                report.replaced.append((f"{path}.{index}".lstrip("."), "groupnorm+silu"))

    for path, child in module.named_modules():
        # the same maths through the backend's convolution (Conv2d.forward leaves any other
        # kind of convolution to nn.Conv2d): no probe needed
        if type(child) is nn.Conv2d:
            child.__class__ = Conv2d
            report.replaced.append((path, "conv2d"))

    for path, child in module.named_modules():
        if isinstance(child, nn.GroupNorm) and id(child) not in covered \
                and not isinstance(child, _FusedGroupNormSiLU):
            report.left_alone.append((path, "GroupNorm without a SiLU after it in a Sequential"))
    return report
