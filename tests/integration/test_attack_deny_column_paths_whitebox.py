"""A masked role that has read the code gets no deny-column value by the paths beside the
masking subquery: no oracle through the write guard, ON CONFLICT or UPDATE ... FROM (a
right and a wrong guess get the same answer), no read through system columns, RETURNING
of a joined table and the other paths listed in READS, and no write into a part of a deny
column (`INSERT ... (doc['k'])`: the subscript is the client's text), which is refused and
audited as denied.

Each case is first shown to leak, or to answer a right and a wrong guess differently, when
sent to PostgreSQL directly as the same role; through pgveil (psycopg and asyncpg, psql
where output matters) it must not.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from typing import Any

import asyncpg
import psycopg
import pytest

from proxy.demo.embedded_pg import EmbeddedPostgres
from tests.integration.attack_clients import Clients, errors_in, open_clients
from tests.integration.audit_wire import all_events, wait_for
from tests.integration.deny_fixture import (
    RIGHT,
    SECRET,
    WRONG,
    answer,
    denied_leaks,
    with_guess,
)
from tests.integration.masking_fixture import HELPDESK, HELPDESK_PW, dsn
from tests.support import ProxyProcess

ROLLBACK = "ROLLBACK"


@pytest.fixture(scope="module")
def clients(pg: EmbeddedPostgres, deny_proxy: ProxyProcess) -> Iterator[Clients]:
    with open_clients(pg, deny_proxy.port) as c:
        yield c


def _super(pg: EmbeddedPostgres) -> psycopg.Connection[Any]:
    return psycopg.connect(pg.dsn() + " sslmode=disable", autocommit=True)


# ---- oracles on a deny column: the guard, ON CONFLICT, UPDATE ... FROM ------------------

ORACLES: list[tuple[str, Any]] = [
    (
        # ON CONFLICT ... DO UPDATE ... WHERE reads the stored row
        "on_conflict_where",
        (
            "BEGIN",
            "INSERT INTO dn.users (id) VALUES (1) ON CONFLICT (id) DO UPDATE SET note = 'hit' "
            "WHERE dn.users.passcode = {g} RETURNING note",
            ROLLBACK,
        ),
    ),
    (
        # the guard runs only for the rows the WHERE keeps: an error says a row matched
        "guard_runs_where_rows_match",
        (
            "BEGIN",
            "UPDATE dn.users SET passcode = 'x' WHERE passcode = {g} RETURNING id",
            ROLLBACK,
        ),
    ),
    (
        # the unique index of the deny column decides between the insert and nothing
        "on_conflict_arbiter_deny",
        (
            "BEGIN",
            "INSERT INTO dn.users (id, passcode) VALUES (77, {g}) ON CONFLICT (passcode) "
            "DO NOTHING RETURNING id",
            ROLLBACK,
        ),
    ),
    (
        "update_from_other_side",
        (
            "BEGIN",
            "UPDATE dn.sessions s SET user_id = s.user_id FROM dn.users u "
            "WHERE u.id = s.user_id AND u.passcode = {g} RETURNING s.id",
            ROLLBACK,
        ),
    ),
    (
        # a guarded value that is NULL only for a right guess
        "guard_value_reads_deny",
        (
            "BEGIN",
            "UPDATE dn.users SET passcode = CASE WHEN passcode = {g} THEN NULL ELSE 'x' END "
            "WHERE id = 1 RETURNING passcode IS NULL",
            ROLLBACK,
        ),
    ),
    (
        "delete_using_returning",
        (
            "BEGIN",
            "DELETE FROM dn.sessions s USING dn.users u WHERE s.user_id = u.id "
            "AND u.passcode = {g} RETURNING s.id",
            ROLLBACK,
        ),
    ),
    (
        "system_columns_predicate",
        "SELECT ctid, xmin, tableoid::regclass FROM dn.users WHERE passcode = {g}",
    ),
    (
        "unnest_rows_from_lateral",
        "SELECT count(*) FROM dn.users u, LATERAL unnest(ARRAY[u.passcode], ARRAY[u.id]) "
        "WITH ORDINALITY AS t(p, i, o) WHERE t.p = {g}",
    ),
    (
        "pinned_setting_then_read",
        "SET client_encoding TO 'UTF8'; SELECT count(*) FROM dn.users WHERE passcode = {g}",
    ),
    (
        "set_config_beside_read",
        "SELECT set_config('standard_conforming_strings', 'on', false), count(*) "
        "FROM dn.users WHERE passcode = {g}",
    ),
]


@pytest.mark.parametrize(("case_id", "sql"), ORACLES, ids=[c[0] for c in ORACLES])
def test_oracle_answers_differ_directly(clients: Clients, case_id: str, sql: Any) -> None:
    right = clients.run("direct", with_guess(sql, RIGHT))
    wrong = clients.run("direct", with_guess(sql, WRONG))
    assert answer(right) != answer(wrong), right


@pytest.mark.parametrize("client", ["psycopg", "asyncpg"])
@pytest.mark.parametrize(("case_id", "sql"), ORACLES, ids=[c[0] for c in ORACLES])
def test_oracle_answers_alike_through_pgveil(
    clients: Clients, client: str, case_id: str, sql: Any
) -> None:
    right = clients.run(client, with_guess(sql, RIGHT))
    wrong = clients.run(client, with_guess(sql, WRONG))
    assert answer(right) == answer(wrong), (right, wrong)
    assert not denied_leaks(right.replace(SECRET, "")), right


# ---- reads of a deny value by paths beside the masking subquery --------------------------

READS: list[tuple[str, Any]] = [
    ("system_columns_star", "SELECT ctid, xmin, tableoid::regclass, * FROM dn.users"),
    (
        "returning_joined_table",
        (
            "BEGIN",
            "DELETE FROM dn.sessions s USING dn.users u WHERE s.user_id = u.id "
            "RETURNING u.passcode, u.ctid",
            ROLLBACK,
        ),
    ),
    (
        "returning_system_columns_star",
        ("BEGIN", "UPDATE dn.users SET note = note RETURNING ctid, xmin, *", ROLLBACK),
    ),
    (
        "cursor_with_hold",
        (
            "BEGIN",
            "DECLARE wb13 CURSOR WITH HOLD FOR SELECT ctid, passcode FROM dn.users",
            "COMMIT",
            "FETCH ALL FROM wb13",
            "CLOSE wb13",
        ),
    ),
    ("copy_query_system_column", "COPY (SELECT ctid, passcode FROM dn.users) TO STDOUT"),
    ("partition_read_directly", "SELECT tableoid::regclass, payload FROM dn.events_1"),
    ("table_partition", "TABLE dn.events_1"),
    (
        "unnest_two_arrays",
        "SELECT t.* FROM dn.users u, LATERAL unnest(ARRAY[u.passcode], ARRAY[u.login]) t",
    ),
    (
        "temp_table_shadows_activity",
        (
            "CREATE TEMP TABLE pg_stat_activity (query text)",
            "SET search_path TO pg_temp, pg_catalog",
            # (directly, the first reads the temporary table; the second pg_catalog's)
            "SELECT query FROM pg_stat_activity UNION ALL "
            "SELECT query FROM pg_catalog.pg_stat_activity",
        ),
    ),
]


@pytest.fixture(scope="module")
def secret_in_activity(pg: EmbeddedPostgres) -> Iterator[None]:
    """Another session whose last statement names the canary (pg_stat_activity.query)."""
    with _super(pg) as other:
        other.execute(f"SELECT count(*) FROM dn.users WHERE passcode = '{SECRET}'")
        yield


@pytest.mark.parametrize(("case_id", "sql"), READS, ids=[c[0] for c in READS])
def test_read_leaks_directly(
    clients: Clients, secret_in_activity: None, case_id: str, sql: Any
) -> None:
    got = clients.run("direct", sql)
    assert denied_leaks(got), got


@pytest.mark.parametrize("client", ["psql", "psycopg", "asyncpg"])
@pytest.mark.parametrize(("case_id", "sql"), READS, ids=[c[0] for c in READS])
def test_read_shows_no_deny_value_through_pgveil(
    clients: Clients, secret_in_activity: None, client: str, case_id: str, sql: Any
) -> None:
    got = clients.run(client, sql)
    assert not denied_leaks(got), got
    assert [e for e in errors_in(got) if e[0] != "25P02"] == [], got


# ---- writes into a deny column ----------------------------------------------------------


def test_a_part_of_a_deny_column_is_not_written(
    pg: EmbeddedPostgres, deny_proxy: ProxyProcess
) -> None:
    """`INSERT INTO t (doc['k']) VALUES (NULL)` writes {"k": null} into the deny column
    (directly, the server does): the subscript is text of the client's, so although the
    value is NULL the write guard refuses it, through psycopg and asyncpg, and nothing is
    written."""
    insert = "INSERT INTO dn.users (id, doc['chosen by the client']) VALUES ({id}, NULL)"
    check = "SELECT doc::text FROM dn.users WHERE id = %s"
    with _super(pg) as admin:
        try:
            with psycopg.connect(dsn(pg, pg.port), autocommit=True) as direct:
                direct.execute(insert.format(id=601))
            assert admin.execute(check, (601,)).fetchone() == ('{"chosen by the client": null}',)
            with psycopg.connect(dsn(pg, deny_proxy.port), autocommit=True) as c:
                with pytest.raises(psycopg.errors.InsufficientPrivilege) as err:
                    c.execute(insert.format(id=602))
            assert "dn.users.doc" in str(err.value)
            assert admin.execute(check, (602,)).fetchone() is None

            async def run() -> str:
                conn = await asyncpg.connect(
                    host="127.0.0.1",
                    port=deny_proxy.port,
                    user=HELPDESK,
                    password=HELPDESK_PW,
                    database="postgres",
                    ssl=False,
                    server_settings={"client_encoding": "UTF8"},
                )
                try:
                    await conn.execute(insert.format(id=603))
                    return "written"
                except asyncpg.InsufficientPrivilegeError as exc:
                    return str(exc)
                finally:
                    await conn.close()

            assert asyncio.run(run()) != "written"
            assert admin.execute(check, (603,)).fetchone() is None
        finally:
            admin.execute("DELETE FROM dn.users WHERE id BETWEEN 601 AND 603")


def test_a_refused_part_of_a_deny_column_is_audited_as_denied(
    pg: EmbeddedPostgres, deny_proxy: ProxyProcess
) -> None:
    marker = "wb13_part_marker"  # a name: the audit shows it
    with psycopg.connect(dsn(pg, deny_proxy.port), autocommit=True) as c:
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            c.execute(f"INSERT INTO dn.users AS {marker} (id, doc['k']) VALUES (604, NULL)")
    path = deny_proxy.audit_path  # type: ignore[attr-defined]

    def marked() -> list[dict[str, Any]]:
        return [e for e in all_events(path) if marker in json.dumps(e.get("statement", ""))]

    wait_for(lambda: bool(marked()), "the refusal's audit event")
    events = marked()
    assert events[-1]["columns_denied"] == ["dn.users.doc"]
    assert events[-1]["decision"] == "refused"
