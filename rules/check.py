"""The rules checked against one database: every name in the rules that the database does
not have. A rule naming a table, a column, a subject column or a function that does not
exist protects nothing; a masked role that does not exist classifies nobody. Either is a
misconfiguration to refuse on, never a rule to skip. So is user code the server would call
for a masked role without a statement naming it (a cast, a type's or a domain's function,
an operator, an operator class) when its function is not on the allow list.

One implementation for every caller: the proxy whenever it reads a catalog (start,
refresh, rules reload), `pgveil proxy --check-config` and `pgveil rules check --dsn`.
The callers decide what a problem means for them (see `Problem.effect`).

A problem names the rule by its key path in the rules file and says what is missing:
names of relations, columns, functions and roles, never a value from the database.
Pure: the caller reads the catalog and the role names (`pg_roles`); no I/O here.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass
from typing import Literal

from rules.catalog import Catalog
from rules.model import Policy

# what a problem closes:
#   masked:  masked sessions on that database (the rules would protect less than they say)
#   default: logins that only `roles.default: unmasked` would make unmasked (a masked
#            role that does not exist: whoever it was meant for would see everything)
#   none:    nothing; a warning (an unmasked role that does not exist fails safe)
Effect = Literal["masked", "default", "none"]


@dataclass(frozen=True)
class Problem:
    path: str  # the rule's key path in the rules file, e.g. tables.billing.customers
    message: str  # what is wrong: names only
    effect: Effect = "masked"

    @property
    def level(self) -> str:
        return "warning" if self.effect == "none" else "error"

    def __str__(self) -> str:
        return f"{self.path}: {self.message}"


def check_policy(
    policy: Policy,
    catalog: Catalog,
    roles: Collection[str] | None = None,
    database: str | None = None,
) -> tuple[Problem, ...]:
    """Every problem of `policy` against `catalog` (the catalog of `database`) and the
    cluster's role names `roles`, in the order of the rules file.

    The table and function rules are checked when the rules are for `database` (no
    `databases:` key, or it lists the database, or `database` is None); the roles when
    `roles` is given (they are the cluster's, the same for every database)."""
    problems: list[Problem] = []
    if database is None or policy.covers(database):
        problems += _tables(policy, catalog)
        problems += _functions(policy, catalog)
        problems += _hidden_code(policy, catalog)
    if roles is not None:
        problems += _roles(policy, roles)
    return tuple(problems)


def _tables(policy: Policy, catalog: Catalog) -> list[Problem]:
    out: list[Problem] = []
    for key, rule in policy.tables.items():
        path = f"tables.{rule.qualified}"
        rel = catalog.relations.get(key)
        if rel is None:
            out.append(Problem(path, f"relation {rule.qualified} does not exist"))
            continue
        if rule.subject is not None and rel.column(rule.subject) is None:
            out.append(
                Problem(
                    f"{path}.subject",
                    f"subject column {rule.subject} of {rule.qualified} does not exist",
                )
            )
        for column in rule.columns:
            if rel.column(column) is None:
                out.append(
                    Problem(
                        f"{path}.columns.{column}",
                        f"column {column} of {rule.qualified} does not exist",
                    )
                )
    return out


def _functions(policy: Policy, catalog: Catalog) -> list[Problem]:
    out: list[Problem] = []
    for schema, name in sorted(policy.allowed_functions):
        if schema == "pg_catalog":
            exists = name in catalog.builtin_functions
        else:
            exists = (schema, name) in catalog.user_functions or (
                schema,
                name,
            ) in catalog.system_functions
        if not exists:
            out.append(Problem("functions.allow", f"function {schema}.{name} does not exist"))
    return out


def _hidden_code(policy: Policy, catalog: Catalog) -> list[Problem]:
    """User code a masked role could run without naming it: a function that an explicit
    call would need on the allow list must be on it to be reachable any other way too."""
    out: list[Problem] = []
    for what, schema, name in catalog.hidden_code:
        if (schema, name) not in policy.allowed_functions:
            out.append(
                Problem(
                    "functions.allow",
                    f"{what} calls function {schema}.{name}, which is not allowed: masked "
                    "roles could run it without naming it; allow it or drop it",
                )
            )
    for what, schema, name in catalog.table_code:
        if (schema, name) not in policy.allowed_functions:
            out.append(
                Problem(
                    "functions.allow",
                    f"{what} calls function {schema}.{name}, which is not allowed: masked "
                    "roles' writes run it (ANALYZE and VACUUM FULL too, an index's or "
                    "extended statistics' expression); allow it once you have checked what "
                    "it does",
                    "none",
                )
            )
    return out


def _roles(policy: Policy, roles: Collection[str]) -> list[Problem]:
    out: list[Problem] = []
    for name in sorted(policy.masked_roles):
        if name not in roles:
            out.append(Problem("roles.masked", f"role {name} does not exist", "default"))
    for name in sorted(policy.unmasked_roles):
        if name not in roles:
            out.append(Problem("roles.unmasked", f"role {name} does not exist", "none"))
    return out


def summary(problems: Collection[Problem]) -> str:
    """The first problem and how many more, for a refusal message."""
    first = next(iter(problems))
    more = len(problems) - 1
    if more == 0:
        return str(first)
    return f"{first} (and {more} more problem{'s' if more > 1 else ''})"
