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
import platform
import shlex
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch

RESULTS = Path(__file__).parent / "results"
GUIDANCE = 7.5


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = f", {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else ""
    return f"{cpu}, {torch.get_num_threads()} threads{gpu}, torch {torch.__version__}"


def settings(a) -> dict:
    """Per-mode budgets. Quick: a few steps and prompts (numbers mean nothing, the chain runs)."""
    if a.quick:
        return dict(stage1_steps=2, stage2_steps=2, batch=4, num_latents=64, eval_prompts=8, time_images=1,
                    sens=dict(steps=2, num_prompts=4, batch_size=8, blocks=["up.3.attn.2", "mid.attn.0", "down.0.attn.1",
                                                                             "up.1.attn.2", "down.1.attn.1"]),
                    keep_params=0.96)
    return dict(stage1_steps=a.stage1_steps, stage2_steps=a.stage2_steps, batch=a.batch, num_latents=a.num_latents,
                eval_prompts=a.eval_prompts, time_images=a.time_images,
                sens=dict(steps=25, num_prompts=a.sens_prompts, batch_size=64), keep_params=a.keep_params)


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
    ap.add_argument("--work", default=None, help="default runs/table1 (runs/table1-quick with --quick)")
    ap.add_argument("--out", default=None, help="default benchmarks/results/table1.md (table1-quick.md with --quick)")
    ap.add_argument("--stage1-steps", type=int, default=600)
    ap.add_argument("--stage2-steps", type=int, default=400)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (1: fastest for tiny-sd on a busy 2-core "
                    "machine, see docs/training.md; 0: torch's default)")
    ap.add_argument("--lr", type=float, default=None, help="default: configs/tiny-sd-slim.json's stage-1 lr")
    ap.add_argument("--num-latents", type=int, default=20_000)
    ap.add_argument("--eval-prompts", type=int, default=256)
    ap.add_argument("--sens-prompts", type=int, default=64)
    ap.add_argument("--time-images", type=int, default=8)
    ap.add_argument("--keep-params", type=float, default=0.54, help="ours: share of U-Net params kept (paper: 466M/866M)")
    ap.add_argument("--bk-preset", default="bk-base", help="the BK-SDM-style baseline's removals (paper: BK-SDM v2 base)")
    a = ap.parse_args(argv)

    from slimsd.compress.prune import PRESETS, plan_pruning, prune_pipeline, unet_block_costs
    from slimsd.compress.sensitivity import SensitivityConfig, run_sensitivity
    from slimsd.compress.train import TrainConfig

    t_start = time.time()
    if a.threads:
        torch.set_num_threads(a.threads)
    s = settings(a)
    work = Path(a.work or ("runs/table1-quick" if a.quick else "runs/table1"))
    out_md = Path(a.out or RESULTS / ("table1-quick.md" if a.quick else "table1.md"))
    work.mkdir(parents=True, exist_ok=True)
    lr = a.lr
    if lr is None:
        slim = json.loads((Path(__file__).parents[1] / "configs" / "tiny-sd-slim.json").read_text())
        lr = float(slim["stage1"]["learning_rate"])

    def log(msg):
        print(f"[table1 {time.time() - t_start:7.0f}s] {msg}", file=sys.stderr, flush=True)

    common = dict(batch_size=s["batch"], num_latents=s["num_latents"], learning_rate=lr, report_to="none", threads=a.threads,
                  resume_from_checkpoint="latest", final_eval_prompts=0, checkpointing_steps=max(1, s["stage1_steps"] // 4))
    recovery_every = max(1, s["stage1_steps"] // 4)

    # --- pruning: ours by sensitivity, the baseline by BK-SDM's list ---------------------------
    sens = run_sensitivity(SensitivityConfig(model="tiny-sd", out=str(work / "sensitivity"), **s["sens"]))
    params, _, total, _ = unet_block_costs("tiny-sd", latency=False)
    plan = plan_pruning(sens, "sensitivity", keep_params=s["keep_params"], params=params, total_params=total)
    ours_pruned = work / "ours-pruned"
    if not (ours_pruned / "prune_plan.json").is_file() or \
            json.loads((ours_pruned / "prune_plan.json").read_text())["removed_blocks"] != plan["removed_blocks"]:
        prune_pipeline("tiny-sd", plan["removed_blocks"], ours_pruned, plan)
    bk_pruned = work / f"{a.bk_preset}-pruned"
    if not (bk_pruned / "prune_plan.json").is_file():
        prune_pipeline("tiny-sd", PRESETS[a.bk_preset], bk_pruned, {"preset": a.bk_preset})

    # --- training: the same budget for every stage-1 run ---------------------------------------
    s1 = dict(stage=1, teacher="tiny-sd", max_steps=s["stage1_steps"], eval_steps=recovery_every,
              eval_prompts=min(64, s["eval_prompts"]), **common)
    runs = {
        "ours_s1": TrainConfig(student=str(ours_pruned), out=str(work / "ours-stage1"), **s1),
        "ablation_s1": TrainConfig(student=str(ours_pruned), out=str(work / "ours-stage1-no-cfgkd"), lambda_cfg_kd=0.0, **s1),
        "bk_s1": TrainConfig(student=str(bk_pruned), out=str(work / "bk-sdm-style"), lambda_cfg_kd=0.0, lambda_feat_kd=1.0, **s1),
    }
    for k, cfg in runs.items():
        ensure_trained(cfg, log)
    ours_s1 = str(runs["ours_s1"].out)
    s2 = dict(stage=2, student=ours_s1, teacher=ours_s1, max_steps=s["stage2_steps"],
              **{**common, "checkpointing_steps": max(1, s["stage2_steps"] // 4)})
    for n in (8, 4, 2):
        runs[f"ours_s2_{n}"] = TrainConfig(out=str(work / f"ours-stage2-{n}steps"), student_steps=n, **s2)
        ensure_trained(runs[f"ours_s2_{n}"], log)

    # --- scoring ------------------------------------------------------------------------------------
    rows = [
        ("tiny-sd (teacher)", 25, "tiny-sd", "teacher25"),
        ("tiny-sd (teacher)", 8, "tiny-sd", "teacher8"),
        (f"BK-SDM-style ({a.bk_preset} + KD retraining)", 25, runs["bk_s1"].out, "bk25"),
        (f"BK-SDM-style ({a.bk_preset} + KD retraining)", 8, runs["bk_s1"].out, "bk8"),
        ("Ours (pruned w. fine-tuning, stage 1)", 25, ours_s1, "ours_s1_25"),
        ("**Ours (pruned w. fine-tuning + step distill.)**", 8, runs["ours_s2_8"].out, "ours_s2_8"),
        ("ablation: ours stage 1 without L_CfgKD", 25, runs["ablation_s1"].out, "ablation25"),
        ("tiny-sd (teacher)", 4, "tiny-sd", "teacher4"),
        ("ours, stage 2 distilled to 4 steps", 4, runs["ours_s2_4"].out, "ours_s2_4"),
        ("tiny-sd (teacher)", 2, "tiny-sd", "teacher2"),
        ("ours, stage 2 distilled to 2 steps", 2, runs["ours_s2_2"].out, "ours_s2_2"),
    ]
    results = []
    for name, steps, folder, tag in rows:
        results.append((name, steps, score(str(folder), steps, s, work, tag, log)))

    # --- the note -------------------------------------------------------------------------------
    def train_info(key):
        t = json.loads((Path(runs[key].out) / "training.json").read_text())
        return t

    cmd = "python benchmarks/table1.py " + " ".join(shlex.quote(x) for x in (argv if argv is not None else sys.argv[1:]))
    lines = [
        "# Table 1 in miniature (tiny-sd)" + (" — QUICK MODE: a smoke run, the numbers mean nothing" if a.quick else ""),
        "",
        f"Command: `{cmd.strip()}`  ",
        f"Machine: {machine()}  ",
        f"Wall time: {(time.time() - t_start) / 60:.1f} min (runs reused from `{work}` are not counted again)",
        "",
        f"Scores: {s['eval_prompts']} held-out prompts (`slimsd evaluate MODEL --steps S --guidance {GUIDANCE} "
        f"--num-prompts {s['eval_prompts']} --seed 0`), FD lower is better, alignment higher is better. "
        f"s/image: batch 1 with CFG, mean of {s['time_images']} after a warm-up.",
        "",
        f"Training: AdamW lr {lr:g}, batch {s['batch']}; stage 1 {s['stage1_steps']} steps for each of ours, the "
        f"ablation and the BK-SDM-style baseline; stage 2 {s['stage2_steps']} steps from our stage 1. "
        f"Ours removes {len(plan['removed_blocks'])} blocks by sensitivity ({plan['unet_params']['kept_fraction']:.0%} "
        f"of U-Net params kept); the baseline removes BK-SDM's `{a.bk_preset}` list.",
        "",
        "| Model | # Steps | # Param total | # Param U-Net | FD ↓ | alignment ↑ | s / image ↓ |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, steps, r in results:
        lines.append(f"| {name} | {steps} | {r['params_total'] / 1e6:.2f}M | {r['params_unet'] / 1e6:.2f}M | "
                     f"{r['fd']:.1f} | {r['alignment']:.3f} | {r['s_per_image']:.3f} |")
    by = {tag: r for (name, steps, folder, tag), (_, _, r) in zip(rows, results)}

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
              cmp("ours_s1_25", "ablation25", "L_CfgKD helps stage 1 (same budget)"),
              cmp("ours_s2_4", "teacher4", "a 4-step student beats the teacher at 4 steps"),
              cmp("ours_s2_2", "teacher2", "a 2-step student beats the teacher at 2 steps")]
    lines += ["", "## Recovery during stage 1 (FD / alignment, 25 steps, "
              f"{min(64, s['eval_prompts'])} prompts)", ""]
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
    out_md.parent.mkdir(parents=True, exist_ok=True)
    out_md.write_text("\n".join(lines) + "\n")
    (work / "table1.json").write_text(json.dumps({"rows": [(n, st, r) for n, st, r in results], "plan": plan,
                                                 "settings": s, "lr": lr,
                                                 "runs": {k: asdict(v) for k, v in runs.items()}}, indent=2, default=str))
    print("\n".join(lines))
    log(f"wrote {out_md}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
