r"""A distilled tiny VAE: ``slimsd compress decoder MODEL --out DIR`` (docs/decoder.md).

MODEL's ``AutoencoderKL`` (frozen, the source) teaches a diffusers ``AutoencoderTiny`` (TAESD's
architecture: plain conv blocks, no attention, no normalisation, one width everywhere). The
output is a copy of MODEL's pipeline folder whose ``vae/`` is the tiny one, so every loader,
export and runner takes it like any other folder.

Latent scale. diffusers' pipelines and :func:`slimsd.denoise.generate` divide the U-Net's latents
by ``vae.config.scaling_factor`` before ``decode``. The tiny config says ``scaling_factor = 1``
and its decoder is trained on the *scaled* latents ``s z`` (what the U-Net produces), its
encoder to give ``s mu``: the division becomes a no-op and the U-Net's latent space is unchanged.

Loss (compress/losses.py): ``L = l_DecKD L_DecKD + l_Img L_Img + l_EncKD L_EncKD``. Both halves
train in one run, because the folder's VAE is replaced whole: anything that encodes with it
(``slimsd compress train``'s latent cache on this folder) must land in the same latent space.

Data: the images of ``slimsd compress train`` (``--data``, default the scene renders), encoded
once by the source VAE into the same latent cache (compress/train/data.py; keyed by the VAE,
so a stage already trained on this MODEL finds it ready), the images re-read by index for the
encoder; ``--num-latents 0`` encodes every batch of a streamed dataset instead.
Checkpoints: ``OUT.work/checkpoint-STEP`` (compress/train/checkpoint.py), every micro-step
seeded by its position, so ``--resume-from-checkpoint latest`` replays the rest exactly.

``OUT/``: MODEL's files (not its ``eval/`` samples: they were decoded by the old VAE), ``vae/``
replaced, ``model_index.json``'s ``vae`` entry ``AutoencoderTiny``, ``slimsd.json`` (MODEL's
defaults, new parameter counts, ``decoder``), ``decoder.json`` (settings, command, wall time,
final losses, the held-out check), ``decoder_loss_log.json``, ``decoder_loss_curve.png``,
``manifest.json``. Written to a temporary folder and renamed: complete or absent.
"""

from __future__ import annotations

import json
import math
import shutil
import sys
import time
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Literal, Mapping

import torch

from slimsd.cliargs import option
from slimsd.compress.losses import PIXEL_NORMS, loss_decoder_image, loss_decoder_kd, loss_encoder_kd
from slimsd.compress.train.checkpoint import TrainState, save_checkpoint
from slimsd.compress.train.config import MixedPrecision, ReportTo, config_sha
from slimsd.compress.train.data import build_latent_cache, cycle_dataset, open_images, micro_generator, posterior
from slimsd.compress.train.loop import log_row, make_accelerator, make_lr_scheduler, resume, with_threads
from slimsd.compress.train.output import run_record
from slimsd.io import atomic_dir

PixelNorm = Literal["l1", "mse"]
LOG_KEYS = ("loss", "l_dec_kd", "l_img", "l_enc_kd")
# settings a resumed run must share with its checkpoint
RESUME_KEYS = ("model", "data", "num_latents", "data_seed", "resolution", "batch_size", "gradient_accumulation_steps",
               "decoder_channels", "generated_latents", "generated_share", "init_from")
TAESD_CHANNELS = 64  # TAESD's width, at SD's scale


@dataclass
class DecoderConfig:
    model: str = option("tiny-sd", "source pipeline (preset, folder or hub id) whose AutoencoderKL is distilled")
    out: str = option("", "pipeline folder to write: a copy of MODEL's whose vae/ is an AutoencoderTiny")
    work_dir: str | None = option(None, "checkpoints and logs (default OUT.work)")
    decoder_channels: int | None = option(None, "width of every tiny encoder / decoder block (default: min(64, the "
                                                "source's first block_out_channels): TAESD's 64 on SD, 16 on tiny-sd)")
    # data: the images of `slimsd compress train`, through the same latent cache
    data: str = option("scenes", "'scenes' or a dataset spec of slimsd.data.user (folder, csv/jsonl, shards, HF dataset)")
    num_latents: int = option(20_000, "training images encoded once by the source VAE and cached; 0 = encode every "
                                      "batch (streamed data)")
    data_seed: int = option(0, "which training images are used")
    resolution: int | None = option(None, "image size (default: the source VAE's sample_size)")
    generated_latents: int = option(0, "also distil the decoder on N latents of MODEL's own sampling (its U-Net at "
                                       "its default steps and guidance, on training captions), made once and cached: "
                                       "what the decoder is fed when serving (0: off)")
    generated_share: float = option(0.5, "share of each batch's decoder inputs drawn from the generated latents "
                                         "(with --generated-latents; the encoder keeps the real images)")
    init_from: str | None = option(None, "start from the tiny VAE of an earlier `slimsd compress decoder` folder "
                                         "(a fine-tune; its width is kept) instead of random weights")
    # optimisation
    max_steps: int = option(2000, "optimisation steps")
    batch_size: int = option(16, "images per process and micro-step")
    gradient_accumulation_steps: int = option(1, "micro-steps per optimisation step")
    learning_rate: float = option(1e-3, "AdamW lr (the tiny VAE starts from scratch)")
    lr_scheduler: str = option("constant", "constant | constant_with_warmup | linear | cosine | ... (diffusers get_scheduler)")
    lr_warmup_steps: int = option(0, "warm-up steps of the lr schedule")
    adam_weight_decay: float = option(0.0, "AdamW weight decay")
    max_grad_norm: float = option(1.0, "gradient clipping (0: off)")
    mixed_precision: MixedPrecision = option("no", "fp16 needs a GPU; master weights stay fp32")
    seed: int = option(0, "seeds the tiny VAE's initial weights and every micro-step's batch and posterior noise")
    threads: int = option(0, "torch CPU threads (0: torch's default)")
    # losses (compress/losses.py)
    pixel_loss: PixelNorm = option("l1", "norm of the decoder losses: l1 (mean absolute error) or mse")
    lambda_decoder: float = option(1.0, "weight of L_DecKD: tiny decoder vs the source decoder on the same latents")
    lambda_image: float = option(0.0, "weight of L_Img: tiny decoder vs the real image (0: off)")
    lambda_encoder: float = option(1.0, "weight of L_EncKD: tiny encoder vs the source's scaled posterior mean")
    # checkpoints, logging, the final check
    checkpointing_steps: int = option(500, "write OUT.work/checkpoint-STEP every N steps (0: never)")
    checkpoints_total_limit: int = option(2, "keep the last K checkpoints (0: all)")
    resume_from_checkpoint: str | None = option(None, "'latest' (starts fresh when there is none) or a checkpoint folder")
    logging_steps: int = option(10, "one decoder_loss_log.json row (means since the last row) every N steps")
    report_to: ReportTo = option("auto", "auto: tensorboard when it is installed, else none")
    eval_samples: int = option(64, "held-out images of the final check (PSNR against the source decoder, encoder "
                                   "latent MSE); 0: none")


def resolve_config(cfg: DecoderConfig) -> DecoderConfig:
    """Validate ``cfg`` and fill in ``work_dir`` (returns a copy)."""
    if not cfg.out:
        raise ValueError("--out is required")
    if cfg.pixel_loss not in PIXEL_NORMS:
        raise ValueError(f"--pixel-loss must be one of {PIXEL_NORMS}, got {cfg.pixel_loss!r}")
    if cfg.mixed_precision == "fp16" and not torch.cuda.is_available():
        raise ValueError("--mixed-precision fp16 needs a CUDA GPU; use bf16 or no on CPU")
    for k in ("max_steps", "batch_size", "gradient_accumulation_steps", "logging_steps"):
        if getattr(cfg, k) < 1:
            raise ValueError(f"--{k.replace('_', '-')} must be >= 1, got {getattr(cfg, k)}")
    if cfg.decoder_channels is not None and cfg.decoder_channels < 1:
        raise ValueError(f"--decoder-channels must be >= 1, got {cfg.decoder_channels}")
    if cfg.generated_latents < 0 or not 0 < cfg.generated_share < 1:
        raise ValueError(f"--generated-latents must be >= 0 and --generated-share in (0, 1), got "
                         f"{cfg.generated_latents} / {cfg.generated_share}")
    if cfg.generated_latents and cfg.num_latents <= 0:
        raise ValueError("--generated-latents samples on the cached training captions: it needs --num-latents > 0")
    # both halves must learn: the folder's VAE is replaced whole (module docstring)
    if cfg.lambda_decoder <= 0 or cfg.lambda_encoder <= 0 or cfg.lambda_image < 0:
        raise ValueError("--lambda-decoder and --lambda-encoder must be > 0, --lambda-image >= 0")
    out = Path(cfg.out)
    return replace(cfg, work_dir=cfg.work_dir or str(out.with_name(out.name + ".work")))


def config_from_dict(d: dict) -> DecoderConfig:
    """DecoderConfig from a dict with ``snake_case`` or ``kebab-case`` keys (a build's ``decoder``
    section); unknown keys are an error."""
    names = {f.name for f in fields(DecoderConfig)}
    norm = {k.replace("-", "_"): v for k, v in d.items()}
    unknown = sorted(set(norm) - names)
    if unknown:
        raise ValueError(f"unknown decoder option(s) {unknown}; see `slimsd compress decoder --help`")
    return DecoderConfig(**norm)


# ---------------------------------------------------------------------------------------
# the architecture: diffusers' AutoencoderTiny, sized to the source
# ---------------------------------------------------------------------------------------
def default_channels(source: Mapping) -> int:
    """TAESD's 64, capped by the source's full-resolution width (its first ``block_out_channels``).

    TAESD is 64 wide at every level against SD's 128 / 256 / 512 / 512: half the width of SD's
    cheapest level, where its cost is dominated by the full-resolution layers. A small source
    (tiny-sd: 16 / 32 / 64 / 64) would be out-grown by a 64-wide student (1.2M decoder parameters
    against tiny-sd's 0.6M); capped at 16 it has 78k and decodes ~1.5x faster on a CPU core."""
    return min(TAESD_CHANNELS, int(source["block_out_channels"][0]))


def tiny_vae_config(source: Mapping, channels: int | None = None) -> dict:
    """``AutoencoderTiny`` keyword arguments that fit ``source`` (an ``AutoencoderKL`` config): the
    same latent channels and pixels per latent, every block ``channels`` wide, scaling factor 1."""
    from slimsd.specs import vae_pixel_factor

    if "decoder_block_out_channels" in source or "block_out_channels" not in source:
        raise ValueError("the source VAE must be an AutoencoderKL (this folder's VAE is already a tiny one?)")
    levels = len(source["block_out_channels"])  # AutoencoderKL: 2 ** (levels - 1) pixels per latent
    c = int(channels or default_channels(source))
    cfg = {
        "in_channels": int(source.get("in_channels", 3)), "out_channels": int(source.get("out_channels", 3)),
        "latent_channels": int(source.get("latent_channels", 4)),
        "encoder_block_out_channels": [c] * levels, "decoder_block_out_channels": [c] * levels,
        # TAESD's block counts at SD's four levels, (1, 3, 3, 3) and (3, 3, 3, 1); other depths keep the pattern
        "num_encoder_blocks": [1] + [3] * (levels - 1), "num_decoder_blocks": [3] * (levels - 1) + [1],
        "upsampling_scaling_factor": 2,
        # fed the scaled latents s z: the pipeline's division by scaling_factor becomes a no-op
        "scaling_factor": 1.0, "shift_factor": 0.0,
    }
    assert vae_pixel_factor(cfg) == vae_pixel_factor(source), (cfg, dict(source))
    return cfg


class TinyPair(torch.nn.Module):
    """``forward(x, z) -> (E_S(x), D_S(z))``: both halves in one call, so a DDP wrapper
    (``accelerate launch``) sees every parameter used in its forward."""

    def __init__(self, vae):
        super().__init__()
        self.vae = vae

    def forward(self, x, z):  # (B, 3, H, W), (B, C, h, w) scaled -> (B, C, h, w) scaled, (B, 3, H, W)
        return self.vae.encode(x).latents, self.vae.decode(z).sample


# ---------------------------------------------------------------------------------------
# data: (image, posterior sample, posterior mean) of the source VAE
# ---------------------------------------------------------------------------------------
class DistilBatches:
    """Micro-batches ``(x, z, mu)``: images (B, 3, H, W) in [-1, 1], a posterior sample and the
    mean of the source VAE (unscaled, (B, C, h, w)). Cached: the moments from the latent cache,
    the images re-rendered / re-read by index (cache row i is image i). Streamed: both per batch.
    With ``generated_latents`` the last ``round(B x share)`` rows of z are generated latents
    instead (the decoder's inputs only: x and mu still pair up for the encoder)."""

    def __init__(self, cfg: DecoderConfig, source, text_encoder, tokenizer, device, main_first, skip: int = 0,
                 pipe=None, model_dir: Path | None = None):
        resolution = cfg.resolution or int(source.config.sample_size)
        self.source, self.device, self.cache, self.generated = source, device, None, None
        self.share = cfg.generated_share
        if cfg.num_latents > 0:
            with main_first():
                self.cache = build_latent_cache(source, text_encoder, tokenizer, cfg.data, cfg.num_latents,
                                                cfg.data_seed, resolution, device=device)
                if cfg.generated_latents:
                    from slimsd.defaults import generation_defaults

                    d = generation_defaults(model_dir)  # how MODEL samples when served
                    self.generated = build_generated_cache(pipe, d.steps, d.guidance, self.cache,
                                                           cfg.generated_latents, cfg.data_seed, device)
            self.get, _ = open_images(cfg.data, cfg.num_latents, cfg.data_seed, resolution)
            return
        from slimsd.data.user import open_dataset

        ds = open_dataset(cfg.data, resolution=resolution, seed=cfg.data_seed, shuffle_buffer=1000)
        self.it = cycle_dataset(ds, skip)

    @torch.no_grad()
    def __call__(self, batch: int, g: torch.Generator):
        from slimsd.data.scenes import to_tensor

        if self.cache is not None:
            idx = torch.randint(len(self.cache["mean"]), (batch,), generator=g)
            x = to_tensor([self.get(int(i))[0] for i in idx])
            mean, std = self.cache["mean"][idx], self.cache["std"][idx]
        else:
            x = to_tensor([next(self.it)[0] for _ in range(batch)])
            mean, std = (t.float().cpu() for t in posterior(self.source, x.to(self.device, self.source.dtype)))
        z = mean + std * torch.randn(mean.shape, generator=g)  # a fresh posterior sample, as the U-Net trains on
        if self.generated is not None:  # the decoder's other inputs: where the U-Net's own sampling ends
            n_gen = max(1, round(batch * self.share))
            z = torch.cat([z[: batch - n_gen], self.generated[torch.randint(len(self.generated), (n_gen,), generator=g)]])
        return x.to(self.device), z.to(self.device), mean.to(self.device)


@torch.no_grad()
def build_generated_cache(pipe, steps: int, guidance: float, cache: dict, num: int, seed: int, device,
                          batch: int = 64, cache_root: Path | None = None) -> torch.Tensor:
    """(num, C, h, w) unscaled latents where MODEL's own sampling ends: its U-Net and scheduler at
    its default steps and guidance (slimsd.defaults), on the training captions of the latent
    cache (row i's caption, cycled), image i seeded ``seed * 1_000_003 + i``. What a served decoder
    is fed, which a real image's posterior is not: guided samples sit off the encoder's
    distribution. Cached under ``$SLIMSD_CACHE/generated``, keyed by everything that changes them:
    the latent cache's own key (data, VAE, text encoder), the U-Net, the scheduler and the settings."""
    import hashlib

    from tqdm.auto import tqdm

    from slimsd.compress.train.data import weights_key
    from slimsd.models import cache_dir

    key = hashlib.sha256(json.dumps([cache["key"], weights_key(pipe.unet), dict(pipe.scheduler.config),
                                     type(pipe.scheduler).__name__, num, seed, steps, guidance],
                                    sort_keys=True, default=str).encode()).hexdigest()[:20]
    path = (Path(cache_root) if cache_root else cache_dir() / "generated") / f"{key}.pt"
    if path.is_file():
        return torch.load(path, map_location="cpu", weights_only=True)
    from slimsd.io import atomic_path

    s = float(pipe.vae.config.scaling_factor)
    caps = cache["cap_index"][torch.arange(num) % len(cache["cap_index"])]  # (num,)
    uncond = cache["table"][cache["empty_id"]]  # (77, D)
    out = []
    pipe.unet.to(device)
    for i in tqdm(range(0, num, batch), desc=f"generate latents ({steps} steps, guidance {guidance:g})",
                  dynamic_ncols=True):
        idx = range(i, min(i + batch, num))
        pe = cache["table"][caps[i : i + len(idx)]].to(device)  # (b, 77, D)
        gens = [torch.Generator().manual_seed(seed * 1_000_003 + j) for j in idx]
        lat = pipe(prompt_embeds=pe, negative_prompt_embeds=uncond.expand_as(pe).to(device), num_inference_steps=steps,
                   guidance_scale=guidance, generator=gens, output_type="latent").images  # (b, C, h, w) scaled
        out.append(lat.float().cpu() / s)
    z = torch.cat(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        torch.save(z, tmp)
    return z


# ---------------------------------------------------------------------------------------
# the loop
# ---------------------------------------------------------------------------------------
def distil_decoder(cfg: DecoderConfig, callback=None) -> Path:
    """Train the tiny VAE and write ``cfg.out``; returns it. ``callback(step, accelerator)`` runs
    after every optimisation step (tests use it to interrupt a run)."""
    return with_threads(cfg.threads, _distil, cfg, callback)


def _distil(cfg: DecoderConfig, callback=None) -> Path:
    from accelerate.utils import set_seed
    from diffusers import AutoencoderKL, AutoencoderTiny
    from tqdm.auto import tqdm

    from slimsd.models import load_pipeline, resolve_model

    cfg = resolve_config(cfg)
    source_dir = resolve_model(cfg.model)
    pipe = load_pipeline(source_dir)
    source = pipe.vae
    if not isinstance(source, AutoencoderKL):
        raise ValueError(f"{source_dir}: its vae is a {type(source).__name__}; the source must be an AutoencoderKL")
    init = None
    if cfg.init_from:
        init_vae = Path(resolve_model(cfg.init_from)) / "vae"
        if not (init_vae / "config.json").is_file() or json.loads((init_vae / "config.json").read_text()).get(
                "_class_name") != "AutoencoderTiny":
            raise ValueError(f"--init-from {cfg.init_from}: {init_vae} is not an AutoencoderTiny (a `slimsd compress "
                             "decoder` output folder)")
        init = AutoencoderTiny.from_pretrained(init_vae)
        width = int(init.config.decoder_block_out_channels[0])
        if cfg.decoder_channels not in (None, width):
            raise ValueError(f"--init-from {cfg.init_from}: its tiny VAE is {width} channels wide, not "
                             f"--decoder-channels {cfg.decoder_channels}")
        cfg = replace(cfg, decoder_channels=width)
    cfg = replace(cfg, decoder_channels=cfg.decoder_channels or default_channels(source.config))
    work = Path(cfg.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    accelerator, report_to = make_accelerator(cfg, work)
    set_seed(cfg.seed)  # the tiny VAE's initial weights
    dev, main = accelerator.device, accelerator.is_main_process
    for m in (source, pipe.text_encoder):  # frozen; the text encoder only keys / fills the shared latent cache
        m.requires_grad_(False).eval().to(dev)

    tiny = AutoencoderTiny(**tiny_vae_config(source.config, cfg.decoder_channels))
    if init is not None:  # a fine-tune: same architecture (strict: every tensor's name and shape), its weights
        try:
            tiny.load_state_dict(init.state_dict())
        except RuntimeError as e:
            raise ValueError(f"--init-from {cfg.init_from}: its tiny VAE does not fit {cfg.model}'s VAE: {e}") from e
    pair = TinyPair(tiny).train()
    optimizer = torch.optim.AdamW(pair.parameters(), lr=cfg.learning_rate, weight_decay=cfg.adam_weight_decay)
    lr_scheduler = make_lr_scheduler(optimizer, cfg.lr_scheduler, cfg.lr_warmup_steps, cfg.max_steps,
                                     accelerator.num_processes)
    pair, optimizer, lr_scheduler = accelerator.prepare(pair, optimizer, lr_scheduler)
    state = TrainState(asdict(cfg), log_keys=LOG_KEYS, resume_keys=RESUME_KEYS)
    accelerator.register_for_checkpointing(state)
    resume(cfg, accelerator, work, state)
    used = state.step * cfg.gradient_accumulation_steps * cfg.batch_size
    batches = DistilBatches(cfg, source, pipe.text_encoder, pipe.tokenizer, dev, accelerator.main_process_first,
                            skip=used, pipe=pipe, model_dir=source_dir)
    if report_to != "none":
        accelerator.init_trackers("slimsd-decoder", config={k: v for k, v in asdict(cfg).items()
                                                            if isinstance(v, (int, float, str, bool))})

    bar = tqdm(total=cfg.max_steps, initial=state.step, desc="tiny VAE", dynamic_ncols=True, disable=not main)
    t_start = time.time() - state.train_s
    while state.step < cfg.max_steps:
        t0 = time.time()
        optimisation_step(cfg, accelerator, pair, optimizer, lr_scheduler, source, batches, state)
        state.step += 1
        state.compute_s += time.time() - t0
        bar.update(1)
        if state.step % cfg.logging_steps == 0 or state.step == cfg.max_steps:
            log_row(accelerator, state, lr_scheduler, bar)
        state.train_s = time.time() - t_start
        if cfg.checkpointing_steps and state.step % cfg.checkpointing_steps == 0:
            save_checkpoint(accelerator, work, state.step, cfg.checkpoints_total_limit)
        if callback is not None:
            callback(state.step, accelerator)
    bar.close()
    accelerator.wait_for_everyone()
    state.train_s = time.time() - t_start

    if main:
        final = accelerator.unwrap_model(pair).vae.to("cpu").eval()  # master weights: fp32 under mixed precision too
        source.to("cpu")
        check = evaluate_tiny_vae(final, source, cfg) if cfg.eval_samples > 0 else None
        write_output(final, cfg, state, source_dir, check, accelerator.num_processes)
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return Path(cfg.out)


def distil_losses(cfg: DecoderConfig, pair, source, x, z, mean) -> dict:
    """The loss terms of one micro-batch: x (B, 3, H, W), z and mean (B, C, h, w) unscaled."""
    s = float(source.config.scaling_factor)
    with torch.no_grad():
        target = source.decode(z).sample  # (B, 3, H, W): the image the pipeline shows today
    latent, image = pair(x, s * z)  # the tiny decoder sees what the U-Net produces: s z
    terms = {"l_dec_kd": loss_decoder_kd(image, target, cfg.pixel_loss), "l_enc_kd": loss_encoder_kd(latent, mean, s)}
    loss = cfg.lambda_decoder * terms["l_dec_kd"] + cfg.lambda_encoder * terms["l_enc_kd"]
    if cfg.lambda_image > 0:
        terms["l_img"] = loss_decoder_image(image, x, cfg.pixel_loss)
        loss = loss + cfg.lambda_image * terms["l_img"]
    return {"loss": loss, **terms}


def optimisation_step(cfg: DecoderConfig, accelerator, pair, optimizer, lr_scheduler, source, batches,
                      state: TrainState) -> None:
    """``gradient_accumulation_steps`` micro-steps, each with its own generator (exact resume);
    the loss terms are summed into ``state.window``."""
    for micro in range(cfg.gradient_accumulation_steps):
        g = micro_generator(cfg.seed, accelerator.process_index, state.step, micro)
        x, z, mean = batches(cfg.batch_size, g)
        with accelerator.accumulate(pair):
            losses = distil_losses(cfg, pair, source, x, z, mean)
            accelerator.backward(losses["loss"])
            if accelerator.sync_gradients and cfg.max_grad_norm > 0:
                accelerator.clip_grad_norm_(pair.parameters(), cfg.max_grad_norm)
            optimizer.step()
            lr_scheduler.step()
            optimizer.zero_grad(set_to_none=True)
        for k, v in losses.items():
            state.window[0, LOG_KEYS.index(k)] += float(v.detach())
            state.window[1, LOG_KEYS.index(k)] += 1


# ---------------------------------------------------------------------------------------
# the final check and the output folder
# ---------------------------------------------------------------------------------------
def _psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """PSNR in dB of two image batches in [-1, 1], clipped and compared in [0, 1] as saved images are."""
    mse = float(((a.clamp(-1, 1) - b.clamp(-1, 1)) / 2).pow(2).mean())
    return round(10 * math.log10(1 / max(mse, 1e-12)), 2)


@torch.no_grad()
def evaluate_tiny_vae(tiny, source, cfg: DecoderConfig, batch: int = 16) -> dict:
    """The tiny VAE against the source on ``eval_samples`` images it was not trained on (scenes:
    the held-out split; user data: another draw, ``data_seed + 1``, which may overlap)."""
    from slimsd.data.scenes import to_tensor

    data = "scenes:heldout" if cfg.data.split(":")[0] == "scenes" else cfg.data
    resolution = cfg.resolution or int(source.config.sample_size)
    get, n = open_images(data, cfg.eval_samples, cfg.data_seed + 1, resolution)
    x = to_tensor([get(i)[0] for i in range(n)])  # (N, 3, H, W)
    s = float(source.config.scaling_factor)
    ref, dec, rt, lat, lat_ref = [], [], [], [], []
    for i in range(0, n, batch):
        xb = x[i : i + batch]
        mean, _ = posterior(source, xb)
        ref.append(source.decode(mean).sample)  # what the old folder shows for these latents
        dec.append(tiny.decode(s * mean).sample)  # what the new one shows for the same U-Net latents
        lat.append(tiny.encode(xb).latents)
        lat_ref.append(s * mean)
        rt.append(tiny.decode(lat[-1]).sample)
    ref, dec, rt, lat, lat_ref = (torch.cat(t) for t in (ref, dec, rt, lat, lat_ref))
    return {
        "data": data, "data_seed": cfg.data_seed + 1, "num_images": n,
        "decoder_psnr_vs_source_db": _psnr(dec, ref),  # same latents, tiny vs source decoder
        "encoder_latent_mse": round(float((lat - lat_ref).pow(2).mean()), 6),
        "latent_variance": round(float(lat_ref.var()), 6),  # the scale encoder_latent_mse is read against
        "roundtrip_psnr_db": {"tiny": _psnr(rt, x), "source": _psnr(ref, x)},  # image -> latent -> image
    }


def _command() -> str:
    argv = sys.argv[1:]
    return "slimsd " + " ".join(argv) if argv[:2] in (["compress", "decoder"], ["compress", "build"]) else " ".join(sys.argv)


def write_output(tiny, cfg: DecoderConfig, state: TrainState, source_dir: Path, check: dict | None,
                 num_processes: int) -> Path:
    """``cfg.out``: MODEL's folder with ``vae/`` the tiny VAE, and its records (module docstring)."""
    from slimsd.compress.train.output import plot_loss_log
    from slimsd.defaults import generation_defaults
    from slimsd.manifest import write_manifest
    from slimsd.models import count_params, stored_params

    out = Path(cfg.out)
    defaults = generation_defaults(source_dir)
    defaults = {"steps": defaults.steps, "guidance": defaults.guidance}
    source_vae_params = stored_params(source_dir, "vae")
    record = {
        "what": "tiny VAE (diffusers AutoencoderTiny) distilled from the source AutoencoderKL",
        "source": str(cfg.model), "source_dir": str(source_dir), "config": asdict(cfg), "config_sha": config_sha(cfg),
        "command": _command(), "architecture": dict(tiny.config),
        "vae_params": {"source": source_vae_params, "tiny": count_params(tiny),
                       "tiny_decoder": count_params(tiny.decoder), "tiny_encoder": count_params(tiny.encoder)},
        **run_record(state, num_processes),
        "check": check,
    }
    with atomic_dir(out) as tmp:
        # MODEL's eval/ samples and manifest describe the old VAE's images: not carried over
        shutil.copytree(source_dir, tmp, dirs_exist_ok=True, ignore=shutil.ignore_patterns("eval", "manifest.json", "vae",
                                                                                           ".cache"))
        tiny.save_pretrained(tmp / "vae", safe_serialization=True)
        index = json.loads((tmp / "model_index.json").read_text())
        index["vae"] = ["diffusers", "AutoencoderTiny"]
        (tmp / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
        unet, te = stored_params(tmp, "unet") or 0, stored_params(tmp, "text_encoder") or 0
        params = {"unet": unet, "vae": count_params(tiny), "total": unet + te + count_params(tiny)}
        (tmp / "decoder_loss_log.json").write_text(json.dumps(state.log))
        plot_loss_log(state.log, tmp / "decoder_loss_curve.png", f"{out.name}: tiny VAE", keys=LOG_KEYS)
        (tmp / "decoder.json").write_text(json.dumps(record, indent=2) + "\n")
        src_info = json.loads((source_dir / "slimsd.json").read_text()) if (source_dir / "slimsd.json").is_file() else {}
        info = {**src_info, "defaults": defaults, "params": params, "vae": "AutoencoderTiny",
                "decoder": {"source": str(cfg.model), "config_sha": config_sha(cfg), "check": check}, "complete": True}
        (tmp / "slimsd.json").write_text(json.dumps(info, indent=2) + "\n")
        src_manifest = source_dir / "manifest.json"
        src_metrics = json.loads(src_manifest.read_text()).get("metrics") if src_manifest.is_file() else None
        plan = json.loads((tmp / "prune_plan.json").read_text()) if (tmp / "prune_plan.json").is_file() else None
        write_manifest(tmp, model=f"{out.name} (tiny VAE of {cfg.model})", source_model=str(cfg.model),
                       defaults=defaults, default_steps=defaults["steps"], default_guidance=defaults["guidance"],
                       params=params, decoder=record, metrics={},
                       source_metrics={"note": "measured on the source folder, with its AutoencoderKL; not re-measured "
                                               "with the tiny VAE", "metrics": src_metrics},
                       **({"prune_plan": plan} if plan else {}))
    return out
