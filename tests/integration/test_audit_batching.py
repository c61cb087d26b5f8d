"""Batched audit writes (`AuditWriter.batch_writes`): client bytes wait behind the events
linked in the same event-loop iteration. What must hold: a client never has a result
whose event has not been handed to the operating system, and every client still gets a
byte-identical, correctly ordered stream, whatever the other sessions are doing and
whatever happens to the audit sinks.
"""

from __future__ import annotations

import os
import resource
import signal
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

from audit.files import rotated_files, verify_files
from proxy.demo.embedded_pg import EmbeddedPostgres
from proxy.wire import messages as m
from proxy.wire.errors import severity_of
from tests.conftest import TRUST_USER, Certs
from tests.integration.audit_wire import (
    audit_env,
    audited_proxy,
    events,
    query_message,
    read_until,
    rules_file,
    start_audited,
    wait_failing,
    wait_for,
)
from tests.integration.masking_fixture import (
    ADMIN,
    ADMIN_PW,
    HELPDESK,
    HELPDESK_PW,
    dsn,
)
from tests.support import ProxyProcess, RawClient, spawn_listening

PERSONAL = "SELECT i_customer, name FROM billing.customers ORDER BY 1"


# ---- helpers ------------------------------------------------------------------------------


def raw_bytes(port: int, payload: bytes, readies: int) -> bytes:
    """Everything the server side sends for `payload`, as one byte string."""
    c = RawClient(port, TRUST_USER)
    try:
        c.send_raw(payload)
        got = read_until(c, readies, timeout=20)
        return b"".join(bytes([ord(t)]) + struct.pack("!I", len(b) + 4) + b for t, b in got)
    finally:
        c.close()


class Load:
    """Other sessions completing statements on personal data as fast as they can, so that
    there is nearly always an event waiting for the next write."""

    def __init__(
        self, port: int, pg: EmbeddedPostgres, sessions: int = 3, ended_ok: bool = False
    ) -> None:
        self.ended_ok = ended_ok  # the proxy may end these sessions (shutdown)
        self.stop = threading.Event()
        self.count = 0
        self.errors: list[BaseException] = []
        self.threads = [
            threading.Thread(target=self._run, args=(dsn(pg, port, ADMIN, ADMIN_PW),))
            for _ in range(sessions)
        ]

    def _run(self, conninfo: str) -> None:
        try:
            with psycopg.connect(conninfo, autocommit=True) as c:
                while not self.stop.is_set():
                    c.execute(PERSONAL).fetchall()
                    self.count += 1
        except BaseException as exc:  # reported by the test
            self.errors.append(exc)

    def __enter__(self) -> Load:
        for t in self.threads:
            t.start()
        wait_for(lambda: self.count > 10, "the load sessions")
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(20)
        assert self.ended_ok or not self.errors, self.errors


@pytest.fixture(scope="module")
def shared(
    pg: EmbeddedPostgres, billing: ProxyProcess, tmp_path_factory: Any
) -> Iterator[tuple[ProxyProcess, Path]]:
    with audited_proxy(pg, tmp_path_factory.mktemp("audit-batching")) as shared_proxy:
        yield shared_proxy


# ---- guards: what works -------------------------------------------------------------------


def test_pipelined_streams_stay_byte_identical_under_event_load(
    pg: EmbeddedPostgres, shared: tuple[ProxyProcess, Path]
) -> None:
    """A recorded session's pipeline (simple and extended protocol, COPY OUT, a large
    result, errors) gets the same bytes through pgveil as from the server, while other
    sessions keep events pending, so that most of its chunks are held and released."""
    p, _ = shared
    personal = PERSONAL.encode() + b"\0"
    payload = b"".join(
        [
            query_message(PERSONAL),
            m.message(ord("P"), b"s1\0" + personal + b"\0\0"),
            m.message(ord("B"), b"\0s1\0\0\0\0\0\0\0"),
            m.message(ord("D"), b"P\0"),
            m.message(ord("E"), b"\0\0\0\0\0"),
            m.message(ord("S")),
            query_message("COPY (SELECT i_customer, email FROM billing.customers) TO STDOUT"),
            query_message("SELECT g, repeat('y', 200) FROM generate_series(1, 20000) g"),
            query_message("SELECT 1/0"),
            query_message("SELECT name FROM billing.customers, generate_series(1, 3000)"),
            query_message(PERSONAL + "; SELECT 2"),
        ]
    )
    direct = raw_bytes(pg.port, payload, 7)
    with Load(p.port, pg):
        for _ in range(3):
            assert raw_bytes(p.port, payload, 7) == direct


def test_a_slow_reader_of_a_large_result_gets_every_byte_in_order(
    pg: EmbeddedPostgres, shared: tuple[ProxyProcess, Path]
) -> None:
    """Flow control with held bytes: the client does not read for a while, so the proxy's
    write buffer fills and the upstream is paused, while other sessions keep events
    pending; then it reads everything."""
    p, _ = shared
    sql = (
        "SELECT g, repeat(md5(g::text), 30) FROM generate_series(1, 20000) g "
        "UNION ALL SELECT i_customer, name FROM billing.customers"
    )

    def fetch(port: int, slow: bool) -> bytes:
        c = RawClient(port, TRUST_USER)
        try:
            c.send_raw(query_message(sql))
            if slow:
                time.sleep(0.7)
            got = read_until(c, 1, timeout=20)
            return b"".join(bytes([ord(t)]) + b for t, b in got)
        finally:
            c.close()

    direct = fetch(pg.port, slow=False)
    assert len(direct) > 20 * 1024 * 1024 // 20
    with Load(p.port, pg):
        assert fetch(p.port, slow=True) == direct


def test_notifications_arrive_in_order_while_other_sessions_have_events_pending(
    pg: EmbeddedPostgres, shared: tuple[ProxyProcess, Path]
) -> None:
    p, _ = shared
    listener = RawClient(p.port, TRUST_USER)
    try:
        listener.query("LISTEN batching")
        with (
            Load(p.port, pg),
            psycopg.connect(dsn(pg, p.port, ADMIN, ADMIN_PW), autocommit=True) as c,
        ):
            for i in range(60):
                c.execute(PERSONAL).fetchall()
                c.execute(f"NOTIFY batching, '{i}'")
            listener.sock.settimeout(10)
            payloads: list[str] = []
            while len(payloads) < 60:
                typ, body = listener.recv_message()
                assert typ == "A", (typ, body)
                payloads.append(body[4:].split(b"\0")[1].decode())
        assert payloads == [str(i) for i in range(60)]
        assert [t for t, _ in listener.query("SELECT 1")] == ["T", "D", "C", "Z"]
    finally:
        listener.close()


def test_a_fatal_from_the_server_follows_the_held_result(
    pg: EmbeddedPostgres, shared: tuple[ProxyProcess, Path]
) -> None:
    """The server ends the session right after a result whose event is pending: the client
    gets the result, then the FATAL, and the event is written before either."""
    p, path = shared
    with Load(p.port, pg):
        for n in range(5):
            app = f"fatal{n}"
            c = RawClient(p.port, TRUST_USER, application_name=app)
            try:
                c.send_raw(
                    query_message(PERSONAL)
                    + query_message("SELECT pg_terminate_backend(pg_backend_pid())")
                )
                got = read_until(c, 2)
                assert len(events(path, app)) == 1
                assert [t for t, _ in got][:5] == ["T", "D", "D", "C", "Z"], got
                assert got[-1][0] == "E" and severity_of(got[-1][1]) == "FATAL", got
                assert c.closed_by_peer()
            finally:
                c.close()


def test_tls_clients_get_results_after_their_events(
    pg: EmbeddedPostgres, billing: ProxyProcess, certs: Certs, tmp_path: Path
) -> None:
    """Clients on TLS (the transport from loop.start_tls), several at once: the SSLRequest
    answer is not stuck behind events, and every result follows its event."""
    path = tmp_path / "audit.jsonl"
    tls = ("--tls-cert", str(certs.cert), "--tls-key", str(certs.key))
    with start_audited(pg, tmp_path, *tls) as p:
        failures: list[str] = []

        def session(i: int) -> None:
            app = f"tls{i}"
            user, password = (ADMIN, ADMIN_PW) if i % 2 else (HELPDESK, HELPDESK_PW)
            conninfo = (
                f"host=127.0.0.1 port={p.port} user={user} password={password} "
                f"dbname=postgres sslmode=require application_name={app}"
            )
            try:
                with psycopg.connect(conninfo, autocommit=True) as c:
                    assert c.pgconn.ssl_in_use
                    for done in range(1, 21):
                        c.execute(PERSONAL).fetchall()
                        if len(events(path, app)) < done:
                            failures.append(f"{app}: result {done} before its event")
            except Exception as exc:  # reported below
                failures.append(f"{app}: {exc!r}")

        threads = [threading.Thread(target=session, args=(i,)) for i in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        assert not failures, failures
        assert "Traceback" not in p.log()


def test_sigterm_drain_writes_every_event_before_its_result(
    pg: EmbeddedPostgres, billing: ProxyProcess, tmp_path: Path
) -> None:
    """SIGTERM while sessions run: a session in a transaction finishes it, then gets 57P01;
    every result a client received has its event in the file, and the chain is intact."""
    path = tmp_path / "audit.jsonl"
    p = start_audited(pg, tmp_path, "--shutdown-timeout", "5")
    try:
        busy = RawClient(p.port, TRUST_USER, application_name="busy")
        idle = RawClient(p.port, TRUST_USER, application_name="idle")
        busy.query("BEGIN")
        assert busy.query(PERSONAL)[-1] == ("Z", b"T")
        with Load(p.port, pg, sessions=2, ended_ok=True):
            p.signal(signal.SIGTERM)
            assert idle.closed_by_peer()
            busy.send_raw(query_message(PERSONAL) + query_message("COMMIT"))
            got = read_until(busy, 2)
            assert [t for t, _ in got][:5] == ["T", "D", "D", "C", "Z"], got
            assert len(events(path, "busy")) == 2
            assert busy.closed_by_peer()
            p.proc.wait(15)
    finally:
        p.stop()
    checked, broken, _ = verify_files(rotated_files(path))
    assert broken is None and checked > 0


# ---- a failing audit file withholds results -------------------------------------------------


def test_no_result_is_released_when_its_event_could_not_be_written(
    pg: EmbeddedPostgres, billing: ProxyProcess, tmp_path: Path
) -> None:
    """The audit file stops taking writes (a full disk; here RLIMIT_FSIZE of the proxy set
    to the file's size, so the next write fails with EFBIG) while a statement on personal
    data runs. Its event cannot be handed to the OS, so its result must not reach the
    client: it is withheld, and the session is closed after the block timeout. Other
    sessions' personal statements wait, then are refused; the event is written once the
    file takes writes again."""
    path = tmp_path / "audit.jsonl"
    p = start_audited(pg, tmp_path, "--log-level", "error", "--audit-block-timeout", "1")
    c = RawClient(p.port, TRUST_USER, application_name="efbig")
    try:
        assert [t for t, _ in c.query(PERSONAL)] == ["T", "D", "D", "C", "Z"]
        wait_for(lambda: len(events(path, "efbig")) == 1, "the first event")
        size = path.stat().st_size
        resource.prlimit(p.proc.pid, resource.RLIMIT_FSIZE, (size, resource.RLIM_INFINITY))
        c.send_raw(query_message(PERSONAL))
        got = read_until(c, 1, timeout=4)
        assert got == [], f"a result whose event was not written reached the client: {got}"
        with pytest.raises((ConnectionError, OSError)):
            c.send_raw(query_message("SELECT 1"))
            assert read_until(c, 1, timeout=2) == []
            c.recv_message()  # closed: withheld longer than the block timeout
        other = RawClient(p.port, TRUST_USER, application_name="efbig2")
        try:
            refused = other.query(PERSONAL)
            assert any(t == "E" and b"audit stream" in b for t, b in refused), refused
        finally:
            other.close()
        resource.prlimit(
            p.proc.pid, resource.RLIMIT_FSIZE, (resource.RLIM_INFINITY, resource.RLIM_INFINITY)
        )
        wait_for(lambda: len(events(path, "efbig")) == 2, "the queued event", timeout=5)
        assert p.alive()
    finally:
        c.close()
        with_limit_lifted(p)


def test_a_withheld_result_goes_out_when_its_event_is_written(
    pg: EmbeddedPostgres, billing: ProxyProcess, tmp_path: Path
) -> None:
    """The file takes writes again before the block timeout: the withheld result reaches
    the client right after its event, and the session goes on."""
    path = tmp_path / "audit.jsonl"
    p = start_audited(pg, tmp_path, "--log-level", "error", "--audit-block-timeout", "10")
    c = RawClient(p.port, TRUST_USER, application_name="later")
    try:
        assert [t for t, _ in c.query(PERSONAL)] == ["T", "D", "D", "C", "Z"]
        wait_for(lambda: len(events(path, "later")) == 1, "the first event")
        resource.prlimit(
            p.proc.pid, resource.RLIMIT_FSIZE, (path.stat().st_size, resource.RLIM_INFINITY)
        )
        c.send_raw(query_message(PERSONAL) + query_message("SELECT 2"))
        wait_failing(p)
        assert read_until(c, 1, timeout=0) == []
        resource.prlimit(
            p.proc.pid, resource.RLIMIT_FSIZE, (resource.RLIM_INFINITY, resource.RLIM_INFINITY)
        )
        got = read_until(c, 2, timeout=5)
        assert [t for t, _ in got] == ["T", "D", "D", "C", "Z", "T", "D", "C", "Z"], got
        assert len(events(path, "later")) == 2
        assert [t for t, _ in c.query(PERSONAL)] == ["T", "D", "D", "C", "Z"]
    finally:
        c.close()
        with_limit_lifted(p)


def with_limit_lifted(p: ProxyProcess) -> None:
    if p.alive():
        unlimited = (resource.RLIM_INFINITY, resource.RLIM_INFINITY)
        resource.prlimit(p.proc.pid, resource.RLIMIT_FSIZE, unlimited)
    p.stop()


def test_a_closed_stdout_withholds_results_without_reordering(
    pg: EmbeddedPostgres, billing: ProxyProcess, tmp_path: Path
) -> None:
    """The stdout sink with standard output closed (`sys.stdout` is None): the sink fails
    like any other. The personal result is withheld (its event cannot be written) and the
    next statement's answer is not written ahead of it; the session is closed after the
    block timeout; SIGTERM still stops the proxy."""
    log = tmp_path / "pgveil.log"
    args = [
        sys.executable, "-m", "proxy.cli", "proxy", "--upstream", f"127.0.0.1:{pg.port}",
        "--upstream-sslmode", "disable", "--rules", str(rules_file(tmp_path)),
        "--catalog-user", pg.superuser, "--audit-stdout", "true", "--audit-block-timeout", "1",
    ]  # fmt: skip
    proc, port = spawn_listening(
        lambda port: [*args, "--listen", f"127.0.0.1:{port}"],
        log,
        stdin=subprocess.DEVNULL,
        env={**os.environ, **audit_env(pg)},
        preexec_fn=lambda: os.close(1),  # the child only closes fd 1
    )
    try:
        c = RawClient(port, TRUST_USER, application_name="stranded")
        try:
            c.send_raw(query_message(PERSONAL) + query_message("SELECT pg_sleep(0.3), 2"))
            got = read_until(c, 2, timeout=4)
        finally:
            c.close()
        # the session.start event could not be written either: the personal statement is
        # refused after the block timeout; the other one runs; no personal row goes out
        assert not any(t == "T" and b"i_customer" in b for t, b in got), got
        assert got[:1] == [] or (got[0][0] == "E" and b"audit stream" in got[0][1]), got
        assert b"audit.write_failed" in log.read_bytes()
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            assert proc.wait(5) is not None
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            raise


def test_rows_of_a_streamed_result_do_not_precede_its_event(
    pg: EmbeddedPostgres, shared: tuple[ProxyProcess, Path]
) -> None:
    """A result larger than the server's send buffer streams while the statement runs:
    its first rows reach the client before it completes. A `running` access event is
    written before they go out; the complete event follows with the same number."""
    p, path = shared
    c = RawClient(p.port, TRUST_USER, application_name="streamed")
    try:
        c.send_raw(
            query_message(
                "SELECT name, repeat('x', 20000) AS pad FROM billing.customers "
                "UNION ALL SELECT NULL, pg_sleep(1.5)::text"
            )
        )
        c.sock.settimeout(10)
        typ, _ = c.recv_message()
        assert typ == "T"
        typ, _ = c.recv_message()
        assert typ == "D"
        written_at_first_row = len(events(path, "streamed"))
        read_until(c, 1)
        wait_for(lambda: len(events(path, "streamed")) == 2, "the complete event")
        assert written_at_first_row == 1, "personal-data rows were released before the event"
        running, complete = events(path, "streamed")
        assert running["outcome"] == "running" and complete["outcome"] == "ok"
        assert running["running"] == complete["running"]
        assert running["tables"] == complete["tables"] == ["billing.customers"]
    finally:
        c.close()
