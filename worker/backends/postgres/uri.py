"""The ``postgresql://`` URI, the outbox's DDL and the names of the worker's advisory locks."""

from __future__ import annotations

import re
import urllib.parse
from dataclasses import dataclass, field

from worker.backends.uri import integer, seconds, split_params
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
"""Query parameters the worker reads itself."""

DRIVER_PARAMS = frozenset(
    {
        "host",
        "port",
        "user",
        "password",
        "passfile",
        "dbname",
        "database",
        "service",
        "ssl",
        "sslmode",
        "sslcert",
        "sslkey",
        "sslrootcert",
        "sslcrl",
        "sslpassword",
        "sslnegotiation",
        "ssl_min_protocol_version",
        "ssl_max_protocol_version",
        "target_session_attrs",
        "krbsrvname",
        "gsslib",
        "application_name",
        "options",
    }
)
"""Connection parameters that go to asyncpg as they are. Nothing else passes: asyncpg would
send an unknown name to the server as a setting (a misspelt ``lease_s`` included); a server
setting goes in ``options=-c NAME=VALUE``."""

_MIN_S = 0.001

ADVISORY_CLASS = 0x63775F6F  # "cw_o": the first key of the worker's advisory locks
"""Claims take the transaction-scoped advisory lock ``(ADVISORY_CLASS, <table oid>)``."""

CREATE_KEY = -1
"""The second key of the advisory lock under which the worker creates its tables: ``init``
and every replica creating a table it needs take turns (:func:`create_if_missing`)."""

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
    own, rest = split_params(
        "postgresql",
        query,
        OWN_PARAMS,
        passes=DRIVER_PARAMS.__contains__,
        passing="for asyncpg: " + ", ".join(sorted(DRIVER_PARAMS)),
    )
    partitions = integer("postgresql", own, "partitions", 1, 1)
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
        batch=integer("postgresql", own, "batch", 1000, 1),
        lease_s=seconds("postgresql", own, "lease_s", 60.0, _MIN_S),
        poll_s=seconds("postgresql", own, "poll_s", 5.0, _MIN_S),
        partitions=partitions,
        rebalance_s=seconds("postgresql", own, "rebalance_s", 2.0, _MIN_S),
        server_settings=settings,
    )
