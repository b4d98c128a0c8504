"""The learning-rate schedules of a recipe (okdph.engine.recipe): what both engines read per step."""
from __future__ import annotations

import pytest

from okdph.engine.recipe import Recipe, resolve_recipe
from okdph.errors import ConfigError


def linear(epochs: int, warmup: int = 0) -> Recipe:
    return Recipe(epochs=epochs, milestones=(), schedule="linear", warmup_epochs=warmup)


def test_linear_decay_goes_from_1_to_1_over_T():
    factors = [linear(2).step_factor(s, 4) for s in range(8)]
    assert factors == [1 - s / 8 for s in range(8)]


def test_warm_up_rises_to_1_then_decays_to_0():
    factors = [linear(3, warmup=1).step_factor(s, 4) for s in range(12)]
    assert factors[:4] == [0.25, 0.5, 0.75, 1.0]           # the first epoch's steps
    assert factors[4:] == [1 - s / 8 for s in range(8)]    # then the decay over the other 8 steps
    assert min(factors) > 0


def test_warm_up_needs_the_linear_schedule_and_room_to_decay():
    with pytest.raises(ConfigError, match="linear schedule"):
        Recipe(epochs=4, milestones=(2,), warmup_epochs=1)
    with pytest.raises(ConfigError, match="fewer epochs"):
        linear(2, warmup=2)
    assert linear(8, warmup=2).with_epochs(4).warmup_epochs == 1  # scaled, and still leaves a decay
    assert linear(4, warmup=3).with_epochs(2).warmup_epochs == 1  # 1.5 rounds to 2, capped at epochs - 1


def test_the_committed_smoke_recipes_have_no_warm_up():
    # measured and rejected for VGG16 (docs/verification.md#smoke-recipe); a warm-up changes results
    assert resolve_recipe("smoke", "digits", backbone="vgg16").warmup_epochs == 0
    assert resolve_recipe("smoke", "digits", backbone="resnet32").warmup_epochs == 0
