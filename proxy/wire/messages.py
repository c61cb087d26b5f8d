"""PostgreSQL protocol 3.0 message vocabulary: type bytes, names, and the few encoders and
decoders pgveil needs.

Names follow the "Message Formats" chapter of the PostgreSQL documentation. This module is
pure (bytes in, values out) and must not import asyncio, socket or anything that performs
I/O; it must not log message contents either, since bodies can hold personal data.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Final

# --- untyped startup-phase packets (length, then a 32-bit code) ---------------------------
PROTOCOL_3_0: Final = 196608  # 3 << 16
SSL_REQUEST_CODE: Final = 80877103
GSSENC_REQUEST_CODE: Final = 80877104
CANCEL_REQUEST_CODE: Final = 80877102
# The server's own limit for the first packet (MAX_STARTUP_PACKET_LENGTH in postmaster.c).
MAX_STARTUP_PACKET_LENGTH: Final = 10000

# --- typed messages ------------------------------------------------------------------------
# Frontend (client -> server)
BIND: Final = ord("B")
CLOSE: Final = ord("C")
COPY_DATA: Final = ord("d")
COPY_DONE: Final = ord("c")
COPY_FAIL: Final = ord("f")
DESCRIBE: Final = ord("D")
EXECUTE: Final = ord("E")
FLUSH: Final = ord("H")
FUNCTION_CALL: Final = ord("F")
PARSE: Final = ord("P")
PASSWORD_MESSAGE: Final = ord("p")  # also SASLInitialResponse, SASLResponse, GSSResponse
QUERY: Final = ord("Q")
SYNC: Final = ord("S")
TERMINATE: Final = ord("X")

# Backend (server -> client)
AUTHENTICATION: Final = ord("R")
BACKEND_KEY_DATA: Final = ord("K")
BIND_COMPLETE: Final = ord("2")
CLOSE_COMPLETE: Final = ord("3")
COMMAND_COMPLETE: Final = ord("C")
COPY_IN_RESPONSE: Final = ord("G")
COPY_OUT_RESPONSE: Final = ord("H")
COPY_BOTH_RESPONSE: Final = ord("W")
DATA_ROW: Final = ord("D")
EMPTY_QUERY_RESPONSE: Final = ord("I")
ERROR_RESPONSE: Final = ord("E")
FUNCTION_CALL_RESPONSE: Final = ord("V")
NEGOTIATE_PROTOCOL_VERSION: Final = ord("v")
NO_DATA: Final = ord("n")
NOTICE_RESPONSE: Final = ord("N")
NOTIFICATION_RESPONSE: Final = ord("A")
PARAMETER_DESCRIPTION: Final = ord("t")
PARAMETER_STATUS: Final = ord("S")
PARSE_COMPLETE: Final = ord("1")
PORTAL_SUSPENDED: Final = ord("s")
READY_FOR_QUERY: Final = ord("Z")
ROW_DESCRIPTION: Final = ord("T")

FRONTEND_NAMES: Final[dict[int, str]] = {
    BIND: "Bind",
    CLOSE: "Close",
    COPY_DATA: "CopyData",
    COPY_DONE: "CopyDone",
    COPY_FAIL: "CopyFail",
    DESCRIBE: "Describe",
    EXECUTE: "Execute",
    FLUSH: "Flush",
    FUNCTION_CALL: "FunctionCall",
    PARSE: "Parse",
    PASSWORD_MESSAGE: "PasswordMessage",
    QUERY: "Query",
    SYNC: "Sync",
    TERMINATE: "Terminate",
}

BACKEND_NAMES: Final[dict[int, str]] = {
    AUTHENTICATION: "Authentication",
    BACKEND_KEY_DATA: "BackendKeyData",
    BIND_COMPLETE: "BindComplete",
    CLOSE_COMPLETE: "CloseComplete",
    COMMAND_COMPLETE: "CommandComplete",
    COPY_DATA: "CopyData",
    COPY_DONE: "CopyDone",
    COPY_IN_RESPONSE: "CopyInResponse",
    COPY_OUT_RESPONSE: "CopyOutResponse",
    COPY_BOTH_RESPONSE: "CopyBothResponse",
    DATA_ROW: "DataRow",
    EMPTY_QUERY_RESPONSE: "EmptyQueryResponse",
    ERROR_RESPONSE: "ErrorResponse",
    FUNCTION_CALL_RESPONSE: "FunctionCallResponse",
    NEGOTIATE_PROTOCOL_VERSION: "NegotiateProtocolVersion",
    NO_DATA: "NoData",
    NOTICE_RESPONSE: "NoticeResponse",
    NOTIFICATION_RESPONSE: "NotificationResponse",
    PARAMETER_DESCRIPTION: "ParameterDescription",
    PARAMETER_STATUS: "ParameterStatus",
    PARSE_COMPLETE: "ParseComplete",
    PORTAL_SUSPENDED: "PortalSuspended",
    READY_FOR_QUERY: "ReadyForQuery",
    ROW_DESCRIPTION: "RowDescription",
}

# Authentication request codes (the Int32 after the 'R' header)
AUTH_OK: Final = 0
AUTH_CLEARTEXT_PASSWORD: Final = 3
AUTH_MD5_PASSWORD: Final = 5
AUTH_SASL: Final = 10
AUTH_SASL_CONTINUE: Final = 11
AUTH_SASL_FINAL: Final = 12

# ReadyForQuery transaction status indicators
TX_IDLE: Final = ord("I")
TX_IN_BLOCK: Final = ord("T")
TX_FAILED: Final = ord("E")

_I32: Final = struct.Struct("!i")
_U32: Final = struct.Struct("!I")
_HEADER: Final = struct.Struct("!BI")
_CANCEL: Final = struct.Struct("!IIii")


class ProtocolViolation(Exception):
    """A peer sent bytes that are not a valid PostgreSQL protocol stream.

    The message is safe to show to the client and to log: it never quotes the offending
    bytes.
    """


def message(type_: int, body: bytes = b"") -> bytes:
    """Encode one typed message: type byte, Int32 length (including itself), body."""
    return _HEADER.pack(type_, len(body) + 4) + body


# --- startup packets -----------------------------------------------------------------------


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


# --- backend messages pgveil writes itself ------------------------------------------------


def error_response(
    code: str,
    msg: str,
    *,
    severity: str = "ERROR",
    detail: str | None = None,
    hint: str | None = None,
) -> bytes:
    """ErrorResponse (or, with severity NOTICE/WARNING, the body of a NoticeResponse)."""
    return message(ERROR_RESPONSE, _fields(severity, code, msg, detail, hint))


def notice_response(code: str, msg: str, *, severity: str = "NOTICE") -> bytes:
    return message(NOTICE_RESPONSE, _fields(severity, code, msg, None, None))


def _fields(severity: str, code: str, msg: str, detail: str | None, hint: str | None) -> bytes:
    parts = [b"S", severity.encode(), b"\0", b"V", severity.encode(), b"\0"]
    parts += [b"C", code.encode(), b"\0", b"M", msg.encode(), b"\0"]
    if detail:
        parts += [b"D", detail.encode(), b"\0"]
    if hint:
        parts += [b"H", hint.encode(), b"\0"]
    parts.append(b"\0")
    return b"".join(parts)


def ready_for_query(status: int = TX_IDLE) -> bytes:
    return message(READY_FOR_QUERY, bytes((status,)))


TERMINATE_MESSAGE: Final = message(TERMINATE)


# --- decoders for the backend messages pgveil inspects -------------------------------------


def decode_fields(body: bytes) -> dict[str, str]:
    """Fields of an ErrorResponse/NoticeResponse body, keyed by their one-letter code."""
    fields: dict[str, str] = {}
    pos = 0
    n = len(body)
    while pos < n and body[pos] != 0:
        code = chr(body[pos])
        end = body.find(b"\0", pos + 1)
        if end < 0:
            raise ProtocolViolation("unterminated field in ErrorResponse/NoticeResponse")
        fields[code] = body[pos + 1 : end].decode("utf-8", "replace")
        pos = end + 1
    return fields


def sqlstate_of(body: bytes) -> str:
    """The SQLSTATE ('C' field) of an ErrorResponse body, without decoding the rest."""
    pos = body.find(b"\0C")
    if body.startswith(b"C"):
        pos = -1
    elif pos < 0:
        return ""
    end = body.find(b"\0", pos + 2)
    return body[pos + 2 : end].decode("ascii", "replace") if end > 0 else ""


def severity_of(body: bytes) -> str:
    """The non-localized severity ('V', else 'S') of an ErrorResponse body."""
    fields = decode_fields(body)
    return fields.get("V") or fields.get("S", "")


def auth_code(body: bytes) -> int:
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


def parse_message(body: bytes) -> tuple[bytes, bytes, bytes]:
    """A Parse body split into (statement name, query text, parameter type section).
    Raises ValueError when a terminator is missing."""
    name_end = body.index(b"\0")
    query_end = body.index(b"\0", name_end + 1)
    return body[:name_end], body[name_end + 1 : query_end], body[query_end + 1 :]


def backend_key_data(body: bytes) -> tuple[int, int]:
    if len(body) != 8:
        raise ProtocolViolation("invalid BackendKeyData length")
    pid, key = struct.unpack("!ii", body)
    return pid, key


def parameter_status(body: bytes) -> tuple[str, str]:
    name, _, rest = body.partition(b"\0")
    value, _, _ = rest.partition(b"\0")
    return name.decode("utf-8", "replace"), value.decode("utf-8", "replace")
