"""compress/decoder.py (`slimsd compress decoder`): a tiny VAE (diffusers AutoencoderTiny) distilled
from tiny-sd's AutoencoderKL, and the rest of the repo taking its folder unchanged.

One distilled folder per module (40 steps of batch 4 on 32 cached latents, one thread) serves
the pipeline, runner and export tests; the resume and build tests run a few steps of their own.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from slimsd.cli import main
from slimsd.compress.decoder import DecoderConfig, distil_decoder, distil_losses, tiny_vae_config
from slimsd.compress.train import list_checkpoints
from slimsd.models import SD21_VAE, TINY_SD_DIR

FAST = dict(num_latents=32, batch_size=2, logging_steps=1, eval_samples=0, report_to="none", checkpointing_steps=0)
PROMPTS = ["a red circle left of a blue square", "a green triangle above a yellow cross"]


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Small convolutions on a busy 2-core machine: one thread is faster than two."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def distilled(tmp_path_factory):
    """The CLI end to end: tiny-sd's VAE distilled for 40 steps."""
    out = tmp_path_factory.mktemp("dec") / "tiny-taesd"
    assert main(["compress", "decoder", "tiny-sd", "--out", str(out), "--max-steps", "40", "--batch-size", "4",
                 "--num-latents", "32", "--learning-rate", "2e-3", "--logging-steps", "10", "--eval-samples", "8",
                 "--checkpointing-steps", "0", "--report-to", "none", "--json"]) == 0
    return out


def _source_vae_config() -> dict:
    return json.loads((TINY_SD_DIR / "vae" / "config.json").read_text())


def _weights(folder, sub="vae"):
    from safetensors.torch import load_file

    return load_file(folder / sub / "diffusion_pytorch_model.safetensors")


# ---------------------------------------------------------------------------------------
# the architecture and the specs
# ---------------------------------------------------------------------------------------
def test_tiny_config_fits_the_source_and_specs_read_its_pixel_factor():
    from diffusers import AutoencoderTiny

    from slimsd.specs import ModelDims, vae_pixel_factor

    tiny = tiny_vae_config(_source_vae_config())  # tiny-sd: 16/32/64/64 -> 4 levels, 8 px per latent
    assert tiny["decoder_block_out_channels"] == tiny["encoder_block_out_channels"] == [16] * 4
    assert tiny["num_encoder_blocks"] == [1, 3, 3, 3] and tiny["num_decoder_blocks"] == [3, 3, 3, 1]  # TAESD's
    assert tiny["latent_channels"] == 4 and tiny["scaling_factor"] == 1.0
    sd = tiny_vae_config(SD21_VAE)
    assert sd["decoder_block_out_channels"] == [64] * 4  # TAESD's width at SD's scale
    assert tiny_vae_config(SD21_VAE, channels=32)["decoder_block_out_channels"] == [32] * 4

    saved = dict(AutoencoderTiny(**tiny).config)  # what vae/config.json holds (diffusers adds block_out_channels)
    te = {"hidden_size": 64}
    dims = ModelDims.from_configs({"sample_size": 8, "cross_attention_dim": 64}, saved, te)
    assert dims.vae_scale_factor == 8 and dims.image_size == (64, 64) and dims.vae_scaling_factor == 1.0
    # a 3-level source (4 px per latent) gets a 3-level tiny VAE
    three = tiny_vae_config({**_source_vae_config(), "block_out_channels": [16, 32, 64]})
    assert vae_pixel_factor(three) == 4 and len(three["num_decoder_blocks"]) == 3
    # the tiny keys win over the block_out_channels diffusers copies in: x4 upsampling, 2 blocks -> 4 px
    x4 = dict(AutoencoderTiny(**{**three, "encoder_block_out_channels": [8, 8], "decoder_block_out_channels": [8, 8],
                                 "num_encoder_blocks": [1, 1], "num_decoder_blocks": [1, 1],
                                 "upsampling_scaling_factor": 4}).config)
    assert ModelDims.from_configs({"sample_size": 8, "cross_attention_dim": 64}, x4, te).vae_scale_factor == 4
    with pytest.raises(ValueError, match="must be an AutoencoderKL"):
        tiny_vae_config(saved)


def test_the_tiny_decoder_is_trained_on_scaled_latents():
    """The contract with the pipeline: its decoder is fed s z (the pipeline divides by 1), its
    encoder is pulled to s mu, the source decoder's image of z is the target."""
    from diffusers import AutoencoderKL

    source = AutoencoderKL.from_pretrained(TINY_SD_DIR / "vae").eval()
    s = source.config.scaling_factor
    seen = {}

    class Spy(torch.nn.Module):  # TinyPair's interface: (x, z_scaled) -> (latent, image)
        def forward(self, x, z):
            seen["z"] = z
            return torch.zeros(z.shape), torch.zeros(x.shape)

    g = torch.Generator().manual_seed(0)
    x, z, mean = torch.rand(2, 3, 64, 64, generator=g) * 2 - 1, torch.randn(2, 4, 8, 8, generator=g), torch.ones(2, 4, 8, 8)
    cfg = DecoderConfig(out="x", pixel_loss="l1", lambda_image=1.0)
    terms = distil_losses(cfg, Spy(), source, x, z, mean)
    torch.testing.assert_close(seen["z"], s * z)
    with torch.no_grad():
        target = source.decode(z).sample
    assert terms["l_dec_kd"].item() == pytest.approx(target.abs().mean().item(), rel=1e-5)  # |0 - D_T(z)|
    assert terms["l_img"].item() == pytest.approx(x.abs().mean().item(), rel=1e-5)
    assert terms["l_enc_kd"].item() == pytest.approx(s**2, rel=1e-5)  # |0 - s * 1|^2
    assert terms["loss"].item() == pytest.approx(sum(terms[k].item() for k in ("l_dec_kd", "l_img", "l_enc_kd")), rel=1e-5)


# ---------------------------------------------------------------------------------------
# the command and its folder
# ---------------------------------------------------------------------------------------
def test_cli_writes_tiny_sd_with_an_autoencoder_tiny(distilled):
    from slimsd.manifest import sha256_file, verify_manifest

    index = json.loads((distilled / "model_index.json").read_text())
    assert index["vae"] == ["diffusers", "AutoencoderTiny"] and index["unet"] == ["diffusers", "UNet2DConditionModel"]
    cfg = json.loads((distilled / "vae" / "config.json").read_text())
    assert cfg["_class_name"] == "AutoencoderTiny" and cfg["scaling_factor"] == 1.0 and cfg["latent_channels"] == 4
    for sub in ("unet", "text_encoder"):  # everything but the VAE is MODEL's, byte for byte
        for f in (TINY_SD_DIR / sub).iterdir():
            assert sha256_file(distilled / sub / f.name) == sha256_file(f)
    assert not (distilled / "eval").exists()  # the old VAE's samples are not carried over
    m = verify_manifest(distilled)
    assert m["source_model"] == "tiny-sd" and m["default_steps"] == 25 and m["metrics"] == {}
    info = json.loads((distilled / "slimsd.json").read_text())
    assert info["defaults"] == {"steps": 25, "guidance": 7.5} and info["vae"] == "AutoencoderTiny"
    tiny_params = sum(t.numel() for t in _weights(distilled).values())
    assert info["params"]["vae"] == tiny_params < 200_000  # tiny-sd's AutoencoderKL: 978k
    rec = json.loads((distilled / "decoder.json").read_text())
    assert rec["config"]["decoder_channels"] == 16 and rec["config"]["max_steps"] == 40 and rec["wall_time_s"] > 0
    assert {"loss", "l_dec_kd", "l_enc_kd"} <= set(rec["final_loss"]) and rec["final_loss"]["step"] == 40
    assert rec["check"]["num_images"] == 8 and rec["check"]["data"] == "scenes:heldout"
    log = json.loads((distilled / "decoder_loss_log.json").read_text())
    assert [r["step"] for r in log] == [10, 20, 30, 40] and log[-1]["l_dec_kd"] < log[0]["l_dec_kd"]
    assert (distilled / "decoder_loss_curve.png").stat().st_size > 0


def test_pipeline_decodes_the_unets_latents_like_the_source(distilled):
    """The same denoised latents through diffusers' pipeline path: the new folder's pipeline feeds
    them to the tiny decoder undivided (scaling_factor 1) and its image is near the old one."""
    from diffusers import AutoencoderTiny

    from slimsd.models import load_pipeline

    old, new = load_pipeline("tiny-sd"), load_pipeline(distilled)
    assert isinstance(new.vae, AutoencoderTiny) and new.vae_scale_factor == 8

    def gens():
        return [torch.Generator().manual_seed(s) for s in (0, 1)]

    lat = old(PROMPTS, num_inference_steps=4, generator=gens(), output_type="latent").images  # (2, 4, 8, 8), scaled
    img = new(PROMPTS, num_inference_steps=4, generator=gens(), output_type="pt").images  # (2, 3, 64, 64) in [0, 1]
    with torch.no_grad():
        want = old.vae.decode(lat / old.vae.config.scaling_factor).sample
        got = new.vae.decode(lat).sample
        torch.manual_seed(0)
        untrained = AutoencoderTiny(**tiny_vae_config(old.vae.config)).decode(lat).sample
    torch.testing.assert_close(img, (got / 2 + 0.5).clamp(0, 1), rtol=0, atol=1e-5)  # the pipeline's path is s z

    def err(a):
        return float((a.clamp(-1, 1) - want.clamp(-1, 1)).abs().mean() / 2)

    print(f"\nmean |tiny - source| on denoised latents: trained {err(got):.4f}, untrained {err(untrained):.4f}")
    assert err(got) < 0.6 * err(untrained)


def test_encoding_with_the_new_folder_lands_in_the_source_latent_space(distilled, tmp_path):
    """compress train's latent cache over the new folder: AutoencoderTiny's deterministic latents
    (std 0, scaling 1) near the source's s mu, nearer than an untrained encoder's."""
    from diffusers import AutoencoderTiny

    from slimsd.compress.train import build_latent_cache
    from slimsd.models import load_pipeline

    old, new = load_pipeline("tiny-sd"), load_pipeline(distilled)
    kw = dict(data="scenes", num=8, seed=0, resolution=64, cache_root=tmp_path)
    a = build_latent_cache(old.vae, old.text_encoder, old.tokenizer, **kw)
    b = build_latent_cache(new.vae, new.text_encoder, new.tokenizer, **kw)
    assert b["scaling"] == 1.0 and float(b["std"].abs().max()) == 0.0
    ref = a["mean"] * a["scaling"]
    torch.manual_seed(0)
    untrained = build_latent_cache(AutoencoderTiny(**tiny_vae_config(old.vae.config)), old.text_encoder, old.tokenizer,
                                   **{**kw, "cache_root": tmp_path / "u"})
    mse = float((b["mean"] - ref).pow(2).mean())
    assert mse < 0.9 * float((untrained["mean"] - ref).pow(2).mean())


def test_torch_runner_and_onnx_export_take_the_folder(distilled, tmp_path):
    """slimsd.denoise through the torch runner matches diffusers' pipeline; the vae_decoder exports
    through export_component (as tests/test_export.py's pruned U-Net) and ORT matches torch."""
    import onnxruntime as ort

    from slimsd.defaults import generation_defaults
    from slimsd.export.onnx import OnnxExportConfig, export_component
    from slimsd.models import load_pipeline
    from slimsd.runners import generate_with_defaults
    from slimsd.serve.runners_torch import TorchRunners
    from slimsd.specs import component_specs

    pipe = load_pipeline(distilled)
    ref = pipe(PROMPTS, num_inference_steps=4, guidance_scale=7.5, output_type="np",
               generator=[torch.Generator().manual_seed(s) for s in (0, 7)]).images
    ref = (ref * 255).round().astype(np.uint8)
    specs = component_specs(distilled)
    runners = TorchRunners(distilled, device="cpu", threads=1)
    got = generate_with_defaults(runners, pipe.tokenizer, pipe.scheduler, specs["unet"], generation_defaults(distilled),
                                 PROMPTS, steps=4, guidance=7.5, seeds=[0, 7])
    assert got.shape == ref.shape == (2, 64, 64, 3)
    assert np.abs(got.astype(int) - ref.astype(int)).max() <= 2

    spec = specs["vae_decoder"]
    assert spec.inputs[0].dims == ("batch", 4, 8, 8) and spec.outputs[0].dims == ("batch", 3, 64, 64)
    entry = export_component(distilled, tmp_path / "onnx", spec, OnnxExportConfig(), log=lambda m: None)
    assert entry["parity"][0]["rel_error"] < 1e-3
    lat = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    sess = ort.InferenceSession(str(tmp_path / "onnx" / "vae_decoder" / "model.onnx"), providers=["CPUExecutionProvider"])
    onnx_out = sess.run(["sample"], {"latent_sample": lat.numpy()})[0]
    with torch.no_grad():
        torch_out = pipe.vae.decode(lat).sample.numpy()
    np.testing.assert_allclose(onnx_out, torch_out, rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------------------------------
# resume and the build
# ---------------------------------------------------------------------------------------
def test_killed_and_resumed_run_equals_uninterrupted_run(tmp_path):
    kw = dict(model="tiny-sd", max_steps=3, checkpoints_total_limit=1, lambda_image=0.5,
              lr_scheduler="cosine", **{**FAST, "checkpointing_steps": 2})
    full = distil_decoder(DecoderConfig(out=str(tmp_path / "full"), **kw))

    class Killed(Exception):
        pass

    def kill_after_3(step, accelerator):
        if step == 3:  # done but not checkpointed (every 2 steps): lost, as in a real kill
            raise Killed

    with pytest.raises(Killed):
        distil_decoder(DecoderConfig(out=str(tmp_path / "run"), **kw), callback=kill_after_3)
    assert [p.name for p in list_checkpoints(tmp_path / "run.work")] == ["checkpoint-2"]
    assert not (tmp_path / "run").exists()  # no half output
    resumed = distil_decoder(DecoderConfig(out=str(tmp_path / "run"), resume_from_checkpoint="latest", **kw))
    a, b = _weights(full), _weights(resumed)
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6)
    log_a = json.loads((full / "decoder_loss_log.json").read_text())
    log_b = json.loads((resumed / "decoder_loss_log.json").read_text())
    assert [r["step"] for r in log_b] == [1, 2, 3] and "l_img" in log_b[0]
    for ra, rb in zip(log_a, log_b):
        assert ra == pytest.approx(rb, rel=1e-6)
    with pytest.raises(ValueError, match="other settings"):  # a resume with another batch size is refused
        distil_decoder(DecoderConfig(out=str(tmp_path / "run2"), work_dir=str(tmp_path / "run.work"),
                                     resume_from_checkpoint="latest", **{**kw, "batch_size": 4}))


def test_build_with_a_decoder_section_runs_after_the_last_stage_and_reruns_skip(tmp_path):
    from slimsd.compress.build import build
    from slimsd.manifest import verify_manifest

    cfg = {"model": "tiny-sd", "out": str(tmp_path / "four"),
           "stage2": {"max_steps": 1, "student_steps": 4, "num_latents": 32, "batch_size": 2, "report_to": "none",
                      "final_eval_prompts": 0},
           "decoder": {"max_steps": 2, **{k: v for k, v in FAST.items() if k != "checkpointing_steps"}}}
    r = build(cfg)
    assert [(s["stage"], s["status"]) for s in r["stages"]] == [("stage2", "ran"), ("decoder", "ran"), ("final", "ran")]
    out = tmp_path / "four"
    assert json.loads((out / "model_index.json").read_text())["vae"] == ["diffusers", "AutoencoderTiny"]
    m = verify_manifest(out)
    assert m["defaults"]["steps"] == 4  # stage 2's defaults survive the decoder stage
    assert any(c.startswith(f"slimsd compress decoder {tmp_path / 'four.build' / 'stage2'} --out") for c in m["build"]["commands"])
    assert m["build"]["stage_records"]["decoder"]["config"]["max_steps"] == 2
    # the U-Net is stage 2's
    torch.testing.assert_close(_weights(out, "unet"), _weights(tmp_path / "four.build" / "stage2", "unet"), rtol=0, atol=0)
    assert [s["status"] for s in build(cfg)["stages"]] == ["skipped"] * 3
    # another decoder setting reruns the decoder and what follows, not stage 2
    r = build({**cfg, "decoder": {**cfg["decoder"], "decoder_channels": 8}})
    assert [s["status"] for s in r["stages"]] == ["skipped", "ran", "ran"]
    assert json.loads((out / "vae" / "config.json").read_text())["decoder_block_out_channels"] == [8] * 4
    with pytest.raises(ValueError, match="decoder.model is set by the build"):
        build({**cfg, "decoder": {"model": "x"}})


# ---------------------------------------------------------------------------------------
# generated latents (--generated-latents) and fine-tuning (--init-from)
# ---------------------------------------------------------------------------------------
def test_generated_latents_are_the_models_own_samples_and_cached(tmp_path, monkeypatch):
    """Row i is what the pipeline itself ends at for training caption i (prompt and empty
    negative, seed i, the model's steps and guidance), unscaled; a second call reads the cache
    and another step count is another entry."""
    from slimsd.compress.decoder import build_generated_cache
    from slimsd.compress.train.data import build_latent_cache, open_images
    from slimsd.models import load_pipeline

    pipe = load_pipeline("tiny-sd")
    res = int(pipe.vae.config.sample_size)
    cache = build_latent_cache(pipe.vae, pipe.text_encoder, pipe.tokenizer, "scenes", 8, 0, res,
                               cache_root=tmp_path / "latents")
    z = build_generated_cache(pipe, 3, 7.5, cache, 3, 0, "cpu", cache_root=tmp_path / "gen")
    assert z.shape == (3, *cache["mean"].shape[1:])
    get, _ = open_images("scenes", 8, 0, res)
    ref = pipe(get(1)[1], negative_prompt="", num_inference_steps=3, guidance_scale=7.5, output_type="latent",
               generator=torch.Generator().manual_seed(1)).images[0] / pipe.vae.config.scaling_factor
    torch.testing.assert_close(z[1], ref.float(), rtol=1e-4, atol=1e-4)
    files = list((tmp_path / "gen").glob("*.pt"))
    assert len(files) == 1
    with monkeypatch.context() as m:  # a cached call does not sample again
        m.setattr(type(pipe), "__call__", lambda *a, **k: pytest.fail("sampled again"))
        z2 = build_generated_cache(pipe, 3, 7.5, cache, 3, 0, "cpu", cache_root=tmp_path / "gen")
    torch.testing.assert_close(z2, z)
    build_generated_cache(pipe, 2, 7.5, cache, 3, 0, "cpu", cache_root=tmp_path / "gen")
    assert len(list((tmp_path / "gen").glob("*.pt"))) == 2  # the key names the steps


def test_a_run_on_generated_latents_and_a_fine_tune_from_it(tmp_path, monkeypatch):
    monkeypatch.setenv("SLIMSD_CACHE", str(tmp_path / "cache"))
    first = distil_decoder(DecoderConfig(model="tiny-sd", out=str(tmp_path / "gen"), max_steps=2, generated_latents=4,
                                         **FAST))
    assert len(list((tmp_path / "cache" / "generated").glob("*.pt"))) == 1
    rec = json.loads((first / "decoder.json").read_text())["config"]
    assert rec["generated_latents"] == 4 and rec["generated_share"] == 0.5
    # a batch of 4 at share 0.5: two posterior samples, then two generated latents
    import contextlib

    from slimsd.compress.decoder import DistilBatches
    from slimsd.models import load_pipeline

    pipe = load_pipeline("tiny-sd")
    cfg = DecoderConfig(model="tiny-sd", out="x", generated_latents=4, **FAST)
    batches = DistilBatches(cfg, pipe.vae, pipe.text_encoder, pipe.tokenizer, "cpu", contextlib.nullcontext,
                            pipe=pipe, model_dir=TINY_SD_DIR)
    x, z, mean = batches(4, torch.Generator().manual_seed(0))
    is_gen = [any(torch.equal(row, g) for g in batches.generated) for row in z]
    assert is_gen == [False, False, True, True] and x.shape[0] == mean.shape[0] == 4
    # learning rate 0: a fine-tune writes exactly the weights it started from
    tuned = distil_decoder(DecoderConfig(model="tiny-sd", out=str(tmp_path / "ft"), max_steps=1, learning_rate=0.0,
                                         init_from=str(first), **FAST))
    a, b = _weights(first), _weights(tuned)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0)
    with pytest.raises(ValueError, match="--init-from"):  # another width does not fit
        distil_decoder(DecoderConfig(model="tiny-sd", out=str(tmp_path / "bad"), max_steps=1, decoder_channels=8,
                                     init_from=str(first), **FAST))
    with pytest.raises(ValueError, match="--generated-latents"):
        distil_decoder(DecoderConfig(model="tiny-sd", out=str(tmp_path / "bad"), generated_latents=4,
                                     **{**FAST, "num_latents": 0}))
