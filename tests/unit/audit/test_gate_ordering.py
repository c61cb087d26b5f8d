"""White-box attack on the audit result gate (audit/gate.py) as the shell drives it.

The shell (proxy/server.py) writes a client's bytes directly while `gate.holding` is False
and hands them to `gate.hold` otherwise; the writer calls `release` once per event-loop
iteration and `recovered` / `expire` from its background task, which may run between a
`hold` and the `release` it scheduled. These tests drive the gate exactly that way (a
model of the shell: `Shell` below, no sockets) and check what every client receives:

* its bytes in the order the engine produced them, whatever happens in between;
* nothing produced after an event of its own that could not be written, until the sinks
  take the events (then everything, in order), or never (aborted);
* no byte of one session delivered to another.
"""

from __future__ import annotations

import random
from collections.abc import Hashable

import pytest

from audit.gate import Abort, Deliver, GateAction, PauseServer, ResultGate, ResumeServer


class Shell:
    """What proxy/server.py does with the gate: direct writes while not holding, the
    gate's decisions carried out per session, aborted sessions receive nothing more."""

    def __init__(self, block: bool = True, high_water: int = 1 << 20) -> None:
        self.wakes = 0
        self.gate = ResultGate(block, self._wake, hold_timeout=5.0, high_water=high_water)
        self.received: dict[Hashable, bytes] = {}
        self.produced: dict[Hashable, bytes] = {}
        self.aborted: set[Hashable] = set()
        self.paused: set[Hashable] = set()

    def _wake(self) -> None:
        self.wakes += 1

    def send(self, session: Hashable, data: bytes) -> None:
        """The engine produced `data` for the session's client (ServerConnection /
        ClientConnection._to_client)."""
        self.produced[session] = self.produced.get(session, b"") + data
        if session in self.aborted:
            return
        if self.gate.holding:
            self.gate.hold(session, data)
        else:
            self._write(session, data)

    def _write(self, session: Hashable, data: bytes) -> None:
        if session not in self.aborted:
            self.received[session] = self.received.get(session, b"") + data

    def apply(self, actions: list[GateAction]) -> None:
        for action in actions:
            if isinstance(action, Deliver):
                self._write(action.session, action.data)
            elif isinstance(action, PauseServer):
                assert action.session not in self.paused, "paused twice"
                self.paused.add(action.session)
            elif isinstance(action, ResumeServer):
                assert action.session in self.paused, "resumed a server never paused"
                self.paused.discard(action.session)
            elif isinstance(action, Abort):
                self.aborted.add(action.session)


def test_bytes_held_when_the_sinks_recover_stay_ahead_of_later_bytes() -> None:
    """The writer's task may take the recovery (`recovered`) between a `hold` and the
    `release` that hold scheduled. The held chunk is still waiting in the gate: a chunk
    the engine produces after it must not be written past it."""
    s = Shell()
    g = s.gate
    g.linked("a")
    s.send("a", b"1")
    s.apply(g.release(written=False, now=0.0))  # a's event not written: withheld
    s.send("a", b"2")  # held: a release is scheduled
    s.apply(g.recovered())  # the writer's task runs first: the sink took the events
    s.send("a", b"3")  # the engine's next chunk for a, before the scheduled release
    s.apply(g.release(written=True, now=1.0))
    assert s.received["a"] == b"123"


def test_another_sessions_bytes_held_at_recovery_stay_in_order() -> None:
    """Session b has nothing withheld, but its chunks were held because a's were (the
    gate holds every client's bytes while anything is withheld). The recovery of a must
    not let b's next chunk overtake b's held one."""
    s = Shell()
    g = s.gate
    g.linked("a")
    s.send("a", b"A1")
    s.apply(g.release(written=False, now=0.0))
    s.send("b", b"b1")
    s.apply(g.recovered())
    s.send("b", b"b2")
    s.apply(g.release(written=True, now=1.0))
    assert s.received == {"a": b"A1", "b": b"b1b2"}


def test_another_sessions_bytes_held_when_one_is_aborted_stay_in_order() -> None:
    """As above, with the withheld session aborted (`expire`) instead of recovered."""
    s = Shell()
    g = s.gate
    g.linked("a")
    s.send("a", b"A1")
    s.apply(g.release(written=False, now=0.0))
    s.send("b", b"b1")
    s.apply(g.expire(now=10.0))
    assert s.aborted == {"a"}
    s.send("b", b"b2")
    s.apply(g.release(written=True, now=10.0))
    assert s.received == {"b": b"b1b2"}


def test_pipelined_results_after_a_withheld_one_wait_behind_it() -> None:
    """Pipelined statements: the first result's event is not written, the next results
    need no event (no personal data) and come in later iterations whose events were
    written: they stay behind the withheld one and go out with it, in order."""
    s = Shell()
    g = s.gate
    g.linked("a")
    s.send("a", b"personal")
    s.apply(g.release(written=False, now=0.0))
    for i in range(5):
        s.send("a", b"|%d" % i)
        s.apply(g.release(written=True, now=float(i)))
    assert "a" not in s.received
    s.apply(g.recovered())
    assert s.received["a"] == b"personal|0|1|2|3|4"
    assert not g.holding and not g.stranded


def test_a_paused_server_is_resumed_when_withheld_bytes_go_out_or_are_aborted() -> None:
    s = Shell(high_water=4)
    g = s.gate
    g.linked("a")
    g.linked("b")
    s.send("a", b"xxxxx")
    s.send("b", b"yyyyy")
    s.apply(g.release(written=False, now=0.0))
    assert s.paused == {"a", "b"}
    s.apply(g.expire(now=5.0))  # both withheld since 0.0: both aborted, both resumed
    assert s.paused == set() and s.aborted == {"a", "b"}
    g.linked("c")
    s.send("c", b"zzzzz")
    s.apply(g.release(written=False, now=6.0))
    assert s.paused == {"c"}
    s.apply(g.recovered())
    assert s.paused == set() and s.received == {"c": b"zzzzz"}


def test_a_drop_gate_never_withholds_nor_pauses() -> None:
    s = Shell(block=False, high_water=1)
    g = s.gate
    for i in range(3):
        g.linked("a")
        s.send("a", b"%d" % i)
        s.apply(g.release(written=False, now=float(i)))
    assert s.received == {"a": b"012"} and not g.stranded and not s.paused
    assert g.expire(now=100.0) == []


@pytest.mark.parametrize("seed", range(40))
def test_random_schedules_keep_order_isolation_and_the_event_first(seed: int) -> None:
    """Random interleavings of what the engine, the loop and the writer's task do: for
    every session, what its client received is a prefix of what was produced for it, in
    order; a session with an unwritten event of its own receives nothing produced after
    it until the recovery; an aborted session receives nothing more."""
    rnd = random.Random(seed)
    s = Shell(high_water=rnd.choice([3, 50, 1 << 20]))
    g = s.gate
    sessions = ["a", "b", "c"]
    counter = 0
    now = 0.0
    failing = False
    frozen: dict[str, int] = {}  # withheld sessions: what they had received by then
    owners: set[str] = set()
    for _ in range(300):
        op = rnd.random()
        now += rnd.random()
        if op < 0.15:
            who = rnd.choice(sessions)
            g.linked(who)
            owners.add(who)
        elif op < 0.6:
            who = rnd.choice(sessions)
            counter += 1
            s.send(who, b"<%s%d>" % (who.encode(), counter))
        elif op < 0.8:
            written = not failing and rnd.random() < 0.7
            held = {h for h, _ in g._held}  # (the gate's: whose bytes this release decides)
            s.apply(g.release(written=written, now=now))
            if not written:
                failing = True
                for o in owners & held:
                    frozen.setdefault(o, len(s.received.get(o, b"")))
            owners = set()
        elif op < 0.9:
            if failing and rnd.random() < 0.5:
                s.apply(g.recovered())
                failing = False
                frozen = {}
        else:
            s.apply(g.expire(now=now))
        for who in sessions:
            got = s.received.get(who, b"")
            assert s.produced.get(who, b"").startswith(got), (seed, who, got)
            if who in frozen:
                assert len(got) == frozen[who], (seed, who, "released before its event")
    s.apply(g.release(written=not failing, now=now))
    if failing:
        s.apply(g.recovered())
    for who in sessions:
        if who not in s.aborted:
            assert s.received.get(who, b"") == s.produced.get(who, b""), (seed, who)
    assert s.paused <= s.aborted, s.paused
