"""White-box attacks on the subject-key hot path: token_value's fast path for decimal digits
(rules/keys.py), and NamedKeys as a plain value class that keeps `complete` through a
statement's shape (rules/subjects.py). Each case is what the server does with the input,
or what the general number reader said before the fast path.

Findings fixed here: a key literal of more than 4300 characters of digits (leading zeros
count) made int() raise ValueError out of the analysis, where the server reads it (as key 7,
or as a numeric that matches no bigint); a numeric key such as 1e999999999 (the server
refuses it) or a 131072-digit numeric parameter (it accepts that) was made an int to be
compared with an integer key column, which takes minutes and holds the proxy's event loop."""

from __future__ import annotations

import copy
import dataclasses
import pickle
from decimal import Decimal
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pglast import parse_sql

from rules.analyzer import Analyzer
from rules.catalog import ProtectionMap
from rules.decision import Decision
from rules.keys import (
    NO_MATCH,
    KeyColumn,
    apply,
    assign,
    cast,
    compare,
    input_value,
    number_literal,
    parameter_value,
    token_value,
)
from rules.loader import parse_rules
from rules.shapes import DecisionCache
from rules.subjects import NamedKeys, ParamKey, bound_keys, literal_keys, statement_subjects
from shared.implementation import implementation
from tests.unit.rules.fixtures import RULES
from tests.unit.rules.test_subjects import CAT, C

INT8 = KeyColumn("int8", "bigint")
INT4 = KeyColumn("int4", "integer")
INT2 = KeyColumn("int2", "smallint")
NUMERIC = KeyColumn("numeric", "numeric")
TEXT = KeyColumn("text", "text")
INT4_MAX, INT8_MAX = 2**31 - 1, 2**63 - 1


def _parser_type(digits: str) -> tuple[str, object]:
    """What PostgreSQL's parser makes of an unsigned decimal literal: int4 when it fits,
    int8 when that fits, numeric otherwise (make_const / process_integer_literal)."""
    value = int(Decimal(digits))
    if value <= INT4_MAX:
        return ("int4", value)
    return ("int8", value) if value <= INT8_MAX else ("numeric", Decimal(value))


# ---- token_value's fast path ---------------------------------------------------------------


@settings(max_examples=500, deadline=None)
@given(st.integers(0, 40), st.integers(0, 10**30) | st.integers(0, 2**64))
def test_digit_tokens_take_the_parsers_type(zeros: int, number: int) -> None:
    token = "0" * zeros + str(number)
    assert token_value(token) == _parser_type(token)
    # what the general number reader (before the fast path) says
    assert token_value(token) == number_literal(token)


@pytest.mark.parametrize(
    "token",
    [
        "0",
        "00",
        "0000000000000000000000000000000",
        "2147483647",
        "02147483647",
        "2147483648",
        "0002147483648",
        "9223372036854775807",
        "00000000009223372036854775807",
        "9223372036854775808",
        "09223372036854775808",
        "9999999999999999999",  # 19 digits, wider than int8
        "10000000000000000000",
        "18446744073709551616",
    ],
)
def test_digit_tokens_at_the_type_boundaries(token: str) -> None:
    assert token_value(token) == _parser_type(token) == number_literal(token)


def test_numbers_glued_or_signed_are_not_the_fast_paths() -> None:
    # the scanner never hands these as one decimal token; read, they are what the server
    # reads or nothing (never a different number)
    assert token_value("-2") is None  # (a sign is an operator in the statement's shape)
    assert token_value("+2") is None
    assert token_value("2 ") is None
    assert token_value(" 2") is None
    assert token_value("2a") is None
    assert token_value("1_000") == ("int4", 1000)
    assert token_value("0x10") == ("int4", 16)
    assert token_value("\uff12") is None  # a full-width 2: a digit to Python, not to SQL
    assert token_value("\u0662") is None


@pytest.mark.timeout(20)
def test_thousands_of_digits_are_read_as_the_server_reads_them() -> None:
    many = "1" * 5000
    assert token_value(many) == ("numeric", Decimal(many))
    assert number_literal(many) == ("numeric", Decimal(many))
    assert number_literal("0" * 5000 + many) == ("numeric", Decimal(many))
    # leading zeros are not significant: the server reads 000...0007 as the int4 7
    assert token_value("0" * 5000 + "7") == ("int4", 7)
    assert token_value("0" * 5000) == ("int4", 0)
    assert number_literal("0" * 5000 + "7") == ("int4", 7)
    assert input_value("int4", " -" + "0" * 5000 + "7 ") == ("int4", -7)
    assert input_value("int8", many) is None  # out of range: the server refuses it
    assert input_value("int8", "1_" * 3000 + "1") is None
    # a bigint key compared with such a number matches nothing; a numeric key cannot be
    # recorded at that length
    assert compare(INT8, ("numeric", Decimal(many)), "") is NO_MATCH
    assert compare(NUMERIC, ("numeric", Decimal(many)), "") is None


@pytest.mark.timeout(20)
@pytest.mark.parametrize(
    "number",
    [
        Decimal("1e999999999"),  # the server refuses the literal; pgveil reads it first
        Decimal("-1e999999999"),
        Decimal(10) ** 131071,  # a numeric parameter the server accepts
        Decimal("9" * 131072),
    ],
)
def test_a_huge_numeric_is_never_made_an_int(number: Decimal) -> None:
    # int(Decimal("1e1000000")) takes 40 s: the proxy's event loop would stop for it
    assert compare(INT8, ("numeric", number), "") is NO_MATCH
    assert compare(INT2, ("numeric", number), "") is NO_MATCH
    assert cast(("numeric", number), "int8") is None
    assert assign(INT4, ("numeric", number)) is None
    assert compare(INT8, ("unknown", str(number)), "numeric") is NO_MATCH


@pytest.mark.parametrize(
    "number",
    [Decimal("1" * 30), Decimal("1" * 30 + ".5"), Decimal("1e999999999"), Decimal("1e-999999999")],
)
def test_a_numeric_key_is_negated_exactly(number: Decimal) -> None:
    # `-v` rounded to the context's 28 digits (another key: the server's numeric is exact)
    # and raised decimal.Overflow past its exponent, out of the session's analysis
    assert apply(("numeric", number), ("-",)) == ("numeric", Decimal("-" + str(number)))
    assert apply(("numeric", number), ("-", "-")) == ("numeric", number)
    assert compare(NUMERIC, ("numeric", Decimal("-" + "1" * 30)), "") == "-" + "1" * 30
    assert compare(NUMERIC, apply(("numeric", Decimal("1" * 30)), ("-",)) or ("", 0), "") == (
        "-" + "1" * 30
    )


@pytest.mark.parametrize(
    ("number", "int8"),
    [
        (Decimal("9223372036854775807"), "9223372036854775807"),
        (Decimal("9223372036854775807.0"), "9223372036854775807"),
        (Decimal("9223372036854775808"), NO_MATCH),
        (Decimal("-9223372036854775808"), "-9223372036854775808"),
        (Decimal("-9223372036854775809"), NO_MATCH),
        (Decimal("9223372036854775807.5"), NO_MATCH),
    ],
)
def test_numerics_at_the_int8_boundary(number: Decimal, int8: object) -> None:
    assert compare(INT8, ("numeric", number), "") == int8


@pytest.mark.parametrize(
    ("number", "int8"),
    [
        (Decimal("9223372036854775807.4"), 9223372036854775807),
        (Decimal("9223372036854775807.5"), None),  # rounds half away from zero: 2^63
        (Decimal("-9223372036854775808.4"), -9223372036854775808),
        (Decimal("-9223372036854775808.5"), None),
    ],
)
def test_casts_at_the_int8_boundary(number: Decimal, int8: int | None) -> None:
    assert cast(("numeric", number), "int8") == (("int8", int8) if int8 is not None else None)


@pytest.mark.timeout(20)
def test_a_huge_numeric_parameter_in_binary_is_no_match() -> None:
    # numeric_send of 10^131068: one digit group 1, weight 32767
    raw = (1).to_bytes(2, "big") + (32767).to_bytes(2, "big", signed=True) + bytes(4)
    raw += (1).to_bytes(2, "big")
    value = parameter_value("numeric", raw, 1, "utf-8")
    assert value is not None and value[0] == "numeric"
    assert compare(INT8, value, "") is NO_MATCH


# ---- whole statements --------------------------------------------------------------------


def _analyzer() -> Analyzer:
    return Analyzer(ProtectionMap(parse_rules(RULES, "r", {"K": "k" * 32}), CAT))


def _keys(sql: str) -> list[tuple[str, tuple[object, ...]]]:
    named, _ = statement_subjects(_analyzer().pmap, parse_sql(sql))
    return [(n.table, n.keys) for n in named]


SELECT = "SELECT email FROM billing.customers WHERE i_customer = "


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    ("literal", "keys"),
    [
        ("0" * 5000 + "2", ("2",)),
        ("1" * 5000, ()),  # a numeric: no bigint equals it
        ("1" * 5000 + ".0", ()),
        ("1e999999999", ()),  # (the server refuses it: no row read either way)
        ("-" + "1" * 5000, ()),
        ("'" + "0" * 5000 + "2'", ("2",)),  # unknown, read as bigint: 2
        ("-1e999999999::numeric", ()),  # (refused by the server)
        ("- " + "1" * 30, ()),
    ],
)
def test_statements_with_huge_keys(literal: str, keys: tuple[str, ...]) -> None:
    assert _keys(SELECT + literal) == [(C, keys)]
    # the same through the shape cache (a statement of this length has one), twice: the
    # second is read from the first one's shape
    cache = DecisionCache(_analyzer())
    for sql in (SELECT + "1", SELECT + literal):
        decision = cache.analyze(sql)
    assert [(n.table, n.keys) for n in decision.subject_keys] == [(C, keys)]


# ---- NamedKeys as a value ----------------------------------------------------------------


def _named(**changes: object) -> NamedKeys:
    fields: dict[str, object] = {
        "table": C,
        "keys": ("2", ParamKey(900000, ("-",))),
        "column": INT8,
        "unknown_as": "int8",
        "assign": False,
        "complete": False,
    }
    fields.update(changes)
    return NamedKeys(**fields)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "change",
    [
        {"table": "billing.accounts"},
        {"keys": ("2",)},
        {"keys": ("2", ParamKey(900000))},
        {"column": KeyColumn("int8", "int8")},
        {"column": KeyColumn("int8", "bigint", deterministic=False)},
        {"unknown_as": ""},
        {"assign": True},
        {"complete": True},
    ],
)
def test_named_keys_are_equal_by_every_field(change: dict[str, object]) -> None:
    a, b, other = _named(), _named(), _named(**change)
    assert (a == b) is True and (a != b) is False and hash(a) == hash(b)
    assert (a != other) is True and (a == other) is False
    assert len({a, b, other}) == 2
    assert {a: 1}[b] == 1 and other not in {a: 1}
    # a Decision (the shape-against-statement comparison, a Parse against its re-plan)
    # tells them apart too
    assert Decision("pass", subject_keys=(a,)) == Decision("pass", subject_keys=(b,))
    assert Decision("pass", subject_keys=(a,)) != Decision("pass", subject_keys=(other,))


def test_named_keys_are_never_equal_to_other_values() -> None:
    a = _named()
    fields = (a.table, a.keys, a.column, a.unknown_as, a.assign, a.complete)
    for other in (None, 5, C, fields, (a,), ParamKey(2)):
        assert (a != other) is True and (other != a) is True
        assert (a == other) is False and (other == a) is False
    assert a in [None, 5, _named()]


def test_named_keys_repr_names_every_field() -> None:
    assert repr(_named()) == (
        "NamedKeys(table='billing.customers', keys=('2', ParamKey(number=900000, "
        "ops=('-',))), column=KeyColumn(type='int8', formatted='bigint', "
        "deterministic=True), unknown_as='int8', assign=False, complete=False)"
    )


CLONES = [copy.copy, copy.deepcopy, lambda n: pickle.loads(pickle.dumps(n))]


@pytest.mark.parametrize("clone", CLONES, ids=["copy", "deepcopy", "pickle"])
def test_named_keys_copy_and_pickle(clone: Any) -> None:
    a = _named(keys=("2", "3"))
    b = clone(a)
    assert b == a and hash(b) == hash(a) and b.complete is False


@pytest.mark.xfail(
    implementation() == "mypyc",
    strict=True,
    raises=dataclasses.FrozenInstanceError,
    reason="compiled, a frozen dataclass (ParamKey) cannot be deep-copied or unpickled: "
    "mypyc's __setstate__ assigns its fields; nothing copies or pickles keys today",
)
@pytest.mark.parametrize("clone", CLONES[1:], ids=["deepcopy", "pickle"])
def test_pending_parameters_deepcopy_and_pickle(clone: Any) -> None:
    a = _named()
    assert clone(a) == a


def test_named_keys_match_by_position() -> None:
    match _named():
        case NamedKeys(table, keys, column, unknown_as, assign_, complete):
            assert (table, keys, column, unknown_as, assign_, complete) == (
                C, ("2", ParamKey(900000, ("-",))), INT8, "int8", False, False,
            )  # fmt: skip
        case _:
            pytest.fail("no match")


@pytest.mark.xfail(
    implementation() == "python",
    strict=True,
    reason="the plain class's Final fields are read-only to mypy and compiled, not to the "
    "interpreter (the frozen dataclass refused the assignment); no code assigns them",
)
def test_named_keys_fields_are_read_only() -> None:
    a = _named()
    with pytest.raises((AttributeError, dataclasses.FrozenInstanceError)):
        a.complete = True  # type: ignore[misc]
    assert a.complete is False


# ---- `complete` through a shape ---------------------------------------------------------


@pytest.mark.parametrize("complete", [True, False])
@pytest.mark.parametrize("token", ["2", "02", "'2'", "2.0", "9223372036854775807", "1" * 30])
def test_literal_keys_keep_complete(complete: bool, token: str) -> None:
    named = _named(keys=(ParamKey(900000),), unknown_as="", complete=complete)
    again = literal_keys(named, lambda n: token if n == 900000 else None)
    assert again is not None and again.complete is complete
    expected = () if token == "1" * 30 else ("2" if token != "9223372036854775807" else token,)
    assert again.keys == expected
    # a client's parameter beside it stays to be bound, and complete stays too
    mixed = _named(keys=(ParamKey(900000), ParamKey(1)), unknown_as="", complete=complete)
    again = literal_keys(mixed, lambda n: token if n == 900000 else None)
    assert (
        again is not None and again.complete is complete and again.unknown_as in ("int8", "numeric")
    )
    bound = bound_keys(again, lambda p: ("int8", 5))
    assert bound == frozenset(expected) | {"5"}
