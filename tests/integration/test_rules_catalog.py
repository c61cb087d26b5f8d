"""The rules checked against the real catalog whenever pgveil reads it.

A rules file naming something the database does not have (a misspelled table, column,
subject column or allow-listed function; a misspelled masked role) must never leave data
unmasked: pgveil starts, logs the problem (error level, naming the rule), sets
`pgveil_rules_problems`, refuses masked logins and masked sessions' statements with
SQLSTATE 42501 naming the rule, lets unmasked roles work, and `pgveil proxy --check-config`
exits non-zero naming it. The same holds when the database changes under running rules
(a table renamed or dropped: caught at the next catalog read) and when the rules are
reloaded with SIGHUP.

The rules here name `billing.*` tables of the shared fixture (read only) and a scratch
table of this module's own; only the scratch table is renamed or dropped, so the proxies
of other modules never see a catalog that does not match their rules.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import asyncpg
import psycopg
import pytest

from proxy.demo.embedded_pg import EmbeddedPostgres
from proxy.wire import messages as m
from proxy.wire.startup import StartupMessage
from tests.integration.masking_fixture import (
    ADMIN,
    ADMIN_PW,
    AGENT,
    AGENT_PW,
    HASH_KEY,
    HELPDESK,
    HELPDESK_PW,
    NAME,
    RULES,
    dsn,
    leaks,
)
from tests.support import ProxyProcess, RawClient, errors_in

SCRATCH = "billing.rc_scratch"
SCRATCH_RULE = f"""  {SCRATCH}:
    subject: id
    columns:
      secret: partial
"""
# the fixture's rules, scoped to the database the fixture fills, plus the scratch table
GOOD = "databases: [postgres]\n" + RULES + SCRATCH_RULE
QUERY = "SELECT name FROM billing.customers WHERE i_customer = 1"

# (what is broken, the rules, the rule's key path a refusal names)
BROKEN = {
    "table": (
        GOOD.replace("  billing.customers:\n", "  billing.custmers:\n"),
        "tables.billing.custmers",
        "relation billing.custmers does not exist",
    ),
    "column": (
        GOOD.replace("      email: email\n", "      emial: email\n", 1),
        "tables.billing.customers.columns.emial",
        "column emial of billing.customers does not exist",
    ),
    "subject": (
        GOOD.replace("subject: i_account", "subject: i_acount"),
        "tables.billing.accounts.subject",
        "subject column i_acount of billing.accounts does not exist",
    ),
    "function": (
        GOOD.replace("allow: [billing.invoice_total]", "allow: [billing.invoice_totl]"),
        "functions.allow",
        "function billing.invoice_totl does not exist",
    ),
}


@pytest.fixture(scope="module", autouse=True)
def scratch(pg: EmbeddedPostgres, billing: ProxyProcess) -> Iterator[None]:
    _create_scratch(pg)
    yield
    pg.psql(f"DROP TABLE IF EXISTS {SCRATCH}, billing.rc_scratch_moved")


def _create_scratch(pg: EmbeddedPostgres) -> None:
    pg.psql(
        f"CREATE TABLE IF NOT EXISTS {SCRATCH} (id int PRIMARY KEY, secret text);"
        f"GRANT SELECT ON {SCRATCH} TO {HELPDESK}, {ADMIN}, cc_staff"
    )


def _env(pg: EmbeddedPostgres) -> dict[str, str]:
    return {"PGVEIL_TEST_HASH_KEY": HASH_KEY, "PGVEIL_CATALOG_PASSWORD": pg.password}


def _rules(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "rules.yaml"
    path.write_text(text)
    return path


def _proxy(pg: EmbeddedPostgres, rules: Path, *extra: str) -> ProxyProcess:
    return ProxyProcess(
        pg.port,
        "--upstream-sslmode", "disable",
        "--rules", str(rules),
        "--catalog-user", pg.superuser,
        *extra,
        env=_env(pg),
    )  # fmt: skip


def _events(p: ProxyProcess, event: str) -> list[dict[str, Any]]:
    out = []
    for line in p.log().splitlines():
        if line.startswith("{"):
            entry = json.loads(line)
            if entry.get("event") == event:
                out.append(entry)
    return out


def _wait(condition: Callable[[], bool], what: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def _problem_logged(p: ProxyProcess, rule: str) -> Callable[[], bool]:
    return lambda: any(e["rule"] == rule for e in _events(p, "rules.problem"))


def _check_config(
    pg: EmbeddedPostgres, rules: Path, *extra: str
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            sys.executable, "-m", "proxy.cli", "proxy", "--check-config",
            "--upstream", f"127.0.0.1:{pg.port}", "--upstream-sslmode", "disable",
            "--rules", str(rules), "--catalog-user", pg.superuser, *extra,
        ],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, **_env(pg)},
    )  # fmt: skip


def _psql(pg: EmbeddedPostgres, port: int, user: str, password: str, sql: str = QUERY) -> str:
    """psql's whole output (it goes on after errors, shows SQLSTATEs)."""
    psql = shutil.which("psql") or str(pg.bindir / "psql")
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    env.update(PGPASSWORD=password, PGSSLMODE="disable")
    r = subprocess.run(
        [psql, "-X", "-At", "-v", "VERBOSITY=verbose", "-h", "127.0.0.1", "-p", str(port),
         "-U", user, "-d", "postgres", "-c", sql],
        capture_output=True, text=True, env=env, timeout=60,
    )  # fmt: skip
    return f"rc={r.returncode}\n{r.stdout}{r.stderr}"


async def _asyncpg_login(port: int, user: str, password: str) -> str:
    conn = await asyncpg.connect(
        host="127.0.0.1", port=port, user=user, password=password, database="postgres", ssl=False
    )
    try:
        return str(await conn.fetchval(QUERY))
    finally:
        await conn.close()


def _masked_login_refused(
    pg: EmbeddedPostgres, p: ProxyProcess, user: str, pw: str, rule: str
) -> None:
    """psql, psycopg and asyncpg are refused at login with 42501 and a message naming the
    rule; so is a bare protocol client (the SQLSTATE of the FATAL itself)."""
    out = _psql(pg, p.port, user, pw)
    assert out.startswith("rc=2") and "FATAL:  pgveil: " in out and rule in out, out
    with pytest.raises(psycopg.OperationalError) as info:
        psycopg.connect(dsn(pg, p.port, user, pw), autocommit=True)
    assert rule in str(info.value)  # (libpq keeps no SQLSTATE of a failed connection)
    with pytest.raises(asyncpg.InsufficientPrivilegeError) as ainfo:
        asyncio.run(_asyncpg_login(p.port, user, pw))
    assert ainfo.value.sqlstate == "42501" and rule in str(ainfo.value)
    assert not leaks(out + str(info.value) + str(ainfo.value))


def _raw_refusal(p: ProxyProcess) -> dict[str, str]:
    """The FATAL a masked trust login (masked_trust, in cc_staff) gets."""
    c = RawClient(p.port, user="masked_trust", connect=False)
    try:
        c.send_raw(
            StartupMessage(
                m.PROTOCOL_3_0, {"user": "masked_trust", "database": "postgres"}
            ).encode()
        )
        (error,) = errors_in(c.until_ready())
        return error
    finally:
        c.close()


def _unmasked_works(pg: EmbeddedPostgres, p: ProxyProcess) -> None:
    with psycopg.connect(dsn(pg, p.port, ADMIN, ADMIN_PW), autocommit=True) as c:
        assert c.execute(QUERY).fetchone() == (NAME,)
    assert asyncio.run(_asyncpg_login(p.port, ADMIN, ADMIN_PW)) == NAME
    assert _psql(pg, p.port, ADMIN, ADMIN_PW) == f"rc=0\n{NAME}\n"


def _masked_works(
    pg: EmbeddedPostgres, p: ProxyProcess, user: str = HELPDESK, pw: str = HELPDESK_PW
) -> None:
    with psycopg.connect(dsn(pg, p.port, user, pw), autocommit=True) as c:
        row = c.execute(QUERY).fetchone()
    assert row is not None and row[0] != NAME and not leaks(row[0])


# ---- a proxy started with rules that do not match ------------------------------------------


@pytest.mark.parametrize("case", list(BROKEN))
def test_rules_naming_what_does_not_exist_refuse_masked_sessions(
    pg: EmbeddedPostgres, tmp_path: Path, case: str
) -> None:
    text, rule, message = BROKEN[case]
    rules = _rules(tmp_path, text)
    with _proxy(pg, rules) as p:
        # the rules name their database: read and checked at start, before any login
        _wait(_problem_logged(p, rule), f"rules.problem {rule}")
        assert p.alive()
        (event,) = [e for e in _events(p, "rules.problem") if e["rule"] == rule]
        assert event["level"] == "error" and event["database"] == "postgres"
        assert event["problem"] == message
        assert event["closes"] == "masked sessions on this database"
        assert p.metric("pgveil_rules_problems", database="postgres") == 1
        _masked_login_refused(pg, p, HELPDESK, HELPDESK_PW, rule)
        _masked_login_refused(pg, p, AGENT, AGENT_PW, rule)  # masked through cc_staff
        raw = _raw_refusal(p)
        assert raw["S"] == "FATAL" and raw["C"] == "42501"
        assert raw["M"] == (
            f"pgveil: the rules do not match database postgres: {rule}: {message}; masked "
            "sessions are refused until the rules are fixed"
        )
        _unmasked_works(pg, p)
        assert p.metric("pgveil_rules_refused_sessions_total", database="postgres") == 7
        assert not leaks(p.log())
    r = _check_config(pg, rules)
    assert r.returncode == 1, r.stdout + r.stderr
    assert f"error: database postgres: {rule}: {message}\n" in r.stdout
    assert "rules: 1 error(s), 0 warning(s)" in r.stdout
    # `rules check --dsn`: the same problem, from the same check
    r = subprocess.run(
        [sys.executable, "-m", "proxy.cli", "rules", "check", "--rules", str(rules),
         "--dsn", pg.dsn() + " sslmode=disable"],
        capture_output=True, text=True, timeout=120, env={**os.environ, **_env(pg)},
    )  # fmt: skip
    assert r.returncode == 1 and f"error: {rule}: {message}\n" in r.stdout, r.stdout


def test_misspelled_masked_role_refuses_logins_unmasked_only_by_default(
    pg: EmbeddedPostgres, tmp_path: Path
) -> None:
    """`roles.masked: [helpdsk, ...]` with `default: unmasked`: helpdesk would see
    everything. Logins unmasked only by the default are refused; listed roles go on."""
    rules = _rules(
        tmp_path, GOOD.replace("masked: [helpdesk, cc_staff]", "masked: [helpdsk, cc_staff]")
    )
    with _proxy(pg, rules) as p:
        _wait(_problem_logged(p, "roles.masked"), "rules.problem roles.masked")
        (event,) = _events(p, "rules.problem")
        assert event["level"] == "error" and event["problem"] == "role helpdsk does not exist"
        assert event["closes"] == "logins unmasked only by roles.default"
        assert p.metric("pgveil_rules_problems", database="postgres") == 1
        _masked_login_refused(
            pg, p, HELPDESK, HELPDESK_PW, "roles.masked: role helpdsk does not exist"
        )
        _masked_works(pg, p, AGENT, AGENT_PW)  # masked through cc_staff: goes on, masked
        _unmasked_works(pg, p)  # listed as unmasked: goes on
        assert p.metric("pgveil_rules_refused_sessions_total", database="postgres") == 3
    r = _check_config(pg, rules)
    assert r.returncode == 1
    assert "error: roles.masked: role helpdsk does not exist\n" in r.stdout


def test_misspelled_unmasked_role_is_a_warning(pg: EmbeddedPostgres, tmp_path: Path) -> None:
    rules = _rules(
        tmp_path, GOOD.replace("unmasked: [billing_admin]", "unmasked: [billing_admin, reportng]")
    )
    with _proxy(pg, rules) as p:
        _wait(_problem_logged(p, "roles.unmasked"), "rules.problem roles.unmasked")
        (event,) = _events(p, "rules.problem")
        assert event["level"] == "warning" and event["problem"] == "role reportng does not exist"
        assert p.metric("pgveil_rules_problems", database="postgres") == 0
        _masked_works(pg, p)
        _unmasked_works(pg, p)
    r = _check_config(pg, rules)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "warning: roles.unmasked: role reportng does not exist\n" in r.stdout
    assert "configuration ok" in r.stdout and "1 warning(s)" in r.stdout


# ---- --check-config -------------------------------------------------------------------------


def test_check_config_good_rules(pg: EmbeddedPostgres, tmp_path: Path) -> None:
    r = _check_config(pg, _rules(tmp_path, GOOD))
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.strip().endswith(
        f"configuration ok; upstream 127.0.0.1:{pg.port} reachable; rules checked against "
        "database(s) postgres: 0 warning(s)"
    )


def test_check_config_lists_every_problem(pg: EmbeddedPostgres, tmp_path: Path) -> None:
    text = BROKEN["table"][0].replace("allow: [billing.invoice_total]", "allow: [billing.nope]")
    r = _check_config(pg, _rules(tmp_path, text))
    assert r.returncode == 1
    problems = [line for line in r.stdout.splitlines() if line.startswith("error: ")]
    assert problems == [
        "error: database postgres: tables.billing.custmers: relation billing.custmers does not exist",
        "error: database postgres: functions.allow: function billing.nope does not exist",
    ]


def test_check_config_without_databases_checks_every_database(
    pg: EmbeddedPostgres, tmp_path: Path
) -> None:
    """Rules without `databases` are for every database: a database that lacks their
    tables is a problem there (masked roles would be refused on it)."""
    pg.psql("CREATE DATABASE rc_empty")
    try:
        r = _check_config(pg, _rules(tmp_path, RULES))
        assert r.returncode == 1
        assert (
            "error: database rc_empty: tables.billing.customers: relation billing.customers does not exist"
            in r.stdout
        )
        assert "database postgres:" not in r.stdout
    finally:
        pg.psql("DROP DATABASE rc_empty")


def test_check_config_cannot_read_the_catalog(pg: EmbeddedPostgres, tmp_path: Path) -> None:
    rules = _rules(tmp_path, GOOD.replace("databases: [postgres]", "databases: [rc_nowhere]"))
    r = _check_config(pg, rules)
    assert r.returncode == 2
    # the log lines on stderr are JSON; the error is one line of its own
    lines = [line for line in r.stderr.splitlines() if not line.startswith("{")]
    assert len(lines) == 1 and lines[0].startswith("pgveil: error: "), r.stderr
    # the cause says which server, database and login (shared.dsn), and the server's reason
    assert lines[0] == (
        "pgveil: error: cannot read the catalog of database rc_nowhere "
        f"(InvalidCatalogNameError): cannot connect to 127.0.0.1:{pg.port} database "
        'rc_nowhere as postgres: database "rc_nowhere" does not exist (3D000)'
    )
    r = _check_config(pg, _rules(tmp_path, GOOD), "--catalog-user", "nobody_here")
    lines = [line for line in r.stderr.splitlines() if not line.startswith("{")]
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert lines == [
        "pgveil: error: cannot read the catalog of database postgres (InvalidPasswordError): "
        f"cannot connect to 127.0.0.1:{pg.port} database postgres as nobody_here: password "
        'authentication failed for user "nobody_here" (28P01)'
    ]


# ---- databases -------------------------------------------------------------------------------


def test_rules_for_every_database_refuse_masked_roles_where_tables_are_missing(
    pg: EmbeddedPostgres, tmp_path: Path
) -> None:
    pg.psql("CREATE DATABASE rc_other")
    try:
        with _proxy(pg, _rules(tmp_path, RULES)) as p:
            _masked_works(pg, p)  # postgres has the tables
            other = dsn(pg, p.port).replace("dbname=postgres", "dbname=rc_other")
            with pytest.raises(
                psycopg.OperationalError,
                match=r"tables\.billing\.customers: relation billing\.customers does not exist",
            ):
                psycopg.connect(other)
            admin = dsn(pg, p.port, ADMIN, ADMIN_PW).replace("dbname=postgres", "dbname=rc_other")
            with psycopg.connect(admin) as c:
                assert c.execute("SELECT current_database()").fetchone() == ("rc_other",)
            _wait(lambda: p.metric("pgveil_rules_problems", database="rc_other") == 5, "gauge")
            assert p.metric("pgveil_rules_problems", database="postgres") == 0
    finally:
        pg.psql("DROP DATABASE rc_other")


def test_databases_key_refuses_masked_roles_elsewhere(pg: EmbeddedPostgres, tmp_path: Path) -> None:
    pg.psql("CREATE DATABASE rc_other")
    try:
        with _proxy(pg, _rules(tmp_path, GOOD)) as p:
            other = dsn(pg, p.port).replace("dbname=postgres", "dbname=rc_other")
            with pytest.raises(
                psycopg.OperationalError,
                match=r"pgveil: the rules are not for database rc_other \(databases: postgres\)",
            ):
                psycopg.connect(other)
            admin = dsn(pg, p.port, ADMIN, ADMIN_PW).replace("dbname=postgres", "dbname=rc_other")
            with psycopg.connect(admin) as c:
                assert c.execute("SELECT 1").fetchone() == (1,)
            assert not _events(p, "rules.problem")  # not a problem: what the rules say
            _masked_works(pg, p)
    finally:
        pg.psql("DROP DATABASE rc_other")


# ---- the database changes under running rules ----------------------------------------------


@pytest.mark.parametrize("change", ["rename", "drop"])
def test_table_renamed_or_dropped_after_start_is_caught_at_the_next_read(
    pg: EmbeddedPostgres, tmp_path: Path, change: str
) -> None:
    rules = _rules(tmp_path, GOOD)
    with _proxy(pg, rules, "--catalog-refresh", "1") as p:
        _wait(lambda: bool(_events(p, "catalog.loaded")), "catalog.loaded")
        assert p.metric("pgveil_rules_problems", database="postgres") == 0
        open_session = psycopg.connect(dsn(pg, p.port), autocommit=True)
        try:
            assert open_session.execute(QUERY).fetchone() != (NAME,)
            prepared = "SELECT name FROM billing.customers WHERE i_customer = %s"
            assert open_session.execute(prepared, [1], prepare=True).fetchone() != (NAME,)
            if change == "rename":
                pg.psql(f"ALTER TABLE {SCRATCH} RENAME TO rc_scratch_moved")
            else:
                pg.psql(f"DROP TABLE {SCRATCH}")
            _wait(_problem_logged(p, f"tables.{SCRATCH}"), "the problem at the next read")
            assert p.metric("pgveil_rules_problems", database="postgres") == 1
            # the session that was already open: every statement refused, naming the rule
            with pytest.raises(psycopg.errors.InsufficientPrivilege) as info:
                open_session.execute(QUERY)
            assert f"tables.{SCRATCH}: relation {SCRATCH} does not exist" in str(info.value)
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                open_session.execute("SELECT 1")
            with pytest.raises(psycopg.errors.InsufficientPrivilege, match="pgveil: the rules"):
                open_session.execute(prepared, [1], prepare=True)  # prepared before
            _masked_login_refused(pg, p, HELPDESK, HELPDESK_PW, f"tables.{SCRATCH}")
            _unmasked_works(pg, p)
            # fixed: the next read (soon: while broken the catalog is re-read often) lets
            # masked sessions go on, the open one too
            if change == "rename":
                pg.psql("ALTER TABLE billing.rc_scratch_moved RENAME TO rc_scratch")
            else:
                _create_scratch(pg)
            _wait(lambda: p.metric("pgveil_rules_problems", database="postgres") == 0, "fixed")
            assert [e["database"] for e in _events(p, "rules.matched")] == ["postgres"]
            assert open_session.execute(QUERY).fetchone() != (NAME,)
            assert open_session.execute(prepared, [1], prepare=True).fetchone() != (NAME,)
            _masked_works(pg, p)
        finally:
            open_session.close()
            _create_scratch(pg)


def test_open_asyncpg_session_statements_refused_prepared_ones_too(
    pg: EmbeddedPostgres, tmp_path: Path
) -> None:
    """An open masked session over the extended protocol (asyncpg): a new statement (Parse)
    and one prepared before the rules stopped matching (asyncpg's statement cache: Bind
    and Execute only) are both refused and audited as refused; once the database is
    fixed, the same connection goes on."""
    rules = _rules(tmp_path, GOOD)
    audit = tmp_path / "audit.jsonl"
    with _proxy(pg, rules, "--catalog-refresh", "1", "--audit-file", str(audit)) as p:

        async def scenario() -> list[str]:
            conn = await asyncpg.connect(
                host="127.0.0.1", port=p.port, user=HELPDESK, password=HELPDESK_PW,
                database="postgres", ssl=False,
            )  # fmt: skip
            try:
                assert await conn.fetchval(QUERY) != NAME  # prepared and cached by asyncpg
                pg.psql(f"DROP TABLE {SCRATCH}")
                await asyncio.to_thread(_wait, _problem_logged(p, f"tables.{SCRATCH}"), "problem")
                messages = []
                for sql in (QUERY, "SELECT 2"):
                    with pytest.raises(asyncpg.InsufficientPrivilegeError) as info:
                        await conn.fetchval(sql)
                    assert info.value.sqlstate == "42501"
                    messages.append(str(info.value))
                _create_scratch(pg)
                await asyncio.to_thread(
                    _wait,
                    lambda: p.metric("pgveil_rules_problems", database="postgres") == 0,
                    "fixed",
                )
                got = await conn.fetchval(QUERY)
                assert got != NAME and not leaks(got)
                assert await conn.fetchval("SELECT 2") == 2
                return messages
            finally:
                await conn.close()

        try:
            messages = asyncio.run(scenario())
        finally:
            _create_scratch(pg)
    for message in messages:
        assert message.startswith("pgveil: the rules do not match database postgres: ")
        assert f"tables.{SCRATCH}: relation {SCRATCH} does not exist" in message
    events = [json.loads(line) for line in audit.read_text().splitlines()]
    refused = [e for e in events if e["type"] == "refused"]
    assert [e["reason"] for e in refused] == [messages[0].removeprefix("pgveil: ")] * 2
    assert refused[0]["tables"] == ["billing.customers"]  # the prepared statement's
    assert refused[1]["statement"] == "SELECT ?"


# ---- SIGHUP ------------------------------------------------------------------------------------


def test_sighup_to_a_broken_file_keeps_the_rules_to_missing_table_closes(
    pg: EmbeddedPostgres, tmp_path: Path
) -> None:
    rules = _rules(tmp_path, GOOD)
    with _proxy(pg, rules) as p:
        _wait(lambda: bool(_events(p, "catalog.loaded")), "catalog.loaded")
        open_session = psycopg.connect(dsn(pg, p.port), autocommit=True)
        try:
            # a file that does not load: rejected, the running rules stay in force
            rules.write_text(GOOD + "\nbogus: 1\n")
            p.signal(signal.SIGHUP)
            _wait(lambda: bool(_events(p, "config.reload_failed")), "config.reload_failed")
            assert "unknown key 'bogus'" in p.log()
            assert open_session.execute(QUERY).fetchone() != (NAME,)
            _masked_works(pg, p)
            assert not _events(p, "rules.problem")
            # a file that loads but names a table the database lacks: in force, and
            # masked sessions, open and new, refused; unmasked ones go on
            rules.write_text(BROKEN["table"][0])
            p.signal(signal.SIGHUP)
            _wait(_problem_logged(p, "tables.billing.custmers"), "problem after reload")
            assert [e["event"] for e in _events(p, "rules.reloaded")] == ["rules.reloaded"]
            assert p.metric("pgveil_rules_problems", database="postgres") == 1
            with pytest.raises(
                psycopg.errors.InsufficientPrivilege, match=r"tables\.billing\.custmers"
            ):
                open_session.execute(QUERY)
            _masked_login_refused(pg, p, HELPDESK, HELPDESK_PW, "tables.billing.custmers")
            _unmasked_works(pg, p)
            # and back
            rules.write_text(GOOD)
            p.signal(signal.SIGHUP)
            _wait(lambda: len(_events(p, "rules.reloaded")) == 2, "second reload")
            assert p.metric("pgveil_rules_problems", database="postgres") == 0
            assert open_session.execute(QUERY).fetchone() != (NAME,)
            _masked_works(pg, p)
        finally:
            open_session.close()
