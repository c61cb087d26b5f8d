"""The sans-I/O layers stay sans-I/O: a walk over their imports, not a convention.

proxy/wire and proxy/session import no I/O and not the shell; rules/ imports no I/O, neither
itself nor through anything it imports (the session engine consults it); the audit's
redaction, which rules/ imports, imports neither rules nor proxy.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
FORBIDDEN = {"asyncio", "socket", "asyncpg", "ssl", "selectors", "uvloop", "psycopg", "subprocess"}
SANS_IO = ["proxy/wire", "proxy/session"]


def _imports(path: Path) -> set[str]:
    return _imports_of(path.read_text())


def _imports_of(source: str) -> set[str]:
    """The top-level packages `source` imports (anywhere in it, not only at the top), and
    the modules of the shell (proxy.*, not wire or session) it imports by name."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(source)):
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


def test_rules_imports_no_io() -> None:
    files = sorted((ROOT / "rules").rglob("*.py"))
    assert len(files) > 10
    for f in files:
        bad = _imports(f) & FORBIDDEN
        assert not bad, f"{f.relative_to(ROOT)} imports {sorted(bad)}"


def _loaded_by(modules: list[str]) -> list[str]:
    """The I/O modules a fresh interpreter has loaded once it imported `modules`."""
    code = (
        "import importlib, sys\n"
        f"for name in {modules!r}:\n"
        "    importlib.import_module(name)\n"
        f"print(' '.join(sorted(m for m in sys.modules if m.split('.')[0] in {FORBIDDEN!r})))"
    )
    r = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert r.returncode == 0, r.stderr
    return r.stdout.split()


def test_rules_loads_no_io_through_what_it_imports() -> None:
    files = sorted((ROOT / "rules").rglob("*.py"))
    modules = [".".join(f.relative_to(ROOT).with_suffix("").parts) for f in files]
    modules = [m.removesuffix(".__init__") for m in modules]
    assert len(modules) > 10
    assert _loaded_by(modules) == []


def test_the_load_check_sees_io_loaded_through_an_import() -> None:
    # audit.writer runs the writer task: importing it loads asyncio
    assert "asyncio" in _loaded_by(["audit.writer"])


def test_the_audit_redaction_imports_neither_rules_nor_proxy() -> None:
    names = _imports(ROOT / "audit/redaction.py")
    bad = names & ({"rules", "proxy"} | FORBIDDEN)
    assert not bad, f"audit/redaction.py imports {sorted(bad)}"


@pytest.mark.parametrize(
    "source",
    [
        "import asyncio",
        "import json, socket as s",
        "from ssl import SSLContext",
        "from asyncpg.pool import Pool",
        "from psycopg import sql",
        "def f() -> None:\n    import subprocess\n",
        "if TYPE_CHECKING:\n    import uvloop\n",
    ],
)
def test_the_import_walk_sees_every_form_of_an_io_import(source: str) -> None:
    assert _imports_of(source) & FORBIDDEN


def test_the_import_walk_matches_whole_package_names() -> None:
    assert not _imports_of("import asyncio_extras\nfrom sockets import x") & FORBIDDEN


def test_wire_does_not_import_session() -> None:
    for f in (ROOT / "proxy/wire").rglob("*.py"):
        assert "proxy.session" not in f.read_text(), f


def test_every_module_has_a_docstring() -> None:
    for pkg in ("proxy", "rules", "audit", "erasure"):
        for f in (ROOT / pkg).rglob("*.py"):
            tree = ast.parse(f.read_text())
            assert ast.get_docstring(tree), f"{f.relative_to(ROOT)} has no module docstring"
