"""A masked session fed garbage, split and pipelined messages: pgveil ends that session or
answers correctly, never crashes, never forwards what it did not analyse."""

from __future__ import annotations

import struct

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from proxy.wire import messages as m
from proxy.wire.startup import StartupMessage
from tests.integration.masking_fixture import NAME, leaks
from tests.support import ProxyProcess, RawClient, errors_in

USER = "masked_trust"  # trust authentication, member of cc_staff (masked)


def _rows(msgs: list[tuple[str, bytes]]) -> bytes:
    return b"".join(body for t, body in msgs if t == "D")


def test_query_sent_byte_by_byte_is_still_masked(billing: ProxyProcess) -> None:
    c = RawClient(billing.port, user=USER)
    q = m.message(m.QUERY, b"SELECT name FROM billing.customers WHERE i_customer = 1\0")
    for b in q:
        c.send_raw(bytes([b]))
    out = c.until_ready()
    assert NAME.encode() not in _rows(out) and not leaks(_rows(out).decode("latin-1"))
    c.close()


def test_pipelined_extended_with_refusal_mid_way(billing: ProxyProcess) -> None:
    c = RawClient(billing.port, user=USER)
    msgs = (
        m.message(m.PARSE, b"s1\0SELECT name FROM billing.customers\0\0\0")
        + m.message(m.PARSE, b"s2\0SELECT * FROM billing.leak()\0\0\0")
        + m.message(m.BIND, b"\0s2\0\0\0\0\0\0\0")
        + m.message(m.EXECUTE, b"\0\0\0\0\0")
        + m.message(m.SYNC)
        + m.message(m.BIND, b"\0s1\0\0\0\0\0\0\0")
        + m.message(m.EXECUTE, b"\0\0\0\0\0")
        + m.message(m.SYNC)
    )
    c.send_raw(msgs)
    first = c.until_ready()
    assert [e["C"] for e in errors_in(first)] == ["42501"]
    second = c.until_ready()
    assert not errors_in(second) and _rows(second) and not leaks(_rows(second).decode("latin-1"))
    c.close()


def test_statements_before_login_are_refused(billing: ProxyProcess) -> None:
    c = RawClient(billing.port, connect=False)
    c.send_raw(
        StartupMessage(m.PROTOCOL_3_0, {"user": USER, "database": "postgres"}).encode()
        + m.message(m.QUERY, b"SELECT name FROM billing.customers\0")
    )
    out = c.until_ready()
    assert NAME.encode() not in b"".join(b for _, b in out)
    assert [e["C"] for e in errors_in(out)] == ["08P01"]
    c.close()


def test_function_call_is_refused(billing: ProxyProcess) -> None:
    c = RawClient(billing.port, user=USER)
    c.send("F", b"\0\0\0\xb1\0\0\0\2\0\0\0\4\0\0\0\1\0\0\0\4\0\0\0\1\0\0")
    out = c.until_ready()
    assert [e["C"] for e in errors_in(out)] == ["42501"]
    c.close()


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    payload=st.lists(
        st.tuples(st.sampled_from(b"QPBEDCSHXFdcf"), st.binary(max_size=60)), min_size=1, max_size=5
    ).map(lambda ms: b"".join(bytes([t]) + struct.pack("!I", len(b) + 4) + b for t, b in ms))
)
def test_fuzzed_messages_in_a_masked_session(billing: ProxyProcess, payload: bytes) -> None:
    c = RawClient(billing.port, user=USER)
    try:
        c.send_raw(payload + m.message(m.SYNC))
        c.sock.settimeout(0.3)
        got = b""
        try:
            while chunk := c.sock.recv(65536):
                got += chunk
        except (TimeoutError, ConnectionError):
            pass
        assert not leaks(got.decode("latin-1"))
    finally:
        c.close()
    assert billing.alive()
    probe = RawClient(billing.port, user=USER)
    assert [t for t, _ in probe.query("SELECT 1")][-1] == "Z"
    probe.close()
