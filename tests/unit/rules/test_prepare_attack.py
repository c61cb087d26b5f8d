"""White-box cases for rules/prepare.py: spellings of integers and places that look like a
parameter's but are not (they stay in the text), and those that are. The integration tests
(tests/integration/test_attack_masked_prepared.py) prove the same statements give the client
what the text gives; these prove which of them really went with parameters."""

from __future__ import annotations

import pytest

from rules.context import MaskingContext
from tests.unit.rules.test_prepare import _parameters, ctx

__all__ = ["ctx"]  # (the fixture, shared with test_prepare)

C = "SELECT i_customer, name FROM billing.customers"

SPELLINGS: dict[str, list[bytes]] = {
    # signs: the grammar folds `-1` into one constant, `+1` is an operator
    f"{C} WHERE i_customer = - 1": [],
    f"{C} WHERE i_customer=-1": [],
    f"{C} WHERE i_customer =+1": [],
    f"{C} WHERE i_customer = 1 - -1": [],
    # parentheses vanish from the tree
    f"{C} WHERE i_customer = (1)": [b"1"],
    f"{C} WHERE i_customer = ((2))": [b"2"],
    # typed, float, other bases and separators (PostgreSQL 16's, which pgveil's parser
    # reads and the server's may not): never
    f"{C} WHERE i_customer = 1::int8": [],
    f"{C} WHERE i_customer = int4 '1'": [],
    f"{C} WHERE i_customer = 5e0": [],
    f"{C} WHERE i_customer = 2.0": [],
    f"{C} WHERE i_customer = 0x1F": [],
    f"{C} WHERE i_customer = 0o17": [],
    f"{C} WHERE i_customer = 1_000": [],
    # leading zeros: the value, while the digits fit ten characters
    f"{C} WHERE i_customer = 0000000002": [b"2"],
    f"{C} WHERE i_customer = 00000000001": [],
    # comments and whitespace between tokens
    f"{C} WHERE i_customer =/* c */1": [b"1"],
    f"{C} WHERE i_customer = -- c\n1": [b"1"],
    f"{C} WHERE i_customer\t=\n1\r": [b"1"],
    # int4's edge, and `+` / `-` only while nothing can overflow
    f"{C} WHERE i_customer = 2147483647": [b"2147483647"],
    f"{C} WHERE i_customer = 2147483648": [],
    f"{C} WHERE i_customer = 1073741823 + 1": [b"1073741823", b"1"],
    f"{C} WHERE i_customer = 1073741824 + 1": [],
    f"{C} WHERE i_customer = i_customer_class + 1073741824": [],
    f"{C} WHERE i_customer = 1 + '2'": [],
    f"{C} WHERE i_customer = 1 + 2 + 3": [],
    f"{C} WHERE i_customer = 2 * 3": [],
    # operators that are not a plain comparison
    f"{C} WHERE i_customer OPERATOR(pg_catalog.=) 1": [],
    f'{C} WHERE i_customer = 1 COLLATE "C"': [],
    f"{C} WHERE i_customer = ANY (ARRAY[1, 2])": [],
    f"{C} WHERE (i_customer, i_customer_class) = (1, 1)": [],
    f"{C} WHERE i_customer IS DISTINCT FROM 1": [],
    f"{C} WHERE NULLIF(i_customer, 1) = 2": [],
    f"{C} WHERE COALESCE(i_customer_class, 5) = 1": [],
    f"{C} WHERE i_customer_class + 2147483647 = 5": [],
    # LIMIT, OFFSET, FETCH: a constant only
    f"{C} LIMIT 1 + 1": [],
    f"{C} LIMIT -1": [],
    f"{C} ORDER BY i_customer FETCH FIRST 3 ROWS WITH TIES": [b"3"],
    # (in the order of the rewritten text, which writes LIMIT before OFFSET)
    f"{C} ORDER BY i_customer OFFSET 2 ROWS FETCH NEXT 1 ROW ONLY": [b"1", b"2"],
    f"{C} LIMIT ALL OFFSET 1": [b"1"],
    # never under a target list, a FILTER, a window, GROUP BY or ORDER BY
    "SELECT count(*) FILTER (WHERE i_customer = 1) FROM billing.customers WHERE i_customer < 10": [
        b"10"
    ],
    "SELECT name, (SELECT count(*) FROM billing.accounts a WHERE a.i_customer = 1 LIMIT 1) "
    "FROM billing.customers": [],
    "SELECT s.name FROM (SELECT name, count(*) OVER (ORDER BY i_customer ROWS BETWEEN "
    "1 PRECEDING AND 1 FOLLOWING) n FROM billing.customers WHERE i_customer < 10) s "
    "WHERE s.n > 1": [b"10", b"1"],
    "SELECT i_customer > 1, name FROM billing.customers WHERE i_customer < 10 "
    "GROUP BY i_customer > 1, name ORDER BY 1": [b"10"],
    # VALUES rows are not an open place
    "SELECT c.name, x.k FROM billing.customers c, (VALUES (1), (2)) x(k) WHERE x.k = 2": [b"2"],
}


@pytest.mark.parametrize("sql", list(SPELLINGS))
def test_which_spellings_become_parameters(ctx: MaskingContext, sql: str) -> None:
    assert _parameters(ctx, sql) == SPELLINGS[sql]
