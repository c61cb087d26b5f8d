"""The erasure worker's database access: connecting, reading the catalog (the queries are
rules.catalog_read's, shared with the proxy), the job table.

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
from rules.catalog_read import Table, read_tables
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


def configured_names(config: ErasureConfig) -> set[TableName]:
    names = {config.subject.table, *(t.table for t in config.tables)}
    if config.subject.retention.class_table is not None:
        names.add(config.subject.retention.class_table)
    return names


async def read_catalog(conn: Any, names: Iterable[TableName]) -> Catalog:
    """The relations `names` (tables, with their columns, indexes and leaf partitions), read
    by rules.catalog_read as the worker's role."""
    found = await read_tables(conn.fetch, ((n.schema, n.name) for n in names))

    def relation(t: Table) -> Relation:
        return Relation(
            name=TableName(t.schema, t.name),
            kind=t.kind,
            columns={c.name: Column(c.name, c.type, c.base, c.not_null) for c in t.columns},
            indexes=tuple(
                Index(i.name, i.columns, i.unique, i.partial, i.method, i.valid) for i in t.indexes
            ),
            leaves=tuple(relation(leaf) for leaf in t.leaves),
            privileges=t.privileges,
        )

    relations = {TableName(t.schema, t.name): relation(t) for t in found.tables}
    kinds = {TableName(schema, name): kind for schema, name, kind in found.others}
    return Catalog(relations=relations, role=found.role, kinds=kinds)


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
