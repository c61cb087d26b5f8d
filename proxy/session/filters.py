"""The session filters: what the engine does with the bytes of a READY session.

One filter per classification, chosen once when the login is classified
(`Session.login_classified`), so the engine itself has no mode branches:

* `PassThrough`: unmasked sessions that are not audited (and every session when no rules
  are configured). Chunks are forwarded as they came; the scanners track message
  boundaries only, and the few messages the engine must see (Terminate, ErrorResponse,
  ParameterStatus) are captured. The hot path: one scanner feed per chunk, the shared
  `JUST_FORWARD` answer, no per-message work.
* `Recording`: unmasked sessions with auditing. Statements are analysed to be recorded
  only (`RecordingFilter`); every byte goes on unchanged, except that while the audit
  stream takes no events, statements on personal data are refused.
* `Masking`: masked sessions (`MaskedFilter`): statements rewritten or refused, errors
  scrubbed, the exit check on RowDescription.

A filter answers with actions (proxy/session/actions.py). It signals the end of a session
by raising: `ProtocolViolation` (the engine answers 08P01) or `SessionEnded` (the engine
ends the session with a FATAL 42501). Both are caught once, in the engine.

This module must not import asyncio or socket, and must not log or store message bodies
beyond what a decision needs; bodies may hold personal data.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Final, Protocol

from proxy.session.actions import (
    FORWARD,
    JUST_FORWARD,
    NOTHING,
    Action,
    AwaitCatalog,
    SendToClient,
    SendToServer,
)
from proxy.session.masked import (
    AuditHook,
    MaskedCounters,
    MaskedFilter,
    RecordingFilter,
    SessionEnded,
    StatementFilter,
    ending,
    lost_pairing,
)
from proxy.session.statements import StatementLog
from proxy.wire import messages as m
from proxy.wire.framing import MessageScanner, capture_mask
from rules.context import ContextHolder, MaskingContext

# In READY the engine looks at these frontend messages only; the rest are counted, skipped.
# Requests are counted by the scanner, not captured, so the common chunk yields no list.
CLIENT_CAPTURE: Final = capture_mask(bytes((m.TERMINATE,)))
# ReadyForQuery is not captured: its status byte is read in place (see PassThrough).
SERVER_CAPTURE: Final = capture_mask(bytes((m.ERROR_RESPONSE, m.PARAMETER_STATUS)))
# Audited unmasked sessions: every message that gets an answer of its own, to pair
# statements with their outcomes (proxy/session/statements.py).
# CopyDone and CopyFail too: a Sync sent before them may be swallowed by COPY FROM STDIN.
CLIENT_CAPTURE_RECORDED: Final = capture_mask(b"XQPBDESCFcf")
# Masked sessions: every frontend message but CopyData is looked at before it is forwarded.
CLIENT_CAPTURE_MASKED: Final = capture_mask(bytes(t for t in m.FRONTEND_NAMES if t != m.COPY_DATA))
# ParameterDescription ('t'): the parameter types that tell how binary parameters read as text
# (an error may echo the client's own parameter: proxy/session/masked.py)
SERVER_CAPTURE_MASKED: Final = capture_mask(b"ENATSZCIsn123Gt")
# NotificationResponse ('A'): its delivery on a channel with rules is an access;
# NoticeResponse ('N'): a notice may carry values (a RAISE NOTICE in a DO block, say)
SERVER_CAPTURE_RECORDED: Final = capture_mask(b"ESTZCIsn123GAN")
# while a statement on personal data is in flight, DataRows too: their subject column
SERVER_CAPTURE_MASKED_ROWS: Final = capture_mask(b"ENATSZCIsn123GtD")
SERVER_CAPTURE_RECORDED_ROWS: Final = capture_mask(b"ESTZCIsn123GAND")
_Z: Final = m.READY_FOR_QUERY
_D: Final = m.DATA_ROW
_COPY_DATA: Final = m.COPY_DATA
_TERMINATE: Final = m.TERMINATE
TX_UNKNOWN: Final = 0
"""tx_status when a ReadyForQuery was followed by more messages in the same chunk (e.g. a
NotificationResponse): not known until the next chunk that ends with one. Never idle."""


class Host(Protocol):
    """What a filter may touch of the engine it runs in."""

    tx_status: int
    resent_requests: int  # Queries the filter sent the server again (see `pending`)

    def client_terminated(self, last: Action) -> Sequence[Action]:
        """The client sent Terminate: `last` carries it on; the session closes after it."""
        ...

    def observe_server(self, typ: int, body: bytes) -> None:
        """A server message the engine keeps counts or settings of (ErrorResponse,
        ParameterStatus)."""
        ...


class Filter(Protocol):
    """What the engine calls in the READY phase. See the module docstring."""

    @property
    def counters(self) -> MaskedCounters | None:
        """A masked session's statement counters (metrics); None for the others."""
        ...

    @property
    def holding(self) -> bool:
        """Part of a message is held back (the session is not at a boundary)."""
        ...

    @property
    def awaiting_catalog(self) -> bool:
        """The client's stream waits for a catalog read (see AwaitCatalog)."""
        ...

    def begin(self) -> None:
        """The session enters READY with this filter: set what the scanners capture."""
        ...

    def login_messages(self, data: bytes) -> bytes:
        """The server's held answers of the login (whole messages), as the client gets them."""
        ...

    def client_data(self, data: bytes) -> Sequence[Action]: ...

    def server_data(self, data: bytes) -> Sequence[Action]: ...

    def catalog_awaited(self) -> Sequence[Action]:
        """The wait of an AwaitCatalog ended: decide the statement it held."""
        ...

    def ended(self, reason: str) -> None:
        """The connection is gone: what is in flight is recorded, outcome unknown."""
        ...


class PassThrough:
    """Unmasked and unaudited: every chunk goes on as it came. See the module docstring."""

    __slots__ = ("_client", "_host", "_server")

    counters: Final = None
    holding: Final = False
    awaiting_catalog: Final = False

    def __init__(self, host: Host, client: MessageScanner, server: MessageScanner) -> None:
        self._host = host
        self._client = client
        self._server = server

    def begin(self) -> None:
        self._server.capture = SERVER_CAPTURE
        self._client.capture = CLIENT_CAPTURE

    def login_messages(self, data: bytes) -> bytes:
        return data

    def client_data(self, data: bytes) -> Sequence[Action]:
        if self._client.feed(data):  # only Terminate is captured
            return self._host.client_terminated(FORWARD)
        return JUST_FORWARD

    def server_data(self, data: bytes) -> Sequence[Action]:
        server = self._server
        counts = server.counts
        ready_before = counts[_Z]
        captured = server.feed(data)
        if captured:
            observe = self._host.observe_server
            for typ, body in captured:
                observe(typ, body)
        if counts[_Z] != ready_before:
            # Almost every response chunk ends with ReadyForQuery; then its status is the
            # chunk's last byte, and copying the message out would be waste.
            if server.last_type == _Z and server.at_boundary:
                self._host.tx_status = data[-1]
            else:
                self._host.tx_status = TX_UNKNOWN
        return JUST_FORWARD

    def catalog_awaited(self) -> Sequence[Action]:
        return NOTHING

    def ended(self, reason: str) -> None:
        pass


class _Analysing:
    """What the recording and masking filters share: a statement filter spliced into both
    directions, and the statement log's row counting (see `_count_rows`)."""

    _f: StatementFilter
    _capture: bytearray  # the server capture while no statement wants its rows
    _capture_rows: bytearray  # ... while one does

    def __init__(self, host: Host, client: MessageScanner, server: MessageScanner) -> None:
        self._host = host
        self._client = client
        self._server = server

    counters: MaskedCounters | None = None

    @property
    def holding(self) -> bool:
        return self._f.holding

    @property
    def awaiting_catalog(self) -> bool:
        return self._f.awaiting is not None

    def login_messages(self, data: bytes) -> bytes:
        return data

    def catalog_awaited(self) -> Sequence[Action]:
        return NOTHING

    def ended(self, reason: str) -> None:
        if self._f.statements is not None:
            self._f.statements.abandon(reason)

    def _row_capture(self) -> None:
        """Capture DataRows only while a statement on personal data is in flight."""
        log = self._f.statements
        if log is not None and log.rows_in_flight:
            self._server.capture = self._capture_rows
        elif self._server.capture is self._capture_rows:
            self._server.capture = self._capture

    def _count_rows(self) -> None:
        """The statement log counts every DataRow and CopyData the server sends, captured
        or not: the scanner marks how many came before each message it captures (see
        MessageScanner.marks), and the log gives them to the statement at the head."""
        log = self._f.statements
        if log is not None:
            self._server.marks = []
            log.rows_to(self._rows_seen())

    def _rows_seen(self) -> int:
        counts = self._server.counts
        return counts[_D] + counts[_COPY_DATA]

    def _released_rows(self, log: StatementLog | None, before: int) -> None:
        """After a server chunk: if it carried rows and a statement is still running, its
        rows go out before it completes (see StatementLog.rows_released)."""
        if log is not None and log.in_flight:
            # (with nothing in flight the chunk ended with the answers: no row after them)
            seen = self._rows_seen()
            if seen != before:
                log.rows_to(seen)  # (those after the chunk's last captured message)
                log.rows_released()


class Recording(_Analysing):
    """Unmasked with auditing: statements recorded, bytes unchanged (see RecordingFilter)."""

    _capture = SERVER_CAPTURE_RECORDED
    _capture_rows = SERVER_CAPTURE_RECORDED_ROWS

    def __init__(
        self,
        host: Host,
        client: MessageScanner,
        server: MessageScanner,
        ctx: MaskingContext | ContextHolder,
        audit: AuditHook,
        parameters: Mapping[str, str],
    ) -> None:
        super().__init__(host, client, server)
        self._f = self._r = RecordingFilter(ctx, audit)
        self._r.observer = host.observe_server
        # what the server reported at login (startup options, role and database settings
        # included): what statements are read under until it changes
        self._r.login_parameters(dict(parameters))

    @property
    def statement_filter(self) -> RecordingFilter:
        return self._r

    def begin(self) -> None:
        self._server.capture = SERVER_CAPTURE_RECORDED
        self._client.capture = CLIENT_CAPTURE_RECORDED
        self._count_rows()
        if self._r.statements is not None:
            self._server.rows = []  # a result's rows reach the log as slices (see _chunk)

    def client_data(self, data: bytes) -> Sequence[Action]:
        recorder = self._r
        client = self._client
        if not recorder.holding and (recorder.forwards_unchanged() or not client.can_locate):
            # nothing can be refused now: look at the messages, forward the chunk
            observe = recorder.observe_client
            for typ, body in client.feed(data):
                observe(typ, body)
            self._row_capture()
            # (a Terminate is the last thing a client sends: it ends the chunk)
            if client.last_type == _TERMINATE:
                return self._host.client_terminated(FORWARD)
            return JUST_FORWARD
        out = recorder.client(client, data)
        if client.last_type == _TERMINATE and not recorder.holding:
            return self._host.client_terminated(SendToServer(out))
        self._row_capture()
        return (SendToServer(out),) if out else NOTHING

    def server_data(self, data: bytes) -> Sequence[Action]:
        recorder = self._r
        before = self._rows_seen()
        log = recorder.statements
        actions = self._chunk(recorder, data)
        if log is not None and log.lost is not None:
            # what the chunk answers cannot be paired with a statement: it goes nowhere
            raise SessionEnded(lost_pairing(log.lost))
        self._released_rows(log, before)
        return actions

    def _chunk(self, recorder: RecordingFilter, data: bytes) -> Sequence[Action]:
        server = self._server
        if not recorder.holding and (recorder.forwards_unchanged() or not server.can_locate):
            # no refusal to turn into 42501: look at the messages, forward the chunk
            captured = server.feed(data)
            log = recorder.statements
            observe = recorder.observe_server
            marks = server.marks
            if log is None:
                for typ, body in captured:
                    observe(typ, body)
            else:
                # the DataRows the scanner captured are in its row sink, not in `captured`:
                # those before each message go to the statement log in one slice
                rows = server.rows
                assert rows is not None
                done = 0
                mark = 0
                told = log.rows_total
                for (typ, body), upto in zip(captured, server.row_ends, strict=True):
                    if upto != done:
                        log.data_rows(rows[done:upto])
                        done = upto
                    if marks is not None and typ != _COPY_DATA:
                        total = marks[mark]
                        mark += 1
                        if total != told:
                            log.rows_to(total)  # the rows sent before this message
                            told = total
                    observe(typ, body)
                if done != len(rows):
                    log.data_rows(rows[done:] if done else rows)
            if recorder.tx_status is not None:
                self._host.tx_status = recorder.tx_status
            self._row_capture()
            return JUST_FORWARD
        out = recorder.server(server, data)
        if recorder.tx_status is not None:
            self._host.tx_status = recorder.tx_status
        self._row_capture()
        return (SendToClient(out),) if out else NOTHING


class Masking(_Analysing):
    """Masked: statements rewritten or refused, answers scrubbed (see MaskedFilter)."""

    _capture = SERVER_CAPTURE_MASKED
    _capture_rows = SERVER_CAPTURE_MASKED_ROWS

    def __init__(
        self,
        host: Host,
        client: MessageScanner,
        server: MessageScanner,
        ctx: MaskingContext | ContextHolder,
        login: str,
        error_classes: dict[str, int],
        audit: AuditHook | None,
        parameters: Mapping[str, str],
        prepares: bool = True,
    ) -> None:
        """Raises SessionEnded when a parameter the server reported at login is one a
        masked session may not run under (see MaskedFilter.check_parameter)."""
        super().__init__(host, client, server)
        self._f = self._m = MaskedFilter(ctx, login, error_classes, prepares)
        self._m.waits = True  # the shell carries out AwaitCatalog
        if audit is not None:
            self._m.attach_audit(audit)
        for name, value in parameters.items():
            self._m.check_parameter(name, value)
        self.counters = self._m.counters

    @property
    def statement_filter(self) -> MaskedFilter:
        return self._m

    def begin(self) -> None:
        self._server.capture = SERVER_CAPTURE_MASKED
        self._client.capture = CLIENT_CAPTURE_MASKED
        self._count_rows()

    def login_messages(self, data: bytes) -> bytes:
        return self._m.login_messages(data)

    def client_data(self, data: bytes) -> Sequence[Action]:
        return self._client_out(self._m.client(self._client, data))

    def catalog_awaited(self) -> Sequence[Action]:
        return self._client_out(self._m.resume(self._client))

    def _client_out(self, out: bytes) -> Sequence[Action]:
        """What the masked filter made of the client's bytes: sent on, with a wait for a
        catalog read when the stream just stopped at a statement (see AwaitCatalog)."""
        masked = self._m
        read = masked.take_wait()
        if read is not None:
            first = (SendToServer(out),) if out else ()
            return (*first, AwaitCatalog(masked.holder, read))
        if self._client.last_type == _TERMINATE and not masked.holding:
            return self._host.client_terminated(SendToServer(out))
        self._row_capture()
        return (SendToServer(out),) if out else NOTHING

    def server_data(self, data: bytes) -> Sequence[Action]:
        masked = self._m
        before = self._rows_seen()
        out = masked.server(self._server, data)
        log = masked.statements
        if log is not None and (log.lost is not None or log.refuted is not None):
            # (what the chunk answers goes nowhere)
            raise SessionEnded(ending(log) or "")
        if masked.tx_status is not None:
            self._host.tx_status = masked.tx_status
        self._row_capture()
        self._released_rows(log, before)
        again = masked.take_resend()
        if again:
            # a Query sent again (an outdated prepared statement): one more request
            self._host.resent_requests = masked.resent
            return (SendToClient(out), SendToServer(again)) if out else (SendToServer(again),)
        return (SendToClient(out),) if out else NOTHING
