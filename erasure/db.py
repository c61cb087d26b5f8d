"""The erasure worker's database access: connecting, reading the catalog, the job table.

Connections are opened by shared.dsn, as libpq would (connection string, PG* environment,
password file). Every connection runs with `search_path = pg_catalog` (so unqualified
functions and operators are the built-ins and `format_type` qualifies every other type),
`TimeZone = UTC`, `application_name = pgveil-erasure` (unless the connection names
another), and the configured `lock_timeout` and `statement_timeout`. Errors that leave this
module carry table and column names, SQLSTATEs and counts only: server messages can quote
row values, so they are never passed on (the server's reasons for refusing a connection
name roles and databases, and are: no statement has run yet).
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any

import asyncpg

from erasure.catalog import Catalog, Column, Index, Relation
from erasure.model import ErasureConfig, TableName
from erasure.planner import JOB_TABLE, LOCK_CLASS, SCHEMA_LOCK
from shared.dsn import ConnectError, DsnError
from shared.dsn import connect as dsn_connect

__all__ = ["ConnectError", "DsnError", "connect"]

APPLICATION_NAME = "pgveil-erasure"


async def connect(dsn: str, lock_timeout_ms: int = 0, statement_timeout_ms: int = 0) -> Any:
    """A worker connection, opened as libpq would from `dsn` and the PG* environment
    (shared.dsn). The timeouts bound every statement it runs; each batch is one
    statement, so they bound every batch's transaction (0: the server's settings)."""
    settings = {"search_path": "pg_catalog", "TimeZone": "UTC"}
    if lock_timeout_ms:
        settings["lock_timeout"] = f"{int(lock_timeout_ms)}ms"
    if statement_timeout_ms:
        settings["statement_timeout"] = f"{int(statement_timeout_ms)}ms"
    conn = await dsn_connect(
        dsn,
        fallback_application_name=APPLICATION_NAME,
        server_settings=settings,
        statement_cache_size=256,
    )
    await conn.set_type_codec("jsonb", encoder=json.dumps, decoder=json.loads, schema="pg_catalog")
    if conn.get_server_version().major >= 14:
        # a worker killed mid-statement: its backend stops within a second instead of
        # finishing the statement and holding the job's lock meanwhile
        await conn.execute("SET client_connection_check_interval = '1s'")
    return conn


def sqlstate_of(exc: BaseException) -> str:
    """`ExceptionName (SQLSTATE)`, without the server's message (it can quote values)."""
    code = getattr(exc, "sqlstate", None)
    return f"{type(exc).__name__} ({code})" if code else type(exc).__name__


# -- catalog -------------------------------------------------------------------------------

_RELATIONS = """
SELECT c.oid, n.nspname, c.relname, c.relkind::text,
       has_table_privilege(c.oid, 'SELECT'), has_table_privilege(c.oid, 'UPDATE'),
       has_table_privilege(c.oid, 'DELETE')
  FROM pg_class AS c JOIN pg_namespace AS n ON n.oid = c.relnamespace
 WHERE (n.nspname, c.relname) IN (SELECT * FROM unnest($1::text[], $2::text[]))
"""
_LEAVES = """
SELECT t.relid::oid, n.nspname, c.relname
  FROM pg_partition_tree($1::oid::regclass) AS t
  JOIN pg_class AS c ON c.oid = t.relid JOIN pg_namespace AS n ON n.oid = c.relnamespace
 WHERE t.isleaf ORDER BY n.nspname, c.relname
"""
_COLUMNS = """
SELECT a.attrelid, a.attnum, a.attname, format_type(a.atttypid, a.atttypmod), a.atttypid,
       a.attnotnull
  FROM pg_attribute AS a
 WHERE a.attrelid = ANY($1::oid[]) AND a.attnum > 0 AND NOT a.attisdropped
 ORDER BY a.attrelid, a.attnum
"""
_TYPES = "SELECT oid, typname::text, typtype::text, typbasetype FROM pg_type WHERE oid = ANY($1)"
_INDEXES = """
SELECT i.indrelid, ic.relname::text, i.indisunique, i.indpred IS NOT NULL, am.amname::text,
       i.indisvalid, i.indnkeyatts, i.indkey::int2[]
  FROM pg_index AS i JOIN pg_class AS ic ON ic.oid = i.indexrelid
  JOIN pg_am AS am ON am.oid = ic.relam
 WHERE i.indrelid = ANY($1::oid[])
 ORDER BY ic.relname
"""


def configured_names(config: ErasureConfig) -> set[TableName]:
    names = {config.subject.table, *(t.table for t in config.tables)}
    if config.subject.retention.class_table is not None:
        names.add(config.subject.retention.class_table)
    return names


async def read_catalog(conn: Any, names: Iterable[TableName]) -> Catalog:
    """The relations `names` (tables, with their columns, indexes and leaf partitions)."""
    wanted = sorted(set(names))
    rows = await conn.fetch(_RELATIONS, [n.schema for n in wanted], [n.name for n in wanted])
    role = str(await conn.fetchval("SELECT current_user"))
    kinds: dict[TableName, str] = {}
    tables: list[tuple[int, TableName, str, frozenset[str]]] = []
    for oid, schema, name, kind, sel, upd, dele in rows:
        tname = TableName(schema, name)
        if kind not in ("r", "p"):
            kinds[tname] = kind
            continue
        privs = frozenset(p for p, ok in (("SELECT", sel), ("UPDATE", upd), ("DELETE", dele)) if ok)
        tables.append((oid, tname, kind, privs))
    leaves: dict[int, list[tuple[int, TableName]]] = {}
    for oid, _tname, kind, _ in tables:
        if kind == "p":
            leaves[oid] = [(r[0], TableName(r[1], r[2])) for r in await conn.fetch(_LEAVES, oid)]
    oids = [t[0] for t in tables] + [oid for ls in leaves.values() for oid, _ in ls]
    columns: dict[int, dict[int, tuple[str, str, int, bool]]] = {}
    for relid, attnum, attname, ftype, typid, notnull in await conn.fetch(_COLUMNS, oids):
        columns.setdefault(relid, {})[attnum] = (attname, ftype, typid, notnull)
    base = await _base_types(conn, {c[2] for cols in columns.values() for c in cols.values()})
    indexes: dict[int, list[Index]] = {}
    for relid, iname, unique, partial, am, valid, nkey, keys in await conn.fetch(_INDEXES, oids):
        cols = columns.get(relid, {})
        key_cols = tuple(cols[k][0] if k in cols else None for k in list(keys)[:nkey])
        indexes.setdefault(relid, []).append(Index(iname, key_cols, unique, partial, am, valid))

    def relation(oid: int, tname: TableName, kind: str, privs: frozenset[str]) -> Relation:
        cols = {
            name: Column(name, ftype, base[typid], notnull)
            for name, ftype, typid, notnull in columns.get(oid, {}).values()
        }
        return Relation(
            name=tname,
            kind=kind,
            columns=cols,
            indexes=tuple(indexes.get(oid, [])),
            leaves=tuple(relation(lo, ln, "r", privs) for lo, ln in leaves.get(oid, [])),
            privileges=privs,
        )

    relations = {t[1]: relation(*t) for t in tables}
    return Catalog(relations=relations, role=role, kinds=kinds)


async def _base_types(conn: Any, oids: set[int]) -> dict[int, str]:
    """typname of each type, domains resolved to their base type."""
    names: dict[int, str] = {}
    pending = {o: o for o in oids}  # start -> current
    for _ in range(16):
        if not pending:
            break
        rows = {r[0]: r for r in await conn.fetch(_TYPES, list(set(pending.values())))}
        nxt: dict[int, int] = {}
        for start, cur in pending.items():
            _, typname, typtype, basetype = rows[cur]
            if typtype == "d":
                nxt[start] = basetype
            else:
                names[start] = typname
        pending = nxt
    for start in pending:
        names[start] = "unknown"
    return names


async def check_placeholders(conn: Any, config: ErasureConfig, catalog: Catalog) -> list[str]:
    """Placeholders that are not a value of their column's type (only the server can tell)."""
    problems: list[str] = []
    for spec in config.tables:
        rel = catalog.get(spec.table)
        if rel is None:
            continue
        for a in spec.columns:
            col = rel.columns.get(a.column)
            if col is None or a.kind != "placeholder" or a.placeholder is None:
                continue
            sample = a.placeholder.replace("{key}", "1")
            try:
                await conn.fetchval(f"SELECT $1::text::{col.type}", sample)
            except asyncpg.PostgresError:
                problems.append(
                    f"{config.where(f'{spec.path}.columns.{a.column}.placeholder')}: the "
                    f"placeholder is not a valid {col.type} value; give one that is"
                )
    return problems


# -- the job table -------------------------------------------------------------------------

STATES = ("pending", "running", "done", "verified", "failed")

_DDL = f"""
CREATE SCHEMA IF NOT EXISTS pgveil;
CREATE TABLE IF NOT EXISTS {JOB_TABLE} (
    subject_key      text PRIMARY KEY,
    state            text NOT NULL DEFAULT 'pending'
                     CHECK (state IN ('pending', 'running', 'done', 'verified', 'failed')),
    due_at           timestamptz NOT NULL,
    requested        boolean NOT NULL DEFAULT false,
    plan_id          text,
    step             int NOT NULL DEFAULT 0,
    owners           text[],
    owner_pos        int NOT NULL DEFAULT 0,
    last_key         text,
    rows             jsonb NOT NULL DEFAULT '{{}}',
    seconds          jsonb NOT NULL DEFAULT '{{}}',
    batches          bigint NOT NULL DEFAULT 0,
    longest_batch_ms double precision NOT NULL DEFAULT 0,
    attempts         int NOT NULL DEFAULT 0,
    failures         int NOT NULL DEFAULT 0,
    worker           text,
    error            text,
    remaining        jsonb,
    audit_event      jsonb,
    created_at       timestamptz NOT NULL DEFAULT clock_timestamp(),
    started_at       timestamptz,
    erased_at        timestamptz,
    finished_at      timestamptz,
    updated_at       timestamptz NOT NULL DEFAULT clock_timestamp()
);
CREATE INDEX IF NOT EXISTS erasure_job_active ON {JOB_TABLE} (due_at, subject_key)
    WHERE state IN ('pending', 'running', 'done') OR audit_event IS NOT NULL;
COMMENT ON TABLE {JOB_TABLE} IS
    'pgveil erasure worker: one job per data subject; subject keys, progress and counts only';
"""


async def job_table_exists(conn: Any) -> bool:
    return bool(await conn.fetchval(f"SELECT to_regclass('{JOB_TABLE}') IS NOT NULL"))


async def ensure_job_table(conn: Any) -> None:
    """Creates the `pgveil` schema and job table once (concurrent workers wait on a lock)."""
    if await job_table_exists(conn):
        return
    async with conn.transaction():
        await conn.execute(f"SELECT pg_advisory_xact_lock({LOCK_CLASS}, {SCHEMA_LOCK})")
        await conn.execute(_DDL)
