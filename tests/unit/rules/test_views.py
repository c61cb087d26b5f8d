"""Masks derived from view definitions."""

from __future__ import annotations

from dataclasses import replace

import pytest

from rules.analyzer import Analyzer
from rules.catalog import ProtectionMap
from rules.loader import parse_rules
from rules.model import MaskSpec
from tests.unit.rules.fixtures import CATALOG, RULES, rel

VIEWS = {
    ("billing", "v_plain"): (
        "SELECT c.i_customer, c.name, c.email FROM billing.customers c",
        [
            ("i_customer", "int8", "bigint"),
            ("name", "varchar", "varchar"),
            ("email", "text", "text"),
        ],
    ),
    ("billing", "v_expr"): (
        "SELECT upper((c.name)::text) AS up, (c.name::text || c.email) AS both_, length(c.email) AS n FROM billing.customers c",
        [("up", "text", "text"), ("both_", "text", "text"), ("n", "int4", "integer")],
    ),
    ("billing", "v_whole"): (
        "SELECT row_to_json(c.*) AS j, c.balance FROM billing.customers c",
        [("j", "json", "json"), ("balance", "numeric", "numeric")],
    ),
    ("billing", "v_whole2"): (
        "SELECT row_to_json(c) AS j FROM billing.customers c",
        [("j", "json", "json")],
    ),
    ("billing", "v_join"): (
        "SELECT a.ip, c.name FROM billing.accounts a JOIN billing.customers c USING (i_customer)",
        [("ip", "inet", "inet"), ("name", "varchar", "varchar")],
    ),
    ("billing", "v_over_view"): (
        "SELECT p.name AS nm FROM billing.v_plain p",
        [("nm", "varchar", "varchar")],
    ),
    ("billing", "v_union"): (
        "SELECT name FROM billing.customers UNION SELECT body FROM public.notes",
        [("name", "text", "text")],
    ),
    ("billing", "v_scalar_subquery"): (
        "SELECT a.i_account, (SELECT c.name FROM billing.customers c "
        "WHERE c.i_customer = a.i_customer) AS owner FROM billing.accounts a",
        [("i_account", "int8", "bigint"), ("owner", "varchar", "varchar")],
    ),
    ("billing", "v_renamed"): (
        "SELECT c.n FROM billing.customers c(i, k, n)",
        [("n", "varchar", "varchar")],
    ),
    ("billing", "v_leak"): ("SELECT n FROM billing.leak() n", [("n", "text", "text")]),
    ("billing", "v_sql_text"): (
        "SELECT query_to_xml('SELECT name FROM billing.customers', true, true, '') AS x",
        [("x", "xml", "xml")],
    ),
    ("billing", "v_over_leak"): ("SELECT l.n FROM billing.v_leak l", [("n", "text", "text")]),
    ("billing", "v_safe"): (
        "SELECT c.i_customer, c.balance FROM billing.customers c WHERE c.name <> ''",
        [("i_customer", "int8", "bigint"), ("balance", "numeric", "numeric")],
    ),
}


@pytest.fixture(scope="module")
def pmap() -> ProtectionMap:
    relations = dict(CATALOG.relations)
    sources = dict(CATALOG.view_sources)
    defs = {}
    for i, (key, (sql, cols)) in enumerate(VIEWS.items()):
        relations[key] = rel(500 + i, key[0], key[1], cols, kind="v")
        defs[key] = sql
        sources[key] = (("billing", "customers"), ("billing", "accounts"))
    sources[("billing", "v_over_view")] = (("billing", "v_plain"), ("billing", "customers"))
    for name in ("v_leak", "v_sql_text"):
        del sources[("billing", name)]  # no table behind them: only code
    sources[("billing", "v_over_leak")] = (("billing", "v_leak"),)
    catalog = replace(
        CATALOG, relations=relations, view_sources=sources, view_definitions=defs, by_oid={}
    )
    return ProtectionMap(parse_rules(RULES, "r", {"K": "k" * 32}), catalog)


def test_derived_masks(pmap: ProtectionMap) -> None:
    d = pmap.derived_views
    assert d[("billing", "v_plain")] == {"name": MaskSpec("partial"), "email": MaskSpec("email")}
    assert d[("billing", "v_expr")] == {
        "up": MaskSpec("partial"),
        "both_": MaskSpec("null"),
        "n": MaskSpec("null"),
    }
    assert d[("billing", "v_whole")] == {"j": MaskSpec("null")}
    assert d[("billing", "v_whole2")] == {"j": MaskSpec("null")}
    assert d[("billing", "v_join")] == {"ip": MaskSpec("partial"), "name": MaskSpec("partial")}
    assert d[("billing", "v_over_view")] == {"nm": MaskSpec("partial")}
    assert ("billing", "v_union") not in d
    assert d.get(("billing", "v_safe")) == {}


def test_analyzer_masks_derived_views_and_refuses_the_rest(pmap: ProtectionMap) -> None:
    an = Analyzer(pmap)
    d = an.analyze("SELECT * FROM billing.v_plain")
    assert (
        d.action == "rewrite" and d.sql is not None and "FROM billing.v_plain) AS v_plain" in d.sql
    )
    refused = an.analyze("SELECT * FROM billing.v_union")
    assert (
        refused.action == "refuse"
        and refused.reason is not None
        and "billing.v_union" in refused.reason
    )


@pytest.mark.parametrize(
    ("view", "reason"),
    [
        # a scalar subquery in the select list resolves its names in a scope of its own
        ("v_scalar_subquery", "view billing.v_scalar_subquery reads protected table"),
        # c(i, k, n): the column named n is the table's name column
        ("v_renamed", "view billing.v_renamed reads protected table"),
        ("v_leak", "view billing.v_leak calls function billing.leak"),
        ("v_sql_text", "calls query_to_xml, which can read data pgveil cannot mask"),
        ("v_over_leak", "view billing.v_over_leak reads view billing.v_leak calls function"),
    ],
)
def test_views_pgveil_cannot_account_for_are_refused(
    pmap: ProtectionMap, view: str, reason: str
) -> None:
    d = Analyzer(pmap).analyze(f"SELECT * FROM billing.{view}")
    assert d.action == "refuse"
    assert reason in (d.reason or "")


def test_a_parent_of_a_protected_table_masks_what_it_shares_with_it() -> None:
    relations = dict(CATALOG.relations)
    relations[("public", "people")] = rel(
        600, "public", "people", [("name", "varchar", "varchar"), ("note", "text", "text")]
    )
    child = relations[("billing", "customers")]
    relations[("billing", "customers")] = replace(child, parents=(("public", "people"),))
    catalog = replace(CATALOG, relations=relations, by_oid={})
    pmap = ProtectionMap(parse_rules(RULES, "r", {"K": "k" * 32}), catalog)
    parent = pmap.by_name[("public", "people")]
    assert parent.masks == {"name": MaskSpec("partial")}
    assert parent.rule_table == "billing.customers"
    d = Analyzer(pmap).analyze("SELECT name, note FROM public.people")
    assert d.action == "rewrite" and d.columns == ("billing.customers.name",)
