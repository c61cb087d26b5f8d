"""What an audit event shows of a statement: no literal, and the same text (and fingerprint)
for a statement and the shape the analysis of it is cached under."""

from __future__ import annotations

import pytest

from audit.redaction import NOT_SHOWN, PLACEHOLDER_BASE, fingerprint, redact
from rules.context import MaskingContext
from rules.loader import parse_rules
from rules.shapes import fast_normalize, normalize
from tests.unit.rules.fixtures import CATALOG, RULES

STATEMENTS = [
    "SELECT name FROM billing.customers WHERE email = 'ann@example.com' AND id = 42",
    "SELECT name FROM billing.customers WHERE id IN (1, 2.5, 3e4)",
    "UPDATE billing.customers SET name = E'Ann\\'s' WHERE id = 7",
    "SELECT B'101', X'ff', U&'d\\0061t' FROM billing.customers",
    "INSERT INTO billing.customers (id, name) VALUES (1, 'Ann'), (2, 'Bob')",
]


# a national character literal has no shape: its placeholder would glue to the N
@pytest.mark.parametrize("sql", [*STATEMENTS, "SELECT N'Ann' FROM billing.customers"])
def test_no_literal_is_shown(sql: str) -> None:
    text = redact(sql)
    for secret in ("ann@example.com", "42", "2.5", "3e4", "Ann", "Bob", "101", "ff", "0061"):
        assert secret not in text, (secret, text)
    assert "?" in text and "customers" in text


@pytest.mark.parametrize("sql", STATEMENTS)
def test_a_statement_and_its_shape_redact_alike(sql: str) -> None:
    shapes = [norm[0] for norm in (normalize(sql), fast_normalize(sql)) if norm is not None]
    assert shapes
    for shape in shapes:
        assert f"${PLACEHOLDER_BASE}" in shape
        assert redact(shape) == redact(sql)


def test_pgveils_placeholders_are_literals_and_a_clients_parameters_are_not() -> None:
    sql = f"SELECT $1, ${PLACEHOLDER_BASE}, ${PLACEHOLDER_BASE - 1} FROM t"
    assert redact(sql) == f"SELECT $1 , ? , ${PLACEHOLDER_BASE - 1} FROM t"


def test_a_text_that_cannot_be_tokenised_is_not_shown() -> None:
    assert redact("SELECT name FROM t WHERE email = 'ann@example.com") == NOT_SHOWN


def test_without_names_only_reserved_words_operators_and_punctuation_are_shown() -> None:
    assert redact("select name from t where email = Ann Smith", names=False) == (
        "select ? from ? where ? = ? ?"
    )


def test_the_fingerprint_is_of_the_redacted_text() -> None:
    one = redact("SELECT name FROM billing.customers WHERE id = 1")
    other = redact("SELECT name FROM billing.customers WHERE id = 2")
    assert one == other and fingerprint(one) == fingerprint(other)
    assert len(fingerprint(one)) == 16 and int(fingerprint(one), 16) >= 0
    assert fingerprint(one) != fingerprint(redact("SELECT email FROM billing.customers"))


@pytest.mark.parametrize("sql", STATEMENTS)
def test_a_decision_carries_the_redacted_text_and_its_fingerprint(sql: str) -> None:
    ctx = MaskingContext(parse_rules(RULES, "r", {"K": "k" * 32}), CATALOG)
    for d in (ctx.analyze(sql), ctx.analyze(sql, audit_only=True)):
        assert d.redacted == redact(sql)
        assert d.fingerprint == fingerprint(d.redacted)


@pytest.mark.parametrize("names", [True, False])
@pytest.mark.parametrize(
    "sql",
    [
        "SELECT name /* Ann Smith */ FROM t -- ann@example.com",
        "/* controller='invoice',customer='Ann Smith' */ SELECT name FROM t",
        "SELECT name FROM t /* outer /* nested Ann */ Smith */ WHERE id = 1",
        "SELECT name -- Ann Smith\nFROM t",
    ],
)
def test_comments_are_not_shown(sql: str, names: bool) -> None:
    """A comment is free text (sqlcommenter tags, notes typed by hand): none of it may
    reach an event, in either mode."""
    shown = redact(sql, names=names)
    for word in ("Ann", "Smith", "ann@example.com", "invoice", "nested", "outer", "/*", "--"):
        assert word not in shown
    assert shown.split()[0] in ("SELECT", "?") and "FROM" in shown
