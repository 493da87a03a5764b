"""``contact-worker bench`` end to end on a tiny scenario, and the report's pieces."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from worker.bench import charts
from worker.bench.report import markdown

TINY = """
description = "A tiny scenario for the test suite."
[stream]
changes = 300
contacts = 100
unknown_share = 0.05
invalid_share = 0.01
[api]
latency = "2"
[worker]
batch_size = 20
linger_ms = 5
rate = 0
[baselines]
max_changes = { per-change = 60, batch-fallback = 120 }
[run]
time_goal = 1.111

[[variants]]
label = "backlog"

[[variants]]
label = "stream"
stream.arrival_rate = 400
stream.changes = 100
baselines.kinds = ["batch-fallback"]
baselines.max_changes = 60
"""

RUN_KEYS = {
    "elapsed_s",
    "changes_per_s",
    "contacts_per_s",
    "requests",
    "requests_per_s",
    "contacts_per_request",
    "requests_per_contact",
    "isolation_requests",
    "latency",
    "cpu_s_per_100k_changes",
    "peak_rss_mb",
    "time_ratio",
    "bound_ratio",
    "problems",
}


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any], str]:
    """Run the tiny scenario once for all the tests below."""
    tmp = tmp_path_factory.mktemp("bench")
    scenario = tmp / "tiny.toml"
    scenario.write_text(TINY)
    out = tmp / "out"
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "worker.cli",
            "bench",
            str(scenario),
            "--out",
            str(out),
            "--no-progress",
        ],
        capture_output=True,
        text=True,
        timeout=100,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "contact-worker bench tiny" in done.stdout
    return out, json.loads((out / "report.json").read_text()), done.stdout


@pytest.mark.slow
class TestBenchEndToEnd:
    def test_report_json(self, report: tuple[Path, dict[str, Any], str]) -> None:
        """report.json holds the machine, the goals and, per variant, every figure."""
        _, data, _ = report
        assert data["scenario"] == "tiny"
        assert {"python", "cpus", "event_loop"} <= set(data["machine"])
        assert [v["label"] for v in data["variants"]] == ["backlog", "stream"]
        backlog, stream = data["variants"]
        assert RUN_KEYS <= set(backlog["worker"])
        assert {"p50_s", "p95_s", "p99_s"} <= set(backlog["worker"]["latency"])
        assert set(backlog["baselines"]) == {"per-change", "batch-fallback"}
        assert set(stream["baselines"]) == {"batch-fallback"}
        assert {
            "requests_needed",
            "bound_per_contact",
            "plain_halving_per_contact",
            "worker_halving_per_contact",
            "splitting_per_contact",
            "limit_s",
        } <= set(backlog["limits"])
        assert {"predicted_drain_s", "drain_error", "requests_error"} <= set(backlog["model"])
        assert any(g["goal"].startswith("model error") for g in data["goals"])

    def test_every_change_is_accounted_for(self, report: tuple[Path, dict[str, Any], str]) -> None:
        """Each run settled every line; the worker left every known contact as last written."""
        _, data, _ = report
        for variant in data["variants"]:
            worker = variant["worker"]
            # A busy machine is noted as a problem of the figures, not of the worker.
            problems = [p for p in worker["problems"] if not p.startswith("other processes")]
            assert problems == [] and worker["state_mismatches"] == 0, worker
            assert worker["others_cpu_pct"] >= 0
            assert worker["dead_letters"].get("not_found", 0) > 0
            assert worker["latency"]["count"] == variant["input"]["lines"]
            for run in variant["baselines"].values():
                # The baselines may reorder one contact's changes (that is their flaw), but
                # they too must settle every line.
                assert not [p for p in run["problems"] if p.startswith("acknowledged")], run

    def test_report_md(self, report: tuple[Path, dict[str, Any], str]) -> None:
        """report.md has the side-by-side tables, the isolation table and the model check."""
        out, _, stdout = report
        text = (out / "report.md").read_text()
        for heading in (
            "# Benchmark: tiny",
            "## Goals",
            "## Side by side",
            "### backlog",
            "## Finding unknown IDs",
            "## The capacity model",
            "## Charts",
        ):
            assert heading in text
        assert "| contact-worker |" in text and "per-change (first 60 lines)" in text
        assert "report.md" in stdout

    def test_charts(self, report: tuple[Path, dict[str, Any], str]) -> None:
        """With matplotlib the charts are PNG files linked from report.md; else a note says why."""
        out, data, _ = report
        if charts.pyplot() is None:
            assert "matplotlib is not installed" in data["chart_note"]
            return
        assert "latency.png" in data["charts"]
        for name in data["charts"]:
            assert (out / name).read_bytes()[:4] == b"\x89PNG"
            assert f"]({name})" in (out / "report.md").read_text()


def bench(*args: str, cwd: Path | None = None, env: dict[str, str] | None = None) -> Any:
    """``contact-worker bench ARGS`` in a child process, its output captured."""
    return subprocess.run(
        [sys.executable, "-m", "worker.cli", "bench", *args],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=cwd,
        env=env,
    )


class TestPackagedScenarios:
    def test_bench_finds_a_packaged_scenario_by_name(self, tmp_path: Path) -> None:
        """``contact-worker bench steady`` reads the packaged file, from any directory.

        ``--only`` names no variant, so it stops before running anything, listing the
        variants it read.
        """
        done = bench("steady", "--only", "none", "--out", str(tmp_path / "out"), cwd=tmp_path)
        assert done.returncode == 2, done.stderr
        assert "no variant 'none'; variants: B=25, B=50, B=100, B=200" in done.stderr

    def test_unknown_name(self, tmp_path: Path) -> None:
        """A name that is neither a file nor packaged is a usage error naming the packaged ones."""
        done = bench("stedy", "--out", str(tmp_path), cwd=tmp_path)
        assert done.returncode == 2
        assert "did you mean 'steady'?" in done.stderr and "light-load" in done.stderr

    @pytest.mark.slow
    def test_the_wheel_ships_the_scenarios(self, tmp_path: Path) -> None:
        """Installed from the project's wheel, ``contact-worker bench steady`` still finds it."""
        root = Path(__file__).resolve().parents[2]
        src = tmp_path / "src"
        src.mkdir()
        for name in ("pyproject.toml", "README.md"):
            shutil.copy(root / name, src / name)
        shutil.copytree(
            root / "worker", src / "worker", ignore=shutil.ignore_patterns("__pycache__")
        )
        pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
        built = subprocess.run(
            [*pip, "wheel", "--no-deps", "-w", str(tmp_path / "dist"), str(src)],
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert built.returncode == 0, built.stderr[-3000:]
        (wheel,) = (tmp_path / "dist").glob("contact_worker-*.whl")
        target = tmp_path / "site"
        installed = subprocess.run(
            [*pip, "install", "--no-deps", "--target", str(target), str(wheel)],
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert installed.returncode == 0, installed.stderr[-3000:]
        shutil.rmtree(src)  # nothing of the source tree left to find the files in
        env = dict(os.environ, PYTHONPATH=str(target))
        where = subprocess.run(
            [sys.executable, "-c", "import worker; print(worker.__file__)"],
            capture_output=True,
            text=True,
            env=env,
            cwd=tmp_path,
            check=True,
        )
        assert where.stdout.startswith(str(target))
        done = bench(
            "steady", "--only", "none", "--out", str(tmp_path / "out"), cwd=tmp_path, env=env
        )
        assert done.returncode == 2, done.stderr
        assert "no variant 'none'; variants: B=25" in done.stderr


class TestPieces:
    def test_charts_skipped_without_matplotlib(
        self, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
    ) -> None:
        """No matplotlib: no charts, and a note naming the extra to install."""
        monkeypatch.setattr(charts, "pyplot", lambda: None)
        drawn, note = charts.draw(tmp_path, {"variants": []})
        assert drawn == [] and "contact-worker[charts]" in note

    def test_bad_scenario_exits_2(self, tmp_path: Path) -> None:
        """An invalid scenario is a usage error, reported before anything runs."""
        bad = tmp_path / "bad.toml"
        bad.write_text("[worker]\nbatch_size = 0\n")
        done = subprocess.run(
            [sys.executable, "-m", "worker.cli", "bench", str(bad), "--out", str(tmp_path)],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert done.returncode == 2
        assert "batch_size = 0: must be >= 1" in done.stderr

    def test_markdown_without_variants_goals_or_charts(self) -> None:
        """The page renders from minimal data (e.g. a scenario whose runs were all filtered)."""
        data = {
            "scenario": "x",
            "description": "",
            "at": "now",
            "file": "x.toml",
            "duration_s": 0.0,
            "goals": [],
            "variants": [],
            "machine": {"cpus": 2, "cpu_model": "", "python": "3", "event_loop": "asyncio"},
        }
        text = markdown(data, [], "")
        assert text.startswith("# Benchmark: x")
