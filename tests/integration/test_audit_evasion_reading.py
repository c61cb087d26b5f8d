"""Audit-evasion corpus: pgveil reads each statement as the server reads it.

The server reads a Query's or Parse's text when it takes the message, converted from the
session's client_encoding, with standard_conforming_strings deciding whether a backslash
in '...' escapes the quote after it. A text can be written so that it reads a protected
table under one value and not under the other (HIDE below, and its mirror SHOWN; in
client-only encodings such as SJIS, a multibyte character whose second byte is a
backslash). If pgveil reads it under the wrong value, the read leaves no event.

Each case is the sequence an unmasked client sends and what must result: an event naming
billing.customers (pgveil read it as the server did), or an event with
`analysis_complete: false` where pgveil cannot know (code ran that may have changed the
settings where the server reports nothing), never nothing. Every case also proves with the
server's own answer that it read (or did not read) the table. Masked sessions may not use
these settings at all (their logins and statements are refused), and unmasked bytes pass
unchanged. The last tests prove against the server itself that pgveil's rewriting of a
standard_conforming_strings=off text and its decoding of client encodings read alike.
"""

from __future__ import annotations

import asyncio
import os
import random
import shutil
import struct
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import asyncpg
import psycopg
import pytest

from proxy.demo.embedded_pg import EmbeddedPostgres
from proxy.session.reading import Reading, nonconforming_text, statement_text
from proxy.wire import messages as m
from proxy.wire.async_ import parameter_status
from proxy.wire.errors import decode_fields, severity_of, sqlstate_of
from proxy.wire.startup import StartupMessage
from tests.conftest import TRUST_USER
from tests.integration.audit_wire import SYNC, Messages, audited_proxy, events, wait_for
from tests.integration.masking_fixture import ADMIN, ADMIN_PW, NAME, dsn
from tests.support import ProxyProcess, RawClient, normalise_session_bytes

CUSTOMERS = "billing.customers"
# the customers' names, read, with a number the text does not spell: in a result only if the
# server read the table (whatever other tests left in it)
READ = b"(SELECT concat(max(name), 6 * 7 * 1009) FROM billing.customers)"
SECRET = b"42378"
# reads the customers only when standard_conforming_strings is off ('a\' escapes the quote)
HIDE = b"SELECT 'a\\', ' AS x, " + READ + b" AS y --'"
# ... only when it is on
SHOWN = b"SELECT 'a\\', " + READ + b" AS y --'"
# a statement on another protected table: once its event is written, every event of the
# statements sent before it in the session is written too
MARKER = b"SELECT i_account FROM billing.accounts WHERE false"
ACCOUNTS = "billing.accounts"
# Client encodings whose multibyte characters may end in the byte 0x5C (a backslash in
# ASCII): a UTF-8 character whose last byte makes such a character with a backslash after
# it. Read as UTF-8, E'<char>\' escapes the quote; read in the encoding, it does not.
HIDING_CHARS = {
    "SJIS": "丁".encode(),  # e4 b8 81: SJIS e4b8 (a kanji) + 815c
    "SHIFT_JIS_2004": "丁".encode(),
    "BIG5": "两".encode(),  # e4 b8 a1: BIG5 e4b8 + a15c
    "GBK": "丁".encode(),
    "GB18030": "丁".encode(),
}
ENCODINGS = tuple(HIDING_CHARS)


def encoded_hide(encoding: str) -> bytes:
    """Reads the customers only when read in `encoding`."""
    char = HIDING_CHARS[encoding]
    return b"SELECT E'" + char + b"\\', " + READ + b" AS y --'"


# ---- fixtures and helpers ---------------------------------------------------------------

SETUP = """
CREATE OR REPLACE FUNCTION public.reading_set(setting text, value text) RETURNS text
  LANGUAGE sql VOLATILE AS 'SELECT set_config(setting, value, false)';
GRANT EXECUTE ON FUNCTION public.reading_set(text, text) TO PUBLIC;
DROP ROLE IF EXISTS reading_off_role;
DROP ROLE IF EXISTS reading_sjis_role;
CREATE ROLE reading_off_role LOGIN PASSWORD 'reading-pw-1';
CREATE ROLE reading_sjis_role LOGIN PASSWORD 'reading-pw-2';
GRANT pg_read_all_data TO reading_off_role, reading_sjis_role;
ALTER ROLE reading_off_role SET standard_conforming_strings = off;
ALTER ROLE reading_sjis_role IN DATABASE postgres SET client_encoding = 'SJIS';
"""
TEARDOWN = """
DROP ROLE IF EXISTS reading_off_role;
DROP ROLE IF EXISTS reading_sjis_role;
DROP FUNCTION IF EXISTS public.reading_set(text, text);
"""


@pytest.fixture(scope="module")
def audited(
    pg: EmbeddedPostgres, billing: ProxyProcess, tmp_path_factory: Any
) -> Iterator[tuple[ProxyProcess, Path]]:
    pg.psql(SETUP)
    try:
        with audited_proxy(pg, tmp_path_factory.mktemp("audit-reading")) as shared:
            yield shared
    finally:
        pg.psql(TEARDOWN)


def query(sql: bytes) -> bytes:
    return m.message(m.QUERY, sql + b"\0")


def parse(sql: bytes) -> bytes:
    return m.message(m.PARSE, b"\0" + sql + b"\0\0\0")


BIND = m.message(m.BIND, b"\0\0\0\0\0\0\0\0")
EXECUTE = m.message(m.EXECUTE, b"\0" + struct.pack("!i", 0))


def run(sql: bytes) -> bytes:
    """Parse, Bind and Execute of the unnamed statement (no Sync)."""
    return parse(sql) + BIND + EXECUTE


def session(port: int, app: str, user: str = TRUST_USER, **params: str) -> RawClient:
    c = RawClient(port, user, application_name=app, **params)
    assert c.pid is not None, "the login failed"
    return c


def exchange(c: RawClient, data: bytes, readies: int) -> Messages:
    """Send `data` in one write; the messages up to the `readies`-th ReadyForQuery."""
    c.send_raw(data)
    out: Messages = []
    while readies:
        typ, body = c.recv_message()
        out.append((typ, body))
        readies -= typ == "Z"
        assert not (typ == "E" and severity_of(body) == "FATAL"), decode_fields(body)
    return out


def leaked(got: Messages) -> bool:
    """Whether a result carried a customer's name: the server read the table."""
    return any(t == "D" and SECRET in body for t, body in got)


def reported(got: Messages) -> list[tuple[str, str]]:
    return [parameter_status(body) for t, body in got if t == "S"]


def statement_events(path: Path, app: str, marked: RawClient | None = None) -> list[dict[str, Any]]:
    """The access events of `app`'s statements so far, once they are all written (the
    marker's event follows them; `marked` sends it), without the marker's and without those
    of the statements that change the settings (SET, set_config, the test's function: an
    unmasked statement the masked analysis would refuse is recorded as not analysed
    completely, whatever it reads)."""
    if marked is not None:
        exchange(marked, query(MARKER), 1)
    wait_for(
        lambda: any(ACCOUNTS in e["tables"] for e in events(path, app)), f"the marker of {app}"
    )
    return [
        e
        for e in events(path, app)
        if ACCOUNTS not in e["tables"]
        and e["outcome"] != "running"
        and not (
            e["tables"] == []
            and (e["statement"].startswith(SETTING_CALLS) or "SET " in e["statement"])
        )
    ]


# calls that change a setting, and Queries with a SET among other statements: recorded as
# not analysed completely (the masked analysis refuses set_config and SET of these
# settings, and functions that are not allow-listed; it stops there)
SETTING_CALLS = (
    "SELECT set_config",
    "SELECT pg_catalog . set_config",
    "SELECT public . reading_set",
)


# how each text reads when the customers are read (the event's statement, literals
# redacted): HIDE with standard_conforming_strings off, SHOWN with it on; a text of
# `encoded_hide` in its encoding reads as SHOWN does
READS = {HIDE: "SELECT ? AS x , ( SELECT concat (", SHOWN: "SELECT ? , ( SELECT concat ("}


def read(event: dict[str, Any]) -> bytes | None:
    """Which text the event records as the server read it (None: neither, or not complete)."""
    if event["tables"] != [CUSTOMERS] or event["analysis_complete"] is not True:
        return None
    found = [text for text, reading in READS.items() if event["statement"].startswith(reading)]
    return found[0] if len(found) == 1 else None


def exact(event: dict[str, Any], text: bytes) -> bool:
    """The event names the customers, says its analysis is complete, and records `text`
    as the server read it."""
    return read(event) == text


def uncertain(event: dict[str, Any]) -> bool:
    return event["analysis_complete"] is False


# ---- standard_conforming_strings at login -------------------------------------------------

OFF_AT_LOGIN = [
    {"options": "-c standard_conforming_strings=off"},
    {"options": r"-c standard\_conforming\_strings=off"},  # pg_split_opts: \ escapes
    {"options": "--standard-conforming-strings=off"},
    {"options": "-c standard_conforming_strings=0 -c escape_string_warning=off"},
    {"options": "-cstandard_conforming_strings=false"},
    {"standard_conforming_strings": "off"},  # a startup parameter of its own
    {"options": "-c standard_conforming_strings=on", "standard_conforming_strings": "off"},
]


@pytest.mark.parametrize("params", OFF_AT_LOGIN, ids=lambda p: " ".join(p.values()))
def test_off_at_login_is_read_as_the_server_reads(
    audited: tuple[ProxyProcess, Path], params: dict[str, str]
) -> None:
    """standard_conforming_strings off from the startup packet, however spelt: the server
    reports it at login; HIDE reads the customers (event), SHOWN does not (no event)."""
    p, path = audited
    app = f"reading-login-{abs(hash(tuple(params.items()))) % 10**8}"
    c = session(p.port, app, **params)
    hidden = exchange(c, query(HIDE), 1)
    shown = exchange(c, query(SHOWN), 1)
    assert leaked(hidden) and not leaked(shown)
    (event,) = statement_events(path, app, c)
    assert exact(event, HIDE)


def test_off_by_the_role_default_psycopg(
    pg: EmbeddedPostgres, audited: tuple[ProxyProcess, Path]
) -> None:
    """ALTER ROLE ... SET standard_conforming_strings = off: applied at login, reported."""
    p, path = audited
    app = "reading-role-off"
    conninfo = dsn(pg, p.port, "reading_off_role", "reading-pw-1") + f" application_name={app}"
    with psycopg.connect(conninfo, autocommit=True) as conn:
        assert conn.execute("SHOW standard_conforming_strings").fetchone() == ("off",)
        row = conn.execute(HIDE).fetchone()
        assert row is not None and SECRET.decode() in row[1]
        conn.execute(SHOWN).fetchall()
        conn.execute(MARKER)
    found = statement_events(path, app)
    assert len(found) == 1 and exact(found[0], HIDE)


def test_off_from_pgoptions_psql(pg: EmbeddedPostgres, audited: tuple[ProxyProcess, Path]) -> None:
    """psql with PGOPTIONS: psql splits the script by the server's setting too."""
    p, path = audited
    app = "reading-psql-pgoptions"
    out = psql(
        pg, p.port, HIDE + b"\n;\n" + SHOWN + b"\n;\n" + MARKER + b";\n",
        PGOPTIONS=r"-c standard\_conforming\_strings=off", PGAPPNAME=app,
    )  # fmt: skip
    assert SECRET.decode() in out
    found = statement_events(path, app)
    assert len(found) == 1 and exact(found[0], HIDE)


def test_off_from_asyncpg_server_settings(
    pg: EmbeddedPostgres, audited: tuple[ProxyProcess, Path]
) -> None:
    """asyncpg sends server_settings in the startup packet; execute() uses a Query, fetch()
    Parse/Bind/Execute."""
    p, path = audited
    app = "reading-asyncpg-off"

    async def go() -> list[Any]:
        conn = await asyncpg.connect(
            host="127.0.0.1", port=p.port, user=ADMIN, password=ADMIN_PW, database="postgres",
            server_settings={"standard_conforming_strings": "off", "application_name": app},
        )  # fmt: skip
        try:
            await conn.execute(HIDE.decode())
            rows = await conn.fetch(HIDE.decode())
            await conn.fetch(SHOWN.decode())
            await conn.execute(MARKER.decode())
            return list(rows)
        finally:
            await conn.close()

    rows = asyncio.run(go())
    assert SECRET.decode() in rows[0]["y"]
    found = statement_events(path, app)
    assert len(found) == 2 and all(exact(e, HIDE) for e in found)


def test_backslash_quote_only_refuses(audited: tuple[ProxyProcess, Path]) -> None:
    """backslash_quote (off, or safe_encoding in a client-only encoding) changes no reading:
    the server refuses a text with \\' in an escape string; pgveil records what it would
    have read, with the error."""
    p, path = audited
    for app, params in (
        (
            "reading-bq-off",
            {"options": "-c standard_conforming_strings=off -c backslash_quote=off"},
        ),
        (
            "reading-bq-sjis",
            {"options": "-c standard_conforming_strings=off", "client_encoding": "SJIS"},
        ),
    ):
        c = session(p.port, app, **params)
        got = exchange(c, query(HIDE), 1)
        assert not leaked(got)
        assert [sqlstate_of(b) for t, b in got if t == "E"] == ["22P06"]
        (event,) = statement_events(path, app, c)
        assert event["tables"] == [CUSTOMERS] and event["outcome"] == "22P06"


# ---- standard_conforming_strings changed during the session --------------------------------


def test_set_then_query_in_separate_round_trips_psycopg(
    pg: EmbeddedPostgres, audited: tuple[ProxyProcess, Path]
) -> None:
    p, path = audited
    app = "reading-set-psycopg"
    conninfo = dsn(pg, p.port, ADMIN, ADMIN_PW) + f" application_name={app}"
    with psycopg.connect(conninfo, autocommit=True) as conn:
        conn.execute("SET standard_conforming_strings = off")
        assert SECRET.decode() in conn.execute(HIDE).fetchone()[1]
        conn.execute(SHOWN).fetchall()
        conn.execute("SET standard_conforming_strings = on")
        assert SECRET.decode() in conn.execute(SHOWN).fetchone()[1]
        conn.execute(HIDE).fetchall()
        conn.execute(MARKER)
    found = statement_events(path, app)
    assert len(found) == 2 and [read(e) for e in found] == [HIDE, SHOWN]


def test_set_in_a_psql_script(pg: EmbeddedPostgres, audited: tuple[ProxyProcess, Path]) -> None:
    p, path = audited
    app = "reading-set-psql"
    script = b"SET standard_conforming_strings = off;\n" + HIDE + b"\n;\n" + SHOWN + b"\n;\n"
    out = psql(pg, p.port, script + MARKER + b";\n", PGAPPNAME=app)
    assert SECRET.decode() in out
    found = statement_events(path, app)
    assert len(found) == 1 and exact(found[0], HIDE)


@pytest.mark.parametrize(
    "setting",
    [
        b"SET standard_conforming_strings = off",
        b"SET SESSION standard_conforming_strings TO 'off'",
        b'SET "Standard_Conforming_Strings" = 0',
        b"SELECT set_config('standard_conforming_strings', 'off', false)",
        b"SELECT pg_catalog.set_config('standard_conforming_strings', 'of', false)",
    ],
)
def test_set_pipelined_with_the_next_query(
    audited: tuple[ProxyProcess, Path], setting: bytes
) -> None:
    """The SET and the statement after it in one packet: the server reads the second under
    the new value before pgveil sees it reported; pgveil predicts it from the SET."""
    p, path = audited
    app = f"reading-pipelined-{abs(hash(setting)) % 10**8}"
    c = session(p.port, app)
    got = exchange(c, query(setting) + query(HIDE) + query(SHOWN), 3)
    assert leaked(got)
    assert ("standard_conforming_strings", "off") in reported(got)
    (event,) = statement_events(path, app, c)
    assert exact(event, HIDE)


def test_set_in_the_same_query_applies_to_later_messages_only(
    audited: tuple[ProxyProcess, Path],
) -> None:
    """The server reads a Query's whole text when it takes it: a SET in it changes the
    reading of the messages after it, not of the statements after it in the same Query.
    (That Query's own event says its analysis is not complete: the masked analysis stops
    at the SET.)"""
    p, path = audited
    app = "reading-same-query"
    c = session(p.port, app)
    same = exchange(c, query(b"SET standard_conforming_strings = off; " + SHOWN), 1)
    later = exchange(c, query(HIDE), 1)
    assert leaked(same) and leaked(later)
    (later_event,) = statement_events(path, app, c)
    assert exact(later_event, HIDE)
    shown = exchange(c, query(b"SET standard_conforming_strings = on; " + SHOWN), 1)
    assert not leaked(shown)  # read under off, the value when the Query was taken


def test_set_local_and_set_undone_by_rollback_pipelined(audited: tuple[ProxyProcess, Path]) -> None:
    """SET LOCAL lasts until the transaction ends; a SET in a transaction that rolls back
    is undone: the statement after the ROLLBACK is read under the value from before."""
    p, path = audited
    app = "reading-rollback"
    c = session(p.port, app)
    sent = [
        b"BEGIN", b"SET LOCAL standard_conforming_strings = off", HIDE, b"ROLLBACK", SHOWN,
        b"BEGIN", b"SET standard_conforming_strings = off", b"SAVEPOINT s",
        b"SET standard_conforming_strings = on", SHOWN, b"ROLLBACK TO s", HIDE, b"ROLLBACK",
        SHOWN, b"BEGIN; SET LOCAL standard_conforming_strings = off; COMMIT", SHOWN,
    ]  # fmt: skip
    got = exchange(c, b"".join(query(s) for s in sent), len(sent))
    results = [g for g in _by_ready(got)]
    assert [leaked(r) for r in results] == [s in (HIDE, SHOWN) for s in sent]
    events_ = statement_events(path, app, c)
    assert len(events_) == 6 and [read(e) for e in events_] == [
        HIDE,
        SHOWN,
        SHOWN,
        HIDE,
        SHOWN,
        SHOWN,
    ]


def test_reset_all_and_discard_all_go_back_to_the_login_value(
    audited: tuple[ProxyProcess, Path],
) -> None:
    """RESET and DISCARD ALL return to the value the login had (its startup options here),
    not to the server's default."""
    p, path = audited
    app = "reading-reset"
    c = session(p.port, app, options="-c standard_conforming_strings=off")
    sent = [
        b"SET standard_conforming_strings = on", b"RESET ALL", HIDE,
        b"SET standard_conforming_strings = on", b"DISCARD ALL", HIDE,
        b"SET standard_conforming_strings = on", b"RESET standard_conforming_strings", HIDE,
        b"SET standard_conforming_strings = on", b"SET standard_conforming_strings TO DEFAULT",
        HIDE,
    ]  # fmt: skip
    got = exchange(c, b"".join(query(s) for s in sent), len(sent))
    assert [leaked(r) for r in _by_ready(got)] == [s == HIDE for s in sent]
    events_ = statement_events(path, app, c)
    assert len(events_) == 4 and [read(e) for e in events_] == [HIDE] * 4


def test_a_failed_set_is_undone(audited: tuple[ProxyProcess, Path]) -> None:
    """A SET in a Query that fails is rolled back with it: pgveil predicted the SET, the
    server's report says otherwise, the statement read in between is not attributed to a
    guess."""
    p, path = audited
    app = "reading-failed-set"
    c = session(p.port, app)
    got = exchange(c, query(b"SET standard_conforming_strings = off; SELECT 1/0") + query(SHOWN), 2)
    assert leaked(got)
    (event,) = statement_events(path, app, c)
    assert exact(event, SHOWN) or uncertain(event)


def test_extended_set_within_one_request_is_predicted(audited: tuple[ProxyProcess, Path]) -> None:
    """Parse/Bind/Execute of a SET, of HIDE, of a SET back, one Sync: the server reports
    nothing (the value at the end is the one it had); pgveil follows the SETs."""
    p, path = audited
    app = "reading-extended-set"
    c = session(p.port, app)
    got = exchange(
        c,
        run(b"SET standard_conforming_strings = off") + run(HIDE)
        + run(b"SET standard_conforming_strings = on") + run(SHOWN) + SYNC,
        1,
    )  # fmt: skip
    assert leaked(got) and reported(got) == []
    events_ = statement_events(path, app, c)
    assert len(events_) == 2 and [read(e) for e in events_] == [HIDE, SHOWN]


def test_code_that_sets_it_before_the_next_query(audited: tuple[ProxyProcess, Path]) -> None:
    """A function sets it; the next Query was sent before the server reported the change:
    pgveil finds out from the report, and the Query's event says it was not read for sure."""
    p, path = audited
    app = "reading-code-query"
    c = session(p.port, app)
    call = query(b"SELECT public.reading_set('standard_conforming_strings', 'off')")
    got = exchange(c, call + query(HIDE), 2)
    assert leaked(got)
    (event,) = statement_events(path, app, c)
    assert uncertain(event)


def test_code_that_sets_it_within_one_request(audited: tuple[ProxyProcess, Path]) -> None:
    """Within one extended-protocol request a function sets it off and another sets it back:
    the server reports nothing at all. pgveil cannot know what the Parse between them was
    read under: its event says so."""
    p, path = audited
    app = "reading-code-request"
    c = session(p.port, app)
    got = exchange(
        c,
        run(b"SELECT public.reading_set('standard_conforming_strings', 'off')") + run(HIDE)
        + run(b"SELECT public.reading_set('standard_conforming_strings', 'on')") + SYNC,
        1,
    )  # fmt: skip
    assert leaked(got) and reported(got) == []
    (event,) = statement_events(path, app, c)
    assert uncertain(event)


def test_psycopg_pipeline(pg: EmbeddedPostgres, audited: tuple[ProxyProcess, Path]) -> None:
    p, path = audited
    app = "reading-psycopg-pipeline"
    conninfo = dsn(pg, p.port, ADMIN, ADMIN_PW) + f" application_name={app}"
    with psycopg.connect(conninfo, autocommit=True) as conn:
        with conn.pipeline():
            conn.execute("SET standard_conforming_strings = off")
            hidden = conn.execute(HIDE)
            shown = conn.execute(SHOWN)
            conn.execute("SET standard_conforming_strings = on")
            again = conn.execute(SHOWN)
        assert SECRET.decode() in hidden.fetchone()[1] and SECRET.decode() in again.fetchone()[1]
        assert shown.fetchone() is not None
        conn.execute(MARKER)
    # psycopg sends one Sync at the end: SHOWN follows HIDE's Execute in the same request
    # (code may have run: not read for sure), the SET after it makes the value known again
    hidden_event, shown_event, again_event = statement_events(path, app)
    assert exact(hidden_event, HIDE) and uncertain(shown_event) and exact(again_event, SHOWN)


def test_configuration_reload_between_statements(
    pg: EmbeddedPostgres, audited: tuple[ProxyProcess, Path]
) -> None:
    """A reload of the server's configuration changes the setting of a session that did not
    set it, before the next message it reads; the server reports it after that message.
    The Query read under the new value is recorded as not read for sure."""
    p, path = audited
    app = "reading-reload"
    c = session(p.port, app)
    admin = RawClient(pg.port, TRUST_USER)
    try:
        exchange(admin, query(b"ALTER SYSTEM SET standard_conforming_strings = off"), 1)
        exchange(admin, query(b"SELECT pg_reload_conf()"), 1)
        deadline = time.monotonic() + 20
        while True:  # until the session has taken the reload (it reports the change)
            got = exchange(c, query(HIDE), 1)
            if ("standard_conforming_strings", "off") in reported(got):
                break
            assert not leaked(got)
            assert time.monotonic() < deadline, "the session never took the reload"
        assert leaked(got)
        found = statement_events(path, app, c)
        assert found and uncertain(found[-1])
    finally:
        exchange(admin, query(b"ALTER SYSTEM RESET standard_conforming_strings"), 1)
        exchange(admin, query(b"SELECT pg_reload_conf()"), 1)
        admin.close()
        _wait_reloaded(pg)


# ---- client_encoding -----------------------------------------------------------------------


@pytest.mark.parametrize("encoding", ENCODINGS)
def test_client_encoding_at_login(audited: tuple[ProxyProcess, Path], encoding: str) -> None:
    """client_encoding from the startup packet: pgveil decodes in it (read as UTF-8, the
    text would escape the quote and hide the table)."""
    p, path = audited
    app = f"reading-enc-login-{encoding}"
    c = session(p.port, app, client_encoding=encoding)
    got = exchange(c, query(encoded_hide(encoding)), 1)
    assert leaked(got)
    (event,) = statement_events(path, app, c)
    assert exact(event, SHOWN)


@pytest.mark.parametrize("encoding", ENCODINGS)
def test_set_client_encoding_pipelined(audited: tuple[ProxyProcess, Path], encoding: str) -> None:
    p, path = audited
    app = f"reading-enc-pipelined-{encoding}"
    c = session(p.port, app)
    setting = f"SET client_encoding TO '{encoding.lower().replace('_', '-')}'".encode()
    got = exchange(c, query(setting) + query(encoded_hide(encoding)), 2)
    assert leaked(got)
    (event,) = statement_events(path, app, c)
    assert exact(event, SHOWN)


def test_set_client_encoding_extended_and_in_the_same_query(
    audited: tuple[ProxyProcess, Path],
) -> None:
    """SET NAMES in the same Query: the Query was converted under UTF-8 (no table); in the
    same extended request: the Parse after it is converted from SJIS (the table)."""
    p, path = audited
    app = "reading-enc-same"
    c = session(p.port, app)
    same = exchange(c, query(b"SET NAMES 'SJIS'; " + encoded_hide("SJIS")), 1)
    assert not leaked(same)
    exchange(c, query(b"RESET client_encoding"), 1)
    got = exchange(c, run(b"SET NAMES 'win932'") + run(encoded_hide("SJIS")) + SYNC, 1)
    assert leaked(got)
    (event,) = statement_events(path, app, c)
    assert exact(event, SHOWN)


def test_client_encoding_psycopg_and_role_default(
    pg: EmbeddedPostgres, audited: tuple[ProxyProcess, Path]
) -> None:
    """psycopg with client_encoding=SJIS sending bytes; a role whose default is SJIS."""
    p, path = audited
    app = "reading-enc-psycopg"
    text = encoded_hide("SJIS")
    for user, password, extra in (
        (ADMIN, ADMIN_PW, " client_encoding=SJIS"),
        ("reading_sjis_role", "reading-pw-2", ""),
    ):
        conninfo = dsn(pg, p.port, user, password) + f" application_name={app}{extra}"
        with psycopg.connect(conninfo, autocommit=True) as conn:
            assert conn.info.encoding == "shift_jis"
            row = conn.execute(text).fetchone()
            assert row is not None and SECRET.decode() in row[1]
    with psycopg.connect(dsn(pg, p.port, ADMIN, ADMIN_PW) + f" application_name={app}") as conn:
        conn.execute(MARKER)
    found = statement_events(path, app)
    assert len(found) == 2 and all(exact(e, SHOWN) for e in found)


def test_client_encoding_psql(pg: EmbeddedPostgres, audited: tuple[ProxyProcess, Path]) -> None:
    p, path = audited
    app = "reading-enc-psql"
    out = psql(
        pg, p.port, encoded_hide("SJIS") + b"\n;\n" + MARKER + b";\n",
        PGCLIENTENCODING="SJIS", PGAPPNAME=app,
    )  # fmt: skip
    assert SECRET.decode() in out
    found = statement_events(path, app)
    assert len(found) == 1 and exact(found[0], SHOWN)


def test_code_that_sets_the_encoding_within_one_request(
    audited: tuple[ProxyProcess, Path],
) -> None:
    p, path = audited
    app = "reading-enc-code"
    c = session(p.port, app)
    got = exchange(
        c,
        run(b"SELECT public.reading_set('client_encoding', 'SJIS')") + run(encoded_hide("SJIS"))
        + run(b"SELECT public.reading_set('client_encoding', 'UTF8')") + SYNC,
        1,
    )  # fmt: skip
    assert leaked(got) and reported(got) == []
    (event,) = statement_events(path, app, c)
    assert uncertain(event)


@pytest.mark.parametrize(
    ("params", "text"),
    [
        ({}, b"SELECT name FROM billing.customers WHERE name = '\xff\xfe'"),
        (
            {"client_encoding": "SJIS"},
            b"SELECT name FROM billing.customers WHERE name = '\x81\x7f'",
        ),
        # EUC_TW: pgveil has no decoder for it; the server reads it
        (
            {"client_encoding": "EUC_TW"},
            b"SELECT name FROM billing.customers WHERE name = '\xa4\xa1'",
        ),
    ],
    ids=["utf8", "sjis", "euc_tw"],
)
def test_statements_pgveil_cannot_decode(
    audited: tuple[ProxyProcess, Path], params: dict[str, str], text: bytes
) -> None:
    p, path = audited
    app = f"reading-undecodable-{params.get('client_encoding', 'utf8')}"
    c = session(p.port, app, **params)
    exchange(c, query(text), 1)
    exchange(c, run(text) + SYNC, 1)
    found = statement_events(path, app, c)
    assert len(found) == 2 and all(uncertain(e) and e["tables"] == [] for e in found)


# ---- masked sessions ---------------------------------------------------------------------

MASKED = "masked_trust"  # trust authentication, masked through cc_staff


@pytest.mark.parametrize(
    "params",
    [
        *OFF_AT_LOGIN,
        {"client_encoding": "SJIS"},
        {"options": "-c client_encoding=BIG5"},
        {"options": r"-c client\_encoding=GBK"},
    ],
    ids=lambda p: " ".join(p.values()),
)
def test_masked_logins_that_change_the_reading_are_refused(
    billing: ProxyProcess, params: dict[str, str]
) -> None:
    """The server reports both settings at login, whatever set them: a masked login with
    either changed ends with 42501 before it can send a statement."""
    fatal = masked_login(billing.port, params)
    assert fatal is not None and sqlstate_of(fatal) == "42501"
    text = decode_fields(fatal)["M"]
    assert "standard_conforming_strings" in text or "client_encoding" in text


def test_masked_role_default_off_is_refused(pg: EmbeddedPostgres, billing: ProxyProcess) -> None:
    pg.psql(f"ALTER ROLE {MASKED} SET standard_conforming_strings = off")
    try:
        fatal = masked_login(billing.port, {})
        assert fatal is not None and sqlstate_of(fatal) == "42501"
        assert "standard_conforming_strings" in decode_fields(fatal)["M"]
    finally:
        pg.psql(f"ALTER ROLE {MASKED} RESET standard_conforming_strings")
    assert masked_login(billing.port, {}) is None


def masked_login(port: int, params: dict[str, str]) -> bytes | None:
    """The FATAL that ends a masked login with these startup parameters (None: it
    completed)."""
    c = RawClient(port, MASKED, connect=False)
    try:
        startup = {"user": MASKED, "database": "postgres", **params}
        c.send_raw(StartupMessage(m.PROTOCOL_3_0, startup).encode())
        got = c.until_ready()
    finally:
        c.close()
    last_type, last = got[-1]
    return last if last_type == "E" else None


@pytest.mark.parametrize(
    "setting",
    [
        b"SET standard_conforming_strings = off",
        b"SET LOCAL standard_conforming_strings = off",
        b"SELECT set_config('standard_conforming_strings', 'off', false)",
        b"SET NAMES 'SJIS'",
        b"SET client_encoding = 'SJIS'",
    ],
)
def test_masked_sessions_may_not_change_the_reading(billing: ProxyProcess, setting: bytes) -> None:
    """Refused, also in a request with the statement it would change the reading of."""
    c = RawClient(billing.port, MASKED)
    got = exchange(c, query(setting), 1)
    assert [sqlstate_of(b) for t, b in got if t == "E"] == ["42501"]
    got = exchange(c, run(setting) + run(HIDE) + SYNC + query(HIDE), 2)
    assert sqlstate_of(next(b for t, b in got if t == "E")) == "42501"
    assert not leaked(got)
    assert reported(got) == []


def test_masked_reset_all_and_discard_all_keep_the_session(billing: ProxyProcess) -> None:
    c = RawClient(billing.port, MASKED)
    got = exchange(c, query(b"RESET ALL") + query(b"DISCARD ALL") + query(SHOWN), 3)
    assert [t for t, _ in got if t == "E"] == [] and leaked(got)  # SHOWN, read on
    assert not any(t == "D" and NAME.encode() in body for t, body in got)  # masked


# ---- unmasked bytes pass unchanged -------------------------------------------------------


def test_unmasked_bytes_are_identical(
    pg: EmbeddedPostgres, audited: tuple[ProxyProcess, Path]
) -> None:
    """The whole evasion sequence, direct and through pgveil: the same answers, byte for
    byte (but the backend key)."""
    p, _ = audited
    sequence = [
        (query(HIDE) + query(b"SET client_encoding = 'SJIS'") + query(encoded_hide("SJIS")), 3),
        (run(b"SET standard_conforming_strings = on") + run(SHOWN) + run(b"RESET ALL") + SYNC, 1),
        (query(b"SET NAMES 'BIG5'; " + encoded_hide("BIG5")) + query(encoded_hide("BIG5")), 2),
    ]
    answers = []
    for port in (pg.port, p.port):
        c = RawClient(port, TRUST_USER, connect=False)
        params = {"user": TRUST_USER, "database": "postgres", "application_name": "reading-bytes",
                  "options": "-c standard_conforming_strings=off"}  # fmt: skip
        c.send_raw(StartupMessage(m.PROTOCOL_3_0, params).encode())
        got = c.until_ready()
        for data, readies in sequence:
            got += exchange(c, data, readies)
        c.close()
        answers.append(normalise_session_bytes(got))
    assert answers[0] == answers[1]
    assert leaked(answers[0])


# ---- the server reads as pgveil does -----------------------------------------------------


def test_server_reads_nonconforming_text_as_pgveil_rewrites_it(pg: EmbeddedPostgres) -> None:
    """Random texts of quotes, backslashes, comments, dollar quotes and prefixes: what the
    server makes of a text with standard_conforming_strings off (a result or an error) is
    what it makes of pgveil's rewriting of it read on. pgveil gives up (None) only where
    the server refuses the text."""
    off = RawClient(
        pg.port,
        TRUST_USER,
        options="-c standard_conforming_strings=off -c escape_string_warning=off",
    )
    on = RawClient(pg.port, TRUST_USER)
    pieces = ["'", "'", "\\", "\\", "a", " ", "\n", "--", "/*", "*/", "$$", "$q$", "E", "N",
              "B", "X", "U&", '"', "''", "||", ",", "1", "e", "\\'", "é"]  # fmt: skip
    rnd = random.Random(12)
    compared = 0
    for _ in range(600):
        sql = "SELECT " + "".join(rnd.choice(pieces) for _ in range(rnd.randint(1, 12)))
        server = _outcome(exchange(off, query(sql.encode()), 1))
        ours = nonconforming_text(sql)
        if ours is None:
            assert server[0] == "E", sql
            continue
        assert _outcome(exchange(on, query(ours.encode()), 1)) == server, (sql, ours)
        compared += 1
    assert compared > 100


@pytest.mark.parametrize("encoding", [*ENCODINGS, "JOHAB", "UHC", "EUC_JP", "LATIN1", "WIN1251"])
def test_server_converts_as_pgveil_decodes(pg: EmbeddedPostgres, encoding: str) -> None:
    """Random byte texts in the encoding (ASCII bytes among them, quotes and backslashes
    too): the server's reading of the bytes under that client encoding gives what it gives
    pgveil's decoding of them sent as UTF-8. pgveil gives up only where the server refuses
    the bytes."""
    client = RawClient(pg.port, TRUST_USER, client_encoding=encoding)
    utf8 = RawClient(pg.port, TRUST_USER)
    rnd = random.Random(encoding)
    reading = Reading(client_encoding=encoding)
    ascii_ = b"\\\\ a1x"
    compared = gave_up = 0
    for _ in range(300):
        raw = bytes(
            rnd.choice(ascii_) if rnd.random() < 0.3 else rnd.randrange(0x80, 0x100)
            for _ in range(rnd.randint(1, 8))
        )
        # the answer is ASCII whatever the reading: the value's UTF-8 bytes in hex, or an
        # error (a backslash the server reads escapes the closing quote)
        sql = b"SELECT encode(convert_to(E'" + raw + b"', 'UTF8'), 'hex') AS h -- ')"
        server = _outcome(exchange(client, query(sql), 1))
        if server[0] == "E":
            continue  # the server refuses the bytes: nothing of them runs, any reading will do
        text = statement_text(sql, reading)
        if text is None:
            gave_up += 1  # not read: recorded as not analysed (never as a guess)
            continue
        assert _outcome(exchange(utf8, query(text.encode()), 1)) == server, raw.hex()
        compared += 1
    assert compared >= 10 and gave_up <= compared // 10


# ---- helpers of the cases above ------------------------------------------------------------


def _by_ready(got: Messages) -> Iterator[Messages]:
    """The answers split at each ReadyForQuery."""
    part: Messages = []
    for typ, body in got:
        part.append((typ, body))
        if typ == "Z":
            yield part
            part = []


def _outcome(got: Messages) -> tuple[str, object]:
    """("E", None): the server refused the text (which error does not matter: nothing of
    it runs; in client-only encodings `\\'` is refused as unsafe, say), or ("D", the rows
    as they came)."""
    if any(typ == "E" for typ, _ in got):
        return ("E", None)
    return ("D", [body for typ, body in got if typ == "D"])


def psql(pg: EmbeddedPostgres, port: int, script: bytes, **env: str) -> str:
    """psql as billing_admin running `script` (bytes as they are); its output."""
    binary = shutil.which("psql") or str(pg.bindir / "psql")
    environ = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    environ.update(PGPASSWORD=ADMIN_PW, PGSSLMODE="disable", **env)
    done = subprocess.run(
        [binary, "-X", "-q", "-h", "127.0.0.1", "-p", str(port), "-U", ADMIN, "-d", "postgres"],
        input=script, capture_output=True, env=environ, timeout=60, check=False,
    )  # fmt: skip
    return done.stdout.decode("utf-8", "replace") + done.stderr.decode("utf-8", "replace")


def _wait_reloaded(pg: EmbeddedPostgres) -> None:
    """New sessions have standard_conforming_strings on again."""

    def back() -> bool:
        probe = RawClient(pg.port, TRUST_USER, connect=False)
        probe.send_raw(
            StartupMessage(m.PROTOCOL_3_0, {"user": TRUST_USER, "database": "postgres"}).encode()
        )
        got = probe.until_ready()
        probe.close()
        return ("standard_conforming_strings", "on") in reported(got)

    wait_for(back, "the configuration reloaded back")
