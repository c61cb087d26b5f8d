"""Analysis-only review of qualified column references (`c.f`): which personal columns a
statement is said to read (`Decision.columns`, the audit's columns), and whether a write that
returns a whole row of its target goes out unchanged. The integration counterpart, against a
real PostgreSQL, is tests/integration/test_attack_qualified_refs.py."""

from __future__ import annotations

import pytest

from rules.context import MaskingContext
from rules.loader import parse_rules
from tests.unit.rules.fixtures import CATALOG, RULES

ALL = ("cc_number", "email", "extra", "login", "name", "phone")


@pytest.fixture(scope="module")
def ctx() -> MaskingContext:
    return MaskingContext(parse_rules(RULES, "r", {"K": "k" * 32}), CATALOG)


def _customers(ctx: MaskingContext, sql: str) -> set[str]:
    d = ctx.analyze(sql, audit_only=True)
    prefix = "billing.customers."
    return {c.removeprefix(prefix) for c in d.columns if c.startswith(prefix)}


# PostgreSQL reads these columns; the analysis must list them (more is fine)
UNDER_REPORTED = [
    # c(i_customer, x, name): `c.name` is the third column, email
    ("SELECT c.name FROM billing.customers c(i_customer, x, name)", ("email",)),
    ("SELECT n FROM billing.customers AS c(i, n)", ("name",)),
    # a join alias: its whole row holds customers' row
    ("SELECT row_to_json(j) FROM (billing.customers c CROSS JOIN public.notes n) AS j", ALL),
    ("SELECT j.to_json FROM (billing.customers c CROSS JOIN public.notes n) AS j", ALL),
    ("SELECT j.x FROM (billing.customers c CROSS JOIN public.notes n) AS j(a, x)", ("name",)),
]

# the write target's whole row through attribute notation: refused for masked roles; an
# unmasked role's event lists every personal column (tests/unit/test_statement_log.py)
WHOLE_ROW_WRITES = [
    "UPDATE billing.customers c SET balance = 0 RETURNING c.row_to_json",
    "DELETE FROM billing.customers c WHERE c.to_json::text LIKE 'x%'",
    "UPDATE billing.customers SET balance = 0 RETURNING billing.customers.to_json",
]

READ_AS_SAID = [
    ("SELECT c.name FROM billing.customers c", ("name",)),
    ("SELECT c.to_json FROM billing.customers c", ALL),
    ("SELECT customers.to_json FROM billing.customers", ALL),
    ("SELECT billing.customers.to_json FROM billing.customers", ALL),
    ("SELECT e.to_json FROM billing.customers_eu e", ALL),
    ("SELECT billing.customers_eu.to_json FROM billing.customers_eu", ALL),
    ("SELECT (c).name FROM billing.customers c", ALL),
    ("SELECT c.n FROM billing.customers c(i, n)", ("name",)),
    ("SELECT s.x FROM billing.customers c, LATERAL (SELECT c.to_json AS x) s", ALL),
    ("SELECT (SELECT c.to_json FROM public.notes n) FROM billing.customers c", ALL),
    (
        "SELECT a.to_json, c.email FROM billing.customers c JOIN billing.accounts a USING (i_customer)",
        ("email",),
    ),
    ("UPDATE billing.customers c SET balance = 0 RETURNING c.email", ("email",)),
]


@pytest.mark.parametrize(("sql", "read"), UNDER_REPORTED)
def test_columns_read_are_listed(ctx: MaskingContext, sql: str, read: tuple[str, ...]) -> None:
    missing = set(read) - _customers(ctx, sql)
    assert not missing, f"read but not listed: {sorted(missing)}"


@pytest.mark.parametrize(("sql", "read"), READ_AS_SAID)
def test_columns_read_are_listed_guard(
    ctx: MaskingContext, sql: str, read: tuple[str, ...]
) -> None:
    assert set(read) <= _customers(ctx, sql)


def test_two_protected_tables_keep_their_own_qualifiers(ctx: MaskingContext) -> None:
    d = ctx.analyze(
        "SELECT a.to_json, c.email FROM billing.customers c JOIN billing.accounts a USING (i_customer)"
    )
    assert d.columns == ("billing.accounts.ip", "billing.customers.email")


@pytest.mark.parametrize(
    "sql",
    [
        "UPDATE billing.customers c SET balance = 0 RETURNING c.row_to_json",
        "UPDATE billing.customers SET balance = 0 RETURNING billing.customers.to_json",
        "DELETE FROM billing.accounts a RETURNING a.to_json",
        "INSERT INTO billing.customers AS c (i_customer, name) VALUES (1, 'x') "
        "ON CONFLICT (i_customer) DO UPDATE SET balance = 0 RETURNING c.to_jsonb",
        "UPDATE billing.customers c SET balance = 0 WHERE c.to_json::text LIKE 'x%'",
    ],
)
def test_write_reading_the_targets_whole_row_is_not_passed(ctx: MaskingContext, sql: str) -> None:
    d = ctx.analyze(sql)
    # `pass` sends it as it is: the target's whole row goes out (or is tested) raw
    assert d.action != "pass", f"sent unchanged: {sql}"


def test_write_returning_a_whole_row_is_refused(ctx: MaskingContext) -> None:
    d = ctx.analyze("UPDATE billing.customers c SET balance = 0 RETURNING (c).name")
    assert d.action == "refuse"


@pytest.mark.parametrize("sql", WHOLE_ROW_WRITES)
def test_whole_row_writes_are_refused(ctx: MaskingContext, sql: str) -> None:
    d = ctx.analyze(sql)
    assert d.action == "refuse" and d.tables == ("billing.customers",)
