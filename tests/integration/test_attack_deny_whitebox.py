"""White-box attacks on deny columns read as NULL, their write guard, system columns and the
pins of built-ins (a review of rules/reads.py and rules/writes.py). Each read or oracle case
is proven to show a deny value, or to answer a right and a wrong guess differently, when
sent to PostgreSQL directly; through pgveil (psycopg and asyncpg) it must not.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import psycopg
import pytest

from proxy.demo.embedded_pg import EmbeddedPostgres
from tests.integration.attack_clients import Clients, errors_in, open_clients
from tests.integration.deny_fixture import (
    assert_guesses_alike,
    assert_guesses_differ_directly,
    denied_leaks,
)
from tests.integration.masking_fixture import dsn
from tests.support import ProxyProcess

ROLLBACK = "ROLLBACK"


@pytest.fixture(scope="module")
def clients(pg: EmbeddedPostgres, deny_proxy: ProxyProcess) -> Iterator[Clients]:
    with open_clients(pg, deny_proxy.port) as c:
        yield c


# what the server computes from a deny column, in places a review of the rewrite named
ORACLES: list[tuple[str, Any]] = [
    ("regex", "SELECT count(*) FROM dn.users WHERE passcode ~ ('^' || left({g}, 9))"),
    ("starts_with", "SELECT count(*) FROM dn.users WHERE starts_with(passcode, left({g}, 9))"),
    ("position", "SELECT max(position(left({g}, 9) IN passcode)) FROM dn.users"),
    ("distinct_from", "SELECT count(*) FROM dn.users WHERE passcode IS NOT DISTINCT FROM {g}"),
    ("coalesce", "SELECT count(*) FROM dn.users WHERE coalesce(passcode, 'x') = {g}"),
    ("nullif", "SELECT count(nullif(passcode, {g})) FROM dn.users"),
    (
        "greatest",
        "SELECT count(*) FILTER (WHERE greatest(passcode, {g}) = passcode) FROM dn.users",
    ),
    ("collate", 'SELECT count(*) FROM dn.users WHERE passcode COLLATE "C" = {g}'),
    ("bytea", "SELECT count(*) FROM dn.users WHERE passcode::bytea = convert_to({g}, 'UTF8')"),
    ("array_position", "SELECT array_position(array_agg(passcode), {g}) FROM dn.users"),
    (
        "percentile",
        "SELECT percentile_disc(1) WITHIN GROUP (ORDER BY passcode = {g}) FROM dn.users",
    ),
    (
        "window_partition",
        "SELECT count(*) OVER (PARTITION BY passcode = {g}) FROM dn.users ORDER BY id",
    ),
    ("lag", "SELECT lag(passcode) OVER (ORDER BY id) = {g} FROM dn.users ORDER BY id"),
    ("rollup", "SELECT count(*) FROM dn.users GROUP BY ROLLUP (passcode = {g}) ORDER BY 1"),
    ("order_using", "SELECT id FROM dn.users ORDER BY passcode = {g} USING <, id"),
    (
        "lateral",
        "SELECT count(*) FROM dn.users u, LATERAL (SELECT u.passcode AS x) s WHERE x = {g}",
    ),
    (
        "correlated",
        "SELECT count(*) FROM dn.sessions s WHERE EXISTS "
        "(SELECT 1 FROM dn.users u WHERE u.passcode = s.passcode AND u.passcode = {g})",
    ),
    (
        "tablesample",
        "SELECT count(*) FROM dn.sessions TABLESAMPLE BERNOULLI "
        "(CASE WHEN (SELECT passcode FROM dn.users WHERE id = 1) = {g} THEN 100 ELSE 0 END)",
    ),
    (
        "whole_row_md5",
        "SELECT md5(u::text) = md5(replace(u::text, {g}, '')) FROM dn.users u WHERE id = 1",
    ),
    (
        "json_path",
        "SELECT count(*) FROM dn.users WHERE jsonb_path_exists(to_jsonb(passcode), '$ ? (@ == $g)', jsonb_build_object('g', {g}))",
    ),
    (
        "explain_analyze_rows",
        "EXPLAIN (ANALYZE, COSTS OFF, TIMING OFF, SUMMARY OFF) SELECT * FROM dn.users WHERE passcode = {g}",
    ),
    (
        "view_cte_join",
        "WITH v AS (SELECT * FROM dn.user_view) SELECT count(*) FROM v JOIN dn.sessions s USING (passcode) WHERE s.passcode = {g}",
    ),
    (
        "prepared_execute",
        (
            "PREPARE q(text) AS SELECT count(*) FROM dn.users WHERE passcode = $1",
            "EXECUTE q({g})",
            "DEALLOCATE q",
        ),
    ),
    (
        "insert_select_where",
        (
            "BEGIN",
            "INSERT INTO dn.sessions (id) SELECT 99 WHERE (SELECT passcode FROM dn.users WHERE id = 1) = {g} RETURNING id",
            ROLLBACK,
        ),
    ),
    (
        "update_returning_subquery",
        (
            "BEGIN",
            "UPDATE dn.sessions SET user_id = user_id WHERE id = 1 RETURNING (SELECT count(*) FROM dn.users WHERE passcode = {g})",
            ROLLBACK,
        ),
    ),
    (
        "writable_cte_guess",
        (
            "BEGIN",
            "WITH w AS (UPDATE dn.users SET passcode = {g} WHERE id = 2 RETURNING id) SELECT * FROM w",
            ROLLBACK,
        ),
    ),
    (
        "view_insert_guess",
        ("BEGIN", "INSERT INTO dn.user_view (id, passcode) VALUES (80, {g})", ROLLBACK),
    ),
    (
        "prepared_write_guess",
        (
            "BEGIN",
            "PREPARE w(text) AS INSERT INTO dn.users (id, passcode) VALUES (81, $1)",
            "EXECUTE w({g})",
            ROLLBACK,
        ),
    ),
    (
        "positional_insert_guess",
        ("BEGIN", "INSERT INTO dn.users VALUES (82, 'x', {g})", ROLLBACK),
    ),
]


@pytest.mark.parametrize(("case_id", "sql"), ORACLES, ids=[c[0] for c in ORACLES])
def test_oracle_answers_differ_directly(clients: Clients, case_id: str, sql: Any) -> None:
    assert_guesses_differ_directly(clients, sql)


@pytest.mark.parametrize("client", ["psycopg", "asyncpg"])
@pytest.mark.parametrize(("case_id", "sql"), ORACLES, ids=[c[0] for c in ORACLES])
def test_oracle_answers_alike_through_pgveil(
    clients: Clients, client: str, case_id: str, sql: Any
) -> None:
    assert_guesses_alike(clients, client, sql)


def test_a_column_dropped_since_the_catalog_read_moves_no_value_into_a_deny_column(
    pg: EmbeddedPostgres, deny_proxy: ProxyProcess
) -> None:
    """By position, `INSERT INTO t VALUES (...)` fills the columns the server has now:
    with `gone` dropped after pgveil read the catalog, the second value would go into the
    deny column `passcode` where pgveil's catalog still has `gone`. pgveil names the columns
    it guards: the server then says `gone` does not exist (or, once pgveil has read the
    catalog again, the value is refused)."""
    pg.psql("ALTER TABLE dn.wb DROP COLUMN gone")
    try:
        with psycopg.connect(dsn(pg, deny_proxy.port), autocommit=True) as c:
            with pytest.raises(
                (psycopg.errors.UndefinedColumn, psycopg.errors.InsufficientPrivilege)
            ):
                c.execute("INSERT INTO dn.wb VALUES (1, 'a value of mine')")
        with psycopg.connect(pg.dsn() + " sslmode=disable") as c:
            assert c.execute("SELECT count(*) FROM dn.wb").fetchone() == (0,)
    finally:
        pg.psql("DELETE FROM dn.wb; ALTER TABLE dn.wb ADD COLUMN gone text")


def test_the_marker_spelled_by_a_statement_names_what_it_names(clients: Clients) -> None:
    """A statement can make the server quote pgveil's marker itself: it gets pgveil's
    refusal for a deny column of the rules (text it chose, naming a column it names), and
    the server's (scrubbed) error for anything else; never a value."""
    got = clients.run("psycopg", "SELECT 'pgveil_deny_write dn.users.passcode'::int")
    assert [e[0] for e in errors_in(got)] == ["42501"], got
    got = clients.run("psycopg", "SELECT 'pgveil_deny_write dn.users.login'::int")
    assert [e[0] for e in errors_in(got)] == ["22P02"] and not denied_leaks(got), got
