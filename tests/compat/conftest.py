"""The compatibility suite's world: a billing database `compat` in the test cluster (the
billing fixture, `proxy.demo.fixture`, with its `compat` part: an enum, a domain and a
composite in the customers' columns, and this suite's rows with canary personal data, given
as the constants below), masking rules for it, and one pgveil in front of it for the whole
session.

Real applications and tools (Django, SQLAlchemy, pandas, psql, pgcli, asyncpg, psycopg) run
against it as the masked role `compat_helpdesk` and, for comparison, the unmasked role
`compat_admin`. Every test asserts that the operation works and that no real value of a
personal column reaches the masked client (`assert_masked`); the unmasked runs prove that
the same operation does return the real values, so the masked assertion can fail.

A database and roles of its own keep the suite independent of the other integration tests
(which write to the `billing` fixture's tables) and let its rules say `databases: [compat]`.
"""

from __future__ import annotations

import datetime as dt
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from proxy.demo import fixture
from proxy.demo.embedded_pg import EmbeddedPostgres
from tests.integration.masking_fixture import (
    CANARIES,
    CARD,
    HASH_KEY,
    NAME,
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

# the billing fixture's core with its `compat` part: its values are these constants
SETTINGS = {
    **CANARIES,
    "canary_iban": IBAN,
    "canary_sip_password": SIP_PASSWORD,
    "compat_customers": str(CUSTOMERS),
}
FIRST_MONTH = dt.date(2024, 1, 1)  # the xDRs' two monthly partitions: xdrs_2024_01, _02

# the suite's own roles (not the billing schema)
ROLES = f"""
CREATE ROLE {MASKED} LOGIN PASSWORD '{MASKED_PW}';
CREATE ROLE {UNMASKED} LOGIN PASSWORD '{UNMASKED_PW}';
GRANT USAGE ON SCHEMA billing TO {MASKED}, {UNMASKED};
GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA billing TO {MASKED}, {UNMASKED};
GRANT EXECUTE ON ALL FUNCTIONS IN SCHEMA billing TO {MASKED}, {UNMASKED};
GRANT pg_read_all_stats TO {MASKED}, {UNMASKED};
ALTER DATABASE {DB} SET search_path = billing, public;
"""


def load_schema(pg: EmbeddedPostgres) -> None:
    """The billing schema with the suite's rows into database `compat` (which must exist),
    then the suite's roles."""
    fixture.load(
        pg,
        parts=("compat",),
        dbname=DB,
        xdrs_by="connect_time",
        first_month=FIRST_MONTH,
        months=2,
        settings=SETTINGS,
    )
    pg.psql(ROLES, dbname=DB)


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
    load_schema(pg)
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
