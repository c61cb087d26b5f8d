"""The analyser: deny columns read as NULL of their type, only NULL written into them (a guard
the server evaluates), the audit's denied columns; system columns carried by the masking
subquery when a statement names them. (Against a server: tests/integration/
test_deny_as_null.py and test_system_columns.py.)"""

from __future__ import annotations

import pytest

from tests.unit.rules.fixtures import analyzer

AN = analyzer()
DENIED = ("billing.customers.cc_number",)
GUARD = "pgveil_deny_write billing.customers.cc_number"


@pytest.mark.parametrize(
    "sql",
    [
        "SELECT cc_number FROM billing.customers",
        "SELECT c.cc_number FROM billing.customers c",
        "SELECT billing.customers.cc_number FROM billing.customers",
        "SELECT * FROM billing.customers WHERE cc_number = 'x' ORDER BY cc_number",
        "SELECT count(*) FROM billing.customers GROUP BY cc_number",
        "SELECT to_json(c) FROM billing.customers c",
        "SELECT 1 FROM billing.customers JOIN billing.customers d USING (cc_number)",
        "WITH x AS (SELECT cc_number FROM billing.customers) SELECT * FROM x",
        "COPY (SELECT cc_number FROM billing.customers) TO STDOUT",
        "COPY billing.customers (cc_number) TO STDOUT",
        "DECLARE c CURSOR FOR SELECT cc_number FROM billing.customers",
    ],
)
def test_reads_become_null_of_the_type(sql: str) -> None:
    d = AN.analyze(sql)
    assert d.action == "rewrite", d.reason
    assert d.sql is not None and "CAST(NULL AS text) AS cc_number" in d.sql
    assert "billing.customers.cc_number" in d.columns and d.denied == DENIED


@pytest.mark.parametrize(
    ("sql", "null"),
    [
        (
            "UPDATE billing.customers SET balance = 0 WHERE cc_number = $1 RETURNING cc_number",
            "WHERE CAST(NULL AS text) = $1 RETURNING CAST(NULL AS text) AS cc_number",
        ),
        (
            "DELETE FROM billing.customers c WHERE c.cc_number LIKE 'x%'",
            "WHERE CAST(NULL AS text) LIKE 'x%'",
        ),
        (
            "INSERT INTO billing.customers (i_customer) VALUES (1) ON CONFLICT (i_customer) "
            "DO UPDATE SET balance = 0 WHERE customers.cc_number = 'x'",
            "WHERE CAST(NULL AS text) = 'x'",
        ),
    ],
)
def test_a_writes_own_target_reads_null(sql: str, null: str) -> None:
    d = AN.analyze(sql)
    assert d.action == "rewrite", d.reason
    assert d.sql is not None and null in d.sql, d.sql
    assert d.denied == DENIED


@pytest.mark.parametrize(
    "sql",
    [
        "UPDATE billing.customers SET cc_number = $1 WHERE i_customer = $2",
        "UPDATE billing.customers SET cc_number = 'new' WHERE i_customer = 1",
        "INSERT INTO billing.customers (i_customer, cc_number) VALUES ($1, $2)",
        "INSERT INTO billing.customers VALUES (1, 'n', 'e', 'p', 'card')",  # by position
        "INSERT INTO billing.customers (i_customer, cc_number) SELECT 1, 'card'",
        "INSERT INTO billing.customers (i_customer) VALUES (1) ON CONFLICT (i_customer) "
        "DO UPDATE SET cc_number = excluded.cc_number",
    ],
)
def test_writes_into_a_deny_column_are_guarded(sql: str) -> None:
    d = AN.analyze(sql)
    assert d.action == "rewrite", d.reason
    assert d.sql is not None and d.sql.count(GUARD) == 1, d.sql
    # NULL keeps the stored value (UPDATE) or writes NULL (INSERT); anything else fails
    assert "IS NULL THEN customers.cc_number ELSE" in d.sql or (
        "IS NULL THEN CAST(NULL AS text) ELSE" in d.sql
    )
    # the error is evaluated per row, never folded by the planner
    assert f"CAST(pg_catalog.concat('{GUARD}') AS integer)" in d.sql
    assert d.denied == DENIED


def test_multi_row_values_guard_every_row() -> None:
    d = AN.analyze(
        "INSERT INTO billing.customers (i_customer, cc_number) VALUES (1, $1), (2, DEFAULT), (3, NULL)"
    )
    assert d.action == "rewrite" and d.sql is not None
    assert d.sql.count(GUARD) == 2 and "(2, DEFAULT)" in d.sql


@pytest.mark.parametrize(
    "sql",
    [
        "UPDATE billing.customers SET cc_number = DEFAULT",
        "INSERT INTO billing.customers (i_customer, name) VALUES (1, 'x')",
        "INSERT INTO billing.customers DEFAULT VALUES",
    ],
)
def test_default_and_leaving_it_out_are_no_value(sql: str) -> None:
    d = AN.analyze(sql)
    assert d.action != "refuse", d.reason
    assert GUARD not in (d.sql or "")


@pytest.mark.parametrize(
    ("sql", "reason"),
    [
        ("COPY billing.customers FROM STDIN", "COPY FROM cannot write it"),
        ("COPY billing.customers (i_customer, cc_number) FROM STDIN", "COPY FROM cannot write it"),
        (
            "INSERT INTO billing.customers (i_customer, cc_number) SELECT 1, 'x' UNION SELECT 2, 'y'",
            "cannot tell the values this INSERT writes",
        ),
        (
            "INSERT INTO billing.customers SELECT * FROM billing.customers_eu",
            "read personal columns",
        ),
        ("UPDATE billing.customers SET cc_number = name", "read personal columns"),
        ("UPDATE billing.customers SET notes = cc_number", "read personal columns"),
        ("UPDATE billing.customers SET (name, cc_number) = ('a', 'b')", "multiple-column"),
        # the subscripts are the client's: `doc['k']` with NULL writes {"k": null}
        (
            "INSERT INTO billing.customers (i_customer, cc_number[1]) VALUES (1, NULL)",
            "a part of it cannot be written",
        ),
        (
            "INSERT INTO billing.customers (i_customer, cc_number.f) VALUES (1, NULL)",
            "a part of it cannot be written",
        ),
    ],
)
def test_writes_pgveil_cannot_guard_are_refused(sql: str, reason: str) -> None:
    d = AN.analyze(sql)
    assert d.action == "refuse" and reason in (d.reason or ""), d.reason


def test_copy_from_refusal_is_made_after_the_whole_walk() -> None:
    """(an unmasked session's audit still gets a complete analysis)"""
    d = AN.analyze("COPY billing.customers FROM STDIN")
    assert d.action == "refuse" and d.complete and d.tables == ("billing.customers",)
    assert d.denied == DENIED
    assert AN.analyze("COPY billing.customers (i_customer, name) FROM STDIN").action == "pass"


# ---- system columns ------------------------------------------------------------------------


def test_system_columns_ride_in_the_masking_subquery() -> None:
    d = AN.analyze("SELECT c.xmin, ctid, name FROM billing.customers c")
    assert d.action == "rewrite" and d.sql is not None
    assert d.sql.endswith("balance, ctid, xmin FROM billing.customers) AS c")


def test_no_system_columns_unless_named() -> None:
    d = AN.analyze("SELECT * FROM billing.customers c JOIN billing.accounts a USING (i_customer)")
    assert d.sql is not None and "xmin" not in d.sql and "ctid" not in d.sql
    # a system column of another relation is not carried
    d = AN.analyze("SELECT c.*, n.xmin FROM billing.customers c, public.notes n")
    assert d.sql is not None and "c.*" in d.sql and "xmin FROM billing" not in d.sql


@pytest.mark.parametrize(
    ("sql", "spelled"),
    [
        ("SELECT *, xmin FROM billing.customers", "SELECT customers.i_customer, customers.name"),
        ("SELECT c.*, c.ctid FROM billing.customers c", "SELECT c.i_customer, c.name"),
        (
            "SELECT billing.customers.*, ctid FROM billing.customers",
            "SELECT customers.i_customer, customers.name",
        ),
    ],
)
def test_a_star_beside_system_columns_is_spelled_out(sql: str, spelled: str) -> None:
    d = AN.analyze(sql)
    assert d.action == "rewrite" and d.sql is not None and d.sql.startswith(spelled), d.sql
    assert "*" not in d.sql.split(" FROM ")[0]


@pytest.mark.parametrize(
    "sql",
    [
        "SELECT to_json(c), c.xmin FROM billing.customers c",
        "SELECT c, xmin FROM billing.customers c",
        "SELECT (c.*)::text, xmin FROM billing.customers c",
        "SELECT xmin FROM billing.customers NATURAL JOIN billing.accounts",
        "SELECT xmin FROM billing.customers c(a, b)",
        "SELECT c.invoice_total, c.xmin FROM billing.customers c",
        "SELECT *, c.xmin FROM billing.customers c, billing.accounts a",
    ],
)
def test_whole_rows_beside_system_columns_are_refused(sql: str) -> None:
    d = AN.analyze(sql)
    assert d.action == "refuse" and (d.reason or "").startswith("system columns of"), d.reason


def test_writes_read_their_targets_system_columns_directly() -> None:
    d = AN.analyze(
        "UPDATE billing.customers SET balance = $1 WHERE i_customer = $2 AND xmin = $3 "
        "RETURNING xmin"
    )
    assert d.action == "pass", d.reason
