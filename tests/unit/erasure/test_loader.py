"""erasure.yaml: the documented example loads; every mistake is an error naming the file,
the line, the key path and the fix."""

from __future__ import annotations

import re
from dataclasses import replace
from pathlib import Path

import pytest

from erasure import loader
from erasure.loader import ErasureConfigError, load_config, parse_config
from erasure.model import ColumnAction, Owner, TableName
from tests.unit.erasure.fakes import EXAMPLE


def test_the_annotated_example_is_the_same_configuration() -> None:
    annotated = loader.EXAMPLE
    assert annotated.count("#") > 20 and annotated.count("\n") == EXAMPLE.count("\n")
    a, b = parse_config(annotated, "e.yaml"), parse_config(EXAMPLE, "e.yaml")
    assert replace(a, version="") == replace(b, version="")


def test_the_readme_documents_the_example() -> None:
    readme = (Path(__file__).resolve().parents[3] / "README.md").read_text()
    assert "```yaml\n" + loader.EXAMPLE + "```" in readme


def test_the_documented_example_loads() -> None:
    c = parse_config(EXAMPLE, "erasure.yaml")
    assert c.subject.table == TableName("billing", "customers")
    assert c.subject.retention.class_table == TableName("billing", "customer_classes")
    assert c.subject.retention.class_subject_column == "i_customer_class"
    assert c.subject.retention.default == "0 days"
    xdrs = c.table(TableName("billing", "xdrs"))
    assert xdrs is not None
    assert xdrs.owner == Owner("i_account", TableName("billing", "accounts"), "i_account")
    assert xdrs.large and xdrs.key == "i_xdr" and xdrs.batch_size == 5000
    assert [a.kind for a in xdrs.columns] == ["null"] * 4
    accounts = c.table(TableName("billing", "accounts"))
    assert accounts is not None and accounts.owner == Owner("i_customer", None, "i_customer")
    assert accounts.columns[0] == ColumnAction("id", "placeholder", "erased-{key}")
    assert accounts.columns[0].uses_key
    assert accounts.columns[3] == ColumnAction(
        "custom", "json_placeholder", "[erased]", (("sip_user",),)
    )
    customers = c.table(TableName("billing", "customers"))
    assert customers is not None and customers.owner is None and customers.key == "i_customer"
    assert customers.columns[4] == ColumnAction(
        "custom", "json_remove", None, (("passport",), ("contact", "phone"))
    )
    recordings = c.table(TableName("billing", "call_recordings"))
    assert recordings is not None and recordings.action == "delete" and not recordings.columns
    assert c.worker.lock_timeout_ms == 1000 and c.worker.statement_timeout_ms == 30_000
    assert c.worker.poll_interval_s == 60.0 and c.worker.max_failures == 5
    assert c.worker.vacuum == "run"
    assert parse_config(EXAMPLE.replace("vacuum: run", "vacuum: off")).worker.vacuum == "off"
    without = parse_config(EXAMPLE.replace("  vacuum: run\n", ""))
    assert without.worker.vacuum == "run"  # on by default
    assert c.audit.file == Path("/var/log/pgveil/erasure.jsonl") and not c.audit.stdout
    assert c.version == parse_config(EXAMPLE).version
    assert c.version != parse_config(EXAMPLE.replace("5000", "500")).version


def test_retention_forms() -> None:
    base = EXAMPLE.split("  retention:")[0]
    rest = "tables:" + EXAMPLE.split("tables:", 1)[1]
    fixed = parse_config(base + "  retention: 30\n" + rest)
    assert fixed.subject.retention.default == "30 days"
    assert fixed.subject.retention.class_table is None
    text = parse_config(base + "  retention: 1 year   6 months\n" + rest)
    assert text.subject.retention.default == "1 year 6 months"
    mapped = parse_config(
        base
        + "  retention:\n    default: 14\n    by_class:\n      column: i_customer_class\n"
        + "      values: {1: 30 days, 2: 0, EU: 2 weeks}\n"
        + rest
    )
    r = mapped.subject.retention
    assert r.default == "14 days" and r.by_class_column == "i_customer_class"
    assert r.by_class == (("1", "30 days"), ("2", "0 days"), ("EU", "2 weeks"))
    none = parse_config(base + rest)
    assert none.subject.retention.default == "0 days"


def _replace(old: str, new: str) -> str:
    assert old in EXAMPLE, old
    return EXAMPLE.replace(old, new, 1)


CASES = [
    ("subject:", "subjekt:", ":1 at 'subjekt': unknown key 'subjekt'; allowed: subject, tables"),
    (
        "  key: i_customer\n  terminated_at",
        "  terminated_at",
        ":1 at 'subject': missing 'key'",
    ),
    ("table: billing.customers", "table: customers", "write the table as schema.table"),
    (
        "    default: 0 days",
        "    default: a month",
        ":6 at 'subject.retention.default': 'a month' is not a retention period",
    ),
    (
        "    default: 0 days",
        "    default: 0 days\n    by_class: {column: c, values: {1: 3}}",
        "give either 'by_class' or 'class_table', not both",
    ),
    (
        "class_table: {table: billing.customer_classes, key: i_customer_class, column: retention}",
        "class_table: {table: billing.customer_classes, key: i_customer_class}",
        "at 'subject.retention.class_table': missing 'column'",
    ),
    (
        "  billing.accounts:\n    owner: {column: i_customer}\n",
        "  billing.accounts:\n",
        ":16 at 'tables.billing.accounts': missing 'owner': how rows belong to a subject",
    ),
    (
        "owner: {column: i_account, through: billing.accounts}\n    large: true",
        "owner: {column: i_account, through: billing.acounts}\n    large: true",
        "at 'tables.billing.xdrs.owner.through': billing.acounts is not configured under "
        "'tables': add it",
    ),
    (
        "    action: delete\nworker:",
        "    action: remove\nworker:",
        "at 'tables.billing.call_recordings.action': expected 'update' (set columns) or 'delete'",
    ),
    (
        "      email: null",
        "      email: nul",
        ":12 at 'tables.billing.customers.columns.email': expected null, {placeholder: TEXT}",
    ),
    (
        "      email: null",
        "      email: {mask: email}",
        "at 'tables.billing.customers.columns.email.mask': unknown key 'mask'; allowed: "
        "placeholder, json_keys",
    ),
    (
        "      email: null",
        "      i_customer: null",
        "at 'tables.billing.customers.columns.i_customer': i_customer cannot be erased: it is "
        "subject.key",
    ),
    (
        "    columns: {account_id: null, cli: null",
        "    columns: {i_account: null, cli: null",
        "at 'tables.billing.xdrs.columns.i_account': i_account cannot be erased: it is "
        "owner.column",
    ),
    (
        "      ip: null\n      mac: null",
        "      i_account: null\n      mac: null",
        "at 'tables.billing.accounts.columns.i_account': i_account cannot be erased: it is the "
        "table's key",
    ),
    (
        "    key: i_xdr\n",
        "",
        "at 'tables.billing.xdrs': a large table is erased in batches by an indexed key: add 'key'",
    ),
    (
        "    action: delete\nworker:",
        "    action: delete\n    batch_size: 10\nworker:",
        "batches are for large tables",
    ),
    (
        "    owner: {column: i_customer}\n    key: i_account\n",
        "    owner: {column: i_customer}\n",
        "at 'tables.billing.accounts.columns.id.placeholder': '{key}' needs the table's key",
    ),
    (
        "custom: {json_keys: [passport, contact.phone]}",
        "custom: {json_keys: [passport, contact..phone]}",
        "at 'tables.billing.customers.columns.custom.json_keys[1]': expected a key or a "
        "dotted path",
    ),
    (
        "  lock_timeout: 1s",
        "  lock_timeout: 1 second",
        ":36 at 'worker.lock_timeout': '1 second' is not a duration; write e.g. 500ms, 5s",
    ),
    ("  batch_size: 5000\n  lock", "  batch_size: 0\n  lock", "expected a whole number from 1"),
    ("  rate_limit: 0", "  rate_limit: fast", "at 'worker.rate_limit': expected a whole number"),
    ("  concurrency: 1", "  threads: 1", "unknown key 'threads'"),
    (
        "  vacuum: run",
        "  vacuum: yes",
        "at 'worker.vacuum': 'yes': write run (VACUUM the changed tables after each pass), "
        "job (after each job) or off",
    ),
    (
        "  file: /var/log/pgveil/erasure.jsonl\n  stdout: false",
        "  stdout: false",
        "at 'audit': every erasure is audited: give file: PATH, stdout: true and/or table: {dsn: ...}",
    ),
    ("  stdout: false", "  stdout: no", "at 'audit.stdout': expected true or false"),
    (
        "  billing.call_recordings:",
        "  billing.accounts:",
        "at 'tables.billing.accounts': duplicate key",
    ),
    (
        "  billing.customers:\n    columns:",
        "  billing.customers:\n    owner: {column: i_customer}\n    columns:",
        "the subject table's rows are found by subject.key; remove 'owner'",
    ),
]


@pytest.mark.parametrize(("old", "new", "error"), CASES)
def test_mistakes_name_file_line_path_and_fix(old: str, new: str, error: str) -> None:
    with pytest.raises(ErasureConfigError) as exc:
        parse_config(_replace(old, new), "erasure.yaml")
    message = str(exc.value)
    assert message.startswith("erasure.yaml:"), message
    assert error in message, message


def test_relations_through_deleted_tables_and_loops_are_refused() -> None:
    loop = _replace(
        "  billing.accounts:\n    owner: {column: i_customer}",
        "  billing.accounts:\n    owner: {column: i_customer, through: billing.xdrs}",
    )
    with pytest.raises(
        ErasureConfigError,
        match=re.escape(
            "at 'tables.billing.accounts.owner.through': the relation loops: "
            "billing.accounts -> billing.xdrs -> billing.accounts"
        ),
    ):
        parse_config(loop, "erasure.yaml")
    through_deleted = EXAMPLE.replace(
        "  billing.call_recordings:\n    owner: {column: i_account, through: billing.accounts}\n"
        "    action: delete\n",
        "  billing.call_recordings:\n    owner: {column: i_account, through: billing.accounts}\n"
        "    action: delete\n  billing.transcripts:\n    owner: {column: i_recording, "
        "through: billing.call_recordings}\n    action: delete\n",
    )
    with pytest.raises(ErasureConfigError, match=re.escape("billing.call_recordings is deleted")):
        parse_config(through_deleted, "erasure.yaml")


def test_empty_unreadable_and_invalid_files(tmp_path: Path) -> None:
    with pytest.raises(ErasureConfigError, match="the file is empty"):
        parse_config("", "e.yaml")
    with pytest.raises(ErasureConfigError, match=r"e.yaml:3: invalid YAML"):
        parse_config("subject:\n  - [\n", "e.yaml")
    with pytest.raises(ErasureConfigError, match="cannot read the erasure configuration"):
        load_config(tmp_path / "missing.yaml")
    good = tmp_path / "erasure.yaml"
    good.write_text(EXAMPLE)
    assert load_config(good).source == str(good)
