"""Withheld results and `running` events.

What must hold: a result never reaches its client before the audit event describing it is
handed to the operating system; while the file or stdout sink fails, results whose events
could not be written are withheld (with every later byte of the same client, in order)
until the sink takes the events, and those connections are closed after
--audit-block-timeout; a result spanning several reads gets a `running` event before its
first rows go out, and its complete event carries the same number; `pgveil audit who`
hides a running event when its complete event exists. Unmasked roles otherwise get
byte-identical streams.
"""

from __future__ import annotations

import datetime as dt
import fcntl
import json
import os
import signal
import socket
import ssl
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from audit.files import rotated_files, verify_files
from proxy.cli.audit import who
from proxy.demo.embedded_pg import EmbeddedPostgres
from proxy.wire import messages as m
from proxy.wire.errors import sqlstate_of
from proxy.wire.startup import SSLRequest, StartupMessage
from tests.conftest import TRUST_USER, Certs
from tests.integration.audit_wire import (
    SYNC,
    Messages,
    all_events,
    audit_env,
    audited_proxy,
    bind,
    describe_portal,
    events,
    execute,
    limit_file,
    parse,
    query_message,
    read_until,
    start_audited,
    stop_unlimited,
    wait_failing,
    wait_for,
)
from tests.integration.masking_fixture import NAME, RULES
from tests.support import ProxyProcess, RawClient, spawn_listening

MASKED_USER = "masked_trust"  # masked (member of cc_staff), trust authentication
PERSONAL = "SELECT i_customer, name FROM billing.customers ORDER BY 1"
# about 40 MB of personal rows: more than the proxy's write buffer and both sockets' kernel
# buffers, so a client that reads only the first rows keeps the statement running
BIG = 10_000
PAD = 2_000
STREAMED = (
    f"SELECT c.i_customer, c.name, repeat('x', {PAD}) AS pad "
    f"FROM billing.customers c, generate_series(1, {BIG}) g"
)


# ---- helpers ------------------------------------------------------------------------------


def read_to(client: RawClient, types: str, timeout: float = 10) -> Messages:
    """Messages up to and including the first whose type is in `types`."""
    client.sock.settimeout(timeout)
    out: Messages = []
    while True:
        typ, body = client.recv_message()
        out.append((typ, body))
        if typ in types:
            return out


def closed_within(client: RawClient, timeout: float) -> float | None:
    """Seconds until the proxy closed the connection (reading and dropping what comes)."""
    start = time.monotonic()
    client.sock.settimeout(0.05)
    while time.monotonic() - start < timeout:
        try:
            chunk = client.sock.recv(1 << 20)
        except TimeoutError:
            continue
        except OSError:
            return time.monotonic() - start
        if not chunk:
            return time.monotonic() - start
        client.buf += chunk
    return None


def assert_running_then_complete(
    path: Path, app: str, at_first_rows: list[dict[str, Any]], skip: int = 0
) -> None:
    """When the first rows reached the client, a `running` event was in the file; once
    the statement completed, one complete event carries its number. `skip`: events of
    earlier statements of the session."""
    at_first_rows = at_first_rows[skip:]
    assert [e["outcome"] for e in at_first_rows] == ["running"], (
        f"{app}: rows reached the client with events {at_first_rows}"
    )
    number = at_first_rows[0]["running"]
    wait_for(lambda: any(e["outcome"] != "running" for e in events(path, app)[skip:]), "completion")
    found = events(path, app)[skip:]
    complete = [e for e in found if e["outcome"] != "running"]
    running = [e for e in found if e["outcome"] == "running"]
    assert len(running) == 1 and len(complete) == 1, found
    assert complete[0]["running"] == number, found
    assert complete[0]["tables"] == running[0]["tables"] == ["billing.customers"]


def streamed(
    port: int, path: Path, app: str, payload: bytes, first: str, user: str = TRUST_USER
) -> Messages:
    """Send `payload`, read up to the first message of type `first` (rows), note the
    events then, read the rest; check running then complete."""
    c = RawClient(port, user, application_name=app)
    try:
        c.send_raw(payload)
        head = read_to(c, first)
        at_first_rows = events(path, app)
        rest = read_until(c, 1, timeout=30)
        assert rest and rest[-1][0] == "Z", rest[-3:]
        assert_running_then_complete(path, app, at_first_rows)
        return head + rest
    finally:
        c.close()


def tls_client(port: int, app: str) -> RawClient:
    """A RawClient over TLS (SSLRequest, then the handshake, then the startup)."""
    c = RawClient(port, TRUST_USER, connect=False)
    c.sock.sendall(SSLRequest().encode())
    assert c.sock.recv(1) == b"S"
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    c.sock = ctx.wrap_socket(c.sock)
    c.send_raw(
        StartupMessage(
            m.PROTOCOL_3_0, {"user": TRUST_USER, "database": "postgres", "application_name": app}
        ).encode()
    )
    c.until_ready()
    return c


def vm_kib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise AssertionError(f"no {field} for {pid}")


def ts_between(a: str, b: str) -> str:
    """An event timestamp halfway between two others."""
    fmt = "%Y-%m-%dT%H:%M:%S.%fZ"
    ta, tb = dt.datetime.strptime(a, fmt), dt.datetime.strptime(b, fmt)
    return (ta + (tb - ta) / 2).strftime(fmt)


@pytest.fixture(scope="module")
def shared(
    pg: EmbeddedPostgres, billing: ProxyProcess, tmp_path_factory: Any
) -> Iterator[tuple[ProxyProcess, Path]]:
    with audited_proxy(pg, tmp_path_factory.mktemp("audit-withheld")) as shared_proxy:
        yield shared_proxy


# ---- guards: running events for streamed results ----------------------------------------


def test_masked_simple_query_stream_has_running_event_first(
    shared: tuple[ProxyProcess, Path],
) -> None:
    p, path = shared
    got = streamed(p.port, path, "w-masked", query_message(STREAMED), "D", user=MASKED_USER)
    assert NAME.encode() not in b"".join(b for _, b in got)


def test_unmasked_extended_max_rows_each_execute_has_its_running_event(
    shared: tuple[ProxyProcess, Path],
) -> None:
    """Execute with a row limit (PortalSuspended), then the rest: two statements, each
    with one running and one complete event of its own number."""
    p, path = shared
    app = "w-maxrows"
    c = RawClient(p.port, TRUST_USER, application_name=app)
    try:
        c.send_raw(
            parse(STREAMED) + bind() + describe_portal() + execute(max_rows=BIG) + execute() + SYNC
        )
        read_to(c, "D")
        first = events(path, app)
        got = read_until(c, 1, timeout=30)
        types = [t for t, _ in got]
        assert "s" in types and types[-1] == "Z", types[-5:]
        wait_for(lambda: len(events(path, app)) >= 4, "four events")
        found = events(path, app)
        assert [e["outcome"] for e in first] == ["running"], first
        numbers = sorted(e["running"] for e in found)
        assert [e["outcome"] for e in found].count("running") == 2, found
        assert numbers[0] == numbers[1] and numbers[2] == numbers[3] != numbers[0], found
        assert len(found) == 4, found
    finally:
        c.close()


def test_unmasked_extended_without_describe_streams_after_running(
    shared: tuple[ProxyProcess, Path],
) -> None:
    p, path = shared
    streamed(p.port, path, "w-ext", parse(STREAMED) + bind() + execute() + SYNC, "D")


@pytest.mark.parametrize("user", [TRUST_USER, MASKED_USER])
def test_copy_to_stdout_streams_after_running(shared: tuple[ProxyProcess, Path], user: str) -> None:
    p, path = shared
    sql = f"COPY ({STREAMED}) TO STDOUT"
    got = streamed(p.port, path, f"w-copy-{user}", query_message(sql), "d", user=user)
    assert [t for t, _ in got][:2] == ["H", "d"], got[:2]


def test_cursor_fetch_streams_after_running(shared: tuple[ProxyProcess, Path]) -> None:
    p, path = shared
    app = "w-fetch"
    c = RawClient(p.port, TRUST_USER, application_name=app)
    try:
        assert c.query("BEGIN")[-1] == ("Z", b"T")
        assert c.query(f"DECLARE cur CURSOR FOR {STREAMED}")[-1] == ("Z", b"T")
        before = len(events(path, app))
        c.send_raw(query_message(f"FETCH {BIG * 2} FROM cur"))
        read_to(c, "D")
        at_first_rows = events(path, app)
        assert read_until(c, 1, timeout=30)[-1] == ("Z", b"T")
        assert_running_then_complete(path, app, at_first_rows, skip=before)
        c.query("COMMIT")
    finally:
        c.close()


# ---- `pgveil audit who` over streamed results ---------------------------------------------


def test_who_counts_a_streamed_statement_once(shared: tuple[ProxyProcess, Path]) -> None:
    p, path = shared
    app = "w-who-once"
    streamed(p.port, path, app, query_message(STREAMED), "D")
    rows = [r for r in who(all_events(path), "billing.customers", "1", None, None)]
    mine = [r for r in rows if r["application_name"] == app]
    assert [(r["touched"], r["outcome"]) for r in mine] == [("yes", "ok")], mine


def test_who_shows_rows_released_by_a_statement_that_failed_later(
    shared: tuple[ProxyProcess, Path],
) -> None:
    """Rows of billing.customers (the name of subject 1) stream to the client, then the
    statement fails (division by zero): its `running` event says it was read, its complete
    event carries outcome 22012 and the same `running` number. `who` still lists the
    access (the client has the rows), although a complete event exists and its outcome is
    not ok."""
    p, path = shared
    app = "w-who-failed"
    c = RawClient(p.port, TRUST_USER, application_name=app)
    try:
        c.send_raw(
            query_message(
                f"SELECT c.name, repeat('x', {PAD}), 1 / ({BIG} - g) "
                f"FROM billing.customers c, generate_series(1, {BIG}) g"
            )
        )
        got = read_until(c, 1, timeout=30)
    finally:
        c.close()
    rows = [b for t, b in got if t == "D"]
    assert len(rows) > 1000 and any(NAME.encode() in b for b in rows[:10])
    assert got[-2][0] == "E" and sqlstate_of(got[-2][1]) == "22012", got[-2:]
    wait_for(lambda: len(events(path, app)) == 2, "running and complete events")
    running, complete = events(path, app)
    assert running["outcome"] == "running" and complete["outcome"] == "22012"
    assert complete["running"] == running["running"]
    report = [
        r
        for r in who(all_events(path), "billing.customers", "1", None, None)
        if r["application_name"] == app
    ]
    assert report, "who does not list a statement whose rows of subject 1 reached the client"


def test_who_until_between_running_and_complete_keeps_the_access(
    shared: tuple[ProxyProcess, Path],
) -> None:
    """Rows go out at t1 (running event), the statement completes at t2. `who --until T`
    with t1 < T <= t2 lists the read at t1: a running event is hidden only by a complete
    event inside the window."""
    p, path = shared
    app = "w-who-until"
    sql = (
        "SELECT c.i_customer, c.name, repeat('x', 20000) FROM billing.customers c "
        "UNION ALL SELECT NULL, NULL, pg_sleep(1.5)::text"
    )
    c = RawClient(p.port, TRUST_USER, application_name=app)
    try:
        c.send_raw(query_message(sql))
        assert read_until(c, 1, timeout=10)[-1][0] == "Z"
    finally:
        c.close()
    wait_for(lambda: len(events(path, app)) == 2, "running and complete events")
    running, complete = events(path, app)
    assert running["outcome"] == "running" and complete["running"] == running["running"]
    until = ts_between(running["ts"], complete["ts"])
    everything = all_events(path)
    before = [r for r in who(everything, "billing.customers", "1", None, until)]
    assert any(r["application_name"] == app for r in before), (
        f"rows read at {running['ts']} are not reported by who --until {until}"
    )


# ---- the sink fails ------------------------------------------------------------------------


def test_recovery_writes_queued_events_in_chain_order_tls_and_plain(
    pg: EmbeddedPostgres, billing: ProxyProcess, certs: Certs, tmp_path: Path
) -> None:
    """Guard. Pipelined statements (simple and extended, personal and not) from a plain
    and a TLS client are in flight when the file stops taking writes: nothing of them
    arrives while it fails; once it takes writes again every byte arrives in order, every
    queued event is in the file in chain order, and the chain verifies."""
    path = tmp_path / "audit.jsonl"
    tls = ("--tls-cert", str(certs.cert), "--tls-key", str(certs.key))
    p = start_audited(pg, tmp_path, "--audit-block-timeout", "10", *tls)
    payload = (
        query_message(PERSONAL)
        + query_message("SELECT 2")
        + parse(PERSONAL)
        + bind()
        + execute()
        + SYNC
        + query_message(PERSONAL + "; SELECT 3")
    )
    expected = ["T", "D", "D", "C", "Z", "T", "D", "C", "Z", "1", "2", "D", "D", "C", "Z"]
    expected += ["T", "D", "D", "C", "T", "D", "C", "Z"]
    clients = [RawClient(p.port, TRUST_USER, application_name="rec-plain")]
    try:
        clients.append(tls_client(p.port, "rec-tls"))
        for c in clients:
            assert [t for t, _ in c.query(PERSONAL)] == ["T", "D", "D", "C", "Z"]
        limit_file(p, path.stat().st_size)
        for c in clients:
            c.send_raw(payload)
        wait_failing(p)
        for c in clients:
            assert read_until(c, 1, timeout=0) == []
        limit_file(p, None)
        for c in clients:
            got = read_until(c, 4, timeout=10)
            assert [t for t, _ in got] == expected, got
        for app in ("rec-plain", "rec-tls"):
            done = [e for e in events(path, app) if e["outcome"] != "running"]
            assert len(done) == 4, events(path, app)
        checked, broken, _ = verify_files(rotated_files(path))
        assert broken is None and checked > 0, broken
    finally:
        for c in clients:
            c.close()
        stop_unlimited(p)
    assert "Traceback" not in p.log(), p.log()


def test_a_short_write_is_not_repeated_into_the_file(
    pg: EmbeddedPostgres, billing: ProxyProcess, tmp_path: Path
) -> None:
    """A full disk accepts part of a write, then refuses the rest (here RLIMIT_FSIZE a few
    bytes above the file's size: write() returns a short count, the next one fails with
    EFBIG). Once the file takes writes again the rest of the line follows, not the whole
    line again: the file holds no torn line and `pgveil audit verify` finds it intact."""
    path = tmp_path / "audit.jsonl"
    p = start_audited(pg, tmp_path, "--audit-block-timeout", "10")
    c = RawClient(p.port, TRUST_USER, application_name="torn")
    try:
        assert [t for t, _ in c.query(PERSONAL)] == ["T", "D", "D", "C", "Z"]
        limit_file(p, path.stat().st_size + 40)
        c.send_raw(query_message(PERSONAL))
        wait_failing(p)  # the short write and the failing one were made
        assert read_until(c, 1, timeout=0) == []
        limit_file(p, None)
        assert [t for t, _ in read_until(c, 1, timeout=5)] == ["T", "D", "D", "C", "Z"]
    finally:
        c.close()
        stop_unlimited(p)
    torn = []
    for line in path.read_bytes().splitlines():
        try:
            json.loads(line)
        except ValueError:
            torn.append(line[:80])
    assert not torn, f"torn lines in the audit file (audit verify fails): {torn}"
    _, broken, _ = verify_files(rotated_files(path))
    assert broken is None, broken


class Churn:
    """Sessions that log in and out as fast as they can: each writes session.start and
    session.end events, so that nearly every event-loop iteration links one. They do not
    wait for answers (those may be withheld too)."""

    def __init__(self, port: int, threads: int = 8) -> None:
        self.port = port
        self.stop = threading.Event()
        self.logins = 0
        self.threads = [threading.Thread(target=self._run) for _ in range(threads)]

    def _run(self) -> None:
        while not self.stop.is_set():
            try:
                s = socket.create_connection(("127.0.0.1", self.port), timeout=0.5)
                startup = StartupMessage(
                    m.PROTOCOL_3_0, {"user": TRUST_USER, "database": "postgres"}
                )
                s.sendall(startup.encode())
                time.sleep(0.005)  # long enough to log in; the answer is not awaited
                s.close()
                self.logins += 1
            except OSError:
                pass

    def __enter__(self) -> Churn:
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(10)


def raw_response(port: int, sql: str, app: str) -> bytes:
    """The whole answer to `sql`, as the bytes on the wire."""
    c = RawClient(port, TRUST_USER, application_name=app)
    try:
        c.send_raw(query_message(sql))
        got = read_until(c, 1, timeout=20)
        return b"".join(t.encode() + struct.pack("!I", len(b) + 4) + b for t, b in got)
    finally:
        c.close()


def read_slowly(client: RawClient, size: int, timeout: float) -> bytes:
    """Up to `size` bytes, 64 kB at a time with a pause between reads (so that the stream
    spans many event-loop iterations of the proxy), until the connection ends."""
    out = bytearray(client.buf)
    client.sock.settimeout(timeout)
    try:
        while len(out) < size:
            chunk = client.sock.recv(65536)
            if not chunk:
                break
            out += chunk
            time.sleep(0.002)
    except OSError:
        pass
    return bytes(out)


def test_a_result_without_event_is_not_withheld_with_other_sessions_events(
    pg: EmbeddedPostgres, billing: ProxyProcess, tmp_path: Path
) -> None:
    """While the file fails, an unmasked session streams a result that touches no personal
    data (it has no event), and other sessions log in and out (session.start and
    session.end events, which cannot be written). Only results whose own events are
    unwritten are withheld: the innocent stream reaches its client whole, byte for byte
    as PostgreSQL sends it."""
    path = tmp_path / "audit.jsonl"
    sql = "SELECT g, repeat('y', 500) FROM (SELECT pg_sleep(1)) s, generate_series(1, 40000) g"
    direct = raw_response(pg.port, sql, "innocent")
    p = start_audited(pg, tmp_path, "--audit-block-timeout", "2")
    a = RawClient(p.port, TRUST_USER, application_name="trigger")
    b = RawClient(p.port, TRUST_USER, application_name="innocent")
    try:
        assert [t for t, _ in a.query(PERSONAL)] == ["T", "D", "D", "C", "Z"]
        limit_file(p, path.stat().st_size)
        b.send_raw(query_message(sql))  # runs: the file has not failed yet
        a.send_raw(query_message(PERSONAL))  # its event fails: the sink is failing
        with Churn(p.port) as churn:
            through = read_slowly(b, len(direct), timeout=4)
        assert churn.logins > 10
        same = through == direct
        withheld = "audit.results_withheld" in p.log()
        assert same, (
            f"{len(through)} of {len(direct)} bytes of a result without personal data "
            f"reached the client (connections closed as withheld: {withheld})"
        )
    finally:
        a.close()
        b.close()
        stop_unlimited(p)


def test_each_withheld_connection_gets_the_whole_block_timeout(
    pg: EmbeddedPostgres, billing: ProxyProcess, tmp_path: Path
) -> None:
    """Two connections' results are withheld 2 s apart: each connection is closed only after
    its own result has waited --audit-block-timeout (not when the oldest has), and
    neither gets its result."""
    path = tmp_path / "audit.jsonl"
    timeout = 3.0
    p = start_audited(pg, tmp_path, "--audit-block-timeout", str(timeout))
    first = RawClient(p.port, TRUST_USER, application_name="first")
    second = RawClient(p.port, TRUST_USER, application_name="second")
    try:
        for c in (first, second):
            assert [t for t, _ in c.query(PERSONAL)] == ["T", "D", "D", "C", "Z"]
        limit_file(p, path.stat().st_size)
        sent = time.monotonic()
        second.send_raw(
            query_message(
                "SELECT i_customer, name FROM billing.customers "
                "WHERE (SELECT pg_sleep(2)) IS NOT NULL"
            )
        )
        first.send_raw(query_message(PERSONAL))  # withheld now
        first_closed = closed_within(first, 10)
        assert first_closed is not None and first_closed >= timeout - 0.3, first_closed
        second_closed = closed_within(second, 10)
        assert second_closed is not None
        withheld_for = time.monotonic() - sent - 2.0  # its result came after 2 s
        assert second.buf == b"", "a result whose event was not written reached the client"
        assert withheld_for >= timeout - 0.3, (
            f"closed {withheld_for:.1f}s after its result was withheld "
            f"(--audit-block-timeout {timeout})"
        )
    finally:
        first.close()
        second.close()
        stop_unlimited(p)


def test_a_withheld_stream_does_not_fill_the_proxys_memory(
    pg: EmbeddedPostgres, billing: ProxyProcess, tmp_path: Path
) -> None:
    """A large personal result starts while the file is failing, so its running event
    cannot be written and its rows are withheld: the upstream is paused, and the proxy's
    memory does not grow by the size of the result (one client must not make pgveil hold
    as much as its result is large). No row reaches the client."""
    path = tmp_path / "audit.jsonl"
    p = start_audited(pg, tmp_path, "--audit-block-timeout", "6")
    c = RawClient(p.port, TRUST_USER, application_name="hoard")
    try:
        assert [t for t, _ in c.query(PERSONAL)] == ["T", "D", "D", "C", "Z"]
        base = vm_kib(p.proc.pid, "VmRSS")
        limit_file(p, path.stat().st_size)
        rows = 60_000  # about 240 MB
        c.send_raw(
            query_message(
                f"SELECT c.name, repeat('x', 2000) FROM billing.customers c, "
                f"generate_series(1, {rows})"
            )
        )
        deadline = time.monotonic() + 3
        peak = base
        while time.monotonic() < deadline:
            peak = max(peak, vm_kib(p.proc.pid, "VmRSS"))
            time.sleep(0.05)
        c.sock.settimeout(0.1)
        with pytest.raises(TimeoutError):
            leaked = c.sock.recv(1 << 16)
            assert NAME.encode() not in leaked, "withheld rows reached the client"
        grown_mb = (peak - base) // 1024
        assert grown_mb < 64, f"the proxy buffered {grown_mb} MB of a withheld result"
    finally:
        c.close()
        stop_unlimited(p)


@pytest.mark.parametrize("user", [TRUST_USER, MASKED_USER])
def test_a_prepared_statement_is_refused_while_the_file_fails(
    pg: EmbeddedPostgres, billing: ProxyProcess, tmp_path: Path, user: str
) -> None:
    """A statement on personal data prepared (Parse) before the file failed is run with
    Bind/Execute while it fails: the Bind is refused with 42501 'the audit stream is
    unavailable' and the statement does not run (no access event once the file takes
    writes again)."""
    path = tmp_path / "audit.jsonl"
    p = start_audited(pg, tmp_path, "--audit-block-timeout", "1")
    trigger = RawClient(p.port, TRUST_USER, application_name="trigger")
    c = RawClient(p.port, user, application_name="prepared")
    try:
        c.send_raw(parse(PERSONAL, b"s1") + SYNC)
        assert [t for t, _ in read_until(c, 1)] == ["1", "Z"]
        assert [t for t, _ in trigger.query(PERSONAL)] == ["T", "D", "D", "C", "Z"]
        limit_file(p, path.stat().st_size)
        trigger.send_raw(query_message(PERSONAL))
        wait_failing(p)  # the trigger's event could not be written
        assert read_until(trigger, 1, timeout=0) == []  # its result is withheld
        c.send_raw(bind(b"", b"s1") + execute() + SYNC)
        got = read_until(c, 1, timeout=3)
        limit_file(p, None)  # the queued events are written: did the statement run?
        wait_for(lambda: len(events(path, "trigger")) == 2, "the queued events")
        ran = [e["kinds"] for e in events(path, "prepared") if e["outcome"] == "ok"]
        refused = [b for t, b in got if t == "E" and sqlstate_of(b) == "42501"]
        assert refused and b"audit stream is unavailable" in refused[0] and not ran, (
            f"Bind/Execute of a personal statement while the file fails: the client got "
            f"{[t for t, _ in got]}, the statement ran: {ran}"
        )
    finally:
        trigger.close()
        c.close()
        stop_unlimited(p)


def test_a_statement_pipelined_behind_the_startup_packet_is_refused(
    shared: tuple[ProxyProcess, Path],
) -> None:
    """An unmasked client sends its StartupMessage and a Query on personal data in one
    write (trust authentication needs no round trip). The statement would reach the server
    before the session is analysed: like a masked session, an audited one may send only
    password messages before the login completes, else it ends with a FATAL 08P01; no row
    goes out."""
    p, path = shared
    app = "w-early"
    c = RawClient(p.port, TRUST_USER, connect=False)
    try:
        startup = StartupMessage(
            m.PROTOCOL_3_0, {"user": TRUST_USER, "database": "postgres", "application_name": app}
        )
        c.send_raw(startup.encode() + query_message(PERSONAL))
        got = read_until(c, 2)
    finally:
        c.close()
    assert not [b for t, b in got if t == "D"], got
    fatal = [b for t, b in got if t == "E"]
    assert fatal and b"before login" in fatal[-1] and b"08P01" in fatal[-1], got
    assert events(path, app) == []


def test_sigterm_stops_the_proxy_while_results_are_withheld(
    pg: EmbeddedPostgres, billing: ProxyProcess, tmp_path: Path
) -> None:
    """Guard. The file fails; one session's result is withheld inside a transaction,
    another waits for the audit stream with a statement on personal data. SIGTERM: the
    proxy stops within its shutdown timeout, neither client ever sees the personal rows,
    and the file still verifies."""
    path = tmp_path / "audit.jsonl"
    # the audit would hold them 10 minutes: the proxy stops only by its shutdown deadline
    p = start_audited(pg, tmp_path, "--audit-block-timeout", "600", "--shutdown-timeout", "1")
    stuck = RawClient(p.port, TRUST_USER, application_name="stuck")
    waiting = RawClient(p.port, MASKED_USER, application_name="waiting")
    try:
        assert stuck.query("BEGIN")[-1] == ("Z", b"T")
        assert [t for t, _ in stuck.query(PERSONAL)] == ["T", "D", "D", "C", "Z"]
        limit_file(p, path.stat().st_size)
        stuck.send_raw(query_message(PERSONAL))
        wait_failing(p)
        assert read_until(stuck, 1, timeout=0) == []
        waiting.send_raw(query_message(PERSONAL))
        # not a wait for a state (nothing shows that pgveil holds the statement, and the
        # checks below hold either way): the statement most likely arrives before SIGTERM
        time.sleep(0.2)
        p.signal(signal.SIGTERM)
        assert p.proc.wait(60) == 0
        for c in (stuck, waiting):
            got = read_until(c, 1, timeout=1)
            assert not any(NAME.encode() in b for _, b in got), got
    finally:
        stuck.close()
        waiting.close()
        stop_unlimited(p)
    assert "Traceback" not in p.log(), p.log()
    checked, broken, _ = verify_files(rotated_files(path))
    assert broken is None and checked > 0


def test_a_stalled_stdout_reader_does_not_freeze_the_proxy(
    pg: EmbeddedPostgres, billing: ProxyProcess, tmp_path: Path
) -> None:
    """The stdout sink's reader (a log shipper) stops reading and the pipe fills. The
    writes to stdout do not block the event loop: a new session still logs in, and
    SIGTERM stops the proxy (a frozen proxy would do neither, however long we waited)."""
    rules = tmp_path / "rules.yaml"
    rules.write_text(RULES)
    args = [
        sys.executable, "-m", "proxy.cli", "proxy", "--upstream", f"127.0.0.1:{pg.port}",
        "--upstream-sslmode", "disable", "--rules", str(rules), "--catalog-user", pg.superuser,
        "--audit-stdout", "true", "--audit-block-timeout", "1", "--log-level", "error",
    ]  # fmt: skip
    read_end, write_end = os.pipe()
    fcntl.fcntl(write_end, fcntl.F_SETPIPE_SZ, 4096)
    try:
        proc, port = spawn_listening(
            lambda port: [*args, "--listen", f"127.0.0.1:{port}"],
            tmp_path / "pgveil.log",
            stdin=subprocess.DEVNULL,
            stdout=write_end,
            env={**os.environ, **audit_env(pg)},
        )
    finally:
        os.close(write_end)
    try:
        c = RawClient(port, TRUST_USER, application_name="stalled")
        try:
            for _ in range(50):  # until the pipe is full
                c.send_raw(query_message(PERSONAL))
                if not read_until(c, 1, timeout=1):
                    break
        finally:
            c.close()
        served = True
        try:
            other = RawClient(port, TRUST_USER, connect=False)
            other.sock.settimeout(60)
            other.send_raw(
                StartupMessage(
                    m.PROTOCOL_3_0, {"user": TRUST_USER, "database": "postgres"}
                ).encode()
            )
            other.until_ready()
            other.close()
        except OSError:
            served = False
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(60)
            stopped = True
        except subprocess.TimeoutExpired:
            stopped = False
        assert served and stopped, (
            f"stdout pipe full: a new session logs in: {served}; SIGTERM stops pgveil: {stopped}"
        )
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        os.close(read_end)
