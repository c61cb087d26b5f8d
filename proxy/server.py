"""The asyncio shell around the session engine: listening socket, client and upstream
connections, TLS, cancel forwarding, backpressure, limits, graceful shutdown and reload.

This is the only layer that touches sockets, TLS and signals. It holds no protocol logic:
every protocol decision is the `Session` engine's, and which client bytes wait for their
audit events is the audit gate's (audit/gate.py); this module carries out both kinds of
action through one table (HANDLERS, from action class to handler).
It must not log message bodies (they may hold personal data).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import signal
import socket
import ssl
import time
from collections.abc import Callable, Coroutine, Iterable, Sequence
from typing import Any, cast

import asyncpg

from audit.anchors import load_key
from audit.events import new_id
from audit.files import AuditFileError
from audit.gate import Abort, Deliver, GateAction, PauseServer, ResumeServer
from audit.sinks import FileSink, StdoutSink, SyncSink, TableSink
from audit.writer import AuditWriter
from proxy.catalog import UNKNOWN_NAME_WAIT, MaskingManager, RulesMismatch
from proxy.config import ConfigError, ProxyConfig, anchor_file
from proxy.metrics import LiveSession, Metrics, MetricsServer, Stats
from proxy.session.actions import (
    JUST_FORWARD,
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
from proxy.session.engine import Phase, Session, SessionSettings
from proxy.wire.startup import SSLRequest
from rules.context import ContextHolder
from rules.loader import RulesError
from rules.model import Policy
from shared import logs, user_files
from shared.logs import log

_STARTED = (Phase.CONNECTING, Phase.AUTHENTICATING, Phase.CLASSIFYING, Phase.READY, Phase.ENDING)
# Flow control: pgveil must not hold much more of a result than a client that stopped
# reading would leave in its socket, or the server finishes what that client asked it to
# stop (a COPY left early: the client's cancel arrives after the end, and the transaction
# is not in error as it would be directly). Reading from one side pauses while pgveil's
# writes to the other are backed up past WRITE_HIGH_WATER, and the upstream socket's receive
# buffer is fixed at UPSTREAM_RECEIVE_BUFFER: the kernel's autotuning would grow it to
# megabytes (tcp_rmem's maximum) while pgveil reads fast, and it keeps accepting the server's
# bytes into it when pgveil pauses (measured: 0.7-6 MB, enough to hold the rest of a 13 MB
# COPY now and then; issue 16).
WRITE_HIGH_WATER = 256 * 1024
WRITE_LOW_WATER = 64 * 1024
UPSTREAM_RECEIVE_BUFFER = 256 * 1024  # SO_RCVBUF (Linux doubles it for its bookkeeping)
_SSL_REQUEST = SSLRequest().encode()


def _set_keepalive(transport: asyncio.BaseTransport, config: ProxyConfig) -> None:
    sock = transport.get_extra_info("socket")
    if sock is None or not config.tcp_keepalive:
        return
    with contextlib.suppress(OSError, AttributeError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, config.tcp_keepalive_idle)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, config.tcp_keepalive_interval)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, config.tcp_keepalive_count)


def _bound_receive_buffer(transport: asyncio.BaseTransport) -> None:
    """Fix the upstream socket's receive buffer (see UPSTREAM_RECEIVE_BUFFER): set before
    anything is read, so the window the server may fill never grows past it."""
    sock = transport.get_extra_info("socket")
    if sock is None:
        return
    with contextlib.suppress(OSError, AttributeError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, UPSTREAM_RECEIVE_BUFFER)


def client_tls_context(config: ProxyConfig) -> ssl.SSLContext | None:
    if config.tls_cert is None or config.tls_key is None:
        return None
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        ctx.load_cert_chain(str(config.tls_cert), str(config.tls_key))
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"--tls-cert/--tls-key: cannot load certificate: {exc}") from exc
    return ctx


def upstream_tls_context(config: ProxyConfig) -> ssl.SSLContext | None:
    mode = config.upstream_sslmode
    if mode == "disable":
        return None
    if mode.startswith("verify"):
        try:
            ctx = ssl.create_default_context(cafile=str(config.upstream_sslrootcert))
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(
                f"--upstream-sslrootcert {config.upstream_sslrootcert}: cannot load "
                f"certificates: {getattr(exc, 'reason', None) or exc}"
            ) from exc
        ctx.check_hostname = mode == "verify-full"
    else:
        # prefer/require: encrypt, do not authenticate the server (libpq's meaning)
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    return ctx


def _certificate_der(config: ProxyConfig) -> bytes | None:
    """DER of the first certificate in tls_cert (to compare with the server's)."""
    if config.tls_cert is None:
        return None
    try:
        # bytes: what surrounds the PEM block (a comment) may be in any encoding
        data = user_files.read_bytes(config.tls_cert, "--tls-cert")
    except user_files.UnreadableFile as exc:
        raise ConfigError(str(exc)) from exc
    begin, end_marker = b"-----BEGIN CERTIFICATE-----", b"-----END CERTIFICATE-----"
    start = data.find(begin)
    end = data.find(end_marker, start)
    if start < 0 or end < 0:
        return None
    # (ssl loaded this file already: the block is ASCII)
    return ssl.PEM_cert_to_DER_cert(data[start : end + len(end_marker)].decode("ascii"))


class UpstreamError(Exception):
    """Opening the upstream connection failed; the text is safe to show the client."""


class _Pipe(asyncio.Protocol):
    """Common flow control: pause the peer's reading while our writes are backed up."""

    transport: asyncio.Transport | None = None

    def peer_transport(self) -> asyncio.Transport | None:
        raise NotImplementedError  # pragma: no cover - abstract

    def pause_writing(self) -> None:
        peer = self.peer_transport()
        if peer is not None and not peer.is_closing():
            peer.pause_reading()

    def resume_writing(self) -> None:
        peer = self.peer_transport()
        if peer is not None and not peer.is_closing():
            peer.resume_reading()


class UpstreamConnection(_Pipe):
    def __init__(self, client: ClientConnection | None) -> None:
        self.client = client
        self.ssl_answer: asyncio.Future[bytes] | None = None
        self.relaying = False
        self.closed = False
        self.lost: asyncio.Future[None] | None = None  # set when connection_lost has run

    def peer_transport(self) -> asyncio.Transport | None:
        return self.client.transport if self.client is not None else None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport = cast(asyncio.Transport, transport)  # uvloop's are not subclasses
        self.transport = transport
        transport.set_write_buffer_limits(WRITE_HIGH_WATER, WRITE_LOW_WATER)

    def data_received(self, data: bytes) -> None:
        client = self.client
        if self.relaying and client is not None:
            client.server_bytes += len(data)
            actions = client.session.server_data(data)
            if actions is JUST_FORWARD:
                ct = client.transport
                if ct is not None:
                    gate = client.server.gate
                    if gate is not None and gate.holding:
                        gate.hold(client, data)  # after this iteration's events
                    else:
                        ct.write(data)
            else:
                client.run(actions, data, to_server=False)
        elif self.ssl_answer is not None and not self.ssl_answer.done():
            self.ssl_answer.set_result(data)

    def eof_received(self) -> bool | None:
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self.lost is not None and not self.lost.done():
            self.lost.set_result(None)
        if self.ssl_answer is not None and not self.ssl_answer.done():
            self.ssl_answer.set_exception(UpstreamError("connection closed during SSL request"))
        if self.relaying and self.client is not None:
            self.client.run(self.client.session.server_closed(), b"", to_server=False)


async def open_upstream(
    server: ProxyServer, client: ClientConnection | None
) -> tuple[asyncio.Transport, UpstreamConnection]:
    """TCP connect, then the SSLRequest exchange when the sslmode asks for TLS; or the
    server's Unix socket when the upstream host is a directory (no TLS there, as libpq)."""
    config = server.config
    loop = asyncio.get_running_loop()
    host, port = config.upstream.host, config.upstream.port
    try:
        async with asyncio.timeout(config.connect_timeout):
            if host.startswith("/"):
                transport, proto = await loop.create_unix_connection(
                    lambda: UpstreamConnection(client), f"{host}/.s.PGSQL.{port}"
                )
                return transport, proto
            transport, proto = await loop.create_connection(
                lambda: UpstreamConnection(client), host, port
            )
            _bound_receive_buffer(transport)
            _set_keepalive(transport, config)
            ctx = server.upstream_tls
            if ctx is not None:
                proto.ssl_answer = loop.create_future()
                transport.write(_SSL_REQUEST)
                answer = await proto.ssl_answer
                if answer == b"S":
                    new = await loop.start_tls(
                        transport, proto, ctx, server_hostname=config.upstream.host
                    )
                    assert new is not None
                    transport = new
                    proto.transport = new
                    new.set_write_buffer_limits(WRITE_HIGH_WATER, WRITE_LOW_WATER)
                elif answer == b"N":
                    if config.upstream_sslmode != "prefer":
                        transport.close()
                        raise UpstreamError("the server does not support TLS")
                else:
                    transport.close()
                    raise UpstreamError("unexpected answer to SSLRequest")
            return transport, proto
    except TimeoutError as exc:
        raise UpstreamError("connection timed out") from exc
    except ssl.SSLError as exc:
        raise UpstreamError(f"TLS handshake failed ({exc.reason or 'unknown'})") from exc
    except OSError as exc:
        raise UpstreamError(exc.strerror or type(exc).__name__) from exc


class ClientConnection(_Pipe, LiveSession):
    def __init__(self, server: ProxyServer) -> None:
        self.server = server
        self.session = Session(server.session_settings())
        self.upstream: UpstreamConnection | None = None
        self.upstream_transport: asyncio.Transport | None = None
        self.client_bytes = 0
        self.server_bytes = 0
        self.started = time.monotonic()
        self.peer = ""
        self.sid = new_id()
        self.classification = "unclassified"
        # the login's roles, as the rules classified it (None: never classified by rules)
        self.roles: frozenset[str] | None = None
        self.audited = False
        self._session_started = False  # session.start recorded: session.end is owed
        self._who: dict[str, object] | None = None  # the audit events' who, once known
        self._audit_wait: bytearray | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._closed = False

    def peer_transport(self) -> asyncio.Transport | None:
        return self.upstream_transport

    # -- asyncio.Protocol ---------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport = cast(asyncio.Transport, transport)  # uvloop's are not subclasses
        self.transport = transport
        transport.set_write_buffer_limits(WRITE_HIGH_WATER, WRITE_LOW_WATER)
        peer = transport.get_extra_info("peername")
        self.peer = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else str(peer or "")
        _set_keepalive(transport, self.server.config)
        self.server.register(self)

    def data_received(self, data: bytes) -> None:
        self.client_bytes += len(data)
        if self._audit_wait is not None:
            self._audit_wait += data
            return
        writer = self.server.audit
        if writer is not None and self.audited and writer.blocking:
            # the audit stream is down: statements wait for it (reading paused), and
            # those on personal data are refused if it is not back in time
            self._audit_wait = bytearray(data)
            if self.transport is not None:
                self.transport.pause_reading()
            self._spawn(self._wait_for_audit(writer))
            return
        self._deliver(data)

    def _deliver(self, data: bytes) -> None:
        actions = self.session.client_data(data)
        if actions is JUST_FORWARD:
            ut = self.upstream_transport
            if ut is not None:
                ut.write(data)
        else:
            self.run(actions, data, to_server=True)

    async def _wait_for_audit(self, writer: AuditWriter) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(writer.recovered.wait(), self.server.config.audit_block_timeout)
        data, self._audit_wait = bytes(self._audit_wait or b""), None
        if self._closed:
            return
        if self.transport is not None:
            self.transport.resume_reading()
        self._deliver(data)

    # ---- AuditHook: what the session filters use to record events ----------------------

    @property
    def subjects_limit(self) -> int:
        return self.server.config.audit_subjects_limit

    def ready(self) -> bool:
        writer = self.server.audit
        return writer is None or not writer.blocking

    def record(self, event_type: str, fields: dict[str, object]) -> bool:
        # a refusal's answer is an error that carries no data: it need not wait for its
        # event (queued all the same); an access's results do
        return self.audit_event(event_type, fields, owned=event_type != "refused")

    def eof_received(self) -> bool | None:
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        if not self._closed:
            self.run(self.session.client_closed(), b"", to_server=True)
        self._finish()

    # -- actions ------------------------------------------------------------------------

    def run(self, actions: Sequence[Action], data: bytes, *, to_server: bool) -> None:
        """Carry out the engine's actions in order (`data`: the chunk FORWARD means, sent
        on towards the server when `to_server`), each by its handler in HANDLERS."""
        for action in actions:
            HANDLERS[type(action)](self, action, data, to_server)

    # Handlers: one per action class, engine's and audit gate's alike (see HANDLERS).

    def _forward(self, action: Forward, data: bytes, to_server: bool) -> None:
        if to_server:
            ut = self.upstream_transport
            if ut is not None:
                ut.write(data)
        else:
            self._to_client(data)

    def _send_to_client(self, action: SendToClient, data: bytes, to_server: bool) -> None:
        self._to_client(action.data)

    def _to_client(self, data: bytes) -> None:
        transport = self.transport
        if transport is not None and not transport.is_closing():
            gate = self.server.gate
            if gate is not None and gate.holding:
                gate.hold(self, data)  # after this iteration's events (audit/gate.py)
            else:
                transport.write(data)

    def _send_to_server(self, action: SendToServer, data: bytes, to_server: bool) -> None:
        ut = self.upstream_transport
        if ut is not None and not ut.is_closing():
            ut.write(action.data)

    def _close_session(self, action: CloseSession, data: bytes, to_server: bool) -> None:
        self._release_held()  # what the client is owed goes out before the close
        self.close(action.reason)

    def _release_held(self) -> None:
        gate = self.server.gate
        if gate is not None and gate.holding and self.server.audit is not None:
            self.server.audit.release()

    def _connect_upstream(self, action: ConnectUpstream, data: bytes, to_server: bool) -> None:
        self._spawn(self._connect(action.startup_packet))

    def _classify_login(self, action: ClassifyLogin, data: bytes, to_server: bool) -> None:
        self._spawn(self._classify(action.user))

    def _record_session_start(
        self, action: RecordSessionStart, data: bytes, to_server: bool
    ) -> None:
        self._session_started = True
        # no result waits for it: the login's answers go out even when it cannot be
        # written (statements on personal data are what the audit blocks)
        self.audit_event("session.start", {}, owned=False)

    def _start_client_tls(self, action: StartClientTLS, data: bytes, to_server: bool) -> None:
        self._release_held()  # the 'S' answer goes out before the handshake starts
        self._spawn(self._start_tls())

    def _send_cancel(self, action: SendCancel, data: bytes, to_server: bool) -> None:
        # owned by the server: it must outlive this connection if the client goes first
        self.server.spawn(self.server.forward_cancel(action.request, self))

    def _await_catalog_action(self, action: AwaitCatalog, data: bytes, to_server: bool) -> None:
        self._spawn(self._await_catalog(action))

    def _deliver_held(self, action: Deliver, data: bytes, to_server: bool) -> None:
        transport = self.transport
        if transport is not None and not transport.is_closing():
            transport.write(action.data)

    def _pause_server(self, action: PauseServer, data: bytes, to_server: bool) -> None:
        ut = self.upstream_transport
        if ut is not None and not ut.is_closing():
            ut.pause_reading()  # the server waits, not pgveil's memory

    def _resume_server(self, action: ResumeServer, data: bytes, to_server: bool) -> None:
        ut = self.upstream_transport
        if ut is not None and not ut.is_closing():
            ut.resume_reading()

    def _abort(self, action: Abort, data: bytes, to_server: bool) -> None:
        if self.transport is not None:
            self.transport.abort()

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _await_catalog(self, action: AwaitCatalog) -> None:
        """A masked statement named what the catalog read does not have: the client's
        stream waits (reading paused) until a catalog read that began after it is in, or
        UNKNOWN_NAME_WAIT seconds have passed; then the statement is decided."""
        if self.transport is not None:
            self.transport.pause_reading()
        masking = self.server.masking
        if masking is not None:
            await masking.await_read(action.holder, action.read, UNKNOWN_NAME_WAIT)
        if self._closed:
            return
        self.run(self.session.catalog_awaited(), b"", to_server=True)
        waiting = self.session.awaiting_catalog
        if self.transport is not None and self._audit_wait is None and not waiting:
            self.transport.resume_reading()

    async def _start_tls(self) -> None:
        ctx = self.server.client_tls
        transport = self.transport
        if ctx is None or transport is None:
            self.close("tls unavailable")
            return
        loop = asyncio.get_running_loop()
        try:
            new = await loop.start_tls(transport, self, ctx, server_side=True)
        except (OSError, ssl.SSLError, ConnectionError) as exc:
            log.info("client.tls_failed", peer=self.peer, error=type(exc).__name__)
            self.close("tls handshake failed")
            return
        if new is None:
            self.close("tls handshake failed")
            return
        self.transport = new
        self.server.stats.tls_handshakes += 1

    async def _connect(self, startup_packet: bytes) -> None:
        # Nothing is looked up before the server has authenticated the client: with rules,
        # the login is classified once the server accepted it (ClassifyLogin).
        if not self.session.gated:
            self.classification = "unmasked"  # no rules: every session is relayed
        try:
            transport, proto = await open_upstream(self.server, self)
        except UpstreamError as exc:
            self.server.stats.upstream_connect_failures += 1
            log.warning("upstream.connect_failed", peer=self.peer, error=str(exc))
            self.run(self.session.upstream_failed(str(exc)), b"", to_server=False)
            return
        if self._closed:
            transport.close()
            return
        self.upstream = proto
        self.upstream_transport = transport
        proto.relaying = True
        transport.write(startup_packet)
        ssl_object = transport.get_extra_info("ssl_object")
        same_cert = False
        if ssl_object is not None and self.server.client_cert_der is not None:
            same_cert = ssl_object.getpeercert(binary_form=True) == self.server.client_cert_der
        log.debug("session.connected", peer=self.peer, user=self.session.info.user)
        actions = self.session.upstream_connected(
            tls=ssl_object is not None, same_certificate=same_cert
        )
        self.run(actions, b"", to_server=True)

    async def _classify(self, user: str) -> None:
        """Classify a login the server has accepted: masked or unmasked (from the rules
        and the role's memberships), with the catalog its statements are analysed with.
        Whatever goes wrong, the client learns only that the session cannot be
        classified; the reason goes to the log."""
        masking = self.server.masking
        info = self.session.info
        masked: ContextHolder | None = None
        recorded: ContextHolder | None = None
        policy = None
        try:
            if masking is not None:
                masked, self.roles = await masking.admit(user, info.database)
                policy = masking.policy  # the rules it was classified by
                if masked is None and self.server.audit is not None:
                    # unmasked: record which protected tables each statement touches
                    recorded = await masking.holder_for(info.database)
        except RulesMismatch as exc:  # refused by the rules: the client may know why
            log.error(
                "session.refused", peer=self.peer, user=user, database=info.database,
                reason=str(exc),
            )  # fmt: skip
            self.run(self.session.login_refused(str(exc)), b"", to_server=False)
            return
        except Exception as exc:  # fail closed on anything, never on a guess
            cause = exc.__cause__
            log.error(
                "session.unclassified",
                peer=self.peer,
                user=user,
                database=info.database,
                error=str(exc) or type(exc).__name__,
                cause=f"{type(cause).__name__}: {cause}" if cause is not None else None,
            )
            self.server.stats.reject("unclassified")
            self.run(self.session.login_unclassifiable(), b"", to_server=False)
            return
        if self._closed:
            return
        self.classification = "masked" if masked is not None else "unmasked"
        if masked is not None:
            self.server.stats.masked_sessions += 1
        hook = None
        if masking is not None and self.server.audit is not None:
            self.audited = True
            hook = self
        self.run(self.session.login_classified(masked, recorded, hook), b"", to_server=False)
        if self.server.masking is not masking or (
            masking is not None and masking.policy is not policy
        ):
            # the rules were reloaded while the login was being classified
            self.reclassify(self.server.masking)

    def reclassify(self, masking: MaskingManager | None) -> None:
        """The rules were reloaded: a session they classify otherwise than at its login
        (masked <-> unmasked; an unmasked login they now refuse) ends, with a FATAL that
        says so; its session.end event and log line carry the reason. Others go on."""
        if self._closed or self.session.phase is not Phase.READY:
            return
        if self.classification == "masked" or self.classification == "unmasked":
            was_masked = self.classification == "masked"
            if masking is None:
                why = "masking is off" if was_masked else None  # every session is relayed
            elif self.roles is None:
                # classified without rules (none were configured at its login)
                self._spawn(self._reclassify_unclassified(masking))
                return
            else:
                why = masking.reclassification(self.roles, self.session.info.database, was_masked)
            if why is not None:
                self._end_reclassified(why)

    async def _reclassify_unclassified(self, masking: MaskingManager) -> None:
        """A session relayed without rules, once rules are configured: its roles are looked
        up as at a login; if they cannot be, it ends (never a guess)."""
        info = self.session.info
        user = info.parameters.get("session_authorization") or info.user
        roles: frozenset[str] | None = None
        try:
            roles = await masking.roles_of(user, info.database)
            why = masking.reclassification(roles, info.database, masked=False)
        except Exception as exc:  # fail closed on anything
            log.error("session.unclassified", peer=self.peer, user=user, error=str(exc))
            why = "the session cannot be classified"
        if self.server.masking is not masking:
            return  # reloaded again meanwhile: that reload judges it
        if why is None:
            self.roles = roles  # classified now: the next reload judges it as any other
        elif not self._closed and self.session.phase is Phase.READY:
            self._end_reclassified(why)

    def _end_reclassified(self, why: str) -> None:
        info = self.session.info
        log.warning(
            "session.reclassified", peer=self.peer, user=info.user, database=info.database,
            classification=self.classification, reason=why,
        )  # fmt: skip
        text = f"pgveil: the masking rules were reloaded and {why}; reconnect"
        self.run(self.session.reclassified(text), b"", to_server=False)

    def audit_event(
        self, event_type: str, fields: dict[str, object], *, owned: bool = True
    ) -> bool:
        """Record an event about this session; False when it could not be recorded.
        `owned`: what this client is sent next waits for the event (see batch_writes)."""
        writer = self.server.audit
        if writer is None:
            return True
        who = self._who
        if who is None or who["classification"] != self.classification:
            info = self.session.info
            who = self._who = {
                "session": self.sid,
                "role": info.user,
                "classification": self.classification,
                "client": self.peer,
                "application_name": info.application_name,
                "database": info.database,
                "tls": info.client_tls,
            }
        # the connection itself is the gate's handle for this session (audit/gate.py)
        return writer.submit(event_type, fields, who, self if owned else None)

    def close(self, reason: str) -> None:
        if self._closed:
            return
        self._closed = True
        if self.transport is not None:
            self.transport.close()
        if self.upstream_transport is not None:
            self.upstream_transport.close()
        for task in list(self._tasks):
            if task is not asyncio.current_task():
                task.cancel()
        self._finish(reason)

    def _finish(self, reason: str = "") -> None:
        if self.server.unregister(self):
            info = self.session.info
            duration = time.monotonic() - self.started
            self.server.metrics.session_duration.observe(duration)
            self.server.stats.absorb(self.session, self.client_bytes, self.server_bytes)
            # statements in flight are recorded before the session's end: outcome unknown
            self.session.ended(reason or self.session.close_reason or "closed")
            if self._session_started:
                self.audit_event(
                    "session.end",
                    {
                        "duration_s": round(duration, 6),
                        "bytes_from_client": self.client_bytes,
                        "bytes_from_server": self.server_bytes,
                        "outcome": reason or self.session.close_reason or "closed",
                    },
                    owned=False,  # no result waits for it: dropped (counted) if the queue is full
                )
            if info.user:
                log.info(
                    "session.end",
                    peer=self.peer,
                    user=info.user,
                    database=info.database,
                    application_name=info.application_name,
                    tls=info.client_tls,
                    backend_pid=info.backend_pid,
                    duration_s=round(duration, 3),
                    bytes_from_client=self.client_bytes,
                    bytes_from_server=self.server_bytes,
                    reason=reason or self.session.close_reason or "closed",
                )


Handler = Callable[[ClientConnection, Any, bytes, bool], None]
HANDLERS: dict[type, Handler] = {
    # the engine's actions (proxy/session/actions.py)
    Forward: ClientConnection._forward,
    SendToClient: ClientConnection._send_to_client,
    SendToServer: ClientConnection._send_to_server,
    CloseSession: ClientConnection._close_session,
    ConnectUpstream: ClientConnection._connect_upstream,
    ClassifyLogin: ClientConnection._classify_login,
    RecordSessionStart: ClientConnection._record_session_start,
    StartClientTLS: ClientConnection._start_client_tls,
    SendCancel: ClientConnection._send_cancel,
    AwaitCatalog: ClientConnection._await_catalog_action,
    # the audit gate's decisions (audit/gate.py)
    Deliver: ClientConnection._deliver_held,
    PauseServer: ClientConnection._pause_server,
    ResumeServer: ClientConnection._resume_server,
    Abort: ClientConnection._abort,
}
"""Every action the shell carries out, by class: one flat table (as mitmproxy's server
maps commands), so no action is handled in two places and an unknown one fails loudly
(KeyError)."""


class ProxyServer:
    def __init__(self, config: ProxyConfig, policy: Policy | None = None) -> None:
        self.config = config
        self.stats = Stats()
        self.masking = self._manager(config, policy) if policy is not None else None
        self.audit = audit_writer(config)
        # which client bytes wait for audit events (audit/gate.py); its decisions are
        # carried out by HANDLERS, as the engine's actions are
        self.gate = self.audit.gate if self.audit is not None else None
        self._load_policy: Callable[[ProxyConfig], Policy | None] | None = None
        self.connections: set[ClientConnection] = set()
        self.metrics = Metrics(self.stats, self._live, lambda: self.audit, lambda: self.masking)
        self.client_tls = client_tls_context(config)
        self.client_cert_der = _certificate_der(config)
        self.upstream_tls = upstream_tls_context(config)
        self.draining = False
        self._server: asyncio.Server | None = None
        self._metrics_server: MetricsServer | None = None
        self._stopped = asyncio.Event()
        self._reload: Callable[[], ProxyConfig] | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    def spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _refresh_catalogs(self) -> None:
        while not self.draining:
            masking = self.masking
            if masking is None:
                await asyncio.sleep(1)
                continue
            task = asyncio.ensure_future(masking.refresh_forever())
            while self.masking is masking and not self.draining:
                await asyncio.sleep(0.5)
            task.cancel()

    def apply_gate(self, actions: list[GateAction]) -> None:
        """Carry out the audit gate's decisions, each on the connection it names."""
        for action in actions:
            conn: ClientConnection = action.session  # type: ignore[assignment]  # (the handle)
            HANDLERS[type(action)](conn, action, b"", False)

    def _manager(self, config: ProxyConfig, policy: Policy) -> MaskingManager:
        """A masking manager that counts into this server's Stats (which outlive it)."""
        return MaskingManager(config, policy, self.stats.analysis_cache, self.stats.rules_refused)

    def _live(self) -> Iterable[LiveSession]:
        return list(self.connections)

    def session_settings(self) -> SessionSettings:
        return SessionSettings(
            tls_available=self.client_tls is not None,
            max_message_size=self.config.max_message_size,
            masked_prepare=self.config.masked_prepare,
            admit=self._admit,
            classify=lambda: self.masking is not None,
        )

    def _admit(self) -> tuple[str, str] | None:
        started = sum(1 for c in self.connections if c.session.phase in _STARTED)
        if started >= self.config.max_connections:
            self.stats.reject("max_connections")
            return ("53300", "sorry, too many clients already")
        return None

    def register(self, conn: ClientConnection) -> None:
        self.connections.add(conn)
        self.stats.connections_total += 1
        if self.draining:
            conn.run(conn.session.shutdown_requested(), b"", to_server=False)

    def unregister(self, conn: ClientConnection) -> bool:
        if conn in self.connections:
            self.connections.discard(conn)
            return True
        return False

    async def forward_cancel(self, request: bytes, client: ClientConnection) -> None:
        """CancelRequests go to the upstream whatever the key: the server checks it, and a
        request that reached another pgveil instance behind a load balancer still works.

        The client's connection is closed only after the server has closed the forwarded
        one: the server closes it once it has signalled the backend, and libpq and asyncpg
        read the close as "the cancel is done" and send their next query. Closed earlier,
        a late cancel could kill that next query. The wait is bounded by connect_timeout."""
        self.stats.cancel_requests += 1
        try:
            try:
                transport, proto = await open_upstream(self, None)
            except UpstreamError as exc:
                log.warning("cancel.failed", error=str(exc))
                return
            if not proto.closed:
                proto.lost = asyncio.get_running_loop().create_future()
                transport.write(request)
                try:
                    async with asyncio.timeout(self.config.connect_timeout):
                        await proto.lost
                except TimeoutError:
                    log.warning("cancel.unanswered", timeout_s=self.config.connect_timeout)
            transport.close()
        finally:
            client.close("cancel request")

    async def upstream_reachable(self) -> bool:
        try:
            transport, _ = await open_upstream(self, None)
        except UpstreamError:
            return False
        transport.close()
        return True

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        listen = self.config.listen
        if self.audit is not None:
            # before the first client: the chain's position is known before any event
            try:
                await self.audit.start()
            except AuditFileError as exc:
                raise ConfigError(f"the audit file cannot be read: {exc}") from exc
            except (asyncpg.PostgresError, asyncpg.InterfaceError, TimeoutError) as exc:
                raise ConfigError(f"the audit table sink cannot be reached: {exc}") from exc
            except OSError as exc:
                target = exc.filename or "the audit table sink"
                raise ConfigError(f"{target}: {user_files.problem_of(exc)}") from exc
        self._server = await loop.create_server(
            lambda: ClientConnection(self),
            listen.host,
            listen.port,
            reuse_address=True,
            backlog=1024,
        )
        if self.masking is not None:
            self.spawn(self._refresh_catalogs())
        if self.audit is not None:
            self.spawn(self.audit.run())
            self.audit.batch_writes(
                asyncio.get_running_loop(), self.apply_gate, self.config.audit_block_timeout
            )
        if self.config.metrics is not None:
            self._metrics_server = MetricsServer(self.metrics, self.upstream_reachable)
            await self._metrics_server.start(self.config.metrics.host, self.config.metrics.port)
        log.info(
            "proxy.listening",
            listen=str(listen),
            upstream=str(self.config.upstream),
            metrics=str(self.config.metrics) if self.config.metrics else None,
            client_tls=self.client_tls is not None,
            upstream_sslmode=self.config.upstream_sslmode,
        )

    @property
    def port(self) -> int:
        assert self._server is not None
        return int(self._server.sockets[0].getsockname()[1])

    def install_signal_handlers(
        self,
        reload: Callable[[], ProxyConfig],
        load_policy: Callable[[ProxyConfig], Policy | None] | None = None,
    ) -> None:
        loop = asyncio.get_running_loop()
        self._reload = reload
        self._load_policy = load_policy
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.request_shutdown, sig.name)
        loop.add_signal_handler(signal.SIGHUP, self.reload)

    def reload(self) -> None:
        if self._reload is None:
            return
        try:
            new = self._reload()
            client_tls = client_tls_context(new)
            upstream_tls = upstream_tls_context(new)
            policy = self._load_policy(new) if self._load_policy is not None else None
        except (ConfigError, RulesError) as exc:
            log.error("config.reload_failed", error=str(exc), kept="previous configuration")
            return
        restart = self.config.changed_restart_only(new)
        if restart:
            log.warning("config.restart_required", settings=restart)
            new = _keep(new, self.config, restart)
        self.config = new
        self.client_tls = client_tls
        self.client_cert_der = _certificate_der(new)
        if policy is not None:
            if self.masking is None:
                self.masking = self._manager(new, policy)
            else:
                self.masking.reload(new, policy)
            log.info("rules.reloaded", version=policy.version, tables=len(policy.tables))
            self._reclassify()
            if self.audit is not None:
                self.audit.submit(
                    "rules.reload",
                    {
                        "version": policy.version,
                        "tables": sorted(f"{s}.{t}" for s, t in policy.tables),
                    },
                )
        elif self.masking is not None and self._load_policy is not None:
            log.warning("rules.removed", detail="no rules file configured: masking is off")
            self.masking = None
            self._reclassify()
        self.upstream_tls = upstream_tls
        logs.configure(new.log_format, new.log_level)
        log.info("config.reloaded", file=str(new.config_file) if new.config_file else None)

    def _reclassify(self) -> None:
        """After a rules reload: open sessions the new rules classify otherwise end."""
        for conn in list(self.connections):
            conn.reclassify(self.masking)

    def request_shutdown(self, why: str = "") -> None:
        if self.draining:
            return
        self.draining = True
        log.info(
            "proxy.shutdown",
            signal=why,
            sessions=len(self.connections),
            timeout_s=self.config.shutdown_timeout,
        )
        self.spawn(self._drain())

    async def _drain(self) -> None:
        if self._server is not None:
            self._server.close()
        for conn in list(self.connections):
            conn.run(conn.session.shutdown_requested(), b"", to_server=False)
        deadline = time.monotonic() + self.config.shutdown_timeout
        while self.connections and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        for conn in list(self.connections):
            conn.run(conn.session.shutdown_deadline(), b"", to_server=False)
        await asyncio.sleep(0.05)  # let the final writes flush
        if self.audit is not None:
            await self.audit.close()  # shutdown flushes every queued event
        if self._metrics_server is not None:
            self._metrics_server.close()
        self._stopped.set()

    async def wait_stopped(self) -> None:
        await self._stopped.wait()


def _keep(new: ProxyConfig, old: ProxyConfig, names: list[str]) -> ProxyConfig:
    return dataclasses.replace(new, **{n: getattr(old, n) for n in names})


def audit_writer(config: ProxyConfig) -> AuditWriter | None:
    """The audit writer for the configured sinks, or None when auditing is off."""
    sinks: list[SyncSink] = []
    if config.audit_file is not None:
        try:
            sink = FileSink(config.audit_file, config.audit_rotate_size, config.audit_rotate_age)
        except OSError as exc:
            problem = user_files.problem_of(exc)
            raise ConfigError(f"--audit-file {config.audit_file}: {problem}") from exc
        sinks.append(sink)
    if config.audit_stdout:
        sinks.append(StdoutSink())
    table = None
    if config.audit_table_dsn is not None:
        chain = config.audit_chain or f"{socket.gethostname()}:{config.listen.port}"
        table = TableSink(config.audit_table_dsn, config.audit_table, chain)
    if not sinks and table is None:
        return None
    key = None
    if config.audit_key is not None:
        try:
            key = load_key(config.audit_key)
        except ValueError as exc:
            raise ConfigError(f"--audit-key {exc}") from exc
    else:
        log.warning(
            "audit.unsealed",
            detail="no --audit-key: checkpoints are not sealed, so `pgveil audit verify` "
            "cannot tell a rebuilt chain from the original, nor prove its end",
        )
    anchor = anchor_file(config)
    if anchor is None:
        log.warning(
            "audit.unanchored",
            detail="no --audit-anchor-file: checkpoints go into the chain and the log only; "
            "a cut at the end of the chain shows only against the table sink or the log",
        )
    return AuditWriter(
        sinks,
        table,
        config.audit_on_failure,
        config.audit_queue_size,
        key=key,
        anchor=anchor,
        checkpoint_every=config.audit_checkpoint_every,
        checkpoint_interval=config.audit_checkpoint_interval,
    )


async def serve(
    config: ProxyConfig,
    reload: Callable[[], ProxyConfig] | None = None,
    load_policy: Callable[[ProxyConfig], Policy | None] | None = None,
) -> None:
    policy = load_policy(config) if load_policy is not None else None
    server = ProxyServer(config, policy)
    await server.start()
    if reload is not None:
        server.install_signal_handlers(reload, load_policy)
    await server.wait_stopped()
    log.info("proxy.stopped")


__all__ = ["ClientConnection", "ProxyServer", "UpstreamError", "serve"]
