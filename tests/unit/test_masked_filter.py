"""The masked-session filter without sockets: rewrites, refusals, scrubbing, withholding."""

from __future__ import annotations

import pytest

from proxy.session.masked import REFUSAL_TOKEN, MaskedFilter, SessionEnded
from proxy.wire import messages as m
from proxy.wire.errors import decode_fields, error_response
from proxy.wire.framing import MessageScanner, capture_mask
from proxy.wire.simple import ready_for_query
from rules.context import MaskingContext
from rules.loader import parse_rules
from tests.unit.rules.fixtures import CATALOG, RULES


def make() -> tuple[MaskedFilter, MessageScanner, MessageScanner]:
    ctx = MaskingContext(parse_rules(RULES, "r", {"K": "k" * 32}), CATALOG)
    client = MessageScanner(capture_mask(b"QPFSBEDCXHcf"), [0] * 256, 1 << 20)
    server = MessageScanner(capture_mask(b"ENATSZ"), [0] * 256, 1 << 30)
    return MaskedFilter(ctx, "helpdesk"), client, server


def test_query_split_across_chunks_is_held_then_rewritten() -> None:
    f, client, _ = make()
    q = m.message(m.QUERY, b"SELECT name FROM billing.customers\0")
    assert f.client(client, q[:10]) == b""
    out = f.client(client, q[10:] + m.message(m.SYNC))
    assert out.startswith(b"Q") and b"FROM (SELECT" in out and out.endswith(m.message(m.SYNC))


def test_refusal_round_trip() -> None:
    f, client, server = make()
    out = f.client(client, m.message(m.QUERY, b"SELECT * FROM billing.leak()\0"))
    token = out[5:-1].decode()
    assert token.startswith(REFUSAL_TOKEN)
    err = error_response("42601", f'syntax error at or near "{token}"') + ready_for_query()
    back = f.server(server, err)
    fields = decode_fields(back[5 : back.index(b"Z")])
    assert fields["C"] == "42501" and fields["M"].startswith(
        "pgveil: function billing.leak is not allowed"
    )


def _guard_error(
    f: MaskedFilter, server: MessageScanner, column: str, quotes: str = '""'
) -> dict[str, str]:
    err = error_response(
        "22P02",
        f"invalid input syntax for type integer: {quotes[0]}pgveil_deny_write {column}{quotes[1]}",
    )
    back = f.server(server, err + ready_for_query())
    return decode_fields(back[5 : back.index(b"Z")])


def test_the_deny_write_guard_error_becomes_the_refusal() -> None:
    """The server's error from pgveil's guard on a write into a deny column (rules.writes)
    reaches the client as pgveil's 42501 naming the column."""
    f, client, server = make()
    out = f.client(client, m.message(m.QUERY, b"UPDATE billing.customers SET cc_number = 'x'\0"))
    assert b"pgveil_deny_write billing.customers.cc_number" in out
    # (the server's language decides the quotes: German's are » and «)
    fields = _guard_error(f, server, "billing.customers.cc_number", "»«")
    assert fields == {
        "S": "ERROR",
        "V": "ERROR",
        "C": "42501",
        "M": "pgveil: column billing.customers.cc_number is not available to masked roles; "
        "only NULL can be written to it",
    }


@pytest.mark.parametrize(
    "column", ["billing.customers.name", "billing.customers.nosuch", "public.notes.body", "x"]
)
def test_a_spelled_out_marker_naming_no_deny_column_stays_the_servers_error(column: str) -> None:
    """A statement can make the server quote the marker itself: unless it names a deny
    column of the rules, the error is the server's, scrubbed like any other (the quoted
    text is no literal of the statement: masked)."""
    f, client, server = make()
    f.client(client, m.message(m.QUERY, b"SELECT 1\0"))
    fields = _guard_error(f, server, column)
    assert fields["C"] == "22P02" and "pgveil_deny_write" not in fields["M"]


def test_errors_scrubbed_and_notifications_withheld() -> None:
    f, client, server = make()
    f.client(client, m.message(m.QUERY, b"SELECT 'abc'::int\0"))
    err = m.message(
        m.ERROR_RESPONSE,
        b'SERROR\0C22P02\0Minvalid input "abc" and "Zebulon Secret" for "customers"\0DFailing row contains (x)\0Wsome context\0\0',
    )
    out = f.server(server, err)
    fields = decode_fields(out[5:])
    assert fields["M"] == 'invalid input "abc" and "Z************t" for "customers"'
    assert fields["D"] == "pgveil: detail withheld from masked roles" and "W" not in fields
    note = m.message(m.NOTIFICATION_RESPONSE, b"\0\0\0\1secret_chan\0Zebulon\0")
    assert f.server(server, note) == b""
    assert f.counters.notifications_withheld == 1


def test_role_change_ends_session() -> None:
    f, _, server = make()
    with pytest.raises(SessionEnded):
        f.server(server, m.message(m.PARAMETER_STATUS, b"session_authorization\0postgres\0"))


def test_malformed_parse_is_a_protocol_violation() -> None:
    f, client, _ = make()
    with pytest.raises(m.ProtocolViolation):
        f.client(client, m.message(m.PARSE, b"no-terminators"))


def test_trailing_value_with_injected_quotes_is_masked_whole() -> None:
    f, client, server = make()
    f.client(client, m.message(m.QUERY, b"SELECT 1\0"))
    err = error_response("22P02", 'invalid input syntax for type integer: ""Zebulon Quixotehart"')
    fields = decode_fields(f.server(server, err)[5:])
    assert "Zebulon" not in fields["M"] and fields["M"].startswith(
        "invalid input syntax for type integer: "
    )


def test_prepared_statements_refused_while_the_rules_do_not_match() -> None:
    """A statement prepared while the rules matched: once a catalog read finds a problem
    (the holder gets a context with a `refusal`), its Bind is refused by name; the Execute
    behind it in the same batch is left for the server to skip; after Sync a portal bound
    earlier is refused by its Execute; once fixed, both go through unchanged."""
    from rules.context import ContextHolder

    policy = parse_rules(RULES, "r", {"K": "k" * 32})
    holder = ContextHolder(MaskingContext(policy, CATALOG))
    f = MaskedFilter(holder, "helpdesk")
    client = MessageScanner(capture_mask(b"QPFSBEDCXHcf"), [0] * 256, 1 << 20)
    server = MessageScanner(capture_mask(b"ENATSZ1"), [0] * 256, 1 << 30)
    bind = m.message(m.BIND, b"\0s1\0\0\0\0\0\0\0")
    execute = m.message(m.EXECUTE, b"\0\0\0\0\0")
    sync = m.message(m.SYNC)
    prepare = m.message(m.PARSE, b"s1\0SELECT 1\0\0\0")
    assert f.client(client, prepare + sync) == prepare + sync
    f.server(server, m.message(m.PARSE_COMPLETE) + ready_for_query())
    assert f.client(client, bind + execute + sync) == bind + execute + sync
    broken_rules = RULES.replace("billing.accounts:", "billing.acounts:")
    holder.context = MaskingContext(parse_rules(broken_rules, "r", {"K": "k" * 32}), CATALOG)
    out = f.client(client, bind + execute + sync)
    assert out.endswith(execute + sync) and REFUSAL_TOKEN.encode() in out[: -len(execute + sync)]
    token = out[5 + 1 : out.index(b"\0", 6)].decode()
    err = error_response("26000", f'prepared statement "{token}" does not exist')
    fields = decode_fields(f.server(server, err)[5:])
    assert fields["C"] == "42501"
    assert fields["M"].startswith("pgveil: the rules do not match the database: ")
    assert "tables.billing.acounts: relation billing.acounts does not exist" in fields["M"]
    out = f.client(client, execute + sync)  # after Sync: an Execute of its own is refused
    assert out.startswith(b"E") and REFUSAL_TOKEN.encode() in out and out.endswith(sync)
    assert f.counters.refused == 2
    holder.context = MaskingContext(policy, CATALOG)
    assert f.client(client, bind + execute + sync) == bind + execute + sync
