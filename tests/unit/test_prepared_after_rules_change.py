"""What a masked session prepared under one context, used after the context was replaced
(a catalog refresh, a rules reload), without sockets: each use of a statement, portal or
cursor decided under another context is analysed again, and refused (42501, through the
refusal token, so a pipeline keeps its order) when the rules now decide its text otherwise;
it goes on unchanged, and costs nothing more, when they decide it alike."""

from __future__ import annotations

import re
import struct

import pytest

from proxy.session.filters import CLIENT_CAPTURE_MASKED, SERVER_CAPTURE_MASKED
from proxy.session.masked import REFUSAL_TOKEN, RULES_CHANGED, MaskedFilter, SessionEnded
from proxy.wire import messages as m
from proxy.wire.errors import decode_fields, error_response
from proxy.wire.framing import MessageScanner, capture_mask
from proxy.wire.simple import ready_for_query
from rules.context import ContextHolder, MaskingContext
from rules.loader import parse_rules
from tests.unit.rules.fixtures import CATALOG, RULES

KEYS = {"K": "k" * 32}
# rules B: public.notes.body is protected too; rules C: customers.name masked otherwise
NOTES_RULE = "  public.notes:\n    columns:\n      body: partial\n"
RULES_B = RULES + NOTES_RULE
RULES_C = RULES.replace("      name: partial\n", "      name: {mask: partial, keep_last: 3}\n")
NOTES = "SELECT body FROM public.notes WHERE id = $1"
NAMES = "SELECT name FROM billing.customers WHERE i_customer = $1"
SYNC = m.message(m.SYNC)
IN_TX = ord("T")
TOKEN = re.compile(rb"pgveil_refusal_[0-9a-f]{16}")


def context(rules: str = RULES) -> MaskingContext:
    return MaskingContext(parse_rules(rules, "r", KEYS), CATALOG)


class Hook:
    subjects_limit = 100

    def __init__(self) -> None:
        self.events: list[tuple[str, dict[str, object]]] = []

    def ready(self) -> bool:
        return True

    def record(self, event_type: str, fields: dict[str, object]) -> bool:
        self.events.append((event_type, fields))
        return True


class Session:
    """A masked filter with the engine's scanners and a holder whose context the test
    replaces, as the shell does on a catalog refresh or a rules reload."""

    def __init__(self, audited: bool = False) -> None:
        self.holder = ContextHolder(context())
        self.filter = MaskedFilter(self.holder, "helpdesk")
        self.hook = Hook()
        if audited:
            self.filter.attach_audit(self.hook)
        # (the engine's capture masks: the log follows names from CommandComplete too)
        self.client = MessageScanner(CLIENT_CAPTURE_MASKED, [0] * 256, 1 << 20)
        self.server = MessageScanner(SERVER_CAPTURE_MASKED, [0] * 256, 1 << 30)

    def send(self, *messages: bytes) -> bytes:
        return self.filter.client(self.client, b"".join(messages))

    def answer(self, *messages: bytes) -> list[dict[str, str]]:
        """The fields of each error the client gets for the server's messages."""
        out = self.filter.server(self.server, b"".join(messages))
        scanner = MessageScanner(capture_mask(b"E"), [0] * 256, 1 << 30)
        return [decode_fields(body) for typ, body in scanner.feed(out) if typ == m.ERROR_RESPONSE]

    def reload(self, rules: str = RULES) -> None:
        self.holder.context = context(rules)


def parse(sql: str, name: str = "") -> bytes:
    return m.message(m.PARSE, name.encode() + b"\0" + sql.encode() + b"\0\0\0")


def bind(stmt: str = "", portal: str = "", value: bytes = b"1") -> bytes:
    body = portal.encode() + b"\0" + stmt.encode() + b"\0" + b"\0\0" + b"\0\1"
    return m.message(m.BIND, body + struct.pack("!i", len(value)) + value + b"\0\0")


def execute(portal: str = "") -> bytes:
    return m.message(m.EXECUTE, portal.encode() + b"\0\0\0\0\0")


def describe(kind: str, name: str = "") -> bytes:
    return m.message(m.DESCRIBE, kind.encode() + name.encode() + b"\0")


def query(sql: str) -> bytes:
    return m.message(m.QUERY, sql.encode() + b"\0")


def tokens(data: bytes) -> list[str]:
    return [t.decode() for t in TOKEN.findall(data)]


def missing(token: str, what: str = "prepared statement") -> bytes:
    """The server's answer to a message whose name pgveil replaced with a token."""
    return error_response("26000", f'{what} "{token}" does not exist')


def prepared(s: Session, sql: str = NOTES, name: str = "s1") -> bytes:
    out = s.send(parse(sql, name), SYNC)
    assert not tokens(out)
    assert s.answer(m.message(m.PARSE_COMPLETE), ready_for_query()) == []
    return out


def test_a_statement_the_new_rules_protect_is_refused_at_bind() -> None:
    s = Session(audited=True)
    assert prepared(s) == parse(NOTES, "s1") + SYNC  # rules A: sent as it is
    s.reload(RULES_B)
    request = bind("s1") + execute() + SYNC
    out = s.send(request)
    # the Bind names a statement that cannot exist; the Execute behind it is left for the
    # server to skip; nothing of the statement's text is sent
    (token,) = tokens(out)
    assert out[:1] == b"B" and out[5:].startswith(b"\0" + token.encode() + b"\0\0\0\0\1")
    assert out.endswith(execute() + SYNC)
    errors = s.answer(missing(token), ready_for_query())
    assert [(e["C"], e["M"]) for e in errors] == [("42501", f"pgveil: {RULES_CHANGED}")]
    # recorded, with what the statement reads under the new rules
    refused = [f for t, f in s.hook.events if t == "refused"]
    assert len(refused) == 1 and refused[0]["reason"] == RULES_CHANGED
    assert refused[0]["tables"] == ["public.notes"]
    assert refused[0]["statement"] == "SELECT body FROM public . notes WHERE id = $1"
    # prepared again (another name, or the same after Close): rewritten by the new rules
    out = s.send(parse(NOTES, "s2"), bind("s2"), execute(), SYNC)
    assert b"FROM (SELECT" in out and REFUSAL_TOKEN.encode() not in out


def test_the_same_rules_in_a_new_context_go_on_unchanged_and_checked_once() -> None:
    """A catalog refresh that changes nothing: the statement goes on as it was sent; its
    text is analysed again once, then the name is current and a use costs no analysis."""
    s = Session()
    prepared(s, NAMES)
    s.reload()
    request = bind("s1") + execute() + SYNC
    analysed: list[str] = []
    analyse = s.filter._analyse

    def counting(sql: str) -> object:
        analysed.append(sql)
        return analyse(sql)

    s.filter._analyse = counting  # type: ignore[method-assign,assignment]
    assert s.send(request) == request
    assert s.send(request) == request
    assert analysed == [NAMES]
    assert s.filter.counters.refused == 0


def test_another_rewrite_is_refused_too() -> None:
    """The rules mask a column the statement reads otherwise: the old rewrite must not
    run (what it shows is not what the rules say now)."""
    s = Session()
    out = s.send(parse(NAMES, "s1"), SYNC)
    assert b"FROM (SELECT" in out
    s.send(query("BEGIN"), bind("s1", "p1") + SYNC)  # (p1 lives until the block ends)
    s.reload(RULES_C)
    for message in (bind("s1"), execute("p1"), describe("S", "s1"), describe("P", "p1")):
        out = s.send(message)
        assert len(tokens(out)) == 1 and out[:1] == message[:1]
        assert s.send(SYNC) == SYNC


def test_a_portal_opened_under_the_old_rules_is_refused_at_execute() -> None:
    s = Session()
    prepared(s)
    # (in a transaction block: a named portal ends with its transaction)
    assert (
        s.send(query("BEGIN"), bind("s1", "p1"), SYNC) == query("BEGIN") + bind("s1", "p1") + SYNC
    )
    s.answer(m.message(m.COMMAND_COMPLETE, b"BEGIN\0"), ready_for_query(IN_TX))
    s.answer(m.message(m.BIND_COMPLETE), ready_for_query(IN_TX))
    s.reload(RULES_B)
    out = s.send(execute("p1"), SYNC)
    (token,) = tokens(out)
    assert out.startswith(m.message(m.EXECUTE, token.encode() + b"\0\0\0\0\0"))
    errors = s.answer(missing(token, "portal"), ready_for_query(ord("E")))
    assert [e["C"] for e in errors] == ["42501"] and RULES_CHANGED in errors[0]["M"]


def test_describe_of_a_statement_decided_otherwise_is_refused() -> None:
    """Its RowDescription would name a column the rules now protect (which would end the
    session): refused, as its use would be."""
    s = Session()
    prepared(s)
    s.reload(RULES_B)
    out = s.send(describe("S", "s1"), SYNC)
    (token,) = tokens(out)
    assert out == m.message(m.DESCRIBE, b"S" + token.encode() + b"\0") + SYNC
    errors = s.answer(missing(token), ready_for_query())
    assert [e["C"] for e in errors] == ["42501"]


def test_sql_execute_and_fetch_of_what_the_old_rules_allowed_are_refused() -> None:
    s = Session()
    for sql, tag, status in (
        ("PREPARE p AS SELECT body FROM public.notes", b"PREPARE", m.TX_IDLE),
        ("BEGIN", b"BEGIN", IN_TX),
        ("DECLARE c CURSOR FOR SELECT body FROM public.notes", b"DECLARE CURSOR", IN_TX),
    ):
        assert s.send(query(sql)) == query(sql)
        answer = (m.message(m.COMMAND_COMPLETE, tag + b"\0"), ready_for_query(status))
        assert s.answer(*answer) == []
    s.reload(RULES_B)
    for sql in ("EXECUTE p", "FETCH 1 FROM c", "CREATE TEMP TABLE t AS EXECUTE p"):
        out = s.send(query(sql))
        (token,) = tokens(out)
        assert out == m.message(m.QUERY, token.encode() + b"\0")
        syntax = error_response("42601", f'syntax error at "{token}"')
        errors = s.answer(syntax, ready_for_query(ord("E")))
        assert errors[0]["M"] == f"pgveil: {RULES_CHANGED}"
    # MOVE reads no rows but counts them: refused too
    assert tokens(s.send(query("MOVE ALL IN c")))
    # prepared again, the statement is rewritten
    out = s.send(query("DEALLOCATE p; PREPARE p AS SELECT body FROM public.notes"))
    assert b"FROM (SELECT" in out
    assert s.send(query("EXECUTE p")) == query("EXECUTE p")


def test_sql_execute_after_a_refresh_that_changes_nothing() -> None:
    s = Session()
    sql = "PREPARE p AS SELECT name FROM billing.customers; EXECUTE p"
    out = s.send(query(sql))
    assert b"FROM (SELECT" in out
    s.reload()
    # the name's text uses the name itself: checked once, not refused
    assert s.send(query("EXECUTE p")) == query("EXECUTE p")
    assert s.filter.counters.refused == 0


def test_a_protocol_statement_that_runs_sql_execute_is_checked_through_it() -> None:
    s = Session()
    assert s.send(query("PREPARE p AS SELECT body FROM public.notes")).startswith(b"Q")
    prepared(s, "EXECUTE p", "runs_p")
    s.reload(RULES_B)
    assert len(tokens(s.send(bind("runs_p")))) == 1
    s.send(SYNC)
    # the same under rules that decide p alike: it runs
    s.reload()
    assert s.send(bind("runs_p"), SYNC) == bind("runs_p") + SYNC


def test_pipelined_uses_keep_their_order() -> None:
    """A refused use and a good one in one pipeline: each answer goes to its request."""
    s = Session()
    prepared(s, NOTES, "stale")
    s.reload(RULES_B)
    prepared_out = s.send(parse(NAMES, "fresh"))
    assert b"FROM (SELECT" in prepared_out
    out = s.send(bind("stale"), execute(), SYNC, bind("fresh"), execute(), SYNC)
    (token,) = tokens(out)
    assert out.endswith(execute() + SYNC + bind("fresh") + execute() + SYNC)
    errors = s.answer(
        m.message(m.PARSE_COMPLETE),
        missing(token),
        ready_for_query(),
        m.message(m.BIND_COMPLETE),
        m.message(m.DATA_ROW, b"\0\1\0\0\0\3Z*r"),
        m.message(m.COMMAND_COMPLETE, b"SELECT 1\0"),
        ready_for_query(),
    )
    assert [e["C"] for e in errors] == ["42501"]


def test_refused_and_unreadable_statements_never_run() -> None:
    """A statement pgveil refused never reached the server (it got one that fails): a use
    of its name is the server's to answer, under any rules; nothing is sent for it."""
    s = Session()
    refused = "SELECT * FROM billing.leak()"  # not allowed until the reload allows it
    out = s.send(parse(refused, "r1"))
    assert tokens(out) and refused.encode() not in out
    bad = m.message(m.PARSE, b"u1\0SELECT '\xff'\0\0\0")
    assert tokens(s.send(bad))
    s.reload(
        RULES.replace(
            "allow: [billing.invoice_total]", "allow: [billing.invoice_total, billing.leak]"
        )
    )
    for name in ("r1", "u1"):
        out = s.send(bind(name))
        assert out == bind(name)  # the server's error: no such statement
        assert refused.encode() not in out


def test_a_name_that_may_hold_either_text_is_checked_for_both() -> None:
    """The log keeps a cursor its transaction closed: a DECLARE of the name again may
    replace it (the server no longer has it) or fail (42P03, the old one stays). Until the
    server answers, and when it fails, both texts are checked once the context changes;
    when it succeeds, the new one is in place."""
    ok = [
        m.message(m.COMMAND_COMPLETE, b"DECLARE CURSOR\0"),
        ready_for_query(IN_TX),
    ]
    duplicate = [
        error_response("42P03", 'cursor "c" already exists'),
        ready_for_query(ord("E")),
    ]
    for answer, refused in ((ok, False), (duplicate, True)):
        s = Session()
        s.send(query("BEGIN"), query("DECLARE c CURSOR FOR SELECT body FROM public.notes"))
        s.send(query("COMMIT"), query("BEGIN"))
        for _ in range(4):  # each query done
            s.answer(m.message(m.COMMAND_COMPLETE, b"X\0"), ready_for_query(IN_TX))
        s.send(query("DECLARE c CURSOR FOR SELECT i_customer FROM billing.customers"))
        s.answer(*answer)
        s.reload(RULES_B)
        assert bool(tokens(s.send(query("FETCH c")))) is refused


def test_a_named_portal_bound_again_is_the_new_one_once_bound() -> None:
    s = Session()
    prepared(s, NOTES, "old")
    prepared(s, "SELECT 1", "new")
    s.send(query("BEGIN"), bind("old", "p"), SYNC)
    s.answer(m.message(m.COMMAND_COMPLETE, b"BEGIN\0"), ready_for_query(IN_TX))
    s.answer(m.message(m.BIND_COMPLETE), ready_for_query(IN_TX))
    s.send(query("COMMIT"), bind("new", "p"), SYNC)  # the server closed p at COMMIT
    s.answer(m.message(m.COMMAND_COMPLETE, b"COMMIT\0"), ready_for_query())
    s.answer(m.message(m.BIND_COMPLETE), ready_for_query(IN_TX))
    s.reload(RULES_B)
    assert s.send(execute("p"), SYNC) == execute("p") + SYNC


def test_many_texts_under_one_name_are_told_apart_by_the_prediction() -> None:
    """Twelve DECLAREs of one WITH HOLD cursor in flight: the server keeps the first (it
    refuses the others, 42P03), and the log predicts so; a FETCH after the context changed
    is checked against that text, whatever the others read."""
    first_reads_notes = ["SELECT body FROM public.notes"] + ["SELECT 1"] * 11
    others_read_notes = ["SELECT 1"] + ["SELECT body FROM public.notes"] * 11
    for texts, refused in ((first_reads_notes, True), (others_read_notes, False)):
        s = Session()
        for text in texts:
            s.send(query(f"DECLARE c CURSOR WITH HOLD FOR {text}"))
        named = s.filter.statements.entry("portal:c") if s.filter.statements else None
        assert named is not None and named.decided is not None
        assert named.decided.sql == f"DECLARE c CURSOR WITH HOLD FOR {texts[0]}"
        assert s.send(query("FETCH c")) == query("FETCH c")  # the same context: as it was
        s.reload(RULES_B)
        assert bool(tokens(s.send(query("FETCH c")))) is refused


def test_a_use_checked_against_a_refuted_prediction_is_checked_again() -> None:
    """The FETCH was checked against the cursor the prediction named when it was sent;
    the answers refute it (the first DECLARE failed: a WITH HOLD cursor's query runs at its
    commit), and the second DECLARE, decided under the old rules, is what it reads. That
    text is checked when the answers tell: if the rules now decide it otherwise, the session
    ends before the FETCH's answers reach the client; if alike, it goes on."""
    for second, ends in (("SELECT body FROM public.notes", True), ("SELECT 2", False)):
        s = Session()
        s.send(query("DECLARE c CURSOR WITH HOLD FOR SELECT 1/0"))
        s.send(query(f"DECLARE c CURSOR WITH HOLD FOR {second}"))
        s.reload(RULES_B)
        assert s.send(query("FETCH c")) == query("FETCH c")  # SELECT 1/0: decided alike
        failed = (error_response("22012", "division by zero"), ready_for_query())
        if ends:
            with pytest.raises(SessionEnded, match="no longer apply"):
                s.answer(*failed)
        else:
            assert [e["C"] for e in s.answer(*failed)] == ["22012"]
            log = s.filter.statements
            assert log is not None and log.refuted is None


def test_names_unknown_to_the_log_are_the_servers_to_answer() -> None:
    """A cursor an allow-listed function opened (a refcursor): pgveil has no text for it;
    the server answers its FETCH. (A Bind or Execute of a name the log does not hold is
    refused once the context was replaced: tests/unit/test_names_whitebox.py.)"""
    s = Session()
    s.reload(RULES_B)
    assert s.send(query('FETCH ALL FROM "<unnamed portal 1>"')).startswith(b"Q\0")
