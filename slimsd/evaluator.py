"""Offline evaluator: the roles FID and CLIP score play in the paper, on the scene dataset.

A small CNN (``SceneClassifier``) trained on rendered scenes predicts, for an image,
the scene it shows: orientation and colour/shape of both objects (5 heads).

* **FD**  (plays FID): Fréchet distance between the classifier's 128-d penultimate
  features of generated images and of real renders of the same prompts, computed by
  torchmetrics' ``FrechetInceptionDistance`` with this network in place of Inception
  (same formula, same code).  Lower is better.
* **alignment** (plays CLIP score): share of generated images whose five predicted
  attributes all match their prompt.  Higher is better.

For real Stable Diffusion, :mod:`slimsd.metrics_coco` computes FID / CLIP score / IS
with torchmetrics and locally stored Inception / CLIP weights.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from slimsd.data.scenes import COLOUR_NAMES, ORIENTS, SHAPES, SceneDataset, eval_prompts, parse_caption, to_tensor

EVALUATOR_DIR = Path(__file__).parent / "assets" / "evaluator"
HEADS = (("orient", len(ORIENTS)), ("colour_a", len(COLOUR_NAMES)), ("shape_a", len(SHAPES)),
         ("colour_b", len(COLOUR_NAMES)), ("shape_b", len(SHAPES)))


class SceneClassifier(nn.Module):
    """64x64 RGB in [-1, 1] (or uint8) -> 5 attribute logits; ``features`` is the 128-d FD space."""

    num_features = 128  # read by torchmetrics' FrechetInceptionDistance

    def __init__(self):
        super().__init__()

        def block(cin, cout, stride):
            return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))

        self.body = nn.Sequential(
            block(3, 32, 2),  # 32x32: objects are 14-20 px, still 7-10 px here
            block(32, 64, 1), block(64, 64, 2),  # 16x16
            block(64, 128, 2),  # 8x8
            block(128, 128, 2),  # 4x4: position is kept (no global pool) - the relation needs it
        )
        self.fc = nn.Sequential(nn.Flatten(), nn.Linear(128 * 4 * 4, self.num_features), nn.ReLU(inplace=True))
        self.heads = nn.ModuleList(nn.Linear(self.num_features, n) for _, n in HEADS)

    @staticmethod
    def _prep(x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.uint8:
            x = x.float() / 127.5 - 1.0
        if x.shape[-1] != 64 or x.shape[-2] != 64:
            x = F.interpolate(x, size=(64, 64), mode="bilinear", antialias=True, align_corners=False)
        return x

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.body(self._prep(x)))  # (N, 128)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """torchmetrics calls the feature extractor's forward: return features."""
        return self.features(x)

    def logits(self, x: torch.Tensor) -> list[torch.Tensor]:
        f = self.features(x)
        return [h(f) for h in self.heads]

    @torch.no_grad()
    def predict(self, x: torch.Tensor) -> torch.Tensor:
        """(N, 5) predicted class indices (orient, cA, sA, cB, sB)."""
        return torch.stack([l.argmax(-1) for l in self.logits(x)], dim=1)


def _augment(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Blur, noise and contrast changes: generated images are softer than renders."""
    n = x.shape[0]
    k = torch.arange(-2, 3, dtype=torch.float32)
    out = []
    for chunk in x.chunk(4):  # one blur strength per quarter batch: sigma in [0, 1.2]
        sigma = float(torch.rand((), generator=g)) * 1.2
        if sigma < 0.2:
            out.append(chunk)
            continue
        w = torch.exp(-(k**2) / (2 * sigma**2))
        w = w / w.sum()
        c = F.conv2d(F.pad(chunk, (2, 2, 0, 0), mode="replicate"), w.view(1, 1, 1, 5).repeat(3, 1, 1, 1), groups=3)
        out.append(F.conv2d(F.pad(c, (0, 0, 2, 2), mode="replicate"), w.view(1, 1, 5, 1).repeat(3, 1, 1, 1), groups=3))
    x = torch.cat(out)
    x = x * (1 + 0.2 * (torch.rand(n, 1, 1, 1, generator=g) - 0.5)) + 0.1 * (torch.rand(n, 1, 1, 1, generator=g) - 0.5)
    x = x + torch.randn(x.shape, generator=g) * torch.rand(n, 1, 1, 1, generator=g) * 0.08
    return x.clamp(-1, 1)


def _render_set(split: str, seed: int, n: int):
    ds = SceneDataset(split, seed=seed, length=n)
    samples = [ds[i] for i in range(n)]
    return to_tensor([s.image for s in samples]), torch.tensor([s.scene.labels() for s in samples])


def accuracy(model: SceneClassifier, x: torch.Tensor, y: torch.Tensor) -> dict:
    model.eval()
    pred = torch.cat([model.predict(x[i : i + 512]) for i in range(0, len(x), 512)])
    ok = pred == y
    per = {name: float(ok[:, j].float().mean()) for j, (name, _) in enumerate(HEADS)}
    return {"per_attribute": per, "min_attribute": min(per.values()), "all_attributes": float(ok.all(1).float().mean())}


def train_evaluator(out: str | Path = EVALUATOR_DIR, steps: int = 1500, batch: int = 64, n_train: int = 30_000,
                    lr: float = 2e-3, seed: int = 0) -> dict:
    """Train the scene classifier on *training-split* renders; report accuracy on held-out scenes."""
    from safetensors.torch import save_file
    from tqdm.auto import tqdm

    t0 = time.time()
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    x_train, y_train = _render_set("train", seed + 100, n_train)
    x_test, y_test = _render_set("heldout", seed + 200, 2000)
    model = SceneClassifier()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps)
    model.train()
    for step in (bar := tqdm(range(steps), desc="evaluator", dynamic_ncols=True)):
        idx = torch.randint(n_train, (batch,), generator=g)
        logits = model.logits(_augment(x_train[idx], g))
        loss = sum(F.cross_entropy(l, y_train[idx, j]) for j, l in enumerate(logits))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step % 50 == 0:
            bar.set_postfix(loss=f"{loss.item():.4f}")
    model.eval()
    acc = accuracy(model, x_test, y_test)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    save_file(model.state_dict(), out / "model.safetensors")
    manifest = {
        "what": "scene attribute classifier for FD / alignment (slimsd.evaluator)",
        "trained_on": f"{n_train} renders of the training split (seed {seed + 100}), blur/noise/contrast augmentation",
        "steps": steps, "batch": batch, "lr": lr, "seed": seed,
        "heldout_accuracy": acc, "heldout_images": len(x_test),
        "wall_time_s": round(time.time() - t0, 1),
        "command": f"slimsd evaluator train --steps {steps}",
    }
    from slimsd.manifest import write_manifest

    return write_manifest(out, **manifest)


def load_evaluator(path: str | Path = EVALUATOR_DIR) -> SceneClassifier:
    from safetensors.torch import load_file

    from slimsd.manifest import verify_manifest

    f = Path(path) / "model.safetensors"
    if not f.is_file():
        raise FileNotFoundError(f"evaluator weights missing: {f} (train them with `slimsd evaluator train`)")
    verify_manifest(Path(path))
    model = SceneClassifier()
    try:
        model.load_state_dict(load_file(f))
    except Exception as e:  # corrupt or foreign file: refuse, name it
        raise ValueError(f"evaluator weights {f} could not be loaded: {e}") from e
    return model.eval()


# ---------------------------------------------------------------------------------------
# evaluate(): generate for held-out prompts, then FD + alignment
# ---------------------------------------------------------------------------------------
GenerateFn = Callable[[list, list], list]  # (prompts, seeds) -> list[PIL.Image]


def diffusers_generate_fn(pipe, steps: int, guidance: float, batch_size: int = 64, negative_prompt: str | None = None) -> GenerateFn:
    """Generation with diffusers' ``StableDiffusionPipeline`` (the reference implementation)."""

    def generate(prompts, seeds):
        images = []
        for i in range(0, len(prompts), batch_size):
            ps, ss = prompts[i : i + batch_size], seeds[i : i + batch_size]
            gens = [torch.Generator().manual_seed(int(s)) for s in ss]
            res = pipe(ps, num_inference_steps=steps, guidance_scale=guidance, generator=gens,
                       negative_prompt=[negative_prompt] * len(ps) if negative_prompt else None, output_type="pil")
            images += res.images
        return images

    return generate


def save_grid(images, path: Path, cols: int = 8, captions=None) -> None:
    from PIL import Image

    n = len(images)
    w, h = images[0].size
    rows = (n + cols - 1) // cols
    grid = Image.new("RGB", (cols * w, rows * h), (255, 255, 255))
    for i, im in enumerate(images):
        grid.paste(im.convert("RGB"), ((i % cols) * w, (i // cols) * h))
    scale = max(1, 512 // (cols * w))
    if scale > 1:
        grid = grid.resize((grid.width * scale, grid.height * scale), Image.Resampling.NEAREST)
    grid.save(path)
    if captions is not None:
        Path(path).with_suffix(".txt").write_text("\n".join(captions) + "\n")


@torch.no_grad()
def score_scene_images(images, prompts, seed: int = 0, evaluator: SceneClassifier | None = None) -> dict:
    """FD and alignment of ``images`` generated for scene-grammar ``prompts``."""
    from torchmetrics.image.fid import FrechetInceptionDistance

    evaluator = evaluator or load_evaluator()
    scenes = [parse_caption(p) for p in prompts]
    fake = torch.from_numpy(np.stack([np.asarray(im.convert("RGB").resize((64, 64))) for im in images])).permute(0, 3, 1, 2)
    # real reference: fresh renders of the very same scenes (other layouts/backgrounds)
    from slimsd.data.scenes import render

    rng = np.random.default_rng(seed + 10_000)
    real = torch.from_numpy(np.stack([np.asarray(render(s, rng)) for s in scenes])).permute(0, 3, 1, 2)
    fid = FrechetInceptionDistance(feature=evaluator, normalize=False)
    fid.update(real, real=True)
    fid.update(fake, real=False)
    pred = torch.cat([evaluator.predict(fake[i : i + 512]) for i in range(0, len(fake), 512)])
    target = torch.tensor([s.labels() for s in scenes])
    ok = pred == target
    return {
        "fd": float(fid.compute()),
        "alignment": float(ok.all(1).float().mean()),
        "attribute_accuracy": {name: float(ok[:, j].float().mean()) for j, (name, _) in enumerate(HEADS)},
        "num_images": len(images),
    }


def evaluate(model, steps: int = 25, guidance: float = 7.5, num_prompts: int = 256, seed: int = 0,
             out: str | Path | None = None, split: str = "heldout", generate_fn: GenerateFn | None = None,
             batch_size: int = 64) -> dict:
    """Generate one image per held-out prompt and score it (FD, alignment).

    ``model`` is a preset / folder / hub id (generated with diffusers' pipeline and a
    DDIM scheduler) unless ``generate_fn`` is given (e.g. the ONNX serving pipeline).
    """
    t0 = time.time()
    pairs = eval_prompts(num_prompts, seed=seed, split=split)
    prompts = [p for p, _ in pairs]
    seeds = [seed * 100_003 + i for i in range(num_prompts)]
    if generate_fn is None:
        from slimsd.models import load_pipeline

        generate_fn = diffusers_generate_fn(load_pipeline(model), steps, guidance, batch_size=batch_size)
    images = generate_fn(prompts, seeds)
    result = score_scene_images(images, prompts, seed=seed)
    result.update(model=str(model), steps=steps, guidance=guidance, num_prompts=num_prompts, seed=seed,
                  split=split, wall_time_s=round(time.time() - t0, 1))
    if out is not None:
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        save_grid(images[:64], out / "samples.png", captions=prompts[:64])
        (out / "metrics.json").write_text(json.dumps(result, indent=2))
    return result


def evaluate_coco(model, reference: str, steps: int = 25, guidance: float = 7.5, num_prompts: int = 5000,
                  seed: int = 0, out: str | Path | None = None, clip_model: str | None = None,
                  inception_weights: str | None = None, metrics=("fid", "clip", "is"), resolution: int = 512,
                  generate_fn: GenerateFn | None = None, batch_size: int = 8) -> dict:
    """The paper's protocol on real SD: prompts and reference images from ``reference``
    (e.g. a CSV / folder / HF dataset of MS-COCO 2014 val captions, see
    :func:`slimsd.data.user.open_dataset`), FID / CLIP score / IS on the generated images."""
    from itertools import islice

    from slimsd.data.user import open_dataset
    from slimsd.metrics_coco import coco_metrics

    t0 = time.time()
    pairs = list(islice(iter(open_dataset(reference, resolution=resolution)), num_prompts))
    if not pairs:
        raise ValueError(f"reference {reference!r} yielded no image/caption pairs")
    refs, prompts = [im for im, _ in pairs], [c for _, c in pairs]
    seeds = [seed * 100_003 + i for i in range(len(prompts))]
    if generate_fn is None:
        from slimsd.models import load_pipeline

        generate_fn = diffusers_generate_fn(load_pipeline(model), steps, guidance, batch_size=batch_size)
    images = generate_fn(prompts, seeds)
    result = coco_metrics(images, prompts, refs, clip_model=clip_model, inception_weights=inception_weights,
                          metrics=tuple(metrics))
    result.update(model=str(model), steps=steps, guidance=guidance, num_prompts=len(prompts), seed=seed,
                  reference=str(reference), wall_time_s=round(time.time() - t0, 1))
    if out is not None:
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        save_grid(images[:64], out / "samples.png", captions=prompts[:64])
        (out / "metrics.json").write_text(json.dumps(result, indent=2))
    return result
