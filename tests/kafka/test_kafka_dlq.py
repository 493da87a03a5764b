"""Dead letters of the ``kafka://`` input: in ``<topic>.dead-letters`` by default, with
``dlq show`` and ``dlq replay`` working on them (tansu on 127.0.0.1)."""

from __future__ import annotations

from pathlib import Path

import anyio
import pytest

from tests.cli.test_cli import Gateway
from tests.dlq.conftest import (
    DEAD,
    Dlq,
    applied_after_replay,
    applied_first,
    input_bytes,
    run_worker,
    tally,
)
from tests.kafka.conftest import Tansu
from tests.kafka.test_kafka_source import committed
from worker.backends.kafka import producer


@pytest.mark.slow
def test_show_replay_run_again(
    dlq: Dlq,
    gateway: Gateway,
    tansu: Tansu,
    topic: str,
    tmp_path: Path,
) -> None:
    """A real run leaves its dead letters in `<topic>.dead-letters`; `show` counts them; once
    the contacts exist `replay --reason not_found` produces them back into the topic, the next
    run applies them, the replayed topic marks them, and a second replay sends none."""
    uri = f"kafka://{tansu.bootstrap}/{topic}?poll_s=0.1"
    anyio.run(producer.init, uri)
    lines = input_bytes().splitlines()
    anyio.run(producer.enqueue, uri, lines)

    def letters() -> int:
        return int(dlq("show", uri, "--json").json()["letters"])

    def all_committed(total: int) -> bool:
        return (anyio.run(committed, tansu, topic, 1)[0] or 0) >= total

    run_worker(gateway, tmp_path, uri, lambda: all_committed(len(lines)) and letters() == 8)
    assert applied_first() == gateway.get("/_sim/contacts")
    summary = dlq("show", uri, "--json").json()
    assert (DEAD, 8, 0, 6) == tally(summary)
    assert summary["store"].endswith(f"{topic}.dead-letters")

    gateway.configure(known_count=200)
    report = dlq("replay", uri, "--to", uri, "--reason", "not_found", "--json").json()
    assert ({"not_found": 5}, {"invalid": 1}) == (report["replayed"], report["without_change"])
    run_worker(
        gateway,
        tmp_path,
        uri,
        lambda: (
            all_committed(len(lines) + 5)
            and gateway.get("/_sim/contacts") == applied_after_replay()
        ),
    )
    again = dlq("replay", uri, "--to", uri, "--reason", "not_found", "--json").json()
    assert ({}, {"not_found": 5}) == (again["replayed"], again["already_replayed"])
    assert 5 == dlq("show", uri, "--json").json()["replayed"]
    assert 8 == letters()
