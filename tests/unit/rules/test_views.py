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
    ("billing", "v_pairs"): (
        "SELECT a.i_customer, b.name FROM billing.customers a "
        "JOIN billing.customers b ON b.i_customer = a.i_customer + 1",
        [("i_customer", "int8", "bigint"), ("name", "varchar", "varchar")],
    ),
    ("billing", "v_pairs_keyed"): (
        "SELECT a.i_customer, b.i_customer AS other, b.name FROM billing.customers a "
        "JOIN billing.customers b ON b.i_customer = a.i_customer + 1",
        [
            ("i_customer", "int8", "bigint"),
            ("other", "int8", "bigint"),
            ("name", "varchar", "varchar"),
        ],
    ),
    ("billing", "v_over_pairs"): (
        "SELECT p.i_customer, p.name FROM billing.v_pairs_keyed p",
        [("i_customer", "int8", "bigint"), ("name", "varchar", "varchar")],
    ),
    ("billing", "v_both_keys"): (
        "SELECT a.i_account, c.i_customer AS owner, c.name FROM billing.accounts a "
        "JOIN billing.customers c ON c.i_customer = a.i_customer",
        [
            ("i_account", "int8", "bigint"),
            ("owner", "int8", "bigint"),
            ("name", "varchar", "varchar"),
        ],
    ),
    ("billing", "v_key_over_view"): (
        "SELECT p.i_customer AS who, p.email FROM billing.v_plain p",
        [("who", "int8", "bigint"), ("email", "text", "text")],
    ),
    ("billing", "v_window"): (
        "SELECT c.i_customer, lag(c.name) OVER (ORDER BY c.i_customer) AS prev "
        "FROM billing.customers c",
        [("i_customer", "int8", "bigint"), ("prev", "varchar", "varchar")],
    ),
    ("billing", "v_grouped"): (
        "SELECT c.i_customer, count(*) AS n FROM billing.customers c GROUP BY c.i_customer",
        [("i_customer", "int8", "bigint"), ("n", "int8", "bigint")],
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
    sources[("billing", "v_key_over_view")] = (("billing", "v_plain"), ("billing", "customers"))
    sources[("billing", "v_over_pairs")] = (("billing", "v_pairs_keyed"),)
    for name in ("v_plain", "v_pairs", "v_pairs_keyed", "v_window", "v_grouped", "v_safe"):
        sources[("billing", name)] = (("billing", "customers"),)
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


# ---- what reading a view reads (the audit) --------------------------------------------------


def test_a_view_is_read_as_the_tables_behind_it_with_the_keys_it_shows(
    pmap: ProtectionMap,
) -> None:
    views = pmap.views
    plain = views[("billing", "v_plain")]
    assert plain.tables == ("billing.customers",) and not plain.own
    assert plain.keys == {1: ("billing.customers",)}  # i_customer, as it is
    both = views[("billing", "v_both_keys")]
    assert both.tables == ("billing.accounts", "billing.customers")
    assert both.keys == {1: ("billing.accounts",), 2: ("billing.customers",)}
    # through a view over a view, under another name
    assert views[("billing", "v_key_over_view")].keys == {1: ("billing.customers",)}
    assert views[("billing", "v_safe")].keys == {1: ("billing.customers",)}
    # a view read without rules of its own, or with none derived, is read all the same
    assert views[("billing", "customer_view")].tables == ("billing.customers",)
    assert views[("billing", "v_union")].tables == ("billing.accounts", "billing.customers")
    assert pmap.view_keys[pmap.catalog.relations[("billing", "v_plain")].oid] == plain.keys


@pytest.mark.parametrize(
    "view",
    [
        "v_pairs",  # a self-join: the key shown is one side's, the name the other's
        "v_window",  # lag(): another row's value
        "v_grouped",  # grouped rows
        "v_union",  # a set operation
        "v_scalar_subquery",  # another relation's rows in a subquery
        "v_over_view",  # the key is not returned
        "v_join",  # no key returned
        "v_renamed",
    ],
)
def test_a_view_whose_rows_may_carry_unkeyed_data_shows_no_keys(
    pmap: ProtectionMap, view: str
) -> None:
    assert pmap.views[("billing", view)].keys == {}


def test_the_analysis_names_the_tables_behind_the_views_read(pmap: ProtectionMap) -> None:
    an = Analyzer(pmap)
    d = an.analyze("SELECT p.name FROM billing.v_plain p JOIN billing.accounts a ON true")
    assert d.tables == ("billing.accounts", "billing.customers")
    assert d.views == (("billing.v_plain", ("billing.customers",)),)
    assert d.relations == ("billing.accounts", "billing.v_plain")
    # a view masked roles are refused: the walk went on, every table it reads is named
    refused = an.analyze("SELECT name FROM billing.v_union JOIN billing.accounts ON true")
    assert refused.action == "refuse" and refused.complete
    assert refused.reason is not None and "billing.v_union" in refused.reason
    assert refused.tables == ("billing.accounts", "billing.customers")
    # ... unless something else stopped it first
    stopped = an.analyze("SELECT billing.leak() FROM billing.v_union")
    assert stopped.action == "refuse" and not stopped.complete
    assert stopped.reason is not None and "billing.v_union" in stopped.reason


def test_the_analysis_notes_the_views_a_statement_creates(pmap: ProtectionMap) -> None:
    an = Analyzer(pmap)
    d = an.analyze("CREATE TEMP VIEW t AS SELECT i_customer, name FROM billing.customers")
    assert d.defines == (("pg_temp.t", ("billing.customers",)),)
    d = an.analyze("CREATE VIEW public.v AS SELECT * FROM billing.v_plain")
    assert d.defines == (("public.v", ("billing.customers",)),)
    d = an.analyze("CREATE MATERIALIZED VIEW m AS SELECT ip FROM billing.accounts; SELECT 1")
    assert d.defines == (("m", ("billing.accounts",)),)


def test_a_filter_names_keys_only_through_a_column_of_a_tables_one_occurrence(
    pmap: ProtectionMap,
) -> None:
    views = pmap.views
    assert views[("billing", "v_plain")].sole == {"billing.customers": ("i_customer",)}
    assert views[("billing", "v_both_keys")].sole == {
        "billing.accounts": ("i_account",),
        "billing.customers": ("owner",),
    }
    assert views[("billing", "v_key_over_view")].sole == {"billing.customers": ("who",)}
    # both sides' keys shown: each column shows keys, neither names all the rows' subjects
    pairs = views[("billing", "v_pairs_keyed")]
    assert pairs.keys == {1: ("billing.customers",), 2: ("billing.customers",)}
    assert pairs.sole == {}
    # a view over it that returns one side's key only: the other side's data is still there
    assert views[("billing", "v_over_pairs")].sole == {}
