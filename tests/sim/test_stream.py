"""The change-stream generator: determinism, shape, and the expected final state."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import aiohttp
import orjson
import pytest

from worker.sim.gateway import SimConfig, Simulator, check_contact, serve
from worker.sim.stream import (
    UNKNOWN_ID_BASE,
    StreamSpec,
    expected_final_state,
    generate_lines,
    unknown_pool,
    valid_change,
    write_file,
)

AUTH = {"X-Client-Id": "demo", "X-Client-Secret": "demo-secret"}


def test_same_seed_same_lines_other_seed_other_lines() -> None:
    spec = StreamSpec(changes=2_000, invalid=7, seed=5)
    assert list(generate_lines(spec)) == list(generate_lines(spec))
    assert list(generate_lines(spec)) != list(generate_lines(StreamSpec(changes=2_000, seed=6)))


@pytest.mark.parametrize("distribution", ["uniform", "zipf"])
def test_counts_and_shape(distribution: str) -> None:
    spec = StreamSpec(
        changes=20_000, contacts=1_000, unknown_share=0.1, invalid=12, distribution=distribution
    )
    lines = list(generate_lines(spec))
    assert len(lines) == spec.lines == 20_012
    assert all(line.endswith(b"\n") and line.count(b"\n") == 1 for line in lines)
    valid = [c for c in map(valid_change, lines) if c is not None]
    assert len(valid) == 20_000  # exactly the invalid lines are invalid
    ids = [int(c["ID"]) for c in valid]  # type: ignore[call-overload]
    # unknown_share is the share of distinct IDs the API does not know (stale IDs recur).
    distinct = set(ids)
    stale = {i for i in distinct if i >= UNKNOWN_ID_BASE}
    assert len(stale) <= unknown_pool(spec) == 111
    if distribution == "uniform":
        assert 0.08 < len(stale) / len(distinct) < 0.12
    else:
        assert stale
    assert all(1 <= i <= 1_000 for i in ids if i < UNKNOWN_ID_BASE)
    kinds = Counter(type(c["ID"]) for c in valid)
    assert kinds[int] > 2_000 and kinds[str] > 2_000
    sizes = Counter(len(c) - 1 for c in valid)
    assert set(sizes) == {1, 2, 3}
    fields = Counter(name for c in valid for name in c if name != "ID")
    assert {"lastname", "phone", "birthday", "unsubscribed", "groupid", "extra8"} <= set(fields)
    assert all(isinstance(c["groupid"], str) for c in valid if "groupid" in c)


def test_zipf_is_skewed_and_uniform_is_not() -> None:
    def top_share(distribution: str) -> float:
        spec = StreamSpec(
            changes=20_000, contacts=1_000, unknown_share=0, invalid=0, distribution=distribution
        )
        ids = Counter(str(orjson.loads(line)["ID"]) for line in generate_lines(spec))
        return sum(n for _, n in ids.most_common(10)) / spec.changes

    assert top_share("zipf") > 0.2
    assert top_share("uniform") < 0.05


def test_invalid_lines_cover_the_common_mistakes() -> None:
    spec = StreamSpec(changes=100, invalid=5)
    bad = [line for line in generate_lines(spec) if valid_change(line) is None]
    assert len(bad) == 5
    reasons = []
    for line in bad:
        try:
            obj = orjson.loads(line)
        except orjson.JSONDecodeError:
            reasons.append("bad json")
            continue
        problem = check_contact(obj)
        assert problem is not None
        reasons.append(problem[1].split(":")[-1].strip())
    assert reasons.count("bad json") == 1
    assert "object without ID" in reasons
    assert any("nickname" in r for r in reasons)
    assert any("birthday" in r for r in reasons)
    assert any("unsubscribed" in r for r in reasons)


def test_spec_is_validated() -> None:
    for bad in ({"contacts": 0}, {"distribution": "pareto"}, {"unknown_share": 2.0}):
        with pytest.raises(ValueError):
            StreamSpec(**bad)


def test_expected_final_state_merges_valid_changes_in_order() -> None:
    lines = [
        b'{"ID": "1", "lastname": "Lee", "extra2": "B"}\n',
        b'{"ID": 1, "lastname": "Li"}\n',
        b'{"ID": "2", "nickname": "x"}\n',
        b'{"ID": "2", "unsubscribed": true}\n',
        b'{"ID": "3"}\n',
        b'{"ID": "1", "extra2": ""\n',
        b'{"ID": 900000001, "phone": "+32470123456"}\n',
    ]
    assert expected_final_state(lines) == {
        "1": {"lastname": "Li", "extra2": "B"},
        "2": {"unsubscribed": True},
        "900000001": {"phone": "+32470123456"},
    }


def test_write_file(tmp_path: Path) -> None:
    spec = StreamSpec(changes=25_000, invalid=3)
    path = tmp_path / "changes.jsonl"
    write_file(spec, path)
    assert path.read_bytes() == b"".join(generate_lines(spec))


@pytest.mark.anyio
async def test_a_correct_sender_reaches_the_expected_state() -> None:
    """Send the stream in order, one ID per request at most once, and compare with the oracle."""
    spec = StreamSpec(changes=3_000, contacts=300, unknown_share=0.05, invalid=5, seed=9)
    lines = list(generate_lines(spec))
    sim = Simulator(SimConfig(known_count=spec.contacts))
    batches: list[list[dict[str, object]]] = [[]]
    seen: set[str] = set()
    for change in filter(None, map(valid_change, lines)):
        key = str(change["ID"])
        if key in seen or len(batches[-1]) == 50:
            batches.append([])
            seen.clear()
        batches[-1].append(change)
        seen.add(key)
    async with serve(sim) as url, aiohttp.ClientSession() as session:
        for batch in batches:
            known = [c for c in batch if sim.is_known(str(c["ID"]))]
            # A real worker isolates the unknown IDs; here they are simply left out.
            if not known:
                continue
            async with session.patch(
                url + "/v1/contact", data=orjson.dumps(known), headers=AUTH
            ) as resp:
                assert resp.status == 204
    expected = {k: v for k, v in expected_final_state(lines).items() if sim.is_known(k)}
    assert sim.contacts == expected
    assert sim.stats.duplicate_ids_in_a_request == 0
