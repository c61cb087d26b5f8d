"""A result set's messages: RowDescription, DataRow, CommandComplete.

DataRows are the hot path: nothing here decodes a whole row where one column is wanted, and
`collect_column` reads one column of many rows by offsets only, with no object per row.

Pure: must not import asyncio, socket or anything that performs I/O, and must not log: rows
hold personal data.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Sequence
from typing import Final

from proxy.wire.messages import COMMAND_COMPLETE, DATA_ROW, ROW_DESCRIPTION, message

_I16: Final = struct.Struct("!h")
_I32: Final = struct.Struct("!i")
# after a field's name: table OID, column number, type OID, type size, type modifier, format
_FIELD: Final = struct.Struct("!IhIhih")
_ORIGIN: Final = struct.Struct("!Ih")  # table OID, column number
_SOURCE: Final = struct.Struct("!IhI")

Field = tuple[bytes, int, int, int, int, int, int]
"""A RowDescription field: (name, table OID, column number, type OID, type size, type
modifier, format code)."""

Source = tuple[int, int, int, int]
"""Where a result column comes from: (table OID (0: none), column number, type OID,
format code)."""

# --- RowDescription ----------------------------------------------------------------------


def column_sources(body: bytes) -> list[Source]:
    """The source of each column of a RowDescription body, in order; the names are skipped,
    not decoded."""
    (count,) = _I16.unpack_from(body, 0)
    pos = 2
    unpack = _SOURCE.unpack_from
    found: list[Source] = []
    for _ in range(count):
        pos = body.index(b"\0", pos) + 1
        table_oid, attnum, type_oid = unpack(body, pos)
        (fmt,) = _I16.unpack_from(body, pos + 16)
        found.append((table_oid, attnum, type_oid, fmt))
        pos += 18
    return found


def column_origins(body: bytes) -> list[tuple[int, int]]:
    """(table OID, column number) of each column of a RowDescription body: what a masked
    session's exit check reads of every result, one unpack per column."""
    (count,) = _I16.unpack_from(body, 0)
    pos = 2
    unpack = _ORIGIN.unpack_from
    index = body.index
    found: list[tuple[int, int]] = []
    for _ in range(count):
        pos = index(b"\0", pos) + 1
        found.append(unpack(body, pos))
        pos += 18
    return found


def decode_row_description(body: bytes) -> list[Field]:
    (count,) = _I16.unpack_from(body, 0)
    pos = 2
    fields: list[Field] = []
    for _ in range(count):
        end = body.index(b"\0", pos)
        fields.append((body[pos:end], *_FIELD.unpack_from(body, end + 1)))
        pos = end + 1 + _FIELD.size
    return fields


def row_description(fields: Iterable[Field]) -> bytes:
    out = bytearray()
    count = 0
    for name, *rest in fields:
        out += name + b"\0" + _FIELD.pack(*rest)
        count += 1
    return message(ROW_DESCRIPTION, _I16.pack(count) + bytes(out))


# --- DataRow -----------------------------------------------------------------------------


def collect_column(bodies: Sequence[bytes], index: int, keys: set[bytes]) -> bool:
    """Adds column `index` of each DataRow body to `keys` (the raw bytes); True when some
    row holds NULL there (its value cannot be known)."""
    unpack = _I32.unpack_from
    if index == 0:
        # the common case, the column first: no other field to skip
        found = {body[6 : 6 + unpack(body, 2)[0]] for body in bodies}
        null = False
        if b"" in found and any(unpack(body, 2)[0] < 0 for body in bodies):
            null = True  # (a NULL's slice is b"" too: told apart by its length)
            found = {b[6 : 6 + unpack(b, 2)[0]] for b in bodies if unpack(b, 2)[0] >= 0}
        keys |= found
        return null
    null = False
    for body in bodies:
        pos = 2
        for _ in range(index):
            pos += 4 + max(unpack(body, pos)[0], 0)
        (n,) = unpack(body, pos)
        if n < 0:
            null = True
        else:
            keys.add(body[pos + 4 : pos + 4 + n])
    return null


def decode_data_row(body: bytes) -> list[bytes | None]:
    """Every column of a DataRow body (None: NULL). Not for the hot path: see
    collect_column."""
    (count,) = _I16.unpack_from(body, 0)
    pos = 2
    values: list[bytes | None] = []
    for _ in range(count):
        (n,) = _I32.unpack_from(body, pos)
        pos += 4
        if n < 0:
            values.append(None)
        else:
            if pos + n > len(body):
                raise ValueError("column value beyond the end of the DataRow")
            values.append(body[pos : pos + n])
            pos += n
    return values


def data_row(values: Iterable[bytes | None]) -> bytes:
    out = bytearray()
    count = 0
    for value in values:
        out += _I32.pack(-1) if value is None else _I32.pack(len(value)) + value
        count += 1
    return message(DATA_ROW, _I16.pack(count) + bytes(out))


# --- CommandComplete ---------------------------------------------------------------------


def command_tag(body: bytes) -> bytes:
    """The tag of a CommandComplete body (`SELECT 5`), without its terminator."""
    return body[:-1]


def row_count(body: bytes) -> int:
    """The row count at the end of a CommandComplete tag (`SELECT 5`, `INSERT 0 5`)."""
    tag = body[:-1]
    space = tag.rfind(b" ")
    if space < 0:
        return 0
    digits = tag[space + 1 :]
    return int(digits) if digits.isdigit() else 0


def command_complete(tag: bytes) -> bytes:
    return message(COMMAND_COMPLETE, tag + b"\0")
