"""Checkpoints of a training run: ``OUT.work/checkpoint-{step}`` folders and what they hold.

``accelerator.save_state`` writes the model, optimizer, lr scheduler, RNG states and EMA; the
:class:`TrainState` registered with it adds the step, the loss log, the periodic evaluations and
the timers. A checkpoint is written as ``.checkpoint-{step}.tmp`` and renamed, so a kill at any
moment leaves only complete ``checkpoint-*`` folders.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from slimsd.compress.train.config import RESUME_KEYS
from slimsd.compress.train.objectives import LOG_KEYS


class TrainState:
    """Checkpointed with the model/optimizer (accelerator.register_for_checkpointing).

    ``log_keys`` / ``resume_keys``: the loss terms logged and the settings a resume must not
    change; by default the training stages' (``slimsd compress decoder`` passes its own)."""

    def __init__(self, config: dict, log_keys: tuple[str, ...] = LOG_KEYS, resume_keys: tuple[str, ...] = RESUME_KEYS):
        self.step, self.log, self.evals, self.train_s, self.config = 0, [], [], 0.0, config
        self.log_keys, self.resume_keys = tuple(log_keys), tuple(resume_keys)
        self.compute_s = 0.0  # seconds spent in optimisation steps (no evaluation / checkpoint time), all runs
        self.window = torch.zeros(2, len(self.log_keys), dtype=torch.float64)  # (sum, count) per key since the last log row

    def state_dict(self) -> dict:
        return {"step": self.step, "log": self.log, "evals": self.evals, "train_s": self.train_s, "config": self.config,
                "window": self.window.clone(), "compute_s": self.compute_s}

    def load_state_dict(self, d: dict) -> None:
        changed = {k: (d["config"].get(k), self.config.get(k)) for k in self.resume_keys
                   if d["config"].get(k) != self.config.get(k)}
        if changed:
            raise ValueError(f"cannot resume: the checkpoint was made with other settings {changed} "
                             "(use a new --out / --work-dir, or the checkpoint's settings)")
        self.step, self.log, self.evals, self.train_s = d["step"], d["log"], d["evals"], d["train_s"]
        self.window = d["window"].clone()
        self.compute_s = d.get("compute_s", 0.0)


def list_checkpoints(work: Path) -> list[Path]:
    """Complete ``checkpoint-{step}`` folders, oldest first (half-written ``.tmp`` ones are ignored)."""
    if not work.is_dir():
        return []
    found = [p for p in work.iterdir() if p.is_dir() and p.name.startswith("checkpoint-") and p.name[11:].isdigit()]
    return sorted(found, key=lambda p: int(p.name[11:]))


def find_checkpoint(spec: str | None, work: Path) -> Path | None:
    if not spec:
        return None
    if spec == "latest":
        found = list_checkpoints(work)
        return found[-1] if found else None
    p = Path(spec)
    if not p.is_dir():
        p = work / spec
    if not p.is_dir():
        raise FileNotFoundError(f"--resume-from-checkpoint {spec}: no such checkpoint folder (looked in {work})")
    return p


def save_checkpoint(accelerator, work: Path, step: int, keep: int) -> Path:
    """``accelerator.save_state`` into ``.checkpoint-{step}.tmp``, then an atomic rename to
    ``checkpoint-{step}``: a kill at any moment never leaves a half checkpoint under that name.

    Not ``slimsd.io.atomic_dir``: every process writes its part of the checkpoint (its RNG
    states) into the same temporary folder, so its name must not depend on the process."""
    final, tmp = work / f"checkpoint-{step}", work / f".checkpoint-{step}.tmp"
    if accelerator.is_main_process and tmp.exists():
        shutil.rmtree(tmp)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        (tmp / "step.json").write_text(json.dumps({"step": step}))
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)
        if keep > 0:
            for old in list_checkpoints(work)[:-keep]:
                shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final
