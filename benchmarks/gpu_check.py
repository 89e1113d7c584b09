"""One bounded check of slimsd's CUDA paths on a GPU: the CUDA tests, training at SD size, 512x512 latency, serving.

    pip install -e . --no-deps --no-build-isolation     # once, in a CUDA-torch environment
    python benchmarks/gpu_check.py                      # on a CUDA machine; every part has its own time limit
    python benchmarks/gpu_check.py --dry-run --out /tmp/gpu_check   # the same code on CPU, tiny shapes (< 1 min)

Parts, in this order, each in its own subprocess with its own time limit (``--limit
PART=SECONDS``, and the whole run ``--total-s``); a part past its limit is killed with its
children and recorded as ``timed out``, a part that raises or fails a check as ``failed``; the
next part runs either way:

* ``tests``: ``pytest -m gpu -rs`` over the test files that mark tests ``gpu`` (the ones the
  suite skips without CUDA), with the skip reasons;
* ``pipeline``: the 512x512 fp16 components of ``benchmarks/gpu_e2e.py`` (imported): SD 25 steps
  vs ours 8 steps vs ours 4 steps (the 466M plan of ``benchmarks/results/prune_latency.json``)
  for eager SDPA, CUDA graphs and ``torch.compile``, plus diffusers' pipeline end to end;
* ``prune``: ``slimsd compress prune sd21-base-arch --blocks <that 466M plan>`` (materialises
  the ``sd21-base-arch`` folder once, in ``$SLIMSD_CACHE``);
* ``train``: stage 1, then stage 2, on that 466M student with the teacher ``sd21-base-arch``,
  512x512 scene images (64x64 latents), bf16 mixed precision, gradient checkpointing, ~20 steps
  each (``slimsd.compress.train``'s ``TrainConfig`` / ``train``): s/step, peak GPU memory, finite
  losses, checkpoints written, and a run interrupted after a checkpoint that resumes from it;
* ``serve``: whether ONNX Runtime has its CUDA provider (onnxruntime-gpu); the serve pipeline
  (``slimsd.serve``, torch backend, ``--device cuda``, fp16) end to end at 512x512, same seed:
  SD 25 steps vs the 466M student at 8 and 4 steps.

Writes ``<--out>/gpu_check.{md,json}`` (default ``benchmarks/results``): GPU, driver, torch /
CUDA / cuDNN versions, the CPU, every number, and each part's status, wall time, limit and
error. Without ``--dry-run`` and without a CUDA GPU it exits with code 2 and writes nothing.
Exit code 0 when every part passed, 1 otherwise. docs/gpu.md says what stays unverified.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
RESULTS = ROOT / "benchmarks" / "results"
PLANS = RESULTS / "prune_latency.json"
PARTS = ("tests", "pipeline", "prune", "train", "serve")  # in this order; serve and train need prune's folder
# seconds per part on the GPU (H200 class), and for the whole run: parts past the total get what is left
LIMITS = {"tests": 60, "pipeline": 180, "prune": 120, "train": 180, "serve": 60}
TOTAL_S = 540
DRY_LIMITS = {p: 180 for p in PARTS}  # only against hangs: a loaded 2-core CI machine is slow
DRY_TOTAL_S = 900
MIN_PART_S = 10  # a part with less time than this left in the total is not started
PROMPT = "a red circle left of a blue square"
SEED = 0
GUIDANCE = 7.5
STEPS = {"SD": 25, "ours 8": 8, "ours 4": 4}


def settings(dry_run: bool, a) -> dict:
    """Everything a part needs; the dry run swaps in tiny shapes and fp32 on the CPU."""
    if dry_run:
        return {"dry_run": True, "device": "cpu", "model": "tiny-sd", "resolution": 128, "train_steps": 2,
                "train_batch": 2, "num_latents": 4, "mixed_precision": "no", "dtype": "float32", "repeats": 1,
                "serve_repeats": 1, "variants": "eager", "compile_cost_s": 60}
    return {"dry_run": False, "device": "cuda", "model": "sd21-base-arch", "resolution": 512,
            "train_steps": a.train_steps, "train_batch": a.train_batch, "num_latents": 8, "mixed_precision": "bf16",
            "dtype": "float16", "repeats": a.repeats, "serve_repeats": 3, "variants": a.variants,
            "compile_cost_s": a.compile_cost_s}


# =============================================================================================
# parts (each runs in its own process: ``gpu_check.py --worker PART --config work/config.json``)
# =============================================================================================
class Record:
    """A part's result, rewritten after every update so a killed part keeps what it measured."""

    def __init__(self, path: Path):
        self.path, self.data = path, {"checks": {}}

    def set(self, key: str, value) -> None:
        self.data[key] = value
        self.write()

    def check(self, name: str, ok: bool) -> None:
        self.data["checks"][name] = bool(ok)
        self.write()

    def write(self) -> None:
        from slimsd.io import atomic_write_text

        atomic_write_text(self.path, json.dumps(self.data, indent=2, default=str) + "\n")


def _sync(device: str):
    import torch

    return torch.cuda.synchronize if device == "cuda" else (lambda: None)


def part_tests(rec: Record, cfg: dict, work: Path, limit: float) -> None:
    files = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "tests").glob("test_*.py")
                   if re.search(r"mark\.gpu\b", p.read_text()))
    cmd = [sys.executable, "-m", "pytest", "-m", "gpu", "-rs", "-q", "-p", "no:cacheprovider", *files]
    import importlib.util

    if importlib.util.find_spec("tensorrt") is None:
        # they would skip in their body, but only after their fixtures exported ONNX files (~1 min)
        cmd[5:5] = ["-k", "not tensorrt"]
        rec.set("note", "tests with 'tensorrt' in their name deselected: the tensorrt package is not installed")
    rec.set("command", " ".join(["python"] + cmd[1:]).replace("-k not tensorrt", "-k 'not tensorrt'"))
    rec.set("files", files)
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    out = p.stdout + p.stderr
    summary = [ln for ln in out.splitlines() if re.search(r"\d+ (passed|failed|skipped|deselected|errors?)", ln)]
    counts = {k: int(n) for n, k in re.findall(r"(\d+) (passed|failed|skipped|deselected|errors?|xfailed|xpassed)",
                                                summary[-1] if summary else "")}
    rec.set("counts", counts)
    rec.set("skipped", [ln.strip() for ln in out.splitlines() if ln.startswith("SKIPPED")])
    rec.set("returncode", p.returncode)
    rec.set("output_tail", out[-3000:])
    rec.check("gpu tests collected", sum(counts.get(k, 0) for k in ("passed", "failed", "skipped", "error",
                                                                    "errors")) > 0)
    rec.check("no test failed", p.returncode == 0)


def part_prune(rec: Record, cfg: dict, work: Path, limit: float) -> None:
    from e2e_sd21 import pruning_plans

    plans, source = pruning_plans(PLANS, None, cfg["model"])
    name, removed = next(iter(plans.items()))
    rec.set("plan", {"name": name, "source": source, "removed_blocks": removed})
    out = work / "pruned"
    cmd = [sys.executable, "-m", "slimsd.cli", "compress", "prune", cfg["model"], "--blocks", ",".join(removed),
           "--out", str(out), "--json"]
    rec.set("command", "slimsd " + " ".join(cmd[3:]))
    t0 = time.perf_counter()
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    rec.set("wall_s", time.perf_counter() - t0)
    if p.returncode != 0:
        raise RuntimeError(f"slimsd compress prune exited {p.returncode}: {(p.stderr or p.stdout)[-2000:]}")
    r = json.loads(p.stdout.strip().splitlines()[-1])
    rec.set("unet_params", r["unet_params"])
    rec.check("pruned folder written", (out / "model_index.json").is_file())


def part_train(rec: Record, cfg: dict, work: Path, limit: float) -> None:
    import gc

    import torch

    from slimsd.compress.train import TrainConfig, train

    pruned = work / "pruned"
    if not (pruned / "model_index.json").is_file():
        raise FileNotFoundError(f"{pruned}: no pruned student (the prune part failed or did not run)")
    cuda = cfg["device"] == "cuda"
    n = cfg["train_steps"]
    if n < 2:
        raise ValueError(f"train_steps: at least 2 (a checkpoint, then a resumed step), got {n}")
    k = n // 2  # checkpoint every k steps; stage 1 is interrupted after the first and resumed
    base = dict(teacher=cfg["model"], data="scenes", num_latents=cfg["num_latents"], resolution=cfg["resolution"],
                max_steps=n, batch_size=cfg["train_batch"], mixed_precision=cfg["mixed_precision"],
                gradient_checkpointing=True, learning_rate=5e-5, checkpoints_total_limit=1, logging_steps=1,
                final_eval_prompts=0, report_to="none", seed=0)
    rec.set("settings", {**base, "resolution_latent": cfg["resolution"] // 8, "checkpointing_steps": k,
                         "device": cfg["device"]})

    class Interrupt(Exception):
        pass

    def run(stage_cfg, interrupt_at=None) -> dict:
        """One ``train`` call: the steps it ran, seconds between them, its peak GPU memory."""
        seen, stamps, peak = [], [], {}
        if cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            peak["allocated_at_start_gib"] = torch.cuda.memory_allocated() / 2**30  # > 0: an earlier run leaked

        def callback(step, accelerator):
            if cuda:
                torch.cuda.synchronize()
                if not seen:  # memory of the steps after the first (the loop's steady state)
                    peak["until_first_step_gib"] = torch.cuda.max_memory_allocated() / 2**30
                    torch.cuda.reset_peak_memory_stats()
                else:
                    peak["steps_gib"] = torch.cuda.max_memory_allocated() / 2**30
                    peak["steps_reserved_gib"] = torch.cuda.max_memory_reserved() / 2**30
            seen.append(step)
            stamps.append(time.perf_counter())
            if step == interrupt_at:
                raise Interrupt(step)

        t0 = time.perf_counter()
        try:
            train(stage_cfg, callback=callback)
            interrupted = False
        except Interrupt:
            interrupted = True
        gc.collect()
        every = stage_cfg.checkpointing_steps
        gaps = [b - a for s, a, b in zip(seen[1:], stamps, stamps[1:]) if s % every != 0]  # no checkpoint saves
        gaps = gaps or [b - a for a, b in zip(stamps, stamps[1:])]  # (every step saves one: the dry run)
        return {"steps": seen, "interrupted": interrupted, "wall_s": time.perf_counter() - t0, "step_gaps_s": gaps,
                "peak_gpu_mem": peak or None}

    def finite_losses(out: Path) -> tuple[list, bool]:
        log = json.loads((out / "loss_log.json").read_text())
        losses = [row["loss"] for row in log]
        return losses, bool(losses) and all(math.isfinite(x) for x in losses)

    def summary(runs: list[dict], out: Path) -> dict:
        import statistics

        gaps = [g for r in runs for g in r["step_gaps_s"]]
        tj = json.loads((out / "training.json").read_text())
        losses, ok = finite_losses(out)
        peaks = [r["peak_gpu_mem"] for r in runs if r["peak_gpu_mem"]]
        return {"s_per_step_median": statistics.median(gaps) if gaps else None,
                "s_per_step_training_json": tj.get("s_per_step"), "losses": losses, "losses_finite": ok,
                "peak_gpu_mem_gib": max((p.get("steps_gib", 0) for p in peaks), default=None),
                "allocated_at_start_gib": [p.get("allocated_at_start_gib") for p in peaks],
                "peak_gpu_mem_incl_load_gib": max((max(p.get("steps_gib", 0), p.get("until_first_step_gib", 0)) for p in peaks),
                                                  default=None),
                "student_params": tj.get("student_params_before"), "teacher_params": tj.get("teacher_unet_params"),
                "runs": runs}

    # --- stage 1: interrupted after its first checkpoint, then resumed ---------------------------
    s1, w1 = work / "stage1", work / "stage1.work"
    c1 = TrainConfig(stage=1, student=str(pruned), out=str(s1), work_dir=str(w1), checkpointing_steps=k, **base)
    stop = min(k + 2, n - 1)  # a step or two past the checkpoint: those are lost and redone
    last_ckpt = stop // k * k
    r_a = run(c1, interrupt_at=stop)
    ckpts = sorted(p.name for p in w1.glob("checkpoint-*"))
    rec.set("stage1_interrupted", {"at_step": r_a["steps"][-1] if r_a["steps"] else None, "checkpoints": ckpts})
    rec.check("stage 1: interrupted run left a checkpoint", r_a["interrupted"] and f"checkpoint-{last_ckpt}" in ckpts)
    c1.resume_from_checkpoint = "latest"
    r_b = run(c1)
    rec.check("stage 1: resumed run continued after the checkpoint",
              bool(r_b["steps"]) and r_b["steps"][0] == last_ckpt + 1 and r_b["steps"][-1] == n)
    st1 = summary([r_a, r_b], s1)
    rec.set("stage1", st1)
    rec.check("stage 1: losses finite", st1["losses_finite"])
    rec.check("stage 1: output written", (s1 / "slimsd.json").is_file())
    shutil.rmtree(w1, ignore_errors=True)  # a 466M student's checkpoint is ~5.6 GB (weights + AdamW)

    # --- stage 2: the stage-1 output distilled to 8 steps ---------------------------------------
    s2, w2 = work / "stage2", work / "stage2.work"
    c2 = TrainConfig(stage=2, student=str(s1), out=str(s2), work_dir=str(w2), checkpointing_steps=n,
                     student_steps=8, **base)
    r_c = run(c2)
    st2 = summary([r_c], s2)
    rec.set("stage2", st2)
    rec.check("stage 2: ran every step", r_c["steps"] == list(range(1, n + 1)))
    rec.check("stage 2: losses finite", st2["losses_finite"])
    rec.check("stage 2: checkpoint written", (w2 / f"checkpoint-{n}").is_dir())
    rec.check("stage 2: output written", (s2 / "slimsd.json").is_file())
    for p in (s1, s2, w2):
        shutil.rmtree(p, ignore_errors=True)


def pipeline_totals(times: dict, plans: list[str]) -> dict:
    """{variant: ms of SD 25 steps, ours 8 / 4 steps per plan, and the speedups} from component medians.

    total = text encoder + steps x U-Net step + VAE decode; a variant measured only for the U-Nets
    (compile*) takes the best of cudagraph / eager for text encoder and VAE, as gpu_e2e.py does."""
    variants = list(dict.fromkeys(v for row in times.values() for v in row))

    def best(c, v):
        row = times.get(c, {})
        if "median_s" in row.get(v, {}):
            return row[v]["median_s"]
        alts = [row[w]["median_s"] for w in ("cudagraph", "eager") if "median_s" in row.get(w, {})]
        return min(alts) if alts else None

    out = {}
    for v in variants:
        te, vae, sd = best("text_encoder", v), best("vae_decoder", v), best("unet", v)
        if None in (te, vae, sd) or "median_s" not in times.get("unet", {}).get(v, {}):
            continue
        row = {"SD 25 steps ms": 1e3 * (te + vae + 25 * sd)}
        for p in plans:
            u = times.get(f"unet:{p}", {}).get(v, {}).get("median_s")
            if u is None:
                continue
            for steps in (8, 4):
                row[f"{p}, {steps} steps ms"] = 1e3 * (te + vae + steps * u)
                row[f"{p}, speedup at {steps} steps"] = row["SD 25 steps ms"] / row[f"{p}, {steps} steps ms"]
        out[v] = row
    return out


def part_pipeline(rec: Record, cfg: dict, work: Path, limit: float) -> None:
    import torch

    import gpu_e2e
    from e2e_common import machine

    gpu_e2e.COMPILE_COST_S = cfg["compile_cost_s"]  # what one torch.compile may take before the budget says no
    a = argparse.Namespace(plans=str(PLANS), preset=cfg["model"], max_plans=1, variants=cfg["variants"],
                           repeats=cfg["repeats"], tensorrt_sd21=False)
    rec.set("settings", {k: v for k, v in vars(a).items()} | {"compile_cost_s": cfg["compile_cost_s"]})
    if cfg["device"] == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.benchmark = True

    class Results(gpu_e2e.Results):  # gpu_e2e's record, mirrored into this part's after every section
        def write(self):
            super().write()
            sec = self.data["sections"].get("sd21")
            if sec:
                rec.data.update(
                    attention=sec["attention"], dtype=sec["dtype"], plans_source=sec["plans_source"],
                    plans=sec["plans"], params=sec["flops"].get("params"),
                    gflops={c: f / 1e9 for c, f in sec["flops"].items() if isinstance(f, (int, float))},
                    component_ms={c: {v: (1e3 * x["median_s"] if "median_s" in x else x.get("error"))
                                      for v, x in row.items()} for c, row in sec["times"].items()},
                    compile_s={c: {v: x["compile_s"] for v, x in row.items() if "compile_s" in x}
                               for c, row in sec["times"].items()},
                    totals=pipeline_totals(sec["times"], list(sec["plans"])),
                    e2e_ms={k: {v: (1e3 * x["median_s"] if "median_s" in x else x.get("error")) for v, x in row.items()}
                            for k, row in sec["e2e"].items()})
            rec.data["errors"] = dict(self.data["errors"])
            rec.write()

    res = Results(work / "gpu_e2e", machine(torch.get_num_threads(), with_gpu=True))
    gpu_e2e.sd21_section(res, a, cfg["device"], gpu_e2e.Budget(max(0.0, limit - 20)))
    res.write()
    rec.check("component times measured", bool(rec.data.get("totals")))
    rec.check("pipeline end to end measured", any(isinstance(x, float) for row in rec.data.get("e2e_ms", {}).values()
                                                  for x in row.values()))


def part_serve(rec: Record, cfg: dict, work: Path, limit: float) -> None:
    import statistics

    import numpy as np
    import torch

    from slimsd.serve.pipeline import load_pipeline
    from slimsd.serve.settings import ServeSettings

    try:
        import onnxruntime as ort

        providers = ort.get_available_providers()
        ort_info = {"version": ort.__version__, "providers": providers}
    except ImportError as e:
        providers, ort_info = [], {"error": f"{type(e).__name__}: {e}"}
    has_cuda_ep = "CUDAExecutionProvider" in providers
    ort_info["note"] = ("CUDAExecutionProvider present: `slimsd serve --backend onnxruntime --device cuda` can run "
                        "the ONNX files on the GPU (not timed by this script)" if has_cuda_ep else
                        "onnxruntime-gpu is not installed (no CUDAExecutionProvider): the ONNX files are not run on "
                        "the GPU; the serve pipeline runs through the torch runner on CUDA instead")
    rec.set("onnxruntime", ort_info)
    print(ort_info["note"], file=sys.stderr, flush=True)

    pruned = work / "pruned"
    models = {"SD": cfg["model"], "ours": str(pruned) if (pruned / "model_index.json").is_file() else None}
    rows, sync = {}, _sync(cfg["device"])
    rec.set("settings", {"backend": "torch", "device": cfg["device"], "dtype": cfg["dtype"], "prompt": PROMPT,
                         "seed": SEED, "guidance": GUIDANCE, "repeats": cfg["serve_repeats"]})
    for role, model in models.items():
        if model is None:
            rows[role] = {"error": f"{pruned}: no pruned student (the prune part failed or did not run)"}
            rec.set("rows", rows)
            continue
        t0 = time.perf_counter()
        pipe = load_pipeline(ServeSettings(model=model, backend="torch", device=cfg["device"], dtype=cfg["dtype"],
                                           warmup=False))
        load_s = time.perf_counter() - t0
        for label, steps in STEPS.items():
            if not label.startswith(role):
                continue
            img = pipe.generate([PROMPT], None, [SEED], steps=steps, guidance=GUIDANCE)  # warm-up
            sync()
            times = []
            for _ in range(cfg["serve_repeats"]):
                t0 = time.perf_counter()
                img = pipe.generate([PROMPT], None, [SEED], steps=steps, guidance=GUIDANCE)
                sync()
                times.append(time.perf_counter() - t0)
            rows[label] = {"steps": steps, "median_ms": 1e3 * statistics.median(times), "n": len(times),
                           "load_s": load_s, "image_shape": list(img.shape), "image_std": float(np.std(img)),
                           "image_mean": float(np.mean(img))}
            rec.set("rows", rows)
            rec.check(f"{label}: one {pipe.image_size[0]}x{pipe.image_size[1]} image",
                      tuple(img.shape) == (1, *pipe.image_size, 3) and img.dtype == np.uint8)
        del pipe
        if cfg["device"] == "cuda":
            torch.cuda.empty_cache()
    sd, ours = rows.get("SD", {}), rows.get("ours 8", {})
    if "median_ms" in sd and "median_ms" in ours:
        rec.set("speedup", {f"SD 25 / {k}": sd["median_ms"] / rows[k]["median_ms"]
                            for k in ("ours 8", "ours 4") if "median_ms" in rows.get(k, {})})


WORKERS = {"tests": part_tests, "prune": part_prune, "train": part_train, "pipeline": part_pipeline,
           "serve": part_serve}


def worker(part: str, config: Path, limit: float) -> int:
    sys.path.insert(0, str(HERE))  # gpu_e2e, e2e_sd21, e2e_common
    c = json.loads(config.read_text())
    work = Path(c["work"])
    rec = Record(work / f"{part}.json")
    rec.write()
    try:
        WORKERS[part](rec, c["settings"], work, limit)
    except Exception as e:  # noqa: BLE001 - recorded; the orchestrator goes on with the next part
        rec.set("error", f"{type(e).__name__}: {e}")
        rec.set("traceback", traceback.format_exc()[-4000:])
        print(traceback.format_exc(), file=sys.stderr)
        return 1
    return 0


# =============================================================================================
# orchestrator
# =============================================================================================
def machine_info() -> dict:
    import torch

    from slimsd.loadtest.machine import machine_info as base

    info = base(torch.get_num_threads(), with_gpu=True)
    info["torch"] = torch.__version__
    info["torch_cuda"] = torch.version.cuda
    info["cudnn"] = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    info["driver"] = None
    if shutil.which("nvidia-smi"):
        try:
            q = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
                               capture_output=True, text=True, timeout=20)
            if q.returncode == 0 and q.stdout.strip():
                info["nvidia_smi"] = q.stdout.strip().splitlines()
                info["driver"] = q.stdout.strip().splitlines()[0].split(",")[1].strip()
        except (OSError, subprocess.TimeoutExpired) as e:
            info["nvidia_smi_error"] = str(e)
    return info


def run_part(part: str, config: Path, work: Path, limit: float, env: dict) -> dict:
    """The part in its own process group, killed with its children past ``limit`` seconds."""
    log = work / f"{part}.log"
    t0 = time.monotonic()
    with open(log, "w") as f:
        p = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "--worker", part, "--config", str(config),
                              "--part-limit", str(limit)], cwd=ROOT,
                             stdout=f, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        try:
            rc = p.wait(timeout=limit)
            timed_out = False
        except subprocess.TimeoutExpired:
            timed_out = True
            for sig in (signal.SIGTERM, signal.SIGKILL):
                try:
                    os.killpg(p.pid, sig)
                except ProcessLookupError:
                    break
                try:
                    p.wait(timeout=10)
                    break
                except subprocess.TimeoutExpired:
                    continue
            rc = p.returncode
    wall = time.monotonic() - t0
    result_path = work / f"{part}.json"
    try:
        result = json.loads(result_path.read_text())
    except (OSError, json.JSONDecodeError):
        result = {}
    failed = [k for k, ok in result.get("checks", {}).items() if not ok]
    if timed_out:
        status = "timed out"
    elif rc != 0 or result.get("error") or failed or not result.get("checks"):
        status = "failed"
    else:
        status = "passed"
    out = {"status": status, "wall_s": round(wall, 1), "limit_s": limit, "returncode": rc, "result": result,
           "failed_checks": failed}
    if status != "passed":
        out["log_tail"] = log.read_text(errors="replace")[-3000:] if log.is_file() else ""
        if timed_out:
            out["error"] = f"killed after its time limit of {limit:g} s"
        else:
            out["error"] = result.get("error") or (f"checks failed: {', '.join(failed)}" if failed else
                                                   f"exited {rc} without a result")
    return out


def _fmt(x, digits=1) -> str:
    if isinstance(x, (int, float)) and not isinstance(x, bool):
        return f"{x:,.{digits}f}"
    return "-" if x is None else str(x)


def markdown(d: dict) -> str:
    from slimsd.loadtest.machine import describe

    m = d["machine"]
    gpu = m.get("gpu") or {}
    L = ["# GPU check: CUDA tests, training at SD size, 512x512 latency, serving", ""]
    if d["dry_run"]:
        L += ["**DRY RUN on the CPU** (tiny-sd instead of sd21-base-arch, 1-2 steps, fp32): it checks the script, "
              "not the GPU. No number below is a GPU number.", ""]
    L += [f"GPU: {gpu.get('name', 'none')}"
          + (f" ({gpu['memory_gib']} GiB, compute capability {gpu['capability']}, {gpu['count']} visible)" if gpu else "")
          + f"; driver {m.get('driver') or '-'}; torch {m.get('torch')} (CUDA {m.get('torch_cuda') or '-'}, "
          f"cuDNN {m.get('cudnn') or '-'}).", "", f"Machine: {describe(m)}.", "",
          f"Command: `{d['command']}`; {d['wall_s']:.0f} s in all ({d['when']}).", "",
          "| part | status | wall s | limit s | note |", "|---|---|---:|---:|---|"]
    for p, r in d["parts"].items():
        note = r.get("error", "")[:160].replace("|", "/").replace("\n", " ")
        L.append(f"| {p} | **{r['status']}** | {_fmt(r.get('wall_s'))} | {_fmt(r.get('limit_s'), 0)} | {note} |")
    parts = {p: r.get("result") or {} for p, r in d["parts"].items()}

    t = parts.get("tests", {})
    if t.get("counts") is not None:
        L += ["", "## CUDA tests", "", f"`{t.get('command', '')}`: "
              + ", ".join(f"{n} {k}" for k, n in t["counts"].items()), ""]
        L += [f"* {s}" for s in t.get("skipped", [])] + ([f"* {t['note']}"] if t.get("note") else [])
    pr = parts.get("prune", {})
    if pr.get("unet_params"):
        u = pr["unet_params"]
        L += ["", "## Pruning", "", f"`{pr.get('command', '')[:200]}...`: U-Net {u['before']:,} -> {u['after']:,} "
              f"parameters ({100 * u['kept_fraction']:.1f}% kept), plan {pr['plan']['name']!r}, {_fmt(pr.get('wall_s'))} s."]
    tr = parts.get("train", {})
    if tr.get("settings"):
        s = tr["settings"]
        L += ["", "## Training at SD size", "",
              f"Student: the pruned folder; teacher `{s['teacher']}`; {s['resolution']}x{s['resolution']} scene images "
              f"({s['resolution_latent']}x{s['resolution_latent']} latents, {s['num_latents']} cached), batch "
              f"{s['batch_size']}, {s['max_steps']} steps per stage, mixed precision `{s['mixed_precision']}`, "
              f"gradient checkpointing, checkpoint every {s['checkpointing_steps']} steps; stage 1 is interrupted after "
              "its first checkpoint and resumed.", "",
              "| stage | s/step (median) | s/step (training.json) | peak GPU memory, steps (GiB) | peak incl. load "
              "(GiB) | first / last loss | losses finite |", "|---|---:|---:|---:|---:|---:|---|"]
        for st in ("stage1", "stage2"):
            x = tr.get(st)
            if x:
                ls = x.get("losses") or []
                L.append(f"| {st[-1]} | {_fmt(x['s_per_step_median'], 3)} | {_fmt(x['s_per_step_training_json'], 3)} | "
                         f"{_fmt(x['peak_gpu_mem_gib'], 1)} | {_fmt(x['peak_gpu_mem_incl_load_gib'], 1)} | "
                         f"{_fmt(ls[0] if ls else None, 4)} / {_fmt(ls[-1] if ls else None, 4)} | {x['losses_finite']} |")
        if tr.get("stage1_interrupted"):
            L += ["", f"Stage 1 interrupted at step {tr['stage1_interrupted']['at_step']} with "
                  f"{', '.join(tr['stage1_interrupted']['checkpoints']) or 'no checkpoint'}; resumed run's steps: "
                  f"{(tr.get('stage1') or {}).get('runs', [{}, {}])[-1].get('steps', '-')}."]
    pl = parts.get("pipeline", {})
    if pl.get("component_ms"):
        variants = list(dict.fromkeys(v for row in pl["component_ms"].values() for v in row))
        L += ["", f"## 512x512 pipeline, {pl.get('dtype', '').replace('torch.', '')} (gpu_e2e.py components)", "",
              f"Attention: U-Net {', '.join(pl['attention']['unet'])}; text encoder `{pl['attention']['text_encoder']}`. "
              f"Plan: {pl.get('plans_source', '')}.", "",
              "| component (ms) | GFLOP | " + " | ".join(variants) + " |", "|---|---:|" + "---:|" * len(variants)]
        for c, row in pl["component_ms"].items():
            L.append(f"| {c} | {_fmt(pl['gflops'].get(c), 1)} | "
                     + " | ".join(_fmt(row.get(v), 2) if not isinstance(row.get(v), str) else row[v][:50]
                                  for v in variants) + " |")
        if pl.get("totals"):
            cols = list(dict.fromkeys(k for row in pl["totals"].values() for k in row))
            L += ["", "Totals (text encoder + steps x U-Net + VAE decode, one image with CFG):", "",
                  "| variant | " + " | ".join(cols) + " |", "|---|" + "---:|" * len(cols)]
            for v, row in pl["totals"].items():
                L.append(f"| {v} | " + " | ".join(
                    (f"**{row[c]:.2f}x**" if "speedup" in c else _fmt(row[c], 1)) if c in row else "-" for c in cols) + " |")
        if pl.get("e2e_ms"):
            L += ["", "diffusers `StableDiffusionPipeline` end to end (latents out), ms:", "",
                  "| U-Net | eager | compiled U-Net |", "|---|---:|---:|"]
            for k, row in pl["e2e_ms"].items():
                L.append(f"| {k} ({25 if k == 'SD' else 8} steps) | {_fmt(row.get('eager'), 1)} | "
                         f"{_fmt(row.get('compile'), 1)} |")
    sv = parts.get("serve", {})
    if sv.get("onnxruntime"):
        L += ["", "## Serving (slimsd.serve, torch runner)", "", f"ONNX Runtime: {sv['onnxruntime'].get('note')} "
              f"(providers: {', '.join(sv['onnxruntime'].get('providers', [])) or sv['onnxruntime'].get('error')}).", ""]
        if sv.get("rows"):
            s = sv["settings"]
            L += [f"`backend torch`, device {s['device']}, {s['dtype']}, prompt {s['prompt']!r}, seed {s['seed']}, "
                  f"guidance {s['guidance']}, median of {s['repeats']} after one warm-up:", "",
                  "| model | steps | ms / image | load s |", "|---|---:|---:|---:|"]
            for k, r in sv["rows"].items():
                L.append(f"| {k} | {r.get('steps', '-')} | {_fmt(r.get('median_ms'), 1)} | {_fmt(r.get('load_s'), 1)} |"
                         if "median_ms" in r else f"| {k} | | {r.get('error', '')[:100]} | |")
            if sv.get("speedup"):
                L += ["", "Speedup: " + ", ".join(f"{k} **{v:.2f}x**" for k, v in sv["speedup"].items())
                      + " (paper: 3.0x at 25 -> 8 steps, A6000)."]
    L += ["", "Weights are random (`sd21-base-arch`, tiny-sd in a dry run): speed, memory and whether the code "
          "runs; never image quality. What this does not check: docs/gpu.md."]
    return "\n".join(L) + "\n"


def parse_limits(items: list[str], dry_run: bool) -> dict:
    limits = dict(DRY_LIMITS if dry_run else LIMITS)
    for item in items:
        part, eq, sec = item.partition("=")
        if part not in PARTS or not eq:
            raise SystemExit(f"--limit: expected PART=SECONDS with PART one of {', '.join(PARTS)}, got {item!r}")
        try:
            limits[part] = float(sec)
        except ValueError:
            raise SystemExit(f"--limit {item}: SECONDS must be a number, got {sec!r}") from None
        if limits[part] <= 0:
            raise SystemExit(f"--limit {item}: SECONDS must be > 0")
    return limits


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dry-run", action="store_true", help="the same code on the CPU with tiny-sd, 1-2 steps, fp32")
    ap.add_argument("--out", default=str(RESULTS), help="folder for gpu_check.md / gpu_check.json")
    ap.add_argument("--parts", default=",".join(PARTS), help=f"comma list of {', '.join(PARTS)}")
    ap.add_argument("--limit", action="append", default=[], metavar="PART=SECONDS",
                    help="time limit of one part (repeatable); defaults: " + ", ".join(f"{k} {v}" for k, v in LIMITS.items())
                    + f" (dry run: {DRY_LIMITS['tests']} each)")
    ap.add_argument("--total-s", type=float, default=None,
                    help=f"time limit of the whole run (default {TOTAL_S}, dry run {DRY_TOTAL_S}): each part gets at "
                    "most what is left")
    ap.add_argument("--work", default=None, help="scratch folder (default: a new temp folder, deleted at the end)")
    ap.add_argument("--keep-work", action="store_true", help="keep the scratch folder (logs, the pruned model)")
    ap.add_argument("--train-steps", type=int, default=20, help="steps per training stage (GPU)")
    ap.add_argument("--train-batch", type=int, default=4, help="training batch (GPU)")
    ap.add_argument("--repeats", type=int, default=10, help="timed calls per component (GPU)")
    ap.add_argument("--variants", default="eager,cudagraph,compile",
                    help="gpu_e2e.py variants: eager, cudagraph, compile, compile+cudagraphs")
    ap.add_argument("--compile-cost-s", type=float, default=50,
                    help="start a torch.compile only with this many seconds (+60) left in the pipeline part")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--config", help=argparse.SUPPRESS)
    ap.add_argument("--part-limit", type=float, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.worker:
        return worker(a.worker, Path(a.config), a.part_limit)

    parts = [p for p in a.parts.split(",") if p]
    bad = [p for p in parts if p not in PARTS]
    if bad:
        raise SystemExit(f"--parts: unknown part(s) {', '.join(bad)}; choose from {', '.join(PARTS)}")
    limits = parse_limits(a.limit, a.dry_run)
    import importlib.util

    try:
        installed = importlib.util.find_spec("slimsd.compress") is not None
    except ModuleNotFoundError:  # not even the core package on the path
        installed = False
    if not installed:
        print("gpu_check.py: slimsd is not installed (slimsd.compress does not import); run "
              "`pip install -e . --no-deps --no-build-isolation` in the repository first", file=sys.stderr)
        return 2
    import torch

    if not a.dry_run and not torch.cuda.is_available():
        print(f"gpu_check.py: needs a CUDA GPU, and torch.cuda.is_available() is False here (torch {torch.__version__}, "
              f"CUDA build: {torch.version.cuda or 'none - a CPU-only torch'}). Nothing was written. Run it on a machine "
              "with an NVIDIA GPU and a CUDA build of torch, or use --dry-run to check the script on the CPU.",
              file=sys.stderr)
        return 2

    t0 = time.monotonic()
    work = Path(a.work) if a.work else Path(tempfile.mkdtemp(prefix="gpu_check_"))
    work.mkdir(parents=True, exist_ok=True)
    config = work / "config.json"
    cfg = settings(a.dry_run, a)
    config.write_text(json.dumps({"work": str(work), "settings": cfg}, indent=2))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1"}
    if a.dry_run:
        env.setdefault("OMP_NUM_THREADS", "1")  # tiny modules: one thread beats two on a shared 2-core machine
    cmd = "python benchmarks/gpu_check.py " + " ".join(sys.argv[1:] if argv is None else argv)
    d = {"dry_run": a.dry_run, "command": cmd.strip(), "when": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
         "machine": machine_info(), "settings": cfg, "parts": {}, "wall_s": 0.0}
    out = Path(a.out)

    def write():
        from slimsd.io import atomic_write_text

        d["wall_s"] = time.monotonic() - t0
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out / "gpu_check.json", json.dumps(d, indent=2, default=str) + "\n")
        try:
            md = markdown(d)
        except Exception as e:  # noqa: BLE001 - partial data must never lose the JSON
            md = f"# GPU check\n\n(table not rendered: {type(e).__name__}: {e}; see gpu_check.json)\n"
        atomic_write_text(out / "gpu_check.md", md)

    for p in PARTS:
        d["parts"][p] = {"status": "not run", "limit_s": limits[p]} if p not in parts else {"status": "pending",
                                                                                            "limit_s": limits[p]}
    total = a.total_s or (DRY_TOTAL_S if a.dry_run else TOTAL_S)
    d["total_limit_s"] = total
    for p in [p for p in PARTS if p in parts]:
        left = total - (time.monotonic() - t0)
        if left < MIN_PART_S:
            d["parts"][p] = {"status": "not run", "limit_s": limits[p],
                             "error": f"the whole run's limit of {total:g} s was spent ({left:.0f} s left)"}
            write()
            continue
        limit = min(limits[p], left)
        print(f"gpu_check: {p} (limit {limit:g} s) ...", file=sys.stderr, flush=True)
        d["parts"][p] = run_part(p, config, work, limit, env)
        print(f"gpu_check: {p}: {d['parts'][p]['status']} in {d['parts'][p]['wall_s']:.0f} s"
              + (f" - {d['parts'][p]['error'][:300]}" if d["parts"][p].get("error") else ""), file=sys.stderr, flush=True)
        write()
    write()
    if not a.keep_work and not a.work:
        shutil.rmtree(work, ignore_errors=True)
    print((out / "gpu_check.md").read_text())
    return 0 if all(d["parts"][p]["status"] == "passed" for p in parts) else 1


if __name__ == "__main__":
    sys.exit(main())
