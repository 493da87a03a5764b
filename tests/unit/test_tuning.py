"""The process tuning ``run`` and ``demo`` apply before they run (worker.run.tune_runtime)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from worker import run

ROOT = Path(__file__).resolve().parents[2]

MAPPED_AFTER_A_LARGE_FREE = """
import ctypes, sys
class Mallinfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd",
        "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]
libc = ctypes.CDLL(None)
libc.mallinfo2.restype = Mallinfo2
if sys.argv[1] == "tuned":
    from worker.run import tune_malloc
    tune_malloc()
big = bytes(8 << 20)
del big  # glibc's own rule: freeing a mapped 8 MiB block raises its threshold to 8 MiB
before = libc.mallinfo2().hblkhd
block = bytearray(2 << 20)  # mapped on its own (returned when freed), or from the heap
print(libc.mallinfo2().hblkhd - before)
"""


@pytest.mark.skipif(not run.is_glibc(), reason="glibc's malloc only")
def test_large_blocks_stay_mapped_after_a_large_free() -> None:
    """Untuned, glibc serves a 2 MiB block from its heap once an 8 MiB one was freed (where
    it stays when freed); tuned, the block gets its own mapping, given back when freed."""

    def mapped(mode: str) -> int:
        out = subprocess.run(
            [sys.executable, "-c", MAPPED_AFTER_A_LARGE_FREE, mode],
            check=True,
            capture_output=True,
            text=True,
            cwd=ROOT,
        ).stdout
        return int(out)

    assert 0 == mapped("default")
    assert mapped("tuned") >= 2 << 20


def test_nothing_is_tuned_off_glibc(monkeypatch: pytest.MonkeyPatch) -> None:
    """Where confstr does not name glibc (musl, macOS, Windows), mallopt is not looked up."""

    def no_glibc(name: str) -> str:
        raise ValueError(f"unrecognized configuration name: {name}")

    monkeypatch.setattr(run.os, "confstr", no_glibc)
    assert not run.is_glibc()
    import ctypes

    def refuse(*args: object) -> object:
        raise AssertionError("CDLL called off glibc")

    monkeypatch.setattr(ctypes, "CDLL", refuse)
    run.tune_malloc()  # returns without touching ctypes
