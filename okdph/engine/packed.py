"""Packed runs (DESIGN.md §4): P runs that differ only in their seed, trained as one step in one process.

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

import dataclasses
import hashlib
import time
from contextlib import ExitStack
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Sequence

import torch
from torch import Tensor
from torch.func import vmap
from torch.nn.utils.stateless import _reparametrize_module
from tqdm import tqdm

from okdph import data as okdata
from okdph.data.gpu_augment import augment
from okdph.engine import run as single  # the single-run driver: validation, history and record code
from okdph.engine.checkpoint import (CheckpointError, StopRequest, atomic_torch_save, capture_rng, restore_rng,
                                     safe_load, save_trajectory_point)
from okdph.engine.fast import EVAL_BATCH, SGD, FastEngine
from okdph.engine.fused import fuse_model_groups
from okdph.engine.lock import RunLock, RunLocked
from okdph.engine.recipe import resolve_recipe
from okdph.engine.record import atomic_write_json, git_revision
from okdph.strategy import ConfigError, Strategy


class PackedFastEngine(FastEngine):
    """The fast engine for P runs at once; `train_epoch` and `evaluate` return one result per run."""

    def __init__(self, strategies: Sequence[Strategy], train_set, test_set, recipe, device, *,
                 seeds: Sequence[int], precision: str = "fp32", graphs: bool | None = None,
                 fuse: bool | None = None, noise: tuple[float, float] | None = None):
        if len(strategies) != len(seeds) or len(strategies) < 2:
            raise ValueError(f"a pack needs two or more runs with one seed each, got {len(strategies)} "
                             f"strategies and {len(seeds)} seeds")
        self.runs = list(strategies)
        self.seeds = list(seeds)
        self.count = len(self.runs)
        # Run 0's object is the code every call runs; its own tensors are swapped per call (`_each`).
        super().__init__(self.runs[0], train_set, test_set, recipe, device, seed=self.seeds[0],
                         precision=precision, graphs=graphs, fuse=fuse, noise=noise)

    def _fuse(self, image_shape) -> list[str]:
        fused = [fuse_model_groups(s, image_shape=image_shape) for s in self.runs]
        return fused[0]  # every run has the same groups

    def _make_generators(self, seed: int) -> None:
        self.generators = [torch.Generator(device=self.device).manual_seed(s) for s in self.seeds]

    def _make_optimizers(self) -> list[SGD]:
        """Stack the runs' states, (P, ...) per entry under the strategy's own names, and step the stacks."""
        template = self.strategy
        own = [dict(s.named_parameters()) for s in self.runs]
        self.params = {name: torch.stack([o[name].detach() for o in own]).requires_grad_(p.requires_grad)
                       for name, p in template.named_parameters()}
        self.detached = {name: p.detach() for name, p in self.params.items()}  # for in-place hooks
        own_buffers = [dict(s.named_buffers()) for s in self.runs]
        self.buffers = {name: torch.stack([o[name] for o in own_buffers]) for name, _ in template.named_buffers()}
        name_of = {id(p): name for name, p in template.named_parameters()}
        recipe = self.recipe
        return [SGD([self.params[name_of[id(p)]] for p in g.params], recipe.lr, recipe.momentum,
                    recipe.weight_decay, self.device) for g in template.optimizer_groups()]

    def _run_shape(self) -> tuple[int, ...]:
        return (self.count,)

    # ---- every strategy call, once for all runs ------------------------------------------------

    def _each(self, fn: Callable, *args: Tensor, in_dims=None, trainable: bool = True):
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

    def _hook(self, fn: Callable) -> None:
        with torch.no_grad():
            self._each(fn, trainable=False)

    def after_epoch(self, epoch: int) -> None:
        """The strategies' after-epoch hook (OKDPH's epoch-level fusion), for every run."""
        self._hook(lambda: self.strategy.after_epoch(epoch=epoch))

    # ---- data ---------------------------------------------------------------------------------

    def _prepare_epoch(self) -> None:
        """Each run's shuffle and views, drawn from its generator in a single run's order."""
        for p, generator in enumerate(self.generators):
            order = torch.randperm(self.train_images.shape[0], device=self.device, generator=generator)
            images = self.train_images[order]
            for k, view in enumerate(self.views):
                self.epoch_views[p, k].copy_(self._add_noise(augment(images, view, self.info, generator), generator))
            self.epoch_targets[p].copy_(self.train_targets[order])

    # ---- one step -----------------------------------------------------------------------------

    def _step(self, batch: int, epoch: int, step: int) -> None:
        index = self.counter * self.recipe.batch_size + self.offsets[:batch]
        views = self.epoch_views.index_select(2, index)      # (P, V, B, ...)
        targets = self.epoch_targets.index_select(1, index)  # (P, B)

        def forward(v, t):
            return self.strategy.forward_train(list(v.unbind(0)), t, epoch=epoch, step=step)

        with torch.autocast(**self.autocast):
            heads, losses = self._each(forward, views, targets)
        loss = sum(v.float() for v in losses.values())  # (P,): each run's own total
        for opt in self.optimizers:
            opt.zero_grad()
        loss.sum().backward()  # runs share no parameter, so each gets exactly its own gradient
        for opt in self.optimizers:
            opt.step()
        self._hook(lambda: self.strategy.after_step(epoch=epoch, step=step))
        with torch.no_grad():
            if self.loss_names is None:
                self.loss_names, self.head_names = list(losses), list(heads)
                self.loss_sums = torch.zeros(self.count, len(losses), device=self.device)
                self.correct = torch.zeros(self.count, len(heads), dtype=torch.int64, device=self.device)
            self.loss_sums += torch.stack([v.detach().float() for v in losses.values()], dim=1) * batch
            self.correct += torch.stack([(z.argmax(dim=-1) == targets).sum(dim=-1) for z in heads.values()], dim=1)
            self.first_bad_step.masked_fill_(~torch.isfinite(loss.detach()) & (self.first_bad_step < 0), self.counter)
            self.counter += 1

    # ---- epochs -------------------------------------------------------------------------------

    def _rng_state(self) -> list[Tensor]:
        return [g.get_state() for g in self.generators]

    def _set_rng_state(self, states) -> None:
        for g, state in zip(self.generators, states):
            g.set_state(state)

    def _epoch_summary(self) -> list[dict]:
        """`train_epoch`'s result: one summary per run."""
        samples = self.train_images.shape[0]
        sums, correct, bad = self.loss_sums.tolist(), self.correct.tolist(), self.first_bad_step.tolist()
        return [{"samples": samples,
                 "loss": {n: s / samples for n, s in zip(self.loss_names, sums[p])},
                 "acc": {n: 100.0 * c / samples for n, c in zip(self.head_names, correct[p])},
                 "diverged_step": None if bad[p] < 0 else bad[p]} for p in range(self.count)]

    @torch.no_grad()
    def evaluate(self) -> list[dict[str, float]]:
        self.strategy.eval()
        total = self.test_inputs.shape[0]
        correct: dict[str, Tensor] = {}
        noisy = self.noise is not None
        inputs = (torch.stack([self._add_noise(self.test_inputs, g) for g in self.generators]) if noisy
                  else self.test_inputs)
        for start in range(0, total, EVAL_BATCH):
            x = inputs[:, start:start + EVAL_BATCH] if noisy else inputs[start:start + EVAL_BATCH]
            y = self.test_targets[start:start + EVAL_BATCH]
            with torch.autocast(**self.autocast):
                heads = self._each(self.strategy.eval_heads, x, in_dims=(0 if noisy else None,))
            for name, logits in heads.items():
                correct[name] = correct.get(name, 0) + (logits.argmax(dim=-1) == y).sum(dim=-1)
        counts = {name: c.tolist() for name, c in correct.items()}
        return [{name: 100.0 * c[p] / total for name, c in counts.items()} for p in range(self.count)]

    def describe(self) -> dict:
        return {**super().describe(), "packed_runs": self.count, "packed_seeds": self.seeds}

    # ---- the runs' own objects ------------------------------------------------------------------

    @torch.no_grad()
    def write_back(self) -> None:
        """Copy each run's stacked state into its own strategy object (trajectory points, analyses)."""
        for p, strategy in enumerate(self.runs):
            for name, value in strategy.named_parameters():
                value.copy_(self.params[name][p])
            for name, value in strategy.named_buffers():
                value.copy_(self.buffers[name][p])

    # ---- resume -------------------------------------------------------------------------------

    def state_dict(self) -> dict:
        """The fast engine's resume state (per-run generators, position and meters of an epoch in
        flight) plus the stacked strategy states, which live here rather than in the runs' objects."""
        return {**super().state_dict(),
                "params": {k: v.detach().clone() for k, v in self.params.items()},
                "buffers": {k: v.clone() for k, v in self.buffers.items()}}

    @torch.no_grad()
    def load_state_dict(self, state: dict) -> None:
        for name, value in self.params.items():
            value.copy_(state["params"][name])
        for name, value in self.buffers.items():
            value.copy_(state["buffers"][name])
        super().load_state_dict(state)
        self.write_back()


# --------------------------------------------------------------------------------------------------
# Training a pack end to end: one record per run


def pack_key(cfg) -> tuple:
    """Runs with equal keys can be packed: everything but the seed is the same."""
    return tuple(sorted((k, str(v)) for k, v in dataclasses.asdict(dataclasses.replace(cfg, seed=0)).items()))


def pack_checkpoint_path(cfgs) -> Path:
    digest = hashlib.sha1("\n".join(c.run_id() for c in cfgs).encode()).hexdigest()[:8]
    return Path(cfgs[0].out_dir) / f"pack-{len(cfgs)}-{digest}.ckpt.pt"


def train_packed(cfgs: Sequence, *, progress: bool = True, skip_recorded: bool = True) -> dict[str, dict]:
    """Train runs that differ only in their seed as one pack and write each run's record.

    Returns {run_id: record} for the runs trained here. Runs another worker holds, and with
    `skip_recorded` runs already recorded, are left out; a run with a single-run resume checkpoint
    continues alone. Packs checkpoint as single runs do: every `checkpoint_every` epochs, and where a
    signal (SIGTERM, ...) stops them, mid-epoch included."""
    cfgs = list(cfgs)
    for cfg in cfgs:
        single.validate(cfg)
    if len({pack_key(c) for c in cfgs}) != 1:
        raise ConfigError("a pack's runs may differ only in their seed")
    if len({c.seed for c in cfgs}) != len(cfgs):
        raise ConfigError("a pack needs distinct seeds")
    if cfgs[0].ddp or cfgs[0].resolved_engine() != "fast":
        raise ConfigError("packed runs need the fast engine (--engine fast), without --ddp")
    git_revision()
    single.check_writable(cfgs[0].record_path().parent)
    for cfg in cfgs:
        single.is_done(cfg)  # a foreign file where a record goes: refused before any work
    records = {}
    with ExitStack() as locks:
        todo = []
        for cfg in cfgs:
            try:
                locks.enter_context(RunLock(cfg.lock_path()))
            except RunLocked:
                continue  # another worker trains it
            if skip_recorded and single.is_done(cfg):
                continue
            if cfg.checkpoint_path().exists():  # an unpacked attempt to continue
                records[cfg.run_id()] = single.train_locked(cfg, progress)
                continue
            todo.append(cfg)
        if len(todo) == 1:
            records[todo[0].run_id()] = single.train_locked(todo[0], progress)
        elif todo:
            records.update(_train_pack(todo, progress))
    return records


def _train_pack(cfgs: list, progress: bool) -> dict[str, dict]:
    first = cfgs[0]
    strategy_cls, config = single.validate(first)
    dataset = first.resolved_dataset()
    recipe = resolve_recipe(first.profile, dataset, first.epochs)
    device = single.resolve_device(first.device)
    info = okdata.get_info(dataset)
    strategies = []
    for cfg in cfgs:  # each run's initialisation exactly as its single run draws it
        single.seed_everything(cfg.seed, cfg.deterministic, device)
        strategies.append(single.build_strategy(strategy_cls, config, cfg, info).to(device))
    views = strategies[0].views()
    train_set, test_set = single.build_data(first, views, recipe)
    noise = (train_set.noise_mean, train_set.noise_std) if first.setting == "noisy" else None
    engine = PackedFastEngine(strategies, train_set, test_set, recipe, device, seeds=[c.seed for c in cfgs],
                              precision=first.precision, noise=noise)

    heads = strategies[0].head_names()
    histories = [single.new_history(heads) for _ in cfgs]
    runs = [single.new_run_state() for _ in cfgs]
    run_ids = [c.run_id() for c in cfgs]
    checkpoint_path = pack_checkpoint_path(cfgs)
    trajectories = [single.trajectory_dir(c.record_path()) for c in cfgs] if first.save_every else None
    metas = [single.trajectory_meta(c, info, len(train_set)) for c in cfgs]

    if checkpoint_path.exists():
        saved = safe_load(checkpoint_path, kind="pack checkpoint")
        if saved.get("run_ids") != run_ids:
            raise CheckpointError(f"'{checkpoint_path}' belongs to another pack; remove it to start over")
        engine.load_state_dict(saved["engine"])
        histories, runs = saved["histories"], saved["runs"]
        for run in runs:
            run["resumes"].append({"epoch": run["epoch"], "step": engine.step, "packed": True,
                                   "at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                                   "cpu_threads": torch.get_num_threads()})
        restore_rng(saved["rng"], device)
    elif trajectories:
        for p, strategy in enumerate(strategies):
            save_trajectory_point(trajectories[p], 0, strategy, metas[p])

    def checkpoint() -> None:
        if first.checkpoint_every:
            elapsed = time.perf_counter() - start
            atomic_torch_save(checkpoint_path, {"kind": "pack checkpoint", "run_ids": run_ids,
                                                "engine": engine.state_dict(), "histories": histories,
                                                "runs": [{**r, "wall_s": r["wall_s"] + elapsed} for r in runs],
                                                "rng": capture_rng(device)})

    live = [p for p in range(len(cfgs)) if runs[p]["status"] == "complete"]
    start = time.perf_counter()
    stop = StopRequest()
    stop.install()
    bar = tqdm(range(runs[0]["epoch"], recipe.epochs), desc=f"pack of {len(cfgs)}: {run_ids[0][:40]}",
               unit="ep", disable=not progress, leave=False)
    try:
        for epoch in bar:
            t0 = time.perf_counter()
            for p in live:
                if len(histories[p]["lr"]) == epoch:  # not when resuming mid-epoch
                    histories[p]["lr"].append(engine.current_lr())
            trained = engine.train_epoch(epoch, should_stop=stop)
            if trained is None:  # stopped mid-epoch: keep the position and leave
                for p in live:
                    runs[p]["train_s"] += time.perf_counter() - t0
                checkpoint()
                stop.hand_over(f"pack of {len(cfgs)} ({run_ids[0]}, ...): stopped by {stop.signal_name} at epoch "
                               f"{epoch}, step {engine.step}; rerun the same command to resume from {checkpoint_path}")
            t1 = time.perf_counter()
            tested = engine.evaluate()
            t2 = time.perf_counter()
            engine.end_epoch(epoch)
            engine.after_epoch(epoch)
            for p in live:
                single.log_epoch(histories[p], runs[p], epoch, trained[p], tested[p], train_s=t1 - t0,
                                 eval_s=t2 - t1, epoch_s=time.perf_counter() - t0)
            live = [p for p in live if runs[p]["status"] == "complete"]  # a diverged run's record ends there
            if not live:
                break
            done = epoch + 1
            if trajectories and (done % first.save_every == 0 or done == recipe.epochs):
                engine.write_back()
                for p in live:
                    save_trajectory_point(trajectories[p], done, strategies[p], metas[p])
            if first.checkpoint_every and done % first.checkpoint_every == 0 and done < recipe.epochs:
                checkpoint()
            if stop():
                checkpoint()
                stop.hand_over(f"pack of {len(cfgs)} ({run_ids[0]}, ...): stopped by {stop.signal_name} after "
                               f"epoch {epoch}; rerun the same command to resume from {checkpoint_path}")
    finally:
        bar.close()
        stop.restore()
    engine.write_back()
    records = {}
    for p, cfg in enumerate(cfgs):
        runs[p]["wall_s"] += time.perf_counter() - start
        record = single.build_record(cfg, config, strategies[p], recipe, train_set, test_set, 0, histories[p],
                                     runs[p], device, execution=engine.describe())
        atomic_write_json(cfg.record_path(), record)
        records[cfg.run_id()] = record
    checkpoint_path.unlink(missing_ok=True)
    return records
