"""The coalescer: per-ID merging, one request in flight per ID, oldest first (DESIGN 1, 2)."""

from __future__ import annotations

from typing import Any

import orjson
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from tests.unit.factories import change
from tests.unit.test_change import valid_changes
from worker.core.batch import Batch, pack
from worker.core.change import Change
from worker.core.coalesce import DICT_SHARE, Coalescer, Entry, changes_in


def popped_keys(coalescer: Coalescer) -> list[str]:
    """Pop every ready entry; their keys in pop order."""
    keys = []
    while coalescer.peek() is not None:
        keys.append(coalescer.pop().key)
    return keys


class TestCoalescerMerging:
    """Changes to one ID that wait together merge field by field, later wins."""

    def test_later_value_wins_field_by_field(self) -> None:
        """Fields merge; a field written twice keeps the later value; untouched fields stay."""
        coalescer = Coalescer()
        coalescer.add(change(1, "a", lastname="Lee", extra1="x"), now=0.0)
        coalescer.add(change(1, "b", lastname="Maes", phone="+32"), now=1.0)
        coalescer.add(change(1, "c", extra1=""), now=2.0)
        entry = coalescer.pop()
        assert {"ID": 1, "lastname": "Maes", "extra1": "", "phone": "+32"} == entry.fields
        assert ["a", "b", "c"] == entry.tokens

    def test_one_entry_per_id(self) -> None:
        """However many changes an ID gets, it is ready once."""
        coalescer = Coalescer()
        for i in range(5):
            coalescer.add(change(1, i, extra1=str(i)), now=float(i))
        coalescer.add(change(2, "x", extra1="x"), now=9.0)
        assert 2 == coalescer.ready_count
        assert 2 == coalescer.ids_waiting
        assert ["1", "2"] == popped_keys(coalescer)
        assert 4 == coalescer.coalesced

    def test_integer_and_string_ids_share_a_key(self) -> None:
        """ID 7 and ID "7" are the same contact; the later ID value is the one sent."""
        coalescer = Coalescer()
        coalescer.add(change(7, "a", lastname="Lee"), now=0.0)
        coalescer.add(change("7", "b", firstname="Bo"), now=0.0)
        entry = coalescer.pop()
        assert {"ID": "7", "lastname": "Lee", "firstname": "Bo"} == entry.fields
        assert None is coalescer.peek()

    def test_a_batch_keeps_the_body_it_was_formed_with(self) -> None:
        """A change merged after its ID went out waits for the next request: the body of
        the request in flight is not touched."""
        coalescer = Coalescer()
        coalescer.add(change(1, "a", lastname="Lee"), now=0.0)
        batch = Batch([coalescer.pop()], 1)
        sent = batch.body()
        coalescer.add(change(1, "b", lastname="Maes"), now=0.0)
        assert sent == batch.body() == b'[{"ID":1,"lastname":"Lee"}]'

    def test_since_and_seq_are_those_of_the_oldest_change(self) -> None:
        """Linger and fairness count from the oldest change merged into an entry."""
        coalescer = Coalescer()
        coalescer.add(change(1, "a", extra1="1"), now=3.0)
        coalescer.add(change(1, "b", extra1="2"), now=8.0)
        entry = coalescer.pop()
        assert (1, 3.0) == (entry.seq, entry.since)

    @settings(max_examples=200, deadline=None)
    @given(
        st.lists(
            st.tuples(
                st.integers(0, 3),
                st.dictionaries(
                    st.sampled_from(["lastname", "extra1", "extra2"]),
                    st.text(max_size=3),
                    min_size=1,
                ),
            ),
            max_size=30,
        )
    )
    def test_merge_is_the_source_order_fold(self, stream: list[tuple[int, dict[str, str]]]) -> None:
        """Whatever the stream, each ID's entry is the fold of its changes in source order,
        with all their tokens in that order, and IDs come out by first arrival."""
        coalescer = Coalescer()
        expected: dict[str, dict[str, Any]] = {}
        tokens: dict[str, list[int]] = {}
        for token, (id_, fields) in enumerate(stream):
            coalescer.add(change(id_, token, **fields), now=float(token))
            expected.setdefault(str(id_), {}).update({"ID": id_, **fields})
            tokens.setdefault(str(id_), []).append(token)
        assert len(stream) == coalescer.changes_waiting
        actual = {}
        actual_tokens = {}
        while coalescer.peek() is not None:
            entry = coalescer.pop()
            actual[entry.key] = entry.fields
            actual_tokens[entry.key] = entry.tokens
        assert expected == actual
        assert tokens == actual_tokens
        assert list(expected) == list(actual)
        assert 0 == coalescer.changes_waiting


class TestCoalescerInFlight:
    """An ID popped into a request waits for :meth:`release` before it is ready again."""

    def test_popped_id_is_not_ready_until_released(self) -> None:
        """Changes to an ID in flight merge but are not handed out until release."""
        coalescer = Coalescer()
        coalescer.add(change(1, "a", extra1="1"), now=0.0)
        first = coalescer.pop()
        coalescer.add(change(1, "b", extra1="2"), now=1.0)
        coalescer.add(change(1, "c", lastname="Lee"), now=2.0)
        assert coalescer.is_in_flight("1")
        assert None is coalescer.peek()
        assert 0 == coalescer.ready_count
        assert 1 == coalescer.ids_waiting
        assert 1 == coalescer.ids_in_flight
        coalescer.release(first.key)
        assert not coalescer.is_in_flight("1")
        second = coalescer.pop()
        assert {"ID": 1, "extra1": "2", "lastname": "Lee"} == second.fields
        assert ["b", "c"] == second.tokens

    def test_release_without_waiting_changes(self) -> None:
        """Releasing an ID with nothing waiting leaves nothing ready."""
        coalescer = Coalescer()
        coalescer.add(change(1, "a", extra1="1"), now=0.0)
        coalescer.release(coalescer.pop().key)
        assert None is coalescer.peek()
        assert 0 == coalescer.ids_in_flight
        assert 0 == coalescer.ids_waiting

    def test_other_ids_are_not_held_up(self) -> None:
        """An ID in flight does not block other IDs."""
        coalescer = Coalescer()
        coalescer.add(change(1, "a", extra1="1"), now=0.0)
        coalescer.pop()
        coalescer.add(change(1, "b", extra1="2"), now=1.0)
        coalescer.add(change(2, "c", extra1="1"), now=2.0)
        assert ["2"] == popped_keys(coalescer)


class TestCoalescerFairness:
    """Ready IDs come out by the age of their oldest waiting change."""

    def test_pop_order_is_arrival_order_of_the_oldest_change(self) -> None:
        """A later change to an old ID does not push it back; new IDs queue behind."""
        coalescer = Coalescer()
        coalescer.add(change(3, "a", extra1="1"), now=0.0)
        coalescer.add(change(1, "b", extra1="1"), now=1.0)
        coalescer.add(change(2, "c", extra1="1"), now=2.0)
        coalescer.add(change(3, "d", extra1="2"), now=3.0)
        assert ["3", "1", "2"] == popped_keys(coalescer)

    def test_released_id_with_older_change_goes_first(self) -> None:
        """An ID whose waiting change arrived while it was in flight goes before IDs whose
        changes arrived later, once released."""
        coalescer = Coalescer()
        coalescer.add(change(1, "a", extra1="1"), now=0.0)
        in_flight = coalescer.pop()
        coalescer.add(change(1, "b", extra1="2"), now=1.0)  # older than 2 and 3
        coalescer.add(change(2, "c", extra1="1"), now=2.0)
        coalescer.add(change(3, "d", extra1="1"), now=3.0)
        coalescer.release(in_flight.key)
        assert ["1", "2", "3"] == popped_keys(coalescer)

    def test_released_id_with_newer_change_waits_its_turn(self) -> None:
        """An ID whose waiting change is younger than others goes after them."""
        coalescer = Coalescer()
        coalescer.add(change(1, "a", extra1="1"), now=0.0)
        in_flight = coalescer.pop()
        coalescer.add(change(2, "c", extra1="1"), now=1.0)
        coalescer.add(change(1, "b", extra1="2"), now=2.0)
        coalescer.add(change(3, "d", extra1="1"), now=3.0)
        coalescer.release(in_flight.key)
        assert ["2", "1", "3"] == popped_keys(coalescer)


class TestCoalescerCounts:
    """The counts the source's bound and the metrics read."""

    def test_changes_waiting_counts_changes_not_ids(self) -> None:
        """changes_waiting counts every change held, merged or not, and drops on pop."""
        coalescer = Coalescer()
        coalescer.add(change(1, "a", extra1="1"), now=0.0)
        coalescer.add(change(1, "b", extra1="2"), now=0.0)
        coalescer.add(change(2, "c", extra1="1"), now=0.0)
        assert 3 == coalescer.changes_waiting
        first = coalescer.pop()
        assert 1 == coalescer.changes_waiting
        coalescer.add(change(1, "d", extra1="3"), now=0.0)  # waits behind the one in flight
        assert 2 == coalescer.changes_waiting
        coalescer.release(first.key)
        coalescer.pop()
        coalescer.pop()
        assert 0 == coalescer.changes_waiting
        assert 1 == coalescer.coalesced  # "d" found nothing waiting to merge into


OPS = st.lists(
    st.one_of(
        st.tuples(st.just("add"), st.integers(0, 6)),
        st.tuples(st.just("pop"), st.just(0)),
        st.tuples(st.just("release"), st.integers(0, 6)),
    ),
    max_size=40,
)


def replay(ops: list[tuple[str, int]], *coalescers: Coalescer) -> None:
    """Carry out ``ops`` (adds, pops, releases of IDs in flight) on each coalescer alike."""
    for number, (op, key) in enumerate(ops):
        for coalescer in coalescers:
            if op == "add":
                coalescer.add(change(key, number, extra1=str(number)), now=float(number))
            elif op == "pop" and coalescer.ready_count:
                coalescer.pop()
            elif op == "release" and coalescer.is_in_flight(str(key)):
                coalescer.release(str(key))


@settings(max_examples=200, deadline=None)
@given(OPS, st.integers(0, 8))
def test_pop_many_takes_what_as_many_pops_would(ops: list[tuple[str, int]], count: int) -> None:
    """Whatever came before (merges, IDs in flight, releases that make IDs ready again),
    pop_many(n) takes the same entries in the same order as n calls of pop."""
    one, many = Coalescer(), Coalescer()
    replay(ops, one, many)
    expected = [one.pop() for _ in range(min(count, one.ready_count))]
    assert [(e.key, e.tokens) for e in expected] == [
        (e.key, e.tokens) for e in many.pop_many(count)
    ]
    assert (one.ready_count, one.changes_waiting) == (many.ready_count, many.changes_waiting)


@settings(max_examples=200, deadline=None)
@given(OPS, st.lists(st.integers(0, 6), unique=True, max_size=7), st.booleans())
def test_release_many_is_release_of_each(
    ops: list[tuple[str, int]], keys: list[int], held: bool
) -> None:
    """release_many (the applied batch's path) leaves the coalescer as releasing each key in
    order would: the same ready order, the same IDs in flight and held."""
    one, many = Coalescer(), Coalescer()
    replay(ops, one, many)
    for coalescer in (one, many):
        if held:  # a hold that began while they were in flight: released, they stay held
            coalescer.hold("replay", lambda key: key in {"1", "4"})
    flying = [str(key) for key in keys if one.is_in_flight(str(key))]
    for name in flying:
        one.release(name)
    many.release_many(flying)
    assert (one.ids_in_flight, one.ids_held, one.ready_count) == (
        many.ids_in_flight,
        many.ids_held,
        many.ready_count,
    )
    assert [(e.key, e.tokens) for e in one.pop_many(99)] == [
        (e.key, e.tokens) for e in many.pop_many(99)
    ]


@settings(max_examples=200, deadline=None)
@given(OPS)
def test_changes_counts_every_token(ops: list[tuple[str, int]]) -> None:
    """Each entry counts the changes merged into it as they merge: its count is its tokens',
    and changes_in (what a batch carried) sums them."""
    coalescer = Coalescer()
    replay(ops, coalescer)
    entries = coalescer.pop_many(99)
    assert [len(e.tokens) for e in entries] == [e.changes for e in entries]
    assert sum(len(e.tokens) for e in entries) == changes_in(entries)


@settings(max_examples=200, deadline=None)
@given(st.lists(valid_changes(), min_size=1, max_size=6), st.sampled_from([0.0, 2.0]))
def test_bodies_are_what_orjson_would_write(objects: list[dict[str, Any]], share: float) -> None:
    """A request's body is encoded by msgspec (allocated to its size): byte for byte what
    orjson.dumps writes, for lone changes held as dicts or encoded (``dict_share`` 0: always
    dicts; 2: never), and for merged ones. Merging never writes into the dicts handed to
    :meth:`add`."""
    originals = [dict(obj) for obj in objects]
    coalescer = Coalescer(dict_share=share)
    for number, obj in enumerate(objects):
        coalescer.add(Change(str(number % 3), obj, number), now=0.0)
    assert originals == objects
    entries = coalescer.pop_many(9)
    lone = [e for e in entries if e.changes == 1]
    assert all(type(e.body) is (dict if share == 0 else bytes) for e in lone)
    assert all(e.fields == objects[int(e.key)] for e in lone)
    assert all(e.body == orjson.dumps(objects[int(e.key)]) for e in lone if share)
    kept, body = pack(entries, 10**9)
    assert kept == entries
    assert orjson.dumps([e.fields for e in entries]) == body
    kept, small = pack(entries, 1)  # over the limit: entry by entry, the first alone
    assert kept == entries[:1] and orjson.dumps([entries[0].fields]) == small


@settings(max_examples=100, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 6), st.sampled_from(["extra1", "lastname"])), max_size=40))
def test_held_as_dicts_or_encoded_the_same(stream: list[tuple[int, str]]) -> None:
    """Whether new IDs' changes are held as dicts or encoded, the coalescer hands out the
    same entries, in the same order, with the same objects and tokens."""

    def run(share: float) -> list[tuple[str, dict[str, Any], list[Any], int]]:
        coalescer = Coalescer(dict_share=share)
        out = []
        for token, (id_, name) in enumerate(stream):
            coalescer.add(change(id_, token, **{name: str(token)}), now=float(token))
            if token % 7 == 6:  # some go out, and come back behind newer changes
                for e in coalescer.pop_many(2):
                    out.append((e.key, e.fields, e.tokens, e.seq))
                    coalescer.release(e.key)
        out += [(e.key, e.fields, e.tokens, e.seq) for e in coalescer.pop_many(99)]
        return out

    assert run(0.0) == run(2.0) == run(DICT_SHARE)


def test_held_as_dicts_where_changes_merge() -> None:
    """A stream whose changes merge (few IDs) has new IDs' changes held as dicts; one whose
    IDs turn over (each ID once) has them encoded: a dict spares work only at a merge."""
    merging, turning = Coalescer(), Coalescer()
    for n in range(2_000):
        merging.add_all([(str(n % 50), {"ID": n % 50, "extra1": "x"}, n)], now=0.0)
        turning.add_all([(str(n), {"ID": n, "extra1": "x"}, n)], now=0.0)
    assert merging.holds_dicts and not turning.holds_dicts
    merging.add_all([("new", {"ID": "new", "extra1": "y"}, -1)], now=0.0)
    turning.add_all([("new", {"ID": "new", "extra1": "y"}, -1)], now=0.0)
    assert type(merging.pop_many(99)[-1].body) is dict
    assert type(turning.pop_many(9_999)[-1].body) is bytes


class CoalescerModel(RuleBasedStateMachine):
    """The coalescer against the plainest model of what it promises: per ID, the fold of its
    waiting changes; ready, the waiting IDs neither in flight nor held, oldest entry first;
    whatever the mix of merges, pops, releases (of IDs in flight or not), holds and forgets;
    and an entry handed out or forgotten never changes after."""

    def __init__(self) -> None:
        super().__init__()
        self.coalescer = Coalescer()
        self.waiting: dict[str, tuple[dict[str, Any], list[int], int]] = {}
        self.flying: set[str] = set()
        self.holds: dict[str, frozenset[str] | None] = {}
        self.seq = self.token = self.coalesced = 0
        self.out: list[tuple[Entry, tuple[Any, ...]]] = []
        """Entries handed out or forgotten, with what they held then."""

    def kept(self, tokens: list[int]) -> list[int]:
        """The tokens an entry keeps of the changes merged into it: all of them."""
        return tokens

    def arrival(self, last: int, token: int) -> int:
        """The arrival number of a new entry: the next one."""
        return last + 1

    def covered(self, key: str) -> bool:
        return any(keys is None or key in keys for keys in self.holds.values())

    def ready(self) -> list[str]:
        keys = [k for k in self.waiting if k not in self.flying and not self.covered(k)]
        return sorted(keys, key=lambda k: self.waiting[k][2])

    def handed(self, e: Entry) -> None:
        """``e`` left the coalescer: it must hold what the model says, and keep it."""
        fields, tokens, seq = self.waiting.pop(e.key)
        assert (fields, self.kept(tokens), seq, len(tokens)) == (
            e.fields,
            e.tokens,
            e.seq,
            e.changes,
        )
        self.out.append((e, (orjson.dumps(e.fields), list(e.tokens), e.changes, e.seq, e.since)))

    @rule(
        changes=st.lists(
            st.tuples(
                st.integers(0, 5),
                st.sampled_from(["extra1", "lastname"]),
                st.sampled_from(["a", "b", ""]),
            ),
            min_size=1,
            max_size=3,
        )
    )
    def add_all(self, changes: list[tuple[int, str, str]]) -> None:
        batch = []
        for id_, name, value in changes:
            key, self.token = str(id_), self.token + 1
            batch.append((key, {"ID": id_, name: value}, self.token))
            if key in self.waiting:
                fields, tokens, _ = self.waiting[key]
                fields.update({"ID": id_, name: value})
                tokens.append(self.token)
                self.coalesced += 1
            else:
                self.seq = self.arrival(self.seq, self.token)
                self.waiting[key] = ({"ID": id_, name: value}, [self.token], self.seq)
        self.coalescer.add_all(batch, now=float(self.token))

    @rule(count=st.integers(0, 4))
    def pop_many(self, count: int) -> None:
        expected = self.ready()[:count]
        taken = self.coalescer.pop_many(count)
        assert expected == [e.key for e in taken]
        for e in taken:
            self.handed(e)
            self.flying.add(e.key)

    @rule()
    def pop(self) -> None:
        expected = self.ready()
        if expected:
            e = self.coalescer.pop()
            assert expected[0] == e.key
            self.handed(e)
            self.flying.add(e.key)

    @rule(keys=st.lists(st.sampled_from("012345"), max_size=4))
    def release_many(self, keys: list[str]) -> None:
        """Releases of IDs in flight end their requests; of others (or again), nothing."""
        self.coalescer.release_many(keys)
        self.flying -= set(keys)

    @rule(key=st.sampled_from("012345"))
    def release(self, key: str) -> None:
        self.coalescer.release(key)
        self.flying.discard(key)

    @rule(
        name=st.sampled_from(["r1", "r2"]),
        keys=st.none() | st.frozensets(st.sampled_from("012345")),
    )
    def hold(self, name: str, keys: frozenset[str] | None) -> None:
        if name in self.holds:  # a name is held once (the scheduler's replay ranges)
            return
        self.coalescer.hold(name, None if keys is None else keys.__contains__)
        self.holds[name] = keys

    @rule(name=st.sampled_from(["r1", "r2"]))
    def unhold(self, name: str) -> None:
        held = [k for k in self.waiting if k not in self.flying and self.covered(k)]
        self.holds.pop(name, None)
        freed = [k for k in held if not self.covered(k)]
        assert len(freed) == self.coalescer.unhold(name)

    @rule(keys=st.frozensets(st.sampled_from("012345")), held=st.booleans())
    def forget(self, keys: frozenset[str], held: bool) -> None:
        """Forget some IDs' waiting changes, or those a hold keeps (dropping replays)."""
        drop = self.coalescer.is_held if held else keys.__contains__
        expected = sorted(k for k in self.waiting if drop(k))
        gone = self.coalescer.forget(drop)
        assert expected == sorted(e.key for e in gone)
        for e in gone:
            self.handed(e)

    @invariant()
    def counts_agree(self) -> None:
        c, ready = self.coalescer, self.ready()
        assert len(ready) == c.ready_count
        assert (ready[0] if ready else None) == (None if c.peek() is None else c.peek().key)
        assert len(self.waiting) == c.ids_waiting
        assert len(self.flying) == c.ids_in_flight
        assert sum(len(t) for _, t, _ in self.waiting.values()) == c.changes_waiting
        held = [k for k in self.waiting if k not in self.flying and self.covered(k)]
        assert len(held) == c.ids_held
        assert self.coalesced == c.coalesced
        assert sorted(self.holds) == sorted(c.holds)
        for k in "012345":
            assert c.is_in_flight(k) == (k in self.flying)
            assert c.is_held(k) == self.covered(k)

    @invariant()
    def handed_out_entries_stay_as_they_left(self) -> None:
        for e, then in self.out:
            assert then == (orjson.dumps(e.fields), list(e.tokens), e.changes, e.seq, e.since)


TestCoalescerModel = CoalescerModel.TestCase
TestCoalescerModel.settings = settings(max_examples=300, stateful_step_count=40, deadline=None)


class EndsOnlyModel(CoalescerModel):
    """The same promises where only the first and the last token of an entry's changes are
    kept (``keep_tokens`` False: an input that acknowledges by count): every change still
    counted, and the same fold."""

    def __init__(self) -> None:
        super().__init__()
        self.coalescer.keep_tokens = False

    def kept(self, tokens: list[int]) -> list[int]:
        return tokens if len(tokens) == 1 else [tokens[0], tokens[-1]]


TestEndsOnlyModel = EndsOnlyModel.TestCase
TestEndsOnlyModel.settings = settings(max_examples=150, stateful_step_count=40, deadline=None)


class FileModel(EndsOnlyModel):
    """The same promises for a file read without a checkpoint: the ends of the tokens kept,
    and the tokens (line numbers, increasing) taken as the arrival numbers, in the same
    order as numbers of the coalescer's own."""

    def __init__(self) -> None:
        super().__init__()
        self.coalescer.tokens_numbered = True

    def arrival(self, last: int, token: int) -> int:
        return token


TestFileModel = FileModel.TestCase
TestFileModel.settings = settings(max_examples=150, stateful_step_count=40, deadline=None)
