"""Writes erasure audit events to the audit sinks: the hash-chained JSON-lines file and/or
standard output (the same formats as the proxy's stream).

A small adapter until the proxy's writer moves to `audit/`: each event is linked with
`audit.events.Chain` under an exclusive `flock` of the file, continuing the chain from the
file's last event, so several workers (processes) can append to one file without breaking
the chain. The proxy keeps its chain position in memory, so the erasure file must not be
the proxy's. Events hold subject keys, table and column names, counts and timings only:
callers never pass an erased value.
"""

from __future__ import annotations

import fcntl
import os
import sys
from collections.abc import Mapping
from typing import Any

from audit.events import Chain, canonical
from audit.files import last_hash
from erasure.model import AuditSettings


class ErasureAudit:
    def __init__(self, settings: AuditSettings) -> None:
        self.settings = settings

    def write(self, fields: Mapping[str, Any], redelivery: bool = False) -> None:
        """Append one `erasure` event. `redelivery`: the event may already be in the file
        (a worker died between writing it and recording that it did); it is written only
        if no event with the same `job` id is there."""
        path = self.settings.file
        if path is not None:
            with path.open("ab+") as f:
                fcntl.flock(f.fileno(), fcntl.LOCK_EX)
                try:
                    if redelivery and _contains_job(f, str(fields["job"])):
                        return
                    event = Chain(last_hash(path)).link("erasure", fields)
                    f.write(canonical(event) + b"\n")
                    f.flush()
                    os.fsync(f.fileno())
                finally:
                    fcntl.flock(f.fileno(), fcntl.LOCK_UN)
        else:
            event = Chain().link("erasure", fields)
        if self.settings.stdout:
            sys.stdout.buffer.write(canonical(event) + b"\n")
            sys.stdout.buffer.flush()


def _contains_job(f: Any, job: str) -> bool:
    needle = canonical({"job": job})[1:-1]  # '"job":"..."' exactly as canonical() writes it
    f.seek(0)
    return any(needle in line for line in f)
