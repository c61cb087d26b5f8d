"""The demo's billing database: its package data files (`proxy/demo/data/`), read and run.

The schema is the one billing fixture's (`proxy.demo.fixture`): its core with the part
`demo` (`data/fixture/demo.sql`: the demo's further columns, constraints and tables), the
xDRs partitioned by month over the `xdr_days` before the load's "now". `data/recipe.yaml`
says what a scale means and in which order the SQL files fill it: `data/load/*.sql`
(generated on the server: `INSERT ... SELECT` over `generate_series`, so a million xDRs
load in seconds); `data/roles.sql` is the demo's roles, `data/rules.yaml` and
`data/erasure.yaml` the masking rules and the erasure configuration. The data files read
their numbers from settings (`current_setting('pgveil_demo.customers')`, ...) that `load`
sets for the transaction, so every file is plain SQL that psql could run too.

Every value is derived from a row number and is obviously fake: `Customer 000123`,
`customer000123@example.invalid`, `+1-555-0123`, documentation IP ranges, test IMSIs (MCC
001), locally administered MACs. Some customers were terminated long ago and some recently,
in classes with 0-day, 30-day and 10-year retention, so the erasure worker has work.

This module builds no SQL or YAML: it fills two paths into the YAML templates, sets
settings and gives the fixture its months; it prints nothing and opens no connection of its
own (`load` runs on the one it is given).
"""

from __future__ import annotations

import datetime as dt
import json
import string
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from importlib.resources import files
from typing import Any

import yaml

from proxy.demo import fixture

DATA = files("proxy.demo") / "data"


def data_text(name: str) -> str:
    return (DATA / name).read_text(encoding="utf-8")


def data_bytes(name: str) -> bytes:
    return (DATA / name).read_bytes()


RECIPE: dict[str, Any] = yaml.safe_load(data_text("recipe.yaml"))
SCHEMA: str = RECIPE["schema"]
MARKER: str = RECIPE["marker"]
ADMIN_ROLE: str = RECIPE["roles"]["unmasked"]
HELPDESK_ROLE: str = RECIPE["roles"]["masked"]
CATALOG_ROLE: str = RECIPE["roles"]["catalog"]
DEMO_ROLES = (ADMIN_ROLE, HELPDESK_ROLE, CATALOG_ROLE)
XDR_DAYS: int = RECIPE["xdr_days"]
FIXTURE_PARTS: tuple[str, ...] = tuple(RECIPE["fixture_parts"])
DUE_SQL = data_text(RECIPE["due_file"])
ROLES_SQL = data_text(RECIPE["roles_file"])
SETTING = "pgveil_demo."  # the settings the SQL files read


@dataclass(frozen=True)
class Counts:
    """How many rows each generated table gets at a scale (1.0: 10,000 customers)."""

    customers: int
    xdrs: int

    @classmethod
    def at_scale(cls, scale: float) -> Counts:
        one, least = RECIPE["scale_1"], RECIPE["at_least"]
        return cls(
            customers=max(least["customers"], round(one["customers"] * scale)),
            xdrs=max(least["xdrs"], round(one["xdrs"] * scale)),
        )

    @property
    def accounts(self) -> int:
        return 2 * self.customers

    @property
    def recordings(self) -> int:
        return max(1, self.accounts // 10)

    @property
    def invoices(self) -> int:
        return 2 * self.customers

    def settings(self) -> dict[str, int]:
        return {
            "customers": self.customers,
            "accounts": self.accounts,
            "xdrs": self.xdrs,
            "recordings": self.recordings,
            "invoices": self.invoices,
        }


@dataclass(frozen=True)
class Step:
    """A file of the load (a script of several statements when it takes no arguments), the
    settings it runs with besides the load's, and the share of the work it stands for."""

    label: str
    sql: str
    args: tuple[bytes, ...] = ()
    weight: float = 1.0
    settings: Mapping[str, int] = field(default_factory=dict)


def _weight(spec: float | dict[str, Any], counts: Mapping[str, int], rows: int | None) -> float:
    if not isinstance(spec, dict):
        return float(spec)
    n = counts[spec["per"]] if rows is None else rows
    weight = spec["units"] * n / spec["rows"] + spec.get("plus", 0)
    return float(min(weight, spec.get("at_most", weight)))


def load_steps(counts: Counts) -> list[Step]:
    """The recipe's steps at these counts, in order (a chunked step once per chunk)."""
    by_name = counts.settings()
    steps = []
    for spec in RECIPE["steps"]:
        sql = data_text(spec["file"])
        args = tuple(data_bytes(a) for a in spec.get("args", ()))
        chunk = spec.get("chunk")
        if chunk is None:
            steps.append(Step(spec["label"], sql, args, _weight(spec["weight"], by_name, None)))
            continue
        done, total = 0, by_name[chunk["of"]]
        while done < total:
            last = min(total, done + chunk["rows"])
            weight = _weight(spec["weight"], by_name, last - done)
            bounds = {"first": done + 1, "last": last}
            steps.append(Step(spec["label"], sql, args, weight, bounds))
            done = last
    return steps


def settings(counts: Counts, now: dt.datetime) -> dict[str, str]:
    """What the data files read: the counts and the load's "now" (UTC)."""
    out = {k: str(v) for k, v in counts.settings().items()}
    out |= {"now": now.isoformat(), "xdr_days": str(XDR_DAYS)}
    return out


def xdr_months(now: dt.datetime) -> tuple[dt.date, int]:
    """The xDRs' monthly partitions at `now` (aware): the first month, that of the day
    `XDR_DAYS` days before `now` in UTC (the oldest xDR's), and how many months from it to
    `now`'s month, both included."""
    utc = now.astimezone(dt.UTC)
    first = (utc - dt.timedelta(days=XDR_DAYS)).date().replace(day=1)
    return first, (utc.year - first.year) * 12 + utc.month - first.month + 1


def schema(now: dt.datetime) -> str:
    """The billing fixture's script for the demo's schema at `now`: the core and the recipe's
    parts, the xDRs by connect_time in `xdr_months(now)`, the schema marked as the demo's."""
    first, months = xdr_months(now)
    return fixture.script(
        parts=FIXTURE_PARTS,
        xdrs_by="connect_time",
        first_month=first,
        months=months,
        settings={"demo_marker": MARKER},
    )


async def _set(conn: Any, values: Mapping[str, object]) -> None:
    """Transaction-local settings (the callers run in a transaction): the passwords are gone
    when it ends."""
    for name, value in values.items():
        await conn.execute("SELECT pg_catalog.set_config($1, $2, true)", SETTING + name, str(value))


async def load(
    conn: Any,
    counts: Counts,
    now: dt.datetime,
    progress: Callable[[float, str], None] | None = None,
) -> None:
    """Create the schema and fill it on `conn` (an asyncpg connection), in one transaction
    (a savepoint in the caller's). `progress(weight, label)` is told before (weight 0) and
    after each step. No roles: see `create_roles`."""
    steps = load_steps(counts)
    async with conn.transaction():
        await _set(conn, settings(counts, now))
        if progress is not None:
            progress(0, "schema")
        # one script (one Query message): no round trip between the check and the fixture's
        # DROP SCHEMA IF EXISTS
        await conn.execute(data_text(RECIPE["absent_file"]) + "\n" + schema(now))
        for name in RECIPE["helper_files"]:
            await conn.execute(data_text(name))
        for step in steps:
            if progress is not None:
                progress(0, step.label)
            await _set(conn, step.settings)
            await conn.execute(step.sql, *step.args)
            if progress is not None:
                progress(step.weight, step.label)


def total_weight(counts: Counts) -> float:
    return sum(s.weight for s in load_steps(counts))


async def create_roles(conn: Any, passwords: Mapping[str, str]) -> None:
    """Create (or re-password) the demo's roles and grant them the schema (`data/roles.sql`).
    Roles that already exist must carry the demo's comment: the caller checks that first."""
    async with conn.transaction():
        await _set(conn, {"marker": MARKER} | {f"password_{r}": passwords[r] for r in DEMO_ROLES})
        await conn.execute(ROLES_SQL)


def erasure_yaml(audit_file: str | None) -> str:
    """The demo's erasure configuration (`pgveil erase`, `data/erasure.yaml`): terminated
    customers lose their personal data when their class's retention has passed; customers,
    accounts, xDRs and invoices stay, credentials, cards, aliases, phone books, recordings
    and voicemails go. Events go to standard output as written (deploy/erasure.yaml, for
    containers), or to `audit_file`, written as a JSON string, which YAML reads whatever it
    holds."""
    text = data_text("erasure.yaml")
    if audit_file is None:
        return text
    stdout = "audit:\n  stdout: true\n"
    assert text.endswith(stdout)
    return text.removesuffix(stdout) + f"audit:\n  file: {json.dumps(audit_file)}\n"


def rules_yaml(hash_key_file: str) -> str:
    """The demo's masking rules (`data/rules.yaml`): `helpdesk` is masked, `admin` sees
    everything. The key file's path is written as a JSON string, which YAML reads whatever
    it holds."""
    template = string.Template(data_text("rules.yaml"))
    return template.substitute(hash_key_file=json.dumps(hash_key_file))
