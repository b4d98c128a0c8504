"""The datasets and their traits (classes, image size, normalisation, default view, how the paper
spells them, which recipe and views they take, where their images come from), looked up by name.
Code asks a dataset's info for a trait; it never checks a dataset's name. Adding a dataset is a
loader (a module of its own) and a `register_dataset` call (docs/architecture.md#adding-a-dataset);
the built-in names are also okdph.names.DATASETS, which the command line reads without torch."""

from __future__ import annotations

import importlib
from dataclasses import dataclass

from okdph.errors import DataError
from okdph.names import DATASETS

__all__ = ["DATASETS", "DataError", "DatasetInfo", "SETTING_DISPLAY_NAMES", "dataset_names", "display_name",
           "get_info", "register_dataset"]

FAMILIES = ("cifar", "imagenet")


@dataclass(frozen=True)
class DatasetInfo:
    name: str
    num_classes: int
    image_size: int                      # side of the square training/test crop
    mean: tuple[float, float, float]     # per-channel mean of ToTensor() output (0..1), RGB
    std: tuple[float, float, float]      # per-channel std, RGB
    default_view: str                    # the Base/DML view (docs/methods.md#views-per-method)
    display_name: str                    # how tables and figures spell it
    # A mirrored image shows the same class (photographs); False where mirroring makes another
    # class (digits: a mirrored 2 is no digit, a mirrored 7 is not a 7): every view skips its flip.
    mirror_invariant: bool = True
    # "cifar": small images held in memory, CIFAR's recipe (okdph.engine.recipe), crop-with-padding
    # views, a 16 px Cutout hole and OKDPH's CIFAR view sets; "imagenet": ImageNet's.
    family: str = "cifar"
    # Where the images come from, "module:function" (imported only when a run loads them):
    # in memory, f(root, train, download) -> (uint8 images (N, H, W, 3), int64 targets (N,));
    # otherwise an image folder, f(root, split, transform) -> a torch Dataset with .targets.
    loader: str = ""
    in_memory: bool = True
    # f(root, download) -> None, or DataError saying what to do, without reading an image ("" = none)
    file_check: str = ""
    loader_workers: int = 0  # DataLoader worker processes of a run that does not set --workers

    def __post_init__(self):
        if self.family not in FAMILIES:
            raise ValueError(f"dataset {self.name!r}: unknown family {self.family!r}; valid: {', '.join(FAMILIES)}")


def resolve(target: str):
    """The function a "module:function" trait names."""
    module, _, name = target.partition(":")
    return getattr(importlib.import_module(module), name)


_INFOS = (
    # docs/methods.md#normalisation (official data/data_loader.py, full precision as it is written there)
    DatasetInfo("cifar10", 10, 32, (0.4914, 0.4822, 0.4465),
                # the widely copied "wrong" CIFAR-10 std; the true one is (0.2470, 0.2435, 0.2616)
                (0.2023, 0.1994, 0.2010), "hflip", "CIFAR-10", loader="okdph.data.cifar:cifar10_arrays",
                file_check="okdph.data.cifar:check_cifar10", loader_workers=8),
    DatasetInfo("cifar100", 100, 32,
                (0.5070751592371323, 0.48654887331495095, 0.4409178433670343),
                (0.2673342858792401, 0.2564384629170883, 0.27615047132568404), "hflip+rot", "CIFAR-100",
                loader="okdph.data.cifar:cifar100_arrays", file_check="okdph.data.cifar:check_cifar100",
                loader_workers=8),
    # per-channel mean and (population) std of the train split, seed 0 for synthetic (checked by tests)
    DatasetInfo("digits", 10, 32, (0.3051, 0.3051, 0.3051), (0.3238, 0.3238, 0.3238), "hflip", "digits",
                mirror_invariant=False, loader="okdph.data.digits:digits_arrays"),
    DatasetInfo("synthetic10", 10, 32, (0.5157, 0.5012, 0.4876), (0.1599, 0.1565, 0.1548), "hflip",
                "synthetic10", loader="okdph.data.synthetic:synthetic10_arrays"),
    DatasetInfo("synthetic100", 100, 32, (0.5011, 0.5017, 0.4955), (0.1583, 0.1543, 0.1588), "hflip+rot",
                "synthetic100", loader="okdph.data.synthetic:synthetic100_arrays"),
    DatasetInfo("imagenet", 1000, 224, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225), "hflip", "ImageNet",
                family="imagenet", loader="okdph.data.imagenet:image_folder", in_memory=False,
                file_check="okdph.data.imagenet:check_folders", loader_workers=8),
)
_BY_NAME = {info.name: info for info in _INFOS}  # the built-ins are names.DATASETS (checked by a test)


def register_dataset(info: DatasetInfo) -> None:
    """Make `info.name` a dataset every command and run accepts (a name already taken is refused)."""
    if info.name in _BY_NAME:
        raise ValueError(f"dataset {info.name!r} is already registered")
    if not info.loader:
        raise ValueError(f"dataset {info.name!r} names no loader")
    _BY_NAME[info.name] = info


def dataset_names() -> tuple[str, ...]:
    """Every registered dataset: the built-ins, then those registered since."""
    return tuple(_BY_NAME)

SETTING_DISPLAY_NAMES = {"standard": "standard", "noisy": "Noisy", "limited10": "10%", "limited1": "1%"}


def get_info(name: str) -> DatasetInfo:
    """The constants of dataset `name`; DataError listing the valid names if it is unknown."""
    try:
        return _BY_NAME[name]
    except (KeyError, TypeError):
        raise DataError(f"unknown dataset {name!r}; valid: {', '.join(_BY_NAME)}") from None


def display_name(name: str) -> str:
    """How tables and figures spell a dataset or a data setting ("cifar10" -> "CIFAR-10", "limited10"
    -> "10%"); an unknown name as it is."""
    if name in _BY_NAME:
        return _BY_NAME[name].display_name
    return SETTING_DISPLAY_NAMES.get(name, name)
