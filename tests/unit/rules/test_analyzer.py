"""The analyser decides pass / rewrite / refuse; the rewritten SQL masks at the source."""

from __future__ import annotations

import pytest

from tests.unit.rules.fixtures import analyzer

AN = analyzer()


@pytest.mark.parametrize(
    "sql",
    [
        "SELECT 1",
        "SELECT * FROM public.notes WHERE id = 3",
        "SELECT i_account FROM billing.xdrs_2024",
        "BEGIN",
        "COMMIT",
        "SHOW search_path",
        "SET search_path = billing, public",
        "LISTEN x",
        "NOTIFY x, 'y'",
    ],
)
def test_pass(sql: str) -> None:
    d = AN.analyze(sql)
    assert d.action == "pass", d.reason


@pytest.mark.parametrize(
    "sql",
    [
        "SELECT name FROM billing.customers",
        "SELECT * FROM billing.customers c WHERE c.email LIKE 'z%'",
        "SELECT upper(c.name), a.i_account FROM billing.customers c JOIN billing.accounts a USING (i_customer)",
        "SELECT row_to_json(c) FROM billing.customers c",
        "SELECT billing.customers.name FROM billing.customers",
        "SELECT name FROM customers",
        "WITH x AS (SELECT name FROM billing.customers) SELECT * FROM x",
        "SELECT * FROM (SELECT name FROM billing.customers) s",
        "SELECT (SELECT max(name) FROM billing.customers)",
        "SELECT name FROM billing.customers UNION SELECT body FROM notes",
        "TABLE billing.customers",
        "SELECT * FROM ONLY billing.customers",
        "SELECT * FROM billing.customers_eu",
        "SELECT * FROM billing.customers TABLESAMPLE SYSTEM (50)",
        "DECLARE c CURSOR FOR SELECT name FROM billing.customers",
        "PREPARE p AS SELECT name FROM billing.customers WHERE i_customer = $1",
        "COPY billing.customers TO STDOUT",
        "COPY billing.customers (name, email) TO STDOUT WITH (FORMAT csv)",
        "COPY (SELECT name FROM billing.customers) TO STDOUT",
        "CREATE TEMP TABLE t AS SELECT name FROM billing.customers",
        "SELECT name INTO TEMP t2 FROM billing.customers",
        "CREATE TEMP VIEW v AS SELECT name, email FROM billing.customers",
        "CREATE TEMP TABLE t3 AS SELECT * FROM billing.customers",
        "SELECT x.name FROM billing.customers x, LATERAL (SELECT x.email) y",
        "EXPLAIN SELECT ip FROM billing.accounts",
    ],
)
def test_rewrite(sql: str) -> None:
    d = AN.analyze(sql)
    assert d.action == "rewrite", d.reason
    assert (d.sql is not None and "billing.customers" in d.tables) or "billing.accounts" in d.tables


def test_rewrite_shape() -> None:
    d = AN.analyze("SELECT upper(c.name) FROM billing.customers c WHERE c.email LIKE 'z%'")
    assert d.sql is not None
    assert d.sql.startswith("SELECT pg_catalog.upper(c.name) FROM (SELECT i_customer, CAST(")
    assert ") AS c WHERE c.email LIKE 'z%'" in d.sql
    assert "billing.customers.name" in d.columns and "billing.customers.email" in d.columns


def test_three_part_names_become_the_alias() -> None:
    d = AN.analyze("SELECT billing.customers.name FROM billing.customers")
    assert d.sql is not None and "SELECT customers.name FROM (SELECT" in d.sql


@pytest.mark.parametrize(
    ("sql", "reason"),
    [
        ("DO $$ BEGIN RAISE NOTICE 'x'; END $$", "DO blocks"),
        ("SELECT query_to_xml('select * from billing.customers', true, true, '')", "query_to_xml"),
        ("SELECT table_to_xml('billing.customers', true, true, '')", "table_to_xml"),
        ("SELECT * FROM dblink('x', 'select 1') AS t(a int)", "dblink"),
        ("SELECT billing.leak()", "function billing.leak is not allowed"),
        ("SELECT lower('x')", "function lower is not allowed"),  # public.lower may shadow it
        ("SELECT * FROM pg_stats", "pg_stats"),
        ("SELECT query FROM pg_catalog.pg_stat_activity", "pg_stat_activity"),
        ("SET ROLE billing_admin", "role"),
        ("SET SESSION AUTHORIZATION billing_admin", "session_authorization"),
        ("SELECT set_config('role', 'x', false)", "role"),
        ("SELECT set_config(current_setting('x'), 'y', false)", "computed setting name"),
        ("SET standard_conforming_strings = off", "standard_conforming_strings"),
        ("SET client_encoding = 'SJIS'", "client_encoding"),
        ("SELECT lo_get(1234)", "lo_get"),
        ("SELECT current_query()", "current_query"),
        ("CREATE FUNCTION f() RETURNS int LANGUAGE sql AS 'select 1'", "not allowed"),
        ("MERGE INTO billing.customers c USING notes n ON false WHEN MATCHED THEN DELETE", "MERGE"),
        ("SELEC 1", "cannot parse"),
        ("SELECT * FROM billing.customer_view", "view billing.customer_view"),
        ("COPY billing.customers TO '/tmp/x'", "server file"),
        ("UPDATE billing.customers SET notes = name", "read personal columns"),
        ("UPDATE billing.customers SET name = upper(name)", "read personal columns"),
        ("INSERT INTO notes (body) SELECT name FROM billing.customers", "read personal columns"),
        (
            "INSERT INTO notes (body) SELECT row_to_json(c)::text FROM billing.customers c",
            "read personal columns",
        ),
        ("SELECT 1 ==== 2", "operator"),
        ("SELECT ts_stat('select 1')", "ts_stat"),
        ("EXPLAIN SELECT login FROM billing.customers", "hash"),
        ("CREATE VIEW v AS SELECT login FROM billing.customers", "masking key"),
        ("CREATE VIEW v AS SELECT * FROM billing.customers", "masking key"),
        ("CREATE MATERIALIZED VIEW mv AS SELECT login FROM billing.customers", "masking key"),
    ],
)
def test_refuse(sql: str, reason: str) -> None:
    d = AN.analyze(sql)
    assert d.action == "refuse"
    assert d.reason is not None and reason in d.reason


def test_allowed_user_function() -> None:
    assert AN.analyze("SELECT billing.invoice_total(1)").action == "pass"


def test_update_masks_where_and_keeps_written_back_originals() -> None:
    d = AN.analyze(
        "UPDATE billing.customers SET name = $1, email = $2 WHERE email = $3 RETURNING *"
    )
    assert d.action == "rewrite" and d.sql is not None
    assert "CASE WHEN $1 IS NOT DISTINCT FROM" in d.sql
    assert "THEN customers.name ELSE $1 END" in d.sql
    # WHERE compares the masked e-mail
    where = d.sql.split(" WHERE ", 1)[1]
    assert where.startswith("CAST(") and "strpos(customers.email" in where


def test_delete_and_insert_returning_are_masked() -> None:
    d = AN.analyze("DELETE FROM billing.customers c WHERE c.name = 'x' RETURNING c.name, balance")
    assert d.action == "rewrite" and d.sql is not None and "RETURNING CAST(" in d.sql
    d = AN.analyze("INSERT INTO billing.customers (name, email) VALUES ('a', 'b') RETURNING name")
    assert d.action == "rewrite" and d.sql is not None and "RETURNING CAST(" in d.sql
    d = AN.analyze(
        "INSERT INTO billing.customers (name) VALUES ('a') ON CONFLICT (i_customer) DO UPDATE SET name = EXCLUDED.name"
    )
    assert d.action == "pass"


def test_ambiguous_unqualified_name_is_refused_when_shapes_differ() -> None:
    # customers_eu has the same shape: an unqualified 'customers' is fine
    assert AN.analyze("SELECT * FROM customers").action == "rewrite"


def test_builtin_calls_are_pinned_to_pg_catalog() -> None:
    # an overload created after the catalog was read can never be chosen instead
    d = AN.analyze("SELECT upper(body), count(*) FROM notes")
    assert (
        d.action == "rewrite"
        and d.sql == "SELECT pg_catalog.upper(body), pg_catalog.count(*) FROM notes"
    )


def test_execute_fetch_and_move_name_what_they_use_in_the_effects() -> None:
    """`uses` (EXECUTE, FETCH) and `moves` (MOVE: it reads no rows, but a masked session
    checks the cursor it positions as a FETCH's) come from the statement's effects, which
    the statement log follows names with (a MOVE of no such cursor fails, as a FETCH)."""
    d = AN.analyze("EXECUTE p; FETCH 2 FROM c; MOVE ALL IN c; CREATE TEMP TABLE t AS EXECUTE q")
    assert d.effects == (
        (("execute", "p"),),
        (("fetch", "c"),),
        (("move", "c"),),
        (("execute", "q"),),
    )
    assert d.uses == ("statement:p", "portal:c", "statement:q")
    assert d.moves == ("portal:c",)
    assert AN.analyze("SELECT 1").moves == ()
