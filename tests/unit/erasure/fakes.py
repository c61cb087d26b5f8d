"""A catalog snapshot matching the documented example configuration (no database)."""

from __future__ import annotations

import re
from dataclasses import replace

from erasure import loader
from erasure.catalog import Catalog, Column, Index, Relation
from erasure.model import TableName

# the documented example without its comments (same lines), for tests that edit it
EXAMPLE = re.sub(r"\s+#.*$", "", loader.EXAMPLE, flags=re.M)

TYPES = {
    "int4": "integer",
    "int8": "bigint",
    "text": "text",
    "inet": "inet",
    "macaddr": "macaddr",
    "jsonb": "jsonb",
    "json": "json",
    "interval": "interval",
    "timestamptz": "timestamp with time zone",
    "numeric": "numeric(12,5)",
    "bytea": "bytea",
}


def cols(*spec: str) -> dict[str, Column]:
    """'name:base' or 'name:base!' (NOT NULL)."""
    out = {}
    for s in spec:
        name, _, base = s.partition(":")
        not_null = base.endswith("!")
        base = base.rstrip("!")
        out[name] = Column(name, TYPES[base], base, not_null)
    return out


def rel(
    schema_table: str,
    columns: dict[str, Column],
    *indexes: Index,
    kind: str = "r",
    leaves: tuple[Relation, ...] = (),
) -> Relation:
    schema, _, name = schema_table.partition(".")
    return Relation(TableName(schema, name), kind, columns, indexes, leaves)


def pk(col: str) -> Index:
    return Index(f"{col}_pkey", (col,), unique=True)


def catalog() -> Catalog:
    xdr_cols = cols(
        "i_xdr:int8!",
        "i_account:int8",
        "account_id:text",
        "cli:text",
        "cld:text",
        "ip:inet",
        "charged:numeric!",
        "connect_time:timestamptz!",
    )
    xdr_index = Index("xdrs_account", ("i_account", "i_xdr"))
    leaves = tuple(
        rel(f"billing.xdrs_2026_0{m}", xdr_cols, replace(xdr_index, name=f"x{m}"))
        for m in (1, 2, 3)
    )
    relations = [
        rel(
            "billing.customer_classes",
            cols("i_customer_class:int4!", "name:text", "retention:interval"),
            pk("i_customer_class"),
        ),
        rel(
            "billing.customers",
            cols(
                "i_customer:int8!",
                "name:text!",
                "email:text",
                "phone:text",
                "address:text",
                "i_customer_class:int4!",
                "terminated_at:timestamptz",
                "custom:jsonb",
            ),
            pk("i_customer"),
        ),
        rel(
            "billing.accounts",
            cols(
                "i_account:int8!",
                "i_customer:int8!",
                "id:text!",
                "ip:inet",
                "mac:macaddr",
                "custom:jsonb",
            ),
            pk("i_account"),
            Index("accounts_id", ("id",), unique=True),
            Index("accounts_customer", ("i_customer",)),
        ),
        rel("billing.xdrs", xdr_cols, replace(xdr_index, valid=True), kind="p", leaves=leaves),
        rel(
            "billing.call_recordings",
            cols("i_recording:int8!", "i_account:int8!", "audio:bytea!"),
            pk("i_recording"),
        ),
    ]
    return Catalog({r.name: r for r in relations}, role="eraser")
