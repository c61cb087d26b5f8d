"""The demo's billing database loaded from its data files into the test cluster: the schema
is the billing fixture's core with the part `demo` (the core's columns first, in the core's
order), the xDR partitions cover the generated times whatever the month (December rolls over
into the next year), the load leaves only the schema's tables behind, every table but the
customer classes has rules, the load never drops a billing schema it did not create, and the
roles file gives the roles what the recipe says."""

from __future__ import annotations

import asyncio
import datetime as dt
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import pytest

from proxy.demo import billing as data
from proxy.demo import fixture
from proxy.demo.embedded_pg import EmbeddedPostgres, EmbeddedPostgresError
from rules.loader import parse_rules

DB = "demo_billing"


@pytest.fixture
def database(pg: EmbeddedPostgres) -> Iterator[str]:
    pg.psql(f"DROP DATABASE IF EXISTS {DB} WITH (FORCE)")
    pg.psql(f"CREATE DATABASE {DB}")
    try:
        yield DB
    finally:
        pg.psql(f"DROP DATABASE IF EXISTS {DB} WITH (FORCE)")


async def _connect(pg: EmbeddedPostgres) -> asyncpg.Connection:
    return await asyncpg.connect(
        host=pg.host, port=pg.port, user=pg.superuser, password=pg.password, database=DB
    )


async def _partitions(
    pg: EmbeddedPostgres, now: dt.datetime
) -> list[tuple[str, dt.datetime, dt.datetime]]:
    """Only the schema (the fixture's script for the demo), at `now`: each partition's name
    and bounds (in UTC)."""
    conn = await _connect(pg)
    try:
        # a session in another time zone: the bounds stay at midnight UTC
        await conn.execute("SET TimeZone = 'America/New_York'")
        async with conn.transaction():
            await conn.execute(data.schema(now))
        rows = await conn.fetch(
            "SELECT c.relname, pg_get_expr(c.relpartbound, c.oid) AS bound"
            "  FROM pg_class c JOIN pg_inherits i ON i.inhrelid = c.oid"
            " WHERE i.inhparent = 'billing.xdrs'::regclass ORDER BY 1"
        )
        await conn.execute("SET TimeZone = 'UTC'")
        out = []
        for r in rows:
            lo, hi = await conn.fetchrow(
                "SELECT (regexp_match($1, 'FROM \\(''([^'']+)''\\) TO'))[1]::timestamptz,"
                "       (regexp_match($1, 'TO \\(''([^'']+)''\\)'))[1]::timestamptz",
                r["bound"],
            )
            out.append((r["relname"], lo, hi))
        return out
    finally:
        await conn.close()


@pytest.mark.parametrize(
    "now",
    [
        dt.datetime(2026, 3, 31, 23, 59, tzinfo=dt.UTC),
        dt.datetime(2026, 12, 15, tzinfo=dt.UTC),
        dt.datetime(2027, 1, 1, tzinfo=dt.UTC),
    ],
)
def test_xdr_partitions_cover_the_generated_times(
    pg: EmbeddedPostgres, database: str, now: dt.datetime
) -> None:
    parts = asyncio.run(_partitions(pg, now))
    assert parts
    # the xDRs are at most XDR_DAYS days (and a second) old
    assert parts[0][1] <= now - dt.timedelta(days=data.XDR_DAYS, seconds=1)
    assert parts[-1][2] > now
    for (name, lo, hi), following in zip(parts, [*parts[1:], None], strict=True):
        assert name == f"xdrs_{lo:%Y_%m}"
        assert lo.day == 1 and lo.hour == lo.minute == 0 and lo.tzinfo is not None
        assert hi.day == 1 and hi.hour == 0 and (hi - lo).days in (28, 29, 30, 31)
        if following is not None:
            assert following[1] == hi  # no gap
    if now.month == 12:
        assert parts[-1][2] == dt.datetime(now.year + 1, 1, 1, tzinfo=dt.UTC)


def test_a_load_leaves_only_the_tables_and_its_settings_end_with_it(
    pg: EmbeddedPostgres, database: str
) -> None:
    async def run() -> tuple[list[str], list[str], int]:
        conn = await _connect(pg)
        try:
            now = dt.datetime.now(dt.UTC)
            await data.load(conn, data.Counts.at_scale(0.001), now)
            functions = await conn.fetch(
                "SELECT proname FROM pg_proc WHERE pronamespace = 'billing'::regnamespace"
            )
            names = [data.SETTING + n for n in data.settings(data.Counts.at_scale(1), now)]
            settings = await conn.fetch(
                "SELECT coalesce(current_setting(n, true), '') FROM unnest($1::text[]) n", names
            )
            due = await conn.fetchval(data.DUE_SQL)
            return [r[0] for r in functions], [r[0] for r in settings], int(due)
        finally:
            await conn.close()

    functions, settings, due = asyncio.run(run())
    assert functions == []  # the load's helpers are gone
    # nothing the data files read outlives the load's transaction (create_roles sets the
    # passwords the same way; the fixture's own pgveil_billing.* settings, its numbers and
    # the marker, are the session's, as for every user of the fixture)
    assert len(settings) > 5 and set(settings) == {""}
    # 40 customers, every 40th terminated 400 days ago, in class 1 + 40 % 3 = 2 (30 days)
    assert due == 1


async def _columns(conn: asyncpg.Connection, table: str) -> list[tuple[str, str]]:
    rows = await conn.fetch(
        "SELECT attname, format_type(atttypid, atttypmod) FROM pg_attribute"
        " WHERE attrelid = $1::regclass AND attnum > 0 AND NOT attisdropped ORDER BY attnum",
        f"billing.{table}",
    )
    return [(r[0], r[1]) for r in rows]


def test_the_demo_schema_is_the_fixture_core_with_the_demo_part(
    pg: EmbeddedPostgres, database: str
) -> None:
    """The core tables have the core's columns first, in its order and with its types (but
    the one the part changes), then the demo's; the core's partitions are the demo's."""
    core_tables = ("customer_classes", "customers", "accounts", "xdrs")
    now = dt.datetime(2026, 5, 20, tzinfo=dt.UTC)
    first, months = data.xdr_months(now)

    async def run() -> tuple[dict[str, list[tuple[str, str]]], dict[str, list[tuple[str, str]]]]:
        conn = await _connect(pg)
        try:
            async with conn.transaction():
                core = fixture.script(xdrs_by="connect_time", first_month=first, months=months)
                await conn.execute(core)
                before = {t: await _columns(conn, t) for t in core_tables}
                await conn.execute(data.schema(now))  # (the fixture drops what it made)
                after = {t: await _columns(conn, t) for t in core_tables}
            return before, after
        finally:
            await conn.close()

    core, demo = asyncio.run(run())
    assert ("phone", "text") in core["customers"] and ("extra", "jsonb") in core["customers"]
    changed = {("xdrs", "charged"): "numeric(12,5)"}  # the demo's xDRs are charged to 1e-5
    for table in core_tables:
        own = demo[table][: len(core[table])]
        assert [c for c, _ in own] == [c for c, _ in core[table]], table
        for (column, was), (_, now_type) in zip(core[table], own, strict=True):
            assert now_type == changed.get((table, column), was), (table, column)
    assert len(demo["customers"]) > len(core["customers"]) + 10  # the demo's own columns
    assert ("disconnect_time", "timestamp with time zone") in demo["xdrs"]
    for column in ("phone1", "custom_fields", "charged_amount", "ip_phone_mac"):
        assert all(column not in [c for c, _ in cols] for cols in demo.values()), column


def test_the_demo_part_needs_the_xdrs_by_connect_time(pg: EmbeddedPostgres, database: str) -> None:
    sql = fixture.script(parts=("demo",), settings={"demo_marker": "m"})  # by i_xdr
    with pytest.raises(EmbeddedPostgresError, match='part "demo" needs xdrs_by connect_time'):
        pg.psql(sql, dbname=database)


def test_every_table_but_the_classes_has_rules(
    pg: EmbeddedPostgres, database: str, tmp_path: Path
) -> None:
    """In the loaded database (the catalog, not the files' text): a table the part adds
    without rules would be read unmasked."""

    async def run() -> set[str]:
        conn = await _connect(pg)
        try:
            await data.load(conn, data.Counts.at_scale(0.001), dt.datetime.now(dt.UTC))
            rows = await conn.fetch(
                "SELECT relname FROM pg_class WHERE relnamespace = 'billing'::regnamespace"
                " AND relkind IN ('r', 'p') AND NOT relispartition"
            )
            return {r[0] for r in rows}
        finally:
            await conn.close()

    tables = asyncio.run(run())
    key = tmp_path / "hash.key"
    key.write_text("k" * 64)
    ruled = {t for s, t in parse_rules(data.rules_yaml(str(key))).tables if s == "billing"}
    assert "xdrs" in tables and "resellers" in tables
    assert ruled == tables - {"customer_classes"}


def test_a_load_never_drops_a_billing_schema_it_did_not_create(
    pg: EmbeddedPostgres, database: str
) -> None:
    """The fixture's script begins by dropping any billing schema: the load checks in its
    own transaction, right before, that there is none (the runner's check comes earlier,
    outside it), and fails as CREATE SCHEMA would."""
    pg.psql("CREATE SCHEMA billing; CREATE TABLE billing.mine (v int)", dbname=database)

    async def run() -> None:
        conn = await _connect(pg)
        try:
            await data.load(conn, data.Counts.at_scale(0.001), dt.datetime.now(dt.UTC))
        finally:
            await conn.close()

    with pytest.raises(asyncpg.DuplicateSchemaError, match="already exists"):
        asyncio.run(run())
    assert pg.psql("SELECT count(*) FROM billing.mine", dbname=database) == "0\n"


def test_the_roles_file_creates_marks_and_grants_the_recipes_roles(
    pg: EmbeddedPostgres, database: str
) -> None:
    """In a transaction rolled back at the end: the session cluster has roles of the same
    names (the billing fixture's helpdesk), which must stay as they are."""

    async def run() -> tuple[list[tuple[str, str]], list[tuple[str, bool, bool]], list[str]]:
        conn = await _connect(pg)
        try:
            await data.load(conn, data.Counts.at_scale(0.001), dt.datetime.now(dt.UTC))
            query = (
                "SELECT rolname, coalesce(pg_catalog.shobj_description(oid, 'pg_authid'), '')"
                "  FROM pg_roles WHERE rolname = ANY($1::text[]) ORDER BY 1"
            )
            before = await conn.fetch(query, list(data.DEMO_ROLES))
            tx = conn.transaction()
            await tx.start()
            try:
                await data.create_roles(conn, {r: f"pw-{r}" for r in data.DEMO_ROLES})
                roles = await conn.fetch(query, list(data.DEMO_ROLES))
                grants = await conn.fetch(
                    "SELECT r, has_table_privilege(r, 'billing.customers', 'SELECT'),"
                    "       has_table_privilege(r, 'billing.customers', 'DELETE')"
                    "  FROM unnest($1::text[]) r ORDER BY 1",
                    list(data.DEMO_ROLES),
                )
            finally:
                await tx.rollback()
            after = await conn.fetch(query, list(data.DEMO_ROLES))
            assert after == before
            return (
                [(r[0], r[1]) for r in roles],
                [(r[0], r[1], r[2]) for r in grants],
                [r[1] for r in before],
            )
        finally:
            await conn.close()

    roles, grants, before = asyncio.run(run())
    assert roles == sorted((r, data.MARKER) for r in data.DEMO_ROLES)
    assert data.MARKER not in before
    assert sorted(grants) == sorted(
        [
            (data.ADMIN_ROLE, True, True),
            (data.HELPDESK_ROLE, True, False),
            (data.CATALOG_ROLE, False, False),  # reads the catalog, never a row
        ]
    )
