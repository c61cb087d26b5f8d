"""Audit events and their tamper-evident chain.

An event is a flat JSON object, schema-versioned. Each carries `seq`, its position in the
chain (1 for the first), `prev`, the SHA-256 of the canonical encoding of the event before
it (the first event of a chain, its genesis, carries 64 zeros and seq 1), and `hash`, the
SHA-256 of its own canonical encoding without `hash`. Canonical encoding: JSON with sorted
keys, no insignificant whitespace, UTF-8. `verify` walks a sequence of events and names the
first one that was modified, deleted, reordered or inserted; audit/verify.py judges a whole
chain (its start, its end, its keyed checkpoints). Sealed events (`audit.checkpoint`,
`audit.gap`) also carry `mac`, an HMAC made with the audit key (audit/anchors.py), so that
a chain re-hashed without the key cannot reproduce them.

Events never carry literals from statements or values from rows: the proxy builds them from
normalised statement text, table and column names and subject keys only. This module is
pure (no I/O).
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import orjson

SCHEMA_VERSION = 2  # 2: `seq`, and the audit.* events of the chain itself
GENESIS = "0" * 64
CHECKPOINT = "audit.checkpoint"
GAP = "audit.gap"
EVENT_TYPES = (
    "session.start",
    "session.end",
    "access",
    "refused",
    "rules.reload",
    "erasure",
    CHECKPOINT,
    GAP,
)


_CANONICAL = json.JSONEncoder(sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def canonical(event: Mapping[str, Any]) -> bytes:
    """JSON with sorted keys, no insignificant whitespace, UTF-8: exactly what json.dumps
    with sort_keys=True, separators=(",", ":"), ensure_ascii=False writes. orjson writes the
    same bytes ten times faster, except for floats that json writes with an exponent
    (1e-05) and integers beyond 64 bits (orjson refuses those): events with such a float
    among their values, or in a mapping among them (where events keep their floats: the
    durations, rounded to milliseconds), go through json."""
    for value in event.values():
        t = type(value)
        if t is float:
            if not _plain_float(value):
                break
        elif t is dict and not _plain_floats(value):
            break
    else:
        try:
            return orjson.dumps(event, option=orjson.OPT_SORT_KEYS)
        except TypeError:
            pass
    return _CANONICAL.encode(event).encode()


def _plain_floats(mapping: Mapping[str, Any]) -> bool:
    """The floats among a mapping's values are all plain. (A loop: a generator costs more,
    and this runs for every mapping of every event.)"""
    for v in mapping.values():  # noqa: SIM110
        if type(v) is float and not _plain_float(v):
            return False
    return True


def _plain_float(value: float) -> bool:
    """Written alike by json and orjson: no exponent either way."""
    return value == 0 or 1e-4 <= abs(value) < 1e16


def _unique(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out = dict(pairs)
    if len(out) != len(pairs):
        raise ValueError("a key named twice")
    return out


def load_event(line: bytes | str) -> Any:
    """A line of the audit stream, parsed. A key named twice in one object is refused
    (ValueError): readers differ on which value it has (Python keeps the last, others the
    first), so an event could hash as one thing and read as another."""
    return json.loads(line, object_pairs_hook=_unique)


def digest(event: Mapping[str, Any]) -> str:
    return hashlib.sha256(canonical({k: v for k, v in event.items() if k != "hash"})).hexdigest()


_PROCESS = os.urandom(6).hex()  # this process's part of every id
_counter = itertools.count()
_second: tuple[int, str] = (-1, "")


# (these two run for every event: %-formatting, because mypyc compiles an f-string with a
# format spec into generic calls that took twice the interpreter's time, 1.5-2 µs each)


def new_id(now_ns: int | None = None) -> str:
    """Time-ordered unique id: 48-bit milliseconds, 48 random bits drawn once per process,
    then a 32-bit counter (ULID-like, hex). Unique without a system call per id."""
    ms = (now_ns if now_ns is not None else time.time_ns()) // 1_000_000
    return "%012x%s%08x" % (ms, _PROCESS, next(_counter) & 0xFFFFFFFF)  # noqa: UP031


def utc_timestamp(now_ns: int | None = None) -> str:
    global _second
    ns = now_ns if now_ns is not None else time.time_ns()
    secs = ns // 1_000_000_000
    second = _second
    if second[0] != secs:  # formatting the date once per second is enough
        second = _second = (secs, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(secs)))
    return "%s.%06dZ" % (second[1], (ns - secs * 1_000_000_000) // 1000)  # noqa: UP031


class Chain:
    """Links events: fills in `v`, `ts`, `id`, `seq`, `prev` and `hash`. `seq`: the last
    linked event's (0 before the genesis)."""

    def __init__(self, last_hash: str = GENESIS, seq: int = 0) -> None:
        self.last_hash = last_hash
        self.seq = seq

    @classmethod
    def following(cls, event: Mapping[str, Any] | None) -> Chain:
        """The chain that goes on after `event` (a new chain after None). An event of
        schema 1 has no `seq`: the chain goes on from its hash, counting from 0."""
        if event is None:
            return cls()
        seq = event.get("seq")
        return cls(str(event["hash"]), seq if type(seq) is int else 0)

    def link(
        self,
        event_type: str,
        fields: Mapping[str, Any],
        now_ns: int | None = None,
        seal: Callable[[Mapping[str, Any]], str] | None = None,
    ) -> dict[str, Any]:
        return self.link_line(event_type, fields, now_ns, seal=seal)[0]

    def link_line(
        self,
        event_type: str,
        fields: Mapping[str, Any],
        now_ns: int | None = None,
        who: Mapping[str, Any] | None = None,
        seal: Callable[[Mapping[str, Any]], str] | None = None,
    ) -> tuple[dict[str, Any], bytes]:
        """The linked event and its JSON line, encoded once: the canonical body with `hash`
        appended (a reader re-canonicalises to verify, so key order in the line is free).
        `who`: fields that come before `fields` (a session's), merged here in one copy.
        `seal`: computes the event's `mac` from its other fields (sealed events only)."""
        if event_type not in EVENT_TYPES:
            raise ValueError(f"unknown audit event type {event_type}")
        ns = now_ns if now_ns is not None else time.time_ns()
        seq = self.seq + 1
        event: dict[str, Any] = {
            "v": SCHEMA_VERSION,
            "ts": utc_timestamp(ns),
            "id": new_id(ns),
            "type": event_type,
            **(who or {}),
            **fields,
            "seq": seq,
            "prev": self.last_hash,
        }
        if seal is not None:
            event["mac"] = seal(event)
        body = canonical(event)
        event["hash"] = self.last_hash = hashlib.sha256(body).hexdigest()
        self.seq = seq
        return event, body[:-1] + b',"hash":"' + event["hash"].encode() + b'"}'


@dataclass(frozen=True)
class ChainBreak:
    index: int  # position of the first bad event in the sequence (0-based)
    event_id: str | None
    reason: str

    def __str__(self) -> str:
        ident = f" (id {self.event_id})" if self.event_id else ""
        return f"event {self.index + 1}{ident}: {self.reason}"


def verify(events: Iterable[Mapping[str, Any]], first_prev: str | None = None) -> ChainBreak | None:
    """None when the chain is intact, else the first break.

    `first_prev`: the hash the first event must point to (the previous file's last hash
    when a chain continues across rotated files); None accepts the first event's `prev`.
    """
    expected_prev = first_prev
    for i, e in enumerate(events):
        eid = e.get("id") if isinstance(e.get("id"), str) else None
        if e.get("hash") != digest(e):
            return ChainBreak(i, eid, "its content does not match its hash (modified)")
        if expected_prev is not None and e.get("prev") != expected_prev:
            return ChainBreak(
                i, eid, "it does not follow the event before it (deleted, reordered or inserted)"
            )
        expected_prev = str(e["hash"])
    return None
