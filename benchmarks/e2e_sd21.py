"""End to end at 512x512 on the SD v2.1-base architecture: SD at 25 steps vs pruned U-Nets at 8 (and 4) steps.

    python benchmarks/e2e_sd21.py --threads 2 --unet-repeats 3 --vae-repeats 3

``sd21-base-arch`` has random weights: these are **speed** numbers only. One image with
classifier-free guidance at 512x512 (64x64 latent):

* components, each timed on its own: text encoder (batch 2: prompt + negative), **one U-Net
  step** (batch 2) for the unpruned U-Net and for every pruning plan, VAE decode (batch 1) with
  SD's ``AutoencoderKL`` and with the tiny decoder (``--tiny-decoder``, default on): a diffusers
  ``AutoencoderTiny`` of the shape ``slimsd compress decoder`` distils at SD scale (TAESD's, 64
  channels), random weights;
* **bounded**: a few calls per component (``--te-repeats``, ``--unet-repeats``,
  ``--vae-repeats``); the whole generation is *not* run: total = text encoder + steps x U-Net
  step + VAE decode (SD: 25 steps of the unpruned U-Net and the full decoder; ours: 8 steps of the
  pruned one with the full and with the tiny decoder, and 4 steps with the tiny decoder). The
  scheduler maths between steps is not included (a few ms per step on 1x4x64x64 latents);
* runtimes: torch eager (fp32), ONNX Runtime (CPU, fp32) and OpenVINO (CPU, f32 and, where the
  CPU plugin reports BF16, bf16: ``--openvino``) on the export in ``--onnx`` (a
  ``slimsd export onnx sd21-base-arch`` folder, reused, never re-exported; when it is missing,
  each component is exported on its own into it, same specs, no parity check). The pruned U-Nets
  and the tiny decoder are exported the same way into ``--pruned-onnx-root/<plan>/unet/`` and
  ``--pruned-onnx-root/tiny-decoder/vae_decoder/`` the first time, for the plans ``--ort-plans`` selects;
* FLOPs per component are counted with ``torch.utils.flop_counter.FlopCounterMode`` on the
  meta device (no compute) and shown with the achieved FLOP/s as a share of this machine's
  fp32 matmul rate, measured here with the same threads.

Pruning plans: the paper's 466M plan and the chosen time-aware plan of
``benchmarks/results/prune_front.json`` (``benchmarks/prune_front.py``) when that file exists; else
the two 466M plans of ``--plans`` (``prune_latency.json``); else the paper's policy on ``--report`` (a sensitivity report) when given or found
at ``runs/sens-tiny/sensitivity.json``; else a fallback: BK-SDM-Small's removals (485.8M) plus the
removable blocks that bring it closest to 466M. The results say which.

Writes ``benchmarks/results/e2e_sd21.{md,json}``.
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from e2e_common import (ROOT, OrtComponents, OvComponents, TorchComponents, component_inputs, count_flops,  # noqa: E402
                        export_component_only, export_unet_only, fmt_s, log, machine, matmul_peak, stats, time_calls,
                        write_results)

TARGET = 466e6
PAPER = {"A6000 Table 1 (avg. s/image)": (0.66, 0.26), "A6000 §4 text (s/image)": (0.92, 0.31)}
SD_STEPS, OUR_STEPS, FEW_STEPS = 25, 8, 4


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in name.lower()).strip("-")


def _rel(p) -> str:
    p = Path(p).resolve()
    return str(p.relative_to(ROOT)) if p.is_relative_to(ROOT) else str(p)


def meta_unet_params(preset: str = "sd21-base-arch") -> tuple[dict, int, object]:
    from slimsd.models import build_components
    from slimsd.unet_blocks import list_blocks

    unet = build_components(preset, device="meta")[0]
    return {b.name: b for b in list_blocks(unet)}, sum(p.numel() for p in unet.parameters()), unet


def pruning_plans(plans_json: Path, report: Path | None, preset: str = "sd21-base-arch",
                  front_json: Path | None = None) -> tuple[dict[str, list[str]], str]:
    """{plan name: removed blocks}, and where they came from."""
    if front_json is not None and front_json.is_file():
        data = json.loads(front_json.read_text())
        if data.get("chosen"):
            names = [data["paper_plan"], data["chosen"]]
            return {n: data["plans"][n]["removed_blocks"] for n in names}, \
                f"`{_rel(front_json)}` (the paper's 466M plan and the time-aware plan chosen there, made from " \
                f"`{data.get('report')}`)"
    if plans_json.is_file():
        data = json.loads(plans_json.read_text())
        plans = {k: v["removed_blocks"] for k, v in data.get("plans", {}).items()}
        if plans:
            return plans, f"`{plans_json.relative_to(ROOT) if plans_json.is_relative_to(ROOT) else plans_json}` " \
                          f"(the pruning issue's 466M plans, made from `{data.get('report')}`)"
    blocks, total, _ = meta_unet_params(preset)
    params = {n: b.params for n, b in blocks.items()}
    for rep in [report, ROOT / "runs" / "sens-tiny" / "sensitivity.json"]:
        if rep and Path(rep).is_file():
            from slimsd.compress.prune import plan_pruning

            report = json.loads(Path(rep).read_text())
            # removability is the target's (a tiny proxy's block may keep its channels where SD's changes them)
            report["blocks"] = [{**b, "removable": b["name"] in blocks and blocks[b["name"]].removable}
                                for b in report["blocks"]]
            p = plan_pruning(report, "sensitivity", target_params=int(TARGET), params=params, total_params=total)
            return {"466M sensitivity": p["removed_blocks"]}, \
                f"FALLBACK: `prune_latency.json` missing; the paper's policy on `{_rel(rep)}` (parameters only; " \
                "removability from the SD U-Net)"
    from slimsd.compress.prune import PRESETS

    removed = list(PRESETS["bk-small"])
    left = total - sum(params[n] for n in removed)
    while left > TARGET * 1.01:
        cands = [b for n, b in blocks.items() if b.removable and n not in removed]
        best = min(cands, key=lambda b: abs(left - b.params - TARGET))
        if abs(left - best.params - TARGET) >= abs(left - TARGET):
            break
        removed.append(best.name)
        left -= best.params
    return {"466M bk-small+ fallback": removed}, \
        ("FALLBACK: no `benchmarks/results/prune_latency.json` and no sensitivity report; BK-SDM-Small's removals "
         f"plus the blocks that bring the U-Net closest to 466M ({', '.join(removed[len(PRESETS['bk-small']):])})")


def tiny_vae(vae, device=None):
    """The ``AutoencoderTiny`` ``slimsd compress decoder`` distils from ``vae`` (random weights here)."""
    from diffusers import AutoencoderTiny

    from slimsd.compress.decoder import tiny_vae_config

    cfg = tiny_vae_config(vae.config)
    if device == "meta":
        import torch

        with torch.device("meta"):
            return AutoencoderTiny(**cfg)
    return AutoencoderTiny(**cfg).eval()


def flops_meta(plans: dict[str, list[str]], dims, preset: str = "sd21-base-arch") -> dict:
    """FLOPs of every component (and every pruned U-Net) at 512x512, counted on the meta device."""
    import torch

    from slimsd.models import build_components
    from slimsd.unet_blocks import PrunedUNet2DConditionModel

    unet, vae, te, _, _ = build_components(preset, device="meta")
    lh, lw = dims.latent_height, dims.latent_width
    x = torch.randn(2, dims.unet_in_channels, lh, lw, device="meta")
    t = torch.full((2,), 500.0, device="meta")
    c = torch.randn(2, 77, te.config.hidden_size, device="meta")
    out = {"text_encoder": count_flops(lambda: te(input_ids=torch.zeros(2, 77, dtype=torch.long, device="meta"))),
           "unet": count_flops(lambda: unet(x, t, c, return_dict=False)),
           "vae_decoder": count_flops(lambda: vae.decode(torch.randn(1, dims.latent_channels, lh, lw, device="meta"))),
           "params": {"text_encoder": sum(p.numel() for p in te.parameters()),
                      "unet": sum(p.numel() for p in unet.parameters()),
                      "vae_decoder": sum(p.numel() for p in vae.decoder.parameters()) +
                      sum(p.numel() for p in vae.post_quant_conv.parameters())}}
    tiny = tiny_vae(vae, "meta")
    out["vae_decoder:tiny"] = count_flops(lambda: tiny.decode(torch.randn(1, dims.latent_channels, lh, lw, device="meta")))
    out["params"]["vae_decoder:tiny"] = sum(p.numel() for p in tiny.decoder.parameters())
    cfg = {k: v for k, v in unet.config.items() if not k.startswith("_") and k != "removed_blocks"}
    for name, removed in plans.items():
        with torch.device("meta"):
            p = PrunedUNet2DConditionModel(**cfg, removed_blocks=removed)
        out[f"unet:{name}"] = count_flops(lambda: p(x, t, c, return_dict=False))
        out["params"][f"unet:{name}"] = sum(q.numel() for q in p.parameters())
    return out


def export_pruned_unet(pruned, spec, out_dir: Path, opset: int) -> Path:
    """U-Net only, as ``slimsd export onnx`` writes it (trace, stamp names, clean-up), without parity check."""
    final = out_dir / "unet" / "model.onnx"
    if final.is_file():
        return final
    t0 = time.perf_counter()
    export_unet_only(pruned, spec, out_dir, opset)
    (out_dir / "export.json").write_text(json.dumps({"seconds": time.perf_counter() - t0, "opset": opset,
                                                     "removed_blocks": list(pruned.config.removed_blocks)}, indent=2))
    log(f"exported pruned U-Net to {final} in {time.perf_counter() - t0:.0f} s")
    return final


def interleaved(fns: dict, rep, warm, label: str) -> dict:
    """Time ``fns`` in rounds: round r calls every component that still needs a repeat, in order."""
    for name, fn in fns.items():
        for _ in range(warm(name)):
            fn()
    all_s = {name: [] for name in fns}
    for r in range(max(rep(n) for n in fns)):
        for name, fn in fns.items():
            if r < rep(name):
                all_s[name] += time_calls(fn, 1, warmup=0)
                log(f"{label} {name}: {fmt_s(all_s[name][-1])} (round {r + 1})")
    return {name: stats(v) for name, v in all_s.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--onnx", default=str(ROOT / "runs" / "onnx-sd21"), help="slimsd export onnx sd21-base-arch folder")
    ap.add_argument("--front", default=str(ROOT / "benchmarks" / "results" / "prune_front.json"),
                    help="benchmarks/prune_front.py's results: its paper plan and chosen time-aware plan")
    ap.add_argument("--plans", default=str(ROOT / "benchmarks" / "results" / "prune_latency.json"),
                    help="used when --front is missing")
    ap.add_argument("--no-tiny-decoder", action="store_true", help="time only SD's AutoencoderKL decoder")
    ap.add_argument("--report", default=None, help="sensitivity report for the fallback plan")
    ap.add_argument("--pruned-onnx-root", default=str(ROOT / "runs" / "onnx-sd21-pruned"))
    ap.add_argument("--ort-plans", default="first", choices=("first", "all", "none"),
                    help="plans whose pruned U-Net is exported and timed in ONNX Runtime (default: the first)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--te-repeats", type=int, default=3)
    ap.add_argument("--unet-repeats", type=int, default=2)
    ap.add_argument("--vae-repeats", type=int, default=1)
    ap.add_argument("--warmup", type=int, default=0, help="untimed calls before U-Net / VAE timing (text encoder: 1)")
    ap.add_argument("--no-ort", action="store_true", help="no ONNX export: torch eager only (OpenVINO needs the export)")
    ap.add_argument("--openvino", default="auto",
                    help="OpenVINO precisions to time on the same ONNX files: 'auto' (f32, plus bf16 where the CPU "
                         "plugin reports BF16), a comma list such as 'f32,bf16', or 'none'")
    ap.add_argument("--openvino-shapes", default="dynamic", choices=("static", "dynamic"),
                    help="OpenVINO compiles the export's dynamic shapes (as slimsd serve does for SD-size U-Nets) or "
                         "static ones for the timed inputs (as it does for small ones; measured no faster at SD size)")
    ap.add_argument("--stem", default="e2e_sd21")
    ap.add_argument("--preset", default="sd21-base-arch", help=argparse.SUPPRESS)  # tiny-sd: smoke test of the script
    ap.add_argument("--render-only", action="store_true", help="rewrite the .md from the existing .json")
    a = ap.parse_args()
    if a.render_only:
        from e2e_common import RESULTS

        r = json.loads((RESULTS / f"{a.stem}.json").read_text())
        r["totals"] = totals(r)
        write_results(a.stem, r, markdown(r))
        return

    import torch

    from slimsd.models import build_components
    from slimsd.specs import ModelDims, component_specs
    from slimsd.unet_blocks import PrunedUNet2DConditionModel

    t_start = time.time()
    torch.set_num_threads(a.threads)
    before = machine(a.threads)
    log(f"load average before: {before['load_average']}")
    peak = matmul_peak(a.threads)
    log(f"fp32 matmul ({a.threads} threads): {peak['gflops']:.1f} GFLOP/s")
    ov_precisions = [] if a.no_ort else openvino_precisions(a.openvino)
    peak_bf16 = matmul_peak(a.threads, dtype="bfloat16") if "bf16" in ov_precisions else None
    if peak_bf16:
        log(f"bf16 matmul ({a.threads} threads): {peak_bf16['gflops']:.1f} GFLOP/s")
    plans, plans_source = pruning_plans(Path(a.plans), Path(a.report) if a.report else None, a.preset,
                                        Path(a.front) if a.front else None)
    log(f"plans: {plans_source}: {list(plans)}")
    onnx_dir = Path(a.onnx)
    dims = ModelDims.from_folder(onnx_dir) if (onnx_dir / "manifest.json").is_file() else None
    if dims is None:
        from slimsd.models import resolve_model

        dims = ModelDims.from_folder(resolve_model(a.preset))
    flops = flops_meta(plans, dims, a.preset)
    log("FLOPs: " + ", ".join(f"{k} {v / 1e12:.3f} T" for k, v in flops.items() if k != "params"))
    inputs = component_inputs(dims)
    times: dict[str, dict] = {"torch": {}, "onnxruntime": {}}

    def rep(name):  # "unet" and "unet:<plan>" get --unet-repeats, both decoders --vae-repeats
        return a.vae_repeats if name.startswith("vae_decoder") else {"text_encoder": a.te_repeats}.get(name, a.unet_repeats)

    def warm(name):
        return 1 if name == "text_encoder" else a.warmup

    # -- torch eager -------------------------------------------------------------------------
    # every component of one runtime is timed in interleaved rounds (text encoder, SD U-Net, each
    # pruned U-Net, VAE, again ...), so load changes on a shared machine hit all of them alike
    log(f"building {a.preset} (random weights) ...")
    unet, vae, te, _, _ = build_components(a.preset)
    tc = TorchComponents(te, unet, vae)
    fns = {c: tc.fn(c, inputs[c]) for c in ("text_encoder", "unet", "vae_decoder")}
    tiny = None if a.no_tiny_decoder else tiny_vae(vae)
    if tiny is not None:
        fns["vae_decoder:tiny"] = TorchComponents(te, unet, tiny).fn("vae_decoder", inputs["vae_decoder"])
    ort_plans = {"first": list(plans)[:1], "all": list(plans), "none": []}[a.ort_plans] if not a.no_ort else []
    pruned_onnx = {}
    has_export = (onnx_dir / "manifest.json").is_file()
    specs = component_specs(onnx_dir if has_export else dims, dtype="float32" if not has_export else None,
                            dynamic_hw=False if not has_export else None)
    spec = specs["unet"] if not a.no_ort else None
    opset = json.loads((onnx_dir / "manifest.json").read_text())["export"]["opset"] if has_export else 17
    standalone = {}
    if not a.no_ort and not has_export:  # each component alone, same specs, no parity check
        for c, m in (("text_encoder", te), ("unet", unet), ("vae_decoder", vae)):
            standalone[c] = export_component_only(m, c, specs[c], onnx_dir, opset)
            log(f"exported {c} to {standalone[c]}")
    if not a.no_ort and tiny is not None:
        pruned_onnx["vae_decoder:tiny"] = export_component_only(tiny, "vae_decoder", specs["vae_decoder"],
                                                                Path(a.pruned_onnx_root) / "tiny-decoder", opset)
    pruned_modules = []
    for name, removed in plans.items():
        pruned = PrunedUNet2DConditionModel.from_unet(unet, removed).eval()
        if name in ort_plans and spec is not None:
            pruned_onnx[f"unet:{name}"] = export_pruned_unet(pruned, spec, Path(a.pruned_onnx_root) / _slug(name), opset)
        pruned_modules.append(pruned)
        fns[f"unet:{name}"] = TorchComponents(te, pruned, vae).fn("unet", inputs["unet"])
    times["torch"] = interleaved(fns, rep, warm, "torch")
    del unet, vae, te, tc, fns, pruned_modules, tiny
    gc.collect()
    # -- ONNX Runtime ------------------------------------------------------------------------------
    ort_load = {}
    if not a.no_ort:
        paths = {c: onnx_dir / c / "model.onnx" for c in ("text_encoder", "unet", "vae_decoder")}
        paths.update(pruned_onnx)
        oc = OrtComponents(paths, a.threads)
        ort_load = oc.load_s
        log("onnxruntime sessions loaded: " + ", ".join(f"{k} {v:.0f} s" for k, v in ort_load.items()))
        fns = {c: oc.fn(c, inputs[c.split(":")[0]]) for c in paths}
        times["onnxruntime"] = interleaved(fns, rep, warm, "onnxruntime")
        del oc, fns
        gc.collect()
    # -- OpenVINO, one precision at a time, the same ONNX files ------------------------------------
    ov_load = {}
    for prec in ov_precisions:
        rt = f"openvino-{prec}"
        oc = OvComponents(paths, a.threads, prec, static=a.openvino_shapes == "static")
        fns = {c: oc.fn(c, inputs[c.split(":")[0]]) for c in paths}
        ov_load[rt] = oc.load_s
        log(f"{rt} compiled ({a.openvino_shapes} shapes): " + ", ".join(f"{k} {v:.0f} s" for k, v in oc.load_s.items()))
        times[rt] = interleaved(fns, rep, warm, rt)
        del oc, fns
        gc.collect()
    after = machine(a.threads)
    after["load_average_before"] = before["load_average"]
    result = {"threads": a.threads, "repeats": {"text_encoder": a.te_repeats, "unet": a.unet_repeats,
                                                "vae_decoder": a.vae_repeats, "warmup": a.warmup},
              "matmul_peak": peak, "matmul_peak_bf16": peak_bf16, "ov_compile_s": ov_load,
              "openvino_shapes": a.openvino_shapes, "plans": plans, "plans_source": plans_source, "flops": flops, "times": times,
              "ort_load_s": ort_load, "onnx": str(onnx_dir), "pruned_onnx": {k: str(v) for k, v in pruned_onnx.items()},
              "machine": after, "wall_s": time.time() - t_start,
              "command": "python benchmarks/e2e_sd21.py " + " ".join(sys.argv[1:]), "paper": PAPER}
    result["totals"] = totals(result)
    md = markdown(result)
    j, m = write_results(a.stem, result, md)
    print(md)
    log(f"wrote {j} and {m}")


def openvino_precisions(arg: str) -> list[str]:
    """``--openvino`` -> the precisions to time (bf16 only where OpenVINO's CPU plugin has it)."""
    if arg == "none":
        return []
    try:
        from slimsd.serve.runners_openvino import cpu_supports_bf16
        has_bf16 = cpu_supports_bf16()
    except Exception as e:  # noqa: BLE001 - openvino missing or broken: say so, time the rest
        log(f"openvino not timed: {e}")
        return []
    wanted = ["f32", "bf16"] if arg == "auto" else [x.strip() for x in arg.split(",") if x.strip()]
    bad = [x for x in wanted if x not in ("f32", "bf16")]
    if bad:
        raise SystemExit(f"--openvino: unknown precision {', '.join(bad)}; use f32, bf16, auto or none")
    if "bf16" in wanted and not has_bf16:
        if arg != "auto":
            raise SystemExit("--openvino bf16: this CPU's OpenVINO plugin reports no BF16")
        wanted.remove("bf16")
    return wanted


def totals(r: dict) -> dict:
    """Per runtime: SD (25 x unpruned U-Net + full decoder) and each plan at 8 steps (full and tiny
    decoder) and 4 steps (tiny decoder), each with its speedup over SD in the same runtime."""
    out = {}
    for rt, t in r["times"].items():
        if not all(c in t for c in ("text_encoder", "unet", "vae_decoder")):
            continue
        te = t["text_encoder"]["median_s"]
        dec = {"full": t["vae_decoder"]["median_s"]}
        if "vae_decoder:tiny" in t:
            dec["tiny"] = t["vae_decoder:tiny"]["median_s"]
        sd = te + dec["full"] + SD_STEPS * t["unet"]["median_s"]
        rows = [{"plan": "SD v2.1-base", "steps": SD_STEPS, "decoder": "full", "total_s": sd}]
        for name in r["plans"]:
            if f"unet:{name}" not in t:
                continue
            step = t[f"unet:{name}"]["median_s"]
            rows.append({"plan": name, "steps": OUR_STEPS, "decoder": "full", "total_s": te + dec["full"] + OUR_STEPS * step})
            if "tiny" in dec:
                for n in (OUR_STEPS, FEW_STEPS):
                    rows.append({"plan": name, "steps": n, "decoder": "tiny", "total_s": te + dec["tiny"] + n * step})
        for x in rows:
            x["speedup"] = sd / x["total_s"]
        out[rt] = {"rows": rows, "unet_step_speedup": {n: t["unet"]["median_s"] / t[f"unet:{n}"]["median_s"]
                                                       for n in r["plans"] if f"unet:{n}" in t}}
    return out


def markdown(r: dict) -> str:
    from slimsd.loadtest.machine import describe

    fl, t, peak = r["flops"], r["times"], r["matmul_peak"]
    runtimes = [rt for rt in t if t[rt]]
    busy = r["machine"]["load_average_before"][0] > 0.75 * (r["machine"]["logical_cores"] or 1)
    L = ["# End to end at 512x512, SD v2.1-base architecture: 25 steps vs pruned U-Nets at 8 and 4 steps", "",
         "Random weights (`sd21-base-arch`): speed only. One image with classifier-free guidance. **Bounded**: each "
         "component is timed on its own for a few calls, all components of a runtime in interleaved rounds "
         f"(text encoder {r['repeats']['text_encoder']} after 1 warm-up, U-Net step {r['repeats']['unet']}, "
         f"VAE decode {r['repeats']['vae_decoder']}; {r['repeats']['warmup']} untimed warm-up calls for U-Net/VAE) and "
         "the total is **computed**: text encoder + steps x one U-Net step + VAE decode (scheduler maths between steps "
         "not included: a few ms per step). Each time is the median of its interleaved repeats.", "",
         f"Machine: {describe(r['machine'])} (load average before: "
         f"{' / '.join(str(x) for x in r['machine']['load_average_before'])}).", "",
         f"Command: `{r['command']}` ({r['wall_s'] / 60:.0f} min wall).", ""]
    if busy:
        L += [f"**Load**: the 1-minute load average before the run was {r['machine']['load_average_before'][0]} on "
              f"{r['machine']['logical_cores']} cores (other jobs, or the decay of the previous one: this number cannot "
              "tell which; see the notes of the run), so absolute times may be inflated. Ratios measured in the same "
              "run are the useful part.", ""]
    L += [f"Pruning plans: {r['plans_source']}.", "",
          "The matmul rate was measured at the start of the run, so under contention the *% of matmul* columns "
          "compare against a rate that was itself reduced; read them as rough.", ""] if busy else \
         [f"Pruning plans: {r['plans_source']}.", ""]
    for name, removed in r["plans"].items():
        L.append(f"* **{name}** ({fl['params'][f'unet:{name}']:,} U-Net params, {len(removed)} blocks removed): "
                 f"{', '.join(removed)}")
    L += ["", "## Totals (one 512x512 image)", "",
          "| runtime | model | U-Net params | steps | decoder | total | speedup vs SD 25 steps (same runtime) |",
          "|---|---|---:|---:|---|---:|---:|"]
    for rt, x in r["totals"].items():
        for row in x["rows"]:
            key = "unet" if row["plan"].startswith("SD") else f"unet:{row['plan']}"
            L.append(f"| {rt} | {row['plan']} | {fl['params'][key] / 1e6:.0f}M | {row['steps']} | {row['decoder']} | "
                     f"{fmt_s(row['total_s'])} | **{row['speedup']:.2f}x** |")
    dec_f = {"full": fl["vae_decoder"], "tiny": fl.get("vae_decoder:tiny")}
    sd_f = fl["text_encoder"] + dec_f["full"] + SD_STEPS * fl["unet"]
    for name in r["plans"]:
        for steps, d in ((OUR_STEPS, "full"), (OUR_STEPS, "tiny"), (FEW_STEPS, "tiny")):
            if dec_f[d] is None:
                continue
            ours_f = fl["text_encoder"] + dec_f[d] + steps * fl[f"unet:{name}"]
            L.append(f"| FLOP count (no timing) | {name} vs SD | | {steps} vs 25 | {d} | {ours_f / 1e12:.1f} vs "
                     f"{sd_f / 1e12:.1f} TFLOP | **{sd_f / ours_f:.2f}x** |")
    if "torch" in r["totals"]:  # product view: SD in diffusers' torch fp32 vs our fastest runtime for each row
        sd_torch = r["totals"]["torch"]["rows"][0]["total_s"]
        best: dict[tuple, tuple[str, dict]] = {}
        for rt, x in r["totals"].items():
            for row in x["rows"][1:]:
                k = (row["plan"], row["steps"], row["decoder"])
                if rt != "torch" and (k not in best or row["total_s"] < best[k][1]["total_s"]):
                    best[k] = (rt, row)
        for (plan, steps, dec), (rt, row) in best.items():
            L.append(f"| {rt} vs SD torch eager fp32 (product view) | {plan} | | {steps} | {dec} | "
                     f"{fmt_s(row['total_s'])} | **{sd_torch / row['total_s']:.2f}x** |")
    L += ["", "U-Net step speedup over SD's (same runtime): " + "; ".join(
        f"{rt}: " + ", ".join(f"{n} {v:.2f}x" for n, v in x["unet_step_speedup"].items()) for rt, x in r["totals"].items()) + "."]
    for name in r["plans"]:
        L += ["", f"Where it comes from ({name}): the pruned U-Net has {fl['params'][f'unet:{name}'] / fl['params']['unet']:.0%} "
              f"of the parameters and {fl[f'unet:{name}'] / fl['unet']:.0%} of the FLOPs per step; SD's VAE decode alone "
              f"costs {fl['vae_decoder'] / fl['unet']:.1f} SD U-Net steps of FLOPs"
              + (f", the tiny decoder {fl['vae_decoder:tiny'] / fl['unet']:.2f}" if fl.get("vae_decoder:tiny") else "") + "."]
    L += ["", "Paper (A6000 GPU, fp16, real weights): " + "; ".join(
        f"{k}: {a:.2f} s -> {b:.2f} s = {a / b:.2f}x" for k, (a, b) in r["paper"].items()) +
        "; the paper states **3.0x**.", "",
        "## Per component", "",
        f"Measured fp32 matmul rate ({peak['n']}x{peak['n']}, torch, {peak['threads']} thread(s)): "
        f"**{peak['gflops']:.1f} GFLOP/s** (best of 20; median {peak['median_gflops']:.1f}). FLOPs counted with "
        "`FlopCounterMode` on the meta device (matmul / conv / attention, 1 MAC = 2 FLOPs).", "",
        ] + ([f"Measured bf16 matmul rate (same size and threads, torch): **{r['matmul_peak_bf16']['gflops']:.1f} "
              "GFLOP/s**; the openvino-bf16 column is a share of this one.", ""] if r.get("matmul_peak_bf16") else []) + [
        "| component | params | GFLOP | " + " | ".join(runtimes) + " | " +
        " | ".join(f"{rt} GFLOP/s (% of matmul)" for rt in runtimes) + " |",
        "|---|---:|---:|" + "---:|" * (2 * len(runtimes))]
    names = ["text_encoder", "unet"] + [f"unet:{n}" for n in r["plans"]] + ["vae_decoder"] + \
        (["vae_decoder:tiny"] if "vae_decoder:tiny" in fl else [])
    for c in names:
        f = fl[c]
        cells = []
        for rt in runtimes:
            x = t.get(rt, {}).get(c)
            pk = (r.get("matmul_peak_bf16") or peak) if rt.endswith("bf16") else peak  # same precision
            cells.append((fmt_s(x["median_s"]), f"{f / x['median_s'] / 1e9:.1f} ({100 * f / x['median_s'] / 1e9 / pk['gflops']:.0f}%)")
                         if x else ("not run", ""))
        label = {"text_encoder": "text encoder (batch 2)", "unet": "U-Net step, SD (batch 2)",
                 "vae_decoder": "VAE decode, AutoencoderKL (batch 1)",
                 "vae_decoder:tiny": "VAE decode, tiny AutoencoderTiny (batch 1)"}.get(c, f"U-Net step, {c[5:]} (batch 2)")
        L.append(f"| {label} | {fl['params'][c] / 1e6:.0f}M | {f / 1e9:,.0f} | " + " | ".join(x[0] for x in cells) +
                 " | " + " | ".join(x[1] for x in cells) + " |")
    if r.get("ort_load_s"):
        L += ["", "ONNX Runtime session load (s): " + ", ".join(f"{k} {v:.0f}" for k, v in r["ort_load_s"].items()) + "."]
    if r.get("ov_compile_s"):
        L += ["", f"OpenVINO compiled for {r.get('openvino_shapes', 'dynamic')} shapes" +
              (" (the timed inputs' shapes, as `slimsd serve` compiles a small U-Net's first shape)."
               if r.get("openvino_shapes") == "static" else " (the export's dynamic shapes, as `slimsd serve` runs SD-size U-Nets).")]
    for rt, loads in (r.get("ov_compile_s") or {}).items():
        L += ["", f"{rt} compile (s, no cache): " + ", ".join(f"{k} {v:.0f}" for k, v in loads.items()) + "."]
    L += ["", "Every call's time is in the JSON next to this file (`times.<runtime>.<component>.all_s`)."]
    return "\n".join(L) + "\n"


if __name__ == "__main__":
    main()
