"""White-box attacks on the audit: sequences an insider who has read the code would use to
evade it, each run against the real server through a real pgveil; every access must
still be recorded.

Code the server runs without the statement naming it, which pgveil's proof of a statement's
subjects relies on not being there (README "Subjects: what complete means"):

* a row security policy whose expression calls a function runs for every row a SELECT
  scans: the function may send other subjects' data (a NOTICE) while the event said the
  statement touched only the subject its WHERE clause names;
* an index expression runs on every row a write stores in the index (an update of an
  indexed column), like a trigger;
* a trigger (or policy, or index) created through pgveil on a protected table after pgveil
  read the catalog runs before pgveil reads it again.

In each, the leak is shown first (the client got another subject's data in a NOTICE), then
what the event must say: not complete, so that `audit who` lists it for the other subject.

And `audit who --subject K` itself: events record each key in its type's one text (a uuid in
lower case), but the compliance team types the key as they have it (upper case, braces,
leading zeros): `who` must not answer "nobody" because the spelling differs.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

from proxy.cli.audit import who
from proxy.demo.embedded_pg import EmbeddedPostgres
from tests.integration.audit_wire import all_events, audit_env, start_audited
from tests.integration.masking_fixture import ADMIN, ADMIN_PW, NAME, RULES, dsn
from tests.support import ProxyProcess

CUSTOMERS, ACCOUNTS = "billing.customers", "billing.accounts"
IP = "198.51.173.222"  # billing.accounts 10's (masking_fixture)

# a function that sends other rows' data in a NOTICE, once the session asks for it (the
# index is built, and other tests run, without it)
SCHEMA = """
DROP SCHEMA IF EXISTS wbaudit CASCADE;
CREATE SCHEMA wbaudit;
GRANT USAGE ON SCHEMA wbaudit TO billing_admin;
CREATE FUNCTION wbaudit.peek(k bigint) RETURNS bigint LANGUAGE plpgsql IMMUTABLE AS $f$
BEGIN
  IF current_setting('wbaudit.leak', true) = 'on' THEN
    RAISE NOTICE 'peek %', (SELECT string_agg(name, ',') FROM billing.customers
                             WHERE i_customer <> k);
  END IF;
  RETURN k;
END $f$;
CREATE FUNCTION wbaudit.seen(k bigint) RETURNS bool LANGUAGE plpgsql STABLE SECURITY DEFINER
AS $f$
BEGIN
  IF current_setting('wbaudit.leak', true) = 'on' THEN
    RAISE NOTICE 'seen %', (SELECT string_agg(name, ',') FROM billing.customers
                             WHERE i_customer <> k);
  END IF;
  RETURN true;
END $f$;
CREATE FUNCTION wbaudit.trg() RETURNS trigger LANGUAGE plpgsql AS $f$
BEGIN
  IF current_setting('wbaudit.leak', true) = 'on' THEN
    RAISE NOTICE 'trg %', (SELECT string_agg(ip::text, ',') FROM billing.accounts
                            WHERE i_account <> NEW.i_account);
  END IF;
  RETURN NEW;
END $f$;
GRANT EXECUTE ON ALL FUNCTIONS IN SCHEMA wbaudit TO billing_admin;
CREATE TABLE wbaudit.people (k uuid PRIMARY KEY, secret text);
INSERT INTO wbaudit.people VALUES ('a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11', 'secret-1'),
  ('b1ffcd88-8d1a-4ef8-bb6d-6bb9bd380a22', 'secret-2');
GRANT SELECT ON wbaudit.people TO billing_admin;
"""
CLEANUP = """
DROP POLICY IF EXISTS wbaudit_all ON billing.customers;
ALTER TABLE billing.customers DISABLE ROW LEVEL SECURITY;
DROP TRIGGER IF EXISTS wbaudit_t ON billing.accounts;
REVOKE TRIGGER ON billing.accounts FROM billing_admin;
DROP SCHEMA IF EXISTS wbaudit CASCADE;
"""


@pytest.fixture
def schema(pg: EmbeddedPostgres, billing: Any) -> Iterator[None]:
    pg.psql(SCHEMA)
    try:
        yield
    finally:
        pg.psql(CLEANUP)


def _run(pg: EmbeddedPostgres, port: int, *sql: str) -> list[str]:
    """Runs `sql` as the unmasked role in one session; the NOTICEs it got."""
    notices: list[str] = []
    with psycopg.connect(dsn(pg, port, ADMIN, ADMIN_PW), autocommit=True) as conn:
        conn.add_notice_handler(lambda d: notices.append(str(d.message_primary)))
        conn.execute("SET wbaudit.leak = on")
        for statement in sql:
            conn.execute(statement)
    return notices


def _event(path: Path, statement: str) -> dict[str, Any]:
    found = [
        e
        for e in all_events(path)
        if e["type"] == "access" and e.get("outcome") != "running" and e["statement"] == statement
    ]
    assert len(found) == 1, found
    return found[0]


def _touched(path: Path, table: str, subject: str, statement: str) -> list[str]:
    """What `audit who` says of the event of `statement` for the subject."""
    event = _event(path, statement)
    return [
        r["touched"]
        for r in who(all_events(path), table, subject, None, None)
        if r["id"] == event["id"]
    ]


def test_a_row_security_policy_calling_a_function_leaves_reads_incomplete(
    pg: EmbeddedPostgres, schema: None, tmp_path: Path
) -> None:
    pg.psql(
        "CREATE POLICY wbaudit_all ON billing.customers USING (wbaudit.seen(i_customer));"
        "ALTER TABLE billing.customers ENABLE ROW LEVEL SECURITY;"
    )
    with start_audited(pg, tmp_path) as p:
        notices = _run(pg, p.port, "SELECT email FROM billing.customers WHERE i_customer = 2")
        assert any(NAME in n for n in notices), notices  # customer 1's name went out
        path = tmp_path / "audit.jsonl"
        shape = "SELECT email FROM billing . customers WHERE i_customer = ?"
        assert _event(path, shape)["subjects_complete"] is False
        assert _touched(path, CUSTOMERS, "1", shape) == ["possibly"]


def test_an_index_expression_leaves_writes_incomplete(
    pg: EmbeddedPostgres, schema: None, tmp_path: Path
) -> None:
    pg.psql("CREATE INDEX wbaudit_peek ON billing.customers (wbaudit.peek(i_customer))")
    with start_audited(pg, tmp_path) as p:
        notices = _run(
            pg, p.port, "BEGIN",
            "UPDATE billing.customers SET email = 'e' WHERE i_customer = 2", "ROLLBACK",
        )  # fmt: skip
        assert any(NAME in n for n in notices), notices
        path = tmp_path / "audit.jsonl"
        shape = "UPDATE billing . customers SET email = ? WHERE i_customer = ?"
        assert _event(path, shape)["subjects_complete"] is False
        assert _touched(path, CUSTOMERS, "1", shape) == ["possibly"]


def test_a_trigger_created_through_pgveil_leaves_writes_incomplete(
    pg: EmbeddedPostgres, schema: None, tmp_path: Path
) -> None:
    pg.psql("GRANT TRIGGER ON billing.accounts TO billing_admin")
    with start_audited(pg, tmp_path) as p:
        notices = _run(
            pg, p.port,
            "CREATE TRIGGER wbaudit_t BEFORE UPDATE ON billing.accounts"
            " FOR EACH ROW EXECUTE FUNCTION wbaudit.trg()",
            "BEGIN", "UPDATE billing.accounts SET id = 'x' WHERE i_account = 20", "ROLLBACK",
        )  # fmt: skip
        assert any(IP in n for n in notices), notices  # account 10's address went out
        path = tmp_path / "audit.jsonl"
        shape = "UPDATE billing . accounts SET id = ? WHERE i_account = ?"
        assert _event(path, shape)["subjects_complete"] is False
        assert _touched(path, ACCOUNTS, "10", shape) == ["possibly"]


def test_who_finds_a_key_however_it_is_spelled(
    pg: EmbeddedPostgres, schema: None, tmp_path: Path
) -> None:
    rules = tmp_path / "rules.yaml"
    rules.write_text(
        RULES + "  wbaudit.people:\n    subject: k\n    columns:\n      secret: partial\n"
    )
    with ProxyProcess(
        pg.port, "--upstream-sslmode", "disable", "--rules", str(rules),
        "--catalog-user", pg.superuser, "--audit-file", str(tmp_path / "audit.jsonl"),
        "--log-level", "error", env=audit_env(pg),
    ) as p:  # fmt: skip
        _run(pg, p.port, "SELECT k, secret FROM wbaudit.people")
        _run(
            pg,
            p.port,
            "SELECT secret FROM wbaudit.people WHERE k = 'b1ffcd88-8d1a-4ef8-bb6d-6bb9bd380a22'",
        )
    path = tmp_path / "audit.jsonl"
    by_rows = _event(path, "SELECT k , secret FROM wbaudit . people")
    assert by_rows["subjects_complete"] is True
    assert "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11" in by_rows["subjects"]["wbaudit.people"]
    by_key = _event(path, "SELECT secret FROM wbaudit . people WHERE k = ?")
    assert by_key["subjects"] == {"wbaudit.people": ["b1ffcd88-8d1a-4ef8-bb6d-6bb9bd380a22"]}
    assert by_key["subjects_complete"] is True
    for spelled in ("A0EEBC99-9C0B-4EF8-BB6D-6BB9BD380A11", "{a0eebc999c0b4ef8bb6d6bb9bd380a11}"):
        found = who(all_events(path), "wbaudit.people", spelled, None, None)
        assert [r["id"] for r in found if r["touched"] == "yes"] == [by_rows["id"]], spelled
    found = who(
        all_events(path), "wbaudit.people", "B1FFCD88-8D1A-4EF8-BB6D-6BB9BD380A22", None, None
    )
    assert {r["id"] for r in found if r["touched"] == "yes"} == {by_rows["id"], by_key["id"]}
