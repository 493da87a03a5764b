"""The partition-ownership policy, without a broker: a model lease store and many replicas.

Replicas run rounds at hypothesis-chosen moments against a store that behaves as Redis does
with ``SET NX PX`` leases (an expired lease is free), die and come back, and keep records in
flight for a while. Checked at every step: no partition is released while a record of it is
in flight; no two replicas may hand out records of one partition at the same time; and once
membership is stable, the replicas converge to a fair share of all partitions.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from worker.core.ownership import Ownership, Plan, State, fair_share

LEASE_S = 3.0


@dataclass
class Store:
    """Leases as Redis keeps them: holder and expiry, an expired lease is free."""

    leases: dict[int, tuple[str, float]] = field(default_factory=dict)

    def holder(self, p: int, now: float) -> str | None:
        lease = self.leases.get(p)
        return lease[0] if lease is not None and lease[1] > now else None

    def take(self, p: int, member: str, now: float) -> bool:
        if self.holder(p, now) is not None:
            return False
        self.leases[p] = (member, now + LEASE_S)
        return True

    def renew(self, p: int, member: str, now: float) -> bool:
        if self.holder(p, now) != member:
            return False
        self.leases[p] = (member, now + LEASE_S)
        return True

    def release(self, p: int, member: str, now: float) -> None:
        if self.holder(p, now) == member:
            del self.leases[p]


@dataclass
class Replica:
    """One member: its ownership, and its records in flight per partition."""

    name: str
    own: Ownership
    in_flight: dict[int, int] = field(default_factory=dict)
    alive: bool = True

    def round(self, store: Store, now: float, live: int, delay: float) -> Plan:
        """One round as a backend runs it; each store call lands ``delay`` after it is sent."""
        self.own.expire(now)
        plan = self.own.plan(live, self.in_flight)
        for p in plan.renew:
            if store.renew(p, self.name, now + delay):
                self.own.renewed(p, now, LEASE_S)
            else:
                self.own.lose(p, "lease lost")
                self.in_flight.pop(p, None)
        for p in plan.release:
            assert self.in_flight.get(p, 0) == 0, "released with records in flight"
            store.release(p, self.name, now + delay)
            self.own.released(p)
        wanted = plan.want
        for p in plan.take:
            if wanted <= 0:
                break
            if store.take(p, self.name, now + delay):
                self.own.taken(p, now, LEASE_S)
                wanted -= 1
        for p in plan.given_back:
            # The engine forgets what waits; what is in flight stays counted.
            assert self.own.generation(p) is None
        return plan


def handing_out(replicas: list[Replica], now: float) -> dict[int, list[str]]:
    """Per partition, the live replicas that would hand out its records at ``now``."""
    out: dict[int, list[str]] = {}
    for r in replicas:
        if not r.alive:
            continue
        r.own.expire(now)
        for p in r.own.reading():
            out.setdefault(p, []).append(r.name)
    return out


class TestOwnershipRules:
    """Single decisions."""

    def test_takes_its_share_from_its_own_start(self) -> None:
        """Alone, a replica wants every partition, starting at crc32(member) % P."""
        own = Ownership(6, "r1")
        plan = own.plan(1, {})
        assert 6 == plan.want
        assert 6 == len(set(plan.take))
        assert () == plan.renew

    def test_gives_back_above_the_share_and_releases_when_idle(self) -> None:
        """Three live: a holder of all six gives back its highest four, keeps the leases
        while records are in flight, releases each once nothing of it is."""
        own = Ownership(6, "r1")
        generations = [own.taken(p, 0.0, LEASE_S) for p in range(6)]
        assert [1, 2, 3, 4, 5, 6] == generations
        plan = own.plan(3, {2: 1, 3: 0})
        assert (2, 3, 4, 5) == plan.given_back
        assert (3, 4, 5) == plan.release
        assert frozenset({0, 1}) == own.reading()
        assert None is own.generation(2)
        assert not own.current(2, 3)
        assert 3 == own.held_generation(2)  # not read, still held: its drops still count
        for p in plan.release:
            own.released(p)
        assert frozenset({0, 1, 2}) == own.held()
        assert (2,) == own.plan(3, {2: 0}).release

    def test_lost_leases_end_the_generation(self) -> None:
        """A holding lost and taken again has a new generation: old records are stale."""
        own = Ownership(2, "r1")
        first = own.taken(0, 0.0, LEASE_S)
        lost = own.lose(0, "taken over")
        assert lost is not None and (0, first, True) == (
            lost.partition,
            lost.generation,
            lost.was_reading,
        )
        assert None is own.held_generation(0)
        second = own.taken(0, 1.0, LEASE_S)
        assert second != first
        assert own.current(0, second) and not own.current(0, first)
        assert second == own.held_generation(0)

    def test_expiry_counts_from_when_the_renewal_was_sent(self) -> None:
        """Validity runs from the send time: a slow reply cannot stretch it."""
        own = Ownership(1, "r1")
        own.taken(0, 10.0, LEASE_S)
        assert [] == own.expire(12.9)
        assert [0] == [lost.partition for lost in own.expire(13.0)]

    def test_locks_without_expiry_end_only_when_lost(self) -> None:
        """A lock held as long as a connection lives (inf) never expires on the clock."""
        own = Ownership(2, "r1")
        own.taken(0, 0.0)
        own.taken(1, 0.0)
        assert [] == own.expire(1e12)
        assert [0, 1] == [lost.partition for lost in own.lose_all("connection closed")]
        assert frozenset() == own.held()

    @pytest.mark.parametrize(("partitions", "live", "share"), [(6, 1, 6), (6, 4, 2), (5, 0, 5)])
    def test_fair_share(self, partitions: int, live: int, share: int) -> None:
        """ceil(partitions / live), at least one member."""
        assert share == fair_share(partitions, live)


@st.composite
def schedules(draw: st.DrawFn) -> tuple[int, int, list[tuple[str, int, float, float]]]:
    partitions = draw(st.integers(1, 8), label="partitions")
    members = draw(st.integers(1, 4), label="members")
    steps = draw(
        st.lists(
            st.tuples(
                st.sampled_from(["round", "round", "round", "die", "revive", "send", "finish"]),
                st.integers(0, members - 1),
                st.sampled_from([0.05, 0.2, 0.5, 1.0, 2.0]),
                st.sampled_from([0.0, 0.01, 0.3]),
            ),
            max_size=120,
        ),
        label="steps",
    )
    return partitions, members, steps


class TestStalledHolder:
    """A holder that stops renewing (a stalled event loop, a slow store) while alive."""

    @pytest.mark.parametrize("delay", [0.0, 0.05, 0.3, 1.0])
    def test_it_stops_handing_out_before_another_can_take(self, delay: float) -> None:
        """A takes, renews once with a slow store, then stalls; B tries every 10 ms. At no
        moment do both hand out the partition, and B gets it once the lease is free."""
        store = Store()
        a = Replica("a", Ownership(1, "a"))
        b = Replica("b", Ownership(1, "b"))
        a.round(store, 0.0, 2, delay)
        assert frozenset({0}) == a.own.reading()
        a.round(store, 1.0, 2, delay)  # renewed: in the store until 1 + delay + LEASE_S
        now = 1.0
        while now < 1.0 + delay + LEASE_S + 0.5:
            now = round(now + 0.01, 6)
            b.round(store, now, 2, 0.0)
            holders = handing_out([a, b], now)
            assert len(holders.get(0, [])) <= 1, (now, holders)
        assert frozenset({0}) == b.own.reading()


class TestOwnershipProperties:
    """Many replicas, deaths, slow stores and records in flight."""

    @settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(schedules())
    def test_never_two_holders_never_released_in_flight_converges(
        self, schedule: tuple[int, int, list[tuple[str, int, float, float]]]
    ) -> None:
        """At every moment at most one live replica hands out a partition's records; no
        release with records in flight (asserted in each round); once everyone lives and
        nothing is in flight, a few rounds spread all partitions at most a fair share each."""
        partitions, members, steps = schedule
        store = Store()
        replicas = [Replica(f"r{i}", Ownership(partitions, f"r{i}")) for i in range(members)]
        now = 0.0
        for action, who, dt, delay in steps:
            replica = replicas[who]
            live = sum(r.alive for r in replicas)
            if action == "round" and replica.alive:
                replica.round(store, now, live, delay)
                now += 2 * delay  # the replies come back no sooner than this
            elif action == "die":
                replica.alive = False  # its leases expire in the store on their own
            elif action == "revive" and not replica.alive:
                replicas[who] = Replica(replica.name, Ownership(partitions, replica.name))
            elif action == "send" and replica.alive and replica.own.reading():
                p = min(replica.own.reading())
                replica.in_flight[p] = replica.in_flight.get(p, 0) + 1
            elif action == "finish" and replica.in_flight:
                p = next(iter(replica.in_flight))
                replica.in_flight[p] -= 1
                if not replica.in_flight[p]:
                    del replica.in_flight[p]
            now += dt
            for p, holders in handing_out(replicas, now).items():
                assert len(holders) <= 1, f"partition {p} handed out by {holders} at {now}"

        # Stable membership, requests finished, rounds every lease/3: convergence.
        for r in replicas:
            r.alive = True
            r.in_flight.clear()
        live = len(replicas)
        for _ in range(3 * live + 4):
            for r in replicas:
                r.round(store, now, live, 0.0)
                now += LEASE_S / 3 / live
                for holders in handing_out(replicas, now).values():
                    assert len(holders) <= 1
        share = fair_share(partitions, live)
        counts = [len(r.own.held()) for r in replicas]
        assert all(count <= share for count in counts), counts
        assert partitions == sum(len(r.own.reading()) for r in replicas), counts
        assert all(h.state is State.READING for r in replicas for h in r.own._holdings.values())
