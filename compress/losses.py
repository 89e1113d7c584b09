r"""Training losses of the paper, one function per equation (../shared/paper.md §3.2-3.3).

Notation (as the paper and DDIM; all per-sample tensors broadcast over (B, C, h, w)):

=====================  =====================================================================
symbol                 meaning
=====================  =====================================================================
``z_0``                clean latent of a training image (VAE latent x scaling factor)
``t, t', t''``         timesteps, t > t' > t''
``abar_t``             cumulative product of (1 - beta) at t (``scheduler.alphas_cumprod``)
``alpha_t, sigma_t``   sqrt(abar_t), sqrt(1 - abar_t);  z_t = alpha_t z_0 + sigma_t eps
``c``                  text condition; ``eps(z_t, t, c)`` noise prediction, ``eps(z_t, t, {})``
                       the unconditional one (empty prompt)
``w``                  classifier-free guidance scale, w ~ U[2, 14] once per batch (:func:`sample_guidance`)
``CFG(eps)``           eps_uncond + w (eps_cond - eps_uncond)
``x(theta, z_t, t, c)``  clean-latent prediction of model theta under CFG (eq. 1)
``T, S``               teacher, student
``x``                  a training image in [-1, 1], (B, 3, H, W)
``mu_T(x), s``         the source VAE's (AutoencoderKL) posterior mean and its ``scaling_factor``
``z``                  a posterior sample of the source VAE (unscaled); ``s z`` is what the U-Net sees
``D_T, D_S``           source decoder, tiny decoder (AutoencoderTiny, fed scaled latents ``s z``)
``E_S``                tiny encoder: image -> scaled latent
``|.|_p``              p = 1 (L1) or p = 2 (squared error), per pixel, ``norm`` below
=====================  =====================================================================

Stage 1 (eq. 2):  L = l_Diff L_Diff + l_OutKD L_OutKD + l_CfgKD L_CfgKD
Stage 2 (eq. 3):  L = l_Diff L_Diff + l_StepReduc L_StepReduc
Tiny VAE (``slimsd compress decoder``, not in the paper; TAESD-style distillation):
                  L = l_DecKD L_DecKD + l_Img L_Img + l_EncKD L_EncKD

Every loss returns the mean over the batch of a per-sample mean squared error, optionally
weighted per sample (e.g. :func:`truncated_snr_weight`); the decoder losses may take the mean
absolute error instead (``norm="l1"``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def _per_sample_mse(a: Tensor, b: Tensor, weight: Tensor | None = None) -> Tensor:
    err = F.mse_loss(a.float(), b.float(), reduction="none").flatten(1).mean(1)  # (B,)
    if weight is not None:
        err = err * weight.flatten().float()
    return err.mean()


def _per_sample_l1(a: Tensor, b: Tensor) -> Tensor:
    return F.l1_loss(a.float(), b.float(), reduction="none").flatten(1).mean(1).mean()


PIXEL_NORMS = ("l1", "mse")


def _pixel_err(a: Tensor, b: Tensor, norm: str) -> Tensor:
    if norm == "l1":
        return _per_sample_l1(a, b)
    if norm == "mse":
        return _per_sample_mse(a, b)
    raise ValueError(f"pixel loss norm must be one of {PIXEL_NORMS}, got {norm!r}")


def _bcast(v: Tensor, like: Tensor) -> Tensor:
    """(B,) -> (B, 1, 1, 1) to broadcast against latents."""
    v = torch.as_tensor(v, dtype=torch.float32, device=like.device)
    return v.reshape(-1, *([1] * (like.ndim - 1))) if v.ndim else v


def alpha_sigma(abar_t: Tensor, like: Tensor) -> tuple[Tensor, Tensor]:
    """alpha_t = sqrt(abar_t), sigma_t = sqrt(1 - abar_t), shaped to broadcast against ``like``."""
    abar = _bcast(abar_t, like)
    return abar.sqrt(), (1 - abar).sqrt()


def cfg(eps_uncond: Tensor, eps_cond: Tensor, w: Tensor | float) -> Tensor:
    """CFG(eps) = eps_uncond + w (eps_cond - eps_uncond)  (classifier-free guidance)."""
    w = _bcast(w, eps_cond) if torch.is_tensor(w) else w
    return eps_uncond + w * (eps_cond - eps_uncond)


def x_from_eps(z_t: Tensor, eps: Tensor, abar_t: Tensor) -> Tensor:
    """x = (z_t - sqrt(1 - abar_t) eps) / sqrt(abar_t)   (the predictor of eq. 1)."""
    alpha_t, sigma_t = alpha_sigma(abar_t, z_t)
    return (z_t - sigma_t * eps) / alpha_t


def loss_diff(eps_pred: Tensor, eps: Tensor, weight: Tensor | None = None) -> Tensor:
    """L_Diff = E || eps - eps_theta(z_t, t, c) ||^2   (the usual denoising loss)."""
    return _per_sample_mse(eps_pred, eps, weight)


def loss_out_kd(eps_teacher: Tensor, eps_student: Tensor, weight: Tensor | None = None) -> Tensor:
    """Eq. 2: L_OutKD = E || eps_T(z_t, t, c) - eps_S(z_t, t, c) ||^2."""
    return _per_sample_mse(eps_student, eps_teacher.detach(), weight)


def loss_cfg_kd(z_t: Tensor, abar_t: Tensor, w: Tensor | float,
                eps_teacher_uncond: Tensor, eps_teacher_cond: Tensor,
                eps_student_uncond: Tensor, eps_student_cond: Tensor, weight: Tensor | None = None) -> Tensor:
    """Eq. 1: L_CfgKD = E || x(T, z_t, t, c) - x(S, z_t, t, c) ||^2,
    x(theta, z_t, t, c) = (z_t - sqrt(1 - abar_t) CFG(eps_theta)) / sqrt(abar_t)."""
    x_T = x_from_eps(z_t, cfg(eps_teacher_uncond, eps_teacher_cond, w), abar_t).detach()
    x_S = x_from_eps(z_t, cfg(eps_student_uncond, eps_student_cond, w), abar_t)
    return _per_sample_mse(x_S, x_T, weight)


def ddim_step(z_t: Tensor, eps: Tensor, abar_t: Tensor, abar_s: Tensor) -> Tensor:
    """Deterministic DDIM update t -> s (eta = 0): z_s = alpha_s x + sigma_s eps, x from eq. 1."""
    alpha_s, sigma_s = alpha_sigma(abar_s, z_t)
    return alpha_s * x_from_eps(z_t, eps, abar_t) + sigma_s * eps


def step_reduc_target(z_t: Tensor, z_tpp: Tensor, abar_t: Tensor, abar_tpp: Tensor) -> Tensor:
    """Target of eq. 3: the clean latent that takes the student from z_t to the teacher's z_t''
    in ONE DDIM step:  x* = (z_t'' - (sigma_t''/sigma_t) z_t) / (alpha_t'' - (sigma_t''/sigma_t) alpha_t)."""
    alpha_t, sigma_t = alpha_sigma(abar_t, z_t)
    alpha_tpp, sigma_tpp = alpha_sigma(abar_tpp, z_t)
    ratio = sigma_tpp / sigma_t
    return (z_tpp - ratio * z_t) / (alpha_tpp - ratio * alpha_t)


def loss_step_reduc(x_student: Tensor, z_t: Tensor, z_tpp: Tensor, abar_t: Tensor, abar_tpp: Tensor,
                    weight: Tensor | None = None) -> Tensor:
    """Eq. 3: L_StepReduc = E || x(S, z_t, t, c) - x*(z_t, z_t'') ||^2, where z_t'' is the teacher's
    latent after two CFG DDIM steps t -> t' -> t'' and x(S, ...) the student's CFG clean latent."""
    target = step_reduc_target(z_t, z_tpp, abar_t, abar_tpp).detach()
    return _per_sample_mse(x_student, target, weight)


def truncated_snr_weight(abar_t: Tensor) -> Tensor:
    """SnapFusion's truncated SNR weighting for x-space losses: max(alpha_t^2 / sigma_t^2, 1)."""
    abar = torch.as_tensor(abar_t, dtype=torch.float32)
    return (abar / (1 - abar)).clamp(min=1.0)


# x-space weightings of L_Diff. The eps-space MSE is SNR_t times the x-space one
# (eps - eps_theta = (alpha_t / sigma_t)(x_theta - z_0)), so an x-space weight lambda(t) is
# lambda(t) / SNR_t on L_Diff. Plain L_Diff is lambda = SNR_t: almost no weight where
# SNR_t << 1, the noise levels at which the layout of the picture is decided.
DIFF_WEIGHTINGS = ("eps", "truncated-snr", "min-snr-5")


def diff_weight(abar_t: Tensor, kind: str = "eps") -> Tensor:
    """Per-sample weight of :func:`loss_diff` for the x-space weighting ``kind``, SNR_t = abar_t / (1 - abar_t):

    ``eps``            lambda = SNR_t              -> 1                  (plain L_Diff, SD's recipe)
    ``truncated-snr``  lambda = max(SNR_t, 1)      -> max(1, 1 / SNR_t)  (Salimans & Ho 2022: v-prediction's
                                                                           x-space weight, eps parameterisation kept)
    ``min-snr-5``      lambda = min(SNR_t, 5)      -> min(1, 5 / SNR_t)  (Hang et al. 2023, gamma = 5)
    """
    snr = torch.as_tensor(abar_t, dtype=torch.float32)
    snr = snr / (1 - snr)
    if kind == "eps":
        return torch.ones_like(snr)
    if kind == "truncated-snr":
        return (1 / snr).clamp(min=1.0)
    if kind == "min-snr-5":
        return (5 / snr).clamp(max=1.0)
    raise ValueError(f"diff_weight: kind must be one of {DIFF_WEIGHTINGS}, got {kind!r}")


def loss_feature_kd(features_teacher: list[Tensor], features_student: list[Tensor]) -> Tensor:
    """BK-SDM's feature-level KD (the baseline): sum over matched block outputs of the MSE."""
    if len(features_teacher) != len(features_student):
        raise ValueError(f"feature KD needs matched lists, got {len(features_teacher)} and {len(features_student)}")
    return sum(F.mse_loss(s.float(), t.detach().float()) for t, s in zip(features_teacher, features_student))


def sample_guidance(low: float = 2.0, high: float = 14.0, generator: torch.Generator | None = None) -> float:
    """w ~ U[low, high], ONE draw per batch: every sample of a batch is guided with the same w in
    L_CfgKD (eq. 1) and L_StepReduc (eq. 3). SnapFusion's range [2, 14]; one number from ``generator``."""
    return low + (high - low) * float(torch.rand((), generator=generator))


# ---------------------------------------------------------------------------------------
# the tiny VAE (slimsd compress decoder): the folder's AutoencoderKL replaced by an AutoencoderTiny
# ---------------------------------------------------------------------------------------
def loss_decoder_kd(image_student: Tensor, image_teacher: Tensor, norm: str = "l1") -> Tensor:
    """L_DecKD = E | D_S(s z) - D_T(z) |_p: the tiny decoder, fed the *scaled* latent s z (its
    scaling_factor is 1), reproduces the source decoder's image of the unscaled z. (B, 3, H, W) each."""
    return _pixel_err(image_student, image_teacher.detach(), norm)


def loss_decoder_image(image_student: Tensor, image: Tensor, norm: str = "l1") -> Tensor:
    """L_Img = E | D_S(s z) - x |_p, z ~ q_T(z | x): reconstruction of the real training image
    (optional: the source decoder is the target that matters, since the U-Net's latents are decoded by it)."""
    return _pixel_err(image_student, image.detach(), norm)


def loss_encoder_kd(latent_student: Tensor, mean_teacher: Tensor, scaling: float) -> Tensor:
    """L_EncKD = E || E_S(x) - s mu_T(x) ||^2: the tiny encoder yields the source's scaled
    posterior mean, the latents the U-Net was trained on. (B, C, h, w) each."""
    return _per_sample_mse(latent_student, float(scaling) * mean_teacher.detach())
