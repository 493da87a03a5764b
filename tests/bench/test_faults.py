"""The fault campaign (benchmarks/faults.py): its order and loss check, and one real run."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path
from typing import Any

import orjson
import pytest

from worker.bench.processes import SimulatorProcess

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
faults: Any = importlib.import_module("faults")


def lines(*changes: dict[str, Any]) -> list[bytes]:
    return [orjson.dumps(c) + b"\n" for c in changes]


def known(key: str) -> bool:
    return int(key) < 100


FED = lines(
    {"ID": 1, "lastname": "Lee", "extra8": "seq:000001"},
    {"ID": "2", "phone": "+32470000001", "extra8": "seq:000001"},
    {"ID": "1", "firstname": "Ann", "extra8": "seq:000002"},
    {"ID": 1, "lastname": "Maes", "extra8": "seq:000003"},
    {"ID": 900, "lastname": "Gone", "extra8": "seq:000001"},
)
FINAL = {
    "1": {"lastname": "Maes", "firstname": "Ann", "extra8": "seq:000003"},
    "2": {"phone": "+32470000001", "extra8": "seq:000001"},
}


class TestCheck:
    def test_in_order_and_complete(self) -> None:
        """Applications in order (a replay of the same number included), final states as the
        merge of all changes, the unknown ID dead-lettered: nothing to report."""
        history = {
            "1": [
                {"ID": 1, "lastname": "Lee", "firstname": "Ann", "extra8": "seq:000002"},
                {"ID": "1", "firstname": "Ann", "extra8": "seq:000002"},
                {"ID": 1, "lastname": "Maes", "extra8": "seq:000003"},
            ],
            "2": [{"ID": "2", "phone": "+32470000001", "extra8": "seq:000001"}],
        }
        verdict = faults.check(FED, known, history, FINAL, {"900"})
        assert (4, 0, 0, []) == (
            verdict.applications,
            verdict.regressions,
            verdict.lost,
            verdict.notes,
        )

    def test_older_after_newer_is_a_regression(self) -> None:
        """An application older than one before it counts once per such application, even
        when the final state is right."""
        history = {
            "1": [
                {"ID": 1, "lastname": "Lee", "extra8": "seq:000001"},
                {"ID": 1, "lastname": "Maes", "firstname": "Ann", "extra8": "seq:000003"},
                {"ID": "1", "firstname": "Ann", "extra8": "seq:000002"},
                {"ID": 1, "lastname": "Lee", "extra8": "seq:000001"},
                {"ID": 1, "lastname": "Maes", "extra8": "seq:000003"},
            ],
            "2": [{"ID": "2", "phone": "+32470000001", "extra8": "seq:000001"}],
        }
        verdict = faults.check(FED, known, history, FINAL, {"900"})
        assert 2 == verdict.regressions
        assert 0 == verdict.lost
        assert "contact 1: seq 2 applied after seq 3" == verdict.notes[0]

    def test_an_unnumbered_application_is_a_regression(self) -> None:
        """An applied object without a sequence number cannot be placed in order: counted."""
        history = {"2": [{"ID": "2", "phone": "+32470000001"}]}
        verdict = faults.check(FED[1:2], known, history, {"2": {"phone": "+32470000001"}}, ())
        assert 1 == verdict.regressions

    def test_a_missing_change_is_lost(self) -> None:
        """A known contact whose last change never arrived, and an unknown contact missing
        from the dead letters, are each one lost contact."""
        contacts = {
            "1": {"lastname": "Lee", "firstname": "Ann", "extra8": "seq:000002"},
            "2": FINAL["2"],
        }
        history = {
            "1": [{"ID": 1, "lastname": "Lee", "firstname": "Ann", "extra8": "seq:000002"}],
            "2": [{"ID": "2", "phone": "+32470000001", "extra8": "seq:000001"}],
        }
        verdict = faults.check(FED, known, history, contacts, set())
        assert 0 == verdict.regressions
        assert 2 == verdict.lost
        assert any("unknown contact 900" in note for note in verdict.notes)

    def test_a_contact_never_applied_is_lost(self) -> None:
        """A known contact the API never saw is lost."""
        verdict = faults.check(FED, known, {}, {"1": FINAL["1"]}, {"900"})
        assert 1 == verdict.lost


class TestWorkload:
    def test_every_change_carries_its_contacts_next_number(self) -> None:
        """Per contact (by string form of the ID), extra8 counts 1, 2, 3... in input order."""
        seen: dict[str, int] = {}
        for line in faults.workload(500, 20, 0.1, seed=3):
            change = orjson.loads(line)
            key = str(change["ID"])
            seen[key] = seen.get(key, 0) + 1
            assert f"seq:{seen[key]:06d}" == change["extra8"]
            assert len(change) >= 3  # the number beside at least one other field
        assert any(not known(key) for key in seen)  # some unknown IDs too


@pytest.mark.slow
def test_one_jsonl_run_with_one_kill(tmp_path: Path) -> None:
    """One campaign run on a jsonl file with a checkpoint: the worker is killed once mid-run
    and restarted, the file is drained, nothing is lost and the unknown IDs are dead letters.
    (Whether today's worker regresses here is the campaign's figure, not asserted.)"""
    settings = faults.Settings(changes=3000, contacts=300, max_kills=1, kill_window_s=0.2)
    with SimulatorProcess(faults.simulator_options(settings), tmp_path / "sim.log") as sim:
        result = faults.run_once("jsonl", 0, sim, settings, tmp_path / "run")
    assert 1 == result.kills
    assert 3000 == result.changes
    assert 0 == result.lost, result.notes
    assert result.applications > 0
    assert result.dead_ids > 0
    history = orjson.loads((tmp_path / "run" / "history.json").read_bytes())
    assert result.applications == sum(len(applied) for applied in history.values())
