"""Which literals of a masked rewrite become parameters of its prepared form (rules/prepare.py):
only the allow-listed positions, only int4 values written as digits, and only texts whose
tree is the rewritten text's with exactly those constants replaced."""

from __future__ import annotations

import pytest
from pglast import parse_sql

from proxy.session.masked import _unprepared_position
from rules import prepare
from rules.context import MaskingContext
from rules.loader import parse_rules
from rules.shapes import prepared_form
from tests.unit.rules.fixtures import CATALOG, RULES

C = "SELECT i_customer, name FROM billing.customers"


@pytest.fixture(scope="module")
def ctx() -> MaskingContext:
    return MaskingContext(parse_rules(RULES, "r", {"K": "k" * 32}), CATALOG)


def _parameters(ctx: MaskingContext, sql: str) -> list[bytes]:
    """The literal values that go as parameters (empty: the statement goes as text)."""
    d = ctx.analyze(sql)
    assert d.action == "rewrite", d.reason
    form = prepared_form(d)
    if form is None:
        return []
    text, values, _, _ = form
    assert d.sql is not None
    # the literals put back where the parameters stand give the rewritten text exactly
    back = text
    for i in range(len(values), 0, -1):
        back = back.replace(f"${i}", values[i - 1].decode())
    assert parse_sql(back) == parse_sql(d.sql)
    return list(values)


# statement -> the literals that become parameters, in order; every other literal of the
# statement must stay in the text
ALLOWED = {
    f"{C} WHERE i_customer = 5": [b"5"],
    f"{C} WHERE 5 = i_customer": [b"5"],
    f"{C} WHERE i_customer <> 5 AND i_customer != 6": [b"5", b"6"],
    f"{C} WHERE i_customer < 1 OR i_customer > 2 OR i_customer <= 3 OR i_customer >= 4": [
        b"1",
        b"2",
        b"3",
        b"4",
    ],
    f"{C} WHERE i_customer BETWEEN 1 AND 9": [b"1", b"9"],
    f"{C} WHERE i_customer NOT BETWEEN 1 AND 9": [b"1", b"9"],
    f"{C} WHERE i_customer BETWEEN SYMMETRIC 9 AND 1": [b"9", b"1"],
    f"{C} WHERE i_customer BETWEEN 17 AND 17 + 2": [b"17", b"17", b"2"],
    f"{C} WHERE i_customer = i_customer_class + 3": [b"3"],
    f"{C} WHERE i_customer IN (1, 2, 3)": [b"1", b"2", b"3"],
    f"{C} WHERE i_customer NOT IN (1, 2)": [b"1", b"2"],
    f"{C} ORDER BY i_customer LIMIT 50": [b"50"],
    f"{C} ORDER BY i_customer LIMIT 50 OFFSET 10": [b"50", b"10"],
    # (the rewrite writes the count before the offset)
    f"{C} ORDER BY i_customer OFFSET 10 ROWS FETCH FIRST 5 ROWS ONLY": [b"5", b"10"],
    f"{C} WHERE i_customer = 007": [b"7"],
    f"{C} WHERE i_customer = 2147483647": [b"2147483647"],
    "SELECT c.name FROM billing.customers c JOIN billing.accounts a "
    "ON a.i_customer = c.i_customer WHERE c.i_customer = 123": [b"123"],
    f"{C} WHERE i_customer IN (SELECT i_customer FROM billing.accounts WHERE i_account = 4)": [
        b"4"
    ],
    f"{C} WHERE CASE WHEN i_customer = 1 THEN true END": [b"1"],
    f"{C} WHERE i_customer = 1 UNION ALL {C} WHERE i_customer = 2": [b"1", b"2"],
    f"WITH x AS ({C} WHERE i_customer = 3) SELECT * FROM x WHERE i_customer = 4": [b"3", b"4"],
    f"SELECT * FROM ({C} WHERE i_customer = 3 LIMIT 1) s": [b"3", b"1"],
}

# literal positions that are not on the allow-list, or values that are not int4 digits:
# the statement goes as text (no parameter at all), or only its other literals do
NOT_ALLOWED = {
    f"{C} ORDER BY 1": [],
    f"{C} ORDER BY 2, 1": [],
    "SELECT i_customer_class, count(*) FROM billing.customers GROUP BY 1": [],
    "SELECT DISTINCT ON (1) i_customer FROM billing.customers ORDER BY 1": [],
    "SELECT i_customer, 5 FROM billing.customers": [],
    "SELECT i_customer + 5 FROM billing.customers": [],
    "SELECT i_customer = 5 FROM billing.customers WHERE i_customer = 1": [b"1"],
    f"{C} GROUP BY i_customer, name HAVING i_customer > 3": [],
    "SELECT i_customer = 5 FROM billing.customers GROUP BY i_customer = 5": [],
    "SELECT DISTINCT i_customer < 5 FROM billing.customers ORDER BY i_customer < 5": [],
    f"{C} ORDER BY i_customer = 5": [],
    "SELECT count(*) OVER (PARTITION BY i_customer < 5) FROM billing.customers": [],
    "SELECT (SELECT 1 FROM billing.accounts WHERE i_account = 1) FROM billing.customers": [],
    "SELECT i_customer FROM billing.customers GROUP BY i_customer "
    "HAVING i_customer IN (SELECT i_customer FROM billing.accounts WHERE i_account = 1)": [],
    "SELECT abs(5), name FROM billing.customers": [],
    "SELECT name::varchar(5) FROM billing.customers": [],
    f"{C} WHERE name = 'x'": [],
    f"{C} WHERE name = E'x\\n'": [],
    f"{C} WHERE name = $$x$$": [],
    f"{C} WHERE i_customer = '5'": [],
    f"{C} WHERE now() > date '2000-01-01'": [],
    f"{C} WHERE now() > now() - interval '1 day'": [],
    f"{C} WHERE i_customer = -5": [],
    f"{C} WHERE i_customer = - 5": [],
    f"{C} WHERE i_customer = 1.5": [],
    f"{C} WHERE i_customer = 1e3": [],
    f"{C} WHERE i_customer = 2147483648": [],
    f"{C} WHERE i_customer = 99999999999999999999": [],
    f"{C} WHERE i_customer = 0x10": [],
    f"{C} WHERE i_customer = 5::int8": [],
    f"{C} WHERE i_customer = int8 '5'": [],
    f"{C} WHERE i_customer = 1 * 5": [],
    f"{C} WHERE i_customer = 1 / 5": [],
    f"{C} WHERE i_customer = 1 + 2 + 3": [],
    f"{C} WHERE i_customer = 2147483000 + 647": [],
    f"{C} WHERE i_customer = 1 + 1073741824": [],
    f"{C} WHERE i_customer = 1073741823 + 1073741823": [b"1073741823", b"1073741823"],
    f"{C} WHERE 1 = 1": [],
    f"{C} WHERE (i_customer, i_customer_class) = (1, 2)": [],
    f"{C} WHERE i_customer = ANY('{{1,2}}')": [],
    f"{C} WHERE i_customer = ANY(ARRAY[1, 2])": [],
    f"{C} WHERE i_customer IS DISTINCT FROM 5": [],
    f"{C} WHERE name LIKE 'a%'": [],
    f"{C} WHERE (ARRAY[i_customer])[1] = i_customer": [],
    f"{C} WHERE i_customer = 1; {C} WHERE i_customer = 2": [],
    f"{C} ORDER BY i_customer LIMIT ALL": [],
    f"{C} WHERE i_customer = coalesce(5, 6)": [],
    "SELECT * FROM (VALUES (1), (2)) v(x) WHERE x = 1": [b"1"],
    "SELECT i_customer INTO TEMP t FROM billing.customers WHERE i_customer = 1": [],
    f"{C} WHERE i_customer = 1 FOR UPDATE": [b"1"],
}


@pytest.mark.parametrize("sql", list(ALLOWED))
def test_allowed_positions_become_parameters(ctx: MaskingContext, sql: str) -> None:
    assert _parameters(ctx, sql) == ALLOWED[sql]


@pytest.mark.parametrize("sql", list(NOT_ALLOWED))
def test_other_positions_and_values_stay_in_the_text(ctx: MaskingContext, sql: str) -> None:
    d = ctx.analyze(sql)
    if d.action != "rewrite":
        assert prepared_form(d) is None
        return
    assert _parameters(ctx, sql) == NOT_ALLOWED[sql]


def test_statements_of_one_shape_share_the_prepared_text(ctx: MaskingContext) -> None:
    first = prepared_form(ctx.analyze(f"{C} WHERE i_customer = 5 LIMIT 10"))
    second = prepared_form(ctx.analyze(f"{C} WHERE i_customer = 77 LIMIT 3"))
    assert first is not None and second is not None
    assert first[0] == second[0] and "$1" in first[0] and "$2" in first[0]
    assert (first[1], second[1]) == ((b"5", b"10"), (b"77", b"3"))
    # a value that stays in the text makes another text
    third = prepared_form(ctx.analyze(f"{C} WHERE i_customer = 5000000000 LIMIT 3"))
    assert third is not None and third[0] != first[0] and "5000000000" in third[0]


def test_verification_refuses_any_other_tree() -> None:
    rewritten = "SELECT a FROM t WHERE a = 5 AND b = 6 LIMIT 7"
    assert prepare._verify("SELECT a FROM t WHERE a = $1 AND b = $2 LIMIT $3", rewritten, [5, 6, 7])
    # a parameter where the value differs, where no integer stood, numbered otherwise, a
    # constant missing, a parameter too many, a text that does not parse
    assert not prepare._verify(
        "SELECT a FROM t WHERE a = $1 AND b = $2 LIMIT $3", rewritten, [5, 6, 8]
    )
    assert not prepare._verify("SELECT $1 FROM t WHERE a = 5 AND b = 6 LIMIT 7", rewritten, [5])
    assert not prepare._verify("SELECT a FROM t WHERE a = $2 AND b = $1 LIMIT 7", rewritten, [5, 6])
    assert not prepare._verify("SELECT a FROM t WHERE a = $1 AND b = 6 LIMIT 7", rewritten, [5, 6])
    assert not prepare._verify("SELECT a FROM t WHERE a = $1 AND b = $1 LIMIT 7", rewritten, [5])
    assert not prepare._verify("SELECT a FROM t WHERE a = $1 AND b = 6 LIMIT 7)", rewritten, [5])
    assert not prepare._verify("SELECT a FROM t WHERE a = $1 OR b = 6 LIMIT 7", rewritten, [5])
    assert not prepare._verify(
        "SELECT a FROM t WHERE a = $1 AND b = 6 LIMIT 7",
        "SELECT a FROM t WHERE a = '5' AND b = 6 LIMIT 7",
        [5],
    )


def test_a_shape_that_fails_verification_goes_as_text() -> None:
    shape = "SELECT a FROM t WHERE a = $900000"
    form = prepare.shape_form(shape, [(26, 33, 0)])
    assert form.eligible == {0: None}
    # the rewritten text it is checked against is not what the shape gives
    assert (
        prepare.prepared(form, shape, [(26, 33, 0)], ["5"], "SELECT a FROM t WHERE a = 6") is None
    )
    assert form.verified == {(None,): prepare._FAILED}


def test_error_positions_move_back_to_the_literals() -> None:
    # "... a = $1 AND b = $2 x": $1 stands for "123" (at 0-based 26), $2 for "4" (at 35)
    where = ((26, 2, 3), (35, 2, 1))
    assert _unprepared_position("1", where) == "1"
    assert _unprepared_position("26", where) == "26"  # before the first parameter
    assert _unprepared_position("27", where) == "27"  # at $1: its literal's start
    assert _unprepared_position("28", where) == "27"  # inside $1
    assert _unprepared_position("29", where) == "30"  # after it: one character further
    assert _unprepared_position("36", where) == "37"  # at $2
    assert _unprepared_position("38", where) == "38"  # after $2: shifted +1 -1
    assert _unprepared_position("x", where) == "x"
