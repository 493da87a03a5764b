"""The optional TOML configuration file of ``run``: read, check its keys and types, yield text.

A file is one more layer under the flags and the environment. Its keys are the settings' field
names (``batch_size = 200``); its values may be TOML-typed or strings, and come out as the same
text a flag or a variable would carry, so that one set of parsers validates every layer.
"""

from __future__ import annotations

import argparse
import datetime
import difflib
import tomllib
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from worker.config import OPTIONS, ConfigFile, Option, Resolution, Settings, config_path, explain
from worker.errors import ConfigError

# The TOML types a setting accepts follow its type in Settings: an int takes an integer, a float
# an integer or a float, a bool a boolean; every setting also takes a string, which its parser
# reads exactly as it reads a flag ("10", "true").
_KINDS: dict[type, str] = {bool: "boolean", int: "integer", float: "number"}


def _kind(option: Option, hints: Mapping[str, Any]) -> str:
    """What a setting holds: "boolean", "integer", "number" or "string"."""
    hint = hints.get(option.field)
    for type_, kind in _KINDS.items():
        if hint is type_ or type_ in typing.get_args(hint):
            return kind
    return "string"


def _toml_type(value: object) -> str:
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int):
        return "an integer"
    if isinstance(value, float):
        return "a float"
    if isinstance(value, datetime.date | datetime.time):
        return "a date/time"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, dict):
        return "a table"
    return type(value).__name__


def as_text(value: object, kind: str) -> str:
    """The TOML ``value`` as a flag's text, if a setting of ``kind`` accepts its type.

    Raises :class:`ValueError` naming the expected and the given type, never the value (it may
    be a secret): a boolean is no integer, and a number for a text setting must be quoted
    (client IDs may look like numbers).
    """
    if isinstance(value, str):
        return value
    if isinstance(value, bool):
        if kind == "boolean":
            return "true" if value else "false"
    elif isinstance(value, int):
        if kind in ("integer", "number"):
            return str(value)
    elif isinstance(value, float):
        if kind == "number":
            return repr(value)  # inf and nan reach the parser, which refuses them by name
    got = _toml_type(value)
    if kind == "string":
        quote = " (quote it)" if isinstance(value, int | float) else ""
        raise ValueError(f"expected a string, got {got}{quote}")
    expected = {"boolean": "a boolean", "integer": "an integer", "number": "a number"}[kind]
    raise ValueError(f"expected {expected} (or a string), got {got}")


def _hint(key: str, options: tuple[Option, ...]) -> str:
    """Did you mean ...: the exact field for a flag or variable name, else the closest key."""
    for option in options:
        if key.lower() in (option.flag.lstrip("-"), option.env.lower(), option.flag):
            return f" (did you mean {option.field!r}?)"
    close = difflib.get_close_matches(key, [o.field for o in options], n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def check_config(
    data: Mapping[str, Any], where: str, options: tuple[Option, ...] = OPTIONS
) -> ConfigFile:
    """The parsed TOML ``data`` checked: known keys, accepted types; every problem at once."""
    by_field = {option.field: option for option in options}
    hints = typing.get_type_hints(Settings)
    values: dict[str, str] = {}
    problems: list[str] = []
    for key, value in data.items():
        option = by_field.get(key)
        if option is None:
            kind = "table" if isinstance(value, dict) else "key"
            hint = _hint(key, options)
            problems.append(f"{where}: unknown {kind} {key!r}{hint}")
            continue
        try:
            values[key] = as_text(value, _kind(option, hints))
        except ValueError as exc:
            problems.append(f"{where}: {key}: {exc}")
    if problems:
        raise ConfigError("; ".join(problems))
    return ConfigFile(where, values)


def load_config(path: str, options: tuple[Option, ...] = OPTIONS) -> ConfigFile:
    """Read and check the file at ``path``; :class:`ConfigError` names the file and the fault."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{path}: configuration file not found") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not UTF-8 text") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror or exc}") from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        # The message carries the place: "Invalid value (at line 3, column 14)".
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    return check_config(data, path, options)


def resolution(args: argparse.Namespace, environ: Mapping[str, str]) -> Resolution:
    """Read the configuration file if one is given, then explain every setting.

    A missing, unreadable or invalid file raises :class:`ConfigError` at once; problems of
    single settings are collected in the :class:`Resolution`.
    """
    path = config_path(args, environ)
    return explain(args, environ, None if path is None else load_config(path))


def resolve(args: argparse.Namespace, environ: Mapping[str, str]) -> Settings:
    """The settings of ``run``, validated."""
    return resolution(args, environ).settings()
