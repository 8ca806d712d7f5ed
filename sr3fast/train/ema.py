"""Exponential moving average of the model weights: what sampling should use."""
from __future__ import annotations

import copy

import torch
from torch import nn


class EMA:
    """An fp32 copy of `model` whose parameters track the trained ones:

        ema <- d * ema + (1 - d) * weights,   d = min(decay, (1 + n) / (10 + n))

    after the n-th update. The ramp lets the average follow the fast early changes instead of
    staying near the random initialisation for ~1/(1 - decay) steps. Buffers are copied.
    """

    def __init__(self, model: nn.Module, decay: float):
        self.model = copy.deepcopy(model).eval().requires_grad_(False)
        self.decay = decay
        self.updates = 0

    def current_decay(self) -> float:
        return min(self.decay, (1 + self.updates) / (10 + self.updates))

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        self.updates += 1
        weight = 1 - self.current_decay()
        averaged = list(self.model.parameters())
        torch._foreach_lerp_(averaged, [p.detach() for p in model.parameters()], weight)
        for mine, theirs in zip(self.model.buffers(), model.buffers()):
            mine.copy_(theirs)

    def state_dict(self) -> dict:
        """The counters; the averaged weights are saved as a model checkpoint."""
        return {"decay": self.decay, "updates": self.updates}

    def load_state_dict(self, state: dict) -> None:
        self.decay, self.updates = float(state["decay"]), int(state["updates"])
