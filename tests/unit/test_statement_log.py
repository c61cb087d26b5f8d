"""The statement log and the recording filter without sockets: the fast paths that audited
sessions take (DataRows in batches, subject keys decoded once per result set, audit fields
per statement shape, RowDescriptions remembered per context)."""

from __future__ import annotations

import struct

import pytest

from proxy.session.filters import CLIENT_CAPTURE_RECORDED, SERVER_CAPTURE_RECORDED_ROWS
from proxy.session.masked import MaskedFilter, RecordingFilter
from proxy.session.statements import Cause, StatementLog
from proxy.wire import messages as m
from proxy.wire.errors import error_response
from proxy.wire.framing import MessageScanner, capture_mask
from proxy.wire.simple import ready_for_query
from rules.context import ContextHolder, MaskingContext
from rules.loader import parse_rules
from tests.unit.rules.fixtures import CATALOG, RULES

CUSTOMERS, ACCOUNTS = 100, 101  # the fixture catalog's table oids
INT8, TEXT = 20, 25


class Hook:
    subjects_limit = 100

    def __init__(self) -> None:
        self.events: list[tuple[str, dict[str, object]]] = []

    def ready(self) -> bool:
        return True

    def record(self, event_type: str, fields: dict[str, object]) -> bool:
        self.events.append((event_type, fields))
        return True


def context() -> MaskingContext:
    return MaskingContext(parse_rules(RULES, "r", {"K": "k" * 32}), CATALOG)


def row_description(*cols: tuple[str, int, int, int, int]) -> bytes:
    body = struct.pack("!h", len(cols))
    for name, table, attnum, type_oid, fmt in cols:
        body += name.encode() + b"\0" + struct.pack("!IhIhih", table, attnum, type_oid, -1, -1, fmt)
    return m.message(m.ROW_DESCRIPTION, body)


def data_row(*values: bytes | None) -> bytes:
    body = struct.pack("!h", len(values))
    for v in values:
        body += struct.pack("!i", -1) if v is None else struct.pack("!i", len(v)) + v
    return m.message(m.DATA_ROW, body)


def complete(tag: bytes) -> bytes:
    return m.message(m.COMMAND_COMPLETE, tag + b"\0")


class Session:
    """A recording filter with its two scanners, DataRows captured as the engine does."""

    def __init__(self, ctx: MaskingContext | ContextHolder | None = None) -> None:
        self.hook = Hook()
        self.filter = RecordingFilter(ctx or context(), self.hook)
        self.client = MessageScanner(capture_mask(b"XQPBDESCF"), [0] * 256, 1 << 20)
        self.server = MessageScanner(capture_mask(b"ESTZCIsn1GD"), [0] * 256, 1 << 30)

    def query(self, sql: str, answer: bytes) -> dict[str, object]:
        before = len(self.hook.events)
        self.filter.client(self.client, m.message(m.QUERY, sql.encode() + b"\0"))
        assert self.filter.server(self.server, answer + ready_for_query()) == (
            answer + ready_for_query()
        )
        events = self.hook.events[before:]
        assert len(events) == 1, events
        return events[0][1]


def test_batched_rows_with_the_key_first_and_a_null_key() -> None:
    s = Session()
    answer = (
        row_description(("i_customer", CUSTOMERS, 1, TEXT, 0), ("name", CUSTOMERS, 2, TEXT, 0))
        + data_row(b"7", b"x")
        + data_row(b"", b"y")  # an empty key is a key
        + data_row(None, b"z")  # a row without its key: subjects incomplete
        + data_row(b"7", b"w")
        + complete(b"SELECT 4")
    )
    event = s.query("SELECT i_customer, name FROM billing.customers", answer)
    assert event["subjects"] == {"billing.customers": ["", "7"]}
    assert event["subjects_total"] == {"billing.customers": 2}
    assert event["subjects_complete"] is False and event["rows"] == 4


def test_keys_after_other_fields_in_binary_and_two_result_sets() -> None:
    s = Session()
    first = (
        row_description(("name", CUSTOMERS, 2, TEXT, 0), ("i_customer", CUSTOMERS, 1, INT8, 1))
        + data_row(b"x", struct.pack("!q", 42))
        + data_row(None, struct.pack("!q", 43))
        + complete(b"SELECT 2")
    )
    second = (
        row_description(("i_account", ACCOUNTS, 1, TEXT, 0))
        + data_row(b"9")
        + complete(b"SELECT 1")
    )
    event = s.query(
        "SELECT name, i_customer FROM billing.customers; SELECT i_account FROM billing.accounts",
        first + second,
    )
    assert event["subjects"] == {"billing.customers": ["42", "43"], "billing.accounts": ["9"]}
    # complete only when every result set carried every table's key: conservative here
    assert event["subjects_complete"] is False and event["rows"] == 3


def test_rows_split_across_reads_are_all_seen() -> None:
    s = Session()
    s.filter.client(s.client, m.message(m.QUERY, b"SELECT i_customer FROM billing.customers\0"))
    answer = (
        row_description(("i_customer", CUSTOMERS, 1, TEXT, 0))
        + b"".join(data_row(str(k).encode()) for k in range(50))
        + complete(b"SELECT 50")
        + ready_for_query()
    )
    out = b""
    for i in range(0, len(answer), 37):
        out += s.filter.server(s.server, answer[i : i + 37])
    assert out == answer
    (_, event), *_ = s.hook.events
    assert event["subjects_total"] == {"billing.customers": 50}


def test_the_fields_of_a_shape_do_not_carry_another_statements_subjects() -> None:
    """Statements of one shape share their audit fields; the subjects a statement names
    are its own: a later statement whose key cannot be read (E'' string) names none."""
    s = Session()
    update = "UPDATE billing.customers SET name = 'n' WHERE i_customer = {}"
    first = s.query(update.format("5"), complete(b"UPDATE 1"))
    second = s.query(update.format("6"), complete(b"UPDATE 1"))
    third = s.query(update.format("E'7'"), complete(b"UPDATE 1"))
    assert first["subjects"] == {"billing.customers": ["5"]}
    assert second["subjects"] == {"billing.customers": ["6"]}
    assert "subjects" not in third and third["subjects_complete"] is False
    assert first["statement"] == second["statement"] == third["statement"]
    assert "_subject_keys" not in first


def test_audit_only_decisions_have_no_sql_and_do_not_serve_masked_sessions() -> None:
    ctx = context()
    shape = "SELECT name FROM billing.customers WHERE i_customer = {}"
    ctx.analyze(shape.format(1))  # makes the shape
    recorded = ctx.analyze(shape.format(2), audit_only=True)
    assert recorded.action == "rewrite" and recorded.sql is None
    assert recorded.tables == ("billing.customers",)
    masked = ctx.analyze(shape.format(2))
    assert masked.sql is not None and "= 2" in masked.sql


def test_row_descriptions_are_judged_again_under_a_new_context() -> None:
    holder = ContextHolder(context())
    log = StatementLog(holder, lambda fields: None)
    body = row_description(("i_customer", CUSTOMERS, 1, TEXT, 0))[5:]
    assert log._layout(body, None) == ((0, "billing.customers", "text", 0),)
    without_subject = RULES.replace("    subject: i_customer\n", "")
    holder.context = MaskingContext(parse_rules(without_subject, "r", {"K": "k" * 32}), CATALOG)
    assert log._layout(body, None) == ()


def test_an_unmasked_write_reading_the_whole_row_lists_every_personal_column() -> None:
    """`c.f` with f no column of c is f(c): the masked analysis refuses it (a whole-row
    reference in a write), so its walk stopped: every personal column may have been read."""
    s = Session()
    event = s.query(
        "UPDATE billing.customers c SET balance = 0 RETURNING c.row_to_json",
        row_description(("row_to_json", 0, 0, 114, 0)) + data_row(b"{}") + complete(b"UPDATE 1"),
    )
    assert event["analysis_complete"] is False and event["columns_masked"] == []
    assert event["columns_raw"] == [
        f"billing.customers.{c}" for c in ("cc_number", "email", "extra", "login", "name", "phone")
    ]


def test_rows_released_before_completion_are_recorded_first() -> None:
    """A result spanning several reads: once its first rows go out, a `running` event is
    recorded; the complete event carries the same number; `audit who` shows the running
    event only when the complete one is missing."""
    from proxy.cli.audit import who

    s = Session()
    s.filter.client(s.client, m.message(m.QUERY, b"SELECT i_customer FROM billing.customers\0"))
    first = row_description(("i_customer", CUSTOMERS, 1, TEXT, 0)) + data_row(b"1")
    s.filter.server(s.server, first)
    s.filter.statements.rows_released()  # type: ignore[union-attr]
    s.filter.statements.rows_released()  # type: ignore[union-attr]  # once per statement
    assert [e["outcome"] for _, e in s.hook.events] == ["running"]
    s.filter.server(s.server, data_row(b"2") + complete(b"SELECT 2") + ready_for_query())
    (_, running), (_, done) = s.hook.events
    assert running["running"] == done["running"] == 1
    assert running["rows"] is None and running["subjects_complete"] is False
    assert done["subjects"] == {"billing.customers": ["1", "2"]} and done["outcome"] == "ok"

    def as_logged(fields: dict[str, object]) -> dict[str, object]:
        return {"type": "access", "session": "s1", "ts": "2026-01-01T00:00:00Z", **fields}

    both = [as_logged(running), as_logged(done)]
    assert [r["touched"] for r in who(both, "billing.customers", "2", None, None)] == ["yes"]
    assert [r["touched"] for r in who(both[:1], "billing.customers", "2", None, None)] == [
        "possibly"
    ]


# ---- names: the log's picture follows the server's ----------------------------------------------
#
# The server's answers below are what PostgreSQL sends for these requests (each case is run
# against the real server in tests/integration/test_statement_names.py). Requests are sent
# together where it matters: the log then names portals and cursors before any answer, from
# its prediction of what the server does with the requests before them.

READ = "SELECT i_customer, name FROM billing.customers"
# an Execute sent without Describe gets no RowDescription: its subjects are the ones the
# statement names
KEYED = READ + " WHERE i_customer = 1"
IDLE, BLOCK, FAILED = (ready_for_query(s) for s in (m.TX_IDLE, m.TX_IN_BLOCK, m.TX_FAILED))
PARSED, BOUND = m.message(m.PARSE_COMPLETE), m.message(m.BIND_COMPLETE)
CLOSED = m.message(m.CLOSE_COMPLETE)
COPY_IN = m.message(m.COPY_IN_RESPONSE, b"\0\0\0")
KEY_ROW = row_description(("i_customer", CUSTOMERS, 1, TEXT, 0), ("name", CUSTOMERS, 2, TEXT, 0))


def parse(sql: str, name: str = "") -> bytes:
    return m.message(m.PARSE, name.encode() + b"\0" + sql.encode() + b"\0\0\0")


def bind(stmt: str = "", portal: str = "") -> bytes:
    return m.message(m.BIND, portal.encode() + b"\0" + stmt.encode() + b"\0" + b"\0" * 6)


def execute(portal: str = "") -> bytes:
    return m.message(m.EXECUTE, portal.encode() + b"\0" + b"\0" * 4)


def close(kind: str, name: str) -> bytes:
    return m.message(m.CLOSE, kind.encode() + name.encode() + b"\0")


def query(sql: str) -> bytes:
    return m.message(m.QUERY, sql.encode() + b"\0")


def error(code: str) -> bytes:
    return error_response(code, "failed")


SYNC = m.message(m.SYNC)
COPY_DONE = m.message(m.COPY_DONE)


def customer(key: bytes) -> bytes:
    """A result row of READ (no RowDescription: an Execute without Describe gets none)."""
    return data_row(key, b"x")


class Names(Session):
    """A recording filter fed requests and answers as the engine feeds an audited unmasked
    session (its capture masks); `answer` returns the events they made."""

    def __init__(self) -> None:
        super().__init__()
        self.client = MessageScanner(CLIENT_CAPTURE_RECORDED, [0] * 256, 1 << 20)
        self.server = MessageScanner(SERVER_CAPTURE_RECORDED_ROWS, [0] * 256, 1 << 30)

    def send(self, *messages: bytes) -> None:
        self.filter.client(self.client, b"".join(messages))

    def answer(self, *messages: bytes) -> list[dict[str, object]]:
        before = len(self.hook.events)
        data = b"".join(messages)
        assert self.filter.server(self.server, data) == data
        return [fields for _t, fields in self.hook.events[before:]]

    @property
    def lost(self) -> str | None:
        log = self.filter.statements
        assert log is not None
        return log.lost


def read_of(*keys: str) -> dict[str, object]:
    return {"tables": ["billing.customers"], "subjects": {"billing.customers": list(keys)}}


def said(event: dict[str, object]) -> dict[str, object]:
    return {k: event.get(k) for k in ("tables", "subjects")}


def certain(event: dict[str, object]) -> bool:
    return event.get("analysis_complete") is not False and event["subjects_complete"] is True


def test_a_named_portal_ends_with_the_implicit_transaction_of_its_request() -> None:
    """Both requests sent at once: the second Bind of `p` is predicted to succeed (the
    first request's Sync ended its transaction), so its Execute runs the read."""
    s = Names()
    s.send(parse("SELECT 1", "one"), bind("one", "p"), SYNC)
    s.send(parse(KEYED, "read"), bind("read", "p"), execute("p"), SYNC)
    assert s.answer(PARSED, BOUND, IDLE) == []
    (event,) = s.answer(PARSED, BOUND, customer(b"1"), complete(b"SELECT 1"), IDLE)
    assert said(event) == read_of("1") and certain(event)


def test_portals_and_cursors_live_until_the_block_ends() -> None:
    s = Names()
    s.send(query(f"BEGIN; DECLARE c CURSOR FOR {READ}"))
    s.send(parse("SELECT 1", "one"), bind("one", "p"), SYNC)
    s.answer(complete(b"BEGIN"), complete(b"DECLARE CURSOR"), BLOCK, PARSED, BOUND, BLOCK)
    # in the block both names are taken: the server refuses the Bind, the Execute after it
    # is skipped (it would have run the harmless old portal: no event)
    s.send(parse(KEYED, "read"), bind("read", "p"), execute("p"), SYNC)
    assert s.answer(PARSED, error("42P03"), FAILED) == []
    s.send(query("ROLLBACK"))
    s.answer(complete(b"ROLLBACK"), IDLE)
    # the block ended: both names are free, a new DECLARE and Bind take them
    s.send(query("BEGIN; DECLARE c CURSOR FOR SELECT 2"), query("FETCH ALL FROM c"))
    s.send(bind("read", "p"), execute("p"), SYNC)
    events = s.answer(
        complete(b"BEGIN"), complete(b"DECLARE CURSOR"), BLOCK,
        complete(b"FETCH 1"), BLOCK,
        BOUND, customer(b"1"), complete(b"SELECT 1"), BLOCK,
    )  # fmt: skip
    assert [said(e) for e in events] == [read_of("1")] and certain(events[0])


def test_with_hold_cursors_outlive_a_commit_not_a_rollback() -> None:
    s = Names()
    s.send(query(f"BEGIN; DECLARE h CURSOR WITH HOLD FOR {READ}; COMMIT"))
    s.send(query(f"BEGIN; DECLARE g CURSOR WITH HOLD FOR {READ}; ROLLBACK"))
    s.send(query("BEGIN; DECLARE g CURSOR FOR SELECT 1; FETCH ALL FROM g; ROLLBACK"))
    s.send(query("FETCH ALL FROM h"))
    tx = (complete(b"BEGIN"), complete(b"DECLARE CURSOR"))
    events = s.answer(
        *tx, complete(b"COMMIT"), IDLE,
        *tx, complete(b"ROLLBACK"), IDLE,
        *tx, complete(b"FETCH 0"), complete(b"ROLLBACK"), IDLE,  # g was free: no event
        KEY_ROW, data_row(b"3", b"x"), complete(b"FETCH 1"), IDLE,  # h outlived ROLLBACK
    )  # fmt: skip
    assert len(events) == 3  # the two DECLAREs and the FETCH of h: g was free
    assert said(events[2]) == read_of("3") and all(certain(e) for e in events)


def test_commit_of_a_failed_block_rolls_back_its_with_hold_cursors() -> None:
    requests = [
        (query(f"BEGIN; DECLARE h CURSOR WITH HOLD FOR {READ}"),
         complete(b"BEGIN") + complete(b"DECLARE CURSOR") + BLOCK),
        (query("SELECT 1/0"), error("22012") + FAILED),
        (query("COMMIT"), complete(b"ROLLBACK") + IDLE),  # the failed block's COMMIT
        (query("DECLARE h CURSOR WITH HOLD FOR SELECT 1"), complete(b"DECLARE CURSOR") + IDLE),
        (query("FETCH ALL FROM h"), complete(b"FETCH 1") + IDLE),
    ]  # fmt: skip
    # one at a time: the new h is harmless, the FETCH of it is no event
    s = Names()
    events = []
    for request, answer in requests:
        s.send(request)
        events += s.answer(answer)
    assert [str(e["statement"]).split()[0] for e in events] == ["BEGIN"]
    assert all(certain(e) for e in events)
    # all at once: when the FETCH was sent, h was predicted to be the held read (the
    # error was not known yet); the answers refute it: its event does not say it read
    # billing.customers, nor that it did not
    s = Names()
    s.send(*(request for request, _ in requests))
    declare, fetch = s.answer(*(answer for _, answer in requests))
    assert certain(declare) and fetch["statement"] == "FETCH ALL FROM h"
    assert fetch["tables"] == [] and fetch["analysis_complete"] is False


def test_rollback_to_savepoint_drops_what_was_declared_after_it() -> None:
    s = Names()
    s.send(query(f"BEGIN; DECLARE a CURSOR FOR {READ}; SAVEPOINT s"))
    s.send(query("DECLARE b CURSOR FOR SELECT 1; SAVEPOINT t; DECLARE c CURSOR FOR SELECT 2"))
    s.send(query("ROLLBACK TO s"), query(f"DECLARE b CURSOR FOR {READ}"))
    s.send(query("FETCH ALL FROM b"), query("FETCH ALL FROM a"))
    s.send(query(f"SAVEPOINT u; DECLARE d CURSOR FOR {READ}; RELEASE u"))
    s.send(query("FETCH ALL FROM d"), query("COMMIT"))
    fetch = (KEY_ROW, data_row(b"4", b"x"), complete(b"FETCH 1"), BLOCK)
    events = s.answer(
        complete(b"BEGIN"), complete(b"DECLARE CURSOR"), complete(b"SAVEPOINT"), BLOCK,
        complete(b"DECLARE CURSOR"), complete(b"SAVEPOINT"), complete(b"DECLARE CURSOR"), BLOCK,
        complete(b"ROLLBACK"), BLOCK,
        complete(b"DECLARE CURSOR"), BLOCK,  # b was free again
        *fetch, *fetch,
        complete(b"SAVEPOINT"), complete(b"DECLARE CURSOR"), complete(b"RELEASE"), BLOCK,
        *fetch,  # d outlived its released savepoint
        complete(b"COMMIT"), IDLE,
    )  # fmt: skip
    fetches = [e for e in events if str(e["statement"]).startswith("FETCH")]
    assert [said(e) for e in fetches] == [read_of("4")] * 3
    assert all(certain(e) for e in events)


def test_close_all_frees_the_names_of_protocol_portals() -> None:
    s = Names()
    s.send(parse(KEYED, "s1"), SYNC, query("BEGIN"), bind("s1", "p"), SYNC)
    s.send(query("CLOSE ALL"), parse("SELECT 1", "one"), bind("one", "p"), execute("p"), SYNC)
    events = s.answer(
        PARSED, IDLE, complete(b"BEGIN"), BLOCK, BOUND, BLOCK,
        complete(b"CLOSE CURSOR ALL"), BLOCK, PARSED, BOUND, complete(b"SELECT 1"), BLOCK,
    )  # fmt: skip
    assert events == []  # p was free: the harmless statement ran, not the read
    s.send(query("CLOSE ALL"), bind("s1", "p"), execute("p"), SYNC)
    (event,) = s.answer(
        complete(b"CLOSE CURSOR ALL"), BLOCK, BOUND, customer(b"1"), complete(b"SELECT 1"), BLOCK
    )
    assert said(event) == read_of("1") and certain(event)


def test_deallocate_all_and_discard_all_free_the_names_of_statements() -> None:
    for statement, tag in (("DEALLOCATE ALL", b"DEALLOCATE ALL"), ("DISCARD ALL", b"DISCARD ALL")):
        s = Names()
        s.send(parse(KEYED, "s1"), SYNC)
        s.send(query(statement), parse("SELECT 1", "s1"), bind("s1"), execute(), SYNC)
        events = s.answer(PARSED, IDLE, complete(tag), IDLE, PARSED, BOUND, complete(b"SELECT 1"))
        assert events == [] and s.answer(IDLE) == [], statement  # the new s1 ran


def test_deallocate_all_keeps_the_unnamed_statement() -> None:
    s = Names()
    s.send(parse(KEYED), parse("DEALLOCATE ALL", "d"), bind("d"), execute(), bind(), execute())
    s.send(SYNC)
    (event,) = s.answer(
        PARSED, PARSED, BOUND, complete(b"DEALLOCATE ALL"),
        BOUND, customer(b"1"), complete(b"SELECT 1"), IDLE,
    )  # fmt: skip
    assert said(event) == read_of("1") and certain(event)


def test_a_query_and_a_failed_unnamed_parse_drop_the_unnamed_statement() -> None:
    s = Names()
    s.send(parse(READ), SYNC, query("SELECT 1"), bind(), execute(), SYNC)
    s.send(parse(READ), SYNC, parse("SELECT nosuch"), SYNC, bind(), execute(), SYNC)
    events = s.answer(
        PARSED, IDLE, complete(b"SELECT 1"), IDLE, error("26000"), IDLE,
        PARSED, IDLE, error("42703"), IDLE, error("26000"), IDLE,
    )  # fmt: skip
    assert events == []  # no Execute ran: nothing is attributed to the dropped statement


def test_a_multi_statement_query_is_one_implicit_transaction() -> None:
    s = Names()
    s.send(query(f"DECLARE c CURSOR FOR {READ}; FETCH ALL FROM c"))
    s.send(query("BEGIN; DECLARE c CURSOR FOR SELECT 1; FETCH ALL FROM c; COMMIT"))
    events = s.answer(
        complete(b"DECLARE CURSOR"), KEY_ROW, data_row(b"8", b"x"), complete(b"FETCH 1"), IDLE,
        complete(b"BEGIN"), complete(b"DECLARE CURSOR"), complete(b"FETCH 1"),
        complete(b"COMMIT"), IDLE,
    )  # fmt: skip
    assert [said(e) for e in events] == [read_of("8")] and certain(events[0])


def test_prepare_transaction_ends_the_portals_of_its_transaction() -> None:
    s = Names()
    s.send(query(f"BEGIN; DECLARE c CURSOR FOR {READ}; PREPARE TRANSACTION 'x'"))
    s.send(query("BEGIN; DECLARE c CURSOR FOR SELECT 1; FETCH ALL FROM c; COMMIT"))
    events = s.answer(
        complete(b"BEGIN"), complete(b"DECLARE CURSOR"), complete(b"PREPARE TRANSACTION"),
        IDLE,
        complete(b"BEGIN"), complete(b"DECLARE CURSOR"), complete(b"FETCH 1"),
        complete(b"COMMIT"), IDLE,
    )  # fmt: skip
    assert len(events) == 1 and all(certain(e) for e in events)  # the first DECLARE's


def test_call_may_end_its_transaction_and_the_answers_tell() -> None:
    """CALL outside a block may commit: a Bind reusing a portal name bound before it is
    predicted to succeed; if the server refuses it (the procedure did not commit), the old
    portal is still there and its Execute runs it, as the answers show."""
    s = Names()
    s.send(parse(KEYED, "read"), parse("SELECT 1", "one"), parse("CALL p()", "call"), SYNC)
    s.answer(PARSED, PARSED, PARSED, IDLE)
    # committed: p is free, the second Bind takes it
    s.send(bind("one", "p"), bind("call"), execute(), bind("read", "p"), execute("p"), SYNC)
    call, event = s.answer(
        BOUND, BOUND, complete(b"CALL"), BOUND, customer(b"1"), complete(b"SELECT 1"), IDLE
    )
    assert call["kinds"] == ["call"]  # (recorded as code pgveil does not analyse)
    assert said(event) == read_of("1") and certain(event)
    # did not commit: p is still the read, the Bind of it fails, the Execute is skipped:
    # it never ran, nothing is attributed to it
    s.send(bind("read", "p"), bind("call"), execute(), bind("one", "p"), execute("p"), SYNC)
    (call,) = s.answer(BOUND, BOUND, complete(b"CALL"), error("42P03"), IDLE)
    assert call["kinds"] == ["call"]


# ---- COPY FROM STDIN: the Syncs it swallows ------------------------------------------------


def test_a_sync_sent_during_copy_is_swallowed() -> None:
    s = Names()
    s.send(query("COPY public.notes FROM STDIN"))
    assert s.answer(COPY_IN) == []
    s.send(SYNC, m.message(m.COPY_DATA, b"1\n"), COPY_DONE, query(READ))
    events = s.answer(
        complete(b"COPY 1"), IDLE, KEY_ROW, data_row(b"10", b"x"), complete(b"SELECT 1"), IDLE
    )
    assert [said(e) for e in events] == [read_of("10")] and certain(events[0])
    assert s.lost is None


def test_a_copy_that_fails_before_reading_leaves_its_sync_to_the_server() -> None:
    s = Names()
    s.send(parse("COPY public.notes FROM STDIN"), bind(), execute(), SYNC, query(READ))
    events = s.answer(
        PARSED, BOUND, COPY_IN, error("42809"), IDLE,
        KEY_ROW, data_row(b"11", b"x"), complete(b"SELECT 1"), IDLE,
    )  # fmt: skip
    assert [said(e) for e in events] == [read_of("11")] and certain(events[0])


def test_a_copy_that_fails_on_its_data_swallowed_the_syncs_before_the_error() -> None:
    """The answers tell how many of the Syncs sent during the copy it read (none or all
    here): a Sync's only answer is ReadyForQuery."""
    for not_swallowed in (0, 1, 2):
        s = Names()
        s.send(query("COPY public.notes FROM STDIN"))
        s.answer(COPY_IN)
        s.send(SYNC, m.message(m.COPY_DATA, b"x\n"), SYNC, COPY_DONE, query(READ))
        events = s.answer(
            error("22P02"), IDLE, *(IDLE,) * not_swallowed,
            KEY_ROW, data_row(b"12", b"x"), complete(b"SELECT 1"), IDLE,
        )  # fmt: skip
        assert [said(e) for e in events] == [read_of("12")], not_swallowed
        assert certain(events[0]) and s.lost is None


def test_libpq_s_extended_copy_with_a_sync_before_and_after_it() -> None:
    for outcome in (complete(b"COPY 1"), error("22P02")):
        s = Names()
        s.send(parse("COPY public.notes FROM STDIN"), bind(), execute(), SYNC)
        s.answer(PARSED, BOUND, COPY_IN)
        s.send(m.message(m.COPY_DATA, b"1\n"), COPY_DONE, SYNC, query(READ))
        events = s.answer(
            outcome, IDLE, KEY_ROW, data_row(b"13", b"x"), complete(b"SELECT 1"), IDLE
        )
        assert [said(e) for e in events] == [read_of("13")] and certain(events[0])


def test_an_extended_copy_failure_that_no_answer_can_place_loses_the_pairing() -> None:
    """A Sync during the copy, then a Bind and a Sync after CopyDone: a copy that failed on
    its data may have swallowed the first Sync (the server then skipped the Bind) or not.
    Both give the same answers: the pairing is lost, and nothing is attributed."""
    s = Names()
    s.send(parse(KEYED, "read"), SYNC)
    s.answer(PARSED, IDLE)
    s.send(parse("COPY public.notes FROM STDIN"), bind(), execute(), SYNC)
    s.answer(PARSED, BOUND, COPY_IN)
    s.send(m.message(m.COPY_DATA, b"x\n"), COPY_DONE, bind("read"), execute(), SYNC)
    assert s.answer(error("22P02"), IDLE) == []
    assert s.lost is not None
    events = s.answer(BOUND, customer(b"14"), complete(b"SELECT 1"), IDLE)
    assert all(e["tables"] == [] and not certain(e) for e in events)


def test_an_answer_with_nothing_in_flight_loses_the_pairing() -> None:
    s = Names()
    s.answer(complete(b"SELECT 1"))
    assert s.lost is not None


# ---- pipelines: predictions the answers refute --------------------------------------------------


def test_pipelined_requests_after_an_error_are_uncertain_only_where_names_read_otherwise() -> None:
    """Three requests at once. The first fails before its Close of the held cursor `h`:
    the server skips the Close, and the cursor the third request's Execute was predicted
    not to find runs. The second request's Execute reads the same portal as predicted."""
    s = Names()
    s.send(query(f"DECLARE h CURSOR WITH HOLD FOR {READ}"), parse(KEYED, "read"), SYNC)
    s.answer(complete(b"DECLARE CURSOR"), IDLE, PARSED, IDLE)
    s.send(parse("SELECT nosuch"), close("P", "h"), SYNC)
    s.send(bind("read", "p"), execute("p"), SYNC)
    s.send(execute("h"), SYNC)
    events = s.answer(
        error("42703"), IDLE,
        BOUND, customer(b"1"), complete(b"SELECT 1"), IDLE,
        customer(b"16"), complete(b"SELECT 1"), IDLE,
    )  # fmt: skip
    second, third = events
    assert said(second) == read_of("1") and certain(second)
    # sent against a picture the error refuted: what it read cannot be told
    assert third["tables"] == [] and third["analysis_complete"] is False
    assert third["subjects_complete"] is False and "subjects" not in third


def test_a_masked_error_is_judged_against_the_portal_of_its_own_transaction() -> None:
    """The masked filter's scrubbing uses the same pairing (`cause`): the guess spelled in
    a portal of an ended transaction is not the new portal's literal."""
    f = MaskedFilter(context(), "helpdesk")
    client = MessageScanner(capture_mask(b"QPBDESCcf"), [0] * 256, 1 << 20)
    server = MessageScanner(capture_mask(b"ENATSZCIsn123Gt"), [0] * 256, 1 << 30)
    f.client(client, parse("SELECT 'guess' AS g", "g") + bind("g", "p") + SYNC)
    f.client(client, parse("SELECT notes::int FROM billing.customers", "r"))
    f.client(client, bind("r", "p") + execute("p") + SYNC)
    log = f.statements
    assert log is not None
    f.server(server, PARSED + BOUND + IDLE + PARSED + BOUND)
    cause = log.cause(m.ERROR_RESPONSE)
    assert isinstance(cause, Cause) and cause.source.sql.startswith("SELECT notes")


def test_a_pipelined_bind_refuted_by_an_error_leaves_no_unknown_names_behind() -> None:
    """An error skips the Close and the Parse that would have replaced `s`; the Bind
    pipelined behind them was sent against the new `s` and binds the old one: that
    request's event cannot say what it read, but the names are as the answers prove them:
    the next request is recorded for sure."""
    s = Names()
    s.send(parse(KEYED, "s"), SYNC)
    s.answer(PARSED, IDLE)
    s.send(parse("SELECT nosuch", "x"), close("S", "s"), parse("SELECT 1", "s"), SYNC)
    s.send(bind("s", "p"), execute("p"), SYNC)
    s.send(bind("s", "q"), execute("q"), SYNC)
    first, second = s.answer(
        error("42703"), IDLE,
        BOUND, customer(b"1"), complete(b"SELECT 1"), IDLE,
        BOUND, customer(b"1"), complete(b"SELECT 1"), IDLE,
    )  # fmt: skip
    # both were sent against the harmless new `s`: neither can say what it read
    assert first["tables"] == second["tables"] == [] and not certain(first)
    s.send(bind("s", "p"), execute("p"), SYNC)
    (event,) = s.answer(BOUND, customer(b"1"), complete(b"SELECT 1"), IDLE)
    assert said(event) == read_of("1") and certain(event)


# ---- outcomes: rows before an error, values in messages, commits, sessions that end ------


class Counted(Names):
    """As the engine feeds an audited session: DataRows captured only while a statement on
    a table with a subject column is in flight, every row counted through the scanner's
    marks (MessageScanner.marks)."""

    def __init__(self, capture: bytes = b"ESTZCIsn123GN") -> None:
        super().__init__()
        self.server = MessageScanner(capture_mask(capture), [0] * 256, 1 << 30)
        self.server.marks = []

    def answer_in(self, data: bytes, step: int) -> list[dict[str, object]]:
        """The answer cut into reads of `step` bytes; after each, the rows of the read go
        to the statement at the head, as the engine's `_released_rows` does."""
        before = len(self.hook.events)
        log = self.filter.statements
        assert log is not None
        out = b""
        for i in range(0, len(data), step):
            out += self.filter.server(self.server, data[i : i + step])
            log.rows_to(self.server.counts[m.DATA_ROW] + self.server.counts[m.COPY_DATA])
        assert out == data
        return [fields for _t, fields in self.hook.events[before:]]


@pytest.mark.parametrize("step", [7, 64, 100_000])
def test_rows_sent_before_an_error_are_counted_without_being_captured(step: int) -> None:
    s = Counted()
    s.send(m.message(m.QUERY, b"SELECT name FROM billing.customers; SELECT 1\0"))
    answer = (
        row_description(("name", CUSTOMERS, 2, TEXT, 0))
        + b"".join(data_row(b"x") for _ in range(5))
        + error_response("22012", "division by zero")
        + IDLE
    )
    (event,) = s.answer_in(answer, step)
    assert (event["outcome"], event["rows"]) == ("22012", 5), event
    assert event["subjects_complete"] is False and "values_in_messages" not in event


def test_copy_data_before_an_error_and_a_portal_suspended_are_counted() -> None:
    s = Counted()
    s.send(m.message(m.QUERY, b"COPY (SELECT name FROM billing.customers) TO STDOUT\0"))
    s.send(parse("SELECT name FROM billing.customers") + bind() + execute() + SYNC)
    copy_out = m.message(ord("H"), b"\0\0\0")
    copied = b"".join(m.message(m.COPY_DATA, b"x\n") for _ in range(3))
    first, second = s.answer_in(
        copy_out + copied + error_response("22012", "division by zero") + IDLE
        + PARSED + BOUND + data_row(b"x") + data_row(b"y") + m.message(m.PORTAL_SUSPENDED)
        + IDLE,
        11,
    )  # fmt: skip
    assert (first["kinds"], first["outcome"], first["rows"]) == (["copy"], "22012", 3), first
    assert (second["outcome"], second["rows"]) == ("ok", 2), second


def response(typ: int, **fields: str) -> bytes:
    """An ErrorResponse or NoticeResponse with these fields (one-letter codes)."""
    body = b"".join(k.encode() + v.encode() + b"\0" for k, v in fields.items())
    return m.message(typ, body + b"\0")


def test_errors_and_notices_that_may_carry_values() -> None:
    s = Counted()
    e, n = m.ERROR_RESPONSE, m.NOTICE_RESPONSE
    cases = [
        (response(e, S="ERROR", C="22P02", M='invalid input syntax for type integer: "v"'), True),
        (response(e, S="ERROR", C="23505", M="duplicate key", D="Key (email)=(v) exists"), True),
        (response(e, S="ERROR", C="P0001", M="v", W="PL/pgSQL function f() line 1 at RAISE"), True),
        # a value looked up as a name: no data exception, a value all the same
        (response(e, S="ERROR", C="42704", M='unrecognized configuration parameter "v"'), True),
        (response(e, S="ERROR", C="0A000", M='cross-database references ...: "v"'), True),
        # fixed texts
        (response(e, S="ERROR", C="22012", M="division by zero"), False),
        (response(e, S="ERROR", C="57014", M="canceling statement due to user request"), False),
        # raised while the statement's own text was parsed (it has a position in it)
        (response(e, S="ERROR", C="42703", M='column "nosuch" does not exist', P="8"), False),
        (response(e, S="ERROR", C="22P02", M='invalid input syntax ...: "lit"', P="8"), False),
        # notices: a utility command's, a warning with a value, one raised by code
        (response(n, S="NOTICE", C="00000", M='table "t" does not exist, skipping'), False),
        (response(n, S="WARNING", C="01000", M="PID 7 is not a PostgreSQL backend"), True),
        (response(n, S="NOTICE", C="00000", M="v", W="PL/pgSQL function inline_code_block"), True),
    ]
    for message, values in cases:
        s.send(m.message(m.QUERY, b"SELECT name FROM billing.customers\0"))
        if message[0] == n:
            answer = (
                message + row_description(("name", CUSTOMERS, 2, TEXT, 0)) + complete(b"SELECT 0")
            )
        else:
            answer = message
        (event,) = s.answer(answer + IDLE)
        assert event.get("values_in_messages", False) is values, (message, event)
        if values:
            assert event["subjects_complete"] is False


def test_a_commit_inside_a_query_records_the_part_before_it() -> None:
    s = Counted()
    sql = "UPDATE billing.customers SET notes = 'n' WHERE i_customer = 2; COMMIT; SELECT 1/0"
    s.send(m.message(m.QUERY, sql.encode() + b"\0"))
    committed, rest = s.answer(complete(b"UPDATE 1") + complete(b"COMMIT") + error("22012") + IDLE)
    assert (committed["outcome"], committed["rows"], committed["statements"]) == ("ok", 1, [1, 2])
    assert (rest["outcome"], rest["rows"], rest["statements"]) == ("22012", 0, [3, 3])
    # a COMMIT that rolled back (the transaction had failed) commits nothing: one event
    s.send(m.message(m.QUERY, b"UPDATE billing.customers SET notes = 'n'; COMMIT; SELECT 1\0"))
    (event,) = s.answer(complete(b"UPDATE 2") + complete(b"ROLLBACK") + error("22012") + IDLE)
    assert "statements" not in event and event["outcome"] == "22012"
    # the COMMIT last: the Query's own event says it
    s.send(m.message(m.QUERY, b"UPDATE billing.customers SET notes = 'n'; COMMIT\0"))
    (event,) = s.answer(complete(b"UPDATE 2") + complete(b"COMMIT") + IDLE)
    assert "statements" not in event and (event["outcome"], event["rows"]) == ("ok", 2)


def test_statements_in_flight_when_the_session_ends_are_unknown() -> None:
    s = Counted()
    s.send(m.message(m.QUERY, b"UPDATE billing.customers SET notes = 'n' WHERE i_customer = 2\0"))
    s.send(parse(READ) + bind() + execute() + SYNC)
    cte = b"WITH d AS (DELETE FROM billing.customers RETURNING *) SELECT * FROM d\0"
    s.send(m.message(m.QUERY, cte))
    # the UPDATE completed, the read is under way, the last one not begun
    (update,) = s.answer(complete(b"UPDATE 1") + IDLE + PARSED + BOUND + customer(b"1"))
    assert update["outcome"] == "ok"
    log = s.filter.statements
    assert log is not None
    before = len(s.hook.events)
    log.abandon("client closed")
    read, deleted = [fields for _t, fields in s.hook.events[before:]]
    assert (read["outcome"], read["rows"], read["reason"]) == ("unknown", None, "client closed")
    assert "may_have_committed" not in read and read["subjects_complete"] is False
    assert deleted["outcome"] == "unknown" and deleted["may_have_committed"] is True, deleted
    assert not log.in_flight and log.rows_in_flight == 0


def test_a_statement_ended_by_a_fatal_keeps_its_error() -> None:
    s = Counted()
    s.send(m.message(m.QUERY, b"UPDATE billing.customers SET notes = 'n' WHERE i_customer = 2\0"))
    fatal = error_response("57P01", "terminating connection", severity="FATAL")
    assert s.answer(fatal) == []  # (no ReadyForQuery comes after a FATAL)
    log = s.filter.statements
    assert log is not None
    log.abandon("server closed")
    ((_t, event),) = s.hook.events
    assert event["outcome"] == "57P01" and "may_have_committed" not in event, event


def test_an_update_in_flight_names_its_subjects() -> None:
    s = Counted()
    s.send(m.message(m.QUERY, b"UPDATE billing.customers SET notes = 'n' WHERE i_customer = 2\0"))
    log = s.filter.statements
    assert log is not None
    log.abandon("server closed")
    ((_t, event),) = s.hook.events
    assert event["outcome"] == "unknown" and event["may_have_committed"] is True
    assert event["subjects"] == {"billing.customers": ["2"]} and event["subjects_complete"]
