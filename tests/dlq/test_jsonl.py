"""``dlq show`` and ``dlq replay`` on a ``jsonl:`` dead-letter file left by a real run."""

from __future__ import annotations

import fcntl
import json
import resource
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import anyio
import orjson
import pytest
import structlog

from tests.cli.test_cli import Gateway, events, run, worker_env
from tests.dlq.conftest import (
    DEAD,
    MISSING,
    Dlq,
    applied_after_replay,
    applied_first,
    dlq_process,
    input_bytes,
    reasons,
)
from worker.backends.jsonl.sink import JsonlDeadLetters
from worker.deadletters.base import record


def first_run(gw: Gateway, tmp_path: Path) -> Path:
    """Run the worker on CHANGES; the dead-letter file it left."""
    (tmp_path / "in.jsonl").write_bytes(input_bytes())
    result = run(["--source", f"jsonl:{tmp_path / 'in.jsonl'}"], worker_env(gw, tmp_path))
    assert 0 == result.returncode, result.stderr
    assert applied_first() == gw.get("/_sim/contacts")
    return tmp_path / "dead.jsonl"


class TestShow:
    def test_counts_what_a_run_left(self, dlq: Dlq, gateway: Gateway, tmp_path: Path) -> None:
        """`dlq show --json` counts the letters by reason and error code, names the common
        details, the time span, and how many can be replayed (not invalid, with a change)."""
        dead = first_run(gateway, tmp_path)
        summary = dlq("show", f"jsonl:{dead}", "--json").json()
        assert DEAD == reasons(summary)
        assert (8, 0, 6, 0) == (
            summary["letters"],
            summary["replayed"],
            summary["waiting"],
            summary["unreadable"],
        )
        assert {"404": 5, "139": 1, "-": 2} == summary["by_error"]
        assert {"reason": "not_found", "detail": "contact not found", "count": 5} == summary[
            "top_details"
        ][0]
        assert 1 == summary["by_reason"]["invalid"]["without_change"]
        assert summary["oldest"] <= summary["newest"]

    def test_human_table(self, gateway: Gateway, tmp_path: Path) -> None:
        """Without --json it prints a table a person reads (the command as a process)."""
        dead = first_run(gateway, tmp_path)
        result = dlq_process("show", f"jsonl:{dead}")
        assert 0 == result.code, result.stderr
        assert "8 letters" in result.stdout
        assert "6 can be replayed" in result.stdout
        assert "contact not found" in result.stdout

    def test_a_line_being_written_is_left_for_later(self, dlq: Dlq, tmp_path: Path) -> None:
        """A last line without its newline (a write in progress) is not counted; a line that is
        not a JSON object is counted as unreadable."""
        dead = tmp_path / "dead.jsonl"
        letter = {"reason": "not_found", "change": {"ID": "1", "lastname": "x"}, "at": "t"}
        dead.write_bytes(json.dumps(letter).encode() + b"\n[1]\n" + b'{"reason": "not_f')
        summary = dlq("show", f"jsonl:{dead}", "--json").json()
        assert (2, 1, {"not_found": 1}) == (
            summary["letters"],
            summary["unreadable"],
            reasons(summary),
        )


class TestReplay:
    @pytest.mark.slow
    def test_round_trip(self, dlq: Dlq, gateway: Gateway, tmp_path: Path) -> None:
        """not_found letters of a real run, replayed into a file once the contacts exist, are
        applied by the next run; a second replay replays nothing; the sidecar keeps the lines."""
        dead = first_run(gateway, tmp_path)
        gateway.configure(known_count=200)  # the missing contacts were created
        replay_file = tmp_path / "replay.jsonl"
        report = dlq(
            "replay",
            f"jsonl:{dead}",
            "--to",
            f"jsonl:{replay_file}",
            "--reason",
            "not_found",
            "--json",
        ).json()
        assert {"not_found": 5} == report["replayed"]
        assert {"rejected": 1, "invalid": 1} == report["not_asked"]
        assert {"invalid": 1} == report["without_change"]
        assert report["warning"]
        replayed = [json.loads(line) for line in replay_file.read_text().splitlines()]
        assert MISSING == sorted(replayed, key=lambda c: c["ID"])
        sidecar = json.loads((tmp_path / "dead.jsonl.replayed").read_text())
        assert 5 == sum(end - start + 1 for start, end in sidecar["lines"])

        result = run(["--source", f"jsonl:{replay_file}"], worker_env(gateway, tmp_path))
        assert 0 == result.returncode, result.stderr
        assert applied_after_replay() == gateway.get("/_sim/contacts")

        again = dlq(
            "replay",
            f"jsonl:{dead}",
            "--to",
            f"jsonl:{replay_file}",
            "--reason",
            "not_found",
            "--json",
        ).json()
        assert ({}, {"not_found": 5}) == (again["replayed"], again["already_replayed"])
        assert 5 == dlq("show", f"jsonl:{dead}", "--json").json()["replayed"]

    def test_default_reasons_limit_and_dry_run(self, dlq: Dlq, tmp_path: Path) -> None:
        """By default every reason but invalid is replayed; --limit stops after N; --dry-run
        writes and marks nothing."""
        dead = tmp_path / "dead.jsonl"
        rows = [
            {"reason": reason, "change": {"ID": str(i), "lastname": "x"}, "at": "t"}
            for i, reason in enumerate(["not_found", "rejected", "invalid", "not_found"])
        ]
        dead.write_text("".join(json.dumps(r) + "\n" for r in rows))
        out = tmp_path / "out.jsonl"
        dry = dlq("replay", f"jsonl:{dead}", "--to", f"jsonl:{out}", "--dry-run", "--json").json()
        assert ({"not_found": 2, "rejected": 1}, {"invalid": 1}) == (
            dry["replayed"],
            dry["not_asked"],
        )
        assert not out.exists() and not (tmp_path / "dead.jsonl.replayed").exists()
        first = dlq(
            "replay", f"jsonl:{dead}", "--to", f"jsonl:{out}", "--limit", "2", "--json"
        ).json()
        assert ({"not_found": 1, "rejected": 1}, {"not_found": 1}) == (
            first["replayed"],
            first["over_limit"],
        )
        rest = dlq(
            "replay",
            f"jsonl:{dead}",
            "--to",
            f"jsonl:{out}",
            "--reason",
            "invalid,not_found",
            "--json",
        ).json()
        assert {"invalid": 1, "not_found": 1} == rest["replayed"]
        assert ["0", "1", "2", "3"] == [json.loads(x)["ID"] for x in out.read_text().splitlines()]

    def test_sidecar_of_another_file_is_refused(self, dlq: Dlq, tmp_path: Path) -> None:
        """A dead-letter file replaced under its sidecar (rotated) is refused with exit 2:
        the line numbers in the sidecar would mean other letters."""
        dead = tmp_path / "dead.jsonl"
        letter = {"reason": "not_found", "change": {"ID": "1", "lastname": "x"}, "at": "t"}
        dead.write_text(json.dumps(letter) + "\n")
        out = f"jsonl:{tmp_path / 'out.jsonl'}"
        assert {"not_found": 1} == dlq("replay", f"jsonl:{dead}", "--to", out, "--json").json()[
            "replayed"
        ]
        letter["change"] = {"ID": "2", "lastname": "y"}
        dead.write_text(json.dumps(letter) + "\n")
        result = dlq("replay", f"jsonl:{dead}", "--to", out)
        assert 2 == result.code
        assert "dead.jsonl.replayed was written for another" in result.stderr

    def test_a_second_replay_at_once_is_refused(self, dlq: Dlq, tmp_path: Path) -> None:
        """While a replay holds the file, another exits 1 and says so."""
        dead = tmp_path / "dead.jsonl"
        dead.write_text('{"reason": "not_found", "change": {"ID": "1", "x": 1}}\n')
        with dead.open("rb") as held:
            fcntl.flock(held.fileno(), fcntl.LOCK_EX)
            result = dlq("replay", f"jsonl:{dead}", "--to", f"jsonl:{tmp_path / 'out.jsonl'}")
        assert 1 == result.code
        assert "another `dlq replay`" in result.stderr

    def test_written_but_not_marked_is_sent_again(self, dlq: Dlq, tmp_path: Path) -> None:
        """If marking fails after the changes were written (here the sidecar's temporary file
        cannot be created), the replay exits 1 and says so; the next replay sends them again:
        at-least-once, never lost."""
        dead = tmp_path / "dead.jsonl"
        dead.write_text(json.dumps({"reason": "not_found", "change": MISSING[0]}) + "\n")
        out = tmp_path / "out.jsonl"
        (tmp_path / "dead.jsonl.replayed.tmp").mkdir()
        failed = dlq("replay", f"jsonl:{dead}", "--to", f"jsonl:{out}", "--json")
        assert 1 == failed.code
        assert (1, {}) == (
            json.loads(failed.stdout)["unmarked"],
            json.loads(failed.stdout)["replayed"],
        )
        assert "the next replay sends them again" in failed.stderr
        (tmp_path / "dead.jsonl.replayed.tmp").rmdir()
        assert {"not_found": 1} == dlq(
            "replay", f"jsonl:{dead}", "--to", f"jsonl:{out}", "--json"
        ).json()["replayed"]
        assert [MISSING[0], MISSING[0]] == [json.loads(x) for x in out.read_text().splitlines()]


class TestTargetFile:
    def test_a_last_line_cut_short_is_not_glued_to(self, dlq: Dlq, tmp_path: Path) -> None:
        """A target file whose last line has no newline gets one first: the replayed change
        stays a line of its own, valid, not part of the cut line."""
        dead = tmp_path / "dead.jsonl"
        dead.write_text(
            json.dumps({"reason": "not_found", "change": {"ID": "35"}, "at": "t"}) + "\n"
        )
        out = tmp_path / "out.jsonl"
        out.write_bytes(b'{"ID": "1", "lastname": "a"}')
        assert {"not_found": 1} == dlq(
            "replay", f"jsonl:{dead}", "--to", f"jsonl:{out}", "--json"
        ).json()["replayed"]
        lines = out.read_bytes().splitlines()
        assert [b'{"ID": "1", "lastname": "a"}', b'{"ID":"35"}'] == lines

    def test_replaying_into_the_dead_letter_file_itself_is_refused(
        self, dlq: Dlq, tmp_path: Path
    ) -> None:
        dead = tmp_path / "dead.jsonl"
        dead.write_text(json.dumps({"reason": "not_found", "change": {"ID": "35"}, "at": "t"}))
        before = dead.read_bytes()
        outcome = dlq(
            "replay", f"jsonl:{dead}", "--to", f"jsonl:{tmp_path}/../{tmp_path.name}/dead.jsonl"
        )
        assert 2 == outcome.code
        assert "is the dead-letter file itself" in outcome.stderr
        assert before == dead.read_bytes()


def letter(i: int) -> dict[str, Any]:
    """A dead letter as the sink writes it (``reason`` first)."""
    return record("not_found", change={"ID": str(i), "lastname": "x"}, source=f"in.jsonl:{i}")


async def append(path: Path, letters: list[dict[str, Any]]) -> None:
    """Open the sink on ``path``, write these letters, close it."""
    sink = JsonlDeadLetters(str(path))
    await sink.open()
    try:
        await sink.write(letters)
    finally:
        await sink.close()


class TestTornLines:
    def test_the_sink_fences_a_torn_last_line(self, dlq: Dlq, tmp_path: Path) -> None:
        """A file whose last line was cut short: `dlq show` notes it (uncounted: it may be
        being written); the sink, on open, ends it with a newline and logs where it starts,
        so the letters written next are whole lines of their own and `dlq show` counts them
        and reports the torn line as unreadable."""
        dead = tmp_path / "dead.jsonl"
        whole = b"".join(orjson.dumps(letter(i)) + b"\n" for i in (1, 2))
        torn = orjson.dumps(letter(3))[:25]
        dead.write_bytes(whole + torn)
        before = dlq("show", f"jsonl:{dead}", "--json").json()
        assert (2, 0) == (before["letters"], before["unreadable"])
        assert [f"line 3 (byte {len(whole)}, {len(torn)} bytes) has no newline"] == [
            note[: note.index(":")] for note in before["notes"]
        ]

        with structlog.testing.capture_logs() as logs:
            anyio.run(append, dead, [letter(4), letter(5)])

        assert [{"event": "dead_letters.torn_line", "offset": len(whole), "bytes": len(torn)}] == [
            {k: e[k] for k in ("event", "offset", "bytes")}
            for e in logs
            if e["event"] == "dead_letters.torn_line"
        ]
        lines = dead.read_bytes().split(b"\n")
        assert torn == lines[2]
        assert [1, 2, 4, 5] == [
            int(orjson.loads(line)["change"]["ID"]) for line in lines if line and line != torn
        ]
        after = dlq("show", f"jsonl:{dead}", "--json").json()
        assert (5, 1, {"not_found": 4}) == (after["letters"], after["unreadable"], reasons(after))
        assert [f"line 3 (byte {len(whole)}, {len(torn)} bytes) is not a JSON object"] == [
            note[: note.index(":")] for note in after["notes"]
        ]

    def test_a_sink_on_a_whole_file_changes_nothing(self, tmp_path: Path) -> None:
        """A file that ends with a newline (or is empty) is appended to as it is."""
        dead = tmp_path / "dead.jsonl"
        whole = orjson.dumps(letter(1)) + b"\n"
        dead.write_bytes(whole)
        with structlog.testing.capture_logs() as logs:
            anyio.run(append, dead, [letter(2)])
        assert [] == [e for e in logs if e["event"] == "dead_letters.torn_line"]
        assert whole + orjson.dumps(letter(2)) + b"\n" == dead.read_bytes()

    def test_a_letter_glued_to_a_torn_one_is_read(self, dlq: Dlq, tmp_path: Path) -> None:
        """A line where a whole letter follows a torn one (a file written before torn lines
        were fenced): `dlq show` counts the torn part unreadable and the whole letter as
        a letter, and says so; `dlq replay` replays the whole letter."""
        dead = tmp_path / "dead.jsonl"
        glued = orjson.dumps(letter(2))[:30] + orjson.dumps(letter(3)) + b"\n"
        dead.write_bytes(orjson.dumps(letter(1)) + b"\n" + glued + b"[1]\n")
        summary = dlq("show", f"jsonl:{dead}", "--json").json()
        assert (4, 2, {"not_found": 2}) == (
            summary["letters"],
            summary["unreadable"],
            reasons(summary),
        )
        assert ["holds a torn letter (30 bytes)", "is not a JSON object"] == [
            note.split(") ", 1)[1].split(" with")[0].split(":")[0] for note in summary["notes"]
        ]
        table = dlq("show", f"jsonl:{dead}").stdout
        assert "note: line 2 (byte" in table
        assert "note: line 3 (byte" in table
        out = tmp_path / "out.jsonl"
        report = dlq("replay", f"jsonl:{dead}", "--to", f"jsonl:{out}", "--json").json()
        assert {"not_found": 2} == report["replayed"]
        assert ["1", "3"] == [json.loads(x)["ID"] for x in out.read_text().splitlines()]

    @pytest.mark.slow
    def test_a_run_cut_short_by_a_full_disk_leaves_nothing_glued(
        self, dlq: Dlq, gateway: Gateway, tmp_path: Path
    ) -> None:
        """A run whose dead-letter write fails half way (a file size limit stands in for the
        full disk) exits non-zero with a torn last line; the next run fences it and logs
        where it starts: each letter it writes is a whole line, and `dlq show` counts them and
        reports the torn line as unreadable."""
        source = tmp_path / "in.jsonl"
        source.write_bytes(b"".join(b'{"ID": %d, "nickname": "x"}\n' % i for i in range(1, 41)))
        env = worker_env(gateway, tmp_path)
        dead = tmp_path / "dead.jsonl"
        limit = 3000

        def full_disk() -> None:  # in the child, before it runs the worker
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit: EFBIG
            resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

        first = run(["--source", f"jsonl:{source}"], env, preexec_fn=full_disk)
        assert 0 != first.returncode
        left = dead.read_bytes()
        assert limit == len(left)
        torn_at = left.rindex(b"\n") + 1
        assert torn_at < limit  # a torn last line

        second = run(["--source", f"jsonl:{source}"], env)
        assert 0 == second.returncode, second.stderr
        fenced = [e for e in events(second.stderr) if e["event"] == "dead_letters.torn_line"]
        assert [(torn_at, limit - torn_at)] == [(e["offset"], e["bytes"]) for e in fenced]
        lines = dead.read_bytes().split(b"\n")
        assert b"" == lines.pop()
        torn = lines.pop(left.count(b"\n"))
        assert left[torn_at:] == torn
        letters = [orjson.loads(line) for line in lines]
        assert {"invalid"} == {d["reason"] for d in letters}
        assert list(range(1, 41)) == [d["change"]["ID"] for d in letters][-40:]
        summary = dlq("show", f"jsonl:{dead}", "--json").json()
        assert (len(letters) + 1, 1) == (summary["letters"], summary["unreadable"])
        assert 1 == len(summary["notes"])
        assert (
            f"(byte {torn_at}, {limit - torn_at} bytes) is not a JSON object"
            in (summary["notes"][0])
        )

    def test_a_write_that_failed_half_way_is_fenced_before_the_next(self, tmp_path: Path) -> None:
        """In one process: a write cut short (the file size limit reached, then lifted) leaves
        a torn line; the next write fences it first, so its letter is a whole line."""
        code = (
            "import json, resource, signal, sys\n"
            "import anyio\n"
            "from worker.deadletters.base import DeadLetterError\n"
            "from worker.backends.jsonl.sink import JsonlDeadLetters\n"
            "async def main(path, letters):\n"
            "    sink = JsonlDeadLetters(path)\n"
            "    await sink.open()\n"
            "    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
            "    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)\n"
            "    resource.setrlimit(resource.RLIMIT_FSIZE, (1000, hard))\n"
            "    try:\n"
            "        await sink.write(letters[:-1])\n"
            "    except DeadLetterError:\n"
            "        print('failed', flush=True)\n"
            "    resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))\n"
            "    await sink.write(letters[-1:])\n"
            "    await sink.close()\n"
            "anyio.run(main, sys.argv[1], json.loads(sys.argv[2]))\n"
        )
        dead = tmp_path / "dead.jsonl"
        letters = [letter(i) for i in range(1, 12)]
        result = subprocess.run(
            [sys.executable, "-c", code, str(dead), json.dumps(letters)],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert 0 == result.returncode, result.stderr
        failed, logged = result.stdout.split("\n", 1)  # structlog's default: stdout
        assert "failed" == failed
        assert "dead_letters.torn_line" in logged
        data = dead.read_bytes()
        left, fenced = data[:1000], data[1000:]
        *whole, torn = left.split(b"\n")
        assert torn  # the failed write left a torn line
        assert letters[: len(whole)] == [orjson.loads(line) for line in whole]
        assert b"\n" + orjson.dumps(letters[-1]) + b"\n" == fenced
