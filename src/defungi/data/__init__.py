"""Data: scan folders, filter outliers, cache decoded images, split, augment."""
