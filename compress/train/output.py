"""The output of a training run: the pipeline folder ``OUT/``, its records, plots and scores.

``OUT/``: a complete diffusers pipeline folder (student U-Net + the frozen components),
``slimsd.json`` (``defaults: {steps, guidance}``, read by serve/ and export/), ``loss_log.json``,
``loss_curve.png``, ``training.json``, ``eval/`` and ``manifest.json`` (sha256 of every file).
It is written to a temporary folder and renamed (slimsd.io.atomic_dir): ``OUT`` is complete or absent.
"""

from __future__ import annotations

import json
import platform
import shutil
import sys
from dataclasses import asdict
from pathlib import Path

import torch

from slimsd.compress.train.checkpoint import TrainState
from slimsd.compress.train.config import TrainConfig, config_sha
from slimsd.compress.train.objectives import LOG_KEYS
from slimsd.io import atomic_dir


def evaluate_unet(unet, parts: dict, steps: int, guidance: float, num_prompts: int, out: Path | None, seed: int = 0) -> dict:
    """FD / alignment of an in-memory U-Net with the frozen components (slimsd.evaluator)."""
    from slimsd.evaluator import diffusers_generate_fn, evaluate
    from slimsd.models import make_pipeline

    pipe = make_pipeline(unet, parts["vae"], parts["text_encoder"], parts["tokenizer"], parts["scheduler"])
    pipe.set_progress_bar_config(disable=True)
    was_training = unet.training
    unet.eval()
    try:
        r = evaluate("student", steps=steps, guidance=guidance, num_prompts=num_prompts, seed=seed, out=out,
                     generate_fn=diffusers_generate_fn(pipe, steps, guidance))
    finally:
        unet.train(was_training)
    return {k: r[k] for k in ("fd", "alignment", "wall_time_s")} | {"steps": steps, "guidance": guidance, "num_prompts": num_prompts}


def plot_loss_log(log: list, path: Path, title: str = "", keys=LOG_KEYS) -> None:
    """The loss terms ``keys`` of a loss log (one curve each, log scale) as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [k for k in keys if k != "w" and any(k in r for r in log)]
    fig, ax = plt.subplots(figsize=(7, 3.8))
    for k in keys:
        pts = [(r["step"], r[k]) for r in log if k in r and r[k] > 0]
        if pts:
            ax.plot(*zip(*pts), label=k, lw=1.2 if k == "loss" else 0.9)
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_title(title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _command() -> str:
    argv = sys.argv[1:]
    return "slimsd " + " ".join(argv) if argv[:2] in (["compress", "train"], ["compress", "build"]) else " ".join(sys.argv)


def write_output(unet, parts, cfg: TrainConfig, state: TrainState, student_dir: Path, teacher_dir: Path,
                 student_params: int, teacher_params: int, num_processes: int) -> Path:
    """The pipeline folder ``OUT``, written to a temporary folder and renamed (slimsd.io.atomic_dir):
    OUT is complete or absent."""
    from slimsd.manifest import write_manifest
    from slimsd.models import count_params, make_pipeline

    out = Path(cfg.out)
    unet = unet.to("cpu", dtype=torch.float32).eval()
    vae, te = parts["vae"].to("cpu", dtype=torch.float32), parts["text_encoder"].to("cpu", dtype=torch.float32)
    stage_name = {1: "CFG-aware retraining (stage 1)", 2: f"CFG-aware step distillation to {cfg.student_steps} steps (stage 2)"}[cfg.stage]
    defaults = {"steps": cfg.sample_steps, "guidance": cfg.sample_guidance}
    unet_params = count_params(unet)
    params = {"unet": unet_params, "total": unet_params + count_params(vae) + count_params(te)}
    with atomic_dir(out) as tmp:
        make_pipeline(unet, vae, te, parts["tokenizer"], parts["scheduler"]).save_pretrained(tmp, safe_serialization=True)
        plan = None
        if (student_dir / "prune_plan.json").is_file():
            shutil.copy2(student_dir / "prune_plan.json", tmp / "prune_plan.json")
            plan = json.loads((tmp / "prune_plan.json").read_text())
        (tmp / "loss_log.json").write_text(json.dumps(state.log))
        plot_loss_log(state.log, tmp / "loss_curve.png", f"{out.name}: {stage_name}")
        metrics = {}
        if cfg.final_eval_prompts > 0:
            tag = f"steps{cfg.sample_steps}_cfg{cfg.sample_guidance:g}"
            metrics[tag] = evaluate_unet(unet, parts, cfg.sample_steps, cfg.sample_guidance, cfg.final_eval_prompts,
                                         tmp / "eval" / tag)
        training = training_record(cfg, state, stage_name, student_params, teacher_params, num_processes)
        (tmp / "training.json").write_text(json.dumps(training, indent=2))
        info = {"defaults": defaults, "stage": cfg.stage, "student_steps": cfg.student_steps if cfg.stage == 2 else None,
                "scheduler": type(parts["scheduler"]).__name__, "params": params, "config_sha": config_sha(cfg),
                "complete": True}
        (tmp / "slimsd.json").write_text(json.dumps(info, indent=2) + "\n")
        write_manifest(tmp, model=f"{out.name} ({stage_name})", training=training, metrics=metrics, defaults=defaults,
                       default_steps=defaults["steps"], default_guidance=defaults["guidance"], params=params,
                       **({"prune_plan": plan} if plan else {}))
    return out


def training_record(cfg: TrainConfig, state: TrainState, stage_name: str, student_params: int, teacher_params: int,
                    num_processes: int) -> dict:
    """``training.json``: the config, command, timings, machine and periodic evaluations of the run."""
    return {
        "stage": cfg.stage, "what": stage_name,
        "config": asdict(cfg), "config_sha": config_sha(cfg), "command": _command(),
        "student": str(cfg.student), "teacher": str(cfg.teacher),
        "student_params_before": student_params, "teacher_unet_params": teacher_params,
        **run_record(state, num_processes),
        "periodic_evals": state.evals,
    }


def run_record(state, num_processes: int) -> dict:
    """Timings, machine and last loss row of a finished run (training.json, decoder.json)."""
    return {
        "wall_time_s": round(state.train_s, 1),
        "s_per_step": round(state.compute_s / state.step, 3) if state.step else None,  # over all (resumed) runs
        "machine": {"cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
                    "processes": num_processes, "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None},
        "torch": torch.__version__,
        "final_loss": state.log[-1] if state.log else None,
    }


def read_slimsd_json(folder: str | Path) -> dict | None:
    """``folder/slimsd.json`` (None when absent, e.g. a run that did not finish)."""
    p = Path(folder) / "slimsd.json"
    return json.loads(p.read_text()) if p.is_file() else None
