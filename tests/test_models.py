"""Backbones (docs/methods.md#backbones): parameter counts, split points, shapes, initialisation, registry."""

from __future__ import annotations

import math

import pytest
import torch
import torchvision
from torch import nn
from torch.func import functional_call
from torchvision.models.resnet import BasicBlock as TVBasicBlock
from torchvision.models.resnet import Bottleneck as TVBottleneck

from okdph.models import Backbone, create_backbone, list_backbones, register_backbone

CIFAR = ["resnet32", "resnet110", "wrn20_8", "vgg16", "densenet40_12"]
ALL = sorted(CIFAR + ["resnet18"])


def n_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def input_for(name: str, batch: int = 2) -> torch.Tensor:
    size = 64 if name == "resnet18" else 32
    return torch.randn(batch, 3, size, size)


@pytest.fixture(scope="module")
def cifar100_models() -> dict[str, Backbone]:
    torch.manual_seed(0)
    return {name: create_backbone(name, 100) for name in CIFAR}


# ---------------------------------------------------------------------------------------------
# Registry
# ---------------------------------------------------------------------------------------------

def test_list_backbones_sorted():
    assert list_backbones() == ["densenet40_12", "resnet110", "resnet18", "resnet32", "vgg16", "wrn20_8"]


def test_unknown_name_lists_valid_names():
    with pytest.raises(ValueError) as err:
        create_backbone("resnet33", 10)
    assert str(err.value) == (
        "unknown backbone 'resnet33'; valid: densenet40_12, resnet110, resnet18, resnet32, vgg16, wrn20_8"
    )


@pytest.mark.parametrize("width", [0.0, -1.0, float("nan"), float("inf")])
def test_nonpositive_width_rejected(width):
    with pytest.raises(ValueError, match="width"):
        create_backbone("resnet32", 10, width=width)


@pytest.mark.parametrize("num_classes", [0, -3, 2.5])
def test_bad_num_classes_rejected(num_classes):
    with pytest.raises(ValueError, match="num_classes"):
        create_backbone("resnet32", num_classes)


def test_register_is_keyed_by_function_name_and_rejects_duplicates():
    with pytest.raises(ValueError, match="already registered"):
        @register_backbone
        def resnet32(num_classes, width=1.0):  # noqa: F811 - the clash is the point
            raise AssertionError


def test_builder_options_pass_through():
    assert create_backbone("vgg16", 10, width=0.125).head.classifier[2].p == 0.0
    assert create_backbone("vgg16", 10, width=0.125, dropout=0.5).head.classifier[2].p == 0.5
    with pytest.raises(TypeError):
        create_backbone("resnet32", 10, dropout=0.5)


# ---------------------------------------------------------------------------------------------
# Parameter counts (docs/methods.md#parameter-counts)
# ---------------------------------------------------------------------------------------------

PARAMS = {
    "resnet32": (466_906, 472_756),
    "resnet110": (1_147_738, 1_170_868),
    "wrn20_8": (6_848_090, 6_871_220),
    "vgg16": (15_253_578, 15_299_748),
    "densenet40_12": (176_122, 188_092),
}


@pytest.mark.parametrize("name", CIFAR)
def test_param_count_cifar10(name):
    assert n_params(create_backbone(name, 10)) == PARAMS[name][0]


@pytest.mark.parametrize("name", CIFAR)
def test_param_count_cifar100(name, cifar100_models):
    assert n_params(cifar100_models[name]) == PARAMS[name][1]


def test_param_count_resnet18():
    assert n_params(create_backbone("resnet18", 1000)) == 11_689_512
    assert n_params(create_backbone("resnet18", 1000)) == n_params(torchvision.models.resnet18(num_classes=1000))


# Two-branch table, CIFAR-100: (trunk, last_stage, head). Where the table gives only "one branch",
# it is last_stage + head.
SPLIT = {
    "resnet32": (112_592, 360_164 - 6_500, 6_500),
    "resnet110": (275_280, 895_588 - 25_700, 25_700),
    "wrn20_8": (1_629_776, 5_241_444 - 25_700, 25_700),
    "vgg16": (7_640_640, 7_082_496, 576_612),
    "densenet40_12": (115_848, 58_680, 188_092 - 115_848 - 58_680),
}


@pytest.mark.parametrize("name", CIFAR)
def test_split_param_counts_cifar100(name, cifar100_models):
    model = cifar100_models[name]
    trunk, last, head = SPLIT[name]
    assert (n_params(model.trunk), n_params(model.last_stage), n_params(model.head)) == (trunk, last, head)


def test_head_sizes():
    # The ResNet heads are Linear(64 / 256, 100); DenseNet's adds norm_final BN(132).
    assert SPLIT["resnet32"][2] == 64 * 100 + 100
    assert SPLIT["resnet110"][2] == 256 * 100 + 100
    assert SPLIT["densenet40_12"][2] == 2 * 132 + 132 * 100 + 100


# ---------------------------------------------------------------------------------------------
# Shapes and the split
# ---------------------------------------------------------------------------------------------

# (trunk output, last-stage output) at 32x32 input and width 1 (docs/methods.md#multi-branch-split).
SHAPES = {
    "resnet32": ((32, 16, 16), (64, 8, 8)),
    "resnet110": ((128, 16, 16), (256, 8, 8)),
    "wrn20_8": ((128, 16, 16), (256, 8, 8)),
    "vgg16": ((512, 2, 2), (512, 1, 1)),
    "densenet40_12": ((60, 8, 8), (132, 8, 8)),
}


@pytest.mark.parametrize("name", CIFAR)
@torch.no_grad()
def test_full_width_stage_shapes(name, cifar100_models):
    model = cifar100_models[name].eval()
    fmap = model.trunk(torch.randn(1, 3, 32, 32))
    out = model.last_stage(fmap)
    assert (tuple(fmap.shape[1:]), tuple(out.shape[1:])) == SHAPES[name]
    assert model.trunk_channels == SHAPES[name][0][0]
    assert model.feature_dim == SHAPES[name][1][0]
    assert model.head.features(out).shape == (1, model.feature_dim)


@pytest.mark.parametrize("name", ALL)
@torch.no_grad()
def test_forward_equals_split(name):
    torch.manual_seed(0)
    model = create_backbone(name, 7, width=0.25).eval()
    x = input_for(name)
    logits = model(x)
    assert logits.shape == (2, 7)
    fmap = model.trunk(x)
    assert fmap.shape[1] == model.trunk_channels
    out = model.last_stage(fmap)
    feats = model.head.features(out)
    assert feats.shape == (2, model.feature_dim)
    torch.testing.assert_close(model.head(out), logits, rtol=0, atol=0)
    torch.testing.assert_close(model.head.classifier(feats), logits, rtol=0, atol=0)
    torch.testing.assert_close(model.forward_features(x), feats, rtol=0, atol=0)
    torch.testing.assert_close(model.forward_head(feats), logits, rtol=0, atol=0)


def test_resnet18_shapes_at_width_1():
    model = create_backbone("resnet18", 10).eval()
    with torch.no_grad():
        fmap = model.trunk(input_for("resnet18"))
        out = model(input_for("resnet18"))
    assert fmap.shape == (2, 256, 4, 4) and model.trunk_channels == 256
    assert out.shape == (2, 10) and model.feature_dim == 512


@pytest.mark.parametrize("name", ALL)
def test_width_shrinks_model(name):
    small = create_backbone(name, 10, width=0.25)
    assert n_params(small) < n_params(create_backbone(name, 10)) / 8


@pytest.mark.parametrize("name", ALL)
def test_functional_call_twice_backprops(name):
    # OKDPH's "paper" HWM evaluates a network through functional_call with other parameters; the
    # same module must work twice in one graph (no in-place op on a tensor autograd saved).
    torch.manual_seed(0)
    model = create_backbone(name, 5, width=0.25)
    params = {k: v.detach().clone().requires_grad_(True) for k, v in model.named_parameters()}
    x = input_for(name)
    loss = functional_call(model, params, (x,)).sum() + model(x).square().mean()
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in params.values())
    assert all(p.grad is not None for p in model.parameters())


# ---------------------------------------------------------------------------------------------
# Initialisation (docs/methods.md#initialisation)
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ALL)
def test_deterministic_given_seed(name):
    torch.manual_seed(123)
    a = create_backbone(name, 10, width=0.25).state_dict()
    torch.manual_seed(123)
    b = create_backbone(name, 10, width=0.25).state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("name", ALL)
def test_batchnorm_init(name):
    bns = [m for m in create_backbone(name, 10, width=0.25).modules() if isinstance(m, nn.BatchNorm2d)]
    assert bns
    for bn in bns:
        assert torch.all(bn.weight == 1) and torch.all(bn.bias == 0)


def _conv_std_ratio(model: nn.Module, mode: str) -> float:
    """Pooled sample std / He std over the larger convs (small ones are too noisy to judge)."""
    ratios = []
    for m in model.modules():
        if isinstance(m, nn.Conv2d) and m.weight.numel() >= 4096:
            k = m.kernel_size[0] * m.kernel_size[1]
            fan = k * (m.out_channels if mode == "fan_out" else m.in_channels)
            ratios.append(m.weight.std().item() / math.sqrt(2.0 / fan))
    assert ratios
    return sum(ratios) / len(ratios)


def test_resnet_init(cifar100_models):
    model = cifar100_models["resnet32"]
    assert _conv_std_ratio(model, "fan_out") == pytest.approx(1.0, abs=0.05)
    fc = model.head.classifier
    # PyTorch's default Linear init: U(-1/sqrt(fan_in), 1/sqrt(fan_in)) for weight and bias.
    bound = 1 / math.sqrt(64)
    assert fc.bias.abs().max() <= bound and fc.bias.abs().max() > 0
    assert fc.weight.abs().max() <= bound


def test_vgg_init(cifar100_models):
    model = cifar100_models["vgg16"]
    assert _conv_std_ratio(model, "fan_out") == pytest.approx(1.0, abs=0.05)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == 13 and all(torch.all(c.bias == 0) for c in convs)
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    assert len(linears) == 3
    for fc in linears:
        assert fc.weight.std().item() == pytest.approx(0.01, rel=0.05)
        assert abs(fc.weight.mean().item()) < 1e-3
        assert torch.all(fc.bias == 0)


def test_densenet_init(cifar100_models):
    model = cifar100_models["densenet40_12"]
    assert _conv_std_ratio(model, "fan_in") == pytest.approx(1.0, abs=0.05)
    fc = model.head.classifier
    assert torch.all(fc.bias == 0)
    assert 0 < fc.weight.abs().max() <= 1 / math.sqrt(132)


# ---------------------------------------------------------------------------------------------
# Same weights as independent references built from torchvision's blocks, seed for seed
# ---------------------------------------------------------------------------------------------

class _ReferenceCifarResNet(nn.Module):
    """The official CIFAR ResNet (docs/methods.md#backbones) spelled with torchvision's blocks."""

    def __init__(self, block, layers, num_classes, width_per_group=64):
        super().__init__()
        self.inplanes = 16
        self.conv1 = nn.Conv2d(3, 16, kernel_size=3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        stages = []
        for planes, blocks, stride in zip((16, 32, 64), layers, (1, 2, 2)):
            downsample = None
            if stride != 1 or self.inplanes != planes * block.expansion:
                downsample = nn.Sequential(
                    nn.Conv2d(self.inplanes, planes * block.expansion, 1, stride, bias=False),
                    nn.BatchNorm2d(planes * block.expansion),
                )
            mods = [block(self.inplanes, planes, stride, downsample, base_width=width_per_group)]
            self.inplanes = planes * block.expansion
            mods += [block(self.inplanes, planes, base_width=width_per_group) for _ in range(1, blocks)]
            stages.append(nn.Sequential(*mods))
        self.layer1, self.layer2, self.layer3 = stages
        self.fc = nn.Linear(64 * block.expansion, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


def _assert_same_weights_and_outputs(ref: nn.Module, ours: nn.Module, x: torch.Tensor) -> None:
    a, b = list(ref.state_dict().values()), list(ours.state_dict().values())
    assert len(a) == len(b)
    for ta, tb in zip(a, b):
        assert ta.shape == tb.shape and torch.equal(ta, tb)
    ref.eval(), ours.eval()
    with torch.no_grad():
        torch.testing.assert_close(ours(x), ref(x))


@pytest.mark.parametrize("name, block, layers, wpg", [
    ("resnet32", TVBasicBlock, (5, 5, 5), 64),
    ("resnet110", TVBottleneck, (12, 12, 12), 64),
    ("wrn20_8", TVBottleneck, (2, 2, 2), 512),
])
def test_cifar_resnet_matches_reference(name, block, layers, wpg):
    torch.manual_seed(7)
    ref = _ReferenceCifarResNet(block, layers, 10, wpg)
    torch.manual_seed(7)
    ours = create_backbone(name, 10)
    _assert_same_weights_and_outputs(ref, ours, torch.randn(2, 3, 32, 32))


def test_resnet18_matches_torchvision():
    torch.manual_seed(7)
    ref = torchvision.models.resnet18(num_classes=10)
    torch.manual_seed(7)
    ours = create_backbone("resnet18", 10)
    _assert_same_weights_and_outputs(ref, ours, torch.randn(2, 3, 64, 64))
