"""The training loop, top to bottom: set up, load, resume, then optimise until ``max_steps``.

It follows diffusers' ``examples/text_to_image/train_text_to_image.py``: one ``Accelerator`` (so
the same code runs as one CPU process and under ``accelerate launch`` on many GPUs),
``accelerator.accumulate`` for gradient accumulation, logging and checkpoints once per
optimisation step, ``accelerator.save_state`` / ``load_state`` for ``checkpoint-{step}`` folders,
diffusers' ``EMAModel`` and ``get_scheduler``.

What is frozen: the teacher U-Net (unpruned in stage 1; the stage-1 student in stage 2), the text
encoder and the VAE. Only the student U-Net trains.
"""

from __future__ import annotations

import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch

from slimsd.compress.train.checkpoint import TrainState, find_checkpoint, save_checkpoint
from slimsd.compress.train.config import TrainConfig, resolve_config
from slimsd.compress.train.data import CachedBatches, StreamedBatches, build_latent_cache, micro_generator
from slimsd.compress.train.objectives import LOG_KEYS, StageFeatures, stage1_losses, stage2_losses, student_grid
from slimsd.compress.train.output import evaluate_unet, write_output


def train(cfg: TrainConfig, callback=None) -> Path:
    """Run stage ``cfg.stage``; returns the output pipeline folder.

    ``callback(step, accelerator)`` is called after every optimisation step (tests use it to
    interrupt a run)."""
    return with_threads(cfg.threads, _train, cfg, callback)


def with_threads(n: int, fn, *args, **kwargs):
    """``fn(*args, **kwargs)`` with torch on ``n`` CPU threads (0: unchanged), restored afterwards."""
    threads = torch.get_num_threads()
    try:
        if n:
            torch.set_num_threads(n)
        return fn(*args, **kwargs)
    finally:
        torch.set_num_threads(threads)


def _train(cfg: TrainConfig, callback=None) -> Path:
    from accelerate.utils import set_seed
    from tqdm.auto import tqdm

    from slimsd.models import count_params, resolve_model

    cfg = resolve_config(cfg)
    student_dir, teacher_dir = resolve_model(cfg.student), resolve_model(cfg.teacher)
    work = Path(cfg.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    accelerator, report_to = make_accelerator(cfg, work)
    set_seed(cfg.seed)
    main = accelerator.is_main_process

    # --- models: the student trains; teacher, text encoder and VAE are frozen ---------------
    unet, teacher, parts = load_models(cfg, student_dir, teacher_dir, accelerator)
    student_params, teacher_params = count_params(unet), count_params(teacher)
    feats = (StageFeatures(teacher), StageFeatures(unet)) if cfg.stage == 1 and cfg.lambda_feat_kd > 0 else None
    ema = make_ema(cfg, unet)
    optimizer, lr_scheduler = make_optimizer(cfg, unet, accelerator.num_processes)
    unet, optimizer, lr_scheduler = accelerator.prepare(unet, optimizer, lr_scheduler)
    if ema is not None:
        ema.to(accelerator.device)

    # --- state: checkpointed with the model, optimizer, lr scheduler and EMA -----------------
    state = TrainState(asdict(cfg))
    accelerator.register_for_checkpointing(state)
    if ema is not None:
        accelerator.register_for_checkpointing(ema)
    resume(cfg, accelerator, work, state)

    # --- data and the stage's objective ----------------------------------------------------------
    batches = make_batches(cfg, parts, state, accelerator)
    objective = make_objective(cfg, unet, teacher, parts["scheduler"], batches.uncond.to(accelerator.device), feats)
    if report_to != "none":
        accelerator.init_trackers("slimsd-train", config={k: v for k, v in asdict(cfg).items() if isinstance(v, (int, float, str, bool))})

    # --- the loop ------------------------------------------------------------------------------
    bar = tqdm(total=cfg.max_steps, initial=state.step, desc=f"stage {cfg.stage}", dynamic_ncols=True, disable=not main)
    t_start = time.time() - state.train_s
    while state.step < cfg.max_steps:
        t0 = time.time()
        optimisation_step(cfg, accelerator, unet, optimizer, lr_scheduler, objective, batches, state)
        if ema is not None:
            ema.step(accelerator.unwrap_model(unet).parameters())
        state.step += 1
        state.compute_s += time.time() - t0
        bar.update(1)
        if state.step % cfg.logging_steps == 0 or state.step == cfg.max_steps:
            log_row(accelerator, state, lr_scheduler, bar)
        if cfg.eval_steps and state.step % cfg.eval_steps == 0 and state.step < cfg.max_steps:
            periodic_eval(cfg, accelerator, unet, ema, parts, state, bar)
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
    return Path(cfg.out)


# ---------------------------------------------------------------------------------------
# set-up
# ---------------------------------------------------------------------------------------
def make_accelerator(cfg: TrainConfig, work: Path):
    """``(Accelerator, report_to)``; ``report_to="auto"`` becomes tensorboard when it is installed."""
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration

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
    return accelerator, report_to


def load_models(cfg: TrainConfig, student_dir: Path, teacher_dir: Path, accelerator):
    """``(student U-Net, frozen teacher U-Net, frozen parts)``: parts are the student pipeline's
    VAE, text encoder, tokenizer and scheduler. The teacher runs in the mixed-precision dtype."""
    from slimsd.models import load_pipeline

    dev = accelerator.device
    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision, torch.float32)
    pipe, teacher_pipe = load_pipeline(student_dir), load_pipeline(teacher_dir)
    check_frozen_components(pipe, teacher_pipe)
    unet, teacher = pipe.unet, teacher_pipe.unet
    del teacher_pipe
    teacher.requires_grad_(False).eval().to(dev, dtype=weight_dtype)
    for m in (pipe.vae, pipe.text_encoder):  # small next to the U-Nets and used outside the loop: kept in fp32
        m.requires_grad_(False).eval().to(dev)
    unet.train()
    if cfg.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    parts = dict(vae=pipe.vae, text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer, scheduler=pipe.scheduler)
    return unet, teacher, parts


def check_frozen_components(student_pipe, teacher_pipe) -> None:
    """Teacher and student must share the VAE (one latent space) and the text encoder."""
    for comp in ("vae", "text_encoder"):
        a, b = getattr(student_pipe, comp).state_dict(), getattr(teacher_pipe, comp).state_dict()
        same = a.keys() == b.keys() and all(a[k].shape == b[k].shape and torch.equal(a[k], b[k]) for k in a)
        if not same:
            raise ValueError(f"student and teacher have different {comp} weights: distillation needs one latent "
                             "space and one text encoder; prune the student from the teacher")


def make_ema(cfg: TrainConfig, unet):
    """diffusers' ``EMAModel`` of the student with ``--use-ema``, else None."""
    if not cfg.use_ema:
        return None
    from diffusers.training_utils import EMAModel

    return EMAModel(unet.parameters(), decay=cfg.ema_decay)


def make_optimizer(cfg: TrainConfig, unet, num_processes: int):
    """AdamW (as the paper) and its lr schedule; ``--scale-lr`` scales lr by the global batch."""
    lr = cfg.learning_rate
    if cfg.scale_lr:
        lr *= cfg.gradient_accumulation_steps * cfg.batch_size * num_processes
    optimizer = torch.optim.AdamW(unet.parameters(), lr=lr, betas=(cfg.adam_beta1, cfg.adam_beta2),
                                  weight_decay=cfg.adam_weight_decay, eps=cfg.adam_epsilon)
    return optimizer, make_lr_scheduler(optimizer, cfg.lr_scheduler, cfg.lr_warmup_steps, cfg.max_steps, num_processes)


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


def resume(cfg: TrainConfig, accelerator, work: Path, state: TrainState) -> None:
    """Load ``--resume-from-checkpoint`` (``latest``: the newest one, or a fresh start when none)."""
    ckpt = find_checkpoint(cfg.resume_from_checkpoint, work)
    if cfg.resume_from_checkpoint and ckpt is None and accelerator.is_main_process:
        print(f"no checkpoint in {work}: starting a new run", file=sys.stderr)
    if ckpt is not None:
        accelerator.load_state(str(ckpt))
        if accelerator.is_main_process:
            print(f"resumed from {ckpt} at step {state.step}", file=sys.stderr)


def make_batches(cfg: TrainConfig, parts: dict, state: TrainState, accelerator):
    """Cached latents (one process encodes, the others read the cache), or a stream encoded per
    batch (``--num-latents 0``) fast-forwarded over the samples a resumed run already used."""
    dev = accelerator.device
    vae, text_encoder, tokenizer = parts["vae"], parts["text_encoder"], parts["tokenizer"]
    resolution = cfg.resolution or int(vae.config.sample_size)
    if cfg.num_latents > 0:
        with accelerator.main_process_first():
            cache = build_latent_cache(vae, text_encoder, tokenizer, cfg.data, cfg.num_latents, cfg.data_seed,
                                       resolution, device=dev)
        return CachedBatches(cache, cfg.caption_dropout, dev)
    used = state.step * cfg.gradient_accumulation_steps * cfg.batch_size
    return StreamedBatches(cfg.data, resolution, cfg.data_seed + accelerator.process_index, vae, text_encoder,
                           tokenizer, cfg.caption_dropout, dev, skip=used)


# ---------------------------------------------------------------------------------------
# one step, its log row, its evaluation
# ---------------------------------------------------------------------------------------
def make_objective(cfg: TrainConfig, unet, teacher, sched, uncond, feats):
    """``objective(z0, c, g) -> {"loss": ..., terms}`` of the stage (compress/train/objectives.py)."""
    if cfg.stage == 1:
        return lambda z0, c, g: stage1_losses(unet, teacher, sched, z0, c, uncond, g, cfg, feats)
    grid = student_grid(sched, cfg.student_steps)
    return lambda z0, c, g: stage2_losses(unet, teacher, sched, z0, c, uncond, g, cfg, grid)


def optimisation_step(cfg: TrainConfig, accelerator, unet, optimizer, lr_scheduler, objective, batches,
                      state: TrainState) -> None:
    """``gradient_accumulation_steps`` micro-steps, each with its own generator; the loss terms
    are summed into ``state.window`` (reduced over processes when a row is logged)."""
    for micro in range(cfg.gradient_accumulation_steps):
        g = micro_generator(cfg.seed, accelerator.process_index, state.step, micro)
        z0, c, _ = batches(cfg.batch_size, g)
        with accelerator.accumulate(unet):
            losses = objective(z0, c, g)
            accelerator.backward(losses["loss"])
            if accelerator.sync_gradients and cfg.max_grad_norm > 0:
                accelerator.clip_grad_norm_(unet.parameters(), cfg.max_grad_norm)
            optimizer.step()
            lr_scheduler.step()
            optimizer.zero_grad(set_to_none=True)
        for k, v in losses.items():  # local (sum, count)
            state.window[0, LOG_KEYS.index(k)] += float(v.detach())
            state.window[1, LOG_KEYS.index(k)] += 1


def log_row(accelerator, state: TrainState, lr_scheduler, bar) -> None:
    """One row of the loss log: the means since the last row, over every process."""
    tot = accelerator.reduce(state.window.to(accelerator.device), reduction="sum").cpu()  # (2, K): same shape everywhere
    row = {"step": state.step, "lr": lr_scheduler.get_last_lr()[0]}
    row.update({k: float(tot[0, i] / tot[1, i]) for i, k in enumerate(state.log_keys) if tot[1, i] > 0})
    state.window.zero_()
    state.log.append(row)
    accelerator.log({k: v for k, v in row.items() if k != "step"}, step=state.step)
    bar.set_postfix(loss=f"{row['loss']:.4f}")


def periodic_eval(cfg: TrainConfig, accelerator, unet, ema, parts: dict, state: TrainState, bar) -> None:
    """FD / alignment of the current student (its EMA weights with ``--use-ema``), main process only."""
    if accelerator.is_main_process:
        u = accelerator.unwrap_model(unet)
        if ema is not None:
            ema.store(u.parameters())
            ema.copy_to(u.parameters())
        try:
            r = evaluate_unet(u, parts, cfg.sample_steps, cfg.sample_guidance, cfg.eval_prompts, None)
        finally:
            if ema is not None:
                ema.restore(u.parameters())
        state.evals.append({"step": state.step, **r})
        accelerator.log({"eval/fd": r["fd"], "eval/alignment": r["alignment"]}, step=state.step)
        bar.write(f"step {state.step}: FD {r['fd']:.2f} alignment {r['alignment']:.3f} "
                  f"({r['num_prompts']} prompts, {r['steps']} steps)")
    accelerator.wait_for_everyone()
