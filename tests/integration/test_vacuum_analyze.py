"""VACUUM and ANALYZE are allowed for masked roles: they reveal nothing.

They return no rows; VERBOSE's messages hold names and counts. What could carry a value is
the code they run: ANALYZE evaluates index and extended statistics expressions on sampled
rows, VACUUM FULL on every row (rebuilding the indexes), and that code may be a user's
function. pgveil treats it as it treats the code attached to a table that a write runs
(a trigger's, a default's): the DBA's schema, reported by the rules check as a warning,
not refused; and what it says reaches a masked client as any server message does (a
message raised by PL/pgSQL code withheld, a quoted value in an error masked). Each case runs
through pgveil with psql, psycopg and asyncpg (no secret may reach the client) and directly
as the same role, where it must leak (a table the masked role owns, whose index expression
raises a NOTICE with the value, or fails on it once a setting says so).
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from proxy.demo.embedded_pg import EmbeddedPostgres
from tests.integration.attack_clients import CLIENTS, Clients, errors_in, open_clients
from tests.integration.masking_fixture import (
    HELPDESK,
    NAME,
    PHONE,
    RULES,
    dsn,
    leaks,
    masking_proxy,
)
from tests.support import ProxyProcess

SETUP = f"""
DROP SCHEMA IF EXISTS vac CASCADE;
CREATE SCHEMA vac;
GRANT USAGE ON SCHEMA vac TO {HELPDESK};
CREATE TABLE vac.people (id bigint PRIMARY KEY, name text, phone text);
INSERT INTO vac.people VALUES (1, '{NAME}', '{PHONE}'), (2, 'Ann Other', '+420600000000');
CREATE FUNCTION vac.noisy(t text) RETURNS text IMMUTABLE LANGUAGE plpgsql
    AS $$ BEGIN RAISE NOTICE 'indexing %', t; RETURN lower(t); END $$;
CREATE FUNCTION vac.picky(t text) RETURNS int IMMUTABLE LANGUAGE sql
    AS $$ SELECT CASE WHEN current_setting('vac.strict', true) = 'on' THEN t::int ELSE 0 END $$;
CREATE INDEX people_noisy ON vac.people (vac.noisy(name));
CREATE INDEX people_picky ON vac.people (vac.picky(name));
CREATE STATISTICS vac.people_stx ON (vac.noisy(phone)) FROM vac.people;
ALTER TABLE vac.people OWNER TO {HELPDESK};
CREATE TABLE vac.plain (id int, note text);
INSERT INTO vac.plain SELECT g, 'note ' || g FROM generate_series(1, 100) g;
ALTER TABLE vac.plain OWNER TO {HELPDESK};
"""
VAC_RULES = """
  vac.people:
    subject: id
    columns:
      name: partial
      phone: partial
"""

# (id, statements): through pgveil each runs without an error (but the one it expects) and
# without a secret; directly each leaks
CASES: list[tuple[str, tuple[str, ...]]] = [
    ("analyze_verbose", ("ANALYZE VERBOSE vac.people",)),
    ("analyze_columns", ("ANALYZE vac.people (name, phone)",)),
    ("vacuum_analyze_verbose", ("VACUUM (VERBOSE, ANALYZE) vac.people",)),
    ("vacuum_full_verbose", ("VACUUM (FULL, VERBOSE) vac.people",)),
    ("analyze_database", ("ANALYZE",)),
    ("analyze_error_in_index_expression", ("SET vac.strict = on", "ANALYZE vac.people")),
    ("vacuum_full_error_in_index_expression", ("SET vac.strict = on", "VACUUM FULL vac.people")),
]
EXPECTED_ERRORS = {
    # the server's own error (22P02), its quoted value masked
    "analyze_error_in_index_expression": ["22P02"],
    "vacuum_full_error_in_index_expression": ["22P02"],
}


@pytest.fixture(scope="module")
def vac_proxy(pg: EmbeddedPostgres, billing: ProxyProcess) -> Iterator[ProxyProcess]:
    pg.psql(SETUP)
    d = Path(tempfile.mkdtemp(prefix="pgveil-vac-"))
    rules = d / "rules.yaml"
    rules.write_text(RULES + VAC_RULES)
    try:
        with masking_proxy(pg, rules, metrics=False) as p:
            yield p
    finally:
        pg.psql("DROP SCHEMA IF EXISTS vac CASCADE")
        os.unlink(rules)
        os.rmdir(d)


@pytest.fixture(scope="module")
def clients(pg: EmbeddedPostgres, vac_proxy: ProxyProcess) -> Iterator[Clients]:
    with open_clients(pg, vac_proxy.port) as c:
        yield c


def test_cases_are_well_formed() -> None:
    for cid, sql in CASES:
        assert leaks("\n".join(sql)) == [], cid


@pytest.mark.parametrize(
    ("case_id", "sql", "client"),
    [(cid, sql, client) for cid, sql in CASES for client in CLIENTS],
    ids=[f"{cid}-{client}" for cid, _ in CASES for client in CLIENTS],
)
def test_nothing_reaches_the_client(
    clients: Clients, case_id: str, sql: tuple[str, ...], client: str
) -> None:
    received = clients.run(client, sql)
    codes = [code for code, _ in errors_in(received)]
    assert codes == EXPECTED_ERRORS.get(case_id, []), f"{case_id} via {client}:\n{received}"
    assert leaks(received) == [], f"{case_id} via {client} leaked:\n{received[:3000]}"


@pytest.mark.parametrize(("case_id", "sql"), CASES, ids=[cid for cid, _ in CASES])
def test_case_leaks_directly(clients: Clients, case_id: str, sql: tuple[str, ...]) -> None:
    received = clients.run("direct", sql)
    assert leaks(received) != [], f"{case_id} does not leak directly:\n{received[:3000]}"


def test_a_table_without_rules(pg: EmbeddedPostgres, vac_proxy: ProxyProcess) -> None:
    """Every form runs; VERBOSE's INFO messages (names and counts) reach the client."""
    notices: list[str] = []
    with psycopg.connect(dsn(pg, vac_proxy.port), autocommit=True) as c:
        c.add_notice_handler(lambda d: notices.append(d.message_primary or ""))
        for sql in (
            "VACUUM vac.plain",
            "ANALYZE vac.plain",
            "VACUUM (VERBOSE, ANALYZE) vac.plain",
            "ANALYZE VERBOSE vac.plain (note)",
            "VACUUM (FULL, FREEZE, VERBOSE) vac.plain",
            "VACUUM (SKIP_LOCKED, INDEX_CLEANUP off, PARALLEL 1, TRUNCATE false) vac.plain",
            "vacuum analyze",
        ):
            c.execute(sql)
            assert c.info.transaction_status == psycopg.pq.TransactionStatus.IDLE
        count = c.execute("SELECT reltuples FROM pg_class WHERE oid = 'vac.plain'::regclass")
        assert count.fetchone() == (100,)
    assert any("100 live rows" in n for n in notices), notices


def test_protected_table_of_another_owner(pg: EmbeddedPostgres, vac_proxy: ProxyProcess) -> None:
    """The server skips a table the role does not own, with a WARNING naming it."""
    notices: list[str] = []
    with psycopg.connect(dsn(pg, vac_proxy.port), autocommit=True) as c:
        c.add_notice_handler(lambda d: notices.append(d.message_primary or ""))
        c.execute("ANALYZE billing.customers")
        c.execute("VACUUM billing.customers")
    assert notices == [
        'skipping "customers" --- only table or database owner can analyze it',
        'skipping "customers" --- only table or database owner can vacuum it',
    ]


def test_in_a_transaction_block_it_is_the_servers_error(
    pg: EmbeddedPostgres, vac_proxy: ProxyProcess
) -> None:
    with psycopg.connect(dsn(pg, vac_proxy.port)) as c:
        with pytest.raises(psycopg.errors.ActiveSqlTransaction):
            c.execute("VACUUM vac.plain")


def test_code_they_run_is_reported_as_table_code(vac_proxy: ProxyProcess) -> None:
    """The rules check warns of the user function an index expression and an extended
    statistics expression call (it runs when the table is written or analysed)."""
    log = vac_proxy.log()
    assert "index vac.people_noisy calls function vac.noisy" in log or (
        "people_noisy" in log and "vac.noisy" in log
    ), log[-3000:]
    assert "statistics object vac.people_stx" in log, log[-3000:]
