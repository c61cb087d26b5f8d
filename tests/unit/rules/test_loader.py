"""Rules files: the documented format loads; every mistake is an error naming file, line,
key path and what is allowed."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from rules.loader import RulesError, json_schema, load_rules, parse_rules
from rules.model import MaskSpec

ENV = {"PGVEIL_HASH_KEY": "k" * 32}

EXAMPLE = """\
roles:
  unmasked: [billing_admin, reporting]
  masked: [helpdesk, cc_staff]
  default: masked
keys:
  hash: {env: PGVEIL_HASH_KEY}
functions:
  allow: [billing.invoice_total]
channels:
  invoice_events: {payload: json, keys: {customer_name: partial, email: email}}
tables:
  billing.customers:
    subject: i_customer
    columns:
      name: partial
      email: email
      phone1: {mask: partial, keep_first: 1, keep_last: 2}
      cc_number: deny
      login: hash
      extra:
        mask: json
        keys: {drivers_license: partial, insurance_id: deny, address.street: partial}
"""


def test_the_documented_example_loads() -> None:
    p = parse_rules(EXAMPLE, "rules.yaml", ENV)
    assert p.classify({"helpdesk"}) == "masked"
    assert p.classify({"bob", "billing_admin"}) == "unmasked"
    assert p.classify({"bob", "billing_admin", "cc_staff"}) == "masked"  # any masked wins
    assert p.classify({"stranger"}) == "masked"
    assert p.allowed_functions == {("billing", "invoice_total")}
    t = p.table("billing", "customers")
    assert t is not None and t.subject == "i_customer"
    assert t.columns["phone1"] == MaskSpec("partial", keep_first=1, keep_last=2)
    assert t.columns["extra"].keys["address.street"] == MaskSpec("partial")
    assert p.keys["hash"] == b"k" * 32
    assert "kkkk" not in repr(p)
    assert p.channels["invoice_events"].keys["email"] == MaskSpec("email")


@pytest.mark.parametrize(
    ("text", "error"),
    [
        (
            "tables: {}\nrole: {}\n",
            "rules.yaml:2 at 'role': unknown key 'role'; allowed: databases, roles, keys, functions, channels, tables",
        ),
        (
            "roles: {default: maybe}\ntables: {}\n",
            "rules.yaml:1 at 'roles.default': expected 'masked' or 'unmasked'",
        ),
        (
            "tables:\n  customers: {columns: {a: partial}}\n",
            "at 'tables.customers': table names must be schema-qualified",
        ),
        (
            "tables:\n  s.t:\n    columns:\n      a: fuzzy\n",
            "rules.yaml:4 at 'tables.s.t.columns.a': unknown mask 'fuzzy'; masks: partial, email",
        ),
        (
            "tables:\n  s.t:\n    columns:\n      a: {mask: partial, keep: 2}\n",
            "mask 'partial' has no parameter 'keep'; parameters: char, keep_first, keep_last",
        ),
        (
            "tables:\n  s.t:\n    columns:\n      a: {mask: partial, keep_last: -1}\n",
            "expected a whole number from 0 to 100",
        ),
        (
            "tables:\n  s.t:\n    columns:\n      a: {mask: partial, char: '**'}\n",
            "expected a single character",
        ),
        ("tables:\n  s.t:\n    columns:\n      a: hash\n", "mask 'hash' needs a key"),
        (
            "keys:\n  hash: {env: NOPE}\ntables: {}\n",
            "rules.yaml:2 at 'keys.hash.env': environment variable NOPE is not set",
        ),
        ("keys:\n  hash: {env: SHORT}\ntables: {}\n", "the key must be at least 16 bytes long"),
        ("tables:\n  s.t:\n    columns:\n      a: {mask: json}\n", "mask 'json' needs 'keys'"),
        ("tables:\n  s.t:\n    columns:\n      a: json\n", "mask 'json' needs 'keys'"),
        ("tables:\n  s.t:\n    subject: id\n", "missing 'columns'"),
        ("roles: {masked: [a], unmasked: [a]}\ntables: {}\n", "both masked and unmasked"),
        ("functions: {allow: [nodot]}\ntables: {}\n", "expected schema.function"),
        ("roles: {}\n", "missing 'tables'"),
        ("", "the rules file is empty"),
        ("tables: [\n", "invalid YAML"),
        (
            "tables:\n  s.t: {columns: {a: partial}}\n  s.t: {columns: {b: partial}}\n",
            "rules.yaml:3 at 'tables.s.t': duplicate key",
        ),
        (
            "channels:\n  c: {payload: text, keys: {a: partial}}\ntables: {}\n",
            "text payloads take 'mask'",
        ),
    ],
)
def test_errors_name_file_line_and_path(text: str, error: str) -> None:
    with pytest.raises(RulesError) as info:
        parse_rules(text, "rules.yaml", {"SHORT": "abc"})
    assert error in str(info.value)


def test_missing_file_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(RulesError, match="cannot read rules file"):
        load_rules(tmp_path / "nope.yaml")


def test_key_from_file_never_in_error(tmp_path: Path) -> None:
    key = tmp_path / "k"
    key.write_text("secret-secret-secret\n")
    p = parse_rules(f"keys:\n  hash: {{file: {key}}}\ntables: {{}}\n", "r", {})
    assert p.keys["hash"] == b"secret-secret-secret"


def test_json_schema_is_json() -> None:
    schema = json_schema()
    json.dumps(schema)
    assert schema["required"] == ["tables"]
