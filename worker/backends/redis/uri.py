"""The ``redis://`` URI: which server, stream, group and consumer, and the partition settings."""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from worker.errors import ConfigError

DEFAULT_STREAM = "contacts:changes"
DEFAULT_GROUP = "contact-worker"

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
