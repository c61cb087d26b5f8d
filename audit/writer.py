"""The bounded audit writer: links events into the hash chain and delivers them to sinks.

`submit` is called on the event loop. It links the event (so the chain's order is the
order things happened) and writes it at once to the file and stdout sinks (a write to the
operating system, microseconds; durable against a crash of pgveil). The table sink gets
events in batches from a background task. A sink that fails keeps its events queued and
is retried every second; while any sink fails or a queue is full, `accepting()` is False,
and with `on_failure: block` statements that touch personal data are refused rather than
run unrecorded (`blocks()`). An event that a result waits for (it has an `owner`) is never
dropped under `block`: the queue takes it beyond its bound (the statements in flight when
it filled are few: new ones are refused), and the result is withheld until the event is
written. Other events (session start and end, refusals) that find the queue full are
dropped and counted. With `on_failure: drop` statements run and every event that cannot
be queued is dropped and counted; results are not withheld. Nothing here sees statement
literals or row values: callers pass only what audit events may hold.

Which client bytes wait for which events is decided by the result gate (audit/gate.py,
sans I/O, sessions as opaque handles); the shell carries its decisions out. This module
drives the queue and the sinks only: it must not touch a client or server connection.

The writer also keeps the chain provable (audit/anchors.py): it seals a checkpoint every
`checkpoint_every` events, every `checkpoint_interval` seconds while events come, as the
last event of a file before it is rotated, at start when a chain goes on, and at shutdown;
each goes into the chain and to the anchor file (after the file sink has taken it, so the
anchor never runs ahead of the file) and to the log. At start it checks the ends of the
file and of the table against the newest anchor (audit/resume.py) and records an
`audit.gap` before going on when they fall short.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import time
from collections.abc import Callable, Hashable, Mapping, Sequence
from pathlib import Path
from typing import Any

import asyncpg

from audit import resume
from audit.anchors import AnchorFile, key_id, newest_anchor, seal_with
from audit.events import CHECKPOINT, GAP, Chain
from audit.files import ROTATE
from audit.gate import Abort, GateAction, ResultGate
from audit.sinks import FileSink, SinkBacklogged, SyncSink, TableSink

_log = logging.getLogger("pgveil.audit")
TABLE_BATCH = 1000


class AuditWriter:
    def __init__(
        self,
        sinks: list[SyncSink],
        table: TableSink | None = None,
        on_failure: str = "block",
        queue_size: int = 10_000,
        key: bytes | None = None,
        anchor: Path | None = None,
        checkpoint_every: int = 1000,
        checkpoint_interval: float = 10.0,
    ) -> None:
        if not sinks and table is None:
            raise ValueError("an audit writer needs at least one sink")
        self.sinks = sinks
        self.table = table
        self.on_failure = on_failure
        self.queue_size = queue_size
        self.chain = Chain()
        self.chain_id = ""  # set by start()
        self.key_id = key_id(key) if key is not None else None
        self._key = key
        self._sealer = seal_with(key) if key is not None else None
        self.anchor_path = anchor
        self._anchor: AnchorFile | None = None
        self._anchor_pending: list[bytes] = []
        self._anchor_failing = False
        self.checkpoint_every = checkpoint_every
        self.checkpoint_interval = checkpoint_interval
        self._since = 0  # events linked since the last checkpoint
        self._checkpoint_at = time.monotonic()
        self.checkpointed = asyncio.Event()  # set by every checkpoint sealed
        self.gaps = 0
        self._file = next((s for s in sinks if isinstance(s, FileSink)), None)
        self._pending: dict[str, collections.deque[bytes]] = {
            s.name: collections.deque() for s in sinks
        }
        self._table_queue: collections.deque[tuple[dict[str, Any], bytes]] = collections.deque()
        self._failing: set[str] = set()
        # blocks(), kept current where its inputs change (_changed): read for every chunk
        # of an audited session, it is an attribute there, not two calls
        self.blocking = False
        self._wake = asyncio.Event()
        self._table_lock = asyncio.Lock()
        self.written = 0
        self.dropped = 0
        self.failures = 0
        # set while statements need not wait (not `blocking`): what a waiting session awaits
        self.recovered = asyncio.Event()
        self.recovered.set()
        # batching (see `batch_writes`): lines linked but not yet written; what becomes of
        # the client bytes that wait for them is the gate's decision (audit/gate.py)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._unwritten: list[bytes] = []
        self._scheduled = False
        self.gate = ResultGate(on_failure == "block", self._schedule)
        self._apply: Callable[[list[GateAction]], None] = _unapplied

    def batch_writes(
        self,
        loop: asyncio.AbstractEventLoop,
        apply: Callable[[list[GateAction]], None],
        hold_timeout: float = 5.0,
    ) -> None:
        """Write the file and stdout sinks once per event-loop iteration instead of once per
        event. Results must then reach their clients after their events: the shell hands
        client bytes to `gate.hold` while `gate.holding` is True, and `release` (run once
        the iteration's I/O callbacks are done) writes the events, then hands `apply` the
        gate's decisions about those bytes, in order (see audit/gate.py): delivered,
        withheld until the sinks take the events, or their connections aborted after
        `hold_timeout` seconds. So a result never reaches its client before its event is
        handed to the operating system. `apply` carries the decisions out; nothing here
        touches a client connection."""
        self._loop = loop
        self._apply = apply
        self.gate.hold_timeout = hold_timeout

    def _schedule(self) -> None:
        if not self._scheduled and self._loop is not None:
            self._scheduled = True
            self._loop.call_soon(self.release)

    def release(self) -> None:
        """Write the events of this iteration, then let the gate decide on the client bytes
        held back for them."""
        self._scheduled = False
        written = True
        if self._unwritten:
            lines, self._unwritten = self._unwritten, []
            written = self._write_linked(lines)
        actions = self.gate.release(written, time.monotonic())
        if actions:
            self._apply(actions)

    def _expire_withheld(self) -> None:
        """Withheld too long: the connections are aborted; their results are never shown."""
        actions = self.gate.expire(time.monotonic())
        if not actions:
            return
        _log.error(
            "audit.results_withheld",
            extra={
                "fields": {
                    "connections": sum(isinstance(a, Abort) for a in actions),
                    "reason": "audit sink failing",
                }
            },
        )
        self._apply(actions)

    async def start(self) -> None:
        """Check the ends of the file and the table against the newest anchor and go on
        from the furthest one known, recording a gap first when a copy falls short (see
        audit/resume.py). Raises when the table sink cannot be reached: fail loudly."""
        anchor = None
        if self.anchor_path is not None:
            anchor, forged = newest_anchor(self.anchor_path, self._key)
            for problem in forged:
                _log.error("audit.anchor_forged", extra={"fields": {"problem": problem}})
        file_state = None
        if self._file is not None:
            file_state = resume.check_file(self._file.path, anchor)
        table_end, table_chain = None, None
        if self.table is not None:
            last, table_chain = await self.table.tail()
            if last is not None:
                seq = last.get("seq")
                table_end = resume.End(seq if type(seq) is int else 0, str(last["hash"]))
        plan = resume.plan(anchor, file_state, table_end, self.table is not None, table_chain)
        self.chain = Chain(plan.hash, plan.seq)
        self.chain_id = plan.chain
        if self.anchor_path is not None:
            self._anchor = AnchorFile(self.anchor_path)
        if plan.gap is not None:
            self.gaps += 1
            _log.error(
                "audit.gap",
                extra={"fields": {"expected": plan.gap["expected"], "found": plan.gap["found"]}},
            )
            self._deliver(*self._seal(GAP, plan.gap), None)
        if plan.resumed:
            self.checkpoint("start")

    def _seal(self, event_type: str, fields: Mapping[str, Any]) -> tuple[dict[str, Any], bytes]:
        """Link a sealed event (a checkpoint or a gap): with the key's id and `mac` when
        there is a key. Checkpoints wait to go to the anchor file."""
        if self.key_id is not None:
            fields = {**fields, "key": self.key_id}
        event, line = self.chain.link_line(event_type, fields, seal=self._sealer)
        if event_type == CHECKPOINT:
            self._anchor_pending.append(line)
            self._checkpointed(event)
        return event, line

    def checkpoint(self, reason: str) -> None:
        """Seal a checkpoint: into the chain, the anchor file (once the file sink has
        taken it) and the log."""
        event, line = self._seal(CHECKPOINT, self._checkpoint_fields(reason))
        self._deliver(event, line, None)

    def _checkpoint_fields(self, reason: str) -> dict[str, Any]:
        return {"chain": self.chain_id, "reason": reason, "every": self.checkpoint_every}

    def _checkpointed(self, event: Mapping[str, Any]) -> None:
        self._since = 0
        self._checkpoint_at = time.monotonic()
        self.checkpointed.set()
        _log.info(
            "audit.checkpoint",
            extra={
                "fields": {
                    "chain": self.chain_id,
                    "seq": event["seq"],
                    "hash": event["hash"],
                    "reason": event["reason"],
                }
            },
        )

    @property
    def failing(self) -> bool:
        return bool(self._failing)

    @property
    def depth(self) -> int:
        queued = [len(q) for q in self._pending.values()]
        return max([len(self._table_queue), *queued])

    def accepting(self) -> bool:
        # while no sink fails, the file and stdout queues are written at once and empty:
        # only the table sink's can be long
        return not self._failing and len(self._table_queue) < self.queue_size

    def blocks(self) -> bool:
        """Whether statements on personal data must wait for the audit stream now, and be
        refused if it is not back in time: `on_failure: block` while it takes no events.
        (The same as the attribute `blocking`.)"""
        return self.on_failure == "block" and not self.accepting()

    def _changed(self) -> None:
        """A sink failed or recovered, or the table's queue grew or shrank."""
        self.blocking = blocking = self.blocks()
        if blocking:
            self.recovered.clear()
        elif not self.recovered.is_set():
            self.recovered.set()  # (a full table queue drained counts too, not only a sink)

    def submit(
        self,
        event_type: str,
        fields: Mapping[str, Any],
        who: Mapping[str, Any] | None = None,
        owner: Hashable | None = None,
    ) -> bool:
        """Record one event. False when it was dropped (counted): the queue is full and
        no result waits for it, or `on_failure` is drop. `owner`: the client whose results
        wait for this event (see `batch_writes`); under block such an event is always
        taken, so that no result goes out without its event. The owner is an opaque handle
        the shell chooses (audit/gate.py)."""
        # while no sink fails the file and stdout queues are empty: only the table's counts
        if (
            (self._failing or self._table_queue)
            and self.depth >= self.queue_size
            and (owner is None or self.on_failure == "drop")
        ):
            self.dropped += 1
            return False
        event, line = self.chain.link_line(event_type, fields, who=who)
        self.written += 1
        self._since += 1  # before a rotation's checkpoint after it, which counts from 0
        self._deliver(event, line, owner)
        if self._since >= self.checkpoint_every:
            self.checkpoint("count")
        return True

    def _deliver(self, event: dict[str, Any], line: bytes, owner: Hashable | None) -> None:
        if self._loop is not None and self.sinks:
            self._unwritten.append(line)
            self.gate.linked(owner)
            self._schedule()
        else:
            self._write_linked([line])
        if self.table is not None:
            self._table_queue.append((event, line))
            self._changed()
            self._wake.set()

    def _write_linked(self, lines: list[bytes]) -> bool:
        """Write linked lines to the file and stdout sinks; when the file is due for
        rotation after them, seal a checkpoint as its last event and rotate there."""
        f = self._file
        if (
            f is not None
            and f.name not in self._failing
            and f.due(sum(map(len, lines)) + len(lines))
        ):
            event, line = self._seal(CHECKPOINT, self._checkpoint_fields("rotation"))
            if self.table is not None:
                self._table_queue.append((event, line))
                self._changed()
                self._wake.set()
            lines = [*lines, line, ROTATE]
        written = self._write_sinks(lines)
        if written:
            self._write_anchors()
        return written

    def _write_anchors(self) -> None:
        """Checkpoints to the anchor file, once every file and stdout sink took them."""
        if not self._anchor_pending:
            return
        if self._anchor is None:
            self._anchor_pending.clear()
            return
        if self._unwritten or self._failing.intersection(s.name for s in self.sinks):
            return  # the anchor must not run ahead of the file: release() comes back here
        try:
            self._anchor.append(self._anchor_pending)
        except OSError as exc:
            if not self._anchor_failing:
                self._anchor_failing = True
                _log.error(
                    "audit.anchor_failed",
                    extra={"fields": {"file": str(self._anchor.path), "error": _error_text(exc)}},
                )
            return
        self._anchor_pending.clear()
        if self._anchor_failing:
            self._anchor_failing = False
            _log.info("audit.anchor_recovered", extra={"fields": {"file": str(self._anchor.path)}})

    def _write_sinks(self, lines: Sequence[bytes]) -> bool:
        """True when every file and stdout sink took the lines (else they stay queued)."""
        written = True
        for sink in self.sinks:
            if sink.name not in self._failing:
                try:
                    sink.write(lines)
                    continue
                except SinkBacklogged as backlogged:  # (own name: compiled, one type per name)
                    # it kept what it could not write: nothing to queue again
                    self._fail(sink.name, _error_text(backlogged))
                    written = False
                    continue
                except Exception as exc:
                    self._fail(sink.name, _error_text(exc))
            self._pending[sink.name].extend(lines)
            written = False
        return written

    def _flush(self, sink: SyncSink) -> bool:
        queue = self._pending[sink.name]
        try:
            sink.write(queue)
        except SinkBacklogged as backlogged:  # (own name: compiled, one type per name)
            queue.clear()  # taken: the sink keeps the rest
            self._fail(sink.name, _error_text(backlogged))
            return False
        except Exception as exc:
            self._fail(sink.name, _error_text(exc))
            return False
        queue.clear()
        self._recover(sink.name)
        self._write_anchors()
        return True

    def _fail(self, name: str, error: str) -> None:
        self.failures += 1
        if name not in self._failing:
            _log.error("audit.write_failed", extra={"fields": {"sink": name, "error": error}})
            self._failing.add(name)
            self._changed()
            self._wake.set()

    def _recover(self, name: str) -> None:
        if name in self._failing:
            self._failing.discard(name)
            self._changed()
            _log.info("audit.recovered", extra={"fields": {"sink": name}})
        if self.gate.stranded and not any(s.name in self._failing for s in self.sinks):
            self._apply(self.gate.recovered())

    async def run(self) -> None:
        """Deliver to the table sink and retry failed sinks, until cancelled."""
        while True:
            wait = self.checkpoint_interval
            if self._since:
                wait -= time.monotonic() - self._checkpoint_at
            if self._failing:
                wait = min(wait, 1.0)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(max(wait, 0.001)):  # no task per wake-up
                    await self._wake.wait()
            self._wake.clear()
            if self._since and time.monotonic() - self._checkpoint_at >= self.checkpoint_interval:
                self.checkpoint("interval")
            for sink in self.sinks:
                if sink.name in self._failing:
                    self._flush(sink)
            self._expire_withheld()
            await self._drain_table()

    async def _drain_table(self) -> None:
        # one drain at a time: close() drains while run() may be in the middle of one, and
        # two writes on one connection would fail both (the shutdown checkpoint lost)
        async with self._table_lock:
            await self._drain_table_locked()

    async def _drain_table_locked(self) -> None:
        table = self.table
        while table is not None and self._table_queue:
            batch = [self._table_queue[i] for i in range(min(TABLE_BATCH, len(self._table_queue)))]
            try:
                await table.write(batch)
            except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, TimeoutError) as exc:
                self._fail("table", type(exc).__name__)
                return
            for _ in batch:
                self._table_queue.popleft()
            self._changed()
            self._recover("table")

    async def close(self) -> None:
        """Seal a checkpoint after the last event, write what is queued (shutdown flushes
        everything), then close the sinks."""
        if self._since:
            self.checkpoint("shutdown")
        self.release()
        for sink in self.sinks:
            if self._pending[sink.name]:
                self._flush(sink)  # what was withheld goes out if the sinks take it now
        self.gate.clear()  # else their connections close with the proxy
        for sink in self.sinks:
            try:
                sink.close()
            except Exception as exc:
                _log.error(
                    "audit.close_failed",
                    extra={"fields": {"sink": sink.name, "error": _error_text(exc)}},
                )
        self._write_anchors()
        if self._anchor is not None:
            try:
                self._anchor.close()
            except OSError as failed:  # (own name: compiled, one type per name)
                _log.error(
                    "audit.close_failed",
                    extra={"fields": {"sink": "anchor", "error": _error_text(failed)}},
                )
        if self.table is not None:
            await self._drain_table()
            await self.table.close()


def _error_text(exc: Exception) -> str:
    return (exc.strerror if isinstance(exc, OSError) else None) or type(exc).__name__


def _unapplied(actions: list[GateAction]) -> None:
    """Where the gate's decisions go before `batch_writes`: nowhere (nothing is held)."""
