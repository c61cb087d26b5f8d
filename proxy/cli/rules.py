"""`pgveil rules check|suggest|schema`: the DBA's tools for the rules file.

Connects as libpq would (shared.dsn: a connection string or URI, the PG* environment, the
password file), reads the catalog, the tables' keys and small value samples through
asyncpg, and prints findings and drafts that name tables, columns, keys and value
categories, never a sampled value. Connection problems are one `pgveil: error:` line and
exit status 2.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from pathlib import Path
from typing import NamedTuple

import asyncpg

from proxy.cli.common import DSN_HELP, Parser, Subparsers
from rules.catalog import Catalog
from rules.catalog_read import read_catalog, read_keys, read_role_names
from rules.discovery import Keys, check, discover, suggest
from rules.loader import RulesError, RulesUnreadable, json_schema, load_rules
from rules.masks import family_of
from shared import dsn
from shared.quoting import quote_ident

SAMPLE_ROWS = 50
# what is sampled: to tell personal values by their look, and to check that a mask hides
# each of them (never printed)
SAMPLED = ("text", "int", "json", "inet", "cidr", "mac", "mac8")
APPLICATION_NAME = "pgveil-rules"


class Database(NamedTuple):
    name: str
    catalog: Catalog
    roles: frozenset[str]
    samples: dict[tuple[str, str, str], list[str]]
    keys: Keys


async def read(target: str) -> Database:
    conn = await dsn.connect(target, fallback_application_name=APPLICATION_NAME)
    try:
        catalog = await read_catalog(conn.fetch)
        roles = await read_role_names(conn.fetch)
        keys = await read_keys(conn.fetch)
        name = str(await conn.fetchval("SELECT pg_catalog.current_database()"))
        samples: dict[tuple[str, str, str], list[str]] = {}
        for (schema, table), rel in catalog.relations.items():
            if rel.kind not in ("r", "p", "m"):
                continue
            if any(p in catalog.relations for p in rel.parents):
                continue  # a partition or child: its parent's sample holds its rows
            for col in rel.columns:
                if family_of(col.type.name) not in SAMPLED:
                    continue
                column = quote_ident(col.name)
                sql = (
                    f"SELECT {column}::text FROM {quote_ident(schema)}.{quote_ident(table)} "
                    f"WHERE {column} IS NOT NULL LIMIT {SAMPLE_ROWS}"
                )
                try:
                    rows = await conn.fetch(sql)
                except asyncpg.PostgresError:
                    continue  # no privilege to sample: judged by name only
                samples[(schema, table, col.name)] = [r[0] for r in rows]
        return Database(name, catalog, roles, samples, keys)
    finally:
        await conn.close()


def _read(target: str) -> Database | None:
    """The database, or None after printing why it cannot be read."""
    try:
        return asyncio.run(read(target))
    except dsn.DsnError as exc:
        sys.stderr.write(f"pgveil: error: --dsn: {exc}\n")
    except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
        # ConnectError (an OSError) says which server, database and user, and why
        text = str(exc) if isinstance(exc, dsn.ConnectError) else type(exc).__name__
        sys.stderr.write(f"pgveil: error: cannot read the database: {text}\n")
    return None


def _tables(names: list[str] | None) -> list[tuple[str, str]] | None:
    if names is None:
        return None
    out = []
    for n in names:
        schema, dot, table = n.rpartition(".")
        if not dot or not schema or not table:
            raise ValueError(f"--subject-table {n}: expected SCHEMA.TABLE")
        out.append((schema, table))
    return out


def add_arguments(sub: Subparsers) -> None:
    r = sub.add_parser("rules", help="check, draft or describe masking rules")
    rsub = r.add_subparsers(dest="rules_command", metavar="ACTION", parser_class=Parser)
    rsub.required = True
    rc = rsub.add_parser("check", help="validate a rules file, and against a database with --dsn")
    rc.add_argument("--rules", type=Path, required=True, metavar="FILE")
    rc.add_argument(
        "--dsn",
        nargs="?",
        const="",
        metavar="DSN",
        help=f"check against this database: {DSN_HELP}; --dsn alone: the PG* environment",
    )
    rs = rsub.add_parser("suggest", help="print a draft rules file from the database")
    rs.add_argument("--dsn", default="", metavar="DSN", help=f"{DSN_HELP} (default: PG*)")
    rs.add_argument(
        "--subject-table",
        action="append",
        metavar="SCHEMA.TABLE",
        help="the table whose rows are the data subjects (repeatable; default: a table "
        "named like customers, clients, users, ... that others reference)",
    )
    rsub.add_parser("schema", help="print the JSON Schema of the rules format")


def main(ns: argparse.Namespace) -> int:
    return run(
        ns.rules_command,
        getattr(ns, "rules", None),
        getattr(ns, "dsn", None),
        getattr(ns, "subject_table", None),
    )


def run(
    command: str,
    rules: Path | None,
    target: str | None,
    subject_tables: list[str] | None = None,
) -> int:
    if command == "schema":
        print(json.dumps(json_schema(), indent=2))
        return 0
    if command == "suggest":
        try:
            subjects = _tables(subject_tables)
        except ValueError as exc:
            sys.stderr.write(f"pgveil: error: {exc}\n")
            return 2
        db = _read(target or "")
        if db is None:
            return 2
        if subjects is not None:
            unknown = [f"{s}.{t}" for s, t in subjects if (s, t) not in db.catalog.relations]
            if unknown:
                sys.stderr.write(
                    f"pgveil: error: --subject-table {unknown[0]}: no such table in database "
                    f"{db.name}\n"
                )
                return 2
        sys.stdout.write(suggest(db.catalog, db.samples, db.keys, subjects))
        return 0
    if rules is None:
        sys.stderr.write("pgveil: error: rules check needs --rules FILE\n")
        return 2
    try:
        policy = load_rules(rules)
    except RulesUnreadable as exc:  # the file, not the rules: a usage error
        sys.stderr.write(f"pgveil: error: {exc}\n")
        return 2
    except RulesError as exc:
        print(f"error: {exc}")
        return 1
    if target is None:
        n = len(policy.tables)
        print(f"{rules}: valid ({n} tables); give --dsn to check it against a database")
        return 0
    db = _read(target)
    if db is None:
        return 2
    findings = check(policy, db.catalog, db.samples, db.roles, db.name)
    for f in findings:
        print(f)
    errors = sum(1 for f in findings if f.level == "error")
    warnings = len(findings) - errors
    personal = len(discover(db.catalog, db.samples))
    print(
        f"{rules}: {errors} error(s), {warnings} warning(s); {personal} column(s) look "
        f"personal (database {db.name})"
    )
    return 1 if errors else 0
