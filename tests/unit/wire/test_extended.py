"""Parse, Bind, Describe, Close, Execute and ParameterDescription decode to what was
encoded, and the session's partial readers agree with the whole decode."""

from __future__ import annotations

from hypothesis import assume, given
from hypothesis import strategies as st

from proxy.wire import messages as m
from proxy.wire.extended import (
    NO_TYPES,
    bind,
    bind_names,
    bind_parameters,
    bind_renamed,
    bind_values,
    close,
    declared_types,
    decode_bind,
    decode_execute,
    describe,
    execute,
    execute_portal,
    execute_renamed,
    parameter_description,
    parameter_types,
    parse,
    parse_message,
    parses_unnamed,
    target,
    type_section,
)
from tests.unit.wire.strategies import body_of, cstring, int32, uint32, value

oids = st.lists(uint32, max_size=12)
fmt = st.sampled_from([0, 1])


@given(name=cstring, query=cstring, types=oids)
def test_a_parse_round_trips(name: bytes, query: bytes, types: list[int]) -> None:
    body = body_of(parse(name, query, type_section(types)), m.PARSE)
    name_, query_, section = parse_message(body)
    assert (name_, query_) == (name, query)
    assert declared_types(section) == tuple(types)
    assert parses_unnamed(body) == (name == b"")


def test_a_parse_without_types_declares_none() -> None:
    assert parse_message(body_of(parse(b"s", b"SELECT 1"), m.PARSE))[2] == NO_TYPES
    assert declared_types(NO_TYPES) == ()
    assert declared_types(b"\0\5\0\0") == ()  # (cut short: the server refuses it)


bind_st = st.tuples(
    cstring,
    cstring,
    st.lists(fmt, max_size=4),
    st.lists(value, max_size=8),
    st.lists(fmt, max_size=6),
)


@given(parts=bind_st)
def test_a_bind_round_trips(
    parts: tuple[bytes, bytes, list[int], list[bytes | None], list[int]],
) -> None:
    portal, statement, formats, params, results = parts
    body = body_of(bind(*parts), m.BIND)
    assert decode_bind(body) == (portal, statement, tuple(formats), params, tuple(results))
    assert bind_names(body) == (portal, statement)


@given(parts=bind_st, wanted=st.sets(st.integers(1, 9)))
def test_bind_values_agrees_with_the_whole_decode(
    parts: tuple[bytes, bytes, list[int], list[bytes | None], list[int]], wanted: set[int]
) -> None:
    _portal, _statement, formats, params, results = parts
    assume(len(formats) in (0, 1, len(params)))  # (the server refuses any other count)
    got_results, got = bind_values(body_of(bind(*parts), m.BIND), wanted)
    assert got_results == results
    expected = {}
    for i, v in enumerate(params):
        if i + 1 in wanted and v is not None:
            f = formats[0] if len(formats) == 1 else (formats[i] if formats else 0)
            expected[i + 1] = (f, v)
    assert got == expected


@given(parts=bind_st, statement=cstring)
def test_a_renamed_bind_changes_the_statement_only(
    parts: tuple[bytes, bytes, list[int], list[bytes | None], list[int]], statement: bytes
) -> None:
    renamed = decode_bind(body_of(bind_renamed(body_of(bind(*parts), m.BIND), statement), m.BIND))
    original = decode_bind(body_of(bind(*parts), m.BIND))
    assert renamed == (original[0], statement, *original[2:])


@given(values=st.lists(st.none() | st.text(max_size=20), max_size=6))
def test_bind_parameters_reads_text_values(values: list[str | None]) -> None:
    params = [None if v is None else v.encode() for v in values]
    body = body_of(bind(b"", b"", [], params, []), m.BIND)
    assert bind_parameters(body, []) == [v for v in values if v is not None]


@given(n=int32)
def test_bind_parameters_reads_binary_integers_by_their_type(n: int) -> None:
    body = body_of(bind(b"", b"", [1], [n.to_bytes(4, "big", signed=True)], []), m.BIND)
    assert bind_parameters(body, [23]) == [str(n)]  # int4
    assert bind_parameters(body, [17]) == []  # bytea: no plain text form


@given(kind=st.sampled_from([b"S", b"P"]), name=cstring)
def test_describe_and_close_round_trip(kind: bytes, name: bytes) -> None:
    assert target(body_of(describe(kind, name), m.DESCRIBE)) == (kind, name)
    assert target(body_of(close(kind, name), m.CLOSE)) == (kind, name)


@given(portal=cstring, rows=int32, other=cstring)
def test_an_execute_round_trips(portal: bytes, rows: int, other: bytes) -> None:
    body = body_of(execute(portal, rows), m.EXECUTE)
    assert decode_execute(body) == (portal, rows)
    assert execute_portal(body) == portal
    assert decode_execute(execute_renamed(body, other)) == (other, rows)


@given(types=oids)
def test_a_parameter_description_round_trips(types: list[int]) -> None:
    body = body_of(parameter_description(types), m.PARAMETER_DESCRIPTION)
    assert parameter_types(body) == tuple(types)
