"""orjson and msgspec for decoding, checking, merging and encoding changes (issue 15).

Until 2026-12-04 the worker decoded each line with ``orjson.loads`` into a dict and checked it
with a handful of C-level calls (``worker.core.change._plainly_valid``). A typed decoder does
the check while decoding: msgspec decodes straight into a ``Struct`` whose field types are the
checks (unknown fields refused, ``ID`` a non-empty string or an integer, ``birthday`` a
calendar date, ``unsubscribed`` a boolean, fields absent left ``UNSET``). The worker now
decodes with msgspec and turns the Struct into the dict it merges and sends
(``msgspec.to_builtins``, ``worker.core.change.decode_all``).

Measured in this process, pinned to one core, on the first ``--changes`` lines of the hot-path
job (uniform over IDs, every line valid), all in each round, in this order; ns per line:

* orjson + check: ``orjson.loads`` and ``_plainly_valid`` per line (the worker until now);
* msgspec + dict: ``decode_all`` (the worker now);
* msgspec Struct: the typed decode alone, no dict (what a pipeline of Structs would pay);
* orjson alone, msgspec untyped: decoding with no check (the floors);
* the core job: decode + check, merge per ID, encode batches of 100: the worker's own
  ``decode_all``, ``Coalescer.add_all``, ``pop_many`` and ``pack``; against the same loop over
  Structs (a merge copies the fields the later change set; no entries, tokens or order kept).

    .venv/bin/pip install -e .
    .venv/bin/python benchmarks/decoders.py [--changes 200000] [--rounds 5]

Prints a Markdown table of the medians and each round's values.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import msgspec
import orjson
from pipeline import DATA, log

from worker.bench.harness import stream_file
from worker.core.batch import pack
from worker.core.change import _plainly_valid, decode_all
from worker.core.coalesce import Coalescer
from worker.run import tune_gc
from worker.sim.stream import StreamSpec

UNSET: Any = msgspec.UNSET
Text = str


class Contact(msgspec.Struct, forbid_unknown_fields=True, omit_defaults=True):
    """A change as msgspec checks it while decoding: the worker's rules as field types."""

    ID: Annotated[str, msgspec.Meta(min_length=1)] | int
    phone: Text = UNSET
    groupid: Text = UNSET
    firstname: Text = UNSET
    lastname: Text = UNSET
    birthday: datetime.date = UNSET
    unsubscribed: bool = UNSET
    extra1: Text = UNSET
    extra2: Text = UNSET
    extra3: Text = UNSET
    extra4: Text = UNSET
    extra5: Text = UNSET
    extra6: Text = UNSET
    extra7: Text = UNSET
    extra8: Text = UNSET


FIELDS = Contact.__struct_fields__[1:]


def orjson_check(records: list[tuple[int, bytes]]) -> int:
    """The worker's decode_all before msgspec: orjson, then the C-level check, the valid
    changes kept as (key, dict, token) as the worker keeps them."""
    loads, plain, valid = orjson.loads, _plainly_valid, []
    append = valid.append
    for token, line in records:
        obj = loads(line)
        key = plain(obj) if type(obj) is dict else None
        if key is not None:
            append((key, obj, token))
    return len(valid)


def worker_check(records: list[tuple[int, bytes]]) -> int:
    valid, _ = decode_all(records)
    return len(valid)


def orjson_alone(records: list[tuple[int, bytes]]) -> int:
    loads = orjson.loads
    return len([loads(line) for _, line in records])


def msgspec_check(records: list[tuple[int, bytes]]) -> int:
    decode, valid = msgspec.json.Decoder(Contact).decode, 0
    for _, line in records:
        try:
            decode(line)
        except msgspec.ValidationError:
            continue
        valid += 1
    return valid


def msgspec_untyped(records: list[tuple[int, bytes]]) -> int:
    decode = msgspec.json.Decoder().decode
    return len([decode(line) for _, line in records])


def worker_job(records: list[tuple[int, bytes]]) -> int:
    """The worker's core: decode_all, Coalescer.add_all, pop_many + pack per 100."""
    coalescer, sent = Coalescer(), 0
    valid, _ = decode_all(records)
    coalescer.add_all(valid, 0.0)
    while taken := coalescer.pop_many(100):
        sent += len(pack(taken, 1 << 20)[1])
    return sent


def msgspec_job(records: list[tuple[int, bytes]]) -> int:
    """The same with Structs: merged field by field, encoded in one call per 100."""
    decode, encode = msgspec.json.Decoder(Contact).decode, msgspec.json.Encoder().encode
    waiting: dict[str, Contact] = {}
    for _, line in records:
        try:
            change = decode(line)
        except msgspec.ValidationError:
            continue
        ident = change.ID
        key = ident if type(ident) is str else str(ident)
        merged = waiting.get(key)
        if merged is None:
            waiting[key] = change
            continue
        for name in FIELDS:
            value = getattr(change, name)
            if value is not UNSET:
                setattr(merged, name, value)
    bodies, sent = list(waiting.values()), 0
    for start in range(0, len(bodies), 100):
        sent += len(encode(bodies[start : start + 100]))
    return sent


def per_line_ns(run: Callable[[list[tuple[int, bytes]]], int], records: list[Any]) -> float:
    gc.collect()
    started = time.process_time()
    run(records)
    return (time.process_time() - started) * 1e9 / len(records)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--changes", type=int, default=200_000)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    os.sched_setaffinity(0, {0})
    tune_gc()  # the worker's collector settings: what it keeps is not rescanned per 700
    spec = StreamSpec(
        changes=1_000_000,
        contacts=200_000,
        unknown_share=0.0,
        invalid=0,
        distribution="uniform",
        seed=1,
    )
    path: Path = stream_file(spec, DATA, log)
    lines = path.read_bytes().split(b"\n")[: args.changes]
    records = list(enumerate(lines))
    assert orjson_check(records) == worker_check(records) == msgspec_check(records)
    assert len(records) == orjson_check(records)
    runs = {
        "decode + check: orjson + C-level check (the worker until now)": orjson_check,
        "decode + check: msgspec + dict (the worker now)": worker_check,
        "decode + check: msgspec Struct alone": msgspec_check,
        "decode alone: orjson": orjson_alone,
        "decode alone: msgspec untyped": msgspec_untyped,
        "decode, check, merge, encode: the worker's core": worker_job,
        "decode, check, merge, encode: msgspec Structs throughout": msgspec_job,
    }
    results: dict[str, list[float]] = {name: [] for name in runs}
    for number in range(1, args.rounds + 1):
        log(f"round {number} of {args.rounds}")
        for name, run in runs.items():
            results[name].append(per_line_ns(run, records))
    load = os.getloadavg()[0]
    at = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
    print(f"## decoders, {args.changes:,} lines, one core ({at}, load {load:.2f})\n")
    print("| run | ns per line (median) | rounds |\n|---|---|---|")
    for name, values in results.items():
        shown = ", ".join(f"{v:.0f}" for v in values)
        print(f"| {name} | {statistics.median(values):.0f} | {shown} |")
    names = list(runs)
    print()
    for base, other in ((0, 1), (0, 2), (5, 6)):
        ratios = [o / b for b, o in zip(results[names[base]], results[names[other]], strict=True)]
        print(f"- {names[other]} / {names[base]}: median {statistics.median(ratios):.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
