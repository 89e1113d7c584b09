"""U-Net step latency of SD v2.1-base-architecture prunings on this machine.

    python benchmarks/prune_latency.py --report runs/sensitivity-tiny/sensitivity.json

Builds ``sd21-base-arch`` (random weights: speed only), then times one U-Net forward at a
64x64 latent (512 px), batch 2 (one image with classifier-free guidance) for:

* the unpruned U-Net, the BK-SDM presets (bk-base / bk-small / bk-tiny);
* a 466M-parameter plan with the paper's policy (``sensitivity``) and a latency-aware plan of
  the same size (``sensitivity-per-ms``), both from ``--report``. Real users pass the report
  of their own model; here the report comes from ``tiny-sd``, which has SD v2.1-base's block
  structure and names, as a stand-in for the real model's sensitivity.

All rows are measured in one run, interleaved, and reported as ratios to the unpruned U-Net.
Writes ``benchmarks/results/prune_latency.{md,json}`` with the machine it ran on.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from slimsd.compress.prune import PRESETS, plan_pruning
from slimsd.models import build_components, count_params
from slimsd.profile import block_latency, unet_inputs
from slimsd.unet_blocks import PrunedUNet2DConditionModel, list_blocks

RESULTS = Path(__file__).parent / "results"


def machine() -> dict:
    from slimsd.hardware import cpu_model_and_flags

    return {"cpu": cpu_model_and_flags()[0], "threads": torch.get_num_threads(), "torch": torch.__version__}


@torch.no_grad()
def time_unet(unet, x, repeats: int) -> list[float]:
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        unet(*x)
        out.append(time.perf_counter() - t0)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--report", required=True, help="sensitivity.json whose block names match SD v2.1")
    ap.add_argument("--target-params", type=float, default=466e6)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--latent-size", type=int, default=64)
    ap.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    a = ap.parse_args()
    dtype = getattr(torch, a.dtype)

    unet = build_components("sd21-base-arch")[0].eval().to(dtype)
    x = unet_inputs(unet, batch=2, latent_size=a.latent_size)
    report = json.loads(Path(a.report).read_text())
    params = {b.name: b.params for b in list_blocks(unet) if b.removable}  # the target's removable blocks
    total = count_params(unet)
    print("measuring per-block latency of the unpruned U-Net ...", flush=True)
    lat = block_latency(unet, batch=2, latent_size=a.latent_size, repeats=2)
    plans = {}
    for policy in ("sensitivity", "sensitivity-per-ms"):
        plans[f"466M {policy}"] = plan_pruning(report, policy, target_params=int(a.target_params), params=params,
                                               latency_ms=lat, total_params=total, total_latency_ms=lat["total"])
    variants = {"unpruned (SD v2.1-base)": []} | {p: PRESETS[p] for p in ("bk-base", "bk-small", "bk-tiny")} | {
        k: v["removed_blocks"] for k, v in plans.items()}
    models = {}
    for name, removed in variants.items():
        models[name] = unet if not removed else PrunedUNet2DConditionModel.from_unet(unet, removed, share_weights=True).eval()
    times = {k: [] for k in models}
    for name, m in models.items():  # warm-up
        time_unet(m, x, 1)
    for _ in range(a.repeats):  # interleaved so drift hits every row alike
        for name, m in models.items():
            times[name] += time_unet(m, x, 1)
            print(f"  {name}: {times[name][-1]:.2f} s", flush=True)
    base = statistics.median(times["unpruned (SD v2.1-base)"])
    rows = []
    for name, m in models.items():
        med = statistics.median(times[name])
        rows.append({"model": name, "unet_params": count_params(m), "removed_blocks": len(variants[name]),
                     "median_s": med, "speedup": base / med, "all_s": times[name]})
    result = {"machine": machine(), "latent": a.latent_size, "batch": 2, "dtype": a.dtype, "repeats": a.repeats,
              "report": a.report, "plans": plans, "rows": rows,
              "command": f"python benchmarks/prune_latency.py --report {a.report} --repeats {a.repeats} --dtype {a.dtype}"}
    RESULTS.mkdir(exist_ok=True)
    stem = "prune_latency" if a.dtype == "float32" else f"prune_latency_{a.dtype}"
    (RESULTS / f"{stem}.json").write_text(json.dumps(result, indent=2))
    lines = [f"# U-Net step latency, SD v2.1-base architecture, {a.latent_size}x{a.latent_size} latent, batch 2, {a.dtype}", "",
             f"Machine: {result['machine']['cpu']}, {result['machine']['threads']} threads, torch {result['machine']['torch']}. ",
             f"Command: `{result['command']}` (median of {a.repeats}, interleaved).", "",
             "| U-Net | params | blocks removed | step latency (s) | speedup vs unpruned |", "|---|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['unet_params']:,d} | {r['removed_blocks']} | {r['median_s']:.2f} | {r['speedup']:.2f}x |")
    lines += ["", "466M plans (from the sensitivity report; block costs measured on this U-Net):", ""]
    for k, p in plans.items():
        lines.append(f"* **{k}**: {', '.join(p['removed_blocks'])}")
    (RESULTS / f"{stem}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
