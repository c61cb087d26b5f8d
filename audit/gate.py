"""The result gate: a result never reaches its client before its audit event is written.

With batched writes (AuditWriter.batch_writes) the events of one event-loop iteration are
written together at its end. Meanwhile (`holding`) the shell hands every byte bound for a
client to `hold` instead of writing it; at the end of the iteration the writer writes the
events and asks `release` what becomes of those bytes. The gate decides, per session:

* `Deliver`: the events were written (or no result of that session waits for them, or
  `on_failure` is drop): the bytes go to the client, in the order they were held.
* withhold: the events could not be written, `on_failure` is block and the session's
  results wait for them: its bytes (and every later byte for it, in order) stay here.
  `PauseServer` when more than `high_water` bytes are withheld: the server waits, not
  pgveil's memory.
* when the sinks take every queued event again (`recovered`): `Deliver` what was withheld,
  and `ResumeServer` where it was paused.
* after `hold_timeout` seconds withheld (`expire`): `Abort` the session's connection; its
  results are never shown.
* `block` is the `on_failure: block` policy: statements on personal data are refused while
  the audit stream takes no events (AuditWriter.blocks), and withheld results are never
  released without their events.

Sessions are opaque handles (anything hashable the shell chooses); the gate never sees a
connection or a transport, and does no I/O: it returns decisions, the shell carries them
out (proxy/server.py). `wake` is called when held bytes need a release the writer has not
scheduled yet. Nothing here reads the bytes it holds.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from dataclasses import dataclass

WITHHELD_HIGH_WATER = 1 << 20  # withheld bytes per client before its server is paused


@dataclass(frozen=True, slots=True)
class Deliver:
    """Write `data` to the session's client now."""

    session: Hashable
    data: bytes


@dataclass(frozen=True, slots=True)
class PauseServer:
    """Stop reading from the session's server: too much of its output is withheld."""

    session: Hashable


@dataclass(frozen=True, slots=True)
class ResumeServer:
    """Read from the session's server again."""

    session: Hashable


@dataclass(frozen=True, slots=True)
class Abort:
    """Close the session's client connection at once: its results waited too long."""

    session: Hashable


GateAction = Deliver | PauseServer | ResumeServer | Abort


class ResultGate:
    """See the module docstring."""

    def __init__(
        self,
        block: bool,
        wake: Callable[[], None],
        hold_timeout: float = 5.0,
        high_water: int = WITHHELD_HIGH_WATER,
    ) -> None:
        self.block = block
        self.hold_timeout = hold_timeout
        self.high_water = high_water
        self._wake = wake
        # True while client bytes must go through `hold`: events of this iteration wait
        # for their write, or results are withheld. An attribute: the shell reads it for
        # every chunk bound for a client of an audited proxy.
        self.holding = False
        self._turn = False  # events were linked this iteration
        self._owners: set[Hashable] = set()  # sessions whose results wait for them
        self._held: list[tuple[Hashable, bytes]] = []
        self._stranded: dict[Hashable, _Withheld] = {}
        self.withheld = 0  # connections aborted because their results could not be recorded

    @property
    def stranded(self) -> bool:
        """Some session's bytes are withheld."""
        return bool(self._stranded)

    def linked(self, owner: Hashable | None) -> None:
        """An event was linked this iteration; `owner`: the session whose next results
        wait for it (None: no result does)."""
        self._turn = True
        self.holding = True
        if owner is not None:
            self._owners.add(owner)

    def hold(self, session: Hashable, data: bytes) -> None:
        """Bytes for the session's client, decided on at the next `release`."""
        self._held.append((session, data))
        self._wake()

    def release(self, written: bool, now: float) -> list[GateAction]:
        """The iteration's events were written (`written`) or not: what becomes of the
        bytes held meanwhile, in order."""
        held, self._held = self._held, []
        owners, self._owners = self._owners, set()
        self._turn = False
        stranded = self._stranded
        withhold = self.block and not written  # (with drop, results go out regardless)
        actions: list[GateAction] = []
        for session, data in held:
            withheld = stranded.get(session)
            if withheld is None and withhold and session in owners:
                withheld = stranded[session] = _Withheld(now)
            if withheld is None:
                actions.append(Deliver(session, data))
            elif withheld.add(data, self.high_water):
                actions.append(PauseServer(session))  # behind what is withheld already
        self.holding = bool(stranded)
        return actions

    def recovered(self) -> list[GateAction]:
        """The sinks took every queued event: what was withheld goes out, in order."""
        stranded, self._stranded = self._stranded, {}
        # bytes held since the last release wait for the release they scheduled: until it
        # runs, later bytes must queue behind them (this may run between the two)
        self.holding = self._turn or bool(self._held)
        actions: list[GateAction] = []
        for session, withheld in stranded.items():
            actions.append(Deliver(session, b"".join(withheld.chunks)))
            if withheld.paused:
                actions.append(ResumeServer(session))
        return actions

    def expire(self, now: float) -> list[GateAction]:
        """Withheld `hold_timeout` seconds or more: those connections are aborted."""
        expired = [s for s, w in self._stranded.items() if now - w.since >= self.hold_timeout]
        actions: list[GateAction] = []
        for session in expired:
            if self._stranded.pop(session).paused:
                actions.append(ResumeServer(session))
            actions.append(Abort(session))
        self.withheld += len(expired)
        self.holding = self._turn or bool(self._held) or bool(self._stranded)
        return actions

    def clear(self) -> None:
        """Shutdown: what is still withheld is dropped (its connections close with the
        proxy)."""
        self._stranded.clear()
        self.holding = self._turn or bool(self._held)


class _Withheld:
    """A session's bytes withheld until the events they follow are written."""

    __slots__ = ("chunks", "paused", "since", "size")

    def __init__(self, since: float) -> None:
        self.since = since
        self.chunks: list[bytes] = []
        self.size = 0
        self.paused = False

    def add(self, data: bytes, high_water: int) -> bool:
        """True when the server should be paused now."""
        self.chunks.append(data)
        self.size += len(data)
        if self.size > high_water and not self.paused:
            self.paused = True
            return True
        return False
