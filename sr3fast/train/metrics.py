"""The paper's image metrics: PSNR, SSIM and consistency, batched in torch.

All take (B, C, H, W) images in [0, data_range] and return one value per image, (B,) float64;
the statistics are computed in float64 so the values match scikit-image's to rounding.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

SSIM_WINDOW = 11      # Wang et al. (2004): 11x11 Gaussian window, sigma 1.5
SSIM_SIGMA = 1.5
SSIM_K1, SSIM_K2 = 0.01, 0.03


def _check_pair(a: torch.Tensor, b: torch.Tensor, what: str) -> None:
    if a.shape != b.shape or a.dim() != 4:
        raise ValueError(f"{what}: expected two image batches (B, C, H, W) of the same shape, "
                         f"got {tuple(a.shape)} and {tuple(b.shape)}")


def psnr(a: torch.Tensor, b: torch.Tensor, data_range: float = 1.0) -> torch.Tensor:
    """Peak signal-to-noise ratio in dB per image: 10 log10(data_range² / MSE).
    Identical images give inf."""
    _check_pair(a, b, "psnr")
    mse = (a.double() - b.double()).square().flatten(1).mean(1)
    return 10 * torch.log10(data_range ** 2 / mse)


def _gaussian_window(size: int, sigma: float, channels: int, device) -> torch.Tensor:
    taps = torch.arange(size, dtype=torch.float64, device=device) - (size - 1) / 2
    line = torch.exp(-taps.square() / (2 * sigma ** 2))
    line = line / line.sum()
    return (line[:, None] * line[None, :]).expand(channels, 1, size, size).contiguous()


def ssim(a: torch.Tensor, b: torch.Tensor, data_range: float = 1.0, window: int = SSIM_WINDOW,
         sigma: float = SSIM_SIGMA) -> torch.Tensor:
    """Structural similarity per image (Wang et al. 2004), the mean over channels and over every
    pixel whose full window lies inside the image (scikit-image's structural_similarity with
    gaussian_weights=True, sigma=1.5, use_sample_covariance=False gives the same numbers)."""
    _check_pair(a, b, "ssim")
    if min(a.shape[-2:]) < window:
        raise ValueError(f"ssim: images of {a.shape[-2]}x{a.shape[-1]} are smaller than the "
                         f"{window}x{window} window; compare larger crops")
    channels = a.shape[1]
    kernel = _gaussian_window(window, sigma, channels, a.device)

    def local_mean(image: torch.Tensor) -> torch.Tensor:
        return F.conv2d(image, kernel, groups=channels)  # 'valid': windows inside the image

    a, b = a.double(), b.double()
    mean_a, mean_b = local_mean(a), local_mean(b)
    var_a = local_mean(a * a) - mean_a.square()
    var_b = local_mean(b * b) - mean_b.square()
    cov = local_mean(a * b) - mean_a * mean_b
    c1, c2 = (SSIM_K1 * data_range) ** 2, (SSIM_K2 * data_range) ** 2
    index = ((2 * mean_a * mean_b + c1) * (2 * cov + c2)
             / ((mean_a.square() + mean_b.square() + c1) * (var_a + var_b + c2)))
    return index.flatten(1).mean(1)


def consistency(output: torch.Tensor, low_res: torch.Tensor) -> torch.Tensor:
    """The paper's consistency: MSE between the output downsampled to the input's size (bicubic
    with antialiasing, as the inputs were made) and the low-resolution input, per image. The
    paper reports it x 1e-5; in [0, 1] units here."""
    if output.dim() != 4 or low_res.dim() != 4 or output.shape[:2] != low_res.shape[:2]:
        raise ValueError(f"consistency: expected image batches (B, C, H, W) with the same B and C, "
                         f"got {tuple(output.shape)} and {tuple(low_res.shape)}")
    from .data import resize

    down = resize(output.double(), low_res.shape[-2:])
    return (down - low_res.double()).square().flatten(1).mean(1)
