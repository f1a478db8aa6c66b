"""Training: the epoch loop, callbacks and metrics."""
