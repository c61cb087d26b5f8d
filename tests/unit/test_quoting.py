"""shared.quoting.quote_ident, table-driven (its agreement with the server's quote_ident()
is tests/integration/test_quoting.py)."""

from __future__ import annotations

import pytest

from shared.quoting import quote_ident


@pytest.mark.parametrize(
    ("name", "sql"),
    [
        ("customers", "customers"),
        ("_x9", "_x9"),
        ("name", "name"),  # an unreserved keyword stays bare
        ("select", '"select"'),  # reserved
        ("between", '"between"'),  # a column-name keyword
        ("authorization", '"authorization"'),  # a type or function name keyword
        ("Customers", '"Customers"'),
        ("9lives", '"9lives"'),
        ("a b", '"a b"'),
        ('say "hi"', '"say ""hi"""'),
        ("a$b", '"a$b"'),
        ("café", '"café"'),
        ("", '""'),
    ],
)
def test_quote_ident(name: str, sql: str) -> None:
    assert quote_ident(name) == sql


def test_a_name_with_nul_is_refused() -> None:
    with pytest.raises(ValueError, match="NUL"):
        quote_ident('a"\0')
