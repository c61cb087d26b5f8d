"""The splicer rebuilds a stream with chosen messages replaced, however it is cut, and
hands DataRows over in order without changing them."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.wire import messages as m
from proxy.wire.framing import MessageScanner, capture_mask
from proxy.wire.splice import Pause, Splicer

TYPES = b"QPBDZCTd"
message_st = st.tuples(st.sampled_from(TYPES), st.binary(max_size=200))
cuts_st = st.lists(st.integers(min_value=0, max_value=20000), max_size=30)


def _split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    chunks, prev = [], 0
    for p in [*points, len(data)]:
        chunks.append(data[prev:p])
        prev = p
    return chunks


def _replace(typ: int, body: bytes, raw: bytes) -> bytes:
    """Queries become two messages, Parses vanish, everything else stays as it is."""
    if typ == m.QUERY:
        return m.message(m.QUERY, body[::-1]) + m.message(m.SYNC)
    if typ == m.PARSE:
        return b""
    return raw


def _expected(msgs: list[tuple[int, bytes]], captured: set[int]) -> bytes:
    out = b""
    for t, b in msgs:
        raw = m.message(t, b)
        out += _replace(t, b, raw) if t in captured else raw
    return out


@settings(max_examples=300)
@given(
    msgs=st.lists(message_st, max_size=25),
    cuts=cuts_st,
    captured=st.sets(st.sampled_from(TYPES)),
)
def test_any_split_gives_the_replaced_stream(
    msgs: list[tuple[int, bytes]], cuts: list[int], captured: set[int]
) -> None:
    stream = b"".join(m.message(t, b) for t, b in msgs)
    scanner = MessageScanner(capture_mask(bytes(captured)), [0] * 256, 1 << 20)
    splicer = Splicer()
    rows: list[bytes] = []
    out = b"".join(
        splicer.splice(scanner, chunk, _replace, "from test", rows.extend)
        for chunk in _split(stream, cuts)
    )
    assert splicer.held == b""
    assert out == _expected(msgs, captured)
    assert rows == [b for t, b in msgs if t == m.DATA_ROW and t in captured]


@given(msgs=st.lists(message_st, min_size=1, max_size=15), cuts=cuts_st, at=st.integers(0, 14))
def test_a_paused_stream_resumes_where_it_stopped(
    msgs: list[tuple[int, bytes]], cuts: list[int], at: int
) -> None:
    """A handler that pauses at one message keeps it and all after it until resumed."""
    stream = b"".join(m.message(t, b) for t, b in msgs)
    scanner = MessageScanner(capture_mask(TYPES), [0] * 256, 1 << 20)
    splicer = Splicer()
    seen = [0]
    pause = [min(at, len(msgs) - 1)]

    def handle(typ: int, body: bytes, raw: bytes) -> bytes:
        if seen[0] == pause[0]:
            pause[0] = -1
            raise Pause
        seen[0] += 1
        return _replace(typ, body, raw)

    out = b"".join(splicer.splice(scanner, c, handle, "from test") for c in _split(stream, cuts))
    assert splicer.paused is not None
    out += splicer.resume(scanner, handle, "from test")
    assert splicer.paused is None
    assert out == _expected(msgs, set(TYPES))


def test_a_malformed_body_is_a_protocol_violation() -> None:
    def handle(typ: int, body: bytes, raw: bytes) -> bytes:
        return m.message(typ, body[: body.index(b"\0")])  # (no terminator: ValueError)

    scanner = MessageScanner(capture_mask(b"Q"), [0] * 256, 1 << 20)
    with pytest.raises(m.ProtocolViolation, match="malformed message from client"):
        Splicer().splice(scanner, m.message(m.QUERY, b"x"), handle, "from client")
