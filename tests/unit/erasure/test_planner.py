"""The planner: the order of the steps, identifier quoting, values only as bind
parameters, and the shapes of the batch and due-subject statements (no database)."""

from __future__ import annotations

import re
from dataclasses import replace

from erasure.catalog import Catalog, Column, Index, Relation
from erasure.loader import parse_config
from erasure.model import TableName
from erasure.planner import Plan, Sql, build_plan
from tests.unit.erasure.fakes import EXAMPLE, catalog, cols


def plan(text: str = EXAMPLE, cat: Catalog | None = None) -> Plan:
    return build_plan(parse_config(text, "erasure.yaml"), cat or catalog())


def statements(p: Plan) -> list[tuple[str, Sql]]:
    """(name, statement) of every statement of a plan."""
    out = [("due", p.due), ("due_one", p.due_one), ("exists", p.exists), ("verify", p.verify)]
    if p.rest is not None:
        out.append(("rest", p.rest))
    for s in p.steps:
        for name in ("owners", "first_batch", "next_batch", "count", "verify"):
            sql = getattr(s, name)
            if sql is not None:
                out.append((f"{s.table}.{name}", sql))
    return out


def test_children_before_the_tables_they_are_found_through() -> None:
    p = plan()
    assert p.step_names() == [
        "billing.xdrs",
        "billing.call_recordings",
        "billing.accounts",
        "billing.customers",
    ]
    xdrs, recordings, accounts, customers = p.steps
    assert xdrs.batched and xdrs.batch_size == 5000 and xdrs.owners is not None
    assert not recordings.batched and recordings.action == "delete"
    assert not accounts.batched and accounts.first_batch is None
    assert customers.columns == ("name", "email", "phone", "address", "custom")
    # the batched tables one by one, then all the others in one statement
    assert p.batched == (xdrs,) and p.phases == 2
    assert [str(t) for t in p.rest_tables] == [
        "billing.call_recordings",
        "billing.accounts",
        "billing.customers",
    ]
    assert p.rest is not None
    assert p.rest.text.startswith(
        "WITH s0 AS (DELETE FROM billing.call_recordings AS t WHERE t.i_account IN "
        "(SELECT p0.i_account FROM billing.accounts AS p0 WHERE p0.i_customer = "
        "$1::text::bigint) RETURNING 1), "
        "s1 AS (UPDATE billing.accounts AS t SET"
    )
    assert ", s2 AS (UPDATE billing.customers AS t SET name = ($5::text)::text" in (p.rest.text)
    assert p.rest.consts == (
        "erased-{key}",
        ["sip_user"],
        "[erased]",
        "[erased]",
        ["passport"],
        ["contact", "phone"],
    )


def test_parameters_are_numbered_after_the_dynamic_ones_and_all_used() -> None:
    dynamic = {"first_batch": 2, "next_batch": 3, "due_one": 2}
    for name, sql in statements(plan()):
        assert sql.dynamic == dynamic.get(name.rsplit(".", 1)[-1], 1), name
        used = {int(n) for n in re.findall(r"\$(\d+)", sql.text)}
        assert used == set(range(1, sql.nparams + 1)), (name, sql.text)


def test_values_are_never_in_the_sql_text() -> None:
    text = EXAMPLE.replace('"[erased]"', '"x\'); DROP TABLE t; --"')
    p = plan(text)
    consts = [c for _, sql in statements(p) for c in sql.consts]
    assert "x'); DROP TABLE t; --" in consts
    assert ["contact", "phone"] in consts and "30 days" not in consts  # class table: no consts
    for _, sql in statements(p):
        assert "DROP TABLE" not in sql.text
        assert "passport" not in sql.text and "sip_user" not in sql.text
        assert "erased" not in sql.text


def test_identifiers_are_always_quoted() -> None:
    odd = TableName('bi"lling', "Cust omers")
    text = (
        "subject: {table: 'bi\"lling.Cust omers', key: 'i d', terminated_at: ended}\n"
        "tables:\n  'bi\"lling.Cust omers':\n    columns: {'na\"me': null}\n"
        "audit: {stdout: true}\n"
    )
    cat = Catalog(
        {
            odd: Relation(
                odd,
                "r",
                {
                    "i d": Column("i d", "bigint", "int8", True),
                    "ended": Column("ended", "date", "date"),
                    'na"me': Column('na"me', "text", "text"),
                },
                (Index("pk", ("i d",), unique=True),),
            )
        }
    )
    p = plan(text, cat)
    assert p.rest is not None and p.rest.text == (
        'WITH s0 AS (UPDATE "bi""lling"."Cust omers" AS t SET "na""me" = NULL '
        'WHERE t."i d" = $1::text::bigint AND (t."na""me" IS NOT NULL) RETURNING 1)'
    )
    assert p.verify.text == (
        'SELECT (SELECT ARRAY[count(*) FILTER (WHERE t."na""me" IS NOT NULL)]::bigint[] '
        'FROM "bi""lling"."Cust omers" AS t WHERE t."i d" = $1::text::bigint) AS v0'
    )


def test_batch_statements() -> None:
    xdrs = plan().steps[0]
    assert xdrs.first_batch is not None and xdrs.next_batch is not None
    first, nxt = xdrs.first_batch.text, xdrs.next_batch.text
    assert "t.i_account = $1::text::bigint ORDER BY t.i_xdr LIMIT $2" in first
    assert "> $2" not in first
    assert (
        "t.i_account = $1::text::bigint AND t.i_xdr > $2::text::bigint "
        "ORDER BY t.i_xdr LIMIT $3" in nxt
    )
    # the change covers (last, highest key of the batch]: ties at the bound included
    assert "t.i_xdr <= (SELECT hi FROM r)" in nxt
    assert first.startswith("WITH b AS (SELECT t.i_xdr AS k FROM billing.xdrs")
    assert "r AS (SELECT max(k) AS hi, count(*) AS n FROM b), u AS (UPDATE" in nxt
    assert nxt.endswith("RETURNING 1)")  # the executor adds its progress CTE and SELECT
    assert xdrs.owners is not None and xdrs.owners.text == (
        "SELECT o::text FROM (SELECT DISTINCT p.i_account AS o FROM billing.accounts AS p "
        "WHERE p.i_customer = $1::text::bigint AND p.i_account IS NOT NULL) AS s ORDER BY o"
    )
    # only rows that still hold a value change: re-running a batch changes nothing
    assert "(t.account_id IS NOT NULL OR t.cli IS NOT NULL" in nxt


def test_a_large_table_owned_directly_batches_over_the_subject_alone() -> None:
    text = EXAMPLE.replace(
        "    owner: {column: i_customer}\n    key: i_account\n",
        "    owner: {column: i_customer}\n    key: i_account\n    large: true\n",
    )
    cat = catalog()
    accounts = TableName("billing", "accounts")
    rel = cat.relations[accounts]
    rel = replace(rel, indexes=(*rel.indexes, Index("ac", ("i_customer", "i_account"))))
    p = plan(text, replace(cat, relations={**cat.relations, accounts: rel}))
    step = next(s for s in p.steps if s.table == accounts)
    assert step.batched and step.owners is None and step.first_batch is not None
    assert "t.i_customer = $1::text::bigint ORDER BY t.i_account LIMIT $2" in (
        step.first_batch.text
    )


def test_deleting_in_batches() -> None:
    text = EXAMPLE.replace(
        "    action: delete\n",
        "    action: delete\n    large: true\n    key: i_recording\n",
    )
    cat = catalog()
    rec = TableName("billing", "call_recordings")
    r = replace(cat.relations[rec], indexes=(Index("r", ("i_account", "i_recording")),))
    step = plan(text, replace(cat, relations={**cat.relations, rec: r})).steps[1]
    assert step.first_batch is not None
    assert "u AS (DELETE FROM billing.call_recordings AS t WHERE" in step.first_batch.text


def test_json_actions() -> None:
    p = plan()
    assert p.rest is not None
    rest = p.rest.text
    assert "custom = ((t.custom #- $6::text[]) #- $7::text[])" in rest
    assert (
        "custom = pg_catalog.jsonb_set(t.custom, $3::text[], pg_catalog.to_jsonb($4::text), "
        "false)" in rest
    )
    # {key} in a placeholder: the row's key, so a unique column stays unique
    assert "replace($2::text, '{key}', t.i_account::text)" in rest
    customers = p.steps[3]
    assert customers.count.consts == ("[erased]", ["passport"], ["contact", "phone"])
    assert "((t.custom #> $3::text[]) IS NOT NULL OR (t.custom #> $4::text[]) IS NOT NULL)" in (
        customers.count.text
    )
    # a json (not jsonb) column is converted and back
    cat = catalog()
    cust = TableName("billing", "customers")
    c = cat.relations[cust]
    c = replace(c, columns={**c.columns, "custom": Column("custom", "json", "json")})
    p2 = plan(cat=replace(cat, relations={**cat.relations, cust: c}))
    assert p2.rest is not None
    assert "custom = (((t.custom::jsonb #- $6::text[]) #- $7::text[]))::json" in p2.rest.text


def test_due_statements() -> None:
    p = plan()
    assert p.due.text == (
        "SELECT s.i_customer::text AS subject_key, (s.terminated_at + "
        "COALESCE(c.retention, $2::text::interval))::timestamptz AS due_at "
        "FROM billing.customers AS s LEFT JOIN billing.customer_classes AS c "
        "ON c.i_customer_class = s.i_customer_class WHERE s.terminated_at IS NOT NULL "
        "AND s.terminated_at + COALESCE(c.retention, $2::text::interval) <= $1::timestamptz"
    )
    assert p.due.consts == ("0 days",)
    assert p.due_one.text.endswith("AND s.i_customer = $2::text::bigint")
    assert "$3::text::interval" in p.due_one.text
    fixed = plan(
        EXAMPLE.replace(
            "    default: 0 days\n    class_table: {table: billing.customer_classes, key: "
            "i_customer_class, column: retention}\n",
            "    default: 30\n",
        )
    )
    assert "s.terminated_at + $2::text::interval <= $1::timestamptz" in fixed.due.text
    assert fixed.due.consts == ("30 days",)
    mapped = plan(
        EXAMPLE.replace(
            "    class_table: {table: billing.customer_classes, key: i_customer_class, column: "
            "retention}",
            "    by_class: {column: i_customer_class, values: {1: 30, 2: 1 year}}",
        )
    )
    assert "unnest($3::text[], $4::text[]) AS m(k, r) WHERE m.k = s.i_customer_class::text" in (
        mapped.due.text
    )
    assert mapped.due.consts == ("0 days", ["1", "2"], ["30 days", "1 year"])
    classes = TableName("billing", "customer_classes")
    cat = catalog()
    days = replace(cat.relations[classes], columns=cols("i_customer_class:int4!", "retention:int4"))
    p3 = plan(cat=replace(cat, relations={**cat.relations, classes: days}))
    assert "pg_catalog.make_interval(days => c.retention::int)" in p3.due.text


def test_plan_id_follows_what_the_steps_do() -> None:
    assert plan().plan_id == plan().plan_id
    assert (
        plan().plan_id
        != plan(
            EXAMPLE.replace("batch_size: 5000\n    columns", "batch_size: 500\n    columns")
        ).plan_id
    )
    assert plan().plan_id != plan(EXAMPLE.replace("cld: null, ", "")).plan_id


def test_the_due_check_of_the_claim_is_correlated_with_the_job_row() -> None:
    p = plan()
    assert p.due_job.dynamic == 4 and p.due_job1.dynamic == 1
    assert p.due_job.text.endswith("AND s.i_customer = (j.subject_key)::text::bigint")
    assert {int(n) for n in re.findall(r"\$(\d+)", p.due_job.text)} == {1, 5}
    assert {int(n) for n in re.findall(r"\$(\d+)", p.due_job1.text)} == {1, 2}
    assert p.due_job.consts == p.due_job1.consts == ("0 days",)
