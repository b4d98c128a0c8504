"""The fast execution path (docs/architecture.md#engine-layer): same strategies, same results in distribution.

- The dataset lives on the device as uint8, once per process; each epoch draws one permutation and
  augments every view of the whole epoch at once with per-sample random parameters
  (okdph.data.gpu_augment, torchvision's semantics).
- Same-architecture networks of a strategy (its students, or the independent branches of a
  multi-branch network) run as one grouped network (okdph.engine.fused), channels-last on a CPU.
- The whole training step (batch gather, forward, losses, backward, SGD with the learning rate as a
  device tensor, the strategy's hooks, meters) is captured in a CUDA graph per distinct step, as the
  strategy's `graph_key` defines it, plus one per batch size so the last partial batch is never
  padded. A step runs eagerly the first time its key appears (lazy initialisation, cuDNN autotuning)
  and is captured the second time. Capture failures fall back to eager execution.
- Optional bf16 autocast; losses and BN statistics stay in fp32.
- No host sync inside an epoch.
"""
from __future__ import annotations

import warnings
from typing import Callable

import torch
from torch import Tensor

from okdph.data.gpu_augment import augment
from okdph.engine.fused import fuse_model_groups
from okdph.engine.protocol import Engine, Meters, top1_accuracy
from okdph.strategy import Strategy

FAST_PRECISIONS = ("fp32", "bf16")  # of okdph.names.PRECISIONS, those this engine runs (fp64: reference)
EVAL_BATCH = 1000


def as_device_images(dataset, device) -> tuple[Tensor, Tensor]:
    """uint8 (N, 3, H, W) images and int64 targets on `device`, from an in-memory dataset."""
    images = getattr(dataset, "images", None)
    if images is None:
        raise ValueError("the fast engine needs an in-memory dataset (CIFAR, digits, synthetic); "
                         "use --engine reference for ImageNet folders")
    images = torch.as_tensor(images).permute(0, 3, 1, 2).contiguous().to(device)
    targets = torch.as_tensor(dataset.targets, dtype=torch.int64).to(device)
    return images, targets


class SGD:
    """PyTorch's SGD (momentum, weight decay on every parameter, no dampening or Nesterov) with the
    learning rate held in a device tensor, so a captured step follows the schedule. Momentum buffers
    start at zero, which makes the first update g, as torch.optim.SGD's clone of the first gradient.
    """

    def __init__(self, params, lr: float, momentum: float, weight_decay: float, device):
        self.params = [p for p in params if p.requires_grad]
        self.lr = torch.tensor(lr, dtype=torch.float64, device=device)  # exact for fp64 nets too
        self.momentum, self.weight_decay = momentum, weight_decay
        self.buffers = [torch.zeros_like(p) for p in self.params]

    def zero_grad(self) -> None:
        for p in self.params:
            p.grad = None

    @torch.no_grad()
    def step(self) -> None:
        params = [p for p in self.params if p.grad is not None]
        if not params:
            return
        grads = [p.grad for p in params]
        bufs = [b for p, b in zip(self.params, self.buffers) if p.grad is not None]
        grads = torch._foreach_add(grads, params, alpha=self.weight_decay)
        torch._foreach_mul_(bufs, self.momentum)
        torch._foreach_add_(bufs, grads)
        # p - lr·buf rounded once, as torch.optim.SGD's add_(buf, alpha=-lr); a separate multiply
        # and add would round twice and drift from the reference engine.
        lr = self.lr.to(params[0].dtype)  # torch.optim.SGD casts its float lr to the weights' type
        torch._foreach_addcmul_(params, bufs, [lr] * len(params), value=-1)


class FastEngine(Engine):
    """Trains one strategy with device-resident data, fused networks and CUDA graphs.

    What a pack of runs (okdph.engine.packed) does differently is confined to the methods marked
    below: how the runs' generators, optimizers and strategy states are held, and how a strategy
    call runs (directly here, once for all runs under vmap there)."""

    def __init__(self, strategy: Strategy, train_set, test_set, recipe, device, *, seed: int,
                 precision: str = "fp32", graphs: bool | None = None, fuse: bool | None = None,
                 noise: tuple[float, float] | None = None):
        self._build([strategy], [seed], train_set, test_set, recipe, device, precision=precision,
                    graphs=graphs, fuse=fuse, noise=noise)

    def _build(self, strategies, seeds, train_set, test_set, recipe, device, *, precision, graphs, fuse, noise):
        if precision not in FAST_PRECISIONS:
            raise ValueError(f"the fast engine runs {', '.join(FAST_PRECISIONS)}, not '{precision}'")
        self.strategies, self.seeds = list(strategies), list(seeds)
        self.strategy = self.strategies[0]  # the code every call runs (a pack swaps in each run's state)
        self.device = torch.device(device)
        self.recipe = recipe
        self.info = test_set.info
        self.noise = noise
        self.views = self.strategy.views()
        self.train_images, self.train_targets = as_device_images(train_set, self.device)
        # Before the optimizers exist: the fused parameters are new tensors.
        fuse = True if fuse is None else fuse
        self.unfused: dict[str, str] = {}  # groups left as separate networks, and why (the record says)
        self.fused = self._fuse(image_shape=self.train_images.shape[1:]) if fuse else []
        test_images, self.test_targets = as_device_images(test_set, self.device)
        self.dtype = next(self.strategy.parameters()).dtype  # views in the networks' dtype (fp64 in tests)
        self.test_inputs = augment(test_images, "base", self.info).to(self.dtype)  # normalised once
        self.generators = [torch.Generator(device=self.device).manual_seed(s) for s in self.seeds]
        self.autocast = dict(device_type=self.device.type, dtype=torch.bfloat16, enabled=precision == "bf16",
                             cache_enabled=False)
        self.optimizers = self._make_optimizers()
        self.scheduled = [g.scheduled for g in self.strategy.optimizer_groups()]
        self.graphs_enabled = (self.device.type == "cuda") if graphs is None else graphs
        self.graphs: dict = {}
        self.seen: set = set()
        n = self.train_images.shape[0]
        self.full_batches, self.remainder = divmod(n, recipe.batch_size)
        self.steps_per_epoch = self.full_batches + (1 if self.remainder else 0)
        runs = self._run_shape()
        self.epoch_views = torch.empty(*runs, len(self.views), *self.train_images.shape, dtype=self.dtype,
                                       device=self.device)
        self.epoch_targets = torch.empty(*runs, n, dtype=self.train_targets.dtype, device=self.device)
        self.counter = torch.zeros((), dtype=torch.int64, device=self.device)
        self.offsets = torch.arange(recipe.batch_size, device=self.device)
        self.meters = Meters(len(self.strategies), self.device)
        self.step = 0                      # the next step of the epoch in flight
        self.epoch_rng: list | None = None  # the generators when the epoch in flight began

    # ---- what a pack of runs (okdph.engine.packed) does differently ------------------------------

    def _fuse(self, image_shape) -> list[str]:
        return fuse_model_groups(self.strategy, image_shape=image_shape, unfused=self.unfused)

    def _make_optimizers(self) -> list[SGD]:
        recipe = self.recipe
        return [SGD(g.params, recipe.lr, recipe.momentum, recipe.weight_decay, self.device)
                for g in self.strategy.optimizer_groups()]

    def _run_shape(self) -> tuple[int, ...]:
        """Leading dimensions of the per-run buffers: none for one run."""
        return ()

    def _call(self, fn: Callable, *args: Tensor, in_dims=None):
        """A strategy call: fn(*args), with the strategy's own state."""
        return fn(*args)

    def _call_hook(self, fn: Callable) -> None:
        """A strategy hook (after a step or an epoch), which updates the state in place."""
        fn()

    def _strategy_states(self) -> dict:
        return {"strategies": [s.state_dict() for s in self.strategies]}

    def _load_strategy_states(self, state: dict) -> None:
        for strategy, saved in zip(self.strategies, state["strategies"], strict=True):
            strategy.load_state_dict(saved)

    # ---- schedule -----------------------------------------------------------------------------

    def lr_at(self, epoch: int, step: int = 0) -> float:
        """The learning rate of step `step` of epoch `epoch` (the recipe's schedule)."""
        if self.recipe.schedule == "linear":
            steps = self.steps_per_epoch
            return self.recipe.lr * self.recipe.step_factor(epoch * steps + step, steps)
        decays = sum(epoch >= m for m in self.recipe.milestones)
        return self.recipe.lr * self.recipe.lr_decay**decays

    def _set_lr(self, epoch: int, step: int) -> None:
        for opt, scheduled in zip(self.optimizers, self.scheduled):
            if scheduled:
                opt.lr.fill_(self.lr_at(epoch, step))

    def current_lr(self) -> float:
        return float(self.optimizers[0].lr)

    def end_epoch(self, epoch: int) -> None:
        """The scheduler step after testing (MultiStepLR semantics, per optimizer group; a linear
        schedule's value before the next epoch's first step), then the strategy's after-epoch hook
        (OKDPH's epoch-level fusion)."""
        self._set_lr(epoch + 1, 0)
        self._call_hook(lambda: self.strategy.after_epoch(epoch=epoch))

    # ---- data ---------------------------------------------------------------------------------

    def _add_noise(self, x: Tensor, generator: torch.Generator) -> Tensor:
        if self.noise is None:
            return x
        mean, std = self.noise
        return x + (torch.randn(x.shape, device=x.device, generator=generator) * std + mean)

    def _per_run(self, buffer: Tensor, p: int) -> Tensor:
        return buffer[p] if self._run_shape() else buffer

    def _prepare_epoch(self) -> None:
        """Each run's shuffle and views, drawn from its own generator, into the same buffers every
        epoch: captured graphs read them by address."""
        for p, generator in enumerate(self.generators):
            order = torch.randperm(self.train_images.shape[0], device=self.device, generator=generator)
            images = self.train_images[order]
            views = self._per_run(self.epoch_views, p)
            for k, view in enumerate(self.views):
                views[k].copy_(self._add_noise(augment(images, view, self.info, generator), generator))
            self._per_run(self.epoch_targets, p).copy_(self.train_targets[order])

    # ---- one step -----------------------------------------------------------------------------

    def _step(self, batch: int, epoch: int, step: int) -> None:
        index = self.counter * self.recipe.batch_size + self.offsets[:batch]
        views = self.epoch_views.index_select(-4, index)      # ([P,] V, B, C, H, W)
        targets = self.epoch_targets.index_select(-1, index)  # ([P,] B)

        def forward(v, t):
            return self.strategy.forward_train(list(v.unbind(0)), t, epoch=epoch, step=step)

        with torch.autocast(**self.autocast):
            heads, losses = self._call(forward, views, targets)
        loss = sum(v.float() for v in losses.values())  # ([P]): each run's own total
        for opt in self.optimizers:
            opt.zero_grad()
        loss.sum().backward()  # runs share no parameter, so each gets exactly its own gradient
        for opt in self.optimizers:
            opt.step()
        self._call_hook(lambda: self.strategy.after_step(epoch=epoch, step=step))
        self.meters.add(losses, loss, heads, targets, self.counter)
        with torch.no_grad():
            self.counter += 1
    def _run_step(self, batch: int, epoch: int, step: int) -> None:
        if not self.graphs_enabled:
            return self._step(batch, epoch, step)
        key = (self.strategy.graph_key(epoch=epoch, step=step), batch)
        graph = self.graphs.get(key)
        if graph is not None:
            graph.replay()
        elif key in self.seen:
            self.graphs[key] = self._capture(batch, epoch, step)
            if self.graphs[key] is None:  # capture failed: this key stays eager
                self.graphs_enabled = False
                self._step(batch, epoch, step)
            else:
                self.graphs[key].replay()
        else:
            self.seen.add(key)
            self._step(batch, epoch, step)

    def _capture(self, batch: int, epoch: int, step: int):
        graph = torch.cuda.CUDAGraph()
        torch.cuda.synchronize(self.device)
        try:
            with torch.cuda.graph(graph):
                self._step(batch, epoch, step)
        except Exception as exc:  # e.g. an op that syncs with the host
            warnings.warn(f"CUDA graph capture failed, continuing eagerly: {exc}")
            torch.cuda.synchronize(self.device)
            return None
        return graph

    # ---- epochs -------------------------------------------------------------------------------

    def train_epoch(self, epoch: int, should_stop=None) -> list[dict] | None:
        """One epoch from step `self.step` (0, or where a resumed epoch stopped). Returns None when
        `should_stop()` turned true after a step; the epoch then continues from `self.step`."""
        self.strategy.train()
        if self.step == 0:
            self.epoch_rng = self._rng_state()
            self.meters.reset()
        else:  # resumed mid-epoch: the same order and augmentation, replayed from the epoch's start
            self._set_rng_state(self.epoch_rng)
        self._prepare_epoch()
        self.counter.fill_(self.step)
        steps = self.steps_per_epoch
        while self.step < steps:
            batch = self.recipe.batch_size if self.step < self.full_batches else self.remainder
            if self.recipe.schedule == "linear":  # the device lr is read by the (captured) step
                self._set_lr(epoch, self.step)
            self._run_step(batch, epoch, self.step)
            self.step += 1
            if should_stop is not None and should_stop() and self.step < steps:
                return None
        self.step, self.epoch_rng = 0, None
        self.meters.samples = self.train_images.shape[0]
        return self.meters.summaries()

    def _rng_state(self) -> list[Tensor]:
        return [g.get_state() for g in self.generators]

    def _set_rng_state(self, states) -> None:
        for g, state in zip(self.generators, states, strict=True):
            g.set_state(state)

    def describe(self) -> dict:
        """How this run executed (numerics differ slightly between fused and separate networks)."""
        return {"engine": "fast", "fused_groups": self.fused, "unfused_groups": self.unfused,
                "cuda_graphs": len([g for g in self.graphs.values() if g is not None]),
                "graphs_enabled": self.graphs_enabled}

    # ---- resume -------------------------------------------------------------------------------

    def state_dict(self) -> dict:
        mid_epoch = self.step > 0
        return {
            **self._strategy_states(),
            "lrs": [opt.lr.clone() for opt in self.optimizers],
            "momentum": [[b.clone() for b in opt.buffers] for opt in self.optimizers],
            "generators": self.epoch_rng if mid_epoch else self._rng_state(),
            "step": self.step,
            "meters": self.meters.state_dict() if mid_epoch else None,
        }

    def load_state_dict(self, state: dict) -> None:
        # Copies into the existing tensors: captured graphs and the optimizers hold their addresses.
        self._load_strategy_states(state)
        for opt, lr, buffers in zip(self.optimizers, state["lrs"], state["momentum"], strict=True):
            opt.lr.copy_(lr)
            for mine, saved in zip(opt.buffers, buffers, strict=True):
                mine.copy_(saved)
        self._set_rng_state(state["generators"])
        self.step = state["step"]
        if self.step > 0:
            self.epoch_rng = state["generators"]
            self.meters.load_state_dict(state["meters"])

    # ---- test ---------------------------------------------------------------------------------

    def _test_inputs(self) -> Tensor:
        """The test images, with this evaluation's noise in the noisy setting (drawn per run)."""
        return self._add_noise(self.test_inputs, self.generators[0])

    def evaluate(self) -> list[dict[str, float]]:
        self.strategy.eval()
        inputs = self._test_inputs()  # ([P,] N, C, H, W)
        total = inputs.shape[-4]

        def heads_of(x):
            with torch.autocast(**self.autocast):
                return self._call(self.strategy.eval_heads, x, in_dims=(0 if x.dim() == 5 else None,))

        batches = ((inputs.narrow(-4, start, min(EVAL_BATCH, total - start)),
                    self.test_targets[start:start + EVAL_BATCH]) for start in range(0, total, EVAL_BATCH))
        return top1_accuracy(heads_of, batches, runs=len(self.strategies))
