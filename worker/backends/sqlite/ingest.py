"""``POST /v1/changes``: upstream systems push changes into the ``sqlite:`` spool over HTTP.

Request: ``Authorization: Bearer <token>`` and a body holding one change object, a JSON array of
changes, or NDJSON (one change per line; chosen by ``Content-Type: application/x-ndjson``, or
sniffed when a body that is not one JSON document starts with ``{`` and has several lines).

Answers (all JSON):

- ``202 {"accepted": n, "rejected": [{"index": i, "reason": "..."}]}``: the ``n`` valid changes
  are committed to disk, in one transaction, in body order. Invalid items are not stored; ``index``
  is the item's 0-based position in the array, or its 0-based line number in NDJSON.
- ``400`` with the same shape when no item is valid; ``400 {"error": ..., "accepted": 0,
  "rejected": []}`` when the body is empty or not JSON at all.
- ``401 {"error": ...}`` (with ``WWW-Authenticate: Bearer``) when the token is missing or wrong.
- ``408 {"error": ...}`` (and the connection closed) when the body did not arrive in full within
  ``body_timeout_s`` (default 30 s) of the handler starting to read it: nothing was stored.
- ``413 {"error": ...}`` when the body is larger than ``max_body_bytes`` (after decompression).
- ``503 {"error": ...}`` with ``Retry-After`` when the spool holds ``high_water`` rows or more
  (backpressure: nothing was stored, send the same request again later), or when the database
  could not commit (nothing was stored either). The mark is checked before the body is read, so
  requests already past it still store: the spool can end up to a few bodies above it.
- ``503 {"error": "ingest disabled: set WORKER_INGEST_TOKEN"}`` (no Retry-After) when the worker
  runs without a token. The ingest is never open without one; 503 rather than 403 or 404
  because it is the deployment that is incomplete, not the request that is wrong: a producer
  that keeps its changes and retries loses nothing while an operator sets the token.

A request that got no answer (a timeout, a dropped connection) may or may not have been stored;
send it again before sending anything newer for the same contacts: delivery is at least once.
"""

from __future__ import annotations

import hmac
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import anyio
import orjson
import structlog
from aiohttp import web

from worker.backends.sqlite.spool import (
    DEFAULT_HIGH_WATER,
    DEFAULT_MAX_BODY_BYTES,
    Spool,
    SpoolError,
)
from worker.core.change import validate

log = structlog.get_logger("worker.backends.sqlite.ingest")

INGEST_PATH = "/v1/changes"
DEFAULT_RETRY_AFTER_S = 5
NDJSON_TYPES = frozenset(
    {
        "application/x-ndjson",
        "application/ndjson",
        "application/jsonl",
        "application/x-jsonlines",
        "application/jsonlines",
    }
)
THREAD_PARSE_BYTES = 256 * 1024
"""Bodies larger than this are parsed in a worker thread, so the engine's loop keeps running."""

DISABLED = "ingest disabled: set WORKER_INGEST_TOKEN"

DEFAULT_BODY_TIMEOUT_S = 30.0
"""Time a request body has to arrive in full: a client that stops sending is answered 408
instead of holding its connection (and a place under the status port's cap) for good."""


@dataclass(frozen=True, slots=True)
class Parsed:
    """A request body taken apart: what to store, what to refuse, or why the body is unusable."""

    changes: list[bytes]
    """The valid changes as JSON texts, in body order."""
    rejected: list[dict[str, Any]]
    """``{"index": i, "reason": "..."}`` per invalid item."""
    error: str | None = None
    """Set when the body as a whole is unusable (empty, not JSON, not changes)."""


def parse_changes(body: bytes, content_type: str) -> Parsed:
    """Decode and validate a request body (pure: no I/O)."""
    if not body.strip():
        return Parsed([], [], "empty body: send a change object, an array of changes, or NDJSON")
    if content_type.lower() in NDJSON_TYPES:
        return _ndjson(body)
    try:
        document = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        # Several objects one per line, sent without the NDJSON content type.
        if body.lstrip()[:1] == b"{" and b"\n" in body.strip():
            return _ndjson(body)
        return Parsed([], [], f"not valid JSON: {exc}")
    if type(document) is dict:
        return _check(enumerate([document]))
    if type(document) is list:
        if not document:
            return Parsed([], [], "no changes in the body: the array is empty")
        return _check(enumerate(document))
    return Parsed(
        [],
        [],
        "the body must be a change object, an array of changes, or NDJSON (one change per line)",
    )


def _check(items: Any) -> Parsed:
    changes: list[bytes] = []
    rejected: list[dict[str, Any]] = []
    for index, item in items:
        problem = validate(item)
        if problem is None:
            changes.append(orjson.dumps(item))
        else:
            rejected.append({"index": index, "reason": problem})
    return Parsed(changes, rejected)


def _ndjson(body: bytes) -> Parsed:
    changes: list[bytes] = []
    rejected: list[dict[str, Any]] = []
    for index, line in enumerate(body.split(b"\n")):
        if not line.strip():
            continue
        try:
            item = orjson.loads(line)
        except orjson.JSONDecodeError as exc:
            rejected.append({"index": index, "reason": f"not valid JSON: {exc}"})
            continue
        problem = validate(item)
        if problem is None:
            changes.append(orjson.dumps(item))
        else:
            rejected.append({"index": index, "reason": problem})
    if not changes and not rejected:
        return Parsed([], [], "empty body: send a change object, an array of changes, or NDJSON")
    return Parsed(changes, rejected)


@dataclass(slots=True)
class IngestStats:
    """Counters of the ingest endpoint, for metrics."""

    responses: Counter[int] = field(default_factory=Counter)
    """Answers by HTTP status."""
    accepted: int = 0
    """Changes stored."""
    rejected: int = 0
    """Invalid items refused."""


INGEST_STATS = web.AppKey("ingest_stats", IngestStats)
"""Where :func:`add_ingest_routes` leaves the endpoint's counters on the app."""


def add_ingest_routes(
    app: web.Application,
    spool: Spool,
    *,
    token: str | None,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    high_water: int = DEFAULT_HIGH_WATER,
    retry_after_s: int = DEFAULT_RETRY_AFTER_S,
    body_timeout_s: float = DEFAULT_BODY_TIMEOUT_S,
) -> None:
    """Add ``POST /v1/changes`` storing into ``spool`` (call before the app starts).

    The body limit is enforced here while streaming the body, so the app's ``client_max_size``
    does not apply to this route. ``token`` None or empty answers every request 503 (see the
    module doc).
    """
    ingest = _Ingest(spool, token, max_body_bytes, high_water, retry_after_s, body_timeout_s)
    app[INGEST_STATS] = ingest.stats
    app.router.add_post(INGEST_PATH, ingest.handle)


class _Ingest:
    def __init__(
        self,
        spool: Spool,
        token: str | None,
        max_body_bytes: int,
        high_water: int,
        retry_after_s: int,
        body_timeout_s: float,
    ) -> None:
        self.spool = spool
        # An empty token would let "Bearer " in: it disables the ingest like no token at all.
        self.token = token.encode() if token else None
        self.max_body_bytes = max_body_bytes
        self.high_water = high_water
        self.retry_after = str(retry_after_s)
        self.body_timeout_s = body_timeout_s
        self.stats = IngestStats()

    def _answer(
        self, status: int, body: dict[str, Any], headers: dict[str, str] | None = None
    ) -> web.Response:
        self.stats.responses[status] += 1
        return web.Response(
            body=orjson.dumps(body), status=status, content_type="application/json", headers=headers
        )

    async def handle(self, request: web.Request) -> web.Response:
        """Authenticate, check the limits, parse, store durably, then answer."""
        if self.token is None:
            return self._answer(503, {"error": DISABLED})
        refusal = self._authenticate(request.headers.get("Authorization"))
        if refusal is not None:
            log.info("ingest refused", reason=refusal, remote=request.remote)
            challenge = 'Bearer realm="contact-worker"'
            if refusal != "missing":
                challenge += ', error="invalid_token"'
            error = (
                "missing bearer token: send Authorization: Bearer <token>"
                if refusal == "missing"
                else "invalid bearer token"
            )
            return self._answer(401, {"error": error}, {"WWW-Authenticate": challenge})
        too_large = {"error": f"body larger than {self.max_body_bytes} bytes"}
        length = request.content_length
        if length is not None and length > self.max_body_bytes:
            return self._answer(413, too_large)
        if self.spool.rows >= self.high_water:
            return self._answer(
                503,
                {
                    "error": f"spool full: {self.spool.rows} changes waiting"
                    f" (high-water mark {self.high_water}); nothing stored, retry later"
                },
                {"Retry-After": self.retry_after},
            )
        body: bytes | None = None
        with anyio.move_on_after(self.body_timeout_s) as reading:
            body = await self._read_body(request)
        if reading.cancelled_caught:
            log.info("ingest body timeout", remote=request.remote, timeout_s=self.body_timeout_s)
            answer = self._answer(
                408,
                {
                    "error": f"request body not complete within {self.body_timeout_s:g} s;"
                    " nothing stored, send it again"
                },
            )
            answer.force_close()  # what is left of the body is not worth waiting for
            return answer
        if body is None:
            return self._answer(413, too_large)
        if len(body) > THREAD_PARSE_BYTES:
            parsed = await anyio.to_thread.run_sync(parse_changes, body, request.content_type)
        else:
            parsed = parse_changes(body, request.content_type)
        self.stats.rejected += len(parsed.rejected)
        if parsed.error is not None:
            return self._answer(400, {"error": parsed.error, "accepted": 0, "rejected": []})
        if not parsed.changes:
            return self._answer(400, {"accepted": 0, "rejected": parsed.rejected})
        try:
            await self.spool.append(parsed.changes)
        except SpoolError as exc:
            log.error("ingest could not store", error=str(exc))
            return self._answer(
                503,
                {"error": f"the spool could not store the changes, nothing stored: {exc}"},
                {"Retry-After": self.retry_after},
            )
        self.stats.accepted += len(parsed.changes)
        return self._answer(202, {"accepted": len(parsed.changes), "rejected": parsed.rejected})

    def _authenticate(self, header: str | None) -> str | None:
        """None if the bearer token is right, else ``missing`` or ``invalid``."""
        assert self.token is not None
        if not header:
            return "missing"
        scheme, _, credentials = header.strip().partition(" ")
        if scheme.lower() != "bearer":
            return "missing"
        given = credentials.strip().encode("utf-8", "surrogateescape")
        # compare_digest: the time taken does not tell how much of the token was right.
        return None if hmac.compare_digest(given, self.token) else "invalid"

    async def _read_body(self, request: web.Request) -> bytes | None:
        """The whole body, or None as soon as it passes the limit."""
        chunks: list[bytes] = []
        size = 0
        async for chunk in request.content.iter_any():
            size += len(chunk)
            if size > self.max_body_bytes:
                return None
            chunks.append(chunk)
        return b"".join(chunks)
