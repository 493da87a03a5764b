"""Child processes of a benchmark: the simulator, the worker, the baselines; what each cost.

Moved here from benchmarks/pipeline.py so that ``contact-worker bench`` and the pipeline
scripts measure the same way:

* wall time from just before the spawn to the moment ``os.wait4`` reaps the child;
* the child's own CPU time (user + system) from ``wait4``'s rusage of exactly that child;
* its peak RSS: the kernel's high-water mark ``VmHWM`` of /proc/PID/status, polled every 20 ms.
  Not ``ru_maxrss``: fork copies the parent's high-water mark into the child and exec keeps
  the larger one, so a child's ``ru_maxrss`` is at least the harness's own peak.

Children get SIGKILL when the harness dies (PR_SET_PDEATHSIG), so a harness killed without
unwinding leaves no simulator or worker running to skew the next measurement.
"""

from __future__ import annotations

import contextlib
import ctypes
import importlib.metadata
import json
import os
import platform
import queue
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

BIN = Path(sys.executable).parent
CLK_TCK = os.sysconf("SC_CLK_TCK")
PR_SET_PDEATHSIG = 1
CLIENT_ID, CLIENT_SECRET = "demo", "demo-secret"


class BenchError(RuntimeError):
    """A run failed or misbehaved: the message says what and where its log is."""


def cli_command() -> list[str]:
    """The ``contact-worker`` console script of this interpreter's environment."""
    script = BIN / "contact-worker"
    if script.exists():
        return [str(script)]
    return [sys.executable, "-m", "worker.cli"]


def byte_compile(package: Path) -> None:
    """Write the bytecode of ``package``'s modules, as installing it does (pip compiles what
    it installs), so that a measured worker run from a checkout does not compile its source
    at every start: with ``PYTHONDONTWRITEBYTECODE`` set (as here and in the image) an
    editable install never caches it, and compiling took 70 ms of CPU per start here, more
    than a quarter of the start-up. Written to ``__pycache__`` beside the sources (ignored
    by git); Python reads it back whatever that variable says."""
    import compileall

    if not compileall.compile_dir(str(package), quiet=1):
        raise BenchError(f"could not byte-compile {package}")


def die_with_harness() -> None:
    """In the child before exec: get SIGKILL when the harness dies (PR_SET_PDEATHSIG)."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


def clean_env() -> dict[str, str]:
    """This environment without WORKER_*/SMSGW_* settings that would bend a run."""
    return {k: v for k, v in os.environ.items() if not k.startswith(("WORKER_", "SMSGW_"))}


def worker_env(api_url: str, **extra: str) -> dict[str, str]:
    """A clean environment pointing a worker (or a baseline) at ``api_url``, plus ``extra``."""
    return clean_env() | {
        "SMSGW_CLIENT_ID": CLIENT_ID,
        "SMSGW_CLIENT_SECRET": CLIENT_SECRET,
        "SMSGW_API_URL": api_url,
        **extra,
    }


def proc_cpu_s(pid: int) -> float | None:
    """User + system CPU seconds of a live process, from /proc/PID/stat (None if gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def status_mb(pid: int | str, key: str) -> float | None:
    """A memory line of /proc/PID/status (``VmHWM``, ``VmRSS``) in MiB; None if not there."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def system_busy_s() -> float:
    """CPU seconds all cores spent busy since boot (/proc/stat: all but idle and iowait)."""
    with open("/proc/stat") as f:
        values = [int(v) for v in f.readline().split()[1:9]]
    return (sum(values) - values[3] - values[4]) / CLK_TCK


def own_cpu_s() -> float:
    """CPU seconds of this process and its reaped children."""
    times = os.times()
    return times.user + times.system + times.children_user + times.children_system


class PeakWatcher:
    """Polls a process's VmHWM (a monotone high-water mark) until stopped; keeps the largest."""

    def __init__(self, pid: int, interval_s: float = 0.02) -> None:
        self.pid = pid
        self.interval_s = interval_s
        self.peak_mb: float | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()

    def _poll(self) -> None:
        while not self._stop.is_set():
            value = status_mb(self.pid, "VmHWM")
            if value is not None and (self.peak_mb is None or value > self.peak_mb):
                self.peak_mb = value
            self._stop.wait(self.interval_s)

    def stop(self) -> float | None:
        """Stop polling; the peak seen, None if the process was never seen."""
        self._stop.set()
        self._thread.join()
        return self.peak_mb


@dataclass
class Quiet:
    """How long to wait, before a run, for other processes to leave the cores alone."""

    max_wait_s: float = 0.0
    threshold_cores: float = 0.25
    window_s: float = 2.0

    def wait(self, note: Callable[[str], None] = lambda _: None) -> float | None:
        """Wait until others use less than the threshold; the last load seen (None: no wait)."""
        if self.max_wait_s <= 0:
            return None
        deadline = time.monotonic() + self.max_wait_s
        warned = False
        while True:
            before = system_busy_s()
            time.sleep(self.window_s)
            load = (system_busy_s() - before) / self.window_s
            if load < self.threshold_cores or time.monotonic() >= deadline:
                if load >= self.threshold_cores:
                    note(f"machine still busy ({load:.2f} cores used by others): measuring anyway")
                return load
            if not warned:
                note(f"waiting for a quiet machine: others use {load:.2f} cores")
                warned = True


def machine() -> dict[str, Any]:
    """What the figures were measured on."""
    model = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    try:
        loop = f"uvloop {importlib.metadata.version('uvloop')}"
    except importlib.metadata.PackageNotFoundError:
        loop = "asyncio"
    return {
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "cpu_model": model,
        "event_loop": loop,
        "platform": platform.platform(),
    }


def tail(path: Path, lines: int = 15) -> str:
    """The last lines of a log, for error messages."""
    try:
        text = path.read_text(errors="replace").splitlines()
    except OSError:
        return "(no log)"
    return "\n".join(text[-lines:])


class SimulatorProcess:
    """``contact-worker simulate --port 0`` in its own process, stopped on exit of the block."""

    def __init__(
        self, options: Sequence[str], log_path: Path, startup_timeout_s: float = 30.0
    ) -> None:
        self.options = list(options)
        self.log_path = log_path
        self.startup_timeout_s = startup_timeout_s
        self.url = ""
        self.proc: subprocess.Popen[str] | None = None
        self._log: IO[str] | None = None
        self._cpu_at_start = 0.0

    def __enter__(self) -> SimulatorProcess:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = open(self.log_path, "w")  # noqa: SIM115 - closed in stop()
        command = [*cli_command(), "simulate", "--port", "0", *self.options]
        self.proc = subprocess.Popen(
            command,
            stdout=subprocess.PIPE,
            stderr=self._log,
            text=True,
            env=clean_env(),
            preexec_fn=die_with_harness,
        )
        lines: queue.Queue[str] = queue.Queue()
        stdout = self.proc.stdout
        assert stdout is not None
        threading.Thread(target=lambda: lines.put(stdout.readline()), daemon=True).start()
        try:
            first = lines.get(timeout=self.startup_timeout_s)
        except queue.Empty:
            self.stop()
            raise BenchError(
                f"simulator did not say 'listening on' within {self.startup_timeout_s} s;"
                f" log: {self.log_path}"
            ) from None
        if not first.startswith("listening on "):
            code = self.proc.poll()
            self.stop()
            raise BenchError(
                f"simulator failed to start (exit {code}, said {first.strip()!r});"
                f" log: {self.log_path}"
            )
        self.url = first.removeprefix("listening on ").strip()
        self._cpu_at_start = proc_cpu_s(self.proc.pid) or 0.0
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def call(self, path: str, method: str = "GET", timeout_s: float = 60.0) -> Any:
        """One of the simulator's own endpoints (``/_sim/...``), its JSON answer decoded."""
        request = urllib.request.Request(
            self.url + path, method=method, data=b"" if method == "POST" else None
        )
        with urllib.request.urlopen(request, timeout=timeout_s) as resp:
            return json.loads(resp.read())

    def stats(self) -> dict[str, Any]:
        """The simulator's counters (``GET /_sim/stats``)."""
        data: dict[str, Any] = self.call("/_sim/stats", timeout_s=10)
        return data

    def cpu_s(self) -> float | None:
        """CPU seconds the simulator spent since it said it was listening."""
        if self.proc is None:
            return None
        now = proc_cpu_s(self.proc.pid)
        return None if now is None else now - self._cpu_at_start

    def stop(self) -> None:
        """SIGTERM, then SIGKILL after 10 s; always reaps the process and closes the log."""
        proc = self.proc
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)
        if proc is not None and proc.stdout is not None:
            proc.stdout.close()
        if self._log is not None:
            self._log.close()
            self._log = None


@dataclass
class ProcessRun:
    """One finished child: what it cost."""

    command: list[str]
    returncode: int
    wall_s: float
    user_s: float
    sys_s: float
    peak_rss_mb: float
    """VmHWM, polled; see the module docstring."""
    ru_maxrss_mb: float
    log_path: str

    @property
    def cpu_s(self) -> float:
        """User + system CPU seconds."""
        return self.user_s + self.sys_s


def feed_lines(path: Path, rate: float, pipe: IO[bytes], stop: threading.Event) -> None:
    """Write the lines of ``path`` into ``pipe`` at ``rate`` lines/s (0: at once); close it."""
    try:
        with open(path, "rb") as source:
            if rate <= 0:
                shutil.copyfileobj(source, pipe)
                return
            started = time.monotonic()
            written = 0
            for line in source:
                due = started + written / rate
                delay = due - time.monotonic()
                if delay > 0.002:
                    pipe.flush()
                    if stop.wait(delay):
                        return
                pipe.write(line)
                written += 1
    except (BrokenPipeError, ValueError):
        return  # the child is gone (its failure is reported from its exit code)
    finally:
        with contextlib.suppress(BrokenPipeError, ValueError, OSError):
            pipe.close()


def run_process(
    command: Sequence[str],
    *,
    log_path: Path,
    timeout_s: float,
    env: dict[str, str] | None = None,
    cwd: Path | None = None,
    on_line: Callable[[dict[str, Any]], None] = lambda _: None,
    feed: tuple[Path, float] | None = None,
    tick: Callable[[], None] = lambda: None,
) -> ProcessRun:
    """Run ``command`` to its end, measuring it; raise BenchError on a timeout.

    stderr goes to ``log_path``; every JSON line the child prints on stdout goes to ``on_line``
    (from a reader thread). ``feed=(path, rate)`` streams that file into the child's stdin at
    ``rate`` lines/s, starting when the child prints ``{"event": "ready"}``. ``tick`` is called
    about every 0.1 s while waiting (for progress displays).
    """
    log_path.parent.mkdir(parents=True, exist_ok=True)
    reaped: dict[str, Any] = {}
    ready = threading.Event()
    stop_feed = threading.Event()

    def lines(stream: IO[bytes]) -> None:
        for raw in stream:
            with contextlib.suppress(ValueError):
                event = json.loads(raw)
                if isinstance(event, dict):
                    if event.get("event") == "ready":
                        ready.set()
                    on_line(event)

    with open(log_path, "wb") as out:
        started = time.perf_counter()
        proc = subprocess.Popen(
            list(command),
            stdin=subprocess.PIPE if feed is not None else subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=out,
            env=env,
            cwd=cwd,
            preexec_fn=die_with_harness,
        )
        watcher = PeakWatcher(proc.pid)
        assert proc.stdout is not None
        reader = threading.Thread(target=lines, args=(proc.stdout,), daemon=True)
        reader.start()

        def reap() -> None:
            _, status, usage = os.wait4(proc.pid, 0)
            reaped.update(ended=time.perf_counter(), status=status, usage=usage)

        waiter = threading.Thread(target=reap, daemon=True)
        waiter.start()
        feeder: threading.Thread | None = None
        try:
            deadline = started + timeout_s
            while waiter.is_alive() and time.perf_counter() < deadline:
                if feed is not None and feeder is None and ready.is_set():
                    assert proc.stdin is not None
                    feeder = threading.Thread(
                        target=feed_lines, args=(*feed, proc.stdin, stop_feed), daemon=True
                    )
                    feeder.start()
                tick()
                waiter.join(0.1)
            timed_out = waiter.is_alive()
        finally:  # a timeout, or Ctrl-C while waiting: the child must not outlive us
            stop_feed.set()
            if waiter.is_alive():
                # os.kill, not proc.kill(): Popen would poll, racing the thread for the reap.
                with contextlib.suppress(ProcessLookupError):
                    os.kill(proc.pid, signal.SIGKILL)
                waiter.join(10)
            proc.returncode = -signal.SIGKILL
            peak = watcher.stop()
            reader.join(5)
            if feeder is not None:
                feeder.join(5)
            if proc.stdin is not None and feeder is None:
                with contextlib.suppress(OSError):
                    proc.stdin.close()
            proc.stdout.close()
        if timed_out:
            raise BenchError(f"{command[0]} still running after {timeout_s:.0f} s: killed")
    proc.returncode = os.waitstatus_to_exitcode(reaped["status"])
    usage = reaped["usage"]
    return ProcessRun(
        command=list(command),
        returncode=proc.returncode,
        wall_s=reaped["ended"] - started,
        user_s=usage.ru_utime,
        sys_s=usage.ru_stime,
        peak_rss_mb=peak if peak is not None else usage.ru_maxrss / 1024,
        ru_maxrss_mb=usage.ru_maxrss / 1024,
        log_path=str(log_path),
    )


@dataclass
class Measured:
    """A child run against a fresh simulator of its own: its cost and what the simulator saw."""

    process: ProcessRun
    sim_stats: dict[str, Any]
    sim_cpu_s: float
    """CPU seconds the simulator used during the run."""
    others_cpu_s: float
    """CPU seconds other processes used during the run: noise if much above 0."""
    load_before: float | None
    """Cores other processes used just before the run (None: not waited for)."""
    mismatches: int | None = None
    """Contacts the simulator does not hold as last written (the ``check`` of :func:`measure`)."""

    @property
    def others_cpu_pct(self) -> float:
        """Other processes' CPU during the run, in % of one core."""
        return round(100 * self.others_cpu_s / self.process.wall_s, 1)


def measure(
    sim_options: Sequence[str],
    sim_log: Path,
    run: Callable[[SimulatorProcess], ProcessRun],
    *,
    quiet: Quiet,
    note: Callable[[str], None] = lambda _: None,
    check: Callable[[SimulatorProcess], int] | None = None,
) -> Measured:
    """A fresh simulator, a quiet machine, ``run`` (a child against it), the simulator gone.

    Measures the CPU others used meanwhile: every core's busy time less this harness's, its
    reaped children's (the child of ``run`` among them) and the simulator's. ``check`` counts,
    after the run and before the simulator stops, the contacts it does not hold as expected.
    """
    with SimulatorProcess(sim_options, sim_log) as sim:
        load = quiet.wait(note)
        busy, own, sim_before = system_busy_s(), own_cpu_s(), sim.cpu_s() or 0.0
        process = run(sim)
        sim_cpu = (sim.cpu_s() or 0.0) - sim_before
        others = system_busy_s() - busy - (own_cpu_s() - own) - sim_cpu
        mismatches = None if check is None else check(sim)
        return Measured(process, sim.stats(), sim_cpu, max(0.0, others), load, mismatches)
