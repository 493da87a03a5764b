"""The `contact-worker simulate` subcommand: run the simulated gateway until SIGINT/SIGTERM."""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
from collections.abc import Coroutine
from typing import Any

from worker.sim.gateway import RATE_WINDOWS, SimConfig, Simulator, serve


def configure_parser(p: argparse.ArgumentParser) -> None:
    """Add the simulator's options to `p`."""
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (127.0.0.1)")
    p.add_argument("--port", type=int, default=8080, help="port to listen on; 0 = any (8080)")
    p.add_argument("--client-id", default="demo", help="accepted X-Client-Id (demo)")
    p.add_argument("--client-secret", default="demo-secret", help="accepted X-Client-Secret")
    p.add_argument(
        "--auth-status",
        type=int,
        choices=(400, 401),
        default=401,
        help="HTTP status carrying error 104 (401)",
    )
    known = p.add_mutually_exclusive_group()
    known.add_argument(
        "--known-count", type=int, metavar="N", help='contacts "1".."N" exist, no other'
    )
    known.add_argument(
        "--known-file", metavar="PATH", help="exactly the IDs in this file exist (one per line)"
    )
    p.add_argument(
        "--unknown-share",
        type=float,
        default=0.0,
        metavar="P",
        help="without --known-*: share of IDs that do not exist (0)",
    )
    p.add_argument(
        "--latency",
        default="0",
        metavar="SPEC",
        help='ms: "20", "uniform:10:50", "exp:20", "lognormal:20:0.5" (0)',
    )
    p.add_argument(
        "--rate-limit",
        type=float,
        metavar="R",
        help="requests/s before 429 with Retry-After (the hidden limit; none by default)",
    )
    p.add_argument(
        "--rate-window",
        choices=RATE_WINDOWS,
        default="bucket",
        help="how the limit counts: bucket (token bucket, --rate-burst tokens) or sliding (at"
        " most R in any one second) (bucket)",
    )
    p.add_argument(
        "--rate-burst",
        type=float,
        metavar="N",
        help="the token bucket's size (default: R)",
    )
    p.add_argument(
        "--retry-after",
        type=float,
        metavar="S",
        help="the Retry-After of its 429s (default: until the limit has room, at least 1)",
    )
    p.add_argument(
        "--rate-headers",
        action="store_true",
        help="send RateLimit-Policy, RateLimit and X-RateLimit-* headers",
    )
    p.add_argument(
        "--error-rate", type=float, default=0.0, metavar="P", help="share of transient errors"
    )
    p.add_argument("--max-array", type=int, metavar="N", help="longer arrays get 413")
    p.add_argument(
        "--drop-rate", type=float, default=0.0, metavar="P", help="share of dropped connections"
    )
    p.add_argument(
        "--disabled-code",
        metavar="CODE",
        help="answer every authenticated request 403 with this code (116, 200, 1403)",
    )
    p.add_argument(
        "--foreign-404-share",
        type=float,
        default=0.0,
        metavar="P",
        help="share of requests answered 404 with an HTML page, as a proxy would (1 = wrong URL)",
    )
    p.add_argument(
        "--foreign-after",
        type=int,
        default=0,
        metavar="N",
        help="the foreign 404s begin after N requests (1 = after a worker's start-up check)",
    )
    p.add_argument(
        "--odd-code-share",
        type=float,
        default=0.0,
        metavar="P",
        help="share of requests answered 400 with an undocumented error code (--odd-code)",
    )
    p.add_argument("--odd-code", default="9999", metavar="CODE", help="that code (9999)")
    p.add_argument(
        "--slow-share",
        type=float,
        default=0.0,
        metavar="P",
        help="share of requests applied only after --slow-ms more, however long the client waits",
    )
    p.add_argument("--slow-ms", type=float, default=0.0, metavar="MS", help="that delay (0)")
    p.add_argument("--seed", type=int, default=0, help="seed of the fault draws (0)")
    p.add_argument(
        "--record-history",
        action="store_true",
        help="keep every applied object per ID (GET /_sim/history?id=X)",
    )


def _read_ids(path: str) -> frozenset[str]:
    with open(path, encoding="utf-8") as f:
        return frozenset(line.strip() for line in f if line.strip())


def _config(args: argparse.Namespace) -> SimConfig:
    known_ids = _read_ids(args.known_file) if args.known_file is not None else None
    return SimConfig(
        client_id=args.client_id,
        client_secret=args.client_secret,
        auth_status=args.auth_status,
        known_ids=known_ids,
        known_count=args.known_count,
        unknown_share=args.unknown_share,
        latency=args.latency,
        rate_limit=args.rate_limit,
        rate_window=args.rate_window,
        rate_burst=args.rate_burst,
        rate_headers=args.rate_headers,
        retry_after_s=args.retry_after,
        transient_error_rate=args.error_rate,
        max_array=args.max_array,
        drop_rate=args.drop_rate,
        seed=args.seed,
        record_history=args.record_history,
        disabled_code=args.disabled_code,
        foreign_404_share=args.foreign_404_share,
        foreign_after=args.foreign_after,
        odd_code_share=args.odd_code_share,
        odd_code=args.odd_code,
        slow_share=args.slow_share,
        slow_ms=args.slow_ms,
    )


async def _serve_until_signal(sim: Simulator, host: str, port: int) -> None:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    signals = (signal.SIGINT, signal.SIGTERM)
    for sig in signals:
        loop.add_signal_handler(sig, stop.set)
    try:
        async with serve(sim, host, port) as url:
            print(f"listening on {url}", flush=True)
            await stop.wait()
    finally:
        for sig in signals:
            loop.remove_signal_handler(sig)


def _run(coro: Coroutine[Any, Any, None]) -> None:
    try:
        import uvloop
    except ImportError:
        asyncio.run(coro)
    else:
        uvloop.run(coro)


def main(args: argparse.Namespace) -> int:
    """Serve the simulated gateway until SIGINT/SIGTERM; 0 on clean stop, 2 on bad options."""
    try:
        config = _config(args)
    except ValueError as exc:
        print(f"simulate: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"simulate: cannot read --known-file: {exc}", file=sys.stderr)
        return 2
    if not 0 <= args.port <= 65535:
        print(f"simulate: --port must be 0..65535, got {args.port}", file=sys.stderr)
        return 2
    try:
        _run(_serve_until_signal(Simulator(config), args.host, args.port))
    except OSError as exc:
        # Typically the port is taken: not a usage error, a fatal one.
        print(f"simulate: cannot listen on {args.host}:{args.port}: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        # A SIGINT that arrives before the handlers are installed.
        pass
    return 0


if __name__ == "__main__":
    _parser = argparse.ArgumentParser(
        prog="python -m worker.sim.cli", description="Run the simulated SMS Gateway API."
    )
    configure_parser(_parser)
    sys.exit(main(_parser.parse_args()))
