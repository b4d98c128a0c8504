"""Baseline online-KD strategies, one file each."""
