"""Validation on held-out images: a few-step sample, the paper's metrics, and a picture grid."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image

from ..images import save_image_atomic
from . import regression
from .data import quantize, resize, to_condition
from .metrics import consistency, psnr, ssim

GRID_GAP = 2  # white pixels between the pictures of the grid


@dataclass(frozen=True)
class ValidationSet:
    """Fixed low-resolution inputs (N, 3, r, r) and their targets (N, 3, R, R), in [0, 1]."""
    low: torch.Tensor
    high: torch.Tensor

    @classmethod
    def from_dataset(cls, dataset, count: int) -> "ValidationSet":
        pairs = [dataset.validation_pair(i) for i in range(min(count, len(dataset)))]
        return cls(torch.stack([low for low, _ in pairs]), torch.stack([high for _, high in pairs]))


@torch.no_grad()
def super_resolve(model, low: torch.Tensor, mode: str, steps: int, seed: int) -> torch.Tensor:
    """The model's output for `low` (N, 3, r, r) in [0, 1], rounded to 8 bits as a saved image."""
    if mode == "regression":
        device = next(model.parameters()).device
        condition = to_condition(low.to(device), model.config.high_res)
        output = (regression.predict(model, condition).float().clamp(-1, 1) + 1) / 2
        return quantize(output.cpu())
    from ..api import upscale

    return quantize(upscale(low, model=model, steps=steps, seed=seed, progress=False).cpu())


def evaluate(model, data: ValidationSet, mode: str, steps: int, seed: int) -> tuple[dict, torch.Tensor]:
    """(metrics, output). Metrics: mean PSNR (dB), SSIM and consistency of the model's output,
    and PSNR and SSIM of plain bicubic upsampling for reference."""
    output = super_resolve(model, data.low, mode, steps, seed)
    bicubic = quantize(resize(data.low, data.high.shape[-2:]))
    metrics = {
        "psnr": psnr(output, data.high).mean().item(),
        "ssim": ssim(output, data.high).mean().item(),
        "consistency": consistency(output, data.low).mean().item(),
        "bicubic_psnr": psnr(bicubic, data.high).mean().item(),
        "bicubic_ssim": ssim(bicubic, data.high).mean().item(),
    }
    return metrics, output


def save_grid(data: ValidationSet, output: torch.Tensor, path: str | Path) -> Path:
    """One row per image: input (pixels enlarged) | bicubic | model output | target."""
    size = data.high.shape[-2:]
    columns = (F.interpolate(data.low, size=size, mode="nearest"),
               quantize(resize(data.low, size)), output, data.high)
    rows = []
    for row in zip(*columns):
        padded = [F.pad(picture, (0, GRID_GAP, 0, GRID_GAP), value=1.0) for picture in row]
        rows.append(torch.cat(padded, dim=-1))
    grid = (torch.cat(rows, dim=-2) * 255).round().clamp(0, 255).to(torch.uint8)
    return save_image_atomic(Image.fromarray(grid.permute(1, 2, 0).numpy()), path)
