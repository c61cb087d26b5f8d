"""What every `pgveil` subcommand module shares: the argument parser class whose errors are
one `pgveil: error: ...` line and exit status 2, the DSN help text, and the event loop
runner (uvloop where it exists).

Must not import a subcommand module (they import this one) or hold proxy logic.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from typing import Any, NoReturn, TypeAlias

EXIT_USAGE = 2

DSN_HELP = (
    "a libpq connection string or URI, completed from the PG* environment and the "
    "password file (~/.pgpass, PGPASSFILE) as psql does"
)


class Parser(argparse.ArgumentParser):
    """A user's mistake on the command line is one line and exit status 2, no usage dump."""

    def error(self, message: str) -> NoReturn:
        sys.stderr.write(f"pgveil: error: {message} (see '{self.prog} --help')\n")
        sys.exit(EXIT_USAGE)


# what `add_subparsers` returns: each subcommand module adds its parser to it
Subparsers: TypeAlias = "argparse._SubParsersAction[Parser]"


def run_event_loop(coro: Any) -> None:
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency on every POSIX platform
        asyncio.run(coro)
        return
    uvloop.run(coro)
