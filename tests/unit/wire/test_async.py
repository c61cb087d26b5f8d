"""ParameterStatus and NotificationResponse decode to what was encoded."""

from __future__ import annotations

from hypothesis import given

from proxy.wire import messages as m
from proxy.wire.async_ import (
    notification,
    notification_channel,
    notification_response,
    parameter_status,
    parameter_status_message,
)
from tests.unit.wire.strategies import body_of, cstring, int32, text


@given(name=text, value=text)
def test_parameter_status_round_trips(name: str, value: str) -> None:
    body = body_of(parameter_status_message(name, value), m.PARAMETER_STATUS)
    assert parameter_status(body) == (name, value)


@given(pid=int32, channel=cstring, payload=cstring)
def test_a_notification_round_trips(pid: int, channel: bytes, payload: bytes) -> None:
    body = body_of(notification_response(pid, channel, payload), m.NOTIFICATION_RESPONSE)
    assert notification(body) == (pid, channel, payload)
    assert notification_channel(body) == channel
