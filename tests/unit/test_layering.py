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


# ---- the engine has no mode branches ----------------------------------------------------
# The session's filter (proxy/session/filters.py) is chosen once, in login_classified; the
# rest of the engine calls it and must not ask which one it is.
_FILTER_CLASSES = {"MaskedFilter", "RecordingFilter", "StatementFilter", "Masking", "Recording"}
_MODE_ATTRIBUTES = {"masked", "recorder", "recorded"} | _FILTER_CLASSES
_CHOOSES = "login_classified"


def _mode_branches(source: str) -> list[str]:
    """Where `source` (the engine) names a filter class or a mode attribute outside the
    method that chooses the filter (import lines aside: they are checked on their own)."""
    found: list[str] = []

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and node.name == _CHOOSES:
            return
        if isinstance(node, ast.Name) and node.id in _FILTER_CLASSES:
            found.append(f"line {node.lineno}: {node.id}")
        elif isinstance(node, ast.Attribute) and node.attr in _MODE_ATTRIBUTES:
            found.append(f"line {node.lineno}: .{node.attr}")
        elif isinstance(node, ast.ImportFrom):
            statement_filters = {"MaskedFilter", "RecordingFilter", "StatementFilter"}
            found.extend(
                f"line {node.lineno}: imports {a.name}"
                for a in node.names
                if a.name in statement_filters
            )
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(ast.parse(source))
    return found


def test_the_engine_has_no_mode_branches() -> None:
    found = _mode_branches((ROOT / "proxy/session/engine.py").read_text())
    assert not found, f"proxy/session/engine.py branches on the session's mode: {found}"


def test_the_mode_branch_check_finds_a_branch() -> None:
    """The check above can fail: the shapes the engine had before its filters."""
    branchy = (
        "class Session:\n"
        "    def login_classified(self, masked):\n"
        "        self.filter = Masking(masked)\n"  # allowed: this is where it is chosen
        "    def server_data(self, data):\n"
        "        if self.masked is not None:\n"
        "            return self._masked_server_data(data)\n"
        "        if isinstance(self.filter, Recording):\n"
        "            return self.filter.recorder.server(data)\n"
    )
    assert _mode_branches(branchy) == ["line 5: .masked", "line 7: Recording", "line 8: .recorder"]
    assert _mode_branches("from proxy.session.masked import MaskedFilter\n") == [
        "line 1: imports MaskedFilter"
    ]
    assert _mode_branches(branchy.split("    def server_data")[0]) == []


# ---- audit/ touches no client connection ------------------------------------------------
# Only the sinks do I/O in audit/ (the writer drives them); which client bytes wait for an
# event is the gate's decision (audit/gate.py), carried out by the shell.
_CONNECTION_NAMES = {
    "Transport", "BaseTransport", "WriteTransport", "ReadTransport", "StreamWriter",
    "StreamReader", "transport", "transports", "pause_reading", "resume_reading", "abort",
    "is_closing", "get_extra_info", "write_eof", "sock_sendall", "open_connection",
}  # fmt: skip
_SINKS = "audit/sinks.py"


def _connection_io(source: str) -> list[str]:
    """Where `source` names a connection, a transport or what is done to one."""
    found: list[tuple[int, str]] = []
    for node in ast.walk(ast.parse(source)):
        name = None
        if isinstance(node, ast.Attribute):
            name = node.attr
        elif isinstance(node, ast.Name):
            name = node.id
        elif isinstance(node, ast.alias):
            name = node.name.rsplit(".", 1)[-1]
        elif isinstance(node, ast.arg):
            name = node.arg
        if name in _CONNECTION_NAMES:
            found.append((getattr(node, "lineno", 0), name))
    return [f"line {line}: {name}" for line, name in sorted(set(found))]


def test_audit_touches_no_client_connection() -> None:
    files = sorted((ROOT / "audit").rglob("*.py"))
    assert any(f.name == "writer.py" for f in files) and any(f.name == "gate.py" for f in files)
    for f in files:
        if f.relative_to(ROOT).as_posix() == _SINKS:
            continue
        found = _connection_io(f.read_text())
        assert not found, f"{f.relative_to(ROOT)} touches a connection: {found}"


def test_the_connection_check_finds_client_io() -> None:
    """The check above can fail: the shapes audit/writer.py had before the gate."""
    before = (
        "import asyncio\n"
        "def release(held: list[tuple[asyncio.Transport, bytes]]) -> None:\n"
        "    for transport, data in held:\n"
        "        if not transport.is_closing():\n"
        "            transport.write(data)\n"
        "def expire(t, upstream):\n"
        "    upstream.pause_reading()\n"
        "    t.abort()\n"
    )
    assert _connection_io(before) == [
        "line 2: Transport",
        "line 3: transport",
        "line 4: is_closing",
        "line 4: transport",
        "line 5: transport",
        "line 7: pause_reading",
        "line 8: abort",
    ]


def test_the_audit_gate_is_sans_io() -> None:
    bad = _imports(ROOT / "audit/gate.py") & (FORBIDDEN | {"time", "logging", "proxy"})
    assert not bad, f"audit/gate.py imports {sorted(bad)}"


# --- protocol messages are read and built in proxy/wire only --------------------------------
#
# Outside proxy/wire nothing takes a message body apart or puts one together: no `struct`, no
# int.from_bytes/to_bytes, no .pack/.unpack calls, no NUL byte (the terminator of every
# string in the protocol: splitting at it or appending it is parsing or building), no slicing
# of a variable named `body` (what the code calls a message body). Regular expressions are
# not messages: constants passed to re.compile are not looked at.

MESSAGE_CODE_FREE = ["proxy", "audit"]  # proxy/wire apart
_STRUCT_CALLS = frozenset(("pack", "pack_into", "unpack", "unpack_from", "iter_unpack"))

# (file name, function) -> the rules it may break, and why that is not protocol code. Keyed by
# file name rather than path so that a module moving between packages keeps its entry; an
# entry no file uses any more fails the test (the list stays exact).
ALLOWED: dict[tuple[str, str], tuple[frozenset[str], str]] = {
    ("anchors.py", "<module>"): (
        frozenset({"nul"}),
        "a MAC's domain-separation string for audit checkpoints",
    ),
    ("events.py", "Chain.link_line"): (
        frozenset({"body"}),
        "`body` is an audit event's canonical JSON line, not a message",
    ),
    ("statements.py", "_decode_keys"): (
        frozenset({"nul"}),
        "joins subject-key values (no text value holds NUL) to decode them in one call",
    ),
}


def message_code(source: str) -> list[tuple[str, str, int]]:
    """(function, rule, line) for each place in `source` that reads or builds a message."""
    found: list[tuple[str, str, int]] = []

    class Visitor(ast.NodeVisitor):
        def __init__(self) -> None:
            self.scope: list[str] = []

        def _note(self, rule: str, node: ast.AST) -> None:
            found.append((".".join(self.scope) or "<module>", rule, getattr(node, "lineno", 0)))

        def _scoped(self, node: ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef) -> None:
            self.scope.append(node.name)
            self.generic_visit(node)
            self.scope.pop()

        visit_FunctionDef = visit_AsyncFunctionDef = visit_ClassDef = _scoped

        def visit_Import(self, node: ast.Import) -> None:
            if any(a.name.split(".")[0] == "struct" for a in node.names):
                self._note("struct", node)

        def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
            if node.module and node.module.split(".")[0] == "struct":
                self._note("struct", node)

        def visit_Call(self, node: ast.Call) -> None:
            func = node.func
            if isinstance(func, ast.Attribute):
                if func.attr in ("from_bytes", "to_bytes"):
                    self._note("int bytes", node)
                elif func.attr in _STRUCT_CALLS:
                    self._note("pack", node)
                elif (
                    func.attr == "compile"
                    and isinstance(func.value, ast.Name)
                    and func.value.id == "re"
                ):
                    self.visit(func)
                    for kw in node.keywords:
                        self.visit(kw)
                    return  # a pattern, not a message
            self.generic_visit(node)

        def visit_Constant(self, node: ast.Constant) -> None:
            if isinstance(node.value, bytes | str) and (
                b"\0" in node.value if isinstance(node.value, bytes) else "\0" in node.value
            ):
                self._note("nul", node)

        def visit_Subscript(self, node: ast.Subscript) -> None:
            if isinstance(node.value, ast.Name) and node.value.id == "body":
                self._note("body", node)
            self.generic_visit(node)

    Visitor().visit(ast.parse(source))
    return found


def _checked_files() -> list[Path]:
    files = []
    for pkg in MESSAGE_CODE_FREE:
        for f in sorted((ROOT / pkg).rglob("*.py")):
            if (ROOT / "proxy/wire") not in f.parents:
                files.append(f)
    return files


def test_no_message_is_read_or_built_outside_proxy_wire() -> None:
    files = _checked_files()
    assert any(f.name == "statements.py" for f in files)
    bad = []
    used: set[tuple[str, str]] = set()
    for f in files:
        for function, rule, line in message_code(f.read_text()):
            allowed = ALLOWED.get((f.name, function))
            if allowed is not None and rule in allowed[0]:
                used.add((f.name, function))
                continue
            bad.append(f"{f.relative_to(ROOT)}:{line} ({function}): {rule}")
    assert not bad, "message parsing or building outside proxy/wire:\n" + "\n".join(bad)
    assert used == set(ALLOWED), f"allow-list entries nothing needs: {set(ALLOWED) - used}"


@pytest.mark.parametrize(
    ("snippet", "rule"),
    [
        ("import struct", "struct"),
        ("from struct import unpack_from", "struct"),
        ("def f(b):\n    return int.from_bytes(b[:4], 'big')", "int bytes"),
        ("def f(b):\n    return _I32.unpack_from(b, 0)", "pack"),
        ("def f(s):\n    return _HEADER.pack(1, 4)", "pack"),
        ("def f(b):\n    return b.index(b'\\0')", "nul"),
        ("def f(b):\n    return b.partition(b'\\x00')", "nul"),
        ("def f(x):\n    return f'{x}\\0'.encode()", "nul"),
        ("def f(body):\n    return body[1:-1]", "body"),
        ("class C:\n    def f(self, body):\n        return body[0]", "body"),
    ],
)
def test_the_message_check_finds_each_kind_of_parsing(snippet: str, rule: str) -> None:
    assert rule in {r for _function, r, _line in message_code(snippet)}


def test_the_message_check_passes_patterns_and_plain_code() -> None:
    source = "import re\nX = re.compile(rb'[\\x00-\\x7f]')\ndef f(data):\n    return data[5:]\n"
    assert message_code(source) == []
