"""Offline evaluator: the roles FID and CLIP score play in the paper, on the scene dataset.

The classifier itself lives in :mod:`slimsd.scene_classifier`; the intervals and the paired
comparison in :mod:`slimsd.evalstats`.

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

from slimsd.data.scenes import eval_prompts, parse_caption
from slimsd.scene_classifier import (  # noqa: F401  (re-exported: the evaluator's public names)
    EVALUATOR_DIR, HEADS, SceneClassifier, _render_set, accuracy, load_evaluator, train_evaluator)

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


def real_renders(scenes, seed: int) -> torch.Tensor:
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
    real = real_renders(scenes, seed + 10_000)
    real2 = real_renders(scenes, seed + 20_000)
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
    if out is not None and is_main_process():
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
    result = {"a": _json_safe(a), "b": _json_safe(b), "a_minus_b": diff}
    if out is not None and is_main_process():
        Path(out).mkdir(parents=True, exist_ok=True)
        (Path(out) / "compare.json").write_text(json.dumps(result, indent=2))
    return result


def is_main_process() -> bool:
    """True outside ``accelerate launch``, and in its main process: the one that prints and writes."""
    from accelerate import PartialState

    return PartialState().is_main_process


def _json_safe(result: dict) -> dict:
    """``result`` without its per-image arrays (not JSON)."""
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
    if out is not None and is_main_process():
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        save_grid(images[:64], out / "samples.png", captions=prompts[:64])
        (out / "metrics.json").write_text(json.dumps(result, indent=2))
    return result
