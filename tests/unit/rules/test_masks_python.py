"""Table-driven tests of every mask's Python form (the SQL forms are checked against them on
a real server in tests/integration/test_masks_sql.py)."""

from __future__ import annotations

import pytest

from rules.masks import ColumnType, py_mask, sql_literal
from rules.model import MaskSpec

KEYS = {"hash": b"0123456789abcdef0123456789abcdef"}
TEXT = ColumnType("text", "text")


def t(name: str) -> ColumnType:
    return ColumnType(name, name)


CASES = [
    (MaskSpec("partial"), TEXT, "John Smith", "J********h"),
    (MaskSpec("partial"), TEXT, "Jo", "**"),
    (MaskSpec("partial"), TEXT, "J", "*"),
    (MaskSpec("partial"), TEXT, "", ""),
    (MaskSpec("partial"), TEXT, "Zoë Ünal", "Z******l"),
    (MaskSpec("partial", keep_first=2, keep_last=0, char="#"), TEXT, "secret", "se####"),
    (MaskSpec("partial", keep_first=1, keep_last=2), TEXT, "+420123456789", "+**********89"),
    (MaskSpec("partial"), t("int8"), "123456789", "100000009"),
    (MaskSpec("partial"), t("int4"), "-5551234", "-5000004"),
    (MaskSpec("partial"), t("int4"), "42", "0"),
    (MaskSpec("partial"), t("inet"), "192.168.10.1", "192.0.0.1"),
    (MaskSpec("partial"), t("inet"), "192.168.10.1/24", "192.0.0.1/24"),
    (MaskSpec("partial"), t("inet"), "2001:db8:85a3::8a2e:370:7334", "2001::7334"),
    (MaskSpec("partial"), t("cidr"), "10.20.30.0/24", "10.0.0.0/24"),
    (MaskSpec("partial"), t("macaddr"), "08:00:2b:01:02:03", "08:00:00:00:00:03"),
    (
        MaskSpec("partial"),
        t("uuid"),
        "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11",
        "a0000000-0000-0000-0000-000000000001",
    ),
    (MaskSpec("partial"), t("numeric"), "12.5", None),
    (MaskSpec("partial"), t("date"), "2024-01-01", None),
    (MaskSpec("email"), TEXT, "john.smith@example.com", "j*********@example.com"),
    (MaskSpec("email"), TEXT, "j@example.com", "*@example.com"),
    (MaskSpec("email"), TEXT, "not-an-email", "n**********l"),
    (MaskSpec("digits", keep_last=4), TEXT, "4111 1111 1111 1234", "**** **** **** 1234"),
    (MaskSpec("digits", keep_last=4), TEXT, "12", "12"),
    (MaskSpec("digits", keep_last=0), TEXT, "a1b2", "a*b*"),
    (MaskSpec("digits", keep_last=4), t("int8"), "4111111111111234", "1234"),
    (MaskSpec("null"), TEXT, "x", None),
    (MaskSpec("deny"), t("int8"), "5", None),
    (MaskSpec("redact", value="[removed]"), TEXT, "x", "[removed]"),
    (MaskSpec("redact"), t("int4"), "5", None),
    (MaskSpec("date"), t("date"), "2024-02-29", "2024-02-01"),
    (
        MaskSpec("date", truncate="year"),
        t("timestamptz"),
        "2024-02-29 12:34:56.789+00",
        "2024-01-01 00:00:00+00",
    ),
    (MaskSpec("date"), t("timestamp"), "2024-02-29 12:34:56", "2024-02-01 00:00:00"),
    (
        MaskSpec("hash"),
        TEXT,
        "john",
        "f0c3c1f4b5d5bd9a2a8f2cf8f2cfd6e6a0b2b0b50e6cf2f6d8fb7e8b94e6d6e8",
    ),
    (
        MaskSpec(
            "json",
            keys={
                "dl": MaskSpec("partial"),
                "ins": MaskSpec("deny"),
                "a.street": MaskSpec("partial"),
            },
        ),
        t("jsonb"),
        '{"dl": "AB123456", "ins": "X-1", "a": {"street": "Main 1", "zip": "123"}, "keep": 5}',
        '{"a": {"zip": "123", "street": "M****1"}, "dl": "A******6", "ins": null, "keep": 5}',
    ),
    (MaskSpec("partial"), TEXT, None, None),
]


@pytest.mark.parametrize(("spec", "ctype", "value", "expected"), CASES)
def test_python_masks(
    spec: MaskSpec, ctype: ColumnType, value: str | None, expected: str | None
) -> None:
    got = py_mask(spec, value, ctype, KEYS)
    if spec.name == "hash":
        assert got is not None and len(got) == 64 and got != value
        assert got == py_mask(spec, value, ctype, KEYS)  # deterministic
        assert got != py_mask(spec, value, ctype, {"hash": b"another-key-another-key"})
    else:
        assert got == expected


def test_hash_of_integers_keeps_range() -> None:
    for bits, name in ((16, "int2"), (32, "int4"), (64, "int8")):
        v = int(py_mask(MaskSpec("hash"), "12345", t(name), KEYS) or "0")
        assert -(1 << (bits - 1)) <= v < 1 << (bits - 1)


def test_sql_literal_is_dollar_quoted() -> None:
    assert sql_literal("it's") == "$pgv$it's$pgv$"
    assert sql_literal("a$pgv$b") == "$pgvx$a$pgv$b$pgvx$"
