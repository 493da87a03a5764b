"""Start-up checks as a user meets them: `contact-worker run` against hosts that fail to start.

Before it reads anything the worker sends the API one ``[]`` (nothing to apply): refused
credentials exit 3, a host name that does not exist or TLS that fails exit 2, an API that is
down or having a bad hour is warned about and the run starts anyway (docs/operations.md,
"Start-up checks").
"""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import signal
import socket
import ssl
import subprocess
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from tests.cli.test_cli import BIN, SECRET, Gateway, api_env, events, run, worker_env
from tests.cli.test_cli_inputs import REDIS, redis_cli
from tests.engine.harness import expected_state, write_lines
from tests.engine.test_engine import stream
from worker.sim.gateway import SimConfig, Simulator

WORKER = Path(__file__).resolve().parents[2] / "worker"


def event_names(stderr: str) -> list[str]:
    """The names of the JSON log events a run wrote, in order."""
    return [e["event"] for e in events(stderr)]


def free_port() -> int:
    """A port nothing listens on (bound, then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


def env_for(url: str, tmp_path: Path, **extra: str) -> dict[str, str]:
    """The variables of :func:`worker_env` for an API at ``url``, no CA bundle inherited."""
    return api_env(url, tmp_path, drop=("SSL_",), **extra)


def wait_for_event(proc: subprocess.Popen[str], name: str) -> list[str]:
    """Read the worker's stderr up to the event ``name``; the lines read (the test's timeout
    bounds the wait)."""
    assert proc.stderr is not None
    lines = []
    for line in proc.stderr:
        lines.append(line)
        if line.startswith("{") and json.loads(line)["event"] == name:
            return lines
    raise AssertionError(f"the worker exited without {name!r}:\n{''.join(lines)}")


@pytest.fixture
def source(tmp_path: Path) -> list[str]:
    """A jsonl: source of 300 changes with a checkpoint file: the args of `run`."""
    write_lines(tmp_path / "in.jsonl", stream(300, 100))
    return ["--source", f"jsonl:{tmp_path / 'in.jsonl'}", "--checkpoint", str(tmp_path / "cp")]


class TestRefusedCredentials:
    @pytest.mark.parametrize(
        ("secret", "disabled", "words"),
        [
            ("wrong-secret-value", None, "HTTP 401: error 104 (invalid credentials)"),
            (SECRET, "116", "HTTP 403: error 116 (access disabled)"),
        ],
    )
    def test_exit_3_after_one_request_with_nothing_read(
        self,
        tmp_path: Path,
        source: list[str],
        secret: str,
        disabled: str | None,
        words: str,
    ) -> None:
        """Wrong credentials or a disabled account: exit 3 naming the code, in the engine's
        words, after exactly one request (one failed login, never a loop); the engine never
        started, so nothing was read and the checkpoint was never written."""
        gw = Gateway("--known-count", "100")
        try:
            if disabled:
                gw.configure(disabled_code=disabled)
            result = run(source, worker_env(gw, tmp_path, SMSGW_CLIENT_SECRET=secret))
            stats = gw.get("/_sim/stats")
        finally:
            gw.stop()
        assert 3 == result.returncode, result.stderr
        assert f"the API refused the credentials or access: {words}" in result.stderr
        assert 1 == stats["requests"] and 0 == stats["objects_received"]
        assert not (tmp_path / "cp").exists()
        names = event_names(result.stderr)
        assert "api check failed: not starting" in names
        assert "starting" not in names and "summary" not in names
        assert "wrong-secret-value" not in result.stderr

    def test_access_revoked_after_the_check_still_exits_3(self, tmp_path: Path) -> None:
        """The check is no promise for later: access refused mid-run stops the engine with
        the same exit code and words."""
        write_lines(tmp_path / "in.jsonl", stream(20, 10))
        gw = Gateway("--known-count", "100")
        try:
            proc = subprocess.Popen(
                [BIN, "run", "--source", f"jsonl:{tmp_path / 'in.jsonl'}", "--follow"],
                env=worker_env(gw, tmp_path),
                stderr=subprocess.PIPE,
                text=True,
            )
            lines = wait_for_event(proc, "starting")
            while gw.get("/_sim/stats")["contacts_applied"] < 10:
                time.sleep(0.05)
            gw.configure(disabled_code="1403")
            with open(tmp_path / "in.jsonl", "a") as more:
                more.write(json.dumps({"ID": "1", "lastname": "Late"}) + "\n")
            _, rest = proc.communicate(timeout=60)
        finally:
            gw.stop()
        stderr = "".join(lines) + rest
        assert 3 == proc.returncode, stderr
        assert "the API refused the credentials or access: HTTP 403: error 1403" in stderr
        assert "auth failure: stopping" in event_names(stderr)

    @pytest.mark.slow
    def test_a_redis_stream_is_not_even_read(self, tmp_path: Path) -> None:
        """With a consumer group, refused credentials leave the group exactly as it was:
        nothing delivered to the worker, nothing pending."""
        stream_name = f"cli_{uuid.uuid4().hex[:12]}"
        uri = f"{REDIS}?stream={stream_name}&consumer=preflight"
        gw = Gateway("--known-count", "100")
        try:
            data = b"".join(json.dumps(c).encode() + b"\n" for c in stream(50, 20))
            enq = subprocess.run(
                [BIN, "enqueue", "--to", uri], input=data, capture_output=True, timeout=60
            )
            assert 0 == enq.returncode, enq.stderr
            env = worker_env(gw, tmp_path, SMSGW_CLIENT_SECRET="wrong")
            del env["WORKER_DLQ"]
            result = run(["--source", uri], env)
            assert 3 == result.returncode, result.stderr
            assert 1 == gw.get("/_sim/stats")["requests"]
            info = redis_cli("XINFO", "GROUPS", stream_name).splitlines()
            group = dict(zip(info[::2], info[1::2], strict=True))
            assert ("0", "0-0") == (group["pending"], group["last-delivered-id"])
            assert "50" == redis_cli("XLEN", stream_name)
        finally:
            gw.stop()
            redis_cli("DEL", stream_name, f"{stream_name}:dead")


class TestUnreachableHost:
    def test_a_host_name_that_does_not_exist_exits_2(
        self, tmp_path: Path, source: list[str]
    ) -> None:
        """A host name that does not resolve (``.invalid`` never does, RFC 6761) is a
        configuration error: exit 2 naming the host and the setting, nothing read."""
        env = env_for("https://api.contact-worker.invalid", tmp_path)
        result = run(source, env)
        assert 2 == result.returncode, result.stderr
        assert "cannot resolve the API host 'api.contact-worker.invalid'" in result.stderr
        assert "--api-url" in result.stderr
        assert not (tmp_path / "cp").exists()
        assert "starting" not in event_names(result.stderr)


# -- TLS: the simulated gateway behind a certificate made for the test ---------------------------


def make_certificate(directory: Path, name: str, alt_name: str) -> tuple[Path, Path]:
    """A self-signed certificate (its own CA) for ``alt_name`` (e.g. ``IP:127.0.0.1``)."""
    cert, key = directory / f"{name}.pem", directory / f"{name}.key"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1"]
        + ["-nodes", "-keyout", str(key), "-out", str(cert), "-days", "2"]
        + ["-subj", f"/CN={name}", "-addext", f"subjectAltName={alt_name}"],
        check=True,
        capture_output=True,
        timeout=60,
    )
    return cert, key


@contextmanager
def tls_gateway(cert: Path, key: Path) -> Iterator[tuple[str, Simulator]]:
    """The simulated gateway over HTTPS on 127.0.0.1, served from a thread: its URL and state."""
    sim = Simulator(SimConfig(client_secret=SECRET, known_count=100))
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    started = threading.Event()
    state: dict[str, Any] = {}

    async def serve() -> None:
        runner = web.AppRunner(sim.app(), access_log=None, handle_signals=False)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", 0, ssl_context=context).start()
        state.update(port=runner.addresses[0][1], loop=asyncio.get_running_loop())
        state["stop"] = stop = asyncio.Event()
        started.set()
        await stop.wait()
        await runner.cleanup()

    thread = threading.Thread(target=asyncio.run, args=(serve(),))
    thread.start()
    try:
        assert started.wait(30), "the TLS gateway did not start"
        yield f"https://127.0.0.1:{state['port']}", sim
    finally:
        if "loop" in state:
            state["loop"].call_soon_threadsafe(state["stop"].set)
        thread.join(30)


needs_openssl = pytest.mark.skipif(shutil.which("openssl") is None, reason="no openssl command")


@needs_openssl
class TestTls:
    def test_a_self_signed_certificate_exits_2(self, tmp_path: Path, source: list[str]) -> None:
        """An untrusted certificate: exit 2 naming the host and the certificate's problem;
        not one HTTP request reached the server (verification is on by default)."""
        cert, key = make_certificate(tmp_path, "self-signed", "IP:127.0.0.1")
        with tls_gateway(cert, key) as (url, sim):
            result = run(source, env_for(url, tmp_path))
        assert 2 == result.returncode, result.stderr
        host = url.removeprefix("https://")
        assert f"the TLS certificate of the API host {host} failed verification" in result.stderr
        assert "self-signed certificate" in result.stderr
        assert 0 == sim.stats.requests
        assert not (tmp_path / "cp").exists()

    def test_a_certificate_for_another_name_exits_2(
        self, tmp_path: Path, source: list[str]
    ) -> None:
        """A trusted certificate that names another host: exit 2 saying so."""
        cert, key = make_certificate(tmp_path, "localhost", "DNS:localhost")
        with tls_gateway(cert, key) as (url, sim):
            result = run(source, env_for(url, tmp_path, SSL_CERT_FILE=str(cert)))
        assert 2 == result.returncode, result.stderr
        assert "failed verification: IP address mismatch" in result.stderr
        assert 0 == sim.stats.requests

    def test_https_to_a_plain_http_port_exits_2(self, tmp_path: Path, source: list[str]) -> None:
        """``https://`` to a port that speaks plain HTTP: the handshake fails, exit 2."""
        gw = Gateway("--known-count", "100")
        try:
            url = gw.url.replace("http://", "https://")
            result = run(source, env_for(url, tmp_path))
            requests = gw.get("/_sim/stats")["requests"]
        finally:
            gw.stop()
        assert 2 == result.returncode, result.stderr
        assert f"TLS with the API host {url.removeprefix('https://')} failed" in result.stderr
        assert 0 == requests

    def test_a_trusted_certificate_drains(self, tmp_path: Path, source: list[str]) -> None:
        """The same server with its CA trusted (SSL_CERT_FILE): the check passes, every
        change is applied over HTTPS, exit 0."""
        cert, key = make_certificate(tmp_path, "trusted", "IP:127.0.0.1")
        with tls_gateway(cert, key) as (url, sim):
            result = run(source, env_for(url, tmp_path, SSL_CERT_FILE=str(cert)))
            contacts = dict(sim.contacts)
        assert 0 == result.returncode, result.stderr
        assert expected_state(stream(300, 100)) == contacts
        assert ["api check passed", "starting"] == event_names(result.stderr)[:2]


class TestTlsAlwaysVerified:
    def test_no_code_turns_verification_off(self) -> None:
        """No setting or code path disables certificate checks: none of the ways to say so
        appears in the worker's code."""
        pattern = re.compile(
            r"ssl\s*=\s*False|verify_ssl|CERT_NONE|check_hostname\s*=\s*False|"
            r"_create_unverified_context|UNVERIFIED"
        )
        found = [
            f"{path.relative_to(WORKER)}:{number}"
            for path in sorted(WORKER.rglob("*.py"))
            for number, line in enumerate(path.read_text().splitlines(), start=1)
            if pattern.search(line)
        ]
        assert [] == found


class TestApiUnavailable:
    @pytest.mark.slow
    def test_connection_refused_starts_and_retries(self, tmp_path: Path, source: list[str]) -> None:
        """Nothing listens at the API's port: a warning, then the run starts and retries
        (the API may be back any minute); SIGTERM ends it with exit 0, nothing acked."""
        env = env_for(f"http://127.0.0.1:{free_port()}", tmp_path, WORKER_DRAIN_TIMEOUT="1")
        proc = subprocess.Popen([BIN, "run", *source], env=env, stderr=subprocess.PIPE, text=True)
        try:
            lines = wait_for_event(proc, "retrying")
            proc.send_signal(signal.SIGTERM)
            _, rest = proc.communicate(timeout=30)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)
        stderr = "".join(lines) + rest
        assert 0 == proc.returncode, stderr
        names = event_names(stderr)
        assert ["api check inconclusive", "starting"] == names[:2]
        warning = events(stderr)[0]
        assert "warning" == warning["level"]
        assert warning["outcome"].startswith("no answer from the API (")
        assert 0 == next(e for e in events(stderr) if e["event"] == "summary")["acked"]

    def test_a_transient_answer_starts_and_then_drains(
        self, tmp_path: Path, source: list[str]
    ) -> None:
        """The API answers 503 or code 105 to the check: the run starts anyway and, once the
        API recovers, applies everything and exits 0."""
        gw = Gateway("--known-count", "100", "--error-rate", "1")
        try:
            proc = subprocess.Popen(
                [BIN, "run", *source],
                env=worker_env(gw, tmp_path),
                stderr=subprocess.PIPE,
                text=True,
            )
            lines = wait_for_event(proc, "starting")
            gw.configure(transient_error_rate=0.0)
            _, rest = proc.communicate(timeout=60)
            contacts = gw.get("/_sim/contacts")
        finally:
            gw.stop()
        stderr = "".join(lines) + rest
        assert 0 == proc.returncode, stderr
        check = events(stderr)[0]
        assert ("api check inconclusive", "warning") == (check["event"], check["level"])
        assert "the API is not available now" in check["outcome"]
        assert expected_state(stream(300, 100)) == contacts


def get_json(url: str) -> tuple[int, Any]:
    """The status and JSON body of a GET, errors included."""
    try:
        with urllib.request.urlopen(url, timeout=10) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


class TestReadiness:
    @pytest.mark.slow
    def test_the_status_port_says_starting_during_the_check(self, tmp_path: Path) -> None:
        """The status port opens before the check is sent: while the check waits for its
        answer /healthz answers and /readyz says 503 `starting`; once it passed, the worker
        becomes ready."""
        write_lines(tmp_path / "in.jsonl", stream(20, 10))
        gw = Gateway("--known-count", "100", "--latency", "3000")
        port = free_port()
        proc = subprocess.Popen(
            [BIN, "run", "--source", f"jsonl:{tmp_path / 'in.jsonl'}", "--follow"],
            env=worker_env(gw, tmp_path, WORKER_HTTP_PORT=str(port)),
            stderr=subprocess.DEVNULL,
        )
        base = f"http://127.0.0.1:{port}"
        try:
            # The check's request is held by the latency: seen, not yet answered.
            while gw.get("/_sim/stats")["requests"] == 0:
                time.sleep(0.05)
            assert (200, {"status": "ok"}) == get_json(f"{base}/healthz")
            assert (503, {"ready": False, "reason": "starting"}) == get_json(f"{base}/readyz")
            assert {} == gw.get("/_sim/stats")["by_status"]
            gw.configure(latency="0")
            while get_json(f"{base}/readyz")[0] != 200:
                time.sleep(0.05)
            proc.send_signal(signal.SIGTERM)
            assert 0 == proc.wait(30)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)
            gw.stop()

    def test_a_taken_port_exits_2_before_any_request(self, tmp_path: Path) -> None:
        """--http-port already taken: exit 2 naming the port, and the API never saw a request
        (the port is bound before the check)."""
        write_lines(tmp_path / "in.jsonl", stream(20, 10))
        gw = Gateway("--known-count", "100")
        try:
            with socket.socket() as taken:
                taken.bind(("0.0.0.0", 0))
                taken.listen()
                port = taken.getsockname()[1]
                result = run(
                    ["--source", f"jsonl:{tmp_path / 'in.jsonl'}", "--http-port", str(port)],
                    worker_env(gw, tmp_path),
                )
            stats = gw.get("/_sim/stats")
        finally:
            gw.stop()
        assert 2 == result.returncode, result.stderr
        assert f"contact-worker: cannot serve --http-port {port}: " in result.stderr
        assert 0 == stats["requests"]
        assert "starting" not in event_names(result.stderr)


class TestStopBeforeTheStart:
    @pytest.mark.slow
    def test_sigterm_during_the_check_exits_0_with_nothing_read(self, tmp_path: Path) -> None:
        """A stop that comes while the check waits for its answer (or while the source
        connects) ends the run at once, cleanly: exit 0, nothing read, no checkpoint."""
        write_lines(tmp_path / "in.jsonl", stream(20, 10))
        gw = Gateway("--known-count", "100", "--latency", "30000")
        proc = subprocess.Popen(
            [
                BIN,
                "run",
                "--source",
                f"jsonl:{tmp_path / 'in.jsonl'}",
                "--checkpoint",
                str(tmp_path / "cp"),
            ],
            env=worker_env(gw, tmp_path),
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            while gw.get("/_sim/stats")["requests"] == 0:  # the check's request, held
                time.sleep(0.05)
            proc.send_signal(signal.SIGTERM)
            _, stderr = proc.communicate(timeout=20)
            assert 0 == proc.returncode, stderr
            names = event_names(stderr)
            received = [e for e in events(stderr) if e["event"] == "signal.received"]
            assert [("SIGTERM", "starting")] == [(e["signal"], e["phase"]) for e in received]
            assert "starting" not in names
            assert not (tmp_path / "cp").exists()
            assert {} == gw.get("/_sim/contacts")
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)
            gw.stop()
