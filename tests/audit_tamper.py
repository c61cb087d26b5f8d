"""What an insider with write access to the audit files does to them, as plain file edits:
remove lines, cut the end, remove an event and rebuild the chain after it (every `prev`
and `hash` recomputed, `seq` renumbered, checkpoints kept or dropped). Tests run these
against files a real writer wrote, then ask `verify` what it sees."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from audit.events import canonical


def lines(path: Path) -> list[bytes]:
    return [line for line in path.read_bytes().split(b"\n") if line.strip()]


def events(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in lines(path)]


def put(path: Path, evs: list[dict[str, Any]]) -> None:
    path.write_bytes(b"".join(canonical(e) + b"\n" for e in evs))


def drop_lines(path: Path, start: int, stop: int | None = None) -> None:
    """Remove the events at positions start..stop-1 (0-based; negative from the end)."""
    kept = lines(path)
    del kept[start:stop]
    path.write_bytes(b"".join(line + b"\n" for line in kept))


def _rehash(e: dict[str, Any], prev: str) -> dict[str, Any]:
    e = {k: v for k, v in e.items() if k != "hash"}
    e["prev"] = prev
    e["hash"] = hashlib.sha256(canonical(e)).hexdigest()
    return e


def rebuild(
    files: list[Path],
    drop: int,
    renumber: bool = True,
    drop_checkpoints: bool = False,
) -> None:
    """Remove the event with seq `drop` from the chain spread over `files` (oldest
    first) and rebuild everything after it so that every link holds again: `prev` and
    `hash` recomputed, `seq` renumbered (unless not `renumber`), checkpoints kept as they
    are (their `mac` cannot be recomputed without the key) or removed."""
    prev: str | None = None
    shift = 0
    for path in files:
        out = []
        for e in events(path):
            if e["seq"] == drop:
                shift = 1
                prev = e["prev"]
                continue
            if shift and drop_checkpoints and e["type"] == "audit.checkpoint":
                shift += 1
                continue
            if shift:
                if renumber:
                    e["seq"] -= shift
                assert prev is not None
                e = _rehash(e, prev)
            prev = e["hash"]
            out.append(e)
        put(path, out)
