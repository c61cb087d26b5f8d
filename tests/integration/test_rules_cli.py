"""`pgveil rules check|suggest|schema` against a real database."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from proxy.demo.embedded_pg import EmbeddedPostgres
from tests.integration.masking_fixture import HASH_KEY, RULES, leaks
from tests.support import ProxyProcess


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    import os

    env = {**os.environ, "PGVEIL_TEST_HASH_KEY": HASH_KEY}
    return subprocess.run(
        [sys.executable, "-m", "proxy.cli", "rules", *args],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )


def _dsn(pg: EmbeddedPostgres) -> str:
    return f"host=127.0.0.1 port={pg.port} user={pg.superuser} password={pg.password} dbname=postgres sslmode=disable"


def test_check_good_rules(pg: EmbeddedPostgres, billing: ProxyProcess, tmp_path: Path) -> None:
    rules = tmp_path / "rules.yaml"
    rules.write_text(RULES)
    r = _cli("check", "--rules", str(rules))
    assert r.returncode == 0 and "valid (4 tables)" in r.stdout
    r = _cli("check", "--rules", str(rules), "--dsn", _dsn(pg))
    assert r.returncode == 0, r.stdout + r.stderr
    assert "0 error(s)" in r.stdout
    assert "warning: billing.xdrs.cld: looks like phone number but has no rule" in r.stdout
    assert not leaks(r.stdout + r.stderr)


def test_check_reports_errors(pg: EmbeddedPostgres, billing: ProxyProcess, tmp_path: Path) -> None:
    pg.psql(
        "CREATE OR REPLACE VIEW billing.peek AS SELECT name FROM billing.customers; "
        "CREATE OR REPLACE VIEW billing.peek2 AS SELECT name FROM billing.customers "
        "UNION SELECT name FROM billing.customer_classes"
    )
    rules = tmp_path / "rules.yaml"
    rules.write_text(
        "roles: {masked: [helpdsk], unmasked: [reportng]}\n"
        "functions: {allow: [billing.nope_fn]}\n"
        "tables:\n"
        "  billing.nope: {columns: {a: partial}}\n"
        "  billing.customers:\n"
        "    subject: id_missing\n"
        "    columns: {balance: email, ghost: partial, name: partial}\n"
    )
    r = _cli("check", "--rules", str(rules), "--dsn", _dsn(pg))
    assert r.returncode == 1
    out = r.stdout
    # the problems the proxy refuses on, from the same check (rules.check)
    assert "error: tables.billing.nope: relation billing.nope does not exist" in out
    assert (
        "error: tables.billing.customers.subject: subject column id_missing of "
        "billing.customers does not exist" in out
    )
    assert (
        "error: tables.billing.customers.columns.ghost: column ghost of billing.customers "
        "does not exist" in out
    )
    assert "error: functions.allow: function billing.nope_fn does not exist" in out
    assert "error: roles.masked: role helpdsk does not exist" in out
    assert "warning: roles.unmasked: role reportng does not exist" in out
    assert (
        "error: tables.billing.customers.columns.balance: mask email does not fit type "
        "numeric(12,2)" in out
    )
    assert "info: billing.peek: masked from its definition (columns: name)" in out
    assert (
        "warning: billing.peek2: view reads protected billing.customers and has no rules of its own"
        in out
    )
    assert "warning: billing.customers.email: looks like e-mail but has no rule" in out
    assert "warning: billing.customers.cc_number: looks like card number but has no rule" in out
    assert not leaks(out + r.stderr)
    pg.psql("DROP VIEW billing.peek, billing.peek2")


def test_check_says_when_the_database_is_not_listed(
    pg: EmbeddedPostgres, billing: ProxyProcess, tmp_path: Path
) -> None:
    rules = tmp_path / "rules.yaml"
    rules.write_text("databases: [billing_prod]\n" + RULES)
    r = _cli("check", "--rules", str(rules), "--dsn", _dsn(pg))
    assert r.returncode == 0, r.stdout
    assert (
        "warning: databases: database postgres is not listed: the rules are not for it, and "
        "pgveil refuses masked roles on it" in r.stdout
    )


def test_check_invalid_file(tmp_path: Path) -> None:
    rules = tmp_path / "rules.yaml"
    rules.write_text("tables:\n  billing.x:\n    columns: {a: sparkle}\n")
    r = _cli("check", "--rules", str(rules))
    assert (
        r.returncode == 1 and f"{rules}:4" not in r.stdout and "unknown mask 'sparkle'" in r.stdout
    )


def test_suggest_drafts_loadable_rules(
    pg: EmbeddedPostgres, billing: ProxyProcess, tmp_path: Path
) -> None:
    r = _cli("suggest", "--dsn", _dsn(pg))
    assert r.returncode == 0, r.stderr
    draft = r.stdout
    assert not leaks(draft)
    for line in (
        "billing.customers:",
        "email: email",
        "cc_number: {mask: digits, keep_last: 4}",
        "ip: {mask: partial, keep_first: 1, keep_last: 0}",
        "mac: {mask: partial, keep_first: 1, keep_last: 0}",
    ):
        assert line in draft, line
    path = tmp_path / "draft.yaml"
    path.write_text(draft)
    assert _cli("check", "--rules", str(path)).returncode == 0


def test_schema_is_json() -> None:
    r = _cli("schema")
    assert r.returncode == 0
    assert json.loads(r.stdout)["title"] == "pgveil rules"
