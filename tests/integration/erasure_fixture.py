"""A generated billing database for the erasure tests, its configuration, and helpers to
compare databases (pg_dump sections, per-table checksums) and to run `pgveil erase`.

Customer `c` has accounts `10c+1` and `10c+2`; every personal value carries the marker
`C%06d` of its customer (or is unique to one row, like an xDR's CLD), so a value found in a
dump can be traced to its customer. Customers with `c % 4 == 0` are terminated at `T0`;
their class (`c % 3`) gives the retention: 0 days, 30 days, or NULL (the default, 7 days).
"""

from __future__ import annotations

import contextlib
import os
import re
import subprocess
import sys
from collections import Counter
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import psycopg

from proxy.demo.embedded_pg import EmbeddedPostgres

ROOT = Path(__file__).resolve().parents[2]
T0 = datetime(2026, 3, 1, tzinfo=UTC)
IMMEDIATE, EUROPEAN, NO_POLICY = 0, 1, 2  # c % 3 -> class (1 + c % 3)


def schema_sql(customers: int, xdrs_per_account: int) -> str:
    return f"""
CREATE SCHEMA billing;
CREATE TABLE billing.customer_classes (
    i_customer_class int PRIMARY KEY, name text NOT NULL, retention interval);
INSERT INTO billing.customer_classes VALUES
    (1, 'Immediate', '0 days'), (2, 'European Customers', '30 days'), (3, 'No policy', NULL);
CREATE TABLE billing.customers (
    i_customer bigint PRIMARY KEY,
    name text NOT NULL,
    email text,
    phone text,
    address text,
    i_customer_class int NOT NULL REFERENCES billing.customer_classes,
    terminated_at timestamptz,
    custom jsonb,
    balance numeric(12,2) NOT NULL DEFAULT 0
);
CREATE INDEX customers_terminated ON billing.customers (terminated_at);
INSERT INTO billing.customers
SELECT c, 'Name ' || m || ' Surname', lower(m) || '@mail.example', '+420 ' || m,
       'Street ' || m || ', Prague', 1 + c % 3,
       CASE WHEN c % 4 = 0 THEN timestamptz '{T0.isoformat()}' END,
       jsonb_build_object('passport', 'P-' || m, 'contact', jsonb_build_object(
           'phone', 'cp-' || m, 'note', 'keep'), 'tier', 'gold'),
       (c * 7 % 1000) / 10.0
  FROM generate_series(1, {customers}) AS c, LATERAL (SELECT 'C' || lpad(c::text, 6, '0')) AS x(m);
CREATE TABLE billing.accounts (
    i_account bigint PRIMARY KEY,
    i_customer bigint NOT NULL REFERENCES billing.customers,
    id text NOT NULL UNIQUE,
    ip inet,
    mac macaddr,
    custom jsonb
);
CREATE INDEX accounts_customer ON billing.accounts (i_customer);
INSERT INTO billing.accounts
SELECT 10 * c + k, c, 'A-' || m || '-' || k,
       ('10.' || (c / 256) || '.' || (c % 256) || '.' || k)::inet,
       ('02:00:' || lpad(to_hex(c / 256), 2, '0') || ':' || lpad(to_hex(c % 256), 2, '0')
        || ':00:0' || k)::macaddr,
       jsonb_build_object('sip_user', 'sip-' || m || '-' || k, 'plan', 'basic')
  FROM generate_series(1, {customers}) AS c, generate_series(1, 2) AS k,
       LATERAL (SELECT 'C' || lpad(c::text, 6, '0')) AS x(m);
CREATE TABLE billing.xdrs (
    i_xdr bigint NOT NULL,
    i_account bigint,
    account_id text,
    cli text,
    cld text,
    ip inet,
    charged numeric(12,5) NOT NULL,
    connect_time timestamptz NOT NULL
) PARTITION BY RANGE (connect_time);
CREATE TABLE billing.xdrs_2026_01 PARTITION OF billing.xdrs
    FOR VALUES FROM ('2026-01-01') TO ('2026-02-01');
CREATE TABLE billing.xdrs_2026_02 PARTITION OF billing.xdrs
    FOR VALUES FROM ('2026-02-01') TO ('2026-03-01');
CREATE TABLE billing.xdrs_2026_03 PARTITION OF billing.xdrs
    FOR VALUES FROM ('2026-03-01') TO ('2026-04-01');
CREATE INDEX xdrs_account ON billing.xdrs (i_account, i_xdr);
INSERT INTO billing.xdrs
SELECT row_number() OVER (ORDER BY a.i_account, n), a.i_account, a.id,
       '+420' || m || a.i_account % 10, '+1800-' || a.i_account || '-' || n,
       a.ip, ((a.i_account * 31 + n * 17) % 1000) / 100.0,
       timestamptz '2026-01-01 00:00+00' + (n * 37 % 85) * interval '1 day' + a.i_account * interval '1 s'
  FROM billing.accounts AS a, generate_series(1, {xdrs_per_account}) AS n,
       LATERAL (SELECT 'C' || lpad(a.i_customer::text, 6, '0')) AS x(m);
CREATE TABLE billing.call_recordings (
    i_recording bigint PRIMARY KEY,
    i_account bigint NOT NULL,
    audio bytea NOT NULL,
    recorded_at timestamptz NOT NULL
);
CREATE INDEX call_recordings_account ON billing.call_recordings (i_account);
INSERT INTO billing.call_recordings
SELECT 100 * a.i_account + n, a.i_account,
       convert_to('voice of ' || a.id || ' #' || n, 'UTF8'),
       timestamptz '2026-02-01 00:00+00' + n * interval '1 hour'
  FROM billing.accounts AS a, generate_series(1, 2) AS n;
ANALYZE;
"""


def config_yaml(audit: Path, **worker: object) -> str:
    settings = {"batch_size": 50, "lock_timeout": "2s", "statement_timeout": "20s", **worker}
    lines = "\n".join(f"  {k}: {v}" for k, v in settings.items())
    return f"""\
subject:
  table: billing.customers
  key: i_customer
  terminated_at: terminated_at
  retention:
    default: 7 days
    class_table: {{table: billing.customer_classes, key: i_customer_class, column: retention}}
tables:
  billing.customers:
    columns:
      name: {{placeholder: "[erased]"}}
      email: null
      phone: null
      address: null
      custom: {{json_keys: [passport, contact.phone]}}
  billing.accounts:
    owner: {{column: i_customer}}
    key: i_account
    columns:
      id: {{placeholder: "erased-{{key}}"}}
      ip: null
      mac: null
      custom: {{json_keys: [sip_user], placeholder: "[erased]"}}
  billing.xdrs:
    owner: {{column: i_account, through: billing.accounts}}
    large: true
    key: i_xdr
    columns: {{account_id: null, cli: null, cld: null, ip: null}}
  billing.call_recordings:
    owner: {{column: i_account, through: billing.accounts}}
    action: delete
worker:
{lines}
audit:
  file: {audit}
"""


def marker(c: int) -> str:
    return f"C{c:06d}"


def due(c: int, days_after_t0: float, customers: int) -> bool:
    """Whether customer `c` is due `days_after_t0` days after T0 (the configured policy)."""
    if c % 4 or c > customers:
        return False
    retention = {IMMEDIATE: 0, EUROPEAN: 30, NO_POLICY: 7}[c % 3]
    return days_after_t0 >= retention


def at(days: float) -> str:
    return (T0 + timedelta(days=days)).isoformat()


class Db:
    """One database of the session cluster."""

    def __init__(self, pg: EmbeddedPostgres, name: str) -> None:
        self.pg = pg
        self.name = name

    @property
    def dsn(self) -> str:
        return self.pg.dsn(dbname=self.name) + " sslmode=disable"

    def connect(self) -> psycopg.Connection[tuple[object, ...]]:
        return psycopg.connect(self.dsn, autocommit=True)

    def query(self, sql: str, *params: object) -> list[tuple[object, ...]]:
        with self.connect() as conn:
            return conn.execute(sql, params or None).fetchall()  # type: ignore[arg-type]

    def execute(self, sql: str) -> None:
        with self.connect() as conn:
            conn.execute(sql)  # type: ignore[arg-type]

    def copy(self, name: str) -> Db:
        """An identical database (CREATE DATABASE ... TEMPLATE)."""
        drop(self.pg, name)
        with psycopg.connect(self.pg.dsn() + " sslmode=disable", autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}" TEMPLATE "{self.name}"')  # type: ignore[arg-type]
        return Db(self.pg, name)

    def dump(self) -> str:
        """pg_dump --data-only of the whole database."""
        out = subprocess.run(
            [
                self.pg.client("pg_dump"),
                "--data-only",
                "--no-sync",
                "-h",
                self.pg.host,
                "-p",
                str(self.pg.port),
                "-U",
                self.pg.superuser,
                "-d",
                self.name,
            ],
            capture_output=True,
            text=True,
            timeout=120,
            env={**os.environ, "PGPASSWORD": self.pg.password},
        )
        assert out.returncode == 0, out.stderr
        return out.stdout

    def checksums(self) -> dict[str, str]:
        """md5 over every row (sorted) of every billing table and partition."""
        rows = self.query(
            "SELECT c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
            "WHERE n.nspname = 'billing' AND c.relkind = 'r' ORDER BY 1"
        )
        out = {}
        for (table,) in rows:
            (md5,) = self.query(
                f"SELECT md5(coalesce(string_agg(t::text, E'\\n' ORDER BY t::text), '')) "
                f"FROM billing.{table} AS t"
            )[0]
            out[str(table)] = str(md5)
        return out


def drop(pg: EmbeddedPostgres, name: str) -> None:
    with psycopg.connect(pg.dsn() + " sslmode=disable", autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')  # type: ignore[arg-type]


def create(pg: EmbeddedPostgres, name: str, customers: int, xdrs_per_account: int) -> Db:
    drop(pg, name)
    with psycopg.connect(pg.dsn() + " sslmode=disable", autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')  # type: ignore[arg-type]
    db = Db(pg, name)
    db.execute(schema_sql(customers, xdrs_per_account))
    return db


_COPY = re.compile(r"^COPY (\S+) \((.*)\) FROM stdin;$")


def dump_rows(dump: str) -> dict[str, list[str]]:
    """The COPY data lines of a data-only dump, per table."""
    out: dict[str, list[str]] = {}
    current: list[str] | None = None
    for line in dump.splitlines():
        if current is not None:
            if line == "\\.":
                current = None
            else:
                current.append(line)
            continue
        m = _COPY.match(line)
        if m:
            current = out.setdefault(m.group(1), [])
    return out


def owner_of(table: str, line: str) -> int:
    """The customer a dumped row belongs to."""
    fields = line.split("\t")
    name = table.rpartition(".")[2]
    if name == "customers":
        return int(fields[0])
    if name == "accounts":
        return int(fields[1])
    if name.startswith("xdrs"):
        # i_account stays; customer c owns accounts 10c+1, 10c+2
        return int(fields[1]) // 10
    if name == "call_recordings":
        return int(fields[1]) // 10
    raise AssertionError(f"unexpected table {table}")


def rows_by_owner(dump: str) -> dict[tuple[str, int], Counter[str]]:
    out: dict[tuple[str, int], Counter[str]] = {}
    for table, lines in dump_rows(dump).items():
        if not table.startswith("billing.") or table == "billing.customer_classes":
            continue
        for line in lines:
            out.setdefault((table, owner_of(table, line)), Counter())[line] += 1
    return out


def personal_values(db: Db, customers: list[int]) -> dict[int, list[str]]:
    """Every personal value of these customers, as text (what a dump must no longer hold)."""
    out: dict[int, list[str]] = {c: [] for c in customers}
    for c, values in db.query(
        """
        SELECT c.i_customer, array_remove(ARRAY[c.name, c.email, c.phone, c.address,
               c.custom ->> 'passport', c.custom #>> '{contact,phone}'], NULL)
               || coalesce((SELECT array_agg(v) FROM billing.accounts a,
                     LATERAL unnest(ARRAY[a.id, host(a.ip), a.mac::text,
                                          a.custom ->> 'sip_user']) v
                     WHERE a.i_customer = c.i_customer AND v IS NOT NULL), '{}')
               || coalesce((SELECT array_agg(DISTINCT v) FROM billing.xdrs x
                     JOIN billing.accounts a USING (i_account),
                     LATERAL unnest(ARRAY[x.account_id, x.cli, x.cld, host(x.ip)]) v
                     WHERE a.i_customer = c.i_customer AND v IS NOT NULL), '{}')
               || coalesce((SELECT array_agg(encode(r.audio, 'hex'))
                     FROM billing.call_recordings r JOIN billing.accounts a USING (i_account)
                     WHERE a.i_customer = c.i_customer), '{}')
          FROM billing.customers c WHERE c.i_customer = ANY(%s)
        """,
        customers,
    ):
        out[int(c)] = [str(v) for v in values]  # type: ignore[union-attr]
    return out


def erase(
    *args: str, env: dict[str, str] | None = None, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "proxy.cli", "erase", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
        env={**os.environ, **(env or {})},
    )


def spawn(*args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "proxy.cli", "erase", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
    )


@contextlib.contextmanager
def database(pg: EmbeddedPostgres, name: str, customers: int, xdrs: int) -> Iterator[Db]:
    db = create(pg, name, customers, xdrs)
    try:
        yield db
    finally:
        drop(pg, name)
