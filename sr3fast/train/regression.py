"""The paper's regression baseline: the same U-Net trained to output y0 directly from x (MSE).

It takes the SR3 network unchanged, so a checkpoint has the same layout: the noisy-image input
is left empty (zeros) and the noise level is g = 1. Its output is the prediction itself; no
sampler is involved (sr3fast.upscale would treat it as a noise predictor: use `predict`).
"""
from __future__ import annotations

import torch


def predict(model, x: torch.Tensor) -> torch.Tensor:
    """y0 estimate in [-1, 1] (unclamped) from the upsampled condition x (B, 3, H, W)."""
    gamma = torch.ones(x.shape[0], device=x.device, dtype=torch.float32)
    return model.predict_noise(x, torch.zeros_like(x), gamma)


def regression_loss(model, x: torch.Tensor, y0: torch.Tensor) -> torch.Tensor:
    """Mean squared error of the prediction, a scalar."""
    return (predict(model, x).float() - y0.float()).square().mean()
