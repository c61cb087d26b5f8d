"""Hypothesis strategies and helpers shared by the wire codec's round-trip tests."""

from __future__ import annotations

from hypothesis import strategies as st

from proxy.wire.framing import header

int16 = st.integers(-(2**15), 2**15 - 1)
int32 = st.integers(-(2**31), 2**31 - 1)
uint32 = st.integers(0, 2**32 - 1)
# protocol strings: any bytes but NUL, their terminator
cstring = st.binary(max_size=80).map(lambda b: b.replace(b"\0", b"x"))
text = st.text(
    alphabet=st.characters(blacklist_characters="\0", blacklist_categories=("Cs",)), max_size=60
)
value = st.none() | st.binary(max_size=60)


def body_of(message: bytes, typ: int) -> bytes:
    """The body of one whole typed message, after checking its header."""
    got, length = header(message)
    assert got == typ
    assert 1 + length == len(message)
    return message[5:]
