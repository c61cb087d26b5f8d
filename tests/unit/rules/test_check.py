"""The rules checked against a catalog (rules.check), and what a MaskingContext does with
the problems: masked logins and statements refused, logins unmasked only by the default
refused while a masked role does not exist, explicitly unmasked logins untouched."""

from __future__ import annotations

import pytest

from rules.catalog import Catalog
from rules.check import Problem, check_policy, summary
from rules.context import MaskingContext
from rules.loader import RulesError, json_schema, parse_rules
from rules.model import Policy
from tests.unit.rules.fixtures import CATALOG, RULES

ENV = {"K": "k" * 32}
ROLES = frozenset({"helpdesk", "billing_admin", "cc_staff", "postgres"})
ROLE_RULES = "roles: {masked: [helpdesk, cc_staff], unmasked: [billing_admin], default: unmasked}\n"


def policy(text: str = RULES, roles: str = ROLE_RULES) -> Policy:
    return parse_rules(roles + text, "rules.yaml", ENV)


def test_rules_that_match_the_catalog_have_no_problem() -> None:
    assert check_policy(policy(), CATALOG, ROLES, "billing") == ()


def test_misspelled_table() -> None:
    text = RULES.replace("billing.customers:", "billing.custmers:")
    assert check_policy(policy(text), CATALOG, ROLES) == (
        Problem("tables.billing.custmers", "relation billing.custmers does not exist"),
    )


def test_table_names_are_exact() -> None:
    text = RULES.replace("billing.accounts:", "billing.Accounts:")
    (p,) = check_policy(policy(text), CATALOG)
    assert p.path == "tables.billing.Accounts" and p.effect == "masked"


def test_missing_column_and_subject_every_one_listed() -> None:
    text = (
        RULES.replace("subject: i_customer", "subject: i_custmer")
        .replace("      email: email\n", "      emial: email\n")
        .replace("      ip: partial\n", "      ip: partial\n      mac: partial\n")
    )
    problems = check_policy(policy(text), CATALOG, ROLES)
    assert [str(p) for p in problems] == [
        "tables.billing.customers.subject: subject column i_custmer of billing.customers "
        "does not exist",
        "tables.billing.customers.columns.emial: column emial of billing.customers does not exist",
        "tables.billing.accounts.columns.mac: column mac of billing.accounts does not exist",
    ]
    assert {p.level for p in problems} == {"error"}


def test_allow_listed_functions_must_exist() -> None:
    text = RULES.replace(
        "allow: [billing.invoice_total]",
        "allow: [billing.invoice_totl, billing.invoice_total, pg_catalog.upper, "
        "pg_catalog.no_such, information_schema._pg_expandarray]",
    )
    cat = Catalog(
        relations=CATALOG.relations,
        builtin_functions=CATALOG.builtin_functions,
        user_functions=CATALOG.user_functions,
        system_functions=frozenset({("information_schema", "_pg_expandarray")}),
    )
    assert [str(p) for p in check_policy(policy(text), cat, ROLES)] == [
        "functions.allow: function billing.invoice_totl does not exist",
        "functions.allow: function pg_catalog.no_such does not exist",
    ]


def test_roles_missing_masked_is_an_error_missing_unmasked_a_warning() -> None:
    roles = "roles: {masked: [helpdsk, cc_staff], unmasked: [billing_admn], default: unmasked}\n"
    problems = check_policy(policy(roles=roles), CATALOG, ROLES)
    assert problems == (
        Problem("roles.masked", "role helpdsk does not exist", "default"),
        Problem("roles.unmasked", "role billing_admn does not exist", "none"),
    )
    assert [p.level for p in problems] == ["error", "warning"]
    # without the role list (no connection to read it), roles are not judged
    assert check_policy(policy(roles=roles), CATALOG) == ()


def test_databases_key_scopes_the_table_rules() -> None:
    p = policy("databases: [billing, shop]\n" + RULES.replace("customers:", "custmers:"))
    assert p.databases == ("billing", "shop")
    assert len(check_policy(p, CATALOG, ROLES, "billing")) == 1
    # another database: the table rules are not for it, so nothing to check there
    assert check_policy(p, CATALOG, ROLES, "postgres") == ()
    assert p.covers("shop") and not p.covers("postgres")
    assert policy().covers("anything")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("databases: []\n", "at 'databases': expected at least one database"),
        ("databases: billing\n", "at 'databases': expected a list"),
        ("databases: [a, b, a]\n", "at 'databases[2]': database a is listed twice"),
        ("databases: [{x: 1}]\n", "at 'databases[0]': expected a single value"),
    ],
)
def test_databases_key_is_strict(text: str, message: str) -> None:
    with pytest.raises(RulesError, match=message.replace("[", r"\[").replace("]", r"\]")):
        parse_rules(text + RULES, "rules.yaml", ENV)


def test_schema_knows_databases() -> None:
    schema = json_schema()["properties"]["databases"]
    assert schema["type"] == "array" and schema["minItems"] == 1


def test_summary_names_the_first_and_counts_the_rest() -> None:
    a, b, c = (Problem(f"tables.s.t{i}", "relation does not exist") for i in range(3))
    assert summary([a]) == "tables.s.t0: relation does not exist"
    assert summary([a, b]).endswith("(and 1 more problem)")
    assert summary([a, b, c]).endswith("(and 2 more problems)")


# ---- what the context does with them -------------------------------------------------------


def test_masked_sessions_refused_while_the_rules_do_not_match() -> None:
    text = RULES.replace("billing.customers:", "billing.custmers:").replace(
        "subject: i_account", "subject: i_acount"
    )
    ctx = MaskingContext(policy(text), CATALOG, roles=ROLES, database="billing")
    assert ctx.refusal == (
        "the rules do not match database billing: tables.billing.custmers: relation "
        "billing.custmers does not exist (and 1 more problem); masked sessions are refused "
        "until the rules are fixed"
    )
    d = ctx.analyze("SELECT name FROM billing.customers WHERE i_customer = 42")
    assert d.action == "refuse" and d.reason == ctx.refusal
    assert "42" not in d.redacted and d.redacted  # the audit event's text, literal-free
    assert ctx.analyze("SELECT 1").action == "refuse"  # nothing is analysed: everything
    # unmasked sessions' statements are still recorded (analysed for the audit only)
    assert ctx.analyze("SELECT 1", audit_only=True).action == "pass"
    assert ctx.admission(frozenset({"helpdesk"})) == ("masked", ctx.refusal)
    assert ctx.admission(frozenset({"cc_agent", "cc_staff"})) == ("masked", ctx.refusal)
    assert ctx.admission(frozenset({"billing_admin"})) == ("unmasked", None)
    assert ctx.admission(frozenset({"stranger"})) == ("unmasked", None)  # default: unmasked


def test_matching_rules_admit_and_analyse() -> None:
    ctx = MaskingContext(policy(), CATALOG, roles=ROLES, database="billing")
    assert ctx.refusal is None and ctx.default_refusal is None
    assert ctx.admission(frozenset({"helpdesk"})) == ("masked", None)
    assert ctx.analyze("SELECT name FROM billing.customers").action == "rewrite"


def test_misspelled_masked_role_refuses_logins_unmasked_by_default_only() -> None:
    roles = "roles: {masked: [helpdsk, cc_staff], unmasked: [billing_admin], default: unmasked}\n"
    ctx = MaskingContext(policy(roles=roles), CATALOG, roles=ROLES, database="billing")
    assert ctx.refusal is None  # nothing wrong with the tables: masked roles go on
    assert ctx.default_refusal == (
        "roles.masked: role helpdsk does not exist; logins that only roles.default makes "
        "unmasked are refused until the rules are fixed"
    )
    # helpdesk (meant to be masked) would be unmasked by the default: refused
    assert ctx.admission(frozenset({"helpdesk"})) == ("unmasked", ctx.default_refusal)
    assert ctx.admission(frozenset({"stranger"})) == ("unmasked", ctx.default_refusal)
    assert ctx.admission(frozenset({"billing_admin"})) == ("unmasked", None)
    assert ctx.admission(frozenset({"cc_agent", "cc_staff"})) == ("masked", None)


def test_misspelled_masked_role_with_default_masked_closes_nothing() -> None:
    roles = "roles: {masked: [helpdsk], unmasked: [billing_admin], default: masked}\n"
    ctx = MaskingContext(policy(roles=roles), CATALOG, roles=ROLES, database="billing")
    assert [p.level for p in ctx.problems] == ["error"]  # still reported
    assert ctx.refusal is None and ctx.default_refusal is None
    assert ctx.admission(frozenset({"helpdesk"})) == ("masked", None)


def test_misspelled_unmasked_role_is_only_a_warning() -> None:
    roles = "roles: {masked: [helpdesk], unmasked: [billing_admn], default: unmasked}\n"
    ctx = MaskingContext(policy(roles=roles), CATALOG, roles=ROLES, database="billing")
    assert [p.level for p in ctx.problems] == ["warning"]
    assert ctx.refusal is None and ctx.default_refusal is None
    assert ctx.admission(frozenset({"billing_admin"})) == ("unmasked", None)  # by default


def test_database_not_listed_refuses_masked_roles_only() -> None:
    p = policy("databases: [billing]\n" + RULES)
    ctx = MaskingContext(p, CATALOG, roles=ROLES, database="postgres")
    assert ctx.problems == ()
    assert ctx.refusal == (
        "the rules are not for database postgres (databases: billing); masked roles may not use it"
    )
    assert ctx.admission(frozenset({"helpdesk"})) == ("masked", ctx.refusal)
    assert ctx.admission(frozenset({"billing_admin"})) == ("unmasked", None)
    assert MaskingContext(p, CATALOG, roles=ROLES, database="billing").refusal is None


def test_renamed_table_is_a_problem_even_though_its_masks_carry_over() -> None:
    """A protected table renamed since the last read keeps its masks by OID (drift), but
    the rules now name a table that does not exist: masked sessions are refused."""
    before = MaskingContext(policy(), CATALOG, roles=ROLES, database="billing")
    relations = dict(CATALOG.relations)
    old = relations.pop(("billing", "accounts"))
    relations[("billing", "accounts_old")] = type(old)(
        old.oid, "billing", "accounts_old", old.kind, old.columns
    )
    renamed = Catalog(
        relations=relations,
        builtin_functions=CATALOG.builtin_functions,
        user_functions=CATALOG.user_functions,
    )
    after = MaskingContext(policy(), renamed, before.pmap, roles=ROLES, database="billing")
    assert after.pmap.drift  # the masks follow the table
    assert after.refusal is not None and "tables.billing.accounts:" in after.refusal


def test_code_the_server_runs_unnamed_must_be_allowed() -> None:
    from dataclasses import replace

    catalog = replace(
        CATALOG,
        hidden_code=(
            ("cast from inet to integer", "billing", "to_int"),
            ("operator billing.=(integer,text)", "billing", "invoice_total"),
        ),
    )
    (problem,) = check_policy(policy(), catalog, ROLES)
    assert problem == Problem(
        "functions.allow",
        "cast from inet to integer calls function billing.to_int, which is not allowed: "
        "masked roles could run it without naming it; allow it or drop it",
    )
    assert problem.effect == "masked"  # the operator's function is allow-listed: no problem
