"""Numbered records: a file's lines held as they were split, read as (number, line) records."""

from __future__ import annotations

import orjson
from hypothesis import given
from hypothesis import strategies as st

from worker.core.change import decode_all
from worker.core.records import NumberedRecords

LINES = st.lists(st.binary(max_size=8), max_size=12)
INDEX = st.integers(-14, 13)
SLICES = st.slices(14)


def plain(first: int, lines: list[bytes]) -> list[tuple[int, bytes]]:
    return [(first + i, line) for i, line in enumerate(lines)]


@given(st.integers(0, 10**12), LINES, INDEX, SLICES)
def test_reads_as_the_list_of_its_records(
    first: int, lines: list[bytes], index: int, part: slice
) -> None:
    """Length, items (negative indexes too), slices of any step, iteration and equality:
    those of the list of (number, line) tuples."""
    records, expected = NumberedRecords(first, lines), plain(first, lines)
    assert len(records) == len(expected)
    assert list(records) == expected
    assert records == expected and expected == records
    assert list(records.tokens) == [token for token, _ in expected]
    if -len(expected) <= index < len(expected):
        assert records[index] == expected[index]
    assert list(records[part]) == expected[part]
    assert records[part] == expected[part]


def test_a_slice_is_numbered_from_where_it_starts() -> None:
    records = NumberedRecords(10, [b"a", b"b", b"c", b"d"])
    part = records[1:3]
    assert isinstance(part, NumberedRecords)
    assert (part.first, part.lines) == (11, [b"b", b"c"])
    assert records != plain(10, [b"a", b"b", b"c", b"x"])
    assert records != plain(11, [b"a", b"b", b"c", b"d"])


CHANGE = st.fixed_dictionaries(
    {"ID": st.one_of(st.integers(0, 99), st.text(min_size=1, max_size=3))},
    optional={"phone": st.text(max_size=4), "unsubscribed": st.booleans()},
)


@given(st.integers(0, 1000), st.lists(st.one_of(CHANGE.map(orjson.dumps), st.binary(max_size=6))))
def test_decoded_as_the_tuples_are(first: int, lines: list[bytes]) -> None:
    """decode_all reads the lines and their numbers directly: the same valid changes, the
    same invalid ones with the same tokens, as from (number, line) tuples."""
    valid, invalid = decode_all(NumberedRecords(first, lines))
    valid_t, invalid_t = decode_all(plain(first, lines))
    assert valid == valid_t
    assert [(i.token, i.reason) for i in invalid] == [(i.token, i.reason) for i in invalid_t]
