"""`pgveil rules suggest` on the demo's billing schema and on the test fixture's: the draft
loads, `rules check` finds no error in it, it masks every column the hand-written rules
mask (through a real pgveil, every sampled value comes out changed), names the customer
key as the subject where a reference leads to the customers, gives a partitioned table one
rule, and prints no sampled value."""

from __future__ import annotations

import asyncio
import datetime as dt
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from proxy.demo import billing as data
from proxy.demo.embedded_pg import EmbeddedPostgres
from rules.loader import parse_rules
from rules.model import Policy
from shared import dsn
from tests.integration.masking_fixture import HASH_KEY, RULES, SCHEMA, leaks, masking_proxy

ROOT = Path(__file__).resolve().parents[2]
MASKED, MASKED_PW = "suggest_masked", "suggest-pw-1"


def _dsn(pg: EmbeddedPostgres, db: str) -> str:
    return pg.dsn(dbname=db) + " sslmode=disable"


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    return subprocess.run(
        [sys.executable, "-m", "proxy.cli", "rules", *args],
        cwd=ROOT,
        env={**env, "PGVEIL_TEST_HASH_KEY": HASH_KEY},
        capture_output=True,
        text=True,
        timeout=300,
    )


async def _load_demo(pg: EmbeddedPostgres, db: str) -> None:
    conn = await dsn.connect(_dsn(pg, db))
    try:
        base = dt.datetime.now(dt.UTC).replace(microsecond=0)
        await data.load(conn, data.Counts.at_scale(0.001), base)
    finally:
        await conn.close()


@pytest.fixture(scope="module")
def databases(pg: EmbeddedPostgres) -> Iterator[dict[str, str]]:
    """The demo's schema with its generated data, and the fixture's schema (without its
    roles: they are the cluster's), each in a database of its own."""
    pg.psql(f"CREATE ROLE {MASKED} LOGIN PASSWORD '{MASKED_PW}'")
    out: dict[str, str] = {}
    for db in ("suggest_demo", "suggest_fixture"):
        pg.psql(f"CREATE DATABASE {db}")
        out[db] = _dsn(pg, db)
    asyncio.run(_load_demo(pg, "suggest_demo"))
    pg.psql(SCHEMA.split("CREATE ROLE")[0], dbname="suggest_fixture")
    for db in out:
        pg.psql(
            f"GRANT USAGE ON SCHEMA billing TO {MASKED}; "
            f"GRANT SELECT ON ALL TABLES IN SCHEMA billing TO {MASKED}",
            dbname=db,
        )
    try:
        yield out
    finally:
        for db in out:
            pg.psql(f"DROP DATABASE {db} WITH (FORCE)")
        pg.psql(f"DROP ROLE {MASKED}")


def _draft(target: str, tmp_path: Path) -> tuple[str, Path, Policy, str]:
    r = _cli("suggest", "--dsn", target)
    assert r.returncode == 0, r.stderr
    draft = r.stdout
    path = tmp_path / "draft.yaml"
    path.write_text(draft.replace("  masked: []  ", f"  masked: [{MASKED}]  ", 1))
    check = _cli("check", "--rules", str(path), "--dsn", target)
    assert check.returncode == 0, check.stdout + check.stderr
    assert " 0 error(s)" in check.stdout, check.stdout
    return draft, path, parse_rules(path.read_text()), check.stdout


def _covers(draft: Policy, written: Policy, views: tuple[str, ...] = ()) -> None:
    """Every column the hand-written rules mask, the draft masks (JSON: every key). Views
    need no rules of their own: pgveil masks them from their definitions."""
    for key, rule in written.tables.items():
        if key[1] in views:
            continue
        assert key in draft.tables, key
        got = draft.tables[key].columns
        for col, spec in rule.columns.items():
            assert col in got, (key, col)
            if spec.name == "json":
                assert got[col].name == "json" and set(spec.keys) <= set(got[col].keys), (
                    key,
                    col,
                    got[col],
                )


def _masked_through_pgveil(pg: EmbeddedPostgres, rules: Path, db: str, policy: Policy) -> None:
    """Through a real pgveil, as a masked role: every non-NULL value of every column the
    draft masks comes out different from what the database holds."""
    proxy = masking_proxy(pg, rules, metrics=False)
    try:
        direct = psycopg.connect(_dsn(pg, db), autocommit=True)
        masked = psycopg.connect(
            f"host=127.0.0.1 port={proxy.port} user={MASKED} password={MASKED_PW} "
            f"dbname={db} sslmode=disable",
            autocommit=True,
        )
        with direct, masked:
            for (schema, table), rule in policy.tables.items():
                first = direct.execute(
                    "SELECT attname FROM pg_attribute WHERE attrelid = %s::regclass AND attnum = 1",
                    (f"{schema}.{table}",),
                ).fetchone()
                assert first is not None
                for col, spec in rule.columns.items():
                    sql = (
                        f'SELECT "{col}"::text FROM "{schema}"."{table}" '
                        f'ORDER BY "{first[0]}" LIMIT 20'
                    )
                    raw = [r[0] for r in direct.execute(sql)]
                    try:
                        shown = [r[0] for r in masked.execute(sql)]
                    except psycopg.errors.InsufficientPrivilege:
                        assert spec.name == "deny", (table, col)
                        continue  # `deny`: refused, or read as NULL (either hides it)
                    assert len(raw) == len(shown)
                    for a, b in zip(raw, shown, strict=True):
                        assert a is None or a != b, (table, col, b)
    finally:
        proxy.stop()
    assert "Traceback" not in proxy.log()


def test_suggest_on_the_demo_schema(
    pg: EmbeddedPostgres, databases: dict[str, str], tmp_path: Path
) -> None:
    draft, path, policy, _ = _draft(databases["suggest_demo"], tmp_path)
    for sample in ("example.invalid", "Customer 0", "+1-555", "4111 1111", "198.51.100", "00101"):
        assert sample not in draft, sample
    key = tmp_path / "hash.key"
    key.write_text("k" * 64)
    _covers(policy, parse_rules(data.rules_yaml(str(key))))
    t = policy.tables
    # one rule for the partitioned xDRs, none for their monthly partitions
    assert ("billing", "xdrs") in t and not [n for _s, n in t if n.startswith("xdrs_")]
    # the customer's key wherever a reference leads to the customers
    subjects = {n: r.subject for (_s, n), r in t.items()}
    for name in ("customers", "customer_cards", "selfcare_credentials", "accounts", "invoices"):
        assert subjects[name] == "i_customer", name
    for name in ("aliases", "phonebook", "call_recordings", "voicemails", "xdrs"):
        assert subjects[name] == "i_account", name
    assert "subject: i_account  # -> billing.accounts -> billing.customers (partly" in draft
    assert "subject: i_account  # -> billing.accounts -> billing.customers\n" in draft
    # a card holder's name is masked as a name, the card number as a card number
    cards = t[("billing", "customer_cards")].columns
    assert cards["cardholder"].name == "partial"
    assert (cards["number"].name, cards["number"].keep_last) == ("digits", 4)
    assert "number: {mask: digits, keep_last: 4}  # card number" in draft
    _masked_through_pgveil(pg, path, "suggest_demo", policy)


def test_suggest_on_the_fixture_schema(
    pg: EmbeddedPostgres, databases: dict[str, str], tmp_path: Path
) -> None:
    draft, path, policy, check = _draft(databases["suggest_fixture"], tmp_path)
    assert not leaks(draft)
    written = parse_rules(RULES, environ={"PGVEIL_TEST_HASH_KEY": HASH_KEY})
    _covers(policy, written, views=("customer_contacts",))
    assert (
        "info: billing.customer_contacts: masked from its definition (columns: email, name)"
        in check
    )
    t = policy.tables
    assert t[("billing", "customers")].subject == "i_customer"
    assert t[("billing", "accounts")].subject == "i_customer"
    assert t[("billing", "xdrs")].subject == "i_account"
    assert ("billing", "xdrs_1") not in t
    assert (t[("billing", "customers")].columns["cc_number"].name, "card") == ("digits", "card")
    _masked_through_pgveil(pg, path, "suggest_fixture", policy)
