"""Records numbered in order (the lines of a file), held without a tuple per record."""

from __future__ import annotations

import operator
from collections.abc import Hashable, Iterator, Sequence
from typing import overload

Record = tuple[Hashable, bytes]
"""A source record: the token that acknowledges it, and the JSON text of one change."""


class NumberedRecords(Sequence[Record]):
    """Records whose tokens are consecutive numbers from ``first`` (the lines of a file): the
    records of a plain chunk, held as its list of lines, without a tuple per record until one
    is asked for. ``worker.core.change.decode_all`` reads ``lines`` and the numbers as they
    are: building a million (number, line) tuples to take them apart again was 1.5% of the
    hot path's CPU. A slice is numbered records again; equal to any sequence of the same
    records."""

    __slots__ = ("first", "lines")

    def __init__(self, first: int, lines: list[bytes]) -> None:
        self.first = first
        self.lines = lines

    @property
    def tokens(self) -> range:
        """The records' tokens, in order."""
        return range(self.first, self.first + len(self.lines))

    def __len__(self) -> int:
        return len(self.lines)

    @overload
    def __getitem__(self, index: int) -> Record: ...

    @overload
    def __getitem__(self, index: slice) -> Sequence[Record]: ...

    def __getitem__(self, index: int | slice) -> Record | Sequence[Record]:
        if isinstance(index, slice):
            start, stop, step = index.indices(len(self.lines))
            if step == 1:
                return NumberedRecords(self.first + start, self.lines[start:stop])
            return list(zip(self.tokens[index], self.lines[index], strict=True))
        return (self.tokens[index], self.lines[index])

    def __iter__(self) -> Iterator[Record]:
        return zip(self.tokens, self.lines, strict=True)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Sequence) or isinstance(other, (str, bytes)):
            return NotImplemented
        return len(self) == len(other) and all(map(operator.eq, self, other))

    __hash__ = None  # type: ignore[assignment]  # mutable, as a list

    def __repr__(self) -> str:
        return f"NumberedRecords({self.first}, {self.lines!r})"
