"""The ``jsonl:`` backend: a file of change lines (or stdin), and dead letters as a JSONL file."""

from __future__ import annotations

from typing import TYPE_CHECKING

from worker.backends import Backend, Enqueue

# The methods import their modules when called: the file input loads only when a jsonl: URI is
# opened, like every backend's.
if TYPE_CHECKING:
    from worker.backends.base import Source
    from worker.deadletters.base import DeadLetterSink
    from worker.deadletters.store import DeadLetterStore


def _file(uri: str) -> str | None:
    """The path of ``jsonl:PATH``; None for ``jsonl:-`` (stdin) and a URI without a path."""
    _, sep, rest = uri.partition(":")
    return rest if sep and rest and rest != "-" else None


class JsonlBackend(Backend):
    """Files: not a store (dead letters default to a file of their own), no ``init``."""

    is_store = False

    def open_source(self, uri: str, *, follow: bool, checkpoint: str | None) -> Source | None:
        """``jsonl:PATH`` or ``jsonl:-`` (stdin)."""
        _, sep, rest = uri.partition(":")
        if not (sep and rest):
            return None
        from worker.backends.jsonl.source import JsonlSource

        return JsonlSource(rest, follow=follow, checkpoint=checkpoint)

    def open_sink(self, uri: str) -> DeadLetterSink | None:
        """``jsonl:PATH`` (not stdin)."""
        path = _file(uri)
        if path is None:
            return None
        from worker.backends.jsonl.sink import JsonlDeadLetters

        return JsonlDeadLetters(path)

    def open_store(self, uri: str) -> DeadLetterStore | None:
        """``jsonl:PATH`` (not stdin)."""
        path = _file(uri)
        if path is None:
            return None
        from worker.backends.jsonl.store import JsonlStore

        return JsonlStore(path)

    def target(self, uri: str) -> tuple[str, Enqueue] | None:
        """A file to run with ``contact-worker run --source jsonl:PATH``."""
        path = _file(uri)
        if path is None:
            return None
        from worker.backends.jsonl.producer import append

        return f"jsonl:{path}", append


BACKEND = JsonlBackend()
