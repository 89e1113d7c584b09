"""README figures that code computes: recomputed here, so a change to the code behind them fails.

* the counted-FLOPs speedup (README "Does it hold?": 42.8 vs 9.4 TFLOP, 4.58x), from
  ``benchmarks/e2e_sd21.py``'s meta-device FLOP count of the committed time-aware plan with the
  tiny decoder, and the timed ONNX Runtime speedup of the same row;
* ``slimsd compress prune sd21-base-arch --report <tiny-sd report> --target-params 466e6 --plan-only``:
  a plan from a proxy model's report only removes blocks the target can lose, and its counts are
  those of the pruned architecture.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from accelerate import init_empty_weights

from slimsd.models import SD21_TEXT_ENCODER, SD21_UNET, SD21_VAE, count_params
from slimsd.unet_blocks import PrunedUNet2DConditionModel, list_blocks

ROOT = Path(__file__).resolve().parents[1]
PROXY_REPORT = ROOT / "benchmarks" / "results" / "sensitivity-tiny-sd" / "sensitivity.json"


def test_counted_flops_speedup_is_the_readme_figure(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import e2e_sd21

    from slimsd.specs import ModelDims

    committed = json.loads((ROOT / "benchmarks" / "results" / "e2e_sd21.json").read_text())
    paper, ours_plan = committed["plans"]  # the paper's 466M plan, then the time-aware plan (prune_front.json)
    assert ours_plan.startswith("time-aware"), committed["plans"]
    dims = ModelDims.from_configs(SD21_UNET, SD21_VAE, SD21_TEXT_ENCODER)
    assert dims.image_size == (512, 512)
    fl = e2e_sd21.flops_meta(committed["plans"], dims)
    assert fl == committed["flops"]  # the committed results are what the code counts
    assert 1.0e6 < fl["params"]["vae_decoder:tiny"] < 1.5e6  # TAESD's ~1.2M-param decoder
    assert fl["vae_decoder:tiny"] < fl["vae_decoder"] / 10  # far cheaper than AutoencoderKL's
    # one image with CFG: text encoder + steps x U-Net step + VAE decode; ours: 8 steps, tiny decoder
    sd = fl["text_encoder"] + fl["vae_decoder"] + e2e_sd21.SD_STEPS * fl["unet"]
    ours = fl["text_encoder"] + fl["vae_decoder:tiny"] + e2e_sd21.OUR_STEPS * fl[f"unet:{ours_plan}"]
    row = next(line for line in (ROOT / "README.md").read_text().splitlines() if "same, counted FLOPs" in line)
    claimed = re.findall(r"([\d.]+) TFLOP", row) + re.findall(r"\*\*([\d.]+)×\*\*", row)
    assert claimed == [f"{sd / 1e12:.1f}", f"{ours / 1e12:.1f}", f"{sd / ours:.2f}"], row
    assert "4.58" in row
    # the timed totals of the README rows are the committed run's (ONNX Runtime, ours at 8 steps + tiny decoder)
    ort = {(x["plan"], x["steps"], x["decoder"]): x for x in committed["totals"]["onnxruntime"]["rows"]}
    speedup = ort[(ours_plan, e2e_sd21.OUR_STEPS, "tiny")]["speedup"]
    assert speedup >= 4.0 and f"**{speedup:.2f}×**" in (ROOT / "README.md").read_text()


def test_prune_plan_only_for_sd21_from_a_tiny_sd_report(tmp_path, capsys):
    from slimsd.cli import main

    report = json.loads(PROXY_REPORT.read_text())
    with init_empty_weights():
        sd21 = PrunedUNet2DConditionModel(**SD21_UNET, removed_blocks=[])
    target = {b.name: b for b in list_blocks(sd21)}
    scored = {b["name"] for b in report["blocks"] if b.get("removable") and "fd" in b}
    proxy_only = sorted(n for n in scored if not target[n].removable)
    assert proxy_only, "the proxy report should score a block SD v2.1 cannot lose (the case this guards)"

    out = tmp_path / "plan.json"
    assert main(["compress", "prune", "sd21-base-arch", "--report", str(PROXY_REPORT), "--target-params", "466e6",
                 "--plan-only", "--out", str(out), "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert json.loads(out.read_text()) == plan
    removed = plan["removed_blocks"]
    assert removed and plan["met"]
    assert all(target[n].removable for n in removed), [n for n in removed if not target[n].removable]
    assert not set(proxy_only) & set(removed)
    # the plan's counts are SD v2.1's (not the proxy's), and those of the pruned architecture
    assert plan["unet_params"]["before"] == count_params(sd21) == 865_910_724
    with init_empty_weights():
        pruned = PrunedUNet2DConditionModel(**SD21_UNET, removed_blocks=removed)
    assert plan["unet_params"]["after"] == count_params(pruned)
    assert plan["unet_params"]["after"] == pytest.approx(466e6, rel=0.02)  # --tolerance 2%
