"""Delivers audit events from the event loop to the audit file without blocking it.

Events are linked into the hash chain when submitted (so their order is the order things
happened) and written by a background task in a worker thread. When the file cannot be
written, events stay queued (the chain must not lose a link) and writing is retried; with
`on_failure: block` the writer then stops accepting, and statements that touch personal
data are refused rather than run unrecorded. With `on_failure: drop`, events that cannot
be queued are dropped and counted. Nothing here sees statement literals or row values:
callers pass only what audit events may hold.
"""

from __future__ import annotations

import asyncio
import collections
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from audit.events import GENESIS, Chain, canonical
from audit.files import AuditFile, last_hash
from proxy.logs import log


class StdoutSink:
    """Events as JSON lines on standard output, for a log shipper (logs go to stderr)."""

    def write(self, events: Sequence[Mapping[str, Any]]) -> None:
        out = sys.stdout.buffer
        for e in events:
            out.write(canonical(e) + b"\n")
        out.flush()

    def close(self) -> None:
        sys.stdout.buffer.flush()


class AuditWriter:
    def __init__(
        self,
        path: Path | None,
        on_failure: str = "block",
        queue_size: int = 10_000,
        stdout: bool = False,
    ) -> None:
        self.path = path
        self.on_failure = on_failure
        self.queue_size = queue_size
        self.chain = Chain(last_hash(path) if path is not None else GENESIS)
        self.sinks: list[AuditFile | StdoutSink] = []
        if path is not None:
            self.sinks.append(AuditFile(path))
        if stdout:
            self.sinks.append(StdoutSink())
        self._queue: collections.deque[dict[str, Any]] = collections.deque()
        self._wake = asyncio.Event()
        self.failing = False
        self.written = 0
        self.dropped = 0
        self.failures = 0

    def accepting(self) -> bool:
        return not self.failing and len(self._queue) < self.queue_size

    def submit(self, event_type: str, fields: Mapping[str, Any]) -> bool:
        """Queue one event. False when it was not queued (the caller refuses, under block)."""
        if not self.accepting():
            if self.on_failure == "drop":
                self.dropped += 1
            return False
        self._queue.append(self.chain.link(event_type, fields))
        self._wake.set()
        return True

    @property
    def depth(self) -> int:
        return len(self._queue)

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self._queue:
                batch = list(self._queue)
                try:
                    await loop.run_in_executor(None, self._write, batch)
                except OSError as exc:
                    self.failures += 1
                    if not self.failing:
                        log.error("audit.write_failed", error=exc.strerror or type(exc).__name__)
                    self.failing = True
                    await asyncio.sleep(1.0)
                    continue
                for _ in batch:
                    self._queue.popleft()
                self.written += len(batch)
                if self.failing:
                    log.info("audit.recovered")
                self.failing = False

    def _write(self, batch: Sequence[Mapping[str, Any]]) -> None:
        for sink in self.sinks:
            sink.write(batch)

    async def close(self) -> None:
        """Write what is queued (shutdown flushes everything), then close the sinks."""
        if self._queue:
            batch = list(self._queue)
            self._queue.clear()
            await asyncio.get_running_loop().run_in_executor(None, self._write, batch)
            self.written += len(batch)
        for sink in self.sinks:
            sink.close()
