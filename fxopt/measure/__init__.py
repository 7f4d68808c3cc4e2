"""Measurement on a real device: bench, per-node profile, whole-step profile, calibration, ablation."""
