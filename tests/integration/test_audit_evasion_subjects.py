"""Audit-evasion corpus: `subjects_complete: true` only when proved.

An access event lists the data subjects a statement touched and says whether that list is
complete. `audit who --subject K` trusts a complete list: an event that claims to be
complete and does not list K is left out of the answer. So a complete list must be proved,
either by the statement's shape (a single-table read or write whose WHERE clause names its
keys, an INSERT's VALUES) or by the keys in the rows returned, when every personal value of
a returned row comes from the row whose key is returned; and every key is normalised by the
key column's type as the server compares it.

Each case is a statement, run through pgveil against the real PostgreSQL by psql (simple
protocol, text), psycopg (simple protocol, text) and asyncpg (extended protocol, binary
rows), as an unmasked and a masked role where the role may run it, and the subjects and
`subjects_complete` its event must carry. Writes run in a transaction that is rolled back.
Binary parameters are sent by asyncpg and by raw protocol messages.

An event is written before the answer that completes its statement is released: once a
client has its answer, the event is in the file.
"""

from __future__ import annotations

import asyncio
import decimal
import os
import shutil
import struct
import subprocess
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
import psycopg
import pytest

from proxy.demo.embedded_pg import EmbeddedPostgres
from proxy.wire import messages as m
from tests.integration.audit_wire import all_events, audit_env
from tests.integration.masking_fixture import ADMIN, ADMIN_PW, HELPDESK, HELPDESK_PW, RULES, dsn
from tests.support import ProxyProcess, RawClient

CUSTOMERS, ACCOUNTS = "billing.customers", "billing.accounts"
TEXT_KEYS, CI_KEYS, UUID_KEYS = "subj.text_keys", "subj.ci_keys", "subj.uuid_keys"
CHAR_KEYS, NUM_KEYS = "subj.char_keys", "subj.num_keys"
UNMASKED_RAW = "trust_user"
U1 = "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11"
U2 = "b1ffcd88-8d1a-4ef8-bb6d-6bb9bd380a22"

SCHEMA = f"""
DROP SCHEMA IF EXISTS subj CASCADE;
CREATE SCHEMA subj;
CREATE COLLATION subj.ci (provider = icu, locale = 'und-u-ks-level2', deterministic = false);
CREATE TABLE subj.text_keys (k text PRIMARY KEY, secret text);
CREATE TABLE subj.ci_keys (k text COLLATE subj.ci PRIMARY KEY, secret text);
CREATE TABLE subj.uuid_keys (k uuid PRIMARY KEY, secret text);
CREATE TABLE subj.char_keys (k char(6) PRIMARY KEY, secret text);
CREATE TABLE subj.num_keys (k numeric PRIMARY KEY, secret text);
INSERT INTO subj.text_keys VALUES ('Ab', 'secret-ab'), ('cd', 'secret-cd'), ('é', 'secret-é');
INSERT INTO subj.ci_keys VALUES ('AB', 'secret-AB'), ('cd', 'secret-cd');
INSERT INTO subj.uuid_keys VALUES ('{U1}', 'secret-u1'), ('{U2}', 'secret-u2');
INSERT INTO subj.char_keys VALUES ('ab', 'secret-ab'), ('cd', 'secret-cd');
INSERT INTO subj.num_keys VALUES (2.50, 'secret-2.5'), (7, 'secret-7');
GRANT USAGE ON SCHEMA subj TO {HELPDESK}, {ADMIN}, cc_staff, {UNMASKED_RAW};
GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA subj
  TO {HELPDESK}, {ADMIN}, cc_staff, {UNMASKED_RAW};
GRANT USAGE ON SCHEMA billing TO {UNMASKED_RAW};
GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA billing TO {UNMASKED_RAW};
"""
EXTRA_RULES = "".join(
    f"  {t}:\n    subject: k\n    columns:\n      secret: partial\n"
    for t in (TEXT_KEYS, CI_KEYS, UUID_KEYS, CHAR_KEYS, NUM_KEYS)
)


class Audit:
    def __init__(self, proxy: ProxyProcess, path: Path) -> None:
        self.proxy = proxy
        self.path = path
        self.seen = 0

    def mark(self) -> None:
        self.seen = len(all_events(self.path))

    def accesses(self, table: str) -> list[dict[str, Any]]:
        """The access events on `table` written since `mark` (no waiting: see the module
        docstring)."""
        events = all_events(self.path)[self.seen :]
        return [
            e
            for e in events
            if e["type"] == "access" and e.get("outcome") != "running" and table in e["tables"]
        ]


@pytest.fixture(scope="module")
def audit(pg: EmbeddedPostgres, billing: ProxyProcess, tmp_path_factory: Any) -> Iterator[Audit]:
    pg.psql(SCHEMA)
    d = tmp_path_factory.mktemp("audit-subjects")
    rules = d / "rules.yaml"
    rules.write_text(RULES + EXTRA_RULES)
    with ProxyProcess(
        pg.port, "--upstream-sslmode", "disable", "--rules", str(rules),
        "--catalog-user", pg.superuser, "--audit-file", str(d / "audit.jsonl"),
        "--audit-subjects-limit", "50", "--log-level", "error", env=audit_env(pg),
    ) as p:  # fmt: skip
        yield Audit(p, d / "audit.jsonl")
        assert "Traceback" not in p.log(), p.log()
    pg.psql(
        f"DROP SCHEMA subj CASCADE; REVOKE ALL ON ALL TABLES IN SCHEMA billing FROM {UNMASKED_RAW};"
        f"REVOKE USAGE ON SCHEMA billing FROM {UNMASKED_RAW};"
    )


# ---- the clients ------------------------------------------------------------------------

ROLES = {"unmasked": (ADMIN, ADMIN_PW), "masked": (HELPDESK, HELPDESK_PW)}
CLIENTS = ("psql", "psycopg", "asyncpg")


def run_psql(pg: EmbeddedPostgres, port: int, role: str, sql: str, write: bool) -> str:
    user, password = ROLES[role]
    psql = shutil.which("psql") or str(pg.bindir / "psql")
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    env.update(PGPASSWORD=password, PGCLIENTENCODING="UTF8", PGSSLMODE="disable")
    body = f"BEGIN;\n{sql};\nROLLBACK;\n" if write else f"{sql};\n"
    p = subprocess.run(
        [psql, "-X", "-v", "ON_ERROR_STOP=0", "-h", "127.0.0.1", "-p", str(port), "-U", user,
         "-d", "postgres"],
        input=body, capture_output=True, text=True, env=env, timeout=60,
    )  # fmt: skip
    return p.stdout + p.stderr


@dataclass
class Sessions:
    """One psycopg (autocommit, simple protocol) and one asyncpg session per role."""

    pg: EmbeddedPostgres
    port: int
    loop: asyncio.AbstractEventLoop
    psycopg: dict[str, psycopg.Connection[Any]]
    asyncpg: dict[str, asyncpg.Connection]

    def run(self, client: str, role: str, sql: str, write: bool = False) -> str:
        if client == "psql":
            return run_psql(self.pg, self.port, role, sql, write)
        if client == "psycopg":
            c = self.psycopg[role]
            try:
                if write:
                    c.execute("BEGIN")
                cur = c.execute(sql)
                return repr(cur.fetchall()) if cur.description is not None else ""
            except psycopg.Error as exc:
                return f"ERROR {exc.diag.sqlstate}"
            finally:
                if write or c.info.transaction_status != psycopg.pq.TransactionStatus.IDLE:
                    c.execute("ROLLBACK")
        return self.loop.run_until_complete(self._asyncpg(role, sql, write))

    async def _asyncpg(self, role: str, sql: str, write: bool) -> str:
        c = self.asyncpg[role]
        try:
            if write:
                await c.execute("BEGIN")
            return repr(await c.fetch(sql))
        except asyncpg.PostgresError as exc:
            return f"ERROR {exc.sqlstate}"
        finally:
            if write or c.is_in_transaction():
                await c.execute("ROLLBACK")

    def fetch(self, role: str, sql: str, args: tuple[object, ...], write: bool) -> str:
        """asyncpg with parameters (binary format, types from the server's Describe); a
        write in a transaction rolled back."""

        async def run() -> str:
            c = self.asyncpg[role]
            try:
                if write:
                    await c.execute("BEGIN")
                return repr(await c.fetch(sql, *args))
            except asyncpg.PostgresError as exc:
                return f"ERROR {exc.sqlstate}"
            finally:
                if c.is_in_transaction():
                    await c.execute("ROLLBACK")

        return self.loop.run_until_complete(run())


@pytest.fixture(scope="module")
def sessions(pg: EmbeddedPostgres, audit: Audit) -> Iterator[Sessions]:
    loop = asyncio.new_event_loop()
    port = audit.proxy.port

    async def connect(role: str) -> asyncpg.Connection:
        user, password = ROLES[role]
        return await asyncpg.connect(
            host="127.0.0.1", port=port, user=user, password=password, database="postgres",
            ssl=False, server_settings={"client_encoding": "UTF8"},
        )  # fmt: skip

    s = Sessions(
        pg,
        port,
        loop,
        {r: psycopg.connect(dsn(pg, port, *ROLES[r]), autocommit=True) for r in ROLES},
        {r: loop.run_until_complete(connect(r)) for r in ROLES},
    )
    yield s
    for c in s.psycopg.values():
        c.close()
    for a in s.asyncpg.values():
        loop.run_until_complete(a.close())
    loop.close()


def the_event(audit: Audit, table: str) -> dict[str, Any]:
    found = audit.accesses(table)
    assert len(found) == 1, found
    return found[0]


def check(event: dict[str, Any], table: str, subjects: list[str] | None, complete: bool) -> None:
    """A complete event lists exactly `subjects`; an incomplete one says so (whatever keys
    it saw are a lower bound: not checked beyond being listed as seen)."""
    assert event["subjects_complete"] is complete, event
    if complete:
        assert (event.get("subjects") or {}).get(table) == subjects, event


# ---- statements: (sql, table, subjects, complete, roles, write) ---------------------------


@dataclass(frozen=True)
class Case:
    sql: str
    table: str
    subjects: list[str] | None
    complete: bool
    roles: tuple[str, ...] = ("unmasked", "masked")
    write: bool = False


CASES: dict[str, Case] = {
    # -- sound proofs that must stay complete
    "key named in WHERE": Case(
        "SELECT email FROM billing.customers WHERE i_customer = 2", CUSTOMERS, ["2"], True
    ),
    "key named and returned": Case(
        "SELECT i_customer, email FROM billing.customers WHERE i_customer = 2",
        CUSTOMERS, ["2"], True,
    ),
    "keys returned": Case(
        "SELECT i_customer, email FROM billing.customers ORDER BY 1", CUSTOMERS, ["1", "2"], True
    ),
    "keys named by IN": Case(
        "SELECT email FROM billing.customers WHERE i_customer IN (1, 2)",
        CUSTOMERS, ["1", "2"], True,
    ),
    "aggregate over the named key": Case(
        "SELECT count(email) FROM billing.customers WHERE i_customer = 2", CUSTOMERS, ["2"], True
    ),
    "window over the named key only": Case(
        "SELECT lag(email) OVER (ORDER BY i_customer) FROM billing.customers "
        "WHERE i_customer = 2",
        CUSTOMERS, ["2"], True,
    ),
    "join returning both keys": Case(
        "SELECT c.i_customer, a.i_account, a.ip, c.email FROM billing.customers c "
        "JOIN billing.accounts a USING (i_customer)",
        ACCOUNTS, ["10", "20"], True,
    ),
    "filter on an unprotected table": Case(
        "SELECT email FROM billing.customers WHERE i_customer = 1 AND i_customer_class IN "
        "(SELECT i_customer_class FROM billing.customer_classes)",
        CUSTOMERS, ["1"], True,
    ),
    "update named": Case(
        "UPDATE billing.customers SET notes = notes WHERE i_customer = 2",
        CUSTOMERS, ["2"], True, write=True,
    ),
    "update returning keys": Case(
        "UPDATE billing.customers SET notes = notes WHERE balance >= 0 RETURNING i_customer",
        CUSTOMERS, ["1", "2"], True, write=True,
    ),
    "delete named": Case(
        "DELETE FROM billing.accounts WHERE i_account = 10", ACCOUNTS, ["10"], True, write=True
    ),
    "insert values": Case(
        "INSERT INTO billing.customers (i_customer, i_customer_class, name) VALUES (30, 1, 'x')",
        CUSTOMERS, ["30"], True, write=True,
    ),
    "insert rounds a numeric key": Case(
        "INSERT INTO billing.customers (i_customer, i_customer_class, name) "
        "VALUES (30.5, 1, 'x')",
        CUSTOMERS, ["31"], True, write=True,
    ),
    # -- other customers' data in the rows of the named or returned key
    "scalar subquery in the target list": Case(
        "SELECT (SELECT email FROM billing.customers c2 WHERE c2.i_customer = 2) "
        "FROM billing.customers WHERE i_customer = 1",
        CUSTOMERS, None, False,
    ),
    "scalar subquery beside the returned key": Case(
        "SELECT i_customer, (SELECT email FROM billing.customers c2 WHERE c2.i_customer = 2) "
        "FROM billing.customers WHERE i_customer = 1",
        CUSTOMERS, None, False,
    ),
    "aggregate subquery beside the key": Case(
        "SELECT i_customer, (SELECT string_agg(email, ',') FROM billing.customers) "
        "FROM billing.customers WHERE i_customer = 1",
        CUSTOMERS, None, False,
    ),
    "self-join": Case(
        "SELECT c.i_customer, d.email FROM billing.customers c "
        "JOIN billing.customers d ON d.i_customer = 2 WHERE c.i_customer = 1",
        CUSTOMERS, None, False,
    ),
    "union": Case(
        "SELECT i_customer, email FROM billing.customers WHERE i_customer = 1 "
        "UNION ALL SELECT 1, email FROM billing.customers WHERE i_customer = 2",
        CUSTOMERS, None, False,
    ),
    "cte": Case(
        "WITH x AS (SELECT email FROM billing.customers WHERE i_customer = 2) "
        "SELECT i_customer, x.email FROM billing.customers, x WHERE i_customer = 1",
        CUSTOMERS, None, False,
    ),
    "lateral join": Case(
        "SELECT c.i_customer, x.email FROM billing.customers c, LATERAL "
        "(SELECT email FROM billing.customers d WHERE d.i_customer = c.i_customer + 1) x",
        CUSTOMERS, None, False,
    ),
    "window over other rows": Case(
        "SELECT i_customer, lag(email) OVER (ORDER BY i_customer) FROM billing.customers "
        "ORDER BY i_customer DESC LIMIT 1",
        CUSTOMERS, None, False,
    ),
    "filter reading another row": Case(
        "SELECT email FROM billing.customers WHERE i_customer = 1 AND EXISTS "
        "(SELECT 1 FROM billing.customers d WHERE d.i_customer = 2 AND d.email LIKE 'a%')",
        CUSTOMERS, None, False,
    ),
    "insert returning a subquery": Case(
        "INSERT INTO billing.customers (i_customer, i_customer_class, name) VALUES (31, 1, 'x') "
        "RETURNING (SELECT email FROM billing.customers WHERE i_customer = 2)",
        CUSTOMERS, None, False, write=True,
    ),
    "insert values from a subquery": Case(
        "INSERT INTO billing.customers (i_customer, i_customer_class, name, notes) VALUES "
        "(31, 1, 'x', (SELECT email FROM billing.customers WHERE i_customer = 2))",
        CUSTOMERS, None, False, roles=("unmasked",), write=True,
    ),
    "update from another row": Case(
        "UPDATE billing.customers c SET notes = d.email FROM billing.customers d "
        "WHERE c.i_customer = 1 AND d.i_customer = 2",
        CUSTOMERS, None, False, roles=("unmasked",), write=True,
    ),
    "update from, returning another row": Case(
        "UPDATE billing.customers c SET notes = c.notes FROM billing.customers d "
        "WHERE c.i_customer = 1 AND d.i_customer = 2 RETURNING c.i_customer, d.email",
        CUSTOMERS, None, False, write=True,
    ),
    "delete using, returning another row": Case(
        "DELETE FROM billing.accounts a USING billing.accounts b "
        "WHERE a.i_account = 10 AND b.i_account = 20 RETURNING b.ip",
        ACCOUNTS, None, False, write=True,
    ),
    "update that moves the key, returning it": Case(
        "UPDATE billing.accounts SET i_account = i_account + 100 WHERE ip IS NOT NULL "
        "RETURNING i_account",
        ACCOUNTS, None, False, write=True,
    ),
    "update that moves the named key": Case(
        "UPDATE billing.accounts SET i_account = 99 WHERE i_account = 10 RETURNING i_account",
        ACCOUNTS, ["10", "99"], True, write=True,
    ),
    "upsert on another unique column": Case(
        "INSERT INTO billing.customers (i_customer, i_customer_class, name, email) "
        "VALUES (31, 1, 'x', 'ann@example.org') ON CONFLICT (email) DO UPDATE SET notes = 'n'",
        CUSTOMERS, None, False, roles=("unmasked",), write=True,
    ),
    "a column renamed to the key's name": Case(
        "SELECT email FROM billing.customers c(k, i_customer) WHERE c.i_customer = 1",
        CUSTOMERS, None, False,
    ),
    "a function that reads the table": Case(
        "SELECT i_customer, billing.leak() FROM billing.customers WHERE i_customer = 1",
        CUSTOMERS, None, False, roles=("unmasked",),
    ),
    "a built-in that runs SQL": Case(
        "SELECT i_customer, query_to_xml('SELECT email FROM billing.customers', true, true, '') "
        "FROM billing.customers WHERE i_customer = 1",
        CUSTOMERS, None, False, roles=("unmasked",),
    ),
    # -- key literals read as the server reads them
    "key 2e0": Case(
        "UPDATE billing.customers SET notes = notes WHERE i_customer = 2e0",
        CUSTOMERS, ["2"], True, write=True,
    ),
    "key 2.0": Case(
        "SELECT email FROM billing.customers WHERE i_customer = 2.0", CUSTOMERS, ["2"], True
    ),
    "key 3::boolean::int": Case(
        "UPDATE billing.customers SET notes = notes WHERE i_customer = 3::boolean::int",
        CUSTOMERS, ["1"], True, write=True,
    ),
    "key '0002'": Case(
        "SELECT email FROM billing.customers WHERE i_customer = '0002'", CUSTOMERS, ["2"], True
    ),
    "key ' 2 '": Case(
        "SELECT email FROM billing.customers WHERE i_customer = ' 2 '", CUSTOMERS, ["2"], True
    ),
    "key +2": Case("SELECT email FROM billing.customers WHERE i_customer = +2", CUSTOMERS, ["2"], True),
    "key 2::numeric": Case(
        "SELECT email FROM billing.customers WHERE i_customer = 2::numeric",
        CUSTOMERS, ["2"], True,
    ),
    "keys '2.0' and 2.5 compared as numeric": Case(
        "SELECT email FROM billing.customers WHERE i_customer IN ('2.0', 2.5)",
        CUSTOMERS, ["2"], True,
    ),
    "key beyond bigint": Case(
        "SELECT email FROM billing.customers WHERE i_customer IN (2, 99999999999999999999)",
        CUSTOMERS, ["2"], True,
    ),
    "key compared as float": Case(
        "SELECT email FROM billing.customers WHERE i_customer = 2::float8", CUSTOMERS, None, False
    ),
    "text key": Case("SELECT secret FROM subj.text_keys WHERE k = 'Ab'", TEXT_KEYS, ["Ab"], True),
    "text key under a nondeterministic collation": Case(
        "SELECT secret FROM subj.ci_keys WHERE k = 'ab'", CI_KEYS, None, False
    ),
    "text key under a nondeterministic collation, returned": Case(
        "SELECT k, secret FROM subj.ci_keys WHERE k = 'ab'", CI_KEYS, ["AB"], True
    ),
    "uuid key in upper case": Case(
        f"SELECT secret FROM subj.uuid_keys WHERE k = '{U1.upper()}'", UUID_KEYS, [U1], True
    ),
    "uuid key in braces without hyphens": Case(
        "SELECT secret FROM subj.uuid_keys WHERE k = '{" + U1.replace("-", "") + "}'",
        UUID_KEYS, [U1], True,
    ),
    "uuid keys returned": Case(
        "SELECT k, secret FROM subj.uuid_keys ORDER BY k", UUID_KEYS, [U1, U2], True
    ),
    "char(n) key": Case("SELECT secret FROM subj.char_keys WHERE k = 'ab'", CHAR_KEYS, ["ab"], True),
    "char(n) keys returned": Case(
        "SELECT k, secret FROM subj.char_keys ORDER BY k", CHAR_KEYS, ["ab", "cd"], True
    ),
    "numeric key": Case("SELECT secret FROM subj.num_keys WHERE k = 2.500", NUM_KEYS, ["2.5"], True),
    "numeric keys returned": Case(
        "SELECT k, secret FROM subj.num_keys ORDER BY k", NUM_KEYS, ["2.5", "7"], True
    ),
}  # fmt: skip


@pytest.mark.parametrize("client", CLIENTS)
@pytest.mark.parametrize(
    ("name", "role"), [(name, role) for name, case in CASES.items() for role in case.roles]
)
def test_subjects(audit: Audit, sessions: Sessions, name: str, role: str, client: str) -> None:
    case = CASES[name]
    audit.mark()
    sessions.run(client, role, case.sql, case.write)
    check(the_event(audit, case.table), case.table, case.subjects, case.complete)


# ---- parameters: read by their type, binary or text -------------------------------------


@dataclass(frozen=True)
class Bound:
    sql: str
    args: tuple[object, ...]
    table: str
    subjects: list[str] | None
    complete: bool
    write: bool = False


BOUND: dict[str, Bound] = {
    "int8": Bound(
        "SELECT email FROM billing.customers WHERE i_customer = $1", (2,), CUSTOMERS, ["2"], True
    ),
    "int2": Bound(
        "SELECT email FROM billing.customers WHERE i_customer = $1::int2",
        (2,), CUSTOMERS, ["2"], True,
    ),
    "int4 list": Bound(
        "SELECT email FROM billing.customers WHERE i_customer IN ($1::int4, $2)",
        (1, 2), CUSTOMERS, ["1", "2"], True,
    ),
    "float8, not its bit pattern": Bound(
        "SELECT email FROM billing.customers WHERE i_customer = $1::float8",
        (2.0,), CUSTOMERS, None, False,
    ),
    "numeric": Bound(
        "SELECT email FROM billing.customers WHERE i_customer = $1::numeric",
        (decimal.Decimal("2.0"),), CUSTOMERS, ["2"], True,
    ),
    "numeric matching nothing": Bound(
        "SELECT email FROM billing.customers WHERE i_customer = $1::numeric",
        (decimal.Decimal("2.5"),), CUSTOMERS, None, True,
    ),
    "text cast to the key": Bound(
        "SELECT email FROM billing.customers WHERE i_customer = $1::text::int8",
        ("0002",), CUSTOMERS, ["2"], True,
    ),
    "array": Bound(
        "SELECT email FROM billing.customers WHERE i_customer = ANY($1)",
        ([1, 2],), CUSTOMERS, None, False,
    ),
    "insert": Bound(
        "INSERT INTO billing.customers (i_customer, i_customer_class, name) VALUES ($1, 1, 'x')",
        (30,), CUSTOMERS, ["30"], True, write=True,
    ),
    "text key": Bound(
        "SELECT secret FROM subj.text_keys WHERE k = $1", ("Ab",), TEXT_KEYS, ["Ab"], True
    ),
    "uuid key": Bound(
        "SELECT secret FROM subj.uuid_keys WHERE k = $1",
        (uuid.UUID(U1),), UUID_KEYS, [U1], True,
    ),
    "numeric key": Bound(
        "SELECT secret FROM subj.num_keys WHERE k = $1",
        (decimal.Decimal("2.50"),), NUM_KEYS, ["2.5"], True,
    ),
    "char(n) key": Bound(
        "SELECT secret FROM subj.char_keys WHERE k = $1", ("ab",), CHAR_KEYS, ["ab"], True
    ),
}  # fmt: skip


@pytest.mark.parametrize("role", list(ROLES))
@pytest.mark.parametrize("name", list(BOUND))
def test_asyncpg_binary_parameters(audit: Audit, sessions: Sessions, name: str, role: str) -> None:
    """asyncpg describes each statement and sends its parameters in binary, in the types
    the server resolved."""
    case = BOUND[name]
    audit.mark()
    out = sessions.fetch(role, case.sql, case.args, case.write)
    assert "ERROR" not in out, out
    check(the_event(audit, case.table), case.table, case.subjects, case.complete)


def test_psycopg_binary_parameters(pg: EmbeddedPostgres, audit: Audit) -> None:
    """psycopg declares each parameter's type in the Parse and sends it in binary (%b)."""
    with psycopg.connect(dsn(pg, audit.proxy.port, ADMIN, ADMIN_PW), autocommit=True) as c:
        sql = "SELECT email FROM billing.customers WHERE i_customer = %b"
        for value, subjects, complete in (
            (2, ["2"], True),
            (decimal.Decimal("2.0"), ["2"], True),
            (2.0, None, False),
        ):
            audit.mark()
            c.execute(sql, [value]).fetchall()
            check(the_event(audit, CUSTOMERS), CUSTOMERS, subjects, complete)


FLOAT8, NUMERIC, TEXT, INT4 = 701, 1700, 25, 23


def _parse(sql: str, *types: int) -> bytes:
    body = b"\0" + sql.encode() + b"\0" + struct.pack(f"!h{len(types)}I", len(types), *types)
    return m.message(m.PARSE, body)


def _bind(value: bytes, fmt: int) -> bytes:
    body = b"\0\0" + struct.pack("!hh", 1, fmt) + struct.pack("!hi", 1, len(value)) + value
    return m.message(m.BIND, body + struct.pack("!h", 0))


RAW = {"unmasked": UNMASKED_RAW, "masked": "masked_trust"}
KEY_IS = "SELECT email FROM billing.customers WHERE i_customer = $1"


@pytest.mark.parametrize("role", list(RAW))
@pytest.mark.parametrize(
    ("sql", "types", "value", "fmt", "subjects", "complete"),
    [
        (KEY_IS, (FLOAT8,), struct.pack("!d", 2.0), 1, None, False),
        (KEY_IS, (NUMERIC,), b"2.0", 0, ["2"], True),
        (KEY_IS, (NUMERIC,), struct.pack("!hhHhH", 1, 0, 0, 1, 2), 1, ["2"], True),
        (KEY_IS, (), struct.pack("!q", 2), 1, ["2"], True),  # the server infers bigint
        (KEY_IS, (INT4,), struct.pack("!i", 2), 1, ["2"], True),
        (KEY_IS[:-2] + "$1::int8", (TEXT,), b"0002", 1, ["2"], True),
    ],
    ids=["float8", "numeric text", "numeric", "inferred", "int4", "text cast"],
)
def test_raw_parameters(
    audit: Audit,
    role: str,
    sql: str,
    types: tuple[int, ...],
    value: bytes,
    fmt: int,
    subjects: list[str] | None,
    complete: bool,
) -> None:
    """A Parse that declares its parameter's type (or not) and a Bind in binary or text: the
    key is read in that type, or the event says the subjects are not complete."""
    c = RawClient(audit.proxy.port, user=RAW[role])
    try:
        audit.mark()
        c.send_raw(_parse(sql, *types) + _bind(value, fmt) + _execute() + m.message(m.SYNC))
        answers = c.until_ready()
    finally:
        c.close()
    errors = [body for typ, body in answers if typ == "E"]
    assert not errors, errors
    check(the_event(audit, CUSTOMERS), CUSTOMERS, subjects, complete)


def _execute() -> bytes:
    return m.message(m.EXECUTE, b"\0" + struct.pack("!i", 0))


# ---- what a name runs, and texts of several statements ----------------------------------

TEXTS: dict[str, tuple[str, list[str] | None, bool]] = {
    "execute of a prepared read returning its key": (
        "PREPARE p1 AS SELECT i_customer, email FROM billing.customers WHERE i_customer = $1;"
        " EXECUTE p1(2)",
        ["2"], True,
    ),
    "execute of a prepared self-join": (
        "PREPARE p2 AS SELECT c.i_customer, d.email FROM billing.customers c "
        "JOIN billing.customers d ON d.i_customer <> c.i_customer; EXECUTE p2",
        None, False,
    ),
    "fetch from a cursor returning its key": (
        "BEGIN; DECLARE k1 CURSOR FOR SELECT i_customer, email FROM billing.customers "
        "ORDER BY 1; FETCH ALL FROM k1",
        ["1", "2"], True,
    ),
    "fetch from a cursor over a window": (
        "BEGIN; DECLARE k2 CURSOR FOR SELECT i_customer, lag(email) OVER (ORDER BY i_customer)"
        " FROM billing.customers ORDER BY 1 DESC LIMIT 1; FETCH ALL FROM k2",
        None, False,
    ),
    "two reads returning their keys": (
        "SELECT i_customer, email FROM billing.customers WHERE i_customer = 1; "
        "SELECT i_customer, email FROM billing.customers WHERE i_customer = 2",
        ["1", "2"], True,
    ),
    "a write without its key beside a read of another key": (
        "BEGIN; UPDATE billing.customers SET notes = notes WHERE i_customer = 2; "
        "SELECT i_customer FROM billing.customers WHERE i_customer = 1",
        None, False,
    ),
}  # fmt: skip


@pytest.mark.parametrize("role", list(ROLES))
@pytest.mark.parametrize("name", list(TEXTS))
def test_texts_and_names(audit: Audit, sessions: Sessions, name: str, role: str) -> None:
    """Each text is one Query (psycopg, simple protocol); the last access event on
    billing.customers is the statement that read through the name, or the text."""
    sql, subjects, complete = TEXTS[name]
    audit.mark()
    sessions.run("psycopg", role, sql)
    sessions.run("psycopg", role, "DEALLOCATE ALL")
    event = audit.accesses(CUSTOMERS)[-1]
    check(event, CUSTOMERS, subjects, complete)


# ---- names the search path can give another meaning -------------------------------------

# `=` for (bigint, integer), or a type `bool`, in a schema a session can put before
# pg_catalog: the built-in functions behind them are C code, so nothing here is code the
# server runs without a statement naming it (which would close masked sessions). Each in a
# database of its own, with a pgveil of its own.
SHADOWS = {
    "operator": "CREATE OPERATOR shadow.= "
    "(LEFTARG = bigint, RIGHTARG = integer, FUNCTION = pg_catalog.int84ne);",
    "type": "CREATE DOMAIN shadow.bool AS integer;",
}
SHADOW_RULES = """
databases: [{db}]
roles:
  unmasked: [{admin}]
  masked: [{helpdesk}]
  default: unmasked
tables:
  s.people:
    subject: id
    columns:
      secret: partial
"""
SHADOW_SCHEMA = f"""
CREATE SCHEMA s;
CREATE TABLE s.people (id bigint PRIMARY KEY, secret text);
INSERT INTO s.people VALUES (1, 'secret-1'), (2, 'secret-2'), (3, 'secret-3');
CREATE SCHEMA shadow;
GRANT USAGE ON SCHEMA s, shadow TO {ADMIN}, {HELPDESK};
GRANT SELECT ON s.people TO {ADMIN}, {HELPDESK};
"""


@pytest.fixture(scope="module", params=list(SHADOWS))
def shadowed(
    request: pytest.FixtureRequest,
    pg: EmbeddedPostgres,
    billing: ProxyProcess,
    tmp_path_factory: Any,
) -> Iterator[tuple[str, str, Audit]]:
    # (`billing` creates the roles these rules name)
    kind = request.param
    db = f"pgveil_subjects_{kind}"
    pg.psql(f"DROP DATABASE IF EXISTS {db}")
    pg.psql(f"CREATE DATABASE {db}")
    pg.psql(SHADOW_SCHEMA + SHADOWS[kind], dbname=db)
    d = tmp_path_factory.mktemp("audit-shadowed")
    rules = d / "rules.yaml"
    rules.write_text(SHADOW_RULES.format(db=db, admin=ADMIN, helpdesk=HELPDESK))
    with ProxyProcess(
        pg.port, "--upstream-sslmode", "disable", "--rules", str(rules),
        "--catalog-user", pg.superuser, "--audit-file", str(d / "audit.jsonl"),
        "--log-level", "error", env=audit_env(pg),
    ) as p:  # fmt: skip
        yield kind, db, Audit(p, d / "audit.jsonl")
        assert "Traceback" not in p.log(), p.log()
    pg.psql(f"DROP DATABASE IF EXISTS {db} WITH (FORCE)")


SHADOWED = {
    "returned": "SELECT id, secret FROM s.people ORDER BY 1",
    "equality": "SELECT secret FROM s.people WHERE id = 2",
    "cast": "SELECT secret FROM s.people WHERE id = (3::bool::int4)::int8",
}
# (shadow, statement) -> rows the server returns, and the event's subjects and completeness
EXPECTED: dict[tuple[str, str], tuple[int, list[str] | None, bool]] = {
    # the rows returned prove their keys, whatever the names mean
    ("operator", "returned"): (3, ["1", "2", "3"], True),
    ("type", "returned"): (3, ["1", "2", "3"], True),
    # `=` (bigint, integer) is shadow.=: every person but 2
    ("operator", "equality"): (2, None, False),
    ("type", "equality"): (1, ["2"], True),
    # (3::boolean::int4) is 1 ... but pgveil's catalog shows a `=` it cannot tell from the
    # built-in one, so it trusts no `=`
    ("operator", "cast"): (1, None, False),
    # ... and 3 where `bool` is shadow.bool (a domain over integer)
    ("type", "cast"): (1, None, False),
}


@pytest.mark.parametrize("role", list(ROLES))
@pytest.mark.parametrize("case", list(SHADOWED))
def test_shadowed_names(
    pg: EmbeddedPostgres, shadowed: tuple[str, str, Audit], role: str, case: str
) -> None:
    """A session puts a schema of its own before pg_catalog: an operator or a type named
    like a built-in then means another thing than the statement's text says to pgveil.
    What pgveil's catalog shows of such names, it does not trust."""
    kind, db, audit = shadowed
    read, subjects, complete = EXPECTED[(kind, case)]
    user, password = ROLES[role]
    conninfo = dsn(pg, audit.proxy.port, user, password) + f" dbname={db}"
    with psycopg.connect(conninfo, autocommit=True) as c:
        c.execute("SET search_path = shadow, pg_catalog")
        audit.mark()
        rows = c.execute(SHADOWED[case]).fetchall()
    assert len(rows) == read, rows  # what the server read, not what the text says to pgveil
    check(the_event(audit, "s.people"), "s.people", subjects, complete)


def test_text_keys_are_read_in_the_sessions_encoding(pg: EmbeddedPostgres, audit: Audit) -> None:
    """An unmasked session in LATIN1: the key returned (and the key named) is the text the
    server compares, not its bytes read as UTF-8."""
    conninfo = dsn(pg, audit.proxy.port, ADMIN, ADMIN_PW) + " options='-c client_encoding=LATIN1'"
    with psycopg.connect(conninfo, autocommit=True) as c:
        assert c.info.encoding == "iso8859-1"
        for sql, complete in (
            ("SELECT k, secret FROM subj.text_keys WHERE k > 'd'", True),
            ("SELECT secret FROM subj.text_keys WHERE k = 'é'", True),
            ("SELECT secret FROM subj.text_keys WHERE k = %s", True),
        ):
            audit.mark()
            rows = c.execute(sql, ["é"] if "%s" in sql else None).fetchall()
            assert len(rows) == 1, rows
            check(the_event(audit, TEXT_KEYS), TEXT_KEYS, ["é"], complete)
