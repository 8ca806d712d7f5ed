"""The SR3 model: public-checkpoint U-Net against an independent peer, the paper U-Net's structure,
configs, presets, and that the model runs on the fused ops."""
from __future__ import annotations

import copy
import json
import math
import re

import pytest
import torch
from torch import nn

import peer_sr3
import sr3fast
from sr3fast import ops
from sr3fast.model import PaperUNet, PublicUNet, SR3Config, UNetConfig, build, get_preset, presets
from sr3fast.model.paper_unet import BigGANResBlock
from sr3fast.model.layers import SelfAttention
from support import fast_backend_params, fp32_atol, report

PUBLIC_16_128_JSON = {"in_channel": 6, "out_channel": 3, "inner_channel": 64, "channel_multiplier": [1, 2, 4, 8, 8],
                      "attn_res": [16], "res_blocks": 2, "dropout": 0.2}  # no norm_groups: the public code uses 32
PUBLIC_64_512_JSON = {"in_channel": 6, "out_channel": 3, "inner_channel": 64, "norm_groups": 16,
                      "channel_multiplier": [1, 2, 4, 8, 16], "attn_res": [], "res_blocks": 1, "dropout": 0}


def peer_unet(config: UNetConfig) -> peer_sr3.UNet:
    return peer_sr3.UNet(in_channel=config.in_channel, out_channel=config.out_channel,
                         inner_channel=config.inner_channel, norm_groups=config.norm_groups,
                         channel_mults=config.channel_mults, attn_res=config.attn_res,
                         res_blocks=config.res_blocks, dropout=config.dropout, image_size=config.image_size)


def n_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def shapes(module: nn.Module) -> dict:
    return {name: tuple(t.shape) for name, t in module.state_dict().items()}


def randomize_norms_(module: nn.Module, generator: torch.Generator) -> None:
    """GroupNorm affine parameters away from their (1, 0) init, so they matter in comparisons."""
    with torch.no_grad():
        for norm in (m for m in module.modules() if isinstance(m, nn.GroupNorm)):
            norm.weight.copy_(1 + 0.3 * torch.randn(norm.weight.shape, generator=generator))
            norm.bias.copy_(0.3 * torch.randn(norm.bias.shape, generator=generator))


EPS32 = torch.finfo(torch.float32).eps


def float64_twin(module: nn.Module) -> nn.Module:
    """The same network in float64 (a copy): its rounding, 2^-53 per operation, is 2^29 times
    float32's, so against float32 evaluations it stands for the exact result."""
    return copy.deepcopy(module).double()


def assert_fp32_accurate(name: str, got: torch.Tensor, expected: torch.Tensor, exact: torch.Tensor) -> None:
    """`got` and `expected` are two float32 evaluations of one network on the same inputs (other
    code, summation order or batching); `exact` is that network in float64 (float64_twin).

    The tolerance is measured, not modelled: |expected - exact| is what float32 rounding does to
    this network on these inputs, error growth through every layer included. Two evaluations of
    the same maths in float32 are each that far from the exact result; `got` must be as accurate
    as `expected` up to a factor 2 (DESIGN.md convention 3), plus 4 units of float32 rounding at
    the output's largest value in case `expected` lands unusually close to exact. On tiny and
    small this is about 3e-6 for outputs of spread 0.4 (measured float32 errors about 1e-6).
    A per-layer formula (8 eps32 sqrt(K) times the layer count) came to 1.6e-2 on small, about 4%
    of the spread, and let through a GroupNorm eps of 1e-3 instead of 1e-5 (moves the output by
    8e-3 .. 1e-2), an attention scale of 1/sqrt(d+8) (6e-4 .. 7e-3) and a conv bias off by 1e-3
    (2.6e-4 .. 1e-3), all of which this bound catches by 80x or more."""
    exact = exact.double()
    err_got = (got.double() - exact).abs().max().item()
    err_expected = (expected.double() - exact).abs().max().item()
    atol = 2 * err_expected + 4 * EPS32 * exact.abs().max().item()
    report(name, got, expected)
    print(f"{name}: float32 error against float64 {err_got:.3e}, the reference's {err_expected:.3e}, "
          f"bound {atol:.3e}")
    assert got.shape == expected.shape == exact.shape
    assert err_got <= atol, (f"{name}: {err_got:.3e} from the float64 result, more than twice the "
                             f"float32 reference's {err_expected:.3e} (bound {atol:.3e})")


def loaded_pair(name: str, seed: int = 0):
    """(sr3fast model, peer UNet) with the peer's random weights loaded into the model, both eval."""
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = build(name).eval()
    peer = peer_unet(model.config.unet).eval()
    randomize_norms_(peer, generator)
    model.unet.load_state_dict(peer.state_dict())
    return model, peer


def noise_levels(batch: int, generator: torch.Generator) -> torch.Tensor:
    """sqrt(g) spread over (0.05, 1): non-trivial levels, some near 1 as in most of a schedule."""
    return 0.05 + 0.95 * torch.rand(batch, generator=generator)


# ---------------------------------------------------------------- public variant: structure

@pytest.mark.parametrize("preset, expected", [("public-16-128", 97_807_491), ("public-64-512", 155_334_339)])
def test_public_parameter_counts(preset, expected):
    with torch.device("meta"):
        model = build(preset)
    assert n_params(model) == expected


@pytest.mark.parametrize("preset", ["public-16-128", "public-64-512", "tiny", "small"])
def test_public_state_dict_keys_and_shapes_match_peer(preset):
    config = get_preset(preset).unet
    with torch.device("meta"):
        ours, peer = PublicUNet(config), peer_unet(config)
    ours_shapes, peer_shapes = shapes(ours), shapes(peer)
    assert sorted(ours_shapes) == sorted(peer_shapes), (
        f"only ours: {sorted(set(ours_shapes) - set(peer_shapes))[:5]}; "
        f"only peer: {sorted(set(peer_shapes) - set(ours_shapes))[:5]}")
    assert ours_shapes == peer_shapes


def test_public_config_from_json_matches_presets():
    assert UNetConfig.from_public_json(PUBLIC_16_128_JSON, 128) == get_preset("public-16-128").unet
    assert UNetConfig.from_public_json(PUBLIC_64_512_JSON, 512) == get_preset("public-64-512").unet
    assert UNetConfig.from_public_json({**PUBLIC_64_512_JSON, "norm_groups": None}, 512).norm_groups == 32
    # the public code ignores attention resolutions the network never reaches
    assert UNetConfig.from_public_json({**PUBLIC_16_128_JSON, "attn_res": [16, 256]}, 128).attn_res == (16,)
    with pytest.raises(ValueError, match="channel_multiplier"):
        UNetConfig.from_public_json({k: v for k, v in PUBLIC_16_128_JSON.items() if k != "channel_multiplier"}, 128)


# ---------------------------------------------------------------- public variant: outputs

@pytest.mark.parametrize("preset, batch", [("tiny", 3), ("small", 2)])
def test_public_unet_matches_peer(preset, batch):
    model, peer = loaded_pair(preset)
    config = model.config.unet
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(batch, config.in_channel, config.image_size, config.image_size, generator=generator)
    level = noise_levels(batch, generator)
    with torch.no_grad(), sr3fast.backend("reference"):
        ours = model.unet(x, level)
        expected = peer(x, level.view(batch, 1))
        exact = float64_twin(peer)(x.double(), level.double().view(batch, 1))
    assert_fp32_accurate(f"{preset} PublicUNet vs peer", ours, expected, exact)


def test_public_unet_dropout_sits_between_silu_and_conv():
    """In training mode with dropout, ours and the peer draw the same masks in the same order only
    if dropout is applied to the same tensors."""
    config = UNetConfig(inner_channel=16, channel_mults=(1, 2), attn_res=(8,), res_blocks=1, norm_groups=4,
                        image_size=16, dropout=0.5)
    torch.manual_seed(0)
    peer = peer_unet(config).train()
    ours = PublicUNet(config).train()
    ours.load_state_dict(peer.state_dict())
    generator = torch.Generator().manual_seed(2)
    x = torch.randn(2, 6, 16, 16, generator=generator)
    level = noise_levels(2, generator)
    with torch.no_grad(), sr3fast.backend("reference"):
        torch.manual_seed(3)
        expected = peer(x, level.view(2, 1))
        torch.manual_seed(3)
        got = ours(x, level)
        torch.manual_seed(3)
        exact = float64_twin(peer)(x.double(), level.double().view(2, 1))  # the same masks
    assert_fp32_accurate("dropout in training mode", got, expected, exact)


def test_noise_level_shapes_are_equivalent():
    model, _ = loaded_pair("tiny")
    x = torch.randn(2, 6, 16, 16)
    with torch.no_grad():
        by_vector = model.unet(x, torch.tensor([0.7, 0.7]))
        torch.testing.assert_close(model.unet(x, torch.tensor([[0.7], [0.7]])), by_vector, rtol=0, atol=0)
        torch.testing.assert_close(model.unet(x, torch.tensor(0.7)), by_vector, rtol=0, atol=0)
    with pytest.raises(ValueError, match="one level per sample"):
        model.unet(x, torch.tensor([0.1, 0.2, 0.3]))


def test_sr3_predict_noise_matches_peer_denoise_fn():
    """A public *_gen.pth state_dict, renamed denoise_fn. -> unet. and without the schedule
    buffers, loads strictly; predict_noise(x, y_t, g) = denoise_fn(cat[x, y_t], sqrt(g).view(B, 1))."""
    torch.manual_seed(0)
    model = build("tiny").eval()
    config = model.config
    diffusion = peer_sr3.GaussianDiffusion(peer_unet(config.unet), image_size=config.high_res,
                                           schedule_opt=config.schedule).eval()
    randomize_norms_(diffusion, torch.Generator().manual_seed(0))
    public = diffusion.state_dict()
    assert len([k for k in public if not k.startswith("denoise_fn.")]) == 12
    renamed = {"unet." + k[len("denoise_fn."):]: v for k, v in public.items() if k.startswith("denoise_fn.")}
    model.load_state_dict(renamed, strict=True)

    generator = torch.Generator().manual_seed(4)
    x, y_t = torch.randn(2, 2, 3, 16, 16, generator=generator).unbind(0)
    gamma = diffusion.alphas_cumprod[torch.tensor([10, 1500])]  # g near 1 and far from it
    with torch.no_grad(), sr3fast.backend("reference"):
        eps = model.predict_noise(x, y_t, gamma)
        expected = diffusion.denoise_fn(torch.cat([x, y_t], dim=1), gamma.sqrt().view(2, 1))
        exact = float64_twin(diffusion.denoise_fn)(torch.cat([x, y_t], dim=1).double(),
                                                   gamma.double().sqrt().view(2, 1))
    assert_fp32_accurate("predict_noise vs denoise_fn", eps, expected, exact)
    with torch.no_grad(), sr3fast.backend("reference"):
        torch.testing.assert_close(model(x, y_t, gamma), eps, rtol=0, atol=0)  # forward = predict_noise


# ---------------------------------------------------------------- both variants run on the fused ops

@pytest.mark.parametrize("preset", ["tiny", "tiny-paper"])
def test_forward_uses_fused_ops_only(preset, monkeypatch):
    """Every GroupNorm runs through ops.groupnorm_silu (never nn.GroupNorm.forward), the noise
    bias arrives as `shift`, attention gets q, k, v as views of one qkv tensor, and every
    convolution runs once through ops.conv2d."""
    model = build(preset).eval()
    norms = [m for m in model.modules() if isinstance(m, nn.GroupNorm)]
    attentions = [m for m in model.modules() if isinstance(m, SelfAttention)]
    gn_calls, attn_calls, module_calls, conv_calls = [], [], [], []
    real_gn, real_attn, real_conv = ops.groupnorm_silu, ops.attention, ops.conv2d

    def spy_gn(x, groups, weight, bias, eps, shift=None, act=True):
        gn_calls.append((shift is not None, act))
        return real_gn(x, groups, weight, bias, eps, shift=shift, act=act)

    def spy_attn(q, k, v, scale=None):
        attn_calls.append((q.untyped_storage().data_ptr() == k.untyped_storage().data_ptr()
                           == v.untyped_storage().data_ptr(), q.shape, scale))
        return real_attn(q, k, v, scale)

    def spy_conv(x, weight, *args):
        conv_calls.append(weight)
        return real_conv(x, weight, *args)

    monkeypatch.setattr(ops, "groupnorm_silu", spy_gn)
    monkeypatch.setattr(ops, "attention", spy_attn)
    monkeypatch.setattr(ops, "conv2d", spy_conv)
    for norm in norms:
        norm.register_forward_hook(lambda *args: module_calls.append(1))
    with torch.no_grad():
        model.predict_noise(torch.randn(1, 3, 16, 16), torch.randn(1, 3, 16, 16), torch.tensor([0.5]))

    assert not module_calls, "nn.GroupNorm.forward ran; norms must go through ops.groupnorm_silu"
    convs = [m.weight for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert len(conv_calls) == len(convs) and {id(w) for w in conv_calls} == {id(w) for w in convs}
    assert len(gn_calls) == len(norms)
    residual_blocks = sum(isinstance(m, nn.Linear) for m in model.modules()) - 2  # minus the noise MLP's
    assert sum(shifted for shifted, _ in gn_calls) == residual_blocks
    assert sum(not act for _, act in gn_calls) == len(attentions)
    assert len(attn_calls) == len(attentions)
    for same_storage, q_shape, scale in attn_calls:
        assert same_storage and q_shape[1] == 1
        assert scale == pytest.approx(1 / math.sqrt(q_shape[-1]))


def test_model_compiles_without_graph_breaks():
    """No data-dependent Python in the forward: torch.compile(fullgraph=True) traces it whole
    (dynamo only, backend='eager', to keep the test fast). Compiled, the CPU backend's convolutions
    are F.conv2d (inductor prepacks on its own), so the two differ in summation order only."""
    model = build("tiny-paper").eval()
    x, y_t, gamma = torch.randn(2, 3, 16, 16), torch.randn(2, 3, 16, 16), torch.tensor([0.3, 0.9])
    with torch.no_grad():
        expected = model.predict_noise(x, y_t, gamma)  # eager first: fills ops' dispatch table
        compiled = torch.compile(model.predict_noise, fullgraph=True, backend="eager")
        got = compiled(x, y_t, gamma)
        with sr3fast.backend("reference"):
            exact = float64_twin(model).predict_noise(x.double(), y_t.double(), gamma.double())
    assert_fp32_accurate("compiled vs eager", got, expected, exact)


@pytest.mark.parametrize("backend", fast_backend_params("groupnorm_silu"))
def test_tiny_model_on_fast_backend_matches_reference(backend):
    model, peer = loaded_pair("tiny")
    generator = torch.Generator().manual_seed(5)
    x = torch.randn(1, 6, 16, 16, generator=generator)
    level = noise_levels(1, generator)
    with torch.no_grad():
        with sr3fast.backend("reference"):
            expected = model.unet(x, level)
        with sr3fast.backend(backend):
            got = model.unet(x, level)
        exact = float64_twin(peer)(x.double(), level.double().view(1, 1))
    assert_fp32_accurate(f"tiny model on {backend}", got, expected, exact)


# ---------------------------------------------------------------- paper variant

def paper_parameter_count(c: UNetConfig) -> int:
    """Parameters of the paper U-Net counted from its description (paper_unet's docstring), not
    from its modules: BigGAN blocks (norm, conv, noise Linear, norm, conv, 1x1 skip when the width
    changes), one-head attention, DDPM's noise MLP to 4C and skip bookkeeping."""
    def conv(i, o, k):
        return i * o * k * k + o

    def linear(i, o):
        return i * o + o

    def res(i, o):
        return 2 * i + conv(i, o, 3) + linear(emb, o) + 2 * o + conv(o, o, 3) + (conv(i, o, 1) if i != o else 0)

    def attn(ch):
        return 2 * ch + 3 * ch * ch + conv(ch, ch, 1)

    inner, emb = c.inner_channel, 4 * c.inner_channel
    total = linear(inner, emb) + linear(emb, emb) + conv(c.in_channel, inner, 3)
    ch, skips, res_at = inner, [inner], c.resolutions()
    for level, mult in enumerate(c.channel_mults):
        for _ in range(c.res_blocks):
            total += res(ch, inner * mult) + (attn(inner * mult) if res_at[level] in c.attn_res else 0)
            ch = inner * mult
            skips.append(ch)
        if level < c.levels - 1:
            total += res(ch, ch)
            skips.append(ch)
    total += res(ch, ch) + attn(ch) + res(ch, ch)
    for level in reversed(range(c.levels)):
        for _ in range(c.res_blocks + 1):
            out = inner * c.channel_mults[level]
            total += res(ch + skips.pop(), out) + (attn(out) if res_at[level] in c.attn_res else 0)
            ch = out
        if level > 0:
            total += res(ch, ch)
    return total + 2 * ch + conv(ch, c.out_channel, 3)


@pytest.mark.parametrize("preset", ["tiny-paper", "paper-16-128", "paper-64-256", "paper-64-512", "paper-256-1024"])
def test_paper_parameter_count_and_description(preset):
    config = get_preset(preset)
    with torch.device("meta"):
        count = n_params(build(config))
    assert count == paper_parameter_count(config.unet)
    stated = re.search(r"([\d,]+) parameters", config.description)
    if preset != "tiny-paper":
        assert stated and int(stated.group(1).replace(",", "")) == count, config.description


@pytest.mark.parametrize("batch, height, width", [(1, 16, 16), (3, 16, 32), (5, 32, 16)])
def test_paper_unet_shapes_and_samples_are_independent(batch, height, width):
    """Any batch size, non-square sizes divisible by size_multiple; each sample's output depends
    on that sample only (no mixing across the batch in norms or attention)."""
    torch.manual_seed(0)
    unet = build("tiny-paper").unet.eval()
    randomize_norms_(unet, torch.Generator().manual_seed(0))
    generator = torch.Generator().manual_seed(6)
    x = torch.randn(batch, 6, height, width, generator=generator)
    level = noise_levels(batch, generator)
    with torch.no_grad():
        out = unet(x, level)
        one_by_one = torch.cat([unet(x[i:i + 1], level[i:i + 1]) for i in range(batch)])
        with sr3fast.backend("reference"):
            exact = float64_twin(unet)(x.double(), level.double())
    assert out.shape == (batch, 3, height, width)
    assert_fp32_accurate("batched vs one by one", out, one_by_one, exact)


@pytest.mark.parametrize("dim, dim_out, resample", [(8, 8, None), (8, 16, None), (8, 8, "down"), (8, 8, "up")])
def test_paper_residual_blocks_rescale_skip_by_inverse_sqrt2(dim, dim_out, resample):
    """With the residual branch's last conv zeroed, a BigGAN block returns skip(resample(x))/sqrt(2)."""
    torch.manual_seed(0)
    block = BigGANResBlock(dim, dim_out, noise_embed_dim=12, norm_groups=4, resample=resample)
    nn.init.zeros_(block.conv2.weight)
    nn.init.zeros_(block.conv2.bias)
    x = torch.randn(2, dim, 8, 8)
    with torch.no_grad():
        out = block(x, torch.randn(2, 12))
        if resample == "down":
            x = nn.functional.avg_pool2d(x, 2)
        elif resample == "up":
            x = x.repeat_interleave(2, dim=2).repeat_interleave(2, dim=3)
        expected = block.skip(x) / math.sqrt(2)
    torch.testing.assert_close(out, expected, rtol=0, atol=fp32_atol(dim))


def test_paper_attention_rescales_skip_by_inverse_sqrt2():
    unet = build("tiny-paper").unet
    attention = unet.mid[0].attn
    nn.init.zeros_(attention.out.weight)
    nn.init.zeros_(attention.out.bias)
    x = torch.randn(2, attention.norm.num_channels, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(attention(x), x / math.sqrt(2), rtol=0, atol=fp32_atol(1))


# ---------------------------------------------------------------- configs and presets

def test_norm_groups_must_divide_every_channel_count():
    with pytest.raises(ValueError, match=r"inner_channel = 48 is not divisible.*use norm_groups=24"):
        UNetConfig(inner_channel=48, channel_mults=(1, 2), attn_res=(), image_size=32, norm_groups=32)
    with pytest.raises(ValueError, match=r"inner_channel = 16 .*use norm_groups=16"):
        UNetConfig(inner_channel=16, norm_groups=32)  # the paper's 256->1024 width with the usual 32


@pytest.mark.parametrize("changes, message", [
    ({"variant": "ddpm"}, "unknown U-Net variant 'ddpm'"),
    ({"attn_res": (12,)}, r"attn_res \[12\] are not feature resolutions"),
    ({"image_size": 100}, "image_size=100 must be divisible by 16"),
    ({"inner_channel": 33, "norm_groups": 1}, "inner_channel must be even"),
    ({"dropout": 1.0}, "dropout must be in"),
    ({"channel_mults": ()}, "channel_mults must be one or more"),
])
def test_invalid_unet_configs_say_what_to_change(changes, message):
    with pytest.raises(ValueError, match=message):
        UNetConfig(**changes)


def test_sr3_config_checks_resolutions():
    unet = get_preset("tiny").unet
    with pytest.raises(ValueError, match="must equal high_res"):
        SR3Config(unet, {}, low_res=4, high_res=32)
    with pytest.raises(ValueError, match="multiple of low_res"):
        SR3Config(unet, {}, low_res=5, high_res=16)


def test_configs_round_trip_through_json():
    for name, config in presets().items():
        data = json.loads(json.dumps(config.to_dict()))
        assert SR3Config.from_dict(data) == config, name
    with pytest.raises(ValueError, match="unknown keys"):
        UNetConfig.from_dict({"inner_chanel": 64})


def test_presets_are_listed_and_fresh():
    names = {"public-16-128", "public-64-512", "paper-16-128", "paper-64-256", "paper-64-512",
             "paper-256-1024", "tiny", "tiny-paper", "small"}
    table = presets()
    assert names <= set(table)
    table.clear()
    assert names <= set(presets())
    assert sr3fast.presets is presets
    with pytest.raises(ValueError, match="unknown SR3 preset 'nope'.*tiny"):
        get_preset("nope")


@pytest.mark.parametrize("preset", ["tiny", "tiny-paper", "small"])
def test_small_presets_run(preset):
    model = build(get_preset(preset).to_dict())
    size = model.config.high_res
    with torch.no_grad():
        eps = model.predict_noise(torch.rand(1, 3, size, size) * 2 - 1, torch.randn(1, 3, size, size),
                                  torch.tensor([0.3]))
    assert eps.shape == (1, 3, size, size) and torch.isfinite(eps).all()


def test_bad_inputs_are_rejected_with_advice():
    model = build("tiny")
    assert model.size_multiple == 2
    with pytest.raises(ValueError, match="divisible by 2.*pad or resize"):
        model.predict_noise(torch.zeros(1, 3, 15, 16), torch.zeros(1, 3, 15, 16), torch.tensor([0.5]))
    with pytest.raises(ValueError, match="same shape"):
        model.predict_noise(torch.zeros(1, 3, 16, 16), torch.zeros(1, 3, 8, 8), torch.tensor([0.5]))
    with pytest.raises(ValueError, match=r"\(B, 6, H, W\)"):
        model.unet(torch.zeros(1, 3, 16, 16), torch.tensor([0.5]))
    with pytest.raises(ValueError, match="'paper' variant"):
        PaperUNet(get_preset("tiny").unet)
    with pytest.raises(TypeError, match="preset name"):
        build(42)
