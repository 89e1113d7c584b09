"""The paper's Table 1 in miniature, on ``tiny-sd`` (issue 4).

    python benchmarks/table1.py            # full: writes benchmarks/results/table1.md
    python benchmarks/table1.py --quick    # minutes: proves the chain; writes benchmarks/results/table1-quick.md

Rows (the paper's, plus the issue's ablations), every model scored with the scene evaluator on
held-out prompts (FD plays FID, alignment plays CLIP score), guidance 7.5:

====================================  =========================================================
teacher (tiny-sd)                     at 25, 8, 4 and 2 DDIM steps
BK-SDM-style                          BK-SDM-Base removals (``bk-base``), retrained with
                                      L_Diff + L_OutKD + BK-SDM's feature KD, the same steps and
                                      batch as ours; at 25 and 8 steps
ours, stage 1                         sensitivity-pruned to ``--keep-params`` (the paper: 54%),
                                      CFG-aware retraining (L_Diff + L_OutKD + L_CfgKD); 25 steps
ours, stage 1 without L_CfgKD         the ablation (same student, same budget); 25 steps
ours, stage 2                         step-distilled from our stage 1 to 8 steps; at 8
ours, stage 2 to 4 / to 2 steps       the same distillation to 4 and 2 steps; at 4 / 2
====================================  =========================================================

Columns: parameters (total, U-Net), FD, alignment, seconds per image (batch 1 with CFG, the
mean of ``--time-images`` generations after one warm-up, on this machine). The stage-1 runs
also log FD / alignment every ``--stage1-steps / 4`` steps: the "recovery" table shows whether
L_CfgKD speeds recovery.

Everything lands in ``--work`` (default runs/table1): each training run resumes from its
checkpoints and each finished run or evaluation is reused, so a killed run continues where it
stopped.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch

RESULTS = Path(__file__).parent / "results"
GUIDANCE = 7.5


def machine() -> str:
    from slimsd.hardware import cpu_model_and_flags

    cpu = cpu_model_and_flags()[0]
    gpu = f", {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else ""
    return f"{cpu}, {torch.get_num_threads()} threads{gpu}, torch {torch.__version__}"


CONFIG = Path(__file__).parents[1] / "configs" / "tiny-sd-slim.json"


def build_config(a, work: Path) -> dict:
    """Ours = exactly ``slimsd compress build configs/tiny-sd-slim.json`` (the committed preset).

    Quick mode shrinks every budget and writes to WORK instead of slimsd/assets.
    """
    cfg = json.loads(Path(a.config).read_text())
    if a.quick:
        cfg.update(out=str(work / "tiny-sd-slim-quick"), work_dir=str(work / "tiny-sd-slim-quick.build"),
                   sensitivity=dict(steps=2, num_prompts=4, batch_size=8,
                                    blocks=["up.3.attn.2", "mid.attn.0", "down.0.attn.1", "up.1.attn.2", "down.1.attn.1"]),
                   prune={"policy": "sensitivity", "keep_params": 0.96},
                   evaluate={"num_prompts": 8, "settings": [[8, GUIDANCE]]})
        small = dict(max_steps=2, batch_size=4, num_latents=64, checkpointing_steps=1, eval_steps=1, eval_prompts=4,
                     final_eval_prompts=0)
        cfg["stage1"] = {**cfg["stage1"], **small}
        cfg["stage2"] = {**cfg["stage2"], **small}
    if a.threads:  # a machine setting: not part of any fingerprint, so the CLI build reuses these runs
        for k in ("stage1", "stage2"):
            cfg[k] = {**cfg[k], "threads": a.threads}
    return cfg


def settings(a, cfg: dict) -> dict:
    """Scoring budgets (training budgets come from the build config)."""
    if a.quick:
        return dict(eval_prompts=8, time_images=1)
    return dict(eval_prompts=a.eval_prompts, time_images=a.time_images)


def wait_for(path: Path, log, poll_s: float = 30.0) -> None:
    """Block until another process (``--part ours``) has written PATH: the pruned student's plan, or a
    training folder's ``slimsd.json`` marked complete."""
    def ready() -> bool:
        if path.name.endswith(".json"):
            return path.is_file()
        f = path / "slimsd.json"
        return f.is_file() and bool(json.loads(f.read_text()).get("complete"))

    if not ready():
        log(f"waiting for {path} (made by the other part)")
        while not ready():
            time.sleep(poll_s)


def ensure_trained(cfg, log) -> Path:
    """Train unless OUT already holds a finished run of exactly this config (then reuse it)."""
    from slimsd.compress.train import config_sha, read_slimsd_json, resolve_config, train

    info = read_slimsd_json(cfg.out)
    if info and info.get("complete") and info.get("config_sha") == config_sha(resolve_config(cfg)):
        log(f"reuse {cfg.out}")
        return Path(cfg.out)
    log(f"train stage {cfg.stage} -> {cfg.out}")
    return train(cfg)


def seconds_per_image(folder: str, steps: int, n: int) -> float:
    from slimsd.models import load_pipeline

    pipe = load_pipeline(folder)
    prompt = "a red circle left of a blue square"
    pipe(prompt, num_inference_steps=steps, guidance_scale=GUIDANCE, generator=torch.Generator().manual_seed(0))  # warm-up
    t0 = time.perf_counter()
    for i in range(n):
        pipe(prompt, num_inference_steps=steps, guidance_scale=GUIDANCE, generator=torch.Generator().manual_seed(i + 1))
    return (time.perf_counter() - t0) / n


def score(folder: str, steps: int, s: dict, work: Path, tag: str, log) -> dict:
    """FD / alignment / s per image of one row, cached in WORK/eval/TAG.json."""
    from slimsd.evaluator import evaluate
    from slimsd.models import load_pipeline

    f = work / "eval" / f"{tag}.json"
    key = {"folder": str(folder), "steps": steps, "prompts": s["eval_prompts"], "time_images": s["time_images"]}
    if f.is_file():
        r = json.loads(f.read_text())
        if r.get("key") == key:
            return r
    log(f"evaluate {tag}")
    r = evaluate(folder, steps=steps, guidance=GUIDANCE, num_prompts=s["eval_prompts"], seed=0, out=work / "eval" / tag)
    pipe = load_pipeline(folder)
    unet = sum(p.numel() for p in pipe.unet.parameters())
    total = unet + sum(p.numel() for p in pipe.vae.parameters()) + sum(p.numel() for p in pipe.text_encoder.parameters())
    row = {"key": key, "fd": r["fd"], "alignment": r["alignment"], "params_total": total, "params_unet": unet,
           "s_per_image": seconds_per_image(folder, steps, s["time_images"])}
    f.parent.mkdir(parents=True, exist_ok=True)
    f.write_text(json.dumps(row, indent=2))
    return row


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="a few steps and prompts: checks the chain, numbers mean nothing")
    ap.add_argument("--config", default=str(CONFIG), help="the build config of ours (default configs/tiny-sd-slim.json); "
                    "its stage-1 / stage-2 settings are the budget of every run")
    ap.add_argument("--work", default=None, help="default runs/table1 (runs/table1-quick with --quick)")
    ap.add_argument("--out", default=None, help="default benchmarks/results/table1.md (table1-quick.md with --quick)")
    ap.add_argument("--part", choices=("all", "ours", "others"), default="all",
                    help="ours: the build + 4-step student; others: baselines, ablation, 2-step student, teacher rows. "
                         "Run both at once (1 thread each) on a 2-core machine, then `all` writes the table from the cache")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (1: fastest for tiny-sd on a busy 2-core "
                    "machine, see docs/training.md; 0: torch's default)")
    ap.add_argument("--eval-prompts", type=int, default=256)
    ap.add_argument("--time-images", type=int, default=8)
    ap.add_argument("--bk-preset", default="bk-base", help="the BK-SDM-style baseline's removals (paper: BK-SDM v2 base)")
    a = ap.parse_args(argv)

    from slimsd.compress.build import build
    from slimsd.compress.prune import PRESETS, prune_pipeline
    from slimsd.compress.train import config_from_dict

    t_start = time.time()
    if a.threads:
        torch.set_num_threads(a.threads)
    work = Path(a.work or ("runs/table1-quick" if a.quick else "runs/table1"))
    out_md = Path(a.out or RESULTS / ("table1-quick.md" if a.quick else "table1.md"))
    work.mkdir(parents=True, exist_ok=True)
    cfg = build_config(a, work)
    s = settings(a, cfg)
    ours_work, ours_final = Path(cfg["work_dir"]), Path(cfg["out"])
    ours_s1 = ours_work / "stage1"
    do_ours, do_others = a.part in ("all", "ours"), a.part in ("all", "others")

    def log(msg):
        print(f"[table1 {a.part} {time.time() - t_start:7.0f}s] {msg}", file=sys.stderr, flush=True)

    def run_cfg(section: str, **over):
        d = {k: v for k, v in cfg[section].items()}
        d.update(resume_from_checkpoint="latest", report_to="none", final_eval_prompts=0, **over)
        return config_from_dict(d)

    # --- ours: the build chain (sensitivity report -> prune -> stage 1 -> stage 2 to 8 steps) ----
    if do_ours:
        log(f"slimsd compress build {a.config} -> {ours_final}")
        build(cfg, config_path=a.config)

    # --- the baseline: BK-SDM's removals, KD-retrained with the same stage-1 budget ---------------
    bk_pruned = work / f"{a.bk_preset}-pruned"
    if do_others and not (bk_pruned / "prune_plan.json").is_file():
        prune_pipeline(cfg["model"], PRESETS[a.bk_preset], bk_pruned, {"preset": a.bk_preset})
    runs = {
        "ours_s1": None,  # the build's stage 1
        "ablation_s1": run_cfg("stage1", stage=1, student=str(ours_work / "pruned"), teacher=cfg["model"],
                               out=str(work / "ours-stage1-no-cfgkd"), lambda_cfg_kd=0.0),
        "bk_s1": run_cfg("stage1", stage=1, student=str(bk_pruned), teacher=cfg["model"], out=str(work / "bk-sdm-style"),
                         lambda_cfg_kd=0.0, lambda_feat_kd=1.0),
    }
    for n in (4, 2):  # stage 2 from our stage 1 to fewer steps
        runs[f"ours_s2_{n}"] = run_cfg("stage2", stage=2, student=str(ours_s1), teacher=str(ours_s1),
                                       out=str(work / f"ours-stage2-{n}steps"), student_steps=n)
    mine = {"ours": ["ours_s2_4"], "others": ["ablation_s1", "bk_s1", "ours_s2_2"],
            "all": ["ablation_s1", "bk_s1", "ours_s2_4", "ours_s2_2"]}[a.part]
    for key in mine:
        if key == "ablation_s1":  # the same pruned student as ours
            wait_for(ours_work / "pruned" / "prune_plan.json", log)
        elif key.startswith("ours_s2"):  # distilled from our stage 1
            wait_for(ours_s1, log)
        ensure_trained(runs[key], log)

    # --- scoring ------------------------------------------------------------------------------------
    rows = [
        ("tiny-sd (teacher)", 25, "tiny-sd", "teacher25", "others"),
        ("tiny-sd (teacher)", 8, "tiny-sd", "teacher8", "others"),
        (f"BK-SDM-style ({a.bk_preset} + KD retraining)", 25, runs["bk_s1"].out, "bk25", "others"),
        (f"BK-SDM-style ({a.bk_preset} + KD retraining)", 8, runs["bk_s1"].out, "bk8", "others"),
        ("ours pruned, no retraining", 25, ours_work / "pruned", "ours_pruned25", "others"),
        ("Ours (pruned w. fine-tuning, stage 1)", 25, ours_s1, "ours_s1_25", "ours"),
        ("**Ours (pruned w. fine-tuning + step distill.) = `tiny-sd-slim`**", 8, ours_final, "ours_s2_8", "ours"),
        ("ablation: ours stage 1 without L_CfgKD", 25, runs["ablation_s1"].out, "ablation25", "others"),
        ("tiny-sd (teacher)", 4, "tiny-sd", "teacher4", "others"),
        ("ours, stage 2 distilled to 4 steps", 4, runs["ours_s2_4"].out, "ours_s2_4", "ours"),
        ("tiny-sd (teacher)", 2, "tiny-sd", "teacher2", "others"),
        ("ours, stage 2 distilled to 2 steps", 2, runs["ours_s2_2"].out, "ours_s2_2", "others"),
    ]
    results = []
    for name, steps, folder, tag, part in rows:
        if a.part in ("all", part):
            results.append((name, steps, score(str(folder), steps, s, work, tag, log)))
    if a.part != "all":
        log(f"part {a.part} done; run `python benchmarks/table1.py` (part all) to write the table")
        return 0
    plan = json.loads((ours_work / "pruned" / "prune_plan.json").read_text())
    s1 = cfg["stage1"]
    lr = s1.get("learning_rate")

    # --- the note -------------------------------------------------------------------------------
    folders = {k: Path(v.out) for k, v in runs.items() if v is not None}
    folders.update(ours_s1=ours_s1, ours_s2_8=ours_work / "stage2")

    def train_info(key):
        return json.loads((folders[key] / "training.json").read_text())

    cmd = "python benchmarks/table1.py " + " ".join(shlex.quote(x) for x in (argv if argv is not None else sys.argv[1:]))
    lines = [
        "# Table 1 in miniature (tiny-sd)" + (" — QUICK MODE: a smoke run, the numbers mean nothing" if a.quick else ""),
        "",
        f"Command: `{cmd.strip()}`  ",
        f"Machine: {machine()}  ",
        f"Wall time of this command: {(time.time() - t_start) / 60:.1f} min (runs and scores reused from `{work}` are not "
        "counted again: training times per run are at the end)",
        "",
        f"Scores: {s['eval_prompts']} held-out prompts (`slimsd evaluate MODEL --steps S --guidance {GUIDANCE} "
        f"--num-prompts {s['eval_prompts']} --seed 0`), FD lower is better, alignment higher is better. "
        f"s/image: batch 1 with CFG, mean of {s['time_images']} after a warm-up.",
        "",
        f"Training (`{a.config}`): AdamW lr {lr:g}, batch {s1.get('batch_size', 64)}; stage 1 {s1['max_steps']} steps for "
        f"each of ours, the ablation and the BK-SDM-style baseline; stage 2 {cfg['stage2']['max_steps']} steps from our "
        f"stage 1 (lr {cfg['stage2'].get('learning_rate', lr):g}). "
        f"Ours removes {len(plan['removed_blocks'])} blocks by sensitivity ({plan['unet_params']['kept_fraction']:.0%} "
        f"of U-Net params kept); the baseline removes BK-SDM's `{a.bk_preset}` list.",
        "",
        "| Model | # Steps | # Param total | # Param U-Net | FD ↓ | alignment ↑ | s / image ↓ |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, steps, r in results:
        lines.append(f"| {name} | {steps} | {r['params_total'] / 1e6:.2f}M | {r['params_unet'] / 1e6:.2f}M | "
                     f"{r['fd']:.1f} | {r['alignment']:.3f} | {r['s_per_image']:.3f} |")
    by = {row[3]: r for row, (_, _, r) in zip(rows, results)}

    def cmp(a_, b_, what):
        ra, rb = by[a_], by[b_]
        better_fd, better_al = ra["fd"] < rb["fd"], ra["alignment"] > rb["alignment"]
        verdict = "yes" if better_fd and better_al else ("no" if not better_fd and not better_al else "mixed")
        return (f"| {what} | {verdict} | FD {ra['fd']:.1f} vs {rb['fd']:.1f}, "
                f"alignment {ra['alignment']:.3f} vs {rb['alignment']:.3f} |")

    lines += ["", "## The paper's claims, checked", "", "| claim | holds? | numbers |", "|---|---|---|",
              cmp("teacher25", "teacher8", "teacher at 25 steps is clearly better than at 8"),
              cmp("ours_s2_8", "bk25", "ours at 8 steps beats BK-SDM-style at 25"),
              cmp("ours_s2_8", "teacher25", "ours at 8 steps matches the teacher at 25 (yes = better on both)"),
              cmp("ours_s1_25", "ours_pruned25", "stage-1 retraining improves on the pruned student"),
              cmp("ours_s1_25", "ablation25", "L_CfgKD helps stage 1 (same budget)"),
              cmp("ours_s2_4", "teacher4", "a 4-step student beats the teacher at 4 steps"),
              cmp("ours_s2_2", "teacher2", "a 2-step student beats the teacher at 2 steps")]
    lines += ["", "## Recovery during stage 1 (FD / alignment, 25 steps, "
              f"{s1.get('eval_prompts', 32)} prompts every {s1.get('eval_steps')} steps)", ""]
    heads = None
    for key, label in (("ours_s1", "ours (with L_CfgKD)"), ("ablation_s1", "ours without L_CfgKD"), ("bk_s1", "BK-SDM-style")):
        ev = train_info(key)["periodic_evals"]
        if heads is None:
            heads = [e["step"] for e in ev]
            lines += ["| run | " + " | ".join(f"step {h}" for h in heads) + " | s / step |", "|---|" + "---|" * (len(heads) + 1)]
        lines.append(f"| {label} | " + " | ".join(f"{e['fd']:.1f} / {e['alignment']:.3f}" for e in ev)
                     + f" | {train_info(key)['s_per_step']} |")
    lines += ["", "Stage-2 training: " + ", ".join(
        f"{n} steps {train_info(f'ours_s2_{n}')['s_per_step']} s/step" for n in (8, 4, 2)) + "."]
    walls = {k: train_info(k).get("wall_time_s") for k in ("ours_s1", "ours_s2_8", "ablation_s1", "bk_s1", "ours_s2_4",
                                                           "ours_s2_2")}
    lines += ["", "Training wall time per run (minutes, incl. its periodic evaluations; the `--part ours` / "
              "`--part others` halves run side by side): " + ", ".join(
                  f"{k} {v / 60:.1f}" for k, v in walls.items() if v) + "."]
    out_md.parent.mkdir(parents=True, exist_ok=True)
    out_md.write_text("\n".join(lines) + "\n")
    (work / "table1.json").write_text(json.dumps({"rows": [(n, st, r) for n, st, r in results], "plan": plan,
                                                 "settings": s, "build_config": cfg,
                                                 "runs": {k: asdict(v) for k, v in runs.items() if v is not None}}, indent=2, default=str))
    print("\n".join(lines))
    log(f"wrote {out_md}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
