"""The analyser pins built-in calls to pg_catalog without changing what the server runs:
the forms the server resolves only unqualified, and calls the parser pins itself. (Every
built-in against a server: tests/integration/test_builtin_pins.py.)"""

from __future__ import annotations

import dataclasses

import pytest

from rules.analyzer import Analyzer
from rules.catalog import ProtectionMap
from rules.loader import parse_rules
from tests.unit.rules.fixtures import CATALOG, RULES

BUILTINS = CATALOG.builtin_functions | {"unnest", "generate_series", "json_object", "name"}
ROW_FUNCTIONS = frozenset({"to_json", "row_to_json", "count"})
COLUMNS = frozenset({"name", "email", "i_customer"})
OUTPUTS = {"pg_partition_tree": frozenset({"relid", "isleaf"}), "each": frozenset({"value"})}
AN = Analyzer(
    ProtectionMap(
        parse_rules(RULES, "r", {"K": "k" * 32}),
        dataclasses.replace(
            CATALOG,
            builtin_functions=BUILTINS | {"pg_partition_tree"},
            row_functions=ROW_FUNCTIONS,
            column_names=COLUMNS,
            function_outputs=OUTPUTS,
        ),
    )
)


@pytest.mark.parametrize(
    ("sql", "sent"),
    [
        (
            "SELECT * FROM unnest(ARRAY[1], ARRAY['a'])",
            "SELECT * FROM ROWS FROM (pg_catalog.unnest(ARRAY[1]), pg_catalog.unnest(ARRAY['a']))",
        ),
        (
            "SELECT * FROM unnest(a, b, c) WITH ORDINALITY AS t(x, y, z, n)",
            "ROWS FROM (pg_catalog.unnest(a), pg_catalog.unnest(b), pg_catalog.unnest(c)) "
            "WITH ORDINALITY AS t (x, y, z, n)",
        ),
        (
            "SELECT * FROM ROWS FROM (unnest(a, b), generate_series(1, 2))",
            "ROWS FROM (pg_catalog.unnest(a), pg_catalog.unnest(b), "
            "pg_catalog.generate_series(1, 2))",
        ),
        (
            "SELECT * FROM billing.accounts x, LATERAL unnest(ARRAY[x.i_account], ARRAY[x.ip])",
            "LATERAL ROWS FROM (pg_catalog.unnest(ARRAY[x.i_account]), pg_catalog.unnest(ARRAY[x.ip]))",
        ),
        # one array, or decorations: an ordinary call, pinned
        ("SELECT * FROM unnest(ARRAY[1])", "FROM pg_catalog.unnest(ARRAY[1])"),
        ("SELECT * FROM unnest(a, VARIADIC b)", "FROM pg_catalog.unnest(a, VARIADIC b)"),
        ("SELECT unnest(ARRAY[1], ARRAY[2])", "SELECT pg_catalog.unnest(ARRAY[1], ARRAY[2])"),
        # pinned by the parser from a plain call: sent qualified
        ("SELECT json_object(ARRAY['a', 'b'])", "SELECT pg_catalog.json_object(ARRAY['a', 'b'])"),
        # a field in function notation (no built-in `name` takes a row): the field
        ("SELECT name(c) FROM billing.customers c", "SELECT ((c)).name FROM (SELECT"),
        ("SELECT name(c.*) FROM billing.customers c", "SELECT ((c)).name FROM (SELECT"),
        # ... but not with an argument that may be no whole row, nor a built-in taking rows
        ("SELECT name(c.email) FROM billing.customers c", "SELECT pg_catalog.name(c.email)"),
        ("SELECT name(email) FROM billing.customers c", "SELECT pg_catalog.name(email)"),
        ("SELECT name('x')", "SELECT pg_catalog.name('x')"),
        ("SELECT to_json(c) FROM billing.customers c", "SELECT pg_catalog.to_json(c)"),
    ],
)
def test_sent(sql: str, sent: str) -> None:
    d = AN.analyze(sql)
    assert d.action == "rewrite", d.reason
    assert d.sql is not None and sent in d.sql, d.sql


@pytest.mark.parametrize(
    "sql",
    [
        "SELECT pg_catalog.json_object(ARRAY['a', 'b'])",  # written qualified
        "SELECT extract(year FROM CAST(NULL AS date))",  # SQL syntax: every grammar pins it
        "SELECT 1 WHERE 'a' LIKE 'b'",
    ],
)
def test_qualified_or_standard_syntax_is_sent_as_written(sql: str) -> None:
    assert AN.analyze(sql).action == "pass"


@pytest.mark.parametrize(
    ("sql", "known"),
    [
        # an output column of the function the FROM item calls: a field the server reads
        ("SELECT ppt.isleaf FROM pg_partition_tree('t') ppt", True),
        ("SELECT pg_partition_tree.isleaf FROM pg_partition_tree('t')", True),
        ("SELECT (pg_partition_tree('t')).isleaf", True),
        ("SELECT p.isleaf FROM ROWS FROM (pg_partition_tree('t'), generate_series(1, 2)) p", True),
        # anywhere else the server reads isleaf(x): a function pgveil may not know yet
        ("SELECT c.isleaf FROM billing.customers c", False),
        ("SELECT c.isleaf FROM billing.customers c, pg_partition_tree('t') ppt", False),
        ("SELECT ppt.isleaf FROM pg_partition_tree('t') ppt(a, b)", False),
        ("SELECT ppt.value FROM pg_partition_tree('t') ppt", False),
        ("SELECT (pg_partition_tree('t')).value", False),
    ],
)
def test_function_output_names_are_fields_only_of_their_function(sql: str, known: bool) -> None:
    d = AN.analyze(sql)
    assert d.action != "refuse", d.reason
    assert (d.unknown_relations == ()) is known, d.unknown_relations
