"""Latency models for the simulated gateway: a spec string becomes a sampler of delays."""

from __future__ import annotations

import math
import random
from collections.abc import Callable

LatencySampler = Callable[[random.Random], float]

_SPEC_HELP = (
    'expected "MS" (fixed), "uniform:LOW:HIGH", "exp:MEAN" or "lognormal:MEDIAN:SIGMA", '
    "all in milliseconds"
)


def _number(text: str, what: str, spec: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"bad latency spec {spec!r}: {what} {text!r} is not a number") from None
    # inf/nan would make every request hang forever or crash asyncio.sleep
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"bad latency spec {spec!r}: {what} must be a finite number >= 0")
    return value


def parse_latency(spec: str) -> LatencySampler:
    """Turn a latency spec (milliseconds) into a function drawing a delay in seconds."""
    parts = spec.strip().split(":")
    kind = parts[0].lower()
    args = parts[1:]
    if len(parts) == 1:
        fixed = _number(parts[0], "delay", spec) / 1000.0
        return lambda _rng: fixed
    if kind == "uniform" and len(args) == 2:
        low = _number(args[0], "low", spec) / 1000.0
        high = _number(args[1], "high", spec) / 1000.0
        if low > high:
            raise ValueError(f"bad latency spec {spec!r}: low must not exceed high")
        return lambda rng: rng.uniform(low, high)
    if kind == "exp" and len(args) == 1:
        mean = _number(args[0], "mean", spec) / 1000.0
        if mean == 0:
            return lambda _rng: 0.0
        rate = 1.0 / mean
        return lambda rng: rng.expovariate(rate)
    if kind == "lognormal" and len(args) == 2:
        median = _number(args[0], "median", spec) / 1000.0
        sigma = _number(args[1], "sigma", spec)
        if median == 0:
            raise ValueError(f"bad latency spec {spec!r}: median must be > 0")
        mu = math.log(median)
        return lambda rng: rng.lognormvariate(mu, sigma)
    raise ValueError(f"bad latency spec {spec!r}: {_SPEC_HELP}")
