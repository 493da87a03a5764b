"""The outbox source's SQL for one table."""

from __future__ import annotations

from worker.backends.postgres.uri import (
    MEMBER_KEY,
    PARTITION_TAG,
)

# A line that was not JSON (or held a NUL, which jsonb refuses) travels as a JSON string (see
# the producer): hand its text to the decoder, which dead-letters it like the jsonl: source would
# (or takes it, NUL and all). A change is an object, so a string is never meant as one.
_PAYLOAD = (
    "CASE WHEN jsonb_typeof(t.change) = 'string' THEN t.change #>> '{}' ELSE t.change::text END"
)
# The row's contact_id where it differs from the text of the change's ID (NULL mostly: the
# usual row costs nothing more); the source compares the string forms itself. A raw line
# (above) has its ID in its text: its contact_id, unless '' (no ID: the decoder says so).
_FILED = (
    "CASE WHEN jsonb_typeof(t.change) = 'string' THEN NULLIF(t.contact_id, '')"
    " ELSE NULLIF(t.contact_id, t.change ->> 'ID') END"
)


class Statements:
    """The source's SQL for one table."""

    def __init__(self, table: str) -> None:
        # Candidates: the lowest ids after $1 that are not ours. Claim them up to (not
        # including) the first one whose lease someone else still holds.
        # ``id = ANY(ARRAY(...))``: index look-ups, where a join would make the planner hash
        # (and so scan) the whole table for every claim.
        self.claim = f"""
WITH candidate AS (
    SELECT id, claimed_until FROM {table}
    WHERE id > $1 AND (claimed_by IS NULL OR NOT starts_with(claimed_by, $2))
    ORDER BY id
    LIMIT $3
)
UPDATE {table} AS t
SET claimed_by = $4, claimed_until = now() + make_interval(secs => $5)
WHERE t.id = ANY(ARRAY(
    SELECT id FROM candidate
    WHERE id < (SELECT coalesce(min(id), 9223372036854775807) FROM candidate
                WHERE claimed_until > now())
))
RETURNING t.id, {_PAYLOAD}, {_FILED}"""
        self.recover = f"""
UPDATE {table} AS t SET claimed_until = now() + make_interval(secs => $2)
WHERE claimed_by = $1
RETURNING t.id, {_PAYLOAD}, {_FILED}"""
        self.renew = f"""
UPDATE {table} SET claimed_until = now() + make_interval(secs => $3)
WHERE id = ANY($1::bigint[]) AND starts_with(claimed_by, $2)
RETURNING id"""
        self.release = f"""
UPDATE {table} SET claimed_by = NULL, claimed_until = NULL
WHERE starts_with(claimed_by, $1)"""
        self.delete = f"DELETE FROM {table} WHERE id = ANY($1::bigint[])"
        self.replay_end = f"SELECT coalesce(max(id), 0) FROM {table} WHERE claimed_by IS NOT NULL"
        self.replay_left = f"""
SELECT EXISTS (SELECT 1 FROM {table}
               WHERE id <= $1 AND (claimed_by IS NULL OR NOT starts_with(claimed_by, $2)))"""

    def partitioned(self, table: str, lock_key: int) -> None:
        """The statements of a partitioned source; ``lock_key`` is the table oid as an int4."""
        # A lock (key1, key2) shows in pg_locks as classid = key1, objid = key2 (as oids),
        # objsubid 2; the table oid is key1 read unsigned.
        held_by = (
            "l.locktype = 'advisory' AND l.granted AND l.objsubid = 2"
            " AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())"
            " AND l.classid = ($1::bigint)::oid"
        )
        self.join = f"SELECT pg_advisory_lock_shared({lock_key}, {MEMBER_KEY})"
        self.members = (
            f"SELECT count(*) FROM pg_locks l WHERE {held_by} AND l.objid = {MEMBER_KEY}::oid"
        )
        self.free = f"""
SELECT p FROM generate_series(0, $2::int - 1) AS p
WHERE NOT EXISTS (
    SELECT 1 FROM pg_locks l WHERE {held_by} AND l.objid = ({PARTITION_TAG} + p)::bigint::oid
)
ORDER BY p"""
        self.try_lock = f"SELECT pg_try_advisory_lock({lock_key}, {PARTITION_TAG} + $1::int)"
        self.unlock = f"SELECT pg_advisory_unlock({lock_key}, {PARTITION_TAG} + $1::int)"
        self.replay_end_p = f"""
SELECT coalesce(max(id), 0) FROM {table} WHERE partition = $1 AND claimed_by IS NOT NULL"""
        self.release_partition = f"""
UPDATE {table} SET claimed_by = NULL, claimed_until = NULL
WHERE partition = $1 AND starts_with(claimed_by, $2)"""
        self.release_ids = f"""
UPDATE {table} SET claimed_by = NULL, claimed_until = NULL
WHERE id = ANY($1::bigint[]) AND claimed_by = $2"""
        # Only partitions whose lock the lock connection ($7) still holds at claim time: a
        # replica whose lock connection just died claims nothing more, even before it notices.
        locked = held_by.replace("$1::bigint", "$8::bigint")
        self.claim_p = f"""
WITH held AS (
    SELECT p FROM unnest($6::int[]) AS p
    WHERE EXISTS (SELECT 1 FROM pg_locks l WHERE {locked} AND l.pid = $7
                  AND l.objid = ({PARTITION_TAG} + p)::bigint::oid)
)
UPDATE {table} AS t
SET claimed_by = $4, claimed_until = now() + make_interval(secs => $5)
WHERE t.id = ANY(ARRAY(
    SELECT id FROM {table}
    WHERE partition = ANY(ARRAY(SELECT p FROM held)) AND id > $1
      AND (claimed_by IS NULL OR NOT starts_with(claimed_by, $2))
    ORDER BY id
    LIMIT $3
))
RETURNING t.id, t.partition, {_PAYLOAD}, {_FILED}"""
        self.recover_p = f"""
UPDATE {table} AS t SET claimed_until = now() + make_interval(secs => $2)
WHERE claimed_by = $1
RETURNING t.id, t.partition, {_PAYLOAD}, {_FILED}"""
