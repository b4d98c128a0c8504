"""ImageNet as an ImageFolder root with train/ and val/ (read from disk, never held in memory); the
loader and file check its dataset info names (okdph.data.info)."""

from __future__ import annotations

import os
from typing import Callable

from okdph.errors import DataError

_NO_ROOT = "imagenet needs a data root; pass --data-root pointing at a folder with train/ and val/"


def _folder(root, split: str) -> str:
    if root is None:
        raise DataError(_NO_ROOT)
    path = os.path.join(os.fspath(root), split)
    if not os.path.isdir(path):
        raise DataError(f"ImageNet folder {path} not found (expected an ImageFolder root with train/ and val/); "
                        "pass --data-root to point at it")
    return path


def read_image(path: str):
    """One image as an RGB PIL image, as ImageFolder's default loader reads it; a file that is no
    image is named, not a PIL traceback from inside a loader worker."""
    from torchvision.datasets.folder import default_loader

    try:
        return default_loader(path)
    except (OSError, ValueError) as err:  # PIL.UnidentifiedImageError is an OSError
        raise DataError(f"ImageNet image {path} is unreadable ({err}); replace or remove it") from None


def image_folder(root, split: str, transform: Callable):
    """The `split` ("train" or "val") folder as a torchvision ImageFolder."""
    from torchvision.datasets import ImageFolder

    path = _folder(root, split)
    try:
        return ImageFolder(path, transform=transform, loader=read_image)
    except (FileNotFoundError, RuntimeError) as err:
        detail = " ".join(str(err).split())
        raise DataError(f"ImageNet folder {path} holds no class folders with images ({detail}); "
                        "pass --data-root to point at it") from err


def check_folders(root, download: bool) -> None:
    """train/ and val/ exist under `root` (nothing is downloaded: ImageNet has no download)."""
    for split in ("train", "val"):
        _folder(root, split)
