"""SQLAlchemy 2 and pandas as a masked role: Inspector reflection, Core `select(table)` of
whole tables, ORM (automap) selects and relationships, updates of non-personal columns, the
psycopg (3) and asyncpg dialects, and pandas `read_sql*` through SQLAlchemy.

Reflection reads only the catalog, so the masked role must see exactly what the unmasked
role sees; selects must return the masked values (and the unmasked run the real ones).
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from typing import Any

import pandas as pd
import psycopg
import pytest
import sqlalchemy as sa
from sqlalchemy.exc import SAWarning
from sqlalchemy.ext.asyncio import create_async_engine
from sqlalchemy.ext.automap import automap_base
from sqlalchemy.orm import Session

from tests.compat.conftest import (
    DB,
    MASKED,
    SIP_PASSWORD,
    UNMASKED,
    Compat,
    assert_masked,
    assert_real,
)
from tests.integration.masking_fixture import NAME

TABLES = ["accounts", "customer_classes", "customers", "xdrs", "xdrs_2024_01", "xdrs_2024_02"]


@pytest.fixture(scope="module")
def engines(compat: Compat) -> Iterator[dict[str, sa.Engine]]:
    e = {
        "masked": sa.create_engine(compat.url(MASKED)),
        "unmasked": sa.create_engine(compat.url(UNMASKED)),
    }
    yield e
    for engine in e.values():
        engine.dispose()


@pytest.fixture(scope="module")
def metadata(engines: dict[str, sa.Engine]) -> sa.MetaData:
    """The schema reflected as the masked role (the composite column's type is unknown to
    SQLAlchemy, which says so in a warning)."""
    md = sa.MetaData(schema="billing")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SAWarning)
        md.reflect(engines["masked"], views=True)
    return md


def reflect(engine: sa.Engine) -> dict[str, Any]:
    """Everything the Inspector says about the billing schema."""
    insp = sa.inspect(engine)
    out: dict[str, Any] = {
        "schemas": insp.get_schema_names(),
        "tables": sorted(insp.get_table_names(schema="billing")),
        "views": insp.get_view_names(schema="billing"),
        "enums": insp.get_enums(schema="billing"),
        "domains": insp.get_domains(schema="billing"),
    }
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SAWarning)
        for t in [*out["tables"], *out["views"]]:
            out[t] = {
                "columns": [
                    (c["name"], str(c["type"]), c["nullable"], c["default"])
                    for c in insp.get_columns(t, schema="billing")
                ],
                "pk": insp.get_pk_constraint(t, schema="billing"),
                "fks": insp.get_foreign_keys(t, schema="billing"),
                "indexes": insp.get_indexes(t, schema="billing"),
                "uniques": insp.get_unique_constraints(t, schema="billing"),
                "checks": insp.get_check_constraints(t, schema="billing"),
                "comment": insp.get_table_comment(t, schema="billing"),
            }
    return out


def test_inspector_reflection(engines: dict[str, sa.Engine]) -> None:
    masked = reflect(engines["masked"])
    assert masked == reflect(engines["unmasked"])
    assert masked["tables"] == TABLES
    assert masked["views"] == ["customer_contacts"]
    assert [e["name"] for e in masked["enums"]] == ["customer_status"]
    assert [d["name"] for d in masked["domains"]] == ["amount"]
    customers = masked["customers"]
    assert [c[0] for c in customers["columns"]][:6] == [
        "i_customer", "i_customer_class", "name", "email", "phone", "cc_number",
    ]  # fmt: skip
    assert customers["pk"]["constrained_columns"] == ["i_customer"]
    assert customers["fks"][0]["referred_table"] == "customer_classes"
    assert {i["name"] for i in customers["indexes"]} == {
        "customers_class_idx",
        "customers_email_key",
    }
    assert customers["comment"] == {"text": "one row per customer"}
    assert masked["xdrs"]["pk"]["constrained_columns"] == ["i_xdr", "connect_time"]
    assert_masked(repr(masked))


def test_metadata_reflects_every_table(metadata: sa.MetaData) -> None:
    assert sorted(metadata.tables) == sorted(
        [f"billing.{t}" for t in TABLES] + ["billing.customer_contacts"]
    )
    assert "sip_password" in metadata.tables["billing.accounts"].c


def _select_all(engine: sa.Engine, table: sa.Table) -> list[Any]:
    with engine.connect() as conn:
        return list(conn.execute(sa.select(table).order_by(*table.primary_key.columns or [])))


@pytest.mark.parametrize(
    "name",
    [*TABLES, "customer_contacts"],
)
def test_core_select_of_a_whole_table(
    engines: dict[str, sa.Engine], metadata: sa.MetaData, name: str
) -> None:
    table = metadata.tables[f"billing.{name}"]
    masked = _select_all(engines["masked"], table)
    unmasked = _select_all(engines["unmasked"], table)
    assert len(masked) == len(unmasked) > 0
    assert_masked(repr(masked))
    if name in ("customers", "customer_contacts"):
        assert_real(repr(unmasked))
    for deny in ("cc_number", "sip_password"):
        if deny in table.c:
            assert all(getattr(r, deny) is None for r in masked)


def test_core_select_of_columns_and_a_join(
    engines: dict[str, sa.Engine], metadata: sa.MetaData
) -> None:
    c = metadata.tables["billing.customers"]
    a = metadata.tables["billing.accounts"]
    x = metadata.tables["billing.xdrs"]
    stmt = (
        sa.select(c.c.i_customer, c.c.name, c.c.email, a.c.id, a.c.ip, x.c.cli, x.c.charged)
        .join_from(c, a, c.c.i_customer == a.c.i_customer)
        .join(x, x.c.i_account == a.c.i_account)
        .where(c.c.name.like("Z%"))
        .order_by(x.c.i_xdr)
    )

    def run(engine: sa.Engine) -> list[Any]:
        with engine.connect() as conn:
            return list(conn.execute(stmt))

    masked, unmasked = run(engines["masked"]), run(engines["unmasked"])
    assert [r.id for r in masked] == [r.id for r in unmasked] == ["ACC-10", "ACC-10"]
    assert_masked(repr(masked))
    assert_real(repr(unmasked))


@pytest.fixture(scope="module")
def automap(metadata: sa.MetaData) -> Any:
    base = automap_base(metadata=metadata)
    base.prepare()
    return base


def test_orm_get_and_relationships(engines: dict[str, sa.Engine], automap: Any) -> None:
    customers, classes = automap.classes.customers, automap.classes.customer_classes

    def run(engine: sa.Engine) -> str:
        with Session(engine) as s:
            c = s.get(customers, 1)
            assert c is not None
            accounts = list(c.accounts_collection)
            xdrs = [x for a in accounts for x in a.xdrs_collection]
            cls = s.scalars(sa.select(classes).order_by(classes.i_customer_class)).first()
            members = list(cls.customers_collection)
            assert [a.id for a in accounts] == ["ACC-10"] and len(xdrs) == 2
            assert c.cc_number is None or engine.url.username == UNMASKED
            return repr(
                [c.name, c.email, c.phone, c.login, c.extra, c.cc_number]
                + [(a.ip, a.mac, a.sip_password) for a in accounts]
                + [x.cli for x in xdrs]
                + [(m.name, m.email, m.cc_number) for m in members]
            )

    assert_masked(run(engines["masked"]))
    real = run(engines["unmasked"])
    assert_real(real)
    assert SIP_PASSWORD in real


def test_orm_select_of_a_table_without_deny_columns(
    engines: dict[str, sa.Engine], automap: Any
) -> None:
    xdrs = automap.classes.xdrs
    with Session(engines["masked"]) as s:
        rows = list(s.scalars(sa.select(xdrs).order_by(xdrs.i_xdr).limit(2)))
    assert [r.i_xdr for r in rows] == [1, 2]
    assert all(r.cli == "+**********56" for r in rows)


def test_core_update_of_a_non_personal_column(
    engines: dict[str, sa.Engine], metadata: sa.MetaData, compat: Compat
) -> None:
    c = metadata.tables["billing.customers"]
    with engines["masked"].begin() as conn:
        n = conn.execute(sa.update(c).where(c.c.i_customer == 5).values(notes="sa core")).rowcount
    assert n == 1
    with psycopg.connect(compat.pg.dsn(dbname=DB) + " sslmode=disable") as conn:
        stored = conn.execute(
            "SELECT notes, name FROM billing.customers WHERE i_customer = 5"
        ).fetchone()
    assert stored == ("sa core", "Customer 000005")


def test_orm_update_of_a_non_personal_column(
    engines: dict[str, sa.Engine], automap: Any, compat: Compat
) -> None:
    customers = automap.classes.customers
    with Session(engines["masked"]) as s:
        c = s.get(customers, 6)
        assert c is not None
        c.notes = "sa orm"
        s.commit()
    with psycopg.connect(compat.pg.dsn(dbname=DB) + " sslmode=disable") as conn:
        stored = conn.execute(
            "SELECT notes, name, email FROM billing.customers WHERE i_customer = 6"
        ).fetchone()
    assert stored == ("sa orm", "Customer 000006", "customer000006@example.invalid")


@pytest.mark.parametrize("driver", ["postgresql+asyncpg", "postgresql+psycopg"])
async def test_async_dialects(compat: Compat, metadata: sa.MetaData, driver: str) -> None:
    classes = metadata.tables["billing.customer_classes"]

    async def run(user: str) -> tuple[list[Any], list[Any], list[str]]:
        engine = create_async_engine(compat.url(user, driver))
        try:
            async with engine.connect() as conn:
                text = await conn.execute(
                    sa.text("SELECT * FROM billing.customers ORDER BY i_customer LIMIT 3")
                )
                core = await conn.execute(sa.select(classes).order_by(classes.c.i_customer_class))
                tables = await conn.run_sync(
                    lambda sync: sa.inspect(sync).get_table_names(schema="billing")
                )
                return list(text), list(core), tables
        finally:
            await engine.dispose()

    rows, classes_rows, tables = await run(MASKED)
    assert [r.i_customer for r in rows] == [1, 2, 3] and rows[0].cc_number is None
    assert [r.name for r in classes_rows] == ["European Customers", "Wholesale"]
    assert sorted(tables) == TABLES
    assert_masked(repr(rows))
    assert_real(repr((await run(UNMASKED))[0]))


# -- pandas ------------------------------------------------------------------------------------


def test_pandas_read_sql_and_read_sql_query(engines: dict[str, sa.Engine]) -> None:
    def run(engine: sa.Engine) -> str:
        df = pd.read_sql("SELECT * FROM billing.customers ORDER BY i_customer", engine)
        assert df.shape == (30, 14)
        q = pd.read_sql_query(
            sa.text(
                "SELECT c.name, c.email, a.ip::text AS ip, x.cli FROM billing.customers c "
                "JOIN billing.accounts a USING (i_customer) "
                "LEFT JOIN billing.xdrs x USING (i_account) WHERE c.i_customer = :id"
            ),
            engine,
            params={"id": 1},
        )
        assert len(q) == 2
        return df.to_csv() + q.to_csv()

    masked = run(engines["masked"])
    assert_masked(masked)
    assert NAME not in masked
    assert_real(run(engines["unmasked"]))


@pytest.mark.parametrize(
    "name",
    ["customers", "accounts", "xdrs", "customer_classes", "customer_contacts"],
)
def test_pandas_read_sql_table(engines: dict[str, sa.Engine], name: str) -> None:
    def run(engine: sa.Engine) -> pd.DataFrame:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", SAWarning)
            return pd.read_sql_table(name, engine, schema="billing")

    masked, unmasked = run(engines["masked"]), run(engines["unmasked"])
    assert masked.shape == unmasked.shape and len(masked) > 0
    assert list(masked.columns) == list(unmasked.columns)
    assert_masked(masked.to_csv())
    if name in ("customers", "customer_contacts"):
        assert_real(unmasked.to_csv())
