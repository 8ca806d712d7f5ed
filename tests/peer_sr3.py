"""A stand-in for the public SR3 PyTorch code, for tests: plain torch.nn, no sr3fast imports.

Written from the documented structure of Janspiry/Image-Super-Resolution-via-Iterative-Refinement
(`model/sr3_modules/unet.py`, `diffusion.py`): the same class names, submodule names, parameter
shapes and arithmetic, so its state_dict looks like a public `*_gen.pth` (keys `denoise_fn.*` plus
the 12 schedule buffers) and its outputs are what the public code computes. Tests use it as an
independent oracle for sr3fast's model, checkpoint loading and `accelerate()`.

    net = GaussianDiffusion(UNet(inner_channel=16, channel_mults=(1, 2), attn_res=(8,), res_blocks=1,
                                 norm_groups=4, image_size=16),
                            schedule_opt={"schedule": "linear", "n_timestep": 2000,
                                          "linear_start": 1e-6, "linear_end": 1e-2})
    eps = net.denoise_fn(torch.cat([x, y_t], 1), sqrt_gamma.view(B, 1))
"""
from __future__ import annotations

import math

import torch
from torch import nn


class PositionalEncoding(nn.Module):
    """level (..., 1) or (B,) -> [sin(level·w_i), cos(level·w_i)], w_i = 1e4^(-i/n), n = dim // 2."""

    def __init__(self, dim):
        super().__init__()
        self.dim = dim

    def forward(self, noise_level):
        n = self.dim // 2
        freqs = torch.exp(-math.log(1e4) * (torch.arange(n, dtype=noise_level.dtype,
                                                          device=noise_level.device) / n))
        angles = noise_level.unsqueeze(1) * freqs.unsqueeze(0)
        return torch.cat([angles.sin(), angles.cos()], dim=-1)


class FeatureWiseAffine(nn.Module):
    """x + Linear(t) broadcast over space (the additive form; use_affine_level=False)."""

    def __init__(self, in_channels, out_channels):
        super().__init__()
        self.noise_func = nn.Sequential(nn.Linear(in_channels, out_channels))

    def forward(self, x, noise_embed):
        return x + self.noise_func(noise_embed).view(x.shape[0], -1, 1, 1)


class Swish(nn.Module):
    def forward(self, x):
        return x * torch.sigmoid(x)


class Upsample(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.up = nn.Upsample(scale_factor=2, mode="nearest")
        self.conv = nn.Conv2d(dim, dim, 3, padding=1)

    def forward(self, x):
        return self.conv(self.up(x))


class Downsample(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.conv = nn.Conv2d(dim, dim, 3, stride=2, padding=1)

    def forward(self, x):
        return self.conv(x)


class Block(nn.Module):
    """GroupNorm -> Swish -> Dropout (Identity when 0) -> 3x3 conv."""

    def __init__(self, dim, dim_out, groups=32, dropout=0):
        super().__init__()
        self.block = nn.Sequential(nn.GroupNorm(groups, dim), Swish(),
                                   nn.Dropout(dropout) if dropout != 0 else nn.Identity(),
                                   nn.Conv2d(dim, dim_out, 3, padding=1))

    def forward(self, x):
        return self.block(x)


class ResnetBlock(nn.Module):
    def __init__(self, dim, dim_out, noise_level_emb_dim=None, dropout=0, norm_groups=32):
        super().__init__()
        self.noise_func = FeatureWiseAffine(noise_level_emb_dim, dim_out)
        self.block1 = Block(dim, dim_out, groups=norm_groups)
        self.block2 = Block(dim_out, dim_out, groups=norm_groups, dropout=dropout)
        self.res_conv = nn.Conv2d(dim, dim_out, 1) if dim != dim_out else nn.Identity()

    def forward(self, x, time_emb):
        h = self.noise_func(self.block1(x), time_emb)
        return self.block2(h) + self.res_conv(x)


class SelfAttention(nn.Module):
    """One head over all positions, einsum form: softmax_over_(y,x)(q·k / sqrt(C)) then · v."""

    def __init__(self, in_channel, n_head=1, norm_groups=32):
        super().__init__()
        self.n_head = n_head
        self.norm = nn.GroupNorm(norm_groups, in_channel)
        self.qkv = nn.Conv2d(in_channel, in_channel * 3, 1, bias=False)
        self.out = nn.Conv2d(in_channel, in_channel, 1)

    def forward(self, input):
        b, c, h, w = input.shape
        qkv = self.qkv(self.norm(input)).view(b, self.n_head, 3 * c // self.n_head, h, w)
        query, key, value = qkv.chunk(3, dim=2)
        scores = torch.einsum("bnchw,bncyx->bnhwyx", query, key) / math.sqrt(c)
        weights = scores.reshape(b, self.n_head, h, w, h * w).softmax(-1).view(b, self.n_head, h, w, h, w)
        attended = torch.einsum("bnhwyx,bncyx->bnchw", weights, value)
        return self.out(attended.reshape(b, c, h, w)) + input


class ResnetBlocWithAttn(nn.Module):
    def __init__(self, dim, dim_out, *, noise_level_emb_dim=None, norm_groups=32, dropout=0, with_attn=False):
        super().__init__()
        self.with_attn = with_attn
        self.res_block = ResnetBlock(dim, dim_out, noise_level_emb_dim, norm_groups=norm_groups, dropout=dropout)
        if with_attn:
            self.attn = SelfAttention(dim_out, norm_groups=norm_groups)

    def forward(self, x, time_emb):
        x = self.res_block(x, time_emb)
        return self.attn(x) if self.with_attn else x


class UNet(nn.Module):
    def __init__(self, in_channel=6, out_channel=3, inner_channel=32, norm_groups=32,
                 channel_mults=(1, 2, 4, 8, 8), attn_res=(8,), res_blocks=3, dropout=0, image_size=128):
        super().__init__()
        self.noise_level_mlp = nn.Sequential(PositionalEncoding(inner_channel),
                                             nn.Linear(inner_channel, inner_channel * 4), Swish(),
                                             nn.Linear(inner_channel * 4, inner_channel))

        def resblock(dim, dim_out, with_attn):
            return ResnetBlocWithAttn(dim, dim_out, noise_level_emb_dim=inner_channel, norm_groups=norm_groups,
                                      dropout=dropout, with_attn=with_attn)

        pre = inner_channel
        feats = [pre]
        res = image_size
        downs = [nn.Conv2d(in_channel, inner_channel, kernel_size=3, padding=1)]
        for ind, mult in enumerate(channel_mults):
            for _ in range(res_blocks):
                downs.append(resblock(pre, inner_channel * mult, res in attn_res))
                pre = inner_channel * mult
                feats.append(pre)
            if ind != len(channel_mults) - 1:
                downs.append(Downsample(pre))
                feats.append(pre)
                res //= 2
        self.downs = nn.ModuleList(downs)
        self.mid = nn.ModuleList([resblock(pre, pre, True), resblock(pre, pre, False)])
        ups = []
        for ind in reversed(range(len(channel_mults))):
            for _ in range(res_blocks + 1):
                ups.append(resblock(pre + feats.pop(), inner_channel * channel_mults[ind], res in attn_res))
                pre = inner_channel * channel_mults[ind]
            if ind > 0:
                ups.append(Upsample(pre))
                res *= 2
        self.ups = nn.ModuleList(ups)
        self.final_conv = Block(pre, out_channel, groups=norm_groups)

    def forward(self, x, time):
        t = self.noise_level_mlp(time)
        feats = []
        for layer in self.downs:
            x = layer(x, t) if isinstance(layer, ResnetBlocWithAttn) else layer(x)
            feats.append(x)
        for layer in self.mid:
            x = layer(x, t)
        for layer in self.ups:
            if isinstance(layer, ResnetBlocWithAttn):
                x = layer(torch.cat((x, feats.pop()), dim=1), t)
            else:
                x = layer(x)
        return self.final_conv(x)


def make_beta_schedule(schedule, n_timestep, linear_start=1e-4, linear_end=2e-2):
    """float64 betas: 'linear' (evenly spaced), 'quad' (evenly spaced square roots) or 'const'."""
    if schedule == "linear":
        return torch.linspace(linear_start, linear_end, n_timestep, dtype=torch.float64)
    if schedule == "quad":
        return torch.linspace(linear_start ** 0.5, linear_end ** 0.5, n_timestep, dtype=torch.float64) ** 2
    if schedule == "const":
        return torch.full((n_timestep,), linear_end, dtype=torch.float64)
    raise NotImplementedError(f"peer_sr3 implements linear, quad and const schedules, not {schedule!r}")


class GaussianDiffusion(nn.Module):
    """Holds `denoise_fn` and the schedule buffers, as the public wrapper whose state_dict is saved
    as `*_gen.pth`. Tables are computed in float64 and stored as float32."""

    def __init__(self, denoise_fn, image_size=128, channels=3, conditional=True, schedule_opt=None):
        super().__init__()
        self.denoise_fn = denoise_fn
        self.image_size = image_size
        self.channels = channels
        self.conditional = conditional
        if schedule_opt is not None:
            self.set_new_noise_schedule(schedule_opt)

    def set_new_noise_schedule(self, schedule_opt, device="cpu"):
        betas = make_beta_schedule(schedule_opt["schedule"], schedule_opt["n_timestep"],
                                   schedule_opt["linear_start"], schedule_opt["linear_end"])
        alphas = 1.0 - betas
        gammas = torch.cumprod(alphas, dim=0)
        gammas_prev = torch.cat([torch.ones(1, dtype=torch.float64), gammas[:-1]])
        # noise level fed to denoise_fn at step t: sqrt(g_t) = this[t + 1] (a plain attribute there too)
        self.sqrt_alphas_cumprod_prev = torch.cat([torch.ones(1, dtype=torch.float64), gammas]).sqrt()
        self.num_timesteps = len(betas)
        posterior_variance = betas * (1.0 - gammas_prev) / (1.0 - gammas)
        tables = {
            "betas": betas,
            "alphas_cumprod": gammas,
            "alphas_cumprod_prev": gammas_prev,
            "sqrt_alphas_cumprod": gammas.sqrt(),
            "sqrt_one_minus_alphas_cumprod": (1.0 - gammas).sqrt(),
            "log_one_minus_alphas_cumprod": (1.0 - gammas).log(),
            "sqrt_recip_alphas_cumprod": (1.0 / gammas).sqrt(),
            "sqrt_recipm1_alphas_cumprod": (1.0 / gammas - 1.0).sqrt(),
            "posterior_variance": posterior_variance,
            "posterior_log_variance_clipped": posterior_variance.clamp(min=1e-20).log(),
            "posterior_mean_coef1": betas * gammas_prev.sqrt() / (1.0 - gammas),
            "posterior_mean_coef2": (1.0 - gammas_prev) * alphas.sqrt() / (1.0 - gammas),
        }
        for name, table in tables.items():
            self.register_buffer(name, table.to(device=device, dtype=torch.float32))

    @torch.no_grad()
    def p_sample(self, y_t, t, condition_x, noise=None, clip_denoised=True):
        """One public-style ancestral step at integer step t (0-based): x0 from eps, optional clip to
        [-1, 1], posterior mean, plus exp(0.5·log posterior variance)·noise (no noise at t = 0)."""
        batch = y_t.shape[0]
        level = torch.full((batch, 1), float(self.sqrt_alphas_cumprod_prev[t + 1]), device=y_t.device)
        eps = self.denoise_fn(torch.cat([condition_x, y_t], dim=1), level)
        x0 = self.sqrt_recip_alphas_cumprod[t] * y_t - self.sqrt_recipm1_alphas_cumprod[t] * eps
        if clip_denoised:
            x0 = x0.clamp(-1.0, 1.0)
        mean = self.posterior_mean_coef1[t] * x0 + self.posterior_mean_coef2[t] * y_t
        if t == 0:
            return mean
        if noise is None:
            noise = torch.randn_like(y_t)
        return mean + noise * (0.5 * self.posterior_log_variance_clipped[t]).exp()
