"""The ``postgresql://`` URI, the outbox's DDL and the names of the worker's advisory locks."""

from __future__ import annotations

import math
import re
import urllib.parse
from dataclasses import dataclass, field

from worker.errors import ConfigError

DEFAULT_TABLE = "contact_changes"

DDL_TEMPLATE = """\
CREATE TABLE IF NOT EXISTS {table} (
    id            bigserial   PRIMARY KEY,
    contact_id    text        NOT NULL,
    change        jsonb       NOT NULL,
    created_at    timestamptz NOT NULL DEFAULT now(),
    claimed_by    text,
    claimed_until timestamptz,
    partition     integer     NOT NULL DEFAULT 0
);

ALTER TABLE {table} ADD COLUMN IF NOT EXISTS partition integer NOT NULL DEFAULT 0;

CREATE INDEX IF NOT EXISTS {name}_part ON {table} (partition, id);

CREATE TABLE IF NOT EXISTS {table}_dead (
    id          bigserial   PRIMARY KEY,
    letter      jsonb       NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now(),
    replayed_at timestamptz
);

ALTER TABLE {table}_dead ADD COLUMN IF NOT EXISTS replayed_at timestamptz;

CREATE OR REPLACE FUNCTION {table}_notify() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify(TG_TABLE_SCHEMA || '.' || TG_TABLE_NAME, '');
    RETURN NULL;
END
$$;

CREATE OR REPLACE TRIGGER {name}_notify
    AFTER INSERT ON {table}
    FOR EACH STATEMENT EXECUTE FUNCTION {table}_notify();
"""
"""The outbox, its dead-letter table and the wake-up trigger (PostgreSQL 14 or newer)."""

_NAME = re.compile(r"[a-z_][a-z0-9_]*")
_MAX_NAME = 63 - len("_notify")  # the longest derived identifier must fit NAMEDATALEN

OUTBOX_COLUMNS = ("id", "contact_id", "change", "claimed_by", "claimed_until")

PARTITIONED_COLUMNS = (*OUTBOX_COLUMNS, "partition")
"""The columns a partitioned source needs (``partition`` came later: ``init`` adds it)."""

OWN_PARAMS = frozenset(
    {"table", "schema", "batch", "lease_s", "poll_s", "partitions", "rebalance_s"}
)
"""Query parameters the worker reads itself; the rest of the URI goes to asyncpg."""

ADVISORY_CLASS = 0x63775F6F  # "cw_o": the first key of the worker's advisory locks
"""Claims take the transaction-scoped advisory lock ``(ADVISORY_CLASS, <table oid>)``."""

MAX_PARTITIONS = 4096
PARTITION_TAG = 0x63770000  # "cw" in the high half: the second key of a partition's lock
"""A replica serving partition p of a table holds the session-level advisory lock
``(<table oid as int4>, PARTITION_TAG + p)`` on its lock connection."""
MEMBER_KEY = 0x6377FFFF
"""Every replica of a partitioned table holds ``(<table oid as int4>, MEMBER_KEY)`` in shared
mode: the number of holders is the number of live replicas."""


def ddl(table: str = DEFAULT_TABLE, schema: str | None = None) -> str:
    """The DDL for one outbox table (names checked by :func:`parse_uri`)."""
    qualified = f"{schema}.{table}" if schema else table
    text = DDL_TEMPLATE.format(table=qualified, name=table)
    if schema:
        text = f"CREATE SCHEMA IF NOT EXISTS {schema};\n\n" + text
    return text


DDL = ddl()
"""The DDL as docs/inputs/postgresql.md shows it: ``contact_changes`` in the default schema."""


@dataclass(frozen=True, slots=True)
class OutboxUri:
    """A parsed ``postgresql://`` URI: where to connect, and the worker's own parameters."""

    dsn: str
    """What asyncpg gets: the URI without the worker's parameters."""
    display: str
    """The URI without password or parameters, for messages and logs."""
    table: str = DEFAULT_TABLE
    schema: str | None = None
    batch: int = 1000
    lease_s: float = 60.0
    poll_s: float = 5.0
    partitions: int = 1
    rebalance_s: float = 2.0
    server_settings: dict[str, str] = field(default_factory=dict)

    def qualify(self, name: str) -> str:
        """``schema.name``, or ``name`` when the URI names no schema (search_path decides)."""
        return f"{self.schema}.{name}" if self.schema else name

    @property
    def outbox(self) -> str:
        """The outbox table, qualified as in SQL."""
        return self.qualify(self.table)

    @property
    def dead(self) -> str:
        """The dead-letter table next to the outbox, qualified as in SQL."""
        return self.qualify(self.table + "_dead")


def _number(params: dict[str, str], name: str, default: float, *, integer: bool) -> float:
    raw = params.get(name)
    if raw is None:
        return default
    try:
        value = int(raw) if integer else float(raw)
    except ValueError:
        raise ConfigError(f"postgresql URI: {name} must be a number, got {raw!r}") from None
    if not math.isfinite(value) or value <= 0:
        raise ConfigError(f"postgresql URI: {name} must be > 0, got {raw!r}")
    return value


def _identifier(params: dict[str, str], name: str) -> str | None:
    value = params.get(name)
    if value is None:
        return None
    if not _NAME.fullmatch(value) or len(value) > _MAX_NAME:
        raise ConfigError(
            f"postgresql URI: {name} must be a lowercase SQL name (a-z, 0-9, _) of at most"
            f" {_MAX_NAME} characters, got {value!r}"
        )
    return value


def parse_uri(uri: str) -> OutboxUri:
    """Split a ``postgresql://`` URI into the asyncpg DSN and the worker's parameters."""
    parts = urllib.parse.urlsplit(uri)
    if parts.scheme not in ("postgresql", "postgres"):
        raise ConfigError(f"not a postgresql:// URI: {uri!r}")
    try:
        query = urllib.parse.parse_qsl(parts.query, keep_blank_values=True, strict_parsing=True)
    except ValueError:
        raise ConfigError(f"postgresql URI: malformed query string {parts.query!r}") from None
    own = {k: v for k, v in query if k in OWN_PARAMS}
    rest = [(k, v) for k, v in query if k not in OWN_PARAMS]
    partitions = int(_number(own, "partitions", 1, integer=True))
    if partitions > MAX_PARTITIONS:
        raise ConfigError(f"postgresql URI: partitions must be at most {MAX_PARTITIONS}")
    dsn = urllib.parse.urlunsplit(parts._replace(query=urllib.parse.urlencode(rest)))
    user, _, host = parts.netloc.rpartition("@")
    user = user.partition(":")[0]  # never show the password
    display = f"{parts.scheme}://{user + '@' if user else ''}{host}{parts.path}"
    settings = (
        {}
        if any(k == "application_name" for k, _ in rest)
        else {"application_name": "contact-worker"}
    )
    return OutboxUri(
        dsn=dsn,
        display=display,
        table=_identifier(own, "table") or DEFAULT_TABLE,
        schema=_identifier(own, "schema"),
        batch=int(_number(own, "batch", 1000, integer=True)),
        lease_s=_number(own, "lease_s", 60.0, integer=False),
        poll_s=_number(own, "poll_s", 5.0, integer=False),
        partitions=partitions,
        rebalance_s=_number(own, "rebalance_s", 2.0, integer=False),
        server_settings=settings,
    )
