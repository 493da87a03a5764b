"""Where one partition of a Kafka input stands: what was handed out, what is done, and the
offset that may be committed. Pure bookkeeping, no I/O.

Offsets are committed only up to the contiguous prefix of records that are done (applied or
dead-lettered): a record still waiting or in flight holds the commit back, whatever came after
it. A partition hands out at most ``window`` records past its last *committed* offset, so that
what any holder may have read before it crashed is ``[committed, committed + window)``: the
replay range the next holder reads and coalesces before it sends any of it (DESIGN 9).
"""

from __future__ import annotations

from collections import deque


class PartitionProgress:
    """One holding of one partition: handed offsets in order, those not done, their keys."""

    __slots__ = ("committed", "next", "_order", "_keys", "window")

    def __init__(self, window: int) -> None:
        self.window = window
        self.committed: int | None = None
        """The offset last committed (or found committed) for this partition, if known."""
        self.next: int | None = None
        """The offset after the last record handed out (None: nothing handed out yet)."""
        self._order: deque[int] = deque()
        self._keys: dict[int, str | None] = {}
        """Handed out and not done: offset -> the record's key (the contact ID)."""

    def handed(self, offset: int, key: str | None) -> None:
        """A record went out to the engine (offsets come in increasing order)."""
        if self.committed is None:
            # The holding starts here: whatever is before it was committed by someone.
            self.committed = offset
        self._order.append(offset)
        self._keys[offset] = key
        self.next = offset + 1

    def done(self, offset: int) -> bool:
        """The record at ``offset`` was applied or dead-lettered; False if it was not out."""
        return self._keys.pop(offset, 0) != 0

    def commit_point(self) -> int | None:
        """The offset to commit: the first record not done, else the one after the last
        handed out; None when nothing was handed out."""
        order, keys = self._order, self._keys
        while order and order[0] not in keys:
            order.popleft()
        if order:
            return order[0]
        return self.next

    def to_commit(self) -> int | None:
        """The commit point if it is past what was committed, else None."""
        point = self.commit_point()
        if point is None or (self.committed is not None and point <= self.committed):
            return None
        return point

    def room(self, offset: int) -> bool:
        """Whether the record at ``offset`` may be handed out: within ``window`` of the last
        committed offset (always, before anything was handed out in this holding)."""
        return self.committed is None or offset < self.committed + self.window

    @property
    def unacked(self) -> int:
        """Records handed out and not done."""
        return len(self._keys)

    def keys(self) -> set[str]:
        """The keys of the records handed out and not done (the contact IDs they carry)."""
        return {key for key in self._keys.values() if key is not None}
