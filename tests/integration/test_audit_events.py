"""Access events carry outcomes: rows, SQLSTATE, duration and the data subjects touched,
over the simple and extended protocols, text and binary, masked and unmasked."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import asyncpg
import psycopg
import pytest

from proxy.demo.embedded_pg import EmbeddedPostgres
from tests.integration.audit_wire import all_events
from tests.integration.masking_fixture import (
    ADMIN,
    ADMIN_PW,
    HASH_KEY,
    HELPDESK,
    HELPDESK_PW,
    RULES,
    dsn,
)
from tests.support import ProxyProcess


class Audited:
    def __init__(self, proxy: ProxyProcess, path: Path) -> None:
        self.proxy = proxy
        self.path = path
        self.seen = 0

    def new_events(self, role: str | None = None, count: int = 0) -> list[dict[str, Any]]:
        """Events written since the last call (waits for at least `count` of `role`)."""
        deadline = time.monotonic() + 10
        while True:
            events = all_events(self.path)[self.seen :]  # complete lines: a write may be under way
            # a `running` event precedes a statement whose rows went out in several reads
            # (possible for any result when the machine is busy): it is not one of these
            mine = [
                e
                for e in events
                if e["type"] in ("access", "refused")
                and e.get("outcome") != "running"
                and role in (None, e["role"])
            ]
            if len(mine) >= count:
                self.seen += len(events)
                return mine
            assert time.monotonic() < deadline, f"expected {count} events, got {mine}"
            time.sleep(0.05)


@pytest.fixture(scope="module")
def audited(
    pg: EmbeddedPostgres, billing: ProxyProcess, tmp_path_factory: Any
) -> Iterator[Audited]:
    d = tmp_path_factory.mktemp("audit-events")
    rules = d / "rules.yaml"
    rules.write_text(RULES)
    env = {"PGVEIL_TEST_HASH_KEY": HASH_KEY, "PGVEIL_CATALOG_PASSWORD": pg.password}
    with ProxyProcess(
        pg.port, "--upstream-sslmode", "disable", "--rules", str(rules),
        "--catalog-user", pg.superuser, "--audit-file", str(d / "audit.jsonl"),
        "--audit-subjects-limit", "3", env=env,
    ) as p:  # fmt: skip
        yield Audited(p, d / "audit.jsonl")


def test_simple_query_rows_subjects_and_duration(pg: EmbeddedPostgres, audited: Audited) -> None:
    audited.new_events()
    with psycopg.connect(dsn(pg, audited.proxy.port, ADMIN, ADMIN_PW), autocommit=True) as c:
        c.execute("SELECT i_customer, name FROM billing.customers ORDER BY 1").fetchall()
        c.execute("SELECT name FROM billing.customers").fetchall()
    first, second = audited.new_events(ADMIN, 2)
    assert first["rows"] == 2 and first["outcome"] == "ok"
    assert first["subjects"] == {"billing.customers": ["1", "2"]}
    assert first["subjects_total"] == {"billing.customers": 2}
    assert first["subjects_complete"] is True and first["duration_ms"] >= 0
    assert first["columns_raw"] == ["billing.customers.name"] and first["columns_masked"] == []
    # the subject column is not in the result: the event says the list is not complete
    assert second["rows"] == 2 and "subjects" not in second
    assert second["subjects_complete"] is False


def test_errors_and_affected_rows(pg: EmbeddedPostgres, audited: Audited) -> None:
    audited.new_events()
    with psycopg.connect(dsn(pg, audited.proxy.port, ADMIN, ADMIN_PW)) as c:
        with pytest.raises(psycopg.errors.DivisionByZero):
            c.execute("SELECT name FROM billing.customers WHERE i_customer = 1 / 0")
        c.rollback()
        c.execute("UPDATE billing.customers SET notes = notes WHERE i_customer IN (1, 2)")
        c.execute("UPDATE billing.customers SET notes = notes RETURNING i_customer").fetchall()
        c.rollback()
    err, upd, ret = audited.new_events(ADMIN, 3)
    assert err["outcome"] == "22012" and err["rows"] == 0
    assert upd["kinds"] == ["update"] and upd["rows"] == 2 and upd["outcome"] == "ok"
    # no key in the result: the subjects come from the WHERE clause
    assert upd["subjects"] == {"billing.customers": ["1", "2"]} and upd["subjects_complete"]
    assert ret["rows"] == 2 and ret["subjects"] == {"billing.customers": ["1", "2"]}


def test_writes_name_their_subjects(pg: EmbeddedPostgres, audited: Audited) -> None:
    audited.new_events()
    with psycopg.connect(dsn(pg, audited.proxy.port, ADMIN, ADMIN_PW)) as c:
        c.execute("UPDATE billing.customers SET notes = notes WHERE i_customer = %s", [2])
        c.execute(
            "UPDATE billing.customers SET notes = notes WHERE i_customer = %b AND notes IS NULL",
            [2],
        )
        c.execute("DELETE FROM billing.accounts WHERE i_account = 999")
        c.execute(
            "INSERT INTO billing.customers (i_customer, i_customer_class, name) "
            "VALUES (%s, 1, 'Temp One'), (31, 1, 'Temp Two')",
            [30],
        )
        c.rollback()
    text_param, binary_param, nothing, inserted = audited.new_events(ADMIN, 4)
    assert text_param["subjects"] == {"billing.customers": ["2"]}
    assert binary_param["subjects"] == {"billing.customers": ["2"]}
    assert nothing["rows"] == 0 and "subjects" not in nothing and nothing["subjects_complete"]
    assert inserted["rows"] == 2 and inserted["subjects"] == {"billing.customers": ["30", "31"]}


def test_extended_protocol_binary_and_prepared(pg: EmbeddedPostgres, audited: Audited) -> None:
    audited.new_events()
    with psycopg.connect(dsn(pg, audited.proxy.port, ADMIN, ADMIN_PW), autocommit=True) as c:
        for key in (1, 2):
            c.execute(
                "SELECT i_customer, email FROM billing.customers WHERE i_customer = %s",
                [key],
                binary=True,
                prepare=True,
            ).fetchall()
    events = audited.new_events(ADMIN, 2)
    assert [e["subjects"] for e in events] == [
        {"billing.customers": ["1"]},
        {"billing.customers": ["2"]},
    ]
    assert all(e["rows"] == 1 and e["outcome"] == "ok" for e in events)

    async def run() -> None:
        conn = await asyncpg.connect(
            host="127.0.0.1", port=audited.proxy.port, user=ADMIN, password=ADMIN_PW,
            database="postgres", ssl=False,
        )  # fmt: skip
        try:
            stmt = await conn.prepare(
                "SELECT a.i_account, c.i_customer FROM billing.accounts a "
                "JOIN billing.customers c USING (i_customer) WHERE a.ip IS NOT NULL"
            )
            await stmt.fetch()
            await stmt.fetch()
        finally:
            await conn.close()

    asyncio.run(run())
    events = audited.new_events(ADMIN, 2)
    for e in events:
        assert e["rows"] == 2 and e["subjects_complete"] is True
        assert e["subjects"] == {"billing.accounts": ["10", "20"], "billing.customers": ["1", "2"]}


def test_pipeline_error_skips_the_rest(pg: EmbeddedPostgres, audited: Audited) -> None:
    audited.new_events()
    with psycopg.connect(dsn(pg, audited.proxy.port, ADMIN, ADMIN_PW), autocommit=True) as c:
        with pytest.raises(psycopg.errors.DivisionByZero), c.pipeline():
            c.execute("SELECT i_customer FROM billing.customers WHERE i_customer = %s", [1])
            c.execute("SELECT name FROM billing.customers WHERE i_customer = %s / 0", [1])
            c.execute("SELECT email FROM billing.customers WHERE i_customer = %s", [2])
        c.execute("SELECT i_customer, phone FROM billing.customers WHERE i_customer = 2")
    events = audited.new_events(ADMIN, 3)
    assert [(e["outcome"], e["rows"]) for e in events] == [("ok", 1), ("22012", 0), ("ok", 1)]
    assert events[0]["subjects"] == {"billing.customers": ["1"]}
    assert events[2]["subjects"] == {"billing.customers": ["2"]}


def test_masked_reads_record_subjects_and_limit(pg: EmbeddedPostgres, audited: Audited) -> None:
    audited.new_events()
    with psycopg.connect(dsn(pg, audited.proxy.port, HELPDESK, HELPDESK_PW)) as c:
        c.execute("CREATE TEMP TABLE many AS SELECT g FROM generate_series(1, 5) g")
        rows = c.execute(
            "SELECT c.i_customer, c.name FROM billing.customers c, many ORDER BY 1"
        ).fetchall()
        assert len(rows) == 10
    (e,) = [x for x in audited.new_events(HELPDESK, 1) if x["type"] == "access"]
    assert e["decision"] == "rewritten" and "billing.customers.name" in e["columns_masked"]
    assert e["rows"] == 10 and e["subjects"] == {"billing.customers": ["1", "2"]}


def test_subject_list_is_capped_but_counted(pg: EmbeddedPostgres, audited: Audited) -> None:
    pg.psql(
        "INSERT INTO billing.customers (i_customer, i_customer_class, name) "
        "SELECT g, 1, 'Generated ' || g FROM generate_series(100, 109) g"
    )
    try:
        audited.new_events()
        with psycopg.connect(dsn(pg, audited.proxy.port, ADMIN, ADMIN_PW)) as c:
            c.execute("SELECT i_customer, name FROM billing.customers").fetchall()
        (e,) = audited.new_events(ADMIN, 1)
        assert e["rows"] == 12 and len(e["subjects"]["billing.customers"]) == 3
        assert e["subjects_total"] == {"billing.customers": 12}
    finally:
        pg.psql("DELETE FROM billing.customers WHERE i_customer >= 100")


def test_sql_prepare_execute_and_cursor_fetch_are_accesses(
    pg: EmbeddedPostgres, audited: Audited
) -> None:
    audited.new_events()
    with psycopg.connect(dsn(pg, audited.proxy.port, ADMIN, ADMIN_PW)) as c:
        c.execute("PREPARE p AS SELECT i_customer, name FROM billing.customers ORDER BY 1")
        c.execute("EXECUTE p").fetchall()
        c.execute("DECLARE cur CURSOR FOR SELECT i_customer, email FROM billing.customers")
        c.execute("FETCH 1 FROM cur").fetchall()
        c.rollback()
    prep, execute, declare, fetch = audited.new_events(ADMIN, 4)
    assert prep["kinds"] == ["prepare"] and prep["rows"] == 0
    assert execute["kinds"] == ["execute"] and execute["tables"] == ["billing.customers"]
    assert execute["rows"] == 2 and execute["subjects"] == {"billing.customers": ["1", "2"]}
    assert execute["columns_raw"] == ["billing.customers.name"]
    assert declare["kinds"] == ["declare"]
    assert fetch["kinds"] == ["fetch"] and fetch["rows"] == 1
    assert (
        fetch["tables"] == ["billing.customers"]
        and len(fetch["subjects"]["billing.customers"]) == 1
    )


def test_an_event_is_written_before_its_result_is_released(
    pg: EmbeddedPostgres, audited: Audited
) -> None:
    """Events are written once per event-loop iteration; the results they describe wait
    for that write. Several sessions at once: whenever a client has a result, the audit
    file already holds the event of every statement that session completed."""
    audited.new_events()

    async def session(i: int, role: str, password: str) -> None:
        conn = await asyncpg.connect(
            host="127.0.0.1", port=audited.proxy.port, user=role, password=password,
            database="postgres", ssl=False, server_settings={"application_name": f"order{i}"},
        )  # fmt: skip
        try:
            for done in range(1, 16):
                await conn.fetch(
                    "SELECT i_customer, name FROM billing.customers WHERE i_customer = $1",
                    done % 3 + 1,
                )
                written = [
                    e
                    for e in all_events(audited.path)
                    if e["type"] == "access" and e.get("application_name") == f"order{i}"
                ]
                assert len(written) >= done, (i, done, len(written))
        finally:
            await conn.close()

    async def run() -> None:
        await asyncio.gather(
            *(
                session(i, *((ADMIN, ADMIN_PW) if i % 2 else (HELPDESK, HELPDESK_PW)))
                for i in range(6)
            )
        )

    asyncio.run(run())
    audited.new_events()
