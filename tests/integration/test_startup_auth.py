"""Startup parameters read as the server reads them, and nothing before authentication,
against the real server.

For every spelling of a setting, PostgreSQL applies it when connected to directly (the
session's current_user changes, the setting shows), and pgveil refuses a masked login that
uses it, with 42501, through psql, psycopg and asyncpg; unmasked logins keep working with
any options. And the client learns nothing from pgveil before the server has authenticated
it: a wrong password gets the server's answer whatever the database or role, pgveil's
catalog failures reach only authenticated clients (as one generic message; the details go
to pgveil's log), and a masked login's refusal comes after authentication.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import struct
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import asyncpg
import psycopg
import pytest

from proxy.demo.embedded_pg import EmbeddedPostgres
from proxy.session.engine import UNCLASSIFIED
from proxy.wire import messages as m
from proxy.wire.errors import decode_fields
from proxy.wire.startup import StartupMessage, auth_code
from tests.conftest import TRUST_USER
from tests.integration.audit_wire import all_events, start_audited, wait_for
from tests.integration.masking_fixture import NAME, RULES, leaks
from tests.support import ProxyProcess, RawClient, errors_in

MASKED, MASKED_PW = "sa_masked", "sa-masked-pw-1"  # masked (member of cc_staff)
UNMASKED, UNMASKED_PW = "sa_unmasked", "sa-unmasked-pw-1"  # unmasked (rules' default)
TARGET = "sa_target"  # a role both logins may SET ROLE to
CATALOG_USER, CATALOG_PW = "sa_catalog", "sa-catalog-pw-1"  # no CONNECT on NOCATALOG
NOCATALOG = "sa_nocatalog"  # a database pgveil's catalog login cannot read
MASKED_TRUST = "masked_trust"  # trust authentication, member of cc_staff (masked)

ROLE_REFUSED = "pgveil: masked roles may not set role at login"
SESSION_AUTH_REFUSED = "pgveil: masked roles may not set session_authorization at login"


@pytest.fixture(scope="module")
def roles(pg: EmbeddedPostgres, billing: ProxyProcess) -> None:
    pg.psql(
        f"""
        CREATE ROLE {TARGET} NOLOGIN;
        CREATE ROLE {MASKED} LOGIN REPLICATION PASSWORD '{MASKED_PW}' IN ROLE cc_staff, {TARGET};
        CREATE ROLE {UNMASKED} LOGIN PASSWORD '{UNMASKED_PW}' IN ROLE {TARGET};
        CREATE ROLE {CATALOG_USER} LOGIN PASSWORD '{CATALOG_PW}';
        GRANT USAGE ON SCHEMA billing TO {UNMASKED};
        GRANT SELECT ON billing.customers TO {UNMASKED};
        """
    )
    pg.psql(f"CREATE DATABASE {NOCATALOG}")
    pg.psql(
        f"REVOKE CONNECT ON DATABASE {NOCATALOG} FROM PUBLIC;"
        f"GRANT CONNECT ON DATABASE {NOCATALOG} TO {MASKED}, {UNMASKED}"
    )


@pytest.fixture(scope="module")
def nocatalog_proxy(
    pg: EmbeddedPostgres, roles: None, tmp_path_factory: Any
) -> Iterator[ProxyProcess]:
    """pgveil with the masking rules whose catalog login may not connect to NOCATALOG."""
    rules = tmp_path_factory.mktemp("startup-auth") / "rules.yaml"
    rules.write_text(RULES)
    env = {"PGVEIL_TEST_HASH_KEY": "k" * 32, "PGVEIL_CATALOG_PASSWORD": CATALOG_PW}
    with ProxyProcess(
        pg.port, "--upstream-sslmode", "disable", "--rules", str(rules),
        "--catalog-user", CATALOG_USER, metrics=False, env=env,
    ) as p:  # fmt: skip
        yield p
    assert "Traceback" not in p.log(), p.log()


def dsn(port: int, user: str, password: str, dbname: str = "postgres") -> str:
    return (
        f"host=127.0.0.1 port={port} user={user} password={password} dbname={dbname} "
        "sslmode=disable"
    )


def fatal(exc: Exception) -> str:
    """What the server (or pgveil) said, from a libpq connection error."""
    return str(exc).rsplit(" failed: ", 1)[1].strip()


def whoami(port: int, user: str, password: str, options: str) -> tuple[str, str]:
    with psycopg.connect(dsn(port, user, password), options=options) as c:
        row = c.execute("SELECT current_user::text, session_user::text").fetchone()
    assert row is not None
    return row[0], row[1]


def show(port: int, user: str, password: str, options: str, setting: str) -> str:
    with psycopg.connect(dsn(port, user, password), options=options) as c:
        row = c.execute(f"SHOW {setting}").fetchone()
    assert row is not None
    return str(row[0])


def psql(
    pg: EmbeddedPostgres, port: int, user: str, password: str, options: str, sql: str
) -> subprocess.CompletedProcess[str]:
    exe = pg.bindir / "psql"
    env = {**os.environ, "PGPASSWORD": password, "PGOPTIONS": options, "PGSSLMODE": "disable"}
    return subprocess.run(
        [str(exe) if exe.exists() else "psql", "-X", "-At", "-h", "127.0.0.1", "-p", str(port),
         "-U", user, "-d", "postgres", "-c", sql],
        capture_output=True, text=True, env=env, timeout=60,
    )  # fmt: skip


def raw_login(port: int, user: str, **params: str) -> list[tuple[str, bytes]]:
    """A trust login with these startup keys: every message up to ReadyForQuery or a FATAL."""
    c = RawClient(port, user, connect=False)
    try:
        startup = StartupMessage(m.PROTOCOL_3_0, {"user": user, "database": "postgres", **params})
        c.send_raw(startup.encode())
        return c.until_ready()
    finally:
        c.close()


async def asyncpg_connect(port: int, user: str, password: str, **settings: str) -> Any:
    return await asyncpg.connect(
        host="127.0.0.1", port=port, user=user, password=password, database="postgres",
        ssl=False, server_settings=settings,
    )  # fmt: skip


async def refused_everywhere(
    pg: EmbeddedPostgres, proxy: ProxyProcess, user: str, password: str, options: str, text: str
) -> None:
    """Through pgveil the login is refused with `text` (SQLSTATE 42501), with every client."""
    with pytest.raises(psycopg.OperationalError, match=text):
        psycopg.connect(dsn(proxy.port, user, password), options=options)
    got = psql(pg, proxy.port, user, password, options, "SELECT current_user")
    assert got.returncode != 0 and text in got.stderr, got
    with pytest.raises(asyncpg.InsufficientPrivilegeError, match=text) as info:
        await asyncpg_connect(proxy.port, user, password, options=options)
    assert info.value.sqlstate == "42501"


def _rows(messages: list[tuple[str, bytes]]) -> list[bytes]:
    """The first column of each DataRow (text format)."""
    out = []
    for typ, body in messages:
        if typ == "D":
            (length,) = struct.unpack_from("!i", body, 2)
            out.append(body[6 : 6 + length])
    return out


# ---- role -----------------------------------------------------------------------------------

ROLE_OPTIONS = [
    f"-c role={TARGET}",
    rf"-c r\ole={TARGET}",  # the backslash escapes 'o' and is dropped
    rf"-c \r\o\l\e={TARGET}",
    f"-crole={TARGET}",
    f"--role={TARGET}",
    f"-ec role={TARGET}",  # -e (datestyle) and -c in one word, the value in the next
    f"-Ecrole={TARGET}",  # -E is ignored for clients; -c takes the rest of the word
    f"-c ROLE={TARGET}",
    f"--Role={TARGET}",
    f"-c application_name=x -c role={TARGET}",
    f"-W0 -P -c role={TARGET}",
]


@pytest.mark.parametrize("options", ROLE_OPTIONS)
async def test_role_in_the_options(
    pg: EmbeddedPostgres, billing: ProxyProcess, roles: None, options: str
) -> None:
    # directly, the server runs the session as the role
    assert whoami(pg.port, MASKED, MASKED_PW, options) == (TARGET, MASKED)
    await refused_everywhere(pg, billing, MASKED, MASKED_PW, options, ROLE_REFUSED)
    # an unmasked login keeps working with any options, through pgveil too
    assert whoami(billing.port, UNMASKED, UNMASKED_PW, options) == (TARGET, UNMASKED)


@pytest.mark.parametrize("key", ["role", "Role", "ROLE"])
async def test_role_as_a_startup_key(
    pg: EmbeddedPostgres, billing: ProxyProcess, roles: None, key: str
) -> None:
    direct = await asyncpg_connect(pg.port, MASKED, MASKED_PW, **{key: TARGET})
    try:
        assert await direct.fetchval("SELECT current_user::text") == TARGET
    finally:
        await direct.close()
    with pytest.raises(asyncpg.InsufficientPrivilegeError, match=ROLE_REFUSED):
        await asyncpg_connect(billing.port, MASKED, MASKED_PW, **{key: TARGET})
    # a raw client (trust authentication) sends the key as it is
    direct_raw = RawClient(pg.port, MASKED_TRUST, **{key: "cc_staff"})
    try:
        assert _rows(direct_raw.query("SELECT current_user")) == [b"cc_staff"]
    finally:
        direct_raw.close()
    refused = errors_in(raw_login(billing.port, MASKED_TRUST, **{key: "cc_staff"}))
    assert [(e["C"], e["M"]) for e in refused] == [("42501", ROLE_REFUSED)]
    unmasked = await asyncpg_connect(billing.port, UNMASKED, UNMASKED_PW, **{key: TARGET})
    try:
        assert await unmasked.fetchval("SELECT current_user::text") == TARGET
    finally:
        await unmasked.close()


# ---- session_authorization ----------------------------------------------------------------

SESSION_AUTH_OPTIONS = [
    "-c session_authorization={}",
    "-c session-authorization={}",
    "--session-authorization={}",
    "--SESSION_AUTHORIZATION={}",
    r"-c session\_authorization={}",
    "-ecsession_authorization={}",
]


@pytest.mark.parametrize("spelling", SESSION_AUTH_OPTIONS)
async def test_session_authorization_in_the_options(
    pg: EmbeddedPostgres, billing: ProxyProcess, roles: None, spelling: str
) -> None:
    """PostgreSQL 15 reads each spelling as session_authorization (it checks that the role
    exists) but keeps the session's own user: it sets the parameter itself, from a source
    of higher priority, when the login starts. pgveil refuses it all the same: it is an
    attempt to change identity, and what a server ignores today it may apply tomorrow."""
    with pytest.raises(psycopg.OperationalError, match='role "sa_no_such_role" does not exist'):
        psycopg.connect(dsn(pg.port, MASKED, MASKED_PW), options=spelling.format("sa_no_such_role"))
    options = spelling.format(MASKED)
    assert whoami(pg.port, MASKED, MASKED_PW, options) == (MASKED, MASKED)
    await refused_everywhere(pg, billing, MASKED, MASKED_PW, options, SESSION_AUTH_REFUSED)


@pytest.mark.parametrize("key", ["session_authorization", "Session_Authorization"])
async def test_session_authorization_as_a_startup_key(
    pg: EmbeddedPostgres, billing: ProxyProcess, roles: None, key: str
) -> None:
    with pytest.raises(asyncpg.PostgresError, match='role "sa_no_such_role" does not exist'):
        await asyncpg_connect(pg.port, MASKED, MASKED_PW, **{key: "sa_no_such_role"})
    with pytest.raises(asyncpg.InsufficientPrivilegeError, match=SESSION_AUTH_REFUSED):
        await asyncpg_connect(billing.port, MASKED, MASKED_PW, **{key: MASKED})


# ---- what else the startup packet sets -------------------------------------------------------


@pytest.mark.parametrize(
    "options",
    [
        "-c search_path=billing,pg_temp",
        "-c search_path=billing,PG_TEMP",  # unquoted names are read in lower case
        "--search-path=public,pg_temp",
        '-c SEARCH_PATH=public,"pg_temp"',
        r"-c search_path=public,\ pg_temp",
    ],
)
async def test_search_path_with_pg_temp_not_first_still_reads_no_new_relation(
    pg: EmbeddedPostgres, billing: ProxyProcess, roles: None, options: str
) -> None:
    """search_path may put pg_temp last: the analyser pins every unqualified name the
    catalog does not know to pg_temp, so a relation created since pgveil read the catalog
    (named like one of the session's temporary tables) is never what the name denotes."""
    value = options.split("=", 1)[1].replace("\\", "")
    assert show(pg.port, MASKED, MASKED_PW, options, "search_path") == value
    conn = await asyncpg_connect(billing.port, MASKED, MASKED_PW, options=options)
    try:
        await conn.execute("CREATE TEMP TABLE atk_pinned (x int)")
        await conn.execute("INSERT INTO atk_pinned VALUES (1)")
        assert await conn.fetchval("SELECT x FROM atk_pinned") == 1
    finally:
        await conn.close()


async def test_settings_a_masked_session_may_make_at_login(
    billing: ProxyProcess, roles: None
) -> None:
    options = "-c search_path=pg_temp,billing -c work_mem=8MB -e --statement-timeout=5s -fs"
    assert show(billing.port, MASKED, MASKED_PW, options, "search_path") == "pg_temp,billing"
    conn = await asyncpg_connect(billing.port, MASKED, MASKED_PW, search_path="billing")
    try:
        name = await conn.fetchval("SELECT name FROM customers WHERE i_customer = 1")
        assert name != NAME and not leaks(name)
    finally:
        await conn.close()


@pytest.mark.parametrize(
    ("options", "setting", "value", "text"),
    [
        ("-c client_encoding=LATIN1", "client_encoding", "LATIN1", "client_encoding UTF8"),
        ("--client-encoding=LATIN1", "client_encoding", "LATIN1", "client_encoding UTF8"),
        (r"-c CLIENT_ENC\oding=latin1", "client_encoding", "LATIN1", "client_encoding UTF8"),
        (
            "-c standard_conforming_strings=off",
            "standard_conforming_strings", "off", "standard_conforming_strings on",
        ),
        (
            "--Standard-Conforming-Strings=no",
            "standard_conforming_strings", "off", "standard_conforming_strings on",
        ),
    ],
)  # fmt: skip
async def test_reported_settings_are_checked_after_login_whatever_the_spelling(
    pg: EmbeddedPostgres,
    billing: ProxyProcess,
    roles: None,
    options: str,
    setting: str,
    value: str,
    text: str,
) -> None:
    """client_encoding and standard_conforming_strings decide how pgveil reads statements;
    the server reports their value (ParameterStatus), which pgveil checks at login."""
    assert show(pg.port, MASKED, MASKED_PW, options, setting) == value
    with pytest.raises(psycopg.OperationalError, match=text):
        psycopg.connect(dsn(billing.port, MASKED, MASKED_PW), options=options)
    got = psql(pg, billing.port, MASKED, MASKED_PW, options, "SELECT 1")
    assert got.returncode != 0 and text in got.stderr, got
    # as a startup key (a raw client: drivers set client_encoding themselves)
    key = {"client_encoding": "Client_Encoding"}.get(setting, "Standard_Conforming_Strings")
    direct = RawClient(pg.port, MASKED_TRUST, **{key: value})
    try:
        assert _rows(direct.query(f"SHOW {setting}")) == [value.encode()]
    finally:
        direct.close()
    refused = errors_in(raw_login(billing.port, MASKED_TRUST, **{key: value}))
    assert [e["C"] for e in refused] == ["42501"] and text in refused[0]["M"]


def test_replication_refused_for_a_masked_replication_role(
    pg: EmbeddedPostgres, billing: ProxyProcess, roles: None
) -> None:
    for value in ("database", "true", "yes", "on"):
        with psycopg.connect(dsn(pg.port, MASKED, MASKED_PW) + f" replication={value}") as c:
            assert c.pgconn.parameter_status(b"session_authorization") == MASKED.encode()
        with pytest.raises(psycopg.OperationalError, match="replication connections"):
            psycopg.connect(dsn(billing.port, MASKED, MASKED_PW) + f" replication={value}")


# ---- nothing before authentication -----------------------------------------------------------


def scram_exchange(port: int, user: str, password: str, database: str) -> list[tuple[str, bytes]]:
    """A SCRAM-SHA-256 login, byte by byte as a client does it: every message from the
    server after the client's final message (up to ReadyForQuery or a FATAL)."""
    c = RawClient(port, connect=False)
    try:
        c.send_raw(StartupMessage(m.PROTOCOL_3_0, {"user": user, "database": database}).encode())
        typ, body = c.recv_message()
        if typ != "R" or struct.unpack("!I", body[:4])[0] != 10:
            return [(typ, body)]
        nonce = base64.b64encode(os.urandom(18)).decode()
        first_bare = f"n=,r={nonce}"
        first = ("n,," + first_bare).encode()
        c.send("p", b"SCRAM-SHA-256\0" + struct.pack("!i", len(first)) + first)
        typ, body = c.recv_message()
        if typ != "R":
            return [(typ, body)]
        server_first = body[4:].decode()
        attrs = dict(kv.split("=", 1) for kv in server_first.split(","))
        salted = hashlib.pbkdf2_hmac(
            "sha256", password.encode(), base64.b64decode(attrs["s"]), int(attrs["i"])
        )
        client_key = hmac.new(salted, b"Client Key", "sha256").digest()
        without_proof = f"c=biws,r={attrs['r']}"
        auth = f"{first_bare},{server_first},{without_proof}".encode()
        signature = hmac.new(hashlib.sha256(client_key).digest(), auth, "sha256").digest()
        proof = base64.b64encode(bytes(a ^ b for a, b in zip(client_key, signature, strict=True)))
        c.send("p", f"{without_proof},p={proof.decode()}".encode())
        return c.until_ready()
    finally:
        c.close()


def test_a_wrong_password_gets_the_servers_answer_whatever_the_database_or_role(
    pg: EmbeddedPostgres, billing: ProxyProcess, nocatalog_proxy: ProxyProcess
) -> None:
    """Before pgveil asked the server first, an unknown database (or one its catalog login
    cannot read) answered with pgveil's catalog error even to a wrong password: anyone could
    probe which databases exist. Now every client gets the server's own answer, byte for
    byte, and the same for an existing and a missing database."""
    for user in (MASKED, UNMASKED, "sa_no_such_role"):
        answers = set()
        for database in ("postgres", "sa_no_such_db", NOCATALOG):
            for port in (pg.port, billing.port, nocatalog_proxy.port):
                got = scram_exchange(port, user, "wrong-password", database)
                assert [t for t, _ in got] == ["E"], got
                answers.add(got[0][1])
        (answer,) = answers
        fields = decode_fields(answer)
        assert fields["C"] == "28P01" and fields["M"] == (
            f'password authentication failed for user "{user}"'
        )


def test_a_wrong_password_with_other_methods_is_the_servers_answer(
    pg: EmbeddedPostgres, billing: ProxyProcess
) -> None:
    from tests.conftest import CLEAR_USER, MD5_USER

    for user in (MD5_USER, CLEAR_USER):
        answers = set()
        for database in ("postgres", "sa_no_such_db"):
            for port in (pg.port, billing.port):
                with pytest.raises(psycopg.OperationalError) as info:
                    psycopg.connect(dsn(port, user, "wrong-password", database))
                answers.add(fatal(info.value))
        assert answers == {f'FATAL:  password authentication failed for user "{user}"'}


def test_a_missing_database_after_authentication_is_the_servers_answer(
    pg: EmbeddedPostgres, billing: ProxyProcess, roles: None
) -> None:
    answers = set()
    for port in (pg.port, billing.port):
        for user, password in ((MASKED, MASKED_PW), (UNMASKED, UNMASKED_PW)):
            with pytest.raises(psycopg.OperationalError) as info:
                psycopg.connect(dsn(port, user, password, "sa_no_such_db"))
            answers.add(fatal(info.value))
    assert answers == {'FATAL:  database "sa_no_such_db" does not exist'}
    # the server refused the login itself: pgveil never tried to classify it
    tried = [
        line
        for line in billing.log().splitlines()
        if "sa_no_such_db" in line and '"event":"session.end"' not in line
    ]
    assert tried == []


async def test_a_catalog_pgveil_cannot_read_gives_authenticated_clients_one_message(
    pg: EmbeddedPostgres, nocatalog_proxy: ProxyProcess
) -> None:
    for user, password in ((MASKED, MASKED_PW), (UNMASKED, UNMASKED_PW)):
        with pytest.raises(psycopg.OperationalError) as info:
            psycopg.connect(dsn(nocatalog_proxy.port, user, password, NOCATALOG))
        assert fatal(info.value) == f"FATAL:  {UNCLASSIFIED}"
        with pytest.raises(asyncpg.InsufficientPrivilegeError) as refused:
            await asyncpg.connect(
                host="127.0.0.1", port=nocatalog_proxy.port, user=user, password=password,
                database=NOCATALOG, ssl=False,
            )  # fmt: skip
        assert refused.value.sqlstate == "42501" and str(refused.value) == UNCLASSIFIED
    # the reason is in pgveil's log, for the operator
    wait_for(
        lambda: (
            "session.unclassified" in nocatalog_proxy.log()
            and "InsufficientPrivilegeError" in nocatalog_proxy.log()
        ),
        "the reason in pgveil's log",
    )
    line = next(x for x in nocatalog_proxy.log().splitlines() if "session.unclassified" in x)
    assert NOCATALOG in line and "CONNECT" in line, line
    # a database it can read works through the same pgveil
    with psycopg.connect(dsn(nocatalog_proxy.port, MASKED, MASKED_PW)) as c:
        name = c.execute("SELECT name FROM billing.customers WHERE i_customer = 1").fetchone()
    assert name is not None and name[0] != NAME and not leaks(name[0])


def test_a_masked_logins_refusal_comes_after_authentication(
    billing: ProxyProcess, roles: None
) -> None:
    options = f"-c role={TARGET}"
    with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
        psycopg.connect(dsn(billing.port, MASKED, "wrong-password"), options=options)
    # trust authentication: AuthenticationOk, then pgveil's refusal
    got = raw_login(billing.port, MASKED_TRUST, options="-c role=cc_staff")
    assert [t for t, _ in got] == ["R", "E"] and auth_code(got[0][1]) == m.AUTH_OK
    assert [(e["C"], e["M"]) for e in errors_in(got)] == [("42501", ROLE_REFUSED)]


# ---- logins still work -----------------------------------------------------------------------


@pytest.mark.parametrize("client", ["psql", "psycopg", "asyncpg"])
async def test_masked_and_unmasked_logins_work(
    pg: EmbeddedPostgres, billing: ProxyProcess, roles: None, client: str
) -> None:
    sql = "SELECT current_user::text || ':' || name FROM billing.customers WHERE i_customer = 1"
    results = {}
    for user, password in ((MASKED, MASKED_PW), (UNMASKED, UNMASKED_PW)):
        if client == "psql":
            got = psql(pg, billing.port, user, password, "", sql)
            assert got.returncode == 0, got.stderr
            results[user] = got.stdout.strip()
        elif client == "psycopg":
            with psycopg.connect(dsn(billing.port, user, password)) as c:
                row = c.execute(sql).fetchone()
            assert row is not None
            results[user] = row[0]
        else:
            conn = await asyncpg_connect(billing.port, user, password)
            try:
                results[user] = await conn.fetchval(sql)
            finally:
                await conn.close()
    assert results[MASKED].startswith(f"{MASKED}:Z") and not leaks(results[MASKED])
    assert results[UNMASKED] == f"{UNMASKED}:{NAME}"


def test_a_statement_pipelined_behind_the_startup_packet_of_an_unmasked_session(
    pg: EmbeddedPostgres, billing: ProxyProcess
) -> None:
    """Transparency: an unmasked, unaudited session may pipeline a statement behind its
    startup packet (trust authentication); pgveil holds it until the login is classified,
    then relays it. The client gets what it gets directly."""
    answers = []
    for port in (pg.port, billing.port):
        c = RawClient(port, TRUST_USER, connect=False)
        try:
            startup = StartupMessage(m.PROTOCOL_3_0, {"user": TRUST_USER, "database": "postgres"})
            c.send_raw(startup.encode() + m.message(m.QUERY, b"SELECT 40 + 2\0"))
            login = c.until_ready()
            answers.append(([t for t, _ in login][-1], c.until_ready()))
        finally:
            c.close()
    assert answers[0] == answers[1] and answers[0][0] == "Z"
    assert _rows(answers[1][1]) == [b"42"]


def test_session_start_is_recorded_after_authentication_and_classification(
    pg: EmbeddedPostgres, billing: ProxyProcess, roles: None, tmp_path: Path
) -> None:
    with start_audited(pg, tmp_path) as p:
        path = tmp_path / "audit.jsonl"

        def of(app: str) -> list[tuple[str, str, object]]:
            return [
                (e["type"], e["classification"], e.get("outcome"))
                for e in all_events(path)
                if e.get("application_name") == app
            ]

        with pytest.raises(psycopg.OperationalError):
            psycopg.connect(dsn(p.port, MASKED, "wrong-password") + " application_name=sa-wrong")
        with pytest.raises(psycopg.OperationalError, match=ROLE_REFUSED):
            psycopg.connect(
                dsn(p.port, MASKED, MASKED_PW) + " application_name=sa-refused",
                options=f"-c role={TARGET}",
            )
        with psycopg.connect(dsn(p.port, UNMASKED, UNMASKED_PW) + " application_name=sa-ok"):
            pass
        wait_for(lambda: len(of("sa-ok")) == 2 and len(of("sa-refused")) == 2, "the events")
        assert of("sa-ok") == [
            ("session.start", "unmasked", None),
            ("session.end", "unmasked", "client terminated"),
        ]
        assert of("sa-refused") == [
            ("session.start", "masked", None),
            ("session.end", "masked", ROLE_REFUSED),
        ]
        # a login the server did not accept is no session: nothing recorded
        assert of("sa-wrong") == []
