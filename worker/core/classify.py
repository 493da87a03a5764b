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
MAYBE_APPLIED_STATUSES = frozenset({408, 502, 504})
"""Transient answers after which the request may still be applied (a timeout on the way)."""

DATA_CODES: dict[str, str] = {
    "123": "object without ID",
    "139": "missing or invalid parameters",
}
"""The documented verdicts on a change's data: a lone change answered so is rejected at once."""

EMPTY_CODES = frozenset({"114", "122"})
""""Empty request" and "no contacts sent": never a verdict on a change we sent (a proxy or a
wrong URL that dropped the body)."""

WRONG_URL_STATUSES = frozenset({404, 405})
"""Answers to ``PATCH []`` that mean nothing at that URL takes contacts (start-up check)."""


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
    FOREIGN = "foreign"
    """An error answer that cannot be the API's verdict on the changes sent (a proxy's or a
    web server's page, a wrong URL): stop sending; dead-letter and acknowledge nothing for it."""


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
    certain: bool = True
    """For ISOLATE: False when the error code is not documented as a verdict on a change, so a
    lone change is dead-lettered only once the same answer repeats, and nothing is inferred."""
    maybe_applied: bool = False
    """For RETRY without a response: the request may have reached the API and may still be
    applied late (a timeout, a connection lost after sending)."""

    def describe(self) -> str:
        """A one-line human account, e.g. for the fatal exit message."""
        parts = [f"HTTP {self.status}" if self.status is not None else "no response"]
        if self.error:
            name = AUTH_CODES.get(self.error)
            parts.append(f"error {self.error}" + (f" ({name})" if name else ""))
        if self.detail:
            parts.append(self.detail)
        return ": ".join(parts)


_NOT_JSON = object()


def _decode(body: bytes) -> object:
    """The body's JSON value, or ``_NOT_JSON``."""
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError:
        return _NOT_JSON


def _is_api_error(obj: object) -> bool:
    """Whether a decoded body is the API's JSON error (``{"error": ..., "errorMsg": ...}``)."""
    return isinstance(obj, dict) and ("error" in obj or "errorMsg" in obj)


def _error_fields(body: bytes, obj: object) -> tuple[str | None, str | None]:
    if obj is _NOT_JSON:
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


def parse_error_body(body: bytes) -> tuple[str | None, str | None]:
    """The API's ``error`` code and ``errorMsg`` from a JSON error body, when there is one."""
    if not body:
        return None, None
    return _error_fields(body, _decode(body))


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
    """Decide what a response means for the request's changes (DESIGN 4-6 and 8)."""
    if 200 <= status < 300:
        return Verdict(Action.APPLIED, status)
    # Decoded once: its fields, and whether it is the API's own error at all.
    obj = _decode(body) if body else None
    error, detail = (None, None) if obj is None else _error_fields(body, obj)
    api_error = _is_api_error(obj)
    wait = parse_retry_after(retry_after, now_wall)
    if status in (401, 403) or (400 <= status < 500 and error in AUTH_CODES):
        return Verdict(Action.FATAL_AUTH, status, error, detail)
    if status >= 500 or status in TRANSIENT_STATUSES or error in TRANSIENT_CODES:
        # A gateway's timeout or bad gateway, or a 5xx that is not the API's own answer: the
        # API may have received the request and may still apply it.
        late = status in MAYBE_APPLIED_STATUSES or (status >= 500 and not api_error)
        return Verdict(Action.RETRY, status, error, detail, wait, maybe_applied=late)
    if status == 413:  # a proxy's own 413 page is as true as the API's: the body is too large
        return Verdict(Action.SHRINK, status, error, detail, reason="rejected")
    if 400 <= status < 500:
        if not api_error:
            why = "not the API's JSON error"
            return Verdict(Action.FOREIGN, status, error, _foreign(why, detail))
        if error in EMPTY_CODES:
            why = f"error {error}: the API saw no contacts in a request that carried some"
            return Verdict(Action.FOREIGN, status, error, _foreign(why, detail))
        if status == 404:
            return Verdict(Action.ISOLATE, status, error, detail, reason="not_found")
        certain = error in DATA_CODES
        return Verdict(Action.ISOLATE, status, error, detail, reason="rejected", certain=certain)
    return Verdict(Action.FATAL, status, error, detail or "unexpected response status")


def _foreign(why: str, detail: str | None) -> str:
    shown = f" ({detail[:120]!r})" if detail else ""
    return (
        f"an answer that cannot be the API's verdict on the changes sent: {why}{shown};"
        " is --api-url (SMSGW_API_URL) right, or does a proxy answer for the API?"
    )


def classify_failure(exc: BaseException) -> Verdict:
    """A request that got no response (timeout, refused or dropped connection) is retried.

    Unless the connection was never made, the API may have received the request and may
    still apply it after we gave up on it (``maybe_applied``).
    """
    name = type(exc).__name__
    text = str(exc)
    detail = f"{name}: {text}" if text else name
    # The HTTP edge's "could not connect" errors (aiohttp's ClientConnectorError and kin),
    # named rather than imported: the core does no I/O and imports no client.
    never_sent = isinstance(exc, ConnectionRefusedError) or any(
        cls.__name__ == "ClientConnectorError" for cls in type(exc).__mro__
    )
    return Verdict(Action.RETRY, None, None, detail, maybe_applied=not never_sent)
