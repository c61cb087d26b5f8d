"""Judges a whole audit chain: its links, its start, its keyed checkpoints and its end
against the anchors the auditor holds. Pure: the caller reads the files or the table.

A chain is proven complete when it starts at its genesis (or at a hash the auditor knows:
`--after`), every event links to the one before it, every
checkpoint's seal verifies with a key the auditor gives, checkpoints are no further apart
than they say (`every`), and the chain reaches the newest anchor found outside it. What
is found is a list of findings, each with its kind:

- `unreadable`: a line that is not an audit event (cut by a crash, or edited);
- `modified`: an event whose content does not match its hash;
- `deleted inside`, `missing file`, `reordered or inserted`: a link that does not hold,
  inside a file or between two files (seq numbers say how many events are missing);
- `begins after a gap`: the first event is not a genesis nor follows the hash the auditor
  gives (`--after`, for files removed on purpose): a file or events removed at the start;
- `recorded gap`: events missing where pgveil itself recorded, at a restart, that its file
  or table had lost them (`audit.gap`);
- `re-hashed`: a seal that does not verify, an anchored event replaced, a sequence number
  that jumps under an intact link, checkpoints missing: the chain was rebuilt;
- `truncated after anchor`: the chain ends before an anchored checkpoint;
- `forged anchor`: an anchor whose seal does not verify;
- `missing chain`: an anchor file given holds, beside this chain's checkpoints, sealed
  checkpoints of another chain whose events are not given (the whole history removed,
  and pgveil started anew).

Any finding makes the chain BROKEN (exit 1). Without one it is `intact` (exit 0) only when
nothing is left unproven; else UNPROVEN (exit 3) says what could not be checked (no key,
checkpoints sealed with a key not given, no anchor outside the chain).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from audit.anchors import Anchor, key_id, sealed_by
from audit.events import CHECKPOINT, GAP, GENESIS, digest

EXIT_INTACT = 0
EXIT_BROKEN = 1
EXIT_UNPROVEN = 3
MAX_SHOWN = 20  # findings printed after the first


@dataclass(frozen=True)
class Finding:
    kind: str
    where: str
    detail: str

    def __str__(self) -> str:
        return f"{self.kind}: {self.where}: {self.detail}"


@dataclass
class Report:
    name: str  # what was verified: "3 file(s)", "table chain X"
    events: int = 0
    first_seq: int | None = None
    last_seq: int | None = None
    start: str = ""
    sealed_ok: int = 0
    key_ids: set[str] = field(default_factory=set)
    head: Anchor | None = None  # the newest anchor from outside that the chain reaches
    after_head: int = 0
    last_checkpoint: int | None = None
    findings: list[Finding] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    unproven: list[str] = field(default_factory=list)

    @property
    def exit_code(self) -> int:
        if self.findings:
            return EXIT_BROKEN
        return EXIT_UNPROVEN if self.unproven else EXIT_INTACT

    def lines(self) -> list[str]:
        span = f"seq {self.first_seq}..{self.last_seq}" if self.first_seq is not None else "no seq"
        summary = f"{self.events} event(s), {span}, in {self.name}"
        out: list[str] = []
        if self.findings:
            first, *rest = self.findings
            out.append(f"BROKEN: {first}")
            out += [f"  also {f}" for f in rest[:MAX_SHOWN]]
            if len(rest) > MAX_SHOWN:
                out.append(f"  ... and {len(rest) - MAX_SHOWN} more finding(s)")
            out.append(f"  ({summary})")
        elif self.unproven:
            out.append(f"UNPROVEN: {summary}: no break found, but " + self.unproven[0])
            out += [f"  also {u}" for u in self.unproven[1:]]
        else:
            assert self.head is not None
            out.append(
                f"intact: {summary}; starts at {self.start}; {self.sealed_ok} checkpoint "
                f"seal(s) verified (key {', '.join(sorted(self.key_ids))}); anchored head: "
                f"seq {self.head.seq} hash {self.head.hash[:16]}... ({self.head.source}); "
                f"{self.after_head} event(s) after it, not anchored"
            )
        out += [f"  note: {n}" for n in self.notes]
        return out


def _seq(event: Mapping[str, Any]) -> int | None:
    s = event.get("seq")
    return s if type(s) is int else None


def verify_chain(
    parts: Sequence[tuple[str, Iterable[tuple[int, dict[str, Any] | None]]]],
    name: str,
    anchors: Sequence[Anchor] = (),
    keys: Mapping[str, bytes] | None = None,
    after: str | None = None,
) -> Report:
    """Verify one chain given as parts in order (files, or one table chain): each part a
    name and its (line number, event or None for an unreadable line). `anchors`:
    checkpoints from outside (anchor files, the table, another copy); `keys`: by key id;
    `after`: a hash the auditor knows the chain's first event follows (older files pruned)."""
    keys = dict(keys or {})
    r = Report(name)
    usable: list[Anchor] = []
    for a in anchors:
        if a.event.get("hash") != digest(a.event):
            r.findings.append(
                Finding("forged anchor", a.source, "its content does not match its hash")
            )
            continue
        sealed = sealed_by(a.event, keys)
        if sealed is False:
            r.findings.append(
                Finding("forged anchor", a.source, "its seal does not verify with the key")
            )
            continue
        usable.append(a)
    wanted = {a.seq for a in usable}
    seen: dict[int, str] = {}  # seq -> hash, at the anchored seqs only
    lost: list[tuple[int, int]] = []  # seq ranges already reported missing
    chains: set[str] = set()
    unsealed = 0  # checkpoints without a seal since the last verified one
    unproved_anchor = False
    unknown_keys: set[str] = set()
    prev_hash: str | None = None  # None: unknown (after an unreadable line)
    prev_seq: int | None = None
    prev_part = ""
    started = False
    every: int | None = None
    since = 0  # events since the last checkpoint
    cp_seq: int | None = None
    cadence_reported = False

    def find(kind: str, where: str, detail: str) -> None:
        r.findings.append(Finding(kind, where, detail))

    for part, entries in parts:
        empty = True
        for lineno, e in entries:
            empty = False
            where = f"{part} line {lineno}"
            if e is None:
                find("unreadable", where, "not an audit event (cut by a crash, or edited)")
                prev_hash = None
                started = True
                continue
            seq = _seq(e)
            if seq is not None:
                where += f" (seq {seq})"
            r.events += 1
            if r.first_seq is None and seq is not None:
                r.first_seq = seq
            if seq is not None:
                r.last_seq = seq
            own = str(e.get("hash"))
            if own != digest(e):
                find("modified", where, "its content does not match its hash")
            prev = str(e.get("prev"))
            kind = e.get("type")
            if not started:
                started = True
                if prev == GENESIS:
                    r.start = "its genesis"
                    if seq not in (None, 1):
                        find("modified", where, f"a genesis (prev 0...0) with seq {seq}, not 1")
                elif after is not None and prev == after:
                    r.start = f"the hash given ({after[:16]}...)"
                else:
                    before = f"{seq - 1} event(s) (seq 1..{seq - 1})" if seq else "events"
                    find(
                        "begins after a gap",
                        where,
                        f"{before} before it are not here; it follows hash {prev}, which "
                        "is not the genesis (give the older files too, or, when they were "
                        "removed on purpose, --after HASH: the last hash they held)",
                    )
            elif prev_hash is not None and prev != prev_hash:
                missing = seq - prev_seq - 1 if seq is not None and prev_seq is not None else None
                if missing and missing > 0 and prev_seq is not None:
                    lost.append((prev_seq + 1, prev_seq + missing))
                span = (
                    f"seq {prev_seq + 1}..{seq - 1} ({missing} event(s))"
                    if missing and missing > 0 and prev_seq is not None and seq is not None
                    else "events"
                )
                if kind == GAP:
                    find(
                        "recorded gap",
                        where,
                        f"{span} missing before it; pgveil found at restart: " + _gap_text(e),
                    )
                elif part != prev_part:
                    find(
                        "missing file",
                        where,
                        f"{span} missing between {prev_part} and {part} (a file deleted or "
                        "cut at its end?)",
                    )
                elif missing is not None and missing > 0:
                    find("deleted inside", where, f"{span} missing before it")
                elif missing is not None and missing < 0:
                    find("reordered or inserted", where, f"seq goes back from {prev_seq}")
                else:
                    find(
                        "deleted inside",
                        where,
                        "it does not follow the event before it (an event removed, replaced "
                        "or inserted)",
                    )
            elif prev_seq is not None and seq is not None and seq != prev_seq + 1:
                find(
                    "re-hashed",
                    where,
                    f"its link holds but seq jumps from {prev_seq} to {seq}: events removed "
                    "and the chain re-hashed",
                )
            elif kind == GAP:
                r.notes.append(f"{where}: pgveil recorded at restart: {_gap_text(e)}")
            if seq is not None and seq in wanted:
                seen[seq] = own
            if kind in (CHECKPOINT, GAP):
                c = e.get("chain")
                if isinstance(c, str):
                    chains.add(c)
                sealed = sealed_by(e, keys)
                if "mac" not in e:
                    unsealed += kind == CHECKPOINT
                elif sealed is None:
                    unknown_keys.add(str(e.get("key")))
                elif not sealed:
                    find(
                        "re-hashed",
                        where,
                        "its seal does not verify with the key: the chain was rebuilt before "
                        "it (events removed or changed, hashes recomputed), or it was forged",
                    )
                else:
                    r.sealed_ok += 1
                    r.key_ids.add(str(e.get("key")))
                    unsealed = 0
            if kind == CHECKPOINT:
                n = e.get("every")
                every = n if type(n) is int and n > 0 else None
                since, cp_seq, cadence_reported = 0, seq, False
                r.last_checkpoint = seq
            else:
                since += 1
                if every is not None and since > every and not cadence_reported:
                    cadence_reported = True
                    find(
                        "re-hashed",
                        where,
                        f"more than {every} events after the checkpoint at seq {cp_seq} "
                        f"without another (pgveil writes one every {every}): checkpoints "
                        "removed, or the chain rebuilt after it",
                    )
            prev_hash, prev_seq, prev_part = own, seq, part
        if empty:
            r.notes.append(f"{part} is empty")
    # anchors: only those of this chain (all of them when the chain names none)
    mine = [a for a in usable if not chains or a.chain is None or a.chain in chains]
    others = {a.chain for a in usable if a not in mine and a.chain}
    if others and not mine:
        r.notes.append(f"the anchors given belong to other chains ({', '.join(sorted(others))})")
    elif others:
        # an anchor file (not a store several writers share) holds this chain and another
        # whose events are not here: pgveil begins a new chain only when it finds neither
        # its audit files nor its anchor file, so the events of the other were removed
        foreign = [
            a for a in usable if a not in mine and not a.shared and sealed_by(a.event, keys) is True
        ]
        for c in sorted({a.chain for a in foreign if a.chain}):
            newest = max((a for a in foreign if a.chain == c), key=lambda a: a.seq)
            find(
                "missing chain",
                newest.source,
                f"the anchors given also hold chain {c} (up to seq {newest.seq}), and none "
                "of its events are here: its files and anchor file were removed and a new "
                "chain begun (give its files too), or these anchors are another instance's",
            )
    beyond = [a for a in mine if r.last_seq is not None and a.seq > r.last_seq]
    if beyond and r.last_seq is not None:
        newest = max(beyond, key=lambda a: a.seq)
        find(
            "truncated after anchor",
            f"seq {newest.seq}",
            f"the chain ends at seq {r.last_seq}, but {newest.source} shows pgveil had "
            f"written seq {newest.seq}: at least {newest.seq - r.last_seq} event(s) removed "
            "from the end",
        )
    elif mine and r.events and r.last_seq is None:
        find("truncated after anchor", name, "the chain has no sequence numbers to check")
    for a in sorted(mine, key=lambda a: a.seq):
        if r.first_seq is None or r.last_seq is None or not r.first_seq <= a.seq <= r.last_seq:
            continue
        got = seen.get(a.seq)
        if got is None:
            if not any(lo <= a.seq <= hi for lo, hi in lost):  # else reported already
                find(
                    "deleted inside", f"seq {a.seq}", f"the anchored event ({a.source}) is missing"
                )
        elif got != a.hash:
            find(
                "re-hashed",
                f"seq {a.seq}",
                f"the event there is not the anchored one ({a.source}): the chain was rebuilt",
            )
        elif sealed_by(a.event, keys) is not True:
            unproved_anchor = True  # it matches, but proves nothing: anyone can write one
        elif r.head is None or a.seq >= r.head.seq:
            r.head = a
    if r.head is not None and r.last_seq is not None:
        r.after_head = r.last_seq - r.head.seq
    if r.events == 0:
        r.unproven.append("there are no events")
        return r
    # what could not be proven
    # a verified seal covers every event before it (a rebuild changes its `prev`): unsealed
    # checkpoints matter only after the last one
    if unsealed or (not r.sealed_ok and not unknown_keys):
        r.unproven.append(
            "no checkpoint in it is sealed with a key (pgveil ran without --audit-key, or "
            "this is not its proxy stream): a chain rebuilt after a removal cannot be told "
            "from the original"
            if not r.sealed_ok
            else f"{unsealed} checkpoint(s) after the last sealed one are not sealed "
            "(written without --audit-key)"
        )
    if unknown_keys:
        given = ", ".join(sorted(keys)) or "none"
        r.unproven.append(
            f"checkpoints are sealed with key id(s) {', '.join(sorted(unknown_keys))}, "
            f"not given (given: {given}): give that key with --key"
        )
    if r.head is None and unproved_anchor:
        r.unproven.append(
            "the anchors it reaches are not sealed with a key given (written without a key, "
            "or with another)"
        )
    elif r.head is None:
        last = f" after seq {r.last_checkpoint}" if r.last_checkpoint is not None else ""
        r.unproven.append(
            "nothing outside the chain anchors its end: events at the end" + last + " could "
            "have been removed undetected (give --anchor FILE, or the table with --dsn)"
        )
    return r


def _gap_text(e: Mapping[str, Any]) -> str:
    found = e.get("found") or {}
    expected = e.get("expected") or {}
    parts = []
    if isinstance(found, dict):
        for sink, f in sorted(found.items()):
            if isinstance(f, dict):
                parts.append(f"the {sink} {f.get('problem', 'differed')}")
    head = (
        f"expected seq {expected.get('seq')} from the {expected.get('from')}"
        if isinstance(expected, dict) and expected
        else ""
    )
    return "; ".join([*parts, head] if head else parts) or "events lost"


def keyring(keys: Iterable[bytes]) -> dict[str, bytes]:
    return {key_id(k): k for k in keys}
