"""A run folder's figures, drawn from its files alone (no model, no training)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from defungi.layout import EvaluationLayout, RunLayout, read_history, read_table
from defungi.report.page import Page, interval_table
from defungi.report.plots import (
    contact_sheet,
    plot_confusion,
    plot_epoch_curves,
    plot_folds,
    plot_history,
    plot_reliability,
    plot_risk_coverage,
)
from defungi.report.reliability import (
    calibration_section,
    card_section,
    selective_section,
    set_section,
    trust_section,
)
from defungi.results.ood import OodCheck
from defungi.results.run import Evaluation, RunMetrics, model_card, read_evaluation, read_run_metrics


def render_run(run_dir: str | Path) -> list[Path]:
    """training_curves.png (the members' curves for an ensemble), confusion_PART.png per scored
    part, refused.png (the held-out images refused as not fungus micrographs, where any were) and
    excluded.png (where any image was left out), from metrics.json, history.csv, the held-out
    predictions and excluded.csv; returns the figures. A cross-validation's page shows its own
    (folds.png compares the folds); a fold's are drawn by `defungi report RUN/fold-K`."""
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
        title = f"{label}: {metrics.protocol.cv('cross-validation')} ({split})"
        figures.append(plot_folds(metrics.folds, run.figure("folds"), title))
    if metrics.trust is not None:
        title = f"{label}: accuracy of the specimens answered ({metrics.trust.source})"
        figures.append(plot_risk_coverage(metrics.trust.selective, run.figure("risk_coverage"), title))
    scored_images = held_out(run)
    if scored_images.exists():
        figures.append(render_confident_errors(scored_images, run.figure("confident_errors")))
    if metrics.ood is not None and (refused := refused_images(scored_images, metrics.ood)):
        figures.append(render_refused(refused, metrics.ood, run.figure("refused")))
    if run.excluded.exists() and (excluded := read_table(run.excluded)):
        figures.append(render_exclusions(excluded, metrics.protocol.variance_threshold, run.figure("excluded")))
    return figures


def held_out(run: RunLayout) -> Path:
    """The predictions of a run's held-out images: out of fold for a cross-validation, else its test part's."""
    return run.oof if run.oof.exists() else run.predictions("test")


def render_confident_errors(predictions: Path, path: Path, limit: int = 20) -> Path:
    """A contact sheet of the most confidently wrong images of a predictions CSV (test or out of
    fold), each captioned with its file name, true -> predicted and the model's probability of that."""
    shown = confident_errors(read_table(predictions))
    captions = [f"{short_name(r['path'])}\n{r['class']}->{r['prediction']} {p:.2f}" for p, r in shown[:limit]]
    what = f"most confidently wrong (of {len(shown)} wrong; true->predicted, the model's probability)"
    return contact_sheet([Path(r["path"]) for _, r in shown[:limit]], captions, path, limit=limit, what=what)


def confident_errors(rows: list[dict[str, str]]) -> list[tuple[float, dict[str, str]]]:
    """The wrong rows of a predictions table with their predicted class's probability, most probable first."""
    wrong = [(float(r[f"p_{r['prediction']}"]), r) for r in rows if r["prediction"] and r["prediction"] != r["class"]]
    return sorted(wrong, key=lambda pr: -pr[0])  # refused images have no prediction


def short_name(path: str, width: int = 24) -> str:
    """A file's name as a thumbnail's caption holds it: whole, or its start and end around an ellipsis."""
    name = Path(path).name
    return name if len(name) <= width else f"{name[: width // 2 - 1]}…{name[-(width // 2) :]}"


def refused_images(predictions: Path, check: OodCheck) -> list[dict[str, str]]:
    """The rows of a predictions table (test, out of fold or an evaluation's, with refusal scores) whose
    refusal score is over check's: refused as not fungus micrographs, highest score first; none
    without the table."""
    if not predictions.exists():
        return []
    refused = [r for r in read_table(predictions, ("ood",)) if float(r["ood"]) > check.refuse_over]
    return sorted(refused, key=lambda r: -float(r["ood"]))


def refused_as(check: OodCheck) -> str:
    """What the refused images are, with the score over which they were."""
    return f"refused as not a fungus micrograph (refusal score over {check.refuse_over:g})"


def render_refused(rows: list[dict[str, str]], check: OodCheck, path: Path) -> Path:
    """A contact sheet of refused_images' rows, each captioned with its file name and refusal score."""
    captions = [f"{short_name(r['path'])}\nrefusal score {float(r['ood']):.2f}" for r in rows]
    return contact_sheet([Path(r["path"]) for r in rows], captions, path, what=refused_as(check))


def render_exclusions(rows: list[dict[str, str]], variance_threshold: float | None, path: Path) -> Path:
    """A contact sheet of the images left out (excluded.csv's rows, or an evaluation's), each captioned
    with its file name and why (see exclusion_caption)."""
    captions = [exclusion_caption(r, variance_threshold) for r in rows]
    what = "left out (unreadable, or no fungus visible)"
    return contact_sheet([Path(r["path"]) for r in rows], captions, path, what=what)


def exclusion_caption(row: dict[str, str], variance_threshold: float | None) -> str:
    """A left-out image's file name and why, with its figure: 'no fungus visible, v=14.20 < 15' (its grey
    variance alone where the threshold was not recorded), or 'unreadable (OSError)' (its error's type)."""
    name = short_name(row["path"])
    if not row["grey_variance"]:  # it was never decoded
        return f"{name}\nunreadable\n({row['reason'].split(':')[0]})"
    under = f" < {variance_threshold:g}" if variance_threshold is not None else ""
    return f"{name}\nno fungus visible,\nv={float(row['grey_variance']):.2f}{under}"  # 14.96 < 15, not 15.0 < 15


def not_answered_line(parts: list[tuple[int, str, Path]]) -> str:
    """One sentence on what was not answered: per (count, what, figure) the count and the figure that
    shows them, or 'none'."""
    said = [f"{what}: {n}, shown in {figure.name}" if n else f"{what}: none" for n, what, figure in parts]
    return "Not answered: " + "; ".join(said) + "."


def build_run_report(run_dir: str | Path) -> Path:
    """report.html (and .md) of one finished run: what it is, its scores per image and per specimen
    with intervals, how far its answers can be trusted, and its figures (drawn if missing)."""
    run = RunLayout(Path(run_dir))
    metrics = read_run_metrics(run.metrics)
    figures = render_run(run.root)
    page = Page(f"defungi: {run.root.name}")
    card = model_card(metrics)
    page.text(card.summary() + "." if card else f"{metrics.model} ({metrics.kind}); it scored no test part.")
    page.text(
        f"{metrics.kind} run; {metrics.protocol.split} split; images {metrics.protocol.image_size} px; trained in "
        f"{metrics.protocol.precision}; {metrics.parameters:,} parameters; {metrics.stop_reason}."
    )
    rows: dict[str, Any] = {}
    for part, scores in metrics.parts.items():
        name = metrics.reported_name if part == "test" else part
        rows[f"{name}, per image"] = scores
        if scores.samples is not None:
            rows[f"{name}, per specimen"] = scores.samples
    page.table(interval_table(rows))
    if metrics.trust is not None:
        trust_section(page, metrics.trust, run.figure("risk_coverage"))
    if metrics.ood is not None:
        page.text(refusals_line(metrics.ood, f"Held-out micrographs ({metrics.ood.source})"))
    page.text(not_answered_line(_run_not_answered(run, metrics)))
    page.heading("Figures", level=2)
    for figure in figures:
        if figure.parent == run.root and figure != run.figure("risk_coverage"):
            page.figure(figure)
    return page.write(run.page)


def _run_not_answered(run: RunLayout, metrics: RunMetrics) -> list[tuple[int, str, Path]]:
    """A run's held-out images refused (where it has a refusal detector) and its images left out before
    training, for not_answered_line."""
    parts = []
    if (check := metrics.ood) is not None:
        refused = refused_images(held_out(run), check)
        parts.append((len(refused), f"held-out images ({check.source}) {refused_as(check)}", run.figure("refused")))
    why = f"unreadable, or grey variance under {metrics.protocol.variance_threshold:g}: no fungus visible"
    return [*parts, (metrics.protocol.excluded, f"images left out before training ({why})", run.figure("excluded"))]


def refusals_line(check: OodCheck, whose: str) -> str:
    """A sentence on what the refusal detector did to some micrographs."""
    return (
        f"{whose}: {check.summary()} (a score of 1 is each model's {check.quantile:.0%} quantile of its held-out "
        f"micrographs; over {check.refuse_over:g} an image is refused, between 1 and {check.refuse_over:g} answered "
        "and flagged)."
    )


def _reliability_figures(result: Evaluation, layout: EvaluationLayout, title: str) -> list[Path]:
    """An evaluation's reliability diagram per unit: raw and calibrated confidence (one curve at T=1)."""
    return [
        plot_reliability(
            {"raw": c.raw, f"calibrated, T={c.temperature:.2f}": c.calibrated}
            if c.temperature != 1
            else {"raw = calibrated (T=1)": c.raw},
            layout.figure(f"reliability_{unit}"),
            f"{title}, per {unit}",
            counted=f"{unit}s",
        )
        for unit, c in result.calibration.items()
    ]


def _evaluation_not_answered(
    result: Evaluation, layout: EvaluationLayout
) -> tuple[list[Path], list[tuple[int, str, Path]]]:
    """An evaluation's images refused (where the run has a refusal detector) and left out: their figures,
    where there are any, and what not_answered_line says of them."""
    figures, parts = [], []
    if result.ood is not None:
        refused = refused_images(layout.predictions, result.ood)
        if refused:
            figures.append(render_refused(refused, result.ood, layout.figure("refused")))
        parts.append((len(refused), f"images {refused_as(result.ood)}", layout.figure("refused")))
    if result.excluded:
        figures.append(render_exclusions(result.excluded, result.variance_threshold, layout.figure("excluded")))
    what = "images left out (unreadable, or no fungus visible)"
    parts.append((len(result.excluded), what, layout.figure("excluded")))
    return figures, parts


def build_evaluation_report(out_dir: str | Path) -> Path:
    """The figures (confusion per image and per specimen, reliability per unit, most confidently wrong
    images, those refused and left out) and report.html of an evaluation folder, from its metrics.json and
    predictions.csv: the card check first, then the scores, sets, refusals and what was not answered,
    selective answers and calibration."""
    layout = EvaluationLayout(Path(out_dir))
    result = read_evaluation(layout.metrics)
    scores, title = result.scores, f"{result.model} on {Path(result.data).name}"
    reliability = _reliability_figures(result, layout, title)
    figures = [plot_confusion(scores.confusion_matrix, scores.classes, layout.confusion, f"{title}, images")]
    if scores.samples is not None:
        path = layout.figure("confusion_specimens")
        figures.append(plot_confusion(scores.samples.confusion_matrix, scores.classes, path, f"{title}, specimens"))
    if layout.predictions.exists():
        figures.append(render_confident_errors(layout.predictions, layout.figure("confident_errors")))
    shown, not_answered = _evaluation_not_answered(result, layout)
    figures += shown
    page = Page(f"defungi: {title}")
    page.text(
        f"{result.run} answering {result.data}: {scores.n} images, specimens grouped by {result.group_by}. "
        f"Tables: {layout.predictions.name} (per image), {layout.specimens.name} (per specimen)."
    )
    if result.card:
        card_section(page, result.card)
    page.heading("Scores", level=2)
    rows: dict[str, Any] = {"per image": scores}
    if scores.samples is not None:
        rows["per specimen"] = scores.samples
    page.table(interval_table(rows))
    if result.sets and result.level is not None:
        page.heading("Prediction sets", level=2)
        set_section(page, [(result.level, unit, "as answered", check) for unit, check in result.sets.items()])
    if result.ood is not None:
        page.text(refusals_line(result.ood, "This folder's images"))
    page.text(not_answered_line(not_answered))
    asked = [result.selective] if result.selective and result.selective not in result.promises else []
    if result.promises or asked:
        selective_section(page, [*result.promises, *asked])
    if result.calibration:
        calibration_section(page, result.calibration, reliability)
    page.heading("Figures", level=2)
    for figure in figures:
        page.figure(figure)
    return page.write(layout.page)
