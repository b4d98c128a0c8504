"""Training recipes and profiles (docs/methods.md#shared-training-harness,
docs/protocol.md#recipes-per-profile).

A recipe is the optimisation schedule a run follows. A profile picks a recipe family:
- paper: the published recipe (CIFAR: 300 epochs, SGD 0.1, ×0.1 at 150 and 225, wd 5e-4, batch 128;
  ImageNet: 100 epochs, ×0.1 at 30/60/90, wd 1e-4, batch 256);
- quick: the same recipe with the schedule scaled to a tenth of the epochs;
- smoke: the embedded digits data, a quarter-width model, batch 32 and one short epoch (192
  training and 180 test images): a real run in seconds on a laptop CPU, for first runs, tests and
  whole-table runs. Not a fidelity setting.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, replace

from okdph.names import PROFILES
from okdph.strategy import ConfigError


@dataclass(frozen=True)
class Recipe:
    epochs: int = 300
    batch_size: int = 128
    lr: float = 0.1
    momentum: float = 0.9            # plain momentum, no Nesterov, in every official script
    weight_decay: float = 5e-4       # on every parameter, BN and biases included
    milestones: tuple[int, ...] = (150, 225)
    lr_decay: float = 0.1
    train_samples: int | None = None  # use only the first N training images (smoke); None: all
    test_samples: int | None = None   # evaluate on the first N test images (smoke); None: all

    def with_epochs(self, epochs: int) -> "Recipe":
        """Same recipe over `epochs` epochs, milestones scaled proportionally."""
        if epochs < 1:
            raise ConfigError(f"epochs must be >= 1, got {epochs}")
        scaled = tuple(max(1, round(m * epochs / self.epochs)) for m in self.milestones)
        return replace(self, epochs=epochs, milestones=scaled)

    def to_dict(self) -> dict:
        return {**asdict(self), "milestones": list(self.milestones)}


CIFAR_RECIPE = Recipe()
IMAGENET_RECIPE = Recipe(epochs=100, batch_size=256, weight_decay=1e-4, milestones=(30, 60, 90))

QUICK_FRACTION = 0.1
SMOKE_EPOCHS = 1
SMOKE_BATCH_SIZE = 32  # small batches: more steps in a short epoch
SMOKE_WIDTH = 0.25
SMOKE_DATASET = "digits"
# A smoke epoch is short so that a whole table runs in minutes on 2 CPU cores (Table 3's 47 distinct
# runs in 62-83 s on an idle machine): the first 192 of digits' 1,442 training images (6 steps) and the
# first 180 of its 355 test images. It checks the pipeline and leaves most cells at chance; a recipe
# that learns in most cells costs 30-40 times as much (benchmarks/smoke_calibration.py,
# docs/verification.md#known-open-items).
SMOKE_TRAIN_SAMPLES = 192
SMOKE_TEST_SAMPLES = 180
SMOKE_STEPS = -(-SMOKE_TRAIN_SAMPLES // SMOKE_BATCH_SIZE)  # a smoke run's one epoch


def default_width(profile: str) -> float:
    """The channel multiplier a run of `profile` gets unless it sets one."""
    return SMOKE_WIDTH if profile == "smoke" else 1.0


def resolve_recipe(profile: str, dataset: str, epochs: int | None = None) -> Recipe:
    """The recipe for a profile and dataset; `epochs` rescales the schedule to that many epochs."""
    if profile not in PROFILES:
        raise ConfigError(f"unknown profile '{profile}'; valid: {', '.join(PROFILES)}")
    recipe = IMAGENET_RECIPE if dataset == "imagenet" else CIFAR_RECIPE
    if epochs is None:
        if profile == "quick":
            epochs = max(1, round(recipe.epochs * QUICK_FRACTION))
        elif profile == "smoke":
            epochs = SMOKE_EPOCHS
    if profile == "smoke":
        recipe = replace(recipe, batch_size=SMOKE_BATCH_SIZE, train_samples=SMOKE_TRAIN_SAMPLES,
                         test_samples=SMOKE_TEST_SAMPLES)
    return recipe if epochs is None or epochs == recipe.epochs else recipe.with_epochs(epochs)
