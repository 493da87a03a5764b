"""The image's command, environment and health check, run outside Docker as the image runs them.

Nothing here repeats the Dockerfile: the ENTRYPOINT, CMD, ENV, WORKDIR and HEALTHCHECK come from
it, with only the paths that a container would have mapped (``/data`` to a temporary folder,
``/opt/venv`` to the test's own virtualenv) and the settings ``docker run -e`` would add.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import sqlite3
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.cli.test_cli import SECRET, Gateway
from tests.docker.dockerfile import Stage, parse

ROOT = Path(__file__).resolve().parents[2]
TOKEN = "docker-test-ingest-token"
VENV = str(Path(sys.executable).parent.parent)  # where /opt/venv is in this environment


def free_port() -> int:
    """A TCP port nothing listens on at the moment."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def mapped(value: str, data: Path) -> str:
    """A path-carrying value with the container's folders replaced by this machine's."""
    value = re.sub(r"(?<![\w/.])/opt/venv(?=/|:|$)", VENV, value)
    return re.sub(r"(?<![\w/.])/data(?=/|:|$)", str(data), value)


@dataclass
class Container:
    """What `docker run` would start, as a process: argv, environment and working folder."""

    stage: Stage
    argv: list[str]
    env: dict[str, str]
    cwd: Path
    port: int

    def healthcheck(self, **env: str) -> subprocess.CompletedProcess[str]:
        """The image's HEALTHCHECK command, run as Docker runs it inside the container."""
        return subprocess.run(
            self.stage.healthcheck,
            env=self.env | env,
            cwd=self.cwd,
            capture_output=True,
            text=True,
            timeout=30,
        )

    def post(self, changes: list[dict[str, Any]]) -> tuple[int, Any]:
        """POST /v1/changes with the ingest token, as an upstream system would."""
        req = urllib.request.Request(
            f"http://127.0.0.1:{self.port}/v1/changes",
            data=json.dumps(changes).encode(),
            headers={"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"},
            method="POST",
        )
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status, json.loads(resp.read())


@pytest.fixture
def gateway() -> Iterator[Gateway]:
    gw = Gateway("--known-count", "100", "--latency", "2")
    yield gw
    gw.stop()


@pytest.fixture
def container(gateway: Gateway, tmp_path: Path) -> Container:
    """The image's final stage mapped onto this machine, plus the secrets `docker run -e` adds."""
    data = tmp_path / "data"
    data.mkdir()
    # The base image's PATH stands in for the one the Dockerfile's ENV PATH extends.
    stage = parse((ROOT / "Dockerfile").read_text(), {"PATH": os.environ["PATH"]}).final
    port = free_port()
    env = {key: mapped(value, data) for key, value in stage.env.items()}
    env |= {
        "SMSGW_API_URL": gateway.url,
        "SMSGW_CLIENT_ID": "demo",
        "SMSGW_CLIENT_SECRET": SECRET,
        "WORKER_INGEST_TOKEN": TOKEN,
        "WORKER_HTTP_PORT": str(port),
    }
    return Container(
        stage=stage,
        argv=stage.entrypoint + stage.cmd,
        env=env,
        cwd=Path(mapped(stage.workdir, data)),
        port=port,
    )


def wait_healthy(box: Container, proc: subprocess.Popen[bytes], attempts: int = 300) -> None:
    """Run the HEALTHCHECK until it passes, as Docker's start period does."""
    for _ in range(attempts):
        assert proc.poll() is None, "the worker exited before it was healthy"
        if box.healthcheck().returncode == 0:
            return
        time.sleep(0.1)
    raise AssertionError("the health check never passed")


def wait_for(predicate: Any, attempts: int = 300) -> None:
    for _ in range(attempts):
        if predicate():
            return
        time.sleep(0.1)
    raise AssertionError("condition never held")


class TestEntrypoint:
    @pytest.mark.slow
    def test_serves_ingests_applies_and_drains_on_sigterm(
        self, container: Container, gateway: Gateway, tmp_path: Path
    ) -> None:
        """The image's command on its default source: the health check fails while nothing
        listens and passes once the worker runs; POSTed changes reach the API; the unknown ID
        is dead-lettered in the spool on the volume; SIGTERM ends it with exit 0 (drained)."""
        assert 0 != container.healthcheck().returncode
        log = (tmp_path / "stderr.log").open("wb")
        proc = subprocess.Popen(
            container.argv,
            env=container.env,
            cwd=container.cwd,
            stdout=subprocess.DEVNULL,
            stderr=log,
        )
        try:
            wait_healthy(container, proc)
            changes: list[dict[str, Any]] = [
                {"ID": str(i % 40 + 1), "lastname": f"L{i}"} for i in range(120)
            ] + [{"ID": 100, "extra2": "Building 2B"}, {"ID": "777", "firstname": "Ghost"}]
            assert (202, {"accepted": 122, "rejected": []}) == container.post(changes)
            expected = {str(i % 40 + 1): {"lastname": f"L{i}"} for i in range(120)}
            expected["100"] = {"extra2": "Building 2B"}
            wait_for(lambda: expected == gateway.get("/_sim/contacts"))
            spool = Path(container.env["WORKER_SOURCE"].removeprefix("sqlite:"))
            wait_for(lambda: ["not_found"] == dead_letter_reasons(spool))
            proc.send_signal(signal.SIGTERM)
            assert 0 == proc.wait(timeout=60)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            log.close()
        assert spool.parent == tmp_path / "data"
        lines = (tmp_path / "stderr.log").read_text().splitlines()
        events = [json.loads(line) for line in lines if line.startswith("{")]
        summary = next(e for e in events if e["event"] == "summary")
        assert ("shutdown", 122) == (summary["ending"], summary["records_read"])
        assert SECRET not in "\n".join(lines) and TOKEN not in "\n".join(lines)


def dead_letter_reasons(spool: Path) -> list[str]:
    """The reasons in the spool's dead_letters table, oldest first."""
    with closing(sqlite3.connect(spool)) as db:
        return [r for (r,) in db.execute("SELECT reason FROM dead_letters ORDER BY id")]
