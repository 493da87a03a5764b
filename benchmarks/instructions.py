"""The hot path's cost in instructions: a figure a noisy machine cannot move (issue 15).

CPU seconds on a shared machine drift by 10-20% from one minute to the next, more than most
changes to the hot path are worth. The instructions a run executes do not: this script runs
the job of ``hotpath.py`` (changes over IDs from a file, zero API latency, batch 100, no rate
limit, concurrency 8) under valgrind's cachegrind and reads the count (``I refs``), for this
checkout and for any other given with ``--compare`` (another commit's work tree), one after
the other against a fresh simulator each. A second run of each over a one-line file gives the
start-up's share (imports, mostly aiohttp's and its TLS contexts'), so that the count per
change is the work per change alone. Run to run, a count moves by about 0.3% (the requests
differ by a few, with the timing of answers).

    .venv/bin/python benchmarks/instructions.py [--changes 200000 --contacts 40000]
        [--max-waiting 40000] [--compare /path/to/other/checkout ...] [--misses]

The default is a fifth of the hot path's job, with a fifth of its --max-waiting (about a
minute per tree under valgrind); ``--changes 1000000 --contacts 200000 --max-waiting 200000``
is the job itself (about five minutes per tree). ``--misses`` simulates this machine's caches as
well and counts the data misses: the hot path's job does not fit in the L3 (its 200,000 IDs'
entries, bodies and facts), so what it waits on memory for moves its CPU seconds as much as what
it executes (a look-up of an ID read long ago costs several misses). Needs valgrind (Debian's
``valgrind``).
Prints Markdown and writes benchmarks/results/instructions.json.
"""

from __future__ import annotations

import argparse
import datetime
import re
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import orjson
from hotpath import summary_of
from pipeline import DATA, LOGS, RESULTS, clean_stream, log

from worker.bench.harness import run_args
from worker.bench.processes import (
    Quiet,
    byte_compile,
    machine,
    measure,
    run_process,
    worker_env,
)
from worker.bench.report import Table
from worker.bench.scenario import WorkerConfig

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
REFS = re.compile(rb"I\s+refs:\s+([\d,]+)")
D1_MISSES = re.compile(rb"D1\s+misses:\s+([\d,]+)")
LL_MISSES = re.compile(rb"LLd misses:\s+([\d,]+)")
CACHES = ["--cache-sim=yes", "--I1=32768,8,64", "--D1=32768,8,64", "--LL=33554432,16,64"]
"""``--misses``: this machine's caches (32 KiB L1 per core, 32 MiB L3; valgrind reads the VM's
L3 as 320 MiB direct-mapped). Cachegrind simulates two levels: a D1 miss is what the 1 MiB L2
or the L3 answer (tens of cycles), an LL miss what memory does (hundreds)."""


def worker_command(tree: Path) -> list[str]:
    """This interpreter running ``contact-worker`` from the work tree ``tree``."""
    code = (
        f"import sys; sys.path.insert(0, {str(tree)!r}); sys.argv[0] = 'contact-worker';"
        " from worker.cli import main; sys.exit(main())"
    )
    return [sys.executable, "-c", code]


def count(pattern: re.Pattern[bytes], text: bytes) -> int | None:
    """The last figure ``pattern`` finds in cachegrind's summary, if any."""
    found = pattern.findall(text)
    return int(found[-1].replace(b",", b"")) if found else None


def counted(
    tree: Path, path: Path, worker: WorkerConfig, label: str, quiet: Quiet, misses: bool = False
) -> dict[str, Any]:
    """Instructions and summary of one run of the worker of ``tree`` over ``path``."""
    out = LOGS / f"{label}.cachegrind"
    dead = LOGS / f"{label}-dead-letters.jsonl"
    dead.unlink(missing_ok=True)
    caches = CACHES if misses else ["--cache-sim=no"]
    valgrind = ["valgrind", "--tool=cachegrind", *caches, f"--cachegrind-out-file={out}"]
    command = [*valgrind, *worker_command(tree), *run_args(f"jsonl:{path}", dead, worker)]
    log_path = LOGS / f"{label}.log"

    def run(sim: Any) -> Any:
        return run_process(
            command, log_path=log_path, timeout_s=3600, env=worker_env(sim.url), cwd=RESULTS
        )

    measured = measure(["--latency", "0"], LOGS / f"{label}-sim.log", run, quiet=quiet, note=log)
    text = log_path.read_bytes()
    instructions = count(REFS, text)
    summary = summary_of(log_path)
    if measured.process.returncode != 0 or not instructions or summary.get("ending") != "drained":
        raise SystemExit(f"{label}: the run failed; see {log_path}")
    return {
        "instructions": instructions,
        "d1_misses": count(D1_MISSES, text),
        "ll_misses": count(LL_MISSES, text),
        "requests": summary.get("requests"),
        "records": summary.get("records_read"),
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--changes", type=int, default=200_000)
    parser.add_argument("--contacts", type=int, default=40_000)
    parser.add_argument("--max-waiting", type=int, default=40_000)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--quiet-wait", type=float, default=10.0)
    parser.add_argument(
        "--compare", action="append", default=[], help="another checkout's work tree"
    )
    parser.add_argument(
        "--misses",
        action="store_true",
        help="simulate this machine's caches too: data misses in L1 and in L3 (about 1.5 times"
        " slower; the hot path waits on memory more than it executes)",
    )
    args = parser.parse_args(argv)
    if shutil.which("valgrind") is None:
        raise SystemExit("needs valgrind (Debian: apt-get install valgrind)")
    trees = [ROOT, *(Path(t).resolve() for t in args.compare)]
    for tree in trees:
        if not (tree / "worker" / "engine.py").exists():
            raise SystemExit(f"{tree}: not a contact-worker work tree")
    _, path = clean_stream(args.changes, args.contacts, args.seed)
    one = DATA / "one-change.jsonl"
    one.write_bytes(b'{"ID":"1","firstname":"Ann"}\n')
    worker = WorkerConfig(
        batch_size=100, linger_ms=5, rate=0, concurrency=8, max_waiting=args.max_waiting
    )
    quiet = Quiet(max_wait_s=args.quiet_wait)
    at = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
    rows: list[dict[str, Any]] = []
    for number, tree in enumerate(trees):
        byte_compile(tree / "worker")  # as installed: no compiling at each start
        log(f"{tree}: {args.changes:,} changes under cachegrind")
        job = counted(tree, path, worker, f"instructions-{number}", quiet, args.misses)
        log(f"{tree}: start-up alone (one change)")
        start = counted(tree, one, worker, f"instructions-{number}-start", quiet)
        work = job["instructions"] - start["instructions"]
        rows.append(
            {
                "tree": str(tree),
                "instructions": job["instructions"],
                "start_up": start["instructions"],
                "per_change": work / args.changes,
                "requests": job["requests"],
                "d1_misses": job["d1_misses"],
                "ll_misses": job["ll_misses"],
            }
        )
    first = rows[0]
    columns = [
        "tree",
        "instructions",
        "start-up",
        "per change (start-up left out)",
        "requests",
        "all / this checkout's",
        "per change / this checkout's",
    ]
    if args.misses:
        columns += ["L1 data misses", "L3 data misses", "L3 misses / this checkout's"]
    table = Table(
        f"instructions, {args.changes:,} changes over {args.contacts:,} IDs, --max-waiting"
        f" {args.max_waiting:,} ({at})",
        columns,
        [
            [
                row["tree"],
                f"{row['instructions']:,}",
                f"{row['start_up']:,}",
                f"{row['per_change']:,.0f}",
                row["requests"],
                round(row["instructions"] / first["instructions"], 3),
                round(row["per_change"] / first["per_change"], 3),
                *(
                    [
                        f"{row['d1_misses']:,}",
                        f"{row['ll_misses']:,}",
                        round(row["ll_misses"] / first["ll_misses"], 3),
                    ]
                    if args.misses
                    else []
                ),
            ]
            for row in rows
        ],
    )
    print(table.markdown())
    report = {"at": at, "machine": machine(), "params": vars(args), "rows": rows}
    (RESULTS / "instructions.json").write_bytes(orjson.dumps(report, option=orjson.OPT_INDENT_2))
    log(f"wrote {RESULTS / 'instructions.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
