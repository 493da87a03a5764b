"""The response classifier: an HTTP status and body become what to do next (DESIGN 4-6)."""

from __future__ import annotations

import datetime
import email.utils
import enum
import math
from dataclasses import dataclass

import orjson

AUTH_CODES: dict[str, str] = {
    "104": "invalid credentials",
    "116": "access disabled",
    "200": "IP address not allowed",
    "1002": "too many failed logins",
    "1403": "no access",
}
"""Error codes that stop all sending: retrying them would lock the account (1002)."""

TRANSIENT_CODES = frozenset({"105"})
TRANSIENT_STATUSES = frozenset({408, 425, 429})


class Action(enum.Enum):
    """What the engine does with a request's outcome."""

    APPLIED = "applied"
    ISOLATE = "isolate"
    """Refused as a whole because of some change in it: split to find the culprits."""
    SHRINK = "shrink"
    """Too large for the API: split in halves and lower the batch ceiling."""
    RETRY = "retry"
    FATAL_AUTH = "fatal_auth"
    FATAL = "fatal"


@dataclass(frozen=True, slots=True)
class Verdict:
    """The decision about one response (or one failed attempt to get one)."""

    action: Action
    status: int | None = None
    error: str | None = None
    detail: str | None = None
    retry_after_s: float | None = None
    reason: str | None = None
    """For ISOLATE: the dead-letter reason a lone culprit gets, ``not_found`` or ``rejected``."""

    def describe(self) -> str:
        """A one-line human account, e.g. for the fatal exit message."""
        parts = [f"HTTP {self.status}" if self.status is not None else "no response"]
        if self.error:
            name = AUTH_CODES.get(self.error)
            parts.append(f"error {self.error}" + (f" ({name})" if name else ""))
        if self.detail:
            parts.append(self.detail)
        return ": ".join(parts)


def parse_error_body(body: bytes) -> tuple[str | None, str | None]:
    """The API's ``error`` code and ``errorMsg`` from a JSON error body, when there is one."""
    if not body:
        return None, None
    try:
        obj = orjson.loads(body)
    except orjson.JSONDecodeError:
        text = body[:200].decode("utf-8", errors="replace").strip()
        return None, text or None
    if not isinstance(obj, dict):
        return None, None
    error = obj.get("error")
    detail = obj.get("errorMsg")
    return (
        None if error is None else str(error),
        None if detail is None else str(detail),
    )


def parse_retry_after(value: str | None, now_wall: datetime.datetime) -> float | None:
    """Seconds to wait from a ``Retry-After`` header (delta-seconds or an HTTP date)."""
    if value is None:
        return None
    value = value.strip()
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError, IndexError):
            return None
        if when.tzinfo is None:
            when = when.replace(tzinfo=datetime.UTC)
        return max(0.0, (when - now_wall).total_seconds())
    if not math.isfinite(seconds) or seconds < 0:  # not delta-seconds (RFC 9110): ignore
        return None
    return seconds


def classify(
    status: int, body: bytes, retry_after: str | None, now_wall: datetime.datetime
) -> Verdict:
    """Decide what a response means for the request's changes."""
    if 200 <= status < 300:
        return Verdict(Action.APPLIED, status)
    error, detail = parse_error_body(body)
    wait = parse_retry_after(retry_after, now_wall)
    if status in (401, 403) or (400 <= status < 500 and error in AUTH_CODES):
        return Verdict(Action.FATAL_AUTH, status, error, detail)
    if status >= 500 or status in TRANSIENT_STATUSES or error in TRANSIENT_CODES:
        return Verdict(Action.RETRY, status, error, detail, wait)
    if status == 404:
        return Verdict(Action.ISOLATE, status, error, detail, reason="not_found")
    if status == 413:
        return Verdict(Action.SHRINK, status, error, detail, reason="rejected")
    if 400 <= status < 500:
        return Verdict(Action.ISOLATE, status, error, detail, reason="rejected")
    return Verdict(Action.FATAL, status, error, detail or "unexpected response status")


def classify_failure(exc: BaseException) -> Verdict:
    """A request that got no response (timeout, refused or dropped connection) is retried."""
    name = type(exc).__name__
    text = str(exc)
    return Verdict(Action.RETRY, None, None, f"{name}: {text}" if text else name)
