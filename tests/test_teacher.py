"""The teacher-training command end to end at toy length: it must write a loadable pipeline."""

import json

import pytest
import torch
from diffusers import StableDiffusionPipeline

from slimsd.compress.teacher import TeacherConfig, check_bars, train_teacher, train_unet
from slimsd.models import build_components


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
    assert set(manifest["metrics"]) == {"steps25_cfg7.5", "train_steps25_cfg7.5", "steps25_cfg1", "steps8_cfg7.5",
                                        "steps4_cfg7.5", "steps2_cfg7.5"}
    assert {"objects", "objects_ci", "order", "alignment_ci", "fd_ci", "fd_floor"} <= set(manifest["metrics"]["steps25_cfg7.5"])
    assert any(k.startswith("objects_train >=") for k in manifest["bars"])
    # the text encoder was trained with the U-Net (the default) and saved as trained
    init_te = build_components("tiny-sd", seed=0)[2].state_dict()
    saved_te = pipe.text_encoder.state_dict()
    assert any(not torch.equal(saved_te[k], v) for k, v in init_te.items() if "position_ids" not in k)
    assert "unet/diffusion_pytorch_model.safetensors" in manifest["files"]
    from slimsd.manifest import verify_manifest

    verify_manifest(out)

    # a rerun resumes from the finished VAE stage instead of training it again
    monkeypatch.setattr(T, "train_vae", lambda *a, **k: (_ for _ in ()).throw(AssertionError("VAE retrained")))
    train_teacher(cfg)

    # --decoder-only: more decoder steps on the finished pipeline; encoder and U-Net untouched
    from dataclasses import replace

    unet_bytes = (out / "unet" / "diffusion_pytorch_model.safetensors").read_bytes()
    enc_before = {k: v for k, v in pipe.vae.state_dict().items() if not k.startswith(("decoder.", "post_quant_conv."))}
    monkeypatch.setattr(T, "train_unet", lambda *a, **k: (_ for _ in ()).throw(AssertionError("U-Net retrained")))
    train_teacher(replace(cfg, decoder_only=True, vae_decoder_ft_steps=3))
    cont = json.loads((out / "training.json").read_text())["vae_decoder_continued"]
    assert len(cont) == 1 and cont[0]["steps"] == 3 and cont[0]["after"]["num_prompts"] == 8
    assert (out / "unet" / "diffusion_pytorch_model.safetensors").read_bytes() == unet_bytes
    from diffusers import AutoencoderKL

    vae2 = AutoencoderKL.from_pretrained(out / "vae").state_dict()
    assert all(torch.equal(vae2[k], v) for k, v in enc_before.items())
    assert any(not torch.equal(vae2[k], v) for k, v in pipe.vae.state_dict().items() if k.startswith("decoder."))
    verify_manifest(out)  # re-written over the new decoder
    with pytest.raises(FileNotFoundError, match="not a pipeline"):
        train_teacher(replace(cfg, out=str(tmp_path / "nothing"), decoder_only=True))


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


def _toy_latents(n=8, n_caps=3):
    """(mean, std, cap_index, ids table, empty id) as encode_dataset returns them for a joint encoder."""
    _, _, te, tok, _ = build_components("tiny-sd", seed=0)
    caps = ["a red circle left of a blue square", "a blue square right of a red circle", "a red circle above a blue square", ""]
    ids = tok(caps, padding="max_length", max_length=tok.model_max_length, return_tensors="pt").input_ids
    g = torch.Generator().manual_seed(0)
    return (torch.randn(n, 4, 8, 8, generator=g), torch.full((n, 4, 8, 8), 0.1), torch.arange(n) % n_caps, ids, n_caps), te


def test_joint_text_encoder_learns_and_a_zero_lr_keeps_it_frozen():
    unet, _, _, _, sched = build_components("tiny-sd", seed=0)
    latents, te = _toy_latents()
    before = {k: v.clone() for k, v in te.state_dict().items()}
    cfg = TeacherConfig(unet_steps=3, unet_batch=4, unet_warmup=1, ema_decay=0.0, text_encoder_lr=1e-3)
    train_unet(unet, sched, latents, cfg, [], scaling=1.0, text_encoder=te)
    assert any(not torch.equal(te.state_dict()[k], v) for k, v in before.items())
    assert not any(p.requires_grad for p in te.parameters()) and not te.training  # frozen after, as SD's

    # frozen: the table holds the encoder's states, and the encoder is not touched
    unet, _, _, _, sched = build_components("tiny-sd", seed=0)
    (mean, std, cap_index, ids, empty), te = _toy_latents()
    with torch.no_grad():
        states = te(ids)[0]
    before = {k: v.clone() for k, v in te.state_dict().items()}
    cfg = TeacherConfig(unet_steps=2, unet_batch=4, unet_warmup=1, text_encoder_lr=0.0)
    train_unet(unet, sched, (mean, std, cap_index, states, empty), cfg, [], scaling=1.0, text_encoder=te)
    assert all(torch.equal(te.state_dict()[k], v) for k, v in before.items())


def test_check_bars_reports_each_bar_met_or_missed():
    def row(al, obj, lo=None, fd=100.0):
        return {"alignment": al, "alignment_ci": [lo if lo is not None else al - 0.03, al + 0.03], "objects": obj, "fd": fd}

    metrics = {"steps25_cfg7.5": row(0.78, 0.85), "train_steps25_cfg7.5": row(0.80, 0.89),
               "steps25_cfg1": row(0.40, 0.5), "steps8_cfg7.5": row(0.76, 0.8, fd=104.0)}
    bars = check_bars(metrics, {"alignment": 0.992, "fd": 16.0})
    assert bars["objects_train >= 0.90"] == {"value": 0.89, "met": False}
    assert bars["objects_heldout >= 0.80"]["met"] and bars["alignment_heldout >= 0.75 (goal)"]["met"]
    assert bars["alignment at guidance 1 below guidance 7.5"]["met"]
    assert not bars["8 steps worse than 25 (>= 0.05 alignment or >= 10% FD)"]["met"]  # 0.02 and 4%
    assert bars["vae_reconstruction alignment >= 0.99"]["met"] and not bars["vae_reconstruction fd <= 15"]["met"]


def test_unet_stage_resumes_from_its_checkpoint_bit_for_bit(tmp_path, monkeypatch):
    """Killed after the step-2 checkpoint, a rerun ends with the weights of an uninterrupted run."""
    import slimsd.compress.teacher as T

    import copy

    cfg = TeacherConfig(unet_steps=4, unet_batch=4, unet_warmup=1, checkpoint_every=2, text_encoder_lr=1e-3)
    # one tokenizer and one initial text encoder for all runs: the BPE trainer that builds the
    # tokenizer breaks frequency ties differently from call to call (ids of fallback tokens)
    latents, te0 = _toy_latents()

    def run(work, die_at=None):
        torch.manual_seed(0)
        unet, _, _, _, sched = build_components("tiny-sd", seed=0)
        te = copy.deepcopy(te0)
        calls = {"n": 0}
        real = torch.nn.utils.clip_grad_norm_

        def clip(*a, **k):
            calls["n"] += 1
            if calls["n"] == die_at:
                raise KeyboardInterrupt("killed")
            return real(*a, **k)

        monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", clip)
        log = []
        train_unet(unet, sched, latents, cfg, log, scaling=1.0, text_encoder=te, work=work)
        return unet.state_dict(), te.state_dict(), log, calls["n"]

    ref_unet, ref_te, ref_log, n = run(tmp_path / "a")
    assert n == 4
    work = tmp_path / "b"
    work.mkdir()
    with pytest.raises(KeyboardInterrupt):
        run(work, die_at=3)  # dies in step 3, after the checkpoint of steps 1-2
    assert (work / "unet_checkpoint.pt").is_file()
    unet, te, log, n = run(work)
    assert n == 2  # steps 3 and 4 only
    bad = {k: float((unet[k] - v).abs().max()) for k, v in ref_unet.items() if not torch.equal(unet[k], v)}
    assert not bad, (len(bad), list(bad.items())[:3])
    assert all(torch.equal(te[k], v) for k, v in ref_te.items())
    assert [r["step"] for r in log] == [r["step"] for r in ref_log]
    # other settings: the checkpoint is not used
    monkeypatch.setattr(T, "_stage_key", lambda c: {"other": 1})
    assert run(work)[3] == 4  # all four steps again
