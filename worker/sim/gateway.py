"""A faithful fake of the Smstools SMS Gateway API `PATCH /v1/contact`, with fault knobs."""

from __future__ import annotations

import asyncio
import dataclasses
import datetime
import math
import random
import time
import zlib
from collections import deque
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import orjson
from aiohttp import web

from worker.sim.latency import LatencySampler
from worker.sim.latency import parse_latency as parse_latency

__all__ = [
    "SimConfig",
    "SimStats",
    "Simulator",
    "check_contact",
    "parse_latency",
    "serve",
]

CONTACT_PATH = "/v1/contact"
RATE_WINDOWS = ("bucket", "sliding")
# The real API locks the account after repeated failed logins (code 1002); the threshold is ours.
MAX_FAILED_LOGINS = 10

_TEXT_FIELDS = frozenset(
    ["phone", "groupid", "firstname", "lastname", *(f"extra{i}" for i in range(1, 9))]
)
ALLOWED_FIELDS = _TEXT_FIELDS | {"ID", "birthday", "unsubscribed"}

_ACCOUNT_MESSAGES = {
    "116": "access disabled",
    "200": "IP not allowed",
    "1403": "no access",
}


def _error(code: str, message: str) -> bytes:
    return orjson.dumps({"error": code, "errorMsg": message})


# Pre-encoded bodies: the hot path must not serialise the same constant thousands of times a second.
_BODY_104 = _error("104", "invalid credentials")
_BODY_1002 = _error("1002", "too many failed logins")
_BODY_105 = _error("105", "server issues, try later")
_BODY_503 = _error("server error", "service unavailable, try later")
_BODY_429 = _error("rate limit exceeded", "too many requests, see Retry-After")
_BODY_114 = _error("114", "empty request")
_BODY_122 = _error("122", "no contacts sent")
_BODY_123 = _error("123", "object without ID")
_BODY_404 = _error("404", "contact not found")
_JSON = "application/json"
_FOREIGN_404 = (
    b"<html><head><title>404 Not Found</title></head><body><h1>404: Not Found</h1></body></html>"
)


_PHONE_CHARS = frozenset("+0123456789 ")


def _phone_ok(value: str) -> bool:
    """Empty (clears the field) or digits with an optional leading + and spaces."""
    if not value:
        return True
    digits = sum(c.isdigit() for c in value)
    return 6 <= digits <= 20 and _PHONE_CHARS.issuperset(value) and "+" not in value[1:]


def check_contact(obj: object) -> tuple[str, str] | None:
    """Return (code, message) if `obj` is not an acceptable contact object, else None."""
    if type(obj) is not dict:
        return ("123", "object without ID")
    id_value = obj.get("ID")
    if id_value is None:
        return ("123", "object without ID")
    # Type dispatch instead of a validator per field: this runs ~100k times a second.
    for name, value in obj.items():
        kind = type(value)
        if kind is str:
            if name in _TEXT_FIELDS:
                # The API checks phone numbers; the worker cannot know its exact rule, so a bad
                # one reaches the API and is refused there (400/139): what isolation is for.
                if name != "phone" or _phone_ok(value):
                    continue
                return ("139", "invalid parameter: phone (not a phone number)")
            if name == "ID":
                if value:
                    continue
                return ("139", "invalid parameter: ID (empty)")
            if name == "birthday":
                if len(value) == 10 and value[4] == "-" and value[7] == "-":
                    try:
                        datetime.date.fromisoformat(value)
                        continue
                    except ValueError:
                        pass
                return ("139", "invalid parameter: birthday (expected a date yyyy-MM-dd)")
        elif kind is bool:
            if name == "unsubscribed":
                continue
        elif kind is int:
            if name == "ID":
                continue
        if name not in ALLOWED_FIELDS:
            return ("139", f"unknown parameter: {name}")
        return ("139", f"invalid parameter: {name} (wrong type)")
    return None


@dataclass
class SimConfig:
    """Behaviour knobs of the simulated gateway; all can change at runtime."""

    client_id: str = "demo"
    client_secret: str = "demo-secret"
    # The status that carries error 104: the real API's is undocumented (an example shows 400).
    auth_status: int = 401
    known_ids: frozenset[str] | None = None
    known_count: int | None = None
    unknown_share: float = 0.0
    latency: str = "0"
    rate_limit: float | None = None
    """Requests/s the gateway allows before it answers 429 (the hidden limit; None: none)."""
    rate_window: str = "bucket"
    """How it counts: ``bucket`` (a token bucket of ``rate_burst`` tokens refilled at
    ``rate_limit``/s) or ``sliding`` (at most ``rate_limit`` requests, rounded down, in any
    one-second window: the strictest reading of "R requests per second")."""
    rate_burst: float | None = None
    """The bucket's size (None: ``rate_limit``, at least 1)."""
    rate_headers: bool = False
    retry_after_s: float | None = None
    """The ``Retry-After`` its 429s carry (None: the seconds until the limit has room, >= 1)."""
    """Send ``RateLimit-Policy``, ``RateLimit`` and ``X-RateLimit-*`` headers with answers."""
    transient_error_rate: float = 0.0
    max_array: int | None = None
    drop_rate: float = 0.0
    seed: int = 0
    record_history: bool = False
    disabled_code: str | None = None
    # Answers that are not the API's: a proxy's HTML 404 page for a share of the requests (1.0
    # is a wrong URL), and 400 with an undocumented error code.
    foreign_404_share: float = 0.0
    foreign_after: int = 0
    """The foreign 404s begin after this many requests (1: after a worker's start-up check)."""
    odd_code_share: float = 0.0
    odd_code: str = "9999"
    # A share of the requests held `slow_ms` before they are applied, however long the client
    # waits: a server that applies a request after its client has given up on it.
    slow_share: float = 0.0
    slow_ms: float = 0.0

    def __post_init__(self) -> None:
        if not 400 <= self.auth_status <= 499:
            raise ValueError(f"auth_status must be a 4xx status, got {self.auth_status}")
        if self.known_count is not None and self.known_count < 0:
            raise ValueError(f"known_count must be >= 0, got {self.known_count}")
        for name in (
            "unknown_share",
            "transient_error_rate",
            "drop_rate",
            "foreign_404_share",
            "odd_code_share",
            "slow_share",
        ):
            share = getattr(self, name)
            if not 0.0 <= share <= 1.0:
                raise ValueError(f"{name} must be between 0 and 1, got {share}")
        if self.rate_limit is not None and not (
            math.isfinite(self.rate_limit) and self.rate_limit > 0
        ):
            raise ValueError(f"rate_limit must be > 0 requests/s, got {self.rate_limit}")
        if self.rate_window not in RATE_WINDOWS:
            raise ValueError(f"rate_window must be one of {RATE_WINDOWS}, got {self.rate_window!r}")
        if self.rate_burst is not None and not (
            math.isfinite(self.rate_burst) and self.rate_burst >= 1
        ):
            raise ValueError(f"rate_burst must be >= 1, got {self.rate_burst}")
        if self.foreign_after < 0:
            raise ValueError(f"foreign_after must be >= 0, got {self.foreign_after}")
        if self.max_array is not None and self.max_array < 1:
            raise ValueError(f"max_array must be >= 1, got {self.max_array}")
        if self.disabled_code is not None and not self.disabled_code:
            raise ValueError("disabled_code must be a non-empty code such as 116")
        if not self.odd_code:
            raise ValueError("odd_code must be a non-empty code such as 9999")
        if not (math.isfinite(self.slow_ms) and self.slow_ms >= 0):
            raise ValueError(f"slow_ms must be a finite number >= 0, got {self.slow_ms}")
        parse_latency(self.latency)

    def to_json(self) -> dict[str, object]:
        """Return the config as JSON-ready data (known_ids sorted)."""
        data = dataclasses.asdict(self)
        if self.known_ids is not None:
            data["known_ids"] = sorted(self.known_ids)
        return data


def _as_bool(value: object) -> bool:
    if type(value) is not bool:
        raise ValueError("expected true or false")
    return value


def _as_int(value: object) -> int:
    if type(value) is not int:
        raise ValueError("expected an integer")
    return value


def _as_float(value: object) -> float:
    if type(value) not in (int, float):
        raise ValueError("expected a number")
    return float(value)  # type: ignore[arg-type]


def _as_str(value: object) -> str:
    if type(value) is not str:
        raise ValueError("expected a string")
    return value


def _as_latency(value: object) -> str:
    # A bare number is the natural way to write a fixed latency in JSON.
    if type(value) in (int, float):
        return str(value)
    return _as_str(value)


def _as_ids(value: object) -> frozenset[str]:
    if not isinstance(value, list) or not all(type(v) in (str, int) for v in value):
        raise ValueError("expected a list of IDs")
    return frozenset(str(v) for v in value)


def _optional(convert: Callable[[object], Any]) -> Callable[[object], Any]:
    return lambda value: None if value is None else convert(value)


_CONFIG_COERCERS: dict[str, Callable[[object], Any]] = {
    "client_id": _as_str,
    "client_secret": _as_str,
    "auth_status": _as_int,
    "known_ids": _optional(_as_ids),
    "known_count": _optional(_as_int),
    "unknown_share": _as_float,
    "latency": _as_latency,
    "rate_limit": _optional(_as_float),
    "rate_window": _as_str,
    "rate_burst": _optional(_as_float),
    "rate_headers": _as_bool,
    "retry_after_s": _optional(_as_float),
    "transient_error_rate": _as_float,
    "max_array": _optional(_as_int),
    "drop_rate": _as_float,
    "seed": _as_int,
    "record_history": _as_bool,
    "disabled_code": _optional(_as_str),
    "foreign_404_share": _as_float,
    "foreign_after": _as_int,
    "odd_code_share": _as_float,
    "odd_code": _as_str,
    "slow_share": _as_float,
    "slow_ms": _as_float,
}


@dataclass
class SimStats:
    """Counters of what the simulated gateway saw and answered."""

    requests: int = 0
    by_status: dict[int, int] = field(default_factory=dict)
    dropped: int = 0
    foreign_404: int = 0
    odd_code: int = 0
    slow: int = 0
    objects_received: int = 0
    contacts_applied: int = 0
    max_ids_per_request: int = 0
    # The worker must never put one ID twice in a request (coalescing promise).
    duplicate_ids_in_a_request: int = 0
    # Requests carrying an ID that another unanswered request also carries: the worker promises
    # at most one request in flight per ID. Only observable while latency keeps requests open.
    overlapping_id_requests: int = 0
    in_flight: int = 0
    max_in_flight: int = 0
    rate_limited: int = 0
    """Requests answered 429 by the hidden rate limit."""
    max_per_second: int = 0
    """The most requests that arrived within any one second (a sliding window)."""
    per_second: list[list[int]] = field(default_factory=list)
    """Per second since the first request: [requests past the login, answered 429]."""
    bytes_received: int = 0
    started_at: float = field(default_factory=time.monotonic)
    first_request_at: float | None = None
    # Time of the last answer (or drop), so (last - first) spans the whole served load.
    last_request_at: float | None = None

    def to_json(self) -> dict[str, object]:
        """Return the stats as JSON-ready data (status keys as strings)."""
        data = dataclasses.asdict(self)
        data["by_status"] = {str(k): v for k, v in sorted(self.by_status.items())}
        return data


class _Rejected(NamedTuple):
    status: int
    body: bytes


class _TokenBucket:
    """Token bucket with a burst of ``burst`` (default max(1, rate)); clock time.monotonic."""

    def __init__(self, rate: float, now: float, burst: float | None = None) -> None:
        self.rate = rate
        self.burst = burst if burst is not None else max(1.0, rate)
        self.tokens = self.burst
        self.updated = now

    def state(self, now: float) -> tuple[int, float]:
        """Whole tokens left and seconds until the bucket is full again."""
        return int(self.tokens), (self.burst - self.tokens) / self.rate

    def take(self, now: float) -> float:
        """Take one token; return 0 on success, else the seconds until one is available."""
        if now > self.updated:
            self.tokens = min(self.burst, self.tokens + (now - self.updated) * self.rate)
            self.updated = now
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return 0.0
        return (1.0 - self.tokens) / self.rate


class _SlidingWindow:
    """At most ``floor(rate)`` requests in any one-second window (a log of the last ones)."""

    def __init__(self, rate: float) -> None:
        self.rate = rate
        self.limit = max(1, math.floor(rate))
        self.times: deque[float] = deque()

    def _expire(self, now: float) -> None:
        times = self.times
        while times and now - times[0] >= 1.0:
            times.popleft()

    def take(self, now: float) -> float:
        """Count one request; 0 on success, else the seconds until the window has room."""
        self._expire(now)
        if len(self.times) < self.limit:
            self.times.append(now)
            return 0.0
        return 1.0 - (now - self.times[0])

    def state(self, now: float) -> tuple[int, float]:
        """Requests left in the window and seconds until it empties."""
        self._expire(now)
        reset = 1.0 - (now - self.times[0]) if self.times else 0.0
        return self.limit - len(self.times), reset


class Simulator:
    """State, counters and HTTP handlers of one simulated gateway."""

    def __init__(self, config: SimConfig | None = None) -> None:
        self.config = config if config is not None else SimConfig()
        self.stats = SimStats()
        self.contacts: dict[str, dict[str, object]] = {}
        self.history: dict[str, list[dict[str, object]]] = {}
        self._in_flight_ids: dict[str, int] = {}
        # Handlers sleeping out their latency. A client that gives up does not cancel them: like
        # a real server, the gateway still applies a change whose client timed out.
        self._held: set[asyncio.Task[Any]] = set()
        # Derived from config fields; refreshed lazily so direct `sim.config.x = ...` works too.
        self._latency_spec = ""
        self._latency: LatencySampler = parse_latency("0")
        self._bucket: _TokenBucket | _SlidingWindow | None = None
        self._bucket_spec: tuple[float, str, float | None] | None = None
        self._arrivals: deque[float] = deque()
        self.reset()

    def reset(self) -> None:
        """Forget all contacts, history, counters and the failed-login lock."""
        self.stats = SimStats()
        self.contacts.clear()
        self.history.clear()
        self._in_flight_ids.clear()
        self._failed_logins = 0
        self._locked = False
        self._rng = random.Random(self.config.seed)
        self._bucket = None
        self._arrivals = deque()

    def is_known(self, id_key: str) -> bool:
        """Tell whether the contact with this ID (string form) exists at the gateway."""
        cfg = self.config
        if cfg.known_ids is not None:
            return id_key in cfg.known_ids
        if cfg.known_count is not None:
            # Exactly the canonical decimal forms "1".."N": "01" or "+1" is another ID.
            return (
                id_key.isascii()
                and id_key.isdigit()
                and id_key[0] != "0"
                and int(id_key) <= cfg.known_count
            )
        share = cfg.unknown_share
        if share <= 0.0:
            return True
        return zlib.crc32(id_key.encode()) / 2**32 >= share

    def app(self) -> web.Application:
        """Build an aiohttp application serving this simulator."""
        # Large arrays are refused by max_array with 413, not by aiohttp's 1 MiB default.
        app = web.Application(client_max_size=256 * 1024 * 1024)
        app.router.add_route("PATCH", CONTACT_PATH, self._patch_contact)
        app.router.add_get("/_sim/stats", self._get_stats)
        app.router.add_get("/_sim/contacts", self._get_contacts)
        app.router.add_get("/_sim/history", self._get_history)
        app.router.add_post("/_sim/reset", self._post_reset)
        app.router.add_get("/_sim/config", self._get_config)
        app.router.add_post("/_sim/config", self._post_config)
        return app

    def update_config(self, changes: dict[str, object]) -> SimConfig:
        """Apply JSON-typed knob changes (validated as a whole) and return the new config."""
        coerced: dict[str, Any] = {}
        for name, value in changes.items():
            convert = _CONFIG_COERCERS.get(name)
            if convert is None:
                raise ValueError(f"unknown config knob: {name}")
            try:
                coerced[name] = convert(value)
            except ValueError as exc:
                raise ValueError(f"{name}: {exc}") from None
        new = dataclasses.replace(self.config, **coerced)
        self.config = new
        if "seed" in coerced:
            self._rng = random.Random(new.seed)
        return new

    # --- the API -------------------------------------------------------------------------------

    def _answer(self, status: int, body: bytes | None = None) -> web.Response:
        stats = self.stats
        stats.by_status[status] = stats.by_status.get(status, 0) + 1
        stats.last_request_at = time.monotonic()
        if body is None:
            return web.Response(status=status)
        return web.Response(status=status, body=body, content_type=_JSON)

    async def _patch_contact(self, request: web.Request) -> web.StreamResponse:
        cfg = self.config
        stats = self.stats
        rng = self._rng
        now = time.monotonic()
        stats.requests += 1
        if stats.first_request_at is None:
            stats.first_request_at = now

        if cfg.drop_rate and rng.random() < cfg.drop_rate:
            stats.dropped += 1
            stats.last_request_at = now
            transport = request.transport
            if transport is not None:
                transport.close()
            # aiohttp cannot write this to a closing transport and treats it as a client
            # disconnect; the client sees the connection closed without an answer.
            return web.Response(status=204)

        if self._locked:
            return self._answer(cfg.auth_status, _BODY_1002)
        headers = request.headers
        if (
            headers.get("X-Client-Id") != cfg.client_id
            or headers.get("X-Client-Secret") != cfg.client_secret
        ):
            self._failed_logins += 1
            if self._failed_logins >= MAX_FAILED_LOGINS:
                self._locked = True
            return self._answer(cfg.auth_status, _BODY_104)
        self._failed_logins = 0
        if cfg.disabled_code is not None:
            code = cfg.disabled_code
            return self._answer(403, _error(code, _ACCOUNT_MESSAGES.get(code, "access denied")))

        second = self._count_arrival(now)
        if cfg.rate_limit is not None:
            bucket = self._limiter(cfg, now)
            wait = bucket.take(now)
            if wait > 0.0:
                stats.rate_limited += 1
                second[1] += 1
                response = self._answer(429, _BODY_429)
                asked = cfg.retry_after_s
                response.headers["Retry-After"] = (
                    f"{asked:g}" if asked is not None else str(max(1, math.ceil(wait)))
                )
                if cfg.rate_headers:
                    self._rate_headers(response, bucket, now)
                return response

        if cfg.transient_error_rate and rng.random() < cfg.transient_error_rate:
            if rng.random() < 0.5:
                return self._answer(503, _BODY_503)
            return self._answer(400, _BODY_105)
        if (
            cfg.foreign_404_share
            and stats.requests > cfg.foreign_after
            and rng.random() < cfg.foreign_404_share
        ):
            stats.foreign_404 += 1
            stats.by_status[404] = stats.by_status.get(404, 0) + 1
            stats.last_request_at = time.monotonic()
            return web.Response(status=404, body=_FOREIGN_404, content_type="text/html")
        if cfg.odd_code_share and rng.random() < cfg.odd_code_share:
            stats.odd_code += 1
            return self._answer(400, _error(cfg.odd_code, "undocumented error"))

        if cfg.latency != self._latency_spec:
            self._latency = parse_latency(cfg.latency)
            self._latency_spec = cfg.latency
        delay = self._latency(rng)
        if cfg.slow_share and rng.random() < cfg.slow_share:
            stats.slow += 1
            delay += cfg.slow_ms / 1000.0

        body = await request.read()
        stats.bytes_received += len(body)
        # Parsed before the latency sleep (the answer still comes after it) so that the IDs of
        # the requests held open by latency are known: that is what reveals overlapping IDs.
        parsed = self._parse(body, cfg.max_array)
        if isinstance(parsed, _Rejected):
            if delay > 0.0:
                await self._hold((), delay)
            return self._answer(parsed.status, parsed.body)
        objects, keys = parsed

        stats.in_flight += 1
        if stats.in_flight > stats.max_in_flight:
            stats.max_in_flight = stats.in_flight
        try:
            if delay > 0.0:
                await self._hold(keys, delay)
        finally:
            stats.in_flight -= 1

        # From here to the answer nothing awaits: the check and the apply are atomic.
        is_known = self.is_known
        for key in keys:
            if not is_known(key):
                return self._answer(404, _BODY_404)
        contacts = self.contacts
        history = self.history if self.config.record_history else None
        for obj, key in zip(objects, keys, strict=True):
            state = contacts.get(key)
            if state is None:
                state = contacts[key] = {}
            state.update(obj)
            del state["ID"]
            if history is not None:
                history.setdefault(key, []).append(obj)
        # self.stats, not `stats`: a /_sim/reset may have replaced the counters meanwhile.
        self.stats.contacts_applied += len(objects)
        response = self._answer(204)
        if cfg.rate_headers and cfg.rate_limit is not None:
            self._rate_headers(response, self._limiter(cfg, now), time.monotonic())
        return response

    def _limiter(self, cfg: SimConfig, now: float) -> _TokenBucket | _SlidingWindow:
        """The hidden rate limit as configured now (rebuilt, full, when a knob changes)."""
        assert cfg.rate_limit is not None
        spec = (cfg.rate_limit, cfg.rate_window, cfg.rate_burst)
        bucket = self._bucket
        if bucket is None or spec != self._bucket_spec:
            if cfg.rate_window == "sliding":
                bucket = _SlidingWindow(cfg.rate_limit)
            else:
                bucket = _TokenBucket(cfg.rate_limit, now, cfg.rate_burst)
            self._bucket, self._bucket_spec = bucket, spec
        return bucket

    def _count_arrival(self, now: float) -> list[int]:
        """Count a request past the login in its second and in the sliding window; the
        second's counters ([requests, 429s])."""
        stats = self.stats
        arrivals = self._arrivals
        arrivals.append(now)
        while now - arrivals[0] >= 1.0:
            arrivals.popleft()
        if len(arrivals) > stats.max_per_second:
            stats.max_per_second = len(arrivals)
        first = stats.first_request_at if stats.first_request_at is not None else now
        index = int(now - first)
        per_second = stats.per_second
        while len(per_second) <= index:
            per_second.append([0, 0])
        per_second[index][0] += 1
        return per_second[index]

    def _rate_headers(
        self, response: web.StreamResponse, bucket: _TokenBucket | _SlidingWindow, now: float
    ) -> None:
        """The IETF draft's headers and the common X-RateLimit-* ones."""
        limit = self.config.rate_limit
        assert limit is not None
        remaining, reset_s = bucket.state(now)
        reset = max(0, math.ceil(reset_s))
        quota = f"{limit:g}"
        headers = response.headers
        headers["RateLimit-Policy"] = f"{quota};w=1"
        headers["RateLimit"] = f"limit={quota}, remaining={max(0, remaining)}, reset={reset}"
        headers["X-RateLimit-Limit"] = quota
        headers["X-RateLimit-Remaining"] = str(max(0, remaining))
        headers["X-RateLimit-Reset"] = str(reset)

    async def _hold(self, keys: Sequence[str], delay: float) -> None:
        """Sleep `delay` with `keys` registered as in flight, counting overlaps."""
        in_flight = self._in_flight_ids
        overlap = False
        for key in keys:
            count = in_flight.get(key, 0)
            if count:
                overlap = True
            in_flight[key] = count + 1
        if overlap:
            self.stats.overlapping_id_requests += 1
        task = asyncio.current_task()
        if task is not None:
            self._held.add(task)
        try:
            await asyncio.sleep(delay)
        finally:
            self._held.discard(task)
            for key in keys:
                count = in_flight.get(key, 0) - 1
                if count > 0:
                    in_flight[key] = count
                else:
                    in_flight.pop(key, None)

    def _parse(
        self, body: bytes, max_array: int | None
    ) -> _Rejected | tuple[list[dict[str, object]], list[str]]:
        """Decode and validate a PATCH body into (objects, ID keys) or a rejection."""
        if not body.strip():
            return _Rejected(400, _BODY_114)
        try:
            data = orjson.loads(body)
        except orjson.JSONDecodeError:
            return _Rejected(400, _error("139", "invalid parameters: body is not valid JSON"))
        if type(data) is dict:
            objects = [data]
        elif type(data) is list:
            objects = data
            if not objects:
                return _Rejected(400, _BODY_122)
        else:
            return _Rejected(400, _error("139", "invalid parameters: expected an object or array"))
        stats = self.stats
        count = len(objects)
        stats.objects_received += count
        if count > stats.max_ids_per_request:
            stats.max_ids_per_request = count
        if max_array is not None and count > max_array:
            return _Rejected(
                413,
                _error("payload too large", f"at most {max_array} contacts per request"),
            )
        for obj in objects:
            problem = check_contact(obj)
            if problem is not None:
                if problem[0] == "123":
                    return _Rejected(400, _BODY_123)
                return _Rejected(400, _error(*problem))
        keys = [str(obj["ID"]) for obj in objects]
        if count > 1 and len(set(keys)) != count:
            stats.duplicate_ids_in_a_request += 1
        return objects, keys

    # --- inspection (no auth: a test tool) -----------------------------------------------------

    @staticmethod
    def _json(data: object, status: int = 200) -> web.Response:
        return web.Response(status=status, body=orjson.dumps(data), content_type=_JSON)

    async def _get_stats(self, request: web.Request) -> web.Response:
        return self._json(self.stats.to_json())

    async def _get_contacts(self, request: web.Request) -> web.Response:
        id_key = request.query.get("id")
        if id_key is None:
            return self._json(self.contacts)
        state = self.contacts.get(id_key)
        if state is not None:
            return self._json(state)
        if self.is_known(id_key):
            return self._json({})
        return self._json({"error": "404", "errorMsg": "contact not found"}, 404)

    async def _get_history(self, request: web.Request) -> web.Response:
        if not self.config.record_history and not self.history:
            return self._json({"error": "record_history is off"}, 409)
        id_key = request.query.get("id")
        if id_key is None:
            return self._json(self.history)
        return self._json(self.history.get(id_key, []))

    async def _post_reset(self, request: web.Request) -> web.Response:
        self.reset()
        return self._json({"reset": True})

    async def _get_config(self, request: web.Request) -> web.Response:
        return self._json(self.config.to_json())

    async def _post_config(self, request: web.Request) -> web.Response:
        try:
            changes = orjson.loads(await request.read())
        except orjson.JSONDecodeError:
            return self._json({"error": "body is not valid JSON"}, 400)
        if type(changes) is not dict:
            return self._json({"error": "expected a JSON object of knobs"}, 400)
        try:
            new = self.update_config(changes)
        except (ValueError, TypeError) as exc:
            return self._json({"error": str(exc)}, 400)
        return self._json(new.to_json())


@asynccontextmanager
async def serve(
    sim: Simulator,
    host: str = "127.0.0.1",
    port: int = 0,
    *,
    shutdown_timeout: float = 1.0,
) -> AsyncIterator[str]:
    """Serve `sim` on host:port and yield its base URL (with the real bound port)."""
    # A short shutdown_timeout: requests held by latency must not keep a test waiting 60 s.
    runner = web.AppRunner(
        sim.app(), access_log=None, handle_signals=False, shutdown_timeout=shutdown_timeout
    )
    await runner.setup()
    try:
        site = web.TCPSite(runner, host, port)
        await site.start()
        bound_port = runner.addresses[0][1]
        url_host = f"[{host}]" if ":" in host else host
        yield f"http://{url_host}:{bound_port}"
    finally:
        # Requests still sleeping out their latency are cut short (the client sees the
        # connection close) instead of holding the shutdown for shutdown_timeout.
        await _cancel_held(sim, shutdown_timeout)
        await runner.cleanup()
        await _cancel_held(sim, shutdown_timeout)


async def _cancel_held(sim: Simulator, grace: float) -> None:
    held = list(sim._held)
    for task in held:
        task.cancel()
    if held:
        await asyncio.wait(held, timeout=grace)
