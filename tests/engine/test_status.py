"""The status port and the run's own reporting: /healthz, /readyz, /metrics, logs."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Any

import aiohttp
import anyio
import pytest
import structlog
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from tests.engine.harness import run_engine, settings, write_lines
from tests.engine.test_engine import stream
from worker import __version__
from worker.backends.jsonl.sink import JsonlDeadLetters
from worker.backends.jsonl.source import JsonlSource
from worker.config import Secret
from worker.core.coalesce import Entry
from worker.engine import Ending, Engine
from worker.obs.histograms import ACK_SECONDS, Buckets, EngineHistograms
from worker.obs.http import serve_status
from worker.obs.metrics import status_registry
from worker.sender import Sender
from worker.sim.gateway import SimConfig, Simulator, serve

pytestmark = pytest.mark.anyio

FAMILIES = {
    "contact_worker_changes_read": "counter",
    "contact_worker_changes_invalid": "counter",
    "contact_worker_changes_coalesced": "counter",
    "contact_worker_changes_applied": "counter",
    "contact_worker_changes_acked": "counter",
    "contact_worker_contacts_applied": "counter",
    "contact_worker_requests": "counter",
    "contact_worker_isolation_requests": "counter",
    "contact_worker_dead_letters": "counter",
    "contact_worker_retries": "counter",
    "contact_worker_rate_limit_wait_seconds": "counter",
    "contact_worker_in_flight_requests": "gauge",
    "contact_worker_waiting_changes": "gauge",
    "contact_worker_rate_limit_requests_per_second": "gauge",
    "contact_worker_api_pauses": "counter",
    "contact_worker_api_paused_seconds": "counter",
    "contact_worker_api_paused_remaining_seconds": "gauge",
    "contact_worker_concurrency_limit": "gauge",
    "contact_worker_batch_size_limit": "gauge",
    "contact_worker_ready": "gauge",
    "contact_worker_request_duration_seconds": "histogram",
    "contact_worker_batch_size_contacts": "histogram",
    "contact_worker_change_ack_latency_seconds": "histogram",
    "contact_worker_input_available": "gauge",
    "contact_worker_input_reconnects": "counter",
    "contact_worker_input_unacked_records": "gauge",
    "contact_worker_build_info": "gauge",
    "contact_worker_id_knowledge_lookups": "counter",
    "contact_worker_id_knowledge_ids": "gauge",
    "contact_worker_id_contradictions": "counter",
    "contact_worker_isolation_riders": "counter",
    "contact_worker_inferred_culprits": "counter",
    "contact_worker_unknown_share": "gauge",
}
"""Every metric family /metrics always has, and its type (counters' samples end in _total)."""

PORT_FAMILIES = {
    "contact_worker_status_connections": "gauge",
    "contact_worker_status_connections_shed": "counter",
}
"""The status port's own families (there whenever the port serves /metrics)."""

INPUT_FAMILIES = {
    "contact_worker_input_partitions_held": "gauge",
    "contact_worker_input_leases_lost": "counter",
    "contact_worker_input_spool_depth": "gauge",
    "contact_worker_id_knowledge_loaded": "counter",
    "contact_worker_id_knowledge_saved": "counter",
    "contact_worker_id_knowledge_store_failures": "counter",
}
"""Families of the inputs they apply to: partitioned ones, ones with leases, the spool, ones
with a knowledge store."""

PROCESS_FAMILIES = {
    "process_cpu_seconds": "counter",
    "process_resident_memory_bytes": "gauge",
    "process_open_fds": "gauge",
    "process_start_time_seconds": "gauge",
}
"""Some of prometheus_client's standard ``process_*`` families (Linux)."""

PROGRESS_KEYS = {
    "elapsed_s",
    "records_read",
    "acked",
    "contacts_applied",
    "dead_letters",
    "retries",
    "waiting",
    "in_flight",
    "concurrency_limit",
    "read_per_s",
    "acked_per_s",
    "acked_per_s_overall",
    "rate_wait_s",
    "rate_wait_share",
    "rate",
    "pauses",
}
"""The fields of the ``progress`` log event, as docs/operations.md lists them."""

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def parse(text: str) -> tuple[dict[str, str], Samples]:
    """The families' types by name, and every sample by (name, sorted labels)."""
    types, samples = {}, {}
    for family in text_string_to_metric_families(text):
        types[family.name] = family.type
        for s in family.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return types, samples


def scrape(engine: Engine) -> tuple[dict[str, str], Samples]:
    """What /metrics would answer now (less the port's families), parsed."""
    return parse(generate_latest(status_registry(engine)).decode())


def labelled(samples: Samples, name: str, label: str) -> dict[str, float]:
    """The samples of one labelled counter, by label value."""
    return {dict(labels)[label]: v for (n, labels), v in samples.items() if n == name}


class TestReadme:
    def test_metrics_table_lists_every_family_with_its_type(self) -> None:
        """The metrics table of docs/operations.md names each family as scraped (counters
        with _total) and its type, no more, no less."""
        readme = (Path(__file__).parents[2] / "docs" / "operations.md").read_text()
        rows = re.findall(r"^\| `(contact_worker_\w+)` \| (\w+) \|", readme, re.M)
        expected = {
            (name + "_total" if kind == "counter" else name, kind)
            for name, kind in (FAMILIES | PORT_FAMILIES | INPUT_FAMILIES).items()
        }
        assert expected == set(rows)
        assert len(rows) == len(expected)

    def test_progress_table_lists_every_field(self) -> None:
        """The progress table of docs/operations.md names each field of the progress event."""
        readme = (Path(__file__).parents[2] / "docs" / "operations.md").read_text()
        section = readme.split("**Progress.**", 1)[1].split("**Per request.**", 1)[0]
        table = [line for line in section.splitlines() if line.startswith("| `")]
        named = {name for line in table for name in re.findall(r"`(\w+)`", line.split("|")[1])}
        assert PROGRESS_KEYS == named


class TestBuckets:
    def test_counts_as_prometheus_le_buckets(self) -> None:
        """A value on a bound counts in that bucket; cumulative pairs end with +Inf."""
        buckets = Buckets((1, 5))
        buckets.observe(1.0)
        buckets.observe(3.0, 2)
        buckets.observe(9.0)
        expected = [("1.0", 1.0), ("5.0", 3.0), ("+Inf", 4.0)]
        assert expected == buckets.cumulative()
        assert (4, 16.0) == (buckets.count, buckets.sum)


class TestAckLatency:
    @pytest.mark.parametrize(
        "sinces",
        [[9.99, 9.98, 9.97], [10.0, 9.9, 5.0, 9.995], [9.5] * 3, []],
        ids=["one bucket", "several buckets", "one read", "none"],
    )
    def test_each_change_counts_from_its_entry_oldest_arrival(self, sinces: list[float]) -> None:
        """Acknowledged at 10.0, an entry that arrived at ``since`` with n changes adds n
        observations of ``10.0 - since``: the same counts and sum as observing one by one."""
        entries = [Entry(str(i), {}, list(range(i + 1)), i, s, i + 1) for i, s in enumerate(sinces)]
        histograms, expected = EngineHistograms(), Buckets(ACK_SECONDS)
        histograms.acked(entries, sum(len(e.tokens) for e in entries), 10.0)
        for entry in entries:
            expected.observe(10.0 - entry.since, len(entry.tokens))
        assert expected.counts == histograms.ack_seconds.counts
        assert expected.sum == pytest.approx(histograms.ack_seconds.sum)


class TestEndpoints:
    async def test_status_endpoints_during_a_run(self, tmp_path: Path) -> None:
        """While the worker runs, /healthz answers, /readyz is ready, /metrics parses as
        Prometheus text with the run's counters; on shutdown /readyz turns 503 (draining)."""
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
                    async with http.get(base + "/readyz") as resp:
                        assert (503, "starting") == (resp.status, (await resp.json())["reason"])

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
                        assert resp.headers["Content-Type"].startswith("text/plain; version=0.0.4")
                        types, samples = parse(await resp.text())
                    everywhere = FAMILIES | PORT_FAMILIES | PROCESS_FAMILIES
                    assert everywhere == {n: t for n, t in types.items() if n in everywhere}
                    assert not INPUT_FAMILIES.keys() & types.keys()  # a file has none of them
                    assert samples[("contact_worker_changes_read_total", ())] == 401
                    assert (
                        samples[("contact_worker_dead_letters_total", (("reason", "invalid"),))]
                        == 1
                    )
                    assert samples[("contact_worker_requests_total", (("status", "204"),))] >= 5
                    assert samples[("contact_worker_contacts_applied_total", ())] >= 50
                    assert samples[("contact_worker_ready", ())] == 1
                    assert samples[("contact_worker_input_available", ())] == 1
                    assert samples[("contact_worker_input_reconnects_total", ())] == 0
                    # Read and not acknowledged: what the engine holds, no more.
                    unacked = samples[("contact_worker_input_unacked_records", ())]
                    acked = samples[("contact_worker_changes_acked_total", ())]
                    assert 0 <= unacked == 401 - acked
                    build = labelled(samples, "contact_worker_build_info", "version")
                    assert {__version__: 1.0} == build
                    assert samples[("contact_worker_status_connections", ())] >= 1
                    assert samples[("contact_worker_status_connections_shed_total", ())] == 0
                    assert samples[("process_resident_memory_bytes", ())] > 0
                    engine.shutdown()
                    async with http.get(base + "/readyz") as resp:
                        assert (503, "draining") == (resp.status, (await resp.json())["reason"])
            await sink.close()
            await source.close()
        assert Ending.SHUTDOWN == result[0].ending

    async def test_not_ready_after_an_auth_failure(self, tmp_path: Path) -> None:
        """Refused credentials end the run with /readyz 503 "auth" (the process then exits 3)."""
        write_lines(tmp_path / "in.jsonl", stream(50, 50))
        sim = Simulator(SimConfig(known_count=50))
        async with serve(sim) as url:
            source = JsonlSource(str(tmp_path / "in.jsonl"))
            sink = JsonlDeadLetters(str(tmp_path / "dead.jsonl"))
            await source.open()
            await sink.open()
            async with Sender(url, "demo", Secret("wrong-secret")) as sender:
                engine = Engine(source, sink, sender, settings())
                async with (
                    serve_status(engine, 0, host="127.0.0.1") as port,
                    aiohttp.ClientSession() as http,
                ):
                    result = await engine.run()
                    async with http.get(f"http://127.0.0.1:{port}/readyz") as resp:
                        body = await resp.json()
                        assert (503, False, "auth") == (resp.status, body["ready"], body["reason"])
                    async with http.get(f"http://127.0.0.1:{port}/healthz") as resp:
                        assert 200 == resp.status
            await sink.close()
            await source.close()
        assert Ending.AUTH == result.ending
        assert 0 == scrape(engine)[1][("contact_worker_ready", ())]


class TestMetrics:
    async def test_counters_and_histograms_agree_with_the_run(self, tmp_path: Path) -> None:
        """After a run with unknown IDs and invalid lines, every family is there with its type,
        the counters equal the run's summary and the API's counts, and the histograms count
        what they promise: one request duration and one batch size per request, one
        change-to-ack latency per change that was sent."""
        unknown = frozenset({901, 902})
        changes: list[Any] = stream(600, 100, unknown=unknown) + [b"not json", b'{"ID": 1}']
        run = await run_engine(
            tmp_path, changes, SimConfig(known_count=100, latency="2"), settings(batch=20)
        )
        assert Ending.DRAINED == run.result.ending
        assert (False, "stopped") == run.engine.readiness()
        types, samples = scrape(run.engine)
        assert FAMILIES == {n: t for n, t in types.items() if n in FAMILIES}
        summary = run.engine.summary()

        def value(name: str) -> float:
            return samples[(name, ())]

        assert 602 == value("contact_worker_changes_read_total") == summary["records_read"]
        assert 2 == value("contact_worker_changes_invalid_total")
        assert summary["coalesced"] == value("contact_worker_changes_coalesced_total") > 0
        assert run.sim.stats.contacts_applied == value("contact_worker_contacts_applied_total")
        assert 602 == value("contact_worker_changes_acked_total")
        requests = labelled(samples, "contact_worker_requests_total", "status")
        assert {"204", "404"} == set(requests)
        assert {k: float(v) for k, v in run.sim.stats.by_status.items()} == {
            int(k): v for k, v in requests.items()
        }
        dead = labelled(samples, "contact_worker_dead_letters_total", "reason")
        assert {"not_found": summary["dead_letters"]["not_found"], "invalid": 2} == dead
        assert value("contact_worker_isolation_requests_total") > 0
        assert 0 == value("contact_worker_in_flight_requests")
        assert (1, 0, 0) == (
            value("contact_worker_input_available"),
            value("contact_worker_input_reconnects_total"),
            value("contact_worker_input_unacked_records"),
        )
        assert 0 == value("contact_worker_waiting_changes")
        assert (0, 4, 20) == (
            value("contact_worker_rate_limit_requests_per_second"),
            value("contact_worker_concurrency_limit"),
            value("contact_worker_batch_size_limit"),
        )
        sent = sum(requests.values())
        assert sent == value("contact_worker_request_duration_seconds_count")
        assert sent == value("contact_worker_batch_size_contacts_count")
        assert run.sim.stats.objects_received == value("contact_worker_batch_size_contacts_sum")
        assert 600 == value("contact_worker_change_ack_latency_seconds_count")
        inf = ("le", "+Inf")
        assert 600 == samples[("contact_worker_change_ack_latency_seconds_bucket", (inf,))]


class TestLogs:
    async def test_send_path_events_carry_batch_and_request_ids(self, tmp_path: Path) -> None:
        """Every event logged while a request is handled (its debug "batch" event, dead
        letters found by it) carries the batch number and a request id of its own; the
        reader's events (invalid lines) carry none."""
        unknown = frozenset({901})
        changes: list[Any] = stream(300, 50, unknown=unknown) + [b"not json"]
        with structlog.testing.capture_logs(
            processors=[structlog.contextvars.merge_contextvars]
        ) as logs:
            run = await run_engine(tmp_path, changes, SimConfig(known_count=50), settings())
        assert Ending.DRAINED == run.result.ending
        batches = [e for e in logs if e["event"] == "batch"]
        assert len(batches) == sum(run.sim.stats.by_status.values())
        assert all(isinstance(e["batch"], int) for e in batches)
        assert len(batches) == len({e["request"] for e in batches})
        found = [e for e in logs if e["event"] == "dead letter" and e["reason"] == "not_found"]
        invalid = [e for e in logs if e["event"] == "dead letter" and e["reason"] == "invalid"]
        assert found and all({"batch", "request"} <= e.keys() for e in found)
        requests = {e["request"]: e["batch"] for e in batches}
        assert all(requests[e["request"]] == e["batch"] for e in found)
        assert 1 == len(invalid)
        assert not {"batch", "request"} & invalid[0].keys()
        assert not {"batch", "request"} & next(e for e in logs if e["event"] == "summary").keys()

    async def test_progress_events_while_running(self, tmp_path: Path) -> None:
        """With a progress interval, the run logs ``progress`` events with the documented
        fields; the counts never exceed what was read."""
        changes = stream(200, 200)
        es = dataclasses.replace(settings(batch=10, concurrency=1), progress_interval_s=0.05)
        with structlog.testing.capture_logs() as logs:
            run = await run_engine(tmp_path, changes, SimConfig(known_count=200, latency="20"), es)
        assert Ending.DRAINED == run.result.ending
        progress = [e for e in logs if e["event"] == "progress"]
        assert progress
        for event in progress:
            assert PROGRESS_KEYS | {"event", "log_level"} == event.keys()
            assert event["acked"] <= event["records_read"] <= 200
            assert event["in_flight"] <= 1
        assert [e["acked"] for e in progress] == sorted(e["acked"] for e in progress)

    async def test_no_progress_events_when_off(self, tmp_path: Path) -> None:
        """A progress interval of 0 (the engine's default) logs none."""
        with structlog.testing.capture_logs() as logs:
            await run_engine(tmp_path, stream(50, 50), SimConfig(known_count=50, latency="5"))
        assert [] == [e for e in logs if e["event"] == "progress"]
