"""A generated billing database for the erasure tests (the billing fixture's core with its
`population` and `erasure` parts, xDRs partitioned by month), its configuration, and
helpers to compare databases (pg_dump sections, per-table checksums) and to run
`pgveil erase`.

Customer `c` has accounts `10c+1` and `10c+2`; every personal value carries the marker
`C%06d` of its customer (or is unique to one row, like an xDR's CLD), so a value found in a
dump can be traced to its customer. Customers with `c % 4 == 0` are terminated at `T0`;
their class (`c % 3`) gives the retention: 0 days, 30 days, or NULL (the default, 7 days).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import pty
import re
import select
import struct
import subprocess
import sys
import termios
import time
from collections import Counter
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import psycopg

from proxy.demo import fixture
from proxy.demo.embedded_pg import EmbeddedPostgres

ROOT = Path(__file__).resolve().parents[2]
T0 = datetime(2026, 3, 1, tzinfo=UTC)
IMMEDIATE, EUROPEAN, NO_POLICY = 0, 1, 2  # c % 3 -> class (1 + c % 3)


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
      extra: {{json_keys: [passport, contact.phone]}}
  billing.accounts:
    owner: {{column: i_customer}}
    key: i_account
    columns:
      id: {{placeholder: "erased-{{key}}"}}
      ip: null
      mac: null
      extra: {{json_keys: [sip_user], placeholder: "[erased]"}}
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
    scale = fixture.Scale(customers=customers, xdrs_per_account=xdrs_per_account)
    fixture.load(
        pg,
        scale,
        ("population", "erasure"),
        dbname=name,
        xdrs_by="connect_time",
        first_month=T0.date().replace(month=1),
        months=3,
        terminated_at=T0,
    )
    return Db(pg, name)


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
               c.extra ->> 'passport', c.extra #>> '{contact,phone}'], NULL)
               || coalesce((SELECT array_agg(v) FROM billing.accounts a,
                     LATERAL unnest(ARRAY[a.id, host(a.ip), a.mac::text,
                                          a.extra ->> 'sip_user']) v
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


def erase_on_terminal(
    *args: str, env: dict[str, str] | None = None, timeout: float = 120
) -> tuple[int, str, str]:
    """`pgveil erase` as a person runs it: standard error on a pseudo-terminal (160
    columns), standard output a pipe. Exit status, what the terminal got (as the program
    wrote it, but for the terminal's CR before each LF), standard output."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 160, 0, 0))
    try:
        p = subprocess.Popen(
            [sys.executable, "-m", "proxy.cli", "erase", *args],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=slave,
            cwd=ROOT,
            env={**os.environ, **(env or {})},
        )
    finally:
        os.close(slave)
    got = bytearray()
    deadline = time.monotonic() + timeout  # a guard against a hang, not a measurement
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([master], [], [], 1.0)
            if not ready:
                continue
            try:
                data = os.read(master, 65536)
            except OSError:  # EIO: every writer of the terminal is gone
                break
            if not data:
                break
            got += data
        else:
            p.kill()
        assert p.stdout is not None
        out = p.stdout.read().decode()
        p.wait(timeout=30)
    finally:
        os.close(master)
    return p.returncode, got.decode().replace("\r\n", "\n"), out


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
