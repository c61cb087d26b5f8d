"""White-box attacks on masked Queries sent as prepared executions (issue 15,
proxy/session/masked.py, rules/prepare.py): every case is named after the behaviour it
holds pgveil to, whether it found a problem or not.

Differential, as tests/integration/test_masked_prepared.py: each session runs through a
pgveil with `masked_prepare` on and one with it off (the rewritten text as a Query) in front
of the same server, as the masked role, over a bare protocol client; every message the
client gets must be the same byte for byte. Then what a client can do with pgveil's
statements (their names are visible in pg_prepared_statements), and the audit events.
"""

from __future__ import annotations

from pathlib import Path

import psycopg
import pytest

from proxy.demo.embedded_pg import EmbeddedPostgres
from proxy.wire import messages as m
from proxy.wire.errors import decode_fields
from tests.integration.audit_wire import all_events, audited_proxy, wait_for
from tests.integration.masking_fixture import HELPDESK, HELPDESK_PW, dsn
from tests.integration.test_masked_prepared import (
    JOIN,
    MASKED,
    _prepared_statements,
    _readable,
)
from tests.support import ProxyProcess, RawClient

C = "SELECT i_customer, name, email, balance FROM billing.customers"
# a rewritten SELECT whose unit is known only per row: the server's feature_not_supported
# (0A000, the SQLSTATE of an outdated prepared statement too) comes from running it
UNIT = (
    "SELECT i_customer, name, date_part(CASE WHEN i_customer = 2 THEN 'timezone' "
    "ELSE 'year' END, now()::timestamp) FROM billing.customers WHERE i_customer < 10"
)

NULLABLE = (
    "SELECT c.name, a.ip FROM billing.customers c LEFT JOIN billing.accounts a "
    "ON a.i_customer = c.i_customer WHERE c.i_customer = 1 FOR UPDATE OF a"
)


def _query(sql: str) -> bytes:
    return m.message(m.QUERY, sql.encode() + b"\0")


def _copy_data(data: bytes) -> bytes:
    return m.message(m.COPY_DATA, data)


def _message(typ: int, body: bytes) -> bytes:
    return m.message(typ, body)


SYNC = m.message(m.SYNC, b"")


# Each step: a Query (its answer read), a list of Queries sent together (pipelined), or
# (bytes, n): raw messages sent together, then n ReadyForQuery read.
Step = str | list[str] | tuple[bytes, int]

CASES: dict[str, list[Step]] = {
    # an error with an outdated statement's SQLSTATE that comes from running the statement
    # (rows sent before it): the client gets it as the text gets it, the Query runs once
    "a statement's own 0A000 is not an outdated statement": [
        UNIT,
        f"{UNIT} ORDER BY i_customer",
        UNIT,
        "BEGIN",
        UNIT,
        "ROLLBACK",
        [UNIT, UNIT],
        UNIT,
        # a 0A000 of the planner, in the Bind: sent again as text outside a block (which
        # gets the same error), the server's inside one
        NULLABLE,
        NULLABLE,
        "BEGIN",
        NULLABLE,
        "ROLLBACK",
        [NULLABLE, JOIN.format(1)],
    ],
    "generic plans from the first execution (plan_cache_mode)": [
        "SET plan_cache_mode = force_generic_plan",
        JOIN.format(1),
        JOIN.format(2),
        f"{C} WHERE i_customer IN (1, 2, 3) ORDER BY i_customer LIMIT 1 OFFSET 1",
        f"{C} WHERE i_customer BETWEEN 1 AND 2 ORDER BY balance DESC, i_customer LIMIT 2",
        f"{C} WHERE i_customer = 1 + 1",
        f"{C} WHERE i_customer = i_customer_class + 1 ORDER BY i_customer",
        f"{C} WHERE i_customer - 1 = 0",
        f"{C} WHERE 2 = i_customer",
        "SELECT x.i_xdr, x.cli FROM billing.xdrs x WHERE x.i_xdr = 5",
        "SELECT x.i_xdr, x.cli FROM billing.xdrs x WHERE x.i_xdr BETWEEN 3 AND 6 ORDER BY 1",
        "SELECT x.i_xdr, x.cli FROM billing.xdrs x WHERE x.i_xdr IN (1, 2147483647) ORDER BY 1",
        "SET plan_cache_mode = force_custom_plan",
        JOIN.format(3),
        "RESET plan_cache_mode",
        JOIN.format(1),
    ],
    "literal spellings": [
        f"{C} WHERE i_customer = - 1",
        f"{C} WHERE i_customer=-1",
        f"{C} WHERE i_customer =+1",
        f"{C} WHERE i_customer = +1",
        f"{C} WHERE i_customer = (1)",
        f"{C} WHERE i_customer = ((2))",
        f"{C} WHERE i_customer = 1::int8",
        f"{C} WHERE i_customer = int4 '1'",
        f"{C} WHERE i_customer = 1+1",
        f"{C} WHERE i_customer=1+1",
        f"{C} WHERE i_customer = 3-1",
        f"{C} WHERE i_customer = 1 - -1",
        f"{C} WHERE i_customer = 5e0",
        f"{C} WHERE i_customer = 2.0",
        f"{C} WHERE i_customer = 0x1F",
        f"{C} WHERE i_customer = 0o17",
        f"{C} WHERE i_customer = 0b1",
        f"{C} WHERE i_customer = 1_000",
        f"{C} WHERE i_customer = 1e",
        f"{C} WHERE i_customer = 00000000001",
        f"{C} WHERE i_customer = 0000000002",
        f"{C} WHERE i_customer = 0",
        f"{C} WHERE i_customer =/* a comment */1",
        f"{C} WHERE i_customer = -- a comment\n2",
        f"{C} WHERE i_customer = /* nested /* comment */ */ 1",
        f"{C} WHERE i_customer =\u00a01",
        f"{C} WHERE i_customer =\u20031",
        f"{C} WHERE i_customer = \uff11",
        f"{C} WHERE i_customer = $$1$$",
        f"{C} WHERE i_customer = U&'1'",
        f"{C} WHERE i_customer\t=\n1\r",
    ],
    # parameter references written by the client (a Query has none: the server's error):
    # never taken for pgveil's parameters or its literal placeholders
    "the client's own parameter references": [
        f"{C} WHERE i_customer = 1 AND i_customer_class = $1",
        f"{C} WHERE i_customer = $1 AND i_customer_class = 1",
        f"{C} WHERE i_customer = 1 AND i_customer_class = $2",
        f"{C} WHERE i_customer = $900000",
        f"{C} WHERE i_customer = 1 AND i_customer_class = $900000",
        f"{C} WHERE i_customer = 1 AND i_customer_class = $900001",
        f"{C} WHERE i_customer = 1 AND i_customer_class = $999999",
        f"{C} WHERE i_customer = 1 AND i_customer_class = $1000000",
        f"{C} WHERE i_customer = 1 LIMIT $1",
        f"{C} WHERE i_customer = 1 AND name = '$1'",
        f"{C} WHERE i_customer = 1 AND name = $a$ $1 $a$",
        f'{C} WHERE i_customer = 1 AND "$1" = 2',
        f"{C} WHERE i_customer = 1 /* $1 */",
        JOIN.format(1),
    ],
    "operators and types around a parameter": [
        f"{C} WHERE i_customer_class = 1 ORDER BY i_customer",
        f"{C} WHERE balance > 100 ORDER BY i_customer",
        f"{C} WHERE balance = 0 ORDER BY i_customer",
        f"{C} WHERE balance::float8 > 1 ORDER BY i_customer",
        f"{C} WHERE name = 1",
        f"{C} WHERE email > 1",
        f"{C} WHERE extra = 1",
        f"{C} WHERE i_customer IN (1, 2.5) ORDER BY i_customer",
        f"{C} WHERE i_customer IN (1, '2') ORDER BY i_customer",
        f"{C} WHERE i_customer IN (1, NULL) ORDER BY i_customer",
        f"{C} WHERE i_customer NOT IN (1, NULL) ORDER BY i_customer",
        f"{C} WHERE i_customer IN (1) ORDER BY i_customer",
        f"{C} WHERE i_customer IN (i_customer_class, 2) ORDER BY i_customer",
        f"{C} WHERE i_customer BETWEEN SYMMETRIC 2 AND 1 ORDER BY i_customer",
        f"{C} WHERE i_customer NOT BETWEEN SYMMETRIC 2 AND 1 ORDER BY i_customer",
        f"{C} WHERE i_customer NOT BETWEEN 2 AND 1 ORDER BY i_customer",
        f"{C} WHERE (i_customer, i_customer_class) = (1, 1)",
        f"{C} WHERE ROW(i_customer, 2) > ROW(1, 1) ORDER BY i_customer",
        f"{C} WHERE i_customer = ANY (ARRAY[1, 2]) ORDER BY i_customer",
        f"{C} WHERE i_customer <> ALL (ARRAY[1]) ORDER BY i_customer",
        f"{C} WHERE CASE WHEN i_customer = 1 THEN true ELSE i_customer = 2 END ORDER BY i_customer",
        f"{C} WHERE COALESCE(i_customer_class, 5) = 1 AND i_customer = 1",
        f"{C} WHERE i_customer = COALESCE(NULL, 2)",
        f"{C} WHERE NULLIF(i_customer, 1) = 2",
        f"{C} WHERE i_customer IS DISTINCT FROM 1 ORDER BY i_customer",
        f"{C} WHERE i_customer = 1 IS TRUE",
        f"{C} WHERE (i_customer = 1) = (i_customer_class = 1) ORDER BY i_customer",
        f"{C} WHERE i_customer OPERATOR(pg_catalog.=) 1",
        f'{C} WHERE i_customer = 1 COLLATE "C"',
        f"{C} WHERE i_customer != 1 ORDER BY i_customer",
        f"{C} WHERE i_customer = i_customer_class - 1073741823 + 1073741824",
        f"{C} WHERE i_customer = i_customer_class + 2147483647",
        f"{C} WHERE i_customer_class = i_customer_class + 2147483647",
        f"{C} WHERE i_customer_class = 2147483647 + i_customer_class",
        f"{C} WHERE i_customer_class + 2147483647 = 5",
        f"{C} WHERE i_customer = 1073741824 + 1073741824",
        f"{C} WHERE i_customer = 1073741823 + 1073741823",
        f"{C} WHERE i_customer = 5 - 2147483647 - 5",
        f"{C} WHERE i_customer_class = 2 * 1073741824",
        f"{C} WHERE i_customer = 2147483647 AND i_customer_class / 0 = 1",
        f"{C} WHERE i_customer = 1 AND 1 / (1 - 1) = 0",
        "SELECT c.i_customer, c.name FROM billing.customer_contacts c WHERE c.i_customer = 1",
    ],
    "places a parameter might stand": [
        f"{C} ORDER BY i_customer FETCH FIRST 1 ROWS ONLY",
        f"{C} ORDER BY i_customer OFFSET 1 ROWS FETCH NEXT 1 ROW ONLY",
        f"{C} ORDER BY i_customer_class FETCH FIRST 1 ROWS WITH TIES",
        f"{C} ORDER BY i_customer LIMIT ALL OFFSET 1",
        f"{C} ORDER BY i_customer LIMIT NULL",
        f"{C} ORDER BY i_customer LIMIT 2147483647 OFFSET 2147483647",
        f"{C} ORDER BY i_customer LIMIT 1 + 1",
        f"{C} ORDER BY i_customer LIMIT -1",
        f"{C} ORDER BY i_customer OFFSET -1",
        "SELECT s.* FROM (SELECT i_customer, name FROM billing.customers ORDER BY 1 LIMIT 1) s",
        "SELECT c.name, g FROM billing.customers c, generate_series(1, 3) g "
        "WHERE g = 2 AND c.i_customer = 1",
        "SELECT c.name, g FROM billing.customers c, LATERAL generate_series(1, c.i_customer_class) g "
        "WHERE g <= 2 AND c.i_customer = 1 ORDER BY g",
        "SELECT c.name FROM billing.customers c WHERE c.i_customer IN (SELECT generate_series(1, 2)) "
        "ORDER BY c.i_customer",
        "SELECT c.name, (SELECT count(*) FROM billing.accounts a WHERE a.i_customer = 1) "
        "FROM billing.customers c WHERE c.i_customer = 1",
        "SELECT s.name, s.n FROM (SELECT name, count(*) OVER (ORDER BY i_customer ROWS BETWEEN "
        "1 PRECEDING AND 1 FOLLOWING) n FROM billing.customers WHERE i_customer < 10) s "
        "WHERE s.n > 1",
        "SELECT s.* FROM (SELECT DISTINCT ON (i_customer_class) i_customer_class, name "
        "FROM billing.customers WHERE i_customer < 10 ORDER BY i_customer_class, i_customer) s",
        "SELECT s.* FROM (SELECT i_customer_class, count(*) FROM billing.customers "
        "WHERE i_customer < 10 GROUP BY 1 HAVING count(*) >= 1) s ORDER BY 1",
        "WITH RECURSIVE r(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM r WHERE n < 3) "
        "SELECT c.name, r.n FROM billing.customers c, r WHERE c.i_customer = 1 ORDER BY r.n",
        "SELECT name FROM billing.customers WHERE i_customer = 1 UNION "
        "SELECT name FROM billing.customers WHERE i_customer = 1",
        "SELECT name FROM billing.customers WHERE i_customer = 1 INTERSECT "
        "SELECT name FROM billing.customers WHERE i_customer < 3",
        "SELECT c.name FROM billing.customers c JOIN billing.accounts a "
        "ON a.i_customer = c.i_customer AND a.i_account = 10",
        "SELECT c.name, x.k FROM billing.customers c, (VALUES (1), (2)) x(k) "
        "WHERE x.k = 2 AND c.i_customer = 1",
        "SELECT c.name FROM billing.customers c WHERE c.i_customer = 1 FOR UPDATE OF c",
        "SELECT i_customer, name FROM billing.customers WHERE i_customer = 1 GROUP BY i_customer",
        "SELECT i_customer > 1, count(*) FROM billing.customers WHERE i_customer < 10 "
        "GROUP BY i_customer > 1 ORDER BY 1",
        "SELECT count(*) FILTER (WHERE i_customer = 1) FROM billing.customers "
        "WHERE i_customer < 10",
    ],
    "statements between executions": [
        JOIN.format(1),
        "SELECT 1; DISCARD ALL",
        JOIN.format(1),
        "DEALLOCATE ALL; " + JOIN.format(2),
        JOIN.format(2),
        "DEALLOCATE PREPARE ALL",
        JOIN.format(3),
        "BEGIN",
        "SAVEPOINT s",
        JOIN.format(1),
        "ROLLBACK TO SAVEPOINT s",
        JOIN.format(2),
        "RELEASE s",
        "COMMIT",
        "BEGIN",
        JOIN.format(4),
        "ROLLBACK",
        JOIN.format(4),
        "BEGIN",
        "SELECT 1 / 0",
        JOIN.format(1),
        "ROLLBACK",
        JOIN.format(1),
        "DISCARD PLANS",
        "DISCARD TEMP",
        "DISCARD SEQUENCES",
        JOIN.format(2),
        "RESET SESSION AUTHORIZATION",
        JOIN.format(2),
        "SET ROLE NONE",
        JOIN.format(3),
        "COMMIT AND CHAIN",
        JOIN.format(3),
        "BEGIN",
        "COMMIT AND CHAIN",
        JOIN.format(3),
        "ROLLBACK",
        "PREPARE mine(int) AS SELECT name FROM billing.customers WHERE i_customer = $1",
        "EXECUTE mine(1)",
        JOIN.format(1),
        "DEALLOCATE mine",
        JOIN.format(1),
    ],
    "pipelined with errors in the middle": [
        [JOIN.format(1), "SELECT 1 / 0", JOIN.format(1), JOIN.format(2)],
        [JOIN.format(3), "BEGIN", JOIN.format(3), "SELECT 1 / 0", JOIN.format(3), "ROLLBACK"],
        [UNIT, JOIN.format(1), UNIT],
        [f"{C} WHERE i_customer = 'x'", f"{C} WHERE i_customer = 'x'", JOIN.format(4)],
        ["DEALLOCATE ALL", JOIN.format(1), "DISCARD ALL", JOIN.format(1), JOIN.format(2)],
    ],
    # more shapes than a connection keeps, pipelined: statements closed while in flight
    "least recently used closed while in flight": [
        [f"{C} WHERE i_customer = 1 AND i_customer <> {10**20 + i}" for i in range(70)],
        [f"{C} WHERE i_customer = 2 AND i_customer <> {10**20 + i}" for i in range(70)],
        [f"{C} WHERE i_customer = 1 AND i_customer <> {10**20 + (i * 7) % 70}" for i in range(70)],
    ],
    # an error's position is moved from the prepared text back to the client's, past
    # parameters whose literals are longer or shorter than `$k`, in characters
    "error positions past parameters": [
        f"{C} WHERE i_customer = 0000000001 AND nosuch = 1",
        f"{C} WHERE i_customer IN (1, 22, 333, 4444, 55555) AND nosuch = 1",
        f"{C} WHERE i_customer = 1+1 AND i_customer_class = 100000000+2 AND nosuch = 1",
        'SELECT name AS "\u00fc\u00df\u4e2d", email FROM billing.customers '
        'WHERE i_customer = 1 AND "\u00fc\u00df" = 1',
        "SELECT name\n  FROM billing.customers\n WHERE i_customer =\n 1\n   AND nosuch\n = 2",
        f"{C} WHERE i_customer BETWEEN 1 AND 2 LIMIT 3 OFFSET 'x'",
        f"{C} WHERE i_customer = 1 AND name = 'Zebulon Quixotehart' AND nosuch = 1",
        f"{C} WHERE i_customer = 1 AND name::int = 1",
        f"{C} WHERE i_customer = 1 AND email::int > 0",
        f"{C} WHERE i_customer = 1 AND to_date(name, 'YYYY') IS NULL",
        f"{C} WHERE i_customer = 1 AND 1 = (SELECT 1 UNION SELECT 2)",
    ],
    # server log messages for the client (their text names pgveil's statements and echoes
    # its prepared text) are withheld either way
    "debug and log messages": [
        "SET client_min_messages = debug5",
        "SET debug_print_parse = on",
        JOIN.format(1),
        JOIN.format(2),
        "RESET debug_print_parse",
        "SET log_parser_stats = on",
        JOIN.format(1),
        "RESET ALL",
        JOIN.format(1),
    ],
    # the client's extended-protocol messages after a prepared execution: the unnamed
    # portal is gone after a Query either way, in and outside a transaction block (each
    # case's first extended-protocol message: from then on its Queries go as text)
    "the unnamed portal after a prepared execution": [
        JOIN.format(1),
        (_message(m.DESCRIBE, b"P\0") + _message(m.EXECUTE, b"\0\0\0\0\0") + SYNC, 1),
        JOIN.format(1),
    ],
    "the unnamed portal after a prepared execution in a block": [
        "BEGIN",
        JOIN.format(2),
        (_message(m.DESCRIBE, b"P\0") + _message(m.EXECUTE, b"\0\0\0\0\0") + SYNC, 1),
        "ROLLBACK",
        JOIN.format(2),
    ],
    "the unnamed portal after a prepared execution in a chained block": [
        "BEGIN",
        "COMMIT AND CHAIN",
        JOIN.format(3),
        (_message(m.EXECUTE, b"\0\0\0\0\0") + SYNC, 1),
        "ROLLBACK",
    ],
    "the unnamed portal after a failed prepared execution and ROLLBACK TO SAVEPOINT": [
        "BEGIN",
        "SAVEPOINT s",
        UNIT,
        "ROLLBACK TO SAVEPOINT s",
        JOIN.format(1),
        (_message(m.DESCRIBE, b"P\0") + _message(m.EXECUTE, b"\0\0\0\0\0") + SYNC, 1),
        "ROLLBACK",
    ],
    # COPY data and its end, pipelined with Queries: prepared executions only once no COPY
    # can be reading the client's messages; a Query inside a COPY ends the session (the
    # server's protocol error), the same either way
    "Queries around a COPY FROM STDIN": [
        "CREATE TEMP TABLE t_copy (a int)",
        (_query("COPY t_copy FROM STDIN") + _copy_data(b"2\n") + m.message(m.COPY_DONE), 1),
        JOIN.format(2),
        (
            _query("COPY t_copy FROM STDIN")
            + _copy_data(b"3\n")
            + m.message(m.COPY_DONE)
            + _query(JOIN.format(1))
            + _query("COPY t_copy FROM STDIN; " + JOIN.format(1))
            + m.message(m.COPY_FAIL, b"no\0")
            + _query(JOIN.format(2)),
            4,
        ),
        (_query("SELECT 1 / 0; COPY t_copy FROM STDIN") + _query(JOIN.format(3)), 2),
        JOIN.format(3),
        "SELECT string_agg(a::text, ',' ORDER BY a) FROM t_copy",
        (_query("COPY t_copy FROM STDIN") + _copy_data(b"1\n") + _query(JOIN.format(1)), 1),
    ],
}


Messages = list[tuple[str, bytes]]


def _session(port: int, case: list[Step]) -> Messages:
    """Every message the client gets after login, for the steps of `case`."""
    client = RawClient(port, user=MASKED)
    out: Messages = []
    try:
        for step in case:
            if isinstance(step, tuple):
                data, ready = step
                client.send_raw(data)
            else:
                batch = step if isinstance(step, list) else [step]
                client.send_raw(b"".join(_query(q) for q in batch))
                ready = len(batch)
            for _ in range(ready):
                try:
                    out += client.until_ready()
                except ConnectionError:
                    out.append(("closed", b""))
                    return out
    finally:
        client.close()
    return out


@pytest.mark.parametrize("case", list(CASES))
def test_same_messages_prepared_or_not(
    billing: ProxyProcess, text_proxy: ProxyProcess, case: str
) -> None:
    executions = billing.metric("pgveil_masked_prepared_total", step="execution")
    prepared = _session(billing.port, CASES[case])
    text = _session(text_proxy.port, CASES[case])
    assert _readable(prepared) == _readable(text)
    assert prepared == text  # byte for byte
    # (the prepared executions did happen: the case tests them)
    assert billing.metric("pgveil_masked_prepared_total", step="execution") > executions


# ---- pgveil's statements, named by the client -----------------------------------------
# Their names can be learnt (pg_prepared_statements lists them for the masked role): no
# statement of the client may use, drop, replace or run one, whatever the spelling.

RESERVED = ("42501", "pgveil: statement names beginning with pgveil_prep_ are pgveil's")
NAMED: list[str] = [
    "DEALLOCATE {n}",
    "DEALLOCATE PREPARE {n}",
    "DEALLOCATE {N}",
    'DEALLOCATE "{n}"',
    "deallocate\t/* c */ {n}",
    "EXECUTE {n}(1)",
    "EXECUTE {N}(1)",
    "CREATE TEMP TABLE stolen AS EXECUTE {n}(1)",
    "PREPARE {n}_9 AS SELECT name FROM billing.customers WHERE i_customer = $1",
    "PREPARE {next} AS SELECT name FROM billing.customers WHERE i_customer = $1",
    'PREPARE "{next}" (int) AS SELECT 1',
    "SELECT 1; DEALLOCATE {n}",
    "DEALLOCATE {n}; SELECT 1",
    "BEGIN; DEALLOCATE {n}; COMMIT",
]
# refused for what they are, whatever they name (DO, a function's body: SQL pgveil does
# not see)
HIDDEN: list[str] = [
    "EXPLAIN EXECUTE {n}(1)",
    "EXPLAIN (ANALYZE, COSTS OFF) EXECUTE {n}(1)",
    "EXPLAIN ANALYZE CREATE TEMP TABLE stolen AS EXECUTE {n}(1)",
    "DO $$BEGIN EXECUTE 'DEALLOCATE {n}'; END$$",
    "CREATE FUNCTION public.drop_it() RETURNS void LANGUAGE plpgsql AS "
    "$$BEGIN EXECUTE 'DEALLOCATE {n}'; END$$",
    "CREATE PROCEDURE public.drop_it() LANGUAGE sql AS $$DEALLOCATE {n}$$",
]


def _errors(answer: Messages) -> list[tuple[str, str]]:
    return [(f["C"], f["M"]) for f in (decode_fields(b) for t, b in answer if t == "E")]


def _rows(answer: Messages) -> list[bytes]:
    return [b for t, b in answer if t == "D"]


@pytest.mark.parametrize("template", NAMED + HIDDEN)
def test_learnt_names_cannot_be_used_by_statements(billing: ProxyProcess, template: str) -> None:
    client = RawClient(billing.port, user=MASKED)
    try:
        expected = _rows(client.query(JOIN.format(1)))
        ((name, _, count),) = _prepared_statements(client)
        assert count == "1"
        serial = int(name.rsplit("_", 1)[1])
        following = f"{name.rsplit('_', 1)[0]}_{serial + 1}"
        sql = template.format(n=name, N=name.upper(), next=following)
        errors = _errors(client.query(sql))
        assert len(errors) == 1 and errors[0][0] == "42501", errors
        assert errors[0][1].startswith("pgveil: ")
        if template in NAMED:
            assert errors[0] == RESERVED
        assert client.query("ROLLBACK")[-1] == ("Z", b"I")
        # the statement is still pgveil's and still what it was: used, and a new shape gets
        # the following name, prepared by pgveil
        assert _rows(client.query(JOIN.format(1))) == expected
        client.query(f"{C} WHERE i_customer = 1")
        statements = dict((n, c) for n, _, c in _prepared_statements(client))
        assert statements == {name: "2", following: "1"}
    finally:
        client.close()


def test_learnt_names_cannot_be_bound_or_described(billing: ProxyProcess) -> None:
    """Over the extended protocol: Bind and Describe of pgveil's statement are refused;
    a name that differs in case is another statement (the server's error); from the first
    extended-protocol message on the session's Queries go as text."""
    client = RawClient(billing.port, user=MASKED)
    try:
        expected = client.query(JOIN.format(1))
        ((name, _, _),) = _prepared_statements(client)
        n = name.encode()
        executions = billing.metric("pgveil_masked_prepared_total", step="execution")
        for messages, want in (
            (
                _message(m.BIND, b"\0" + n + b"\0\0\0\0\1\0\0\0\x011\0\0")
                + _message(m.EXECUTE, b"\0\0\0\0\0")
                + _message(m.SYNC, b""),
                "42501",
            ),
            (_message(m.DESCRIBE, b"S" + n + b"\0") + _message(m.SYNC, b""), "42501"),
            # a statement of the client's whose text names pgveil's
            (
                _message(m.PARSE, b"\0EXECUTE " + n + b"(1)\0\0\0")
                + _message(m.BIND, b"\0\0\0\0\0\0\0\0")
                + _message(m.EXECUTE, b"\0\0\0\0\0")
                + _message(m.SYNC, b""),
                "42501",
            ),
            (
                _message(m.PARSE, b"mine\0DEALLOCATE " + n + b"\0\0\0") + _message(m.SYNC, b""),
                "42501",
            ),
            (_message(m.DESCRIBE, b"S" + n.upper() + b"\0") + _message(m.SYNC, b""), "26000"),
            (
                _message(m.BIND, b"portal\0" + n + b"\0\0\0\0\1\0\0\0\x011\0\0")
                + _message(m.SYNC, b""),
                "42501",
            ),
        ):
            client.send_raw(messages)
            answer = client.until_ready()
            assert [code for code, _ in _errors(answer)] == [want], answer
            assert not _rows(answer)
        # a Close of it is answered as a Close of any name the client does not hold
        # (CloseComplete): pgveil's statement stays (the unnamed statement may run it)
        client.send_raw(_message(m.CLOSE, b"S" + n + b"\0") + _message(m.SYNC, b""))
        assert [t for t, _ in client.until_ready()] == ["3", "Z"]
        assert client.query(JOIN.format(1)) == expected
        assert [row[0] for row in _prepared_statements(client)] == [name]
        assert billing.metric("pgveil_masked_prepared_total", step="execution") == executions
    finally:
        client.close()


def test_a_statement_prepared_by_the_client_first_is_not_taken_for_pgveils(
    billing: ProxyProcess,
) -> None:
    """The client's own statements (any name it may use) and pgveil's live side by side:
    DEALLOCATE of the client's, PREPARE of one, EXECUTE of one, change nothing of
    pgveil's, and ALL forgets pgveil's too (prepared again under a new name)."""
    client = RawClient(billing.port, user=MASKED)
    try:
        expected = _rows(client.query(JOIN.format(2)))
        ((name, _, _),) = _prepared_statements(client)
        client.query(
            "PREPARE pgveil_pre AS SELECT c.i_customer, c.name FROM billing.customers c "
            "WHERE c.i_customer = 1"
        )
        assert _errors(client.query("EXECUTE pgveil_pre")) == []
        assert _errors(client.query("DEALLOCATE pgveil_pre")) == []
        assert _rows(client.query(JOIN.format(2))) == expected
        assert [n for n, _, _ in _prepared_statements(client)] == [name]
        assert _errors(client.query("DEALLOCATE ALL")) == []
        assert _rows(client.query(JOIN.format(2))) == expected
        ((again, _, count),) = _prepared_statements(client)
        assert again != name and count == "1"
    finally:
        client.close()


def test_pgveils_prepared_text_is_not_readable_from_the_server(
    pg: EmbeddedPostgres, billing: ProxyProcess
) -> None:
    """A prepared statement's text outlives its execution on the server (a text Query's
    does not): pg_prepared_statements and the server's memory contexts (a cached plan's
    `ident` is its text) would show pgveil's rewritten text, its masks' expressions and
    keys. Withheld from a masked role that may read them (helpdesk: pg_read_all_stats)."""
    with psycopg.connect(pg.dsn(), autocommit=True) as conn:
        allowed = conn.execute(
            "SELECT has_table_privilege(%s, 'pg_backend_memory_contexts', 'SELECT'), "
            "has_function_privilege(%s, 'pg_get_backend_memory_contexts()', 'EXECUTE')",
            (HELPDESK, HELPDESK),
        ).fetchone()
    assert allowed == (True, True)
    with psycopg.connect(dsn(pg, billing.port, HELPDESK, HELPDESK_PW), autocommit=True) as conn:
        cur = psycopg.ClientCursor(conn)
        cur.execute(JOIN.format(1))
        cur.fetchall()
        for sql in (
            "SELECT name, ident FROM pg_backend_memory_contexts WHERE name LIKE 'CachedPlan%'",
            "SELECT name, ident FROM pg_get_backend_memory_contexts() "
            "WHERE name LIKE 'CachedPlan%'",
        ):
            cur.execute(sql)
            found = cur.fetchall()
            assert ("CachedPlanSource", None) in found
            assert all(ident is None for _, ident in found)
        cur.execute("SELECT name, statement FROM pg_prepared_statements")
        ((name, statement),) = cur.fetchall()
        assert name.startswith("pgveil_prep_") and statement is None


# ---- the audit ------------------------------------------------------------------------

# what differs between two sessions, whatever they run; and `running`: whether rows went
# to the client before the statement's end was read depends on where the reads split the
# answer (an error after rows: the server sends the error at once, its ReadyForQuery only
# once it read the Sync of a prepared execution; a Query's come together)
_SESSION_FIELDS = frozenset(
    ("ts", "time", "duration_ms", "session", "session_id", "seq", "pid", "backend_pid",
     "client", "client_addr", "client_port", "prev", "hash", "chain", "instance", "id",
     "running")
)  # fmt: skip


def _audited(pg: EmbeddedPostgres, tmp: Path, setting: str, run: object) -> list[dict[str, object]]:
    """The access and refusal events of one audited masked session, `run(port)`."""
    d = tmp / setting
    d.mkdir()
    with audited_proxy(pg, d, "--masked-prepare", setting) as (proxy, path):
        run(proxy.port)  # type: ignore[operator]
        wait_for(
            lambda: any(e["type"] == "session.end" for e in all_events(path)),
            "the session's end",
        )
        return [
            {k: v for k, v in e.items() if k not in _SESSION_FIELDS}
            for e in all_events(path)
            if e["type"] in ("access", "refused") and e.get("outcome") != "running"
        ]


def test_audit_events_are_the_same_for_the_attack_cases(
    pg: EmbeddedPostgres, billing: ProxyProcess, tmp_path: Path
) -> None:
    corpus: list[Step] = [
        step
        for case in (
            "a statement's own 0A000 is not an outdated statement",
            "literal spellings",
            "operators and types around a parameter",
            "statements between executions",
        )
        for step in CASES[case]
        if isinstance(step, str)  # (not pipelined: see test_masked_prepared)
    ]
    prepared, text = (
        _audited(pg, tmp_path, setting, lambda port: _session(port, corpus))
        for setting in ("true", "false")
    )
    assert len(prepared) > 80
    assert prepared == text
    # the statement's own 0A000: one event, failed, with the rows it sent
    unit = [e for e in prepared if "date_part" in str(e.get("statement"))]
    assert unit and all(e.get("outcome") != "ok" for e in unit), unit


def test_audit_of_an_outdated_statement_sent_again(
    pg: EmbeddedPostgres, billing: ProxyProcess, tmp_path: Path
) -> None:
    """Another session's ALTER outdates pgveil's statement between two executions: the
    Query goes again as text, invisibly; its events are the text's (one per Query, its
    rows, its outcome), in and outside a transaction block."""
    q = JOIN.format(1)

    def run(port: int) -> None:
        client = RawClient(port, user=MASKED)
        try:
            client.query(q)
            pg.psql("ALTER TABLE billing.accounts ALTER COLUMN id TYPE varchar(40)")
            client.query(q)  # (prepared: outdated, sent again as text)
            client.query(q)  # (prepared anew)
            client.query("BEGIN")
            pg.psql("ALTER TABLE billing.accounts ALTER COLUMN id TYPE text")
            client.query(q)
            client.query("ROLLBACK")
            client.query(q)
        finally:
            pg.psql("ALTER TABLE billing.accounts ALTER COLUMN id TYPE text")
            client.close()

    prepared, text = (_audited(pg, tmp_path, s, run) for s in ("true", "false"))
    outcomes = [e.get("outcome") for e in prepared if e["type"] == "access"]
    assert len(outcomes) == 5, prepared
    # (the text gets no 0A000 in the block: the one difference, the server's own error)
    differs = [i for i, (a, b) in enumerate(zip(prepared, text, strict=True)) if a != b]
    assert differs == [3], (prepared, text)
    assert prepared[3].get("outcome") != "ok" and text[3].get("outcome") == "ok"
    assert prepared[3].get("rows") in (None, 0)
