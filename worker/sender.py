"""The HTTP edge: one pooled aiohttp session that PATCHes request bodies to the API."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import TracebackType

import aiohttp

from worker import __version__
from worker.config import Secret
from worker.core.adapt import RATE_HEADERS

SEND_ERRORS: tuple[type[BaseException], ...] = (aiohttp.ClientError, TimeoutError, OSError)
"""What a request can fail with short of a response: all transient."""

PROBE_BODY = b"[]"
"""A request that applies nothing: the API still checks the credentials (error 122 after)."""


@dataclass(frozen=True, slots=True)
class Response:
    """What came back: status, the body (only read for errors), the Retry-After header."""

    status: int
    body: bytes
    retry_after: str | None
    rate_headers: Mapping[str, str] = field(default_factory=dict)
    """The API's rate-limit headers, where it sends them (``--rate auto`` reads them)."""


def _rate_headers(headers: Mapping[str, str]) -> Mapping[str, str]:
    return {name: headers[name] for name in RATE_HEADERS if name in headers}


class Sender:
    """PATCHes JSON bodies to ``{api_url}/v1/contact`` over one keep-alive connection pool."""

    def __init__(
        self,
        api_url: str,
        client_id: str,
        client_secret: Secret,
        *,
        concurrency: int = 8,
        timeout_s: float = 30.0,
    ) -> None:
        self.url = api_url.rstrip("/") + "/v1/contact"
        self._headers = {
            "X-Client-Id": client_id,
            "X-Client-Secret": client_secret.reveal(),
            "Content-Type": "application/json",
            "User-Agent": f"contact-worker/{__version__}",
        }
        self._concurrency = concurrency
        self._timeout = aiohttp.ClientTimeout(total=timeout_s)
        self._session: aiohttp.ClientSession | None = None

    def __repr__(self) -> str:
        return f"Sender(url={self.url!r})"

    async def __aenter__(self) -> Sender:
        connector = aiohttp.TCPConnector(
            limit=self._concurrency, limit_per_host=self._concurrency, keepalive_timeout=30.0
        )
        self._session = aiohttp.ClientSession(
            connector=connector, timeout=self._timeout, headers=self._headers
        )
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def patch(self, body: bytes) -> Response:
        """Send one request; raises one of :data:`SEND_ERRORS` when no response came."""
        assert self._session is not None, "use Sender as an async context manager"
        async with self._session.patch(self.url, data=body) as resp:
            status = resp.status
            data = b"" if status == 204 else await resp.read()
            return Response(
                status, data, resp.headers.get("Retry-After"), _rate_headers(resp.headers)
            )

    async def probe(self, timeout_s: float) -> Response:
        """Send the empty array ``[]``, which applies nothing (the start-up check); may raise
        one of :data:`SEND_ERRORS`."""
        assert self._session is not None, "use Sender as an async context manager"
        timeout = aiohttp.ClientTimeout(total=timeout_s)
        async with self._session.patch(self.url, data=PROBE_BODY, timeout=timeout) as resp:
            return Response(resp.status, await resp.read(), resp.headers.get("Retry-After"))
