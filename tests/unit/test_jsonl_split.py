"""The JSONL reader's split of chunks into records: its fast path (no checkpoint, plain lines)
and its careful path (a checkpoint's offsets, blank and CRLF lines) give the same records."""

from __future__ import annotations

from pathlib import Path

import anyio
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from worker.backends.jsonl import source as jsonl_source
from worker.backends.jsonl.source import JsonlSource

LINES = st.lists(
    st.one_of(
        st.sampled_from([b'{"ID":1,"phone":"x"}', b"[]", b"not json", b'{"ID":"a"}']),
        st.sampled_from([b"", b"   ", b"\t"]),  # blank lines: no record
        st.binary(min_size=1, max_size=12).filter(lambda b: b"\n" not in b),
    ),
    max_size=40,
)


async def read_all(path: Path, checkpoint: str | None) -> tuple[list[object], int, int, int]:
    records: list[object] = []
    source = JsonlSource(str(path), checkpoint=checkpoint)
    async with source:
        while (got := await source.read()) is not None:
            records += list(got)
    return records, source.lines_read, source.records_read, source._offset


@settings(max_examples=60, deadline=None)
@given(LINES, st.booleans(), st.booleans(), st.integers(1, 64))
def test_both_paths_read_the_same_records(
    tmp_path_factory: pytest.TempPathFactory,
    lines: list[bytes],
    crlf: bool,
    last_newline: bool,
    chunk: int,
) -> None:
    folder = tmp_path_factory.mktemp("split")
    path = folder / "in.jsonl"
    end = b"\r\n" if crlf else b"\n"
    path.write_bytes(end.join(lines) + (end if last_newline and lines else b""))
    saved = jsonl_source.CHUNK_BYTES
    jsonl_source.CHUNK_BYTES = chunk  # many chunks: lines cut anywhere
    try:
        fast = anyio.run(read_all, path, None)
        careful = anyio.run(read_all, path, str(folder / "checkpoint.json"))
    finally:
        jsonl_source.CHUNK_BYTES = saved
    assert fast == careful
    expected = [
        (number, line.removesuffix(b"\r"))
        for number, line in enumerate(path.read_bytes().split(b"\n"))
        if line.removesuffix(b"\r").strip() and line.removesuffix(b"\r")
    ]
    assert expected == fast[0]
    assert path.stat().st_size == fast[3]  # every byte accounted for
