"""The configuration checked against a catalog: every problem is found before anything is
changed, and each message names the file, key path and fix."""

from __future__ import annotations

from dataclasses import replace

import pytest

from erasure.catalog import Catalog, Column, Index, check
from erasure.loader import parse_config
from erasure.model import TableName
from tests.unit.erasure.fakes import EXAMPLE, catalog, cols

XDRS = TableName("billing", "xdrs")
ACCOUNTS = TableName("billing", "accounts")
CUSTOMERS = TableName("billing", "customers")


def problems(text: str = EXAMPLE, cat: Catalog | None = None) -> list[str]:
    return check(parse_config(text, "erasure.yaml"), cat or catalog())


def with_relation(name: TableName, **changes: object) -> Catalog:
    cat = catalog()
    rels = dict(cat.relations)
    rels[name] = replace(rels[name], **changes)  # type: ignore[arg-type]
    return replace(cat, relations=rels)


def test_the_example_fits_its_catalog() -> None:
    assert problems() == []


def test_unknown_table_and_column() -> None:
    out = problems(EXAMPLE.replace("billing.call_recordings:", "billing.recordings:"))
    assert out == [
        "erasure.yaml:30 at 'tables.billing.recordings': table billing.recordings does not "
        "exist (or eraser cannot see it); correct the name (schema.table, case-sensitive)"
    ]
    out = problems(EXAMPLE.replace("cld: null", "CLD: null"))
    assert len(out) == 1 and out[0].startswith(
        "erasure.yaml:29 at 'tables.billing.xdrs.columns.CLD': billing.xdrs has no column "
        "CLD (did you mean cld?); columns: i_xdr, i_account,"
    )


def test_a_view_is_not_a_table() -> None:
    cat = catalog()
    rels = {k: v for k, v in cat.relations.items() if k != ACCOUNTS}
    out = check(
        parse_config(EXAMPLE, "e.yaml"), replace(cat, relations=rels, kinds={ACCOUNTS: "v"})
    )
    assert "at 'tables.billing.accounts': billing.accounts is a view; name a table" in out[0]


def test_relation_that_does_not_resolve() -> None:
    # the owner column holds text, the parent's key is a bigint
    xdr = catalog().relations[XDRS]
    bad_cols = {**xdr.columns, "i_account": Column("i_account", "text", "text")}
    out = problems(cat=with_relation(XDRS, columns=bad_cols))
    assert any(
        "at 'tables.billing.xdrs.owner.column': billing.xdrs.i_account (text) cannot refer "
        "to billing.accounts.i_account (bigint): the types differ" in p
        for p in out
    ), out
    # the parent has no such key column
    out = problems(
        EXAMPLE.replace(
            "owner: {column: i_account, through: billing.accounts}\n    action",
            "owner: {column: i_account, through: billing.accounts, key: account}\n    action",
        )
    )
    assert out == [
        "erasure.yaml:31 at 'tables.billing.call_recordings.owner.key': billing.accounts has "
        "no column account, so billing.call_recordings cannot be related to it; name the "
        "column of billing.accounts that billing.call_recordings.i_account refers to (owner.key)"
    ]


def test_large_table_without_batch_index() -> None:
    xdr = catalog().relations[XDRS]
    leaves = (xdr.leaves[0], replace(xdr.leaves[1], indexes=()), xdr.leaves[2])
    out = problems(cat=with_relation(XDRS, leaves=leaves))
    assert out == [
        "erasure.yaml:27 at 'tables.billing.xdrs.key': billing.xdrs is large and erased in "
        "batches by (i_account, i_xdr), but there is no valid btree index starting with those "
        "columns (partition billing.xdrs_2026_02 has none); "
        "CREATE INDEX ON billing.xdrs (i_account, i_xdr)"
    ]
    # an index in the other column order does not serve the batches
    swapped = tuple(
        replace(leaf, indexes=(Index("x", ("i_xdr", "i_account")),)) for leaf in xdr.leaves
    )
    assert problems(cat=with_relation(XDRS, leaves=swapped))
    partial = tuple(
        replace(leaf, indexes=(Index("x", ("i_account", "i_xdr"), partial=True),))
        for leaf in xdr.leaves
    )
    assert problems(cat=with_relation(XDRS, leaves=partial))
    # a plain (not partitioned) large table is checked itself
    plain = with_relation(XDRS, kind="r", leaves=(), indexes=(Index("x", ("i_account",)),))
    assert (
        "there is no valid btree index starting with those columns; CREATE"
        in (problems(cat=plain)[0])
    )
    good = with_relation(
        XDRS, kind="r", leaves=(), indexes=(Index("x", ("i_account", "i_xdr", "cli")),)
    )
    assert problems(cat=good) == []


def test_not_null_json_unique_and_key_problems() -> None:
    out = problems(EXAMPLE.replace('name: {placeholder: "[erased]"}', "name: null"))
    assert out == [
        "erasure.yaml:11 at 'tables.billing.customers.columns.name': billing.customers.name "
        "is NOT NULL; erase it with {placeholder: TEXT} or drop the NOT NULL constraint"
    ]
    out = problems(EXAMPLE.replace("address: null", "address: {json_keys: [street]}"))
    assert out == [
        "erasure.yaml:14 at 'tables.billing.customers.columns.address': billing.customers."
        "address is text; json_keys needs json or jsonb"
    ]
    out = problems(EXAMPLE.replace('id: {placeholder: "erased-{key}"}', "id: {placeholder: x}"))
    assert out == [
        "erasure.yaml:20 at 'tables.billing.accounts.columns.id': billing.accounts.id is "
        "unique, so one placeholder for every row collides; use null, or put {key} in the "
        "placeholder"
    ]
    cat = with_relation(CUSTOMERS, indexes=())
    assert problems(cat=cat) == [
        "erasure.yaml:3 at 'subject.key': billing.customers.i_customer must identify one row: "
        "add a primary key or a unique index on (i_customer)"
    ]
    customers = catalog().relations[CUSTOMERS]
    text_term = {**customers.columns, "terminated_at": Column("terminated_at", "text", "text")}
    assert problems(cat=with_relation(CUSTOMERS, columns=text_term)) == [
        "erasure.yaml:4 at 'subject.terminated_at': billing.customers.terminated_at is text; "
        "the termination column must be a date, timestamp or timestamptz"
    ]


def test_retention_sources_are_checked() -> None:
    classes = TableName("billing", "customer_classes")
    out = problems(
        cat=with_relation(classes, columns=cols("i_customer_class:int4!", "retention:text"))
    )
    assert out == [
        "erasure.yaml:7 at 'subject.retention.class_table.column': billing.customer_classes."
        "retention is text; the retention column must be an interval or a whole number of days"
    ]
    days = with_relation(classes, columns=cols("i_customer_class:int4!", "retention:int4"))
    assert problems(cat=days) == []
    by_class = EXAMPLE.replace(
        "    class_table: {table: billing.customer_classes, key: i_customer_class, column: "
        "retention}",
        "    by_class: {column: klass, values: {1: 30}}",
    )
    assert problems(by_class) == [
        "erasure.yaml:7 at 'subject.retention.by_class.column': billing.customers has no "
        "column klass; columns: i_customer, name, email, phone, address, i_customer_class, "
        "terminated_at, custom"
    ]


def test_missing_privileges_say_what_to_grant() -> None:
    out = problems(cat=with_relation(XDRS, privileges=frozenset({"SELECT"})))
    assert out == [
        "erasure.yaml:24 at 'tables.billing.xdrs': eraser lacks UPDATE on billing.xdrs; "
        "GRANT UPDATE ON billing.xdrs TO eraser"
    ]
    out = problems(
        cat=with_relation(TableName("billing", "call_recordings"), privileges=frozenset())
    )
    assert "GRANT SELECT, DELETE ON billing.call_recordings TO eraser" in out[0]


@pytest.mark.parametrize("table", ["billing.customers", "billing.xdrs", "billing.accounts"])
def test_every_missing_table_is_reported(table: str) -> None:
    cat = catalog()
    name = TableName(*table.split("."))
    rels = {k: v for k, v in cat.relations.items() if k != name}
    out = check(parse_config(EXAMPLE, "e.yaml"), replace(cat, relations=rels))
    assert any(f"table {table} does not exist" in p for p in out), out
