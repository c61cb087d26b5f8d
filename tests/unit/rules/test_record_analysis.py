"""The libpg_query fast path to statement shapes agrees with the full analysis."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pglast import parse_sql
from pglast.parser import normalize

from rules.context import MaskingContext
from rules.loader import parse_rules
from rules.shapes import fast_normalize, literals_of
from tests.unit.rules.fixtures import CATALOG, RULES


@pytest.fixture(scope="module")
def ctx() -> MaskingContext:
    return MaskingContext(parse_rules(RULES, "r", {"K": "k" * 32}), CATALOG)


@pytest.mark.parametrize(
    ("sql", "expected"),
    [
        ("SELECT 1, 'a''b', -3, - 4, 1.5e3", ["1", "'a''b'", "-3", "- 4", "1.5e3"]),
        (
            "SELECT E'x\\'y', B'101', X'1F', true, NULL",
            ["E'x\\'y'", "B'101'", "X'1F'", "true", "NULL"],
        ),
        ("SELECT a FROM t WHERE b IN (1,2) -- 'c'", ["1", "2"]),
        ("SELECT date '2020-01-01', interval '1 day'", ["'2020-01-01'", "'1 day'"]),
    ],
)
def test_literals_are_read_back(sql: str, expected: list[str]) -> None:
    assert literals_of(sql, normalize(sql)) == expected


@pytest.mark.parametrize(
    "sql", ["SELECT $1, 5", "SELECT $$x$$", "SELECT U&'d\\0061t'", "SELECT a$b FROM t WHERE c = 1"]
)
def test_unsure_texts_are_not_guessed(sql: str) -> None:
    try:
        normalized = normalize(sql)
    except Exception:
        return
    assert literals_of(sql, normalized) is None


@given(
    key=st.integers(0, 10**12),
    other=st.text(alphabet="abc' xyz", max_size=8),
    form=st.sampled_from(
        [
            "UPDATE billing.customers SET notes = '{o}' WHERE i_customer = {k}",
            "SELECT name FROM billing.customers WHERE i_customer = '{k}' AND notes <> '{o}'",
            "DELETE FROM billing.customers WHERE i_customer IN ({k}, 7) AND notes = '{o}'",
            "INSERT INTO billing.customers (i_customer, name) VALUES ({k}, '{o}')",
            "SELECT c.name FROM billing.customers c WHERE c.i_customer = {k}",
            "UPDATE billing.customers SET name = '{o}' WHERE i_customer = {k} RETURNING name",
        ]
    ),
)
def test_fast_path_agrees_with_the_full_analysis(key: int, other: str, form: str) -> None:
    ctx = MaskingContext(parse_rules(RULES, "r", {"K": "k" * 32}), CATALOG)
    sql = form.format(k=key, o=other.replace("'", "''"))
    assert fast_normalize(sql) is not None
    fast, full = ctx.analyze(sql), ctx.analyzer.analyze(sql)
    assert (fast.action, fast.tables, fast.kinds) == (full.action, full.tables, full.kinds)
    assert fast.subject_keys == full.subject_keys
    if full.action == "rewrite":
        # the same statement once the literals are back: parse trees agree
        assert fast.sql is not None and full.sql is not None
        assert parse_sql(fast.sql) == parse_sql(full.sql)
    # no literal in the recorded text: no quote, no digit (no identifier here has one)
    assert "'" not in fast.redacted and not any(ch.isdigit() for ch in fast.redacted)


def test_signed_literals_take_the_tokenising_path() -> None:
    assert fast_normalize("SELECT a FROM t WHERE b = -3") is None
    assert fast_normalize("SELECT a FROM t WHERE b = 3") == (
        "SELECT a FROM t WHERE b = $900000",
        ["3"],
    )


def test_repeated_shapes_are_analysed_once(ctx: MaskingContext) -> None:
    for k in range(50):
        d = ctx.analyze(f"SELECT name FROM billing.customers c WHERE c.i_customer = {k}")
        assert [(n.table, n.keys) for n in d.subject_keys] == [("billing.customers", (str(k),))]
        assert d.redacted == "SELECT name FROM billing . customers c WHERE c . i_customer = ?"
    assert ctx.cache_misses == 1 and ctx.cache_hits == 49


@pytest.mark.parametrize(
    ("sql", "columns"),
    [
        # a qualified column names that column only
        (
            "SELECT c.i_customer, c.name FROM billing.customers c WHERE c.i_customer = 5",
            ("billing.customers.name",),
        ),
        ("SELECT customers.email FROM billing.customers", ("billing.customers.email",)),
        # a system column is a column, not a function of the row
        ("SELECT c.ctid, c.name FROM billing.customers c", ("billing.customers.name",)),
        (
            "SELECT c.name, a.ip FROM billing.customers c JOIN billing.accounts a USING (i_customer)",
            ("billing.accounts.ip", "billing.customers.name"),
        ),
        # the whole row: a lone alias, c.*, and c.f where f is no column (PostgreSQL reads
        # f(c), a function of the whole row)
        ("SELECT row_to_json(c) FROM billing.customers c", "all"),
        ("SELECT c.* FROM billing.customers c", "all"),
        ("SELECT c.row_to_json FROM billing.customers c", "all"),
        ("SELECT customers.to_json FROM billing.customers", "all"),
    ],
)
def test_columns_read_are_the_columns_named(
    ctx: MaskingContext, sql: str, columns: tuple[str, ...] | str
) -> None:
    everything = tuple(
        f"billing.customers.{c}" for c in ("cc_number", "email", "extra", "login", "name", "phone")
    )
    d = ctx.analyze(sql)
    assert d.columns == (everything if columns == "all" else columns)
    assert ctx.analyze(sql, audit_only=True).columns == d.columns
