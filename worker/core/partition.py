"""Partitioning by contact ID: the one hash every producer and every replica must agree on."""

from __future__ import annotations

import zlib


def partition_of(key: str, partitions: int) -> int:
    """The partition (0..partitions-1) of a contact, from the string form of its ID.

    CRC-32 (IEEE: zlib's, Java's ``CRC32``, Go's ``crc32.ChecksumIEEE``) of the UTF-8 bytes,
    modulo the partition count: the same in every language and process, unlike ``hash()``.
    """
    if partitions <= 1:
        return 0
    return zlib.crc32(key.encode()) % partitions


def partition_mismatch(key: str, partition: int, partitions: int, where: str) -> str | None:
    """Why a change whose ``ID`` has the string form ``key`` does not belong in ``partition``
    (of ``partitions``; ``where`` names it for people), or None if it does.

    A change in another contact's partition would be sent outside that contact's order: the
    replica holding the right partition may send the contact's other changes meanwhile.
    """
    right = partition_of(key, partitions)
    if right == partition:
        return None
    return (
        f"ID {key!r} belongs to partition {right} of {partitions}, but was filed in {where}"
        f" (partition {partition}): not sent (the producer's partition is wrong)"
    )
