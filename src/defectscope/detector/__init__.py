"""The PatchCore-style detector: memory bank, coreset, kNN scoring, calibration, model file."""
