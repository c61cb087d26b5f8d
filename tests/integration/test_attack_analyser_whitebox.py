"""White-box attacks on the masked-session analyser, which must be closed by construction:
what the grammar table and the handlers would miss.

Every case is SQL the masked role `helpdesk` sends; nothing any client receives through pgveil
(rows, errors, notices, reported parameters) may contain a secret (`leaks()`). Each case is
proven to leak when the same statements are sent to PostgreSQL directly as `helpdesk`: a case
that does not leak directly proves nothing.

* `LEAKS`: bypasses found by reading the analyser. Each carries a note naming the code path.
  They run through psql (simple protocol, script), psycopg (simple protocol, text) and asyncpg
  (extended protocol, binary): the pass-through path forwards the client's own bytes, so the
  protocol matters.
* `GUARDS`: the same tricks in positions pgveil does handle; they must keep not leaking.
* Server-side code reached without a function call (casts, domain checks, operators named
  like built-ins) is a rules problem that closes the database's masked sessions: see
  test_hidden_code.py and the position corpus.
* `test_unknown_relation_window`: the session's own temporary-relation names let a relation
  created after pgveil read the catalog (a new partition of a protected table) through,
  unmasked, on a pgveil whose catalog refresh has not come yet.

Admin-side objects (a function, views, an inheritance parent; all named atk_wb_*) are created as the superuser before this module's pgveil reads the
catalog, and removed afterwards."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from dataclasses import dataclass

import psycopg
import pytest

from proxy.demo.embedded_pg import EmbeddedPostgres
from tests.integration.attack_clients import AsyncpgClient, PsycopgClient, run_psql
from tests.integration.masking_fixture import (
    HASH_KEY,
    NAME,
    PHONE,
    dsn,
    leaks,
    masking_proxy,
)
from tests.support import ProxyProcess

C1 = "WHERE i_customer = 1"
# psql prints no ParameterStatus, and a ROLLBACK takes the setting back: ask for it before
SHOW_APP = "SHOW application_name"
REFUSED = "pgveil:"

ADMIN_TEARDOWN = """
DO $$ BEGIN
    ALTER TABLE billing.accounts NO INHERIT public.atk_wb_net;
EXCEPTION WHEN others THEN NULL;
END $$;
DROP TABLE IF EXISTS public.atk_wb_net;
DROP VIEW IF EXISTS billing.atk_wb_account_owner, billing.atk_wb_leak_view,
    billing.atk_wb_renamed;
DROP FUNCTION IF EXISTS billing.atk_wb_contact(bigint);
"""

# An administrator's objects. None of the functions is on the rules' allow-list
# (functions.allow: [billing.invoice_total]), so a masked role calling one by name is refused.
ADMIN_SETUP = """
CREATE FUNCTION billing.atk_wb_contact(bigint) RETURNS text LANGUAGE sql STABLE
    AS $$ SELECT name || ' ' || email FROM billing.customers WHERE i_customer = $1 $$;
CREATE VIEW billing.atk_wb_account_owner AS
    SELECT a.i_account,
           (SELECT c.name FROM billing.customers c WHERE c.i_customer = a.i_customer) AS owner,
           (SELECT c.email FROM billing.customers c WHERE c.i_customer = a.i_customer)
               AS owner_email
      FROM billing.accounts a;
CREATE VIEW billing.atk_wb_leak_view AS SELECT n FROM billing.leak() AS n;
CREATE VIEW billing.atk_wb_renamed AS
    SELECT c.i, c.n, c.e FROM billing.customers AS c(i, k, n, e);
CREATE TABLE public.atk_wb_net (ip inet, mac macaddr);
ALTER TABLE billing.accounts INHERIT public.atk_wb_net;
GRANT SELECT ON billing.atk_wb_account_owner, billing.atk_wb_leak_view, billing.atk_wb_renamed,
    public.atk_wb_net TO helpdesk;
"""

# another session (of the superuser) whose last statement holds a personal value
ACTIVITY = f"SELECT '{NAME}' AS atk_wb_activity"
PHONE_LOGIN = "' ' || c.phone || c.login"


@dataclass(frozen=True)
class Case:
    id: str
    sql: tuple[str, ...]
    note: str = ""
    # a guard's answer through pgveil must contain one of these (the trick ran, was masked,
    # or was refused)
    expect: tuple[str, ...] = ()


def _tx(*statements: str) -> tuple[str, ...]:
    return ("BEGIN", *statements, "ROLLBACK")


def _announce(expr: str) -> str:
    """An expression that puts `expr` into application_name (a ParameterStatus the client
    receives) and is itself 0."""
    return f"length(pg_catalog.set_config('application_name', {expr}, false)) * 0"


LEAKS: list[Case] = [
    # ---- PostgreSQL 18 grammar (pglast) vs the PostgreSQL 15 server ---------------------------
    Case(
        "system_user_update_returning_whole_row",
        _tx(
            'UPDATE billing.customers AS "system_user" SET balance = balance '
            f"{C1} RETURNING system_user::text"
        ),
        note="SYSTEM_USER is a reserved keyword since PostgreSQL 16: pglast reads a call of "
        "pg_catalog.system_user() (FuncCall, COERCE_SQL_SYNTAX; grammar.FuncCall has since=0) "
        "while PostgreSQL 15 reads the identifier system_user: the write target's alias, a "
        "whole-row reference to the raw row. Nothing is rewritten (Analyzer.analyze: "
        "changed=False), so pgveil forwards the client's own text to the server "
        "(masked.py _query/_parse, action 'pass'); personal_ref() never sees a ColumnRef",
    ),
    Case(
        "system_user_update_copies_row_into_notes",
        _tx(
            f'UPDATE billing.customers AS "system_user" SET notes = system_user::text {C1}',
            f"SELECT notes FROM billing.customers {C1}",
        ),
        note="the same in a SET value: refers_to_personal() finds no ColumnRef, the raw row "
        "(cc_number, the hash-masked login included) is stored in the unmasked column notes",
    ),
    Case(
        "system_user_delete_returning",
        _tx(
            'DELETE FROM billing.accounts AS "system_user" WHERE i_account = 10 '
            "RETURNING system_user::text"
        ),
        note="DELETE ... RETURNING: the same pass-through",
    ),
    Case(
        "system_user_on_conflict_returning",
        _tx(
            'INSERT INTO billing.customers AS "system_user" (i_customer, name) '
            "VALUES (1, 'x') ON CONFLICT (i_customer) DO UPDATE "
            'SET balance = "system_user".balance RETURNING system_user::text'
        ),
        note="INSERT ... ON CONFLICT DO UPDATE ... RETURNING: the existing row, raw",
    ),
    # ---- user expressions moved inside pgveil's own masking subquery -------------------------
    Case(
        "tablesample_arg_reads_update_target_returning",
        _tx(
            f"UPDATE billing.customers c SET balance = balance {C1} RETURNING "
            "(SELECT count(*) FROM billing.xdrs TABLESAMPLE BERNOULLI "
            f"({_announce('c.name || c.email')}))",
            SHOW_APP,
        ),
        note="ReadRewrite.masking_subquery(sample=...) moves the client's RangeTableSample "
        "(its args and REPEATABLE) inside pgveil's masking subquery, whose id is in "
        "`generated`; Rewriter.mask_target_refs skips generated subtrees, so c.name there is "
        "the write target's raw column (TABLESAMPLE arguments may reference outer rows)",
    ),
    Case(
        "tablesample_arg_reads_update_target_where",
        _tx(
            f"UPDATE billing.customers c SET balance = balance {C1} AND EXISTS "
            "(SELECT FROM billing.xdrs TABLESAMPLE BERNOULLI "
            f"({_announce(PHONE_LOGIN)}))",
            SHOW_APP,
        ),
        note="the same in UPDATE ... WHERE (target_exprs -> mask_target_refs); the hash-masked "
        "login comes out raw",
    ),
    Case(
        "tablesample_repeatable_reads_on_conflict_target",
        _tx(
            "INSERT INTO billing.customers AS t (i_customer, name) VALUES (1, 'x') "
            "ON CONFLICT (i_customer) DO UPDATE SET balance = t.balance "
            "WHERE (SELECT count(*) FROM billing.accounts TABLESAMPLE SYSTEM (0) "
            f"REPEATABLE ({_announce('t.email')})) = 0 RETURNING i_customer",
            SHOW_APP,
        ),
        note="ON CONFLICT DO UPDATE ... WHERE, through REPEATABLE (...)",
    ),
    # ---- attribute notation on an expression: (x).f is f(x) ----------------------------------
    Case(
        "attribute_notation_ts_stat_runs_sql_text",
        (
            "SELECT ('SELECT to_tsvector(''simple'', name || '' '' || email || '' '' || "
            "cc_number) FROM billing.customers'::text).ts_stat",
        ),
        note="A_Indirection(arg, [String f]) is f(arg) to PostgreSQL (ParseFuncOrColumn from "
        "transformIndirection), but grammar.A_Indirection has no handler: the String is "
        "walked as a constant, check_function() never runs, so the denied ts_stat(text) runs "
        "the SQL text it is given (any column, cc_number included)",
    ),
    Case(
        "attribute_notation_backend_activity",
        ("SELECT (s).pg_stat_get_backend_activity AS q FROM pg_stat_get_backend_idset() AS s",),
        note="the denied pg_stat_get_backend_activity(int) through (x).f: other sessions' "
        "statement text (also pgveil's rewritten text of other masked sessions, with the "
        "hash mask's HMAC pads in it)",
    ),
    Case(
        "field_notation_denied_function_with_own_alias",
        (
            "SELECT q.ts_stat AS ts_stat FROM pg_catalog.btrim('SELECT to_tsvector(''simple'', "
            "name || '' '' || email) FROM billing.customers') AS q",
        ),
        note="q.f on a scalar function's range variable is f(q): column_ref() checks f only "
        "when it is a user function's name, and lets any other name through when the "
        "statement defines it (names_defined: `AS ts_stat`); DENIED_FUNCTIONS is never "
        "consulted for t.f",
    ),
    Case(
        "attribute_notation_unlisted_user_function",
        ("SET search_path = billing, public", "SELECT (1::bigint).atk_wb_contact AS c"),
        note="an administrator's function that is not on the allow-list, called as (x).f",
    ),
    # ---- views and inheritance --------------------------------------------------------------
    Case(
        "view_scalar_subquery_column_not_derived",
        ("SELECT owner, owner_email FROM billing.atk_wb_account_owner",),
        note="rules.views._personal_refs resolves c.name inside a scalar subquery against "
        "the outer FROM only (c is not a source there): the view column gets no mask and the "
        "masking subquery selects it raw",
    ),
    Case(
        "view_column_alias_list_not_derived",
        ("SELECT n, e FROM billing.atk_wb_renamed",),
        note="rules.views: the view reads billing.customers AS c(i, k, n, e); "
        "_personal_refs looks c.n up by its new name n among the table's masks and finds "
        "none, so the view columns n and e (name and email) are selected raw",
    ),
    Case(
        "view_over_unlisted_function",
        ("SELECT n FROM billing.atk_wb_leak_view",),
        note="VIEW_SOURCES_SQL follows pg_depend to pg_class only: a view over a function "
        "(billing.leak(), not allowed for masked roles) reads nothing protected to pgveil",
    ),
    Case(
        "inheritance_parent_of_protected_table",
        ("SELECT host(ip), mac::text FROM public.atk_wb_net",),
        note="rules protect a table's partitions and children (ProtectionMap walks "
        "rel.parents) but not its parents: SELECT from an inheritance parent returns the "
        "protected child's rows, unmasked",
    ),
]

GUARDS: list[Case] = [
    Case(
        "system_user_select_is_rewritten",
        (f'SELECT system_user::text FROM billing.customers AS "system_user" {C1}',),
        note='a SELECT is always rewritten; pglast prints pg_catalog."system_user"(), '
        "which PostgreSQL 15 does not have",
        expect=("system_user", REFUSED),
    ),
    Case(
        "system_user_returning_pinned_call_is_rewritten",
        _tx(
            'UPDATE billing.customers AS "system_user" SET balance = balance '
            f"{C1} RETURNING to_json(system_user)"
        ),
        note="pin_builtin() rewrites to_json to pg_catalog.to_json: the statement is "
        "printed by pglast and SYSTEM_USER with it",
        expect=("system_user", REFUSED),
    ),
    Case(
        "tablesample_select_outer_row_is_masked",
        _tx(
            "SELECT (SELECT count(*) FROM billing.xdrs TABLESAMPLE BERNOULLI "
            f"({_announce('c.name || c.email')})) FROM billing.customers c "
            "WHERE c.i_customer = 1",
            SHOW_APP,
        ),
        note="in a SELECT the outer row is itself a masking subquery",
        expect=("Z*****************t", REFUSED),
    ),
    Case(
        "tablesample_update_set_value_is_refused",
        _tx(
            "UPDATE billing.customers c SET notes = (SELECT count(*) FROM billing.xdrs "
            f"TABLESAMPLE BERNOULLI ({_announce('c.name || c.email')}))::text "
            "WHERE c.i_customer = 1",
            SHOW_APP,
        ),
        note="refers_to_personal() walks the value before the read rewrite",
        expect=(REFUSED,),
    ),
    Case(
        "shape_cache_set_config_literal_is_reanalysed",
        (
            "SELECT set_config('application_name', 'x', false) /* atk_wb_shape_1 */",
            "SELECT set_config('standard_conforming_strings', 'off', false) /* atk_wb_shape_1 */",
            "SELECT 'x\\', ' || name || email FROM billing.customers --'",
        ),
        note="check_set_config refuses a placeholder setting name, so the shape falls back "
        "to analysing each text as sent",
        expect=(REFUSED,),
    ),
]

CLIENTS = ("psql", "psycopg", "asyncpg")


@dataclass
class Sessions:
    pg: EmbeddedPostgres
    proxy: ProxyProcess
    psycopg: PsycopgClient
    asyncpg: AsyncpgClient
    direct: PsycopgClient

    def run(self, client: str, statements: tuple[str, ...]) -> str:
        if client == "psql":
            return run_psql(self.pg, self.proxy.port, statements)
        if client == "psycopg":
            return self.psycopg.run(statements)
        if client == "asyncpg":
            return self.asyncpg.run(statements)
        assert client == "direct"
        return self.direct.run(statements)


@pytest.fixture(scope="module")
def sessions(pg: EmbeddedPostgres, billing: ProxyProcess) -> Iterator[Sessions]:
    """The admin's objects, then a pgveil of its own (its catalog is read at the first masked
    login, after the objects exist), and an idle session whose last query holds a value."""
    pg.psql(ADMIN_TEARDOWN)
    pg.psql(ADMIN_SETUP)
    proxy = masking_proxy(pg, billing.rules_path, metrics=False)  # type: ignore[attr-defined]
    other = psycopg.connect(pg.dsn() + " sslmode=disable", autocommit=True)
    other.execute(ACTIVITY)
    loop = asyncio.new_event_loop()
    s = Sessions(
        pg=pg,
        proxy=proxy,
        psycopg=PsycopgClient(dsn(pg, proxy.port)),
        asyncpg=AsyncpgClient(proxy.port, loop),
        direct=PsycopgClient(
            dsn(pg, pg.port), reset_sql=("ROLLBACK", "DISCARD ALL", "RESET client_encoding")
        ),
    )
    try:
        yield s
    finally:
        s.psycopg.close()
        s.asyncpg.close()
        s.direct.close()
        loop.close()
        other.close()
        proxy.stop()
        pg.psql(ADMIN_TEARDOWN)


def test_cases_are_well_formed() -> None:
    ids = [c.id for c in LEAKS + GUARDS]
    assert len(ids) == len(set(ids))
    assert all(c.expect for c in GUARDS) and all(c.note for c in LEAKS)
    # the statements themselves must not carry a secret, or every client "leaks" it
    assert leaks("\n".join(s for c in LEAKS + GUARDS for s in c.sql)) == []
    assert HASH_KEY not in "\n".join(s for c in LEAKS + GUARDS for s in c.sql)


@pytest.mark.parametrize(
    ("case", "client"),
    [(c, client) for c in LEAKS for client in CLIENTS],
    ids=[f"{c.id}-{client}" for c in LEAKS for client in CLIENTS],
)
def test_no_leak_through_pgveil(sessions: Sessions, case: Case, client: str) -> None:
    received = sessions.run(client, case.sql)
    assert leaks(received) == [], (
        f"{case.id} via {client} leaked ({case.note}); received:\n{received[:3000]}"
    )


@pytest.mark.parametrize("case", LEAKS + GUARDS, ids=[c.id for c in LEAKS + GUARDS])
def test_case_leaks_directly(sessions: Sessions, case: Case) -> None:
    received = sessions.run("direct", case.sql)
    assert leaks(received) != [], f"{case.id} does not leak directly:\n{received[:3000]}"


@pytest.mark.parametrize(
    ("case", "client"),
    [(c, client) for c in GUARDS for client in CLIENTS],
    ids=[f"{c.id}-{client}" for c in GUARDS for client in CLIENTS],
)
def test_guard_holds(sessions: Sessions, case: Case, client: str) -> None:
    received = sessions.run(client, case.sql)
    assert leaks(received) == [], f"{case.id} via {client} leaked:\n{received[:3000]}"
    assert any(e in received for e in case.expect), (
        f"{case.id} via {client}: unexpected answer\n{received[:3000]}"
    )


# ---- relations created after pgveil read the catalog -------------------------------------------

LATE = "atk_wb_xdrs_late"  # a partition of billing.xdrs an admin adds while sessions are open
LATE_SYSTEM_NAME = "pg_seclabels"  # another one, named like a pg_catalog view

WINDOW_VARIANTS: dict[str, tuple[tuple[str, ...], str]] = {
    # the name is registered as the session's temporary relation when the CREATE is analysed
    # (MaskedFilter._analyse: temp_relations.update), whether or not it then succeeds
    "rolled_back_create_temp": (
        (
            "BEGIN",
            f"CREATE TEMP TABLE {LATE} (x int)",
            "ROLLBACK",
            "SET search_path = billing",
            f"SELECT cli FROM {LATE}",
        ),
        "",
    ),
    # and DROP TABLE / DISCARD never take it back
    "dropped_temp": (
        (
            f"CREATE TEMP TABLE {LATE} (x int)",
            f"DROP TABLE {LATE}",
            "SET search_path = billing",
            f"SELECT cli FROM {LATE}",
        ),
        "",
    ),
    # variable_set() keeps pg_temp first in search_path; set_config() does not
    "set_config_pg_temp_last": (
        (
            f"CREATE TEMP TABLE {LATE} (x int)",
            "SELECT set_config('search_path', 'billing, pg_temp', false)",
            f"SELECT cli FROM {LATE}",
        ),
        "",
    ),
    # nor does a SET whose literals were replaced by placeholders: the shape of a harmless
    # SET is analysed once (no string constants left to check) and reused for this one
    "cached_shape_pg_temp_last": (
        (
            f"CREATE TEMP TABLE {LATE} (x int)",
            "SET search_path = 'public', 'billing' /* atk_wb_shape_2 */",
            "SET search_path = 'billing', 'pg_temp' /* atk_wb_shape_2 */",
            f"SELECT cli FROM {LATE}",
        ),
        "",
    ),
    # ReadRewrite.note_unknown never reports an unqualified name that a pg_catalog relation
    # has, although search_path may put pg_catalog after the schema that now holds one
    "system_relation_name": (
        ("SET search_path = billing, pg_catalog", f"SELECT cli FROM {LATE_SYSTEM_NAME}"),
        "",
    ),
    # nor does the startup packet (startup_refusal only looks for role settings)
    "startup_options_pg_temp_last": (
        (f"CREATE TEMP TABLE {LATE} (x int)", f"SELECT cli FROM {LATE}"),
        " options='-c search_path=billing,pg_temp'",
    ),
}


@pytest.fixture
def late_partition(pg: EmbeddedPostgres, billing: ProxyProcess) -> Iterator[ProxyProcess]:
    """A pgveil that has read the catalog, then two partitions of billing.xdrs added by the
    admin (granted to helpdesk, each holding a phone number in cli). The refresh interval is long, so
    only a statement that names an unknown relation makes pgveil read the catalog again."""
    env = {"PGVEIL_TEST_HASH_KEY": HASH_KEY, "PGVEIL_CATALOG_PASSWORD": pg.password}
    proxy = ProxyProcess(
        pg.port,
        "--upstream-sslmode", "disable",
        "--rules", str(billing.rules_path),  # type: ignore[attr-defined]
        "--catalog-user", pg.superuser,
        "--catalog-refresh", "3600",
        metrics=False,
        env=env,
    )  # fmt: skip
    try:
        with psycopg.connect(dsn(pg, proxy.port), autocommit=True) as c:
            c.execute("SELECT 1")  # a masked login: the catalog is read now
        pg.psql(
            f"CREATE TABLE billing.{LATE} PARTITION OF billing.xdrs "
            "FOR VALUES FROM (2000000) TO (3000000);"
            f"CREATE TABLE billing.{LATE_SYSTEM_NAME} PARTITION OF billing.xdrs "
            "FOR VALUES FROM (3000000) TO (4000000);"
            f"GRANT SELECT ON billing.{LATE}, billing.{LATE_SYSTEM_NAME} TO helpdesk;"
            "INSERT INTO billing.xdrs (i_xdr, i_account, cli, cld, charged) "
            f"VALUES (2000001, 10, '{PHONE}', '+18005550100', 1), "
            f"(3000001, 10, '{PHONE}', '+18005550100', 1);"
        )
        yield proxy
    finally:
        proxy.stop()
        pg.psql(f"DROP TABLE IF EXISTS billing.{LATE}, billing.{LATE_SYSTEM_NAME}")


@pytest.mark.parametrize("variant", list(WINDOW_VARIANTS))
def test_unknown_relation_window(
    pg: EmbeddedPostgres, late_partition: ProxyProcess, variant: str
) -> None:
    """A relation the catalog does not know yet must be refused ('not known to pgveil yet')
    until the catalog is read again. MaskedFilter._analyse exempts the names of the session's
    own temporary relations by name only: a name that is no temporary relation (any more),
    or one that search_path lets a permanent relation win, reads the new partition raw."""
    statements, options = WINDOW_VARIANTS[variant]
    direct = PsycopgClient(
        dsn(pg, pg.port) + options, reset_sql=("ROLLBACK", "DISCARD ALL", "RESET client_encoding")
    )
    via = PsycopgClient(dsn(pg, late_partition.port) + options)
    try:
        assert leaks(direct.run(statements)) != [], f"{variant} does not leak directly"
        received = via.run(statements)
    finally:
        direct.close()
        via.close()
    assert leaks(received) == [], f"{variant} read the new partition raw:\n{received[:2000]}"
