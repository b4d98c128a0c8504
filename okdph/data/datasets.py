"""Datasets: loading (CIFAR-10/100, ImageNet folder, embedded digits, synthetic), multi-view items,
and the noisy and limited-data settings (docs/methods.md#views-per-method,
docs/methods.md#noisy-data, docs/methods.md#limited-data).

A training item is (Tensor[V, 3, H, W] float32, int target): view k is made by views[k]'s transform,
each view with its own random draws. A test item is (Tensor[3, H, W], int).
"""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from okdph.errors import DataError
from okdph.names import SETTINGS

from .info import get_info, resolve
from .transforms import build_test_transform, build_train_transform

__all__ = [
    "SETTINGS", "ArrayDataset", "MultiView", "NoisyDataset",
    "build_test_set", "build_train_set", "check_files", "limited_indices", "load_arrays",
]

_LIMITED_PERCENT = {"limited10": 10, "limited1": 1}
LIMITED_SEED = 42  # official experiment/sample/simple_cifar.ipynb


# ------------------------------------------------------------------------------------------------
# Loading raw arrays
# ------------------------------------------------------------------------------------------------

def load_arrays(name: str, root=None, train: bool = True, download: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 (N, H, W, 3), targets int64 (N,)) of an in-memory dataset's split, from the
    loader its info names (cifar10/cifar100 read from `root`, downloaded there only if `download`;
    digits and synthetic10/100 need no files)."""
    info = get_info(name)
    if not info.in_memory:
        raise DataError(f"{name!r} is an image folder, not an in-memory dataset; "
                        "use build_train_set/build_test_set")
    return resolve(info.loader)(root, train, download)


def check_files(name: str, root, download: bool = False) -> None:
    """Check that a dataset's files are where a run will read them, reading no images (CIFAR's
    batch files md5-checked unless `download`, ImageNet's train/ and val/ folders); DataError (one
    line, saying what to do) otherwise. `okdph-bench run` calls it once per dataset before any run
    trains; a run that loads its data checks again anyway."""
    info = get_info(name)
    if info.file_check:
        resolve(info.file_check)(root, download)


# ------------------------------------------------------------------------------------------------
# Limited data
# ------------------------------------------------------------------------------------------------

def limited_indices(targets, percent: float, seed: int = LIMITED_SEED) -> np.ndarray:
    """Train indices of the limited-data setting, as the official sampler draws them
    (docs/methods.md#limited-data).

    One legacy numpy stream seeded with `seed`; for each class in order of first appearance in
    `targets`, round(class size * percent / 100) draws WITH replacement from that class's indices
    (duplicates kept); concatenated. A private RandomState gives the same stream as np.random.seed
    without touching the global one."""
    targets = np.asarray(targets)
    rng = np.random.RandomState(seed)
    _, first = np.unique(targets, return_index=True)
    picked = []
    for c in targets[np.sort(first)]:
        members = np.flatnonzero(targets == c)
        picked.append(rng.choice(members, int(round(len(members) * percent / 100))))
    return np.concatenate(picked).astype(np.int64) if picked else np.empty(0, np.int64)


# ------------------------------------------------------------------------------------------------
# Dataset classes
# ------------------------------------------------------------------------------------------------

class MultiView:
    """Apply each transform to the same image and stack the results: (V, 3, H, W)."""

    def __init__(self, transforms: Sequence[Callable]):
        self.transforms = list(transforms)

    def __call__(self, img) -> torch.Tensor:
        return torch.stack([t(img) for t in self.transforms])

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.transforms!r})"


class ArrayDataset(Dataset):
    """Images held in memory as uint8 (N, H, W, 3) with int64 targets; each item goes through PIL
    and `transform`, as torchvision's CIFAR classes do. `.images`/`.targets` are the arrays used."""

    def __init__(self, images: np.ndarray, targets: np.ndarray, transform: Callable):
        if len(images) != len(targets):
            raise ValueError(f"{len(images)} images but {len(targets)} targets")
        self.images = images
        self.targets = targets
        self.transform = transform

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.transform(Image.fromarray(self.images[index])), int(self.targets[index])


class NoisyDataset(Dataset):
    """Adds fresh noise_mean + noise_std * N(0, 1) to every (already normalised) item on every access,
    each view independently (official data/cifar_noisy.py; train and test alike)."""

    def __init__(self, base: Dataset, noise_mean: float = 0.0, noise_std: float = 1.0):
        self.base = base
        self.noise_mean = noise_mean
        self.noise_std = noise_std

    # the arrays of the wrapped dataset, for code that reads them directly
    images = property(lambda self: self.base.images)
    targets = property(lambda self: self.base.targets)

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        x, y = self.base[index]
        return x + (self.noise_mean + self.noise_std * torch.randn_like(x)), y


# ------------------------------------------------------------------------------------------------
# Builders
# ------------------------------------------------------------------------------------------------

def _check_setting(setting: str) -> None:
    if setting not in SETTINGS:
        raise DataError(f"unknown data setting {setting!r}; valid: {', '.join(SETTINGS)}")


def _build(name: str, root, train: bool, transform: Callable, setting: str, download: bool,
           noise_mean: float, noise_std: float) -> Dataset:
    _check_setting(setting)
    info = get_info(name)
    percent = _LIMITED_PERCENT.get(setting) if train else None
    if not info.in_memory:
        ds = resolve(info.loader)(root, "train" if train else "val", transform)
        if percent is not None:
            keep = limited_indices(ds.targets, percent)
            ds.samples = [ds.samples[i] for i in keep]
            ds.imgs = ds.samples
            ds.targets = [s[1] for s in ds.samples]
    else:
        images, targets = load_arrays(name, root, train, download)
        if percent is not None:
            keep = limited_indices(targets, percent)
            images, targets = images[keep], targets[keep]
        ds = ArrayDataset(images, targets, transform)
    ds.info = info
    if setting == "noisy":
        ds = NoisyDataset(ds, noise_mean, noise_std)
        ds.info = info
    return ds


def build_train_set(name: str, root, views: Sequence[str], setting: str = "standard", download: bool = False,
                    *, noise_mean: float = 0.0, noise_std: float = 1.0) -> Dataset:
    """Training set whose items are (Tensor[V, 3, H, W], int): view k drawn with views[k]'s transform.

    `views` may repeat a name (e.g. ('hflip', 'hflip') for two students); a single name gives V = 1.
    `setting` is one of SETTINGS: 'noisy' adds noise_mean + noise_std * N(0, 1) to every view on every
    access; 'limited10'/'limited1' keep a class-balanced 10 %/1 % drawn with replacement (seed 42)."""
    views = [views] if isinstance(views, str) else list(views)
    if not views:
        raise DataError("at least one view is needed; valid views: hflip, hflip+rot, cutout, augment, auto_aug, base")
    info = get_info(name)
    transform = MultiView([build_train_transform(v, info) for v in views])
    ds = _build(name, root, True, transform, setting, download, noise_mean, noise_std)
    ds.views = tuple(views)
    return ds


def build_test_set(name: str, root, setting: str = "standard", download: bool = False,
                   *, noise_mean: float = 0.0, noise_std: float = 1.0) -> Dataset:
    """Test set whose items are (Tensor[3, H, W], int), no augmentation. The whole test split for
    every setting; 'noisy' adds fresh noise on every access, as for training."""
    info = get_info(name)
    return _build(name, root, False, build_test_transform(info), setting, download, noise_mean, noise_std)
