"""Changes put back into a ``jsonl:`` file by ``dlq replay --to jsonl:PATH``, to run with
``contact-worker run --source jsonl:PATH`` (``enqueue --to`` takes no file: write it directly)."""

from __future__ import annotations

import os
from collections.abc import Iterable

import anyio


async def append(uri: str, lines: Iterable[bytes]) -> int:
    """Append these lines to the file ``jsonl:PATH`` names, fsynced; the count appended."""
    path = uri.partition(":")[2]
    data = [line + b"\n" for line in lines]
    count = len(data)

    def write() -> None:
        created = not os.path.exists(path)
        with open(path, "ab+") as f:
            if f.tell() > 0:
                f.seek(-1, os.SEEK_END)
                if f.read(1) != b"\n":  # a last line cut short: never glue a change onto it
                    data.insert(0, b"\n")
            f.write(b"".join(data))
            f.flush()
            os.fsync(f.fileno())
        if created:  # the new file's name must survive a power cut too, like the marks
            fd = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)

    await anyio.to_thread.run_sync(write)
    return count
