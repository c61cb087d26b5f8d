"""A masked session's prepared executions through the session engine, without sockets or a
database (proxy/session/masked.py): what the server gets for a Query, what the client gets
of the answers, and an outdated statement's Query sent again. The server's side is played
by hand; the integration tests (tests/integration/test_masked_prepared.py) prove the same
against PostgreSQL."""

from __future__ import annotations

from collections.abc import Sequence

from proxy.session.actions import Action, SendToClient, SendToServer
from proxy.session.engine import Session, SessionSettings
from proxy.wire import errors, extended
from proxy.wire import messages as m
from proxy.wire.framing import whole_messages
from proxy.wire.simple import ready_for_query
from proxy.wire.startup import StartupMessage
from rules.context import ContextHolder, MaskingContext
from rules.loader import parse_rules
from tests.unit.rules.fixtures import CATALOG, RULES

STARTUP = StartupMessage(m.PROTOCOL_3_0, {"user": "helpdesk", "database": "db"})
LOGIN = (
    m.message(m.AUTHENTICATION, b"\0\0\0\0")
    + m.message(m.PARAMETER_STATUS, b"client_encoding\0UTF8\0")
    + m.message(m.PARAMETER_STATUS, b"standard_conforming_strings\0on\0")
    + m.message(m.BACKEND_KEY_DATA, b"\0\0\0\1\0\0\0\2")
    + ready_for_query()
)
SQL = "SELECT name, email FROM billing.customers WHERE i_customer = {} LIMIT 20"
RESULT = (
    m.message(
        m.ROW_DESCRIPTION, b"\0\1name\0\0\0\0\0\0\0\0\0\0\0\0\x19\xff\xff\xff\xff\xff\xff\0\0"
    )
    + m.message(m.DATA_ROW, b"\0\1\0\0\0\3Z*r")
    + m.message(m.COMMAND_COMPLETE, b"SELECT 1\0")
)
OUTDATED = errors.error_response("0A000", "cached plan must not change result type")


def _session(prepare: bool = True) -> Session:
    s = Session(SessionSettings(classify=lambda: True, masked_prepare=prepare))
    s.client_data(STARTUP.encode())
    s.upstream_connected()
    s.server_data(LOGIN)
    holder = ContextHolder(MaskingContext(parse_rules(RULES, "r", {"K": "k" * 32}), CATALOG))
    s.login_classified(holder, None, None)
    return s


def _to(kind: type, actions: Sequence[Action]) -> bytes:
    return b"".join(a.data for a in actions if isinstance(a, kind))  # type: ignore[attr-defined]


def _types(data: bytes) -> str:
    return "".join(chr(typ) for typ, _body, _start, _end in whole_messages(data))


def _query(k: int) -> bytes:
    return m.message(m.QUERY, SQL.format(k).encode() + b"\0")


def test_a_query_goes_prepared_once_and_its_answers_are_a_querys() -> None:
    s = _session()
    sent = _to(SendToServer, s.client_data(_query(5)))
    assert _types(sent) == "PBDES"
    (_, body, _, _), *_ = whole_messages(sent)
    name, text, types = extended.parse_message(body)
    assert name.startswith(b"pgveil_prep_") and b"$1" in text and b"$2" in text
    assert extended.declared_types(types) == (23, 23)
    answer = m.message(m.PARSE_COMPLETE) + m.message(m.BIND_COMPLETE) + RESULT
    assert _to(SendToClient, s.server_data(answer + ready_for_query())) == (
        RESULT + ready_for_query()
    )
    # the second use: no Parse; the same statement, the new values
    sent = _to(SendToServer, s.client_data(_query(77)))
    assert _types(sent) == "BDES"
    bind = next(b for t, b, _, _ in whole_messages(sent) if t == m.BIND)
    assert extended.bind_names(bind) == (b"", name)
    assert extended.decode_bind(bind)[3] == [b"77", b"20"]
    received = s.server_data(m.message(m.BIND_COMPLETE) + RESULT + ready_for_query())
    assert _to(SendToClient, received) == RESULT + ready_for_query()
    assert s.pending == 0


def test_off_the_query_goes_as_rewritten_text() -> None:
    s = _session(prepare=False)
    assert _types(_to(SendToServer, s.client_data(_query(5)))) == "Q"


def test_an_outdated_statement_outside_a_block_is_sent_again_as_text() -> None:
    s = _session()
    s.client_data(_query(5))
    s.server_data(
        m.message(m.PARSE_COMPLETE) + m.message(m.BIND_COMPLETE) + RESULT + ready_for_query()
    )
    s.client_data(_query(6))
    actions = s.server_data(OUTDATED + ready_for_query())
    assert _to(SendToClient, actions) == b""  # nothing of it reaches the client
    again = _to(SendToServer, actions)
    assert _types(again) == "Q" and b"i_customer = 6" in again
    assert s.pending == 1  # the Query sent again still waits for its answer
    assert _to(SendToClient, s.server_data(RESULT + ready_for_query())) == (
        RESULT + ready_for_query()
    )
    assert s.pending == 0
    # prepared anew next time (the outdated statement closed first)
    assert _types(_to(SendToServer, s.client_data(_query(7)))) == "CPBDES"


def test_a_statement_gone_from_the_server_is_sent_again_as_text() -> None:
    s = _session()
    s.client_data(_query(5))
    s.server_data(
        m.message(m.PARSE_COMPLETE) + m.message(m.BIND_COMPLETE) + RESULT + ready_for_query()
    )
    s.client_data(_query(6))
    gone = errors.error_response("26000", 'prepared statement "x" does not exist')
    actions = s.server_data(gone + ready_for_query())
    assert _to(SendToClient, actions) == b""
    assert _types(_to(SendToServer, actions)) == "Q"


def test_a_0a000_after_bind_complete_is_the_statements_own_error() -> None:
    """The server refuses an outdated statement in Bind, before BindComplete. The same
    SQLSTATE once the statement runs (`unit "timezone" not supported`, after rows went to
    the client) is its own error: the client gets it, the Query does not run again."""
    s = _session()
    s.client_data(_query(5))
    s.server_data(
        m.message(m.PARSE_COMPLETE) + m.message(m.BIND_COMPLETE) + RESULT + ready_for_query()
    )
    s.client_data(_query(6))
    own = errors.error_response("0A000", 'unit "timezone" not supported for type timestamp')
    rows = RESULT[: -len(m.message(m.COMMAND_COMPLETE, b"SELECT 1\0"))]
    actions = s.server_data(m.message(m.BIND_COMPLETE) + rows + own + ready_for_query())
    assert _to(SendToServer, actions) == b""
    out = _to(SendToClient, actions)
    assert _types(out) == "TDEZ"
    assert s.pending == 0
    # the statement is still the server's: used again without Parse
    assert _types(_to(SendToServer, s.client_data(_query(7)))) == "BDES"


def test_an_outdated_statement_followed_by_more_gets_the_error() -> None:
    s = _session()
    s.client_data(_query(5))
    s.server_data(
        m.message(m.PARSE_COMPLETE) + m.message(m.BIND_COMPLETE) + RESULT + ready_for_query()
    )
    s.client_data(_query(6))
    # the error arrives, then the client sends more before the ReadyForQuery: the Query
    # cannot go again behind it
    assert _to(SendToClient, s.server_data(OUTDATED)) == b""
    s.client_data(m.message(m.QUERY, b"SELECT 1\0"))
    actions = s.server_data(ready_for_query())
    assert _to(SendToServer, actions) == b""
    out = _to(SendToClient, actions)
    assert _types(out) == "EZ"
    fields = errors.decode_fields(
        next(b for t, b, _, _ in whole_messages(out) if t == m.ERROR_RESPONSE)
    )
    assert (fields["C"], fields["M"]) == ("0A000", "cached plan must not change result type")
    assert s.pending == 1  # SELECT 1


def test_a_failed_parse_is_not_counted_on() -> None:
    s = _session()
    s.client_data(_query(5))
    # the Parse fails (say the table's column is gone): not prepared
    failed = errors.error_response("42703", 'column "name" does not exist')
    assert _types(_to(SendToClient, s.server_data(failed + ready_for_query()))) == "EZ"
    assert _types(_to(SendToServer, s.client_data(_query(6)))) == "PBDES"


def test_pipelined_uses_wait_for_the_parse_and_discard_all_forgets() -> None:
    s = _session()
    sent = _to(SendToServer, s.client_data(_query(5) + _query(6)))
    # the second goes as text while the first's Parse is not confirmed
    assert _types(sent) == "PBDESQ"
    s.server_data(
        m.message(m.PARSE_COMPLETE) + m.message(m.BIND_COMPLETE) + RESULT + ready_for_query()
    )
    s.server_data(RESULT + ready_for_query())
    assert _types(_to(SendToServer, s.client_data(_query(7)))) == "BDES"
    s.server_data(m.message(m.BIND_COMPLETE) + RESULT + ready_for_query())
    sent = _to(SendToServer, s.client_data(m.message(m.QUERY, b"DISCARD ALL\0") + _query(8)))
    # prepared anew under a new name, the old one closed (it may survive a failed DISCARD)
    assert _types(sent) == "QCPBDES"


def test_in_a_transaction_block_the_portal_is_closed() -> None:
    s = _session()
    s.client_data(m.message(m.QUERY, b"BEGIN\0"))
    s.server_data(m.message(m.COMMAND_COMPLETE, b"BEGIN\0") + ready_for_query(ord("T")))
    assert _types(_to(SendToServer, s.client_data(_query(5)))) == "PBDECS"
    answer = m.message(m.PARSE_COMPLETE) + m.message(m.BIND_COMPLETE) + RESULT
    answer += m.message(m.CLOSE_COMPLETE) + ready_for_query(ord("T"))
    assert _to(SendToClient, s.server_data(answer)) == RESULT + ready_for_query(ord("T"))
    # a block whose state is not known for sure (a statement in flight): as text
    s.client_data(m.message(m.QUERY, b"SELECT 1\0"))
    assert _types(_to(SendToServer, s.client_data(_query(6)))) == "Q"


def test_an_extended_protocol_client_gets_text() -> None:
    s = _session()
    s.client_data(m.message(m.SYNC))
    s.server_data(ready_for_query())
    assert _types(_to(SendToServer, s.client_data(_query(5)))) == "Q"
