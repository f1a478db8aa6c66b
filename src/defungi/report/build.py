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
        "Metrics are macro-averaged over the classes."
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
