"""Which subjects a statement's shape proves (rules/subjects.py): the keys it names, and the
tables whose keys in the rows returned are proof. The same statements run against a real
PostgreSQL in tests/integration/test_audit_evasion_subjects.py."""

from __future__ import annotations

import dataclasses
from decimal import Decimal

import pytest
from pglast import parse_sql

from rules.catalog import Catalog, ProtectionMap
from rules.context import MaskingContext
from rules.loader import parse_rules
from rules.subjects import NamedKeys, ParamKey, bound_keys, statement_subjects
from tests.unit.rules.fixtures import CATALOG, RULES

C, A = "billing.customers", "billing.accounts"
BUILTINS = CATALOG.builtin_functions | {"lag", "row_number", "query_to_xml", "generate_series"}
CAT = dataclasses.replace(
    CATALOG,
    builtin_functions=BUILTINS,
    column_names=frozenset(
        {"i_customer", "name", "email", "phone", "cc_number", "login", "extra", "balance"}
        | {"i_account", "ip", "id", "body"}
    ),
    shadowing_operators=frozenset({"||"}),
)


def pmap(catalog: Catalog = CAT) -> ProtectionMap:
    return ProtectionMap(parse_rules(RULES, "r", {"K": "k" * 32}), catalog)


def subjects(sql: str) -> tuple[list[tuple[str, tuple[object, ...]]], tuple[str, ...]]:
    named, rows = statement_subjects(pmap(), parse_sql(sql))
    return [(n.table, n.keys) for n in named], rows


@pytest.mark.parametrize(
    ("sql", "keys"),
    [
        ("SELECT email FROM billing.customers WHERE i_customer = 2", ("2",)),
        ("SELECT email FROM billing.customers WHERE 2 = i_customer AND email IS NULL", ("2",)),
        (
            "SELECT email FROM billing.customers c WHERE (c.i_customer = 2 AND true) AND 1 = 1",
            ("2",),
        ),
        ("SELECT email FROM billing.customers WHERE i_customer = 2.0", ("2",)),
        ("SELECT email FROM billing.customers WHERE i_customer = 2e0", ("2",)),
        ("SELECT email FROM billing.customers WHERE i_customer = '0002'", ("2",)),
        ("SELECT email FROM billing.customers WHERE i_customer = ' 2 '", ("2",)),
        # E'' escapes are read whatever standard_conforming_strings says
        ("SELECT email FROM billing.customers WHERE i_customer = E'\\x32'", ("2",)),
        ("SELECT email FROM billing.customers WHERE i_customer = +2", ("2",)),
        ("SELECT email FROM billing.customers WHERE i_customer = -2", ("-2",)),
        ("SELECT email FROM billing.customers WHERE i_customer = 3::boolean::int", ("1",)),
        ("SELECT email FROM billing.customers WHERE i_customer = 2::numeric", ("2",)),
        ("SELECT email FROM billing.customers WHERE i_customer = 2.5", ()),  # matches nothing
        ("SELECT email FROM billing.customers WHERE i_customer IN ('2.0', 2.5)", ("2",)),
        ("SELECT email FROM billing.customers WHERE i_customer IN (1, 2, 1)", ("1", "2")),
        (
            "SELECT email FROM billing.customers WHERE i_customer IN (2, 99999999999999999999)",
            ("2",),
        ),
        ("SELECT count(*) FROM billing.customers WHERE i_customer = 2", ("2",)),
        ("SELECT lag(email) OVER () FROM billing.customers WHERE i_customer = 2", ("2",)),
        ("UPDATE billing.customers SET name = 'x' WHERE i_customer = 2", ("2",)),
        ("UPDATE billing.customers SET i_customer = 9 WHERE i_customer = 2", ("2",)),
        ("DELETE FROM billing.accounts WHERE i_account = 10", ("10",)),
        (
            "INSERT INTO billing.customers (i_customer, name) VALUES (30, 'x'), ('31', 'y')",
            ("30", "31"),
        ),
        ("INSERT INTO billing.customers (i_customer, name) VALUES (30.5, 'x')", ("31",)),
        (
            "INSERT INTO billing.customers (i_customer, name) VALUES (30, 'x') "
            "ON CONFLICT (i_customer) DO UPDATE SET name = excluded.name",
            ("30",),
        ),
        (
            "INSERT INTO billing.customers (i_customer, name) VALUES (30, 'x') "
            "ON CONFLICT DO NOTHING",
            ("30",),
        ),
        ("SELECT email FROM billing.customers WHERE i_customer = $1", (ParamKey(1),)),
        (
            "SELECT email FROM billing.customers WHERE i_customer IN ($1::int4, -$2, 3)",
            (ParamKey(1, ("int4",)), ParamKey(2, ("-",)), "3"),
        ),
    ],
)
def test_named_keys(sql: str, keys: tuple[object, ...]) -> None:
    named, _rows = subjects(sql)
    assert named == [(C if "customers" in sql else A, keys)]


@pytest.mark.parametrize(
    "sql",
    [
        # other relations, or the same one again, in the statement
        "SELECT (SELECT email FROM billing.customers c2 WHERE c2.i_customer = 2) "
        "FROM billing.customers WHERE i_customer = 1",
        "SELECT email FROM billing.customers WHERE i_customer = 1 AND EXISTS "
        "(SELECT 1 FROM billing.customers d WHERE d.email = 'a')",
        "SELECT email FROM billing.customers WHERE i_customer = 1 AND EXISTS "
        "(SELECT 1 FROM billing.customer_view)",
        "SELECT c.email FROM billing.customers c JOIN billing.accounts a USING (i_customer) "
        "WHERE c.i_customer = 1",
        "UPDATE billing.customers c SET name = d.name FROM billing.customers d "
        "WHERE c.i_customer = 1",
        "DELETE FROM billing.accounts a USING billing.accounts b WHERE a.i_account = 10",
        "INSERT INTO billing.customers (i_customer, name) VALUES "
        "(31, (SELECT name FROM billing.customers WHERE i_customer = 2))",
        "INSERT INTO billing.customers (i_customer, name) VALUES (31, 'x') "
        "RETURNING (SELECT email FROM billing.customers WHERE i_customer = 2)",
        "INSERT INTO billing.customers (i_customer, name) SELECT 31, 'x'",
        "INSERT INTO billing.customers (i_customer, email) VALUES (31, 'x') "
        "ON CONFLICT (email) DO UPDATE SET name = 'n'",
        "INSERT INTO billing.customers (name) VALUES ('x')",
        "INSERT INTO billing.customers (i_customer, name) VALUES (DEFAULT, 'x')",
        "WITH x AS (SELECT 1) SELECT email FROM billing.customers WHERE i_customer = 1",
        "SELECT email FROM billing.customers WHERE i_customer = 1 "
        "UNION ALL SELECT email FROM billing.customers WHERE i_customer = 2",
        # the key column renamed: `i_customer` is the name column here
        "SELECT email FROM billing.customers c(name, i_customer) WHERE c.i_customer = '2'",
        # keys pgveil cannot read as the server does
        "SELECT email FROM billing.customers WHERE i_customer = 2::float8",
        "SELECT email FROM billing.customers WHERE i_customer = '2'::text",
        "SELECT email FROM billing.customers WHERE i_customer = 2::numeric(3, 0)",
        "SELECT email FROM billing.customers WHERE i_customer = '\\x32'",
        "SELECT email FROM billing.customers WHERE i_customer = ANY('{1,2}')",
        "SELECT email FROM billing.customers WHERE i_customer = 1 OR i_customer = 2",
        "SELECT email FROM billing.customers WHERE i_customer = '2' COLLATE \"C\"",
        # code that may read any row
        "SELECT billing.leak() FROM billing.customers WHERE i_customer = 1",
        "SELECT query_to_xml('x', true, true, '') FROM billing.customers WHERE i_customer = 1",
        "SELECT email FROM billing.customers c WHERE i_customer = 1 AND c.invoice_total IS NULL",
        "SELECT email || 'x' FROM billing.customers WHERE i_customer = 1",  # shadowed ||
        "SELECT email FROM billing.customers WHERE i_customer = 1 AND name ==== 'x'",
        # a relation the catalog does not know (a temporary copy, a new view)
        "SELECT email FROM billing.customers WHERE i_customer = 1 AND EXISTS (SELECT 1 FROM t)",
        "SELECT email FROM billing.customers WHERE i_customer = 1 AND EXISTS "
        "(SELECT 1 FROM pg_stats)",
    ],
)
def test_nothing_named(sql: str) -> None:
    named, _rows = subjects(sql)
    assert named == []


@pytest.mark.parametrize(
    ("sql", "rows"),
    [
        ("SELECT i_customer, email FROM billing.customers", (C,)),
        ("TABLE billing.customers", (C,)),
        ("SELECT * FROM billing.customers c WHERE c.email LIKE 'a%' ORDER BY 1 LIMIT 1", (C,)),
        ("SELECT i_customer, email FROM billing.customers FOR UPDATE OF customers", (C,)),
        (
            "SELECT c.i_customer, a.i_account, a.ip FROM billing.customers c "
            "JOIN billing.accounts a USING (i_customer)",
            (A, C),
        ),
        (
            "SELECT c.i_customer, x.n FROM billing.customers c, LATERAL "
            "(SELECT count(*) AS n FROM public.notes WHERE id = c.i_customer) x",
            (C,),
        ),
        (
            "SELECT c.i_customer, g FROM billing.customers c, generate_series(1, 2) g",
            (C,),
        ),
        ("UPDATE billing.customers SET name = 'x' RETURNING i_customer", (C,)),
        ("DELETE FROM billing.accounts WHERE ip IS NULL RETURNING *", (A,)),
        ("INSERT INTO billing.customers (name) VALUES ('x') RETURNING i_customer", (C,)),
        (
            "SELECT i_customer FROM billing.customers WHERE i_customer IN "
            "(SELECT id FROM public.notes)",
            (C,),
        ),
        ("PREPARE p AS SELECT i_customer, email FROM billing.customers", (C,)),
        ("SELECT c.k, c.e FROM billing.customers c(k, e)", (C,)),
        ("DECLARE k CURSOR FOR SELECT i_customer, email FROM billing.customers", (C,)),
        (
            "BEGIN; SELECT i_customer FROM billing.customers; SELECT i_account "
            "FROM billing.accounts; COMMIT",
            (A, C),
        ),
    ],
)
def test_returned_keys_prove(sql: str, rows: tuple[str, ...]) -> None:
    assert subjects(sql)[1] == rows


@pytest.mark.parametrize(
    ("sql", "rows"),
    [
        ("SELECT c.i_customer, d.email FROM billing.customers c, billing.customers d", ()),
        ("SELECT i_customer, email FROM billing.customers, billing.customers_eu", ()),
        (
            "SELECT i_customer, (SELECT max(email) FROM billing.customers) FROM billing.customers",
            (),
        ),
        (
            "SELECT c.i_customer, x.email FROM billing.customers c, LATERAL "
            "(SELECT email FROM billing.customers d WHERE d.i_customer = c.i_customer + 1) x",
            (),
        ),
        ("SELECT s.i_customer, s.email FROM (SELECT * FROM billing.customers) s", ()),
        ("SELECT i_customer, lag(email) OVER () FROM billing.customers", ()),
        ("SELECT i_customer, max(email) FROM billing.customers GROUP BY 1", ()),
        ("SELECT i_customer FROM billing.customers UNION SELECT 1", ()),
        ("WITH x AS (SELECT 1) SELECT i_customer, email FROM billing.customers", ()),
        ("SELECT c.i_customer, v.name FROM billing.customers c, billing.customer_view v", ()),
        ("SELECT i_customer, email FROM billing.customers, t", ()),
        ("SELECT i_customer, billing.leak() FROM billing.customers", ()),
        ("UPDATE billing.customers SET name = 'x'", ()),
        ("UPDATE billing.customers SET i_customer = i_customer + 1 RETURNING i_customer", ()),
        (
            "UPDATE billing.customers c SET name = d.name FROM billing.customers d "
            "RETURNING c.i_customer",
            (),
        ),
        (
            "INSERT INTO billing.customers (i_customer, name) SELECT i_customer + 100, name "
            "FROM billing.customers RETURNING i_customer",
            (),
        ),
        (
            "INSERT INTO billing.customers (i_customer, email) VALUES (1, 'x') "
            "ON CONFLICT (email) DO UPDATE SET i_customer = 5 RETURNING i_customer",
            (),
        ),
        (
            "UPDATE billing.customers SET name = 'x' WHERE i_customer = 1; "
            "SELECT i_customer FROM billing.customers",
            (),
        ),
        ("COPY billing.customers TO STDOUT", ()),
        ("EXPLAIN ANALYZE SELECT i_customer FROM billing.customers", ()),
        ("CREATE TEMP TABLE x AS SELECT i_customer FROM billing.customers", ()),
    ],
)
def test_returned_keys_prove_nothing(sql: str, rows: tuple[str, ...]) -> None:
    assert subjects(sql)[1] == rows


def test_a_text_column_under_a_nondeterministic_collation_names_no_key() -> None:
    relations = dict(CAT.relations)
    rel = relations[("billing", "customers")]
    key = dataclasses.replace(rel.columns[0], deterministic=False)
    relations[("billing", "customers")] = dataclasses.replace(rel, columns=(key, *rel.columns[1:]))
    catalog = dataclasses.replace(CAT, relations=relations, by_oid={})
    named, _ = statement_subjects(
        pmap(catalog), parse_sql("SELECT email FROM billing.customers WHERE i_customer = 2")
    )
    assert [n.keys for n in named] == [("2",)]  # (an integer: its collation does not count)
    text_key = dataclasses.replace(key, type=dataclasses.replace(key.type, name="text"))
    relations[("billing", "customers")] = dataclasses.replace(
        rel, columns=(text_key, *rel.columns[1:])
    )
    catalog = dataclasses.replace(CAT, relations=relations, by_oid={})
    named, _ = statement_subjects(
        pmap(catalog), parse_sql("SELECT email FROM billing.customers WHERE i_customer = 'ab'")
    )
    assert named == ()


def test_parameters_are_read_when_bound() -> None:
    (named,), _ = statement_subjects(
        pmap(),
        parse_sql("SELECT email FROM billing.customers WHERE i_customer IN ($1, $2::numeric)"),
    )
    assert isinstance(named, NamedKeys) and named.unknown_as == "numeric"
    values = {1: ("unknown", "0002"), 2: ("numeric", Decimal("2.5"))}
    assert bound_keys(named, lambda p: values[p.number]) == frozenset({"2"})
    assert bound_keys(named, lambda p: None) is None  # NULL: not read


@pytest.mark.parametrize(
    "form",
    ["{}", "'{}'", "{}.0", "{}e0", "+{}", "'{}'::int8", "{}::numeric", "' {} '", "{}::int2"],
)
def test_every_statement_of_a_shape_gets_its_own_keys(form: str) -> None:
    """Statements that differ only in literals share one analysis; their keys are read
    from each statement's own literals, as the full analysis reads them."""
    ctx = MaskingContext(parse_rules(RULES, "r", {"K": "k" * 32}), CATALOG)
    shape = "UPDATE billing.customers SET name = 'x' WHERE i_customer IN ({}, {})"
    for a, b in ((1, 2), (3, 4), (5, 5)):
        sql = shape.format(form.format(a), form.format(b))
        fast, full = ctx.analyze(sql), ctx.analyzer.analyze(sql)
        assert fast.subject_keys == full.subject_keys
        assert [n.keys for n in fast.subject_keys] == [tuple(dict.fromkeys((str(a), str(b))))]


def test_a_shape_does_not_carry_one_statements_keys_to_another() -> None:
    ctx = MaskingContext(parse_rules(RULES, "r", {"K": "k" * 32}), CATALOG)
    shape = "SELECT email FROM billing.customers WHERE i_customer IN ({}, {})"
    assert [n.keys for n in ctx.analyze(shape.format("1", "2")).subject_keys] == [("1", "2")]
    # the same shape with literals whose types make the server compare as numeric
    assert [n.keys for n in ctx.analyze(shape.format("'2.0'", "2.5")).subject_keys] == [("2",)]
    assert ctx.analyze(shape.format("'x'", "2")).subject_keys == ()


def test_a_key_moved_in_a_table_named_without_its_schema() -> None:
    """Two protected tables named `customers`: the search path says which one an UPDATE
    writes; the key it sets may be either's."""
    relations = dict(CAT.relations)
    base = relations[("billing", "customers")]
    relations[("archive", "customers")] = dataclasses.replace(base, oid=200, schema="archive")
    catalog = dataclasses.replace(CAT, relations=relations, by_oid={})
    rules = (
        RULES + "  archive.customers:\n    subject: i_customer\n    columns:\n      name: partial\n"
    )
    protection = ProtectionMap(parse_rules(rules, "r", {"K": "k" * 32}), catalog)
    moved = "UPDATE customers SET i_customer = i_customer + 1 RETURNING i_customer"
    kept = "UPDATE customers SET name = 'x' RETURNING i_customer"
    assert statement_subjects(protection, parse_sql(moved))[1] == ()
    assert statement_subjects(protection, parse_sql(kept))[1] == ("archive.customers", C)


def test_a_masked_key_names_no_subject() -> None:
    """A masked session's `login = 'x'` compares the masked (hashed) login: the literal is
    no subject's key."""
    rules = RULES.replace("subject: i_customer", "subject: login")
    protection = ProtectionMap(parse_rules(rules, "r", {"K": "k" * 32}), CAT)
    sql = "SELECT name FROM billing.customers WHERE login = 'x'"
    assert statement_subjects(protection, parse_sql(sql))[0] == ()


def test_deeply_nested_keys_are_read_without_recursion() -> None:
    """(The analyser's own walk may still refuse such a statement: not this module's.)"""
    sql = (
        "SELECT name FROM billing.customers WHERE "
        + "(" * 300
        + "i_customer = " + "+ " * 2000 + "1" + "::int8" * 3000
        + " AND true" + ")" * 300
    )  # fmt: skip
    named, _ = statement_subjects(pmap(), parse_sql(sql))
    assert [n.keys for n in named] == [("1",)]
