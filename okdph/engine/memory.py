"""What a run needs in memory, estimated from its configuration before anything is built, and what
the device has: a run that cannot fit is refused in one line instead of growing until the machine
swaps (docs/protocol.md#limits).

The estimate builds one backbone on the meta device (no storage, no random numbers drawn) and runs
one batch through it there: every layer's output is a tensor the backward pass keeps, so their sizes
summed, times the batch, is one network's activation memory. Parameters count four times (weights,
gradients, momentum, one spare copy: OKDPH's hybrid, PCL's temporal mean, the fused engine's packed
weights). A run holds its students plus one such network.
"""
from __future__ import annotations

import functools
import os

import torch

from okdph.models import create_backbone

HEADROOM = 0.9  # of the available memory a run may plan to take: the rest is for the data and Python


@functools.lru_cache(maxsize=None)  # a table validates thousands of runs of a few shapes
def network_bytes(backbone: str, num_classes: int, width: float, batch_size: int, image_size: int,
                  element_size: int) -> int:
    """One network's parameters (x4) and one batch's layer outputs, in bytes."""
    outputs = []

    def count(_module, _inputs, output):
        if isinstance(output, torch.Tensor):
            outputs.append(output.numel())

    with torch.device("meta"):
        net = create_backbone(backbone, num_classes, width=width)
        hooks = [m.register_forward_hook(count) for m in net.modules() if not list(m.children())]
        net(torch.empty(batch_size, 3, image_size, image_size))
    for hook in hooks:
        hook.remove()
    params = sum(p.numel() for p in net.parameters())
    return (4 * params + sum(outputs)) * element_size


def run_bytes(backbone: str, num_classes: int, width: float, batch_size: int, image_size: int, models: int,
              element_size: int = 4) -> int:
    """A run of `models` networks plus one spare (see the module docstring), in bytes."""
    return (models + 1) * network_bytes(backbone, num_classes, width, batch_size, image_size, element_size)


def available_bytes(device: torch.device) -> int | None:
    """The memory a run on `device` can have: a GPU's total (its free memory would need a CUDA
    context in every process that validates a run); on the CPU, Linux's MemAvailable now. None where
    the system does not say."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    try:
        with open("/proc/meminfo") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def gib(n: int) -> str:
    return f"{n / 2 ** 30:.1f} GiB"
