"""Decoding and validation of one contact change (DESIGN "Formats"); pure, no I/O."""

from __future__ import annotations

import datetime
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass
from typing import Annotated, Any

import msgspec
import orjson

from worker.core.records import NumberedRecords

TEXT_FIELDS: tuple[str, ...] = (
    "phone",
    "groupid",
    "firstname",
    "lastname",
    *(f"extra{i}" for i in range(1, 9)),
)
FIELDS: frozenset[str] = frozenset({"ID", *TEXT_FIELDS, "birthday", "unsubscribed"})


class InvalidChange(ValueError):
    """A record that can never be sent: the message says which field and what was wrong."""


@dataclass(slots=True)
class Change:
    """One valid partial change to one contact, as read from a source."""

    key: str
    """The coalescing key: the string form of ``ID``."""
    fields: dict[str, Any]
    """The object as it will be sent, ``ID`` included with its original type."""
    token: Hashable
    """The source's handle for acknowledging the record this change came from."""


Decoded = tuple[str, dict[str, Any], Hashable]
"""A valid change as the hot path carries it: (coalescing key, fields, token)."""


@dataclass(slots=True)
class Invalid:
    """A record that failed decoding or validation, on its way to the dead-letter sink."""

    reason: str
    token: Hashable
    change: dict[str, Any] | None = None
    raw: str | None = None


def _text(name: str, value: object) -> str | None:
    if type(value) is str:
        return None
    return f"field {name!r} must be a string, got {_describe(value)}"


def _birthday(name: str, value: object) -> str | None:
    if type(value) is not str:
        return f"field {name!r} must be a date string yyyy-MM-dd, got {_describe(value)}"
    # fromisoformat alone would also take "20261126" and other ISO shapes.
    if len(value) != 10 or value[4] != "-" or value[7] != "-":
        return f"field {name!r} must be a date yyyy-MM-dd, got {value!r}"
    try:
        datetime.date.fromisoformat(value)
    except ValueError:
        return f"field {name!r} is not a real calendar date: {value!r}"
    return None


def _boolean(name: str, value: object) -> str | None:
    if type(value) is bool:
        return None
    return f"field {name!r} must be true or false, got {_describe(value)}"


_CHECKS: dict[str, Callable[[str, object], str | None]] = {
    **{name: _text for name in TEXT_FIELDS},
    "birthday": _birthday,
    "unsubscribed": _boolean,
}


def _describe(value: object) -> str:
    if value is None:
        return "null"
    kind = {bool: "a boolean", int: "a number", float: "a number", str: "a string"}.get(
        type(value), "an array" if isinstance(value, list) else "an object"
    )
    try:
        text = orjson.dumps(value).decode()
    except TypeError:  # e.g. an integer beyond 64 bits
        text = repr(value)
    return f"{kind} ({text if len(text) <= 40 else text[:37] + '...'})"


def key_of(value: object) -> str | None:
    """The coalescing key of an ``ID`` value, or None if it is not a usable ID."""
    kind = type(value)
    if kind is str:
        return value if value else None  # type: ignore[return-value]
    if kind is int:
        return str(value)
    return None


_TEXT_SET = frozenset(TEXT_FIELDS)


def validate(obj: object) -> str | None:
    """Why ``obj`` is not a valid change, or None if it is one."""
    if type(obj) is not dict:
        return f"a change must be a JSON object, got {_describe(obj)}"
    if "ID" not in obj:
        return "missing ID"
    if key_of(obj["ID"]) is None:
        return f"ID must be a non-empty string or an integer, got {_describe(obj['ID'])}"
    if len(obj) == 1:
        return "no field to change besides ID"
    text = _TEXT_SET
    for name, value in obj.items():
        # The common case, a text field holding a string, costs two look-ups and no call.
        if type(value) is str and name in text:
            continue
        if name == "ID":
            continue
        check = _CHECKS.get(name)
        if check is None:
            return f"unknown field {name!r}"
        problem = check(name, value)
        if problem is not None:
            return problem
    return None


def _plainly_valid(obj: dict[str, Any]) -> str | None:
    """The key of a change whose fields are all known and whose values all have the right
    type (a text field a string, ``unsubscribed`` a boolean), checked with a handful of
    C-level calls instead of a Python loop per field; None if it is not one of those (then
    :func:`validate` looks at it field by field). ``birthday`` is checked here as there."""
    size = len(obj)
    if size < 2 or not _FIELDS_ISSUPERSET(obj):
        return None
    ident = obj.get("ID")
    kind = type(ident)
    if kind is str:
        if not ident:
            return None
        key: str = ident
        texts = size
    elif kind is int:
        key = str(ident)
        texts = size - 1
    else:
        return None
    if "unsubscribed" in obj:
        if type(obj["unsubscribed"]) is not bool:
            return None
        texts -= 1
    if "birthday" in obj and _birthday("birthday", obj["birthday"]) is not None:
        return None
    return key if list(map(type, obj.values())).count(str) == texts else None


_FIELDS_ISSUPERSET = FIELDS.issuperset


def decode(line: bytes, token: Hashable) -> Change | Invalid:
    """Decode and validate one JSONL record (without its newline)."""
    try:
        obj = orjson.loads(line)
    except orjson.JSONDecodeError as exc:
        raw = line.decode("utf-8", errors="replace")
        return Invalid(f"not valid JSON: {exc}", token, raw=raw)
    if type(obj) is dict:
        key = _plainly_valid(obj)
        if key is not None:
            return Change(key, obj, token)
    problem = validate(obj)
    if problem is None:
        return Change(str(obj["ID"]), obj, token)
    if type(obj) is dict:
        return Invalid(problem, token, change=obj)
    return Invalid(problem, token, raw=line.decode("utf-8", errors="replace"))


def _plain_decoder() -> Callable[[bytes], Any]:
    """msgspec's decoder of a *plain* change: the rules of :func:`validate` as field types,
    checked while decoding (unknown fields refused, ``ID`` a non-empty string or a 64-bit
    integer, text fields strings, ``birthday`` a calendar date yyyy-MM-dd, ``unsubscribed``
    a boolean; absent fields left out again by ``msgspec.to_builtins``)."""
    unset: Any = msgspec.UNSET
    ident = (
        Annotated[str, msgspec.Meta(min_length=1)]
        | Annotated[int, msgspec.Meta(ge=-(2**63), le=2**63 - 1)]
    )
    plain = msgspec.defstruct(
        "PlainChange",
        [
            ("ID", ident),
            *((name, str, unset) for name in TEXT_FIELDS),
            ("birthday", datetime.date, unset),
            ("unsubscribed", bool, unset),
        ],
        forbid_unknown_fields=True,
        omit_defaults=True,
        gc=False,  # strings, integers, a date, a boolean: never a cycle to collect
    )
    return msgspec.json.Decoder(plain).decode


_DECODE_PLAIN = _plain_decoder()


def decode_all(records: Sequence[tuple[Hashable, bytes]]) -> tuple[list[Decoded], list[Invalid]]:
    """Decode and validate many records: the valid changes, in order, and the invalid ones.

    The same verdicts as :func:`decode`, in one loop and without a :class:`Change` per record
    (the engine's hot path). A record is decoded and checked at once by msgspec (a third
    less CPU than ``orjson.loads`` and the check after it, benchmarks/decoders.py), into the
    dict that is sent (its fields in the decoder's order, ``ID`` first, whatever the line's:
    the order of an object's fields means nothing in JSON); one msgspec refuses, or with no
    field besides ``ID``, takes the careful path of :func:`decode`, which says why it is
    invalid (or finds it valid after all: an integer ``ID`` past 64 bits signed, which orjson
    still reads). A slice whose every record is plainly valid (the common case) is decoded
    in one go: each record on its own (never joined: lines invalid alone could join into
    valid JSON), then all the dicts in one ``msgspec.to_builtins`` call; one record refused
    sends the slice one record at a time."""
    decode_plain, builtins = _DECODE_PLAIN, msgspec.to_builtins
    refused = msgspec.DecodeError  # a ValidationError is one too
    if records:  # every record plainly valid (the common case): decoded in one go
        tokens: Sequence[Hashable]
        lines: Sequence[bytes]
        if type(records) is NumberedRecords:  # lines and their numbers, no tuple per record
            tokens, lines = records.tokens, records.lines
        else:
            tokens, lines = zip(*records, strict=True)
        try:
            objs = builtins(list(map(decode_plain, lines)))
        except refused:
            objs = None
        if objs is not None and 1 not in map(len, objs):  # each has a field besides ID
            keys = [ident if type(ident := obj["ID"]) is str else str(ident) for obj in objs]
            return list(zip(keys, objs, tokens, strict=True)), []
    valid: list[Decoded] = []
    invalid: list[Invalid] = []
    append = valid.append
    for token, line in records:
        try:
            obj = builtins(decode_plain(line))
        except refused:
            obj = None
        if obj is not None and len(obj) > 1:
            ident = obj["ID"]
            append((ident if type(ident) is str else str(ident), obj, token))
            continue
        item = decode(line, token)
        if type(item) is Change:
            append((item.key, item.fields, token))
        else:
            invalid.append(item)  # type: ignore[arg-type]
    return valid, invalid


def key_mismatch(key: str, filed: str, where: str) -> str | None:
    """Why a change whose ``ID`` has the string form ``key`` does not belong to a record the
    input filed under the key ``filed`` (``where`` names that field), or None if it does.

    The input orders (and partitions) its records by the key beside the change, so a change
    filed under another contact's key would be sent outside that contact's order.
    """
    if key == filed:
        return None
    return (
        f"ID {key!r} does not match the {where} {filed!r} the input filed it under:"
        " not sent (its order and partition come from the latter)"
    )
