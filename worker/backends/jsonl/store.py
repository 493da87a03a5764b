"""The ``jsonl:PATH`` dead letters: the sink's append-only file, and the sidecar ``PATH.replayed``.

The worker may be appending to the file while ``dlq`` reads it, so the file is never rewritten;
what was replayed is kept beside it. ``PATH.replayed`` is one JSON object::

    {"version": 1, "file": "dead.jsonl", "first_line_sha256": "9f2c...",
     "lines": [[1, 40], [57, 57]]}

``lines`` are the replayed line numbers (1-based, as in a dead letter's ``source``), as ranges.
After each page written to the input the sidecar is replaced atomically: written to
``PATH.replayed.tmp``, fsynced, renamed over the old one, and the directory fsynced; a crash
leaves the old sidecar or the new one, never a torn one. ``first_line_sha256`` ties it to the
file: a file rotated or replaced since has other lines under those numbers, and the store
refuses to go on (move the sidecar away with the old file). A replay holds an exclusive
``flock`` on the dead-letter file (the worker's appends do not take it), so two replays of one
file cannot both send a letter.

The end is the file's size at :meth:`JsonlStore.open`; a last line without its newline is being
written (or was torn) and is left for the next run, with a note. A line that is not a JSON object
(a torn letter the sink fenced, a foreign line) is read as unreadable, with a note naming its line
and byte offset. A line where a whole letter follows a torn one (written before the sink fenced
torn lines) gives both: the torn part unreadable, the whole letter as it is.
"""

from __future__ import annotations

import bisect
import fcntl
import hashlib
import os
from collections.abc import Iterable, Sequence
from typing import IO, Any

import anyio
import orjson

from worker.deadletters.store import PAGE, DeadLetterStore, StoreBusy, StoreError, letter_of
from worker.deadletters.summary import Stored

SIDECAR_SUFFIX = ".replayed"
SIDECAR_VERSION = 1
MAX_NOTES = 10
"""Notes kept about odd lines; the rest are only counted."""
_LETTER_START = b'{"reason":'
"""How every letter the sink writes begins (``reason`` is its first key; inside a JSON string
a quote is escaped, so a whole letter never holds this)."""


class LineRanges:
    """A set of line numbers kept as sorted, disjoint, non-adjacent ``[start, end]`` ranges."""

    def __init__(self, ranges: Iterable[tuple[int, int]] = ()) -> None:
        self._starts: list[int] = []
        self._ends: list[int] = []
        self._merge(list(ranges))

    def __contains__(self, number: object) -> bool:
        if not isinstance(number, int):
            return False
        i = bisect.bisect_right(self._starts, number) - 1
        return i >= 0 and number <= self._ends[i]

    def __len__(self) -> int:
        return sum(end - start + 1 for start, end in zip(self._starts, self._ends, strict=True))

    def add(self, numbers: Iterable[int]) -> None:
        """Add these line numbers."""
        self._merge([(n, n) for n in numbers])

    def ranges(self) -> list[list[int]]:
        """The ranges, as the sidecar stores them."""
        return [[start, end] for start, end in zip(self._starts, self._ends, strict=True)]

    def _merge(self, extra: list[tuple[int, int]]) -> None:
        ranges = sorted([*zip(self._starts, self._ends, strict=True), *extra])
        starts: list[int] = []
        ends: list[int] = []
        for start, end in ranges:
            if ends and start <= ends[-1] + 1:
                ends[-1] = max(ends[-1], end)
            else:
                starts.append(start)
                ends.append(end)
        self._starts, self._ends = starts, ends


def _after_torn(line: bytes) -> tuple[int, dict[str, Any]] | None:
    """A whole letter appended onto a torn one in this line: where it starts, and it."""
    start = line.find(_LETTER_START, 1)
    while start > 0:
        letter = letter_of(line[start:])
        if letter is not None:
            return start, letter
        start = line.find(_LETTER_START, start + 1)
    return None


def _write_atomically(path: str, data: bytes) -> None:
    """Replace ``path`` by ``data``: a crash leaves the old content or the new, whole."""
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    directory = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)


class JsonlStore(DeadLetterStore):
    """Reads a ``jsonl:`` dead-letter file; marks replayed lines in ``PATH.replayed``."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.sidecar = path + SIDECAR_SUFFIX
        self.name = f"jsonl:{path}"
        self.replayed = LineRanges()
        self._file: IO[bytes] | None = None
        self._end = 0
        self._position = 0
        self._line = 0
        self._first_line_sha256: str | None = None
        self._notes: list[str] = []
        self._more_notes = 0

    def notes(self) -> list[str]:
        """Lines that are torn or not letters: which, where, and what was made of them."""
        more = [f"... and {self._more_notes} more such lines"] if self._more_notes else []
        return [*self._notes, *more]

    def _note(self, text: str) -> None:
        if len(self._notes) < MAX_NOTES:
            self._notes.append(text)
        else:
            self._more_notes += 1

    async def open(self, *, replay: bool = False) -> None:
        """Open the file, fix its end, load the sidecar; lock the file for a replay."""
        await anyio.to_thread.run_sync(self._open, replay)

    def _open(self, replay: bool) -> None:
        try:
            self._file = open(self.path, "rb")
        except OSError as exc:
            raise StoreError(f"cannot read dead letters {self.path}: {exc.strerror}") from exc
        try:
            self._prepare(self._file, replay)
        except BaseException:
            self._close()
            raise

    def _prepare(self, f: IO[bytes], replay: bool) -> None:
        if replay:
            try:
                fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise StoreBusy(f"another `dlq replay` is working on {self.path}") from None
        self._end = os.fstat(f.fileno()).st_size
        first = f.readline() if self._end else b""
        f.seek(0)
        if first.endswith(b"\n"):
            self._first_line_sha256 = hashlib.sha256(first).hexdigest()
        self._load_sidecar()

    def _load_sidecar(self) -> None:
        try:
            with open(self.sidecar, "rb") as f:
                data = f.read()
        except FileNotFoundError:
            return
        except OSError as exc:
            raise StoreError(f"cannot read {self.sidecar}: {exc.strerror}") from exc
        try:
            state = orjson.loads(data)
            ranges = [(int(start), int(end)) for start, end in state["lines"]]
            sha = state["first_line_sha256"]
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
            raise StoreError(f"{self.sidecar} is not a replay sidecar: {exc}") from exc
        if ranges and sha != self._first_line_sha256:
            raise StoreError(
                f"{self.sidecar} was written for another {self.path} (its first line differs:"
                " rotated or replaced?): move the sidecar away with the file it belongs to"
            )
        self.replayed = LineRanges(ranges)

    async def read(self, size: int = PAGE) -> list[Stored]:
        """The next letters up to the end fixed at open."""
        return await anyio.to_thread.run_sync(self._read, size)

    def _read(self, size: int) -> list[Stored]:
        f = self._file
        if f is None:
            raise StoreError(f"{self.path}: not open")
        page: list[Stored] = []
        try:
            while len(page) < size and self._position < self._end:
                line = f.readline()
                if not line.endswith(b"\n") or self._position + len(line) > self._end:
                    if not line.endswith(b"\n"):
                        self._note(
                            f"line {self._line + 1} (byte {self._position}, {len(line)} bytes)"
                            " has no newline: a letter being written, or one torn (a full disk,"
                            " a crash); not counted. The worker fences a torn line when it"
                            " next opens the file"
                        )
                    self._end = self._position  # a line being written: the next run reads it
                    break
                offset = self._position
                self._position += len(line)
                self._line += 1
                if line.strip():
                    page += self._letters(self._line, offset, line)
        except OSError as exc:
            raise StoreError(f"cannot read dead letters {self.path}: {exc.strerror}") from exc
        return page

    def _letters(self, number: int, offset: int, line: bytes) -> list[Stored]:
        """The letters of one whole line: one, or an unreadable one (a torn letter, a foreign
        line), or a torn one and the whole letter appended onto it."""
        key, replayed = str(number), number in self.replayed
        letter = letter_of(line)
        if letter is not None:
            return [Stored(key, letter, replayed)]
        where = f"line {number} (byte {offset}, {len(line) - 1} bytes)"
        found = _after_torn(line)
        if found is None:
            self._note(f"{where} is not a JSON object: a torn letter, or a foreign line")
            return [Stored(key, None, replayed)]
        start, letter = found
        self._note(
            f"{where} holds a torn letter ({start} bytes) with a whole one appended onto it"
            " (written before torn lines were fenced): the torn part is counted unreadable,"
            " the whole letter read"
        )
        return [Stored(key, None, replayed), Stored(key, letter, replayed)]

    async def mark(self, keys: Sequence[str], at: str) -> None:
        """Add these line numbers to the sidecar and replace it atomically (fsynced)."""
        await anyio.to_thread.run_sync(self._mark, [int(key) for key in keys])

    def _mark(self, numbers: list[int]) -> None:
        replayed = LineRanges((start, end) for start, end in self.replayed.ranges())
        replayed.add(numbers)
        state = {
            "version": SIDECAR_VERSION,
            "file": os.path.basename(self.path),
            "first_line_sha256": self._first_line_sha256,
            "lines": replayed.ranges(),
        }
        try:
            _write_atomically(self.sidecar, orjson.dumps(state) + b"\n")
        except OSError as exc:
            raise StoreError(f"cannot write {self.sidecar}: {exc.strerror or exc}") from exc
        self.replayed = replayed

    async def close(self) -> None:
        """Close the file (and so release the lock)."""
        self._close()

    def _close(self) -> None:
        f, self._file = self._file, None
        if f is not None:
            f.close()
