"""The wire code as the suite runs it (compiled by mypyc when built so) against its own
Python source, on random and mutated message streams: the same results, the same
ProtocolViolations, the same scanner state after every chunk, and no crash (issue 15: no
handling of untrusted bytes without a fuzz test over it).

The Python source is loaded a second time under another name (`_pure`), so one process
holds both. Under PGVEIL_PURE_PYTHON=1 both sides are Python and the test still checks that
the twin is loaded from the source the build compiles; the compiled run is the one that
matters, and CI runs the suite both ways.
"""

from __future__ import annotations

import importlib.util
import itertools
import struct
from collections.abc import Callable
from types import ModuleType
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from proxy.wire import errors, extended, framing, rows
from proxy.wire.messages import ProtocolViolation
from shared.implementation import implementation, source_path


def _pure(module: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(
        "_pure_" + module.replace(".", "_"), source_path(module)
    )
    assert spec is not None and spec.loader is not None
    loaded = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(loaded)
    return loaded


PURE_FRAMING = _pure("proxy.wire.framing")
PURE_ROWS = _pure("proxy.wire.rows")
PURE_ERRORS = _pure("proxy.wire.errors")
PURE_EXTENDED = _pure("proxy.wire.extended")

_TYPES = b"DCTZEN1234ABGHKSdcfnstIVWv"  # backend and frontend types, DataRow first


def test_the_twins_are_the_compiled_module_and_its_source() -> None:
    """What the fuzz tests below compare: the module the suite runs (compiled unless
    PGVEIL_PURE_PYTHON=1) and a module loaded from its source."""
    compiled = (framing.__spec__.origin or "").endswith(".so")
    assert compiled == (implementation() == "mypyc")
    assert PURE_FRAMING.__file__ == str(source_path("proxy.wire.framing"))
    assert type(PURE_FRAMING.MessageScanner) is type  # a Python class, not a native one


@st.composite
def _message(draw: st.DrawFn) -> bytes:
    typ = draw(st.sampled_from(_TYPES) | st.integers(0, 255))
    body = draw(st.binary(max_size=40))
    length = len(body) + 4
    if draw(st.integers(0, 9)) == 0:  # a mutated length: too small, too large, anything
        length = draw(st.integers(0, (1 << 32) - 1) | st.integers(0, 12))
    return struct.pack("!BI", typ, length) + body


@st.composite
def _stream(draw: st.DrawFn) -> tuple[bytes, list[int]]:
    data = b"".join(draw(st.lists(_message(), max_size=30)))
    if data and draw(st.booleans()):  # flip some bytes anywhere
        mutable = bytearray(data)
        for at in draw(st.lists(st.integers(0, len(data) - 1), max_size=4)):
            mutable[at] = draw(st.integers(0, 255))
        data = bytes(mutable)
    data += draw(st.binary(max_size=6))  # a ragged tail: a header or body cut short
    cuts = sorted(set(draw(st.lists(st.integers(0, len(data)), max_size=8))))
    return data, cuts


def _chunks(data: bytes, cuts: list[int]) -> list[bytes]:
    bounds = [0, *cuts, len(data)]
    return [data[a:b] for a, b in itertools.pairwise(bounds)]


def _scanner(module: ModuleType, config: dict[str, Any]) -> Any:
    capture = module.capture_mask(config["capture"])
    allowed = (
        module.capture_mask(everything=True)
        if config["allowed"] is None
        else (module.capture_mask(config["allowed"]))
    )
    s = module.MessageScanner(capture, [0] * 256, config["max_length"], allowed)
    if config["marks"]:
        s.marks = []
    if config["rows"]:
        s.rows = []
    return s


def _state(s: Any) -> tuple[Any, ...]:
    return (
        list(s.counts),
        s.last_type,
        None if s.marks is None else list(s.marks),
        None if s.rows is None else list(s.rows),
        list(s.row_ends),
        s.at_boundary,
        s.can_locate,
    )


def _outcome(call: Callable[..., Any], *args: Any) -> Any:
    try:
        result = call(*args)
    except ProtocolViolation as exc:
        return ("violation", str(exc))
    except Exception as exc:  # compared, not hidden: the twin must fail the same way
        return ("error", type(exc).__name__, str(exc))
    return ("ok", result)


_CONFIG = st.fixed_dictionaries(
    {
        "capture": st.binary(max_size=6).map(lambda b: b + b"Z"),
        "allowed": st.none() | st.just(_TYPES),
        "max_length": st.sampled_from([8, 64, 1 << 20]),
        "marks": st.booleans(),
        "rows": st.booleans(),
    }
)
_SETTINGS = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@_SETTINGS
@given(_stream(), _CONFIG)
def test_feed_matches_the_python_source(stream: tuple[bytes, list[int]], config: Any) -> None:
    data, cuts = stream
    ours, twin = _scanner(framing, config), _scanner(PURE_FRAMING, config)
    for chunk in _chunks(data, cuts):
        got, want = _outcome(ours.feed, chunk), _outcome(twin.feed, chunk)
        assert got == want
        if got[0] != "ok":
            break  # a violation ends the session: nothing is fed after it
        assert _state(ours) == _state(twin)
        assert _outcome(ours.boundary_in, chunk) == _outcome(twin.boundary_in, chunk)


@_SETTINGS
@given(_stream(), _CONFIG)
def test_feed_located_matches_the_python_source(
    stream: tuple[bytes, list[int]], config: Any
) -> None:
    data, cuts = stream
    ours, twin = _scanner(framing, config), _scanner(PURE_FRAMING, config)
    held = b""
    for chunk in _chunks(data, cuts):
        fed = held + chunk
        got = _outcome(ours.feed_located, fed)
        assert got == _outcome(twin.feed_located, fed)
        if got[0] != "ok":
            break
        assert _state(ours) == _state(twin)
        at = got[1][1]
        held = fed[at:] if at is not None else b""


@_SETTINGS
@given(_stream())
def test_startup_reader_matches_the_python_source(stream: tuple[bytes, list[int]]) -> None:
    data, cuts = stream
    ours, twin = framing.StartupReader(), PURE_FRAMING.StartupReader()
    for chunk in _chunks(data, cuts):
        got = _outcome(ours.feed, chunk)
        assert got == _outcome(twin.feed, chunk)
        if got[0] != "ok":
            break


@_SETTINGS
@given(st.binary(max_size=80), st.sets(st.integers(0, 6), max_size=3))
def test_body_readers_match_the_python_source(body: bytes, wanted: set[int]) -> None:
    """The readers of message bodies the server or a client sends (what the session takes
    apart per statement): the same values or the same failure, on any bytes."""
    pairs: list[tuple[Callable[[bytes], Any], Callable[[bytes], Any]]] = [
        (rows.column_origins, PURE_ROWS.column_origins),
        (rows.decode_row_description, PURE_ROWS.decode_row_description),
        (rows.decode_data_row, PURE_ROWS.decode_data_row),
        (rows.row_count, PURE_ROWS.row_count),
        (errors.decode_fields, PURE_ERRORS.decode_fields),
        (errors.sqlstate_of, PURE_ERRORS.sqlstate_of),
        (extended.parse_message, PURE_EXTENDED.parse_message),
        (extended.bind_names, PURE_EXTENDED.bind_names),
        (extended.decode_execute, PURE_EXTENDED.decode_execute),
        (extended.parameter_types, PURE_EXTENDED.parameter_types),
    ]
    assert _outcome(extended.bind_values, body, wanted) == _outcome(
        PURE_EXTENDED.bind_values, body, wanted
    )
    for ours, twin in pairs:
        assert _outcome(ours, body) == _outcome(twin, body)
