"""Where ``dlq replay --to URI`` puts changes back: any input ``contact-worker enqueue --to``
writes (the same writers, so a partitioned input gets each change in its contact's partition),
or a ``jsonl:PATH`` file to run with ``contact-worker run --source jsonl:PATH``.
"""

from __future__ import annotations

from worker.backends import Enqueue, offered
from worker.config import redact_uri


class Target:
    """An input to write changes to, its URI checked."""

    def __init__(self, uri: str, display: str, enqueue: Enqueue) -> None:
        self.uri = uri
        self.display = display
        self._enqueue = enqueue

    async def write(self, lines: list[bytes]) -> int:
        """Write these changes (JSON text, one per element) in order; durable when it returns.
        The count written. SourceError (or OSError for a file) if the input failed."""
        return await self._enqueue(self.uri, lines)


def open_target(uri: str) -> Target:
    """The input a ``--to`` URI names, checked (not connected); ConfigError if it is bad."""
    display, enqueue = offered(
        uri,
        lambda backend: backend.target(uri),
        f"unsupported input {redact_uri(uri)!r} for --to: use sqlite:PATH, redis://...,"
        " postgresql://..., kafka://... (as `contact-worker enqueue --to` takes) or jsonl:PATH"
        " (a file to run)",
    )
    return Target(uri, display, enqueue)
