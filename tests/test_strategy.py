"""The Strategy registry and typed, validated hyper-parameters."""
from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from okdph.okdph import OKDPHConfig
from okdph.strategy import ConfigError, Interval, build_config, config_to_dict, get_strategy, list_strategies


def test_registry_lists_the_builtin_methods():
    assert {"base", "dml", "kdcl", "okdph"} <= set(list_strategies())
    assert get_strategy("okdph").Config is OKDPHConfig


def test_unknown_method_names_the_valid_ones():
    with pytest.raises(ConfigError, match=r"unknown method 'dmll'; valid: base, dml, ffl, kdcl, okddip, okdph, one, pcl"):
        get_strategy("dmll")


@given(count=st.integers(1, 10_000), unit=st.sampled_from(["b", "batch", "e", "epoch", "_batch", "_epoch"]))
def test_interval_parses_both_spellings(count, unit):
    interval = Interval.parse(f"{count}{unit}")
    assert interval.count == count
    assert interval.unit == ("batch" if "b" in unit else "epoch")
    assert Interval.parse(str(interval)) == interval


@pytest.mark.parametrize("text", ["", "none", "None"])
def test_interval_none_disables_fusion(text):
    assert Interval.parse(text) is None


@pytest.mark.parametrize("text", ["5", "b5", "0b", "5x", "1.5e", "-1e", "five batches"])
def test_malformed_interval_is_one_clear_error(text):
    with pytest.raises(ConfigError, match="malformed interval"):
        Interval.parse(text)


def test_okdph_config_overrides_are_typed():
    config = build_config(OKDPHConfig, {"omega": "0.3", "interval": "5_batch", "same_init": "false"})
    assert config.omega == 0.3 and config.interval == Interval(5, "batch") and config.same_init is False
    assert config_to_dict(config)["interval"] == "5b"


@pytest.mark.parametrize("overrides,message", [
    ({"omega": "1.5"}, r"omega must be in \[0, 1\], got 1.5"),
    ({"beta": "-0.1"}, r"beta must be in \[0, 1\]"),
    ({"gamma": "abc"}, r"gamma expects a float, got 'abc'"),
    ({"temperature": "0"}, r"temperature must be > 0"),
    ({"interval": "7q"}, r"malformed interval '7q'"),
    ({"omgea": "0.5"}, r"unknown hyper-parameter 'omgea'; valid: beta, coefficients, gamma"),
    ({"coefficients": "softmax"}, r"unknown coefficients 'softmax'"),
    ({"same_init": "maybe"}, r"same_init expects a bool"),
])
def test_bad_hyper_parameters_are_refused(overrides, message):
    with pytest.raises(ConfigError, match=message):
        build_config(OKDPHConfig, overrides)


def test_a_checkout_that_is_not_installed_says_so_instead_of_listing_nothing(monkeypatch):
    import okdph.strategy as strategy

    monkeypatch.setattr(strategy, "entry_points", lambda group: ())
    monkeypatch.setattr(strategy, "_LOADED", False)
    with pytest.raises(ConfigError, match=r"not installed in this Python; run `pip install -e \.`"):
        strategy.list_strategies()


def test_list_from_a_checkout_that_is_not_installed_is_one_line(monkeypatch):
    import click
    from click.testing import CliRunner

    from okdph import cli, names

    monkeypatch.setattr(names, "strategy_names", lambda: [])
    result = CliRunner().invoke(cli.main, ["list"])
    assert result.exit_code == 2 and result.stderr.strip() == f"error: {names.NOT_INSTALLED}"
    empty = cli.MethodChoice([])
    with pytest.raises(click.BadParameter, match="not installed in this Python"):
        empty.convert("dml", None, None)
