"""The statement log and the recording filter without sockets: the fast paths that audited
sessions take (DataRows in batches, subject keys decoded once per result set, audit fields
per statement shape, RowDescriptions remembered per context)."""

from __future__ import annotations

import struct

from proxy.session.masked import RecordingFilter
from proxy.session.statements import StatementLog
from proxy.wire import messages as m
from proxy.wire.framing import MessageScanner, capture_mask
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
        assert self.filter.server(self.server, answer + m.ready_for_query()) == (
            answer + m.ready_for_query()
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
        + m.ready_for_query()
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
    assert log._layout(body, None) == ((0, "billing.customers", TEXT, 0),)
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
    from proxy.audit_cli import who

    s = Session()
    s.filter.client(s.client, m.message(m.QUERY, b"SELECT i_customer FROM billing.customers\0"))
    first = row_description(("i_customer", CUSTOMERS, 1, TEXT, 0)) + data_row(b"1")
    s.filter.server(s.server, first)
    s.filter.statements.rows_released()  # type: ignore[union-attr]
    s.filter.statements.rows_released()  # type: ignore[union-attr]  # once per statement
    assert [e["outcome"] for _, e in s.hook.events] == ["running"]
    s.filter.server(s.server, data_row(b"2") + complete(b"SELECT 2") + m.ready_for_query())
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
