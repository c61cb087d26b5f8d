"""`pgveil demo`: its options, their checks (a usage error exits 2 before anything starts),
and the run of `proxy.demo.runner.Demo` on the event loop (a demo that cannot run prints
one line and exits 1).

Must not hold the demo itself: that is `proxy.demo`.
"""

from __future__ import annotations

import argparse
import sys

from proxy.cli.common import DSN_HELP, Subparsers, run_event_loop
from proxy.config import ConfigError


def add_arguments(sub: Subparsers) -> None:
    d = sub.add_parser("demo", help="try pgveil on a generated billing database (fake data)")
    d.add_argument("--scale", type=float, default=1.0, help="1 = 10,000 customers, 1M xDRs")
    d.add_argument(
        "--dsn",
        nargs="?",
        const="",
        metavar="DSN",
        help=f"use this database instead of a temporary PostgreSQL: {DSN_HELP}; --dsn "
        "alone: the PG* environment",
    )
    d.add_argument("--keep", action="store_true", help="keep what the demo created on exit")
    d.add_argument("--reuse", action="store_true", help="with --dsn: reuse a kept demo schema")
    d.add_argument("--listen", metavar="HOST:PORT", help="proxy address (127.0.0.1:6432)")
    d.add_argument("--metrics", metavar="HOST:PORT", help="metrics address (127.0.0.1:7432)")


def main(ns: argparse.Namespace) -> int:
    """User errors raise ConfigError (exit 2); a demo that cannot run prints one line and
    exits 1."""
    from proxy.demo.embedded_pg import EmbeddedPostgresError
    from proxy.demo.runner import (
        DEFAULT_LISTEN,
        DEFAULT_METRICS,
        Demo,
        DemoError,
        choose_address,
        parse_dsn,
    )

    if not 0 < ns.scale <= 100:
        raise ConfigError(
            "--scale: expected a number above 0 and at most 100 (1 = 10,000 customers)"
        )
    if ns.reuse and ns.dsn is None:
        raise ConfigError("--reuse needs --dsn: without it the demo starts a new PostgreSQL")
    if ns.dsn is not None:
        parse_dsn(ns.dsn)  # a malformed DSN is a usage error, before anything starts
    demo = Demo(
        scale=ns.scale,
        dsn=ns.dsn,
        keep=ns.keep,
        reuse=ns.reuse,
        listen=choose_address(ns.listen, DEFAULT_LISTEN, "--listen"),
        metrics=choose_address(ns.metrics, DEFAULT_METRICS, "--metrics"),
    )
    try:
        run_event_loop(demo.main())
    except (DemoError, EmbeddedPostgresError, ConfigError) as exc:
        sys.stderr.write(f"pgveil: error: {exc}\n")
        return 1
    return 0
