"""`pgveil demo`: a billing database full of fake personal data, masking rules, and pgveil
in front of it, in one command.

Starts an embedded PostgreSQL in a temporary directory (or uses `--dsn`), creates the
`billing` schema of `proxy.demo.billing` with its generated data, the roles `admin` (unmasked),
`helpdesk` (masked) and `pgveil` (catalog reader), writes the demo rules, and runs the proxy
in this process exactly as `pgveil proxy` would (same `ProxyServer`), with metrics and an
audit file. It prints ready-to-paste `psql` commands and waits; SIGINT or SIGTERM stops the
proxy and removes everything the demo created, unless `--keep`.

It never touches a schema or role it did not create: an existing `billing` schema or demo
role name without the demo's marker comment is an error, never overwritten or dropped. It
prints only its own words, counts and the demo's throwaway passwords, never row values; the
proxy's logs go to a file in the demo's directory.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import os
import secrets
import shutil
import signal
import socket
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO
from urllib.parse import quote

import asyncpg

from proxy.config import ConfigError, load_config
from proxy.demo import billing as data
from proxy.demo.embedded_pg import EmbeddedPostgres, EmbeddedPostgresError, find_bindir, free_port
from rules.loader import RulesError, load_rules
from shared import dsn, logs
from shared.address import HostPort, parse_host_port

DEMO_DATABASE = "pgveil_demo"
DEFAULT_LISTEN = HostPort("127.0.0.1", 6432)
DEFAULT_METRICS = HostPort("127.0.0.1", 7432)
SHUTDOWN_TIMEOUT = 3.0


class DemoError(Exception):
    """The demo cannot run; the message says why and what to do."""


@dataclass(frozen=True)
class Target:
    """The PostgreSQL server and database that hold the demo's schema: connection
    parameters resolved as libpq would (shared.dsn)."""

    params: dsn.Params

    @property
    def host(self) -> str:
        return self.params.hosts[0]

    @property
    def port(self) -> int:
        return self.params.ports[0]

    @property
    def user(self) -> str:
        return self.params.user

    @property
    def password(self) -> str | None:
        return self.params.password

    @property
    def database(self) -> str:
        return self.params.dbname

    @property
    def sslmode(self) -> str:
        return self.params.get("sslmode")


def parse_dsn(text: str) -> Target:
    """A libpq connection string or URI, completed from the PG* environment and the
    password file as psql would (shared.dsn); one server (the demo's proxy forwards to it,
    over TCP or its Unix socket)."""
    try:
        params = dsn.resolve(text)
        if len(params.hosts) > 1:
            raise dsn.DsnError("the demo uses one server: give one host")
    except dsn.DsnError as exc:
        raise ConfigError(f"--dsn: {exc}") from exc
    return Target(params)


def _port_free(hp: HostPort) -> bool:
    with socket.socket(socket.AF_INET6 if ":" in hp.host else socket.AF_INET) as s:
        try:
            s.bind((hp.host, hp.port))
        except OSError:
            return False
    return True


def choose_address(given: str | None, default: HostPort, flag: str) -> HostPort:
    if given is not None:
        try:
            return parse_host_port(given)
        except ValueError as exc:
            raise ConfigError(f"{flag}: {exc}") from exc
    return default if _port_free(default) else HostPort(default.host, free_port(default.host))


class Progress:
    """A progress bar on a terminal (one line per stage otherwise, e.g. in a log)."""

    WIDTH = 30

    def __init__(self, total: float, stream: TextIO) -> None:
        self.total = max(total, 1e-9)
        self.done = 0.0
        self.stream = stream
        self.tty = stream.isatty()
        self.label = ""

    def advance(self, weight: float, label: str) -> None:
        if self.tty:
            self._bar(label)
        elif label != self.label:
            self.stream.write(f"pgveil demo: loading {label}\n")
            self.stream.flush()
        self.label = label
        self.done += weight

    def _bar(self, label: str) -> None:
        share = min(1.0, self.done / self.total)
        filled = int(share * self.WIDTH)
        bar = "#" * filled + " " * (self.WIDTH - filled)
        self.stream.write(f"\r[{bar}] {share:4.0%} {label:<20}")
        self.stream.flush()

    def finish(self) -> None:
        self.done = self.total
        if self.tty:
            self._bar("done")
            self.stream.write("\n")
            self.stream.flush()


async def _connect(target: Target) -> Any:
    try:
        return await dsn.connect(target.params, fallback_application_name="pgveil-demo", timeout=10)
    except (dsn.ConnectError, dsn.DsnError) as exc:
        raise DemoError(str(exc)) from exc


async def _schema_state(conn: Any) -> str:
    """'absent', 'demo' (created by pgveil demo) or 'foreign'."""
    comment = await conn.fetchrow(
        "SELECT pg_catalog.obj_description(oid, 'pg_namespace') AS c "
        "FROM pg_catalog.pg_namespace WHERE nspname = $1",
        data.SCHEMA,
    )
    if comment is None:
        return "absent"
    return "demo" if comment["c"] == data.MARKER else "foreign"


async def _check_roles(conn: Any) -> None:
    rows = await conn.fetch(
        "SELECT rolname, pg_catalog.shobj_description(oid, 'pg_authid') AS c "
        "FROM pg_catalog.pg_roles WHERE rolname = ANY($1::text[])",
        list(data.DEMO_ROLES),
    )
    foreign = sorted(r["rolname"] for r in rows if r["c"] != data.MARKER)
    if foreign:
        raise DemoError(
            f"role(s) {', '.join(foreign)} already exist and were not created by pgveil demo; "
            "the demo never changes them: use another server or database cluster"
        )
    can = await conn.fetchrow(
        "SELECT rolsuper OR rolcreaterole AS roles, "
        "pg_catalog.has_database_privilege(pg_catalog.current_database(), 'CREATE') AS schema "
        "FROM pg_catalog.pg_roles WHERE rolname = current_user"
    )
    if not can["roles"] or not can["schema"]:
        raise DemoError(
            "the --dsn user needs CREATEROLE (for the demo's roles) and CREATE on the database "
            "(for the billing schema); a superuser has both"
        )


@dataclass
class Demo:
    """One run: what it created, so that it can remove exactly that."""

    scale: float
    dsn: str | None
    keep: bool
    reuse: bool
    listen: HostPort
    metrics: HostPort
    out: TextIO = field(default_factory=lambda: sys.stdout)
    err: TextIO = field(default_factory=lambda: sys.stderr)
    workdir: Path | None = None
    cluster: EmbeddedPostgres | None = None
    target: Target | None = None
    loaded: bool = False  # the billing schema is ours (created now or reused)
    passwords: dict[str, str] = field(default_factory=dict)

    def say(self, text: str) -> None:
        self.err.write(f"pgveil demo: {text}\n")
        self.err.flush()

    # -- database ------------------------------------------------------------------------

    def start_cluster(self) -> Target:
        assert self.workdir is not None
        password = secrets.token_hex(12)
        self.say("starting PostgreSQL (initdb into the demo's directory)")
        self.cluster = EmbeddedPostgres(password=password, base=self.workdir / "pg").start()
        self.cluster.psql(f"CREATE DATABASE {DEMO_DATABASE}")
        options = {
            "host": self.cluster.host,
            "port": str(self.cluster.port),
            "user": self.cluster.superuser,
            "password": password,
            "dbname": DEMO_DATABASE,
            "sslmode": "disable",
        }
        # the demo's own server: nothing of the PG* environment applies to it
        return Target(dsn.resolve("", options, environ={"HOME": str(self.workdir)}))

    async def prepare(self, target: Target) -> int:
        """Schema, data and roles; answers how many customers are due for erasure."""
        conn = await _connect(target)
        try:
            state = await _schema_state(conn)
            if state == "foreign":
                raise DemoError(
                    f"schema {data.SCHEMA} already exists in database {target.database} and was "
                    "not created by pgveil demo; the demo never touches it: use another database"
                )
            if state == "demo" and not self.reuse:
                raise DemoError(
                    f"schema {data.SCHEMA} in database {target.database} was left by an earlier "
                    "`pgveil demo --keep`: add --reuse to run on it, or drop it"
                )
            await _check_roles(conn)
            self.passwords = {r: secrets.token_hex(8) for r in data.DEMO_ROLES}
            await conn.execute("SET synchronous_commit = off")
            async with conn.transaction():
                # one transaction: an interrupted or failed load leaves nothing behind
                if state == "absent":
                    await self._load(conn)
                await data.create_roles(conn, self.passwords)
            self.loaded = True
            return int(await conn.fetchval(data.DUE_SQL))
        finally:
            await conn.close()

    async def _load(self, conn: Any) -> None:
        counts = data.Counts.at_scale(self.scale)
        now = dt.datetime.now(dt.UTC).replace(microsecond=0)
        self.say(
            f"loading {counts.customers:,} customers, {counts.accounts:,} accounts and "
            f"{counts.xdrs:,} xDRs (--scale {self.scale:g})"
        )
        started = time.monotonic()
        progress = Progress(data.total_weight(counts), self.err)
        await data.load(conn, counts, now, progress.advance)
        progress.finish()
        self.say(f"loaded in {time.monotonic() - started:.1f} s")

    async def remove_schema(self, target: Target) -> None:
        """Drop the demo's schema and roles from a --dsn database (only if they are ours)."""
        conn = await _connect(target)
        try:
            if await _schema_state(conn) == "demo":
                await conn.execute(f"DROP SCHEMA {data.SCHEMA} CASCADE")
            for role in data.DEMO_ROLES:
                comment = await conn.fetchval(
                    "SELECT pg_catalog.shobj_description(oid, 'pg_authid') "
                    "FROM pg_catalog.pg_roles WHERE rolname = $1",
                    role,
                )
                if comment == data.MARKER:
                    try:
                        await conn.execute(f"DROP ROLE {role}")
                    except asyncpg.PostgresError as exc:
                        self.say(f"could not drop role {role}: {exc.sqlstate}; drop it by hand")
        finally:
            await conn.close()

    # -- proxy ---------------------------------------------------------------------------

    def write_rules(self) -> Path:
        assert self.workdir is not None
        key = self.workdir / "hash.key"
        key.touch(mode=0o600)
        key.write_text(secrets.token_hex(32) + "\n")
        rules = self.workdir / "rules.yaml"
        rules.write_text(data.rules_yaml(str(key)))
        erasure = self.workdir / "erasure.yaml"
        erasure.write_text(data.erasure_yaml(str(self.workdir / "erasure-audit.jsonl")))
        return rules

    async def serve(self, target: Target, rules: Path, due: int) -> None:
        from proxy.server import ProxyServer

        assert self.workdir is not None
        audit = self.workdir / "audit.jsonl"
        log_path = self.workdir / "pgveil.log"
        config = load_config(
            {
                "listen": str(self.listen),
                "upstream": f"{target.host}:{target.port}",
                "upstream_sslrootcert": target.params.get("sslrootcert") or None,
                "metrics": str(self.metrics),
                "rules": str(rules),
                "catalog_user": data.CATALOG_ROLE,
                "catalog_password": self.passwords[data.CATALOG_ROLE],
                "audit_file": str(audit),
                "upstream_sslmode": target.sslmode,
                "shutdown_timeout": str(SHUTDOWN_TIMEOUT),
            },
            environ={},  # the demo is the same wherever it runs: no PGVEIL_* from outside
        )
        try:
            policy = load_rules(rules)
        except RulesError as exc:  # pragma: no cover - the demo writes valid rules
            raise DemoError(str(exc)) from exc
        with log_path.open("a") as log_file:
            logs.configure(config.log_format, config.log_level, stream=log_file)
            server = ProxyServer(config, policy)
            await server.start()
            loop = asyncio.get_running_loop()
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.add_signal_handler(sig, server.request_shutdown, sig.name)
            try:
                self.print_guide(target, rules, audit, log_path, due)
                await server.wait_stopped()
            finally:
                # the file closes with this block: anything logged later goes to stderr
                logs.configure(config.log_format, "error")
            self.say("proxy stopped")

    def print_guide(self, target: Target, rules: Path, audit: Path, log: Path, due: int) -> None:
        host = self.listen.host if self.listen.host not in ("0.0.0.0", "::") else "127.0.0.1"
        where = f"[{host}]" if ":" in host else host
        psql = _psql()

        def uri(role: str, password: str, hostport: str, db: str) -> str:
            return f"postgresql://{quote(role)}:{quote(password, safe='')}@{hostport}/{quote(db)}"

        proxy_at = f"{where}:{self.listen.port}"
        metrics_host = self.metrics.host if self.metrics.host not in ("0.0.0.0", "::") else host
        lines = [
            "",
            "pgveil demo is ready. Connect through pgveil:",
            "",
            f"  unmasked ({data.ADMIN_ROLE}):",
            f'    {psql} "'
            + uri(data.ADMIN_ROLE, self.passwords[data.ADMIN_ROLE], proxy_at, target.database)
            + '"',
            f"  masked ({data.HELPDESK_ROLE}):",
            f'    {psql} "'
            + uri(data.HELPDESK_ROLE, self.passwords[data.HELPDESK_ROLE], proxy_at, target.database)
            + '"',
            "",
            "  and try, as both:",
            "    SELECT name, email, phone FROM billing.customers ORDER BY i_customer LIMIT 3;",
            "    SELECT * FROM billing.customer_overview LIMIT 3;",
            "    SELECT i_customer, password_hash FROM billing.selfcare_credentials"
            " WHERE i_customer = 1;"
            "  -- helpdesk: NULL (deny)",
            "    SELECT query_to_xml('SELECT * FROM billing.customers', true, true, '');"
            "  -- helpdesk: refused",
            "",
            f"  audit stream:  {audit}",
            f"                 (pgveil audit tail {audit} --follow)",
            f"  metrics:       http://{metrics_host}:{self.metrics.port}/metrics",
            f"  rules:         {rules}",
            f"  proxy log:     {log}",
        ]
        if self.cluster is not None:
            lines.append(
                f'  PostgreSQL itself (superuser, bypasses pgveil): {psql} "'
                + uri(
                    self.cluster.superuser,
                    self.cluster.password,
                    f"{self.cluster.host}:{self.cluster.port}",
                    target.database,
                )
                + '"'
            )
        if self.cluster is not None:
            direct = uri(
                self.cluster.superuser,
                self.cluster.password,
                f"{self.cluster.host}:{self.cluster.port}",
                target.database,
            )
        else:
            # the connection string as given, without a password: erase reads it, as the
            # demo did, from PGPASSWORD or the password file (or type it in again)
            direct = dsn.without_password(self.dsn or "")
        assert self.workdir is not None
        lines += [
            f"  erasure:       {due} terminated customer(s) are past their class's retention;",
            "                 erase them (directly in PostgreSQL, not through pgveil) with:",
            f"    pgveil erase run --once --config {self.workdir / 'erasure.yaml'} "
            f'--dsn "{direct}"',
            f"  erasure audit: {self.workdir / 'erasure-audit.jsonl'}",
            "",
            "Press Ctrl-C to stop: "
            + ("everything is kept (--keep)." if self.keep else "everything above is removed."),
        ]
        self.out.write("\n".join(lines) + "\n")
        self.out.flush()

    # -- lifecycle -----------------------------------------------------------------------

    async def main(self) -> None:
        loop = asyncio.get_running_loop()
        task = asyncio.current_task()
        assert task is not None
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, task.cancel)  # until the proxy takes them over
        self.workdir = Path(tempfile.mkdtemp(prefix="pgveil-demo-"))
        try:
            target = parse_dsn(self.dsn) if self.dsn is not None else self.start_cluster()
            self.target = target
            due = await self.prepare(target)
            rules = self.write_rules()
            await self.serve(target, rules, due)
        except asyncio.CancelledError:
            self.say("interrupted")
        finally:
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.add_signal_handler(sig, self.say, "stopping, please wait")
            await self.cleanup()

    async def cleanup(self) -> None:
        if self.keep:
            if self.cluster is not None:
                self.cluster.stop("fast")
            self.say(f"kept {self.workdir}" + self._restart_hint())
            return
        if self.dsn is not None and self.target is not None and self.loaded:
            try:
                await self.remove_schema(self.target)
            except DemoError as exc:
                self.say(f"could not remove the demo schema: {exc}")
        if self.cluster is not None:
            self.cluster.cleanup()
        if self.workdir is not None:
            shutil.rmtree(self.workdir, ignore_errors=True)
            self.say(f"removed {self.workdir}")

    def _restart_hint(self) -> str:
        if self.cluster is not None and self.cluster.base is not None:
            run_as = "runuser -u postgres -- " if os.geteuid() == 0 else ""
            pg_ctl = self.cluster.bindir / "pg_ctl"
            return (
                f"; start its PostgreSQL again with: {run_as}{pg_ctl} -D {self.cluster.datadir} "
                f"-l {self.cluster.datadir / 'server.log'} start"
            )
        if self.dsn is not None and self.loaded:
            return f" and schema {data.SCHEMA}: run again with --reuse"
        return ""


def _psql() -> str:
    """psql on the PATH, else the one beside the server binaries (pgserver ships one)."""
    if shutil.which("psql"):
        return "psql"
    with contextlib.suppress(EmbeddedPostgresError):
        candidate = find_bindir() / "psql"
        if candidate.is_file():
            return str(candidate)
    return "psql"
