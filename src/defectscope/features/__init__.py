"""Backbones, preprocessing and patch features."""
