"""Closed-form checks of the loss functions and of each strategy's losses on fixed logits."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from conftest import use_fixed_logits
from okdph.data import get_info
from okdph.losses import kd_loss, kd_loss_eps, sigmoid_rampup
from okdph.strategy import build_config, get_strategy

B, C = 6, 5


def closed_form_kd(student, teacher, T, eps=0.0):
    """T² · (1/B) Σ_b Σ_c p_t (log p_t − log p_s), in float64, from the definition."""
    s, t = student.double(), teacher.double()
    p_t = torch.softmax(t / T, dim=1) + eps
    log_p_s = torch.log_softmax(s / T, dim=1)
    return (T * T * (p_t * (p_t.log() - log_p_s)).sum(1).mean()).item()


@pytest.mark.parametrize("T", [1.0, 3.0, 4.0])
def test_kd_loss_matches_definition(T):
    s, t = torch.randn(B, C), torch.randn(B, C)
    assert kd_loss(s, t, T).item() == pytest.approx(closed_form_kd(s, t, T), rel=1e-5)
    # Direction: the teacher weights the KL; swapping the arguments changes the value.
    assert kd_loss(t, s, T).item() != pytest.approx(kd_loss(s, t, T).item(), rel=1e-3)


@pytest.mark.parametrize("shape", [(128, 100), (7, 10), (1000, 10)])
def test_kd_loss_has_the_value_of_torch_kl_div_bit_for_bit(shape):
    """kd_loss spells out F.kl_div(batchmean) (which vmap cannot batch) without changing a bit."""
    s, t = torch.randn(shape), torch.randn(shape)
    expected = F.kl_div(F.log_softmax(s / 4.0, dim=1), F.softmax(t / 4.0, dim=1), reduction="batchmean") * 16.0
    assert torch.equal(kd_loss(s, t, 4.0), expected)


def test_kd_loss_is_zero_for_identical_logits_and_scales_with_T_squared():
    z = torch.randn(B, C)
    assert kd_loss(z, z, 4.0).item() == pytest.approx(0.0, abs=1e-6)
    s, t = torch.randn(B, C), torch.randn(B, C)
    # T² factor: with logits scaled by T the softened distributions are unchanged.
    assert kd_loss(s * 4, t * 4, 4.0).item() == pytest.approx(16 * kd_loss(s, t, 1.0).item(), rel=1e-5)


def test_kd_loss_eps_matches_definition():
    s, t = torch.randn(B, C), torch.randn(B, C)
    assert kd_loss_eps(s, t, 3.0).item() == pytest.approx(closed_form_kd(s, t, 3.0, eps=1e-7), rel=1e-5)


@pytest.mark.parametrize("epoch,value", [(0, 0.0067), (20, 0.060), (40, 0.287), (60, 0.732), (80, 1.0), (200, 1.0)])
def test_sigmoid_rampup_values(epoch, value):
    assert sigmoid_rampup(epoch, 80) == pytest.approx(value, abs=6e-4)


def make(method, num_models=2, fidelity="official", dataset="cifar10", **overrides):
    cls = get_strategy(method)
    config = build_config(cls.Config, {k: str(v) for k, v in overrides.items()})
    return cls(config=config, backbone="resnet32", num_classes=C, num_models=num_models,
               dataset=get_info(dataset), fidelity=fidelity, width=0.125)


def no_gradient(param) -> bool:
    # Stacked logits give the other students an all-zero gradient rather than none.
    return param.grad is None or not param.grad.any()


def run_fixed(strategy, logits, targets):
    use_fixed_logits(strategy, logits)
    images = [torch.zeros(B, 3, 32, 32)] * len(strategy.views())
    heads, losses = strategy.forward_train(images, targets, epoch=0, step=0)
    return heads, losses


def test_base_losses_are_independent_cross_entropies():
    z = [torch.randn(B, C) for _ in range(3)]
    y = torch.randint(0, C, (B,))
    strategy = make("base", num_models=3)
    _, losses = run_fixed(strategy, z, y)
    assert set(losses) == {"ce/student0", "ce/student1", "ce/student2"}
    for k in range(3):
        assert losses[f"ce/student{k}"].item() == pytest.approx(F.cross_entropy(z[k], y).item(), rel=1e-6)


def test_dml_loss_closed_form_and_detached_peers():
    z = [torch.randn(B, C) for _ in range(3)]
    y = torch.randint(0, C, (B,))
    strategy = make("dml", num_models=3)
    _, losses = run_fixed(strategy, z, y)
    for k in range(3):
        expected = sum(closed_form_kd(z[k], z[l], 1.0) for l in range(3) if l != k) / 2
        assert losses[f"kd/student{k}"].item() == pytest.approx(expected, rel=1e-5)
    # Peers are detached: student 1's KD loss sends no gradient to student 0.
    losses["kd/student1"].backward()
    assert no_gradient(strategy.students[0].logits)
    assert strategy.students[1].logits.grad.abs().sum() > 0


def test_kdcl_loss_closed_form():
    z = [torch.randn(B, C) for _ in range(2)]
    y = torch.randint(0, C, (B,))
    strategy = make("kdcl", alpha=0.5, temperature=4.0)
    _, losses = run_fixed(strategy, z, y)
    teacher = (z[0] + z[1]) / 2
    for k in range(2):
        assert losses[f"ce/student{k}"].item() == pytest.approx(0.5 * F.cross_entropy(z[k], y).item(), rel=1e-6)
        assert losses[f"kd/student{k}"].item() == pytest.approx(0.5 * closed_form_kd(z[k], teacher, 4.0), rel=1e-5)
    losses["kd/student0"].backward()
    assert no_gradient(strategy.students[1].logits)  # the ensemble teacher is detached


@pytest.mark.parametrize("fidelity", ["official", "paper"])
def test_okdph_loss_closed_form(fidelity):
    z = [torch.randn(B, C) for _ in range(2)]
    y = torch.randint(0, C, (B,))
    omega, beta = 0.7, 0.6
    strategy = make("okdph", fidelity=fidelity, omega=omega, beta=beta, coefficients="mean")
    heads, losses = run_fixed(strategy, z, y)
    z_h = (z[0] + z[1]) / 2                      # the HWM of fixed-logit students mixes the logits
    assert torch.allclose(heads["hwm"], z_h, atol=1e-6)
    teacher = (z[0] + z[1] + z_h) / 3            # Eq. (6): students and HWM, HWM included
    assert losses["ce/hwm"].item() == pytest.approx((1 - omega) * F.cross_entropy(z_h, y).item(), rel=1e-5)
    for k in range(2):
        assert losses[f"ce/student{k}"].item() == pytest.approx(omega * F.cross_entropy(z[k], y).item(), rel=1e-5)
        assert losses[f"kd/student{k}"].item() == pytest.approx(beta * closed_form_kd(z[k], teacher, 4.0), rel=1e-5)


def test_okdph_hwm_loss_reaches_students_only_in_paper_fidelity():
    z = [torch.randn(B, C) for _ in range(2)]
    y = torch.randint(0, C, (B,))
    for fidelity, reaches in (("official", False), ("paper", True)):
        strategy = make("okdph", fidelity=fidelity, omega=0.5, coefficients="mean")
        _, losses = run_fixed(strategy, z, y)
        if not losses["ce/hwm"].requires_grad:
            assert not reaches
            continue
        losses["ce/hwm"].backward()
        z_h = ((z[0] + z[1]) / 2).requires_grad_()
        (0.5 * F.cross_entropy(z_h, y)).backward()
        for student in strategy.students:
            assert torch.allclose(student.logits.grad, 0.5 * z_h.grad, atol=1e-7)  # r_j ∇L_h, r_j = 1/2
        assert reaches


def test_okdph_paper_fidelity_samples_dirichlet_coefficients():
    strategy = make("okdph", fidelity="paper")
    draws = torch.stack([strategy._coefficients("cpu", torch.float32) for _ in range(2000)])
    assert torch.allclose(draws.sum(1), torch.ones(2000))
    # Dir(1, 1): the first weight is uniform on [0, 1].
    assert draws[:, 0].mean().item() == pytest.approx(0.5, abs=0.03)
    assert draws[:, 0].var().item() == pytest.approx(1 / 12, abs=0.01)
    assert make("okdph", fidelity="official")._coefficients("cpu", torch.float32).tolist() == [0.5, 0.5]


def test_temperature_defaults_follow_the_official_code():
    assert make("okdph").config.temperature == 4.0
    assert make("kdcl").config.temperature == 4.0
    assert make("dml").config.temperature == 1.0
    assert math.isclose(make("okdph").config.omega, 0.8)
