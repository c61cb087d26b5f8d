"""The recording fast path for unmasked statements agrees with the full analysis."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pglast.parser import normalize

from rules.context import MaskingContext, literals_of
from rules.loader import parse_rules
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
    key=st.integers(0, 10**12),  # negative keys: only the fast path reads them (one token)
    other=st.text(alphabet="abc' xyz", max_size=8),
    form=st.sampled_from(
        [
            "UPDATE billing.customers SET notes = '{o}' WHERE i_customer = {k}",
            "SELECT name FROM billing.customers WHERE i_customer = '{k}' AND notes <> '{o}'",
            "DELETE FROM billing.customers WHERE i_customer IN ({k}, 7) AND notes = '{o}'",
            "INSERT INTO billing.customers (i_customer, name) VALUES ({k}, '{o}')",
            "SELECT c.name FROM billing.customers c WHERE c.i_customer = {k}",
        ]
    ),
)
def test_fast_path_agrees_with_the_full_analysis(key: int, other: str, form: str) -> None:
    ctx = MaskingContext(parse_rules(RULES, "r", {"K": "k" * 32}), CATALOG)
    sql = form.format(k=key, o=other.replace("'", "''"))
    fast, full = ctx.analyze_to_record(sql), ctx.analyze(sql)
    assert fast.tables == full.tables and fast.kinds == full.kinds
    assert fast.subject_keys == full.subject_keys
    # no literal in the recorded text: no quote, no digit (no identifier here has one)
    assert "'" not in fast.redacted and not any(ch.isdigit() for ch in fast.redacted)


def test_repeated_shapes_are_analysed_once(ctx: MaskingContext) -> None:
    before = ctx.analyzer
    calls = 0

    class Counting:
        def analyze(self, sql: str) -> object:
            nonlocal calls
            calls += 1
            return before.analyze(sql)

    ctx.analyzer = Counting()  # type: ignore[assignment]
    try:
        for k in range(50):
            d = ctx.analyze_to_record(f"SELECT name FROM billing.customers WHERE i_customer = {k}")
            assert d.subject_keys == (("billing.customers", (str(k),)),)
            assert d.redacted == "SELECT name FROM billing . customers WHERE i_customer = ?"
    finally:
        ctx.analyzer = before
    assert calls == 1
