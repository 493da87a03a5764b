"""Fixtures for tests against a real Redis: the shared one on 127.0.0.1:6379, or a private one."""

from __future__ import annotations

import shutil
import socket
import subprocess
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import anyio
import anyio.abc
import pytest
from redis.asyncio import Redis
from redis.exceptions import RedisError

SHARED = ("127.0.0.1", 6379)


def _reachable(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


@pytest.fixture
def redis_url() -> str:
    """The shared Redis (started by .ci/run); the test is skipped if it is not running."""
    if not _reachable(*SHARED):
        pytest.skip("no Redis on 127.0.0.1:6379 (.ci/run starts one)")
    return f"redis://{SHARED[0]}:{SHARED[1]}/0"


@pytest.fixture
async def prefix(redis_url: str) -> AsyncIterator[str]:
    """A key prefix of this test's own; every key under it is deleted afterwards."""
    name = f"test:{uuid.uuid4().hex}"
    yield name
    client = Redis.from_url(redis_url)
    try:
        keys = [key async for key in client.scan_iter(match=f"{name}*", count=1000)]
        if keys:
            await client.delete(*keys)
    finally:
        await client.aclose()


class PrivateRedis:
    """A redis-server of this test's own on a free port, with an fsynced AOF: it can be killed
    and restarted without touching anybody else's Redis, and keeps what it acknowledged."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self._process: anyio.abc.Process | None = None

    async def start(self) -> None:
        """Start the server and wait until it answers PING (its AOF loaded)."""
        self._process = await anyio.open_process(
            [
                "redis-server",
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--dir",
                str(self.directory),
                "--save",
                "",
                "--appendonly",
                "yes",
                "--appendfsync",
                "always",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        client = Redis.from_url(self.url)
        try:
            with anyio.fail_after(10):
                while True:
                    try:
                        if await client.ping():
                            return
                    except RedisError:
                        await anyio.sleep(0.02)
        finally:
            await client.aclose()

    async def kill(self) -> None:
        """SIGKILL the server (no shutdown, no final save) and reap it."""
        process, self._process = self._process, None
        if process is not None:
            process.kill()
            await process.wait()
            await process.aclose()


@pytest.fixture
async def private_redis(tmp_path: Path) -> AsyncIterator[PrivateRedis]:
    """A running private redis-server, killed at the end of the test."""
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is not installed: cannot run a private Redis to restart")
    server = PrivateRedis(tmp_path / "redis")
    server.directory.mkdir()
    await server.start()
    try:
        yield server
    finally:
        await server.kill()
