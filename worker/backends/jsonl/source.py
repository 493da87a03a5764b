"""The ``jsonl:`` source: one change per line from a file or stdin, with an optional checkpoint.

The checkpoint (JSON) holds the acknowledged prefix (``line``, ``offset``: everything before is
done) and ``read_to``: a byte offset that every line handed out so far ends at or before,
written before lines beyond it are handed out. After a crash, the lines from ``offset`` to
``read_to`` may have been sent: they are a replay range (DESIGN 9), read in full before any of
it is sent again.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Hashable, Sequence
from pathlib import Path
from typing import Any

import anyio
import orjson
import structlog

from worker.backends.base import (
    NumberedRecords,
    Record,
    ReplayRanges,
    Source,
    SourceError,
    SourceStatistics,
)

log = structlog.get_logger("worker.backends.jsonl")

CHUNK_BYTES = 256 * 1024
READ_MARK_AHEAD = 16 * CHUNK_BYTES
"""How far past what was read the checkpoint's ``read_to`` is written: one write per 4 MiB read,
at the cost of a replay range up to that much longer than what was read (it is read, not sent)."""


class Progress:
    """The contiguous acknowledged prefix of a line-numbered input: pure bookkeeping.

    Lines are acknowledged in any order; the checkpoint may only move past a line once it and
    every line before it are done, so a restart never skips an unfinished change.
    """

    def __init__(self, line: int = 0, offset: int = 0) -> None:
        self.line = line
        """The first line (0-based) not yet part of the acknowledged prefix."""
        self.offset = offset
        """Byte offset where that line starts."""
        # ends[i] is where line (line + i) ends; a list, not a dict: lines come densely.
        self._ends: list[int] = []
        self._head = 0
        self._done: set[int] = set()

    def extend(self, ends: list[int]) -> None:
        """The next ``len(ends)`` lines were read, ending at these offsets."""
        self._ends.extend(ends)

    def ack(self, line: int) -> bool:
        """Line ``line`` is done; True if the prefix moved."""
        if line != self.line:
            self._done.add(line)
            return False
        ends, done = self._ends, self._done
        head = self._head
        self.offset = ends[head]
        head += 1
        line += 1
        while line in done:
            done.discard(line)
            self.offset = ends[head]
            head += 1
            line += 1
        self.line = line
        if head > 4096 and head * 2 > len(ends):
            del ends[:head]
            head = 0
        self._head = head
        return True

    @property
    def pending(self) -> int:
        """Lines read and not yet in the prefix."""
        return len(self._ends) - self._head


class JsonlSource(Source):
    """JSON lines from a file (finite, or tailed with ``follow``) or from stdin (``-``)."""

    def __init__(
        self,
        path: str,
        *,
        follow: bool = False,
        checkpoint: str | None = None,
        checkpoint_interval_s: float = 0.5,
        poll_s: float = 0.2,
    ) -> None:
        if path == "-" and (follow or checkpoint):
            raise SourceError("jsonl:- (stdin) cannot be followed or checkpointed")
        self.path = path
        self.name = "stdin" if path == "-" else os.path.basename(path)
        self.follow = follow
        self.checkpoint = checkpoint
        self.checkpoint_interval_s = checkpoint_interval_s
        self.poll_s = poll_s
        self.progress = Progress()
        self._file: Any = None
        self._rest = b""
        self._line = 0
        self._offset = 0
        self._eof = False
        self._saved_line = 0
        self._saved_at = 0.0
        self._read_to = 0
        """The ``read_to`` the checkpoint file holds (0: none written yet)."""
        self._replay_to: int | None = None
        """Where the replay range ends (a byte offset), while it is being read."""
        self._ranges = ReplayRanges(self)
        self._save_lock: anyio.Lock | None = None
        self.lines_read = 0
        self.records_read = 0
        """Lines handed out (blank ones are not)."""
        self.lines_acked = 0

    async def open(self) -> None:
        """Open the input and skip what an earlier run's checkpoint says is done."""
        if self.path == "-":
            self._file = anyio.wrap_file(sys.stdin.buffer)
            return
        try:
            self._file = await anyio.open_file(self.path, "rb")
        except OSError as exc:
            raise SourceError(f"cannot open {self.path}: {exc.strerror}") from exc
        if self.checkpoint:
            self._save_lock = anyio.Lock()
            size = (await anyio.Path(self.path).stat()).st_size
            line, offset, read_to = await anyio.to_thread.run_sync(self._load_checkpoint, size)
            if offset > size:
                raise SourceError(
                    f"checkpoint {self.checkpoint} says byte {offset} but {self.path} has only"
                    f" {size}: the file was replaced or truncated; remove the checkpoint"
                )
            await self._file.seek(offset)
            self._line, self._offset = line, offset
            self.progress = Progress(line, offset)
            self._saved_line = line
            self._read_to = read_to
            if min(read_to, size) > offset:
                self._replay_to = min(read_to, size)
                self._ranges.begin(self.name)
            if line or offset:
                # `line` as dead letters count (1-based): the first line this run reads.
                log.info(
                    "source.resumed",
                    path=self.path,
                    checkpoint=self.checkpoint,
                    line=line + 1,
                    offset=offset,
                )

    def _load_checkpoint(self, size: int) -> tuple[int, int, int]:
        """The checkpoint's line, offset and read_to (``size`` for a checkpoint written before
        read_to existed: all of the file may have been read)."""
        assert self.checkpoint is not None
        try:
            data = orjson.loads(Path(self.checkpoint).read_bytes())
        except FileNotFoundError:
            return 0, 0, 0
        except (OSError, orjson.JSONDecodeError) as exc:
            raise SourceError(f"unreadable checkpoint {self.checkpoint}: {exc}") from exc
        if data.get("path") != os.path.abspath(self.path):
            raise SourceError(
                f"checkpoint {self.checkpoint} belongs to {data.get('path')}, not {self.path}"
            )
        offset = int(data["offset"])
        return int(data["line"]), offset, max(offset, int(data.get("read_to", size)))

    async def read(self) -> Sequence[Record] | None:
        """The next complete lines; at the end, None (or wait for more when following)."""
        if self._ranges:
            self._replay_step()
        while True:
            if self._eof:
                return None
            data: bytes = await self._file.read1(CHUNK_BYTES)
            self.backlog = len(data) >= CHUNK_BYTES
            if data:
                records = self._split(data)
                if records:
                    await self._mark_read()
                    return records
                continue
            if self.follow:
                if self._ranges:  # a range may end with lines that carried no record
                    self._replay_step()
                await self._save_idle()
                await anyio.sleep(self.poll_s)
                continue
            self._eof = True
            if self._rest:  # a last line without its newline
                records = self._split(b"\n", final=True)
                if records:
                    await self._mark_read()
                    return records
            return None

    def _replay_step(self) -> None:
        """Tell the engine the replay range began, or ended: every line that ends within it
        was split from what was read before this call, and handed out."""
        self._ranges.sync()
        replay_to = self._replay_to
        if replay_to is not None and self._offset + len(self._rest) >= replay_to:
            self._replay_to = None
            self._ranges.end(self.name)

    async def _mark_read(self) -> None:
        """Before lines past the checkpoint's ``read_to`` go out, move it (well) past them: a
        restart then knows how far this run may have read."""
        if self.checkpoint and self._offset > self._read_to:
            self._read_to = self._offset + len(self._rest) + READ_MARK_AHEAD
            await self._save()

    def _split(self, data: bytes, final: bool = False) -> Sequence[Record]:
        chunk = self._rest + data if self._rest else data
        lines = chunk.split(b"\n")
        self._rest = lines.pop()
        if (
            not self.checkpoint
            and b"\r" not in chunk
            and all(lines)
            and not any(map(bytes.isspace, lines))
        ):  # the common case, in C: every line a record, numbered in order
            line_no, count = self._line, len(lines)
            self._offset += len(chunk) - len(self._rest) - (count if final else 0)
            self._line = line_no + count
            self.lines_read += count
            self.records_read += count
            return NumberedRecords(line_no, lines)
        records: list[Record] = []
        append = records.append
        ends: list[int] = []
        blank: list[int] = []
        line_no, offset = self._line, self._offset
        newline = 0 if final else 1
        for raw in lines:
            offset += len(raw) + newline
            ends.append(offset)
            if raw and raw[-1] == 13:  # "\r" of a CRLF line
                raw = raw[:-1]
            if raw and not raw.isspace():
                append((line_no, raw))
            else:
                blank.append(line_no)
            line_no += 1
        if self.checkpoint:
            self.progress.extend(ends)
            for line in blank:  # blank lines carry nothing: done as soon as read
                self.progress.ack(line)
        self._line, self._offset = line_no, offset
        self.lines_read += len(lines)
        self.records_read += len(records)
        return records

    tokens_numbered = True
    """A record's token is its line number (0-based), in the order read."""

    @property
    def acks_by_count(self) -> bool:  # type: ignore[override]
        """Without a checkpoint nothing is kept of which lines are done: only how many."""
        return not self.checkpoint

    async def ack_count(self, count: int) -> None:
        """``count`` lines done (no checkpoint: nothing else to keep)."""
        self.lines_acked += count

    async def ack(self, tokens: Sequence[Hashable]) -> None:
        """Mark lines done; save the checkpoint now and then."""
        self.lines_acked += len(tokens)
        if not self.checkpoint:
            return  # nobody reads the progress: a finite file is simply read again
        progress = self.progress
        for token in tokens:
            progress.ack(token)  # type: ignore[arg-type]
        if self.checkpoint and progress.line != self._saved_line:
            now = time.monotonic()
            if now - self._saved_at >= self.checkpoint_interval_s:
                self._saved_at = now
                await self._save()

    async def _save_idle(self) -> None:
        """While a followed file is quiet, save what acknowledgements since the last save
        (held back by the interval) moved: the checkpoint does not lag until the next ack."""
        if self.checkpoint and self.progress.line != self._saved_line:
            now = time.monotonic()
            if now - self._saved_at >= self.checkpoint_interval_s:
                self._saved_at = now
                await self._save()

    async def _save(self) -> None:
        # The reader (read_to) and the acknowledger (the prefix) both save: one at a time.
        assert self._save_lock is not None
        async with self._save_lock:
            line, offset = self.progress.line, self.progress.offset
            await anyio.to_thread.run_sync(self._write_checkpoint, line, offset, self._read_to)
            self._saved_line = line

    def _write_checkpoint(self, line: int, offset: int, read_to: int) -> None:
        assert self.checkpoint is not None
        target = Path(self.checkpoint)
        tmp = target.with_name(target.name + ".tmp")
        body = {
            "path": os.path.abspath(self.path),
            "line": line,
            "offset": offset,
            "read_to": max(read_to, offset),
        }
        with open(tmp, "wb") as f:
            f.write(orjson.dumps(body))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
        dir_fd = os.open(target.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)

    def statistics(self) -> SourceStatistics:
        """Lines handed out and not acknowledged."""
        return SourceStatistics(unacked=self.records_read - self.lines_acked)

    def describe(self, tokens: Sequence[Hashable]) -> str:
        """``name:line`` (1-based), several lines joined by commas."""
        return f"{self.name}:" + ",".join(str(int(t) + 1) for t in tokens)  # type: ignore[call-overload]

    async def close(self) -> None:
        """Save the final checkpoint and close the file."""
        if self.checkpoint and self.progress.line != self._saved_line:
            await self._save()
        if self._file is not None and self.path != "-":
            await self._file.aclose()
        self._file = None
