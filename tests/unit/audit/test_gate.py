"""The audit result gate, sans I/O: held client bytes in, decisions out (audit/gate.py).

Sessions are plain strings here: the gate only needs a hashable handle."""

from __future__ import annotations

from audit.gate import Abort, Deliver, PauseServer, ResultGate, ResumeServer


class Wakes:
    def __init__(self) -> None:
        self.count = 0

    def __call__(self) -> None:
        self.count += 1


def gate(block: bool = True, high_water: int = 1 << 20) -> tuple[ResultGate, Wakes]:
    wakes = Wakes()
    return ResultGate(block, wakes, hold_timeout=5.0, high_water=high_water), wakes


def test_bytes_are_held_while_an_event_waits_and_delivered_in_order_once_written() -> None:
    g, wakes = gate()
    assert not g.holding
    g.linked("a")
    assert g.holding
    g.hold("a", b"1")
    g.hold("b", b"x")
    g.hold("a", b"2")
    assert wakes.count == 3  # each hold asks for a release
    assert g.release(written=True, now=0.0) == [
        Deliver("a", b"1"), Deliver("b", b"x"), Deliver("a", b"2")
    ]  # fmt: skip
    assert not g.holding and not g.stranded


def test_under_block_an_unwritten_event_withholds_its_owners_results_only() -> None:
    g, _ = gate()
    g.linked("a")  # a's result waits for its event
    g.linked(None)  # a session.start, say: no result waits for it
    g.hold("a", b"row")
    g.hold("b", b"other")
    assert g.release(written=False, now=0.0) == [Deliver("b", b"other")]
    assert g.holding and g.stranded  # a's bytes stay, and so does everything after them
    g.hold("a", b"more")
    assert g.release(written=True, now=1.0) == []
    assert g.recovered() == [Deliver("a", b"rowmore")]
    assert not g.holding and not g.stranded


def test_under_drop_results_go_out_even_when_their_events_were_not_written() -> None:
    g, _ = gate(block=False)
    g.linked("a")
    g.hold("a", b"row")
    assert g.release(written=False, now=0.0) == [Deliver("a", b"row")]
    assert not g.holding


def test_the_server_is_paused_past_the_high_water_and_resumed_on_release() -> None:
    g, _ = gate(high_water=10)
    g.linked("a")
    g.hold("a", b"x" * 8)
    assert g.release(written=False, now=0.0) == []
    g.hold("a", b"y" * 8)
    g.hold("a", b"z" * 8)
    assert g.release(written=True, now=0.0) == [PauseServer("a")]  # once, not per chunk
    assert g.recovered() == [Deliver("a", b"x" * 8 + b"y" * 8 + b"z" * 8), ResumeServer("a")]


def test_withheld_too_long_the_connection_is_aborted() -> None:
    g, _ = gate(high_water=1)
    g.linked("a")
    g.hold("a", b"row")
    g.linked("b")
    g.hold("b", b"row")
    g.release(written=False, now=100.0)
    assert g.expire(now=104.9) == []
    g.linked("c")
    g.hold("c", b"late")
    g.release(written=False, now=103.0)  # withheld later: its own clock
    assert g.expire(now=105.0) == [ResumeServer("a"), Abort("a"), ResumeServer("b"), Abort("b")]
    assert g.withheld == 2 and g.holding  # c is still withheld
    assert g.expire(now=108.0) == [ResumeServer("c"), Abort("c")]
    assert g.withheld == 3 and not g.holding and not g.stranded


def test_clear_drops_what_is_withheld() -> None:
    g, _ = gate()
    g.linked("a")
    g.hold("a", b"row")
    g.release(written=False, now=0.0)
    g.clear()
    assert not g.holding and g.recovered() == []
