"""Pairs each statement a session runs with its answer, for audit events with outcomes.

Fed with the frontend messages that get an answer of their own (Query, Parse, Bind, Describe,
Execute, Close, Sync, FunctionCall), the client's CopyDone and CopyFail, and the backend
messages that answer them, in stream order, it keeps a FIFO of what is in flight, like the
server's own queue. When a statement that touched protected tables completes, it calls `emit`
once with what the audit event says of it: its fields from the analysis, the rows returned
or affected (from CommandComplete; a statement that fails, the DataRows and CopyData it sent
before the error, counted through the scanner's marks: `rows_to`), the outcome (`ok` or the
SQLSTATE), whether an error or notice of it may carry values, the duration, and the data
subjects: the values of each protected table's `subject` column in the rows returned (or of
a view's column that shows it: rules.views), decoded from that column alone
(rules/keys.py), and the keys the statement names with its parameters as bound. They are
complete only where the statement's shape proves it (rules/subjects.py: `_row_subjects`,
`_subject_keys` in its fields). Subject keys are identifiers; no other value of a row is
ever decoded here. A Query whose COMMIT is followed by more statements is recorded in two
parts (`_split`); a statement still in flight when the session ends is recorded with
outcome `unknown` (`abandon`): every statement that touched a protected table ends in an
event.

The same pairing tells the masked filter which statement caused each ErrorResponse and
NoticeResponse (`cause`): the statement of a Query the server is at (counted by its
CommandCompletes), the Parse, or the statement behind a Bind's or Execute's portal with that
Bind's parameter values. It is kept for every masked session, audited or not.

Names. Prepared statements and portals (SQL PREPARE and DECLARE name the same things) are
looked up when a message is sent, before the server has answered what was sent before it.
So the log keeps two pictures of them: the server's as its answers so far prove it
(`_confirmed`), and the one a message sent now meets (`_predicted`: the confirmed picture
with every message in flight applied as the server would apply it). Both follow the
server's rules: a portal ends with its transaction unless it is a WITH HOLD cursor whose
transaction commits; ROLLBACK TO SAVEPOINT drops what was declared after the savepoint;
CLOSE ALL, DEALLOCATE ALL and DISCARD ALL drop names; a Query drops the unnamed statement
and portal; after an error the server skips to Sync. When an answer departs from the
prediction (an error, a name accepted that the prediction had in use, a transaction status
other than predicted, a Sync swallowed by COPY), the prediction is rebuilt from the
confirmed picture, and every message in flight whose names now read otherwise is marked
uncertain. What cannot be known is uncertain too: a name the server has that pgveil did not
see defined, a portal after CALL or DO (code that may end the transaction). An uncertain
statement's audit event says so (no tables, analysis and subjects incomplete) and its errors
keep no literal (`cause` is None): nothing is attributed to a guess.

Rules. The names are also where a masked session keeps what each statement and portal runs:
the client's text and the decision it was sent under (`Decided`, on the statement; a portal
runs its statement's, a cursor its DECLARE's), and the context under which that decision was
made or last confirmed (`current`). A Bind, Describe or Execute (and, through the masked
filter, an EXECUTE, FETCH or MOVE) of a name whose context was replaced is first re-checked
(`vet`: proxy/session/masked.py), and refused when the rules now decide its text otherwise.
The check is made against what the prediction says the name holds; when the answers refute
it, the message already sent is checked again against what they prove it reads (`recheck`),
and if that fails, `refuted` says why and the filter ends the session before the message's
answers reach the client. A name whose text cannot be told (uncertain) keeps the context of
what it replaced, or of when it became known to exist: it is refused once that context is
replaced.

COPY FROM STDIN. The server ignores a Sync that arrives while it reads copy data, and only
its answers tell whether a Sync sent after a COPY statement came then: the CopyInResponse
makes the Syncs sent right behind the statement, before the client's CopyDone or CopyFail,
provisional; a copy that completes swallowed them all; one that fails may have swallowed the
first few, and the answers that follow tell how many (a Sync's only answer is
ReadyForQuery). Where no answer can tell, the pairing is lost: `lost` says why, and the
filter ends the session rather than pair errors and events with guesses.

No I/O; nothing from a row but subject keys leaves this module.
"""

from __future__ import annotations

import copy
import re
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from mypy_extensions import mypyc_attr

from audit.kinds import NOT_READ
from audit.redaction import fingerprint
from proxy.session.reading import Reading, ReadingTracker, server_name
from proxy.wire import async_, errors, extended, rows, simple
from proxy.wire import messages as m
from rules.context import ContextHolder, MaskingContext
from rules.effects import Effect, Effects
from rules.keys import OID_TYPES, Value, parameter_value, row_key
from rules.settings import SettingOp
from rules.subjects import NamedKeys, ParamKey, bound_keys

_TEXTUAL = frozenset((25, 1043, 1042, 19))  # text, varchar, bpchar, name
_DATA_ROW = m.DATA_ROW
_PARSE_COMPLETE = m.PARSE_COMPLETE
_BIND_COMPLETE = m.BIND_COMPLETE
_READY_FOR_QUERY = m.READY_FOR_QUERY
_COMMAND_COMPLETE = m.COMMAND_COMPLETE
_ROW_DESCRIPTION = m.ROW_DESCRIPTION
_ERROR_RESPONSE = m.ERROR_RESPONSE
_PARAMETER_STATUS = m.PARAMETER_STATUS
_BIND = m.BIND
_EXECUTE = m.EXECUTE
_IDLE = m.TX_IDLE
_STATEMENT = ord("S")  # Describe and Close of a statement (else a portal)
_LAYOUTS = 256  # RowDescriptions remembered per session
_NO_KEYS: dict[str, frozenset[str]] = {}  # never changed
# Backend messages that answer something the client sent (all but the asynchronous
# NoticeResponse, NotificationResponse and ParameterStatus; ErrorResponse apart: it may also
# end a session on its own)
_ANSWERS = frozenset(b"123CDGHIVWZcdnsTt")
_REQUESTS = frozenset(("sync", "query", "call"))  # what ReadyForQuery answers
_EXITS = frozenset(("commit", "commit_chain", "rollback", "rollback_chain", "prepare_transaction"))
_UNKNOWN_TEXT = "(a statement pgveil cannot pair with its name)"
# The server keeps and compares the first NAMEDATALEN-1 bytes of a protocol statement or
# portal name, converted to the server encoding (the hash tables of prepared statements and
# portals have keys of NAMEDATALEN bytes): two longer names that share those bytes are one
# name to it. SQL names are truncated by the scanner already (pglast does the same).
_NAME_BYTES = 63
# Errors and notices known to carry nothing read from a table: fixed texts. Any other may
# (see _carries_values): a value is quoted wherever the server converts or looks it up (a
# cast, `::regclass`, current_setting(), a tsquery, ...), in nearly every class
_FIXED_TEXT = frozenset((
    "22012", "57014", "25P02", "25P01", "25001", "25006", "40001", "57P01", "57P02", "57P03",
    "53100", "53200", "53300", "55P03",
))  # fmt: skip
_COMMITS = frozenset(("commit", "commit_chain", "prepare_transaction"))
# statement kinds that change nothing of the database by themselves (a data-modifying WITH
# or EXPLAIN ANALYZE of a write shows its words: see _may_write)
_READS = frozenset(("select", "explain", "show", "fetch", "declare", "transaction", "set"))
# code that may commit the transaction it runs in and go on (CALL, DO outside a block): one
# that fails may have committed part of its work
_CODE = frozenset(("call", "DoStmt"))
_WRITE_WORD = re.compile(r"\b(?:insert|update|delete|merge)\b", re.IGNORECASE)
_COPY_OUT = re.compile(r"\bto\s+stdout\b", re.IGNORECASE)

# a result column that carries a subject key: (field index, table, type name, format)
SubjectColumn = tuple[int, str, str, int]
Layout = tuple[SubjectColumn, ...]
# what a message does to names, in order: (statement index, effect kind, name, the statement
# or portal it defines)
_Op = tuple[int, str, bytes, Any]


@dataclass(slots=True)
class Source:
    """A statement as the client sent it, for the masked filter's error scrubbing: its text,
    the text the server got instead when pgveil rewrote it (or probed it), and (protocol
    statements) its parameter types: those the Parse declared (0: the server infers it),
    and those the server resolved once a Describe of the statement told them
    (ParameterDescription)."""

    sql: str
    sent: str | None = None
    declared: tuple[int, ...] = ()
    types: tuple[int, ...] = ()
    # a text pgveil's parser cannot read: the nonce of the syntax probe the server got
    # instead (proxy/session/masked.py), whose answer is the server's own syntax error
    probe: str | None = None


@dataclass(frozen=True, slots=True)
class Decided:
    """What the masked filter sent for one client text: `action` "pass", "rewrite" or
    "refuse" (the server got a statement that fails instead: nothing of it runs), with the
    rewritten text or the refusal's reason in `value`."""

    sql: str
    action: str
    value: str | None = None


@dataclass(frozen=True, slots=True)
class Cause:
    """The statement an ErrorResponse or NoticeResponse belongs to: `index` counts the
    statements of a Query before it (the one the server is at); `bind` is the body of the
    Bind whose portal runs it, for its parameter values."""

    source: Source
    index: int = 0
    bind: bytes | None = None


@dataclass(slots=True, eq=False)
class _Prepared:
    fields: dict[str, object] | None
    # the statement's own RowDescription body (text formats), to apply Bind's formats to
    described: bytes | None = None
    source: Source | None = None
    # what running it does to names and the transaction (None: not known)
    effects: tuple[Effect, ...] | None = ()
    # its parameters' types: those the Parse declared (0: the server infers it), then
    # those a Describe's ParameterDescription says the server resolved (for subject keys)
    param_types: tuple[int, ...] = ()
    uncertain: bool = False  # a name the server has, holding pgveil does not know what
    # masked sessions: the text and what was sent for it (None: not known), and the context
    # under which that was decided or last confirmed (None: checked before any use)
    decided: Decided | None = None
    current: MaskingContext | None = None
    # what running it does to the settings the server reads text by (None: not known)
    settings: tuple[SettingOp, ...] | None = None


@dataclass(slots=True, eq=False)
class _Portal:
    fields: dict[str, object] | None
    statement: _Prepared
    formats: list[int]
    layout: Layout | None = None  # from a Describe of the portal itself
    params: dict[str, frozenset[str]] | None = None  # the subject keys its parameters bind
    bind: bytes | None = None  # the Bind message's body: its parameter values, read on demand
    uncertain: bool = False
    # names may have moved since its statement's Parse was analysed: the server plans it
    # again, so what its Executes read cannot be told (see StatementFilter._parsed)
    names_moved: bool = False
    # the first Execute sent of a portal whose statement names others (FETCH c, EXECUTE p):
    # the server runs that statement once, at the first Execute, and later Executes hand
    # out the rows it kept (a cursor or statement of that name made since is not read)
    first: _InFlight | None = None

    def resolve(self, log: StatementLog) -> Layout:
        if self.layout is None:
            described = self.statement.described
            self.layout = log._layout(described, self.formats) if described is not None else ()
        return self.layout


# what a statement or portal name runs: a portal its statement's text, a cursor its DECLARE's
Named = _Prepared


def _unknown_statement(current: MaskingContext | None) -> _Prepared:
    """A statement the server has, holding pgveil cannot tell what; `current`: the context
    after whose replacement a use of it is refused (see the module docstring)."""
    return _Prepared(None, effects=None, uncertain=True, current=current)


def _unknown_portal(current: MaskingContext | None) -> _Portal:
    return _Portal(None, _unknown_statement(current), [], uncertain=True)


def _runs(named: _Prepared | _Portal | None) -> Named | None:
    """What a statement or portal runs."""
    return named.statement if isinstance(named, _Portal) else named


def audit_fields(named: Named) -> dict[str, object] | None:
    """The audit fields of what a name runs (None: nothing protected)."""
    return _UNCERTAIN_FIELDS if named.uncertain else named.fields


class _Names:
    """The session's prepared statements and portals, and what decides how long a portal
    lives: the transaction status ('I' outside a transaction block, 'T' in one, 'E' in a
    failed one, as ReadyForQuery reports it), its savepoints, whether the implicit
    transaction failed. `skipping`: an error is predicted, the server skips to Sync."""

    __slots__ = (
        "depth", "failed", "held", "hold", "maybe", "portals", "savepoints", "skipping",
        "statements", "tx",
    )  # fmt: skip

    def __init__(self) -> None:
        self.statements: dict[bytes, _Prepared] = {}
        self.portals: dict[bytes, _Portal] = {}
        self.held: set[bytes] = set()  # cursors held over from a committed transaction
        self.hold: set[bytes] = set()  # WITH HOLD cursors of the current transaction
        # portals that may be gone (CALL or DO may have ended their transaction): if the
        # server still has one, it is the one kept here. A Bind or DECLARE of the name is
        # predicted to succeed, an Execute or FETCH to run it; the answer tells.
        self.maybe: set[bytes] = set()
        self.depth: dict[bytes, int] = {}  # savepoints open when a portal was made (if any)
        self.savepoints: list[bytes] = []
        self.tx = "I"
        self.failed = False
        self.skipping = False

    def copy(self) -> _Names:
        n = _Names.__new__(_Names)
        n.statements = dict(self.statements)
        n.portals = dict(self.portals)
        n.held = set(self.held)
        n.hold = set(self.hold)
        n.maybe = set(self.maybe)
        n.depth = dict(self.depth)
        n.savepoints = list(self.savepoints)
        n.tx = self.tx
        n.failed = self.failed
        n.skipping = self.skipping
        return n

    def fail(self) -> None:
        """An error: a transaction block fails, an implicit transaction rolls back at its
        end."""
        if self.tx == "T":
            self.tx = "E"
        elif self.tx == "I":
            self.failed = True

    def end(self, commit: bool | None) -> None:
        """The transaction ends, committed (True), rolled back (False) or one of the two
        (None): only held cursors stay, and the WITH HOLD cursors it declared if it
        commits (not known: uncertain)."""
        if self.portals and not self.held and not self.hold:
            # the common case: only portals of this transaction
            self.portals = {}
            if self.maybe:
                self.maybe = set()
            if self.depth:
                self.depth = {}
        elif self.portals:
            portals = self.portals
            kept = {name: portals[name] for name in self.held if name in portals}
            maybe = {name for name in self.maybe if name in kept}
            for name in self.hold:
                if commit is not False and name in portals:
                    kept[name] = portals[name]
                    if commit is None:
                        maybe.add(name)
            self.portals = kept
            self.held = set(kept)
            self.maybe = maybe
            self.hold = set()
            self.depth = {}
        if self.savepoints:
            self.savepoints = []
        self.tx = "I"
        self.failed = False

    def in_use(self, name: bytes) -> bool:
        """Whether a Bind or DECLARE of the name is refused (42P03), as far as known."""
        portal = self.portals.get(name)
        return portal is not None and not portal.uncertain and name not in self.maybe

    def add_portal(self, name: bytes, portal: _Portal, hold: bool = False) -> None:
        self.portals[name] = portal
        # (a portal has a depth only while savepoints are open)
        if not (hold or self.held or self.hold or self.maybe or self.savepoints or self.depth):
            return  # the common case: nothing else to keep
        if name in self.held:
            self.held.discard(name)
        if name in self.maybe:
            self.maybe.discard(name)
        if hold:
            self.hold.add(name)
        elif name in self.hold:
            self.hold.discard(name)
        if self.savepoints:
            self.depth[name] = len(self.savepoints)
        elif self.depth:
            self.depth.pop(name, None)

    def drop_portal(self, name: bytes) -> None:
        if self.portals.pop(name, None) is not None:
            self.held.discard(name)
            self.hold.discard(name)
            self.maybe.discard(name)
            self.depth.pop(name, None)

    def drop_all_portals(self) -> None:
        self.portals = {}
        self.held = set()
        self.hold = set()
        self.maybe = set()
        self.depth = {}

    def all_unknown(self) -> None:
        """Anything may have happened to every name."""
        # (each keeps the context of what it held: a use once that is replaced is refused)
        self.statements = {
            name: _unknown_statement(held.current) for name, held in self.statements.items()
        }
        self.portals = {
            name: _unknown_portal(held.statement.current) for name, held in self.portals.items()
        }

    def maybe_ended(self) -> None:
        """Code that may have ended the transaction it ran in (CALL, DO outside a block):
        its portals may be gone or not."""
        if self.tx == "I":
            self.maybe.update(name for name in self.portals if name not in self.held)

    def effect(self, kind: str, name: bytes, obj: Any, tag: bytes | None) -> bool:
        """One effect of a statement that runs; `tag` is its CommandComplete tag when the
        server says it completed (None: predicted). False when the server refuses it (a
        name in use: predicted only)."""
        if kind == "declare" or kind == "declare_hold":
            if tag is None and self.in_use(name):
                return False  # 42P03
            self.add_portal(name, obj, hold=kind == "declare_hold")
        elif kind == "close":
            self.drop_portal(name)
        elif kind == "close_all":
            self.drop_all_portals()
        elif kind == "prepare":
            current_statement = self.statements.get(name)
            if tag is None and current_statement is not None and not current_statement.uncertain:
                return False  # 42P05
            self.statements[name] = obj
        elif kind == "deallocate":
            self.statements.pop(name, None)
        elif kind == "deallocate_all" or kind == "discard_all":
            # the unnamed statement is no prepared statement of the SQL level
            unnamed = self.statements.get(b"")
            self.statements = {b"": unnamed} if unnamed is not None else {}
            if kind == "discard_all":
                self.drop_all_portals()
        elif kind == "begin":
            if self.tx == "I":
                self.tx = "T"
        elif kind in _EXITS:
            if kind == "rollback" or kind == "rollback_chain":
                commit = False
            else:
                # COMMIT of a failed transaction rolls it back (its tag says ROLLBACK)
                commit = self.tx != "E" and not self.failed and tag != b"ROLLBACK"
            self.end(commit)
            if kind.endswith("_chain"):
                self.tx = "T"
        elif kind == "savepoint":
            if self.tx == "T":
                self.savepoints.append(name)
        elif kind == "release" or kind == "rollback_to":
            return self._to_savepoint(name, kind == "rollback_to")
        elif kind == "unknown_tx":
            self.maybe_ended()
        return True

    def _to_savepoint(self, name: bytes, rollback: bool) -> bool:
        points = self.savepoints
        for i in range(len(points) - 1, -1, -1):
            if points[i] == name:
                break
        else:
            return False  # no such savepoint: the statement fails (3B001)
        level = i + 1  # portals made while this savepoint (or a later one) was open
        for portal, depth in list(self.depth.items()):
            if depth < level:
                continue
            if rollback:
                self.drop_portal(portal)
            elif i:
                self.depth[portal] = i
            else:
                del self.depth[portal]
        if rollback:
            del points[level:]  # the savepoint itself stays
            self.tx = "T"
        else:
            del points[i:]
        return True


@mypyc_attr(serializable=True)  # compiled, `_split` copies one (copy.copy)
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
    params: dict[str, frozenset[str]] | None = None  # the subject keys its parameters bind
    # tables whose subject column was in every result set so far (None: none seen)
    keyed: set[str] | None = None
    data_rows: int = 0  # DataRows seen (counted only while they are captured)
    # DataRows and CopyData the server sent for it since its last CommandComplete, captured
    # or not (see StatementLog.rows_to): the rows of a statement that fails before its count
    sent: int = 0
    running: int = 0  # the number of its `running` event, once its rows began to go out
    values: bool = False  # an error or notice of it may carry values (see _carries_values)
    ended: str = ""  # why the session ended while it was in flight (outcome unknown)
    # a Query whose statements up to a COMMIT were recorded on their own (see _split): the
    # first statement this entry still records, and (a recorded part) the last one
    first: int = 0
    last: int = -1
    source: Source | None = None  # what it runs, for `cause`
    bind: bytes | None = None  # the Bind of the portal it runs (a Bind's own body)
    done: int = 0  # a Query's statements completed so far
    # -- names: what the message names, and what it defines (see StatementLog._replay)
    name: bytes = b""  # Parse, Bind: the name it defines; Describe, Close: kind and name
    statement_name: bytes = b""  # Bind: the statement it binds
    obj: Any = None  # Parse: its statement; Bind: its portal
    resolved: Any = None  # Bind: the statement; Execute: the portal it was sent against
    ops: tuple[_Op, ...] = ()  # what it does to names, by statement
    targets: list[Any] | None = None  # what its EXECUTE / FETCH name (by op), as predicted
    unknown: bool = False  # what it does to names cannot be known
    fail_at: int = -1  # the statement (Query) predicted to fail; 0 for other messages
    skipped: bool = False  # predicted to be skipped (an earlier message fails)
    uncertain: bool = False  # what it runs cannot be told for sure
    expect: str = "I"  # Sync, Query, FunctionCall: the transaction status predicted after it
    # -- how its text was read (unmasked sessions: proxy/session/reading.py)
    sensitive: int = 0  # what its reading depends on, while that waits to be checked
    base: Reading | None = None  # ... what its request was predicted to begin under
    # a Query whose text depends on a setting: what it was predicted to leave in force
    after: tuple[Reading, int] | None = None
    # -- COPY FROM STDIN
    copy_ends: int = 0  # CopyDone and CopyFail messages the client had sent before it
    copies: int = 0  # copies of this statement completed so far
    provisional: bool = False  # a Sync the server may have swallowed
    finished: bool = False  # answered, not skipped: it ran (see _Portal.first)
    empty: bool = False  # a Query with no statement (EmptyQueryResponse): it makes no portal

    def __init__(
        self,
        kind: str,
        fields: dict[str, object] | None = None,
        started: int = 0,
        *,
        source: Source | None = None,
        bind: bytes | None = None,
    ) -> None:
        self.kind = kind
        # set here, not only as the class default: compiled, mypyc leaves a default of None
        # undefined when the type is a union of two classes (tests/unit/test_implementation.py)
        self.target = None
        if fields is not None:
            self.fields = fields
        if started:
            self.started = started
        if source is not None:
            self.source = source
        if bind is not None:
            self.bind = bind


# The entry of a Sync that ends an implicit transaction and has nothing else to it (the
# common case), shared: whatever would change in it gets an entry of its own instead
_SYNC = _InFlight("sync")
_SYNC_PROBE = _InFlight("sync")  # (what a shared Sync would predict: see _rebuild)


def _own_sync(fifo: deque[_InFlight], i: int) -> _InFlight:
    """The Sync at `i` of the queue, with an entry of its own."""
    entry = fifo[i]
    if entry is _SYNC:
        entry = fifo[i] = _InFlight("sync")
    return entry


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
        self._confirmed = _Names()
        self._predicted = _Names()
        # DataRows are looked at only while a statement on a table with a subject column is
        # in flight
        self.rows_in_flight = 0
        self._subjects_of: object = None
        self._layouts: dict[object, Layout] = {}
        self._layouts_of: object = None
        self._running = 0  # `running` events recorded in this session
        self.rows_total = 0  # DataRows and CopyData the server sent so far (see rows_to)
        self._with_subject: frozenset[str] = frozenset()
        self._copy_ends = 0  # CopyDone and CopyFail messages the client sent
        self._copy_head: _InFlight | None = None  # whose copy data the server reads now
        # Syncs at the head of the queue the server may have swallowed (see _settle)
        self._eatable = 0
        # an extended-protocol COPY failed with provisional Syncs behind it: the server skips
        # to the first Sync it reads outside the copy (see _ready)
        self._skip_ambiguous = False
        self.lost: str | None = None  # why the pairing cannot go on, once it cannot
        # masked sessions: the check of what a Bind, Describe or Execute names, when it was
        # decided under another context (None to let it run, or why not), at the time it
        # is sent (`vet`) and when the answers prove it reads another (`recheck`)
        self.vet: Callable[[Named], str | None] | None = None
        # the context the session began under: a name pgveil's picture lacks (the server
        # refuses its use, unless the picture is wrong) may hold a text decided under any
        # context since, and is checked as one pgveil cannot tell (see `absent`)
        self.origin: MaskingContext | None = holder.context
        self.recheck: Callable[[Named], str | None] | None = None
        # why a message already sent reads what may not run under the current context (the
        # answers refuted what it was checked against): the session must end
        self.refuted: str | None = None
        # unmasked sessions: what each message's text is read under (the client encoding
        # and standard_conforming_strings may change; masked sessions end if they do)
        self.reading: ReadingTracker | None = None
        self._unverified = 0  # entries whose reading waits for the server's report

    @property
    def encoding(self) -> str:
        """The Python codec that text keys in rows and parameters are read in: the client
        encoding, when the server's last report and pgveil's prediction agree on it; else
        none ("": keys in text then read as nothing, and subjects are not complete)."""
        reading = self.reading
        if reading is None:
            return "utf-8"  # masked sessions use UTF8, or end
        return reading.codec()

    def _name(self, raw: bytes) -> bytes:
        """A protocol name as the server keys it: converted to its encoding (UTF-8) from
        the client encoding predicted for the message, at most NAMEDATALEN-1 bytes."""
        if not raw.isascii() and self.reading is not None:
            raw = server_name(raw, self.reading.now())
        return raw[:_NAME_BYTES]

    def attach(self, emit: Callable[[dict[str, object]], object], subjects_limit: int) -> None:
        """Events go to `emit` from now on (auditing began for the session)."""
        self._emit = emit
        self._limit = subjects_limit

    def head(self) -> object:
        """The entry of the message the server answers now (None: none), to compare only."""
        return self._fifo[0] if self._fifo else None

    def predicted_status(self) -> str:
        """The transaction status predicted once everything sent ran ('I', 'T' or 'E', as
        ReadyForQuery reports it), assuming what was sent succeeds."""
        return self._predicted.tx

    def tail(self) -> object:
        """The entry of the message sent last (None: none), to compare only."""
        return self._fifo[-1] if self._fifo else None

    @property
    def in_flight(self) -> bool:
        """Whether anything sent awaits its answer."""
        return bool(self._fifo)

    # ---- frontend ----------------------------------------------------------------------

    def query(
        self,
        fields: dict[str, object] | None,
        source: Source | None = None,
        effects: Effects | None = (),
        decided: Decided | None = None,
        sensitive: int = 0,
        settings: tuple[SettingOp, ...] | None = None,
    ) -> None:
        """A simple-protocol Query; `effects`: what its statements do to names and the
        transaction, in order (None: not known); `decided`: what the masked filter sent for
        it (what its PREPAREs and DECLAREs hold); `sensitive`: which reading settings its
        text depends on, `settings`: what it does to them (unmasked sessions: see
        `reading`)."""
        entry = _InFlight("query", fields, self._clock(), source=source)
        if effects is None:
            entry.unknown = True
        elif effects:
            entry.ops = self._ops(effects, fields, decided, self._stamp(decided))
        if self._copy_ends:
            entry.copy_ends = self._copy_ends
        if self.lost is not None:
            entry.uncertain = True
        tracker = self.reading
        if tracker is not None:
            if sensitive and not self._read_for_sure(entry, tracker, sensitive):
                entry.uncertain = True  # what it reads cannot be told
                entry.unknown = True  # nor what it does to names
            tracker.query(settings)
            if sensitive:
                # checked when it ends: a setting that changed unforeseen (a reload of the
                # server's configuration) may have changed before it was read
                entry.after = (tracker.now(), sensitive)
        names = self._predicted
        if entry.ops or entry.unknown or names.skipping or names.tx != "I":
            self._predict_query(names, entry, 0)
            self._merge(entry)
        else:
            # the common case: a statement outside a transaction block that names nothing
            # (the unnamed statement and portal go, the implicit transaction ends)
            if names.statements:
                names.statements.pop(b"", None)
            if names.portals or names.failed or names.savepoints:
                names.end(not names.failed)
        self._push(entry)

    def parse(
        self,
        name: bytes,
        fields: dict[str, object] | None,
        source: Source | None = None,
        effects: Effects | None = (),
        decided: Decided | None = None,
        sensitive: int = 0,
        settings: tuple[SettingOp, ...] | None = None,
        declared: tuple[int, ...] = (),
    ) -> None:
        """A Parse; `decided`: what the masked filter sent for it; `sensitive`, `settings`:
        as for `query`; `declared`: the parameter types it declares (for subject keys:
        given when its fields name any)."""
        if len(name) > _NAME_BYTES or not name.isascii():
            name = self._name(name)
        names = self._predicted
        entry = _InFlight("parse", source=source)
        entry.name = name
        previous = names.statements.get(name)
        resolved = declared
        if source is not None and previous is not None and previous.source is not None:
            # the same text with the same declared types, parsed again under the same name
            # (asyncpg describes the unnamed statement, then parses it again to run it):
            # the server resolves its parameters as it did
            old = previous.source
            if old.sql == source.sql and old.declared == source.declared:
                source.types = old.types
                resolved = previous.param_types or declared
        own: tuple[Effect, ...] | None = ()
        if effects is None:
            own = None
        elif effects:
            own = tuple(effect for statement in effects for effect in statement)
        prepared = entry.obj = _Prepared(
            fields, source=source, effects=own, decided=decided, current=self._stamp(decided)
        )
        tracker = self.reading
        if tracker is not None:
            if sensitive and not self._read_for_sure(entry, tracker, sensitive):
                prepared.uncertain = True  # what it reads cannot be told
                prepared.effects = None
            prepared.settings = settings
        if resolved:
            prepared.param_types = resolved
        if names.skipping or (name and previous is not None and not previous.uncertain):
            self._predict_parse(names, entry)
        else:
            names.statements[name] = prepared  # the common case
        self._fifo.append(entry)

    def _read_for_sure(self, entry: _InFlight, tracker: ReadingTracker, sensitive: int) -> bool:
        """Whether the text of a Query or Parse sent now, which depends on the reading
        settings `sensitive` names, was read as the server reads it: for sure (nothing
        unforeseen can have changed them), or once the server reports what its request began
        under (it waits for that). False: it cannot be known (code ran since the request
        began, and nothing will be reported in between)."""
        if not tracker.settled(sensitive):
            return False
        if tracker.base_exact:
            return True
        entry.sensitive = sensitive
        entry.base = tracker.base
        self._unverified += 1
        return True

    # SQL PREPARE / DECLARE / EXECUTE / FETCH name the protocol's statements and portals

    def named(self, name: str) -> dict[str, object] | None:
        """The audit fields of what a statement or portal name runs ("statement:N"), as far
        as can be told before the statement is sent (None: nothing protected, or no such
        name)."""
        kind, _, text = name.partition(":")
        key = text.encode()
        names = self._predicted
        found: _Prepared | _Portal | None
        found = names.statements.get(key) if kind == "statement" else names.portals.get(key)
        if found is None:
            return None
        return _UNCERTAIN_FIELDS if found.uncertain else found.fields

    def entry(self, name: str) -> Named | None:
        """What a SQL-level name ("statement:N", "portal:N") runs, as far as can be told
        before the statement is sent."""
        kind, _, text = name.partition(":")
        key = text.encode()
        names = self._predicted
        if kind == "statement":
            return names.statements.get(key)
        portal = names.portals.get(key)
        return portal.statement if portal is not None else None

    def used(self, typ: int, body: bytes) -> Named | None:
        """What the statement a Bind names, the portal an Execute names, the statement or
        portal a Describe names runs (None: a name the log does not hold)."""
        names = self._predicted
        if typ == _BIND:
            return names.statements.get(self._name(extended.bind_names(body)[1]))
        if typ == _EXECUTE:
            portal = names.portals.get(self._name(extended.execute_portal(body)))
        else:
            kind, name = extended.target(body)
            if kind == b"S":
                return names.statements.get(self._name(name))
            portal = names.portals.get(self._name(name))
        return portal.statement if portal is not None else None

    def absent(self) -> str | None:
        """The check of a name pgveil's picture lacks, used by a masked session (None: it
        may run). The server refuses such a use unless the picture missed what it holds:
        then it holds what was decided under some context since the session began, and
        runs only while that is the current one."""
        if self.vet is None or self.origin is self._holder.context:
            return None
        return self.vet(_unknown_statement(self.origin))

    def _stamp(self, decided: Decided | None) -> MaskingContext | None:
        """The context a name just decided is current under (none for a name whose text
        the masked filter does not know)."""
        return self._holder.context if decided is not None else None

    def _rechecked(self, named: Named | None) -> None:
        """A message already sent reads `named` after all (the answers refuted what it was
        checked against): if that may not run under the current context, the session must
        end before the message's answers reach the client (`refuted`)."""
        if self.recheck is None or named is None or named.current is self._holder.context:
            return  # (unmasked sessions; the common case: decided under the context in force)
        reason = self.recheck(named)
        if reason is not None and self.refuted is None:
            self.refuted = reason

    def statement_fields(self, name: bytes) -> dict[str, object] | None:
        """The audit fields of a protocol statement name (None: nothing protected)."""
        found = self._predicted.statements.get(self._name(name))
        if found is None:
            return None
        return _UNCERTAIN_FIELDS if found.uncertain else found.fields

    def portal_fields(self, name: bytes) -> dict[str, object] | None:
        found = self._predicted.portals.get(self._name(name))
        if found is None:
            return None
        return _UNCERTAIN_FIELDS if found.uncertain else found.fields

    def bind(self, body: bytes, names_moved: bool = False) -> str | None:
        """A Bind; or, when `vet` refuses its statement, the reason (nothing is noted: the
        caller refuses the message). `names_moved`: the masked filter's word that names may
        have moved since the statement was analysed (its Executes are uncertain)."""
        portal_name, statement_name = extended.bind_names(body)
        if not statement_name.isascii() or len(statement_name) > _NAME_BYTES:
            statement_name = self._name(statement_name)
        if len(portal_name) > _NAME_BYTES or not portal_name.isascii():
            portal_name = self._name(portal_name)
        names = self._predicted
        statement = names.statements.get(statement_name)
        if self.vet is not None:
            if statement is not None and statement.current is not self._holder.context:
                reason = self.vet(statement)
                if reason is not None:
                    return reason
            elif statement is None and not names.skipping:
                reason = self.absent()
                if reason is not None:
                    return reason
        if self.reading is not None:
            known = statement is not None and not statement.uncertain and not names.skipping
            self.reading.bind(statement.settings if known and statement is not None else None)
        entry = _InFlight("bind", bind=body)
        entry.name = portal_name
        entry.statement_name = statement_name
        entry.resolved = statement
        if statement is None or statement.uncertain:
            # (a statement the log does not hold: the server's to answer until the context
            # is replaced)
            current = statement.current if statement is not None else self._holder.context
            portal = entry.obj = _unknown_portal(current)
        else:
            fields = statement.fields
            if fields is None:
                # nothing to record of it: kept for what its errors may show (`cause`)
                portal = entry.obj = _Portal(None, statement, [], bind=body)
            else:
                formats, params = self._bound(statement, fields, body)
                portal = entry.obj = _Portal(fields, statement, formats, params=params, bind=body)
            portal.names_moved = names_moved  # (a statement of nothing protected too)
            entry.source = statement.source
            if not names.skipping and not (portal_name and names.in_use(portal_name)):
                # the common case
                if names.held or names.hold or names.maybe or names.savepoints:
                    names.add_portal(portal_name, portal)
                else:
                    names.portals[portal_name] = portal
                self._fifo.append(entry)
                return None
        self._predict_bind(names, entry)
        self._fifo.append(entry)
        return None

    def note_failing_bind(self) -> None:
        """A Bind that will fail (refused by pgveil): it has its place in the queue, and
        changes no name."""
        entry = _InFlight("bind")
        entry.fail_at = 0
        entry.skipped = True  # (its portal name is not looked at)
        self._predicted.fail()
        self._predicted.skipping = True
        self._fifo.append(entry)

    def describe(self, body: bytes) -> str | None:
        """A Describe; or, when `vet` refuses what it names, the reason (see `bind`)."""
        names = self._predicted
        if self.vet is not None:
            named = self.used(m.DESCRIBE, body)
            if named is not None and named.current is not self._holder.context:
                reason = self.vet(named)
                if reason is not None:
                    return reason
        entry = _InFlight("describe")
        kind, name = extended.target(body)
        if len(name) > _NAME_BYTES or not name.isascii():
            name = self._name(name)
        key = entry.name = kind + name
        if not names.skipping:
            # the common case: a name pgveil knows for sure
            target: _Prepared | _Portal | None
            if key[0] == _STATEMENT:
                target = names.statements.get(key[1:])
                if target is not None and not target.uncertain:
                    entry.resolved = entry.target = target
                    entry.source = target.source
                    self._fifo.append(entry)
                    return None
            else:
                target = names.portals.get(key[1:])
                if target is not None and not target.uncertain:
                    entry.resolved = entry.target = target
                    entry.source, entry.bind = target.statement.source, target.bind
                    self._fifo.append(entry)
                    return None
        self._predict_describe(names, entry, replay=False)
        self._fifo.append(entry)  # never has fields: _push is for entries with events
        return None

    def execute(self, body: bytes) -> str | None:
        """An Execute; or, when `vet` refuses its portal, the reason (see `bind`)."""
        names = self._predicted
        name = extended.execute_portal(body)
        if len(name) > _NAME_BYTES or not name.isascii():
            name = self._name(name)
        portal = names.portals.get(name)
        vet = self.vet
        if vet is not None:
            reason = self._vet_execute(vet, portal)
            if reason is not None:
                return reason
        if self.reading is not None:
            known = portal is not None and not portal.uncertain and not names.skipping
            self.reading.execute(portal.statement.settings if known and portal else None)
        entry = _InFlight("execute", started=self._clock())
        entry.name = name
        if names.skipping:
            portal = None
        entry.resolved = portal
        if portal is not None and not portal.uncertain:
            entry.fields = portal.fields
            entry.portal, entry.params = portal, portal.params
            entry.source, entry.bind = portal.statement.source, portal.bind
            entry.uncertain = portal.names_moved
            effects = portal.statement.effects
            first = portal.first
            if first is not None and (first.finished or first in self._fifo):
                # the server does not run the statement again: this Execute hands out the
                # rest of what the first one read (which may still be in flight: then
                # what it read is not known yet)
                entry.fields = first.fields
                entry.uncertain = first.uncertain or not first.finished
            elif effects is None or effects:
                if effects:
                    portal.first = entry
                if effects is None:
                    entry.unknown = True
                else:
                    statement = portal.statement
                    entry.ops = self._ops(
                        (effects,), portal.fields, statement.decided, statement.current
                    )
                self._predict_execute(names, entry, replay=False)
                if entry.targets is not None:
                    self._merge(entry)
        else:
            if portal is not None:
                entry.uncertain = True
                entry.unknown = True  # what its statement does cannot be known either
                entry.fields = _unknown_fields("execute")
            self._predict_execute(names, entry, replay=False)
        self._push(entry)
        if (
            portal is not None
            and not entry.uncertain
            and entry.fields is not None
            and (portal.layout is not None or portal.statement.described is not None)
        ):
            # described already: its rows are looked at only if they carry subjects
            self._resolve(entry)
            self._want_rows(entry, bool(entry.layout))
        return None

    def _vet_execute(
        self, vet: Callable[[Named], str | None], portal: _Portal | None
    ) -> str | None:
        """What `vet` says of an Execute of `portal` (masked sessions)."""
        if portal is not None and portal.statement.current is not self._holder.context:
            # (checked even where an error is predicted before it: the prediction may be
            # refuted, and a refusal the server skips changes nothing)
            reason = vet(portal.statement)
            if reason is not None:
                return reason
        if portal is None and not self._predicted.skipping:
            reason = self.absent()
            if reason is not None:
                return reason
        if portal is not None and portal.first is not None:
            # a later Execute hands out what the first one's FETCH or EXECUTE read
            for target in portal.first.targets or ():
                named = _runs(target)
                if named is not None and named.current is not self._holder.context:
                    reason = vet(named)
                    if reason is not None:
                        return reason
        return None

    def close(self, body: bytes) -> None:
        """Close of a statement or portal: forgotten now (a Parse right behind it may reuse
        the name), kept by the confirmed picture until the server's CloseComplete."""
        entry = _InFlight("close")
        kind, name = extended.target(body)
        entry.name = kind + self._name(name)
        self._predict_close(self._predicted, entry)
        self._fifo.append(entry)

    def sync(self) -> None:
        if self.reading is not None:
            self.reading.sync()
        names = self._predicted
        if (
            self._copy_head is None
            and not self._copy_ends
            and names.tx == "I"
            and not names.skipping
            and not names.failed
        ):
            # the common case: the implicit transaction ends, with the portals of it
            if names.portals:
                if names.held or names.hold or names.maybe or names.depth or names.savepoints:
                    names.end(True)
                else:
                    names.portals = {}
            self._fifo.append(_SYNC)
            return
        entry = _InFlight("sync")
        if self._copy_ends:
            entry.copy_ends = self._copy_ends
        head = self._copy_head
        if (
            head is not None
            and self._fifo
            and self._copy_ends == head.copy_ends + head.copies
            and (self._fifo[-1] is head or self._fifo[-1].provisional)
        ):
            # sent right behind the statement whose copy data the server reads now
            entry.provisional = True
            self._eatable += 1
        if names.tx != "I" or names.skipping or names.failed:
            self._predict_end(names, entry)
        elif names.portals:
            # the common case: the implicit transaction ends, with the portals of it
            if names.held or names.hold or names.maybe or names.depth or names.savepoints:
                names.end(True)
            else:
                names.portals = {}
        self._fifo.append(entry)

    def function_call(self, fields: dict[str, object] | None = None) -> None:
        if self.reading is not None:
            self.reading.function_call()
        entry = _InFlight("call", fields, self._clock())
        names = self._predicted
        if names.skipping:
            entry.skipped = True
            entry.expect = ""  # (a ReadyForQuery for it refutes the prediction)
        else:
            self._predict_end(names, entry)
        self._push(entry)

    def copy_end(self) -> None:
        """The client's CopyDone or CopyFail: a Sync after it is no copy's."""
        self._copy_ends += 1

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

    # ---- names: what the server will do with each message --------------------------------

    @staticmethod
    def _ops(
        effects: Effects,
        fields: dict[str, object] | None,
        decided: Decided | None = None,
        current: MaskingContext | None = None,
    ) -> tuple[_Op, ...]:
        """A message's effects, with the statements and cursors they define (whose audit
        fields are the statement's own: what an EXECUTE or FETCH of them reads; whose text,
        for a masked session's checks, is the message's whole text, decided under
        `current`)."""
        own = None if fields is None or fields.get("_optional") else fields
        ops: list[_Op] = []
        for index, statement in enumerate(effects):
            for kind, name in statement:
                obj: Any = None
                if kind == "declare" or kind == "declare_hold":
                    obj = _Portal(own, _Prepared(own, decided=decided, current=current), [])
                elif kind == "prepare":
                    obj = _Prepared(own, decided=decided, current=current)
                ops.append((index, kind, name.encode(), obj))
        return tuple(ops)

    def _apply(
        self, names: _Names, entry: _InFlight, position: int, tag: bytes | None, replay: bool
    ) -> bool:
        """The op at `position` of the entry, predicted (`tag` None) or confirmed; an
        EXECUTE or FETCH is resolved when predicted. False: the statement fails."""
        _index, kind, name, obj = entry.ops[position]
        if kind == "fetch" or kind == "execute" or kind == "move":
            found: _Portal | _Prepared | None
            found = names.statements.get(name) if kind == "execute" else names.portals.get(name)
            if tag is None:
                self._target(entry, position, found, replay)
            if found is None:
                return False  # no such cursor or statement (34000, 26000)
            if isinstance(found, _Prepared) and found.effects != ():
                names.all_unknown()  # EXECUTE of a statement that itself names things
            return True
        return names.effect(kind, name, obj, tag)

    def _target(self, entry: _InFlight, position: int, found: Any, replay: bool) -> None:
        targets = entry.targets
        if targets is None:
            targets = entry.targets = [None] * len(entry.ops)
        if replay:
            if targets[position] is not found:
                entry.uncertain = True  # it was sent reading another
                self._rechecked(_runs(found))
        else:
            # (the masked filter checked what the name held before the statement: one
            # before it in the same Query may have changed that)
            self._rechecked(_runs(found))
        targets[position] = found
        if found is not None and found.uncertain:
            entry.uncertain = True

    def _predict_query(
        self, names: _Names, entry: _InFlight, start: int, replay: bool = False
    ) -> None:
        """A Query from its statement `start` on: a Query drops the unnamed statement and
        portal, runs its statements, and ends an implicit transaction."""
        if names.skipping:
            entry.skipped = True  # the server skips it (no ReadyForQuery either)
            entry.expect = ""  # (one that comes refutes the prediction)
            return
        names.statements.pop(b"", None)
        if b"" in names.portals:
            # each statement of a Query runs in the unnamed portal, which replaces the old
            # one: a Query with no statement, or one whose first statement failed before
            # it began (a syntax error, say), leaves it (the answers tell)
            if not replay or not (entry.empty or (entry.outcome != "ok" and entry.done == 0)):
                names.drop_portal(b"")
            elif not entry.empty:
                names.maybe.add(b"")
        if entry.unknown:
            names.all_unknown()
        entry.fail_at = -1
        if entry.outcome == "ok":
            ops = entry.ops
            for position in range(len(ops)):
                index = ops[position][0]
                if index < start:
                    continue
                if not self._apply(names, entry, position, None, replay):
                    entry.fail_at = index
                    names.fail()
                    break
        self._predict_end(names, entry)

    def _predict_end(self, names: _Names, entry: _InFlight) -> None:
        """The end of a request (Sync, Query, FunctionCall): an implicit transaction ends."""
        if names.skipping:
            names.skipping = False
        if names.tx == "I":
            if names.portals or names.failed or names.savepoints:
                names.end(not names.failed)
            entry.expect = "I"
        else:
            entry.expect = names.tx

    def _predict_parse(self, names: _Names, entry: _InFlight) -> None:
        name = entry.name
        previous = names.statements.get(name)
        if entry.skipped or entry.fail_at != -1:
            entry.skipped, entry.fail_at = False, -1  # (predicted again)
        if names.skipping:
            entry.skipped = True
            return
        if name and previous is not None and not previous.uncertain:
            # the server refuses to redefine a named statement (42P05): the old one stays
            entry.fail_at = 0
            names.fail()
            names.skipping = True
            return
        names.statements[name] = entry.obj

    def _new_portal(self, statement: _Prepared | None, body: bytes) -> _Portal:
        if statement is None or statement.uncertain:
            current = statement.current if statement is not None else self._holder.context
            return _unknown_portal(current)
        if statement.fields is None:
            # nothing to record of it: kept for what its errors may show (`cause`)
            return _Portal(None, statement, [], bind=body)
        formats, params = self._bound(statement, statement.fields, body)
        return _Portal(statement.fields, statement, formats, params=params, bind=body)

    def _bound(
        self, statement: _Prepared, fields: dict[str, object], body: bytes
    ) -> tuple[list[int], dict[str, frozenset[str]] | None]:
        """A Bind's result-column formats, and the subject keys its parameters carry, by
        table (a table whose keys cannot be read is left out)."""
        named = fields.get("_subject_keys", ())
        assert isinstance(named, tuple)
        wanted = {k.number for n in named for k in n.keys if isinstance(k, ParamKey)}
        formats, raw = extended.bind_values(body, wanted)
        if not wanted:
            return formats, None
        types = statement.param_types
        found: dict[str, frozenset[str]] = {}
        for n in named:
            assert isinstance(n, NamedKeys)

            def value_of(p: ParamKey, n: NamedKeys = n) -> Value | None:
                value = raw.get(p.number)
                if value is None:
                    return None  # NULL, or no such parameter
                fmt, data = value
                oid = types[p.number - 1] if p.number <= len(types) else 0
                if oid:
                    typ = OID_TYPES.get(oid, "")
                elif p.ops and p.ops[0] not in ("+", "-"):
                    typ = p.ops[0]  # `$1::int8` makes the parameter an int8
                else:
                    typ = n.unknown_as  # the type the server infers from the comparison
                return parameter_value(typ, data, fmt, self.encoding) if typ else None

            keys = bound_keys(n, value_of)
            if keys is not None:
                found[n.table] = keys
        return formats, found

    def _predict_bind(self, names: _Names, entry: _InFlight) -> None:
        if entry.skipped or entry.fail_at != -1:
            entry.skipped, entry.fail_at = False, -1  # (predicted again)
        if names.skipping:
            entry.skipped = True
            return
        statement = entry.resolved
        if statement is not None and statement.uncertain:
            entry.uncertain = True
        if statement is None or (entry.name and names.in_use(entry.name)):
            # the server refuses a Bind to a statement it does not have (26000), or to a
            # named portal in use (42P03): the old portal stays
            entry.fail_at = 0
            names.fail()
            names.skipping = True
            return
        names.add_portal(entry.name, entry.obj)

    def _predict_describe(self, names: _Names, entry: _InFlight, replay: bool) -> None:
        if entry.skipped or entry.fail_at != -1:
            entry.skipped, entry.fail_at = False, -1  # (predicted again)
        if names.skipping:
            entry.skipped = True
            return
        name = entry.name[1:]
        target: _Prepared | _Portal | None
        if entry.name[0] == _STATEMENT:
            target = names.statements.get(name)
        else:
            target = names.portals.get(name)
        if replay and target is not entry.resolved:
            entry.uncertain = True
            entry.target = entry.source = entry.bind = None
            self._rechecked(_runs(target))  # it describes this one after all
        entry.resolved = target
        if target is None:
            entry.fail_at = 0  # no such statement or portal
            names.fail()
            names.skipping = True
        elif target.uncertain:
            entry.uncertain = True
        elif not entry.uncertain:
            entry.target = target
            if isinstance(target, _Prepared):
                entry.source = target.source
            else:
                entry.source, entry.bind = target.statement.source, target.bind

    def _predict_execute(self, names: _Names, entry: _InFlight, replay: bool) -> None:
        if entry.skipped or entry.fail_at != -1:
            entry.skipped, entry.fail_at = False, -1  # (predicted again)
        if names.skipping:
            entry.skipped = True
            return
        portal = names.portals.get(entry.name)
        if replay and portal is not entry.resolved:
            # sent against another portal: its event and errors cannot be told for sure,
            # what it does to names is what this one's statement does
            entry.uncertain = True
            entry.resolved = portal
            entry.targets = None
            entry.ops = ()
            entry.unknown = portal is not None and (
                portal.uncertain or portal.statement.effects is None
            )
            if portal is not None:
                statement = portal.statement
                self._rechecked(statement)  # it runs this one after all
                if not entry.unknown and statement.effects:
                    entry.ops = self._ops(
                        (statement.effects,), portal.fields, statement.decided, statement.current
                    )
        if portal is None:
            entry.fail_at = 0  # no such portal (34000)
            names.fail()
            names.skipping = True
            return
        if portal.uncertain:
            entry.uncertain = True
        if entry.unknown:
            names.all_unknown()
        for position in range(len(entry.ops)):
            if not self._apply(names, entry, position, None, replay):
                entry.fail_at = 0
                names.fail()
                names.skipping = True
                return

    def _predict_close(self, names: _Names, entry: _InFlight) -> None:
        entry.skipped = names.skipping
        if names.skipping:
            return
        name = entry.name[1:]
        if entry.name[0] == _STATEMENT:
            names.statements.pop(name, None)
        else:
            names.drop_portal(name)

    def _merge(self, entry: _InFlight) -> None:
        """The audit fields of a statement that runs what EXECUTE / FETCH name: its own
        tables and columns and theirs."""
        fields = entry.fields
        if fields is None or (entry.targets is None and "_optional" not in fields):
            return
        # (a cursor MOVE positions is not read: no access of the statement's)
        sources = [
            t.fields
            for t, op in zip(entry.targets or (), entry.ops, strict=False)
            if t is not None and not t.uncertain and t.fields is not None and op[1] != "move"
        ]
        if not sources and not entry.uncertain and fields.get("_optional"):
            entry.fields = None  # it reads nothing protected
            return
        merged = with_reads_of(fields, sources, lambda k: k != "_optional")
        # the rows prove a table's subjects where every statement that reads it proves so
        proven = [
            t
            for t in _names(merged.get("tables"))
            if all(t not in _names(f.get("tables")) or t in _proven(f) for f in (fields, *sources))
        ]
        merged["_row_subjects"] = tuple(proven)
        entry.fields = merged

    def _rebuild(self) -> None:
        """The answers departed from the prediction: predict again from what they proved,
        and mark what was sent against names that now read otherwise."""
        names = self._confirmed.copy()
        names.skipping = False
        fifo = self._fifo
        for i in range(len(fifo)):
            entry = fifo[i]
            if entry is _SYNC:
                self._predict_end(names, _SYNC_PROBE)
                if _SYNC_PROBE.expect != "I":
                    _own_sync(fifo, i).expect = _SYNC_PROBE.expect
                continue
            self._replay(names, entry)
        self._predicted = names

    def _replay(self, names: _Names, entry: _InFlight) -> None:
        kind = entry.kind
        if kind == "query":
            self._predict_query(names, entry, entry.done, replay=True)
        elif kind == "sync":
            self._predict_end(names, entry)
        elif kind == "call":
            entry.skipped = names.skipping
            if entry.skipped:
                entry.expect = ""
            else:
                self._predict_end(names, entry)
        elif kind == "parse":
            self._predict_parse(names, entry)
        elif kind == "bind":
            if entry.obj is None:  # a Bind pgveil refused: it fails
                names.fail()
                names.skipping = True
                return
            statement = names.statements.get(entry.statement_name)
            if statement is not entry.resolved:
                # sent against another statement: its own errors keep nothing (`cause`);
                # the portal it makes is this statement's, as far as the answers so far
                # tell (they are checked as they come)
                entry.uncertain = True
                entry.resolved = statement
                entry.obj = self._new_portal(statement, entry.bind or b"")
                entry.source = None
                self._predict_bind(names, entry)
                if not entry.skipped and entry.fail_at == -1:
                    self._rechecked(statement)  # it binds this one after all
                return
            self._predict_bind(names, entry)
        elif kind == "describe":
            self._predict_describe(names, entry, replay=True)
        elif kind == "execute":
            self._predict_execute(names, entry, replay=True)
        elif kind == "close":
            self._predict_close(names, entry)

    # ---- backend -----------------------------------------------------------------------

    def cause(self, typ: int = _ERROR_RESPONSE) -> Cause | None:
        """The statement that an ErrorResponse or NoticeResponse (`typ`) arriving now
        belongs to, as the server pairs them (to be asked before the message goes to
        `server_message`): the statement of a Query that the server is at, a Parse's
        statement, the statement behind a Bind's, Describe's or Execute's portal with that
        Bind's body. None when nothing sent is being answered (an asynchronous notice), when
        what is answered is no statement (a Sync committing, a Close, a FunctionCall), and
        when it cannot be told for sure."""
        fifo = self._fifo
        if typ == _ERROR_RESPONSE and self._eatable and fifo and fifo[0].kind == "sync":
            self._settle()
        if not fifo or self.lost is not None:
            return None
        head = fifo[0]
        if head.source is None or head.uncertain:
            return None
        return Cause(head.source, head.done, head.bind)

    def server_message(self, typ: int, body: bytes) -> None:
        if typ == _PARAMETER_STATUS:
            if self.reading is not None:
                self.reading.reported(*async_.parameter_status(body))
            return
        fifo = self._fifo
        if not fifo:
            if typ in _ANSWERS:
                self._desync("the server answered with nothing in flight")
            return
        head = fifo[0]
        if head.kind == "sync" and typ != _READY_FOR_QUERY and typ != _DATA_ROW:
            if typ == _ERROR_RESPONSE and not self._eatable:
                pass  # the Sync's own: its commit failed
            elif typ in _ANSWERS or typ == _ERROR_RESPONSE:
                settled = self._settle()
                if settled is None:
                    return
                head = settled
        if typ == _DATA_ROW:
            self.data_row(body)
        elif typ == _PARSE_COMPLETE:
            if head.kind == "parse":
                fifo.popleft()
                self._confirmed.statements[head.name] = head.obj
                if head.skipped or head.fail_at == 0:
                    self._rebuild()  # the prediction had it refused or skipped
        elif typ == _BIND_COMPLETE:
            if head.kind == "bind":
                fifo.popleft()
                # (a Bind predicted to fail for a statement pgveil does not know has an
                # unknown portal)
                portal = head.obj if head.obj is not None else self._unknown_portal()
                names = self._confirmed
                if names.held or names.hold or names.maybe or names.savepoints:
                    names.add_portal(head.name, portal)
                else:
                    names.portals[head.name] = portal
                if head.skipped or head.fail_at == 0:
                    self._rebuild()
        elif typ == _READY_FOR_QUERY:
            self._ready(simple.tx_status(body))
        elif typ == m.CLOSE_COMPLETE:
            if head.kind == "close":
                self._close_complete(fifo.popleft())
        elif typ == m.COPY_IN_RESPONSE:
            if head.kind in ("query", "execute"):
                self._copy_in(head)
            else:
                self._desync("a CopyInResponse that answers no statement")
        elif typ == _COMMAND_COMPLETE or typ == m.EMPTY_QUERY_RESPONSE:
            # one per statement of a Query (the server's EndCommand for each raw statement)
            index = head.done
            head.done += 1
            head.sent = 0  # (counted by the tag)
            if head.fields is not None:  # counted and read for its event only
                head.rows += rows.row_count(body) if typ == _COMMAND_COMPLETE else 0
                if head.raw:
                    _decode_keys(head, self.encoding)
                head.layout = ()
            if (
                head.ops
                or head.unknown
                or head.skipped
                or head.fail_at == index
                or head is self._copy_head
            ):
                tag = rows.command_tag(body) if typ == _COMMAND_COMPLETE else b""
                self._completed(head, index, tag)
            if head.kind == "execute":
                self._finish(fifo.popleft())
                if self._eatable and head.copies:
                    self._swallowed(None)
            elif typ == m.EMPTY_QUERY_RESPONSE and head.kind == "query":
                head.empty = True  # predicted to replace the unnamed portal: it does not
                self._rebuild()
        elif typ == m.PORTAL_SUSPENDED:
            if head.kind == "execute":
                # no count in the message: the DataRows it sent
                head.rows, head.sent = head.sent, 0
                if head.skipped or head.fail_at == 0:
                    head.uncertain = True  # a portal pgveil did not know ran
                    self._rebuild()
                self._finish(fifo.popleft())
        elif typ == _ROW_DESCRIPTION:
            if head.kind != "describe" and (head.skipped or head.fail_at == head.done):
                self._ran(head)
            if head.kind == "describe":
                self._described(fifo.popleft(), body)
            elif head.kind in ("query", "execute") and head.fields is not None:
                if head.raw:
                    _decode_keys(head, self.encoding)
                self._set_layout(head, self._layout(body, None))
                self._keyed(head)
                self._want_rows(head, bool(head.layout))
        elif typ == m.NO_DATA:
            if head.kind == "describe":
                self._described(fifo.popleft(), None)
        elif typ == m.PARAMETER_DESCRIPTION:
            # a statement's Describe: its parameter types as the server resolved them
            target = head.target if head.kind == "describe" else None
            if isinstance(target, _Prepared):
                target.param_types = extended.parameter_types(body)
                if target.source is not None:
                    target.source.types = target.param_types
        elif typ == _ERROR_RESPONSE:
            self._error(head, body)
        elif (
            typ == m.NOTICE_RESPONSE
            and head.kind in ("query", "execute", "call")
            and not head.values
        ):
            # a notice or warning of the statement running (a RAISE NOTICE, say)
            fields = errors.decode_fields(body)
            head.values = _carries_values(fields, notice=True) and not _skipping(head, fields)

    @staticmethod
    def _ran(head: _InFlight) -> None:
        """Rows of a statement predicted not to run (a FETCH or Execute of a name pgveil
        does not know): what it reads cannot be told; its `running` event says so before
        the rows go out (the prediction is rebuilt when it completes)."""
        if head.kind in ("query", "execute"):
            head.uncertain = True

    def _close_complete(self, entry: _InFlight) -> None:
        name = entry.name[1:]
        if entry.name[0] == _STATEMENT:
            self._confirmed.statements.pop(name, None)
        else:
            self._confirmed.drop_portal(name)
        if entry.skipped:
            self._rebuild()

    def _completed(self, head: _InFlight, index: int, tag: bytes) -> None:
        """A statement of the head completed: what it did to names is confirmed."""
        # a statement predicted to fail (a FETCH of no cursor pgveil knows, a name in use)
        # ran: what it read cannot be told
        uncertain = head.skipped or head.fail_at == index
        rebuild = uncertain
        if head.unknown:
            self._confirmed.all_unknown()
        ops = head.ops
        committed = False
        if ops:
            names = self._confirmed
            for position in range(len(ops)):
                op = ops[position]
                if op[0] != index:
                    continue
                self._apply(names, head, position, tag, False)
                if tag == b"ROLLBACK" and op[1] in _EXITS:
                    rebuild = True  # a COMMIT that rolled back: predicted as one may not be
                elif op[1] in _COMMITS:
                    committed = True
        if uncertain:
            head.uncertain = True
        if committed and head.kind == "query":
            self._split(head, index)
        if rebuild:
            self._rebuild()
        if head is self._copy_head:
            self._copy_head = None
            head.copies += 1
            if head.kind == "query":
                self._swallowed(head)

    def _split(self, head: _InFlight, last: int) -> None:
        """Statement `last` of a Query committed (or prepared) its transaction and more
        statements follow: what the Query did up to it stays done whatever the rest does,
        so it is recorded now on its own, outcome ok (`statements`: which ones); the
        Query's event records the rest."""
        fields = head.fields
        kinds = fields.get("kinds") if fields is not None else None
        if not isinstance(kinds, list) or last + 1 >= len(kinds):
            return  # the last statement: the Query's own event says it
        part = copy.copy(head)
        part.outcome = "ok"
        part.last = last
        part.wants_rows = False  # (the Query still counts in rows_in_flight)
        self._finish(part)
        head.first = last + 1
        head.rows = head.sent = head.data_rows = 0
        head.subjects = head.keyed = None
        head.undecodable = head.values = False

    def abandon(self, reason: str) -> None:
        """The session ended (`reason`) with statements in flight: pgveil will not see
        their answers. Each is recorded with outcome `unknown` (it may have run, and a
        write may have committed: the server finishes a statement it is running, and
        commits it outside a transaction block), or with the error it got before the end
        (a FATAL that ended it)."""
        fifo, self._fifo = self._fifo, deque()
        for entry in fifo:
            if entry is _SYNC or entry.kind not in ("query", "execute", "call"):
                continue
            if entry.outcome == "ok":
                entry.outcome = "unknown"
            entry.ended = reason
            self._finish(entry)
        self.rows_in_flight = 0
        self._copy_head = None

    def _ready(self, status: int) -> None:
        """ReadyForQuery: the request it ends (up to its Sync, Query or FunctionCall) is
        answered."""
        self._answered(status)
        if self.reading is not None and self.lost is None:
            self._reported(status)

    def _answered(self, status: int) -> None:
        fifo = self._fifo
        if self._skip_ambiguous:
            self._skip_ambiguous = False
            if self._skip_unprovable():
                return
        terminator = None
        while fifo:
            entry = fifo.popleft()
            kind = entry.kind
            if kind == "sync":
                terminator = entry
                break
            if entry is self._copy_head:
                self._copy_head = None
            if entry.after is not None:
                self._unforeseen(entry)
            if kind == "query" or kind == "execute" or kind == "call":
                self._finish(entry)
                if kind != "execute":
                    terminator = entry
                    break
        if terminator is None:
            self._desync("a ReadyForQuery that answers nothing sent")
            return
        if self._eatable and (not fifo or fifo[0].kind != "sync"):
            self._eatable = 0  # every Sync of the run had its answer
        names = self._confirmed
        if terminator.kind == "query":
            if names.statements:
                names.statements.pop(b"", None)
            if b"" in names.portals and not terminator.empty:
                if terminator.outcome != "ok" and terminator.done == 0:
                    # failed before its first statement began (the old unnamed portal
                    # stays), or in it (it replaced it)
                    names.maybe.add(b"")
                else:
                    names.drop_portal(b"")
            if terminator.unknown:
                names.all_unknown()
        if status == _IDLE:
            # the transaction ended, if one was open: committed unless it failed
            if names.tx != "I" or names.failed or names.savepoints:
                names.end(None if names.tx == "T" else names.tx != "E" and not names.failed)
            elif names.portals:
                if names.held or names.hold or names.maybe or names.depth:
                    names.end(True)
                else:
                    names.portals = {}  # the common case
            if terminator.expect != "I":
                self._rebuild()
            return
        state = chr(status)
        names.tx = state
        names.failed = False
        if state != terminator.expect:
            self._rebuild()

    def _reported(self, status: int) -> None:
        """After a ReadyForQuery: what the server reported (ParameterStatus comes before it)
        is what the next request begins under. The Queries and Parses of that request whose
        text depends on a setting predicted otherwise were misread. When the client's
        current request is the next one, the prediction starts again from the report."""
        tracker = self.reading
        assert tracker is not None
        in_flight = False
        if self._unverified:
            server = tracker.server
            for entry in self._fifo:
                if entry.sensitive:
                    self._unverified -= 1
                    assert entry.base is not None
                    if entry.base.differs(server, entry.sensitive):
                        self._misread(entry)
                    entry.sensitive = 0
                if entry.kind == "sync" or entry.kind == "query" or entry.kind == "call":
                    in_flight = True
                    break
            else:
                self._unverified = 0  # (every entry in flight was looked at)
        elif self._fifo:  # (the common case: nothing more in flight)
            in_flight = any(e.kind in _REQUESTS for e in self._fifo)
        if not in_flight:
            tracker.confirm(status)

    def _unforeseen(self, entry: _InFlight) -> None:
        """A Query whose text depends on a setting ends: if the server reports a value the
        prediction did not foresee, what changed it (code, or a reload of the server's
        configuration) may have changed it before the Query was read."""
        assert entry.after is not None and self.reading is not None
        predicted, sensitive = entry.after
        if predicted.differs(self.reading.server, sensitive):
            entry.uncertain = True
            entry.unknown = True

    def _misread(self, entry: _InFlight) -> None:
        """A Query or Parse was read under what the server did not have: what it reads, and
        what it does to names, cannot be told; nor what a portal of its statement runs."""
        if entry.kind == "query":
            entry.uncertain = True
            entry.unknown = True
        elif entry.kind == "parse" and isinstance(entry.obj, _Prepared):
            statement = entry.obj
            names_things = statement.effects != ()
            statement.uncertain = True
            statement.effects = None
            portals = [
                *self._confirmed.portals.values(),
                *self._predicted.portals.values(),
                *(e.obj for e in self._fifo if e.kind == "bind"),
            ]
            for portal in portals:
                if isinstance(portal, _Portal) and portal.statement is statement:
                    portal.uncertain = True
            for e in self._fifo:
                target = e.resolved
                if e.kind == "bind" and target is statement:
                    e.uncertain = True
                elif (
                    e.kind == "execute"
                    and isinstance(target, _Portal)
                    and target.statement is statement
                ):
                    e.uncertain = True
                    e.unknown = e.unknown or names_things
        self._rebuild()

    def _copy_in(self, head: _InFlight) -> None:
        """CopyInResponse: the server reads copy data for the head now. The Syncs the
        client sent right behind it before ending this copy arrive during it."""
        self._copy_head = head
        ends = head.copy_ends + head.copies
        fifo = self._fifo
        for i in range(1, len(fifo)):
            entry = fifo[i]
            if entry.kind != "sync" or entry.copy_ends != ends:
                break
            if not entry.provisional:
                _own_sync(fifo, i).provisional = True
                self._eatable += 1

    def _swallowed(self, head: _InFlight | None) -> None:
        """The copy completed: it read the client's CopyDone, and every Sync sent during it
        was swallowed. They are right behind `head` (a Query), or at the head of the queue
        (an Execute, already answered)."""
        fifo = self._fifo
        at = 1 if head is not None else 0
        removed = 0
        while len(fifo) > at and fifo[at].provisional:
            del fifo[at]
            removed += 1
        if removed:
            self._eatable = max(self._eatable - removed, 0)
            self._regrouped()
            self._rebuild()  # predicted as Syncs that end a transaction

    def _settle(self) -> _InFlight | None:
        """A request's answer arrived while Syncs are at the head of the queue: a Sync's
        only answer is ReadyForQuery, so the server swallowed them (a copy read them)."""
        fifo = self._fifo
        run = 0
        for entry in fifo:
            if entry.kind != "sync":
                break
            run += 1
        if run > self._eatable or run == len(fifo):
            self._desync("an answer where only ReadyForQuery could come")
            return None
        for _ in range(run):
            fifo.popleft()
        self._eatable = 0
        self._regrouped()
        self._rebuild()
        return fifo[0]

    def _skip_unprovable(self) -> bool:
        """After an extended-protocol COPY failed, the server skips to the first Sync it
        reads outside the copy: one the copy did not swallow, or the first after the
        client's CopyDone. If messages other than Syncs stand between the two and a Sync
        follows them, no answer can tell whether the server skipped them."""
        fifo = self._fifo
        i = 0
        while i < len(fifo) and fifo[i].kind == "sync" and fifo[i].provisional:
            i += 1
        if i == 0 or i == len(fifo) or fifo[i].kind == "sync":
            return False
        if any(entry.kind == "sync" for entry in list(fifo)[i:]):
            self._desync(
                "a COPY failed with Syncs sent during it and other messages after them: "
                "which of them the server skipped cannot be told"
            )
            return True
        return False

    def _regrouped(self) -> None:
        """Syncs the server swallowed (a copy read them): the requests are not what the
        readings waiting for a report were predicted in; none of them can be checked."""
        if not self._unverified:
            return
        for entry in self._fifo:
            if entry.sensitive:
                entry.sensitive = 0
                self._misread(entry)
        self._unverified = 0

    def _desync(self, reason: str) -> None:
        """The answers cannot be paired with what was sent any more: from now on nothing
        is attributed (every statement uncertain, every name unknown)."""
        if self.lost is None:
            self.lost = reason
        for entry in self._fifo:
            if entry is not _SYNC:
                entry.uncertain = True
                entry.sensitive = 0
        self._unverified = 0
        self._confirmed.all_unknown()
        self._predicted.all_unknown()

    def rows_to(self, total: int) -> None:
        """The server has sent `total` DataRows and CopyData so far, captured or not (the
        engine tells before each captured message, and at the end of each read): those
        since the last call are the statement's at the head, where they counted before
        the answers moved on (only the statement at the head sends rows)."""
        sent = total - self.rows_total
        if sent:
            self.rows_total = total
            for entry in self._fifo:
                if entry.kind != "sync":  # (Syncs a COPY swallowed send nothing)
                    entry.sent += sent
                    break

    def data_row(self, body: bytes) -> None:
        """One DataRow of the statement at the head: counted, and its subject keys read."""
        self.data_rows((body,))

    def data_rows(self, bodies: Sequence[bytes]) -> None:
        """DataRows of the statement at the head, in order: counted, and the raw bytes of
        their subject keys kept (decoded once per distinct key, when the result ends)."""
        fifo = self._fifo
        if not fifo:
            self._desync("the server answered with nothing in flight")
            return
        head = fifo[0]
        if head.kind == "sync":
            settled = self._settle()
            if settled is None:
                return
            head = settled
        if head.skipped or head.fail_at == head.done:
            self._ran(head)
        head.data_rows += len(bodies)
        if head.portal is not None:
            self._resolve(head)
        if not head.layout:
            return
        collect = rows.collect_column
        for (index, _table, _type, _fmt), keys in zip(head.layout, head.raw, strict=True):
            if collect(bodies, index, keys):
                # a row without its key (an outer join, say) may still carry that table's
                # data from elsewhere: the subjects cannot be complete
                head.undecodable = True

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
        fields = self._fields_of(head)
        if fields is None or head.running or head.kind not in ("query", "execute"):
            return
        self._running += 1
        head.running = self._running
        event = dict(fields)
        event.pop("_subject_keys", None)
        event.pop("_row_subjects", None)
        event["rows"] = None
        event["outcome"] = "running"
        event["duration_ms"] = round((self._clock() - head.started) / 1e6, 3)
        event["subjects_complete"] = False
        event["running"] = head.running
        self._emit(event)

    def _fields_of(self, entry: _InFlight) -> dict[str, object] | None:
        """What the entry's event says of the statement: its fields, or when what it ran
        cannot be told for sure, only what is certain (no tables: any may have been
        read)."""
        fields = entry.fields
        if not (entry.uncertain or self.lost is not None):
            return fields
        if fields is None:
            if entry.kind not in ("query", "execute", "call"):
                return None
            fields = _unknown_fields(entry.kind)
        uncertain = {k: v for k, v in fields.items() if not k.startswith("_")}
        uncertain["tables"] = []
        uncertain["analysis_complete"] = False
        # (its kinds are pgveil's reading, which may not be what the server ran)
        uncertain["uncertain"] = NOT_READ
        return uncertain

    def _error(self, head: _InFlight, body: bytes) -> None:
        fields = errors.decode_fields(body)
        code = fields.get("C") or "XX000"
        if (fields.get("V") or fields.get("S", "")) not in ("ERROR", "FATAL", "PANIC"):
            return
        values = _carries_values(fields)
        self._confirmed.fail()
        if code == "42P03" or code == "42P05":
            self._in_use(head, code == "42P03")
        if head is self._copy_head:
            # the copy ended before the client's CopyDone (or at its CopyFail): the Syncs
            # sent during it may have come before or after the error
            self._copy_head = None
            head.copies += 1
            if head.kind == "execute" and len(self._fifo) > 1 and self._fifo[1].provisional:
                self._skip_ambiguous = True
        if head.kind in ("query", "call"):
            head.outcome = code  # finished at ReadyForQuery
            head.values = head.values or values
            self._rebuild()
            return
        # extended protocol: the server skips everything up to Sync; the first Execute in
        # that run is the one that failed (or never ran because an earlier message failed)
        fifo = self._fifo
        names = self._confirmed
        if head.kind == "parse" and not head.name and not head.skipped:
            names.statements.pop(b"", None)  # dropped before the new one failed
        elif head.kind == "bind" and not head.name and not head.skipped and b"" in names.portals:
            names.maybe.add(b"")  # the old one stays unless the new one replaced it
        failed = False
        while fifo and fifo[0].kind != "sync":
            entry = fifo.popleft()
            if entry.kind == "execute" and not failed:
                entry.outcome = code
                entry.values = entry.values or values
                self._finish(entry)
                failed = True
            else:
                self.rows_in_flight -= entry.wants_rows
        self._rebuild()

    def _in_use(self, head: _InFlight, portal: bool) -> None:
        """The server refused to define a name in use (42P03: a portal or cursor, 42P05: a
        prepared statement): it has that name. Where the answers so far did not prove it,
        it holds something pgveil cannot tell (what the prediction missed: server-side
        code, say)."""
        kind = head.kind
        if kind == "bind" or kind == "parse":
            taken = [head.name] if (kind == "bind") == portal else []
        elif kind == "query" or kind == "execute":
            index = head.done if kind == "query" else 0
            kinds = ("declare", "declare_hold") if portal else ("prepare",)
            taken = [name for i, k, name, _obj in head.ops if i == index and k in kinds]
        else:
            return
        names = self._confirmed
        for name in taken:
            if not name:
                continue  # (the unnamed statement and portal are replaced, never in use)
            if portal and name not in names.portals:
                names.add_portal(name, self._unknown_portal())
            elif not portal and name not in names.statements:
                names.statements[name] = _unknown_statement(self._holder.context)

    def _unknown_portal(self) -> _Portal:
        """A portal the server has that the log did not see made: unchecked, as names the
        log does not hold, until the context is replaced."""
        return _unknown_portal(self._holder.context)

    def _finish(self, entry: _InFlight) -> None:
        entry.finished = True
        uncertain = entry.uncertain or self.lost is not None
        fields = self._fields_of(entry) if uncertain else entry.fields
        if fields is None:
            return
        self.rows_in_flight -= entry.wants_rows
        if entry.raw:
            _decode_keys(entry, self.encoding)
        event = dict(fields)
        named = event.pop("_subject_keys", ())
        assert isinstance(named, tuple)
        row_subjects = event.pop("_row_subjects", ())
        assert isinstance(row_subjects, tuple)
        # a statement that failed: the rows it sent before the error count too
        entry.rows += entry.sent
        entry.sent = 0
        if entry.portal is not None:
            self._resolve(entry)
        # the rows tell a table's subjects exactly when every result set carried its key
        # and the statement's shape proves that the key says whose values a row holds
        covered = set(entry.keyed or ()).intersection(row_subjects)
        if (entry.outcome == "ok" or entry.outcome == "unknown") and not uncertain:
            for n in named:
                assert isinstance(n, NamedKeys)
                if n.table in covered:
                    continue  # the rows returned say it exactly
                if n.unknown_as:
                    keys = (entry.params or _NO_KEYS).get(n.table)  # bound parameters
                else:
                    keys = frozenset(k for k in n.keys if isinstance(k, str))
                if keys is not None:
                    if n.complete:  # (through a view: named, not proved all)
                        covered.add(n.table)
                    if entry.rows or entry.outcome == "unknown":
                        if entry.subjects is None:
                            entry.subjects = {}
                        entry.subjects.setdefault(n.table, set()).update(keys)
        event["rows"] = entry.rows if entry.rows >= 0 else None  # None: not known
        event["outcome"] = entry.outcome
        event["duration_ms"] = round((self._clock() - entry.started) / 1e6, 3)
        if entry.subjects and not uncertain:
            event["subjects"] = {
                t: sorted(keys)[: self._limit] for t, keys in entry.subjects.items()
            }
            event["subjects_total"] = {t: len(keys) for t, keys in entry.subjects.items()}
        # subjects are known only as far as the analysis went
        event["subjects_complete"] = (
            not uncertain
            and not entry.undecodable
            and event.get("analysis_complete") is not False
            and _covers(entry, covered)
        )
        if entry.running:
            event["running"] = entry.running
        if entry.values:
            event["values_in_messages"] = True
        if entry.outcome == "unknown":
            event["rows"] = None  # (what it did is not known)
            event["reason"] = entry.ended
            if _may_write(event):
                event["may_have_committed"] = True
        elif entry.outcome != "ok" and not _CODE.isdisjoint(_names(event.get("kinds"))):
            event["may_have_committed"] = True
        if entry.last >= 0 or entry.first:
            last = entry.last if entry.last >= 0 else len(_names(event.get("kinds"))) - 1
            event["statements"] = [entry.first + 1, last + 1]
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
        entry.raw = tuple([set() for _ in layout])

    @staticmethod
    def _keyed(entry: _InFlight) -> None:
        tables = {table for _i, table, _t, _f in entry.layout}
        entry.keyed = tables if entry.keyed is None else entry.keyed & tables

    def _described(self, entry: _InFlight, body: bytes | None) -> None:
        """A Describe's RowDescription (None: NoData)."""
        if entry.skipped or entry.fail_at == 0:
            self._rebuild()  # predicted to fail, or to be skipped: it was not
            return
        if body is None:
            return
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
        found: list[SubjectColumn] = []
        for i, (table_oid, attnum, type_oid, fmt) in enumerate(rows.column_sources(body)):
            if not table_oid:
                continue
            if formats is not None:
                fmt = _format_of(formats, i)
            shown = pmap.view_keys.get(table_oid)
            if shown is not None:
                # a view's column that shows the keys of tables behind it (rules.views)
                view_type = OID_TYPES.get(type_oid)
                if view_type is not None:
                    for table in shown.get(attnum, ()):
                        found.append((i, table, view_type, fmt))
            p = pmap.by_oid.get(table_oid)
            if p is None or p.subject is None:
                continue
            for c in p.relation.columns:
                if c.attnum == attnum and c.name == p.subject:
                    # (a domain's OID is not its base type's: the catalog says that)
                    typ = OID_TYPES.get(type_oid) or c.type.name
                    found.append((i, p.rule_table, typ, fmt))
        return tuple(found)


def with_reads_of(
    fields: dict[str, object], sources: list[dict[str, object]], keep: Callable[[str], bool]
) -> dict[str, object]:
    """A statement's audit fields (those whose keys `keep` keeps) with the tables, columns
    and views of what its EXECUTE / FETCH run (`sources`: their fields) added."""
    merged = {k: v for k, v in fields.items() if keep(k)}
    for key in ("tables", "columns_masked", "columns_raw", "columns_denied"):
        names = set(_names(fields.get(key)))
        for source in sources:
            names.update(_names(source.get(key)))
        if key in fields or names:
            merged[key] = sorted(names)
    views: dict[object, object] = {}
    for read in (fields, *sources):
        found = read.get("views")
        if isinstance(found, dict):
            views.update(found)
    if views:
        merged["views"] = views
    return merged


def _unknown_fields(kind: str) -> dict[str, object]:
    """The audit fields of a statement pgveil cannot tell: it may have read any table."""
    return {
        "kinds": [kind],
        "statement": _UNKNOWN_TEXT,
        "fingerprint": fingerprint(_UNKNOWN_TEXT),
        "tables": [],
        "columns_masked": [],
        "decision": "passed",
        "analysis_complete": False,
        "uncertain": NOT_READ,
    }


# what `named`, `statement_fields` and `portal_fields` give for a name whose statement
# cannot be told: it may read anything (refused while the audit stream is down)
_UNCERTAIN_FIELDS: dict[str, object] = _unknown_fields("unknown")


def _names(value: object) -> list[str]:
    return [str(v) for v in value] if isinstance(value, list) else []


def _decode_keys(entry: _InFlight, encoding: str) -> None:
    """The subject keys of the result set that ends, decoded from the raw bytes kept, each
    in its type's canonical form (rules/keys.py)."""
    for (_index, table, typ, fmt), raws in zip(entry.layout, entry.raw, strict=True):
        if not raws:
            continue
        if entry.subjects is None:
            entry.subjects = {}
        keys = entry.subjects.setdefault(table, set())
        if fmt == 0 and typ not in _TEXT_NORMALISED:
            # text read as it is: one decode for all (no text value holds a NUL byte)
            try:
                keys.update(b"\0".join(raws).decode(encoding).split("\0"))
                continue
            except (UnicodeDecodeError, LookupError):
                pass  # one at a time: those that cannot be read make the subjects unsure
        for raw in raws:
            key = row_key(typ, raw, fmt, encoding)
            if key is None:
                entry.undecodable = True
            else:
                keys.add(key)
    entry.raw = ()


# key types whose text form row_key rewrites (numeric to its canonical number, bpchar without
# its padding): every other type's text is its key as it is
_TEXT_NORMALISED = frozenset(("numeric", "bpchar"))

_PROOFS = ("_subject_keys", "_row_subjects")  # a statement's own: never in an event


def _proven(fields: dict[str, object]) -> tuple[str, ...]:
    """The tables whose subjects the rows of the statement with these fields prove."""
    found = fields.get("_row_subjects", ())
    assert isinstance(found, tuple)
    return found


def _covers(entry: _InFlight, covered: set[str]) -> bool:
    """Subjects are complete when the rows returned carry every protected table's subject
    column or the statement names its subjects, or nothing was touched. An error or notice
    that may carry values names no subject: then they are not."""
    assert entry.fields is not None
    if entry.values:
        return False
    if (
        not entry.running
        and entry.outcome != "unknown"
        and entry.rows == 0
        and entry.data_rows == 0
    ):
        return True  # nothing reached the client, nothing was changed
    tables = entry.fields.get("tables", [])
    assert isinstance(tables, list)
    return covered.issuperset(tables)


def _format_of(formats: list[int], i: int) -> int:
    if not formats:
        return 0
    return formats[0] if len(formats) == 1 else (formats[i] if i < len(formats) else 0)


_MAINTENANCE = frozenset(("vacuum", "analyze"))


def _skipping(head: _InFlight, fields: dict[str, str]) -> bool:
    """A plain WARNING (01000) of VACUUM or ANALYZE with no detail, context or internal
    query: the server's own `skipping "t" --- only table or database owner can vacuum it`
    and its like, which name a relation. Code the table runs (an index expression's
    function) would raise with a CONTEXT."""
    kinds = head.fields.get("kinds") if head.fields is not None else None
    return (
        isinstance(kinds, list)
        and bool(kinds)
        and all(k in _MAINTENANCE for k in kinds)
        and fields.get("C") == "01000"
        and not ("D" in fields or "W" in fields or "q" in fields or "P" in fields)
    )


def _carries_values(fields: dict[str, str], notice: bool = False) -> bool:
    """Whether an ErrorResponse or NoticeResponse (`notice`) may carry values the statement
    read. Yes when it has a DETAIL (a key, a failing row), a CONTEXT or an internal query
    (raised inside server-side code, which may compose its text of anything); no when it
    has a position in the statement (raised while the server parsed the statement's own
    text, before it read anything) or a fixed text; yes otherwise: a value turns up in
    errors of most classes (`invalid input syntax ...: "<value>"`, `relation "<value>"
    does not exist`, `unrecognized configuration parameter "<value>"`). A notice of
    successful completion without those fields is a utility command's (`... does not
    exist, skipping`). The fields are looked at here only; nothing of them is kept."""
    if "D" in fields or "W" in fields or "q" in fields:
        return True
    if "P" in fields:
        return False
    code = fields.get("C", "")
    return code not in _FIXED_TEXT and not (notice and code == "00000")


def _may_write(event: dict[str, object]) -> bool:
    """Whether a statement may have changed the database: not known to be a read only (its
    kinds, and no INSERT, UPDATE, DELETE or MERGE in its text: a data-modifying WITH, EXPLAIN
    ANALYZE of a write), or not analysed at all. A read through a function that writes is
    not told."""
    if event.get("analysis_complete") is False:
        return True
    text = str(event.get("statement", ""))
    for kind in _names(event.get("kinds")):
        if kind == "copy":
            if not _COPY_OUT.search(text):
                return True  # COPY FROM
        elif kind not in _READS:
            return True
    return _WRITE_WORD.search(text) is not None
