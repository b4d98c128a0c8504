"""The fused group (K networks as one grouped network) equals K separate networks."""
from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F

from okdph.data import get_info
from okdph.engine.fused import FusedGroup, NotGroupable, fuse_model_groups
from okdph.engine.reference import train_one_epoch
from okdph.models import ModelGroup, create_backbone
from okdph.okdph import OKDPH
from okdph.strategy import build_config, get_strategy

BACKBONES = ["resnet32", "resnet110", "wrn20_8", "vgg16", "densenet40_12"]


def relative(a, b):
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


@pytest.mark.parametrize("backbone", BACKBONES)
def test_fused_group_equals_separate_networks_outputs_gradients_and_bn_buffers(backbone):
    torch.manual_seed(0)
    group = ModelGroup([create_backbone(backbone, 10, width=0.125) for _ in range(3)]).double().train()
    fused = FusedGroup(copy.deepcopy(group))
    x = [torch.randn(4, 3, 32, 32, dtype=torch.float64) for _ in range(3)]
    y = torch.randint(0, 10, (3, 4))
    ref, out = group(x), fused(x)
    assert relative(out, ref) <= 1e-10
    F.cross_entropy(ref.flatten(0, 1), y.flatten()).backward()
    F.cross_entropy(out.flatten(0, 1), y.flatten()).backward()
    for k, state in enumerate(fused.member_states()):
        # Against the network's largest gradient entry: a conv bias before a BN has a gradient of
        # zero up to rounding, and channels-last (on the CPU) sums in another order than NCHW.
        scale = max(p.grad.abs().max() for p in group[k].parameters())
        for name, p in group[k].named_parameters():
            grad = fused.stacked()[name].grad[k]
            assert ((grad - p.grad).abs().max() / scale).item() <= 1e-10, name
        for name, b in group[k].named_buffers():
            assert torch.allclose(state[name].double(), b.double(), rtol=1e-10, atol=1e-12), name
    # eval mode: running statistics, per network
    group.eval(), fused.eval()
    assert relative(fused(x), group(x)) <= 1e-10


def test_fp32_fused_outputs_match_to_1e5():
    torch.manual_seed(0)
    group = ModelGroup([create_backbone("resnet32", 10, width=0.25) for _ in range(2)]).eval()
    fused = FusedGroup(copy.deepcopy(group))
    x = [torch.randn(8, 3, 32, 32) for _ in range(2)]
    assert relative(fused(x), group(x)) <= 1e-5


def test_member_states_alias_the_fused_tensors_and_unfuse_round_trips():
    group = ModelGroup([create_backbone("resnet32", 10, width=0.125) for _ in range(2)])
    fused = FusedGroup(group)
    state = fused.member_states()[1]
    with torch.no_grad():
        state["head.classifier.bias"].fill_(3.0)
    assert (fused.stacked()["head.classifier.bias"][1] == 3.0).all()
    back = fused.unfuse()
    assert torch.equal(back[1].head.classifier.bias, torch.full((10,), 3.0))


def test_okdph_step_on_fused_students_equals_the_reference_step():
    torch.manual_seed(0)
    config = build_config(OKDPH.Config, {"interval": "1b", "gamma": "0.5", "omega": "0.7"})
    reference = OKDPH(config=config, backbone="resnet32", num_classes=10, num_models=2,
                      dataset=get_info("cifar10"), width=0.125).double()
    fast = copy.deepcopy(reference)
    assert fuse_model_groups(fast) == ["students"]
    batches = [(torch.randn(6, 3, 3, 32, 32, dtype=torch.float64), torch.randint(0, 10, (6,))) for _ in range(3)]
    for strategy in (reference, fast):
        optimizers = [torch.optim.SGD(g.params, lr=0.1, momentum=0.9, weight_decay=5e-4)
                      for g in strategy.optimizer_groups()]
        train_one_epoch(strategy, batches, optimizers, epoch=0, device="cpu")
    for k, state in enumerate(fast.students.member_states()):
        for name, value in reference.students[k].state_dict().items():
            assert torch.allclose(state[name].double(), value.double(), rtol=1e-9, atol=1e-12), name


class _ChannelFlip(torch.nn.Module):
    """A network whose forward mixes channels outside its layers (reverses them)."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 3, padding=1)
        self.fc = torch.nn.Linear(4, 10)

    def forward(self, x):
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(self.conv(x).flip(1), 1), 1))


def test_a_network_that_mixes_channels_outside_its_layers_stays_unfused():
    strategy = make("dml")
    strategy.students = ModelGroup([_ChannelFlip(), _ChannelFlip()])
    with pytest.warns(UserWarning, match="runs unfused"):
        assert fuse_model_groups(strategy, image_shape=(3, 8, 8)) == []
    assert isinstance(strategy.students, ModelGroup) and not isinstance(strategy.students, FusedGroup)


# ---- the branches of multi-branch methods ----------------------------------------------------------


def make(method, backbone="resnet32", fidelity="official", num_models=2):
    cls = get_strategy(method)
    return cls(config=build_config(cls.Config), backbone=backbone, num_classes=10, num_models=num_models,
               dataset=get_info("cifar10"), fidelity=fidelity, width=0.125).double()


@pytest.mark.parametrize("method, backbone, fidelity, groups", [
    ("one", "resnet32", "official", ["net.branches"]),
    ("okddip", "vgg16", "official", ["net.branches"]),  # dropout heads: probed with dropout off
    ("ffl", "wrn20_8", "official", ["net.branches"]),
    ("pcl", "resnet32", "paper", ["student.net.branches", "mean.net.branches"]),
    ("pcl", "resnet32", "official", ["student.net.branches", "mean.net.branches"]),  # student: training only
    ("okdph", "resnet32", "paper", ["students"]),  # the probe's Dirichlet draw...
    ("dml", "densenet40_12", "official", ["students"]),
])
def test_fusion_groups_independent_branches_and_students(method, backbone, fidelity, groups):
    torch.manual_seed(0)
    strategy = make(method, backbone, fidelity)
    rng = torch.random.get_rng_state()
    assert fuse_model_groups(strategy, image_shape=(3, 32, 32)) == groups
    assert torch.equal(torch.random.get_rng_state(), rng)  # ... leaves the run's random stream alone


@pytest.mark.parametrize("method, backbone, shared", [
    ("one", "densenet40_12", "last_stage"),  # official: one block 3 object for every branch
    ("ffl", "vgg16", "head"),                # official: one VGG classifier for every branch
])
def test_branches_sharing_a_module_stay_unfused(method, backbone, shared):
    strategy = make(method, backbone)
    with pytest.warns(UserWarning, match=f"runs unfused: .*share '{shared}"):
        assert fuse_model_groups(strategy, image_shape=(3, 32, 32)) == []
    # the engines pass a dict: the reason goes into the run's record, not onto the user's screen
    unfused = {}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert fuse_model_groups(make(method, backbone), image_shape=(3, 32, 32), unfused=unfused) == []
    assert list(unfused) == ["net.branches"] and f"share '{shared}" in unfused["net.branches"]


@pytest.mark.parametrize("method, backbone, fidelity, num_models", [
    ("one", "resnet32", "official", 3),
    ("okddip", "resnet32", "official", 3),
    ("ffl", "densenet40_12", "paper", 2),
    ("pcl", "resnet32", "paper", 2),  # trunk per view, EMA temporal mean of fused branches
])
def test_fused_branches_train_as_the_separate_branches(method, backbone, fidelity, num_models):
    torch.manual_seed(0)
    reference = make(method, backbone, fidelity, num_models)
    fast = copy.deepcopy(reference)
    assert fuse_model_groups(fast, image_shape=(3, 32, 32))
    views = len(reference.views())
    batches = [(torch.randn(6, views, 3, 32, 32, dtype=torch.float64), torch.randint(0, 10, (6,)))
               for _ in range(2)]
    results = []
    for strategy in (reference, fast):
        optimizers = [torch.optim.SGD(g.params, lr=0.1, momentum=0.9, weight_decay=5e-4)
                      for g in strategy.optimizer_groups()]
        trained = train_one_epoch(strategy, batches, optimizers, epoch=100, device="cpu")
        with torch.no_grad():
            heads = strategy.eval().eval_heads(torch.randn(5, 3, 32, 32, dtype=torch.float64,
                                                           generator=torch.Generator().manual_seed(1)))
        results.append((trained, heads))
    (train_ref, heads_ref), (train_fast, heads_fast) = results
    for name, value in train_ref["loss"].items():
        assert train_fast["loss"][name] == pytest.approx(value, rel=1e-9), name
    assert heads_fast.keys() == heads_ref.keys()
    for name, logits in heads_ref.items():  # after two steps: parameters and BN statistics agree
        assert relative(heads_fast[name], logits) <= 1e-9, name


def test_densenet_needs_its_grouped_concatenation():
    torch.manual_seed(0)
    group = ModelGroup([create_backbone("densenet40_12", 10, width=0.25) for _ in range(2)])
    FusedGroup(copy.deepcopy(group), probe_shape=(3, 32, 32))  # passes the probe
    from okdph.models import densenet
    original = densenet.concat_channels
    try:  # a plain torch.cat over the shared channel axis interleaves the networks wrongly
        densenet.concat_channels = lambda tensors, groups: torch.cat(tensors, dim=1)
        with pytest.raises(NotGroupable):
            FusedGroup(copy.deepcopy(group), probe_shape=(3, 32, 32))
    finally:
        densenet.concat_channels = original


def test_grouped_layers_keep_per_network_state_dict_names_and_shapes():
    group = ModelGroup([create_backbone("vgg16", 10, width=0.125) for _ in range(3)])
    fused = FusedGroup(copy.deepcopy(group))
    stacked = fused.stacked()
    member = group[0].state_dict()
    assert list(stacked) == list(member)
    for name, value in member.items():
        assert stacked[name].shape == (3, *value.shape), name


def test_bf16_autocast_runs_fused_with_fp32_batchnorm_statistics():
    torch.manual_seed(0)
    fused = FusedGroup(ModelGroup([create_backbone("resnet32", 10, width=0.125) for _ in range(2)])).train()
    x = [torch.randn(4, 3, 32, 32) for _ in range(2)]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = fused(x)
    F.cross_entropy(out.float().flatten(0, 1), torch.zeros(8, dtype=torch.long)).backward()
    stacked = fused.stacked()
    assert stacked["trunk.bn1.running_mean"].dtype == torch.float32
    assert stacked["trunk.bn1.running_mean"].abs().sum() > 0  # the statistics moved
    assert torch.isfinite(stacked["trunk.conv1.weight"].grad).all()
