"""The fast execution path (DESIGN.md §4): same strategies, same results in distribution.

- The dataset lives on the device as uint8, once per process; each epoch draws one permutation and
  augments every view of the whole epoch at once with per-sample random parameters
  (okdph.data.gpu_augment, torchvision's semantics).
- On a GPU, same-architecture networks of a strategy (its students, or the independent branches of a
  multi-branch network) run as one grouped network (okdph.engine.fused).
  On a CPU they stay separate by default: there the grouped convolutions measured slower than the
  networks one after another (results/perf/README.md).
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

import torch
from torch import Tensor

from okdph.data.gpu_augment import augment
from okdph.engine.fused import fuse_model_groups
from okdph.strategy import Strategy

PRECISIONS = ("fp32", "bf16")
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
        torch._foreach_add_(params, torch._foreach_mul(bufs, -self.lr))


class FastEngine:
    """Trains one strategy with device-resident data, fused networks and CUDA graphs."""

    def __init__(self, strategy: Strategy, train_set, test_set, recipe, device, *, seed: int,
                 precision: str = "fp32", graphs: bool | None = None, fuse: bool | None = None,
                 noise: tuple[float, float] | None = None):
        if precision not in PRECISIONS:
            raise ValueError(f"unknown precision '{precision}'; valid: {', '.join(PRECISIONS)}")
        self.device = torch.device(device)
        self.strategy = strategy
        self.recipe = recipe
        self.info = test_set.info
        self.noise = noise
        self.views = strategy.views()
        self.train_images, self.train_targets = as_device_images(train_set, self.device)
        # Before the optimizers exist: the fused parameters are new tensors.
        fuse = self.device.type == "cuda" if fuse is None else fuse
        self.fused = self._fuse(image_shape=self.train_images.shape[1:]) if fuse else []
        test_images, self.test_targets = as_device_images(test_set, self.device)
        self.dtype = next(strategy.parameters()).dtype  # views in the networks' dtype (fp64 in tests)
        self.test_inputs = augment(test_images, "base", self.info).to(self.dtype)  # normalised once
        self._make_generators(seed)
        self.autocast = dict(device_type=self.device.type, dtype=torch.bfloat16, enabled=precision == "bf16",
                             cache_enabled=False)
        self.optimizers = self._make_optimizers()
        self.scheduled = [g.scheduled for g in strategy.optimizer_groups()]
        self.graphs_enabled = (self.device.type == "cuda") if graphs is None else graphs
        self.graphs: dict = {}
        self.seen: set = set()
        n = self.train_images.shape[0]
        self.full_batches, self.remainder = divmod(n, recipe.batch_size)
        runs = self._run_shape()
        self.epoch_views = torch.empty(*runs, len(self.views), *self.train_images.shape, dtype=self.dtype,
                                       device=self.device)
        self.epoch_targets = torch.empty(*runs, n, dtype=self.train_targets.dtype, device=self.device)
        self.counter = torch.zeros((), dtype=torch.int64, device=self.device)
        self.offsets = torch.arange(recipe.batch_size, device=self.device)
        self.first_bad_step = torch.full(runs, -1, dtype=torch.int64, device=self.device)
        self.loss_names: list[str] | None = None
        self.head_names: list[str] | None = None
        self.step = 0                      # the next step of the epoch in flight
        self.epoch_rng: Tensor | None = None  # the generator when the epoch in flight began

    # ---- what a pack of runs (okdph.engine.packed) does differently ------------------------------

    def _fuse(self, image_shape) -> list[str]:
        return fuse_model_groups(self.strategy, image_shape=image_shape)

    def _make_generators(self, seed: int) -> None:
        self.generator = torch.Generator(device=self.device).manual_seed(seed)

    def _make_optimizers(self) -> list[SGD]:
        recipe = self.recipe
        return [SGD(g.params, recipe.lr, recipe.momentum, recipe.weight_decay, self.device)
                for g in self.strategy.optimizer_groups()]

    def _run_shape(self) -> tuple[int, ...]:
        """Leading dimensions of the per-run buffers: none for one run."""
        return ()

    # ---- schedule -----------------------------------------------------------------------------

    def lr_at(self, epoch: int) -> float:
        decays = sum(epoch >= m for m in self.recipe.milestones)
        return self.recipe.lr * self.recipe.lr_decay**decays

    def current_lr(self) -> float:
        return float(self.optimizers[0].lr)

    def end_epoch(self, epoch: int) -> None:
        """The scheduler step after testing (MultiStepLR semantics, per optimizer group)."""
        for opt, scheduled in zip(self.optimizers, self.scheduled):
            if scheduled:
                opt.lr.fill_(self.lr_at(epoch + 1))

    # ---- data ---------------------------------------------------------------------------------

    def _add_noise(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        if self.noise is None:
            return x
        mean, std = self.noise
        generator = self.generator if generator is None else generator
        return x + (torch.randn(x.shape, device=x.device, generator=generator) * std + mean)

    def _prepare_epoch(self) -> None:
        """Shuffle and augment the whole epoch into the same buffers every epoch: captured graphs
        read them by address."""
        order = torch.randperm(self.train_images.shape[0], device=self.device, generator=self.generator)
        images = self.train_images[order]
        for k, view in enumerate(self.views):
            self.epoch_views[k].copy_(self._add_noise(augment(images, view, self.info, self.generator)))
        self.epoch_targets.copy_(self.train_targets[order])

    # ---- one step -----------------------------------------------------------------------------

    def _step(self, batch: int, epoch: int, step: int) -> None:
        index = self.counter * self.recipe.batch_size + self.offsets[:batch]
        views = self.epoch_views.index_select(1, index)
        targets = self.epoch_targets.index_select(0, index)
        with torch.autocast(**self.autocast):
            heads, losses = self.strategy.forward_train(list(views.unbind(0)), targets, epoch=epoch, step=step)
        loss = sum(v.float() for v in losses.values())
        for opt in self.optimizers:
            opt.zero_grad()
        loss.backward()
        for opt in self.optimizers:
            opt.step()
        self.strategy.after_step(epoch=epoch, step=step)
        with torch.no_grad():
            if self.loss_names is None:  # the run's first step, always eager: size the meters
                self.loss_names, self.head_names = list(losses), list(heads)
                self.loss_sums = torch.zeros(len(losses), device=self.device)
                self.correct = torch.zeros(len(heads), dtype=torch.int64, device=self.device)
            self.loss_sums += torch.stack([v.detach().float() for v in losses.values()]) * batch
            self.correct += torch.stack([(z.argmax(dim=1) == targets).sum() for z in heads.values()])
            self.first_bad_step.masked_fill_(~torch.isfinite(loss.detach()) & (self.first_bad_step < 0), self.counter)
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

    def train_epoch(self, epoch: int, should_stop=None) -> dict | None:
        """One epoch from step `self.step` (0, or where a resumed epoch stopped). Returns None when
        `should_stop()` turned true after a step; the epoch then continues from `self.step`."""
        self.strategy.train()
        if self.step == 0:
            self.epoch_rng = self._rng_state()
            if self.loss_names is not None:
                self.loss_sums.zero_()
                self.correct.zero_()
            self.first_bad_step.fill_(-1)
        else:  # resumed mid-epoch: the same order and augmentation, replayed from the epoch's start
            self._set_rng_state(self.epoch_rng)
        self._prepare_epoch()
        self.counter.fill_(self.step)
        steps = self.full_batches + (1 if self.remainder else 0)
        while self.step < steps:
            batch = self.recipe.batch_size if self.step < self.full_batches else self.remainder
            self._run_step(batch, epoch, self.step)
            self.step += 1
            if should_stop is not None and should_stop() and self.step < steps:
                return None
        self.step, self.epoch_rng = 0, None
        return self._epoch_summary()

    def _rng_state(self):
        return self.generator.get_state()

    def _set_rng_state(self, state) -> None:
        self.generator.set_state(state)

    def _epoch_summary(self) -> dict:
        samples = self.train_images.shape[0]
        sums, correct = self.loss_sums.tolist(), self.correct.tolist()  # the epoch's one host sync
        bad = int(self.first_bad_step)
        return {"samples": samples,
                "loss": {n: s / samples for n, s in zip(self.loss_names, sums)},
                "acc": {n: 100.0 * c / samples for n, c in zip(self.head_names, correct)},
                "diverged_step": None if bad < 0 else bad}

    def describe(self) -> dict:
        """How this run executed (numerics differ slightly between fused and separate networks)."""
        return {"fused_groups": self.fused, "cuda_graphs": len([g for g in self.graphs.values() if g is not None]),
                "graphs_enabled": self.graphs_enabled}

    # ---- resume -------------------------------------------------------------------------------

    def state_dict(self) -> dict:
        mid_epoch = self.step > 0
        return {
            "lrs": [opt.lr.clone() for opt in self.optimizers],
            "momentum": [[b.clone() for b in opt.buffers] for opt in self.optimizers],
            "generator": self.epoch_rng if mid_epoch else self._rng_state(),
            "step": self.step,
            "meters": ({"loss_names": self.loss_names, "head_names": self.head_names,
                        "loss_sums": self.loss_sums.clone(), "correct": self.correct.clone(),
                        "first_bad_step": self.first_bad_step.clone()} if mid_epoch else None),
        }

    def load_state_dict(self, state: dict) -> None:
        # Copies into the existing tensors: captured graphs and the optimizers hold their addresses.
        for opt, lr, buffers in zip(self.optimizers, state["lrs"], state["momentum"], strict=True):
            opt.lr.copy_(lr)
            for mine, saved in zip(opt.buffers, buffers, strict=True):
                mine.copy_(saved)
        self._set_rng_state(state["generator"])
        self.step = state["step"]
        if self.step > 0:
            meters = state["meters"]
            self.epoch_rng = state["generator"]
            self.loss_names, self.head_names = meters["loss_names"], meters["head_names"]
            self.loss_sums = meters["loss_sums"].to(self.device)
            self.correct = meters["correct"].to(self.device)
            self.first_bad_step.copy_(meters["first_bad_step"])

    @torch.inference_mode()
    def evaluate(self) -> dict[str, float]:
        self.strategy.eval()
        correct: dict[str, Tensor] = {}
        inputs = self._add_noise(self.test_inputs)
        for start in range(0, inputs.shape[0], EVAL_BATCH):
            x = inputs[start:start + EVAL_BATCH]
            y = self.test_targets[start:start + EVAL_BATCH]
            with torch.autocast(**self.autocast):
                heads = self.strategy.eval_heads(x)
            for name, logits in heads.items():
                correct[name] = correct.get(name, 0) + (logits.argmax(dim=1) == y).sum()
        total = inputs.shape[0]
        return {name: 100.0 * float(c) / total for name, c in correct.items()}


