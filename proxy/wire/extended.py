"""The extended-query protocol's messages: Parse, Bind, Describe, Execute, Close and the
backend's ParameterDescription.

The names in them are read as the bytes the client sent (the session decides how the server
compares them). Readers raise one of messages.MALFORMED on a body that ends early; the
caller turns that into a ProtocolViolation.

Pure: must not import asyncio, socket or anything that performs I/O, and must not log:
statement texts and parameter values pass here.
"""

from __future__ import annotations

import struct
import uuid
from collections.abc import Sequence
from typing import Final

from proxy.wire.messages import (
    BIND,
    CLOSE,
    DESCRIBE,
    EXECUTE,
    PARAMETER_DESCRIPTION,
    PARSE,
    message,
)

_I16: Final = struct.Struct("!h")
_I32: Final = struct.Struct("!i")
_INT = {21: "!h", 23: "!i", 20: "!q", 26: "!I"}  # int2, int4, int8, oid
# binary parameters whose text form is plain: integers, text-like types, uuid, json
_TEXT_FORM = frozenset((25, 1043, 1042, 19, 705, 114))  # text, varchar, bpchar, name, unknown, json
_JSONB = 3802
_UUID = 2950

NO_TYPES: Final = b"\0\0"
"""The parameter-type section of a Parse that declares no types (Int16 0)."""

# --- Parse -------------------------------------------------------------------------------


def parse_message(body: bytes) -> tuple[bytes, bytes, bytes]:
    """A Parse body split into (statement name, query text, parameter type section).
    Raises ValueError when a terminator is missing."""
    name_end = body.index(b"\0")
    query_end = body.index(b"\0", name_end + 1)
    return body[:name_end], body[name_end + 1 : query_end], body[query_end + 1 :]


def parses_unnamed(body: bytes) -> bool:
    """Whether a Parse body is one of the unnamed statement (an empty name), read without
    splitting it."""
    return body[:1] == b"\0"


def parse(statement: bytes, query: bytes, types: bytes = NO_TYPES) -> bytes:
    """A whole Parse message; `types` is the parameter-type section (Int16 count, then
    that many Int32 OIDs) as `parse_message` returns it."""
    return message(PARSE, statement + b"\0" + query + b"\0" + types)


def declared_types(types: bytes) -> tuple[int, ...]:
    """The parameter type OIDs a Parse's type section declares (empty when it declares
    none or cannot be read: the server refuses such a Parse, its types do not matter)."""
    if len(types) > 2 and types[:2] != NO_TYPES:
        try:
            (count,) = _I16.unpack_from(types, 0)
            return struct.unpack_from(f"!{max(count, 0)}I", types, 2)
        except struct.error:
            pass
    return ()


def type_section(oids: Sequence[int]) -> bytes:
    return _I16.pack(len(oids)) + struct.pack(f"!{len(oids)}I", *oids)


# --- Bind --------------------------------------------------------------------------------


def bind_names(body: bytes) -> tuple[bytes, bytes]:
    """(portal name, statement name) of a Bind body."""
    end = body.index(b"\0")
    return body[:end], body[end + 1 : body.index(b"\0", end + 1)]


def bind_renamed(body: bytes, statement: bytes) -> bytes:
    """A whole Bind message: this Bind body with another statement name."""
    end = body.index(b"\0")
    name_end = body.index(b"\0", end + 1)
    return message(BIND, body[: end + 1] + statement + b"\0" + body[name_end + 1 :])


def bind(
    portal: bytes,
    statement: bytes,
    param_formats: Sequence[int],
    params: Sequence[bytes | None],
    result_formats: Sequence[int],
) -> bytes:
    """A whole Bind message."""
    out = bytearray(portal + b"\0" + statement + b"\0")
    out += _I16.pack(len(param_formats)) + struct.pack(f"!{len(param_formats)}h", *param_formats)
    out += _I16.pack(len(params))
    for value in params:
        out += _I32.pack(-1) if value is None else _I32.pack(len(value)) + value
    out += _I16.pack(len(result_formats)) + struct.pack(f"!{len(result_formats)}h", *result_formats)
    return message(BIND, bytes(out))


def bind_text(statement: bytes, values: Sequence[bytes]) -> bytes:
    """A whole Bind of the unnamed portal to `statement`: `values` as text-format
    parameters (none NULL), every result column in text format."""
    out = [b"\0", statement, b"\0\0\0", _I16.pack(len(values))]
    for value in values:
        out.append(_I32.pack(len(value)))
        out.append(value)
    out.append(b"\0\0")
    return message(BIND, b"".join(out))


def decode_bind(
    body: bytes,
) -> tuple[bytes, bytes, tuple[int, ...], list[bytes | None], tuple[int, ...]]:
    """(portal, statement, parameter formats, parameter values (None: NULL), result
    formats) of a Bind body."""
    portal, statement = bind_names(body)
    pos = len(portal) + len(statement) + 2
    (nfmt,) = _I16.unpack_from(body, pos)
    formats = struct.unpack_from(f"!{nfmt}h", body, pos + 2)
    pos += 2 + 2 * nfmt
    (nparams,) = _I16.unpack_from(body, pos)
    pos += 2
    params: list[bytes | None] = []
    for _ in range(nparams):
        (n,) = _I32.unpack_from(body, pos)
        pos += 4
        if n < 0:
            params.append(None)
        else:
            if pos + n > len(body):
                raise ValueError("parameter value beyond the end of the Bind")
            params.append(body[pos : pos + n])
            pos += n
    (nres,) = _I16.unpack_from(body, pos)
    results = struct.unpack_from(f"!{nres}h", body, pos + 2)
    return portal, statement, formats, params, results


def bind_values(body: bytes, wanted: set[int]) -> tuple[list[int], dict[int, tuple[int, bytes]]]:
    """A Bind message's result-column format codes, and the `wanted` parameters (numbered
    from 1; NULLs left out): (format, value)."""
    pos = body.index(b"\0", body.index(b"\0") + 1) + 1
    (nfmt,) = struct.unpack_from("!h", body, pos)
    formats = struct.unpack_from(f"!{nfmt}h", body, pos + 2)
    pos += 2 + 2 * nfmt
    (nparams,) = struct.unpack_from("!h", body, pos)
    pos += 2
    params: dict[int, tuple[int, bytes]] = {}
    for i in range(nparams):
        (n,) = struct.unpack_from("!i", body, pos)
        if i + 1 in wanted and n >= 0:
            fmt = formats[0] if nfmt == 1 else (formats[i] if nfmt else 0)
            params[i + 1] = (fmt, body[pos + 4 : pos + 4 + n])
        pos += 4 + max(n, 0)
    (nres,) = struct.unpack_from("!h", body, pos)
    return list(struct.unpack_from(f"!{nres}h", body, pos + 2)), params


def bind_parameters(body: bytes, types: Sequence[int]) -> list[str]:
    """The parameter values of a Bind message as text, the way the server reads them:
    text-format values decoded from UTF-8 (masked sessions use it); binary ones only where
    `types` (the statement's parameter types) says how they read as text. A NULL, or a value
    that does not read, is left out."""
    pos = body.index(b"\0", body.index(b"\0") + 1) + 1
    (nfmt,) = struct.unpack_from("!h", body, pos)
    formats = struct.unpack_from(f"!{nfmt}h", body, pos + 2)
    pos += 2 + 2 * nfmt
    (nparams,) = struct.unpack_from("!h", body, pos)
    pos += 2
    values: list[str] = []
    for i in range(nparams):
        (n,) = struct.unpack_from("!i", body, pos)
        pos += 4
        if n < 0:
            continue
        raw = body[pos : pos + n]
        pos += n
        fmt = formats[0] if nfmt == 1 else (formats[i] if nfmt else 0)
        type_oid = types[i] if i < len(types) else 0
        value = _param_text(raw, type_oid) if fmt == 1 else _utf8(raw)
        if value is not None:
            values.append(value)
    return values


def _param_text(raw: bytes, type_oid: int) -> str | None:
    """A binary parameter's text form, for the types whose binary form says it exactly."""
    code = _INT.get(type_oid)
    if code is not None:
        return str(struct.unpack(code, raw)[0]) if len(raw) == struct.calcsize(code) else None
    if type_oid in _TEXT_FORM:
        return _utf8(raw)
    if type_oid == _JSONB:
        return _utf8(raw[1:]) if raw[:1] == b"\x01" else None
    if type_oid == _UUID:
        return str(uuid.UUID(bytes=raw)) if len(raw) == 16 else None
    return None


def _utf8(raw: bytes) -> str | None:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return None


# --- Describe and Close ------------------------------------------------------------------


def target(body: bytes) -> tuple[bytes, bytes]:
    """(kind: b"S" a statement or b"P" a portal, name) of a Describe or Close body."""
    return body[:1], body[1:-1]


def describe_body(kind: bytes, name: bytes) -> bytes:
    """The body of a Describe (or Close) of `kind` (b"S", b"P") and name."""
    return kind + name + b"\0"


def describe(kind: bytes, name: bytes) -> bytes:
    return message(DESCRIBE, describe_body(kind, name))


def close(kind: bytes, name: bytes) -> bytes:
    return message(CLOSE, describe_body(kind, name))


# --- Execute -----------------------------------------------------------------------------


def execute_portal(body: bytes) -> bytes:
    """The portal name of an Execute body."""
    return body[: body.index(b"\0")]


def execute_renamed(body: bytes, portal: bytes) -> bytes:
    """This Execute body with another portal name (the row limit kept)."""
    return portal + b"\0" + body[body.index(b"\0") + 1 :]


def execute(portal: bytes, max_rows: int = 0) -> bytes:
    return message(EXECUTE, portal + b"\0" + _I32.pack(max_rows))


def decode_execute(body: bytes) -> tuple[bytes, int]:
    """(portal name, row limit: 0 for none) of an Execute body."""
    portal = execute_portal(body)
    return portal, _I32.unpack_from(body, len(portal) + 1)[0]


# --- ParameterDescription ----------------------------------------------------------------


def parameter_types(body: bytes) -> tuple[int, ...]:
    """The parameter type OIDs of a ParameterDescription body."""
    (count,) = _I16.unpack_from(body, 0)
    return struct.unpack_from(f"!{count}I", body, 2)


def parameter_description(oids: Sequence[int]) -> bytes:
    return message(PARAMETER_DESCRIPTION, type_section(oids))
