"""No import cycles among pgveil's modules, and the command line and the demo imported only
from where they belong: an AST walk over every import, not a convention.

The graph's nodes are the modules of the packages pyproject.toml ships (`proxy/`, `rules/`,
`audit/`, `erasure/`, and any added to its list); an edge
is any import statement in a module's source, at its top level or inside a function (a
deferred import is still a dependency: two modules that import each other, even lazily,
cannot be read or moved apart). An import of a package's name that is really a submodule
(`from proxy import demo_data`) is an edge to that submodule. Imports under
`if TYPE_CHECKING:` are left out: they never run, and they are how typed code names the
type of its caller.
"""

from __future__ import annotations

import ast
import fnmatch
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
_INCLUDE = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"][
    "find"
]["include"]
PACKAGES = tuple(
    sorted(
        d.name
        for d in ROOT.iterdir()
        if (d / "__init__.py").is_file() and any(fnmatch.fnmatchcase(d.name, g) for g in _INCLUDE)
    )
)

# Cycles known and accepted: none (the two inside rules/ went with the analyser's split).
# The list must match exactly: a new cycle fails, and so does one gone but still listed.
KNOWN: set[frozenset[str]] = set()


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _resolve(name: str, modules: dict[str, Path]) -> str | None:
    """The longest prefix of a dotted name that is one of the modules."""
    parts = name.split(".")
    while parts:
        candidate = ".".join(parts)
        if candidate in modules:
            return candidate
        parts.pop()
    return None


def _base(module: str, path: Path, node: ast.ImportFrom) -> str:
    if node.level == 0:
        return node.module or ""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for _ in range(node.level - 1):
        package = package.rpartition(".")[0]
    return f"{package}.{node.module}" if node.module else package


def _type_checking_only(tree: ast.Module) -> set[ast.AST]:
    skip: set[ast.AST] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for stmt in node.body:
                skip |= set(ast.walk(stmt))
    return skip


def import_graph(modules: dict[str, Path]) -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for module, path in modules.items():
        tree = ast.parse(path.read_text(), str(path))
        skip = _type_checking_only(tree)
        for node in ast.walk(tree):
            if node in skip:
                continue
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = _base(module, path, node)
                # `from pkg import sub` imports the submodule when there is one
                targets = [f"{base}.{a.name}" for a in node.names]
            for target in targets:
                found = _resolve(target, modules)
                if found is not None and found != module:
                    graph[module].add(found)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[frozenset[str]]:
    """The strongly connected components of more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[frozenset[str]] = []
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            v, edges = work[-1]
            w = next(edges, None)
            if w is not None:
                if w not in index:
                    index[w] = low[w] = len(index)
                    stack.append(w)
                    on_stack.add(w)
                    work.append((w, iter(sorted(graph[w]))))
                elif w in on_stack:
                    low[v] = min(low[v], index[w])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[v])
            if low[v] == index[v]:
                component = set()
                while True:
                    w = stack.pop()
                    on_stack.discard(w)
                    component.add(w)
                    if w == v:
                        break
                if len(component) > 1:
                    found.append(frozenset(component))
    return found


def describe(component: frozenset[str], graph: dict[str, set[str]]) -> str:
    return "; ".join(f"{m} -> {', '.join(sorted(graph[m] & component))}" for m in sorted(component))


def _graph_of(root: Path, packages: tuple[str, ...]) -> dict[str, set[str]]:
    modules = {
        module_name(f, root): f for pkg in packages for f in sorted((root / pkg).rglob("*.py"))
    }
    return import_graph(modules)


def test_the_packages_have_no_import_cycle() -> None:
    assert {"proxy", "rules", "audit", "erasure"} <= set(PACKAGES)
    graph = _graph_of(ROOT, PACKAGES)
    assert len(graph) > 50
    found = cycles(graph)
    new = [describe(c, graph) for c in found if c not in KNOWN]
    assert not new, "import cycles: " + " | ".join(new)
    gone = [sorted(c) for c in KNOWN if c not in found]
    assert not gone, f"cycles listed in KNOWN no longer exist, remove them: {gone}"


# the rooms at the edge: the command line and the demo are entry points, never a dependency
# (only the command line starts the demo; tests and bench reach the demo's PostgreSQL and
# billing data from outside these packages)
ROOMS = {"proxy.cli": ("proxy.cli",), "proxy.demo": ("proxy.cli", "proxy.demo")}


def _inside(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


@pytest.mark.parametrize("room", sorted(ROOMS))
def test_only_its_callers_import_a_room(room: str) -> None:
    graph = _graph_of(ROOT, PACKAGES)
    assert any(_inside(m, room) for m in graph), room
    bad = sorted(
        f"{m} -> {t}"
        for m, targets in graph.items()
        for t in targets
        if _inside(t, room) and not any(_inside(m, caller) for caller in ROOMS[room])
    )
    assert not bad, bad


@pytest.mark.parametrize(
    ("sources", "expected"),
    [
        # a deferred import inside a function is still an edge
        ({"a": "import b", "b": "def f():\n    from a import x\n"}, [{"a", "b"}]),
        (
            {"pkg/__init__": "", "pkg/a": "from pkg import b", "pkg/b": "from . import a"},
            [{"pkg.a", "pkg.b"}],
        ),
        ({"a": "import b", "b": "import c", "c": "import a", "d": "import a"}, [{"a", "b", "c"}]),
        ({"a": "import b", "b": "import c", "c": "import os"}, []),
        # a type-only import is not an import
        (
            {
                "a": "import b",
                "b": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import a\n",
            },
            [],
        ),
    ],
)
def test_the_cycle_finder_finds_planted_cycles(
    tmp_path: Path, sources: dict[str, str], expected: list[set[str]]
) -> None:
    """The check above can fail: the same walk finds a planted cycle (and only that)."""
    for name, text in sources.items():
        path = tmp_path / (name + ".py")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    modules = {module_name(p, tmp_path): p for p in sorted(tmp_path.rglob("*.py"))}
    graph = import_graph(modules)
    assert sorted(map(sorted, cycles(graph))) == sorted(map(sorted, expected))
