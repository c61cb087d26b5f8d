"""What a masked session gets while the catalog changes under pgveil: a partition added to
a protected table, a view and an overload of a built-in name created after the catalog was
read, a protected table or a rule's column renamed, and a user function whose name differs
from a built-in's only in case. A session that logged in before the change, and one that
logs in after pgveil's next catalog read, must get nothing personal; when the rules no
longer match the catalog, masked logins are refused naming the rule.

These tests use their own pgveil with a short `--catalog-refresh` (so that the shared
`billing` pgveil never caches the changes) and wait for its next catalog reads (its
`catalog.loaded` log lines), not for a fixed time.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest

from proxy.demo.embedded_pg import EmbeddedPostgres
from tests.integration.audit_wire import wait_for
from tests.integration.masking_fixture import HASH_KEY, HELPDESK, HELPDESK_PW, leaks
from tests.support import ProxyProcess


def dsn_for(port: int) -> str:
    return (
        f"host=127.0.0.1 port={port} user={HELPDESK} password={HELPDESK_PW} "
        "dbname=postgres sslmode=disable"
    )


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


def catalog_reads(proxy: ProxyProcess) -> int:
    return proxy.log().count('"catalog.loaded"')


def wait_for_a_catalog_read_after(proxy: ProxyProcess, reads: int) -> None:
    """Until `proxy` has read the catalog twice more than `reads` (the count before a
    change): the first of them may have begun before the change was committed."""
    wait_for(lambda: catalog_reads(proxy) >= reads + 2, "a catalog read after the change")


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
        reads = catalog_reads(fresh_proxy)
        pg.psql(
            "CREATE TABLE billing.atk_xdrs_2 PARTITION OF billing.xdrs "
            "FOR VALUES FROM (1000000) TO (2000000);"
            "GRANT SELECT ON billing.atk_xdrs_2 TO helpdesk;"
            "INSERT INTO billing.xdrs (i_xdr, i_account, cli, cld, charged) "
            "VALUES (1000001, 10, '+420777123456', '+18005550100', 1);"
        )
        wait_for_a_catalog_read_after(fresh_proxy, reads)
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
    """A user function "Lower"(bigint) is not the built-in lower: calling it through pgveil
    gets nothing personal, also after a catalog read that knows it."""
    try:
        with _helpdesk(fresh_proxy.port) as c:
            c.execute("SELECT 1")  # the catalog of postgres is read
        reads = catalog_reads(fresh_proxy)
        pg.psql(
            'CREATE FUNCTION public."Lower"(bigint) RETURNS text LANGUAGE sql STABLE AS '
            "'SELECT string_agg(name || email, '' '') FROM billing.customers'"
        )
        wait_for_a_catalog_read_after(fresh_proxy, reads)
        with _helpdesk(pg.port) as d:
            assert leaks(_read(d, 'SELECT "Lower"(1::bigint)')) != []
        with _helpdesk(fresh_proxy.port) as c:
            received = _read(c, 'SELECT "Lower"(1::bigint)')
        assert leaks(received) == [], f'"Lower" leaked: {received}'
    finally:
        pg.psql('DROP FUNCTION IF EXISTS public."Lower"(bigint)')
