"""Packed runs: P runs that differ only in their seed, trained as one step in one process.

Each run keeps everything that makes it that run:
- its initialisation, built under its own seed exactly as a single run builds it;
- its data order and augmentation stream, from its own generator, drawn as a single fast run draws them;
- its optimizer state, meters, divergence tracking and record.
What the runs share is the execution. Their states are stacked along a leading run dimension, and every
strategy call (forward_train, the after-step and after-epoch hooks, eval_heads) runs once for all of them
under `torch.func.vmap` over that dimension, with run 0's strategy object as the code template. Inside,
a fused group of K networks (okdph.engine.fused) becomes, batched over P runs, one grouped convolution of
P·K networks. The device-LR SGD is elementwise, so one optimizer over the stacks is P optimizers.

vmap computes for each run what that run computes alone: tests/test_packed.py checks every strategy
against separate runs in float64. Randomness inside a strategy (VGG dropout, OKDPH's paper-fidelity
Dirichlet coefficients) is drawn per run, from the global stream, so those draws differ from an unpacked
run's; data order and augmentation do not.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import Tensor
from torch.func import vmap
from torch.nn.utils.stateless import _reparametrize_module

from okdph.engine.fast import SGD, FastEngine
from okdph.engine.fused import fuse_model_groups
from okdph.strategy import Strategy


class PackedFastEngine(FastEngine):
    """The fast engine for P runs at once; `train_epoch` and `evaluate` return one result per run."""

    def __init__(self, strategies: Sequence[Strategy], train_set, test_set, recipe, device, *,
                 seeds: Sequence[int], precision: str = "fp32", graphs: bool | None = None,
                 fuse: bool | None = None, noise: tuple[float, float] | None = None):
        if len(strategies) != len(seeds) or len(strategies) < 2:
            raise ValueError(f"a pack needs two or more runs with one seed each, got {len(strategies)} "
                             f"strategies and {len(seeds)} seeds")
        # Run 0's object is the code every call runs; its own tensors are swapped per call (`_call`).
        self._build(strategies, seeds, train_set, test_set, recipe, device, precision=precision,
                    graphs=graphs, fuse=fuse, noise=noise)

    def _fuse(self, image_shape) -> list[str]:
        fused = [fuse_model_groups(s, image_shape=image_shape, unfused=self.unfused) for s in self.strategies]
        return fused[0]  # every run has the same groups

    def _make_optimizers(self) -> list[SGD]:
        """Stack the runs' states, (P, ...) per entry under the strategy's own names, and step the stacks."""
        template = self.strategy
        own = [dict(s.named_parameters()) for s in self.strategies]
        self.params = {name: torch.stack([o[name].detach() for o in own]).requires_grad_(p.requires_grad)
                       for name, p in template.named_parameters()}
        self.detached = {name: p.detach() for name, p in self.params.items()}  # for in-place hooks
        own_buffers = [dict(s.named_buffers()) for s in self.strategies]
        self.buffers = {name: torch.stack([o[name] for o in own_buffers]) for name, _ in template.named_buffers()}
        name_of = {id(p): name for name, p in template.named_parameters()}
        recipe = self.recipe
        return [SGD([self.params[name_of[id(p)]] for p in g.params], recipe.lr, recipe.momentum,
                    recipe.weight_decay, self.device) for g in template.optimizer_groups()]

    def _run_shape(self) -> tuple[int, ...]:
        return (len(self.strategies),)

    def _call(self, fn: Callable, *args: Tensor, in_dims=None, trainable: bool = True):
        """fn(*args) with the template holding run p's state, for every p; outputs stacked (P, ...).
        `trainable=False` passes detached stacks, which hooks update in place."""
        params = self.params if trainable else self.detached
        template = self.strategy

        def one(p, b, *a):
            with _reparametrize_module(template, {**p, **b}, tie_weights=True):
                out = fn(*a)
            return torch.zeros(()) if out is None else out

        dims = (0, 0) + (tuple(in_dims) if in_dims is not None else (0,) * len(args))
        return vmap(one, in_dims=dims, randomness="different")(params, self.buffers, *args)

    def _call_hook(self, fn: Callable) -> None:
        with torch.no_grad():
            self._call(fn, trainable=False)

    def _strategy_states(self) -> dict:
        """The stacked strategy states, which live here rather than in the runs' objects."""
        return {"params": {k: v.detach().clone() for k, v in self.params.items()},
                "buffers": {k: v.clone() for k, v in self.buffers.items()}}

    @torch.no_grad()
    def _load_strategy_states(self, state: dict) -> None:
        for name, value in self.params.items():
            value.copy_(state["params"][name])
        for name, value in self.buffers.items():
            value.copy_(state["buffers"][name])
        self.write_back()

    def _test_inputs(self) -> Tensor:
        if self.noise is None:
            return self.test_inputs
        return torch.stack([self._add_noise(self.test_inputs, g) for g in self.generators])

    def describe(self) -> dict:
        return {**super().describe(), "packed_runs": len(self.strategies), "packed_seeds": self.seeds}

    @torch.no_grad()
    def write_back(self) -> None:
        """Copy each run's stacked state into its own strategy object (trajectory points, records)."""
        for p, strategy in enumerate(self.strategies):
            for name, value in strategy.named_parameters():
                value.copy_(self.params[name][p])
            for name, value in strategy.named_buffers():
                value.copy_(self.buffers[name][p])
