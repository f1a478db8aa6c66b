"""Study folders -> one report: HTML with every figure embedded (readable offline) and Markdown."""

from __future__ import annotations

import base64
import html
import re
from pathlib import Path
from typing import Any

from defungi.report.plots import metrics_table
from defungi.utils import atomic_write_text

METRICS = ("accuracy", "precision", "recall", "f1")


def _md_to_html_table(md: str) -> str:
    """The small Markdown tables this package writes -> HTML."""
    lines = [line.strip().strip("|").split("|") for line in md.strip().splitlines() if not re.match(r"^\|?[-| ]+\|?$", line.strip())]
    head, *body = lines
    cells = lambda row, tag: "".join(f"<{tag}>{html.escape(c.strip())}</{tag}>" for c in row)  # noqa: E731
    return "<table><tr>" + cells(head, "th") + "</tr>" + "".join("<tr>" + cells(r, "td") + "</tr>" for r in body) + "</table>"


def _img(path: Path) -> str:
    data = base64.b64encode(path.read_bytes()).decode()
    return f'<img src="data:image/png;base64,{data}" alt="{html.escape(path.name)}">'


def final_table(step: dict[str, Any], published: dict[str, float]) -> str:
    """Markdown table of the final test metrics beside the published figures."""
    rows = {f"defungi, {mode} split": m for mode, m in step["test"].items()} | {"published study (random split)": published}
    return metrics_table(rows, METRICS)


def build_study_report(state: dict[str, Any], out_dir: Path, published: dict[str, float]) -> Path:
    """report.html and report.md in out_dir from the study state; returns the HTML path."""
    name = state["study"]
    cfg = state["config"]
    protocol = (
        f"Profile `{cfg['profile']}`: {cfg['data']['image_size']} px images, outliers under grey variance "
        f"{cfg['data']['variance_threshold']:g} excluded, `{cfg['data']['split']}` split (train/val/test "
        f"{1 - cfg['data']['val_fraction'] - cfg['data']['test_fraction']:.0%}/{cfg['data']['val_fraction']:.0%}/{cfg['data']['test_fraction']:.0%}, seed {cfg['data']['seed']}). "
        f"Training batches are class-balanced; predictions weight the training class shares by the power "
        f"{cfg['train'].get('prior_weight', 0):g} (0: none). Metrics are macro-averaged over the classes."
    )
    md = [f"# The {name} study\n", protocol + "\n"]
    body = [f"<h1>The {html.escape(name)} study</h1>", f"<p>{html.escape(protocol)}</p>"]
    for key, step in state["steps"].items():
        step_dir = next(out_dir.glob(f"*-{key}"), out_dir)
        md.append(f"## {step['title']}\n\n{step['summary']}\n")
        body.append(f"<h2>{html.escape(step['title'])}</h2><p>{html.escape(step['summary'])}</p>")
        if step.get("choice"):
            choice = ", ".join(f"{k.split('.')[-1]} = {v}" for k, v in step["choice"].items())
            md.append(f"Carried forward: {choice}.\n")
            body.append(f"<p><b>Carried forward:</b> {html.escape(choice)}</p>")
        tables = [step["table"]] if step.get("table") else []
        if key == "final":
            tables.insert(0, final_table(step, published))
            sizes = ", ".join(f"{mode} split {sum(r['support'] for r in m['per_class'].values())} images" for mode, m in step["test"].items())
            md.append(f"Test parts: {sizes}.\n")
            body.append(f"<p>Test parts: {html.escape(sizes)}.</p>")
        for table in tables:
            md.append(table)
            body.append(_md_to_html_table(table))
        for fig in step.get("figures", []):
            path = step_dir / fig
            md.append(f"![{fig}]({path.relative_to(out_dir)})\n")
            body.append(_img(path))
        md.append(f"_Step time: {step['seconds'] / 60:.1f} min._\n")
        body.append(f"<p class='time'>Step time: {step['seconds'] / 60:.1f} min.</p>")
    style = "body{font-family:sans-serif;max-width:1100px;margin:auto;padding:1em}img{max-width:100%;display:block;margin:.5em 0}table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}.time{color:#777}"
    page = f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(name)} study</title><style>{style}</style></head><body>{''.join(body)}</body></html>"
    atomic_write_text(out_dir / "report.md", "\n".join(md))
    atomic_write_text(out_dir / "report.html", page)
    return out_dir / "report.html"


def inference_images_per_s(run_dir: Path, n_images: int = 256, batch_size: int = 64) -> float:
    """Images/s of the run's model predicting (no test-time augmentation) on synthetic inputs of its size."""
    import time

    import numpy as np

    from defungi.train.checkpoint import load_trained
    from defungi.train.loop import predict_proba

    trained = load_trained(run_dir)
    size = trained.preprocess.image_size
    images = np.random.default_rng(0).integers(0, 256, (n_images, size, size, 3), dtype=np.uint8)
    amp = trained.config.train.amp  # the precision 'defungi predict' uses
    predict_proba(trained.model, images[:batch_size], trained.preprocess, trained.device, batch_size, amp=amp)  # warm-up
    start = time.perf_counter()
    predict_proba(trained.model, images, trained.preprocess, trained.device, batch_size, amp=amp)
    return n_images / (time.perf_counter() - start)


def comparison_rows(states: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Final test metrics of each study (grouped and random split) beside its published figures."""
    from defungi.experiments.studies import STUDIES

    rows: dict[str, dict[str, Any]] = {}
    for state in states:
        name = state["study"]
        for mode, metrics in state["steps"]["final"]["test"].items():
            rows[f"{name}, defungi ({mode} split)"] = metrics
        rows[f"{name}, published (random split)"] = STUDIES[name].published
    return rows


def build_combined_report(study_dirs: list[Path], out_dir: Path) -> Path:
    """Both final models side by side with the published figures: metrics, confusion matrices,
    parameters, training time, inference images/s. Returns the HTML path."""
    import json

    states = []
    details, images = [], []
    for study_dir in study_dirs:
        state = json.loads((study_dir / "study.json").read_text())
        final = state["steps"].get("final")
        if final is None:
            raise FileNotFoundError(f"{study_dir}: the study has no final step yet; run 'defungi study {state['study']}' first")
        states.append(state)
        name = state["study"]
        run = Path(final["runs"]["grouped"])
        speed = inference_images_per_s(run)
        members = json.loads((run / "metrics.json").read_text())["protocol"].get("ensemble", 1)
        details.append(f"| {name}{f' (ensemble of {members})' if members > 1 else ''} | {final['parameters'] / 1e6:.2f} M | {final['timing']['grouped']['train_seconds'] / 60:.1f} min | {speed:.0f} |")
        for mode in final["runs"]:
            images.append((f"{name}, {mode} split", Path(final["runs"][mode]) / "confusion_test.png"))
    metrics_md = metrics_table(comparison_rows(states), METRICS)
    detail_md = "| model | parameters | training time (grouped final fit) | inference images/s |\n|---|---|---|---|\n" + "\n".join(details) + "\n"
    md = ["# defungi: both final models beside the published study\n", "Test metrics, macro-averaged over the classes.\n", metrics_md, detail_md]
    body = ["<h1>defungi: both final models beside the published study</h1>", "<p>Test metrics, macro-averaged over the classes.</p>", _md_to_html_table(metrics_md), _md_to_html_table(detail_md)]
    for title, path in images:
        md.append(f"### {title}\n\n![confusion]({path})\n")
        body.append(f"<h3>{html.escape(title)}</h3>{_img(path)}")
    out_dir.mkdir(parents=True, exist_ok=True)
    page = f"<!doctype html><html><head><meta charset='utf-8'><title>defungi report</title><style>body{{font-family:sans-serif;max-width:1100px;margin:auto}}img{{max-width:480px}}table{{border-collapse:collapse}}td,th{{border:1px solid #ccc;padding:3px 8px}}</style></head><body>{''.join(body)}</body></html>"
    atomic_write_text(out_dir / "report.md", "\n".join(md))
    atomic_write_text(out_dir / "report.html", page)
    return out_dir / "report.html"
