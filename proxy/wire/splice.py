"""The splicer: one direction of a byte stream rebuilt with chosen messages replaced.

Uncaptured bytes (the scanner's capture mask decides) pass through as they are, each
captured message goes to a handler that returns it unchanged (the same object: no copy) or
its replacement, and an incomplete captured message is held back until its rest arrives.
DataRows may be handed over in batches, as they are: nothing here decodes a row.

Pure: must not import asyncio, socket or anything that performs I/O, and must not log or
keep a message beyond the chunk it came in (a paused one apart, until resumed).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

from proxy.wire.framing import MessageScanner
from proxy.wire.messages import COPY_DATA, DATA_ROW, MALFORMED, ProtocolViolation

_DATA_ROW: Final = DATA_ROW
_COPY_DATA: Final = COPY_DATA


class Pause(Exception):
    """Raised by a client-side handler that cannot decide a message yet (see
    the session filter's resume): the message and everything after it wait."""


@dataclass(slots=True)
class Paused:
    """Where a splice stopped: its data, the messages located in it, the first one not
    handled yet, and where an incomplete message at its end begins (None: none)."""

    data: bytes
    located: list[tuple[int, bytes, int, int]]
    index: int
    hold: int | None


class Splicer:
    """Rebuilds one direction of the stream: uncaptured bytes pass through, each captured
    message is replaced by what the handler returns, and an incomplete captured message is
    held back until the rest arrives. A client-side handler may pause the stream at a
    message (`Pause`): that message and everything after it, later chunks too, are kept
    until `resume`."""

    __slots__ = ("held", "later", "paused")

    def __init__(self) -> None:
        self.held = b""
        self.paused: Paused | None = None
        self.later = bytearray()  # chunks that came while paused (not scanned yet)

    def splice(
        self,
        scanner: MessageScanner,
        chunk: bytes,
        handle: Callable[[int, bytes, bytes], bytes],
        side: str,
        rows: Callable[[list[bytes]], None] | None = None,
        seen: Callable[[int], None] | None = None,
        told: int = 0,
    ) -> bytes:
        """`rows`, when given, takes the DataRows (in order, in batches, before the message
        that follows them is handled); they always go on unchanged. `seen`, when given
        (with the scanner's `marks` on), is told before each other message how many
        DataRows and CopyData came before it, captured or not, when that is not `told`
        (what it was last told)."""
        if self.paused is not None:
            self.later += chunk
            return b""
        data = self.held + chunk if self.held else chunk
        try:
            located, hold = scanner.feed_located(data)
            marks = scanner.marks if seen is not None else None
            mark = 0
            out = bytearray()
            pos = 0
            batch: list[bytes] = []
            for index, (typ, body, start, end) in enumerate(located):
                if typ == _DATA_ROW and rows is not None:
                    batch.append(body)
                    continue
                if batch and rows is not None:
                    rows(batch)
                    batch = []
                if (
                    marks is not None
                    and seen is not None
                    and typ != _DATA_ROW
                    and typ != _COPY_DATA
                ):
                    total = marks[mark]
                    mark += 1
                    if total != told:
                        seen(total)
                        told = total
                raw = data[start:end]
                try:
                    replaced = handle(typ, body, raw)
                except Pause:
                    assert rows is None and seen is None  # (client side only)
                    self.paused = Paused(data, located, index, hold)
                    self.held = b""  # (part of `data`)
                    out += data[pos:start]
                    return bytes(out)
                if replaced is raw:
                    continue  # unchanged: it goes out with the bytes around it
                out += data[pos:start]
                out += replaced
                pos = end
            if batch and rows is not None:
                rows(batch)
        except MALFORMED as exc:
            raise ProtocolViolation(f"malformed message {side}") from exc
        stop = hold if hold is not None else len(data)
        self.held = data[stop:] if hold is not None else b""
        if pos == 0:
            return data if stop == len(data) else data[:stop]  # nothing changed: no copy
        out += data[pos:stop]
        return bytes(out)

    def resume(
        self, scanner: MessageScanner, handle: Callable[[int, bytes, bytes], bytes], side: str
    ) -> bytes:
        """Handle what a pause kept, from the message it stopped at, then the chunks that
        came meanwhile; it may pause again."""
        paused = self.paused
        if paused is None:
            return b""
        self.paused = None
        later, self.later = self.later, bytearray()
        data, located = paused.data, paused.located
        out = bytearray()
        pos = located[paused.index][2]
        try:
            for index in range(paused.index, len(located)):
                typ, body, start, end = located[index]
                raw = data[start:end]
                try:
                    replaced = handle(typ, body, raw)
                except Pause:
                    self.paused = Paused(data, located, index, paused.hold)
                    self.later = later
                    out += data[pos:start]
                    return bytes(out)
                if replaced is raw:
                    continue
                out += data[pos:start]
                out += replaced
                pos = end
        except MALFORMED as exc:
            raise ProtocolViolation(f"malformed message {side}") from exc
        hold = paused.hold
        stop = hold if hold is not None else len(data)
        self.held = data[stop:] if hold is not None else b""
        out += data[pos:stop]
        if later:
            out += self.splice(scanner, bytes(later), handle, side)
        return bytes(out)
