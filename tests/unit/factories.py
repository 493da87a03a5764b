"""Small builders shared by the unit tests of the pure core."""

from __future__ import annotations

import datetime
from collections.abc import Hashable
from typing import Any

from worker.core.change import Change
from worker.core.classify import Verdict, classify
from worker.core.coalesce import Entry

NOW_WALL = datetime.datetime(2026, 11, 26, 14, 0, 0, tzinfo=datetime.UTC)
"""The wall clock the classifier is given: tests never read the real one."""

NOT_FOUND_BODY = b'{"error":"404","errorMsg":"Contact not found"}'
REJECTED_BODY = b'{"error":"139","errorMsg":"Missing or invalid parameters"}'


def change(id_: int | str, token: Hashable = None, **fields: Any) -> Change:
    """A valid change to contact ``id_`` (the token defaults to a fresh object)."""
    return Change(str(id_), {"ID": id_, **fields}, object() if token is None else token)


def entry(key: str, seq: int = 1, since: float = 0.0, **fields: Any) -> Entry:
    """A coalesced entry for ``key`` with one token, named after the key, as the coalescer
    holds one change: its object, its token bare."""
    return Entry(key, {"ID": key, **fields}, f"t-{key}", seq, since)


def entries(*keys: str) -> list[Entry]:
    """One entry per key, in order."""
    return [entry(key, seq=i) for i, key in enumerate(keys, start=1)]


def applied() -> Verdict:
    """The verdict for a 204."""
    return classify(204, b"", None, NOW_WALL)


def not_found() -> Verdict:
    """The verdict for a 404: some ID in the request is unknown."""
    return classify(404, NOT_FOUND_BODY, None, NOW_WALL)


def rejected() -> Verdict:
    """The verdict for a batch-level 400 with error 139."""
    return classify(400, REJECTED_BODY, None, NOW_WALL)


def too_large() -> Verdict:
    """The verdict for a 413."""
    return classify(413, b"", None, NOW_WALL)


def server_error() -> Verdict:
    """The verdict for the API's own 503 without Retry-After."""
    return classify(503, b'{"error":"server error","errorMsg":"try later"}', None, NOW_WALL)


def too_many(retry_after: str) -> Verdict:
    """The verdict for a 429 with a Retry-After header."""
    return classify(429, b"", retry_after, NOW_WALL)


def auth_failure(code: str = "104") -> Verdict:
    """The verdict for a 400 carrying an auth error code."""
    return classify(400, b'{"error":"' + code.encode() + b'","errorMsg":"no"}', None, NOW_WALL)
