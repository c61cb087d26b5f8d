"""rules.catalog_read is the one catalog reader: the proxy's analyser catalog and the
erasure worker's tables come from it, each side over its own asyncpg connection (the
proxy's catalog login; the erasure worker's, with search_path = pg_catalog), and they
agree on what they both read."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import pytest

from erasure.catalog import Catalog as ErasureCatalog
from erasure.db import connect as erasure_connect
from erasure.db import read_catalog as erasure_read_catalog
from erasure.model import TableName
from proxy.demo.embedded_pg import EmbeddedPostgres
from rules.catalog import Catalog
from rules.catalog_read import read_catalog, read_databases, read_roles, read_tables
from shared.dsn import connect as dsn_connect

DB = "catalog_read_db"
SETUP = """
CREATE SCHEMA shop;
CREATE DOMAIN shop.email AS varchar(80) CHECK (VALUE LIKE '%@%');
CREATE DOMAIN shop.work_email AS shop.email;
CREATE TABLE shop."Customers" (id bigint PRIMARY KEY, name text NOT NULL,
                               email shop.email, work shop.work_email, meta jsonb);
CREATE TABLE shop.calls (id bigint, customer_id bigint, at timestamptz NOT NULL)
    PARTITION BY RANGE (at);
CREATE TABLE shop.calls_2026 PARTITION OF shop.calls
    FOR VALUES FROM ('2026-01-01') TO ('2027-01-01');
CREATE INDEX calls_by_customer ON shop.calls (customer_id, id);
CREATE VIEW shop.names AS SELECT id, name FROM shop."Customers";
CREATE ROLE catalog_read_member;
CREATE ROLE catalog_read_user LOGIN IN ROLE catalog_read_member;
GRANT SELECT ON shop."Customers" TO catalog_read_user;
"""


@pytest.fixture(scope="module")
def db(pg: EmbeddedPostgres) -> Iterator[str]:
    pg.psql(f"DROP DATABASE IF EXISTS {DB}")
    pg.psql("DROP ROLE IF EXISTS catalog_read_user; DROP ROLE IF EXISTS catalog_read_member;")
    pg.psql(f"CREATE DATABASE {DB}")
    try:
        pg.psql(SETUP, dbname=DB)
        yield pg.dsn(dbname=DB) + " sslmode=disable"
    finally:
        pg.psql(f"DROP DATABASE IF EXISTS {DB}")
        pg.psql("DROP ROLE catalog_read_user; DROP ROLE catalog_read_member;")


async def _both(dsn: str) -> tuple[Catalog, ErasureCatalog]:
    proxy_side = await dsn_connect(dsn)
    try:
        catalog = await read_catalog(proxy_side.fetch)
    finally:
        await proxy_side.close()
    worker = await erasure_connect(dsn)
    try:
        names = [TableName("shop", "Customers"), TableName("shop", "calls"),
                 TableName("shop", "names"), TableName("shop", "missing")]  # fmt: skip
        tables = await erasure_read_catalog(worker, names)
    finally:
        await worker.close()
    return catalog, tables


def test_the_proxy_and_the_erasure_worker_read_the_same_tables(db: str) -> None:
    catalog, tables = asyncio.run(_both(db))
    for schema, name in (("shop", "Customers"), ("shop", "calls")):
        mine = catalog.relations[(schema, name)]
        theirs = tables.relations[TableName(schema, name)]
        assert [c.name for c in mine.columns] == list(theirs.columns)
        # the base type, a domain resolved (the proxy's reader resolves one level of domain:
        # a domain over a domain, `work`, is left out here)
        assert [c.type.name for c in mine.columns if c.name != "work"] == [
            c.base for c in theirs.columns.values() if c.name != "work"
        ]
    customers = tables.relations[TableName("shop", "Customers")]
    assert customers.columns["email"].type == "shop.email"  # (the domain: placeholder casts)
    assert customers.columns["work"].base == "varchar"
    assert customers.columns["name"].not_null and not customers.columns["meta"].not_null
    assert any(i.unique and i.columns == ("id",) for i in customers.indexes)
    calls = tables.relations[TableName("shop", "calls")]
    assert calls.kind == "p" and [str(leaf.name) for leaf in calls.leaves] == ["shop.calls_2026"]
    assert calls.leaves[0].indexes[0].columns == ("customer_id", "id")  # the index's partition
    assert tables.kinds == {TableName("shop", "names"): "v"}
    assert TableName("shop", "missing") not in tables.relations
    assert catalog.relations[("shop", "names")].kind == "v"
    assert ("shop", "calls") in catalog.relations[("shop", "calls_2026")].parents


def test_roles_databases_and_privileges_are_read_as_the_login_that_asks(
    db: str, pg: EmbeddedPostgres
) -> None:
    async def run() -> tuple[frozenset[str], list[str], frozenset[str]]:
        conn = await dsn_connect(db)
        try:
            roles = await read_roles(conn.fetch, "catalog_read_user")
            databases = await read_databases(conn.fetch)
            await conn.execute("SET ROLE catalog_read_user")
            found = await read_tables(conn.fetch, [("shop", "Customers")])
        finally:
            await conn.close()
        assert found.role == "catalog_read_user"
        return roles, databases, found.tables[0].privileges

    roles, databases, privileges = asyncio.run(run())
    assert roles == {"catalog_read_user", "catalog_read_member"}
    assert DB in databases and "template0" not in databases
    assert privileges == {"SELECT"}
