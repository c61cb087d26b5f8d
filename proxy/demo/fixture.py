"""pgveil's one billing fixture: the `billing` schema that the test suite, the benchmarks
and the demo load, at a scale, with the parts each of them asks for (package data files under
`data/fixture/`).

`core.sql` is what every user shares: customer classes, customers, accounts and xDRs (with
the column names the tests pin: `phone`, `extra`, `charged`, `name varchar(80)`), and the
xDRs' partitions. The parts add what only some users need, each named for what it adds:

- `canaries`: the masking tests' two customers with distinctive personal values (given as
  settings, so the tests' constants are the one source), their views and functions;
- `population`: generated customers at the scale, two accounts each (`10c+1`, `10c+2`),
  xDRs for the first `xdr_customers` of them, values marked `C%06d` per customer;
- `erasure` (after `population`): call recordings and the indexes the erasure worker uses;
- `compat` (alone: it has its own rows): the compatibility suite's user-defined types in the
  customers' columns (an enum, a domain, a composite), the keys and constraints ORMs
  reflect, a view, a function, and its own customers (the canaries as `canaries` reads them);
- `demo` (xDRs by `connect_time`; not with `population`): the schema of `pgveil demo`
  (`proxy.demo.billing` fills it): the core tables' further columns and constraints, its
  further tables (resellers, cards, credentials, staff, recordings, invoices, ...), a view;
- `traffic` (after `population` at a scale of no customers): the erasure benchmark's shape,
  `subjects` terminated and as many live customers with one account each, their xDRs
  (`subject_xdrs`, `live_xdrs` per account, given as settings) stored in time order as a
  switch writes them, and an index on connect_time.

The SQL reads its numbers from settings (`current_setting('pgveil_billing.customers')`,
...) that `script` sets at its top, so every file is plain SQL that psql could run too.
Test-local roles, grants and tables are not the billing schema: they stay with their
users.

This module builds no SQL beyond those settings and opens no connection of its own:
`script` returns the text, `load` runs it through `EmbeddedPostgres.psql`.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from importlib.resources import files
from typing import Literal

from proxy.demo.embedded_pg import EmbeddedPostgres

DATA = files("proxy.demo") / "data" / "fixture"
SETTING = "pgveil_billing."  # the settings the SQL files read
PARTS = ("canaries", "population", "erasure", "compat", "demo", "traffic")
_NEEDS = {"erasure": "population", "traffic": "population"}  # a part and the part it builds on
# parts that cannot be loaded together (they add the same columns or rows): refused here,
# with their names, rather than by the server halfway through the script
_CLASHES = {
    "compat": frozenset(PARTS) - {"compat"},
    "demo": frozenset({"population", "compat", "traffic", "erasure", "canaries"}),
}
XdrsBy = Literal["i_xdr", "connect_time"]


def data_text(name: str) -> str:
    return (DATA / name).read_text(encoding="utf-8")


@dataclass(frozen=True)
class Scale:
    """How many rows the `population` part generates: `customers` customers with two
    accounts each; the accounts of customers 1..`xdr_customers` (all by default) get
    `xdrs_per_account` xDRs each."""

    customers: int = 0
    xdrs_per_account: int = 0
    xdr_customers: int | None = None

    @property
    def xdrs(self) -> int:
        with_xdrs = self.customers if self.xdr_customers is None else self.xdr_customers
        return 2 * min(with_xdrs, self.customers) * self.xdrs_per_account


# the scales the users load: the test suite's erasure database, the masked benchmark
TESTS = Scale(customers=40, xdrs_per_account=3)
BENCH = Scale(customers=200_000, xdrs_per_account=100, xdr_customers=5_000)


def _literal(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


def script(
    scale: Scale = Scale(),
    parts: Sequence[str] = (),
    *,
    xdrs_by: XdrsBy = "i_xdr",
    first_month: dt.date = dt.date(2026, 1, 1),
    months: int = 3,
    terminated_at: dt.datetime = dt.datetime(2026, 3, 1, tzinfo=dt.UTC),
    settings: Mapping[str, str] | None = None,
) -> str:
    """The SQL that (re)creates the `billing` schema: the core, then `parts` in the order
    given. `xdrs_by` is the xDRs' partition key (`i_xdr`: one partition `xdrs_1` for ids
    1 to at least 999,999; `connect_time`: `months` monthly partitions `xdrs_YYYY_MM` from
    `first_month`). `settings` are further `pgveil_billing.*` values a part reads (the
    canaries)."""
    for part in parts:
        if part not in PARTS:
            raise ValueError(f"no billing fixture part {part!r} (parts: {', '.join(PARTS)})")
        need = _NEEDS.get(part)
        if need is not None and need not in parts[: parts.index(part)]:
            raise ValueError(f"the billing fixture part {part!r} needs {need!r} before it")
    for part, others in _CLASHES.items():
        if part in parts and not others.isdisjoint(parts):
            clash = ", ".join(repr(p) for p in parts if p in others)
            raise ValueError(f"the billing fixture part {part!r} cannot be loaded with {clash}")
    if "traffic" in parts and scale.customers:
        raise ValueError("the billing fixture part 'traffic' needs 'population' at no customers")
    if scale.customers and "population" not in parts:
        raise ValueError("a scale with customers needs the billing fixture part 'population'")
    if xdrs_by not in ("i_xdr", "connect_time"):
        raise ValueError(f"the xDRs are partitioned by i_xdr or connect_time, not {xdrs_by!r}")
    values = {
        "xdrs_by": xdrs_by,
        "xdr_ids": str(max(1_000_000, scale.xdrs + 1)),
        "first_month": first_month.replace(day=1).isoformat(),
        "months": str(months),
        "customers": str(scale.customers),
        "xdrs_per_account": str(scale.xdrs_per_account),
        "xdr_customers": str(
            scale.customers if scale.xdr_customers is None else scale.xdr_customers
        ),
        "terminated_at": terminated_at.isoformat(),
        **(settings or {}),
    }
    head = "".join(
        f"SELECT pg_catalog.set_config({_literal(SETTING + k)}, {_literal(v)}, false);\n"
        for k, v in values.items()
    )
    body = [data_text("core.sql"), *(data_text(f"{p}.sql") for p in parts)]
    return head + "\n".join(body) + "\nANALYZE billing.customers, billing.accounts, billing.xdrs;\n"


def load(
    pg: EmbeddedPostgres,
    scale: Scale = Scale(),
    parts: Sequence[str] = (),
    *,
    dbname: str = "postgres",
    xdrs_by: XdrsBy = "i_xdr",
    first_month: dt.date = dt.date(2026, 1, 1),
    months: int = 3,
    terminated_at: dt.datetime = dt.datetime(2026, 3, 1, tzinfo=dt.UTC),
    settings: Mapping[str, str] | None = None,
) -> None:
    """Run `script(...)` with these arguments in database `dbname` of `pg`, as its
    superuser, in one transaction."""
    sql = script(
        scale,
        parts,
        xdrs_by=xdrs_by,
        first_month=first_month,
        months=months,
        terminated_at=terminated_at,
        settings=settings,
    )
    pg.psql(sql, dbname=dbname)
