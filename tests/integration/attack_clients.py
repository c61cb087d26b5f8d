"""The clients of the attack corpora: how a case is sent as the masked role `helpdesk`, and
what comes back.

A case is one SQL string (one client request; it may hold several statements) or a tuple of
statements sent one after the other on the same session, where a statement may be `CopyIn`
(`COPY ... FROM STDIN` with the rows to send). Three clients send it through pgveil:

* psql (one new session per case; the script goes on after errors, verbose error fields);
* psycopg 3 (simple protocol, text format);
* asyncpg (extended protocol, binary format);

and the `direct` client (psycopg) sends it to PostgreSQL itself, to prove that a case leaks
without pgveil. Each returns everything its client received as one text: rows, COPY data,
errors with all their fields, notices, notifications, reported parameters. Every error also
gets one line `ERROR [SQLSTATE] message` in the same form for all clients (`errors_in`), so
that tests can tell a refusal (42501, `pgveil: <reason>`) from any other failure.

Shared sessions (psycopg, asyncpg, direct) are reset between cases with ROLLBACK and
DISCARD ALL (unless a module asks to keep them as they are), and reopened when pgveil
closed them. A refused login gets one line `LOGIN FAILED [SQLSTATE] message` (`logins_in`;
libpq keeps no SQLSTATE of a failed connection, so psql and psycopg show `?????`). psql
always writes that line; psycopg and asyncpg only when a module asks (`record_logins`) and
otherwise raise, so that a corpus that only looks for leaks cannot pass on sessions that
never ran.

Test helpers only: no assertions here, and nothing that decides what counts as a leak
(that is `masking_fixture.leaks`).
"""

from __future__ import annotations

import asyncio
import io
import os
import re
import shutil
import subprocess
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import asyncpg
import psycopg

from proxy.demo.embedded_pg import EmbeddedPostgres
from tests.integration.masking_fixture import HELPDESK, HELPDESK_PW, dsn


@dataclass(frozen=True)
class CopyIn:
    """`COPY ... FROM STDIN` and the rows it sends (text format, one row per line)."""

    sql: str
    data: str


Statement = str | CopyIn
Statements = str | tuple[Statement, ...]

# the direct PostgreSQL port, for attacks that open their own connection (dblink)
PGPORT = "@PGPORT@"
CLIENTS = ("psql", "psycopg", "asyncpg")
# what a shared session runs before each case
RESET_SQL = ("ROLLBACK", "DISCARD ALL")
CHANNELS = ("other_channel", "invoice_events")
_COPY_OUT = re.compile(r"^\s*COPY\b.*\bTO\s+STDOUT\b", re.IGNORECASE | re.DOTALL)
_ERROR_LINE = re.compile(r"^ERROR \[([0-9A-Z]{5})\] (.*)$", re.MULTILINE)
# psql's verbose error line: "ERROR:  42501: pgveil: ..." (FATAL too)
_PSQL_ERROR = re.compile(r"^(?:psql:[^\n]*?)?(?:ERROR|FATAL):  ([0-9A-Z]{5}): (.*)$", re.MULTILINE)
_LOGIN_LINE = re.compile(r"^LOGIN FAILED \[([0-9A-Z?]{5})\] (.*)$", re.MULTILINE)
# libpq's text of a refused connection: "connection to server at ... failed: FATAL:  ..."
_LIBPQ_FATAL = re.compile(r"failed: FATAL:  (.*)$", re.MULTILINE)


def statements(sql: Statements, port: int) -> tuple[Statement, ...]:
    """The statements of a case, with the direct port filled in."""
    items = (sql,) if isinstance(sql, str | CopyIn) else sql
    return tuple(
        CopyIn(s.sql.replace(PGPORT, str(port)), s.data)
        if isinstance(s, CopyIn)
        else s.replace(PGPORT, str(port))
        for s in items
    )


def script(items: tuple[Statement, ...]) -> str:
    """A psql script of the statements; COPY FROM STDIN data follows its command."""
    out = []
    for s in items:
        # the separator on a line of its own: a statement may end with a -- comment
        if isinstance(s, CopyIn):
            out.append(s.sql.strip().rstrip(";") + "\n;\n" + s.data + "\\.\n")
        else:
            out.append(s.strip().rstrip(";") + "\n;\n")
    return "".join(out)


def text_of(sql: Statements) -> str:
    """All the text a case sends (to check that it carries no secret itself)."""
    return "\n".join(
        f"{s.sql}\n{s.data}" if isinstance(s, CopyIn) else s for s in statements(sql, 5432)
    )


def errors_in(received: str) -> list[tuple[str, str]]:
    """(SQLSTATE, message) of every error a client received, in order."""
    return [(m.group(1), m.group(2)) for m in _ERROR_LINE.finditer(received)]


def logins_in(received: str) -> list[tuple[str, str]]:
    """(SQLSTATE or `?????`, message) of every failed login a client received, in order."""
    return [(m.group(1), m.group(2)) for m in _LOGIN_LINE.finditer(received)]


def _error_line(sqlstate: str | None, message: str | None) -> str:
    return f"ERROR [{sqlstate or '?????'}] {message or ''}"


def _login_line(sqlstate: str | None, message: str | None) -> str:
    return f"LOGIN FAILED [{sqlstate or '?????'}] {message or ''}"


def _libpq_login_lines(text: str) -> list[str]:
    return [_login_line(None, m.group(1)) for m in _LIBPQ_FATAL.finditer(text)]


_DIAG_FIELDS = (
    "severity",
    "sqlstate",
    "message_primary",
    "message_detail",
    "message_hint",
    "statement_position",
    "internal_position",
    "internal_query",
    "context",
    "schema_name",
    "table_name",
    "column_name",
    "datatype_name",
    "constraint_name",
)


def _diag(d: Any) -> str:
    return repr({f: getattr(d, f, None) for f in _DIAG_FIELDS})


def run_psql(
    pg: EmbeddedPostgres, port: int, items: tuple[Statement, ...], dbname: str = "postgres"
) -> str:
    """One psql session running the statements as a script (errors do not stop it)."""
    psql = shutil.which("psql") or str(pg.bindir / "psql")
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    env.update(PGPASSWORD=HELPDESK_PW, PGCLIENTENCODING="UTF8", PGSSLMODE="disable")
    p = subprocess.run(
        [
            psql,
            "-X",
            "-v",
            "ON_ERROR_STOP=0",
            "-v",
            "VERBOSITY=verbose",
            *("-h", "127.0.0.1", "-p", str(port)),
            *("-U", HELPDESK, "-d", dbname),
        ],
        input=script(items),
        capture_output=True,
        text=True,
        encoding="utf-8",
        errors="replace",
        env=env,
        timeout=60,
    )
    errors = [_error_line(m.group(1), m.group(2)) for m in _PSQL_ERROR.finditer(p.stderr)]
    if p.stderr.startswith("psql: error: "):  # psql could not connect
        errors += _libpq_login_lines(p.stderr)
    return "\n".join([p.stdout, p.stderr, *errors])


@dataclass
class PsycopgClient:
    """One autocommit session, reopened when it was closed; simple protocol, text format."""

    conninfo: str
    reset_sql: tuple[str, ...] = RESET_SQL
    record_logins: bool = False
    conn: psycopg.Connection[Any] | None = None
    sink: list[str] | None = None

    def _connect(self) -> psycopg.Connection[Any]:
        c = psycopg.connect(self.conninfo, autocommit=True, prepare_threshold=None)
        c.add_notice_handler(lambda d: self._got(f"NOTICE {_diag(d)}"))
        c.add_notify_handler(lambda n: self._got(f"NOTIFY {n.channel} {n.payload}"))
        return c

    def _got(self, text: str) -> None:
        if self.sink is not None:
            self.sink.append(text)

    def reset(self) -> psycopg.Connection[Any]:
        if self.conn is not None and not self.conn.closed:
            try:
                for s in self.reset_sql:
                    self.conn.execute(s)
                return self.conn
            except psycopg.Error:
                self.conn.close()
        self.conn = self._connect()
        return self.conn

    def run(self, items: tuple[Statement, ...]) -> str:
        try:
            conn = self.reset()
        except psycopg.OperationalError as exc:
            if not self.record_logins:
                raise
            return "\n".join([f"{type(exc).__name__}: {exc}", *_libpq_login_lines(str(exc))])
        out: list[str] = []
        self.sink = out
        try:
            for s in items:
                if conn.closed:
                    out.append("[session closed]")
                    break
                try:
                    if isinstance(s, CopyIn):
                        with conn.cursor().copy(s.sql) as cp:
                            cp.write(s.data)
                    elif _COPY_OUT.match(s):
                        with conn.cursor().copy(s) as cp:
                            out.extend(bytes(chunk).decode("latin-1") for chunk in cp)
                    else:
                        cur = conn.execute(s)
                        while True:
                            if cur.description is not None:
                                out.append(repr(cur.fetchall()))
                            if not cur.nextset():
                                break
                except psycopg.Error as exc:
                    out.append(f"{type(exc).__name__}: {exc}")
                    out.append(_diag(exc.diag))
                    out.append(_error_line(exc.diag.sqlstate, exc.diag.message_primary))
            if not conn.closed:
                out.append(f"application_name={conn.info.parameter_status('application_name')!r}")
        finally:
            self.sink = None
        return "\n".join(out)

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()


@dataclass
class AsyncpgClient:
    """One session, reopened when it was closed; extended protocol, binary format."""

    port: int
    loop: asyncio.AbstractEventLoop
    database: str = "postgres"
    reset_sql: tuple[str, ...] = RESET_SQL
    record_logins: bool = False
    conn: asyncpg.Connection | None = None
    sink: list[str] | None = None
    _listeners: list[Callable[..., None]] = field(default_factory=list)

    def _got(self, text: str) -> None:
        if self.sink is not None:
            self.sink.append(text)

    async def _connect(self) -> asyncpg.Connection:
        c = await asyncpg.connect(
            host="127.0.0.1",
            port=self.port,
            user=HELPDESK,
            password=HELPDESK_PW,
            database=self.database,
            ssl=False,
            statement_cache_size=0,
            # asyncpg's own startup parameter is client_encoding='utf-8' (quotes included),
            # which pgveil refuses for masked roles; a second, plain value gets the session up
            server_settings={"client_encoding": "UTF8"},
        )
        c.add_log_listener(lambda _c, msg: self._got(f"NOTICE {msg!s} {msg.as_dict()!r}"))
        for ch in CHANNELS:
            await c.add_listener(
                ch, lambda _c, _pid, chan, payload: self._got(f"NOTIFY {chan} {payload}")
            )
        return c

    async def _reset(self) -> asyncpg.Connection:
        if self.conn is not None and not self.conn.is_closed():
            try:
                for sql in self.reset_sql:
                    await self.conn.execute(sql)
                return self.conn
            except (asyncpg.PostgresError, asyncpg.InterfaceError, OSError):
                self.conn.terminate()
        self.conn = await self._connect()
        return self.conn

    async def _run(self, items: tuple[Statement, ...]) -> str:
        try:
            conn = await self._reset()
        except asyncpg.PostgresError as exc:
            if not self.record_logins:
                raise
            message = exc.as_dict().get("message")
            return "\n".join([f"{type(exc).__name__}: {exc}", _login_line(exc.sqlstate, message)])
        out: list[str] = []
        self.sink = out

        async def copy_sink(data: bytes) -> None:
            out.append(bytes(data).decode("latin-1"))

        try:
            for s in items:
                if conn.is_closed():
                    out.append("[session closed]")
                    break
                try:
                    if isinstance(s, CopyIn):
                        # a file object: asyncpg would take bytes for a path
                        out.append(await conn._copy_in(s.sql, io.BytesIO(s.data.encode()), 30))
                        continue
                    if _COPY_OUT.match(s):
                        await conn._copy_out(s, copy_sink, 30)
                        continue
                    try:
                        rows = await conn.fetch(s)
                    except asyncpg.PostgresSyntaxError as exc:
                        if "cannot insert multiple commands" not in str(exc):
                            raise
                        out.append(await conn.execute(s))  # several statements: simple protocol
                        continue
                    out.append(repr([tuple(r) for r in rows]))
                except asyncpg.PostgresError as exc:
                    out.append(f"{type(exc).__name__}: {exc}")
                    out.append(repr(exc.as_dict()))
                    out.append(_error_line(exc.sqlstate, exc.as_dict().get("message")))
                except (asyncpg.InterfaceError, OSError) as exc:
                    out.append(f"{type(exc).__name__}: {exc}")
            if not conn.is_closed():
                app = conn.get_settings().application_name
                out.append(f"application_name={app!r}")
        finally:
            self.sink = None
        return "\n".join(out)

    def run(self, items: tuple[Statement, ...]) -> str:
        return self.loop.run_until_complete(self._run(items))

    def close(self) -> None:
        if self.conn is not None and not self.conn.is_closed():
            self.loop.run_until_complete(self.conn.close())


@dataclass
class Clients:
    """The three clients through one pgveil, and the direct one, for one test module."""

    pg: EmbeddedPostgres
    proxy_port: int
    psycopg: PsycopgClient
    asyncpg: AsyncpgClient
    direct: PsycopgClient
    dbname: str = "postgres"

    def run(self, client: str, sql: Statements) -> str:
        items = statements(sql, self.pg.port)
        if client == "psql":
            return run_psql(self.pg, self.proxy_port, items, self.dbname)
        if client == "psycopg":
            return self.psycopg.run(items)
        if client == "asyncpg":
            return self.asyncpg.run(items)
        assert client == "direct"
        return self.direct.run(items)


@contextmanager
def open_clients(
    pg: EmbeddedPostgres,
    proxy_port: int,
    *,
    dbname: str = "postgres",
    reset_sql: tuple[str, ...] = RESET_SQL,
    record_logins: bool = False,
) -> Iterator[Clients]:
    """The clients of a module: through the pgveil at `proxy_port`, and direct, on database
    `dbname`. `reset_sql` runs on the sessions through pgveil before each case (an empty
    tuple keeps them as they are); `record_logins`: see the module docstring."""
    loop = asyncio.new_event_loop()
    on_db = f" dbname={dbname}"  # the last dbname of a conninfo string is the one used
    c = Clients(
        pg=pg,
        proxy_port=proxy_port,
        psycopg=PsycopgClient(
            dsn(pg, proxy_port) + on_db, reset_sql=reset_sql, record_logins=record_logins
        ),
        asyncpg=AsyncpgClient(
            proxy_port, loop, database=dbname, reset_sql=reset_sql, record_logins=record_logins
        ),
        direct=PsycopgClient(
            dsn(pg, pg.port) + on_db,
            reset_sql=("ROLLBACK", "DISCARD ALL", "RESET client_encoding"),
        ),
        dbname=dbname,
    )
    try:
        yield c
    finally:
        c.psycopg.close()
        c.direct.close()
        c.asyncpg.close()
        loop.close()
