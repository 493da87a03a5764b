"""/readyz and /metrics follow a Redis input through an outage: a private redis-server is
killed under a running worker and started again."""

from __future__ import annotations

from pathlib import Path

import orjson
import pytest

from tests.engine.probes import probed, until
from tests.engine.test_engine import stream
from tests.engine.test_status import labelled
from tests.redis.conftest import PrivateRedis
from worker.backends.jsonl.sink import JsonlDeadLetters
from worker.backends.redis.producer import enqueue
from worker.backends.redis.stream import from_uri
from worker.obs.readiness import INPUT_UNAVAILABLE
from worker.sim.gateway import SimConfig

pytestmark = pytest.mark.anyio


@pytest.mark.parametrize("partitions", [1, 3])
async def test_not_ready_while_redis_is_down_ready_again_after(
    private_redis: PrivateRedis, tmp_path: Path, partitions: int
) -> None:
    """While the worker's Redis is killed, /readyz answers 503 ``input_unavailable`` naming
    the server, /healthz still 200 and ``contact_worker_input_available`` 0; once Redis is
    back, /readyz is 200 again, the worker goes on (nothing lost), and /metrics counts the
    reconnection (and, partitioned, the partitions held)."""
    uri = f"{private_redis.url}?stream=c&poll_s=0.2&partitions={partitions}&lease_s=3"
    changes = stream(400, 100)
    before, after = changes[:200], changes[200:]
    await enqueue(uri, [orjson.dumps(c) for c in before])
    source = from_uri(uri)
    sink = JsonlDeadLetters(str(tmp_path / "dead.jsonl"))
    async with probed(source, sink, SimConfig(known_count=100)) as worker:
        await until(lambda: worker.engine.stats.acked >= 200)
        assert (200, {"ready": True, "reason": "running"}) == await worker.readyz()
        samples = await worker.metrics()
        assert 1 == samples[("contact_worker_input_available", ())]
        assert 0 == samples[("contact_worker_input_reconnects_total", ())]
        if partitions > 1:
            assert partitions == samples[("contact_worker_input_partitions_held", ())]
            lost = labelled(samples, "contact_worker_input_leases_lost_total", "kind")
            assert {"partition": 0} == lost
        else:
            assert ("contact_worker_input_partitions_held", ()) not in samples

        await private_redis.kill()
        body = await worker.until_readyz(503)
        assert (False, INPUT_UNAVAILABLE) == (body["ready"], body["reason"])
        assert f"redis 127.0.0.1:{private_redis.port}" in body["detail"]
        assert 200 == await worker.healthz()
        samples = await worker.metrics()
        assert 0 == samples[("contact_worker_input_available", ())]
        assert 0 == samples[("contact_worker_ready", ())]

        await private_redis.start()
        assert {"ready": True, "reason": "running"} == await worker.until_readyz(200)
        await enqueue(uri, [orjson.dumps(c) for c in after])
        await until(lambda: worker.engine.stats.acked >= 400)
        samples = await worker.metrics()
        assert 1 == samples[("contact_worker_input_available", ())]
        assert 1 <= samples[("contact_worker_input_reconnects_total", ())]
        await until(lambda: 0 == source.statistics().unacked)
