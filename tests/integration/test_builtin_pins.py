"""Built-in functions are pinned to pg_catalog without changing what the server runs.

* Every function of pg_catalog that SQL can call: a call of it as a client writes it
  (unqualified, arguments of its declared types) is analysed by the analyser on the real
  catalog, and the text pgveil would send is prepared on the real server, next to the
  client's own text: wherever the server accepts the client's, pgveil's names the function
  with pg_catalog, and the server accepts it, with the same result types. A pin that cannot
  resolve, or a call sent unpinned, fails here, not for users.
* The forms the server resolves only unqualified: several-array `unnest` in FROM (Django's
  inspectdb uses it) and a function-notation field `f(row)`; and a function created to
  shadow the special form is never what runs.
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
from rules.analyzer import Analyzer
from rules.catalog import ProtectionMap
from rules.catalog_read import read_catalog
from rules.loader import parse_rules
from tests.integration.attack_clients import Clients, errors_in, open_clients
from tests.integration.deny_fixture import RULES, denied_leaks
from tests.integration.masking_fixture import CARD, dsn, leaks
from tests.support import ProxyProcess

# pseudo-types of arguments: the concrete type a call passes for them
_CONCRETE = {
    "anyelement": "int4",
    "anynonarray": "int4",
    "anycompatible": "int4",
    "anycompatiblenonarray": "int4",
    "any": "int4",
    "anyarray": "int4[]",
    "anycompatiblearray": "int4[]",
    "anyrange": "int4range",
    "anycompatiblerange": "int4range",
    "anymultirange": "int4multirange",
    "anycompatiblemultirange": "int4multirange",
    "anyenum": "pgveil_pins.mood",
}
# argument types SQL cannot produce: such functions are called by the server only
_UNCALLABLE = {
    "internal", "language_handler", "fdw_handler", "table_am_handler", "index_am_handler",
    "tsm_handler", "trigger", "event_trigger", "pg_ddl_command", "void", "unknown",
}  # fmt: skip

FUNCTIONS_SQL = """
SELECT p.proname, p.prokind, p.provariadic::regtype::text AS variadic,
       COALESCE(a.aggkind, '') AS aggkind, COALESCE(a.aggnumdirectargs, 0) AS direct,
       ARRAY(SELECT t::regtype::text FROM unnest(p.proargtypes) t) AS args
  FROM pg_catalog.pg_proc p LEFT JOIN pg_catalog.pg_aggregate a ON a.aggfnoid = p.oid
 WHERE p.pronamespace = 'pg_catalog'::regnamespace
 ORDER BY p.oid
"""


def _arg(typ: str) -> str:
    if typ == "record":
        return "ROW(1, 'x')"
    return f"NULL::{_CONCRETE.get(typ, typ)}"


def call_of(row: dict[str, Any]) -> str | None:
    """A call of the function as a client would write it, or None when SQL cannot call
    it (an argument type only the server makes)."""
    name, args = row["proname"], list(row["args"])
    if any(t in _UNCALLABLE for t in args) or name.startswith("pg_catalog"):
        return None
    quoted = name if name.isidentifier() and name.islower() else json.dumps(name)
    texts = [_arg(t) for t in args]
    if row["variadic"] not in ("-", '"any"') and texts:
        texts[-1] = "VARIADIC " + texts[-1]
    if row["prokind"] == "a":
        if row["aggkind"] in ("o", "h"):
            k = row["direct"]
            direct, ordered = ", ".join(texts[:k]), ", ".join(texts[k:])
            return f"SELECT {quoted}({direct}) WITHIN GROUP (ORDER BY {ordered})"
        return f"SELECT {quoted}({', '.join(texts) or '*'})"
    if row["prokind"] == "w":
        return f"SELECT {quoted}({', '.join(texts)}) OVER ()"
    if row["prokind"] == "p":
        return f"CALL {quoted}({', '.join(texts)})"
    return f"SELECT {quoted}({', '.join(texts)})"


@pytest.fixture(scope="module")
def server(pg: EmbeddedPostgres, deny_proxy: ProxyProcess) -> Iterator[psycopg.Connection[Any]]:
    """A superuser session, with an enum type for anyenum's functions."""
    with psycopg.connect(pg.dsn() + " sslmode=disable", autocommit=True) as c:
        c.execute("DROP SCHEMA IF EXISTS pgveil_pins CASCADE; CREATE SCHEMA pgveil_pins")
        c.execute("CREATE TYPE pgveil_pins.mood AS ENUM ('sad', 'ok')")
        try:
            yield c
        finally:
            c.execute("DROP SCHEMA pgveil_pins CASCADE")


def _analyzer(pg: EmbeddedPostgres) -> Analyzer:
    async def read() -> Any:
        conn = await asyncpg.connect(
            host="127.0.0.1", port=pg.port, user=pg.superuser, password=pg.password,
            database="postgres", ssl=False,
        )  # fmt: skip
        try:
            return await read_catalog(conn.fetch)
        finally:
            await conn.close()

    catalog = asyncio.run(read())
    return Analyzer(ProtectionMap(parse_rules(RULES, "rules.yaml"), catalog))


def _prepares(c: psycopg.Connection[Any], name: str, sql: str) -> list[int] | None:
    """The result types of `sql` prepared (Parse, Describe) as `name`, or None when the
    server refuses it. Nothing runs."""
    pgconn = c.pgconn
    res = pgconn.prepare(name.encode(), sql.encode())
    if res.status != psycopg.pq.ExecStatus.COMMAND_OK:
        return None
    desc = pgconn.describe_prepared(name.encode())
    types = [desc.ftype(i) for i in range(desc.nfields)]
    pgconn.exec_(f"DEALLOCATE {name}".encode())
    return types


def test_every_pinned_builtin_resolves_on_the_server(
    pg: EmbeddedPostgres, server: psycopg.Connection[Any]
) -> None:
    an = _analyzer(pg)
    rows = server.execute(FUNCTIONS_SQL).fetchall()
    names = [d.name for d in server.cursor().execute(FUNCTIONS_SQL).description or ()]
    tried = 0
    failures = []
    unpinned = []
    for values in rows:
        row = dict(zip(names, values, strict=True))
        sql = call_of(row)
        if sql is None or row["prokind"] == "p":
            continue
        d = an.analyze(sql)
        if d.action == "refuse":
            continue  # never sent (a function that reads data behind the rewriter's back)
        sent = d.sql if d.action == "rewrite" else sql
        assert sent is not None
        client = _prepares(server, "pin_client", sql)
        if client is None:
            continue  # the server refuses the client's own text: nothing to keep
        tried += 1
        if f"pg_catalog.{row['proname']}(" not in sent and (
            f'pg_catalog."{row["proname"]}"(' not in sent
        ):
            unpinned.append(sent)
        got = _prepares(server, "pin_sent", sent)
        if got != client:
            failures.append((sql, sent, client, got))
    assert not failures, failures[:20]
    # every call the server takes is sent pinned (none resolved by the search path)
    assert not unpinned, unpinned[:20]
    assert tried > 2000, tried  # the test means something: most of pg_catalog was called


# ---- the forms that resolve only unqualified ----------------------------------------------

DJANGO_INDEXES = """
SELECT indexname, array_agg(attname ORDER BY arridx), indisunique, indisprimary,
       array_agg(ordering ORDER BY arridx), amname, exprdef, s2.attoptions
  FROM (
    SELECT c2.relname AS indexname, idx.*, attr.attname, am.amname,
           CASE WHEN idx.indexprs IS NOT NULL THEN pg_get_indexdef(idx.indexrelid) END AS exprdef,
           CASE am.amname WHEN 'btree' THEN
             CASE (option & 1) WHEN 1 THEN 'DESC' ELSE 'ASC' END
           END AS ordering,
           c2.reloptions AS attoptions
      FROM (
        SELECT * FROM pg_index i,
               unnest(i.indkey, i.indoption) WITH ORDINALITY koi(key, option, arridx)
      ) idx
      LEFT JOIN pg_class c ON idx.indrelid = c.oid
      LEFT JOIN pg_class c2 ON idx.indexrelid = c2.oid
      LEFT JOIN pg_am am ON c2.relam = am.oid
      LEFT JOIN pg_attribute attr ON attr.attrelid = c.oid AND attr.attnum = idx.key
     WHERE c.relname = 'users' AND pg_catalog.pg_table_is_visible(c.oid)
  ) s2
 GROUP BY indexname, indisunique, indisprimary, amname, exprdef, attoptions
 ORDER BY indexname
"""

UNQUALIFIED = [
    ("unnest_two", "SELECT * FROM unnest(ARRAY[1, 2, 3], ARRAY['a', 'b'])"),
    (
        "unnest_ordinality_alias",
        "SELECT * FROM unnest(ARRAY[1, 2], ARRAY['a', 'b'], ARRAY[true]) WITH ORDINALITY "
        "AS t(n, s, b, i)",
    ),
    ("unnest_alias_only", "SELECT t.* FROM unnest(ARRAY[1, 2], ARRAY[3, 4]) t"),
    (
        "unnest_in_rows_from",
        "SELECT * FROM ROWS FROM (unnest(ARRAY[1, 2], ARRAY[3]), generate_series(1, 3))",
    ),
    (
        "unnest_lateral_protected",
        "SELECT u.id, x.* FROM dn.users u, unnest(ARRAY[u.id, 0], ARRAY[u.login, u.passcode]) x "
        "ORDER BY 1, 2",
    ),
    ("django_inspectdb_indexes", ("SET search_path = dn, public", DJANGO_INDEXES)),
    (
        "projection",
        "SELECT length(s), name(s.*), s.name FROM (SELECT 5 AS length, 'x'::text AS name) s",
    ),
]


@pytest.fixture(scope="module")
def clients(pg: EmbeddedPostgres, deny_proxy: ProxyProcess) -> Iterator[Clients]:
    with open_clients(pg, deny_proxy.port) as c:
        yield c


def _rows(text: str) -> str:
    # (asyncpg shows `[]` for the SET of a case)
    lines = text.splitlines()
    return "\n".join(x for x in lines if not x.startswith("application_") and x != "[]")


@pytest.mark.parametrize("client", ["psycopg", "asyncpg"])
@pytest.mark.parametrize(("case_id", "sql"), UNQUALIFIED, ids=[c[0] for c in UNQUALIFIED])
def test_forms_that_resolve_only_unqualified_still_run(
    clients: Clients, client: str, case_id: str, sql: Any
) -> None:
    through = clients.run(client, sql)
    assert not errors_in(through), through
    assert not denied_leaks(through), through
    direct = clients.run("direct", sql)
    if case_id != "unnest_lateral_protected":  # (personal data: masked)
        assert _rows(through).replace("'", "") == _rows(direct).replace("'", ""), (through, direct)


def test_several_array_unnest_is_not_a_function_in_a_select_list(clients: Clients) -> None:
    """The server has no function unnest of two arrays: in a select list it is an error
    directly and through pgveil (pinned, it names pg_catalog)."""
    sql = "SELECT unnest(ARRAY[1], ARRAY[2])"
    assert [e[0] for e in errors_in(clients.run("direct", sql))] == ["42883"]
    assert [e[0] for e in errors_in(clients.run("psycopg", sql))] == ["42883"]


def test_a_function_named_like_the_special_form_never_runs(
    pg: EmbeddedPostgres, deny_proxy: ProxyProcess, clients: Clients
) -> None:
    """A function `unnest(anyarray, anyarray)` created by someone (here: one that reads a
    deny column raw) is not what a masked `FROM unnest(a, b)` runs: pgveil sends the
    server's own expansion to pg_catalog.unnest (or, once its catalog has the function,
    refuses the unqualified name). Directly, PostgreSQL itself expands the special form
    too; the function only runs when called otherwise."""
    pg.psql(
        "CREATE FUNCTION public.unnest(anyarray, anyarray) RETURNS SETOF text "
        "LANGUAGE sql AS 'SELECT passcode FROM dn.users';"
        "GRANT EXECUTE ON FUNCTION public.unnest(anyarray, anyarray) TO PUBLIC"
    )
    try:
        for client in ("psycopg", "asyncpg"):
            got = clients.run(client, "SELECT * FROM unnest(ARRAY[1, 2], ARRAY[3, 4])")
            assert not denied_leaks(got), got
            errors = errors_in(got)
            assert not errors or [e[0] for e in errors] == ["42501"], got
            if not errors:
                assert "(1, 3), (2, 4)" in got, got
        # (the function is reachable by its own name: that is what the rules refuse)
        direct = clients.run("direct", "SELECT public.unnest(ARRAY[1], ARRAY[2])")
        assert denied_leaks(direct)
        got = clients.run("psycopg", "SELECT * FROM public.unnest(ARRAY[1], ARRAY[2])")
        assert [e[0] for e in errors_in(got)] == ["42501"] and not denied_leaks(got), got
    finally:
        pg.psql("DROP FUNCTION public.unnest(anyarray, anyarray)")


def test_through_pgveil_as_psycopg_prepared(pg: EmbeddedPostgres, deny_proxy: ProxyProcess) -> None:
    with psycopg.connect(dsn(pg, deny_proxy.port)) as c:
        rows = c.execute(
            "SELECT * FROM unnest(%s::int[], %s::text[]) WITH ORDINALITY",
            [[1, 2], ["a"]],
            prepare=True,
        ).fetchall()
    assert rows == [(1, "a", 1), (2, None, 2)]


def test_function_notation_reads_a_masked_field(
    pg: EmbeddedPostgres, billing: ProxyProcess
) -> None:
    """`name(c)` is the field c.name (no built-in name() takes a row): pgveil sends
    `(c).name`, which reads the masking subquery's name like `c.name`, and which no function
    created to take the row can turn into a call of it (directly, that function runs)."""
    sql = "SELECT name(c), c.name, name(c.*) FROM billing.customers c WHERE i_customer = 1"
    with psycopg.connect(dsn(pg, billing.port)) as c:
        row = c.execute(sql).fetchone()
    assert row is not None and row[0] == row[1] == row[2] and row[0].startswith("Z*")
    pg.psql(
        "CREATE FUNCTION public.name(record) RETURNS text LANGUAGE plpgsql AS "
        "$$ BEGIN RETURN (SELECT cc_number FROM billing.customers WHERE i_customer = 1); END $$;"
        "GRANT EXECUTE ON FUNCTION public.name(record) TO PUBLIC"
    )
    try:
        with psycopg.connect(dsn(pg, pg.port)) as c:
            assert CARD in repr(c.execute(sql).fetchone())  # directly: the function runs
        with psycopg.connect(dsn(pg, billing.port), autocommit=True) as c:
            try:
                got = repr(c.execute(sql).fetchone())
            except psycopg.errors.InsufficientPrivilege as exc:
                # once pgveil has read the catalog again: a function of that name is refused
                got = str(exc)
                assert "function name is not allowed" in got, got
            else:
                assert "Z*" in got, got
            assert CARD not in got and not leaks(got), got
    finally:
        pg.psql("DROP FUNCTION public.name(record)")


def test_a_call_the_parser_pins_is_sent_pinned(
    pg: EmbeddedPostgres, deny_proxy: ProxyProcess, clients: Clients
) -> None:
    """pglast's grammar (PostgreSQL 16 and later) reads `json_object(...)` as a call of
    pg_catalog.json_object; PostgreSQL 15 reads a plain call, resolved by the search path,
    where `public.json_object(text)` fits a string literal better than the built-in's
    text[]. pgveil sends the call qualified, so the built-in runs."""
    pg.psql(
        "CREATE FUNCTION public.json_object(text) RETURNS text LANGUAGE sql "
        "AS 'SELECT passcode FROM dn.users WHERE id = 1';"
        "GRANT EXECUTE ON FUNCTION public.json_object(text) TO PUBLIC"
    )
    try:
        sql = "SELECT json_object('{a,b}')::text"
        (version,) = clients.direct.reset().execute("SHOW server_version_num").fetchone()  # type: ignore[misc]
        if int(version) < 160000:
            assert denied_leaks(clients.run("direct", sql))  # the function runs directly
        for client in ("psycopg", "asyncpg"):
            got = clients.run(client, sql)
            assert not denied_leaks(got) and not errors_in(got), got
            assert '{"a" : "b"}' in got, got
    finally:
        pg.psql("DROP FUNCTION public.json_object(text)")
