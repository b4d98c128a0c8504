"""Fused execution of K same-architecture networks as ONE grouped network (docs/architecture.md#engine-layer).

Activations have the layout (B, K·C, ...): network k owns channels [k·C, (k+1)·C). On that layout
- a convolution of K networks is one convolution with K times the groups,
- a BatchNorm is one normalisation over K·C channels, which is exactly per-network BN, running
  statistics included,
- a Linear is one batched matmul,
and everything else a CIFAR backbone does (ReLU, pooling, residual sums, flattening a map whose
channels are outermost, dropout) acts on each network's channels alone. So `FusedGroup` takes a copy of the
member's module tree, swaps its Conv2d, BatchNorm and Linear layers for grouped ones and runs the
member's own forward code on it. The only backbone code that moves channels across positions is a
channel concatenation (DenseNet's blocks); such a module has a `channel_groups` attribute, set here
to K, and concatenates with `okdph.models.registry.concat_channels`.

Parameters and buffers are stored stacked, (K, ...) per entry, under the member's state-dict names;
a grouped convolution's weight is that stack with its first two dimensions merged, a view, so no
weight is copied per step and an optimizer steps the stacks directly.

The members may be whole networks (students) or the branches of a multi-branch network, which all
read the same trunk output (`to_grouped_layout` repeats it) and return (features, logits); outputs
of any (B, K·C, ...) shape are split back per network. Members that share a module (an official
quirk of some multi-branch models) cannot be grouped.

A backbone whose forward mixes channels some other way would silently compute something else, so
construction runs a probe: the grouped network against the members, in float64 on the CPU, in train
mode with dropout off (dropout is elementwise, the same distribution grouped or not, but draws
differently). `fuse_model_groups` finds each group's input shape by watching the strategy train on
a probe batch, and leaves a group that fails the probe unfused (with a warning).
"""
from __future__ import annotations

import copy
import warnings
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from okdph.models import ModelGroup


class NotGroupable(ValueError):
    """A module the grouped layout cannot express."""


def _stack(members: Sequence[nn.Module], name: str) -> Tensor | None:
    values = [getattr(m, name) for m in members]
    if values[0] is None:
        return None
    return torch.stack([v.detach() for v in values]).clone()


class GroupedConv2d(nn.Module):
    """K Conv2d layers as one; `weight` is (K, out, in/groups, kh, kw)."""

    def __init__(self, convs: Sequence[nn.Conv2d]):
        super().__init__()
        first = convs[0]
        if first.padding_mode != "zeros":
            raise NotGroupable(f"Conv2d with padding_mode={first.padding_mode}")
        self.stride, self.padding, self.dilation = first.stride, first.padding, first.dilation
        self.groups = first.groups * len(convs)
        self.weight = nn.Parameter(_stack(convs, "weight"), requires_grad=first.weight.requires_grad)
        bias = _stack(convs, "bias")
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=first.bias.requires_grad)

    def forward(self, x: Tensor) -> Tensor:
        bias = None if self.bias is None else self.bias.flatten()
        return F.conv2d(x, self.weight.flatten(0, 1), bias, self.stride, self.padding, self.dilation, self.groups)


class GroupedBatchNorm(nn.Module):
    """K BatchNorm layers (1d or 2d) as one over K·C channels; entries are (K, C), the step counter (K,)."""

    def __init__(self, norms: Sequence[nn.modules.batchnorm._BatchNorm]):
        super().__init__()
        first = norms[0]
        if not first.track_running_stats or first.momentum is None:
            raise NotGroupable("BatchNorm without running statistics or with a cumulative average")
        self.eps, self.momentum = first.eps, first.momentum
        for name in ("weight", "bias"):
            value = _stack(norms, name)
            self.register_parameter(name, None if value is None else
                                    nn.Parameter(value, requires_grad=getattr(first, name).requires_grad))
        for name in ("running_mean", "running_var", "num_batches_tracked"):
            self.register_buffer(name, _stack(norms, name))

    def forward(self, x: Tensor) -> Tensor:
        if self.training:
            self.num_batches_tracked.add_(1)
        weight = None if self.weight is None else self.weight.flatten()
        bias = None if self.bias is None else self.bias.flatten()
        # flatten() of the contiguous (K, C) buffers is a view: the running statistics update in place.
        return F.batch_norm(x, self.running_mean.flatten(), self.running_var.flatten(), weight, bias,
                            self.training, self.momentum, self.eps)


class GroupedLinear(nn.Module):
    """K Linear layers as one on inputs (..., K·in) -> (..., K·out); `weight` is (K, out, in)."""

    def __init__(self, linears: Sequence[nn.Linear]):
        super().__init__()
        first = linears[0]
        self.count, self.in_features, self.out_features = len(linears), first.in_features, first.out_features
        self.weight = nn.Parameter(_stack(linears, "weight"), requires_grad=first.weight.requires_grad)
        bias = _stack(linears, "bias")
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=first.bias.requires_grad)

    def forward(self, x: Tensor) -> Tensor:
        lead = x.shape[:-1]
        per_network = x.reshape(-1, self.count, self.in_features).transpose(0, 1)  # (K, N, in)
        if self.bias is None:
            out = torch.bmm(per_network, self.weight.transpose(1, 2))
        else:
            out = torch.baddbmm(self.bias.unsqueeze(1), per_network, self.weight.transpose(1, 2))
        return out.transpose(0, 1).reshape(*lead, self.count * self.out_features)


_GROUPED_LAYERS = {nn.Conv2d: GroupedConv2d, nn.BatchNorm1d: GroupedBatchNorm, nn.BatchNorm2d: GroupedBatchNorm,
                   nn.Linear: GroupedLinear}


def grouped_network(members: Sequence[nn.Module]) -> nn.Module:
    """One module running `members` (same architecture) on the grouped layout; see the module docstring."""
    first = members[0]
    layer = _GROUPED_LAYERS.get(type(first))
    if layer is not None:
        return layer(members)
    if first._parameters or any(b is not None for b in first._buffers.values()):
        raise NotGroupable(f"{type(first).__name__} holds its own parameters or buffers")
    shell = copy.copy(first)  # same class and attributes; its own children below
    shell.__dict__.update(_parameters={}, _buffers={}, _non_persistent_buffers_set=set())
    shell._modules = {name: None if child is None else grouped_network([m._modules[name] for m in members])
                      for name, child in first._modules.items()}
    if hasattr(shell, "channel_groups"):
        shell.channel_groups = len(members)
    return shell


def to_grouped_layout(inputs: Sequence[Tensor]) -> Tensor:
    """K inputs (B, C, ...) -> (B, K·C, ...)."""
    if all(x is inputs[0] for x in inputs):  # one batch for every network (evaluation)
        return inputs[0].repeat(1, len(inputs), *([1] * (inputs[0].dim() - 2)))
    return torch.stack(list(inputs), dim=1).flatten(1, 2)


class FusedGroup(nn.Module):
    """K networks as one grouped network, with the methods of `okdph.strategy.ModelGroup`.

    Args:
        group: the K networks; their current state is copied in.
        probe_shape: one input's shape, e.g. (3, 32, 32), for the construction-time probe; None skips it.
    """

    def __init__(self, group: ModelGroup, probe_shape: Sequence[int] | None = None):
        super().__init__()
        members = list(group)
        self.count = len(members)
        _check_nothing_shared(members)
        # A storage-free copy of one member, to rebuild ordinary networks (`unfuse`).
        self._template = [copy.deepcopy(members[0]).to("meta")]
        self.network = grouped_network(members)
        self.train(group.training)
        if probe_shape is not None:
            _probe(members, self, tuple(probe_shape))

    def __len__(self) -> int:
        return self.count

    def forward(self, inputs: Sequence[Tensor] | Tensor, method: str = "forward"):
        """As `ModelGroup.forward`: K inputs of (B, ...) (a list or a (K, B, ...) tensor) -> the
        outputs stacked (K, B, ...), or a tuple of such stacks."""
        inputs = list(inputs.unbind(0)) if isinstance(inputs, Tensor) else list(inputs)
        if len(inputs) != self.count:
            raise ValueError(f"{self.count} networks but {len(inputs)} inputs")
        x = to_grouped_layout(inputs)
        if x.device.type == "cpu" and x.dim() == 4 and not torch._C._functorch.is_functorch_wrapped_tensor(x):
            # oneDNN's grouped convolutions with few channels per group run fastest channels-last on
            # the CPU (docs/verification.md#cpu-speed); on a GPU cuDNN picks its own layout. (Not
            # under vmap, packed runs, which has no channels-last.)
            x = x.contiguous(memory_format=torch.channels_last)
        out = getattr(self.network, method)(x)
        if isinstance(out, tuple):
            return tuple(self._split(o) for o in out)
        return self._split(out)

    def _split(self, out: Tensor) -> Tensor:
        """(B, K·C, ...) -> (K, B, C, ...)."""
        return out.reshape(out.shape[0], self.count, out.shape[1] // self.count, *out.shape[2:]).transpose(0, 1)

    def stacked(self) -> dict[str, Tensor]:
        """Every state entry, (K, ...), under the member's state-dict name (live tensors)."""
        return dict(self.network.state_dict(keep_vars=True))

    def member_states(self) -> list[dict[str, Tensor]]:
        state = {name: value.detach() for name, value in self.stacked().items()}
        return [{name: value[k] for name, value in state.items()} for k in range(self.count)]

    def member_parameters(self, k: int) -> dict[str, Tensor]:
        return {name: value[k] for name, value in self.network.named_parameters()}

    def unfuse(self) -> ModelGroup:
        """K ordinary modules holding copies of the current state (for checkpoints and analysis)."""
        members = []
        for state in self.member_states():
            net = copy.deepcopy(self._template[0]).to_empty(device=next(iter(state.values())).device)
            net.load_state_dict({k: v.clone() for k, v in state.items()})
            members.append(net.train(self.training))
        return ModelGroup(members)


def _check_nothing_shared(members: Sequence[nn.Module]) -> None:
    """Grouping gives every member its own copy of each tensor, so members sharing one would train
    K copies where there is one."""
    owner: dict[int, int] = {}
    for k, member in enumerate(members):
        for name, value in [*member.named_parameters(), *member.named_buffers()]:
            if owner.setdefault(id(value), k) != k:
                raise NotGroupable(f"{type(member).__name__}: the networks share '{name}'")


def _without_dropout(module: nn.Module) -> nn.Module:
    for m in module.modules():
        if isinstance(m, nn.modules.dropout._DropoutNd):
            m.eval()
    return module


@torch.no_grad()
def _probe(members: Sequence[nn.Module], fused: FusedGroup, shape: tuple[int, ...]) -> None:
    """Raise NotGroupable unless the grouped network computes what the members compute (float64, CPU,
    train mode, so batch statistics and running-statistic updates are both checked)."""
    members = [_without_dropout(copy.deepcopy(m).to("cpu", torch.float64).train()) for m in members]
    grouped = _without_dropout(copy.deepcopy(fused).to("cpu", torch.float64).train())
    gen = torch.Generator().manual_seed(0)
    inputs = [torch.randn(2, *shape, generator=gen, dtype=torch.float64) for _ in members]
    expected = ModelGroup(members)(inputs)
    got = grouped(inputs)
    if not isinstance(expected, tuple):
        expected, got = (expected,), (got,)
    for e, g in zip(expected, got, strict=True):
        scale = e.abs().max().clamp_min(1e-12)
        if g.shape != e.shape or ((g - e).abs().max() / scale) > 1e-9:
            raise NotGroupable(f"{type(members[0]).__name__}: the grouped network does not reproduce the "
                               "members (its forward mixes channels outside Conv2d/BatchNorm/Linear layers)")
    state = grouped.member_states()
    for k, member in enumerate(members):
        for name, value in member.state_dict().items():
            if not torch.allclose(state[k][name].double(), value.double(), rtol=1e-9, atol=1e-12):
                raise NotGroupable(f"{type(members[0]).__name__}: '{name}' is not updated per network")


def fuse_model_groups(strategy: nn.Module, image_shape: Sequence[int] | None = None,
                      unfused: dict[str, str] | None = None) -> list[str]:
    """Replace every `ModelGroup` of two or more networks inside `strategy` by a `FusedGroup`, in place;
    returns the names replaced.

    With `image_shape` (one input image, e.g. (3, 32, 32)) every group is probed (see the module
    docstring) on the inputs it receives when the strategy trains on such images (`forward_train`);
    a group that the probe rejects, or that training never calls, stays as it is: why goes into
    `unfused` (name -> reason) when given, else into a warning. Must run before optimizers are
    built: the fused parameters are new tensors.
    """
    def keep_unfused(name: str, reason: str) -> None:
        if unfused is None:
            warnings.warn(f"'{name}' runs unfused: {reason}")
        else:
            unfused[name] = reason

    groups = _outermost_groups(strategy)
    shapes = _group_input_shapes(strategy, image_shape) if image_shape is not None else {}
    fused = []
    for name, group in groups.items():
        if image_shape is not None and name not in shapes:
            keep_unfused(name, "a training step does not call it, so it cannot be probed")
            continue
        try:
            replacement = FusedGroup(group, shapes.get(name))
        except NotGroupable as exc:
            keep_unfused(name, str(exc))
            continue
        parent, _, attribute = name.rpartition(".")
        setattr(strategy.get_submodule(parent), attribute, replacement)
        fused.append(name)
    return fused


def _outermost_groups(module: nn.Module, prefix: str = "") -> dict[str, ModelGroup]:
    """The groups of two or more networks in `module`, by qualified name, not looking inside a group."""
    found = {}
    for name, child in module.named_children():
        qualified = f"{prefix}{name}"
        if isinstance(child, ModelGroup) and len(child) > 1:
            found[qualified] = child
        elif not isinstance(child, ModelGroup):
            found.update(_outermost_groups(child, qualified + "."))
    return found


@torch.no_grad()
def _group_input_shapes(strategy: nn.Module, image_shape: Sequence[int]) -> dict[str, tuple[int, ...]]:
    """Each group's input shape (without the batch) when a CPU float64 copy of the strategy takes a
    training step's forward on two blank images: a branch group reads the trunk's output, not an image."""
    probe = copy.deepcopy(strategy).to("cpu", torch.float64).train()
    shapes: dict[str, tuple[int, ...]] = {}

    def record(name):
        def hook(_, args):
            shapes.setdefault(name, tuple(args[0][0].shape[1:]))  # returns None: the inputs stay as they are
        return hook

    for name, group in _outermost_groups(probe).items():
        group.register_forward_pre_hook(record(name))
    images = [torch.zeros(2, *image_shape, dtype=torch.float64) for _ in probe.views()]
    with torch.random.fork_rng(devices=[]):  # the run's own random stream is not consumed
        probe.forward_train(images, torch.zeros(2, dtype=torch.int64), epoch=0, step=0)
    return shapes
