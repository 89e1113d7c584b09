"""Performance-sensitivity analysis (paper §3.1, Fig. 1).

For every removable U-Net block: replace it by an identity, generate with the same prompts,
seeds, steps and guidance as the unpruned model, and score the images. Blocks whose removal
hurts least are the ones to prune.

* ``tiny-sd`` and any model trained on the scene dataset: FD and alignment (slimsd.evaluator).
* real SD: FID, CLIP score and IS (slimsd.metrics_coco) against a reference set.

Resumable: each block's result is written to ``OUT/blocks/<name>.json`` as soon as it is
known; a rerun skips blocks that have a file. Under ``accelerate launch`` the blocks are
split over processes (``blocks[rank::world]``) and the main process merges the report.
"""

from __future__ import annotations

import csv
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from slimsd.cliargs import option
from slimsd.io import atomic_write_text
from slimsd.unet_blocks import ablate, list_blocks

# metric -> +1 if higher is better, -1 if lower is better
METRIC_DIRECTION = {"fd": -1, "alignment": +1, "fid": -1, "clip_score": +1, "is_mean": +1}


@dataclass
class SensitivityConfig:
    model: str = option(help="preset, diffusers folder or hub id")
    out: str = option(help="report folder (resumable: rerun to continue)")
    steps: int = option(25, "sampling steps (the paper's Fig. 1 is at 25)")
    guidance: float = option(7.5, "CFG scale")
    num_prompts: int = option(64, "held-out prompts scored per block")
    seed: int = option(0, "prompt and noise seed (the same for every block)")
    batch_size: int = option(64, "images per generation batch")
    metrics: str = option("scene", "scene (FD, alignment) or fid,clip,is (real SD)")
    reference: str | None = option(None, "image+caption data for fid/clip/is")
    clip_model: str | None = option(None, "local transformers CLIPModel folder")
    inception_weights: str | None = option(None, "local pt_inception-2015-12-05-6726825d.pth")
    blocks: tuple[str, ...] | None = option(None, "block names (default: all removable)")
    latent_size: int | None = option(None, "latent size for the MACs / latency columns")


def _scorer(cfg: SensitivityConfig):
    """(prompts, generate(prompts, seeds) -> images) -> metrics dict, with fixed prompts/seeds."""
    if cfg.metrics == "scene":
        from slimsd.data.scenes import eval_prompts
        from slimsd.evaluator import load_evaluator, score_scene_images

        prompts = [p for p, _ in eval_prompts(cfg.num_prompts, seed=cfg.seed)]
        evaluator = load_evaluator()

        def score(images):
            r = score_scene_images(images, prompts, seed=cfg.seed, evaluator=evaluator)
            return {"fd": r["fd"], "alignment": r["alignment"]}

        return prompts, score
    from itertools import islice

    from slimsd.data.user import open_dataset
    from slimsd.metrics_coco import coco_metrics

    if not cfg.reference:
        raise ValueError("--reference is required with --metrics fid,clip,is")
    pairs = list(islice(iter(open_dataset(cfg.reference, resolution=512)), cfg.num_prompts))
    prompts, refs = [c for _, c in pairs], [im for im, _ in pairs]
    wanted = tuple(m.strip() for m in cfg.metrics.split(","))

    def score(images):
        r = coco_metrics(images, prompts, refs, clip_model=cfg.clip_model, inception_weights=cfg.inception_weights, metrics=wanted)
        return {k: r[k] for k in ("fid", "clip_score", "is_mean") if k in r}

    return prompts, score


def run_sensitivity(cfg: SensitivityConfig, accelerator=None) -> dict:
    from slimsd.evaluator import diffusers_generate_fn, save_grid
    from slimsd.models import count_params, load_pipeline
    from slimsd.profile import block_latency, block_macs

    out = Path(cfg.out)
    (out / "blocks").mkdir(parents=True, exist_ok=True)
    rank, world = (accelerator.process_index, accelerator.num_processes) if accelerator else (0, 1)
    device = accelerator.device if accelerator else torch.device("cpu")
    pipe = load_pipeline(cfg.model).to(device)
    unet = pipe.unet
    prompts, score = _scorer(cfg)
    seeds = [cfg.seed * 100_003 + i for i in range(len(prompts))]
    generate = diffusers_generate_fn(pipe, cfg.steps, cfg.guidance, batch_size=cfg.batch_size)

    blocks = [b for b in list_blocks(unet) if b.removable and (cfg.blocks is None or b.name in cfg.blocks)]
    if cfg.blocks:
        unknown = set(cfg.blocks) - {b.name for b in list_blocks(unet)}
        if unknown:
            raise ValueError(f"--blocks: unknown block(s) {sorted(unknown)}")
    base_file = out / "blocks" / "_unpruned.json"
    if rank == 0 and not base_file.exists():
        images = generate(prompts, seeds)
        save_grid(images[:32], out / "unpruned.png")
        _write_json(base_file, {"name": "unpruned", **score(images)})
    mine = blocks[rank::world]
    for b in tqdm(mine, desc=f"sensitivity[{rank}]", dynamic_ncols=True, disable=rank != 0 and world > 1):
        f = out / "blocks" / f"{b.name}.json"
        if f.exists():  # done in an earlier (killed) run
            continue
        t0 = time.time()
        with ablate(unet, [b.name]):
            images = generate(prompts, seeds)
        _write_json(f, {"name": b.name, **score(images), "seconds": round(time.time() - t0, 2)})
    if accelerator:
        accelerator.wait_for_everyone()
    if rank != 0:
        return {}
    macs = block_macs(unet, batch=2, latent_size=cfg.latent_size)
    lat = block_latency(unet, batch=2, latent_size=cfg.latent_size)
    report = {
        "model": cfg.model,
        "settings": {k: v for k, v in asdict(cfg).items() if k != "out"},
        "unpruned": json.loads(base_file.read_text()),
        "unet_params": count_params(unet),
        "unet_latency_ms": lat["total"],
        "machine": _machine(device),
        "blocks": [],
    }
    for b in list_blocks(unet):
        row = b.to_dict()
        row.update(macs=macs.get(b.name), latency_ms=lat.get(b.name))
        f = out / "blocks" / f"{b.name}.json"
        if f.exists():
            row.update({k: v for k, v in json.loads(f.read_text()).items() if k != "name"})
        report["blocks"].append(row)
    _write_json(out / "sensitivity.json", report)
    write_csv(report, out / "sensitivity.csv")
    plot_sensitivity(report, out / "sensitivity.png")
    return report


def _machine(device) -> dict:
    import platform

    d = {"device": str(device), "cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads()}
    if device.type == "cuda":
        d["gpu"] = torch.cuda.get_device_name(device)
    return d


def _write_json(path: Path, data) -> None:
    atomic_write_text(path, json.dumps(data, indent=2))  # a killed run never leaves half a file


def metric_names(report: dict) -> list[str]:
    return [k for k in METRIC_DIRECTION if k in report["unpruned"]]


def write_csv(report: dict, path: Path) -> None:
    metrics = metric_names(report)
    cols = ["name", "kind", "params", "macs", "latency_ms", "removable", *metrics]
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols, extrasaction="ignore")
        w.writeheader()
        w.writerow({"name": "unpruned", **report["unpruned"]})
        for row in report["blocks"]:
            w.writerow(row)


def plot_sensitivity(report: dict, path: Path) -> None:
    """Bar chart per block, one panel per metric, the unpruned value as a dashed line (Fig. 1)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = metric_names(report)
    rows = [r for r in report["blocks"] if metrics and metrics[0] in r]
    names = [r["name"] for r in rows]
    fig, axes = plt.subplots(len(metrics), 1, figsize=(max(8, 0.32 * len(names)), 2.6 * len(metrics)), sharex=True, squeeze=False)
    colours = ("tab:blue", "tab:orange", "tab:green", "tab:red")
    for ax, m, c in zip(axes[:, 0], metrics, colours):
        ax.bar(range(len(rows)), [r[m] for r in rows], color=c, alpha=0.8)
        ax.axhline(report["unpruned"][m], color=c, linestyle="--", label=f"unpruned {m} = {report['unpruned'][m]:.3g}")
        better = "higher" if METRIC_DIRECTION[m] > 0 else "lower"
        ax.set_ylabel(f"{m} ({better} better)")
        ax.legend(loc="upper left", fontsize=8)
    axes[-1, 0].set_xticks(range(len(rows)), names, rotation=90, fontsize=8)
    s = report["settings"]
    fig.suptitle(f"Sensitivity of {report['model']}: one block replaced by identity ({s['steps']} steps, CFG {s['guidance']})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
