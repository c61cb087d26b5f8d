"""A name pgveil takes for a column must be a column: `x.name` where `name` is only an
output column of some function (json_each's `value`) is not accepted as a column of the
relation `x`, because the server reads it as a call `name(x)` (attribute notation) and a
function created after pgveil's catalog read would run on the raw row. Through pgveil such a
statement gets nothing personal: the server's own error where the column does not exist,
and after a catalog read that knows the function, its masked or refused answer.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import psycopg
import pytest

from proxy.demo.embedded_pg import EmbeddedPostgres
from tests.integration.attack_clients import Clients, errors_in, open_clients
from tests.integration.deny_fixture import (
    SECRET,
)
from tests.integration.masking_fixture import dsn
from tests.support import ProxyProcess


@pytest.fixture(scope="module")
def clients(pg: EmbeddedPostgres, deny_proxy: ProxyProcess) -> Iterator[Clients]:
    with open_clients(pg, deny_proxy.port) as c:
        yield c


def _super(pg: EmbeddedPostgres) -> psycopg.Connection[Any]:
    return psycopg.connect(pg.dsn() + " sslmode=disable", autocommit=True)


# ---- a function created since the catalog read, called by attribute notation ---------------


def test_a_function_output_name_is_no_column_of_another_relation(
    pg: EmbeddedPostgres, deny_proxy: ProxyProcess
) -> None:
    """`value` is an output column of pg_catalog functions (json_each, jsonb_each), not a
    column of any relation: `u.value` is not taken for a column of `u` (the server would
    read it as value(u), a function created after pgveil read the catalog, on the raw
    row). Only the output columns of the function a FROM item calls are fields of that
    item."""
    with psycopg.connect(dsn(pg, deny_proxy.port), autocommit=True) as c:
        # the output columns of the function a FROM item calls are still fields (asked
        # before the function exists: once pgveil's catalog has public.value, which the
        # refusal below makes it read, `e.value` is judged as that function's name)
        rows = c.execute(
            "SELECT ppt.isleaf, ppt.level FROM pg_catalog.pg_partition_tree('dn.events') "
            "ppt ORDER BY 2"
        ).fetchall()
        assert rows == [(False, 0), (True, 1), (True, 1)]
        rows = c.execute("SELECT (pg_partition_tree('dn.events')).isleaf").fetchall()
        assert sorted(rows) == [(False,), (True,), (True,)]
        rows = c.execute("SELECT e.key, e.value FROM jsonb_each('{\"a\": 1}') e").fetchall()
        assert rows == [("a", 1)]
        with _super(pg) as admin:
            admin.execute(
                "CREATE FUNCTION public.value(anyelement) RETURNS text LANGUAGE sql STABLE "
                "AS 'SELECT passcode FROM dn.users WHERE id = 1'"
            )
            try:
                with psycopg.connect(dsn(pg, pg.port), autocommit=True) as direct:
                    rows = direct.execute("SELECT u.value FROM dn.users u").fetchall()
                assert (SECRET,) in rows
                with pytest.raises(psycopg.errors.InsufficientPrivilege) as err:
                    c.execute("SELECT u.value FROM dn.users u").fetchall()
                assert SECRET not in str(err.value)
            finally:
                admin.execute("DROP FUNCTION public.value(anyelement)")
                # (pgveil reads the catalog again: a relation it does not know waits for it)
                with pytest.raises(psycopg.errors.UndefinedTable):
                    c.execute("SELECT * FROM dn.no_such_relation")


# `name` is a column of other relations pgveil knows (the catalog-wide check accepted it), but
# no column of the item each reference names: the server calls name(row)
ATTRIBUTE_NOTATION = [
    "SELECT u.name FROM dn.users u",
    "SELECT users.name FROM dn.users",
    "SELECT dn.users.name FROM dn.users",
    'SELECT "U"."name" FROM dn.users "U"',
    "SELECT (u).name FROM dn.users u",
    "SELECT s.x FROM dn.users u, LATERAL (SELECT u.name AS x) s",
    "SELECT (SELECT u.name FROM dn.sessions s WHERE s.user_id = u.id) FROM dn.users u",
    "SELECT s.name FROM (SELECT id, login FROM dn.users) s",
    "WITH w AS (SELECT * FROM dn.users) SELECT w.name FROM w",
    "SELECT j.name FROM (dn.users u JOIN dn.sessions s ON s.user_id = u.id) j",
]


@pytest.fixture
def name_function(pg: EmbeddedPostgres, clients: Clients) -> Iterator[None]:
    """public.name(anyelement), reading a deny value raw, created after pgveil read the
    catalog (a statement through it first), by a superuser session that does not go
    through pgveil; dropped after the case, and pgveil made to read the catalog again (a
    relation it does not know: the statement waits for a read begun after it)."""
    assert errors_in(clients.run("psycopg", "SELECT u.login FROM dn.users u")) == []
    with _super(pg) as admin:
        admin.execute(
            "CREATE FUNCTION public.name(anyelement) RETURNS text LANGUAGE sql STABLE "
            "AS 'SELECT passcode FROM dn.users WHERE id = 1'"
        )
        try:
            yield
        finally:
            admin.execute("DROP FUNCTION public.name(anyelement)")
            got = clients.run("psycopg", "SELECT * FROM dn.no_such_relation")
            assert [e[0] for e in errors_in(got)] == ["42P01"], got


@pytest.mark.parametrize("sql", ATTRIBUTE_NOTATION)
def test_attribute_notation_on_an_item_without_the_column(
    clients: Clients, name_function: None, sql: str
) -> None:
    """The name is judged against the columns of the item it qualifies: unknown there, the
    statement waits for a catalog read, which has the function (not allow-listed)."""
    direct = clients.run("direct", sql)
    assert SECRET in direct, direct
    for client in ("psycopg", "asyncpg"):
        got = clients.run(client, sql)
        assert SECRET not in got, (client, got)
        assert [e[0] for e in errors_in(got)] == ["42501"], (client, got)
        assert "function name is not allowed for masked roles" in got, (client, got)


@pytest.mark.parametrize("sql", ATTRIBUTE_NOTATION[:5])
def test_attribute_notation_without_the_function_is_the_servers_error(
    clients: Clients, sql: str
) -> None:
    """With no function of that name, the client gets what the server says of the
    statement (after a catalog read begun after it), not a refusal of pgveil's own."""
    direct = errors_in(clients.run("direct", sql))
    assert [e[0] for e in direct] == ["42703"], direct
    for client in ("psycopg", "asyncpg"):
        assert errors_in(clients.run(client, sql)) == direct, client
