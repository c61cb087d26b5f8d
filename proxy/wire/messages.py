"""PostgreSQL protocol 3.0 vocabulary: type bytes, names, codes, the typed-message frame.

Names follow the "Message Formats" chapter of the PostgreSQL documentation. The decoders and
encoders of the messages live beside this module, one module per family: startup.py (the
login), simple.py (Query, ReadyForQuery, Terminate), extended.py (Parse, Bind, Describe,
Execute, Close, ParameterDescription), rows.py (RowDescription, DataRow, CommandComplete),
errors.py (ErrorResponse, NoticeResponse), async_.py (ParameterStatus,
NotificationResponse); framing.py finds message boundaries and splice.py rewrites chosen
messages of a stream.

This module is pure and must not import asyncio, socket or anything that performs I/O; it
must not log message contents either, since bodies can hold personal data.
"""

from __future__ import annotations

import struct
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

_HEADER: Final = struct.Struct("!BI")

MALFORMED: Final = (ValueError, IndexError, struct.error)
"""What reading a truncated or inconsistent body raises (a missing terminator, a count
beyond the end): callers that take bodies from a peer turn these into ProtocolViolation."""


class ProtocolViolation(Exception):
    """A peer sent bytes that are not a valid PostgreSQL protocol stream.

    The message is safe to show to the client and to log: it never quotes the offending
    bytes.
    """


def message(type_: int, body: bytes = b"") -> bytes:
    """Encode one typed message: type byte, Int32 length (including itself), body."""
    return _HEADER.pack(type_, len(body) + 4) + body
