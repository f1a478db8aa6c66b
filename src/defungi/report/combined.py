"""Both studies' final models on one page, beside the published figures, from the study folders alone."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from defungi.errors import DefungiError
from defungi.layout import RunLayout, StudyLayout, read_json
from defungi.report.page import Page, Table, metrics_table
from defungi.report.run import render_run
from defungi.report.study import final_rows


def read_states(study_dirs: list[Path]) -> list[dict[str, Any]]:
    """The study.json of each folder; a folder that is not a finished study is a clear error."""
    states = []
    for study_dir in study_dirs:
        path = StudyLayout(study_dir).state
        if not path.exists():
            raise DefungiError(
                f"{study_dir}: not a study folder (no study.json); run 'defungi study NAME --out {study_dir}' first"
            )
        state = read_json(path)
        if "final" not in state.get("steps", {}):
            raise DefungiError(
                f"{study_dir}: the study has no final step yet; run 'defungi study {state['study']} --out "
                f"{study_dir}' first"
            )
        states.append(state)
    return states


def comparison_table(states: list[dict[str, Any]]) -> Table:
    """Final test metrics of each study (grouped and random split) beside its published figures."""
    rows: dict[str, dict[str, Any]] = {}
    for state in states:
        rows |= final_rows(state["study"], state["steps"]["final"], state["published"])
    return metrics_table(rows)


def build_combined_report(study_dirs: list[Path], out_dir: Path) -> Path:
    """Metrics, confusion matrices, parameters, training time and inference images/s of every
    study's final models on one page; returns the HTML path."""
    states = read_states(study_dirs)
    page = Page("defungi: both final models beside the published study")
    page.text("Test metrics, macro-averaged over the classes.")
    page.table(comparison_table(states))
    details = []
    for state in states:
        final = state["steps"]["final"]
        members = f" (ensemble of {final['ensemble']})" if final["ensemble"] > 1 else ""
        train_min = final["timing"]["grouped"]["train_seconds"] / 60
        details.append(
            [
                f"{state['study']}{members}",
                f"{final['parameters'] / 1e6:.2f} M",
                f"{train_min:.1f} min",
                f"{final['inference_images_per_s']:.0f}",
            ]
        )
    page.table(Table(["model", "parameters", "training time (grouped final fit)", "inference images/s"], details))
    for study_dir, state in zip(study_dirs, states, strict=True):
        for mode, run in state["steps"]["final"]["runs"].items():
            run_dir = Path(study_dir) / run
            if not RunLayout(run_dir).figure("confusion_test").exists():
                render_run(run_dir)
            page.heading(f"{state['study']}, {mode} split", level=3)
            page.figure(RunLayout(run_dir).figure("confusion_test"))
    return page.write(out_dir)
