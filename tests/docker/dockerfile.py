"""A small Dockerfile reader: what the final stage of an image would run, and with what.

Enough of the Dockerfile grammar for the tests to take the entrypoint, environment and health
check from the Dockerfile itself instead of repeating them: line continuations, comment lines,
exec (JSON) and shell forms, ``ENV`` with ``$VAR`` / ``${VAR}`` expansion, ``ARG`` defaults in
``FROM``. Not a full implementation (no escape directive, no heredocs, no ``ONBUILD``).
"""

from __future__ import annotations

import json
import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path

_VAR = re.compile(r"\$(?:\{(\w+)\}|(\w+))")


@dataclass
class Stage:
    """One ``FROM`` block and what it sets; later instructions of a kind replace earlier ones."""

    base: str
    name: str | None = None
    env: dict[str, str] = field(default_factory=dict)
    entrypoint: list[str] = field(default_factory=list)
    cmd: list[str] = field(default_factory=list)
    cmd_set: bool = False
    healthcheck: list[str] = field(default_factory=list)
    healthcheck_options: dict[str, str] = field(default_factory=dict)
    workdir: str = "/"
    user: str = ""
    stopsignal: str = ""
    expose: list[str] = field(default_factory=list)
    volumes: list[str] = field(default_factory=list)
    entrypoint_exec_form: bool = True


@dataclass
class Dockerfile:
    """The stages in order; the last one is the image that runs."""

    stages: list[Stage]
    instructions: list[tuple[str, str]]

    @property
    def final(self) -> Stage:
        """The stage that becomes the image."""
        return self.stages[-1]


def instructions(text: str) -> list[tuple[str, str]]:
    """(KEYWORD, arguments) pairs, continuations joined and comment lines dropped."""
    result: list[tuple[str, str]] = []
    pending = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue  # comment lines may also sit inside a continued instruction
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        whole = (pending + line).strip()
        pending = ""
        keyword, _, args = whole.partition(" ")
        result.append((keyword.upper(), args.strip()))
    if pending.strip():
        keyword, _, args = pending.strip().partition(" ")
        result.append((keyword.upper(), args.strip()))
    return result


def expand(value: str, env: dict[str, str]) -> str:
    """``$VAR`` and ``${VAR}`` replaced from ``env`` (unknown names become empty, as in Docker)."""
    return _VAR.sub(lambda m: env.get(m.group(1) or m.group(2), ""), value)


def command(args: str) -> tuple[list[str], bool]:
    """The argv of an exec-form (JSON array) or shell-form command, and whether it was exec form."""
    if args.startswith("["):
        argv = json.loads(args)
        assert isinstance(argv, list) and all(isinstance(a, str) for a in argv), args
        return argv, True
    return ["/bin/sh", "-c", args], False


def _env_pairs(args: str) -> list[tuple[str, str]]:
    words = shlex.split(args)
    if words and "=" not in words[0]:
        return [(words[0], args.split(None, 1)[1] if len(words) > 1 else "")]  # ENV KEY value
    return [(w.split("=", 1)[0], w.split("=", 1)[1]) for w in words]


def parse(text: str, base_env: dict[str, str] | None = None) -> Dockerfile:
    """Read a Dockerfile; ``base_env`` stands in for the environment the base image sets."""
    args: dict[str, str] = {}
    stages: list[Stage] = []
    pairs = instructions(text)
    for keyword, rest in pairs:
        if keyword == "ARG" and not stages:
            name, _, default = rest.partition("=")
            args[name.strip()] = default.strip()
        elif keyword == "FROM":
            words = expand(rest, args).split()
            words = [w for w in words if not w.startswith("--")]
            alias = words[2] if len(words) >= 3 and words[1].upper() == "AS" else None
            stages.append(Stage(base=words[0], name=alias, env=dict(base_env or {})))
        elif not stages:
            raise ValueError(f"{keyword} before FROM")
        else:
            _apply(stages[-1], keyword, rest)
    if not stages:
        raise ValueError("no FROM")
    return Dockerfile(stages, pairs)


def _apply(stage: Stage, keyword: str, rest: str) -> None:
    if keyword == "ENV":
        for key, value in _env_pairs(rest):
            stage.env[key] = expand(value, stage.env)
    elif keyword == "ENTRYPOINT":
        stage.entrypoint, stage.entrypoint_exec_form = command(rest)
        if not stage.cmd_set:
            stage.cmd = []  # ENTRYPOINT drops the base image's CMD, not this stage's own
    elif keyword == "CMD":
        stage.cmd, stage.cmd_set = command(rest)[0], True
    elif keyword == "HEALTHCHECK":
        words = rest.split(" ")
        options: dict[str, str] = {}
        while words and words[0].startswith("--"):
            key, _, value = words.pop(0)[2:].partition("=")
            options[key] = value
        while words and not words[0]:
            words.pop(0)
        if words and words[0].upper() == "CMD":
            stage.healthcheck = command(" ".join(words[1:]).strip())[0]
        else:
            stage.healthcheck = []
        stage.healthcheck_options = options
    elif keyword == "WORKDIR":
        path = expand(rest, stage.env)
        stage.workdir = path if path.startswith("/") else str(Path(stage.workdir) / path)
    elif keyword == "USER":
        stage.user = expand(rest, stage.env)
    elif keyword == "STOPSIGNAL":
        stage.stopsignal = rest
    elif keyword == "EXPOSE":
        stage.expose += expand(rest, stage.env).split()
    elif keyword == "VOLUME":
        stage.volumes += json.loads(rest) if rest.startswith("[") else rest.split()
