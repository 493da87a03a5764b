"""Whether the worker takes work now: the engine's own state, then its input's."""

from __future__ import annotations

from typing import TYPE_CHECKING, NamedTuple

if TYPE_CHECKING:
    from worker.engine import Engine

INPUT_UNAVAILABLE = "input_unavailable"
"""The reason while the engine runs and its input cannot be read (it reconnects meanwhile)."""


class Readiness(NamedTuple):
    """What /readyz answers (and ``contact_worker_ready`` shows)."""

    ready: bool
    reason: str
    detail: str = ""
    """What went wrong, when there is more to say than the reason."""


def readiness(engine: Engine) -> Readiness:
    """The engine's readiness (see :meth:`Engine.readiness`); while it is ready, not ready
    with ``input_unavailable`` (and the input's problem) as long as the input is down."""
    ready, reason = engine.readiness()
    if not ready:
        return Readiness(False, reason)
    stats = engine.source.statistics()
    if not stats.available:
        return Readiness(False, INPUT_UNAVAILABLE, stats.problem)
    return Readiness(True, reason)
