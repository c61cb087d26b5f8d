"""Message framing over a byte stream, without I/O and without copying what is not needed.

Two readers:

* `StartupReader` collects the untyped first packet(s) of a connection (StartupMessage,
  SSLRequest, GSSENCRequest, CancelRequest).
* `MessageScanner` walks typed messages. It is the hot path: it reads each 5-byte header,
  counts the message type, checks the length, and skips the body. Only message types named
  in its capture mask are reassembled and returned; everything else is never copied. The
  caller forwards the original chunks untouched.

This module must not import asyncio or socket, must not log, and must not keep references
to bodies it was not asked to capture.
"""

from __future__ import annotations

import struct
from typing import Final

from proxy.wire.messages import MAX_STARTUP_PACKET_LENGTH, ProtocolViolation

_HEADER: Final = struct.Struct("!BI")
_LEN: Final = struct.Struct("!I")
_DATA_ROW: Final = ord("D")
_COPY_DATA: Final = ord("d")

Captured = tuple[int, bytes]
"""A complete captured message: (type byte, body without the 5-byte header)."""

Located = tuple[int, bytes, int, int]
"""A captured message and where it lies in the data just fed: (type, body, start, end)."""

NO_MESSAGES: Final[list[Captured]] = []
"""Returned when nothing was captured; callers must treat it as read-only."""


def capture_mask(types: bytes | str = b"", *, everything: bool = False) -> bytearray:
    mask = bytearray([1 if everything else 0]) * 256
    for t in types.encode() if isinstance(types, str) else types:
        mask[t] = 1
    return mask


def header(data: bytes, pos: int = 0) -> tuple[int, int]:
    """(type, length) of the 5-byte header at `pos`; the length counts itself, not the type
    byte: the message ends at pos + 1 + length."""
    typ, length = _HEADER.unpack_from(data, pos)
    return typ, length


def holds_a_message(data: bytes) -> bool:
    """Whether `data` (starting at a message boundary) holds at least one whole message."""
    return len(data) >= 5 and 1 + _HEADER.unpack_from(data, 0)[1] <= len(data)


def whole_messages(data: bytes) -> list[Located]:
    """The messages of `data`, which holds whole messages only (already framed by a
    scanner): (type, body, start, end) each. Not for the hot path."""
    out: list[Located] = []
    pos = 0
    unpack = _HEADER.unpack_from
    while pos + 5 <= len(data):
        typ, length = unpack(data, pos)
        end = pos + 1 + length
        out.append((typ, data[pos + 5 : end], pos, end))
        pos = end
    return out


class StartupReader:
    """Reassembles one untyped startup packet (Int32 length first) at a time."""

    __slots__ = ("_buf",)

    def __init__(self) -> None:
        self._buf = bytearray()

    def feed(self, data: bytes) -> tuple[bytes | None, bytes]:
        """Returns (complete packet or None, bytes left over after it)."""
        self._buf += data
        if len(self._buf) < 4:
            return None, b""
        length = _LEN.unpack_from(self._buf, 0)[0]
        if length < 8 or length > MAX_STARTUP_PACKET_LENGTH:
            raise ProtocolViolation("invalid length of startup packet")
        if len(self._buf) < length:
            return None, b""
        packet = bytes(self._buf[:length])
        rest = bytes(self._buf[length:])
        self._buf.clear()
        return packet, rest


class MessageScanner:
    """Tracks typed-message boundaries across chunks; returns only captured messages.

    `counts[type]` is incremented for every message header seen, and `last_type` is the
    type of the latest header. A message whose declared length is below 4 or above
    `max_length`, or whose type byte is not in `allowed`, raises ProtocolViolation.

    `marks`, when set to a list, receives for every captured message other than a DataRow
    or CopyData the number of DataRows and CopyData before it (counts['D'] + counts['d']),
    in the order of the captured messages; each `feed` or `feed_located` starts it afresh. The
    rows between two captured messages are then known without capturing them (an audited
    session's statement log counts the rows a statement sent before it failed).

    `rows`, when set to a list (with `row_ends`), receives the bodies of the DataRows `feed`
    captures instead of its result, and `row_ends` for each message `feed` returns how many
    of `rows` came before it; each `feed` starts both afresh. A result's rows then reach
    their consumer as slices, with no step per row outside the scanner (`feed_located`
    does not use them).
    """

    __slots__ = (
        "_cap_buf",
        "_cap_need",
        "_cap_type",
        "_hdr",
        "_limits",
        "_skip",
        "allowed",
        "capture",
        "counts",
        "last_type",
        "marks",
        "max_length",
        "row_ends",
        "rows",
    )

    def __init__(
        self,
        capture: bytearray,
        counts: list[int],
        max_length: int,
        allowed: bytearray | None = None,
    ) -> None:
        self.capture = capture
        self.counts = counts
        self.max_length = max_length
        self.allowed = allowed if allowed is not None else capture_mask(everything=True)
        # one lookup per header: the largest length allowed for each type, -1 if none
        self._limits = [max_length if self.allowed[t] else -1 for t in range(256)]
        self.last_type = -1
        self._skip = 0  # body bytes of an uncaptured message still to come
        self._hdr = b""  # a header split across chunks (fewer than 5 bytes)
        self._cap_type = -1  # type of a captured message split across chunks
        self._cap_buf = bytearray()
        self._cap_need = 0  # body bytes of that message still to come
        self.marks: list[int] | None = None
        self.rows: list[bytes] | None = None
        self.row_ends: list[int] = []

    @property
    def at_boundary(self) -> bool:
        """True when the bytes seen so far end exactly at a message boundary."""
        return not (self._skip or self._hdr or self._cap_type >= 0)

    @property
    def can_locate(self) -> bool:
        """True when `feed_located` may take over from `feed`: no captured message or
        header is half-read inside the scanner (an uncaptured body to skip is fine)."""
        return not (self._hdr or self._cap_type >= 0)

    def boundary_in(self, data: bytes) -> int | None:
        """How many bytes of `data` (the next chunk) complete the message under way: 0 at a
        boundary, None when `data` ends before that message does. Nothing is fed."""
        if self._cap_type >= 0:
            need = self._cap_need
        elif self._hdr:
            missing = 5 - len(self._hdr)
            if len(data) < missing:
                return None
            length = _HEADER.unpack(self._hdr + data[:missing])[1]
            need = missing + max(length - 4, 0)
        else:
            need = self._skip
        return need if need <= len(data) else None

    def feed(self, data: bytes) -> list[Captured]:
        n = len(data)
        marks = self.marks
        if marks:
            marks.clear()
        sink = self.rows
        if sink:
            sink.clear()
        ends = self.row_ends
        if ends:
            ends.clear()
        skip = self._skip
        if skip:
            if skip >= n:
                self._skip = skip - n
                return NO_MESSAGES
            self._skip = 0
            pos = skip
        else:
            pos = 0
        out = NO_MESSAGES
        if self._cap_type >= 0 or self._hdr:
            out = []
            pos = self._resume(data, pos, out)
            if pos < 0:
                return out
        counts = self.counts
        capture = self.capture
        limits = self._limits
        unpack = _HEADER.unpack_from
        limit = n - 5
        row_limit = limits[_DATA_ROW]
        typ = self.last_type
        length: int  # (declared: compiled, the header's fields are then native integers)
        while pos <= limit:
            typ, length = unpack(data, pos)
            counts[typ] += 1
            if length > limits[typ] or length < 4:
                self.last_type = typ
                raise self._violation(typ, length)
            end = pos + 1 + length
            if capture[typ]:
                if end <= n:
                    if typ == _DATA_ROW and sink is not None:
                        # the bulk of a result, to the row sink: the DataRows that follow
                        # whole in this chunk too (as below)
                        sink.append(data[pos + 5 : end])
                        pos = end
                        rows = 0
                        put = sink.append
                        while pos <= limit:
                            typ, length = unpack(data, pos)
                            end = pos + 1 + length
                            if typ != _DATA_ROW or length > row_limit or length < 4 or end > n:
                                break
                            put(data[pos + 5 : end])
                            rows += 1
                            pos = end
                        counts[_DATA_ROW] += rows
                        typ = _DATA_ROW
                        continue
                    if out is NO_MESSAGES:
                        out = []
                    out.append((typ, data[pos + 5 : end]))
                    if typ == _DATA_ROW:
                        # the bulk of a result: the DataRows that follow whole in this
                        # chunk, without the per-message bookkeeping (counted at once; a
                        # bad or split one is left to the loop above)
                        pos = end
                        rows = 0
                        append = out.append
                        while pos <= limit:
                            typ, length = unpack(data, pos)
                            end = pos + 1 + length
                            if typ != _DATA_ROW or length > row_limit or length < 4 or end > n:
                                break
                            append((typ, data[pos + 5 : end]))
                            rows += 1
                            pos = end
                        counts[_DATA_ROW] += rows
                        typ = _DATA_ROW
                        continue
                    if sink is not None:
                        ends.append(len(sink))
                    if marks is not None and typ != _COPY_DATA:
                        marks.append(counts[_DATA_ROW] + counts[_COPY_DATA])
                else:
                    self.last_type = typ
                    self._cap_type = typ
                    self._cap_buf = bytearray(data[pos + 5 :])
                    self._cap_need = end - n
                    return out
            elif end > n:
                self.last_type = typ
                self._skip = end - n
                return out
            elif typ == _DATA_ROW:
                # rows nobody reads here: the run is only counted (see above)
                pos = end
                rows = 0
                while pos <= limit:
                    typ, length = unpack(data, pos)
                    end = pos + 1 + length
                    if typ != _DATA_ROW or length > row_limit or length < 4 or end > n:
                        break
                    rows += 1
                    pos = end
                counts[_DATA_ROW] += rows
                typ = _DATA_ROW
                continue
            pos = end
        self.last_type = typ
        if pos < n:
            self._hdr = data[pos:]
        return out

    def feed_located(self, data: bytes) -> tuple[list[Located], int | None]:
        """Like `feed`, for callers that rewrite captured messages in place.

        Returns the captured messages with their offsets, and `held`: the offset from which
        this chunk ends in an incomplete captured message or header, or None. The caller
        keeps `data[held:]` back and passes it again, followed by the next chunk; nothing
        of it has been counted. Uncaptured bodies that continue into the next chunk are
        skipped as in `feed`, so only small captured messages are ever passed twice.
        """
        out: list[Located] = []
        n = len(data)
        pos = 0
        marks = self.marks
        if marks:
            marks.clear()
        if self._skip:
            pos = min(self._skip, n)
            self._skip -= pos
        counts = self.counts
        capture = self.capture
        limits = self._limits
        unpack = _HEADER.unpack_from
        typ: int
        length: int
        while pos <= n - 5:
            typ, length = unpack(data, pos)
            if length > limits[typ] or length < 4:
                counts[typ] += 1
                raise self._violation(typ, length)
            end = pos + 1 + length
            if capture[typ]:
                if end > n:
                    return out, pos
                out.append((typ, data[pos + 5 : end], pos, end))
                if typ == _DATA_ROW:
                    # the DataRows that follow whole in this chunk, as in `feed`
                    counts[typ] += 1
                    pos = end
                    rows = 0
                    append = out.append
                    row_limit = limits[_DATA_ROW]
                    while pos <= n - 5:
                        typ, length = unpack(data, pos)
                        end = pos + 1 + length
                        if typ != _DATA_ROW or length > row_limit or length < 4 or end > n:
                            break
                        append((typ, data[pos + 5 : end], pos, end))
                        rows += 1
                        pos = end
                    counts[_DATA_ROW] += rows
                    self.last_type = _DATA_ROW
                    continue
                if marks is not None and typ != _COPY_DATA:
                    marks.append(counts[_DATA_ROW] + counts[_COPY_DATA])
            elif end > n:
                counts[typ] += 1
                self.last_type = typ
                self._skip = end - n
                return out, None
            counts[typ] += 1
            self.last_type = typ
            pos = end
        return out, (pos if pos < n else None)

    def _resume(self, data: bytes, pos: int, out: list[Captured]) -> int:
        """Finish a split captured message or header. Returns the next position, or -1
        when the chunk was used up."""
        n = len(data)
        if self._cap_type >= 0:
            take = min(self._cap_need, n - pos)
            self._cap_buf += data[pos : pos + take]
            self._cap_need -= take
            pos += take
            if self._cap_need:
                return -1
            sink = self.rows
            if sink is not None and self._cap_type == _DATA_ROW:
                sink.append(bytes(self._cap_buf))
            else:
                out.append((self._cap_type, bytes(self._cap_buf)))
                if sink is not None:
                    self.row_ends.append(len(sink))
            if self.marks is not None and self._cap_type not in (_DATA_ROW, _COPY_DATA):
                self.marks.append(self.counts[_DATA_ROW] + self.counts[_COPY_DATA])
            self._cap_type = -1
            self._cap_buf = bytearray()
            return pos if pos < n else -1
        # a split header
        need = 5 - len(self._hdr)
        if n - pos < need:
            self._hdr += data[pos:]
            return -1
        header = self._hdr + data[pos : pos + need]
        self._hdr = b""
        pos += need
        typ, length = _HEADER.unpack(header)
        self.counts[typ] += 1
        self.last_type = typ
        if length > self._limits[typ] or length < 4:
            raise self._violation(typ, length)
        body = length - 4
        if self.capture[typ]:
            self._cap_type = typ
            self._cap_buf = bytearray()
            self._cap_need = body
            return self._resume(data, pos, out)
        if body > n - pos:
            self._skip = body - (n - pos)
            return -1
        pos += body
        return pos if pos < n else -1

    def _violation(self, typ: int, length: int) -> ProtocolViolation:
        if not self.allowed[typ]:
            return ProtocolViolation(f"invalid message type 0x{typ:02x}")
        if length < 4:
            return ProtocolViolation(f"invalid message length {length}")
        return ProtocolViolation(
            f"message length {length} exceeds the limit of {self.max_length} bytes"
        )
