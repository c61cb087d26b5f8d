"""Attack corpus, round 3: writes as channels, unchecked expression positions, unlisted
function calls, and catalog-refresh timing. Not covered by rounds 1 and 2.

SQL cases run through pgveil (psycopg, simple protocol) and must not leak; each must leak when
run directly against PostgreSQL as `helpdesk` (`direct` overrides the statements for the
direct run). `key_only` cases leak pgveil's hash key, which cannot leak directly.

Admin-side objects (a procedure, a computed-field function, partitions, views, renames) are
created directly as the superuser and removed again. Catalog-timing cases use their own
pgveil with a short `--catalog-refresh` so that the shared `billing` pgveil never caches them.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import psycopg
import pytest

from proxy.demo.embedded_pg import EmbeddedPostgres
from tests.integration.attack_clients import PsycopgClient
from tests.integration.masking_fixture import HASH_KEY, HELPDESK, HELPDESK_PW, dsn, leaks
from tests.integration.test_attack_round2 import leaks2
from tests.support import ProxyProcess

C1 = "WHERE i_customer = 1"
# what helpdesk is shown for customer 1's `extra` (json mask: dl partial)
MASKED_EXTRA = '{"dl": "D***********V", "tier": "gold"}'

ADMIN_SETUP = """
CREATE PROCEDURE billing.atk_get_contact(IN id bigint, INOUT contact text) LANGUAGE sql
    AS $$ SELECT name || ' ' || email FROM billing.customers WHERE i_customer = id $$;
CREATE FUNCTION billing.atk_contact_of(billing.customers) RETURNS text LANGUAGE sql STABLE
    AS $$ SELECT name || ' ' || email FROM billing.customers WHERE i_customer = $1.i_customer $$;
GRANT EXECUTE ON PROCEDURE billing.atk_get_contact(bigint, text) TO helpdesk;
GRANT EXECUTE ON FUNCTION billing.atk_contact_of(billing.customers) TO helpdesk;
"""
ADMIN_TEARDOWN = """
DROP PROCEDURE IF EXISTS billing.atk_get_contact(bigint, text);
DROP FUNCTION IF EXISTS billing.atk_contact_of(billing.customers);
"""


@dataclass(frozen=True)
class Case:
    id: str
    sql: tuple[str, ...]
    direct: tuple[str, ...] | None = None
    key_only: bool = False
    note: str = ""


CASES: list[Case] = [
    # ---- write-back as a copy channel --------------------------------------------------------
    Case(
        "write_back_jsonb_subscript_copy",
        (
            "BEGIN",
            f"UPDATE billing.customers SET extra['c'] = '{MASKED_EXTRA}' {C1}",
            f"SELECT extra::text FROM billing.customers {C1}",
            "ROLLBACK",
        ),
        note="set_list ignores ResTarget.indirection: SET extra['c'] = v becomes "
        "extra['c'] = CASE WHEN v = mask(extra) THEN extra ELSE v END; sending the masked "
        "document copies the raw document under key c, which the json mask (top-level dl) "
        "does not mask",
    ),
    Case(
        "write_back_jsonb_subscript_on_conflict",
        (
            "BEGIN",
            "INSERT INTO billing.customers (i_customer, name) VALUES (1, 'x') "
            f"ON CONFLICT (i_customer) DO UPDATE SET extra['c'] = '{MASKED_EXTRA}'",
            f"SELECT extra -> 'c' ->> 'dl' FROM billing.customers {C1}",
            "ROLLBACK",
        ),
        direct=(  # what pgveil's write-back makes of it when the masked document is sent
            "BEGIN",
            "INSERT INTO billing.customers (i_customer, name) VALUES (1, 'x') "
            "ON CONFLICT (i_customer) DO UPDATE SET extra['c'] = billing.customers.extra",
            f"SELECT extra -> 'c' ->> 'dl' FROM billing.customers {C1}",
            "ROLLBACK",
        ),
    ),
    Case(
        "write_back_jsonb_subscript_writable_cte",
        (
            "BEGIN",
            f"WITH u AS (UPDATE billing.customers SET extra['c']['d'] = '{MASKED_EXTRA}' {C1} "
            "RETURNING i_customer) SELECT count(*) FROM u",
            f"SELECT jsonb_path_query(extra, '$.c.d.dl')::text FROM billing.customers {C1}",
            "ROLLBACK",
        ),
        direct=(
            "BEGIN",
            f"WITH u AS (UPDATE billing.customers SET extra['c']['d'] = extra {C1} "
            "RETURNING i_customer) SELECT count(*) FROM u",
            f"SELECT jsonb_path_query(extra, '$.c.d.dl')::text FROM billing.customers {C1}",
            "ROLLBACK",
        ),
    ),
    # ---- the hash key through the write-back CASE --------------------------------------------
    Case(
        "hashkey_explain_verbose_update_write_back",
        (f"EXPLAIN (VERBOSE, COSTS OFF) UPDATE billing.customers SET login = 'x' {C1}",),
        key_only=True,
        note="write_back() builds the hash mask's SQL (HMAC pads) but does not set uses_hash, "
        "so EXPLAIN is not refused and its Output line prints the pads",
    ),
    Case(
        "hashkey_explain_verbose_writable_cte_write_back",
        (
            "EXPLAIN (VERBOSE, COSTS OFF) WITH u AS (UPDATE billing.customers SET login = 'x' "
            f"{C1} RETURNING 1) SELECT * FROM u",
        ),
        key_only=True,
    ),
    # ---- user functions reached without a checked FuncCall -----------------------------------
    Case(
        "call_unlisted_procedure_inout",
        ("CALL billing.atk_get_contact(1, NULL)",),
        note="CallStmt walks the FuncCall's children, never check_function() on the FuncCall "
        "itself: any procedure runs, and INOUT parameters come back as a result row",
    ),
    Case(
        "field_notation_unlisted_function",
        (
            "SET search_path = billing, public",
            "SELECT t.atk_contact_of FROM "
            "jsonb_populate_record(NULL::billing.customers, '{\"i_customer\": 1}') t",
        ),
        note="t.f is a ColumnRef to pgveil but a call f(t) to PostgreSQL (computed-field "
        "notation): the function allow-list is never consulted",
    ),
    # ---- held (regression) --------------------------------------------------------------------
    Case(
        "held_on_conflict_set_concat_target",
        (
            "BEGIN",
            "INSERT INTO billing.customers (i_customer, name) VALUES (1, 'x') ON CONFLICT "
            "(i_customer) DO UPDATE SET notes = 'n' || billing.customers.name "
            "RETURNING notes",
            "ROLLBACK",
        ),
    ),
    Case(
        "held_update_other_table_from_subquery",
        (
            "BEGIN",
            "UPDATE billing.accounts SET id = (SELECT c.name FROM billing.customers c "
            "WHERE c.i_customer = accounts.i_customer) RETURNING id",
            "ROLLBACK",
        ),
    ),
    Case(
        "held_update_set_case_on_personal",
        (
            "BEGIN",
            "UPDATE billing.customers SET notes = CASE WHEN name LIKE 'Zeb%' THEN upper(name) "
            f"END {C1} RETURNING notes",
            "ROLLBACK",
        ),
    ),
    Case(
        "held_update_from_protected_returning",
        (
            "BEGIN",
            "UPDATE billing.customers c SET notes = a.id FROM billing.accounts a "
            "WHERE a.i_customer = c.i_customer AND host(a.ip) LIKE '%.51.%' RETURNING host(a.ip)",
            "ROLLBACK",
        ),
    ),
    Case(
        "held_insert_select_extra_text",
        (
            "BEGIN",
            "CREATE TEMP TABLE atk_w (x text)",
            f"INSERT INTO atk_w SELECT extra::text FROM billing.customers {C1}",
            "SELECT x FROM atk_w",
            "ROLLBACK",
        ),
    ),
    Case(
        "held_insert_select_into_temp_json_path",
        (
            "BEGIN",
            "CREATE TEMP TABLE atk_j (x jsonb)",
            "INSERT INTO atk_j SELECT jsonb_path_query(extra, '$.*') FROM billing.customers",
            "SELECT x::text FROM atk_j",
            "ROLLBACK",
        ),
    ),
]


@pytest.fixture(scope="module")
def sessions(
    pg: EmbeddedPostgres, billing: ProxyProcess
) -> Iterator[tuple[PsycopgClient, PsycopgClient]]:
    pg.psql(ADMIN_SETUP)
    via = PsycopgClient(dsn(pg, billing.port))
    direct = PsycopgClient(
        dsn(pg, pg.port), reset_sql=("ROLLBACK", "DISCARD ALL", "RESET client_encoding")
    )
    try:
        yield via, direct
    finally:
        via.close()
        direct.close()
        pg.psql(ADMIN_TEARDOWN)


def test_cases_do_not_carry_secrets() -> None:
    ids = [c.id for c in CASES]
    assert len(ids) == len(set(ids))
    for c in CASES:
        assert leaks2("\n".join(c.sql + (c.direct or ()))) == [], c.id
    assert HASH_KEY not in "\n".join(s for c in CASES for s in c.sql)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_round3_no_leak_through_pgveil(
    sessions: tuple[PsycopgClient, PsycopgClient], case: Case
) -> None:
    received = sessions[0].run(case.sql)
    assert leaks2(received) == [], f"{case.id} leaked through pgveil:\n{received[:3000]}"


@pytest.mark.parametrize(
    "case", [c for c in CASES if not c.key_only], ids=[c.id for c in CASES if not c.key_only]
)
def test_round3_case_leaks_directly(
    sessions: tuple[PsycopgClient, PsycopgClient], case: Case
) -> None:
    received = sessions[1].run(case.direct or case.sql)
    assert leaks(received) != [], f"{case.id} does not leak directly:\n{received[:3000]}"


# ---- COPY FROM STDIN ... WHERE: an expression pgveil never analyses ---------------------------

COPY_WHERE = (
    "COPY atk_cw FROM STDIN WHERE substr(query_to_xml("
    "'select name, email from billing.customers where i_customer = 1', true, false, '')::text, "
    "pos, 1) = ch"
)


def _copy_where_oracle(port: int) -> str:
    """One row per (position, character): the WHERE keeps the rows whose character is the
    secret's at that position; the table then spells the secret."""
    with psycopg.connect(dsn_for(port), autocommit=True) as c:
        try:
            c.execute("BEGIN")
            c.execute("CREATE TEMP TABLE atk_cw (pos int, ch text)")
            with c.cursor().copy(COPY_WHERE) as cp:
                for pos in range(1, 180):
                    for code in range(32, 127):
                        if chr(code) not in "\\":
                            cp.write_row((pos, chr(code)))
            row = c.execute("SELECT string_agg(ch, '' ORDER BY pos) FROM atk_cw").fetchone()
            return repr(row)
        except psycopg.Error as exc:
            return f"{type(exc).__name__}: {exc}"
        finally:
            c.execute("ROLLBACK")


def dsn_for(port: int) -> str:
    return (
        f"host=127.0.0.1 port={port} user={HELPDESK} password={HELPDESK_PW} "
        "dbname=postgres sslmode=disable"
    )


def test_copy_from_where_leaks_directly(pg: EmbeddedPostgres) -> None:
    assert leaks(_copy_where_oracle(pg.port)) != []


def test_copy_from_where_through_pgveil(billing: ProxyProcess) -> None:
    """copy() returns COPY ... FROM unchanged without walking its WHERE clause: denied
    functions (query_to_xml) run there, and the rows the WHERE keeps are an oracle."""
    received = _copy_where_oracle(billing.port)
    assert leaks(received) == [], f"COPY FROM WHERE leaked: {received[:2000]}"


# ---- catalog timing and drift (own pgveil, short refresh) --------------------------------------


@pytest.fixture
def fresh_proxy(pg: EmbeddedPostgres, billing: ProxyProcess) -> Iterator[ProxyProcess]:
    env = {"PGVEIL_TEST_HASH_KEY": HASH_KEY, "PGVEIL_CATALOG_PASSWORD": pg.password}
    p = ProxyProcess(
        pg.port,
        "--upstream-sslmode",
        "disable",
        "--rules",
        str(billing.rules_path),  # type: ignore[attr-defined]
        "--catalog-user",
        pg.superuser,
        "--catalog-refresh",
        "1",
        metrics=False,
        env=env,
    )
    yield p
    p.stop()


def _read(conn: psycopg.Connection[Any], sql: str) -> str:
    try:
        return repr(conn.execute(sql).fetchall())
    except psycopg.Error as exc:
        return f"{type(exc).__name__}: {exc}"


def _helpdesk(port: int) -> psycopg.Connection[Any]:
    return psycopg.connect(dsn_for(port), autocommit=True)


def test_timing_new_partition_long_lived_session(
    pg: EmbeddedPostgres, fresh_proxy: ProxyProcess
) -> None:
    """The MaskingContext is bound at login: a session never sees a catalog refresh, so a
    partition an admin adds to a protected table stays unprotected for that session."""
    old = _helpdesk(fresh_proxy.port)
    try:
        pg.psql(
            "CREATE TABLE billing.atk_xdrs_2 PARTITION OF billing.xdrs "
            "FOR VALUES FROM (1000000) TO (2000000);"
            "GRANT SELECT ON billing.atk_xdrs_2 TO helpdesk;"
            "INSERT INTO billing.xdrs (i_xdr, i_account, cli, cld, charged) "
            "VALUES (1000001, 10, '+420777123456', '+18005550100', 1);"
        )
        time.sleep(2.5)  # well past --catalog-refresh
        with _helpdesk(fresh_proxy.port) as new:
            after_refresh = _read(new, "SELECT cli FROM billing.atk_xdrs_2")
        with _helpdesk(pg.port) as d:
            assert leaks(_read(d, "SELECT cli FROM billing.atk_xdrs_2")) != []
        assert leaks(after_refresh) == [], after_refresh  # a new session is masked
        received = _read(old, "SELECT cli FROM billing.atk_xdrs_2")
        assert leaks(received) == [], f"long-lived session leaked: {received}"
    finally:
        old.close()
        pg.psql("DROP TABLE IF EXISTS billing.atk_xdrs_2")


def test_timing_admin_view_and_overload_same_period(
    pg: EmbeddedPostgres, billing: ProxyProcess
) -> None:
    """Objects an admin creates after the catalog was read: a view over customers and an
    overload of a built-in name (public.upper(bigint)) that reads customers."""
    env = {"PGVEIL_TEST_HASH_KEY": HASH_KEY, "PGVEIL_CATALOG_PASSWORD": pg.password}
    p = ProxyProcess(
        pg.port,
        "--upstream-sslmode", "disable",
        "--rules", str(billing.rules_path),  # type: ignore[attr-defined]
        "--catalog-user", pg.superuser,
        metrics=False,
        env=env,
    )  # fmt: skip
    try:
        with _helpdesk(p.port) as c:
            c.execute("SELECT 1")  # catalog read now
        pg.psql(
            "CREATE VIEW billing.atk_names AS SELECT i_customer, name, email FROM billing.customers;"
            "GRANT SELECT ON billing.atk_names TO helpdesk;"
            "CREATE FUNCTION public.upper(bigint) RETURNS text LANGUAGE sql STABLE AS "
            "'SELECT string_agg(name || email, '' '') FROM billing.customers';"
        )
        with _helpdesk(pg.port) as d:
            assert leaks(_read(d, "SELECT name, email FROM billing.atk_names")) != []
            assert leaks(_read(d, "SELECT upper(1::bigint)")) != []
        with _helpdesk(p.port) as c:
            got_view = _read(c, "SELECT name, email FROM billing.atk_names")
            got_fn = _read(c, "SELECT upper(1::bigint)")
        assert leaks(got_view) == [] and leaks(got_fn) == [], (
            f"view: {got_view}\noverload: {got_fn}"
        )
    finally:
        p.stop()
        pg.psql(
            "DROP VIEW IF EXISTS billing.atk_names; DROP FUNCTION IF EXISTS public.upper(bigint)"
        )


def _wait_rules_match(proxy: ProxyProcess) -> None:
    """Until `proxy` (the shared one: other modules use it) has no rules problem: it may
    have read the catalog while a protected table or column was renamed, and then refuses
    masked sessions until its next read (a few seconds)."""
    deadline = time.monotonic() + 60
    while proxy.metric("pgveil_rules_problems", database="postgres") != 0:
        assert time.monotonic() < deadline, "the shared proxy still finds rules problems"
        time.sleep(0.1)


def test_timing_renamed_table_long_lived_session(
    pg: EmbeddedPostgres, fresh_proxy: ProxyProcess, billing: ProxyProcess
) -> None:
    """ALTER TABLE ... RENAME: the cached catalog knows the old name only; the OID exit
    check catches a plain column, not an expression."""
    old = _helpdesk(fresh_proxy.port)
    try:
        pg.psql("ALTER TABLE billing.accounts RENAME TO atk_accounts_r")
        with _helpdesk(pg.port) as d:
            assert leaks(_read(d, "SELECT host(ip), mac::text FROM billing.atk_accounts_r")) != []
        received = _read(old, "SELECT host(ip), mac::text FROM billing.atk_accounts_r")
        assert leaks(received) == [], f"renamed table leaked: {received}"
    finally:
        old.close()
        pg.psql("ALTER TABLE IF EXISTS billing.atk_accounts_r RENAME TO accounts")
        _wait_rules_match(billing)


def test_drift_renamed_column_after_refresh(
    pg: EmbeddedPostgres, fresh_proxy: ProxyProcess, billing: ProxyProcess
) -> None:
    """A rule's column renamed: at the next catalog read the rules name a column that does
    not exist, and masked logins are refused naming the rule; until then the renamed
    column is refused as unknown. Never served raw."""
    try:
        pg.psql("ALTER TABLE billing.accounts RENAME COLUMN mac TO atk_mac_addr")
        with _helpdesk(pg.port) as d:
            assert leaks(_read(d, "SELECT atk_mac_addr FROM billing.accounts")) != []
        deadline = time.monotonic() + 60
        while True:
            try:
                with _helpdesk(fresh_proxy.port) as c:
                    received = _read(c, "SELECT atk_mac_addr FROM billing.accounts")
            except psycopg.OperationalError as exc:
                refused = str(exc)
                break
            assert leaks(received) == [], f"renamed column leaked: {received}"
            assert time.monotonic() < deadline, "the next catalog read did not catch it"
            time.sleep(0.1)
        assert (
            "pgveil: the rules do not match database postgres: tables.billing.accounts.columns"
            ".mac: column mac of billing.accounts does not exist" in refused
        )
    finally:
        pg.psql("ALTER TABLE billing.accounts RENAME COLUMN atk_mac_addr TO mac")
        _wait_rules_match(billing)


def test_mixed_case_builtin_named_function(pg: EmbeddedPostgres, fresh_proxy: ProxyProcess) -> None:
    """check_function() lower-cases the called name: "Lower"(..) (a user function) is
    taken for the built-in lower; persists across refreshes."""
    try:
        pg.psql(
            'CREATE FUNCTION public."Lower"(bigint) RETURNS text LANGUAGE sql STABLE AS '
            "'SELECT string_agg(name || email, '' '') FROM billing.customers'"
        )
        time.sleep(2.5)
        with _helpdesk(pg.port) as d:
            assert leaks(_read(d, 'SELECT "Lower"(1::bigint)')) != []
        with _helpdesk(fresh_proxy.port) as c:
            received = _read(c, 'SELECT "Lower"(1::bigint)')
        assert leaks(received) == [], f'"Lower" leaked: {received}'
    finally:
        pg.psql('DROP FUNCTION IF EXISTS public."Lower"(bigint)')


def test_proxy_survives(billing: ProxyProcess) -> None:
    assert billing.alive()
