"""The sans-I/O layers stay sans-I/O: a walk over their imports, not a convention."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
FORBIDDEN = {"asyncio", "socket", "asyncpg", "ssl", "selectors", "uvloop", "psycopg", "subprocess"}
SANS_IO = ["proxy/wire", "proxy/session"]


def _imports(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
            if node.module.startswith("proxy.") and not node.module.startswith(
                ("proxy.wire", "proxy.session")
            ):
                names.add(node.module)  # the shell must not be imported from below
    return names


@pytest.mark.parametrize("package", SANS_IO)
def test_sans_io_packages_import_no_io(package: str) -> None:
    files = sorted((ROOT / package).rglob("*.py"))
    assert files
    for f in files:
        bad = {
            n for n in _imports(f) if n in FORBIDDEN or (n.startswith("proxy.") and n != "proxy")
        }
        assert not bad, f"{f.relative_to(ROOT)} imports {sorted(bad)}"


def test_wire_does_not_import_session() -> None:
    for f in (ROOT / "proxy/wire").rglob("*.py"):
        assert "proxy.session" not in f.read_text(), f


def test_every_module_has_a_docstring() -> None:
    for pkg in ("proxy", "rules", "audit", "erasure"):
        for f in (ROOT / pkg).rglob("*.py"):
            tree = ast.parse(f.read_text())
            assert ast.get_docstring(tree), f"{f.relative_to(ROOT)} has no module docstring"
