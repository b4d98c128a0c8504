"""What the two analyses share: a trajectory point's student as a network plus its weights, the
training images without augmentation, and the training-set loss of many weight sets at once.

Many weight sets at once: `stacked_loss` takes parameters stacked along a leading axis (K weight
sets of one architecture) and evaluates all K networks on every training batch with
`torch.func.functional_call` under `vmap`, so one pass over the data serves K perturbed copies
(PAC-Bayes) or K grid points (landscape). BatchNorm runs in eval mode (running statistics), the
way the analyses define the loss, so the K networks never touch each other's buffers.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, vmap

from okdph.engine.checkpoint import TrajectoryPoint, load_trajectory, trajectory_dir
from okdph.errors import ConfigError

DEFAULT_BATCH_SIZE = 1024     # images per forward pass on a GPU (the official landscape script's batch size)
# On the CPU, smaller batches in channels-last layout: a pass of a quarter-width ResNet110 over the
# 1,442 digits went from 4.8 to 1.3 s (DenseNet40-12 3.2 -> 0.82, WRN20-8 5.8 -> 2.4, VGG16 0.44 ->
# 0.19, ResNet32 0.53 -> 0.44; 2 threads of a 2-core AMD EPYC, docs/verification.md#pac-bayes-speed):
# the activations of a batch then stay in cache.
CPU_BATCH_SIZE = 128
DEFAULT_CHUNK = 16            # weight sets evaluated together under vmap (GPU): bounds activation memory


def build_network(meta: dict, device) -> nn.Module:
    """An empty network of the trajectory's architecture, in eval mode, on `device`; its own
    weights are never used: every evaluation passes the weights explicitly."""
    from okdph.models import create_backbone

    net = create_backbone(meta["backbone"], meta["num_classes"], width=meta["width"])
    return net.to(device).eval()


def trainable_names(net: nn.Module) -> list[str]:
    """The trainable parameters (conv/linear weights and biases, BN affine): what the analyses
    perturb or project. BN running statistics are buffers and stay as the checkpoint has them."""
    return [name for name, p in net.named_parameters() if p.requires_grad]


def split_state(state: dict[str, Tensor], names: list[str]) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """A state dict as (trainable parameters, everything else: BN buffers)."""
    missing = [n for n in names if n not in state]
    if missing:
        raise ConfigError(f"trajectory point lacks parameter '{missing[0]}': not a checkpoint of this backbone")
    params = {n: state[n] for n in names}
    buffers = {n: v for n, v in state.items() if n not in params}
    return params, buffers


def flatten(params: dict[str, Tensor], names: list[str]) -> Tensor:
    """The parameters as one vector, in `names` order (float32)."""
    return torch.cat([params[n].reshape(-1).float() for n in names])


def unflatten(vector: Tensor, like: dict[str, Tensor], names: list[str]) -> dict[str, Tensor]:
    """Inverse of `flatten` for a (..., d) tensor: parameters shaped like `like`, with the leading
    dimensions of `vector` kept (a (K, d) matrix gives K stacked weight sets)."""
    out, start = {}, 0
    lead = vector.shape[:-1]
    for n in names:
        size = like[n].numel()
        out[n] = vector[..., start:start + size].reshape(*lead, *like[n].shape)
        start += size
    return out


def load_run_trajectory(record_path) -> list[TrajectoryPoint]:
    """The trajectory points saved beside a run record (`okdph-bench train --save-every E`)."""
    record_path = Path(record_path)
    if record_path.suffix != ".json":
        raise ConfigError(f"expected a run record (.json), got '{record_path}'")
    if not record_path.exists():
        raise ConfigError(f"run record '{record_path}' does not exist")
    return load_trajectory(trajectory_dir(record_path))


# --------------------------------------------------------------------------------------------------
# Training images, no augmentation


@dataclass
class TrainImages:
    """The training split a run trained on (its data setting, its first `train_size` images), as
    uint8 on the device; `batches` yields them normalised, i.e. the 'base' view (= the test
    transform): no crop, no flip. A noisy-setting run is measured on the clean images."""

    images: Tensor        # uint8 (N, 3, H, W) on the device
    targets: Tensor       # int64 (N,)
    info: object          # DatasetInfo: normalisation constants

    def __len__(self) -> int:
        return len(self.targets)

    def batches(self, batch_size: int = DEFAULT_BATCH_SIZE):
        from okdph.data.gpu_augment import normalize

        for start in range(0, len(self), batch_size):
            x = self.images[start:start + batch_size].float().div(255)  # ToTensor's arithmetic
            yield normalize(x, self.info), self.targets[start:start + batch_size]


def load_train_images(meta: dict, data_root, device, download: bool = False) -> TrainImages:
    from okdph import data as okdata

    dataset, setting = meta["dataset"], meta.get("setting", "standard")
    if not okdata.get_info(dataset).in_memory:
        raise ConfigError(f"the analyses need an in-memory training set; {dataset} is not held in memory")
    # 'noisy' only adds per-access noise: its images are the standard ones
    train_set = okdata.build_train_set(dataset, data_root, ["base"],
                                       setting="standard" if setting == "noisy" else setting, download=download)
    count = int(meta.get("train_size") or len(train_set))
    images = torch.from_numpy(train_set.images[:count]).permute(0, 3, 1, 2).contiguous()
    targets = torch.as_tensor(train_set.targets[:count], dtype=torch.long)
    return TrainImages(images.to(device), targets.to(device), train_set.info)


# --------------------------------------------------------------------------------------------------
# Loss of many weight sets


def stacked_loss(net: nn.Module, params: dict[str, Tensor], buffers: dict[str, Tensor], data: TrainImages, *,
                 stacked_buffers: bool = False, batch_size: int | None = None,
                 chunk: int = DEFAULT_CHUNK, vectorize: bool | None = None,
                 channels_last: bool | None = None) -> tuple[Tensor, Tensor]:
    """Mean cross-entropy and top-1 accuracy (%) over `data` of K networks: `net`'s architecture
    with parameters params[name][k] (each (K, ...)) and buffers (shared, or (K, ...) each when
    `stacked_buffers`). Returns two (K,) float64 CPU tensors. Eval mode, no gradients.

    `vectorize` (default: on CUDA only): `chunk` networks at a time as one vmapped network; else
    one network after another (on a CPU vmap's batched convolutions were measured ~1.5x slower, and
    so were K networks as one grouped network). `batch_size` default: DEFAULT_BATCH_SIZE on a GPU,
    CPU_BATCH_SIZE on the CPU; `channels_last` default: on the CPU, one network at a time."""
    count = next(iter(params.values())).shape[0]
    device = next(iter(params.values())).device
    on_cpu = device.type == "cpu"
    batch_size = batch_size or (CPU_BATCH_SIZE if on_cpu else DEFAULT_BATCH_SIZE)
    net.eval()

    def one(p, b, x):
        return functional_call(net, (p, b), (x,))

    def single(p, b, x):  # a chunk of one network: run it plainly, keep vmap's (k, B, C) shape
        b = {n: v[0] for n, v in b.items()} if stacked_buffers else b
        return one({n: v[0] for n, v in p.items()}, b, x)[None]

    if not (device.type == "cuda" if vectorize is None else vectorize):
        chunk = 1
    if channels_last is None:
        channels_last = on_cpu and chunk == 1  # vmap has no channels-last
    forward = single if chunk == 1 else vmap(one, in_dims=(0, 0 if stacked_buffers else None, None))
    losses = torch.zeros(count, dtype=torch.float64, device=device)
    correct = torch.zeros(count, dtype=torch.float64, device=device)
    with torch.inference_mode():
        for start in range(0, count, chunk):
            p = {n: v[start:start + chunk] for n, v in params.items()}
            b = {n: v[start:start + chunk] for n, v in buffers.items()} if stacked_buffers else buffers
            for x, y in data.batches(batch_size):
                if channels_last and x.dim() == 4:
                    x = x.contiguous(memory_format=torch.channels_last)
                logits = forward(p, b, x).float()                      # (k, B, C)
                k = logits.shape[0]
                ce = F.cross_entropy(logits.flatten(0, 1), y.repeat(k), reduction="none").view(k, -1)
                losses[start:start + k] += ce.sum(dim=1).double()
                correct[start:start + k] += (logits.argmax(dim=2) == y).sum(dim=1).double()
    n = len(data)
    return (losses / n).cpu(), (100.0 * correct / n).cpu()
