"""The backend's asynchronous messages: ParameterStatus and NotificationResponse (a
NoticeResponse is in errors.py).

Pure: must not import asyncio, socket or anything that performs I/O, and must not log: a
notification's payload is data.
"""

from __future__ import annotations

import struct
from typing import Final

from proxy.wire.messages import NOTIFICATION_RESPONSE, PARAMETER_STATUS, message

_I32: Final = struct.Struct("!i")


def parameter_status(body: bytes) -> tuple[str, str]:
    """(name, value) of a ParameterStatus body."""
    name, _, rest = body.partition(b"\0")
    value, _, _ = rest.partition(b"\0")
    return name.decode("utf-8", "replace"), value.decode("utf-8", "replace")


def parameter_status_message(name: str, value: str) -> bytes:
    return message(PARAMETER_STATUS, name.encode() + b"\0" + value.encode() + b"\0")


def notification_channel(body: bytes) -> bytes:
    """The channel name of a NotificationResponse body, as the server sent it (in the
    session's client encoding)."""
    return body[4 : body.index(b"\0", 4)]


def notification(body: bytes) -> tuple[int, bytes, bytes]:
    """(process ID, channel, payload) of a NotificationResponse body; the texts as sent."""
    end = body.index(b"\0", 4)
    return _I32.unpack_from(body, 0)[0], body[4:end], body[end + 1 : -1]


def notification_response(process_id: int, channel: bytes, payload: bytes) -> bytes:
    return message(NOTIFICATION_RESPONSE, _I32.pack(process_id) + channel + b"\0" + payload + b"\0")
