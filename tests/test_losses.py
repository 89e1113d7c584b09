"""Each loss against a hand computation (compress/losses.py, paper eqs. 1-3)."""


import pytest
import torch

from slimsd.compress.losses import (
    cfg, ddim_step, loss_cfg_kd, loss_diff, loss_feature_kd, loss_out_kd, loss_step_reduc, sample_guidance,
    step_reduc_target, truncated_snr_weight, x_from_eps,
)


def test_loss_diff_and_out_kd_are_plain_mse():
    a = torch.tensor([[1.0, 2.0], [3.0, 4.0]]).reshape(2, 2, 1, 1)
    b = torch.tensor([[1.0, 0.0], [0.0, 4.0]]).reshape(2, 2, 1, 1)
    # per sample: (0 + 4) / 2 = 2 and (9 + 0) / 2 = 4.5; mean 3.25
    assert loss_diff(a, b).item() == pytest.approx(3.25)
    assert loss_out_kd(b, a).item() == pytest.approx(3.25)
    assert loss_diff(a, b, weight=torch.tensor([1.0, 0.0])).item() == pytest.approx(1.0)


def test_cfg_formula():
    u, c = torch.tensor([1.0]), torch.tensor([3.0])
    assert cfg(u, c, 7.5).item() == pytest.approx(1 + 7.5 * 2)
    assert cfg(u, c, 1.0).item() == pytest.approx(3.0)  # w = 1: the conditional prediction


def test_x_from_eps_inverts_forward_noising():
    g = torch.Generator().manual_seed(0)
    z0, eps = torch.randn(3, 4, 2, 2, generator=g), torch.randn(3, 4, 2, 2, generator=g)
    abar = torch.tensor([0.9, 0.5, 0.1])
    z_t = abar.sqrt().view(-1, 1, 1, 1) * z0 + (1 - abar).sqrt().view(-1, 1, 1, 1) * eps
    torch.testing.assert_close(x_from_eps(z_t, eps, abar), z0, rtol=1e-5, atol=1e-5)


def test_loss_cfg_kd_by_hand():
    z_t, abar, w = torch.tensor([[[[2.0]]]]), torch.tensor([0.64]), 2.0  # alpha 0.8, sigma 0.6
    tu, tc, su, sc = (torch.tensor([[[[v]]]]) for v in (0.0, 1.0, 0.5, 0.5))
    # teacher CFG eps = 0 + 2 (1 - 0) = 2 -> x_T = (2 - 0.6*2)/0.8 = 1.0
    # student CFG eps = 0.5 + 2 * 0 = 0.5 -> x_S = (2 - 0.3)/0.8 = 2.125
    assert loss_cfg_kd(z_t, abar, w, tu, tc, su, sc).item() == pytest.approx((2.125 - 1.0) ** 2)
    # identical predictions: zero loss whatever w
    assert loss_cfg_kd(z_t, abar, 9.0, tu, tc, tu, tc).item() == 0.0


def test_loss_cfg_kd_only_trains_the_student():
    z_t = torch.randn(2, 4, 2, 2)
    t_u, t_c = torch.randn(2, 4, 2, 2, requires_grad=True), torch.randn(2, 4, 2, 2, requires_grad=True)
    s_u, s_c = torch.randn(2, 4, 2, 2, requires_grad=True), torch.randn(2, 4, 2, 2, requires_grad=True)
    loss_cfg_kd(z_t, torch.tensor([0.5, 0.7]), torch.tensor([3.0, 9.0]), t_u, t_c, s_u, s_c).backward()
    assert t_u.grad is None and s_u.grad is not None and s_c.grad.abs().sum() > 0


def test_step_reduc_target_takes_the_student_to_the_teacher_in_one_step():
    g = torch.Generator().manual_seed(1)
    z_t, eps1, eps2 = (torch.randn(2, 4, 3, 3, generator=g) for _ in range(3))
    abar_t, abar_tp, abar_tpp = torch.tensor([0.2, 0.3]), torch.tensor([0.4, 0.5]), torch.tensor([0.6, 0.7])
    # teacher: two DDIM steps t -> t' -> t''
    z_tp = ddim_step(z_t, eps1, abar_t, abar_tp)
    z_tpp = ddim_step(z_tp, eps2, abar_tp, abar_tpp)
    x_star = step_reduc_target(z_t, z_tpp, abar_t, abar_tpp)
    # a student predicting x* reaches z_t'' with ONE DDIM step t -> t''
    alpha_t, sigma_t = abar_t.sqrt().view(-1, 1, 1, 1), (1 - abar_t).sqrt().view(-1, 1, 1, 1)
    eps_student = (z_t - alpha_t * x_star) / sigma_t
    torch.testing.assert_close(ddim_step(z_t, eps_student, abar_t, abar_tpp), z_tpp, rtol=1e-4, atol=1e-4)
    assert loss_step_reduc(x_star, z_t, z_tpp, abar_t, abar_tpp).item() == pytest.approx(0.0, abs=1e-8)
    assert loss_step_reduc(x_star + 1.0, z_t, z_tpp, abar_t, abar_tpp).item() == pytest.approx(1.0, rel=1e-5)


def test_step_reduc_target_scalar_by_hand():
    # abar_t = 0.36 (alpha .6, sigma .8), abar_t'' = 0.64 (alpha .8, sigma .6); z_t = 1, z_t'' = 2
    # x* = (2 - 0.75 * 1) / (0.8 - 0.75 * 0.6) = 1.25 / 0.35
    x = step_reduc_target(torch.tensor([[[[1.0]]]]), torch.tensor([[[[2.0]]]]), torch.tensor([0.36]), torch.tensor([0.64]))
    assert x.item() == pytest.approx(1.25 / 0.35, rel=1e-5)


def test_truncated_snr_weight_and_guidance_sampling_and_feature_kd():
    assert truncated_snr_weight(torch.tensor([0.9, 0.5, 0.1])).tolist() == pytest.approx([9.0, 1.0, 1.0])
    g = torch.Generator().manual_seed(0)
    w = torch.tensor([sample_guidance(generator=g) for _ in range(1000)])  # one draw per batch
    assert 2.0 <= w.min() and w.max() <= 14.0 and abs(w.mean().item() - 8.0) < 0.5
    a, b = [torch.ones(2, 3), torch.zeros(4)], [torch.zeros(2, 3), torch.ones(4)]
    assert loss_feature_kd(a, b).item() == pytest.approx(2.0)
    with pytest.raises(ValueError, match="matched"):
        loss_feature_kd(a, b[:1])


def test_diff_weight_by_hand():
    """abar = 0.2, 0.5, 0.9 -> SNR = 0.25, 1, 9."""
    from compress.losses import diff_weight

    abar = torch.tensor([0.2, 0.5, 0.9])
    assert torch.allclose(diff_weight(abar, "eps"), torch.tensor([1.0, 1.0, 1.0]))
    assert torch.allclose(diff_weight(abar, "truncated-snr"), torch.tensor([4.0, 1.0, 1.0]))
    assert torch.allclose(diff_weight(abar, "min-snr-5"), torch.tensor([1.0, 1.0, 5 / 9]))
    with pytest.raises(ValueError, match="kind must be one of"):
        diff_weight(abar, "v")


def test_tiny_vae_losses_by_hand():
    """slimsd compress decoder: L_DecKD, L_Img (L1 or MSE per pixel) and L_EncKD (MSE to s mu)."""
    from compress.losses import loss_decoder_image, loss_decoder_kd, loss_encoder_kd

    a = torch.tensor([[1.0, -1.0], [0.5, 0.0]]).reshape(2, 2, 1, 1)
    b = torch.tensor([[0.0, 1.0], [0.5, 1.0]]).reshape(2, 2, 1, 1)
    # L1 per sample: (1 + 2) / 2 = 1.5 and (0 + 1) / 2 = 0.5 -> 1.0; MSE: (1 + 4) / 2 and (0 + 1) / 2 -> 1.5
    assert loss_decoder_kd(a, b, "l1").item() == pytest.approx(1.0)
    assert loss_decoder_kd(a, b, "mse").item() == pytest.approx(1.5)
    assert loss_decoder_image(a, b, "l1").item() == pytest.approx(1.0)
    with pytest.raises(ValueError, match="norm must be one of"):
        loss_decoder_kd(a, b, "l2")
    # L_EncKD = E ||E_S(x) - s mu||^2: s = 0.5, mu = 2 -> target 1; student 3 -> 4
    assert loss_encoder_kd(torch.full((1, 4, 1, 1), 3.0), torch.full((1, 4, 1, 1), 2.0), 0.5).item() == pytest.approx(4.0)
    # only the student gets gradients
    s, t = a.clone().requires_grad_(), b.clone().requires_grad_()
    (loss_decoder_kd(s, t) + loss_encoder_kd(s, t, 0.7)).backward()
    assert t.grad is None and s.grad.abs().sum() > 0
