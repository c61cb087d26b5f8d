"""Reading statements as the server reads them, without a server: what statements do to
client_encoding and standard_conforming_strings (rules.settings), reading bytes under a
`Reading` (proxy/session/reading.py), the prediction of what each message is read under,
and the statement log's check of it against the server's reports. The integration corpus
(tests/integration/test_audit_evasion_reading.py) proves the same against PostgreSQL."""

from __future__ import annotations

import pytest
from pglast import parse_sql

from proxy.session.reading import (
    BACKSLASH,
    ENCODING,
    Reading,
    ReadingTracker,
    nonconforming_text,
    sensitivity,
    statement_text,
)
from proxy.wire import messages as m
from proxy.wire.simple import ready_for_query
from rules.settings import (
    CODE,
    boolean,
    encoding_name,
    keeps_pinned,
    pinned_value,
    set_config_keeps_pinned,
    settings_of,
)
from tests.unit.test_statement_log import CUSTOMERS, TEXT, Session, complete, data_row
from tests.unit.test_statement_log import row_description as described

HIDE = r"SELECT 'a\', ' AS x, (SELECT name FROM billing.customers LIMIT 1) AS y --'"
SCS = "standard_conforming_strings"
CE = "client_encoding"


# ---- what statements do to the settings -----------------------------------------------------


@pytest.mark.parametrize(
    ("sql", "ops"),
    [
        ("SET standard_conforming_strings = off", [("set", SCS, "off")]),
        ("SET LOCAL standard_conforming_strings TO true", [("local", SCS, "on")]),
        ('SET "STANDARD_conforming_strings" = 0', [("set", SCS, "off")]),
        ("SET standard_conforming_strings = 'o'", [("set", SCS, "")]),  # refused: ambiguous
        ("SET standard_conforming_strings TO DEFAULT", [("set", SCS, "DEFAULT")]),
        ("RESET standard_conforming_strings", [("set", SCS, "DEFAULT")]),
        ("SET standard_conforming_strings FROM CURRENT", []),
        ("SET client_encoding TO 'Shift-JIS'", [("set", CE, "SJIS")]),
        ("SET NAMES 'win950'", [("set", CE, "BIG5")]),
        ("SET client_encoding = unicode", [("set", CE, "UTF8")]),
        ("SET client_encoding = 'no such encoding'", [("set", CE, "")]),
        ("RESET ALL", [("reset_all", "", "")]),
        ("DISCARD ALL", [("reset_all", "", "")]),
        ("DISCARD PLANS", []),
        ("SET search_path = public", []),
        ("SHOW standard_conforming_strings", []),
        ("PREPARE p AS SELECT 1; DEALLOCATE p; LISTEN c; NOTIFY c", []),
        ("CLOSE c", [CODE]),
        (
            "BEGIN; SAVEPOINT a; RELEASE a; ROLLBACK TO a; ROLLBACK",
            [
                ("begin", "", ""),
                ("savepoint", "a", ""),
                ("release", "a", ""),
                ("rollback_to", "a", ""),
                ("rollback", "", ""),
            ],
        ),
        ("COMMIT AND CHAIN", [CODE, ("commit", "", ""), ("begin", "", "")]),
        ("SELECT 1", [CODE]),
        ("INSERT INTO t VALUES (1)", [CODE]),
        (
            "SELECT set_config('standard_conforming_strings', 'off', false), "
            "pg_catalog.set_config('client_encoding', 'big5', true)",
            [CODE, ("set", SCS, "off"), ("local", CE, "BIG5")],
        ),
        (
            "SELECT set_config('standard_conforming_strings', x, false) FROM t",
            [CODE, ("set", SCS, "")],
        ),
        ("SELECT set_config('search_path', 'x', false)", [CODE]),
        ("SELECT my.set_config('standard_conforming_strings', 'off', false)", [CODE]),
    ],
)
def test_settings_of_statements(sql: str, ops: list[tuple[str, str, str]]) -> None:
    assert list(settings_of(parse_sql(sql), sql)) == ops


def test_encoding_names_and_booleans_as_the_server_reads_them() -> None:
    assert encoding_name("ISO-8859-1") == encoding_name("latin1") == "LATIN1"
    assert encoding_name("MS_Kanji") == encoding_name("WINDOWS932") == "SJIS"
    assert encoding_name("UTF-16") == ""
    assert [boolean(v) for v in ("t", "TRU", "yes", "1", "on", "of", "No", "0", "o", " on")] == [
        "on", "on", "on", "on", "on", "off", "off", "off", "", "",
    ]  # fmt: skip


@pytest.mark.parametrize(
    ("sql", "keeps"),
    [
        ("set client_encoding to 'UTF8'", True),
        ("SET NAMES 'utf-8'", True),
        ("SET client_encoding = unicode", True),
        ("SET LOCAL client_encoding TO 'U_T_F_8'", True),  # only letters and digits count
        ("SET client_encoding TO DEFAULT", True),  # the login's value, checked at login
        ("RESET client_encoding", True),
        ("SET client_encoding FROM CURRENT", True),
        ("SET client_encoding = 'LATIN1'", False),
        ("SET client_encoding = 'UTF8', 'UTF8'", False),  # the server refuses it anyway
        ("SET client_encoding = 8", False),
        ("SET standard_conforming_strings = on", True),
        ("SET standard_conforming_strings = TRUE", True),
        ("SET standard_conforming_strings = 1", True),
        ("SET standard_conforming_strings = 'y'", True),
        ("SET standard_conforming_strings = 1.0", False),
        ("SET standard_conforming_strings = 'o'", False),  # ambiguous: the server refuses it
        ("SET standard_conforming_strings = off", False),
        ("RESET standard_conforming_strings", True),
        ("SET backslash_quote = SAFE_ENCODING", True),
        ("SET backslash_quote = on", False),  # reads alike in UTF8, but is not the pinned value
        ("SET backslash_quote TO DEFAULT", False),  # not reported: its login value is unknown
        ("SET backslash_quote FROM CURRENT", True),
        ("SET search_path = public", False),  # not pinned: not this guard's to judge
    ],
)
def test_a_set_that_keeps_the_pinned_value(sql: str, keeps: bool) -> None:
    node = parse_sql(sql)[0].stmt
    assert keeps_pinned(node.name.lower(), node) is keeps


@pytest.mark.parametrize(
    ("sql", "keeps"),
    [
        ("SELECT set_config('client_encoding', 'utf8', false)", True),
        ("SELECT set_config('client_encoding', 'utf8', random() > 0.5)", True),  # either scope
        ("SELECT set_config('client_encoding', NULL, true)", True),  # (RESET)
        ("SELECT set_config('backslash_quote', NULL, true)", False),
        ("SELECT set_config('standard_conforming_strings', 'on', false)", True),
        ("SELECT set_config('standard_conforming_strings', 'o' || 'n', false)", False),
        ("SELECT set_config('standard_conforming_strings', 'on')", False),
        ("SELECT set_config('client_encoding', 'SJIS', false)", False),
    ],
)
def test_a_set_config_that_keeps_the_pinned_value(sql: str, keeps: bool) -> None:
    call = parse_sql(sql)[0].stmt.targetList[0].val
    setting = call.args[0].val.sval.lower()
    assert set_config_keeps_pinned(setting, call.args) is keeps


def test_pinned_values_as_the_server_reads_them() -> None:
    assert pinned_value(CE, "Unicode") == "UTF8"
    assert pinned_value(SCS, "YES") == "on"
    assert pinned_value("backslash_quote", "Safe_Encoding") == "safe_encoding"
    assert pinned_value("backslash_quote", "safe encoding") == ""


def test_a_set_of_the_value_the_setting_has_leaves_the_reading_settled() -> None:
    """No event is uncertain for a SET that changes nothing: within an extended-protocol
    request, what follows it is read under the values it began with, for sure."""
    t = tracker()
    for sql in ("SET client_encoding TO 'UTF8'", "SET standard_conforming_strings = on"):
        t.bind(ops(sql))
        t.execute(ops(sql))
        assert t.settled(BACKSLASH | ENCODING) and t.now() == Reading()
    t.sync()
    assert t.base == Reading()


# ---- bytes read under a Reading -------------------------------------------------------------


def test_sensitivity() -> None:
    assert sensitivity(b"SELECT 1") == 0
    assert sensitivity(b"SELECT 'a\\b'") == BACKSLASH
    assert sensitivity("SELECT 'é'".encode()) == ENCODING
    assert sensitivity(b"SELECT '\x95\\'") == ENCODING | BACKSLASH


def test_statement_text_decodes_as_the_server_converts() -> None:
    hidden = b"SELECT E'\xe4\xb8\x81\\', (SELECT name FROM t) --'"
    # UTF-8: the backslash escapes the quote; SJIS: it is the second byte of a character
    assert statement_text(hidden, Reading()) == hidden.decode()
    sjis = statement_text(hidden, Reading("SJIS"))
    assert sjis is not None and "\\" not in sjis and "(SELECT name FROM t)" in sjis
    # 0x5C alone is a backslash for the server, a yen sign for Python's shift_jis_2004
    assert statement_text(b"SELECT E'\\\\'", Reading("SHIFT_JIS_2004")) == "SELECT E'\\\\'"
    # ... and 0x81 0x5F a backslash for both (a character that reads as ASCII: not read)
    assert statement_text(b"SELECT E'\x81\x5f'", Reading("SHIFT_JIS_2004")) is None
    # a lead byte whose second byte is the quote: the server takes both (and refuses them)
    assert statement_text(b"SELECT '\xa0'", Reading("SJIS")) is None
    assert statement_text(b"SELECT '\xff'", Reading()) is None
    # no conversion when the client says SQL_ASCII: the bytes are the server's UTF-8
    assert statement_text("SELECT 'é'".encode(), Reading("SQL_ASCII")) == "SELECT 'é'"
    assert statement_text(b"SELECT '\xe9'", Reading("SQL_ASCII")) is None
    # ... nor when the server's encoding is SQL_ASCII (its catalog's names read as UTF-8)
    assert (
        statement_text("SELECT 'é'".encode("latin-1"), Reading("LATIN1", True, "SQL_ASCII")) is None
    )
    assert statement_text(b"SELECT '\xa4\xa1'", Reading("EUC_TW")) is None  # no decoder
    assert statement_text(b"SELECT 1", Reading("EUC_TW", None)) == "SELECT 1"  # ASCII: any
    assert statement_text(b"SELECT '\\'", Reading(conforming=None)) is None
    assert statement_text(b"SELECT '\\'", Reading("", True)) == "SELECT '\\'"


@pytest.mark.parametrize(
    ("sql", "read"),
    [
        ("SELECT 'plain', $$a\\'$$, 1", "SELECT 'plain', $$a\\'$$, 1"),
        (HIDE, HIDE.replace("SELECT '", "SELECT  E'", 1)),
        ("SELECT N'a\\'b'", "SELECT NCHAR E'a\\'b'"),
        ("SELECT E'a\\'b', 'c\\\\d'", "SELECT E'a\\'b',  E'c\\\\d'"),
        ("SELECT 'a\\b'\n  'c\\'d'", "SELECT  E'a\\b'\n  'c\\'d'"),  # one string, continued
        ("SELECT B'01', X'1f', 'q\\'q'", "SELECT B'01', X'1f',  E'q\\'q'"),
        ("SELECT x'\\'", "SELECT x'\\'"),  # a bit string: no escapes
        (
            "/* 'a\\' /* */ */ SELECT -- 'b\\'\n 'c\\d'",
            "/* 'a\\' /* */ */ SELECT -- 'b\\'\n  E'c\\d'",
        ),
        ("SELECT \"x'\\\" 'y\\z'", "SELECT \"x'\\\"  E'y\\z'"),
        ("SELECT fooN'a\\b', e$'c\\d'", "SELECT fooN E'a\\b', e$ E'c\\d'"),
        ("SELECT 1 -- \\", "SELECT 1 -- \\"),
        ("SELECT U&'d' || 'x\\y'", None),  # the server refuses U&'' with the setting off
        ("SELECT 'unterminated\\'", None),
        ("SELECT 1x, 'a\\b'", None),  # trailing junk after a number: refused
        ("SELECT $q$ never closed, 'a\\b'", None),
    ],
)
def test_nonconforming_text(sql: str, read: str | None) -> None:
    assert nonconforming_text(sql) == read
    if read is not None:
        assert statement_text(sql.encode(), Reading(conforming=False)) == read


# ---- the prediction -----------------------------------------------------------------------


def tracker(**reported: str) -> ReadingTracker:
    return ReadingTracker({CE: "UTF8", SCS: "on", "server_encoding": "UTF8", **reported})


def ops(sql: str) -> tuple[tuple[str, str, str], ...]:
    return settings_of(parse_sql(sql), sql)


def test_the_login_values_are_the_reset_values() -> None:
    t = tracker(**{SCS: "off", CE: "UNICODE"})
    assert t.now() == Reading("UTF8", False) and t.base_exact
    t.query(ops("SET standard_conforming_strings = on; SET client_encoding = 'SJIS'"))
    assert t.now() == Reading("SJIS", True) and not t.base_exact
    t.query(ops("RESET ALL"))
    assert t.now() == Reading("UTF8", False)


def test_transactions_undo_what_they_set() -> None:
    t = tracker()
    t.query(ops("BEGIN"))
    t.query(ops("SET LOCAL standard_conforming_strings = off"))
    assert t.now().conforming is False
    t.query(ops("COMMIT"))
    assert t.now().conforming is True  # SET LOCAL ends with its transaction
    t.query(ops("BEGIN; SET standard_conforming_strings = off; SAVEPOINT s"))
    t.query(ops("SET client_encoding = 'BIG5'"))
    assert t.now() == Reading("BIG5", False)
    t.query(ops("ROLLBACK TO s"))
    assert t.now() == Reading("UTF8", False)
    t.query(ops("ROLLBACK"))
    assert t.now() == Reading()  # a SET in a transaction that rolls back is undone
    t.query(ops("SET standard_conforming_strings = off; BEGIN; RESET ALL; COMMIT"))
    assert t.now() == Reading()


def test_code_makes_a_setting_unknown_within_a_request_until_a_set() -> None:
    t = tracker()
    t.execute(ops("SET standard_conforming_strings = off"))
    assert t.settled(BACKSLASH | ENCODING) and t.now().conforming is False
    t.bind(ops("SELECT 1"))  # binding plans: code may run
    assert not t.settled(BACKSLASH) and not t.settled(ENCODING) and t.settled(0)
    t.execute(ops("SET standard_conforming_strings = on"))
    assert t.settled(BACKSLASH) and not t.settled(ENCODING)
    t.execute(None)  # a portal pgveil does not know
    assert not t.settled(BACKSLASH)
    t.sync()
    assert t.settled(BACKSLASH | ENCODING) and not t.base_exact


def test_the_report_starts_the_prediction_again() -> None:
    t = tracker()
    t.query(ops("SELECT public.sets_it_off()"))  # code: predicted to change nothing
    assert t.base == Reading() and not t.base_exact
    t.execute(ops("SET client_encoding = 'GBK'"))  # in the next request, not yet answered
    t.reported(SCS, "off")
    t.confirm(ord("I"))
    assert t.base_exact and t.base == Reading("UTF8", False)
    assert t.now() == Reading("GBK", False)  # what was set since the report stays


# ---- the statement log checks the prediction ------------------------------------------------


def session() -> Session:
    s = Session()
    s.filter.login_parameters({CE: "UTF8", SCS: "on", "server_encoding": "UTF8"})
    return s


CUSTOMER_ROW = described(("y", CUSTOMERS, 2, TEXT, 0)) + data_row(b"x") + complete(b"SELECT 1")
READY = ready_for_query()


def query(sql: str) -> bytes:
    return m.message(m.QUERY, sql.encode() + b"\0")


def parse_bind_execute(sql: str) -> bytes:
    return (
        m.message(m.PARSE, b"\0" + sql.encode() + b"\0\0\0")
        + m.message(m.BIND, b"\0\0\0\0\0\0\0\0")
        + m.message(m.EXECUTE, b"\0\0\0\0\0")
    )


def status(name: str, value: str) -> bytes:
    return m.message(m.PARAMETER_STATUS, name.encode() + b"\0" + value.encode() + b"\0")


def test_a_set_pipelined_with_the_next_query_is_predicted() -> None:
    s = session()
    s.filter.client(s.client, query("SET standard_conforming_strings = off") + query(HIDE))
    s.filter.server(s.server, complete(b"SET") + status(SCS, "off") + READY)
    s.filter.server(s.server, CUSTOMER_ROW + READY)
    (_, event), *more = s.hook.events
    assert not more and event["tables"] == ["billing.customers"]
    assert event["analysis_complete"] is True


def test_a_query_read_before_an_unforeseen_change_was_reported_is_not_read_for_sure() -> None:
    s = session()
    s.filter.client(s.client, query("SELECT public.f()") + query(HIDE))
    s.filter.server(s.server, complete(b"SELECT 1") + status(SCS, "off") + READY)
    s.filter.server(s.server, CUSTOMER_ROW + READY)
    events = [e for _, e in s.hook.events]
    assert events[-1]["analysis_complete"] is False and events[-1]["tables"] == []


def test_a_parse_after_code_in_the_same_request_is_not_read_for_sure() -> None:
    s = session()
    s.filter.client(
        s.client,
        parse_bind_execute("SELECT 1") + parse_bind_execute(HIDE) + m.message(m.SYNC),
    )
    s.filter.server(s.server, b"".join(m.message(t) for t in b"12") + complete(b"SELECT 1"))
    s.filter.server(s.server, b"".join(m.message(t) for t in b"12") + CUSTOMER_ROW + READY)
    ((_, event),) = s.hook.events
    assert event["analysis_complete"] is False and event["tables"] == []


def test_a_misread_parse_makes_its_portals_uncertain() -> None:
    """Parse sent pipelined behind code that turned the setting off: the report says so
    before the ParseComplete; the Execute already sent and a later one are not attributed
    to the reading the Parse was analysed under."""
    s = session()
    named = m.message(m.PARSE, b"s\0" + HIDE.encode() + b"\0\0\0")
    bind = m.message(m.BIND, b"p\0s\0\0\0\0\0\0\0")
    execute = m.message(m.EXECUTE, b"p\0\0\0\0\0")
    s.filter.client(s.client, query("SELECT public.f()") + named + bind + execute)
    s.filter.server(s.server, complete(b"SELECT 1") + status(SCS, "off") + READY)
    again = m.message(m.BIND, b"q\0s\0\0\0\0\0\0\0") + m.message(m.EXECUTE, b"q\0\0\0\0\0")
    s.filter.client(s.client, m.message(m.SYNC) + again + m.message(m.SYNC))
    answer = m.message(ord("1")) + m.message(ord("2")) + CUSTOMER_ROW + READY
    s.filter.server(s.server, answer + m.message(ord("2")) + CUSTOMER_ROW + READY)
    # (the function's own event: it is not allow-listed, so not analysed completely)
    function, first, second = (e for _, e in s.hook.events)
    assert function["statement"] == "SELECT public . f ( )"
    for event in (first, second):
        assert event["analysis_complete"] is False and event["tables"] == []


@pytest.mark.parametrize(
    ("text", "mark"),
    [
        ("SELECT N E'a\\b'", 9),  # N'...' in the server's text: NCHAR, not an identifier
        ("SELECT e E'a\\b'", 9),  # E'...': already an escape string
        ("SELECT X E'a\\b'", 9),  # X'...': a bit string
        ("SELECT U& E'a\\b'", 10),  # U&'...'
        ("SELECT 'a'\n E'b\\c'", 12),  # the quote continued the string before it
        ("SELECT /* E'a\\b' */ 1", 10),  # not a token where the E was put
        ("SELECT  E'a\\b', 'c\\d'", 8),  # a plain string with a backslash is left
    ],
)
def test_the_check_refuses_a_rewriting_the_server_reads_otherwise(text: str, mark: int) -> None:
    """nonconforming_text's rewriting is checked with pgveil's lexer: whatever proposed it,
    an E put where the server's text would not have begun a plain string fails."""
    from proxy.session.reading import _reads_alike

    assert text[mark : mark + 2] == "E'"
    assert not _reads_alike(text, [(mark, False)])
    assert _reads_alike("SELECT  E'a\\b'", [(8, False)])
