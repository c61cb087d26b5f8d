"""White-box attacks on the statement log's names (proxy/session/statements.py): an
insider who has read the code tries to make a statement, portal or cursor name
mean one thing to pgveil and another to the server, so that what the server runs is
recorded on the wrong table, or not at all.

Every case runs against the real server through an audited pgveil, as an unmasked role
(superuser `trust_user`), with raw protocol messages. The server's answers show what ran
(a customer's name in the rows); the session's access events must say so, or say that what
ran cannot be told (`analysis_complete: false`, which `audit who` lists as `possibly`).
A marker read of customer 2 ends each case: the events before it are all the case made.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from typing import Any

import pytest

from proxy.wire import messages as m
from tests.conftest import TRUST_USER
from tests.integration.masking_fixture import NAME
from tests.integration.test_audit_events import Audited, audited  # noqa: F401
from tests.integration.test_error_scrub import SYNC, bind, parse
from tests.support import RawClient, errors_in

CUSTOMERS = "billing.customers"
READ_1 = "SELECT i_customer, name FROM billing.customers WHERE i_customer = 1"
HARMLESS = "SELECT 1 AS one"
MARKER = "SELECT i_customer FROM billing.customers WHERE i_customer = 2"

Messages = list[tuple[str, bytes]]


def query(sql: str) -> bytes:
    return m.message(m.QUERY, sql.encode() + b"\0")


def execute(portal: str = "", max_rows: int = 0) -> bytes:
    return m.message(m.EXECUTE, portal.encode() + b"\0" + struct.pack("!i", max_rows))


def close(kind: str, name: str) -> bytes:
    return m.message(m.CLOSE, kind.encode() + name.encode() + b"\0")


def describe(kind: str, name: str) -> bytes:
    return m.message(m.DESCRIBE, kind.encode() + name.encode() + b"\0")


def codes(got: Messages) -> list[str]:
    return [e["C"] for e in errors_in(got)]


def read_name(got: Messages) -> bool:
    return any(typ == "D" and NAME.encode() in body for typ, body in got)


def rows(got: Messages) -> int:
    return sum(1 for typ, _ in got if typ == "D")


class Attacker:
    """One unmasked session through the audited pgveil."""

    def __init__(self, audited: Audited) -> None:  # noqa: F811
        self.audited = audited
        audited.new_events()  # earlier tests' events
        self.c = RawClient(audited.proxy.port, TRUST_USER)

    def q(self, sql: str) -> Messages:
        return self.c.query(sql)

    def batch(self, *messages: bytes) -> Messages:
        """Messages sent in one write; the answers up to each request's ReadyForQuery."""
        self.c.send_raw(b"".join(messages))
        got: Messages = []
        for _ in range(sum(1 for x in messages if x[0] in (m.SYNC, m.QUERY))):
            got += self.c.until_ready()
        return got

    def events(self) -> list[dict[str, Any]]:
        """The session's access events up to the marker (which is not among them)."""
        assert codes(self.q(MARKER)) == []
        found: list[dict[str, Any]] = []
        while not any(e["statement"].startswith("SELECT i_customer FROM") for e in found):
            found += [e for e in self.audited.new_events(TRUST_USER, 1) if e["type"] == "access"]
        return found[:-1]

    def close(self) -> None:
        self.c.close()


@pytest.fixture
def attacker(audited: Audited) -> Iterator[Attacker]:  # noqa: F811
    a = Attacker(audited)
    try:
        yield a
    finally:
        a.close()


def read_of_customers(events: list[dict[str, Any]]) -> bool:
    """Some event says customer 1's row was read (or may have been: its subjects are not
    complete), or that what ran cannot be told: `audit who` lists it for customer 1."""
    return any(
        (
            CUSTOMERS in e["tables"]
            and e["outcome"] == "ok"
            and (
                "1" in (e.get("subjects") or {}).get(CUSTOMERS, [])
                or e["subjects_complete"] is False
            )
        )
        or (e.get("analysis_complete") is False and e["tables"] == [])
        for e in events
    )


# ---- NAMEDATALEN: the server keeps the first 63 bytes of a protocol name ----------------------

LONG = "n" * 63  # NAMEDATALEN - 1: what the server keeps of a longer name


def test_long_statement_names_are_the_same_name_to_the_server(attacker: Attacker) -> None:
    """Parse, Close and Bind name a prepared statement by up to 63 bytes: the server's hash
    of prepared statements compares no more. `LONG+"1"` and `LONG+"2"` are one statement
    to it; if pgveil kept them apart, a Bind of `LONG+"1"` would run what `LONG+"3"`
    prepared while pgveil records `LONG+"1"`'s harmless text."""
    got = attacker.batch(
        parse(HARMLESS, name=LONG + "1"),
        close("S", LONG + "2"),  # closes LONG+"1" on the server
        parse(READ_1, name=LONG + "3"),  # free again: it takes the name
        SYNC,
    )
    assert codes(got) == []
    got = attacker.batch(bind(stmt=LONG + "1"), execute(), SYNC)
    assert codes(got) == [] and read_name(got)  # the server ran READ_1
    assert read_of_customers(attacker.events())


def test_long_portal_names_are_the_same_name_to_the_server(attacker: Attacker) -> None:
    """The same for portals (the portal hash keeps 63 bytes too)."""
    attacker.q("BEGIN")
    got = attacker.batch(
        parse(HARMLESS, name="wb_harmless"),
        parse(READ_1, name="wb_read"),
        bind(stmt="wb_harmless", portal=LONG + "1"),
        close("P", LONG + "2"),
        bind(stmt="wb_read", portal=LONG + "3"),
        SYNC,
    )
    assert codes(got) == []
    got = attacker.batch(execute(LONG + "1"), SYNC)
    assert codes(got) == [] and read_name(got)
    attacker.q("COMMIT")
    assert read_of_customers(attacker.events())


# ---- a portal of FETCH or EXECUTE holds its rows from its first Execute -----------------------


def test_a_suspended_fetch_portal_reads_the_cursor_it_first_ran(attacker: Attacker) -> None:
    """A portal of `FETCH ALL c` runs the FETCH at its first Execute and keeps the rows;
    later Executes only hand them out. If pgveil resolved `c` again at each Execute, a
    cursor `c` closed and declared anew over nothing protected would make the rest of the
    customers' rows go out with no event."""
    attacker.q(
        "BEGIN; DECLARE wb_c CURSOR FOR SELECT i_customer, name FROM billing.customers "
        "ORDER BY i_customer DESC"
    )
    got = attacker.batch(parse("FETCH ALL wb_c", name="wb_f"), bind(stmt="wb_f", portal="wb_fp"),
                         execute("wb_fp", 1), SYNC)  # fmt: skip
    assert codes(got) == [] and rows(got) == 1 and not read_name(got)  # customer 2 first
    first = attacker.events()
    attacker.q(f"CLOSE wb_c; DECLARE wb_c CURSOR FOR {HARMLESS}")
    got = attacker.batch(execute("wb_fp"), SYNC)
    assert codes(got) == [] and read_name(got)  # the old cursor's rows
    attacker.q("COMMIT")
    later = attacker.events()
    assert first and read_of_customers(later), later


def test_a_suspended_execute_portal_reads_the_statement_it_first_ran(
    attacker: Attacker,
) -> None:
    """The same with `EXECUTE p` in a portal, and `p` prepared anew in between."""
    attacker.q(
        "PREPARE wb_p AS SELECT i_customer, name FROM billing.customers ORDER BY i_customer DESC"
    )
    attacker.q("BEGIN")
    got = attacker.batch(parse("EXECUTE wb_p", name="wb_e"), bind(stmt="wb_e", portal="wb_ep"),
                         execute("wb_ep", 1), SYNC)  # fmt: skip
    assert codes(got) == [] and rows(got) == 1 and not read_name(got)
    attacker.events()
    attacker.q(f"DEALLOCATE wb_p; PREPARE wb_p AS {HARMLESS}")
    got = attacker.batch(execute("wb_ep"), SYNC)
    assert codes(got) == [] and read_name(got)
    attacker.q("COMMIT; DEALLOCATE wb_p")
    later = attacker.events()
    assert read_of_customers(later), later


def test_names_are_compared_in_the_servers_encoding(audited: Audited) -> None:  # noqa: F811
    """The server converts a protocol name from the client encoding before it keeps its
    first 63 bytes: 32 LATIN1 `é` and a digit are 65 bytes in UTF-8, so the names that
    differ only in that digit are one name to it, though each is 33 bytes as sent."""
    audited.new_events()
    a = Attacker(audited)
    a.c.close()
    a.c = RawClient(audited.proxy.port, TRUST_USER, client_encoding="LATIN1")
    try:
        stem = b"\xe9" * 32

        def named_parse(sql: str, name: bytes) -> bytes:
            return m.message(m.PARSE, name + b"\0" + sql.encode() + b"\0\0\0")

        got = a.batch(
            named_parse(HARMLESS, stem + b"1"),
            m.message(m.CLOSE, b"S" + stem + b"2\0"),
            named_parse(READ_1, stem + b"3"),
            SYNC,
        )
        assert codes(got) == []
        body = b"\0" + stem + b"1\0" + struct.pack("!hhh", 0, 0, 0)
        got = a.batch(m.message(m.BIND, body), execute(), SYNC)
        assert codes(got) == [] and read_name(got)
        assert read_of_customers(a.events())
    finally:
        a.close()


# ---- a message sent during COPY FROM STDIN ---------------------------------------------------


def test_a_query_sent_during_copy_in_ends_the_session(attacker: Attacker) -> None:
    """During COPY FROM STDIN the server reads the client's messages as copy data. A Query
    there would be consumed without an answer, and every answer after it would pair with
    the statement before; the server does not go on, though: it ends the connection (it
    lost track of the protocol), so nothing can be paired wrongly."""
    a = attacker
    assert codes(a.q("CREATE TEMP TABLE wb_copy (x int)")) == []
    a.c.send_raw(query("COPY wb_copy FROM STDIN"))
    got: Messages = []
    while not got or got[-1][0] != "G":
        got.append(a.c.recv_message())
    got = a.batch(query(READ_1))
    assert [(e["S"], e["C"]) for e in errors_in(got)] == [("ERROR", "08P01"), ("FATAL", "08P01")]
    assert not read_name(got) and a.c.closed_by_peer()


# ---- transactions and names: cases that hold --------------------------------------------------


def certain(events: list[dict[str, Any]], subject: str = "1") -> bool:
    """Some event says for sure that the customer's row was read."""
    return any(
        e["tables"] == [CUSTOMERS]
        and (e.get("subjects") or {}).get(CUSTOMERS) == [subject]
        and e.get("analysis_complete") is not False
        for e in events
    )


def test_a_prepare_outlives_the_failure_of_its_query(attacker: Attacker) -> None:
    """Prepared statements are not transactional: a PREPARE in a Query that fails later
    stays, a DEALLOCATE in one stays done."""
    a = attacker
    assert codes(a.q(f"PREPARE wb_kept AS {READ_1}; SELECT 1/0")) == ["22012"]
    assert read_name(a.q("EXECUTE wb_kept"))
    assert codes(a.q("DEALLOCATE wb_kept; SELECT 1/0")) == ["22012"]
    assert codes(a.q(f"PREPARE wb_kept AS {HARMLESS}")) == []  # the name is free
    assert not read_name(a.q("EXECUTE wb_kept"))
    a.q("DEALLOCATE wb_kept")
    events = a.events()
    assert certain(events) and all(e.get("analysis_complete") is not False for e in events)


def test_a_with_hold_cursor_is_not_kept_when_its_commit_fails(attacker: Attacker) -> None:
    """A deferred constraint fails at COMMIT: the transaction rolls back, its WITH HOLD
    cursor with it; the name is free for a cursor over the customers."""
    a = attacker
    a.q(
        "CREATE TEMP TABLE wb_deferred (x int UNIQUE DEFERRABLE INITIALLY DEFERRED);"
        "BEGIN; DECLARE wb_h CURSOR WITH HOLD FOR SELECT 1 AS one;"
        "INSERT INTO wb_deferred VALUES (1), (1)"
    )
    assert codes(a.q("COMMIT")) == ["23505"]
    a.q(f"BEGIN; DECLARE wb_h CURSOR FOR {READ_1}")
    assert read_name(a.q("FETCH ALL wb_h"))
    a.q("COMMIT")
    assert certain(a.events())


def test_an_implicit_commit_inside_a_query_holds_its_cursor(attacker: Attacker) -> None:
    """COMMIT inside a multi-statement Query ends its implicit transaction: a WITH HOLD
    cursor declared before it is held, and outlives the failure that follows."""
    a = attacker
    got = a.q(f"DECLARE wb_i CURSOR WITH HOLD FOR {READ_1}; COMMIT; SELECT 1/0")
    assert codes(got) == ["22012"]
    assert read_name(a.q("FETCH ALL wb_i"))
    a.q("CLOSE wb_i")
    assert certain(a.events())


def test_discard_all_in_a_block_fails_and_drops_nothing(attacker: Attacker) -> None:
    a = attacker
    a.q(f"PREPARE wb_d AS {READ_1}")
    assert codes(a.q("BEGIN; DISCARD ALL")) == ["25001"]
    a.q("ROLLBACK")
    assert read_name(a.q("EXECUTE wb_d"))
    a.q("DEALLOCATE wb_d")
    assert certain(a.events())


def test_quoted_and_unquoted_names_are_the_servers(attacker: Attacker) -> None:
    """`PREPARE "WB_Q"` keeps the case; `wb_q` is another name; U&"..." spells one; a
    protocol Bind names it as it is written."""
    a = attacker
    a.q(f'PREPARE "WB_Q" AS {READ_1}; PREPARE wb_q AS {HARMLESS}')
    assert read_name(a.q('EXECUTE U&"\\0057B_Q"'))
    assert not read_name(a.q("EXECUTE WB_Q"))
    got = a.batch(bind(stmt="WB_Q"), execute(), SYNC)
    assert read_name(got)
    a.q('DEALLOCATE "WB_Q"; DEALLOCATE wb_q')
    events = a.events()
    # (EXECUTE wb_q is recorded with the tables of the whole Query that prepared it: more,
    # never less, than it read)
    executes = [e for e in events if e["kinds"] == ["execute"]]
    assert len(executes) == 2 and all(e["tables"] == [CUSTOMERS] for e in executes)
    assert certain(events) and all(e.get("analysis_complete") is not False for e in events)


def test_rollback_to_savepoint_drops_a_protocol_portal_bound_after_it(
    attacker: Attacker,
) -> None:
    a = attacker
    a.q("BEGIN; SAVEPOINT wb_s")
    got = a.batch(parse(HARMLESS, name="wb_rh"), bind(stmt="wb_rh", portal="wb_rp"), SYNC)
    assert codes(got) == []
    a.q("ROLLBACK TO wb_s")
    got = a.batch(parse(READ_1, name="wb_rr"), bind(stmt="wb_rr", portal="wb_rp"),
                  execute("wb_rp"), SYNC)  # fmt: skip
    assert codes(got) == [] and read_name(got)
    a.q("COMMIT")
    assert certain(a.events())


def test_explain_analyze_of_create_table_as_execute_reads_the_statement(
    attacker: Attacker,
) -> None:
    """`EXPLAIN ANALYZE CREATE TABLE t AS EXECUTE p` runs p and keeps its rows in t: what
    p reads is recorded, as for `CREATE TABLE t AS EXECUTE p` (the EXECUTE is two
    statements deep; the masked analyser refuses it, so its event says the analysis is
    not complete, and names p's table rather than none)."""
    a = attacker
    a.q(f"PREPARE wb_x AS {READ_1}")
    assert codes(a.q("EXPLAIN ANALYZE CREATE TEMP TABLE wb_x1 AS EXECUTE wb_x")) == []
    assert read_name(a.q("SELECT * FROM wb_x1"))
    a.q("DEALLOCATE wb_x")
    events = a.events()
    explain = [e for e in events if e["kinds"] == ["explain"]]
    assert explain and explain[0]["tables"] == [CUSTOMERS], events
