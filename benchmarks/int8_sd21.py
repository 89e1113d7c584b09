"""The U-Net step at SD v2.1-base size in OpenVINO int8 vs bf16 vs f32, on this CPU (issue 15, part 2).

    python benchmarks/int8_sd21.py --prepare-only     # export (once) and quantize: any load
    python benchmarks/int8_sd21.py                    # time, on a quiet machine
    python benchmarks/int8_sd21.py --preset tiny-sd   # smoke test of the script (seconds)

``sd21-base-arch`` has random weights: **speed only**. Its U-Net is exported as ``slimsd export
onnx`` writes it (U-Net only, no parity check) into ``--work``, then quantized with the
product's own :func:`slimsd.serve.quantize.quantize_unet` (the same NNCF settings as
``slimsd export int8``). Calibration uses ``--samples`` random inputs: with random weights,
the model's own denoising inputs would be as meaningless, and the activation ranges only have
to be plausible for timing. Timed: one U-Net call, batch 2 (one 512x512 image with CFG),
interleaved round-robin over int8 / bf16 (where the CPU has it) / f32, median of
``--repeats``. Each row also says how many convolutions and matmuls the CPU plugin runs in
i8/u8 (the cause of an int8 speed-up) and the machine's CPU flags and load before and after.

Writes ``benchmarks/results/int8_sd21.{md,json}``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from e2e_common import ROOT, export_unet_only, log, machine, write_results  # noqa: E402


def export_unet(preset: str, out_dir: Path) -> Path:
    """The preset's U-Net (random weights, seed 0) as ``slimsd export onnx`` writes it, once."""
    from slimsd.models import build_components, resolve_model
    from slimsd.specs import component_specs

    final = out_dir / "unet" / "model.onnx"
    if final.is_file():
        return final
    t0 = time.perf_counter()
    export_unet_only(build_components(preset)[0].eval(), component_specs(resolve_model(preset))["unet"], out_dir)
    log(f"exported {preset} U-Net to {final} in {time.perf_counter() - t0:.0f} s")
    return final


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="sd21-base-arch")
    ap.add_argument("--work", default=None, help="default runs/int8-<preset>")
    ap.add_argument("--samples", type=int, default=16, help="calibration inputs (random: speed only)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=None, help="OpenVINO threads (default: all cores)")
    ap.add_argument("--prepare-only", action="store_true", help="export and quantize, no timing (those need no quiet "
                    "machine; the timing does)")
    ap.add_argument("--stem", default=None, help="results file stem (default int8_sd21; int8_<preset> otherwise)")
    a = ap.parse_args()

    import openvino as ov

    from slimsd.models import resolve_model
    from slimsd.serve.quantize import Int8Config, int8_kernels, quantize_unet
    from slimsd.serve.runners_openvino import cpu_supports_bf16
    from slimsd.specs import component_specs

    stem = a.stem or ("int8_sd21" if a.preset == "sd21-base-arch" else f"int8_{a.preset.replace('-', '_')}")
    work = Path(a.work or ROOT / "runs" / f"int8-{a.preset}")
    before = machine(a.threads)
    log(f"load average before: {before['load_average']}")
    t0 = time.perf_counter()
    onnx = export_unet(a.preset, work)
    spec = component_specs(resolve_model(a.preset))["unet"]
    samples = [spec.sample_inputs(batch=2, seed=i, numpy=True) for i in range(a.samples)]
    ir = work / "int8" / "unet.xml"
    t_q = None
    if not ir.is_file():
        t1 = time.perf_counter()
        cfg = Int8Config(subset_size=a.samples)
        q, kept = quantize_unet(onnx, samples, cfg)
        ir.parent.mkdir(parents=True, exist_ok=True)
        ov.save_model(q, str(ir), compress_to_fp16=False)
        t_q = time.perf_counter() - t1
        log(f"quantized in {t_q:.0f} s ({len(kept)} ops kept in float)")
    if a.prepare_only:
        return
    core = ov.Core()
    bf16 = cpu_supports_bf16(core)
    base = {"PERFORMANCE_HINT": "LATENCY", "NUM_STREAMS": "1"}
    if a.threads:
        base["INFERENCE_NUM_THREADS"] = str(a.threads)
    floating = "bf16" if bf16 else "f32"
    rows = {"f32": (onnx, "f32")}
    if bf16:
        rows["bf16"] = (onnx, "bf16")
    rows[f"int8 (float ops {floating})"] = (ir, floating)
    compiled, compile_s = {}, {}
    for name, (path, hint) in rows.items():
        t1 = time.perf_counter()
        compiled[name] = core.compile_model(str(path), "CPU", {**base, "INFERENCE_PRECISION_HINT": hint})
        compile_s[name] = round(time.perf_counter() - t1, 1)
        log(f"compiled {name} in {compile_s[name]} s")
    reqs = {n: c.create_infer_request() for n, c in compiled.items()}
    x = spec.cast_inputs(samples[0])
    for n, r in reqs.items():  # warm-up
        r.infer(x)
    times = {n: [] for n in reqs}
    for i in range(a.repeats):
        for n, r in reqs.items():
            t1 = time.perf_counter()
            r.infer(x)
            times[n].append(time.perf_counter() - t1)
        log(f"round {i + 1}/{a.repeats}: " + ", ".join(f"{n} {v[-1]:.3f} s" for n, v in times.items()))
    after = machine(a.threads)
    med = {n: statistics.median(v) for n, v in times.items()}
    result = {"preset": a.preset, "machine": before, "load_average_after": after["load_average"],
              "openvino": ov.__version__, "threads": a.threads, "repeats": a.repeats, "samples": a.samples,
              "quantize_s": t_q, "compile_s": compile_s, "seconds": {n: v for n, v in times.items()},
              "median_s": med, "int8_kernels": {n: int8_kernels(c) for n, c in compiled.items()},
              "wall_s": round(time.perf_counter() - t0, 1),
              "command": f"python benchmarks/int8_sd21.py --preset {a.preset} --samples {a.samples} "
                         f"--repeats {a.repeats}" + (f" --threads {a.threads}" if a.threads else "")}
    f32 = med["f32"]
    lines = [f"# U-Net step, OpenVINO int8 vs bf16 vs f32: {a.preset} (random weights: speed only)", "",
             f"Machine: {before['cpu']}, {before['usable_cores']} cores; CPU flags: "
             f"{' '.join(before['simd_flags'])}. OpenVINO {ov.__version__}, threads "
             f"{a.threads or 'all'}. Load average before {before['load_average']}, after {after['load_average']}.",
             "", f"Command: `{result['command']}`", "",
             "One U-Net call, batch 2 (one image with CFG), at the preset's image size; median of "
             f"{a.repeats} interleaved rounds.", "",
             "| precision | median s | vs f32 | int8 convolutions / matmuls run | compile s |", "|---|---|---|---|---|"]
    for n in times:
        k = result["int8_kernels"][n]
        lines.append(f"| {n} | {med[n]:.3f} | {f32 / med[n]:.2f}x | {k.get('Convolution', 0)} / "
                     f"{k.get('FullyConnected', 0) + k.get('MatMul', 0)} | {compile_s[n]} |")
    write_results(stem, result, "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
