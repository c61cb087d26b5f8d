"""The masked-session filter: what changes on the wire for a masked role.

Client -> server: every Query and Parse is analysed and forwarded as is, rewritten, or
replaced by a statement that fails with a syntax error whose unique token pgveil recognises
in the answer and turns into its own 42501 refusal. Going through the server keeps the
order of pipelined answers and the transaction state exactly as PostgreSQL's own error
would. FunctionCall is refused the same way. Nothing is forwarded before the whole message
has been analysed.

A text pgveil's parser cannot read (a syntax error) is answered with the server's own
error, from a syntax probe: the server gets `SELECT pgveil_refusal_<nonce>;` followed by the
client's text, which can never run. The server parses the whole text of a Query or Parse
before it analyses or runs anything of it, so where its parser fails too, its syntax error
(message, hint, position) is what the client's text alone would have got, with the position
moved back by the probe's length. Where the server's parser accepts what pgveil's cannot (a
grammar of another PostgreSQL version), nothing runs either: a Query's first statement fails
at analysis (no FROM, so the nonce's column cannot exist), and a statement of a Query is
analysed and run only after those before it ran; a Parse of more than one statement is
refused before any analysis. That answer is turned into pgveil's 42501 refusal.

Server -> client: ErrorResponse and NoticeResponse lose detail, context and internal-query
fields, and a quoted value in the message or hint is masked unless the statement that caused
the message spelled it out (a literal's value or a parameter value of that very statement,
paired as the server pairs them: proxy/session/statements.py) or it is a name;
NotificationResponses are masked per the rules or withheld (and, on a channel with rules,
recorded when audited); a RowDescription that still
points at a raw personal column (the rewrite missed something) ends the session; a change of
session_authorization, client_encoding or standard_conforming_strings ends it too. DataRows
are never decoded: the database already computed them on masked values.

No I/O and no logging here; nothing from a statement or a row leaves this module except
towards the client.
"""

from __future__ import annotations

import dataclasses
import functools
import re
import secrets
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import pglast

from audit import kinds as audit_kinds
from audit.redaction import fingerprint as audit_fingerprint
from audit.redaction import redact
from proxy.session.reading import ReadingTracker, sensitivity, statement_text
from proxy.session.statements import (
    Cause,
    Decided,
    Named,
    Source,
    StatementLog,
    audit_fields,
    with_reads_of,
)
from proxy.wire import async_, errors, extended, rows, simple
from proxy.wire import messages as m
from proxy.wire.framing import MessageScanner, whole_messages
from proxy.wire.splice import Pause, Splicer
from rules import prepare
from rules.context import ContextHolder, MaskingContext
from rules.decision import NOT_PARSED, Decision
from rules.denied import DENY_WRITE_MARKER
from rules.effects import Effects
from rules.literals import NO_WORDS, Words, statement_words
from rules.masks import ColumnType, py_mask
from rules.missing import COLUMN_OR_FUNCTION, created_here, missing_name
from rules.model import MaskSpec
from rules.settings import SettingOp
from rules.shapes import prepared_form

REFUSAL_TOKEN = "pgveil_refusal_"
# what precedes a text pgveil cannot parse when the server gets it (see the docstring)
_PROBE = "SELECT " + REFUSAL_TOKEN + "{};"
_PROBE_LENGTH = len(_PROBE.format("0" * 16))  # ASCII: characters and bytes alike
# the server's answer to a Parse whose probe it parses whole
_MULTIPLE_COMMANDS = "cannot insert multiple commands into a prepared statement"
_PARSER = f"PostgreSQL {pglast.parser.get_postgresql_version()[0]}"
PARSED_ONLY_BY_SERVER = (
    f"pgveil's parser ({_PARSER}'s) cannot read this statement, which the server's parser "
    "accepts; write it in a form both accept"
)
AUDIT_UNAVAILABLE = "the audit stream is unavailable; statements on personal data must wait for it"
RULES_CHANGED = (
    "the masking rules changed since this statement was prepared (or this cursor or portal "
    "was opened); prepare it again"
)
NOT_UTF8 = "the statement is not valid UTF-8"
UNTRACKED = "pgveil cannot tell what this statement runs; prepare it again"
# the guard's error (rules.writes): `invalid input syntax for type integer: "<marker> t.c"`,
# in the server's language (lc_messages): the quotes around the value may be others
_DENY_WRITE = re.compile(DENY_WRITE_MARKER + r" (\S+?)[\"'»«“”„]?$")
_DENY_WRITE_BYTES = DENY_WRITE_MARKER.encode()
_QUOTED = re.compile(r'"([^"]*)"|\'([^\']*)\'')
_TRAILING_VALUE = re.compile(r'^(.*?: )"(.*)"$', re.DOTALL)
_TEXT = ColumnType("text", "text")
_PARTIAL = MaskSpec("partial")
_KEEP_FIELDS = frozenset("SVCMHPsctdnFLR")
_SERVER_LOG = frozenset(("DEBUG", "DEBUG1", "DEBUG2", "DEBUG3", "DEBUG4", "DEBUG5", "LOG"))
_DATA_ROW = m.DATA_ROW
_COPY = m.COPY_DATA
_READY_FOR_QUERY = m.READY_FOR_QUERY
_ERROR_RESPONSE = m.ERROR_RESPONSE
_PARAMETER_STATUS = m.PARAMETER_STATUS
_TEMPLATES = 1000  # audit field templates kept per session
# server-side statements pgveil prepares for a masked session (see MaskedFilter: Prepared
# statements): their names begin so, and no client may name a statement so
PREPARED_PREFIX = "pgveil_prep_"
_PREPARED_PREFIX = PREPARED_PREFIX.encode()
PREPARED_PER_CONNECTION = 64  # at most; the least recently used is closed
RESERVED_NAME = f"statement names beginning with {PREPARED_PREFIX} are pgveil's"
# answers to pgveil's own messages of a prepared execution, which a Query does not get
_ABSORBED = frozenset((m.PARSE_COMPLETE, m.BIND_COMPLETE, m.CLOSE_COMPLETE, m.NO_DATA))
_IDLE_BODY = bytes((m.TX_IDLE,))  # ReadyForQuery's body outside a transaction block
# a prepared statement of pgveil's the server no longer takes: its result type changed
# (feature_not_supported: "cached plan must not change result type"), or it is gone
# (invalid_sql_statement_name: none of pgveil's statements is dropped unforeseen, but if one
# were, its Query is not lost for it); either is the server's answer to the Bind, before
# BindComplete: after it, the same SQLSTATE is the statement's own error
_OUTDATED = frozenset(("0A000", "26000"))
_NO_COPY_IN_FLIGHT = (m.COPY_DONE, m.COPY_FAIL)
# what the client may send and stay a simple-protocol client (anything else: the prepared
# executions stop for the session, see MaskedFilter._client_message)
_SIMPLE = frozenset((m.QUERY, m.TERMINATE, m.COPY_DATA, m.COPY_DONE, m.COPY_FAIL))
_NAMING_UNNAMED = frozenset((m.BIND, m.DESCRIBE, m.CLOSE))  # may name the unnamed statement
_CLOSE_UNNAMED = extended.close(b"S", b"")
_PARSE_COMPLETE = m.message(m.PARSE_COMPLETE, b"")
# statement kinds after which names and parameter types resolve as before (rules.analyzer);
# not writes: a trigger, a default, a CHECK or a rule (pg_settings') may call set_config,
# and a call of the built-in leaves no dependency a catalog read could list
_RESOLVES_ALIKE = frozenset(("select", "show"))
# set_config named in a statement's text, or any identifier written with Unicode escapes
# (U&"set\005fconfig" is set_config too): in a message's bytes, and in a decided text
_SET_CONFIG = re.compile(rb'set_config|u&"', re.IGNORECASE)
_SET_CONFIG_TEXT = re.compile(r'set_config|u&"', re.IGNORECASE)
_CLOSE_NONE = extended.close(b"S", _PREPARED_PREFIX)  # a name pgveil never gives a statement


@dataclass(slots=True, eq=False)
class _Execution:
    """A masked Query in flight as a prepared execution: the statement log's entry for the
    Query (its answers are this one's while it is the log's head), the prepared text (the
    key of `MaskedFilter._prepared`), the statement's name, whether this execution carries
    the Parse and whether its ParseComplete came, and where its parameters stand
    (rules.prepare.Prepared: to move an error's position)."""

    entry: object
    text: str
    name: bytes
    parse: bool
    tokens: tuple[tuple[int, int], ...]  # where its parameters stand (rules.prepare)
    lengths: tuple[int, ...]  # ... and the lengths of the literals they replace
    sql: str  # the rewritten text, sent as a Query if the prepared statement is outdated
    idle: bool  # sent outside a transaction block (an error there leaves nothing done)
    parsed: bool = False
    # its BindComplete came: the statement was taken and planned, so an error from then on
    # comes from running it (rows may have gone to the client), never from an outdated
    # statement (the server refuses one in Bind, before BindComplete)
    bound: bool = False
    held: bytes | None = None  # an outdated statement's error, held while it is re-sent


UNNAMED_DROPPED = (
    "the unnamed statement ran as one of pgveil's prepared statements, which DISCARD ALL or "
    "DEALLOCATE ALL dropped; its text is being given to the server again; parse it again"
)
_UNNAMED_BATCH = 16  # client messages kept, after a mapped Parse up to Sync, to send again
_TEXT_ONLY_KEPT = 256  # rewritten Parses found not to run as a kept statement, remembered
_ASYNC = frozenset((m.NOTICE_RESPONSE, m.NOTIFICATION_RESPONSE, m.PARAMETER_STATUS))


@dataclass(slots=True, eq=False)
class _Unnamed:
    """A client's Parse of the unnamed statement in flight that one of pgveil's prepared
    statements serves (see MaskedFilter: The unnamed statement): the statement log's entry
    for the Parse (its answers are this one's while it is the log's head), the key of
    `MaskedFilter._prepared` (the rewritten text and the declared parameter types) and the
    statement's name, how many CloseCompletes of pgveil's own Closes come first, and
    whether the client's unnamed statement is pgveil's (`mapped`: a Close of the server's
    unnamed statement answers as the Parse) or the text went as the client's own unnamed
    statement and pgveil's Parse of the same text follows it (the first time)."""

    entry: object
    key: tuple[str, bytes]
    name: bytes
    closes: int
    mapped: bool
    idle: bool  # sent outside a transaction block (an error there leaves nothing done)
    # the client's messages after the Parse up to its Sync, as the text path sends them
    # (None: too many to keep), to send again if pgveil's statement is outdated
    batch: list[bytes] | None = field(default_factory=list)
    first: object = None  # the log's entry of the Bind right after the Parse, if one
    synced: object = None  # ... of the Sync that ends the batch (None: not yet)
    parsed: bool = False  # the answer for the client's Parse came
    pc_held: bool = False  # ... and is held until the Bind right after it is answered
    held: bytes | None = None  # the server's refusal of pgveil's statement, while re-sent


@dataclass
class MaskedCounters:
    passed: int = 0
    rewritten: int = 0
    refused: int = 0
    notifications_withheld: int = 0
    notices_withheld: int = 0  # DEBUG and LOG notices: they echo pgveil's rewritten text
    exit_check_violations: int = 0
    refusal_reasons: list[str] = field(default_factory=list)
    # masked Queries sent as a statement prepared once per server connection (see
    # MaskedFilter: Prepared statements), and the Parses that prepared them
    prepared_executions: int = 0
    prepared_parses: int = 0


class SessionEnded(Exception):
    """The session must end with a FATAL 42501 carrying this message."""


class AuditHook(Protocol):
    """What the shell offers a filter for auditing."""

    @property
    def subjects_limit(self) -> int:
        """Data subjects listed per event (all are counted)."""
        ...

    def ready(self) -> bool:
        """False while statements on personal data must be refused: under `on_failure:
        block`, while the audit stream cannot take events."""
        ...

    def record(self, event_type: str, fields: dict[str, object]) -> bool:
        """Record one event; False when it could not be recorded."""
        ...


def _reads_of(d: Decision) -> tuple[object, ...]:
    """What an analysis says a statement reads, as far as its audit event tells."""
    return (
        d.action, d.kinds, d.tables, d.columns, d.relations, d.unknown_relations,
        d.subject_keys, d.row_subjects,
    )  # fmt: skip


class StatementFilter:
    """What masked and audited unmasked sessions share: both directions spliced message by
    message, refusals through the server (a unique syntax error turned into 42501 on its
    way back), and the statement log that turns completed statements into audit events."""

    def __init__(self, ctx: MaskingContext | ContextHolder) -> None:
        self._holder = ContextHolder.of(ctx)
        self.temp_relations: set[str] = set()  # created by this session (pg_temp)
        # the audit: views this session created (see Decision.defines) -> the protected
        # tables behind them, and whether what they read could not all be told
        self.session_views: dict[str, tuple[frozenset[str], bool]] = {}
        self._moving = False  # a statement that may move names, its transaction not ended
        # a statement that may move names ran in this session (code pgveil does not see
        # into, a DO block say, may have created temporary relations): from then on an
        # unqualified name that a temporary schema has may denote this session's own
        self._moved_here = False
        # prepared statements (SQL's PREPARE or the protocol's Parse: one namespace) whose
        # text may move names: each EXECUTE or Bind of one runs that code again, after
        # catalog reads that settled the first (kept until the session ends: a name
        # deallocated or replaced is at worst uncertain once more)
        self._moving_names: set[bytes] = set()
        # protocol statements whose text names relations: (the text, its analysis,
        # ContextHolder.moved_until when it was analysed). The server plans a
        # statement again when a relation it names changes, so a Bind after names may have
        # moved may run what the Parse's analysis does not say (see _moved_since_parse)
        self._parsed: dict[bytes, tuple[str, Decision, int]] = {}
        # unknown names this session asked the catalog to be read again for, and under
        # which context (asked once per name until the context is replaced)
        self._asked: set[str] = set()
        self._asked_under: object = None
        self.audit: AuditHook | None = None
        self.statements: StatementLog | None = None
        self.counters = MaskedCounters()
        self._refusals: dict[str, str] = {}
        # refusals answered with the server's error for a name that does not exist
        # (rules.missing) rather than pgveil's 42501: the error's fields, by nonce
        self._answers: dict[str, dict[str, str]] = {}
        self._answer: dict[str, str] | None = None  # ... for the statement being decided
        # the nonce of the syntax probe the statement being decided is sent as (see the
        # module docstring), None when it is sent otherwise
        self._probing: str | None = None
        # audit fields per statement shape (analysis, action): see _decide
        self._templates: dict[tuple[object, ...], dict[str, object]] = {}
        # what the statement being decided does to names (see StatementLog.query)
        self._effects: Effects | None = ()
        self._client = Splicer()
        self._server = Splicer()
        self.tx_status: int | None = None  # from the latest ReadyForQuery

    raw_columns = False  # whether the personal columns a statement returns reach it raw
    _skipping = False  # see MaskedFilter
    # whether each name's text and decision are kept, to re-check them when the context
    # is replaced (masked sessions: see MaskedFilter._runs_now)
    _tracks = False
    _observing = False  # the message is only looked at: it goes on unchanged
    _decision: Decision | None = None  # the analysis of the statement just decided
    # sees every ErrorResponse and ParameterStatus from the server (the engine's counters)
    observer: Callable[[int, bytes], None] | None = None

    def attach_audit(self, hook: AuditHook) -> None:
        self.audit = hook
        # completed statements go straight to the hook (one call per event on the hot path)
        emit = functools.partial(hook.record, "access")
        if self.statements is None:
            self.statements = StatementLog(self._holder, emit, hook.subjects_limit)
        else:
            self.statements.attach(emit, hook.subjects_limit)

    @property
    def ctx(self) -> MaskingContext:
        return self._holder.context

    @property
    def holding(self) -> bool:
        return bool(self._client.held or self._server.held or self._client.paused)

    # ---- client -> server --------------------------------------------------------------

    def client(self, scanner: MessageScanner, chunk: bytes) -> bytes:
        return self._client.splice(scanner, chunk, self._client_message, "from client")

    # ---- waiting for a catalog read -----------------------------------------------------
    # A masked session's statement that names a relation (or a `t.f` column or function)
    # the catalog read does not have is not decided at once when the shell can wait
    # (`waits`): the client's stream stops at it (nothing of it or after it goes on), the
    # shell waits for a catalog read that began after it arrived (`awaiting`, bounded in
    # time), and `resume` decides it under what that read found: a relation created since
    # the last read is then known and read as the rules say, and a name still unknown did
    # not exist: the client gets the server's error for it (rules.missing).

    waits = False  # whether the shell can wait for a catalog read (the engine's can)
    awaiting: int | None = None  # the catalog read the stream waits for (ContextHolder)
    _asked_wait: int | None = None  # ... not yet asked of the shell (see take_wait)
    _may_wait = False  # a client's Query or Parse is being decided
    _fresh = 0  # the read the message being decided waited for (0: none)

    def take_wait(self) -> int | None:
        """The catalog read to wait for, once, when the stream just stopped at a message."""
        read, self._asked_wait = self._asked_wait, None
        return read

    def resume(self, scanner: MessageScanner) -> bytes:
        """The wait ended (the read is in, or the time is up): decide the message the stream
        stopped at, and go on with what came after it."""
        read, self.awaiting = self.awaiting, None
        if read is None:
            return b""
        self._fresh = read
        try:
            return self._client.resume(scanner, self._client_message, "from client")
        finally:
            self._fresh = 0

    @property
    def holder(self) -> ContextHolder:
        return self._holder

    def _client_message(self, typ: int, body: bytes, raw: bytes) -> bytes:
        if typ == m.QUERY:
            return self._query(body, raw)
        if typ == m.PARSE:
            return self._parse(body, raw)
        # the statement a Bind binds, read once: only while some statement may need it
        bound = (
            extended.bind_names(body)[1]
            if typ == m.BIND and (self._moving_names or self._parsed)
            else None
        )
        if bound is not None and bound in self._moving_names:
            self._names_moving()  # it runs code that may move names again
        log = self.statements
        if typ == m.FUNCTION_CALL:
            return self._function_call(raw)
        if log is not None:
            if typ == m.BIND:
                if self._audit_down():
                    fields = log.statement_fields(extended.bind_names(body)[1])
                    if fields is not None:
                        # Bind to a statement name that cannot exist: the server's error
                        # carries the refusal token, the Execute after it is skipped; the
                        # portal name keeps what it held (the server fails the Bind first)
                        log.note_failing_bind()
                        token = self._refuse_unrecorded(fields)
                        return extended.bind_renamed(body, token)
                moved = bound is not None and self._moved_since_parse(bound)
                reason = log.bind(body, names_moved=moved)
                if reason is not None:
                    return self._refuse_prepared(typ, body, reason)
            elif typ == m.EXECUTE:
                if self._audit_down():
                    fields = log.portal_fields(extended.execute_portal(body))
                    if fields is not None:
                        refused = extended.execute_renamed(body, self._refuse_unrecorded(fields))
                        log.execute(refused)  # (a portal that cannot exist: it fails)
                        return m.message(m.EXECUTE, refused)
                reason = log.execute(body)
                if reason is not None:
                    return self._refuse_prepared(typ, body, reason)
            elif typ == m.SYNC:
                log.sync()
            elif typ == m.DESCRIBE:
                reason = log.describe(body)
                if reason is not None:
                    return self._refuse_prepared(typ, body, reason)
            elif typ == m.CLOSE:
                log.close(body)
            elif typ == m.COPY_DONE or typ == m.COPY_FAIL:
                log.copy_end()
        return raw

    def _function_call(self, raw: bytes) -> bytes:
        if self.statements is not None:
            self.statements.function_call()
        return raw

    def _audit_down(self) -> bool:
        """Whether statements on personal data must be refused now (the audit stream
        cannot take events), for a message that can still be changed."""
        return self.audit is not None and not self._observing and not self.audit.ready()

    def _refuse_unrecorded(self, fields: dict[str, object]) -> bytes:
        """The refusal of a prepared statement or portal on personal data that would run
        unrecorded: its event says so, the token goes where its name was."""
        assert self.audit is not None
        event = {k: v for k, v in fields.items() if not k.startswith("_")}
        self.audit.record("refused", {**event, "decision": "refused", "reason": AUDIT_UNAVAILABLE})
        return self._refuse(AUDIT_UNAVAILABLE)

    def _refuse_prepared(self, typ: int, body: bytes, reason: str) -> bytes:
        """A statement or portal prepared before that may not run now: while the rules do
        not match the database (`MaskingContext.refusal`: new statements are refused by the
        analysis), or once they decide its text otherwise. The refusal token goes where
        its name was, as when the audit stream is unavailable: the server's error keeps
        the pipeline's order, and it skips what follows up to Sync."""
        log = self.statements
        assert log is not None
        self._skipping = True
        named = log.used(typ, body)
        fields = audit_fields(named) if named is not None else None
        if fields is None and named is not None and reason == RULES_CHANGED:
            # nothing protected when it was prepared, something now: its event says what
            fields = self._fields_now(named, reason)
        token = self._refuse_recorded(fields, reason)
        if typ == m.BIND:
            log.note_failing_bind()
            return extended.bind_renamed(body, token)
        if typ == m.DESCRIBE:
            refused = extended.describe_body(extended.target(body)[0], token)
            log.describe(refused)  # answered by the error, like any Describe
            return m.message(m.DESCRIBE, refused)
        refused = extended.execute_renamed(body, token)
        log.execute(refused)  # (a portal that cannot exist: it fails)
        return m.message(m.EXECUTE, refused)

    def _fields_now(self, named: Named, reason: str) -> dict[str, object] | None:
        """The audit fields of what a name runs, analysed under the current context."""
        d = named.decided
        if self.audit is None or named.uncertain or d is None or d.action == "refuse":
            return None
        return self._event_fields(d.sql, self.ctx.analyze(d.sql), "refuse", reason)

    def _refuse_recorded(self, fields: dict[str, object] | None, reason: str) -> bytes:
        if self.audit is not None and fields is not None:
            event = {k: v for k, v in fields.items() if not k.startswith("_")}
            self.audit.record("refused", {**event, "decision": "refused", "reason": reason})
        return self._refuse(reason)

    def _refuse(self, reason: str) -> bytes:
        nonce = secrets.token_hex(8)
        self._refusals[nonce] = reason
        answer, self._answer = self._answer, None
        if answer is not None:
            self._answers[nonce] = answer
        self.counters.refused += 1
        self.counters.refusal_reasons.append(reason)
        return f"{REFUSAL_TOKEN}{nonce}".encode()

    def _probe(self, reason: str) -> str:
        """A syntax probe's nonce (see the module docstring): counted as a refusal (the
        statement does not run); the server's answer that it parsed the probe whole becomes
        pgveil's refusal."""
        nonce = secrets.token_hex(8)
        self._refusals[nonce] = PARSED_ONLY_BY_SERVER
        self.counters.refused += 1
        self.counters.refusal_reasons.append(reason)
        return nonce

    def _moved_since_parse(self, statement: bytes) -> bool:
        """Whether names may have moved since the Parse of `statement` was analysed (the
        server then plans it again: its Execute may read what its analysis does not say).
        Not once a catalog read after the move is in and the text, analysed under it,
        reads the same."""
        parsed = self._parsed.get(statement)
        holder = self._holder
        if parsed is None or parsed[2] == holder.moved_until:
            return False
        if holder.unsure or self._moving:
            return True
        sql, before, _ = parsed
        d = self._analyse(sql)[0]  # (as the Parse was: an unmasked session's is audit-only)
        if _reads_of(d) != _reads_of(before) or (
            self._moved_here and any(name in holder.temp_names for name in d.relations)
        ):
            return True  # (a temporary relation this session's code made may come first)
        self._parsed[statement] = (sql, before, holder.moved_until)
        return False

    def _names_moving(self) -> None:
        """A statement that may move names goes to the server (see ContextHolder)."""
        self._holder.names_moving()
        self._moving = self._moved_here = True

    def _analyse(self, sql: str) -> tuple[Decision, str, str | None]:
        """(the analysis, "pass" | "rewrite" | "refuse", rewritten SQL or reason)."""
        d = self.ctx.analyze(sql)
        return d, "pass", None

    def _decide(self, sql: str) -> tuple[str, str | None, dict[str, object] | None]:
        """(action, rewritten SQL or refusal reason, audit fields when it is recorded)."""
        d, action, value = self._analyse(sql)
        self._decision = d
        audit = self.audit
        fields = None
        log = self.statements
        # views this session made, and names pgveil cannot resolve (see _session_reads)
        extra = None
        if action != "refuse":
            holder = self._holder
            if (
                self.session_views
                or d.unknown_relations
                or d.defines
                or ((holder.unsure or self._moving or self._moved_here) and d.relations)
                or (d.moves_names and len(d.kinds) > 1)
                or (self.temp_relations and d.relations and self._shadowed(d))
            ):
                extra = self._session_reads(d)
            if d.moves_names:
                # names may denote other relations than the catalog read says, for every
                # session, until it is read again (see ContextHolder.names_moving); the
                # statements after it in the same text too (see _session_reads)
                self._names_moving()
                for statement in d.effects or ():
                    self._moving_names.update(
                        name.encode() for kind, name in statement if kind == "prepare"
                    )
            elif self._moving_names and any(
                use.startswith("statement:") and use[10:].encode() in self._moving_names
                for use in d.uses
            ):
                self._names_moving()  # EXECUTE of a statement that may move names
        # EXECUTE / FETCH read what the PREPARE / DECLARE (or the protocol's Parse / Bind:
        # the same names) named: the statement log adds their tables when it runs (it
        # knows which statement or cursor the name holds then)
        uses = d.uses
        touches = (
            action == "refuse"
            or bool(d.tables)
            or d.action == "refuse"
            or extra is not None
            # statistics or statement text of any table, read raw (an unmasked session)
            or (self.raw_columns and bool(d.exposes))
        )
        if audit is not None and (touches or uses):
            if action != "refuse" and d.redacted:
                # the same for every statement of this shape: built once
                key = (d.redacted, d.kinds, d.tables, d.columns, d.denied, action, d.action)
                template = self._templates.get(key)
                if template is None:
                    if len(self._templates) >= _TEMPLATES:
                        self._templates.clear()
                    template = self._templates[key] = self._event_fields(sql, d, action, value)
                fields = template.copy()
            else:
                fields = self._event_fields(sql, d, action, value)
            if extra is not None:
                fields = _with_session_reads(fields, *extra)
            # a view this session made may stand where the catalog has another relation
            # of that name (a temporary one comes first): the shape proves nothing then
            proofs = action != "refuse" and (extra is None or not extra[0])
            if d.subject_keys and proofs:
                # for the statement log only (subject keys named by the statement)
                fields["_subject_keys"] = d.subject_keys
            if d.row_subjects and proofs:
                # for the statement log only (tables whose returned keys are proof)
                fields["_row_subjects"] = d.row_subjects
            # what the names read as far as can be told now: for the refusals' events
            sources = [f for f in (log.named(u) for u in uses) if f] if log and uses else []
            if action == "refuse":
                audit.record("refused", _with_sources(fields, sources))
                fields = None
            elif not self._observing and not audit.ready() and (touches or sources):
                action, value = "refuse", AUDIT_UNAVAILABLE
                refused = _with_sources(fields, sources)
                audit.record("refused", {**refused, "decision": "refused", "reason": value})
                fields = None
            elif not touches:
                # recorded only if what it names reads something protected
                fields["_optional"] = True
        # what the statements do to names and the transaction, once they run (a refused
        # statement does not run)
        self._effects = () if action == "refuse" else d.effects
        # a text pgveil cannot parse: the server's parser answers it (a syntax probe)
        self._probing = (
            self._probe(value or NOT_PARSED) if action == "refuse" and d.syntax else None
        )
        self._settings = () if action == "refuse" else d.settings
        if action == "rewrite":
            self.counters.rewritten += 1
        elif action == "pass":
            self.counters.passed += 1
        return action, value, fields

    def _event_fields(
        self, sql: str, d: Decision, action: str, value: str | None
    ) -> dict[str, object]:
        fields = event_fields(sql, d, action, value)
        # a masked-role refusal stops the analyser's walk (the tables may be more), unless
        # it was made once the walk was done
        stopped = d.action == "refuse" and not d.complete
        # pg_stats, pg_stat_activity... read raw: values of tables it cannot name
        raw_statistics = self.raw_columns and bool(d.exposes)
        fields["analysis_complete"] = not (stopped or raw_statistics)
        if stopped:
            # why, for `audit who` (the analyser's reasons name no literal)
            fields["uncertain"] = audit_kinds.ANALYSIS_STOPPED + str(d.reason or "")
        elif raw_statistics:
            fields["uncertain"] = audit_kinds.RAW_STATISTICS
        if self.raw_columns:
            # (deny columns too: nothing is denied to an unmasked role)
            fields.pop("columns_denied", None)
            raw = list(d.columns) + list(d.denied)
            if d.action == "refuse":
                # the analysis stopped early (a write's whole-row reference, say): any
                # personal column of the tables it reached may have been read
                for table in d.tables:
                    schema, _, name = table.partition(".")
                    found = self.ctx.pmap.by_name.get((schema, name))
                    if found is not None:
                        raw += [f"{found.rule_table}.{column}" for column in found.masks]
            fields["columns_raw"], fields["columns_masked"] = raw, []
        for key in ("tables", "columns_masked", "columns_raw", "columns_denied"):
            if key in fields:
                fields[key] = sorted(set(_names(fields[key])))
        return fields

    # of the statement being decided: which reading settings its text depends on, and what
    # it does to them (unmasked sessions: proxy/session/reading.py)
    _sensitive = 0
    _settings: tuple[SettingOp, ...] | None = ()

    def _text(self, raw: bytes) -> str | None:
        """A statement's text as the server reads it (None: pgveil cannot read it so).
        Masked sessions use UTF-8 and standard_conforming_strings on (they end otherwise)."""
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            return None

    def _session_reads(self, d: Decision) -> tuple[dict[str, list[str]], bool] | None:
        """What the statement reads that the catalog pgveil read cannot tell: the views
        this session created (temporary ones never are in the catalog; a permanent one
        only once it is read again), each with the tables behind it, and whether it names
        something pgveil cannot resolve (a relation, column or function created since the
        catalog was read, by this session or any other): then it may have read anything.
        None when it reads none of these. The views the statement creates are noted."""
        views: dict[str, list[str]] = {}
        uncertain = False
        defined = self.session_views
        if defined:
            for name in d.relations:
                for key in _matching(name, defined):
                    tables, unsure = defined[key]
                    views[key] = sorted(tables)
                    uncertain = uncertain or unsure
        unknown = [n for n in d.unknown_relations if n not in self.temp_relations]
        if len(unknown) < len(d.unknown_relations):
            # it reads the session's own temporary relations (a temporary view's reads are
            # in `views`): a `t.f` name pgveil does not know may be a column of theirs (a
            # function created since the catalog was read moved names: see below)
            unknown = [n for n in unknown if not n.startswith("column or function ")]
        if unknown:
            uncertain = True
            holder = self._holder
            if self._asked_under is not holder.context or len(self._asked) > 1000:
                self._asked_under = holder.context
                self._asked.clear()
            if not self._asked.issuperset(unknown):
                self._asked.update(unknown)
                holder.stale = True  # read the catalog again soon
        if d.relations and (
            self._holder.unsure or self._moving or (d.moves_names and len(d.kinds) > 1)
        ):
            # names may have moved since the catalog was read; in the transaction that may
            # have moved them, a catalog read (which cannot see its changes) does not settle
            uncertain = True
        elif self._moved_here and not uncertain:
            # code this session ran may have made a temporary relation that the name finds
            # before the catalog's (the temporary schema comes first in the search path):
            # the catalog read has the names of every temporary schema's relations (a
            # relation made since is covered by `unsure` until the read after it is in)
            temp = self._holder.temp_names
            uncertain = any(name in temp for name in d.relations)
        if not uncertain and self.temp_relations:
            uncertain = self._shadowed(d)
        for name, read in d.defines:
            # (a view over the session's views reads theirs; a superset: all of them)
            behind = frozenset(read).union(*(views.values()))
            before = defined.get(name)
            if before is not None:  # replaced, or defined again: either may be in force
                behind, unsure = behind | before[0], before[1] or uncertain
            else:
                unsure = uncertain
            defined[name] = (behind, unsure)
        if not views and not uncertain:
            return None
        return views, uncertain

    def _shadowed(self, d: Decision) -> bool:
        """Whether an unqualified name the statement reads is the catalog's (not unknown to
        it) and a temporary table of this session's (not a view: see session_views): the
        server finds the temporary one first, which the catalog's analysis did not read."""
        return any(
            name in self.temp_relations
            and name not in d.unknown_relations
            and not _matching(name, self.session_views)
            for name in d.relations
        )

    @property
    def _encoding(self) -> str:
        """The Python codec of the session's client encoding ("" when pgveil cannot tell:
        see StatementLog.encoding)."""
        return self.statements.encoding if self.statements is not None else "utf-8"

    def _query(self, body: bytes, original: bytes) -> bytes:
        text = simple.query_text(body)
        sql = self._text(text)
        if sql is None:
            return self._undecodable(m.QUERY, b"", original)
        self._may_wait = True
        action, value, fields = self._decide(sql)
        if self.statements is not None:
            source = self._source(sql, action, value, b"")
            # what a PREPARE or DECLARE in it leaves under its name: the whole text, as sent
            decided = Decided(sql, action, value) if self._tracks else None
            self.statements.query(
                fields, source, self._effects, decided, self._sensitive, self._settings
            )
        if action == "pass":
            return original
        if action == "rewrite":
            assert value is not None
            return self._rewritten_query(value)
        if self._probing is not None:
            return simple.query(_PROBE.format(self._probing).encode() + text)
        return simple.query(self._refuse(value or "refused"))

    def _rewritten_query(self, sql: str) -> bytes:
        """What the server gets for a Query rewritten to `sql` (the decision just made)."""
        return simple.query(sql.encode())

    def _parse(self, body: bytes, original: bytes) -> bytes:
        statement, query, rest = extended.parse_message(body)
        sql = self._text(query)
        if sql is None:
            self._parsed.pop(statement, None)
            return self._undecodable(m.PARSE, statement, original)
        self._may_wait = True
        action, value, fields = self._decide(sql)
        d = self._decision
        if d is not None and d.moves_names and action != "refuse":
            self._moving_names.add(statement)
        elif not statement:
            self._moving_names.discard(b"")  # (the unnamed statement is replaced)
        if d is not None and d.relations and action != "refuse":
            # (what it reads is compared only when names may have moved: _moved_since_parse)
            self._parsed[statement] = (sql, d, self._holder.moved_until)
        else:
            self._parsed.pop(statement, None)
        if self.statements is not None:
            source = self._source(sql, action, value, rest)
            # what the name holds: the whole text, as sent (masked sessions)
            decided = Decided(sql, action, value) if self._tracks else None
            # the parameter types, for the subject keys its parameters carry
            declared = extended.declared_types(rest) if fields and "_subject_keys" in fields else ()
            self.statements.parse(
                statement,
                fields,
                source,
                self._effects,
                decided,
                self._sensitive,
                self._settings,
                declared,
            )
        if action == "pass":
            return original
        if action == "rewrite":
            assert value is not None
            return self._rewritten_parse(statement, value, rest)
        if self._probing is not None:
            probe = _PROBE.format(self._probing).encode()
            return extended.parse(statement, probe + query, rest)
        return extended.parse(statement, self._refuse(value or "refused"))

    def _rewritten_parse(self, statement: bytes, sql: str, types: bytes) -> bytes:
        """What the server gets for a Parse rewritten to `sql` (the decision just made)."""
        return extended.parse(statement, sql.encode(), types)

    def _source(self, sql: str, action: str, value: str | None, types: bytes) -> Source | None:
        """What the masked filter keeps of a statement for its errors (nothing here)."""
        return None

    def _undecodable(self, typ: int, name: bytes, original: bytes) -> bytes:
        """A statement that is not UTF-8: no statement is recorded for it. `name`: a Parse's
        statement name."""
        if self.statements is not None:
            if typ == m.QUERY:
                self.statements.query(None)
            else:
                unreadable = Decided("", "refuse", NOT_UTF8) if self._tracks else None
                self.statements.parse(name, None, None, (), unreadable)
        return original

    # ---- server -> client --------------------------------------------------------------

    def server(self, scanner: MessageScanner, chunk: bytes) -> bytes:
        log = self.statements
        if log is None:
            return self._server.splice(scanner, chunk, self._server_message, "from server")
        return self._server.splice(
            scanner, chunk, self._server_message, "from server", log.data_rows, log.rows_to,
            log.rows_total,
        )  # fmt: skip

    def _server_message(self, typ: int, body: bytes, raw: bytes) -> bytes:
        if self.statements is not None:
            self.statements.server_message(typ, body)
        if typ == m.READY_FOR_QUERY:
            self._ready(body)
        elif typ == m.NOTIFICATION_RESPONSE:
            self._notified(body, "passed")
        elif typ == m.ERROR_RESPONSE or typ == m.PARAMETER_STATUS:
            if self.observer is not None:
                self.observer(typ, body)
            if typ == m.ERROR_RESPONSE and self._refusals:
                refusal = self._refusal(body)
                if refusal is not None:
                    return refusal
        return raw

    def _ready(self, body: bytes) -> None:
        """ReadyForQuery: the transaction status; a transaction that may have moved names
        ended (see ContextHolder.names_moved)."""
        self.tx_status = status = simple.tx_status(body)
        if self._moving and status == m.TX_IDLE:
            self._moving = False
            self._holder.names_moved()

    def _notified(self, body: bytes, decision: str) -> None:
        """A NotificationResponse on its way to the client: on a channel the rules name, its
        payload is personal data, so its delivery is an access (never its payload:
        `decision` says what the client got, `passed`, `masked` or `withheld`)."""
        audit = self.audit
        if audit is None:
            return
        # (the server sends the name in the session's client encoding)
        channel = async_.notification_channel(body).decode(self._encoding, "replace")
        if channel in self.ctx.policy.channels:
            audit.record("access", notification_fields(channel, decision))

    def _refusal(self, body: bytes) -> bytes | None:
        fields = errors.decode_fields(body)
        text = fields.get("M", "")
        if REFUSAL_TOKEN in text:
            for nonce in list(self._refusals):
                if REFUSAL_TOKEN + nonce in text:
                    reason = self._refusals.pop(nonce)
                    answer = self._answers.pop(nonce, None)
                    if answer is not None:
                        # the server's severity fields (in its lc_messages), pgveil's error
                        severity = {k: v for k, v in fields.items() if k in "SV"}
                        return errors.encode_fields(m.ERROR_RESPONSE, {**severity, **answer})
                    return errors.error_response("42501", f"pgveil: {reason}")
        return None


def _names(value: object) -> list[str]:
    return [str(v) for v in value] if isinstance(value, list) else []


def _masked(values: str) -> str:
    """Values of a row, as the default partial mask shows them."""
    return py_mask(_PARTIAL, values, _TEXT, {}) or ""


def _unknown_name(name: str) -> str:
    """An unknown name as the analyser records it, for a refusal's reason."""
    return name if name.startswith(COLUMN_OR_FUNCTION) else f"relation {name}"


def _matching(name: str, defined: dict[str, tuple[frozenset[str], bool]]) -> list[str]:
    """The views of `defined` that a relation name as written may denote: the same name,
    or the same relation name where either is unqualified (search_path decides; a
    temporary one comes first)."""
    if name in defined:
        return [name]
    schema, _, rel = name.rpartition(".")
    found = []
    for key in defined:
        key_schema, _, key_rel = key.rpartition(".")
        if key_rel == rel and (not schema or not key_schema or key_schema == schema):
            found.append(key)
    return found


def _with_session_reads(
    fields: dict[str, object], views: dict[str, list[str]], uncertain: bool
) -> dict[str, object]:
    """An event's fields with the reads of `_session_reads` (new containers: `fields` may
    be a template's copy)."""
    out = dict(fields)
    if views:
        tables = set(_names(fields.get("tables")))
        for behind in views.values():
            tables.update(behind)
        out["tables"] = sorted(tables)
        known = fields.get("views")
        out["views"] = {**(known if isinstance(known, dict) else {}), **views}
    if uncertain:
        out["analysis_complete"] = False
        out.setdefault("uncertain", audit_kinds.UNKNOWN_NAMES)
    return out


def _with_sources(fields: dict[str, object], sources: list[dict[str, object]]) -> dict[str, object]:
    """A refusal's event fields: the statement's, with the tables and columns of what its
    EXECUTE / FETCH name (as far as can be told before it runs)."""
    return with_reads_of(fields, sources, lambda k: not k.startswith("_"))


def notification_fields(channel: str, decision: str) -> dict[str, object]:
    """What an audit event says of a notification delivered on a channel with rules: the
    channel (a name of the rules) and what the client got; never the payload. Its subjects
    cannot be told, nor the tables its payload came from."""
    delivered = decision != "withheld"
    return {
        "kinds": ["notification"],
        "channel": channel,
        "tables": [],
        "columns_masked": [],
        "decision": decision,
        "rows": 1 if delivered else 0,
        "outcome": "ok",
        "subjects_complete": not delivered,
    }


def event_fields(sql: str, d: Decision, action: str, reason: str | None) -> dict[str, object]:
    """What an audit event says of a statement: never a literal, never a value."""
    if d.redacted:
        text, fingerprint = d.redacted, d.fingerprint  # computed once per statement shape
    else:
        text = redact(sql)
        fingerprint = audit_fingerprint(text)
    fields: dict[str, object] = {
        "kinds": list(d.kinds),
        "statement": text,
        "fingerprint": fingerprint,
        "tables": list(d.tables),
        "columns_masked": [c for c in d.columns if c not in d.denied],
        "decision": {"pass": "passed", "rewrite": "rewritten"}.get(action, "refused"),
    }
    if d.denied:
        # deny columns the statement named: read as NULL, or written (only NULL may be)
        fields["columns_denied"] = list(d.denied)
    if d.views:
        fields["views"] = {view: list(tables) for view, tables in d.views}
    if action == "refuse":
        fields["reason"] = reason
    return fields


class MaskedFilter(StatementFilter):
    _tracks = True

    def __init__(
        self,
        ctx: MaskingContext | ContextHolder,
        login: str,
        error_classes: dict[str, int] | None = None,
        prepares: bool = True,
    ) -> None:
        super().__init__(ctx)
        self.login = login
        self.error_classes = error_classes if error_classes is not None else {}
        # a Bind, Execute or Describe refused since the last Sync: the server skips what
        # follows up to Sync
        self._skipping = False
        self._checking: set[int] = set()  # the names being checked now (see _runs_now)
        # pairs each error and notice with its statement, audited or not (events, if any,
        # go to the audit hook once it is attached)
        self.statements = StatementLog(self._holder, _no_event)
        self.statements.vet = self._vet
        self.statements.recheck = self._runs_now
        # Prepared statements (see `_rewritten_query`; `_rewritten_parse`: keyed by the
        # rewritten text and the declared types): prepared text -> [statement name,
        # whether the server confirmed it (ParseComplete)], least recently used first
        self.prepares = prepares
        self._prepared: OrderedDict[str | tuple[str, bytes], list[object]] = OrderedDict()
        self._to_close: list[bytes] = []  # names the server may still hold: closed next
        self._executions: deque[_Execution] = deque()  # in flight, in order
        self._nonce = secrets.token_hex(4)
        # how the server quotes one of this session's statement names in a message
        self._ours_quoted = f'"{PREPARED_PREFIX}{self._nonce}_'.encode()
        self._serial = 0
        self._simple_only = True  # the client sent nothing but Query (and COPY data) so far
        self._copies = 0  # COPY FROM STDIN statements sent whose end the client did not send
        self._reserved = False  # the Parse being decided names one of pgveil's statements
        self._resend = bytearray()  # Queries to send the server again (see take_resend)
        self.resent = 0  # ... how many so far: the server answers each with ReadyForQuery
        # The unnamed statement (see `_rewritten_parse`): the key and name of the statement
        # of pgveil's that the client's unnamed statement is, if one
        self._unnamed: tuple[tuple[str, bytes], bytes] | None = None
        # ... the rewritten text and types the client's unnamed statement holds while
        # pgveil's statement for it may be gone (DISCARD ALL, DEALLOCATE ALL): the server
        # gets the text again before the next Bind or Describe of it
        self._unnamed_lost: tuple[str, bytes] | None = None
        # the log entry before whose answer a Parse of it goes, and the text and types
        self._absorb: tuple[object, tuple[str, bytes]] | None = None
        self._flight: _Unnamed | None = None  # the Parse of one in flight
        self._queued: list[bytes] = []  # notices raised while a ParseComplete is held
        # rewritten texts found not to run as a kept statement
        self._text_only: OrderedDict[tuple[str, bytes], None] = OrderedDict()
        # what the server read names and parameter types under when it prepared a
        # statement for the unnamed statement: the rules and catalog (context), pgveil's
        # catalog reads (another session's DDL shows in the next one, every
        # catalog_refresh seconds: a statement is prepared anew after each), the names
        # moving (ContextHolder.moved_until) and this session's statements that may change
        # what names resolve to (SET search_path, DDL, CREATE TEMP TABLE, ...): `_epoch`
        self._epoch = 0
        # portals bound to statements that moved the epoch (see _binding), until the
        # session is idle with nothing in flight (a name kept longer moves the epoch once
        # more at most)
        self._moving_portals: set[bytes] = set()
        self._serving = 0  # statements kept for the unnamed statement (keys are tuples)

    def _source(self, sql: str, action: str, value: str | None, types: bytes) -> Source | None:
        # the client's text (its literals are what it may see again); the rewritten text
        # only to check that statements pair one to one
        oids = extended.declared_types(types)
        sent = value if action == "rewrite" else None
        return Source(sql, sent, oids, oids, self._probing)

    def _function_call(self, raw: bytes) -> bytes:
        if self.statements is not None:
            self.statements.function_call()
        return simple.query(self._refuse("FunctionCall is not allowed for masked roles"))

    _renamed = False  # the client message at hand was renamed to one of pgveil's statements

    def _client_message(self, typ: int, body: bytes, raw: bytes) -> bytes:
        self._renamed = False
        out = self._client_message_out(typ, body, raw)
        flight = self._flight
        if flight is not None and flight.synced is None:
            self._keep_for_resend(flight, typ, raw, out)
        return out

    def _client_message_out(self, typ: int, body: bytes, raw: bytes) -> bytes:
        if typ == m.QUERY or typ == m.PARSE:
            if typ == m.QUERY or extended.parses_unnamed(body):
                # the server replaces its unnamed statement (a Query drops it), whatever
                # the outcome: the client's is the server's again
                self._unnamed = None
                self._unnamed_lost = None
            if typ == m.PARSE:
                self._simple_only = False
                self._reserved = body.startswith(_PREPARED_PREFIX)
            self._effects = ()
            try:
                out = super()._client_message(typ, body, raw)
            finally:
                self._reserved = False
            # (set_config looked for in the whole message: a statement name or parameter
            # types' bytes that happen to hold it move the epoch once more, nothing else)
            self._resolving(self._decision, _SET_CONFIG.search(body) is not None)
            effects = self._effects
            if effects:
                # what it does once it runs: later Queries must not count on pgveil's
                # statements (DISCARD ALL, DEALLOCATE ALL), nor be read as copy data
                for statement in effects:
                    for kind, _ in statement:
                        if kind == "discard_all" or kind == "deallocate_all":
                            self._forget_prepared()
                        elif kind == "copy_in":
                            self._copies += 1
            return out
        if typ not in _SIMPLE:
            # an extended-protocol client: its messages and pgveil's own would share the
            # unnamed statement and portal and the error skipping up to Sync; its Queries go
            # as text from now on
            self._simple_only = False
            if _PREPARED_PREFIX in body:
                if self._names_ours(typ, body):
                    return self._refuse_prepared(typ, body, RESERVED_NAME)
                kind, name = extended.target(body) if typ == m.CLOSE else (b"", b"")
                if kind == b"S" and name.startswith(_PREPARED_PREFIX):
                    # a name the client cannot hold: closed as any such name is (a
                    # CloseComplete), pgveil's statement stays
                    super()._client_message(typ, body, raw)
                    return _CLOSE_NONE
            if typ == m.BIND:
                self._binding(body)
            elif (
                typ == m.EXECUTE
                and self._moving_portals
                and extended.execute_portal(body) in self._moving_portals
            ):
                # what it runs may change what names resolve to (the Bind that bound it
                # moved the epoch before a Parse served since then)
                self._epoch += 1
                self._set_since = True
        elif typ in _NO_COPY_IN_FLIGHT and self._copies:
            self._copies -= 1
        if typ == m.BIND or typ == m.EXECUTE:
            if self._skipping:
                if typ == m.EXECUTE:
                    # the server skips everything up to Sync after the refused message:
                    # this Execute never runs (and is no statement of its own to record)
                    return raw
            else:
                refusal = self.ctx.refusal
                if refusal is not None:
                    return self._refuse_prepared(typ, body, refusal)
        elif typ == m.SYNC:
            self._skipping = False
        if (self._unnamed is not None or self._unnamed_lost) and typ in _NAMING_UNNAMED:
            return self._unnamed_message(typ, body, raw)
        # a name decided under another context is checked by the statement log (`_vet`)
        return super()._client_message(typ, body, raw)

    # ---- prepared statements -------------------------------------------------------------
    # A Query holding one rewritten SELECT goes to the server as a statement prepared once
    # per server connection and shape (rules/prepare.py says which literals become
    # parameters, and proves the text means the same): `Parse` the first time, then `Bind`
    # (the literals' values, text formats) / `Describe` portal / `Execute` / (in a
    # transaction block: `Close` portal) / `Sync`. Its answers are made a Query's:
    # ParseComplete, BindComplete, CloseComplete and NoData are dropped, the portal's
    # RowDescription is the Query's, an error's position is moved from the prepared text to
    # the client's (as a rewritten text's is).
    # The statement log sees exactly what a Query gets, so pairing and audit are unchanged.
    #
    # Only while the client has sent nothing but Queries (an extended-protocol message
    # shares the unnamed statement and portal, and the skipping to Sync), no COPY FROM
    # STDIN may be reading its messages, and the statement is confirmed prepared before it
    # is used without Parse (a Parse in flight that fails would fail the Bind behind it).
    # Forgotten (and closed with the next execution) when the client's statements may drop
    # them (DISCARD ALL, DEALLOCATE ALL), when the server says a statement's result type
    # changed (0A000), and the least recently used beyond PREPARED_PER_CONNECTION. Names
    # carry a per-session nonce and a serial (never reused); statements and protocol
    # messages naming PREPARED_PREFIX are refused. Masked roles see the names, not the text,
    # in pg_prepared_statements (rules/denied.py).

    def _rewritten_query(self, sql: str) -> bytes:
        d = self._decision
        log = self.statements
        if (
            not self.prepares
            or not self._simple_only
            or self._copies
            or d is None
            or d.shaped is None
            or log is None
            or log.lost is not None
        ):
            return simple.query(sql.encode())
        status = log.predicted_status()
        if status != "I" and (status != "T" or log.head() is not log.tail()):
            # in a transaction block, only when no statement in flight can fail it: in a
            # failed block, the server's 25P02 would name the routine it came from, which
            # a Query's does not (exec_simple_query)
            return simple.query(sql.encode())
        form = prepared_form(d)
        if form is None:
            return simple.query(sql.encode())
        text, values, tokens, lengths = form
        slot = self._prepared.get(text)
        if slot is not None and not slot[1]:
            return simple.query(sql.encode())  # its Parse is still in flight
        out = bytearray()
        for old in self._to_close:
            out += extended.close(b"S", old)
        self._to_close.clear()
        if slot is None:
            if len(self._prepared) >= PREPARED_PER_CONNECTION:
                _, evicted = self._prepared.popitem(last=False)
                out += extended.close(b"S", evicted[0])  # type: ignore[arg-type]
            self._serial += 1
            name = f"{PREPARED_PREFIX}{self._nonce}_{self._serial}".encode()
            self._prepared[text] = [name, False]
            types = extended.type_section((prepare.INT4,) * len(values))
            out += extended.parse(name, text.encode(), types)
            self.counters.prepared_parses += 1
        else:
            name = slot[0]  # type: ignore[assignment]
            self._prepared.move_to_end(text)
        out += extended.bind_text(name, values)
        out += _EXECUTE_UNNAMED if status == "I" else _EXECUTE_UNNAMED_CLOSED
        execution = _Execution(
            log.tail(), text, name, slot is None, tokens, lengths, sql, status == "I"
        )
        self._executions.append(execution)
        self.counters.prepared_executions += 1
        return bytes(out)

    # ---- the unnamed statement ------------------------------------------------------------
    # An extended-protocol client that parses its statements into the unnamed statement
    # (libpq's PQexecParams, pgbench -M extended, JDBC and psycopg before they prepare) has
    # the server parse, analyse and plan the rewritten text for every execution. Where the
    # rewritten text is one SELECT whose parameters the server may plan without their
    # values (rules.prepare.client_parameters_eligible), one of pgveil's prepared
    # statements per server connection, rewritten text and declared types serves it:
    # - the first time, the text goes as the client's Parse, and pgveil's Parse of the same
    #   text right after it (its ParseComplete is dropped; after the client's failed Parse
    #   the server skips it);
    # - once that statement is confirmed, the client's Parse becomes a Close of the server's
    #   unnamed statement, whose CloseComplete answers as the ParseComplete; from then on
    #   the client's Bind and Describe of the unnamed statement name pgveil's statement,
    #   until the client replaces it (a Parse of it, a Query) or closes it (Close: the
    #   server's unnamed statement is gone already). DISCARD ALL or DEALLOCATE ALL drop
    #   pgveil's statements but not the server's unnamed one: the text goes to the server's
    #   unnamed statement before the next Bind or Describe of it (`_unnamed_lost`).
    # Only while nothing else is in flight, outside a failed transaction block, with no COPY
    # FROM STDIN reading the client's messages and nothing being skipped to Sync, so that
    # the Close and the Parses are the first messages the server answers; prepared anew
    # whenever what names and parameter types resolve to may have changed (`_epoch`). The
    # server refuses a statement it can no longer run as prepared (0A000, 26000, class 42)
    # in the Bind, before anything runs: outside a transaction block, when that Bind came
    # right after the Parse and a Sync ended the batch, the ParseComplete is held until the
    # Bind is answered, and if nothing was sent after the Sync the client's messages go
    # again with the text (the refusal, and notices of the refused Bind, are never shown);
    # otherwise the error goes to the client, as it would for a statement the client had
    # prepared itself.

    def _rewritten_parse(self, statement: bytes, sql: str, types: bytes) -> bytes:
        plain = extended.parse(statement, sql.encode(), types)
        log = self.statements
        if (
            statement
            or not self.prepares
            or self._copies
            or self._skipping
            or log is None
            or log.lost is not None
            or log.head() is not log.tail()  # (the tail: this Parse)
            or log.predicted_status() == "E"
            or self._moving
            or self._holder.unsure
        ):
            return plain
        key = (sql, types)
        slot = self._prepared.get(key)
        holder = self._holder
        epoch = (self.ctx, holder.reads_done, holder.moved_until, self._epoch)
        if slot is not None and slot[2] != epoch:
            # names or types may resolve otherwise now: prepared anew (the server would
            # analyse the kept one again with the parameter types of its first Parse)
            self._forget_kept(key, slot[0], close=True)  # type: ignore[arg-type]
            slot = None
        if slot is None:
            if key in self._text_only:
                self._text_only.move_to_end(key)
                return plain
            if not prepare.client_parameters_eligible(sql):
                self._text_only[key] = None
                if len(self._text_only) > _TEXT_ONLY_KEPT:
                    self._text_only.popitem(last=False)
                return plain
        elif not slot[1]:
            return plain  # its Parse is still in flight
        out = bytearray()
        closes = len(self._to_close)
        for old in self._to_close:
            out += extended.close(b"S", old)
        self._to_close.clear()
        mapped = slot is not None
        if slot is None:
            if len(self._prepared) >= PREPARED_PER_CONNECTION:
                old_key, evicted = self._prepared.popitem(last=False)
                out += extended.close(b"S", evicted[0])  # type: ignore[arg-type]
                closes += 1
                if isinstance(old_key, tuple):
                    self._serving -= 1
            self._serial += 1
            name = f"{PREPARED_PREFIX}{self._nonce}_{self._serial}".encode()
            self._prepared[key] = [name, False, epoch]
            self._serving += 1
            out += plain + extended.parse(name, sql.encode(), types)
            self.counters.prepared_parses += 1
        else:
            name = slot[0]  # type: ignore[assignment]
            self._prepared.move_to_end(key)
            out += _CLOSE_UNNAMED
            self._unnamed = (key, name)
        idle = log.predicted_status() == "I"
        self._flight = _Unnamed(log.tail(), key, name, closes, mapped, idle)
        return bytes(out)

    def _unnamed_message(self, typ: int, body: bytes, raw: bytes) -> bytes:
        """A Bind, Describe or Close from the client while its unnamed statement is one of
        pgveil's (or was, until DISCARD ALL or DEALLOCATE ALL): renamed to it, or refused."""
        if typ == m.BIND:
            named = extended.bind_names(body)[1] == b""
        else:
            kind, target = extended.target(body)
            named = kind == b"S" and target == b""
        if not named:
            return super()._client_message(typ, body, raw)
        if typ == m.CLOSE:
            self._unnamed = None  # (the server's unnamed statement is closed already)
            self._unnamed_lost = None
            return super()._client_message(typ, body, raw)
        lost = self._unnamed_lost
        if lost is not None:
            log = self.statements
            assert log is not None
            if self._skipping or self._absorb is not None:
                return self._refuse_prepared(typ, body, UNNAMED_DROPPED)
            out = super()._client_message(typ, body, raw)
            if out is not raw:
                return out  # refused
            # the text it holds goes to the server's unnamed statement first (its
            # ParseComplete is dropped: see _server_answer); the client's is the server's
            # again -- unless that Parse fails or the server skips it (an error before it):
            # then it is still lost
            self._unnamed_lost = None
            self._absorb = (log.tail(), lost)
            return extended.parse(b"", lost[0].encode(), lost[1]) + raw
        out = super()._client_message(typ, body, raw)
        if out is not raw or self._unnamed is None:
            return out  # refused
        name = self._unnamed[1]
        self._renamed = True
        if typ == m.BIND:
            self.counters.prepared_executions += 1
            return extended.bind_renamed(body, name)
        return extended.describe(b"S", name)

    def _keep_for_resend(self, flight: _Unnamed, typ: int, raw: bytes, out: bytes) -> None:
        """The client's messages after a Parse the unnamed statement serves, up to Sync:
        what the text path would have sent (see _unnamed_answer)."""
        log = self.statements
        assert log is not None
        batch = flight.batch
        if typ == m.PARSE and flight.entry is log.tail():
            return  # (the Parse itself)
        renamed = self._renamed
        if batch is not None:
            if not batch and flight.mapped and typ == m.BIND and renamed:
                flight.first = log.tail()  # the Bind of pgveil's statement right after it
            if len(batch) < _UNNAMED_BATCH and out:
                batch.append(raw if renamed else out)  # (a refusal stays one)
            else:
                flight.batch = None
        if typ == m.SYNC:
            flight.synced = log.tail()

    def _unnamed_answer(self, flight: _Unnamed, typ: int, body: bytes) -> int:
        """The type a server message goes on as while a Parse the unnamed statement serves
        is in flight (0: dropped; `_pc_first`: a ParseComplete goes before it)."""
        if typ in _ASYNC:
            if typ == m.NOTICE_RESPONSE and flight.pc_held:
                self._queued.append(body)  # (raised by the Bind: after its ParseComplete)
                return 0
            return typ
        log = self.statements
        assert log is not None
        if not flight.parsed:
            if flight.closes and typ == m.CLOSE_COMPLETE:
                flight.closes -= 1  # pgveil's Close of a statement it no longer keeps
                return 0
            flight.parsed = True
            if flight.mapped and typ == m.CLOSE_COMPLETE:
                if flight.first is not None and flight.synced is not None and flight.idle:
                    # held until the Bind is taken: if the server refuses pgveil's
                    # statement, the client's messages go again with the text and the
                    # client gets the text's answers, its Parse's first
                    flight.pc_held = True
                    return 0
                return m.PARSE_COMPLETE
            if not flight.mapped and typ == m.PARSE_COMPLETE:
                return typ  # the client's own; pgveil's Parse answers next
            # the client's Parse failed (the server skips to Sync); a mapped one cannot
            self._flight = None
            self._drop_unnamed(flight, close=flight.mapped)
            return typ
        if not flight.mapped:
            self._flight = None
            if typ == m.PARSE_COMPLETE:
                slot = self._prepared.get(flight.key)
                if slot is not None and slot[0] == flight.name:
                    slot[1] = True
                return 0
            self._drop_unnamed(flight, close=False)  # (after the same text parsed: none seen)
            return typ
        if typ == m.READY_FOR_QUERY:
            self._flight = None
            held = flight.held
            if held is None:
                return typ
            if flight.batch is not None and log.tail() is flight.synced and body == _IDLE_BODY:
                # nothing was sent after the Sync: the client's messages go again with the
                # text, whose answers are theirs from its ParseComplete on (the log still
                # waits for them)
                sql, types = flight.key
                self._resend += extended.parse(b"", sql.encode(), types)
                self._resend += b"".join(flight.batch)
                self.resent += 1
                self._queued.clear()  # (the Bind raises them again)
                return 0
            # the client sent more meanwhile: its ParseComplete and the error go on
            self._pc_first = True
            self._released = held
            return typ
        if flight.pc_held:
            # the answer to the Bind right after the Parse
            flight.pc_held = False
            if typ == m.ERROR_RESPONSE and _refused_statement(body):
                self._drop_unnamed(flight, close=True)
                if flight.batch is not None:
                    flight.held = body  # (the server skips the rest up to the Sync)
                    flight.pc_held = True
                    return 0
            self._pc_first = True
            return typ
        if typ == m.ERROR_RESPONSE and log.head() is flight.first and _refused_statement(body):
            self._drop_unnamed(flight, close=True)  # (prepared anew next time)
        return typ

    def _unnamed_error(self, body: bytes) -> bytes:
        """An error that names one of pgveil's statements, which only a Bind or Describe of
        the client's unnamed statement renamed to it can get (a client may not name them):
        as the server words it for the unnamed statement."""
        fields = errors.decode_fields(body)
        text = fields.get("M", "")
        name = re.escape(self._ours_quoted.decode()) + r'\d+"'
        if re.fullmatch(f"prepared statement {name} does not exist", text):
            fields["M"] = "unnamed prepared statement does not exist"  # (26000)
        elif re.fullmatch(
            f"bind message supplies \\d+ parameters, but prepared statement {name} requires \\d+",
            text,
        ):
            fields["M"] = re.sub(name, '""', text)  # (08P01)
        else:
            return body  # (another message that quotes the name: the client's own text)
        return errors.encode_fields(m.ERROR_RESPONSE, fields)[5:]

    def _drop_unnamed(self, flight: _Unnamed, close: bool) -> None:
        """pgveil's statement for `flight` is not to be used again (`close`: the server may
        hold it)."""
        self._forget_kept(flight.key, flight.name, close)
        if self._unnamed is not None and self._unnamed[1] == flight.name:
            self._unnamed = None  # (the server's unnamed statement is closed)

    def _forget_kept(self, key: tuple[str, bytes], name: bytes, close: bool) -> None:
        """The statement kept for the unnamed statement under `key`, if it is still `name`,
        is not to be used again (`close`: closed with the next Parse served)."""
        slot = self._prepared.get(key)
        if slot is not None and slot[0] == name:
            del self._prepared[key]
            self._serving -= 1
            if close:
                self._to_close.append(name)

    def _resolving(self, d: Decision | None, set_config: bool) -> bool:
        """A statement on its way to the server (or bound to run): one that may change what
        names or parameter types resolve to moves `_epoch` (SET, or `set_config` named in
        its text, such as search_path; DDL; a relation it creates, SELECT INTO too; code
        that may run DDL; a read of a view, whose definition may call set_config; any
        write; anything pgveil cannot read), and so does any transaction statement after
        such a statement went (a rollback, or one to a savepoint, undoes it; SAVEPOINT and
        RELEASE end nothing, so the mark stays) and the transaction's end (`_ready`). Rows
        read and SHOW do not. Whether it moved the epoch."""
        if (
            set_config
            or d is None
            or d.moves_names
            or d.temp_relations
            or d.unknown_relations
            or any(kind not in _RESOLVES_ALIKE and kind != "transaction" for kind in d.kinds)
            or (d.relations and not self._views_of(self.ctx).isdisjoint(d.relations))
        ):
            self._set_since = True
        elif not (self._set_since and "transaction" in d.kinds):
            return False
        self._epoch += 1
        return True

    _set_since = False  # a statement that moved the epoch went since the session was last idle
    _views: tuple[MaskingContext | None, frozenset[str]] = (None, frozenset())

    def _views_of(self, ctx: MaskingContext) -> frozenset[str]:
        """The names of the catalog's views, qualified and not (Decision.relations: as
        written), once per context."""
        if self._views[0] is not ctx:
            names: set[str] = set()
            for (schema, name), relation in ctx.catalog.relations.items():
                if relation.kind == "v":
                    names.update((name, f"{schema}.{name}"))
            self._views = (ctx, frozenset(names))
        return self._views[1]

    def _ready(self, body: bytes) -> None:
        """ReadyForQuery: idle after a SET went means a transaction ended that may have
        undone it (an implicit block rolled back at Sync: no transaction statement says
        so), so what names resolve to may have changed. pgveil serves a Parse only when
        nothing else is in flight, so the next one comes after this."""
        super()._ready(body)
        if self.tx_status != m.TX_IDLE:
            return
        if self._set_since:
            self._epoch += 1
            self._set_since = False
        log = self.statements
        if self._moving_portals and log is not None and not log.in_flight:
            self._moving_portals.clear()  # (the server dropped every portal)

    def _binding(self, body: bytes) -> None:
        """A Bind of an extended-protocol client: one that runs what is not a plain SELECT
        may change what the statements kept for the unnamed statement resolve to (see
        `_epoch`), at the Bind and again at each Execute of its portal (a Parse may be
        served in between), and one that runs DISCARD ALL or DEALLOCATE ALL drops them (at
        its Parse pgveil forgot the statements kept then, not those kept since)."""
        log = self.statements
        named = log.used(m.BIND, body) if log is not None else None
        decided = named.decided if named is not None else None
        d = self.ctx.analyze(decided.sql) if decided is not None else None
        portal = extended.bind_names(body)[0]
        named_set_config = decided is not None and _SET_CONFIG_TEXT.search(decided.sql) is not None
        if self._resolving(d, named_set_config):
            self._moving_portals.add(portal)
        else:
            self._moving_portals.discard(portal)
        if not self._serving:
            return
        if (
            d is None
            or d.effects is None
            or any(
                kind == "discard_all" or kind == "deallocate_all"
                for statement in d.effects
                for kind, _ in statement
            )
        ):
            self._forget_prepared()

    _released: bytes | None = None  # a held error that goes to the client after all

    def take_resend(self) -> bytes:
        """What must go to the server again now (see `_execution_answer`)."""
        out = bytes(self._resend)
        self._resend.clear()
        return out

    def _forget_prepared(self) -> None:
        """The client's statements may drop pgveil's: prepare anew, close the old names."""
        for slot in self._prepared.values():
            self._to_close.append(slot[0])  # type: ignore[arg-type]
        self._prepared.clear()
        self._serving = 0
        if self._unnamed is not None:
            # the server keeps its unnamed statement: the client's still holds the text
            self._unnamed_lost = self._unnamed[0]
            self._unnamed = None

    @staticmethod
    def _names_ours(typ: int, body: bytes) -> bool:
        """Whether a Bind or Describe uses one of pgveil's prepared statements (a Close of
        one may go: pgveil prepares nothing more once the client sent any such message)."""
        if typ == m.BIND:
            return extended.bind_names(body)[1].startswith(_PREPARED_PREFIX)
        if typ == m.DESCRIBE:
            kind, name = extended.target(body)
            return kind == b"S" and name.startswith(_PREPARED_PREFIX)
        return False

    def _execution_answer(self, execution: _Execution, typ: int, body: bytes) -> bytes | None:
        """A server message of a prepared execution: None to drop it, else its body as a
        Query's answer would be (an error's position moved)."""
        if typ in _ABSORBED:
            if typ == m.PARSE_COMPLETE:
                execution.parsed = True
                slot = self._prepared.get(execution.text)
                if slot is not None and slot[0] == execution.name:
                    slot[1] = True
            elif typ == m.BIND_COMPLETE:
                execution.bound = True
            return None
        if typ == m.READY_FOR_QUERY:
            self._executions.popleft()
            held = execution.held
            if held is None:
                return body
            log = self.statements
            if log is not None and log.tail() is execution.entry and body == _IDLE_BODY:
                # nothing was sent after it: the Query goes again, as text, and its answers
                # are the Query's (the statement log still waits for them)
                self._resend += simple.query(execution.sql.encode())
                self.resent += 1
                return None
            # the client sent more meanwhile, which the Query must not follow: the error
            # goes to the client after all
            self._released = held
            return body
        if typ != m.ERROR_RESPONSE and typ != m.NOTICE_RESPONSE:
            return body
        fields = errors.decode_fields(body)
        if typ == m.ERROR_RESPONSE:
            failed_parse = execution.parse and not execution.parsed
            # (an outdated statement is refused in Bind; the same SQLSTATE after BindComplete
            # is the statement's own error, as the text gets it: `unit ... not supported`)
            outdated = not failed_parse and not execution.bound and fields.get("C") in _OUTDATED
            if failed_parse or outdated:
                slot = self._prepared.get(execution.text)
                if slot is not None and slot[0] == execution.name:
                    del self._prepared[execution.text]
                    if outdated:
                        self._to_close.append(execution.name)
            if (
                outdated
                and execution.idle
                and execution.held is None
                and self.statements is not None
                and self.statements.tail() is execution.entry
            ):
                # the table changed since it was prepared (another session's ALTER): the
                # server refuses before anything ran, and outside a transaction block
                # nothing is left done; the Query is sent again once its ReadyForQuery
                # came, if nothing was sent after it by then
                execution.held = body
                return None
        position = fields.get("P")
        if position is None:
            return body
        where = prepare.positions(execution.tokens, execution.lengths)
        fields["P"] = _unprepared_position(position, where)
        return errors.encode_fields(typ, fields)[5:]

    def _vet(self, named: Named) -> str | None:
        """The statement log's check of the statement or portal that a Bind, Execute or
        Describe names, when it was decided under another context (a catalog refresh, a
        rules reload): what the server holds runs only if the rules now decide it alike."""
        if self._skipping:
            return None  # the server skips the message: nothing runs
        return self._runs_now(named)

    def _runs_now(self, named: Named) -> str | None:
        """Why what a statement or portal name runs may not run under the current context,
        or None (it is then current: the next use costs nothing). Its text is analysed
        again (cached per context, so a catalog refresh that changes nothing costs one
        cache look-up per name) and must be sent exactly as it was: the same action, the
        same rewritten text. A text pgveil refused (or could not read) is not analysed
        again: it never reached the server, whose own error answers a use of the name it
        was refused under. A name whose text the statement log cannot tell (uncertain) is
        refused."""
        ctx = self._holder.context
        if ctx.refusal is not None:
            return ctx.refusal
        key = id(named)
        if key in self._checking:
            # its own text uses it (PREPARE p AS ...; EXECUTE p): the check under way
            # decides for both
            return None
        if named.uncertain:
            return RULES_CHANGED
        d = named.decided
        if d is None:
            return UNTRACKED
        if d.action != "refuse":
            self._checking.add(key)
            try:
                _, action, value = self._analyse(d.sql)
            finally:
                self._checking.discard(key)
            if action != d.action or value != d.value:
                return RULES_CHANGED
        named.current = ctx
        return None

    def _used_refusal(self, d: Decision) -> str | None:
        """Why a statement's EXECUTE, FETCH or MOVE of a name may not run now, or None. A
        prepared statement that pgveil's picture lacks and that no earlier statement of the
        same text prepares is checked as one pgveil cannot tell (StatementLog.absent); a
        cursor is not (an allow-listed function may open one: its name is the server's)."""
        log = self.statements
        assert log is not None
        ctx = self._holder.context
        defined: set[str] = set()
        for statement in d.effects or ():
            for kind, name in statement:
                if kind == "prepare":
                    defined.add(f"statement:{name}")
                elif kind == "execute" or kind == "fetch" or kind == "move":
                    use = f"{'statement' if kind == 'execute' else 'portal'}:{name}"
                    named = log.entry(use)
                    reason = None
                    if named is not None and named.current is not ctx:
                        reason = self._runs_now(named)
                    elif named is None and kind == "execute" and use not in defined:
                        reason = log.absent()
                    if reason is not None:
                        return reason
        return None

    def _undecodable(self, typ: int, name: bytes, original: bytes) -> bytes:
        super()._undecodable(typ, name, original)
        refusal = self._refuse(NOT_UTF8)
        if typ == m.QUERY:
            return simple.query(refusal)
        return extended.parse(name, refusal)

    def _analyse(self, sql: str) -> tuple[Decision, str, str | None]:
        # (only the client's own Query or Parse may wait, not the checks made for it)
        may_wait, self._may_wait = self._may_wait, False
        fresh, self._fresh = self._fresh, 0
        d = self.ctx.analyze(sql)
        if d.action == "refuse":
            return d, "refuse", d.reason or "refused"
        if self._reserved or (d.effects and _names_reserved(d.effects)):
            self._reserved = False
            return d, "refuse", RESERVED_NAME
        unknown = [r for r in d.unknown_relations if r not in self.temp_relations]
        if unknown:
            holder = self._holder
            if fresh and holder.reads_done >= fresh:
                # a catalog read that began after the statement arrived does not have it
                return d, "refuse", self._missing(sql, unknown)
            # (a statement that waited once and still has no read: refused as before)
            holder.stale = True  # read the catalog again soon
            if may_wait and self.waits and not fresh:
                # created since pgveil read the catalog, or never: wait for a read
                self.awaiting = self._asked_wait = holder.reads_begun + 1
                raise Pause
            what = _unknown_name(unknown[0])
            return d, "refuse", f"{what} is not known to pgveil yet; try again shortly"
        if d.uses or d.moves:
            # EXECUTE / FETCH / MOVE run what the server prepared: it must still be what
            # the rules decide
            reason = self._used_refusal(d)
            if reason is not None:
                return d, "refuse", reason
        self.temp_relations.update(d.temp_relations)
        if d.action == "rewrite":
            return d, "rewrite", d.sql
        return d, "pass", None

    def _missing(self, sql: str, unknown: list[str]) -> str:
        """The refusal of a statement naming what a fresh catalog read does not have: the
        server's error for it (`_answer`, see rules.missing), or pgveil's when what the
        server would say cannot be told (the name exists as something pgveil does not
        read, a sequence say)."""
        ctx = self.ctx
        found = missing_name(sql, unknown, ctx.catalog, ctx.database)
        if found is None:
            created = created_here(sql, unknown)
            if created is not None:
                return (
                    f"relation {created} is created by the same statement text: pgveil can "
                    "judge statements on it once it exists; send them separately"
                )
            what = _unknown_name(unknown[0])
            if what.startswith("relation "):
                return (
                    f"{what} is no table, view, materialized view or foreign table pgveil "
                    "knows; masked roles may not use it"
                )
            return f"{what} does not exist"
        answer = {"C": found.code, "M": found.message}
        if found.detail is not None:
            answer["D"] = found.detail
        if found.hint is not None:
            answer["H"] = found.hint
        if found.position is not None:
            answer["P"] = str(found.position)
        self._answer = answer
        return found.message

    # ---- server -> client --------------------------------------------------------------

    def _server_message(self, typ: int, body: bytes, raw: bytes) -> bytes:
        log = self.statements
        assert log is not None
        flight = self._flight
        if flight is not None:
            answered = self._unnamed_answer(flight, typ, body)
            if answered != typ:
                if not answered:
                    return b""
                typ, body, raw = answered, b"", m.message(answered, b"")  # (ParseComplete)
            before = b""
            if self._pc_first:
                self._pc_first = False
                before = self._server_answer(m.PARSE_COMPLETE, b"", _PARSE_COMPLETE)
                for notice in self._queued:
                    raw_notice = m.message(m.NOTICE_RESPONSE, notice)
                    before += self._server_answer(m.NOTICE_RESPONSE, notice, raw_notice)
                self._queued.clear()
            released, self._released = self._released, None
            if released is not None:
                # (the held error, as the server sent it, then this ReadyForQuery)
                before += self._server_answer(m.ERROR_RESPONSE, released, b"")
            return before + self._server_answer(typ, body, raw)
        return self._server_answer(typ, body, raw)

    _pc_first = False  # a held ParseComplete goes before the server message at hand

    def _server_answer(self, typ: int, body: bytes, raw: bytes) -> bytes:
        """A server message on its way to the client (the unnamed statement's in flight
        done: see _server_message)."""
        log = self.statements
        assert log is not None
        absorb = self._absorb
        if absorb is not None and typ not in _ASYNC:
            if log.head() is absorb[0]:
                self._absorb = None
                if typ == m.PARSE_COMPLETE:
                    return b""  # the text given to the server's unnamed statement again
                if self._unnamed_lost is None and self._unnamed is None:
                    self._unnamed_lost = absorb[1]  # (it failed: the server has none)
            elif typ == m.READY_FOR_QUERY and log.head() is log.tail():
                # the last Sync in flight answered and it never came: the server skipped it
                self._absorb = None
                if self._unnamed_lost is None and self._unnamed is None:
                    self._unnamed_lost = absorb[1]
        if typ == m.ERROR_RESPONSE and self._ours_quoted in body:
            body = self._unnamed_error(body)
            raw = m.message(typ, body)
        executions = self._executions
        if executions and log.head() is executions[0].entry:
            answer = self._execution_answer(executions[0], typ, body)
            if answer is None:
                return b""
            if answer is not body:
                body = answer
                raw = m.message(typ, body)
            released, self._released = self._released, None
            if released is not None:
                # (the held error first, as the server sent it, then this ReadyForQuery)
                before = self._server_message(m.ERROR_RESPONSE, released, b"")
                return before + self._server_message(typ, body, raw)
        if typ == m.ERROR_RESPONSE or typ == m.NOTICE_RESPONSE:
            if typ == m.ERROR_RESPONSE and _DENY_WRITE_BYTES in body:
                # (before the log records the outcome: the refusal's SQLSTATE)
                body = self._deny_write(body) or body
            cause = log.cause(typ)  # before the log moves past what failed
            log.server_message(typ, body)
            if log.lost is not None or log.refuted is not None:
                raise SessionEnded(ending(log) or "")
            return self._error(typ, body, cause)
        log.server_message(typ, body)
        if log.lost is not None or log.refuted is not None:
            raise SessionEnded(ending(log) or "")
        if typ == m.READY_FOR_QUERY and self._copies and not log.in_flight:
            self._copies = 0  # nothing in flight: no COPY reads the client's messages
        if typ == m.NOTIFICATION_RESPONSE:
            return self._notification(body)
        if typ == m.ROW_DESCRIPTION:
            self._check_row_description(body)
        elif typ == m.PARAMETER_STATUS:
            self.check_parameter(*async_.parameter_status(body))
        elif typ == m.READY_FOR_QUERY:
            self._ready(body)
        return raw

    def check_parameter(self, name: str, value: str) -> None:
        if name == "session_authorization" and value != self.login:
            raise SessionEnded(
                "pgveil: the session's role changed; masked sessions may not switch role"
            )
        if name == "client_encoding" and value.upper() != "UTF8":
            raise SessionEnded("pgveil: masked sessions must use client_encoding UTF8")
        if name == "standard_conforming_strings" and value != "on":
            raise SessionEnded("pgveil: masked sessions need standard_conforming_strings on")

    def _error(self, typ: int, body: bytes, cause: Cause | None) -> bytes:
        fields = errors.decode_fields(body)
        if typ == m.ERROR_RESPONSE:
            code = fields.get("C", "")
            cls = code[:2] if len(code) == 5 else "unknown"
            self.error_classes[cls] = self.error_classes.get(cls, 0) + 1
        if typ == m.NOTICE_RESPONSE and fields.get("V", fields.get("S", "")) in _SERVER_LOG:
            # DEBUG and LOG messages echo statements as the server received them: pgveil's
            # rewritten text, with the hash mask's key pads in it. Masked roles get none.
            self.counters.notices_withheld += 1
            return b""
        if typ == m.ERROR_RESPONSE and self._refusals:
            # only the error of the refused statement is its answer (a notice may quote it)
            refusal = self._refusal(body)
            if refusal is not None:
                return refusal
        source = cause.source if cause is not None else None
        if source is not None and source.probe is not None and typ == m.ERROR_RESPONSE:
            # the answer to a syntax probe (see the module docstring): the server's own
            # syntax error, or the Parse it parsed whole (nothing ran)
            self._refusals.pop(source.probe, None)
            if fields.get("C") == "42601" and fields.get("M") == _MULTIPLE_COMMANDS:
                return errors.error_response("42501", f"pgveil: {PARSED_ONLY_BY_SERVER}")
        if "P" in fields:
            position = _client_position(fields["P"], source)
            if position is None:
                del fields["P"]
            else:
                fields["P"] = position
        context = fields.get("W", "")
        if "PL/pgSQL" in context or "at RAISE" in context:
            # the text was composed by server-side code (a trigger's RAISE, say): any value
            # may stand in it unquoted, so none of it is shown
            fields = {k: v for k, v in fields.items() if k in "SVCP"}
            fields["M"] = "pgveil: a message raised by server-side code is withheld"
        scrubbed: dict[str, str] = {}
        judge = _Judge(self.ctx, cause)
        # the client's text from the error's position on (a syntax error quotes the token
        # there)
        at = None
        if source is not None and fields.get("P", "").isdigit():
            at = source.sql[int(fields["P"]) - 1 :]
        for code, value in fields.items():
            if code not in _KEEP_FIELDS:
                continue
            if code == "M":
                value = judge.scrub(value, at)
            elif code == "H":
                value = judge.scrub(value)
            scrubbed[code] = value
        if "D" in fields:
            shown = judge.detail(fields["D"])
            scrubbed["D"] = (
                shown if shown is not None else "pgveil: detail withheld from masked roles"
            )
        return errors.encode_fields(typ, scrubbed)

    def _deny_write(self, body: bytes) -> bytes | None:
        """The error of pgveil's guard on a write into a deny column (see
        rules.writes.Rewriter.deny_guard), as pgveil's refusal naming the column (an
        ErrorResponse body); None when the message names no deny column of the rules (a
        statement can spell the marker itself: its error then stays the server's, scrubbed
        like any other)."""
        fields = errors.decode_fields(body)
        found = _DENY_WRITE.search(fields.get("M", ""))
        if found is None or fields.get("C") != "22P02":  # (invalid_text_representation)
            return None
        table, _, column = found.group(1).rpartition(".")
        schema, _, name = table.partition(".")
        protected = self.ctx.pmap.by_name.get((schema, name))
        if protected is None or protected.rule_table != table:
            return None
        spec = protected.masks.get(column)
        if spec is None or spec.name != "deny":
            return None
        reason = (
            f"column {table}.{column} is not available to masked roles; only NULL can be "
            "written to it"
        )
        self.counters.refused += 1
        self.counters.refusal_reasons.append(reason)
        return errors.error_body("42501", f"pgveil: {reason}")

    def login_messages(self, data: bytes) -> bytes:
        """The server's answers between AuthenticationOk and the login's ReadyForQuery
        (whole messages, held until the login was classified), as a masked session may see
        them: notices scrubbed like any other, the rest as they are."""
        out = bytearray()
        for typ, body, start, end in whole_messages(data):
            if typ == m.NOTICE_RESPONSE:
                out += self._error(typ, body, None)
            else:
                out += data[start:end]
        return bytes(out)

    def _notification(self, body: bytes) -> bytes:
        pid, raw_channel, raw_payload = async_.notification(body)
        channel = raw_channel.decode("utf-8", "replace")
        payload = raw_payload.decode("utf-8", "replace")
        masked = self.ctx.notification_payload(channel, payload)
        self._notified(body, "withheld" if masked is None else "masked")
        if masked is None:
            self.counters.notifications_withheld += 1
            return b""
        return async_.notification_response(pid, raw_channel, masked.encode())

    def _check_row_description(self, body: bytes) -> None:
        for table_oid, attnum in rows.column_origins(body):
            if table_oid and self.ctx.pmap.personal_column(table_oid, attnum) is not None:
                self.counters.exit_check_violations += 1
                raise SessionEnded(
                    "pgveil: a result would have carried an unmasked personal column; "
                    "the session is closed"
                )


# the end of every prepared execution: the unnamed portal described and run to completion,
# then Sync (a Query's implicit transaction, which drops the portal at its end)
_EXECUTE_UNNAMED = extended.describe(b"P", b"") + extended.execute(b"") + m.message(m.SYNC)
# ... in a transaction block, where the portal would outlive it: closed (a Query leaves no
# portal behind)
_EXECUTE_UNNAMED_CLOSED = (
    extended.describe(b"P", b"")
    + extended.execute(b"")
    + extended.close(b"P", b"")
    + m.message(m.SYNC)
)


def _names_reserved(effects: Effects) -> bool:
    """Whether a statement's PREPARE, EXECUTE or DEALLOCATE names one of pgveil's."""
    for statement in effects:
        for kind, name in statement:
            if kind in ("prepare", "execute", "deallocate") and name.startswith(PREPARED_PREFIX):
                return True
    return False


def _unprepared_position(position: str, where: tuple[tuple[int, int, int], ...]) -> str:
    """An error position (1-based, characters) in a prepared text, moved to the rewritten
    text it was made from (each parameter `$k` there is a literal here; a position inside
    one points at its literal's start)."""
    if not position.isdigit():
        return position
    index = int(position) - 1
    shift = 0
    for start, token, literal in where:
        if index < start:
            break
        if index < start + token:
            return str(start + shift + 1)
        shift += literal - token
    return str(index + shift + 1)


def _no_event(fields: dict[str, object]) -> None:
    """Where a masked session's completed statements go while it is not audited."""


def ending(log: StatementLog) -> str | None:
    """The FATAL message of a session whose statement log says it cannot go on (None: it
    can): the answers can no longer be paired with what was sent, or they proved that a
    message already sent runs what may not run under the current context (see
    StatementLog.refuted)."""
    if log.lost is not None:
        return lost_pairing(log.lost)
    if log.refuted is not None:
        return (
            "pgveil: a statement already sent turned out to run what was prepared under "
            "masking rules that no longer apply; the session is closed"
        )
    return None


def _refused_statement(body: bytes) -> bool:
    """Whether an error answering a Bind of one of pgveil's statements may be the server
    refusing the statement itself, before anything ran: it changed since it was prepared
    (0A000), it is gone (26000), or analysing it again failed (class 42: a relation,
    column or privilege gone)."""
    code = errors.decode_fields(body).get("C", "")
    return code in _OUTDATED or code.startswith("42")


def lost_pairing(reason: str) -> str:
    """The FATAL message of a session whose answers the statement log can no longer pair
    with what was sent (error scrubbing and the audit depend on the pairing)."""
    return (
        "pgveil: the server's answers can no longer be paired with the statements sent "
        f"({reason}); the session is closed"
    )


_DOUBLE_QUOTED = re.compile(r'"[^"]*"')


def _stray_quote(text: str) -> int | None:
    """Where the quotes of a message stop pairing up: the first `"` when there is an odd
    number of them, or the first `'` outside double-quoted runs when there is an odd number
    of those (an apostrophe inside `"it's"` is part of that value)."""
    if text.count('"') % 2:
        return text.index('"')
    outside = [m.start() for m in re.finditer("'", _DOUBLE_QUOTED.sub(_blank, text))]
    return outside[0] if len(outside) % 2 else None


def _blank(match: re.Match[str]) -> str:
    return " " * len(match.group(0))


def _client_position(position: str, source: Source | None) -> str | None:
    """An error's position (P: 1-based, in characters) in the text the client sent, None
    when it has none there. The server counts in the text it got: a syntax probe's begins
    with the probe; a rewritten statement's is pgveil's text, which is the client's only in
    the part both begin with and the part both end with (`WHERE ...` after a masked table,
    say): a position there is moved to the client's text, any other is dropped (it would
    point into text the client never sent)."""
    if source is None or (source.probe is None and source.sent is None):
        return position
    if not position.isdigit() or int(position) < 1:
        return None
    index = int(position) - 1  # 0-based
    if source.probe is not None:
        index -= _PROBE_LENGTH
        return str(index + 1) if index >= 0 else None
    sent, sql = source.sent or "", source.sql
    if index >= len(sent):
        return None
    if sent[: index + 1] == sql[: index + 1]:
        return position
    back = len(sent) - index  # characters from there to the end
    if back <= len(sql) and sent[index:] == sql[len(sql) - back :]:
        return str(len(sql) - back + 1)
    return None


# the form of the scanner's errors: a fixed text, then the token where it failed
_AT_OR_NEAR = re.compile(r'^([^"\']*) at or near "(.*)"\Z', re.DOTALL)
_NAME = '"[^"]*"'  # where the server quotes the name of a relation, column or constraint
# Messages and hints whose every quoted part is such a name (the server's formats: a
# constraint violated, a column suggested): shown as they are. Anchored at both ends: any
# other text in them does not match.
_NAMED = tuple(
    re.compile("^" + form.format(n=_NAME) + r"\Z")
    for form in (
        r"duplicate key value violates unique constraint {n}",
        r"conflicting key value violates exclusion constraint {n}",
        r"insert or update on table {n} violates foreign key constraint {n}",
        r"update or delete on table {n} violates foreign key constraint {n} on table {n}",
        r"new row for relation {n} violates check constraint {n}",
        r"new row for relation {n} violates partition constraint",
        r"null value in column {n} of relation {n} violates not-null constraint",
        r"no partition of relation {n} found for row",
        r"new row violates check option for view {n}",
        r"new row violates row-level security policy for table {n}",
        r"new row violates row-level security policy {n} for table {n}",
        r"value for domain [^\"\s]+ violates check constraint {n}",
        r"could not create unique index {n}",
        r"currval of sequence {n} is not yet defined in this session",
        r"nextval: reached (?:maximum|minimum) value of sequence {n} \(-?\d+\)",
        r"Perhaps you meant to reference the column {n}\.",
        r"Perhaps you meant to reference the column {n} or the column {n}\.",
        r"Perhaps you meant to reference the table alias {n}\.",
        r"There is a column named {n} in table {n}, but it cannot be referenced from this "
        r"part of the query\.",
        r"There is an entry for table {n}, but it cannot be referenced from this part of the "
        r"query\.",
    )
)
# Details that name a key and its values. The columns (the key's definition, from the
# catalog) come first and end at the first `)=(`, so no value can shift into them; the
# values are masked whole (the stored row's key, or the new row's, which may equal a stored
# one: never shown, even where the statement spelled it out).
_KEY_DETAIL = re.compile(
    r'^Key \((.*?)\)=\((.*)\) (already exists|is not present in table "[^"]*"|'
    r'is still referenced from table "[^"]*"|is duplicated)\.\Z',
    re.DOTALL,
)
_PARTITION_DETAIL = re.compile(
    r"^Partition key of the failing row contains \((.*?)\) = \((.*)\)\.\Z", re.DOTALL
)
_KEYLESS_DETAIL = re.compile(r'^Key is (not present in|still referenced from) table "[^"]*"\.\Z')


class _Judge:
    """Which quoted values of one error or notice are shown: the empty string, names of the
    catalog, and what the statement that caused the message spelled out: its literals'
    values, its parameter values and its names. Everything else quoted is masked with the
    default partial mask. The statement's words are read only when a quoted value needs
    them.

    A syntax error (`... at or near "TOKEN"`) whose position in the client's text is where
    that text reads TOKEN quotes the client's own text: it is shown as it is. The answer to
    a syntax probe (see the module docstring) comes from the server's parser, which reads
    nothing but the text: what it quotes of that text is shown as it is."""

    __slots__ = ("_cause", "_ctx", "_identifiers", "_text", "_words")

    def __init__(self, ctx: MaskingContext, cause: Cause | None) -> None:
        self._ctx = ctx
        self._identifiers = ctx.identifiers
        self._cause = cause
        self._words: Words | None = None if cause is not None else NO_WORDS
        probed = cause is not None and cause.source.probe is not None
        self._text = cause.source.sql if cause is not None and probed else None

    def scrub(self, text: str, at: str | None = None) -> str:
        """`text` as the client may see it; `at`: the client's text from the message's
        position on, when it has one there."""
        if at is not None:
            near = _AT_OR_NEAR.match(text)
            if near is not None and at.startswith(near.group(2)):
                return text
        if '"' in text and any(form.match(text) for form in _NAMED):
            return text  # every quoted part is a name (see _NAMED)
        # `...: "VALUE"` at the end (input syntax errors): VALUE may itself hold quotes,
        # so it is judged whole rather than split at them
        tail = _TRAILING_VALUE.match(text)
        if tail is not None:
            head, inner = tail.group(1), tail.group(2)
            return self._pairs(head) + '"' + self._judge(inner) + '"'
        return self._pairs(text)

    def _pairs(self, text: str) -> str:
        """Quoted runs judged one by one. A quote left without its pair means the pairing
        cannot be trusted (a quote inside a value shifts every pair after it, `E'\''`):
        from the first quote of a kind that occurs an odd number of times, or the first
        stray one, the text is masked whole."""
        cut = _stray_quote(text)
        if cut is not None:
            return self._pairs(text[:cut]) + (py_mask(_PARTIAL, text[cut:], _TEXT, {}) or "")
        out: list[str] = []
        pos = 0
        for match in _QUOTED.finditer(text):
            gap = text[pos : match.start()]
            if "'" in gap or '"' in gap:
                break
            out.append(gap)
            out.append(self._quoted(match))
            pos = match.end()
        rest = text[pos:]
        if "'" in rest or '"' in rest:
            # unbalanced from here: nothing after the first stray quote is shown as is
            cut = min(i for i in (rest.find("'"), rest.find('"')) if i >= 0)
            out.append(rest[:cut])
            out.append(py_mask(_PARTIAL, rest[cut:], _TEXT, {}) or "")
        else:
            out.append(rest)
        return "".join(out)

    def _quoted(self, match: re.Match[str]) -> str:
        inner = match.group(1) if match.group(1) is not None else match.group(2)
        quote = '"' if match.group(1) is not None else "'"
        return quote + self._judge(inner) + quote

    def detail(self, text: str) -> str | None:
        """A DETAIL as the client may see it: a key violated (its columns, its values
        masked), or None: a detail is withheld (a failing row, say, holds any value)."""
        if _KEYLESS_DETAIL.match(text):
            return text
        key = _KEY_DETAIL.match(text)
        if key is not None:
            columns, values, end = key.groups()
            return f"Key ({self.scrub(columns)})=({_masked(values)}) {end}."
        partition = _PARTITION_DETAIL.match(text)
        if partition is not None:
            columns, values = partition.groups()
            shown = _masked(values)
            return f"Partition key of the failing row contains ({self.scrub(columns)}) = ({shown})."
        return None

    def _judge(self, inner: str) -> str:
        if not inner or inner in self._identifiers:
            return inner
        if self._text is not None and inner in self._text:
            return inner  # (a syntax probe's answer: see the class docstring)
        words = self._words if self._words is not None else self._read()
        if inner in words.values or inner in words.names:
            return inner
        if "." in inner and self._qualified(inner.split("."), words.names):
            return inner
        return py_mask(_PARTIAL, inner, _TEXT, {}) or ""

    def _qualified(self, parts: list[str], names: frozenset[str]) -> bool:
        """A qualified name the server prints: made of the statement's names, a name of the
        statement then a column (`c.name`: an alias), or a path in the catalog
        (`billing.customers`, `customers.name`, `billing.customers.name`). Not any dotted
        run of catalog names: a role that may create tables named `198`, `51`, ... must not
        make every address an error echoes readable."""
        if all(part in names for part in parts[:-1]):
            return parts[-1] in names or parts[-1] in self._identifiers
        relations = self._ctx.catalog.relations
        if len(parts) == 3:
            found = relations.get((parts[0], parts[1]))
            return found is not None and any(c.name == parts[2] for c in found.columns)
        if len(parts) != 2:
            return False
        first, second = parts
        return (first, second) in relations or any(
            name == first and any(c.name == second for c in relation.columns)
            for (_schema, name), relation in relations.items()
        )

    def _read(self) -> Words:
        cause = self._cause
        assert cause is not None
        self._words = NO_WORDS
        source = cause.source
        statements = statement_words(source.sql)
        if source.sent is not None and len(statement_words(source.sent)) != len(statements):
            # the rewrite would not pair statement for statement with the server's answers
            return NO_WORDS
        if cause.index >= len(statements):
            return NO_WORDS
        words = statements[cause.index]
        if cause.bind is not None:
            try:
                parameters = extended.bind_parameters(cause.bind, source.types)
            except m.MALFORMED:
                parameters = []  # a Bind the server refuses as malformed shows nothing of it
            words = Words(words.values | frozenset(parameters), words.names)
        self._words = words
        return words


class RecordingFilter(StatementFilter):
    """An unmasked session's statements, analysed only to be recorded: which protected
    tables each one touches (through views too) goes to the audit stream with its outcome,
    and so does each NotificationResponse on a channel with rules; every byte is forwarded
    unchanged (a message split across reads is forwarded once it is whole). The one
    exception: while the audit stream cannot take events, statements on personal data are
    refused, as for masked roles."""

    def __init__(self, ctx: MaskingContext | ContextHolder, hook: AuditHook) -> None:
        super().__init__(ctx)
        self.attach_audit(hook)

    raw_columns = True

    def forwards_unchanged(self) -> bool:
        """True while nothing would be changed on the wire: no statement can be refused
        (the audit stream takes events) and no refusal is on its way back. The engine then
        forwards chunks as they are and only shows the messages to `observe_*`."""
        return not self._refusals and (self.audit is None or self.audit.ready())

    def login_parameters(self, reported: dict[str, str]) -> None:
        """What the server reported at login (ParameterStatus): the client encoding and
        standard_conforming_strings statements are read under until they change, and what
        RESET and DISCARD ALL bring them back to."""
        assert self.statements is not None
        self.statements.reading = ReadingTracker(reported)

    def _text(self, raw: bytes) -> str | None:
        # as the server reads it: under the client encoding and standard_conforming_strings
        # predicted for this message (see proxy/session/reading.py)
        tracker = self.statements.reading if self.statements is not None else None
        if tracker is None:
            return super()._text(raw)
        if raw.isascii() and b"\\" not in raw:
            self._sensitive = 0  # the common case: it reads alike under every reading
            return raw.decode("ascii")
        self._sensitive = sensitivity(raw)
        return statement_text(raw, tracker.now())

    def _function_call(self, raw: bytes) -> bytes:
        # the function and its arguments are not analysed: recorded as an access that
        # may have read anything, and refused while the audit stream is down
        fields = _unanalysed("function_call", "FunctionCall", audit_kinds.FUNCTION_CALL)
        if self._audit_down():
            if self.statements is not None:
                self.statements.function_call()  # (answered by the refusal's error)
            return simple.query(self._refuse_unrecorded(fields))
        if self.statements is not None:
            self.statements.function_call(fields)
        return raw

    def _undecodable(self, typ: int, name: bytes, original: bytes) -> bytes:
        """Not text in the session's encoding: recorded as an access that may have read
        anything, and refused while the audit stream is down."""
        fields = _unanalysed(
            "unknown", "(not readable in the client encoding)", audit_kinds.UNREADABLE
        )
        if self._audit_down():
            refusal = self._refuse_unrecorded(fields)
            if self.statements is not None:
                if typ == m.QUERY:
                    self.statements.query(None)
                else:
                    self.statements.parse(name, None, None, ())
            if typ == m.QUERY:
                return simple.query(refusal)
            return extended.parse(name, refusal)
        if self.statements is not None:
            # what it does to names cannot be known either
            if typ == m.QUERY:
                self.statements.query(fields, None, None, sensitive=self._sensitive)
            else:
                self.statements.parse(name, fields, None, None, sensitive=self._sensitive)
        return original

    def observe_client(self, typ: int, body: bytes) -> None:
        # the chunk is forwarded as it is: a statement cannot be refused any more, even if
        # the audit stream failed while this chunk was being read; its event is queued
        self._observing = True
        try:
            self._client_message(typ, body, b"")
        finally:
            self._observing = False

    def observe_server(self, typ: int, body: bytes) -> None:
        # _server_message, with nothing to return: the chunk goes on as it is
        if self.statements is not None:
            self.statements.server_message(typ, body)
        if typ == _READY_FOR_QUERY:
            self._ready(body)
        elif typ == m.NOTIFICATION_RESPONSE:
            self._notified(body, "passed")
        elif typ in (_ERROR_RESPONSE, _PARAMETER_STATUS):
            if self.observer is not None:
                self.observer(typ, body)
            if typ == _ERROR_RESPONSE and self._refusals:
                self._refusal(body)  # a refusal read mid-message: its token is spent

    def _analyse(self, sql: str) -> tuple[Decision, str, str | None]:
        d = self.ctx.analyze(sql, audit_only=True)
        if d.temp_relations:
            self.temp_relations.update(d.temp_relations)  # (a superset: if it runs)
        if d.action == "refuse" and d.kinds == ("set",) and _lone_set(sql):
            # a SET masked roles may not make (standard_conforming_strings, the role...):
            # the analysis stopped at it, but it reads nothing; an unmasked session may
            d = dataclasses.replace(d, action="pass", reason=None)
        return d, "pass", None


def _lone_set(sql: str) -> bool:
    """Whether the text is one SET statement (its values are constants: it reads nothing)."""
    try:
        stmts = pglast.parse_sql(sql)
    except pglast.parser.ParseError:
        return False
    return len(stmts) == 1 and isinstance(stmts[0].stmt, pglast.ast.VariableSetStmt)


def _unanalysed(kind: str, text: str, reason: str) -> dict[str, object]:
    """The audit fields of an unmasked statement pgveil cannot analyse."""
    return {
        "kinds": [kind],
        "statement": text,
        "fingerprint": audit_fingerprint(text),
        "tables": [],
        "columns_masked": [],
        "columns_raw": [],
        "decision": "passed",
        "analysis_complete": False,
        "uncertain": reason,
    }
