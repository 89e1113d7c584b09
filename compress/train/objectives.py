r"""What one micro-step of each stage optimises, written with compress/losses.py (notation there).

    stage 1 (eq. 2):  L = l_Diff L_Diff + l_OutKD L_OutKD + [u < p] l_CfgKD L_CfgKD  (+ l_FeatKD L_FeatKD)
    stage 2 (eq. 3):  L = l_Diff L_Diff + l_StepReduc L_StepReduc

with w ~ U[guidance_min, guidance_max] drawn once per batch for the CFG terms and ``u ~ U[0, 1]``
one coin per batch. ``l_FeatKD`` > 0 adds BK-SDM's feature KD (stage outputs of teacher and
student): with ``l_CfgKD = 0`` that is the "BK-SDM-style" baseline (L_Diff + L_OutKD + L_FeatKD).

Each objective takes the batch ``z0, c``, the unconditional embedding and the micro-step's
generator, and returns ``{"loss": L, <each term>: value, "w": w}`` (the keys are :data:`LOG_KEYS`).
"""

from __future__ import annotations

import torch

from slimsd.compress.losses import (
    cfg as apply_cfg, ddim_step, loss_cfg_kd, loss_diff, loss_feature_kd, loss_out_kd, loss_step_reduc,
    sample_guidance, truncated_snr_weight, x_from_eps,
)
from slimsd.compress.train.config import TrainConfig

# every value an objective returns, in the order of the loss log's columns
LOG_KEYS = ("loss", "l_diff", "l_out_kd", "l_cfg_kd", "l_step_reduc", "l_feat_kd", "w")


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
    w = sample_guidance(cfg.guidance_min, cfg.guidance_max, g)  # one w per batch, drawn even when unused
    z_t = sched.add_noise(z0, eps, t)  # alpha_t z_0 + sigma_t eps
    abar_t = abar_at(sched, t)  # (B,)
    weight = truncated_snr_weight(abar_t).to(dev) if cfg.snr_weighting == "truncated" else None
    need_teacher = cfg.lambda_out_kd > 0 or cfg.lambda_feat_kd > 0  # without CFG: does any term need eps_T?
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
    if feats:
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
    w = sample_guidance(cfg.guidance_min, cfg.guidance_max, g)  # one w per batch, drawn even when unused
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
