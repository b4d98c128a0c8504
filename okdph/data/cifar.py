"""CIFAR-10 and CIFAR-100, read with torchvision from a data root (md5-checked), downloaded there
only when asked; the loaders and file checks their dataset infos name (okdph.data.info)."""

from __future__ import annotations

import os

import numpy as np

from okdph.errors import DataError

_TITLE = {"cifar10": "CIFAR-10", "cifar100": "CIFAR-100"}


def _torchvision_class(name: str):
    from torchvision import datasets

    return {"cifar10": datasets.CIFAR10, "cifar100": datasets.CIFAR100}[name]


def _needs_root(title: str, root) -> None:
    if root is None:
        raise DataError(f"{title} needs a data root; pass --data-root (add --download to fetch it there)")


def _arrays(name: str, root, train: bool, download: bool) -> tuple[np.ndarray, np.ndarray]:
    title = _TITLE[name]
    _needs_root(title, root)
    try:
        ds = _torchvision_class(name)(os.fspath(root), train=train, download=download)
    except RuntimeError as err:  # torchvision: "Dataset not found or corrupted ..."
        raise DataError(
            f"{title} not found or corrupted under {os.fspath(root)} (md5 check failed); "
            "pass --download to fetch it or --data-root to point at it") from err
    except OSError as err:  # a failed download (URLError is an OSError)
        detail = " ".join(str(err).split())
        raise DataError(f"could not download {title} to {os.fspath(root)}: {detail}; "
                        "check the network or fetch it by hand and pass --data-root") from err
    return np.ascontiguousarray(ds.data, dtype=np.uint8), np.asarray(ds.targets, dtype=np.int64)


def _check(name: str, root, download: bool) -> None:
    """Every batch file present and md5-correct (unless `download`: the first run fetches them)."""
    if download:
        return
    from torchvision.datasets.utils import check_integrity

    title, cls = _TITLE[name], _torchvision_class(name)
    _needs_root(title, root)
    folder = os.path.join(os.fspath(root), cls.base_folder)
    for filename, md5 in [*cls.train_list, *cls.test_list, (cls.meta["filename"], cls.meta["md5"])]:
        path = os.path.join(folder, filename)
        if not os.path.isfile(path):
            raise DataError(f"{title} not found under {os.fspath(root)} (no {path}); "
                            "pass --download to fetch it or --data-root to point at it")
        if not check_integrity(path, md5):
            raise DataError(f"{title} under {os.fspath(root)} is corrupted ({path} fails its md5 check); "
                            "delete it and pass --download, or point --data-root at a good copy")


def cifar10_arrays(root, train: bool, download: bool):
    return _arrays("cifar10", root, train, download)


def cifar100_arrays(root, train: bool, download: bool):
    return _arrays("cifar100", root, train, download)


def check_cifar10(root, download: bool) -> None:
    _check("cifar10", root, download)


def check_cifar100(root, download: bool) -> None:
    _check("cifar100", root, download)
