"""Tiled sampling: any output size on bounded memory (DESIGN.md, "Tiled sampling").

A tiled model is a denoiser: TiledDenoiser(model, tile).predict_noise(x, y_t, g) covers the
(H, W) canvas with overlapping tiles of `tile` output pixels a side, runs the model on the
tiles (batched, `crops_per_call` tile crops per forward), and blends their noise predictions
into one canvas,

    eps(p) = Σ_j w_j(p) · eps_j(p) / Σ_j w_j(p),      w_j(p) = r_j(row of p) · c_j(column of p),

where each tile's window falls off linearly over the strips it shares with a neighbour,
w(d) = (d + ½)/r at distance d from the shared edge of an overlap r wide, and is 1 elsewhere
(up to the canvas border). Two neighbours' ramps over their overlap sum to exactly 1, so the
windows are a partition of unity wherever at most two tiles meet along an axis, and they are
never 0 inside the canvas; the division makes the blend a weighted mean everywhere else. The
sampler then takes ONE reverse step on the whole canvas with one global noise draw. Hence:

  - a single tile covering the canvas is untiled sampling, bit for bit: the wrapper then hands
    the sampler the model's own denoiser, which sees the whole canvas;
  - no seam can form: y is one canvas, each step's eps is a smooth blend of predictions of the
    same y, and the noise is drawn for the canvas, not per tile;
  - it works with every sampler and loop ("python"; "cpp" calls it back each step; "graph"
    captures it: plan, windows and their sum are made before the loop, the step only slices,
    adds and divides).

Tile origins: along each axis, the fewest tiles whose neighbours overlap by at least `overlap`
pixels, spread evenly, each origin a multiple of the model's size_multiple (so every tile sees
the same downsampling grid as the whole canvas) when the canvas is one, as upscale's padded
canvases are; the last tile ends at the canvas edge. Tiles larger than the canvas shrink to it.

Memory (`plan`, what upscale(tile=None) uses): a forward pass's activation memory grows with
the pixels it sees, so the model's bytes per output pixel are MEASURED once per (model,
device, dtype, backend) by one forward pass on a probe of PROBE_BATCH × PROBE_SIDE² pixels (on
a CPU a batch costs more per pixel than one sample: 4.4 against 2.8 KB for the default model,
allocator fragmentation included), plus the weights' size once for per-shape repacked weights
and workspaces: on CUDA the
caching allocator's peak (torch.cuda.max_memory_allocated), on a CPU the process's peak
resident memory (Linux VmHWM, reset through /proc/self/clear_refs after malloc_trim). Measured
rather than derived from the U-Net config because what a pass holds depends on the backend's
kernels (layout copies, oneDNN scratch: about twice the tensors PyTorch sees on the default
model); the measurement includes everything the process really touches. Attention layers whose
backend stores the L×L scores (the reference; Triton's scratch) add a quadratic term computed
from the config, 8·L² bytes (scores and softmax in fp32) at the shallowest attention level.
The sampling state on the whole canvas (condition, y, eps, noise, the step's output) is
counted at CANVAS_BYTES_PER_PIXEL. The measurement varies by a few percent between processes,
so near a boundary tile=None may pick another tile size in another run: pass tile=N for
bit-reproducible output across runs.
"""
from __future__ import annotations

import math
import os
import re
import weakref
from dataclasses import dataclass

import torch

from .backends import resolve

PROBE_SIDE = 128           # output pixels a side of the measuring forward pass (at least 2 size_multiples)
PROBE_BATCH = 2            # samples in it: on a CPU a batch costs more per pixel than one sample
SAFETY = 1.25              # on the measured bytes per pixel: measurement noise, allocator fragmentation
# the sampling state on the whole canvas, per canvas pixel (3 channels, 4 bytes): condition,
# y, y in the model's dtype, the blended eps and its float32 copy, the weight sum, z, the reverse
# step's output and temporaries, upscale's padded condition and result copies: at most 16 such
# tensors alive at once
CANVAS_BYTES_PER_PIXEL = 16 * 3 * 4
CROP_BYTES_PER_PIXEL = 3 * 3 * 4   # per tile crop pixel: x and y_t crops and the eps it yields
CPU_FRACTION = 0.75        # of the available RAM that tile=None plans for on a CPU
CUDA_FRACTION = 0.9        # of the free (and cached-but-unused) GPU memory


# ---- the tile grid --------------------------------------------------------------------------------

def axis_origins(length: int, size: int, overlap: int, multiple: int = 1) -> list[int]:
    """Origins of the tiles `size` long covering [0, length) with neighbours overlapping by at
    least `overlap`: the fewest, spread evenly, multiples of `multiple` when length - size is
    one (else evenly rounded), the first at 0 and the last at length - size."""
    if size >= length:
        return [0]
    span = length - size
    aligned = span % multiple == 0
    # the largest (aligned) step that keeps the overlap
    stride = (size - overlap) // multiple * multiple if aligned else size - overlap
    if stride < 1:
        raise ValueError(f"tile_overlap={overlap} leaves no room to step a {size}-pixel tile by a "
                         f"multiple of {multiple}; use a smaller overlap or a larger tile")
    gaps = -(-span // stride)                          # ceil: tiles - 1
    if aligned:
        units = span // multiple                       # gaps of floor/ceil(units / gaps) <= stride
        return [multiple * ((2 * i * units + gaps) // (2 * gaps)) for i in range(gaps + 1)]
    return [(2 * i * span + gaps) // (2 * gaps) for i in range(gaps + 1)]


def axis_windows(origins: list[int], size: int) -> list[torch.Tensor]:
    """Each tile's 1-D window (float32, `size` long): (d + ½)/r over the r pixels it shares with
    the previous and the next tile, d the distance from that shared edge; 1 elsewhere."""
    windows = []
    position = torch.arange(size, dtype=torch.float64)
    for j, origin in enumerate(origins):
        window = torch.ones(size, dtype=torch.float64)
        if j > 0:
            shared = origins[j - 1] + size - origin
            if shared > 0:
                window *= ((position + 0.5) / shared).clamp(max=1)
        if j + 1 < len(origins):
            shared = origin + size - origins[j + 1]
            if shared > 0:
                window *= ((size - 1 - position + 0.5) / shared).clamp(max=1)
        windows.append(window.float())
    return windows


@dataclass(frozen=True)
class TilePlan:
    """The tiles of an (height, width) canvas: each tile is tile_height × tile_width pixels at
    (top, left) for every top in `tops` and left in `lefts`."""
    height: int
    width: int
    tile_height: int
    tile_width: int
    tops: tuple[int, ...]
    lefts: tuple[int, ...]

    @property
    def count(self) -> int:
        return len(self.tops) * len(self.lefts)

    def origins(self) -> list[tuple[int, int]]:
        return [(top, left) for top in self.tops for left in self.lefts]


def tile_plan(height: int, width: int, tile: int, overlap: int, multiple: int = 1) -> TilePlan:
    """The tile grid of an (height, width) canvas for square tiles of `tile` pixels (shrunk to
    the canvas where it is smaller) overlapping by at least `overlap`."""
    if isinstance(tile, bool) or not isinstance(tile, int) or tile < 1:
        raise ValueError(f"tile must be a positive number of output pixels, got {tile!r}")
    if tile % multiple:
        raise ValueError(f"tile={tile} must be a multiple of the model's size_multiple ({multiple}: "
                         f"its U-Net halves the resolution that many times over); try "
                         f"{max(multiple, tile // multiple * multiple)}")
    if isinstance(overlap, bool) or not isinstance(overlap, int) or not 0 <= overlap < tile:
        raise ValueError(f"tile_overlap must be an integer in [0, tile={tile}), got {overlap!r}")
    tile_height, tile_width = min(tile, height), min(tile, width)
    return TilePlan(height, width, tile_height, tile_width,
                    tuple(axis_origins(height, tile_height, overlap, multiple)),
                    tuple(axis_origins(width, tile_width, overlap, multiple)))


def default_overlap(tile: int) -> int:
    """A quarter of the tile: wide enough that the ramps hide the tiles' border effects."""
    return tile // 4


# ---- the denoiser ---------------------------------------------------------------------------------

class TiledDenoiser:
    """model's denoiser run on overlapping tiles and blended (see the module docstring).

    model: anything with predict_noise(x, y_t, gamma) (an SR3, a stand-in); tile: the tile side
    in output pixels, a multiple of model.size_multiple; overlap: at least this many pixels
    shared by neighbouring tiles (default tile // 4); crops_per_call: tile crops per forward
    pass (None: all of them in one pass). Usable wherever a model is: sample(..., TiledDenoiser(
    model, 256), x, schedule), or upscale(tile=256), which builds it.
    """

    def __init__(self, model, tile: int, overlap: int | None = None, crops_per_call: int | None = None):
        if getattr(model, "denoiser_for", None) is not None:
            raise ValueError("a package from `sr3fast export` runs the U-Net at the one size it was "
                             "compiled for, so it cannot run tiles; tile with the model instead "
                             "(drop package=, or pass tile=False)")
        if crops_per_call is not None and (isinstance(crops_per_call, bool) or not isinstance(crops_per_call, int)
                                           or crops_per_call < 1):
            raise ValueError(f"crops_per_call must be a positive integer or None, got {crops_per_call!r}")
        self.model = model
        self.tile = tile
        self.overlap = default_overlap(tile) if overlap is None else overlap
        self.crops_per_call = crops_per_call
        tile_plan(2 * tile, 2 * tile, tile, self.overlap, self.size_multiple)   # checks tile and overlap now
        self._prepared: dict = {}

    @property
    def size_multiple(self) -> int:
        return getattr(self.model, "size_multiple", 1)

    def plan(self, height: int, width: int) -> TilePlan:
        return tile_plan(height, width, self.tile, self.overlap, self.size_multiple)

    def denoiser_for(self, x: torch.Tensor, loop: str):
        """What the sampling loops call each step for canvases shaped like x (see
        sr3fast.diffusion.loops.denoiser_for): the model's own predict_noise when one tile
        covers the canvas, else the blend, with its windows made now (before any CUDA graph
        capture)."""
        plan = self.plan(x.shape[-2], x.shape[-1])
        if plan.count == 1:
            return self.model.predict_noise
        return self._blend(plan, x.shape[0], x.device)

    def predict_noise(self, x: torch.Tensor, y_t: torch.Tensor, gamma: torch.Tensor) -> torch.Tensor:
        """eps for the whole canvas: (B, C, H, W) float32 (the model's own dtype for one tile)."""
        return self.denoiser_for(x, "python")(x, y_t, gamma)

    forward = predict_noise

    def _windows(self, plan: TilePlan, device: torch.device):
        """Each tile's 2-D window (tile_height, tile_width) and their sum over the canvas (H, W)."""
        key = (plan, str(device))
        if key not in self._prepared:
            rows = axis_windows(list(plan.tops), plan.tile_height)
            cols = axis_windows(list(plan.lefts), plan.tile_width)
            windows = [(r[:, None] * c[None, :]).to(device) for r in rows for c in cols]
            total = torch.zeros(plan.height, plan.width, dtype=torch.float32, device=device)
            for (top, left), window in zip(plan.origins(), windows):
                total[top:top + plan.tile_height, left:left + plan.tile_width] += window
            self._prepared = {key: (windows, total)}      # one canvas shape at a time
        return self._prepared[key]

    def _blend(self, plan: TilePlan, batch: int, device: torch.device):
        """The blending denoiser for (batch, C, H, W) canvases. Everything that depends only on
        the shapes (windows, their sum, which crops go into which pass and the index of each
        crop's sample) is made here, once; each call slices, runs the model, adds and divides."""
        windows, total = self._windows(plan, device)
        th, tw = plan.tile_height, plan.tile_width
        crops = [(top, left, j, b) for j, (top, left) in enumerate(plan.origins()) for b in range(batch)]
        per_call = self.crops_per_call or len(crops)
        passes = [(crops[i:i + per_call],
                   torch.tensor([b for *_, b in crops[i:i + per_call]], device=device))
                  for i in range(0, len(crops), per_call)]
        predict = self.model.predict_noise

        def denoise(x: torch.Tensor, y_t: torch.Tensor, gamma: torch.Tensor) -> torch.Tensor:
            gammas = gamma.reshape(-1).float() if torch.is_tensor(gamma) else \
                torch.full((1,), float(gamma), device=x.device)
            gammas = gammas.expand(batch) if gammas.numel() == 1 else gammas
            eps = None
            for chunk, samples in passes:
                xs = torch.stack([x[b, :, t:t + th, l:l + tw] for t, l, _, b in chunk])
                ys = torch.stack([y_t[b, :, t:t + th, l:l + tw] for t, l, _, b in chunk])
                out = predict(xs, ys, gammas.index_select(0, samples))
                del xs, ys
                if eps is None:
                    eps = torch.zeros((batch, out.shape[1], plan.height, plan.width),
                                      dtype=torch.float32, device=x.device)
                for i, (t, l, j, b) in enumerate(chunk):
                    eps[b, :, t:t + th, l:l + tw] += out[i].float() * windows[j]
                del out
            return eps.div_(total)

        return denoise


# ---- memory ---------------------------------------------------------------------------------------

def available_memory(device: torch.device) -> int:
    """Bytes that sampling on `device` may plan for: on CUDA CUDA_FRACTION of the free memory
    plus what torch's caching allocator holds unused; on a CPU CPU_FRACTION of the available
    RAM (psutil when installed, else /proc/meminfo's MemAvailable, else sysconf)."""
    device = torch.device(device)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
        return int(CUDA_FRACTION * (free + cached))
    if device.type != "cpu":
        raise ValueError(f"no memory budget is known for {device.type} devices; pass max_memory= "
                         "(bytes) or tile= yourself")
    return int(CPU_FRACTION * _available_ram())


def _available_ram() -> int:
    try:
        import psutil
        return int(psutil.virtual_memory().available)
    except ImportError:
        pass
    try:
        with open("/proc/meminfo") as handle:
            match = re.search(r"^MemAvailable:\s+(\d+) kB", handle.read(), re.MULTILINE)
        if match:
            return int(match.group(1)) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")


def _rss_field(name: str) -> int:
    with open("/proc/self/status") as handle:
        return int(re.search(rf"^{name}:\s+(\d+) kB", handle.read(), re.MULTILINE).group(1)) * 1024


def _trim_malloc() -> None:
    """Give freed heap pages back to the OS, so that a measured run allocates fresh ones."""
    try:
        import ctypes
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def cpu_peak_supported() -> bool:
    """Whether this process can reset and read its peak resident memory (Linux)."""
    return os.access("/proc/self/clear_refs", os.W_OK) and os.path.exists("/proc/self/status")


class PeakMemory:
    """`with PeakMemory(device) as peak: ...`, then peak.bytes: the most memory the block used
    above what was in use when it began. CUDA: torch's allocator peak; CPU: the process's peak
    resident set (VmHWM, reset by writing 5 to /proc/self/clear_refs), which counts every
    allocation the block touched, torch's or a library's."""

    def __init__(self, device):
        self.device = torch.device(device)
        self.bytes = 0

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self._start = torch.cuda.memory_allocated(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            if not cpu_peak_supported():
                raise RuntimeError("measuring CPU memory needs Linux's /proc/self/clear_refs; pass "
                                   "tile= (output pixels) to sr3fast.upscale instead of a memory budget")
            _trim_malloc()
            with open("/proc/self/clear_refs", "w") as handle:
                handle.write("5")               # VmHWM := VmRSS
            self._start = _rss_field("VmRSS")
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.bytes = torch.cuda.max_memory_allocated(self.device) - self._start
        else:
            self.bytes = _rss_field("VmHWM") - self._start
        return False


_MEASURED: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def _attention_level(model) -> int | None:
    """The shallowest U-Net level with self-attention (the middle block always has it)."""
    unet = getattr(getattr(model, "config", None), "unet", None)
    if unet is None:
        return None
    levels = [i for i, r in enumerate(unet.resolutions()) if r in unet.attn_res]
    return min(levels + [unet.levels - 1])


def _quadratic_bytes(model, pixels: int, device: torch.device) -> float:
    """Bytes of the L×L attention scores of one sample seeing `pixels` output pixels, where the
    attention backend stores them (the reference; Triton's score scratch): 8·L² (fp32 scores and
    softmax), L the pixels of the shallowest attention level. 0 on the cpu backend (flash)."""
    level = _attention_level(model)
    if level is None or resolve("attention", device.type) == "cpu":
        return 0.0
    length = pixels / 4 ** level
    return 8.0 * length * length


def bytes_per_pixel(model, device: torch.device, dtype: torch.dtype) -> float:
    """Measured activation bytes per output pixel of one sample's forward pass (linear part;
    see the module docstring), times SAFETY. Measured once per model, device, dtype, backend."""
    device = torch.device(device)
    key = (str(device), dtype, resolve("conv2d", device.type), resolve("attention", device.type))
    cache = _MEASURED.setdefault(model, {})
    if key not in cache:
        multiple = getattr(model, "size_multiple", 1)
        side = max(-(-PROBE_SIDE // multiple) * multiple, 2 * multiple)
        x = torch.zeros(PROBE_BATCH, 3, side, side, device=device, dtype=dtype)
        gamma = torch.full((PROBE_BATCH,), 0.5, device=device)
        with torch.no_grad():
            model.predict_noise(x[..., :multiple, :multiple], x[..., :multiple, :multiple], gamma)  # warm up
            with PeakMemory(device) as peak:
                model.predict_noise(x, x, gamma)
        pixels = PROBE_BATCH * side * side
        linear = max(peak.bytes - PROBE_BATCH * _quadratic_bytes(model, side * side, device), 0.0)
        cache[key] = SAFETY * linear / pixels
    return cache[key]


def fixed_bytes(model) -> int:
    """What a pass holds whatever its size: a copy of the weights (the cpu backend's convolutions
    keep them repacked for the shapes they run; cuDNN and oneDNN keep per-shape workspaces)."""
    parameters = getattr(model, "parameters", None)
    return sum(p.numel() * p.element_size() for p in parameters()) if parameters else 0


@dataclass(frozen=True)
class MemoryPlan:
    """What a sampling call needs: tile None (untiled) or its side, crops per forward pass, and
    the estimated bytes, against the budget."""
    tile: int | None
    crops_per_call: int | None
    estimate: int
    budget: int


def plan(model, batch: int, height: int, width: int, budget: int, device, dtype,
         overlap: int | None = None) -> MemoryPlan:
    """The largest tile (None: untiled, when the whole canvas fits) and the most crops per pass
    that keep the estimated peak within `budget` bytes. Raises MemoryError, saying what to do,
    when not even the smallest tile fits."""
    device = torch.device(device)
    per_pixel = bytes_per_pixel(model, device, dtype)
    canvas = CANVAS_BYTES_PER_PIXEL * batch * height * width + fixed_bytes(model)

    def crop_bytes(pixels: int, crops: bool = True) -> float:
        return (per_pixel + (CROP_BYTES_PER_PIXEL if crops else 0)) * pixels + \
            SAFETY * _quadratic_bytes(model, pixels, device)

    untiled = canvas + batch * crop_bytes(height * width, crops=False)
    if untiled <= budget:
        return MemoryPlan(None, None, int(untiled), budget)
    multiple = getattr(model, "size_multiple", 1)
    largest = -(-max(height, width) // multiple) * multiple
    for tile in range(largest, multiple - 1, -multiple):
        tile_overlap = default_overlap(tile) if overlap is None else overlap
        if tile_overlap >= tile or (tile - tile_overlap) // multiple < 1:
            continue
        pixels = min(tile, height) * min(tile, width)
        one = crop_bytes(pixels)
        if canvas + one <= budget:
            layout = tile_plan(height, width, tile, tile_overlap, multiple)
            crops = min(int((budget - canvas) // one), batch * layout.count)
            return MemoryPlan(tile, crops, int(canvas + crops * one), budget)
    raise MemoryError(
        f"sampling a {batch}×{height}×{width} canvas needs about {untiled / 2**30:.2f} GiB untiled, and "
        f"even the smallest tile does not fit the budget of {budget / 2**30:.2f} GiB (the canvas "
        f"state alone takes {canvas / 2**30:.2f} GiB); raise max_memory=, free memory, or upscale "
        "fewer or smaller images at a time")


def tiler_for(model, shape: tuple[int, int, int, int], device, dtype, tile, overlap: int | None = None,
              max_memory: int | None = None) -> TiledDenoiser | None:
    """What upscale samples a condition of `shape` (B, C, H, W) on `device` in `dtype` with:
    None (the model itself, untiled) or a TiledDenoiser.

    tile: False (never tile), None (tile only when the canvas does not fit `max_memory` bytes,
    default available_memory(device); the tile and the crops per pass from `plan`), or an int
    (tiles of that side; crops per pass from max_memory when given, else all at once)."""
    batch, _, height, width = shape
    device = torch.device(device)
    if tile is False:
        if overlap is not None or max_memory is not None:
            raise ValueError("tile=False samples untiled; drop tile_overlap= and max_memory=")
        return None
    if tile is True or (tile is not None and not isinstance(tile, int)):
        raise ValueError(f"tile must be None (chosen from the memory budget), False (untiled) or an "
                         f"integer side in output pixels, got {tile!r}")
    if max_memory is not None and (isinstance(max_memory, bool) or not isinstance(max_memory, int)
                                   or max_memory < 1):
        raise ValueError(f"max_memory must be a positive number of bytes, got {max_memory!r}")
    if tile is not None and max_memory is None:
        return TiledDenoiser(model, tile, overlap)
    budget = max_memory if max_memory is not None else available_memory(device)
    if tile is not None:     # the tile is given; the budget sets how many crops go through at once
        tiler = TiledDenoiser(model, tile, overlap)
        layout = tiler.plan(height, width)
        per_pixel = bytes_per_pixel(model, device, dtype) + CROP_BYTES_PER_PIXEL
        pixels = layout.tile_height * layout.tile_width
        one = per_pixel * pixels + SAFETY * _quadratic_bytes(model, pixels, device)
        spare = budget - CANVAS_BYTES_PER_PIXEL * batch * height * width - fixed_bytes(model)
        tiler.crops_per_call = max(1, min(int(spare // one), batch * layout.count))
        return tiler
    chosen = plan(model, batch, height, width, budget, device, dtype, overlap)
    if chosen.tile is None:
        return None
    return TiledDenoiser(model, chosen.tile, overlap, chosen.crops_per_call)
