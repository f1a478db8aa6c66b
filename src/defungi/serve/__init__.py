"""Use trained models: predict on files and folders."""
