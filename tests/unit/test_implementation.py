"""The two implementations of the data path (issue 15; shared/implementation.py): the build
compiles the listed modules with mypyc, PGVEIL_PURE_PYTHON=1 runs their Python source
instead, a compiled module older than its source is refused, and the compiled modules'
source keeps to what mypyc compiles to the same behaviour.

Each case runs in a fresh interpreter (an import decides it once per process), with
PGVEIL_PURE_PYTHON set as the case needs whatever the suite itself runs under.
"""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from shared.implementation import COMPILED, PURE_ENV, implementation, pure_requested, source_path

ROOT = Path(__file__).resolve().parents[2]

_REPORT = (
    "import importlib, json\n"
    "from shared.implementation import COMPILED, implementation\n"
    "files = {m: importlib.import_module(m).__file__ for m in COMPILED}\n"
    "print(json.dumps({'implementation': implementation(), 'files': files}))\n"
)


def _python(code: str, pure: str | None) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != PURE_ENV}
    if pure is not None:
        env[PURE_ENV] = pure
    return subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True
    )


def test_the_build_compiled_every_listed_module() -> None:
    """What the README's set-up commands build: every listed module is an extension module
    (mypyc's), and implementation() says so."""
    done = _python(_REPORT, None)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["implementation"] == "mypyc"
    assert sorted(report["files"]) == sorted(COMPILED)
    for module, file in report["files"].items():
        assert file.endswith(".so") and Path(file).parent == source_path(module).parent, module


@pytest.mark.parametrize("value", ["1", " 1 "])
def test_the_switch_loads_the_python_source(value: str) -> None:
    done = _python(_REPORT, value)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["implementation"] == "python"
    assert report["files"] == {m: str(source_path(m)) for m in COMPILED}


def test_zero_is_the_compiled_default() -> None:
    done = _python(_REPORT, "0")
    assert done.returncode == 0, done.stderr
    assert '"implementation": "mypyc"' in done.stdout


@pytest.mark.parametrize("value", ["yes", "true", "2", "pure"])
def test_any_other_switch_value_is_an_error(value: str) -> None:
    done = _python("import proxy", value)
    assert done.returncode != 0
    assert f"{PURE_ENV} must be 1 (pure Python) or 0, not {value!r}" in done.stderr


def test_a_compiled_module_older_than_its_source_is_refused() -> None:
    """A source edited after the build (here: the build's digests say another source) is a
    loud error at import, never a stale compiled module that runs silently; the switch
    still runs the source."""
    stale = (
        "import sys, types\n"
        "recorded = types.ModuleType('shared._compiled_sources')\n"
        "recorded.SOURCES = {}\n"
        "sys.modules['shared._compiled_sources'] = recorded\n"
        "import proxy.wire.framing\n"
    )
    done = _python(stale, None)
    assert done.returncode != 0
    assert "changed after mypyc compiled it: rebuild" in done.stderr
    assert "proxy.wire.framing" in done.stderr
    assert _python(stale, "1").returncode == 0


def test_this_process_runs_what_the_switch_says() -> None:
    """The suite itself: compiled, or under PGVEIL_PURE_PYTHON=1 (CI runs both) the
    source."""
    assert implementation() == ("python" if pure_requested() else "mypyc")


def _except_names(tree: ast.AST) -> list[str]:
    """Names bound by except clauses of different types in one function: compiled, such a
    name has the first clause's type, and a later clause's exception is a TypeError."""
    found = []
    for fn in ast.walk(tree):
        if isinstance(fn, ast.FunctionDef | ast.AsyncFunctionDef):
            types: dict[str, set[str]] = {}
            for node in ast.walk(fn):
                if isinstance(node, ast.ExceptHandler) and node.name and node.type:
                    types.setdefault(node.name, set()).add(ast.unparse(node.type))
            found += [
                f"{fn.name}: {name} {sorted(kinds)}"
                for name, kinds in types.items()
                if len(kinds) > 1
            ]
    return found


@pytest.mark.parametrize("module", COMPILED)
def test_compiled_sources_give_each_except_name_one_type(module: str) -> None:
    tree = ast.parse(source_path(module).read_text())
    assert _except_names(tree) == []


def _unset_defaults(tree: ast.AST) -> list[str]:
    """Class attributes whose default mypyc does not set (it leaves a None default of a
    union of two classes undefined: reading it is an AttributeError) unless `__init__`
    assigns them too."""
    found = []
    for cls in ast.walk(tree):
        if not isinstance(cls, ast.ClassDef):
            continue
        assigned = {
            target.attr
            for fn in cls.body
            if isinstance(fn, ast.FunctionDef) and fn.name == "__init__"
            for node in ast.walk(fn)
            if isinstance(node, ast.Assign)
            for target in node.targets
            if isinstance(target, ast.Attribute)
        }
        for node in cls.body:
            if (
                isinstance(node, ast.AnnAssign)
                and isinstance(node.target, ast.Name)
                and isinstance(node.value, ast.Constant)
                and node.value.value is None
                and ast.unparse(node.annotation).count("|") >= 2
                and node.target.id not in assigned
            ):
                found.append(f"{cls.name}.{node.target.id}")
    return found


@pytest.mark.parametrize("module", COMPILED)
def test_compiled_sources_set_the_defaults_mypyc_leaves_unset(module: str) -> None:
    assert _unset_defaults(ast.parse(source_path(module).read_text())) == []


def test_an_in_flight_entry_has_every_attribute() -> None:
    """The statement log's entries (compiled: a native class, made by compiled code; with
    serializable=True, mypyc's constructor called from Python skips __init__) define every
    attribute the class declares."""
    from proxy.session import statements

    tree = ast.parse(source_path("proxy.session.statements").read_text())
    [cls] = [n for n in ast.walk(tree) if isinstance(n, ast.ClassDef) and n.name == "_InFlight"]
    names = [n.target.id for n in cls.body if isinstance(n, ast.AnnAssign)]
    assert len(names) > 40 and "target" in names
    for name in names:
        getattr(statements._SYNC, name)


def test_the_guards_find_what_they_are_for() -> None:
    code = (
        "class C:\n"
        "    a: A | B | None = None\n"
        "    b: A | B | None = None\n"
        "    def __init__(self):\n"
        "        self.b = None\n"
    )
    assert _unset_defaults(ast.parse(code)) == ["C.a"]


def test_the_guard_finds_a_name_of_two_types() -> None:
    code = (
        "def f():\n"
        "    try:\n        pass\n"
        "    except KeyError as exc:\n        pass\n"
        "    except ValueError as exc:\n        pass\n"
    )
    assert _except_names(ast.parse(code)) == ["f: exc ['KeyError', 'ValueError']"]
