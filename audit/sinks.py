"""Where audit events go: the JSON-lines file, standard output, a PostgreSQL table.

File and stdout sinks are written synchronously when an event is submitted: a line handed
to the operating system survives a crash of pgveil, so an event is durable before the
result it describes is released. The table sink is written in batches by a background
task (asyncpg); it creates its table if missing, partitioned by day, and keeps one hash
chain per writer (`chain`, e.g. host and port of one pgveil instance) so that many
instances can share it. Sinks receive finished events only and never look inside them.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import asyncpg

from audit.events import CHECKPOINT, GAP, Chain, canonical, load_event
from audit.files import AuditFile
from shared.dsn import connect as dsn_connect
from shared.quoting import quote_ident


async def connect(dsn: str, timeout: float = 10) -> asyncpg.Connection:
    """The table sink's connection, opened as libpq would from `dsn` (a connection string
    or URI) and the PG* environment: see shared.dsn."""
    conn: asyncpg.Connection = await dsn_connect(
        dsn, fallback_application_name="pgveil-audit", timeout=timeout
    )
    return conn


class FileSink:
    name = "file"

    def __init__(
        self, path: Path, max_bytes: int = 100 * 1024**2, max_age_s: float = 86400
    ) -> None:
        self.path = path
        self._file = AuditFile(path, max_bytes, max_age_s)

    def due(self, extra: int) -> bool:
        """The file is to be rotated once `extra` more bytes are in it."""
        return self._file.due(extra)

    def write(self, lines: Sequence[bytes]) -> None:
        self._file.write_lines(lines)  # rotates at each ROTATE among them

    def close(self) -> None:
        self._file.close()


class SinkBacklogged(OSError):
    """The sink took the lines but could not hand all of them to the OS yet: it keeps the
    rest itself (the writer must not queue the lines again) and fails until it is out."""


class StdoutSink:
    """Events as JSON lines on standard output, for a log shipper (logs go to stderr).
    Written without blocking: a reader that stops reading makes the sink fail (statements
    on personal data then wait, and are refused), never stalls the proxy."""

    name = "stdout"

    def __init__(self) -> None:
        self._backlog = b""  # written in part: the rest, before anything else
        self._fd = -1

    def write(self, lines: Sequence[bytes]) -> None:
        if sys.stdout is None:
            raise OSError("standard output is closed")
        if self._fd < 0:
            sys.stdout.flush()
            self._fd = sys.stdout.fileno()
            os.set_blocking(self._fd, False)
        data = self._backlog + b"".join(line + b"\n" for line in lines if line)  # not ROTATE
        self._backlog = b""
        view = memoryview(data)
        while view:
            try:
                written = os.write(self._fd, view)
            except BlockingIOError:
                written = 0
            if not written:
                self._backlog = bytes(view)
                raise SinkBacklogged("standard output is not being read")
            view = view[written:]

    def close(self) -> None:
        if self._backlog and self._fd >= 0:
            with contextlib.suppress(OSError):
                os.write(self._fd, self._backlog)  # what the reader takes now; never waits
        if sys.stdout is not None:
            sys.stdout.flush()


SyncSink = FileSink | StdoutSink


def split_table_name(qualified: str) -> tuple[str, str]:
    """`schema.table` or `table` (schema `pgveil`); quoting is not accepted, names are
    taken literally."""
    schema, _, table = qualified.rpartition(".")
    return (schema or "pgveil", table)


class TableSink:
    """A PostgreSQL table, batched. `dsn` is a libpq connection string or URI."""

    name = "table"

    def __init__(self, dsn: str, table: str, chain: str) -> None:
        self.dsn = dsn
        self.schema, self.table = split_table_name(table)
        self.chain = chain
        self._conn: asyncpg.Connection | None = None
        self._partitions: set[dt.date] = set()

    @property
    def relation(self) -> str:
        return f"{quote_ident(self.schema)}.{quote_ident(self.table)}"

    async def _connection(self) -> asyncpg.Connection:
        if self._conn is None or self._conn.is_closed():
            self._conn = await connect(self.dsn, timeout=5)
            self._partitions.clear()
            await self._create()
        return self._conn

    async def _create(self) -> None:
        assert self._conn is not None
        schema = quote_ident(self.schema)
        await self._conn.execute(
            f"""
            CREATE SCHEMA IF NOT EXISTS {schema};
            CREATE TABLE IF NOT EXISTS {self.relation} (
                seq bigint GENERATED ALWAYS AS IDENTITY,
                ts timestamptz NOT NULL,
                id text NOT NULL,
                chain text NOT NULL,
                type text NOT NULL,
                event jsonb NOT NULL,
                line text NOT NULL
            ) PARTITION BY RANGE (ts);
            CREATE TABLE IF NOT EXISTS {schema}.{quote_ident(self.table + "_default")}
                PARTITION OF {self.relation} DEFAULT;
            CREATE INDEX IF NOT EXISTS {quote_ident(self.table + "_chain_seq")}
                ON {self.relation} (chain, seq);
            """
        )

    async def _partition(self, day: dt.date) -> None:
        if day in self._partitions:
            return
        assert self._conn is not None
        name = quote_ident(f"{self.table}_{day:%Y%m%d}")
        exists = await self._conn.fetchval(
            "SELECT to_regclass($1) IS NOT NULL",
            f"{quote_ident(self.schema)}.{name}",
        )
        if not exists:
            nxt = day + dt.timedelta(days=1)
            # fails when rows of that day already sit in the default partition (or another
            # instance raced us): they stay there, which is still correct
            with contextlib.suppress(asyncpg.PostgresError):
                await self._conn.execute(
                    f"CREATE TABLE IF NOT EXISTS {quote_ident(self.schema)}.{name} "
                    f"PARTITION OF {self.relation} "
                    f"FOR VALUES FROM ('{day.isoformat()}') TO ('{nxt.isoformat()}')"
                )
        self._partitions.add(day)

    async def tail(self) -> tuple[dict[str, Any] | None, str | None]:
        """This chain's last event in the table (None when it has none), and the chain id
        of its newest checkpoint or gap (None when it has none)."""
        conn = await self._connection()
        line = await conn.fetchval(
            f"SELECT line FROM {self.relation} WHERE chain = $1 ORDER BY seq DESC LIMIT 1",
            self.chain,
        )
        chain_id = await conn.fetchval(
            f"SELECT event->>'chain' FROM {self.relation} WHERE chain = $1 "
            "AND type = ANY($2::text[]) ORDER BY seq DESC LIMIT 1",
            self.chain,
            [CHECKPOINT, GAP],
        )
        return (json.loads(line) if line is not None else None), chain_id

    async def write(self, events: Sequence[tuple[Mapping[str, Any], bytes]]) -> None:
        conn = await self._connection()
        try:
            for day in {_ts(e).date() for e, _line in events}:
                await self._partition(day)  # outside the transaction: it may fail harmlessly
            async with conn.transaction():
                await self._insert(conn, events)
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError):
            await self._drop()
            raise

    async def append(
        self, events: Sequence[tuple[str, Mapping[str, Any]]], linked: bool = False
    ) -> list[dict[str, Any]]:
        """Link and insert events in one transaction that holds the chain's advisory lock,
        so that several processes can share one chain (the erasure workers do). `events`:
        (type, fields). With `linked`, the fields are already linked events (a file's chain,
        written under the file's lock) and are inserted as they are."""
        conn = await self._connection()
        today = dt.datetime.now(dt.UTC).date()
        for day in (today, today + dt.timedelta(days=1)):  # the events are linked now
            await self._partition(day)
        async with conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock(hashtext($1))", self.chain)
            if linked:
                out = [dict(fields) for _type, fields in events]
                rows = [(e, canonical(e)) for e in out]
            else:
                last = await conn.fetchval(
                    f"SELECT line FROM {self.relation} WHERE chain = $1 ORDER BY seq DESC LIMIT 1",
                    self.chain,
                )
                chain = Chain.following(json.loads(last) if last is not None else None)
                rows = [chain.link_line(t, fields) for t, fields in events]
                out = [e for e, _line in rows]
            await self._insert(conn, rows)
        return out

    async def _insert(
        self, conn: asyncpg.Connection, events: Sequence[tuple[Mapping[str, Any], bytes]]
    ) -> None:
        rows = []
        for e, encoded in events:
            line = encoded.decode()
            rows.append((_ts(e), str(e["id"]), self.chain, str(e["type"]), line, line))
        await conn.executemany(
            f"INSERT INTO {self.relation} (ts, id, chain, type, event, line) "
            "VALUES ($1, $2, $3, $4, $5::jsonb, $6)",
            rows,
        )

    async def _drop(self) -> None:
        if self._conn is not None:
            self._conn.terminate()
            self._conn = None

    async def close(self) -> None:
        if self._conn is not None:
            await self._conn.close()
            self._conn = None


def _ts(event: Mapping[str, Any]) -> dt.datetime:
    return dt.datetime.strptime(str(event["ts"]), "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=dt.UTC)


async def read_table(
    dsn: str, table: str, chain: str | None = None
) -> list[tuple[str, list[dict[str, Any]]]]:
    """Every chain in the table with its events in order (of insertion): [(chain,
    events)]."""
    schema, name = split_table_name(table)
    conn = await connect(dsn)
    try:
        rows = await conn.fetch(
            f"SELECT chain, line FROM {quote_ident(schema)}.{quote_ident(name)} "
            "WHERE $1::text IS NULL OR chain = $1 ORDER BY chain, seq",
            chain,
        )
    finally:
        await conn.close()
    chains: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        chains.setdefault(r["chain"], []).append(load_event(r["line"]))
    return list(chains.items())


async def read_table_rows(
    dsn: str, table: str, chain: str | None = None
) -> list[tuple[str, list[tuple[int, dict[str, Any] | None]]]]:
    """For `verify`: every chain with its rows in order, as (the row's `seq` column, the
    event, or None for a line that is not one)."""
    schema, name = split_table_name(table)
    conn = await connect(dsn)
    try:
        rows = await conn.fetch(
            f"SELECT chain, seq, line FROM {quote_ident(schema)}.{quote_ident(name)} "
            "WHERE $1::text IS NULL OR chain = $1 ORDER BY chain, seq",
            chain,
        )
    finally:
        await conn.close()
    chains: dict[str, list[tuple[int, dict[str, Any] | None]]] = {}
    for r in rows:
        try:
            event = load_event(r["line"])
        except ValueError:
            event = None
        if not isinstance(event, dict):
            event = None
        chains.setdefault(r["chain"], []).append((int(r["seq"]), event))
    return list(chains.items())
