"""Playbook tests of the session engine: events in, actions out, no sockets."""

from __future__ import annotations

import itertools
from collections.abc import Sequence

from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.session.engine import (
    FORWARD,
    JUST_FORWARD,
    UNCLASSIFIED,
    ClassifyLogin,
    CloseSession,
    ConnectUpstream,
    Phase,
    RecordSessionStart,
    SendCancel,
    SendToClient,
    SendToServer,
    Session,
    SessionSettings,
    StartClientTLS,
)
from proxy.session.filters import Masking, PassThrough, Recording
from proxy.wire import messages as m
from proxy.wire.errors import decode_fields, error_response
from proxy.wire.simple import TERMINATE_MESSAGE, ready_for_query
from proxy.wire.startup import (
    CancelRequest,
    GSSENCRequest,
    SSLRequest,
    StartupMessage,
    authentication_sasl,
    sasl_mechanisms,
    startup_parameters,
)
from rules.context import MaskingContext
from rules.loader import parse_rules
from tests.unit.rules.fixtures import CATALOG, RULES

STARTUP = StartupMessage(
    m.PROTOCOL_3_0, {"user": "alice", "database": "db", "application_name": "app"}
)
LOGIN_OK = (
    m.message(m.AUTHENTICATION, b"\0\0\0\0")
    + m.message(m.PARAMETER_STATUS, b"server_version\x0015.4\0")
    + m.message(m.BACKEND_KEY_DATA, (1234).to_bytes(4, "big") + (99).to_bytes(4, "big"))
    + ready_for_query()
)


def ready_session(**settings: object) -> Session:
    s = Session(SessionSettings(**settings))  # type: ignore[arg-type]
    actions = s.client_data(STARTUP.encode())
    assert actions == [ConnectUpstream(STARTUP.encode())]
    assert s.upstream_connected() == ()
    out = s.server_data(LOGIN_OK)
    assert out == [RecordSessionStart(), SendToClient(LOGIN_OK)]
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
        s.server_data(m.message(m.COMMAND_COMPLETE, b"SELECT 100\0") + ready_for_query())
        is JUST_FORWARD
    )
    assert s.pending == 0 and s.is_idle()
    assert s.server_counts[m.DATA_ROW] == 100


def test_ssl_request_with_and_without_tls() -> None:
    s = Session(SessionSettings(tls_available=True))
    assert s.client_data(SSLRequest().encode()) == (SendToClient(b"S"), StartClientTLS())
    assert s.client_data(SSLRequest().encode()) == (SendToClient(b"N"),)  # not twice
    s = Session(SessionSettings(tls_available=False))
    assert s.client_data(SSLRequest().encode()) == (SendToClient(b"N"),)
    assert s.client_data(GSSENCRequest().encode()) == (SendToClient(b"N"),)
    assert isinstance(s.client_data(STARTUP.encode())[0], ConnectUpstream)


def test_data_after_ssl_request_is_refused() -> None:
    s = Session(SessionSettings(tls_available=True))
    actions = s.client_data(SSLRequest().encode() + b"Q")
    assert isinstance(actions[0], SendToClient) and b"08P01" in actions[0].data
    assert isinstance(actions[-1], CloseSession)


def test_cancel_request_is_forwarded_and_closes() -> None:
    s = Session(SessionSettings())
    packet = CancelRequest(5, 6).encode()
    # the shell closes the client once the server has closed the forwarded request's
    assert s.client_data(packet) == (SendCancel(packet),)
    assert s.close_reason == "cancel request"


def test_rejected_session_gets_fatal_after_startup() -> None:
    s = Session(SessionSettings(admit=lambda: ("53300", "sorry, too many clients already")))
    actions = s.client_data(STARTUP.encode())
    assert isinstance(actions[0], SendToClient)
    assert decode_fields(actions[0].data[5:])["C"] == "53300"


def test_client_bytes_during_connect_are_relayed_after() -> None:
    s = Session(SessionSettings())
    early = m.message(m.PASSWORD_MESSAGE, b"secret\0")
    actions = s.client_data(STARTUP.encode() + early)
    assert actions == [ConnectUpstream(STARTUP.encode())]
    assert s.upstream_connected() == (SendToServer(early),)


def test_sasl_plus_removed_unless_same_certificate() -> None:
    sasl = authentication_sasl(["SCRAM-SHA-256-PLUS", "SCRAM-SHA-256"])
    for same, expected in (
        (False, ["SCRAM-SHA-256"]),
        (True, ["SCRAM-SHA-256-PLUS", "SCRAM-SHA-256"]),
    ):
        s = Session(SessionSettings(tls_available=True))
        s.client_data(SSLRequest().encode())
        s.client_data(STARTUP.encode())
        s.upstream_connected(tls=True, same_certificate=same)
        out = s.server_data(sasl)
        assert isinstance(out[0], SendToClient)
        assert sasl_mechanisms(out[0].data[5:]) == expected


def test_pipelined_requests_and_drain() -> None:
    s = ready_session()
    s.client_data(m.message(m.PARSE, b"\0SELECT 1\0\0\0") + m.message(m.SYNC) + m.message(m.SYNC))
    assert s.pending == 2
    assert s.shutdown_requested() == ()  # busy: wait
    assert s.server_data(m.message(m.PARSE_COMPLETE) + ready_for_query()) is JUST_FORWARD
    actions = s.server_data(ready_for_query())
    assert actions[0] is FORWARD
    assert SendToServer(TERMINATE_MESSAGE) in actions
    assert isinstance(actions[-1], CloseSession)


def test_drain_waits_for_transaction_end() -> None:
    s = ready_session()
    s.client_data(m.message(m.QUERY, b"BEGIN\0"))
    s.server_data(m.message(m.COMMAND_COMPLETE, b"BEGIN\0") + ready_for_query(m.TX_IN_BLOCK))
    assert s.shutdown_requested() == ()
    s.client_data(m.message(m.QUERY, b"COMMIT\0"))
    actions = s.server_data(m.message(m.COMMAND_COMPLETE, b"COMMIT\0") + ready_for_query())
    assert isinstance(actions[-1], CloseSession)
    fatal = next(a for a in actions if isinstance(a, SendToClient))
    assert decode_fields(fatal.data[5:])["C"] == "57P01"


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
    s.server_data(error_response("22012", "division by zero") + ready_for_query())
    s.server_data(error_response("57P01", "terminating", severity="FATAL"))
    assert s.error_classes == {"22": 1, "57": 1}
    assert s.server_closed() == (CloseSession("server closed"),)


def test_terminate_closes() -> None:
    s = ready_session()
    assert s.client_data(TERMINATE_MESSAGE) == (FORWARD, CloseSession("client terminated"))


def test_ready_status_read_in_place_even_when_split() -> None:
    s = ready_session()
    s.client_data(m.message(m.QUERY, b"BEGIN\0"))
    chunk = m.message(m.COMMAND_COMPLETE, b"BEGIN\0") + ready_for_query(m.TX_IN_BLOCK)
    assert s.server_data(chunk[:-3]) is JUST_FORWARD
    assert s.server_data(chunk[-3:]) is JUST_FORWARD
    assert s.tx_status == m.TX_IN_BLOCK and not s.is_idle()


def test_status_unknown_when_ready_is_not_last_in_chunk() -> None:
    s = ready_session()
    s.client_data(m.message(m.QUERY, b"SELECT 1\0"))
    note = m.message(m.NOTIFICATION_RESPONSE, b"\0\0\0\1chan\0payload\0")
    s.server_data(m.message(m.COMMAND_COMPLETE, b"SELECT 1\0") + ready_for_query() + note)
    assert not s.is_idle()  # unknown is never idle ...
    assert s.shutdown_requested() == ()
    s.client_data(m.message(m.QUERY, b"SELECT 2\0"))
    actions = s.server_data(m.message(m.COMMAND_COMPLETE, b"SELECT 1\0") + ready_for_query())
    assert isinstance(actions[-1], CloseSession)  # ... until a chunk ends with ReadyForQuery


# ---- a gated login (rules configured): nothing before authentication ----------------------

AUTH_OK = m.message(m.AUTHENTICATION, b"\0\0\0\0")
AFTER_AUTH = LOGIN_OK[len(AUTH_OK) :]
QUERY = m.message(m.QUERY, b"SELECT name FROM billing.customers\0")


def _context() -> MaskingContext:
    return MaskingContext(parse_rules(RULES, "r", {"K": "k" * 32}), CATALOG)


def gated(startup: StartupMessage = STARTUP, early: bytes = b"") -> Session:
    s = Session(SessionSettings(classify=lambda: True))
    assert s.client_data(startup.encode() + early) == [ConnectUpstream(startup.encode())]
    assert s.gated
    return s


def _fatal(actions: Sequence[object]) -> dict[str, str]:
    sent = [a.data for a in actions if isinstance(a, SendToClient)]
    assert sent and sent[-1][:1] == b"E", actions
    return decode_fields(sent[-1][5:])


def test_gated_login_holds_the_servers_answers_until_classified() -> None:
    s = gated()
    assert s.upstream_connected() == ()
    # AuthenticationOk goes on; the rest waits, and the shell is asked to classify
    assert s.server_data(LOGIN_OK) == [SendToClient(AUTH_OK), ClassifyLogin("alice")]
    assert s.phase is Phase.CLASSIFYING and s.info.backend_pid == 1234
    out = s.login_classified(None)
    assert out == [RecordSessionStart(), SendToClient(AFTER_AUTH)]
    assert s.phase is Phase.READY
    assert s.client_data(m.message(m.QUERY, b"SELECT 1\0")) is JUST_FORWARD
    assert s.server_data(m.message(m.COMMAND_COMPLETE, b"SELECT 1\0") + ready_for_query()) is (
        JUST_FORWARD
    )
    assert s.pending == 0 and s.is_idle()


def test_gated_login_classifies_the_user_the_server_reports() -> None:
    s = gated()
    s.upstream_connected()
    status = m.message(m.PARAMETER_STATUS, b"session_authorization\0alice@db\0")
    out = s.server_data(AUTH_OK + status + ready_for_query())
    assert out[-1] == ClassifyLogin("alice@db")


def test_gated_login_split_byte_by_byte() -> None:
    s = gated()
    s.upstream_connected()
    got: list[object] = []
    for i in range(len(LOGIN_OK)):
        got += s.server_data(LOGIN_OK[i : i + 1])
    assert got == [SendToClient(AUTH_OK), ClassifyLogin("alice")]
    assert s.login_classified(None)[-1] == SendToClient(AFTER_AUTH)


def test_a_fatal_after_authentication_is_the_servers_own_answer() -> None:
    s = gated()
    s.upstream_connected()
    fatal = error_response("3D000", 'database "db" does not exist', severity="FATAL")
    status = m.message(m.PARAMETER_STATUS, b"a\0b\0")
    assert s.server_data(AUTH_OK + status) == [SendToClient(AUTH_OK)]
    assert s.server_data(fatal) == [SendToClient(status + fatal)]
    assert s.login_classified(None) == ()  # nothing to classify any more
    assert s.login_unclassifiable() == ()
    assert s.server_closed() == (CloseSession("server closed"),)


def test_unclassifiable_login_gets_one_generic_refusal() -> None:
    s = gated()
    s.upstream_connected()
    s.server_data(LOGIN_OK)
    out = s.login_unclassifiable()
    assert out[0] == SendToServer(TERMINATE_MESSAGE) and isinstance(out[-1], CloseSession)
    fields = _fatal(out)
    assert fields["C"] == "42501" and fields["M"] == UNCLASSIFIED
    assert not any(isinstance(a, RecordSessionStart) for a in out)


def test_masked_startup_role_refused_after_authentication() -> None:
    startup = StartupMessage(
        m.PROTOCOL_3_0, {"user": "helpdesk", "database": "db", "options": r"-c r\ole=admin"}
    )
    s = gated(startup)
    s.upstream_connected()
    # the server authenticates first: a wrong password would be its answer, not pgveil's
    assert s.server_data(AUTH_OK)[0] == SendToClient(AUTH_OK)
    s.server_data(AFTER_AUTH)
    out = s.login_classified(_context())
    assert out[0] == RecordSessionStart() and out[1] == SendToServer(TERMINATE_MESSAGE)
    fields = _fatal(out)
    assert (
        fields["C"] == "42501" and fields["M"] == "pgveil: masked roles may not set role at login"
    )
    assert s.phase is Phase.CLOSED


def test_masked_login_checks_the_reported_parameters() -> None:
    s = gated()
    s.upstream_connected()
    latin = m.message(m.PARAMETER_STATUS, b"client_encoding\0LATIN1\0")
    s.server_data(AUTH_OK + latin + ready_for_query())
    fields = _fatal(s.login_classified(_context()))
    assert fields["C"] == "42501" and "client_encoding UTF8" in fields["M"]


def test_statement_pipelined_behind_the_startup_is_held() -> None:
    # trust authentication: the client does not wait for the server before its query
    for masked, relayed in ((None, True), (_context(), False)):
        s = gated(early=QUERY)
        assert s.upstream_connected() == ()  # held: nothing reaches the server
        s.server_data(LOGIN_OK)
        out = s.login_classified(masked)
        if relayed:  # an unmasked, unaudited session: the query goes on after the login
            assert out == [RecordSessionStart(), SendToClient(AFTER_AUTH), SendToServer(QUERY)]
            assert s.client_counts[m.QUERY] == 1 and s.pending == 1
        else:
            assert _fatal(out)["C"] == "08P01" and SendToServer(QUERY) not in out


def test_passwords_pass_during_a_gated_login_and_nothing_else() -> None:
    s = gated()
    s.upstream_connected()
    md5 = m.message(m.AUTHENTICATION, (5).to_bytes(4, "big") + b"salt")
    assert s.server_data(md5) == [SendToClient(md5)]
    password = m.message(m.PASSWORD_MESSAGE, b"md5abc\0")
    assert s.client_data(password[:3]) == ()  # only whole messages go on
    assert s.client_data(password[3:] + QUERY) == (SendToServer(password),)
    s.server_data(LOGIN_OK)
    assert _fatal(s.login_classified(_context()))["C"] == "08P01"


def test_a_statement_instead_of_a_password_goes_to_the_server_which_ends_the_login() -> None:
    # the server reads it as the answer to its request and refuses the login itself: the
    # client gets the server's own answer, not one that says pgveil is in between
    s = gated()
    s.upstream_connected()
    s.server_data(m.message(m.AUTHENTICATION, (3).to_bytes(4, "big")))  # cleartext password
    out = s.client_data(QUERY)
    assert out == (SendToServer(QUERY),)
    fatal = error_response("08P01", "expected password response", severity="FATAL")
    assert s.server_data(fatal) == [SendToClient(fatal)]
    assert s.phase is not Phase.READY


def test_a_held_statement_then_an_authentication_request_goes_to_the_server() -> None:
    s = gated(early=QUERY)
    s.upstream_connected()
    request = m.message(m.AUTHENTICATION, (3).to_bytes(4, "big"))
    out = s.server_data(request)
    assert SendToClient(request) in out and SendToServer(QUERY) in out


def test_ready_for_query_without_authentication_is_a_violation() -> None:
    s = gated()
    s.upstream_connected()
    out = s.server_data(ready_for_query())
    assert _fatal(out)["C"] == "08P01" and s.phase is Phase.CLOSED


def test_server_bytes_after_the_logins_ready_for_query_go_through_the_session() -> None:
    s = gated()
    s.upstream_connected()
    note = m.message(m.PARAMETER_STATUS, b"client_encoding\0LATIN1\0")
    s.server_data(LOGIN_OK + note)  # a reload changed it while the login was classified
    out = s.login_classified(_context())
    fields = _fatal(out)  # the masked session sees it through its filter: ended
    assert fields["C"] == "42501" and "client_encoding" in fields["M"]
    s = gated()
    s.upstream_connected()
    s.server_data(LOGIN_OK + note)
    assert s.login_classified(None)[-1] == SendToClient(note)


@settings(max_examples=60)
@given(cuts=st.lists(st.integers(0, len(LOGIN_OK)), max_size=6))
def test_gated_login_any_chunking(cuts: list[int]) -> None:
    s = gated()
    s.upstream_connected()
    got: list[object] = []
    bounds = [0, *sorted(cuts), len(LOGIN_OK)]
    for a, b in itertools.pairwise(bounds):
        got += s.server_data(LOGIN_OK[a:b])
    sent = b"".join(a.data for a in got if isinstance(a, SendToClient))
    assert sent == AUTH_OK and got[-1] == ClassifyLogin("alice")
    out = s.login_classified(None)
    assert sent + b"".join(a.data for a in out if isinstance(a, SendToClient)) == LOGIN_OK


def test_a_message_begun_before_the_login_ends_reaches_the_masked_filter() -> None:
    s = gated()
    s.upstream_connected()
    s.server_data(m.message(m.AUTHENTICATION, (3).to_bytes(4, "big")))
    password = m.message(m.PASSWORD_MESSAGE, b"secret\0")
    assert s.client_data(password + QUERY[:4]) == (SendToServer(password),)
    s.server_data(LOGIN_OK)
    out = s.login_classified(_context())
    assert out[-1] == SendToClient(AFTER_AUTH) and s.phase is Phase.READY
    (rewritten,) = s.client_data(QUERY[4:])
    assert isinstance(rewritten, SendToServer) and b"FROM (SELECT" in rewritten.data


def test_startup_parameters_as_the_server_reads_them() -> None:
    packet = StartupMessage(m.PROTOCOL_3_0, {"user": "alice", "database": "", "Role": "x"}).encode()
    # an empty database means the user's name, as on the server
    s = Session(SessionSettings())
    s.client_data(packet)
    assert s.info.database == "alice"
    # repeated keys are kept, in order: the server applies each one
    body = b"\0\3\0\0user\0alice\0role\0a\0role\0b\0\0"
    twice = (len(body) + 4).to_bytes(4, "big") + body
    assert startup_parameters(twice) == [("user", "alice"), ("role", "a"), ("role", "b")]


# ---- one filter per classification, chosen once ------------------------------------------


class _Hook:
    """The shell's audit hook, as a filter sees it: events kept in a list."""

    subjects_limit = 100

    def __init__(self) -> None:
        self.events: list[tuple[str, dict[str, object]]] = []

    def ready(self) -> bool:
        return True

    def record(self, event_type: str, fields: dict[str, object]) -> bool:
        self.events.append((event_type, fields))
        return True


def _classified(
    masked: bool, recorded: bool, audit: _Hook | None
) -> tuple[Session, Sequence[object]]:
    s = gated()
    s.upstream_connected()
    s.server_data(LOGIN_OK)
    ctx = _context()
    out = s.login_classified(ctx if masked else None, ctx if recorded else None, audit)
    return s, out


def test_the_filter_is_chosen_by_the_classification() -> None:
    hook = _Hook()
    cases = [
        ((False, False, None), PassThrough),
        ((False, False, hook), PassThrough),  # unmasked, nothing to record with
        ((False, True, None), PassThrough),  # recorded, but no hook to record to
        ((False, True, hook), Recording),
        ((True, False, None), Masking),
        ((True, False, hook), Masking),
    ]
    for (masked, recorded, audit), kind in cases:
        s, out = _classified(masked, recorded, audit)
        assert type(s.filter) is kind, (masked, recorded, audit)
        assert s.phase is Phase.READY and out[-1] == SendToClient(AFTER_AUTH)


def test_a_session_without_rules_keeps_the_pass_through_filter() -> None:
    s = ready_session()
    assert type(s.filter) is PassThrough and s.filter.counters is None
    assert s.client_data(QUERY) is JUST_FORWARD and s.server_data(ready_for_query()) is (
        JUST_FORWARD
    )


def test_the_recording_filter_forwards_unchanged_and_records() -> None:
    hook = _Hook()
    s, _ = _classified(False, True, hook)
    assert s.client_data(QUERY) is JUST_FORWARD  # nothing can be refused: the chunk as is
    answer = m.message(m.COMMAND_COMPLETE, b"SELECT 0\0") + ready_for_query()
    assert s.server_data(answer) is JUST_FORWARD
    accesses = [f for t, f in hook.events if t == "access"]
    assert len(accesses) == 1 and accesses[0]["outcome"] == "ok", hook.events
    assert s.is_idle()


def test_the_masking_filter_rewrites_and_counts() -> None:
    s, _ = _classified(True, False, None)
    (rewritten,) = s.client_data(QUERY)
    assert isinstance(rewritten, SendToServer) and b"FROM (SELECT" in rewritten.data
    counters = s.filter.counters
    assert counters is not None and counters.rewritten == 1


def test_a_filter_ends_the_session_through_the_engine() -> None:
    """A filter raises SessionEnded (here: the exit check finds a raw personal column);
    the engine answers with Terminate, the FATAL and the close, once, for every filter."""
    s, _ = _classified(True, False, None)
    s.client_data(m.message(m.QUERY, b"SELECT 1\0"))
    column = b"name\0" + (100).to_bytes(4, "big") + (2).to_bytes(2, "big")
    column += (25).to_bytes(4, "big") + b"\xff\xff\xff\xff\xff\xff\0\0"
    out = s.server_data(m.message(m.ROW_DESCRIPTION, b"\0\1" + column))
    assert out[0] == SendToServer(TERMINATE_MESSAGE) and isinstance(out[-1], CloseSession)
    fields = _fatal(out)
    assert fields["C"] == "42501" and "unmasked personal column" in fields["M"]
    assert s.phase is Phase.CLOSED
    assert s.server_data(ready_for_query()) == ()


def test_a_protocol_violation_in_any_filter_is_a_fatal_08p01() -> None:
    for masked, recorded in ((False, False), (False, True), (True, False)):
        s, _ = _classified(masked, recorded, _Hook())
        out = s.server_data(b"Z\0\0\0\1")  # a length below 4
        fields = _fatal(out)
        assert fields["C"] == "08P01" and fields["M"].startswith("invalid message from server")
        assert isinstance(out[-1], CloseSession) and s.phase is Phase.CLOSED


def test_a_draining_session_ends_at_its_next_idle_point_whatever_its_filter() -> None:
    for masked, recorded in ((False, False), (False, True), (True, False)):
        s, _ = _classified(masked, recorded, _Hook())
        s.client_data(m.message(m.QUERY, b"SELECT 1\0"))
        assert s.shutdown_requested() == ()  # a request is outstanding
        out = s.server_data(m.message(m.COMMAND_COMPLETE, b"SELECT 1\0") + ready_for_query())
        assert out[-1] == CloseSession("shutdown"), (masked, recorded, out)
        assert _fatal(out)["C"] == "57P01" and s.phase is Phase.CLOSED


def test_terminate_closes_whatever_the_filter() -> None:
    for masked, recorded in ((False, False), (False, True), (True, False)):
        s, _ = _classified(masked, recorded, _Hook())
        out = s.client_data(TERMINATE_MESSAGE)
        assert out[-1] == CloseSession("client terminated") and s.phase is Phase.CLOSED
        assert out[0] in (FORWARD, SendToServer(TERMINATE_MESSAGE)), out
