"""The training engine: recipes, the reference execution path, run records."""
