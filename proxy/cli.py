"""The `pgveil` command line: argument parsing and dispatch to the subcommands.

User errors (bad flags, bad config) print one line `pgveil: error: ...` and exit with
status 2, never a traceback. This module must not contain proxy logic.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

from proxy import __version__
from proxy.config import SETTINGS, ConfigError, ProxyConfig, load_config
from rules.loader import RulesError, load_rules
from rules.model import Policy

EXIT_USAGE = 2


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        sys.stderr.write(f"pgveil: error: {message} (see '{self.prog} --help')\n")
        sys.exit(EXIT_USAGE)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="pgveil", description="Transparent PostgreSQL anonymizing proxy.")
    parser.add_argument("--version", action="version", version=f"pgveil {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True
    p = sub.add_parser("proxy", help="run the proxy")
    p.add_argument("--config", type=Path, metavar="FILE", help="YAML config file")
    p.add_argument(
        "--check-config",
        action="store_true",
        help="validate the configuration, connect to the upstream, check the rules against "
        "the databases they are for, and exit",
    )
    for s in SETTINGS:
        # every setting is a string here; config.load_config parses and validates it, so
        # the same rules apply to flags, environment and file
        p.add_argument(s.flag, dest=s.name, metavar=s.name.upper(), help=s.help, default=None)
    r = sub.add_parser("rules", help="check, draft or describe masking rules")
    rsub = r.add_subparsers(dest="rules_command", metavar="ACTION", parser_class=_Parser)
    rsub.required = True
    rc = rsub.add_parser("check", help="validate a rules file, and against a database with --dsn")
    rc.add_argument("--rules", type=Path, required=True, metavar="FILE")
    rc.add_argument(
        "--dsn",
        nargs="?",
        const="",
        metavar="DSN",
        help=f"check against this database: {_DSN_HELP}; --dsn alone: the PG* environment",
    )
    rs = rsub.add_parser("suggest", help="print a draft rules file from the database")
    rs.add_argument("--dsn", default="", metavar="DSN", help=f"{_DSN_HELP} (default: PG*)")
    rs.add_argument(
        "--subject-table",
        action="append",
        metavar="SCHEMA.TABLE",
        help="the table whose rows are the data subjects (repeatable; default: a table "
        "named like customers, clients, users, ... that others reference)",
    )
    rsub.add_parser("schema", help="print the JSON Schema of the rules format")
    d = sub.add_parser("demo", help="try pgveil on a generated billing database (fake data)")
    d.add_argument("--scale", type=float, default=1.0, help="1 = 10,000 customers, 1M xDRs")
    d.add_argument(
        "--dsn",
        nargs="?",
        const="",
        metavar="DSN",
        help=f"use this database instead of a temporary PostgreSQL: {_DSN_HELP}; --dsn "
        "alone: the PG* environment",
    )
    d.add_argument("--keep", action="store_true", help="keep what the demo created on exit")
    d.add_argument("--reuse", action="store_true", help="with --dsn: reuse a kept demo schema")
    d.add_argument("--listen", metavar="HOST:PORT", help="proxy address (127.0.0.1:6432)")
    d.add_argument("--metrics", metavar="HOST:PORT", help="metrics address (127.0.0.1:9187)")
    a = sub.add_parser("audit", help="read and verify audit files")
    asub = a.add_subparsers(dest="audit_command", metavar="ACTION", parser_class=_Parser)
    asub.required = True
    av = asub.add_parser(
        "verify",
        help="check that audit files (in any order) or the table sink's chains are complete "
        "and unchanged; exit 0 intact, 1 broken, 2 usage error, 3 unproven",
    )
    av.add_argument("files", type=Path, nargs="*", metavar="FILE")
    av.add_argument(
        "--key",
        action="append",
        metavar="REF",
        help="the audit key, env:NAME or file:PATH (repeat for older keys; default: the "
        "reference in $PGVEIL_AUDIT_KEY)",
    )
    av.add_argument(
        "--anchor",
        action="append",
        type=Path,
        metavar="FILE",
        help="checkpoints kept outside the chain: the anchor file (a copy shipped elsewhere), "
        "or any JSON-lines file holding them (repeatable)",
    )
    av.add_argument(
        "--after",
        metavar="HASH",
        help="the hash the first event follows, when older files were removed on purpose",
    )
    av.add_argument("--chain", metavar="NAME", help="with --dsn: only this chain")
    _table_source(av, from_env=False)
    aw = asub.add_parser("who", help="who accessed one data subject's personal data, and when")
    aw.add_argument("--table", required=True, metavar="SCHEMA.TABLE", help="protected table")
    aw.add_argument("--subject", required=True, metavar="KEY", help="its subject column's value")
    aw.add_argument("--since", metavar="TIME", help="ISO date or time (UTC unless it says)")
    aw.add_argument("--until", metavar="TIME", help="ISO date or time, exclusive")
    aw.add_argument("--json", action="store_true", help="JSON instead of a table")
    aw.add_argument("--file", type=Path, action="append", metavar="FILE", help="audit file")
    _table_source(aw)
    at = asub.add_parser("tail", help="print events as lines")
    at.add_argument("file", type=Path, metavar="FILE")
    at.add_argument("--follow", action="store_true")
    at.add_argument("--role")
    at.add_argument("--table")
    from erasure.cli import add_arguments as add_erase_arguments

    e = sub.add_parser("erase", help="erase the personal data of terminated customers")
    add_erase_arguments(e, _Parser)
    return parser


_DSN_HELP = (
    "a libpq connection string or URI, completed from the PG* environment and the "
    "password file (~/.pgpass, PGPASSFILE) as psql does"
)


def _table_source(p: argparse.ArgumentParser, from_env: bool = True) -> None:
    p.add_argument(
        "--dsn",
        nargs="?",
        const="",
        metavar="DSN",
        default=os.environ.get("PGVEIL_AUDIT_TABLE_DSN") if from_env else None,
        help="read the table sink in this database, "
        + _DSN_HELP
        + "; --dsn alone: the PG* environment (default"
        + (": " if from_env else " without FILEs: ")
        + "$PGVEIL_AUDIT_TABLE_DSN"
        + ("" if from_env else "; with FILEs, its checkpoints anchor them")
        + ")",
    )
    p.add_argument(
        "--audit-table", default="pgveil.audit_events", metavar="SCHEMA.TABLE", help="its table"
    )


def _flags(ns: argparse.Namespace) -> dict[str, Any]:
    return {s.name: getattr(ns, s.name) for s in SETTINGS if getattr(ns, s.name) is not None}


def _run_proxy(ns: argparse.Namespace) -> int:
    from proxy.server import ProxyServer, serve
    from shared import logs
    from shared.logs import log

    flags = _flags(ns)

    def load() -> ProxyConfig:
        return load_config(flags, config_file=ns.config)

    def load_policy(cfg: ProxyConfig) -> Policy | None:
        return load_rules(cfg.rules) if cfg.rules is not None else None

    config = load()
    logs.configure(config.log_format, config.log_level)
    try:
        policy = load_policy(config)
    except RulesError as exc:
        raise ConfigError(str(exc)) from exc
    if policy is not None:
        log.info("rules.loaded", version=policy.version, tables=len(policy.tables))
    if ns.check_config:

        async def check() -> int:
            server = ProxyServer(config)
            ok = await server.upstream_reachable()
            state = "reachable" if ok else "UNREACHABLE"
            if not ok or policy is None:
                print(f"configuration ok; upstream {config.upstream} {state}")
                return 0 if ok else 1
            return await _check_rules(config, policy)

        return asyncio.run(check())
    _event_loop_run(serve(config, load, load_policy))
    return 0


async def _check_rules(config: ProxyConfig, policy: Policy) -> int:
    """`--check-config` with rules: the rules checked against the databases they are for
    (see `proxy.catalog.check_rules`); one line per problem, exit 1 on any error."""
    from proxy.catalog import MaskingUnavailable, check_rules

    try:
        databases, found = await check_rules(config, policy)
    except MaskingUnavailable as exc:
        cause = f": {exc.__cause__}" if exc.__cause__ is not None else ""
        text = f"{exc}{cause}".removeprefix("pgveil ").replace("\n", " ")
        raise ConfigError(text) from exc
    for database, p in found:
        where = "" if p.path.startswith("roles.") else f"database {database}: "
        print(f"{p.level}: {where}{p}")
    errors = sum(1 for _, p in found if p.level == "error")
    warnings = len(found) - errors
    if errors:
        print(
            f"rules: {errors} error(s), {warnings} warning(s); pgveil refuses what they close "
            "(see the README, 'Rules checked against the database') until they are fixed"
        )
        return 1
    checked = ", ".join(databases) if databases else "none"
    print(
        f"configuration ok; upstream {config.upstream} reachable; rules checked against "
        f"database(s) {checked}: {warnings} warning(s)"
    )
    return 0


def _event_loop_run(coro: Any) -> None:
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency on every POSIX platform
        asyncio.run(coro)
        return
    uvloop.run(coro)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    ns = parser.parse_args(argv)
    try:
        if ns.command == "proxy":
            return _run_proxy(ns)
        if ns.command == "demo":
            from proxy import demo

            return demo.run(ns.scale, ns.dsn, ns.keep, ns.reuse, ns.listen, ns.metrics)
        if ns.command == "audit":
            from proxy import audit_cli

            return audit_cli.run(ns)
        if ns.command == "erase":
            from erasure.cli import main as erase_main

            return erase_main(ns)
        if ns.command == "rules":
            from proxy.rules_cli import run

            return run(
                ns.rules_command,
                getattr(ns, "rules", None),
                getattr(ns, "dsn", None),
                getattr(ns, "subject_table", None),
            )
    except ConfigError as exc:
        sys.stderr.write(f"pgveil: error: {exc}\n")
        return EXIT_USAGE
    except OSError as exc:
        # e.g. the listen address is taken: a user error, not a crash
        sys.stderr.write(f"pgveil: error: {exc.strerror or exc}\n")
        return EXIT_USAGE
    except KeyboardInterrupt:
        return 130
    parser.error(f"unknown command {ns.command}")


if __name__ == "__main__":
    sys.exit(main())
