"""Data: datasets (CIFAR-10/100, ImageNet folder, embedded digits, synthetic), training views,
and the noisy / limited-data settings. See docs/methods.md#data."""

from .datasets import (
    SETTINGS, ArrayDataset, MultiView, NoisyDataset, build_test_set, build_train_set, check_files,
    limited_indices, load_arrays,
)
from .info import DATASETS, DataError, DatasetInfo, dataset_names, get_info, register_dataset
from .synthetic import make_synthetic
from .transforms import VIEWS, Cutout, build_test_transform, build_train_transform

__all__ = [
    "DATASETS", "SETTINGS", "VIEWS", "ArrayDataset", "Cutout", "DataError", "DatasetInfo", "MultiView", "dataset_names", "register_dataset",
    "NoisyDataset", "build_test_set", "build_test_transform", "build_train_set", "check_files", "build_train_transform",
    "get_info", "limited_indices", "load_arrays", "make_synthetic",
]
