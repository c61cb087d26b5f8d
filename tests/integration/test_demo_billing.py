"""The demo's billing database loaded from its data files into the test cluster: the xDR
partitions cover the generated times whatever the month (December rolls over into the next
year), the load leaves only the schema's tables behind, and the roles file gives the roles
what the recipe says."""

from __future__ import annotations

import asyncio
import datetime as dt
from collections.abc import Iterator

import asyncpg
import pytest

from proxy.demo import billing as data
from proxy.demo.embedded_pg import EmbeddedPostgres

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
    """Only the schema file, at `now`: each partition's name and bounds (in UTC)."""
    conn = await _connect(pg)
    try:
        # a session in another time zone: the bounds stay at midnight UTC
        await conn.execute("SET TimeZone = 'America/New_York'")
        async with conn.transaction():
            for name, value in data.settings(data.Counts.at_scale(0.001), now).items():
                await conn.execute("SELECT set_config($1, $2, true)", data.SETTING + name, value)
            await conn.execute(data.data_text("schema.sql"))
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
        assert name == f"xdrs_{lo:%Y%m}"
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
    # nothing the load set outlives its transaction (create_roles sets the passwords the same
    # way)
    assert len(settings) > 5 and set(settings) == {""}
    # 40 customers, every 40th terminated 400 days ago, in class 1 + 40 % 3 = 2 (30 days)
    assert due == 1


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
