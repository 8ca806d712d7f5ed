"""sr3fast's checkpoint format: safetensors weights with the model config in the metadata.

A checkpoint never executes code when read (no pickle), is written atomically, and is checked
key by key and shape by shape against the architecture its config describes.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .atomic import atomic_path

FORMAT = "sr3fast"
FORMAT_VERSION = "1"


class CheckpointError(ValueError):
    """A checkpoint that cannot be used as asked; the message lists what is wrong and what to do."""


def save_checkpoint(path: str | os.PathLike, state_dict: dict[str, torch.Tensor], config: dict,
                    metadata: dict[str, str] | None = None) -> Path:
    """Write `state_dict` and the JSON-able model `config` to a safetensors file at `path`."""
    tensors = {name: tensor.detach().to("cpu").contiguous() for name, tensor in state_dict.items()}
    meta = {"format": FORMAT, "format_version": FORMAT_VERSION, "config": json.dumps(config)}
    meta.update(metadata or {})
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=meta)
    return Path(path)


def read_checkpoint(path: str | os.PathLike) -> tuple[dict, dict[str, torch.Tensor], dict[str, str]]:
    """(config dict, tensors, metadata) of an sr3fast checkpoint."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {str(path)!r} does not exist")
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
            tensors = {name: handle.get_tensor(name) for name in handle.keys()}
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(f"{str(path)!r} is not a readable safetensors file: it is truncated, "
                              f"corrupt or of another format ({err}). Re-create it with "
                              "`sr3fast convert` or sr3fast.save().") from None
    if metadata.get("format") != FORMAT or "config" not in metadata:
        raise CheckpointError(f"{str(path)!r} is a safetensors file but not an sr3fast checkpoint (its "
                              "metadata holds no sr3fast config). A checkpoint of the public SR3 code "
                              "is a *_gen.pth file loaded with its JSON: sr3fast.load(pth, config=json).")
    if metadata.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{str(path)!r} has sr3fast checkpoint format version "
                              f"{metadata.get('format_version')!r}; this sr3fast reads version "
                              f"{FORMAT_VERSION}. Upgrade sr3fast.")
    return json.loads(metadata["config"]), tensors, metadata


def check_state_dict(expected: dict[str, torch.Size], found: dict[str, torch.Tensor],
                     source: str, hint: str = "") -> None:
    """Raise CheckpointError listing missing, unexpected and mis-shaped keys, if there are any."""
    missing = [name for name in expected if name not in found]
    unexpected = [name for name in found if name not in expected]
    misshaped = [f"{name}: checkpoint {tuple(found[name].shape)}, model {tuple(expected[name])}"
                 for name in expected if name in found and tuple(found[name].shape) != tuple(expected[name])]
    if not (missing or unexpected or misshaped):
        return
    lines = [f"the weights in {source} do not fit the model its config describes:"]
    for title, items in (("missing", missing), ("unexpected", unexpected), ("mis-shaped", misshaped)):
        if items:
            shown = items[:20] + ([f"... and {len(items) - 20} more"] if len(items) > 20 else [])
            lines.append(f"  {len(items)} {title} key(s):")
            lines.extend(f"    {item}" for item in shown)
    lines.append(hint or "Check that the config (channels, multipliers, res_blocks, attention "
                         "resolutions, norm_groups) is the one the checkpoint was trained with.")
    raise CheckpointError("\n".join(lines))
