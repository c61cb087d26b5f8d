"""tests/tmpdir_guard.py fails a pytest run that leaves something in the temporary directory
(and names it), passes a run that leaves nothing, and leaves no directory of its own."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

LEAKS = """
import tempfile

def test_leaves_a_file():
    tempfile.mkstemp(prefix="pgveil-leaked-")
"""

CLEAN = """
import tempfile

def test_removes_what_it_made(tmp_path):
    with tempfile.TemporaryDirectory(prefix="pgveil-cleaned-"):
        pass
    (tmp_path / "kept-by-pytest").write_text("pytest's own directories are not checked")
"""


def run(tmp_path: Path, source: str) -> subprocess.CompletedProcess[str]:
    (tmp_path / "test_case.py").write_text(source)
    (tmp_path / "pytest.ini").write_text("[pytest]\n")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "tests.tmpdir_guard", "-p", "no:cacheprovider",
         "-q", "test_case.py"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip


def own_directories() -> set[str]:
    return {p.name for p in Path(tempfile.gettempdir()).glob("pgveil-tests-*")}


def test_a_run_that_leaves_a_file_fails_and_names_it(tmp_path: Path) -> None:
    before = own_directories()
    r = run(tmp_path, LEAKS)
    assert r.returncode == 1, r.stdout + r.stderr
    assert "1 passed" in r.stdout
    assert "left 1 entries in the temporary directory: pgveil-leaked-" in r.stdout, r.stdout
    assert own_directories() == before


def test_a_run_that_leaves_nothing_passes(tmp_path: Path) -> None:
    before = own_directories()
    r = run(tmp_path, CLEAN)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "temporary directory" not in r.stdout
    assert own_directories() == before
