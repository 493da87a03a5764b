"""The ``redis://`` source: one Redis stream read through a consumer group.

URI: ``redis://[USER:PASSWORD@]HOST:PORT/DB?stream=..&group=..&consumer=..&block_ms=..&count=..
&claim_idle_ms=..&delete_acked=..`` (``rediss://`` for TLS; ``ssl_*`` parameters go to redis-py).

Each stream entry carries one change as JSON text in its field ``change`` (see
:mod:`worker.sources.redis_enqueue` for the wire format). Entries are read with ``XREADGROUP``
and acknowledged with ``XACK`` (and deleted, unless ``delete_acked=0``) only once the engine
has applied or durably dead-lettered them.

Order. The stream is one partition served by one live consumer at a time. Entries that an
earlier consumer left pending (it crashed, or was killed) are older than anything not yet
delivered, so they are handed out first: on start and after every reconnection the source

1. claims (``XAUTOCLAIM``) what other consumers left pending once it has been idle for
   ``claim_idle_ms``, waiting up to that long for entries that are not idle enough yet,
2. re-reads its own pending entries in stream order (``XREADGROUP`` from ``0``), skipping those
   it already handed out in this run, and only then
3. reads new entries (``XREADGROUP >``), checking every ``claim_idle_ms`` for entries left
   pending by another consumer (which only happens if two ran at once: their order relative to
   what was already handed out cannot be kept, and a warning says so).

Delivery is at least once: a connection error while running is retried with backoff, the
pending list (which Redis keeps) is re-read, and nothing is acknowledged that was not done.
"""

from __future__ import annotations

import dataclasses
import os
import random
import socket
import time
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass
from typing import Any, cast
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import anyio
import structlog
from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.commands.core import AsyncScript
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from worker.config import ConfigError
from worker.core.backoff import Backoff
from worker.sources.base import Record, Source, SourceError

log = structlog.get_logger("worker.sources.redis")

DEFAULT_STREAM = "contacts:changes"
DEFAULT_GROUP = "contact-worker"
CHANGE_FIELD = b"change"
"""The entry field holding the change's JSON text."""

TRANSIENT_ERRORS: tuple[type[Exception], ...] = (RedisConnectionError, RedisTimeoutError, OSError)
"""Errors that mean "the server is unreachable for now" (includes LOADING after a restart)."""

RECONNECT_BACKOFF = Backoff(base_s=0.1, cap_s=5.0)
CLAIM_MARGIN_S = 0.1
"""Slack on top of ``claim_idle_ms`` so that entries idle since our start are surely claimable."""
MIN_CLAIM_INTERVAL_S = 0.1
_START = b"0-0"

_OWN_PARAMS = frozenset(
    {
        "stream",
        "group",
        "consumer",
        "block_ms",
        "count",
        "claim_idle_ms",
        "delete_acked",
        "dead_stream",
        "partitions",
        "db",
    }
)


@dataclass(frozen=True, slots=True)
class StreamAddress:
    """A parsed ``redis://`` URI: the server, and which stream, group and consumer."""

    url: str
    """The connection URL for redis-py (may carry a password: never log it, log ``display``)."""
    display: str
    """``HOST:PORT/DB`` without credentials, for messages."""
    stream: str = DEFAULT_STREAM
    group: str = DEFAULT_GROUP
    consumer: str | None = None
    block_ms: int = 5000
    count: int = 1000
    claim_idle_ms: int = 30_000
    delete_acked: bool = True
    dead_stream: str | None = None

    @property
    def dead_letter_stream(self) -> str:
        """Where dead letters go: ``dead_stream``, else ``<stream>:dead``."""
        return self.dead_stream or f"{self.stream}:dead"


def _int_param(params: dict[str, str], name: str, default: int, minimum: int) -> int:
    text = params.get(name)
    if text is None:
        return default
    try:
        value = int(text)
    except ValueError:
        raise ConfigError(f"redis URI: {name} must be an integer, got {text!r}") from None
    if value < minimum:
        raise ConfigError(f"redis URI: {name} must be at least {minimum}, got {value}")
    return value


def _bool_param(params: dict[str, str], name: str, default: bool) -> bool:
    text = params.get(name)
    if text is None:
        return default
    lowered = text.lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise ConfigError(f"redis URI: {name} must be 1 or 0, got {text!r}")


def parse_uri(uri: str) -> StreamAddress:
    """Split a ``redis://`` or ``rediss://`` URI into connection URL and stream settings."""
    parts = urlsplit(uri)
    if parts.scheme not in ("redis", "rediss"):
        raise ConfigError(f"not a redis URI: {uri.split('@')[-1]!r} (use redis://HOST:PORT/DB)")
    pairs = parse_qsl(parts.query, keep_blank_values=True)
    params: dict[str, str] = {}
    passthrough: list[tuple[str, str]] = []
    for name, value in pairs:
        if name.startswith("ssl_"):
            passthrough.append((name, value))
        elif name in _OWN_PARAMS:
            params[name] = value
        else:
            known = ", ".join(sorted(_OWN_PARAMS - {"db"}))
            raise ConfigError(f"redis URI: unknown parameter {name!r} (known: {known}, ssl_*)")
    if _int_param(params, "partitions", 1, 1) != 1:
        raise ConfigError("redis URI: partitions > 1 is not supported yet")
    db = params.get("db")
    if db is not None:
        passthrough.append(("db", db))
    for name in ("stream", "group", "consumer", "dead_stream"):
        if name in params and not params[name]:
            raise ConfigError(f"redis URI: {name} must not be empty")
    try:
        port = parts.port
    except ValueError:
        raise ConfigError(f"redis URI: bad port in {parts.netloc.split('@')[-1]!r}") from None
    host = parts.hostname or "localhost"
    path_db = parts.path.strip("/") or "0"
    display = f"{host}:{port or 6379}/{db if db is not None else path_db}"
    url = urlunsplit((parts.scheme, parts.netloc, parts.path, urlencode(passthrough), ""))
    return StreamAddress(
        url=url,
        display=display,
        stream=params.get("stream", DEFAULT_STREAM),
        group=params.get("group", DEFAULT_GROUP),
        consumer=params.get("consumer"),
        block_ms=_int_param(params, "block_ms", 5000, 1),
        count=_int_param(params, "count", 1000, 1),
        claim_idle_ms=_int_param(params, "claim_idle_ms", 30_000, 0),
        delete_acked=_bool_param(params, "delete_acked", True),
        dead_stream=params.get("dead_stream"),
    )


def connect(address: StreamAddress, *, read_timeout_s: float = 30.0) -> Redis:
    """A client that does not retry by itself: every connection error reaches the caller,
    which must know that a reply may have been lost (a ``XREADGROUP`` delivered but unread)."""
    return Redis.from_url(
        address.url,
        retry=Retry(NoBackoff(), 0),
        socket_timeout=read_timeout_s,
        socket_connect_timeout=5.0,
    )


async def ensure_group(client: Redis, stream: str, group: str) -> bool:
    """Create the consumer group (and the stream) if missing; True if it was created."""
    try:
        await client.xgroup_create(stream, group, id="0", mkstream=True)
    except ResponseError as exc:
        if str(exc).startswith("BUSYGROUP"):
            return False
        raise
    return True


def default_consumer() -> str:
    """``hostname-pid``: unique per process; set ``consumer=`` to a stable name per replica
    (e.g. the pod name) so that a restarted replica takes its own pending entries back at once."""
    return f"{socket.gethostname()}-{os.getpid()}"


Entry = tuple[bytes, dict[bytes, bytes]]
"""A stream entry as redis-py returns it: its ID and fields (empty if the entry was deleted)."""

_MISSING = -1
_DELETED = -2
Page = list[tuple[bytes, bytes | int]]
"""Entries as (ID, the change field's value, or _MISSING / _DELETED)."""

_READ_SCRIPT = """
-- XREADGROUP (never blocking inside a script), the reply flattened into three strings that
-- cost one parse each instead of five per entry: IDs, the change fields' sizes (-1 for an
-- entry without one, -2 for an entry deleted while pending), and the fields concatenated.
local reply = redis.call('XREADGROUP', 'GROUP', ARGV[1], ARGV[2], 'COUNT', ARGV[3],
                         'STREAMS', KEYS[1], ARGV[4])
if not reply then return false end
local entries = reply[1][2]
local ids, sizes, values, n = {}, {}, {}, 0
for i = 1, #entries do
  local entry = entries[i]
  local fields, size = entry[2], -2
  ids[i] = entry[1]
  if fields then
    size = -1
    for j = 1, #fields, 2 do
      if fields[j] == 'change' then
        local value = fields[j + 1]
        n = n + 1
        values[n] = value
        size = #value
        break
      end
    end
  end
  sizes[i] = size
end
return {table.concat(ids, ' '), table.concat(sizes, ' '), table.concat(values)}
"""

_ACK_SCRIPT = """
-- XACK (and XDEL if ARGV[2] is 1) the space-separated IDs of ARGV[3], atomically.
local ids = {}
for id in string.gmatch(ARGV[3], '%S+') do ids[#ids + 1] = id end
local acked = 0
for i = 1, #ids, 1000 do
  local last = math.min(i + 999, #ids)
  acked = acked + redis.call('XACK', KEYS[1], ARGV[1], unpack(ids, i, last))
  if ARGV[2] == '1' then redis.call('XDEL', KEYS[1], unpack(ids, i, last)) end
end
return acked
"""


def _framed(reply: object) -> Page:
    """The entries of a ``_READ_SCRIPT`` reply."""
    if not reply:
        return []
    id_text, size_text, body = cast(list[bytes], reply)
    if not id_text:
        return []
    page: Page = []
    append = page.append
    start = 0
    for entry_id, size in zip(id_text.split(b" "), map(int, size_text.split(b" ")), strict=True):
        if size >= 0:
            end = start + size
            append((entry_id, body[start:end]))
            start = end
        else:
            append((entry_id, size))
    return page


def _unframed(entries: list[Entry]) -> Page:
    """The entries of a plain XREADGROUP reply, in the script's shape."""
    return [
        (entry_id, fields.get(CHANGE_FIELD, _MISSING) if fields else _DELETED)
        for entry_id, fields in entries
    ]


def _entries(reply: object) -> list[Entry]:
    """The entries of a one-stream XREADGROUP reply (RESP2 shape: [[key, entries]])."""
    if not reply:
        return []
    return cast(list[Entry], cast(list[Any], reply)[0][1])


def _is_nogroup(exc: ResponseError) -> bool:
    return str(exc).startswith("NOGROUP")


class RedisStreamSource(Source):
    """Changes from a Redis stream through a consumer group; infinite (``read`` never ends)."""

    _read_script: AsyncScript
    _ack_script: AsyncScript

    def __init__(
        self,
        address: StreamAddress,
        *,
        consumer: str | None = None,
        clock: Callable[[], float] = time.monotonic,
        rand: Callable[[], float] = random.random,
    ) -> None:
        self.address = address
        self.stream = address.stream
        self.group = address.group
        self.consumer = consumer or address.consumer or default_consumer()
        self.count = address.count
        self.block_ms = address.block_ms
        self.claim_idle_ms = address.claim_idle_ms
        self.name = f"redis:{address.stream}"
        self._claim_interval_s = max(MIN_CLAIM_INTERVAL_S, address.claim_idle_ms / 1000)
        self._poll_s = min(1.0, max(0.02, address.claim_idle_ms / 10_000))
        self._clock = clock
        self._rand = rand
        self._client: Redis | None = None
        # Entries handed to the engine and not acked yet: a re-read of the pending list must
        # skip them, or an old change could overtake a newer one of the same contact.
        self._in_flight: set[bytes] = set()
        self._acked_while_scanning: set[bytes] = set()
        self._scan_from: bytes | None = None
        self._needs_recovery = True
        self._next_claim_at = 0.0
        self.entries_read = 0
        self.claimed = 0
        self.acked = 0
        self.reconnects = 0

    # -- lifecycle ---------------------------------------------------------------------------

    async def open(self) -> None:
        """Connect and create the consumer group if missing; fail with SourceError if unable."""
        client = connect(self.address, read_timeout_s=self.block_ms / 1000 + 10.0)
        try:
            await client.ping()
            if await ensure_group(client, self.stream, self.group):
                log.info("consumer group created", stream=self.stream, group=self.group)
        except (RedisError, OSError) as exc:
            await client.aclose()
            raise SourceError(self._explain(exc)) from exc
        self._client = client
        self._read_script = client.register_script(_READ_SCRIPT)
        self._ack_script = client.register_script(_ACK_SCRIPT)
        log.info(
            "redis source open",
            server=self.address.display,
            stream=self.stream,
            group=self.group,
            consumer=self.consumer,
        )

    def _explain(self, exc: BaseException) -> str:
        where = f"redis {self.address.display}"
        if isinstance(exc, ResponseError) and str(exc).startswith("WRONGTYPE"):
            return f"{where}: key {self.stream!r} exists and is not a stream"
        if isinstance(exc, RedisConnectionError | OSError | RedisTimeoutError):
            return f"cannot connect to {where}: {exc}"
        return f"{where}: {exc}"

    async def close(self) -> None:
        """Unregister this consumer if it holds nothing, then disconnect."""
        client, self._client = self._client, None
        if client is None:
            return
        try:
            # Atomic, so that no entry is delivered to the consumer between check and delete
            # (DELCONSUMER drops its pending entries, which would then never be read again).
            await client.eval(_DELETE_IDLE_CONSUMER, 1, self.stream, self.group, self.consumer)
        except (RedisError, OSError) as exc:
            log.info("consumer left registered", consumer=self.consumer, error=str(exc))
        finally:
            await client.aclose()
        log.info(
            "redis source closed",
            consumer=self.consumer,
            entries_read=self.entries_read,
            claimed=self.claimed,
            acked=self.acked,
            reconnects=self.reconnects,
            unacked=len(self._in_flight),
        )

    # -- reading -----------------------------------------------------------------------------

    async def read(self) -> Sequence[Record]:
        """The next entries in stream order, waiting for some; reconnects as long as it takes."""
        failures = 0
        while True:
            try:
                records = await self._read_step()
            except TRANSIENT_ERRORS as exc:
                failures += 1
                self._needs_recovery = True
                await self._back_off("read", failures, exc)
                continue
            except ResponseError as exc:
                if not _is_nogroup(exc):
                    raise SourceError(self._explain(exc)) from exc
                log.warning(
                    "consumer group missing (deleted, or Redis restarted without persistence):"
                    " recreating it",
                    stream=self.stream,
                    group=self.group,
                )
                self._needs_recovery = True
                await anyio.sleep(RECONNECT_BACKOFF.base_s)
                continue
            if failures:
                log.info("redis reachable again", server=self.address.display, failures=failures)
                failures = 0
            if records:
                self.entries_read += len(records)
                return records

    async def _read_step(self) -> list[Record]:
        """One round trip's worth of reading; may return nothing."""
        client = self._require_client()
        if self._needs_recovery:
            await self._recover(client)
            return []
        if self._scan_from is not None:
            return await self._scan_page(client)
        now = self._clock()
        if now >= self._next_claim_at:
            self._next_claim_at = now + self._claim_interval_s
            if await self._others_pending(client) and await self._claim(client):
                log.warning(
                    "claimed entries another consumer left pending while this one was running:"
                    " their order against entries already read is not guaranteed; run one"
                    " consumer per stream",
                    stream=self.stream,
                    consumer=self.consumer,
                )
                self._scan_from = _START
            return []
        # A backlog is read through the script, whose reply is cheap to parse; only when there
        # is none does a plain XREADGROUP wait for the next entries.
        page = await self._read_page(client, b">")
        if not page:
            block_ms = max(1, min(self.block_ms, int((self._next_claim_at - now) * 1000)))
            reply = await client.xreadgroup(
                self.group, self.consumer, {self.stream: ">"}, count=self.count, block=block_ms
            )
            page = _unframed(_entries(reply))
        return await self._records(page, skip_in_flight=False)

    async def _recover(self, client: Redis) -> None:
        """Take over what dead consumers left pending, then plan a re-read of our own."""
        if await ensure_group(client, self.stream, self.group):
            log.info("consumer group created", stream=self.stream, group=self.group)
        deadline = self._clock() + self.claim_idle_ms / 1000 + CLAIM_MARGIN_S
        announced = False
        while True:
            others = await self._others_pending(client)
            if others:
                await self._claim(client)
                others = await self._others_pending(client)
            if not others:
                break
            now = self._clock()
            if now >= deadline:
                log.warning(
                    "entries stay pending at other consumers (still running?): reading on;"
                    " per-contact order against them is not guaranteed",
                    consumers=others,
                )
                break
            if not announced:
                announced = True
                log.info(
                    "waiting for entries left pending by other consumers to become claimable",
                    consumers=others,
                    claim_idle_ms=self.claim_idle_ms,
                )
            await anyio.sleep(min(self._poll_s, deadline - now))
        self._scan_from = _START
        self._acked_while_scanning.clear()
        self._next_claim_at = self._clock() + self._claim_interval_s
        self._needs_recovery = False

    async def _others_pending(self, client: Redis) -> dict[str, int]:
        """Pending counts of the group's other consumers (one cheap XPENDING summary)."""
        summary = await client.xpending(self.stream, self.group)
        mine = self.consumer.encode()
        return {
            c["name"].decode(errors="replace"): int(c["pending"])
            for c in summary.get("consumers") or ()
            if c["name"] != mine and int(c["pending"]) > 0
        }

    async def _claim(self, client: Redis) -> int:
        """XAUTOCLAIM every entry idle for claim_idle_ms; the number that were not ours."""
        cursor: bytes = _START
        taken = 0
        while True:
            reply = await client.xautoclaim(
                self.stream,
                self.group,
                self.consumer,
                self.claim_idle_ms,
                cursor,
                count=self.count,
            )
            cursor = reply[0]
            taken += sum(1 for entry_id, _ in reply[1] if entry_id not in self._in_flight)
            if cursor == _START:
                break
        if taken:
            self.claimed += taken
            log.info("claimed pending entries", count=taken, consumer=self.consumer)
        return taken

    async def _scan_page(self, client: Redis) -> list[Record]:
        """The next page of our own pending list (in stream order) not handed out yet."""
        start = self._scan_from
        assert start is not None
        page = await self._read_page(client, start)
        if not page:
            self._scan_from = None
            self._acked_while_scanning.clear()
            return []
        self._scan_from = page[-1][0]
        return await self._records(page, skip_in_flight=True)

    async def _read_page(self, client: Redis, start: bytes) -> Page:
        """XREADGROUP without blocking, through the script: new entries (``>``) or our own
        pending ones after ``start``."""
        reply = await self._read_script(
            keys=[self.stream], args=[self.group, self.consumer, self.count, start], client=client
        )
        return _framed(reply)

    async def _records(self, page: Page, *, skip_in_flight: bool) -> list[Record]:
        in_flight = self._in_flight
        acked = self._acked_while_scanning
        records: list[Record] = []
        append = records.append
        vanished: list[bytes] = []
        for entry_id, value in page:
            if skip_in_flight and (entry_id in in_flight or entry_id in acked):
                continue
            if type(value) is int:
                if value == _DELETED:  # XDEL or trimming while pending: nothing left to do
                    vanished.append(entry_id)
                    continue
                # b"" fails decoding, so the engine dead-letters the entry `invalid` and acks it.
                log.warning("entry without a change field", entry=entry_id.decode())
                value = b""
            in_flight.add(entry_id)
            append((entry_id, value))  # type: ignore[arg-type]
        if vanished:
            log.warning(
                "pending entries were deleted from the stream before being processed",
                count=len(vanished),
                first=vanished[0].decode(),
            )
            await self._xack(self._require_client(), vanished)
        return records

    # -- acknowledging -----------------------------------------------------------------------

    async def ack(self, tokens: Sequence[Hashable]) -> None:
        """XACK (and XDEL) these entries in one round trip, retrying until Redis takes it."""
        ids: list[bytes] = list(tokens)  # type: ignore[arg-type]
        if not ids:
            return
        failures = 0
        while True:
            try:
                await self._xack(self._require_client(), ids)
                break
            except TRANSIENT_ERRORS as exc:
                failures += 1
                await self._back_off("ack", failures, exc)
            except ResponseError as exc:
                if not _is_nogroup(exc):
                    raise SourceError(self._explain(exc)) from exc
                break  # the group, and its pending list, are gone: nothing left to ack
        if self._scan_from is not None:
            self._acked_while_scanning.update(ids)
        in_flight = self._in_flight
        for entry_id in ids:
            in_flight.discard(entry_id)
        self.acked += len(ids)

    async def _xack(self, client: Redis, ids: list[bytes]) -> None:
        # One argument, not one per ID: encoding thousands of arguments costs more CPU in
        # redis-py than the rest of the acknowledgement.
        await self._ack_script(
            keys=[self.stream],
            args=[self.group, int(self.address.delete_acked), b" ".join(ids)],
            client=client,
        )

    # -- helpers -----------------------------------------------------------------------------

    async def _back_off(self, what: str, failures: int, exc: Exception) -> None:
        delay = RECONNECT_BACKOFF.delay(failures, self._rand())
        if failures == 1:
            self.reconnects += 1
        log.warning(
            "redis unavailable, retrying",
            during=what,
            server=self.address.display,
            attempt=failures,
            retry_in_s=round(delay, 3),
            error=str(exc) or type(exc).__name__,
        )
        client = self._client
        if client is not None:
            # Idle pooled connections are dead too after a restart: drop them all at once.
            await client.connection_pool.disconnect(inuse_connections=False)
        await anyio.sleep(delay)

    def _require_client(self) -> Redis:
        if self._client is None:
            raise SourceError(f"{self.name}: not open")
        return self._client

    def describe(self, tokens: Sequence[Hashable]) -> str:
        """``redis:STREAM/ENTRY-ID``, several entry IDs joined by commas."""
        return f"{self.name}/" + ",".join(
            t.decode() if isinstance(t, bytes) else str(t) for t in tokens
        )

    def pending_in_run(self) -> int:
        """Entries handed out and not acknowledged yet."""
        return len(self._in_flight)


_DELETE_IDLE_CONSUMER = """
local ok, pending = pcall(redis.call, 'XPENDING', KEYS[1], ARGV[1], '-', '+', 1, ARGV[2])
if not ok then return -1 end
if #pending > 0 then return -1 end
return redis.call('XGROUP', 'DELCONSUMER', KEYS[1], ARGV[1], ARGV[2])
"""


def from_uri(
    uri: str,
    *,
    consumer: str | None = None,
    claim_idle_ms: int | None = None,
    block_ms: int | None = None,
    count: int | None = None,
) -> RedisStreamSource:
    """The source a ``redis://`` URI names (not opened yet); ConfigError if the URI is bad.

    Keyword arguments, when given, win over the URI's parameters of the same name.
    """
    address = parse_uri(uri)
    for name, value, minimum in (
        ("claim_idle_ms", claim_idle_ms, 0),
        ("block_ms", block_ms, 1),
        ("count", count, 1),
    ):
        if value is not None and value < minimum:
            raise ConfigError(f"redis source: {name} must be at least {minimum}, got {value}")
    address = dataclasses.replace(
        address,
        claim_idle_ms=address.claim_idle_ms if claim_idle_ms is None else claim_idle_ms,
        block_ms=address.block_ms if block_ms is None else block_ms,
        count=address.count if count is None else count,
    )
    return RedisStreamSource(address, consumer=consumer)
