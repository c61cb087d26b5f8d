"""Every pgveil command connects as libpq does: compared with psql on the real server, with
real PG* variables and a real password file in a temporary HOME; then each subcommand that
connects, run as a subprocess with only the environment and the password file to go on.

The role used has a password with a colon, a backslash and a space: the password file
escapes the first two (`\\:`, `\\\\`), the URI percent-encodes all three.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psycopg
import pytest

from proxy.demo.embedded_pg import EmbeddedPostgres, free_port
from shared import dsn
from tests.conftest import Certs
from tests.integration.test_demo import Demo
from tests.support import ProxyProcess

ROOT = Path(__file__).resolve().parents[2]
USER, PASSWORD = "dsn_user", "pa:ss\\wo rd"
PASSFILE_PASSWORD = "pa\\:ss\\\\wo rd"  # as the password file writes it
URI_PASSWORD = "pa%3Ass%5Cwo%20rd"
USER2, PASSWORD2 = "dsn_user2", "second-pw"
DB, OTHER_DB = "dsn_db", "dsn_other"

SQL = (
    "SELECT current_user || ' ' || current_database() || ' ' "
    "|| coalesce(inet_server_port()::text, 'socket') || ' ' "
    "|| coalesce((SELECT ssl::text FROM pg_stat_ssl WHERE pid = pg_backend_pid()), 'false') "
    "|| ' ' || current_setting('application_name') || ' ' || current_setting('search_path')"
)


@dataclass
class Server:
    pg: EmbeddedPostgres
    port: int
    socket_dir: str


@pytest.fixture(scope="module")
def server(pg: EmbeddedPostgres) -> Iterator[Server]:
    pg.psql(
        f"CREATE ROLE {USER} LOGIN PASSWORD E'{PASSWORD.replace(chr(92), chr(92) * 2)}';"
        f"CREATE ROLE {USER2} LOGIN PASSWORD '{PASSWORD2}';"
    )
    pg.psql(f"CREATE DATABASE {DB} OWNER {USER}")
    pg.psql(f"CREATE DATABASE {OTHER_DB} OWNER {USER}")
    pg.psql(
        f"CREATE TABLE people (id int PRIMARY KEY, email text); "
        "INSERT INTO people VALUES (1, 'zebulonq.private@canary-mail.example'), "
        "(2, 'ann@example.org'), (3, 'bob@example.org'); "
        f"ALTER TABLE people OWNER TO {USER}; GRANT SELECT ON people TO {USER2}",
        dbname=DB,
    )
    assert pg.base is not None
    try:
        yield Server(pg, pg.port, str(pg.base))
    finally:
        pg.psql(f"DROP DATABASE {DB} WITH (FORCE)")
        pg.psql(f"DROP DATABASE {OTHER_DB} WITH (FORCE)")
        pg.psql(f"DROP ROLE {USER}; DROP ROLE {USER2}")


@pytest.fixture
def home() -> Iterator[Path]:
    d = Path(tempfile.mkdtemp(prefix="pgveil-home-"))
    yield d
    subprocess.run(["rm", "-rf", str(d)], check=True)


def passfile(path: Path, *lines: str, mode: int = 0o600) -> Path:
    path.write_text("".join(line + "\n" for line in lines))
    os.chmod(path, mode)
    return path


def clean_env(**values: str) -> dict[str, str]:
    """The test process's environment without any PG* variable, plus `values`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    return {**env, **values}


def psql_says(env: dict[str, str], conninfo: str) -> str:
    args = ["psql", *([conninfo] if conninfo else []), "-X", "-At", "-w", "-c", SQL]
    r = subprocess.run(args, env=env, capture_output=True, text=True, timeout=60)
    return r.stdout.strip() if r.returncode == 0 else "error"


def pgveil_says(env: dict[str, str], conninfo: str) -> str:
    async def go() -> str:
        params = dsn.resolve(conninfo, environ=env)
        conn = await dsn.connect(params, fallback_application_name="psql")
        try:
            return str(await conn.fetchval(SQL))
        finally:
            await conn.close()

    try:
        return asyncio.run(go())
    except dsn.ConnectError:
        return "error"


def test_connections_agree_with_psql(server: Server, home: Path, certs: Certs) -> None:
    port, sock = server.port, server.socket_dir
    tcp = {"PGHOST": "127.0.0.1", "PGPORT": str(port)}
    me = {"PGUSER": USER, "PGDATABASE": DB}
    line = f"127.0.0.1:{port}:{DB}:{USER}:{PASSFILE_PASSWORD}"
    services = home / "services.conf"
    services.write_text(
        f"[billing]\nhost=127.0.0.1\nport={port}\ndbname={DB}\nuser={USER}\nsslmode=disable\n"
    )
    elsewhere = home / "elsewhere.pgpass"
    passfile(elsewhere, line)
    cases: list[tuple[str, dict[str, str], str, list[str] | None, str]] = [
        # (what, environment, connection string, password file lines, expected start)
        ("all from the environment", {**tcp, **me, "PGPASSWORD": PASSWORD}, "", None, f"{USER} {DB} {port}"),
        ("the string beats the environment", {**tcp, **me, "PGPASSWORD": PASSWORD}, f"dbname={OTHER_DB}", None, f"{USER} {OTHER_DB}"),
        ("a URI beats the environment", {**tcp, **me, "PGPASSWORD": PASSWORD},
         f"postgresql://{USER2}:{PASSWORD2}@127.0.0.1:{port}/{DB}?sslmode=require", None, f"{USER2} {DB} {port} true"),
        ("a percent-encoded URI password", {}, f"postgresql://{USER}:{URI_PASSWORD}@127.0.0.1:{port}/{DB}", None, f"{USER} {DB}"),
        ("the password file, escaped", {**tcp, **me}, "", [line], f"{USER} {DB} {port}"),
        ("the password file, wildcards", {**tcp, **me}, "", [f"*:*:*:{USER}:{PASSFILE_PASSWORD}"], f"{USER} {DB}"),
        ("the first matching line wins", {**tcp, **me}, "", [f"*:*:{DB}:*:wrong", line], "error"),
        ("no line for this database", {**tcp, **me}, "", [f"*:*:{OTHER_DB}:{USER}:{PASSFILE_PASSWORD}"], "error"),
        ("PGPASSFILE", {**tcp, **me, "PGPASSFILE": str(elsewhere)}, "", None, f"{USER} {DB}"),
        ("passfile= in the string", {**tcp, **me}, f"passfile={elsewhere}", None, f"{USER} {DB}"),
        ("PGPASSWORD beats the password file", {**tcp, **me, "PGPASSWORD": "wrong"}, "", [line], "error"),
        ("a socket directory is not localhost", {**me, "PGHOST": sock, "PGPORT": str(port)}, "",
         [f"localhost:{port}:*:{USER}:{PASSFILE_PASSWORD}"], "error"),
        ("a socket directory by its path", {**me, "PGHOST": sock, "PGPORT": str(port)}, "",
         [f"{sock}:{port}:*:{USER}:{PASSFILE_PASSWORD}"], f"{USER} {DB} socket false"),
        ("a service beats the environment", {**tcp, "PGDATABASE": OTHER_DB, "PGSERVICEFILE": str(services),
         "PGSERVICE": "billing", "PGPASSWORD": PASSWORD}, "", None, f"{USER} {DB} {port} false"),
        ("the string beats the service", {"PGSERVICEFILE": str(services), "PGPASSWORD": PASSWORD},
         f"service=billing dbname={OTHER_DB}", None, f"{USER} {OTHER_DB}"),
        ("PGAPPNAME and PGOPTIONS", {**tcp, **me, "PGPASSWORD": PASSWORD, "PGAPPNAME": "from-env",
         "PGOPTIONS": "-c search_path=from_env"}, "", None, f"{USER} {DB} {port} true from-env from_env"),
        ("PGREQUIRESSL", {**tcp, **me, "PGPASSWORD": PASSWORD, "PGREQUIRESSL": "1"}, "", None, f"{USER} {DB} {port} true"),
        ("PGSSLMODE=disable", {**tcp, **me, "PGPASSWORD": PASSWORD, "PGSSLMODE": "disable"}, "", None, f"{USER} {DB} {port} false"),
        ("verify-full with PGSSLROOTCERT", {**me, "PGHOST": "localhost", "PGPORT": str(port), "PGPASSWORD": PASSWORD,
         "PGSSLMODE": "verify-full", "PGSSLROOTCERT": str(certs.ca)}, "", None, f"{USER} {DB} {port} true"),
        ("the next host when one is down", {**me, "PGPASSWORD": PASSWORD},
         f"host=127.0.0.1,127.0.0.1 port={free_port()},{port}", None, f"{USER} {DB} {port}"),
        ("no password anywhere", {**tcp, **me}, "", None, "error"),
        ("the OS user and a database named after it", {**tcp, "PGPASSWORD": PASSWORD}, "", None, "error"),
    ]  # fmt: skip
    pgpass = home / ".pgpass"
    for what, extra, conninfo, lines, expected in cases:
        pgpass.unlink(missing_ok=True)
        if lines is not None:
            passfile(pgpass, *lines)
        env = clean_env(HOME=str(home), **extra)
        theirs = psql_says(env, conninfo)
        ours = pgveil_says(env, conninfo)
        assert ours == theirs, (what, ours, theirs)
        assert theirs.startswith(expected), (what, theirs)


def test_a_password_file_others_may_read_is_ignored(server: Server, home: Path) -> None:
    passfile(home / ".pgpass", f"*:*:*:{USER}:{PASSFILE_PASSWORD}", mode=0o644)
    env = clean_env(HOME=str(home), PGHOST="127.0.0.1", PGPORT=str(server.port), PGUSER=USER)
    r = subprocess.run(
        ["psql", "-X", "-w", "-c", "SELECT 1", DB], env=env, capture_output=True, text=True
    )
    assert r.returncode != 0 and "has group or world access" in r.stderr
    assert pgveil_says(env, f"dbname={DB}") == "error"


# -- each subcommand, as a subprocess, with only the environment and the password file ------


def cli(*args: str, env: dict[str, str], timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "proxy.cli", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def user_env(server: Server, home: Path, **extra: str) -> dict[str, str]:
    """PGHOST, PGPORT, PGUSER, PGDATABASE and a password file in HOME: what psql needs."""
    passfile(home / ".pgpass", f"127.0.0.1:{server.port}:*:{USER}:{PASSFILE_PASSWORD}")
    return clean_env(
        HOME=str(home),
        PGHOST="127.0.0.1",
        PGPORT=str(server.port),
        PGUSER=USER,
        PGDATABASE=DB,
        **extra,
    )


def test_rules_suggest_and_check_from_the_environment(server: Server, home: Path) -> None:
    env = user_env(server, home)
    r = cli("rules", "suggest", env=env)
    assert r.returncode == 0, r.stderr
    assert "public.people:" in r.stdout and "email: email" in r.stdout
    assert "canary" not in r.stdout and "example.org" not in r.stdout
    rules = home / "draft.yaml"
    rules.write_text(r.stdout)
    r = cli("rules", "check", "--rules", str(rules), "--dsn", env=env)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "0 error(s)" in r.stdout and f"(database {DB})" in r.stdout
    # a part of the connection string beats the environment
    r = cli("rules", "check", "--rules", str(rules), "--dsn", f"dbname={OTHER_DB}", env=env)
    assert f"(database {OTHER_DB})" in r.stdout, r.stdout + r.stderr
    # without --dsn: the file alone, no connection
    r = cli("rules", "check", "--rules", str(rules), env=env)
    assert r.returncode == 0 and "give --dsn" in r.stdout


def test_connection_errors_are_one_line_without_the_password(server: Server, home: Path) -> None:
    env = user_env(server, home)
    passfile(home / ".pgpass", f"*:*:*:{USER}:wrong-secret-pw")
    r = cli("rules", "suggest", env=env)
    assert r.returncode == 2, r.stdout + r.stderr
    assert r.stderr.startswith("pgveil: error: cannot read the database: cannot connect to ")
    assert f'the password came from the password file "{home / ".pgpass"}"' in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and "wrong-secret" not in r.stderr
    r = cli("rules", "suggest", "--dsn", "password=wrong-secret-pw port=notaport", env=env)
    assert r.returncode == 2 and "invalid port number" in r.stderr
    assert "wrong-secret" not in r.stderr
    r = cli("rules", "suggest", "--dsn", "hostaddr=127.0.0.1", env=env)
    assert r.returncode == 2 and "hostaddr" in r.stderr and "not supported" in r.stderr
    r = cli("audit", "verify", "--dsn", "sslmode=sometimes", env=env)
    assert r.returncode == 2 and 'invalid sslmode value: "sometimes"' in r.stderr


RULES = f"""
databases: [{DB}]
roles: {{masked: [{USER2}], unmasked: [{USER}], default: unmasked}}
tables:
  public.people:
    subject: id
    columns: {{email: email}}
"""


class Proxy(ProxyProcess):
    """`pgveil proxy` with exactly the arguments and environment given (no --upstream
    unless given)."""

    def __init__(self, args: list[str], env: dict[str, str]) -> None:
        super().__init__(None, *args, metrics=False, env=env, inherit_env=False)

    def emails(self) -> list[str]:
        conninfo = f"host=127.0.0.1 port={self.port} user={USER2} password={PASSWORD2} dbname={DB} sslmode=disable"
        with psycopg.connect(conninfo) as conn:
            return [r[0] for r in conn.execute("SELECT email FROM people ORDER BY id")]


def test_proxy_upstream_and_catalog_login_from_the_environment(server: Server, home: Path) -> None:
    rules = home / "rules.yaml"
    rules.write_text(RULES)
    # no --upstream, no catalog password: PGHOST, PGPORT, PGUSER and the password file
    env = user_env(server, home, PGSSLMODE="disable")
    p = Proxy(["--rules", str(rules), "--audit-table-dsn", f"dbname={DB}"], env)
    try:
        assert p.emails()[0] == "z" + "*" * 15 + "@canary-mail.example"
    finally:
        p.stop()
    log = p.log()
    assert f"127.0.0.1:{server.port}" in log and "Traceback" not in log
    assert PASSWORD not in log and PASSFILE_PASSWORD not in log
    # the table sink, created through the same environment, is read the same way
    r = cli(
        "audit", "who", "--dsn", "--table", "public.people", "--subject", "1", "--json", env=env
    )
    assert r.returncode == 0, r.stderr
    assert USER2 in {row["role"] for row in map(json.loads, r.stdout.splitlines())}, r.stdout


def test_proxy_upstream_as_a_connection_string_over_the_socket(server: Server, home: Path) -> None:
    rules = home / "rules.yaml"
    rules.write_text(RULES)
    pgfile = passfile(
        home / "secrets", f"{server.socket_dir}:{server.port}:*:{USER}:{PASSFILE_PASSWORD}"
    )
    env = clean_env(HOME=str(home), PGPASSFILE=str(pgfile))
    upstream = f"host={server.socket_dir} port={server.port} user={USER} application_name=cat"
    p = Proxy(["--rules", str(rules), "--upstream", upstream], env)
    try:
        assert p.emails()[0] == "z" + "*" * 15 + "@canary-mail.example"
        with psycopg.connect(
            f"host=127.0.0.1 port={p.port} user={USER} password='{PASSWORD.replace(chr(92), chr(92) * 2)}' "
            f"dbname={DB} sslmode=disable"
        ) as conn:
            # the session reached the server through its socket
            assert conn.execute("SELECT inet_server_port()").fetchone() == (None,)
    finally:
        p.stop()
    assert "Traceback" not in p.log() and PASSFILE_PASSWORD not in p.log()


def test_demo_and_erase_from_the_environment(home: Path) -> None:
    """`pgveil demo --dsn` with nothing but PG* variables and a password file; the erase
    command it prints has no password and works with the same environment."""
    pg = EmbeddedPostgres().start()
    try:
        passfile(home / ".pgpass", f"127.0.0.1:{pg.port}:*:{pg.superuser}:{pg.password}")
        env = clean_env(
            HOME=str(home), PGHOST="127.0.0.1", PGPORT=str(pg.port), PGUSER=pg.superuser,
            PGDATABASE="postgres", PGSSLMODE="disable",
        )  # fmt: skip
        d = Demo("--dsn", "--scale", "0.001", env=env)
        try:
            out = d.ready()
            printed = re.search(
                r'^    pgveil erase run --once --config (\S+) --dsn "([^"]*)"$', out, re.M
            )
            assert printed, out
            assert pg.password not in out + d.stderr()
            r = cli("erase", "run", "--once", "--config", printed.group(1), "--dsn",
                    printed.group(2), env=env)  # fmt: skip
            assert r.returncode == 0, r.stdout + r.stderr
            r = cli("erase", "status", "--config", printed.group(1), env=env)
            assert r.returncode == 0, r.stdout + r.stderr
            assert d.interrupt() == 0, d.stderr()
        finally:
            d.close()
    finally:
        pg.cleanup()
