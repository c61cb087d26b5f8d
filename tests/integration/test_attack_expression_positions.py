"""Attack corpus by expression position: every place in a statement where PostgreSQL evaluates
an expression (or runs code) is a way for a masked role to read personal data.

Each case puts a read of personal data into one grammar position: an assignment subscript,
a partition bound, a column default, a window frame offset, a TABLESAMPLE argument, a CALL
argument, ... Each runs

* directly against PostgreSQL as the masked role `helpdesk`, where it MUST leak (else the
  case proves nothing and fails as broken);
* through pgveil with psql, psycopg and asyncpg (`attack_clients`), where nothing any client
  receives may contain a secret (`leaks()`), and where pgveil's answer must be the one the
  case expects: `Refused(reason)` (SQLSTATE 42501 and a message `pgveil: ...` that names the
  reason) or `Masked(text)` (the statement ran on masked data: `text`, the masked value, is
  what came back). The expectation keeps a case from passing because of some unrelated
  failure.

How the secret reaches the client directly, by position:

* where subqueries may stand, `SPY` reads customer 1's name in a subquery and stores it in
  a custom setting (`set_config('atk.v', ...)`); `SEEN` reads it back. Through pgveil the
  subquery reads the masked name, and `SEEN` shows the mask (`Masked`).
* where PostgreSQL allows no subquery (defaults, checks, generated columns, partition bounds
  and keys, index predicates, CALL and EXECUTE arguments, COPY FROM WHERE), the read is user
  code an administrator installed (`SECURITY DEFINER`, reading raw data, not on the
  allow-list) or a built-in that reads a relation by name (`query_to_xml`): the value comes
  back stored (a default read back, a partition bound shown by `pg_get_expr`), in a cast
  error, or in the custom setting `atk.spy` that the user code `public.atk_spy()` writes.
  Through pgveil these are refused.
* user operators (ORDER BY ... USING, `op ANY (SELECT ...)`, EXCLUDE) run `atk_spy()` too.
  Their functions are on this module's allow-list (else, see below, their mere existence
  would close every masked session on the database): these cases test that a statement
  naming a user operator is refused all the same.
* user code the statement reaches without naming a function or a non-built-in operator runs
  `atk_spy()` as well (`HIDDEN_CASES`): a cast's function, a domain's CHECK, a type's typmod
  input function (a type modifier), an operator class's support function (EXCLUDE,
  PARTITION BY), an operator that has a built-in operator's name (`=`) for argument types
  no built-in covers (plain, `IN (SELECT ...)`, `= ANY (ARRAY ...)`, `CASE x WHEN`). pgveil
  treats such code whose function is not allowed as a rules problem: every masked session
  on that database is refused. So these cases run in a database of their own
  (`HIDDEN_DB`, with a minimal copy of the canary data) with a pgveil of its own; each
  creates its code, proves the leak directly, checks that through pgveil a statement of a
  session opened before and a new login of each client are refused (42501, naming the
  object and its function) and that nothing leaks, and drops the code again. One more case
  allows the function (harmless, reads nothing): the statement that needs it runs, on
  masked data.
* SQL/JSON syntax of PostgreSQL 16 and 17 is a plain function call to PostgreSQL 15: the
  administrator's `public.json_array()` and friends return raw data.

`ORACLES` are existence oracles: a right and a wrong guess of a personal value get different
answers directly (errors by SQLSTATE), and the same answer through pgveil. The guesses are
written ROT13-encoded in the statements, so that no statement carries a secret itself.
A unique constraint on a personal column is the same oracle for a role that may INSERT or
UPDATE it (23505 or not); it is a known limit (README, "Known limits": legacy forms must be
able to save new values) and not a case here.

The administrator's objects are created for this module (and dropped after it), and the
module runs its own pgveil, started after they exist, with the shared rules plus one
allow-listed procedure (`public.atk_echo`, harmless: it hands back its argument) so that the
CALL cases test the argument position and not the procedure, and the user operators'
functions. Objects a case creates are temporary, or named `atk_*` and rolled back. When the
module ends, no code the server runs unnamed may be left in `postgres` (the other modules'
proxies would refuse every masked session there): its teardown checks that, and waits
until the shared proxy finds no rules problem there.
"""

from __future__ import annotations

import codecs
import os
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from proxy.demo import fixture
from proxy.demo.embedded_pg import EmbeddedPostgres
from rules.catalog_read import HIDDEN_CODE_SQL
from tests.integration import deny_fixture
from tests.integration.attack_clients import (
    CLIENTS,
    Clients,
    CopyIn,
    Statements,
    errors_in,
    logins_in,
    open_clients,
    text_of,
)
from tests.integration.masking_fixture import (
    ADMIN,
    CANARIES,
    EMAIL,
    HELPDESK,
    NAME,
    RULES,
    leaks,
    masking_proxy,
)
from tests.support import ProxyProcess

C1 = "WHERE i_customer = 1"
SUB = f"(SELECT name FROM billing.customers {C1})"
# an integer expression that reads customer 1's name and keeps it in a custom setting
SET_V = f"set_config('atk.v', {SUB}, false)"
SPY = f"length({SET_V})"
SEEN = "SELECT current_setting('atk.v', true)"
# what the administrator's user code `public.atk_spy()` read
SPIED = "SELECT current_setting('atk.spy', true)"
QUERY_TO_XML = "query_to_xml('SELECT name, email FROM billing.customers', true, false, '')::text"
# how pgveil shows customer 1's name (partial mask: first and last symbol)
MASKED_NAME = "Z*****************t"

# ---- the administrator's objects (created as the superuser; user code owned by an admin) ----

ADMIN_SETUP = f"""
GRANT CREATE ON SCHEMA public TO {ADMIN};
GRANT REFERENCES ON billing.customers TO {HELPDESK};
SET ROLE {ADMIN};
-- user code that reads raw data, not on the allow-list
CREATE FUNCTION public.atk_peek(i bigint) RETURNS text LANGUAGE sql STABLE SECURITY DEFINER
    AS $$ SELECT name || ' ' || email FROM billing.customers WHERE i_customer = i $$;
CREATE FUNCTION public.atk_peek_imm(i bigint) RETURNS text LANGUAGE sql IMMUTABLE
    SECURITY DEFINER
    AS $$ SELECT name || ' ' || email FROM billing.customers WHERE i_customer = i $$;
CREATE FUNCTION public.atk_spy() RETURNS boolean LANGUAGE sql VOLATILE SECURITY DEFINER
    AS $$ SELECT set_config('atk.spy',
        (SELECT name || ' ' || email FROM billing.customers WHERE i_customer = 1), false)
        IS NOT NULL $$;
CREATE FUNCTION public.atk_eq(a int, b int) RETURNS boolean LANGUAGE sql VOLATILE
    SECURITY DEFINER AS $$ SELECT public.atk_spy() AND a = b $$;
CREATE FUNCTION public.atk_lt(a int, b int) RETURNS boolean LANGUAGE sql VOLATILE
    SECURITY DEFINER AS $$ SELECT public.atk_spy() AND a < b $$;
CREATE FUNCTION public.atk_cmp(a int, b int) RETURNS int LANGUAGE sql VOLATILE
    SECURITY DEFINER AS $$ SELECT CASE WHEN public.atk_spy() THEN btint4cmp(a, b) END $$;
CREATE FUNCTION public.atk_hash(a int) RETURNS int LANGUAGE sql VOLATILE SECURITY DEFINER
    AS $$ SELECT CASE WHEN public.atk_spy() THEN 0 END $$;  -- one bucket: ==== always runs
-- SQL/JSON syntax of PostgreSQL 16/17 is a function call to PostgreSQL 15
CREATE FUNCTION public.json_array(VARIADIC a int[]) RETURNS text LANGUAGE sql STABLE
    SECURITY DEFINER AS $$ SELECT name || ' ' || email FROM billing.customers WHERE i_customer = 1 $$;
CREATE FUNCTION public.json_array() RETURNS text LANGUAGE sql STABLE SECURITY DEFINER
    AS $$ SELECT name || ' ' || email FROM billing.customers WHERE i_customer = 1 $$;
CREATE FUNCTION public.json_object() RETURNS text LANGUAGE sql STABLE SECURITY DEFINER
    AS $$ SELECT name || ' ' || email FROM billing.customers WHERE i_customer = 1 $$;
CREATE FUNCTION public.json_scalar(a int) RETURNS text LANGUAGE sql STABLE SECURITY DEFINER
    AS $$ SELECT name || ' ' || email FROM billing.customers WHERE i_customer = a $$;
CREATE FUNCTION public.json_serialize(a int) RETURNS text LANGUAGE sql STABLE SECURITY DEFINER
    AS $$ SELECT name || ' ' || email FROM billing.customers WHERE i_customer = a $$;
CREATE FUNCTION public.json(a int) RETURNS text LANGUAGE sql STABLE SECURITY DEFINER
    AS $$ SELECT name || ' ' || email FROM billing.customers WHERE i_customer = a $$;
CREATE FUNCTION public.json_query(a int, p text) RETURNS text LANGUAGE sql STABLE
    SECURITY DEFINER AS $$ SELECT name || ' ' || email FROM billing.customers WHERE i_customer = a $$;
CREATE FUNCTION public.json_value(a int, p text) RETURNS text LANGUAGE sql STABLE
    SECURITY DEFINER AS $$ SELECT name || ' ' || email FROM billing.customers WHERE i_customer = a $$;
CREATE FUNCTION public.json_exists(a int, p text) RETURNS text LANGUAGE sql STABLE
    SECURITY DEFINER AS $$ SELECT name || ' ' || email FROM billing.customers WHERE i_customer = a $$;
CREATE FUNCTION public.json_arrayagg(a int) RETURNS text LANGUAGE sql STABLE SECURITY DEFINER
    AS $$ SELECT name || ' ' || email FROM billing.customers WHERE i_customer = a $$;
-- allow-listed (rules below): hands back its argument, reads nothing
CREATE PROCEDURE public.atk_echo(IN v text, INOUT r text) LANGUAGE sql AS $$ SELECT v $$;
RESET ROLE;
-- operators and operator classes: superuser only. Their functions are on this module's
-- allow-list (RULES_POSITIONS): else their mere existence closes masked sessions on the
-- database (see the hidden-code cases below); allowed, what the cases here test is that a
-- statement naming a user operator is refused all the same
CREATE OPERATOR public.==== (LEFTARG = int, RIGHTARG = int, FUNCTION = public.atk_eq,
    COMMUTATOR = ====);
CREATE OPERATOR public.<<<< (LEFTARG = int, RIGHTARG = int, FUNCTION = public.atk_lt);
CREATE OPERATOR CLASS public.atk_hash_ops FOR TYPE int USING hash AS
    OPERATOR 1 ====, FUNCTION 1 public.atk_hash(int);
CREATE OPERATOR CLASS public.atk_btree_ops FOR TYPE int USING btree AS
    OPERATOR 1 <<<<, OPERATOR 3 ====, FUNCTION 1 public.atk_cmp(int, int);
CREATE TYPE public.atk_rec AS (f jsonb, g int[]);
"""

ADMIN_TEARDOWN = f"""
DROP TABLE IF EXISTS public.atk_fk;
DROP OPERATOR FAMILY IF EXISTS public.atk_hash_ops USING hash CASCADE;
DROP OPERATOR FAMILY IF EXISTS public.atk_btree_ops USING btree CASCADE;
DROP OPERATOR IF EXISTS public.==== (int, int), public.<<<< (int, int);
DROP TYPE IF EXISTS public.atk_rec;
DROP FUNCTION IF EXISTS public.atk_peek(bigint), public.atk_peek_imm(bigint),
    public.atk_eq(int, int), public.atk_lt(int, int), public.atk_cmp(int, int),
    public.atk_hash(int), public.atk_spy(),
    public.json_array(VARIADIC int[]), public.json_array(), public.json_object(),
    public.json_scalar(int), public.json_serialize(int), public.json(int),
    public.json_query(int, text), public.json_value(int, text), public.json_exists(int, text),
    public.json_arrayagg(int);
DROP PROCEDURE IF EXISTS public.atk_echo(text, text);
REVOKE REFERENCES ON billing.customers FROM {HELPDESK};
REVOKE CREATE ON SCHEMA public FROM {ADMIN};
"""

# the shared rules, plus the procedure of the CALL cases and the functions of the user
# operators (see ADMIN_SETUP)
ALLOWED_HERE = "public.atk_echo, public.atk_eq, public.atk_lt, public.atk_cmp, public.atk_hash"
RULES_POSITIONS = RULES.replace(
    "allow: [billing.invoice_total]", f"allow: [billing.invoice_total, {ALLOWED_HERE}]"
)


@dataclass(frozen=True)
class Refused:
    """pgveil refuses the statement: SQLSTATE 42501, `pgveil: ...` naming `reason`."""

    reason: str


@dataclass(frozen=True)
class Masked:
    """pgveil runs the statement on masked data: `shown` (a masked value) comes back."""

    shown: str = MASKED_NAME


Expectation = Refused | Masked


@dataclass(frozen=True)
class Case:
    id: str
    sql: Statements
    expect: Expectation


READS = Refused("a write whose new values read personal columns is refused")
QX_DENIED = Refused("function query_to_xml can read data pgveil cannot mask")
MASKED = Masked()


def not_allowed(function: str) -> Refused:
    return Refused(f"function {function} is not allowed for masked roles")


def operator_refused(op: str) -> Refused:
    return Refused(f"operator {op} is not allowed for masked roles")


def newer_syntax(node: str, version: int) -> Refused:
    return Refused(
        f"this syntax ({node}) is read differently by servers older than PostgreSQL {version}"
    )


W = "CREATE TEMP TABLE atk_w (id int PRIMARY KEY, j jsonb, a int[], m int[], r public.atk_rec, c text, d text)"
W_ROW = "INSERT INTO atk_w VALUES (1, '{}', '{1}', '{{1,2},{3,4}}', ROW('{}', '{1}'), 'c', 'd')"
READ_W = "SELECT j::text, a::text, m::text, r::text, c, d FROM atk_w"
# the keys of customer 1's `extra` that the fixture did not put there (the json mask masks
# the value of `dl`; keys are shown as they are)
NEW_KEYS = (
    f"SELECT k FROM billing.customers, jsonb_object_keys(extra) k {C1} AND k NOT IN ('dl', 'tier')"
)
PART_BOUND = "SELECT pg_get_expr(relpartbound, oid) FROM pg_class WHERE relname LIKE 'atk_p%'"


def _tx(*items: str) -> tuple[str, ...]:
    """Statements in a transaction that is rolled back (writes to the fixture's tables)."""
    return ("BEGIN", *items, "ROLLBACK")


CASES: list[Case] = [
    # ---- assignment targets: subscripts are new data, and decide where a value goes -------
    Case(
        "insert_cols_jsonb_subscript",
        (W, f"INSERT INTO atk_w (id, j[{SUB}]) VALUES (2, '1')", READ_W),
        READS,
    ),
    Case(
        "insert_cols_array_subscript",
        (W, f"INSERT INTO atk_w (id, a[{SPY}]) VALUES (2, 7)", SEEN),
        READS,
    ),
    Case(
        "insert_cols_subscript_protected_target",
        _tx(
            "INSERT INTO billing.customers (i_customer, name, extra[(SELECT email FROM "
            f"billing.customers {C1})]) VALUES (99, 'x', '1')",
            "SELECT extra::text FROM billing.customers WHERE i_customer = 99",
        ),
        READS,
    ),
    Case(
        "update_set_jsonb_subscript",
        (W, W_ROW, f"UPDATE atk_w SET j[{SUB}] = '2'", READ_W),
        READS,
    ),
    Case(
        "update_set_array_subscript",
        (W, W_ROW, f"UPDATE atk_w SET a[{SPY}] = 2", SEEN),
        READS,
    ),
    Case(
        "update_set_array_slice",
        (W, W_ROW, f"UPDATE atk_w SET a[1:{SPY} - 18] = '{{5}}'", SEEN),
        READS,
    ),
    Case(
        "update_set_nested_jsonb_subscript",
        (W, W_ROW, f"UPDATE atk_w SET j['k'][{SUB}] = '3'", READ_W),
        READS,
    ),
    Case(
        "update_set_nested_array_subscript",
        (W, W_ROW, f"UPDATE atk_w SET m[{SPY} - 18][1] = 9", SEEN),
        READS,
    ),
    Case(
        "update_set_field_jsonb_subscript",
        (W, W_ROW, f"UPDATE atk_w SET r.f[{SUB}] = '1'", READ_W),
        READS,
    ),
    Case(
        "update_set_field_array_subscript",
        (W, W_ROW, f"UPDATE atk_w SET r.g[{SPY}] = 5", SEEN),
        READS,
    ),
    Case(
        "update_set_multiple_columns_subquery",
        (
            W,
            W_ROW,
            f"UPDATE atk_w SET (c, d) = (SELECT name, email FROM billing.customers {C1})",
            READ_W,
        ),
        READS,
    ),
    Case(
        # `extra` has a json mask for its key `dl` only: a new key would be shown as it is
        "update_set_subscript_reads_target",
        _tx(
            f"UPDATE billing.customers SET extra[name] = '1' {C1}",
            NEW_KEYS,
        ),
        READS,
    ),
    Case(
        "update_set_subscript_reads_target_qualified",
        _tx(
            f"UPDATE billing.customers c SET extra[c.email] = '1' {C1}",
            NEW_KEYS,
        ),
        READS,
    ),
    Case(
        "on_conflict_set_jsonb_subscript",
        (
            W,
            W_ROW,
            f"INSERT INTO atk_w (id) VALUES (1) ON CONFLICT (id) DO UPDATE SET j[{SUB}] = '4'",
            READ_W,
        ),
        READS,
    ),
    Case(
        "on_conflict_set_array_subscript",
        (
            W,
            W_ROW,
            f"INSERT INTO atk_w (id) VALUES (1) ON CONFLICT (id) DO UPDATE SET a[{SPY}] = 4",
            SEEN,
        ),
        READS,
    ),
    Case(
        "on_conflict_set_subscript_reads_target",
        _tx(
            "INSERT INTO billing.customers (i_customer, name) VALUES (1, 'x') "
            "ON CONFLICT (i_customer) DO UPDATE SET extra[billing.customers.phone] = '1'",
            NEW_KEYS,
        ),
        READS,
    ),
    Case(
        # the planner folds immutable calls of constants, also in the arbiter inference
        "on_conflict_inference_expression",
        (
            W,
            "INSERT INTO atk_w (id) VALUES (1) "
            "ON CONFLICT ((public.atk_peek_imm(1)::int)) DO NOTHING",
        ),
        not_allowed("public.atk_peek_imm"),
    ),
    Case(
        "on_conflict_inference_where",
        (
            W,
            "INSERT INTO atk_w (id) VALUES (1) "
            "ON CONFLICT (id) WHERE public.atk_peek_imm(1)::int > 0 DO NOTHING",
        ),
        not_allowed("public.atk_peek_imm"),
    ),
    Case(
        "on_conflict_update_where",
        (
            W,
            W_ROW,
            "INSERT INTO atk_w (id) VALUES (1) ON CONFLICT (id) DO UPDATE SET c = 'x' "
            f"WHERE {SPY} > 0",
            SEEN,
        ),
        MASKED,
    ),
    Case(
        "returning_subquery_insert",
        (W, f"INSERT INTO atk_w (id) VALUES (2) RETURNING {SUB}"),
        MASKED,
    ),
    Case(
        "returning_subquery_update",
        (W, W_ROW, f"UPDATE atk_w SET c = 'x' RETURNING {SPY}", SEEN),
        MASKED,
    ),
    Case("returning_subquery_delete", (W, W_ROW, f"DELETE FROM atk_w RETURNING {SUB}"), MASKED),
    # ---- table definitions: evaluated at CREATE, or for every row the session writes --------
    Case(
        "partition_bound_list",
        (
            "CREATE TEMP TABLE atk_pl (k text) PARTITION BY LIST (k)",
            "CREATE TEMP TABLE atk_pl_1 PARTITION OF atk_pl FOR VALUES IN (public.atk_peek(1))",
            PART_BOUND,
        ),
        not_allowed("public.atk_peek"),
    ),
    Case(
        "partition_bound_list_query_to_xml",
        (
            "CREATE TEMP TABLE atk_pl (k text) PARTITION BY LIST (k)",
            f"CREATE TEMP TABLE atk_pl_1 PARTITION OF atk_pl FOR VALUES IN ({QUERY_TO_XML})",
            PART_BOUND,
        ),
        QX_DENIED,
    ),
    Case(
        "partition_bound_range_from",
        (
            "CREATE TEMP TABLE atk_pr (k text) PARTITION BY RANGE (k)",
            "CREATE TEMP TABLE atk_pr_1 PARTITION OF atk_pr "
            "FOR VALUES FROM (atk_peek(1)) TO (MAXVALUE)",
            PART_BOUND,
        ),
        not_allowed("atk_peek"),
    ),
    Case(
        "partition_bound_range_to",
        (
            "CREATE TEMP TABLE atk_pr (k text) PARTITION BY RANGE (k)",
            "CREATE TEMP TABLE atk_pr_1 PARTITION OF atk_pr "
            f"FOR VALUES FROM (MINVALUE) TO ({QUERY_TO_XML})",
            PART_BOUND,
        ),
        QX_DENIED,
    ),
    Case(
        "partition_key_expression",
        (
            "CREATE TEMP TABLE atk_pk (i bigint) PARTITION BY LIST ((atk_peek_imm(i)::int))",
            "CREATE TEMP TABLE atk_pk_d PARTITION OF atk_pk DEFAULT",
            "INSERT INTO atk_pk VALUES (1)",
        ),
        not_allowed("atk_peek_imm"),
    ),
    Case(
        "column_default",
        (
            "CREATE TEMP TABLE atk_d (i int, a text DEFAULT atk_peek(1))",
            "INSERT INTO atk_d (i) VALUES (1)",
            "SELECT a FROM atk_d",
        ),
        not_allowed("atk_peek"),
    ),
    Case(
        "column_default_query_to_xml",
        (
            f"CREATE TEMP TABLE atk_d (i int, a text DEFAULT {QUERY_TO_XML})",
            "INSERT INTO atk_d (i) VALUES (1)",
            "SELECT a FROM atk_d",
        ),
        QX_DENIED,
    ),
    Case(
        "column_check",
        (
            "CREATE TEMP TABLE atk_c (i int CHECK (public.atk_spy()))",
            "INSERT INTO atk_c VALUES (1)",
            SPIED,
        ),
        not_allowed("public.atk_spy"),
    ),
    Case(
        "table_check",
        (
            f"CREATE TEMP TABLE atk_c (i int, CHECK (({QUERY_TO_XML})::int > i))",
            "INSERT INTO atk_c VALUES (1)",
        ),
        QX_DENIED,
    ),
    Case(
        "generated_column",
        (
            "CREATE TEMP TABLE atk_g (i bigint, a text GENERATED ALWAYS AS (atk_peek_imm(i)) STORED)",
            "INSERT INTO atk_g (i) VALUES (1)",
            "SELECT a FROM atk_g",
        ),
        not_allowed("atk_peek_imm"),
    ),
    Case(
        "exclude_operator",
        (
            "CREATE TEMP TABLE atk_x (a int, EXCLUDE USING hash (a public.atk_hash_ops WITH ====))",
            "INSERT INTO atk_x VALUES (1), (2)",
            SPIED,
        ),
        operator_refused("===="),
    ),
    Case(
        "exclude_operator_qualified",
        (
            "CREATE TEMP TABLE atk_x (a int, EXCLUDE USING hash "
            "(a public.atk_hash_ops WITH OPERATOR(public.====)))",
            "INSERT INTO atk_x VALUES (1), (2)",
            SPIED,
        ),
        Refused("operator ==== outside pg_catalog is not allowed for masked roles"),
    ),
    Case(
        "exclude_predicate",
        (
            "CREATE TEMP TABLE atk_x (a int, EXCLUDE USING btree (a WITH =) "
            "WHERE (public.atk_peek_imm(a)::int > 0))",
            "INSERT INTO atk_x VALUES (1)",
        ),
        not_allowed("public.atk_peek_imm"),
    ),
    Case(
        "exclude_element_expression",
        (
            "CREATE TEMP TABLE atk_x (a int, EXCLUDE USING btree ((atk_peek_imm(a)::int) WITH =))",
            "INSERT INTO atk_x VALUES (1)",
        ),
        not_allowed("atk_peek_imm"),
    ),
    # ---- clauses of queries ----------------------------------------------------------------
    Case("limit_count", (f"SELECT 1 LIMIT {SPY}", SEEN), MASKED),
    Case("offset_count", (f"SELECT 1 OFFSET {SPY} - 19", SEEN), MASKED),
    Case("fetch_first_count", (f"SELECT 1 FETCH FIRST {SPY} ROWS ONLY", SEEN), MASKED),
    Case(
        "fetch_first_with_ties",
        (
            f"SELECT i FROM generate_series(1, 2) i ORDER BY i FETCH FIRST {SPY} ROWS WITH TIES",
            SEEN,
        ),
        MASKED,
    ),
    Case(
        "window_rows_start",
        (
            f"SELECT sum(i) OVER (ORDER BY i ROWS BETWEEN {SPY} PRECEDING AND CURRENT ROW) "
            "FROM generate_series(1, 2) i",
            SEEN,
        ),
        MASKED,
    ),
    Case(
        "window_range_end",
        (
            f"SELECT sum(i) OVER (ORDER BY i RANGE BETWEEN CURRENT ROW AND {SPY} FOLLOWING) "
            "FROM generate_series(1, 2) i",
            SEEN,
        ),
        MASKED,
    ),
    Case(
        "window_groups_start_and_end",
        (
            f"SELECT sum(i) OVER (ORDER BY i GROUPS BETWEEN {SPY} PRECEDING AND {SPY} FOLLOWING) "
            "FROM generate_series(1, 2) i",
            SEEN,
        ),
        MASKED,
    ),
    Case(
        "named_window_partition",
        (
            f"SELECT sum(i) OVER w FROM generate_series(1, 2) i WINDOW w AS (PARTITION BY {SPY})",
            SEEN,
        ),
        MASKED,
    ),
    Case(
        "named_window_order_and_frame",
        (
            "SELECT sum(i) OVER (w ROWS BETWEEN CURRENT ROW AND 1 FOLLOWING) "
            f"FROM generate_series(1, 2) i WINDOW w AS (ORDER BY {SPY})",
            SEEN,
        ),
        MASKED,
    ),
    Case(
        "tablesample_argument",
        (f"SELECT count(*) FROM billing.customer_classes TABLESAMPLE SYSTEM ({SPY})", SEEN),
        MASKED,
    ),
    Case(
        "tablesample_repeatable",
        (
            "SELECT count(*) FROM billing.customer_classes TABLESAMPLE BERNOULLI (100) "
            f"REPEATABLE ({SPY})",
            SEEN,
        ),
        MASKED,
    ),
    Case(
        "tablesample_of_protected_table",
        (
            "SELECT name FROM billing.customers TABLESAMPLE BERNOULLI (100) "
            f"REPEATABLE ({SPY}) {C1}",
            SEEN,
        ),
        MASKED,
    ),
    Case(
        "order_by_using_user_operator",
        ("SELECT i FROM generate_series(1, 3) i ORDER BY i USING <<<<", SPIED),
        operator_refused("<<<<"),
    ),
    Case(
        "any_subquery_user_operator",
        ("SELECT 1 WHERE 1 ==== ANY (SELECT 1)", SPIED),
        operator_refused("===="),
    ),
    Case(
        "all_subquery_qualified_user_operator",
        ("SELECT 1 WHERE 1 OPERATOR(public.====) ALL (SELECT 1)", SPIED),
        Refused("operator ==== outside pg_catalog is not allowed for masked roles"),
    ),
    Case(
        "any_array_user_operator",
        ("SELECT 1 WHERE 1 ==== ANY (ARRAY[1])", SPIED),
        operator_refused("===="),
    ),
    Case(
        "aggregate_filter",
        (f"SELECT count(*) FILTER (WHERE {SPY} > 0) FROM generate_series(1, 2)", SEEN),
        MASKED,
    ),
    Case(
        "aggregate_order_by",
        (f"SELECT string_agg('x', ',' ORDER BY {SPY}) FROM generate_series(1, 2)", SEEN),
        MASKED,
    ),
    Case(
        "aggregate_within_group",
        (f"SELECT percentile_disc(0.5) WITHIN GROUP (ORDER BY {SPY})", SEEN),
        MASKED,
    ),
    Case(
        "grouping_sets",
        (
            f"SELECT count(*) FROM generate_series(1, 2) i GROUP BY GROUPING SETS ((i), ({SPY}))",
            SEEN,
        ),
        MASKED,
    ),
    Case(
        "grouping_cube",
        (f"SELECT count(*) FROM generate_series(1, 2) i GROUP BY CUBE (i, {SPY})", SEEN),
        MASKED,
    ),
    Case(
        "grouping_rollup",
        (f"SELECT count(*) FROM generate_series(1, 2) i GROUP BY ROLLUP (i, {SPY})", SEEN),
        MASKED,
    ),
    Case("having", (f"SELECT 1 FROM generate_series(1, 2) HAVING {SPY} > 0", SEEN), MASKED),
    Case("distinct_on", (f"SELECT DISTINCT ON ({SPY}) 1", SEEN), MASKED),
    Case("subscript_of_expression", (f"SELECT (ARRAY[1, 2])[{SPY} - 18]", SEEN), MASKED),
    Case("named_argument", (f"SELECT make_interval(secs => {SPY})", SEEN), MASKED),
    Case(
        "xmltable_row_expression",
        (
            f"SELECT * FROM XMLTABLE(('/r' || left({SET_V}, 0)) PASSING '<r/>' "
            "COLUMNS a text PATH '.')",
            SEEN,
        ),
        MASKED,
    ),
    Case(
        "xmltable_column_path",
        (
            "SELECT * FROM XMLTABLE('/r' PASSING '<r/>' "
            f"COLUMNS a text PATH ('.' || left({SET_V}, 0)))",
            SEEN,
        ),
        MASKED,
    ),
    Case(
        "xmltable_column_default",
        (f"SELECT * FROM XMLTABLE('/r' PASSING '<r/>' COLUMNS a text PATH '@x' DEFAULT {SUB})",),
        MASKED,
    ),
    Case(
        "xmltable_passing",
        (
            f"SELECT * FROM XMLTABLE('/r' PASSING (('<r>' || {SUB} || '</r>')::xml) "
            "COLUMNS a text PATH '.')",
        ),
        MASKED,
    ),
    Case(
        "xmltable_namespaces",
        (
            f"SELECT * FROM XMLTABLE(XMLNAMESPACES({SET_V} AS n), '/r' PASSING '<r/>' "
            "COLUMNS a text PATH '.')",
            SEEN,
        ),
        MASKED,
    ),
    Case("rows_from", (f"SELECT * FROM ROWS FROM ({SET_V}, generate_series(1, 2))",), MASKED),
    Case(
        "rows_from_user_function",
        ("SELECT * FROM ROWS FROM (public.atk_peek(1)) WITH ORDINALITY",),
        not_allowed("public.atk_peek"),
    ),
    Case("values_list", (f"SELECT * FROM (VALUES (1, {SUB})) v(a, b)",), MASKED),
    Case("values_limit", (f"VALUES (1), (2) ORDER BY 1 LIMIT {SPY}", SEEN), MASKED),
    Case("set_operation_limit", (f"SELECT 1 UNION SELECT 2 LIMIT {SPY}", SEEN), MASKED),
    Case(
        "lateral_subquery",
        (f"SELECT l.x FROM generate_series(1, 1) g, LATERAL (SELECT {SUB} AS x OFFSET g - 1) l",),
        MASKED,
    ),
    Case(
        "lateral_rows_from",
        (f"SELECT l.* FROM generate_series(1, 1) g, LATERAL ROWS FROM ({SET_V}) l",),
        MASKED,
    ),
    Case(
        "lateral_function_argument",
        (
            f"SELECT count(*) FROM generate_series(1, 1) g, LATERAL generate_series(g, {SPY}) h",
            SEEN,
        ),
        MASKED,
    ),
    Case(
        "lateral_xmltable",
        (
            "SELECT x.* FROM generate_series(1, 1) g, LATERAL XMLTABLE('/r' PASSING '<r/>' "
            f"COLUMNS a text PATH '@x' DEFAULT {SUB}) x",
        ),
        MASKED,
    ),
    Case(
        "cte_search_sequence_column",
        (
            f"WITH RECURSIVE t(n, s) AS (SELECT 1, {SUB} UNION ALL SELECT n + 1, s FROM t "
            "WHERE n < 2) SEARCH DEPTH FIRST BY s SET ord SELECT ord::text FROM t",
        ),
        MASKED,
    ),
    Case(
        "cte_search_breadth_first_table",
        (
            "WITH RECURSIVE t(n, s) AS (SELECT 1, c.name FROM billing.customers c "
            f"{C1} UNION ALL SELECT n + 1, s FROM t WHERE n < 2) "
            "SEARCH BREADTH FIRST BY s SET ord SELECT ord::text FROM t",
        ),
        MASKED,
    ),
    Case(
        "cte_cycle_path_column",
        (
            f"WITH RECURSIVE t(n, s) AS (SELECT 1, {SUB} UNION ALL SELECT n + 1, s FROM t "
            "WHERE n < 2) CYCLE s SET is_cycle USING path SELECT path::text FROM t",
        ),
        MASKED,
    ),
    # ---- statements around queries ------------------------------------------------------------
    Case(
        "call_argument_query_to_xml",
        (f"CALL public.atk_echo({QUERY_TO_XML}, NULL)",),
        QX_DENIED,
    ),
    Case(
        "call_argument_user_function",
        ("CALL public.atk_echo(public.atk_peek(1), NULL)",),
        not_allowed("public.atk_peek"),
    ),
    Case(
        "execute_parameter_query_to_xml",
        ("PREPARE atk_e(text) AS SELECT $1", f"EXECUTE atk_e({QUERY_TO_XML})"),
        QX_DENIED,
    ),
    Case(
        "execute_parameter_user_function",
        ("PREPARE atk_e(text) AS SELECT $1", "EXECUTE atk_e(atk_peek(1))"),
        not_allowed("atk_peek"),
    ),
    Case(
        "copy_from_where_user_function",
        (
            "CREATE TEMP TABLE atk_cw (a int)",
            CopyIn("COPY atk_cw FROM STDIN WHERE public.atk_spy()", "1\n"),
            SPIED,
        ),
        not_allowed("public.atk_spy"),
    ),
    Case(
        "copy_from_where_query_to_xml",
        (
            "CREATE TEMP TABLE atk_cw (a int)",
            CopyIn(
                f"COPY atk_cw FROM STDIN WHERE length(set_config('atk.v', {QUERY_TO_XML}, false)) > a",
                "1\n",
            ),
            SEEN,
        ),
        QX_DENIED,
    ),
    Case(
        "explain_analyze_limit",
        (f"EXPLAIN (ANALYZE, COSTS OFF, TIMING OFF, SUMMARY OFF) SELECT 1 LIMIT {SPY}", SEEN),
        MASKED,
    ),
    Case(
        "explain_analyze_window_frame",
        (
            "EXPLAIN (ANALYZE, COSTS OFF, TIMING OFF, SUMMARY OFF) SELECT sum(i) OVER "
            f"(ORDER BY i ROWS BETWEEN {SPY} PRECEDING AND CURRENT ROW) FROM generate_series(1, 2) i",
            SEEN,
        ),
        MASKED,
    ),
    Case(
        "explain_analyze_insert_subscript",
        (
            W,
            f"EXPLAIN (ANALYZE, COSTS OFF) INSERT INTO atk_w (id, j[{SUB}]) VALUES (2, '1')",
            READ_W,
        ),
        READS,
    ),
    Case(
        "explain_analyze_create_table_as",
        (
            "EXPLAIN (ANALYZE, COSTS OFF, TIMING OFF, SUMMARY OFF) "
            f"CREATE TEMP TABLE atk_ea AS SELECT 1 AS a OFFSET {SPY} - 19",
            SEEN,
        ),
        MASKED,
    ),
    Case(
        # no ANALYZE: the planner still folds immutable calls of constants
        "explain_plan_folds_constants",
        ("EXPLAIN SELECT 1 WHERE public.atk_peek_imm(1)::int > 0",),
        not_allowed("public.atk_peek_imm"),
    ),
    Case(
        "create_table_as_offset",
        (f"CREATE TEMP TABLE atk_ctas AS SELECT 1 AS a OFFSET {SPY} - 19", SEEN),
        MASKED,
    ),
    Case(
        "select_into_filter",
        (
            f"SELECT count(*) FILTER (WHERE {SPY} > 0) INTO TEMP atk_si FROM generate_series(1, 2)",
            SEEN,
        ),
        MASKED,
    ),
    Case(
        "create_temp_view_limit",
        (f"CREATE TEMP VIEW atk_v AS SELECT 1 AS a LIMIT {SPY}", "SELECT * FROM atk_v", SEEN),
        MASKED,
    ),
    Case(
        "declare_cursor_window",
        (
            "BEGIN",
            f"DECLARE atk_cur CURSOR FOR SELECT sum(i) OVER w FROM generate_series(1, 2) i "
            f"WINDOW w AS (PARTITION BY {SPY})",
            "FETCH ALL FROM atk_cur",
            SEEN,
            "ROLLBACK",
        ),
        MASKED,
    ),
    Case(
        "prepare_limit",
        (f"PREPARE atk_pl AS SELECT 1 LIMIT {SPY}", "EXECUTE atk_pl", SEEN),
        MASKED,
    ),
    # ---- SQL/JSON syntax that PostgreSQL 15 reads as a call of the administrator's function --
    Case("json_array", ("SELECT JSON_ARRAY(1, 2)",), newer_syntax("JsonArrayConstructor", 16)),
    Case("json_array_empty", ("SELECT JSON_ARRAY()",), newer_syntax("JsonArrayConstructor", 16)),
    Case("json_object_empty", ("SELECT JSON_OBJECT()",), newer_syntax("JsonObjectConstructor", 16)),
    Case(
        "json_arrayagg",
        ("SELECT JSON_ARRAYAGG(i) FROM generate_series(1, 1) i",),
        newer_syntax("JsonArrayAgg", 16),
    ),
    Case("json_scalar", ("SELECT JSON_SCALAR(1)",), newer_syntax("JsonScalarExpr", 17)),
    Case("json_serialize", ("SELECT JSON_SERIALIZE(1)",), newer_syntax("JsonSerializeExpr", 17)),
    Case("json_parse", ("SELECT JSON(1)",), newer_syntax("JsonParseExpr", 17)),
    Case("json_query", ("SELECT JSON_QUERY(1, 'x')",), newer_syntax("JsonFuncExpr", 17)),
    Case("json_value", ("SELECT JSON_VALUE(1, 'x')",), newer_syntax("JsonFuncExpr", 17)),
    Case("json_exists", ("SELECT JSON_EXISTS(1, 'x')",), newer_syntax("JsonFuncExpr", 17)),
    Case(
        "json_array_in_column_default",
        (
            "CREATE TEMP TABLE atk_d (i int, a text DEFAULT JSON_ARRAY())",
            "INSERT INTO atk_d (i) VALUES (1)",
            "SELECT a FROM atk_d",
        ),
        newer_syntax("JsonArrayConstructor", 16),
    ),
    Case(
        "json_object_in_limit",
        ("SELECT 1 LIMIT (JSON_OBJECT())::int",),
        newer_syntax("JsonObjectConstructor", 16),
    ),
]


def _rot13(value: str) -> str:
    """SQL that computes `value` from its ROT13 form: the statement never spells it."""
    abc = "abcdefghijklmnopqrstuvwxyz"
    return f"translate('{codecs.encode(value, 'rot13')}', '{abc}', '{abc[13:] + abc[:13]}')"


@dataclass(frozen=True)
class Oracle:
    """Whether a guessed personal value exists: `hit` guesses right, `miss` wrong."""

    id: str
    hit: tuple[str, ...]
    miss: tuple[str, ...]
    expect: Refused


def _fk_oracle(create: str, guess: str) -> tuple[str, ...]:
    return _tx(create, f"INSERT INTO public.atk_fk VALUES ({guess})")


FK_COLUMN = "CREATE TABLE public.atk_fk (e text REFERENCES billing.customers (email))"
FK_TABLE = (
    "CREATE TABLE public.atk_fk (e text, FOREIGN KEY (e) REFERENCES billing.customers (email))"
)
FK_REFUSED = Refused(
    "a foreign key to protected table billing.customers could confirm values of its columns"
)
RIGHT, WRONG = _rot13(EMAIL), _rot13("nobody@example.invalid")

ORACLES = [
    Oracle(
        "foreign_key_column_constraint",
        _fk_oracle(FK_COLUMN, RIGHT),
        _fk_oracle(FK_COLUMN, WRONG),
        FK_REFUSED,
    ),
    Oracle(
        "foreign_key_table_constraint",
        _fk_oracle(FK_TABLE, RIGHT),
        _fk_oracle(FK_TABLE, WRONG),
        FK_REFUSED,
    ),
]


# ---- user code the server runs without a statement naming it ---------------------------------
#
# A cast, a type's typmod function, a domain's CHECK, an operator (also one named like a
# built-in) and an operator class's support function run user code that no statement names.
# While such code whose function is not allowed exists in a database, pgveil refuses every
# masked session on it (a rules problem): the objects live in a database of their own, with
# a pgveil of its own, and each case creates its code, checks, and drops it again.

HIDDEN_DB = "pgveil_positions_hidden"
# the billing fixture with its canaries (customer 1: NAME, EMAIL)
HIDDEN_SETUP = (
    fixture.script(parts=("canaries",), settings=CANARIES)
    + f"""
GRANT USAGE ON SCHEMA billing TO {HELPDESK};
GRANT SELECT ON billing.customers TO {HELPDESK};
-- what the hidden code runs: reads raw data (not on the allow-list, never named below)
CREATE FUNCTION public.atk_spy() RETURNS boolean LANGUAGE sql VOLATILE SECURITY DEFINER
    AS $$ SELECT set_config('atk.spy',
        (SELECT name || ' ' || email FROM billing.customers WHERE i_customer = 1), false)
        IS NOT NULL $$;
-- allow-listed: compares a number with a text, reads nothing
CREATE FUNCTION public.atk_same(a bigint, b text) RETURNS boolean LANGUAGE sql IMMUTABLE
    AS $$ SELECT a::text = b $$;
"""
)
HIDDEN_RULES = f"""
databases: [{HIDDEN_DB}]
roles:
  unmasked: [{ADMIN}]
  masked: [{HELPDESK}]
  default: unmasked
functions:
  allow: [public.atk_same]
tables:
  billing.customers:
    subject: i_customer
    columns:
      name: partial
      email: email
"""
NAME_SQL = f"SELECT name FROM billing.customers {C1}"


@dataclass(frozen=True)
class UserCode:
    """Objects whose function the server calls unnamed; `what` calls `function`, as pgveil
    names them in its refusal."""

    create: str
    drop: str
    what: str
    function: str


TYPMOD = UserCode(
    """
    CREATE FUNCTION public.atk_tm_typmod(a cstring[]) RETURNS int LANGUAGE sql STABLE
        SECURITY DEFINER AS $$ SELECT CASE WHEN public.atk_spy() THEN 7 END $$;
    CREATE TYPE public.atk_tm;
    CREATE FUNCTION public.atk_tm_in(cstring) RETURNS public.atk_tm LANGUAGE internal
        IMMUTABLE STRICT AS 'int4in';
    CREATE FUNCTION public.atk_tm_out(public.atk_tm) RETURNS cstring LANGUAGE internal
        IMMUTABLE STRICT AS 'int4out';
    CREATE TYPE public.atk_tm (INPUT = public.atk_tm_in, OUTPUT = public.atk_tm_out,
        TYPMOD_IN = public.atk_tm_typmod, INTERNALLENGTH = 4, PASSEDBYVALUE, ALIGNMENT = int4);
    """,
    """
    DROP TYPE IF EXISTS public.atk_tm CASCADE;
    DROP FUNCTION IF EXISTS public.atk_tm_typmod(cstring[]);
    """,
    "type atk_tm",
    "public.atk_tm_typmod",
)
CAST = UserCode(
    """
    CREATE FUNCTION public.atk_inet_int(a inet) RETURNS int LANGUAGE sql VOLATILE
        SECURITY DEFINER AS $$ SELECT CASE WHEN public.atk_spy() THEN 1 END $$;
    CREATE CAST (inet AS int) WITH FUNCTION public.atk_inet_int(inet) AS ASSIGNMENT;
    """,
    """
    DROP CAST IF EXISTS (inet AS int);
    DROP FUNCTION IF EXISTS public.atk_inet_int(inet);
    """,
    "cast from inet to integer",
    "public.atk_inet_int",
)
DOMAIN = UserCode(
    "CREATE DOMAIN public.atk_dom AS int CHECK (public.atk_spy());",
    "DROP DOMAIN IF EXISTS public.atk_dom;",
    "domain atk_dom (constraint atk_dom_check)",
    "public.atk_spy",
)
# built-in operators, user comparison function
OPERATOR_CLASS = UserCode(
    """
    CREATE FUNCTION public.atk_cmp2(a int2, b int2) RETURNS int LANGUAGE sql VOLATILE
        SECURITY DEFINER AS $$ SELECT CASE WHEN public.atk_spy() THEN btint2cmp(a, b) END $$;
    CREATE OPERATOR CLASS public.atk_int2_ops FOR TYPE int2 USING btree AS
        OPERATOR 1 <, OPERATOR 2 <=, OPERATOR 3 =, OPERATOR 4 >=, OPERATOR 5 >,
        FUNCTION 1 public.atk_cmp2(int2, int2);
    """,
    """
    DROP OPERATOR FAMILY IF EXISTS public.atk_int2_ops USING btree CASCADE;
    DROP FUNCTION IF EXISTS public.atk_cmp2(int2, int2);
    """,
    "function 1 (smallint, smallint) of operator family atk_int2_ops for access method btree: "
    "atk_cmp2(smallint,smallint)",
    "public.atk_cmp2",
)
# a user operator with a built-in operator's name, for a pair of types no built-in covers
BUILTIN_NAMED_OPERATOR = UserCode(
    """
    CREATE FUNCTION public.atk_eq_int_text(a int, b text) RETURNS boolean LANGUAGE sql
        VOLATILE SECURITY DEFINER AS $$ SELECT public.atk_spy() AND a::text = b $$;
    CREATE OPERATOR public.= (LEFTARG = int, RIGHTARG = text,
        FUNCTION = public.atk_eq_int_text);
    """,
    """
    DROP OPERATOR IF EXISTS public.= (int, text);
    DROP FUNCTION IF EXISTS public.atk_eq_int_text(int, text);
    """,
    "operator =(integer,text)",
    "public.atk_eq_int_text",
)
# the same kind of operator, its function allow-listed (and harmless): the DBA's consent
ALLOWED_OPERATOR = UserCode(
    "CREATE OPERATOR public.= (LEFTARG = bigint, RIGHTARG = text, FUNCTION = public.atk_same);",
    "DROP OPERATOR IF EXISTS public.= (bigint, text);",
    "operator =(bigint,text)",
    "public.atk_same",
)


@dataclass(frozen=True)
class HiddenCase:
    id: str
    code: UserCode
    sql: Statements


HIDDEN_CASES = [
    # a type modifier is a constant, but the type's typmod_in is user code
    HiddenCase("typmod_user_type_cast", TYPMOD, ("SELECT NULL::public.atk_tm(5)", SPIED)),
    HiddenCase(
        "typmod_user_type_column", TYPMOD, ("CREATE TEMP TABLE atk_t (a public.atk_tm(3))", SPIED)
    ),
    HiddenCase("cast_user_function", CAST, ("SELECT '192.0.2.1'::inet::int", SPIED)),
    HiddenCase(
        "cast_assignment_user_function",
        CAST,
        (
            "CREATE TEMP TABLE atk_ci (i int)",
            "INSERT INTO atk_ci VALUES ('192.0.2.1'::inet)",
            SPIED,
        ),
    ),
    HiddenCase("domain_check_user_function", DOMAIN, ("SELECT 1::public.atk_dom", SPIED)),
    HiddenCase(
        # built-in operator, user operator class: its comparison function runs on insert
        "exclude_operator_class",
        OPERATOR_CLASS,
        (
            "CREATE TEMP TABLE atk_x (a int2, EXCLUDE USING btree (a public.atk_int2_ops WITH =))",
            "INSERT INTO atk_x VALUES (1), (2)",
            SPIED,
        ),
    ),
    HiddenCase(
        # the comparison function runs for every bound and every row routed
        "partition_key_operator_class",
        OPERATOR_CLASS,
        (
            "CREATE TEMP TABLE atk_po (a int2) PARTITION BY RANGE (a public.atk_int2_ops)",
            "CREATE TEMP TABLE atk_po_1 PARTITION OF atk_po FOR VALUES FROM (1) TO (10)",
            "INSERT INTO atk_po VALUES (2)",
            SPIED,
        ),
    ),
    HiddenCase(
        "builtin_named_user_operator", BUILTIN_NAMED_OPERATOR, ("SELECT 1 = 'x'::text", SPIED)
    ),
    HiddenCase(
        "builtin_named_user_operator_in_subquery",
        BUILTIN_NAMED_OPERATOR,
        ("SELECT 1 IN (SELECT 'x'::text)", SPIED),
    ),
    HiddenCase(
        "builtin_named_user_operator_any_array",
        BUILTIN_NAMED_OPERATOR,
        ("SELECT 1 = ANY (ARRAY['x'::text])", SPIED),
    ),
    HiddenCase(
        "builtin_named_user_operator_case",
        BUILTIN_NAMED_OPERATOR,
        ("SELECT CASE 1 WHEN 'x'::text THEN 1 END", SPIED),
    ),
]
# runs only through the allowed operator (the built-in `=` takes no bigint and text)
ALLOWED_SQL = "SELECT name FROM billing.customers WHERE i_customer = '1'::text"


# ---- fixtures ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def positions_proxy(pg: EmbeddedPostgres, billing: ProxyProcess) -> Iterator[ProxyProcess]:
    """The administrator's objects, and a pgveil started after them (it reads the catalog
    once at start: it knows every function and operator created above)."""
    pg.psql(ADMIN_SETUP)
    d = Path(tempfile.mkdtemp(prefix="pgveil-positions-"))
    rules = d / "rules.yaml"
    rules.write_text(RULES_POSITIONS)
    p = masking_proxy(pg, rules)
    try:
        yield p
    finally:
        p.stop()
        os.unlink(rules)
        os.rmdir(d)
        pg.psql(ADMIN_TEARDOWN)
        _no_hidden_code_left(pg, billing)


def wait_for(check: Callable[[], bool], what: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def _no_hidden_code_left(pg: EmbeddedPostgres, billing: ProxyProcess) -> None:
    """Code the server runs unnamed, left in `postgres`, would close every masked session
    of the other modules' proxies on it (their rules allow none of it)."""
    left = pg.psql(HIDDEN_CODE_SQL).strip()
    assert left == "", f"hidden code left in database postgres:\n{left}"
    # the shared proxies (billing's, and the deny columns' if it runs) may have read the
    # catalog while this module's operators existed: until their next read they refuse
    # masked sessions on postgres
    for proxy in (billing, *deny_fixture.LIVE):
        wait_for(
            lambda proxy=proxy: proxy.metric("pgveil_rules_problems", database="postgres") == 0,
            "the shared proxies to find no rules problem in database postgres",
            timeout=180,  # (a read comes every catalog_refresh, 60 s by default)
        )


@pytest.fixture(scope="module")
def clients(pg: EmbeddedPostgres, positions_proxy: ProxyProcess) -> Iterator[Clients]:
    with open_clients(pg, positions_proxy.port) as c:
        yield c


@dataclass
class Hidden:
    """The database of the hidden-code cases, its pgveil and clients."""

    pg: EmbeddedPostgres
    proxy: ProxyProcess
    clients: Clients

    def problems(self) -> float:
        return self.proxy.metric("pgveil_rules_problems", database=HIDDEN_DB)

    def reread(self) -> None:
        """Until pgveil has read the catalog after now (the second read from now on: the
        first may have begun before)."""
        reads = self._reads()
        wait_for(lambda: self._reads() >= reads + 2, "pgveil to re-read the catalog")

    def _reads(self) -> int:
        # this pgveil serves one database only
        return self.proxy.log().count('"event":"catalog.loaded"')


@pytest.fixture(scope="module")
def hidden(pg: EmbeddedPostgres, billing: ProxyProcess) -> Iterator[Hidden]:
    """The database, and a pgveil that re-reads its catalog at every tick (a case waits for
    the read after it created or dropped its code). Sessions through it are not reset
    between statements: a statement of an open session is one of the things checked.
    `billing` creates the roles."""
    pg.psql(f"DROP DATABASE IF EXISTS {HIDDEN_DB}")
    pg.psql(f"CREATE DATABASE {HIDDEN_DB}")
    d = Path(tempfile.mkdtemp(prefix="pgveil-positions-hidden-"))
    rules = d / "rules.yaml"
    rules.write_text(HIDDEN_RULES)
    try:
        pg.psql(HIDDEN_SETUP, dbname=HIDDEN_DB)
        p = ProxyProcess(
            pg.port,
            "--upstream-sslmode", "disable",
            "--rules", str(rules),
            "--catalog-user", pg.superuser,
            "--catalog-refresh", "0.1",
            env={"PGVEIL_CATALOG_PASSWORD": pg.password},
        )  # fmt: skip
        try:
            with open_clients(pg, p.port, dbname=HIDDEN_DB, reset_sql=(), record_logins=True) as c:
                yield Hidden(pg, p, c)
        finally:
            p.stop()
    finally:
        os.unlink(rules)
        os.rmdir(d)
        pg.psql(f"DROP DATABASE IF EXISTS {HIDDEN_DB} WITH (FORCE)")


# ---- tests ------------------------------------------------------------------------------------


def _ids(items: list[Case] | list[Oracle]) -> list[str]:
    return [c.id for c in items]


def test_cases_are_well_formed() -> None:
    ids = _ids(CASES) + _ids(ORACLES)
    assert len(ids) == len(set(ids)), "duplicate case ids"
    for c in CASES:
        # the statements themselves must not carry a secret, or every client "leaks" it
        assert leaks(text_of(c.sql)) == [], c.id
    for o in ORACLES:
        assert leaks(text_of(o.hit + o.miss)) == [], o.id


def _refusals(received: str) -> list[str]:
    return [message for sqlstate, message in errors_in(received) if sqlstate == "42501"]


def check_expectation(expect: Expectation, received: str) -> None:
    if isinstance(expect, Refused):
        refusals = _refusals(received)
        assert any(m.startswith("pgveil: ") and expect.reason in m for m in refusals), (
            f"expected a refusal (42501) naming {expect.reason!r}; refusals: {refusals}; "
            f"received:\n{received[:3000]}"
        )
    elif isinstance(expect, Masked):
        assert expect.shown in received, (
            f"expected the statement to run on masked data ({expect.shown!r}); "
            f"received:\n{received[:3000]}"
        )


@pytest.mark.parametrize(
    ("case", "client"),
    [(c, client) for c in CASES for client in CLIENTS],
    ids=[f"{c.id}-{client}" for c in CASES for client in CLIENTS],
)
def test_position_does_not_leak_through_pgveil(clients: Clients, case: Case, client: str) -> None:
    received = clients.run(client, case.sql)
    assert leaks(received) == [], f"{case.id} via {client} leaked; received:\n{received[:3000]}"
    check_expectation(case.expect, received)


@pytest.mark.parametrize("case", CASES, ids=_ids(CASES))
def test_position_leaks_directly(clients: Clients, case: Case) -> None:
    received = clients.run("direct", case.sql)
    assert leaks(received) != [], (
        f"{case.id} does not leak even without pgveil (a broken case); received:\n{received[:3000]}"
    )


@pytest.mark.parametrize("client", CLIENTS)
def test_allowed_procedure_runs_through_pgveil(clients: Clients, client: str) -> None:
    """The CALL cases are refused for their arguments: the procedure itself may run."""
    received = clients.run(client, ("CALL public.atk_echo('through' || 'pgveil', NULL)",))
    assert "throughpgveil" in received and errors_in(received) == [], received


def _answer(received: str) -> list[str]:
    """What an oracle's probe answered: the SQLSTATE of each error, in order."""
    return [sqlstate for sqlstate, _ in errors_in(received)]


@pytest.mark.parametrize("oracle", ORACLES, ids=_ids(ORACLES))
def test_oracle_answers_directly(clients: Clients, oracle: Oracle) -> None:
    hit, miss = clients.run("direct", oracle.hit), clients.run("direct", oracle.miss)
    assert _answer(hit) != _answer(miss), (
        f"{oracle.id} tells nothing even without pgveil (a broken case):\n{hit}\n---\n{miss}"
    )


@pytest.mark.parametrize(
    ("oracle", "client"),
    [(o, client) for o in ORACLES for client in CLIENTS],
    ids=[f"{o.id}-{client}" for o in ORACLES for client in CLIENTS],
)
def test_oracle_does_not_answer_through_pgveil(
    clients: Clients, oracle: Oracle, client: str
) -> None:
    hit, miss = clients.run(client, oracle.hit), clients.run(client, oracle.miss)
    assert _answer(hit) == _answer(miss), (
        f"{oracle.id} via {client} tells a right guess from a wrong one:\n{hit}\n---\n{miss}"
    )
    check_expectation(oracle.expect, hit)


def test_proxy_survives(positions_proxy: ProxyProcess) -> None:
    assert positions_proxy.proc.poll() is None, positions_proxy.log()[-3000:]
    assert "Traceback" not in positions_proxy.log()


# ---- user code the server runs without a statement naming it ----------------------------------


def _refused_naming(code: UserCode, refusals: list[tuple[str, str]], sqlstates: set[str]) -> bool:
    reason = (
        f"pgveil: the rules do not match database {HIDDEN_DB}: functions.allow: {code.what} "
        f"calls function {code.function}, which is not allowed"
    )
    return any(st in sqlstates and m.startswith(reason) for st, m in refusals)


@pytest.mark.parametrize("case", HIDDEN_CASES, ids=[c.id for c in HIDDEN_CASES])
def test_hidden_code_closes_masked_sessions(hidden: Hidden, case: HiddenCase) -> None:
    """Directly the case leaks. Through pgveil, once it has read the catalog with the code
    in it, a statement of a session opened before is refused (42501), and so is a new login
    (libpq keeps no SQLSTATE of a failed connection: psql and psycopg are checked by text),
    each naming the object and its function; nothing leaks anywhere."""
    c = hidden.clients
    assert leaks(text_of(case.sql)) == [], case.id
    for client in ("psycopg", "asyncpg"):  # opened while the database has no such code
        received = c.run(client, NAME_SQL)
        assert MASKED_NAME in received and leaks(received) == [], received
    hidden.pg.psql(case.code.create, dbname=HIDDEN_DB)
    try:
        received = c.run("direct", case.sql)
        assert leaks(received) != [], (
            f"{case.id} does not leak even without pgveil (a broken case):\n{received[:3000]}"
        )
        c.direct.reset()  # drops its temporary tables: they depend on the code
        hidden.reread()
        failures = []
        for client in ("psycopg", "asyncpg"):
            received = c.run(client, case.sql)
            if leaks(received) or not _refused_naming(case.code, errors_in(received), {"42501"}):
                failures.append(f"{client}, open session (leaks: {leaks(received)}):\n{received}")
        c.psycopg.close()
        c.asyncpg.close()
        for client in CLIENTS:
            received = c.run(client, case.sql)
            # asyncpg has the SQLSTATE of a refused login; libpq does not keep it
            sqlstates = {"42501"} if client == "asyncpg" else {"?????"}
            if leaks(received) or not _refused_naming(case.code, logins_in(received), sqlstates):
                failures.append(f"{client}, new login (leaks: {leaks(received)}):\n{received}")
        log = hidden.proxy.log()
        if f"calls function {case.code.function}, which is not allowed" not in log:
            failures.append("pgveil logged no rules problem naming the function")
        if leaks(log):
            failures.append(f"pgveil's log leaked: {leaks(log)}")
        assert not failures, f"{case.id}: through pgveil\n" + "\n".join(f[:3000] for f in failures)
    finally:
        hidden.pg.psql(case.code.drop, dbname=HIDDEN_DB)
        hidden.reread()
    assert hidden.problems() == 0, "pgveil still finds a rules problem after the code was dropped"


@pytest.mark.parametrize("client", CLIENTS)
def test_hidden_code_runs_when_its_function_is_allowed(hidden: Hidden, client: str) -> None:
    """The documented consent: a DBA who allows the function lets masked roles reach it.
    This one reads nothing, and the statement that needs it runs on masked data."""
    c = hidden.clients
    hidden.pg.psql(ALLOWED_OPERATOR.create, dbname=HIDDEN_DB)
    try:
        assert NAME in c.run("direct", ALLOWED_SQL)  # only the user operator runs it
        hidden.reread()
        assert hidden.problems() == 0, hidden.proxy.log()[-3000:]
        received = c.run(client, ALLOWED_SQL)
        assert MASKED_NAME in received and leaks(received) == [], received
        assert errors_in(received) == [] and logins_in(received) == [], received
    finally:
        hidden.pg.psql(ALLOWED_OPERATOR.drop, dbname=HIDDEN_DB)
        hidden.reread()


def test_hidden_proxy_survives(hidden: Hidden) -> None:
    assert hidden.proxy.proc.poll() is None, hidden.proxy.log()[-3000:]
    assert "Traceback" not in hidden.proxy.log()
