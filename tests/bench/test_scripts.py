"""The developer scripts in benchmarks/ still run on worker.bench: a pass of stages.py, and a
small pipeline.py throughput run against the real simulator."""

from __future__ import annotations

import importlib
import json
import sys
from pathlib import Path
from typing import Any

import pytest

from worker.sim.stream import StreamSpec, write_file

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
stages: Any = importlib.import_module("stages")
pipeline: Any = importlib.import_module("pipeline")


def test_stages_replay_settles_every_line(tmp_path: Path) -> None:
    """One synchronous pass of a stream through the worker's stages reads every change and
    acknowledges every line on the way (the source keeps its per-line progress)."""
    spec = StreamSpec(changes=600, contacts=50, unknown_share=0.0, invalid=0, seed=2)
    path = tmp_path / "in.jsonl"
    write_file(spec, path)
    spent, counts = stages.replay(path.read_bytes(), path, batch_size=20, max_waiting=100)
    assert counts["changes"] == spec.lines
    assert counts["requests"] > 0
    assert set(stages.STAGES) <= set(spent)


@pytest.mark.slow
def test_pipeline_throughput_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``pipeline.py throughput`` on a tiny stream: one run, every change applied, its report
    printed and saved."""
    monkeypatch.setattr(pipeline, "RESULTS", tmp_path)
    monkeypatch.setattr(pipeline, "DATA", tmp_path / "data")
    monkeypatch.setattr(pipeline, "LOGS", tmp_path / "logs")
    # Not in the test process: SIGTERM must stay pytest's.
    monkeypatch.setattr(pipeline, "unwind_on_signals", lambda: None)
    argv = ["throughput", "--changes", "500", "--contacts", "100", "--repeat", "1"]
    assert 0 == pipeline.main([*argv, "--quiet-wait", "0", "--tag", "test"])
    data = json.loads((tmp_path / "pipeline-throughput-test.json").read_text())
    (run,) = data["runs"]
    problems = [p for p in run["problems"] if not p.startswith("other processes")]
    assert [] == problems
    assert 500 == run["summary"]["changes_applied"]
    assert run["sim_stats"]["requests"] > 0
