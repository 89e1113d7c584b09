r"""Stage 1: CFG-aware retraining (paper §3.2) and stage 2: CFG-aware step distillation (§3.3).

    slimsd compress train --stage 1 --student runs/pruned --teacher tiny-sd   --out runs/stage1
    slimsd compress train --stage 2 --student runs/stage1 --teacher runs/stage1 --out runs/stage2

Read in this order:

===================  ==========================================================================
``config.py``        :class:`TrainConfig` (one field per flag, with its help), stage defaults
``data.py``          the latent cache, the micro-batches drawn from it, caption encoding
``objectives.py``    stage 1 (eq. 2 + eq. 1) and stage 2 (eq. 3) losses from compress/losses.py
``loop.py``          :func:`train`: the accelerate training loop, top to bottom
``checkpoint.py``    ``checkpoint-{step}`` folders, resume state
``output.py``        the pipeline folder ``OUT/``, its records, loss plot and evaluation
===================  ==========================================================================

Determinism: every micro-step draws its batch, noise, timesteps, caption dropout, guidance and
coin from its own generator seeded by ``(seed, process, step, micro-step)``. A run resumed from
``checkpoint-k`` therefore replays steps k+1... exactly as the uninterrupted run did (model,
optimizer, lr scheduler, EMA, step and loss log come back from the checkpoint).

Checkpoints and tensorboard logs go to ``OUT.work/`` (``--work-dir``), never into the
exportable folder ``OUT/``.
"""

from slimsd.compress.train.checkpoint import TrainState, find_checkpoint, list_checkpoints, save_checkpoint
from slimsd.compress.train.config import (
    MIXED_PRECISION, RESUME_KEYS, SNR_WEIGHTING, STAGE_DEFAULTS, TrainConfig, config_from_dict, config_sha,
    resolve_config,
)
from slimsd.compress.train.data import CachedBatches, StreamedBatches, build_latent_cache, encode_captions, micro_generator
from slimsd.compress.train.loop import check_frozen_components, make_lr_scheduler, train
from slimsd.compress.train.objectives import (
    LOG_KEYS, StageFeatures, abar_at, matched_features, stage1_losses, stage2_losses, student_grid,
)
from slimsd.compress.train.output import evaluate_unet, plot_loss_log, read_slimsd_json, write_output

__all__ = [
    "CachedBatches", "LOG_KEYS", "MIXED_PRECISION", "RESUME_KEYS", "SNR_WEIGHTING", "STAGE_DEFAULTS", "StageFeatures",
    "StreamedBatches", "TrainConfig", "TrainState", "abar_at", "build_latent_cache", "check_frozen_components",
    "config_from_dict", "config_sha", "encode_captions", "evaluate_unet", "find_checkpoint", "list_checkpoints",
    "make_lr_scheduler", "matched_features", "micro_generator", "plot_loss_log", "read_slimsd_json",
    "resolve_config", "save_checkpoint", "stage1_losses", "stage2_losses", "student_grid", "train", "write_output",
]
