"""The README is the users' copy of the contracts: what it shows must be what the code does."""

from __future__ import annotations

import re
from pathlib import Path

from worker.backends.postgres.uri import DDL
from worker.config import OPTIONS

README = (Path(__file__).parents[2] / "README.md").read_text()


def test_readme_shows_exactly_the_ddl_init_runs() -> None:
    """`init --to postgresql://` creates exactly the DDL the README shows."""
    blocks = re.findall(r"```sql\n(.*?)```", README, re.S)
    assert DDL.strip() in [block.strip() for block in blocks]


def test_every_option_is_in_the_readme_table() -> None:
    """Each flag of `run`, shown as `--help` shows it (``--http-port PORT``), and its
    environment variable appear in one row of the options table."""
    rows = [line for line in README.splitlines() if line.startswith("| `--")]
    for option in OPTIONS:
        shown = option.flag if option.switch else f"{option.flag} {option.metavar}"
        assert any(f"| `{shown}` |" in row and f"`{option.env}`" in row for row in rows), shown
