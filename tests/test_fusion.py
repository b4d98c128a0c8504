"""Property tests of OKDPH's parameter hybridization and fusion (docs/methods.md#okdph,
docs/verification.md#fusion-properties)."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from okdph.data import get_info
from okdph.okdph import OKDPH, dirichlet_coefficients, fuse_, hybrid_state
from okdph.strategy import build_config

SHAPES = {"conv.weight": (4, 3, 3, 3), "bn.weight": (4,), "bn.running_mean": (4,), "bn.running_var": (4,)}


def random_state(gen: torch.Generator) -> dict[str, torch.Tensor]:
    state = {k: torch.randn(shape, generator=gen) for k, shape in SHAPES.items()}
    state["bn.num_batches_tracked"] = torch.randint(0, 1000, (), generator=gen)
    return state


seeds = st.integers(0, 2**31 - 1)
counts = st.integers(2, 5)


@settings(max_examples=50, deadline=None)
@given(n=counts, seed=seeds)
def test_dirichlet_coefficients_lie_on_the_simplex(n, seed):
    r = dirichlet_coefficients(n, "cpu", torch.Generator().manual_seed(seed))
    assert r.shape == (n,)
    assert (r >= 0).all()
    assert r.sum().item() == pytest.approx(1.0, abs=1e-6)


@settings(max_examples=50, deadline=None)
@given(n=counts, seed=seeds)
def test_hybrid_of_identical_students_is_the_student(n, seed):
    gen = torch.Generator().manual_seed(seed)
    state = random_state(gen)
    for r in (torch.full((n,), 1.0 / n), dirichlet_coefficients(n, "cpu", gen)):
        mixed = hybrid_state([state] * n, r)
        for key, value in state.items():
            if value.is_floating_point():
                assert torch.allclose(mixed[key], value, rtol=1e-5, atol=1e-6)
            else:  # the count is mixed as a float and truncated, as load_state_dict does
                assert abs(int(mixed[key]) - int(value)) <= 1


@settings(max_examples=50, deadline=None)
@given(n=counts, seed=seeds)
def test_mean_hybrid_is_permutation_invariant_and_averages_buffers(n, seed):
    gen = torch.Generator().manual_seed(seed)
    states = [random_state(gen) for _ in range(n)]
    r = torch.full((n,), 1.0 / n)
    mixed = hybrid_state(states, r)
    perm = torch.randperm(n, generator=gen).tolist()
    permuted = hybrid_state([states[i] for i in perm], r)
    for key in SHAPES:
        assert torch.allclose(mixed[key], permuted[key], rtol=1e-6, atol=1e-6)
        expected = torch.stack([s[key].double() for s in states]).mean(0).float()
        assert torch.allclose(mixed[key], expected, rtol=1e-5, atol=1e-6)  # running stats too
    expected_count = int(sum(float(s["bn.num_batches_tracked"]) / n for s in states))
    assert abs(int(mixed["bn.num_batches_tracked"]) - expected_count) <= 1
    assert mixed["bn.num_batches_tracked"].dtype == torch.int64


def test_hybrid_with_two_students_matches_official_accumulation_bitwise():
    gen = torch.Generator().manual_seed(3)
    a, b = random_state(gen), random_state(gen)
    mixed = hybrid_state([a, b], torch.full((2,), 0.5))
    for key in SHAPES:
        assert torch.equal(mixed[key], b[key] * 0.5 + a[key] * 0.5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_counters_mix_in_float32_as_the_official_code_does(dtype):
    # The official update_hwm multiplies each int64 counter by the Python float 1/N and sums: float32
    # arithmetic, whatever the networks' type; three counters of 7 give 7.0000005 there, and 7 once
    # truncated. In float64 the same sum is 6.999... and truncates to 6.
    gen = torch.Generator().manual_seed(0)
    states = [random_state(gen) for _ in range(3)]
    for state in states:
        state["bn.num_batches_tracked"] = torch.tensor(7)
    official = None
    for state in states:
        term = state["bn.num_batches_tracked"] * (1.0 / 3)
        official = term if official is None else term + official
    assert official.dtype == torch.float32 and int(official) == 7
    mixed = hybrid_state(states, torch.full((3,), 1.0 / 3, dtype=dtype))
    assert mixed["bn.num_batches_tracked"].dtype == torch.int64
    assert int(mixed["bn.num_batches_tracked"]) == 7


@settings(max_examples=60, deadline=None)
@given(gamma=st.floats(0.0, 1.0), seed=seeds)
def test_fusion_is_identity_copy_or_convex_combination(gamma, seed):
    gen = torch.Generator().manual_seed(seed)
    student, hwm = random_state(gen), random_state(gen)
    before = {k: v.clone() for k, v in student.items()}
    fuse_(student, hwm, gamma)
    for key in SHAPES:
        if gamma == 0.0:
            assert torch.equal(student[key], before[key])
        elif gamma == 1.0:
            assert torch.equal(student[key], hwm[key])
        else:
            assert torch.equal(student[key], hwm[key] * gamma + before[key] * (1 - gamma))
            lo, hi = torch.minimum(before[key], hwm[key]), torch.maximum(before[key], hwm[key])
            assert ((student[key] >= lo - 1e-6) & (student[key] <= hi + 1e-6)).all()


# ---- the strategy: fusion timing, BN buffers, gradients --------------------------------------------


def make_okdph(fidelity="official", students=2, **overrides):
    config = build_config(OKDPH.Config, {k: str(v) for k, v in overrides.items()})
    return OKDPH(config=config, backbone="resnet32", num_classes=10, num_models=students,
                 dataset=get_info("cifar10"), fidelity=fidelity, width=0.125)


def flat(module: nn.Module) -> torch.Tensor:
    return torch.cat([v.float().flatten() for v in module.state_dict().values()])


def test_students_start_identical_and_the_hwm_equals_them():
    strategy = make_okdph(students=3)
    assert torch.equal(flat(strategy.students[0]), flat(strategy.students[1]))
    assert torch.equal(flat(strategy.students[0]), flat(strategy.hwm))
    assert not any(p.requires_grad for p in strategy.hwm.parameters())


def test_hwm_bn_buffers_are_averaged_then_updated_once_by_its_own_forward():
    strategy = make_okdph(same_init="false").train()
    key = "trunk.bn1.running_mean"
    with torch.no_grad():
        for student in strategy.students:
            student.get_buffer(key).normal_()
    x = [torch.randn(4, 3, 32, 32) for _ in range(3)]
    y = torch.randint(0, 10, (4,))
    before = [copy.deepcopy(s.state_dict()) for s in strategy.students]
    strategy.forward_train(x, y, epoch=0, step=0)
    # Averaged, then one momentum-0.1 update from the HWM's own batch (its view, x[2]).
    mean = (before[0][key] + before[1][key]) / 2
    stem = strategy.hwm.trunk.conv1(x[2])
    expected = 0.9 * mean + 0.1 * stem.mean(dim=(0, 2, 3))
    assert torch.allclose(strategy.hwm.get_buffer(key), expected, atol=1e-6)


@pytest.mark.parametrize("interval,steps,fused", [("5b", range(12), [0, 5, 10]), ("1b", range(3), [0, 1, 2]),
                                                  ("none", range(6), [])])
def test_batch_level_fusion_runs_at_batch_indices_0_N_2N(interval, steps, fused):
    strategy = make_okdph(interval=interval, gamma=1.0, same_init="false")
    seen = []
    for step in steps:
        strategy.hwm.load_state_dict(hybrid_state([s.state_dict() for s in strategy.students], torch.full((2,), 0.5)))
        with torch.no_grad():
            strategy.students[0].head.classifier.weight.add_(1.0)  # stands in for an optimizer step
        strategy.after_step(epoch=0, step=step)
        if torch.equal(flat(strategy.students[0]), flat(strategy.hwm)):
            seen.append(step)
    assert seen == fused


@pytest.mark.parametrize("interval,fused", [("1e", [0, 1, 2, 3, 4, 5, 6]), ("3e", [0, 3, 6]), ("5b", [])])
def test_epoch_level_fusion_runs_from_epoch_0(interval, fused):
    strategy = make_okdph(interval=interval, gamma=1.0, same_init="false")
    seen = []
    for epoch in range(7):
        with torch.no_grad():
            strategy.students[0].head.classifier.weight.add_(1.0)
        strategy.after_epoch(epoch=epoch)
        if torch.equal(flat(strategy.students[0]), flat(strategy.hwm)):
            seen.append(epoch)
    assert seen == fused


def test_paper_fidelity_hwm_gradient_is_r_j_times_the_hwm_gradient():
    strategy = make_okdph(fidelity="paper", omega=0.0, beta=0.0, same_init="false").train()
    x = [torch.randn(4, 3, 32, 32) for _ in range(3)]
    y = torch.randint(0, 10, (4,))
    r = torch.tensor([0.3, 0.7])
    strategy._coefficients = lambda device, dtype: r
    states = [copy.deepcopy(s.state_dict()) for s in strategy.students]
    _, losses = strategy.forward_train(x, y, epoch=0, step=0)
    sum(losses.values()).backward()

    hwm = copy.deepcopy(strategy.hwm).requires_grad_(True)
    hwm.load_state_dict(hybrid_state(states, r))
    F.cross_entropy(hwm.train()(x[2]), y).backward()  # (1 − ω) = 1
    for j, student in enumerate(strategy.students):
        for (name, p), q in zip(student.named_parameters(), hwm.parameters()):
            assert torch.allclose(p.grad, r[j] * q.grad, rtol=1e-4, atol=1e-6), name


def test_official_fidelity_students_get_no_gradient_from_the_hwm_loss():
    strategy = make_okdph(fidelity="official", omega=0.0, beta=0.0).train()
    x = [torch.randn(4, 3, 32, 32) for _ in range(3)]
    _, losses = strategy.forward_train(x, torch.randint(0, 10, (4,)), epoch=0, step=0)
    sum(losses.values()).backward()
    for student in strategy.students:
        assert all(p.grad is None or not p.grad.any() for p in student.parameters())
