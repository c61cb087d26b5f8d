"""Playbook tests of the session engine: events in, actions out, no sockets."""

from __future__ import annotations

from proxy.session.engine import (
    FORWARD,
    JUST_FORWARD,
    CloseSession,
    ConnectUpstream,
    Phase,
    SendCancel,
    SendToClient,
    SendToServer,
    Session,
    SessionSettings,
    StartClientTLS,
)
from proxy.wire import messages as m

STARTUP = m.StartupMessage(
    m.PROTOCOL_3_0, {"user": "alice", "database": "db", "application_name": "app"}
)
LOGIN_OK = (
    m.message(m.AUTHENTICATION, b"\0\0\0\0")
    + m.message(m.PARAMETER_STATUS, b"server_version\x0015.4\0")
    + m.message(m.BACKEND_KEY_DATA, (1234).to_bytes(4, "big") + (99).to_bytes(4, "big"))
    + m.ready_for_query()
)


def ready_session(**settings: object) -> Session:
    s = Session(SessionSettings(**settings))  # type: ignore[arg-type]
    actions = s.client_data(STARTUP.encode())
    assert actions == [ConnectUpstream(STARTUP.encode())]
    assert s.upstream_connected() == ()
    out = s.server_data(LOGIN_OK)
    assert out == [SendToClient(LOGIN_OK)]
    assert s.phase is Phase.READY
    assert (
        s.info.backend_pid == 1234 and s.info.user == "alice" and s.info.application_name == "app"
    )
    return s


def test_hot_path_forwards_by_identity() -> None:
    s = ready_session()
    assert s.client_data(m.message(m.QUERY, b"SELECT 1\0")) is JUST_FORWARD
    rows = m.message(m.ROW_DESCRIPTION, b"\0\0") + m.message(m.DATA_ROW, b"\0\0") * 100
    assert s.server_data(rows) is JUST_FORWARD
    assert (
        s.server_data(m.message(m.COMMAND_COMPLETE, b"SELECT 100\0") + m.ready_for_query())
        is JUST_FORWARD
    )
    assert s.pending == 0 and s.is_idle()
    assert s.server_counts[m.DATA_ROW] == 100


def test_ssl_request_with_and_without_tls() -> None:
    s = Session(SessionSettings(tls_available=True))
    assert s.client_data(m.SSLRequest().encode()) == (SendToClient(b"S"), StartClientTLS())
    assert s.client_data(m.SSLRequest().encode()) == (SendToClient(b"N"),)  # not twice
    s = Session(SessionSettings(tls_available=False))
    assert s.client_data(m.SSLRequest().encode()) == (SendToClient(b"N"),)
    assert s.client_data(m.GSSENCRequest().encode()) == (SendToClient(b"N"),)
    assert isinstance(s.client_data(STARTUP.encode())[0], ConnectUpstream)


def test_data_after_ssl_request_is_refused() -> None:
    s = Session(SessionSettings(tls_available=True))
    actions = s.client_data(m.SSLRequest().encode() + b"Q")
    assert isinstance(actions[0], SendToClient) and b"08P01" in actions[0].data
    assert isinstance(actions[-1], CloseSession)


def test_cancel_request_is_forwarded_and_closes() -> None:
    s = Session(SessionSettings())
    packet = m.CancelRequest(5, 6).encode()
    assert s.client_data(packet) == (SendCancel(packet), CloseSession("cancel request"))


def test_rejected_session_gets_fatal_after_startup() -> None:
    s = Session(SessionSettings(admit=lambda: ("53300", "sorry, too many clients already")))
    actions = s.client_data(STARTUP.encode())
    assert isinstance(actions[0], SendToClient)
    assert m.decode_fields(actions[0].data[5:])["C"] == "53300"


def test_client_bytes_during_connect_are_relayed_after() -> None:
    s = Session(SessionSettings())
    early = m.message(m.PASSWORD_MESSAGE, b"secret\0")
    actions = s.client_data(STARTUP.encode() + early)
    assert actions == [ConnectUpstream(STARTUP.encode())]
    assert s.upstream_connected() == (SendToServer(early),)


def test_sasl_plus_removed_unless_same_certificate() -> None:
    sasl = m.authentication_sasl(["SCRAM-SHA-256-PLUS", "SCRAM-SHA-256"])
    for same, expected in (
        (False, ["SCRAM-SHA-256"]),
        (True, ["SCRAM-SHA-256-PLUS", "SCRAM-SHA-256"]),
    ):
        s = Session(SessionSettings(tls_available=True))
        s.client_data(m.SSLRequest().encode())
        s.client_data(STARTUP.encode())
        s.upstream_connected(tls=True, same_certificate=same)
        out = s.server_data(sasl)
        assert isinstance(out[0], SendToClient)
        assert m.sasl_mechanisms(out[0].data[5:]) == expected


def test_pipelined_requests_and_drain() -> None:
    s = ready_session()
    s.client_data(m.message(m.PARSE, b"\0SELECT 1\0\0\0") + m.message(m.SYNC) + m.message(m.SYNC))
    assert s.pending == 2
    assert s.shutdown_requested() == ()  # busy: wait
    assert s.server_data(m.message(m.PARSE_COMPLETE) + m.ready_for_query()) is JUST_FORWARD
    actions = s.server_data(m.ready_for_query())
    assert actions[0] is FORWARD
    assert SendToServer(m.TERMINATE_MESSAGE) in actions
    assert isinstance(actions[-1], CloseSession)


def test_drain_waits_for_transaction_end() -> None:
    s = ready_session()
    s.client_data(m.message(m.QUERY, b"BEGIN\0"))
    s.server_data(m.message(m.COMMAND_COMPLETE, b"BEGIN\0") + m.ready_for_query(m.TX_IN_BLOCK))
    assert s.shutdown_requested() == ()
    s.client_data(m.message(m.QUERY, b"COMMIT\0"))
    actions = s.server_data(m.message(m.COMMAND_COMPLETE, b"COMMIT\0") + m.ready_for_query())
    assert isinstance(actions[-1], CloseSession)
    fatal = next(a for a in actions if isinstance(a, SendToClient))
    assert m.decode_fields(fatal.data[5:])["C"] == "57P01"


def test_unfinished_extended_request_is_not_idle() -> None:
    s = ready_session()
    s.client_data(m.message(m.PARSE, b"\0SELECT 1\0\0\0") + m.message(m.FLUSH))
    assert not s.is_idle()


def test_server_close_mid_message_appends_nothing() -> None:
    s = ready_session()
    s.server_data(m.message(m.DATA_ROW, b"\0\1\0\0\0\5hello")[:8])
    assert s.server_closed() == (CloseSession("server closed"),)
    s = ready_session()
    actions = s.server_closed()
    assert isinstance(actions[0], SendToClient) and b"08006" in actions[0].data


def test_errors_counted_by_class_and_fatal_remembered() -> None:
    s = ready_session()
    s.server_data(m.error_response("22012", "division by zero") + m.ready_for_query())
    s.server_data(m.error_response("57P01", "terminating", severity="FATAL"))
    assert s.error_classes == {"22": 1, "57": 1}
    assert s.server_closed() == (CloseSession("server closed"),)


def test_terminate_closes() -> None:
    s = ready_session()
    assert s.client_data(m.TERMINATE_MESSAGE) == (FORWARD, CloseSession("client terminated"))


def test_ready_status_read_in_place_even_when_split() -> None:
    s = ready_session()
    s.client_data(m.message(m.QUERY, b"BEGIN\0"))
    chunk = m.message(m.COMMAND_COMPLETE, b"BEGIN\0") + m.ready_for_query(m.TX_IN_BLOCK)
    assert s.server_data(chunk[:-3]) is JUST_FORWARD
    assert s.server_data(chunk[-3:]) is JUST_FORWARD
    assert s.tx_status == m.TX_IN_BLOCK and not s.is_idle()


def test_status_unknown_when_ready_is_not_last_in_chunk() -> None:
    s = ready_session()
    s.client_data(m.message(m.QUERY, b"SELECT 1\0"))
    note = m.message(m.NOTIFICATION_RESPONSE, b"\0\0\0\1chan\0payload\0")
    s.server_data(m.message(m.COMMAND_COMPLETE, b"SELECT 1\0") + m.ready_for_query() + note)
    assert not s.is_idle()  # unknown is never idle ...
    assert s.shutdown_requested() == ()
    s.client_data(m.message(m.QUERY, b"SELECT 2\0"))
    actions = s.server_data(m.message(m.COMMAND_COMPLETE, b"SELECT 1\0") + m.ready_for_query())
    assert isinstance(actions[-1], CloseSession)  # ... until a chunk ends with ReadyForQuery
