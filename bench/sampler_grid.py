"""A picture of the sampler validation: held-out crops, each sampler at a few steps beside the
ancestral reference, bicubic and the truth.

    python bench/sampler_grid.py --steps 10 --out docs/images/samplers-10-steps.png

Columns, left to right: input (nearest neighbour), bicubic, posterior / ddim / dpmpp_2m at
--steps (even in log-SNR for dpmpp_2m, the training schedule by index for the others: upscale's
defaults), the model's default (its tuned sampler and schedule at --steps), the ancestral
reference (posterior over every training level from the start), the ground truth. The same
seed and start as bench/sampler_validation.py.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import sr3fast  # noqa: E402
from sr3fast.evaluation import bicubic_upscale, degrade, find_images, model_scale  # noqa: E402
from sr3fast.images import save_image_atomic  # noqa: E402
from sr3fast.schedule_search import ancestral_schedule, crops_of, sampling_start  # noqa: E402
from sr3fast.train.data import quantize  # noqa: E402

GAP = 4


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="default")
    parser.add_argument("--data", default=str(ROOT / "data" / "photos" / "val"))
    parser.add_argument("--crop", type=int, default=128)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", required=True, help="PNG to write")
    args = parser.parse_args(argv)

    model = sr3fast.load(args.model)
    scale = model_scale(model)
    _, start_gamma = sampling_start(model)
    crops = crops_of(find_images([args.data]), args.crop - args.crop % scale, 1, scale)
    truth = torch.cat([c for _, c in crops])
    low = degrade(truth, scale)
    common = dict(model=model, seed=args.seed, progress=False)
    chain = ancestral_schedule(model, start_gamma)
    columns = [F.interpolate(low, size=truth.shape[-2:], mode="nearest"), bicubic_upscale(low, scale)]
    for sampler in ("posterior", "ddim", "dpmpp_2m"):
        print(f"{sampler}, {args.steps} steps", flush=True)
        columns.append(sr3fast.upscale(low, sampler=sampler, steps=args.steps, **common))
    print(f"default ({model.inference_settings.sampler}), {args.steps} steps", flush=True)
    columns.append(sr3fast.upscale(low, steps=args.steps, **common))
    print(f"ancestral reference, {chain.num_steps} steps", flush=True)
    columns.append(sr3fast.upscale(low, sampler="posterior", schedule=chain,
                                   start_gamma=chain.gammas[-1].item() if start_gamma else None, **common))
    columns.append(truth)
    padded = [F.pad(quantize(c.float().cpu()), (0, GAP, 0, GAP), value=1.0) for c in columns]
    rows = torch.cat(padded, dim=-1)                       # (B, 3, h + GAP, columns x (w + GAP))
    grid = torch.cat(list(rows), dim=-2)                    # (3, B x (h + GAP), ...)
    picture = (grid * 255).round().clamp(0, 255).to(torch.uint8).permute(1, 2, 0).numpy()
    from PIL import Image
    print(f"wrote {save_image_atomic(Image.fromarray(picture), args.out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
