"""Writes erasure audit events to the audit sinks: the hash-chained JSON-lines file,
standard output, and the PostgreSQL table sink (the same formats as the proxy's stream).

Events are linked with `audit.events.Chain` under an exclusive `flock` of the file,
continuing the chain from the file's last event, so several workers (processes) can append
to one file without breaking the chain; a group of events costs one fsync. With a table
sink too, the same linked events go to the table under the file's lock (the table's chain
is the file's); with a table sink alone, they are linked inside the inserting transaction
under the chain's advisory lock. Called from a worker thread (it runs its own event loop
for the table). The proxy keeps its chain position in memory, so the erasure file must not
be the proxy's. Events hold subject keys, table and column names, counts and timings only:
callers never pass an erased value.
"""

from __future__ import annotations

import asyncio
import fcntl
import os
import sys
from collections.abc import Mapping, Sequence
from typing import Any

from audit.events import Chain, canonical
from audit.files import last_event
from audit.sinks import TableSink
from erasure.model import AuditSettings

# a redelivered event, if it was written at all, was written moments before its worker
# died: the end of the file is where to look for it
TAIL_BYTES = 8 * 1024 * 1024


class ErasureAudit:
    def __init__(self, settings: AuditSettings) -> None:
        self.settings = settings

    def write(self, fields: Mapping[str, Any], redelivery: bool = False) -> None:
        self.write_many([fields], redelivery)

    def write_many(self, events: Sequence[Mapping[str, Any]], redelivery: bool = False) -> None:
        """Append `erasure` events, durably (one fsync). `redelivery`: the events may
        already be in the file (a worker died between writing them and recording that it
        had); an event is skipped when one with the same `job` id is near the end."""
        if not events:
            return
        path = self.settings.file
        linked: list[dict[str, Any]] = []
        if path is not None:
            with path.open("ab+") as f:
                fcntl.flock(f.fileno(), fcntl.LOCK_EX)
                try:
                    if redelivery:
                        events = [e for e in events if not _near_end(f, str(e["job"]))]
                    chain = Chain.following(last_event(path))
                    linked = [chain.link("erasure", e) for e in events]
                    f.write(b"".join(canonical(e) + b"\n" for e in linked))
                    f.flush()
                    os.fsync(f.fileno())
                    if self.settings.table is not None:
                        # under the file's lock: the table's chain is the file's, in order
                        asyncio.run(self._to_table([("erasure", e) for e in linked], True))
                finally:
                    fcntl.flock(f.fileno(), fcntl.LOCK_UN)
        elif self.settings.table is not None:
            # the table's chain alone: linked inside its transaction, under its lock
            linked = asyncio.run(self._to_table([("erasure", e) for e in events], False))
        else:
            chain = Chain()
            linked = [chain.link("erasure", e) for e in events]
        if self.settings.stdout:
            sys.stdout.buffer.write(b"".join(canonical(e) + b"\n" for e in linked))
            sys.stdout.buffer.flush()

    async def _to_table(
        self, events: list[tuple[str, Mapping[str, Any]]], linked: bool
    ) -> list[dict[str, Any]]:
        table = self.settings.table
        assert table is not None
        sink = TableSink(table.dsn, table.name, table.chain)
        try:
            return await sink.append(events, linked)
        finally:
            await sink.close()


def _near_end(f: Any, job: str) -> bool:
    needle = canonical({"job": job})[1:-1]  # '"job":"..."' exactly as canonical() writes it
    size = f.seek(0, os.SEEK_END)
    f.seek(max(0, size - TAIL_BYTES))
    return needle in f.read()
