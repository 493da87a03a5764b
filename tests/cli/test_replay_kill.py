"""``kill -9`` mid-run on the inputs without a server of their own (``jsonl:`` with
``--checkpoint``, ``sqlite:``): no contact ever goes back at the gateway (DESIGN 9)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.cli.replay_kill import changes, feed, gateway, kill_twice_then_finish
from tests.engine.harness import write_lines


@pytest.mark.slow
def test_jsonl_with_a_checkpoint(tmp_path: Path) -> None:
    """`jsonl:` with `--checkpoint`, killed twice mid-run and resumed: the file ends applied,
    no contact went back, and each restart replayed (held) what the killed run had read."""
    items = changes()
    source = write_lines(tmp_path / "in.jsonl", items)
    args = ["--source", f"jsonl:{source}", "--checkpoint", str(tmp_path / "cp.json")]
    gw = gateway()
    try:
        events = kill_twice_then_finish(gw, tmp_path, args, items, finite=True)
    finally:
        gw.stop()
    assert [True] == [e["complete"] for e in events if e["event"] == "source.replay_done"]


@pytest.mark.slow
def test_sqlite_spool(tmp_path: Path) -> None:
    """`sqlite:` fed by `enqueue --to`, killed twice mid-run and restarted: no contact went
    back; the last run replayed the rows there at its start."""
    items = changes()
    uri = f"sqlite:{tmp_path / 'spool.db'}"
    feed(uri, items)
    gw = gateway()
    try:
        events = kill_twice_then_finish(gw, tmp_path, ["--source", uri], items, finite=False)
    finally:
        gw.stop()
    assert [True] == [e["complete"] for e in events if e["event"] == "source.replay_done"]
