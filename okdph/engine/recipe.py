"""Training recipes and profiles (docs/methods.md#shared-training-harness,
docs/protocol.md#recipes-per-profile).

A recipe is the optimisation schedule a run follows. A profile picks a recipe family:
- paper: the published recipe (CIFAR: 300 epochs, SGD 0.1, ×0.1 at 150 and 225, wd 5e-4, batch 128;
  ImageNet: 100 epochs, ×0.1 at 30/60/90, wd 1e-4, batch 256);
- quick: the same recipe with the schedule scaled to a tenth of the epochs;
- smoke: the embedded digits data at reduced width, with a recipe and width per backbone calibrated
  so that the methods learn in minutes on a CPU (`SMOKE_RECIPES`, `SMOKE_WIDTHS`, measured in
  docs/verification.md#smoke-recipe);
- pipeline: the embedded digits data at quarter width, six steps a run (192 training and 180 test
  images): every code path in seconds, for tests and `okdph-bench regress`; nothing learns.
The smoke and pipeline profiles change the recipe, the data and the width, never a method's constants.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, replace

from okdph.data.info import get_info
from okdph.names import PROFILES
from okdph.strategy import ConfigError

SCHEDULES = ("step", "linear")


@dataclass(frozen=True)
class Recipe:
    epochs: int = 300
    batch_size: int = 128
    lr: float = 0.1
    momentum: float = 0.9            # plain momentum, no Nesterov, in every official script
    weight_decay: float = 5e-4       # on every parameter, BN and biases included
    milestones: tuple[int, ...] = (150, 225)
    lr_decay: float = 0.1
    # "step": ×lr_decay at each milestone epoch, as the official MultiStepLR (stepped after each
    # epoch's test); "linear": from lr down to 0 over the run's steps, updated after every step.
    schedule: str = "step"
    # Linear schedule only: the lr rises linearly from lr/W to lr over the first W = warmup_epochs
    # epochs' steps, then decays linearly to 0 over the rest (0: no warm-up).
    warmup_epochs: int = 0
    train_samples: int | None = None  # use only the first N training images; None: all
    test_samples: int | None = None   # evaluate on the first N test images; None: all

    def __post_init__(self):
        if self.schedule not in SCHEDULES:
            raise ConfigError(f"unknown schedule '{self.schedule}'; valid: {', '.join(SCHEDULES)}")
        if self.warmup_epochs and (self.schedule != "linear" or not 0 < self.warmup_epochs < self.epochs):
            raise ConfigError(f"a warm-up of {self.warmup_epochs} epochs needs the linear schedule and "
                              f"fewer epochs than the run's {self.epochs}")

    def with_epochs(self, epochs: int) -> "Recipe":
        """Same recipe over `epochs` epochs, milestones scaled proportionally."""
        if epochs < 1:
            raise ConfigError(f"epochs must be >= 1, got {epochs}")
        scaled = tuple(max(1, round(m * epochs / self.epochs)) for m in self.milestones)
        warmup = min(round(self.warmup_epochs * epochs / self.epochs), epochs - 1)
        return replace(self, epochs=epochs, milestones=scaled, warmup_epochs=warmup)

    def step_factor(self, step: int, steps_per_epoch: int) -> float:
        """The linear schedule's lr multiplier before global step `step` (0-based): without warm-up,
        1 at the first step and 1/T at the last of the run's T steps; with a warm-up of W steps,
        (step + 1)/W during it, then 1 at step W down to 1/(T - W) at the last."""
        total, warmup = self.epochs * steps_per_epoch, self.warmup_epochs * steps_per_epoch
        if step < warmup:
            return (step + 1) / warmup
        return 1.0 - (step - warmup) / (total - warmup)

    def to_dict(self) -> dict:
        """As records hold it; without a warm-up, as before the field existed (records and the
        regression expectations of recipes without one stay the same)."""
        out = {**asdict(self), "milestones": list(self.milestones)}
        if not self.warmup_epochs:
            del out["warmup_epochs"]
        return out


CIFAR_RECIPE = Recipe()
IMAGENET_RECIPE = Recipe(epochs=100, batch_size=256, weight_decay=1e-4, milestones=(30, 60, 90))

QUICK_FRACTION = 0.1
EMBEDDED_DATASET = "digits"  # what the smoke and pipeline profiles train on, whatever the table's data
EMBEDDED_WIDTH = 0.25        # their channel multiplier, unless SMOKE_WIDTHS names the backbone

# The smoke profile, per backbone (docs/verification.md#smoke-recipe has the measurements): the whole
# digits set (1,442 training, 355 test images), the lr decayed linearly to 0. Short runs at a
# constant lr stay noisy to the end; the linear decay lets the last steps settle. ResNet32 takes lr
# 0.05 on batches of 32 (the paper's lr 0.1 is for batches of 128; at 0.1 FFL x4 diverged in 6
# epochs). VGG16 needs steps to leave the plateau of its head's small init
# (docs/methods.md#vgg16-plateau), which its narrower width pays for; batches of 64 at lr 0.1
# average out the noise of ONE's and OKDDip's dropout heads, which kept them on the plateau at
# batch 32 in some runs, and cost less per image.
# Table 5's other backbones: DenseNet40-12 takes ResNet32's recipe (3 epochs at lr 0.1 left its runs
# at 51-69 %); the quarter-width ResNet110 (4-16 channels, 110 layers) stayed near chance at lr 0.1
# and 0.05 and learns at lr 0.02.
SMOKE_RECIPES = {
    "resnet32": Recipe(epochs=6, batch_size=32, lr=0.05, milestones=(), schedule="linear"),
    "vgg16": Recipe(epochs=12, batch_size=64, lr=0.1, milestones=(), schedule="linear"),
    "resnet110": Recipe(epochs=6, batch_size=32, lr=0.02, milestones=(), schedule="linear"),
    "densenet40_12": Recipe(epochs=6, batch_size=32, lr=0.05, milestones=(), schedule="linear"),
}
SMOKE_WIDTHS = {"vgg16": 0.125}
SMOKE_DEFAULT = Recipe(epochs=3, batch_size=32, milestones=(), schedule="linear")  # not calibrated
# The pipeline check: one epoch of 6 steps (the first 192 training images) tested on the first 180.
PIPELINE_RECIPE = Recipe(epochs=1, batch_size=32, milestones=(), train_samples=192, test_samples=180)
PIPELINE_STEPS = -(-PIPELINE_RECIPE.train_samples // PIPELINE_RECIPE.batch_size)


def stand_in_dataset(profile: str) -> str | None:
    """The dataset every run of `profile` trains on instead of its table's, or None."""
    return EMBEDDED_DATASET if profile in ("smoke", "pipeline") else None


def default_width(profile: str, backbone: str | None = None) -> float:
    """The channel multiplier a run of `profile` (on `backbone`) gets unless it sets one."""
    if not stand_in_dataset(profile):
        return 1.0
    return SMOKE_WIDTHS.get(backbone, EMBEDDED_WIDTH) if profile == "smoke" else EMBEDDED_WIDTH


def resolve_recipe(profile: str, dataset: str, epochs: int | None = None, backbone: str | None = None) -> Recipe:
    """The recipe for a profile, dataset and backbone; `epochs` rescales the schedule to that many epochs."""
    if profile not in PROFILES:
        raise ConfigError(f"unknown profile '{profile}'; valid: {', '.join(PROFILES)}")
    if profile == "smoke":
        recipe = SMOKE_RECIPES.get(backbone, SMOKE_DEFAULT)
    elif profile == "pipeline":
        recipe = PIPELINE_RECIPE
    else:
        recipe = IMAGENET_RECIPE if get_info(dataset).family == "imagenet" else CIFAR_RECIPE
        if profile == "quick" and epochs is None:
            epochs = max(1, round(recipe.epochs * QUICK_FRACTION))
    return recipe if epochs is None or epochs == recipe.epochs else recipe.with_epochs(epochs)


def smoke_changes(backbones=None) -> str:
    """One line: what the smoke profile changes from the paper's recipe (table headers, docs), with
    the recipes of `backbones` (default: every calibrated one)."""
    per_backbone = "; ".join(f"{name} width {default_width('smoke', name):g}, {r.epochs} epochs, batch {r.batch_size}, "
                             f"lr {r.lr:g}" for name, r in SMOKE_RECIPES.items()
                             if backbones is None or name in backbones)
    other = SMOKE_DEFAULT
    return (f"the embedded `{EMBEDDED_DATASET}` data (all of it, no horizontal flip in any view), the lr "
            f"decayed linearly to 0 per step; {per_backbone} (other backbones width {EMBEDDED_WIDTH:g}, "
            f"{other.epochs} epochs, batch {other.batch_size}, lr {other.lr:g}); "
            "VGG16's head keeps its 512 hidden units, its first Linear's std scaled by 1/sqrt(width); "
            "the methods' constants are the paper's")
