"""The fused group (K networks as one vmapped network) equals K separate networks."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from okdph.data import get_info
from okdph.engine.fused import FusedGroup, fuse_model_groups
from okdph.engine.reference import train_one_epoch
from okdph.models import create_backbone
from okdph.okdph import OKDPH
from okdph.strategy import ModelGroup, build_config

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
        for name, p in group[k].named_parameters():
            grad = fused.get_parameter(name.replace(".", "__")).grad[k]
            assert relative(grad, p.grad) <= 1e-10, name
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
    assert (fused.get_parameter("head__classifier__bias")[1] == 3.0).all()
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
