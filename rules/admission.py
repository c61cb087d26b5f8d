"""Whether a login may start on a database, given the rules checked against its catalog.

A masked login is refused while the rules are not for the database or do not match it
(`rules_refusal`: a problem whose effect is "masked", rules.check); a login that only
`roles.default` makes unmasked is refused while a masked role of the rules does not exist,
since it may be the misspelling of one of its roles (`default_refusal`). `admission` puts
both together for one login. What a login's startup packet may set is rules.startup's.

Pure: no I/O. Reasons name databases, rules and roles, never a value of the database.
"""

from __future__ import annotations

from collections.abc import Collection

from rules.check import Problem, summary
from rules.model import Classification, Policy


def rules_refusal(
    policy: Policy, problems: Collection[Problem], database: str | None
) -> str | None:
    """Why masked sessions on `database` are refused (its logins and every statement), if
    they are: the rules are not for it, or a problem of theirs closes masked sessions."""
    if database is not None and not policy.covers(database):
        listed = ", ".join(policy.databases or ())
        return (
            f"the rules are not for database {database} (databases: {listed}); masked roles "
            "may not use it"
        )
    closing = [p for p in problems if p.effect == "masked"]
    if not closing:
        return None
    where = f"database {database}" if database is not None else "the database"
    return (
        f"the rules do not match {where}: {summary(closing)}; masked sessions are "
        "refused until the rules are fixed"
    )


def default_refusal(policy: Policy, problems: Collection[Problem]) -> str | None:
    """Why logins that only `roles.default` makes unmasked are refused, if they are."""
    missing = [p for p in problems if p.effect == "default"]
    if not missing or policy.default != "unmasked":
        return None
    return (
        f"{summary(missing)}; logins that only roles.default makes unmasked are refused "
        "until the rules are fixed"
    )


def admission(
    policy: Policy, roles: frozenset[str], refusal: str | None, default: str | None
) -> tuple[Classification, str | None]:
    """How a login is classified (`roles`: itself and every role it belongs to,
    transitively), and why it may not log in, if it may not: a masked login while
    `refusal` (rules_refusal) is set; a login that is unmasked only by `roles.default`
    while `default` (default_refusal) is set. Logins listed as unmasked always go on."""
    classification = policy.classify(roles)
    if classification == "masked":
        return classification, refusal
    if default is not None and not roles & policy.unmasked_roles:
        return classification, default
    return classification, None
