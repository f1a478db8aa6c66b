"""The published studies, step by step: `run_study('resnet34' | 'convmixer', ...)`."""

from defungi.experiments.studies import convmixer, resnet34  # noqa: F401  (register the studies)
from defungi.experiments.studies.runner import STUDIES, run_study

__all__ = ["STUDIES", "run_study"]
