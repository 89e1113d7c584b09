"""The committed tiny-sd teacher: loads offline with plain diffusers, is intact, follows prompts, needs CFG."""

import json
import os
import shutil
import socket

import pytest
import torch
from diffusers import StableDiffusionPipeline

from slimsd.evaluator import evaluate
from slimsd.manifest import CorruptArtifactError, verify_manifest
from slimsd.models import TINY_SD_DIR, resolve_model


def test_loads_offline_with_plain_diffusers_and_generates():
    pipe = StableDiffusionPipeline.from_pretrained(TINY_SD_DIR, safety_checker=None, requires_safety_checker=False)
    out = pipe("a red circle left of a blue square", num_inference_steps=5, output_type="np",
               generator=torch.Generator().manual_seed(0)).images
    assert out.shape == (1, 64, 64, 3) and out.std() > 0.05


def test_manifest_records_training_and_metrics_and_matches_files():
    from slimsd.compress.teacher import BARS, EVAL_SETTINGS, check_bars, eval_key

    m = verify_manifest(TINY_SD_DIR)
    assert m["training"]["wall_time_s"]["unet_s"] > 0 and "train-teacher" in m["training"]["command"]
    assert m["training"]["config"]["text_encoder_lr"] > 0  # the text encoder was trained with the U-Net
    met = m["metrics"]
    assert set(met) == {eval_key(*s) for s in EVAL_SETTINGS}
    for row in met.values():  # every row has its intervals, at the manifest's prompt count
        assert row["alignment_ci"][0] <= row["alignment"] <= row["alignment_ci"][1]
        assert row["fd_ci"][0] <= row["fd"] <= row["fd_ci"][1] and row["fd_floor"] < row["fd"]
        assert 0 <= row["order"] <= 1 and row["objects_ci"][0] <= row["objects"] <= row["objects_ci"][1]
    # the bars are recorded as measured: recomputing them from the rows gives the same verdicts
    assert m["bars"] == check_bars(met, m["training"]["vae_reconstruction"])
    assert f"objects_train >= {BARS['objects_train']:.2f}" in m["bars"]
    # the dataset is discriminative by design: guidance and steps matter, as the paper's methods need
    m25 = met["steps25_cfg7.5"]
    assert m25["alignment"] > met["steps25_cfg1"]["alignment_ci"][1]
    assert m25["alignment"] > met["steps8_cfg7.5"]["alignment"] > met["steps2_cfg7.5"]["alignment"]
    assert m25["fd"] < met["steps8_cfg7.5"]["fd"] < met["steps4_cfg7.5"]["fd"] < met["steps2_cfg7.5"]["fd"]
    assert m25["attribute_accuracy"]["orient"] >= 0.95


def _preset_copy(src, dst, tamper=None, drop=None):
    """``src`` as links to its files, with ``tamper`` (a relative path) a modified real copy and ``drop`` absent."""
    shutil.copytree(src, dst, copy_function=os.symlink)
    if tamper:
        f = dst / tamper
        data = bytearray(f.read_bytes())
        data[-10] ^= 0xFF
        f.unlink()
        f.write_bytes(bytes(data))
    if drop:
        (dst / drop).unlink()
    return dst


def test_a_modified_weight_file_is_refused_on_every_load_path(tmp_path, monkeypatch, capsys, caplog):
    """The committed preset, tampered: load_pipeline, `slimsd evaluate` and `slimsd serve` refuse it,
    naming the file (not only verify_manifest called by hand)."""
    import slimsd.models as M
    from slimsd.cli import main
    from slimsd.serve.pipeline import load_pipeline as load_served
    from slimsd.serve.settings import ServeSettings

    weights = "unet/diffusion_pytorch_model.safetensors"
    copy = _preset_copy(TINY_SD_DIR, tmp_path / "tiny", tamper=weights)
    with pytest.raises(CorruptArtifactError, match="diffusion_pytorch_model.safetensors"):
        verify_manifest(copy)
    monkeypatch.setattr(M, "TINY_SD_DIR", copy)
    with pytest.raises(CorruptArtifactError, match=f"{copy / weights}: sha256 does not match"):
        M.load_pipeline("tiny-sd")
    with pytest.raises(CorruptArtifactError, match="diffusion_pytorch_model.safetensors"):
        load_served(ServeSettings(model="tiny-sd", backend="onnxruntime", cache_dir=tmp_path / "onnx"))
    assert not (tmp_path / "onnx").exists()  # refused before anything is exported

    assert main(["evaluate", "tiny-sd", "--num-prompts", "2", "--steps", "2"]) == 2
    assert f"{copy / weights}: sha256 does not match" in capsys.readouterr().err
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    assert main(["serve", "tiny-sd", "--backend", "onnxruntime", "--port", str(port), "--no-warmup",
                 "--cache-dir", str(tmp_path / "onnx")]) == 1  # exits: a server that can never be ready
    assert f"{copy / weights}: sha256 does not match" in caplog.text


@pytest.mark.parametrize("preset", ["tiny-sd", "tiny-sd-slim"])
def test_a_preset_without_its_manifest_is_an_error(preset, tmp_path, monkeypatch):
    """Deleting manifest.json must not silently switch the check off."""
    import slimsd.models as M

    attr = {"tiny-sd": "TINY_SD_DIR", "tiny-sd-slim": "TINY_SD_SLIM_DIR"}[preset]
    copy = _preset_copy(getattr(M, attr), tmp_path / preset, drop="manifest.json")
    monkeypatch.setattr(M, attr, copy)
    with pytest.raises(CorruptArtifactError, match=f"{copy / 'manifest.json'}: missing"):
        resolve_model(preset)
    (copy / "manifest.json").write_text(json.dumps({"training": {}}))  # a manifest that lists nothing
    with pytest.raises(CorruptArtifactError, match="lists no files"):
        resolve_model(preset)


def test_follows_heldout_prompts_and_guidance_and_steps_matter():
    """64 held-out prompts (the manifest has the 1024-prompt numbers: 0.918 at guidance 7.5,
    0.847 at 1.0, 0.026 at 2 steps). Here, seed 1: 0.906, 0.859 and 0.031."""
    with_cfg = evaluate("tiny-sd", steps=25, guidance=7.5, num_prompts=64, seed=1)
    no_cfg = evaluate("tiny-sd", steps=25, guidance=1.0, num_prompts=64, seed=1)
    two_steps = evaluate("tiny-sd", steps=2, guidance=7.5, num_prompts=64, seed=1)
    assert with_cfg["alignment"] >= 0.80 and with_cfg["order"] >= 0.95
    assert with_cfg["alignment"] > no_cfg["alignment"]
    assert two_steps["alignment"] <= 0.2 and two_steps["fd"] > 2 * with_cfg["fd"]


def test_resolves_by_name():
    assert resolve_model("tiny-sd") == TINY_SD_DIR
