"""A pytest plugin that fails a run which leaves anything in the temporary directory.

When the session starts, the test process and every process it starts (pgveil, PostgreSQL
and its tools, the demo) get a temporary directory of their own: `tempfile.tempdir` and
`TMPDIR` point into a fresh `pgveil-tests-*` directory. When the session ends (after the
session fixtures' teardown), anything still in it was left behind by a test, a fixture or
pgveil itself: the run fails, naming each entry, and the directory is removed. A directory
of the run's own makes the check exact while other runs share the machine's /tmp.

pytest's own `tmp_path` directories stay where they were (under the original temporary
directory, kept for the last runs as pytest does). This plugin must not remove anything
outside its own directory, and must not remove leftovers without naming them first.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest

_ENV = "TMPDIR"
_PYTEST_ROOT = "PYTEST_DEBUG_TEMPROOT"  # where pytest makes its tmp_path directories
_OWN = pytest.StashKey[Path]()
_SHOWN = 30  # entries named in the failure; the count says how many more


def leftovers(directory: Path) -> list[str]:
    """The names in `directory`, sorted (each one something a run left behind)."""
    return sorted(entry.name for entry in directory.iterdir())


def pytest_configure(config: pytest.Config) -> None:
    original = tempfile.gettempdir()
    own = Path(tempfile.mkdtemp(prefix="pgveil-tests-", dir=original))
    os.chmod(own, 0o711)  # PostgreSQL runs as `postgres` and needs to reach its directory
    os.environ.setdefault(_PYTEST_ROOT, original)
    os.environ[_ENV] = str(own)
    tempfile.tempdir = str(own)
    config.stash[_OWN] = own


@pytest.hookimpl(trylast=True)  # after the session fixtures' teardown (runner's hook)
def pytest_sessionfinish(session: pytest.Session) -> None:
    own = session.config.stash.get(_OWN, None)
    if own is None or not own.exists():
        return
    left = leftovers(own)
    shutil.rmtree(own, ignore_errors=True)
    if not left:
        return
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    named = ", ".join(left[:_SHOWN]) + (f" and {len(left) - _SHOWN} more" if left[_SHOWN:] else "")
    message = f"the run left {len(left)} entries in the temporary directory: {named}"
    if reporter is not None:
        reporter.write_line(message, red=True, bold=True)
    else:
        print(message)
    if session.exitstatus == pytest.ExitCode.OK:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
