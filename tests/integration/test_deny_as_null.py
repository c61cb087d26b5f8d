"""`deny` columns read as NULL of their type wherever a masked role reads them; only NULL may
be written into them; the audit lists them as denied.

Every read case is proven to show a canary when sent to PostgreSQL directly (as the same
role), and must show none through pgveil, through psycopg (simple protocol, text) and
asyncpg (extended protocol, binary); a few also through psql. The oracle cases give a right
and a wrong guess of a deny value: directly the answers differ, through pgveil they must
be the same.
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
from tests.integration.attack_clients import Clients, CopyIn, errors_in, open_clients
from tests.integration.audit_wire import all_events, wait_for
from tests.integration.deny_fixture import (
    DOC,
    IP,
    PIN,
    SECRET,
    SECRET2,
    assert_guesses_alike,
    assert_guesses_differ_directly,
    denied_leaks,
)
from tests.integration.masking_fixture import ADMIN, ADMIN_PW, HELPDESK, HELPDESK_PW, dsn
from tests.support import ProxyProcess

ROLLBACK = "ROLLBACK"


@pytest.fixture(scope="module")
def clients(pg: EmbeddedPostgres, deny_proxy: ProxyProcess) -> Iterator[Clients]:
    with open_clients(pg, deny_proxy.port) as c:
        yield c


# ---- reads: NULL everywhere ----------------------------------------------------------------

READS: list[tuple[str, Any]] = [
    ("by_name", "SELECT id, passcode FROM dn.users ORDER BY id"),
    ("every_type", "SELECT u.passcode, u.pin, u.ip, u.doc FROM dn.users u"),
    ("three_part_name", "SELECT dn.users.passcode FROM dn.users"),
    ("star", "SELECT * FROM dn.users"),
    ("alias_star", "SELECT u.* FROM dn.users u"),
    ("whole_row_json", "SELECT to_json(u) FROM dn.users u"),
    ("whole_row_star_json", "SELECT row_to_json(u.*) FROM dn.users u"),
    ("whole_row_text", "SELECT u::text FROM dn.users u"),
    ("row_constructor", "SELECT ROW(u.*)::text FROM dn.users u"),
    ("field_of_whole_row", "SELECT (u).passcode FROM dn.users u"),
    ("jsonb_agg_rows", "SELECT jsonb_agg(u) FROM dn.users u"),
    (
        "functions",
        "SELECT upper(passcode), md5(passcode), encode(convert_to(passcode, 'UTF8'), 'base64'), "
        "reverse(passcode), host(ip), doc ->> 'k', pin + 0 FROM dn.users",
    ),
    ("cast_error", "SELECT passcode::int FROM dn.users"),
    ("cast_error_inet", "SELECT passcode::inet FROM dn.users WHERE id = 1"),
    (
        "aggregate",
        "SELECT string_agg(passcode, ',' ORDER BY passcode), array_agg(pin) FROM dn.users",
    ),
    ("distinct", "SELECT DISTINCT passcode FROM dn.users"),
    ("group_by", "SELECT passcode, count(*) FROM dn.users GROUP BY passcode"),
    ("window", "SELECT first_value(passcode) OVER (ORDER BY passcode) FROM dn.users"),
    ("join_using", "SELECT * FROM dn.users JOIN dn.sessions USING (passcode)"),
    (
        "join_on",
        "SELECT s.id, u.passcode FROM dn.users u JOIN dn.sessions s ON s.passcode = u.passcode",
    ),
    ("natural_join", "SELECT * FROM dn.users NATURAL JOIN dn.sessions"),
    ("scalar_subquery", "SELECT (SELECT passcode FROM dn.users WHERE id = 1)"),
    ("cte", "WITH x AS (SELECT passcode, pin FROM dn.users) SELECT * FROM x"),
    ("view_column", "SELECT passcode FROM dn.user_view"),
    ("view_star", "SELECT * FROM dn.user_view"),
    ("copy_query", "COPY (SELECT passcode, pin, ip, doc FROM dn.users) TO STDOUT"),
    ("copy_table", "COPY dn.users TO STDOUT"),
    ("copy_columns", "COPY dn.users (id, passcode) TO STDOUT"),
    ("partitioned", "SELECT payload FROM dn.events"),
    ("uuid", "SELECT token, token::text FROM dn.sessions"),
    (
        "cursor",
        (
            "BEGIN",
            "DECLARE c CURSOR FOR SELECT passcode FROM dn.users",
            "FETCH ALL FROM c",
            ROLLBACK,
        ),
    ),
    (
        "update_returning",
        ("BEGIN", "UPDATE dn.users SET note = 'n' RETURNING passcode, *", ROLLBACK),
    ),
    (
        "update_returning_expression",
        ("BEGIN", "UPDATE dn.users u SET note = 'n' RETURNING u.passcode || '', pin", ROLLBACK),
    ),
    ("delete_returning", ("BEGIN", "DELETE FROM dn.sessions RETURNING *", ROLLBACK)),
    (
        "upsert_returning",
        (
            "BEGIN",
            "INSERT INTO dn.users (id, login) VALUES (1, 'x') ON CONFLICT (id) DO UPDATE "
            "SET note = 'n' RETURNING passcode, pin, ip",
            ROLLBACK,
        ),
    ),
    (
        "update_from_returning",
        (
            "BEGIN",
            "UPDATE dn.sessions s SET user_id = u.id FROM dn.users u WHERE u.id = s.user_id "
            "RETURNING u.passcode, s.passcode",
            ROLLBACK,
        ),
    ),
    (
        "prepared",
        (
            "PREPARE p AS SELECT passcode FROM dn.users WHERE id = $1",
            "EXECUTE p(1)",
            "DEALLOCATE p",
        ),
    ),
    ("temp_table_as", ("CREATE TEMP TABLE t_dn AS SELECT * FROM dn.users", "TABLE t_dn")),
    (
        "temp_view",
        ("CREATE TEMP VIEW v_dn AS SELECT passcode FROM dn.users", "SELECT * FROM v_dn"),
    ),
]


@pytest.mark.parametrize(("case_id", "sql"), READS, ids=[c[0] for c in READS])
def test_read_leaks_directly(clients: Clients, case_id: str, sql: Any) -> None:
    """Each case is meaningful: PostgreSQL itself shows the deny column's value."""
    got = clients.run("direct", sql)
    assert denied_leaks(got), got


@pytest.mark.parametrize("client", ["psycopg", "asyncpg"])
@pytest.mark.parametrize(("case_id", "sql"), READS, ids=[c[0] for c in READS])
def test_read_gets_null_through_pgveil(
    clients: Clients, client: str, case_id: str, sql: Any
) -> None:
    got = clients.run(client, sql)
    assert not denied_leaks(got), got
    assert not errors_in(got), got  # read, not refused


def test_deny_columns_are_null_of_their_type(
    deny_proxy: ProxyProcess, pg: EmbeddedPostgres
) -> None:
    with psycopg.connect(dsn(pg, deny_proxy.port)) as c:
        cur = c.execute("SELECT id, login, passcode, pin, ip, doc, note FROM dn.users ORDER BY id")
        assert cur.fetchall() == [
            (1, "f********r", None, None, None, None, "note one"),
            (2, "s*********r", None, None, None, None, "note two"),
        ]
        types = [d.type_code for d in cur.description or ()]
        direct = psycopg.connect(dsn(pg, pg.port))
        with direct:
            expected = direct.execute(
                "SELECT id, login, passcode, pin, ip, doc, note FROM dn.users LIMIT 0"
            )
            assert types == [d.type_code for d in expected.description or ()]
        # the whole row keeps the columns, the deny ones NULL
        (row,) = c.execute("SELECT to_jsonb(u) FROM dn.users u WHERE id = 1").fetchone()  # type: ignore[misc]
        assert row == {
            "id": 1, "login": "f********r", "passcode": None, "pin": None, "ip": None,
            "doc": None, "note": "note one",
        }  # fmt: skip


def test_psql_reads_null(deny_proxy: ProxyProcess, pg: EmbeddedPostgres, clients: Clients) -> None:
    for sql in (
        "SELECT id, passcode, pin, ip, doc FROM dn.users ORDER BY id",
        "SELECT to_json(u) FROM dn.users u",
        "COPY dn.users TO STDOUT",
    ):
        got = clients.run("psql", sql)
        assert not denied_leaks(got), got
        assert "ERROR" not in got, got


# ---- oracles: a guess never changes the answer --------------------------------------------

ORACLES: list[tuple[str, str]] = [
    ("equal", "SELECT count(*) FROM dn.users WHERE passcode = {g}"),
    ("like", "SELECT count(*) FROM dn.users WHERE passcode LIKE left({g}, 8) || '%'"),
    ("compare", "SELECT count(*) FROM dn.users WHERE passcode < {g}"),
    ("order_by", "SELECT id FROM dn.users ORDER BY passcode < {g} DESC, id"),
    (
        "distinct_on",
        "SELECT DISTINCT ON (passcode = {g}) id FROM dn.users ORDER BY passcode = {g}, id",
    ),
    ("group_by", "SELECT count(*) FROM dn.users GROUP BY passcode = {g} ORDER BY 1"),
    ("window", "SELECT id, rank() OVER (ORDER BY passcode = {g}) FROM dn.users ORDER BY id"),
    ("length", "SELECT count(*) FROM dn.users WHERE length(passcode) = length({g})"),
    ("hash", "SELECT count(*) FROM dn.users WHERE md5(passcode) = md5({g})"),
    ("row_compare", "SELECT count(*) FROM dn.users u WHERE (u.id, u.passcode) = (1, {g})"),
    ("whole_row_text", "SELECT count(*) FROM dn.users u WHERE strpos(u::text, {g}) > 0"),
    ("whole_row_json", "SELECT count(*) FROM dn.users u WHERE to_jsonb(u) ->> 'passcode' = {g}"),
    ("exists", "SELECT EXISTS (SELECT 1 FROM dn.users WHERE passcode = {g})"),
    ("in_list", "SELECT count(*) FROM dn.users WHERE passcode IN ({g}, 'x')"),
    ("any_array", "SELECT count(*) FROM dn.users WHERE passcode = ANY (ARRAY[{g}])"),
    ("max", "SELECT max(passcode) = {g} FROM dn.users"),
    ("join", "SELECT count(*) FROM dn.users u JOIN (VALUES ({g})) v(s) ON u.passcode = v.s"),
    (
        "using",
        "SELECT count(*) FROM dn.users JOIN (SELECT {g}::text AS passcode) g USING (passcode)",
    ),
    ("view", "SELECT count(*) FROM dn.user_view WHERE passcode = {g}"),
    (
        "cte",
        "WITH x AS (SELECT passcode FROM dn.users) SELECT count(*) FROM x WHERE passcode = {g}",
    ),
    ("case_error", "SELECT CASE WHEN passcode = {g} THEN 1 / (id - id) END FROM dn.users"),
    ("cast_error", "SELECT CASE WHEN passcode = {g} THEN passcode::int END FROM dn.users"),
    ("filter", "SELECT count(*) FILTER (WHERE passcode = {g}) FROM dn.users"),
    ("having", "SELECT 1 FROM dn.users HAVING bool_or(passcode = {g})"),
    ("copy", "COPY (SELECT id FROM dn.users WHERE passcode = {g}) TO STDOUT"),
    ("partition", "SELECT count(*) FROM dn.events WHERE payload = {g}"),
    ("session_join", "SELECT count(*) FROM dn.sessions WHERE passcode = {g}"),
    (
        "update_where_returning",
        ("BEGIN", "UPDATE dn.users SET note = note WHERE passcode = {g} RETURNING id", ROLLBACK),
    ),
    (
        "delete_where",
        ("BEGIN", "DELETE FROM dn.users WHERE passcode = {g} RETURNING id", ROLLBACK),
    ),
    (
        "upsert_where",
        (
            "BEGIN",
            "INSERT INTO dn.users (id) VALUES (1) ON CONFLICT (id) DO UPDATE SET note = 'n' "
            "WHERE dn.users.passcode = {g} RETURNING id",
            ROLLBACK,
        ),
    ),
    (
        "delete_using_subquery",
        (
            "BEGIN",
            "DELETE FROM dn.sessions s WHERE EXISTS "
            "(SELECT 1 FROM dn.users u WHERE u.id = s.user_id AND u.passcode = {g}) RETURNING s.id",
            ROLLBACK,
        ),
    ),
    # writes of a guess: a unique violation would confirm it
    ("insert_unique", ("BEGIN", "INSERT INTO dn.users (id, passcode) VALUES (77, {g})", ROLLBACK)),
    ("update_unique", ("BEGIN", "UPDATE dn.users SET passcode = {g} WHERE id = 2", ROLLBACK)),
    (
        "upsert_unique",
        (
            "BEGIN",
            "INSERT INTO dn.users (id, passcode) VALUES (78, {g}) ON CONFLICT (passcode) DO NOTHING "
            "RETURNING id",
            ROLLBACK,
        ),
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


# ---- writes: only NULL -------------------------------------------------------------------

REFUSED_WRITE = (
    "pgveil: column dn.users.passcode is not available to masked roles; only NULL can be "
    "written to it"
)


def _stored(pg: EmbeddedPostgres, sql: str) -> list[tuple[Any, ...]]:
    with psycopg.connect(pg.dsn() + " sslmode=disable") as c:
        return c.execute(sql).fetchall()


def test_writing_null_keeps_the_stored_value(
    deny_proxy: ProxyProcess, pg: EmbeddedPostgres
) -> None:
    """What an ORM sends when it saves a row it read: every column, the deny ones NULL
    (as parameters, psycopg's server-side binding): the stored values stay."""
    with psycopg.connect(dsn(pg, deny_proxy.port)) as c:
        row = c.execute(
            "SELECT login, passcode, pin, ip, doc, note FROM dn.users WHERE id = 1"
        ).fetchone()
        assert row is not None and row[1:5] == (None, None, None, None)
        login, passcode, pin, ip, doc, _note = row
        cur = c.execute(
            "UPDATE dn.users SET login = %s, passcode = %s, pin = %s, ip = %s, doc = %s, "
            "note = %s WHERE id = %s",
            [login, passcode, pin, ip, doc, "saved by an ORM", 1],
        )
        assert cur.rowcount == 1
        # a literal NULL, and DEFAULT, the same
        c.execute("UPDATE dn.users SET passcode = NULL, pin = DEFAULT WHERE id = 1")
        c.rollback()
        c.execute(
            "UPDATE dn.users SET login = %s, passcode = %s, note = %s WHERE id = %s",
            [login, passcode, "saved by an ORM", 1],
        )
        c.commit()
    try:
        assert _stored(pg, "SELECT login, passcode, pin, note FROM dn.users WHERE id = 1") == [
            ("first.user", SECRET, PIN, "saved by an ORM")
        ]
    finally:
        _stored(pg, "UPDATE dn.users SET note = 'note one' WHERE id = 1 RETURNING id")


@pytest.mark.parametrize(
    "sql",
    [
        "UPDATE dn.users SET passcode = 'a new value' WHERE id = 1",
        "UPDATE dn.users SET passcode = upper('x') WHERE id = 1",
        "UPDATE dn.users SET note = 'x', passcode = '' WHERE id = 1",
        "INSERT INTO dn.users (id, passcode) VALUES (90, 'a new value')",
        "INSERT INTO dn.users (id, passcode) VALUES (90, NULL), (91, 'a new value')",
        "INSERT INTO dn.users VALUES (90, 'l', 'a new value')",
        "INSERT INTO dn.users (id, passcode) SELECT 90, 'a new value'",
        "INSERT INTO dn.users (id, passcode) SELECT id + 100, note FROM dn.users",
        "INSERT INTO dn.users (id) VALUES (1) ON CONFLICT (id) DO UPDATE SET passcode = 'x'",
    ],
)
def test_writing_a_value_is_refused(
    deny_proxy: ProxyProcess, pg: EmbeddedPostgres, sql: str
) -> None:
    with psycopg.connect(dsn(pg, deny_proxy.port), autocommit=True) as c:
        with pytest.raises(psycopg.errors.InsufficientPrivilege) as info:
            c.execute(sql)
        assert info.value.diag.message_primary == REFUSED_WRITE
        assert c.execute("SELECT 1").fetchone() == (1,)  # the session goes on
    assert _stored(pg, "SELECT id, passcode FROM dn.users ORDER BY id") == [
        (1, SECRET),
        (2, SECRET2),
    ]


def test_writes_with_parameters_psycopg(deny_proxy: ProxyProcess, pg: EmbeddedPostgres) -> None:
    with psycopg.connect(dsn(pg, deny_proxy.port)) as c:
        for prepare in (False, True):
            with pytest.raises(psycopg.errors.InsufficientPrivilege) as info:
                c.execute(
                    "UPDATE dn.users SET passcode = %s WHERE id = %s", ["guess", 1], prepare=prepare
                )
            assert info.value.diag.message_primary == REFUSED_WRITE
            c.rollback()
            cur = c.execute(
                "INSERT INTO dn.users (id, login, passcode, pin) VALUES (%s, %s, %s, %s)",
                [95, "new.user", None, None],
                prepare=prepare,
            )
            assert cur.rowcount == 1
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                c.execute(
                    "INSERT INTO dn.users (id, pin) VALUES (%s, %s)", [96, 5], prepare=prepare
                )
            c.rollback()
        # an UPDATE that matches no row writes nothing: nothing to refuse
        assert c.execute("UPDATE dn.users SET passcode = %s WHERE id = 0", ["x"]).rowcount == 0
        c.rollback()


def test_writes_with_parameters_asyncpg(deny_proxy: ProxyProcess, pg: EmbeddedPostgres) -> None:
    async def run() -> None:
        c = await asyncpg.connect(
            host="127.0.0.1", port=deny_proxy.port, user=HELPDESK, password=HELPDESK_PW,
            database="postgres", ssl=False, server_settings={"client_encoding": "UTF8"},
        )  # fmt: skip
        try:
            async with c.transaction():
                row = await c.fetchrow("SELECT passcode, pin, ip, doc FROM dn.users WHERE id = 2")
                assert row is not None and tuple(row) == (None, None, None, None)
                status = await c.execute(
                    "UPDATE dn.users SET passcode = $1, pin = $2, ip = $3, doc = $4, note = $5 "
                    "WHERE id = $6",
                    *row, "from asyncpg", 2,
                )  # fmt: skip
                assert status == "UPDATE 1"
                got = await c.fetchrow("SELECT note, passcode FROM dn.users WHERE id = 2")
                assert got is not None and tuple(got) == ("from asyncpg", None)
                raise _Rollback
        except _Rollback:
            pass
        for sql, args in [
            ("UPDATE dn.users SET pin = $1 WHERE id = $2", (5, 2)),
            ("INSERT INTO dn.users (id, ip) VALUES ($1, $2)", (97, "10.0.0.1")),
            ("INSERT INTO dn.users (id, doc) VALUES ($1, $2::jsonb)", (97, '{"a": 1}')),
        ]:
            with pytest.raises(asyncpg.InsufficientPrivilegeError) as info:
                await c.execute(sql, *args)
            assert "is not available to masked roles; only NULL can be written" in str(info.value)
        assert await c.fetchval("SELECT 1") == 1
        await c.close()

    asyncio.run(run())
    assert _stored(pg, "SELECT id, passcode, pin, note FROM dn.users ORDER BY id") == [
        (1, SECRET, PIN, "note one"),
        (2, SECRET2, 1234, "note two"),
    ]


class _Rollback(Exception):
    pass


def test_copy_into_deny_columns(clients: Clients, pg: EmbeddedPostgres) -> None:
    """COPY FROM data is not read by pgveil: into a deny column it is refused; without one
    it works."""
    for client in ("psycopg", "asyncpg"):
        got = clients.run(
            client, (CopyIn("COPY dn.users FROM STDIN", "98\tx\tnew\t\\N\t\\N\t\\N\t\\N\n"),)
        )
        assert [e[0] for e in errors_in(got)] == ["42501"], got
        assert "COPY FROM cannot write it" in got
        got = clients.run(
            client,
            ("BEGIN", CopyIn("COPY dn.users (id, login) FROM STDIN", "98\tcopied\n"), ROLLBACK),
        )
        assert not errors_in(got), got


def test_unmasked_role_writes_and_reads_as_before(
    pg: EmbeddedPostgres, deny_proxy: ProxyProcess
) -> None:
    with psycopg.connect(dsn(pg, deny_proxy.port, ADMIN, ADMIN_PW)) as c:
        assert c.execute("SELECT passcode FROM dn.users WHERE id = 1").fetchone() == (SECRET,)
        c.execute("UPDATE dn.users SET passcode = 'changed' WHERE id = 1")
        assert c.execute("SELECT passcode FROM dn.users WHERE id = 1").fetchone() == ("changed",)
        c.rollback()


# ---- the audit ---------------------------------------------------------------------------


def test_audit_lists_deny_columns_as_denied(pg: EmbeddedPostgres, deny_proxy: ProxyProcess) -> None:
    marker = "audit_denied_marker"  # a name: the audit shows it (never a literal)
    with psycopg.connect(dsn(pg, deny_proxy.port), autocommit=True) as c:
        c.execute(f"SELECT passcode, login AS {marker} FROM dn.users").fetchall()
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            c.execute(f"UPDATE dn.users AS {marker} SET pin = 1 WHERE id = 1")
    path = deny_proxy.audit_path  # type: ignore[attr-defined]

    def marked() -> list[dict[str, Any]]:
        return [e for e in all_events(path) if marker in json.dumps(e.get("statement", ""))]

    def ended() -> bool:
        events = marked()
        return len(events) == 2 and all(e.get("outcome") not in (None, "running") for e in events)

    wait_for(ended, "both statements' audit events")
    read, write = marked()
    assert read["columns_denied"] == ["dn.users.passcode"]
    assert read["columns_masked"] == ["dn.users.login"]
    assert write["columns_denied"] == ["dn.users.pin"]
    assert write["outcome"] == "42501"
    text = path.read_text()
    assert not denied_leaks(text) and DOC not in text and IP not in text
