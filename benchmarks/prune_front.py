"""The quality/latency front of pruning plans on the SD v2.1-base architecture.

    python benchmarks/prune_front.py --threads 2 --repeats 3

Builds ``sd21-base-arch`` (random weights: speed only), measures each removable block's time
inside one U-Net step (64x64 latent = 512 px, batch 2 = one image with CFG), and makes:

* the paper's plan: remove the least damaging blocks down to 466M U-Net parameters (``sensitivity``);
* the BK-SDM presets (``bk-base``, ``bk-small``, ``bk-tiny``);
* **time-aware plans**: policy ``sensitivity-per-ms`` under a latency budget, one per U-Net step
  speedup target in ``--speedups`` (``slimsd compress prune --target-speedup``): blocks are
  taken in order of sensitivity damage per millisecond they save on *this* U-Net.

Damage comes from ``--report``, tiny-sd's sensitivity report (same block names and structure as
SD v2.1-base): the single-block damage of every removed block, summed (an additive estimate;
the retraining comparison in docs/pruning.md measures the real thing for the chosen plan). Every
plan's U-Net step is then **timed** (shared weights, interleaved rounds, median), so the speedups
on the figure are measured, not the block-sum estimate.

Writes ``benchmarks/results/prune_front.{md,json,png}`` with the machine, its CPU flags and load.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from e2e_common import RESULTS, ROOT, log, machine  # noqa: E402

GOAL = 1.35  # the SD-size goal for a time-aware plan's U-Net step speedup


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--report", default=str(ROOT / "benchmarks/results/sensitivity-tiny-sd/sensitivity.json"))
    ap.add_argument("--speedups", default="1.1,1.2,1.3,1.35,1.4,1.5,1.6,1.8")
    ap.add_argument("--target-params", type=float, default=466e6, help="the paper plan's U-Net size")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--latent-size", type=int, default=64)
    ap.add_argument("--preset", default="sd21-base-arch", help=argparse.SUPPRESS)  # tiny-sd: smoke test
    ap.add_argument("--stem", default="prune_front")
    ap.add_argument("--results-dir", default=str(RESULTS))
    a = ap.parse_args(argv)

    import torch

    from slimsd.compress.prune import PRESETS, plan_damage, plan_pruning, pruning_front
    from slimsd.models import build_components, count_params
    from slimsd.profile import block_latency, unet_inputs
    from slimsd.unet_blocks import PrunedUNet2DConditionModel, list_blocks

    t_start = time.time()
    torch.set_num_threads(a.threads)
    before = machine(a.threads)
    log(f"load average before: {before['load_average']}")
    report = json.loads(Path(a.report).read_text())
    unet = build_components(a.preset)[0].eval()
    params = {b.name: b.params for b in list_blocks(unet) if b.removable}  # the target's removable blocks
    total = count_params(unet)
    log("measuring each block's time inside one U-Net step ...")
    with torch.no_grad():
        lat = block_latency(unet, batch=2, latent_size=a.latent_size, repeats=2)
    costs = dict(params=params, latency_ms=lat, total_params=total, total_latency_ms=lat["total"])
    speedups = [float(s) for s in a.speedups.split(",")]
    plans = {"paper 466M (sensitivity)": plan_pruning(report, "sensitivity", target_params=int(a.target_params), **costs)}
    plans |= {p: {"policy": "preset", "removed_blocks": PRESETS[p]} for p in ("bk-base", "bk-small", "bk-tiny")}
    for p in pruning_front(report, speedups, "sensitivity-per-ms", **costs):
        plans[f"time-aware {p['budget']['target_speedup']:.2f}x"] = p
    # time every plan: shared weights, interleaved rounds so drift hits every row alike
    models = {"unpruned": unet} | {k: PrunedUNet2DConditionModel.from_unet(unet, v["removed_blocks"], share_weights=True).eval()
                                   for k, v in plans.items()}
    x = unet_inputs(unet, batch=2, latent_size=a.latent_size)
    times = {k: [] for k in models}
    with torch.no_grad():
        for m in models.values():  # warm-up
            m(*x)
        for r in range(a.repeats):
            for k, m in models.items():
                t0 = time.perf_counter()
                m(*x)
                times[k].append(time.perf_counter() - t0)
                log(f"round {r + 1} {k}: {times[k][-1]:.2f} s")
    base = statistics.median(times["unpruned"])
    rows = []
    for k, m in models.items():
        removed = plans[k]["removed_blocks"] if k in plans else []
        med = statistics.median(times[k])
        rows.append({"plan": k, "unet_params": count_params(m), "removed_blocks": removed, "median_s": med,
                     "all_s": times[k], "speedup": base / med, "est_speedup": plans.get(k, {}).get("est_speedup"),
                     **plan_damage(report, removed)})
    paper = next(r for r in rows if r["plan"].startswith("paper"))
    # the chosen time-aware plan: the least damaging one that measured >= GOAL
    fast = [r for r in rows if r["plan"].startswith("time-aware") and r["speedup"] >= GOAL]
    chosen = min(fast, key=lambda r: r["damage_sum"])["plan"] if fast else None
    after = machine(a.threads)
    after["load_average_before"] = before["load_average"]
    result = {"machine": after, "preset": a.preset, "latent": a.latent_size, "batch": 2, "dtype": "float32",
              "threads": a.threads, "repeats": a.repeats, "report": str(Path(a.report).resolve().relative_to(ROOT))
              if Path(a.report).resolve().is_relative_to(ROOT) else a.report, "block_latency_ms": lat,
              "plans": {k: v for k, v in plans.items()}, "rows": rows, "goal_speedup": GOAL, "chosen": chosen,
              "paper_plan": paper["plan"], "wall_s": time.time() - t_start, "stem": a.stem,
              "command": "python benchmarks/prune_front.py " + " ".join(argv if argv is not None else sys.argv[1:])}
    out = Path(a.results_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{a.stem}.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / f"{a.stem}.md").write_text(markdown(result))
    plot(result, out / f"{a.stem}.png")
    print(markdown(result))
    return 0


def markdown(r: dict) -> str:
    from slimsd.loadtest.machine import describe

    L = [f"# Pruning plans: U-Net step speedup vs sensitivity damage ({r['preset']}, {r['latent']}x{r['latent']} latent, "
         f"batch {r['batch']}, {r['dtype']}, torch)", "",
         f"Machine: {describe(r['machine'])} (load average before: "
         f"{' / '.join(str(x) for x in r['machine']['load_average_before'])}).", "",
         f"Command: `{r['command']}` ({r['wall_s'] / 60:.0f} min wall). Speedups are **measured**: median of "
         f"{r['repeats']} interleaved U-Net steps of each pruned U-Net vs the unpruned one, random weights. Damage is "
         f"the summed single-block damage of `{r['report']}` (tiny-sd, same block names): relative FD increase plus "
         "relative alignment drop, an additive estimate before retraining.", "",
         f"![front]({r.get('stem', 'prune_front')}.png)", "",
         "| plan | U-Net params | blocks removed | step (s) | speedup (measured) | speedup (block-sum estimate) | "
         "damage | FD part | alignment part |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for x in r["rows"]:
        pm = x["per_metric"]
        est = f"{x['est_speedup']:.2f}x" if x.get("est_speedup") else ""
        L.append(f"| {x['plan']} | {x['unet_params'] / 1e6:.0f}M | {len(x['removed_blocks'])} | {x['median_s']:.2f} | "
                 f"**{x['speedup']:.2f}x** | {est} | {x['damage_sum']:+.3f} | {pm.get('fd', 0):+.3f} | "
                 f"{pm.get('alignment', 0):+.3f} |")
    L += ["", f"Goal: a plan with >= {r['goal_speedup']}x U-Net step speedup. Chosen: **{r['chosen'] or 'none reached it'}** "
          "(the least damaging time-aware plan that measured at or above the goal).", "", "Removed blocks:", ""]
    for x in r["rows"][1:]:
        L.append(f"* **{x['plan']}**: {', '.join(x['removed_blocks'])}" +
                 (f" (unscored in the report: {', '.join(x['unscored'])})" if x["unscored"] else ""))
    return "\n".join(L) + "\n"


def plot(r: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.6))
    keys = (("damage_sum", "summed damage (FD + alignment)"), ("fd", "FD part (relative FD increase)"),
            ("alignment", "alignment part (relative drop)"))
    for ax, (k, label) in zip(axes, keys):
        front = [x for x in r["rows"] if x["plan"].startswith("time-aware")]
        val = (lambda x: x["damage_sum"]) if k == "damage_sum" else (lambda x, k=k: x["per_metric"].get(k, 0.0))
        ax.plot([x["speedup"] for x in front], [val(x) for x in front], "o-", color="tab:green", label="time-aware (ours)")
        for x in r["rows"]:
            style = {"paper": ("s", "tab:blue"), "bk-": ("^", "tab:orange"), "unpruned": ("*", "black")}
            mk, c = next((v for p, v in style.items() if x["plan"].startswith(p)), ("o", "tab:green"))
            if not x["plan"].startswith("time-aware"):
                ax.plot(x["speedup"], val(x), mk, color=c, markersize=9)
            ax.annotate(x["plan"].replace("time-aware ", "") if x["plan"] != r["chosen"] else f"{x['plan']} (chosen)",
                        (x["speedup"], val(x)), fontsize=7, xytext=(4, 3), textcoords="offset points")
        ax.axvline(r["goal_speedup"], color="grey", linestyle="--", linewidth=1)
        ax.set_xlabel("U-Net step speedup at SD size (measured)")
        ax.set_ylabel(label + ", lower is better")
        ax.set_title(label.split(" (")[0])
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"Pruning plans on {r['preset']} (speed, {r['threads']} threads) vs tiny-sd's sensitivity damage")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    raise SystemExit(main())
