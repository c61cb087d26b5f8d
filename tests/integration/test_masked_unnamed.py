"""A masked extended-protocol client's unnamed statement served by a statement pgveil
prepares once per server connection (proxy/session/masked.py: The unnamed statement) is
invisible to the client.

Differential, as tests/integration/test_masked_prepared.py: every case runs through two
pgveils with the same rules in front of the same server, `masked_prepare` on and off, as
the masked role over a bare protocol client; every message it gets must be byte for byte
the same (ParseComplete where the client's Parse was, rows, types, command tags, errors
with SQLSTATE, message and position, transaction states, pipelined answers). Then: the
server really parses the text once and runs pgveil's statement, the unnamed statement
behaves as the server's own across Syncs, Closes, Queries and DISCARD ALL, and a table
changed between executions gets what the text gets.
"""

from __future__ import annotations

import asyncio
import struct
from collections.abc import Sequence

import asyncpg
import psycopg
import pytest

from proxy.demo.embedded_pg import EmbeddedPostgres
from proxy.wire import extended
from proxy.wire import messages as m
from proxy.wire.errors import decode_fields
from rules.prepare import client_parameters_eligible
from tests.integration.masking_fixture import HELPDESK, HELPDESK_PW, dsn
from tests.integration.test_masked_prepared import _readable
from tests.support import ProxyProcess, RawClient

MASKED = "masked_trust"  # masked (a member of cc_staff), trust authentication
JOIN = (
    "SELECT c.i_customer, c.name, c.email, c.phone, c.balance, a.i_account, a.id, a.ip "
    "FROM billing.customers c JOIN billing.accounts a ON a.i_customer = c.i_customer "
    "WHERE c.i_customer = $1"
)
XDRS = (
    "SELECT x.i_xdr, x.cli, x.cld, x.charged FROM billing.xdrs x "
    "WHERE x.i_account = $1 ORDER BY x.connect_time DESC, x.i_xdr LIMIT $2"
)
C = "SELECT i_customer, name, email, balance FROM billing.customers"
INT4 = 23
SYNC = m.message(m.SYNC, b"")


def parse(sql: str, types: Sequence[int] = ()) -> bytes:
    return extended.parse(b"", sql.encode(), extended.type_section(types))


def bind(
    *params: str | bytes | None, formats: Sequence[int] = (), results: Sequence[int] = ()
) -> bytes:
    values = [p.encode() if isinstance(p, str) else p for p in params]
    return extended.bind(b"", b"", formats, values, results)


def run(sql: str, *params: str | bytes | None, describe: bool = True) -> list[bytes]:
    """The unnamed statement parsed, bound, described and run, as libpq's PQexecParams."""
    out = [parse(sql), bind(*params)]
    if describe:
        out.append(extended.describe(b"P", b""))
    return [*out, extended.execute(b""), SYNC]


DESCRIBE_S = extended.describe(b"S", b"")
CLOSE_S = extended.close(b"S", b"")
EXECUTE = extended.execute(b"")
DESCRIBE_P = extended.describe(b"P", b"")

# Each case: the batches of one session, in order; a batch is a list of messages sent
# together (answered up to one ReadyForQuery per Sync), or a str: a Query.
CASES: dict[str, list[object]] = {
    "repeated, more than five times (generic plans)": [run(JOIN, str(i % 4 + 1)) for i in range(9)]
    + [run(XDRS, str(10 + i % 3), str(5 + i)) for i in range(8)],
    "no parameters, in lists, limits, between": [
        run(f"{C} WHERE i_customer IN ($1, $2, $3) ORDER BY i_customer", "1", "2", "3"),
        run(f"{C} WHERE i_customer IN ($1, $2, $3) ORDER BY i_customer", "4", "5", "6"),
        run(f"{C} WHERE i_customer BETWEEN $1 AND $2 ORDER BY i_customer LIMIT $3", "1", "9", "3"),
        run(f"{C} WHERE i_customer BETWEEN $1 AND $2 ORDER BY i_customer LIMIT $3", "5", "9", "0"),
        run(f"{C} ORDER BY i_customer LIMIT 3"),
        run(f"{C} ORDER BY i_customer LIMIT 3"),
        run(f"{C} ORDER BY i_customer OFFSET $1 LIMIT 2", "4"),
        run(f"{C} ORDER BY i_customer OFFSET $1 LIMIT 2", "-1"),
    ],
    "parameters the server would plan otherwise stay text": [
        run("SELECT $1::int + i_customer, name FROM billing.customers WHERE i_customer = $1", "1"),
        run("SELECT $1::int + i_customer, name FROM billing.customers WHERE i_customer = $1", "2"),
        run(f"{C} WHERE i_customer = $1 + 1", "1"),
        run(f"{C} WHERE i_customer = $1 + 1", "2147483647"),
        run(f"{C} WHERE lower(name) = lower($1)", "x"),
        run(f"{C} WHERE lower(name) = lower($1)", "y"),
    ],
    "errors": [
        run(JOIN, "1"),
        run(JOIN, "abc"),  # (the Bind fails: input syntax)
        run(JOIN, "2147483648"),
        run(JOIN, None),
        run(JOIN, "2"),
        [parse(f"{C} WHERE nosuch = $1"), bind("1"), EXECUTE, SYNC],
        [bind("1"), EXECUTE, SYNC],  # (after the failed Parse: no unnamed statement)
        [parse(f"{C} WHERE i_customer = $1 AND 1 / 0 = 1"), bind("1"), EXECUTE, SYNC],
        [parse(f"{C} WHERE i_customer = $1 AND 1 / 0 = 1"), bind("1"), EXECUTE, SYNC],
        run(f"{C} WHERE i_customer = $1 AND i_customer / 0 = 1", "1"),
        run(f"{C} WHERE i_customer = $1 AND i_customer / 0 = 1", "1"),
        [parse(JOIN), bind("1", "2"), EXECUTE, SYNC],  # (too many parameters)
        [parse(JOIN), bind(), EXECUTE, SYNC],
        run(JOIN, "3"),
    ],
    "the unnamed statement across Syncs, Describe, Close, Query": [
        run(JOIN, "1"),
        [parse(JOIN), SYNC],
        [DESCRIBE_S, SYNC],
        [bind("2"), DESCRIBE_P, EXECUTE, SYNC],
        [bind("3"), EXECUTE, SYNC, bind("4"), EXECUTE, SYNC],
        [DESCRIBE_S, bind("5"), EXECUTE, SYNC],
        [CLOSE_S, SYNC],
        [bind("1"), EXECUTE, SYNC],  # closed: 26000
        [DESCRIBE_S, SYNC],
        run(JOIN, "1"),
        run(JOIN, "2"),
        "SELECT 1",
        [bind("1"), EXECUTE, SYNC],  # a Query drops the unnamed statement
        run(JOIN, "3"),
        [parse("SELECT 1"), SYNC],
        [bind(), EXECUTE, SYNC],  # replaced by another
        run(JOIN, "3"),
        [extended.close(b"P", b""), bind("4"), EXECUTE, SYNC],
    ],
    "declared types, binary formats": [
        [parse(JOIN, [INT4]), bind(struct.pack("!i", 1), formats=[1]), DESCRIBE_P, EXECUTE, SYNC],
        [
            parse(JOIN, [INT4]),
            bind(struct.pack("!i", 2), formats=[1], results=[1]),
            DESCRIBE_P,
            EXECUTE,
            SYNC,
        ],
        [parse(JOIN, [INT4]), DESCRIBE_S, bind("3"), EXECUTE, SYNC],
        [parse(JOIN, [20]), DESCRIBE_S, bind("3"), EXECUTE, SYNC],
        [parse(JOIN, [20]), DESCRIBE_S, bind("4"), EXECUTE, SYNC],
        [parse(JOIN), DESCRIBE_S, bind("3"), EXECUTE, SYNC],
    ],
    "row limits": [
        [
            parse(f"{C} WHERE i_customer < $1 ORDER BY i_customer"),
            bind("10"),
            extended.execute(b"", 3),
            extended.execute(b"", 3),
            SYNC,
        ],
        [
            parse(f"{C} WHERE i_customer < $1 ORDER BY i_customer"),
            bind("10"),
            extended.execute(b"", 4),
            m.message(m.FLUSH, b""),
            extended.execute(b"", 0),
            SYNC,
        ],
    ],
    "transaction blocks": [
        "BEGIN",
        run(JOIN, "1"),
        run(JOIN, "2"),
        "SAVEPOINT s",
        run(f"{C} WHERE i_customer = $1 AND i_customer / 0 = 1", "1"),
        run(JOIN, "3"),  # (in a failed block)
        "ROLLBACK TO SAVEPOINT s",
        run(JOIN, "3"),
        "COMMIT",
        [parse("BEGIN"), bind(), EXECUTE, *run(JOIN, "1")[:-1], *run(JOIN, "2")],
        "COMMIT",
        run(JOIN, "4"),
    ],
    "pipelined": [
        [*run(JOIN, "1"), *run(JOIN, "2"), *run(JOIN, "3")],
        [*run(JOIN, "1"), *run(JOIN, "abc"), *run(JOIN, "3")],
        [parse(JOIN), bind("1"), EXECUTE, parse(JOIN), bind("2"), EXECUTE, SYNC],
        [parse(JOIN), bind("1"), EXECUTE, bind("2"), EXECUTE, SYNC],
        run(JOIN, "5"),
    ],
    "discard and deallocate by Query": [
        run(JOIN, "1"),
        run(JOIN, "2"),
        "DISCARD ALL",
        run(JOIN, "3"),
        run(JOIN, "4"),
        "DEALLOCATE ALL",
        run(JOIN, "1"),
        run(JOIN, "2"),
    ],
    "the client's own named statements beside it": [
        run(JOIN, "1"),
        [extended.parse(b"s1", JOIN.encode()), SYNC],
        run(JOIN, "2"),
        [extended.bind(b"", b"s1", (), [b"3"], ()), EXECUTE, SYNC],
        [bind("4"), EXECUTE, SYNC],
        [extended.close(b"S", b"s1"), SYNC],
        [bind("5"), EXECUTE, SYNC],
    ],
}

Messages = list[tuple[str, bytes]]


def _session(port: int, case: list[object]) -> Messages:
    """Every message the client gets after login, for the batches of `case`."""
    client = RawClient(port, user=MASKED)
    out: Messages = []
    try:
        for item in case:
            if isinstance(item, str):
                out += client.query(item)
                continue
            assert isinstance(item, list)
            client.send_raw(b"".join(item))
            for _ in range(sum(1 for message in item if message[:1] == b"S")):
                out += client.until_ready()
    finally:
        client.close()
    return out


@pytest.mark.parametrize("case", list(CASES))
def test_same_messages_served_or_not(
    billing: ProxyProcess, text_proxy: ProxyProcess, case: str
) -> None:
    served = _session(billing.port, CASES[case])
    text = _session(text_proxy.port, CASES[case])
    assert _readable(served) == _readable(text)
    assert served == text  # byte for byte
    assert any(t == "D" for t, _ in served)


def _ours(client: RawClient) -> list[tuple[str, int]]:
    """pgveil's statements in this session and how often the server ran each."""
    rows = []
    for t, body in client.query(
        "SELECT name, generic_plans + custom_plans FROM pg_prepared_statements "
        "WHERE name LIKE 'pgveil\\_prep\\_%' ORDER BY name"
    ):
        if t == "D":
            (n1,) = struct.unpack_from("!i", body, 2)
            name = body[6 : 6 + n1].decode()
            (n2,) = struct.unpack_from("!i", body, 6 + n1)
            rows.append((name, int(body[10 + n1 : 10 + n1 + n2])))
    return rows


def test_the_server_parses_the_text_once(billing: ProxyProcess) -> None:
    parses = billing.metric("pgveil_masked_prepared_total", step="parse")
    executions = billing.metric("pgveil_masked_prepared_total", step="execution")
    client = RawClient(billing.port, user=MASKED)
    try:
        for i in range(10):
            client.send_raw(b"".join(run(JOIN, str(i % 5 + 1))))
            answer = client.until_ready()
            assert [t for t, _ in answer if t != "D"] == ["1", "2", "T", "C", "Z"]
        # the first went as text (and pgveil's Parse after it); nine ran pgveil's statement
        assert billing.metric("pgveil_masked_prepared_total", step="parse") - parses == 1
        assert billing.metric("pgveil_masked_prepared_total", step="execution") - executions == 9
        ((name, count),) = _ours(client)
        assert count == 9
        # the client's Bind of its unnamed statement after a Sync runs it too
        client.send_raw(b"".join(run(JOIN, "1")) + bind("2") + EXECUTE + SYNC)
        client.until_ready()
        client.until_ready()
        assert _ours(client) == [(name, 11)]
    finally:
        client.close()


def test_a_bind_after_discard_all_in_a_named_statement(
    billing: ProxyProcess, text_proxy: ProxyProcess
) -> None:
    """DISCARD ALL or DEALLOCATE ALL, run from a named statement, drop pgveil's statement
    while the server keeps its unnamed statement: a later Bind of the client's unnamed
    statement without a Parse gets what the text path gets (pgveil gives the server's
    unnamed statement the text again first)."""
    case: list[object] = [
        run(JOIN, "1"),
        run(JOIN, "2"),
        [extended.parse(b"reset", b"DEALLOCATE ALL"), extended.bind(b"", b"reset", (), [], ()),
         EXECUTE, SYNC],
        [bind("1"), EXECUTE, SYNC],
        [DESCRIBE_S, bind("2"), EXECUTE, SYNC],
        run(JOIN, "1"),
        run(JOIN, "2"),
        [extended.parse(b"reset2", b"DISCARD ALL"), SYNC],  # (parsed, never run)
        [bind("1"), EXECUTE, SYNC],
        [extended.bind(b"", b"reset2", (), [], ()), EXECUTE, SYNC],
        [bind("2"), EXECUTE, SYNC],
        run(JOIN, "1"),
    ]  # fmt: skip
    served = _session(billing.port, case)
    assert _readable(served) == _readable(_session(text_proxy.port, case))
    assert [t for t, _ in served].count("D") >= 6


def test_a_table_changed_between_executions(
    pg: EmbeddedPostgres, billing: ProxyProcess, text_proxy: ProxyProcess
) -> None:
    """Another session's ALTER TABLE changes the result type of pgveil's statement (the
    server refuses it in the Bind: 0A000). Outside a transaction block nothing ran: the
    client's messages go again with the text, and it gets what the text gets. Inside one,
    or with more already sent behind the Sync, the server's error goes to the client, as
    for a statement it prepared itself."""
    batch = run(JOIN, "1")
    client = RawClient(billing.port, user=MASKED)

    def text() -> Messages:
        return _session(text_proxy.port, [batch])

    def answer(*batches: list[bytes]) -> list[Messages]:
        client.send_raw(b"".join(b"".join(b) for b in batches))
        return [client.until_ready() for b in batches for x in b if x[:1] == b"S"]

    try:
        answer(batch)
        answer(batch)
        pg.psql("ALTER TABLE billing.accounts ALTER COLUMN id TYPE varchar(40)")
        try:
            assert answer(batch) == [text()]
            assert answer(batch) == [text()]
            client.query("BEGIN")
            pg.psql("ALTER TABLE billing.accounts ALTER COLUMN id TYPE text")
            (got,) = answer(batch)
            errors = [decode_fields(b) for t, b in got if t == "E"]
            assert [(e["C"], e["M"]) for e in errors] == [
                ("0A000", "cached plan must not change result type")
            ]
            assert client.query("ROLLBACK")[-1] == ("Z", b"I")
            answer(batch)  # (served again)
            pg.psql("ALTER TABLE billing.accounts ALTER COLUMN id TYPE varchar(40)")
            first, second = answer(batch, batch)
            # (whether pgveil has read the second batch by the time the first one's
            # ReadyForQuery comes is timing: the first gets the text's answer, sent again,
            # or else the server's error; never anything else)
            outdated = [decode_fields(b)["C"] for t, b in first if t == "E"]
            assert outdated == ["0A000"] or first == text(), first
            assert second == text()
            pg.psql("ALTER TABLE billing.accounts ALTER COLUMN id TYPE text")
            assert answer(batch) == [text()]
            assert answer(batch) == [text()]
        finally:
            pg.psql("ALTER TABLE billing.accounts ALTER COLUMN id TYPE text")
    finally:
        client.close()


def test_psycopg_and_asyncpg_see_the_same(
    pg: EmbeddedPostgres, billing: ProxyProcess, text_proxy: ProxyProcess
) -> None:
    """psycopg without preparing (every execution a Parse of the unnamed statement, as
    before its fifth) and asyncpg (named statements: the client prepares them itself)."""

    def psycopg_rows(port: int) -> list[object]:
        out: list[object] = []
        with psycopg.connect(dsn(pg, port, HELPDESK, HELPDESK_PW), autocommit=True) as conn:
            for i in range(8):
                cur = conn.execute(JOIN.replace("$1", "%s"), [i % 3 + 1], prepare=False)
                out.append(([d.name for d in cur.description or []], cur.fetchall()))
            for bad in ("abc", 2**40):
                try:
                    conn.execute(JOIN.replace("$1", "%s"), [bad], prepare=False)
                except psycopg.Error as exc:
                    out.append((exc.sqlstate, str(exc)))
            with conn.transaction():
                cur = conn.execute(XDRS.replace("$1", "%s").replace("$2", "%s"), [11, 5])
                out.append(cur.fetchall())
        return out

    assert psycopg_rows(billing.port) == psycopg_rows(text_proxy.port)

    async def asyncpg_rows(port: int) -> list[object]:
        conn = await asyncpg.connect(
            host="127.0.0.1", port=port, user=HELPDESK, password=HELPDESK_PW,
            database="postgres", ssl=False, statement_cache_size=0,
        )  # fmt: skip
        out: list[object] = []
        try:
            for i in range(8):
                out.append([tuple(r) for r in await conn.fetch(JOIN, i % 3 + 1)])
        finally:
            await conn.close()
        return out

    assert asyncio.run(asyncpg_rows(billing.port)) == asyncio.run(asyncpg_rows(text_proxy.port))


@pytest.mark.parametrize(
    ("sql", "eligible"),
    [
        ("SELECT abalance FROM pgbench_accounts WHERE aid = $1", True),
        ("SELECT a FROM t WHERE id IN ($1, $2) ORDER BY a LIMIT $3 OFFSET $4", True),
        ("SELECT a FROM t WHERE id BETWEEN $1 AND $2", True),
        ("SELECT a FROM t WHERE $1 = id", True),
        ("SELECT a FROM t", True),
        ("SELECT a FROM t WHERE x = (SELECT b FROM u WHERE u.k = $1)", True),
        # where a custom plan may fold (and fail) what a generic plan evaluates later
        ("SELECT a FROM t WHERE id = $1 + 1", False),
        ("SELECT a FROM t WHERE lower(x) = lower($1)", False),
        ("SELECT a FROM t WHERE x = $1::text", False),
        ("SELECT a FROM t WHERE x = (SELECT $1)", False),
        # matched with each other by the parser, or one parameter in two places
        ("SELECT $1::int, a FROM t WHERE id = $1", False),
        ("SELECT a FROM t WHERE id = $1 OR k = $1", False),
        ("SELECT a FROM t GROUP BY a HAVING count(*) > $1", False),
        ("SELECT a FROM t ORDER BY a = $1", False),
        # not one plain SELECT
        ("UPDATE t SET a = 1 WHERE id = $1", False),
        ("WITH d AS (DELETE FROM t WHERE id = $1 RETURNING a) SELECT a FROM d", False),
        ("SELECT a INTO u FROM t WHERE id = $1", False),
        ("SELECT 1; SELECT 2", False),
        ("VALUES ($1)", False),
    ],
)
def test_which_texts_a_kept_statement_serves(sql: str, eligible: bool) -> None:
    assert client_parameters_eligible(sql) is eligible
