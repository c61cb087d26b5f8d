"""A statement nested deeper than the analyser's walk can follow (the server's own limit is
higher): a masked session gets 42501 naming the reason; an unmasked session's bytes go to
the server unchanged and the access is recorded as not analysed (before, the walk's
RecursionError closed the session, masked or not)."""

from __future__ import annotations

import re

from proxy.session.engine import JUST_FORWARD, SendToClient, SendToServer
from proxy.wire import messages as m
from proxy.wire.errors import decode_fields, error_response
from proxy.wire.simple import ready_for_query
from tests.unit.test_notification_audit import session

DEEP = "SELECT name FROM billing.customers WHERE i_customer = 1" + "::int8" * 2000


def _query(sql: str) -> bytes:
    return m.message(m.QUERY, sql.encode() + b"\0")


def test_an_unmasked_session_forwards_it_and_records_it_as_not_analysed() -> None:
    s, hook = session(masked=False)
    assert s.client_data(_query(DEEP)) == JUST_FORWARD  # the bytes as they came
    answer = (
        m.message(m.ROW_DESCRIPTION, b"\0\0")
        + m.message(m.COMMAND_COMPLETE, b"SELECT 0\0")
        + ready_for_query()
    )
    s.server_data(answer)
    (event,) = [e for t, e in hook.events if t == "access"]
    assert event["analysis_complete"] is False and event["subjects_complete"] is False


def test_a_masked_session_is_refused_with_the_reason() -> None:
    s, _hook = session(masked=True)
    actions = s.client_data(_query(DEEP))
    (sent,) = [a.data for a in actions if isinstance(a, SendToServer)]
    token = re.search(rb"pgveil_refusal_[0-9a-f]{16}", sent)
    assert token is not None and b"customers" not in sent
    # the server's syntax error for the token comes back as pgveil's refusal
    error = error_response("42601", f'syntax error at or near "{token.group().decode()}"')
    out = s.server_data(error + ready_for_query())
    fields = decode_fields(b"".join(a.data for a in out if isinstance(a, SendToClient))[5:])
    assert fields["C"] == "42501"
    assert fields["M"] == "pgveil: the statement is nested too deeply for pgveil to analyse"
