"""The one grammar of the inputs' URI query parameters (docs/inputs/README.md "URI options").

Every input names the same things the same way: ``batch`` (records per read), ``lease_s``,
``poll_s``, ``partitions``, ...; every duration is in seconds, decimals allowed, its name ending
in ``_s``. An unknown parameter is refused with a :class:`ConfigError` naming it and listing the
known ones. The names of earlier releases (``count``, ``lease_ms``, ``poll_ms``, ``block_ms``,
...) still work for one release: translated (milliseconds to seconds), with a warning log
``config.deprecated_uri_key`` naming the old and the new name.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

import structlog

from worker.errors import ConfigError


@dataclass(frozen=True, slots=True)
class Renamed:
    """An old parameter name: its new name, and the factor from its unit to the new one."""

    new: str
    scale: float = 1.0


RENAMED: Mapping[str, Renamed] = {
    "count": Renamed("batch"),
    "block_ms": Renamed("poll_s", 0.001),
    "poll_ms": Renamed("poll_s", 0.001),
    "lease_ms": Renamed("lease_s", 0.001),
    "claim_idle_ms": Renamed("claim_idle_s", 0.001),
    "busy_timeout_ms": Renamed("busy_timeout_s", 0.001),
}
"""Every old name of every input (each input names those it accepted in the last release)."""


def _nothing_passes(name: str) -> bool:
    return False


def split_params(
    label: str,
    pairs: Iterable[tuple[str, str]],
    known: Iterable[str],
    *,
    old: Iterable[str] = (),
    passes: Callable[[str], bool] = _nothing_passes,
    passing: str = "",
) -> tuple[dict[str, str], list[tuple[str, str]]]:
    """The worker's parameters of a ``label`` URI (old names translated, with a warning), and
    the pairs for the driver (those ``passes`` accepts); anything else raises ConfigError naming
    it and the known names (``passing`` describes what passes, for the message). ``old``: the
    names of :data:`RENAMED` this input took in the last release."""
    names, renamed = frozenset(known), frozenset(old)
    own: dict[str, str] = {}
    driver: list[tuple[str, str]] = []
    for name, value in pairs:
        if name in names:
            key, text = name, value
        elif name in renamed:
            key, text = RENAMED[name].new, _translate(label, name, value)
            # A logger per call: parsing may come before the command configures its logging.
            structlog.get_logger("worker.config").warning(
                "config.deprecated_uri_key",
                uri=label,
                old=name,
                new=key,
                detail=f"{label} URI: {name} is renamed {key}; the old name goes in the next"
                " release",
            )
        elif passes(name):
            driver.append((name, value))
            continue
        else:
            listed = ", ".join(sorted(names)) + (f"; {passing}" if passing else "")
            raise ConfigError(f"{label} URI: unknown parameter {name!r} (known: {listed})")
        if key in own:
            raise ConfigError(f"{label} URI: {key} is given twice (or under its old name too)")
        own[key] = text
    return own, driver


def _translate(label: str, name: str, value: str) -> str:
    renamed = RENAMED[name]
    if renamed.scale == 1.0:
        return value
    try:
        number = float(value)
    except ValueError:
        raise ConfigError(f"{label} URI: {name} must be a number, got {value!r}") from None
    return repr(number * renamed.scale)


def integer(label: str, params: Mapping[str, str], name: str, default: int, minimum: int) -> int:
    """The integer parameter ``name`` (at least ``minimum``), else ``default``."""
    text = params.get(name)
    if text is None:
        return default
    try:
        value = int(text)
    except ValueError:
        raise ConfigError(f"{label} URI: {name} must be an integer, got {text!r}") from None
    if value < minimum:
        raise ConfigError(f"{label} URI: {name} must be at least {minimum}, got {value}")
    return value


def seconds(
    label: str, params: Mapping[str, str], name: str, default: float, minimum: float
) -> float:
    """The duration ``name`` in seconds, decimals allowed (at least ``minimum``), else
    ``default``."""
    text = params.get(name)
    if text is None:
        return default
    try:
        value = float(text)
    except ValueError:
        raise ConfigError(f"{label} URI: {name} must be seconds, got {text!r}") from None
    if not math.isfinite(value) or value < minimum:
        raise ConfigError(f"{label} URI: {name} must be at least {minimum:g} s, got {text}")
    return value


def flag(label: str, params: Mapping[str, str], name: str, default: bool) -> bool:
    """The boolean parameter ``name`` (1/0, true/false, yes/no, on/off), else ``default``."""
    text = params.get(name)
    if text is None:
        return default
    lowered = text.lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise ConfigError(f"{label} URI: {name} must be 1 or 0, got {text!r}")
