"""Each access is recorded once, for the statement that made it, with its subjects: the
audit pairs statements with their answers across every way PostgreSQL lets a client name
and run them. SQL cursors and prepared statements used through the protocol and the other
way round (one namespace), names defined or used inside a multi-statement query, names
reused after a failed Parse or a Close, COPY inside an extended-protocol pipeline, subjects
of every statement of a multi-statement query, rows whose key is NULL, named keys
normalised like returned ones, portals run in chunks (PortalSuspended), and pipelined
errors with binary keys.

Every test runs real statements through pgveil against a real PostgreSQL. Raw protocol
tests log in as `trust_user` (unmasked, granted the billing tables here) or `masked_trust`
(masked through cc_staff), both with `trust` authentication. An event is written before the
answer that completes its statement is released, so once a client has read ReadyForQuery
every event of that request is already in the file: events are read without waiting.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest

from proxy.demo.embedded_pg import EmbeddedPostgres
from proxy.wire import messages as m
from proxy.wire.errors import sqlstate_of
from tests.integration.masking_fixture import ADMIN, ADMIN_PW, HELPDESK, HELPDESK_PW, dsn, leaks
from tests.integration.test_audit_events import Audited, audited  # noqa: F401
from tests.support import RawClient

UNMASKED_RAW = "trust_user"
MASKED_RAW = "masked_trust"
CUSTOMERS = "billing.customers"
READ_ALL = "SELECT i_customer, name FROM billing.customers ORDER BY 1"


@pytest.fixture(scope="module")
def raw_grants(pg: EmbeddedPostgres, audited: Audited) -> Iterator[None]:  # noqa: F811
    pg.psql(
        f"GRANT USAGE ON SCHEMA billing TO {UNMASKED_RAW};"
        f"GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA billing TO {UNMASKED_RAW};"
    )
    yield
    pg.psql(
        f"REVOKE ALL ON ALL TABLES IN SCHEMA billing FROM {UNMASKED_RAW};"
        f"REVOKE USAGE ON SCHEMA billing FROM {UNMASKED_RAW};"
    )


# ---- raw protocol helpers ----------------------------------------------------------------


def _parse(name: str, sql: str) -> bytes:
    return m.message(m.PARSE, name.encode() + b"\0" + sql.encode() + b"\0" + struct.pack("!h", 0))


def _bind(
    portal: str,
    stmt: str,
    params: tuple[bytes, ...] = (),
    binary: bool = False,
    binary_params: bool = False,
) -> bytes:
    body = portal.encode() + b"\0" + stmt.encode() + b"\0"
    body += struct.pack("!hh", 1, 1) if binary_params else struct.pack("!h", 0)
    body += struct.pack("!h", len(params))
    for p in params:
        body += struct.pack("!i", len(p)) + p
    body += struct.pack("!hh", 1, 1) if binary else struct.pack("!h", 0)
    return m.message(m.BIND, body)


def _describe(kind: str, name: str) -> bytes:
    return m.message(m.DESCRIBE, kind.encode() + name.encode() + b"\0")


def _execute(portal: str, max_rows: int = 0) -> bytes:
    return m.message(m.EXECUTE, portal.encode() + b"\0" + struct.pack("!i", max_rows))


def _close(kind: str, name: str) -> bytes:
    return m.message(m.CLOSE, kind.encode() + name.encode() + b"\0")


_SYNC = m.message(m.SYNC)


def _batch(c: RawClient, *msgs: bytes) -> list[tuple[str, bytes]]:
    """Send the messages at once and read up to the ReadyForQuery of each Sync/Query."""
    c.send_raw(b"".join(msgs))
    answers: list[tuple[str, bytes]] = []
    for _ in range(sum(1 for x in msgs if x[0] in (m.SYNC, m.QUERY))):
        answers += c.until_ready()
    return answers


def _data_rows(answers: list[tuple[str, bytes]]) -> int:
    return sum(1 for typ, _ in answers if typ == "D")


def _access(audited: Audited, role: str) -> list[dict[str, Any]]:  # noqa: F811
    """The access events written so far (no waiting: see the module docstring)."""
    return [e for e in audited.new_events(role) if e["type"] == "access"]


def _on_customers(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [e for e in events if CUSTOMERS in e["tables"]]


# ---- SQL names and protocol names are one namespace in PostgreSQL -------------------------


@pytest.mark.parametrize("role", [UNMASKED_RAW, MASKED_RAW])
def test_protocol_execute_of_a_sql_cursor_is_recorded(
    audited: Audited,  # noqa: F811
    raw_grants: None,
    role: str,
) -> None:
    """A cursor DECLAREd in SQL is a portal: Execute can read it by name, without Bind."""
    c = RawClient(audited.proxy.port, user=role)
    try:
        c.query("BEGIN")
        c.query(f"DECLARE cur CURSOR FOR {READ_ALL}")
        audited.new_events()
        answers = _batch(c, _execute("cur"), _SYNC)
        assert _data_rows(answers) == 2  # both customers' rows were read
        c.query("COMMIT")
    finally:
        c.close()
    reads = _on_customers(_access(audited, role))
    assert len(reads) == 1, reads
    # no RowDescription ever described this portal's columns: the subjects cannot be read
    # from its rows, and the event says so (audit who lists it as "possibly")
    assert reads[0]["rows"] == 2 and reads[0]["subjects_complete"] is False


@pytest.mark.parametrize("role", [UNMASKED_RAW, MASKED_RAW])
def test_sql_fetch_of_a_protocol_portal_is_recorded(
    audited: Audited,  # noqa: F811
    raw_grants: None,
    role: str,
) -> None:
    """A named portal made by Bind is a cursor: FETCH reads it by name."""
    c = RawClient(audited.proxy.port, user=role)
    try:
        c.query("BEGIN")
        _batch(c, _parse("", READ_ALL), _bind("p1", ""), _SYNC)
        audited.new_events()
        answers = c.query("FETCH ALL FROM p1")
        assert _data_rows(answers) == 2
        c.query("COMMIT")
    finally:
        c.close()
    reads = _on_customers(_access(audited, role))
    assert len(reads) == 1, reads
    assert reads[0]["rows"] == 2 and reads[0]["subjects"] == {CUSTOMERS: ["1", "2"]}


@pytest.mark.parametrize("role", [UNMASKED_RAW, MASKED_RAW])
def test_bind_to_a_sql_prepared_statement_is_recorded(
    audited: Audited,  # noqa: F811
    raw_grants: None,
    role: str,
) -> None:
    """A statement PREPAREd in SQL can be bound and executed over the extended protocol."""
    c = RawClient(audited.proxy.port, user=role)
    try:
        c.query(f"PREPARE sqlp AS {READ_ALL}")
        audited.new_events()
        answers = _batch(c, _bind("", "sqlp"), _describe("P", ""), _execute(""), _SYNC)
        assert _data_rows(answers) == 2
        c.query("DEALLOCATE sqlp")
    finally:
        c.close()
    reads = _on_customers(_access(audited, role))
    assert len(reads) == 1, reads
    assert reads[0]["rows"] == 2 and reads[0]["subjects"] == {CUSTOMERS: ["1", "2"]}


@pytest.mark.parametrize("role", [UNMASKED_RAW, MASKED_RAW])
def test_sql_execute_of_a_protocol_statement_is_recorded(
    audited: Audited,  # noqa: F811
    raw_grants: None,
    role: str,
) -> None:
    """A statement made by a named Parse can be run with SQL EXECUTE."""
    c = RawClient(audited.proxy.port, user=role)
    try:
        _batch(c, _parse("protop", READ_ALL), _SYNC)
        audited.new_events()
        answers = c.query("EXECUTE protop")
        assert _data_rows(answers) == 2
    finally:
        c.close()
    reads = _on_customers(_access(audited, role))
    assert len(reads) == 1, reads
    assert reads[0]["rows"] == 2 and reads[0]["subjects"] == {CUSTOMERS: ["1", "2"]}


# ---- SQL-level names defined or used in a multi-statement query --------------------------


def test_fetch_from_a_cursor_declared_with_begin_is_recorded(
    pg: EmbeddedPostgres,
    audited: Audited,  # noqa: F811
) -> None:
    """`BEGIN; DECLARE ...` in one Query is a common idiom; FETCH then reads the rows."""
    with psycopg.connect(dsn(pg, audited.proxy.port, ADMIN, ADMIN_PW), autocommit=True) as c:
        c.execute(f"BEGIN; DECLARE cur2 CURSOR FOR {READ_ALL}")
        audited.new_events()
        assert len(c.execute("FETCH ALL FROM cur2").fetchall()) == 2
        c.execute("COMMIT")
    reads = _on_customers(_access(audited, ADMIN))
    assert [e["kinds"] for e in reads] == [["fetch"]], reads
    assert reads[0]["rows"] == 2 and reads[0]["subjects"] == {CUSTOMERS: ["1", "2"]}


@pytest.mark.parametrize(("role", "password"), [(ADMIN, ADMIN_PW), (HELPDESK, HELPDESK_PW)])
def test_execute_inside_a_multi_statement_query_is_recorded(
    pg: EmbeddedPostgres,
    audited: Audited,  # noqa: F811
    role: str,
    password: str,
) -> None:
    with psycopg.connect(dsn(pg, audited.proxy.port, role, password), autocommit=True) as c:
        c.execute(f"PREPARE pm AS {READ_ALL}")
        audited.new_events()
        cur = c.execute("SET application_name = 'x'; EXECUTE pm")
        assert cur.nextset() and len(cur.fetchall()) == 2
        c.execute("DEALLOCATE pm")
    reads = _on_customers(_access(audited, role))
    assert len(reads) == 1, reads
    assert reads[0]["rows"] == 2 and reads[0]["subjects"] == {CUSTOMERS: ["1", "2"]}


# ---- names reused ---------------------------------------------------------------------


@pytest.mark.parametrize("role", [UNMASKED_RAW, MASKED_RAW])
def test_failed_parse_of_an_existing_name_keeps_the_old_statement(
    audited: Audited,  # noqa: F811
    raw_grants: None,
    role: str,
) -> None:
    """Parse of a name in use fails (42P05): the name still runs the first statement."""
    c = RawClient(audited.proxy.port, user=role)
    try:
        _batch(c, _parse("dup", READ_ALL), _SYNC)
        again = _batch(c, _parse("dup", "SELECT 1"), _SYNC)
        assert [sqlstate_of(b) for t, b in again if t == "E"] == ["42P05"]
        audited.new_events()
        answers = _batch(c, _bind("", "dup"), _describe("P", ""), _execute(""), _SYNC)
        assert _data_rows(answers) == 2
    finally:
        c.close()
    reads = _on_customers(_access(audited, role))
    assert len(reads) == 1, reads
    assert reads[0]["rows"] == 2 and reads[0]["subjects"] == {CUSTOMERS: ["1", "2"]}


def test_describe_and_close_of_reused_names_pair_correctly(
    audited: Audited,  # noqa: F811
    raw_grants: None,
) -> None:
    """Control: a name closed and parsed again, described before the answer comes, and
    the unnamed statement replaced within one batch (this holds)."""
    c = RawClient(audited.proxy.port, user=UNMASKED_RAW)
    try:
        audited.new_events()
        answers = _batch(
            c,
            _parse("r", "SELECT i_customer, email FROM billing.customers WHERE i_customer = 1"),
            _bind("", "r"),
            _describe("P", ""),
            _execute(""),
            _close("S", "r"),
            _parse("r", "SELECT i_account, ip FROM billing.accounts ORDER BY 1"),
            _bind("", "r", binary=True),
            _describe("P", ""),
            _execute(""),
            _SYNC,
        )
        assert _data_rows(answers) == 3
    finally:
        c.close()
    first, second = _access(audited, UNMASKED_RAW)
    assert first["rows"] == 1 and first["subjects"] == {CUSTOMERS: ["1"]}
    assert second["rows"] == 2 and second["subjects"] == {"billing.accounts": ["10", "20"]}
    assert second["subjects_complete"] is True


# ---- COPY desynchronises the FIFO ---------------------------------------------------------


def test_extended_copy_from_stdin_keeps_later_statements_paired(
    pg: EmbeddedPostgres,
    audited: Audited,  # noqa: F811
) -> None:
    """libpq sends COPY ... FROM STDIN over the extended protocol with a Sync right after
    Execute, and another after CopyDone. PostgreSQL ignores a Sync received in copy-in
    mode, so two Syncs get one ReadyForQuery."""
    with psycopg.connect(dsn(pg, audited.proxy.port, ADMIN, ADMIN_PW), autocommit=True) as c:
        c.execute("CREATE TEMP TABLE sink (i_customer bigint)")
        pgc = c.pgconn
        pgc.send_query_params(b"COPY sink FROM STDIN", None)
        res = pgc.get_result()
        assert res is not None and res.status == psycopg.pq.ExecStatus.COPY_IN
        pgc.put_copy_data(b"1\n")
        pgc.put_copy_end()
        while pgc.get_result() is not None:
            pass
        audited.new_events()
        rows = c.execute(
            "SELECT i_customer, name FROM billing.customers WHERE i_customer = 1"
        ).fetchall()
        assert len(rows) == 1
        c.execute("SELECT i_customer, email FROM billing.customers ORDER BY 1").fetchall()
    reads = _on_customers(_access(audited, ADMIN))
    assert [(e["rows"], e.get("subjects")) for e in reads] == [
        (1, {CUSTOMERS: ["1"]}),
        (2, {CUSTOMERS: ["1", "2"]}),
    ], reads


# ---- subjects that claim to be complete but are not ---------------------------------------


@pytest.mark.parametrize(("role", "password"), [(ADMIN, ADMIN_PW), (HELPDESK, HELPDESK_PW)])
def test_multi_statement_subjects_cover_every_statement(
    pg: EmbeddedPostgres,
    audited: Audited,  # noqa: F811
    role: str,
    password: str,
) -> None:
    """The first statement returns customer 1's key; the second reads every name without
    a key. Customer 2 was touched: the event must list it or say it is incomplete."""
    with psycopg.connect(dsn(pg, audited.proxy.port, role, password), autocommit=True) as c:
        audited.new_events()
        c.execute(
            "SELECT i_customer FROM billing.customers WHERE i_customer = 1; "
            "SELECT name FROM billing.customers"
        )
    (e,) = _on_customers(_access(audited, role))
    assert e["rows"] == 3
    assert e.get("subjects") == {CUSTOMERS: ["1", "2"]} or e["subjects_complete"] is False, e


@pytest.mark.parametrize(("role", "password"), [(ADMIN, ADMIN_PW), (HELPDESK, HELPDESK_PW)])
def test_rows_with_a_null_key_are_not_silently_dropped(
    pg: EmbeddedPostgres,
    audited: Audited,  # noqa: F811
    role: str,
    password: str,
) -> None:
    """A LEFT JOIN returns the key column of one side (NULL on the second row) and the name
    of the other: customer 2's name is read, under a NULL key."""
    with psycopg.connect(dsn(pg, audited.proxy.port, role, password), autocommit=True) as c:
        audited.new_events()
        rows = c.execute(
            "SELECT k.i_customer, d.name FROM billing.customers d "
            "LEFT JOIN billing.customers k ON k.i_customer = d.i_customer AND k.i_customer = 1 "
            "ORDER BY d.i_customer"
        ).fetchall()
        assert len(rows) == 2 and rows[1][0] is None
    (e,) = _on_customers(_access(audited, role))
    assert e.get("subjects") == {CUSTOMERS: ["1", "2"]} or e["subjects_complete"] is False, e


def test_named_keys_are_normalised_like_returned_keys(
    pg: EmbeddedPostgres,
    audited: Audited,  # noqa: F811
) -> None:
    """`WHERE i_customer = '01'` updates customer 1: the event must name subject 1, as a
    read of that row does (`audit who --subject 1` looks for "1")."""
    with psycopg.connect(dsn(pg, audited.proxy.port, ADMIN, ADMIN_PW)) as c:
        audited.new_events()
        c.execute("UPDATE billing.customers SET notes = notes WHERE i_customer = '01'")
        c.execute("UPDATE billing.customers SET notes = notes WHERE i_customer = %s", ["02"])
        c.rollback()
    literal, param = _on_customers(_access(audited, ADMIN))
    assert literal["rows"] == 1 and param["rows"] == 1
    assert literal["subjects"] == {CUSTOMERS: ["1"]}, literal
    assert param["subjects"] == {CUSTOMERS: ["2"]}, param


# ---- portals in chunks --------------------------------------------------------------------


@pytest.mark.parametrize("role", [UNMASKED_RAW, MASKED_RAW])
def test_portal_suspended_chunks_count_their_rows(
    audited: Audited,  # noqa: F811
    raw_grants: None,
    role: str,
) -> None:
    """Execute with max_rows 1 returns one row and PortalSuspended (no CommandComplete)."""
    c = RawClient(audited.proxy.port, user=role)
    try:
        c.query("BEGIN")
        audited.new_events()
        answers = _batch(
            c,
            _parse("", READ_ALL),
            _bind("chunked", ""),
            _describe("P", "chunked"),
            _execute("chunked", 1),
            _execute("chunked", 1),
            _execute("chunked", 1),
            _SYNC,
        )
        assert _data_rows(answers) == 2
        assert [t for t, _ in answers].count("s") == 2
        c.query("COMMIT")
    finally:
        c.close()
    events = _on_customers(_access(audited, role))
    assert len(events) == 3, events
    assert sum(e["rows"] for e in events) == 2, events
    assert [e.get("subjects") for e in events] == [
        {CUSTOMERS: ["1"]},
        {CUSTOMERS: ["2"]},
        None,
    ]


def test_portal_suspended_chunk_without_key_is_not_complete(
    audited: Audited,  # noqa: F811
    raw_grants: None,
) -> None:
    """A chunk of names without the key: the subjects are unknown, so the event must not
    say `subjects_complete: true` (which hides it from `audit who` even as `possibly`)."""
    c = RawClient(audited.proxy.port, user=UNMASKED_RAW)
    try:
        c.query("BEGIN")
        audited.new_events()
        answers = _batch(
            c,
            _parse("", "SELECT name FROM billing.customers ORDER BY i_customer"),
            _bind("names", ""),
            _describe("P", "names"),
            _execute("names", 1),
            _SYNC,
        )
        assert _data_rows(answers) == 1
        c.query("COMMIT")
    finally:
        c.close()
    (e,) = _on_customers(_access(audited, UNMASKED_RAW))
    assert e["rows"] == 1 and e["subjects_complete"] is False, e


# ---- controls that hold ----------------------------------------------------------------


def test_pipelined_errors_and_binary_keys_pair_correctly(
    audited: Audited,  # noqa: F811
    raw_grants: None,
) -> None:
    """Control: three Syncs in one write, the middle one failing at Bind; binary keys and
    text keys of both tables; no personal value in any event (this holds)."""
    c = RawClient(audited.proxy.port, user=UNMASKED_RAW)
    try:
        audited.new_events()
        q = "SELECT i_customer, name, email FROM billing.customers WHERE i_customer = $1"
        _batch(
            c,
            _parse("k", q),
            _bind("", "k", (struct.pack("!q", 1),), binary=True, binary_params=True),
            _describe("P", ""),
            _execute(""),
            _SYNC,
            _bind("", "k", (b"not a number",)),
            _describe("P", ""),
            _execute(""),
            _SYNC,
            _bind("", "k", (b"2",)),
            _describe("P", ""),
            _execute(""),
            _SYNC,
        )
    finally:
        c.close()
    events = _access(audited, UNMASKED_RAW)
    assert [(e["outcome"], e["rows"], e.get("subjects")) for e in events] == [
        ("ok", 1, {CUSTOMERS: ["1"]}),
        ("22P02", 0, None),
        ("ok", 1, {CUSTOMERS: ["2"]}),
    ]
    assert not leaks(repr(events))
