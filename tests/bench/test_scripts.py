"""The developer scripts in benchmarks/ still run on worker.bench: a pass of stages.py, and a
small pipeline.py throughput run against the real simulator."""

from __future__ import annotations

import importlib
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from worker.bench.processes import SimulatorProcess, worker_env
from worker.sim.stream import StreamSpec, expected_final_state, write_file

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


def test_the_careful_worker_does_the_job_it_is_compared_on(tmp_path: Path) -> None:
    """``reference_worker.py``, the hot path's yardstick, either way it bounds what it holds:
    every line read, every contact left with its last-written values at the simulated API,
    the unknown IDs found. Bounding the changes held (as contact-worker does) merges less than
    bounding the IDs when every ID fits, so it sends more requests."""
    spec = StreamSpec(changes=30_000, contacts=3_000, unknown_share=0.02, invalid=0, seed=3)
    path = tmp_path / "in.jsonl"
    write_file(spec, path)  # 1.3 MB: more than one read of the careful worker (256 KiB)
    expected = expected_final_state(path.read_bytes().splitlines())
    known = {key: fields for key, fields in expected.items() if int(key) <= spec.contacts}
    script = Path(__file__).resolve().parents[2] / "benchmarks" / "reference_worker.py"
    requests = {}
    for bound in ("ids", "changes"):
        sim_options = ["--latency", "0", "--known-count", str(spec.contacts)]
        with SimulatorProcess(sim_options, tmp_path / f"sim-{bound}.log") as sim:
            done = subprocess.run(
                [sys.executable, str(script), str(path), "--batch-size", "100"]
                + ["--max-waiting", "4000", "--bound", bound],
                env=worker_env(sim.url),
                capture_output=True,
                text=True,
                timeout=120,
                check=False,
            )
            assert 0 == done.returncode, done.stderr
            state = sim.call("/_sim/contacts")
            requests[bound] = sim.stats()["requests"]
        summary = json.loads(done.stderr.strip().splitlines()[-1])
        assert spec.lines == summary["records_read"], bound
        assert known == {key: state.get(key) for key in known}, bound
        assert summary["missing"] >= len(expected) - len(known) > 0, bound
        assert requests[bound] == summary["requests"], bound
    assert requests["changes"] > requests["ids"] * 1.5, requests
