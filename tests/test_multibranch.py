"""The multi-branch baselines ONE, OKDDip, FFL and PCL (docs/methods.md#one, docs/methods.md#okddip,
docs/methods.md#ffl, docs/methods.md#pcl, docs/methods.md#quirks-of-the-official-code).

Parameter counts at full width against docs/methods.md#parameter-counts (construction only),
closed-form losses on fixed logits in both fidelities, structural properties on tiny models, and
(slow) one real deterministic run per method on the embedded digits data.
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.optim.lr_scheduler import MultiStepLR

from baselines.one import gated_ensemble
from baselines.okddip import attention_targets
from baselines.pcl import official_rampup
from okdph.data import get_info
from okdph.losses import kd_loss, kd_loss_eps
from okdph.strategy import build_config, get_strategy
from test_losses import closed_form_kd

from conftest import train_with_pinned_kernels

B, C = 6, 5
FIDELITIES = ["official", "paper"]


def make(method, num_models=2, fidelity="official", backbone="resnet32", width=0.125, num_classes=C,
         dataset="cifar10", **overrides):
    cls = get_strategy(method)
    config = build_config(cls.Config, {k: str(v) for k, v in overrides.items()})
    return cls(config=config, backbone=backbone, num_classes=num_classes, num_models=num_models,
               dataset=get_info(dataset), fidelity=fidelity, width=width)


def n_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def ramp(epoch: int) -> float:
    return math.exp(-5.0 * (1.0 - min(epoch, 80) / 80) ** 2)


def no_grad(grad) -> bool:
    return grad is None or not grad.any()


IMAGES = [torch.zeros(B, 3, 32, 32)]


# --------------------------------------------------------------------------------------------------
# Parameter counts (docs/methods.md#parameter-counts): two-branch models on CIFAR-100 (PCL DenseNet:
# three branches)

TABLE = {
    #                 ONE          OKDDip       PCL (S)      FFL network + fusion module
    "resnet32": (832_990, 833_944, 845_820, (832_920, 16_228)),
    "resnet110": (2_066_718, 2_082_840, 2_117_756, (2_066_456, 162_916)),
    "wrn20_8": (12_112_926, 12_129_048, 12_163_964, (435_096, 162_916)),  # FFL: the thin variant
    "vgg16": (22_959_886, 23_024_392, 23_061_356, (22_382_244, 587_876)),  # FFL: shared classifier
    "densenet40_12": (201_782, 205_880, 371_488, (201_656, 51_316)),       # shared block 3 but PCL
}


@pytest.mark.parametrize("backbone", list(TABLE))
def test_official_parameter_counts_match_the_methods_table(backbone):
    one, okddip, pcl, ffl = TABLE[backbone]
    full = dict(backbone=backbone, width=1.0, num_classes=100, dataset="cifar100")
    assert n_params(make("one", **full)) == one
    assert n_params(make("okddip", **full)) == okddip
    strategy = make("pcl", num_models=3 if backbone == "densenet40_12" else 2, **full)
    assert n_params(strategy.student) == pcl
    assert n_params(strategy.mean) == pcl  # the temporal mean is a second copy of the student
    strategy = make("ffl", **full)
    assert (n_params(strategy.net), n_params(strategy.fusion)) == ffl


def test_paper_fidelity_restores_the_architectures_the_official_code_breaks():
    full = dict(width=1.0, num_classes=100, dataset="cifar100", fidelity="paper")
    block3, one_branch = 58_680, 5_241_444  # DenseNet block 3; WRN-20-8 layer3 + fc
    # Independent DenseNet blocks: one more block 3 per extra branch.
    assert n_params(make("one", backbone="densenet40_12", **full)) == TABLE["densenet40_12"][0] + block3
    assert n_params(make("okddip", backbone="densenet40_12", **full)) == TABLE["densenet40_12"][1] + block3
    assert n_params(make("ffl", backbone="densenet40_12", **full).net) == TABLE["densenet40_12"][3][0] + block3
    # The real WRN-20-8 for FFL: trunk + two branches, as ONE's network without the gate.
    assert n_params(make("ffl", backbone="wrn20_8", **full).net) == 1_629_776 + 2 * one_branch


def test_shared_modules_follow_the_fidelity():
    for method in ("one", "okddip", "ffl"):
        official = make(method, backbone="densenet40_12").net.branches
        paper = make(method, backbone="densenet40_12", fidelity="paper").net.branches
        assert official[0].last_stage is official[1].last_stage
        assert official[0].head is not official[1].head  # own final BN and classifier
        assert paper[0].last_stage is not paper[1].last_stage
    official = make("ffl", backbone="vgg16").net.branches
    paper = make("ffl", backbone="vgg16", fidelity="paper").net.branches
    assert official[0].head is official[1].head and paper[0].head is not paper[1].head
    assert official[0].last_stage is not official[1].last_stage


def test_ffl_official_densenet_fusion_input_is_the_post_relu_map():
    # densenet_ffl.py keeps the map after norm_final, then applies an in-place ReLU to that same
    # tensor: the fusion module receives ReLU(BN(block 3)), not the pre-ReLU map.
    strategy = make("ffl", backbone="densenet40_12").train()
    seen = []
    strategy.fusion.register_forward_pre_hook(lambda module, args: seen.append(args[0]))
    x = torch.randn(B, 3, 32, 32)
    strategy._forward(x)
    branch = strategy.net.branches[0]
    pre_relu = branch.head.norm_final(branch.last_stage(strategy.net.trunk(x)))
    assert (pre_relu < 0).any()  # so the ReLU changes something
    assert len(seen[0]) == 2 and all((m >= 0).all() for m in seen[0])
    assert torch.allclose(seen[0][0], F.relu(pre_relu))


def test_vgg_head_dropout_per_method():
    for method, p in (("one", 0.5), ("okddip", 0.5), ("ffl", 0.0), ("pcl", 0.0)):
        strategy = make(method, backbone="vgg16")
        net = strategy.student.net if method == "pcl" else strategy.net
        rates = {m.p for branch in net.branches for m in branch.head.modules() if isinstance(m, nn.Dropout)}
        assert rates == {p}, method


def test_ffl_official_conv_init_quirk():
    for backbone, std in (("resnet32", math.sqrt(2 / 5)), ("wrn20_8", 1.0)):
        conv = make("ffl", backbone=backbone, width=1.0).net.branches[1].last_stage[1].conv2
        assert conv.weight.std().item() == pytest.approx(std, rel=0.05)
        paper = make("ffl", backbone=backbone, width=1.0, fidelity="paper").net.branches[1].last_stage[1].conv2
        assert paper.weight.std().item() < 0.2  # He fan-out init, as the backbone's own


def test_pcl_branches_official_identical_classifiers_and_no_densenet_final_bn():
    official = make("pcl", num_models=3).student.net.branches
    paper = make("pcl", num_models=3, fidelity="paper").student.net.branches
    assert torch.equal(official[0].head.classifier.weight, official[2].head.classifier.weight)
    assert not torch.equal(official[0].last_stage[0].conv1.weight, official[2].last_stage[0].conv1.weight)
    assert not torch.equal(paper[0].head.classifier.weight, paper[2].head.classifier.weight)
    vgg = make("pcl", backbone="vgg16").student.net.branches  # VGG's init loop re-draws its Linears
    assert not torch.equal(vgg[0].head.classifier[0].weight, vgg[1].head.classifier[0].weight)
    for fidelity in FIDELITIES:
        densenet = make("pcl", backbone="densenet40_12", fidelity=fidelity).student.net.branches
        assert all(isinstance(b.head.norm_final, nn.Identity) for b in densenet)


# --------------------------------------------------------------------------------------------------
# Heads, views and optimizer groups on tiny models


@pytest.mark.parametrize("method,heads", [
    ("one", {"official": ["branch0", "branch1", "branch2", "branch_mean"],
             "paper": ["branch0", "branch1", "branch2", "branch_mean", "gate"]}),
    ("okddip", {"official": ["peer0", "peer1", "leader", "peer_mean"],
                "paper": ["peer0", "peer1", "leader", "peer_mean"]}),
    ("ffl", {"official": ["branch0", "branch1", "branch2", "fused"],
             "paper": ["branch0", "branch1", "branch2", "fused"]}),
    ("pcl", {"official": ["mean0", "mean1", "mean2"],
             "paper": ["branch0", "branch1", "branch2", "ensemble", "mean0", "mean1", "mean2"]}),
])
@pytest.mark.parametrize("fidelity", FIDELITIES)
def test_heads_views_and_one_training_step(method, heads, fidelity):
    strategy = make(method, num_models=3, fidelity=fidelity)
    views = strategy.views()
    assert len(views) == (3 if method == "pcl" else 1)  # PCL: a view per branch; the rest share one
    images = [torch.randn(4, 3, 32, 32) for _ in views]
    targets = torch.randint(0, C, (4,))
    strategy.train()
    train_heads, losses = strategy.forward_train(images, targets, epoch=100, step=0)
    sum(losses.values()).backward()
    assert all(v.shape == (4, C) for v in train_heads.values())
    assert all(torch.isfinite(v) and v.dim() == 0 for v in losses.values())
    assert strategy.head_names() == heads[fidelity]
    assert strategy.deployed_head in heads[fidelity]
    strategy.eval()
    with torch.inference_mode():
        evaluated = strategy.eval_heads(images[0])
    assert list(evaluated) == heads[fidelity]
    # Every trainable parameter is in exactly one optimizer group and gets a gradient.
    groups = strategy.optimizer_groups()
    grouped = [p for g in groups for p in g.params]
    assert len(grouped) == len({id(p) for p in grouped})
    assert {id(p) for p in grouped} == {id(p) for p in strategy.parameters() if p.requires_grad}
    assert all(p.grad is not None for p in grouped)


def test_one_gate_rows_sum_to_one():
    strategy = make("one", num_models=3)
    strategy.train()
    gate = strategy.gate(strategy.net.trunk(torch.randn(4, 3, 32, 32)))
    assert gate.shape == (4, 3) and (gate >= 0).all()
    assert torch.allclose(gate.sum(dim=1), torch.ones(4), atol=1e-6)


@pytest.mark.parametrize("fidelity", FIDELITIES)
def test_okddip_attention_rows_sum_to_one(fidelity):
    strategy = make("okddip", num_models=4, fidelity=fidelity)
    strategy.train()
    peer_logits, attention, leader = strategy._forward(torch.randn(4, 3, 32, 32))
    assert peer_logits.shape == (3, 4, C) and attention.shape == (4, 3, 3) and leader.shape == (4, C)
    assert torch.allclose(attention.sum(dim=-1), torch.ones(4, 3), atol=1e-6)


def test_okddip_with_one_peer_has_attention_identically_one():
    strategy = make("okddip", num_models=2)
    strategy.train()
    peer_logits, attention, _ = strategy._forward(torch.randn(4, 3, 32, 32))
    assert torch.equal(attention, torch.ones(4, 1, 1))
    assert torch.equal(attention_targets(attention, peer_logits), peer_logits)  # t_0 = z_0


def test_okddip_official_densenet_peer_set_holds_the_leader_branch():
    official = make("okddip", backbone="densenet40_12")
    paper = make("okddip", backbone="densenet40_12", fidelity="paper")
    x = torch.randn(4, 3, 32, 32)
    for strategy in (official, paper):
        strategy.eval()
    with torch.no_grad():
        peers, attention, leader = official._forward(x)
        assert peers.shape == (2, 4, C) and attention.shape == (4, 2, 2)  # peer 0 and z'_1
        t = official.net.trunk(x)
        z1 = official.net.branches[1](t)[1]  # the leader branch's BN-ReLU path
        assert torch.allclose(peers[1], z1, atol=1e-6) and not torch.allclose(leader, z1, atol=1e-3)
        peers, attention, leader = paper._forward(x)
        assert peers.shape == (1, 4, C) and attention.shape == (4, 1, 1)
        assert torch.allclose(leader, paper.net.branches[1](paper.net.trunk(x))[1], atol=1e-6)


# --------------------------------------------------------------------------------------------------
# Closed-form losses on fixed logits (T = 3 everywhere)


@pytest.mark.parametrize("fidelity", FIDELITIES)
def test_one_loss_closed_form_and_teacher_gradient(fidelity):
    z = torch.randn(3, B, C, requires_grad=True)
    gate_logits = torch.randn(B, 3, requires_grad=True)
    y = torch.randint(0, C, (B,))
    strategy = make("one", num_models=3, fidelity=fidelity, alpha=0.5)
    strategy._forward = lambda x: (z, gated_ensemble(z, gate_logits.softmax(dim=1)))
    heads, losses = strategy.forward_train(IMAGES, y, epoch=40, step=0)

    g = gate_logits.softmax(dim=1).detach()
    x_m = sum(g[:, i:i + 1] * z[i].detach() for i in range(3))
    official = fidelity == "official"
    eps = 1e-7 if official else 0.0
    assert strategy.kd is (kd_loss_eps if official else kd_loss)
    assert strategy.kd_weight(40) == pytest.approx(0.5 * 0.2865, abs=1e-4)
    assert losses["ce/gate"].item() == pytest.approx(F.cross_entropy(x_m, y).item(), rel=1e-5)
    for i in range(3):
        assert losses[f"ce/branch{i}"].item() == pytest.approx(F.cross_entropy(z[i], y).item(), rel=1e-6)
        expected = 0.5 * ramp(40) * closed_form_kd(z[i], x_m, 3.0, eps=eps)
        assert losses[f"kd/branch{i}"].item() == pytest.approx(expected, rel=1e-5)
    assert torch.allclose(heads["branch_mean"], z.mean(dim=0))
    assert ("gate" in heads) == (not official)

    # Official: KL gradients reach the gate and the other branches through x_m; paper: detached.
    grad_z, grad_gate = torch.autograd.grad(losses["kd/branch0"], [z, gate_logits], allow_unused=True)
    assert grad_z[0].abs().sum() > 0
    assert no_grad(grad_gate) != official
    assert no_grad(grad_z[1]) != official


@pytest.mark.parametrize("fidelity", FIDELITIES)
def test_okddip_loss_closed_form_and_gradients(fidelity):
    z = torch.randn(2, B, C, requires_grad=True)       # two peers
    leader = torch.randn(B, C, requires_grad=True)
    energy = torch.randn(B, 2, 2, requires_grad=True)  # stands in for q_i · k_j
    y = torch.randint(0, C, (B,))
    strategy = make("okddip", num_models=3, fidelity=fidelity)
    strategy._forward = lambda x: (z, energy.softmax(dim=-1), leader)
    heads, losses = strategy.forward_train(IMAGES, y, epoch=60, step=0)

    eps = 1e-7 if fidelity == "official" else 0.0
    a = energy.softmax(dim=-1).detach()
    w = ramp(60)
    assert w == pytest.approx(0.732, abs=1e-3) and strategy.kd_weight(60) == pytest.approx(w)
    for i in range(2):
        target = a[:, i, 0:1] * z[0].detach() + a[:, i, 1:2] * z[1].detach()
        expected = w * closed_form_kd(z[i], target, 3.0, eps=eps)
        assert losses[f"kd/peer{i}"].item() == pytest.approx(expected, rel=1e-5)
        assert losses[f"ce/peer{i}"].item() == pytest.approx(F.cross_entropy(z[i], y).item(), rel=1e-6)
    peer_mean = z.detach().mean(dim=0)
    expected = w * closed_form_kd(leader, peer_mean, 3.0, eps=eps)
    assert losses["kd/leader"].item() == pytest.approx(expected, rel=1e-5)
    assert losses["ce/leader"].item() == pytest.approx(F.cross_entropy(leader, y).item(), rel=1e-6)
    assert set(losses) == {"ce/peer0", "ce/peer1", "kd/peer0", "kd/peer1", "ce/leader", "kd/leader"}
    assert torch.allclose(heads["peer_mean"], peer_mean)

    # Not detached in either fidelity: the attention learns only through the targets, and the
    # leader's KD pulls on the peers.
    grad_z, grad_energy = torch.autograd.grad(losses["kd/peer0"], [z, energy])
    assert grad_z[1].abs().sum() > 0 and grad_energy.abs().sum() > 0
    (grad_z,) = torch.autograd.grad(losses["kd/leader"], [z])
    assert grad_z.abs().sum() > 0


@pytest.mark.parametrize("fidelity", FIDELITIES)
def test_ffl_loss_closed_form_and_detached_teachers(fidelity):
    z = torch.randn(2, B, C, requires_grad=True)
    fused = torch.randn(B, C, requires_grad=True)
    y = torch.randint(0, C, (B,))
    strategy = make("ffl", fidelity=fidelity)
    strategy._forward = lambda x: (z, fused)
    heads, losses = strategy.forward_train(IMAGES, y, epoch=20, step=0)

    eps = 1e-7 if fidelity == "official" else 0.0
    w = ramp(20)
    assert w == pytest.approx(0.060, abs=1e-3) and strategy.kd_weight(20) == pytest.approx(w)
    for b in range(2):
        expected = w * closed_form_kd(z[b], fused, 3.0, eps=eps)
        assert losses[f"kd/branch{b}"].item() == pytest.approx(expected, rel=1e-5)
        assert losses[f"ce/branch{b}"].item() == pytest.approx(F.cross_entropy(z[b], y).item(), rel=1e-6)
    mean = z.detach().mean(dim=0)
    assert losses["kd/fused"].item() == pytest.approx(w * closed_form_kd(fused, mean, 3.0, eps=eps), rel=1e-5)
    assert losses["ce/fused"].item() == pytest.approx(F.cross_entropy(fused, y).item(), rel=1e-6)
    assert list(heads) == ["branch0", "branch1", "fused"]

    grad_z, grad_fused = torch.autograd.grad(losses["kd/branch0"], [z, fused], allow_unused=True)
    assert grad_z[0].abs().sum() > 0 and no_grad(grad_fused)
    grad_z, grad_fused = torch.autograd.grad(losses["kd/fused"], [z, fused], allow_unused=True)
    assert no_grad(grad_z) and grad_fused.abs().sum() > 0


class FixedOutputs(nn.Module):
    """Stands in for PCL's student or temporal mean: returns fixed (branch logits, ensemble logits)."""

    def __init__(self, logits, ensemble):
        super().__init__()
        self.logits, self.ensemble_logits = logits, ensemble

    def forward(self, views):
        return self.logits, self.ensemble_logits


@pytest.mark.parametrize("fidelity,epoch,weight", [("official", 1, 1.0), ("official", 40, 0.0),
                                                   ("paper", 40, 0.2865), ("paper", 1, 0.0076)])
def test_pcl_loss_closed_form_and_ramp(fidelity, epoch, weight):
    z = torch.randn(3, B, C, requires_grad=True)
    ensemble = torch.randn(B, C, requires_grad=True)
    mean = torch.randn(3, B, C)
    y = torch.randint(0, C, (B,))
    strategy = make("pcl", num_models=3, fidelity=fidelity)
    assert strategy.kd_weight(epoch) == pytest.approx(weight, abs=1e-4)
    strategy.student = FixedOutputs(z, ensemble)
    strategy.mean = FixedOutputs(mean, None)
    _, losses = strategy.forward_train(IMAGES * 3, y, epoch=epoch, step=0)

    r = strategy.kd_weight(epoch)
    assert losses["ce/ensemble"].item() == pytest.approx(F.cross_entropy(ensemble, y).item(), rel=1e-6)
    for b in range(3):
        assert losses[f"ce/branch{b}"].item() == pytest.approx(F.cross_entropy(z[b], y).item(), rel=1e-6)
        expected = r * closed_form_kd(z[b], ensemble, 3.0)
        assert losses[f"kd/branch{b}"].item() == pytest.approx(expected, rel=1e-5, abs=1e-12)
        peer_mean = sum(closed_form_kd(z[b], mean[j], 3.0) for j in range(3) if j != b) / 2
        assert losses[f"pm/branch{b}"].item() == pytest.approx(r * peer_mean, rel=1e-5, abs=1e-12)
    if r > 0:  # the peer-ensemble teacher is detached; each branch sees only its own logits
        grad_z, grad_en = torch.autograd.grad(losses["kd/branch0"] + losses["pm/branch0"], [z, ensemble],
                                              allow_unused=True)
        assert grad_z[0].abs().sum() > 0 and no_grad(grad_z[1]) and no_grad(grad_en)


def test_pcl_official_rampup_is_the_lambda_one_bug():
    assert official_rampup(0) == pytest.approx(0.0067, abs=1e-4)
    assert official_rampup(1) == 1.0
    assert official_rampup(2) == pytest.approx(0.0067, abs=1e-4)
    assert official_rampup(3) < 1e-8 and official_rampup(80) == 0.0
    assert official_rampup(81) == 1.0 and official_rampup(299) == 1.0


def test_pcl_each_branch_sees_its_own_view():
    strategy = make("pcl")
    strategy.train()
    x0, x1 = torch.randn(4, 3, 32, 32), torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        first, _ = strategy.forward_train([x0, x1], torch.zeros(4, dtype=torch.long), epoch=0, step=0)
        second, _ = strategy.forward_train([x0, x1.flip(0)], torch.zeros(4, dtype=torch.long), epoch=0, step=0)
    assert torch.allclose(first["branch0"], second["branch0"], atol=1e-6)
    assert not torch.allclose(first["branch1"], second["branch1"], atol=1e-3)


# --------------------------------------------------------------------------------------------------
# Updates: PCL's temporal mean, FFL's two optimizers


def make_optimizers(strategy):
    """Every optimizer group its own SGD, as the engine builds them."""
    groups = strategy.optimizer_groups()
    return [torch.optim.SGD(g.params, lr=0.1, momentum=0.9, weight_decay=5e-4) for g in groups]


def sgd_step(strategy, optimizers):
    """One engine step: forward, one joint backward, every optimizer steps, then the hook."""
    strategy.train()
    images = [torch.randn(4, 3, 32, 32) for _ in strategy.views()]
    _, losses = strategy.forward_train(images, torch.randint(0, C, (4,)), epoch=0, step=0)
    sum(losses.values()).backward()
    for optimizer in optimizers:
        optimizer.step()
    strategy.after_step(epoch=0, step=0)


def test_pcl_official_temporal_mean_is_the_student_after_a_step():
    strategy = make("pcl")
    assert not torch.equal(strategy.mean.net.trunk.conv1.weight, strategy.student.net.trunk.conv1.weight)
    sgd_step(strategy, make_optimizers(strategy))
    for (name, mean), (_, student) in zip(strategy.mean.named_parameters(), strategy.student.named_parameters()):
        assert torch.equal(mean, student), name
        assert not mean.requires_grad
    # BN buffers are not copied: M's running statistics come from its own (pre-copy) forward passes.
    assert not torch.equal(strategy.mean.net.trunk.bn1.running_mean, strategy.student.net.trunk.bn1.running_mean)
    assert int(strategy.ema_steps) == 0  # the official call always passes global_step = 0


@pytest.mark.parametrize("t,keep", [(0, 0.0), (3, 0.75), (9, 0.9), (5000, 0.999)])
def test_pcl_paper_temporal_mean_follows_the_ema_closed_form(t, keep):
    strategy = make("pcl", fidelity="paper")
    strategy.ema_steps.fill_(t)
    before = [p.detach().clone() for p in strategy.mean.parameters()]
    student = [p.detach().clone() for p in strategy.student.parameters()]
    strategy.after_step(epoch=0, step=0)
    for m0, s, m1 in zip(before, student, strategy.mean.parameters()):
        assert torch.allclose(m1, keep * m0 + (1 - keep) * s, atol=1e-6)
    assert int(strategy.ema_steps) == t + 1


@pytest.mark.parametrize("fidelity", FIDELITIES)
def test_ffl_two_optimizers_step_their_own_parameters(fidelity):
    strategy = make("ffl", fidelity=fidelity)
    network, fusion = strategy.optimizer_groups()
    assert (network.name, fusion.name) == ("network", "fusion")
    assert {id(p) for p in network.params} == {id(p) for p in strategy.net.parameters()}
    assert {id(p) for p in fusion.params} == {id(p) for p in strategy.fusion.parameters()}
    optimizers = make_optimizers(strategy)
    # The engine builds a scheduler for scheduled groups only: the official fusion LR never decays.
    schedulers = [MultiStepLR(opt, [1], gamma=0.1) for opt, g in zip(optimizers, (network, fusion)) if g.scheduled]
    before = {id(p): p.detach().clone() for p in strategy.parameters()}
    sgd_step(strategy, optimizers)
    moved = {id(p) for p in strategy.parameters() if not torch.equal(p, before[id(p)])}
    assert {id(p) for p in fusion.params} <= moved
    assert {id(strategy.net.trunk.conv1.weight), id(strategy.net.branches[1].head.classifier.weight)} <= moved
    for scheduler in schedulers:
        scheduler.step()
    lrs = [opt.param_groups[0]["lr"] for opt in optimizers]
    assert lrs[0] == pytest.approx(0.01)
    assert lrs[1] == pytest.approx(0.1 if fidelity == "official" else 0.01)


def test_describe_says_what_the_official_code_cannot_run():
    notes = make("pcl", backbone="densenet40_12", num_models=2).describe()
    assert "cannot run m = 2" in notes["official_code"]
    assert "official_code" not in make("pcl", backbone="densenet40_12", num_models=3).describe()
    assert "thin" in make("ffl", backbone="wrn20_8").describe()["wrn20_8"]
    assert make("one").describe()["gate_head_evaluated"] is False


# --------------------------------------------------------------------------------------------------
# Real training on the embedded digits data

ALL_DIGITS = 100_000  # a cap above the 1,442 digits training images: the whole set
LEARNED = 20.0  # twice chance, under pinned kernels; why: tests/test_training.py
# FFL runs in the paper fidelity: the official N(0, 2/layers[0]) conv init learns far more slowly
# (37 % after these three epochs against 68 %), too close to the bar for a robust check.
SMOKE = [("one", "official"), ("okddip", "official"), ("ffl", "paper"), ("pcl", "official")]


@pytest.mark.slow
@pytest.mark.parametrize("method,fidelity", SMOKE, ids=[m for m, _ in SMOKE])
def test_short_run_learns(tmp_path, method, fidelity, record_property):
    record = train_with_pinned_kernels(method=method, fidelity=fidelity, profile="pipeline", epochs=3,
                                       train_samples=ALL_DIGITS, deterministic=True, out_dir=str(tmp_path))
    assert record["status"] == "complete"
    record_property("paper_acc", record["metrics"]["paper"]["acc"])  # the margin, in --junitxml reports
    assert record["metrics"]["paper"]["acc"] > LEARNED, record["history"]["test_acc"]
    assert record["deployed_head"] in record["heads"] and record["method_notes"]


def test_a_backbone_of_no_known_family_is_an_error_not_a_resnet():
    from okdph.models.branches import family_of
    from okdph.models.registry import Backbone

    class Strange(Backbone):
        def __init__(self):
            nn.Module.__init__(self)

    with pytest.raises(ValueError, match="no multi-branch family for backbone Strange"):
        family_of(Strange())
