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


def _uint8_batch(images) -> torch.Tensor:
    return torch.from_numpy(np.stack([np.asarray(im.convert("RGB").resize((64, 64))) for im in images])).permute(0, 3, 1, 2)


def _real_renders(scenes, seed: int) -> torch.Tensor:
    """Fresh renders of the very same scenes (other layouts and backgrounds), uint8 (N, 3, 64, 64)."""
    from slimsd.data.scenes import render

    rng = np.random.default_rng(seed)
    return torch.from_numpy(np.stack([np.asarray(render(s, rng)) for s in scenes])).permute(0, 3, 1, 2)


def _torchmetrics_fd(evaluator, real: torch.Tensor, fake: torch.Tensor) -> float:
    from torchmetrics.image.fid import FrechetInceptionDistance

    fid = FrechetInceptionDistance(feature=evaluator, normalize=False)
    fid.update(real, real=True)
    fid.update(fake, real=False)
    return float(fid.compute())


def _features(evaluator, x: torch.Tensor) -> torch.Tensor:
    return torch.cat([evaluator.features(x[i : i + 512]) for i in range(0, len(x), 512)]).double()


@torch.no_grad()
def score_scene_images(images, prompts, seed: int = 0, evaluator: SceneClassifier | None = None,
                       resamples: int | None = None, per_image: bool = False) -> dict:
    """FD and alignment of ``images`` generated for scene-grammar ``prompts``, with 95% intervals.

    Keys: ``alignment`` (all five attributes right) and ``alignment_ci`` (Wilson);
    ``objects`` (both objects' colour and shape right, in either order) and ``objects_ci``;
    ``order`` (the order right among the images with both objects right) and ``order_ci``;
    ``fd`` (torchmetrics' FrechetInceptionDistance in the evaluator's features) and
    ``fd_ci`` (bootstrap over prompts, :func:`slimsd.evalstats.bootstrap_fd`); ``fd_floor``,
    a second set of real renders of the same prompts against the first (what a perfect model
    would score at this prompt count and seed). ``per_image=True`` adds the per-prompt arrays
    a paired comparison needs (``per_image``; not JSON).
    """
    from slimsd.evalstats import DEFAULT_RESAMPLES, bootstrap_fd, wilson

    resamples = DEFAULT_RESAMPLES if resamples is None else resamples
    evaluator = evaluator or load_evaluator()
    scenes = [parse_caption(p) for p in prompts]
    fake = _uint8_batch(images)
    real = _real_renders(scenes, seed + 10_000)
    real2 = _real_renders(scenes, seed + 20_000)
    pred = torch.cat([evaluator.predict(fake[i : i + 512]) for i in range(0, len(fake), 512)])
    target = torch.tensor([s.labels() for s in scenes])
    ok = pred == target
    right = ok.all(1)
    in_order = ok[:, 1:].all(1)  # colour and shape of A and of B, each in its place
    swapped = (pred[:, 1:3] == target[:, 3:5]).all(1) & (pred[:, 3:5] == target[:, 1:3]).all(1)
    objects = in_order | swapped
    n, k_obj = len(images), int(objects.sum())
    k_order = int((objects & in_order).sum())
    result = {
        "fd": _torchmetrics_fd(evaluator, real, fake),
        "alignment": float(right.float().mean()), "alignment_ci": wilson(int(right.sum()), n),
        "objects": k_obj / n, "objects_ci": wilson(k_obj, n),
        "order": k_order / k_obj if k_obj else None, "order_ci": wilson(k_order, k_obj) if k_obj else None,
        "attribute_accuracy": {name: float(ok[:, j].float().mean()) for j, (name, _) in enumerate(HEADS)},
        "num_images": n,
    }
    f_fake, f_real = _features(evaluator, fake), _features(evaluator, real)
    if resamples:
        result["fd_ci"] = bootstrap_fd(f_fake, f_real, resamples=resamples, seed=seed)
    result["fd_floor"] = _torchmetrics_fd(evaluator, real, real2)
    if per_image:
        result["per_image"] = {"prompts": list(prompts), "right": right.numpy(), "objects": objects.numpy(),
                               "features": f_fake, "real_features": f_real}
    return result


def generate_sharded(generate_fn: GenerateFn, prompts: list, seeds: list, batch_size: int) -> list:
    """``generate_fn`` over all prompts; under ``accelerate launch``, whole batches per process.

    Batch ``j`` goes to process ``j % num_processes``, so every image is made in the same
    batch as in a one-process run (the same numbers, not just the same distribution), then
    the images are gathered to every process in prompt order. One process: a plain call.
    """
    from accelerate import PartialState

    state = PartialState()
    if state.num_processes == 1:
        return generate_fn(prompts, seeds)
    from accelerate.utils import gather_object

    starts = list(range(0, len(prompts), batch_size))[state.process_index :: state.num_processes]
    mine = [(i, [np.asarray(im.convert("RGB")) for im in generate_fn(prompts[i : i + batch_size],
                                                                       seeds[i : i + batch_size])])
            for i in starts]
    gathered = sorted(gather_object(mine), key=lambda t: t[0])
    from PIL import Image

    return [Image.fromarray(a) for _, arrays in gathered for a in arrays]


def evaluation_seeds(num_prompts: int, seed: int) -> list[int]:
    return [seed * 100_003 + i for i in range(num_prompts)]


def evaluate(model, steps: int = 25, guidance: float = 7.5, num_prompts: int = 1024, seed: int = 0,
             out: str | Path | None = None, split: str = "heldout", generate_fn: GenerateFn | None = None,
             batch_size: int = 64, resamples: int | None = None, per_image: bool = False) -> dict:
    """Generate one image per held-out prompt and score it (FD, alignment, objects, order, CIs).

    ``model`` is a preset / folder / hub id (generated with diffusers' pipeline and a
    DDIM scheduler) unless ``generate_fn`` is given (e.g. the ONNX serving pipeline). Under
    ``accelerate launch`` the prompts are sharded across processes (:func:`generate_sharded`).
    """
    t0 = time.time()
    pairs = eval_prompts(num_prompts, seed=seed, split=split)
    prompts = [p for p, _ in pairs]
    seeds = evaluation_seeds(num_prompts, seed)
    if generate_fn is None:
        from slimsd.models import load_pipeline

        generate_fn = diffusers_generate_fn(load_pipeline(model), steps, guidance, batch_size=batch_size)
    images = generate_sharded(generate_fn, prompts, seeds, batch_size)
    t_gen = time.time() - t0
    result = score_scene_images(images, prompts, seed=seed, resamples=resamples, per_image=per_image)
    if per_image:
        result["per_image"]["seeds"] = seeds
    result.update(model=str(model), steps=steps, guidance=guidance, num_prompts=num_prompts, seed=seed,
                  split=split, generate_s=round(t_gen, 1), wall_time_s=round(time.time() - t0, 1))
    if out is not None and _is_main_process():
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        save_grid(images[:64], out / "samples.png", captions=prompts[:64])
        (out / "metrics.json").write_text(json.dumps(_json_safe(result), indent=2))
    return result


def compare(model_a, model_b, steps: int = 8, guidance: float = 7.5, steps_b: int | None = None,
            guidance_b: float | None = None, num_prompts: int = 1024, seed: int = 0, split: str = "heldout",
            batch_size: int = 64, resamples: int | None = None, generate_a: GenerateFn | None = None,
            generate_b: GenerateFn | None = None, out: str | Path | None = None) -> dict:
    """Paired comparison of A against B on the same prompts and seeds: A - B with 95% CIs.

    Answers "is A as good as B?" with intervals (:func:`slimsd.evalstats.paired_compare`):
    ``alignment_diff`` / ``objects_diff`` / ``fd_diff`` / ``fd_ratio``, each with ``_ci``,
    and ``*_verdict`` ("unresolved" when the interval contains 0).
    """
    from slimsd.evalstats import DEFAULT_RESAMPLES, paired_compare

    resamples = DEFAULT_RESAMPLES if resamples is None else resamples
    kw = dict(num_prompts=num_prompts, seed=seed, split=split, batch_size=batch_size, resamples=resamples,
              per_image=True)
    a = evaluate(model_a, steps=steps, guidance=guidance, generate_fn=generate_a, **kw)
    b = evaluate(model_b, steps=steps_b or steps, guidance=guidance if guidance_b is None else guidance_b,
                 generate_fn=generate_b, **kw)
    diff = paired_compare(a, b, resamples=resamples, seed=seed)
    strip = lambda r: {k: v for k, v in r.items() if k != "per_image"}  # noqa: E731
    result = {"a": strip(a), "b": strip(b), "a_minus_b": diff}
    if out is not None and _is_main_process():
        Path(out).mkdir(parents=True, exist_ok=True)
        (Path(out) / "compare.json").write_text(json.dumps(_json_safe(result), indent=2))
    return result


def _is_main_process() -> bool:
    from accelerate import PartialState

    return PartialState().is_main_process


def _json_safe(result: dict) -> dict:
    return {k: v for k, v in result.items() if k != "per_image"}


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
    seeds = evaluation_seeds(len(prompts), seed)
    if generate_fn is None:
        from slimsd.models import load_pipeline

        generate_fn = diffusers_generate_fn(load_pipeline(model), steps, guidance, batch_size=batch_size)
    images = generate_sharded(generate_fn, prompts, seeds, batch_size)
    result = coco_metrics(images, prompts, refs, clip_model=clip_model, inception_weights=inception_weights,
                          metrics=tuple(metrics))
    result.update(model=str(model), steps=steps, guidance=guidance, num_prompts=len(prompts), seed=seed,
                  reference=str(reference), wall_time_s=round(time.time() - t0, 1))
    if out is not None and _is_main_process():
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        save_grid(images[:64], out / "samples.png", captions=prompts[:64])
        (out / "metrics.json").write_text(json.dumps(result, indent=2))
    return result
