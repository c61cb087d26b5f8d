"""Pairs each statement a session runs with its answer, for audit events with outcomes.

Fed with the frontend messages that get an answer of their own (Query, Describe, Execute,
Sync, FunctionCall) and the backend messages that answer them, in stream order, it keeps a
FIFO of what is in flight, like the server's own queue. When a statement that touched
protected tables completes, it calls `emit` once with what the audit event says of it: its
fields from the analysis, the rows returned or affected (from CommandComplete), the outcome
(`ok` or the SQLSTATE), the duration, and the data subjects: the values of each protected
table's `subject` column in the rows returned, decoded from that column alone. Subject keys
are identifiers; no other value of a row is ever decoded here.

The same pairing tells the masked filter which statement caused each ErrorResponse and
NoticeResponse (`cause`): the statement of a Query the server is at (counted by its
CommandCompletes), the Parse, or the statement behind a Bind's or Execute's portal with that
Bind's parameter values. It is kept for every masked session, audited or not.

Its names are also where a masked session keeps what each statement and portal runs: the
client's text and the decision it was sent under (`Decided`), and the context under which
that decision was last made or confirmed (`current`): the masked filter re-checks a name
whose context was replaced before it lets it run (proxy/session/masked.py). Where the
server's answer alone tells which of two texts a name holds (a Parse, PREPARE, DECLARE or
Bind of a name the log thinks in use), the name keeps both, and both are checked.

No I/O; nothing from a row but subject keys leaves this module.
"""

from __future__ import annotations

import struct
import time
import uuid
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from proxy.wire import messages as m
from rules.analyzer import integer_key
from rules.context import ContextHolder

_INT = {21: "!h", 23: "!i", 20: "!q", 26: "!I"}  # int2, int4, int8, oid
_TEXTUAL = frozenset((25, 1043, 1042, 19))  # text, varchar, bpchar, name
_UUID = 2950
_BY_LENGTH = {2: 21, 4: 23, 8: 20, 16: _UUID}
_INT32 = struct.Struct("!i")
_DATA_ROW = m.DATA_ROW
_PARSE_COMPLETE = m.PARSE_COMPLETE
_BIND = m.BIND
_EXECUTE = m.EXECUTE
_BIND_COMPLETE = m.BIND_COMPLETE
_READY_FOR_QUERY = m.READY_FOR_QUERY
_COMMAND_COMPLETE = m.COMMAND_COMPLETE
_ROW_DESCRIPTION = m.ROW_DESCRIPTION
_LAYOUTS = 256  # RowDescriptions remembered per session
_NO_PARAMS: dict[int, str] = {}  # never changed

# a result column that carries a subject key: (field index, table, type oid, format)
SubjectColumn = tuple[int, str, int, int]
Layout = tuple[SubjectColumn, ...]


_CANDIDATES = 8  # texts a name may hold at once (see _merge)


@dataclass(frozen=True, slots=True)
class Decided:
    """What the masked filter sent for one client text: `action` "pass", "rewrite" or
    "refuse" (the server got a statement that fails instead: nothing of it runs), with the
    rewritten text or the refusal's reason in `value`. `UNKNOWN` stands for texts the log
    no longer tells apart: it is never confirmed under another context."""

    sql: str
    action: str
    value: str | None = None


UNKNOWN = Decided("", "unknown")


def _merge(held: tuple[Decided, ...], more: tuple[Decided, ...]) -> tuple[Decided, ...]:
    """The texts a name may hold when one more was sent under it: refused texts never
    reach the server; past a few, `UNKNOWN` (refused once the context changes)."""
    if held == (UNKNOWN,):
        return held
    out = list(held)
    for d in more:
        if d.action != "refuse" and d not in out:
            out.append(d)
    if len(out) > _CANDIDATES:
        return (UNKNOWN,)
    return tuple(out)


@dataclass(slots=True)
class Source:
    """A statement as the client sent it, for the masked filter's error scrubbing: its text,
    the text the server got instead when pgveil rewrote it, and (protocol statements) its
    parameter types: those the Parse declared (0: the server infers it), and those the
    server resolved once a Describe of the statement told them (ParameterDescription)."""

    sql: str
    sent: str | None = None
    declared: tuple[int, ...] = ()
    types: tuple[int, ...] = ()


@dataclass(frozen=True, slots=True)
class Cause:
    """The statement an ErrorResponse or NoticeResponse belongs to: `index` counts the
    statements of a Query before it (the one the server is at); `bind` is the body of the
    Bind whose portal runs it, for its parameter values."""

    source: Source
    index: int = 0
    bind: bytes | None = None


class _InFlight:
    """A message that awaits its answer. Most attributes keep their class default: an entry
    is made for every Parse, Bind, Describe and Execute of a masked session, audited or
    not, so it sets only what differs."""

    kind: str  # "query", "execute", "describe", "parse", "bind", "close", "sync", "call"
    fields: dict[str, object] | None = None
    started: int = 0
    layout: Layout = ()
    rows: int = 0
    outcome: str = "ok"
    subjects: dict[str, set[str]] | None = None  # created when the first key is read
    # the raw subject-key bytes of the current result set, a set per layout column:
    # decoded once per distinct key when the result set ends
    raw: tuple[set[bytes], ...] = ()
    undecodable: bool = False
    wants_rows: bool = False
    # a Describe's statement or portal, taken when it is sent: a later Bind may reuse the
    # name before the answer arrives
    target: _Prepared | _Portal | None = None
    portal: _Portal | None = None  # an Execute's: its layout may be described later
    params: dict[int, str] | None = None  # its subject-key parameters
    # tables whose subject column was in every result set so far (None: none seen)
    keyed: set[str] | None = None
    data_rows: int = 0  # DataRows seen (counted only while they are captured)
    # a Parse's, Bind's or Close's (registry, name, what it left there (None: nothing),
    # what the name held before): put back when the server refuses or skips the message
    parsed: tuple[dict[bytes, Any], bytes, object, object] | None = None
    # the names a query's DEALLOCATE / CLOSE / DISCARD removed: put back if it fails
    undo: tuple[tuple[dict[bytes, Any], bytes, object], ...] = ()
    # names defined again while the log held them (registry, name, what it holds, the new
    # definition): the server refuses a name in use, unless it no longer had it (a cursor
    # its transaction closed); its success says which, and then the new one is in place
    replace: tuple[tuple[dict[bytes, Any], bytes, object, object], ...] = ()
    running: int = 0  # the number of its `running` event, once its rows began to go out
    source: Source | None = None  # what it runs, for `cause`
    bind: bytes | None = None  # the Bind of the portal it runs (a Bind's own body)
    done: int = 0  # a Query's statements completed so far

    def __init__(
        self,
        kind: str,
        fields: dict[str, object] | None = None,
        started: int = 0,
        *,
        parsed: tuple[dict[bytes, Any], bytes, object, object] | None = None,
        source: Source | None = None,
        bind: bytes | None = None,
    ) -> None:
        self.kind = kind
        if fields is not None:
            self.fields = fields
        if started:
            self.started = started
        if parsed is not None:
            self.parsed = parsed
        if source is not None:
            self.source = source
        if bind is not None:
            self.bind = bind


_SYNC = _InFlight("sync")


@dataclass(slots=True)
class _Portal:
    fields: dict[str, object] | None
    statement: _Prepared
    formats: list[int]
    layout: Layout | None = None  # from a Describe of the portal itself
    params: dict[int, str] | None = None  # those that carry subject keys
    bind: bytes | None = None  # the Bind message's body: its parameter values, read on demand
    # what it runs (its statement's texts, or a DECLARE's), and the context under which
    # that was last decided or confirmed (None: not to be trusted without a check)
    decided: tuple[Decided, ...] = ()
    current: object = None

    def resolve(self, log: StatementLog) -> Layout:
        if self.layout is None:
            described = self.statement.described
            self.layout = log._layout(described, self.formats) if described is not None else ()
        return self.layout


@dataclass(slots=True)
class _Prepared:
    fields: dict[str, object] | None
    # the statement's own RowDescription body (text formats), to apply Bind's formats to
    described: bytes | None = None
    source: Source | None = None
    decided: tuple[Decided, ...] = ()  # see _Portal
    current: object = None


Named = _Prepared | _Portal  # what a statement or portal name holds


class StatementLog:
    def __init__(
        self,
        holder: ContextHolder,
        emit: Callable[[dict[str, object]], object],
        subjects_limit: int = 100,
        clock: Callable[[], int] = time.monotonic_ns,
    ) -> None:
        self._holder = holder
        self._emit = emit
        self._limit = subjects_limit
        self._clock = clock
        self._fifo: deque[_InFlight] = deque()
        self._statements: dict[bytes, _Prepared] = {}
        self._portals: dict[bytes, _Portal] = {}
        # DataRows are looked at only while a statement on a table with a subject column is
        # in flight
        self.rows_in_flight = 0
        self._subjects_of: object = None
        self._layouts: dict[object, Layout] = {}
        self._layouts_of: object = None
        self._running = 0  # `running` events recorded in this session
        self._with_subject: frozenset[str] = frozenset()
        # the masked filter's check of a name that a Bind, Execute or Describe uses, when
        # it was decided under another context: None to let it run, or why not
        self.vet: Callable[[Named], str | None] | None = None
        # definitions of names the log held, made by the statement being decided: taken by
        # the Query that carries them (see _InFlight.replace)
        self._replacing: list[tuple[dict[bytes, Any], bytes, object, object]] = []

    def attach(self, emit: Callable[[dict[str, object]], object], subjects_limit: int) -> None:
        """Events go to `emit` from now on (auditing began for the session)."""
        self._emit = emit
        self._limit = subjects_limit

    @property
    def in_flight(self) -> bool:
        """Whether anything sent awaits its answer."""
        return bool(self._fifo)

    # ---- frontend ----------------------------------------------------------------------

    def query(
        self,
        fields: dict[str, object] | None,
        undo: tuple[tuple[dict[bytes, Any], bytes, object], ...] = (),
        source: Source | None = None,
    ) -> None:
        """A simple-protocol Query; `undo`: what its drops removed (see `drop`), put back
        when it fails (a DEALLOCATE in an aborted transaction leaves the statement)."""
        entry = _InFlight("query", fields, self._clock(), source=source)
        entry.undo = undo
        if self._replacing:
            entry.replace = tuple(self._replacing)
            self._replacing.clear()
        self._push(entry)

    def parse(
        self,
        name: bytes,
        fields: dict[str, object] | None,
        source: Source | None = None,
        decided: Decided | None = None,
    ) -> None:
        """A Parse; `decided`: what the masked filter sent for it."""
        # a PREPARE or DECLARE parsed here defines its name only when it runs: until then
        # the name keeps what it held, and may hold either
        self._replacing.clear()
        texts = (decided,) if decided is not None else ()
        previous = self._statements.get(name)
        if name and previous is not None:
            # the server refuses to redefine a named statement (42P05): the old one stays;
            # unless the log kept a name the server no longer has: it may hold either, and
            # its ParseComplete says it holds the new one
            previous.decided = _merge(previous.decided, texts)
            entry = _InFlight("parse", source=source)
            fresh = _Prepared(fields, source=source, decided=texts, current=self._stamp(texts))
            entry.replace = ((self._statements, name, previous, fresh),)
            self._fifo.append(entry)
            return
        if source is not None and previous is not None and previous.source is not None:
            # the same text with the same declared types, parsed again under the same name
            # (asyncpg describes the unnamed statement, then parses it again to run it):
            # the server resolves its parameters as it did
            old = previous.source
            if old.sql == source.sql and old.declared == source.declared:
                source.types = old.types
        registered = self._statements[name] = _Prepared(
            fields, source=source, decided=texts, current=self._stamp(texts)
        )
        self._fifo.append(
            _InFlight("parse", parsed=(self._statements, name, registered, previous), source=source)
        )

    # SQL PREPARE / DECLARE / EXECUTE / FETCH name the protocol's statements and portals

    def named(self, name: str) -> dict[str, object] | None:
        """The audit fields of what a statement or portal name runs ("statement:N")."""
        kind, _, text = name.partition(":")
        key = text.encode()
        found = self._statements.get(key) if kind == "statement" else self._portals.get(key)
        return found.fields if found is not None else None

    def statement_fields(self, name: bytes) -> dict[str, object] | None:
        """The audit fields of a protocol statement name (None: nothing protected)."""
        found = self._statements.get(name)
        return found.fields if found is not None else None

    def portal_fields(self, name: bytes) -> dict[str, object] | None:
        found = self._portals.get(name)
        return found.fields if found is not None else None

    def entry(self, name: str) -> Named | None:
        """What a SQL-level name ("statement:N", "portal:N") holds."""
        kind, _, text = name.partition(":")
        key = text.encode()
        return self._statements.get(key) if kind == "statement" else self._portals.get(key)

    def used(self, typ: int, body: bytes) -> Named | None:
        """The statement a Bind names, the portal an Execute names, the statement or portal
        a Describe names (None: a name the log does not hold)."""
        if typ == _BIND:
            start = body.index(b"\0") + 1
            return self._statements.get(body[start : body.index(b"\0", start)])
        if typ == _EXECUTE:
            return self._portals.get(body[: body.index(b"\0")])
        registry = self._statements if body[:1] == b"S" else self._portals
        return registry.get(body[1:-1])

    def _stamp(self, texts: tuple[Decided, ...]) -> object:
        """The context a name just decided is current under (none for a name whose text
        the masked filter does not know)."""
        return self._holder.context if texts else None

    def define(
        self, name: str, fields: dict[str, object] | None, decided: Decided | None = None
    ) -> None:
        """A PREPARE or DECLARE; `decided`: what the masked filter sent for its query."""
        kind, _, text = name.partition(":")
        key = text.encode()
        texts = (decided,) if decided is not None else ()
        current = self._stamp(texts)
        registry: dict[bytes, Any] = self._statements if kind == "statement" else self._portals
        statement = _Prepared(fields, decided=texts, current=current)
        fresh: Named = statement
        if kind != "statement":
            fresh = _Portal(fields, statement, [], decided=texts, current=current)
        held: Named | None = registry.get(key)
        if held is None:
            registry[key] = fresh
        else:
            # PREPARE of a name in use fails (42P05), and DECLARE (42P03), if the server
            # still has it (a cursor ends with its transaction): the name may hold either
            # until the query succeeds
            held.decided = _merge(held.decided, texts)
            self._replacing.append((registry, key, held, fresh))

    def drop(self, name: str) -> list[tuple[dict[bytes, Any], bytes, object]]:
        """Forget a SQL-level name ("statement:p", "cursor:c", "*" for all); returns what
        was removed, for `query` to put back if the statement fails."""
        kind, _, text = name.partition(":")
        table: dict[bytes, Any] = self._statements if kind == "statement" else self._portals
        if text == "*":
            removed = [(table, key, value) for key, value in table.items()]
            table.clear()
            return removed
        previous = table.pop(text.encode(), None)
        return [(table, text.encode(), previous)] if previous is not None else []

    def bind(self, body: bytes) -> str | None:
        """A Bind; or, when `vet` refuses its statement, the reason (nothing is noted: the
        caller refuses the message)."""
        end = body.index(b"\0")
        portal = body[:end]
        name = body[end + 1 : body.index(b"\0", end + 1)]
        stmt = self._statements.get(name)
        if stmt is not None and stmt.current is not self._holder.context and self.vet is not None:
            reason = self.vet(stmt)
            if reason is not None:
                return reason
        previous = self._portals.get(portal)
        source = stmt.source if stmt is not None else None
        registered: _Portal | None = None
        if stmt is None:
            pass
        elif stmt.fields is None:
            # nothing to record of it: kept for what its errors may show (`cause`)
            registered = _Portal(
                None, stmt, [], bind=body, decided=stmt.decided, current=stmt.current
            )
        else:
            named = stmt.fields.get("_subject_keys", ())
            assert isinstance(named, tuple)
            wanted = {k for _table, keys, _int in named for k in keys if isinstance(k, int)}
            formats, params = _bind_values(body, wanted)
            registered = _Portal(
                stmt.fields, stmt, formats, params=params, bind=body, decided=stmt.decided,
                current=stmt.current,
            )  # fmt: skip
        if portal and previous is not None:
            # the server refuses to bind a named portal in use (42P03): the old one stays;
            # unless it ended with its transaction: the name may hold either, and its
            # BindComplete says it holds the new one
            entry = _InFlight("bind", source=source, bind=body)
            if registered is not None:
                previous.decided = _merge(previous.decided, registered.decided)
                entry.replace = ((self._portals, portal, previous, registered),)
            self._fifo.append(entry)
            return None
        if registered is None:
            self._portals.pop(portal, None)
        else:
            self._portals[portal] = registered
        # a Bind that fails leaves what the name held (the statement is looked up first)
        self._fifo.append(
            _InFlight(
                "bind", parsed=(self._portals, portal, registered, previous), source=source,
                bind=body,
            )
        )  # fmt: skip
        return None

    def note_failing_bind(self) -> None:
        """A Bind that will fail (refused by pgveil): it has its place in the queue, and
        changes no name."""
        self._fifo.append(_InFlight("bind"))

    def describe(self, body: bytes) -> str | None:
        """A Describe; or, when `vet` refuses what it names, the reason (see `bind`)."""
        name = body[1:-1]
        target: _Prepared | _Portal | None
        target = (self._statements if body[0] == ord("S") else self._portals).get(name)
        if (
            target is not None
            and self.vet is not None
            and target.current is not self._holder.context
        ):
            reason = self.vet(target)
            if reason is not None:
                return reason
        if isinstance(target, _Prepared):
            entry = _InFlight("describe")
            if target is not None:
                entry.target, entry.source = target, target.source
        else:
            entry = _InFlight("describe")
            if target is not None:
                entry.target = target
                entry.source, entry.bind = target.statement.source, target.bind
        self._fifo.append(entry)  # never has fields: _push is for entries with events
        return None

    def execute(self, body: bytes) -> str | None:
        """An Execute; or, when `vet` refuses its portal, the reason (see `bind`)."""
        portal = self._portals.get(body[: body.index(b"\0")])
        if portal is None:
            self._push(_InFlight("execute", started=self._clock()))
            return None
        if portal.current is not self._holder.context and self.vet is not None:
            reason = self.vet(portal)
            if reason is not None:
                return reason
        entry = _InFlight("execute", portal.fields, self._clock())
        entry.portal, entry.params = portal, portal.params
        entry.source, entry.bind = portal.statement.source, portal.bind
        self._push(entry)
        if portal.fields is not None and (
            portal.layout is not None or portal.statement.described is not None
        ):
            # described already: its rows are looked at only if they carry subjects
            self._resolve(entry)
            self._want_rows(entry, bool(entry.layout))
        return None

    def close(self, body: bytes) -> None:
        """Close of a statement or portal: forgotten now (a Parse right behind it may reuse
        the name), put back if the server skips the Close after an error."""
        registry: dict[bytes, Any] = self._statements if body[0] == ord("S") else self._portals
        name = body[1:-1]
        previous = registry.pop(name, None)
        self._fifo.append(_InFlight("close", parsed=(registry, name, None, previous)))

    def sync(self) -> None:
        self._fifo.append(_SYNC)  # one entry for all: nothing in a Sync's entry changes

    def function_call(self, fields: dict[str, object] | None = None) -> None:
        self._push(_InFlight("call", fields, self._clock()))

    def _push(self, entry: _InFlight) -> None:
        if entry.fields is not None:
            tables = entry.fields.get("tables")
            assert isinstance(tables, list)
            entry.wants_rows = not self._subject_tables().isdisjoint(tables)
            self.rows_in_flight += entry.wants_rows
        self._fifo.append(entry)

    def _want_rows(self, entry: _InFlight, wanted: bool) -> None:
        """Whether the entry's DataRows must be looked at, now that its result columns are
        known. The capture mask changes between reads, so rows already passed in this read
        may have gone by unseen: then the subjects are not complete."""
        if wanted and not entry.wants_rows:
            entry.undecodable = True
        if wanted != entry.wants_rows:
            self.rows_in_flight += 1 if wanted else -1
            entry.wants_rows = wanted

    def _subject_tables(self) -> frozenset[str]:
        """Protected tables with a subject column (their rows tell the subjects)."""
        ctx = self._holder.context
        if self._subjects_of is not ctx:
            self._subjects_of = ctx
            self._with_subject = frozenset(
                t.qualified for t in ctx.policy.tables.values() if t.subject is not None
            )
        return self._with_subject

    # ---- backend -----------------------------------------------------------------------

    def cause(self) -> Cause | None:
        """The statement that an ErrorResponse or NoticeResponse arriving now belongs to, as
        the server pairs them (to be asked before the message goes to `server_message`):
        the statement of a Query that the server is at, a Parse's statement, the statement
        behind a Bind's, Describe's or Execute's portal with that Bind's body. None when
        nothing sent is being answered (an asynchronous notice), or when what is answered
        is no statement (a Sync committing, a Close, a FunctionCall)."""
        fifo = self._fifo
        if not fifo:
            return None
        head = fifo[0]
        if head.source is None:
            return None
        return Cause(head.source, head.done, head.bind)

    def server_message(self, typ: int, body: bytes) -> None:
        fifo = self._fifo
        if not fifo:
            return
        head = fifo[0]
        if typ == _DATA_ROW:
            self.data_row(body)
        elif typ == _PARSE_COMPLETE:
            if head.kind == "parse":
                fifo.popleft()
                if head.replace:
                    _replace(head)
        elif typ == _BIND_COMPLETE:
            if head.kind == "bind":
                fifo.popleft()
                if head.replace:
                    _replace(head)
        elif typ == _READY_FOR_QUERY:
            self._ready()
        elif typ == m.CLOSE_COMPLETE:
            if head.kind == "close":
                fifo.popleft()
        elif typ == m.COPY_IN_RESPONSE:
            # the server ignores a Sync that arrives during COPY FROM STDIN (libpq sends one
            # right after the Execute): it gets no ReadyForQuery of its own
            if head.kind == "execute":
                while len(fifo) > 1 and fifo[1].kind == "sync":
                    del fifo[1]
        elif typ == _COMMAND_COMPLETE or typ == m.EMPTY_QUERY_RESPONSE:
            # one per statement of a Query (the server's EndCommand for each raw statement)
            head.done += 1
            if head.fields is not None:  # counted and read for its event only
                head.rows += _row_count(body) if typ == _COMMAND_COMPLETE else 0
                if head.raw:
                    _decode_keys(head)
                head.layout = ()
            if head.kind == "execute":
                self._finish(fifo.popleft())
        elif typ == m.PORTAL_SUSPENDED:
            if head.kind == "execute":
                # no count in the message: the DataRows seen, when they were all looked at
                head.rows = head.data_rows if head.wants_rows else -1
                self._finish(fifo.popleft())
        elif typ == _ROW_DESCRIPTION:
            if head.kind == "describe":
                self._described(fifo.popleft(), body)
            elif head.kind in ("query", "execute") and head.fields is not None:
                if head.raw:
                    _decode_keys(head)
                self._set_layout(head, self._layout(body, None))
                self._keyed(head)
                self._want_rows(head, bool(head.layout))
        elif typ == m.NO_DATA:
            if head.kind == "describe":
                fifo.popleft()
        elif typ == m.PARAMETER_DESCRIPTION:
            # a statement's Describe: its parameter types as the server resolved them
            target = head.target if head.kind == "describe" else None
            if isinstance(target, _Prepared) and target.source is not None:
                (count,) = struct.unpack_from("!h", body, 0)
                target.source.types = struct.unpack_from(f"!{count}I", body, 2)
        elif typ == m.ERROR_RESPONSE:
            self._error(head, body)

    def _ready(self) -> None:
        """ReadyForQuery: the request it ends (up to its Sync, Query or FunctionCall) is
        answered."""
        fifo = self._fifo
        while fifo:
            entry = fifo.popleft()
            if entry.undo and entry.outcome != "ok":
                for registry, name, previous in reversed(entry.undo):
                    registry.setdefault(name, previous)
            if entry.replace and entry.outcome == "ok":
                _replace(entry)
            if entry.kind in ("query", "execute", "call"):
                self._finish(entry)
            if entry.kind in ("sync", "query", "call"):
                break

    def data_row(self, body: bytes) -> None:
        """One DataRow of the statement at the head: counted, and its subject keys read."""
        self.data_rows((body,))

    def data_rows(self, bodies: Sequence[bytes]) -> None:
        """DataRows of the statement at the head, in order: counted, and the raw bytes of
        their subject keys kept (decoded once per distinct key, when the result ends)."""
        fifo = self._fifo
        if not fifo:
            return
        head = fifo[0]
        head.data_rows += len(bodies)
        if head.portal is not None:
            self._resolve(head)
        if not head.layout:
            return
        unpack = _INT32.unpack_from
        for (index, _table, _type, _fmt), keys in zip(head.layout, head.raw, strict=True):
            if index == 0:
                # the common case, the key first: no other field to skip
                found = {body[6 : 6 + unpack(body, 2)[0]] for body in bodies}
                if b"" in found and any(unpack(body, 2)[0] < 0 for body in bodies):
                    head.undecodable = True  # a row without its key (see below)
                    found = {b[6 : 6 + unpack(b, 2)[0]] for b in bodies if unpack(b, 2)[0] >= 0}
                keys |= found
                continue
            for body in bodies:
                pos = 2
                for _ in range(index):
                    pos += 4 + max(unpack(body, pos)[0], 0)
                (n,) = unpack(body, pos)
                if n < 0:
                    # a row without its key (an outer join, say) may still carry that
                    # table's data from elsewhere: the subjects cannot be complete
                    head.undecodable = True
                else:
                    keys.add(body[pos + 4 : pos + 4 + n])

    def rows_released(self) -> None:
        """Rows (or COPY data) of the statement at the head go to the client before it
        completes (a result larger than one read): its access is recorded now, as a
        `running` event, and its complete event follows with the same `running` number.
        Results are never released before their events are written, so a crash cannot
        lose the record of rows a client already has."""
        fifo = self._fifo
        if not fifo:
            return
        head = fifo[0]
        if head.fields is None or head.running or head.kind not in ("query", "execute"):
            return
        self._running += 1
        head.running = self._running
        event = dict(head.fields)
        event.pop("_subject_keys", None)
        event["rows"] = None
        event["outcome"] = "running"
        event["duration_ms"] = round((self._clock() - head.started) / 1e6, 3)
        event["subjects_complete"] = False
        event["running"] = head.running
        self._emit(event)

    def _error(self, head: _InFlight, body: bytes) -> None:
        code = m.sqlstate_of(body) or "XX000"
        if m.severity_of(body) not in ("ERROR", "FATAL", "PANIC"):
            return
        if head.kind in ("query", "call"):
            head.outcome = code  # finished at ReadyForQuery
            return
        # extended protocol: the server skips everything up to Sync; the first Execute in
        # that run is the one that failed (or never ran because an earlier message failed)
        fifo = self._fifo
        failed = False
        skipped: list[tuple[dict[bytes, Any], bytes, object, object]] = []
        while fifo and fifo[0].kind != "sync":
            entry = fifo.popleft()
            if entry.parsed is not None:
                skipped.append(entry.parsed)
            if entry.kind == "execute" and not failed:
                entry.outcome = code
                self._finish(entry)
                failed = True
            else:
                self.rows_in_flight -= entry.wants_rows
        # the Parse, Bind and Close messages that failed or were skipped: each name gets
        # back what it held, the latest change undone first
        for registry, name, left, previous in reversed(skipped):
            if registry.get(name) is left:
                if previous is None:
                    registry.pop(name, None)
                else:
                    registry[name] = previous

    def _finish(self, entry: _InFlight) -> None:
        if entry.fields is None:
            return
        self.rows_in_flight -= entry.wants_rows
        if entry.raw:
            _decode_keys(entry)
        event = dict(entry.fields)
        named = event.pop("_subject_keys", ())
        assert isinstance(named, tuple)
        if entry.portal is not None:
            self._resolve(entry)
        # the rows tell a table's subjects exactly when every result set carried its key
        covered = set(entry.keyed or ())
        if entry.outcome == "ok":
            for table, keys, integer in named:
                if table in covered:
                    continue  # the rows returned say it exactly
                params = entry.params or _NO_PARAMS
                resolved = [k if isinstance(k, str) else params.get(k) for k in keys]
                if all(k is not None for k in resolved):
                    covered.add(table)
                    if entry.rows:
                        if entry.subjects is None:
                            entry.subjects = {}
                        entry.subjects[table] = {
                            integer_key(k) if integer else k for k in resolved if k is not None
                        }
        event["rows"] = entry.rows if entry.rows >= 0 else None  # None: not known
        event["outcome"] = entry.outcome
        event["duration_ms"] = round((self._clock() - entry.started) / 1e6, 3)
        if entry.subjects:
            event["subjects"] = {
                t: sorted(keys)[: self._limit] for t, keys in entry.subjects.items()
            }
            event["subjects_total"] = {t: len(keys) for t, keys in entry.subjects.items()}
        # subjects are known only as far as the analysis went
        event["subjects_complete"] = (
            not entry.undecodable
            and event.get("analysis_complete") is not False
            and _covers(entry, covered)
        )
        if entry.running:
            event["running"] = entry.running
        self._emit(event)

    # ---- subject columns ---------------------------------------------------------------

    def _resolve(self, entry: _InFlight) -> None:
        """An Execute's result columns, from its portal's or statement's Describe."""
        assert entry.portal is not None
        portal, entry.portal = entry.portal, None
        if portal.layout is not None or portal.statement.described is not None:
            self._set_layout(entry, portal.resolve(self))
            self._keyed(entry)

    @staticmethod
    def _set_layout(entry: _InFlight, layout: Layout) -> None:
        entry.layout = layout
        entry.raw = tuple(set() for _ in layout)

    @staticmethod
    def _keyed(entry: _InFlight) -> None:
        tables = {table for _i, table, _t, _f in entry.layout}
        entry.keyed = tables if entry.keyed is None else entry.keyed & tables

    def _described(self, entry: _InFlight, body: bytes) -> None:
        target = entry.target
        if isinstance(target, _Prepared):
            if target.fields is not None:
                target.described = body
        elif target is not None and target.fields is not None:
            target.layout = self._layout(body, None)

    def _layout(self, body: bytes, formats: list[int] | None) -> Layout:
        """The result columns that are some protected table's subject column (remembered
        per RowDescription: a statement shape's results are described alike)."""
        ctx = self._holder.context
        if self._layouts_of is not ctx:
            self._layouts_of = ctx
            self._layouts.clear()
        key = (body, tuple(formats)) if formats is not None else body
        layout = self._layouts.get(key)
        if layout is None:
            if len(self._layouts) >= _LAYOUTS:
                self._layouts.clear()
            layout = self._layouts[key] = self._find_layout(body, formats)
        return layout

    def _find_layout(self, body: bytes, formats: list[int] | None) -> Layout:
        pmap = self._holder.context.pmap
        (count,) = struct.unpack_from("!h", body, 0)
        pos = 2
        found: list[SubjectColumn] = []
        for i in range(count):
            pos = body.index(b"\0", pos) + 1
            table_oid, attnum, type_oid = struct.unpack_from("!IhI", body, pos)
            (fmt,) = struct.unpack_from("!h", body, pos + 16)
            pos += 18
            if not table_oid:
                continue
            p = pmap.by_oid.get(table_oid)
            if p is None or p.subject is None:
                continue
            for c in p.relation.columns:
                if c.attnum == attnum and c.name == p.subject:
                    if formats is not None:
                        fmt = _format_of(formats, i)
                    found.append((i, p.rule_table, type_oid, fmt))
        return tuple(found)


def _replace(entry: _InFlight) -> None:
    """The server accepted a definition of a name the log held: the new one is in place."""
    for registry, name, held, fresh in entry.replace:
        if registry.get(name) is held:
            registry[name] = fresh


def _decode_keys(entry: _InFlight) -> None:
    """The subject keys of the result set that ends, decoded from the raw bytes kept."""
    for (_index, table, type_oid, fmt), raws in zip(entry.layout, entry.raw, strict=True):
        if not raws:
            continue
        if entry.subjects is None:
            entry.subjects = {}
        keys = entry.subjects.setdefault(table, set())
        if fmt == 0:
            # text: one decode for all (NUL cannot occur in a text value)
            keys.update(b"\0".join(raws).decode("utf-8", "replace").split("\0"))
            continue
        for raw in raws:
            key = _key(raw, type_oid, fmt)
            if key is None:
                entry.undecodable = True
            else:
                keys.add(key)
    entry.raw = ()


def _covers(entry: _InFlight, covered: set[str]) -> bool:
    """Subjects are complete when the rows returned carry every protected table's subject
    column or the statement names its subjects, or nothing was touched."""
    assert entry.fields is not None
    if not entry.running and (entry.outcome != "ok" or (entry.rows == 0 and entry.data_rows == 0)):
        return True  # nothing reached the client (rows that went out make it `running`)
    tables = entry.fields.get("tables", [])
    assert isinstance(tables, list)
    return all(t in covered for t in tables)


def _key(raw: bytes, type_oid: int, fmt: int) -> str | None:
    if fmt == 0:
        return raw.decode("utf-8", "replace")
    code = _INT.get(type_oid)
    if code is not None and len(raw) == struct.calcsize(code):
        return str(struct.unpack(code, raw)[0])
    if type_oid in _TEXTUAL:
        return raw.decode("utf-8", "replace")
    if type_oid == _UUID and len(raw) == 16:
        return str(uuid.UUID(bytes=raw))
    return None


def _format_of(formats: list[int], i: int) -> int:
    if not formats:
        return 0
    return formats[0] if len(formats) == 1 else (formats[i] if i < len(formats) else 0)


def _bind_values(body: bytes, wanted: set[int]) -> tuple[list[int], dict[int, str]]:
    """A Bind message's result-column format codes, and the `wanted` parameters (numbered
    from 1) as subject keys."""
    pos = body.index(b"\0", body.index(b"\0") + 1) + 1
    (nfmt,) = struct.unpack_from("!h", body, pos)
    formats = struct.unpack_from(f"!{nfmt}h", body, pos + 2)
    pos += 2 + 2 * nfmt
    (nparams,) = struct.unpack_from("!h", body, pos)
    pos += 2
    params: dict[int, str] = {}
    for i in range(nparams):
        (n,) = struct.unpack_from("!i", body, pos)
        if i + 1 in wanted and n >= 0:
            raw = body[pos + 4 : pos + 4 + n]
            fmt = formats[0] if nfmt == 1 else (formats[i] if nfmt else 0)
            # a binary parameter's type is in Parse, not here: 2, 4 and 8 bytes are taken
            # for integers (subject keys are), anything else for text
            key = _key(raw, _BY_LENGTH.get(n, 25), fmt)
            if key is not None:
                params[i + 1] = key
        pos += 4 + max(n, 0)
    (nres,) = struct.unpack_from("!h", body, pos)
    return list(struct.unpack_from(f"!{nres}h", body, pos + 2)), params


# binary parameters whose text form is plain: integers, text-like types, uuid, json
_TEXT_FORM = frozenset((25, 1043, 1042, 19, 705, 114))  # text, varchar, bpchar, name, unknown, json
_JSONB = 3802


def bind_parameters(body: bytes, types: Sequence[int]) -> list[str]:
    """The parameter values of a Bind message as text, the way the server reads them:
    text-format values decoded from UTF-8 (masked sessions use it); binary ones only where
    `types` (the statement's parameter types) says how they read as text. A NULL, or a value
    that does not read, is left out."""
    pos = body.index(b"\0", body.index(b"\0") + 1) + 1
    (nfmt,) = struct.unpack_from("!h", body, pos)
    formats = struct.unpack_from(f"!{nfmt}h", body, pos + 2)
    pos += 2 + 2 * nfmt
    (nparams,) = struct.unpack_from("!h", body, pos)
    pos += 2
    values: list[str] = []
    for i in range(nparams):
        (n,) = struct.unpack_from("!i", body, pos)
        pos += 4
        if n < 0:
            continue
        raw = body[pos : pos + n]
        pos += n
        fmt = formats[0] if nfmt == 1 else (formats[i] if nfmt else 0)
        type_oid = types[i] if i < len(types) else 0
        value = _param_text(raw, type_oid) if fmt == 1 else _utf8(raw)
        if value is not None:
            values.append(value)
    return values


def _param_text(raw: bytes, type_oid: int) -> str | None:
    """A binary parameter's text form, for the types whose binary form says it exactly."""
    code = _INT.get(type_oid)
    if code is not None:
        return str(struct.unpack(code, raw)[0]) if len(raw) == struct.calcsize(code) else None
    if type_oid in _TEXT_FORM:
        return _utf8(raw)
    if type_oid == _JSONB:
        return _utf8(raw[1:]) if raw[:1] == b"\x01" else None
    if type_oid == _UUID:
        return str(uuid.UUID(bytes=raw)) if len(raw) == 16 else None
    return None


def _utf8(raw: bytes) -> str | None:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return None


def _row_count(body: bytes) -> int:
    """The row count at the end of a CommandComplete tag (`SELECT 5`, `INSERT 0 5`)."""
    tag = body[:-1]
    space = tag.rfind(b" ")
    if space < 0:
        return 0
    digits = tag[space + 1 :]
    return int(digits) if digits.isdigit() else 0
