"""SIGTERM and SIGINT for the whole life of ``contact-worker run``: one handler, routed by phase.

The handler is installed when ``run`` starts, before anything is opened, and stays until the
process exits: no moment of a run is left to the default action, which kills the process at once
(exit -15 / 143, nothing drained, the input and sink not closed). What a signal does depends on
where the run is:

- ``starting`` (settings, opening the input and the sink, the status port, the API check):
  nothing was read yet, so the start is cancelled and the run exits 0 at once;
- ``running`` (the engine runs): the engine drains (:meth:`worker.engine.Engine.on_signal`);
  ``draining``: a further signal stops it without draining (still exit 0);
- ``ending`` (the engine returned; the input and sink close, the process exits): the run ends
  anyway, the signal changes nothing.

Each signal is logged once as ``signal.received`` with ``signal`` and ``phase``.

The handler itself only hands the signal over: Python runs it between two bytecodes of whatever
the main thread was doing (the event loop's own code included), where writing a log line (stderr
may be half written) or touching the engine is not safe. While the event loop runs it goes to the
loop (``call_soon_threadsafe``); before and after, it is kept and logged at the next safe point.
"""

from __future__ import annotations

import asyncio
import enum
import signal
from types import FrameType
from typing import TYPE_CHECKING, Any

import structlog

if TYPE_CHECKING:
    import anyio

    from worker.engine import Engine

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Phase(enum.Enum):
    """Where a run is, as far as a signal is concerned."""

    STARTING = "starting"
    RUNNING = "running"
    DRAINING = "draining"
    ENDING = "ending"


class SignalRouter:
    """The one SIGTERM/SIGINT handler of a run, and where it sends each signal."""

    def __init__(self) -> None:
        self.phase = Phase.STARTING
        self.stopped_before_start = False
        """A signal came before the engine ran: the run stops, exit 0."""
        self._loop: asyncio.AbstractEventLoop | None = None
        self._handed: list[signal.Signals] = []
        """Handed to the event loop, not routed yet."""
        self._unlogged: list[tuple[signal.Signals, Phase]] = []
        self._start: anyio.CancelScope | None = None
        self._engine: Engine | None = None

    def install(self) -> None:
        """Take SIGTERM and SIGINT over from now on (call it as early as possible)."""
        for sig in SIGNALS:
            signal.signal(sig, self._handle)

    def finish(self) -> None:
        """The run is over and its exit code decided: ignore signals from now on, then log
        those that came since the event loop ended.

        Ignored, not handled: while the interpreter shuts down it puts the default action back
        for every signal that has a Python handler (but leaves an ignored one ignored), and
        the default action kills.
        """
        for sig in SIGNALS:
            signal.signal(sig, signal.SIG_IGN)
        # Handed to the loop as it ended, never routed: they came at the end all the same.
        handed, self._handed = self._handed, []
        self._unlogged += [(sig, Phase.ENDING) for sig in handed]
        self._log_unlogged()

    # -- the handler: hand over, nothing else --------------------------------------------------

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        sig = signal.Signals(signum)
        loop = self._loop
        if loop is not None:
            self._handed.append(sig)
            try:
                loop.call_soon_threadsafe(self._route, sig)
                return
            except RuntimeError:  # the loop closed meanwhile
                self._handed.remove(sig)
        # No event loop (yet, or any more): nothing to stop but the start; log it later.
        self._unlogged.append((sig, self.phase))
        if self.phase is Phase.STARTING:
            self.stopped_before_start = True

    # -- in the event loop ---------------------------------------------------------------------

    def attach(self, loop: asyncio.AbstractEventLoop) -> None:
        """The event loop runs: signals go to it from now on (and those before it are logged)."""
        self._loop = loop
        self._log_unlogged()

    def detach(self) -> None:
        """The event loop is about to end: signals are kept for :meth:`finish` from now on."""
        self._loop = None
        self.phase = Phase.ENDING

    def starting(self, scope: anyio.CancelScope) -> None:
        """A signal from now until :meth:`running` cancels ``scope`` (the start)."""
        self._start = scope
        if self.stopped_before_start:
            scope.cancel()

    def running(self, engine: Engine) -> None:
        """The engine runs (or is about to: a signal before it starts is kept by it)."""
        self._start = None
        self._engine = engine
        self.phase = Phase.RUNNING

    def ending(self) -> None:
        """The engine returned: the rest of the run only closes."""
        self._engine = None
        self.phase = Phase.ENDING

    def _route(self, sig: signal.Signals) -> None:
        if sig in self._handed:
            self._handed.remove(sig)
        phase = self.phase
        self._log(sig, phase)
        if phase is Phase.STARTING:
            self.stopped_before_start = True
            if self._start is not None:
                self._start.cancel()
        elif self._engine is not None and phase in (Phase.RUNNING, Phase.DRAINING):
            self.phase = Phase.DRAINING
            self._engine.on_signal(sig)

    # -- logging ---------------------------------------------------------------------------

    def _log_unlogged(self) -> None:
        unlogged, self._unlogged = self._unlogged, []
        for sig, phase in unlogged:
            self._log(sig, phase)

    @staticmethod
    def _log(sig: signal.Signals, phase: Phase) -> None:
        what = _WHAT[phase]
        fields: dict[str, Any] = {"signal": sig.name, "phase": phase.value, "action": what}
        structlog.get_logger("worker.signals").info("signal.received", **fields)


_WHAT = {
    Phase.STARTING: "stopping before the start: nothing was read",
    Phase.RUNNING: "draining: no more reading, in-flight requests finish",
    Phase.DRAINING: "stopping without draining",
    Phase.ENDING: "none: the run is ending",
}
"""The ``action`` field of ``signal.received``: what the signal does in each phase."""
