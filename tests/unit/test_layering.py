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


def _packages_imported(path: Path) -> set[str]:
    """The top-level packages a module imports, at module level or inside a function."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


# what each package may not import: the erasure worker and the audit trail run without the
# proxy (their shared needs are in shared/), and shared/ is below all four
NOT_IMPORTED = {
    "erasure": {"proxy"},
    "audit": {"proxy", "erasure"},
    "shared": {"proxy", "rules", "audit", "erasure"},
}


@pytest.mark.parametrize("package", sorted(NOT_IMPORTED))
def test_packages_import_only_what_is_below_them(package: str) -> None:
    files = sorted((ROOT / package).rglob("*.py"))
    assert files
    for f in files:
        bad = _packages_imported(f) & NOT_IMPORTED[package]
        assert not bad, f"{f.relative_to(ROOT)} imports {sorted(bad)}"


def test_the_import_walk_sees_imports_inside_functions(tmp_path: Path) -> None:
    """A late import (`def main(): from proxy import logs`) counts as much as a top one."""
    f = tmp_path / "late.py"
    f.write_text("def main() -> None:\n    from proxy import logs\n    import proxy.dsn\n")
    assert _packages_imported(f) == {"proxy"}


def test_every_module_has_a_docstring() -> None:
    for pkg in ("proxy", "rules", "audit", "erasure", "shared"):
        for f in (ROOT / pkg).rglob("*.py"):
            tree = ast.parse(f.read_text())
            assert ast.get_docstring(tree), f"{f.relative_to(ROOT)} has no module docstring"
