"""The start-up check decides: an answer to ``[]``, or no answer, becomes an outcome."""

from __future__ import annotations

import socket
import ssl

import aiohttp
import orjson
import pytest
from aiohttp.client_reqrep import ConnectionKey

from tests.unit.factories import NOW_WALL
from worker.preflight import Finding, Outcome, judge_failure, judge_response
from worker.sender import Response


def answer(status: int, code: str | None = None, retry_after: str | None = None) -> Finding:
    """The finding for an API answer with this status and error code."""
    body = b"" if code is None else orjson.dumps({"error": code, "errorMsg": "text"})
    return judge_response(Response(status, body, retry_after), NOW_WALL)


def key(host: str = "api.example.com", port: int = 443) -> ConnectionKey:
    """What aiohttp's connector errors carry: the host and port they failed on."""
    return ConnectionKey(host, port, True, True, None, None, None, None)


class TestAnswers:
    """The API checks credentials first, so an answer to ``[]`` says whether they pass."""

    @pytest.mark.parametrize(("status", "code"), [(400, "122"), (400, "114"), (422, "122")])
    def test_nothing_to_apply_means_accepted(self, status: int, code: str) -> None:
        """Error 122 (no contacts sent) or 114 (empty request): past the credentials."""
        finding = answer(status, code)
        assert (Outcome.ACCEPTED, None) == (finding.outcome, finding.exit_code)

    def test_2xx_means_accepted(self) -> None:
        """An API that takes ``[]`` as a no-op also took the credentials."""
        assert Outcome.ACCEPTED == answer(204).outcome

    @pytest.mark.parametrize(
        ("status", "code"),
        [(401, "104"), (400, "104"), (403, "116"), (403, "200"), (400, "1002"), (403, "1403")]
        + [(401, None), (403, None)],
    )
    def test_refused_credentials_exit_3(self, status: int, code: str | None) -> None:
        """401, 403, or an account code under any 4xx: exit 3, the message names the code,
        in the engine's words."""
        finding = answer(status, code)
        assert (Outcome.REFUSED, 3) == (finding.outcome, finding.exit_code)
        assert finding.message.startswith("the API refused the credentials or access: ")
        assert f"HTTP {status}" in finding.message
        if code is not None:
            assert f"error {code}" in finding.message

    @pytest.mark.parametrize(
        ("status", "code"), [(503, None), (500, "server error"), (429, None), (400, "105")]
    )
    def test_transient_answers_start_anyway(self, status: int, code: str | None) -> None:
        """A bad hour at the API does not stop the start: the engine retries."""
        finding = answer(status, code, retry_after="5")
        assert (Outcome.UNCERTAIN, None) == (finding.outcome, finding.exit_code)
        assert finding.message.endswith("starting anyway")

    @pytest.mark.parametrize("status", [404, 405])
    @pytest.mark.parametrize(
        "body", [b"", b"<html><body><h1>404 Not Found</h1></body></html>", b'{"error":"404"}']
    )
    def test_wrong_path_exits_2(self, status: int, body: bytes) -> None:
        """404 or 405 to ``[]``: an empty array names no ID that could be unknown, so the URL
        is wrong (a path off, a proxy's page): exit 2 naming --api-url, before anything is
        read; a run would otherwise dead-letter the whole input as not_found."""
        response = Response(status, body, None)
        finding = judge_response(response, NOW_WALL, "http://h:1/api/v1/contact")
        assert (Outcome.MISCONFIGURED, 2) == (finding.outcome, finding.exit_code)
        assert "--api-url" in finding.message
        assert "http://h:1/api/v1/contact" in finding.message
        if body.startswith(b"<html>"):
            assert "404 Not Found" in finding.message

    def test_other_rejection_starts_with_a_warning(self) -> None:
        """Any other 4xx (here 139) passed the credentials check: start, say what came."""
        finding = answer(400, "139")
        assert Outcome.UNCERTAIN == finding.outcome
        assert "error 139" in finding.message


class TestFailures:
    """No answer at all: a misconfiguration exits 2, a passing trouble starts anyway."""

    def test_a_name_that_does_not_exist_exits_2(self) -> None:
        """EAI_NONAME: the host name in --api-url does not exist."""
        gai = socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        finding = judge_failure(aiohttp.ClientConnectorDNSError(key("api.nope.invalid"), gai))
        assert (Outcome.MISCONFIGURED, 2) == (finding.outcome, finding.exit_code)
        assert "'api.nope.invalid'" in finding.message and "--api-url" in finding.message

    def test_a_dns_server_in_trouble_starts_anyway(self) -> None:
        """EAI_AGAIN (temporary failure in name resolution) may pass: start, retry."""
        gai = socket.gaierror(socket.EAI_AGAIN, "Temporary failure in name resolution")
        finding = judge_failure(aiohttp.ClientConnectorDNSError(key(), gai))
        assert Outcome.UNCERTAIN == finding.outcome

    def test_a_certificate_that_fails_verification_exits_2(self) -> None:
        """The message names the host and what is wrong with its certificate."""
        error = ssl.SSLCertVerificationError(1, "certificate verify failed")
        error.verify_message = "self-signed certificate"
        finding = judge_failure(aiohttp.ClientConnectorCertificateError(key(), error))
        assert (Outcome.MISCONFIGURED, 2) == (finding.outcome, finding.exit_code)
        assert "api.example.com:443" in finding.message
        assert "self-signed certificate" in finding.message

    def test_a_failed_handshake_exits_2(self) -> None:
        """A TLS error other than a cut connection (e.g. plain HTTP on the port) exits 2."""
        error = ssl.SSLError(1, "[SSL: WRONG_VERSION_NUMBER] wrong version number")
        finding = judge_failure(aiohttp.ClientConnectorSSLError(key(), error))
        assert (Outcome.MISCONFIGURED, 2) == (finding.outcome, finding.exit_code)
        assert "WRONG_VERSION_NUMBER" in finding.message

    def test_a_handshake_cut_short_starts_anyway(self) -> None:
        """An EOF in the handshake is the network or a busy server: start, retry."""
        error = ssl.SSLEOFError(8, "EOF occurred in violation of protocol")
        assert (
            Outcome.UNCERTAIN
            == judge_failure(aiohttp.ClientConnectorSSLError(key(), error)).outcome
        )

    @pytest.mark.parametrize(
        "exc",
        [
            aiohttp.ClientConnectorError(key(), ConnectionRefusedError(111, "Connection refused")),
            TimeoutError(),
            aiohttp.ServerDisconnectedError(),
        ],
    )
    def test_no_answer_starts_anyway(self, exc: BaseException) -> None:
        """Refused connection, timeout, dropped connection: the API may be down for a while."""
        finding = judge_failure(exc)
        assert (Outcome.UNCERTAIN, None) == (finding.outcome, finding.exit_code)
        assert finding.message.startswith("no answer from the API (")
