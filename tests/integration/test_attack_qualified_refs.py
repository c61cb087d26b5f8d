"""Attacks on qualified column references (`c.f`, `schema.table.f`), after the analyser
stopped counting `c.name` as a whole-row reference to `c` (rules/reads.py, names_referenced and
masking_subquery).

PostgreSQL reads `c.f` as `f(c)` when f is no column of c: a function of the whole row
(`c.to_json`, `c.row_to_json`). Masked sessions refuse a name that is no column pgveil knows,
unless the statement defines that name itself (`... AS to_json`), so the cases below carry
such an alias.

* `LEAKS`: statements a masked role (`helpdesk`) sends through pgveil; nothing received may
  contain a secret. They all leak directly against PostgreSQL (`test_leak_case_leaks_directly`).
* `GUARDS`: the same tricks in positions pgveil handles; they must keep working masked.
* Audit: an unmasked role (`billing_admin`) reads raw values; the access event's
  `columns_raw` must list every personal column the statement read.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import psycopg
import pytest

from proxy.demo.embedded_pg import EmbeddedPostgres
from tests.integration.attack_clients import PsycopgClient
from tests.integration.masking_fixture import ADMIN, ADMIN_PW, EMAIL, NAME, dsn, leaks
from tests.integration.test_audit_events import Audited, audited
from tests.support import ProxyProcess

__all__ = ["audited"]  # the fixture, for this module

C1 = "WHERE i_customer = 1"
MASKED_NAME = "Z*****************t"  # helpdesk's view of customer 1's name (partial)
MASKED_EMAIL = "z***************@canary-mail.example"
REFUSED = "pgveil:"


@dataclass(frozen=True)
class Case:
    id: str
    sql: tuple[str, ...]
    expect: str = ""  # a guard's answer must contain this (the trick ran, masked or refused)


def _tx(*statements: str) -> tuple[str, ...]:
    return ("BEGIN", *statements, "ROLLBACK")


# ---- leaks: the write target is never replaced by a masking subquery, and personal_ref()
# only knows `c.<personal column>`, a lone `c` and `c.*`: `c.f` with f no column is f(c)
LEAKS: list[Case] = [
    Case(
        "update_returning_alias_to_json",
        _tx(
            f"UPDATE billing.customers c SET balance = balance {C1} RETURNING c.to_json AS to_json"
        ),
    ),
    Case(
        "update_returning_relname_row_to_json",
        _tx(
            f"UPDATE billing.customers SET balance = balance {C1} "
            "RETURNING customers.row_to_json AS row_to_json"
        ),
    ),
    Case(
        "update_returning_schema_qualified_3_part",
        _tx(
            f"UPDATE billing.customers SET balance = balance {C1} "
            "RETURNING billing.customers.to_json AS to_json"
        ),
    ),
    Case(
        "delete_returning_alias_to_json",
        _tx("DELETE FROM billing.accounts a WHERE i_account = 10 RETURNING a.to_json AS to_json"),
    ),
    Case(
        "insert_on_conflict_returning_existing_row",
        _tx(
            "INSERT INTO billing.customers AS c (i_customer, name) VALUES (1, 'x') "
            "ON CONFLICT (i_customer) DO UPDATE SET balance = c.balance "
            "RETURNING c.to_jsonb AS to_jsonb"
        ),
    ),
    Case(
        "writable_cte_returning_to_json",
        (
            "WITH u AS (UPDATE billing.customers c SET balance = balance "
            f"{C1} RETURNING c.to_json AS to_json) SELECT to_json::text FROM u",
        ),
    ),
    Case(
        "update_copies_whole_row_into_unmasked_column",
        _tx(
            f"UPDATE billing.customers c SET notes = c.to_json::text {C1} RETURNING 1 AS to_json",
            f"SELECT notes FROM billing.customers {C1}",
        ),
    ),
]

GUARDS: list[Case] = [
    Case(
        "select_alias_to_json",
        (f"SELECT c.to_json AS to_json FROM billing.customers c {C1}",),
        MASKED_NAME,
    ),
    Case(
        "select_relname_to_json",
        (f"SELECT customers.to_json AS to_json FROM billing.customers {C1}",),
        MASKED_NAME,
    ),
    Case(
        "select_schema_qualified_3_part_to_json",
        (f"SELECT billing.customers.to_json AS to_json FROM billing.customers {C1}",),
        MASKED_NAME,
    ),
    Case(
        "select_only_relname_to_json",
        (f"SELECT customers.to_json AS to_json FROM ONLY billing.customers {C1}",),
        MASKED_NAME,
    ),
    Case(
        "lateral_to_json_of_outer_row",
        (
            "SELECT s.to_json FROM billing.customers c, "
            "LATERAL (SELECT c.to_json AS to_json) s WHERE c.i_customer = 1",
        ),
        MASKED_NAME,
    ),
    Case(
        "correlated_subquery_to_json",
        (
            "SELECT (SELECT c.to_json AS to_json FROM billing.customer_classes k LIMIT 1) "
            "FROM billing.customers c WHERE c.i_customer = 1",
        ),
        MASKED_NAME,
    ),
    Case(
        "cte_to_json",
        (
            f"WITH w AS (SELECT c.to_json AS to_json FROM billing.customers c {C1}) "
            "SELECT to_json FROM w",
        ),
        MASKED_NAME,
    ),
    Case(
        "composite_field_and_qualified_column",
        (f"SELECT (c).name, c.email FROM billing.customers c {C1}",),
        MASKED_EMAIL,
    ),
    Case(
        "inner_alias_shadows_protected_alias",
        (
            "SELECT c.name, (SELECT c.name FROM billing.customer_classes c LIMIT 1) "
            f"FROM billing.customers c {C1}",
        ),
        MASKED_NAME,
    ),
    Case(
        "column_alias_list_qualified",
        ("SELECT c.n FROM billing.customers c(i, k, n) WHERE i = 1",),
        MASKED_NAME,
    ),
    Case(
        "insert_select_whole_row_returning_name_refused",
        _tx(
            "INSERT INTO billing.customer_classes (i_customer_class, name) "
            "SELECT 100, c.to_json::text FROM billing.customers c WHERE c.i_customer = 1 "
            "RETURNING name AS to_json",
        ),
        REFUSED,
    ),
    Case(
        "insert_select_whole_row_refused",
        _tx(
            "INSERT INTO billing.customer_classes (i_customer_class, name) "
            "SELECT 100, c.to_json::text FROM billing.customers c WHERE c.i_customer = 1 "
            "RETURNING i_customer_class AS to_json",
            "SELECT name FROM billing.customer_classes WHERE i_customer_class = 100",
        ),
        REFUSED,
    ),
    Case(
        "update_returning_qualified_personal_column",
        _tx(f"UPDATE billing.customers c SET balance = balance {C1} RETURNING c.name"),
        MASKED_NAME,
    ),
    Case(
        "update_returning_composite_field_refused",
        _tx(f"UPDATE billing.customers c SET balance = balance {C1} RETURNING (c).name"),
        REFUSED,
    ),
    Case(
        "update_returning_unknown_function_refused",
        _tx(f"UPDATE billing.customers c SET balance = balance {C1} RETURNING c.to_json"),
        REFUSED,
    ),
]


@pytest.fixture(scope="module")
def sessions(
    pg: EmbeddedPostgres, billing: ProxyProcess
) -> Iterator[tuple[PsycopgClient, PsycopgClient]]:
    via = PsycopgClient(dsn(pg, billing.port))
    direct = PsycopgClient(dsn(pg, pg.port))
    try:
        yield via, direct
    finally:
        via.close()
        direct.close()


def test_cases_do_not_carry_secrets() -> None:
    ids = [c.id for c in LEAKS + GUARDS]
    assert len(ids) == len(set(ids))
    assert leaks("\n".join(s for c in LEAKS + GUARDS for s in c.sql)) == []


@pytest.mark.parametrize("case", LEAKS, ids=[c.id for c in LEAKS])
def test_leak_case_does_not_leak_through_pgveil(
    sessions: tuple[PsycopgClient, PsycopgClient], case: Case
) -> None:
    received = sessions[0].run(case.sql)
    assert leaks(received) == [], f"{case.id} leaked through pgveil:\n{received[:1500]}"


@pytest.mark.parametrize("case", LEAKS + GUARDS, ids=[c.id for c in LEAKS + GUARDS])
def test_case_leaks_directly(sessions: tuple[PsycopgClient, PsycopgClient], case: Case) -> None:
    received = sessions[1].run(case.sql)
    assert leaks(received) != [], f"{case.id} does not leak directly:\n{received[:1500]}"


@pytest.mark.parametrize("case", GUARDS, ids=[c.id for c in GUARDS])
def test_guard_case_is_masked(sessions: tuple[PsycopgClient, PsycopgClient], case: Case) -> None:
    received = sessions[0].run(case.sql)
    assert leaks(received) == [], f"{case.id} leaked through pgveil:\n{received[:1500]}"
    assert case.expect in received, f"{case.id}: unexpected answer\n{received[:1500]}"


def test_update_where_whole_row_is_no_oracle(
    sessions: tuple[PsycopgClient, PsycopgClient],
) -> None:
    """The WHERE of a write sees the target's personal columns masked; its whole row via
    c.to_json must not answer a guess either (one row for the right guess, none otherwise)."""
    guess = (
        "UPDATE billing.customers c SET balance = balance "
        "WHERE c.to_json ->> 'name' = '{}' RETURNING i_customer AS to_json"
    )
    right = sessions[0].run(_tx(guess.format(NAME)))
    wrong = sessions[0].run(_tx(guess.format("Somebody Else")))
    assert right == wrong, f"the row count answers the guess: {right!r} vs {wrong!r}"


# ---- audit: what an unmasked role read raw must be listed --------------------------------

PERSONAL = ("cc_number", "email", "extra", "login", "name", "phone")


def _admin_event(pg: EmbeddedPostgres, log: Audited, sql: str) -> tuple[str, dict[str, Any]]:
    log.new_events()
    with psycopg.connect(dsn(pg, log.proxy.port, ADMIN, ADMIN_PW), autocommit=True) as c:
        rows = repr(c.execute(sql).fetchall())
    (event,) = log.new_events(ADMIN, 1)
    return rows, event


AUDIT_UNDER: list[tuple[str, str, tuple[str, ...]]] = [
    (
        # the column alias list swaps the names: c.name is the e-mail column
        "alias_list_qualified_renamed_column",
        "SELECT c.name FROM billing.customers c(i_customer, i_customer_class, x, name) "
        "WHERE i_customer = 1",
        ("email",),
    ),
    (
        "alias_list_unqualified_renamed_column",
        "SELECT n FROM billing.customers AS c(i, k, n) WHERE i = 1",
        ("name",),
    ),
    (
        "join_alias_whole_row_function",
        "SELECT j.to_json FROM (billing.customers c CROSS JOIN billing.customer_classes k) "
        "AS j WHERE j.i_customer = 1",
        ("email", "phone", "login"),
    ),
    (
        "join_alias_whole_row",
        "SELECT row_to_json(j) FROM (billing.customers c CROSS JOIN billing.customer_classes k) "
        "AS j WHERE j.i_customer = 1",
        ("email", "phone", "login"),
    ),
    (
        "update_returning_whole_row_function",
        f"UPDATE billing.customers c SET balance = balance {C1} RETURNING c.to_json",
        PERSONAL,
    ),
]

AUDIT_OK: list[tuple[str, str, tuple[str, ...]]] = [
    ("qualified_column", f"SELECT c.name FROM billing.customers c {C1}", ("name",)),
    ("alias_whole_row_function", f"SELECT c.to_json FROM billing.customers c {C1}", PERSONAL),
    (
        "relname_whole_row_function",
        f"SELECT customers.to_json FROM billing.customers {C1}",
        PERSONAL,
    ),
    (
        "schema_qualified_whole_row_function",
        f"SELECT billing.customers.to_json FROM billing.customers {C1}",
        PERSONAL,
    ),
    (
        "alias_list_renamed_qualified",
        "SELECT c.n FROM billing.customers c(i, k, n) WHERE i = 1",
        ("name",),
    ),
    (
        "update_returning_column",
        f"UPDATE billing.customers c SET balance = balance {C1} RETURNING c.email",
        ("email",),
    ),
]


def _check_audit(pg: EmbeddedPostgres, log: Audited, sql: str, read: tuple[str, ...]) -> None:
    rows, event = _admin_event(pg, log, sql)
    # the answer proves the raw read: customer 1's canaries are in it
    assert NAME in rows or EMAIL in rows, rows
    missing = [c for c in read if f"billing.customers.{c}" not in event["columns_raw"]]
    assert missing == [], f"read raw but not in columns_raw {event['columns_raw']}: {missing}"


@pytest.mark.parametrize(
    ("sql", "read"), [c[1:] for c in AUDIT_UNDER], ids=[c[0] for c in AUDIT_UNDER]
)
def test_audit_lists_columns_read_raw(
    pg: EmbeddedPostgres,
    audited: Audited,
    sql: str,
    read: tuple[str, ...],
) -> None:
    _check_audit(pg, audited, sql, read)


@pytest.mark.parametrize(("sql", "read"), [c[1:] for c in AUDIT_OK], ids=[c[0] for c in AUDIT_OK])
def test_audit_lists_columns_read_raw_guard(
    pg: EmbeddedPostgres,
    audited: Audited,
    sql: str,
    read: tuple[str, ...],
) -> None:
    _check_audit(pg, audited, sql, read)
