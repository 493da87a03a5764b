"""The ``kafka://`` URI: which brokers, topic and group, the security settings, and the
worker's read settings.

``kafka://[USER:PASSWORD@]HOST:PORT[,HOST:PORT...]/TOPIC?group=NAME&partitions=P&...``; the
password (SASL) lives in the userinfo only, so that :func:`worker.config.redact_uri` hides it
in every log and message, and :attr:`KafkaAddress.display` never carries it.
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qsl, unquote, urlsplit

from worker.backends.uri import flag, integer, seconds, split_params
from worker.errors import ConfigError

DEFAULT_GROUP = "contact-worker"
DEFAULT_PORT = 9092
SASL_MECHANISMS = ("PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512")

_OWN_PARAMS = frozenset(
    {
        "group",
        "partitions",
        "replication",
        "batch",
        "window",
        "poll_s",
        "session_timeout_s",
        "dead_topic",
        "client_id",
        "tls",
        "ssl_cafile",
        "ssl_certfile",
        "ssl_keyfile",
        "sasl_mechanism",
    }
)


@dataclass(frozen=True, slots=True)
class KafkaAddress:
    """A parsed ``kafka://`` URI."""

    brokers: tuple[str, ...]
    """``HOST:PORT`` of each bootstrap broker."""
    topic: str
    group: str = DEFAULT_GROUP
    partitions: int = 1
    """Partitions ``init`` creates the topic with (the worker reads however many it has)."""
    replication: int = 1
    """Replication factor ``init`` creates the topics with."""
    batch: int = 1000
    """Most records per read."""
    window: int = 10_000
    """Records of one partition handed out past its last committed offset, at most: what a
    replica that crashed may have read past the committed offset."""
    poll_s: float = 1.0
    """How long a read waits for records before it looks again."""
    session_timeout_s: float = 10.0
    """How long the group waits for a replica that stopped heartbeating (kill -9)."""
    dead_topic: str | None = None
    client_id: str = "contact-worker"
    tls: bool = False
    ssl_cafile: str | None = None
    ssl_certfile: str | None = None
    ssl_keyfile: str | None = None
    sasl_mechanism: str | None = None
    username: str | None = None
    password: str | None = None
    """SASL password: never log it (log :attr:`display`)."""

    @property
    def display(self) -> str:
        """``HOST:PORT,.../TOPIC`` without credentials, for messages."""
        return f"{','.join(self.brokers)}/{self.topic}"

    @property
    def dead_letter_topic(self) -> str:
        """Where dead letters go: ``dead_topic``, else ``<topic>.dead-letters``."""
        return self.dead_topic or f"{self.topic}.dead-letters"

    def client_options(self) -> dict[str, Any]:
        """The connection keywords every aiokafka client of this address takes."""
        options: dict[str, Any] = {
            "bootstrap_servers": list(self.brokers),
            "client_id": self.client_id,
        }
        protocol = "PLAINTEXT"
        if self.tls:
            # Always verified, name included, as every other connection of the worker.
            context = ssl.create_default_context(cafile=self.ssl_cafile)
            if self.ssl_certfile:
                context.load_cert_chain(self.ssl_certfile, self.ssl_keyfile)
            options["ssl_context"] = context
            protocol = "SSL"
        if self.sasl_mechanism is not None:
            protocol = "SASL_SSL" if self.tls else "SASL_PLAINTEXT"
            options["sasl_mechanism"] = self.sasl_mechanism
            options["sasl_plain_username"] = self.username
            options["sasl_plain_password"] = self.password
        options["security_protocol"] = protocol
        return options


def parse_uri(uri: str) -> KafkaAddress:
    """Split a ``kafka://`` URI into brokers, topic and settings; ConfigError if it is bad."""
    parts = urlsplit(uri)
    if parts.scheme != "kafka":
        raise ConfigError(f"not a kafka URI: {uri.split('@')[-1]!r} (use kafka://HOST:PORT/TOPIC)")
    userinfo, _, hosts = parts.netloc.rpartition("@")
    brokers = tuple(_broker(host) for host in hosts.split(",") if host)
    if not brokers:
        raise ConfigError("kafka URI: name at least one broker (kafka://HOST:PORT/TOPIC)")
    topic = unquote(parts.path.strip("/"))
    if not topic or "/" in topic:
        raise ConfigError(f"kafka URI: name one topic after the brokers, got {topic!r}")
    params, _ = split_params("kafka", parse_qsl(parts.query, keep_blank_values=True), _OWN_PARAMS)
    for name in ("group", "dead_topic", "client_id"):
        if name in params and not params[name]:
            raise ConfigError(f"kafka URI: {name} must not be empty")
    username = password = None
    if userinfo:
        user, _, secret = userinfo.partition(":")
        username, password = unquote(user), unquote(secret)
    mechanism = params.get("sasl_mechanism")
    if mechanism is not None:
        mechanism = mechanism.upper()
        if mechanism not in SASL_MECHANISMS:
            raise ConfigError(
                f"kafka URI: sasl_mechanism must be one of {', '.join(SASL_MECHANISMS)},"
                f" got {params['sasl_mechanism']!r}"
            )
        if not username:
            raise ConfigError(
                "kafka URI: sasl_mechanism needs a user and password"
                " (kafka://USER:PASSWORD@HOST:PORT/TOPIC)"
            )
    elif userinfo:
        mechanism = "PLAIN"  # a user and password name SASL; PLAIN unless told otherwise
    tls_files = [params.get(name) for name in ("ssl_cafile", "ssl_certfile", "ssl_keyfile")]
    tls = flag("kafka", params, "tls", any(tls_files))
    if params.get("ssl_keyfile") and not params.get("ssl_certfile"):
        raise ConfigError("kafka URI: ssl_keyfile needs ssl_certfile")
    return KafkaAddress(
        brokers=brokers,
        topic=topic,
        group=params.get("group", DEFAULT_GROUP),
        partitions=integer("kafka", params, "partitions", 1, 1),
        replication=integer("kafka", params, "replication", 1, 1),
        batch=integer("kafka", params, "batch", 1000, 1),
        window=integer("kafka", params, "window", 10_000, 1),
        poll_s=seconds("kafka", params, "poll_s", 1.0, 0.001),
        session_timeout_s=seconds("kafka", params, "session_timeout_s", 10.0, 1.0),
        dead_topic=params.get("dead_topic"),
        client_id=params.get("client_id", "contact-worker"),
        tls=tls,
        ssl_cafile=params.get("ssl_cafile"),
        ssl_certfile=params.get("ssl_certfile"),
        ssl_keyfile=params.get("ssl_keyfile"),
        sasl_mechanism=mechanism,
        username=username,
        password=password,
    )


def _broker(text: str) -> str:
    host, _, port = text.rpartition(":")
    if not host:
        return f"{text}:{DEFAULT_PORT}"
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"kafka URI: bad port in {text!r}")
    return f"{host}:{port}"
