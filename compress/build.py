"""The whole compression chain from one config file:

    sensitivity (paper §3.1) -> prune -> stage 1 (§3.2) -> stage 2 (§3.3) -> OUT

    slimsd compress build configs/tiny-sd-slim.json

Config (JSON or YAML; every section but ``model`` / ``out`` optional)::

    {
      "model": "tiny-sd",                       # the teacher: preset, folder or hub id
      "out": "slimsd/assets/tiny-sd-slim",      # the final pipeline folder
      "work_dir": "runs/tiny-sd-slim.build",    # intermediate stages (default OUT.build)
      "sensitivity": {"steps": 25, "num_prompts": 64},   # SensitivityConfig fields, or {"report": "path.json"}
      "prune": {"policy": "sensitivity", "keep_params": 0.54},  # or {"preset": "bk-small"} / {"blocks": [...]}
      "stage1": {"max_steps": 600, "learning_rate": 5e-4},     # TrainConfig fields
      "stage2": {"max_steps": 600, "student_steps": 8},        # or null: stop after stage 1
      "evaluate": {"num_prompts": 256}                         # final scoring at the model's defaults
    }

Each stage writes its folder under ``work_dir`` and records a fingerprint of its settings and of
everything upstream in ``work_dir/build_state.json``. A rerun skips every stage whose output is
complete and whose fingerprint is unchanged, and resumes a killed training stage from its last
checkpoint; a changed section reruns that stage and everything after it. The final folder is a
complete diffusers pipeline (ready for ``slimsd export onnx``) with ``slimsd.json`` and a
``manifest.json`` holding the plan, parameter counts, default steps, metrics, the sha256 of every
file and the command of every stage.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from dataclasses import asdict
from pathlib import Path

SECTIONS = ("model", "out", "work_dir", "sensitivity", "prune", "stage1", "stage2", "evaluate", "seed")


def load_build_config(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"build config {path} does not exist")
    text = path.read_text()
    if path.suffix.lower() in (".yaml", ".yml"):
        try:
            import yaml
        except ImportError as e:  # pragma: no cover - PyYAML is almost always there
            raise ValueError("YAML configs need PyYAML (pip install pyyaml), or write the config as JSON") from e
        cfg = yaml.safe_load(text)
    else:
        try:
            cfg = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON ({e})") from e
    if not isinstance(cfg, dict):
        raise ValueError(f"{path}: the config must be a mapping")
    return cfg


def _validate(cfg: dict) -> None:
    unknown = sorted(set(k for k in cfg if not k.startswith("_")) - set(SECTIONS))
    if unknown:
        raise ValueError(f"unknown build config section(s) {unknown}; known: {list(SECTIONS)}")
    for k in ("model", "out"):
        if not cfg.get(k):
            raise ValueError(f"build config needs {k!r}")
    if not cfg.get("stage1"):
        raise ValueError("build config needs a 'stage1' section (training options, may be {})")
    prune = cfg.get("prune") or {}
    if not prune:
        raise ValueError("build config needs a 'prune' section: {'preset': ...}, {'blocks': [...]} or a budget")
    if not any(k in prune for k in ("preset", "blocks")) and not cfg.get("sensitivity"):
        raise ValueError("prune by budget needs a 'sensitivity' section (settings, or {'report': PATH})")


def _sha(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _state_rw(work: Path):
    path = work / "build_state.json"
    state = json.loads(path.read_text()) if path.is_file() else {}

    def save():
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(state, indent=2))
        tmp.replace(path)

    return state, save


def _argv(d: dict, skip=()) -> str:
    """CLI flags for a dict of options (how the stage would be run by hand)."""
    parts = []
    for k, v in d.items():
        if k in skip or v is None or v is False:
            continue
        flag = "--" + k.replace("_", "-")
        if v is True:
            parts.append(flag)
        elif isinstance(v, (list, tuple)):
            parts.append(f"{flag} {','.join(map(str, v))}")
        else:
            parts.append(f"{flag} {v}")
    return " ".join(parts)


def _is_main() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def _state():
    """Process-group state under ``accelerate launch``; None for one process."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        from accelerate import PartialState

        return PartialState()
    return None


def _barrier():
    st = _state()
    if st is not None:
        st.wait_for_everyone()


def build(cfg: dict, force: bool = False, config_path: str | None = None) -> dict:
    """Run the chain; returns ``{"out", "stages": [{"stage", "status", "out", "seconds"}], ...}``."""
    from slimsd.compress.prune import PRESETS, plan_pruning, prune_pipeline, unet_block_costs
    from slimsd.compress.sensitivity import SensitivityConfig, run_sensitivity
    from slimsd.compress.train import TrainConfig, config_from_dict, read_slimsd_json, train
    from slimsd.manifest import write_manifest

    _validate(cfg)
    model, out = str(cfg["model"]), Path(cfg["out"])
    work = Path(cfg.get("work_dir") or out.with_name(out.name + ".build"))
    work.mkdir(parents=True, exist_ok=True)
    state, save_state = _state_rw(work)
    stages, commands = [], []
    upstream = _sha({"model": model})
    rerun = force  # once a stage reruns, every later stage reruns

    def record(name, status, folder, t0, **extra):
        stages.append({"stage": name, "status": status, "out": str(folder), "seconds": round(time.time() - t0, 1), **extra})

    def done(name, sha, folder_ok) -> bool:
        return not rerun and state.get(name, {}).get("sha") == sha and folder_ok

    # --- 1. sensitivity -------------------------------------------------------------------
    sens_cfg = dict(cfg.get("sensitivity") or {})
    report_path = None
    if sens_cfg.get("report"):
        report_path = Path(sens_cfg["report"])
        if not report_path.is_file():
            raise FileNotFoundError(f"sensitivity report {report_path} does not exist")
        upstream = _sha([upstream, "report", hashlib.sha256(report_path.read_bytes()).hexdigest()])
        record("sensitivity", "given", report_path, time.time())
        commands.append(f"# sensitivity report given: {report_path}")
    elif sens_cfg:
        t0 = time.time()
        sens_dir = work / "sensitivity"
        sc = SensitivityConfig(model=model, out=str(sens_dir), **sens_cfg)
        sha = _sha([upstream, {k: v for k, v in asdict(sc).items() if k != "out"}])
        report_path = sens_dir / "sensitivity.json"
        commands.append(f"slimsd compress sensitivity {model} --out {sens_dir} " + _argv(sens_cfg))
        if done("sensitivity", sha, report_path.is_file()):
            record("sensitivity", "skipped", sens_dir, t0)
        else:
            if state.get("sensitivity", {}).get("sha") != sha and sens_dir.exists() and _is_main():
                shutil.rmtree(sens_dir)  # other settings: the per-block results cannot be reused
            _barrier()
            run_sensitivity(sc, _state())  # resumable per block
            _barrier()
            state["sensitivity"] = {"sha": sha, "report": str(report_path)}
            if _is_main():
                save_state()
            rerun = True
            record("sensitivity", "ran", sens_dir, t0)
        upstream = sha

    # --- 2. prune ---------------------------------------------------------------------------
    t0 = time.time()
    prune_cfg = dict(cfg["prune"])
    if "preset" in prune_cfg:
        if prune_cfg["preset"] not in PRESETS:
            raise ValueError(f"prune preset must be one of {sorted(PRESETS)}, got {prune_cfg['preset']!r}")
        plan = {"preset": prune_cfg["preset"], "removed_blocks": PRESETS[prune_cfg["preset"]]}
        prune_cmd = f"--preset {prune_cfg['preset']}"
    elif "blocks" in prune_cfg:
        plan = {"removed_blocks": list(prune_cfg["blocks"])}
        prune_cmd = f"--blocks {','.join(plan['removed_blocks'])}"
    else:
        report = json.loads(report_path.read_text())
        policy = prune_cfg.get("policy", "sensitivity")
        need_latency = policy == "sensitivity-per-ms" or prune_cfg.get("target_latency_ms") is not None
        params, lat, total, total_ms = unet_block_costs(model, need_latency, prune_cfg.get("latent_size"))
        tp = prune_cfg.get("target_params")
        plan = plan_pruning(report, policy, keep_params=prune_cfg.get("keep_params"),
                            target_params=int(float(tp)) if tp is not None else None,
                            target_latency_ms=prune_cfg.get("target_latency_ms"), latency_ms=lat or None, params=params,
                            total_params=total, total_latency_ms=total_ms, tolerance=prune_cfg.get("tolerance", 0.02))
        if not plan["met"]:
            raise ValueError(f"the pruning budget {plan['budget']} cannot be met with the removable blocks")
        plan["sensitivity_report"] = str(report_path)
        prune_cmd = f"--report {report_path} " + _argv(prune_cfg)
    pruned_dir = work / "pruned"
    sha = _sha([upstream, plan["removed_blocks"]])
    commands.append(f"slimsd compress prune {model} --out {pruned_dir} {prune_cmd}")
    if done("prune", sha, (pruned_dir / "prune_plan.json").is_file()):
        record("prune", "skipped", pruned_dir, t0)
    else:
        if _is_main():
            prune_pipeline(model, plan["removed_blocks"], pruned_dir, plan)
            state["prune"] = {"sha": sha}
            save_state()
        _barrier()
        rerun = True
        record("prune", "ran", pruned_dir, t0)
    upstream = sha
    final_plan = json.loads((pruned_dir / "prune_plan.json").read_text())

    # --- 3./4. training stages ----------------------------------------------------------------
    base_seed = cfg.get("seed")
    prev = pruned_dir
    last = None
    for stage in (1, 2):
        section = cfg.get(f"stage{stage}")
        if not section and stage == 2:
            break
        t0 = time.time()
        folder = work / f"stage{stage}"
        opts = dict(section)
        for k in ("stage", "student", "teacher", "out"):
            if k in opts:
                raise ValueError(f"stage{stage}.{k} is set by the build (student/teacher/out come from the chain)")
        if base_seed is not None:
            opts.setdefault("seed", base_seed)
        # stage 1: pruned student, unpruned teacher; stage 2: the stage-1 student is both
        teacher = model if stage == 1 else str(prev)
        tc = config_from_dict({"stage": stage, "student": str(prev), "teacher": teacher, "out": str(folder),
                               "resume_from_checkpoint": "latest", **opts})
        sha = _sha([upstream, {k: v for k, v in asdict(tc).items() if k not in ("resume_from_checkpoint", "threads", "report_to")}])
        commands.append(f"slimsd compress train --stage {stage} --student {prev} --teacher {teacher} --out {folder} "
                        + _argv(opts) + " --resume-from-checkpoint latest")
        info = read_slimsd_json(folder)
        if done(f"stage{stage}", sha, bool(info and info.get("complete"))):
            record(f"stage{stage}", "skipped", folder, t0)
        else:
            if state.get(f"stage{stage}", {}).get("sha") != sha and _is_main():
                # other settings or upstream: stale checkpoints must not be resumed
                for p in (folder, folder.with_name(folder.name + ".work")):
                    if p.exists():
                        shutil.rmtree(p)
            _barrier()
            train(tc)
            state[f"stage{stage}"] = {"sha": sha}
            if _is_main():
                save_state()
            rerun = True
            record(f"stage{stage}", "ran", folder, t0)
        upstream = sha
        prev = last = folder

    # --- 5. final folder --------------------------------------------------------------------
    t0 = time.time()
    ev = dict(cfg.get("evaluate") or {})
    sha = _sha([upstream, ev, str(out)])
    if done("final", sha, (out / "manifest.json").is_file() and (out / "slimsd.json").is_file()):
        record("final", "skipped", out, t0)
        return {"out": str(out), "stages": stages, "work_dir": str(work)}
    if _is_main():
        tmp = out.with_name(out.name + ".tmp")
        if tmp.exists():
            shutil.rmtree(tmp)
        out.parent.mkdir(parents=True, exist_ok=True)
        shutil.copytree(last, tmp)
        shutil.rmtree(tmp / "eval", ignore_errors=True)  # stage evaluations stay in work_dir
        info = json.loads((tmp / "slimsd.json").read_text())
        defaults = info["defaults"]
        metrics = {}
        if ev.get("num_prompts", 0) > 0:
            from slimsd.evaluator import evaluate

            settings = ev.get("settings") or [[defaults["steps"], defaults["guidance"]]]
            for steps, guidance in settings:
                tag = f"steps{steps}_cfg{guidance:g}"
                r = evaluate(str(tmp), steps=int(steps), guidance=float(guidance), num_prompts=int(ev["num_prompts"]),
                             seed=int(ev.get("seed", 0)), out=tmp / "eval" / tag)
                metrics[tag] = {k: r[k] for k in ("fd", "alignment", "attribute_accuracy", "wall_time_s")}
        stage_records = {}
        for stage in (1, 2):
            f = work / f"stage{stage}" / "training.json"
            if f.is_file() and (stage == 1 or cfg.get("stage2")):
                t = json.loads(f.read_text())
                stage_records[f"stage{stage}"] = {k: t[k] for k in ("config", "wall_time_s", "s_per_step", "final_loss", "command") if k in t}
                m = json.loads((work / f"stage{stage}" / "manifest.json").read_text()).get("metrics", {})
                stage_records[f"stage{stage}"]["metrics"] = m
        build_info = {
            "config": cfg, "config_file": str(config_path) if config_path else None,
            "commands": commands + [f"slimsd compress build {config_path or 'CONFIG'}"],
            "stages": stages, "work_dir": str(work), "stage_records": stage_records,
        }
        (tmp / "build.json").write_text(json.dumps(build_info, indent=2, default=str))
        write_manifest(tmp, model=out.name, source_model=model, prune_plan=final_plan, params=info["params"],
                       defaults=defaults, default_steps=defaults["steps"], default_guidance=defaults["guidance"],
                       metrics=metrics or json.loads((tmp / "manifest.json").read_text()).get("metrics", {}),
                       eval_protocol=(f"slimsd evaluate MODEL --steps S --guidance G --num-prompts {ev.get('num_prompts')} "
                                      f"--seed {ev.get('seed', 0)} (held-out scenes)") if metrics else None,
                       build=build_info)
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
        state["final"] = {"sha": sha}
        save_state()
    _barrier()
    record("final", "ran", out, t0)
    return {"out": str(out), "stages": stages, "work_dir": str(work)}
