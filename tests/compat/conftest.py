"""The compatibility suite's world: a billing database `compat` in the test cluster, loaded
with canary personal data, masking rules for it, and one pgveil in front of it for the
whole session.

Real applications and tools (Django, SQLAlchemy, pandas, psql, pgcli, asyncpg, psycopg) run
against it as the masked role `compat_helpdesk` and, for comparison, the unmasked role
`compat_admin`. Every test asserts that the operation works and that no real value of a
personal column reaches the masked client (`assert_masked`); the unmasked runs prove that
the same operation does return the real values, so the masked assertion can fail.

A database and roles of its own keep the suite independent of the other integration tests
(which write to the `billing` fixture's tables) and let its rules say `databases: [compat]`.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from proxy.demo.embedded_pg import EmbeddedPostgres
from tests.integration.masking_fixture import (
    CARD,
    EMAIL,
    HASH_KEY,
    IP,
    LICENSE,
    LOGIN,
    MAC,
    NAME,
    PHONE,
    leaks,
)
from tests.support import ProxyProcess

DB = "compat"
MASKED, MASKED_PW = "compat_helpdesk", "compat-helpdesk-pw-1"
UNMASKED, UNMASKED_PW = "compat_admin", "compat-admin-pw-1"

# deny canaries: read as NULL (or refused), never shown in any form
SIP_PASSWORD = "SipCanary-7x9q-Secret"
IBAN = "CZ6508000000192000145399"
DENIED = (SIP_PASSWORD, IBAN, CARD)

# 28 filler customers (3..30) with generated, obviously fake values, so that pagination has
# pages; customer 1 holds the canaries, customer 2 another real-looking person.
CUSTOMERS = 30

SCHEMA = f"""
CREATE SCHEMA billing;
CREATE TYPE billing.customer_status AS ENUM ('open', 'suspended', 'closed');
CREATE DOMAIN billing.amount AS numeric(12,2) CHECK (VALUE >= 0);
CREATE TYPE billing.money_pair AS (amount numeric(12,2), currency char(3));
CREATE TABLE billing.customer_classes (
    i_customer_class int PRIMARY KEY,
    name text NOT NULL,
    retention interval
);
CREATE TABLE billing.customers (
    i_customer bigint PRIMARY KEY,
    i_customer_class int NOT NULL REFERENCES billing.customer_classes,
    name varchar(80) NOT NULL,
    email text UNIQUE,
    phone text,
    cc_number text,
    login text,
    extra jsonb,
    status billing.customer_status NOT NULL DEFAULT 'open',
    balance billing.amount NOT NULL DEFAULT 0,
    credit_limit billing.money_pair,
    tags text[],
    notes text,
    created timestamptz NOT NULL DEFAULT '2024-01-01 00:00:00+00'
);
CREATE INDEX customers_class_idx ON billing.customers (i_customer_class);
CREATE TABLE billing.accounts (
    i_account bigint PRIMARY KEY,
    i_customer bigint NOT NULL REFERENCES billing.customers,
    id text NOT NULL UNIQUE,
    ip inet,
    mac macaddr,
    sip_password text,
    blocked boolean NOT NULL DEFAULT false,
    balance numeric(12,2) NOT NULL DEFAULT 0
);
CREATE INDEX accounts_customer_idx ON billing.accounts (i_customer);
CREATE TABLE billing.xdrs (
    i_xdr bigint NOT NULL,
    i_account bigint NOT NULL REFERENCES billing.accounts,
    connect_time timestamptz NOT NULL,
    cli text,
    cld text,
    charged numeric(12,4) NOT NULL DEFAULT 0,
    PRIMARY KEY (i_xdr, connect_time)
) PARTITION BY RANGE (connect_time);
CREATE TABLE billing.xdrs_2024_01 PARTITION OF billing.xdrs
    FOR VALUES FROM ('2024-01-01 00:00:00+00') TO ('2024-02-01 00:00:00+00');
CREATE TABLE billing.xdrs_2024_02 PARTITION OF billing.xdrs
    FOR VALUES FROM ('2024-02-01 00:00:00+00') TO ('2024-03-01 00:00:00+00');
CREATE VIEW billing.customer_contacts AS
    SELECT i_customer, name, email, phone FROM billing.customers;
CREATE FUNCTION billing.invoice_total(bigint) RETURNS numeric LANGUAGE sql STABLE
    AS 'SELECT 42.0';
COMMENT ON TABLE billing.customers IS 'one row per customer';

INSERT INTO billing.customer_classes VALUES
    (1, 'European Customers', '30 days'), (2, 'Wholesale', '10 years');
INSERT INTO billing.customers
    (i_customer, i_customer_class, name, email, phone, cc_number, login, extra, status,
     balance, credit_limit, tags, notes)
VALUES
  (1, 1, '{NAME}', '{EMAIL}', '{PHONE}', '{CARD}', '{LOGIN}',
   '{{"dl": "{LICENSE}", "iban": "{IBAN}", "tier": "gold"}}', 'open', 12.50,
   '(500.00,EUR)', '{{vip,paper}}', 'likes invoices'),
  (2, 1, 'Ann Other', 'ann@example.org', '+420600000000', '5555000011112222', 'ann_login',
   '{{"dl": "DL-1", "tier": "silver"}}', 'suspended', 3.00, '(10.00,EUR)', '{{}}', NULL);
INSERT INTO billing.customers (i_customer, i_customer_class, name, email, phone, login, balance)
SELECT g, 1 + g % 2, 'Customer ' || lpad(g::text, 6, '0'),
       'customer' || lpad(g::text, 6, '0') || '@example.invalid',
       '+1-555-01' || lpad(g::text, 2, '0'), 'login' || g, g
  FROM generate_series(3, {CUSTOMERS}) g;
INSERT INTO billing.accounts VALUES
    (10, 1, 'ACC-10', '{IP}', '{MAC}', '{SIP_PASSWORD}', false, 1.00),
    (20, 2, 'ACC-20', '10.0.0.2', '00:00:00:00:00:02', 'ann-sip-pw', true, 2.00);
INSERT INTO billing.accounts (i_account, i_customer, id, ip, sip_password)
SELECT 100 + g, g, 'ACC-' || (100 + g), ('192.0.2.' || g)::inet, 'pw' || g
  FROM generate_series(3, {CUSTOMERS}) g;
INSERT INTO billing.xdrs VALUES
    (1, 10, '2024-01-05 10:00:00+00', '{PHONE}', '+18005550100', 1.25),
    (2, 10, '2024-02-05 10:00:00+00', '{PHONE}', '+18005550101', 0.75),
    (3, 20, '2024-01-06 11:00:00+00', '+420600000000', '+18005550102', 2.5);

CREATE ROLE {MASKED} LOGIN PASSWORD '{MASKED_PW}';
CREATE ROLE {UNMASKED} LOGIN PASSWORD '{UNMASKED_PW}';
GRANT USAGE ON SCHEMA billing TO {MASKED}, {UNMASKED};
GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA billing TO {MASKED}, {UNMASKED};
GRANT EXECUTE ON ALL FUNCTIONS IN SCHEMA billing TO {MASKED}, {UNMASKED};
GRANT pg_read_all_stats TO {MASKED}, {UNMASKED};
ALTER DATABASE {DB} SET search_path = billing, public;
ANALYZE;
"""

RULES = f"""
databases: [{DB}]
roles:
  unmasked: [{UNMASKED}]
  masked: [{MASKED}]
  default: masked
keys:
  hash: {{env: PGVEIL_TEST_HASH_KEY}}
functions:
  allow: [billing.invoice_total]
tables:
  billing.customers:
    subject: i_customer
    columns:
      name: partial
      email: email
      phone: {{mask: partial, keep_first: 1, keep_last: 2}}
      cc_number: deny
      login: hash
      extra: {{mask: json, keys: {{dl: partial, iban: deny}}}}
  billing.accounts:
    subject: i_customer
    columns:
      ip: partial
      mac: partial
      sip_password: deny
  billing.xdrs:
    columns:
      cli: {{mask: partial, keep_first: 1, keep_last: 2}}
"""


def compat_leaks(text: str) -> list[str]:
    """Every canary (or a piece or an encoding of one) found in `text`."""
    found = leaks(text)
    found += [f"deny:{v[:3]}" for v in DENIED if v in text or v.lower() in text.lower()]
    return found


def assert_masked(text: str) -> None:
    """The masked client's output holds no real personal value."""
    found = compat_leaks(text)
    assert not found, f"personal values {found} in masked output:\n{text[:4000]}"


def assert_real(text: str) -> None:
    """The unmasked client's output holds the real values (the control: the same operation
    does reach the personal data, so `assert_masked` on the masked run can fail)."""
    assert NAME in text, f"the real name is not in the unmasked output:\n{text[:4000]}"


@dataclass
class Compat:
    pg: EmbeddedPostgres
    proxy: ProxyProcess
    rules: Path

    @property
    def port(self) -> int:
        return self.proxy.port

    def password(self, user: str) -> str:
        return {MASKED: MASKED_PW, UNMASKED: UNMASKED_PW}[user]

    def dsn(self, user: str = MASKED) -> str:
        """A libpq key/value DSN through pgveil."""
        return (
            f"host=127.0.0.1 port={self.port} dbname={DB} user={user} "
            f"password={self.password(user)} sslmode=disable"
        )

    def url(self, user: str = MASKED, driver: str = "postgresql+psycopg") -> str:
        """An SQLAlchemy URL through pgveil."""
        return f"{driver}://{user}:{self.password(user)}@127.0.0.1:{self.port}/{DB}"

    def psql(self, *args: str, user: str = MASKED, stdin: str | None = None) -> tuple[int, str]:
        """psql as a subprocess through pgveil: (exit code, stdout + stderr)."""
        psql = shutil.which("psql") or str(self.pg.bindir / "psql")
        env = {
            **os.environ,
            "PGPASSWORD": self.password(user),
            "PGSSLMODE": "disable",
            "PAGER": "",
            "PSQL_PAGER": "",
            "PGCLIENTENCODING": "UTF8",
            "LC_ALL": "C.UTF-8",
            "COLUMNS": "200",
        }
        out = subprocess.run(
            [psql, "-X", "-h", "127.0.0.1", "-p", str(self.port), "-U", user, "-d", DB, *args],
            input=stdin,
            capture_output=True,
            text=True,
            env=env,
            timeout=120,
        )
        return out.returncode, out.stdout + out.stderr


@pytest.fixture(scope="session")
def compat(pg: EmbeddedPostgres) -> Iterator[Compat]:
    pg.psql(f"DROP DATABASE IF EXISTS {DB} WITH (FORCE)")
    pg.psql(f"DROP ROLE IF EXISTS {MASKED}; DROP ROLE IF EXISTS {UNMASKED}")
    pg.psql(f"CREATE DATABASE {DB}")
    pg.psql(SCHEMA, dbname=DB)
    d = Path(tempfile.mkdtemp(prefix="pgveil-compat-"))
    rules = d / "rules.yaml"
    rules.write_text(RULES)
    proxy = ProxyProcess(
        pg.port,
        "--upstream-sslmode", "disable",
        "--rules", str(rules),
        "--catalog-user", pg.superuser,
        env={"PGVEIL_TEST_HASH_KEY": HASH_KEY, "PGVEIL_CATALOG_PASSWORD": pg.password},
    )  # fmt: skip
    try:
        yield Compat(pg, proxy, rules)
    finally:
        proxy.stop()
        shutil.rmtree(d, ignore_errors=True)
        pg.psql(f"DROP DATABASE IF EXISTS {DB} WITH (FORCE)")
        pg.psql(f"DROP ROLE IF EXISTS {MASKED}; DROP ROLE IF EXISTS {UNMASKED}")
    assert "Traceback" not in proxy.log(), proxy.log()
