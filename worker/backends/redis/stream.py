"""The ``redis://`` source: one Redis stream read through a consumer group.

URI: ``redis://[USER:PASSWORD@]HOST:PORT/DB?stream=..&group=..&consumer=..&block_ms=..&count=..
&claim_idle_ms=..&delete_acked=..&partitions=..&lease_ms=..`` (``rediss://`` for TLS; ``ssl_*``
parameters go to redis-py).

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

The pending entries of steps 1 and 2 at the start may have been sent before a crash: they are a
replay range (DESIGN 9), read in full before any of them is sent; so are, in a partitioned
stream, the pending entries of a partition this replica takes.

Delivery is at least once: a connection error while running is retried with backoff, the
pending list (which Redis keeps) is re-read, and nothing is acknowledged that was not done.

Partitioned (``partitions=P``, P > 1; ``lease_ms``, default 10000): the streams
``<stream>:0`` .. ``<stream>:<P-1>`` (a change's partition is
:func:`worker.core.partition.partition_of` of its ID), each read by one replica at a time under
a lease key ``<stream>:<p>:lease``; see :class:`PartitionedRedisSource`. P = 1 is the single
stream above, unchanged.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import random
import socket
import time
import zlib
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass
from itertools import repeat
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
from worker.core.partition import partition_mismatch, partition_of
from worker.sources.base import (
    Outages,
    Record,
    ReplayRanges,
    Source,
    SourceError,
    SourceStatistics,
)

log = structlog.get_logger("worker.sources.redis")

DEFAULT_STREAM = "contacts:changes"
DEFAULT_GROUP = "contact-worker"
CHANGE_FIELD = b"change"
"""The entry field holding the change's JSON text."""

TRANSIENT_ERRORS: tuple[type[Exception], ...] = (RedisConnectionError, RedisTimeoutError, OSError)
"""Errors that mean "the server is unreachable for now" (includes LOADING after a restart)."""

RECONNECT_BACKOFF = Backoff(base_s=0.1, cap_s=5.0)
READ_SLICE = 1024
"""Records handed out per ``read`` of a partitioned source (the engine's slice)."""
READ_LINGER_S = 0.02
"""After a read that returned only a few entries (the input is fed as it goes), wait this long
before the next: entries then come a page at a time instead of one round trip each, for a few
milliseconds of latency (20 ms at most; the engine's --linger-ms is 200 by default)."""
SMALL_READ = 256
"""Fewer entries than this in a read make the next one wait READ_LINGER_S."""
CLAIM_MARGIN_S = 0.1
"""Slack on top of ``claim_idle_ms`` so that entries idle since our start are surely claimable."""
MIN_CLAIM_INTERVAL_S = 0.1
AHEAD_RELEASE_WAIT_S = 5.0
"""How long close() waits for a read ahead still on its way, to release what it brought."""
RELEASED_IDLE_MS = 2**31 - 1
"""The idle time given to entries let go at close: claimable by the next consumer at once."""
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
        "lease_ms",
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
    partitions: int = 1
    """Partition streams ``<stream>:0`` .. ``<stream>:<partitions-1>`` when above 1."""
    lease_ms: int = 10_000
    """How long a partition lease lives without renewal (partitioned streams only)."""

    def partition_stream(self, partition: int) -> str:
        """The key of one partition's stream (the plain stream when not partitioned)."""
        return self.stream if self.partitions == 1 else f"{self.stream}:{partition}"

    @property
    def partition_streams(self) -> list[str]:
        """Every stream this address reads or writes changes to."""
        return [self.partition_stream(p) for p in range(self.partitions)]

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
        partitions=_int_param(params, "partitions", 1, 1),
        lease_ms=_int_param(params, "lease_ms", 10_000, 100),
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


class Page:
    """Entries of one stream, in stream order, as two parallel lists; its length is theirs."""

    __slots__ = ("ids", "values", "plain")

    def __init__(self, ids: list[bytes], values: list[bytes | int], plain: bool) -> None:
        self.ids = ids
        self.values = values
        """Each entry's change field, or _MISSING (none) / _DELETED (deleted while pending)."""
        self.plain = plain
        """Every value is a change field (no _MISSING nor _DELETED): the bulk path applies."""

    def __len__(self) -> int:
        return len(self.ids)

    def __repr__(self) -> str:
        return f"Page({self.ids!r}, {self.values!r}, {self.plain!r})"

    @property
    def last_id(self) -> bytes:
        return self.ids[-1]


_EMPTY = Page([], [], True)

_READ_SCRIPT = r"""
-- XREADGROUP over the streams KEYS[1..n] from the IDs ARGV[4..3+n] (never blocking inside a
-- script), the reply flattened into strings that cost one parse each instead of five per
-- entry: IDs, the change fields' sizes (-1 for an entry without one, -2 for an entry deleted
-- while pending; empty when every entry has a change without a newline, then joined by
-- newlines), the fields concatenated, and per stream that has entries its 0-based position in
-- KEYS and its number of entries (in reply order).
local n = #KEYS
local args = {'GROUP', ARGV[1], ARGV[2], 'COUNT', ARGV[3], 'STREAMS'}
for i = 1, n do args[6 + i] = KEYS[i] end
for i = 1, n do args[6 + n + i] = ARGV[3 + i] end
local reply = redis.call('XREADGROUP', unpack(args))
if not reply then return false end
local position = {}
for i = 1, n do position[KEYS[i]] = i - 1 end
local ids, sizes, values, streams, m, v = {}, {}, {}, {}, 0, 0
local plain = true
for s = 1, #reply do
  local entries = reply[s][2]
  if #entries > 0 then
    streams[#streams + 1] = position[reply[s][1]] .. ' ' .. #entries
  end
  for i = 1, #entries do
    local entry = entries[i]
    local fields, size = entry[2], -2
    m = m + 1
    ids[m] = entry[1]
    if fields then
      size = -1
      for j = 1, #fields, 2 do
        if fields[j] == 'change' then
          local value = fields[j + 1]
          v = v + 1
          values[v] = value
          size = #value
          if plain and string.find(value, '\n', 1, true) then plain = false end
          break
        end
      end
    end
    if size < 0 then plain = false end
    sizes[m] = size
  end
end
if plain and m > 0 then
  -- Every entry has a change without a newline (as enqueue writes them): the values joined by
  -- newlines, split in one call by the reader; the sizes are left out.
  return {table.concat(ids, ' '), '', table.concat(values, '\n'), table.concat(streams, ' ')}
end
return {table.concat(ids, ' '), table.concat(sizes, ' '), table.concat(values),
        table.concat(streams, ' ')}
"""

_ACK_SCRIPT = """
-- For each stream KEYS[k]: XACK (and XDEL if ARGV[2] is 1) the space-separated IDs of
-- ARGV[2 + k], atomically.
local acked = 0
for k = 1, #KEYS do
  local ids = {}
  for id in string.gmatch(ARGV[2 + k], '%S+') do ids[#ids + 1] = id end
  for i = 1, #ids, 1000 do
    local last = math.min(i + 999, #ids)
    acked = acked + redis.call('XACK', KEYS[k], ARGV[1], unpack(ids, i, last))
    if ARGV[2] == '1' then redis.call('XDEL', KEYS[k], unpack(ids, i, last)) end
  end
end
return acked
"""


def _framed_pages(reply: object) -> list[tuple[int, Page]]:
    """The entries of a ``_READ_SCRIPT`` reply, per stream read: (its position among the
    script's keys, its entries), in reply order; streams without entries are left out."""
    if not reply:
        return []
    id_text, size_text, body, stream_text = cast(list[bytes], reply)
    if not id_text:
        return []
    ids = id_text.split(b" ")
    values: list[bytes | int]
    if not size_text:  # every entry has a change, none with a newline
        values = body.split(b"\n")  # type: ignore[assignment]
        plain = True
    else:
        values = []
        append = values.append
        start = 0
        for size in map(int, size_text.split(b" ")):
            if size >= 0:
                end = start + size
                append(body[start:end])
                start = end
            else:
                append(size)
        plain = _MISSING not in values and _DELETED not in values
    if len(values) != len(ids):
        raise ValueError(f"malformed read reply: {len(ids)} IDs, {len(values)} values")
    counts = list(map(int, stream_text.split(b" ")))
    if len(counts) == 2:
        return [(counts[0], Page(ids, values, plain))]
    pages: list[tuple[int, Page]] = []
    first = 0
    for i in range(0, len(counts), 2):
        last = first + counts[i + 1]
        part = values[first:last]
        pages.append(
            (counts[i], Page(ids[first:last], part, plain or all(type(v) is bytes for v in part)))
        )
        first = last
    return pages


def _framed(reply: object) -> Page:
    """The entries of a one-stream ``_READ_SCRIPT`` reply."""
    pages = _framed_pages(reply)
    return pages[0][1] if pages else _EMPTY


def _unframed(entries: list[Entry]) -> Page:
    """The entries of a plain XREADGROUP reply, in the script's shape."""
    values: list[bytes | int] = [
        fields.get(CHANGE_FIELD, _MISSING) if fields else _DELETED for _, fields in entries
    ]
    return Page(
        [entry_id for entry_id, _ in entries],
        values,
        _MISSING not in values and _DELETED not in values,
    )


def _entries(reply: object) -> list[Entry]:
    """The entries of a one-stream XREADGROUP reply (RESP2 shape: [[key, entries]])."""
    if not reply:
        return []
    return cast(list[Entry], cast(list[Any], reply)[0][1])


def _is_nogroup(exc: ResponseError) -> bool:
    """The group, or its whole stream, is gone: NOGROUP, or UNBLOCKED (Redis 7 ends a blocked
    XREADGROUP that way when the key or the group is deleted under it)."""
    return str(exc).startswith(("NOGROUP", "UNBLOCKED"))


class _RedisClient:
    """What both Redis sources share: the client, and waiting out a server that is away."""

    name: str
    address: StreamAddress
    reconnects: int
    outages: Outages
    _client: Redis | None
    _rand: Callable[[], float]

    async def _back_off(self, what: str, failures: int, exc: Exception) -> None:
        delay = RECONNECT_BACKOFF.delay(failures, self._rand())
        if failures == 1:
            self.reconnects += 1
        self.outages.failed(what, str(exc) or type(exc).__name__)
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

    def _init_client(
        self,
        address: StreamAddress,
        consumer: str | None,
        clock: Callable[[], float],
        rand: Callable[[], float],
    ) -> None:
        """The state both sources start with."""
        self.address = address
        self.group = address.group
        self.consumer = consumer or address.consumer or default_consumer()
        self.count = address.count
        self.name = f"redis:{address.stream}"
        self._clock = clock
        self._rand = rand
        self._client = None
        self._small_read = False
        """The last read brought fewer than SMALL_READ entries: the next waits READ_LINGER_S."""
        self.entries_read = 0
        self.claimed = 0
        self.acked = 0
        self.reconnects = 0
        self.outages = Outages()
        """The operations failing now (for ``statistics``)."""

    def _require_client(self) -> Redis:
        if self._client is None:
            raise SourceError(f"{self.name}: not open")
        return self._client


class RedisStreamSource(_RedisClient, Source):
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
        self._init_client(address, consumer, clock, rand)
        self.stream = address.stream
        self.block_ms = address.block_ms
        self.claim_idle_ms = address.claim_idle_ms
        self._claim_interval_s = max(MIN_CLAIM_INTERVAL_S, address.claim_idle_ms / 1000)
        self._poll_s = min(1.0, max(0.02, address.claim_idle_ms / 10_000))
        # Entries handed to the engine and not acked yet: a re-read of the pending list must
        # skip them, or an old change could overtake a newer one of the same contact.
        self._in_flight: set[bytes] = set()
        self._acked_while_scanning: set[bytes] = set()
        self._scan_from: bytes | None = None
        self._needs_recovery = True
        self._next_claim_at = 0.0
        self._ahead: asyncio.Task[list[Record]] | None = None
        self._ranges = ReplayRanges(self)
        """The pending entries re-read at the start: one replay range, over every ID."""

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
        self._ranges.begin(self.name)
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
        """Let go of a page read ahead and not handed out, unregister this consumer if it holds
        nothing, then disconnect."""
        client = self._client
        if client is None:
            return
        await self._release_ahead(client)
        self._client = None
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

    async def _release_ahead(self, client: Redis) -> None:
        """A page read ahead and never handed out is pending at this consumer: mark it idle for
        long, so that the next consumer claims it at once instead of after claim_idle_ms."""
        ahead, self._ahead = self._ahead, None
        if ahead is None:
            return
        with anyio.move_on_after(AHEAD_RELEASE_WAIT_S):
            await asyncio.wait([ahead])
        if not ahead.done():
            ahead.cancel()
            return
        if ahead.cancelled() or ahead.exception() is not None:
            return
        ids: list[Any] = [token for token, _ in ahead.result()]
        if not ids:
            return
        self._in_flight.difference_update(ids)
        try:
            await client.xclaim(
                self.stream, self.group, self.consumer, 0, ids, idle=RELEASED_IDLE_MS, justid=True
            )
        except (RedisError, OSError) as exc:
            log.info(
                "entries read ahead left pending: claimable after claim_idle_ms",
                count=len(ids),
                error=str(exc),
            )
            return
        log.info("entries read ahead released", count=len(ids), consumer=self.consumer)

    # -- reading -----------------------------------------------------------------------------

    async def read(self) -> Sequence[Record]:
        """The next entries in stream order, waiting for some; reconnects as long as it takes.

        After a full page, the next page is read ahead while the engine takes this one in (one
        round trip less to wait for in a backlog); it is handed out by the next call, or made
        claimable at once by :meth:`close` if none comes.
        """
        self._ranges.sync()
        records = await self._take_ahead()
        if not records:
            records = await self._read_next()
        if (
            len(records) >= self.count
            and not self._needs_recovery
            and self._scan_from is None
            and self._clock() < self._next_claim_at
        ):
            self._ahead = asyncio.get_running_loop().create_task(self._read_ahead())
        return records

    async def _read_ahead(self) -> list[Record]:
        """One read of new entries through the script (it never blocks)."""
        page = await self._read_page(self._require_client(), b">")
        return await self._records(page, skip_in_flight=False)

    async def _take_ahead(self) -> list[Record]:
        """The page read ahead, if any; nothing if it failed (the next read recovers: entries
        may have been delivered with the answer lost)."""
        ahead = self._ahead
        if ahead is None:
            return []
        try:
            # Shielded, and still in _ahead while awaited: a reader stopped meanwhile leaves
            # the page to close(), which releases it.
            records = await asyncio.shield(ahead)
        except (RedisError, OSError) as exc:
            self._ahead = None
            log.info("read ahead failed: reading again", error=str(exc))
            self._needs_recovery = True
            return []
        self._ahead = None
        if records:
            self.entries_read += len(records)
        return records

    async def _read_next(self) -> list[Record]:
        failures = 0
        if self._small_read:
            await anyio.sleep(READ_LINGER_S)
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
            self.outages.recovered("read")
            if failures:
                log.info("redis reachable again", server=self.address.display, failures=failures)
                failures = 0
            if records:
                self.entries_read += len(records)
                self._small_read = len(records) < SMALL_READ
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
            # Every pending entry went out with earlier reads: the replay range was read.
            self._ranges.end(self.name)
            return []
        self._scan_from = page.last_id
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
        if page.plain and not skip_in_flight:
            # The usual page: new entries, each with its change. In bulk, no branches.
            in_flight.update(page.ids)
            return list(zip(page.ids, page.values, strict=True))  # type: ignore[arg-type]
        acked = self._acked_while_scanning
        records: list[Record] = []
        append = records.append
        vanished: list[bytes] = []
        for entry_id, value in zip(page.ids, page.values, strict=True):
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
        """XACK (and XDEL) these entries in one round trip, retrying until Redis takes it (the
        engine acknowledges everything settled since its last call at once)."""
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
        self.outages.recovered("ack")
        if self._scan_from is not None:
            self._acked_while_scanning.update(ids)
        self._in_flight.difference_update(ids)
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

    def describe(self, tokens: Sequence[Hashable]) -> str:
        """``redis:STREAM/ENTRY-ID``, several entry IDs joined by commas."""
        return f"{self.name}/" + ",".join(
            t.decode() if isinstance(t, bytes) else str(t) for t in tokens
        )

    def pending_in_run(self) -> int:
        """Entries handed out and not acknowledged yet."""
        return len(self._in_flight)

    def statistics(self) -> SourceStatistics:
        """Reachable or not (and why), reconnects, entries handed out and not acked."""
        problem = self.outages.problem
        return SourceStatistics(
            available=not problem,
            problem=f"redis {self.address.display}: {problem}" if problem else "",
            reconnects=self.reconnects,
            unacked=len(self._in_flight),
        )


_DELETE_IDLE_CONSUMER = """
local ok, pending = pcall(redis.call, 'XPENDING', KEYS[1], ARGV[1], '-', '+', 1, ARGV[2])
if not ok then return -1 end
if #pending > 0 then return -1 end
return redis.call('XGROUP', 'DELCONSUMER', KEYS[1], ARGV[1], ARGV[2])
"""


# -- partitioned streams -----------------------------------------------------------------------

_RENEW_LEASE = """
-- Compare-and-pexpire: extend the lease only if this consumer still holds it.
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
"""

_RELEASE_LEASE = """
-- Compare-and-delete: drop the lease only if this consumer still holds it.
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"""

_HEARTBEAT = """
-- Register this consumer as live until now + lease_ms (server time), forget the expired ones,
-- and answer how many are live.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[2]) * 10)
return redis.call('ZCARD', KEYS[1])
"""

PartitionToken = tuple[int, bytes]
"""A partitioned record's token: its partition and its entry ID."""


@dataclass(slots=True)
class _Held:
    """A partition this consumer holds the lease of."""

    claimed: bool = False
    """Entries pending at other consumers were taken over (done first, once per holding)."""
    scan_from: bytes | None = _START
    """Where the re-read of this consumer's own pending entries stands; None once done."""
    replaying: bool = True
    """Its pending entries (claimed and own) are a replay range not read to the end yet."""


class PartitionedRedisSource(_RedisClient, Source):
    """Changes from ``partitions`` streams ``<stream>:<p>``, each served by one replica at a time.

    A replica reads a partition only while it holds its lease, the key ``<stream>:<p>:lease``
    (value: the consumer name), taken with ``SET NX PX lease_ms`` and renewed every
    ``lease_ms / 3`` with a compare-and-pexpire script. Live replicas register in the sorted set
    ``<stream>:members`` (score: expiry, server time); each takes free partitions up to its fair
    share ``ceil(partitions / live)`` and gives back the ones above it once the requests it has
    in flight for them are done, so the load spreads when a replica joins. A lease that cannot
    be renewed (expired, taken over) stops the reading of its partition at once, and the
    engine forgets the changes of that partition that wait (``revoke``), unacknowledged.

    On taking a partition, the entries other consumers left pending are claimed first
    (``XAUTOCLAIM``, idle 0: the lease says their consumer is gone), then this consumer's own
    pending entries are re-read in stream order, and only then new ones: per contact the order
    holds across the move. Tokens are ``(partition, entry ID)``.

    A change whose ID belongs to another partition than its stream's is dead-lettered
    ``invalid`` (:meth:`misfiled`): the replica holding the right one may send the contact's
    other changes meanwhile.
    """

    files_by_key = True  # the stream a change was appended to is its partition

    def __init__(
        self,
        address: StreamAddress,
        *,
        consumer: str | None = None,
        clock: Callable[[], float] = time.monotonic,
        rand: Callable[[], float] = random.random,
    ) -> None:
        self._init_client(address, consumer, clock, rand)
        self.partitions = address.partitions
        self.streams = address.partition_streams
        self.lease_ms = address.lease_ms
        self.members_key = f"{address.stream}:members"
        self._block_ms = max(1, min(address.block_ms, address.lease_ms // 3))
        self._keeper: asyncio.Task[None] | None = None
        self._held: dict[int, _Held] = {}
        self._valid_until: dict[int, float] = {}
        """Per held partition: until when (local clock) the lease surely still is ours."""
        self._releasing: dict[int, int] = {}
        """Partitions given back: requests still in flight for them (released at 0)."""
        self._handed: dict[int, set[bytes]] = {p: set() for p in range(self.partitions)}
        """Per partition: entries handed to the engine and not acknowledged yet."""
        self._buffer: list[Record] = []
        self._full_read = False
        """The last read brought at least ``count`` records: a backlog, worth reading ahead."""
        """Records read but not handed out yet (at most one engine slice goes out at a time)."""
        self._revoke_again: set[int] = set()
        """Partitions whose changes must be revoked once more on the next ``read``: records the
        engine was still slicing when the first revoke came were taken in after it."""
        self._last_slice: set[int] = set()
        """Partitions of the records the last ``read`` returned: the engine may still be
        taking them in (it waits for room between slices)."""
        self._wake = asyncio.Event()
        self._ahead: asyncio.Task[None] | None = None
        """The next read, started when the last slice of a full read was handed out."""
        self._reading: set[int] = set()
        """Partitions named in the XREADGROUP in progress: not released before it returns."""
        self._next_check_at = 0.0
        self._ranges = ReplayRanges(self)
        """Per partition taken, its pending entries: a replay range over its IDs."""
        self._scanned: set[PartitionToken] = set()
        """Records of re-read pending entries in the buffer, not handed out yet."""
        self.live = 1
        self.lost = 0
        self.given_back = 0

    # -- lifecycle ---------------------------------------------------------------------------

    async def open(self) -> None:
        """Connect, create the groups, take a first share of partitions, start the keeper."""
        client = connect(self.address, read_timeout_s=self._block_ms / 1000 + 10.0)
        try:
            await client.ping()
            for stream in self.streams:
                if await ensure_group(client, stream, self.group):
                    log.info("consumer group created", stream=stream, group=self.group)
        except (RedisError, OSError) as exc:
            await client.aclose()
            raise SourceError(self._explain(exc)) from exc
        self._client = client
        self._renew_script = client.register_script(_RENEW_LEASE)
        self._release_script = client.register_script(_RELEASE_LEASE)
        self._heartbeat_script = client.register_script(_HEARTBEAT)
        self._ack_script = client.register_script(_ACK_SCRIPT)
        self._read_script = client.register_script(_READ_SCRIPT)
        try:
            await self._keep(client)
        except (RedisError, OSError) as exc:
            await client.aclose()
            self._client = None
            raise SourceError(self._explain(exc)) from exc
        self._keeper = asyncio.get_running_loop().create_task(self._keep_loop())
        log.info(
            "redis partitioned source open",
            server=self.address.display,
            stream=self.address.stream,
            partitions=self.partitions,
            group=self.group,
            consumer=self.consumer,
            held=sorted(self._held),
        )

    def _explain(self, exc: BaseException) -> str:
        where = f"redis {self.address.display}"
        if isinstance(exc, ResponseError) and str(exc).startswith("WRONGTYPE"):
            return f"{where}: a key of {self.address.stream!r} has the wrong type: {exc}"
        if isinstance(exc, RedisConnectionError | OSError | RedisTimeoutError):
            return f"cannot connect to {where}: {exc}"
        return f"{where}: {exc}"

    async def close(self) -> None:
        """Stop the keeper, release every lease, leave the member set, disconnect. What a read
        ahead brought and was never handed out is pending here: whoever takes the partition
        next claims it at once."""
        for task in (self._keeper, self._ahead):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
        self._keeper = self._ahead = None
        client, self._client = self._client, None
        if client is None:
            return
        try:
            for p in sorted(set(self._held) | set(self._releasing)):
                await self._release_script(
                    keys=[self._lease_key(p)], args=[self.consumer], client=client
                )
            await client.zrem(self.members_key, self.consumer)
            for stream in self.streams:
                await client.eval(_DELETE_IDLE_CONSUMER, 1, stream, self.group, self.consumer)
        except (RedisError, OSError) as exc:
            log.info("leases left to expire", consumer=self.consumer, error=str(exc))
        finally:
            await client.aclose()
        self._held.clear()
        self._releasing.clear()
        log.info(
            "redis source closed",
            consumer=self.consumer,
            entries_read=self.entries_read,
            claimed=self.claimed,
            acked=self.acked,
            lost=self.lost,
            given_back=self.given_back,
            reconnects=self.reconnects,
            unacked=sum(len(h) for h in self._handed.values()),
        )

    # -- leases ------------------------------------------------------------------------------

    def _lease_key(self, partition: int) -> str:
        return f"{self.address.partition_stream(partition)}:lease"

    @property
    def held(self) -> list[int]:
        """The partitions this consumer reads now."""
        return sorted(self._held)

    async def _keep_loop(self) -> None:
        interval = self.lease_ms / 3000
        failures = 0
        while True:
            await anyio.sleep(interval if not failures else min(interval, 0.2))
            client = self._client
            if client is None:
                return
            try:
                await self._keep(client)
                failures = 0
                self.outages.recovered("leases")
            except (RedisError, OSError) as exc:
                failures += 1
                if failures == 1:
                    self.reconnects += 1
                self.outages.failed("leases", str(exc) or type(exc).__name__)
                log.warning(
                    "redis unavailable for leases, retrying",
                    server=self.address.display,
                    attempt=failures,
                    error=str(exc) or type(exc).__name__,
                )
                with contextlib.suppress(RedisError, OSError):
                    await client.connection_pool.disconnect(inuse_connections=False)
            self._expire()

    def _expire(self) -> None:
        """Whatever happened, a lease not renewed in time is gone."""
        now = self._clock()
        for p in [p for p, until in self._valid_until.items() if now >= until]:
            self._lose(p, "lease expired before it could be renewed")

    async def _keep(self, client: Redis) -> None:
        """One round: heartbeat, renew, release what was given back, rebalance."""
        lease_ms = self.lease_ms
        self.live = int(
            await self._heartbeat_script(
                keys=[self.members_key], args=[self.consumer, lease_ms], client=client
            )
        )
        for p in sorted(set(self._held) | set(self._releasing)):
            started = self._clock()
            renewed = await self._renew_script(
                keys=[self._lease_key(p)], args=[self.consumer, lease_ms], client=client
            )
            if not renewed:
                if p in self._held:
                    self._lose(p, "lease lost (expired or taken over)")
                else:
                    self._releasing.pop(p, None)
                    self._valid_until.pop(p, None)
                continue
            self._valid_until[p] = started + lease_ms / 1000
        for p, outstanding in list(self._releasing.items()):
            if outstanding <= 0 and p not in self._revoke_again and p not in self._reading:
                await self._release_script(
                    keys=[self._lease_key(p)], args=[self.consumer], client=client
                )
                del self._releasing[p]
                self._valid_until.pop(p, None)
                self._handed[p].clear()
                log.info("partition given back", partition=p, consumer=self.consumer)
        share = -(-self.partitions // max(1, self.live))
        mine = len(self._held) + len(self._releasing)
        if len(self._held) > share:
            # Partitions being given back already count as gone.
            for p in sorted(self._held, reverse=True)[: len(self._held) - share]:
                self._give_back(p)
        elif mine < share:
            # Start at a place of our own so that replicas do not all race for partition 0.
            offset = zlib.crc32(self.consumer.encode()) % self.partitions
            for i in range(self.partitions):
                if mine >= share:
                    break
                p = (offset + i) % self.partitions
                if p in self._held or p in self._releasing:
                    continue
                started = self._clock()
                if await client.set(self._lease_key(p), self.consumer, nx=True, px=lease_ms):
                    self._held[p] = _Held()
                    self._ranges.begin(self.streams[p], self._covers(p))
                    self._valid_until[p] = started + lease_ms / 1000
                    self._handed[p].clear()
                    mine += 1
                    log.info("partition taken", partition=p, consumer=self.consumer)
                    self._wake.set()

    def _covers(self, p: int) -> Callable[[str], bool]:
        """The contact IDs of partition p."""
        partitions = self.partitions
        return lambda key: partition_of(key, partitions) == p

    def _revoke(self, p: int) -> int:
        revoke = self.revoke
        if revoke is None:
            return 0
        return revoke(self._covers(p))

    def _stop_reading(self, p: int) -> int:
        """Stop reading p: drop its buffered records and revoke its waiting changes; the
        number of its changes still in flight."""
        self._held.pop(p, None)
        self._scanned = {token for token in self._scanned if token[0] != p}
        handed = self._handed[p]
        kept: list[Record] = []
        for record in self._buffer:
            token = cast(PartitionToken, record[0])
            if token[0] == p:
                handed.discard(token[1])
            else:
                kept.append(record)
        self._buffer = kept
        forgotten = self._revoke(p)
        self._ranges.end(self.streams[p])  # given up: its waiting changes were revoked
        if p in self._last_slice:
            self._revoke_again.add(p)
        return len(handed) - forgotten

    def _lose(self, p: int, why: str) -> None:
        """The lease is gone: stop at once; what is in flight may still finish."""
        if p in self._held:
            self._stop_reading(p)
            self.lost += 1
            log.warning(why, partition=p, consumer=self.consumer)
        self._releasing.pop(p, None)
        self._valid_until.pop(p, None)
        self._handed[p].clear()

    def _give_back(self, p: int) -> None:
        """Above the fair share: stop reading p, release it once its requests are done."""
        self._releasing[p] = self._stop_reading(p)
        self.given_back += 1
        log.info(
            "giving a partition back (fair share)",
            partition=p,
            consumer=self.consumer,
            live=self.live,
            in_flight=self._releasing[p],
        )

    # -- reading -----------------------------------------------------------------------------

    async def read(self) -> Sequence[Record]:
        """The next records of the held partitions, waiting for some.

        When the last slice of a full read is handed out, the next read starts at once (its
        records join the buffer, where losing a partition finds them) while the engine takes
        the slice in.
        """
        failures = 0
        while True:
            self._revoke_late()
            self._replay_step()
            if self._buffer:
                out = self._buffer[:READ_SLICE]
                del self._buffer[:READ_SLICE]
                if self._scanned:
                    self._scanned.difference_update(token for token, _ in out)
                self._last_slice = {cast(PartitionToken, token)[0] for token, _ in out}
                ahead = self._ahead
                if ahead is not None and ahead.done() and not ahead.cancelled():
                    if ahead.exception() is None:
                        self._ahead = None  # its records are in the buffer already
                if not self._buffer and self._full_read and self._ahead is None:
                    self._ahead = asyncio.get_running_loop().create_task(self._read_ahead())
                return out
            if self._small_read:
                self._small_read = False
                await anyio.sleep(READ_LINGER_S)
                continue  # partitions may have been lost meanwhile: revoke first
            try:
                ahead, self._ahead = self._ahead, None
                if ahead is not None:
                    await ahead  # its records are in the buffer
                else:
                    await self._read_ahead()
            except TRANSIENT_ERRORS as exc:
                failures += 1
                for state in self._held.values():
                    state.claimed = False
                    state.scan_from = _START
                await self._back_off("read", failures, exc)
                continue
            except ResponseError as exc:
                if not _is_nogroup(exc):
                    raise SourceError(self._explain(exc)) from exc
                log.warning("consumer group missing: recreating it", group=self.group)
                for p, state in self._held.items():
                    await ensure_group(self._require_client(), self.streams[p], self.group)
                    state.claimed = False
                    state.scan_from = _START
                await anyio.sleep(RECONNECT_BACKOFF.base_s)
                continue
            failures = 0
            self.outages.recovered("read")
            # The loop revokes again, then hands out the first slice.

    async def _read_ahead(self) -> None:
        """One read step; its records go to the buffer as soon as they are in."""
        records = await self._read_step(self._require_client())
        if not records:
            self._full_read = False
            return
        self.entries_read += len(records)
        self._small_read = len(records) < SMALL_READ
        self._full_read = len(records) >= self.count
        self._buffer += records

    def _replay_step(self) -> None:
        """Announce the ranges of partitions taken before the engine attached; end those of
        partitions whose pending entries were all re-read and handed out by earlier reads."""
        ranges = self._ranges
        if not ranges:
            return
        ranges.sync()
        buffered: set[int] | None = None
        for p, state in self._held.items():
            if not state.replaying or not state.claimed or state.scan_from is not None:
                continue
            if buffered is None:
                buffered = {token[0] for token in self._scanned}
            if p not in buffered:
                state.replaying = False
                ranges.end(self.streams[p])

    def _revoke_late(self) -> None:
        """Revoke again the partitions lost or given back since the last read (synchronous:
        nothing of theirs reaches the engine between this and the next records)."""
        self._last_slice = set()
        for p in list(self._revoke_again):
            self._revoke_again.discard(p)
            forgotten = self._revoke(p)
            if p in self._releasing:
                self._releasing[p] -= forgotten

    async def _read_step(self, client: Redis) -> list[Record]:
        keeper = self._keeper
        if keeper is not None and keeper.done():
            # Not renewing leases any more: read nothing, fail loudly.
            for p in list(self._held):
                self._lose(p, "lease keeper stopped")
            error = None if keeper.cancelled() else keeper.exception()
            raise SourceError(f"{self.name}: the lease keeper stopped: {error!r}")
        self._expire()
        held = self._held
        if not held:
            self._wake.clear()
            with anyio.move_on_after(self._block_ms / 1000):
                await self._wake.wait()
            return []
        for p, state in list(held.items()):
            if not state.claimed:
                await self._claim(client, p)
                if p in held:
                    state.claimed = True
                    state.scan_from = _START
        now = self._clock()
        if now >= self._next_check_at:
            self._next_check_at = now + self.lease_ms / 3000
            await self._check_orphans(client)
        scanning = {p: s.scan_from for p, s in held.items() if s.scan_from is not None}
        if scanning:
            self._reading = set(scanning)
            try:
                pages = await self._read_pages(client, scanning)
            finally:
                self._reading = set()
            done = set(scanning)
            records = await self._records(pages, scanning=True, done=done)
            for p in done:
                if p in held:
                    held[p].scan_from = None
            self._scanned.update(cast(PartitionToken, token) for token, _ in records)
            return records
        # A backlog is read through the script, whose reply is cheap to parse; only when there
        # is none does a plain XREADGROUP wait for the next entries (as RedisStreamSource).
        new: dict[int, bytes] = dict.fromkeys(sorted(held), b">")
        self._reading = set(new)
        try:
            pages = await self._read_pages(client, new)
            # Only partitions still held (a lease may have gone during the script's read).
            streams: dict[Any, Any] = {self.streams[p]: b">" for p in new if p in held}
            if not pages and streams:
                reply = await client.xreadgroup(
                    self.group, self.consumer, streams, count=self.count, block=self._block_ms
                )
                pages = self._unframed_pages(reply)
        finally:
            self._reading = set()
        return await self._records(pages, scanning=False, done=set())

    async def _read_pages(self, client: Redis, starts: dict[int, bytes]) -> list[tuple[int, Page]]:
        """XREADGROUP without blocking, through the script, over these partitions from these
        IDs (``>``: new entries): (partition, its entries) per partition that has some."""
        partitions = list(starts)
        reply = await self._read_script(
            keys=[self.streams[p] for p in partitions],
            args=[self.group, self.consumer, self.count, *starts.values()],
            client=client,
        )
        return [(partitions[i], page) for i, page in _framed_pages(reply)]

    def _unframed_pages(self, reply: object) -> list[tuple[int, Page]]:
        """The entries of a plain XREADGROUP reply over several partitions, per partition."""
        index = {stream.encode(): p for p, stream in enumerate(self.streams)}
        return [
            (
                index[key if isinstance(key, bytes) else str(key).encode()],
                _unframed(cast(list[Entry], entries)),
            )
            for key, entries in cast(list[Any], reply or [])
        ]

    async def _check_orphans(self, client: Redis) -> None:
        """Entries of a held partition pending at another consumer after the takeover: a
        consumer that lost the lease had a read on its way. Claim them and re-read."""
        mine = self.consumer.encode()
        for p, state in list(self._held.items()):
            if not state.claimed:
                continue
            summary = await client.xpending(self.streams[p], self.group)
            if any(
                c["name"] != mine and int(c["pending"]) > 0 for c in summary.get("consumers") or ()
            ):
                log.warning(
                    "entries of a held partition are pending at another consumer (read just"
                    " before it lost the lease): claiming them; their order against entries"
                    " already handed out is not guaranteed",
                    partition=p,
                )
                state.claimed = False
                state.scan_from = _START

    async def _claim(self, client: Redis, p: int) -> None:
        """Take over every entry pending in p at other consumers (the lease says they left)."""
        stream = self.streams[p]
        mine = self.consumer.encode()
        summary = await client.xpending(stream, self.group)
        others = [
            c["name"]
            for c in summary.get("consumers") or ()
            if c["name"] != mine and int(c["pending"]) > 0
        ]
        if not others:
            return
        cursor: bytes = _START
        taken = 0
        while True:
            reply = await client.xautoclaim(
                stream, self.group, self.consumer, 0, cursor, count=self.count
            )
            cursor = reply[0]
            taken += len(reply[1])
            if cursor == _START:
                break
        self.claimed += taken
        log.info("claimed pending entries of a taken partition", partition=p, count=taken)

    async def _records(
        self, pages: list[tuple[int, Page]], *, scanning: bool, done: set[int]
    ) -> list[Record]:
        records: list[Record] = []
        vanished: dict[int, list[bytes]] = {}
        for p, page in pages:
            if p not in self._held:
                continue  # lost while the reply was on its way: the next holder reads them
            if scanning and page.ids:
                done.discard(p)
                self._held[p].scan_from = page.last_id
            handed = self._handed[p]
            if not scanning and page.plain:
                # The usual page: new entries, each with its change. In bulk, no branches.
                handed.update(page.ids)
                tokens = zip(repeat(p), page.ids, strict=False)
                records += zip(tokens, page.values, strict=True)  # type: ignore[arg-type]
                continue
            for entry_id, value in zip(page.ids, page.values, strict=True):
                if scanning and entry_id in handed:
                    continue
                if type(value) is int:
                    if value == _DELETED:
                        vanished.setdefault(p, []).append(entry_id)
                        continue
                    log.warning("entry without a change field", entry=entry_id.decode())
                    value = b""
                handed.add(entry_id)
                records.append(((p, entry_id), value))  # type: ignore[arg-type]
        for p, ids in vanished.items():
            log.warning(
                "pending entries were deleted from the stream before being processed",
                partition=p,
                count=len(ids),
            )
            await self._ack_partition(p, ids)
        if vanished:
            records = self._still_held(records)
        return records

    def _still_held(self, records: list[Record]) -> list[Record]:
        """These records less those of partitions lost or given back meanwhile (un-handed:
        the next holder reads them)."""
        held = self._held
        kept: list[Record] = []
        for record in records:
            p, entry_id = cast(PartitionToken, record[0])
            if p in held:
                kept.append(record)
                continue
            self._handed[p].discard(entry_id)
            if p in self._releasing:
                self._releasing[p] -= 1
        return kept

    # -- acknowledging -----------------------------------------------------------------------

    async def ack(self, tokens: Sequence[Hashable]) -> None:
        """XACK (and XDEL) these entries of all partitions in one round trip, retrying."""
        by_partition: dict[int, list[bytes]] = {}
        for p, entry_id in cast(Sequence[PartitionToken], tokens):
            ids = by_partition.get(p)
            if ids is None:
                by_partition[p] = ids = []
            ids.append(entry_id)
        await self._ack_partitions(by_partition)
        for p, ids in by_partition.items():
            self._handed[p].difference_update(ids)
            if p in self._releasing:
                self._releasing[p] -= len(ids)
            self.acked += len(ids)

    async def _ack_partition(self, p: int, ids: list[bytes]) -> None:
        await self._ack_partitions({p: ids})

    async def _ack_partitions(self, by_partition: dict[int, list[bytes]]) -> None:
        """XACK (and XDEL) the entries of several partitions in one round trip, retrying."""
        keys = [self.streams[p] for p in by_partition]
        args: list[bytes | str | int] = [self.group, int(self.address.delete_acked)]
        args += [b" ".join(ids) for ids in by_partition.values()]
        failures = 0
        while True:
            try:
                await self._ack_script(keys=keys, args=args, client=self._require_client())
                self.outages.recovered("ack")
                return
            except TRANSIENT_ERRORS as exc:
                failures += 1
                await self._back_off("ack", failures, exc)
            except ResponseError as exc:
                if not _is_nogroup(exc):
                    raise SourceError(self._explain(exc)) from exc
                self.outages.recovered("ack")  # it answered
                if len(by_partition) > 1:  # one stream lost its group: ack the others alone
                    for p, ids in by_partition.items():
                        await self._ack_partitions({p: ids})
                return  # the group, and its pending list, are gone: nothing left to ack

    # -- helpers -----------------------------------------------------------------------------

    def misfiled(self, token: Hashable, key: str) -> str | None:
        """Why a change does not belong in the partition whose stream it was appended to."""
        p = cast(PartitionToken, token)[0]
        return partition_mismatch(key, p, self.partitions, f"stream {self.streams[p]}")

    def describe(self, tokens: Sequence[Hashable]) -> str:
        """``redis:STREAM:P/ENTRY-ID``, several joined by commas."""
        parts = []
        for token in tokens:
            p, entry_id = cast(PartitionToken, token)
            parts.append(f"redis:{self.streams[p]}/{entry_id.decode()}")
        return ",".join(parts)

    def pending_in_run(self) -> int:
        """Entries handed out and not acknowledged yet."""
        return sum(len(h) for h in self._handed.values())

    def statistics(self) -> SourceStatistics:
        """Reachable or not (and why), reconnects, entries handed out and not acked,
        partitions held and partition leases lost."""
        problem = self.outages.problem
        return SourceStatistics(
            available=not problem,
            problem=f"redis {self.address.display}: {problem}" if problem else "",
            reconnects=self.reconnects,
            unacked=self.pending_in_run(),
            partitions_held=len(self._held),
            leases_lost={"partition": self.lost},
        )


def from_uri(
    uri: str,
    *,
    consumer: str | None = None,
    claim_idle_ms: int | None = None,
    block_ms: int | None = None,
    count: int | None = None,
) -> RedisStreamSource | PartitionedRedisSource:
    """The source a ``redis://`` URI names (not opened yet); ConfigError if the URI is bad.

    Keyword arguments, when given, win over the URI's parameters of the same name. With
    ``partitions`` above 1 it is a :class:`PartitionedRedisSource`.
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
    if address.partitions > 1:
        return PartitionedRedisSource(address, consumer=consumer)
    return RedisStreamSource(address, consumer=consumer)
