"""A run folder's figures, drawn from its files alone (no model, no training)."""

from __future__ import annotations

from pathlib import Path

from defungi.layout import EvaluationLayout, RunLayout, read_history, read_table
from defungi.report.plots import (
    contact_sheet,
    plot_confusion,
    plot_epoch_curves,
    plot_folds,
    plot_history,
    plot_reliability,
)
from defungi.results.run import read_evaluation, read_run_metrics


def render_run(run_dir: str | Path) -> list[Path]:
    """training_curves.png (the members' curves for an ensemble), confusion_PART.png per scored
    part and excluded.png, from metrics.json, history.csv and excluded.csv; returns the figures."""
    run = RunLayout(Path(run_dir))
    metrics = read_run_metrics(run.metrics)
    split, model, members = metrics.protocol.split, metrics.model, metrics.members
    figures = []
    if metrics.kind == "ensemble":
        histories = [read_history(run.member(k).history) for k in range(len(members))]
        title = f"{model} x{len(members)}: members' validation macro-F1 per epoch"
        figures.append(
            plot_epoch_curves(histories, [f"seed {m.seed}" for m in members], run.figure("training_curves"), title)
        )
    elif history := (read_history(run.history) if run.history.exists() else []):
        figures.append(plot_history(history, run.figure("training_curves"), f"{model} ({split} split)"))
    label = f"{model} x{len(members)}" if members else model
    for part in ("val", "test"):
        if part not in metrics.parts:
            continue
        scored = metrics.parts[part]
        name = metrics.reported_name if part == "test" else part
        for level, scores, suffix in (("images", scored, ""), ("samples", scored.samples, "_samples")):
            if scores is not None:
                title = f"{label}, {name}, {level} ({split} split)"
                path = run.figure(f"confusion_{part}{suffix}")
                figures.append(plot_confusion(scores.confusion_matrix, metrics.classes, path, title))
    test = metrics.parts.get("test")
    if test is not None and test.calibration is not None:
        title = f"{label}, {metrics.reported_name}"
        figures.append(plot_reliability(test.calibration, run.figure("reliability_test"), title))
    if metrics.kind == "cv":
        for k in range(len(metrics.folds)):
            figures += render_run(run.fold(k).root)
        title = f"{label}: {len(metrics.folds)}-fold cross-validation ({split})"
        figures.append(plot_folds(metrics.folds, run.figure("folds"), title))
    scored_images = run.oof if run.oof.exists() else run.predictions("test")
    if scored_images.exists():
        figures.append(render_confident_errors(scored_images, run.figure("confident_errors")))
    if run.excluded.exists():
        figures.append(render_exclusions(run.excluded, run.figure("excluded")))
    return figures


def render_confident_errors(predictions: Path, path: Path, limit: int = 20) -> Path:
    """A contact sheet of the most confidently wrong images of a predictions CSV (test or out of
    fold), each captioned true -> predicted and the predicted class's probability."""
    wrong = []
    for r in read_table(predictions):
        if r["prediction"] != r["class"]:
            wrong.append((float(r[f"p_{r['prediction']}"]), r))
    wrong.sort(key=lambda pr: -pr[0])
    shown = wrong[:limit]
    captions = [f"{r['class']}->{r['prediction']} {p:.2f}" for p, r in shown]
    paths = [Path(r["path"]) for _, r in shown]
    return contact_sheet(paths, captions, path, limit=limit, what=f"most confidently wrong (of {len(wrong)} wrong)")


def render_exclusions(table: Path, path: Path) -> Path:
    """A contact sheet of the images listed in an excluded.csv."""
    rows = read_table(table)
    captions = [f"{r['label']} v={r['grey_variance'] or '?'}" for r in rows]
    return contact_sheet([Path(r["path"]) for r in rows], captions, path)


def render_evaluation(out_dir: str | Path) -> Path:
    """confusion.png of an evaluation folder, from its metrics.json."""
    evaluation = EvaluationLayout(Path(out_dir))
    result = read_evaluation(evaluation.metrics)
    title = f"{result.model} on {Path(result.data).name}"
    return plot_confusion(result.scores.confusion_matrix, result.scores.classes, evaluation.confusion, title)
