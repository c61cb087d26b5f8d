"""ErrorResponse and NoticeResponse: a list of (one-letter code, text) fields.

Pure: must not import asyncio, socket or anything that performs I/O, and must not log: the
server's texts quote values read from tables.
"""

from __future__ import annotations

from proxy.wire.messages import ERROR_RESPONSE, NOTICE_RESPONSE, ProtocolViolation, message


def error_body(
    code: str,
    msg: str,
    *,
    severity: str = "ERROR",
    detail: str | None = None,
    hint: str | None = None,
) -> bytes:
    """The body of an ErrorResponse (or of a NoticeResponse) pgveil writes itself."""
    parts = [b"S", _text(severity), b"\0", b"V", _text(severity), b"\0"]
    parts += [b"C", _text(code), b"\0", b"M", _text(msg), b"\0"]
    if detail:
        parts += [b"D", _text(detail), b"\0"]
    if hint:
        parts += [b"H", _text(hint), b"\0"]
    parts.append(b"\0")
    return b"".join(parts)


def _text(value: str) -> bytes:
    """A field's value as the wire carries it: NUL-terminated, so a NUL inside it (never
    sent by PostgreSQL, possible in a text pgveil composes) becomes U+FFFD, as
    `decode_fields` reads a byte it cannot decode; else what follows the NUL would reach
    the client as fields of their own, or end the message."""
    return value.replace("\0", "\ufffd").encode()


def error_response(
    code: str,
    msg: str,
    *,
    severity: str = "ERROR",
    detail: str | None = None,
    hint: str | None = None,
) -> bytes:
    """A whole ErrorResponse message."""
    return message(
        ERROR_RESPONSE, error_body(code, msg, severity=severity, detail=detail, hint=hint)
    )


def notice_response(code: str, msg: str, *, severity: str = "NOTICE") -> bytes:
    return message(NOTICE_RESPONSE, error_body(code, msg, severity=severity))


def encode_fields(typ: int, fields: dict[str, str]) -> bytes:
    """A whole ErrorResponse or NoticeResponse (`typ`) of these fields, in their order."""
    parts = [_text(code) + _text(value) + b"\0" for code, value in fields.items()]
    return message(typ, b"".join(parts) + b"\0")


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
