"""okdph-bench: online knowledge distillation benchmark (OKDPH, CVPR 2023, and baselines)."""

__version__ = "0.1.0"
