"""The ``jsonl:`` dead-letter sink: one JSON object per line, appended, fsynced.

A write cut short (a full disk, a crash mid-write) leaves a last line without its newline. On
open, and before the next write after a failed one, such a torn line is *fenced*: a newline is
appended, so the fragment stays one recognisably corrupt line (``dlq show`` reports it) and the
next letter starts on a line of its own instead of being merged into it.
"""

from __future__ import annotations

import os
from typing import Any

import anyio
import orjson
import structlog

from worker.deadletters.base import DeadLetterError, DeadLetterSink

log = structlog.get_logger("worker.backends.jsonl")

_SCAN = 64 * 1024
"""Bytes read at a time while looking back for the start of a torn line."""


def torn_tail(fd: int) -> tuple[int, int] | None:
    """Where the last line of the file ``fd`` starts and how long it is, if it lacks its
    newline; None when the file is empty or ends with one."""
    end = os.fstat(fd).st_size
    if end == 0 or os.pread(fd, 1, end - 1) == b"\n":
        return None
    position = end
    while position > 0:
        start = max(0, position - _SCAN)
        newline = os.pread(fd, position - start, start).rfind(b"\n")
        if newline >= 0:
            return start + newline + 1, end - (start + newline + 1)
        position = start
    return 0, end


class JsonlDeadLetters(DeadLetterSink):
    """Appends dead letters to a file; each write is flushed and fsynced before it returns."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.name = path
        self._fd: int | None = None
        self._lock = anyio.Lock()
        self._check_tail = True
        """Whether the file may end in a torn line: at open, and after a failed write."""
        self._readable = True
        self.written = 0
        self.fenced = 0
        """Torn lines fenced so far."""

    async def open(self) -> None:
        """Open (create) the file for appending, and fence a torn last line."""
        try:
            self._fd = await anyio.to_thread.run_sync(self._open)
        except OSError as exc:
            raise DeadLetterError(f"cannot open dead-letter file {self.path}: {exc}") from exc

    def _open(self) -> int:
        # Read and write: the tail is read to find a torn line. Unbuffered (os.write): a write
        # that fails leaves nothing in a buffer to be flushed again, out of place, later.
        flags = os.O_APPEND | os.O_CREAT | os.O_CLOEXEC
        try:
            fd = os.open(self.path, os.O_RDWR | flags, 0o666)
        except PermissionError:  # a file we may append to but not read: no tail to check
            self._readable = False
            return os.open(self.path, os.O_WRONLY | flags, 0o666)
        try:
            self._fence(fd)
        except BaseException:
            os.close(fd)
            raise
        return fd

    def _fence(self, fd: int) -> None:
        """End a torn last line with a newline (fsynced), so nothing is appended onto it."""
        torn = torn_tail(fd)
        self._check_tail = False
        if torn is None:
            return
        offset, size = torn
        self._write_all(fd, b"\n")
        os.fsync(fd)
        self.fenced += 1
        log.warning(
            "dead_letters.torn_line",
            path=self.path,
            offset=offset,
            bytes=size,
            why="the last line had no newline (a write cut short: full disk, crash);"
            " it now ends there and stays a corrupt line that `dlq show` reports",
        )

    @staticmethod
    def _write_all(fd: int, data: bytes) -> None:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]

    def _append(self, data: bytes) -> None:
        fd = self._fd
        if fd is None:
            raise OSError(f"{self.path} is not open")
        try:
            if self._check_tail and self._readable:
                self._fence(fd)
            self._write_all(fd, data)
            os.fsync(fd)
        except OSError:
            self._check_tail = True  # part of it may be in the file: fence before the next
            raise

    async def write(self, letters: list[dict[str, Any]]) -> None:
        """Append and fsync; concurrent writers take turns."""
        if not letters:
            return
        data = b"".join(orjson.dumps(letter) + b"\n" for letter in letters)
        async with self._lock:
            try:
                await anyio.to_thread.run_sync(self._append, data)
            except OSError as exc:
                raise DeadLetterError(f"cannot write {self.path}: {exc}") from exc
            self.written += len(letters)

    async def close(self) -> None:
        """Close the file."""
        if self._fd is not None:
            fd, self._fd = self._fd, None
            os.close(fd)
