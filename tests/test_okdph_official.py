"""The OKDPH strategy on the reference engine against a direct transcription of the official loop.

The official training step (src/OKDPH.py, docs/methods.md#okdph) rebuilds the HWM from the students'
state, runs every model on its own view, then for each student in turn: zero_grad, backward of
ω·CE + (1−ω)·CE_hwm + β·KD, step, and at batch-level fusion batches fuses that student at once.
The engine instead takes one joint backward and steps every student, then fuses. Both must agree.
"""
from __future__ import annotations

import copy

import torch
import torch.nn.functional as F

from okdph.data import get_info
from okdph.engine.reference import train_one_epoch
from okdph.okdph import OKDPH
from okdph.strategy import build_config


def official_epoch(students, hwm, optimizers, batches, omega, beta, gamma, T, gap):
    """The official per-batch algorithm written out with plain modules (our wording)."""
    n = len(students)
    for step, (views, y) in enumerate(batches):
        with torch.no_grad():  # update_hwm: mean of the students' state dicts, loaded into the HWM
            mixed = None
            for net in students:
                part = {k: v * (1.0 / n) for k, v in net.state_dict().items()}
                mixed = part if mixed is None else {k: part[k] + mixed[k] for k in part}
            hwm.load_state_dict(mixed)
        outs = [net(views[:, i]) for i, net in enumerate(students + [hwm])]
        teacher = torch.stack(outs).mean(dim=0).detach()
        loss_hwm = F.cross_entropy(outs[-1], y)
        for i, net in enumerate(students):
            kd = F.kl_div(F.log_softmax(outs[i] / T, 1), F.softmax(teacher / T, 1), reduction="batchmean") * T * T
            loss = omega * F.cross_entropy(outs[i], y) + (1 - omega) * loss_hwm + beta * kd
            optimizers[i].zero_grad()
            loss.backward(retain_graph=True)
            optimizers[i].step()
            if step % gap == 0:
                with torch.no_grad():
                    for k, v in net.state_dict().items():
                        target = hwm.state_dict()[k]
                        v.copy_((target * gamma + v * (1.0 - gamma)) if v.is_floating_point()
                                else (target.float() * gamma + v.float() * (1.0 - gamma)).to(v.dtype))


def run_both(num_models: int, dtype: torch.dtype, hp: dict):
    """The official loop and the engine's epoch from the same networks on the same batches."""
    torch.manual_seed(0)
    config = build_config(OKDPH.Config, {k: str(v) for k, v in hp.items()})
    strategy = OKDPH(config=config, backbone="resnet32", num_classes=10, num_models=num_models,
                     dataset=get_info("cifar10"), fidelity="official", width=0.125).to(dtype)
    students = [copy.deepcopy(s) for s in strategy.students]
    hwm = copy.deepcopy(strategy.hwm).requires_grad_(True)  # official: the HWM has grads, unused

    def sgd(params):
        return torch.optim.SGD(params, lr=0.1, momentum=0.9, weight_decay=5e-4)

    views = num_models + 1
    batches = [(torch.randn(8, views, 3, 32, 32, dtype=dtype), torch.randint(0, 10, (8,))) for _ in range(5)]
    batches.append((torch.randn(3, views, 3, 32, 32, dtype=dtype), torch.randint(0, 10, (3,))))  # partial last
    official_epoch(students, hwm, [sgd(s.parameters()) for s in students], batches,
                   hp["omega"], hp["beta"], hp["gamma"], 4.0, gap=int(hp["interval"][:-1]))
    optimizers = [sgd(g.params) for g in strategy.optimizer_groups()]
    train_one_epoch(strategy, batches, optimizers, epoch=0, device="cpu")
    return list(strategy.students) + [strategy.hwm], students + [hwm]


def test_engine_step_equals_the_official_sequential_loop():
    ours, theirs = run_both(2, torch.float32, dict(omega=0.7, beta=0.6, gamma=0.5, interval="2b"))
    for mine, official in zip(ours, theirs):
        for (name, a), b in zip(mine.state_dict().items(), official.state_dict().values()):
            assert torch.allclose(a.float(), b.float(), rtol=1e-5, atol=1e-6), name


def test_three_students_in_float64_mix_with_the_official_1_over_n():
    """1/3 as a float32 coefficient drifts from the official Python-float mean by ~1e-8 relative per
    step; in float64 the engine must follow the official formula to rounding."""
    ours, theirs = run_both(3, torch.float64, dict(omega=0.7, beta=0.6, gamma=0.5, interval="1b"))
    for mine, official in zip(ours, theirs):
        for (name, a), b in zip(mine.state_dict().items(), official.state_dict().values()):
            assert torch.allclose(a.double(), b.double(), rtol=1e-11, atol=1e-13), name
