"""CPU runtimes side by side: ONNX Runtime fp32, OpenVINO f32 / bf16, torch fp32 / bf16.

    python benchmarks/cpu_backends.py --quick                 # tiny-sd only (a few minutes on 2 cores)
    python benchmarks/cpu_backends.py --sd21-onnx runs/onnx-sd21   # + tiny-sd-slim + sd21-base-arch components
    python benchmarks/cpu_backends.py --quick --accuracy 128  # + bf16 vs fp32 images and evaluator scores

Sections (each row is one runtime; all on CPU, ``--threads`` intra-op threads, default all):

* **end to end** on ``tiny-sd`` (and ``tiny-sd-slim`` when its preset resolves, without
  ``--quick``): ``slimsd.denoise.generate`` over each runtime's runners, the model's default steps (25; 8 for tiny-sd-slim), guidance 7.5,
  64x64, one image and a batch of four. Repeats are interleaved across runtimes
  (round-robin), so load from other processes hits all of them alike; the median is reported.
* **start-up** (tiny-sd; sd21 too with ``--sd21-onnx``): per component, ONNX Runtime session
  load; OpenVINO compile from the ONNX file with no cache, from OpenVINO IR
  (``openvino.save_model``, conversion timed apart) with no cache, and from a warm
  ``CACHE_DIR``.
* **components** of ``sd21-base-arch`` (random weights), only with ``--sd21-onnx`` (an fp32
  ``slimsd export onnx sd21-base-arch`` folder): U-Net batch 2 at a 64x64 latent, VAE decode
  to 512x512 (batch 1), text encoder batch 2; ``--sd21-calls`` timed calls (default 3) after
  one warm-up call, one runtime loaded at a time (memory), median reported.
* **accuracy** (``--accuracy N``): OpenVINO bf16 and f32 against ONNX Runtime fp32 on the same
  seeds (max / mean |pixel difference| over the N images), and FD / alignment of
  :func:`slimsd.evaluator.evaluate` (25 steps, guidance 7.5) for each, plus ONNX Runtime fp32
  with evaluation seed 1 (other prompts and seeds) as the noise yardstick.

Writes ``benchmarks/results/cpu_backends.{md,json}`` with the CPU model, its bf16/AMX/AVX-512
flags, OpenVINO's ``OPTIMIZATION_CAPABILITIES`` and the load average before and after.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).parent / "results"
FLAGS = ("amx_bf16", "amx_tile", "amx_int8", "avx512_bf16", "avx512f", "avx512_vnni", "avx512_fp16", "avx2", "fma")
RUNTIMES = ("onnxruntime-fp32", "openvino-f32", "openvino-bf16", "torch-fp32", "torch-bf16")
PROMPT = "a red circle left of a blue square"


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# -- the machine --------------------------------------------------------------------------------
def machine() -> dict:
    from slimsd.hardware import cpu_model_and_flags

    name, flags = cpu_model_and_flags()
    import onnxruntime
    import torch

    info = {"cpu": name, "flags": {f: f in flags for f in FLAGS}, "cores": os.cpu_count(),
            "torch": torch.__version__, "onnxruntime": onnxruntime.__version__, "python": platform.python_version()}
    try:
        import openvino as ov

        from slimsd.serve.runners_openvino import cpu_capabilities

        info["openvino"] = ov.__version__
        info["openvino_capabilities"] = cpu_capabilities()
    except ImportError:
        info["openvino"] = None
    return info


def loadavg() -> list[float]:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return []


# -- runners of each runtime -----------------------------------------------------------------------
def torch_runners(folder: Path, dtype: str, threads: int | None):
    """serve's TorchRunners; bf16 = modules and float inputs in bfloat16 (timestep stays float32)."""
    from slimsd.serve.runners_torch import TorchRunners

    return TorchRunners(folder, device="cpu", dtype="bfloat16" if dtype == "bf16" else "float32", threads=threads)


def make_runners(runtime: str, onnx_dir: Path, folder: Path, threads: int | None, ov_cache=False):
    if runtime == "onnxruntime-fp32":
        from slimsd.runners_ort import OrtRunners

        return OrtRunners(onnx_dir, providers=["CPUExecutionProvider"], threads=threads)
    if runtime.startswith("openvino-"):
        from slimsd.serve.runners_openvino import OpenVINORunners

        return OpenVINORunners(onnx_dir, precision=runtime.split("-")[1], threads=threads, cache=ov_cache)
    if runtime.startswith("torch-"):
        return torch_runners(folder, runtime.split("-")[1], threads)
    raise ValueError(runtime)


def available_runtimes() -> list[str]:
    from slimsd.serve.runners_openvino import available, cpu_supports_bf16

    out = ["onnxruntime-fp32"]
    if available():
        out.append("openvino-f32")
        if cpu_supports_bf16():
            out.append("openvino-bf16")
    return out + ["torch-fp32", "torch-bf16"]


# -- end to end -------------------------------------------------------------------------------------
def end_to_end(model: str, threads: int | None, repeats: int, runtimes: list[str]) -> dict:
    from slimsd.denoise import generate, load_scheduler, load_tokenizer
    from slimsd.models import resolve_model
    from slimsd.serve.models import ensure_onnx
    from slimsd.specs import ModelDims

    folder = resolve_model(model)
    onnx_dir = ensure_onnx(model, folder)
    dims = ModelDims.from_folder(folder)
    tok, sched = load_tokenizer(folder / "tokenizer"), load_scheduler(folder / "scheduler")
    h, w = dims.image_size
    from slimsd.defaults import generation_defaults

    steps = generation_defaults(folder).steps  # 25 for the teacher, 8 for the step-distilled student
    runners, load_s = {}, {}
    for rt in runtimes:
        t0 = time.perf_counter()
        runners[rt] = make_runners(rt, onnx_dir, folder, threads)
        load_s[rt] = time.perf_counter() - t0

    def gen(rt, n):
        return generate(runners[rt], tok, sched, [PROMPT] * n, None, steps=steps, guidance=7.5, seeds=list(range(n)),
                        height=h, width=w, vae_scaling_factor=dims.vae_scaling_factor,
                        vae_scale_factor=dims.vae_scale_factor, latent_channels=dims.latent_channels)

    times = {rt: {1: [], 4: []} for rt in runtimes}
    for rt in runtimes:  # warm-up: first-call allocations and kernel choice off the clock
        gen(rt, 1), gen(rt, 4)
    for i in range(repeats):
        for n in (1, 4):
            for rt in runtimes:
                t0 = time.perf_counter()
                gen(rt, n)
                times[rt][n].append(time.perf_counter() - t0)
        log(f"[{model}] repeat {i + 1}/{repeats}: " + ", ".join(f"{rt} {times[rt][1][-1]:.2f}s" for rt in runtimes))
    rows = {rt: {"load_s": round(load_s[rt], 2),
                 "image_s": round(statistics.median(times[rt][1]), 3),
                 "batch4_s": round(statistics.median(times[rt][4]), 3),
                 "batch4_per_image_s": round(statistics.median(times[rt][4]) / 4, 3),
                 "runs": {str(k): [round(x, 3) for x in v] for k, v in times[rt].items()}} for rt in runtimes}
    return {"model": model, "image_size": [h, w], "steps": steps, "guidance": 7.5, "repeats": repeats, "rows": rows}


# -- start-up ------------------------------------------------------------------------------------------
def startup(onnx_dir: Path, threads: int | None, components=("text_encoder", "unet", "vae_decoder")) -> dict:
    import onnxruntime as ort
    import openvino as ov

    cfg = {"PERFORMANCE_HINT": "LATENCY", "NUM_STREAMS": "1", "INFERENCE_PRECISION_HINT": "f32"}
    if threads:
        cfg["INFERENCE_NUM_THREADS"] = str(threads)
    out = {}
    with tempfile.TemporaryDirectory(prefix="slimsd-ov-") as tmp:
        tmp = Path(tmp)
        for name in components:
            onnx = onnx_dir / name / "model.onnx"
            so = ort.SessionOptions()
            if threads:
                so.intra_op_num_threads = threads
            t0 = time.perf_counter()
            s = ort.InferenceSession(str(onnx), so, providers=["CPUExecutionProvider"])
            ort_s = time.perf_counter() - t0
            del s
            gc.collect()
            row = {"onnxruntime_load_s": round(ort_s, 2)}
            for prec in ("f32", "bf16"):
                c = {**cfg, "INFERENCE_PRECISION_HINT": prec}
                t0 = time.perf_counter()
                m = ov.Core().compile_model(str(onnx), "CPU", c)
                row[f"openvino_{prec}_onnx_cold_s"] = round(time.perf_counter() - t0, 2)
                del m
                gc.collect()
            t0 = time.perf_counter()
            ov.save_model(ov.Core().read_model(str(onnx)), str(tmp / f"{name}.xml"), compress_to_fp16=False)
            row["ir_convert_s"] = round(time.perf_counter() - t0, 2)
            gc.collect()
            t0 = time.perf_counter()
            m = ov.Core().compile_model(str(tmp / f"{name}.xml"), "CPU", cfg)
            row["openvino_f32_ir_cold_s"] = round(time.perf_counter() - t0, 2)
            del m
            gc.collect()
            core = ov.Core()
            core.set_property({"CACHE_DIR": str(tmp / f"cache-{name}")})
            core.compile_model(str(onnx), "CPU", cfg)  # fills the cache
            gc.collect()
            core = ov.Core()
            core.set_property({"CACHE_DIR": str(tmp / f"cache-{name}")})
            t0 = time.perf_counter()
            m = core.compile_model(str(onnx), "CPU", cfg)
            row["openvino_f32_cache_warm_s"] = round(time.perf_counter() - t0, 2)
            del m
            shutil.rmtree(tmp / f"cache-{name}", ignore_errors=True)
            for p in tmp.glob(f"{name}.*"):
                p.unlink()
            gc.collect()
            out[name] = row
            log(f"[start-up] {onnx_dir.name}/{name}: {row}")
    return out


# -- sd21 components ------------------------------------------------------------------------------------
def sd21_components(onnx_dir: Path, threads: int | None, calls: int, runtimes: list[str]) -> dict:
    from slimsd.models import resolve_model

    folder = resolve_model("sd21-base-arch")
    rng = np.random.default_rng(0)
    inputs = {
        "unet": dict(sample=rng.standard_normal((2, 4, 64, 64), dtype=np.float32),
                     timestep=np.array([500.0, 500.0], np.float32),
                     encoder_hidden_states=rng.standard_normal((2, 77, 1024), dtype=np.float32)),
        "vae_decoder": dict(latent_sample=rng.standard_normal((1, 4, 64, 64), dtype=np.float32)),
        "text_encoder": dict(input_ids=rng.integers(0, 49408, (2, 77)).astype(np.int64)),
    }
    rows: dict = {}
    for rt in runtimes:
        for comp, feeds in inputs.items():
            call, load_s = _component_runner(rt, comp, onnx_dir, folder, threads)
            call(**feeds)  # warm-up
            ts = []
            for _ in range(calls):
                t0 = time.perf_counter()
                call(**feeds)
                ts.append(time.perf_counter() - t0)
            rows.setdefault(comp, {})[rt] = {"median_s": round(statistics.median(ts), 3), "load_s": round(load_s, 2),
                                             "runs": [round(x, 3) for x in ts]}
            log(f"[sd21] {comp} {rt}: {rows[comp][rt]}")
            del call
            gc.collect()
    return {"calls": calls, "rows": rows,
            "shapes": {"unet": "batch 2, latent 64x64", "vae_decoder": "batch 1 -> 512x512", "text_encoder": "batch 2"}}


def _component_runner(rt: str, comp: str, onnx_dir: Path, folder: Path, threads: int | None):
    """One component of one runtime: (callable on the spec's numpy inputs, load seconds)."""
    t0 = time.perf_counter()
    if rt == "onnxruntime-fp32":
        import onnxruntime as ort

        so = ort.SessionOptions()
        if threads:
            so.intra_op_num_threads = threads
        s = ort.InferenceSession(str(onnx_dir / comp / "model.onnx"), so, providers=["CPUExecutionProvider"])
        first = s.get_outputs()[0].name

        def call(**f):
            return s.run([first], f)[0]
    elif rt.startswith("openvino-"):
        import openvino as ov

        cfg = {"PERFORMANCE_HINT": "LATENCY", "NUM_STREAMS": "1", "INFERENCE_PRECISION_HINT": rt.split("-")[1]}
        if threads:
            cfg["INFERENCE_NUM_THREADS"] = str(threads)
        req = ov.Core().compile_model(str(onnx_dir / comp / "model.onnx"), "CPU", cfg).create_infer_request()

        def call(**f):
            req.infer(f)
            return req.get_output_tensor(0).data
    else:
        import torch

        from slimsd.serve.runners_torch import _SUB, load_component

        dtype = torch.bfloat16 if rt.endswith("bf16") else torch.float32
        if threads:
            torch.set_num_threads(threads)
        m = load_component(folder, _SUB[comp]).to(dtype).eval()

        def t(a, keep=False):
            x = torch.from_numpy(a)
            return x.to(dtype) if x.is_floating_point() and not keep else x

        @torch.inference_mode()
        def call(**f):
            if comp == "unet":
                return m(t(f["sample"]), t(f["timestep"], keep=True), t(f["encoder_hidden_states"]), return_dict=False)[0]
            if comp == "vae_decoder":
                return m.decode(t(f["latent_sample"]), return_dict=False)[0]
            return m(t(f["input_ids"]), return_dict=False)[0]
    return call, time.perf_counter() - t0


# -- accuracy ------------------------------------------------------------------------------------------
def accuracy(model: str, num_prompts: int, threads: int | None, batch: int = 16, only=None) -> dict:
    from PIL import Image

    from slimsd.evaluator import evaluate
    from slimsd.models import resolve_model
    from slimsd.serve.models import ensure_onnx

    folder = resolve_model(model)
    onnx_dir = ensure_onnx(model, folder)
    cache: dict = {}

    from slimsd.denoise import generate, load_scheduler, load_tokenizer
    from slimsd.specs import ModelDims

    dims = ModelDims.from_folder(folder)
    tok = load_tokenizer(folder / "tokenizer")

    def fn_for(rt):
        runners = make_runners(rt, onnx_dir, folder, threads)

        def fn(prompts, seeds):
            # the one loop every runtime shares (serve's Pipeline.generate), DDIM from the model's config
            arrays = [generate(runners, tok, load_scheduler(folder / "scheduler"), prompts[i:i + batch], None,
                               steps=25, guidance=7.5, seeds=seeds[i:i + batch], height=dims.image_size[0],
                               width=dims.image_size[1], vae_scaling_factor=dims.vae_scaling_factor,
                               vae_scale_factor=dims.vae_scale_factor, latent_channels=dims.latent_channels)
                      for i in range(0, len(prompts), batch)]
            arr = np.concatenate(arrays)
            cache[(rt, tuple(seeds))] = arr
            return [Image.fromarray(a) for a in arr]
        return fn

    scores = {}
    runs = [("onnxruntime-fp32", 0), ("openvino-f32", 0), ("openvino-bf16", 0), ("torch-bf16", 0), ("onnxruntime-fp32", 1)]
    if only:
        runs = [r for r in runs if r[0] in only or r == ("onnxruntime-fp32", 0)]
    for rt, seed in runs:
        t0 = time.perf_counter()
        r = evaluate(model, steps=25, guidance=7.5, num_prompts=num_prompts, seed=seed, generate_fn=fn_for(rt))
        key = f"{rt} (eval seed {seed})"
        scores[key] = {"fd": round(r["fd"], 3), "alignment": round(r["alignment"], 4),
                       "seconds": round(time.perf_counter() - t0, 1)}
        log(f"[accuracy] {key}: {scores[key]}")
    seeds0 = tuple(0 * 100_003 + i for i in range(num_prompts))
    ref = cache[("onnxruntime-fp32", seeds0)].astype(np.int16)
    pixels = {}
    for rt in [r for r, seed in runs if seed == 0 and r != "onnxruntime-fp32"]:
        d = np.abs(cache[(rt, seeds0)].astype(np.int16) - ref)
        pixels[rt] = {"max": int(d.max()), "mean": round(float(d.mean()), 3),
                      "p99": float(np.percentile(d, 99)), "share_changed": round(float((d > 0).mean()), 4)}
    p = scores["onnxruntime-fp32 (eval seed 0)"]["alignment"]
    se = float(np.sqrt(p * (1 - p) / num_prompts))
    return {"model": model, "num_prompts": num_prompts, "steps": 25, "guidance": 7.5,
            "pixels_vs_onnxruntime_fp32": pixels, "scores": scores, "alignment_binomial_se": round(se, 4)}


# -- report ---------------------------------------------------------------------------------------------
def markdown(res: dict) -> str:
    m = res["machine"]
    flags = ", ".join(f"{k} {'yes' if v else 'no'}" for k, v in m["flags"].items())
    lines = ["# CPU runtimes side by side", "",
             f"Speed command: `{res['command']}` ({res['date']}, {res['wall_s']:.0f} s).", "",
             f"CPU: **{m['cpu']}**, {m['cores']} cores; flags: {flags}.  ",
             f"OpenVINO {m.get('openvino')} CPU capabilities: {', '.join(m.get('openvino_capabilities') or [])}.  ",
             f"torch {m['torch']}, onnxruntime {m['onnxruntime']}; threads: {res['threads'] or 'all'}.  ",
             f"Load average before / after: {res['loadavg_before']} / {res['loadavg_after']} "
             "(other jobs shared the machine when it is above the core count).", ""]
    for e2e in res["end_to_end"]:
        lines += [f"## End to end: {e2e['model']} ({e2e['image_size'][0]}x{e2e['image_size'][1]}, {e2e.get('steps', 25)} steps, "
                  f"guidance 7.5; median of {e2e['repeats']} interleaved repeats)", "",
                  "| runtime | load s (cold) | 1 image s | batch of 4 s | s / image (batch 4) "
                  "| speed vs ONNX Runtime: 1 image / batch 4 |",
                  "|---|---|---|---|---|---|"]
        base = e2e["rows"].get("onnxruntime-fp32")
        for rt, r in e2e["rows"].items():
            rel = (f"{base['image_s'] / r['image_s']:.2f}x / {base['batch4_s'] / r['batch4_s']:.2f}x" if base else "")
            lines.append(f"| {rt} | {r['load_s']:.2f} | {r['image_s']:.3f} | {r['batch4_s']:.3f} | "
                         f"{r['batch4_per_image_s']:.3f} | {rel} |")
        lines.append("")
    for name, st in res.get("startup", {}).items():
        lines += [f"## Start-up: {name} (seconds per component; OpenVINO compile with no cache unless warm)", "",
                  "| component | ORT load | OV f32 from ONNX | OV bf16 from ONNX | IR conversion | OV f32 from IR "
                  "| OV f32 warm CACHE_DIR |", "|---|---|---|---|---|---|---|"]
        for comp, r in st.items():
            lines.append(f"| {comp} | {r['onnxruntime_load_s']} | {r['openvino_f32_onnx_cold_s']} | "
                         f"{r['openvino_bf16_onnx_cold_s']} | {r['ir_convert_s']} | {r['openvino_f32_ir_cold_s']} | "
                         f"{r['openvino_f32_cache_warm_s']} |")
        lines.append("")
    if res.get("sd21"):
        s = res["sd21"]
        rts = list(next(iter(s["rows"].values())))
        lines += [f"## sd21-base-arch components (random weights; median of {s['calls']} calls after one warm-up)", "",
                  "| component | " + " | ".join(rts) + " |", "|---|" + "---|" * len(rts)]
        for comp, r in s["rows"].items():
            lines.append(f"| {comp} ({s['shapes'][comp]}) | " + " | ".join(f"{r[rt]['median_s']:.3f}" for rt in rts)
                         + " |")
        lines.append("")
    if res.get("accuracy"):
        a = res["accuracy"]
        lines += [f"## Accuracy: {a['model']}, {a['num_prompts']} held-out prompts, 25 steps, guidance 7.5", "",
                  f"Command: `{a.get('command')}` ({a.get('date')}, {a.get('wall_s')} s; load average "
                  f"{a.get('loadavg_before')} / {a.get('loadavg_after')}).", "",
                  "| vs ONNX Runtime fp32, same seeds | max px diff | mean px diff | p99 | share of values changed |",
                  "|---|---|---|---|---|"]
        for rt, p in a["pixels_vs_onnxruntime_fp32"].items():
            lines.append(f"| {rt} | {p['max']} | {p['mean']} | {p['p99']} | {p['share_changed']} |")
        lines += ["", "| run | FD | alignment |", "|---|---|---|"]
        for k, sc in a["scores"].items():
            lines.append(f"| {k} | {sc['fd']} | {sc['alignment']} |")
        lines += ["", f"Binomial standard error of alignment at n={a['num_prompts']}: {a['alignment_binomial_se']}. "
                  "`eval seed 1` draws other prompts, seeds and reference renders: its distance from seed 0 is the "
                  "evaluator's own noise.", ""]
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="tiny-sd only (end to end + start-up)")
    ap.add_argument("--sd21-onnx", type=Path, default=None, help="fp32 ONNX export of sd21-base-arch "
                    "(slimsd export onnx sd21-base-arch DIR): adds its components and start-up")
    ap.add_argument("--sd21-calls", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=5, help="end-to-end repeats per runtime (interleaved)")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--accuracy", type=int, default=0, metavar="N", help="bf16 vs fp32 on N tiny-sd prompts")
    ap.add_argument("--accuracy-only", action="store_true", help="only the accuracy section, merged into the "
                    "existing results file (the speed sections stay as they were)")
    ap.add_argument("--runtimes", default=None, help="comma-separated subset of " + ",".join(RUNTIMES))
    ap.add_argument("--out", type=Path, default=RESULTS / "cpu_backends")
    a = ap.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    t0 = time.time()
    command = "python benchmarks/cpu_backends.py " + " ".join(sys.argv[1:] if argv is None else argv)
    if a.accuracy_only:
        path = a.out.with_suffix(".json")
        res = json.loads(path.read_text()) if path.is_file() else {
            "command": None, "date": None, "machine": machine(), "threads": a.threads, "end_to_end": [],
            "startup": {}, "loadavg_before": [], "loadavg_after": [], "wall_s": 0}
        before = loadavg()
        only = set(a.runtimes.split(",")) if a.runtimes else None
        new = accuracy("tiny-sd", a.accuracy or 128, a.threads, only=only)
        new.update(command=command, date=time.strftime("%Y-%m-%d %H:%M"), loadavg_before=before,
                   loadavg_after=loadavg(), wall_s=round(time.time() - t0))
        old = res.get("accuracy") or {}
        if only and old.get("num_prompts") == new["num_prompts"]:  # add rows to the earlier run's table
            for k in ("pixels_vs_onnxruntime_fp32", "scores"):
                new[k] = {**old.get(k, {}), **new[k]}
            new["command"] = f"{old.get('command')}; then {command}"
        res["accuracy"] = new
        return _write(res, a.out)
    runtimes = a.runtimes.split(",") if a.runtimes else available_runtimes()
    res = {"command": command, "date": time.strftime("%Y-%m-%d %H:%M"), "machine": machine(), "threads": a.threads,
           "loadavg_before": loadavg(), "runtimes": runtimes, "end_to_end": [], "startup": {}}
    models = ["tiny-sd"]
    if not a.quick:
        from slimsd.serve.models import STUDENT, default_model

        if default_model() == STUDENT:
            models.append(STUDENT)
        else:
            log(f"{STUDENT} does not resolve: end to end on tiny-sd only")
    for model in models:
        res["end_to_end"].append(end_to_end(model, a.threads, a.repeats, runtimes))
    from slimsd.models import resolve_model
    from slimsd.serve.models import ensure_onnx

    res["startup"]["tiny-sd"] = startup(ensure_onnx("tiny-sd", resolve_model("tiny-sd")), a.threads)
    if a.sd21_onnx and not a.quick:
        res["startup"]["sd21-base-arch"] = startup(a.sd21_onnx, a.threads)
        res["sd21"] = sd21_components(a.sd21_onnx, a.threads, a.sd21_calls, runtimes)
    if a.accuracy:
        t1 = time.time()
        res["accuracy"] = accuracy("tiny-sd", a.accuracy, a.threads)
        res["accuracy"].update(command=command, date=res["date"], loadavg_before=res["loadavg_before"],
                               loadavg_after=loadavg(), wall_s=round(time.time() - t1))
    res["loadavg_after"] = loadavg()
    res["wall_s"] = time.time() - t0
    return _write(res, a.out)


def _write(res: dict, out: Path) -> int:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(res, indent=2) + "\n")
    out.with_suffix(".md").write_text(markdown(res) + "\n")
    print(markdown(res))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
