"""Fused execution of K same-architecture networks (DESIGN.md §4).

`FusedGroup` holds the K networks' parameters and buffers stacked along a leading K dimension and
runs them as one network with `torch.func.vmap` over `functional_call`: convolutions become one
grouped convolution, BatchNorm one normalisation over K·C channels (exactly per-network BN, running
statistics included) and the heads one batched matmul. It offers the same methods as
`okdph.strategy.ModelGroup`, so a strategy runs unchanged on either.
"""
from __future__ import annotations

import copy
from typing import Sequence

import torch
from torch import Tensor, nn
from torch.func import functional_call, stack_module_state, vmap

from okdph.strategy import ModelGroup


def _slot(name: str) -> str:
    # Module attribute names may not contain dots; state-dict names do.
    return name.replace(".", "__")


class FusedGroup(nn.Module):
    """K networks as one: parameters (K, ...) that an optimizer steps directly."""

    def __init__(self, group: ModelGroup):
        super().__init__()
        members = list(group)
        # The architecture without storage: functional_call supplies every tensor.
        self._template = [copy.deepcopy(members[0]).to("meta")]
        params, buffers = stack_module_state(members)
        self.param_names = list(params)
        self.buffer_names = list(buffers)
        for name, value in params.items():
            self.register_parameter(_slot(name), nn.Parameter(value.detach().clone()))
        for name, value in buffers.items():
            self.register_buffer(_slot(name), value.clone())
        self.count = len(members)
        self.train(group.training)

    @property
    def template(self) -> nn.Module:
        return self._template[0]

    def train(self, mode: bool = True):
        super().train(mode)
        self.template.train(mode)
        return self

    def __len__(self) -> int:
        return self.count

    def stacked(self) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        params = {name: getattr(self, _slot(name)) for name in self.param_names}
        buffers = {name: getattr(self, _slot(name)) for name in self.buffer_names}
        return params, buffers

    def forward(self, inputs: Sequence[Tensor] | Tensor) -> Tensor:
        """K inputs of (B, ...) (a list or a (K, B, ...) tensor) -> stacked logits (K, B, C)."""
        x = inputs if isinstance(inputs, Tensor) else torch.stack(list(inputs))
        if x.shape[0] != self.count:
            raise ValueError(f"{self.count} networks but {x.shape[0]} inputs")
        params, buffers = self.stacked()
        template = self.template

        def one(p, b, xi):
            return functional_call(template, (p, b), (xi,))

        return vmap(one)(params, buffers, x)

    def member_states(self) -> list[dict[str, Tensor]]:
        params, buffers = self.stacked()
        state = {**params, **buffers}
        return [{name: value.detach()[k] for name, value in state.items()} for k in range(self.count)]

    def member_parameters(self, k: int) -> dict[str, Tensor]:
        params, _ = self.stacked()
        return {name: value[k] for name, value in params.items()}

    def unfuse(self) -> ModelGroup:
        """K ordinary modules holding copies of the current state (for checkpoints and analysis)."""
        members = []
        for state in self.member_states():
            net = copy.deepcopy(self.template).to_empty(device=next(iter(state.values())).device)
            net.load_state_dict({k: v.clone() for k, v in state.items()})
            members.append(net.train(self.training))
        return ModelGroup(members)


def fuse_model_groups(module: nn.Module) -> list[str]:
    """Replace every `ModelGroup` inside `module` by a `FusedGroup` in place; returns their names.

    Must run before optimizers are built: the fused parameters are new tensors.
    """
    fused = []
    for name, child in list(module.named_children()):
        if isinstance(child, ModelGroup) and len(child) > 1:
            setattr(module, name, FusedGroup(child))
            fused.append(name)
        else:
            fused += [f"{name}.{n}" for n in fuse_model_groups(child)]
    return fused
