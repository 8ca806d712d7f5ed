"""Training SR3 on your own images (Algorithm 1), or the paper's regression baseline.

    sr3fast train --data photos/ --preset small --out runs/small --steps 20000 --warmup 1000
    torchrun --nproc_per_node=8 -m sr3fast.train --data photos/ --preset paper-64-256 ...

    from sr3fast.train import TrainConfig, train
    train(TrainConfig(data="photos/", out="runs/small", preset="small", steps=20000))

Adam with linear warm-up, gradient clipping, EMA weights, bf16 autocast, torch.compile,
gradient accumulation, DDP, exact resume from atomic checkpoints. The weights to sample with are
the EMA ones: OUT/model.safetensors and OUT/checkpoints/step_N/model.safetensors, which
sr3fast.load reads.
"""
from .config import TrainConfig

__all__ = ["TrainConfig", "Trainer", "train"]


def __getattr__(name):
    # the trainer (model, diffusion, DDP) loads on first use, so the CLI's parser stays light
    if name in ("Trainer", "train"):
        from . import trainer
        return getattr(trainer, name)
    raise AttributeError(f"module 'sr3fast.train' has no attribute {name!r}")
