"""docs/adding-an-input.md holds: its toy input, put where the page says, passes its own test.

The page's three code blocks and its scheme-table row are written into a copy of the package
(the repository itself is left alone), and the page's test runs there with the real
``contact-worker`` command against the simulated gateway.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[2]
PAGE = (ROOT / "docs" / "adding-an-input.md").read_text()


@pytest.mark.slow
def test_the_toy_input_of_the_page_works(tmp_path: Path) -> None:
    """Source, backend and test as the page shows them, in under 150 lines, pass."""
    source, backend, row, test = re.findall(r"```python\n(.*?)```", PAGE, re.S)
    shutil.copytree(ROOT / "worker", tmp_path / "worker", ignore=shutil.ignore_patterns("*.pyc"))
    (tmp_path / "worker" / "backends" / "lines").mkdir()
    (tmp_path / "worker" / "backends" / "lines" / "source.py").write_text(source)
    (tmp_path / "worker" / "backends" / "lines" / "__init__.py").write_text(backend)
    table = tmp_path / "worker" / "backends" / "__init__.py"
    text = table.read_text()
    head, sep, tail = text.partition("SCHEMES: dict[str, str] = {\n")
    assert sep, "the scheme table moved: update this test and the page"
    table.write_text(head + sep + row + tail)
    (tmp_path / "tests" / "lines").mkdir(parents=True)
    (tmp_path / "tests" / "__init__.py").write_text("")
    (tmp_path / "tests" / "lines" / "__init__.py").write_text("")
    (tmp_path / "tests" / "lines" / "test_lines.py").write_text(test)
    shutil.copy(ROOT / "tests" / "conftest.py", tmp_path / "tests" / "conftest.py")
    lines = sum(block.count("\n") for block in (source, backend, row, test))
    assert lines < 150, lines
    env = dict(os.environ, PYTHONPATH=str(tmp_path))
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/lines"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert 0 == result.returncode, result.stdout + result.stderr
    assert "1 passed" in result.stdout
