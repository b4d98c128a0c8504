"""The datasets' constants (classes, image size, normalisation, default view, how the paper spells
them), looked up by name; the names themselves are okdph.names.DATASETS."""

from __future__ import annotations

from dataclasses import dataclass

from okdph.errors import DataError
from okdph.names import DATASETS

__all__ = ["DATASETS", "DataError", "DatasetInfo", "SETTING_DISPLAY_NAMES", "display_name", "get_info"]


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


_INFOS = (
    # docs/methods.md#normalisation (official data/data_loader.py, full precision as it is written there)
    DatasetInfo("cifar10", 10, 32, (0.4914, 0.4822, 0.4465),
                # the widely copied "wrong" CIFAR-10 std; the true one is (0.2470, 0.2435, 0.2616)
                (0.2023, 0.1994, 0.2010), "hflip", "CIFAR-10"),
    DatasetInfo("cifar100", 100, 32,
                (0.5070751592371323, 0.48654887331495095, 0.4409178433670343),
                (0.2673342858792401, 0.2564384629170883, 0.27615047132568404), "hflip+rot", "CIFAR-100"),
    # per-channel mean and (population) std of the train split, seed 0 for synthetic (checked by tests)
    DatasetInfo("digits", 10, 32, (0.3051, 0.3051, 0.3051), (0.3238, 0.3238, 0.3238), "hflip", "digits",
                mirror_invariant=False),
    DatasetInfo("synthetic10", 10, 32, (0.5157, 0.5012, 0.4876), (0.1599, 0.1565, 0.1548), "hflip",
                "synthetic10"),
    DatasetInfo("synthetic100", 100, 32, (0.5011, 0.5017, 0.4955), (0.1583, 0.1543, 0.1588), "hflip+rot",
                "synthetic100"),
    DatasetInfo("imagenet", 1000, 224, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225), "hflip", "ImageNet"),
)
_BY_NAME = {info.name: info for info in _INFOS}  # one per name of DATASETS (checked by a test)

SETTING_DISPLAY_NAMES = {"standard": "standard", "noisy": "Noisy", "limited10": "10%", "limited1": "1%"}


def get_info(name: str) -> DatasetInfo:
    """The constants of dataset `name`; DataError listing the valid names if it is unknown."""
    try:
        return _BY_NAME[name]
    except (KeyError, TypeError):
        raise DataError(f"unknown dataset {name!r}; valid: {', '.join(DATASETS)}") from None


def display_name(name: str) -> str:
    """How tables and figures spell a dataset or a data setting ("cifar10" -> "CIFAR-10", "limited10"
    -> "10%"); an unknown name as it is."""
    if name in _BY_NAME:
        return _BY_NAME[name].display_name
    return SETTING_DISPLAY_NAMES.get(name, name)
