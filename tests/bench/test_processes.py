"""The benchmarks' process helpers that are not measurements themselves."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from worker.bench.processes import BenchError, byte_compile


def test_byte_compile_writes_the_bytecode_an_import_then_reads(tmp_path: Path) -> None:
    """A benchmarked checkout is byte-compiled as an install is: each module gets its
    ``__pycache__`` file, and an import with ``PYTHONDONTWRITEBYTECODE`` set uses it."""
    package = tmp_path / "pkg"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "mod.py").write_text("VALUE = 42\n")
    byte_compile(package)
    cached = sorted(p.name.split(".")[0] for p in (package / "__pycache__").glob("*.pyc"))
    assert ["__init__", "mod"] == cached
    verbose = subprocess.run(
        [sys.executable, "-v", "-c", "import pkg.mod"],
        cwd=tmp_path,
        env={"PYTHONDONTWRITEBYTECODE": "1"},
        capture_output=True,
        text=True,
        check=True,
    )
    loaded = [
        line for line in verbose.stderr.splitlines() if "pkg" in line and "code object" in line
    ]
    assert len(loaded) == 2 and all(".pyc" in line for line in loaded), loaded


def test_byte_compile_refuses_a_module_that_does_not_compile(tmp_path: Path) -> None:
    """A checkout that does not compile is no worker to measure: said at once."""
    package = tmp_path / "broken"
    package.mkdir()
    (package / "__init__.py").write_text("def f(:\n")
    with pytest.raises(BenchError, match="could not byte-compile"):
        byte_compile(package)
