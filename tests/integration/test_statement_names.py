"""The statement log's names against the server's (proxy/session/statements.py).

Each case is run twice on the real server: directly, where the answers show what the server
does with a name (which statement a portal or cursor runs, whether a name is free, which
Sync a ReadyForQuery answers), and through an audited pgveil as an unmasked role, where the
access events must say what ran: the right tables and subjects, and never `uncertain`
(`analysis_complete: false`) where the server's rules tell for sure. The name cases are sent
one request at a time: the log then corrects itself from the answers in any case, so what
shows a wrong model is an event marked uncertain. The last cases pipeline requests: there
the prediction made before the answers must be right, or the event must say it is not.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest

from proxy.cli.audit import who
from proxy.demo.embedded_pg import EmbeddedPostgres
from proxy.wire import messages as m
from proxy.wire.errors import severity_of
from tests.conftest import TRUST_USER
from tests.integration.masking_fixture import NAME
from tests.integration.test_audit_events import Audited, audited  # noqa: F401
from tests.integration.test_error_scrub import SYNC, bind, execute, parse
from tests.support import RawClient, errors_in

READ_1 = "SELECT i_customer, name FROM billing.customers WHERE i_customer = 1"
CUSTOMERS = "billing.customers"


def query(sql: str) -> bytes:
    return m.message(m.QUERY, sql.encode() + b"\0")


def close(kind: str, name: str) -> bytes:
    return m.message(m.CLOSE, kind.encode() + name.encode() + b"\0")


def codes(got: list[tuple[str, bytes]]) -> list[str]:
    return [e["C"] for e in errors_in(got)]


def read_name(got: list[tuple[str, bytes]]) -> bool:
    return any(typ == "D" and NAME.encode() in body for typ, body in got)


def tags(got: list[tuple[str, bytes]]) -> list[str]:
    return [body[:-1].decode() for typ, body in got if typ == "C"]


class Run:
    """One session, directly or through the audited pgveil."""

    def __init__(self, pg: EmbeddedPostgres, audited: Audited, where: str) -> None:  # noqa: F811
        self.where = where
        self.audited = audited
        if where == "pgveil":
            audited.new_events()  # earlier tests' events
        self.c = RawClient(pg.port if where == "direct" else audited.proxy.port, TRUST_USER)

    def q(self, sql: str) -> list[tuple[str, bytes]]:
        return self.c.query(sql)

    def batch(self, *messages: bytes) -> list[tuple[str, bytes]]:
        """Messages sent in one write; the answers up to each request's ReadyForQuery."""
        self.c.send_raw(b"".join(messages))
        got: list[tuple[str, bytes]] = []
        for _ in range(sum(1 for x in messages if x[0] in (m.SYNC, m.QUERY))):
            got += self.c.until_ready()
        return got

    def events(self, count: int) -> list[dict[str, Any]]:
        """The session's access events (waits for `count`)."""
        found = self.audited.new_events(TRUST_USER, count)
        return [e for e in found if e["type"] == "access"]

    def close(self) -> None:
        self.c.close()


@pytest.fixture(params=["direct", "pgveil"])
def run(
    request: pytest.FixtureRequest,
    pg: EmbeddedPostgres,
    audited: Audited,  # noqa: F811
) -> Iterator[Run]:
    r = Run(pg, audited, request.param)
    try:
        yield r
    finally:
        r.close()


def certain_read(event: dict[str, Any]) -> bool:
    """The event of a read of customer 1 that says for sure what it read."""
    return (
        event["tables"] == [CUSTOMERS]
        and event.get("subjects") == {CUSTOMERS: ["1"]}
        and event.get("analysis_complete") is not False
        and event["subjects_complete"] is True
    )


def no_uncertain(events: list[dict[str, Any]]) -> bool:
    return all(e.get("analysis_complete") is not False for e in events)


# ---- transactions end names --------------------------------------------------------------------


def test_a_with_hold_cursor_outlives_its_commit_and_keeps_its_name(run: Run) -> None:
    run.q(f"BEGIN; DECLARE names_h CURSOR WITH HOLD FOR {READ_1}; COMMIT")
    got = run.q("FETCH ALL FROM names_h")
    assert read_name(got)
    # the name is still taken in the next transaction
    assert codes(run.q("BEGIN; DECLARE names_h CURSOR FOR SELECT 1")) == ["42P03"]
    run.q("ROLLBACK")
    assert read_name(run.q("FETCH ABSOLUTE 1 FROM names_h"))  # it outlived the rollback
    if run.where == "pgveil":
        declare, fetch, again = run.events(3)
        assert fetch["statement"].startswith("FETCH") and certain_read(fetch)
        assert certain_read(again) and no_uncertain([declare, fetch, again])


def test_a_with_hold_cursor_of_a_rolled_back_transaction_frees_its_name(run: Run) -> None:
    run.q("BEGIN; DECLARE names_r CURSOR WITH HOLD FOR SELECT 1")
    assert tags(run.q("ROLLBACK")) == ["ROLLBACK"]
    run.q(f"BEGIN; DECLARE names_r CURSOR FOR {READ_1}")
    assert read_name(run.q("FETCH ALL FROM names_r"))
    run.q("COMMIT")
    if run.where == "pgveil":
        declare, fetch = run.events(2)
        assert certain_read(fetch) and no_uncertain([declare])


def test_commit_of_a_failed_block_rolls_its_with_hold_cursors_back(run: Run) -> None:
    run.q("BEGIN; DECLARE names_f CURSOR WITH HOLD FOR SELECT 1")
    assert codes(run.q("SELECT 1/0")) == ["22012"]
    assert tags(run.q("COMMIT")) == ["ROLLBACK"]  # the failed block's COMMIT rolls back
    run.q(f"BEGIN; DECLARE names_f CURSOR FOR {READ_1}")
    assert read_name(run.q("FETCH ALL FROM names_f"))
    run.q("COMMIT")
    if run.where == "pgveil":
        declare, fetch = run.events(2)
        assert certain_read(fetch) and no_uncertain([declare])


def test_rollback_to_savepoint_frees_the_names_declared_after_it(run: Run) -> None:
    run.q("BEGIN; DECLARE names_a CURSOR FOR SELECT 1; SAVEPOINT s")
    run.q("DECLARE names_b CURSOR FOR SELECT 2")
    assert tags(run.q("ROLLBACK TO s")) == ["ROLLBACK"]
    run.q(f"DECLARE names_b CURSOR FOR {READ_1}")  # free again
    assert read_name(run.q("FETCH ALL FROM names_b"))
    # declared before the savepoint: still there
    assert codes(run.q("DECLARE names_a CURSOR FOR SELECT 3")) == ["42P03"]
    run.q("ROLLBACK TO s")
    # a cursor declared inside a released savepoint belongs to the transaction
    run.q(f"SAVEPOINT t; DECLARE names_c CURSOR FOR {READ_1}; RELEASE t")
    assert read_name(run.q("FETCH ALL FROM names_c"))
    run.q("COMMIT")
    if run.where == "pgveil":
        declare_b, fetch_b, declare_c, fetch_c = run.events(4)
        assert certain_read(fetch_b) and certain_read(fetch_c)
        assert no_uncertain([declare_b, declare_c])


def test_a_multi_statement_query_declares_in_its_own_implicit_transaction(run: Run) -> None:
    got = run.q(f"DECLARE names_m CURSOR FOR {READ_1}; FETCH ALL FROM names_m")
    assert read_name(got) and codes(got) == []
    # gone with the query's transaction: a cursor of that name is free again
    got = run.q(f"BEGIN; DECLARE names_m CURSOR FOR {READ_1}; FETCH ALL FROM names_m; COMMIT")
    assert read_name(got) and codes(got) == []
    if run.where == "pgveil":
        first, second = run.events(2)
        assert first["subjects"] == second["subjects"] == {CUSTOMERS: ["1"]}
        assert no_uncertain([first, second])


def test_a_named_portal_ends_with_the_request_that_bound_it(run: Run) -> None:
    one = parse("SELECT 1", name="names_one") + bind(stmt="names_one", portal="names_p")
    assert codes(run.batch(one, SYNC)) == []
    read = parse(READ_1, name="names_read") + bind(stmt="names_read", portal="names_p")
    got = run.batch(read, execute("names_p"), SYNC)
    assert read_name(got)
    # in a block it lives on until the block ends
    run.q("BEGIN")
    assert codes(run.batch(bind(stmt="names_one", portal="names_q"), SYNC)) == []
    got = run.batch(bind(stmt="names_read", portal="names_q"), execute("names_q"), SYNC)
    assert codes(got) == ["42P03"]
    run.q("ROLLBACK")
    if run.where == "pgveil":
        (event,) = run.events(1)
        assert certain_read(event)


# ---- names dropped by statements -----------------------------------------------------------


def test_close_all_closes_the_protocol_portals_too(run: Run) -> None:
    run.q("BEGIN")
    one = parse("SELECT 1", name="names_c1") + bind(stmt="names_c1", portal="names_cp")
    assert codes(run.batch(one, SYNC)) == []
    assert tags(run.q("CLOSE ALL")) == ["CLOSE CURSOR ALL"]
    read = parse(READ_1, name="names_c2") + bind(stmt="names_c2", portal="names_cp")
    got = run.batch(read, execute("names_cp"), SYNC)
    assert codes(got) == [] and read_name(got)
    run.q("COMMIT")
    if run.where == "pgveil":
        (event,) = run.events(1)
        assert certain_read(event)


def test_deallocate_all_keeps_the_unnamed_statement(run: Run) -> None:
    dealloc = parse("DEALLOCATE ALL", name="names_d") + bind(stmt="names_d") + execute()
    got = run.batch(parse(READ_1), dealloc, bind(), execute(), SYNC)
    assert tags(got) == ["DEALLOCATE ALL", "SELECT 1"] and read_name(got)
    if run.where == "pgveil":
        (event,) = run.events(1)
        assert certain_read(event)


def test_a_query_drops_the_unnamed_statement(run: Run) -> None:
    assert codes(run.batch(parse(READ_1), SYNC)) == []
    run.q("SELECT 2")
    assert codes(run.batch(bind(), execute(), SYNC)) == ["26000"]
    run.q(READ_1)
    if run.where == "pgveil":
        # only the Query's read: the Bind to the dropped statement ran nothing
        (event,) = run.events(1)
        assert event["statement"].startswith("SELECT") and certain_read(event)


def test_a_failed_unnamed_parse_drops_the_old_unnamed_statement(run: Run) -> None:
    assert codes(run.batch(parse(READ_1), SYNC)) == []
    assert codes(run.batch(parse("SELECT names_nosuch"), SYNC)) == ["42703"]
    assert codes(run.batch(bind(), execute(), SYNC)) == ["26000"]
    run.q(READ_1)
    if run.where == "pgveil":
        (event,) = run.events(1)
        assert certain_read(event)


@pytest.fixture
def committing_procedure(pg: EmbeddedPostgres) -> Iterator[str]:
    pg.psql("CREATE PROCEDURE public.names_commit() LANGUAGE plpgsql AS $$ BEGIN COMMIT; END $$")
    yield "CALL public.names_commit()"
    pg.psql("DROP PROCEDURE public.names_commit()")


def test_call_that_commits_ends_the_portals_of_its_transaction(
    run: Run, committing_procedure: str
) -> None:
    """CALL outside a block may commit: the portals bound before it are gone, their names
    free (the log cannot know whether it committed: it finds out from the answers)."""
    one = parse("SELECT 1", name="names_k1") + bind(stmt="names_k1", portal="names_kp")
    call = parse(committing_procedure, name="names_call") + bind(stmt="names_call") + execute()
    read = parse(READ_1, name="names_k2") + bind(stmt="names_k2", portal="names_kp")
    got = run.batch(one, call, read, execute("names_kp"), SYNC)
    assert codes(got) == [] and read_name(got)
    if run.where == "pgveil":
        # (CALL of a procedure pgveil does not analyse is recorded as such, as before)
        call_event, event = run.events(2)
        assert call_event["kinds"] == ["call"] and certain_read(event)


# ---- pipelines: the prediction made before the answers -------------------------------------


def test_pipelined_requests_reuse_a_portal_name_after_each_sync(run: Run) -> None:
    read = parse(READ_1, name="names_pr")
    got = run.batch(
        read,
        bind(stmt="names_pr", portal="names_pp"),
        execute("names_pp"),
        SYNC,
        bind(stmt="names_pr", portal="names_pp"),
        execute("names_pp"),
        SYNC,
    )
    assert codes(got) == [] and sum(1 for typ, _ in got if typ == "D") == 2
    if run.where == "pgveil":
        first, second = run.events(2)
        assert certain_read(first) and certain_read(second)


def test_a_pipelined_fetch_of_a_cursor_whose_close_an_error_skipped_is_uncertain(
    run: Run,
) -> None:
    """The Close of a held cursor follows a failing Parse: the server skips it. The Execute
    of the cursor, pipelined behind the Sync, was sent when pgveil could only predict that
    the Close would close it: it runs the cursor, and its event says that what it read
    cannot be told (`audit who` lists it as possibly any table's)."""
    run.q(f"DECLARE names_hc CURSOR WITH HOLD FOR {READ_1}")
    got = run.batch(
        parse("SELECT names_nosuch"), close("P", "names_hc"), SYNC, execute("names_hc"), SYNC
    )
    assert codes(got) == ["42703"] and read_name(got)  # the Close was skipped
    if run.where == "pgveil":
        declare, fetch = run.events(2)
        assert fetch["analysis_complete"] is False and fetch["tables"] == []
        assert fetch["subjects_complete"] is False and "subjects" not in fetch
        for e in (declare, fetch):
            e.update(type="access", session="s", ts="2026-01-01T00:00:00Z")
        assert [r["touched"] for r in who([fetch], CUSTOMERS, "1", None, None)] == ["possibly"]
        assert json.dumps(fetch).count(NAME) == 0


def test_an_extended_copy_that_fails_with_messages_skipped_or_not_ends_the_session(
    pg: EmbeddedPostgres,
    audited: Audited,  # noqa: F811
) -> None:
    """COPY FROM STDIN by the extended protocol, a Sync sent during it, then after CopyDone
    a Parse and a Sync: a copy that fails on its data may have swallowed the first Sync
    (then the server skipped the Parse) or not (then it ran). The server's answers are
    the same either way: pgveil cannot pair what follows, and ends the session."""
    c = RawClient(audited.proxy.port, TRUST_USER)
    try:
        c.query("CREATE TEMP TABLE names_copy (x int)")
        c.send_raw(parse("COPY names_copy FROM STDIN") + bind() + execute() + SYNC)
        got = []
        while not got or got[-1][0] != "G":
            got.append(c.recv_message())
        c.send_raw(m.message(m.COPY_DATA, b"not a number\n") + m.message(m.COPY_DONE))
        c.send_raw(parse("SELECT 1") + SYNC)
        answers = [c.recv_message()]
        while not (answers[-1][0] == "E" and severity_of(answers[-1][1]) == "FATAL"):
            answers.append(c.recv_message())
        # the copy's own error may reach the client first (when it came in a read of its
        # own); the ReadyForQuery after it does not: nothing is paired with it
        assert [typ for typ, _ in answers] in (["E"], ["E", "E"]), answers
        final = errors_in(answers)[-1]
        assert final["S"] == "FATAL" and "can no longer be paired" in final["M"], final
        assert c.closed_by_peer()
    finally:
        c.close()


def test_an_extended_copy_that_fails_with_only_syncs_after_it_pairs_on(
    pg: EmbeddedPostgres,
    audited: Audited,  # noqa: F811
) -> None:
    """The same without the Parse: the Syncs are interchangeable, the answers tell how many
    the copy swallowed, and the next statement pairs with its own answer."""
    c = RawClient(audited.proxy.port, TRUST_USER)
    audited.new_events()
    try:
        c.query("CREATE TEMP TABLE names_copy (x int)")
        c.send_raw(parse("COPY names_copy FROM STDIN") + bind() + execute() + SYNC)
        got = []
        while not got or got[-1][0] != "G":
            got.append(c.recv_message())
        c.send_raw(m.message(m.COPY_DATA, b"not a number\n") + m.message(m.COPY_DONE) + SYNC)
        assert codes(c.until_ready()) == ["22P02"]
        assert read_name(c.query(READ_1))
    finally:
        c.close()
    (event,) = [e for e in audited.new_events(TRUST_USER, 1) if e["type"] == "access"]
    assert certain_read(event)
