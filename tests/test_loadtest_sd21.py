"""benchmarks/loadtest_sd21.py: the plan it takes and the pruned + tiny-decoder folder it serves."""

import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "loadtest_sd21.py"


def _module():
    spec = importlib.util.spec_from_file_location("loadtest_sd21_bench", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_plan_is_the_fronts_chosen_plan_unless_named(tmp_path):
    mod = _module()
    front = ROOT / "benchmarks" / "results" / "prune_front.json"
    data = json.loads(front.read_text())
    name, removed = mod.plan_blocks(front, None)
    assert name == data["chosen"] and removed == data["plans"][name]["removed_blocks"]
    name, removed = mod.plan_blocks(front, data["paper_plan"])
    assert removed == data["plans"][data["paper_plan"]]["removed_blocks"]
    with pytest.raises(SystemExit, match="--plan: 'nope'"):
        mod.plan_blocks(front, "nope")


def test_tiny_decoder_folder_loads_in_diffusers_and_keeps_the_unet(tmp_path):
    from diffusers import AutoencoderTiny, StableDiffusionPipeline

    from slimsd.compress.decoder import tiny_vae_config
    from slimsd.models import resolve_model

    mod = _module()
    src = resolve_model("tiny-sd")
    out = mod.with_tiny_decoder(src, tmp_path / "tiny")
    pipe = StableDiffusionPipeline.from_pretrained(out, safety_checker=None)
    assert isinstance(pipe.vae, AutoencoderTiny)
    want = tiny_vae_config(json.loads((src / "vae" / "config.json").read_text()))
    assert all(pipe.vae.config[k] == v for k, v in want.items() if k in pipe.vae.config)
    assert (out / "unet" / "diffusion_pytorch_model.safetensors").read_bytes() == \
        (src / "unet" / "diffusion_pytorch_model.safetensors").read_bytes()
    assert json.loads((out / "slimsd.json").read_text())["vae"] == "AutoencoderTiny"
