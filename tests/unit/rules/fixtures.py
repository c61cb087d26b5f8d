"""A small billing catalog and policy for analyser tests (no database needed)."""

from __future__ import annotations

from rules.analyzer import Analyzer
from rules.catalog import Catalog, Column, ProtectionMap, Relation
from rules.loader import parse_rules
from rules.masks import ColumnType

RULES = """
keys:
  hash: {env: K}
functions:
  allow: [billing.invoice_total]
tables:
  billing.customers:
    subject: i_customer
    columns:
      name: partial
      email: email
      phone: {mask: partial, keep_last: 2}
      cc_number: deny
      login: hash
      extra: {mask: json, keys: {dl: partial}}
  billing.accounts:
    subject: i_account
    columns:
      ip: partial
"""

T = ColumnType


def rel(
    oid: int,
    schema: str,
    name: str,
    cols: list[tuple[str, str, str]],
    kind: str = "r",
    parents: tuple[tuple[str, str], ...] = (),
) -> Relation:
    return Relation(
        oid,
        schema,
        name,
        kind,
        tuple(Column(n, i + 1, T(t, f)) for i, (n, t, f) in enumerate(cols)),
        parents,
    )


CUSTOMER_COLS = [
    ("i_customer", "int8", "bigint"),
    ("name", "varchar", "character varying(80)"),
    ("email", "text", "text"),
    ("phone", "text", "text"),
    ("cc_number", "text", "text"),
    ("login", "text", "text"),
    ("extra", "jsonb", "jsonb"),
    ("balance", "numeric", "numeric(12,2)"),
]
CATALOG = Catalog(
    relations={
        ("billing", "customers"): rel(100, "billing", "customers", CUSTOMER_COLS),
        ("billing", "accounts"): rel(
            101,
            "billing",
            "accounts",
            [
                ("i_account", "int8", "bigint"),
                ("i_customer", "int8", "bigint"),
                ("ip", "inet", "inet"),
                ("balance", "numeric", "numeric"),
            ],
        ),
        ("billing", "xdrs_2024"): rel(
            102, "billing", "xdrs_2024", [("i_account", "int8", "bigint")]
        ),
        ("billing", "customers_eu"): rel(
            103, "billing", "customers_eu", CUSTOMER_COLS, parents=(("billing", "customers"),)
        ),
        ("billing", "customer_view"): rel(
            104, "billing", "customer_view", [("name", "text", "text")], kind="v"
        ),
        ("public", "notes"): rel(
            105, "public", "notes", [("id", "int4", "integer"), ("body", "text", "text")]
        ),
    },
    builtin_functions=frozenset(
        {
            "upper",
            "lower",
            "count",
            "row_to_json",
            "length",
            "now",
            "coalesce",
            "set_config",
            "pg_sleep",
            "sum",
            "max",
            "to_json",
            "jsonb_build_object",
            "current_setting",
            "format",
            "md5",
            "encode",
            "substr",
        }
    ),
    user_functions=frozenset(
        {("billing", "invoice_total"), ("billing", "leak"), ("public", "lower")}
    ),
    user_operators=frozenset({"===="}),
    view_sources={("billing", "customer_view"): (("billing", "customers"),)},
)


def analyzer() -> Analyzer:
    policy = parse_rules(RULES, "rules.yaml", {"K": "k" * 32})
    return Analyzer(ProtectionMap(policy, CATALOG))
