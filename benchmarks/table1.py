"""The paper's Table 1 in miniature, on ``tiny-sd``, with 95% CIs and paired claims (issue 14).

    python benchmarks/table1.py                # everything: 2 worker processes (--jobs), then the table
    python benchmarks/table1.py --quick        # minutes: proves the chain; writes table1-quick.md

Rows, every model scored by the scene evaluator on the same held-out prompts and seeds (FD plays
FID, alignment plays CLIP score), guidance 7.5:

=========================================  ==================================================
teacher (tiny-sd)                          at 25, 8, 4 and 2 DDIM steps
BK-SDM-style                               BK-SDM-Base removals (``bk-base``), retrained with
                                           L_Diff + L_OutKD + BK-SDM's feature KD, ours' stage-1
                                           budget; at 25 and 8 steps
ours pruned, no retraining                 25 steps
ours, stage 1                              ``slimsd compress build configs/tiny-sd-slim.json``'s
                                           stage 1 (L_Diff + L_OutKD + L_CfgKD); 25 steps
ours, stage 1 + 2 = tiny-sd-slim           the build's output; 8 steps
ours, 4 steps = tiny-sd-slim-4             ``configs/tiny-sd-slim-4.json`` on that output
                                           (progressive distillation 8 -> 4); 4 steps
ablation: stage 1 without L_CfgKD          the same student and budget; 25 steps
ablation: stage 2 without CFG              plain step distillation (w = 1); 8 steps
=========================================  ==================================================

Claims, each decided by a paired comparison (A - B on the same prompts and seeds, 95% bootstrap
CIs; slimsd.evalstats.paired_compare). "Matches" is non-inferiority with the issue's margins:
the alignment difference's CI lies above -0.03 and the FD ratio's CI below 1.10; "better" needs
one metric resolved better and none resolved worse; anything else is "unresolved".

- C1 teacher at 8 steps is worse than at 25;
- C2 stage 1 recovers the teacher at 25 (matches);
- C3 ours at 8 matches the teacher at 25, and is better than BK-SDM-style at 25;
- C4 L_CfgKD helps stage 1: ``--c4-seeds`` training seeds of each arm at a quarter of the stage-1
  budget (the paper: L_CfgKD is "critical to fast convergence"), decided on the mean over seeds of
  the paired differences with a t-interval over seeds (the training-seed variance counts), plus
  the full-budget pair of the table's rows;
- C5 ours reaches BK-SDM-style's quality in <= 1/4 of its iterations: ours' stage 1 stopped at a
  quarter of the budget (the C4 seed-0 run) matches BK-SDM-style at the full budget.

The work is a list of tasks (two builds, nine training runs, sixteen scorings) with their
dependencies. ``--jobs`` worker processes (1 thread each by default: two on a 2-core machine) take
the first ready task in priority order, the longest chain (ours' two builds) first, so the cores
stay busy until the end; a task is claimed by an atomic mkdir under ``WORK/pool``. Everything
lands in ``--work`` (default runs/table1): the builds, each training run (resumed from its
checkpoints) and each row's scores with its per-prompt results (``eval/TAG.npz``) are reused, so a
killed run continues where it stopped. The committed presets are never touched: the table rebuilds
its own copies under ``--work``, without the builds' intermediate evaluations (the table scores
every row itself). Seconds per image are timed at the end, one model at a time, with the workers
gone.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

RESULTS = Path(__file__).parent / "results"
ROOT = Path(__file__).parents[1]
GUIDANCE = 7.5
CONFIG = ROOT / "configs" / "tiny-sd-slim.json"
CONFIG_4 = ROOT / "configs" / "tiny-sd-slim-4.json"
# non-inferiority margins of "matches" (issue 14's bar for the students)
ALIGN_MARGIN, FD_RATIO_MARGIN = -0.03, 1.10


def machine(threads: int) -> str:
    from slimsd.hardware import cpu_model_and_flags

    cpu, flags = cpu_model_and_flags()
    shown = " ".join(sorted(f for f in flags if f.startswith(("amx", "avx512_bf16", "avx512_vnni", "avx512f"))))
    gpu = f", {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else ""
    return f"{cpu} ({shown or 'no AVX-512'}), {os.cpu_count()} cores, {threads} thread(s) per job{gpu}, torch {torch.__version__}"


# ---------------------------------------------------------------------------------------
# configs: ours is exactly the two build configs, written under WORK
# ---------------------------------------------------------------------------------------
def build_configs(a, work: Path) -> tuple[dict, dict]:
    """(tiny-sd-slim's build config, tiny-sd-slim-4's), with their outputs under WORK.

    The final scoring of each build is left to this table (the same prompts, kept per prompt);
    threads are a machine setting outside every fingerprint. Quick mode shrinks every budget."""
    cfg = json.loads(Path(a.config).read_text())
    cfg4 = json.loads(Path(a.config_4).read_text())
    cfg.update(out=str(work / "tiny-sd-slim"), work_dir=str(work / "tiny-sd-slim.build"), evaluate={"num_prompts": 0})
    cfg4.update(model=cfg["out"], out=str(work / "tiny-sd-slim-4"), work_dir=str(work / "tiny-sd-slim-4.build"),
                evaluate={"num_prompts": 0})
    if a.quick:
        cfg.update(sensitivity=dict(steps=2, num_prompts=4, batch_size=8,
                                    blocks=["up.3.attn.2", "mid.attn.0", "down.0.attn.1", "up.1.attn.2", "down.1.attn.1"]),
                   prune={"policy": "sensitivity", "keep_params": 0.96})
        small = dict(max_steps=4, batch_size=4, num_latents=64, checkpointing_steps=2, eval_steps=0, eval_prompts=4,
                     final_eval_prompts=0)
        for c, k in ((cfg, "stage1"), (cfg, "stage2"), (cfg4, "stage2")):
            c[k] = {**c[k], **small}
    for c, k in ((cfg, "stage1"), (cfg, "stage2"), (cfg4, "stage2")):
        # the table scores every row at 1024 prompts itself: the builds' periodic and final
        # evaluations (64 / 256 prompts) would cost ~10 min and feed nothing here
        c[k] = {**c[k], "eval_steps": 0, "final_eval_prompts": 0}
        if a.threads:
            c[k] = {**c[k], "threads": a.threads}
    return cfg, cfg4


# ---------------------------------------------------------------------------------------
# the task pool: --jobs worker processes share WORK/pool
# ---------------------------------------------------------------------------------------
@dataclass
class Task:
    name: str
    run: Callable[[], object]
    after: tuple[str, ...] = ()  # tasks that must be done first
    ready: Callable[[], bool] | None = None  # or a file another task writes early (a prune plan)


class Pool:
    """Task state in a folder: ``claimed/NAME`` (an atomic mkdir: one worker wins) and
    ``done/NAME.json`` (its seconds). ``reset`` is the coordinator's, before any worker starts; a
    rerun redoes every task, which is cheap for finished ones (training and scores are reused)."""

    def __init__(self, root: Path):
        self.root = root

    def reset(self) -> None:
        import shutil

        shutil.rmtree(self.root, ignore_errors=True)
        (self.root / "claimed").mkdir(parents=True)
        (self.root / "done").mkdir(parents=True)

    def done(self, name: str) -> bool:
        return (self.root / "done" / f"{name}.json").is_file()

    def claim(self, name: str) -> bool:
        try:
            (self.root / "claimed" / name).mkdir()
            return True
        except FileExistsError:
            return False

    def finish(self, name: str, seconds: float, worker: int) -> None:
        from slimsd.io import atomic_write_text

        atomic_write_text(self.root / "done" / f"{name}.json", json.dumps({"seconds": seconds, "worker": worker}))

    def record(self) -> dict:
        return {f.stem: json.loads(f.read_text()) for f in sorted((self.root / "done").glob("*.json"))}

    def next(self, tasks: list[Task]) -> Task | None | bool:
        """The first unclaimed task whose dependencies are met (claimed by this call); True when
        some are pending but none can start yet; None when every task is done."""
        pending = False
        for t in tasks:
            if self.done(t.name):
                continue
            pending = True
            if (self.root / "claimed" / t.name).exists():
                continue
            if all(self.done(d) for d in t.after) and (t.ready is None or t.ready()) and self.claim(t.name):
                return t
        return True if pending else None


def run_worker(pool: Pool, tasks: list[Task], worker: int, log, poll_s: float = 10.0) -> None:
    """Take tasks until none is left. A worker that fails exits; the coordinator stops the rest."""
    while (t := pool.next(tasks)) is not None:
        if t is True:
            time.sleep(poll_s)
            continue
        log(f"worker {worker}: {t.name}")
        t0 = time.time()
        t.run()
        pool.finish(t.name, time.time() - t0, worker)


def run_workers(argv: list[str], jobs: int) -> None:
    """``jobs`` copies of this script with ``--worker K``; the first failure stops them all."""
    import subprocess

    procs = [subprocess.Popen([sys.executable, __file__, *argv, "--worker", str(k)]) for k in range(jobs)]
    try:
        while procs:
            for p in list(procs):
                rc = p.poll()
                if rc is None:
                    continue
                procs.remove(p)
                if rc != 0:
                    raise SystemExit(f"table1: a worker failed (exit {rc}); fix it and rerun: finished work is reused")
            time.sleep(2)
    finally:
        for p in procs:
            p.terminate()


def written(path: Path) -> bool:
    """PATH is there: a plan file, or a pipeline folder whose ``slimsd.json`` is marked complete
    and whose ``manifest.json`` exists (what a build writes for each finished stage)."""
    if path.name.endswith(".json"):
        return path.is_file()
    f = path / "slimsd.json"
    return f.is_file() and bool(json.loads(f.read_text()).get("complete")) and (path / "manifest.json").is_file()


def ensure_trained(cfg, log) -> Path:
    """Train unless OUT already holds a finished run of exactly this config (then reuse it)."""
    from slimsd.compress.train import config_sha, read_slimsd_json, resolve_config, train

    info = read_slimsd_json(cfg.out)
    if info and info.get("complete") and info.get("config_sha") == config_sha(resolve_config(cfg)):
        log(f"reuse {cfg.out}")
        return Path(cfg.out)
    log(f"train stage {cfg.stage} -> {cfg.out} ({cfg.max_steps} steps, seed {cfg.seed})")
    return train(cfg)


# ---------------------------------------------------------------------------------------
# scoring: one evaluation per row, kept per prompt for the paired claims
# ---------------------------------------------------------------------------------------
PER_IMAGE = ("right", "objects", "features", "real_features")


def score(folder: str, steps: int, prompts: int, work: Path, tag: str, log) -> dict:
    """FD / alignment (+ CIs) of one row; the summary in WORK/eval/TAG.json, the per-prompt
    arrays in TAG.npz (numpy, no pickle). Reused when the key (folder content, steps, prompts) matches."""
    from slimsd.compress.build import model_fingerprint
    from slimsd.evaluator import evaluate

    f, npz = work / "eval" / f"{tag}.json", work / "eval" / f"{tag}.npz"
    key = {"folder": str(folder), "weights": _sha(model_fingerprint(str(folder))["files"]), "steps": steps,
           "prompts": prompts, "guidance": GUIDANCE, "seed": 0}
    if f.is_file() and npz.is_file():
        r = json.loads(f.read_text())
        if r.get("key") == key:
            return r
    log(f"evaluate {tag} ({folder} at {steps} steps, {prompts} prompts)")
    r = evaluate(folder, steps=steps, guidance=GUIDANCE, num_prompts=prompts, seed=0, per_image=True)
    per = r.pop("per_image")
    f.parent.mkdir(parents=True, exist_ok=True)
    np.savez(npz, **{k: np.asarray(per[k]) for k in PER_IMAGE}, prompts=np.asarray(per["prompts"]),
             seeds=np.asarray(per["seeds"]))
    from slimsd.models import load_pipeline

    pipe = load_pipeline(folder)
    unet = sum(p.numel() for p in pipe.unet.parameters())
    total = unet + sum(p.numel() for p in pipe.vae.parameters()) + sum(p.numel() for p in pipe.text_encoder.parameters())
    row = {"key": key, **{k: r[k] for k in ("fd", "fd_ci", "alignment", "alignment_ci", "objects", "order") if k in r},
           "params_total": total, "params_unet": unet, "eval_wall_s": r.get("wall_time_s")}
    f.write_text(json.dumps(row, indent=2))
    return row


def per_image(work: Path, tag: str) -> dict:
    z = np.load(work / "eval" / f"{tag}.npz", allow_pickle=False)
    return {"per_image": {k: (torch.from_numpy(z[k]) if k.endswith("features") else z[k]) for k in PER_IMAGE}
            | {"prompts": z["prompts"].tolist(), "seeds": z["seeds"].tolist()}}


def paired(work: Path, a: str, b: str, resamples: int) -> dict:
    from slimsd.evalstats import paired_compare

    return paired_compare(per_image(work, a), per_image(work, b), resamples=resamples, seed=0)


def seconds_per_image(folder: str, steps: int, n: int, work: Path, tag: str, threads: int) -> float:
    """Batch 1 with CFG, the mean of N generations after one warm-up (cached per folder/steps/threads/n)."""
    from slimsd.models import load_pipeline

    f = work / "eval" / f"{tag}.time.json"
    key = {"folder": str(folder), "steps": steps, "n": n, "threads": threads}
    if f.is_file() and json.loads(f.read_text()).get("key") == key:
        return json.loads(f.read_text())["s_per_image"]
    pipe = load_pipeline(folder)
    prompt = "a red circle left of a blue square"
    pipe(prompt, num_inference_steps=steps, guidance_scale=GUIDANCE, generator=torch.Generator().manual_seed(0))
    t0 = time.perf_counter()
    for i in range(n):
        pipe(prompt, num_inference_steps=steps, guidance_scale=GUIDANCE, generator=torch.Generator().manual_seed(i + 1))
    s = (time.perf_counter() - t0) / n
    f.write_text(json.dumps({"key": key, "s_per_image": s}))
    return s


def _sha(obj) -> str:
    import hashlib

    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:16]


# ---------------------------------------------------------------------------------------
# verdicts (pure functions of paired_compare's output: tested in tests/test_table1.py)
# ---------------------------------------------------------------------------------------
def matches(d: dict) -> str:
    """Non-inferiority of A vs B: alignment diff CI above ALIGN_MARGIN and FD ratio CI below FD_RATIO_MARGIN."""
    (a_lo, a_hi), (r_lo, r_hi) = d["alignment_diff_ci"], d["fd_ratio_ci"]
    if a_lo >= ALIGN_MARGIN and r_hi <= FD_RATIO_MARGIN:
        return "yes"
    if a_hi < ALIGN_MARGIN or r_lo > FD_RATIO_MARGIN:
        return "no"
    return "unresolved"


def better(d: dict) -> str:
    """A better than B: one metric resolved better (alignment CI > 0 or FD ratio CI < 1), none resolved worse."""
    (a_lo, a_hi), (r_lo, r_hi) = d["alignment_diff_ci"], d["fd_ratio_ci"]
    up = a_lo > 0 or r_hi < 1
    down = a_hi < 0 or r_lo > 1
    return "yes" if up and not down else ("no" if down and not up else ("mixed" if up else "unresolved"))


def worse(d: dict) -> str:
    """A worse than B: one metric resolved worse, none resolved better."""
    flipped = {"alignment_diff_ci": [-d["alignment_diff_ci"][1], -d["alignment_diff_ci"][0]],
               "fd_ratio_ci": [1 / max(d["fd_ratio_ci"][1], 1e-12), 1 / max(d["fd_ratio_ci"][0], 1e-12)]}
    return better(flipped)


def seed_mean(diffs: list[dict]) -> dict:
    """Mean over training seeds of per-seed paired results, with a 95% t-interval over seeds:
    the seed-to-seed spread of training is the uncertainty (n - 1 degrees of freedom)."""
    from scipy.stats import t as student_t

    out = {}
    for key, val in (("alignment_diff", "alignment_diff"), ("fd_ratio", "fd_ratio")):
        x = np.array([d[val] for d in diffs], float)
        m = float(x.mean())
        half = float(student_t.ppf(0.975, len(x) - 1) * x.std(ddof=1) / math.sqrt(len(x))) if len(x) > 1 else float("inf")
        out[key], out[f"{key}_ci"] = m, [m - half, m + half]
    out["seeds"] = len(diffs)
    return out


# ---------------------------------------------------------------------------------------
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="a few steps and prompts: checks the chain, numbers mean nothing")
    ap.add_argument("--config", default=str(CONFIG), help="ours' build config (its stage-1 budget is every stage-1 run's)")
    ap.add_argument("--config-4", default=str(CONFIG_4), help="the 4-step student's build config (its model is replaced "
                    "by this table's build of --config)")
    ap.add_argument("--work", default=None, help="default runs/table1 (runs/table1-quick with --quick)")
    ap.add_argument("--out", default=None, help="default benchmarks/results/table1.md (table1-quick.md with --quick)")
    ap.add_argument("--jobs", type=int, default=2, help="worker processes (each --threads threads): 2 on a 2-core "
                    "machine; 1 runs everything in this process")
    ap.add_argument("--worker", type=int, default=None, help=argparse.SUPPRESS)  # set by --jobs for its workers
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads per job (1: fastest for tiny-sd with two "
                    "jobs on 2 cores, docs/training.md; 0: torch's default)")
    ap.add_argument("--eval-prompts", type=int, default=1024)
    ap.add_argument("--c4-seeds", type=int, default=3, help="training seeds of each C4 arm")
    ap.add_argument("--time-images", type=int, default=8)
    ap.add_argument("--resamples", type=int, default=1000, help="bootstrap resamples of each paired comparison")
    ap.add_argument("--bk-preset", default="bk-base", help="the BK-SDM-style baseline's removals (paper: BK-SDM v2 base)")
    a = ap.parse_args(argv)

    from slimsd.compress.build import build
    from slimsd.compress.prune import PRESETS, prune_pipeline
    from slimsd.compress.train import config_from_dict

    t_start = time.time()
    if a.threads:
        torch.set_num_threads(a.threads)
    work = Path(a.work or ("runs/table1-quick" if a.quick else "runs/table1")).resolve()
    out_md = Path(a.out or RESULTS / ("table1-quick.md" if a.quick else "table1.md"))
    work.mkdir(parents=True, exist_ok=True)
    cfg, cfg4 = build_configs(a, work)
    prompts = 8 if a.quick else a.eval_prompts
    time_images = 1 if a.quick else a.time_images
    resamples = 50 if a.quick else a.resamples
    ours_work = Path(cfg["work_dir"])
    ours_pruned, ours_s1, ours_8, ours_4 = ours_work / "pruned", ours_work / "stage1", Path(cfg["out"]), Path(cfg4["out"])
    s1 = cfg["stage1"]
    quarter = max(1, s1["max_steps"] // 4)
    role = "main" if a.worker is None else f"worker {a.worker}"

    def log(msg):
        print(f"[table1 {role} {time.time() - t_start:7.0f}s] {msg}", file=sys.stderr, flush=True)

    def run_cfg(section: str, **over):
        d = dict(cfg[section])
        d.update(resume_from_checkpoint="latest", report_to="none", final_eval_prompts=0, eval_steps=0, **over)
        return config_from_dict(d)

    # --- the runs: ours (the two builds), the baseline, the ablations, the C4 seeds ---------------
    bk_pruned = work / f"{a.bk_preset}-pruned"
    runs = {
        "bk": run_cfg("stage1", stage=1, student=str(bk_pruned), teacher=cfg["model"], out=str(work / "bk-sdm-style"),
                      lambda_cfg_kd=0.0, lambda_feat_kd=1.0),
        "abl_s1": run_cfg("stage1", stage=1, student=str(ours_pruned), teacher=cfg["model"],
                          out=str(work / "ours-stage1-no-cfgkd"), lambda_cfg_kd=0.0),
        "abl_s2": run_cfg("stage2", stage=2, student=str(ours_s1), teacher=str(ours_s1),
                          out=str(work / "ours-stage2-no-cfg"), cfg_prob=0.0),
    }
    for seed in range(a.c4_seeds):  # C4 / C5: both arms at a quarter of the stage-1 budget
        for arm, lam in (("cfgkd", None), ("nocfgkd", 0.0)):
            runs[f"c4_{arm}_{seed}"] = run_cfg("stage1", stage=1, student=str(ours_pruned), teacher=cfg["model"],
                                               out=str(work / f"c4-{arm}-seed{seed}"), max_steps=quarter, seed=seed,
                                               checkpointing_steps=max(1, quarter // 2),
                                               **({"lambda_cfg_kd": lam} if lam is not None else {}))

    def bk_train():
        if not (bk_pruned / "prune_plan.json").is_file():
            prune_pipeline(cfg["model"], PRESETS[a.bk_preset], bk_pruned, {"preset": a.bk_preset})
        ensure_trained(runs["bk"], log)

    # --- the rows, each scored on the same prompts and seeds -----------------------------------
    teacher = cfg["model"]
    rows = [  # (label, steps, folder, tag, the task that makes the folder)
        ("tiny-sd (teacher)", 25, teacher, "teacher25", None),
        ("tiny-sd (teacher)", 8, teacher, "teacher8", None),
        ("tiny-sd (teacher)", 4, teacher, "teacher4", None),
        ("tiny-sd (teacher)", 2, teacher, "teacher2", None),
        (f"BK-SDM-style ({a.bk_preset} + KD retraining)", 25, runs["bk"].out, "bk25", "train-bk"),
        (f"BK-SDM-style ({a.bk_preset} + KD retraining)", 8, runs["bk"].out, "bk8", "train-bk"),
        ("ours pruned, no retraining", 25, ours_pruned, "pruned25", "build-8"),
        ("ours, stage 1", 25, ours_s1, "s1_25", "build-8"),
        ("**ours, stage 1 + 2 = `tiny-sd-slim`**", 8, ours_8, "ours8", "build-8"),
        ("**ours, 4 steps = `tiny-sd-slim-4`** (8 -> 4)", 4, ours_4, "ours4", "build-4"),
        ("ablation: stage 1 without L_CfgKD", 25, runs["abl_s1"].out, "abl_s1_25", "train-abl_s1"),
        ("ablation: stage 2 without CFG (w = 1)", 8, runs["abl_s2"].out, "abl_s2_8", "train-abl_s2"),
    ]
    c4_rows = [(f"C4 {arm} seed {s}", 25, runs[f"c4_{arm}_{s}"].out, f"c4_{arm}_{s}", f"train-c4_{arm}_{s}")
               for s in range(a.c4_seeds) for arm in ("cfgkd", "nocfgkd")]

    # --- the tasks, in priority order: the longest chain (ours' two builds) first ---------------
    def score_task(folder, steps, tag):
        return lambda: score(str(folder), steps, prompts, work, tag, log)

    def build_task(c, path, out):
        return lambda: (log(f"slimsd compress build {path} -> {out}"), build(c, config_path=path))

    pruned_plan = ours_pruned / "prune_plan.json"  # written seconds into build-8: the runs from it start then
    tasks = [
        Task("build-8", build_task(cfg, a.config, ours_8)),
        Task("build-4", build_task(cfg4, a.config_4, ours_4), after=("build-8",)),
        Task("train-bk", bk_train),
        Task("train-abl_s2", lambda: ensure_trained(runs["abl_s2"], log), ready=lambda: written(ours_s1)),
        Task("train-abl_s1", lambda: ensure_trained(runs["abl_s1"], log), ready=lambda: written(pruned_plan)),
    ]
    tasks += [Task(f"train-{k}", (lambda k=k: ensure_trained(runs[k], log)), ready=lambda: written(pruned_plan))
              for k in runs if k.startswith("c4_")]
    tasks += [Task(f"score-{tag}", score_task(folder, steps, tag), after=(dep,) if dep else ())
              for _, steps, folder, tag, dep in rows + c4_rows]
    pool = Pool(work / "pool")
    if a.worker is not None:  # a worker of --jobs: take tasks; the main process writes the table
        run_worker(pool, tasks, a.worker, log)
        return 0
    pool.reset()
    t_pool = time.time()
    if a.jobs > 1:
        run_workers(list(argv if argv is not None else sys.argv[1:]), a.jobs)
    else:
        run_worker(pool, tasks, 0, log)
    pool_s, task_record = time.time() - t_pool, pool.record()
    results = {tag: score(str(folder), steps, prompts, work, tag, log)  # every score is cached by now
               for _, steps, folder, tag, _ in rows + c4_rows}

    load_before = [round(x, 2) for x in os.getloadavg()]
    for name, steps, folder, tag, _ in rows:
        results[tag]["s_per_image"] = seconds_per_image(str(folder), steps, time_images, work, tag, a.threads)
    load_after = [round(x, 2) for x in os.getloadavg()]
    d = lambda x, y: paired(work, x, y, resamples)  # noqa: E731

    # --- training record of each row -----------------------------------------------------------------
    def info(folder) -> dict:
        f = Path(folder) / "training.json"
        return json.loads(f.read_text()) if f.is_file() else {}

    def trained(folder) -> tuple[int, float]:
        t = info(folder)
        return int(t.get("config", {}).get("max_steps", 0)), float(t.get("wall_time_s") or 0)

    st1, st2, st4 = trained(ours_s1), trained(ours_work / "stage2"), trained(Path(cfg4["work_dir"]) / "stage2")
    train_col = {
        "pruned25": (0, 0.0), "s1_25": st1, "ours8": (st1[0] + st2[0], st1[1] + st2[1]),
        "ours4": (st1[0] + st2[0] + st4[0], st1[1] + st2[1] + st4[1]),
        "bk25": trained(runs["bk"].out), "bk8": trained(runs["bk"].out), "abl_s1_25": trained(runs["abl_s1"].out),
        "abl_s2_8": (st1[0] + trained(runs["abl_s2"].out)[0], st1[1] + trained(runs["abl_s2"].out)[1]),
    }
    from slimsd.models import resolve_model

    tcfg = info(resolve_model(teacher)).get("config", {})  # the teacher's own training record

    def ci(v, lo_hi, fmt):
        return f"{format(v, fmt)} [{format(lo_hi[0], fmt)}, {format(lo_hi[1], fmt)}]"

    cmd = "python benchmarks/table1.py " + " ".join(shlex.quote(x) for x in (argv if argv is not None else sys.argv[1:]))
    lines = [
        "# Table 1 in miniature (tiny-sd)" + (" — QUICK MODE: a smoke run, the numbers mean nothing" if a.quick else ""),
        "",
        f"Command: `{cmd.strip()}`  ",
        f"Machine: {machine(a.threads)}; load average before / after the timing: {load_before} / {load_after}  ",
        f"This call: **{(time.time() - t_start) / 60:.1f} min** in all: the task pool {pool_s / 60:.1f} min "
        f"({a.jobs} worker(s), {a.threads} thread(s) each, {len(task_record)} tasks, "
        f"{sum(1 for v in task_record.values() if v['seconds'] < 60)} of them under a minute: reused or small), then the "
        "timing and the table. Training runs reused from an earlier call keep their own wall time below.",
        "",
        f"Scores: {prompts} held-out prompts, the same prompts and seeds for every row (`slimsd evaluate MODEL --steps S "
        f"--guidance {GUIDANCE} --num-prompts {prompts} --seed 0`); FD lower is better, alignment higher is better; "
        "[95% CI] bootstrap over prompts. s/image: batch 1 with CFG, the mean of "
        f"{time_images} after a warm-up, one model at a time.",
        "",
        f"Training (`{Path(a.config).name}`, `{Path(a.config_4).name}`): AdamW lr {s1.get('learning_rate'):g}, batch "
        f"{s1.get('batch_size', 64)}; stage 1 {s1['max_steps']} steps for ours, the ablation and the BK-SDM-style baseline; "
        f"stage 2 {cfg['stage2']['max_steps']} steps (8 steps), then {cfg4['stage2']['max_steps']} more to 4 steps. "
        "Training steps and wall time are cumulative (a stage-2 row includes its stage 1).",
        "",
        "| Model | # Steps | # Param total | # Param U-Net | FD ↓ [95% CI] | alignment ↑ [95% CI] | s / image ↓ | "
        "training steps | training wall (min) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, steps, folder, tag, _ in rows:
        r = results[tag]
        if tag.startswith("teacher"):
            tr = (f"{tcfg.get('unet_steps', '?')} (trained from scratch)", "—")
        else:
            n, w = train_col[tag]
            tr = (f"{n:,}", f"{w / 60:.1f}")
        lines.append(f"| {name} | {steps} | {r['params_total'] / 1e6:.2f}M | {r['params_unet'] / 1e6:.2f}M | "
                     f"{ci(r['fd'], r['fd_ci'], '.1f')} | {ci(r['alignment'], r['alignment_ci'], '.3f')} | "
                     f"{r['s_per_image']:.3f} | {tr[0]} | {tr[1]} |")

    def row(claim, verdict, pair, dd):
        return (f"| {claim} | **{verdict}** | {pair} | {ci(dd['alignment_diff'], dd['alignment_diff_ci'], '+.3f')} | "
                f"{ci(dd['fd_ratio'], dd['fd_ratio_ci'], '.2f')} |")

    p = {k: d(*k) for k in [("teacher8", "teacher25"), ("s1_25", "teacher25"), ("ours8", "teacher25"), ("ours8", "bk25"),
                            ("s1_25", "abl_s1_25"), ("ours4", "teacher25"), ("ours4", "teacher4"), ("ours8", "abl_s2_8"),
                            ("c4_cfgkd_0", "bk25")]}
    c4 = [d(f"c4_cfgkd_{s}", f"c4_nocfgkd_{s}") for s in range(a.c4_seeds)]
    c4m = seed_mean(c4)
    c3 = "yes" if matches(p[("ours8", "teacher25")]) == "yes" and better(p[("ours8", "bk25")]) == "yes" else (
        "no" if matches(p[("ours8", "teacher25")]) == "no" or better(p[("ours8", "bk25")]) == "no" else "unresolved")
    c4_verdict = better({"alignment_diff_ci": c4m["alignment_diff_ci"], "fd_ratio_ci": c4m["fd_ratio_ci"]})
    lines += ["", "## The paper's claims, each decided by a paired comparison", "",
              f"A − B on the same {prompts} prompts and seeds. *matches*: alignment diff CI > {ALIGN_MARGIN} and FD "
              f"ratio CI < {FD_RATIO_MARGIN}; *better*: one metric resolved better and none worse; otherwise unresolved.",
              "", "| claim | holds? | A vs B | alignment A − B [95% CI] | FD A / B [95% CI] |", "|---|---|---|---|---|",
              row("C1 teacher at 8 steps is worse than at 25", worse(p[("teacher8", "teacher25")]), "teacher8 vs teacher25",
                  p[("teacher8", "teacher25")]),
              row("C2 stage 1 recovers the teacher at 25 (matches)", matches(p[("s1_25", "teacher25")]),
                  "ours stage 1 @25 vs teacher25", p[("s1_25", "teacher25")]),
              row(f"C3 ours at 8 matches the teacher at 25 … (C3 overall: **{c3}**)", matches(p[("ours8", "teacher25")]),
                  "tiny-sd-slim @8 vs teacher25", p[("ours8", "teacher25")]),
              row("C3 … and is better than BK-SDM-style at 25", better(p[("ours8", "bk25")]), "tiny-sd-slim @8 vs BK @25",
                  p[("ours8", "bk25")]),
              row(f"C4 L_CfgKD helps stage 1: {a.c4_seeds} seeds × {quarter} steps, mean over seeds, t-interval",
                  c4_verdict, "with vs without L_CfgKD @25", c4m)]
    for s, dd in enumerate(c4):
        lines.append(row(f"C4, seed {s} ({quarter} steps; CI over prompts)", better(dd), "with vs without @25", dd))
    lines += [row(f"C4 at the full budget ({s1['max_steps']} steps, seed 0: the table's rows)",
                  better(p[("s1_25", "abl_s1_25")]), "ours stage 1 vs ablation @25", p[("s1_25", "abl_s1_25")]),
              row("C5 ours reaches BK-SDM-style's quality in ≤ ¼ of its iterations (matches)",
                  matches(p[("c4_cfgkd_0", "bk25")]), f"ours stage 1 at {quarter} vs BK at {s1['max_steps']}, @25",
                  p[("c4_cfgkd_0", "bk25")]),
              "", "Beyond the paper:", "", "| claim | holds? | A vs B | alignment A − B [95% CI] | FD A / B [95% CI] |",
              "|---|---|---|---|---|",
              row("4-step student matches the teacher at 25 (issue 14's bar: ≥ −0.05, ≤ 1.10)",
                  "yes" if p[("ours4", "teacher25")]["alignment_diff"] >= -0.05 and p[("ours4", "teacher25")]["fd_ratio"] <= 1.10
                  else "no", "tiny-sd-slim-4 @4 vs teacher25 (point estimates vs the bar)", p[("ours4", "teacher25")]),
              row("4-step student is better than the teacher at 4", better(p[("ours4", "teacher4")]),
                  "tiny-sd-slim-4 @4 vs teacher4", p[("ours4", "teacher4")]),
              row("CFG in stage 2 helps (vs plain step distillation)", better(p[("ours8", "abl_s2_8")]),
                  "tiny-sd-slim @8 vs stage 2 without CFG @8", p[("ours8", "abl_s2_8")])]
    c4_tab = ["", f"C4 runs ({quarter} steps each, seeds 0..{a.c4_seeds - 1}): " + "; ".join(
        f"{arm} seed {s}: FD {results[f'c4_{arm}_{s}']['fd']:.1f}, alignment {results[f'c4_{arm}_{s}']['alignment']:.3f}"
        for s in range(a.c4_seeds) for arm in ("cfgkd", "nocfgkd")) + "."]
    walls = {k: trained(v.out)[1] for k, v in runs.items()}
    lines += c4_tab + ["", f"Training wall time per run (minutes; {a.jobs} workers side by side, {a.threads} thread(s) each): "
                       + ", ".join([f"ours stage 1 {st1[1] / 60:.1f}", f"ours stage 2 {st2[1] / 60:.1f}",
                                    f"4-step {st4[1] / 60:.1f}"] + [f"{k} {v / 60:.1f}" for k, v in walls.items()]) + "."]
    out_md.parent.mkdir(parents=True, exist_ok=True)
    out_md.write_text("\n".join(lines) + "\n")
    (out_md.with_suffix(".json")).write_text(json.dumps(
        {"rows": {tag: {"label": name, "steps": steps, **results[tag]} for name, steps, _, tag, _ in rows},
         "c4_runs": {tag: results[tag] for *_, tag, _ in c4_rows},
         "paired": {f"{x}-vs-{y}": v for (x, y), v in p.items()}, "c4_per_seed": c4, "c4_mean": c4_mean_safe(c4m),
         "build_configs": [cfg, cfg4], "machine": machine(a.threads), "load": [load_before, load_after],
         "wall_s": {"call": time.time() - t_start, "pool": pool_s, "tasks": task_record}},
        indent=2, default=str))
    print("\n".join(lines))
    log(f"wrote {out_md}")
    return 0


def c4_mean_safe(m: dict) -> dict:
    return {k: (v if not isinstance(v, float) or math.isfinite(v) else None) for k, v in m.items()}


if __name__ == "__main__":
    sys.exit(main())
