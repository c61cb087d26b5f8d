"""The login phase's messages: the untyped startup packets (StartupMessage, SSLRequest,
GSSENCRequest, CancelRequest), Authentication, SASLInitialResponse and BackendKeyData.

Pure: bytes in, values out, values in, bytes out. Must not import asyncio, socket or
anything that performs I/O, and must not log: a password message is among what passes here.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Final

from proxy.wire.messages import (
    AUTH_SASL,
    AUTHENTICATION,
    BACKEND_KEY_DATA,
    CANCEL_REQUEST_CODE,
    GSSENC_REQUEST_CODE,
    PASSWORD_MESSAGE,
    SSL_REQUEST_CODE,
    ProtocolViolation,
    message,
)

_I32: Final = struct.Struct("!i")
_CANCEL: Final = struct.Struct("!IIii")
_KEY_DATA: Final = struct.Struct("!ii")


@dataclass(frozen=True, slots=True)
class StartupMessage:
    protocol: int
    parameters: dict[str, str]

    @property
    def user(self) -> str:
        return self.parameters.get("user", "")

    @property
    def database(self) -> str:
        # as the server reads it: a missing or empty database means the user's name
        return self.parameters.get("database") or self.user

    def encode(self) -> bytes:
        body = bytearray(_I32.pack(self.protocol))
        for key, value in self.parameters.items():
            body += key.encode() + b"\0" + value.encode() + b"\0"
        body += b"\0"
        return _I32.pack(len(body) + 4) + bytes(body)


@dataclass(frozen=True, slots=True)
class CancelRequest:
    process_id: int
    secret_key: int

    def encode(self) -> bytes:
        return _CANCEL.pack(16, CANCEL_REQUEST_CODE, self.process_id, self.secret_key)


@dataclass(frozen=True, slots=True)
class SSLRequest:
    def encode(self) -> bytes:
        return _I32.pack(8) + _I32.pack(SSL_REQUEST_CODE)


@dataclass(frozen=True, slots=True)
class GSSENCRequest:
    def encode(self) -> bytes:
        return _I32.pack(8) + _I32.pack(GSSENC_REQUEST_CODE)


StartupPacket = StartupMessage | CancelRequest | SSLRequest | GSSENCRequest


def startup_parameters(packet: bytes) -> list[tuple[str, str]]:
    """The key/value pairs of a StartupMessage packet (length prefix included), in order
    and with repeated keys kept: the server applies every setting it names, in order."""
    body = packet[8:]
    if not body.endswith(b"\0"):
        raise ProtocolViolation("invalid startup packet layout: expected terminator as last byte")
    parts = body[:-1].split(b"\0")
    if parts and parts[-1] == b"":
        parts.pop()
    if len(parts) % 2:
        raise ProtocolViolation("invalid startup packet layout: odd number of strings")
    try:
        return [(parts[i].decode(), parts[i + 1].decode()) for i in range(0, len(parts), 2)]
    except UnicodeDecodeError as exc:
        raise ProtocolViolation("invalid startup packet: parameters are not UTF-8") from exc


def decode_startup_packet(packet: bytes) -> StartupPacket:
    """Decode a complete untyped startup-phase packet (length prefix included)."""
    if len(packet) < 8:
        raise ProtocolViolation("invalid length of startup packet")
    code = _I32.unpack_from(packet, 4)[0]
    if code == SSL_REQUEST_CODE and len(packet) == 8:
        return SSLRequest()
    if code == GSSENC_REQUEST_CODE and len(packet) == 8:
        return GSSENCRequest()
    if code == CANCEL_REQUEST_CODE:
        if len(packet) != 16:
            raise ProtocolViolation("invalid length of cancel request packet")
        _, _, pid, key = _CANCEL.unpack(packet)
        return CancelRequest(pid, key)
    if code >> 16 != 3:
        raise ProtocolViolation(
            f"unsupported frontend protocol {code >> 16}.{code & 0xFFFF}: "
            "server supports 3.0 to 3.0"
        )
    params = dict(startup_parameters(packet))
    if not params.get("user"):
        raise ProtocolViolation("no PostgreSQL user name specified in startup packet")
    return StartupMessage(code, params)


# --- Authentication ----------------------------------------------------------------------


def auth_code(body: bytes) -> int:
    """The request code of an Authentication body (AUTH_OK, AUTH_SASL, ...)."""
    if len(body) < 4:
        raise ProtocolViolation("truncated Authentication message")
    return int(_I32.unpack_from(body, 0)[0])


def sasl_mechanisms(body: bytes) -> list[str]:
    """Mechanism names of an AuthenticationSASL body."""
    names = body[4:].split(b"\0")
    return [n.decode("ascii", "replace") for n in names if n]


def authentication_sasl(mechanisms: list[str]) -> bytes:
    body = _I32.pack(AUTH_SASL) + b"".join(m.encode() + b"\0" for m in mechanisms) + b"\0"
    return message(AUTHENTICATION, body)


def sasl_initial_response(body: bytes) -> tuple[bytes, bytes]:
    """A SASLInitialResponse body (a PasswordMessage sent after AuthenticationSASL):
    (mechanism name, the client's first message; empty when it has none)."""
    mechanism, _, rest = body.partition(b"\0")
    # rest: Int32 length of the response (-1: none), then the response
    return mechanism, rest[4:]


def sasl_initial_response_message(mechanism: bytes, response: bytes | None) -> bytes:
    length = -1 if response is None else len(response)
    return message(PASSWORD_MESSAGE, mechanism + b"\0" + _I32.pack(length) + (response or b""))


# --- BackendKeyData ----------------------------------------------------------------------


def backend_key_data(body: bytes) -> tuple[int, int]:
    """(process ID, secret key) of a BackendKeyData body."""
    if len(body) != 8:
        raise ProtocolViolation("invalid BackendKeyData length")
    pid, key = _KEY_DATA.unpack(body)
    return pid, key


def backend_key_data_message(process_id: int, secret_key: int) -> bytes:
    return message(BACKEND_KEY_DATA, _KEY_DATA.pack(process_id, secret_key))
