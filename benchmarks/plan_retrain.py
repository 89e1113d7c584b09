"""Does the time-aware plan cost quality? Both plans retrained on tiny-sd at the same budget.

    python benchmarks/plan_retrain.py --part paper &  python benchmarks/plan_retrain.py --part time; wait
    python benchmarks/plan_retrain.py                  # scores both, writes benchmarks/results/plan_retrain.md

The SD-size goal of a plan that buys time (docs/pruning.md): >= 1.35x U-Net step speedup at SD
size (measured by ``benchmarks/prune_front.py``) with damage on tiny-sd no worse than the paper's
plan at the same retraining budget. Here both plans prune ``tiny-sd`` and get the stage-1
retraining of ``configs/tiny-sd-slim.json`` (the same steps, batch, learning rate, losses, seed):

* **paper**: the config's own plan, the paper's policy (least damaging blocks first) down to 54%
  of the U-Net's parameters (SD v2.1-base: 866M -> 466M): the ``ours stage 1`` row of Table 1;
* **time**: the blocks of ``prune_front.json``'s chosen plan (``--plan`` to pick another), chosen on
  the SD v2.1-base architecture's measured block times; tiny-sd has the same block names.

Then each is scored at 25 steps on the same ``--eval-prompts`` held-out prompts and seeds as the
teacher, and the paired comparison (time - paper) decides. "No worse" is read as Table 1's
"matches": the alignment difference's CI above -0.03 and the FD ratio's CI below 1.10 (the
issue 14 margins); whether any metric is *resolved* worse is reported beside it.

Each part's build lives under ``--work`` (default runs/plan_retrain), resumes from its checkpoints
when killed, and is reused when its config has not changed.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import table1  # noqa: E402  (scoring with per-prompt results, paired comparisons, the margins)

RESULTS, ROOT = table1.RESULTS, table1.ROOT
STEPS = 25


def part_config(part: str, plan: dict | None, work: Path, threads: int, quick: bool, paper_work: str | None = None,
                seed: int | None = None, paper_blocks: list[str] | None = None) -> dict:
    cfg = json.loads(table1.CONFIG.read_text())
    # absolute, as Table 1 writes its own: the build fingerprints its stages' paths, and a relative
    # spelling of the same folder would not match (the stage would be retrained)
    build_dir = str(Path(paper_work).resolve()) if part == "paper" and paper_work else str(work / f"{part}.build")
    cfg.update(out=str(work / part), work_dir=build_dir, stage2=None, evaluate={"num_prompts": 0})
    if part == "time":
        cfg["prune"] = {"blocks": list(plan["removed_blocks"])}
    if seed is not None:  # another training seed of both arms: the paper arm prunes its recorded blocks (no re-ranking)
        cfg["seed"] = seed
        if part == "paper":
            cfg["prune"] = {"blocks": list(paper_blocks)}
    if quick:
        cfg["stage1"] = {**cfg["stage1"], "max_steps": 4, "batch_size": 4, "num_latents": 64, "checkpointing_steps": 2,
                         "eval_steps": 0, "eval_prompts": 4, "final_eval_prompts": 0}
    cfg["stage1"] = {**cfg["stage1"], "threads": threads, "final_eval_prompts": 0, "eval_steps": 0}
    return cfg


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--part", choices=("all", "paper", "time"), default="all")
    ap.add_argument("--front", default=str(RESULTS / "prune_front.json"), help="benchmarks/prune_front.py's results")
    ap.add_argument("--plan", default=None, help="a plan name in --front (default: its chosen plan)")
    ap.add_argument("--work", default="runs/plan_retrain")
    ap.add_argument("--paper-work", default=None, help="the paper part's build folder, e.g. runs/table1/tiny-sd-slim.build: "
                    "Table 1 builds the same sensitivity -> prune -> stage 1, and the build reuses each stage whose "
                    "fingerprint (settings and everything upstream) matches, retraining otherwise")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--eval-prompts", type=int, default=1024)
    ap.add_argument("--resamples", type=int, default=1000)
    ap.add_argument("--quick", action="store_true", help="a few steps and prompts: checks the chain, numbers mean nothing")
    ap.add_argument("--stem", default="plan_retrain")
    ap.add_argument("--seed", type=int, default=None,
                    help="another training seed for both arms (work under --work/seed<N>, results <stem>_seed<N>): the "
                         "paper arm prunes the blocks its seed-0 build chose (--paper-plan-from), so only training "
                         "differs; the CIs of one run are over prompts, not training seeds")
    ap.add_argument("--paper-plan-from", default=str(RESULTS / "plan_retrain.json"),
                    help="with --seed: the results file whose tiny_sd_plans.paper holds the paper arm's blocks")
    a = ap.parse_args(argv)

    import torch

    from slimsd.compress.build import build

    t0 = time.time()
    torch.set_num_threads(a.threads)
    work = Path(a.work).resolve() / (f"seed{a.seed}" if a.seed is not None else "")
    work.mkdir(parents=True, exist_ok=True)
    paper_blocks = None
    if a.seed is not None:
        if a.paper_work:
            raise ValueError("--paper-work: a build of seed 0; with --seed the paper arm is retrained")
        paper_blocks = json.loads(Path(a.paper_plan_from).read_text())["tiny_sd_plans"]["paper"]["removed_blocks"]
    front = json.loads(Path(a.front).read_text())
    name = a.plan or front["chosen"]
    if not name or name not in front["plans"]:
        raise ValueError(f"--plan: {name!r} is not a plan of {a.front} (plans: {list(front['plans'])})")
    plan = front["plans"][name]
    row = next(r for r in front["rows"] if r["plan"] == name)

    def log(msg):
        print(f"[plan_retrain {a.part} {time.time() - t0:6.0f}s] {msg}", file=sys.stderr, flush=True)

    cfgs = {p: part_config(p, plan, work, a.threads, a.quick, a.paper_work, a.seed, paper_blocks) for p in ("paper", "time")}
    for p in ([a.part] if a.part != "all" else ["paper", "time"]):
        log(f"build {p}: stage 1, {cfgs[p]['stage1']['max_steps']} steps -> {cfgs[p]['out']}")
        build(cfgs[p])
    if a.part != "all":
        return 0
    prompts = 8 if a.quick else a.eval_prompts
    resamples = 50 if a.quick else a.resamples
    rows = {"teacher": table1.score("tiny-sd", STEPS, prompts, work, "teacher25", log)}
    for p in ("paper", "time"):
        rows[p] = table1.score(cfgs[p]["out"], STEPS, prompts, work, p, log)
    d = table1.paired(work, "time", "paper", resamples)
    vs_teacher = {p: table1.paired(work, p, "teacher25", resamples) for p in ("paper", "time")}
    al_lo, fd_hi = d["alignment_diff_ci"][0], d["fd_ratio_ci"][1]
    verdict = "yes" if al_lo >= table1.ALIGN_MARGIN and fd_hi <= table1.FD_RATIO_MARGIN else "no"
    resolved_worse = [m for m, bad in (("alignment", d["alignment_diff_ci"][1] < 0), ("FD", d["fd_ratio_ci"][0] > 1)) if bad]
    plans_used = {p: json.loads((Path(cfgs[p]["work_dir"]) / "pruned" / "prune_plan.json").read_text()) for p in cfgs}
    result = {"plan": name, "front_row": {k: row[k] for k in ("speedup", "unet_params", "damage_sum", "removed_blocks")},
              "paper_front_row": next({k: r[k] for k in ("speedup", "unet_params", "damage_sum", "removed_blocks")}
                                      for r in front["rows"] if r["plan"] == front["paper_plan"]),
              "tiny_sd_plans": {p: {"removed_blocks": v["removed_blocks"], "unet_params": v["unet_params"]}
                                for p, v in plans_used.items()},
              "stage1": cfgs["paper"]["stage1"], "rows": rows, "time_vs_paper": d, "vs_teacher25": vs_teacher,
              "no_worse": verdict, "resolved_worse": resolved_worse, "eval_prompts": prompts, "quick": a.quick,
              "machine": table1.machine(a.threads),
              "command": "python benchmarks/plan_retrain.py " + " ".join(argv if argv is not None else sys.argv[1:]),
              "build_dirs": {p: cfgs[p]["work_dir"] for p in cfgs}, "seed": a.seed}
    RESULTS.mkdir(exist_ok=True)
    stem = a.stem + (f"_seed{a.seed}" if a.seed is not None else "") + ("-quick" if a.quick else "")
    (RESULTS / f"{stem}.json").write_text(json.dumps(result, indent=2, default=str) + "\n")
    (RESULTS / f"{stem}.md").write_text(markdown(result, front))
    print(markdown(result, front))
    return 0


def markdown(r: dict, front: dict) -> str:
    def ci(x, k, f="{:.3f}"):
        lo, hi = x[f"{k}_ci"]
        return f"{f.format(x[k])} [{f.format(lo)}, {f.format(hi)}]"

    d, st = r["time_vs_paper"], r["stage1"]
    L = ["# Time-aware vs paper pruning plan, both retrained on tiny-sd (stage 1, the same budget)", "",
         f"Machine: {r['machine']}. Command: `{r['command']}`.", "",
         f"Stage 1 of `configs/tiny-sd-slim.json` for both: {st['max_steps']} steps, batch {st['batch_size']}, lr "
         f"{st['learning_rate']}. Scored at {STEPS} steps, guidance 7.5, on the same {r['eval_prompts']} held-out prompts "
         "and seeds; 95% bootstrap CIs." + (f" Training seed {r['seed']} for both arms (the paper arm prunes the blocks "
                                            "of its seed-0 build)." if r.get("seed") is not None else ""), "",
         f"* **time**: `{r['plan']}` of `prune_front.json`: {r['front_row']['speedup']:.2f}x U-Net step at SD size "
         f"(measured), {r['front_row']['unet_params'] / 1e6:.0f}M params there; on tiny-sd "
         f"{r['tiny_sd_plans']['time']['unet_params']['after']:,d} U-Net params "
         f"({r['tiny_sd_plans']['time']['unet_params']['kept_fraction']:.0%}); removes "
         f"{', '.join(r['tiny_sd_plans']['time']['removed_blocks'])}",
         f"* **paper**: tiny-sd-slim's plan (54% of params, least damaging first); on tiny-sd "
         f"{r['tiny_sd_plans']['paper']['unet_params']['after']:,d} U-Net params; removes "
         f"{', '.join(r['tiny_sd_plans']['paper']['removed_blocks'])}. The paper's 466M plan at SD size: "
         f"{r['paper_front_row']['speedup']:.2f}x U-Net step (measured).", "",
         "| model | FD [95% CI] | alignment [95% CI] |", "|---|---:|---:|"]
    for k, label in (("teacher", "teacher (tiny-sd), 25 steps"), ("paper", "paper plan + stage 1"),
                     ("time", "time-aware plan + stage 1")):
        L.append(f"| {label} | {ci(r['rows'][k], 'fd', '{:.1f}')} | {ci(r['rows'][k], 'alignment')} |")
    L += ["", "Paired, time - paper: alignment difference "
          f"{d['alignment_diff']:+.3f} [{d['alignment_diff_ci'][0]:+.3f}, {d['alignment_diff_ci'][1]:+.3f}], FD ratio "
          f"{d['fd_ratio']:.2f} [{d['fd_ratio_ci'][0]:.2f}, {d['fd_ratio_ci'][1]:.2f}].", "",
          f"**No worse than the paper plan** (alignment CI above {table1.ALIGN_MARGIN}, FD ratio CI below "
          f"{table1.FD_RATIO_MARGIN}): **{r['no_worse']}**. Resolved worse on: "
          f"{', '.join(r['resolved_worse']) or 'nothing'}.", ""]
    for p in ("paper", "time"):
        v = r["vs_teacher25"][p]
        L.append(f"* {p} vs teacher at 25: alignment {v['alignment_diff']:+.3f} [{v['alignment_diff_ci'][0]:+.3f}, "
                 f"{v['alignment_diff_ci'][1]:+.3f}], FD ratio {v['fd_ratio']:.2f} [{v['fd_ratio_ci'][0]:.2f}, "
                 f"{v['fd_ratio_ci'][1]:.2f}]")
    return "\n".join(L) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
