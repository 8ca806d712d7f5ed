"""Argument checks shared by the loss and the samplers, with messages that say what to do."""
from __future__ import annotations

import torch

from .schedules import NoiseSchedule


def check_schedule(schedule, what: str) -> None:
    if not isinstance(schedule, NoiseSchedule):
        raise TypeError(f"{what} expects a NoiseSchedule, got {type(schedule).__name__}; build one "
                        "with NoiseSchedule.from_config(model.config.schedule)")


def check_generator(generator: torch.Generator | None, device: torch.device, what: str) -> None:
    if generator is not None and generator.device.type != device.type:
        raise ValueError(f"{what}: the generator is on {generator.device} but the data on {device}; "
                         f"create it there: torch.Generator(device='{device}').manual_seed(seed)")
