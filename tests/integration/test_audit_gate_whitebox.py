"""White-box attack on the audit result gate after the restructure (audit/gate.py carried
out by proxy/server.py's HANDLERS; the writer's `blocking` attribute).

The file sink is made to fail as tests/integration/test_audit_withheld.py does (the
proxy's RLIMIT_FSIZE); the table sink's queue is driven directly against the real
server. Each test names the behaviour it checks; a failure is a finding.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import psycopg

from audit.sinks import TableSink
from audit.writer import AuditWriter
from proxy.demo.embedded_pg import EmbeddedPostgres
from tests.conftest import TRUST_USER, Certs
from tests.integration.audit_wire import (
    SYNC,
    bind,
    events,
    execute,
    limit_file,
    parse,
    query_message,
    read_until,
    start_audited,
    stop_unlimited,
    wait_for,
    wait_for_async,
)
from tests.integration.masking_fixture import NAME
from tests.integration.test_audit_withheld import PERSONAL, closed_within, tls_client
from tests.support import ProxyProcess, RawClient

ROWS = ["T", "D", "D", "C", "Z"]


def _types(got: list[tuple[str, bytes]]) -> list[str]:
    return [t for t, _ in got]


# ---- the table sink's queue ---------------------------------------------------------------


def test_blocking_turns_on_at_the_table_queue_size_and_off_once_drained(
    pg: EmbeddedPostgres, billing: ProxyProcess
) -> None:
    """`blocking` is an attribute updated where its inputs change: it must be True exactly
    while len(table queue) >= queue_size (on_failure block) and False once drained; under
    drop it stays False and the events that find the queue full are dropped, counted."""
    table = "pgveil_wb14b.audit_events"

    async def go(on_failure: str) -> tuple[list[bool], int, int]:
        sink = TableSink(pg.dsn(), table, f"wb14b-{on_failure}")
        w = AuditWriter([], sink, on_failure=on_failure, queue_size=3)
        await w.start()
        seen = [w.blocking]
        for _ in range(4):  # (run() is not running: nothing drains meanwhile)
            w.submit("refused", {"reason": "x"})
            seen.append(w.blocking)
            assert w.blocking == w.blocks()
        queued = len(w._table_queue)
        await w._drain_table()
        seen.append(w.blocking)
        await w.close()
        return seen, queued, w.dropped

    seen, queued, dropped = asyncio.run(go("block"))
    assert seen == [False, False, False, True, True, False], seen
    assert (queued, dropped) == (3, 1)  # the 4th found the queue full: no result waits
    seen, queued, dropped = asyncio.run(go("drop"))
    assert seen == [False] * 6 and (queued, dropped) == (3, 1), (seen, queued, dropped)


def test_blocking_turns_on_while_a_table_write_hangs(
    pg: EmbeddedPostgres, billing: ProxyProcess
) -> None:
    """The table is locked: the sink's write waits. Events submitted meanwhile fill the
    queue; `blocking` turns on at queue_size during the drain, off once it completes."""
    table = "pgveil_wb14b_lock.audit_events"

    async def go() -> list[bool]:
        sink = TableSink(pg.dsn(), table, "wb14b-lock")
        w = AuditWriter([], sink, on_failure="block", queue_size=2)
        await w.start()
        w.submit("refused", {"reason": "x"})
        await w._drain_table()  # (the table and today's partition exist now)
        seen = [w.blocking]
        with psycopg.connect(pg.dsn(), autocommit=False) as locker:
            locker.execute(f"LOCK TABLE {table} IN ACCESS EXCLUSIVE MODE")
            w.submit("refused", {"reason": "x"})
            drain = asyncio.ensure_future(w._drain_table())
            await wait_for_async(
                lambda: (
                    locker.execute("SELECT count(*) FROM pg_locks WHERE NOT granted").fetchone()
                    != (0,)
                ),
                "the drain's table write to wait for the lock (it holds its batch then)",
            )
            seen.append(w.blocking)
            w.submit("refused", {"reason": "x"})
            seen.append(w.blocking)  # two queued (one in the write): at queue_size
            locker.rollback()
            await drain
        seen.append(w.blocking)
        await w.close()
        return seen

    assert asyncio.run(go()) == [False, False, True, False]


# ---- the file sink fails: withheld results ------------------------------------------------


def test_the_abort_after_the_block_timeout_hits_only_the_withheld_connection(
    pg: EmbeddedPostgres, billing: ProxyProcess, tmp_path: Path
) -> None:
    """One client's personal result is withheld; another client (idle, with nothing of
    its own withheld) must survive the abort, and run statements without personal data
    once the file takes writes again."""
    path = tmp_path / "audit.jsonl"
    p = start_audited(pg, tmp_path, "--audit-block-timeout", "1")
    stuck = RawClient(p.port, TRUST_USER, application_name="stuck")
    idle = RawClient(p.port, TRUST_USER, application_name="idle")
    try:
        for c in (stuck, idle):
            assert _types(c.query(PERSONAL)) == ROWS
        limit_file(p, path.stat().st_size)
        stuck.send_raw(query_message(PERSONAL))
        assert closed_within(stuck, 15) is not None
        assert NAME.encode() not in stuck.buf
        limit_file(p, None)
        assert _types(idle.query("SELECT 1")) == ["T", "D", "C", "Z"]
        assert _types(idle.query(PERSONAL)) == ROWS
    finally:
        stuck.close()
        idle.close()
        stop_unlimited(p)
    assert "Traceback" not in p.log(), p.log()


def test_a_tls_client_withheld_too_long_is_aborted_and_never_sees_the_rows(
    pg: EmbeddedPostgres, billing: ProxyProcess, certs: Certs, tmp_path: Path
) -> None:
    """The gate's handle is the connection, whose transport TLS replaced: the abort must
    reach the TLS transport (not the plain one under it, nor nothing)."""
    path = tmp_path / "audit.jsonl"
    tls = ("--tls-cert", str(certs.cert), "--tls-key", str(certs.key))
    p = start_audited(pg, tmp_path, "--audit-block-timeout", "1", *tls)
    c = tls_client(p.port, "tls-stuck")
    try:
        assert _types(c.query(PERSONAL)) == ROWS
        limit_file(p, path.stat().st_size)
        c.send_raw(query_message(PERSONAL))
        assert closed_within(c, 15) is not None
        assert NAME.encode() not in c.buf
        assert p.metric("pgveil_audit_failing") == 1
    finally:
        c.close()
        stop_unlimited(p)
    assert "Traceback" not in p.log(), p.log()


def test_a_client_that_closes_while_withheld_leaves_the_others_served(
    pg: EmbeddedPostgres, billing: ProxyProcess, tmp_path: Path
) -> None:
    """A client whose result is withheld closes its connection. When the file takes
    writes again nothing goes to that connection (nor to another), its events are
    written, and a client pipelining across the same outage gets every byte in order."""
    path = tmp_path / "audit.jsonl"
    p = start_audited(pg, tmp_path, "--audit-block-timeout", "20")
    leaver = RawClient(p.port, TRUST_USER, application_name="leaver")
    stayer = RawClient(p.port, TRUST_USER, application_name="stayer")
    try:
        for c in (leaver, stayer):
            assert _types(c.query(PERSONAL)) == ROWS
        limit_file(p, path.stat().st_size)
        leaver.send_raw(query_message(PERSONAL))
        stayer.send_raw(
            query_message(PERSONAL)
            + query_message("SELECT 2")
            + parse(PERSONAL)
            + bind()
            + execute()
            + SYNC
        )
        assert read_until(leaver, 1, timeout=0.5) == []
        assert read_until(stayer, 1, timeout=0.5) == []
        leaver.close()
        wait_for(lambda: p.metric("pgveil_client_connections_open") == 1, "the leaver's end")
        limit_file(p, None)
        got = read_until(stayer, 3, timeout=15)
        assert _types(got) == [*ROWS, "T", "D", "C", "Z", "1", "2", "D", "D", "C", "Z"], got
        wait_for(lambda: len(events(path, "leaver")) >= 2, "the leaver's events")
        assert _types(stayer.query("SELECT 3")) == ["T", "D", "C", "Z"]
    finally:
        leaver.close()
        stayer.close()
        stop_unlimited(p)
    assert "Traceback" not in p.log(), p.log()


def test_on_failure_drop_results_go_out_and_drops_are_counted(
    pg: EmbeddedPostgres, billing: ProxyProcess, tmp_path: Path
) -> None:
    """`on_failure: drop`: while the file fails, personal results reach the client at
    once (none withheld, no refusal); once the queue is full further events are dropped
    and counted (pgveil_audit_events_dropped)."""
    path = tmp_path / "audit.jsonl"
    p = start_audited(
        pg, tmp_path, "--audit-on-failure", "drop", "--audit-queue-size", "3",
        "--audit-block-timeout", "1",
    )  # fmt: skip
    c = RawClient(p.port, TRUST_USER, application_name="dropper")
    try:
        assert _types(c.query(PERSONAL)) == ROWS
        limit_file(p, path.stat().st_size)
        for _ in range(8):
            c.send_raw(query_message(PERSONAL))
            got = read_until(c, 1, timeout=5)
            assert _types(got) == ROWS, got
        assert p.metric("pgveil_audit_failing") == 1
        assert p.metric("pgveil_audit_events_dropped_total") >= 5
    finally:
        c.close()
        stop_unlimited(p)
    assert "Traceback" not in p.log(), p.log()
