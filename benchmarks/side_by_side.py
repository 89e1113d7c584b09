"""Side-by-side samples: the teacher at 25 steps, ours at 8 and ours at 4, same prompts and seeds.

    python benchmarks/side_by_side.py                       # docs/images/side-by-side.png
    python benchmarks/side_by_side.py --models tiny-sd:25 tiny-sd-slim:8 tiny-sd-slim-4:4 --prompts 12

One row per held-out prompt (the evaluator's first N prompts and seeds, so each row is also a
sample of ``slimsd evaluate``), one column per MODEL:STEPS, each image upscaled with nearest
neighbours (64² models stay pixel-exact), the prompt under the row, the column's model, steps
and mean seconds per image (batch N with CFG, this machine) on top.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).parents[1]


def render(models: list[tuple[str, int]], n: int, guidance: float, threads: int):
    from slimsd.data.scenes import eval_prompts
    from slimsd.evaluator import diffusers_generate_fn, evaluation_seeds
    from slimsd.models import load_pipeline

    if threads:
        torch.set_num_threads(threads)
    prompts = [p for p, _ in eval_prompts(n, seed=0, split="heldout")]
    seeds = evaluation_seeds(n, 0)
    columns = []
    for model, steps in models:
        gen = diffusers_generate_fn(load_pipeline(model), steps, guidance, batch_size=n)
        t0 = time.perf_counter()
        images = gen(prompts, seeds)
        columns.append((model, steps, (time.perf_counter() - t0) / n, images))
        print(f"{model} at {steps} steps: {columns[-1][2]:.3f} s/image", file=sys.stderr)
    return prompts, columns


def compose(prompts, columns, cell: int = 192):
    """One PIL image: a header row (model, steps, s/image), then one row per prompt."""
    from PIL import Image, ImageDraw

    head, foot, pad = 34, 18, 6
    W = len(columns) * (cell + pad) + pad
    H = head + len(prompts) * (cell + foot + pad) + pad
    out = Image.new("RGB", (W, H), (255, 255, 255))
    draw = ImageDraw.Draw(out)
    for j, (model, steps, s, _) in enumerate(columns):
        x = pad + j * (cell + pad)
        draw.text((x, 4), f"{model}", fill=(0, 0, 0))
        draw.text((x, 18), f"{steps} steps, {s:.3f} s/image", fill=(60, 60, 60))
    for i, prompt in enumerate(prompts):
        y = head + i * (cell + foot + pad)
        for j, (*_, images) in enumerate(columns):
            im = images[i].convert("RGB").resize((cell, cell), Image.Resampling.NEAREST)
            out.paste(im, (pad + j * (cell + pad), y))
        draw.text((pad, y + cell + 3), prompt, fill=(0, 0, 0))
    return out


def parse_model(s: str) -> tuple[str, int]:
    model, _, steps = s.rpartition(":")
    if not model or not steps.isdigit():
        raise argparse.ArgumentTypeError(f"--models: expected MODEL:STEPS (e.g. tiny-sd:25), got {s!r}")
    return model, int(steps)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", type=parse_model,
                    default=[("tiny-sd", 25), ("tiny-sd-slim", 8), ("tiny-sd-slim-4", 4)], help="MODEL:STEPS, one column each")
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--guidance", type=float, default=7.5)
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    ap.add_argument("--out", default=str(ROOT / "docs" / "images" / "side-by-side.png"))
    a = ap.parse_args(argv)
    prompts, columns = render(a.models, a.prompts, a.guidance, a.threads)
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    compose(prompts, columns).save(out)
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
