"""OpenVINO: each component compiled for static shapes vs the export's dynamic shapes, paired.

    python benchmarks/ov_static_shapes.py --onnx runs/onnx-sd21 --threads 2 --repeats 9        # SD size
    python benchmarks/ov_static_shapes.py --model tiny-sd-slim --threads 1 --repeats 200       # tiny

``OpenVINORunners`` compiles the first input shape(s) of each component statically beside the
dynamic compile (``--openvino-static-shapes``, docs/serve.md). This measures what that buys, per
component: the same ONNX file compiled twice with the serving runner's settings
(``compile_config``), once as exported (dynamic batch / height / width) and once reshaped to the
timed inputs, then called in alternating pairs (which goes first alternates too). Reported per
component: each compile's median, and the median of the per-pair ratios dynamic / static, the
measure that survives this VM's speed changes between runs. Inputs are random at the model's
native size, one image with CFG (batch 2; the VAE decoder batch 1). No compiled-model cache.

Writes ``benchmarks/results/<--stem>.{md,json}`` with the machine, its CPU flags and its load.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from e2e_common import component_inputs, log, machine, write_results  # noqa: E402

COMPONENTS = ("text_encoder", "unet", "vae_decoder")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--onnx", help="a folder of <component>/model.onnx: a `slimsd export onnx` folder, or "
                                    "benchmarks/e2e_sd21.py's component exports (then --preset gives the sizes)")
    src.add_argument("--model", help="a model slimsd serve takes (exported into the cache as serving does)")
    ap.add_argument("--precisions", default="auto", help="comma list of f32 / bf16; auto = bf16 where the CPU has it, "
                                                         "else f32")
    ap.add_argument("--preset", default="sd21-base-arch", help="model whose sizes the inputs take when --onnx has no "
                                                               "manifest.json")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--repeats", type=int, default=9, help="timed pairs per component and precision")
    ap.add_argument("--stem", default=None, help="results file stem (default ov_static_shapes_<folder name>)")
    a = ap.parse_args()

    import openvino as ov

    from slimsd.serve.runners_openvino import compile_config, cpu_supports_bf16, make_static
    from slimsd.specs import ModelDims

    if a.model:
        from slimsd.models import resolve_model
        from slimsd.serve.models import ensure_onnx

        folder = Path(ensure_onnx(a.model, resolve_model(a.model)))
    else:
        folder = Path(a.onnx)
    missing = [c for c in COMPONENTS if not (folder / c / "model.onnx").is_file()]
    if missing:
        raise SystemExit(f"--onnx: {folder} has no {', '.join(f'{c}/model.onnx' for c in missing)}")
    precisions = (["bf16"] if cpu_supports_bf16() else ["f32"]) if a.precisions == "auto" else a.precisions.split(",")
    before = machine(a.threads)
    log(f"load average before: {before['load_average']}")
    if (folder / "manifest.json").is_file():
        dims = ModelDims.from_folder(folder)
    else:
        from slimsd.models import resolve_model

        dims = ModelDims.from_folder(resolve_model(a.preset))
    inputs = component_inputs(dims)
    core = ov.Core()
    rows = []
    for prec in precisions:
        cfg = compile_config(prec, a.threads)
        for name in COMPONENTS:
            path = str(folder / name / "model.onnx")
            model = core.read_model(path)
            names = {n for i in model.inputs for n in i.get_names()}
            feeds = {k: v for k, v in inputs[name].items() if k in names}
            t0 = time.perf_counter()
            dyn = core.compile_model(model, "CPU", cfg).create_infer_request()
            t1 = time.perf_counter()
            reshaped = make_static(core.read_model(path), {k: v.shape for k, v in feeds.items()})
            t2 = time.perf_counter()
            sta = core.compile_model(reshaped, "CPU", cfg).create_infer_request()
            t3 = time.perf_counter()
            dyn.infer(feeds), sta.infer(feeds)  # first calls: allocation
            times = {"dynamic": [], "static": []}
            for i in range(a.repeats):
                order = (("dynamic", dyn), ("static", sta)) if i % 2 == 0 else (("static", sta), ("dynamic", dyn))
                for label, req in order:
                    s = time.perf_counter()
                    req.infer(feeds)
                    times[label].append(time.perf_counter() - s)
            ratios = [d / s for d, s in zip(times["dynamic"], times["static"])]
            row = {"precision": prec, "component": name, "shapes": {k: list(v.shape) for k, v in feeds.items()},
                   "dynamic_s": statistics.median(times["dynamic"]), "static_s": statistics.median(times["static"]),
                   "paired_ratio_median": statistics.median(ratios), "paired_ratio_range": [min(ratios), max(ratios)],
                   "compile_s": {"dynamic": t1 - t0, "static": t3 - t2}, "times": times}
            log(f"{prec} {name}: dynamic {row['dynamic_s'] * 1e3:.2f} ms, static {row['static_s'] * 1e3:.2f} ms, "
                f"paired dynamic/static {row['paired_ratio_median']:.3f}")
            rows.append(row)
            del dyn, sta
    after = machine(a.threads)
    stem = a.stem or f"ov_static_shapes_{a.model or folder.name}"
    cmd = "python benchmarks/ov_static_shapes.py " + " ".join(sys.argv[1:])
    r = {"folder": str(folder), "threads": a.threads, "repeats": a.repeats, "rows": rows, "machine": after,
         "load_average_before": before["load_average"], "openvino": ov.__version__, "command": cmd}
    m = after
    L = [f"# OpenVINO static vs dynamic shapes: {folder.name}", "",
         f"Machine: {m['cpu']} ({', '.join(m['simd_flags'])}), {m['logical_cores']} logical cores, threads "
         f"{a.threads or 'all'}; OpenVINO {ov.__version__}. Load average before {before['load_average']}, after "
         f"{after['load_average']}.", "", f"Command: `{cmd}`", "",
         f"Each component compiled twice with the serving runner's settings (dynamic as exported; static = reshaped "
         f"to the inputs below), called in {a.repeats} alternating pairs; medians, and the median of the per-pair "
         "ratios (> 1: static is faster).", "",
         "| precision | component | input shapes | dynamic | static | dynamic / static (paired median) | pair range | "
         "compile s dynamic / static |", "|---|---|---|---:|---:|---:|---|---|"]
    for x in rows:
        shapes = ", ".join(f"{k} {'x'.join(map(str, v))}" for k, v in x["shapes"].items())
        lo, hi = x["paired_ratio_range"]
        L.append(f"| {x['precision']} | {x['component']} | {shapes} | {x['dynamic_s'] * 1e3:.2f} ms | "
                 f"{x['static_s'] * 1e3:.2f} ms | **{x['paired_ratio_median']:.3f}x** | {lo:.2f}-{hi:.2f} | "
                 f"{x['compile_s']['dynamic']:.1f} / {x['compile_s']['static']:.1f} |")
    j, md = write_results(stem, r, "\n".join(L) + "\n")
    print("\n".join(L))
    log(f"wrote {j} and {md}")


if __name__ == "__main__":
    main()
