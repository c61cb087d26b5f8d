"""The erasure planner side is pure: a walk over the imports of the modules that must not
do I/O (the executor, worker, db and cli modules are the I/O side)."""

from __future__ import annotations

import ast
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
