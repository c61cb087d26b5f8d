"""asyncpg and psycopg 3 as a masked role: type introspection (asyncpg's introspection query
for composite, enum, domain, array and json types; psycopg's `TypeInfo.fetch`,
`CompositeInfo.fetch`, `EnumInfo.fetch`), custom codecs and loaders, server-side cursors,
binary results, prepared statements and COPY TO.
"""

from __future__ import annotations

import decimal
import json
from typing import Any

import asyncpg
import psycopg
import pytest
from psycopg.types import TypeInfo
from psycopg.types.composite import CompositeInfo, register_composite
from psycopg.types.enum import EnumInfo, register_enum
from psycopg.types.json import Jsonb, set_json_loads

from tests.compat.conftest import (
    DB,
    MASKED,
    UNMASKED,
    Compat,
    assert_masked,
    assert_real,
)

CUSTOMERS = "SELECT * FROM billing.customers ORDER BY i_customer"


def url(compat: Compat, user: str = MASKED) -> str:
    return (
        f"postgresql://{user}:{compat.password(user)}@127.0.0.1:{compat.port}/{DB}?sslmode=disable"
    )


# -- asyncpg -----------------------------------------------------------------------------------


async def test_asyncpg_introspects_composite_enum_domain_array_types(compat: Compat) -> None:
    """Columns of types asyncpg does not know make it run its type introspection query."""

    async def run(user: str) -> list[Any]:
        conn = await asyncpg.connect(url(compat, user))
        try:
            return list(
                await conn.fetch(
                    "SELECT i_customer, name, status, balance, credit_limit, tags, extra, "
                    "ARRAY[credit_limit] AS limits, ARRAY[status] AS statuses "
                    "FROM billing.customers ORDER BY i_customer LIMIT 2"
                )
            )
        finally:
            await conn.close()

    rows = await run(MASKED)
    first = rows[0]
    assert first["status"] == "open" and first["balance"] == decimal.Decimal("12.50")
    assert tuple(first["credit_limit"]) == (decimal.Decimal("500.00"), "EUR")
    assert first["credit_limit"]["currency"] == "EUR"  # a Record: the composite was introspected
    assert first["tags"] == ["vip", "paper"] and first["statuses"] == ["open"]
    assert isinstance(first["extra"], str)  # json without a codec: text
    assert_masked(repr(rows))
    assert_real(repr(await run(UNMASKED)))


async def test_asyncpg_set_type_codec(compat: Compat) -> None:
    conn = await asyncpg.connect(url(compat))
    try:
        for typ in ("json", "jsonb"):
            await conn.set_type_codec(
                typ, encoder=json.dumps, decoder=json.loads, schema="pg_catalog"
            )
        await conn.set_type_codec(
            "money_pair",
            schema="billing",
            encoder=lambda v: v,
            decoder=lambda v: {"amount": v[0], "currency": v[1]},
            format="tuple",
        )
        extra = await conn.fetchval("SELECT extra FROM billing.customers WHERE i_customer = 1")
        assert extra == {"dl": "D***********V", "iban": None, "tier": "gold"}
        limit = await conn.fetchval(
            "SELECT credit_limit FROM billing.customers WHERE i_customer = $1", 1
        )
        assert limit == {"amount": decimal.Decimal("500.00"), "currency": "EUR"}
        assert await conn.fetchval("SELECT $1::jsonb", {"a": [1, 2]}) == {"a": [1, 2]}
        rows = await conn.fetch(CUSTOMERS)
        assert len(rows) == 30 and rows[0]["cc_number"] is None
        assert_masked(repr(rows))
        await conn.reload_schema_state()
        assert await conn.fetchval("SELECT status FROM billing.customers WHERE i_customer = 2")
    finally:
        await conn.close()


async def test_asyncpg_prepared_statement_cursor_and_copy(compat: Compat) -> None:
    conn = await asyncpg.connect(url(compat))
    try:
        stmt = await conn.prepare(
            "SELECT c.name, c.email, a.ip, a.mac FROM billing.customers c "
            "JOIN billing.accounts a USING (i_customer) WHERE c.i_customer = ANY($1::bigint[])"
        )
        assert [a.name for a in stmt.get_attributes()] == ["name", "email", "ip", "mac"]
        prepared = await stmt.fetch([1, 2])
        async with conn.transaction():
            browsed = [r async for r in conn.cursor(CUSTOMERS, prefetch=7)]
        assert len(browsed) == 30
        chunks: list[bytes] = []

        async def sink(data: bytes) -> None:
            chunks.append(data)

        await conn.copy_from_table("customers", schema_name="billing", output=sink)
        await conn.copy_from_query(
            "SELECT name, email, phone FROM billing.customers WHERE i_customer < $1",
            5,
            output=sink,
            format="csv",
        )
        copied = b"".join(chunks).decode()
        assert copied.count("\n") == 30 + 4
        assert_masked(repr(prepared) + repr(browsed) + copied)
    finally:
        await conn.close()


async def test_asyncpg_startup_settings_like_jdbc(compat: Compat) -> None:
    """JDBC-style clients (DBeaver, Metabase) set these in the startup packet."""
    conn = await asyncpg.connect(
        url(compat),
        server_settings={
            "extra_float_digits": "3",
            "DateStyle": "ISO",
            "TimeZone": "UTC",
            "application_name": "DBeaver 24.1",
        },
    )
    try:
        assert await conn.fetchval("SHOW application_name") == "DBeaver 24.1"
        name = await conn.fetchval("SELECT name FROM billing.customers WHERE i_customer = 1")
        assert name == "Z*****************t"
    finally:
        await conn.close()


async def test_asyncpg_set_of_a_guarded_setting_to_its_value(compat: Compat) -> None:
    conn = await asyncpg.connect(url(compat))
    try:
        await conn.execute("SET client_encoding TO 'UTF8'")
        await conn.execute("SET standard_conforming_strings = on")
        assert await conn.fetchval("SHOW client_encoding") == "UTF8"
    finally:
        await conn.close()


# -- psycopg -----------------------------------------------------------------------------------


def connect(compat: Compat, user: str = MASKED) -> psycopg.Connection[Any]:
    return psycopg.connect(compat.dsn(user), autocommit=True)


def test_psycopg_type_info_fetch(compat: Compat) -> None:
    with connect(compat) as conn, connect(compat, UNMASKED) as admin:
        for name in ("billing.amount", "billing.customer_status", "billing.money_pair", "text"):
            info = TypeInfo.fetch(conn, name)
            assert info is not None, name
            other = TypeInfo.fetch(admin, name)
            assert other is not None
            assert (info.oid, info.array_oid, info.name) == (
                other.oid,
                other.array_oid,
                other.name,
            )


def test_psycopg_composite_and_enum_registration(compat: Compat) -> None:
    with connect(compat) as conn:
        composite = CompositeInfo.fetch(conn, "billing.money_pair")
        assert composite is not None and list(composite.field_names) == ["amount", "currency"]
        register_composite(composite, conn)
        enum = EnumInfo.fetch(conn, "billing.customer_status")
        assert enum is not None and enum.labels == ["open", "suspended", "closed"]
        register_enum(enum, conn)
        rows = conn.execute(
            "SELECT name, status, credit_limit, tags FROM billing.customers "
            "ORDER BY i_customer LIMIT 2"
        ).fetchall()
        assert rows[0][1].name == "open" and rows[1][1].name == "suspended"
        assert rows[0][2].currency == "EUR" and rows[0][2].amount == decimal.Decimal("500.00")
        assert_masked(repr(rows))


def test_psycopg_custom_loader_and_binary_results(compat: Compat) -> None:
    with connect(compat) as conn:
        set_json_loads(lambda data: {"decoded": json.loads(data)}, conn)
        extra = conn.execute("SELECT extra FROM billing.customers WHERE i_customer = 1").fetchone()
        assert extra is not None
        assert extra[0] == {"decoded": {"dl": "D***********V", "iban": None, "tier": "gold"}}
        echoed = conn.execute("SELECT %s::jsonb", [Jsonb({"k": "v"})]).fetchone()
        assert echoed == ({"decoded": {"k": "v"}},)
        with conn.cursor(binary=True) as cur:
            binary = cur.execute(CUSTOMERS).fetchall()
            accounts = cur.execute("SELECT * FROM billing.accounts ORDER BY i_account").fetchall()
            ip = [c.name for c in cur.description or ()].index("ip")
        assert len(binary) == 30 and str(accounts[0][ip]) == "198.0.0.222"
        prepared = [
            conn.execute(
                "SELECT name, phone FROM billing.customers WHERE i_customer = %s",
                [i],
                prepare=True,
            ).fetchone()
            for i in (1, 2, 1)
        ]
        assert_masked(repr(binary) + repr(accounts) + repr(prepared))


def test_psycopg_server_side_cursor(compat: Compat) -> None:
    def run(user: str) -> list[Any]:
        with connect(compat, user) as conn, conn.transaction():
            with conn.cursor(name="browse") as cur:
                cur.itersize = 7
                cur.execute(CUSTOMERS)
                rows = list(cur)
            with conn.cursor(name="browse_scroll", scrollable=True) as cur:
                cur.execute("SELECT i_customer, name, email FROM billing.customers ORDER BY 1")
                cur.scroll(10)
                rows += cur.fetchmany(3)
                cur.scroll(0, mode="absolute")
                rows += cur.fetchmany(1)
            return rows

    rows = run(MASKED)
    assert len(rows) == 34 and rows[30][0] == 11 and rows[33][0] == 1
    assert_masked(repr(rows))
    assert_real(repr(run(UNMASKED)))


@pytest.mark.parametrize(
    "statement",
    [
        "COPY billing.customers TO STDOUT",
        "COPY (SELECT * FROM billing.customers c JOIN billing.accounts a USING (i_customer)) "
        "TO STDOUT (FORMAT csv, HEADER)",
        "COPY billing.accounts (i_account, ip, mac) TO STDOUT",
        "COPY billing.accounts (i_account, ip, mac, sip_password) TO STDOUT",
        "COPY billing.xdrs_2024_01 TO STDOUT",
        "COPY (SELECT * FROM billing.customer_contacts) TO STDOUT (FORMAT binary)",
    ],
)
def test_psycopg_copy_to(compat: Compat, statement: str) -> None:
    def run(user: str) -> bytes:
        with connect(compat, user) as conn, conn.cursor() as cur:
            out = b""
            with cur.copy(statement) as copy:
                for data in copy:
                    out += bytes(data)
            return out

    masked = run(MASKED)
    unmasked = run(UNMASKED)
    assert masked.count(b"\n") == unmasked.count(b"\n") and len(masked) > 20
    assert_masked(masked.decode(errors="replace"))
    assert masked != unmasked


def test_psycopg_copy_rows_in_binary(compat: Compat) -> None:
    with connect(compat) as conn, conn.cursor() as cur:
        with cur.copy("COPY billing.accounts TO STDOUT (FORMAT binary)") as copy:
            # the table's columns in order: i_account, i_customer, ip, mac, id (the billing
            # fixture's core), sip_password, blocked, balance (its `compat` part)
            copy.set_types(["int8", "int8", "inet", "macaddr", "text", "text", "bool", "numeric"])
            rows = list(copy.rows())
    assert len(rows) == 30 and all(r[5] is None for r in rows)
    assert "198.0.0.222" in {str(r[2]) for r in rows}
    assert_masked(repr(rows))


def test_psycopg_set_of_a_guarded_setting_to_its_value(compat: Compat) -> None:
    with connect(compat) as conn:
        conn.execute("SET client_encoding TO 'UTF8'")
        conn.execute("SET standard_conforming_strings = on")
        assert conn.info.encoding == "utf-8"
        assert conn.info.parameter_status("standard_conforming_strings") == "on"
