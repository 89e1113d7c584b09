"""The teacher-training command end to end at toy length: it must write a loadable pipeline."""

import json

import torch
from diffusers import StableDiffusionPipeline

from slimsd.compress.teacher import TeacherConfig, train_teacher


def test_train_teacher_writes_a_diffusers_pipeline_and_resumes_after_vae(tmp_path, monkeypatch):
    import slimsd.compress.teacher as T

    out = tmp_path / "tiny"
    cfg = TeacherConfig(out=str(out), vae_steps=2, vae_batch=4, unet_steps=2, unet_batch=4, num_latents=16, unet_warmup=1,
                        eval_prompts=4)
    train_teacher(cfg)
    pipe = StableDiffusionPipeline.from_pretrained(out, safety_checker=None, requires_safety_checker=False)
    img = pipe("a red circle left of a blue square", num_inference_steps=2, output_type="np",
               generator=torch.Generator().manual_seed(0)).images[0]
    assert img.shape == (64, 64, 3)
    man = json.loads((out / "training.json").read_text())
    assert man["config"]["unet_steps"] == 2 and "wall_time_s" in man
    assert (out / "loss_curves.png").stat().st_size > 0
    assert pipe.vae.config.scaling_factor != 1.0  # set from the trained latents' std
    manifest = json.loads((out / "manifest.json").read_text())
    assert set(manifest["metrics"]) == {"steps25_cfg7.5", "steps25_cfg1", "steps8_cfg7.5"}
    assert "unet/diffusion_pytorch_model.safetensors" in manifest["files"]
    from slimsd.manifest import verify_manifest

    verify_manifest(out)

    # a rerun resumes from the finished VAE stage instead of training it again
    monkeypatch.setattr(T, "train_vae", lambda *a, **k: (_ for _ in ()).throw(AssertionError("VAE retrained")))
    train_teacher(cfg)
