"""What the server says of a name that does not exist (rules.missing), without a server: the
integration tests (tests/integration/test_masked_errors.py) compare the same with PostgreSQL's
own errors."""

from __future__ import annotations

import dataclasses

import pytest

from rules.missing import Missing, created_here, missing_name
from tests.unit.rules.fixtures import CATALOG

# a catalog that lists every relation: the fixture's, and a sequence
NAMES = frozenset(CATALOG.relations) | {("billing", "xdrs_seq"), ("public", "lonely_seq")}
FULL = dataclasses.replace(CATALOG, relation_names=NAMES)
MISSING = 'relation "{}" does not exist'


@pytest.mark.parametrize(
    ("sql", "unknown", "expected"),
    [
        ("SELECT * FROM nosuch", {"nosuch"}, Missing("42P01", MISSING.format("nosuch"), 15)),
        (
            "SELECT * FROM billing.custmers",
            {"billing.custmers"},
            Missing("42P01", MISSING.format("billing.custmers"), 15),
        ),
        # FROM before the select list, as the server analyses them
        (
            "SELECT (SELECT 1 FROM nosuch1) FROM nosuch2",
            {"nosuch1", "nosuch2"},
            Missing("42P01", MISSING.format("nosuch2"), 37),
        ),
        # UPDATE: target, FROM, WHERE, then SET
        (
            "UPDATE billing.notes SET a = (SELECT 1 FROM n1) FROM n2 WHERE 1 = (SELECT 1 FROM n3)",
            {"billing.notes", "n1", "n2", "n3"},
            Missing("42P01", MISSING.format("billing.notes"), 8),
        ),
        (
            "UPDATE public.notes SET body = (SELECT 1 FROM n1) FROM n2 WHERE 1 = (SELECT 1 FROM n3)",
            {"n1", "n2", "n3"},
            Missing("42P01", MISSING.format("n2"), 56),
        ),
        # a utility statement looks the relation up without a position
        ("COPY nosuch TO STDOUT", {"nosuch"}, Missing("42P01", MISSING.format("nosuch"), None)),
        ("TRUNCATE nosuch", {"nosuch"}, Missing("42P01", MISSING.format("nosuch"), None)),
        (
            "COPY (SELECT * FROM nosuch) TO STDOUT",
            {"nosuch"},
            Missing("42P01", MISSING.format("nosuch"), 21),
        ),
        (
            "SELECT * FROM otherdb.billing.nosuch",
            {"billing.nosuch"},
            Missing(
                "0A000",
                'cross-database references are not implemented: "otherdb.billing.nosuch"',
                15,
            ),
        ),
        (
            "SELECT * FROM db.billing.nosuch",
            {"billing.nosuch"},
            Missing("42P01", MISSING.format("billing.nosuch"), 15),
        ),
        (
            "SELECT * FROM pg_temp.nosuch",
            {"nosuch"},
            Missing("42P01", MISSING.format("pg_temp.nosuch"), 15),
        ),
        # characters, not bytes
        ('SELECT é, * FROM "Nö"', {"Nö"}, Missing("42P01", MISSING.format("Nö"), 18)),
        # a WITH query defined later in the same list
        (
            "WITH a AS (SELECT * FROM b), b AS (SELECT 1) SELECT * FROM a",
            {"b"},
            Missing(
                "42P01",
                MISSING.format("b"),
                26,
                'There is a WITH item named "b", but it cannot be referenced from this part '
                "of the query.",
                "Use WITH RECURSIVE, or re-order the WITH items to remove forward references.",
            ),
        ),
        # a WITH query itself is no relation; one referencing itself is no forward reference
        (
            "WITH b AS (SELECT 1) SELECT * FROM b, nosuch",
            {"nosuch"},
            Missing("42P01", MISSING.format("nosuch"), 39),
        ),
        (
            "WITH a AS (SELECT * FROM a) SELECT 1",
            {"a"},
            Missing("42P01", MISSING.format("a"), 26),
        ),
        # columns (or functions) of a FROM item
        (
            "SELECT c.emai FROM billing.customers c",
            {"column or function emai"},
            Missing("42703", "column c.emai does not exist", 8),
        ),
        (
            "SELECT billing.customers.emai FROM billing.customers",
            {"column or function emai"},
            Missing("42703", "column customers.emai does not exist", 8),
        ),
        (
            "SELECT (c).emai FROM billing.customers c",
            {"column or function emai"},
            Missing("42703", "column c.emai does not exist", 9),
        ),
        (
            "SELECT x.emai FROM billing.customers c",
            {"column or function emai"},
            Missing("42P01", 'missing FROM-clause entry for table "x"', 8),
        ),
    ],
)
def test_the_servers_error(sql: str, unknown: set[str], expected: Missing) -> None:
    assert missing_name(sql, unknown, FULL, "db") == expected


@pytest.mark.parametrize(
    ("sql", "unknown"),
    [
        # it exists, as a relation pgveil does not read
        ("SELECT * FROM billing.xdrs_seq", {"billing.xdrs_seq"}),
        ("SELECT * FROM lonely_seq", {"lonely_seq"}),
        # in a temporary schema pgveil cannot see
        ("SELECT * FROM pg_temp_3.t", {"pg_temp_3.t"}),
        # the same text creates it
        ("CREATE TABLE public.t (a int); SELECT * FROM public.t", {"public.t"}),
        ("CREATE TABLE t AS SELECT 1; SELECT * FROM t", {"t"}),
        # an indirection on an expression: what the server says depends on its type
        ("SELECT (row(1)).emai", {"column or function emai"}),
        # not a name the statement writes where pgveil looks
        ("SELECT 1", {"nosuch"}),
        # not SQL
        ("SELEC 1", {"nosuch"}),
    ],
)
def test_no_error_where_it_cannot_be_told(sql: str, unknown: set[str]) -> None:
    assert missing_name(sql, unknown, FULL, "db") is None


def test_a_catalog_that_does_not_list_every_relation_tells_nothing() -> None:
    assert missing_name("SELECT * FROM nosuch", {"nosuch"}, CATALOG, "db") is None


def test_created_here() -> None:
    sql = "CREATE TABLE public.t (a int); CREATE VIEW v AS SELECT 1; SELECT * FROM public.t, v"
    assert created_here(sql, {"public.t"}) == "public.t"
    assert created_here(sql, {"v"}) == "v"
    assert created_here(sql, {"w"}) is None
    assert created_here("SELECT 1 INTO TEMP t2; TABLE t2", {"t2"}) == "t2"
