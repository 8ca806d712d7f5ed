"""Where the steps of a sampling call run: the samplers' and `upscale`'s `loop=`.

    "python"  a Python loop: eps = f(x, y, gamma_i), then `ops.reverse_step` on the selected
              backend. Any device, any denoiser; the reference for the other two.
    "cpp"     the same loop in C++ (`sr3fast._C.sample`, csrc/sampler/), no Python between steps.
              With a package from `sr3fast export` the whole call runs without Python; with a
              module, C++ calls back into its predict_noise once per step.
    "graph"   CUDA only: one step (denoiser, noise, reverse_step) captured as a CUDA graph that
              reads its step index from a device counter and advances it, replayed T times; the
              host's per-step work is one graph launch.

Every loop follows the contract of sr3fast.diffusion.coefficients. What a seed reproduces
across loops depends on the reverse_step kernel each one runs:

    "python", "graph"  `ops.reverse_step` of the selected backend (auto: the extension's kernel
                       on a CPU, the Triton kernel on CUDA);
    "cpp"              always the extension's kernel (sr3fast::reverse_step through the
                       dispatcher), whatever backend is selected.

  - noise="torch" (the default): every loop draws y_T and each z with torch.randn from the one
    generator in the same order, so all see the same noise. Where the kernels are the same ("cpp"
    against "python" on a CPU, or on CUDA under sr3fast.backend("cuda"); "graph" against
    "python") the image is the same bit for bit. On CUDA under auto, "cpp" (the
    extension's kernel: every operation rounded on its own, as the reference) and "python" (the
    Triton kernel, compiled with FMA contraction) differ by a few float32 ulps per step, which the
    denoiser carries into the following steps: the same image to the eye, not to the bit.
  - noise="kernel": z is drawn inside the kernel, and the extension's and the Triton kernel's
    in-kernel streams are different. So on CUDA under auto, "cpp" and "python" draw different
    noise for one seed: two different, equally valid samples. Select sr3fast.backend("cuda") to
    make the Python loops draw what the C++ loop draws.

Why not one graph for the whole loop: a U-Net step is a few hundred kernels, so T = 2000 steps
would make a graph of about a million nodes, which takes long to instantiate and replays no
faster than one step's graph launched T times back to back.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from .. import ops

LOOPS = ("python", "cpp", "graph")
NOISE_SOURCES = ("torch", "kernel")
STATE_DTYPE = torch.float32  # of y between steps, whatever the model runs in

Denoise = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def denoiser_for(model, x: torch.Tensor, loop: str) -> Denoise | str:
    """What `loop` calls each step for `model`. A model is anything with
    predict_noise(x, y_t, gamma) -> eps (an SR3, a stand-in); its predict_noise is the denoiser.
    A model may instead provide denoiser_for(x, loop), checking that it can take x: a package
    opened by the product layer (sr3fast.export.Package) does, and for loop="cpp" returns the
    package's path, which the C++ loop loads and runs without Python. The loops never open
    files themselves: what reads packages lives above them."""
    provide = getattr(model, "denoiser_for", None)
    if provide is not None:
        return provide(x, loop)
    return model.predict_noise


@dataclass(frozen=True)
class SamplingRun:
    """The inputs of one sampling call, as every loop takes them."""
    x: torch.Tensor                    # (B, C, H, W) condition, in the denoiser's dtype
    y_T: torch.Tensor                  # (B, C, H, W) float32 starting noise (not modified)
    coefs: torch.Tensor                # (T, B, 7) float32: reverse_coefficients
    gammas: torch.Tensor               # (T, B) float32: noise_levels
    clip: float | None
    stochastic: bool                   # False when no step adds noise (DDIM, eta = 0; dpmpp_2m)
    history: int                       # past x0 estimates carried from step to step: 0, 1
                                       # (m2: DPM-Solver++ 2M) or 2 (m2, m3: 3M); HISTORY
    noise: str                         # "torch" or "kernel": see sr3fast.diffusion.samplers
    generator: torch.Generator | None

    @property
    def steps(self) -> int:
        return self.coefs.shape[0]


def run_python(denoise: Denoise, run: SamplingRun, callback: Callable | None = None) -> torch.Tensor:
    """y_0 (float32) of `run`, stepping in Python; callback(i, y) after loop step i."""
    y = run.y_T.clone()
    no_noise = torch.zeros_like(y)
    # the multistep history, zeros before the first step (whose m2 and m3 are 0)
    x0_prev = torch.zeros_like(y) if run.history >= 1 else None
    x0_prev2 = torch.zeros_like(y) if run.history == 2 else None
    last = run.steps - 1
    for i in range(run.steps):
        eps = denoise(run.x, y.to(run.x.dtype), run.gammas[i])
        if not run.stochastic or i == last:
            z = no_noise
        elif run.noise == "torch":
            z = torch.randn(y.shape, generator=run.generator, device=y.device, dtype=STATE_DTYPE)
        else:
            z = None  # drawn in-kernel from the generator
        if run.history:
            y, x0 = ops.reverse_step(y, eps.to(STATE_DTYPE), run.coefs[i], noise=z, clip=run.clip,
                                     generator=run.generator, x0_prev=x0_prev, x0_prev2=x0_prev2)
            if run.history == 2:
                x0_prev2 = x0_prev        # the history moves back one step: references, no copies
            x0_prev = x0
        else:
            y = ops.reverse_step(y, eps.to(STATE_DTYPE), run.coefs[i], noise=z, clip=run.clip,
                                 generator=run.generator)
        if callback is not None:
            callback(i, y)
    return y


def run_cpp(denoiser: Denoise | str, run: SamplingRun, callback: Callable | None = None) -> torch.Tensor:
    """y_0 (float32) of `run`, stepping in C++. denoiser: a callable f(x, y_t, gamma) -> eps,
    called back into Python each step, or the path of a package (sr3fast export), run in C++.
    Each step runs the extension's reverse_step whatever backend is selected (see the module
    docstring for what that means on CUDA)."""
    extension = compiled_extension("cpp")
    return extension.sample(denoiser, run.x, run.y_T, run.coefs, run.gammas, run.clip,
                            run.stochastic, run.noise == "kernel", run.generator, callback,
                            run.history)


def run_graph(denoise: Denoise, run: SamplingRun, callback: Callable | None = None) -> torch.Tensor:
    """y_0 (float32) of `run` by replaying one captured step `run.steps` times (CUDA only).

    The graph indexes the tables with a device step counter it increments itself, so every
    replay is the next step with no host work but the launch. The noise is drawn inside the graph
    from the generator, registered with the graph so that each replay draws fresh values (the
    same ones, in the same order, as the Python loop); on the last step it is drawn but its
    sigma is 0 (see coefficients), so only the generator's final state differs.

    callback(i, y) gets the graph's state buffer, which the next replay overwrites: clone it to
    keep it.
    """
    device = run.x.device
    if device.type != "cuda":
        raise ValueError(f"loop='graph' captures the sampling step in a CUDA graph and needs a CUDA "
                         f"device; the inputs are on {device}. Use loop='cpp' or loop='python'.")
    if device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    generator = run.generator if run.generator is not None else torch.cuda.default_generators[device.index]
    y = run.y_T.clone()
    step = torch.zeros(1, dtype=torch.long, device=device)
    no_noise = None if run.stochastic else torch.zeros_like(y)
    # the multistep history, static buffers the graph updates (copies: a captured graph reads
    # fixed addresses, so the shift cannot be a swap of references as in the other loops)
    x0_prev, x0_prev2 = torch.zeros_like(y), torch.zeros_like(y)

    def one_step() -> None:
        coefs = run.coefs.index_select(0, step)[0]    # (B, 7) row of this step
        gamma = run.gammas.index_select(0, step)[0]   # (B,)
        eps = denoise(run.x, y.to(run.x.dtype), gamma)
        z = no_noise
        if z is None and run.noise == "torch":
            z = torch.randn(y.shape, generator=generator, device=device, dtype=STATE_DTYPE)
        if run.history:
            y_prev, x0 = ops.reverse_step(y, eps.to(STATE_DTYPE), coefs, noise=z, clip=run.clip,
                                          generator=generator, x0_prev=x0_prev,
                                          x0_prev2=x0_prev2 if run.history == 2 else None)
            if run.history == 2:
                x0_prev2.copy_(x0_prev)
            x0_prev.copy_(x0)
        else:
            y_prev = ops.reverse_step(y, eps.to(STATE_DTYPE), coefs, noise=z, clip=run.clip,
                                      generator=generator)
        y.copy_(y_prev)
        step.add_(1)

    graph = _capture(one_step, device, generator, restore=(y, x0_prev, x0_prev2, step),
                     warmup=min(2, run.steps))
    for i in range(run.steps):
        graph.replay()
        if callback is not None:
            callback(i, y)
    return y.clone()


def _capture(one_step: Callable[[], None], device: torch.device, generator: torch.Generator,
             restore: tuple[torch.Tensor, ...], warmup: int) -> torch.cuda.CUDAGraph:
    """one_step as a CUDA graph. It is first run `warmup` times on a side stream (capture needs
    the kernels compiled, autotuned and their libraries initialised; no more runs than the table
    has steps, since each advances the step counter); `restore` tensors and the generator are
    then reset, so the warm-up changes neither the image nor the noise."""
    saved = [tensor.clone() for tensor in restore]
    generator_state = generator.get_state()
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        for _ in range(warmup):
            one_step()
    torch.cuda.current_stream(device).wait_stream(side)
    for tensor, value in zip(restore, saved):
        tensor.copy_(value)
    generator.set_state(generator_state)
    graph = torch.cuda.CUDAGraph()
    if generator is not torch.cuda.default_generators[device.index]:  # the default is registered already
        graph.register_generator_state(generator)
    with torch.cuda.graph(graph):
        one_step()
    return graph


def compiled_extension(loop: str):
    """sr3fast._C with its C++ sampling loop, or a RuntimeError saying how to get it."""
    try:
        import sr3fast._C as extension
    except ImportError as err:
        raise RuntimeError(f"loop={loop!r} runs in sr3fast's compiled extension, which is not "
                           f"available ({err}); reinstall sr3fast with a C++ compiler "
                           "(`pip install -e .`, see README) or use loop='python'") from err
    if not hasattr(extension, "sample"):
        raise RuntimeError(f"loop={loop!r}: this build of sr3fast._C predates the C++ sampling "
                           "loop; rebuild it (`pip install --no-build-isolation -e .`)")
    return extension
