"""`t.f` judged against t's own columns (rules.fields): PostgreSQL reads `t.f` as `f(t)` when
f is no column of the FROM item t, so a name that is a column of some other relation (the
catalog holds about a thousand: `name`, `data`, `value`) may be a function created since
pgveil read the catalog. Such a name is now unknown (the session waits for a fresh catalog
read, then judges the function or answers the server's 42703) wherever pgveil can tell t's
columns, in every form a qualifier takes; where it cannot, the catalog-wide check stays.
The integration counterpart is in tests/integration/test_attack_function_output_names.py."""

from __future__ import annotations

import dataclasses

import pytest

from rules.analyzer import Analyzer
from rules.catalog import ProtectionMap
from rules.loader import parse_rules
from rules.missing import Missing, missing_name
from tests.unit.rules.fixtures import CATALOG, RULES

UNKNOWN = "column or function name"
# every column name of the fixture's relations, as the live catalog lists them, and `name`
# of other relations (billing.customers has one; public.notes and the view's rows do not)
COLUMNS = frozenset(
    {c.name for r in CATALOG.relations.values() for c in r.columns}
    | {"ctid", "xmin", "xmax", "cmin", "cmax", "tableoid", "key", "value"}
)
LISTED = dataclasses.replace(
    CATALOG,
    column_names=COLUMNS,
    function_outputs={"jsonb_each": frozenset({"key", "value"})},
    builtin_functions=CATALOG.builtin_functions | {"json_to_record", "jsonb_each"},
    relation_names=frozenset(CATALOG.relations),
)


def _unknown(sql: str, version: int = 150000) -> tuple[str, ...]:
    catalog = dataclasses.replace(LISTED, server_version_num=version)
    policy = parse_rules(RULES, "rules.yaml", {"K": "k" * 32})
    d = Analyzer(ProtectionMap(policy, catalog)).analyze(sql)
    return d.unknown_relations


# `name` is a column pgveil knows (billing.customers.name) but no column of the item named
@pytest.mark.parametrize(
    "sql",
    [
        "SELECT u.name FROM public.notes u",
        "SELECT notes.name FROM public.notes",
        "SELECT notes.name FROM notes",
        "SELECT public.notes.name FROM public.notes",
        "SELECT db.public.notes.name FROM public.notes",
        'SELECT "U"."name" FROM public.notes "U"',
        'SELECT "U".name FROM public.notes AS "U"',
        "SELECT (u).name FROM public.notes u",
        "SELECT u.body FROM public.notes u WHERE u.name IS NOT NULL",
        "SELECT count(*) FROM public.notes u GROUP BY u.name",
        "SELECT 1 FROM public.notes u ORDER BY u.name",
        # LATERAL items and function arguments see earlier items
        "SELECT s.x FROM public.notes u, LATERAL (SELECT u.name AS x) s",
        "SELECT 1 FROM public.notes u JOIN LATERAL (SELECT u.name) s ON true",
        "SELECT 1 FROM public.notes u, upper(u.name) f",
        # nested scopes: the reference names an outer item
        "SELECT (SELECT u.name FROM billing.accounts a) FROM public.notes u",
        "SELECT 1 FROM public.notes u WHERE EXISTS (SELECT 1 FROM billing.accounts a "
        "WHERE a.i_account = u.name)",
        # the inner u shadows the outer one
        "SELECT (SELECT u.name FROM public.notes u) FROM billing.customers u",
        # ON sees the join's two sides
        "SELECT 1 FROM billing.customers c JOIN public.notes n ON n.name = c.name",
        # an aliased join: its own columns, its sides' names hidden
        "SELECT j.name FROM (public.notes a CROSS JOIN billing.accounts b) j",
        "SELECT j.name FROM (public.notes a JOIN billing.accounts b ON true) AS j(x, y)",
        "SELECT x.name FROM public.notes JOIN billing.accounts USING (i_customer) AS x",
        # subqueries and CTEs: their select lists, column alias lists
        "SELECT s.name FROM (SELECT id FROM public.notes) s",
        "SELECT s.name FROM (SELECT id AS x, body FROM public.notes) s",
        "SELECT s.name FROM (SELECT * FROM public.notes) s",
        "SELECT s.name FROM (SELECT n.* FROM public.notes n) s",
        "SELECT s.name FROM (SELECT c.name FROM billing.customers c) s(x)",
        "SELECT s.name FROM (VALUES (1, 2)) s",
        "SELECT s.name FROM (SELECT 1 UNION SELECT 2) s(a)",
        "SELECT u.name FROM billing.customers c(i_customer, x), public.notes u",
        "SELECT c.name FROM billing.customers c(i_customer, x, y)",
        "WITH w AS (SELECT id FROM public.notes) SELECT w.name FROM w",
        "WITH w(a, b) AS (SELECT name, email FROM billing.customers) SELECT w.name FROM w",
        "WITH w AS (SELECT 1 AS id) SELECT (SELECT w.name FROM w) FROM billing.customers",
        # a column definition list
        "SELECT f.name FROM json_to_record('{}') AS f(id int)",
        "SELECT f.name FROM ROWS FROM (json_to_record('{}') AS (id int)) AS f",
        "SELECT f.name FROM json_to_record('{}') WITH ORDINALITY AS f(id int)",
        # writes: the target, EXCLUDED, RETURNING
        "UPDATE public.notes n SET body = 'x' WHERE n.name = 'y'",
        "UPDATE public.notes SET body = notes.name",
        "UPDATE public.notes n SET body = 'x' FROM billing.accounts a WHERE a.ip = n.name",
        "DELETE FROM public.notes n RETURNING n.name",
        "DELETE FROM public.notes n USING billing.customers c WHERE c.name = n.name",
        "INSERT INTO public.notes (id) VALUES (1) ON CONFLICT (id) DO UPDATE "
        "SET body = excluded.name",
        "INSERT INTO public.notes AS t (id) VALUES (1) ON CONFLICT (id) DO UPDATE "
        "SET body = 'x' WHERE t.name = 'y'",
        "INSERT INTO public.notes (id) VALUES (1) RETURNING notes.name",
        "INSERT INTO public.notes (id) SELECT 1 FROM public.notes a WHERE a.name = 'x'",
        "WITH d AS (DELETE FROM public.notes RETURNING id) SELECT d.name FROM d",
        # inside statements that wrap a query
        "EXPLAIN SELECT u.name FROM public.notes u",
        "COPY (SELECT u.name FROM public.notes u) TO STDOUT",
        "CREATE TEMPORARY VIEW v AS SELECT u.name FROM public.notes u",
        "DECLARE c CURSOR FOR SELECT u.name FROM public.notes u",
        "PREPARE p AS SELECT u.name FROM public.notes u",
    ],
)
def test_a_name_no_column_of_its_item_has_is_unknown(sql: str) -> None:
    assert UNKNOWN in _unknown(sql), sql


def test_a_view_has_no_system_columns() -> None:
    """`v.xmin` of a view is xmin(v): the server has no such column."""
    assert "column or function xmin" in _unknown("SELECT v.xmin FROM billing.customer_view v")
    assert "column or function xmin" not in _unknown("SELECT c.xmin FROM billing.customers c")


def test_returning_old_and_new_are_the_targets_from_postgresql_18() -> None:
    sql = "UPDATE public.notes SET body = 'x' RETURNING old.name, new.body"
    assert UNKNOWN in _unknown(sql, 180000)
    assert not _unknown("UPDATE public.notes SET body = 'x' RETURNING old.body, new.id", 180000)


@pytest.mark.parametrize(
    "sql",
    [
        # the item's own columns, system columns of a table
        "SELECT c.name, c.email FROM billing.customers c",
        "SELECT billing.customers.name FROM billing.customers",
        "SELECT u.body, u.xmin, u.ctid FROM public.notes u",
        "SELECT (u).body FROM public.notes u",
        "SELECT v.name FROM billing.customer_view v",
        "SELECT s.id, s.x FROM (SELECT id, body AS x FROM public.notes) s",
        "SELECT s.a FROM (SELECT id, body FROM public.notes) s(a)",
        "SELECT s.body FROM (SELECT id, body FROM public.notes) s(a)",
        "SELECT s.column2 FROM (VALUES (1, 2)) s",
        "WITH w AS (SELECT id FROM public.notes) SELECT w.id FROM w",
        "SELECT f.id, f.ordinality FROM json_to_record('{}') WITH ORDINALITY AS f(id int)",
        "SELECT j.name, j.i_account FROM (billing.customers a JOIN billing.accounts b "
        "USING (i_customer)) j",
        "SELECT x.i_customer FROM billing.customers JOIN billing.accounts USING (i_customer) AS x",
        "SELECT (SELECT u.name FROM billing.customers u) FROM public.notes u",
        "INSERT INTO public.notes (id) VALUES (1) ON CONFLICT (id) DO UPDATE "
        "SET body = excluded.body WHERE notes.id > 0 RETURNING notes.body",
        "UPDATE public.notes n SET body = a.ip::text FROM billing.accounts a "
        "WHERE a.i_account = n.id RETURNING n.body, a.ip",
        # where t's columns cannot be told, the catalog-wide check stays: a known name
        "SELECT e.key, e.value FROM jsonb_each('{}') e",
        "SELECT f.name FROM upper('x') f",
        "SELECT (u.body).name FROM public.notes u",
        "SELECT u.name FROM nosuch u",
        # a non-LATERAL subquery does not see its siblings (the server refuses the name)
        "SELECT 1 FROM public.notes u, (SELECT u.name) s",
        # RETURNING old/new are no items before PostgreSQL 18
        "UPDATE public.notes SET body = 'x' RETURNING old.name",
    ],
)
def test_a_column_of_its_item_or_an_item_not_told_is_not_unknown(sql: str) -> None:
    assert UNKNOWN not in _unknown(sql), sql


def test_a_function_of_that_name_is_judged_as_a_function() -> None:
    """Once the catalog read has the function, the name is a call: not allow-listed,
    refused (also where it is no column of anything)."""
    catalog = dataclasses.replace(
        LISTED, user_functions=LISTED.user_functions | {("public", "name")}
    )
    policy = parse_rules(RULES, "rules.yaml", {"K": "k" * 32})
    d = Analyzer(ProtectionMap(policy, catalog)).analyze("SELECT u.name FROM public.notes u")
    assert d.action == "refuse"
    assert d.reason == "function name is not allowed for masked roles"


@pytest.mark.parametrize(
    ("sql", "expected"),
    [
        # the first reference whose item lacks the column, not the first of that name
        (
            "SELECT c.name, u.name FROM billing.customers c, public.notes u",
            Missing("42703", "column u.name does not exist", 16),
        ),
        (
            "SELECT (c).name, (u).name FROM billing.customers c, public.notes u",
            Missing("42703", "column u.name does not exist", 19),
        ),
        (
            "SELECT public.notes.name FROM public.notes",
            Missing("42703", "column notes.name does not exist", 8),
        ),
    ],
)
def test_the_servers_error_names_the_item_without_it(sql: str, expected: Missing) -> None:
    assert missing_name(sql, {UNKNOWN}, LISTED, "db") == expected


@pytest.mark.parametrize(
    ("sql", "call"),
    [
        ("SELECT c.to_json FROM billing.customers c", "pg_catalog.to_json(c.*)"),
        ("SELECT (c).to_json FROM billing.customers c", "pg_catalog.to_json(c.*)"),
        (
            "SELECT billing.customers.to_json FROM billing.customers",
            "pg_catalog.to_json(customers.*)",
        ),
        ("SELECT n.row_to_json FROM public.notes n", "pg_catalog.row_to_json(n.*)"),
    ],
)
def test_a_built_in_that_takes_the_row_is_called_pinned(sql: str, call: str) -> None:
    """`c.to_json` where to_json is surely no column of c: the server calls to_json(c);
    pgveil sends the pinned call, so an overload created since the catalog read (a
    closer match for the row type) is never the one called."""
    catalog = dataclasses.replace(LISTED, row_functions=frozenset({"to_json", "row_to_json"}))
    policy = parse_rules(RULES, "rules.yaml", {"K": "k" * 32})
    d = Analyzer(ProtectionMap(policy, catalog)).analyze(sql)
    assert d.action == "rewrite", d.reason
    assert d.sql is not None and d.sql.startswith(f"SELECT {call} FROM"), d.sql
    assert not d.unknown_relations
    # a column of that name is read as the column; a built-in not taking a row is unknown
    d = Analyzer(ProtectionMap(policy, catalog)).analyze(
        "SELECT s.to_json FROM (SELECT 1 AS to_json) s"
    )
    assert d.action == "pass"
    assert "column or function upper" in _unknown("SELECT c.upper FROM billing.customers c")
