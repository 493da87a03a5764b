"""The ``redis://`` URI: which server, stream, group and consumer, and the partition settings."""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from worker.backends.uri import flag, integer, seconds, split_params
from worker.errors import ConfigError

DEFAULT_STREAM = "contacts:changes"
DEFAULT_GROUP = "contact-worker"

_OWN_PARAMS = frozenset(
    {
        "stream",
        "group",
        "consumer",
        "poll_s",
        "batch",
        "claim_idle_s",
        "delete_acked",
        "dead_stream",
        "partitions",
        "lease_s",
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
    # In milliseconds here, as redis-py takes them; the URI says seconds (poll_s, claim_idle_s).
    block_ms: int = 5000
    """How long a read waits for new entries (URI ``poll_s``)."""
    count: int = 1000
    """Most entries per read (URI ``batch``)."""
    claim_idle_ms: int = 30_000
    """How long an entry stays pending before another consumer claims it (``claim_idle_s``)."""
    delete_acked: bool = True
    dead_stream: str | None = None
    partitions: int = 1
    """Partition streams ``<stream>:0`` .. ``<stream>:<partitions-1>`` when above 1."""
    lease_ms: int = 10_000
    """How long a partition lease lives without renewal (URI ``lease_s``; partitioned streams
    only)."""

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


def parse_uri(uri: str) -> StreamAddress:
    """Split a ``redis://`` or ``rediss://`` URI into connection URL and stream settings."""
    parts = urlsplit(uri)
    if parts.scheme not in ("redis", "rediss"):
        raise ConfigError(f"not a redis URI: {uri.split('@')[-1]!r} (use redis://HOST:PORT/DB)")
    params, passthrough = split_params(
        "redis",
        parse_qsl(parts.query, keep_blank_values=True),
        _OWN_PARAMS,
        old=("count", "block_ms", "claim_idle_ms", "lease_ms"),
        passes=lambda name: name.startswith("ssl_"),
        passing="ssl_* for redis-py",
    )
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
        block_ms=_ms(seconds("redis", params, "poll_s", 5.0, 0.001)),
        count=integer("redis", params, "batch", 1000, 1),
        claim_idle_ms=_ms(seconds("redis", params, "claim_idle_s", 30.0, 0.0)),
        delete_acked=flag("redis", params, "delete_acked", True),
        dead_stream=params.get("dead_stream"),
        partitions=integer("redis", params, "partitions", 1, 1),
        lease_ms=_ms(seconds("redis", params, "lease_s", 10.0, 0.1)),
    )


def _ms(value_s: float) -> int:
    """Seconds (the URI's unit) as the whole milliseconds redis-py takes, at least 1 when not 0."""
    return max(1, round(value_s * 1000)) if value_s > 0 else 0
