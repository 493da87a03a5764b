"""Start-up checks: one harmless request before anything is read (docs/operations.md).

The API has only ``PATCH /v1/contact``, and the empty array ``[]`` applies nothing. The API
checks credentials first, so its answer tells them apart: accepted (error 122 "no contacts sent"
or 114 "empty request") or refused (401, 403, or an account code under any 4xx, as the
classifier says). Getting no answer tells the rest: a host name that does not resolve, a TLS
handshake or certificate that fails. The decisions here are pure; :func:`check_api` only sends
the one request and logs what was decided.

- refused credentials or access: exit 3; one request only, never a loop (1002 locks the account)
- a host name that does not exist, failed TLS, or 404/405 to ``PATCH []`` (nothing at that URL
  takes contacts: a wrong path, or a proxy's page; ``[]`` holds no ID that could be unknown):
  exit 2, a configuration error
- no answer, a transient answer (429, 5xx, 105), an unexpected one: a warning, and the run
  starts anyway: the engine retries without limit, the API may be having a bad hour
"""

from __future__ import annotations

import datetime
import enum
import socket
import ssl
from collections.abc import Callable
from dataclasses import dataclass

import aiohttp
import structlog

from worker.config import redact_uri
from worker.core.classify import WRONG_URL_STATUSES, Action, classify, classify_failure
from worker.errors import EXIT_AUTH, EXIT_USAGE, ApiRefused, UsageError, WorkerError
from worker.limiter import RateLimiter
from worker.sender import SEND_ERRORS, Response, Sender

log = structlog.get_logger("worker.preflight")

PROBE_TIMEOUT_S = 10.0
"""The most the check waits (with --request-timeout if lower): a hung DNS cannot stall start-up."""

ACCEPTED_CODES = frozenset({"114", "122"})
"""Answers to ``[]`` past the credentials check: empty request, no contacts sent."""

_NO_SUCH_NAME = frozenset(
    code
    for code in (getattr(socket, "EAI_NONAME", None), getattr(socket, "EAI_NODATA", None))
    if code is not None
)
"""getaddrinfo errors that say the name does not exist (EAI_AGAIN and the like may pass)."""

_TRANSIENT_TLS = (ssl.SSLEOFError, ssl.SSLZeroReturnError, ssl.SSLSyscallError)
"""A handshake cut short by the network or a busy server, not a TLS misconfiguration."""

_API_URL = "check --api-url (SMSGW_API_URL)"


class Outcome(enum.Enum):
    """What the check found, and so whether the run starts."""

    ACCEPTED = "accepted"
    """The API took the credentials: start."""
    UNCERTAIN = "uncertain"
    """No answer, or a transient or unexpected one: warn and start; the engine retries."""
    REFUSED = "refused"
    """The API refused the credentials or the account's access: exit 3."""
    MISCONFIGURED = "misconfigured"
    """The API host cannot be reached as configured (DNS name, TLS): exit 2."""


_EXIT_CODES = {Outcome.REFUSED: EXIT_AUTH, Outcome.MISCONFIGURED: EXIT_USAGE}


@dataclass(frozen=True, slots=True)
class Finding:
    """The decision about the check's answer (or its failure to get one)."""

    outcome: Outcome
    message: str
    status: int | None = None
    error: str | None = None
    retry_after_s: float | None = None
    """The API's ``Retry-After`` with a transient answer: the engine starts paused that long."""

    @property
    def exit_code(self) -> int | None:
        """The exit code of a run that must not start; None to start."""
        return _EXIT_CODES.get(self.outcome)

    @property
    def refusal(self) -> WorkerError | None:
        """The error that stops a run that must not start (its message this finding's);
        None to start."""
        if self.outcome is Outcome.REFUSED:
            return ApiRefused(self.message)
        if self.outcome is Outcome.MISCONFIGURED:
            return UsageError(self.message)
        return None


def judge_response(response: Response, now_wall: datetime.datetime, url: str = "") -> Finding:
    """Decide what the API's answer to ``[]`` says about the credentials."""
    verdict = classify(response.status, response.body, response.retry_after, now_wall)
    status, error = verdict.status, verdict.error
    if verdict.action is Action.FATAL_AUTH:
        # The engine's words for the same failure: scripts and people see one message.
        message = f"the API refused the credentials or access: {verdict.describe()}"
        return Finding(Outcome.REFUSED, message, status, error)
    if verdict.action is Action.RETRY:
        message = f"the API is not available now ({verdict.describe()}): starting anyway"
        return Finding(Outcome.UNCERTAIN, message, status, error, verdict.retry_after_s)
    if verdict.action is Action.APPLIED or error in ACCEPTED_CODES:
        return Finding(Outcome.ACCEPTED, "the API accepted the credentials", status, error)
    if status in WRONG_URL_STATUSES:
        # An empty array names no ID, so this cannot be "unknown ID": the URL is wrong.
        shown = _shown_body(response.body)
        message = (
            f"HTTP {status} to PATCH [] at {redact_uri(url)}: nothing there takes"
            f" contacts{shown}; {_API_URL}: the base URL, without /v1/contact"
        )
        return Finding(Outcome.MISCONFIGURED, message, status, error)
    message = f"unexpected answer to an empty request ({verdict.describe()}): starting anyway"
    return Finding(Outcome.UNCERTAIN, message, status, error)


def _shown_body(body: bytes) -> str:
    text = " ".join(body[:100].decode("utf-8", errors="replace").split())
    return f" (answer: {text!r})" if text else ""


def judge_failure(exc: BaseException) -> Finding:
    """Decide what a failure to get any answer says: a bad host name or TLS, or a bad hour."""
    if isinstance(exc, aiohttp.ClientConnectorDNSError):
        if exc.os_error.errno in _NO_SUCH_NAME:
            reason = exc.os_error.strerror or str(exc.os_error)
            message = f"cannot resolve the API host {exc.host!r} ({reason}): {_API_URL}"
            return Finding(Outcome.MISCONFIGURED, message)
    elif isinstance(exc, aiohttp.ClientConnectorCertificateError):
        cert_error = exc.certificate_error
        reason = getattr(cert_error, "verify_message", None) or str(cert_error)
        message = (
            f"the TLS certificate of the API host {exc.host}:{exc.port} failed verification:"
            f" {reason}; {_API_URL}, or trust the CA that issued it (SSL_CERT_FILE)"
        )
        return Finding(Outcome.MISCONFIGURED, message)
    elif isinstance(exc, aiohttp.ClientConnectorSSLError) and not isinstance(
        exc.os_error, _TRANSIENT_TLS
    ):
        message = (
            f"TLS with the API host {exc.host}:{exc.port} failed: {exc.os_error}; "
            f"does it speak HTTPS there? {_API_URL}"
        )
        return Finding(Outcome.MISCONFIGURED, message)
    detail = classify_failure(exc).detail
    return Finding(Outcome.UNCERTAIN, f"no answer from the API ({detail}): starting anyway")


async def check_api(
    sender: Sender,
    *,
    request_timeout_s: float = PROBE_TIMEOUT_S,
    wall_clock: Callable[[], datetime.datetime] = lambda: datetime.datetime.now(datetime.UTC),
    limiter: RateLimiter | None = None,
) -> Finding:
    """Send ``[]`` once and decide; reads and acks nothing, and never retries. The request
    counts against ``limiter`` (the engine's): --rate counts every request."""
    if limiter is not None:
        await limiter.acquire()
    try:
        response = await sender.probe(min(request_timeout_s, PROBE_TIMEOUT_S))
    except SEND_ERRORS as exc:
        finding = judge_failure(exc)
    else:
        finding = judge_response(response, wall_clock(), sender.url)
    fields = {"url": redact_uri(sender.url), "status": finding.status, "error": finding.error}
    if finding.outcome is Outcome.ACCEPTED:
        log.info("api check passed", **fields)
    elif finding.outcome is Outcome.UNCERTAIN:
        log.warning("api check inconclusive", outcome=finding.message, **fields)
    else:
        log.error("api check failed: not starting", outcome=finding.message, **fields)
    return finding
