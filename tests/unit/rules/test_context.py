"""The statement cache: literals share one analysis, and give the same answer as a full one."""

from __future__ import annotations

import pytest

from rules.context import MaskingContext
from rules.loader import parse_rules
from rules.shapes import normalize
from tests.unit.rules.fixtures import CATALOG, RULES


@pytest.fixture
def ctx() -> MaskingContext:
    return MaskingContext(parse_rules(RULES, "r", {"K": "k" * 32}), CATALOG)


def test_normalize() -> None:
    norm = normalize("SELECT 'é', 5, E'x', $1, X'ff' FROM t WHERE a = 1.5")
    assert norm is not None
    shape, lits = norm
    assert shape == "SELECT $900000, $900001, $900002, $1, $900003 FROM t WHERE a = $900004"
    assert lits == ["'é'", "5", "E'x'", "X'ff'", "1.5"]
    assert normalize("SELECT a FROM t") is None
    assert normalize("SELECT $900001") is None
    # a placeholder spelled inside an identifier must not receive a literal's text
    assert normalize('SELECT 1 AS "$900000", \'a"b\'') is None


@pytest.mark.parametrize(
    "sql",
    [
        "SELECT name FROM billing.customers WHERE i_customer = 5 AND email LIKE 'a%'",
        "UPDATE billing.customers SET name = 'Bob', notes = 'é' WHERE i_customer = 7 RETURNING name",
        "SELECT 1, 'x'",
        "SELECT set_config('role', 'x', false)",
        "SELECT set_config('application_name', 'x', false)",
        "SELECT DATE '2024-01-01'",
        "SELECT name FROM billing.customers ORDER BY 1 LIMIT 10",
        "SET search_path = 'billing'",
        "SELECT $$ dollar 'quoted' $$, name FROM customers",
    ],
)
def test_cached_decision_equals_full_analysis(ctx: MaskingContext, sql: str) -> None:
    full = ctx.analyzer.analyze(sql)
    first = ctx.analyze(sql)
    second = ctx.analyze(sql.replace("5", "6").replace("'x'", "'y'"))
    # the same decision; rewritten text may spell a literal as the client did
    assert (first.action, first.tables, first.columns, first.reason) == (
        full.action,
        full.tables,
        full.columns,
        full.reason,
    )
    if full.action == "rewrite":
        assert second.action == "rewrite"


def test_literals_share_one_analysis(ctx: MaskingContext) -> None:
    for i in range(50):
        d = ctx.analyze(f"SELECT name FROM billing.customers WHERE i_customer = {i}")
        assert (
            d.action == "rewrite"
            and d.sql is not None
            and d.sql.endswith(f"WHERE i_customer = {i}")
        )
    assert ctx.cache_misses == 1 and ctx.cache_hits == 49


def test_placeholder_spelled_by_unicode_escape_never_receives_a_literal(
    ctx: MaskingContext,
) -> None:
    sql = (
        'SELECT i_customer AS U&"\\0024900000" FROM billing.customers WHERE '
        "'\" , (SELECT string_agg(name, $$ $$) FROM billing.customers) AS \"' IS NOT NULL"
    )
    d = ctx.analyze(sql)
    assert d.action == "rewrite" and d.sql is not None
    from pglast import parse_sql

    # still one statement whose WHERE is the client's string literal, not a subquery
    (raw,) = parse_sql(d.sql)
    where = raw.stmt.whereClause
    assert type(where).__name__ == "NullTest" and type(where.arg).__name__ == "A_Const"


def test_a_bulk_statement_is_analysed_as_it_is_and_not_cached(ctx: MaskingContext) -> None:
    from rules.shapes import LARGE_STATEMENT

    rows = ", ".join(f"({i}, 'x{i}')" for i in range(LARGE_STATEMENT // 8))
    sql = f"INSERT INTO public.notes (id, body) VALUES {rows}"
    assert len(sql) > LARGE_STATEMENT
    assert ctx.analyze(sql).action == "pass"
    assert ctx.analyze(sql).action == "pass"
    assert ctx.cache_hits == 0 and sql not in ctx.decisions._cache
