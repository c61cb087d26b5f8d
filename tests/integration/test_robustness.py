"""pgveil survives what real networks and broken clients do: cancels, dying servers, dying
clients, garbage and oversized messages. Other sessions are never affected."""

from __future__ import annotations

import os
import socket
import struct
import threading
import time
from collections.abc import Callable

import psycopg
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from proxy.demo.embedded_pg import EmbeddedPostgres, free_port
from proxy.wire import messages as m
from proxy.wire.errors import decode_fields
from proxy.wire.startup import SSLRequest, StartupMessage
from tests.conftest import SCRAM_PASSWORD, SCRAM_USER, scram_asyncpg
from tests.integration.audit_wire import wait_for
from tests.support import ProxyProcess, RawClient, errors_in


def _healthy(proxy_dsn: str) -> None:
    with psycopg.connect(proxy_dsn, connect_timeout=10) as conn:
        assert conn.execute("SELECT 6 * 7").fetchone() == (42,)


def when_running(pg: EmbeddedPostgres, pid: int, action: Callable[[], object]) -> threading.Thread:
    """`action` in a thread once backend `pid` runs a statement (pg_stat_activity shows it
    active): sent earlier, a cancel or a kill would meet an idle session."""

    def run() -> None:
        sql = f"SELECT state FROM pg_stat_activity WHERE pid = {pid}"
        wait_for(lambda: pg.psql(sql).strip() == "active", "the statement to start")
        action()

    thread = threading.Thread(target=run)
    thread.start()
    return thread


def test_cancel_long_query(proxy_dsn: str, proxy: ProxyProcess, pg: EmbeddedPostgres) -> None:
    """A CancelRequest through pgveil cancels the running statement (it would sleep 30 s)
    and the session goes on."""
    with psycopg.connect(proxy_dsn) as conn:
        canceller = when_running(pg, conn.info.backend_pid, conn.cancel)
        with pytest.raises(psycopg.errors.QueryCanceled):
            conn.execute("SELECT pg_sleep(30)")
        canceller.join()
        conn.rollback()
        assert conn.execute("SELECT 1").fetchone() == (1,)
    assert proxy.metric("pgveil_cancel_requests_total") >= 1


async def test_cancel_from_asyncpg_timeout(pg: EmbeddedPostgres, proxy: ProxyProcess) -> None:
    conn = await scram_asyncpg(proxy.port)
    try:
        with pytest.raises(TimeoutError):
            await conn.execute("SELECT pg_sleep(600)", timeout=5)  # long enough to start
        # asyncpg cancels on its timeout: uncancelled, the next statement waits 10 minutes
        assert await conn.fetchval("SELECT 1", timeout=60) == 1
    finally:
        await conn.close()


def test_backend_terminated_mid_query(
    proxy_dsn: str, direct_dsn: str, pg: EmbeddedPostgres
) -> None:
    with psycopg.connect(proxy_dsn) as victim:
        pid = victim.info.backend_pid
        killer = when_running(pg, pid, lambda: pg.psql(f"SELECT pg_terminate_backend({pid})"))
        with pytest.raises(psycopg.OperationalError) as info:
            victim.execute("SELECT pg_sleep(20)")
        assert info.value.sqlstate in ("57P01", None)
        killer.join()
    _healthy(proxy_dsn)


def test_backend_killed_hard_mid_result(proxy_dsn: str, pg: EmbeddedPostgres) -> None:
    # SIGKILL of a backend makes the postmaster restart all sessions: the cruellest case
    with psycopg.connect(proxy_dsn) as victim:
        pid = victim.info.backend_pid
        killer = when_running(pg, pid, lambda: os.kill(pid, 9))
        with pytest.raises(psycopg.OperationalError):
            victim.execute("SELECT pg_sleep(20)")
        killer.join()
    deadline = time.monotonic() + 30
    while True:
        try:
            _healthy(proxy_dsn)
            break
        except psycopg.OperationalError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def test_client_killed_mid_copy(proxy: ProxyProcess, pg: EmbeddedPostgres, proxy_dsn: str) -> None:
    pg.psql("CREATE TABLE IF NOT EXISTS t_copy_kill (v text)")
    c = RawClient(proxy.port)
    backend = c.pid
    c.send("Q", b"COPY t_copy_kill FROM STDIN\0")
    typ, _ = c.recv_message()
    assert typ == "G"  # CopyInResponse
    c.send("d", b"one\n")
    c.send_raw(m.message(m.COPY_DATA, b"x" * 5000)[:1000])  # half a message, then vanish
    c.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    c.close()  # RST
    deadline = time.monotonic() + 15
    while pg.psql(f"SELECT count(*) FROM pg_stat_activity WHERE pid = {backend}").strip() != "0":
        assert time.monotonic() < deadline, "backend of the dead client still running"
        time.sleep(0.1)
    assert pg.psql("SELECT count(*) FROM t_copy_kill").strip() == "0"
    _healthy(proxy_dsn)


def test_garbage_startup_gets_protocol_violation(proxy: ProxyProcess, proxy_dsn: str) -> None:
    c = RawClient(proxy.port, connect=False)
    c.send_raw(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    typ, body = c.recv_message()
    assert typ == "E"
    fields = decode_fields(body)
    assert (fields["S"], fields["C"]) == ("FATAL", "08P01")
    assert c.closed_by_peer()
    _healthy(proxy_dsn)


def test_invalid_message_type_after_login(proxy: ProxyProcess, proxy_dsn: str) -> None:
    c = RawClient(proxy.port)
    c.send_raw(b"\x07\x00\x00\x00\x04")
    out = c.until_ready()
    assert [(e["S"], e["C"]) for e in errors_in(out)] == [("FATAL", "08P01")]
    assert "invalid message type" in errors_in(out)[0]["M"]
    assert c.closed_by_peer()
    _healthy(proxy_dsn)


def test_oversized_message_ends_only_that_session(pg: EmbeddedPostgres, certs: object) -> None:
    with ProxyProcess(pg.port, "--max-message-size", "64KB", "--upstream-sslmode", "disable") as p:
        dsn = pg.dsn(SCRAM_USER, SCRAM_PASSWORD, port=p.port) + " sslmode=disable"
        with psycopg.connect(dsn) as bystander:
            with psycopg.connect(dsn) as conn:
                assert conn.execute("SELECT length(%s)", ["x" * 60000]).fetchone() == (60000,)
                with pytest.raises(psycopg.OperationalError) as info:
                    conn.execute("SELECT length(%s)", ["x" * 70000])
                assert info.value.sqlstate == "08P01"
                assert "exceeds the limit" in str(info.value)
            assert bystander.execute("SELECT 1").fetchone() == (1,)
        c = RawClient(p.port)
        c.send_raw(b"Q" + struct.pack("!I", 2**31 - 1))  # a declared 2 GB message
        assert errors_in(c.until_ready())[0]["C"] == "08P01"
        assert p.alive()


def test_truncated_messages_then_disconnect(proxy: ProxyProcess, proxy_dsn: str) -> None:
    for cut in (1, 3, 5, 9):
        c = RawClient(proxy.port)
        c.send_raw(m.message(m.QUERY, b"SELECT 1\0")[:cut])
        c.close()
    c = RawClient(proxy.port, connect=False)
    c.send_raw(StartupMessage(m.PROTOCOL_3_0, {"user": "trust_user"}).encode()[:7])
    c.close()
    _healthy(proxy_dsn)


def test_unsupported_protocol_version(proxy: ProxyProcess) -> None:
    c = RawClient(proxy.port, connect=False)
    c.send_raw(struct.pack("!ii", 8, 2 << 16))
    typ, body = c.recv_message()
    assert typ == "E" and decode_fields(body)["C"] == "08P01"


def test_protocol_minor_version_negotiation_passes_through(
    proxy: ProxyProcess, pg: EmbeddedPostgres
) -> None:
    def exchange(port: int) -> list[str]:
        c = RawClient(port, connect=False)
        c.send_raw(
            StartupMessage(m.PROTOCOL_3_0 + 5, {"user": "trust_user", "_pq_.bogus": "1"}).encode()
        )
        types = [t for t, _ in c.until_ready()]
        c.close()
        return types

    got = exchange(proxy.port)
    assert got == exchange(pg.port)
    assert "v" in got  # NegotiateProtocolVersion


def test_bytes_after_ssl_request_refused(proxy: ProxyProcess) -> None:
    c = RawClient(proxy.port, connect=False)
    c.send_raw(SSLRequest().encode() + b"junk")
    typ, body = c.recv_message()
    assert typ == "E" and "unencrypted data after SSL request" in decode_fields(body)["M"]


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    before_login=st.booleans(),
    payload=st.one_of(
        st.binary(min_size=1, max_size=300),
        st.lists(
            st.tuples(st.sampled_from(b"QPBEDCSHXdcfFp\x00\xffZ"), st.binary(max_size=40)),
            min_size=1,
            max_size=6,
        ).map(
            lambda msgs: b"".join(bytes([t]) + struct.pack("!I", len(b) + 4) + b for t, b in msgs)
        ),
    ),
)
def test_fuzzed_client_bytes_never_hurt_the_proxy(
    proxy: ProxyProcess, before_login: bool, payload: bytes
) -> None:
    c = RawClient(proxy.port, connect=not before_login)
    try:
        c.send_raw(payload)
        c.sock.settimeout(0.3)
        try:
            while c.sock.recv(65536):
                pass
        except (TimeoutError, ConnectionError):
            pass
    finally:
        c.close()
    assert proxy.alive()
    probe = RawClient(proxy.port)
    assert [t for t, _ in probe.query("SELECT 1")][-1] == "Z"
    probe.close()


def test_upstream_down_then_back(certs: object) -> None:
    port = free_port()
    with ProxyProcess(port, "--upstream-sslmode", "disable", "--connect-timeout", "2") as p:
        with pytest.raises(psycopg.OperationalError) as info:
            psycopg.connect(
                f"host=127.0.0.1 port={p.port} user=postgres password=x sslmode=disable"
            )
        assert "pgveil could not connect to the server" in str(info.value)
        raw = RawClient(p.port, connect=False)  # libpq hides the SQLSTATE of a failed login
        raw.send_raw(StartupMessage(m.PROTOCOL_3_0, {"user": "postgres"}).encode())
        assert [(e["S"], e["C"]) for e in errors_in(raw.until_ready())] == [("FATAL", "08006")]
        raw.close()
        status, body = p.http("/healthz")
        assert status == 503 and '"upstream_reachable":false' in body
        assert p.metric("pgveil_upstream_connect_failures_total") >= 1
        server = EmbeddedPostgres(port=port).start()
        try:
            with psycopg.connect(server.dsn(port=p.port) + " sslmode=disable") as conn:
                assert conn.execute("SELECT 1").fetchone() == (1,)
            assert p.http("/healthz")[0] == 200
            # server goes away under an open session: a clean FATAL, then back again
            conn = psycopg.connect(server.dsn(port=p.port) + " sslmode=disable")
            server.stop("immediate")
            with pytest.raises(psycopg.OperationalError):
                conn.execute("SELECT 1")
            conn.close()
            server.restart()
            with psycopg.connect(server.dsn(port=p.port) + " sslmode=disable") as conn:
                assert conn.execute("SELECT 2").fetchone() == (2,)
        finally:
            server.cleanup()
        assert p.alive()
