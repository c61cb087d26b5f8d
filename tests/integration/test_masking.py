"""Functional tests of masked sessions: shapes, exact non-personal values, writes, refusals,
and unmasked roles untouched."""

from __future__ import annotations

import psycopg
import pytest

from proxy.demo.embedded_pg import EmbeddedPostgres
from tests.integration.masking_fixture import (
    ADMIN,
    ADMIN_PW,
    AGENT,
    AGENT_PW,
    CARD,
    EMAIL,
    NAME,
    dsn,
    leaks,
    masking_proxy,
)
from tests.support import ProxyProcess


def test_masked_shapes_and_exact_other_values(pg: EmbeddedPostgres, billing: ProxyProcess) -> None:
    with psycopg.connect(dsn(pg, billing.port)) as c:
        cur = c.execute("SELECT * FROM billing.customers WHERE i_customer = 1")
        row = cur.fetchone()
        cols = [d.name for d in cur.description or ()]
    assert row is not None
    assert cols == [
        "i_customer",
        "i_customer_class",
        "name",
        "email",
        "phone",
        "cc_number",
        "login",
        "extra",
        "balance",
        "notes",
    ]
    i, _cls, name, email, phone, card, login, extra, balance, notes = row
    assert i == 1 and str(balance) == "12.50" and notes == "likes invoices"
    assert name == "Z" + "*" * (len(NAME) - 2) + "t"
    assert email == "z" + "*" * (len(EMAIL.split("@")[0]) - 1) + "@canary-mail.example"
    assert phone == "+**********56"
    assert card is None  # deny
    assert extra == {"dl": "D***********V", "tier": "gold"}
    assert len(login) == 64 and login != "zq_login_secret"


def test_unmasked_role_sees_everything(pg: EmbeddedPostgres, billing: ProxyProcess) -> None:
    with psycopg.connect(dsn(pg, billing.port, ADMIN, ADMIN_PW)) as c:
        assert c.execute(
            "SELECT name, cc_number FROM billing.customers WHERE i_customer = 1"
        ).fetchone() == (NAME, CARD)


def test_group_membership_makes_masked(pg: EmbeddedPostgres, billing: ProxyProcess) -> None:
    with psycopg.connect(dsn(pg, billing.port, AGENT, AGENT_PW)) as c:
        (name,) = c.execute("SELECT name FROM billing.customers WHERE i_customer = 1").fetchone()  # type: ignore[misc]
    assert name != NAME and not leaks(name)


def test_predicates_see_masked_values(pg: EmbeddedPostgres, billing: ProxyProcess) -> None:
    with psycopg.connect(dsn(pg, billing.port)) as c:
        assert c.execute(
            "SELECT count(*) FROM billing.customers WHERE name LIKE 'Zeb%'"
        ).fetchone() == (0,)
        assert c.execute(
            "SELECT count(*) FROM billing.customers WHERE name LIKE 'Z%t'"
        ).fetchone() == (1,)


def test_refusals_are_42501_with_reason_and_session_survives(
    pg: EmbeddedPostgres, billing: ProxyProcess
) -> None:
    with psycopg.connect(dsn(pg, billing.port), autocommit=True) as c:
        for sql, reason in [
            ("SELECT query_to_xml('SELECT 1', true, true, '')", "query_to_xml"),
            ("SET ROLE billing_admin", "role"),
            ("SELECT * FROM billing.leak()", "billing.leak"),
            ("DO $$ BEGIN END $$", "DO"),
        ]:
            with pytest.raises(psycopg.errors.InsufficientPrivilege) as info:
                c.execute(sql)
            assert info.value.diag.message_primary is not None
            assert info.value.diag.message_primary.startswith("pgveil: ")
            assert reason in info.value.diag.message_primary
        assert c.execute("SELECT billing.invoice_total(1)").fetchone() == (42,)


def test_refusal_inside_transaction_aborts_it_like_postgres(
    pg: EmbeddedPostgres, billing: ProxyProcess
) -> None:
    with psycopg.connect(dsn(pg, billing.port)) as c:
        c.execute("SELECT 1")
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            c.execute("SELECT * FROM billing.leak()")
        with pytest.raises(psycopg.errors.InFailedSqlTransaction):
            c.execute("SELECT 1")
        c.rollback()
        assert c.execute("SELECT 2").fetchone() == (2,)


def test_extended_protocol_pipeline_with_refusal(
    pg: EmbeddedPostgres, billing: ProxyProcess
) -> None:
    with psycopg.connect(dsn(pg, billing.port), autocommit=True) as c:
        rows = [
            c.execute(
                "SELECT name FROM billing.customers WHERE i_customer = %s", [i], prepare=True
            ).fetchone()
            for i in (1, 2, 1)
        ]
        assert not leaks(repr(rows))
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            c.execute("SELECT * FROM billing.leak() WHERE length(leak) = %s", [1])
        assert c.execute("SELECT %s::int", [5]).fetchone() == (5,)


def test_write_back_keeps_originals_and_writes_work(
    pg: EmbeddedPostgres, billing: ProxyProcess
) -> None:
    with psycopg.connect(dsn(pg, billing.port)) as c:
        name, email, _notes = c.execute(
            "SELECT name, email, notes FROM billing.customers WHERE i_customer = 2"
        ).fetchone()  # type: ignore[misc]
        # a legacy form saves every field it showed, changing only the notes
        c.execute(
            "UPDATE billing.customers SET name = %s, email = %s, notes = %s WHERE i_customer = %s",
            [name, email, "called back", 2],
        )
        # a real change of a personal field is stored
        c.execute(
            "UPDATE billing.customers SET phone = %s WHERE i_customer = 2 RETURNING phone",
            ["+420611111111"],
        )
        c.execute(
            "INSERT INTO billing.customers (i_customer, i_customer_class, name, email) VALUES (3, 1, 'New Person', 'new@example.net')"
        )
        c.commit()
    stored = pg.psql(
        "SELECT name || '|' || email || '|' || notes || '|' || phone FROM billing.customers WHERE i_customer = 2"
    ).strip()
    assert stored == "Ann Other|ann@example.org|called back|+420611111111"
    assert (
        pg.psql("SELECT name FROM billing.customers WHERE i_customer = 3").strip() == "New Person"
    )
    pg.psql("DELETE FROM billing.customers WHERE i_customer = 3")


def test_update_where_sees_masked_values(pg: EmbeddedPostgres, billing: ProxyProcess) -> None:
    with psycopg.connect(dsn(pg, billing.port)) as c:
        cur = c.execute("UPDATE billing.customers SET notes = notes WHERE name = %s", [NAME])
        assert cur.rowcount == 0
        c.rollback()


def test_views_masked_by_rules_or_definition_and_the_rest_refused(
    pg: EmbeddedPostgres, billing: ProxyProcess
) -> None:
    pg.psql(
        "CREATE OR REPLACE VIEW billing.sneaky AS SELECT i_customer, upper(name) AS up, "
        "name || email AS both_ FROM billing.customers; "
        "CREATE OR REPLACE VIEW billing.tricky AS SELECT name FROM billing.customers "
        "UNION ALL SELECT name FROM billing.customer_classes; "
        "GRANT SELECT ON billing.sneaky, billing.tricky TO helpdesk"
    )
    with psycopg.connect(dsn(pg, billing.port), autocommit=True) as c:
        (name,) = c.execute(
            "SELECT name FROM billing.customer_contacts WHERE i_customer = 1"
        ).fetchone()  # type: ignore[misc]
        assert not leaks(name)
        assert c.execute("SELECT name FROM billing.class_names").fetchone() == (
            "European Customers",
        )
    # views created after the catalog was read: a proxy that reads it fresh
    with masking_proxy(pg, billing.rules_path, metrics=False) as p:  # type: ignore[attr-defined]
        with psycopg.connect(dsn(pg, p.port), autocommit=True) as c:
            row = c.execute("SELECT * FROM billing.sneaky WHERE i_customer = 1").fetchone()
            assert row is not None and row[0] == 1
            assert row[1] == "Z" + "*" * (len(NAME) - 2) + "T" and row[2] is None
            assert not leaks(repr(row))
            with pytest.raises(psycopg.errors.InsufficientPrivilege, match=r"view billing\.tricky"):
                c.execute("SELECT * FROM billing.tricky")
    pg.psql("DROP VIEW billing.sneaky, billing.tricky")


def test_errors_do_not_echo_raw_values(pg: EmbeddedPostgres, billing: ProxyProcess) -> None:
    with psycopg.connect(dsn(pg, billing.port), autocommit=True) as c:
        with pytest.raises(psycopg.errors.InvalidTextRepresentation) as info:
            c.execute("SELECT name::int FROM billing.customers WHERE i_customer = 1")
        assert not leaks(str(info.value))
        with pytest.raises(psycopg.errors.UniqueViolation) as info2:
            c.execute("UPDATE billing.customers SET email = 'ann@example.org' WHERE i_customer = 1")
        assert "ann@example.org" not in (info2.value.diag.message_detail or "")
        assert not leaks(str(info2.value))


def test_copy_to_stdout_is_masked(pg: EmbeddedPostgres, billing: ProxyProcess) -> None:
    with psycopg.connect(dsn(pg, billing.port)) as c:
        with c.cursor().copy("COPY billing.customers TO STDOUT") as cp:
            data = b"".join(bytes(x) for x in cp)
        with c.cursor().copy("COPY billing.customers TO STDOUT (FORMAT binary)") as cp:
            binary = b"".join(bytes(x) for x in cp)
    assert b"Ann" not in data and not leaks(data.decode())
    assert not leaks(binary.decode("latin-1"))


def test_notifications_masked_or_withheld(pg: EmbeddedPostgres, billing: ProxyProcess) -> None:
    import json

    with psycopg.connect(dsn(pg, billing.port), autocommit=True) as listener:
        listener.execute("LISTEN invoice_events")
        listener.execute("LISTEN other_channel")
        with psycopg.connect(pg.dsn() + " sslmode=disable", autocommit=True) as sender:
            sender.execute("SELECT pg_notify('other_channel', %s)", [NAME])
            sender.execute(
                "SELECT pg_notify('invoice_events', %s)",
                [json.dumps({"customer_name": NAME, "email": EMAIL, "amount": 5})],
            )
        got = [(n.channel, n.payload) for n in listener.notifies(timeout=3, stop_after=1)]
    assert len(got) == 1 and got[0][0] == "invoice_events"
    payload = json.loads(got[0][1])
    assert payload["amount"] == 5 and not leaks(got[0][1])
    assert billing.metric("pgveil_notifications_withheld_total") >= 1


def test_masked_startup_role_option_refused(pg: EmbeddedPostgres, billing: ProxyProcess) -> None:
    # cc_agent is a member of cc_staff: the server would run the session as cc_staff
    with pytest.raises(psycopg.OperationalError, match="pgveil: masked roles may not set role"):
        psycopg.connect(dsn(pg, billing.port, AGENT, AGENT_PW) + " options='-c role=cc_staff'")
    with pytest.raises(psycopg.OperationalError, match="replication"):
        psycopg.connect(dsn(pg, billing.port) + " replication=database")


def test_metrics_count_decisions(billing: ProxyProcess) -> None:
    assert billing.metric("pgveil_masked_statements_total", decision="rewrite") >= 1
    assert billing.metric("pgveil_masked_statements_total", decision="refuse") >= 1
    assert billing.metric("pgveil_analysis_cache_total", result="miss") >= 1


def test_sighup_reloads_rules_atomically(
    pg: EmbeddedPostgres, billing: ProxyProcess, tmp_path: object
) -> None:
    import signal
    import time
    from pathlib import Path

    from tests.integration.masking_fixture import RULES

    rules = Path(str(tmp_path)) / "rules.yaml"
    rules.write_text(RULES)
    with masking_proxy(pg, rules) as p:

        def name() -> str:
            with psycopg.connect(dsn(pg, p.port)) as c:
                return c.execute(
                    "SELECT name FROM billing.customers WHERE i_customer = 1"
                ).fetchone()[0]  # type: ignore[index]

        def wait_log(text: str, count: int) -> None:
            deadline = time.monotonic() + 60
            while p.log().count(text) < count:
                assert time.monotonic() < deadline, text
                time.sleep(0.05)

        assert name() != NAME
        rules.write_text(RULES.replace("      name: partial\n", ""))
        p.signal(signal.SIGHUP)
        wait_log("rules.reloaded", 1)
        assert name() == NAME  # the new rules apply to new statements
        rules.write_text(RULES + "\nbogus: 1\n")
        p.signal(signal.SIGHUP)
        wait_log("config.reload_failed", 1)
        assert "unknown key 'bogus'" in p.log()
        assert name() == NAME  # the last good rules stay in force
        rules.write_text(RULES)
        p.signal(signal.SIGHUP)
        wait_log("rules.reloaded", 2)
        assert name() != NAME


def test_messages_raised_by_triggers_are_withheld(
    pg: EmbeddedPostgres, billing: ProxyProcess
) -> None:
    pg.psql(
        """
        CREATE OR REPLACE FUNCTION billing.chatty() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
          RAISE NOTICE 'customer % changed', OLD.name;
          IF NEW.notes = 'explode' THEN RAISE EXCEPTION 'cannot change %', OLD.name; END IF;
          RETURN NEW;
        END $$;
        CREATE TRIGGER chatty BEFORE UPDATE ON billing.customers
          FOR EACH ROW EXECUTE FUNCTION billing.chatty();
        """
    )
    try:
        notices: list[str] = []
        with psycopg.connect(dsn(pg, billing.port)) as c:
            c.add_notice_handler(lambda d: notices.append(str(d.message_primary)))
            c.execute("UPDATE billing.customers SET notes = notes WHERE i_customer = 1")
            with pytest.raises(psycopg.errors.RaiseException) as info:
                c.execute("UPDATE billing.customers SET notes = 'explode' WHERE i_customer = 1")
            c.rollback()
        assert notices and not leaks(" ".join(notices))
        assert "withheld" in notices[0]
        assert not leaks(str(info.value)) and "withheld" in str(info.value)
    finally:
        pg.psql("DROP TRIGGER chatty ON billing.customers; DROP FUNCTION billing.chatty()")


def test_every_metric_in_the_readme_is_exported(
    pg: EmbeddedPostgres, billing: ProxyProcess
) -> None:
    import re
    from pathlib import Path

    with psycopg.connect(dsn(pg, billing.port)) as c, pytest.raises(psycopg.Error):
        c.execute("SELECT 1/0")  # messages and a server error to count

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    section = readme.split("## Metrics and health", 1)[1].split("\n## ", 1)[0]
    documented = set(re.findall(r"^\| `(pgveil_[a-z_]+)`", section, re.M))
    _, text = billing.http("/metrics")
    exported = {
        line.split("{")[0].split(" ")[0] for line in text.splitlines() if line.startswith("pgveil_")
    }
    exported |= {re.sub(r"_(bucket|count|sum|created)$", "", n) for n in exported}
    # families without samples yet still declare themselves
    # (prometheus_client names a counter's family with its _total suffix)
    for kind_name, kind in re.findall(r"^# TYPE (pgveil_[a-z_]+) (\w+)", text, re.M):
        exported.add(kind_name)
        if kind == "counter" and not kind_name.endswith("_total"):
            exported.add(kind_name + "_total")
    assert documented and documented <= exported, documented - exported


def test_builtin_calls_of_every_syntax_still_work(
    pg: EmbeddedPostgres, billing: ProxyProcess
) -> None:
    sql = (
        "SELECT left(name, 2), right(email, 3), substring(phone from 2 for 3), trim(notes), "
        "now() IS NOT NULL, count(*) OVER (), row_number() OVER (ORDER BY i_customer), "
        "extract(year from now()) > 2000, position('a' in coalesce(notes, 'x')), "
        "greatest(balance, 0), nullif(notes, ''), string_agg(email, ',') OVER (), "
        "to_char(balance, '999.99'), format('%s', balance), lower(upper(name)) "
        "FROM billing.customers WHERE i_customer = 1"
    )
    with psycopg.connect(dsn(pg, billing.port)) as c:
        row = c.execute(sql).fetchone()
    assert row is not None and row[0] == "Z*" and row[4] is True and row[7] is True
    assert not leaks(repr(row))
