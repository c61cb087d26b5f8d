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


def test_a_load_leaves_the_tables_and_the_roles_file_grants_them(
    pg: EmbeddedPostgres, database: str
) -> None:
    async def run() -> tuple[list[str], list[str], list[tuple[str, str]], int]:
        conn = await _connect(pg)
        try:
            now = dt.datetime.now(dt.UTC)
            await data.load(conn, data.Counts.at_scale(0.001), now)
            functions = await conn.fetch(
                "SELECT proname FROM pg_proc WHERE pronamespace = 'billing'::regnamespace"
            )
            names = [data.SETTING + n for n in data.settings(data.Counts.at_scale(1), now)]
            names += [f"{data.SETTING}password_{r}" for r in data.DEMO_ROLES]
            left = "SELECT coalesce(current_setting(n, true), '') FROM unnest($1::text[]) n"
            settings = await conn.fetch(left, names)
            await data.create_roles(conn, {r: f"pw-{r}" for r in data.DEMO_ROLES})
            settings += await conn.fetch(left, names)
            roles = await conn.fetch(
                "SELECT rolname, pg_catalog.shobj_description(oid, 'pg_authid') AS c"
                "  FROM pg_roles WHERE rolname = ANY($1::text[]) ORDER BY 1",
                list(data.DEMO_ROLES),
            )
            due = await conn.fetchval(data.DUE_SQL)
            return (
                [r["proname"] for r in functions],
                [r[0] for r in settings],
                [(r["rolname"], r["c"]) for r in roles],
                int(due),
            )
        finally:
            await conn.close()

    try:
        functions, settings, roles, due = asyncio.run(run())
    finally:
        for role in data.DEMO_ROLES:
            pg.psql(f"DROP OWNED BY {role}; DROP ROLE IF EXISTS {role}", dbname=DB)
    assert functions == []  # the load's helpers are gone
    # nothing of the load (the passwords least of all) outlives its transaction
    assert len(settings) > 10 and set(settings) == {""}
    assert sorted(roles) == sorted((r, data.MARKER) for r in data.DEMO_ROLES)
    # 40 customers, every 40th terminated 400 days ago, in class 1 + 40 % 3 = 2 (30 days)
    assert due == 1
