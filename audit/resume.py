"""Where the chain goes on at start: the ends of its copies (the audit file, the table
sink) checked against the newest anchor, and the gap to record when they disagree.

pgveil never resumes silently from a cut file. The end of the file is read back to the
newest anchored checkpoint and must link to it; a copy that ends before another, or before
the anchor, or whose end does not verify, is named in an `audit.gap` event, and the chain
goes on from the furthest end known (so sequence numbers never repeat and every anchor
stays where it was). Nothing here writes; the writer links and writes what `plan` says.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from audit.anchors import Anchor
from audit.events import CHECKPOINT, GAP, GENESIS, digest
from audit.files import read_back, rotated_files

SCAN_LIMIT = 100_000  # events read back to find the chain's id when nothing anchors it


@dataclass(frozen=True)
class End:
    """The last event of one copy of the chain."""

    seq: int
    hash: str


@dataclass
class FileState:
    end: End | None = None  # its last readable event; None: missing or empty
    chain: str | None = None  # the chain id of the newest checkpoint or gap in it
    problem: str | None = None  # why its end cannot be trusted to go on from


@dataclass
class Plan:
    seq: int = 0
    hash: str = GENESIS
    chain: str = ""
    resumed: bool = False  # a chain that has events goes on
    gap: dict[str, Any] | None = None  # the fields of the audit.gap event to write first
    notes: list[str] = field(default_factory=list)


def _seq(event: dict[str, Any]) -> int:
    s = event.get("seq")
    return s if type(s) is int else 0


def check_file(path: Path, anchor: Anchor | None) -> FileState:
    """Read the end of the audit file (and of its rotated files, when the current one is
    empty) back to the anchored checkpoint, and say whether the chain can go on from it."""
    state = FileState()
    newest_first = list(reversed(rotated_files(path)))
    tail: list[dict[str, Any]] = []  # newest first
    unreadable = False
    scanned = 0
    for p in newest_first:
        for event in read_back(p):
            scanned += 1
            if event is None:
                if state.end is None or anchor is not None:
                    unreadable = True
                continue
            if state.end is None:
                state.end = End(_seq(event), str(event["hash"]))
            if state.chain is None and event.get("type") in (CHECKPOINT, GAP):
                c = event.get("chain")
                state.chain = c if isinstance(c, str) else None
            tail.append(event)
            if anchor is not None:
                if _seq(event) <= anchor.seq:
                    break
            elif state.chain is not None or scanned >= SCAN_LIMIT:
                break
        else:
            continue
        break
    if unreadable:
        state.problem = "a line at its end is not an audit event (cut by a crash, or edited)"
    if anchor is None or state.problem is not None:
        return state
    end = state.end
    if end is None:
        state.problem = f"is missing or empty, but the anchor shows seq {anchor.seq}"
        return state
    if end.seq < anchor.seq:
        state.problem = f"ends at seq {end.seq}, before the anchored checkpoint (seq {anchor.seq})"
        return state
    oldest = tail[-1]
    if _seq(oldest) != anchor.seq:
        state.problem = f"has no event at the anchored seq {anchor.seq}"
    elif oldest["hash"] != anchor.hash:
        state.problem = f"holds another event than the anchored one at seq {anchor.seq}"
    else:
        prev = oldest
        for event in reversed(tail[:-1]):
            if (
                event["hash"] != digest(event)
                or event.get("prev") != prev["hash"]
                or _seq(event) != _seq(prev) + 1
            ):
                state.problem = (
                    f"does not verify after the anchored checkpoint (at seq {_seq(event)})"
                )
                break
            prev = event
    return state


def plan(
    anchor: Anchor | None,
    file: FileState | None,
    table: End | None,
    has_table: bool,
    table_chain: str | None = None,
) -> Plan:
    """Where to go on from. `file`: None without a file sink; `table`: the table chain's
    last event (None when it has none), `has_table`: a table sink is configured."""
    candidates: list[tuple[str, End]] = []
    if anchor is not None:
        candidates.append(("anchor file", End(anchor.seq, anchor.hash)))
    if file is not None and file.end is not None:
        candidates.append(("audit file", file.end))
    if table is not None:
        candidates.append(("table sink", table))
    chain = (
        (anchor.chain if anchor is not None else None)
        or (file.chain if file is not None else None)
        or table_chain
        or os.urandom(8).hex()
    )
    if not candidates:
        return Plan(chain=chain)
    source, best = max(candidates, key=lambda c: c[1].seq)
    out = Plan(best.seq, best.hash, chain, resumed=True)
    found: dict[str, dict[str, Any]] = {}
    if file is not None:
        end = file.end
        if file.problem is not None:
            found["audit file"] = _found(end, file.problem)
        elif end != best:
            found["audit file"] = _found(end, _short(end, best, source))
    if has_table and table != best:
        found["table sink"] = _found(table, _short(table, best, source))
    if found:
        out.gap = {
            "chain": chain,
            "expected": {"seq": best.seq, "hash": best.hash, "from": source},
            "found": found,
        }
    return out


def _found(end: End | None, problem: str) -> dict[str, Any]:
    return {
        "seq": end.seq if end is not None else 0,
        "hash": end.hash if end is not None else None,
        "problem": problem,
    }


def _short(end: End | None, best: End, source: str) -> str:
    if end is None:
        return f"is empty, but the {source} shows seq {best.seq}"
    if end.seq < best.seq:
        return f"ends at seq {end.seq}, before seq {best.seq} (the {source}'s)"
    return f"ends at another event than the {source} at seq {best.seq}"
