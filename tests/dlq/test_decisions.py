"""The pure parts: counting letters, choosing what to replay, the sidecar's line ranges; and
the command's usage errors."""

from __future__ import annotations

from typing import Any

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from tests.dlq.conftest import Dlq
from worker.backends.jsonl.store import LineRanges
from worker.deadletters.plan import Planner, parse_reasons
from worker.deadletters.summary import Stored, Tally


def letter(reason: str, change: dict[str, Any] | None = None, **fields: Any) -> dict[str, Any]:
    return {"reason": reason, "change": change, **fields}


CHANGE = {"ID": "1", "lastname": "Lee"}


class TestTally:
    def test_counts_by_reason_error_and_detail(self) -> None:
        """Letters are counted by reason (replayed, without change), error code and detail;
        the time span is the smallest and largest `at`."""
        tally = Tally()
        tally.add(
            [
                Stored(
                    "1",
                    letter(
                        "not_found",
                        CHANGE,
                        error="404",
                        detail="contact not found",
                        at="2026-11-26T14:00:02Z",
                    ),
                ),
                Stored(
                    "2",
                    letter(
                        "not_found",
                        CHANGE,
                        error="404",
                        detail="contact not found",
                        at="2026-11-26T14:00:01Z",
                    ),
                    replayed=True,
                ),
                Stored(
                    "3", letter("invalid", None, detail="not valid JSON", at="2026-11-27T00:00:00Z")
                ),
                Stored("4", None),
            ]
        )
        summary = tally.summary("s", top=1)
        data = summary.to_json()
        assert {
            "not_found": {"letters": 2, "replayed": 1, "without_change": 0},
            "invalid": {"letters": 1, "replayed": 0, "without_change": 1},
        } == data["by_reason"]
        assert {"404": 2, "-": 1} == data["by_error"]
        assert [{"reason": "not_found", "detail": "contact not found", "count": 2}] == data[
            "top_details"
        ]
        assert ("2026-11-26T14:00:01Z", "2026-11-27T00:00:00Z") == (summary.oldest, summary.newest)
        assert (4, 1, 1, 1) == (
            summary.letters,
            summary.unreadable,
            summary.replayed,
            summary.waiting,
        )

    def test_long_details_are_cut(self) -> None:
        """A detail is counted on one line and at most 200 characters."""
        tally = Tally()
        tally.add([Stored("1", letter("rejected", CHANGE, detail="x\n" * 500))])
        ((_, detail, _),) = tally.summary("s").top_details
        assert len(detail) == 200 and "\n" not in detail


class TestPlanner:
    page = [
        Stored("1", letter("not_found", CHANGE)),
        Stored("2", letter("rejected", CHANGE)),
        Stored("3", letter("invalid", CHANGE)),
        Stored("4", letter("invalid", None, raw="{oops")),
        Stored("5", letter("not_found", CHANGE), replayed=True),
        Stored("6", None),
    ]

    def test_default_is_every_reason_but_invalid(self) -> None:
        """Without --reason: not_found and rejected with a change, not yet replayed."""
        planner = Planner()
        chosen = planner.choose(self.page, orjson.dumps)
        assert ["1", "2"] == [c.key for c in chosen]
        assert orjson.dumps(CHANGE) == chosen[0].line
        counts = planner.counts.to_json()
        assert {"invalid": 1} == counts["not_asked"]
        assert {"invalid": 1} == counts["without_change"]
        assert {"not_found": 1} == counts["already_replayed"]
        assert 1 == counts["unreadable"]

    def test_reasons_and_limit(self) -> None:
        """--reason picks reasons (invalid too, when named); --limit counts what it leaves."""
        planner = Planner(frozenset({"invalid", "not_found"}), limit=1)
        assert ["1"] == [c.key for c in planner.choose(self.page, orjson.dumps)]
        assert {"invalid": 1} == dict(planner.counts.over_limit)
        assert {"rejected": 1} == dict(planner.counts.not_asked)

    def test_parse_reasons(self) -> None:
        """Repeated --reason and comma lists add up; nothing given means the default."""
        assert frozenset({"a", "b", "c"}) == parse_reasons(["a,b", " c ", ""])
        assert parse_reasons(None) is None
        assert parse_reasons([","]) is None


class TestLineRanges:
    def test_merges_neighbours(self) -> None:
        """Adjacent and overlapping numbers become one range."""
        ranges = LineRanges([(5, 7)])
        ranges.add([1, 2, 3, 8, 10])
        assert [[1, 3], [5, 8], [10, 10]] == ranges.ranges()
        assert 8 == len(ranges)

    @given(st.lists(st.sets(st.integers(1, 200))))
    def test_holds_exactly_what_was_added(self, batches: list[set[int]]) -> None:
        """Whatever the order of the additions, it holds exactly their union."""
        ranges = LineRanges()
        for batch in batches:
            ranges.add(sorted(batch))
        union = set().union(*batches)
        assert union == {n for n in range(0, 202) if n in ranges}
        assert len(union) == len(ranges)
        assert LineRanges(tuple(r) for r in ranges.ranges()).ranges() == ranges.ranges()


class TestUsage:
    @pytest.mark.parametrize(
        ("args", "message"),
        [
            (["show", "nosuch:x"], "unsupported dead-letter store"),
            (["show", "jsonl:-"], "unsupported dead-letter store"),
            (["show", "redis://127.0.0.1:6379/0?bogus=1"], "unknown parameter 'bogus'"),
            (["show", "postgresql://u@h/db?table=Bad-Name"], "table must be"),
            (["replay", "jsonl:d.jsonl", "--to", "amqp://x"], "unsupported input"),
            (["replay", "jsonl:d.jsonl", "--to", "x", "--reason", "gone"], "unknown reason"),
            (["replay", "jsonl:d.jsonl", "--to", "jsonl:o", "--limit", "0"], "--limit"),
            (["show", "jsonl:d.jsonl", "--top", "-1"], "--top"),
        ],
    )
    def test_exit_2_with_a_message(self, dlq: Dlq, args: list[str], message: str) -> None:
        """A bad URI or option: exit 2 and one line saying what is wrong."""
        result = dlq(*args)
        assert 2 == result.code
        assert message in result.stderr
        assert result.stderr.startswith("contact-worker: ")
