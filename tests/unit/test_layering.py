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
    ("demo_data.py", "<module>"): (frozenset({"struct"}), "the demo's WAV files, not messages"),
    ("demo_data.py", "wav_silence"): (frozenset({"pack"}), "a WAV header, not a message"),
    ("demo_data.py", "pdf_template"): (
        frozenset({"nul"}),
        "placeholders in the demo's PDF template, not a message",
    ),
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
