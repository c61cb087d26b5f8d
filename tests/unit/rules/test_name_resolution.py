"""Names read as the server reads them: words that are keywords to only one of pglast and
the server, unqualified relation names pinned where the catalog cannot vouch for them, and
attribute notation (`t.f`, `(x).f` call f)."""

from __future__ import annotations

from dataclasses import replace

import pytest

from rules.analyzer import Analyzer
from rules.catalog import ProtectionMap
from rules.grammar import misread_words
from rules.loader import parse_rules
from tests.unit.rules.fixtures import CATALOG, RULES, analyzer


def _pg15_analyzer() -> Analyzer:
    """PostgreSQL 15's keywords: pglast's, but SYSTEM_USER (reserved from 16 on)."""
    import pglast.keywords

    keywords = {w: "R" for w in pglast.keywords.RESERVED_KEYWORDS if w != "system_user"}
    keywords |= {w: "C" for w in pglast.keywords.COL_NAME_KEYWORDS}
    keywords |= {w: "T" for w in pglast.keywords.TYPE_FUNC_NAME_KEYWORDS}
    keywords |= {w: "U" for w in pglast.keywords.UNRESERVED_KEYWORDS}
    catalog = replace(CATALOG, keywords=keywords, by_oid={})
    policy = parse_rules(RULES, "rules.yaml", {"K": "k" * 32})
    return Analyzer(ProtectionMap(policy, catalog))


def test_misread_words_are_the_reserved_ones_that_differ() -> None:
    import pglast.keywords

    server = {w: "R" for w in pglast.keywords.RESERVED_KEYWORDS if w != "system_user"}
    server |= {w: "C" for w in pglast.keywords.COL_NAME_KEYWORDS}
    server["fancy_new"] = "R"  # a server newer than pglast's grammar
    assert misread_words(server) == {"system_user", "fancy_new"}
    assert misread_words({}) == frozenset()  # unknown: the parser's keywords are taken


@pytest.mark.parametrize(
    "sql",
    [
        # PostgreSQL 15 reads system_user as the alias of the write target: its whole row
        'UPDATE billing.customers AS "system_user" SET balance = 1 RETURNING system_user::text',
        "SELECT system_user",
        "SELECT x.System_User FROM public.notes x",
    ],
)
def test_a_word_the_server_reads_differently_is_refused(sql: str) -> None:
    d = _pg15_analyzer().analyze(sql)
    assert d.action == "refuse"
    assert "the server reads the word system_user differently" in (d.reason or "")


def test_quoted_and_other_words_are_fine() -> None:
    an = _pg15_analyzer()
    assert an.analyze('SELECT 1 AS "system_user"').action == "pass"
    assert an.analyze("SELECT 'system_user'").action == "pass"
    assert an.analyze("SELECT '{}'::json -- system_user").action != "refuse"


@pytest.mark.parametrize(
    ("sql", "pinned"),
    [
        # not in the catalog: the session's temporary table, whatever search_path says
        ("SELECT * FROM scratch", "pg_temp.scratch"),
        ("INSERT INTO scratch VALUES (1)", "pg_temp.scratch"),
        ("LOCK TABLE scratch", "pg_temp.scratch"),
        # a system relation's name: the system relation, not one created since
        ("SELECT * FROM pg_class", "pg_catalog.pg_class"),
    ],
)
def test_names_the_catalog_cannot_vouch_for_are_pinned(sql: str, pinned: str) -> None:
    catalog = replace(
        CATALOG,
        system_relations=frozenset({"pg_class", "tables"}),
        pg_catalog_relations=frozenset({"pg_class"}),
        by_oid={},
    )
    an = Analyzer(ProtectionMap(parse_rules(RULES, "r", {"K": "k" * 32}), catalog))
    d = an.analyze(sql)
    assert d.action == "rewrite" and d.sql is not None and pinned in d.sql, d
    if pinned.startswith("pg_temp"):
        assert d.unknown_relations == ("scratch",)


def test_known_names_are_left_as_written() -> None:
    d = analyzer().analyze("SELECT body FROM notes")
    assert d.action == "pass" and d.unknown_relations == ()


@pytest.mark.parametrize(
    ("sql", "reason"),
    [
        ("SELECT ('SELECT 1'::text).ts_stat", "function ts_stat can read data"),
        ("SELECT (s).pg_stat_get_backend_activity FROM (SELECT 1 AS i) s",
         "function pg_stat_get_backend_activity can read data"),
        ("SELECT q.ts_stat AS ts_stat FROM (SELECT 'x') AS q", "function ts_stat can read data"),
        ("SELECT (1::bigint).leak", "function leak is not allowed"),
        ("SELECT (ARRAY[1])[(SELECT length(lo_get(1)) LIMIT 1)]",
         "function lo_get can read data"),
    ],
)  # fmt: skip
def test_attribute_notation_is_a_function_call(sql: str, reason: str) -> None:
    d = analyzer().analyze(sql)
    assert d.action == "refuse" and reason in (d.reason or ""), d.reason


def test_tablesample_arguments_inside_the_masking_subquery_still_see_the_target_masked() -> None:
    d = analyzer().analyze(
        "UPDATE billing.customers c SET balance = 0 RETURNING (SELECT count(*) FROM "
        "billing.customers TABLESAMPLE BERNOULLI (length(c.name)))"
    )
    assert d.action == "rewrite" and d.sql is not None
    # the client's length(c.name), pinned, gets the masked name
    assert "pg_catalog.length(c.name)" not in d.sql
    assert "pg_catalog.length(CAST(CASE WHEN" in d.sql


def test_setting_a_personal_column_to_its_default_is_no_write_back() -> None:
    d = analyzer().analyze("UPDATE billing.customers SET phone = DEFAULT WHERE i_customer = 1")
    assert d.action == "pass", d.sql
