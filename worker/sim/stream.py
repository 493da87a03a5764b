"""A deterministic, realistic stream of partial contact changes (JSONL) for demos and benchmarks."""

from __future__ import annotations

import bisect
import datetime
import itertools
import os
import random
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import orjson

from worker.sim.gateway import check_contact

# Unknown IDs live far above any known one, so `known_count=contacts` leaves them unknown.
UNKNOWN_ID_BASE = 900_000_000

_LASTNAMES = (
    "Peeters Janssens Maes Jacobs Mertens Willems Claes Goossens Wouters De Smet Dubois "
    "Lambert Dupont Martin Simon Laurent Leclercq Lee Nguyen Garcia Muller Schmidt Rossi "
    "Novak Kowalski Silva Costa Moreau Fontaine Vermeulen Van Damme Hermans Aerts"
).split()
_FIRSTNAMES = (
    "Emma Olivia Louise Mila Alice Lucas Noah Arthur Louis Liam Adam Jules Victor Lina Nora "
    "Elena Sofia Marie Anna Hugo Leon Finn Amir Yasmine Sara Tom Lars Eva Ines Jan"
).split()
_EXTRA_TEMPLATES = (
    "Building {}B",
    "Monday",
    "ref-{}",
    "loyalty {}",
    "floor {}",
    "VIP",
    "note {}",
    "Ghent",
)
# Weights shape the changes like a CRM's: names and phones change more than birthdays.
_FIELD_WEIGHTS = {
    "lastname": 3,
    "firstname": 2,
    "phone": 3,
    **{f"extra{i}": 1 for i in range(1, 9)},
    "birthday": 1,
    "unsubscribed": 1,
    "groupid": 1,
}
_FIELD_TABLE = tuple(name for name, weight in _FIELD_WEIGHTS.items() for _ in range(weight))
_BIRTHDAY_FIRST = datetime.date(1940, 1, 1).toordinal()
_BIRTHDAY_SPAN = datetime.date(2010, 12, 31).toordinal() - _BIRTHDAY_FIRST


@dataclass(frozen=True)
class StreamSpec:
    """Shape of a generated change stream; the same spec always yields the same lines."""

    changes: int = 50_000
    contacts: int = 10_000
    unknown_share: float = 0.01
    invalid: int = 5
    distribution: str = "uniform"
    zipf_s: float = 1.1
    seed: int = 1

    def __post_init__(self) -> None:
        if self.changes < 0 or self.invalid < 0:
            raise ValueError("changes and invalid must be >= 0")
        if self.contacts < 1:
            raise ValueError("contacts must be >= 1")
        if not 0.0 <= self.unknown_share <= 1.0:
            raise ValueError("unknown_share must be between 0 and 1")
        if self.distribution not in ("uniform", "zipf"):
            raise ValueError(f"distribution must be uniform or zipf, got {self.distribution!r}")
        if self.zipf_s <= 0:
            raise ValueError("zipf_s must be > 0")

    @property
    def lines(self) -> int:
        """Total number of lines: the valid changes plus the invalid lines."""
        return self.changes + self.invalid


def _invalid_line(kind: int, rng: random.Random, contacts: int) -> bytes:
    """One invalid line of the given kind; the first five kinds are the most common mistakes."""
    id_ = 1 + int(rng.random() * contacts)
    objs: list[object] = [
        None,  # bad JSON, below
        {"ID": str(id_), "nickname": "Bobby"},
        {"ID": id_, "birthday": "1990-02-30"},
        {"lastname": "Lee", "extra2": "Building 2B"},
        {"ID": str(id_), "unsubscribed": "yes"},
        {"ID": str(id_), "firstname": None},
        {"ID": str(id_)},
        {"ID": True, "lastname": "Lee"},
        {"ID": "", "phone": "+32470123456"},
        [{"ID": str(id_), "lastname": "Lee"}],
        {"ID": str(id_), "birthday": "1990-2-3"},
        {"ID": id_, "lastname": 42},
    ]
    obj = objs[kind % len(objs)]
    if obj is None:
        return b'{"ID": "%d", "lastname": "Lee"\n' % id_
    return orjson.dumps(obj, option=orjson.OPT_APPEND_NEWLINE)


def unknown_pool(spec: StreamSpec) -> int:
    """How many distinct unknown IDs the stream uses: a share ``unknown_share`` of all its IDs."""
    share = spec.unknown_share
    if share <= 0.0:
        return 0
    if share >= 1.0:
        return spec.contacts
    return max(1, round(spec.contacts * share / (1.0 - share)))


def _id_picker(spec: StreamSpec, rng: random.Random) -> Callable[[], int]:
    """A function drawing the ID (as an int) of the next change.

    The population is the known IDs 1..contacts plus a pool of stale (unknown) IDs, so that
    ``unknown_share`` is the share of distinct IDs the API does not know, as in a CRM whose
    records point at contacts deleted from the gateway. Stale IDs recur like any other.
    """
    rand = rng.random
    contacts = spec.contacts
    stale = unknown_pool(spec)
    population = contacts + stale

    def to_id(index: int) -> int:
        return index if index <= contacts else UNKNOWN_ID_BASE + index - contacts

    if spec.distribution == "zipf":
        # Rank r is drawn with weight 1/r^s; ranks map to shuffled IDs so hot contacts are spread.
        cum = list(itertools.accumulate(1.0 / (r**spec.zipf_s) for r in range(1, population + 1)))
        total = cum[-1]
        ids = [to_id(i) for i in range(1, population + 1)]
        rng.shuffle(ids)
        last = population - 1

        def pick() -> int:
            return ids[min(bisect.bisect_left(cum, rand() * total), last)]

        return pick

    def pick_uniform() -> int:
        return to_id(1 + int(rand() * population))

    return pick_uniform


def generate_lines(spec: StreamSpec) -> Iterator[bytes]:
    """Yield spec.lines JSONL lines (each ending in a newline): valid changes and invalid lines."""
    rng = random.Random(spec.seed)
    rand = rng.random
    dumps = orjson.dumps
    newline = orjson.OPT_APPEND_NEWLINE
    pick_id = _id_picker(spec, rng)
    total = spec.lines
    invalid_at = set(rng.sample(range(total), spec.invalid)) if spec.invalid else set()
    table = _FIELD_TABLE
    n_table = len(table)
    invalid_kind = 0
    for line_no in range(total):
        if line_no in invalid_at:
            yield _invalid_line(invalid_kind, rng, spec.contacts)
            invalid_kind += 1
            continue
        id_ = pick_id()
        change: dict[str, object] = {"ID": id_ if rand() < 0.3 else str(id_)}
        roll = rand()
        wanted = 1 if roll < 0.6 else 2 if roll < 0.9 else 3
        while len(change) <= wanted:
            name = table[int(rand() * n_table)]
            if name in change:
                continue
            value: object
            if name == "lastname":
                value = _LASTNAMES[int(rand() * len(_LASTNAMES))]
            elif name == "firstname":
                value = _FIRSTNAMES[int(rand() * len(_FIRSTNAMES))]
            elif name == "phone":
                value = f"+3247{int(rand() * 10_000_000):07d}"
            elif name == "birthday":
                day = _BIRTHDAY_FIRST + int(rand() * _BIRTHDAY_SPAN)
                value = datetime.date.fromordinal(day).isoformat()
            elif name == "unsubscribed":
                value = rand() < 0.5
            elif name == "groupid":
                value = str(1 + int(rand() * 40))
            elif rand() < 0.03:
                value = ""  # clearing a field is a valid change too
            else:
                # The line number makes most extra values unique, so a reordering shows in
                # the final state.
                value = _EXTRA_TEMPLATES[int(rand() * len(_EXTRA_TEMPLATES))].format(line_no)
            change[name] = value
        yield dumps(change, option=newline)


def write_file(spec: StreamSpec, path: str | os.PathLike[str]) -> None:
    """Write the stream of `spec` to a JSONL file."""
    with open(path, "wb") as out:
        chunk: list[bytes] = []
        for line in generate_lines(spec):
            chunk.append(line)
            if len(chunk) >= 10_000:
                out.write(b"".join(chunk))
                chunk.clear()
        out.write(b"".join(chunk))


def valid_change(line: bytes) -> dict[str, object] | None:
    """Decode one line as a change; None if the worker must dead-letter it as invalid."""
    try:
        obj = orjson.loads(line)
    except orjson.JSONDecodeError:
        return None
    if type(obj) is not dict or len(obj) < 2 or check_contact(obj) is not None:
        return None
    return obj


def expected_final_state(lines: Iterable[bytes]) -> dict[str, dict[str, object]]:
    """Merge the valid changes per str(ID) in order: what a correct worker leaves at the API.

    Unknown IDs are included; filter them with Simulator.is_known.
    """
    state: dict[str, dict[str, object]] = {}
    for line in lines:
        change = valid_change(line)
        if change is None:
            continue
        key = str(change["ID"])
        fields = state.get(key)
        if fields is None:
            fields = state[key] = {}
        fields.update(change)
        del fields["ID"]
    return state
