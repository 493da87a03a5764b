"""The simulated gateway over real sockets on 127.0.0.1, with aiohttp as the client."""

from __future__ import annotations

import argparse
import asyncio
import os
import select
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest

from worker.sim import cli
from worker.sim.gateway import (
    SimConfig,
    Simulator,
    _TokenBucket,
    check_contact,
    parse_latency,
    serve,
)

pytestmark = pytest.mark.anyio

AUTH = {"X-Client-Id": "demo", "X-Client-Secret": "demo-secret"}
REPO_ROOT = Path(__file__).resolve().parents[2]


class Gateway:
    """A running simulator and a client session pointed at it."""

    def __init__(self, sim: Simulator, url: str, session: aiohttp.ClientSession) -> None:
        self.sim = sim
        self.url = url
        self.session = session

    async def patch(
        self, payload: Any = None, *, raw: bytes | None = None, headers: dict[str, str] = AUTH
    ) -> tuple[int, Any, aiohttp.ClientResponse]:
        """PATCH /v1/contact; return (status, decoded JSON body or None, response)."""
        data = raw if raw is not None else orjson.dumps(payload)
        async with self.session.patch(
            self.url + "/v1/contact",
            data=data,
            headers={**headers, "Content-Type": "application/json"},
        ) as resp:
            body = await resp.read()
            return resp.status, (orjson.loads(body) if body else None), resp

    async def get(self, path: str) -> tuple[int, Any]:
        """GET an inspection endpoint; return (status, decoded JSON)."""
        async with self.session.get(self.url + path) as resp:
            return resp.status, orjson.loads(await resp.read())

    async def post(self, path: str, payload: Any = None) -> tuple[int, Any]:
        """POST JSON to an inspection endpoint; return (status, decoded JSON)."""
        async with self.session.post(self.url + path, data=orjson.dumps(payload)) as resp:
            return resp.status, orjson.loads(await resp.read())


@asynccontextmanager
async def gateway(config: SimConfig | None = None) -> AsyncIterator[Gateway]:
    sim = Simulator(config)
    async with serve(sim) as url, aiohttp.ClientSession() as session:
        yield Gateway(sim, url, session)


# --- success and atomicity -----------------------------------------------------------------------


async def test_single_object_is_applied_with_204() -> None:
    async with gateway() as gw:
        assert gw.url.startswith("http://127.0.0.1:")
        status, body, resp = await gw.patch({"ID": "7", "extra2": "Building 2B"})
        assert (status, body) == (204, None)
        status, body, _ = await gw.patch({"ID": 7, "lastname": "Lee"})
        assert status == 204
        assert gw.sim.contacts == {"7": {"extra2": "Building 2B", "lastname": "Lee"}}
        assert await gw.get("/_sim/contacts?id=7") == (200, gw.sim.contacts["7"])
        stats = gw.sim.stats
        assert stats.requests == 2 and stats.by_status == {204: 2}
        assert stats.contacts_applied == 2 and stats.bytes_received > 0


async def test_array_is_applied_in_order_later_objects_win() -> None:
    async with gateway(SimConfig(record_history=True)) as gw:
        status, _, _ = await gw.patch(
            [
                {"ID": "1", "firstname": "Ann", "unsubscribed": False},
                {"ID": 2, "phone": "+32470123456", "birthday": "1990-02-28"},
                {"ID": "1", "firstname": "Anna", "extra8": ""},
            ]
        )
        assert status == 204
        assert gw.sim.contacts == {
            "1": {"firstname": "Anna", "unsubscribed": False, "extra8": ""},
            "2": {"phone": "+32470123456", "birthday": "1990-02-28"},
        }
        # The worker must never send one ID twice in a request: the simulator counts it.
        assert gw.sim.stats.duplicate_ids_in_a_request == 1
        assert gw.sim.stats.max_ids_per_request == 3
        status, history = await gw.get("/_sim/history?id=1")
        assert status == 200
        assert [h["firstname"] for h in history] == ["Ann", "Anna"]


async def test_one_unknown_id_refuses_the_whole_request() -> None:
    async with gateway(SimConfig(known_count=10)) as gw:
        status, body, _ = await gw.patch(
            [
                {"ID": "1", "lastname": "A"},
                {"ID": "11", "lastname": "B"},
                {"ID": 2, "lastname": "C"},
            ]
        )
        assert status == 404
        assert body == {"error": "404", "errorMsg": "contact not found"}
        assert gw.sim.contacts == {}
        assert gw.sim.stats.contacts_applied == 0
        assert gw.sim.stats.objects_received == 3
        assert (await gw.patch({"ID": "10", "lastname": "D"}))[0] == 204


def test_is_known_modes() -> None:
    by_count = Simulator(SimConfig(known_count=100))
    assert by_count.is_known("1") and by_count.is_known("100")
    assert not any(by_count.is_known(k) for k in ("0", "101", "01", "+5", "abc", "²", "-1"))
    by_ids = Simulator(SimConfig(known_ids=frozenset({"a", "42"}), known_count=5))
    assert by_ids.is_known("a") and by_ids.is_known("42") and not by_ids.is_known("1")
    by_share = Simulator(SimConfig(unknown_share=0.25))
    unknown = sum(not by_share.is_known(str(i)) for i in range(20_000))
    assert 0.22 < unknown / 20_000 < 0.28
    # Stable: the same ID is always judged the same way.
    assert [by_share.is_known(str(i)) for i in range(100)] == [
        Simulator(SimConfig(unknown_share=0.25)).is_known(str(i)) for i in range(100)
    ]


# --- validation ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "code", "field"),
    [
        (b"", "114", None),
        (b"  \n", "114", None),
        (b'{"ID": "1", "lastname": "Lee"', "139", None),
        (b'"just a string"', "139", None),
        (b"[]", "122", None),
        (b'{"lastname": "Lee"}', "123", None),
        (b'{"ID": null, "lastname": "Lee"}', "123", None),
        (b'[{"ID": "1", "lastname": "Lee"}, 5]', "123", None),
        (b'{"ID": "1", "nickname": "Bob"}', "139", "nickname"),
        (b'{"ID": "1", "birthday": "1990-02-30"}', "139", "birthday"),
        (b'{"ID": "1", "birthday": "1990-2-3"}', "139", "birthday"),
        (b'{"ID": "1", "unsubscribed": "yes"}', "139", "unsubscribed"),
        (b'{"ID": "1", "groupid": 12}', "139", "groupid"),
        (b'{"ID": "1", "extra9": "x"}', "139", "extra9"),
        (b'{"ID": "1", "firstname": null}', "139", "firstname"),
        (b'{"ID": true, "lastname": "Lee"}', "139", "ID"),
        (b'{"ID": "", "lastname": "Lee"}', "139", "ID"),
        (b'{"ID": 1.5, "lastname": "Lee"}', "139", "ID"),
    ],
)
async def test_validation_errors(raw: bytes, code: str, field: str | None) -> None:
    async with gateway() as gw:
        status, body, resp = await gw.patch(raw=raw)
        assert status == 400
        assert resp.content_type == "application/json"
        assert body["error"] == code
        assert body["errorMsg"]
        if field is not None:
            assert field in body["errorMsg"]
        assert gw.sim.contacts == {}


def test_check_contact_accepts_every_documented_field() -> None:
    full = {
        "ID": 123,
        "phone": "+32470123456",
        "groupid": "4",
        "firstname": "Ann",
        "lastname": "Lee",
        "birthday": "2000-02-29",
        **{f"extra{i}": f"x{i}" for i in range(1, 9)},
        "unsubscribed": True,
    }
    assert check_contact(full) is None
    assert check_contact({"ID": "only-an-id"}) is None
    assert check_contact({"ID": "1", "birthday": "2001-02-29"}) is not None


async def test_array_longer_than_max_array_gets_413() -> None:
    async with gateway(SimConfig(max_array=3)) as gw:
        objs = [{"ID": str(i), "lastname": "x"} for i in range(1, 5)]
        status, body, _ = await gw.patch(objs)
        assert status == 413
        assert body["error"] == "payload too large"
        assert (await gw.patch(objs[:3]))[0] == 204


# --- auth and account --------------------------------------------------------------------------


@pytest.mark.parametrize("auth_status", [401, 400])
async def test_bad_credentials_get_104_under_the_configured_status(auth_status: int) -> None:
    async with gateway(SimConfig(auth_status=auth_status)) as gw:
        bad = {"X-Client-Id": "demo", "X-Client-Secret": "wrong"}
        status, body, _ = await gw.patch({"ID": "1", "lastname": "x"}, headers=bad)
        assert (status, body) == (auth_status, {"error": "104", "errorMsg": "invalid credentials"})
        status, body, _ = await gw.patch({"ID": "1", "lastname": "x"}, headers={})
        assert (status, body["error"]) == (auth_status, "104")
        assert gw.sim.contacts == {}


async def test_ten_failed_logins_lock_the_account_until_reset() -> None:
    async with gateway() as gw:
        bad = {"X-Client-Id": "demo", "X-Client-Secret": "guess"}
        for _ in range(10):
            assert (await gw.patch({"ID": "1", "lastname": "x"}, headers=bad))[1]["error"] == "104"
        for headers in (bad, AUTH):
            status, body, _ = await gw.patch({"ID": "1", "lastname": "x"}, headers=headers)
            assert (status, body["error"]) == (401, "1002")
        assert await gw.post("/_sim/reset") == (200, {"reset": True})
        assert (await gw.patch({"ID": "1", "lastname": "x"}))[0] == 204


async def test_a_good_login_resets_the_failure_count() -> None:
    async with gateway() as gw:
        bad = {"X-Client-Id": "nobody", "X-Client-Secret": "demo-secret"}
        for _ in range(9):
            await gw.patch({"ID": "1", "lastname": "x"}, headers=bad)
        assert (await gw.patch({"ID": "1", "lastname": "x"}))[0] == 204
        for _ in range(9):
            await gw.patch({"ID": "1", "lastname": "x"}, headers=bad)
        assert (await gw.patch({"ID": "1", "lastname": "y"}))[0] == 204


@pytest.mark.parametrize("code", ["116", "200", "1403"])
async def test_disabled_account_gets_403_with_the_code(code: str) -> None:
    async with gateway(SimConfig(disabled_code=code)) as gw:
        status, body, _ = await gw.patch({"ID": "1", "lastname": "x"})
        assert (status, body["error"]) == (403, code)
        assert body["errorMsg"]
        # Bad credentials are still reported as such.
        bad = {"X-Client-Id": "demo", "X-Client-Secret": "no"}
        assert (await gw.patch({"ID": "1"}, headers=bad))[1]["error"] == "104"
        assert gw.sim.contacts == {}


# --- faults --------------------------------------------------------------------------------------


async def test_rate_limit_answers_429_with_retry_after() -> None:
    # A slow rate keeps the test deterministic: the bucket refills one token in 2 s.
    async with gateway(SimConfig(rate_limit=0.5)) as gw:
        assert (await gw.patch({"ID": "1", "lastname": "x"}))[0] == 204
        status, body, resp = await gw.patch({"ID": "2", "lastname": "y"})
        assert status == 429
        assert resp.headers["Retry-After"] in ("1", "2")
        assert body["error"] and body["errorMsg"]
        assert gw.sim.contacts == {"1": {"lastname": "x"}}
        # Auth failures do not spend tokens; they are checked first.
        bad = {"X-Client-Id": "demo", "X-Client-Secret": "no"}
        assert (await gw.patch({"ID": "1"}, headers=bad))[0] == 401


def test_token_bucket_bursts_max_of_one_and_rate() -> None:
    bucket = _TokenBucket(5.0, now=100.0)
    assert [bucket.take(100.0) for _ in range(5)] == [0.0] * 5
    assert bucket.take(100.0) == pytest.approx(0.2)
    assert bucket.take(100.2) == 0.0
    assert bucket.take(200.0) == 0.0 and bucket.tokens == 4.0  # refill capped at the burst
    slow = _TokenBucket(0.1, now=0.0)
    assert slow.take(0.0) == 0.0
    assert slow.take(1.0) == pytest.approx(9.0)


async def test_rate_limit_retry_after_is_rounded_up_to_whole_seconds() -> None:
    async with gateway(SimConfig(rate_limit=0.25)) as gw:
        assert (await gw.patch({"ID": "1", "lastname": "x"}))[0] == 204
        status, _, resp = await gw.patch({"ID": "1", "lastname": "x"})
        assert status == 429
        assert 3 <= int(resp.headers["Retry-After"]) <= 4


async def test_transient_errors_at_rate_one_apply_nothing() -> None:
    async with gateway(SimConfig(transient_error_rate=1.0)) as gw:
        seen = set()
        for _ in range(30):
            status, body, _ = await gw.patch({"ID": "1", "lastname": "x"})
            seen.add((status, body["error"]))
        assert seen == {(503, "server error"), (400, "105")}
        assert gw.sim.contacts == {}


async def test_dropped_connection_is_a_client_connection_error() -> None:
    async with gateway(SimConfig(drop_rate=1.0)) as gw:
        with pytest.raises(aiohttp.ClientConnectionError):
            await gw.patch({"ID": "1", "lastname": "x"})
        assert gw.sim.stats.dropped == 1 and gw.sim.stats.requests == 1
        assert gw.sim.contacts == {} and gw.sim.stats.by_status == {}


async def test_latency_delays_answers_and_reveals_overlapping_ids() -> None:
    async with gateway(SimConfig(latency="150")) as gw:
        started = time.monotonic()
        results = await asyncio.gather(
            gw.patch({"ID": "1", "lastname": "a"}),
            gw.patch([{"ID": 1, "lastname": "b"}, {"ID": "2", "lastname": "c"}]),
            gw.patch({"ID": "3", "lastname": "d"}),
        )
        elapsed = time.monotonic() - started
        assert [r[0] for r in results] == [204, 204, 204]
        assert 0.15 <= elapsed < 1.0  # concurrent, not serialised
        stats = gw.sim.stats
        assert stats.overlapping_id_requests == 1
        assert stats.max_in_flight == 3 and stats.in_flight == 0
        # Validation errors wait for the latency too.
        started = time.monotonic()
        assert (await gw.patch(raw=b""))[0] == 400
        assert time.monotonic() - started >= 0.15


async def test_a_request_whose_client_timed_out_is_still_applied() -> None:
    # Like a real server: the client giving up does not undo the change (at-least-once hazard).
    async with gateway(SimConfig(latency="200")) as gw:
        with pytest.raises(asyncio.TimeoutError):
            async with gw.session.patch(
                gw.url + "/v1/contact",
                data=b'{"ID": "5", "lastname": "late"}',
                headers=AUTH,
                timeout=aiohttp.ClientTimeout(total=0.05),
            ):
                pass
        assert gw.sim.contacts == {}
        await asyncio.sleep(0.4)
        assert gw.sim.contacts == {"5": {"lastname": "late"}}


async def test_shutdown_does_not_wait_for_requests_held_by_latency() -> None:
    sim = Simulator(SimConfig(latency="5000"))
    outcome: list[BaseException] = []

    async def held(session: aiohttp.ClientSession, url: str) -> None:
        try:
            async with session.patch(url + "/v1/contact", data=b'{"ID": "1"}', headers=AUTH):
                pass
        except aiohttp.ClientError as exc:
            outcome.append(exc)

    started = time.monotonic()
    async with aiohttp.ClientSession() as session:
        async with serve(sim) as url:
            task = asyncio.create_task(held(session, url))
            await asyncio.sleep(0.1)
        await task
    assert time.monotonic() - started < 1.0
    assert len(outcome) == 1 and isinstance(outcome[0], aiohttp.ClientConnectionError)
    assert sim.contacts == {} and sim.stats.in_flight == 0


def test_parse_latency() -> None:
    import random

    rng = random.Random(3)
    assert parse_latency("0")(rng) == 0.0
    assert parse_latency("20")(rng) == pytest.approx(0.02)
    assert all(0.01 <= parse_latency("uniform:10:50")(rng) <= 0.05 for _ in range(100))
    draws = [parse_latency("exp:20")(rng) for _ in range(5000)]
    assert sum(draws) / len(draws) == pytest.approx(0.02, rel=0.1)
    draws = sorted(parse_latency("lognormal:20:0.5")(rng) for _ in range(5001))
    assert draws[2500] == pytest.approx(0.02, rel=0.1)
    for bad in ("", "fast", "-5", "uniform:50:10", "uniform:1", "exp:x", "lognormal:0:1", "nan"):
        with pytest.raises(ValueError, match="latency"):
            parse_latency(bad)


def test_config_rejects_bad_knobs() -> None:
    for bad in (
        {"auth_status": 200},
        {"drop_rate": 1.5},
        {"unknown_share": -0.1},
        {"rate_limit": 0.0},
        {"max_array": 0},
        {"latency": "soon"},
        {"known_count": -1},
        {"disabled_code": ""},
    ):
        with pytest.raises(ValueError):
            SimConfig(**bad)


# --- inspection endpoints ------------------------------------------------------------------------


async def test_config_endpoint_changes_knobs_at_runtime() -> None:
    async with gateway() as gw:
        status, cfg = await gw.post("/_sim/config", {"transient_error_rate": 1.0})
        assert status == 200 and cfg["transient_error_rate"] == 1.0
        assert (await gw.patch({"ID": "1", "lastname": "x"}))[0] in (400, 503)
        await gw.post("/_sim/config", {"transient_error_rate": 0, "client_secret": "other"})
        assert (await gw.patch({"ID": "1", "lastname": "x"}))[1]["error"] == "104"
        headers = {"X-Client-Id": "demo", "X-Client-Secret": "other"}
        assert (await gw.patch({"ID": "1", "lastname": "x"}, headers=headers))[0] == 204
        status, cfg = await gw.post("/_sim/config", {"known_ids": ["1", 2], "latency": 5})
        assert status == 200 and cfg["known_ids"] == ["1", "2"] and cfg["latency"] == "5"
        assert gw.sim.config.known_ids == frozenset({"1", "2"})
        assert (await gw.get("/_sim/config"))[1] == cfg
        for bad in ({"nope": 1}, {"drop_rate": 2}, {"seed": "x"}, {"record_history": 1}, [1]):
            status, body = await gw.post("/_sim/config", bad)
            assert status == 400 and body["error"]
        assert gw.sim.config.drop_rate == 0.0


async def test_stats_contacts_history_and_reset_endpoints() -> None:
    async with gateway(SimConfig(known_count=5)) as gw:
        status, body = await gw.get("/_sim/history?id=1")
        assert status == 409 and "record_history" in body["error"]
        await gw.post("/_sim/config", {"record_history": True})
        for name in ("a", "b", "c"):
            await gw.patch([{"ID": "1", "lastname": name}, {"ID": "2", "extra1": name}])
        await gw.patch({"ID": "9", "lastname": "never"})
        status, stats = await gw.get("/_sim/stats")
        assert status == 200
        assert stats["requests"] == 4 and stats["by_status"] == {"204": 3, "404": 1}
        assert stats["contacts_applied"] == 6 and stats["objects_received"] == 7
        assert stats["first_request_at"] <= stats["last_request_at"]
        status, history = await gw.get("/_sim/history?id=1")
        assert [h["lastname"] for h in history] == ["a", "b", "c"]
        assert (await gw.get("/_sim/contacts"))[1] == {"1": {"lastname": "c"}, "2": {"extra1": "c"}}
        assert await gw.get("/_sim/contacts?id=3") == (200, {})
        assert (await gw.get("/_sim/contacts?id=9"))[0] == 404
        await gw.post("/_sim/reset")
        assert gw.sim.contacts == {} and gw.sim.history == {}
        assert (await gw.get("/_sim/stats"))[1]["requests"] == 0


# --- command line --------------------------------------------------------------------------------


def _parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    cli.configure_parser(parser)
    return parser.parse_args(argv)


@pytest.mark.parametrize(
    "argv",
    [["--latency", "soon"], ["--drop-rate", "2"], ["--rate-limit", "0"], ["--port", "70000"]],
)
def test_cli_bad_knob_is_a_usage_error(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(_parse(argv)) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.startswith("simulate: ")


def test_cli_missing_known_file_is_a_usage_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main(_parse(["--known-file", str(tmp_path / "none.txt")])) == 2
    assert "known-file" in capsys.readouterr().err


def test_cli_serves_until_sigterm(tmp_path: Path) -> None:
    known = tmp_path / "known.txt"
    known.write_text("17\n\nabc\n")
    argv = ["--port", "0", "--known-file", str(known), "--client-secret", "s3"]
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    with subprocess.Popen(
        [sys.executable, "-m", "worker.sim.cli", *argv],
        cwd=REPO_ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    ) as proc:
        try:
            assert proc.stdout is not None
            ready, _, _ = select.select([proc.stdout], [], [], 15)
            assert ready, "the simulator did not report its address"
            line = proc.stdout.readline()
            assert line.startswith("listening on http://127.0.0.1:")
            url = line.split()[-1]
            request = urllib.request.Request(
                url + "/v1/contact",
                data=b'[{"ID": 17, "lastname": "Lee"}, {"ID": "abc", "unsubscribed": true}]',
                method="PATCH",
                headers={"X-Client-Id": "demo", "X-Client-Secret": "s3"},
            )
            with urllib.request.urlopen(request, timeout=10) as resp:
                assert resp.status == 204
            with urllib.request.urlopen(url + "/_sim/contacts", timeout=10) as resp:
                assert orjson.loads(resp.read()) == {
                    "17": {"lastname": "Lee"},
                    "abc": {"unsubscribed": True},
                }
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=15) == 0
            assert proc.stdout.read() == ""
            assert proc.stderr is not None and proc.stderr.read() == ""
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


# --- the hidden rate limit (issue 12) ------------------------------------------------------------


async def test_sliding_window_allows_r_in_any_second() -> None:
    """``rate_window = sliding``: R requests at once pass, the next is 429 until the first
    leaves the window; counted per second and as the most in any one second."""
    async with gateway(SimConfig(rate_limit=3, rate_window="sliding")) as gw:
        for i in range(3):
            assert 204 == (await gw.patch({"ID": str(i), "lastname": "x"}))[0]
        status, _, resp = await gw.patch({"ID": "9", "lastname": "x"})
        assert 429 == status and resp.headers["Retry-After"] == "1"
        stats = gw.sim.stats
        assert (1, 4) == (stats.rate_limited, stats.max_per_second)  # arrivals, 429s too
        assert [[4, 1]] == stats.per_second


async def test_bucket_burst_and_fixed_retry_after() -> None:
    """``rate_burst`` sizes the bucket; ``retry_after_s`` fixes the 429's Retry-After."""
    async with gateway(SimConfig(rate_limit=1, rate_burst=2, retry_after_s=3600)) as gw:
        assert 204 == (await gw.patch({"ID": "1", "lastname": "x"}))[0]
        assert 204 == (await gw.patch({"ID": "2", "lastname": "x"}))[0]
        status, _, resp = await gw.patch({"ID": "3", "lastname": "x"})
        assert 429 == status and "3600" == resp.headers["Retry-After"]


async def test_rate_headers() -> None:
    """``rate_headers``: the IETF draft's RateLimit-Policy and RateLimit, and X-RateLimit-*,
    on 2xx and on 429; what the worker reads from them is the limit and the exhaustion."""
    from worker.core.adapt import read_hints

    async with gateway(SimConfig(rate_limit=2, rate_window="sliding", rate_headers=True)) as gw:
        _, _, first = await gw.patch({"ID": "1", "lastname": "x"})
        assert "2;w=1" == first.headers["RateLimit-Policy"]
        assert "1" == first.headers["X-RateLimit-Remaining"]
        await gw.patch({"ID": "2", "lastname": "x"})
        status, _, refused = await gw.patch({"ID": "3", "lastname": "x"})
        assert 429 == status
        hints = read_hints(dict(refused.headers), time.time())
        assert 2.0 == hints.policy_rate
        assert hints.exhausted_for_s is not None and 0 < hints.exhausted_for_s <= 1


async def test_rate_knobs_over_post_config() -> None:
    """The knobs can be set at run time; a bad window is refused with 400."""
    async with gateway() as gw:
        status, body = await gw.post(
            "/_sim/config",
            {"rate_limit": 5, "rate_window": "sliding", "rate_headers": True, "retry_after_s": 2},
        )
        assert 200 == status and "sliding" == body["rate_window"]
        status, body = await gw.post("/_sim/config", {"rate_window": "fixed"})
        assert 400 == status and "rate_window" in body["error"]
