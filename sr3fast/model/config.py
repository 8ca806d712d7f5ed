"""Configurations of the SR3 denoiser: the U-Net's shape (`UNetConfig`) and the whole model (`SR3Config`).

Both are frozen dataclasses of plain values that round-trip through JSON (`to_dict`/`from_dict`),
so a checkpoint can carry its own architecture. Invalid values are rejected at construction with
a message that says what to change.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

VARIANTS = ("public", "paper")


def _as_int_tuple(name: str, value) -> tuple[int, ...]:
    if isinstance(value, int) and not isinstance(value, bool):
        return (value,)  # the public code's default attn_res=(8) is the int 8
    try:
        items = tuple(value)
    except TypeError:
        raise ValueError(f"{name} must be a sequence of integers, got {value!r}") from None
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in items):
        raise ValueError(f"{name} must be a sequence of integers, got {value!r}")
    return items


def _check_keys(cls, data: dict) -> None:
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(f"{cls.__name__}: unknown keys {unknown}; expected some of {sorted(known)}")


@dataclass(frozen=True)
class UNetConfig:
    """Shape of the SR3 U-Net.

    variant: "public" reproduces the module structure (and state_dict keys) of the widely used
    public SR3 PyTorch code; "paper" is the paper's DDPM-like U-Net with BigGAN residual blocks.
    Level i has inner_channel * channel_mults[i] channels at resolution image_size / 2**i;
    attn_res lists the resolutions (of a square image_size input) whose blocks get self-attention.
    """
    variant: str = "public"
    in_channel: int = 6            # condition x (3) + y_t (3)
    out_channel: int = 3
    inner_channel: int = 64
    channel_mults: tuple[int, ...] = (1, 2, 4, 8, 8)
    attn_res: tuple[int, ...] = (16,)
    res_blocks: int = 2
    dropout: float = 0.0
    norm_groups: int = 32
    image_size: int = 128

    def __post_init__(self):
        # accept lists (from JSON) but store tuples, so configs stay hashable and comparable
        object.__setattr__(self, "channel_mults", _as_int_tuple("channel_mults", self.channel_mults))
        object.__setattr__(self, "attn_res", _as_int_tuple("attn_res", self.attn_res))
        self.validate()

    @property
    def levels(self) -> int:
        return len(self.channel_mults)

    @property
    def size_multiple(self) -> int:
        """Input height and width must be divisible by this: 2 ** (number of downsamplings)."""
        return 2 ** (self.levels - 1)

    def resolutions(self) -> tuple[int, ...]:
        """Feature resolution of each level for an image_size input."""
        return tuple(self.image_size // 2 ** i for i in range(self.levels))

    def validate(self) -> None:
        """Raise ValueError naming the first problem and what to change."""
        if self.variant not in VARIANTS:
            raise ValueError(f"unknown U-Net variant {self.variant!r}; choose one of {VARIANTS}")
        for name in ("in_channel", "out_channel", "inner_channel", "res_blocks", "norm_groups", "image_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.inner_channel % 2:
            raise ValueError(f"inner_channel must be even (the noise-level encoding has inner_channel/2 "
                             f"sine-cosine pairs), got {self.inner_channel}")
        if not self.channel_mults or min(self.channel_mults) < 1:
            raise ValueError(f"channel_mults must be one or more positive integers, got {self.channel_mults}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.image_size % self.size_multiple:
            raise ValueError(f"image_size={self.image_size} must be divisible by {self.size_multiple} "
                             f"(the U-Net halves the resolution {self.levels - 1} times)")
        unreached = sorted(set(self.attn_res) - set(self.resolutions()))
        if unreached:
            raise ValueError(f"attn_res {unreached} are not feature resolutions of this U-Net "
                             f"(image_size={self.image_size} gives {list(self.resolutions())}); "
                             "remove them or pick from that list")
        # every norm sees inner_channel, a multiple of it, or a sum of those: one check covers all
        if self.inner_channel % self.norm_groups:
            suggestion = max(d for d in range(1, self.norm_groups + 1) if self.inner_channel % d == 0)
            raise ValueError(f"norm_groups={self.norm_groups} must divide every channel count of the U-Net, "
                             f"but inner_channel = {self.inner_channel} is not divisible by it; use "
                             f"norm_groups={suggestion} (the largest value <= {self.norm_groups} dividing "
                             f"{self.inner_channel}, and so every level's multiple of it)")

    def to_dict(self) -> dict:
        data = dataclasses.asdict(self)
        data["channel_mults"] = list(self.channel_mults)
        data["attn_res"] = list(self.attn_res)
        return data

    @classmethod
    def from_dict(cls, data: dict) -> "UNetConfig":
        _check_keys(cls, data)
        return cls(**data)

    @classmethod
    def from_public_json(cls, unet_section: dict, image_size: int) -> "UNetConfig":
        """The config of the public SR3 code: its JSON's model.unet section plus
        model.diffusion.image_size.

        Uses that code's key names ("channel_multiplier"); a missing or null "norm_groups" means
        32 and attn_res resolutions the network never reaches are dropped, as that code does.
        """
        required = ("in_channel", "out_channel", "inner_channel", "channel_multiplier",
                    "attn_res", "res_blocks", "dropout")
        missing = [key for key in required if key not in unet_section]
        if missing:
            raise ValueError(f"public SR3 config's model.unet section lacks {missing}; it needs "
                             f"{list(required)} (and optionally norm_groups)")
        norm_groups = unet_section.get("norm_groups")
        mults = _as_int_tuple("channel_multiplier", unet_section["channel_multiplier"])
        reached = {image_size // 2 ** i for i in range(len(mults))}
        attn_res = tuple(r for r in _as_int_tuple("attn_res", unet_section["attn_res"]) if r in reached)
        return cls(variant="public",
                   in_channel=unet_section["in_channel"],
                   out_channel=unet_section["out_channel"],
                   inner_channel=unet_section["inner_channel"],
                   channel_mults=mults,
                   attn_res=attn_res,
                   res_blocks=unet_section["res_blocks"],
                   dropout=float(unet_section["dropout"]),
                   norm_groups=32 if norm_groups is None else norm_groups,
                   image_size=image_size)


@dataclass(frozen=True)
class SR3Config:
    """A whole SR3 model: the denoiser's U-Net, its training noise schedule, and the scale.

    schedule: plain JSON data interpreted by sr3fast.diffusion, e.g.
    {"schedule": "linear", "n_timestep": 2000, "linear_start": 1e-6, "linear_end": 1e-2}.
    The model maps low_res x low_res inputs to high_res x high_res outputs (the U-Net runs at
    high_res; the condition is the input upsampled to it).
    """
    unet: UNetConfig
    schedule: dict
    low_res: int
    high_res: int
    description: str = ""

    def __post_init__(self):
        if isinstance(self.unet, dict):
            object.__setattr__(self, "unet", UNetConfig.from_dict(self.unet))
        object.__setattr__(self, "schedule", dict(self.schedule))
        self.validate()

    @property
    def scale(self) -> int:
        return self.high_res // self.low_res

    def validate(self) -> None:
        if not isinstance(self.unet, UNetConfig):
            raise ValueError(f"SR3Config.unet must be a UNetConfig or its dict, got {type(self.unet).__name__}")
        for name in ("low_res", "high_res"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.high_res % self.low_res:
            raise ValueError(f"high_res={self.high_res} must be a multiple of low_res={self.low_res}")
        if self.unet.image_size != self.high_res:
            raise ValueError(f"unet.image_size={self.unet.image_size} must equal high_res={self.high_res}: "
                             "the U-Net runs at the output resolution")

    def to_dict(self) -> dict:
        return {"unet": self.unet.to_dict(), "schedule": dict(self.schedule), "low_res": self.low_res,
                "high_res": self.high_res, "description": self.description}

    @classmethod
    def from_dict(cls, data: dict) -> "SR3Config":
        _check_keys(cls, data)
        if "unet" not in data:
            raise ValueError("SR3Config dict needs a 'unet' entry (a UNetConfig dict)")
        return cls(**data)
