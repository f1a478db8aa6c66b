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


def _with_interval(scores: dict[str, Any], key: str) -> str:
    low, high = scores["intervals"][key]
    return f"{scores[key]:.3f} [{low:.3f}, {high:.3f}]"


def build_comparison(run_dirs: list[Path], out_dir: Path) -> Path:
    """Finished runs (e.g. one recipe under grouped and random cross-validation) side by side: image-
    and sample-level macro-F1 and accuracy with their 95% intervals over samples; for two runs, the
    difference in points and whether it is larger than the intervals. Returns the HTML path."""
    metrics = []
    for run_dir in run_dirs:
        path = RunLayout(Path(run_dir)).metrics
        if not path.exists():
            raise DefungiError(f"{run_dir}: not a finished run folder (no metrics.json)")
        metrics.append(read_json(path))
    page = Page("defungi: runs side by side")
    page.text(
        "Out-of-fold scores for cross-validation runs, test-part scores otherwise; macro-averaged over the classes, "
        "95% intervals from a bootstrap over physical samples. Per sample: the mean probability of its images."
    )
    rows = []
    for run_dir, m in zip(run_dirs, metrics, strict=True):
        test, protocol = m["test"], m["protocol"]
        how = f"{protocol['cv_folds']}-fold CV" if protocol.get("cv_folds") else "one split"
        cells = [_with_interval(test, "f1"), _with_interval(test["samples"], "f1"), _with_interval(test, "accuracy")]
        rows.append(
            [str(run_dir), m["model"], f"{protocol['split']}, {how}", f"{test['n']} / {test['samples']['n']}", *cells]
        )
    header = ["run", "model", "split", "images / samples", "F1 per image", "F1 per sample", "accuracy per image"]
    page.table(Table(header, rows))
    if len(metrics) == 2:
        lines = []
        for level, get in (("per image", lambda t: t), ("per sample", lambda t: t["samples"])):
            a, b = (get(m["test"]) for m in metrics)
            apart = (
                a["intervals"]["f1"][0] > b["intervals"]["f1"][1] or b["intervals"]["f1"][0] > a["intervals"]["f1"][1]
            )
            verdict = (
                "larger than the intervals (they do not overlap)" if apart else "within the intervals (they overlap)"
            )
            lines.append([level, f"{100 * (b['f1'] - a['f1']):+.1f} points", verdict])
        page.heading("Second run minus first", level=2)
        page.table(Table(["macro-F1", "difference", "against the 95% intervals"], lines))
    return page.write(out_dir)
