"""The command line as a user runs it: `contact-worker` against `contact-worker simulate`."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.engine.harness import expected_state, read_dead, write_lines
from tests.engine.test_engine import stream

BIN = str(Path(sys.executable).with_name("contact-worker"))
SECRET = "s3cr3t-do-not-log"


class Gateway:
    """A `contact-worker simulate` process on 127.0.0.1 and its inspection endpoints."""

    def __init__(self, *args: str) -> None:
        self.proc = subprocess.Popen(
            [BIN, "simulate", "--port", "0", "--client-secret", SECRET, *args],
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        assert line.startswith("listening on "), line
        self.url = line.split()[-1]

    def get(self, path: str) -> Any:
        with urllib.request.urlopen(self.url + path, timeout=10) as resp:
            return json.loads(resp.read())

    def configure(self, **knobs: Any) -> None:
        req = urllib.request.Request(
            self.url + "/_sim/config", data=json.dumps(knobs).encode(), method="POST"
        )
        urllib.request.urlopen(req, timeout=10).close()

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(10)
        if self.proc.stdout is not None:
            self.proc.stdout.close()


@pytest.fixture
def gateway() -> Iterator[Gateway]:
    gw = Gateway("--known-count", "500", "--latency", "2")
    yield gw
    gw.stop()


class WorkerProcess:
    """One `contact-worker run --source URI` process, its stderr appended to ``log``: started,
    killed (SIGKILL) and restarted, or stopped (SIGTERM) for its exit code."""

    def __init__(
        self, uri: str, env: dict[str, str], log: Path, *, stop_timeout_s: float = 30.0
    ) -> None:
        self.uri = uri
        self.env = env
        self.log = log
        self.stop_timeout_s = stop_timeout_s
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, **env: str) -> None:
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(
                [BIN, "run", "--source", self.uri], env={**self.env, **env}, stderr=out
            )

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def stop(self) -> int:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(self.stop_timeout_s)


def worker_env(gw: Gateway, tmp_path: Path, **extra: str) -> dict[str, str]:
    """The environment a user would set: credentials and API URL in variables."""
    return api_env(gw.url, tmp_path, **extra)


def api_env(
    url: str, tmp_path: Path, *, drop: tuple[str, ...] = (), **extra: str
) -> dict[str, str]:
    """:func:`worker_env` for an API at ``url``, leaving out inherited variables that start
    with a prefix in ``drop`` too."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("WORKER_", "SMSGW_", *drop))}
    env.update(
        SMSGW_API_URL=url,
        SMSGW_CLIENT_ID="demo",
        SMSGW_CLIENT_SECRET=SECRET,
        WORKER_DLQ=f"jsonl:{tmp_path / 'dead.jsonl'}",
        WORKER_HTTP_PORT="0",
        WORKER_LINGER_MS="10",
        WORKER_RATE="0",
    )
    env.update(extra)
    return env


def run(args: list[str], env: dict[str, str], **kw: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [BIN, "run", *args], env=env, capture_output=True, text=True, timeout=60, **kw
    )


def events(stderr: str) -> list[dict[str, Any]]:
    """The JSON log events a run wrote to stderr."""
    return [json.loads(line) for line in stderr.splitlines() if line.startswith("{")]


def summary(stderr: str) -> dict[str, Any]:
    return next(e for e in events(stderr) if e["event"] == "summary")


class TestRun:
    def test_drains_a_file_and_exits_0(self, gateway: Gateway, tmp_path: Path) -> None:
        """`run --source jsonl:FILE` applies everything, dead-letters the invalid, exits 0,
        logs JSON lines with one summary event, and never prints the secret."""
        changes: list[Any] = stream(1000, 500)
        changes.insert(10, b"not json")
        write_lines(tmp_path / "in.jsonl", changes)
        result = run(["--source", f"jsonl:{tmp_path / 'in.jsonl'}"], worker_env(gateway, tmp_path))
        assert 0 == result.returncode, result.stderr
        assert expected_state(changes) == gateway.get("/_sim/contacts")
        dead = read_dead(tmp_path / "dead.jsonl")
        assert [("invalid", "in.jsonl:11", "not json")] == [
            (d["reason"], d["source"], d["raw"]) for d in dead
        ]
        done = summary(result.stderr)
        assert ("drained", 1001, 1001) == (done["ending"], done["records_read"], done["acked"])
        assert SECRET not in result.stderr + result.stdout

    def test_reads_stdin(self, gateway: Gateway, tmp_path: Path) -> None:
        """`jsonl:-` reads standard input to its end."""
        changes = stream(200, 50, seed=2)
        data = b"".join(json.dumps(c).encode() + b"\n" for c in changes)
        result = subprocess.run(
            [BIN, "run", "--source", "jsonl:-"],
            input=data,
            env=worker_env(gateway, tmp_path),
            capture_output=True,
            timeout=60,
        )
        assert 0 == result.returncode, result.stderr
        assert expected_state(changes) == gateway.get("/_sim/contacts")

    def test_flags_win_over_environment(self, gateway: Gateway, tmp_path: Path) -> None:
        """A flag overrides its environment variable (here a wrong secret in the env)."""
        write_lines(tmp_path / "in.jsonl", stream(10, 10))
        env = worker_env(gateway, tmp_path, SMSGW_CLIENT_SECRET="wrong")
        result = run(["--source", f"jsonl:{tmp_path / 'in.jsonl'}", "--client-secret", SECRET], env)
        assert 0 == result.returncode, result.stderr


class TestExitCodes:
    @pytest.mark.parametrize(
        ("args", "env", "message"),
        [
            ([], {}, "--source (or WORKER_SOURCE) is required"),
            (["--source", "jsonl:in.jsonl", "--batch-size", "0"], {}, "--batch-size"),
            (["--source", "jsonl:in.jsonl"], {"WORKER_RATE": "fast"}, "WORKER_RATE"),
            (["--source", "amqp://x"], {}, "unsupported source"),
            (["--source", "jsonl:missing.jsonl"], {}, "cannot open"),
            (["--source", "jsonl:in.jsonl", "--api-url", "ftp://x"], {}, "--api-url"),
            (["--source", "jsonl:-", "--follow"], {}, "stdin"),
        ],
    )
    def test_bad_configuration_exits_2(
        self,
        gateway: Gateway,
        tmp_path: Path,
        args: list[str],
        env: dict[str, str],
        message: str,
    ) -> None:
        """A missing or invalid setting: exit 2 before anything is sent, with a clear message."""
        write_lines(tmp_path / "in.jsonl", stream(5, 5))
        base = worker_env(gateway, tmp_path, **env)
        if not args:
            base.pop("WORKER_SOURCE", None)
        result = run(args, base, cwd=tmp_path)
        assert 2 == result.returncode
        assert message in result.stderr
        assert 0 == gateway.get("/_sim/stats")["requests"]

    def test_refused_credentials_exit_3(self, gateway: Gateway, tmp_path: Path) -> None:
        """Refused credentials: exit 3 naming code 104 after the start-up check's one request,
        nothing read or acked (tests/cli/test_startup_checks.py has the rest)."""
        write_lines(tmp_path / "in.jsonl", stream(2000, 500))
        env = worker_env(gateway, tmp_path, SMSGW_CLIENT_SECRET="wrong-secret-value")
        result = run(
            [
                "--source",
                f"jsonl:{tmp_path / 'in.jsonl'}",
                "--checkpoint",
                str(tmp_path / "cp.json"),
            ],
            env,
        )
        assert 3 == result.returncode
        assert "104" in result.stderr and "invalid credentials" in result.stderr
        assert 1 == gateway.get("/_sim/stats")["requests"]
        assert not (tmp_path / "cp.json").exists()
        assert "wrong-secret-value" not in result.stderr


class TestSignalsAndCrashes:
    @pytest.mark.slow
    def test_sigterm_drains_and_exits_0(self, tmp_path: Path) -> None:
        """SIGTERM while following a file: stop reading, finish in-flight requests, ack, exit 0;
        the checkpoint covers everything that was applied."""
        gw = Gateway("--known-count", "1000", "--latency", "300")
        try:
            changes = stream(3000, 1000, seed=4)
            write_lines(tmp_path / "in.jsonl", changes)
            env = worker_env(
                gw, tmp_path, WORKER_RATE="20", WORKER_BATCH_SIZE="10", WORKER_MAX_WAITING="100"
            )
            proc = subprocess.Popen(
                [
                    BIN,
                    "run",
                    "--source",
                    f"jsonl:{tmp_path / 'in.jsonl'}",
                    "--follow",
                    "--checkpoint",
                    str(tmp_path / "cp.json"),
                ],
                env=env,
                stderr=subprocess.PIPE,
                text=True,
            )
            deadline = time.monotonic() + 20
            while gw.get("/_sim/stats")["requests"] < 5 and time.monotonic() < deadline:
                time.sleep(0.05)
            proc.send_signal(signal.SIGTERM)
            _, stderr = proc.communicate(timeout=30)
            assert 0 == proc.returncode, stderr
            done = summary(stderr)
            assert "shutdown" == done["ending"]
            assert 0 == done["in_flight"]
            applied = gw.get("/_sim/stats")["contacts_applied"]
            assert applied == done["contacts_applied"] > 0
            # Everything read was flushed and applied; the unread rest stays for the next run.
            checkpoint = json.loads((tmp_path / "cp.json").read_text())
            assert done["records_read"] == checkpoint["line"] < 3000
        finally:
            gw.stop()

    @pytest.mark.slow
    def test_resume_after_kill_9(self, tmp_path: Path) -> None:
        """A worker killed with SIGKILL mid-run resumes from its checkpoint: the second run
        reads only the unfinished tail, and the API ends with every last-written value."""
        gw = Gateway("--known-count", "2000", "--latency", "20", "--record-history")
        try:
            changes = stream(4000, 2000, seed=8)
            write_lines(tmp_path / "in.jsonl", changes)
            args = [
                "--source",
                f"jsonl:{tmp_path / 'in.jsonl'}",
                "--checkpoint",
                str(tmp_path / "cp.json"),
            ]
            env = worker_env(
                gw, tmp_path, WORKER_RATE="40", WORKER_BATCH_SIZE="20", WORKER_MAX_WAITING="200"
            )
            proc = subprocess.Popen([BIN, "run", *args], env=env, stderr=subprocess.DEVNULL)
            deadline = time.monotonic() + 20
            while not (tmp_path / "cp.json").exists() and time.monotonic() < deadline:
                time.sleep(0.05)
            time.sleep(0.5)
            proc.kill()
            proc.wait(10)
            first = json.loads((tmp_path / "cp.json").read_text())["line"]
            assert 0 < first < 4000
            result = run(args, worker_env(gw, tmp_path))
            assert 0 == result.returncode, result.stderr
            assert 4000 - first == summary(result.stderr)["records_read"]
            assert expected_state(changes) == gw.get("/_sim/contacts")
            for key, objs in gw.get("/_sim/history").items():
                seqs = [int(o["extra1"]) for o in objs]
                # At-least-once: a replayed tail may re-apply, but never older after newer
                # within one run's order of the file.
                assert seqs[-1] == max(seqs), key
        finally:
            gw.stop()
