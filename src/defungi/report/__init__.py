"""Reports: figures and pages drawn from the files of run and study folders (no training, no model)."""
