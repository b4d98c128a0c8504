"""The options of `okdph-bench pacbayes` and their defaults (okdph.analysis.pacbayes implements them),
importable without torch: the CLI's --help shows them."""
from __future__ import annotations

VARIANTS = ("magnitude", "init", "orig")
DEFAULT_VARIANT = "magnitude"        # reproduces Table 5's ≈ 200·d (okdph.analysis.pacbayes' docstring)
DEFAULT_EPSILON = 0.1                # target mean training-loss increase (LPF-SGD's ε)
DEFAULT_SAMPLES = 10                 # Monte-Carlo perturbations per step (both public codes use 10)
DEFAULT_TOLERANCE = 1e-4             # stop when |increase − ε| ≤ this (0.1% of ε: the scale to ~0.05%)
DEFAULT_MAX_ITERATIONS = 40          # loss evaluations of the search, bracketing included
DEFAULT_SEED = 0                     # seed of the noise directions
