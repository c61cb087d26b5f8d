"""The per-connection protocol engine: events in, actions out, no sockets.

One `Session` follows one client connection and its upstream connection through the
protocol phases (startup, TLS, upstream connect, authentication, classification, ready,
closing). The shell (`proxy.server`) feeds it the bytes it reads and the things that happen
to the transports, and carries out the actions it returns, in order.

Nothing before authentication: with masking rules the login is gated. The client may send
only whole password messages until the server has authenticated it; the server's answers
after AuthenticationOk are held until its ReadyForQuery, when the engine asks the shell to
classify the login (ClassifyLogin) and then refuses it or installs the session's filter
and releases them (login_classified). Whatever the server says before that, a failed
authentication or a missing database, reaches the client as the server said it.

In the READY phase the engine hands every chunk to its one filter (proxy/session/filters.py:
pass-through, recording or masking), chosen once when the login is classified; the engine
has no mode branches. It catches what ends a session (a protocol violation, SessionEnded)
and checks a draining session for idleness in one place each. The hot path is the
pass-through filter: the scanners only track message boundaries and it answers with the
shared `FORWARD` action, meaning "write the chunk you gave me to the other side unchanged".
Nothing is decoded unless it is a message the engine must look at (ReadyForQuery,
ErrorResponse, ParameterStatus, ...).

This module must not import asyncio or socket, and must not log or store message bodies
beyond what a decision needs; bodies may hold personal data.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Final

from proxy.session.actions import (
    FORWARD,
    JUST_FORWARD,
    NOTHING,
    Action,
    AwaitCatalog,
    ClassifyLogin,
    CloseSession,
    ConnectUpstream,
    Forward,
    RecordSessionStart,
    SendCancel,
    SendToClient,
    SendToServer,
    StartClientTLS,
)
from proxy.session.filters import TX_UNKNOWN, Filter, Masking, PassThrough, Recording
from proxy.session.masked import AuditHook, SessionEnded
from proxy.wire import async_, errors, simple, startup
from proxy.wire import messages as m
from proxy.wire.framing import (
    MessageScanner,
    StartupReader,
    capture_mask,
    header,
    holds_a_message,
)
from rules.context import ContextHolder, MaskingContext

__all__ = [
    "FORWARD",
    "JUST_FORWARD",
    "TX_UNKNOWN",
    "UNCLASSIFIED",
    "Action",
    "AwaitCatalog",
    "ClassifyLogin",
    "CloseSession",
    "ConnectUpstream",
    "Forward",
    "Phase",
    "RecordSessionStart",
    "SendCancel",
    "SendToClient",
    "SendToServer",
    "Session",
    "SessionInfo",
    "SessionSettings",
    "StartClientTLS",
]

# --- state -----------------------------------------------------------------------------------


class Phase(enum.Enum):
    STARTUP = "startup"  # reading SSLRequest / GSSENCRequest / StartupMessage / CancelRequest
    CONNECTING = "connecting"  # upstream connection being opened
    AUTHENTICATING = "authenticating"  # relaying the authentication exchange
    # authenticated; the server's answers held until the shell has classified the login
    CLASSIFYING = "classifying"
    READY = "ready"  # normal operation
    # a rules reload classifies the login otherwise: the session ends at the server's next
    # message boundary, nothing more is forwarded (see Session.reclassified)
    ENDING = "ending"
    CLOSED = "closed"


_READY: Final = Phase.READY  # a module global: one lookup fewer on the hot path
FRONTEND_TYPES: Final = capture_mask(bytes(m.FRONTEND_NAMES))
_CLIENT_CAPTURE_AUTH: Final = capture_mask(bytes((m.TERMINATE, m.PASSWORD_MESSAGE)))
_TOO_MUCH_BEFORE_LOGIN: Final = "pgveil: too much data sent before the login completed"
_CAPTURE_ALL: Final = capture_mask(everything=True)
# After one of these the client may still be assembling an extended-protocol request.
_REQUEST_OPEN: Final = frozenset((m.PARSE, m.BIND, m.EXECUTE, m.DESCRIBE, m.CLOSE, m.FLUSH))
_SERVER_MESSAGE_LIMIT: Final = 1 << 30
# Authentication messages after which the server reads no response (the others ask for one)
_AUTH_NO_RESPONSE: Final = frozenset((m.AUTH_OK, m.AUTH_SASL_FINAL))
UNCLASSIFIED: Final = "pgveil: cannot classify this session as masked or unmasked; see pgveil's log"


@dataclass(slots=True)
class SessionSettings:
    tls_available: bool = False
    max_message_size: int = 128 * 1024 * 1024
    # masked sessions: rewritten SELECTs go as statements prepared once per connection
    # (proxy/session/masked.py)
    masked_prepare: bool = True
    # Asked when the StartupMessage arrives: None admits the session, (sqlstate, message)
    # refuses it with that FATAL. Asking then, not at accept time, means a port probe that
    # never logs in does not take a slot.
    admit: Callable[[], tuple[str, str] | None] = lambda: None
    # Asked when the StartupMessage arrives: True when logins must be classified (masking
    # rules are configured). The login is then gated: see Session.login_classified.
    classify: Callable[[], bool] = lambda: False


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
        # Queries a masked filter sent the server again (an outdated prepared statement of
        # its own): each is answered by one more ReadyForQuery
        self.resent_requests = 0
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
        # what the READY phase does with the bytes: chosen once, when the login is
        # classified (login_classified); pass-through until then, and for good when no
        # rules are configured (proxy/session/filters.py)
        self.filter: Filter = PassThrough(self, self._client, self._server)
        self._on_client = self.filter.client_data  # (one attribute lookup per chunk)
        self._on_server = self.filter.server_data
        self._startup_params: list[tuple[str, str]] = []
        # A gated login (rules are configured): the client may send only whole password
        # messages until the server has authenticated it; from AuthenticationOk on, the
        # server's answers are held until the shell has classified the login. Login bytes
        # are framed here, not by the scanners, which start fresh once the session is READY.
        self.gated = False
        self._server_tail = b""  # an incomplete server message of the login
        self._client_tail = b""  # an incomplete client message of the login
        self._client_held: bytearray | None = None  # client bytes from a non-password on
        self._to_the_server = False  # a non-password answered an auth request: the server ends it
        self._login_held = bytearray()  # the server's answers after AuthenticationOk
        self._after_login = bytearray()  # server bytes after the login's ReadyForQuery
        self._login_ready = False  # the login's ReadyForQuery arrived (held)
        self._login_failed = False  # the server ended the login with a FATAL
        # authentication messages that ask the client for a response (passwords answer
        # them: client_counts[PASSWORD_MESSAGE] counts those forwarded)
        self._auth_requests = 0

    # ---- client -> proxy ---------------------------------------------------------------

    def client_data(self, data: bytes) -> Sequence[Action]:
        phase = self.phase
        if phase is _READY:
            try:
                return self._on_client(data)
            except m.ProtocolViolation as exc:
                return self._fatal_to_client("08P01", str(exc))
        if phase is Phase.AUTHENTICATING and not self.gated:
            try:
                captured = self._client.feed(data)
            except m.ProtocolViolation as exc:
                return self._fatal_to_client("08P01", str(exc))
            return self._client_messages(captured) if captured else JUST_FORWARD
        if phase is Phase.AUTHENTICATING or phase is Phase.CLASSIFYING:
            return self._login_client_data(data)  # a gated login
        if phase is Phase.STARTUP:
            return self._startup_data(data)
        if phase is Phase.CONNECTING:
            if self.gated:
                if len(self._early_client_data) + len(data) > self.settings.max_message_size:
                    return self._fatal_to_client("08P01", _TOO_MUCH_BEFORE_LOGIN)
            else:
                try:
                    self._client.feed(data)
                except m.ProtocolViolation as exc:
                    return self._fatal_to_client("08P01", str(exc))
            self._early_client_data += data
            return NOTHING
        return NOTHING

    def catalog_awaited(self) -> Sequence[Action]:
        """The wait of an AwaitCatalog ended (the read is in, or the time is up): the
        statement it held is decided now, and what the client sent after it goes on."""
        if self.phase is not _READY:
            return NOTHING
        try:
            return self.filter.catalog_awaited()
        except m.ProtocolViolation as exc:
            return self._fatal_to_client("08P01", str(exc))

    @property
    def awaiting_catalog(self) -> bool:
        """The client's stream waits for a catalog read (its reading stays paused)."""
        return self.filter.awaiting_catalog

    def client_terminated(self, last: Action) -> Sequence[Action]:
        """A filter's Terminate (see filters.Host): `last` carries it on, then the close."""
        self.phase = Phase.CLOSED
        return (last, CloseSession("client terminated"))

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
        return JUST_FORWARD

    def _login_client_data(self, data: bytes) -> Sequence[Action]:
        """The client during a gated login: whole password messages (and Terminate) go to
        the server; from the first other message on, everything is held until the login
        is classified (see login_classified). After AuthenticationOk nothing goes on: the
        server reads no more passwords. A message other than a password while the server
        waits for one ends the login (the server would end it too)."""
        if self._to_the_server:
            return (SendToServer(data),)  # the server is ending the login (see below)
        held = self._client_held
        if held is not None:
            held += data
            if len(held) > self.settings.max_message_size:
                return self._refuse_login("08P01", _TOO_MUCH_BEFORE_LOGIN)
            return NOTHING
        buf = self._client_tail + data if self._client_tail else data
        n = len(buf)
        pos = 0
        out = bytearray()
        terminate = False
        limit = self.settings.max_message_size
        while pos < n:
            typ = buf[pos]
            if not FRONTEND_TYPES[typ]:
                return self._refuse_login("08P01", f"invalid message type 0x{typ:02x}")
            if (typ != m.PASSWORD_MESSAGE and typ != m.TERMINATE) or (
                self.phase is Phase.CLASSIFYING
            ):
                if self._awaiting_password():
                    # the server reads this message as the answer to its request and ends
                    # the login with its own error (it reads no further than the message
                    # type): passed on, so the client gets the server's answer, not one that
                    # would tell it pgveil masks
                    self._client_tail = b""
                    self._to_the_server = True
                    out += buf[pos:]
                    return (SendToServer(bytes(out)),)
                self._client_held = bytearray(buf[pos:])
                pos = n
                if len(self._client_held) > limit:
                    return self._refuse_login("08P01", _TOO_MUCH_BEFORE_LOGIN)
                break
            if n - pos < 5:
                break
            length = header(buf, pos)[1]
            if length < 4 or length > limit:
                return self._refuse_login("08P01", f"invalid message length {length}")
            end = pos + 1 + length
            if end > n:
                break
            self.client_counts[typ] += 1
            if typ == m.TERMINATE:
                terminate = True
            else:
                refusal = self._check_sasl_initial_response(buf[pos + 5 : end])
                if refusal is not None:
                    return refusal
            out += buf[pos:end]
            pos = end
            if terminate:
                break
        self._client_tail = buf[pos:]
        if terminate:
            self.phase = Phase.CLOSED
            return (SendToServer(bytes(out)), CloseSession("client terminated"))
        return (SendToServer(bytes(out)),) if out else NOTHING

    def _awaiting_password(self) -> bool:
        """Whether the server waits for an authentication response not yet forwarded."""
        return self._auth_requests > self.client_counts[m.PASSWORD_MESSAGE]

    def _startup_data(self, data: bytes) -> Sequence[Action]:
        try:
            packet, rest = self._startup.feed(data)
            if packet is None:
                return NOTHING
            request = startup.decode_startup_packet(packet)
        except m.ProtocolViolation as exc:
            return self._fatal_to_client("08P01", str(exc))
        if isinstance(request, startup.SSLRequest | startup.GSSENCRequest):
            if rest:
                # Bytes after the request would be read as if they came over TLS
                # (CVE-2021-23214 in the server); refuse them like the server does.
                return self._fatal_to_client("08P01", "received unencrypted data after SSL request")
            if (
                isinstance(request, startup.SSLRequest)
                and self.settings.tls_available
                and not self.info.client_tls
            ):
                self.info.client_tls = True
                return (SendToClient(b"S"), StartClientTLS())
            return (SendToClient(b"N"),)
        if isinstance(request, startup.CancelRequest):
            self.phase = Phase.CLOSED
            self.close_reason = "cancel request"
            return (SendCancel(packet),)  # the shell closes the client after the server
        assert isinstance(request, startup.StartupMessage)
        params = request.parameters
        self._startup_params = startup.startup_parameters(packet)
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
        self.gated = self.settings.classify()
        self.phase = Phase.CONNECTING
        actions: list[Action] = [ConnectUpstream(packet)]
        if rest:
            more = self.client_data(rest)
            if any(isinstance(a, CloseSession) for a in more):
                return more
        return actions

    def client_closed(self) -> Sequence[Action]:
        if self.phase is Phase.CLOSED:
            return NOTHING
        was_ready = self.phase in (
            Phase.READY, Phase.ENDING, Phase.AUTHENTICATING, Phase.CLASSIFYING
        )  # fmt: skip
        self.phase = Phase.CLOSED
        if was_ready and self._client.at_boundary:
            return (SendToServer(simple.TERMINATE_MESSAGE), CloseSession("client closed"))
        return (CloseSession("client closed"),)

    # ---- upstream ----------------------------------------------------------------------

    def upstream_connected(
        self, *, tls: bool = False, same_certificate: bool = False
    ) -> Sequence[Action]:
        """The startup packet has been sent upstream; relay what the client sent meanwhile.

        `tls`: the upstream leg is encrypted. `same_certificate`: the server presented the
        very certificate pgveil presents to clients, so SCRAM channel binding
        (tls-server-end-point, a hash of that certificate) verifies end to end.
        """
        if self.phase is not Phase.CONNECTING:
            return NOTHING
        self._upstream_tls = tls
        self._same_certificate = same_certificate
        self.phase = Phase.AUTHENTICATING
        if self._early_client_data:
            data = bytes(self._early_client_data)
            self._early_client_data.clear()
            if self.gated:
                return self._login_client_data(data)
            return (SendToServer(data),)
        return NOTHING

    def login_classified(
        self,
        masked: MaskingContext | ContextHolder | None,
        recorded: MaskingContext | ContextHolder | None = None,
        audit: AuditHook | None = None,
    ) -> Sequence[Action]:
        """The shell classified the login (after ClassifyLogin): `masked` is the context of
        a masked role, else None; `recorded` the context an unmasked session's statements
        are recorded with (auditing), else None; `audit` the hook events go to.

        A masked login whose startup parameters set what a masked session may not (see
        MaskingContext.startup_refusal) is refused, and so is an analysed one (masked or
        recorded) that sent a whole message other than a password before the login
        completed; any other gets its filter, the server's held answers, and what the
        client sent meanwhile (a message it only began goes through the filter)."""
        if self.phase is not Phase.CLASSIFYING or self._login_failed or not self._login_ready:
            return NOTHING
        actions: list[Action] = [RecordSessionStart()]
        if audit is None:
            recorded = None  # nothing to record to
        analysed = masked is not None or recorded is not None
        if masked is not None:
            refusal = ContextHolder.of(masked).context.startup_refusal(self._startup_params)
            if refusal is not None:
                return [*actions, *self._refuse_login("42501", f"pgveil: {refusal}")]
        client = self._client_tail + bytes(self._client_held or b"")
        self._client_tail = b""
        self._client_held = None
        if analysed and holds_a_message(client):
            # a statement the client sent before the login completed: analysed sessions
            # must wait for it (a message only begun may go on: it reaches the filter)
            who = "masked" if masked is not None else "audited"
            text = f"pgveil: {who} sessions may not send statements before login"
            return [*actions, *self._refuse_login("08P01", text)]
        # the one place the classification is looked at: the filter it gets
        chosen: Filter
        if masked is not None:
            login = self.info.parameters.get("session_authorization") or self.info.user
            try:
                chosen = Masking(
                    self, self._client, self._server, masked, login, self.error_classes,
                    audit, self.info.parameters, self.settings.masked_prepare,
                )  # fmt: skip
            except SessionEnded as exc:
                return [*actions, *self._session_ended(str(exc))]
        elif recorded is not None:
            assert audit is not None
            chosen = Recording(
                self, self._client, self._server, recorded, audit, self.info.parameters
            )
        else:
            chosen = self.filter  # pass-through
        self.filter = chosen
        self._on_client = chosen.client_data
        self._on_server = chosen.server_data
        chosen.begin()
        self.phase = Phase.READY
        held = chosen.login_messages(bytes(self._login_held))
        self._login_held.clear()
        actions.append(SendToClient(held))
        after = bytes(self._after_login)
        self._after_login.clear()
        if after:
            actions += self._replayed(self.server_data(after), after, to_client=True)
        if client and self.phase is Phase.READY:
            # held, so never seen by the server: it goes through the session as if sent now
            actions += self._replayed(self.client_data(client), client, to_client=False)
        if self.phase is Phase.READY and self.draining and self.is_idle():
            actions += self._terminate_for_shutdown()
        return actions

    def login_refused(self, message: str) -> Sequence[Action]:
        """The rules refuse this login (they do not match the database, say): `message`
        names the rule, never a value, and the server has authenticated the client, so it
        may say why."""
        if self.phase is not Phase.CLASSIFYING or self._login_failed:
            return NOTHING
        return [RecordSessionStart(), *self._refuse_login("42501", message)]

    def login_unclassifiable(self) -> Sequence[Action]:
        """The login could not be classified (the reason went to the shell's log): refuse
        it with one message that says nothing about why, rather than guess."""
        if self.phase is not Phase.CLASSIFYING or self._login_failed:
            return NOTHING
        return self._refuse_login("42501", UNCLASSIFIED)

    @staticmethod
    def _replayed(actions: Sequence[Action], data: bytes, *, to_client: bool) -> list[Action]:
        """Actions for bytes the engine fed itself: FORWARD names them explicitly."""
        out: list[Action] = []
        for a in actions:
            if a is FORWARD:
                out.append(SendToClient(data) if to_client else SendToServer(data))
            else:
                out.append(a)
        return out

    def upstream_failed(self, reason: str) -> Sequence[Action]:
        if self.phase is Phase.CLOSED:
            return NOTHING
        return self._fatal_to_client("08006", f"pgveil could not connect to the server: {reason}")

    def server_data(self, data: bytes) -> Sequence[Action]:
        if self.phase is _READY:
            try:
                actions = self._on_server(data)
            except m.ProtocolViolation as exc:
                return self._fatal_to_client("08P01", f"invalid message from server: {exc}")
            except SessionEnded as ended:  # (a name of its own: compiled, a name has one type)
                return self._session_ended(str(ended))
            if self.draining and self.is_idle():
                return (*actions, *self._terminate_for_shutdown())
            return actions
        if self.phase is Phase.AUTHENTICATING or self.phase is Phase.CLASSIFYING:
            return self._login_server_data(data)
        if self.phase is Phase.ENDING:
            return self._ending_server_data(data)
        return NOTHING

    def _ending_server_data(self, data: bytes) -> Sequence[Action]:
        """The server's bytes while the session ends (see `reclassified`): the rest of the
        message under way goes to the client as it would have, then the FATAL; what the
        server sent after that message is dropped."""
        cut = self._server.boundary_in(data)
        head = data if cut is None else data[:cut]
        self.phase = _READY
        actions = self._replayed(self.server_data(head), head, to_client=True) if head else []
        if self.phase is not _READY:
            return actions  # ended otherwise meanwhile (the server's FATAL, a violation)
        if cut is None:
            self.phase = Phase.ENDING
            return actions
        return actions + self._end_reclassified()

    def reclassified(self, text: str) -> Sequence[Action]:
        """A rules reload classifies this session's login otherwise than at its start
        (masked <-> unmasked): it ends with a FATAL 57P01 carrying `text`. At once when the
        client is at a boundary of the server's messages; otherwise the message that has
        begun reaching it is completed first. Nothing the client sends from now on is
        forwarded: its statements would run under the classification that no longer holds."""
        if self.phase is not _READY:
            return NOTHING
        self.close_reason = text
        if self._server.at_boundary:
            return self._end_reclassified()
        self.phase = Phase.ENDING
        return NOTHING

    def _end_reclassified(self) -> list[Action]:
        text = self.close_reason
        actions: list[Action] = []
        if self._client.at_boundary:
            # else the server holds part of a client message: Terminate would be read as
            # its rest; closing the connection ends that backend just as well
            actions.append(SendToServer(simple.TERMINATE_MESSAGE))
        self.phase = Phase.CLOSED
        actions.append(SendToClient(errors.error_response("57P01", text, severity="FATAL")))
        actions.append(CloseSession(text))
        return actions

    def _session_ended(self, text: str) -> Sequence[Action]:
        """A filter ended the session (SessionEnded): a FATAL 42501 carrying `text`."""
        self.phase = Phase.CLOSED
        self.close_reason = text
        return (
            SendToServer(simple.TERMINATE_MESSAGE),
            SendToClient(errors.error_response("42501", text, severity="FATAL")),
            CloseSession(text),
        )

    def observe_server(self, typ: int, body: bytes) -> None:
        """Counts and settings from a server message (see filters.Host)."""
        if typ == m.ERROR_RESPONSE:
            self._count_error(body)
        elif typ == m.PARAMETER_STATUS:
            name, value = async_.parameter_status(body)
            self.info.parameters[name] = value

    def _count_error(self, body: bytes) -> None:
        code = errors.sqlstate_of(body)
        cls = code[:2] if len(code) == 5 else "unknown"
        self.error_classes[cls] = self.error_classes.get(cls, 0) + 1
        self._last_server_fatal = errors.severity_of(body) in ("FATAL", "PANIC")

    def _login_server_data(self, data: bytes) -> Sequence[Action]:
        """The server during the login, message by message up to its ReadyForQuery (bytes
        after it wait for the READY phase). A gated login's answers after
        AuthenticationOk are held until it is classified (login_classified), unless the
        server ends the login itself: then they go on as they are, its own answer."""
        buf = self._server_tail + data if self._server_tail else data
        n = len(buf)
        pos = 0
        out = bytearray()
        actions: list[Action] = []
        while n - pos >= 5:
            typ, length = header(buf, pos)
            if length < 4 or length > _SERVER_MESSAGE_LIMIT:
                return self._fatal_to_client(
                    "08P01", f"invalid message from server: invalid message length {length}"
                )
            end = pos + 1 + length
            if end > n:
                break
            raw = buf[pos:end]
            pos = end
            if self._login_ready:
                self._after_login += raw  # for the session, once it is classified
                continue
            self.server_counts[typ] += 1
            body = raw[5:]
            if typ == m.AUTHENTICATION:
                code = startup.auth_code(body)
                if code == m.AUTH_SASL and not self._channel_binding_passes():
                    # Channel binding ties SCRAM to the server certificate of the TLS
                    # session it runs in; the client's session is with pgveil, so a
                    # '-PLUS' exchange can only verify when both present the same
                    # certificate.
                    self._sasl_offered = True
                    offered = startup.sasl_mechanisms(body)
                    mechanisms = [x for x in offered if not x.endswith("-PLUS")]
                    raw = startup.authentication_sasl(mechanisms)
                if code not in _AUTH_NO_RESPONSE:
                    self._auth_requests += 1
                    if self._client_held is not None and self._awaiting_password():
                        # the server reads the held message as the response and ends the
                        # login with its own error: it goes on, after the request
                        held = bytes(self._client_held)
                        self._client_held = None
                        self._to_the_server = True
                        actions.append(SendToServer(held))
                if code == m.AUTH_OK and self.gated:
                    out += raw
                    self.phase = Phase.CLASSIFYING
                    continue
            elif typ == m.BACKEND_KEY_DATA:
                self.info.backend_pid = startup.backend_key_data(body)[0]
            elif typ == m.PARAMETER_STATUS:
                name, value = async_.parameter_status(body)
                self.info.parameters[name] = value
            elif typ == m.ERROR_RESPONSE:
                self._count_error(body)
                if self._last_server_fatal and self.phase is Phase.CLASSIFYING:
                    # the server refused the login after authenticating it (no such
                    # database, a setting it rejects...): its own answer goes out as is
                    self._login_failed = True
                    out += self._login_held
                    self._login_held.clear()
            elif typ == m.READY_FOR_QUERY:
                self.tx_status = simple.tx_status(body)
                if self.gated:
                    if self.phase is not Phase.CLASSIFYING or self._login_failed:
                        # never released unclassified: a gated login starts only here
                        return self._fatal_to_client(
                            "08P01", "invalid message from server: ReadyForQuery before login"
                        )
                    self._login_held += raw
                    self._login_ready = True
                    user = self.info.parameters.get("session_authorization") or self.info.user
                    actions.append(ClassifyLogin(user))
                    continue
                # not gated: the session starts now
                out += raw
                self.phase = Phase.READY
                self.filter.begin()  # pass-through: not gated, never classified
                rest = buf[pos:]
                self._server_tail = b""
                done: list[Action] = [RecordSessionStart(), SendToClient(bytes(out))]
                if rest:
                    done += self._replayed(self.server_data(rest), rest, to_client=True)
                if self.phase is Phase.READY and self.draining and self.is_idle():
                    done += self._terminate_for_shutdown()
                return done
            if self.phase is Phase.CLASSIFYING and not self._login_failed:
                self._login_held += raw
            else:
                out += raw
        self._server_tail = buf[pos:]
        if out:
            actions.insert(0, SendToClient(bytes(out)))
        return actions

    def _channel_binding_passes(self) -> bool:
        return not self._upstream_tls or self._same_certificate or not self.info.client_tls

    def _check_sasl_initial_response(self, body: bytes) -> Sequence[Action] | None:
        """Refuse, with a message that says what to do, a SCRAM exchange that the server
        would reject as a channel-binding downgrade."""
        if not self._sasl_offered or self.phase is not Phase.AUTHENTICATING:
            return None
        self._sasl_offered = False
        mechanism, response = startup.sasl_initial_response(body)
        # the client-first-message starts with the gs2 flag: "y" asks for channel binding
        if mechanism.startswith(b"SCRAM-SHA-256") and response[:2] == b"y,":
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
            return NOTHING
        phase = self.phase
        self.phase = Phase.CLOSED
        if phase is Phase.ENDING and self._server.at_boundary and not self._last_server_fatal:
            text = self.close_reason  # the reason it was ending for
            fatal = errors.error_response("57P01", text, severity="FATAL")
            return (SendToClient(fatal), CloseSession(text))
        if (
            phase in (Phase.READY, Phase.AUTHENTICATING, Phase.CLASSIFYING)
            and self._server.at_boundary
            and not self._last_server_fatal
        ):
            err = errors.error_response(
                "08006", "pgveil: the server closed the connection unexpectedly", severity="FATAL"
            )
            return (SendToClient(err), CloseSession("server closed"))
        return (CloseSession("server closed"),)

    def ended(self, reason: str) -> None:
        """The connection is gone (`reason`): the statements still in flight are recorded,
        outcome unknown (see StatementLog.abandon)."""
        self.filter.ended(reason)

    # ---- shutdown ----------------------------------------------------------------------

    @property
    def pending(self) -> int:
        """Requests (Query, Sync, FunctionCall) not yet answered by ReadyForQuery.

        Derived from the scanners' counts, so the hot path does no bookkeeping. The first
        ReadyForQuery ends authentication and answers no request.
        """
        c = self.client_counts
        sent = c[m.QUERY] + c[m.SYNC] + c[m.FUNCTION_CALL] + self.resent_requests
        return max(0, sent - (self.server_counts[m.READY_FOR_QUERY] - 1))

    def is_idle(self) -> bool:
        """No transaction open and no request outstanding: safe to end the session."""
        return (
            self.phase is Phase.READY
            and self.tx_status == m.TX_IDLE
            and self.pending == 0
            and self._client.at_boundary
            and self._server.at_boundary
            and not self.filter.holding
            and self._client.last_type not in _REQUEST_OPEN
        )

    def shutdown_requested(self) -> Sequence[Action]:
        """The proxy is stopping: end now if idle, else after the current transaction."""
        if self.phase is Phase.CLOSED:
            return NOTHING
        self.draining = True
        if self.phase is Phase.READY:
            return self._terminate_for_shutdown() if self.is_idle() else NOTHING
        return self._fatal_to_client("57P01", "terminating connection due to administrator command")

    def shutdown_deadline(self) -> Sequence[Action]:
        """The drain deadline passed: end the session whatever it is doing."""
        if self.phase is Phase.CLOSED:
            return NOTHING
        phase = self.phase
        self.phase = Phase.CLOSED
        actions: list[Action] = []
        if phase is Phase.READY and self._client.at_boundary:
            actions.append(SendToServer(simple.TERMINATE_MESSAGE))
        msg = "terminating connection due to administrator command"
        if self._server.at_boundary:
            actions.append(SendToClient(errors.error_response("57P01", msg, severity="FATAL")))
        actions.append(CloseSession("shutdown deadline"))
        return actions

    def _terminate_for_shutdown(self) -> list[Action]:
        self.phase = Phase.CLOSED
        msg = "terminating connection due to administrator command"
        return [
            SendToServer(simple.TERMINATE_MESSAGE),
            SendToClient(errors.error_response("57P01", msg, severity="FATAL")),
            CloseSession("shutdown"),
        ]

    # ---- helpers -----------------------------------------------------------------------

    def _refuse_login(self, code: str, text: str) -> list[Action]:
        """End a gated login: a FATAL to the client (login bytes reach it as whole
        messages, so it is at a boundary), and Terminate to a server that has completed
        the login (during authentication it is closed without a word, as a client that
        gives up would: the server does not log that)."""
        actions: list[Action] = []
        if self.phase is Phase.CLASSIFYING:
            actions.append(SendToServer(simple.TERMINATE_MESSAGE))
        self.phase = Phase.CLOSED
        self.close_reason = text
        actions.append(SendToClient(errors.error_response(code, text, severity="FATAL")))
        actions.append(CloseSession(text))
        return actions

    def _fatal_to_client(self, code: str, text: str, hint: str | None = None) -> Sequence[Action]:
        self.phase = Phase.CLOSED
        self.close_reason = text
        if not self._server.at_boundary:
            # Part of a server message already reached the client; anything appended now
            # would be read as the rest of it.
            return (CloseSession(text),)
        return (
            SendToClient(errors.error_response(code, text, severity="FATAL", hint=hint)),
            CloseSession(text),
        )
