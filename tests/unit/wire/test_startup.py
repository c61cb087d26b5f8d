"""The login phase's packets decode to what was encoded, whatever the values."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from proxy.wire import messages as m
from proxy.wire.startup import (
    CancelRequest,
    GSSENCRequest,
    SSLRequest,
    StartupMessage,
    auth_code,
    authentication_sasl,
    backend_key_data,
    backend_key_data_message,
    decode_startup_packet,
    sasl_initial_response,
    sasl_initial_response_message,
    sasl_mechanisms,
    startup_parameters,
)
from tests.unit.wire.strategies import body_of, cstring, int32, text

key = text.filter(bool)


@given(user=key, params=st.dictionaries(key, text, max_size=8))
def test_a_startup_message_round_trips(user: str, params: dict[str, str]) -> None:
    sent = StartupMessage(m.PROTOCOL_3_0, {**params, "user": user})
    assert decode_startup_packet(sent.encode()) == sent
    assert startup_parameters(sent.encode()) == list(sent.parameters.items())


@given(pid=int32, key_=int32)
def test_a_cancel_request_round_trips(pid: int, key_: int) -> None:
    assert decode_startup_packet(CancelRequest(pid, key_).encode()) == CancelRequest(pid, key_)


def test_encryption_requests_round_trip() -> None:
    assert decode_startup_packet(SSLRequest().encode()) == SSLRequest()
    assert decode_startup_packet(GSSENCRequest().encode()) == GSSENCRequest()


@given(names=st.lists(st.text("ABCDEFGHIJKLMNOPQRSTUVWXYZ-0123456789", min_size=1), max_size=4))
def test_authentication_sasl_round_trips(names: list[str]) -> None:
    body = body_of(authentication_sasl(names), m.AUTHENTICATION)
    assert auth_code(body) == m.AUTH_SASL
    assert sasl_mechanisms(body) == names


@given(mechanism=cstring, response=st.none() | st.binary(max_size=100))
def test_a_sasl_initial_response_round_trips(mechanism: bytes, response: bytes | None) -> None:
    body = body_of(sasl_initial_response_message(mechanism, response), m.PASSWORD_MESSAGE)
    assert sasl_initial_response(body) == (mechanism, response or b"")


@given(pid=int32, secret=int32)
def test_backend_key_data_round_trips(pid: int, secret: int) -> None:
    body = body_of(backend_key_data_message(pid, secret), m.BACKEND_KEY_DATA)
    assert backend_key_data(body) == (pid, secret)
