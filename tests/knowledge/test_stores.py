"""The knowledge store contract, held against the real SQLite, Redis and PostgreSQL."""

from __future__ import annotations

import os
import tempfile
import urllib.parse
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import anyio
import asyncpg
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from tests.redis.conftest import SHARED, _reachable
from worker.backends.postgres.uri import parse_uri as parse_pg
from worker.backends.redis.uri import parse_uri as parse_redis
from worker.core.knowledge import Known
from worker.knowledge.base import KnowledgeError, KnowledgeStore, StoreCounts, StoredFact
from worker.knowledge.postgres import PostgresKnowledge
from worker.knowledge.redis import RedisKnowledge
from worker.knowledge.sqlite import SqliteKnowledge

pytestmark = pytest.mark.anyio

BASE_DSN = os.environ.get("WORKER_TEST_POSTGRES", "postgresql://postgres@127.0.0.1:5432/test")
KINDS = ["sqlite", "redis", "postgresql"]


async def _sqlite(tmp_path: Path) -> tuple[Callable[[], KnowledgeStore], Callable[[], object]]:
    path = str(tmp_path / "state.db")

    async def cleanup() -> None:
        pass

    return lambda: SqliteKnowledge(path), cleanup


async def _redis(tmp_path: Path) -> tuple[Callable[[], KnowledgeStore], Callable[[], object]]:
    if not _reachable(*SHARED):
        pytest.skip("no Redis on 127.0.0.1:6379")
    stream = f"test:{uuid.uuid4().hex}"
    address = parse_redis(f"redis://{SHARED[0]}:{SHARED[1]}/0?stream={stream}")

    async def cleanup() -> None:
        store = RedisKnowledge(address)
        async with store:
            await store.clear()

    return lambda: RedisKnowledge(address), cleanup


async def _postgres(tmp_path: Path) -> tuple[Callable[[], KnowledgeStore], Callable[[], object]]:
    schema = f"test_{uuid.uuid4().hex[:12]}"
    admin = await asyncpg.connect(BASE_DSN, timeout=5)
    await admin.execute(f"CREATE SCHEMA {schema}")
    target = parse_pg(f"{BASE_DSN}?{urllib.parse.urlencode({'schema': schema})}")

    async def cleanup() -> None:
        await admin.execute(f"DROP SCHEMA IF EXISTS {schema} CASCADE")
        await admin.close()

    return lambda: PostgresKnowledge(target), cleanup


MAKERS = {"sqlite": _sqlite, "redis": _redis, "postgresql": _postgres}


@pytest.fixture(params=KINDS)
async def make(
    request: pytest.FixtureRequest, tmp_path: Path
) -> AsyncIterator[Callable[[], KnowledgeStore]]:
    """A factory of stores that all reach the same place (two replicas, or a restart)."""
    factory, cleanup = await MAKERS[request.param](tmp_path)
    try:
        yield factory
    finally:
        await cleanup()  # type: ignore[misc]


def fact(key: str, known: Known, at: float) -> StoredFact:
    return StoredFact(key, known, at)


class TestKnowledgeStores:
    """Each store keeps facts with a TTL and a size bound, shared and across restarts."""

    async def test_saved_facts_load_back(self, make: Callable[[], KnowledgeStore]) -> None:
        """What one store saved, another (a replica, or the next run) loads."""
        async with make() as one:
            await one.save([fact("1", Known.EXISTS, 100.0), fact("2", Known.MISSING, 101.0)])
        async with make() as two:
            got = sorted(await two.load(["1", "2", "3"], 0.0), key=lambda f: f.key)
            assert [fact("1", Known.EXISTS, 100.0), fact("2", Known.MISSING, 101.0)] == got
            assert StoreCounts(1, 1) == await two.counts()

    async def test_expired_facts_are_not_loaded(self, make: Callable[[], KnowledgeStore]) -> None:
        """Facts learnt at or before ``since`` are not returned."""
        async with make() as store:
            await store.save([fact("1", Known.EXISTS, 100.0), fact("2", Known.EXISTS, 200.0)])
            assert ["2"] == [f.key for f in await store.load(["1", "2"], 100.0)]

    async def test_newer_fact_replaces(self, make: Callable[[], KnowledgeStore]) -> None:
        """One fact per ID: a later answer replaces an earlier one, an older one does not."""
        async with make() as store:
            await store.save([fact("1", Known.MISSING, 100.0)])
            await store.save([fact("1", Known.EXISTS, 150.0)])
            await store.save([fact("1", Known.MISSING, 120.0)])  # a slow replica's older one
            assert [fact("1", Known.EXISTS, 150.0)] == await store.load(["1"], 0.0)
            assert StoreCounts(1, 0) == await store.counts()

    async def test_prune_expired_and_bound(self, make: Callable[[], KnowledgeStore]) -> None:
        """Prune drops the expired, then the oldest beyond the bound of each kind."""
        async with make() as store:
            await store.save([fact(str(n), Known.EXISTS, 100.0 + n) for n in range(10)])
            await store.save([fact("m", Known.MISSING, 50.0)])
            dropped = await store.prune(before=101.5, max_ids=5)
            assert 2 + 1 + 3 == dropped  # 0, 1 and m expired; 2, 3, 4 beyond the bound
            keys = sorted(f.key for f in await store.load([str(n) for n in range(10)], 0.0))
            assert ["5", "6", "7", "8", "9"] == keys
            assert StoreCounts(5, 0) == await store.counts()

    async def test_clear(self, make: Callable[[], KnowledgeStore]) -> None:
        """Clear forgets everything and says how much."""
        async with make() as store:
            await store.save([fact(str(n), Known.EXISTS, 1.0) for n in range(4)])
            assert 4 == await store.clear()
            assert [] == await store.load(["0", "1"], 0.0)
            assert StoreCounts(0, 0) == await store.counts()

    async def test_forget_drops_only_the_keys_named(
        self, make: Callable[[], KnowledgeStore]
    ) -> None:
        """Forget (what ``dlq replay`` asks) drops the facts of the keys named, of either
        kind, and says how many; the others stay."""
        async with make() as store:
            await store.save([fact(str(n), Known.MISSING, 1.0) for n in range(4)])
            await store.save([fact("e", Known.EXISTS, 1.0)])
            assert 2 == await store.forget(["1", "e", "not-known"])
            assert 0 == await store.forget([])
            assert ["0", "2", "3"] == sorted(f.key for f in await store.load(list("0123e"), 0.0))
            assert StoreCounts(0, 3) == await store.counts()
            assert 0 == await store.forget([str(n) for n in range(4, 1004)])  # many, none known

    async def test_many_ids_in_one_load(self, make: Callable[[], KnowledgeStore]) -> None:
        """A read slice of IDs loads in one call, whatever its size."""
        async with make() as store:
            await store.save([fact(str(n), Known.EXISTS, 1.0) for n in range(0, 3000, 2)])
            assert 1500 == len(await store.load([str(n) for n in range(3000)], 0.0))


async def test_unreachable_redis_is_a_knowledge_error() -> None:
    """A store that cannot be reached raises KnowledgeError (the run goes on without)."""
    store = RedisKnowledge(parse_redis("redis://127.0.0.1:1/0"))
    with pytest.raises(KnowledgeError, match="127.0.0.1:1"):
        await store.open()
    await store.close()


Op = tuple[str, str, bool, float]
OPS = st.lists(
    st.tuples(
        st.sampled_from(["save", "prune"]),
        st.sampled_from([str(n) for n in range(8)]),
        st.booleans(),
        st.floats(min_value=0.0, max_value=100.0, allow_nan=False).map(lambda x: round(x, 3)),
    ),
    max_size=25,
)


def model_of(ops: list[Op], max_ids: int) -> dict[str, tuple[bool, float]]:
    """What a store must hold after ``ops`` (all at different times): the newest fact per ID,
    pruned as asked."""
    facts: dict[str, tuple[bool, float]] = {}
    for kind, key, exists, at in ops:
        if kind == "save":
            if key not in facts or at >= facts[key][1]:
                facts[key] = (exists, at)
            continue
        facts = {k: v for k, v in facts.items() if v[1] > at}
        for flag in (True, False):
            same = sorted(((v[1], k) for k, v in facts.items() if v[0] is flag), reverse=True)
            for _, k in same[max_ids:]:
                del facts[k]
    return facts


class TestStoresAgainstAModel:
    """Random saves and prunes: each real store holds what a dict model says (no ties)."""

    @pytest.mark.slow
    @pytest.mark.parametrize("kind", KINDS)
    @settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(ops=OPS)
    def test_matches_the_model(self, kind: str, ops: list[Op]) -> None:
        """Whatever the sequence, load returns the model's facts."""
        times = [at for _, _, _, at in ops]
        assume(len(times) == len(set(times)))

        async def check(tmp: Path) -> None:
            factory, cleanup = await MAKERS[kind](tmp)
            try:
                async with factory() as store:
                    for op, key, exists, at in ops:
                        if op == "save":
                            known = Known.EXISTS if exists else Known.MISSING
                            await store.save([StoredFact(key, known, at)])
                        else:
                            await store.prune(at, 3)
                    got = {
                        f.key: (f.known is Known.EXISTS, f.learnt_at)
                        for f in await store.load([str(n) for n in range(8)], -1.0)
                    }
                assert model_of(ops, 3) == got
            finally:
                await cleanup()  # type: ignore[misc]

        with tempfile.TemporaryDirectory() as name:
            anyio.run(check, Path(name))
