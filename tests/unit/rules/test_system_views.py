"""The analyser's rewrite of the system relations that show values or statement text
(rules.denied.SYSTEM_VIEWS, SYSTEM_FUNCTIONS), VACUUM and ANALYZE, and views over those
relations; without a database (tests/integration/test_stats_views.py runs them on one)."""

from __future__ import annotations

import dataclasses

import pytest
from pglast import parse_sql

from rules.analyzer import Analyzer
from rules.catalog import ProtectionMap
from rules.loader import parse_rules
from tests.unit.rules.fixtures import CATALOG, RULES, rel

T = "pg_catalog.text"
SYSTEM_COLUMNS = {
    ("pg_catalog", "pg_stat_activity"): (
        ("pid", "pg_catalog.int4"),
        ("usename", "pg_catalog.name"),
        ("query", T),
        ("from_a_newer_server", T),  # in no list: NULL until someone looks
    ),
    ("pg_catalog", "pg_stats"): (
        ("tablename", "pg_catalog.name"),
        ("null_frac", "pg_catalog.float4"),
        ("histogram_bounds", "pg_catalog.anyarray"),
    ),
    ("ext", "pg_stat_statements"): (("calls", "pg_catalog.int8"), ("query", T)),
}
FUNCTION_COLUMNS = {"pg_stat_get_activity": (("pid", "pg_catalog.int4"), ("query", T))}
ACTIVITY = (
    "(SELECT pid, usename, CAST(NULL AS pg_catalog.text) AS query, "
    "CAST(NULL AS pg_catalog.text) AS from_a_newer_server FROM pg_catalog.pg_stat_activity)"
)
STATEMENTS = "(SELECT calls, CAST(NULL AS pg_catalog.text) AS query FROM ext.pg_stat_statements)"


EXTENSION_VIEW = rel(
    200, "ext", "pg_stat_statements", [("calls", "int8", "bigint"), ("query", "text", "text")], "v"
)


def analyzer(**changes: object) -> Analyzer:
    """The fixture's catalog, with system columns read and the extension's view (unless
    `relations` says otherwise)."""
    fields: dict[str, object] = {
        "relations": {**CATALOG.relations, ("ext", "pg_stat_statements"): EXTENSION_VIEW},
        "by_oid": {},
        "system_columns": SYSTEM_COLUMNS,
        "function_columns": FUNCTION_COLUMNS,
        **changes,
    }
    catalog = dataclasses.replace(CATALOG, **fields)  # type: ignore[arg-type]
    policy = parse_rules(RULES, "rules.yaml", {"K": "k" * 32})
    return Analyzer(ProtectionMap(policy, catalog))


AN = analyzer()


@pytest.mark.parametrize(
    ("sql", "expected"),
    [
        ("SELECT * FROM pg_stat_activity", f"SELECT * FROM {ACTIVITY} AS pg_stat_activity"),
        ("SELECT query FROM pg_catalog.pg_stat_activity a", f"SELECT query FROM {ACTIVITY} AS a"),
        (
            "SELECT pg_catalog.pg_stat_activity.query FROM pg_catalog.pg_stat_activity",
            f"SELECT pg_stat_activity.query FROM {ACTIVITY} AS pg_stat_activity",
        ),
        (
            "SELECT a.query FROM pg_stat_activity a JOIN pg_stat_activity b USING (pid)",
            f"SELECT a.query FROM {ACTIVITY} AS a INNER JOIN {ACTIVITY} AS b USING (pid)",
        ),
        (
            "SELECT 1 LIMIT (SELECT count(*) FROM pg_stat_activity)",
            f"SELECT 1 LIMIT (SELECT pg_catalog.count(*) FROM {ACTIVITY} AS pg_stat_activity)",
        ),
        (
            "SELECT query FROM ext.pg_stat_statements",
            f"SELECT query FROM {STATEMENTS} AS pg_stat_statements",
        ),
        (  # the only relation of that name is the extension's
            "SELECT query FROM pg_stat_statements s",
            f"SELECT query FROM {STATEMENTS} AS s",
        ),
        (
            "SELECT * FROM pg_stat_get_activity(NULL)",
            "SELECT * FROM LATERAL (SELECT pid, CAST(NULL AS pg_catalog.text) AS query "
            "FROM pg_catalog.pg_stat_get_activity(NULL) AS pg_stat_get_activity) "
            "AS pg_stat_get_activity",
        ),
        (
            "SELECT a.q FROM pg_catalog.pg_stat_get_activity(1) WITH ORDINALITY a(p, q, n)",
            "SELECT a.q FROM LATERAL (SELECT pid, CAST(NULL AS pg_catalog.text) AS query, "
            "ordinality FROM pg_catalog.pg_stat_get_activity(1) WITH ORDINALITY AS "
            "pg_stat_get_activity) AS a (p, q, n)",
        ),
    ],
)
def test_rewritten(sql: str, expected: str) -> None:
    d = AN.analyze(sql)
    assert (d.action, d.reason) == ("rewrite", None)
    assert d.sql == expected


def test_statistics_numbers_are_kept_only_where_nothing_personal_is() -> None:
    """pg_stats' numbers are the server's only in rows whose relation (and column) holds
    nothing personal (tests/integration/test_attack_statistics_whitebox.py runs it); their
    values are NULL everywhere."""
    d = AN.analyze("SELECT histogram_bounds, null_frac FROM pg_stats")
    assert (d.action, d.reason) == ("rewrite", None)
    sql = d.sql or ""
    assert sql.startswith(
        "SELECT histogram_bounds, null_frac FROM (SELECT tablename, CASE WHEN "
        '"pgveil readable" THEN null_frac END AS null_frac, CAST(NULL AS pg_catalog.anyarray) '
        "AS histogram_bounds FROM (SELECT *, COALESCE("
    )
    assert sql.endswith(
        ', FALSE) AS "pgveil readable" FROM pg_catalog.pg_stats) AS pg_stats) AS pg_stats'
    )
    # a table without rules; a protected table's column without a mask; never a personal one
    assert "'6.public.5.notes'" in sql and "'7.billing.9.customers.balance'" in sql
    assert "customers.name'" not in sql and "customers'" not in sql


def test_function_arguments_are_walked() -> None:
    """The arguments of a rewritten call are expressions like any: a protected table read
    there is masked, a deny column read as NULL."""
    d = AN.analyze(
        "SELECT * FROM pg_stat_get_activity((SELECT length(name) FROM billing.customers LIMIT 1))"
    )
    assert d.action == "rewrite" and d.tables == ("billing.customers",)
    assert "FROM billing.customers) AS customers" in (d.sql or "")
    denied = AN.analyze(
        "SELECT * FROM pg_stat_get_activity((SELECT length(cc_number) FROM billing.customers))"
    )
    assert denied.action == "rewrite" and "billing.customers.cc_number" in denied.denied
    assert "NULL" in (denied.sql or "") and "FROM billing.customers) AS customers" in (
        denied.sql or ""
    )


@pytest.mark.parametrize(
    ("sql", "reason"),
    [
        ("SELECT pg_stat_get_activity(NULL)", "function pg_stat_get_activity can read data"),
        ("SELECT * FROM pg_stat_get_activity(NULL) a(x int)", "function pg_stat_get_activity"),
        (
            "SELECT * FROM ROWS FROM (pg_stat_get_activity(NULL), generate_series(1, 2))",
            "function pg_stat_get_activity",
        ),
        ("SELECT * FROM pg_stat_get_activity(VARIADIC ARRAY[1])", "function pg_stat_get_activity"),
        ("SELECT * FROM public.pg_stat_get_activity(1)", "function pg_stat_get_activity"),
        ("SELECT * FROM pg_cursor()", "pgveil has not read its columns"),
        ("SELECT * FROM pg_cursors", "pgveil has not read its columns"),
        ("SELECT * FROM pg_statistic", "pg_statistic exposes column values"),
        ("SELECT * FROM public.pg_stats", "pg_stats exposes column values"),
        ("SELECT * FROM postgres.pg_catalog.pg_stats", "pg_stats exposes column values"),
        ("SELECT * FROM other.pg_stat_statements", "pg_stat_statements exposes column values"),
        ("WITH pg_stats AS (SELECT 1) SELECT * FROM pg_stats", "pg_stats exposes column values"),
        ("COPY pg_stats TO STDOUT", "pg_stats exposes column values"),
        ("LOCK pg_stat_activity", "pg_stat_activity exposes column values"),
        ("DELETE FROM pg_stat_activity", "pg_stat_activity exposes column values"),
        ("SELECT * FROM pg_stats TABLESAMPLE SYSTEM (1)", "pg_stats exposes column values"),
        ("SELECT current_query()", "function current_query can read data"),
    ],
)
def test_still_refused(sql: str, reason: str) -> None:
    d = AN.analyze(sql)
    assert d.action == "refuse" and reason in (d.reason or ""), d


def test_a_namesake_in_the_catalog_makes_the_bare_name_ambiguous() -> None:
    named = {("public", "pg_stats"): rel(300, "public", "pg_stats", [("x", "text", "text")])}
    an = analyzer(relations={**CATALOG.relations, **named})
    assert an.analyze("SELECT * FROM pg_stats").action == "refuse"
    assert an.analyze("SELECT * FROM pg_catalog.pg_stats").action == "rewrite"
    two = {
        ("ext", "pg_stat_statements"): rel(
            200, "ext", "pg_stat_statements", [("calls", "int8", "bigint")], kind="v"
        ),
        ("other", "pg_stat_statements"): rel(
            201, "other", "pg_stat_statements", [("calls", "int8", "bigint")]
        ),
    }
    an = analyzer(relations={**CATALOG.relations, **two})
    assert an.analyze("SELECT * FROM pg_stat_statements").action == "refuse"
    assert an.analyze("SELECT * FROM ext.pg_stat_statements").action == "rewrite"


def test_a_users_function_of_that_name_is_judged_as_one() -> None:
    an = analyzer(user_functions=CATALOG.user_functions | {("public", "pg_stat_get_activity")})
    d = an.analyze("SELECT * FROM pg_stat_get_activity(NULL)")
    assert d.action == "refuse" and "pg_stat_get_activity" in (d.reason or "")


@pytest.mark.parametrize(
    ("sql", "kinds", "tables"),
    [
        ("VACUUM", ("vacuum",), ()),
        ("ANALYZE", ("analyze",), ()),
        ("ANALYZE VERBOSE billing.customers (name)", ("analyze",), ("billing.customers",)),
        (
            "VACUUM (FULL, VERBOSE, ANALYZE, PARALLEL 2) billing.accounts, public.notes",
            ("vacuum",),
            ("billing.accounts",),
        ),
        ("VACUUM FREEZE billing.customers_eu", ("vacuum",), ("billing.customers",)),
    ],
)
def test_vacuum_and_analyze_pass(sql: str, kinds: tuple[str, ...], tables: tuple[str, ...]) -> None:
    d = AN.analyze(sql)
    assert (d.action, d.kinds, d.tables) == ("pass", kinds, tables)


def test_vacuum_of_a_denied_relation_is_refused_by_name() -> None:
    d = AN.analyze("VACUUM pg_statistic")
    assert d.action == "refuse" and "pg_statistic exposes" in (d.reason or "")


def test_views_over_them_are_refused() -> None:
    definitions = {
        ("public", "activity"): "SELECT pid, query FROM pg_stat_activity",
        ("public", "bounds"): "SELECT s.histogram_bounds FROM pg_catalog.pg_stats s",
        ("public", "over_activity"): "SELECT pid FROM public.activity",
    }
    relations = {
        **CATALOG.relations,
        **{
            key: rel(400 + i, key[0], key[1], [("pid", "int4", "integer")], kind="v")
            for i, key in enumerate(definitions)
        },
    }
    an = analyzer(
        relations=relations,
        view_definitions=definitions,
        view_sources={("public", "over_activity"): (("public", "activity"),)},
    )
    assert an.pmap.view_refusals == {
        ("public", "activity"): "view public.activity reads pg_stat_activity, which exposes "
        "column values or query text",
        ("public", "bounds"): "view public.bounds reads pg_stats, which exposes column values "
        "or query text",
        ("public", "over_activity"): "view public.over_activity reads view public.activity "
        "reads pg_stat_activity, which exposes column values or query text",
    }
    assert an.analyze("SELECT pid FROM public.over_activity").action == "refuse"


def test_the_rewrite_parses() -> None:
    for sql in ("SELECT * FROM pg_stat_activity", "SELECT * FROM pg_stat_get_activity(NULL)"):
        parse_sql(AN.analyze(sql).sql or "")
