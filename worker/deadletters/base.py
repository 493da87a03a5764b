"""The dead-letter sink interface and the record it writes (DESIGN "Formats")."""

from __future__ import annotations

import abc
import datetime
from typing import Any

# Re-exported: the sinks import it from here.
from worker.errors import DeadLetterError as DeadLetterError


def record(
    reason: str,
    *,
    change: dict[str, Any] | None,
    source: str,
    raw: str | None = None,
    status: int | None = None,
    error: str | None = None,
    detail: str | None = None,
    at: datetime.datetime | None = None,
) -> dict[str, Any]:
    """One dead letter in the documented shape."""
    when = at or datetime.datetime.now(datetime.UTC)
    return {
        "reason": reason,
        "change": change,
        "raw": raw,
        "status": status,
        "error": error,
        "detail": detail,
        "source": source,
        "at": when.strftime("%Y-%m-%dT%H:%M:%SZ"),
    }


class DeadLetterSink(abc.ABC):
    """Where changes that will never be applied are kept, durably, before their ack."""

    name: str = "dead letters"

    async def open(self) -> None:  # noqa: B027 - optional hook
        """Create or connect to the sink."""

    @abc.abstractmethod
    async def write(self, letters: list[dict[str, Any]]) -> None:
        """Store these dead letters durably; return only once they would survive a crash."""

    async def close(self) -> None:  # noqa: B027 - optional hook
        """Let go of resources."""
