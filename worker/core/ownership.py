"""Partition ownership: which partitions a replica takes, keeps, gives back, releases or loses.

One policy for every partitioned input. The backend owns only the lease primitives (try to
take a partition, renew it, release it) and counts the live members; this object decides,
with the time passed in, and numbers each holding with a generation, so that records read
under a holding that has since ended can be told apart from the current ones.

The rules:
- **Fair share.** A replica aims at ``ceil(partitions / live)`` partitions. Below it, it tries
  the free ones, starting at a place of its own (``crc32(member)``) so that replicas do not all
  race for partition 0. Above it, it gives back its highest-numbered ones.
- **Give back, then release.** A partition given back stops being read at once (its records
  waiting are forgotten by the engine), but its lease is released only when none of its
  records is in a request any more: the next holder must not send a newer change of a
  contact while an older one is still in flight.
- **Lost is lost.** A lease that could not be renewed, or whose validity ran out on the local
  clock, ends the holding at once, whatever is in flight; the validity is measured from the
  moment the take or renewal was *sent*, so it ends here before the store lets anyone else in.
"""

from __future__ import annotations

import enum
import math
import zlib
from collections.abc import Mapping
from dataclasses import dataclass


class State(enum.Enum):
    """Where a holding stands."""

    READING = "reading"
    """Records of the partition may be read and handed out."""
    GIVING_BACK = "giving_back"
    """No longer read; the lease is kept until nothing of the partition is in flight."""


@dataclass(slots=True)
class Holding:
    """One partition this replica holds the lease of."""

    partition: int
    generation: int
    valid_until: float
    """Local time until which the lease is surely still ours (``inf``: held while a
    connection lives, such as a PostgreSQL advisory lock)."""
    state: State = State.READING


@dataclass(frozen=True, slots=True)
class Plan:
    """What the backend does in one round, in this order: renew, release, try to take."""

    renew: tuple[int, ...]
    """Every partition held (read or being given back): renew its lease."""
    release: tuple[int, ...]
    """Given back, nothing in flight: release the lease now."""
    take: tuple[int, ...]
    """Free partitions to try, in this order, until ``want`` were taken."""
    want: int
    given_back: tuple[int, ...]
    """Partitions this round stopped reading (above the fair share): the engine forgets
    their waiting changes; their leases are kept until nothing of theirs is in flight."""


@dataclass(frozen=True, slots=True)
class Lost:
    """A holding that ended without being released."""

    partition: int
    generation: int
    reason: str
    was_reading: bool


@dataclass(slots=True)
class OwnershipStats:
    """Counters for metrics and logs."""

    taken: int = 0
    given_back: int = 0
    released: int = 0
    lost: int = 0


def fair_share(partitions: int, live: int) -> int:
    """The partitions one of ``live`` replicas aims at."""
    return math.ceil(partitions / max(1, live))


class Ownership:
    """The holdings of one replica, and the decisions about them."""

    def __init__(self, partitions: int, member: str) -> None:
        if partitions < 1:
            raise ValueError(f"partitions must be >= 1, got {partitions}")
        self.partitions = partitions
        self.member = member
        self.stats = OwnershipStats()
        self._holdings: dict[int, Holding] = {}
        self._generation = 0
        self._start = zlib.crc32(member.encode()) % partitions

    # -- what is held ----------------------------------------------------------------------

    def reading(self) -> frozenset[int]:
        """The partitions whose records may be read and handed out now."""
        return frozenset(p for p, h in self._holdings.items() if h.state is State.READING)

    def held(self) -> frozenset[int]:
        """Every partition whose lease is ours (read or being given back)."""
        return frozenset(self._holdings)

    def generation(self, partition: int) -> int | None:
        """The generation of the current reading holding of ``partition``, if any."""
        holding = self._holdings.get(partition)
        if holding is None or holding.state is not State.READING:
            return None
        return holding.generation

    def held_generation(self, partition: int) -> int | None:
        """The generation of the holding of ``partition`` (read or being given back), if any."""
        holding = self._holdings.get(partition)
        return None if holding is None else holding.generation

    def current(self, partition: int, generation: int) -> bool:
        """Whether a record read under ``generation`` may still be handed out."""
        return self.generation(partition) == generation

    # -- deciding --------------------------------------------------------------------------

    def plan(self, live: int, in_flight: Mapping[int, int]) -> Plan:
        """Decide one round from the live member count and the records in flight per
        partition. Partitions above the fair share stop being read now."""
        share = fair_share(self.partitions, live)
        holdings = self._holdings
        reading = sorted(p for p, h in holdings.items() if h.state is State.READING)
        given_back: tuple[int, ...] = ()
        if len(reading) > share:
            given_back = tuple(reading[share:])
            for p in given_back:
                holdings[p].state = State.GIVING_BACK
            self.stats.given_back += len(given_back)
        release = tuple(
            sorted(
                p
                for p, h in holdings.items()
                if h.state is State.GIVING_BACK and in_flight.get(p, 0) <= 0
            )
        )
        want = max(0, share - len(holdings) + len(release))
        take: tuple[int, ...] = ()
        if want:
            take = tuple(
                p
                for p in ((self._start + i) % self.partitions for i in range(self.partitions))
                if p not in holdings
            )
        return Plan(tuple(sorted(holdings)), release, take, want, given_back)

    # -- what the backend reports ----------------------------------------------------------

    def taken(self, partition: int, sent_at: float, valid_s: float = math.inf) -> int:
        """The lease of ``partition`` was taken by a request sent at ``sent_at``; its new
        generation."""
        if partition in self._holdings:
            raise ValueError(f"partition {partition} is held already")
        self._generation += 1
        self._holdings[partition] = Holding(partition, self._generation, sent_at + valid_s)
        self.stats.taken += 1
        return self._generation

    def renewed(self, partition: int, sent_at: float, valid_s: float = math.inf) -> None:
        """The lease was renewed by a request sent at ``sent_at``."""
        holding = self._holdings.get(partition)
        if holding is not None:
            holding.valid_until = max(holding.valid_until, sent_at + valid_s)

    def released(self, partition: int) -> None:
        """The lease of a partition given back was released."""
        if self._holdings.pop(partition, None) is not None:
            self.stats.released += 1

    def lose(self, partition: int, reason: str) -> Lost | None:
        """The lease is gone (not renewed, taken over, the connection holding it closed)."""
        holding = self._holdings.pop(partition, None)
        if holding is None:
            return None
        reading = holding.state is State.READING
        if reading:
            self.stats.lost += 1
        return Lost(partition, holding.generation, reason, reading)

    def lose_all(self, reason: str) -> list[Lost]:
        """Every lease is gone at once (a lock connection closed)."""
        return [lost for p in sorted(self._holdings) if (lost := self.lose(p, reason))]

    def expire(self, now: float) -> list[Lost]:
        """Holdings whose validity ran out before a renewal came back: lost."""
        due = sorted(p for p, h in self._holdings.items() if h.valid_until <= now)
        return [lost for p in due if (lost := self.lose(p, "lease expired before renewal"))]
