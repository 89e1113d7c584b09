"""The teacher-training command end to end at toy length: it must write a loadable pipeline."""

import json

import torch
from diffusers import StableDiffusionPipeline

from slimsd.compress.teacher import TeacherConfig, train_teacher


def test_train_teacher_writes_a_diffusers_pipeline_and_resumes_after_vae(tmp_path, monkeypatch):
    import slimsd.compress.teacher as T

    out = tmp_path / "tiny"
    cfg = TeacherConfig(out=str(out), vae_steps=2, vae_batch=4, unet_steps=2, unet_batch=4, num_latents=16, unet_warmup=1,
                        eval_prompts=4, vae_decoder_ft_steps=2, vae_check_prompts=8)
    train_teacher(cfg)
    pipe = StableDiffusionPipeline.from_pretrained(out, safety_checker=None, requires_safety_checker=False)
    img = pipe("a red circle left of a blue square", num_inference_steps=2, output_type="np",
               generator=torch.Generator().manual_seed(0)).images[0]
    assert img.shape == (64, 64, 3)
    man = json.loads((out / "training.json").read_text())
    assert man["config"]["unet_steps"] == 2 and "wall_time_s" in man
    rec = man["vae_reconstruction"]
    assert rec["num_prompts"] == 8 and 0 <= rec["alignment"] <= 1 and rec["fd"] > rec["fd_floor"]
    assert [r["step"] for r in json.loads((out / "loss_log.json").read_text()) if r["stage"] == "vae_decoder"] == [0, 1]
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


def test_decoder_finetune_trains_the_decoder_only_and_lowers_its_loss():
    """The latent space must not move: the encoder (and quant_conv) stay bit-identical."""
    from diffusers import AutoencoderKL

    from slimsd.compress.teacher import finetune_vae_decoder
    from slimsd.data.scenes import SceneDataset, to_tensor
    from slimsd.models import TINY_SD_DIR

    torch.manual_seed(0)
    vae = AutoencoderKL.from_pretrained(TINY_SD_DIR / "vae")
    with torch.no_grad():  # a damaged decoder, so 30 steps have something to repair
        for p in [*vae.decoder.parameters(), *vae.post_quant_conv.parameters()]:
            p.add_(0.02 * torch.randn_like(p))
    enc = {k: v.clone() for k, v in vae.state_dict().items() if not k.startswith(("decoder.", "post_quant_conv."))}
    dec = {k: v.clone() for k, v in vae.state_dict().items() if k.startswith(("decoder.", "post_quant_conv."))}
    ds = SceneDataset("train", seed=99, length=16)
    x = to_tensor([ds[i].image for i in range(16)])

    def loss():
        with torch.no_grad():
            return float(torch.nn.functional.mse_loss(vae.decode(vae.encode(x).latent_dist.mean).sample, x))

    before = loss()
    log = []
    finetune_vae_decoder(vae, TeacherConfig(vae_decoder_ft_steps=30, vae_batch=8, vae_decoder_ft_lr=1e-3), log)
    state = vae.state_dict()
    assert all(torch.equal(state[k], v) for k, v in enc.items())
    assert any(not torch.equal(state[k], v) for k, v in dec.items())
    assert loss() < before
    assert not any(p.requires_grad for p in vae.parameters())
