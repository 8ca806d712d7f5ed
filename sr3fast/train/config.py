"""`TrainConfig`: every option of a training run, checked at construction, saved with it."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

MODES = ("diffusion", "regression")
LOSSES = ("l1", "l2")
# The paper's learning rates: 1e-4 for SR3, 1e-5 for the regression baseline.
DEFAULT_LR = {"diffusion": 1e-4, "regression": 1e-5}

# Options that change what is computed: a resumed run must use the values it was started with.
RESUME_MUST_MATCH = ("preset", "mode", "loss", "batch", "accum", "lr", "warmup", "grad_clip",
                     "ema_decay", "seed", "bf16", "flip", "blur", "blur_sigma", "dropout")


@dataclass(frozen=True)
class TrainConfig:
    """A training run. `batch` is the global batch: images per optimizer step over all
    processes (each of W processes takes batch / W, in `accum` micro-batches)."""
    data: str
    out: str
    preset: str
    steps: int = 100_000
    batch: int = 16
    accum: int = 1
    lr: float | None = None          # None: DEFAULT_LR[mode]
    warmup: int = 10_000             # linear warm-up steps, then constant (paper: 10k)
    grad_clip: float = 1.0           # max global gradient norm; 0 disables clipping
    ema_decay: float = 0.9999
    loss: str = "l1"                 # the paper found L1 slightly better than L2
    mode: str = "diffusion"          # or "regression": the paper's baseline, y0 from x by MSE
    seed: int = 0
    bf16: bool = False
    compile: bool = False
    compile_backend: str = "inductor"
    flip: bool = True
    blur: float = 0.0                # probability of blurring the low-resolution input
    blur_sigma: tuple[float, float] = (0.4, 0.6)
    dropout: float | None = None     # None: the preset's
    val: str | None = None           # folder of validation images; None: hold out from data
    holdout: int | None = None       # None: min(val_images, 10% of the images), at least 1
    val_images: int = 4
    val_steps: int = 50
    val_every: int = 1000            # 0: never
    save_every: int = 1000
    keep: int = 3                    # checkpoints kept
    log_every: int = 10
    workers: int = 2
    device: str | None = None        # None: cuda:LOCAL_RANK when CUDA is available, else cpu
    resume: bool = False
    progress: bool = True

    def __post_init__(self):
        object.__setattr__(self, "blur_sigma", tuple(float(s) for s in self.blur_sigma))
        positive = ("steps", "batch", "accum", "val_images", "val_steps", "save_every", "keep",
                    "log_every")
        for name in positive:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        for name in ("warmup", "val_every", "workers"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.holdout is not None and self.holdout < 0:
            raise ValueError(f"holdout must be >= 0, got {self.holdout}")
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        if self.loss not in LOSSES:
            raise ValueError(f"loss must be one of {LOSSES}, got {self.loss!r}")
        if self.lr is not None and not self.lr > 0:
            raise ValueError(f"lr must be positive, got {self.lr}")
        if not 0 <= self.ema_decay < 1:
            raise ValueError(f"ema_decay must be in [0, 1), got {self.ema_decay}")
        if self.grad_clip < 0:
            raise ValueError(f"grad_clip must be >= 0 (0 disables clipping), got {self.grad_clip}")
        if self.dropout is not None and not 0 <= self.dropout < 1:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")

    @property
    def learning_rate(self) -> float:
        return DEFAULT_LR[self.mode] if self.lr is None else self.lr

    def to_dict(self) -> dict:
        data = dataclasses.asdict(self)
        data["blur_sigma"] = list(self.blur_sigma)
        return data

    @classmethod
    def from_dict(cls, data: dict) -> "TrainConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})

    def resume_mismatches(self, saved: "TrainConfig") -> list[str]:
        """'name: saved -> now' for each option that must not change on resume."""
        def value(config: "TrainConfig", name: str):
            return config.learning_rate if name == "lr" else getattr(config, name)  # None = default
        return [f"{name}: {value(saved, name)!r} -> {value(self, name)!r}"
                for name in RESUME_MUST_MATCH if value(saved, name) != value(self, name)]
