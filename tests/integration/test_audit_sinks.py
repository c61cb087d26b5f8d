"""The audit table sink in a separate PostgreSQL, `audit who` and `audit verify` over it,
fail-closed delivery while it is down, and a canary sweep of everything pgveil wrote."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

from proxy.demo.embedded_pg import EmbeddedPostgres
from tests.integration.masking_fixture import (
    ADMIN,
    ADMIN_PW,
    EMAIL,
    HASH_KEY,
    HELPDESK,
    HELPDESK_PW,
    NAME,
    PHONE,
    RULES,
    dsn,
    leaks,
)
from tests.support import ProxyProcess

CANARY_NOTE = "zz-canary-note-5521"


@pytest.fixture(scope="module")
def sinkdb() -> Iterator[EmbeddedPostgres]:
    """A second cluster for the audit table: stopping it must not stop the audited one."""
    cluster = EmbeddedPostgres().start()
    try:
        yield cluster
    finally:
        cluster.cleanup()


def pgveil(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "proxy.cli", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )


def start_proxy(
    pg: EmbeddedPostgres, sinkdb: EmbeddedPostgres, tmp: Path, *extra: str
) -> ProxyProcess:
    rules = tmp / "rules.yaml"
    rules.write_text(RULES)
    env = {
        "PGVEIL_TEST_HASH_KEY": HASH_KEY,
        "PGVEIL_CATALOG_PASSWORD": pg.password,
        "PGVEIL_AUDIT_TABLE_DSN": sinkdb.dsn(),
    }
    return ProxyProcess(
        pg.port, "--upstream-sslmode", "disable", "--rules", str(rules),
        "--catalog-user", pg.superuser, "--audit-chain", "test-instance", *extra, env=env,
    )  # fmt: skip


def wait_metric(p: ProxyProcess, name: str, value: float, timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while p.metric(name) != value:
        assert time.monotonic() < deadline, f"{name} never became {value}"
        time.sleep(0.1)


def test_table_sink_who_verify_and_canary_sweep(
    pg: EmbeddedPostgres, billing: ProxyProcess, sinkdb: EmbeddedPostgres, tmp_path: Path
) -> None:
    audit_file = tmp_path / "audit.jsonl"
    p = start_proxy(pg, sinkdb, tmp_path, "--audit-file", str(audit_file))
    try:
        with psycopg.connect(dsn(pg, p.port, HELPDESK, HELPDESK_PW), autocommit=True) as c:
            c.execute("SELECT i_customer, name, email FROM billing.customers WHERE i_customer = 1")
            c.execute("SELECT name FROM billing.customers WHERE name LIKE %s", ["Z%"])
        with psycopg.connect(dsn(pg, p.port, ADMIN, ADMIN_PW)) as c:
            c.execute("SELECT i_customer, name FROM billing.customers WHERE i_customer = 2")
            c.execute(
                "UPDATE billing.customers SET notes = %s WHERE i_customer = 1 RETURNING i_customer",
                [CANARY_NOTE],
            )
            assert c.execute("SELECT notes FROM billing.customers WHERE i_customer = 1").fetchone()
            c.rollback()
        wait_metric(p, "pgveil_audit_queue_depth", 0)
    finally:
        p.stop()
    env = {"PGVEIL_AUDIT_TABLE_DSN": sinkdb.dsn(), "PATH": "/usr/bin:/bin"}
    verified = pgveil("audit", "verify", env=env)
    # without an audit key nothing is sealed: no break, but unproven (exit 3)
    assert verified.returncode == 3, verified.stdout
    assert (
        verified.stdout.startswith("UNPROVEN: ") and "table chain test-instance" in verified.stdout
    )

    def who(*source: str) -> list[dict[str, Any]]:
        out = pgveil(
            "audit", "who", "--table", "billing.customers", "--subject", "1", "--json", *source,
            env=env,
        )  # fmt: skip
        assert out.returncode == 0, out.stderr
        rows: list[dict[str, Any]] = [json.loads(line) for line in out.stdout.splitlines()]
        return rows

    from_table = who()
    assert who("--file", str(audit_file)) == from_table  # both sinks tell the same story
    touched = [(r["role"], r["touched"], r["kinds"]) for r in from_table]
    assert touched == [
        (HELPDESK, "yes", ["select"]),
        # the name lookup returned no subject column: it may have touched customer 1
        (HELPDESK, "possibly", ["select"]),
        (ADMIN, "yes", ["update"]),
        (ADMIN, "yes", ["select"]),  # notes, read back: the WHERE clause names the key
    ]
    assert from_table[0]["columns_masked"] and from_table[2]["classification"] == "unmasked"
    table_out = pgveil(
        "audit", "who", "--table", "billing.customers", "--subject", "1", "--format", "table",
        env=env,
    )  # fmt: skip
    assert table_out.returncode == 0 and "(4 event(s))" in table_out.stdout
    # nothing personal in anything pgveil wrote: the audit file, its log, the audit table
    dump = sinkdb.psql("SELECT line FROM pgveil.audit_events", dbname="postgres")
    for text in (audit_file.read_text(), p.log(), dump, table_out.stdout):
        for canary in (NAME, EMAIL, PHONE, CANARY_NOTE):
            assert canary not in text
        assert not leaks(text)
    # tampering with a stored event is found
    sinkdb.psql(
        "UPDATE pgveil.audit_events SET line = replace(line, '\"rows\":1', '\"rows\":7') "
        "WHERE seq = (SELECT min(seq) FROM pgveil.audit_events WHERE type = 'access')"
    )
    broken = pgveil("audit", "verify", env=env)
    assert broken.returncode == 1, broken.stdout
    assert broken.stdout.startswith("BROKEN: modified: table chain test-instance row ")


def test_stopped_table_sink_blocks_then_recovers(
    pg: EmbeddedPostgres, billing: ProxyProcess, sinkdb: EmbeddedPostgres, tmp_path: Path
) -> None:
    sinkdb.psql("DROP SCHEMA IF EXISTS pgveil CASCADE")  # created again by the sink
    p = start_proxy(pg, sinkdb, tmp_path, "--audit-block-timeout", "1")
    try:
        masked = psycopg.connect(dsn(pg, p.port, HELPDESK, HELPDESK_PW), autocommit=True)
        admin = psycopg.connect(dsn(pg, p.port, ADMIN, ADMIN_PW), autocommit=True)
        personal = "SELECT i_customer, name FROM billing.customers WHERE i_customer = 2"
        masked.execute(personal).fetchall()
        wait_metric(p, "pgveil_audit_queue_depth", 0)
        sinkdb.stop()
        # the statement running when the sink goes away completes; its event waits in the
        # queue. From then on, statements on personal data are refused, after a wait.
        masked.execute(personal).fetchall()
        wait_metric(p, "pgveil_audit_failing", 1)
        for conn in (masked, admin):
            started = time.monotonic()
            with pytest.raises(psycopg.errors.InsufficientPrivilege, match="audit stream"):
                conn.execute(personal)
            assert time.monotonic() - started >= 0.9  # it waited for the sink first
            assert conn.execute("SELECT 1").fetchone() == (1,)  # nothing personal: runs
        sinkdb.restart()
        wait_metric(p, "pgveil_audit_failing", 0, timeout=30)
        assert masked.execute(personal).fetchall()
        assert admin.execute(personal).fetchall()
        wait_metric(p, "pgveil_audit_queue_depth", 0)
        masked.close()
        admin.close()
    finally:
        p.stop()
    events = [
        json.loads(line)
        for line in sinkdb.psql(
            "SELECT line FROM pgveil.audit_events ORDER BY seq", dbname="postgres"
        ).split("\n")
        if line.strip()
    ]
    access = [e for e in events if e["type"] == "access" and e["outcome"] != "running"]
    refused = [e for e in events if e["type"] == "refused"]
    # before, during (queued, then written) and after the outage: nothing was lost
    assert len(access) == 4 and all(e["outcome"] == "ok" for e in access)
    assert {e["role"] for e in refused} <= {HELPDESK, ADMIN}
    verified = pgveil("audit", "verify", "--dsn", sinkdb.dsn())
    assert verified.returncode == 3 and "no break found" in verified.stdout, verified.stdout
