"""The status port during a real run: /healthz, /readyz, /metrics."""

from __future__ import annotations

from pathlib import Path

import aiohttp
import anyio
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.engine.harness import settings, write_lines
from tests.engine.test_engine import stream
from worker.config import Secret
from worker.deadletters.jsonl import JsonlDeadLetters
from worker.engine import Ending, Engine
from worker.obs.http import serve_status
from worker.sender import Sender
from worker.sim.gateway import SimConfig, Simulator, serve
from worker.sources.jsonl import JsonlSource

pytestmark = pytest.mark.anyio


async def test_status_endpoints_during_a_run(tmp_path: Path) -> None:
    """While the worker runs, /healthz answers, /readyz is ready, /metrics parses as Prometheus
    text with the run's counters; on shutdown /readyz turns 503 (draining)."""
    write_lines(tmp_path / "in.jsonl", stream(400, 400) + [b"bad"])
    sim = Simulator(SimConfig(known_count=400, latency="30"))
    async with serve(sim) as url:
        source = JsonlSource(str(tmp_path / "in.jsonl"), follow=True)
        sink = JsonlDeadLetters(str(tmp_path / "dead.jsonl"))
        await source.open()
        await sink.open()
        async with Sender(url, "demo", Secret("demo-secret"), concurrency=2) as sender:
            engine = Engine(source, sink, sender, settings(batch=10, concurrency=2))
            async with (
                serve_status(engine, 0, host="127.0.0.1") as port,
                aiohttp.ClientSession() as http,
                anyio.create_task_group() as tg,
            ):
                base = f"http://127.0.0.1:{port}"
                result = []

                async def run() -> None:
                    result.append(await engine.run())

                tg.start_soon(run)
                while sim.stats.contacts_applied < 50:  # noqa: ASYNC110 - polling a counter
                    await anyio.sleep(0.02)
                async with http.get(base + "/healthz") as resp:
                    assert 200 == resp.status
                async with http.get(base + "/readyz") as resp:
                    assert 200 == resp.status
                async with http.get(base + "/metrics") as resp:
                    text = await resp.text()
                samples = {
                    (s.name, tuple(sorted(s.labels.items()))): s.value
                    for family in text_string_to_metric_families(text)
                    for s in family.samples
                }
                assert samples[("contact_worker_changes_read_total", ())] == 401
                assert samples[("contact_worker_dead_letters_total", (("reason", "invalid"),))] == 1
                assert samples[("contact_worker_requests_total", (("status", "204"),))] >= 5
                assert samples[("contact_worker_contacts_applied_total", ())] >= 50
                engine.shutdown()
                async with http.get(base + "/readyz") as resp:
                    assert 503 == resp.status
        await sink.close()
        await source.close()
    assert Ending.SHUTDOWN == result[0].ending
