"""White-box checks of the event id and timestamp (audit/events.py new_id, utc_timestamp):
their %-formatting (chosen for the compiled build's speed) must write exactly what the
f-strings before it wrote, in both implementations, whatever the clock says: the second
boundary, microseconds truncated (never rounded up into the next second), times before
1970, a clock that goes back, ids beyond 48 bits of milliseconds."""

from __future__ import annotations

import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from audit import events
from audit.events import new_id, utc_timestamp


def _timestamp_before(ns: int) -> str:
    """utc_timestamp as it was written before the %-formatting (commit 94cdb1a)."""
    secs, rem = divmod(ns, 1_000_000_000)
    return f"{time.strftime('%Y-%m-%dT%H:%M:%S', time.gmtime(secs))}.{rem // 1000:06d}Z"


NS = [
    0,
    1,
    999,
    1_000,
    999_999_999,  # the last microsecond of a second: .999999, not the next second
    1_000_000_000,
    1_000_000_999,
    1_700_000_000_999_999_999,
    1_700_000_001_000_000_000,
    -1,  # before 1970: 1969-12-31T23:59:59.999999Z
    -999,
    -1_000,
    -1_000_000_000,
    -1_000_000_001,
    253_402_300_799_999_999_999,  # 9999-12-31T23:59:59.999999Z
]


@pytest.mark.parametrize("ns", NS)
def test_timestamps_are_written_as_before(ns: int) -> None:
    assert utc_timestamp(ns) == _timestamp_before(ns)


def test_the_last_microsecond_of_a_second_stays_in_it() -> None:
    assert utc_timestamp(1_000_000_000 - 1) == "1970-01-01T00:00:00.999999Z"
    assert utc_timestamp(1_000_000_000) == "1970-01-01T00:00:01.000000Z"
    assert utc_timestamp(-1) == "1969-12-31T23:59:59.999999Z"


def test_a_clock_that_goes_back_gets_its_own_second() -> None:
    # the date is formatted once per second and kept: going back must not reuse it
    later, earlier = 1_700_000_001_000_000_000, 1_700_000_000_999_999_000
    assert utc_timestamp(later).startswith("2023-11-14T22:13:21.")
    assert utc_timestamp(earlier) == "2023-11-14T22:13:20.999999Z"
    assert utc_timestamp(later) == "2023-11-14T22:13:21.000000Z"


@settings(max_examples=300, deadline=None)
@given(st.lists(st.integers(-(10**18), 253_402_300_799 * 10**9), min_size=1, max_size=20))
def test_any_sequence_of_clock_readings(readings: list[int]) -> None:
    for ns in readings:
        assert utc_timestamp(ns) == _timestamp_before(ns)


def test_the_default_clock_gives_a_timestamp_of_now() -> None:
    before = time.time_ns() // 1_000_000_000
    ts = utc_timestamp()
    after = time.time_ns() // 1_000_000_000
    assert len(ts) == 27 and ts.endswith("Z")
    assert time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(before)) <= ts[:19]
    assert ts[:19] <= time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(after))


def _id_before(ms: int, counter: int) -> str:
    """new_id as it was written before the %-formatting."""
    return f"{ms:012x}{events._PROCESS}{counter & 0xFFFFFFFF:08x}"


@pytest.mark.parametrize(
    "ns",
    [0, 999_999, 1_000_000, 1_700_000_000_123_456_789, (2**48 - 1) * 1_000_000, 2**48 * 10**6],
)
def test_ids_are_written_as_before(ns: int) -> None:
    made = new_id(ns)
    counter = int(made[-8:], 16)
    assert made == _id_before(ns // 1_000_000, counter)
    if ns // 1_000_000 < 2**48:  # (from the year 10889 the time takes 13 digits, as before)
        assert made[12:-8] == events._PROCESS


def test_ids_made_in_one_millisecond_are_unique_and_ordered() -> None:
    ids = [new_id(1_700_000_000_000_000_000) for _ in range(1000)]
    assert len(set(ids)) == len(ids)
    assert ids == sorted(ids)
    assert all(len(i) == 32 for i in ids)
    # a later millisecond sorts after every id of the earlier one
    assert new_id(1_700_000_000_001_000_000) > ids[-1]


def test_ids_of_the_default_clock_are_of_now() -> None:
    before = time.time_ns() // 1_000_000
    made = new_id()
    after = time.time_ns() // 1_000_000
    assert before <= int(made[:12], 16) <= after
