"""One small renderer: a page of headings, paragraphs, tables and figures, written as HTML
(figures embedded, readable offline) and as Markdown (figures linked) from the same blocks."""

from __future__ import annotations

import base64
import html
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from defungi.layout import PageLayout
from defungi.results.run import PairedDifference, Scores
from defungi.utils import atomic_write_text

METRICS = ("accuracy", "precision", "recall", "f1")
STYLE = (
    "body{font-family:sans-serif;max-width:1100px;margin:auto;padding:1em}"
    "img{max-width:100%;display:block;margin:.5em 0}"
    "table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}"
    "td:first-child,th:first-child{text-align:left}.note{color:#777}"
)


@dataclass
class Table:
    """A header and rows of already formatted cells."""

    header: list[str]
    rows: list[list[str]]

    def markdown(self) -> str:
        lines = [self.header, ["---"] * len(self.header), *self.rows]
        return "".join("| " + " | ".join(cells) + " |\n" for cells in lines)

    def text(self) -> str:
        """Columns aligned with spaces, for a terminal."""
        lines = [self.header, *self.rows]
        widths = [max(len(cells[i]) for cells in lines) for i in range(len(self.header))]
        return "\n".join("  ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)).rstrip() for cells in lines)

    def html(self) -> str:
        head = "".join(f"<th>{html.escape(c)}</th>" for c in self.header)
        body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in self.rows)
        return f"<table><tr>{head}</tr>{body}</table>"


def metrics_table(rows: dict[str, dict[str, Any]], keys: Sequence[str] = METRICS) -> Table:
    """One row per named result, one column per metric (3 decimals; blank when missing)."""
    return Table(
        ["", *keys], [[name, *("" if r.get(k) is None else f"{r[k]:.3f}" for k in keys)] for name, r in rows.items()]
    )


def with_interval(scores: Scores | dict[str, Any], key: str) -> str:
    """A metric and its 95% interval where it has one, e.g. '0.812 [0.770, 0.851]' (blank when missing);
    of typed scores, or of a dict of figures (e.g. the published ones)."""
    typed = isinstance(scores, Scores)
    value = getattr(scores, key) if typed else scores.get(key)
    if value is None:
        return ""
    low_high = scores.interval(key) if typed else scores.get("intervals", {}).get(key)
    return f"{value:.3f}" + (f" [{low_high[0]:.3f}, {low_high[1]:.3f}]" if low_high else "")


def interval_table(rows: dict[str, Scores | dict[str, Any]], keys: Sequence[str] = METRICS) -> Table:
    """One row per named result: its size and each metric with its 95% interval where it has one."""

    def size(r: Scores | dict[str, Any]) -> str:
        return str(r.n) if isinstance(r, Scores) else str(r.get("n", ""))

    return Table(
        ["", "n", *(f"{k} [95% interval]" for k in keys)],
        [[name, size(r), *(with_interval(r, k) for k in keys)] for name, r in rows.items()],
    )


def metrics_line(name: str, scores: Scores | dict[str, Any]) -> str:
    """One line for a terminal: accuracy and macro P / R / F1, each with its 95% interval over
    specimens where there is one, and the number scored."""
    values = "  ".join(f"{k.replace('f1', 'F1')} {with_interval(scores, k)}" for k in METRICS)
    n = scores.n if isinstance(scores, Scores) else scores["n"]
    return f"{name}: {values}  (n={n})"


def difference_table(difference: PairedDifference, keys: Sequence[str] = ("f1", "accuracy")) -> Table:
    """Second minus first in points, per image and per specimen, with the paired bootstrap's 95%
    interval and whether it excludes 0."""
    rows = []
    for level, differences in (("image", difference.images), ("specimen", difference.samples)):
        for k in keys:
            d = differences[k]
            low, high = d.interval
            points = f"[{100 * low:+.1f}, {100 * high:+.1f}]"
            rows.append(
                [f"{k}, per {level}", f"{100 * d.difference:+.1f}", points, "yes" if d.clear else "no (within noise)"]
            )
    return Table(["metric", "difference (points)", "95% interval (paired, over specimens)", "larger than noise"], rows)


@dataclass
class Page:
    """Blocks in order; `write` renders them as HTML and Markdown (report.html and report.md in a folder)."""

    title: str
    blocks: list[tuple[str, Any]] = field(default_factory=list)

    def heading(self, text: str, level: int = 2) -> None:
        self.blocks.append(("heading", (level, text)))

    def text(self, text: str) -> None:
        self.blocks.append(("text", text))

    def note(self, text: str) -> None:
        self.blocks.append(("note", text))

    def table(self, table: Table) -> None:
        self.blocks.append(("table", table))

    def figure(self, path: Path) -> None:
        self.blocks.append(("figure", Path(path)))

    def write(self, out: Path | PageLayout) -> Path:
        """The page where a layout says, or as report.html and report.md in a folder; returns the HTML path."""
        layout = out if isinstance(out, PageLayout) else PageLayout(out)
        out_dir = layout.root
        out_dir.mkdir(parents=True, exist_ok=True)
        body, md = [f"<h1>{html.escape(self.title)}</h1>"], [f"# {self.title}\n"]
        for kind, value in self.blocks:
            if kind == "heading":
                level, text = value
                body.append(f"<h{level}>{html.escape(text)}</h{level}>")
                md.append(f"{'#' * level} {text}\n")
            elif kind in ("text", "note"):
                body.append(f"<p class='{kind}'>{html.escape(value)}</p>")
                md.append(f"_{value}_\n" if kind == "note" else f"{value}\n")
            elif kind == "table":
                body.append(value.html())
                md.append(value.markdown())
            else:
                data = base64.b64encode(value.read_bytes()).decode()
                body.append(f'<img src="data:image/png;base64,{data}" alt="{html.escape(value.name)}">')
                md.append(f"![{value.name}]({os.path.relpath(value, out_dir)})\n")
        page = (
            f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(self.title)}</title>"
            f"<style>{STYLE}</style></head><body>{''.join(body)}</body></html>"
        )
        atomic_write_text(layout.markdown, "\n".join(md))
        atomic_write_text(layout.html, page)
        return layout.html
