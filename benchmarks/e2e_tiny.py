"""End to end on tiny-sd: slimsd's served pipeline vs the peers a user would pick instead.

    python benchmarks/e2e_tiny.py --threads 1 --repeats 10 --optimum-python /tmp/optimum-venv/bin/python

Two models: the teacher ``tiny-sd`` at 25 steps and the compressed model at 8 steps
(``tiny-sd-slim`` when it resolves, else a pruned-only stand-in: ``tiny-sd`` with BK-SDM-Small's
blocks removed, same speed as the student, no retraining). One image per call, classifier-free
guidance 7.5 (the U-Net sees batch 2), DDIM, the model's native 64x64.

End to end (median of ``--repeats`` after one warm-up; runtimes interleaved per repeat so
machine drift hits all alike):

* ``slimsd / onnxruntime``: ``slimsd.serve.pipeline.load_pipeline(... backend="onnxruntime")``,
  i.e. what ``slimsd serve`` runs per batch (tokenize, text encoder, denoise loop, VAE, uint8);
* ``slimsd / torch``: the same loop over the eager modules (``backend="torch"``);
* ``diffusers (torch eager)``: ``StableDiffusionPipeline.__call__(..., output_type="np")``;
* ``Optimum ORT``: ``optimum.onnxruntime.ORTStableDiffusionPipeline`` on the **same ONNX
  files** as slimsd / onnxruntime (configs added beside them). Optimum pins
  ``transformers<4.58`` and ``huggingface_hub<1``, which the rest of slimsd does not accept, so
  it runs in its own virtual environment (``--optimum-python``; see benchmarks/results/e2e_tiny.md
  for the commands) in a subprocess; without one the row says so.

Per component (text encoder at batch 2, one U-Net step at batch 2, VAE decode at batch 1;
median of ``--component-repeats``): torch eager and ONNX Runtime, with FLOPs counted by
``FlopCounterMode`` and the achieved FLOP/s against this machine's measured fp32 matmul rate
(same threads). ``sum of components`` = text encoder + steps x U-Net step + VAE, next to the
measured end-to-end time.

Writes ``benchmarks/results/e2e_tiny.{md,json}``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from e2e_common import (OrtComponents, TorchComponents, component_inputs, count_flops, fmt_s, log,  # noqa: E402
                        machine, matmul_peak, stats, time_calls, write_results)

GUIDANCE = 7.5


# --------------------------------------------------------------------------------------------
# Optimum worker: runs inside the Optimum virtual environment (imports no slimsd)
# --------------------------------------------------------------------------------------------
def optimum_worker(a) -> None:
    import onnxruntime as ort
    import torch
    from optimum.onnxruntime import ORTStableDiffusionPipeline
    from transformers import CLIPTokenizerFast

    torch.set_num_threads(a.threads)
    so = ort.SessionOptions()
    so.intra_op_num_threads = a.threads
    folder = Path(a.optimum_folder)
    t0 = time.perf_counter()
    pipe = ORTStableDiffusionPipeline.from_pretrained(folder, export=False, session_options=so,
                                                      tokenizer=CLIPTokenizerFast.from_pretrained(folder / "tokenizer"))
    pipe.set_progress_bar_config(disable=True)
    load_s = time.perf_counter() - t0
    prompts = json.loads(a.prompts_json)

    def run(i):
        g = torch.Generator().manual_seed(i)
        return pipe(prompts[i % len(prompts)], num_inference_steps=a.steps, guidance_scale=GUIDANCE, generator=g,
                    output_type="np").images

    img = run(0)
    times = []
    for i in range(a.repeats):
        t0 = time.perf_counter()
        run(i)
        times.append(time.perf_counter() - t0)
    import importlib.metadata as md

    print(json.dumps({"times": times, "load_s": load_s, "image_shape": list(img.shape),
                      "versions": {p: md.version(p) for p in ("optimum", "optimum-onnx", "onnxruntime", "diffusers",
                                                              "transformers") if _has(md, p)}}))


def _has(md, p) -> bool:
    try:
        md.version(p)
        return True
    except md.PackageNotFoundError:
        return False


def optimum_folder(onnx_dir: Path, diffusers_dir: Path, out: Path) -> Path:
    """Optimum's layout over the same ONNX files: links to them plus each component's config."""
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    for name, cfg_sub in (("text_encoder", "text_encoder"), ("unet", "unet"), ("vae_decoder", "vae")):
        (out / name).mkdir()
        for f in (onnx_dir / name).iterdir():
            if f.name.startswith("model.onnx"):
                (out / name / f.name).symlink_to(f.resolve())
        shutil.copy(diffusers_dir / cfg_sub / "config.json", out / name / "config.json")
    shutil.copytree(diffusers_dir / "tokenizer", out / "tokenizer")
    shutil.copytree(diffusers_dir / "scheduler", out / "scheduler")
    index = json.loads((diffusers_dir / "model_index.json").read_text())
    index["unet"] = ["diffusers", "UNet2DConditionModel"]  # the ONNX U-Net: Optimum only reads its config
    (out / "model_index.json").write_text(json.dumps(index, indent=2))
    return out


def run_optimum(python: str, folder: Path, steps: int, repeats: int, threads: int, prompts: list[str]) -> dict:
    cmd = [python, __file__, "--optimum-worker", "--optimum-folder", str(folder), "--steps", str(steps),
           "--repeats", str(repeats), "--threads", str(threads), "--prompts-json", json.dumps(prompts)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": str(threads)}
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=1800, env=env)
    if p.returncode != 0:
        raise RuntimeError(f"Optimum worker failed ({p.returncode}):\n{p.stderr[-3000:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])


# --------------------------------------------------------------------------------------------
# main
# --------------------------------------------------------------------------------------------
def compressed_model(arg: str | None) -> tuple[str, str]:
    from slimsd.loadtest.compare import STUDENT, pruned_stand_in
    from slimsd.models import resolve_model

    if arg:
        return arg, "given with --compressed"
    try:
        resolve_model(STUDENT)
        return STUDENT, "tiny-sd-slim: pruned, CFG-aware retrained, step-distilled"
    except Exception:  # noqa: BLE001 - not built yet
        path, what = pruned_stand_in("tiny-sd", "bk-small", log)
        return path, "pruned-only stand-in (tiny-sd minus BK-SDM-Small's blocks, no retraining)"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1, help="intra-op threads for every runtime (default 1)")
    ap.add_argument("--repeats", type=int, default=10, help="end-to-end calls per runtime and model")
    ap.add_argument("--component-repeats", type=int, default=20)
    ap.add_argument("--compressed", default=None, help="compressed model (default: tiny-sd-slim, else pruned stand-in)")
    ap.add_argument("--optimum-python", default=None, help="python of a venv with optimum[onnxruntime]")
    ap.add_argument("--stem", default="e2e_tiny")
    # worker mode (inside the Optimum venv)
    ap.add_argument("--optimum-worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--optimum-folder", help=argparse.SUPPRESS)
    ap.add_argument("--steps", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--prompts-json", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.optimum_worker:
        return optimum_worker(a)

    import torch
    from diffusers import StableDiffusionPipeline

    from slimsd.loadtest.prompts import heldout_prompts
    from slimsd.models import resolve_model
    from slimsd.serve.models import ensure_onnx
    from slimsd.serve.pipeline import load_pipeline
    from slimsd.serve.settings import ServeSettings
    from slimsd.specs import ModelDims

    t_start = time.time()
    torch.set_num_threads(a.threads)
    info_before = machine(a.threads)
    peak = matmul_peak(a.threads)
    log(f"fp32 matmul peak ({a.threads} threads): {peak['gflops']:.1f} GFLOP/s")
    prompts = heldout_prompts(16)
    comp, comp_what = compressed_model(a.compressed)
    models = {"teacher": {"model": "tiny-sd", "steps": 25, "what": "tiny-sd teacher"},
              "compressed": {"model": comp, "steps": 8, "what": comp_what}}
    result = {"threads": a.threads, "repeats": a.repeats, "component_repeats": a.component_repeats,
              "guidance": GUIDANCE, "matmul_peak": peak, "models": models, "components": {}, "e2e": {}}
    runners = {}
    for role, m in models.items():
        folder = resolve_model(m["model"])
        m["folder"] = str(folder)
        dims = ModelDims.from_folder(folder)
        onnx_dir = ensure_onnx(Path(m["model"]).name, folder)
        m["onnx_dir"] = str(onnx_dir)
        # -- components ---------------------------------------------------------------------
        import slimsd.unet_blocks  # noqa: F401 - lets diffusers load a pruned U-Net's class

        dpipe = StableDiffusionPipeline.from_pretrained(folder, safety_checker=None, requires_safety_checker=False)
        dpipe.set_progress_bar_config(disable=True)
        m["unet_params"] = sum(p.numel() for p in dpipe.unet.parameters())
        tc = TorchComponents(dpipe.text_encoder, dpipe.unet, dpipe.vae)
        oc = OrtComponents({c: onnx_dir / c / "model.onnx" for c in ("text_encoder", "unet", "vae_decoder")}, a.threads)
        inputs = component_inputs(dims)
        comps = {}
        for c in ("text_encoder", "unet", "vae_decoder"):
            flops = count_flops(tc.fn(c, inputs[c]))
            row = {"flops": flops}
            for rt, obj in (("torch", tc), ("onnxruntime", oc)):
                s = stats(time_calls(obj.fn(c, inputs[c]), a.component_repeats, warmup=2))
                s["gflops_achieved"] = flops / s["median_s"] / 1e9
                s["share_of_peak"] = s["gflops_achieved"] / peak["gflops"]
                row[rt] = s
            comps[c] = row
            log(f"{role} {c}: {flops / 1e9:.3f} GFLOP; torch {fmt_s(row['torch']['median_s'])}, "
                f"onnxruntime {fmt_s(row['onnxruntime']['median_s'])}")
        result["components"][role] = comps
        # -- end-to-end callables -----------------------------------------------------------
        spipes = {b: load_pipeline(ServeSettings(model=str(folder), backend=b, threads=a.threads, device="cpu",
                                                 onnx_dir=onnx_dir if b == "onnxruntime" else None, warmup=False))
                  for b in ("onnxruntime", "torch")}
        steps = m["steps"]

        def slimsd_fn(p, steps=steps):
            return lambda i: p.generate([prompts[i % len(prompts)]], None, [i], steps=steps, guidance=GUIDANCE)

        def diffusers_fn(p, steps=steps):
            return lambda i: p(prompts[i % len(prompts)], num_inference_steps=steps, guidance_scale=GUIDANCE,
                               generator=torch.Generator().manual_seed(i), output_type="np").images

        runners[role] = {"slimsd / onnxruntime": slimsd_fn(spipes["onnxruntime"]),
                         "slimsd / torch": slimsd_fn(spipes["torch"]),
                         "diffusers StableDiffusionPipeline (torch eager)": diffusers_fn(dpipe)}
    # -- end to end, interleaved ---------------------------------------------------------------
    times = {role: {k: [] for k in rs} for role, rs in runners.items()}
    for role, rs in runners.items():
        for fn in rs.values():
            fn(0)  # warm-up
    for i in range(a.repeats):
        for role, rs in runners.items():
            for k, fn in rs.items():
                t0 = time.perf_counter()
                fn(i)
                times[role][k].append(time.perf_counter() - t0)
        log(f"repeat {i + 1}/{a.repeats}: " + ", ".join(f"{r} {k.split(' (')[0]} {fmt_s(v[-1])}"
                                                      for r, d in times.items() for k, v in d.items()))
    for role in runners:
        result["e2e"][role] = {k: stats(v) for k, v in times[role].items()}
    # -- Optimum (its own venv) ------------------------------------------------------------------
    opt_note = None
    if a.optimum_python:
        for role, m in models.items():
            folder = optimum_folder(Path(m["onnx_dir"]), Path(m["folder"]),
                                    Path(m["onnx_dir"]).with_name(Path(m["onnx_dir"]).name + "-optimum"))
            try:
                r = run_optimum(a.optimum_python, folder, m["steps"], a.repeats, a.threads, prompts)
                result["e2e"][role]["Optimum ORTStableDiffusionPipeline"] = {**stats(r["times"]),
                                                                           "versions": r["versions"]}
                log(f"{role} Optimum: {fmt_s(result['e2e'][role]['Optimum ORTStableDiffusionPipeline']['median_s'])}")
            except Exception as e:  # noqa: BLE001 - reported in the table
                opt_note = f"Optimum failed: {e}"
                log(opt_note)
    else:
        opt_note = "Optimum not measured (no --optimum-python)"
    result["optimum_note"] = opt_note
    info = machine(a.threads)
    info["load_average_before"] = info_before["load_average"]
    result["machine"] = info
    result["wall_s"] = time.time() - t_start
    result["command"] = "python benchmarks/e2e_tiny.py " + " ".join(sys.argv[1:])
    md = markdown(result)
    j, mdp = write_results(a.stem, result, md)
    print(md)
    log(f"wrote {j} and {mdp}")


def markdown(r: dict) -> str:
    from slimsd.loadtest.machine import describe

    peak = r["matmul_peak"]
    m = r["models"]
    L = [f"# End to end on tiny-sd: teacher 25 steps vs compressed 8 steps ({r['threads']} thread"
         f"{'s' if r['threads'] > 1 else ''})", "",
         f"Machine: {describe(r['machine'])} (load average before: "
         f"{' / '.join(str(x) for x in r['machine']['load_average_before'])}).", "",
         f"Command: `{r['command']}` ({r['wall_s'] / 60:.1f} min). One image per call, guidance {r['guidance']}, "
         f"DDIM, 64x64; median of {r['repeats']} calls after a warm-up, runtimes interleaved (Optimum: "
         f"its own process, run after the others).", "",
         "| role | model | steps | U-Net params | what |", "|---|---|---:|---:|---|"]
    for role, x in m.items():
        L.append(f"| {role} | `{Path(x['model']).name}` | {x['steps']} | {x['unet_params']:,} | {x['what']} |")
    L += ["", "## End to end (one image)", "",
          "| runtime | teacher, 25 steps | compressed, 8 steps | speedup | vs diffusers eager (teacher / compressed) |",
          "|---|---:|---:|---:|---:|"]
    diff = "diffusers StableDiffusionPipeline (torch eager)"
    keys = list(dict.fromkeys(list(r["e2e"]["teacher"]) + list(r["e2e"]["compressed"])))
    for k in keys:
        t, c = r["e2e"]["teacher"].get(k), r["e2e"]["compressed"].get(k)
        tm, cm = (t or {}).get("median_s", float("nan")), (c or {}).get("median_s", float("nan"))
        dt, dc = r["e2e"]["teacher"][diff]["median_s"], r["e2e"]["compressed"][diff]["median_s"]
        L.append(f"| {k} | {fmt_s(tm)} | {fmt_s(cm)} | **{tm / cm:.2f}x** | {dt / tm:.2f}x / {dc / cm:.2f}x |")
    if r.get("optimum_note"):
        L += ["", f"*{r['optimum_note']}*"]
    L += ["", "## Per component", "",
          f"Measured fp32 matmul rate ({peak['n']}x{peak['n']}, torch, {peak['threads']} thread(s)): "
          f"**{peak['gflops']:.1f} GFLOP/s** (best of 20; median {peak['median_gflops']:.1f}). FLOPs counted by `torch.utils.flop_counter.FlopCounterMode` "
          "(matmul / conv / attention; 1 MAC = 2 FLOPs). Text encoder and U-Net at batch 2 (CFG), VAE at batch 1.", "",
          "| model | component | GFLOP | torch eager | ORT | torch GFLOP/s (% of matmul peak) | ORT GFLOP/s (%) |",
          "|---|---|---:|---:|---:|---:|---:|"]
    for role, comps in r["components"].items():
        for c, x in comps.items():
            L.append(f"| {role} | {c} | {x['flops'] / 1e9:.3f} | {fmt_s(x['torch']['median_s'])} | "
                     f"{fmt_s(x['onnxruntime']['median_s'])} | {x['torch']['gflops_achieved']:.1f} "
                     f"({100 * x['torch']['share_of_peak']:.0f}%) | {x['onnxruntime']['gflops_achieved']:.1f} "
                     f"({100 * x['onnxruntime']['share_of_peak']:.0f}%) |")
    L += ["", "Sum of components (text encoder + steps x U-Net step + VAE) vs measured end to end:", "",
          "| model | runtime | sum of components | measured (slimsd pipeline) | loop overhead |", "|---|---|---:|---:|---:|"]
    for role, comps in r["components"].items():
        steps = m[role]["steps"]
        for rt, key in (("torch", "slimsd / torch"), ("onnxruntime", "slimsd / onnxruntime")):
            s = comps["text_encoder"][rt]["median_s"] + steps * comps["unet"][rt]["median_s"] + \
                comps["vae_decoder"][rt]["median_s"]
            meas = r["e2e"][role][key]["median_s"]
            L.append(f"| {role} | {rt} | {fmt_s(s)} | {fmt_s(meas)} | {fmt_s(meas - s)} |")
    L += ["", "Loop overhead = tokenizer, scheduler maths, CFG combine, uint8 conversion and Python between calls; "
          "on a model this small it is a visible share of the time, on SD-size models it vanishes "
          "(see e2e_sd21.md)."]
    return "\n".join(L) + "\n"


if __name__ == "__main__":
    main()
