"""Model presets: ``tiny-sd``, ``sd21-base-arch``, or any diffusers folder / hub id.

``resolve_model(spec)`` turns whatever the user typed into a local diffusers
pipeline folder; every command that takes a MODEL goes through it.

Preset          what it is                                          used for
--------------  --------------------------------------------------  -------------------------
tiny-sd         SD v2.1-base block structure at small widths,       everything, offline (default)
                trained by ``slimsd train-teacher``; committed
tiny-sd-slim    tiny-sd pruned, CFG-aware retrained and step-       serving at 8 steps
                distilled to 8 steps (``slimsd compress build
                configs/tiny-sd-slim.json``); committed
tiny-sd-slim-4  tiny-sd-slim distilled again, 8 -> 4 steps          serving at 4 steps
                (progressive; ``configs/tiny-sd-slim-4.json``)
sd21-base-arch  exact SD v2.1-base architecture, random weights     speed / size / export only
<folder>        any diffusers StableDiffusionPipeline folder        real use
<hub id>        e.g. stabilityai/stable-diffusion-2-1-base          real use (needs the hub cache
                                                                    or internet)
"""

from __future__ import annotations

import json
import os
from pathlib import Path

ASSETS = Path(__file__).parent / "assets"
TINY_SD_DIR = ASSETS / "tiny-sd"
TINY_SD_SLIM_DIR = ASSETS / "tiny-sd-slim"  # pruned + stage 1 + stage 2 (8 steps): `slimsd compress build configs/tiny-sd-slim.json`
TINY_SD_SLIM_4_DIR = ASSETS / "tiny-sd-slim-4"  # tiny-sd-slim, stage 2 again (4 steps): `slimsd compress build configs/tiny-sd-slim-4.json`
# presets made by `slimsd compress build CONFIG` (committed; the error names the command when absent)
# (the module attribute holding its folder, its build config)
BUILT_PRESETS = {"tiny-sd-slim": ("TINY_SD_SLIM_DIR", "configs/tiny-sd-slim.json"),
                 "tiny-sd-slim-4": ("TINY_SD_SLIM_4_DIR", "configs/tiny-sd-slim-4.json")}
PRESETS = ("tiny-sd", *BUILT_PRESETS, "sd21-base-arch")

# --- SD v2.1-base, as published in its component config.json files -------------
SD21_UNET = dict(
    sample_size=64,  # 512 px / 8
    in_channels=4,
    out_channels=4,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    mid_block_type="UNetMidBlock2DCrossAttn",
    block_out_channels=(320, 640, 1280, 1280),
    layers_per_block=2,
    attention_head_dim=(5, 10, 20, 20),  # diffusers' name; in SD2 it is the number of heads
    cross_attention_dim=1024,
    use_linear_projection=True,
    norm_num_groups=32,
    flip_sin_to_cos=True,
    freq_shift=0,
    upcast_attention=False,
)
SD21_TEXT_ENCODER = dict(  # OpenCLIP ViT-H/14 text tower, last layer dropped (23 of 24)
    vocab_size=49408,
    hidden_size=1024,
    intermediate_size=4096,
    num_hidden_layers=23,
    num_attention_heads=16,
    max_position_embeddings=77,
    hidden_act="gelu",
    projection_dim=512,
    bos_token_id=0,
    eos_token_id=2,
    pad_token_id=1,
)
SD21_VAE = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    block_out_channels=(128, 256, 512, 512),
    layers_per_block=2,
    latent_channels=4,
    norm_num_groups=32,
    sample_size=512,
    scaling_factor=0.18215,
)
# DDIM with SD v2.1-base's noise schedule (scheduler_config.json of the release)
SD21_SCHEDULER = dict(
    num_train_timesteps=1000,
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    clip_sample=False,
    set_alpha_to_one=False,
    steps_offset=1,
    prediction_type="epsilon",
)

# --- tiny-sd: the same blocks at small widths, 64x64 images, 8x8x4 latents ------
TINY_UNET = dict(
    SD21_UNET,
    sample_size=8,  # 64 px / 8
    block_out_channels=(32, 64, 64, 64),
    attention_head_dim=(2, 4, 4, 4),  # heads; head dim 16 everywhere
    cross_attention_dim=128,
    norm_num_groups=8,
)
TINY_TEXT_ENCODER = dict(  # vocab_size is set from the tokenizer we build
    hidden_size=128,
    intermediate_size=256,
    num_hidden_layers=2,
    num_attention_heads=4,
    max_position_embeddings=77,
    hidden_act="gelu",
    projection_dim=128,
)
TINY_VAE = dict(
    SD21_VAE,
    block_out_channels=(16, 32, 64, 64),  # SD's 1:2:4:4 widths; 3 down-samplings: 64 px -> 8x8, as SD
    layers_per_block=1,  # full-resolution blocks dominate training cost: keep them thin
    norm_num_groups=16,
    sample_size=64,
    scaling_factor=1.0,  # set after training to 1 / std(latents), as SD's 0.18215 was
)


def cache_dir() -> Path:
    return Path(os.environ.get("SLIMSD_CACHE", Path.home() / ".cache" / "slimsd"))


def slug(text: str) -> str:
    """``text`` as one safe file-name part: letters, digits, ``-``, ``_`` and ``.`` kept, anything else ``_``."""
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in str(text))


IN_MEMORY_PRESETS = ("sd21-base-arch",)  # random weights: built from configs, never read from a folder to count


def build_in_memory(spec, empty: bool = False) -> dict | None:
    """``{"unet", "text_encoder", "vae"}`` of a preset that needs no folder (``sd21-base-arch``: no
    5 GB materialisation), on the meta device when ``empty``; None for every other model (load
    it from :func:`resolve_model`'s folder)."""
    if str(spec) not in IN_MEMORY_PRESETS:
        return None
    unet, vae, text_encoder, _, _ = build_components(str(spec), device="meta" if empty else "cpu")
    return {"unet": unet, "text_encoder": text_encoder, "vae": vae}


def build_components(preset: str, seed: int = 0, tokenizer_dir: str | Path | None = None, device="cpu"):
    """Randomly initialised ``(unet, vae, text_encoder, tokenizer, scheduler)`` of a preset.

    ``device="meta"`` builds without allocating weights (for counting parameters).
    """
    import tempfile

    import torch
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from .tokenizer import build_clip_tokenizer

    if preset == "tiny-sd":
        unet_cfg, vae_cfg, te_cfg = TINY_UNET, TINY_VAE, TINY_TEXT_ENCODER
    elif preset == "sd21-base-arch":
        unet_cfg, vae_cfg, te_cfg = SD21_UNET, SD21_VAE, SD21_TEXT_ENCODER
    else:
        raise ValueError(f"build_components: unknown preset {preset!r}; it builds tiny-sd and sd21-base-arch")
    if tokenizer_dir is not None:
        tokenizer = CLIPTokenizer.from_pretrained(tokenizer_dir)
    else:
        tokenizer = build_clip_tokenizer(tempfile.mkdtemp(prefix="slimsd-tok-"))
    te_cfg = dict(te_cfg)
    if preset == "tiny-sd":
        te_cfg.update(
            vocab_size=len(tokenizer),
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    # SD v2.1 pads with "!" (id 0 in its vocab); ours pads with <|endoftext|>, also fine
    torch.manual_seed(seed)
    if device == "meta":
        with init_empty_weights():
            unet = UNet2DConditionModel(**unet_cfg)
            vae = AutoencoderKL(**vae_cfg)
            text_encoder = CLIPTextModel(CLIPTextConfig(**te_cfg))
    else:
        unet = UNet2DConditionModel(**unet_cfg)
        vae = AutoencoderKL(**vae_cfg)
        text_encoder = CLIPTextModel(CLIPTextConfig(**te_cfg))
    scheduler = DDIMScheduler(**SD21_SCHEDULER)
    return unet, vae, text_encoder, tokenizer, scheduler


def make_pipeline(unet, vae, text_encoder, tokenizer, scheduler):
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def _materialize_sd21(out: Path, seed: int = 0) -> Path:
    """Write the random-weight SD v2.1-base architecture as a pipeline folder (~5 GB fp32)."""
    from slimsd.io import atomic_dir

    pipe = make_pipeline(*build_components("sd21-base-arch", seed=seed))
    with atomic_dir(out) as tmp:  # a killed run leaves no half folder under the final name
        pipe.save_pretrained(tmp, safe_serialization=True)
        (tmp / "SLIMSD_PRESET.json").write_text(json.dumps({"preset": "sd21-base-arch", "seed": seed,
                                                            "random_weights": True}))
    return out


def is_pipeline_folder(path: Path) -> bool:
    return (path / "model_index.json").is_file()


def _verified_preset(folder: Path) -> Path:
    """A committed preset folder whose every file matches its manifest.json (refused, naming the file,
    when one is modified or missing); a preset without a manifest cannot be checked and is an error."""
    from slimsd.manifest import MANIFEST, CorruptArtifactError, verify_manifest

    data = verify_manifest(folder)
    if not data or not data.get("files"):
        raise CorruptArtifactError(f"{folder / MANIFEST}: missing or lists no files; the committed preset "
                                   "cannot be verified (restore it from git)")
    return folder


def resolve_model(spec: str | os.PathLike) -> Path:
    """Local pipeline folder for a preset name, a folder path, or a hub id.

    Raises ``FileNotFoundError`` naming the spec when nothing usable is found.
    """
    s = str(spec)
    if s == "tiny-sd":
        if not is_pipeline_folder(TINY_SD_DIR):
            raise FileNotFoundError(
                f"tiny-sd weights are missing from {TINY_SD_DIR}; rebuild them with `slimsd train-teacher`"
            )
        return _verified_preset(TINY_SD_DIR)
    if s in BUILT_PRESETS:
        attr, config = BUILT_PRESETS[s]
        folder = globals()[attr]
        if not is_pipeline_folder(folder):
            raise FileNotFoundError(f"{s} is not built yet ({folder} is missing); build it with "
                                    f"`slimsd compress build {config}`")
        return _verified_preset(folder)
    if s == "sd21-base-arch":
        out = cache_dir() / "sd21-base-arch"
        if not is_pipeline_folder(out):
            out.parent.mkdir(parents=True, exist_ok=True)
            _materialize_sd21(out)
        return out
    p = Path(s).expanduser()
    if p.exists():
        if not is_pipeline_folder(p):
            raise FileNotFoundError(f"{p} is not a diffusers pipeline folder (no model_index.json)")
        return p
    if s.count("/") == 1 and not s.startswith((".", "/")):
        from huggingface_hub import snapshot_download

        offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False")
        try:  # the hub cache first; the network only if the user allows it
            return Path(snapshot_download(s, local_files_only=offline))
        except Exception as e:  # noqa: BLE001 - re-raised with the spec named
            raise FileNotFoundError(f"model {s!r}: not in the local hub cache and could not be downloaded ({e})") from e
    raise FileNotFoundError(f"model {s!r}: not a preset ({', '.join(PRESETS)}), a folder, or a hub id")


def load_pipeline(spec: str | os.PathLike, dtype=None):
    """diffusers' ``StableDiffusionPipeline`` for ``spec`` (see :func:`resolve_model`); serve's loader
    of a served pipeline is ``slimsd.serve.pipeline.load_served_pipeline``."""
    import torch
    from diffusers import StableDiffusionPipeline

    import slimsd.unet_blocks  # noqa: F401 - diffusers loads PrunedUNet2DConditionModel only once its module is imported

    folder = resolve_model(spec)
    pipe = StableDiffusionPipeline.from_pretrained(
        folder, torch_dtype=dtype or torch.float32, safety_checker=None, requires_safety_checker=False
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def count_params(module) -> int:
    return sum(p.numel() for p in module.parameters())


def stored_params(folder: str | Path, component: str = "unet") -> int | None:
    """Parameters in ``folder/component/*.safetensors``, summed from the files' headers (no
    weights read); None when there are no such files or a header is unreadable."""
    files = sorted((Path(folder) / component).glob("*.safetensors"))
    if not files:
        return None
    try:
        from safetensors import safe_open

        n = 0
        for f in files:
            with safe_open(f, framework="np") as sf:
                for k in sf.keys():
                    size = 1
                    for d in sf.get_slice(k).get_shape():
                        size *= d
                    n += size
        return n
    except Exception:  # noqa: BLE001 - an unreadable header: the loader reports it properly
        return None
