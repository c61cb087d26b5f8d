"""The audit-evasion corpus for `pgveil audit who`: reads that the report must not miss.

Each case is a statement sequence run by a real client (psql, psycopg, asyncpg) through an
audited pgveil against the real server, and the `audit who --table T --subject S` rows it
must leave (`yes`, `possibly`, or none where the events prove the subject was not read),
with what the event of its reading statement must say:

* an event that pgveil could not fully analyse (`analysis_complete: false`) may have read any
  table, whatever tables it names: it is listed as `possibly` under every table;
* a read through a view (named by the rules, derived, not derivable, over another view,
  materialized, temporary, created after pgveil read the catalog, shadowing a catalog name)
  is an access to the protected tables behind it, with the subjects of the key columns the
  view exposes; a view whose rows may carry data of subjects whose keys it does not show
  (a self-join) never claims complete subjects;
* a NotificationResponse on a channel the rules name is an access for every listener,
  masked or not, recorded without its payload.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any

import asyncpg
import psycopg
import pytest

from proxy.cli.audit import who
from proxy.demo.embedded_pg import EmbeddedPostgres
from tests.integration.audit_wire import all_events, audited_proxy, wait_for
from tests.integration.masking_fixture import (
    ADMIN,
    ADMIN_PW,
    HELPDESK,
    HELPDESK_PW,
    NAME,
    dsn,
)
from tests.support import ProxyProcess

CUSTOMERS = "billing.customers"
ACCOUNTS = "billing.accounts"
CLIENTS = ("psql", "psycopg", "asyncpg")
PASSWORDS = {ADMIN: ADMIN_PW, HELPDESK: HELPDESK_PW}

SCHEMA = """
DROP SCHEMA IF EXISTS evasion CASCADE;
CREATE SCHEMA evasion;
-- views the rules do not name: masks derived from their definitions
CREATE VIEW evasion.contacts AS SELECT c.i_customer, c.email FROM billing.customers c;
CREATE VIEW evasion.over_view AS SELECT i_customer AS who, email FROM evasion.contacts;
CREATE VIEW evasion.pairs AS
  SELECT a.i_customer, b.name FROM billing.customers a
    JOIN billing.customers b ON b.i_customer = a.i_customer + 1;
-- not derivable (a set operation): masked roles are refused it, unmasked ones read it
CREATE VIEW evasion.unioned AS
  SELECT i_customer, name FROM billing.customers
  UNION ALL SELECT i_customer, name FROM billing.customers;
-- reads through a function pgveil does not see into
CREATE VIEW evasion.via_function AS SELECT billing.leak() AS name;
CREATE MATERIALIZED VIEW evasion.snapshot AS SELECT i_customer, name FROM billing.customers;
-- swapped by name while pgveil holds the catalog read before
CREATE VIEW evasion.swap_me AS SELECT c.i_customer, c.email FROM billing.customers c;
CREATE VIEW evasion.swap_in AS SELECT a.i_account, a.ip FROM billing.accounts a;
-- two protected tables, both keys shown (the demo's customer_overview)
CREATE VIEW evasion.overview AS
  SELECT c.i_customer, c.name, a.i_account, a.ip
    FROM billing.customers c JOIN billing.accounts a ON a.i_customer = c.i_customer;
-- one occurrence of customers, but a row's data is not (only) the row's whose key it shows
CREATE VIEW evasion.aggregated AS
  SELECT max(i_customer) AS i_customer, string_agg(email, ',') AS email FROM billing.customers;
CREATE VIEW evasion.windowed AS
  SELECT i_customer, lag(email) OVER (ORDER BY i_customer) AS email FROM billing.customers;
-- a subset of the rows, each its own (the key column still names the data's subject)
CREATE VIEW evasion.first_ones AS
  SELECT DISTINCT ON (i_customer) i_customer, email FROM billing.customers
   ORDER BY i_customer LIMIT 10;
-- code the server runs out of pgveil's sight: only rows written (no name moves), dynamic
-- SQL, another language, and a call of code that runs dynamic SQL (rules/code.py)
CREATE TABLE evasion.counter (n int);
CREATE PROCEDURE evasion.rows_only() LANGUAGE plpgsql
  AS $$ BEGIN INSERT INTO evasion.counter VALUES (1); UPDATE evasion.counter SET n = n + 1; END $$;
CREATE PROCEDURE evasion.dynamic() LANGUAGE plpgsql AS $$ BEGIN EXECUTE 'SELECT 1'; END $$;
CREATE FUNCTION evasion.dynamic_f() RETURNS int LANGUAGE plpgsql
  AS $$ BEGIN EXECUTE 'SELECT 1'; RETURN 1; END $$;
-- a built-in that runs a query given as text, under another name
CREATE FUNCTION evasion.runs_query_text(text, boolean, boolean, text) RETURNS xml
  LANGUAGE internal STABLE STRICT AS 'query_to_xml';
-- C and internal code is the server's (or an extension's): trusted as built-ins are
CREATE FUNCTION evasion.internal_abs(int) RETURNS int LANGUAGE internal IMMUTABLE STRICT
  AS 'int4abs';
CREATE EXTENSION pgcrypto SCHEMA evasion;
CREATE FUNCTION evasion.calls_dynamic() RETURNS int LANGUAGE sql
  AS $$ SELECT evasion.dynamic_f() $$;
GRANT ALL ON evasion.counter TO billing_admin;
GRANT USAGE, CREATE ON SCHEMA evasion TO billing_admin;
GRANT USAGE ON SCHEMA evasion TO helpdesk, cc_staff;
GRANT SELECT ON ALL TABLES IN SCHEMA evasion TO billing_admin, helpdesk, cc_staff;
"""


@pytest.fixture(scope="module")
def audited(
    pg: EmbeddedPostgres, billing: ProxyProcess, tmp_path_factory: Any
) -> Iterator[tuple[ProxyProcess, Path]]:
    """An audited pgveil that read the catalog with the views above in it."""
    pg.psql(SCHEMA)
    try:
        with audited_proxy(pg, tmp_path_factory.mktemp("evasion-who")) as shared:
            yield shared
    finally:
        pg.psql("DROP SCHEMA IF EXISTS evasion CASCADE")


# ---- clients --------------------------------------------------------------------------------


def run_psql(pg: EmbeddedPostgres, port: int, user: str, app: str, items: tuple[str, ...]) -> str:
    psql = shutil.which("psql") or str(pg.bindir / "psql")
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    env.update(PGPASSWORD=PASSWORDS[user], PGSSLMODE="disable", PGAPPNAME=app)
    script = "".join(s.strip().rstrip(";") + "\n;\n" for s in items)
    p = subprocess.run(
        [psql, "-X", "-v", "ON_ERROR_STOP=1", "-h", "127.0.0.1", "-p", str(port), "-U", user,
         "-d", "postgres"],
        input=script, capture_output=True, text=True, env=env, timeout=60,
    )  # fmt: skip
    assert p.returncode == 0, p.stderr
    return p.stdout + p.stderr


def run_psycopg(
    pg: EmbeddedPostgres, port: int, user: str, app: str, items: tuple[str, ...]
) -> str:
    out: list[str] = []
    conninfo = dsn(pg, port, user, PASSWORDS[user]) + f" application_name={app}"
    with psycopg.connect(conninfo, autocommit=True) as c:
        c.add_notify_handler(lambda n: out.append(f"NOTIFY {n.channel}"))
        for s in items:
            cur = c.execute(s)
            if cur.description is not None:
                out.append(repr(cur.fetchall()))
    return "\n".join(out)


def run_asyncpg(port: int, user: str, app: str, items: tuple[str, ...]) -> str:
    async def go() -> str:
        out: list[str] = []
        notified = asyncio.Event()
        c = await asyncpg.connect(
            host="127.0.0.1", port=port, user=user, password=PASSWORDS[user],
            database="postgres", ssl=False,
            server_settings={"client_encoding": "UTF8", "application_name": app},
        )  # fmt: skip
        try:
            for s in items:
                if s.upper().startswith("LISTEN "):
                    channel = s.split()[1]

                    def got(*args: Any) -> None:
                        out.append(f"NOTIFY {args[2]}")
                        notified.set()

                    await c.add_listener(channel, got)
                    continue
                out.append(repr([tuple(r) for r in await c.fetch(s)]))
                if s.upper().startswith("NOTIFY "):
                    await asyncio.wait_for(notified.wait(), 10)
        finally:
            await c.close()
        return "\n".join(out)

    return asyncio.run(go())


def run(
    client: str, pg: EmbeddedPostgres, port: int, user: str, app: str, items: tuple[str, ...]
) -> str:
    if client == "psql":
        return run_psql(pg, port, user, app, items)
    if client == "psycopg":
        return run_psycopg(pg, port, user, app, items)
    return run_asyncpg(port, user, app, items)


# ---- what the report says -------------------------------------------------------------------


def access_events(path: Path, app: str) -> list[dict[str, Any]]:
    return [
        e
        for e in all_events(path)
        if e["type"] == "access"
        and e.get("application_name") == app
        and e.get("outcome") != "running"
    ]


def settled(pg: EmbeddedPostgres, port: int, path: Path, app: str) -> None:
    """Wait until pgveil has read the catalog after DDL that moved names: until then every
    statement that names a relation leaves an uncertain event, one on an unprotected table
    too."""

    def probe() -> bool:
        before = len(access_events(path, app))
        run_psycopg(pg, port, ADMIN, app, ("SELECT count(*) FROM billing.customer_classes",))
        return len(access_events(path, app)) == before

    wait_for(probe, "pgveil to read the catalog again")


def touched(path: Path, app: str, table: str, subject: str) -> list[str]:
    """`audit who --table TABLE --subject SUBJECT`, for the events of one application."""
    return [
        r["touched"]
        for r in who(all_events(path), table, subject, None, None)
        if r["application_name"] == app
    ]


@dataclass(frozen=True)
class Case:
    name: str
    user: str
    statements: tuple[str, ...]
    # (table, subject) -> the `touched` column of every row `who` must list for it
    report: dict[tuple[str, str], list[str]]
    # what the event of the last statement must say (a subset of its fields)
    event: dict[str, Any]


CASES = [
    # -- uncertain events: listed under every table, whatever tables they name --------------
    Case(
        "unanalysed_names_one_table",
        ADMIN,
        ("SELECT a.i_account, billing.leak() FROM billing.accounts a ORDER BY 1",),
        # (the rows returned name account 10: it was read)
        {(CUSTOMERS, "1"): ["possibly"], (ACCOUNTS, "10"): ["yes"]},
        {"analysis_complete": False, "subjects_complete": False},
    ),
    Case(
        "unanalysed_names_no_table",
        ADMIN,
        ("SELECT billing.leak()",),
        {(CUSTOMERS, "1"): ["possibly"], (ACCOUNTS, "10"): ["possibly"]},
        {"analysis_complete": False, "tables": []},
    ),
    Case(
        "do_block",
        ADMIN,
        ("DO $$ BEGIN PERFORM name FROM billing.customers; END $$",),
        {(CUSTOMERS, "1"): ["possibly"]},
        {"analysis_complete": False},
    ),
    # -- views the rules name ----------------------------------------------------------------
    # (a read through a view lists the subjects its key column shows; they are not proved
    # complete: the proof by rows needs the table itself, rules/subjects.py)
    Case(
        "rules_view_key_returned",
        ADMIN,
        ("SELECT i_customer, name FROM billing.customer_contacts ORDER BY 1",),
        {(CUSTOMERS, "1"): ["yes"], ("billing.customer_contacts", "1"): ["yes"]},
        {
            "tables": [CUSTOMERS],
            "views": {"billing.customer_contacts": [CUSTOMERS]},
            "subjects": {CUSTOMERS: ["1", "2"]},
            "subjects_complete": False,
            "analysis_complete": True,
        },
    ),
    Case(
        # the view shows the key of its one table: `key = 2` on it names the subject (listed
        # as yes); not proved to be all, since the view's definition comes from the catalog
        # pgveil read, which code it does not see into can change (customer 1: possibly)
        "rules_view_other_subject",
        ADMIN,
        ("SELECT i_customer, email FROM billing.customer_contacts WHERE i_customer = 2",),
        {(CUSTOMERS, "1"): ["possibly"], (CUSTOMERS, "2"): ["yes"]},
        {"tables": [CUSTOMERS], "subjects": {CUSTOMERS: ["2"]}, "subjects_complete": False},
    ),
    Case(
        # the second read of the view has the first one's shape: its keys come from the
        # analysis of the shape with the literal put back, and stay "named, not proved"
        "rules_view_key_named_again",
        ADMIN,
        (
            "SELECT i_customer, email FROM billing.customer_contacts WHERE i_customer = 1",
            "SELECT i_customer, email FROM billing.customer_contacts WHERE i_customer = 2",
        ),
        {(CUSTOMERS, "1"): ["yes", "possibly"], (CUSTOMERS, "2"): ["possibly", "yes"]},
        {"tables": [CUSTOMERS], "subjects": {CUSTOMERS: ["2"]}, "subjects_complete": False},
    ),
    Case(
        # a view over a view, read twice with one shape: the second statement's keys come
        # from the shape with its literal put back, still named through a view (not proved)
        "view_over_view_key_named_again",
        ADMIN,
        (
            "SELECT email FROM evasion.over_view WHERE who = 1",
            "SELECT email FROM evasion.over_view WHERE who = 2",
        ),
        {(CUSTOMERS, "1"): ["yes", "possibly"], (CUSTOMERS, "2"): ["possibly", "yes"]},
        {"tables": [CUSTOMERS], "subjects": {CUSTOMERS: ["2"]}, "subjects_complete": False},
    ),
    # -- keys the server reads at any length (a literal's digits are never made an int past
    # int8's width: int() refuses 4300 digits, leading zeros counted) ---------------------
    Case(
        "key_with_thousands_of_leading_zeros",
        ADMIN,
        ("SELECT email FROM billing.customers WHERE i_customer = " + "0" * 5000 + "2",),
        {(CUSTOMERS, "2"): ["yes"], (CUSTOMERS, "1"): []},
        {"tables": [CUSTOMERS], "subjects": {CUSTOMERS: ["2"]}, "subjects_complete": True},
    ),
    Case(
        # bigint = numeric: no row; the event proves no subject was read
        "key_of_thousands_of_digits",
        ADMIN,
        ("SELECT email FROM billing.customers WHERE i_customer = " + "1" * 5000,),
        {(CUSTOMERS, "1"): []},
        {"tables": [CUSTOMERS], "rows": 0, "subjects_complete": True},
    ),
    Case(
        "rules_view_key_named_not_returned",
        ADMIN,
        ("SELECT name, email FROM billing.customer_contacts WHERE i_customer = 2",),
        {(CUSTOMERS, "1"): ["possibly"], (CUSTOMERS, "2"): ["yes"]},
        {"tables": [CUSTOMERS], "subjects": {CUSTOMERS: ["2"]}, "subjects_complete": False},
    ),
    Case(
        "rules_view_key_named_masked_role",
        HELPDESK,
        ("SELECT name, email FROM billing.customer_contacts WHERE i_customer = 2",),
        {(CUSTOMERS, "1"): ["possibly"], (CUSTOMERS, "2"): ["yes"]},
        {"tables": [CUSTOMERS], "subjects": {CUSTOMERS: ["2"]}, "subjects_complete": False},
    ),
    # a view over two protected tables (the demo's customer_overview): the key named is
    # one table's; the other's subjects are not named, so not proved
    Case(
        "two_table_view_key_named",
        ADMIN,
        ("SELECT name, ip FROM evasion.overview WHERE i_customer = 1",),
        {(CUSTOMERS, "1"): ["yes"], (CUSTOMERS, "2"): ["possibly"]},
        {
            "tables": [ACCOUNTS, CUSTOMERS],
            "views": {"evasion.overview": [ACCOUNTS, CUSTOMERS]},
            "subjects": {CUSTOMERS: ["1"]},
            "subjects_complete": False,
        },
    ),
    Case(
        "two_table_view_key_named_masked_role",
        HELPDESK,
        ("SELECT name, ip FROM evasion.overview WHERE i_customer = 1",),
        {(CUSTOMERS, "1"): ["yes"], (CUSTOMERS, "2"): ["possibly"]},
        {"tables": [ACCOUNTS, CUSTOMERS], "subjects": {CUSTOMERS: ["1"]}},
    ),
    Case(
        # the self-join's key is one occurrence's: its filter does not name the other's
        "view_self_join_key_named",
        ADMIN,
        ("SELECT name FROM evasion.pairs WHERE i_customer = 1",),
        {(CUSTOMERS, "2"): ["possibly"]},
        {"tables": [CUSTOMERS], "subjects_complete": False},
    ),
    Case(
        "view_over_view_key_named",
        ADMIN,
        ("SELECT email FROM evasion.over_view WHERE who = 2",),
        {(CUSTOMERS, "1"): ["possibly"], (CUSTOMERS, "2"): ["yes"]},
        {"tables": [CUSTOMERS], "subjects": {CUSTOMERS: ["2"]}, "subjects_complete": False},
    ),
    Case(
        # the row of max(key) holds every customer's e-mail
        "aggregated_view_key_named",
        ADMIN,
        ("SELECT email FROM evasion.aggregated WHERE i_customer = 2",),
        {(CUSTOMERS, "1"): ["possibly"]},
        {"tables": [CUSTOMERS], "subjects_complete": False},
    ),
    Case(
        # customer 2's row shows customer 1's e-mail
        "window_view_key_named",
        ADMIN,
        ("SELECT email FROM evasion.windowed WHERE i_customer = 2",),
        {(CUSTOMERS, "1"): ["possibly"]},
        {"tables": [CUSTOMERS], "subjects_complete": False},
    ),
    Case(
        "distinct_on_limit_view_key_named",
        ADMIN,
        ("SELECT email FROM evasion.first_ones WHERE i_customer = 2",),
        {(CUSTOMERS, "1"): ["possibly"], (CUSTOMERS, "2"): ["yes"]},
        {"tables": [CUSTOMERS], "subjects": {CUSTOMERS: ["2"]}, "subjects_complete": False},
    ),
    Case(
        # (an OR names no key: every row may match)
        "view_key_named_or_true",
        ADMIN,
        ("SELECT email FROM evasion.contacts WHERE i_customer = 2 OR true",),
        {(CUSTOMERS, "1"): ["possibly"]},
        {"tables": [CUSTOMERS], "subjects_complete": False},
    ),
    Case(
        "rules_view_key_not_returned",
        ADMIN,
        ("SELECT name FROM billing.customer_contacts",),
        {(CUSTOMERS, "1"): ["possibly"]},
        {"tables": [CUSTOMERS], "subjects_complete": False},
    ),
    Case(
        "rules_view_masked_role",
        HELPDESK,
        ("SELECT i_customer, name FROM billing.customer_contacts ORDER BY 1",),
        {(CUSTOMERS, "1"): ["yes"]},
        {"tables": [CUSTOMERS], "subjects": {CUSTOMERS: ["1", "2"]}, "subjects_complete": False},
    ),
    # -- views the rules do not name -----------------------------------------------------------
    Case(
        "derived_view",
        ADMIN,
        ("SELECT i_customer, email FROM evasion.contacts ORDER BY 1",),
        {(CUSTOMERS, "1"): ["yes"]},
        {
            "tables": [CUSTOMERS],
            "views": {"evasion.contacts": [CUSTOMERS]},
            "subjects": {CUSTOMERS: ["1", "2"]},
            "subjects_complete": False,
        },
    ),
    Case(
        "derived_view_masked_role",
        HELPDESK,
        ("SELECT i_customer, email FROM evasion.contacts WHERE i_customer = 2",),
        {(CUSTOMERS, "1"): ["possibly"], (CUSTOMERS, "2"): ["yes"]},
        {"tables": [CUSTOMERS], "subjects": {CUSTOMERS: ["2"]}, "subjects_complete": False},
    ),
    Case(
        "view_over_view_renamed_key",
        ADMIN,
        ("SELECT who, email FROM evasion.over_view ORDER BY 1",),
        {(CUSTOMERS, "1"): ["yes"]},
        {"tables": [CUSTOMERS], "subjects": {CUSTOMERS: ["1", "2"]}, "subjects_complete": False},
    ),
    Case(
        "view_not_derivable",
        ADMIN,
        ("SELECT i_customer, name FROM evasion.unioned",),
        {(CUSTOMERS, "1"): ["possibly"]},
        {"tables": [CUSTOMERS], "subjects_complete": False, "analysis_complete": True},
    ),
    Case(
        # row 1 carries customer 2's name: the key it shows is not the data's
        "view_self_join",
        ADMIN,
        ("SELECT i_customer, name FROM evasion.pairs",),
        {(CUSTOMERS, "2"): ["possibly"]},
        {"tables": [CUSTOMERS], "subjects_complete": False},
    ),
    Case(
        # the key shown by the view is one occurrence's, the names are all customers'
        "view_beside_its_table",
        ADMIN,
        ("SELECT v.i_customer, c.name FROM evasion.contacts v, billing.customers c",),
        {(CUSTOMERS, "2"): ["yes"], (CUSTOMERS, "3"): ["possibly"]},
        {"tables": [CUSTOMERS], "subjects_complete": False},
    ),
    Case(
        "view_beside_its_table_masked_role",
        HELPDESK,
        ("SELECT v.i_customer, c.name FROM evasion.contacts v, billing.customers c",),
        {(CUSTOMERS, "3"): ["possibly"]},
        {"tables": [CUSTOMERS], "subjects_complete": False},
    ),
    Case(
        # search_path finds the view by its name alone
        "unqualified_view_name",
        ADMIN,
        ("SET search_path = evasion, public", "SELECT i_customer, email FROM contacts"),
        {(CUSTOMERS, "1"): ["yes"]},
        {"tables": [CUSTOMERS], "views": {"evasion.contacts": [CUSTOMERS]}},
    ),
    Case(
        # a materialized view holds a copy of its tables' rows: read, it is theirs
        "materialized_view",
        ADMIN,
        ("SELECT i_customer, name FROM evasion.snapshot ORDER BY 1",),
        {(CUSTOMERS, "1"): ["yes"]},
        {
            "tables": [CUSTOMERS],
            "views": {"evasion.snapshot": [CUSTOMERS]},
            "subjects_complete": False,
        },
    ),
    Case(
        "view_through_a_function",
        ADMIN,
        ("SELECT name FROM evasion.via_function",),
        {(CUSTOMERS, "1"): ["possibly"], (ACCOUNTS, "10"): ["possibly"]},
        {"analysis_complete": False},
    ),
    # -- views the catalog pgveil read does not have -----------------------------------------
    Case(
        "temporary_view",
        ADMIN,
        (
            "CREATE TEMP VIEW tv AS SELECT i_customer, name FROM billing.customers",
            "SELECT i_customer, name FROM tv",
        ),
        {(CUSTOMERS, "1"): ["possibly"]},
        {"tables": [CUSTOMERS], "views": {"pg_temp.tv": [CUSTOMERS]}},
    ),
    Case(
        "temporary_view_masked_role",
        HELPDESK,
        (
            "CREATE TEMP VIEW mtv AS SELECT i_customer, name FROM billing.customers",
            "SELECT i_customer, name FROM mtv",
        ),
        {(CUSTOMERS, "1"): ["possibly"]},
        {"tables": [CUSTOMERS], "views": {"pg_temp.mtv": [CUSTOMERS]}},
    ),
    Case(
        "temporary_view_over_temporary_view",
        ADMIN,
        (
            "CREATE TEMP VIEW t1 AS SELECT i_customer, name FROM billing.customers",
            "CREATE TEMP VIEW t2 AS SELECT * FROM t1",
            "SELECT * FROM pg_temp.t2",
        ),
        {(CUSTOMERS, "1"): ["possibly"]},
        {"tables": [CUSTOMERS]},
    ),
    Case(
        # the server looks in pg_temp first: the name is the temporary view's, not the
        # catalog's unprotected table of that name
        "temporary_view_shadows_a_table",
        ADMIN,
        (
            "CREATE TEMP VIEW customer_classes AS "
            "SELECT i_customer AS i_customer_class, name FROM billing.customers",
            "SELECT * FROM customer_classes",
        ),
        {(CUSTOMERS, "1"): ["possibly"]},
        {"tables": [CUSTOMERS], "views": {"pg_temp.customer_classes": [CUSTOMERS]}},
    ),
    Case(
        # a temporary view in place of the catalog's view of that name: the key its filter
        # names is the temporary view's (one side of a self-join here), no proof
        "temporary_view_shadows_a_view",
        ADMIN,
        (
            "SET search_path = evasion, public",
            "CREATE TEMP VIEW contacts AS SELECT a.i_customer, b.email FROM billing.customers a"
            " JOIN billing.customers b ON b.i_customer = a.i_customer + 1",
            "SELECT email FROM contacts WHERE i_customer = 1",
        ),
        {(CUSTOMERS, "2"): ["possibly"]},
        {"subjects_complete": False},
    ),
]


@pytest.mark.parametrize("client", CLIENTS)
@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_who_lists_the_read(
    pg: EmbeddedPostgres, audited: tuple[ProxyProcess, Path], case: Case, client: str
) -> None:
    proxy, path = audited
    app = f"ew-{case.name}-{client}"[:63]
    run(client, pg, proxy.port, case.user, app, case.statements)
    events = access_events(path, app)
    assert events, "the reading statement left no event"
    last = events[-1]
    for key, value in case.event.items():
        assert last.get(key) == value, f"{key}: {last}"
    for (table, subject), expected in case.report.items():
        got = touched(path, app, table, subject)
        # the statements before the last read nothing (a CREATE VIEW returns no rows)
        assert got == expected, f"who --table {table} --subject {subject}: {got}; {events}"
    assert NAME not in path.read_text()


@pytest.mark.parametrize("client", CLIENTS)
def test_a_view_created_after_the_catalog_was_read(
    pg: EmbeddedPostgres, audited: tuple[ProxyProcess, Path], client: str
) -> None:
    """A view the catalog pgveil read does not have: its read is attributed to what the
    session defined it over, or (once the catalog is read again) to what the catalog says;
    never left out."""
    proxy, path = audited
    app = f"ew-late-view-{client}"
    view = f"evasion.late_{client}"
    run(client, pg, proxy.port, ADMIN, app, (
        f"CREATE VIEW {view} AS SELECT i_customer, name FROM billing.customers",
        f"SELECT i_customer, name FROM {view} ORDER BY 1",
    ))  # fmt: skip
    last = access_events(path, app)[-1]
    assert CUSTOMERS in last["tables"] and view in last["views"], last
    assert last["kinds"] == ["select"]
    assert touched(path, app, CUSTOMERS, "1")[-1] in ("yes", "possibly")
    settled(pg, proxy.port, path, f"{app}-settled")


@pytest.mark.parametrize("client", CLIENTS)
def test_a_relation_the_catalog_does_not_know_is_uncertain(
    pg: EmbeddedPostgres, audited: tuple[ProxyProcess, Path], client: str
) -> None:
    """A name that pgveil cannot resolve (created by code it does not see, here a function
    that creates a view) leaves an uncertain event, listed under every table, rather than
    nothing; and the catalog is read again."""
    proxy, path = audited
    app = f"ew-unknown-{client}"
    view = f"evasion.hidden_{client}"
    pg.psql(
        f"CREATE FUNCTION evasion.make_{client}() RETURNS void LANGUAGE plpgsql AS "
        f"$$ BEGIN EXECUTE 'CREATE VIEW {view} AS SELECT i_customer, name "
        "FROM billing.customers'; END $$;"
        f"GRANT EXECUTE ON FUNCTION evasion.make_{client}() TO billing_admin"
    )
    run(client, pg, proxy.port, ADMIN, app, (
        f"SELECT evasion.make_{client}()",
        f"SELECT name FROM {view}",
    ))  # fmt: skip
    made, last = access_events(path, app)
    assert made["analysis_complete"] is False  # (a function pgveil does not see into)
    assert f"hidden_{client}" in last["statement"], last
    if last["tables"] == [CUSTOMERS]:
        # the catalog was read again in between (the function's call asked for it)
        assert last["views"] == {view: [CUSTOMERS]}, last
    else:
        assert last["analysis_complete"] is False, last
    assert touched(path, app, CUSTOMERS, "1")[-1] == "possibly"


@pytest.mark.parametrize("client", CLIENTS)
@pytest.mark.parametrize("user", [ADMIN, HELPDESK])
def test_a_view_replaced_by_a_do_block_proves_no_subjects(
    pg: EmbeddedPostgres, audited: tuple[ProxyProcess, Path], client: str, user: str
) -> None:
    """A DO block (code pgveil does not see into) replaces a view that showed the key of its
    one table by a self-join whose key column is the other row's: `key = 1` on it returns
    customer 2's e-mail. The reads after it, in any session, must not claim the subjects
    of the definition pgveil read before as complete: a key named through a view is never
    proof that it is all (rules/subjects.py NamedKeys.complete), so customer 2 is listed."""
    proxy, path = audited
    app = f"ew-do-replace-{user}-{client}"[:63]
    view = f"evasion.redone_{user}_{client}"
    run_psql(pg, proxy.port, ADMIN, f"{app}-ddl", (
        f"CREATE VIEW {view} AS SELECT c.i_customer, c.email FROM billing.customers c",
        f"GRANT SELECT ON {view} TO {HELPDESK}",
    ))  # fmt: skip
    settled(pg, proxy.port, path, f"{app}-known")
    run_psql(pg, proxy.port, ADMIN, f"{app}-do", (
        f"DO $$ BEGIN EXECUTE 'CREATE OR REPLACE VIEW {view} AS SELECT a.i_customer, b.email"
        " FROM billing.customers a JOIN billing.customers b ON b.i_customer = a.i_customer + 1';"
        " END $$",
    ))  # fmt: skip
    read = f"SELECT email FROM {view} WHERE i_customer = 1"
    got = run(client, pg, proxy.port, user, app, (read,))
    assert "ann" in got or "a**" in got, got  # customer 2's e-mail (masked for helpdesk)
    (event,) = access_events(path, app)
    assert event["subjects_complete"] is False or event["analysis_complete"] is False, event
    assert touched(path, app, CUSTOMERS, "2") == ["possibly"], event
    settled(pg, proxy.port, path, f"{app}-settled")


@pytest.mark.parametrize("client", CLIENTS)
def test_views_swapped_by_a_do_block_are_uncertain_until_the_catalog_is_read(
    pg: EmbeddedPostgres, audited: tuple[ProxyProcess, Path], client: str
) -> None:
    """A DO block renames views by EXECUTE so that a name the catalog pgveil read has over
    customers denotes a view over accounts. A read of that name in the DO's transaction
    (which no catalog read can see into) is uncertain, listed under accounts; once the
    transaction ended and pgveil read the catalog again, the read is attributed to
    accounts as fact."""
    proxy, path = audited
    app = f"ew-do-swap-{client}"
    swap, other = f"evasion.do_swap_{client}", f"evasion.do_swap_in_{client}"
    run_psql(pg, proxy.port, ADMIN, f"{app}-ddl", (
        f"CREATE VIEW {swap} AS SELECT c.i_customer, c.email FROM billing.customers c",
        f"CREATE VIEW {other} AS SELECT a.i_account, a.ip FROM billing.accounts a",
    ))  # fmt: skip
    settled(pg, proxy.port, path, f"{app}-known")
    run(client, pg, proxy.port, ADMIN, app, (
        "BEGIN",
        f"DO $$ BEGIN EXECUTE 'ALTER VIEW {swap} RENAME TO do_swap_out_{client}';"
        f" EXECUTE 'ALTER VIEW {other} RENAME TO do_swap_{client}'; END $$",
        f"SELECT * FROM {swap}",
        "COMMIT",
    ))  # fmt: skip
    (read,) = [e for e in access_events(path, app) if e["kinds"] == ["select"]]
    assert read["analysis_complete"] is False, read
    assert touched(path, app, ACCOUNTS, "10")[-1] in ("yes", "possibly"), read
    settled(pg, proxy.port, path, f"{app}-settled")
    run(client, pg, proxy.port, ADMIN, f"{app}-after", (f"SELECT * FROM {swap}",))
    (after,) = access_events(path, f"{app}-after")
    assert after["tables"] == [ACCOUNTS] and after["analysis_complete"] is True, after
    assert touched(path, f"{app}-after", ACCOUNTS, "10") == ["yes"], after


# the read after the code: uncertain when the code may have moved names (a catalog read
# cannot see into the transaction), certain otherwise
_AFTER_CODE = "SELECT i_customer, email FROM billing.customers WHERE i_customer = 1"


@pytest.mark.parametrize("client", CLIENTS)
@pytest.mark.parametrize(
    "call",
    [
        "CALL evasion.rows_only()",
        "SELECT billing.invoice_total(1)",
        "DO $$ BEGIN NULL; END $$",
        "SELECT evasion.internal_abs(-1)",  # a built-in under another name
        "SELECT evasion.digest('x', 'sha256')",  # an extension's C function (pgcrypto)
    ],
)
def test_code_that_only_reads_and_writes_rows_moves_no_names(
    pg: EmbeddedPostgres, audited: tuple[ProxyProcess, Path], client: str, call: str
) -> None:
    """A procedure that only inserts and updates rows (a billing system calls them all the
    time) leaves the reads after it certain: subjects proved by the rows returned."""
    proxy, path = audited
    app = f"ew-rows-{re.sub(r'[^a-z_]+', '-', call)[:40]}-{client}"
    run(client, pg, proxy.port, ADMIN, app, ("BEGIN", call, _AFTER_CODE, "COMMIT"))
    read = access_events(path, app)[-1]
    assert read["kinds"] == ["select"] and read["analysis_complete"] is True, read
    assert read["subjects"] == {CUSTOMERS: ["1"]} and read["subjects_complete"] is True, read


@pytest.mark.parametrize("client", CLIENTS)
@pytest.mark.parametrize(
    "call",
    [
        "CALL evasion.dynamic()",  # EXECUTE
        "SELECT evasion.dynamic_f()",  # EXECUTE, called from a SELECT
        "SELECT evasion.runs_query_text('SELECT 1', true, false, '')",  # query_to_xml
        "SELECT evasion.calls_dynamic()",  # calls one that runs EXECUTE
        "DO $$ BEGIN PERFORM evasion.dynamic_f(); END $$",
    ],
)
def test_code_that_may_run_ddl_leaves_the_reads_after_it_uncertain(
    pg: EmbeddedPostgres, audited: tuple[ProxyProcess, Path], client: str, call: str
) -> None:
    proxy, path = audited
    app = f"ew-ddl-{re.sub(r'[^a-z_]+', '-', call)[:40]}-{client}"
    run(client, pg, proxy.port, ADMIN, app, ("BEGIN", call, _AFTER_CODE, "COMMIT"))
    read = access_events(path, app)[-1]
    assert read["kinds"] == ["select"] and read["analysis_complete"] is False, read
    assert read["subjects_complete"] is False, read
    settled(pg, proxy.port, path, f"{app}-settled")


def test_a_temporary_table_made_by_a_do_block_shadows_the_catalogs_name(
    pg: EmbeddedPostgres, audited: tuple[ProxyProcess, Path]
) -> None:
    """The server finds an unqualified name in the session's temporary schema before any
    schema of the search path: a DO block copies customers into a temporary table named
    like the unprotected billing.customer_classes. After pgveil read the catalog again,
    that session's read of `customer_classes` is uncertain (listed under customers), not
    an unprotected read; a qualified name still reads what the catalog says."""
    proxy, path = audited
    app = "ew-do-temp"
    conninfo = dsn(pg, proxy.port, ADMIN, ADMIN_PW) + f" application_name={app}"
    with psycopg.connect(conninfo, autocommit=True) as c:
        c.execute("SET search_path = billing, public")
        c.execute(
            "DO $$ BEGIN CREATE TEMP TABLE customer_classes AS"
            " SELECT i_customer AS i_customer_class, name FROM billing.customers; END $$"
        )
        settled(pg, proxy.port, path, f"{app}-settled")
        before = len(access_events(path, app))
        rows = c.execute("SELECT name FROM customer_classes ORDER BY 1").fetchall()
        assert (NAME,) in rows  # the server read the temporary table
        c.execute("SELECT name FROM billing.customer_classes ORDER BY 1").fetchall()
    (read,) = access_events(path, app)[before:]
    assert read["analysis_complete"] is False, read
    assert touched(path, app, CUSTOMERS, "1")[-1] == "possibly", read
    assert NAME not in path.read_text()


def test_views_swapped_by_name_in_another_session(
    pg: EmbeddedPostgres, audited: tuple[ProxyProcess, Path]
) -> None:
    """One session renames views so that a name the catalog pgveil read has over customers
    now denotes a view over accounts; reads of that name in other sessions are listed under
    accounts: uncertain until pgveil has read the catalog again, then attributed as the
    server now resolves the name. Never under customers alone."""
    proxy, path = audited
    pg.psql("ALTER VIEW evasion.swap_me OWNER TO billing_admin;"
            "ALTER VIEW evasion.swap_in OWNER TO billing_admin")  # fmt: skip
    run_psql(pg, proxy.port, ADMIN, "ew-swap-ddl", (
        "BEGIN",
        "ALTER VIEW evasion.swap_me RENAME TO swap_out",
        "ALTER VIEW evasion.swap_in RENAME TO swap_me",
        "COMMIT",
    ))  # fmt: skip
    for client in CLIENTS:
        app = f"ew-swapped-{client}"
        run(client, pg, proxy.port, ADMIN, app, ("SELECT * FROM evasion.swap_me",))
        (event,) = access_events(path, app)
        assert event["analysis_complete"] is False or event["tables"] == [ACCOUNTS], event
        assert touched(path, app, ACCOUNTS, "10") in (["possibly"], ["yes"]), event
    settled(pg, proxy.port, path, "ew-swap-settled")


@pytest.mark.timeout(120)
def test_a_huge_numeric_key_does_not_stop_the_proxy(
    pg: EmbeddedPostgres, audited: tuple[ProxyProcess, Path]
) -> None:
    """`key = 1e999999999`: the server refuses the literal; pgveil analyses it first, and
    made it an int to compare with the bigint key (minutes of one CPU, every session of the
    proxy stopped). Now: no match, the error recorded, the proxy answers at once."""
    proxy, path = audited
    app = "ew-huge-numeric"
    conninfo = dsn(pg, proxy.port, ADMIN, ADMIN_PW) + f" application_name={app}"
    with psycopg.connect(conninfo, autocommit=True) as c:
        for literal in ("1e999999999", "-1e999999999::numeric"):
            with pytest.raises(psycopg.Error):
                c.execute(f"SELECT email FROM billing.customers WHERE i_customer = {literal}")
        # a numeric parameter the server accepts: 131072 digits
        big = Decimal("1" + "0" * 131071)
        sql = "SELECT email FROM billing.customers WHERE i_customer = %s::numeric"
        assert c.execute(sql, (big,)).fetchall() == []
        assert c.execute("SELECT 1").fetchall() == [(1,)]
    events = access_events(path, app)
    assert [e["outcome"] for e in events[:2]] == ["22003", "22003"], events  # (out of range)
    assert events[2]["outcome"] == "ok" and events[2]["rows"] == 0, events[2]
    assert touched(path, app, CUSTOMERS, "1") == []


def test_a_shape_made_in_one_session_keeps_view_keys_unproved_in_another(
    pg: EmbeddedPostgres, audited: tuple[ProxyProcess, Path]
) -> None:
    """The shape cache is the database's, shared by sessions: keys named through a view
    that a later session reads from another session's shape stay named, not proved."""
    proxy, path = audited
    sql = "SELECT who, email FROM evasion.over_view WHERE who = {}"
    for i, client in enumerate(CLIENTS):
        app = f"ew-shared-shape-{client}"
        key, other = ("1", "2") if i % 2 == 0 else ("2", "1")  # (customers 1 and 2 exist)
        run(client, pg, proxy.port, ADMIN, app, (sql.format(key),))
        (event,) = access_events(path, app)
        assert event.get("subjects") == {CUSTOMERS: [key]}, event
        assert event["subjects_complete"] is False, event
        assert touched(path, app, CUSTOMERS, key) == ["yes"]
        assert touched(path, app, CUSTOMERS, other) == ["possibly"]


# ---- notifications --------------------------------------------------------------------------

PAYLOAD = '{"customer_name": "Notifycanary Quixote", "email": "notifycanary@example.org"}'


@pytest.mark.parametrize("client", CLIENTS)
@pytest.mark.parametrize(
    ("user", "decision"), [(ADMIN, "passed"), (HELPDESK, "masked")], ids=["unmasked", "masked"]
)
def test_a_notification_on_a_channel_with_rules_is_an_access(
    pg: EmbeddedPostgres,
    audited: tuple[ProxyProcess, Path],
    client: str,
    user: str,
    decision: str,
) -> None:
    proxy, path = audited
    app = f"ew-notify-{decision}-{client}"
    got = run(client, pg, proxy.port, user, app, (
        "LISTEN invoice_events",
        f"NOTIFY invoice_events, '{PAYLOAD}'",
    ))  # fmt: skip
    assert "invoice_events" in got, got
    (event,) = [e for e in access_events(path, app) if e["kinds"] == ["notification"]]
    assert event["channel"] == "invoice_events" and event["decision"] == decision
    assert event["classification"] == ("unmasked" if user == ADMIN else "masked")
    assert event["subjects_complete"] is False
    text = path.read_text()
    assert "Notifycanary" not in text and "notifycanary" not in text
    # the payload may hold any customer's data: `who` lists it for every table
    assert touched(path, app, CUSTOMERS, "1") == ["possibly"]


@pytest.mark.parametrize("user", [ADMIN, HELPDESK])
def test_a_notification_on_a_channel_without_rules_is_not_recorded(
    pg: EmbeddedPostgres, audited: tuple[ProxyProcess, Path], user: str
) -> None:
    proxy, path = audited
    app = f"ew-notify-other-{user}"
    run_psycopg(pg, proxy.port, user, app, ("LISTEN other_channel", "NOTIFY other_channel, 'x'"))
    assert access_events(path, app) == []


def test_a_withheld_notification_is_recorded_but_not_listed(
    pg: EmbeddedPostgres, audited: tuple[ProxyProcess, Path]
) -> None:
    """A payload a masked listener cannot be shown masked (not JSON on a JSON channel) is
    withheld: its event says so, and `who` does not list what never reached the client."""
    proxy, path = audited
    app = "ew-notify-withheld"
    got = run_psycopg(pg, proxy.port, HELPDESK, app, (
        "LISTEN invoice_events",
        "NOTIFY invoice_events, 'Notifycanary is not json'",
    ))  # fmt: skip
    assert "NOTIFY" not in got
    (event,) = access_events(path, app)
    assert event["kinds"] == ["notification"] and event["decision"] == "withheld"
    assert touched(path, app, CUSTOMERS, "1") == []
    assert "Notifycanary" not in path.read_text()


# ---- the command line -----------------------------------------------------------------------


def test_the_who_command_prints_reads_through_views(
    pg: EmbeddedPostgres, audited: tuple[ProxyProcess, Path]
) -> None:
    """`pgveil audit who` itself, over the file: a read through a temporary view and one
    through a view the rules name are on the report for the table behind them."""
    proxy, path = audited
    app = "ew-cli"
    run_psycopg(pg, proxy.port, ADMIN, app, (
        "CREATE TEMP VIEW cli_v AS SELECT name FROM billing.customers",
        "SELECT name FROM cli_v",
        "SELECT i_customer, name FROM billing.customer_contacts WHERE i_customer = 1",
    ))  # fmt: skip
    out = subprocess.run(
        [sys.executable, "-m", "proxy.cli", "audit", "who", "--table", CUSTOMERS,
         "--subject", "1", "--file", str(path), "--json"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    mine = [r for r in map(json.loads, out.stdout.splitlines()) if r["application_name"] == app]
    assert [(r["touched"], r["kinds"]) for r in mine] == [
        ("possibly", ["select"]),
        ("yes", ["select"]),
    ]
