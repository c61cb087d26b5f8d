"""The per-connection protocol engine: events in, actions out, no sockets.

One `Session` follows one client connection and its upstream connection through the
protocol phases (startup, TLS, upstream connect, authentication, ready, closing). The shell
(`proxy.server`) feeds it the bytes it reads and the things that happen to the transports,
and carries out the actions it returns, in order.

The hot path is `client_data`/`server_data` in the READY phase: the scanners only track
message boundaries and the engine answers with the shared `FORWARD` action, meaning "write
the chunk you gave me to the other side unchanged". Nothing is decoded unless it is a
message the engine must look at (ReadyForQuery, ErrorResponse, ParameterStatus, ...).

This module must not import asyncio or socket, and must not log or store message bodies
beyond what a decision needs; bodies may hold personal data.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Final

from proxy.session.masked import AuditHook, MaskedFilter, RecordingFilter, SessionEnded
from proxy.session.statements import StatementLog
from proxy.wire import messages as m
from proxy.wire.framing import MessageScanner, StartupReader, capture_mask
from rules.context import ContextHolder, MaskingContext

# --- actions (imperative) --------------------------------------------------------------------


class Action:
    __slots__ = ()


@dataclass(frozen=True, slots=True)
class SendToClient(Action):
    data: bytes


@dataclass(frozen=True, slots=True)
class SendToServer(Action):
    data: bytes


class _Forward(Action):
    """Write the chunk just fed to the engine to the other side, unchanged."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "FORWARD"


FORWARD: Final = _Forward()
JUST_FORWARD: Final[tuple[Action, ...]] = (FORWARD,)
"""The answer of the hot path; the shell may test for it by identity."""
_JUST_FORWARD = JUST_FORWARD
_NOTHING: Final[tuple[Action, ...]] = ()


@dataclass(frozen=True, slots=True)
class StartClientTLS(Action):
    """Upgrade the client connection to TLS (after 'S' was written)."""


@dataclass(frozen=True, slots=True)
class ConnectUpstream(Action):
    """Open the upstream connection and send it this startup packet."""

    startup_packet: bytes


@dataclass(frozen=True, slots=True)
class SendCancel(Action):
    """Deliver a CancelRequest to the upstream server on a connection of its own."""

    request: bytes


@dataclass(frozen=True, slots=True)
class CloseSession(Action):
    """Flush what was written, then close both connections."""

    reason: str


class _StatementBeforeLogin(Exception):
    pass


# --- state -----------------------------------------------------------------------------------


class Phase(enum.Enum):
    STARTUP = "startup"  # reading SSLRequest / GSSENCRequest / StartupMessage / CancelRequest
    CONNECTING = "connecting"  # upstream connection being opened
    AUTHENTICATING = "authenticating"  # relaying the authentication exchange
    READY = "ready"  # normal operation
    CLOSED = "closed"


_READY: Final = Phase.READY  # a module global: one lookup fewer on the hot path
FRONTEND_TYPES: Final = capture_mask(bytes(m.FRONTEND_NAMES))
# In READY the engine looks at these frontend messages only; the rest are counted, skipped.
# Requests are counted by the scanner, not captured, so the common chunk yields no list.
_CLIENT_CAPTURE: Final = capture_mask(bytes((m.TERMINATE,)))
# Audited unmasked sessions: every message that gets an answer of its own, to pair
# statements with their outcomes (proxy/session/statements.py).
_CLIENT_CAPTURE_RECORDED: Final = capture_mask(b"XQPBDESCF")
_CLIENT_CAPTURE_AUTH: Final = capture_mask(bytes((m.TERMINATE, m.PASSWORD_MESSAGE)))
# ReadyForQuery is not captured: its status byte is read in place (see server_data).
_SERVER_CAPTURE_READY: Final = capture_mask(bytes((m.ERROR_RESPONSE, m.PARAMETER_STATUS)))
_Z: Final = m.READY_FOR_QUERY
_D: Final = m.DATA_ROW
_COPY_DATA: Final = m.COPY_DATA
TX_UNKNOWN: Final = 0
"""tx_status when a ReadyForQuery was followed by more messages in the same chunk (e.g. a
NotificationResponse): not known until the next chunk that ends with one. Never idle."""
_CAPTURE_ALL: Final = capture_mask(everything=True)
# Masked sessions: every frontend message but CopyData is looked at before it is forwarded.
_CLIENT_CAPTURE_MASKED: Final = capture_mask(bytes(t for t in m.FRONTEND_NAMES if t != m.COPY_DATA))
# ParameterDescription ('t'): the parameter types that tell how binary parameters read as text
# (an error may echo the client's own parameter: proxy/session/masked.py)
_SERVER_CAPTURE_MASKED: Final = capture_mask(b"ENATSZCIsn123Gt")
_SERVER_CAPTURE_RECORDED: Final = capture_mask(b"ESTZCIsn123G")
# while a statement on personal data is in flight, DataRows too: their subject column
_SERVER_CAPTURE_MASKED_ROWS: Final = capture_mask(b"ENATSZCIsn123GtD")
_SERVER_CAPTURE_RECORDED_ROWS: Final = capture_mask(b"ESTZCIsn123GD")
# After one of these the client may still be assembling an extended-protocol request.
_REQUEST_OPEN: Final = frozenset((m.PARSE, m.BIND, m.EXECUTE, m.DESCRIBE, m.CLOSE, m.FLUSH))


@dataclass(slots=True)
class SessionSettings:
    tls_available: bool = False
    max_message_size: int = 128 * 1024 * 1024
    # Asked when the StartupMessage arrives: None admits the session, (sqlstate, message)
    # refuses it with that FATAL. Asking then, not at accept time, means a port probe that
    # never logs in does not take a slot.
    admit: Callable[[], tuple[str, str] | None] = lambda: None


@dataclass(slots=True)
class SessionInfo:
    """What is known about the session; safe to log (no query text, no row data)."""

    user: str = ""
    database: str = ""
    application_name: str = ""
    replication: bool = False
    client_tls: bool = False
    backend_pid: int | None = None
    parameters: dict[str, str] = field(default_factory=dict)


class Session:
    """Protocol engine of one client connection. See the module docstring."""

    def __init__(self, settings: SessionSettings) -> None:
        self.settings = settings
        self.phase = Phase.STARTUP
        self.info = SessionInfo()
        self.client_counts = [0] * 256
        self.server_counts = [0] * 256
        self.error_classes: dict[str, int] = {}
        self.tx_status = m.TX_IDLE
        self.draining = False
        self.close_reason = ""
        self._startup = StartupReader()
        self._client = MessageScanner(
            _CLIENT_CAPTURE_AUTH, self.client_counts, settings.max_message_size, FRONTEND_TYPES
        )
        self._server = MessageScanner(_CAPTURE_ALL, self.server_counts, 1 << 30)
        self._early_client_data = bytearray()  # typed messages sent before upstream is up
        self._last_server_fatal = False
        # Set by upstream_connected: whether SCRAM channel binding can pass through (see there)
        self._upstream_tls = False
        self._same_certificate = False
        self._sasl_offered = False
        self.masked: MaskedFilter | None = None
        # unmasked sessions with auditing: statements are analysed to be recorded only
        self.recorder: RecordingFilter | None = None
        self._startup_params: dict[str, str] = {}

    # ---- client -> proxy ---------------------------------------------------------------

    def client_data(self, data: bytes) -> Sequence[Action]:
        phase = self.phase
        masked = self.masked
        if masked is None:
            recorder = self.recorder
            if recorder is not None and phase is _READY:
                if not recorder.holding and (
                    recorder.forwards_unchanged() or not self._client.can_locate
                ):
                    # nothing can be refused now: look at the messages, forward the chunk
                    try:
                        captured = self._client.feed(data)
                    except m.ProtocolViolation as exc:
                        return self._fatal_to_client("08P01", str(exc))
                    for typ, body in captured:
                        recorder.observe_client(typ, body)
                    self._row_capture(recorder.statements, _SERVER_CAPTURE_RECORDED_ROWS)
                    return self._client_messages(captured) if captured else _JUST_FORWARD
                try:
                    out = recorder.client(self._client, data)
                except m.ProtocolViolation as exc:
                    return self._fatal_to_client("08P01", str(exc))
                if self._client.last_type == m.TERMINATE and not recorder.holding:
                    self.phase = Phase.CLOSED
                    return (SendToServer(out), CloseSession("client terminated"))
                self._row_capture(recorder.statements, _SERVER_CAPTURE_RECORDED_ROWS)
                return (SendToServer(out),) if out else _NOTHING
            if phase is Phase.AUTHENTICATING and recorder is not None:
                return self._masked_login_data(data)  # recorded: statements come after login
            if phase is _READY or phase is Phase.AUTHENTICATING:
                try:
                    captured = self._client.feed(data)
                except m.ProtocolViolation as exc:
                    return self._fatal_to_client("08P01", str(exc))
                if captured:
                    return self._client_messages(captured)
                return _JUST_FORWARD
        elif phase is _READY:
            try:
                out = masked.client(self._client, data)
            except m.ProtocolViolation as exc:
                return self._fatal_to_client("08P01", str(exc))
            if self._client.last_type == m.TERMINATE and not masked.holding:
                self.phase = Phase.CLOSED
                return (SendToServer(out), CloseSession("client terminated"))
            if masked.statements is not None:
                self._row_capture(masked.statements, _SERVER_CAPTURE_MASKED_ROWS)
            return (SendToServer(out),) if out else _NOTHING
        elif phase is Phase.AUTHENTICATING:
            return self._masked_login_data(data)
        if phase is Phase.STARTUP:
            return self._startup_data(data)
        if phase is Phase.CONNECTING:
            try:
                self._client.feed(data)
            except m.ProtocolViolation as exc:
                return self._fatal_to_client("08P01", str(exc))
            self._early_client_data += data
            return _NOTHING
        return _NOTHING

    def _client_messages(self, captured: list[tuple[int, bytes]]) -> Sequence[Action]:
        terminate = False
        for typ, body in captured:
            if typ == m.PASSWORD_MESSAGE:
                refusal = self._check_sasl_initial_response(body)
                if refusal is not None:
                    return refusal
            elif typ == m.TERMINATE:
                terminate = True
        if terminate:
            self.phase = Phase.CLOSED
            return (FORWARD, CloseSession("client terminated"))
        return _JUST_FORWARD

    def _masked_login_data(self, data: bytes) -> Sequence[Action]:
        """A masked client during login: only whole password messages go on. Anything
        incomplete is held back by the splicer, so a message begun now cannot spill, half
        seen, into the statements that follow the login."""
        analysed = self.masked if self.masked is not None else self.recorder
        assert analysed is not None
        passwords: list[bytes] = []
        terminate = False

        def only_passwords(typ: int, body: bytes, raw: bytes) -> bytes:
            nonlocal terminate
            if typ == m.PASSWORD_MESSAGE:
                passwords.append(body)
                return raw
            if typ == m.TERMINATE:
                terminate = True
                return raw
            raise _StatementBeforeLogin

        try:
            out = analysed.login_data(self._client, data, only_passwords)
        except m.ProtocolViolation as exc:
            return self._fatal_to_client("08P01", str(exc))
        except _StatementBeforeLogin:
            return self._fatal_to_client("08P01", self._before_login())
        for body in passwords:
            refusal = self._check_sasl_initial_response(body)
            if refusal is not None:
                return refusal
        if terminate:
            self.phase = Phase.CLOSED
            return (SendToServer(out), CloseSession("client terminated"))
        return (SendToServer(out),) if out else _NOTHING

    def _startup_data(self, data: bytes) -> Sequence[Action]:
        try:
            packet, rest = self._startup.feed(data)
            if packet is None:
                return _NOTHING
            request = m.decode_startup_packet(packet)
        except m.ProtocolViolation as exc:
            return self._fatal_to_client("08P01", str(exc))
        if isinstance(request, m.SSLRequest | m.GSSENCRequest):
            if rest:
                # Bytes after the request would be read as if they came over TLS
                # (CVE-2021-23214 in the server); refuse them like the server does.
                return self._fatal_to_client("08P01", "received unencrypted data after SSL request")
            if (
                isinstance(request, m.SSLRequest)
                and self.settings.tls_available
                and not self.info.client_tls
            ):
                self.info.client_tls = True
                return (SendToClient(b"S"), StartClientTLS())
            return (SendToClient(b"N"),)
        if isinstance(request, m.CancelRequest):
            self.phase = Phase.CLOSED
            return (SendCancel(packet), CloseSession("cancel request"))
        assert isinstance(request, m.StartupMessage)
        params = request.parameters
        self._startup_params = dict(params)
        self.info.user = request.user
        self.info.database = request.database
        self.info.application_name = params.get("application_name", "")
        self.info.replication = params.get("replication", "false").lower() not in (
            "false",
            "off",
            "no",
            "0",
        )
        refusal = self.settings.admit()
        if refusal is not None:
            return self._fatal_to_client(*refusal)
        if self.draining:
            return self._fatal_to_client("57P03", "the database system is shutting down")
        self.phase = Phase.CONNECTING
        actions: list[Action] = [ConnectUpstream(packet)]
        if rest:
            more = self.client_data(rest)
            if any(isinstance(a, CloseSession) for a in more):
                return more
        return actions

    def client_closed(self) -> Sequence[Action]:
        if self.phase is Phase.CLOSED:
            return _NOTHING
        was_ready = self.phase in (Phase.READY, Phase.AUTHENTICATING)
        self.phase = Phase.CLOSED
        if was_ready and self._client.at_boundary:
            return (SendToServer(m.TERMINATE_MESSAGE), CloseSession("client closed"))
        return (CloseSession("client closed"),)

    # ---- upstream ----------------------------------------------------------------------

    def set_masking(self, ctx: MaskingContext | ContextHolder | None) -> Sequence[Action]:
        """The shell classified the login: `ctx` when it is a masked role. Called before
        the upstream connection is opened."""
        if ctx is None or self.phase is Phase.CLOSED:
            return _NOTHING
        refusal = ContextHolder.of(ctx).context.startup_refusal(self._startup_params)
        if refusal is not None:
            return self._fatal_to_client("42501", f"pgveil: {refusal}")
        self.masked = MaskedFilter(ctx, self.info.user, self.error_classes)
        # during login every message is looked at: statements must wait for READY
        self._client.capture = _CAPTURE_ALL
        if self._early_client_data:
            probe = MessageScanner(_CAPTURE_ALL, [0] * 256, self.settings.max_message_size)
            try:
                early = probe.feed(bytes(self._early_client_data))
            except m.ProtocolViolation as exc:
                return self._fatal_to_client("08P01", str(exc))
            if any(t != m.PASSWORD_MESSAGE for t, _ in early) or not probe.at_boundary:
                return self._fatal_to_client(
                    "08P01", "pgveil: masked sessions may not send statements before login"
                )
        return _NOTHING

    def upstream_connected(
        self, *, tls: bool = False, same_certificate: bool = False
    ) -> Sequence[Action]:
        """The startup packet has been sent upstream; relay what the client sent meanwhile.

        `tls`: the upstream leg is encrypted. `same_certificate`: the server presented the
        very certificate pgveil presents to clients, so SCRAM channel binding
        (tls-server-end-point, a hash of that certificate) verifies end to end.
        """
        if self.phase is not Phase.CONNECTING:
            return _NOTHING
        self._upstream_tls = tls
        self._same_certificate = same_certificate
        self.phase = Phase.AUTHENTICATING
        if self._early_client_data:
            data = bytes(self._early_client_data)
            self._early_client_data.clear()
            if self.masked is not None or self.recorder is not None:
                # analysed sessions: only password messages may come before the login
                probe = MessageScanner(_CAPTURE_ALL, [0] * 256, self.settings.max_message_size)
                try:
                    early = probe.feed(data)
                except m.ProtocolViolation as exc:
                    return self._fatal_to_client("08P01", str(exc))
                if any(t != m.PASSWORD_MESSAGE for t, _ in early) or not probe.at_boundary:
                    return self._fatal_to_client("08P01", self._before_login())
            return (SendToServer(data),)
        return _NOTHING

    def _before_login(self) -> str:
        who = "masked" if self.masked is not None else "audited"
        return f"pgveil: {who} sessions may not send statements before login"

    def masking_unavailable(self, reason: str) -> Sequence[Action]:
        """The login could not be classified: refuse rather than guess."""
        if self.phase is Phase.CLOSED:
            return _NOTHING
        return self._fatal_to_client("42501", reason)

    def upstream_failed(self, reason: str) -> Sequence[Action]:
        if self.phase is Phase.CLOSED:
            return _NOTHING
        return self._fatal_to_client("08006", f"pgveil could not connect to the server: {reason}")

    def _row_capture(self, log: StatementLog | None, rows_mask: bytearray) -> None:
        """Capture DataRows only while a statement on personal data is in flight."""
        if log is not None and log.rows_in_flight:
            self._server.capture = rows_mask
        elif self._server.capture is rows_mask:
            self._server.capture = (
                _SERVER_CAPTURE_MASKED if self.masked is not None else _SERVER_CAPTURE_RECORDED
            )

    def record(self, ctx: MaskingContext | ContextHolder, hook: AuditHook) -> None:
        """Audit this unmasked session: its statements are analysed to be recorded."""
        self.recorder = RecordingFilter(ctx, hook)
        self.recorder.observer = self._observe_server
        if self.phase is not _READY:
            # during login every message is looked at: statements must wait for READY
            self._client.capture = _CAPTURE_ALL

    def server_data(self, data: bytes) -> Sequence[Action]:
        if self.phase is _READY:
            if self.masked is not None:
                return self._masked_server_data(data)
            if self.recorder is not None:
                return self._recorded_server_data(data)
        if self.phase is _READY:
            counts = self.server_counts
            ready_before = counts[_Z]
            try:
                captured = self._server.feed(data)
            except m.ProtocolViolation as exc:
                return self._fatal_to_client("08P01", f"invalid message from server: {exc}")
            if captured:
                self._server_messages(captured)
            if counts[_Z] != ready_before:
                # Almost every response chunk ends with ReadyForQuery; then its status is
                # the chunk's last byte, and copying the message out would be waste.
                scanner = self._server
                if scanner.last_type == _Z and scanner.at_boundary:
                    self.tx_status = data[-1]
                else:
                    self.tx_status = TX_UNKNOWN
                if self.draining and self.is_idle():
                    return (FORWARD, *self._terminate_for_shutdown())
            return _JUST_FORWARD
        if self.phase is Phase.AUTHENTICATING:
            return self._authentication_data(data)
        return _NOTHING

    def _masked_server_data(self, data: bytes) -> Sequence[Action]:
        assert self.masked is not None
        before = self._rows_seen()
        try:
            out = self.masked.server(self._server, data)
        except m.ProtocolViolation as exc:
            return self._fatal_to_client("08P01", f"invalid message from server: {exc}")
        except SessionEnded as exc:
            return self._end_masked(str(exc))
        if self.masked.tx_status is not None:
            self.tx_status = self.masked.tx_status
        if self.masked.statements is not None:
            self._row_capture(self.masked.statements, _SERVER_CAPTURE_MASKED_ROWS)
            self._released_rows(self.masked.statements, before)
        actions: list[Action] = [SendToClient(out)] if out else []
        if self.draining and self.is_idle():
            actions += self._terminate_for_shutdown()
        return actions

    def _rows_seen(self) -> int:
        counts = self.server_counts
        return counts[_D] + counts[_COPY_DATA]

    def _released_rows(self, log: StatementLog | None, before: int) -> None:
        """After a server chunk: if it carried rows and a statement is still running, its
        rows go out before it completes (see StatementLog.rows_released)."""
        if log is not None and log.in_flight and self._rows_seen() != before:
            log.rows_released()

    def _recorded_server_data(self, data: bytes) -> Sequence[Action]:
        recorder = self.recorder
        assert recorder is not None
        before = self._rows_seen()
        try:
            return self._recorded_chunk(recorder, data)
        finally:
            self._released_rows(recorder.statements, before)

    def _recorded_chunk(self, recorder: RecordingFilter, data: bytes) -> Sequence[Action]:
        if not recorder.holding and (recorder.forwards_unchanged() or not self._server.can_locate):
            # no refusal to turn into 42501: look at the messages, forward the chunk
            try:
                captured = self._server.feed(data)
            except m.ProtocolViolation as exc:
                return self._fatal_to_client("08P01", f"invalid message from server: {exc}")
            log = recorder.statements
            observe = recorder.observe_server
            rows: list[bytes] = []
            for typ, body in captured:
                if typ == _D and log is not None:
                    rows.append(body)  # the bulk of a result: to its statement in one go
                    continue
                if rows:
                    log.data_rows(rows)  # type: ignore[union-attr]
                    rows = []
                observe(typ, body)
            if rows:
                log.data_rows(rows)  # type: ignore[union-attr]
            if recorder.tx_status is not None:
                self.tx_status = recorder.tx_status
            self._row_capture(recorder.statements, _SERVER_CAPTURE_RECORDED_ROWS)
            if self.draining and self.is_idle():
                return (FORWARD, *self._terminate_for_shutdown())
            return _JUST_FORWARD
        try:
            out = recorder.server(self._server, data)
        except m.ProtocolViolation as exc:
            return self._fatal_to_client("08P01", f"invalid message from server: {exc}")
        if recorder.tx_status is not None:
            self.tx_status = recorder.tx_status
        self._row_capture(recorder.statements, _SERVER_CAPTURE_RECORDED_ROWS)
        actions: list[Action] = [SendToClient(out)] if out else []
        if self.draining and self.is_idle():
            actions += self._terminate_for_shutdown()
        return actions

    def _end_masked(self, text: str) -> Sequence[Action]:
        self.phase = Phase.CLOSED
        self.close_reason = text
        return (
            SendToServer(m.TERMINATE_MESSAGE),
            SendToClient(m.error_response("42501", text, severity="FATAL")),
            CloseSession(text),
        )

    def _server_messages(self, captured: list[tuple[int, bytes]]) -> None:
        for typ, body in captured:
            self._observe_server(typ, body)

    def _observe_server(self, typ: int, body: bytes) -> None:
        if typ == m.ERROR_RESPONSE:
            self._count_error(body)
        elif typ == m.PARAMETER_STATUS:
            name, value = m.parameter_status(body)
            self.info.parameters[name] = value
            if name == "client_encoding" and self.recorder is not None:
                self.recorder.client_encoding(value)

    def _count_error(self, body: bytes) -> None:
        code = m.sqlstate_of(body)
        cls = code[:2] if len(code) == 5 else "unknown"
        self.error_classes[cls] = self.error_classes.get(cls, 0) + 1
        self._last_server_fatal = m.severity_of(body) in ("FATAL", "PANIC")

    def _authentication_data(self, data: bytes) -> Sequence[Action]:
        try:
            captured = self._server.feed(data)
        except m.ProtocolViolation as exc:
            return self._fatal_to_client("08P01", f"invalid message from server: {exc}")
        out = bytearray()
        for typ, body in captured:
            if (
                typ == m.AUTHENTICATION
                and m.auth_code(body) == m.AUTH_SASL
                and not self._channel_binding_passes()
            ):
                # Channel binding ties SCRAM to the server certificate of the TLS session
                # it runs in; the client's session is with pgveil, so a '-PLUS' exchange
                # can only verify when both present the same certificate.
                self._sasl_offered = True
                mechanisms = [x for x in m.sasl_mechanisms(body) if not x.endswith("-PLUS")]
                out += m.authentication_sasl(mechanisms)
                continue
            if typ == m.BACKEND_KEY_DATA:
                self.info.backend_pid = m.backend_key_data(body)[0]
            elif typ == m.PARAMETER_STATUS:
                name, value = m.parameter_status(body)
                self.info.parameters[name] = value
            elif typ == m.ERROR_RESPONSE:
                self._count_error(body)
            elif typ == m.READY_FOR_QUERY:
                self.phase = Phase.READY
                self.tx_status = body[0] if body else m.TX_IDLE
                if self.masked is not None:
                    self._server.capture = _SERVER_CAPTURE_MASKED
                    self._client.capture = _CLIENT_CAPTURE_MASKED
                    try:
                        for name, value in self.info.parameters.items():
                            self.masked.check_parameter(name, value)
                    except SessionEnded as exc:
                        return list(self._end_masked(str(exc)))
                else:
                    self._server.capture = _SERVER_CAPTURE_READY
                    self._client.capture = _CLIENT_CAPTURE
                    if self.recorder is not None:
                        if not self._client.at_boundary:
                            # a message begun during login would be read from its middle:
                            # statements could pass unrecorded
                            return list(
                                self._fatal_to_client(
                                    "08P01", "pgveil: a message spans the end of the login"
                                )
                            )
                        self._client.capture = _CLIENT_CAPTURE_RECORDED
                        self._server.capture = _SERVER_CAPTURE_RECORDED
            out += m.message(typ, body)
        actions: list[Action] = [SendToClient(bytes(out))] if out else []
        if self.phase is Phase.READY and self.draining and self.is_idle():
            actions += self._terminate_for_shutdown()
        return actions

    def _channel_binding_passes(self) -> bool:
        return not self._upstream_tls or self._same_certificate or not self.info.client_tls

    def _check_sasl_initial_response(self, body: bytes) -> Sequence[Action] | None:
        """Refuse, with a message that says what to do, a SCRAM exchange that the server
        would reject as a channel-binding downgrade."""
        if not self._sasl_offered or self.phase is not Phase.AUTHENTICATING:
            return None
        self._sasl_offered = False
        mechanism, _, rest = body.partition(b"\0")
        # rest: Int32 length, then the client-first-message starting with the gs2 flag
        if mechanism.startswith(b"SCRAM-SHA-256") and rest[4:6] == b"y,":
            return self._fatal_to_client(
                "08P01",
                "pgveil cannot relay SCRAM channel binding: the server's TLS certificate "
                "differs from pgveil's",
                hint="Connect with channel_binding=disable, or give pgveil the server's "
                "certificate and key (tls_cert, tls_key).",
            )
        return None

    def server_closed(self) -> Sequence[Action]:
        if self.phase is Phase.CLOSED:
            return _NOTHING
        phase = self.phase
        self.phase = Phase.CLOSED
        if (
            phase in (Phase.READY, Phase.AUTHENTICATING)
            and self._server.at_boundary
            and not self._last_server_fatal
        ):
            err = m.error_response(
                "08006", "pgveil: the server closed the connection unexpectedly", severity="FATAL"
            )
            return (SendToClient(err), CloseSession("server closed"))
        return (CloseSession("server closed"),)

    # ---- shutdown ----------------------------------------------------------------------

    @property
    def pending(self) -> int:
        """Requests (Query, Sync, FunctionCall) not yet answered by ReadyForQuery.

        Derived from the scanners' counts, so the hot path does no bookkeeping. The first
        ReadyForQuery ends authentication and answers no request.
        """
        c = self.client_counts
        sent = c[m.QUERY] + c[m.SYNC] + c[m.FUNCTION_CALL]
        return max(0, sent - (self.server_counts[m.READY_FOR_QUERY] - 1))

    def is_idle(self) -> bool:
        """No transaction open and no request outstanding: safe to end the session."""
        return (
            self.phase is Phase.READY
            and self.tx_status == m.TX_IDLE
            and self.pending == 0
            and self._client.at_boundary
            and self._server.at_boundary
            and (self.masked is None or not self.masked.holding)
            and (self.recorder is None or not self.recorder.holding)
            and self._client.last_type not in _REQUEST_OPEN
        )

    def shutdown_requested(self) -> Sequence[Action]:
        """The proxy is stopping: end now if idle, else after the current transaction."""
        if self.phase is Phase.CLOSED:
            return _NOTHING
        self.draining = True
        if self.phase is Phase.READY:
            return self._terminate_for_shutdown() if self.is_idle() else _NOTHING
        return self._fatal_to_client("57P01", "terminating connection due to administrator command")

    def shutdown_deadline(self) -> Sequence[Action]:
        """The drain deadline passed: end the session whatever it is doing."""
        if self.phase is Phase.CLOSED:
            return _NOTHING
        phase = self.phase
        self.phase = Phase.CLOSED
        actions: list[Action] = []
        if phase is Phase.READY and self._client.at_boundary:
            actions.append(SendToServer(m.TERMINATE_MESSAGE))
        msg = "terminating connection due to administrator command"
        if self._server.at_boundary:
            actions.append(SendToClient(m.error_response("57P01", msg, severity="FATAL")))
        actions.append(CloseSession("shutdown deadline"))
        return actions

    def _terminate_for_shutdown(self) -> list[Action]:
        self.phase = Phase.CLOSED
        msg = "terminating connection due to administrator command"
        return [
            SendToServer(m.TERMINATE_MESSAGE),
            SendToClient(m.error_response("57P01", msg, severity="FATAL")),
            CloseSession("shutdown"),
        ]

    # ---- helpers -----------------------------------------------------------------------

    def _fatal_to_client(self, code: str, text: str, hint: str | None = None) -> Sequence[Action]:
        self.phase = Phase.CLOSED
        self.close_reason = text
        if not self._server.at_boundary:
            # Part of a server message already reached the client; anything appended now
            # would be read as the rest of it.
            return (CloseSession(text),)
        return (
            SendToClient(m.error_response(code, text, severity="FATAL", hint=hint)),
            CloseSession(text),
        )
