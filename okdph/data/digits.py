"""The embedded default data: scikit-learn's 1797 8x8 handwritten digits (shipped with the package,
no download), upsampled bilinearly to 32x32, scaled to 0..255 and replicated to RGB."""

from __future__ import annotations

import numpy as np
import torch

# Every 5th image of each class (in file order) is a test image. With the class sizes
# 178 182 177 183 181 182 181 179 174 180 this gives 1442 train / 355 test images.
DIGITS_TEST_EVERY = 5
DIGITS_SIZES = {"train": 1442, "test": 355}


def digits_arrays(root, train: bool, download: bool) -> tuple[np.ndarray, np.ndarray]:
    """The split's (uint8 images (N, 32, 32, 3), int64 targets); `root` and `download` are unused."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    targets = digits.target.astype(np.int64)
    small = torch.from_numpy(digits.images.astype(np.float32))[:, None]          # (N, 1, 8, 8)
    big = torch.nn.functional.interpolate(small, size=(32, 32), mode="bilinear", align_corners=False)
    gray = (big[:, 0] * (255.0 / 16.0)).round_().clamp_(0, 255).to(torch.uint8).numpy()
    rank = np.empty(len(targets), dtype=np.int64)       # position of each image within its class
    for c in np.unique(targets):
        members = np.flatnonzero(targets == c)
        rank[members] = np.arange(len(members))
    is_test = rank % DIGITS_TEST_EVERY == DIGITS_TEST_EVERY - 1
    keep = ~is_test if train else is_test
    return np.repeat(gray[keep][..., None], 3, axis=3), targets[keep]
