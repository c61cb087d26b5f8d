"""`rules suggest`'s drafts: masks that hide what they are proposed for, the subject that
leads to the customer, one rule for a partitioned table, and nothing sampled printed.

The drafts are also checked against the real demo and fixture schemas in
tests/integration/test_rules_suggest.py."""

from __future__ import annotations

import json

import pytest

from rules.catalog import Catalog, Column, Relation
from rules.discovery import (
    ForeignKey,
    Keys,
    discover,
    hides,
    name_category,
    suggest,
    value_category,
)
from rules.loader import parse_rules
from rules.masks import ColumnType, fits

# one example value of each category a name can say, with the part its mask must hide
EXAMPLES = {
    "name": ("Zebulon Quixotehart", "ebulon Quixotehar"),
    "credential": ("hunter2-secret", "hunter2"),
    "e-mail": ("zebulon.q@mail.example", "ebulon.q"),
    "card number": ("4111 2222 3333 4444", "4111 2222 3333"),
    "bank account": ("CZ6508000000192000145399", "08000000192000"),
    "phone number": ("+420777123456", "420777123"),
    "SIM or device identifier": ("001010123456789", "0101234567"),
    "IP address": ("198.51.173.222", "51.173"),
    "MAC address": ("0a:1b:2c:3d:4e:5f", "1b:2c:3d:4e"),
    "date of birth": ("1977-03-14", "03-14"),
    "postal address": ("12 Acacia Avenue", "2 Acacia Avenu"),
    "personal identifier": ("DL-98765-XQWV", "L-98765-XQW"),
    "login": ("zq_login_secret", "q_login_secre"),
    "free text": ("call me on +420777123456", "420777123"),
}

NAMES = {
    "name": ["cardholder", "name", "firstname", "subscriber_lastname", "contact_person"],
    "credential": ["password_hash", "sip_password", "totp_secret", "api_key", "pin"],
    "e-mail": ["email", "subscriber_email"],
    "card number": ["card_number", "cc_number", "pan"],
    "bank account": ["iban", "bank_account"],
    "phone number": ["phone1", "msisdn", "cli", "caller"],
    "SIM or device identifier": ["imsi", "imei"],
    "IP address": ["ip", "ip_address"],
    "MAC address": ["mac"],
    "date of birth": ["date_of_birth", "dob"],
    "postal address": ["address", "billing_zip", "city", "country"],
    "personal identifier": ["passport", "vat_id", "dl", "driver_license", "ssn"],
    "login": ["login", "username", "sip_login"],
    "free text": ["notes", "transcript", "comment"],
}


@pytest.mark.parametrize("category", sorted(EXAMPLES))
def test_each_category_mask_hides_its_example(category: str) -> None:
    value, core = EXAMPLES[category]
    for name in NAMES[category]:
        found = name_category(name)
        assert found is not None and found[0] == category, name
        spec = found[1]
        type_name = "inet" if category == "IP address" else "text"
        type_name = "macaddr" if category == "MAC address" else type_name
        assert fits(spec, type_name), (name, spec)
        assert hides(spec, type_name, value), (name, spec)
        from rules.masks import py_mask

        shown = py_mask(spec, value, ColumnType(type_name, type_name), {}) or ""
        assert core not in shown, (name, spec, shown)


@pytest.mark.parametrize(
    "name",
    ["i_phonebook", "i_voicemail", "capacity", "classname", "private", "hmac", "i_account",
     "bill_status", "team", "created_at", "filename", "hostname", "description"],
)  # fmt: skip
def test_short_words_match_whole_words_only(name: str) -> None:
    assert name_category(name) is None


def test_a_card_holder_is_a_name_and_a_card_number_is_not_a_phone() -> None:
    assert name_category("cardholder") == name_category("name")
    found = name_category("number", "customer_cards")
    assert found is not None and found[0] == "card number"
    assert name_category("number", "orders") is None
    # by value: grouped 16 digits (not Luhn-valid: fake data) and Luhn-valid 15 digits
    fake = ["4111 1111 0000 0002", "4111 1111 0000 0004", "4111 1111 0000 0006"]
    assert value_category(fake) is not None and value_category(fake)[0] == "card number"  # type: ignore[index]
    amex = ["378282246310005", "371449635398431", "378734493671000"]
    assert value_category(amex)[0] == "card number"  # type: ignore[index]
    phones = ["+420777123456", "+420600000000", "+18005550100"]
    assert value_category(phones)[0] == "phone number"  # type: ignore[index]


def rel(
    oid: int, schema: str, name: str, cols: list[tuple[str, str]], kind: str = "r", parents=()
) -> Relation:
    return Relation(
        oid,
        schema,
        name,
        kind,
        tuple(Column(c, i + 1, ColumnType(t, t)) for i, (c, t) in enumerate(cols)),
        tuple(parents),
    )


def billing() -> tuple[Catalog, Keys]:
    rels = [
        rel(1, "billing", "customers", [("i_customer", "int8"), ("name", "text"), ("email", "text")]),
        rel(2, "billing", "accounts", [("i_account", "int8"), ("i_customer", "int8"), ("ip", "inet")]),
        rel(3, "billing", "customer_cards", [("i_card", "int8"), ("i_customer", "int8"), ("cardholder", "text"), ("number", "text")]),
        rel(4, "billing", "xdrs", [("i_xdr", "int8"), ("i_account", "int8"), ("cli", "text")], "p"),
        rel(5, "billing", "xdrs_2026", [("i_xdr", "int8"), ("i_account", "int8"), ("cli", "text")], "r", [("billing", "xdrs")]),
        rel(6, "billing", "vendors", [("i_vendor", "int4"), ("contact_name", "text")]),
        rel(7, "billing", "resellers", [("i_reseller", "int4"), ("email", "text")]),
        rel(8, "billing", "notes_log", [("id", "int4"), ("body", "jsonb")]),
    ]  # fmt: skip
    relations = {(r.schema, r.name): r for r in rels}
    relations[("billing", "customers")] = rel(
        1,
        "billing",
        "customers",
        [("i_customer", "int8"), ("i_parent", "int4"), ("name", "text"), ("email", "text")],
    )
    keys = Keys(
        primary={
            ("billing", "customers"): ("i_customer",),
            ("billing", "accounts"): ("i_account",),
            ("billing", "customer_cards"): ("i_card",),
            ("billing", "vendors"): ("i_vendor",),
            ("billing", "resellers"): ("i_reseller",),
        },
        foreign={
            ("billing", "accounts"): (
                ForeignKey(("i_customer",), ("billing", "customers"), ("i_customer",)),
            ),
            ("billing", "customer_cards"): (
                ForeignKey(("i_customer",), ("billing", "customers"), ("i_customer",)),
            ),
            # customers -> resellers: the subjects' table references another personal one
            ("billing", "customers"): (
                ForeignKey(("i_parent",), ("billing", "resellers"), ("i_reseller",)),
            ),
        },
    )
    return Catalog(relations=relations), keys


def test_suggest_subjects_partitions_and_masks() -> None:
    catalog, keys = billing()
    samples = {
        ("billing", "customer_cards", "number"): [f"4111 1111 0000 {i:04d}" for i in range(9)],
        ("billing", "customer_cards", "cardholder"): [f"CUSTOMER {i:06d}" for i in range(9)],
        ("billing", "xdrs", "cli"): [f"+1555{i:07d}" for i in range(9)],
    }
    draft = suggest(catalog, samples, keys)
    policy = parse_rules(draft)  # loads as it is
    t = policy.tables
    assert t[("billing", "customers")].subject == "i_customer"
    assert t[("billing", "accounts")].subject == "i_customer"
    assert t[("billing", "customer_cards")].subject == "i_customer"
    # no foreign key from the xDRs: their i_account is named like accounts' key
    assert t[("billing", "xdrs")].subject == "i_account"
    assert "# -> billing.accounts -> billing.customers (partly by column name" in draft
    # staff and partners are not linked to the customers: their own key
    assert t[("billing", "vendors")].subject == "i_vendor"
    assert ("billing", "xdrs_2026") not in t  # the partition: its parent's rule
    cards = t[("billing", "customer_cards")].columns
    assert cards["cardholder"].name == "partial"
    assert (cards["number"].name, cards["number"].keep_last) == ("digits", 4)
    assert t[("billing", "xdrs")].columns["cli"].keep_last == 2  # a phone number
    assert "# Subjects: billing.customers" in draft


def test_suggest_subject_table_can_be_named() -> None:
    catalog, keys = billing()
    draft = suggest(catalog, {}, keys, [("billing", "accounts")])
    t = parse_rules(draft).tables
    assert t[("billing", "accounts")].subject == "i_account"
    assert t[("billing", "customer_cards")].subject == "i_card"  # no path to accounts
    assert t[("billing", "xdrs")].subject == "i_account"


def test_a_mask_that_would_show_a_sampled_value_whole_is_replaced() -> None:
    catalog = Catalog(relations={("s", "t"): rel(1, "s", "t", [("card_number", "text")])})
    # named like a card number, but holds processor tokens: `digits` would show them whole
    tokens = ["tok_visa_abc", "tok_mastercard_x", "tok_amex_q"]
    found = discover(catalog, {("s", "t", "card_number"): tokens})
    spec = found[("s", "t", "card_number")][1]
    assert all(hides(spec, "text", v) for v in tokens)
    assert spec.name == "partial"


def test_json_keys_are_field_names_never_data() -> None:
    catalog, keys = billing()
    docs = [
        {"date_of_birth": f"1970-01-0{i}", "passport": f"X0000000{i}", "tier": "gold"}
        for i in range(1, 5)
    ]
    # an object keyed by e-mail addresses: its keys are data and are never printed
    docs.append({"zebulon.q@mail.example": "vip", "date_of_birth": "1970-01-09"})
    samples = {("billing", "notes_log", "body"): [json.dumps(d) for d in docs]}
    draft = suggest(catalog, samples, keys)
    assert "zebulon" not in draft and "vip" not in draft and "1970" not in draft
    spec = parse_rules(draft).tables[("billing", "notes_log")].columns["body"]
    assert spec.name == "json" and set(spec.keys) == {"date_of_birth", "passport"}
    assert (spec.keys["date_of_birth"].keep_first, spec.keys["date_of_birth"].keep_last) == (4, 0)


def test_nothing_sampled_is_printed() -> None:
    catalog, keys = billing()
    canary = "Qzxw-canary"
    samples = {
        (s, t, c.name): [f"{canary}-{i}@mail.example" for i in range(5)]
        for (s, t), r in catalog.relations.items()
        for c in r.columns
        if c.type.name == "text"
    }
    draft = suggest(catalog, samples, keys)
    assert canary not in draft and "mail.example" not in draft
