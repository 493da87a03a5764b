"""``dlq show`` and ``dlq replay`` on a ``jsonl:`` dead-letter file left by a real run."""

from __future__ import annotations

import fcntl
import json
from pathlib import Path

from tests.cli.test_cli import Gateway, run, worker_env
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
