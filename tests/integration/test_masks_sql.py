"""Every mask's SQL form, run by a real server, equals its Python form and keeps the type."""

from __future__ import annotations

import psycopg
import pytest

from proxy.demo.embedded_pg import EmbeddedPostgres
from rules.masks import ColumnType, py_mask, sql_expr
from tests.unit.rules.test_masks_python import CASES, KEYS

EXTRA = [
    (ColumnType("varchar", "character varying(12)"), "abcdefghijkl"),
    (ColumnType("bpchar", "character(5)"), "abcde"),
    (ColumnType("inet", "inet"), "10.1.2.3/8"),
    (ColumnType("inet", "inet"), "::1"),
    (ColumnType("cidr", "cidr"), "2001:db8::/32"),
    (ColumnType("macaddr8", "macaddr8"), "08:00:2b:01:02:03:04:05"),
    (ColumnType("int2", "smallint"), "-32768"),
    (ColumnType("json", "json"), '{"dl": "x"}'),
]


def _cases() -> list[tuple[object, ColumnType, str]]:
    from rules.model import MaskSpec

    out = [(spec, ctype, value) for spec, ctype, value, _ in CASES if value is not None]
    for ctype, value in EXTRA:
        for name in ("partial", "hash", "null", "deny", "digits", "email", "redact"):
            out.append((MaskSpec(name), ctype, value))
    out.append(
        (
            MaskSpec("json", keys={"dl": MaskSpec("partial")}),
            ColumnType("json", "json"),
            '{"dl": "ABCDEF", "n": [1, 2]}',
        )
    )
    return out


@pytest.fixture(scope="module")
def conn(pg: EmbeddedPostgres) -> psycopg.Connection:
    c = psycopg.connect(pg.dsn() + " sslmode=disable", autocommit=True)
    c.execute("SET TimeZone = 'UTC'")
    return c


@pytest.mark.parametrize(("spec", "ctype", "value"), _cases())
def test_sql_equals_python_and_keeps_type(
    conn: psycopg.Connection, spec: object, ctype: ColumnType, value: str
) -> None:
    expr = sql_expr(spec, "v.x", ctype, KEYS).replace("%", "%%")  # type: ignore[arg-type]
    row = conn.execute(
        f"SELECT CASE WHEN ({expr}) IS NULL THEN NULL ELSE format('%%s', {expr}) END, "
        f"pg_typeof({expr})::text, pg_typeof(v.x)::text "
        f"FROM (SELECT CAST(%s AS {ctype.formatted}) AS x) v",
        [value],
    ).fetchone()
    assert row is not None
    sql_value, sql_type, col_type = row
    assert sql_type == col_type
    # format('%s') renders with the type's output function, as the wire's text format does
    canonical = conn.execute(
        f"SELECT format('%%s', CAST(%s AS {ctype.formatted}))", [value]
    ).fetchone()[0]  # type: ignore[index]
    assert sql_value == py_mask(spec, canonical, ctype, KEYS), (spec, value)  # type: ignore[arg-type]


def test_masks_survive_standard_conforming_strings_off(conn: psycopg.Connection) -> None:
    from rules.model import MaskSpec

    conn.execute("SET standard_conforming_strings = off")
    try:
        expr = sql_expr(MaskSpec("redact", value="a\\b'c"), "v.x", ColumnType("text", "text"), KEYS)
        assert conn.execute(f"SELECT {expr} FROM (SELECT 'x'::text AS x) v").fetchone() == (
            "a\\b'c",
        )
        expr = sql_expr(MaskSpec("hash"), "v.x", ColumnType("text", "text"), KEYS)
        row = conn.execute(f"SELECT {expr} FROM (SELECT 'john'::text AS x) v").fetchone()
        assert row == (py_mask(MaskSpec("hash"), "john", ColumnType("text", "text"), KEYS),)
    finally:
        conn.execute("SET standard_conforming_strings = on")
