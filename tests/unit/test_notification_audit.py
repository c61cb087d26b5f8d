"""NotificationResponses on channels with rules are audited for every listener, through the
engine as sessions run: unmasked (bytes unchanged, the hot path forwards the chunk) and
masked (payload masked or withheld). The event never holds the payload."""

from __future__ import annotations

from proxy.session.engine import JUST_FORWARD, SendToClient, Session, SessionSettings
from proxy.session.filters import Recording
from proxy.wire import messages as m
from rules.context import MaskingContext
from rules.loader import parse_rules
from tests.unit.rules.fixtures import CATALOG, RULES
from tests.unit.test_engine import LOGIN_OK, STARTUP
from tests.unit.test_statement_log import Hook

CHANNELS = "channels:\n  invoice_events: {payload: json, keys: {customer_name: partial}}\n"
SECRET = "Quixotehart"
PAYLOAD = '{"customer_name": "Zebulon Quixotehart"}'


def notification(channel: str, payload: str) -> bytes:
    body = (4321).to_bytes(4, "big") + channel.encode() + b"\0" + payload.encode() + b"\0"
    return m.message(m.NOTIFICATION_RESPONSE, body)


def session(masked: bool) -> tuple[Session, Hook]:
    ctx = MaskingContext(parse_rules(RULES + CHANNELS, "r", {"K": "k" * 32}), CATALOG)
    hook = Hook()
    s = Session(SessionSettings(classify=lambda: True))
    s.client_data(STARTUP.encode())
    s.upstream_connected()
    s.server_data(LOGIN_OK)
    if masked:
        s.login_classified(ctx, None, hook)
    else:
        s.login_classified(None, ctx, hook)
    hook.events.clear()  # (the login's)
    return s, hook


def test_an_unmasked_listener_gets_the_notification_unchanged_and_it_is_recorded() -> None:
    s, hook = session(masked=False)
    chunk = notification("invoice_events", PAYLOAD) + notification("other", PAYLOAD)
    assert s.server_data(chunk) is JUST_FORWARD
    assert hook.events == [
        (
            "access",
            {
                "kinds": ["notification"],
                "channel": "invoice_events",
                "tables": [],
                "columns_masked": [],
                "decision": "passed",
                "rows": 1,
                "outcome": "ok",
                "subjects_complete": False,
            },
        )
    ]


def test_a_masked_listener_gets_it_masked_or_not_at_all_and_both_are_recorded() -> None:
    s, hook = session(masked=True)
    out = s.server_data(notification("invoice_events", PAYLOAD))
    sent = b"".join(a.data for a in out if isinstance(a, SendToClient))
    assert sent and SECRET.encode() not in sent
    s.server_data(notification("invoice_events", "not json " + SECRET))
    s.server_data(notification("other", PAYLOAD))  # no rules: withheld, not recorded
    assert [(e["channel"], e["decision"]) for _t, e in hook.events] == [
        ("invoice_events", "masked"),
        ("invoice_events", "withheld"),
    ]
    assert SECRET not in repr(hook.events)


def test_the_channel_is_read_in_the_sessions_client_encoding() -> None:
    ctx = MaskingContext(
        parse_rules(
            RULES + "channels:\n  kanäle: {payload: text, mask: partial}\n", "r", {"K": "k" * 32}
        ),
        CATALOG,
    )
    hook = Hook()
    s = Session(SessionSettings(classify=lambda: True))
    s.client_data(STARTUP.encode())
    s.upstream_connected()
    s.server_data(LOGIN_OK)
    s.login_classified(None, ctx, hook)
    assert isinstance(s.filter, Recording)
    s.filter.statement_filter.login_parameters(
        {"client_encoding": "LATIN1", "server_encoding": "UTF8"}
    )
    hook.events.clear()
    body = (1).to_bytes(4, "big") + "kanäle".encode("latin-1") + b"\0" + b"x\0"
    assert s.server_data(m.message(m.NOTIFICATION_RESPONSE, body)) is JUST_FORWARD
    assert [e["channel"] for _t, e in hook.events] == ["kanäle"]
