"""Inputs: one module per kind of source, all behind :class:`worker.sources.base.Source`."""

from __future__ import annotations

from worker.config import ConfigError
from worker.sources.base import Source


def open_source(uri: str, *, follow: bool = False, checkpoint: str | None = None) -> Source:
    """The source a URI names (not opened yet)."""
    scheme, sep, rest = uri.partition(":")
    if scheme == "jsonl" and sep and rest:
        from worker.sources.jsonl import JsonlSource

        return JsonlSource(rest, follow=follow, checkpoint=checkpoint)
    raise ConfigError(f"unsupported source {uri!r}: use jsonl:PATH or jsonl:- (stdin)")
