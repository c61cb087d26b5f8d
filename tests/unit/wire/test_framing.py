"""The message scanner: boundaries, captures and counts are right however the stream is cut."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.wire import messages as m
from proxy.wire.errors import decode_fields, error_response, severity_of, sqlstate_of
from proxy.wire.framing import MessageScanner, StartupReader, capture_mask
from proxy.wire.simple import ready_for_query
from proxy.wire.startup import (
    CancelRequest,
    GSSENCRequest,
    SSLRequest,
    StartupMessage,
    decode_startup_packet,
)

TYPES = b"QPBEDCSHXdcfFpZTRKN"
message_st = st.tuples(st.sampled_from(TYPES), st.binary(max_size=300))


def _split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    chunks, prev = [], 0
    for p in [*points, len(data)]:
        chunks.append(data[prev:p])
        prev = p
    return chunks


@settings(max_examples=400)
@given(
    msgs=st.lists(message_st, max_size=30),
    cuts=st.lists(st.integers(min_value=0, max_value=20000), max_size=40),
    captured_types=st.sets(st.sampled_from(TYPES)),
)
def test_any_split_gives_the_same_captures_and_counts(
    msgs: list[tuple[int, bytes]], cuts: list[int], captured_types: set[int]
) -> None:
    stream = b"".join(m.message(t, b) for t, b in msgs)
    counts = [0] * 256
    scanner = MessageScanner(capture_mask(bytes(captured_types)), counts, 1 << 20)
    got = []
    for chunk in _split(stream, cuts):
        got += scanner.feed(chunk)
    assert got == [(t, b) for t, b in msgs if t in captured_types]
    expected = [0] * 256
    for t, _ in msgs:
        expected[t] += 1
    assert counts == expected
    assert scanner.at_boundary


@given(data=st.binary(max_size=2000), cuts=st.lists(st.integers(0, 3000), max_size=10))
def test_fuzz_only_protocol_violations(data: bytes, cuts: list[int]) -> None:
    scanner = MessageScanner(capture_mask(b"QZ"), [0] * 256, 4096, capture_mask(b"QPBEDCSHXdcfFp"))
    try:
        for chunk in _split(data, cuts):
            scanner.feed(chunk)
    except m.ProtocolViolation:
        pass


def test_length_limits_and_types() -> None:
    allowed = capture_mask(b"Q")
    s = MessageScanner(capture_mask(b""), [0] * 256, 100, allowed)
    with pytest.raises(m.ProtocolViolation, match="exceeds the limit of 100"):
        s.feed(m.message(m.QUERY, b"x" * 97))
    s = MessageScanner(capture_mask(b""), [0] * 256, 100, allowed)
    with pytest.raises(m.ProtocolViolation, match="invalid message length 3"):
        s.feed(b"Q\x00\x00\x00\x03")
    s = MessageScanner(capture_mask(b""), [0] * 256, 100, allowed)
    with pytest.raises(m.ProtocolViolation, match="invalid message type 0x5a"):
        s.feed(b"Z\x00\x00\x00\x04")
    # split header: the check still applies
    s = MessageScanner(capture_mask(b""), [0] * 256, 100, allowed)
    s.feed(b"Q\x00")
    with pytest.raises(m.ProtocolViolation):
        s.feed(b"\x00\x10\x00")


def test_large_uncaptured_body_is_skipped_without_copy() -> None:
    s = MessageScanner(capture_mask(b"Z"), [0] * 256, 1 << 30)
    body = b"r" * 1_000_000
    stream = m.message(m.DATA_ROW, body) + ready_for_query()
    assert s.feed(stream[:10]) == []
    assert not s.at_boundary
    assert s.feed(stream[10:500_000]) == []
    assert s.feed(stream[500_000:]) == [(m.READY_FOR_QUERY, b"I")]
    assert s.at_boundary


def test_startup_reader() -> None:
    packet = StartupMessage(m.PROTOCOL_3_0, {"user": "u", "database": "d"}).encode()
    r = StartupReader()
    assert r.feed(packet[:3]) == (None, b"")
    assert r.feed(packet[3:] + b"Qxx") == (packet, b"Qxx")
    with pytest.raises(m.ProtocolViolation):
        StartupReader().feed(b"\x00\x01\x00\x00")
    with pytest.raises(m.ProtocolViolation):
        StartupReader().feed(b"\x00\x00\x00\x02")


@pytest.mark.parametrize(
    ("packet", "expected"),
    [
        (SSLRequest().encode(), SSLRequest()),
        (GSSENCRequest().encode(), GSSENCRequest()),
        (CancelRequest(42, -7).encode(), CancelRequest(42, -7)),
        (
            StartupMessage(196608, {"user": "ü", "options": "-c x=1"}).encode(),
            StartupMessage(196608, {"user": "ü", "options": "-c x=1"}),
        ),
    ],
)
def test_startup_packets_round_trip(packet: bytes, expected: object) -> None:
    assert decode_startup_packet(packet) == expected


@pytest.mark.parametrize(
    ("packet", "error"),
    [
        (b"\x00\x00\x00\x08\x00\x02\x00\x00", "unsupported frontend protocol 2.0"),
        (b"\x00\x00\x00\x09\x00\x03\x00\x00u", "terminator"),
        (b"\x00\x00\x00\x0b\x00\x03\x00\x00u\x00\x00", "odd number"),
        (StartupMessage(196608, {"database": "d"}).encode(), "no PostgreSQL user name"),
        (b"\x00\x00\x00\x0c\x04\xd2\x16\x2e\x00\x00\x00\x01", "cancel request"),
    ],
)
def test_bad_startup_packets(packet: bytes, error: str) -> None:
    with pytest.raises(m.ProtocolViolation, match=error):
        decode_startup_packet(packet)


def test_error_fields_round_trip() -> None:
    body = error_response("42501", "nope", severity="FATAL", detail="d", hint="h")[5:]
    fields = decode_fields(body)
    assert fields == {"S": "FATAL", "V": "FATAL", "C": "42501", "M": "nope", "D": "d", "H": "h"}
    assert sqlstate_of(body) == "42501"
    assert severity_of(body) == "FATAL"
    assert sqlstate_of(b"C22012\0Mx\0\0") == "22012"
    assert sqlstate_of(b"Mx\0\0") == ""


@settings(max_examples=300)
@given(
    msgs=st.lists(message_st, max_size=25),
    cuts=st.lists(st.integers(min_value=0, max_value=20000), max_size=30),
    captured_types=st.sets(st.sampled_from(TYPES)),
)
def test_located_rewrite_reassembles_the_stream(
    msgs: list[tuple[int, bytes]], cuts: list[int], captured_types: set[int]
) -> None:
    """Forwarding uncaptured bytes and re-encoding captured messages gives the stream back."""
    stream = b"".join(m.message(t, b) for t, b in msgs)
    counts = [0] * 256
    scanner = MessageScanner(capture_mask(bytes(captured_types)), counts, 1 << 20)
    out = bytearray()
    held = b""
    got = []
    for chunk in _split(stream, cuts):
        data = held + chunk
        located, hold = scanner.feed_located(data)
        pos = 0
        for typ, body, start, end in located:
            out += data[pos:start]
            out += m.message(typ, body)
            got.append((typ, body))
            pos = end
        out += data[pos : hold if hold is not None else len(data)]
        held = data[hold:] if hold is not None else b""
    assert held == b""
    assert bytes(out) == stream
    assert got == [(t, b) for t, b in msgs if t in captured_types]
    expected = [0] * 256
    for t, _ in msgs:
        expected[t] += 1
    assert counts == expected


def _expected_marks(msgs: list[tuple[int, bytes]], captured: set[int]) -> list[int]:
    """DataRows and CopyData before each captured message other than those."""
    out, rows = [], 0
    for t, _ in msgs:
        if t in captured and t not in (ord("D"), ord("d")):
            out.append(rows)
        if t in (ord("D"), ord("d")):
            rows += 1
    return out


@settings(max_examples=300)
@given(
    msgs=st.lists(message_st, max_size=30),
    cuts=st.lists(st.integers(min_value=0, max_value=20000), max_size=40),
    captured_types=st.sets(st.sampled_from(TYPES)),
    located=st.booleans(),
)
def test_marks_count_the_rows_before_each_captured_message(
    msgs: list[tuple[int, bytes]], cuts: list[int], captured_types: set[int], located: bool
) -> None:
    """However the stream is cut, and whether the rows are captured or not, the marks say
    how many DataRows and CopyData came before each captured message (the rows a statement
    sent before its error, counted without capturing them)."""
    stream = b"".join(m.message(t, b) for t, b in msgs)
    scanner = MessageScanner(capture_mask(bytes(captured_types)), [0] * 256, 1 << 20)
    scanner.marks = []
    marks: list[int] = []
    held = b""
    for chunk in _split(stream, cuts):
        if located:
            data = held + chunk
            _, hold = scanner.feed_located(data)
            held = data[hold:] if hold is not None else b""
        else:
            scanner.feed(chunk)
        marks += scanner.marks
    assert marks == _expected_marks(msgs, captured_types)
