"""The response classifier: status and body become what to do next (DESIGN 4-6)."""

from __future__ import annotations

import datetime
import email.utils

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.unit.factories import NOT_FOUND_BODY, NOW_WALL, REJECTED_BODY
from worker.core.classify import (
    AUTH_CODES,
    Action,
    Verdict,
    classify,
    classify_failure,
    parse_error_body,
    parse_retry_after,
)


def error_body(code: str | int, message: str = "nope") -> bytes:
    """An API error body."""
    return orjson.dumps({"error": code, "errorMsg": message})


def http_date(when: datetime.datetime) -> str:
    """``when`` as an HTTP date (IMF-fixdate)."""
    return email.utils.format_datetime(when, usegmt=True)


class TestClassifySuccess:
    """2xx means the whole request was applied."""

    @pytest.mark.parametrize("status", [200, 201, 204, 299])
    def test_2xx_is_applied(self, status: int) -> None:
        """Any 2xx is applied, whatever the body."""
        assert Verdict(Action.APPLIED, status) == classify(status, b"garbage", "5", NOW_WALL)


class TestClassifyAuth:
    """Auth and account failures stop everything (DESIGN 6)."""

    @pytest.mark.parametrize("status", [401, 403])
    def test_401_and_403_are_fatal_auth(self, status: int) -> None:
        """401 and 403 are fatal auth, with or without a body."""
        assert Action.FATAL_AUTH == classify(status, b"", None, NOW_WALL).action
        assert Action.FATAL_AUTH == classify(status, b"<html>", None, NOW_WALL).action

    @pytest.mark.parametrize("code", sorted(AUTH_CODES))
    @pytest.mark.parametrize("status", [400, 404, 413, 422, 429])
    def test_auth_codes_under_any_4xx_are_fatal_auth(self, status: int, code: str) -> None:
        """Every auth code under any 4xx is fatal auth (never retried, never isolated)."""
        expected = Verdict(Action.FATAL_AUTH, status, code, "nope")
        assert expected == classify(status, error_body(code), "1", NOW_WALL)

    @pytest.mark.parametrize("code", sorted(AUTH_CODES))
    def test_numeric_auth_codes_count_too(self, code: str) -> None:
        """A code sent as a JSON number is read as its string form."""
        assert Action.FATAL_AUTH == classify(400, error_body(int(code)), None, NOW_WALL).action

    def test_describe_names_the_code(self) -> None:
        """The fatal message names the status, the code and what it means."""
        verdict = classify(400, error_body("1002", "locked"), None, NOW_WALL)
        assert "HTTP 400: error 1002 (too many failed logins): locked" == verdict.describe()

    def test_auth_code_under_5xx_is_retried(self) -> None:
        """Auth codes are fatal under a 4xx; a 5xx is the server's trouble and is retried."""
        assert Action.RETRY == classify(503, error_body("104"), None, NOW_WALL).action


class TestClassifyIsolate:
    """A batch refused because of some change in it is split to find the culprits (DESIGN 4)."""

    def test_404_is_not_found(self) -> None:
        """404 isolates, and a lone culprit is dead-lettered as not_found."""
        expected = Verdict(Action.ISOLATE, 404, "404", "Contact not found", reason="not_found")
        assert expected == classify(404, NOT_FOUND_BODY, None, NOW_WALL)

    @pytest.mark.parametrize(
        "body",
        [b"", b"<html><h1>404: Not Found</h1></html>", b"404: Not Found", b"[]", b'{"a": 1}'],
    )
    def test_404_that_is_not_the_apis_error_is_foreign(self, body: bytes) -> None:
        """A 404 without the API's JSON error (a proxy's page, a wrong URL) cannot be about
        unknown IDs: it stops sending instead of dead-lettering (DESIGN 8)."""
        verdict = classify(404, body, None, NOW_WALL)
        assert (Action.FOREIGN, 404) == (verdict.action, verdict.status)
        assert verdict.detail is not None and "--api-url" in verdict.detail

    @pytest.mark.parametrize("status", [400, 404, 422])
    @pytest.mark.parametrize("code", ["114", "122"])
    def test_empty_request_codes_on_a_batch_are_foreign(self, status: int, code: str) -> None:
        """ "Empty request" answered to a request that carried contacts: something between us
        and the API lost the body, no verdict on any change."""
        assert Action.FOREIGN == classify(status, error_body(code), None, NOW_WALL).action

    @pytest.mark.parametrize("code", ["139", "123"])
    def test_400_with_a_change_error_is_rejected(self, code: str) -> None:
        """400 with 139 (invalid parameters) or 123 (object without ID) isolates as rejected,
        a verdict taken as certain."""
        expected = Verdict(Action.ISOLATE, 400, code, "nope", reason="rejected")
        assert expected == classify(400, error_body(code), None, NOW_WALL)
        assert classify(400, error_body(code), None, NOW_WALL).certain

    def test_400_rejected_keeps_the_api_message(self) -> None:
        """The API's code and message are kept for the dead letter."""
        verdict = classify(400, REJECTED_BODY, None, NOW_WALL)
        assert ("139", "Missing or invalid parameters") == (verdict.error, verdict.detail)

    @pytest.mark.parametrize("status", [400, 409, 422])
    @pytest.mark.parametrize("code", ["9999", "rejected", "140"])
    def test_undocumented_codes_isolate_without_certainty(self, status: int, code: str) -> None:
        """An API error with a code not documented as a verdict on a change isolates as
        rejected, but uncertain: nothing is inferred and a lone change must see it repeat."""
        verdict = classify(status, error_body(code), None, NOW_WALL)
        assert (Action.ISOLATE, "rejected", False) == (
            verdict.action,
            verdict.reason,
            verdict.certain,
        )

    @pytest.mark.parametrize("status", [400, 409, 422])
    @pytest.mark.parametrize("body", [b"", b"<html>Bad Request</html>"])
    def test_other_4xx_without_the_apis_error_are_foreign(self, status: int, body: bytes) -> None:
        """A 4xx whose body is not the API's JSON error is no verdict on a change."""
        assert Action.FOREIGN == classify(status, body, None, NOW_WALL).action


class TestClassifyRetry:
    """Transient failures are retried, honouring Retry-After (DESIGN 5)."""

    @pytest.mark.parametrize("status", [400, 404, 422])
    def test_code_105_is_retried(self, status: int) -> None:
        """Code 105 (server issues, try later) is retried under any 4xx."""
        expected = Verdict(Action.RETRY, status, "105", "nope", None)
        assert expected == classify(status, error_body("105"), None, NOW_WALL)

    @pytest.mark.parametrize("status", [500, 502, 503, 504, 599])
    def test_5xx_is_retried(self, status: int) -> None:
        """Every 5xx is retried; one that is not the API's own answer (here empty) may have
        been applied upstream all the same."""
        expected = Verdict(Action.RETRY, status, maybe_applied=True)
        assert expected == classify(status, b"", None, NOW_WALL)

    @pytest.mark.parametrize(("status", "late"), [(500, False), (503, False), (502, True)])
    def test_the_apis_own_5xx_was_not_applied(self, status: int, late: bool) -> None:
        """The API's own JSON 500/503 says it did not apply it; a gateway's 502/504 cannot."""
        verdict = classify(status, error_body("server error"), None, NOW_WALL)
        assert (Action.RETRY, late) == (verdict.action, verdict.maybe_applied)

    @pytest.mark.parametrize("status", [408, 425, 429])
    def test_transient_4xx_are_retried(self, status: int) -> None:
        """408, 425 and 429 are retried; after a 408 the request may still be applied."""
        expected = Verdict(Action.RETRY, status, maybe_applied=status == 408)
        assert expected == classify(status, b"", None, NOW_WALL)

    def test_429_with_retry_after_seconds(self) -> None:
        """Retry-After in seconds is carried in the verdict."""
        verdict = classify(429, b"", "7", NOW_WALL)
        assert Verdict(Action.RETRY, 429, retry_after_s=7.0) == verdict

    def test_429_with_retry_after_http_date(self) -> None:
        """Retry-After as an HTTP date is measured from the wall clock given."""
        header = http_date(NOW_WALL + datetime.timedelta(seconds=90))
        assert 90.0 == classify(429, b"", header, NOW_WALL).retry_after_s

    def test_503_with_retry_after(self) -> None:
        """Retry-After counts on a 503 as well."""
        assert 2.5 == classify(503, b"", "2.5", NOW_WALL).retry_after_s

    def test_retry_after_is_ignored_when_not_retrying(self) -> None:
        """A Retry-After on a 404 means nothing: the verdict carries no wait."""
        assert None is classify(404, b"", "30", NOW_WALL).retry_after_s


class TestClassifyOther:
    """413 shrinks; anything unexpected is fatal."""

    def test_413_shrinks(self) -> None:
        """413 means too large: shrink; a lone entry too large is rejected."""
        expected = Verdict(Action.SHRINK, 413, reason="rejected")
        assert expected == classify(413, b"", None, NOW_WALL)

    @pytest.mark.parametrize("status", [0, 100, 101, 301, 304, 399])
    def test_unexpected_status_is_fatal(self, status: int) -> None:
        """A status below 200 or a 3xx (redirects are not followed) is fatal and says so."""
        verdict = classify(status, b"", None, NOW_WALL)
        assert (Action.FATAL, "unexpected response status") == (verdict.action, verdict.detail)

    def test_describe_without_response(self) -> None:
        """A verdict without a status says there was no response."""
        assert (
            "no response: ConnectionResetError"
            == classify_failure(ConnectionResetError()).describe()
        )


class TestNonJsonBodies:
    """Error bodies that are not the API's JSON still classify by status."""

    @pytest.mark.parametrize(
        ("body", "detail"),
        [
            (b"<html><body>Bad Gateway</body></html>", "<html><body>Bad Gateway</body></html>"),
            (b"  Service Unavailable \n", "Service Unavailable"),
            (b"", None),
            (b"   ", None),
            (b"\xff\xfe", "\ufffd\ufffd"),
        ],
    )
    def test_text_body_becomes_the_detail(self, body: bytes, detail: str | None) -> None:
        """A body that is not JSON is kept (trimmed) as the detail, with no code."""
        expected = Verdict(Action.RETRY, 502, None, detail, maybe_applied=True)
        assert expected == classify(502, body, None, NOW_WALL)

    def test_long_text_body_is_cut(self) -> None:
        """Only the first 200 bytes of a text body are kept."""
        assert "x" * 200 == parse_error_body(b"x" * 5000)[1]

    @pytest.mark.parametrize("body", [b"[]", b'"oops"', b"42", b"null"])
    def test_json_that_is_not_an_object(self, body: bytes) -> None:
        """JSON that is not an object gives no code and no detail."""
        assert (None, None) == parse_error_body(body)

    def test_object_without_error(self) -> None:
        """An object without ``error`` gives no code; errorMsg alone is the detail."""
        assert (None, "hm") == parse_error_body(b'{"errorMsg": "hm"}')

    def test_html_404_is_foreign(self) -> None:
        """A proxy's HTML 404 stops sending; its text is quoted in the detail."""
        verdict = classify(404, b"<h1>Not Found</h1>", None, NOW_WALL)
        assert Action.FOREIGN == verdict.action
        assert verdict.detail is not None and "<h1>Not Found</h1>" in verdict.detail

    @settings(max_examples=300, deadline=None)
    @given(
        st.integers(100, 599), st.binary(max_size=64), st.one_of(st.none(), st.text(max_size=40))
    )
    def test_any_response_classifies(
        self, status: int, body: bytes, retry_after: str | None
    ) -> None:
        """Any status, body and header give a verdict without raising; waits are never negative."""
        verdict = classify(status, body, retry_after, NOW_WALL)
        assert status == verdict.status
        assert verdict.retry_after_s is None or verdict.retry_after_s >= 0


class TestParseRetryAfter:
    """Retry-After is delta-seconds or an HTTP date; anything unusable is ignored."""

    @pytest.mark.parametrize(
        ("value", "seconds"),
        [("0", 0.0), ("5", 5.0), (" 12 ", 12.0), ("1.5", 1.5), ("3600", 3600.0)],
    )
    def test_delta_seconds(self, value: str, seconds: float) -> None:
        """Seconds are read as seconds (surrounding space ignored)."""
        assert seconds == parse_retry_after(value, NOW_WALL)

    def test_http_date_in_the_future(self) -> None:
        """A future date is the seconds until then."""
        header = http_date(NOW_WALL + datetime.timedelta(minutes=2))
        assert 120.0 == parse_retry_after(header, NOW_WALL)

    def test_http_date_in_the_past_is_zero(self) -> None:
        """A date already past means no wait, never a negative one."""
        header = http_date(NOW_WALL - datetime.timedelta(hours=1))
        assert 0.0 == parse_retry_after(header, NOW_WALL)

    def test_http_date_without_zone_is_utc(self) -> None:
        """A date with ``-0000`` (no zone information) is taken as UTC."""
        assert 30.0 == parse_retry_after("Thu, 26 Nov 2026 14:00:30 -0000", NOW_WALL)

    def test_http_date_with_an_offset(self) -> None:
        """A date with a numeric offset is converted."""
        assert 30.0 == parse_retry_after("Thu, 26 Nov 2026 15:00:30 +0100", NOW_WALL)

    @pytest.mark.parametrize("value", [None, "", "   ", "-1", "nan", "soon", "Thu, 99 Foo 2026"])
    def test_unusable_values_are_ignored(self, value: str | None) -> None:
        """Absent, empty, negative, NaN and unparseable values mean no Retry-After."""
        assert None is parse_retry_after(value, NOW_WALL)

    @pytest.mark.parametrize("value", ["inf", "Infinity", "1e999"])
    def test_non_finite_seconds_are_ignored(self, value: str) -> None:
        """A non-finite delta is no delta-seconds (RFC 9110: 1*DIGIT) and is ignored, like NaN."""
        assert None is parse_retry_after(value, NOW_WALL)

    @settings(max_examples=200, deadline=None)
    @given(st.integers(0, 10**6))
    def test_any_delta_seconds(self, seconds: int) -> None:
        """Any delta-seconds reads back as itself."""
        assert float(seconds) == parse_retry_after(str(seconds), NOW_WALL)

    @settings(max_examples=200, deadline=None)
    @given(st.integers(0, 10**7))
    def test_any_future_http_date(self, seconds: int) -> None:
        """Any whole-second HTTP date ahead of now reads back as the seconds until then."""
        header = http_date(NOW_WALL + datetime.timedelta(seconds=seconds))
        assert float(seconds) == parse_retry_after(header, NOW_WALL)


class TestClassifyFailure:
    """No response at all (timeout, refused or dropped connection) is retried."""

    def test_exception_with_message(self) -> None:
        """The detail names the exception and its message."""
        expected = Verdict(Action.RETRY, None, None, "TimeoutError: read timed out")
        assert expected.detail == classify_failure(TimeoutError("read timed out")).detail

    def test_a_timeout_may_have_been_applied(self) -> None:
        """A request given up at its timeout may still be applied by the API (item 4)."""
        assert classify_failure(TimeoutError("read timed out")).maybe_applied

    def test_a_refused_connection_was_never_sent(self) -> None:
        """No connection, no request: nothing can be applied late."""
        assert not classify_failure(ConnectionRefusedError()).maybe_applied

    def test_aiohttp_connector_errors_were_never_sent(self) -> None:
        """aiohttp's could-not-connect errors (by class, whatever the subclass)."""
        import aiohttp
        from aiohttp.client_reqrep import ConnectionKey

        key = ConnectionKey("h", 1, False, True, None, None, None)
        exc = aiohttp.ClientConnectorError(key, OSError(111, "refused"))
        assert not classify_failure(exc).maybe_applied
        assert classify_failure(aiohttp.ServerDisconnectedError()).maybe_applied

    def test_exception_without_message(self) -> None:
        """An exception without a message is named alone."""
        assert Verdict(Action.RETRY, None, None, "ConnectionRefusedError") == classify_failure(
            ConnectionRefusedError()
        )
