"""Attack corpus: SQL a curious masked role (`helpdesk`) may send to read personal data.

Every case in `ATTACKS` runs

* through pgveil with three clients (psql, psycopg 3 over the simple protocol in text format,
  asyncpg over the extended protocol in binary format), and must not leak: nothing any
  client receives (rows, COPY data, errors with all their fields, notices, notifications,
  reported parameters) may contain a secret or a transform of one (`leaks()`);
* directly against PostgreSQL as the same role, where it MUST leak: a case that does not leak
  directly proves nothing and is a broken case.

A case is one SQL string (one client request; it may hold several statements) or a tuple of
strings sent one after the other on the same session (the clients are in `attack_clients`).
psql gets them all in one script and goes on after errors. Destructive writes are wrapped in
BEGIN ... ROLLBACK so that the fixture data stays the same for every case. Objects a case creates are temporary or named
`atk_*` in public and dropped by the case and at the end of the module.
"""

from __future__ import annotations

from collections.abc import Iterator

import psycopg
import pytest

from proxy.demo.embedded_pg import EmbeddedPostgres
from tests.integration.attack_clients import (
    CLIENTS,
    PGPORT,
    Clients,
    Statements,
    open_clients,
    text_of,
)
from tests.integration.masking_fixture import HELPDESK, HELPDESK_PW, NAME, leaks
from tests.support import ProxyProcess

C1 = "WHERE i_customer = 1"
# an idle session of another user whose last query holds a personal value (pg_stat_activity)
ACTIVITY_MARK = "canary_activity"
DBLINK = (
    f"'host=127.0.0.1 port={PGPORT} user={HELPDESK} password={HELPDESK_PW} "
    "dbname=postgres sslmode=disable'"
)
SCS_TRICK = "SELECT 'x\\', ' || name || email FROM billing.customers --'"


def _ts_rewrite(select: str) -> str:
    """ts_rewrite(query, sql text) runs the SQL text it is given."""
    return "SELECT ts_rewrite('a'::tsquery, '" + select.replace("'", "''") + "')"


ATTACKS: list[tuple[str, Statements]] = [
    # ---- direct column reads ---------------------------------------------------------------
    ("read_plain", "SELECT name, email, phone FROM billing.customers"),
    ("read_alias", "SELECT c.name AS n, c.email AS e FROM billing.customers AS c"),
    ("read_upper_case_idents", "SELECT NAME, EMAIL, PHONE FROM BILLING.CUSTOMERS"),
    ("read_quoted_idents", 'SELECT "name", "email" FROM "billing"."customers"'),
    (
        "read_three_part_names",
        "SELECT billing.customers.name, billing.customers.phone FROM billing.customers",
    ),
    (
        "read_four_part_names",
        "SELECT postgres.billing.customers.name FROM postgres.billing.customers",
    ),
    ("read_table_name_qualifier", "SELECT customers.name, customers.login FROM billing.customers"),
    (
        "read_search_path",
        ("SET search_path = billing, public", "SELECT name, login FROM customers"),
    ),
    (
        "read_search_path_set_config",
        ("SELECT set_config('search_path', 'billing', false)", "SELECT phone FROM customers"),
    ),
    (
        "read_search_path_set_local",
        ("BEGIN", "SET LOCAL search_path = billing", "SELECT email FROM customers", "ROLLBACK"),
    ),
    (
        "read_search_path_three_part",
        ("SET search_path = billing", "SELECT billing.customers.name FROM customers"),
    ),
    ("read_table_stmt", "TABLE billing.customers"),
    ("read_select_star", "SELECT * FROM billing.customers"),
    ("read_only", "SELECT name FROM ONLY billing.customers"),
    ("read_inheritance_star", "SELECT name FROM billing.customers*"),
    ("read_unicode_escape_idents", 'SELECT U&"n\\0061me" FROM billing.U&"cust\\006Fmers"'),
    (
        "read_comments_between_idents",
        "SELECT /* a */ name /* b */ FROM billing/* c */./* d */customers",
    ),
    (
        "read_nested_comment",
        "SELECT /* /* nested */ still a comment */ email FROM billing.customers",
    ),
    ("read_dollar_quoting", "SELECT $q$<$q$ || name || $$>$$ FROM billing.customers"),
    ("read_escape_string", "SELECT E'\\x3c' || login FROM billing.customers"),
    ("read_unicode_string_uescape", "SELECT U&'!003c' UESCAPE '!' || email FROM billing.customers"),
    ("read_for_update", ("BEGIN", "SELECT name FROM billing.customers FOR UPDATE", "ROLLBACK")),
    ("read_order_by_position", "SELECT name FROM billing.customers ORDER BY 1 DESC"),
    ("read_values_subquery", f"VALUES ((SELECT email FROM billing.customers {C1}))"),
    (
        "read_multi_statement_one_query",
        "SELECT 1 AS warmup; SELECT name, phone FROM billing.customers",
    ),
    # ---- subqueries, CTEs, joins, set operations, windows, aggregates -------------------------
    ("sub_scalar", f"SELECT (SELECT name FROM billing.customers {C1})"),
    ("sub_from", "SELECT x.n FROM (SELECT name AS n FROM billing.customers) x"),
    (
        "sub_correlated",
        "SELECT (SELECT email FROM billing.customers c WHERE c.i_customer = a.i_customer) "
        "FROM billing.accounts a",
    ),
    ("sub_array", "SELECT ARRAY(SELECT phone FROM billing.customers)"),
    ("cte_plain", "WITH c AS (SELECT name FROM billing.customers) SELECT * FROM c"),
    (
        "cte_materialized",
        "WITH c AS MATERIALIZED (SELECT name, email FROM billing.customers) "
        "SELECT name || '|' || email FROM c",
    ),
    (
        "cte_not_materialized",
        "WITH c AS NOT MATERIALIZED (SELECT * FROM billing.customers) SELECT login FROM c",
    ),
    (
        "cte_recursive",
        f"WITH RECURSIVE r(n, s) AS (SELECT 1, name::text FROM billing.customers {C1} "
        "UNION ALL SELECT n + 1, s FROM r WHERE n < 2) SELECT s FROM r",
    ),
    (
        "cte_recursive_char_by_char",
        "WITH RECURSIVE r(i, ch) AS ("
        f"SELECT 1, substr((SELECT name FROM billing.customers {C1}), 1, 1) UNION ALL "
        f"SELECT i + 1, substr((SELECT name FROM billing.customers {C1}), i + 1, 1) "
        "FROM r WHERE i < 30) SELECT string_agg(ch, '' ORDER BY i) FROM r",
    ),
    (
        "cte_shadows_table_search_path",
        (
            "SET search_path = billing, public",
            "WITH customers AS (SELECT * FROM customers) "
            "SELECT name || '' AS n, email || '' AS e FROM customers",
        ),
    ),
    (
        "cte_shadow_sibling_forward_reference",
        (
            "SET search_path = billing",
            "WITH a AS (SELECT name, phone FROM customers), customers AS (SELECT 1) "
            "SELECT name || '', phone || '' FROM a",
        ),
    ),
    (
        "cte_shadow_whole_row_with_card",
        (
            "SET search_path = billing",
            "WITH customers AS (SELECT * FROM customers) SELECT c::text FROM customers c",
        ),
    ),
    (
        "cte_shadow_set_config_search_path",
        (
            "SELECT set_config('search_path', 'billing', false)",
            "WITH customers AS (SELECT * FROM customers) SELECT upper(login) FROM customers",
        ),
    ),
    (
        "cte_shadow_accounts",
        (
            "SET search_path = billing",
            "WITH accounts AS (SELECT * FROM accounts) SELECT host(ip), mac::text FROM accounts",
        ),
    ),
    (
        "cte_shadow_partition",
        (
            "SET search_path = billing",
            "WITH xdrs_1 AS (SELECT * FROM xdrs_1) SELECT cli || '' FROM xdrs_1",
        ),
    ),
    (
        "cte_shadow_view_with_rules",
        (
            "SET search_path = billing",
            "WITH customer_contacts AS (SELECT * FROM customer_contacts) "
            "SELECT name || '' FROM customer_contacts",
        ),
    ),
    (
        "join_using",
        "SELECT c.name, a.ip FROM billing.customers c JOIN billing.accounts a USING (i_customer)",
    ),
    ("join_natural", "SELECT * FROM billing.customers NATURAL JOIN billing.accounts"),
    (
        "join_lateral_subquery",
        "SELECT l.x FROM billing.accounts a LEFT JOIN LATERAL "
        "(SELECT name AS x FROM billing.customers c WHERE c.i_customer = a.i_customer) l ON true",
    ),
    (
        "join_lateral_unnest",
        "SELECT t.* FROM billing.customers c, LATERAL unnest(ARRAY[c.name, c.email]) t",
    ),
    (
        "join_parenthesised_alias",
        "SELECT j.name FROM (billing.customers c JOIN billing.accounts a USING (i_customer)) AS j",
    ),
    ("set_union", "SELECT name FROM billing.customers UNION SELECT email FROM billing.customers"),
    ("set_except", "SELECT name FROM billing.customers EXCEPT SELECT 'x'"),
    (
        "set_intersect_self",
        "SELECT email FROM billing.customers INTERSECT SELECT email FROM billing.customers",
    ),
    (
        "set_union_all_values",
        "SELECT n FROM (VALUES ('a')) v(n) UNION ALL SELECT name FROM billing.customers",
    ),
    (
        "window_functions",
        "SELECT first_value(name) OVER (ORDER BY i_customer), lag(email) OVER w "
        "FROM billing.customers WINDOW w AS (ORDER BY i_customer)",
    ),
    ("window_string_agg_over", "SELECT string_agg(email, ',') OVER () FROM billing.customers"),
    ("agg_string_agg", "SELECT string_agg(name || ':' || phone, ';') FROM billing.customers"),
    ("agg_array_agg", "SELECT array_agg(login ORDER BY login) FROM billing.customers"),
    ("agg_json_agg_rows", "SELECT json_agg(c) FROM billing.customers c"),
    ("agg_jsonb_object_agg", "SELECT jsonb_object_agg(name, email) FROM billing.customers"),
    ("agg_min_max", "SELECT min(name), max(email) FROM billing.customers"),
    ("agg_filter", f"SELECT array_agg(name) FILTER ({C1}) FROM billing.customers"),
    (
        "group_by_having",
        "SELECT name, count(*) FROM billing.customers GROUP BY name HAVING name LIKE '%'",
    ),
    (
        "distinct_on_order_by",
        "SELECT DISTINCT ON (email) email, phone FROM billing.customers ORDER BY email DESC",
    ),
    ("distinct", "SELECT DISTINCT login FROM billing.customers"),
    ("order_by_collate", 'SELECT name FROM billing.customers ORDER BY name COLLATE "C"'),
    (
        "grouping_sets",
        "SELECT name, email, count(*) FROM billing.customers GROUP BY GROUPING SETS ((name), (email))",
    ),
    ("grouping_cube", "SELECT name, phone FROM billing.customers GROUP BY CUBE (name, phone)"),
    # ---- expressions and casts -------------------------------------------------------------
    ("expr_upper_lower", "SELECT upper(name), lower(email) FROM billing.customers"),
    (
        "expr_substr",
        "SELECT substr(name, 2, 17), substring(email FROM 2 FOR 13) FROM billing.customers",
    ),
    ("expr_reverse", "SELECT reverse(name), reverse(phone) FROM billing.customers"),
    ("expr_encode_hex", "SELECT encode(convert_to(name, 'UTF8'), 'hex') FROM billing.customers"),
    (
        "expr_encode_base64",
        "SELECT encode(convert_to(login, 'UTF8'), 'base64') FROM billing.customers",
    ),
    ("expr_md5", "SELECT md5(name), md5(phone), md5(login) FROM billing.customers"),
    (
        "expr_to_hex_ascii",
        "SELECT (SELECT string_agg(to_hex(ascii(substr(c.name, i, 1))), '' ORDER BY i) "
        "FROM generate_series(1, length(c.name)) i) FROM billing.customers c",
    ),
    (
        "expr_chr_ascii_roundtrip",
        "SELECT (SELECT string_agg(chr(ascii(substr(c.email, i, 1))), '' ORDER BY i) "
        "FROM generate_series(1, length(c.email)) i) FROM billing.customers c",
    ),
    ("expr_convert_to_bytea", "SELECT convert_to(name, 'UTF8') FROM billing.customers"),
    ("expr_decode_md5", "SELECT encode(decode(md5(name), 'hex'), 'hex') FROM billing.customers"),
    ("expr_format", "SELECT format('%s|%I|%L', name, email, phone) FROM billing.customers"),
    ("expr_concat_ws", "SELECT concat_ws(',', name, phone, login) FROM billing.customers"),
    ("expr_lpad_initcap", "SELECT lpad(initcap(name), 30, '*') FROM billing.customers"),
    ("expr_split_part", "SELECT split_part(email, '@', 1) FROM billing.customers"),
    ("expr_string_to_table", "SELECT string_to_table(email, '.') FROM billing.customers"),
    ("expr_quote_ident", "SELECT quote_ident(name), quote_literal(login) FROM billing.customers"),
    (
        "expr_to_char_concat",
        "SELECT to_char(i_customer, 'FM9') || ':' || login FROM billing.customers",
    ),
    ("expr_translate", "SELECT translate(name, 'abc', 'ABC') FROM billing.customers"),
    ("expr_regexp_replace", "SELECT regexp_replace(name, '^Z', 'z') FROM billing.customers"),
    ("expr_regexp_match", "SELECT regexp_match(email, '^(.*)@') FROM billing.customers"),
    ("expr_digits_only", "SELECT regexp_replace(phone, '\\D', '', 'g') FROM billing.customers"),
    ("expr_to_tsvector", "SELECT to_tsvector('simple', name) FROM billing.customers"),
    ("expr_jsonb_build", "SELECT jsonb_build_object('n', name, 'p', phone) FROM billing.customers"),
    (
        "expr_substr_chunks_generate_series",
        "SELECT substr(c.name, g, 6) FROM billing.customers c, generate_series(1, 20, 6) g",
    ),
    (
        "expr_like_position_filter",
        "SELECT name FROM billing.customers WHERE name LIKE 'Zeb%' AND position('Quix' IN name) > 0",
    ),
    (
        "expr_case_reveal",
        "SELECT CASE WHEN substr(name, 1, 4) = 'Zebu' THEN name ELSE 'no' END FROM billing.customers",
    ),
    (
        "expr_division_by_zero_oracle",
        f"SELECT 1 / position('Quix' IN name), name FROM billing.customers {C1}",
    ),
    ("cast_int_error", f"SELECT name::int FROM billing.customers {C1}"),
    ("cast_numeric_phone", f"SELECT CAST(phone AS numeric) + 1 FROM billing.customers {C1}"),
    ("cast_numeric_email_error", f"SELECT email::numeric FROM billing.customers {C1}"),
    ("cast_json_error_detail", f"SELECT name::json FROM billing.customers {C1}"),
    ("cast_uuid_error", f"SELECT login::uuid FROM billing.customers {C1}"),
    ("cast_regclass_error", f"SELECT login::regclass FROM billing.customers {C1}"),
    ("cast_in_where_error", f"SELECT 1 FROM billing.customers {C1} AND email::int > 0"),
    ("cast_quote_prefix_error", f"SELECT ('\"' || name)::int FROM billing.customers {C1}"),
    ("current_setting_error", f"SELECT current_setting(login) FROM billing.customers {C1}"),
    (
        "inet_ip_mac_text",
        "SELECT ip::text, mac::text, host(ip), text(ip), abbrev(ip) FROM billing.accounts",
    ),
    ("inet_arith_rebuild", "SELECT '0.0.0.0'::inet + (ip - '0.0.0.0'::inet) FROM billing.accounts"),
    ("inet_bit_ops", "SELECT ip & '255.255.255.255', ip | '0.0.0.0' FROM billing.accounts"),
    ("mac_convert", "SELECT mac::macaddr8, trunc(mac), mac FROM billing.accounts"),
    # ---- whole-row references --------------------------------------------------------------
    ("row_alias", "SELECT c FROM billing.customers c"),
    ("row_alias_star", "SELECT c.* FROM billing.customers c"),
    ("row_to_json", "SELECT row_to_json(c) FROM billing.customers c"),
    ("row_to_jsonb_unaliased", "SELECT to_jsonb(customers) FROM billing.customers"),
    ("row_text_cast", "SELECT customers::text FROM billing.customers"),
    ("row_constructor_star", "SELECT ROW(c.*)::text FROM billing.customers c"),
    ("row_constructor_explicit", "SELECT ROW(name, email, phone) FROM billing.customers"),
    ("row_jsonb_each_text", "SELECT jsonb_each_text(to_jsonb(c)) FROM billing.customers c"),
    ("row_json_each_text", "SELECT json_each_text(row_to_json(c)) FROM billing.customers c"),
    ("row_field_selection", "SELECT (c).name, (c).email FROM billing.customers c"),
    ("row_functional_notation", "SELECT name(c), email(c) FROM billing.customers c"),
    ("row_record_out", "SELECT record_out(c) FROM billing.customers c"),
    ("row_array_of_rows", "SELECT array_agg(c)::text FROM billing.customers c"),
    (
        "row_json_populate",
        "SELECT json_populate_record(NULL::billing.customers, row_to_json(c)) FROM billing.customers c",
    ),
    ("row_card_via_json", "SELECT to_jsonb(c) ->> 'cc_number' FROM billing.customers c"),
    ("row_accounts", "SELECT a FROM billing.accounts a"),
    # ---- JSON on the custom field ----------------------------------------------------------
    ("json_arrow", "SELECT extra ->> 'dl', extra -> 'dl' FROM billing.customers"),
    ("json_path_operator", "SELECT extra #>> '{dl}' FROM billing.customers"),
    ("json_subscript", "SELECT extra['dl'] FROM billing.customers"),
    ("json_each", "SELECT j.* FROM billing.customers c, jsonb_each(c.extra) j"),
    ("json_path_query", "SELECT jsonb_path_query(extra, '$.dl') FROM billing.customers"),
    (
        "json_path_predicate",
        "SELECT extra FROM billing.customers WHERE extra @? '$.dl ? (@ like_regex \"^DL-9\")'",
    ),
    (
        "json_to_record",
        "SELECT r.* FROM billing.customers c, jsonb_to_record(c.extra) AS r(dl text)",
    ),
    ("json_text_cast", "SELECT extra::text, jsonb_pretty(extra) FROM billing.customers"),
    (
        "json_path_datetime_error",
        f"SELECT jsonb_path_query(extra, '$.dl.datetime()') FROM billing.customers {C1}",
    ),
    # ---- XML --------------------------------------------------------------------------------
    ("xml_element", "SELECT xmlelement(name c, name) FROM billing.customers"),
    ("xml_forest", "SELECT xmlforest(name, email, phone) FROM billing.customers"),
    ("xml_agg", "SELECT xmlagg(xmlelement(name n, login)) FROM billing.customers"),
    ("xml_xpath", "SELECT xpath('/a/text()', xmlelement(name a, email)) FROM billing.customers"),
    (
        "xml_table",
        f"SELECT x.* FROM XMLTABLE('/r' PASSING (SELECT xmlelement(name r, name) FROM billing.customers {C1}) "
        "COLUMNS v text PATH '.') x",
    ),
    ("xml_parse_error_detail", f"SELECT xmlparse(document name) FROM billing.customers {C1}"),
    (
        "xml_query_to_xml",
        "SELECT query_to_xml('SELECT name FROM billing.customers', true, false, '')",
    ),
    (
        "xml_query_to_xml_qualified_upper",
        "SELECT PG_CATALOG.QUERY_TO_XML('select email from billing.customers', true, false, '')",
    ),
    ("xml_table_to_xml", "SELECT table_to_xml('billing.customers', true, false, '')"),
    ("xml_schema_to_xml", "SELECT schema_to_xml('billing', true, false, '')"),
    (
        "xml_cursor_to_xml",
        (
            "BEGIN",
            "DECLARE atk_xc CURSOR FOR SELECT name FROM billing.customers",
            "SELECT cursor_to_xml('atk_xc', 10, false, true, '')",
            "ROLLBACK",
        ),
    ),
    # ---- errors and notices ----------------------------------------------------------------
    (
        "err_not_null_failing_row",
        ("BEGIN", f"UPDATE billing.customers SET name = NULL {C1}", "ROLLBACK"),
    ),
    (
        "err_not_null_failing_row_balance",
        ("BEGIN", f"UPDATE billing.customers SET balance = NULL {C1}", "ROLLBACK"),
    ),
    (
        "err_unique_violation_insert_select",
        (
            "BEGIN",
            "INSERT INTO billing.customers (i_customer, name, email) "
            f"SELECT 99, 'x', email FROM billing.customers {C1}",
            "ROLLBACK",
        ),
    ),
    (
        "err_unique_violation_update_subquery",
        (
            "BEGIN",
            f"UPDATE billing.customers SET email = (SELECT email FROM billing.customers {C1}) "
            "WHERE i_customer = 2",
            "ROLLBACK",
        ),
    ),
    (
        "err_raise_notice_do",
        f"DO $$BEGIN RAISE NOTICE 'n=%', (SELECT name FROM billing.customers {C1}); END$$",
    ),
    (
        "err_raise_exception_do",
        "DO $$BEGIN RAISE EXCEPTION USING "
        f"MESSAGE = (SELECT email FROM billing.customers {C1}), "
        f"HINT = (SELECT phone FROM billing.customers {C1}); END$$",
    ),
    (
        "notice_pg_cancel_backend_pid",
        f"SELECT pg_cancel_backend(substr(phone, 5, 9)::int) FROM billing.customers {C1}",
    ),
    (
        "err_explain_analyze_cast",
        f"EXPLAIN (ANALYZE, VERBOSE) SELECT name::int FROM billing.customers {C1}",
    ),
    (
        "err_explain_analyze_failing_row",
        (
            "BEGIN",
            f"EXPLAIN (ANALYZE, VERBOSE) UPDATE billing.customers SET name = NULL {C1}",
            "ROLLBACK",
        ),
    ),
    (
        "err_explain_json_cast",
        f"EXPLAIN (ANALYZE, FORMAT JSON) SELECT email::json FROM billing.customers {C1}",
    ),
    # ---- COPY TO STDOUT --------------------------------------------------------------------
    ("copy_table", "COPY billing.customers TO STDOUT"),
    (
        "copy_columns_csv_header",
        "COPY billing.customers (name, email, login) TO STDOUT WITH (FORMAT csv, HEADER)",
    ),
    ("copy_table_binary", "COPY billing.customers TO STDOUT (FORMAT binary)"),
    (
        "copy_query_csv",
        "COPY (SELECT upper(name), reverse(email) FROM billing.customers) TO STDOUT CSV",
    ),
    (
        "copy_query_binary_json",
        "COPY (SELECT row_to_json(c) FROM billing.customers c) TO STDOUT (FORMAT binary)",
    ),
    ("copy_accounts", "COPY billing.accounts TO STDOUT"),
    ("copy_partition", "COPY billing.xdrs_1 TO STDOUT"),
    ("copy_view", "COPY (SELECT * FROM billing.customer_contacts) TO STDOUT"),
    (
        "copy_update_returning",
        f"COPY (UPDATE billing.customers SET notes = notes {C1} RETURNING name, phone) TO STDOUT",
    ),
    (
        "copy_update_returning_subquery",
        f"COPY (UPDATE billing.customers SET notes = notes {C1} RETURNING (SELECT email)) TO STDOUT",
    ),
    (
        "copy_cte_shadow_star",
        (
            "SET search_path = billing",
            "COPY (WITH customers AS (SELECT * FROM customers) SELECT * FROM customers) TO STDOUT",
        ),
    ),
    # ---- cursors and SQL PREPARE / EXECUTE -------------------------------------------------
    (
        "cursor_declare_fetch",
        (
            "BEGIN",
            "DECLARE atk_c1 CURSOR FOR SELECT name, email FROM billing.customers",
            "FETCH ALL FROM atk_c1",
            "ROLLBACK",
        ),
    ),
    (
        "cursor_with_hold",
        (
            "DECLARE atk_c2 CURSOR WITH HOLD FOR SELECT c FROM billing.customers c",
            "FETCH 2 FROM atk_c2",
            "CLOSE atk_c2",
        ),
    ),
    (
        "cursor_scroll",
        (
            "BEGIN",
            "DECLARE atk_c3 SCROLL CURSOR FOR TABLE billing.customers",
            "FETCH LAST FROM atk_c3",
            "FETCH PRIOR FROM atk_c3",
            "ROLLBACK",
        ),
    ),
    (
        "cursor_pg_cursors",
        (
            "BEGIN",
            "DECLARE atk_c4 CURSOR FOR SELECT phone FROM billing.customers",
            "SELECT name, statement FROM pg_cursors",
            "FETCH ALL FROM atk_c4",
            "ROLLBACK",
        ),
    ),
    (
        "cursor_cte_shadow",
        (
            "SET search_path = billing",
            "BEGIN",
            "DECLARE atk_c5 CURSOR FOR WITH customers AS (SELECT * FROM customers) "
            "SELECT email || '' FROM customers",
            "FETCH ALL FROM atk_c5",
            "ROLLBACK",
        ),
    ),
    (
        "prepare_execute",
        (
            "PREPARE atk_p1 AS SELECT name, phone FROM billing.customers WHERE i_customer = $1",
            "EXECUTE atk_p1(1)",
            "DEALLOCATE atk_p1",
        ),
    ),
    (
        "prepare_typed_param",
        (
            "PREPARE atk_p2(text) AS SELECT email FROM billing.customers WHERE name <> $1",
            "EXECUTE atk_p2('x')",
            "DEALLOCATE atk_p2",
        ),
    ),
    (
        "prepare_pg_prepared_statements",
        (
            "PREPARE atk_p3 AS SELECT login FROM billing.customers",
            "SELECT name, statement FROM pg_prepared_statements",
            "EXECUTE atk_p3",
        ),
    ),
    (
        "prepare_name_like_denied_view",
        (
            'PREPARE "pg_stats" AS SELECT name FROM billing.customers',
            'EXECUTE "pg_stats"',
            'DEALLOCATE "pg_stats"',
        ),
    ),
    (
        "prepare_cte_shadow",
        (
            "SET search_path = billing",
            "PREPARE atk_p4 AS WITH customers AS (SELECT * FROM customers) "
            "SELECT login || '' FROM customers",
            "EXECUTE atk_p4",
        ),
    ),
    # ---- writes ------------------------------------------------------------------------------
    (
        "upd_returning_star",
        ("BEGIN", f"UPDATE billing.customers SET notes = notes {C1} RETURNING *", "ROLLBACK"),
    ),
    (
        "upd_returning_expressions",
        (
            "BEGIN",
            f"UPDATE billing.customers c SET notes = 'x' {C1} "
            "RETURNING upper(c.name), c.extra ->> 'dl', reverse(phone)",
            "ROLLBACK",
        ),
    ),
    (
        "upd_returning_whole_row",
        (
            "BEGIN",
            f"UPDATE billing.customers c SET notes = 'x' {C1} RETURNING row_to_json(c)",
            "ROLLBACK",
        ),
    ),
    (
        "upd_set_notes_from_name_returning",
        ("BEGIN", f"UPDATE billing.customers SET notes = name {C1} RETURNING notes", "ROLLBACK"),
    ),
    (
        "upd_set_notes_then_select",
        (
            "BEGIN",
            f"UPDATE billing.customers SET notes = upper(email) {C1}",
            f"SELECT notes FROM billing.customers {C1}",
            "ROLLBACK",
        ),
    ),
    (
        "upd_set_notes_from_row_text",
        (
            "BEGIN",
            f"UPDATE billing.customers c SET notes = c::text {C1} RETURNING notes",
            "ROLLBACK",
        ),
    ),
    (
        "upd_set_notes_from_json_key",
        (
            "BEGIN",
            f"UPDATE billing.customers SET notes = extra ->> 'dl' {C1}",
            f"SELECT notes FROM billing.customers {C1}",
            "ROLLBACK",
        ),
    ),
    (
        "upd_returning_unqualified_subquery",
        (
            "BEGIN",
            f"UPDATE billing.customers SET notes = notes {C1} RETURNING (SELECT name), (SELECT email)",
            "ROLLBACK",
        ),
    ),
    (
        "upd_returning_array_subquery",
        (
            "BEGIN",
            f"UPDATE billing.customers SET notes = notes {C1} "
            "RETURNING ARRAY(SELECT phone), (SELECT x FROM (SELECT login) s(x))",
            "ROLLBACK",
        ),
    ),
    (
        "upd_where_subquery_error_quote",
        (
            "BEGIN",
            f"UPDATE billing.customers SET notes = notes {C1} AND (SELECT ('\"' || name)::int) = 1",
            "ROLLBACK",
        ),
    ),
    (
        "upd_from_join_returning",
        (
            "BEGIN",
            "UPDATE billing.accounts a SET id = id FROM billing.customers c "
            "WHERE c.i_customer = a.i_customer RETURNING c.name, a.ip",
            "ROLLBACK",
        ),
    ),
    (
        "upd_cte_named_like_target",
        (
            "SET search_path = billing",
            "BEGIN",
            "WITH customers AS (SELECT 1) UPDATE customers SET notes = notes "
            f"{C1} RETURNING name || '', email || ''",
            "ROLLBACK",
        ),
    ),
    (
        "upd_view_returning",
        (
            "BEGIN",
            f"UPDATE billing.customer_contacts SET i_customer = i_customer {C1} RETURNING name, email",
            "ROLLBACK",
        ),
    ),
    (
        "upd_view_returning_subquery",
        (
            "BEGIN",
            f"UPDATE billing.customer_contacts SET i_customer = i_customer {C1} "
            "RETURNING (SELECT name)",
            "ROLLBACK",
        ),
    ),
    (
        "upd_partition_returning_subquery",
        (
            "BEGIN",
            "UPDATE billing.xdrs_1 SET cld = cld WHERE i_account = 10 RETURNING (SELECT cli)",
            "ROLLBACK",
        ),
    ),
    (
        "upd_partitioned_parent_returning",
        ("BEGIN", "UPDATE billing.xdrs SET charged = charged RETURNING cli", "ROLLBACK"),
    ),
    (
        "ins_select_into_temp",
        (
            "BEGIN",
            "CREATE TEMP TABLE atk_t1 (x text)",
            "INSERT INTO atk_t1 SELECT name FROM billing.customers",
            "SELECT x FROM atk_t1",
            "ROLLBACK",
        ),
    ),
    (
        "ins_select_returning",
        (
            "BEGIN",
            "CREATE TEMP TABLE atk_t2 (x text)",
            "INSERT INTO atk_t2 SELECT email FROM billing.customers RETURNING x",
            "ROLLBACK",
        ),
    ),
    (
        "ins_values_subquery_returning",
        (
            "BEGIN",
            "CREATE TEMP TABLE atk_t3 (x text)",
            f"INSERT INTO atk_t3 VALUES ((SELECT phone FROM billing.customers {C1})) RETURNING *",
            "ROLLBACK",
        ),
    ),
    (
        "ins_on_conflict_returning",
        (
            "BEGIN",
            "INSERT INTO billing.customers (i_customer, name) VALUES (1, 'x') "
            "ON CONFLICT (i_customer) DO UPDATE SET notes = billing.customers.notes "
            "RETURNING name, email, login",
            "ROLLBACK",
        ),
    ),
    (
        "ins_on_conflict_returning_subquery",
        (
            "BEGIN",
            "INSERT INTO billing.customers (i_customer, name) VALUES (1, 'x') "
            "ON CONFLICT (i_customer) DO UPDATE SET notes = billing.customers.notes "
            "RETURNING (SELECT name), (SELECT phone)",
            "ROLLBACK",
        ),
    ),
    (
        "ins_cte_shadow_into_temp",
        (
            "SET search_path = billing, public",
            "BEGIN",
            "CREATE TEMP TABLE atk_t4 (x text, y text)",
            "WITH customers AS (SELECT * FROM customers) "
            "INSERT INTO atk_t4 SELECT name, cc_number FROM customers",
            "SELECT x, y FROM atk_t4",
            "ROLLBACK",
        ),
    ),
    (
        "ins_on_conflict_where_error_quote",
        (
            "BEGIN",
            "INSERT INTO billing.customers AS t (i_customer, name) VALUES (1, 'x') "
            "ON CONFLICT (i_customer) DO UPDATE SET notes = t.notes "
            "WHERE (SELECT ('\"' || t.email)::int) = 1",
            "ROLLBACK",
        ),
    ),
    (
        "del_cte_named_like_target",
        (
            "SET search_path = billing",
            "BEGIN",
            "WITH accounts AS (SELECT 1) DELETE FROM accounts WHERE i_account = 10 "
            "RETURNING host(ip), mac::text",
            "ROLLBACK",
        ),
    ),
    (
        "del_returning_accounts",
        (
            "BEGIN",
            "DELETE FROM billing.accounts WHERE i_account = 10 RETURNING ip, mac, host(ip)",
            "ROLLBACK",
        ),
    ),
    (
        "del_returning_subquery",
        (
            "BEGIN",
            "DELETE FROM billing.accounts WHERE i_account = 10 "
            "RETURNING (SELECT host(ip)), (SELECT mac::text)",
            "ROLLBACK",
        ),
    ),
    (
        "del_customer_returning_star",
        (
            "BEGIN",
            "DELETE FROM billing.xdrs WHERE i_account = 10",
            f"DELETE FROM billing.accounts {C1}",
            f"DELETE FROM billing.customers {C1} RETURNING *",
            "ROLLBACK",
        ),
    ),
    (
        "del_using_returning",
        (
            "BEGIN",
            "DELETE FROM billing.xdrs x USING billing.customers c "
            "WHERE c.i_customer = 1 AND x.i_account = 10 RETURNING x.cli, c.name",
            "ROLLBACK",
        ),
    ),
    (
        "writable_cte_delete",
        (
            "BEGIN",
            "WITH d AS (DELETE FROM billing.accounts WHERE i_account = 10 RETURNING *) "
            "SELECT host(ip), mac FROM d",
            "ROLLBACK",
        ),
    ),
    (
        "writable_cte_update_subquery",
        (
            "BEGIN",
            f"WITH u AS (UPDATE billing.customers SET notes = notes {C1} "
            "RETURNING (SELECT login) AS l) SELECT l FROM u",
            "ROLLBACK",
        ),
    ),
    (
        "merge_into_temp",
        (
            "BEGIN",
            "CREATE TEMP TABLE atk_m (x text)",
            "MERGE INTO atk_m USING billing.customers c ON false "
            "WHEN NOT MATCHED THEN INSERT VALUES (c.name)",
            "SELECT x FROM atk_m",
            "ROLLBACK",
        ),
    ),
    # ---- server-side code: SQL text, user functions, dblink --------------------------------
    ("fn_user_leak", "SELECT * FROM billing.leak()"),
    ("fn_user_leak_search_path", ("SET search_path = billing", "SELECT leak()")),
    ("fn_user_leak_rows_from", "SELECT * FROM ROWS FROM (billing.leak()) WITH ORDINALITY"),
    ("fn_user_leak_quoted", 'SELECT "billing"."leak"()'),
    ("fn_allowed_plus_read", "SELECT billing.invoice_total(1), name FROM billing.customers"),
    (
        "fn_ts_rewrite_name",
        _ts_rewrite(
            f"SELECT 'a'::tsquery, plainto_tsquery('simple', name) FROM billing.customers {C1}"
        ),
    ),
    (
        "fn_ts_rewrite_email",
        _ts_rewrite(
            f"SELECT 'a'::tsquery, plainto_tsquery('simple', email) FROM billing.customers {C1}"
        ),
    ),
    (
        "fn_ts_rewrite_card_dollar_quoted",
        "SELECT pg_catalog.ts_rewrite('a'::tsquery, $q$SELECT 'a'::tsquery, "
        f"plainto_tsquery('simple', cc_number) FROM billing.customers {C1}$q$)",
    ),
    (
        "fn_ts_rewrite_pg_stats",
        _ts_rewrite(
            "SELECT 'a'::tsquery, plainto_tsquery('simple', histogram_bounds::text) "
            "FROM pg_stats WHERE tablename = 'customers' AND attname = 'name'"
        ),
    ),
    (
        "fn_ts_rewrite_pg_stat_activity",
        _ts_rewrite(
            "SELECT 'a'::tsquery, plainto_tsquery('simple', query) FROM pg_stat_activity "
            f"WHERE query LIKE '%{ACTIVITY_MARK}%' AND pid <> pg_backend_pid() LIMIT 1"
        ),
    ),
    (
        "fn_ts_stat",
        "SELECT * FROM ts_stat('SELECT to_tsvector(''simple'', name) FROM billing.customers')",
    ),
    (
        "fn_dblink",
        f"SELECT * FROM atk_ext.dblink({DBLINK}, 'SELECT name FROM billing.customers') AS t(n text)",
    ),
    (
        "fn_dblink_search_path",
        (
            "SET search_path = atk_ext, public",
            f"SELECT * FROM dblink({DBLINK}, 'SELECT email FROM billing.customers') AS t(e text)",
        ),
    ),
    # ---- catalog and statistics views --------------------------------------------------------
    (
        "stats_pg_stats",
        "SELECT attname, most_common_vals::text, histogram_bounds::text FROM pg_stats "
        "WHERE schemaname = 'billing' AND tablename = 'customers'",
    ),
    (
        "stats_pg_stats_qualified_quoted",
        'SELECT histogram_bounds::text FROM "pg_catalog"."pg_stats" WHERE tablename = \'customers\'',
    ),
    (
        "stats_pg_stats_in_cte",
        "WITH s AS (SELECT * FROM pg_stats) SELECT histogram_bounds::text FROM s "
        "WHERE tablename = 'customers'",
    ),
    (
        "stats_pg_stats_temp_view",
        (
            "CREATE TEMP VIEW atk_sv AS SELECT tablename, histogram_bounds::text AS hb FROM pg_stats",
            "SELECT hb FROM atk_sv WHERE tablename = 'customers'",
        ),
    ),
    (
        "activity_other_session",
        f"SELECT query FROM pg_stat_activity WHERE query LIKE '%{ACTIVITY_MARK}%' "
        "AND pid <> pg_backend_pid()",
    ),
    (
        "activity_get_activity_function",
        f"SELECT query FROM pg_stat_get_activity(NULL) WHERE query LIKE '%{ACTIVITY_MARK}%' "
        "AND pid <> pg_backend_pid()",
    ),
    (
        "activity_backend_activity_function",
        "SELECT pg_stat_get_backend_activity(s) FROM pg_stat_get_backend_idset() s",
    ),
    # ---- large objects -----------------------------------------------------------------------
    (
        "lo_from_bytea_lo_get",
        (
            "BEGIN",
            f"SELECT lo_from_bytea(424243, convert_to(name, 'UTF8')) FROM billing.customers {C1}",
            "SELECT lo_get(424243)",
            "ROLLBACK",
        ),
    ),
    (
        "lo_open_loread",
        (
            "BEGIN",
            "SELECT lo_from_bytea(424242, convert_to("
            f"(SELECT email FROM billing.customers {C1}), 'UTF8'))",
            "SELECT loread(lo_open(424242, 262144), 100)",
            "ROLLBACK",
        ),
    ),
    (
        "lo_get_qualified_range",
        (
            "BEGIN",
            f"SELECT lo_from_bytea(424244, convert_to(phone, 'UTF8')) FROM billing.customers {C1}",
            "SELECT pg_catalog.lo_get(424244, 0, 64)",
            "ROLLBACK",
        ),
    ),
    # ---- role switching ------------------------------------------------------------------------
    ("role_set_role", ("SET ROLE billing_admin", "SELECT name FROM billing.customers")),
    (
        "role_set_session_authorization",
        ("SET SESSION AUTHORIZATION billing_admin", "SELECT email FROM billing.customers"),
    ),
    (
        "role_set_config",
        (
            "SELECT set_config('role', 'billing_admin', false)",
            "SELECT phone FROM billing.customers",
        ),
    ),
    (
        "role_set_config_upper_case",
        (
            "SELECT set_config('ROLE', 'billing_admin', false)",
            "SELECT login FROM billing.customers",
        ),
    ),
    (
        "role_set_local_role",
        (
            "BEGIN",
            "SAVEPOINT atk_s",
            "SET LOCAL ROLE billing_admin",
            "ROLLBACK TO SAVEPOINT atk_s",
            "SELECT name FROM billing.customers",
            "ROLLBACK",
        ),
    ),
    (
        "role_pg_read_all_stats_activity",
        (
            "SET ROLE pg_read_all_stats",
            f"SELECT query FROM pg_stat_activity WHERE query LIKE '%{ACTIVITY_MARK}%' "
            "AND pid <> pg_backend_pid()",
        ),
    ),
    # ---- views ---------------------------------------------------------------------------------
    ("view_with_rules", "SELECT name, email FROM billing.customer_contacts"),
    ("view_with_rules_whole_row", "SELECT v::text FROM billing.customer_contacts v"),
    (
        "view_created_in_public",
        (
            "DROP VIEW IF EXISTS public.atk_v1",
            "CREATE VIEW public.atk_v1 AS SELECT * FROM billing.customers",
            "SELECT name, email, login FROM public.atk_v1",
            "DROP VIEW public.atk_v1",
        ),
    ),
    (
        "view_temp",
        (
            "CREATE TEMP VIEW atk_v2 AS SELECT c.name || '' AS n FROM billing.customers c",
            "SELECT n FROM atk_v2",
        ),
    ),
    (
        "view_created_cte_shadow",
        (
            "SET search_path = billing, public",
            "DROP VIEW IF EXISTS public.atk_v3",
            "CREATE VIEW public.atk_v3 AS WITH customers AS (SELECT * FROM customers) "
            "SELECT name || '' AS n, phone || '' AS p FROM customers",
            "SELECT n, p FROM public.atk_v3",
            "DROP VIEW public.atk_v3",
        ),
    ),
    (
        "view_materialized",
        (
            "DROP MATERIALIZED VIEW IF EXISTS public.atk_mv1",
            "CREATE MATERIALIZED VIEW public.atk_mv1 AS SELECT name, phone FROM billing.customers",
            "SELECT name, phone FROM public.atk_mv1",
            "DROP MATERIALIZED VIEW public.atk_mv1",
        ),
    ),
    (
        "view_recursive_temp",
        (
            "CREATE TEMP RECURSIVE VIEW atk_v4(n) AS SELECT name::text FROM billing.customers "
            "UNION SELECT n FROM atk_v4 WHERE false",
            "SELECT n FROM atk_v4",
        ),
    ),
    # ---- CREATE TABLE AS / SELECT INTO -----------------------------------------------------------
    (
        "ctas_public",
        (
            "DROP TABLE IF EXISTS public.atk_ctas1",
            "CREATE TABLE public.atk_ctas1 AS SELECT * FROM billing.customers",
            "SELECT name, email, login FROM public.atk_ctas1",
            "DROP TABLE public.atk_ctas1",
        ),
    ),
    (
        "select_into_temp",
        ("SELECT name, phone INTO TEMP atk_si1 FROM billing.customers", "SELECT * FROM atk_si1"),
    ),
    (
        "ctas_table_statement",
        (
            "CREATE TEMP TABLE atk_ctas2 AS TABLE billing.accounts",
            "SELECT host(ip), mac FROM atk_ctas2",
        ),
    ),
    (
        "ctas_execute",
        (
            "PREPARE atk_p6 AS SELECT email FROM billing.customers",
            "CREATE TEMP TABLE atk_ctas3 AS EXECUTE atk_p6",
            "SELECT * FROM atk_ctas3",
        ),
    ),
    (
        "ctas_explain_analyze",
        (
            "EXPLAIN ANALYZE CREATE TEMP TABLE atk_ctas5 AS SELECT name FROM billing.customers",
            "SELECT * FROM atk_ctas5",
        ),
    ),
    (
        "ctas_cte_shadow",
        (
            "SET search_path = billing, public",
            "CREATE TEMP TABLE atk_ctas4 AS WITH customers AS (SELECT * FROM customers) "
            "SELECT * FROM customers",
            "SELECT name, email, cc_number FROM atk_ctas4",
        ),
    ),
    (
        "temp_table_named_like_protected",
        (
            "CREATE TEMP TABLE customers AS SELECT * FROM billing.customers",
            "SELECT name, login FROM pg_temp.customers",
        ),
    ),
    # ---- partitions ----------------------------------------------------------------------------
    ("part_partition", "SELECT cli FROM billing.xdrs_1"),
    ("part_only_partition", "SELECT cli FROM ONLY billing.xdrs_1"),
    ("part_parent", "SELECT cli, cld FROM billing.xdrs"),
    ("part_search_path", ("SET search_path = billing", "SELECT upper(cli) FROM xdrs_1")),
    ("part_search_path_table", ("SET search_path = billing", "TABLE xdrs")),
    (
        "part_join_accounts",
        "SELECT x.cli, a.ip FROM billing.xdrs_1 x JOIN billing.accounts a USING (i_account)",
    ),
    ("part_tablesample", "SELECT cli FROM billing.xdrs_1 TABLESAMPLE SYSTEM (100)"),
    # ---- accounts: ip and mac ------------------------------------------------------------------
    ("acct_ip_mac", "SELECT ip, mac FROM billing.accounts"),
    ("acct_star", "SELECT * FROM billing.accounts"),
    (
        "acct_network_funcs",
        "SELECT broadcast(ip), network(set_masklen(ip, 24)) FROM billing.accounts",
    ),
    # ---- notifications -------------------------------------------------------------------------
    (
        "notify_other_channel",
        (
            "LISTEN other_channel",
            f"SELECT pg_notify('other_channel', (SELECT name FROM billing.customers {C1}))",
        ),
    ),
    (
        "notify_invoice_events_unlisted_keys",
        (
            "LISTEN invoice_events",
            "SELECT pg_notify('invoice_events', json_build_object('customer_name', name, "
            f"'email', email, 'note', phone, 'ref', login)::text) FROM billing.customers {C1}",
        ),
    ),
    (
        "notify_invoice_events_nested",
        (
            "LISTEN invoice_events",
            "SELECT pg_notify('invoice_events', json_build_object('customer', "
            f"json_build_object('customer_name', name))::text) FROM billing.customers {C1}",
        ),
    ),
    (
        "notify_cte_shadow_invoice_events",
        (
            "SET search_path = billing",
            "LISTEN invoice_events",
            "WITH customers AS (SELECT * FROM customers) SELECT pg_notify('invoice_events', "
            f"json_build_object('amount', 1, 'memo', name)::text) FROM customers {C1}",
        ),
    ),
    (
        "parameter_status_application_name",
        (
            "SELECT length(set_config('application_name', "
            f"(SELECT name FROM billing.customers {C1}), false))",
            "SHOW application_name",
        ),
    ),
    # ---- standard_conforming_strings and encodings ---------------------------------------------
    ("scs_off_string_trick", ("SET standard_conforming_strings = off", SCS_TRICK)),
    (
        "scs_off_set_config",
        ("SELECT set_config('standard_conforming_strings', 'off', false)", SCS_TRICK),
    ),
    ("scs_backslash_quote", ("SET backslash_quote = on", "SELECT name FROM billing.customers")),
    (
        "encoding_set_client_encoding",
        ("SET client_encoding = 'LATIN1'", "SELECT name, email FROM billing.customers"),
    ),
    ("encoding_set_names", ("SET NAMES 'SJIS'", "SELECT email FROM billing.customers")),
    # ---- anything else -------------------------------------------------------------------------
    ("sys_columns", "SELECT ctid, xmin, tableoid::regclass, name FROM billing.customers"),
    ("tablesample_bernoulli", "SELECT name FROM billing.customers TABLESAMPLE BERNOULLI (100)"),
    (
        "tablesample_repeatable",
        "SELECT email FROM billing.customers TABLESAMPLE SYSTEM (100) REPEATABLE (1)",
    ),
    ("limit_subquery", "SELECT name FROM billing.customers LIMIT (SELECT 5)"),
    ("card_column", "SELECT cc_number FROM billing.customers"),
    ("card_quoted_column", 'SELECT "cc_number" FROM billing.customers'),
    ("card_json_agg_star", "SELECT json_agg(c.*) FROM billing.customers c"),
    ("login_hash_column", "SELECT login FROM billing.customers"),
]

# ---- fixtures ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def attack_env(pg: EmbeddedPostgres, billing: ProxyProcess) -> Iterator[None]:
    """dblink in its own schema (so that the dblink cases can leak directly), and an idle
    session of another user whose last query holds a personal value."""
    pg.psql(
        "CREATE SCHEMA IF NOT EXISTS atk_ext; CREATE EXTENSION IF NOT EXISTS dblink SCHEMA atk_ext; "
        f"GRANT USAGE ON SCHEMA atk_ext TO {HELPDESK}"
    )
    other = psycopg.connect(pg.dsn() + " sslmode=disable", autocommit=True)
    other.execute(f"SELECT '{NAME}' AS {ACTIVITY_MARK}")
    try:
        yield
    finally:
        other.close()
        pg.psql(
            "DROP SCHEMA IF EXISTS atk_ext CASCADE; "
            "DROP VIEW IF EXISTS public.atk_v1, public.atk_v3; "
            "DROP MATERIALIZED VIEW IF EXISTS public.atk_mv1; "
            "DROP TABLE IF EXISTS public.atk_ctas1; "
            "SELECT lo_unlink(oid) FROM pg_largeobject_metadata WHERE oid IN (424242, 424243, 424244)"
        )


@pytest.fixture(scope="module")
def clients(pg: EmbeddedPostgres, billing: ProxyProcess, attack_env: None) -> Iterator[Clients]:
    with open_clients(pg, billing.port) as c:
        yield c


# ---- tests ------------------------------------------------------------------------------------


def test_corpus_is_well_formed() -> None:
    ids = [cid for cid, _ in ATTACKS]
    assert len(ids) == len(set(ids)), "duplicate case ids"
    assert len(ids) >= 120
    for cid, sql in ATTACKS:
        # the statements themselves must not carry a secret, or every client "leaks" it
        assert leaks(text_of(sql)) == [], cid


@pytest.mark.parametrize(
    ("case_id", "sql", "client"),
    [(cid, sql, client) for cid, sql in ATTACKS for client in CLIENTS],
    ids=[f"{cid}-{client}" for cid, _ in ATTACKS for client in CLIENTS],
)
def test_no_leak_through_pgveil(
    clients: Clients, case_id: str, sql: Statements, client: str
) -> None:
    received = clients.run(client, sql)
    assert leaks(received) == [], f"{case_id} via {client} leaked; received:\n{received[:3000]}"


@pytest.mark.parametrize(("case_id", "sql"), ATTACKS, ids=[cid for cid, _ in ATTACKS])
def test_case_leaks_directly(clients: Clients, case_id: str, sql: Statements) -> None:
    received = clients.run("direct", sql)
    assert leaks(received) != [], (
        f"{case_id} does not leak even without pgveil (a broken case); received:\n{received[:3000]}"
    )
