"""The erasure planner side is pure: a walk over the imports of the modules that must not
do I/O (the executor, worker, db and cli modules are the I/O side)."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[3]
PURE = ["model", "loader", "catalog", "planner"]
IO = {"asyncio", "asyncpg", "socket", "subprocess", "psycopg", "ssl", "uvloop", "proxy"}


@pytest.mark.parametrize("module", PURE)
def test_pure_modules_import_no_io(module: str) -> None:
    tree = ast.parse((ROOT / "erasure" / f"{module}.py").read_text())
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module.split(".")[0])
            if node.module.startswith("erasure."):
                assert node.module.split(".")[1] in PURE, f"{module} imports {node.module}"
    assert not names & IO, f"erasure/{module}.py imports {sorted(names & IO)}"


SQL_WORDS = re.compile(r"\b(SELECT|INSERT|UPDATE|DELETE|WITH|CREATE)\b")


def _code_strings(path: Path) -> list[str]:
    """The string constants of a module, its docstrings left out."""
    tree = ast.parse(path.read_text())
    docstrings = {
        id(node.body[0].value)
        for node in ast.walk(tree)
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef)
        and node.body
        and isinstance(node.body[0], ast.Expr)
        and isinstance(node.body[0].value, ast.Constant)
    }
    return [
        node.value
        for node in ast.walk(tree)
        if isinstance(node, ast.Constant) and isinstance(node.value, str)
        if id(node) not in docstrings
    ]


def test_the_executor_builds_no_sql() -> None:
    """The executor runs what the planner built: no SQL text of its own (a statement
    written there would escape the planner's tests and its quoting)."""
    strings = _code_strings(ROOT / "erasure" / "executor.py")
    # (a command tag, "DELETE 0", is what a statement answered)
    found = [s for s in strings if SQL_WORDS.search(s) and not re.fullmatch(r"[A-Z]+ \d+", s)]
    assert not found, found
    assert any(SQL_WORDS.search(s) for s in _code_strings(ROOT / "erasure" / "planner.py"))
