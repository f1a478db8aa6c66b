"""Experiments: one fit, learning curves, grid searches, cross-validation, the studies."""
