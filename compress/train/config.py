"""The settings of one training run: :class:`TrainConfig`, its stage defaults and checks.

Every field is one ``slimsd compress train`` flag (``max_steps`` -> ``--max-steps``, help from
the field's ``metadata["help"]``, choices from ``Literal``; slimsd.cliargs) and one key of a build
config's ``stage1`` / ``stage2`` section.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Literal, get_args

import torch

from slimsd.cliargs import option

MixedPrecision = Literal["no", "fp16", "bf16"]
SnrWeighting = Literal["none", "truncated"]
ReportTo = Literal["auto", "tensorboard", "none"]
MIXED_PRECISION = get_args(MixedPrecision)
SNR_WEIGHTING = get_args(SnrWeighting)


@dataclass
class TrainConfig:
    stage: int = option(1, "1: CFG-aware retraining of a pruned student; 2: step distillation of the stage-1 student")
    student: str = option("", "student pipeline folder: a pruned model (stage 1) or the stage-1 output (stage 2)")
    teacher: str = option("tiny-sd", "frozen teacher: the unpruned model (stage 1) or the stage-1 output (stage 2)")
    out: str = option("", "pipeline folder to write (complete diffusers folder + slimsd.json + manifest.json)")
    work_dir: str | None = option(None, "checkpoints and tensorboard logs (default OUT.work)")
    # data
    data: str = option("scenes", "'scenes' or a dataset spec of slimsd.data.user (folder, csv/jsonl, shards, HF dataset)")
    num_latents: int = option(20_000, "training images VAE-encoded once and cached; 0 = encode every batch (streamed data)")
    data_seed: int = option(0, "which training images are encoded")
    resolution: int | None = option(None, "image size for user data (default: the VAE's sample_size)")
    caption_dropout: float = option(0.1, "share of empty captions (keeps the unconditional branch CFG needs)")
    # optimisation (AdamW as the paper)
    max_steps: int = option(1000, "optimisation steps")
    batch_size: int = option(64, "per process and micro-step")
    gradient_accumulation_steps: int = option(1, "micro-steps per optimisation step")
    learning_rate: float = option(5e-5, "AdamW lr (paper: 5e-5 at batch 512 on SD v2.1; tiny-sd: see configs/tiny-sd-slim.json)")
    scale_lr: bool = option(False, "multiply lr by accumulation x batch x processes")
    lr_scheduler: str = option("constant", "constant | constant_with_warmup | linear | cosine | ... (diffusers get_scheduler)")
    lr_warmup_steps: int = option(0, "warm-up steps of the lr schedule (constant with warm-up becomes constant_with_warmup)")
    adam_beta1: float = option(0.9, "AdamW beta1")
    adam_beta2: float = option(0.999, "AdamW beta2")
    adam_weight_decay: float = option(1e-2, "AdamW weight decay")
    adam_epsilon: float = option(1e-8, "AdamW epsilon")
    max_grad_norm: float = option(1.0, "gradient clipping (0: off)")
    gradient_checkpointing: bool = option(False, "recompute activations in the backward pass (less GPU memory)")
    mixed_precision: MixedPrecision = option("no", "fp16 needs a GPU; the student's master weights stay fp32")
    use_ema: bool = option(False, "keep an EMA of the student and save it")
    ema_decay: float = option(0.999, "EMA decay (with --use-ema)")
    seed: int = option(0, "seeds every micro-step's batch, noise, timesteps, guidance and coin")
    threads: int = option(0, "torch CPU threads (0: torch's default)")
    # losses; None = the stage's default (STAGE_DEFAULTS)
    lambda_diff: float | None = option(None, "weight of L_Diff (default 1 in both stages)")
    lambda_out_kd: float | None = option(None, "weight of L_OutKD, eq. 2 (stage 1 default 1)")
    lambda_cfg_kd: float | None = option(None, "weight of L_CfgKD, eq. 1 (stage 1 default 1; 0 = the ablation without it)")
    cfg_prob: float | None = option(None, "stage 1: probability of adding L_CfgKD to a batch (default 0.5); "
                                        "stage 2: probability of a CFG target, else w = 1 (default 1)")
    lambda_step_reduc: float | None = option(None, "weight of L_StepReduc, eq. 3 (stage 2 default 1, as the paper)")
    lambda_feat_kd: float = option(0.0, "weight of BK-SDM's feature KD on stage outputs (stage 1; the baseline uses 1)")
    guidance_min: float = option(2.0, "CFG losses draw w ~ U[guidance-min, guidance-max] per batch")
    guidance_max: float = option(14.0, "see --guidance-min")
    snr_weighting: SnrWeighting = option("none", "truncated: SnapFusion's max(SNR, 1) on the x-space losses")
    student_steps: int = option(8, "stage 2: DDIM steps the student is distilled for (teacher takes twice as many)")
    # checkpoints, logging, evaluation
    checkpointing_steps: int = option(250, "write OUT.work/checkpoint-STEP every N steps (0: never)")
    checkpoints_total_limit: int = option(2, "keep the last K checkpoints (0: all)")
    resume_from_checkpoint: str | None = option(None, "'latest' (starts fresh when there is none) or a checkpoint folder")
    logging_steps: int = option(10, "one loss_log.json row (means since the last row) every N steps")
    report_to: ReportTo = option("auto", "auto: tensorboard when it is installed, else none")
    eval_steps: int = option(0, "evaluate FD / alignment every N steps (0: only at the end)")
    eval_prompts: int = option(32, "held-out prompts of each periodic evaluation")
    final_eval_prompts: int = option(64, "held-out prompts of the final evaluation (0: none)")
    sample_steps: int | None = option(None, "default sampling steps written to slimsd.json (stage 1: 25, stage 2: --student-steps)")
    sample_guidance: float = option(7.5, "default guidance written to slimsd.json and used for evaluation")


# The paper gives lambda_StepReduc = 1 (§3.3: "we set the coefficient to 1", SnapFusion used 0.2)
# and lr 5e-5 (§4). It gives no value for lambda_Diff, lambda_OutKD, lambda_CfgKD or the CFG
# probability: those below are ours (docs/training.md).
STAGE_DEFAULTS = {
    1: dict(lambda_diff=1.0, lambda_out_kd=1.0, lambda_cfg_kd=1.0, cfg_prob=0.5, lambda_step_reduc=0.0),
    2: dict(lambda_diff=1.0, lambda_out_kd=0.0, lambda_cfg_kd=0.0, cfg_prob=1.0, lambda_step_reduc=1.0),
}
# fields that must not change when a run is resumed from a checkpoint
RESUME_KEYS = ("stage", "student", "teacher", "data", "batch_size", "gradient_accumulation_steps", "student_steps")


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
    """Fingerprint of the settings that change what a run computes."""
    d = {k: v for k, v in asdict(cfg).items() if k not in exclude}
    return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


def config_from_dict(d: dict) -> TrainConfig:
    """TrainConfig from a dict with ``snake_case`` or ``kebab-case`` keys; unknown keys are an error."""
    names = {f.name for f in fields(TrainConfig)}
    norm = {k.replace("-", "_"): v for k, v in d.items()}
    unknown = sorted(set(norm) - names)
    if unknown:
        raise ValueError(f"unknown training option(s) {unknown}; see `slimsd compress train --help`")
    return TrainConfig(**norm)
