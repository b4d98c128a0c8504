"""Seed statistics: the spread, confidence interval and two-sample test of the numbers of a cell
(one number per seed). Tables (okdph.bench.render) and `okdph-bench compare` (okdph.bench.compare)
both use these and nothing else; docs/protocol.md#which-std says what each one means and why.

Every function returns None where it cannot say anything: a spread, an interval or a test needs at
least two runs on each side.

scipy gives the t distribution's quantiles and tail (the tests themselves are written out here):
it comes with scikit-learn (a dependency for the digits data) and pyproject.toml names it explicitly.
"""
from __future__ import annotations

import math
import statistics

from okdph.names import STD_CONVENTIONS

CONFIDENCE = 0.95   # of the confidence interval in a table's CSV/JSON
TABLE_ALPHA = 0.05  # a table marks OKDPH vs the best baseline when Welch's p is below this


def check_std(convention: str) -> None:
    from okdph.errors import ConfigError

    if convention not in STD_CONVENTIONS:
        raise ConfigError(f"unknown std '{convention}'; valid: {', '.join(STD_CONVENTIONS)}")


def std(values: list[float], convention: str) -> float | None:
    """'sample': n − 1 in the denominator (statistics.stdev); 'population': n (statistics.pstdev,
    what the official logs print as np.std). None for fewer than two values: one run has no spread,
    and a population std of 0.00 would read as a measured one."""
    check_std(convention)
    if len(values) < 2:
        return None
    return statistics.stdev(values) if convention == "sample" else statistics.pstdev(values)


def confidence_interval(values: list[float], level: float = CONFIDENCE) -> tuple[float, float] | None:
    """The t-based interval of the mean: mean ± t(1 − (1 − level)/2, n − 1) · s / √n, s the sample
    std (the interval is defined on it, whichever std a table shows). None for fewer than two values."""
    n = len(values)
    if n < 2:
        return None
    from scipy.stats import t

    mean = statistics.fmean(values)
    half = t.ppf(1 - (1 - level) / 2, n - 1) * statistics.stdev(values) / math.sqrt(n)
    return mean - half, mean + half


def welch_p(a: list[float], b: list[float]) -> float | None:
    """Two-sided p-value of Welch's t-test (unequal variances) that `a` and `b` have the same mean.
    None when a side has fewer than two values.

    Where neither side varies (deterministic runs, or every seed at the same accuracy) the t
    statistic is 0/0 or ±inf: p is then its limit as the spread goes to 0, 1.0 for equal means and
    0.0 for different ones."""
    if len(a) < 2 or len(b) < 2:
        return None
    # the squared standard errors of the two means
    error_a, error_b = statistics.variance(a) / len(a), statistics.variance(b) / len(b)
    difference = statistics.fmean(a) - statistics.fmean(b)
    if error_a + error_b == 0:
        return 1.0 if difference == 0 else 0.0
    from scipy.stats import t

    statistic = difference / math.sqrt(error_a + error_b)
    # Welch–Satterthwaite degrees of freedom
    dof = (error_a + error_b) ** 2 / (error_a ** 2 / (len(a) - 1) + error_b ** 2 / (len(b) - 1))
    return float(2 * t.sf(abs(statistic), dof))


def rank_test_smallest_p(n_a: int, n_b: int) -> float:
    """The smallest two-sided p an exact rank test (Mann-Whitney U) can give with n_a and n_b values:
    both groups completely separated, 2 of the C(n_a + n_b, n_a) orderings. 5 vs 5: 0.0079; 3 vs 3:
    0.1; 2 vs 2: 0.33. It is why the suite tests seeds with Welch's t-test."""
    return min(1.0, 2 / math.comb(n_a + n_b, n_a))
