"""Audit events from real sessions: what they say, that the chain holds, that they carry no
personal value and no literal."""

from __future__ import annotations

import json
import time
from pathlib import Path

import psycopg
import pytest

from audit.files import read_events, verify_files
from proxy.demo.embedded_pg import EmbeddedPostgres
from tests.integration.masking_fixture import (
    ADMIN,
    ADMIN_PW,
    EMAIL,
    HASH_KEY,
    NAME,
    RULES,
    dsn,
    leaks,
)
from tests.support import ProxyProcess


def test_audit_stream_of_masked_and_unmasked_sessions(
    pg: EmbeddedPostgres,
    billing: ProxyProcess,
    tmp_path: Path,
) -> None:
    rules = tmp_path / "rules.yaml"
    rules.write_text(RULES)
    audit = tmp_path / "audit.jsonl"
    env = {"PGVEIL_TEST_HASH_KEY": HASH_KEY, "PGVEIL_CATALOG_PASSWORD": pg.password}
    p = ProxyProcess(
        pg.port, "--upstream-sslmode", "disable", "--rules", str(rules),
        "--catalog-user", pg.superuser, "--audit-file", str(audit), env=env,
    )  # fmt: skip
    try:
        with psycopg.connect(dsn(pg, p.port), autocommit=True) as c:
            c.execute(
                "SELECT name, email FROM billing.customers WHERE notes <> 'zz-literal-canary'"
            ).fetchall()
            c.execute(f"SELECT count(*) FROM billing.customers WHERE name = '{NAME}'").fetchall()
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                c.execute(
                    "SELECT query_to_xml('SELECT cc_number FROM billing.customers', true, true, '')"
                )
            c.execute("SELECT 1").fetchall()  # touches nothing personal: no access event
        with psycopg.connect(dsn(pg, p.port, ADMIN, ADMIN_PW)) as c:
            assert c.execute(
                "SELECT name FROM billing.customers WHERE i_customer = 1"
            ).fetchone() == (NAME,)
            c.execute("UPDATE billing.customers SET notes = notes WHERE i_customer = %s", [2])
            c.execute("SELECT 2").fetchone()  # touches nothing personal: no event
            c.rollback()
        deadline = time.monotonic() + 60
        # the closing admin session may still be queueing its session.end: wait for it
        while (
            p.metric("pgveil_audit_events_written_total") < 5
            or p.metric("pgveil_audit_queue_depth") != 0
        ):
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert p.metric("pgveil_audit_failing") == 0
    finally:
        p.stop()
    events = list(read_events(audit))
    assert verify_files([audit])[1] is None
    kinds = [e["type"] for e in events]
    assert kinds.count("session.start") == 2 and kinds.count("session.end") == 2
    done = [e for e in events if e["type"] == "access" and e["outcome"] != "running"]
    access = [e for e in done if e["role"] == "helpdesk"]
    full = [e for e in done if e["role"] == "billing_admin"]
    refused = [e for e in events if e["type"] == "refused"]
    assert len(access) == 2 and len(refused) == 1
    # full-access roles are recorded too, reads and writes alike
    assert [(e["kinds"], e["tables"], e["decision"], e["classification"]) for e in full] == [
        (["select"], ["billing.customers"], "passed", "unmasked"),
        (["update"], ["billing.customers"], "passed", "unmasked"),
    ]
    assert (
        full[1]["statement"] == "UPDATE billing . customers SET notes = notes WHERE i_customer = $1"
    )
    first = access[0]
    assert first["role"] == "helpdesk" and first["classification"] == "masked"
    assert first["tables"] == ["billing.customers"] and first["decision"] == "rewritten"
    assert {"billing.customers.name", "billing.customers.email"} <= set(first["columns_masked"])
    assert first["statement"].startswith(
        "SELECT name , email FROM billing . customers WHERE notes <> ?"
    )
    assert first["client"].startswith("127.0.0.1:") and first["database"] == "postgres"
    assert first["session"] == events[0]["session"] and len(first["fingerprint"]) == 16
    assert refused[0]["reason"] == "function query_to_xml can read data pgveil cannot mask"
    starts = {e["role"]: e["classification"] for e in events if e["type"] == "session.start"}
    assert starts == {"helpdesk": "masked", "billing_admin": "unmasked"}
    text = audit.read_text()
    assert "zz-literal-canary" not in text and NAME not in text and EMAIL not in text
    assert not leaks(text) and not leaks(p.log())
    for line in text.splitlines():
        json.loads(line)


def test_audit_to_stdout(pg: EmbeddedPostgres, billing: ProxyProcess) -> None:
    with ProxyProcess(
        pg.port, "--upstream-sslmode", "disable", "--audit-stdout", "true", metrics=False
    ) as p:
        with psycopg.connect(dsn(pg, p.port, ADMIN, ADMIN_PW)) as c:
            c.execute("SELECT 1")
        p.stop()
        events = [json.loads(line) for line in p.log().splitlines() if '"prev"' in line]
    # a clean shutdown seals the chain's end with a checkpoint
    assert [e["type"] for e in events] == ["session.start", "session.end", "audit.checkpoint"]
    assert events[0]["classification"] == "unmasked" and events[1]["prev"] == events[0]["hash"]


def test_recorded_unmasked_sessions_stay_byte_identical(
    pg: EmbeddedPostgres, billing: ProxyProcess, tmp_path: Path
) -> None:
    from tests.integration.test_transparency import _raw_exchange

    rules = tmp_path / "rules.yaml"
    rules.write_text(RULES)
    env = {"PGVEIL_TEST_HASH_KEY": HASH_KEY, "PGVEIL_CATALOG_PASSWORD": pg.password}
    with ProxyProcess(
        pg.port, "--upstream-sslmode", "disable", "--rules", str(rules),
        "--catalog-user", pg.superuser, "--audit-file", str(tmp_path / "a.jsonl"),
        metrics=False, env=env,
    ) as p:  # fmt: skip
        assert _raw_exchange(p.port) == _raw_exchange(pg.port)
