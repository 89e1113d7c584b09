"""The end-to-end measurements of e2e_sd21.py / e2e_tiny.py on a CUDA GPU, in one call.

    pip install torch==<cuda build> && pip install -e ".[gpu]"    # tensorrt optional
    python benchmarks/gpu_e2e.py                                    # ~5-9 min on one H100
    python benchmarks/gpu_e2e.py --budget-s 300 --variants eager,cudagraph   # quicker

Without a visible CUDA GPU it stops at once with exit code 2 and says so.

**SD v2.1-base architecture, 512x512** (random weights: speed only), fp16, one image with
classifier-free guidance:

* components (text encoder batch 2, one U-Net step batch 2 for the unpruned U-Net and each
  466M plan, VAE decode batch 1), each as
  ``eager`` (PyTorch SDPA attention: diffusers' ``AttnProcessor2_0``, transformers' ``sdpa``),
  ``cudagraph`` (the eager module captured once with ``torch.cuda.CUDAGraph`` and replayed:
  removes launch overhead), ``compile`` (``torch.compile``, inductor, default mode) and
  ``compile+cudagraphs`` (``mode="reduce-overhead"``) - the compiled variants for the U-Nets
  only (they are >90% of the time) and only while the time budget allows;
* totals = text encoder + steps x U-Net step + VAE decode (SD 25 steps, ours 8) per variant,
  and the speedup, next to the paper's A6000 numbers;
* measured end to end with diffusers' ``StableDiffusionPipeline`` (eager, and with the
  compiled U-Net), 25 vs 8 steps, to check the component sum;
* FLOPs per component counted on the meta device (``FlopCounterMode``) and achieved TFLOP/s
  against this GPU's measured fp16 matmul rate.

**tiny-sd through the real pipeline** (``slimsd.serve.pipeline.load_pipeline``): teacher 25
steps vs the compressed model 8 steps (``tiny-sd-slim`` or the pruned-only stand-in) with
backends ``torch`` (fp16, CUDA), ``onnxruntime`` (CUDA provider when onnxruntime-gpu is
installed) and ``tensorrt`` (when installed: engines are built on first use), plus diffusers'
``StableDiffusionPipeline`` eager fp16.

TensorRT for the SD-size model needs an fp16 ONNX export and engine builds (minutes each):
``--tensorrt-sd21`` adds them when the budget allows. Sections that fail are recorded with
their error; the table is rewritten after every section, so a timed-out run keeps what it
measured. Writes ``<--out>/gpu_e2e.{md,json}`` (default ``benchmarks/results``).
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from e2e_common import RESULTS, component_inputs, count_flops, fmt_s, log, machine, matmul_peak  # noqa: E402

SD_STEPS, OUR_STEPS = 25, 8
GUIDANCE = 7.5
PAPER = {"A6000 Table 1 (avg. s/image)": (0.66, 0.26), "A6000 §4 text (s/image)": (0.92, 0.31)}
COMPILE_COST_S = 150  # rough upper bound of one torch.compile of an SD-size U-Net (first call)


class Budget:
    def __init__(self, seconds: float):
        self.t0, self.seconds = time.monotonic(), seconds

    def left(self) -> float:
        return self.seconds - (time.monotonic() - self.t0)

    def allows(self, cost: float) -> bool:
        return self.left() > cost


def need_cuda(allow_cpu: bool) -> str:
    import torch

    if torch.cuda.is_available():
        return "cuda"
    if allow_cpu:
        return "cpu"
    print(f"gpu_e2e.py: needs a CUDA GPU, and torch.cuda.is_available() is False here (torch {torch.__version__}, "
          f"CUDA build: {torch.version.cuda or 'none - a CPU-only torch'}). Run it on a machine with an NVIDIA GPU "
          "and a CUDA build of torch; for CPU numbers use benchmarks/e2e_sd21.py and benchmarks/e2e_tiny.py.",
          file=sys.stderr)
    sys.exit(2)


def timed(fn, repeats: int, warmup: int, device: str) -> dict:
    import statistics

    import torch

    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    for _ in range(warmup):
        fn()
    sync()
    out = []
    for _ in range(repeats):  # wall time of each call until the GPU is done (host overhead included)
        t0 = time.perf_counter()
        fn()
        sync()
        out.append(time.perf_counter() - t0)
    return {"median_s": statistics.median(out), "min_s": min(out), "n": len(out)}


def graphed(fn, device: str):
    """``fn`` (closing over fixed input tensors) captured into a CUDA graph; returns the replay."""
    import torch

    if device != "cuda":
        raise RuntimeError("CUDA graphs need a GPU")
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    torch.cuda.synchronize()
    return g.replay


def module_fns(te, unet, vae, inputs: dict, device: str, dtype):
    """Closures over fixed device tensors (what CUDA graphs need)."""
    import torch

    x = {c: {k: (torch.from_numpy(v).to(device) if v.dtype.kind == "i" else torch.from_numpy(v).to(device, dtype))
             for k, v in d.items()} for c, d in inputs.items()}
    nograd = torch.inference_mode

    def te_fn():
        with nograd():
            return te(input_ids=x["text_encoder"]["input_ids"]).last_hidden_state

    def unet_fn(u=unet):
        u_in = x["unet"]
        with nograd():
            return u(u_in["sample"], u_in["timestep"], u_in["encoder_hidden_states"], return_dict=False)[0]

    def vae_fn():
        with nograd():
            return vae.decode(x["vae_decoder"]["latent_sample"], return_dict=False)[0]

    return {"text_encoder": te_fn, "unet": unet_fn, "vae_decoder": vae_fn}, x


class Results:
    def __init__(self, out: Path, info: dict):
        self.out = out
        self.data = {"machine": info, "sections": {}, "errors": {}, "paper": PAPER}

    def set(self, key, value):
        self.data["sections"][key] = value
        self.write()

    def error(self, key, e: BaseException):
        self.data["errors"][key] = f"{type(e).__name__}: {e}"
        log(f"[{key}] failed: {e}\n{traceback.format_exc()[-2000:]}")
        self.write()

    def write(self):
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / "gpu_e2e.json").write_text(json.dumps(self.data, indent=2, default=str) + "\n")
        try:
            md = markdown(self.data)
        except Exception as e:  # noqa: BLE001 - partial data must never lose the JSON
            md = f"# GPU end to end\n\n(table not rendered: {type(e).__name__}: {e}; see gpu_e2e.json)\n"
        (self.out / "gpu_e2e.md").write_text(md)


# --------------------------------------------------------------------------------------------
# SD v2.1-base architecture
# --------------------------------------------------------------------------------------------
def sd21_section(res: Results, a, device: str, budget: Budget) -> None:
    import torch

    from e2e_sd21 import flops_meta, pruning_plans
    from slimsd.models import build_components
    from slimsd.specs import ModelDims
    from slimsd.unet_blocks import PrunedUNet2DConditionModel

    dtype = torch.float16 if device == "cuda" else torch.float32
    plans, source = pruning_plans(Path(a.plans), None, a.preset)
    if a.max_plans:
        plans = dict(list(plans.items())[: a.max_plans])
    unet, vae, te, tokenizer, scheduler = build_components(a.preset)
    dims = ModelDims.from_configs(unet.config, vae.config, te.config.to_dict())
    flops = flops_meta(plans, dims, a.preset)
    unets = {"SD": unet}
    for name, removed in plans.items():
        unets[name] = PrunedUNet2DConditionModel.from_unet(unet, removed)
    te, vae = te.to(device, dtype).eval(), vae.to(device, dtype).eval()
    unets = {k: u.to(device, dtype).eval() for k, u in unets.items()}
    attn = sorted({type(p).__name__ for p in unet.attn_processors.values()})
    sec = {"plans": plans, "plans_source": source, "flops": flops, "dtype": str(dtype), "attention": {
        "unet": attn, "text_encoder": getattr(te.config, "_attn_implementation", None)}, "times": {}, "e2e": {}}
    fns, _ = module_fns(te, unet, vae, component_inputs(dims), device, dtype)
    comp_fns = {"text_encoder": fns["text_encoder"], "vae_decoder": fns["vae_decoder"]}
    for k, u in unets.items():
        comp_fns["unet" if k == "SD" else f"unet:{k}"] = (lambda u=u: fns["unet"](u))
    variants = a.variants.split(",")
    for c, fn in comp_fns.items():
        row = sec["times"].setdefault(c, {})
        if "eager" in variants:
            row["eager"] = timed(fn, a.repeats, 3, device)
        if "cudagraph" in variants and device == "cuda":
            try:
                row["cudagraph"] = timed(graphed(fn, device), a.repeats, 3, device)
            except Exception as e:  # noqa: BLE001 - recorded
                row["cudagraph"] = {"error": f"{type(e).__name__}: {e}"}
        log(f"sd21 {c}: " + ", ".join(f"{v} {fmt_s(x['median_s'])}" for v, x in row.items() if "median_s" in x))
        res.set("sd21", sec)
    # compiled U-Nets (the bulk of the time), while the budget allows
    compiled = {}
    for mode_name, mode in (("compile", "default"), ("compile+cudagraphs", "reduce-overhead")):
        if mode_name not in variants:
            continue
        for k, u in unets.items():
            c = "unet" if k == "SD" else f"unet:{k}"
            if not budget.allows(COMPILE_COST_S + 60):
                sec["times"][c][mode_name] = {"error": f"skipped: time budget ({budget.left():.0f} s left)"}
                continue
            try:
                t0 = time.perf_counter()
                cu = torch.compile(u, mode=mode)
                fn = (lambda cu=cu: fns["unet"](cu))
                fn()
                fn()
                if device == "cuda":
                    torch.cuda.synchronize()
                r = timed(fn, a.repeats, 3, device)
                r["compile_s"] = time.perf_counter() - t0
                sec["times"][c][mode_name] = r
                if mode_name == "compile":
                    compiled[k] = cu
                log(f"sd21 {c} {mode_name}: {fmt_s(r['median_s'])} (compile {r['compile_s']:.0f} s)")
            except Exception as e:  # noqa: BLE001 - recorded
                sec["times"][c][mode_name] = {"error": f"{type(e).__name__}: {e}"}
            res.set("sd21", sec)
    # measured end to end: diffusers StableDiffusionPipeline, eager and with the compiled U-Net
    from diffusers import StableDiffusionPipeline

    for k, u in unets.items():
        for variant, model in (("eager", u), ("compile", compiled.get(k))):
            if model is None:
                continue
            steps = SD_STEPS if k == "SD" else OUR_STEPS
            pipe = StableDiffusionPipeline(vae=vae, text_encoder=te, tokenizer=tokenizer, unet=model, scheduler=scheduler,
                                           safety_checker=None, feature_extractor=None, requires_safety_checker=False)
            pipe.set_progress_bar_config(disable=True)

            def run(pipe=pipe, steps=steps):
                with torch.inference_mode():
                    return pipe("a red circle left of a blue square", num_inference_steps=steps, guidance_scale=GUIDANCE,
                                height=dims.image_size[0], width=dims.image_size[1], output_type="latent").images

            try:
                sec["e2e"].setdefault(k, {})[variant] = timed(run, max(3, a.repeats // 4), 1, device)
                log(f"sd21 e2e {k} {variant}: {fmt_s(sec['e2e'][k][variant]['median_s'])}")
            except Exception as e:  # noqa: BLE001 - recorded
                sec["e2e"].setdefault(k, {})[variant] = {"error": f"{type(e).__name__}: {e}"}
            res.set("sd21", sec)
    if a.tensorrt_sd21:
        try:
            sec["tensorrt"] = tensorrt_components(a.preset, plans, budget, a.repeats)
        except Exception as e:  # noqa: BLE001 - recorded
            res.error("sd21 tensorrt", e)
        res.set("sd21", sec)
    del unets, te, vae, compiled
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()


def tensorrt_components(preset: str, plans: dict, budget: Budget, repeats: int) -> dict:
    """fp16 ONNX export + TensorRT engines of every component (and the first plan's U-Net); component times."""
    import tempfile

    import torch

    from slimsd.compress.prune import prune_pipeline
    from slimsd.export.onnx import OnnxExportConfig, export_onnx
    from slimsd.export.tensorrt import TensorRTConfig, export_tensorrt
    from slimsd.serve.runners_tensorrt import TensorRTRunners
    from slimsd.specs import component_specs

    work = Path(tempfile.mkdtemp(prefix="gpu_e2e_trt_"))
    out = {}
    models = {"SD": preset}
    if plans:
        name, removed = next(iter(plans.items()))
        models[name] = str(prune_pipeline(preset, removed, work / "pruned"))
    for k, m in models.items():
        if not budget.allows(240):
            out[k] = {"error": f"skipped: time budget ({budget.left():.0f} s left)"}
            continue
        onnx = work / f"onnx-{len(out)}"
        export_onnx(m, onnx, OnnxExportConfig(dtype="float16", verify=False))
        export_tensorrt(onnx, work / f"trt-{len(out)}", TensorRTConfig(max_batch=2))
        r = TensorRTRunners(work / f"trt-{len(out)}")
        inputs = component_inputs(component_specs(onnx)["unet"].dims)
        row = {}
        for c, call in (("text_encoder", lambda: r.text_encoder(**inputs["text_encoder"])),
                        ("unet", lambda: r.unet(**inputs["unet"])),
                        ("vae_decoder", lambda: r.vae_decoder(**inputs["vae_decoder"]))):
            row[c] = timed(call, repeats, 3, "cuda")
        out[k] = row
        torch.cuda.empty_cache()
    out["note"] = "TensorRTRunners: numpy in/out, so host<->device copies are inside each time"
    return out


# --------------------------------------------------------------------------------------------
# tiny-sd through the real pipeline
# --------------------------------------------------------------------------------------------
def tiny_section(res: Results, a, device: str, budget: Budget) -> None:
    import torch
    from diffusers import StableDiffusionPipeline

    from slimsd.loadtest.compare import STUDENT, pruned_stand_in
    from slimsd.loadtest.prompts import heldout_prompts
    from slimsd.models import resolve_model
    from slimsd.serve.pipeline import load_pipeline
    from slimsd.serve.settings import ServeSettings

    try:
        resolve_model(STUDENT)
        comp, what = STUDENT, "tiny-sd-slim"
    except Exception:  # noqa: BLE001 - not built: the stand-in
        comp, what = pruned_stand_in("tiny-sd", "bk-small", log)[0], "pruned-only stand-in (bk-small)"
    models = {"teacher": ("tiny-sd", SD_STEPS), "compressed": (comp, OUR_STEPS)}
    prompts = heldout_prompts(16)
    dtype = "float16" if device == "cuda" else "float32"
    sec = {"compressed_model": what, "e2e": {}}
    backends = [b for b in a.tiny_backends.split(",") if b]
    for role, (model, steps) in models.items():
        for backend in backends:
            if not budget.allows(60 if backend != "tensorrt" else 180):
                sec["e2e"].setdefault(f"slimsd / {backend}", {})[role] = {"error": "skipped: time budget"}
                continue
            try:
                pipe = load_pipeline(ServeSettings(model=model, backend=backend, device=device, dtype=dtype
                                                   if backend == "torch" else "float32", warmup=False))
                r = timed(lambda: pipe.generate([prompts[0]], None, [0], steps=steps, guidance=GUIDANCE),
                          a.repeats, 2, device)
                r["provider"] = getattr(pipe.runners, "providers", None)
                sec["e2e"].setdefault(f"slimsd / {backend}", {})[role] = r
                log(f"tiny {role} slimsd/{backend}: {fmt_s(r['median_s'])}")
            except Exception as e:  # noqa: BLE001 - recorded
                sec["e2e"].setdefault(f"slimsd / {backend}", {})[role] = {"error": f"{type(e).__name__}: {e}"}
            res.set("tiny", sec)
        if not budget.allows(30):
            sec["e2e"].setdefault("diffusers StableDiffusionPipeline (eager)", {})[role] = {"error": "skipped: time budget"}
            continue
        try:
            import slimsd.unet_blocks  # noqa: F401 - lets diffusers load a pruned U-Net's class

            dp = StableDiffusionPipeline.from_pretrained(resolve_model(model), safety_checker=None,
                                                         requires_safety_checker=False,
                                                         torch_dtype=getattr(torch, dtype)).to(device)
            dp.set_progress_bar_config(disable=True)
            r = timed(lambda: dp(prompts[0], num_inference_steps=steps, guidance_scale=GUIDANCE, output_type="np"),
                      a.repeats, 2, device)
            sec["e2e"].setdefault("diffusers StableDiffusionPipeline (eager)", {})[role] = r
        except Exception as e:  # noqa: BLE001 - recorded
            sec["e2e"].setdefault("diffusers StableDiffusionPipeline (eager)", {})[role] = {"error": str(e)}
        res.set("tiny", sec)


# --------------------------------------------------------------------------------------------
def markdown(d: dict) -> str:
    from slimsd.loadtest.machine import describe

    m = d["machine"]
    L = ["# GPU end to end: SD 25 steps vs the 466M pruned U-Net at 8 steps", "",
         f"Machine: {describe(m)}.", "", f"Command: `{m.get('command', '')}`.", ""]
    peak = m.get("matmul_peak")
    if peak:
        L += [f"Measured {peak['dtype']} matmul rate ({peak['n']}x{peak['n']}): **{peak['gflops'] / 1000:.1f} TFLOP/s**.", ""]
    sd = d["sections"].get("sd21")
    if sd:
        fl, t = sd["flops"], sd["times"]
        variants = list(dict.fromkeys(v for row in t.values() for v in row))
        L += ["## SD v2.1-base architecture, 512x512, " + sd["dtype"].replace("torch.", ""), "",
              f"Attention: U-Net {', '.join(sd['attention']['unet'])}; text encoder "
              f"`{sd['attention']['text_encoder']}`. Plans: {sd['plans_source']}.", "",
              "| component | GFLOP | " + " | ".join(variants) + " |", "|---|---:|" + "---:|" * len(variants)]
        for c, row in t.items():
            cells = []
            for v in variants:
                x = row.get(v, {})
                if "median_s" in x:
                    tf = fl[c] / x["median_s"] / 1e12
                    pct = f", {100 * tf * 1000 / peak['gflops']:.0f}%" if peak else ""
                    cells.append(f"{fmt_s(x['median_s'])} ({tf:.{0 if tf >= 10 else 2}f} TFLOP/s{pct})")
                else:
                    cells.append(x.get("error", "")[:60] or "-")
            gf = fl[c] / 1e9
            L.append(f"| {c} | {gf:,.0f} | " if gf >= 10 else f"| {c} | {gf:.3f} | ")
            L[-1] += " | ".join(cells) + " |"
        L += ["", "Totals = text encoder + steps x U-Net step + VAE (same variant for every component; text encoder and "
              "VAE eager/cudagraph only, so `compile*` rows use their best):", "",
              "| variant | SD 25 steps | " + " | ".join(f"{p}, 8 steps" for p in sd["plans"]) + " | speedup |",
              "|---|---:|" + "---:|" * (len(sd["plans"]) + 1)]
        for v in variants:
            def best(c, v=v):
                x = t.get(c, {}).get(v, {})
                if "median_s" in x:
                    return x["median_s"]
                alts = [t[c][w]["median_s"] for w in ("cudagraph", "eager") if "median_s" in t.get(c, {}).get(w, {})]
                return min(alts) if alts else float("nan")
            fixed = best("text_encoder") + best("vae_decoder")
            sd_total = fixed + SD_STEPS * best("unet")
            ours = [fixed + OUR_STEPS * best(f"unet:{p}") for p in sd["plans"]]
            sp = " / ".join(f"{sd_total / o:.2f}x" for o in ours)
            L.append(f"| {v} | {fmt_s(sd_total)} | " + " | ".join(fmt_s(o) for o in ours) + f" | **{sp}** |")
        if sd.get("e2e"):
            L += ["", "Measured end to end (diffusers `StableDiffusionPipeline`, latents out, no VAE-to-PNG):", "",
                  "| U-Net | steps | eager | compiled U-Net |", "|---|---:|---:|---:|"]
            for k, row in sd["e2e"].items():
                cells = [fmt_s(row[v]["median_s"]) if "median_s" in row.get(v, {}) else row.get(v, {}).get("error", "-")
                         for v in ("eager", "compile")]
                L.append(f"| {k} | {SD_STEPS if k == 'SD' else OUR_STEPS} | {cells[0]} | {cells[1]} |")
        if sd.get("tensorrt"):
            L += ["", f"TensorRT ({sd['tensorrt'].get('note', '')}): `"
                  + json.dumps({k: v for k, v in sd["tensorrt"].items() if k != "note"}, default=str)[:1500] + "`"]
    tiny = d["sections"].get("tiny")
    if tiny:
        L += ["", f"## tiny-sd through the real pipeline (compressed: {tiny['compressed_model']})", "",
              "| runtime | teacher 25 steps | compressed 8 steps | speedup |", "|---|---:|---:|---:|"]
        for rt, row in tiny["e2e"].items():
            t_, c_ = row.get("teacher", {}), row.get("compressed", {})
            if "median_s" in t_ and "median_s" in c_:
                L.append(f"| {rt} | {fmt_s(t_['median_s'])} | {fmt_s(c_['median_s'])} | "
                         f"**{t_['median_s'] / c_['median_s']:.2f}x** |")
            else:
                L.append(f"| {rt} | {t_.get('error', fmt_s(t_.get('median_s', float('nan'))))[:80]} | "
                         f"{c_.get('error', fmt_s(c_.get('median_s', float('nan'))))[:80]} | |")
    L += ["", "Paper (A6000, fp16, real weights): " + "; ".join(
        f"{k}: {x:.2f} s -> {y:.2f} s = {x / y:.2f}x" for k, (x, y) in d["paper"].items()) + "; stated: **3.0x**."]
    if d["errors"]:
        L += ["", "Errors: " + "; ".join(f"{k}: {v}" for k, v in d["errors"].items())]
    return "\n".join(L) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sections", default="sd21,tiny")
    ap.add_argument("--variants", default="eager,cudagraph,compile,compile+cudagraphs")
    ap.add_argument("--tiny-backends", default="torch,onnxruntime,tensorrt")
    ap.add_argument("--plans", default=str(RESULTS / "prune_latency.json"))
    ap.add_argument("--max-plans", type=int, default=2)
    ap.add_argument("--tensorrt-sd21", action="store_true", help="also export + build TensorRT engines for SD-size")
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--budget-s", type=float, default=540, help="stop starting new sections / compiles after this")
    ap.add_argument("--out", default=str(RESULTS))
    ap.add_argument("--allow-cpu", action="store_true", help=argparse.SUPPRESS)  # smoke test of the script
    ap.add_argument("--preset", default="sd21-base-arch", help=argparse.SUPPRESS)
    a = ap.parse_args()
    device = need_cuda(a.allow_cpu)
    import torch

    budget = Budget(a.budget_s)
    info = machine(torch.get_num_threads(), with_gpu=True)
    info["command"] = "python benchmarks/gpu_e2e.py " + " ".join(sys.argv[1:])
    if device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.benchmark = True
        info["matmul_peak"] = matmul_peak(None, n=8192, repeats=10, device="cuda", dtype="float16")
    else:
        info["matmul_peak"] = matmul_peak(None, n=1024, repeats=5)
    res = Results(Path(a.out), info)
    res.write()
    for s in a.sections.split(","):
        try:
            {"sd21": sd21_section, "tiny": tiny_section}[s](res, a, device, budget)
        except Exception as e:  # noqa: BLE001 - recorded; go on with the next section
            res.error(s, e)
    res.data["wall_s"] = budget.seconds - budget.left()
    res.write()
    print((Path(a.out) / "gpu_e2e.md").read_text())


if __name__ == "__main__":
    main()
