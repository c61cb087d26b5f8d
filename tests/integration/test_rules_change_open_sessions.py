"""What open sessions get when the rules or the catalog change under them.

A statement prepared (Parse, PREPARE) or a cursor or portal opened (DECLARE, Bind) runs
what the server prepared then. When the rules change so that its text is now decided
otherwise (a column it reads is protected now), its next use is refused with 42501 and a
message that says to prepare it again, and nothing raw reaches the client; prepared again,
it returns masked values. A catalog refresh or a reload that changes nothing leaves it
working. A rules reload that classifies an open session's login otherwise (masked <->
unmasked) ends that session with a FATAL 57P01; the others go on.

Real clients against the real server: asyncpg (its statement cache), psycopg
(prepare=True), psql (PREPARE/EXECUTE, DECLARE/FETCH), and raw protocol pipelines. The
rules here protect a scratch table of this module's own; the fixture's tables are only read.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import asyncpg
import psycopg
import pytest

from proxy.demo.embedded_pg import EmbeddedPostgres
from proxy.wire import messages as m
from proxy.wire.errors import decode_fields
from tests.integration.audit_wire import SYNC, bind, execute, parse, read_until, wait_for
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
from tests.support import ProxyProcess, RawClient

SCRATCH = "billing.rr_scratch"
SECRET = "Quillon Vexworth"
HIDDEN = "uillon Vexwort"  # what the partial mask hides
SCRATCH_RULE = f"""  {SCRATCH}:
    columns:
      secret: partial
"""
RULES_A = "databases: [postgres]\n" + RULES  # the scratch table is not protected
RULES_B = RULES_A + SCRATCH_RULE  # it is
# it is, its last three letters shown (rules B hide them)
RULES_KEEP = RULES_A + SCRATCH_RULE.replace("partial", "{mask: partial, keep_last: 3}")
# helpdesk unmasked, billing_admin masked: the fixture's classification swapped
RULES_SWAPPED = RULES_A.replace(
    "  unmasked: [billing_admin]\n  masked: [helpdesk, cc_staff]\n",
    "  unmasked: [helpdesk]\n  masked: [billing_admin, cc_staff]\n",
)
CHANGED = "the masking rules changed since this statement was prepared"
BY_KEY = f"SELECT secret FROM {SCRATCH} WHERE id = 1"
BY_PARAM = f"SELECT secret FROM {SCRATCH} WHERE id = $1"
BY_PARAM_PSYCOPG = f"SELECT secret FROM {SCRATCH} WHERE id = %s"
NAME_BY_KEY = "SELECT name FROM billing.customers WHERE i_customer = $1"
LOCK = 4242  # the advisory lock that holds psql between its two halves


@pytest.fixture(scope="module", autouse=True)
def scratch(pg: EmbeddedPostgres, billing: ProxyProcess) -> Iterator[None]:
    pg.psql(
        f"CREATE TABLE IF NOT EXISTS {SCRATCH} (id int PRIMARY KEY, secret text);"
        f"TRUNCATE {SCRATCH}; INSERT INTO {SCRATCH} VALUES (1, '{SECRET}');"
        f"GRANT SELECT ON {SCRATCH} TO {HELPDESK}, {ADMIN}, cc_staff"
    )
    yield
    pg.psql(f"DROP TABLE IF EXISTS {SCRATCH}")


def masked(value: object) -> bool:
    """The partial mask of SECRET: its first and last letters, stars between."""
    return value == SECRET[0] + "*" * (len(SECRET) - 2) + SECRET[-1]


# ---- the proxy -----------------------------------------------------------------------------


class Proxy:
    """pgveil with a rules file this test rewrites, and an audit file."""

    def __init__(self, pg: EmbeddedPostgres, tmp: Path, rules: str, *extra: str) -> None:
        self.rules = tmp / "rules.yaml"
        self.rules.write_text(rules)
        self.audit = tmp / "audit.jsonl"
        env = {"PGVEIL_TEST_HASH_KEY": HASH_KEY, "PGVEIL_CATALOG_PASSWORD": pg.password}
        self.p = ProxyProcess(
            pg.port, "--upstream-sslmode", "disable", "--rules", str(self.rules),
            "--catalog-user", pg.superuser, "--audit-file", str(self.audit), *extra, env=env,
        )  # fmt: skip
        self.port = self.p.port

    def events(self, event: str) -> list[dict[str, Any]]:
        out = []
        for line in self.p.log().splitlines():
            if line.startswith("{"):
                entry = json.loads(line)
                if entry.get("event") == event:
                    out.append(entry)
        return out

    def reload(self, rules: str) -> None:
        """Rewrite the rules file and SIGHUP; back once the reload is logged."""
        before = len(self.events("rules.reloaded"))
        self.rules.write_text(rules)
        self.p.signal(signal.SIGHUP)
        wait_for(lambda: len(self.events("rules.reloaded")) > before, "rules.reloaded")

    def audit_events(self, kind: str) -> list[dict[str, Any]]:
        if not self.audit.exists():
            return []
        data = self.audit.read_bytes()
        lines = data[: data.rfind(b"\n") + 1].splitlines()
        return [e for e in (json.loads(x) for x in lines if x.strip()) if e["type"] == kind]

    def close(self) -> None:
        log = self.p.log()
        self.p.stop()
        assert "Traceback" not in log, log


@pytest.fixture
def proxy(pg: EmbeddedPostgres, tmp_path: Path) -> Iterator[Proxy]:
    p = Proxy(pg, tmp_path, RULES_A)
    yield p
    p.close()


# ---- prepared under rules A, used under rules B ---------------------------------------------


def test_asyncpg_statement_cache(proxy: Proxy) -> None:
    async def scenario() -> list[str]:
        conn = await asyncpg.connect(
            host="127.0.0.1", port=proxy.port, user=HELPDESK, password=HELPDESK_PW,
            database="postgres", ssl=False,
        )  # fmt: skip
        try:
            assert await conn.fetchval(BY_PARAM, 1) == SECRET  # not protected: as stored
            proxy.reload(RULES_B)
            seen = []
            # the cached statement: refused, by its Bind
            with pytest.raises(asyncpg.InsufficientPrivilegeError) as info:
                await conn.fetchval(BY_PARAM, 1)
            seen.append(str(info.value))
            assert info.value.sqlstate == "42501" and CHANGED in str(info.value)
            # prepared again: rewritten by the new rules
            statement = await conn.prepare(BY_PARAM)
            value = await statement.fetchval(1)
            assert masked(value), value
            seen.append(str(value))
            # the statement cache keeps the refused one until it is dropped
            with pytest.raises(asyncpg.InsufficientPrivilegeError):
                await conn.fetchval(BY_PARAM, 1)
            await conn.reload_schema_state()
            value = await conn.fetchval(BY_PARAM, 1)
            assert masked(value), value
            return seen
        finally:
            await conn.close()

    seen = asyncio.run(scenario())
    assert not leaks("\n".join(seen)) and HIDDEN not in "\n".join(seen)


def test_psycopg_prepared_statements(pg: EmbeddedPostgres, proxy: Proxy) -> None:
    with psycopg.connect(dsn(pg, proxy.port), autocommit=True) as c:
        assert c.execute(BY_PARAM_PSYCOPG, (1,), prepare=True).fetchone() == (SECRET,)
        assert c.execute(BY_PARAM_PSYCOPG, (1,), prepare=True).fetchone() == (SECRET,)
        proxy.reload(RULES_B)
        with pytest.raises(psycopg.errors.InsufficientPrivilege) as info:
            c.execute(BY_PARAM_PSYCOPG, (1,), prepare=True)
        assert CHANGED in str(info.value) and HIDDEN not in str(info.value)
        c.execute("DEALLOCATE ALL")  # psycopg forgets what it prepared
        (value,) = c.execute(BY_PARAM_PSYCOPG, (1,), prepare=True).fetchone()  # type: ignore[misc]
        assert masked(value), value


def test_psql_prepare_execute_and_declare_fetch(pg: EmbeddedPostgres, proxy: Proxy) -> None:
    """One psql session: PREPARE and DECLARE under rules A, held on an advisory lock while
    the rules change, then EXECUTE and FETCH (refused), then both again (masked)."""
    script = f"""
PREPARE p AS {BY_KEY};
EXECUTE p;
BEGIN;
DECLARE c CURSOR FOR SELECT secret FROM {SCRATCH};
SELECT 'waiting', pg_advisory_lock({LOCK});
FETCH 1 FROM c;
ROLLBACK;
EXECUTE p;
DEALLOCATE p;
PREPARE p AS {BY_KEY};
EXECUTE p;
BEGIN;
DECLARE c CURSOR FOR SELECT secret FROM {SCRATCH};
FETCH 1 FROM c;
COMMIT;
"""
    psql = shutil.which("psql") or str(pg.bindir / "psql")
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    env.update(PGPASSWORD=HELPDESK_PW, PGSSLMODE="disable")
    argv = [
        psql, "-X", "-At", "-v", "VERBOSITY=verbose", "-h", "127.0.0.1", "-p", str(proxy.port),
        "-U", HELPDESK, "-d", "postgres",
    ]  # fmt: skip
    with psycopg.connect(pg.dsn(), autocommit=True) as holder:
        holder.execute("SELECT pg_advisory_lock(%s)", (LOCK,))
        proc = subprocess.Popen(
            argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            text=True, env=env,
        )  # fmt: skip
        try:
            assert proc.stdin is not None
            proc.stdin.write(script)
            proc.stdin.close()

            def waiting() -> bool:
                row = holder.execute(
                    "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND objid = %s"
                    " AND NOT granted",
                    (LOCK,),
                ).fetchone()
                return row is not None and row[0] == 1

            wait_for(waiting, "psql waiting on the advisory lock")
            proxy.reload(RULES_B)
            holder.execute("SELECT pg_advisory_unlock(%s)", (LOCK,))
            assert proc.stdout is not None
            out = proc.stdout.read()
            proc.wait(timeout=60)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    lines = out.splitlines()
    # before the change: as stored; after it: FETCH and EXECUTE refused, then masked
    assert lines.count(SECRET) == 1, out
    refused = [line for line in lines if "ERROR:  42501: pgveil: " + CHANGED in line]
    assert len(refused) == 2, out
    assert sum(1 for line in lines if masked(line)) == 2, out
    assert lines.index(SECRET) < out.splitlines().index(refused[0])
    assert out.count(HIDDEN) == 1, out  # the one row read under rules A


def test_raw_protocol_pipeline(proxy: Proxy) -> None:
    """Parse under rules A; under rules B one pipeline: the old statement's Bind and
    Execute (refused, 42501), then the same text parsed again under another name and run
    (masked): each answer in its place."""
    c = RawClient(proxy.port, user="masked_trust")
    try:
        c.send_raw(parse(BY_KEY, b"s1") + SYNC)
        assert [t for t, _ in read_until(c, 1)] == ["1", "Z"]
        c.send_raw(bind(b"", b"s1") + execute() + SYNC)
        got = read_until(c, 1)
        assert [t for t, _ in got] == ["2", "D", "C", "Z"] and SECRET.encode() in got[1][1]
        proxy.reload(RULES_B)
        c.send_raw(
            bind(b"", b"s1") + execute() + SYNC
            + parse(BY_KEY, b"s2") + bind(b"", b"s2") + execute() + SYNC
        )  # fmt: skip
        got = read_until(c, 2)
        assert [t for t, _ in got] == ["E", "Z", "1", "2", "D", "C", "Z"], got
        error = decode_fields(got[0][1])
        assert error["C"] == "42501" and CHANGED in error["M"]
        row = got[4][1]
        assert masked(row[6:].decode()), row
        everything = b"".join(body for _, body in got)
        assert HIDDEN.encode() not in everything
        # a portal opened under rules B before a reload back to A and on to B again:
        # its Execute is checked as well (the same decision: it runs)
        c.send_raw(m.message(ord("Q"), b"BEGIN\0"))
        read_until(c, 1)
        c.send_raw(bind(b"p", b"s2") + SYNC)
        assert [t for t, _ in read_until(c, 1)] == ["2", "Z"]
        proxy.reload(RULES_A)
        c.send_raw(execute(b"p") + SYNC)
        got = read_until(c, 1)
        assert [t for t, _ in got] == ["E", "Z"] and decode_fields(got[0][1])["C"] == "42501"
        assert HIDDEN.encode() not in b"".join(body for _, body in got)
    finally:
        c.close()


def test_a_pipelined_use_that_the_answers_prove_reads_an_old_text_ends_the_session(
    pg: EmbeddedPostgres, tmp_path: Path
) -> None:
    """A pipeline sent while the server waits on an advisory lock: two DECLAREs of one WITH
    HOLD cursor under rules that show the secret's last three letters, the first bound to
    fail (1/0). pgveil predicts that the first holds the name; the rules change (the partial
    mask hides the last letters too) and a FETCH of it is sent: it is checked against the
    harmless first one and goes on. When the answers tell that the second one holds the
    name, decided under the old rules and decided otherwise now, the session ends (FATAL
    42501) before the FETCH's rows, masked the old way, reach the client."""
    proxy = Proxy(pg, tmp_path, RULES_KEEP)
    c = RawClient(proxy.port, user="masked_trust")
    pipeline = (
        f"SELECT pg_advisory_lock({LOCK})",
        "DECLARE c CURSOR WITH HOLD FOR SELECT 1/0",
        f"DECLARE c CURSOR WITH HOLD FOR SELECT secret FROM {SCRATCH}",
    )
    try:
        with psycopg.connect(pg.dsn(), autocommit=True) as holder:
            holder.execute("SELECT pg_advisory_lock(%s)", (LOCK,))
            try:
                c.send_raw(b"".join(m.message(ord("Q"), sql.encode() + b"\0") for sql in pipeline))

                def waiting() -> bool:
                    row = holder.execute(
                        "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory'"
                        " AND objid = %s AND NOT granted",
                        (LOCK,),
                    ).fetchone()
                    return row is not None and row[0] == 1

                wait_for(waiting, "the session waiting on the advisory lock")
                proxy.reload(RULES_B)
                c.send_raw(m.message(ord("Q"), b"FETCH ALL FROM c\0"))
            finally:
                holder.execute("SELECT pg_advisory_unlock(%s)", (LOCK,))
        got = read_until(c, 4)
    finally:
        c.close()
        proxy.close()
    errors = [decode_fields(body) for typ, body in got if typ == "E"]
    fatal = [f for f in errors if f["S"] == "FATAL"]
    if fatal:
        assert len(fatal) == 1 and fatal[0]["C"] == "42501", got
        assert "masking rules that no longer apply" in fatal[0]["M"]
    else:
        # on a busy machine pgveil may read the pipeline's answers before the FETCH: then
        # it knows which DECLARE holds the name when the FETCH comes, and refuses it
        refused = [f for f in errors if f["C"] == "42501"]
        assert len(refused) == 1 and "masking rules changed" in refused[0]["M"], got
    everything = b"".join(body for _, body in got)
    assert SECRET[-3:].encode() not in everything and SECRET.encode() not in everything


# ---- nothing changed: prepared statements go on -------------------------------------------


def test_a_refresh_or_reload_that_changes_nothing_keeps_prepared_statements(
    pg: EmbeddedPostgres, tmp_path: Path
) -> None:
    """A catalog refresh that finds nothing changed keeps the context (its cached
    decisions: the analysis cache's hits go on counting); a reload of the same rules makes
    a new one, under which each prepared statement is analysed again and found alike.
    Either way statements prepared before go on, with the same (masked) results."""
    proxy = Proxy(pg, tmp_path, RULES_B, "--catalog-refresh", "1")
    try:

        async def scenario() -> None:
            conn = await asyncpg.connect(
                host="127.0.0.1", port=proxy.port, user=HELPDESK, password=HELPDESK_PW,
                database="postgres", ssl=False,
            )  # fmt: skip
            try:
                name = await conn.fetchval(NAME_BY_KEY, 1)
                secret = await conn.fetchval(BY_PARAM, 1)
                assert name != NAME and masked(secret)
                with psycopg.connect(dsn(pg, proxy.port), autocommit=True) as c:
                    c.execute(BY_PARAM_PSYCOPG, (1,), prepare=True)
                    c.execute(
                        "PREPARE p AS SELECT name FROM billing.customers WHERE i_customer = 1"
                    )
                    raw = RawClient(proxy.port, user="masked_trust")
                    try:
                        raw.send_raw(parse(BY_KEY, b"s1") + SYNC)
                        read_until(raw, 1)
                        hits = proxy.p.metric("pgveil_analysis_cache_total", result="hit")
                        loaded = len(proxy.events("catalog.loaded"))
                        wait_for(
                            lambda: len(proxy.events("catalog.loaded")) >= loaded + 2,
                            "two catalog refreshes",
                        )
                        assert await conn.fetchval(NAME_BY_KEY, 1) == name
                        kept = proxy.p.metric("pgveil_analysis_cache_total", result="hit")
                        assert kept >= hits > 0  # the same context: its counts go on
                        proxy.reload(RULES_B)
                        for _ in range(2):
                            assert await conn.fetchval(NAME_BY_KEY, 1) == name
                            assert await conn.fetchval(BY_PARAM, 1) == secret
                            row = c.execute(BY_PARAM_PSYCOPG, (1,), prepare=True).fetchone()
                            assert row == (secret,)
                            assert c.execute("EXECUTE p").fetchone() == (name,)
                            raw.send_raw(bind(b"", b"s1") + execute() + SYNC)
                            got = read_until(raw, 1)
                            assert [t for t, _ in got] == ["2", "D", "C", "Z"], got
                            assert masked(got[1][1][6:].decode())
                    finally:
                        raw.close()
            finally:
                await conn.close()

        asyncio.run(scenario())
        assert not proxy.audit_events("refused")
    finally:
        proxy.close()


def _counters(p: ProxyProcess) -> dict[str, float]:
    """Every counter sample of /metrics: its name with labels -> its value."""
    status, text = p.http("/metrics")
    assert status == 200
    # (the TYPE line names a counter with or without _total, by client library version)
    counters = {
        n.removesuffix("_total")
        for n, t in re.findall(r"^# TYPE (\S+) (\S+)$", text, re.M)
        if t == "counter"
    }
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            key, _, value = line.rpartition(" ")
            name = key.partition("{")[0]
            if name.endswith("_total") and name.removesuffix("_total") in counters:
                out[key] = float(value)
    return out


def test_counters_never_go_down_across_reloads_and_catalog_changes(
    pg: EmbeddedPostgres, tmp_path: Path
) -> None:
    """A rules reload (SIGHUP) and a catalog change replace each database's masking context
    and its analysis cache; every counter goes on from where it was (Prometheus takes a
    lower value for a restart of the process)."""
    proxy = Proxy(pg, tmp_path, RULES_A, "--catalog-refresh", "1")
    probe = "billing.rr_counter_probe"
    scrapes: list[dict[str, float]] = []

    def scrape() -> dict[str, float]:
        now = _counters(proxy.p)
        if scrapes:
            lower = {k: (v, now.get(k)) for k, v in scrapes[-1].items() if now.get(k, -1.0) < v}
            assert not lower, f"counters went down: {lower}"
        scrapes.append(now)
        return now

    def statements(c: psycopg.Connection[Any]) -> None:
        for key in (1, 2, 1, 2):
            c.execute(f"SELECT name FROM billing.customers WHERE i_customer = {key}").fetchone()

    hit = 'pgveil_analysis_cache_total{result="hit"}'
    try:
        with psycopg.connect(dsn(pg, proxy.port), autocommit=True) as c:
            statements(c)
            first = scrape()
            assert first[hit] > 0
            proxy.reload(RULES_B)  # new contexts, new caches
            scrape()
            statements(c)
            scrape()
            # a catalog change: the refresh makes a new context
            relations = max(e["relations"] for e in proxy.events("catalog.loaded"))
            pg.psql(f"CREATE TABLE {probe} (id int)")
            wait_for(
                lambda: any(e["relations"] > relations for e in proxy.events("catalog.loaded")),
                "the catalog read that sees the new table",
            )
            scrape()
            statements(c)
            scrape()
            proxy.reload(RULES_A)
            statements(c)
        with psycopg.connect(dsn(pg, proxy.port), autocommit=True) as c:  # (the first ended)
            statements(c)
            last = scrape()
        assert last[hit] > first[hit]
        connections = "pgveil_client_connections_total"
        assert last[connections] == first[connections] + 1
    finally:
        pg.psql(f"DROP TABLE IF EXISTS {probe}")
        proxy.close()


# ---- classification changes ----------------------------------------------------------------


def test_sessions_classified_otherwise_by_a_reload_are_ended(
    pg: EmbeddedPostgres, proxy: Proxy
) -> None:
    name_sql = "SELECT name FROM billing.customers WHERE i_customer = 1"
    helpdesk = psycopg.connect(dsn(pg, proxy.port), autocommit=True)
    admin = psycopg.connect(dsn(pg, proxy.port, ADMIN, ADMIN_PW), autocommit=True)
    agent = psycopg.connect(dsn(pg, proxy.port, AGENT, AGENT_PW), autocommit=True)
    trust = RawClient(proxy.port, user="trust_user", application_name="rr-trust")
    try:
        assert helpdesk.execute(name_sql).fetchone() != (NAME,)  # masked
        assert agent.execute(name_sql).fetchone() != (NAME,)  # masked (cc_staff)
        admin.execute("BEGIN")  # unmasked, in a transaction
        assert admin.execute(name_sql).fetchone() == (NAME,)
        proxy.reload(RULES_SWAPPED)
        wait_for(lambda: len(proxy.events("session.reclassified")) == 2, "two sessions ended")
        for conn, now in ((helpdesk, "unmasked"), (admin, "masked")):
            with pytest.raises(psycopg.OperationalError) as info:
                conn.execute(name_sql).fetchone()
            text = str(info.value)
            assert (
                f"pgveil: the masking rules were reloaded and the session's role is now {now}"
                in text
            )
            assert NAME not in text
        # the others go on, as they were
        assert agent.execute(name_sql).fetchone() != (NAME,)
        got = trust.query("SELECT 1")
        assert [t for t, _ in got][-1] == "Z" and not any(t == "E" for t, _ in got)
        # new logins get the new classification
        with psycopg.connect(dsn(pg, proxy.port), autocommit=True) as c:
            assert c.execute(name_sql).fetchone() == (NAME,)
        with psycopg.connect(dsn(pg, proxy.port, ADMIN, ADMIN_PW), autocommit=True) as c:
            assert c.execute(name_sql).fetchone() != (NAME,)
    finally:
        for conn in (helpdesk, admin, agent):
            conn.close()
        trust.close()

    # the audit says why each ended
    def ended() -> list[dict[str, Any]]:
        return [
            e for e in proxy.audit_events("session.end")
            if "rules were reloaded" in str(e.get("outcome"))
        ]  # fmt: skip

    wait_for(lambda: len(ended()) == 2, "session.end events")
    outcomes = sorted((e["role"], e["classification"], e["outcome"]) for e in ended())
    assert [(role, cls) for role, cls, _ in outcomes] == [(ADMIN, "unmasked"), (HELPDESK, "masked")]
    assert outcomes[0][2].endswith("the session's role is now masked; reconnect")
    assert outcomes[1][2].endswith("the session's role is now unmasked; reconnect")
    logged = proxy.events("session.reclassified")
    assert sorted(e["user"] for e in logged) == sorted([ADMIN, HELPDESK])


def test_rules_configured_by_a_reload_classify_the_sessions_relayed_before(
    pg: EmbeddedPostgres, tmp_path: Path
) -> None:
    """Started without rules, every session is relayed; once a reload configures rules, an
    open session of a role they mask ends (its roles are looked up as at a login), the
    others go on."""
    rules = tmp_path / "rules.yaml"
    rules.write_text(RULES_A)
    config = tmp_path / "pgveil.yaml"
    config.write_text(f"upstream_sslmode: disable\ncatalog_user: {pg.superuser}\n")
    env = {"PGVEIL_TEST_HASH_KEY": HASH_KEY, "PGVEIL_CATALOG_PASSWORD": pg.password}
    p = ProxyProcess(pg.port, "--config", str(config), env=env)
    name_sql = "SELECT name FROM billing.customers WHERE i_customer = 1"
    try:
        helpdesk = psycopg.connect(dsn(pg, p.port), autocommit=True)
        admin = psycopg.connect(dsn(pg, p.port, ADMIN, ADMIN_PW), autocommit=True)
        try:
            assert helpdesk.execute(name_sql).fetchone() == (NAME,)  # no rules: relayed
            config.write_text(config.read_text() + f"rules: {rules}\n")
            p.signal(signal.SIGHUP)
            wait_for(lambda: "session.reclassified" in p.log(), "session.reclassified")
            with pytest.raises(psycopg.OperationalError, match="role is now masked"):
                helpdesk.execute(name_sql)
            assert admin.execute(name_sql).fetchone() == (NAME,)
            with psycopg.connect(dsn(pg, p.port), autocommit=True) as c:
                assert c.execute(name_sql).fetchone() != (NAME,)  # masked from now on
        finally:
            helpdesk.close()
            admin.close()
    finally:
        log = p.log()
        p.stop()
        assert "Traceback" not in log, log
