"""Which learning rate recovers a pruned tiny-sd fastest in stage 1? (docs/training.md)

The paper's 5e-5 is for SD v2.1 at batch 512; tiny-sd's teacher was trained at 1e-3. Each lr
trains the same pruned student (BK-SDM-Small removals) for the same steps with the stage-1
loss, and is scored (FD / alignment, held-out prompts, 25 DDIM steps, guidance 7.5) every
``--eval-every`` steps.

    python benchmarks/lr_sweep.py --lrs 5e-5,2e-4,1e-3 --steps 200 --batch 32
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lrs", default="5e-5,2e-4,1e-3")
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--eval-every", type=int, default=100)
    ap.add_argument("--eval-prompts", type=int, default=64)
    ap.add_argument("--preset", default="bk-small")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: default)")
    ap.add_argument("--work", default="runs/lr-sweep")
    ap.add_argument("--out", default="benchmarks/results/lr_sweep.md")
    a = ap.parse_args(argv)

    from slimsd.compress.prune import PRESETS, prune_pipeline
    from slimsd.compress.train import TrainConfig, train
    from slimsd.evaluator import evaluate

    if a.threads:
        torch.set_num_threads(a.threads)
    work = Path(a.work)
    student = work / a.preset
    if not (student / "model_index.json").is_file():
        prune_pipeline("tiny-sd", PRESETS[a.preset], student, {"preset": a.preset})
    rows = {}
    r0 = evaluate(str(student), steps=25, guidance=7.5, num_prompts=a.eval_prompts)
    print("pruned, untrained:", r0["fd"], r0["alignment"], file=sys.stderr)
    for lr in a.lrs.split(","):
        t0 = time.time()
        out = work / f"lr{lr}"
        cfg = TrainConfig(stage=1, student=str(student), teacher="tiny-sd", out=str(out), learning_rate=float(lr),
                          max_steps=a.steps, batch_size=a.batch, eval_steps=a.eval_every, eval_prompts=a.eval_prompts,
                          final_eval_prompts=a.eval_prompts, checkpointing_steps=0, report_to="none",
                          resume_from_checkpoint="latest", threads=a.threads)
        from slimsd.compress.train import config_sha, read_slimsd_json, resolve_config

        info = read_slimsd_json(out)
        if not (info and info.get("config_sha") == config_sha(resolve_config(cfg))):  # else: reuse the finished run
            train(cfg)
        tr = json.loads((out / "training.json").read_text())
        m = json.loads((out / "manifest.json").read_text())["metrics"]["steps25_cfg7.5"]
        evals = [(e["step"], e["fd"], e["alignment"]) for e in tr["periodic_evals"]] + [(a.steps, m["fd"], m["alignment"])]
        log = json.loads((out / "loss_log.json").read_text())
        tail = [r for r in log if r["step"] > 0.8 * a.steps]  # the last 20% of steps: less noisy than one row
        mean = {k: sum(r[k] for r in tail if k in r) / max(1, sum(k in r for r in tail)) for k in ("l_diff", "l_out_kd", "l_cfg_kd")}
        rows[lr] = {"evals": evals, "tail_losses": mean, "s_per_step": tr["s_per_step"], "wall_s": round(time.time() - t0), "final_loss": tr["final_loss"]}
        print(lr, rows[lr], file=sys.stderr)

    lines = [
        "# Stage-1 learning rate on tiny-sd",
        "",
        f"Command: `python benchmarks/lr_sweep.py --lrs {a.lrs} --steps {a.steps} --batch {a.batch} "
        f"--eval-every {a.eval_every} --eval-prompts {a.eval_prompts} --preset {a.preset} --threads {a.threads}`",
        "",
        f"Machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__} "
        "(shared with other jobs: timings are upper bounds).",
        "",
        f"Student: tiny-sd with BK-SDM `{a.preset}` removals (pruned, no training): FD {r0['fd']:.1f}, "
        f"alignment {r0['alignment']:.3f}. Stage-1 loss with the defaults (L_Diff + L_OutKD + L_CfgKD with p 0.5), "
        f"batch {a.batch}, constant lr, AdamW. Scores: {a.eval_prompts} held-out prompts, 25 DDIM steps, guidance 7.5.",
        "",
        "| lr | " + " | ".join(f"FD / align @ {s}" for s, _, _ in next(iter(rows.values()))["evals"])
        + " | L_Diff / L_OutKD / L_CfgKD (mean, last 20% of steps) | s/step |",
        "|---|" + "---|" * (len(next(iter(rows.values()))["evals"]) + 2),
    ]
    for lr, r in rows.items():
        tl = r["tail_losses"]
        lines.append(f"| {lr} | " + " | ".join(f"{fd:.1f} / {al:.3f}" for _, fd, al in r["evals"])
                     + f" | {tl['l_diff']:.4f} / {tl['l_out_kd']:.4f} / {tl['l_cfg_kd']:.3f} | {r['s_per_step']} |")
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
