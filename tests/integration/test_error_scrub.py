"""Errors and notices of masked sessions keep a quoted value only when it is a literal or a
parameter value of the statement that caused them (or an identifier): no guess-confirmation
oracle.

The oracle: an error that echoes a value the client did not send (here `notes::int`, whose
row value `likes invoices` is not personal and reaches the error unmasked at the source)
must read the same whether or not a guess of that value travels with it: in a comment, in
another statement of the same Query, in another statement of the same pipeline, or as a Bind
parameter of another statement. Against the old scrubbing (keep anything that appears in
SQL the session sent since the last ReadyForQuery) the right guess showed the value whole.
The client's own literal or parameter echoed by the server is shown as PostgreSQL shows it.

Every case runs against the real server through pgveil with psql, psycopg or asyncpg, or as
raw protocol messages (`masked_trust`: a masked role with trust authentication) where the
message sequence itself is the point.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import struct
import subprocess
from collections.abc import Iterator
from typing import Any

import asyncpg
import psycopg
import pytest

from proxy.demo.embedded_pg import EmbeddedPostgres
from proxy.wire import messages as m
from proxy.wire.errors import decode_fields
from tests.integration.masking_fixture import HELPDESK, HELPDESK_PW, dsn
from tests.support import ProxyProcess, RawClient

ROW = "SELECT notes::int FROM billing.customers WHERE i_customer = 1"
RIGHT, WRONG = "likes invoices", "likes invoicez"  # customer 1's notes, and a wrong guess
ECHO = 'invalid input syntax for type integer: "{}"'
MASKED = ECHO.format("l" + "*" * 12 + "s")  # the default partial mask of either guess
GUESSES = (RIGHT, WRONG)
CLIENTS = ("psql", "psycopg", "asyncpg")


# ---- clients: each returns the primary message of the error the statement raised -------------


def psql_error(pg: EmbeddedPostgres, port: int, sql: str) -> str:
    """`psql -c` sends the whole string as one Query."""
    psql = shutil.which("psql") or str(pg.bindir / "psql")
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    env.update(PGPASSWORD=HELPDESK_PW, PGCLIENTENCODING="UTF8", PGSSLMODE="disable")
    argv = [psql, "-X", "-h", "127.0.0.1", "-p", str(port), "-U", HELPDESK, "-d", "postgres"]
    done = subprocess.run(
        [*argv, "-c", sql],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    errors = [line for line in done.stderr.splitlines() if line.startswith("ERROR:  ")]
    assert len(errors) == 1, done.stderr
    return errors[0].removeprefix("ERROR:  ")


def psycopg_error(port: int, pg: EmbeddedPostgres, sql: str, params: Any = None) -> str:
    with psycopg.connect(dsn(pg, port), autocommit=True, prepare_threshold=None) as c:
        with pytest.raises(psycopg.Error) as info:
            c.execute(sql, params)  # without parameters: the simple protocol
        return str(info.value.diag.message_primary)


def asyncpg_error(port: int, sql: str, *args: object, simple: bool = False) -> str:
    async def run() -> str:
        conn = await asyncpg.connect(
            host="127.0.0.1",
            port=port,
            user=HELPDESK,
            password=HELPDESK_PW,
            database="postgres",
            ssl=False,
            statement_cache_size=0,
            server_settings={"client_encoding": "UTF8"},  # see test_attack_corpus
        )
        try:
            with pytest.raises(asyncpg.PostgresError) as info:
                if simple:
                    await conn.execute(sql)  # no arguments: the simple protocol
                else:
                    await conn.fetch(sql, *args)  # extended protocol, binary parameters
            return str(info.value.as_dict()["message"])
        finally:
            await conn.close()

    return asyncio.run(run())


def client_error(client: str, pg: EmbeddedPostgres, port: int, sql: str) -> str:
    if client == "psql":
        return psql_error(pg, port, sql)
    if client == "psycopg":
        return psycopg_error(port, pg, sql)
    return asyncpg_error(port, sql, simple=";" in sql)


# ---- raw protocol ----------------------------------------------------------------------------


def parse(sql: str, name: str = "", types: tuple[int, ...] = ()) -> bytes:
    body = name.encode() + b"\0" + sql.encode() + b"\0"
    body += struct.pack(f"!h{len(types)}I", len(types), *types)
    return m.message(m.PARSE, body)


def bind(
    params: tuple[bytes, ...] = (), stmt: str = "", binary: bool = False, portal: str = ""
) -> bytes:
    body = portal.encode() + b"\0" + stmt.encode() + b"\0"
    body += struct.pack("!hh", 1, 1) if binary else struct.pack("!h", 0)
    body += struct.pack("!h", len(params))
    for p in params:
        body += struct.pack("!i", len(p)) + p
    return m.message(m.BIND, body + struct.pack("!h", 0))


def execute(portal: str = "") -> bytes:
    return m.message(m.EXECUTE, portal.encode() + b"\0" + struct.pack("!i", 0))


EXECUTE = execute()
SYNC = m.message(m.SYNC)


def run(sql: str, params: tuple[bytes, ...] = ()) -> bytes:
    """Parse, Bind and Execute of the unnamed statement and portal."""
    return parse(sql) + bind(params) + EXECUTE


@pytest.fixture
def raw(billing: ProxyProcess) -> Iterator[RawClient]:
    c = RawClient(billing.port, user="masked_trust")
    yield c
    c.sock.close()


def raw_errors(c: RawClient, messages: bytes, syncs: int) -> list[str]:
    """The primary messages of the ErrorResponses and NoticeResponses to `messages`, read up
    to the ReadyForQuery of each of their `syncs` Syncs (or Queries)."""
    c.send_raw(messages)
    found = []
    for _ in range(syncs):
        for typ, body in c.until_ready():
            if typ in ("E", "N"):
                found.append(decode_fields(body)["M"])
    return found


# ---- the oracle -------------------------------------------------------------------------------


def test_the_value_reaches_the_error_and_postgres_echoes_it(
    pg: EmbeddedPostgres, billing: ProxyProcess
) -> None:
    """The premise of the oracle tests: directly, the row value is echoed whole."""
    assert psycopg_error(pg.port, pg, ROW) == ECHO.format(RIGHT)


@pytest.mark.parametrize("client", CLIENTS)
def test_guess_in_a_comment_confirms_nothing(
    pg: EmbeddedPostgres, billing: ProxyProcess, client: str
) -> None:
    for guess in GUESSES:
        assert client_error(client, pg, billing.port, f"{ROW} /* {guess} */") == MASKED, guess


@pytest.mark.parametrize("client", CLIENTS)
def test_guess_in_an_earlier_statement_of_the_same_query_confirms_nothing(
    pg: EmbeddedPostgres, billing: ProxyProcess, client: str
) -> None:
    for guess in GUESSES:
        sql = f"SELECT '{guess}' AS guess; {ROW}"
        assert client_error(client, pg, billing.port, sql) == MASKED, guess


@pytest.mark.parametrize("client", ("psql", "psycopg"))
def test_guess_in_a_later_statement_of_the_same_query_confirms_nothing(
    pg: EmbeddedPostgres, billing: ProxyProcess, client: str
) -> None:
    for guess in GUESSES:
        sql = f"{ROW}; SELECT '{guess}' AS guess"
        assert client_error(client, pg, billing.port, sql) == MASKED, guess


def test_guess_in_another_pipelined_statement_confirms_nothing(
    pg: EmbeddedPostgres, billing: ProxyProcess
) -> None:
    for guess in GUESSES:
        with psycopg.connect(dsn(pg, billing.port), autocommit=True) as c:
            with pytest.raises(psycopg.Error) as info, c.pipeline():
                c.execute(f"SELECT '{guess}' AS guess")
                c.execute(ROW)
            assert info.value.diag.message_primary == MASKED, guess


def test_guess_as_a_bind_parameter_of_another_statement_confirms_nothing(
    pg: EmbeddedPostgres, billing: ProxyProcess
) -> None:
    for guess in GUESSES:
        with psycopg.connect(dsn(pg, billing.port), autocommit=True) as c:
            with pytest.raises(psycopg.Error) as info, c.pipeline():
                c.execute("SELECT %s::text AS guess", [guess])
                c.execute(ROW)
            assert info.value.diag.message_primary == MASKED, guess


def test_guess_in_a_statement_skipped_after_the_error_confirms_nothing(raw: RawClient) -> None:
    for guess in GUESSES:
        sent = run(ROW) + run(f"SELECT '{guess}'") + SYNC
        assert raw_errors(raw, sent, 1) == [MASKED], guess


def test_guess_behind_an_earlier_sync_of_the_same_write_confirms_nothing(raw: RawClient) -> None:
    """Two pipelined requests in one write: the guess's request is answered (ReadyForQuery)
    before the error, but its text reached pgveil before the error came back."""
    for guess in GUESSES:
        sent = run(f"SELECT '{guess}'") + SYNC + run(ROW) + SYNC
        assert raw_errors(raw, sent, 2) == [MASKED], guess
        sent = run("SELECT $1::text", (guess.encode(),)) + SYNC + run(ROW) + SYNC
        assert raw_errors(raw, sent, 2) == [MASKED], guess
        sent = m.message(m.QUERY, f"SELECT '{guess}'\0".encode()) + run(ROW) + SYNC
        assert raw_errors(raw, sent, 2) == [MASKED], guess


def test_guess_in_a_copy_statement_comment_confirms_nothing(
    pg: EmbeddedPostgres, billing: ProxyProcess
) -> None:
    for guess in GUESSES:
        with psycopg.connect(dsn(pg, billing.port), autocommit=True) as c:
            with pytest.raises(psycopg.Error) as info:
                with c.cursor().copy(f"COPY ({ROW}) TO STDOUT /* {guess} */") as cp:
                    for _ in cp:
                        pass
            assert info.value.diag.message_primary == MASKED, guess


# ---- the client's own values are shown as PostgreSQL shows them -------------------------------


@pytest.mark.parametrize("client", CLIENTS)
def test_own_literal_echoed_as_postgres_shows_it(
    pg: EmbeddedPostgres, billing: ProxyProcess, client: str
) -> None:
    sql = "SELECT 'abc'::int"
    direct = psycopg_error(pg.port, pg, sql)
    assert direct == ECHO.format("abc")
    assert client_error(client, pg, billing.port, sql) == direct


@pytest.mark.parametrize("client", CLIENTS)
def test_own_literal_of_the_failing_statement_of_a_query(
    pg: EmbeddedPostgres, billing: ProxyProcess, client: str
) -> None:
    """The second statement is the one that fails: its own literal is shown, and the first
    statement's literal, echoed by the second as a value it computed, is not."""
    sql = "SELECT 'it''s' AS first; SELECT E'x\\ty'::int"
    assert client_error(client, pg, billing.port, sql) == ECHO.format("x\ty")
    sql = "SELECT 'abc' AS first; SELECT ('ab' || 'c')::int"
    assert client_error(client, pg, billing.port, sql) == ECHO.format("a*c")


def test_own_bind_parameter_echoed_as_postgres_shows_it(
    pg: EmbeddedPostgres, billing: ProxyProcess
) -> None:
    direct = psycopg_error(pg.port, pg, "SELECT %s::int", ["abc"])
    assert direct == ECHO.format("abc")
    assert psycopg_error(billing.port, pg, "SELECT %s::int", ["abc"]) == direct
    # asyncpg: the parameter's type (text) comes from the server's ParameterDescription,
    # its value in binary format
    assert asyncpg_error(billing.port, "SELECT $1::text::int", "abc") == direct


def test_binary_parameters_are_read_by_their_type(raw: RawClient) -> None:
    text, int4 = 25, 23
    typed = parse("SELECT $1::text::int", types=(text,)) + bind((b"abc",), binary=True)
    assert raw_errors(raw, typed + EXECUTE + SYNC, 1) == [ECHO.format("abc")]
    boolean = 'invalid input syntax for type boolean: "{}"'
    number = parse("SELECT $1::int4::text::bool", types=(int4,))
    number += bind((struct.pack("!i", 12345),), binary=True) + EXECUTE + SYNC
    assert raw_errors(raw, number, 1) == [boolean.format("12345")]
    # a value computed from the parameter is not the parameter
    number = parse("SELECT ($1::int4 + 1)::text::bool", types=(int4,))
    number += bind((struct.pack("!i", 12344),), binary=True) + EXECUTE + SYNC
    assert raw_errors(raw, number, 1) == [boolean.format("1***5")]
    # the type is not known (not in Parse, no Describe): the bytes are not taken for text
    untyped = parse("SELECT $1::text::int") + bind((b"abc",), binary=True) + EXECUTE + SYNC
    assert raw_errors(raw, untyped, 1) == [ECHO.format("a*c")]


def test_each_portal_has_its_own_parameters(raw: RawClient) -> None:
    """Two portals of one named statement, the error raised when a portal runs (the volatile
    CASE is not folded when the Bind plans it): each error shows its own portal's value."""
    sent = parse("SELECT (CASE WHEN random() >= 0 THEN $1::text END)::int", name="s") + SYNC
    assert raw_errors(raw, sent, 1) == []
    binds = bind((b"abc",), stmt="s", portal="a") + bind((b"xyz",), stmt="s", portal="b")
    assert raw_errors(raw, binds + execute("a") + SYNC, 1) == [ECHO.format("abc")]
    assert raw_errors(raw, binds + execute("b") + SYNC, 1) == [ECHO.format("xyz")]
    # the unnamed portal bound twice: the second Bind replaced the first
    binds = bind((b"abc",), stmt="s") + bind((b"xyz",), stmt="s")
    assert raw_errors(raw, binds + EXECUTE + SYNC, 1) == [ECHO.format("xyz")]
    # a Bind error: the value planned is that Bind's own
    sent = parse("SELECT $1::text::int", name="t") + bind((b"abc",), stmt="t") + SYNC
    assert raw_errors(raw, sent, 1) == [ECHO.format("abc")]


def test_own_literal_in_copy_is_shown(pg: EmbeddedPostgres, billing: ProxyProcess) -> None:
    with psycopg.connect(dsn(pg, billing.port), autocommit=True) as c:
        with pytest.raises(psycopg.Error) as info:
            with c.cursor().copy("COPY (SELECT 'abc'::text::int) TO STDOUT") as cp:
                for _ in cp:
                    pass
        assert info.value.diag.message_primary == ECHO.format("abc")


def test_identifiers_of_the_statement_and_the_catalog_are_shown(
    pg: EmbeddedPostgres, billing: ProxyProcess
) -> None:
    for sql, message in [
        ("SELECT nosuchcol FROM billing.customers", 'column "nosuchcol" does not exist'),
        (
            "SELECT c.notes, count(*) FROM billing.customers c",
            'column "c.notes" must appear in the GROUP BY clause or be used in an aggregate '
            "function",
        ),
        ("SELECT x.notes FROM billing.customers", 'missing FROM-clause entry for table "x"'),
    ]:
        assert psycopg_error(pg.port, pg, sql) == message
        assert psycopg_error(billing.port, pg, sql) == message
