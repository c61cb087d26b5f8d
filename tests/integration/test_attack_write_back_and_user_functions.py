"""Masked sessions cannot copy personal data out through writes or reach it through
functions pgveil does not check: the write-back of a masked column (UPDATE ... SET, INSERT
... SELECT, RETURNING, jsonb subscripts) used as a copy channel, pgveil's hash key carried
by the write-back CASE, user functions reached without a checked function call (a
procedure with an INOUT argument, a computed field `c.contact_of`), and the WHERE clause of
COPY ... FROM STDIN, an expression where denied functions would otherwise run.

SQL cases run through pgveil (psycopg, simple protocol) and must not leak; each must leak when
run directly against PostgreSQL as `helpdesk` (`direct` overrides the statements for the
direct run). `key_only` cases leak pgveil's hash key, which cannot leak directly.

The procedure and the computed-field function are created directly as the superuser and
removed again.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import psycopg
import pytest

from proxy.demo.embedded_pg import EmbeddedPostgres
from tests.integration.attack_clients import PsycopgClient
from tests.integration.masking_fixture import (
    HASH_KEY,
    HELPDESK,
    HELPDESK_PW,
    dsn,
    leaks,
    leaks_or_hash_key,
)
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
    # ---- masked or refused by pgveil, each leaks directly -----------------------------------
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
        assert leaks_or_hash_key("\n".join(c.sql + (c.direct or ()))) == [], c.id
    assert HASH_KEY not in "\n".join(s for c in CASES for s in c.sql)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_no_case_leaks_through_pgveil(
    sessions: tuple[PsycopgClient, PsycopgClient], case: Case
) -> None:
    received = sessions[0].run(case.sql)
    assert leaks_or_hash_key(received) == [], f"{case.id} leaked through pgveil:\n{received[:3000]}"


@pytest.mark.parametrize(
    "case", [c for c in CASES if not c.key_only], ids=[c.id for c in CASES if not c.key_only]
)
def test_each_case_leaks_directly(
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


def test_proxy_survives(billing: ProxyProcess) -> None:
    assert billing.alive()
