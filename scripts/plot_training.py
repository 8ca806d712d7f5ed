"""Plot a training run: the loss and the held-out validation metrics against bicubic, as a PNG.

    .venv/bin/python scripts/plot_training.py runs/default-4x -o docs/images/default-4x-training.png

Reads OUT/metrics.jsonl and OUT/validation.jsonl, written by `sr3fast train`. Needs matplotlib.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from sr3fast.atomic import atomic_path  # noqa: E402


def read_lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run", help="the training run's output folder")
    parser.add_argument("-o", "--output", required=True, help="PNG to write")
    args = parser.parse_args(argv)

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run = Path(args.run)
    metrics = read_lines(run / "metrics.jsonl")
    validation = read_lines(run / "validation.jsonl")
    if not metrics:
        raise SystemExit(f"{run / 'metrics.jsonl'} holds no training log")

    figure, axes = plt.subplots(1, 3, figsize=(14, 3.8))
    steps = [m["step"] for m in metrics]
    axes[0].plot(steps, [m["loss"] for m in metrics], lw=0.8)
    axes[0].set(title="training loss (L1 of the noise prediction)", xlabel="step", yscale="log")
    if validation:
        vsteps = [v["step"] for v in validation]
        axes[1].plot(vsteps, [v["psnr"] for v in validation], "o-", label="SR3")
        axes[1].plot(vsteps, [v["bicubic_psnr"] for v in validation], "--", label="bicubic")
        axes[1].set(title="held-out PSNR (dB)", xlabel="step")
        axes[1].legend()
        axes[2].plot(vsteps, [v["consistency"] for v in validation], "o-", label="SR3")
        axes[2].set(title="held-out consistency (MSE, lower is better)", xlabel="step", yscale="log")
        if "bicubic_consistency" in validation[0]:
            axes[2].plot(vsteps, [v["bicubic_consistency"] for v in validation], "--", label="bicubic")
        axes[2].legend()
    for axis in axes:
        axis.grid(alpha=0.3)
    figure.tight_layout()
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(output) as tmp:
        figure.savefig(tmp, format="png", dpi=110)
    print(f"wrote {output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
