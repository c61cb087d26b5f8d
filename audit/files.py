"""The JSON-lines audit file: append with rotation, read back, verify across rotations.

Rotation renames the current file to `NAME.<UTC time>` and starts a new one; the chain goes
on, so the first event of the new file points at the last one of the old. The writer
decides when to rotate (it seals a checkpoint as the old file's last event first) and
says so with ROTATE among the lines. On start the writer reads the end of the chain back
(`read_back`) to check it against the newest anchor before going on. Blocking file I/O
only; the proxy calls it from its writer, never on the data path.
"""

from __future__ import annotations

import contextlib
import os
import re
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from audit.events import GENESIS, ChainBreak, canonical, load_event, verify

ROTATE = b""  # among the lines given to write_lines: rotate here
_ROTATED = re.compile(r"\.\d{8}T\d{6}(\.\d+)?$")  # NAME.<UTC time>[.n]


class AuditFileError(Exception):
    pass


def last_hash(path: Path) -> str:
    """The hash of the last event in `path` (GENESIS for a missing or empty file)."""
    event = last_event(path)
    return str(event["hash"]) if event is not None else GENESIS


def last_event(path: Path) -> dict[str, Any] | None:
    """The last event in `path` (None for a missing or empty file)."""
    for event in read_back(path):
        if event is None:
            raise AuditFileError(f"{path}: the last line is not an audit event")
        return event
    return None


def read_back(path: Path, block: int = 1 << 16) -> Iterator[dict[str, Any] | None]:
    """The lines of `path` from the last to the first, parsed (None for a line that is not
    an event). Reads blocks from the end: going back over a few events costs a few reads,
    whatever the file's size."""
    if not path.exists():
        return
    with path.open("rb") as f:
        pos = f.seek(0, os.SEEK_END)
        rest = b""  # the end of a line whose start is in an earlier block
        while pos > 0:
            step = min(block, pos)
            pos -= step
            f.seek(pos)
            lines = (f.read(step) + rest).split(b"\n")
            rest = lines.pop(0) if pos > 0 else b""
            for line in reversed(lines):
                if line.strip():
                    yield _parse(line)


def _parse(line: bytes) -> dict[str, Any] | None:
    try:
        event = load_event(line)
    except ValueError:
        return None
    return event if isinstance(event, dict) and isinstance(event.get("hash"), str) else None


def ends_with_newline(path: Path) -> bool:
    """False when the file's last line was cut (a crash in the middle of a write)."""
    with path.open("rb") as f:
        if f.seek(0, os.SEEK_END) == 0:
            return True
        f.seek(-1, os.SEEK_END)
        return f.read(1) == b"\n"


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
        if not ends_with_newline(path):
            # a crash cut the last line: new events start on a line of their own (the cut
            # one stays, for `verify` to report)
            self._write([b"\n"])

    def write(self, events: Sequence[Mapping[str, Any]]) -> None:
        """Append and flush to the OS; `sync` makes it durable."""
        self.write_lines([canonical(e) for e in events])

    def due(self, extra: int) -> bool:
        """True when the file should be rotated once `extra` more bytes are in it."""
        return bool(self._size) and (
            self._size + extra > self.max_bytes or time.time() - self._opened > self.max_age_s
        )

    def write_lines(self, lines: Sequence[bytes]) -> None:
        """Append encoded events (without newlines): handed to the OS in one write (the
        file is unbuffered), or one per file when the batch holds a ROTATE."""
        pending: list[bytes] = []
        for encoded in lines:
            if not encoded:  # ROTATE
                self._write(pending)
                pending = []
                self.rotate()
                continue
            pending += (encoded, b"\n")
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


def read_numbered(path: Path) -> Iterator[tuple[int, dict[str, Any] | None]]:
    """(line number, event or None for a line that is not one), blank lines skipped: what
    `verify` walks, so that one bad line is reported, not the end of the reading."""
    with path.open("rb") as f:
        for n, raw in enumerate(f, 1):
            if raw.strip():
                yield n, _parse(raw)


def read_events(path: Path) -> Iterator[dict[str, Any]]:
    with path.open("rb") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                event = load_event(line)
            except ValueError as exc:
                raise AuditFileError(f"{path}:{n}: not a JSON object") from exc
            if not isinstance(event, dict):
                raise AuditFileError(f"{path}:{n}: not a JSON object")
            yield event


def rotated_files(path: Path) -> list[Path]:
    """The rotated files of `path` (`NAME.<UTC time>[.n]`), oldest first, then `path`."""
    older = sorted(
        (p for p in path.parent.glob(path.name + ".*") if p.is_file() and _rotated(path, p)),
        key=_rotation_order,
    )
    return [*older, path] if path.exists() else older


def _rotated(path: Path, candidate: Path) -> bool:
    return _ROTATED.fullmatch(candidate.name[len(path.name) :]) is not None


def _rotation_order(p: Path) -> tuple[str, int]:
    stamp, _, n = p.name.rpartition(".")
    if len(n) == 15 and "T" in n:  # NAME.<time>: no counter
        return (p.name, 0)
    return (stamp, int(n))


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
