"""The ``jsonl:`` dead-letter sink: one JSON object per line, appended, fsynced."""

from __future__ import annotations

import os
from typing import IO, Any

import anyio
import orjson

from worker.deadletters.base import DeadLetterError, DeadLetterSink


class JsonlDeadLetters(DeadLetterSink):
    """Appends dead letters to a file; each write is flushed and fsynced before it returns."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.name = path
        self._file: IO[bytes] | None = None
        self._lock = anyio.Lock()
        self.written = 0

    async def open(self) -> None:
        """Open (create) the file for appending."""
        try:
            self._file = await anyio.to_thread.run_sync(open, self.path, "ab")
        except OSError as exc:
            raise DeadLetterError(f"cannot open dead-letter file {self.path}: {exc}") from exc

    def _append(self, data: bytes) -> None:
        assert self._file is not None
        self._file.write(data)
        self._file.flush()
        os.fsync(self._file.fileno())

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
        if self._file is not None:
            self._file.close()
            self._file = None
