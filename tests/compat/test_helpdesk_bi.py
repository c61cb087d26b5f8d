"""What a helpdesk operator or a BI tool (Metabase, DBeaver, Superset) runs that the ORMs and
psql do not: catalog queries over `information_schema` and `pg_catalog`, statistics views,
sizes, `EXPLAIN`, `SHOW` and `current_setting`, `pg_typeof`, session settings that JDBC-style
clients send, a `LIMIT`ed browse with `ORDER BY` of every table, system columns, and the
errors a user gets for a typo. Run with psycopg as the masked role (and the unmasked role
where the answers must be the same).
"""

from __future__ import annotations

from typing import Any

import psycopg
import pytest
from psycopg import errors

from tests.compat.conftest import (
    DB,
    MASKED,
    UNMASKED,
    Compat,
    assert_masked,
    assert_real,
)

RELATIONS = [
    "accounts", "customer_classes", "customers", "xdrs", "xdrs_2024_01", "xdrs_2024_02",
    "customer_contacts",
]  # fmt: skip

CATALOG_QUERIES = {
    # Metabase's sync, in spirit: tables, columns, keys from information_schema
    "information_schema.tables": (
        "SELECT table_schema, table_name, table_type FROM information_schema.tables "
        "WHERE table_schema = 'billing' ORDER BY 1, 2"
    ),
    "information_schema.columns": (
        "SELECT table_name, column_name, ordinal_position, data_type, udt_name, is_nullable, "
        "column_default, character_maximum_length, numeric_precision "
        "FROM information_schema.columns WHERE table_schema = 'billing' ORDER BY 1, 3"
    ),
    "information_schema keys": (
        "SELECT tc.table_name, tc.constraint_type, kcu.column_name, ccu.table_name AS target "
        "FROM information_schema.table_constraints tc "
        "JOIN information_schema.key_column_usage kcu "
        "  ON kcu.constraint_schema = tc.constraint_schema "
        " AND kcu.constraint_name = tc.constraint_name "
        "LEFT JOIN information_schema.constraint_column_usage ccu "
        "  ON ccu.constraint_schema = tc.constraint_schema "
        " AND ccu.constraint_name = tc.constraint_name AND tc.constraint_type = 'FOREIGN KEY' "
        "WHERE tc.table_schema = 'billing' ORDER BY 1, 2, 3, 4"
    ),
    # DBeaver's navigator, in spirit: pg_class rows whole, attributes with defaults and
    # comments, indexes and constraints with their definitions
    "pg_class": (
        "SELECT c.oid, c.*, d.description FROM pg_catalog.pg_class c "
        "LEFT JOIN pg_catalog.pg_description d ON d.objoid = c.oid AND d.objsubid = 0 "
        " AND d.classoid = 'pg_catalog.pg_class'::regclass "
        "WHERE c.relnamespace = 'billing'::regnamespace ORDER BY c.relname"
    ),
    "pg_attribute": (
        "SELECT c.relname, a.attname, a.attnum, pg_catalog.format_type(a.atttypid, a.atttypmod), "
        "a.attnotnull, pg_catalog.pg_get_expr(ad.adbin, ad.adrelid, true) AS def_value, "
        "pg_catalog.col_description(c.oid, a.attnum) "
        "FROM pg_catalog.pg_attribute a JOIN pg_catalog.pg_class c ON a.attrelid = c.oid "
        "LEFT JOIN pg_catalog.pg_attrdef ad ON a.attrelid = ad.adrelid AND a.attnum = ad.adnum "
        "WHERE c.relnamespace = 'billing'::regnamespace AND a.attnum > 0 "
        "AND NOT a.attisdropped ORDER BY 1, 3"
    ),
    "pg_index and pg_constraint": (
        "SELECT i.indexrelid::regclass::text, pg_catalog.pg_get_indexdef(i.indexrelid), "
        "i.indisunique, i.indisprimary FROM pg_catalog.pg_index i "
        "JOIN pg_catalog.pg_class c ON c.oid = i.indrelid "
        "WHERE c.relnamespace = 'billing'::regnamespace "
        "UNION ALL SELECT conname::text, pg_catalog.pg_get_constraintdef(oid), NULL, NULL "
        "FROM pg_catalog.pg_constraint WHERE connamespace = 'billing'::regnamespace "
        "ORDER BY 1"
    ),
    "types": (
        "SELECT t.typname, t.typtype, e.enumlabel, pg_catalog.format_type(t.typbasetype, NULL) "
        "FROM pg_catalog.pg_type t LEFT JOIN pg_catalog.pg_enum e ON e.enumtypid = t.oid "
        "WHERE t.typnamespace = 'billing'::regnamespace ORDER BY 1, e.enumsortorder"
    ),
    "partitions": (
        "SELECT ppt.relid::regclass::text, ppt.parentrelid::regclass::text, ppt.isleaf, "
        "ppt.level, pg_catalog.pg_get_expr(c.relpartbound, c.oid) "
        "FROM pg_catalog.pg_partition_tree('billing.xdrs') ppt "
        "JOIN pg_catalog.pg_class c ON c.oid = ppt.relid ORDER BY 1"
    ),
    "roles and settings": (
        "SELECT r.rolname, r.rolsuper, r.rolcanlogin FROM pg_catalog.pg_roles r "
        "WHERE r.rolname LIKE 'compat%' ORDER BY 1"
    ),
}


def connect(compat: Compat, user: str = MASKED, **kwargs: Any) -> psycopg.Connection[Any]:
    return psycopg.connect(compat.dsn(user), autocommit=True, **kwargs)


def rows(compat: Compat, sql: str, user: str = MASKED) -> list[tuple[Any, ...]]:
    with connect(compat, user) as conn:
        return conn.execute(sql).fetchall()  # type: ignore[arg-type]


@pytest.mark.parametrize("name", list(CATALOG_QUERIES))
def test_catalog_query(compat: Compat, name: str) -> None:
    sql = CATALOG_QUERIES[name]
    masked = rows(compat, sql)
    assert masked, name
    assert masked == rows(compat, sql, UNMASKED)


def test_catalog_queries_see_the_schema(compat: Compat) -> None:
    columns = rows(compat, CATALOG_QUERIES["information_schema.columns"])
    assert ("customers", "cc_number") in {(r[0], r[1]) for r in columns}
    partitions = rows(compat, CATALOG_QUERIES["partitions"])
    assert [(r[0], r[2]) for r in partitions] == [
        ("xdrs", False),
        ("xdrs_2024_01", True),
        ("xdrs_2024_02", True),
    ]


def test_statistics_and_sizes(compat: Compat) -> None:
    """Statistics views without values and size functions (monitoring dashboards)."""
    with connect(compat) as conn:
        tables = conn.execute(
            "SELECT relname, n_live_tup, seq_scan, n_tup_upd FROM pg_stat_user_tables "
            "ORDER BY relname"
        ).fetchall()
        io = conn.execute("SELECT relname, heap_blks_read FROM pg_statio_user_tables").fetchall()
        database = conn.execute(
            "SELECT datname, numbackends, xact_commit FROM pg_stat_database "
            "WHERE datname = current_database()"
        ).fetchall()
        sizes = conn.execute(
            "SELECT pg_size_pretty(pg_total_relation_size('billing.customers')), "
            "pg_database_size(current_database()) > 0, pg_relation_size('billing.accounts'), "
            "(SELECT reltuples FROM pg_class WHERE oid = 'billing.customers'::regclass)"
        ).fetchone()
        locks = conn.execute("SELECT locktype, mode, granted FROM pg_locks").fetchall()
    assert (
        "customers" in {t[0] for t in tables}
        and io
        and database == [(DB, database[0][1], database[0][2])]
    )
    assert sizes is not None and sizes[1] is True and sizes[3] == 30
    assert locks
    assert_masked(repr(tables) + repr(io) + repr(sizes))


@pytest.mark.parametrize("relation", RELATIONS)
def test_browse_every_table(compat: Compat, relation: str) -> None:
    """A BI tool's data preview: the first rows of each table, sorted."""
    sql = f"SELECT * FROM billing.{relation} ORDER BY 1 LIMIT 5"
    masked = rows(compat, sql)
    unmasked = rows(compat, sql, UNMASKED)
    assert len(masked) == len(unmasked) > 0
    assert_masked(repr(masked))
    if relation in ("customers", "customer_contacts"):
        assert_real(repr(unmasked))


def test_explain(compat: Compat) -> None:
    with connect(compat) as conn:
        plans = [
            conn.execute(sql).fetchall()
            for sql in (
                "EXPLAIN SELECT * FROM billing.accounts WHERE i_customer = 1",
                "EXPLAIN (VERBOSE) SELECT * FROM billing.accounts ORDER BY ip",
                "EXPLAIN (FORMAT JSON) SELECT id, ip FROM billing.accounts",
                "EXPLAIN ANALYZE SELECT * FROM billing.xdrs WHERE cli LIKE '+4%'",
                "EXPLAIN SELECT * FROM billing.customer_classes",
            )
        ]
    assert "Seq Scan on accounts" in repr(plans[0])
    assert "set_masklen" in repr(plans[1])  # the mask runs in the database: the plan shows it
    assert_masked(repr(plans))


def test_explain_of_a_hash_masked_column_is_refused(compat: Compat) -> None:
    """By design (README, Known limits): the plan would show the hash mask's key pads."""
    with connect(compat) as conn, pytest.raises(errors.InsufficientPrivilege) as exc:
        conn.execute("EXPLAIN SELECT * FROM billing.customers")
    assert str(exc.value) == "pgveil: EXPLAIN of a statement that reads hash-masked columns"


def test_show_settings_and_types(compat: Compat) -> None:
    with connect(compat) as conn:
        shown = conn.execute("SHOW search_path").fetchone()
        settings = conn.execute(
            "SELECT current_setting('server_version_num')::int, version(), current_user, "
            "current_database(), current_schema(), pg_backend_pid() > 0, "
            "current_setting('TimeZone'), pg_catalog.pg_is_in_recovery()"
        ).fetchone()
        types = conn.execute(
            "SELECT pg_typeof(name), pg_typeof(extra), pg_typeof(status), "
            "pg_typeof(credit_limit), pg_typeof(balance), pg_typeof(tags) "
            "FROM billing.customers LIMIT 1"
        ).fetchone()
    assert shown == ("billing, public",)
    assert settings is not None and settings[2] == MASKED and settings[3] == DB
    assert types is not None and [str(t) for t in types] == [
        "character varying", "jsonb", "customer_status", "money_pair", "amount", "text[]",
    ]  # fmt: skip


def test_session_settings_clients_send(compat: Compat) -> None:
    with connect(compat, options="-c search_path=billing") as conn:
        for sql in (
            "SET application_name = 'Metabase'",
            "SET statement_timeout = '30s'",
            "SET datestyle = 'ISO, MDY'",
            "SET TIME ZONE 'UTC'",
            "SET extra_float_digits = 3",
            "SET SESSION CHARACTERISTICS AS TRANSACTION READ ONLY",
        ):
            conn.execute(sql)  # type: ignore[arg-type]
        assert conn.execute("SHOW search_path").fetchone() == ("billing",)
        conn.execute("BEGIN READ ONLY")
        conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
        name = conn.execute("SELECT name FROM customers WHERE i_customer = 1").fetchone()
        conn.execute("COMMIT")
    assert name == ("Z*****************t",)


@pytest.mark.parametrize(
    ("sql", "hint"),
    [
        ("SELECT nme FROM billing.customers", '"customers.name"'),
        ("SELECT emial FROM billing.customers c", '"c.email"'),
        (
            "SELECT i_custmer FROM billing.accounts a JOIN billing.customers c USING (i_customer)",
            '"a.i_customer" or the column "c.i_customer"',
        ),
    ],
)
def test_a_column_hint_names_the_column(compat: Compat, sql: str, hint: str) -> None:
    with connect(compat) as conn, pytest.raises(errors.UndefinedColumn) as exc:
        conn.execute(sql)  # type: ignore[arg-type]
    assert exc.value.diag.message_hint == f"Perhaps you meant to reference the column {hint}."


# -- system columns and the session's own activity row ------------------------------------------


def test_system_columns_and_xmin_as_a_concurrency_token(compat: Compat) -> None:
    with connect(compat) as conn:
        row = conn.execute(
            "SELECT xmin::text, ctid, tableoid::regclass::text, name "
            "FROM billing.customers WHERE i_customer = 7"
        ).fetchone()
        assert row is not None and row[2] == "customers"
        updated = conn.execute(
            "UPDATE billing.customers SET notes = 'checked' WHERE i_customer = 7 "
            "AND xmin = %s::xid",
            [row[0]],
        ).rowcount
        assert updated == 1
        stale = conn.execute(
            "UPDATE billing.customers SET notes = 'again' WHERE i_customer = 7 AND xmin = %s::xid",
            [row[0]],
        ).rowcount
        assert stale == 0
        account = conn.execute(
            "SELECT ctid, xmin::text, ip FROM billing.accounts WHERE i_account = 10"
        ).fetchone()
        assert account is not None
    assert_masked(repr(row) + repr(account))


def test_own_activity_row(compat: Compat) -> None:
    with connect(compat) as conn:
        row = conn.execute(
            "SELECT pid, usename, datname, state, query "
            "FROM pg_stat_activity WHERE pid = pg_backend_pid()"
        ).fetchone()
    assert row is not None and row[1] == MASKED and row[2] == DB
    assert row[4] is None  # the query text may hold literals of personal data


def test_pg_stats_without_values(compat: Compat) -> None:
    with connect(compat) as conn:
        stats = conn.execute(
            "SELECT attname, null_frac, n_distinct, most_common_vals::text, "
            "histogram_bounds::text FROM pg_stats "
            "WHERE schemaname = 'billing' AND tablename = 'customers' ORDER BY attname"
        ).fetchall()
    assert "name" in {s[0] for s in stats}
    assert all(s[3] is None and s[4] is None for s in stats)
    assert_masked(repr(stats))


def test_vacuum_and_analyze_of_a_table_without_rules(compat: Compat) -> None:
    with connect(compat) as conn:
        conn.execute("ANALYZE billing.customer_classes")
        conn.execute("VACUUM billing.customer_classes")


def _error(compat: Compat, sql: str, port: int) -> psycopg.Error:
    dsn = compat.dsn().replace(f"port={compat.port}", f"port={port}")
    with psycopg.connect(dsn, autocommit=True) as conn:
        try:
            conn.execute(sql)  # type: ignore[arg-type]
        except psycopg.Error as exc:
            return exc
    raise AssertionError(f"no error for {sql}")


@pytest.mark.parametrize(
    "sql",
    [
        "SELECT * FROM billing.custmers",
        "SELECT customers.nam FROM billing.customers",
        "SELEC name FROM billing.customers",
        "SELECT name FROM billing.customers WHERE",
        # the constraint's name is an identifier from the catalog, not a value
        "INSERT INTO billing.customers (i_customer, i_customer_class, name) VALUES (1, 1, 'x')",
    ],
)
def test_the_servers_error_for_a_typo(compat: Compat, sql: str) -> None:
    """A misspelled table or column, a syntax error, a duplicate key: the server's own
    SQLSTATE, message and position, as the same role gets them from PostgreSQL directly."""
    through = _error(compat, sql, compat.port)
    direct = _error(compat, sql, compat.pg.port)
    assert through.sqlstate == direct.sqlstate
    assert through.diag.message_primary == direct.diag.message_primary
    assert through.diag.statement_position == direct.diag.statement_position
