"""SR3: the denoiser f(x, y_t, g) — a U-Net on the condition and the noisy image, told the noise level."""
from __future__ import annotations

import torch
from torch import nn

from .config import SR3Config
from .paper_unet import PaperUNet
from .public_unet import PublicUNet

UNETS = {"public": PublicUNet, "paper": PaperUNet}


class SR3(nn.Module):
    """f(x, y_t, g) = unet(cat[x, y_t], sqrt(g)) ≈ eps, where y_t = sqrt(g) y_0 + sqrt(1 - g) eps.

    Saharia et al. 2021, Algorithms 1 and 2: x is the low-resolution image upsampled to the output
    size, in [-1, 1]; the network is conditioned on the noise level g itself (through sqrt(g)),
    not on a step index, so any inference schedule can drive it. Parameters are `unet.*`; a
    public `*_gen.pth` maps onto them by renaming `denoise_fn.` to `unet.`.
    """

    # what the weights were trained for: "diffusion" (eps prediction, sampled by upscale) or
    # "regression" (the paper's one-pass baseline; sr3fast.train.regression.predict)
    objective: str = "diffusion"
    # how the weights are best sampled (sr3fast.inference_settings.InferenceSettings), when the
    # checkpoint records it; sr3fast.upscale's defaults for this model
    inference_settings = None

    def __init__(self, config: SR3Config):
        super().__init__()
        if not isinstance(config, SR3Config):
            raise TypeError(f"SR3 takes an SR3Config, got {type(config).__name__}; "
                            "use sr3fast.model.build(name_or_config) for a preset name or dict")
        self.config = config
        self.unet = UNETS[config.unet.variant](config.unet)

    @property
    def size_multiple(self) -> int:
        """H and W of the input must be divisible by this (2 ** number of downsamplings)."""
        return self.config.unet.size_multiple

    def predict_noise(self, x: torch.Tensor, y_t: torch.Tensor, gamma: torch.Tensor) -> torch.Tensor:
        """eps = f(x, y_t, g). x: (B, 3, H, W) upsampled condition; y_t: (B, 3, H, W);
        gamma: (B,) noise levels g in (0, 1] (a scalar or (B, 1) also works). Returns (B, 3, H, W)."""
        if x.shape != y_t.shape:
            raise ValueError(f"predict_noise: condition x {tuple(x.shape)} and y_t {tuple(y_t.shape)} must have "
                             "the same shape (upsample the low-resolution input to the output size first)")
        if not torch.is_tensor(gamma):
            gamma = torch.tensor(gamma, dtype=torch.float32, device=y_t.device)
        eps = self.unet(torch.cat([x, y_t], dim=1), gamma.sqrt())
        # Backends may run the U-Net channels-last inside; eps comes back in y_t's layout.
        return eps.contiguous() if y_t.is_contiguous() else eps

    forward = predict_noise

    def extra_repr(self) -> str:
        return f"{self.config.low_res}->{self.config.high_res}, variant={self.config.unet.variant!r}"
