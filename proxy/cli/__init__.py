"""The `pgveil` command line: the top-level parser and the dispatch to the subcommand
modules beside this one (`proxy`, `rules`, `demo`, `audit`, `erase`), each of which defines
its own options and runs its command.

User errors (bad flags, bad config) print one line `pgveil: error: ...` and exit with
status 2, never a traceback. This package must not contain proxy logic.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence

from proxy import __version__
from proxy.cli import audit, demo, erase, rules
from proxy.cli import proxy as proxy_command
from proxy.cli.common import EXIT_USAGE, Parser, Subparsers
from proxy.config import ConfigError
from shared.user_files import problem_of

# in the order `pgveil --help` lists them
COMMANDS: dict[str, tuple[Callable[[Subparsers], None], Callable[[argparse.Namespace], int]]] = {
    "proxy": (proxy_command.add_arguments, proxy_command.main),
    "rules": (rules.add_arguments, rules.main),
    "demo": (demo.add_arguments, demo.main),
    "audit": (audit.add_arguments, audit.main),
    "erase": (erase.add_arguments, erase.main),
}


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="pgveil", description="Transparent PostgreSQL anonymizing proxy.")
    parser.add_argument("--version", action="version", version=f"pgveil {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)
    sub.required = True
    for add_arguments, _main in COMMANDS.values():
        add_arguments(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    ns = parser.parse_args(argv)
    try:
        return COMMANDS[ns.command][1](ns)
    except ConfigError as exc:
        sys.stderr.write(f"pgveil: error: {exc}\n")
        return EXIT_USAGE
    except OSError as exc:
        # e.g. the listen address is taken: a user error, not a crash (with the file's
        # name when it is about one)
        where = f"{exc.filename}: " if exc.filename else ""
        sys.stderr.write(f"pgveil: error: {where}{problem_of(exc)}\n")
        return EXIT_USAGE
    except KeyboardInterrupt:
        return 130
