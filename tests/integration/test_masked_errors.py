"""Errors a masked role can act on: the server's own error for a syntax
error and for a name that does not exist, and names from the catalog shown in messages.

Every case runs the same statement directly against the test suite's PostgreSQL (as the
masked role itself) and through pgveil, and compares what the client gets: SQLSTATE,
message, position and hint, with psycopg (simple protocol: PQexec; extended: PQexecParams)
and asyncpg (simple: execute; extended: fetch), and psql's output text (`LINE 1:` and the
caret drawn from the position).
"""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import asyncpg
import psycopg
import pytest
from psycopg import pq

from proxy.demo.embedded_pg import EmbeddedPostgres
from tests.integration.audit_wire import audited_proxy, events, wait_for
from tests.integration.masking_fixture import (
    EMAIL,
    HELPDESK,
    HELPDESK_PW,
    NAME,
    PHONE,
    dsn,
    leaks,
)
from tests.support import ProxyProcess

Diag = tuple[str, ...]  # SQLSTATE, message, position, hint
_FIELDS = (
    pq.DiagnosticField.SQLSTATE,
    pq.DiagnosticField.MESSAGE_PRIMARY,
    pq.DiagnosticField.STATEMENT_POSITION,
    pq.DiagnosticField.MESSAGE_HINT,
    pq.DiagnosticField.MESSAGE_DETAIL,
)

# Statements pgveil's parser rejects (and a few it accepts that the server rejects), with
# multi-byte characters, several lines, several statements, comments, unterminated tokens.
SYNTAX = [
    "SELEC 1",
    "SELECT 1 +",
    "SELECT 1 +   ",
    "SELECT 'abc",
    'SELECT ""',
    "SELECT é FROM x WHERE é é",
    "SELECT '😀' '😀'",
    "SELECT 'ünïcödé' 'x'",
    "SELECT $$abc",
    "SELECT $tag$abc$ta$",
    "SELECT 1; SELEC 2",
    "SELECT 1;\nSELECT 2 2;\nSELECT 3",
    "SELECT /* unterminated",
    "SELECT 1 /* a /* b */",
    "SELECT 1 -- comment\n FROM FROM",
    "SELECT 1e",
    "SELECT 0x",
    "SELECT 0x1F",
    "SELECT 1_000",
    "SELECT 123abc",
    "SELECT U&'\\00'",
    "SELECT U&'\\D800'",
    'SELECT "abc',
    'SELECT "a""',
    'SELECT U&"" ',
    "SELECT 1 FROM (SELECT 2",
    "SELECT (1",
    "SELECT 1)",
    "SELECT ARRAY[1,2",
    "select i_customer from billing.customers where name = Zebulon Quixotehart",
    "SELECT * FROM billing.customers WHERE email = 'x' 'y'",
    "SELECT 'Zebulon Quixotehart' 'x'",
    "  SELECT  'Zebulon' ,,",
    "SELECT 1 ORDER BY 1 ORDER BY 2",
    "SELECT count(*) OVER (ROWS BETWEEN UNBOUNDED FOLLOWING AND CURRENT ROW) FROM pg_class",
    "SELECT 1::float(0)",
    "SELECT 1::float(60)",
    "SELECT 1 FETCH FIRST 1 ROW WITH TIES",
    "SELECT 1 LIMIT ALL OFFSET 1 LIMIT 2",
    "SELECT 1\n  FROM\n  WHERE",
    "SELECT 1 INTO a INTO b",
    "SELECT U&'x' UESCAPE '+'",
    "SELECT E'\\xZZ' x y",
    "CREATE TABLE t (a int NOT NULL NOT VALID)",
    "CREATE TABLE (a int)",
    "INSERT INTO billing.customers VALUES (",
    "UPDATE billing.customers SET WHERE i_customer = 1",
    "DELETE billing.customers",
    "SELECT * FROM billing.customers c JOIN ON true",
    "WITH a AS (SELECT 1) SELECT * FROM a a a",
    "BEGIN; SELECT 1 1; COMMIT",
    "DO $$ BEGIN",
    "COPY billing.customers TO STDOUT WITH (FORMAT",
    "EXPLAIN ANALYSE VERBOSE SELECT SELECT",
    "PREPARE p AS SELECT SELECT",
    "SELECT * FROM billing.customers FOR UPDATE FOR",
    "JSON_TABLE",
]


# ---- clients ---------------------------------------------------------------------------------


def _diag(result: pq.abc.PGresult) -> Diag:
    return tuple((result.error_field(f) or b"").decode() for f in _FIELDS)


def psycopg_errors(port: int, pg: EmbeddedPostgres, sqls: list[str], extended: bool) -> list[Diag]:
    """One connection; each statement alone (PQexec: a Query; PQexecParams: Parse, Bind,
    Describe, Execute, Sync)."""
    out = []
    with psycopg.connect(dsn(pg, port), autocommit=True) as c:
        for sql in sqls:
            if extended:
                result = c.pgconn.exec_params(sql.encode(), [])
            else:
                result = c.pgconn.exec_(sql.encode())
            out.append(_diag(result))
    return out


def asyncpg_errors(port: int, sqls: list[str], extended: bool) -> list[Diag]:
    async def run() -> list[Diag]:
        conn = await asyncpg.connect(
            host="127.0.0.1", port=port, user=HELPDESK, password=HELPDESK_PW,
            database="postgres", ssl=False, statement_cache_size=0,
        )  # fmt: skip
        out: list[Diag] = []
        try:
            for sql in sqls:
                try:
                    if extended:
                        await conn.fetch(sql)
                    else:
                        await conn.execute(sql)
                except asyncpg.PostgresError as exc:
                    d = exc.as_dict()
                    out.append(
                        tuple(
                            str(d.get(k) or "")
                            for k in ("sqlstate", "message", "position", "hint", "detail")
                        )
                    )
                else:
                    out.append(("",))
        finally:
            await conn.close()
        return out

    return asyncio.run(run())


CLIENTS: dict[str, Callable[[int, EmbeddedPostgres, list[str]], list[Diag]]] = {
    "psycopg-simple": lambda port, pg, sqls: psycopg_errors(port, pg, sqls, False),
    "psycopg-extended": lambda port, pg, sqls: psycopg_errors(port, pg, sqls, True),
    "asyncpg-simple": lambda port, _pg, sqls: asyncpg_errors(port, sqls, False),
    "asyncpg-extended": lambda port, _pg, sqls: asyncpg_errors(port, sqls, True),
}


def psql_output(pg: EmbeddedPostgres, port: int, sql: str, *options: str) -> str:
    """What psql shows for `sql` sent as one Query (`-c`), errors included."""
    psql = shutil.which("psql") or str(pg.bindir / "psql")
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    env.update(PGPASSWORD=HELPDESK_PW, PGCLIENTENCODING="UTF8", PGSSLMODE="disable")
    done = subprocess.run(
        [psql, "-X", "-h", "127.0.0.1", "-p", str(port), "-U", HELPDESK, "-d", "postgres",
         *options, "-c", sql],
        capture_output=True, text=True, env=env, timeout=60,
    )  # fmt: skip
    return done.stdout + done.stderr


def compare(pg: EmbeddedPostgres, port: int, client: str, sqls: list[str], fields: int = 4) -> None:
    """Each statement's error, directly and through pgveil: the same first `fields` of
    (SQLSTATE, message, position, hint, detail); and each is an error."""
    direct = CLIENTS[client](pg.port, pg, sqls)
    via = CLIENTS[client](port, pg, sqls)
    for sql, d, v in zip(sqls, direct, via, strict=True):
        assert d[0], f"{sql!r} is no error directly"
        assert v[:fields] == d[:fields], f"{client} {sql!r}\n direct {d}\n pgveil {v}"


# ---- fixtures --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def scratch(pg: EmbeddedPostgres) -> Iterator[None]:
    """Tables the masked role may write: keys to violate, rows to count."""
    pg.psql(
        """
        CREATE TABLE public.err_parent (k int PRIMARY KEY, u text UNIQUE);
        CREATE TABLE public.err_child (k int REFERENCES public.err_parent);
        CREATE TABLE public.err_check (a int CONSTRAINT err_check_positive CHECK (a > 0));
        CREATE TABLE public.probe_runs (a int);
        INSERT INTO public.err_parent VALUES (1, 'one');
        INSERT INTO public.err_child VALUES (1);
        GRANT ALL ON public.err_parent, public.err_child, public.err_check, public.probe_runs
           TO helpdesk, cc_staff;
        """
    )
    yield
    pg.psql(
        "DROP TABLE IF EXISTS public.err_child, public.err_parent, public.err_check, "
        "public.probe_runs"
    )


# ---- syntax errors ---------------------------------------------------------------------------


@pytest.mark.parametrize("client", list(CLIENTS))
def test_syntax_errors_are_the_servers_own(
    pg: EmbeddedPostgres, billing: ProxyProcess, client: str
) -> None:
    """SQLSTATE, message, position (in characters of the client's text) and hint as the
    server gives them, where pgveil used to answer `pgveil cannot parse the statement`."""
    compare(pg, billing.port, client, SYNTAX)
    via = CLIENTS[client](billing.port, pg, SYNTAX[:1])
    assert via[0][:3] == ("42601", 'syntax error at or near "SELEC"', "1")


@pytest.mark.parametrize(
    "sql",
    [
        "SELEC 1",
        "SELECT 1 +",
        "select i_customer\n  from billing.customers\n where name = Zebulon Quixotehart",
        "SELECT 'ünïcödé' 'x', 😀",
        "SELECT U&'\\00'",
        # the parser's WARNING before its error: its position moved back too
        "CREATE GLOBAL TEMP TABLE gt (a int); SELEC 1",
    ],
)
def test_psql_shows_the_servers_syntax_error_and_caret(
    pg: EmbeddedPostgres, billing: ProxyProcess, sql: str
) -> None:
    direct = psql_output(pg, pg.port, sql)
    assert "ERROR:  " in direct and ("LINE" in direct or "HINT" in direct), direct
    assert psql_output(pg, billing.port, sql) == direct
    verbose = ("-v", "VERBOSITY=verbose")
    assert psql_output(pg, billing.port, sql, *verbose) == psql_output(pg, pg.port, sql, *verbose)


def _runs(pg: EmbeddedPostgres) -> int:
    return int(pg.psql("SELECT count(*) FROM public.probe_runs").strip())


# `system_user` is a keyword of pgveil's parser (PostgreSQL 18), a name to the server's (15)
ONLY_SERVER_PARSES = (
    "INSERT INTO public.probe_runs VALUES (1); CREATE TEMP TABLE pv (system_user int)"
)


def test_a_statement_only_the_server_parses_never_runs(
    pg: EmbeddedPostgres, billing: ProxyProcess, scratch: None
) -> None:
    """pgveil's parser rejects it, the server's accepts it: the syntax probe must not run
    it. Directly, both statements run; through pgveil (simple protocol, in and out of a
    transaction block, and after an error aborted it; extended protocol, one statement)
    nothing does, and the client gets pgveil's refusal."""
    with psycopg.connect(dsn(pg, pg.port), autocommit=True) as c:
        c.execute(ONLY_SERVER_PARSES)  # the premise: the server runs it
        assert c.execute("SELECT to_regclass('pg_temp.pv') IS NOT NULL").fetchone() == (True,)
    assert _runs(pg) == 1
    refusal = "pgveil: pgveil's parser (PostgreSQL 18's) cannot read this statement"
    with psycopg.connect(dsn(pg, billing.port), autocommit=True) as c:
        result = c.pgconn.exec_(ONLY_SERVER_PARSES.encode())
        assert _diag(result)[0] == "42501" and _diag(result)[1].startswith(refusal)
        result = c.pgconn.exec_params(b"CREATE TEMP TABLE pv (system_user int)", [])
        assert _diag(result)[0] == "42501" and _diag(result)[1].startswith(refusal)
        c.execute("BEGIN")
        result = c.pgconn.exec_(ONLY_SERVER_PARSES.encode())
        assert _diag(result)[0] == "42501"
        c.execute("ROLLBACK")
        c.execute("BEGIN")
        assert _diag(c.pgconn.exec_(b"SELECT 1/0"))[0] == "22012"
        # an aborted transaction: the probe's first statement is refused as any would be
        result = c.pgconn.exec_(ONLY_SERVER_PARSES.encode())
        assert _diag(result)[0] == "25P02"
        c.execute("ROLLBACK")
        assert c.execute("SELECT to_regclass('pg_temp.pv') IS NULL").fetchone() == (True,)
    assert _runs(pg) == 1


def test_syntax_error_in_a_pipeline_keeps_its_place(
    pg: EmbeddedPostgres, billing: ProxyProcess
) -> None:
    """A syntax error among pipelined statements: each answer where the server puts it."""
    with psycopg.connect(dsn(pg, billing.port), autocommit=True) as c:
        with pytest.raises(psycopg.errors.SyntaxError) as info, c.pipeline():
            first = c.execute("SELECT 1")
            c.execute("SELEC 2")
            c.execute("SELECT 3")
        assert first.fetchone() == (1,)
        assert info.value.diag.statement_position == "1"
        assert c.execute("SELECT 4").fetchone() == (4,)


@pytest.fixture(scope="module")
def audited(
    pg: EmbeddedPostgres, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[ProxyProcess, Path]]:
    with audited_proxy(pg, tmp_path_factory.mktemp("errors")) as found:
        yield found


def test_audit_of_a_syntax_error_carries_no_literal_and_no_name(
    pg: EmbeddedPostgres, audited: tuple[ProxyProcess, Path]
) -> None:
    """The client gets the server's syntax error, which quotes its own text; the audit
    event (refused: nothing ran) shows no literal and, since nothing tells a name from a
    value typed without quotes, no word but reserved keywords; nor does pgveil's log."""
    proxy, audit = audited
    sql = (
        "select i_customer from billing.customers where name = Zebulon Quixotehart "
        f"and email = '{EMAIL}'"
    )
    with psycopg.connect(dsn(pg, proxy.port) + " application_name=syntax_audit") as c:
        with pytest.raises(psycopg.errors.SyntaxError) as info:
            c.execute(sql)
        assert info.value.diag.message_primary == 'syntax error at or near "Quixotehart"'

    def refused() -> list[dict[str, object]]:
        return events(audit, "syntax_audit", "refused")

    wait_for(lambda: bool(refused()), "the refusal's event")
    [event] = refused()
    assert event["reason"] == "pgveil cannot parse the statement"
    assert event["statement"] == "select ? from ? . ? where ? = ? ? and ? = ?"
    text = str(event) + proxy.log()
    for word in ("Zebulon", "Quixotehart", "zebulonq", "customers"):
        assert word not in text


# ---- names that do not exist -----------------------------------------------------------------

MISSING_RELATIONS = [
    "SELECT * FROM billing.custmers",
    "SELECT * FROM custmers",
    "SELECT c.name FROM billing.customers c JOIN billing.acounts a USING (i_customer)",
    "SELECT 1 FROM billing.customers WHERE i_customer IN (SELECT i_customer FROM nosuch)",
    "SELECT (SELECT 1 FROM nosuch1) FROM nosuch2",
    "INSERT INTO billing.custmers VALUES (1)",
    "UPDATE custmers SET x = 1",
    "DELETE FROM billing.custmers WHERE true",
    "SELECT * FROM nosch.nosuch",
    "SELECT * FROM postgres.billing.nosuch",
    "SELECT * FROM otherdb.billing.nosuch",
    "SELECT * FROM pg_temp.nosuch",
    'SELECT é, * FROM "Nö Such"',
    'SELECT * FROM "a""b"',
    'SELECT * FROM billing."x y"."z"',
    'SELECT * FROM "' + "x" * 70 + '"',
    "WITH a AS (SELECT * FROM b), b AS (SELECT 1) SELECT * FROM a",
    "WITH a AS (SELECT 1) SELECT * FROM a, nosuch",
    "EXPLAIN SELECT * FROM nosuch",
    "TABLE nosuch",
    "SELECT * FROM ONLY nosuch",
    "CREATE TEMP VIEW v_nosuch AS SELECT * FROM nosuch",
    "COPY (SELECT * FROM nosuch) TO STDOUT",
]
# the server's own error would add a hint (a column of that name nearby): pgveil's has none
MISSING_COLUMNS = [
    "SELECT c.emai FROM billing.customers c",
    "SELECT * FROM billing.customers c WHERE c.emai = 1",
    "SELECT billing.customers.emial FROM billing.customers",
    "SELECT (c).emai FROM billing.customers c",
    "SELECT x.emai FROM billing.customers c",
]


@pytest.mark.parametrize("client", list(CLIENTS))
def test_missing_relations_get_the_servers_error(
    pg: EmbeddedPostgres, billing: ProxyProcess, client: str
) -> None:
    """`42P01 relation ... does not exist` with its position (and the DETAIL and HINT of a
    WITH query referenced before it is defined), where pgveil said `not known to pgveil
    yet; try again shortly`."""
    compare(pg, billing.port, client, MISSING_RELATIONS, fields=5)
    via = CLIENTS[client](billing.port, pg, MISSING_RELATIONS[:1])
    assert via[0][:3] == ("42P01", 'relation "billing.custmers" does not exist', "15")


@pytest.mark.parametrize("client", list(CLIENTS))
def test_missing_columns_get_the_servers_error(
    pg: EmbeddedPostgres, billing: ProxyProcess, client: str
) -> None:
    compare(pg, billing.port, client, MISSING_COLUMNS, fields=3)


def test_utility_statements_on_missing_relations(
    pg: EmbeddedPostgres, billing: ProxyProcess
) -> None:
    """COPY, TRUNCATE: the server looks the relation up without a position."""
    sqls = ["COPY billing.custmers TO STDOUT", "TRUNCATE billing.custmers"]
    for client in ("psycopg-simple", "psycopg-extended"):
        compare(pg, billing.port, client, sqls)


def test_psql_shows_the_missing_relation_and_caret(
    pg: EmbeddedPostgres, billing: ProxyProcess
) -> None:
    sql = "SELECT name\n  FROM billing.customers c\n  JOIN billing.acounts a USING (i_customer)"
    direct = psql_output(pg, pg.port, sql)
    assert 'relation "billing.acounts" does not exist' in direct and "LINE 3:" in direct
    assert psql_output(pg, billing.port, sql) == direct


def test_relation_created_after_the_catalog_read_is_read_at_once(
    pg: EmbeddedPostgres, billing: ProxyProcess
) -> None:
    """A table created (by anyone) since pgveil read the catalog: the statement waits for a
    catalog read and runs, as the rules say; the client need not try again."""
    with psycopg.connect(dsn(pg, billing.port), autocommit=True) as c:
        c.execute("SELECT 1")  # the session's catalog is read
        try:
            pg.psql(
                "CREATE TABLE public.late_simple (a text); "
                "INSERT INTO public.late_simple VALUES ('late row'); "
                "GRANT SELECT ON public.late_simple TO helpdesk"
            )
            assert c.execute("SELECT a FROM public.late_simple").fetchall() == [("late row",)]
            pg.psql(
                "CREATE TABLE public.late_extended (a text); "
                "INSERT INTO public.late_extended VALUES ('late too'); "
                "GRANT SELECT ON public.late_extended TO helpdesk"
            )
            rows = c.execute("SELECT a FROM late_extended WHERE a = %s", ["late too"]).fetchall()
            assert rows == [("late too",)]
        finally:
            pg.psql("DROP TABLE IF EXISTS public.late_simple, public.late_extended")


def test_new_partition_of_a_protected_table_is_masked_at_once(
    pg: EmbeddedPostgres, billing: ProxyProcess
) -> None:
    """Created since the catalog read, a partition of a protected table is protected: read
    by its own name right away, its personal column comes back masked (and is not
    refused)."""
    with psycopg.connect(dsn(pg, billing.port), autocommit=True) as c:
        c.execute("SELECT 1")
        try:
            pg.psql(
                "CREATE TABLE billing.xdrs_late_err PARTITION OF billing.xdrs "
                "FOR VALUES FROM (5000000) TO (6000000); "
                "INSERT INTO billing.xdrs (i_xdr, i_account, cli, cld, charged) "
                f"VALUES (5000001, 10, '{PHONE}', '+18005550100', 1); "
                "GRANT SELECT ON billing.xdrs_late_err TO helpdesk"
            )
            rows = c.execute("SELECT i_xdr, cli FROM billing.xdrs_late_err").fetchall()
            assert [r[0] for r in rows] == [5000001]
            assert leaks(str(rows)) == [] and rows[0][1] != PHONE
        finally:
            pg.psql("DROP TABLE IF EXISTS billing.xdrs_late_err")


def test_waiting_statement_keeps_its_place_in_a_pipeline(
    pg: EmbeddedPostgres, billing: ProxyProcess
) -> None:
    """What the client sent after a statement that waits for a catalog read waits with it:
    the answers come in order."""
    with psycopg.connect(dsn(pg, billing.port), autocommit=True) as c:
        c.execute("SELECT 1")
        try:
            pg.psql(
                "CREATE TABLE public.late_pipe (a int); INSERT INTO public.late_pipe VALUES (2); "
                "GRANT SELECT ON public.late_pipe TO helpdesk"
            )
            with c.pipeline():
                cursors = [
                    c.execute("SELECT 1"),
                    c.execute("SELECT a FROM public.late_pipe"),
                    c.execute("SELECT %s::int", [3]),
                ]
            assert [cur.fetchall() for cur in cursors] == [[(1,)], [(2,)], [(3,)]]
            with pytest.raises(psycopg.errors.UndefinedTable) as info, c.pipeline():
                first = c.execute("SELECT 1")
                c.execute("SELECT * FROM public.late_pipe_nosuch")
                c.execute("SELECT 3")
            assert first.fetchall() == [(1,)]
            assert info.value.diag.statement_position == "15"
        finally:
            pg.psql("DROP TABLE IF EXISTS public.late_pipe")


def test_relation_created_by_the_same_text_is_refused_with_why(
    pg: EmbeddedPostgres, billing: ProxyProcess
) -> None:
    """It will exist when the statement on it runs, but pgveil cannot judge that statement
    before it does: refused, saying so (not said to be missing)."""
    with psycopg.connect(dsn(pg, billing.port), autocommit=True) as c:
        with pytest.raises(psycopg.errors.InsufficientPrivilege) as info:
            c.execute("CREATE TABLE public.same_text (a int); SELECT * FROM public.same_text")
        assert "is created by the same statement text" in str(info.value.diag.message_primary)
        c.execute("CREATE TABLE public.same_text (a int)")
        try:
            assert c.execute("SELECT * FROM public.same_text").fetchall() == []
        finally:
            c.execute("DROP TABLE public.same_text")


def test_a_relation_pgveil_does_not_read_is_not_said_to_be_missing(
    pg: EmbeddedPostgres, billing: ProxyProcess
) -> None:
    """A sequence exists: pgveil refuses it (it reads tables, views and foreign tables),
    and does not claim it does not exist."""
    with psycopg.connect(dsn(pg, billing.port), autocommit=True) as c:
        with pytest.raises(psycopg.errors.InsufficientPrivilege) as info:
            c.execute("SELECT * FROM billing.xdrs_i_xdr_seq")
        assert "no table, view, materialized view or foreign table" in str(info.value)


def test_the_wait_is_bounded_when_the_catalog_cannot_be_read(
    pg: EmbeddedPostgres, billing: ProxyProcess, tmp_path: Path
) -> None:
    """When no catalog read can be made (pgveil's login was disabled), a statement on an
    unknown name waits a bounded time, then gets the refusal it got before this change."""
    pg.psql("CREATE ROLE err_catalog LOGIN PASSWORD 'err-catalog-pw'")
    rules = tmp_path / "rules.yaml"
    rules.write_text(Path(billing.rules_path).read_text())  # type: ignore[attr-defined]
    proxy = ProxyProcess(
        pg.port, "--upstream-sslmode", "disable", "--rules", str(rules),
        "--catalog-user", "err_catalog",
        env={"PGVEIL_TEST_HASH_KEY": "pgveil-test-hash-key-0123456789",
             "PGVEIL_CATALOG_PASSWORD": "err-catalog-pw"},
    )  # fmt: skip
    try:
        with psycopg.connect(dsn(pg, proxy.port), autocommit=True) as c:
            c.execute("SELECT 1")  # the catalog is read
            pg.psql("ALTER ROLE err_catalog NOLOGIN")
            with pytest.raises(psycopg.errors.InsufficientPrivilege) as info:
                c.execute("SELECT * FROM public.never_there")
            assert str(info.value.diag.message_primary) == (
                "pgveil: relation public.never_there is not known to pgveil yet; try again shortly"
            )
            assert c.execute("SELECT 2").fetchone() == (2,)
        assert "catalog.refresh_failed" in proxy.log()
    finally:
        proxy.stop()
        pg.psql("DROP ROLE err_catalog")


# ---- names in messages -----------------------------------------------------------------------


def test_hints_name_catalog_columns_as_they_are(
    pg: EmbeddedPostgres, billing: ProxyProcess
) -> None:
    sqls = [
        "SELECT relnam FROM pg_class",
        "SELECT relnam, t.oid FROM pg_class t",
        "SELECT nme FROM billing.customers c JOIN billing.accounts a USING (i_customer)",
        "SELECT i_custome FROM billing.accounts",
        "SELECT emial FROM billing.customers",
        "SELECT * FROM billing.customers WHERE i_custome = 1",
        "SELECT customers.name FROM billing.customers c",
    ]
    for client in ("psycopg-simple", "asyncpg-extended"):
        compare(pg, billing.port, client, sqls)
    via = psycopg_errors(billing.port, pg, sqls[:1], False)
    assert via[0][3] == (
        'Perhaps you meant to reference the column "pg_class.relname" or the column '
        '"pg_class.relam".'
    )


def test_sequence_names_in_messages(pg: EmbeddedPostgres, billing: ProxyProcess) -> None:
    sqls = ["SELECT currval('billing.xdrs_i_xdr_seq')"]
    compare(pg, billing.port, "psycopg-simple", sqls)
    via = psycopg_errors(billing.port, pg, sqls, False)
    assert via[0][1] == 'currval of sequence "xdrs_i_xdr_seq" is not yet defined in this session'


def test_key_violations_name_the_constraint_and_mask_the_values(
    pg: EmbeddedPostgres, billing: ProxyProcess, scratch: None
) -> None:
    """The constraint's name as it is (it was masked); the DETAIL, withheld before, names
    the key's columns and masks its values, even those the statement spelled out: the new
    row's key equals a stored one."""
    cases = [
        # (statement, message, detail as the masked role sees it)
        (
            "INSERT INTO public.err_parent VALUES (1, 'x')",
            'duplicate key value violates unique constraint "err_parent_pkey"',
            "Key (k)=(*) already exists.",
        ),
        (
            "INSERT INTO public.err_parent SELECT k, 'new' FROM public.err_parent",
            'duplicate key value violates unique constraint "err_parent_pkey"',
            "Key (k)=(*) already exists.",
        ),
        (
            "INSERT INTO public.err_child VALUES (7)",
            'insert or update on table "err_child" violates foreign key constraint '
            '"err_child_k_fkey"',
            'Key (k)=(*) is not present in table "err_parent".',
        ),
        (
            "DELETE FROM public.err_parent WHERE k = 1",
            'update or delete on table "err_parent" violates foreign key constraint '
            '"err_child_k_fkey" on table "err_child"',
            'Key (k)=(*) is still referenced from table "err_child".',
        ),
        (
            "INSERT INTO public.err_check VALUES (-5)",
            'new row for relation "err_check" violates check constraint "err_check_positive"',
            "pgveil: detail withheld from masked roles",
        ),
        (
            f"INSERT INTO billing.customers (i_customer, name, email) VALUES (3, 'x', '{EMAIL}')",
            'duplicate key value violates unique constraint "customers_email_key"',
            "Key (email)=(z**********************************e) already exists.",
        ),
    ]
    sqls = [sql for sql, _, _ in cases]
    direct = psycopg_errors(pg.port, pg, sqls, False)
    for client in ("psycopg-simple", "psycopg-extended", "asyncpg-extended"):
        via = CLIENTS[client](billing.port, pg, sqls)
        for (sql, message, detail), d, v in zip(cases, direct, via, strict=True):
            assert v[:2] == d[:2] == (d[0], message), (client, sql, d, v)
            assert v[4] == detail, (client, sql, v)


# ---- white-box attacks on this change ----------------------------------------------------


def test_a_raised_message_in_a_names_format_is_still_withheld(
    pg: EmbeddedPostgres, billing: ProxyProcess, scratch: None
) -> None:
    """Server-side code can write any text in the form of a message whose quoted parts are
    names (a trigger raising `duplicate key ... constraint "<a customer's name>"`): it is
    withheld whole, as every message raised by PL/pgSQL."""
    pg.psql(
        """
        CREATE FUNCTION public.err_raise() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
          RAISE unique_violation USING MESSAGE = format(
            'duplicate key value violates unique constraint "%s"',
            (SELECT name FROM billing.customers WHERE i_customer = 1));
        END $$;
        CREATE TRIGGER err_raise BEFORE INSERT ON public.err_check
          FOR EACH ROW EXECUTE FUNCTION public.err_raise();
        """
    )
    try:
        with psycopg.connect(dsn(pg, pg.port), autocommit=True) as c:
            with pytest.raises(psycopg.Error) as info:
                c.execute("INSERT INTO public.err_check VALUES (1)")
            assert NAME in str(info.value.diag.message_primary)  # the premise
        with psycopg.connect(dsn(pg, billing.port), autocommit=True) as c:
            with pytest.raises(psycopg.Error) as info:
                c.execute("INSERT INTO public.err_check VALUES (1)")
            text = str(info.value.diag.message_primary)
            assert text == "pgveil: a message raised by server-side code is withheld"
    finally:
        pg.psql("DROP TRIGGER err_raise ON public.err_check; DROP FUNCTION public.err_raise()")


@pytest.mark.parametrize("guess", [EMAIL, "wrong.guess@canary-mail.example"])
def test_a_key_still_referenced_is_masked_whatever_the_statement_says(
    pg: EmbeddedPostgres, billing: ProxyProcess, guess: str
) -> None:
    """A foreign key on a personal column: deleting the referenced row reports the stored
    (raw) key. Shown only where it is the statement's own value, it would confirm a guess
    written into the statement; it is masked whatever the statement holds."""
    pg.psql(
        f"""
        INSERT INTO billing.customers (i_customer, i_customer_class, name, email)
          VALUES (77, 1, 'Ref Erenced', '{EMAIL.replace("zebulonq", "refq")}');
        CREATE TABLE public.err_email_ref (email text REFERENCES billing.customers (email));
        INSERT INTO public.err_email_ref VALUES ('{EMAIL.replace("zebulonq", "refq")}');
        """
    )
    referenced = EMAIL.replace("zebulonq", "refq")
    try:
        sql = f"DELETE FROM billing.customers WHERE i_customer = 77 AND '{referenced}' <> '{guess}'"
        with psycopg.connect(dsn(pg, pg.port), autocommit=True) as c:
            with pytest.raises(psycopg.errors.ForeignKeyViolation) as info:
                c.execute(sql)
            assert referenced in str(info.value.diag.message_detail)  # the premise
        with psycopg.connect(dsn(pg, billing.port), autocommit=True) as c:
            with pytest.raises(psycopg.errors.ForeignKeyViolation) as info:
                c.execute(sql)
            detail = str(info.value.diag.message_detail)
        assert detail.startswith("Key (email)=(") and "is still referenced" in detail
        assert "refq.private" not in detail
    finally:
        pg.psql(
            "DROP TABLE IF EXISTS public.err_email_ref; "
            "DELETE FROM billing.customers WHERE i_customer = 77"
        )


def test_a_missing_name_error_quotes_only_what_the_client_wrote(
    pg: EmbeddedPostgres, billing: ProxyProcess
) -> None:
    """A relation named after a customer's value, that does not exist: the error quotes the
    client's own text back, and nothing of the customer's row."""
    with psycopg.connect(dsn(pg, billing.port), autocommit=True) as c:
        with pytest.raises(psycopg.errors.UndefinedTable) as info:
            c.execute(f'SELECT * FROM billing."{NAME[:7]}"')
        assert str(info.value.diag.message_primary) == (
            f'relation "billing.{NAME[:7]}" does not exist'
        )
        assert info.value.diag.message_detail is None and info.value.diag.message_hint is None


def test_rewritten_statements_positions_point_into_the_clients_text(
    pg: EmbeddedPostgres, billing: ProxyProcess
) -> None:
    """pgveil sends a rewritten text for protected tables: the server's position counts in
    that text. The client gets it moved into its own text where both texts agree (the
    select list before, the WHERE after a masked table), and none where they do not: a
    position never points beyond what the client sent."""
    sqls = [
        "SELECT emial FROM billing.customers",
        "SELECT * FROM billing.customers WHERE i_custome = 1",
        "select name from billing.customers c where c.email = 'x' order by nme",
        "SELECT name FROM billing.customers c, billing.accounts a WHERE a.ip = c.nme",
    ]
    direct = psycopg_errors(pg.port, pg, sqls, False)
    via = psycopg_errors(billing.port, pg, sqls, False)
    for sql, d, v in zip(sqls, direct, via, strict=True):
        assert v[:2] == d[:2], sql
        assert v[2] in ("", d[2]), (sql, d, v)
        if v[2]:
            assert int(v[2]) <= len(sql)
    assert [v[2] for v in via[:3]] == [d[2] for d in direct[:3]]


def test_masked_trust_session_sees_the_same(pg: EmbeddedPostgres, billing: ProxyProcess) -> None:
    """A role masked through a group (cc_staff) gets the same errors."""
    with psycopg.connect(
        f"host=127.0.0.1 port={billing.port} user=masked_trust dbname=postgres sslmode=disable",
        autocommit=True,
    ) as c:
        assert _diag(c.pgconn.exec_(b"SELEC 1"))[:3] == (
            "42601", 'syntax error at or near "SELEC"', "1",
        )  # fmt: skip
        assert _diag(c.pgconn.exec_(b"SELECT * FROM custmers"))[:3] == (
            "42P01", 'relation "custmers" does not exist', "15",
        )  # fmt: skip


def test_the_proxy_logged_no_traceback(billing: ProxyProcess) -> None:
    assert "Traceback" not in billing.log()
