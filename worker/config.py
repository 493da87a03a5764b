"""Settings of ``contact-worker run``: flag, else environment variable, else configuration
file, else default."""

from __future__ import annotations

import argparse
import enum
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields
from typing import Any
from urllib.parse import urlsplit

from worker.backends import is_store
from worker.core.concurrency import DEFAULT_MAX_CONCURRENCY
from worker.core.scheduler import DEFAULT_MAX_WAITING
from worker.errors import ConfigError


class Secret:
    """A string that never shows itself in logs, errors or reprs."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        """The real value, for the one place that needs it (the request headers)."""
        return self._value

    def __repr__(self) -> str:
        return "Secret('***')"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and other._value == self._value

    def __hash__(self) -> int:
        return hash(self._value)


def redact_uri(uri: str) -> str:
    """The URI with any password replaced, for logs and messages."""
    parts = urlsplit(uri)
    if parts.password is None:
        return uri
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
    return parts._replace(netloc=netloc).geturl()


# -- value parsers: each raises ValueError with the reason, resolve() adds the setting's name --


def _number(text: str, kind: Callable[[str], float]) -> float:
    try:
        value = kind(text)
    except ValueError:
        raise ValueError(f"not a number: {text!r}") from None
    if math.isnan(value) or math.isinf(value):
        raise ValueError(f"not a finite number: {text!r}")
    return value


def positive_int(text: str) -> int:
    """An integer >= 1."""
    value = int(_number(text, int))
    if value < 1:
        raise ValueError(f"must be at least 1, got {text}")
    return value


AUTO = "auto"
"""``--rate auto`` learns the API's rate limit (worker.core.adapt); ``--concurrency auto``
makes requests in flight adapt (worker.core.concurrency)."""


def concurrency(text: str) -> int | str:
    """An integer >= 1, or ``auto``."""
    if text.strip().lower() == AUTO:
        return AUTO
    try:
        return positive_int(text)
    except ValueError as exc:
        raise ValueError(f"{exc} (or auto)") from None


def non_negative_int(text: str) -> int:
    """An integer >= 0."""
    value = int(_number(text, int))
    if value < 0:
        raise ValueError(f"must be 0 or more, got {text}")
    return value


def non_negative_float(text: str) -> float:
    """A finite number >= 0."""
    value = _number(text, float)
    if value < 0:
        raise ValueError(f"must be 0 or more, got {text}")
    return value


def rate_value(text: str) -> float | str:
    """``auto``, or requests/s: a finite number >= 0 (0 = no limit)."""
    if text.strip().lower() == AUTO:
        return AUTO
    try:
        return non_negative_float(text)
    except ValueError as exc:
        raise ValueError(f"{exc} (or auto)") from None


def positive_float(text: str) -> float:
    """A finite number > 0."""
    value = _number(text, float)
    if value <= 0:
        raise ValueError(f"must be more than 0, got {text}")
    return value


def port(text: str) -> int:
    """A TCP port, 0 meaning off."""
    value = non_negative_int(text)
    if value > 65535:
        raise ValueError(f"must be a port number 0-65535, got {text}")
    return value


def http_url(text: str) -> str:
    """An http(s) URL with a host."""
    parts = urlsplit(text)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"must be an http:// or https:// URL, got {redact_uri(text)!r}")
    return text.rstrip("/")


def non_empty(text: str) -> str:
    """Any non-empty text."""
    if not text.strip():
        raise ValueError("must not be empty")
    return text


def state_uri(text: str) -> str:
    """Where ID knowledge lasts: ``memory`` or ``sqlite:PATH``."""
    if text == "memory":
        return text
    if text.startswith("sqlite:") and text.removeprefix("sqlite:").strip():
        return text
    raise ValueError(f"must be memory or sqlite:PATH, got {text!r}")


def boolean(text: str) -> bool:
    """true/false, 1/0, yes/no, on/off."""
    lowered = text.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off", ""):
        return False
    raise ValueError(f"must be true or false, got {text!r}")


def choice(*allowed: str) -> Callable[[str], str]:
    """One of a few words."""

    def parse(text: str) -> str:
        if text not in allowed:
            raise ValueError(f"must be one of {', '.join(allowed)}, got {text!r}")
        return text

    return parse


@dataclass(frozen=True, slots=True)
class Option:
    """One setting: its flag, environment variable, parser, default and help."""

    field: str
    flag: str
    env: str
    parse: Callable[[str], Any]
    default: Any
    help: str
    required: bool = False
    switch: bool = False
    metavar: str = "N"
    """What ``--help`` (and the README's table) shows for the value: ``--http-port PORT``."""


@dataclass(frozen=True)
class Settings:
    """The effective settings of one run."""

    source: str
    client_id: str
    client_secret: Secret
    dlq: str = "jsonl:dead-letters.jsonl"
    api_url: str = "https://api.smsgatewayapi.com"
    batch_size: int = 100
    linger_ms: float = 200.0
    rate: float | str = 10.0
    """Requests/s, or ``auto`` (:data:`AUTO`)."""
    max_rate: float = 200.0
    """The most requests/s ``--rate auto`` ever tries."""
    max_retry_after_s: float = 300.0
    concurrency: int | str = 8
    """A number, or ``auto`` (adapts up to ``max_concurrency``)."""
    max_concurrency: int = DEFAULT_MAX_CONCURRENCY
    http_port: int = 9102
    follow: bool = False
    checkpoint: str | None = None
    max_body_bytes: int = 1 << 20
    request_timeout_s: float = 30.0
    drain_timeout_s: float = 30.0
    suspect_ttl_s: float = 900.0
    known_ids: int = 200_000
    state: str | None = None
    """None: the input's own store (memory only for a jsonl: input)."""
    max_waiting: int = DEFAULT_MAX_WAITING
    max_retries: int = 0
    max_not_found_run: int = 10
    max_contradictions: int = 3
    confirm_tries: int = 3
    timeout_grace_s: float | None = None
    """None: twice --request-timeout."""
    log_format: str = "auto"
    log_level: str = "info"
    progress_interval_s: float = 30.0
    ingest_token: Secret | None = None


_DEFAULTS = {f.name: f.default for f in fields(Settings)}


@dataclass(frozen=True, slots=True)
class ConfigFile:
    """A checked configuration file: its path and each setting it gives, as text."""

    path: str
    values: Mapping[str, str]


CONFIG_FLAG, CONFIG_ENV = "--config", "WORKER_CONFIG"
"""Where the configuration file is named: it is no setting itself, so not in OPTIONS."""

OPTIONS: tuple[Option, ...] = (
    Option(
        "source",
        "--source",
        "WORKER_SOURCE",
        non_empty,
        None,
        "where changes come from: jsonl:PATH, jsonl:- (stdin), sqlite:PATH, postgresql://..."
        " or redis://... (docs/inputs/)",
        required=True,
        metavar="URI",
    ),
    Option(
        "dlq",
        "--dlq",
        "WORKER_DLQ",
        non_empty,
        None,
        "where dead letters go: jsonl:PATH, or the input's own store"
        " (default: the source URI for postgresql://, redis://, sqlite:;"
        f" {_DEFAULTS['dlq']} otherwise)",
        metavar="URI",
    ),
    Option(
        "api_url",
        "--api-url",
        "SMSGW_API_URL",
        http_url,
        _DEFAULTS["api_url"],
        "base URL of the SMS Gateway API",
        metavar="URL",
    ),
    Option(
        "client_id",
        "--client-id",
        "SMSGW_CLIENT_ID",
        non_empty,
        None,
        "API client ID",
        required=True,
        metavar="ID",
    ),
    Option(
        "client_secret",
        "--client-secret",
        "SMSGW_CLIENT_SECRET",
        lambda text: Secret(non_empty(text)),
        None,
        "API client secret (prefer the environment variable; never logged)",
        required=True,
        metavar="SECRET",
    ),
    Option(
        "batch_size",
        "--batch-size",
        "WORKER_BATCH_SIZE",
        positive_int,
        _DEFAULTS["batch_size"],
        "most contacts per request",
    ),
    Option(
        "linger_ms",
        "--linger-ms",
        "WORKER_LINGER_MS",
        non_negative_float,
        _DEFAULTS["linger_ms"],
        "longest a change waits for its batch to fill",
        metavar="MS",
    ),
    Option(
        "rate",
        "--rate",
        "WORKER_RATE",
        rate_value,
        _DEFAULTS["rate"],
        "most requests per second, in any one second, for the whole account (replicas on one"
        " redis:// or postgresql:// input share it); auto = learn the API's limit; 0 = no limit",
        metavar="R",
    ),
    Option(
        "max_rate",
        "--max-rate",
        "WORKER_MAX_RATE",
        positive_float,
        _DEFAULTS["max_rate"],
        "the most requests per second --rate auto tries",
        metavar="R",
    ),
    Option(
        "max_retry_after_s",
        "--max-retry-after",
        "WORKER_MAX_RETRY_AFTER",
        positive_float,
        _DEFAULTS["max_retry_after_s"],
        "longest Retry-After honoured, in seconds; a longer one is capped",
        metavar="SECONDS",
    ),
    Option(
        "concurrency",
        "--concurrency",
        "WORKER_CONCURRENCY",
        concurrency,
        _DEFAULTS["concurrency"],
        "most requests in flight, or auto: adapts to the API's latency, up to --max-concurrency",
    ),
    Option(
        "max_concurrency",
        "--max-concurrency",
        "WORKER_MAX_CONCURRENCY",
        positive_int,
        _DEFAULTS["max_concurrency"],
        "the ceiling of --concurrency auto",
    ),
    Option(
        "http_port",
        "--http-port",
        "WORKER_HTTP_PORT",
        port,
        _DEFAULTS["http_port"],
        "port of /healthz, /readyz and /metrics, on all interfaces (0 = off)",
        metavar="PORT",
    ),
    Option(
        "follow",
        "--follow",
        "WORKER_FOLLOW",
        boolean,
        False,
        "tail a jsonl: file instead of stopping at its end",
        switch=True,
    ),
    Option(
        "checkpoint",
        "--checkpoint",
        "WORKER_CHECKPOINT",
        non_empty,
        None,
        "file keeping the offset of the acknowledged prefix of a jsonl: file",
        metavar="PATH",
    ),
    Option(
        "max_body_bytes",
        "--max-body-bytes",
        "WORKER_MAX_BODY_BYTES",
        positive_int,
        _DEFAULTS["max_body_bytes"],
        "largest request body",
        metavar="BYTES",
    ),
    Option(
        "request_timeout_s",
        "--request-timeout",
        "WORKER_REQUEST_TIMEOUT",
        positive_float,
        _DEFAULTS["request_timeout_s"],
        "seconds before a request is given up and retried",
        metavar="SECONDS",
    ),
    Option(
        "drain_timeout_s",
        "--drain-timeout",
        "WORKER_DRAIN_TIMEOUT",
        non_negative_float,
        _DEFAULTS["drain_timeout_s"],
        "seconds allowed to finish after SIGTERM/SIGINT",
        metavar="SECONDS",
    ),
    Option(
        "suspect_ttl_s",
        "--suspect-ttl",
        "WORKER_SUSPECT_TTL",
        non_negative_float,
        _DEFAULTS["suspect_ttl_s"],
        "seconds what the API said about an ID (it exists, it is missing) is remembered",
        metavar="SECONDS",
    ),
    Option(
        "known_ids",
        "--known-ids",
        "WORKER_KNOWN_IDS",
        non_negative_int,
        _DEFAULTS["known_ids"],
        "IDs remembered of each kind (exists, missing), the oldest forgotten first; 0 = none",
    ),
    Option(
        "state",
        "--state",
        "WORKER_STATE",
        state_uri,
        None,
        "where ID knowledge lasts: memory, or sqlite:PATH (default: the input's own store;"
        " memory for a jsonl: input)",
        metavar="URI",
    ),
    Option(
        "max_waiting",
        "--max-waiting",
        "WORKER_MAX_WAITING",
        positive_int,
        _DEFAULTS["max_waiting"],
        "changes held in memory before reading pauses",
    ),
    Option(
        "max_retries",
        "--max-retries",
        "WORKER_MAX_RETRIES",
        non_negative_int,
        _DEFAULTS["max_retries"],
        "transient failures of one request before exiting 1 (0 = retry forever)",
    ),
    Option(
        "max_contradictions",
        "--max-contradictions",
        "WORKER_MAX_CONTRADICTIONS",
        non_negative_int,
        _DEFAULTS["max_contradictions"],
        "lone 404s in a row on contacts the API applied within the hour that stop sending"
        " (0 = never)",
    ),
    Option(
        "max_not_found_run",
        "--max-not-found-run",
        "WORKER_MAX_NOT_FOUND_RUN",
        non_negative_int,
        _DEFAULTS["max_not_found_run"],
        "lone contacts answered 404 in a row, nothing applied in between, that stop sending"
        " as a wrong URL or account (0 = never)",
    ),
    Option(
        "confirm_tries",
        "--confirm-tries",
        "WORKER_CONFIRM_TRIES",
        positive_int,
        _DEFAULTS["confirm_tries"],
        "identical answers with an undocumented error code before a lone change is rejected",
    ),
    Option(
        "timeout_grace_s",
        "--timeout-grace",
        "WORKER_TIMEOUT_GRACE",
        non_negative_float,
        None,
        "seconds an ID of a request given up at its timeout takes no newer values"
        " (default: twice --request-timeout)",
        metavar="SECONDS",
    ),
    Option(
        "ingest_token",
        "--ingest-token",
        "WORKER_INGEST_TOKEN",
        lambda text: Secret(non_empty(text)),
        None,
        "bearer token for POST /v1/changes of a sqlite: spool (prefer the variable; never logged)",
        metavar="TOKEN",
    ),
    Option(
        "log_format",
        "--log-format",
        "WORKER_LOG_FORMAT",
        choice("auto", "json", "console"),
        _DEFAULTS["log_format"],
        "json lines, or console (readable); auto = console on a tty",
        metavar="FORMAT",
    ),
    Option(
        "log_level",
        "--log-level",
        "WORKER_LOG_LEVEL",
        choice("debug", "info", "warning", "error"),
        _DEFAULTS["log_level"],
        "least level logged",
        metavar="LEVEL",
    ),
    Option(
        "progress_interval_s",
        "--progress-interval",
        "WORKER_PROGRESS_INTERVAL",
        non_negative_float,
        _DEFAULTS["progress_interval_s"],
        "seconds between progress log events (0 = none)",
        metavar="SECONDS",
    ),
)


def add_options(parser: argparse.ArgumentParser, options: tuple[Option, ...] = OPTIONS) -> None:
    """Declare the flags; values stay text until :func:`resolve` so env and flags parse alike."""
    for option in options:
        shown = "" if option.default is None else f" (default: {option.default})"
        text = f"{option.help}; env {option.env}{shown}"
        if option.switch:
            parser.add_argument(
                option.flag,
                dest=option.field,
                action="store_const",
                const="true",
                default=None,
                help=text,
            )
        else:
            parser.add_argument(
                option.flag,
                dest=option.field,
                default=None,
                help=text,
                metavar=option.metavar,
            )
    parser.add_argument(
        CONFIG_FLAG,
        dest="config",
        default=None,
        metavar="PATH",
        help="TOML file of settings, keyed by the names `contact-worker config` shows; flags and"
        f" environment variables win over it; env {CONFIG_ENV}",
    )


class Origin(enum.StrEnum):
    """The layer a setting's value came from, highest first."""

    FLAG = "flag"
    ENV = "env"
    FILE = "file"
    DEFAULT = "default"
    DERIVED = "derived"
    """A default that follows another setting: ``dlq`` follows a store ``source``."""
    MISSING = "missing"
    """Required and given nowhere."""


@dataclass(frozen=True, slots=True)
class Choice:
    """One setting's value, where it came from, and what is wrong with it if anything."""

    option: Option
    value: Any
    origin: Origin
    where: str | None = None
    """The flag, the variable, the file, or for DERIVED the setting followed."""
    problem: str | None = None

    def describe(self) -> str:
        """Where the value came from, for people: ``flag --rate``, ``file w.toml``, ``default``."""
        if self.origin is Origin.DERIVED:
            return f"default: from {self.where}"
        return str(self.origin) if self.where is None else f"{self.origin} {self.where}"


@dataclass(frozen=True, slots=True)
class Resolution:
    """Every setting with its origin, in option order, and every problem found."""

    choices: tuple[Choice, ...]
    problems: tuple[str, ...]
    config_file: str | None = None

    def settings(self) -> Settings:
        """The validated settings; :class:`ConfigError` lists every problem at once."""
        if self.problems:
            raise ConfigError("; ".join(self.problems))
        return Settings(**{choice.option.field: choice.value for choice in self.choices})


def _pick(
    option: Option, args: argparse.Namespace, environ: Mapping[str, str], file: ConfigFile | None
) -> tuple[str | None, Origin, str | None]:
    """The highest layer that gives ``option``: its text, the layer and the place."""
    text = getattr(args, option.field, None)
    if text is not None:
        return text, Origin.FLAG, option.flag
    if option.env in environ:
        return environ[option.env], Origin.ENV, option.env
    if file is not None and option.field in file.values:
        return file.values[option.field], Origin.FILE, file.path
    return None, Origin.DEFAULT, None


def _choose(
    option: Option, args: argparse.Namespace, environ: Mapping[str, str], file: ConfigFile | None
) -> Choice:
    text, origin, where = _pick(option, args, environ, file)
    if text is None:
        if option.required:
            return Choice(option, None, Origin.MISSING, problem="required")
        return Choice(option, option.default, Origin.DEFAULT)
    try:
        return Choice(option, option.parse(text), origin, where)
    except ValueError as exc:
        return Choice(option, None, origin, where, str(exc))


def _derive_dlq(choices: list[Choice]) -> None:
    """Without a ``dlq``, a store input keeps its dead letters; a file input writes a file."""
    by_field = {choice.option.field: i for i, choice in enumerate(choices)}
    if "dlq" not in by_field or "source" not in by_field:
        return
    dlq, source = choices[by_field["dlq"]], choices[by_field["source"]].value
    if dlq.origin is not Origin.DEFAULT or dlq.value is not None:
        return
    if source and is_store(source):
        choices[by_field["dlq"]] = Choice(dlq.option, source, Origin.DERIVED, "source")
    else:
        choices[by_field["dlq"]] = Choice(dlq.option, _DEFAULTS["dlq"], Origin.DEFAULT)


def _conflicts(values: Mapping[str, Any]) -> list[str]:
    """Settings valid alone but not together."""
    source, checkpoint = values.get("source"), values.get("checkpoint")
    problems = []
    if checkpoint and source and not source.startswith("jsonl:"):
        problems.append("--checkpoint only applies to a jsonl: source")
    if source == "jsonl:-" and (values.get("follow") or checkpoint):
        problems.append("jsonl:- (stdin) cannot be used with --follow or --checkpoint")
    return problems


def _problem(choice: Choice, file: ConfigFile | None) -> str:
    """The message naming the flag, the variable, or the file and key."""
    option = choice.option
    if choice.origin is Origin.MISSING:
        also = f", or {option.field} in {file.path}" if file is not None else ""
        return f"{option.flag} (or {option.env}{also}) is required"
    where = f"{choice.where}: {option.field}" if choice.origin is Origin.FILE else choice.where
    return f"{where}: {choice.problem}"


def explain(
    args: argparse.Namespace,
    environ: Mapping[str, str],
    file: ConfigFile | None = None,
    options: tuple[Option, ...] = OPTIONS,
) -> Resolution:
    """Each setting from the flag, else the environment, else the file, else the default."""
    choices = [_choose(option, args, environ, file) for option in options]
    _derive_dlq(choices)
    problems = [_problem(choice, file) for choice in choices if choice.problem is not None]
    problems += _conflicts({choice.option.field: choice.value for choice in choices})
    return Resolution(tuple(choices), tuple(problems), None if file is None else file.path)


def senders(settings: Settings) -> int:
    """Requests in flight at most: ``--concurrency``, or its ceiling when it is ``auto``."""
    if settings.concurrency == AUTO:
        return settings.max_concurrency
    return int(settings.concurrency)


def config_path(args: argparse.Namespace, environ: Mapping[str, str]) -> str | None:
    """The configuration file to read: ``--config``, else ``WORKER_CONFIG``, else none."""
    path, origin = getattr(args, "config", None), CONFIG_FLAG
    if path is None and CONFIG_ENV in environ:
        path, origin = environ[CONFIG_ENV], CONFIG_ENV
    if path is not None and not path.strip():
        raise ConfigError(f"{origin}: must not be empty")
    return path
