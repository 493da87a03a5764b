"""The README and docs/ are the users' copy of the contracts: what they show must be what the
code does, and every link between them must lead somewhere."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from worker.backends.postgres.uri import DDL
from worker.config import OPTIONS

ROOT = Path(__file__).parents[2]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
"""Every page of the documentation: the README and everything under docs/."""


def page(name: str) -> str:
    """The text of a page, by its path from the repository root."""
    return (ROOT / name).read_text()


def test_postgresql_page_shows_exactly_the_ddl_init_runs() -> None:
    """`init --to postgresql://` creates exactly the DDL the PostgreSQL input's page shows."""
    blocks = re.findall(r"```sql\n(.*?)```", page("docs/inputs/postgresql.md"), re.S)
    assert DDL.strip() in [block.strip() for block in blocks]


def test_every_option_is_in_the_options_table() -> None:
    """Each flag of `run`, shown as `--help` shows it (``--http-port PORT``), and its
    environment variable appear in one row of the options table of docs/operations.md."""
    rows = [line for line in page("docs/operations.md").splitlines() if line.startswith("| `--")]
    for option in OPTIONS:
        shown = option.flag if option.switch else f"{option.flag} {option.metavar}"
        assert any(f"| `{shown}` |" in row and f"`{option.env}`" in row for row in rows), shown


def prose(text: str) -> str:
    """The text without its fenced code blocks and inline code, where nothing is a link."""
    text = re.sub(r"^```.*?^```", "", text, flags=re.S | re.M)
    return re.sub(r"`[^`\n]*`", "", text)


def anchors(text: str) -> set[str]:
    """The anchors GitHub gives the headings of a page: lower case, punctuation dropped,
    spaces as hyphens, a repeated one numbered (``-1``, ``-2``)."""
    seen: dict[str, int] = {}
    found = set()
    for heading in re.findall(r"^#{1,6} (.+?)#*$", prose_keeping_code(text), re.M):
        slug = re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")
        found.add(f"{slug}-{seen[slug]}" if slug in seen else slug)
        seen[slug] = seen.get(slug, 0) + 1
    return found


def prose_keeping_code(text: str) -> str:
    """The text without its fenced code blocks (a ``# comment`` there is no heading)."""
    return re.sub(r"^```.*?^```", "", text, flags=re.S | re.M)


def links(text: str) -> list[str]:
    """The targets of the markdown links of a page: ``[text](target)``."""
    return re.findall(r"\]\(([^)\s]+)\)", prose(text))


def test_anchors_follow_github() -> None:
    """The anchors are GitHub's: code and punctuation dropped, duplicates numbered."""
    text = "# Planning: `contact-worker plan`\n## 8. Answers, or not\n## Limits\n### Limits\n"
    expected = {"planning-contact-worker-plan", "8-answers-or-not", "limits", "limits-1"}
    assert expected == anchors(text)


@pytest.mark.parametrize("source", PAGES, ids=lambda path: str(path.relative_to(ROOT)))
def test_every_relative_link_leads_to_a_file_and_heading(source: Path) -> None:
    """Each relative link of the README and of docs/ names a file that exists and, after a
    ``#``, a heading of that file."""
    broken = []
    for target in links(source.read_text()):
        if re.match(r"[a-z][a-z0-9+.-]*:", target):  # https:, mailto:: not ours to check
            continue
        path, _, anchor = target.partition("#")
        linked = (source.parent / path).resolve() if path else source
        if not linked.exists():
            broken.append(f"{target}: no such file")
        elif anchor and (linked.suffix != ".md" or anchor not in anchors(linked.read_text())):
            broken.append(f"{target}: no such heading")
    assert [] == broken
