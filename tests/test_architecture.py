"""The house rules of docs/architecture.md: imports run one way (no cycle, module- or
function-level), the layer contract holds, and no module grows past a newcomer's reading size."""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "atod_edge"
MAX_LINES = 450


def module_name(path: Path, package: Path = PACKAGE) -> str:
    parts = ["atod_edge", *path.relative_to(package).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph(package: Path = PACKAGE) -> dict[str, set[str]]:
    """module -> the atod_edge modules it imports anywhere in its file (functions included)."""
    files = {module_name(p, package): p for p in package.rglob("*.py")}

    def known(name: str) -> str:
        while name and name not in files:
            name = name.rpartition(".")[0]
        return name

    graph = {}
    for name, path in files.items():
        targets = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets |= {known(a.name) for a in node.names}
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    here = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
                    base = ".".join(here[:len(here) - node.level + 1] + ([node.module] if node.module else []))
                for alias in node.names:
                    full = f"{base}.{alias.name}"
                    targets.add(full if full in files else known(base))
        graph[name] = {t for t in targets if t and t != name}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a list of modules (first == last), or None."""
    state: dict[str, int] = {}      # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        path.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (found := visit(start)):
            return found
    return None


def test_the_scan_finds_a_cycle_where_there_is_one(tmp_path):
    """The scanner itself: a lazy (function-level) import that closes a loop is a cycle."""
    pkg = tmp_path / "atod_edge"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from atod_edge.sub.b import thing\n")
    (pkg / "sub" / "b.py").write_text("def thing():\n    from atod_edge import a\n")
    cycle = find_cycle(import_graph(pkg))
    assert cycle is not None and set(cycle) == {"atod_edge.a", "atod_edge.sub.b"}
    (pkg / "sub" / "b.py").write_text("def thing():\n    return 1\n")
    assert find_cycle(import_graph(pkg)) is None


def test_no_import_cycle_anywhere():
    assert find_cycle(import_graph()) is None


def test_the_layer_contract_holds():
    """lint-imports (import-linter) with the contracts in pyproject.toml."""
    exe = shutil.which("lint-imports") or str(Path(sys.executable).with_name("lint-imports"))
    if not Path(exe).exists():
        pytest.fail("lint-imports not installed: pip install -e '.[dev]'")
    result = subprocess.run([exe, "--no-cache"], cwd=PACKAGE.parent, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    assert "0 broken" in result.stdout


def test_modules_stay_readable():
    too_long = {module_name(p): n for p in PACKAGE.rglob("*.py")
                if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not too_long, f"modules over {MAX_LINES} lines: {too_long}"
