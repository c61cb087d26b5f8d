"""A setting the session guard pins may be set to the value it already has.

Masked sessions must keep `client_encoding` UTF8 and `standard_conforming_strings` on (pgveil
reads their statements so) and `backslash_quote` as pgveil's parser reads it. A SET, SET
LOCAL, RESET or `set_config` whose value is, as the server reads it, the required one
changes nothing, and real clients send them: libpq's `PQsetClientEncoding` (psql's
`\\encoding UTF8`) sends `set client_encoding to 'UTF8'`, drivers send
`SET standard_conforming_strings = on`. These run, through psql, psycopg (simple protocol)
and asyncpg (extended protocol), the server reports no change (no ParameterStatus, the
session goes on under UTF8 and on), and the audit of what follows is complete. Any other
value stays refused with the guard's reason.
"""

from __future__ import annotations

import asyncio
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import asyncpg
import psycopg
import pytest

from proxy.demo.embedded_pg import EmbeddedPostgres
from proxy.wire import messages as m
from proxy.wire.errors import decode_fields
from proxy.wire.startup import StartupMessage
from tests.conftest import TRUST_USER
from tests.integration.audit_wire import (
    SYNC,
    audited_proxy,
    bind,
    events,
    execute,
    parse,
    read_until,
    wait_for,
)
from tests.integration.masking_fixture import HELPDESK, HELPDESK_PW, NAME, dsn, leaks
from tests.support import ProxyProcess, RawClient, errors_in

MASKED_TRUST = "masked_trust"  # trust authentication, masked (member of cc_staff)
# the masked name of customer 1 (partial: first and last symbol)
MASKED_NAME = NAME[0] + "*" * (len(NAME) - 2) + NAME[-1]
READ = "SELECT name FROM billing.customers WHERE i_customer = 1"

# each leaves the setting at the value the guard requires
UNCHANGED = [
    "set client_encoding to 'UTF8'",  # libpq's PQsetClientEncoding, psql's \encoding UTF8
    "SET client_encoding = 'utf8'",
    "SET client_encoding TO 'UTF-8'",
    "SET client_encoding TO unicode",
    "SET client_encoding TO 'Unicode'",
    "SET NAMES 'UTF8'",
    "SET SESSION client_encoding TO 'UTF8'",
    "SET client_encoding TO DEFAULT",  # the login's value, which the session checked
    "RESET client_encoding",
    "SET NAMES",  # (DEFAULT)
    "SET client_encoding FROM CURRENT",
    "SET standard_conforming_strings = on",
    "SET standard_conforming_strings = true",
    "SET standard_conforming_strings = 'on'",
    "SET standard_conforming_strings = 1",
    "SET standard_conforming_strings = yes",
    "SET standard_conforming_strings TO 'ON'",
    "SET standard_conforming_strings = 't'",  # parse_bool: a prefix of true
    "SET SESSION standard_conforming_strings = on",
    "RESET standard_conforming_strings",
    "SET backslash_quote = safe_encoding",
    "SET backslash_quote = 'SAFE_ENCODING'",
    "BEGIN; SET LOCAL client_encoding TO 'UTF8'; SET LOCAL standard_conforming_strings = on; "
    "COMMIT",
    "SELECT set_config('client_encoding', 'UTF8', false)",
    "SELECT pg_catalog.set_config('client_encoding', 'utf-8', true)",
    "SELECT set_config('standard_conforming_strings', 'on', false)",
    "SELECT set_config('Standard_Conforming_Strings', 'true', true)",
    "SELECT set_config('standard_conforming_strings', NULL, false)",  # (RESET)
]
# each would change a pinned setting (or cannot be told not to): refused, naming it
CHANGED = [
    ("SET client_encoding TO 'LATIN1'", "client_encoding"),
    ("SET NAMES 'SJIS'", "client_encoding"),
    ("SET client_encoding TO 'UTF16'", "client_encoding"),  # no such client encoding
    ("SET SESSION client_encoding = 'utf8', 'latin1'", "client_encoding"),
    ("SET standard_conforming_strings = off", "standard_conforming_strings"),
    ("SET standard_conforming_strings = 'of'", "standard_conforming_strings"),
    ("SET LOCAL standard_conforming_strings = 0", "standard_conforming_strings"),
    ("SET standard_conforming_strings = 'on '", "standard_conforming_strings"),
    ("SET backslash_quote = on", "backslash_quote"),
    ("RESET backslash_quote", "backslash_quote"),  # a role's setting may make it anything
    ("SELECT set_config('client_encoding', 'LATIN1', false)", "client_encoding"),
    (
        "SELECT set_config('standard_conforming_strings', 'off', true)",
        "standard_conforming_strings",
    ),
    (
        "SELECT set_config('standard_conforming_strings', lower('ON'), false)",
        "standard_conforming_strings",
    ),
    ("SELECT set_config('client_encoding', 'UTF8'::text, false)", "client_encoding"),
    ("SELECT 1; SET client_encoding TO 'UTF8'; SET NAMES 'LATIN1'", "client_encoding"),
]


def _settings_psycopg(c: psycopg.Connection[Any]) -> tuple[str, str, str]:
    row = c.execute(
        "SELECT current_setting('client_encoding'), current_setting('standard_conforming_strings'),"
        " current_setting('backslash_quote')"
    ).fetchone()
    assert row is not None
    return row[0], row[1], row[2]


@pytest.mark.parametrize("sql", UNCHANGED)
def test_psycopg_may_set_the_required_value(
    pg: EmbeddedPostgres, billing: ProxyProcess, sql: str
) -> None:
    with psycopg.connect(dsn(pg, billing.port), autocommit=True) as c:
        c.execute(sql)
        assert c.info.parameter_status("client_encoding") == "UTF8"
        assert c.info.parameter_status("standard_conforming_strings") == "on"
        assert _settings_psycopg(c) == ("UTF8", "on", "safe_encoding")
        assert c.execute(READ).fetchone() == (MASKED_NAME,)


@pytest.mark.parametrize("sql", UNCHANGED)
def test_asyncpg_may_set_the_required_value(
    pg: EmbeddedPostgres, billing: ProxyProcess, sql: str
) -> None:
    async def run() -> tuple[Any, ...]:
        c = await asyncpg.connect(
            host="127.0.0.1", port=billing.port, user=HELPDESK, password=HELPDESK_PW,
            database="postgres", ssl=False, server_settings={"client_encoding": "UTF8"},
        )  # fmt: skip
        try:
            if ";" in sql:
                await c.execute(sql)  # several statements: the simple protocol
            else:
                await c.fetch(sql)  # the extended protocol (Parse, Bind, Execute)
            settings = c.get_settings()
            row = await c.fetchrow(READ)
            shown = await c.fetchrow(
                "SELECT current_setting('client_encoding'), "
                "current_setting('standard_conforming_strings')"
            )
            assert row is not None and shown is not None
            return settings.client_encoding, settings.standard_conforming_strings, row[0], *shown
        finally:
            await c.close()

    assert asyncio.run(run()) == ("UTF8", "on", MASKED_NAME, "UTF8", "on")


@pytest.mark.parametrize(("sql", "setting"), CHANGED)
def test_any_other_value_stays_refused(
    pg: EmbeddedPostgres, billing: ProxyProcess, sql: str, setting: str
) -> None:
    with psycopg.connect(dsn(pg, billing.port), autocommit=True) as c:
        with pytest.raises(psycopg.Error) as exc:
            c.execute(sql)
        assert exc.value.diag.sqlstate == "42501"
        assert exc.value.diag.message_primary == f"pgveil: masked roles may not change {setting}"
        assert _settings_psycopg(c) == ("UTF8", "on", "safe_encoding")
        assert c.execute(READ).fetchone() == (MASKED_NAME,)


def test_psql_encoding_meta_command(pg: EmbeddedPostgres, billing: ProxyProcess) -> None:
    """psql's `\\encoding UTF8` (PQsetClientEncoding: `set client_encoding to 'UTF8'`),
    then `\\encoding` prints what the server reported."""
    psql = shutil.which("psql") or str(pg.bindir / "psql")
    script = f"\\encoding UTF8\n\\encoding\n{READ};\n\\encoding unicode\n\\encoding\nSHOW client_encoding;\n"
    out = subprocess.run(
        [psql, "-X", "-At", "-v", "ON_ERROR_STOP=1", "-h", "127.0.0.1", "-p", str(billing.port),
         "-U", HELPDESK, "-d", "postgres"],
        input=script, capture_output=True, text=True, timeout=60,
        env={"PGPASSWORD": HELPDESK_PW, "PGSSLMODE": "disable", "PGCLIENTENCODING": "UTF8",
             "PATH": "/usr/bin:/bin"},
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert out.stderr == ""
    assert out.stdout.splitlines() == ["UTF8", MASKED_NAME, "UTF8", "UTF8"]


def test_parameter_status_shows_no_change(pg: EmbeddedPostgres, billing: ProxyProcess) -> None:
    """The server reports a setting only when its value changed: none of these changes
    anything (no ParameterStatus), and the session goes on."""
    c = RawClient(billing.port, MASKED_TRUST, client_encoding="UTF8")
    try:
        got = c.query(
            "SET client_encoding TO 'unicode'; SET NAMES 'utf-8'; RESET client_encoding; "
            "SET standard_conforming_strings = yes; RESET standard_conforming_strings; "
            "SELECT set_config('client_encoding', 'UTF8', false)"
        )
        assert errors_in(got) == []
        assert [t for t, _ in got if t == "S"] == []
        assert [t for t, _ in got] == ["C"] * 5 + ["T", "D", "C", "Z"]
        shown = c.query("SHOW client_encoding")
        assert [decode_fields(b) for t, b in shown if t == "E"] == []
        assert any(t == "D" and b"UTF8" in b for t, b in shown)
    finally:
        c.close()


def test_startup_values_the_server_reads_as_required(
    pg: EmbeddedPostgres, billing: ProxyProcess
) -> None:
    """asyncpg's own startup value `'utf-8'` (quotes included: the server keeps only letters
    and digits of an encoding's name) and startup options of the required values log in."""
    for params in (
        {"client_encoding": "'utf-8'"},
        {"client_encoding": "unicode", "options": "-c standard_conforming_strings=true"},
        {"options": "-c backslash_quote=safe_encoding -c client_encoding=UTF-8"},
        {"standard_conforming_strings": "1"},
    ):
        c = RawClient(billing.port, MASKED_TRUST, **params)
        try:
            got = c.query(READ)
            assert errors_in(got) == [], params
            assert any(t == "D" and MASKED_NAME.encode() in b for t, b in got), params
        finally:
            c.close()
    refused = RawClient(billing.port, MASKED_TRUST, connect=False)
    try:
        refused.send_raw(
            StartupMessage(
                m.PROTOCOL_3_0,
                {"user": MASKED_TRUST, "database": "postgres", "options": "-c backslash_quote=on"},
            ).encode()
        )
        fields = errors_in(refused.until_ready())
        assert [(f["S"], f["C"]) for f in fields] == [("FATAL", "42501")]
        assert "may not change backslash_quote" in fields[0]["M"]
    finally:
        refused.close()


def test_asyncpg_default_startup(pg: EmbeddedPostgres, billing: ProxyProcess) -> None:
    """asyncpg as it connects by default (client_encoding `'utf-8'`)."""

    async def run() -> Any:
        c = await asyncpg.connect(
            host="127.0.0.1", port=billing.port, user=HELPDESK, password=HELPDESK_PW,
            database="postgres", ssl=False,
        )  # fmt: skip
        try:
            return await c.fetchval(READ), c.get_settings().client_encoding
        finally:
            await c.close()

    assert asyncio.run(run()) == (MASKED_NAME, "UTF8")


# ---- the audit of what follows a SET that changes nothing --------------------------------


@pytest.fixture(scope="module")
def audited(
    pg: EmbeddedPostgres, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[ProxyProcess, Path]]:
    pg.psql(f"GRANT USAGE ON SCHEMA billing TO {TRUST_USER}")
    with audited_proxy(pg, tmp_path_factory.mktemp("pinned")) as found:
        yield found


@pytest.mark.parametrize("user", [MASKED_TRUST, TRUST_USER])
def test_statement_after_a_pinned_set_is_read_for_sure(
    audited: tuple[ProxyProcess, Path], user: str
) -> None:
    """Within one extended-protocol request nothing is reported, so a statement that may
    run code before a message makes its reading uncertain; a SET of the value the setting
    has runs none, and the text after it (not ASCII: it reads by the client encoding) is
    read for sure: its access event is complete, masked or not."""
    p, audit = audited
    app = f"pinned-{user}"
    c = RawClient(p.port, user, application_name=app, client_encoding="UTF8")
    try:
        c.send_raw(
            parse("SET client_encoding TO 'UTF8'") + bind() + execute()
            + parse("SET standard_conforming_strings = on") + bind() + execute()
            + parse("SELECT name FROM billing.customers WHERE notes <> 'café'") + bind()
            + execute() + SYNC
        )  # fmt: skip
        got = read_until(c, 1)
        assert errors_in(got) == []
        assert [t for t, _ in got if t == "S"] == []
        wait_for(lambda: len(events(audit, app)) >= 1, "the access event")
        (event,) = events(audit, app)
        assert event["tables"] == ["billing.customers"]
        assert event.get("analysis_complete", True) is True
        assert leaks(str(got if user == MASKED_TRUST else "")) == []
    finally:
        c.close()
