"""Query and ReadyForQuery decode to what was encoded."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from proxy.wire import messages as m
from proxy.wire.simple import TERMINATE_MESSAGE, query, query_text, ready_for_query, tx_status
from tests.unit.wire.strategies import body_of, cstring


@given(text=cstring)
def test_a_query_round_trips(text: bytes) -> None:
    assert query_text(body_of(query(text), m.QUERY)) == text


@given(status=st.sampled_from([m.TX_IDLE, m.TX_IN_BLOCK, m.TX_FAILED]))
def test_ready_for_query_round_trips(status: int) -> None:
    assert tx_status(body_of(ready_for_query(status), m.READY_FOR_QUERY)) == status


def test_an_empty_ready_for_query_reads_idle_and_terminate_is_empty() -> None:
    assert tx_status(b"") == m.TX_IDLE
    assert body_of(TERMINATE_MESSAGE, m.TERMINATE) == b""
