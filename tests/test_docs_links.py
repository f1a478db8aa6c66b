"""Every relative link in the README, ARCHITECTURE.md and docs/ resolves: to a file that exists and, with
a #fragment, to a heading of that file (GitHub's anchors)."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", ROOT / "ARCHITECTURE.md", *sorted((ROOT / "docs").rglob("*.md"))]
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")
FENCE = re.compile(r"^(```|~~~).*?^\1", re.M | re.S)
CODE = re.compile(r"`[^`\n]*`")


def anchors(page: Path) -> set[str]:
    """GitHub's anchor of every heading: lower case, punctuation dropped, spaces as hyphens, -1 on a repeat."""
    seen: dict[str, int] = {}
    for line in FENCE.sub("", page.read_text()).splitlines():
        if m := re.match(r"#{1,6} +(.*?) *#*$", line):
            slug = re.sub(r"[^\w\- ]", "", m.group(1).replace("`", "").lower()).replace(" ", "-")
            seen[slug] = seen.get(slug, -1) + 1
            if seen[slug]:
                seen[f"{slug}-{seen[slug]}"] = 0
    return set(seen)


def links(page: Path) -> list[str]:
    """The link targets of a page, outside code blocks and code spans."""
    return LINK.findall(CODE.sub("", FENCE.sub("", page.read_text())))


def test_the_docs_exist():
    names = {p.relative_to(ROOT).as_posix() for p in PAGES}
    assert {"docs/guide.md", "docs/reading-answers.md", "docs/decisions/README.md"} <= names
    assert "docs/history/measurements.md" in names


def test_every_relative_link_resolves():
    broken = []
    for page in PAGES:
        for target in links(page):
            if re.match(r"[a-z][a-z0-9+.-]*:", target):  # https:, mailto:
                continue
            path, _, fragment = target.partition("#")
            file = (page.parent / path).resolve() if path else page
            where = f"{page.relative_to(ROOT)}: {target}"
            if not file.exists():
                broken.append(f"{where} (no such file)")
            elif fragment and file.suffix == ".md" and fragment not in anchors(file):
                broken.append(f"{where} (no such heading)")
    assert not broken, "\n".join(broken)


def test_every_decision_record_is_indexed():
    index = (ROOT / "docs" / "decisions" / "README.md").read_text()
    records = sorted(p.name for p in (ROOT / "docs" / "decisions").glob("[0-9][0-9][0-9][0-9]-*.md"))
    assert records and [r for r in records if f"({r})" not in index] == []
