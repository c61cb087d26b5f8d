"""The build: the packages, with the data-path modules of shared/implementation.py compiled
by mypyc from their own (mypy --strict) source (issue 15; README "Performance").

`pip install -e '.[dev]'` and `pip install .` both compile them (mypy is a build
requirement: pyproject.toml); an editable install builds them in place, next to their
source. The build records each source's SHA-256 (shared/_compiled_sources.py) so that a
source edited after the build is a loud error at import, not a stale module
(shared/implementation.py). PGVEIL_PURE_PYTHON=1 at run time runs the Python source instead.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from mypyc.build import mypycify
from setuptools import setup

ROOT = Path(__file__).resolve().parent

# shared/implementation.py by path: nothing of the project is importable yet
_spec = importlib.util.spec_from_file_location(
    "_pgveil_implementation", ROOT / "shared" / "implementation.py"
)
assert _spec is not None and _spec.loader is not None
implementation = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(implementation)

sources = [implementation.source_path(m, ROOT) for m in implementation.COMPILED]
digests = {m: implementation.source_digest(m, ROOT) for m in implementation.COMPILED}
entries = "".join(f'    "{m}": "{d}",\n' for m, d in digests.items())
(ROOT / "shared" / "_compiled_sources.py").write_text(
    '"""Written by setup.py: the SHA-256 of each source mypyc compiled (see implementation)."""\n'
    f"\nSOURCES: dict[str, str] = {{\n{entries}}}\n"
)

setup(
    ext_modules=mypycify(
        [str(p.relative_to(ROOT)) for p in sources],
        group_name=implementation.GROUP,
        target_dir="build/mypyc",
    )
)
