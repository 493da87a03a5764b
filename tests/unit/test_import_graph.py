"""No import cycles in worker/: every module can be imported first, on its own.

A cycle "broken" by an import inside a function still couples the two modules and breaks as
soon as the import moves; so every import statement counts here, at module level or inside a
function, except those under ``if TYPE_CHECKING:`` (never run). Imports inside functions are
kept only to avoid loading a backend's driver (redis, asyncpg) or an optional module before it
is needed; none of them may close a cycle.
"""

from __future__ import annotations

import ast
import importlib
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "worker"


def module_name(path: Path) -> str:
    """``worker/backends/redis/uri.py`` -> ``worker.backends.redis.uri``."""
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


def _type_checking_only(node: ast.AST) -> bool:
    return isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)


def imports_of(name: str) -> set[str]:
    """The worker modules ``name`` imports, wherever the import statement is (not TYPE_CHECKING)."""
    tree = ast.parse(MODULES[name].read_text())
    found: set[str] = set()
    pending: list[ast.AST] = [tree]
    package = name if MODULES[name].name == "__init__.py" else name.rpartition(".")[0]
    while pending:
        node = pending.pop()
        if _type_checking_only(node):
            continue
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(
                    [*package.split(".")[: len(package.split(".")) - node.level + 1], base]
                ).strip(".")
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                found.add(sub if sub in MODULES else base)
        pending.extend(ast.iter_child_nodes(node))
    return {module for module in found if module in MODULES and module != name}


def find_cycle() -> list[str] | None:
    """One import cycle among worker's modules, as a path that ends where it starts."""
    graph = {name: imports_of(name) for name in MODULES}
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return [*path[path.index(nxt) :], nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for name in MODULES:
        if name not in state and (cycle := visit(name)):
            return cycle
    return None


def test_no_module_imports_itself_through_others() -> None:
    """No cycle in the graph of import statements (function-level ones included)."""
    assert None is find_cycle()


def test_the_graph_sees_function_level_imports(tmp_path: Path) -> None:
    """The check itself: an import inside a function is an edge."""
    assert "worker.backends.redis.stream" in imports_of("worker.backends.redis")


def test_the_command_line_imports_a_command_only_when_it_runs() -> None:
    """Every command's module exists and has its two functions; starting the command line
    (``--version``, ``--help``) imports none of them, nor the engine."""
    from worker.cli import COMMANDS

    for command in COMMANDS:
        module = importlib.import_module(command.module)
        assert callable(getattr(module, command.configure)), command.name
        assert callable(getattr(module, command.main)), command.name
    probe = (
        "import sys, worker.cli\n"
        "heavy = [m for m in sys.modules if m.startswith(('worker.bench', 'worker.sim', "
        "'worker.demo', 'worker.engine', 'worker.run', 'worker.backends', 'rich'))]\n"
        "assert not heavy, heavy\n"
    )
    subprocess.run([sys.executable, "-c", probe], check=True, cwd=ROOT)


def test_run_keeps_rich_out_and_dlq_show_takes_it_in() -> None:
    """structlog would import rich (3.8 MB) for tracebacks no worker log prints: ``run``
    goes without it; the commands that draw tables still import it themselves."""
    probe = (
        "import sys, worker.cli, worker.run_cli\n"
        "assert 'rich' not in sys.modules, 'run imported rich'\n"
        "import structlog.dev\n"
        "assert structlog.dev.rich is None\n"
        "import worker.deadletters.display\n"
        "assert 'rich' in sys.modules\n"
    )
    subprocess.run([sys.executable, "-c", probe], check=True, cwd=ROOT)


def test_run_without_a_status_port_imports_no_server_and_no_prometheus() -> None:
    """aiohttp's server, prometheus_client and the SQLite spool's routes cost every start
    about 30 ms of CPU (docs/performance.md): ``run`` imports them only when it serves a
    status port, and then the status port has them."""
    probe = (
        "import sys, worker.cli, worker.run_cli, worker.run, worker.engine\n"
        "late = [m for m in sys.modules if m.startswith(('prometheus_client', 'aiohttp.web',"
        " 'worker.obs.http', 'worker.obs.metrics', 'worker.backends.sqlite'))]\n"
        "assert not late, late\n"
        "import worker.obs.http\n"
        "assert 'prometheus_client' in sys.modules and 'aiohttp.web' in sys.modules\n"
    )
    subprocess.run([sys.executable, "-c", probe], check=True, cwd=ROOT)


@pytest.mark.parametrize("first", ["worker.config_file", "worker.run", "worker.preflight"])
def test_modules_that_were_in_cycles_import_first(first: str) -> None:
    """In a fresh interpreter, each import works as the very first one."""
    subprocess.run([sys.executable, "-c", f"import {first}"], check=True, cwd=ROOT)
