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
