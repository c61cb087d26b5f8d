"""The statement log stays in step with the server, and nothing on personal data runs
unrecorded or, while the audit stream cannot take events, at all.

After an error the server skips every message up to Sync (a Close included); a failed
DEALLOCATE or Bind leaves the statement, portal or WITH HOLD cursor in place: pgveil keeps
knowing what each name reads, so later Bind/Execute/FETCH on it are recorded, and refused
with 42501 while the stream is down (past --audit-block-timeout). Function calls and
statements that are not UTF-8 (an unmasked session may use LATIN1) are recorded too.
Audited logins work with every authentication method, with and without TLS, and only
password messages pass before the login completes.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import ssl
import struct
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import asyncpg
import psycopg
import pytest

from proxy.demo.embedded_pg import EmbeddedPostgres
from proxy.wire import messages as m
from proxy.wire.errors import sqlstate_of
from proxy.wire.startup import StartupMessage
from tests.conftest import (
    CLEAR_PASSWORD,
    CLEAR_USER,
    MD5_PASSWORD,
    MD5_USER,
    SCRAM_PASSWORD,
    SCRAM_USER,
    TRUST_USER,
    Certs,
)
from tests.integration.audit_wire import (
    SYNC,
    Messages,
    audited_proxy,
    bind,
    describe_portal,
    events,
    execute,
    parse,
    query_message,
    read_until,
    start_audited,
    wait_failing,
    wait_for,
)
from tests.integration.masking_fixture import AGENT, AGENT_PW, NAME
from tests.integration.test_audit_withheld import (
    MASKED_USER,
    PERSONAL,
    limit_file,
    stop_unlimited,
)
from tests.support import ProxyProcess, RawClient

BY_KEY = "SELECT i_customer, name FROM billing.customers WHERE i_customer = $1"


# ---- helpers ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def audited(
    pg: EmbeddedPostgres, billing: ProxyProcess, certs: Certs, tmp_path_factory: Any
) -> Iterator[tuple[ProxyProcess, Path]]:
    """An audited pgveil with TLS for clients."""
    tls = ("--tls-cert", str(certs.cert), "--tls-key", str(certs.key))
    with audited_proxy(pg, tmp_path_factory.mktemp("names"), *tls) as shared_proxy:
        yield shared_proxy


def close_statement(name: bytes) -> bytes:
    return m.message(ord("C"), b"S" + name + b"\0")


def bind_params(statement: bytes, value: bytes, portal: bytes = b"") -> bytes:
    """Bind with one text parameter and one binary result column format."""
    body = portal + b"\0" + statement + b"\0"
    body += struct.pack("!hh", 1, 0)  # one parameter format: text
    body += struct.pack("!hi", 1, len(value)) + value
    body += struct.pack("!hh", 1, 0)  # results: text
    return m.message(ord("B"), body)


def parse_typed(sql: str, name: bytes = b"") -> bytes:
    return m.message(ord("P"), name + b"\0" + sql.encode() + b"\0" + struct.pack("!hI", 1, 20))


def types(got: Messages) -> list[str]:
    return [t for t, _ in got]


def codes(got: Messages) -> list[str]:
    return [sqlstate_of(b) or "" for t, b in got if t == "E"]


def rows_with_name(got: Messages) -> bool:
    return any(t == "D" and NAME.encode()[:3] in b for t, b in got)


def ok_access(path: Path, app: str) -> list[dict[str, Any]]:
    return [e for e in events(path, app) if e.get("outcome") not in ("running",)]


def outage(p: ProxyProcess, path: Path) -> RawClient:
    """Make the audit file fail: a trigger's event cannot be written."""
    trigger = RawClient(p.port, TRUST_USER, application_name="r4-trigger")
    assert types(trigger.query(PERSONAL))[-1] == "Z"
    wait_for(lambda: len(events(path, "r4-trigger")) == 1, "the trigger's event")
    limit_file(p, path.stat().st_size)
    trigger.send_raw(query_message(PERSONAL))
    wait_failing(p)  # the trigger's event could not be written
    assert read_until(trigger, 1, timeout=0) == []  # its result is withheld
    return trigger


def md5_password(user: str, password: str, salt: bytes) -> bytes:
    inner = hashlib.md5((password + user).encode()).hexdigest()
    return b"md5" + hashlib.md5(inner.encode() + salt).hexdigest().encode() + b"\0"


def startup(user: str, app: str) -> bytes:
    params = {"user": user, "database": "postgres", "application_name": app}
    return StartupMessage(m.PROTOCOL_3_0, params).encode()


# ---- the statement log keeps names the server still has ------------------------------------


def test_a_close_skipped_after_an_error_leaves_the_statement_recorded(
    audited: tuple[ProxyProcess, Path],
) -> None:
    """After an error the server skips every message up to Sync, Close included. Parse s1
    (personal); Bind to a missing statement + Close s1 + Sync: s1 stays prepared on the
    server, and pgveil keeps its audit fields: Bind s1 + Execute is recorded as an access
    to the customers."""
    p, path = audited
    app = "r4-close-skipped"
    c = RawClient(p.port, TRUST_USER, application_name=app)
    try:
        c.send_raw(parse(PERSONAL, b"s1") + SYNC)
        assert types(read_until(c, 1)) == ["1", "Z"]
        c.send_raw(bind(b"", b"nosuch") + close_statement(b"s1") + SYNC)
        assert codes(read_until(c, 1)) == ["26000"]
        c.send_raw(bind(b"", b"s1") + execute() + SYNC)
        got = read_until(c, 1)
        assert rows_with_name(got)  # s1 still exists on the server
        wait_for(lambda: bool(ok_access(path, app)), "the access event", timeout=3)
    finally:
        c.close()


def test_a_deallocate_that_fails_leaves_the_statement_recorded(
    audited: tuple[ProxyProcess, Path],
) -> None:
    """DEALLOCATE s1 in an aborted transaction fails (25P02) and s1 stays on the server:
    pgveil forgets a statement only when its DEALLOCATE succeeds, so the Execute of s1
    afterwards has its access event."""
    p, path = audited
    app = "r4-dealloc-failed"
    c = RawClient(p.port, TRUST_USER, application_name=app)
    try:
        c.send_raw(parse(PERSONAL, b"s1") + SYNC)
        assert types(read_until(c, 1)) == ["1", "Z"]
        assert "22012" in codes(c.query("BEGIN; SELECT 1/0"))
        assert codes(c.query("DEALLOCATE s1")) == ["25P02"]
        c.query("ROLLBACK")
        c.send_raw(bind(b"", b"s1") + execute() + SYNC)
        assert rows_with_name(read_until(c, 1))
        wait_for(lambda: bool(ok_access(path, app)), "the access event", timeout=3)
    finally:
        c.close()


def test_a_failed_bind_does_not_forget_a_held_cursor(
    audited: tuple[ProxyProcess, Path],
) -> None:
    """A Bind into the name of a WITH HOLD cursor fails (missing statement, or 42P03) and
    the held cursor survives the error: pgveil still knows it reads billing.customers, so
    FETCH from it is recorded."""
    p, path = audited
    app = "r4-held-cursor"
    c = RawClient(p.port, TRUST_USER, application_name=app)
    try:
        assert types(c.query(f"DECLARE hc CURSOR WITH HOLD FOR {PERSONAL}"))[-1] == "Z"
        wait_for(lambda: bool(ok_access(path, app)), "the DECLARE's event")
        before = len(ok_access(path, app))
        c.send_raw(bind(b"hc", b"nosuch") + SYNC)
        assert codes(read_until(c, 1)) == ["26000"]
        got = c.query("FETCH ALL FROM hc")
        assert rows_with_name(got)
        wait_for(lambda: len(ok_access(path, app)) > before, "the FETCH's event", timeout=3)
    finally:
        c.close()


def test_a_function_call_on_personal_data_is_recorded(
    audited: tuple[ProxyProcess, Path],
) -> None:
    """An audited unmasked session's FunctionCall (query_to_xml(text, bool, bool, text)
    reading billing.customers) is analysed like a statement: its access event is written
    (and during an outage it would be refused)."""
    p, path = audited
    app = "r4-fastpath"
    c = RawClient(p.port, TRUST_USER, application_name=app)
    try:
        got = c.query("SELECT 'query_to_xml(text,bool,bool,text)'::regprocedure::oid")
        oid = int(next(b for t, b in got if t == "D")[6:])
        args = [PERSONAL.encode(), b"false", b"false", b""]
        body = struct.pack("!Ihhh", oid, 1, 0, len(args))
        body += b"".join(struct.pack("!i", len(a)) + a for a in args) + struct.pack("!h", 0)
        c.send_raw(m.message(ord("F"), body))
        got = read_until(c, 1)
        assert any(t == "V" and NAME.encode() in b for t, b in got), got
        wait_for(lambda: bool(ok_access(path, app)), "an access event", timeout=3)
    finally:
        c.close()


def test_a_statement_that_is_not_utf8_is_recorded(audited: tuple[ProxyProcess, Path]) -> None:
    """An unmasked session may use client_encoding LATIN1 (only masked ones must use
    UTF8): a read of billing.customers with an 'é' in a literal, not valid UTF-8, is
    recorded, and refused during an outage."""
    p, path = audited
    app = "r4-latin1"
    c = RawClient(p.port, TRUST_USER, application_name=app, client_encoding="LATIN1")
    try:
        sql = PERSONAL.replace("ORDER BY", "WHERE name <> '\xe9' ORDER BY").encode("latin-1")
        c.send_raw(m.message(ord("Q"), sql + b"\0"))
        assert rows_with_name(read_until(c, 1))
        wait_for(lambda: bool(ok_access(path, app)), "the access event", timeout=3)
    finally:
        c.close()


@pytest.mark.parametrize("user", [TRUST_USER, MASKED_USER])
def test_a_refused_bind_into_a_held_cursors_name_does_not_free_it(
    pg: EmbeddedPostgres, billing: ProxyProcess, tmp_path: Path, user: str
) -> None:
    """While the stream is down (past --audit-block-timeout), a Bind to a personal
    statement into the name of a WITH HOLD cursor is refused; the server would have failed
    it at the statement lookup, before touching the portal, so the cursor survives and
    pgveil keeps its fields: the Execute of it that follows is refused too (42501, no
    row), not read unrecorded."""
    path = tmp_path / "audit.jsonl"
    p = start_audited(pg, tmp_path, "--audit-block-timeout", "1")
    c = RawClient(p.port, user, application_name="r4-held-outage")
    trigger = None
    try:
        assert types(c.query(f"DECLARE hc CURSOR WITH HOLD FOR {PERSONAL}"))[-1] == "Z"
        c.send_raw(parse(PERSONAL, b"s1") + SYNC)
        assert types(read_until(c, 1)) == ["1", "Z"]
        trigger = outage(p, path)
        c.send_raw(bind(b"hc", b"s1") + SYNC + execute(b"hc") + SYNC)
        got = read_until(c, 2, timeout=4)
        assert codes(got) == ["42501", "42501"] and not rows_with_name(got), (
            f"the held cursor ran during the outage: {types(got)} {codes(got)}"
        )
    finally:
        c.close()
        if trigger is not None:
            trigger.close()
        stop_unlimited(p)


@pytest.mark.parametrize("user", [TRUST_USER, MASKED_USER])
def test_a_write_prepared_before_a_skipped_close_is_refused_during_an_outage(
    pg: EmbeddedPostgres, billing: ProxyProcess, tmp_path: Path, user: str
) -> None:
    """A prepared UPDATE of billing.customers whose Close the server skipped after an error
    (see above) stays known to pgveil: during an outage its Bind/Execute is refused with
    42501 and the row is not changed."""
    path = tmp_path / "audit.jsonl"
    p = start_audited(pg, tmp_path, "--audit-block-timeout", "1")
    c = RawClient(p.port, user, application_name="r4-write-outage")
    update = "UPDATE billing.customers SET notes = 'r4-unrecorded' WHERE i_customer = 2"
    trigger = None
    try:
        c.send_raw(parse(update, b"w1") + SYNC)
        assert types(read_until(c, 1)) == ["1", "Z"]
        c.send_raw(bind(b"", b"nosuch") + close_statement(b"w1") + SYNC)
        assert types(read_until(c, 1)) == ["E", "Z"]
        trigger = outage(p, path)
        c.send_raw(bind(b"", b"w1") + execute() + SYNC)
        got = read_until(c, 1, timeout=4)
        limit_file(p, None)
        notes = pg.psql("SELECT notes FROM billing.customers WHERE i_customer = 2")
        assert "r4-unrecorded" not in notes and codes(got) == ["42501"], (
            f"the UPDATE ran during the outage: {types(got)} {codes(got)}"
        )
    finally:
        pg.psql("UPDATE billing.customers SET notes = NULL WHERE i_customer = 2")
        c.close()
        if trigger is not None:
            trigger.close()
        stop_unlimited(p)


# ---- guards: refusals during an outage ---------------------------------------------------


@pytest.mark.parametrize("user", [TRUST_USER, MASKED_USER])
def test_outage_refusals_keep_the_log_in_step(
    pg: EmbeddedPostgres, billing: ProxyProcess, tmp_path: Path, user: str
) -> None:
    """Guard. Past --audit-block-timeout with the file failing, in one pipelined write: an
    Execute of a portal bound and run in part before the outage, a Bind (with parameters)
    to a personal statement with Describe and Execute after it, and SQL EXECUTE
    of a PREPAREd statement are refused (42501, or the connection closes): no row. After
    recovery the same Bind (the same parameter bytes) works and the events are right."""
    path = tmp_path / "audit.jsonl"
    p = start_audited(pg, tmp_path, "--audit-block-timeout", "1")
    app = "r4-guard"
    c = RawClient(p.port, user, application_name=app)
    trigger = None
    try:
        assert types(c.query(f"PREPARE q1 AS {PERSONAL}"))[-1] == "Z"
        c.send_raw(parse_typed(BY_KEY, b"sk") + parse(PERSONAL, b"s2") + SYNC)
        assert types(read_until(c, 1)) == ["1", "1", "Z"]
        assert types(c.query("BEGIN"))[-1] == "Z"  # keeps the portal p2 across Syncs
        c.send_raw(bind(b"p2", b"s2") + execute(b"p2", 1) + SYNC)
        assert types(read_until(c, 1)) == ["2", "D", "s", "Z"]
        trigger = outage(p, path)
        c.send_raw(
            execute(b"p2", 1)
            + SYNC
            + query_message("ROLLBACK")
            + bind_params(b"sk", b"1")
            + describe_portal()
            + execute()
            + SYNC
            + query_message("EXECUTE q1")
        )
        got = read_until(c, 4, timeout=12)
        # a refusal whose event cannot be written is withheld like a result: the client
        # gets the refusals, or its connection is closed; never a row
        assert set(codes(got)) <= {"42501"} and not rows_with_name(got), (types(got), codes(got))
        limit_file(p, None)
        c.close()
        c = RawClient(p.port, user, application_name=app)
        c.send_raw(parse_typed(BY_KEY, b"sk") + bind_params(b"sk", b"1") + execute() + SYNC)
        after = read_until(c, 1)
        assert types(after) == ["1", "2", "D", "C", "Z"], after
        n = len(ok_access(path, app))
        assert types(c.query(PERSONAL))[-1] == "Z"
        wait_for(lambda: len(ok_access(path, app)) == n + 1, "the last event")
        last = ok_access(path, app)[-1]
        assert last["tables"] == ["billing.customers"] and last["outcome"] == "ok", last
        assert last.get("rows") == 2, last
    finally:
        c.close()
        if trigger is not None:
            trigger.close()
        stop_unlimited(p)
    assert "Traceback" not in p.log(), p.log()


# ---- guards: logins of audited sessions --------------------------------------------------


@pytest.mark.parametrize("sslmode", ["disable", "require"])
@pytest.mark.parametrize(
    ("user", "password"),
    [
        (SCRAM_USER, SCRAM_PASSWORD),
        (MD5_USER, MD5_PASSWORD),
        (CLEAR_USER, CLEAR_PASSWORD),
        (TRUST_USER, ""),
        (AGENT, AGENT_PW),  # masked, SCRAM
        (MASKED_USER, ""),  # masked, trust
    ],
)
def test_audited_logins_with_psycopg(
    pg: EmbeddedPostgres, audited: tuple[ProxyProcess, Path], user: str, password: str, sslmode: str
) -> None:
    p, _ = audited
    dsn = pg.dsn(user, password, port=p.port) + f" sslmode={sslmode}"
    with psycopg.connect(dsn) as conn:
        assert conn.execute("SELECT current_user").fetchone() == (user,)
        assert conn.pgconn.ssl_in_use is (sslmode == "require")


@pytest.mark.parametrize(
    ("user", "password"),
    [(SCRAM_USER, SCRAM_PASSWORD), (MD5_USER, MD5_PASSWORD), (AGENT, AGENT_PW)],
)
def test_audited_logins_with_asyncpg(
    audited: tuple[ProxyProcess, Path], user: str, password: str
) -> None:
    p, _ = audited
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE

    async def run() -> None:
        for tls in (False, ctx):
            conn = await asyncpg.connect(
                host="127.0.0.1", port=p.port, user=user, password=password,
                database="postgres", ssl=tls,
            )  # fmt: skip
            try:
                assert await conn.fetchval("SELECT current_user") == user
            finally:
                await conn.close()

    asyncio.run(run())


@pytest.mark.parametrize(("user", "password"), [(AGENT, AGENT_PW), (SCRAM_USER, SCRAM_PASSWORD)])
def test_audited_logins_with_psql(
    pg: EmbeddedPostgres, audited: tuple[ProxyProcess, Path], user: str, password: str
) -> None:
    p, _ = audited
    out = subprocess.run(
        ["psql", "-X", "-A", "-t", "-c", "SELECT current_user",
         f"host=127.0.0.1 port={p.port} user={user} dbname=postgres sslmode=require"],
        env={**os.environ, "PGPASSWORD": password}, capture_output=True, text=True, timeout=20,
    )  # fmt: skip
    assert out.returncode == 0 and out.stdout.strip() == user, out.stderr


@pytest.mark.parametrize(("user", "password"), [(CLEAR_USER, CLEAR_PASSWORD), (MD5_USER, "")])
def test_a_password_split_across_reads_logs_in_and_the_statement_is_recorded(
    audited: tuple[ProxyProcess, Path], user: str, password: str
) -> None:
    """Guard. The password message arrives in pieces, its last piece with the first bytes
    of a Query; the rest of the Query after ReadyForQuery. The login works and the Query
    (held back by the login splicer) is recorded."""
    p, path = audited
    app = f"r4-split-{user}"
    c = RawClient(p.port, user, connect=False)
    try:
        c.send_raw(startup(user, app))
        typ, body = c.recv_message()
        assert typ == "R"
        (code,) = struct.unpack_from("!i", body)
        if code == 5:
            msg = m.message(ord("p"), md5_password(user, MD5_PASSWORD, body[4:8]))
        else:
            assert code == 3
            msg = m.message(ord("p"), password.encode() + b"\0")
        q = query_message(PERSONAL)
        for part in (msg[:3], msg[3:9]):
            c.send_raw(part)
            time.sleep(0.05)
        c.send_raw(msg[9:] + q[:4])
        got = c.until_ready()
        assert types(got)[-1] == "Z", got
        time.sleep(0.05)
        c.send_raw(q[4:])
        assert rows_with_name(read_until(c, 1))
        wait_for(lambda: bool(ok_access(path, app)), "the access event", timeout=5)
    finally:
        c.close()


def test_a_statement_pipelined_after_the_password_is_refused(
    audited: tuple[ProxyProcess, Path],
) -> None:
    """Guard. PasswordMessage and a Query in one write: FATAL 08P01, no row, no event."""
    p, path = audited
    app = "r4-after-password"
    c = RawClient(p.port, CLEAR_USER, connect=False)
    try:
        c.send_raw(startup(CLEAR_USER, app))
        assert c.recv_message()[0] == "R"
        pw = m.message(ord("p"), CLEAR_PASSWORD.encode() + b"\0")
        c.send_raw(pw + query_message(PERSONAL))
        got = read_until(c, 2, timeout=5)
    finally:
        c.close()
    assert not rows_with_name(got), got
    assert "08P01" in codes(got), got
    assert events(path, app) == []


def test_terminate_during_login_and_cancel_request(
    pg: EmbeddedPostgres, audited: tuple[ProxyProcess, Path]
) -> None:
    """Guard. A Terminate instead of the password closes the connection; a CancelRequest
    for a running audited statement cancels it; the proxy keeps serving."""
    p, _ = audited
    c = RawClient(p.port, CLEAR_USER, connect=False)
    try:
        c.send_raw(startup(CLEAR_USER, "r4-terminate"))
        assert c.recv_message()[0] == "R"
        c.send_raw(m.message(ord("X")))
        assert c.closed_by_peer(5)
    finally:
        c.close()
    c = RawClient(p.port, TRUST_USER, application_name="r4-cancel")
    try:
        assert c.pid is not None and c.key is not None
        c.send_raw(query_message("SELECT pg_sleep(30)"))
        running = f"SELECT state FROM pg_stat_activity WHERE pid = {c.pid}"
        wait_for(lambda: pg.psql(running).strip() == "active", "the statement to start")
        send_cancel(p.port, c.pid, c.key)
        assert "57014" in codes(read_until(c, 1, timeout=10))
    finally:
        c.close()


def send_cancel(port: int, pid: int, key: int) -> None:
    raw = RawClient(port, connect=False)
    try:
        raw.send_raw(struct.pack("!iiii", 16, 80877102, pid, key))
        raw.closed_by_peer(5)
    finally:
        raw.close()


def test_unaudited_unmasked_relay_is_byte_identical(
    pg: EmbeddedPostgres, proxy: ProxyProcess
) -> None:
    """Guard. Without auditing, an unmasked session gets the server's bytes unchanged."""
    script = parse("SELECT g, repeat('x', g) FROM generate_series(1, 300) g") + bind()
    script += describe_portal() + execute() + SYNC + query_message("SELECT 1/0; SELECT 2")
    streams = []
    for port in (pg.port, proxy.port):
        c = RawClient(port, TRUST_USER, application_name="r4-bytes")
        try:
            c.send_raw(script)
            streams.append(read_until(c, 2))
        finally:
            c.close()
    assert streams[0] == streams[1]
