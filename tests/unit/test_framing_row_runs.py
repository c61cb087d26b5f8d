"""The scanner's DataRow runs (the tight inner loop of `feed` and `feed_located`) against a
straightforward model of the per-message behaviour it replaced.

The model reads the whole stream message by message and says, for each call, what the old
per-message loop gave: the captured messages completed by that call, the counts of every
header seen (a header is seen once its 5 bytes have arrived; for `feed_located`, a captured
message is counted only once it is whole, since until then it is held back), `last_type`,
the marks (the DataRows and CopyData before each captured message other than those), and a
ProtocolViolation at the first bad header. Streams mix runs of DataRows with CopyData,
ErrorResponse and the other backend messages, captured or not, with marks on or off, one bad
header (a length below 4, above the limit, or a type not allowed) anywhere, cut at random
points and at every offset of a run.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from proxy.wire import messages as m
from proxy.wire.framing import MessageScanner, capture_mask

_D = ord("D")
_COPY_DATA = ord("d")
TYPES = b"DdCEZTNSI"
ALLOWED = capture_mask(TYPES)
BAD_TYPE = ord("?")  # not allowed
MAX_LENGTH = 64


@dataclass(frozen=True)
class Msg:
    typ: int
    body: bytes
    length: int  # as declared in the header (4 + len(body) unless bad)

    @property
    def bad(self) -> bool:
        return not ALLOWED[self.typ] or self.length < 4 or self.length > MAX_LENGTH

    def encode(self) -> bytes:
        if self.bad:
            return bytes((self.typ,)) + self.length.to_bytes(4, "big") + self.body
        return m.message(self.typ, self.body)


def good(typ: bytes | int, body: bytes = b"") -> Msg:
    t = typ if isinstance(typ, int) else typ[0]
    return Msg(t, body, 4 + len(body))


@dataclass(frozen=True)
class Placed:
    msg: Msg
    start: int
    end: int  # as declared (for a bad header: where the model stops anyway)


def _place(msgs: list[Msg]) -> tuple[bytes, list[Placed]]:
    placed: list[Placed] = []
    pos = 0
    for msg in msgs:
        placed.append(Placed(msg, pos, pos + 1 + msg.length))
        pos += len(msg.encode())
        if msg.bad:
            break  # nothing after a bad header is read
    return b"".join(p.msg.encode() for p in placed), placed


@dataclass
class Seen:
    """What one call gave: its captured messages, and the scanner afterwards."""

    out: list[tuple[int, bytes]] | list[tuple[int, bytes, int, int]]
    counts: dict[int, int]
    last_type: int
    marks: list[int] | None
    violation: bool
    held: int | None = None
    at_boundary: bool | None = None


def _counts(counts: list[int] | dict[int, int]) -> dict[int, int]:
    if isinstance(counts, dict):
        return {t: c for t, c in counts.items() if c}
    return {t: c for t, c in enumerate(counts) if c}


def _model_feed(
    placed: list[Placed], chunks: list[bytes], capture: bytearray, marks_on: bool
) -> list[Seen]:
    seen: list[Seen] = []
    total = 0
    last = -1
    for chunk in chunks:
        before, total = total, total + len(chunk)
        headers = [p for p in placed if p.start + 5 <= total]
        counts: dict[int, int] = {}
        for p in headers:
            counts[p.msg.typ] = counts.get(p.msg.typ, 0) + 1
        if headers:
            last = headers[-1].msg.typ
        if any(p.msg.bad for p in headers):
            seen.append(Seen([], counts, last, None, True))
            return seen
        out: list[tuple[int, bytes]] = []
        marks: list[int] = []
        rows = 0
        for p in placed:
            if capture[p.msg.typ] and not p.msg.bad and before < p.end <= total:
                out.append((p.msg.typ, p.msg.body))
                if p.msg.typ not in (_D, _COPY_DATA):
                    marks.append(rows)
            if p.msg.typ in (_D, _COPY_DATA):
                rows += 1
        boundary = total == 0 or any(p.end == total and not p.msg.bad for p in placed)
        seen.append(Seen(out, counts, last, marks if marks_on else None, False, None, boundary))
    return seen


def _run_feed(stream_chunks: list[bytes], capture: bytearray, marks_on: bool) -> list[Seen]:
    counts = [0] * 256
    scanner = MessageScanner(capture, counts, MAX_LENGTH, ALLOWED)
    if marks_on:
        scanner.marks = []
    seen: list[Seen] = []
    for chunk in stream_chunks:
        try:
            out = list(scanner.feed(chunk))
        except m.ProtocolViolation:
            seen.append(Seen([], _counts(counts), scanner.last_type, None, True))
            return seen
        marks = list(scanner.marks) if scanner.marks is not None else None
        seen.append(
            Seen(out, _counts(counts), scanner.last_type, marks, False, None, scanner.at_boundary)
        )
    return seen


def _model_located(
    placed: list[Placed], chunks: list[bytes], capture: bytearray, marks_on: bool
) -> list[Seen]:
    by_start = {p.start: p for p in placed}
    seen: list[Seen] = []
    counts: dict[int, int] = {}
    rows = 0
    last = -1
    cursor = 0  # the next header, absolute (beyond `total` while a body is skipped)
    total = 0
    held_len = 0
    for chunk in chunks:
        base = total - held_len
        total += len(chunk)
        out: list[tuple[int, bytes, int, int]] = []
        marks: list[int] = []
        held: int | None = None
        violation = False
        while True:
            if cursor + 5 > total:
                held = cursor - base if cursor < total else None
                break
            p = by_start[cursor]
            typ = p.msg.typ
            if p.msg.bad:
                counts[typ] = counts.get(typ, 0) + 1  # (last_type is left as it was)
                violation = True
                break
            if capture[typ]:
                if p.end > total:
                    held = cursor - base
                    break
                out.append((typ, p.msg.body, cursor - base, p.end - base))
                if typ not in (_D, _COPY_DATA):
                    marks.append(rows)
            counts[typ] = counts.get(typ, 0) + 1
            last = typ
            if typ in (_D, _COPY_DATA):
                rows += 1
            cursor = p.end
            if p.end > total:
                break  # an uncaptured body to skip into the next chunk
        if violation:
            seen.append(Seen([], dict(counts), last, None, True))
            return seen
        held_len = total - (base + held) if held is not None else 0
        seen.append(Seen(out, dict(counts), last, marks if marks_on else None, False, held))
    return seen


def _run_located(chunks: list[bytes], capture: bytearray, marks_on: bool) -> list[Seen]:
    counts = [0] * 256
    scanner = MessageScanner(capture, counts, MAX_LENGTH, ALLOWED)
    if marks_on:
        scanner.marks = []
    seen: list[Seen] = []
    kept = b""
    for chunk in chunks:
        data = kept + chunk
        try:
            out, held = scanner.feed_located(data)
        except m.ProtocolViolation:
            seen.append(Seen([], _counts(counts), scanner.last_type, None, True))
            return seen
        marks = list(scanner.marks) if scanner.marks is not None else None
        seen.append(Seen(list(out), _counts(counts), scanner.last_type, marks, False, held))
        kept = data[held:] if held is not None else b""
    return seen


def _split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts} - {0})
    chunks, prev = [], 0
    for p in [*points, len(data)]:
        if p > prev:
            chunks.append(data[prev:p])
        prev = p
    return chunks


def _check(msgs: list[Msg], chunks_of: list[int], capture: bytearray, marks_on: bool) -> None:
    stream, placed = _place(msgs)
    chunks = _split(stream, chunks_of)
    assert _run_feed(chunks, capture, marks_on) == _model_feed(placed, chunks, capture, marks_on)
    assert _run_located(chunks, capture, marks_on) == _model_located(
        placed, chunks, capture, marks_on
    )


# ---- random streams and chunkings -----------------------------------------------------------

_body = st.binary(max_size=12)
_row = st.builds(lambda b: good(b"D", b), _body)
_other = st.builds(lambda t, b: good(t, b), st.sampled_from(TYPES), _body)
_run = st.lists(_row, min_size=1, max_size=8)
_bad = st.one_of(
    st.builds(lambda t, n: Msg(t, b"", n), st.sampled_from(TYPES), st.integers(0, 3)),
    st.builds(
        lambda t, n: Msg(t, b"", n), st.sampled_from(TYPES), st.integers(MAX_LENGTH + 1, 1 << 20)
    ),
    st.builds(lambda b: Msg(BAD_TYPE, b, 4 + len(b)), _body),
)


@st.composite
def _streams(draw: st.DrawFn) -> list[Msg]:
    parts = draw(st.lists(st.one_of(_run, _other.map(lambda x: [x])), max_size=10))
    msgs = [x for part in parts for x in part]
    if draw(st.booleans()):
        at = draw(st.integers(0, len(msgs)))
        msgs.insert(at, draw(_bad))
    return msgs


@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    msgs=_streams(),
    cuts=st.lists(st.integers(min_value=0, max_value=5000), max_size=25),
    captured=st.sets(st.sampled_from(TYPES)),
    marks_on=st.booleans(),
)
def test_row_runs_scan_as_the_per_message_loop_did(
    msgs: list[Msg], cuts: list[int], captured: set[int], marks_on: bool
) -> None:
    _check(msgs, cuts, capture_mask(bytes(captured)), marks_on)


# ---- a run split at every offset --------------------------------------------------------------

_RUN = [good(b"T", b"desc"), *(good(b"D", bytes([i]) * i) for i in range(6))]
_TAILS = {
    "copy_data": [good(b"d", b"x\n"), good(b"c"), good(b"C", b"COPY 1\x00"), good(b"Z", b"I")],
    "error": [good(b"E", b"SERROR\x00\x00"), good(b"Z", b"I")],
    "complete": [good(b"C", b"SELECT 6\x00"), good(b"Z", b"I")],
    "bad_row_length": [good(b"D", b"ok"), Msg(_D, b"", 2)],
    "oversized_row": [good(b"D", b"ok"), Msg(_D, b"", MAX_LENGTH + 1)],
}
_CAPTURES = ["", "D", "E", "DE", "Ed", "DdECZ"]


@pytest.mark.parametrize("tail", sorted(_TAILS))
@pytest.mark.parametrize("captured", _CAPTURES)
@pytest.mark.parametrize("marks_on", [False, True])
def test_a_row_run_cut_at_every_offset_scans_alike(
    tail: str, captured: str, marks_on: bool
) -> None:
    msgs = [*_RUN, *_TAILS[tail], *_RUN[1:4], good(b"C", b"SELECT 3\x00"), good(b"Z", b"I")]
    stream, _ = _place(msgs)
    capture = capture_mask(captured)
    for cut in range(len(stream) + 1):
        _check(msgs, [cut], capture, marks_on)
    # and cut in three, at every pair of offsets around the run's middle
    for a in range(10, 40):
        for b in range(a, 60):
            _check(msgs, [a, b], capture, marks_on)


def test_a_row_run_fed_byte_by_byte_scans_alike() -> None:
    msgs = [*_RUN, *_TAILS["copy_data"], *_RUN[1:], good(b"E", b"SERROR\x00\x00")]
    stream, _ = _place(msgs)
    for captured in _CAPTURES:
        for marks_on in (False, True):
            _check(msgs, list(range(len(stream))), capture_mask(captured), marks_on)


# ---- the row sink: captured DataRows as slices --------------------------------------------


def _scan(chunks: list[bytes], capture: bytearray, marks_on: bool, sink: bool) -> list[object]:
    """What each `feed` gives, as (captured messages in stream order, with the DataRows put
    back where `row_ends` says they came, counts, last type, marks), or the violation."""
    s = MessageScanner(capture, [0] * 256, MAX_LENGTH, ALLOWED)
    if marks_on:
        s.marks = []
    if sink:
        s.rows = []
    seen: list[object] = []
    for chunk in chunks:
        try:
            out = s.feed(chunk)
        except m.ProtocolViolation as exc:
            seen.append(("violation", str(exc)))
            break
        if sink:
            assert s.rows is not None and len(s.row_ends) == len(out)
            assert all(typ != _D for typ, _ in out)  # (rows go to the sink only)
            merged: list[tuple[int, bytes]] = []
            done = 0
            for (typ, body), upto in zip(out, s.row_ends, strict=True):
                assert done <= upto <= len(s.rows)
                merged += [(_D, r) for r in s.rows[done:upto]]
                merged.append((typ, body))
                done = upto
            merged += [(_D, r) for r in s.rows[done:]]
            out = merged
        seen.append((list(out), _counts(s.counts), s.last_type, list(s.marks or ())))
    return seen


@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    msgs=_streams(),
    cuts=st.lists(st.integers(min_value=0, max_value=5000), max_size=25),
    captured=st.sets(st.sampled_from(TYPES)),
    marks_on=st.booleans(),
)
def test_the_row_sink_gives_the_rows_feed_would_return_in_their_places(
    msgs: list[Msg], cuts: list[int], captured: set[int], marks_on: bool
) -> None:
    """With `rows` set, `feed` hands captured DataRows over in the sink, each before the
    message `row_ends` says: put back, they are what it returns without the sink, chunk by
    chunk (a split row included), with the same counts, last type and marks."""
    stream, _ = _place(msgs)
    chunks = _split(stream, cuts)
    capture = capture_mask(bytes(captured))
    assert _scan(chunks, capture, marks_on, sink=True) == _scan(
        chunks, capture, marks_on, sink=False
    )


def test_a_row_split_across_chunks_reaches_the_sink_of_the_feed_that_completes_it() -> None:
    stream, _ = _place([good(b"T", b"d"), good(b"D", b"abcdef"), good(b"C", b"SELECT 1\x00")])
    s = MessageScanner(capture_mask("DC"), [0] * 256, MAX_LENGTH, ALLOWED)
    s.rows = []
    cut = 5 + 1 + 5 + 3  # inside the DataRow's body
    assert s.feed(stream[:cut]) == [] and s.rows == [] and s.row_ends == []
    assert s.feed(stream[cut:]) == [(ord("C"), b"SELECT 1\x00")]
    assert s.rows == [b"abcdef"] and s.row_ends == [1]
