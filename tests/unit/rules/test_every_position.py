"""Every expression position of an allowed statement is analysed like a read.

Each case puts something a masked role must not get past the analyser (a function that
reads data behind the rewriter's back, a denied relation, a user function that is not
allow-listed, a user operator) into one grammar position, and expects the refusal that
position's analysis gives; or a read of a deny column, which the analysis of the position
turns into a masking subquery where it is NULL (`MASKED`). The integration corpus runs the
same classes against a server.
"""

from __future__ import annotations

import pytest

from tests.unit.rules.fixtures import analyzer

AN = analyzer()

DENY_SUB = "(SELECT length(cc_number) FROM billing.customers LIMIT 1)"
# the read is rewritten: the subquery reads a masking subquery where the column is NULL
MASKED = "masked"
LO = "function lo_get can read data pgveil cannot mask"
LEAK = "function billing.leak is not allowed for masked roles"
STATS = "pg_stats exposes column values or query text"
OPERATOR = "operator ==== is not allowed for masked roles"
READS = "a write whose new values read personal columns is refused"

CASES = [
    # assignment targets: subscripts are expressions, and they decide where a value goes
    (
        "insert_cols_subscript",
        f"INSERT INTO public.notes (id, body[{DENY_SUB}]) VALUES (1, 'x')",
        READS,
    ),
    ("insert_cols_function", "INSERT INTO public.notes (body[lo_get(1)::int]) VALUES ('x')", LO),
    ("update_set_subscript", f"UPDATE public.notes SET body[{DENY_SUB}] = 'x'", READS),
    (
        "update_set_subscript_stats",
        "UPDATE public.notes SET body[(SELECT 1 FROM pg_stats)] = 'x'",
        STATS,
    ),
    ("update_set_subscript_reads_target", "UPDATE billing.customers SET extra[name] = '1'", READS),
    (
        "update_set_subscript_reads_target_qualified",
        "UPDATE billing.customers c SET extra[c.email] = '1'",
        READS,
    ),
    (
        "update_set_field_subscript_function",
        "UPDATE public.notes SET body[billing.leak()] = 'x'",
        LEAK,
    ),
    (
        "on_conflict_set_subscript",
        f"INSERT INTO public.notes (id) VALUES (1) ON CONFLICT (id) DO UPDATE SET body[{DENY_SUB}] = 'x'",
        READS,
    ),
    (
        "on_conflict_set_subscript_reads_target",
        "INSERT INTO billing.customers (i_customer) VALUES (1) ON CONFLICT (i_customer) "
        "DO UPDATE SET extra[billing.customers.login] = '1'",
        READS,
    ),
    (
        "on_conflict_inference_function",
        "INSERT INTO public.notes (id) VALUES (1) ON CONFLICT ((lo_get(id))) DO NOTHING",
        LO,
    ),
    # table definitions: evaluated at CREATE, or on every row the session writes
    (
        "partition_bound_list",
        "CREATE TEMP TABLE p PARTITION OF public.notes FOR VALUES IN (lo_get(1))",
        LO,
    ),
    (
        "partition_bound_range",
        "CREATE TEMP TABLE p PARTITION OF public.notes FOR VALUES FROM (billing.leak()) TO (9)",
        LEAK,
    ),
    (
        "partition_key_expression",
        "CREATE TEMP TABLE p (a int) PARTITION BY LIST ((billing.leak()))",
        LEAK,
    ),
    ("column_default", "CREATE TEMP TABLE t (a text DEFAULT lo_get(1))", LO),
    ("column_check", "CREATE TEMP TABLE t (a int CHECK (a > length(billing.leak())))", LEAK),
    ("table_check", "CREATE TEMP TABLE t (a int, CHECK (billing.leak() IS NOT NULL))", LEAK),
    (
        "generated_column",
        "CREATE TEMP TABLE t (a int, b text GENERATED ALWAYS AS (lo_get(a)) STORED)",
        LO,
    ),
    (
        "exclusion_operator",
        "CREATE TEMP TABLE t (a int, EXCLUDE USING btree (a WITH ====))",
        OPERATOR,
    ),
    (
        "exclusion_predicate",
        "CREATE TEMP TABLE t (a int, EXCLUDE (a WITH =) WHERE (billing.leak() > 0))",
        LEAK,
    ),
    (
        "foreign_key_to_protected",
        "CREATE TEMP TABLE t (e text REFERENCES billing.customers (email))",
        "a foreign key to protected table billing.customers could confirm values of its columns",
    ),
    ("typed_column_typmod", "CREATE TEMP TABLE t (a numeric(lo_get(1)))", LO),
    # clauses of queries
    ("limit_count", "SELECT 1 LIMIT (SELECT count(*) FROM pg_stats)", STATS),
    ("offset", f"SELECT 1 OFFSET {DENY_SUB}", MASKED),
    ("fetch_first", f"SELECT 1 FETCH FIRST {DENY_SUB} ROWS ONLY", MASKED),
    (
        "window_frame_start",
        f"SELECT sum(1) OVER (ORDER BY 1 ROWS BETWEEN {DENY_SUB} PRECEDING AND CURRENT ROW)",
        MASKED,
    ),
    (
        "window_frame_end",
        "SELECT sum(1) OVER (ORDER BY 1 ROWS BETWEEN CURRENT ROW AND lo_get(1)::int FOLLOWING)",
        LO,
    ),
    (
        "named_window",
        f"SELECT sum(1) OVER w FROM public.notes WINDOW w AS (PARTITION BY {DENY_SUB})",
        MASKED,
    ),
    ("tablesample_argument", f"SELECT 1 FROM public.notes TABLESAMPLE SYSTEM ({DENY_SUB})", MASKED),
    (
        "tablesample_repeatable",
        "SELECT 1 FROM public.notes TABLESAMPLE SYSTEM (1) REPEATABLE (lo_get(1)::int)",
        LO,
    ),
    ("order_by_using_operator", "SELECT id FROM public.notes ORDER BY id USING ====", OPERATOR),
    ("any_sublink_operator", "SELECT 1 WHERE 1 ==== ANY (SELECT 1)", OPERATOR),
    ("subscript_of_expression", f"SELECT (ARRAY[1,2])[{DENY_SUB}]", MASKED),
    (
        "aggregate_filter",
        f"SELECT count(*) FILTER (WHERE {DENY_SUB} > 0) FROM public.notes",
        MASKED,
    ),
    ("aggregate_order", "SELECT max(body ORDER BY lo_get(1)) FROM public.notes", LO),
    (
        "group_by_grouping_sets",
        f"SELECT 1 FROM public.notes GROUP BY GROUPING SETS (({DENY_SUB}))",
        MASKED,
    ),
    (
        "xmltable_row_expression",
        "SELECT * FROM XMLTABLE(billing.leak() PASSING '<a/>' COLUMNS a int)",
        LEAK,
    ),
    (
        "xmltable_column_default",
        "SELECT * FROM XMLTABLE('/a' PASSING '<a/>' COLUMNS a text DEFAULT lo_get(1))",
        LO,
    ),
    ("rows_from", "SELECT * FROM ROWS FROM (lo_get(1))", LO),
    ("values_list", f"VALUES ({DENY_SUB})", MASKED),
    (
        "for_update_of",
        "SELECT 1 FROM public.notes n FOR UPDATE OF n SKIP LOCKED LIMIT (SELECT 1 FROM pg_stats)",
        STATS,
    ),
    # statements around queries
    ("call_argument", f"CALL billing.invoice_total({DENY_SUB})", MASKED),
    ("execute_parameter", f"EXECUTE p({DENY_SUB})", MASKED),
    ("copy_from_where", "COPY public.notes FROM STDIN WHERE billing.leak() IS NULL", LEAK),
    ("set_value", "SET work_mem = 64", None),
    ("explain_option_analysed_query", f"EXPLAIN (ANALYZE) SELECT {DENY_SUB}", MASKED),
    (
        "create_table_as_option",
        f"CREATE TEMP TABLE t WITH (fillfactor = 70) AS SELECT {DENY_SUB}",
        MASKED,
    ),
    ("prepare_argument_type", f"PREPARE q(int) AS SELECT {DENY_SUB}", MASKED),
    ("returning_subquery", f"DELETE FROM public.notes RETURNING {DENY_SUB}", MASKED),
    ("delete_using_function", "DELETE FROM public.notes USING ROWS FROM (lo_get(1)) AS f", LO),
]


@pytest.mark.parametrize(("case", "sql", "reason"), CASES, ids=[c[0] for c in CASES])
def test_the_position_is_analysed(case: str, sql: str, reason: str | None) -> None:
    d = AN.analyze(sql)
    if reason is None:
        assert d.action != "refuse", d.reason
    elif reason is MASKED:
        # analysed like a read: the table became a masking subquery, the column NULL
        assert d.action == "rewrite", f"{case}: {d.action} {d.reason}"
        assert d.sql is not None and "CAST(NULL AS text) AS cc_number" in d.sql, d.sql
        assert "FROM billing.customers LIMIT" not in d.sql, d.sql
        assert d.denied == ("billing.customers.cc_number",), d.denied
    else:
        assert d.action == "refuse", f"{case}: {d.action} {d.sql}"
        assert reason in (d.reason or ""), d.reason


@pytest.mark.parametrize(
    "sql",
    [
        # positions that are safe stay usable
        "INSERT INTO public.notes (id, body) VALUES (1, 'x') ON CONFLICT (id) DO UPDATE SET body = excluded.body",
        "UPDATE public.notes SET body = 'x' WHERE id = 1",
        "CREATE TEMP TABLE t (a int DEFAULT 1 CHECK (a > 0), b text GENERATED ALWAYS AS (upper('x')) STORED)",
        "CREATE TEMP TABLE p PARTITION OF public.notes FOR VALUES IN (1)",
        "SELECT sum(id) OVER (ORDER BY id ROWS BETWEEN 1 PRECEDING AND CURRENT ROW) FROM public.notes",
        "SELECT 1 FROM public.notes TABLESAMPLE SYSTEM (10) REPEATABLE (1)",
        "SELECT id FROM public.notes ORDER BY id USING <",
        "LOCK TABLE public.notes IN SHARE MODE",
        "TRUNCATE public.notes",
        "SET CONSTRAINTS ALL DEFERRED",
        "DROP TABLE IF EXISTS public.notes_old",
    ],
)
def test_safe_positions_still_work(sql: str) -> None:
    d = AN.analyze(sql)
    assert d.action != "refuse", d.reason
