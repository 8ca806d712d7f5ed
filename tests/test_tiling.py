"""Tiled sampling (sr3fast.tiling): the tile grid, the blend, exactness of one tile, every loop,
and the memory budget, measured."""
from __future__ import annotations

import pytest
import torch

import sr3fast
from sr3fast.diffusion import NoiseSchedule, respace, sample
from sr3fast.tiling import (PeakMemory, TiledDenoiser, axis_origins, axis_windows, cpu_peak_supported,
                            plan, tile_plan, tiler_for)

EPS32 = torch.finfo(torch.float32).eps


@pytest.fixture(scope="module")
def tiny():
    return sr3fast.load("tiny", seed=0)


class Pointwise(torch.nn.Module):
    """A stand-in whose eps at a pixel depends only on that pixel and its sample's noise level,
    eps = g·y_t − x/2 + c: tiling cannot change it, so a tiled run must give the untiled one
    (up to the blend's rounding) unless a crop is put back in the wrong place or gets another
    sample's noise level."""

    def __init__(self, multiple: int = 1, constant: float = 0.0, only_constant: bool = False):
        super().__init__()
        self.size_multiple, self.constant, self.only_constant = multiple, constant, only_constant
        self.calls = []

    def predict_noise(self, x, y_t, gamma):
        self.calls.append(tuple(x.shape))
        if self.only_constant:
            return torch.full_like(y_t, self.constant)
        return gamma.reshape(-1, 1, 1, 1) * y_t - x / 2 + self.constant


# ---- the grid and the windows -------------------------------------------------------------------

@pytest.mark.parametrize("length", [8, 9, 31, 64, 100, 257])
@pytest.mark.parametrize("size,overlap,multiple", [(8, 0, 8), (16, 4, 8), (16, 8, 4), (24, 5, 2),
                                                   (32, 16, 8), (7, 3, 1)])
def test_tiles_cover_the_canvas_overlap_and_align(length, size, overlap, multiple):
    size = min(size, length)
    if size % multiple:
        size = size // multiple * multiple or multiple
    if size > length:
        return
    overlap = min(overlap, size - 1)
    aligned = (length - size) % multiple == 0
    stride = (size - overlap) // multiple * multiple if aligned else size - overlap
    if length > size and stride < 1:
        with pytest.raises(ValueError, match="no room"):
            axis_origins(length, size, overlap, multiple)
        return
    origins = axis_origins(length, size, overlap, multiple)
    assert origins[0] == 0 and origins[-1] == length - size
    assert origins == sorted(origins)
    gaps = [b - a for a, b in zip(origins, origins[1:])]
    assert all(size - gap >= overlap for gap in gaps), (origins, size, overlap)
    assert all(gap > 0 for gap in gaps)
    if aligned:
        assert all(o % multiple == 0 for o in origins)
    # the fewest tiles: one fewer could not cover the canvas with that overlap
    if len(origins) > 1:
        assert (len(origins) - 2) * stride + size < length


@pytest.mark.parametrize("origins,size", [([0, 12, 24], 16), ([0, 6], 10), ([0, 10, 20], 10),
                                          ([0, 3, 6, 9], 8), ([0], 5)])
def test_windows_never_vanish_and_two_neighbours_sum_to_one(origins, size):
    windows = axis_windows(origins, size)
    length = origins[-1] + size
    total = torch.zeros(length, dtype=torch.float64)
    cover = torch.zeros(length, dtype=torch.int64)
    for origin, window in zip(origins, windows):
        assert window.min() > 0 and window.max() <= 1
        total[origin:origin + size] += window.double()
        cover[origin:origin + size] += 1
    assert torch.all(total > 0)
    # where at most two tiles meet, the ramps are a partition of unity
    pairs = cover <= 2
    assert torch.allclose(total[pairs], torch.ones_like(total[pairs]), rtol=0, atol=4 * EPS32)


def test_tiles_are_checked():
    with pytest.raises(ValueError, match="multiple of the model's size_multiple"):
        tile_plan(64, 64, 20, 4, 8)
    with pytest.raises(ValueError, match="tile_overlap"):
        tile_plan(64, 64, 16, 16, 8)
    with pytest.raises(ValueError, match="no room"):
        tile_plan(64, 64, 16, 12, 8)
    with pytest.raises(ValueError, match="tile must be"):
        tiler_for(Pointwise(), (1, 3, 8, 8), "cpu", torch.float32, "big")


# ---- the blend ------------------------------------------------------------------------------------

@pytest.mark.parametrize("height,width,tile,overlap", [(40, 28, 16, 4), (33, 17, 8, 3), (64, 64, 16, 0),
                                                       (23, 50, 12, 11), (9, 9, 4, 1)])
def test_a_constant_prediction_blends_to_the_constant(height, width, tile, overlap):
    """Σ w c / Σ w = c: whatever the tiling, a constant prediction comes out as that constant,
    to the rounding of the weighted sums: n tiles meeting at a pixel, each of Σ w c and Σ w
    rounds n times (relative eps32 each), the product w·c and the division once."""
    model = Pointwise(constant=0.7, only_constant=True)
    tiler = TiledDenoiser(model, tile, overlap)
    x = torch.zeros(2, 3, height, width)
    eps = tiler.predict_noise(x, x, torch.tensor([0.3, 0.9]))
    assert tiler.plan(height, width).count > 1
    assert eps.shape == x.shape
    layout = tiler.plan(height, width)
    cover = torch.zeros(height, width)
    for top, left in layout.origins():
        cover[top:top + layout.tile_height, left:left + layout.tile_width] += 1
    meeting = int(cover.max())
    err = (eps - 0.7).abs().max().item()
    print(f"constant blend: max error {err:.3e}, {meeting} tiles meet")
    assert err <= (2 * meeting + 2) * EPS32 * 0.7


@pytest.mark.parametrize("crops_per_call", [None, 1, 3])
@pytest.mark.parametrize("height,width,tile,overlap", [(40, 24, 16, 6), (17, 31, 8, 2)])
def test_tiles_go_back_where_they_came_from(height, width, tile, overlap, crops_per_call):
    """A pointwise stand-in, batch 3 with a noise level per sample: the tiled eps is the untiled
    one (weights sum to Σ w; one rounding of the weighted mean), in any number of passes."""
    model = Pointwise(constant=0.1)
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(3, 3, height, width, generator=gen), torch.randn(3, 3, height, width, generator=gen)
    gamma = torch.tensor([0.2, 0.5, 0.95])
    expected = model.predict_noise(x, y, gamma)
    tiler = TiledDenoiser(model, tile, overlap, crops_per_call)
    model.calls.clear()
    eps = tiler.predict_noise(x, y, gamma)
    count = tiler.plan(height, width).count
    per_call = crops_per_call or 3 * count
    assert len(model.calls) == -(-3 * count // per_call)
    assert max(shape[0] for shape in model.calls) == min(per_call, 3 * count)
    err = (eps - expected).abs().max().item()
    assert err <= 8 * EPS32 * expected.abs().max().item(), err


def test_a_single_tile_is_the_model_itself(tiny):
    tiler = TiledDenoiser(tiny, 64)
    x = torch.zeros(1, 3, 32, 48)
    assert tiler.denoiser_for(x, "python") == tiny.predict_noise
    assert tiler.plan(32, 48).count == 1


# ---- sampling --------------------------------------------------------------------------------------

def test_single_tile_upscale_equals_untiled_bit_for_bit(tiny):
    x = torch.rand(2, 3, 10, 7, generator=torch.Generator().manual_seed(1))
    untiled = sr3fast.upscale(x, model=tiny, steps=4, sampler="posterior", seed=3, progress=False, tile=False)
    auto = sr3fast.upscale(x, model=tiny, steps=4, sampler="posterior", seed=3, progress=False)
    one_tile = sr3fast.upscale(x, model=tiny, steps=4, sampler="posterior", seed=3, progress=False, tile=48)
    tiled = sr3fast.upscale(x, model=tiny, steps=4, sampler="posterior", seed=3, progress=False, tile=16)
    assert untiled.shape == (2, 3, 40, 28)
    assert torch.equal(one_tile, untiled) and torch.equal(auto, untiled)
    assert not torch.equal(tiled, untiled)          # tiles really ran: the U-Net sees less context


@pytest.mark.parametrize("sampler", ["sr3", "posterior", "ddim"])
def test_tiled_sampling_with_a_pointwise_model_is_untiled_sampling(sampler):
    """One global noise draw per step: with a model tiling cannot change, the tiled chain is
    the untiled chain, whichever sampler, up to the blend's rounding carried through the steps.

    Bound, propagated through the coefficient table (a, b, m0, m1) of each step: eps differs by
    at most 8·eps32·max|eps| (test_a_constant_prediction_blends_to_the_constant), the step maps
    a difference d in y and e in eps to |m0·a + m1|·d + |m0·b|·(g·d + e) (this model's eps moves
    by g·d), plus one rounding of the step's own result, eps32·max|y|."""
    from sr3fast.diffusion import noise_levels, reverse_coefficients
    model = Pointwise(multiple=4)
    x = torch.rand(1, 3, 36, 20, generator=torch.Generator().manual_seed(2)) * 2 - 1
    schedule = respace(NoiseSchedule.from_config(sr3fast.load("tiny").config.schedule), 6)
    y_T = torch.randn(x.shape, generator=torch.Generator().manual_seed(9))
    states = []
    untiled = sample(sampler, model, x, schedule, y_T=y_T, generator=torch.Generator().manual_seed(5),
                     callback=lambda i, y: states.append(y.clone()))
    tiled = sample(sampler, TiledDenoiser(model, 12, 4), x, schedule, y_T=y_T,
                   generator=torch.Generator().manual_seed(5))
    coefs = reverse_coefficients(schedule, sampler, 1, x.device)[:, 0].double()
    gammas = noise_levels(schedule, 1, x.device)[:, 0].double()
    y_before = [y_T.abs().max()] + [s.abs().max() for s in states[:-1]]
    bound = 0.0
    for i in range(coefs.shape[0]):
        a, b, m0, m1 = coefs[i, :4].tolist()
        g = gammas[i].item()
        eps_max = g * float(y_before[i]) + x.abs().max().item() / 2
        bound = abs(m0 * a + m1) * bound + abs(m0 * b) * (g * bound + 8 * EPS32 * eps_max) \
            + EPS32 * states[i].abs().max().item()
    err = (untiled - tiled).abs().max().item()
    print(f"{sampler}: tiled vs untiled max error {err:.3e}, bound {bound:.3e}")
    assert err <= bound


def test_every_loop_runs_the_tiles(tiny):
    """The C++ loop calls the tiled denoiser back each step: the same image as the Python loop,
    bit for bit (both run the extension's reverse_step on a CPU)."""
    pytest.importorskip("sr3fast._C")
    from sr3fast.diffusion.loops import compiled_extension
    try:
        compiled_extension("cpp")
    except RuntimeError as err:
        pytest.skip(str(err))
    x = torch.rand(1, 3, 40, 24, generator=torch.Generator().manual_seed(4)) * 2 - 1
    schedule = respace(NoiseSchedule.from_config(tiny.config.schedule), 3)
    tiler = TiledDenoiser(tiny, 16, 4)
    runs = [sample("posterior", tiler, x, schedule, generator=torch.Generator().manual_seed(1), loop=loop)
            for loop in ("python", "cpp")]
    assert torch.equal(runs[0], runs[1])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the graph loop needs CUDA")
def test_graph_loop_captures_the_tiles():
    model = sr3fast.load("tiny", seed=0, device="cuda")
    x = torch.rand(1, 3, 40, 24, device="cuda") * 2 - 1
    schedule = respace(NoiseSchedule.from_config(model.config.schedule), 3)
    tiler = TiledDenoiser(model, 16, 4)
    runs = [sample("posterior", tiler, x, schedule, generator=torch.Generator("cuda").manual_seed(1), loop=loop)
            for loop in ("python", "graph")]
    assert torch.equal(runs[0], runs[1])


@pytest.mark.parametrize("shape", [(1, 3, 13, 7), (2, 3, 5, 11), (1, 3, 1, 9)])
def test_rectangular_and_odd_sizes(tiny, shape):
    x = torch.rand(*shape, generator=torch.Generator().manual_seed(0))
    out = sr3fast.upscale(x, model=tiny, steps=2, seed=0, progress=False, tile=16, tile_overlap=4)
    assert out.shape == (shape[0], 3, shape[2] * 4, shape[3] * 4)
    assert torch.isfinite(out).all() and out.min() >= 0 - 1e-6


def test_a_package_is_not_tiled(tiny):
    with pytest.raises(ValueError, match="package"):
        TiledDenoiser(type("Package", (), {"denoiser_for": lambda self, x, loop: None,
                                            "size_multiple": 2})(), 16)


# ---- memory -----------------------------------------------------------------------------------------

needs_peak = pytest.mark.skipif(not cpu_peak_supported(), reason="measuring peak memory needs Linux /proc")


@needs_peak
def test_whole_canvas_that_fits_is_not_tiled(tiny):
    assert tiler_for(tiny, (1, 3, 64, 64), "cpu", torch.float32, None, max_memory=2**34) is None
    assert tiler_for(tiny, (1, 3, 64, 64), "cpu", torch.float32, None) is None   # what the machine holds


@needs_peak
def test_the_memory_budget_is_respected_measured():
    """The default model on a 256x256 output: untiled it takes more than the budget (measured);
    tile=None under that budget tiles, and the whole upscale call's measured peak stays within."""
    model = sr3fast.load("default")
    x = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    settings = dict(model=model, steps=2, seed=0, progress=False, start_gamma=0, back_projections=0)
    sr3fast.upscale(x[..., :8, :8], tile=False, **settings)                # warm up (weights packed)
    with PeakMemory("cpu") as untiled:
        sr3fast.upscale(x, tile=False, **settings)
    budget = 64 * 2**20
    chosen = plan(model, 1, 256, 256, budget, "cpu", torch.float32)
    print(f"untiled peak {untiled.bytes / 2**20:.1f} MiB; budget {budget / 2**20:.0f} MiB; {chosen}")
    assert untiled.bytes > budget
    assert chosen.tile is not None and chosen.tile < 256
    with PeakMemory("cpu") as tiled:
        sr3fast.upscale(x, max_memory=budget, **settings)
    print(f"tiled peak {tiled.bytes / 2**20:.1f} MiB")
    assert tiled.bytes <= budget


def test_a_budget_below_the_smallest_tile_says_what_to_do(tiny):
    with pytest.raises(MemoryError, match="max_memory"):
        sr3fast.upscale(torch.rand(1, 3, 16, 16), model=tiny, steps=1, progress=False, max_memory=1000)
