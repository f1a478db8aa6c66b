"""The main job (`make run`): both published studies (resumable), then the combined report."""

from __future__ import annotations

from pathlib import Path

from defungi.config import Config
from defungi.experiments.studies import run_study
from defungi.report.build import build_combined_report, comparison_rows
from defungi.report.plots import metrics_table


def run_main_job(config: Config, out: Path) -> Path:
    """Run (or resume) the ResNet-34 and ConvMixer studies into out, print the comparison, return the report."""
    states = {}
    for name in ("resnet34", "convmixer"):
        states[name] = run_study(name, config, out / f"study-{name}")
        print(f"study {name}: report {states[name]['report']}", flush=True)
    page = build_combined_report([out / f"study-{name}" for name in states], out / "report")
    print()
    print(metrics_table(comparison_rows(list(states.values()))))
    print(f"\nreport: {page}")
    return page
