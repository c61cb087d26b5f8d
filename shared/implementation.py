"""Which implementation of the data path runs: the modules mypyc compiled, or their Python
source (issue 15), and the switch between them.

`COMPILED` lists the mechanical hot path: framing and the wire codec, pairing answers with
statements, subject-key extraction, event assembly and encoding. The build (setup.py)
compiles these very files with mypyc; their Python source is the pure-Python
implementation, so there is no second one to keep in step. Policy and analysis (the rules
package but for shapes and subjects, the masked filter) are never compiled.

`PGVEIL_PURE_PYTHON=1` makes pgveil load the Python source even where compiled modules
exist: `install()`, which the packages proxy, rules and audit call before any of their
modules is imported, then puts a finder for these modules in front of the import system.
Without it, a compiled module whose source changed after it was built is a loud error at
import (the build records each source's SHA-256), never a stale module that runs silently.

`implementation()` says which one runs ("mypyc" or "python"): the proxy logs it at start-up
and exports it as the `implementation` label of `pgveil_build_info`.

This module imports nothing of proxy/, rules/, audit/ or erasure/ (it runs inside their
package imports) and must not: setup.py also loads it, before anything is installed.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import os
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import ModuleType
from typing import Final

PURE_ENV: Final = "PGVEIL_PURE_PYTHON"
MYPYC: Final = "mypyc"
PYTHON: Final = "python"

COMPILED: Final[tuple[str, ...]] = (
    "proxy.wire.messages",
    "proxy.wire.framing",
    "proxy.wire.rows",
    "proxy.wire.simple",
    "proxy.wire.extended",
    "proxy.wire.async_",
    "proxy.wire.errors",
    "proxy.session.actions",
    "proxy.session.reading",
    "proxy.session.statements",
    "proxy.session.filters",
    "proxy.session.engine",
    "audit.events",
    "audit.gate",
    "audit.writer",
    "rules.shapes",
    "rules.subjects",
)
"""The modules mypyc compiles (as one group: calls between them are native)."""

GROUP: Final = "shared._compiled"
"""The group's name: its shared library is shared/_compiled__mypyc.<ext>."""

SOURCES_MODULE: Final = "shared._compiled_sources"
"""Written by the build next to this module: the SHA-256 of each compiled source."""

ROOT: Final = Path(__file__).resolve().parents[1]


def source_path(module: str, root: Path = ROOT) -> Path:
    return root.joinpath(*module.split(".")).with_suffix(".py")


def source_digest(module: str, root: Path = ROOT) -> str:
    return hashlib.sha256(source_path(module, root).read_bytes()).hexdigest()


def pure_requested(environ: Mapping[str, str] = os.environ) -> bool:
    """Whether PGVEIL_PURE_PYTHON asks for the Python source (1), or not (0, empty, unset);
    any other value is an error, not a guess."""
    value = environ.get(PURE_ENV, "").strip()
    if value in ("", "0"):
        return False
    if value == "1":
        return True
    raise RuntimeError(f"pgveil: {PURE_ENV} must be 1 (pure Python) or 0, not {value!r}")


class _SourceFinder(importlib.abc.MetaPathFinder):
    """Finds the Python source of the compiled modules before the path finder would find
    their extension modules (which it prefers to a .py of the same name)."""

    def find_spec(
        self,
        fullname: str,
        path: Sequence[str] | None,
        target: ModuleType | None = None,
    ) -> importlib.machinery.ModuleSpec | None:
        if fullname not in COMPILED:
            return None
        leaf = fullname.rpartition(".")[2]
        for entry in path or ():
            source = Path(entry, f"{leaf}.py")
            if source.is_file():
                return importlib.util.spec_from_file_location(fullname, source)
        return None


_FINDER: Final = _SourceFinder()


def _compiled_file(module: str) -> Path | None:
    """The extension module built for `module` next to its source, if there is one."""
    source = source_path(module)
    for suffix in importlib.machinery.EXTENSION_SUFFIXES:
        candidate = source.with_suffix(suffix)
        if candidate.exists():
            return candidate
    return None


def _check_compiled() -> None:
    """Compiled modules, where present, must have been built from the sources as they are."""
    built = [m for m in COMPILED if _compiled_file(m) is not None]
    if not built:
        return
    try:
        recorded: dict[str, str] = importlib.import_module(SOURCES_MODULE).SOURCES
    except ImportError:
        recorded = {}
    stale = [m for m in built if recorded.get(m) != source_digest(m)]
    if stale:
        raise ImportError(
            f"pgveil: {', '.join(stale)} changed after mypyc compiled it: rebuild "
            f"(pip install -e .) or run the Python source ({PURE_ENV}=1)"
        )


def install() -> None:
    """Before the first import of a compiled module: with PGVEIL_PURE_PYTHON=1, load their
    Python source; otherwise check that compiled ones match their source. Idempotent."""
    if _installed:
        return
    if pure_requested():
        loaded = [m for m in COMPILED if m in sys.modules and _is_compiled(sys.modules[m])]
        if loaded:  # too late to switch: the process would run both
            raise RuntimeError(f"pgveil: {', '.join(loaded)} already imported compiled")
        sys.meta_path.insert(0, _FINDER)
    else:
        _check_compiled()
    _installed.append(True)


_installed: list[bool] = []  # (a list: no global statement) install() ran


def _is_compiled(module: ModuleType) -> bool:
    origin = getattr(module.__spec__, "origin", None) or ""
    return origin.endswith(tuple(importlib.machinery.EXTENSION_SUFFIXES))


def implementation() -> str:
    """ "mypyc" when the compiled modules run, "python" when their source does (imports
    them: a process runs one or the other, never a mix)."""
    kinds = {_is_compiled(importlib.import_module(m)) for m in COMPILED}
    if len(kinds) != 1:
        raise RuntimeError("pgveil: some data-path modules run compiled, others not")
    return MYPYC if kinds.pop() else PYTHON
