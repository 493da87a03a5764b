"""The Lua scripts the Redis parts run, and the framing of the read script's reply."""

from __future__ import annotations

from typing import Any, cast

CHANGE_FIELD = b"change"
"""The entry field holding the change's JSON text."""


START = b"0-0"


Entry = tuple[bytes, dict[bytes, bytes]]
"""A stream entry as redis-py returns it: its ID and fields (empty if the entry was deleted)."""

MISSING = -1
DELETED = -2


class Page:
    """Entries of one stream, in stream order, as two parallel lists; its length is theirs."""

    __slots__ = ("ids", "values", "plain")

    def __init__(self, ids: list[bytes], values: list[bytes | int], plain: bool) -> None:
        self.ids = ids
        self.values = values
        """Each entry's change field, or MISSING (none) / DELETED (deleted while pending)."""
        self.plain = plain
        """Every value is a change field (no MISSING nor DELETED): the bulk path applies."""

    def __len__(self) -> int:
        return len(self.ids)

    def __repr__(self) -> str:
        return f"Page({self.ids!r}, {self.values!r}, {self.plain!r})"

    @property
    def last_id(self) -> bytes:
        return self.ids[-1]


EMPTY = Page([], [], True)

READ_SCRIPT = r"""
-- XREADGROUP over the streams KEYS[1..n] from the IDs ARGV[4..3+n] (never blocking inside a
-- script), the reply flattened into strings that cost one parse each instead of five per
-- entry: IDs, the change fields' sizes (-1 for an entry without one, -2 for an entry deleted
-- while pending; empty when every entry has a change without a newline, then joined by
-- newlines), the fields concatenated, and per stream that has entries its 0-based position in
-- KEYS and its number of entries (in reply order).
local n = #KEYS
local args = {'GROUP', ARGV[1], ARGV[2], 'COUNT', ARGV[3], 'STREAMS'}
for i = 1, n do args[6 + i] = KEYS[i] end
for i = 1, n do args[6 + n + i] = ARGV[3 + i] end
local reply = redis.call('XREADGROUP', unpack(args))
if not reply then return false end
local position = {}
for i = 1, n do position[KEYS[i]] = i - 1 end
local ids, sizes, values, streams, m, v = {}, {}, {}, {}, 0, 0
local plain = true
for s = 1, #reply do
  local entries = reply[s][2]
  if #entries > 0 then
    streams[#streams + 1] = position[reply[s][1]] .. ' ' .. #entries
  end
  for i = 1, #entries do
    local entry = entries[i]
    local fields, size = entry[2], -2
    m = m + 1
    ids[m] = entry[1]
    if fields then
      size = -1
      for j = 1, #fields, 2 do
        if fields[j] == 'change' then
          local value = fields[j + 1]
          v = v + 1
          values[v] = value
          size = #value
          if plain and string.find(value, '\n', 1, true) then plain = false end
          break
        end
      end
    end
    if size < 0 then plain = false end
    sizes[m] = size
  end
end
if plain and m > 0 then
  -- Every entry has a change without a newline (as enqueue writes them): the values joined by
  -- newlines, split in one call by the reader; the sizes are left out.
  return {table.concat(ids, ' '), '', table.concat(values, '\n'), table.concat(streams, ' ')}
end
return {table.concat(ids, ' '), table.concat(sizes, ' '), table.concat(values),
        table.concat(streams, ' ')}
"""

ACK_SCRIPT = """
-- For each stream KEYS[k]: XACK (and XDEL if ARGV[2] is 1) the space-separated IDs of
-- ARGV[2 + k], atomically.
local acked = 0
for k = 1, #KEYS do
  local ids = {}
  for id in string.gmatch(ARGV[2 + k], '%S+') do ids[#ids + 1] = id end
  for i = 1, #ids, 1000 do
    local last = math.min(i + 999, #ids)
    acked = acked + redis.call('XACK', KEYS[k], ARGV[1], unpack(ids, i, last))
    if ARGV[2] == '1' then redis.call('XDEL', KEYS[k], unpack(ids, i, last)) end
  end
end
return acked
"""


def framed_pages(reply: object) -> list[tuple[int, Page]]:
    """The entries of a ``READ_SCRIPT`` reply, per stream read: (its position among the
    script's keys, its entries), in reply order; streams without entries are left out."""
    if not reply:
        return []
    id_text, size_text, body, stream_text = cast(list[bytes], reply)
    if not id_text:
        return []
    ids = id_text.split(b" ")
    values: list[bytes | int]
    if not size_text:  # every entry has a change, none with a newline
        values = body.split(b"\n")  # type: ignore[assignment]
        plain = True
    else:
        values = []
        append = values.append
        start = 0
        for size in map(int, size_text.split(b" ")):
            if size >= 0:
                end = start + size
                append(body[start:end])
                start = end
            else:
                append(size)
        plain = MISSING not in values and DELETED not in values
    if len(values) != len(ids):
        raise ValueError(f"malformed read reply: {len(ids)} IDs, {len(values)} values")
    counts = list(map(int, stream_text.split(b" ")))
    if len(counts) == 2:
        return [(counts[0], Page(ids, values, plain))]
    pages: list[tuple[int, Page]] = []
    first = 0
    for i in range(0, len(counts), 2):
        last = first + counts[i + 1]
        part = values[first:last]
        pages.append(
            (counts[i], Page(ids[first:last], part, plain or all(type(v) is bytes for v in part)))
        )
        first = last
    return pages


def framed(reply: object) -> Page:
    """The entries of a one-stream ``READ_SCRIPT`` reply."""
    pages = framed_pages(reply)
    return pages[0][1] if pages else EMPTY


def unframed(entries: list[Entry]) -> Page:
    """The entries of a plain XREADGROUP reply, in the script's shape."""
    values: list[bytes | int] = [
        fields.get(CHANGE_FIELD, MISSING) if fields else DELETED for _, fields in entries
    ]
    return Page(
        [entry_id for entry_id, _ in entries],
        values,
        MISSING not in values and DELETED not in values,
    )


def stream_entries(reply: object) -> list[Entry]:
    """The entries of a one-stream XREADGROUP reply (RESP2 shape: [[key, entries]])."""
    if not reply:
        return []
    return cast(list[Entry], cast(list[Any], reply)[0][1])


DELETE_IDLE_CONSUMER = """
local ok, pending = pcall(redis.call, 'XPENDING', KEYS[1], ARGV[1], '-', '+', 1, ARGV[2])
if not ok then return -1 end
if #pending > 0 then return -1 end
return redis.call('XGROUP', 'DELCONSUMER', KEYS[1], ARGV[1], ARGV[2])
"""


# -- partitioned streams -----------------------------------------------------------------------

RENEW_LEASE = """
-- Compare-and-pexpire: extend the lease (or lock) KEYS[1] by ARGV[2] ms only if ARGV[1] still
-- holds it.
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
"""

RELEASE_LEASE = """
-- Compare-and-delete: drop the lease (or lock) KEYS[1] only if ARGV[1] still holds it.
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"""

HEARTBEAT = """
-- Register this consumer as live until now + lease_ms (server time), forget the expired ones,
-- and answer how many are live.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[2]) * 10)
return redis.call('ZCARD', KEYS[1])
"""
