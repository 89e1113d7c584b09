r"""Stage 1: CFG-aware retraining (paper §3.2) and stage 2: CFG-aware step distillation (§3.3).

    slimsd compress train --stage 1 --student runs/pruned --teacher tiny-sd   --out runs/stage1
    slimsd compress train --stage 2 --student runs/stage1 --teacher runs/stage1 --out runs/stage2

The loop follows diffusers' ``examples/text_to_image/train_text_to_image.py``: one
``Accelerator`` (so the same code runs as one CPU process and under ``accelerate launch`` on
many GPUs), ``accelerator.accumulate`` for gradient accumulation, logging and checkpoints only
when ``accelerator.sync_gradients``, ``accelerator.save_state`` / ``load_state`` for
``checkpoint-{step}`` folders, diffusers' ``EMAModel`` and ``get_scheduler``.

Losses (compress/losses.py, one function per equation; notation there):

    stage 1 (eq. 2):  L = l_Diff L_Diff + l_OutKD L_OutKD + [u < p] l_CfgKD L_CfgKD  (+ l_FeatKD L_FeatKD)
    stage 2 (eq. 3):  L = l_Diff L_Diff + l_StepReduc L_StepReduc

with w ~ U[2, 14] drawn once per batch for the CFG terms and ``u ~ U[0, 1]`` one coin per batch.
``l_FeatKD`` > 0 adds BK-SDM's feature KD (stage outputs of teacher and student): with
``l_CfgKD = 0`` that is the "BK-SDM-style" baseline (L_Diff + L_OutKD + L_FeatKD).

What is frozen: the teacher U-Net (unpruned in stage 1; the stage-1 student in stage 2), the
text encoder and the VAE. Only the student U-Net trains.

Data: scene renders (``--data scenes``) or a user dataset (slimsd.data.user) are encoded once by
the frozen VAE (posterior mean and std kept, a fresh posterior sample every step, as teacher.py
does) and the captions by the frozen text encoder; the result is cached on disk, keyed by the
VAE and text-encoder weights, so a CPU step costs U-Net passes only. Streamed datasets (too big
to cache) are encoded batch by batch instead.

Determinism: every micro-step draws its batch, noise, timesteps, caption dropout, guidance and
coin from its own generator seeded by ``(seed, process, step, micro-step)``. A run resumed from
``checkpoint-k`` therefore replays steps k+1... exactly as the uninterrupted run did (model,
optimizer, lr scheduler, EMA, step and loss log come back from the checkpoint).

Output ``OUT/``: a complete diffusers pipeline folder (student U-Net + the frozen components),
``slimsd.json`` (``defaults: {steps, guidance}``, read by serve/ and export/), ``loss_log.json``,
``loss_curve.png``, ``training.json``, ``eval/`` and ``manifest.json`` (sha256 of every file).
Checkpoints and tensorboard logs go to ``OUT.work/`` (``--work-dir``), never into the
exportable folder.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import platform
import shutil
import sys
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np
import torch

from slimsd.compress.losses import (
    cfg as apply_cfg, ddim_step, loss_cfg_kd, loss_diff, loss_feature_kd, loss_out_kd, loss_step_reduc,
    truncated_snr_weight, x_from_eps,
)

# ---------------------------------------------------------------------------------------
# configuration
# ---------------------------------------------------------------------------------------
MIXED_PRECISION = ("no", "fp16", "bf16")
SNR_WEIGHTING = ("none", "truncated")


@dataclass
class TrainConfig:
    stage: int = 1
    student: str = ""  # pipeline folder of the student (a pruned model; stage 2: the stage-1 output)
    teacher: str = "tiny-sd"  # stage 1: the unpruned model; stage 2: the stage-1 output
    out: str = ""
    work_dir: str | None = None  # checkpoints + tensorboard logs (default OUT.work)
    # data
    data: str = "scenes"  # "scenes" or any slimsd.data.user spec (folder, csv/jsonl, shards, HF dataset)
    num_latents: int = 20_000  # training images encoded once (0 with a streamed dataset: encode per batch)
    data_seed: int = 0
    resolution: int | None = None  # user data: image size (default: the VAE's sample_size)
    caption_dropout: float = 0.1  # share of empty captions: keeps the unconditional branch for CFG
    # optimisation (AdamW as the paper; lr 5e-5 is the paper's, for batch 512 on SD v2.1)
    max_steps: int = 1000
    batch_size: int = 64  # per process and micro-step
    gradient_accumulation_steps: int = 1
    learning_rate: float = 5e-5
    scale_lr: bool = False  # lr x accumulation x batch x processes, as diffusers' --scale_lr
    lr_scheduler: str = "constant"  # any diffusers.optimization.get_scheduler name
    lr_warmup_steps: int = 0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_weight_decay: float = 1e-2
    adam_epsilon: float = 1e-8
    max_grad_norm: float = 1.0
    gradient_checkpointing: bool = False  # recompute activations in backward: less memory, ~30% slower
    mixed_precision: str = "no"  # no | fp16 | bf16 (fp16 needs a GPU)
    use_ema: bool = False
    ema_decay: float = 0.999
    seed: int = 0
    threads: int = 0  # torch CPU threads (0: torch's default)
    # losses; None = the stage's default (STAGE_DEFAULTS)
    lambda_diff: float | None = None
    lambda_out_kd: float | None = None
    lambda_cfg_kd: float | None = None
    cfg_prob: float | None = None  # stage 1: P(add L_CfgKD); stage 2: P(CFG target, else w = 1)
    lambda_step_reduc: float | None = None
    lambda_feat_kd: float = 0.0  # BK-SDM feature KD on stage outputs (the baseline)
    guidance_min: float = 2.0
    guidance_max: float = 14.0
    snr_weighting: str = "none"  # none | truncated (SnapFusion's max(SNR, 1) on x-space losses)
    student_steps: int = 8  # stage 2: the student's DDIM step grid (teacher takes 2x)
    # checkpoints, logging, evaluation
    checkpointing_steps: int = 250
    checkpoints_total_limit: int = 2
    resume_from_checkpoint: str | None = None  # "latest" or a checkpoint folder
    logging_steps: int = 10
    report_to: str = "auto"  # auto (tensorboard if installed) | tensorboard | none
    eval_steps: int = 0  # evaluate every N steps (0: only at the end)
    eval_prompts: int = 32
    final_eval_prompts: int = 64  # 0: no final evaluation
    sample_steps: int | None = None  # default sampling steps written to slimsd.json (stage 1: 25; stage 2: student_steps)
    sample_guidance: float = 7.5


# The paper gives lambda_StepReduc = 1 (§3.3: "we set the coefficient to 1", SnapFusion used 0.2)
# and lr 5e-5 (§4). It gives no value for lambda_Diff, lambda_OutKD, lambda_CfgKD or the CFG
# probability: those below are ours (docs/training.md).
STAGE_DEFAULTS = {
    1: dict(lambda_diff=1.0, lambda_out_kd=1.0, lambda_cfg_kd=1.0, cfg_prob=0.5, lambda_step_reduc=0.0),
    2: dict(lambda_diff=1.0, lambda_out_kd=0.0, lambda_cfg_kd=0.0, cfg_prob=1.0, lambda_step_reduc=1.0),
}
# fields that must not change when a run is resumed from a checkpoint
_RESUME_KEYS = ("stage", "student", "teacher", "data", "batch_size", "gradient_accumulation_steps", "student_steps")


def resolve_config(cfg: TrainConfig) -> TrainConfig:
    """Validate ``cfg`` and fill in the stage's loss defaults (returns a copy)."""
    if cfg.stage not in (1, 2):
        raise ValueError(f"--stage must be 1 (CFG-aware retraining) or 2 (step distillation), got {cfg.stage!r}")
    if not cfg.student:
        raise ValueError("--student is required (a pruned pipeline folder; stage 2: the stage-1 output)")
    if not cfg.out:
        raise ValueError("--out is required")
    if cfg.mixed_precision not in MIXED_PRECISION:
        raise ValueError(f"--mixed-precision must be one of {MIXED_PRECISION}, got {cfg.mixed_precision!r}")
    if cfg.mixed_precision == "fp16" and not torch.cuda.is_available():
        raise ValueError("--mixed-precision fp16 needs a CUDA GPU; use bf16 or no on CPU")
    if cfg.snr_weighting not in SNR_WEIGHTING:
        raise ValueError(f"--snr-weighting must be one of {SNR_WEIGHTING}, got {cfg.snr_weighting!r}")
    for k in ("max_steps", "batch_size", "gradient_accumulation_steps", "student_steps"):
        if getattr(cfg, k) < 1:
            raise ValueError(f"--{k.replace('_', '-')} must be >= 1, got {getattr(cfg, k)}")
    if not cfg.guidance_min <= cfg.guidance_max:
        raise ValueError("--guidance-min must be <= --guidance-max")
    d = asdict(cfg)
    for k, v in STAGE_DEFAULTS[cfg.stage].items():
        if d[k] is None:
            d[k] = v
    if not 0.0 <= d["cfg_prob"] <= 1.0:
        raise ValueError(f"--cfg-prob must be in [0, 1], got {d['cfg_prob']}")
    if d["sample_steps"] is None:
        d["sample_steps"] = 25 if cfg.stage == 1 else cfg.student_steps
    if d["work_dir"] is None:
        out = Path(cfg.out)
        d["work_dir"] = str(out.with_name(out.name + ".work"))
    return TrainConfig(**d)


def config_sha(cfg: TrainConfig, exclude=("resume_from_checkpoint", "threads", "report_to")) -> str:
    d = {k: v for k, v in asdict(cfg).items() if k not in exclude}
    return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


# ---------------------------------------------------------------------------------------
# data: VAE latents + caption embeddings, cached once
# ---------------------------------------------------------------------------------------
def _weights_key(*modules) -> str:
    """Cheap fingerprint of frozen weights: shapes + a strided sample of every tensor."""
    h = hashlib.sha256()
    for m in modules:
        for name, t in m.state_dict().items():
            flat = t.detach().flatten().float().cpu()
            h.update(name.encode())
            h.update(str(tuple(t.shape)).encode())
            h.update(flat[:: max(1, flat.numel() // 64)].numpy().tobytes())
    return h.hexdigest()[:16]


@torch.no_grad()
def encode_captions(text_encoder, tokenizer, captions: list[str], device, batch: int = 256) -> torch.Tensor:
    """(N,) captions -> (N, 77, D) last hidden states of the frozen text encoder."""
    out = []
    for i in range(0, len(captions), batch):
        ids = tokenizer(captions[i : i + batch], padding="max_length", max_length=tokenizer.model_max_length,
                        truncation=True, return_tensors="pt").input_ids.to(device)
        out.append(text_encoder(ids)[0].float().cpu())
    return torch.cat(out)


@torch.no_grad()
def build_latent_cache(vae, text_encoder, tokenizer, data: str, num: int, seed: int, resolution: int,
                       device="cpu", batch: int = 64, cache_root: Path | None = None) -> dict:
    """Encode ``num`` training images and their captions once; cached under ``$SLIMSD_CACHE/latents``.

    Returns ``mean, std`` (N, 4, h, w) posterior moments, ``cap_index`` (N,) into ``table``
    (n_captions + 1, 77, D) whose last row is the empty caption, and ``scaling``.
    """
    from tqdm.auto import tqdm

    from slimsd.data.user import open_dataset
    from slimsd.models import cache_dir

    # everything that changes what is stored: the data (and a local copy's mtime), how many,
    # the seed, the resolution, the frozen VAE and text encoder, and the tokenizer
    local = Path(data)
    data_stamp = local.stat().st_mtime_ns if local.exists() else None
    tok = hashlib.sha256(json.dumps([tokenizer.model_max_length, sorted(tokenizer.get_vocab().items())]).encode())
    key = hashlib.sha256(json.dumps([data, data_stamp, num, seed, resolution, _weights_key(vae, text_encoder),
                                     tok.hexdigest()[:16]]).encode()).hexdigest()[:20]
    root = Path(cache_root) if cache_root else cache_dir() / "latents"
    path = root / f"{key}.pt"
    if path.is_file():
        return torch.load(path, map_location="cpu", weights_only=True)
    if data == "scenes" or data.startswith("scenes:"):
        from slimsd.data.scenes import SceneDataset

        split = data.partition(":")[2] or "train"
        ds = SceneDataset(split, seed=seed, length=num, size=resolution)
        get = lambda i: (ds[i].image, ds[i].caption)  # noqa: E731
        n = num
    else:
        ds = open_dataset(data, resolution=resolution, seed=seed)
        if ds.streaming:
            raise ValueError(f"{data} is streamed: it cannot be cached; use --num-latents 0 to encode per batch")
        n = min(num, len(ds))
        get = ds.__getitem__
    from slimsd.data.scenes import to_tensor

    means, stds, caps = [], [], []
    for i in tqdm(range(0, n, batch), desc="encode latents", dynamic_ncols=True):
        pairs = [get(j) for j in range(i, min(i + batch, n))]
        x = to_tensor([p[0] for p in pairs]).to(device, dtype=vae.dtype)
        dist = vae.encode(x).latent_dist
        means.append(dist.mean.float().cpu())
        stds.append(dist.std.float().cpu())
        caps += [p[1] for p in pairs]
    unique = sorted(set(caps))
    index = {c: i for i, c in enumerate(unique)}
    table = encode_captions(text_encoder, tokenizer, unique + [""], device)
    cache = {
        "mean": torch.cat(means), "std": torch.cat(stds), "cap_index": torch.tensor([index[c] for c in caps]),
        "table": table, "empty_id": len(unique), "scaling": float(vae.config.scaling_factor),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    torch.save(cache, tmp)
    tmp.replace(path)  # atomic: concurrent processes / a kill never leave half a cache
    return cache


class CachedBatches:
    """Micro-batches from the latent cache: z_0 sampled from the posterior, captions embedded."""

    def __init__(self, cache: dict, caption_dropout: float, device):
        self.c = cache
        self.p_drop = caption_dropout
        self.device = device
        self.uncond = cache["table"][cache["empty_id"]]  # (77, D)

    def __call__(self, batch: int, g: torch.Generator):
        mean, std = self.c["mean"], self.c["std"]
        idx = torch.randint(len(mean), (batch,), generator=g)
        z0 = (mean[idx] + std[idx] * torch.randn(mean[idx].shape, generator=g)) * self.c["scaling"]  # (B, 4, h, w)
        cap = self.c["cap_index"][idx].clone()
        cap[torch.rand(batch, generator=g) < self.p_drop] = self.c["empty_id"]  # caption dropout for CFG
        c = self.c["table"][cap]  # (B, 77, D)
        return z0.to(self.device), c.to(self.device), self.uncond.to(self.device)


class StreamedBatches:
    """Micro-batches encoded on the fly from a streamed dataset (webdataset / streamed HF).

    On resume the stream is fast-forwarded over the samples already used (``skip``)."""

    def __init__(self, data, resolution, seed, vae, text_encoder, tokenizer, caption_dropout, device, skip: int = 0):
        from slimsd.data.user import open_dataset

        self.ds = open_dataset(data, resolution=resolution, seed=seed, shuffle_buffer=1000)
        self.vae, self.te, self.tok = vae, text_encoder, tokenizer
        self.p_drop, self.device = caption_dropout, device
        self.it = self._forever()
        for _ in range(skip):
            next(self.it)
        self.uncond = encode_captions(text_encoder, tokenizer, [""], device)[0]

    def _forever(self):
        while True:
            n = 0
            for pair in self.ds:
                n += 1
                yield pair
            if n == 0:
                raise ValueError(f"dataset {self.ds.name} yielded no samples")

    @torch.no_grad()
    def __call__(self, batch: int, g: torch.Generator):
        from slimsd.data.scenes import to_tensor

        pairs = [next(self.it) for _ in range(batch)]
        x = to_tensor([p[0] for p in pairs]).to(self.device, dtype=self.vae.dtype)
        dist = self.vae.encode(x).latent_dist
        noise = torch.randn(dist.mean.shape, generator=g).to(self.device, dist.mean.dtype)
        z0 = (dist.mean + dist.std * noise).float() * self.vae.config.scaling_factor
        caps = [("" if float(torch.rand((), generator=g)) < self.p_drop else p[1]) for p in pairs]
        return z0, encode_captions(self.te, self.tok, caps, self.device).to(self.device), self.uncond.to(self.device)


def micro_generator(seed: int, rank: int, step: int, micro: int) -> torch.Generator:
    """The generator of one micro-step: a function of its position only (exact resume)."""
    s = np.random.SeedSequence([seed, rank, step, micro]).generate_state(2, dtype=np.uint32)
    return torch.Generator().manual_seed(int(s[0]) << 32 | int(s[1]))


# ---------------------------------------------------------------------------------------
# timesteps
# ---------------------------------------------------------------------------------------
def student_grid(scheduler, n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Stage 2's timesteps: the student's DDIM grid t (N,), the teacher's midpoints t' and
    the student's next timesteps t'' = t - T/N (as DDIMScheduler.step computes them; < 0
    means the final alpha). Sampling the student with N DDIM steps visits exactly these t."""
    from diffusers import DDIMScheduler

    s = DDIMScheduler.from_config(scheduler.config)
    s.set_timesteps(n)
    T = s.config.num_train_timesteps
    t = s.timesteps.long()
    return t, t - T // (2 * n), t - T // n


def abar_at(scheduler, t: torch.Tensor) -> torch.Tensor:
    """abar_t for integer timesteps (B,); t < 0 -> the scheduler's final_alpha_cumprod."""
    ac = scheduler.alphas_cumprod.to(t.device)
    final = torch.as_tensor(float(getattr(scheduler, "final_alpha_cumprod", ac[0])), device=t.device)
    return torch.where(t >= 0, ac[t.clamp(min=0)], final)


# ---------------------------------------------------------------------------------------
# BK-SDM feature KD: outputs of every down / mid / up stage
# ---------------------------------------------------------------------------------------
class StageFeatures:
    """Forward hooks that collect the output of each down / mid / up stage of a U-Net."""

    def __init__(self, unet):
        self.feats: dict[str, torch.Tensor] = {}
        self.handles = []
        stages = [(f"down.{i}", b) for i, b in enumerate(unet.down_blocks)]
        stages += [("mid", unet.mid_block)] if unet.mid_block is not None else []
        stages += [(f"up.{i}", b) for i, b in enumerate(unet.up_blocks)]
        for name, mod in stages:
            self.handles.append(mod.register_forward_hook(self._hook(name)))

    def _hook(self, name):
        def hook(_mod, _inp, out):
            self.feats[name] = out[0] if isinstance(out, tuple) else out

        return hook

    def pop(self) -> dict:
        f, self.feats = self.feats, {}
        return f


def matched_features(ft: dict, fs: dict) -> tuple[list, list]:
    """Stage outputs present in both with equal shapes (a removed resolution level drops its pair)."""
    keys = [k for k in ft if k in fs and ft[k].shape == fs[k].shape]
    return [ft[k] for k in keys], [fs[k] for k in keys]


# ---------------------------------------------------------------------------------------
# one micro-step of each stage
# ---------------------------------------------------------------------------------------
def _eps(unet, z, t, c):
    return unet(z, t, c).sample


def _eps_cfg_pair(unet, z_t, t, c, uncond):
    """One batched pass over [cond; uncond]: returns (eps_cond, eps_uncond), each (B, 4, h, w)."""
    B = z_t.shape[0]
    out = _eps(unet, torch.cat([z_t, z_t]), torch.cat([t, t]), torch.cat([c, uncond.expand(B, *uncond.shape)]))
    return out[:B], out[B:]


def stage1_losses(student, teacher, sched, z0, c, uncond, g: torch.Generator, cfg: TrainConfig, feats=None) -> dict:
    """Eq. 2 + eq. 1: L = l_Diff L_Diff + l_OutKD L_OutKD + [u < p] l_CfgKD L_CfgKD (+ l_FeatKD L_FeatKD)."""
    dev, B = z0.device, z0.shape[0]
    eps = torch.randn(z0.shape, generator=g).to(dev)  # (B, 4, h, w)
    t = torch.randint(0, sched.config.num_train_timesteps, (B,), generator=g).to(dev)  # (B,)
    use_cfg = float(torch.rand((), generator=g)) < cfg.cfg_prob and cfg.lambda_cfg_kd > 0
    w = cfg.guidance_min + (cfg.guidance_max - cfg.guidance_min) * float(torch.rand((), generator=g))  # one w per batch
    z_t = sched.add_noise(z0, eps, t)  # alpha_t z_0 + sigma_t eps
    abar_t = abar_at(sched, t)  # (B,)
    weight = truncated_snr_weight(abar_t).to(dev) if cfg.snr_weighting == "truncated" else None
    need_teacher = cfg.lambda_out_kd > 0 or use_cfg or cfg.lambda_feat_kd > 0
    tdt = next(teacher.parameters()).dtype
    if use_cfg:
        eps_s, eps_s_u = _eps_cfg_pair(student, z_t, t, c, uncond)  # student: with grad
        if feats:
            fs = feats[1].pop()
        with torch.no_grad():
            eps_t, eps_t_u = _eps_cfg_pair(teacher, z_t.to(tdt), t, c.to(tdt), uncond.to(tdt))
    else:
        eps_s = _eps(student, z_t, t, c)
        if feats:
            fs = feats[1].pop()
        if need_teacher:
            with torch.no_grad():
                eps_t = _eps(teacher, z_t.to(tdt), t, c.to(tdt))
    out = {"l_diff": loss_diff(eps_s, eps)}  # L_Diff: eps-prediction MSE on the data
    loss = cfg.lambda_diff * out["l_diff"]
    if cfg.lambda_out_kd > 0:
        out["l_out_kd"] = loss_out_kd(eps_t, eps_s)  # eq. 2
        loss = loss + cfg.lambda_out_kd * out["l_out_kd"]
    if use_cfg:
        out["l_cfg_kd"] = loss_cfg_kd(z_t, abar_t, w, eps_t_u, eps_t, eps_s_u, eps_s, weight)  # eq. 1
        loss = loss + cfg.lambda_cfg_kd * out["l_cfg_kd"]
        out["w"] = torch.tensor(w)
    if feats and cfg.lambda_feat_kd > 0:
        ft_list, fs_list = matched_features(feats[0].pop(), fs)
        out["l_feat_kd"] = loss_feature_kd(ft_list, fs_list)
        loss = loss + cfg.lambda_feat_kd * out["l_feat_kd"]
    out["loss"] = loss
    return out


def stage2_losses(student, teacher, sched, z0, c, uncond, g: torch.Generator, cfg: TrainConfig, grid) -> dict:
    """Eq. 3: L = l_Diff L_Diff + l_StepReduc || x(S, z_t, t, c) - x*(z_t, z_t'') ||^2 with t on
    the student's grid, z_t'' the teacher's latent after two CFG DDIM steps t -> t' -> t''."""
    dev, B = z0.device, z0.shape[0]
    t_grid, tp_grid, tpp_grid = grid
    eps = torch.randn(z0.shape, generator=g).to(dev)  # (B, 4, h, w)
    k = torch.randint(0, len(t_grid), (B,), generator=g)  # (B,) index on the student's grid
    t, tp, tpp = t_grid[k].to(dev), tp_grid[k].to(dev), tpp_grid[k].to(dev)
    use_cfg = float(torch.rand((), generator=g)) < cfg.cfg_prob
    w = cfg.guidance_min + (cfg.guidance_max - cfg.guidance_min) * float(torch.rand((), generator=g))
    w = w if use_cfg else 1.0  # w = 1: CFG(eps) = eps_cond (plain step distillation)
    z_t = sched.add_noise(z0, eps, t)
    abar_t, abar_tp, abar_tpp = abar_at(sched, t), abar_at(sched, tp), abar_at(sched, tpp)  # (B,) each
    weight = truncated_snr_weight(abar_t).to(dev) if cfg.snr_weighting == "truncated" else None
    tdt = next(teacher.parameters()).dtype

    def cfg_eps(unet, z, tt, grad):
        with torch.set_grad_enabled(grad):
            if not use_cfg:
                e = _eps(unet, z, tt, c if grad else c.to(tdt))
                return e, e
            e_c, e_u = _eps_cfg_pair(unet, z, tt, c if grad else c.to(tdt), uncond if grad else uncond.to(tdt))
            return apply_cfg(e_u, e_c, w), e_c  # (CFG eps, conditional eps)

    with torch.no_grad():  # teacher: two CFG DDIM steps t -> t' -> t''
        e1, _ = cfg_eps(teacher, z_t.to(tdt), t, False)
        z_tp = ddim_step(z_t, e1.float(), abar_t, abar_tp)
        e2, _ = cfg_eps(teacher, z_tp.to(tdt), tp.clamp(min=0), False)
        z_tpp = ddim_step(z_tp, e2.float(), abar_tp, abar_tpp)
    eps_s_cfg, eps_s = cfg_eps(student, z_t, t, True)  # student: one step
    x_s = x_from_eps(z_t, eps_s_cfg, abar_t)  # x(S, z_t, t, c) under CFG
    out = {"l_step_reduc": loss_step_reduc(x_s, z_t, z_tpp, abar_t, abar_tpp, weight)}
    loss = cfg.lambda_step_reduc * out["l_step_reduc"]
    if cfg.lambda_diff > 0:
        out["l_diff"] = loss_diff(eps_s, eps)
        loss = loss + cfg.lambda_diff * out["l_diff"]
    if use_cfg:
        out["w"] = torch.tensor(w)
    out["loss"] = loss
    return out


# ---------------------------------------------------------------------------------------
# checkpoints
# ---------------------------------------------------------------------------------------
LOG_KEYS = ("loss", "l_diff", "l_out_kd", "l_cfg_kd", "l_step_reduc", "l_feat_kd", "w")


class TrainState:
    """Checkpointed with the model/optimizer (accelerator.register_for_checkpointing)."""

    def __init__(self, config: dict):
        self.step, self.log, self.evals, self.train_s, self.config = 0, [], [], 0.0, config
        self.compute_s = 0.0  # seconds spent in optimisation steps (no evaluation / checkpoint time), all runs
        self.window = torch.zeros(2, len(LOG_KEYS), dtype=torch.float64)  # (sum, count) per key since the last log row

    def state_dict(self) -> dict:
        return {"step": self.step, "log": self.log, "evals": self.evals, "train_s": self.train_s, "config": self.config,
                "window": self.window.clone(), "compute_s": self.compute_s}

    def load_state_dict(self, d: dict) -> None:
        changed = {k: (d["config"].get(k), self.config.get(k)) for k in _RESUME_KEYS if d["config"].get(k) != self.config.get(k)}
        if changed:
            raise ValueError(f"cannot resume: the checkpoint was made with other settings {changed} "
                             "(use a new --out / --work-dir, or the checkpoint's settings)")
        self.step, self.log, self.evals, self.train_s = d["step"], d["log"], d["evals"], d["train_s"]
        self.window = d["window"].clone()
        self.compute_s = d.get("compute_s", 0.0)


def list_checkpoints(work: Path) -> list[Path]:
    """Complete ``checkpoint-{step}`` folders, oldest first (half-written ``.tmp`` ones are ignored)."""
    if not work.is_dir():
        return []
    found = [p for p in work.iterdir() if p.is_dir() and p.name.startswith("checkpoint-") and p.name[11:].isdigit()]
    return sorted(found, key=lambda p: int(p.name[11:]))


def find_checkpoint(spec: str | None, work: Path) -> Path | None:
    if not spec:
        return None
    if spec == "latest":
        found = list_checkpoints(work)
        return found[-1] if found else None
    p = Path(spec)
    if not p.is_dir():
        p = work / spec
    if not p.is_dir():
        raise FileNotFoundError(f"--resume-from-checkpoint {spec}: no such checkpoint folder (looked in {work})")
    return p


def save_checkpoint(accelerator, work: Path, step: int, keep: int) -> Path:
    """``accelerator.save_state`` into ``.checkpoint-{step}.tmp``, then an atomic rename to
    ``checkpoint-{step}``: a kill at any moment never leaves a half checkpoint under that name."""
    final, tmp = work / f"checkpoint-{step}", work / f".checkpoint-{step}.tmp"
    if accelerator.is_main_process and tmp.exists():
        shutil.rmtree(tmp)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        (tmp / "step.json").write_text(json.dumps({"step": step}))
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)
        if keep > 0:
            for old in list_checkpoints(work)[:-keep]:
                shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


# ---------------------------------------------------------------------------------------
# evaluation, plots, output folder
# ---------------------------------------------------------------------------------------
def evaluate_unet(unet, parts: dict, steps: int, guidance: float, num_prompts: int, out: Path | None, seed: int = 0) -> dict:
    """FD / alignment of an in-memory U-Net with the frozen components (slimsd.evaluator)."""
    from slimsd.evaluator import diffusers_generate_fn, evaluate
    from slimsd.models import make_pipeline

    pipe = make_pipeline(unet, parts["vae"], parts["text_encoder"], parts["tokenizer"], parts["scheduler"])
    pipe.set_progress_bar_config(disable=True)
    was_training = unet.training
    unet.eval()
    try:
        r = evaluate("student", steps=steps, guidance=guidance, num_prompts=num_prompts, seed=seed, out=out,
                     generate_fn=diffusers_generate_fn(pipe, steps, guidance))
    finally:
        unet.train(was_training)
    return {k: r[k] for k in ("fd", "alignment", "wall_time_s")} | {"steps": steps, "guidance": guidance, "num_prompts": num_prompts}


def plot_loss_log(log: list, path: Path, title: str = "") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [k for k in ("loss", "l_diff", "l_out_kd", "l_cfg_kd", "l_step_reduc", "l_feat_kd") if any(k in r for r in log)]
    fig, ax = plt.subplots(figsize=(7, 3.8))
    for k in keys:
        pts = [(r["step"], r[k]) for r in log if k in r and r[k] > 0]
        if pts:
            ax.plot(*zip(*pts), label=k, lw=1.2 if k == "loss" else 0.9)
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_title(title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _command() -> str:
    argv = sys.argv[1:]
    return "slimsd " + " ".join(argv) if argv[:2] in (["compress", "train"], ["compress", "build"]) else " ".join(sys.argv)


def check_frozen_components(student_pipe, teacher_pipe) -> None:
    """Teacher and student must share the VAE (one latent space) and the text encoder."""
    for comp in ("vae", "text_encoder"):
        a, b = getattr(student_pipe, comp).state_dict(), getattr(teacher_pipe, comp).state_dict()
        same = a.keys() == b.keys() and all(a[k].shape == b[k].shape and torch.equal(a[k], b[k]) for k in a)
        if not same:
            raise ValueError(f"student and teacher have different {comp} weights: distillation needs one latent "
                             "space and one text encoder; prune the student from the teacher")


# ---------------------------------------------------------------------------------------
# the training loop
# ---------------------------------------------------------------------------------------
def train(cfg: TrainConfig, callback=None) -> Path:
    """Run stage ``cfg.stage``; returns the output pipeline folder.

    ``callback(step, accelerator)`` is called after every optimisation step (tests use it to
    interrupt a run)."""
    threads = torch.get_num_threads()
    try:
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        return _train(cfg, callback)
    finally:
        torch.set_num_threads(threads)


def _train(cfg: TrainConfig, callback=None) -> Path:
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration, set_seed
    from tqdm.auto import tqdm

    from slimsd.models import load_pipeline, resolve_model

    cfg = resolve_config(cfg)
    student_dir, teacher_dir = resolve_model(cfg.student), resolve_model(cfg.teacher)
    out, work = Path(cfg.out), Path(cfg.work_dir)
    work.mkdir(parents=True, exist_ok=True)

    report_to = cfg.report_to
    if report_to == "auto":
        from accelerate.utils import is_tensorboard_available

        report_to = "tensorboard" if is_tensorboard_available() else "none"
    accelerator = Accelerator(
        gradient_accumulation_steps=cfg.gradient_accumulation_steps,
        mixed_precision=cfg.mixed_precision,
        log_with=None if report_to == "none" else report_to,
        project_config=ProjectConfiguration(project_dir=str(work), logging_dir=str(work / "logs"),
                                            automatic_checkpoint_naming=False),
    )
    set_seed(cfg.seed)
    main = accelerator.is_main_process
    dev = accelerator.device
    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision, torch.float32)

    # --- models: student trains; teacher, text encoder and VAE are frozen -------------------
    pipe, teacher_pipe = load_pipeline(student_dir), load_pipeline(teacher_dir)
    check_frozen_components(pipe, teacher_pipe)
    unet, vae, text_encoder, tokenizer, sched = pipe.unet, pipe.vae, pipe.text_encoder, pipe.tokenizer, pipe.scheduler
    teacher = teacher_pipe.unet
    del teacher_pipe
    teacher.requires_grad_(False).eval().to(dev, dtype=weight_dtype)
    for m in (vae, text_encoder):  # small next to the U-Nets and used outside the loop: kept in fp32
        m.requires_grad_(False).eval().to(dev)
    unet.train()
    if cfg.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    student_params = sum(p.numel() for p in unet.parameters())
    teacher_params = sum(p.numel() for p in teacher.parameters())
    feats = (StageFeatures(teacher), StageFeatures(unet)) if cfg.stage == 1 and cfg.lambda_feat_kd > 0 else None

    ema = None
    if cfg.use_ema:
        from diffusers.training_utils import EMAModel

        ema = EMAModel(unet.parameters(), decay=cfg.ema_decay)

    lr = cfg.learning_rate
    if cfg.scale_lr:
        lr *= cfg.gradient_accumulation_steps * cfg.batch_size * accelerator.num_processes
    optimizer = torch.optim.AdamW(unet.parameters(), lr=lr, betas=(cfg.adam_beta1, cfg.adam_beta2),
                                  weight_decay=cfg.adam_weight_decay, eps=cfg.adam_epsilon)
    lr_scheduler = make_lr_scheduler(optimizer, cfg.lr_scheduler, cfg.lr_warmup_steps, cfg.max_steps,
                                     accelerator.num_processes)
    unet, optimizer, lr_scheduler = accelerator.prepare(unet, optimizer, lr_scheduler)
    if ema is not None:
        ema.to(dev)

    state = TrainState({k: v for k, v in asdict(cfg).items()})
    accelerator.register_for_checkpointing(state)
    if ema is not None:
        accelerator.register_for_checkpointing(ema)

    # --- resume -------------------------------------------------------------------------------
    ckpt = find_checkpoint(cfg.resume_from_checkpoint, work)
    if cfg.resume_from_checkpoint and ckpt is None and main:
        print(f"no checkpoint in {work}: starting a new run", file=sys.stderr)
    if ckpt is not None:
        accelerator.load_state(str(ckpt))
        if main:
            print(f"resumed from {ckpt} at step {state.step}", file=sys.stderr)

    # --- data -----------------------------------------------------------------------------------
    resolution = cfg.resolution or int(vae.config.sample_size)
    if cfg.num_latents > 0:
        with accelerator.main_process_first():  # one process encodes, the others read the cache
            cache = build_latent_cache(vae, text_encoder, tokenizer, cfg.data, cfg.num_latents, cfg.data_seed,
                                       resolution, device=dev)
        batches = CachedBatches(cache, cfg.caption_dropout, dev)
    else:
        used = state.step * cfg.gradient_accumulation_steps * cfg.batch_size
        batches = StreamedBatches(cfg.data, resolution, cfg.data_seed + accelerator.process_index, vae, text_encoder,
                                  tokenizer, cfg.caption_dropout, dev, skip=used)
    uncond = batches.uncond.to(dev)
    grid = student_grid(sched, cfg.student_steps) if cfg.stage == 2 else None
    parts = dict(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, scheduler=sched)

    if report_to != "none":
        accelerator.init_trackers("slimsd-train", config={k: v for k, v in asdict(cfg).items() if isinstance(v, (int, float, str, bool))})

    def run_eval(tag: str, num_prompts: int, folder: Path | None):
        u = accelerator.unwrap_model(unet)
        if ema is not None:
            ema.store(u.parameters())
            ema.copy_to(u.parameters())
        try:
            return evaluate_unet(u, parts, cfg.sample_steps, cfg.sample_guidance, num_prompts, folder)
        finally:
            if ema is not None:
                ema.restore(u.parameters())

    # --- loop -----------------------------------------------------------------------------------
    bar = tqdm(total=cfg.max_steps, initial=state.step, desc=f"stage {cfg.stage}", dynamic_ncols=True, disable=not main)
    t_start = time.time() - state.train_s
    while state.step < cfg.max_steps:
        t0 = time.time()
        for micro in range(cfg.gradient_accumulation_steps):
            g = micro_generator(cfg.seed, accelerator.process_index, state.step, micro)
            z0, c, _ = batches(cfg.batch_size, g)
            with accelerator.accumulate(unet):
                if cfg.stage == 1:
                    losses = stage1_losses(unet, teacher, sched, z0, c, uncond, g, cfg, feats)
                else:
                    losses = stage2_losses(unet, teacher, sched, z0, c, uncond, g, cfg, grid)
                accelerator.backward(losses["loss"])
                if accelerator.sync_gradients and cfg.max_grad_norm > 0:
                    accelerator.clip_grad_norm_(unet.parameters(), cfg.max_grad_norm)
                optimizer.step()
                lr_scheduler.step()
                optimizer.zero_grad(set_to_none=True)
            for k, v in losses.items():  # local (sum, count); reduced over processes when a row is logged
                state.window[0, LOG_KEYS.index(k)] += float(v.detach())
                state.window[1, LOG_KEYS.index(k)] += 1
        if not accelerator.sync_gradients:  # cannot happen: every step ends on an accumulation boundary
            continue
        if ema is not None:
            ema.step(accelerator.unwrap_model(unet).parameters())
        state.step += 1
        state.compute_s += time.time() - t0
        bar.update(1)
        if state.step % cfg.logging_steps == 0 or state.step == cfg.max_steps:
            tot = accelerator.reduce(state.window.to(dev), reduction="sum").cpu()  # (2, K): same shape on every process
            row = {"step": state.step, "lr": lr_scheduler.get_last_lr()[0]}
            row.update({k: float(tot[0, i] / tot[1, i]) for i, k in enumerate(LOG_KEYS) if tot[1, i] > 0})
            state.window.zero_()
            state.log.append(row)
            accelerator.log({k: v for k, v in row.items() if k != "step"}, step=state.step)
            bar.set_postfix(loss=f"{row['loss']:.4f}")
        if cfg.eval_steps and state.step % cfg.eval_steps == 0 and state.step < cfg.max_steps:
            if main:
                r = run_eval("periodic", cfg.eval_prompts, None)
                state.evals.append({"step": state.step, **r})
                accelerator.log({"eval/fd": r["fd"], "eval/alignment": r["alignment"]}, step=state.step)
                bar.write(f"step {state.step}: FD {r['fd']:.2f} alignment {r['alignment']:.3f} "
                          f"({r['num_prompts']} prompts, {r['steps']} steps)")
            accelerator.wait_for_everyone()
        state.train_s = time.time() - t_start
        if cfg.checkpointing_steps and state.step % cfg.checkpointing_steps == 0:
            save_checkpoint(accelerator, work, state.step, cfg.checkpoints_total_limit)
        if callback is not None:
            callback(state.step, accelerator)
    bar.close()
    accelerator.wait_for_everyone()
    state.train_s = time.time() - t_start

    # --- output: a complete pipeline folder ---------------------------------------------------
    if main:
        final = accelerator.unwrap_model(unet)
        if ema is not None:
            ema.copy_to(final.parameters())
        write_output(final, parts, cfg, state, student_dir, teacher_dir, student_params, teacher_params,
                     accelerator.num_processes)
    accelerator.wait_for_everyone()
    accelerator.end_training()
    for h in (feats or ()):
        for handle in h.handles:
            handle.remove()
    return out


def write_output(unet, parts, cfg: TrainConfig, state: TrainState, student_dir: Path, teacher_dir: Path,
                 student_params: int, teacher_params: int, num_processes: int) -> Path:
    """Pipeline folder written to ``OUT.tmp`` and renamed: OUT is complete or absent."""
    from slimsd.manifest import write_manifest
    from slimsd.models import make_pipeline

    out = Path(cfg.out)
    tmp = out.with_name(out.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    unet = unet.to("cpu", dtype=torch.float32).eval()
    vae, te = parts["vae"].to("cpu", dtype=torch.float32), parts["text_encoder"].to("cpu", dtype=torch.float32)
    pipe = make_pipeline(unet, vae, te, parts["tokenizer"], parts["scheduler"])
    pipe.save_pretrained(tmp, safe_serialization=True)
    plan = None
    if (student_dir / "prune_plan.json").is_file():
        shutil.copy2(student_dir / "prune_plan.json", tmp / "prune_plan.json")
        plan = json.loads((tmp / "prune_plan.json").read_text())
    (tmp / "loss_log.json").write_text(json.dumps(state.log))
    stage_name = {1: "CFG-aware retraining (stage 1)", 2: f"CFG-aware step distillation to {cfg.student_steps} steps (stage 2)"}[cfg.stage]
    plot_loss_log(state.log, tmp / "loss_curve.png", f"{Path(cfg.out).name}: {stage_name}")
    metrics = {}
    if cfg.final_eval_prompts > 0:
        tag = f"steps{cfg.sample_steps}_cfg{cfg.sample_guidance:g}"
        metrics[tag] = evaluate_unet(unet, parts, cfg.sample_steps, cfg.sample_guidance, cfg.final_eval_prompts, tmp / "eval" / tag)
    defaults = {"steps": cfg.sample_steps, "guidance": cfg.sample_guidance}
    unet_params = sum(p.numel() for p in unet.parameters())
    total_params = unet_params + sum(p.numel() for p in vae.parameters()) + sum(p.numel() for p in te.parameters())
    training = {
        "stage": cfg.stage, "what": stage_name,
        "config": asdict(cfg), "config_sha": config_sha(cfg), "command": _command(),
        "student": str(cfg.student), "teacher": str(cfg.teacher),
        "student_params_before": student_params, "teacher_unet_params": teacher_params,
        "wall_time_s": round(state.train_s, 1),
        "s_per_step": round(state.compute_s / state.step, 3) if state.step else None,  # over all (resumed) runs
        "machine": {"cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
                    "processes": num_processes, "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None},
        "torch": torch.__version__,
        "final_loss": state.log[-1] if state.log else None,
        "periodic_evals": state.evals,
    }
    (tmp / "training.json").write_text(json.dumps(training, indent=2))
    info = {"defaults": defaults, "stage": cfg.stage, "student_steps": cfg.student_steps if cfg.stage == 2 else None,
            "scheduler": type(parts["scheduler"]).__name__, "params": {"unet": unet_params, "total": total_params},
            "config_sha": config_sha(cfg), "complete": True}
    (tmp / "slimsd.json").write_text(json.dumps(info, indent=2) + "\n")
    write_manifest(tmp, model=f"{out.name} ({stage_name})", training=training, metrics=metrics, defaults=defaults,
                   default_steps=defaults["steps"], default_guidance=defaults["guidance"],
                   params={"unet": unet_params, "total": total_params}, **({"prune_plan": plan} if plan else {}))
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    return out


def make_lr_scheduler(optimizer, name: str, warmup_steps: int, max_steps: int, num_processes: int = 1):
    """diffusers' ``get_scheduler``, except that ``constant`` with warmup steps warms up.

    (``get_scheduler("constant", num_warmup_steps=N)`` silently ignores N, a trap diffusers'
    own training scripts fall into with their ``--lr_warmup_steps 500`` default.) Steps are
    counted per process, as accelerate steps the scheduler once per process.
    """
    from diffusers.optimization import get_scheduler

    if name == "constant" and warmup_steps > 0:
        name = "constant_with_warmup"
    try:
        return get_scheduler(name, optimizer=optimizer, num_warmup_steps=warmup_steps * num_processes,
                             num_training_steps=max_steps * num_processes)
    except ValueError as e:
        raise ValueError(f"lr_scheduler: {e}") from e


def read_slimsd_json(folder: str | Path) -> dict | None:
    p = Path(folder) / "slimsd.json"
    return json.loads(p.read_text()) if p.is_file() else None


def config_from_dict(d: dict) -> TrainConfig:
    """TrainConfig from a dict with ``snake_case`` or ``kebab-case`` keys; unknown keys are an error."""
    names = {f.name for f in fields(TrainConfig)}
    norm = {k.replace("-", "_"): v for k, v in d.items()}
    unknown = sorted(set(norm) - names)
    if unknown:
        raise ValueError(f"unknown training option(s) {unknown}; see `slimsd compress train --help`")
    return TrainConfig(**norm)
