"""RowDescription, DataRow and CommandComplete decode to what was encoded, and the hot
column reader agrees with the whole decode."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from proxy.wire import messages as m
from proxy.wire.rows import (
    Field,
    collect_column,
    column_origins,
    column_sources,
    command_complete,
    command_tag,
    data_row,
    decode_data_row,
    decode_row_description,
    row_count,
    row_description,
)
from tests.unit.wire.strategies import body_of, cstring, int16, int32, uint32, value

field_st = st.tuples(cstring, uint32, int16, uint32, int16, int32, st.sampled_from([0, 1]))


@given(fields=st.lists(field_st, max_size=10))
def test_a_row_description_round_trips(fields: list[Field]) -> None:
    body = body_of(row_description(fields), m.ROW_DESCRIPTION)
    assert decode_row_description(body) == fields
    assert column_sources(body) == [(f[1], f[2], f[3], f[6]) for f in fields]
    assert column_origins(body) == [(f[1], f[2]) for f in fields]


@given(values=st.lists(value, max_size=10))
def test_a_data_row_round_trips(values: list[bytes | None]) -> None:
    assert decode_data_row(body_of(data_row(values), m.DATA_ROW)) == values


@given(width=st.integers(1, 5), data=st.data())
def test_collect_column_agrees_with_the_whole_decode(width: int, data: st.DataObject) -> None:
    rows = data.draw(st.lists(st.lists(value, min_size=width, max_size=width), max_size=8))
    bodies = [body_of(data_row(r), m.DATA_ROW) for r in rows]
    for index in range(width):
        keys: set[bytes] = set()
        null = collect_column(bodies, index, keys)
        column = [r[index] for r in rows]
        assert keys == {v for v in column if v is not None}
        assert null == (None in column)


@given(tag=st.sampled_from([b"SELECT", b"INSERT 0", b"UPDATE", b"COPY", b"FETCH"]), n=uint32)
def test_a_command_complete_round_trips(tag: bytes, n: int) -> None:
    body = body_of(command_complete(tag + b" %d" % n), m.COMMAND_COMPLETE)
    assert command_tag(body) == tag + b" %d" % n
    assert row_count(body) == n


def test_a_tag_without_a_count_counts_nothing() -> None:
    assert row_count(body_of(command_complete(b"BEGIN"), m.COMMAND_COMPLETE)) == 0
    assert row_count(body_of(command_complete(b"CREATE TABLE"), m.COMMAND_COMPLETE)) == 0
