"""Data-parallel training under torchrun, for ImageNet-size runs (`okdph-bench train --ddp`).

    torchrun --standalone --nproc_per_node=8 --no-python okdph-bench train --ddp \\
        --method okdph --backbone resnet18 --dataset imagenet --data-root /data/imagenet

Each process holds the whole strategy (every student, branch and extra module) and trains on its
shard of every batch: the recipe's batch size is the global one, split evenly over the processes
(DistributedSampler, reshuffled every epoch from the run's seed). The strategy's training forward
runs through DistributedDataParallel, so every gradient is averaged over the processes before the
optimizers step and every process takes the same steps; DDP also broadcasts rank 0's buffers (BN
statistics, the HWM) at each forward. Hooks after a step or an epoch (OKDPH's fusion) then run
identically everywhere. Loss and accuracy meters are summed over processes, the test set is
sharded without padding and its counts summed, and only rank 0 writes the record.

The backend is NCCL on GPUs and gloo on CPU (which is how the tests run it: 2 processes, tiny model).
"""
from __future__ import annotations

import os

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler, Sampler

from okdph.engine.protocol import Meters, top1_accuracy
from okdph.engine.reference import ReferenceEngine, device_batches, network_dtype, train_one_epoch
from okdph.strategy import ConfigError, Strategy


def is_main_process() -> bool:
    """Rank 0 of a torchrun job, or a plain process: the one that writes and prints."""
    return int(os.environ.get("RANK", "0")) == 0


def setup(device: str) -> torch.device:
    """Join the torchrun process group; returns this process's device (cuda:LOCAL_RANK or cpu)."""
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        raise ConfigError("--ddp needs the environment torchrun sets (RANK, WORLD_SIZE); launch with "
                          "torchrun --nproc_per_node=N --no-python okdph-bench train --ddp ...")
    use_cuda = device != "cpu" and torch.cuda.is_available()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if use_cuda:
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    return torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")


def teardown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def sum_counts(counts: dict[str, Tensor], total: int) -> tuple[dict[str, Tensor], int]:
    """Sum per-process counts and their total over all processes, in one all-reduce."""
    names = sorted(counts)
    device = next(iter(counts.values())).device if counts else "cpu"
    flat = torch.cat([counts[n].to(device, torch.float64).reshape(-1) for n in names]
                     + [torch.tensor([float(total)], dtype=torch.float64, device=device)])
    dist.all_reduce(flat)
    sizes = [counts[n].numel() for n in names]
    parts = flat[:-1].split(sizes)
    return {n: part.reshape(counts[n].shape) for n, part in zip(names, parts)}, int(flat[-1].item())


def sum_meters(meters: Meters) -> None:
    """An epoch's meters summed over all processes (the first bad step is rank-local: DDP's
    averaged gradients make every process take the same steps, so their losses agree)."""
    summed, meters.samples = sum_counts({"loss": meters.loss_sums, "correct": meters.correct}, meters.samples)
    meters.loss_sums, meters.correct = summed["loss"], summed["correct"]


class _Shard(Sampler):
    """Items rank, rank + world, …: every test item exactly once over all processes (no padding)."""

    def __init__(self, length: int, rank: int, world: int):
        self.indices = list(range(rank, length, world))

    def __iter__(self):
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


class _TrainStep(nn.Module):
    """The strategy's training forward as a module forward, which is what DDP wraps."""

    def __init__(self, strategy: Strategy):
        super().__init__()
        self.strategy = strategy

    def forward(self, images, targets, *, epoch: int, step: int):
        return self.strategy.forward_train(images, targets, epoch=epoch, step=step)


class DistributedEngine(ReferenceEngine):
    """The reference engine with sharded loaders, a DDP-wrapped strategy and summed meters."""

    def __init__(self, strategy: Strategy, train_set, test_set, recipe, device, *, seed: int, workers: int):
        super().__init__(strategy, train_set, test_set, recipe, device, seed=seed, workers=workers)
        self.world, rank = dist.get_world_size(), dist.get_rank()
        if recipe.batch_size % self.world:
            raise ConfigError(f"batch size {recipe.batch_size} does not split over {self.world} processes")
        common = dict(batch_size=recipe.batch_size // self.world, num_workers=workers,
                      pin_memory=device.type == "cuda", persistent_workers=workers > 0)
        self.sampler = DistributedSampler(train_set, num_replicas=self.world, rank=rank, shuffle=True, seed=seed)
        self.train_loader = DataLoader(train_set, sampler=self.sampler, drop_last=False, **common)
        self.test_loader = DataLoader(test_set, sampler=_Shard(len(test_set), rank, self.world), **common)
        # broadcasts rank 0's parameters and buffers now, so every process starts from the same state
        self.ddp = DistributedDataParallel(_TrainStep(strategy), device_ids=[device.index] if device.type == "cuda"
                                           else None, find_unused_parameters=True)

    def train_epoch(self, epoch: int, should_stop=None) -> list[dict]:
        """A whole epoch: under DDP every process must stop at the same step, so a preemption waits
        for the epoch's end, and resumes are epoch-level (each process restores rank 0's RNG state)."""
        self.sampler.set_epoch(epoch)
        meters = Meters(1, self.device)
        train_one_epoch(self.strategy, self.train_loader, self.optimizers, epoch=epoch, device=self.device,
                        forward=self.ddp, meters=meters, step_schedulers=self.step_schedulers)
        sum_meters(meters)
        return meters.summaries()

    def evaluate(self) -> list[dict[str, float]]:
        self.strategy.eval()
        batches = device_batches(self.test_loader, self.device, network_dtype(self.strategy))
        return top1_accuracy(self.strategy.eval_heads, batches, runs=1, reduce=sum_counts)

    def describe(self) -> dict:
        return {"engine": "reference", "world_size": self.world, "backend": dist.get_backend(),
                "batch_per_process": self.train_loader.batch_size}
