"""The JSON-lines audit file: append with rotation, read back, verify across rotations.

Rotation renames the current file to `NAME.<UTC time>` and starts a new one; the chain goes
on, so the first event of the new file points at the last one of the old. On start the
writer resumes the chain from the last event already in the file. Blocking file I/O only;
the proxy calls it from its writer task, never on the data path.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from audit.events import GENESIS, ChainBreak, canonical, verify


class AuditFileError(Exception):
    pass


def last_hash(path: Path) -> str:
    """The hash of the last event in `path` (GENESIS for a missing or empty file)."""
    if not path.exists() or path.stat().st_size == 0:
        return GENESIS
    with path.open("rb") as f:
        f.seek(0, os.SEEK_END)
        size = f.tell()
        step = 4096
        buf = b""
        pos = size
        while pos > 0:
            pos = max(0, pos - step)
            f.seek(pos)
            buf = f.read(size - pos)
            lines = buf.rstrip(b"\n").split(b"\n")
            if len(lines) > 1 or pos == 0:
                try:
                    return str(json.loads(lines[-1])["hash"])
                except (ValueError, KeyError) as exc:
                    raise AuditFileError(f"{path}: the last line is not an audit event") from exc
    return GENESIS


class AuditFile:
    def __init__(
        self, path: Path, max_bytes: int = 100 * 1024**2, max_age_s: float = 86400
    ) -> None:
        self.path = path
        self.max_bytes = max_bytes
        self.max_age_s = max_age_s
        self._f = path.open("ab", buffering=0)
        self._opened = time.time()
        self._size = self._f.tell()

    def write(self, events: Sequence[Mapping[str, Any]]) -> None:
        """Append and flush to the OS; `sync` makes it durable."""
        self.write_lines([canonical(e) for e in events])

    def write_lines(self, lines: Sequence[bytes]) -> None:
        """Append encoded events (without newlines): handed to the OS in one write (the
        file is unbuffered), or one per file when the batch crosses a rotation."""
        now = time.time()
        pending: list[bytes] = []
        pending_size = 0
        for encoded in lines:
            size = len(encoded) + 1
            total = self._size + pending_size
            if total and (total + size > self.max_bytes or now - self._opened > self.max_age_s):
                self._write(pending)
                pending, pending_size = [], 0
                self.rotate()
            pending += (encoded, b"\n")
            pending_size += size
        self._write(pending)

    def _write(self, parts: list[bytes]) -> None:
        if not parts:
            return
        data = b"".join(parts)
        view = memoryview(data)
        try:
            while view:
                view = view[self._f.write(view) :]
        except OSError:
            # a full disk may take part of a write: cut the file back to its last whole
            # line, so the retry of these lines does not leave a torn one behind
            with contextlib.suppress(OSError):
                os.ftruncate(self._f.fileno(), self._size)
            raise
        self._size += len(data)

    def sync(self) -> None:
        os.fsync(self._f.fileno())

    def rotate(self) -> Path:
        os.fsync(self._f.fileno())
        self._f.close()
        stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime())
        target = self.path.with_name(f"{self.path.name}.{stamp}")
        n = 1
        while target.exists():
            target = self.path.with_name(f"{self.path.name}.{stamp}.{n}")
            n += 1
        self.path.rename(target)
        self._f = self.path.open("ab", buffering=0)
        self._opened = time.time()
        self._size = 0
        return target

    def close(self) -> None:
        os.fsync(self._f.fileno())
        self._f.close()


def read_events(path: Path) -> Iterator[dict[str, Any]]:
    with path.open("rb") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                event = json.loads(line)
            except ValueError as exc:
                raise AuditFileError(f"{path}:{n}: not a JSON object") from exc
            if not isinstance(event, dict):
                raise AuditFileError(f"{path}:{n}: not a JSON object")
            yield event


def rotated_files(path: Path) -> list[Path]:
    """The rotated files of `path`, oldest first, then `path` itself."""
    older = sorted(p for p in path.parent.glob(path.name + ".*") if p.is_file())
    return [*older, path] if path.exists() else older


def verify_files(paths: list[Path]) -> tuple[int, ChainBreak | None, Path | None]:
    """Verify files in order as one chain. Returns (events checked, first break, its file)."""
    prev: str | None = None
    total = 0
    for path in paths:
        events = list(read_events(path))
        brk = verify(events, first_prev=prev)
        if brk is not None:
            return total + brk.index, brk, path
        total += len(events)
        if events:
            prev = str(events[-1]["hash"])
    return total, None, None
