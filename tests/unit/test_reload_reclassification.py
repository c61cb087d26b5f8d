"""A rules reload that classifies an open session's login otherwise (masked <-> unmasked)
ends that session, without sockets: which sessions the rules in force classify otherwise
(`MaskingManager.reclassification`), and how the engine ends one: a FATAL 57P01 at once when
the client is at a boundary of the server's messages, else right after the message under
way; nothing the client sends meanwhile is forwarded."""

from __future__ import annotations

import time

from proxy.catalog import MaskingManager, _Database
from proxy.config import load_config
from proxy.session.engine import (
    ClassifyLogin,
    CloseSession,
    ConnectUpstream,
    Phase,
    SendToClient,
    SendToServer,
    Session,
    SessionSettings,
)
from proxy.wire import messages as m
from proxy.wire.errors import decode_fields, error_response
from proxy.wire.framing import MessageScanner, capture_mask
from proxy.wire.simple import TERMINATE_MESSAGE, ready_for_query
from proxy.wire.startup import StartupMessage
from rules.context import ContextHolder, MaskingContext
from rules.loader import parse_rules
from tests.unit.rules.fixtures import CATALOG, RULES

ROLES = "roles:\n  masked: [helpdesk]\n  unmasked: [admin]\n  default: unmasked\n"
RULES_A = ROLES + RULES
# helpdesk unmasked now, agent (default: unmasked before) masked
RULES_B = ROLES.replace("[helpdesk]", "[agent]").replace("[admin]", "[admin, helpdesk]") + RULES
# a masked role that does not exist: logins unmasked only by the default are refused
RULES_MISSPELT = ROLES.replace("[helpdesk]", "[helpdesk, helpdsk]") + RULES
ALL_ROLES = frozenset({"helpdesk", "admin", "agent", "other"})
KEYS = {"K": "k" * 32}
TEXT = "pgveil: the masking rules were reloaded and the session's role is now masked; reconnect"


def manager(rules: str = RULES_A) -> MaskingManager:
    config = load_config({}, environ={})
    manager = MaskingManager(config, parse_rules(rules, "r", KEYS))
    context = MaskingContext(manager.policy, CATALOG, roles=ALL_ROLES, database="db")
    manager._dbs["db"] = _Database(ContextHolder(context), time.monotonic(), ALL_ROLES)
    return manager


def test_the_sessions_the_new_rules_classify_otherwise() -> None:
    mm = manager()
    helpdesk, agent, admin = frozenset({"helpdesk"}), frozenset({"agent"}), frozenset({"admin"})
    for roles, masked in ((helpdesk, True), (agent, False), (admin, False)):
        assert mm.reclassification(roles, "db", masked) is None  # as at their login
    mm.reload(mm.config, parse_rules(RULES_B, "r", KEYS))
    assert mm.reclassification(helpdesk, "db", True) == "the session's role is now unmasked"
    assert mm.reclassification(agent, "db", False) == "the session's role is now masked"
    assert mm.reclassification(admin, "db", False) is None
    # through a membership: the roles the login was classified with
    assert mm.reclassification(frozenset({"x", "agent"}), "db", False) is not None
    # a database never read: not judged on a guess
    assert mm.reclassification(admin, "elsewhere", False) is not None


def test_an_unmasked_login_the_new_rules_refuse_ends_a_masked_one_goes_on() -> None:
    mm = manager()
    mm.reload(mm.config, parse_rules(RULES_MISSPELT, "r", KEYS))
    why = mm.reclassification(frozenset({"other"}), "db", False)
    assert why is not None and why.startswith("the login is now refused: ")
    # listed unmasked: goes on; masked: goes on (its statements are what is refused
    # while the rules do not match)
    assert mm.reclassification(frozenset({"admin"}), "db", False) is None
    assert mm.reclassification(frozenset({"helpdesk"}), "db", True) is None


# ---- the engine --------------------------------------------------------------------------

STARTUP = StartupMessage(m.PROTOCOL_3_0, {"user": "agent", "database": "db"})
LOGIN = (
    m.message(m.AUTHENTICATION, b"\0\0\0\0")
    + m.message(m.PARAMETER_STATUS, b"client_encoding\0UTF8\0")
    + m.message(m.PARAMETER_STATUS, b"standard_conforming_strings\0on\0")
    + ready_for_query()
)
ROW = m.message(m.DATA_ROW, b"\0\1\0\0\0\x0bsome value!")
DONE = m.message(m.COMMAND_COMPLETE, b"SELECT 1\0") + ready_for_query()
QUERY = m.message(m.QUERY, b"SELECT 1\0")


def ready(masked: bool = False) -> Session:
    s = Session(SessionSettings(classify=lambda: True))
    assert s.client_data(STARTUP.encode()) == [ConnectUpstream(STARTUP.encode())]
    s.upstream_connected()
    assert s.server_data(LOGIN)[-1] == ClassifyLogin("agent")
    context = MaskingContext(parse_rules(RULES_A, "r", KEYS), CATALOG) if masked else None
    s.login_classified(context)
    assert s.phase is Phase.READY
    return s


def fatal(action: object) -> dict[str, str]:
    assert isinstance(action, SendToClient) and action.data[:1] == b"E"
    return decode_fields(action.data[5:])


def test_an_idle_session_ends_at_once() -> None:
    for masked in (False, True):
        s = ready(masked)
        s.client_data(QUERY)
        s.server_data(m.message(m.ROW_DESCRIPTION, b"\0\0") + DONE)
        out = s.reclassified(TEXT)
        assert out[0] == SendToServer(TERMINATE_MESSAGE) and out[-1] == CloseSession(TEXT)
        fields = fatal(out[1])
        assert (fields["S"], fields["C"], fields["M"]) == ("FATAL", "57P01", TEXT)
        assert s.phase is Phase.CLOSED and s.close_reason == TEXT
        assert s.reclassified(TEXT) == ()  # once


def test_a_message_under_way_is_completed_first_and_nothing_after_it_goes_out() -> None:
    for masked in (False, True):
        s = ready(masked)
        s.client_data(QUERY)
        s.server_data(m.message(m.ROW_DESCRIPTION, b"\0\0") + ROW[:7])  # part of a DataRow
        assert s.reclassified(TEXT) == ()
        assert s.phase is Phase.ENDING
        # the client's next statement is not forwarded: it would run unmasked
        assert s.client_data(QUERY) == ()
        assert s.server_data(ROW[7:9]) == [SendToClient(ROW[7:9])]  # still under way
        out = s.server_data(ROW[9:] + ROW + DONE)
        assert out[0] == SendToClient(ROW[9:])  # the rest of that row, not the next one
        assert out[1] == SendToServer(TERMINATE_MESSAGE)
        assert fatal(out[2])["C"] == "57P01" and out[3] == CloseSession(TEXT)


def test_a_split_header_is_completed_before_the_end() -> None:
    s = ready()
    s.client_data(QUERY)
    s.server_data(ROW[:3])
    s.reclassified(TEXT)
    out = s.server_data(ROW[3:] + DONE)
    assert out[0] == SendToClient(ROW[3:]) and fatal(out[2])["C"] == "57P01"


def test_the_server_closing_while_ending_gets_the_reason() -> None:
    s = ready()
    s.client_data(QUERY)
    s.server_data(ROW[:7])
    s.reclassified(TEXT)
    assert s.server_closed() == (CloseSession("server closed"),)  # mid-message: nothing
    s = ready()
    s.client_data(QUERY)
    s.server_data(ROW[:7])
    s.reclassified(TEXT)
    s.server_data(ROW[7:8])
    assert s.client_closed() == (SendToServer(TERMINATE_MESSAGE), CloseSession("client closed"))


def test_not_ready_sessions_are_left_to_their_classification() -> None:
    s = Session(SessionSettings(classify=lambda: True))
    s.client_data(STARTUP.encode())
    assert s.reclassified(TEXT) == ()
    assert s.phase is Phase.CONNECTING


def test_boundary_in() -> None:
    scanner = MessageScanner(capture_mask(b"E"), [0] * 256, 1 << 20)
    assert scanner.boundary_in(b"") == 0
    scanner.feed(ROW[:2])  # a split header
    assert scanner.boundary_in(ROW[2:4]) is None
    assert scanner.boundary_in(ROW[2:] + DONE) == len(ROW) - 2
    scanner.feed(ROW[2:9])  # an uncaptured body under way
    assert scanner.boundary_in(ROW[9:]) == len(ROW) - 9
    assert scanner.boundary_in(ROW[9:-1]) is None
    scanner.feed(ROW[9:])
    error = error_response("XX000", "x")
    scanner.feed(error[:8])  # a captured message under way
    assert scanner.boundary_in(error[8:] + ROW) == len(error) - 8
