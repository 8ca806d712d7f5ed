"""The fused ops at SR3's real shapes, and the implementations each is compared with.

Every case builds its inputs (random, never zeros) and knows its work: the minimal bytes a
bandwidth-bound op must move (each input read once, each output written once) or the FLOPs of
a compute-bound one. Providers, per case:
  torch            the same maths in plain PyTorch eager, in the case's dtype
  torch.compile    that plain PyTorch under torch.compile
  sr3fast:<name>   sr3fast.ops.<op> under sr3fast.backend(<name>), for reference, triton, cuda, cpu
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from sr3fast import ops

from .availability import backend_unavailable

BACKENDS = ("reference", "triton", "cuda", "cpu")


@dataclass(frozen=True)
class OpCase:
    op: str
    label: str
    shape: tuple
    make_inputs: Callable[[torch.device, torch.dtype], dict]
    unit: str                                  # "GB/s" (bandwidth-bound) or "TFLOP/s"
    work: Callable[[torch.dtype], int]         # bytes or FLOPs per call, in that dtype
    dtype_on_gpu: torch.dtype = torch.bfloat16

    @property
    def primary(self) -> str:
        return "bytes" if self.unit == "GB/s" else "flops"

    def dtype(self, device: torch.device) -> torch.dtype:
        return self.dtype_on_gpu if device.type == "cuda" else torch.float32


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


# groupnorm_silu: y = SiLU(GroupNorm(x + shift)), the norm before every SR3 convolution.

def _groupnorm_case(batch: int, channels: int, size: int, groups: int) -> OpCase:
    def make_inputs(device, dtype):
        generator = torch.Generator(device=device).manual_seed(0)
        def randn(*shape):
            return torch.randn(shape, generator=generator, device=device, dtype=dtype)
        return {"x": randn(batch, channels, size, size), "groups": groups,
                "weight": 1 + 0.1 * randn(channels), "bias": 0.1 * randn(channels),
                "shift": randn(batch, channels)}

    def work(dtype):  # read x, weight, bias, shift; write y
        return (2 * batch * channels * size * size + 2 * channels + batch * channels) * _itemsize(dtype)

    return OpCase("groupnorm_silu", f"{batch}x{channels}x{size}x{size} G{groups}",
                  (batch, channels, size, size, groups), make_inputs, "GB/s", work)


def _groupnorm_torch(x, groups, weight, bias, shift):
    return F.silu(F.group_norm(x + shift[:, :, None, None], groups, weight, bias, 1e-5))


def _groupnorm_sr3fast(x, groups, weight, bias, shift):
    return ops.groupnorm_silu(x, groups, weight, bias, 1e-5, shift)


# attention: softmax(q kᵀ / sqrt(d)) v with SR3's single head as wide as the channels.

def _attention_case(batch: int, length: int, dim: int) -> OpCase:
    def make_inputs(device, dtype):
        generator = torch.Generator(device=device).manual_seed(0)
        def randn():
            return torch.randn((batch, 1, length, dim), generator=generator, device=device, dtype=dtype)
        return {"q": randn(), "k": randn(), "v": randn()}

    def work(dtype):  # two products of 2·L·L·d FLOPs each, per batch and head
        return 4 * batch * 1 * length * length * dim

    return OpCase("attention", f"B{batch} L{length} d{dim}", (batch, 1, length, dim), make_inputs,
                  "TFLOP/s", work)


def _attention_torch(q, k, v):
    return F.scaled_dot_product_attention(q, k, v)


def _attention_math(q, k, v):
    scores = (q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5
    return torch.softmax(scores, dim=-1) @ v


def _attention_bmm_softmax(q, k, v):
    """The attention of the public SR3 code: two batched matmuls around a softmax, as plain ops."""
    batch, heads, length, dim = q.shape
    q, k, v = (t.reshape(batch * heads, length, dim) for t in (q, k, v))
    scores = torch.bmm(q, k.transpose(1, 2)).mul_(dim ** -0.5)
    return torch.bmm(torch.softmax(scores, dim=-1), v).view(batch, heads, length, dim)


def _attention_sdpa(backend_name: str):
    """F.scaled_dot_product_attention restricted to one of its kernels (no silent fallback)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    backend = getattr(SDPBackend, backend_name)

    def run(q, k, v):
        with sdpa_kernel(backend):
            return F.scaled_dot_product_attention(q, k, v)
    return run


def _attention_sr3fast(q, k, v):
    return ops.attention(q, k, v)


# reverse_step: x0 = clamp(a·y − b·eps), y_prev = m0·x0 + m1·y + sigma·z, z drawn per call;
# multistep cases add the history term m2·x0_prev (DPM-Solver++ 2M; history 2 also m3·x0_prev2,
# 3M) and return (y_prev, x0).
# The sampling state is float32 on every device (as sr3fast.diffusion keeps it).

def _reverse_step_case(batch: int, size: int, history: int = 0) -> OpCase:
    def make_inputs(device, dtype):
        generator = torch.Generator(device=device).manual_seed(0)
        shape = (batch, 3, size, size)
        y_t = torch.randn(shape, generator=generator, device=device, dtype=dtype)
        eps = torch.randn(shape, generator=generator, device=device, dtype=dtype)
        coefs = torch.rand((batch, 5 + history), generator=generator, device=device) + 0.5
        inputs = {"y_t": y_t, "eps": eps, "coefs": coefs}
        for name in ("x0_prev", "x0_prev2")[:history]:
            inputs[name] = torch.rand(shape, generator=generator, device=device, dtype=dtype)
        return inputs

    def work(dtype):  # read y_t, eps and the history, write y_prev (and x0); z is not read
        elements = 3 + history + (history > 0)
        return elements * batch * 3 * size * size * _itemsize(dtype) + batch * (5 + history) * 4

    label = f"{batch}x3x{size}x{size}{('', ' multistep', ' multistep-3m')[history]}"
    return OpCase("reverse_step", label, (batch, 3, size, size), make_inputs, "GB/s", work,
                  dtype_on_gpu=torch.float32)


def _reverse_step_torch(y_t, eps, coefs, x0_prev=None, x0_prev2=None):
    a, b, m0, m1, sigma = coefs[:, :5, None, None, None].unbind(1)
    x0 = (a * y_t - b * eps).clamp(-1.0, 1.0)
    if x0_prev is None:
        return m0 * x0 + m1 * y_t + sigma * torch.randn_like(y_t)
    y_prev = m0 * x0 + m1 * y_t + coefs[:, 5, None, None, None] * x0_prev
    if x0_prev2 is not None:
        y_prev = y_prev + coefs[:, 6, None, None, None] * x0_prev2
    return y_prev + sigma * torch.randn_like(y_t), x0


def _reverse_step_sr3fast(y_t, eps, coefs, x0_prev=None, x0_prev2=None):
    if x0_prev is None:
        return ops.reverse_step(y_t, eps, coefs, None, 1.0)
    return ops.reverse_step(y_t, eps, coefs, None, 1.0, x0_prev=x0_prev, x0_prev2=x0_prev2)


# conv2d: the U-Net's 3x3 convolutions (about 90% of a CPU step). Inputs NCHW, as the op takes
# them; inside the model the CPU backend's activations are channels-last already.

def _conv2d_case(batch: int, channels: int, size: int) -> OpCase:
    def make_inputs(device, dtype):
        generator = torch.Generator(device=device).manual_seed(0)
        x = torch.randn((batch, channels, size, size), generator=generator, device=device, dtype=dtype)
        weight = torch.randn((channels, channels, 3, 3), generator=generator, device=device, dtype=dtype)
        bias = torch.randn((channels,), generator=generator, device=device, dtype=dtype)
        return {"x": x, "weight": weight / (9 * channels) ** 0.5, "bias": bias}

    def work(dtype):  # 2 FLOPs per multiply-add, 9·C per output element
        return 2 * batch * channels * size * size * 9 * channels

    return OpCase("conv2d", f"{batch}x{channels}x{size}x{size} 3x3", (batch, channels, size, size),
                  make_inputs, "TFLOP/s", work)


def _conv2d_torch(x, weight, bias):
    return F.conv2d(x, weight, bias, padding=1)


def _conv2d_sr3fast(x, weight, bias):
    return ops.conv2d(x, weight, bias, (1, 1), (1, 1))


# op -> (plain PyTorch eager, what torch.compile compiles, sr3fast dispatch)
_IMPLEMENTATIONS = {
    "groupnorm_silu": (_groupnorm_torch, _groupnorm_torch, _groupnorm_sr3fast),
    "attention": (_attention_torch, _attention_math, _attention_sr3fast),
    "reverse_step": (_reverse_step_torch, _reverse_step_torch, _reverse_step_sr3fast),
    "conv2d": (_conv2d_torch, _conv2d_torch, _conv2d_sr3fast),
}
# Extra plain-PyTorch providers of one op, beside torch / torch.compile / sr3fast:<backend>.
# Attention has several PyTorch kernels worth beating: SDPA's memory-efficient kernel (its flash
# kernel stops at d = 256, below SR3's heads), its math path, and the public code's bmm + softmax.
EXTRA_PROVIDERS = {
    "attention": {
        "sdpa:efficient": _attention_sdpa("EFFICIENT_ATTENTION"),
        "sdpa:math": _attention_sdpa("MATH"),
        "bmm+softmax": _attention_bmm_softmax,
    },
}
NOTES = {
    "attention": "torch = F.scaled_dot_product_attention (its own kernel choice); sdpa:<kernel> "
                 "forces one; torch.compile compiles the explicit softmax(q kᵀ/√d) v",
    "reverse_step": "clip 1, z drawn per call (in-kernel where fused); float32 state; "
                    "multistep: + m2·x0_prev, x0 returned (2 more elements of traffic); "
                    "multistep-3m: + m3·x0_prev2 too (3 more)",
    "conv2d": "3x3, padding 1, NCHW inputs; sr3fast:cpu prepacks the weight once and runs "
              "channels-last (its time includes converting x)",
}

CASES = (
    _groupnorm_case(1, 64, 128, 32),
    _groupnorm_case(16, 512, 16, 32),
    _groupnorm_case(4, 128, 64, 32),
    _groupnorm_case(1, 1024, 32, 16),
    _attention_case(1, 256, 512),
    _attention_case(16, 256, 512),
    _attention_case(1, 1024, 1024),
    _attention_case(16, 1024, 1024),
    _reverse_step_case(1, 128),
    _reverse_step_case(16, 128),
    _reverse_step_case(1, 512),
    _reverse_step_case(1, 512, history=1),
    _reverse_step_case(1, 512, history=2),
    _conv2d_case(1, 64, 128),
    _conv2d_case(1, 128, 64),
    _conv2d_case(1, 256, 32),
    _conv2d_case(1, 512, 16),
)
# --quick: the smallest case of each op
QUICK_CASES = tuple(next(c for c in CASES if c.op == op) for op in _IMPLEMENTATIONS)


def providers(op: str) -> tuple[str, ...]:
    return ("torch", *EXTRA_PROVIDERS.get(op, {}), "torch.compile",
            *(f"sr3fast:{name}" for name in BACKENDS))


def provider_unavailable(provider: str, op: str, device: torch.device) -> str | None:
    """Why `provider` cannot be benchmarked for `op` on `device`, or None."""
    if not provider.startswith("sr3fast:"):
        return None
    return backend_unavailable(provider.split(":", 1)[1], device, (op,))


def make_callable(case: OpCase, provider: str, inputs: dict, compile_mode: str) -> Callable[[], object]:
    """A no-argument callable running `provider` on `inputs`. For sr3fast providers the caller
    selects the backend (sr3fast.backend) around every call of it, warm-up included."""
    eager, compilable, fused = _IMPLEMENTATIONS[case.op]
    extra = EXTRA_PROVIDERS.get(case.op, {})
    if provider == "torch":
        fn = eager
    elif provider in extra:
        fn = extra[provider]
    elif provider == "torch.compile":
        fn = torch.compile(compilable, mode=compile_mode, dynamic=False)
    else:
        fn = fused
    return lambda: fn(**inputs)
