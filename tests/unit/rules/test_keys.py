"""Subject keys normalised by the key column's type, as PostgreSQL compares them
(rules/keys.py). The server's answers these tables encode are checked against a real
PostgreSQL in tests/integration/test_audit_evasion_subjects.py."""

from __future__ import annotations

import struct
import uuid
from decimal import Decimal

import pytest

from rules.keys import (
    NO_MATCH,
    KeyColumn,
    apply,
    assign,
    binary_value,
    canonical_number,
    common_type,
    compare,
    input_value,
    number_literal,
    parameter_value,
    row_key,
    string_literal,
    token_value,
    type_name,
)

INT8 = KeyColumn("int8", "bigint")
INT4 = KeyColumn("int4", "integer")
TEXT = KeyColumn("text", "text")
CHAR6 = KeyColumn("bpchar", "character(6)")
VARCHAR3 = KeyColumn("varchar", "character varying(3)")
UUID = KeyColumn("uuid", "uuid")
NUMERIC = KeyColumn("numeric", "numeric")
U1 = "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11"


@pytest.mark.parametrize(
    ("token", "value"),
    [
        ("2", ("int4", 2)),
        ("2147483647", ("int4", 2147483647)),
        ("2147483648", ("int8", 2147483648)),
        ("9223372036854775807", ("int8", 9223372036854775807)),
        ("9223372036854775808", ("numeric", Decimal("9223372036854775808"))),
        ("\u00b2", None),  # a digit to str.isdigit, not to the server
        ("\u0661\u0662", None),
        ("99999999999999999999", ("numeric", Decimal("99999999999999999999"))),
        ("0x1F", ("int4", 31)),  # PostgreSQL 16 and later (15 refuses the statement)
        ("1_000", ("int4", 1000)),
        ("007", ("int4", 7)),
        ("2.0", ("numeric", Decimal("2.0"))),
        ("2e0", ("numeric", Decimal("2"))),
        (".5", ("numeric", Decimal("0.5"))),
        ("'0002'", ("unknown", "0002")),
        ("'it''s'", ("unknown", "it's")),
        ("'a\\b'", None),  # read otherwise under standard_conforming_strings = off
        ("TRUE", ("bool", True)),
        ("NULL", None),
        ("E'2'", None),
        ("$$2$$", None),
    ],
)
def test_literal_tokens_take_the_parsers_type(token: str, value: object) -> None:
    assert token_value(token) == value


@pytest.mark.parametrize(
    ("typ", "text", "value"),
    [
        ("int8", "0002", ("int8", 2)),
        ("int8", " 2 ", ("int8", 2)),
        ("int8", "\t+2\n", ("int8", 2)),
        ("int8", "2.0", None),  # invalid input syntax for type bigint
        ("int4", "2147483648", None),  # out of range
        ("int2", "-32768", ("int2", -32768)),
        ("numeric", " 2.50 ", ("numeric", Decimal("2.50"))),
        ("numeric", "-inf", ("numeric", Decimal("-Infinity"))),
        ("numeric", "1e3", ("numeric", Decimal("1e3"))),
        ("numeric", "abc", None),
        ("bool", "yes", ("bool", True)),
        ("bool", " OFF ", ("bool", False)),
        ("bool", "o", None),  # on or off: ambiguous
        ("uuid", U1.upper(), ("uuid", uuid.UUID(U1))),
        ("uuid", "{" + U1.replace("-", "") + "}", ("uuid", uuid.UUID(U1))),
        ("uuid", "a0ee-bc99-9c0b-4ef8-bb6d-6bb9-bd38-0a11", ("uuid", uuid.UUID(U1))),
        ("uuid", " " + U1, None),
        ("uuid", "{" + U1, None),
        ("uuid", "urn:uuid:" + U1, None),
        ("text", " x ", ("text", " x ")),
        ("float8", "2", None),
    ],
)
def test_input_functions(typ: str, text: str, value: object) -> None:
    assert input_value(typ, text) == value


@pytest.mark.parametrize(
    ("value", "ops", "result"),
    [
        (("int4", 3), ("bool", "int4"), ("int4", 1)),  # 3::boolean::int is 1
        (("int4", 0), ("bool", "int4"), ("int4", 0)),
        (("int8", 3), ("bool",), None),  # no cast from bigint to boolean
        (("numeric", Decimal("2.5")), ("int4",), ("int4", 3)),  # half away from zero
        (("numeric", Decimal("-2.5")), ("int8",), ("int8", -3)),
        (("unknown", "2"), ("int8",), ("int8", 2)),
        (("unknown", "2"), ("text", "int8"), ("int8", 2)),
        (("int4", 2), ("+",), ("int4", 2)),
        (("int4", 2), ("-",), ("int4", -2)),
        (("int4", -(2**31)), ("-",), None),  # integer out of range
        (("int4", 2), ("numeric",), ("numeric", Decimal(2))),
        (("bpchar", "ab  "), ("text",), ("text", "ab")),
        (("uuid", uuid.UUID(U1)), ("text",), ("text", U1)),
        (("int4", 2), ("float8",), None),
    ],
)
def test_casts_and_signs(value: tuple[str, object], ops: tuple[str, ...], result: object) -> None:
    assert apply(value, ops) == result


@pytest.mark.parametrize(
    ("names", "typ"),
    [
        (("pg_catalog", "int4"), "int4"),
        (("int4",), "int4"),
        (("pg_catalog", "bool"), "bool"),
        (("uuid",), "uuid"),
        (("public", "int4"), None),  # a user's type of that name
        (("pg_catalog", "float8"), None),
        (("citext",), None),
    ],
)
def test_type_names(names: tuple[str, ...], typ: str | None) -> None:
    assert type_name(names) == typ


def test_common_type_is_the_widest_number() -> None:
    assert common_type("int8", ["unknown", "int4"]) == "int8"
    assert common_type("int4", ["int8"]) == "int8"
    assert common_type("int8", ["numeric", "unknown"]) == "numeric"
    assert common_type("text", ["unknown", "varchar"]) == "text"
    assert common_type("int8", ["text"]) is None
    assert common_type("float8", []) is None


@pytest.mark.parametrize(
    ("column", "value", "unknown_as", "key"),
    [
        (INT8, ("int4", 2), "int8", "2"),
        (INT8, ("numeric", Decimal("2.0")), "numeric", "2"),
        (INT8, ("numeric", Decimal("2e0")), "numeric", "2"),
        (INT8, ("numeric", Decimal("2.5")), "numeric", NO_MATCH),
        (INT8, ("numeric", Decimal("NaN")), "numeric", NO_MATCH),
        (INT8, ("numeric", Decimal("99999999999999999999")), "numeric", NO_MATCH),
        (INT4, ("int8", 2**40), "int8", NO_MATCH),
        (INT8, ("unknown", "0002"), "int8", "2"),
        (INT8, ("unknown", "2.0"), "numeric", "2"),  # IN ('2.0', 2.5)
        (INT8, ("unknown", "2.0"), "int8", None),  # the server refuses it
        (INT8, ("text", "2"), "text", None),  # no operator bigint = text
        (INT8, ("bool", True), "bool", None),
        (TEXT, ("unknown", "Ab"), "text", "Ab"),
        (TEXT, ("unknown", "Ab "), "text", "Ab "),
        (KeyColumn("text", "text", deterministic=False), ("unknown", "ab"), "text", None),
        (CHAR6, ("unknown", "ab  "), "bpchar", "ab"),
        (CHAR6, ("text", "ab"), "text", None),
        (UUID, ("unknown", U1.upper()), "uuid", U1),
        (UUID, ("unknown", "not a uuid"), "uuid", None),
        (NUMERIC, ("numeric", Decimal("2.500")), "numeric", "2.5"),
        (NUMERIC, ("int4", 7), "numeric", "7"),
        (NUMERIC, ("unknown", "7.0"), "numeric", "7"),
        (KeyColumn("float8", "double precision"), ("int4", 2), "float8", None),
    ],
)
def test_comparisons_name_one_key(
    column: KeyColumn, value: tuple[str, object], unknown_as: str, key: object
) -> None:
    assert compare(column, value, unknown_as) == key


@pytest.mark.parametrize(
    ("column", "value", "key"),
    [
        (INT8, ("numeric", Decimal("30.5")), "31"),
        (INT8, ("numeric", Decimal("-30.5")), "-31"),
        (INT8, ("unknown", " 30 "), "30"),
        (INT8, ("unknown", "30.5"), None),
        (INT4, ("int8", 2**40), None),
        (INT8, ("text", "30"), None),
        (VARCHAR3, ("unknown", "abc  "), "abc"),  # varchar(n) cuts trailing spaces
        (VARCHAR3, ("unknown", "abcd"), None),
        (CHAR6, ("unknown", "ab"), "ab"),
        (CHAR6, ("unknown", "abcdefg"), None),
        (UUID, ("unknown", U1.upper()), U1),
        (NUMERIC, ("numeric", Decimal("2.50")), "2.5"),
        (KeyColumn("numeric", "numeric(10,0)"), ("numeric", Decimal("2.5")), None),
    ],
)
def test_inserts_store_one_key(column: KeyColumn, value: tuple[str, object], key: object) -> None:
    assert assign(column, value) == key


def _numeric_send(ndigits: int, weight: int, sign: int, dscale: int, *digits: int) -> bytes:
    return struct.pack(f"!hhHh{len(digits)}H", ndigits, weight, sign, dscale, *digits)


@pytest.mark.parametrize(
    ("typ", "raw", "fmt", "key"),
    [
        ("int8", b"42", 0, "42"),
        ("int8", struct.pack("!q", 42), 1, "42"),
        ("int4", struct.pack("!i", -7), 1, "-7"),
        ("int2", struct.pack("!h", 5), 1, "5"),
        ("int8", struct.pack("!i", 42), 1, None),  # not a bigint's length
        ("numeric", b"2.50", 0, "2.5"),
        ("numeric", _numeric_send(2, 0, 0, 2, 2, 5000), 1, "2.5"),
        ("numeric", _numeric_send(1, 1, 0, 0, 12), 1, "120000"),
        ("numeric", _numeric_send(1, -1, 0x4000, 4, 1), 1, "-0.0001"),
        ("numeric", _numeric_send(0, 0, 0xC000, 0), 1, "NaN"),
        ("numeric", _numeric_send(1, 0, 0, 0, 10000), 1, None),
        ("bpchar", b"ab    ", 0, "ab"),
        ("bpchar", b"ab    ", 1, "ab"),
        ("text", "é".encode("latin-1"), 0, None),  # not UTF-8
        ("uuid", U1.encode(), 0, U1),
        ("uuid", uuid.UUID(U1).bytes, 1, U1),
        ("float8", struct.pack("!d", 2.0), 1, None),
        ("inet", b"10.0.0.1", 0, "10.0.0.1"),
    ],
)
def test_returned_keys(typ: str, raw: bytes, fmt: int, key: str | None) -> None:
    assert row_key(typ, raw, fmt, "utf-8") == key


def test_returned_text_keys_are_read_in_the_client_encoding() -> None:
    assert row_key("text", "é".encode("latin-1"), 0, "iso8859-1") == "é"
    assert row_key("text", "é".encode("latin-1"), 1, "iso8859-1") == "é"


@pytest.mark.parametrize(
    ("typ", "raw", "fmt", "value"),
    [
        ("int8", struct.pack("!q", 2), 1, ("int8", 2)),
        ("float8", struct.pack("!d", 2.0), 1, None),  # not its bit pattern
        ("numeric", _numeric_send(1, 0, 0, 0, 2), 1, ("numeric", Decimal(2))),
        ("text", b"2", 1, ("text", "2")),
        ("uuid", uuid.UUID(U1).bytes, 1, ("uuid", uuid.UUID(U1))),
        ("int8", b"0002", 0, ("int8", 2)),
        ("unknown", b"0002", 0, ("unknown", "0002")),
        ("bool", b"\x01", 1, ("bool", True)),
    ],
)
def test_parameters(typ: str, raw: bytes, fmt: int, value: object) -> None:
    assert parameter_value(typ, raw, fmt, "utf-8") == value


def test_numeric_keys_have_one_text() -> None:
    assert canonical_number(Decimal("1E+5")) == "100000"
    assert canonical_number(Decimal("-0.0")) == "0"
    assert canonical_number(Decimal("1e-3")) == "0.001"
    assert canonical_number(Decimal("1e100000")) is None  # not recorded: too long


def test_literals() -> None:
    assert number_literal("-2147483648") == ("int4", -(2**31))  # the grammar folds the sign
    assert number_literal("+2") is None  # (the grammar makes +2 an operator)
    found = input_value("numeric", "NaN")
    assert found is not None and str(found[1]) == "NaN"
    assert string_literal("x") == ("unknown", "x")
    assert binary_value("bool", b"", "utf-8") is None
