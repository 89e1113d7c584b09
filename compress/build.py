"""The whole compression chain from one config file:

    sensitivity (paper §3.1) -> prune -> stage 1 (§3.2) -> stage 2 (§3.3) [-> decoder] -> OUT

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
      "decoder": {"max_steps": 3000},                          # DecoderConfig fields: a tiny VAE (docs/decoder.md)
      "evaluate": {"num_prompts": 256}                         # final scoring at the model's defaults
    }

Progressive distillation is a build without ``prune`` and ``stage1``: MODEL (an already distilled
student, e.g. ``tiny-sd-slim`` at 8 steps) is both the student and the teacher of stage 2, which
halves its steps again (``configs/tiny-sd-slim-4.json``: 8 -> 4).

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
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

from slimsd.io import atomic_dir, atomic_write_text

SECTIONS = ("model", "out", "work_dir", "sensitivity", "prune", "stage1", "stage2", "decoder", "evaluate", "seed")


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
    for k in ("prune", "stage1", "stage2", "decoder"):
        if k in cfg and cfg[k] is not None and not isinstance(cfg[k], dict):
            raise ValueError(f"build config section {k!r} must be a mapping or null, got {type(cfg[k]).__name__}")
    if cfg.get("stage1") is None and cfg.get("stage2") is None:
        raise ValueError("build config needs a 'stage1' and/or a 'stage2' section (training options, may be {})")
    prune = cfg.get("prune")
    if prune is None:
        if cfg.get("stage1") is not None:
            raise ValueError("build config: 'stage1' retrains a pruned student and needs a 'prune' section: "
                             "{'preset': ...}, {'blocks': [...]} or a budget (without 'prune' and 'stage1', "
                             "stage 2 distils MODEL itself: progressive distillation)")
        if cfg.get("sensitivity"):
            raise ValueError("build config: 'sensitivity' feeds 'prune', which is missing")
        return
    if not prune:
        raise ValueError("build config: 'prune' is empty: {'preset': ...}, {'blocks': [...]} or a budget")
    if not any(k in prune for k in ("preset", "blocks")) and not cfg.get("sensitivity"):
        raise ValueError("prune by budget needs a 'sensitivity' section (settings, or {'report': PATH})")


def _sha(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _state_rw(work: Path):
    path = work / "build_state.json"
    state = json.loads(path.read_text()) if path.is_file() else {}

    def save():
        atomic_write_text(path, json.dumps(state, indent=2))

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


@dataclass
class Stage:
    """One link of the chain: its output folder, its fingerprint (of its settings and of
    ``upstream``, the fingerprint of the stage before it) and how to make it."""

    name: str
    out: Path
    fingerprint: Callable[[str], str]
    complete: Callable[[], bool]  # the output is whole (a killed run leaves it incomplete)
    run: Callable[[], None] | None  # None: given (a report the config names), nothing to run
    command: str | None = None  # how the stage is run by hand, for the record
    main_only: bool = False  # run on the main process only, the others wait
    stale: tuple[Path, ...] = ()  # outputs of other settings, removed before a rerun (never resumed)
    record: dict = field(default_factory=dict)  # kept in build_state.json beside the fingerprint


def run_stages(stages: list[Stage], state: dict, save_state, upstream: str, force: bool, records: list) -> None:
    """The one caching rule: a stage is skipped when no stage before it ran, its fingerprint is
    the one recorded in ``build_state.json`` and its output is complete; otherwise it runs (its
    stale outputs removed first when the fingerprint changed), and so does every stage after it.
    Appends ``{"stage", "status", "out", "seconds"}`` to ``records`` as each stage ends."""
    rerun = force
    for st in stages:
        t0 = time.time()
        sha = upstream = st.fingerprint(upstream)
        if st.run is None:
            status = "given"
        elif not rerun and state.get(st.name, {}).get("sha") == sha and st.complete():
            status = "skipped"
        else:
            if state.get(st.name, {}).get("sha") != sha and _is_main():
                for p in st.stale:
                    if p.exists():
                        shutil.rmtree(p)
            # the fingerprint is recorded before the stage runs: a build killed inside it finds its
            # own fingerprint on the rerun, keeps the stage's work folder and resumes from the last
            # checkpoint (complete() still says the stage has to run)
            state[st.name] = {"sha": sha, "started": True}
            if _is_main():
                save_state()
            _barrier()
            if _is_main() or not st.main_only:
                st.run()
            _barrier()
            state[st.name] = {"sha": sha, **st.record}
            if _is_main():
                save_state()
            status, rerun = "ran", True
        records.append({"stage": st.name, "status": status, "out": str(st.out), "seconds": round(time.time() - t0, 1)})


def model_fingerprint(model: str) -> dict:
    """What every stage reads from the teacher: its name and the sha256 of each file of its
    components (the entries of ``model_index.json``), so new weights under the same name (a
    retrained preset, a fine-tuned decoder) rerun the whole chain; its eval/ samples do not count."""
    from slimsd.manifest import folder_hashes
    from slimsd.models import resolve_model

    folder = resolve_model(model)
    index = json.loads((folder / "model_index.json").read_text())
    components = {k for k, v in index.items() if not k.startswith("_") and isinstance(v, list)}
    files = {rel: digest for rel, digest in folder_hashes(folder).items()
             if rel == "model_index.json" or rel.split("/")[0] in components}
    return {"model": model, "files": files}


def build(cfg: dict, force: bool = False, config_path: str | None = None) -> dict:
    """Run the chain; returns ``{"out", "stages": [{"stage", "status", "out", "seconds"}], ...}``."""
    _validate(cfg)
    model, out = str(cfg["model"]), Path(cfg["out"])
    work = Path(cfg.get("work_dir") or out.with_name(out.name + ".build"))
    work.mkdir(parents=True, exist_ok=True)
    state, save_state = _state_rw(work)
    stages, report_path = _sensitivity_stages(cfg, model, work)
    if cfg.get("prune") is not None:
        stages.append(_prune_stage(cfg, model, work, report_path))
        first = work / "pruned"
    else:  # progressive distillation: MODEL is stage 2's student and teacher
        from slimsd.models import resolve_model

        first = resolve_model(model)
    stages += _training_stages(cfg, model, work, first)
    if cfg.get("decoder") is not None:  # after the last training stage: the U-Net's latents are final
        stages.append(_decoder_stage(cfg, work, stages[-1].out))
    records: list[dict] = []
    commands = [st.command for st in stages if st.command]
    stages.append(_final_stage(cfg, model, out, work, stages[-1].out, records, commands, config_path))
    run_stages(stages, state, save_state, _sha(model_fingerprint(model)), force, records)
    return {"out": str(out), "stages": records, "work_dir": str(work)}


# ---------------------------------------------------------------------------------------
# the stages
# ---------------------------------------------------------------------------------------
def _sensitivity_stages(cfg: dict, model: str, work: Path) -> tuple[list[Stage], Path | None]:
    """``([the sensitivity stage] or [], the report's path)``: a report named by the config is
    "given"; settings run ``slimsd compress sensitivity`` (resumable per block)."""
    from slimsd.compress.sensitivity import SensitivityConfig, run_sensitivity

    sens_cfg = dict(cfg.get("sensitivity") or {})
    if sens_cfg.get("report"):
        report_path = Path(sens_cfg["report"])
        if not report_path.is_file():
            raise FileNotFoundError(f"sensitivity report {report_path} does not exist")
        digest = hashlib.sha256(report_path.read_bytes()).hexdigest()
        return [Stage("sensitivity", report_path, lambda up: _sha([up, "report", digest]), report_path.is_file, None,
                      command=f"# sensitivity report given: {report_path}")], report_path
    if not sens_cfg:
        return [], None
    sens_dir = work / "sensitivity"
    sc = SensitivityConfig(model=model, out=str(sens_dir), **sens_cfg)
    settings = {k: v for k, v in asdict(sc).items() if k != "out"}
    report_path = sens_dir / "sensitivity.json"
    return [Stage("sensitivity", sens_dir, lambda up: _sha([up, settings]), report_path.is_file,
                  lambda: run_sensitivity(sc, _state()),
                  command=f"slimsd compress sensitivity {model} --out {sens_dir} " + _argv(sens_cfg),
                  stale=(sens_dir,), record={"report": str(report_path)})], report_path


def _prune_stage(cfg: dict, model: str, work: Path, report_path: Path | None) -> Stage:
    """The plan is made when the stage's turn comes (it reads the sensitivity report); its
    fingerprint is the removed blocks, so another budget that removes the same blocks is a skip."""
    from slimsd.compress.prune import plan_from_config, prune_pipeline

    prune_cfg = dict(cfg["prune"])
    pruned_dir = work / "pruned"
    plan: dict = {}

    def fingerprint(up: str) -> str:
        plan.update(plan_from_config(model, prune_cfg, report_path))
        if "met" in plan and not plan["met"]:
            raise ValueError(f"the pruning budget {plan['budget']} cannot be met with the removable blocks")
        return _sha([up, plan["removed_blocks"]])

    if "preset" in prune_cfg:
        flags = f"--preset {prune_cfg['preset']}"
    elif "blocks" in prune_cfg:
        flags = f"--blocks {','.join(prune_cfg['blocks'])}"
    else:
        flags = f"--report {report_path} " + _argv(prune_cfg)
    return Stage("prune", pruned_dir, fingerprint, (pruned_dir / "prune_plan.json").is_file,
                 lambda: prune_pipeline(model, plan["removed_blocks"], pruned_dir, plan),
                 command=f"slimsd compress prune {model} --out {pruned_dir} {flags}", main_only=True)


def _training_stages(cfg: dict, model: str, work: Path, first: Path) -> list[Stage]:
    """Stage 1: the pruned student FIRST, the unpruned teacher; stage 2: the stage-1 student is
    both (no stage 1: FIRST, MODEL itself, is both). A changed stage starts afresh; an unchanged,
    unfinished one resumes from its last checkpoint."""
    from slimsd.compress.train import config_from_dict, read_slimsd_json, train

    stages, prev = [], first
    for stage in (1, 2):
        section = cfg.get(f"stage{stage}")
        if section is None:
            continue
        folder = work / f"stage{stage}"
        opts = dict(section)
        for k in ("stage", "student", "teacher", "out"):
            if k in opts:
                raise ValueError(f"stage{stage}.{k} is set by the build (student/teacher/out come from the chain)")
        if cfg.get("seed") is not None:
            opts.setdefault("seed", cfg["seed"])
        teacher = model if stage == 1 else str(prev)
        tc = config_from_dict({"stage": stage, "student": str(prev), "teacher": teacher, "out": str(folder),
                               "resume_from_checkpoint": "latest", **opts})
        settings = {k: v for k, v in asdict(tc).items() if k not in ("resume_from_checkpoint", "threads", "report_to")}
        stages.append(Stage(
            f"stage{stage}", folder, lambda up, s=settings: _sha([up, s]),
            lambda f=folder: bool((read_slimsd_json(f) or {}).get("complete")), lambda tc=tc: train(tc),
            command=f"slimsd compress train --stage {stage} --student {prev} --teacher {teacher} --out {folder} "
                    + _argv(opts) + " --resume-from-checkpoint latest",
            stale=(folder, folder.with_name(folder.name + ".work"))))
        prev = folder
    return stages


def _decoder_stage(cfg: dict, work: Path, last: Path) -> Stage:
    """The tiny VAE of the last training stage's folder (``slimsd compress decoder``): its folder
    is that one with ``vae/`` replaced; unchanged settings and input skip it, an unfinished run
    resumes from its last checkpoint."""
    from slimsd.compress.decoder import config_from_dict, distil_decoder
    from slimsd.compress.train import read_slimsd_json

    opts = dict(cfg["decoder"])
    for k in ("model", "out", "work_dir"):
        if k in opts:
            raise ValueError(f"decoder.{k} is set by the build (the source is the last training stage)")
    if cfg.get("seed") is not None:
        opts.setdefault("seed", cfg["seed"])
    folder = work / "decoder"
    dc = config_from_dict({"model": str(last), "out": str(folder), "resume_from_checkpoint": "latest", **opts})
    settings = {k: v for k, v in asdict(dc).items() if k not in ("resume_from_checkpoint", "threads", "report_to")}
    return Stage("decoder", folder, lambda up: _sha([up, settings]),
                 lambda: "decoder" in (read_slimsd_json(folder) or {}), lambda: distil_decoder(dc),
                 command=f"slimsd compress decoder {last} --out {folder} " + _argv(opts) + " --resume-from-checkpoint latest",
                 stale=(folder, folder.with_name(folder.name + ".work")))


def _final_stage(cfg: dict, model: str, out: Path, work: Path, last: Path, records: list, commands: list,
                 config_path: str | None) -> Stage:
    ev = dict(cfg.get("evaluate") or {})
    return Stage("final", out, lambda up: _sha([up, ev, str(out)]),
                 lambda: (out / "manifest.json").is_file() and (out / "slimsd.json").is_file(),
                 lambda: _write_final(cfg, model, out, work, last, ev, records, commands, config_path),
                 main_only=True)


def _write_final(cfg: dict, model: str, out: Path, work: Path, last: Path, ev: dict, records: list,
                 commands: list, config_path: str | None) -> None:
    """OUT: a copy of the last stage's folder, scored, with ``build.json`` and the whole record
    in ``manifest.json``; written to a temporary folder and renamed (slimsd.io.atomic_dir)."""
    from slimsd.manifest import write_manifest

    plan_file = work / "pruned" / "prune_plan.json" if cfg.get("prune") is not None else last / "prune_plan.json"
    final_plan = json.loads(plan_file.read_text()) if plan_file.is_file() else None  # None: MODEL was never pruned
    with atomic_dir(out) as tmp:
        shutil.copytree(last, tmp, dirs_exist_ok=True)
        shutil.rmtree(tmp / "eval", ignore_errors=True)  # stage evaluations stay in work_dir
        info = json.loads((tmp / "slimsd.json").read_text())
        defaults = info["defaults"]
        metrics = _final_metrics(tmp, ev, defaults)
        build_info = {
            "config": cfg, "config_file": str(config_path) if config_path else None,
            "commands": commands + [f"slimsd compress build {config_path or 'CONFIG'}"],
            "stages": list(records), "work_dir": str(work), "stage_records": _stage_records(cfg, work),
        }
        (tmp / "build.json").write_text(json.dumps(build_info, indent=2, default=str))
        write_manifest(tmp, model=out.name, source_model=model, prune_plan=final_plan, params=info["params"],
                       defaults=defaults, default_steps=defaults["steps"], default_guidance=defaults["guidance"],
                       metrics=metrics or json.loads((tmp / "manifest.json").read_text()).get("metrics", {}),
                       eval_protocol=(f"slimsd evaluate MODEL --steps S --guidance G --num-prompts "
                                      f"{ev.get('num_prompts')} --seed {ev.get('seed', 0)} (held-out scenes)")
                       if metrics else None,
                       build=build_info)


def _final_metrics(folder: Path, ev: dict, defaults: dict) -> dict:
    """Scores of ``folder`` at each ``evaluate.settings`` [steps, guidance] (default: its defaults)."""
    if ev.get("num_prompts", 0) <= 0:
        return {}
    from slimsd.evaluator import evaluate

    metrics = {}
    for steps, guidance in ev.get("settings") or [[defaults["steps"], defaults["guidance"]]]:
        tag = f"steps{steps}_cfg{guidance:g}"
        r = evaluate(str(folder), steps=int(steps), guidance=float(guidance), num_prompts=int(ev["num_prompts"]),
                     seed=int(ev.get("seed", 0)), out=folder / "eval" / tag)
        metrics[tag] = {k: r[k] for k in ("fd", "fd_ci", "fd_floor", "alignment", "alignment_ci", "objects", "objects_ci",
                                          "order", "attribute_accuracy", "wall_time_s") if k in r}
    return metrics


def _stage_records(cfg: dict, work: Path) -> dict:
    """Each training stage's config, timings, final loss, command and metrics; the decoder stage's
    config, timings, final loss, command and final check."""
    records = {}
    for stage in (1, 2):
        f = work / f"stage{stage}" / "training.json"
        if f.is_file() and cfg.get(f"stage{stage}") is not None:
            t = json.loads(f.read_text())
            records[f"stage{stage}"] = {k: t[k] for k in ("config", "wall_time_s", "s_per_step", "final_loss", "command") if k in t}
            records[f"stage{stage}"]["metrics"] = json.loads((work / f"stage{stage}" / "manifest.json").read_text()).get("metrics", {})
    f = work / "decoder" / "decoder.json"
    if f.is_file() and cfg.get("decoder") is not None:
        t = json.loads(f.read_text())
        records["decoder"] = {k: t[k] for k in ("config", "wall_time_s", "s_per_step", "final_loss", "command", "check",
                                                "vae_params") if k in t}
    return records
