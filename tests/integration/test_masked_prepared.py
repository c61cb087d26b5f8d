"""Masked Queries sent as statements prepared once per server connection
(proxy/session/masked.py, rules/prepare.py) are invisible to the client.

Differential: every case runs through two pgveils with the same rules in front of the same
server, one with `masked_prepare` on (the default) and one with it off (the rewritten text
as a Query, as before), as the masked role, over a bare protocol client that keeps every
message it gets; the two must be byte for byte the same (rows, types, command tags, errors
with SQLSTATE, message and position, transaction states, pipelined answers). psql and
psycopg (simple protocol) compare their output the same way. Then: the server really holds
one statement per shape and reuses it, pgveil's names cannot be used by the client, and
the audit events are the same either way.
"""

from __future__ import annotations

import asyncio
import subprocess
from pathlib import Path
from typing import Any

import asyncpg
import psycopg
import pytest
from psycopg import pq

from proxy.demo.embedded_pg import EmbeddedPostgres
from proxy.wire import messages as m
from proxy.wire.errors import decode_fields
from tests.integration.audit_wire import all_events, audited_proxy, wait_for
from tests.integration.masking_fixture import HELPDESK, HELPDESK_PW, dsn
from tests.support import ProxyProcess, RawClient

MASKED = "masked_trust"  # masked (a member of cc_staff), trust authentication
C = "SELECT i_customer, name, email, balance FROM billing.customers"
JOIN = (
    "SELECT c.i_customer, c.name, c.email, c.phone, c.balance, a.i_account, a.id, a.ip "
    "FROM billing.customers c JOIN billing.accounts a ON a.i_customer = c.i_customer "
    "WHERE c.i_customer = {}"
)
XDRS = (
    "SELECT x.i_xdr, x.cli, x.cld, x.charged, x.connect_time FROM billing.xdrs x "
    "WHERE x.i_account = {} ORDER BY x.connect_time DESC, x.i_xdr LIMIT 50"
)
CLASS = (
    "SELECT i_customer, name, email, balance FROM billing.customers WHERE i_customer_class = {} "
    "AND balance BETWEEN {} AND {} + 2000 ORDER BY balance, i_customer LIMIT 20"
)

# Each case: the Queries of one session, in order (each waits for its answer), or a list in
# a list: Queries sent together before any answer is read (pipelined).
CASES: dict[str, list[object]] = {
    "helpdesk": [
        JOIN.format(1),
        JOIN.format(2),
        JOIN.format(1),
        XDRS.format(11),
        XDRS.format(12),
        CLASS.format(1, 0, 0),
        CLASS.format(2, 17, 17),
        CLASS.format(1, 0, 0),
    ],
    "repeated, more than five times (generic plans)": [JOIN.format(i % 4 + 1) for i in range(9)]
    + [CLASS.format(i % 3 + 1, i, i) for i in range(9)],
    "order by column number": [
        f"{C} WHERE i_customer < 10 ORDER BY 1 LIMIT 3",
        f"{C} WHERE i_customer < 10 ORDER BY 2 DESC, 1 LIMIT 3",
        f"{C} WHERE i_customer < 10 ORDER BY 3, 1 LIMIT 3",
        "SELECT i_customer_class, count(*) FROM billing.customers WHERE i_customer < 100 "
        "GROUP BY 1 ORDER BY 1",
        "SELECT DISTINCT ON (1) i_customer_class, i_customer FROM billing.customers "
        "WHERE i_customer < 100 ORDER BY 1, 2",
    ],
    "in lists, limits, offsets": [
        f"{C} WHERE i_customer IN (1, 2, 3) ORDER BY i_customer",
        f"{C} WHERE i_customer IN (4, 5) ORDER BY i_customer",
        f"{C} WHERE i_customer NOT IN (1, 2) ORDER BY i_customer LIMIT 2 OFFSET 1",
        f"{C} WHERE i_customer NOT IN (3) ORDER BY i_customer LIMIT 3 OFFSET 0",
        f"{C} ORDER BY i_customer LIMIT 0",
    ],
    "typed, signed, huge, string literals": [
        f"{C} WHERE balance > -5 ORDER BY i_customer LIMIT 2",
        f"{C} WHERE i_customer = -1",
        f"{C} WHERE i_customer = 3000000000",
        f"{C} WHERE i_customer = 99999999999999999999",
        f"{C} WHERE i_customer = 2147483647",
        f"{C} WHERE i_customer = 2147483648",
        f"{C} WHERE i_customer = 007",
        f"{C} WHERE balance < 1.5e3 AND i_customer = 1",
        f"{C} WHERE i_customer = 1 AND now() > date '2000-01-01' + interval '1 day'",
        f"{C} WHERE name = E'Zeb\\x41' OR i_customer = 1",
        f"{C} WHERE email = 'x' OR i_customer = 2",
        f"{C} WHERE i_customer = '3'",
        f"{C} WHERE i_customer = 1::int8 + 1",
        "SELECT i_customer, name::varchar(3) FROM billing.customers WHERE i_customer = 1",
        "SELECT i_customer, 5, 'x' FROM billing.customers WHERE i_customer = 1",
        "SELECT i_customer, i_customer = 5 FROM billing.customers WHERE i_customer < 6 "
        "ORDER BY i_customer",
        f"{C} WHERE i_customer BETWEEN 2147483000 AND 2147483000 + 647",
        f"{C} WHERE i_customer BETWEEN 1 AND 1073741823 + 1073741823",
        f"{C} WHERE i_customer BETWEEN 1 AND 1073741824 + 1 ORDER BY i_customer LIMIT 1",
    ],
    "errors": [
        f"{C} WHERE i_customer = 'abc'",
        f"{C} WHERE i_customer = 1 AND i_customer / 0 = 1",
        f"{C} WHERE i_customer = 1 AND 1 / 0 = 1",
        f"{C} WHERE i_customer = 2147483647 + 1",
        f"{C} WHERE i_customer BETWEEN 1 AND 2147483647 + 1",
        f"{C} WHERE name = 5",
        f"{C} WHERE i_customer = 1 AND name > 5 AND i_customer = 2",
        f"{C} WHERE i_customer = 1 AND nosuch = 2",
        "SELECT nosuch FROM billing.customers WHERE i_customer = 1",
        f"{C} WHERE i_customer = 1 AND i_customer_class = 'x'",
        f"{C} WHERE i_customer = 1 ORDER BY 9",
        f"{C} WHERE i_customer = 1 LIMIT 10 OFFSET 'a'",
        f"{C} WHERE i_customer = 1",
    ],
    "transaction blocks": [
        "BEGIN",
        JOIN.format(1),
        JOIN.format(2),
        "SAVEPOINT s",
        f"{C} WHERE i_customer = 1 AND i_customer / 0 = 1",
        JOIN.format(3),
        "ROLLBACK TO SAVEPOINT s",
        JOIN.format(3),
        "COMMIT",
        "BEGIN",
        f"{C} WHERE i_customer = 'abc'",
        JOIN.format(1),
        "ROLLBACK",
        JOIN.format(1),
        "BEGIN ISOLATION LEVEL REPEATABLE READ",
        CLASS.format(1, 0, 0),
        "COMMIT",
    ],
    "discard and deallocate between uses": [
        JOIN.format(1),
        "DISCARD ALL",
        JOIN.format(2),
        JOIN.format(3),
        "DEALLOCATE ALL",
        JOIN.format(1),
        "BEGIN",
        JOIN.format(1),
        "DISCARD ALL",
        JOIN.format(2),
        "ROLLBACK",
        JOIN.format(2),
        "DISCARD PLANS",
        JOIN.format(4),
        "RESET ALL",
        JOIN.format(1),
    ],
    "search_path between uses": [
        "SET search_path = billing",
        "SELECT i_customer, name FROM customers WHERE i_customer = 1",
        "SET search_path = public",
        "SELECT i_customer, name FROM customers WHERE i_customer = 1",
        "SET search_path = billing, public",
        "SELECT i_customer, name FROM customers WHERE i_customer = 2",
        "RESET search_path",
        "SELECT i_customer, name FROM customers WHERE i_customer = 2",
    ],
    "pipelined": [
        [JOIN.format(1), JOIN.format(2), JOIN.format(1), XDRS.format(11)],
        [
            JOIN.format(3),
            f"{C} WHERE i_customer = 'abc'",
            JOIN.format(4),
            "DISCARD ALL",
            JOIN.format(4),
            JOIN.format(5),
        ],
        [
            "BEGIN",
            JOIN.format(1),
            f"{C} WHERE i_customer = 1 AND 1 / 0 = 1",
            JOIN.format(1),
            "ROLLBACK",
            JOIN.format(1),
        ],
        [f"{C} WHERE i_customer = 1; {C} WHERE i_customer = 2", JOIN.format(2)],
        [f"SELECT nosuch FROM billing.customers WHERE i_customer = {i}" for i in (1, 2, 3)],
    ],
    "no columns, locks, subqueries, set operations": [
        "SELECT FROM billing.customers WHERE i_customer = 1",
        "BEGIN",
        f"{C} WHERE i_customer = 1 FOR UPDATE",
        f"{C} WHERE i_customer = 2 FOR SHARE SKIP LOCKED",
        "COMMIT",
        f"{C} WHERE i_customer IN (SELECT i_customer FROM billing.accounts WHERE i_account = 10)",
        f"{C} WHERE i_customer = 1 UNION ALL {C} WHERE i_customer = 2 ORDER BY 1",
        f"WITH x AS ({C} WHERE i_customer = 3) SELECT * FROM x WHERE i_customer = 3",
        "SELECT count(*) FROM billing.customers WHERE i_customer < 100 HAVING count(*) > 1",
    ],
    # the parser matches these expressions with each other (a parameter in each would not)
    "grouped and ordered expressions": [
        "SELECT i_customer = 5, count(*) FROM billing.customers GROUP BY i_customer = 5 ORDER BY 1",
        "SELECT DISTINCT i_customer < 5 FROM billing.customers ORDER BY i_customer < 5",
        "SELECT DISTINCT ON (i_customer < 5) i_customer < 5, i_customer FROM billing.customers "
        "ORDER BY i_customer < 5, i_customer",
        "SELECT i_customer_class, count(*) FROM billing.customers GROUP BY i_customer_class "
        "HAVING i_customer_class > 1 ORDER BY 1",
        "SELECT i_customer, count(*) OVER (PARTITION BY i_customer < 5) FROM billing.customers "
        "WHERE i_customer < 8 ORDER BY i_customer",
        "SELECT (SELECT count(*) FROM billing.accounts a WHERE a.i_customer = 1), count(*) "
        "FROM billing.customers GROUP BY (SELECT count(*) FROM billing.accounts a "
        "WHERE a.i_customer = 1)",
    ],
    "several statements, notices, empty": [
        f"{C} WHERE i_customer = 1; {C} WHERE i_customer = 2",
        f"{C} WHERE i_customer = 1;",
        "SET client_min_messages = notice",
        f"{C} WHERE i_customer = 1 AND i_customer IN (SELECT 1 WHERE 1 = 1)",
        ";",
        "",
    ],
}


Messages = list[tuple[str, bytes]]


def _session(port: int, case: list[object]) -> Messages:
    """Every message the client gets after login, for the Queries of `case`."""
    client = RawClient(port, user=MASKED)
    out: Messages = []
    try:
        for item in case:
            batch = item if isinstance(item, list) else [item]
            client.send_raw(b"".join(m.message(m.QUERY, f"{q}".encode() + b"\0") for q in batch))
            for _ in batch:
                out += client.until_ready()
    finally:
        client.close()
    return out


def _readable(messages: Messages) -> list[str]:
    """The messages for an assertion's diff: type and fields or bytes."""
    return [f"{t} {decode_fields(b)}" if t in "EN" else f"{t} {b!r}" for t, b in messages]


@pytest.mark.parametrize("case", list(CASES))
def test_same_messages_prepared_or_not(
    billing: ProxyProcess, text_proxy: ProxyProcess, case: str
) -> None:
    prepared = _session(billing.port, CASES[case])
    text = _session(text_proxy.port, CASES[case])
    assert _readable(prepared) == _readable(text)
    assert prepared == text  # byte for byte
    assert any(t == "D" for t, _ in prepared) or case in ("errors",)


def _prepared_statements(client: RawClient) -> list[tuple[str, ...]]:
    """pgveil's statements in this session, as the masked role reads
    pg_prepared_statements (names and counts; the text is withheld from masked roles)."""
    answer = client.query(
        "SELECT name, statement IS NULL, generic_plans + custom_plans "
        "FROM pg_prepared_statements WHERE name LIKE 'pgveil\\_prep\\_%' ORDER BY name"
    )
    rows = []
    for t, body in answer:
        if t == "D":
            count = int.from_bytes(body[:2], "big")
            pos, values = 2, []
            for _ in range(count):
                n = int.from_bytes(body[pos : pos + 4], "big", signed=True)
                pos += 4
                values.append(body[pos : pos + n].decode() if n >= 0 else "NULL")
                pos += max(n, 0)
            rows.append(tuple(values))
    return rows


def test_server_reuses_one_statement_per_shape(billing: ProxyProcess) -> None:
    parses = billing.metric("pgveil_masked_prepared_total", step="parse")
    executions = billing.metric("pgveil_masked_prepared_total", step="execution")
    client = RawClient(billing.port, user=MASKED)
    try:
        for i in range(12):
            client.query(JOIN.format(i % 5 + 1))
        for i in range(7):
            client.query(CLASS.format(i % 3 + 1, i * 10, i * 10))
        for i in range(3):
            client.query(f"{C} WHERE i_customer = 99999999999999999999{i}")  # stays text
        statements = _prepared_statements(client)
        # one per shape; run 12 and 7 times (the text is NULL for a masked role)
        assert sorted(count for _name, _null, count in statements) == ["12", "7"], statements
        assert all(null == "t" for _name, null, _count in statements)
        # (the session is live: its counters are read from it)
        assert billing.metric("pgveil_masked_prepared_total", step="parse") - parses == 2
        assert billing.metric("pgveil_masked_prepared_total", step="execution") - executions == 19
        client.query("DISCARD ALL")
        assert _prepared_statements(client) == []
        client.query(JOIN.format(1))
        client.query(JOIN.format(2))
        ((name, _, count),) = _prepared_statements(client)
        assert count == "2"
        assert name.startswith("pgveil_prep_")
    finally:
        client.close()


def test_least_recently_used_beyond_the_bound(billing: ProxyProcess) -> None:
    """More shapes than a connection keeps: the oldest are closed on the server."""
    from proxy.session.masked import PREPARED_PER_CONNECTION

    client = RawClient(billing.port, user=MASKED)
    try:
        # shapes that differ by an inline literal (a huge number stays in the text)
        for i in range(PREPARED_PER_CONNECTION + 5):
            client.query(f"{C} WHERE i_customer = 1 AND i_customer <> {10**20 + i}")
        statements = _prepared_statements(client)
        assert len(statements) == PREPARED_PER_CONNECTION
    finally:
        client.close()


@pytest.mark.parametrize(
    "sql",
    [
        "DEALLOCATE pgveil_prep_0_1",
        "EXECUTE pgveil_prep_0_1",
        "PREPARE pgveil_prep_x AS SELECT 1",
        "SELECT 1; DEALLOCATE pgveil_prep_0_1",
    ],
)
def test_client_cannot_name_pgveils_statements(billing: ProxyProcess, sql: str) -> None:
    client = RawClient(billing.port, user=MASKED)
    try:
        client.query(JOIN.format(1))
        answer = client.query(sql)
        errors = [decode_fields(b) for t, b in answer if t == "E"]
        assert [(e["C"], e["M"]) for e in errors] == [
            ("42501", "pgveil: statement names beginning with pgveil_prep_ are pgveil's")
        ]
    finally:
        client.close()


def test_client_parse_of_pgveils_name_is_refused(billing: ProxyProcess) -> None:
    client = RawClient(billing.port, user=MASKED)
    try:
        client.query(JOIN.format(1))
        ((name, _, _),) = _prepared_statements(client)
        client.send("P", name.encode() + b"\0SELECT 1\0\0\0")
        client.send("B", b"\0" + name.encode() + b"\0\0\0\0\0\0\0")
        client.send("S")
        answer = client.until_ready()
        errors = [decode_fields(b) for t, b in answer if t == "E"]
        assert [e["C"] for e in errors] == ["42501"]
        # the extended-protocol client's Queries go as text from now on: still answered
        rows = [b for t, b in client.query(JOIN.format(1)) if t == "D"]
        assert rows
    finally:
        client.close()


def test_psql_psycopg_and_asyncpg_see_the_same(
    pg: EmbeddedPostgres, billing: ProxyProcess, text_proxy: ProxyProcess
) -> None:
    script = "\n".join(
        [
            "\\set ON_ERROR_STOP 0",
            *(f"{q};" for q in CASES["helpdesk"]),
            f"{C} WHERE i_customer = 'abc';",
            f"{C} WHERE name = 5;",
            "BEGIN;",
            f"{C} WHERE i_customer = 1 AND 1 / 0 = 1;",
            f"{JOIN.format(1)};",
            "ROLLBACK;",
            f"{JOIN.format(1)};",
        ]
    )

    def psql(port: int) -> str:
        done = subprocess.run(
            ["psql", "-X", "-v", "VERBOSITY=verbose", "-h", "127.0.0.1", "-p", str(port),
             "-U", MASKED, "-d", "postgres"],
            input=script, capture_output=True, text=True, check=False,
        )  # fmt: skip
        return done.stdout + done.stderr

    assert psql(billing.port) == psql(text_proxy.port)

    def psycopg_rows(port: int) -> list[object]:
        out: list[object] = []
        with psycopg.connect(dsn(pg, port, HELPDESK, HELPDESK_PW), autocommit=True) as conn:
            cur = psycopg.ClientCursor(conn)
            for q in CASES["helpdesk"]:
                cur.execute(str(q))
                out.append(([d.name for d in cur.description or []], cur.fetchall()))
            try:
                cur.execute(f"{C} WHERE i_customer = 'abc'")
            except psycopg.Error as exc:
                out.append((exc.sqlstate, str(exc)))
        return out

    assert psycopg_rows(billing.port) == psycopg_rows(text_proxy.port)

    async def asyncpg_answers(port: int) -> list[object]:
        # execute() without arguments: a simple-protocol Query (the command tag comes back)
        conn = await asyncpg.connect(
            host="127.0.0.1", port=port, user=HELPDESK, password=HELPDESK_PW,
            database="postgres", ssl=False,
        )  # fmt: skip
        out: list[object] = []
        try:
            for q in [*CASES["helpdesk"], *CASES["errors"]]:
                try:
                    out.append(await conn.execute(str(q)))
                except asyncpg.PostgresError as exc:
                    out.append((exc.sqlstate, str(exc), getattr(exc, "position", None)))
        finally:
            await conn.close()
        return out

    prepared = asyncio.run(asyncpg_answers(billing.port))
    assert prepared == asyncio.run(asyncpg_answers(text_proxy.port))
    assert "SELECT 1" in prepared


# what differs between two sessions, whatever they run
_SESSION_FIELDS = frozenset(
    ("ts", "time", "duration_ms", "session", "session_id", "seq", "pid", "backend_pid",
     "client", "client_addr", "client_port", "prev", "hash", "chain", "instance", "id")
)  # fmt: skip


def test_audit_events_are_the_same(
    pg: EmbeddedPostgres, billing: ProxyProcess, tmp_path: Path
) -> None:
    """The audited masked session's events (subjects, columns, rows, outcomes) do not
    depend on how the statements went to the server."""
    corpus: list[object] = [
        *CASES["helpdesk"],
        *CASES["errors"],
        *CASES["transaction blocks"],
        *CASES["discard and deallocate between uses"],
    ]  # (not pipelined: a `running` event depends on where the reads split the answers)
    seen: list[list[dict[str, object]]] = []
    for setting in ("true", "false"):
        d = tmp_path / setting
        d.mkdir()
        with audited_proxy(pg, d, "--masked-prepare", setting) as (proxy, path):
            _session(proxy.port, corpus)
            # the session's end is recorded after all its statements
            wait_for(
                lambda: any(e["type"] == "session.end" for e in all_events(path)),
                "the session's end",
            )
            events = [
                {k: v for k, v in e.items() if k not in _SESSION_FIELDS}
                for e in all_events(path)
                if e["type"] in ("access", "refused") and e.get("outcome") != "running"
            ]
        seen.append(events)
    prepared, text = seen
    assert len(prepared) > 30
    assert any(e.get("subjects") for e in prepared)
    assert prepared == text


def test_a_table_changed_between_executions(
    pg: EmbeddedPostgres, billing: ProxyProcess, text_proxy: ProxyProcess
) -> None:
    """Another session's ALTER TABLE changes a prepared statement's result type (the server
    then refuses it: 0A000, "cached plan must not change result type"). Outside a
    transaction block nothing ran: the Query goes again as text and the client gets what
    the text gets. Inside one the server's error aborted the block: the client gets it."""
    q = JOIN.format(1)
    client = RawClient(billing.port, user=MASKED)
    try:
        client.query(q)
        client.query(q)
        pg.psql("ALTER TABLE billing.accounts ALTER COLUMN id TYPE varchar(40)")
        try:
            assert client.query(q) == _session(text_proxy.port, [q])
            assert client.query(q) == _session(text_proxy.port, [q])
            client.query("BEGIN")
            pg.psql("ALTER TABLE billing.accounts ALTER COLUMN id TYPE text")
            errors = [decode_fields(b) for t, b in client.query(q) if t == "E"]
            assert [(e["C"], e["M"]) for e in errors] == [
                ("0A000", "cached plan must not change result type")
            ]
            assert client.query("ROLLBACK")[-1] == ("Z", b"I")
            # pipelined: an outdated execution followed by more Queries cannot go again
            # behind them: the first gets the server's error, the last goes again
            client.query(q)
            pg.psql("ALTER TABLE billing.accounts ALTER COLUMN id TYPE varchar(40)")
            client.send_raw(m.message(m.QUERY, q.encode() + b"\0") * 2)
            first, second = client.until_ready(), client.until_ready()
            assert [decode_fields(b)["C"] for t, b in first if t == "E"] == ["0A000"]
            assert second == _session(text_proxy.port, [q])
            pg.psql("ALTER TABLE billing.accounts ALTER COLUMN id TYPE text")
            # prepared again: the same as the text
            assert client.query(q) == _session(text_proxy.port, [q])
            assert client.query(q) == _session(text_proxy.port, [q])
        finally:
            pg.psql("ALTER TABLE billing.accounts ALTER COLUMN id TYPE text")
        # the first statement was outdated (its Query sent again), the second too (in the
        # block), the third too (pipelined), the fourth is in use
        ((name, _, count),) = _prepared_statements(client)
        assert name.endswith("_4") and count == "2"
    finally:
        client.close()


def _server_answer(
    conn: psycopg.Connection[Any], sql: str, params: list[bytes] | None, types: list[int] | None
) -> tuple[str, str | None, str | None]:
    """(status, SQLSTATE, position) of `sql` run as text (params None) or prepared with
    text-format parameters of `types` (0: the server infers the type)."""
    pgconn = conn.pgconn
    if params is None:
        result = pgconn.exec_(sql.encode())
    else:
        pgconn.exec_(b"DEALLOCATE ALL")
        prepared = pgconn.prepare(b"probe", sql.encode(), types)
        result = prepared
        if prepared.status == pq.ExecStatus.COMMAND_OK:
            result = pgconn.exec_prepared(b"probe", params)
    return (
        pq.ExecStatus(result.status).name,
        (result.error_field(pq.DiagnosticField.SQLSTATE) or b"").decode() or None,
        (result.error_field(pq.DiagnosticField.STATEMENT_POSITION) or b"").decode() or None,
    )


def test_why_string_literals_stay_in_the_text(pg: EmbeddedPostgres, billing: ProxyProcess) -> None:
    """Against the server itself: a string literal as a parameter is read otherwise. Its
    value is converted when the statement is bound, not parsed: a value the column's type
    rejects fails without the position the literal's error has; declared `text`, it changes
    which operator applies (`bpchar = text` compares with trailing spaces, `int = text` does
    not exist). So only integers, declared int4, are parameters (rules/prepare.py)."""
    q = "SELECT i_customer FROM billing.customers WHERE i_customer = {}"
    with psycopg.connect(pg.dsn(), autocommit=True) as conn:
        # an integer: the same either way
        assert _server_answer(conn, q.format("5"), None, None)[0] == "TUPLES_OK"
        assert _server_answer(conn, q.format("$1"), [b"5"], [23])[0] == "TUPLES_OK"
        # a string the column's type rejects: the literal's error points at it, the
        # parameter's has no position
        assert _server_answer(conn, q.format("'abc'"), None, None) == ("FATAL_ERROR", "22P02", "61")
        assert _server_answer(conn, q.format("$1"), [b"abc"], [0]) == ("FATAL_ERROR", "22P02", None)
        # declared text: no operator where the literal had one
        assert _server_answer(conn, q.format("'5'"), None, None)[0] == "TUPLES_OK"
        assert _server_answer(conn, q.format("$1"), [b"5"], [25])[1] == "42883"
        # bpchar: the literal compares as bpchar (trailing spaces ignored), text does not
        b = "SELECT 'a'::char(3) = {}"
        assert conn.execute(b.format("'a '")).fetchone() == (True,)
        with conn.cursor() as cur:
            cur.execute(b.format("%s::text"), ["a "], prepare=True)
            assert cur.fetchone() == (False,)
