"""`pgveil rules check|suggest|schema`: the DBA's tools for the rules file.

Reads the catalog and small value samples through asyncpg; prints findings that name
tables, columns and value categories, never a sampled value.
"""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path
from typing import NamedTuple

import asyncpg

from audit.sinks import connect
from proxy.catalog import read_catalog, read_role_names
from rules.catalog import Catalog
from rules.discovery import check, discover, suggest
from rules.loader import RulesError, json_schema, load_rules
from rules.masks import family_of

SAMPLE_ROWS = 50


def _quote(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


class Database(NamedTuple):
    name: str
    catalog: Catalog
    roles: frozenset[str]
    samples: dict[tuple[str, str, str], list[str]]


async def read(dsn: str) -> Database:
    conn = await connect(dsn)
    try:
        catalog = await read_catalog(conn)
        roles = await read_role_names(conn)
        name = str(await conn.fetchval("SELECT pg_catalog.current_database()"))
        samples: dict[tuple[str, str, str], list[str]] = {}
        for (schema, table), rel in catalog.relations.items():
            if rel.kind not in ("r", "p", "m"):
                continue
            for col in rel.columns:
                if family_of(col.type.name) not in ("text", "int"):
                    continue
                sql = (
                    f"SELECT {_quote(col.name)}::text FROM {_quote(schema)}.{_quote(table)} "
                    f"WHERE {_quote(col.name)} IS NOT NULL LIMIT {SAMPLE_ROWS}"
                )
                try:
                    rows = await conn.fetch(sql)
                except asyncpg.PostgresError:
                    continue  # no privilege to sample: judged by name only
                samples[(schema, table, col.name)] = [r[0] for r in rows]
        return Database(name, catalog, roles, samples)
    finally:
        await conn.close()


def run(command: str, rules: Path | None, dsn: str | None) -> int:
    if command == "schema":
        print(json.dumps(json_schema(), indent=2))
        return 0
    if command == "suggest":
        if not dsn:
            sys.stderr.write("pgveil: error: rules suggest needs --dsn\n")
            return 2
        db = asyncio.run(read(dsn))
        sys.stdout.write(suggest(db.catalog, db.samples))
        return 0
    if rules is None:
        sys.stderr.write("pgveil: error: rules check needs --rules FILE\n")
        return 2
    try:
        policy = load_rules(rules)
    except RulesError as exc:
        print(f"error: {exc}")
        return 1
    if not dsn:
        n = len(policy.tables)
        print(f"{rules}: valid ({n} tables); give --dsn to check it against a database")
        return 0
    try:
        db = asyncio.run(read(dsn))
    except (OSError, asyncpg.PostgresError) as exc:
        sys.stderr.write(f"pgveil: error: cannot read the database: {exc}\n")
        return 2
    findings = check(policy, db.catalog, db.samples, db.roles, db.name)
    for f in findings:
        print(f)
    errors = sum(1 for f in findings if f.level == "error")
    warnings = len(findings) - errors
    personal = len(discover(db.catalog, db.samples))
    print(f"{rules}: {errors} error(s), {warnings} warning(s); {personal} column(s) look personal")
    return 1 if errors else 0
