"""The runtime's layout: import direction, no cycles, no hidden module state, small modules.

These read the source (with :mod:`ast`), so a change that breaks the layout fails here with
the module and the import that did it.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "hermes_policy"
# the runtime proper: what a stream passes through; it never reaches into the harnesses
CORE = ("inputs", "models", "cache", "attention", "retention", "graphs", "kernels", "fileio", "session", "policy")
HARNESSES = ("evaluation", "benchmarking", "serving")
MAX_LINES = 520


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def imports_of(path: Path, known: set[str]) -> set[str]:
    """The hermes_policy modules ``path`` imports, at module level or inside functions."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        for name in names:
            if name.startswith("hermes_policy") and name in known:
                found.add(name)
    return found


def import_graph() -> dict[str, set[str]]:
    known = modules()
    graph = {name: imports_of(path, set(known)) - {name} for name, path in known.items()}
    for name in graph:  # a package's __init__ is not an edge of its own submodules
        graph[name] = {dep for dep in graph[name] if not name.startswith(dep + ".")}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for dep in sorted(graph.get(node, ())):
            if state.get(dep) == 1:
                return stack[stack.index(dep) :] + [dep]
            if dep not in state and (cycle := visit(dep)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_find_cycle_reports_a_planted_cycle() -> None:
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_cycles_between_runtime_modules() -> None:
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


@pytest.mark.parametrize("package", CORE)
def test_core_never_imports_the_harnesses(package: str) -> None:
    graph = import_graph()
    offending = [
        f"{name} imports {dep}"
        for name, deps in graph.items()
        if name.startswith(f"hermes_policy.{package}")
        for dep in deps
        if dep.split(".")[1] in HARNESSES
    ]
    assert not offending, offending


def test_top_level_holds_only_what_users_import() -> None:
    modules_at_top = sorted(p.stem for p in PACKAGE.glob("*.py"))
    assert modules_at_top == ["__init__", "errors", "options"]
    packages = sorted(p.parent.name for p in PACKAGE.glob("*/__init__.py"))
    assert packages == [
        "attention", "benchmarking", "cache", "evaluation", "fileio", "graphs",
        "inputs", "kernels", "models", "policy", "retention", "serving", "session",
    ]  # fmt: skip


def test_no_module_is_over_the_size_limit() -> None:
    long = {name: n for name, p in modules().items() if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not long, long


HIDDEN_STATE = re.compile(r"\.hermes_\w+\s*=(?!=)|setattr\([^,]+,\s*[\"']hermes_")


@pytest.mark.parametrize("root", ["hermes_policy", "hermes_probe", "cli", "benchmarks"])
def test_no_hermes_attribute_is_set_on_modules(root: str) -> None:
    hits = [
        f"{p}:{i}"
        for p in sorted((PACKAGE.parent / root).rglob("*.py"))
        for i, line in enumerate(p.read_text().splitlines(), 1)
        if HIDDEN_STATE.search(line.split("#")[0])
    ]
    assert not hits, hits


def test_environment_is_read_in_one_module() -> None:
    readers = sorted(
        module_name(p)
        for p in PACKAGE.rglob("*.py")
        if re.search(r"os\.environ|os\.getenv", p.read_text())
    )
    assert readers == ["hermes_policy.options"], readers


ENV_NAME = re.compile(r"^HERMES_[A-Z0-9_]+$")


def test_hermes_variables_are_named_in_one_module() -> None:
    """No string in code (docstrings aside) names a HERMES_ variable outside options.py:
    a module that names one is about to read it."""
    hits = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if module_name(path) == "hermes_policy.options":
            continue
        tree = ast.parse(path.read_text())
        docstrings = {
            id(node.body[0].value)
            for node in ast.walk(tree)
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
            and node.body
            and isinstance(node.body[0], ast.Expr)
            and isinstance(node.body[0].value, ast.Constant)
        }
        hits += [
            f"{module_name(path)}:{node.lineno} {node.value}"
            for node in ast.walk(tree)
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings
            and ENV_NAME.match(node.value)
        ]
    assert not hits, hits
