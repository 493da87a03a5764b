"""The knowledge store contract: what the API said about IDs, kept where the input lives.

A store holds at most one fact per ID (``exists`` or ``missing``) and the wall-clock time it was
learnt (seconds since the epoch: replicas and restarts share it). Facts older than the TTL are
never returned and are pruned; beyond ``max_ids`` the oldest learnt are pruned first. Replicas of
one input share one store: a fact learnt by one is a prior for all. The knowledge is a prior,
not a promise, so a store that cannot be reached costs requests, never correctness: the feed
(``worker.knowledge.feed``) logs it and goes on without.
"""

from __future__ import annotations

import abc
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

from worker.core.knowledge import Known

BYTES_PER_ID = {"memory": 90, "sqlite": 45, "redis": 105, "postgresql": 120}
"""About what one fact costs in each store, key of 8-12 characters, indexes included
(measured: see docs/id-knowledge.md)."""


@dataclass(frozen=True, slots=True)
class StoredFact:
    """One fact as a store keeps it."""

    key: str
    known: Known
    learnt_at: float
    """Wall-clock seconds since the epoch."""


class StoreCounts(NamedTuple):
    """How many facts a store holds, by kind."""

    exists: int
    missing: int


class KnowledgeError(Exception):
    """The knowledge store failed (unreachable, refused): the run goes on without it."""


class KnowledgeStore(abc.ABC):
    """Where one input keeps its ID knowledge."""

    display: str = ""
    """Where it is, for people (no credentials)."""

    async def __aenter__(self) -> KnowledgeStore:
        await self.open()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    @abc.abstractmethod
    async def open(self) -> None:
        """Connect and create what is missing (a table, nothing for Redis)."""

    @abc.abstractmethod
    async def close(self) -> None:
        """Disconnect."""

    @abc.abstractmethod
    async def load(self, keys: Sequence[str], since: float) -> list[StoredFact]:
        """The facts about ``keys`` learnt after ``since`` (older ones have expired)."""

    @abc.abstractmethod
    async def save(self, facts: Sequence[StoredFact]) -> None:
        """Keep ``facts``, each replacing whatever was known of its ID."""

    @abc.abstractmethod
    async def forget(self, keys: Sequence[str]) -> None:
        """Drop every fact about ``keys`` (``dlq replay`` of IDs now created)."""

    @abc.abstractmethod
    async def prune(self, before: float, max_ids: int) -> int:
        """Drop the facts learnt before ``before`` and the oldest beyond ``max_ids`` of each
        kind; how many were dropped."""

    @abc.abstractmethod
    async def clear(self) -> int:
        """Forget everything; how many facts were dropped."""

    @abc.abstractmethod
    async def counts(self) -> StoreCounts:
        """How many facts are held, by kind (expired ones not pruned yet included)."""
