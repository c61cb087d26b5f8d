"""White-box attacks on the parts of the masked session outside the statement analyser
that must fail closed: the login gate, the scrubbing of errors
and notices and their pairing with statements, the filter on the wire and its exit check, and
the statement-shape cache.

Every attack is sent as a masked role (`masked_trust`: trust authentication, member of the
masked group cc_staff; `helpdesk` where a password client is the point), or, for the audit
cases, as an unmasked role whose accesses must all be recorded. Each case is proven meaningful
on the real server: the same thing done directly shows the value, or pgveil's intended answer
(the right audit event, the exit check closing the session) is shown to exist.

Bypasses found (FAILING until pgveil is fixed; each test names the code path):

* `test_hash_key_*`: server DEBUG/LOG messages carry the rewritten statement; a literal with
  an odd number of quote characters (`E'\\''`) makes `_Judge` (proxy/session/masked.py,
  `_QUOTED`) pair the quotes of the rest of the text the wrong way round, and the HMAC pads of
  the `hash` mask, written as quoted hex in the rewrite, come out whole: the key is
  `pad XOR 0x36`.
* `test_guess_in_the_query_before_*`, `test_*_audit_*`: the server ignores a Sync that
  arrives during COPY FROM STDIN, and a Sync behind a COPY that fails before reading its
  input is not ignored; StatementLog (proxy/session/statements.py) models neither, so every
  later error is judged against the statement before it, and access events get another
  statement's outcome and subjects, or none at all.
* `test_guess_in_a_portal_of_an_earlier_transaction_*`, `test_portal_name_reused_*`,
  `test_cursor_name_reused_*`: named portals and SQL cursors end with their transaction,
  StatementLog's never do; a Bind or DECLARE that reuses the name is taken for one the server
  refuses, so errors are judged, and accesses recorded (not at all), as the old one's
  statement.
* `test_a_message_instead_of_a_password_*` (low): before authentication, a gated login
  answers a protocol violation with pgveil's own FATAL, not the server's: an
  unauthenticated client learns that masking rules are configured.
* `test_statement_prepared_before_a_rules_reload_*`: a statement (or SQL PREPARE) analysed
  under the old rules keeps running unmasked after a reload, and the exit check never sees it
  when the client does not Describe (Bind/Execute get no RowDescription); a view the
  administrator redefines to read a personal column is re-planned by the server under a
  statement prepared before, and no Describe helps.

Guards (attacks that did not work, kept passing): a message begun before AuthenticationOk and
finished after it, a missing database under trust authentication, the extended-protocol COPY
whose Sync the server swallows, a guess in a portal of another name, the exit check with Describe and with SQL EXECUTE, a DEBUG
notice without a misaligning literal, and a same-shape set_config that turns
standard_conforming_strings off."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import os
import re
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import asyncpg
import psycopg
import pytest

from proxy.cli.audit import who
from proxy.demo.embedded_pg import EmbeddedPostgres
from proxy.wire import messages as m
from proxy.wire.errors import decode_fields
from proxy.wire.startup import StartupMessage
from rules.masks import hmac_pads
from tests.conftest import TRUST_USER
from tests.integration.audit_wire import all_events
from tests.integration.masking_fixture import (
    ADMIN,
    ADMIN_PW,
    HASH_KEY,
    HELPDESK,
    HELPDESK_PW,
    LOGIN,
    NAME,
    RULES,
    dsn,
    leaks,
)
from tests.integration.test_error_scrub import (
    ECHO,
    EXECUTE,
    MASKED,
    RIGHT,
    ROW,
    SYNC,
    bind,
    execute,
    parse,
)
from tests.support import ProxyProcess, RawClient, errors_in

MASKED_TRUST = "masked_trust"
LOGGED, LOGGED_PW = "wb2_logged", "wb2-logged-pw-1"  # masked; the DBA logs its statements
KEY_PADS = tuple(pad.hex() for pad in hmac_pads(HASH_KEY.encode()))
# a literal whose text holds one quote character more than it delimits: read as the server
# reads it, it is the one-character string ', but counted quote by quote it opens a string
MISALIGN = "E'\\''"
HASHED = f"SELECT {MISALIGN} AS q, login FROM billing.customers WHERE i_customer = 1"
NOTES = "SELECT notes FROM billing.customers WHERE i_customer = 1"
NOTES_VALUE = b"likes invoices"  # customer 1's notes: no rule in RULES, one after the reload


def query(sql: str) -> bytes:
    return m.message(m.QUERY, sql.encode() + b"\0")


def describe(kind: str, name: str = "") -> bytes:
    return m.message(m.DESCRIBE, kind.encode() + name.encode() + b"\0")


def copy_data(data: bytes) -> bytes:
    return m.message(m.COPY_DATA, data)


COPY_DONE = m.message(m.COPY_DONE)


def rows(messages: list[tuple[str, bytes]]) -> bytes:
    return b"".join(body for typ, body in messages if typ == "D")


def texts(messages: list[tuple[str, bytes]]) -> str:
    """Every error and notice field of `messages`, one line each."""
    return "\n".join(repr(decode_fields(body)) for typ, body in messages if typ in ("E", "N"))


def recv_until(c: RawClient, typ: str) -> list[tuple[str, bytes]]:
    out = []
    while True:
        got = c.recv_message()
        out.append(got)
        if got[0] in (typ, "Z"):
            return out


def recovered_key(text: str) -> bytes | None:
    """The hash key, if a pad of it stands whole in `text` (the inner pad is key XOR 0x36)."""
    for run in re.findall(r"[0-9a-f]{128}", text):
        if run in KEY_PADS:
            pad = bytes.fromhex(run)
            xor = 0x36 if run == KEY_PADS[0] else 0x5C
            return bytes(b ^ xor for b in pad).rstrip(b"\0")
    return None


def key_message(key: bytes, masked_login: str) -> str:
    pseudonym = hmac.new(key, LOGIN.encode(), hashlib.sha256).hexdigest()
    return (
        f"the hash key came out of a notice: {key!r}; HMAC(key, guessed login) == the masked "
        f"login the session was shown: {pseudonym == masked_login}"
    )


# ---- the hash key, through the rewritten statement in server messages ------------------------


def test_hash_key_in_debug_notice_of_a_parse(billing: ProxyProcess) -> None:
    """PostgreSQL reports each Parse at DEBUG2 with its text (exec_parse_message: "parse %s:
    %s"), and a masked session may SET client_min_messages = debug2 (rules/denied.py
    DENIED_SETTINGS does not name it). The text is pgveil's rewrite, with the hash mask's
    HMAC pads as quoted hex. MaskedFilter._error scrubs the message with _Judge.scrub, whose
    _QUOTED pattern pairs quote characters left to right: the client's own `E'\\''` (kept as
    written: the shape cache puts literals back verbatim) leaves one quote unpaired, so every
    quoted run after it is read as outside quotes and the other way round, and both pads are
    shown whole."""
    c = RawClient(billing.port, user=MASKED_TRUST)
    try:
        c.query("SET client_min_messages = debug2")
        c.send_raw(parse(HASHED) + bind() + EXECUTE + SYNC)
        out = c.until_ready()
    finally:
        c.close()
    received = texts(out)
    # DEBUG notices are withheld from masked sessions (the fix): none carries the statement
    assert "parse <unnamed>: SELECT" not in received
    masked_login = rows(out)[-64:].decode()
    key = recovered_key(received)
    assert key is None, key_message(key, masked_login)


def test_hash_key_in_debug_notice_set_at_login_asyncpg(billing: ProxyProcess) -> None:
    """The same through asyncpg (extended protocol), with client_min_messages set in the
    startup packet: masked_refusal (rules/startup.py) judges it as the SET it equals, and lets
    it through."""

    async def run() -> tuple[str, str]:
        got: list[str] = []
        conn = await asyncpg.connect(
            host="127.0.0.1",
            port=billing.port,
            user=HELPDESK,
            password=HELPDESK_PW,
            database="postgres",
            ssl=False,
            statement_cache_size=0,
            server_settings={"client_encoding": "UTF8", "client_min_messages": "debug2"},
        )
        conn.add_log_listener(lambda _c, msg: got.append(repr(msg.as_dict())))
        try:
            row = await conn.fetchrow(HASHED)
        finally:
            await conn.close()
        assert row is not None
        return "\n".join(got), str(row["login"])

    received, masked_login = asyncio.run(run())
    assert not re.search(r"parse [^:]*: SELECT", received)  # withheld
    key = recovered_key(received)
    assert key is None, key_message(key, masked_login)


@pytest.fixture(scope="module")
def logged_role(pg: EmbeddedPostgres, billing: ProxyProcess) -> Iterator[str]:
    """A masked login whose statements the DBA logs (log_statement = all, a common audit
    setting; PostgreSQL logs it at LOG level, which client_min_messages = log sends on)."""
    pg.psql(
        f"CREATE ROLE {LOGGED} LOGIN PASSWORD '{LOGGED_PW}' IN ROLE cc_staff;"
        f"ALTER ROLE {LOGGED} SET log_statement = 'all';"
    )
    try:
        yield LOGGED
    finally:
        pg.psql(f"DROP ROLE IF EXISTS {LOGGED}")


def test_hash_key_in_the_statement_log_sent_to_psql(
    pg: EmbeddedPostgres, billing: ProxyProcess, logged_role: str
) -> None:
    """The simple protocol: psql with PGOPTIONS='-c client_min_messages=log' gets the server's
    "statement: <rewritten text>" LOG line as a notice; the README's advice to treat the
    server's statement log as secret does not cover a masked client reading its own share."""
    psql = shutil.which("psql") or str(pg.bindir / "psql")
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    env.update(
        PGPASSWORD=LOGGED_PW,
        PGCLIENTENCODING="UTF8",
        PGSSLMODE="disable",
        PGOPTIONS="-c client_min_messages=log",
    )
    argv = [psql, "-X", "-At", "-h", "127.0.0.1", "-p", str(billing.port), "-U", logged_role]
    done = subprocess.run(
        [*argv, "-d", "postgres", "-c", HASHED],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert done.returncode == 0 and "statement: SELECT" not in done.stderr, done.stderr
    masked_login = done.stdout.strip().rpartition("|")[2]
    key = recovered_key(done.stderr)
    assert key is None, key_message(key, masked_login)


def test_debug_notices_reach_a_direct_client_but_no_masked_one(
    pg: EmbeddedPostgres, billing: ProxyProcess
) -> None:
    """What the attacks above rely on: PostgreSQL sends a session with client_min_messages =
    debug2 a notice with each statement's text. Directly the masked role gets it; through
    pgveil, where that text is pgveil's rewrite with the hash mask's pads, it gets none."""
    direct = RawClient(pg.port, user=MASKED_TRUST)
    try:
        direct.query("SET client_min_messages = debug2")
        direct.send_raw(parse(HASHED) + bind() + EXECUTE + SYNC)
        assert "parse <unnamed>: SELECT" in texts(direct.until_ready())
    finally:
        direct.close()
    c = RawClient(billing.port, user=MASKED_TRUST)
    try:
        c.query("SET client_min_messages = debug2")
        c.send_raw(parse(HASHED.replace(MISALIGN, "'x'")) + bind() + EXECUTE + SYNC)
        received = texts(c.until_ready())
    finally:
        c.close()
    assert "decode(" not in received and "parse <unnamed>" not in received
    assert recovered_key(received) is None
    assert not any(pad[1:-1] in received for pad in KEY_PADS)


# ---- errors paired with the wrong statement ---------------------------------------------------


def copy_with_a_sync_inside(c: RawClient, table: str) -> None:
    """COPY FROM STDIN by a Query, with a Sync sent while the copy runs: the server ignores
    it (CopyGetData: "Ignore Flush/Sync for the convenience of client libraries"), so it gets
    no ReadyForQuery."""
    c.send_raw(query(f"COPY {table} FROM STDIN"))
    got = recv_until(c, "G")
    assert got[-1][0] == "G", got
    c.send_raw(SYNC + copy_data(b"1\n") + COPY_DONE)
    assert errors_in(c.until_ready()) == []


def error_after_guess(c: RawClient) -> str:
    c.send_raw(query(f"SELECT '{RIGHT}' AS guess"))
    assert errors_in(c.until_ready()) == []
    c.send_raw(query(ROW))
    (error,) = errors_in(c.until_ready())
    return error["M"]


@pytest.mark.parametrize("where", ["direct", "pgveil"])
def test_guess_in_the_query_before_confirms_after_a_sync_inside_copy(
    pg: EmbeddedPostgres, billing: ProxyProcess, where: str
) -> None:
    """StatementLog.server_message drops Syncs queued behind an Execute when the
    CopyInResponse comes, never behind a Query, nor one sent after it: the Sync stays at the
    head of the queue and takes the next request's ReadyForQuery (StatementLog._ready), so
    from then on `cause()` names the statement before the one that failed. The guess of the
    previous Query confirms the value the error echoes (`notes::int`, as in
    test_error_scrub.py): the oracle the README says a guess sent along cannot open."""
    c = RawClient(pg.port if where == "direct" else billing.port, user=MASKED_TRUST)
    try:
        c.query("CREATE TEMP TABLE wb2_copy (x int)")
        copy_with_a_sync_inside(c, "wb2_copy")
        message = error_after_guess(c)
    finally:
        c.close()
    if where == "direct":
        assert message == ECHO.format(RIGHT)  # the value reaches the error
    else:
        assert message == MASKED


def test_extended_copy_whose_sync_the_server_swallows_keeps_the_pairing(
    billing: ProxyProcess,
) -> None:
    """Guard: libpq's extended-protocol COPY (Execute and Sync together, a Sync after
    CopyDone): the Sync the server swallows is dropped on CopyInResponse, and the pairing
    holds (the direct answer is in the test above)."""
    c = RawClient(billing.port, user=MASKED_TRUST)
    try:
        c.query("CREATE TEMP TABLE wb2_copy (x int)")
        c.send_raw(parse("COPY wb2_copy FROM STDIN") + bind() + EXECUTE + SYNC)
        assert recv_until(c, "G")[-1][0] == "G"
        c.send_raw(copy_data(b"1\n") + COPY_DONE + SYNC)
        assert errors_in(c.until_ready()) == []
        assert error_after_guess(c) == MASKED
    finally:
        c.close()


def portal_error(c: RawClient, *, first_portal: str, second_portal: str) -> str:
    """A named portal of a harmless statement holding the guess, committed (autocommit: the
    Sync ends the transaction, and with it the portal); then the error statement bound to a
    portal and executed."""
    guess = parse(f"SELECT '{RIGHT}' AS guess", name="wb2_guess")
    c.send_raw(guess + bind(stmt="wb2_guess", portal=first_portal) + SYNC)
    assert errors_in(c.until_ready()) == []
    row = parse(ROW, name="wb2_row") + bind(stmt="wb2_row", portal=second_portal)
    c.send_raw(row + execute(second_portal) + SYNC)
    (error,) = errors_in(c.until_ready())
    return error["M"]


@pytest.mark.parametrize("where", ["direct", "pgveil"])
def test_guess_in_a_portal_of_an_earlier_transaction_confirms(
    pg: EmbeddedPostgres, billing: ProxyProcess, where: str
) -> None:
    """A named portal lasts until the end of its transaction; StatementLog keeps it forever
    (nothing drops `_portals` at COMMIT or ROLLBACK). A Bind that reuses the name in a later
    transaction is taken for one the server refuses (StatementLog.bind: "the server refuses
    to bind a named portal in use"), so the name keeps the old portal, and the Execute's
    error is judged against the old portal's statement (`cause()`): the guess it spelled
    confirms the value."""
    c = RawClient(pg.port if where == "direct" else billing.port, user=MASKED_TRUST)
    try:
        message = portal_error(c, first_portal="wb2_p", second_portal="wb2_p")
    finally:
        c.close()
    if where == "direct":
        assert message == ECHO.format(RIGHT)
    else:
        assert message == MASKED


def test_guess_in_a_portal_of_another_name_confirms_nothing(billing: ProxyProcess) -> None:
    """Guard: the same with two portal names: the error is judged against its own statement
    (the direct answer is in the test above)."""
    c = RawClient(billing.port, user=MASKED_TRUST)
    try:
        assert portal_error(c, first_portal="wb2_p1", second_portal="wb2_p2") == MASKED
    finally:
        c.close()


# ---- accesses the audit records wrongly, or not at all ----------------------------------------


class AuditFile:
    def __init__(self, proxy: ProxyProcess, path: Path) -> None:
        self.proxy = proxy
        self.path = path

    def session(self, application_name: str) -> list[dict[str, Any]]:
        """Every event of the session with this application_name, once it has ended."""
        deadline = time.monotonic() + 60
        while True:
            events = all_events(self.path)  # complete lines: the proxy is writing
            mine = [e for e in events if e.get("application_name") == application_name]
            if any(e["type"] == "session.end" for e in mine):
                return mine
            assert time.monotonic() < deadline, f"no session.end for {application_name}"
            time.sleep(0.05)


@pytest.fixture(scope="module")
def audited(
    pg: EmbeddedPostgres, billing: ProxyProcess, tmp_path_factory: Any
) -> Iterator[AuditFile]:
    d = tmp_path_factory.mktemp("wb2-audit")
    rules = d / "rules.yaml"
    rules.write_text(RULES)
    env = {"PGVEIL_TEST_HASH_KEY": HASH_KEY, "PGVEIL_CATALOG_PASSWORD": pg.password}
    with ProxyProcess(
        pg.port, "--upstream-sslmode", "disable", "--rules", str(rules),
        "--catalog-user", pg.superuser, "--audit-file", str(d / "audit.jsonl"),
        metrics=False, env=env,
    ) as p:  # fmt: skip
        yield AuditFile(p, d / "audit.jsonl")


READ_1 = "SELECT i_customer, name FROM billing.customers WHERE i_customer = 1"
READ_2 = "SELECT i_customer, name FROM billing.customers WHERE i_customer = 2"


def who_touched_customer_1(events: list[dict[str, Any]]) -> list[str]:
    return [row["touched"] for row in who(events, "billing.customers", "1", None, None)]


def read_customers(audited: AuditFile, app: str, *, sync_inside_copy: bool) -> list[str]:
    """An unmasked session (TRUST_USER: unmasked by roles.default) reads customer 1's name,
    then customer 2's; what `pgveil audit who --subject 1` says of the session."""
    c = RawClient(audited.proxy.port, user=TRUST_USER, application_name=app)
    try:
        c.query("CREATE TEMP TABLE wb2_copy (x int)")
        if sync_inside_copy:
            copy_with_a_sync_inside(c, "wb2_copy")
        first = c.query(READ_1)
        assert NAME.encode() in rows(first)  # the raw name went out
        c.query(READ_2)
        c.query("SELECT 1")
    finally:
        c.close()
    return who_touched_customer_1(audited.session(app))


def test_access_is_recorded_with_its_subject(audited: AuditFile) -> None:
    """Guard (and premise): without the trick, `audit who` lists the read of customer 1."""
    assert read_customers(audited, "wb2-audit-plain", sync_inside_copy=False) == ["yes"]


def test_sync_inside_copy_moves_every_later_audit_event_by_one_statement(
    audited: AuditFile,
) -> None:
    """The Sync swallowed by COPY (see above) shifts StatementLog's queue: each statement's
    event is completed at the next statement's ReadyForQuery, with the next statement's
    rows, subjects and outcome. The read of customer 1 is recorded as a read of customer 2
    (subjects_complete: true), and `audit who --subject 1` no longer lists it."""
    assert read_customers(audited, "wb2-audit-copy-sync", sync_inside_copy=True) == ["yes"]


def test_copy_failing_before_it_reads_leaves_later_statements_unrecorded(
    audited: AuditFile,
) -> None:
    """`COPY v FROM STDIN` on a view: the server sends CopyInResponse, then fails ("cannot
    copy to view") before reading any input, so the Sync pipelined behind the Execute is
    not swallowed: it ends the request. StatementLog dropped it on CopyInResponse all the
    same; the error then pops every later entry up to a Sync that is no longer queued
    (StatementLog._error), among them the Query pipelined behind: it runs, returns customer
    1's name, and no access event is ever written for it."""
    app = "wb2-audit-copy-view"
    c = RawClient(audited.proxy.port, user=TRUST_USER, application_name=app)
    try:
        c.query("CREATE TEMP VIEW wb2_view AS SELECT 1 AS x")
        c.send_raw(parse("COPY wb2_view FROM STDIN") + bind() + EXECUTE + SYNC + query(READ_1))
        answered = c.until_ready() + c.until_ready()
        assert [e["C"] for e in errors_in(answered)] == ["42809"]
        assert NAME.encode() in rows(answered)  # the raw name went out
    finally:
        c.close()
    events = audited.session(app)
    accesses = [e for e in events if e["type"] == "access"]
    assert accesses, f"the read of customer 1 was not recorded: {json.dumps(events)[:1500]}"
    assert who_touched_customer_1(events) == ["yes"]


def test_portal_name_reused_in_a_new_transaction_runs_unrecorded(audited: AuditFile) -> None:
    """The stale portal of the test above, for the audit: the Bind of a read of customer 1
    to a portal name an earlier (ended) transaction used is not registered, the Execute runs
    under the old portal's fields (None: it read nothing protected), and no access event is
    written for a read of a raw personal column by an unmasked role."""
    app = "wb2-audit-portal"
    c = RawClient(audited.proxy.port, user=TRUST_USER, application_name=app)
    try:
        c.send_raw(parse("SELECT 1", name="wb2_one") + bind(stmt="wb2_one", portal="wb2_p") + SYNC)
        assert errors_in(c.until_ready()) == []
        read = parse(READ_1, name="wb2_read") + bind(stmt="wb2_read", portal="wb2_p")
        c.send_raw(read + execute("wb2_p") + SYNC)
        assert NAME.encode() in rows(c.until_ready())  # the raw name went out
    finally:
        c.close()
    events = audited.session(app)
    assert who_touched_customer_1(events) == ["yes"], json.dumps(events)[:1500]


def fetch_through_cursor(
    pg: EmbeddedPostgres, audited: AuditFile, app: str, *, stale: bool
) -> list[str]:
    """An unmasked login (billing_admin) reads customer 1 through an SQL cursor, by psycopg
    (simple protocol); with `stale`, a cursor of the same name was used by an earlier
    transaction. What `audit who --subject 1` says of the session."""
    conninfo = dsn(pg, audited.proxy.port, ADMIN, ADMIN_PW) + f" application_name={app}"
    with psycopg.connect(conninfo, autocommit=True) as c:
        if stale:
            c.execute("BEGIN")
            c.execute("DECLARE wb2_c CURSOR FOR SELECT 1")
            c.execute("COMMIT")
        c.execute("BEGIN")
        c.execute(f"DECLARE wb2_c CURSOR FOR {READ_1}")
        fetched = c.execute("FETCH ALL FROM wb2_c").fetchall()
        c.execute("COMMIT")
    assert fetched == [(1, NAME)]  # the raw name went out
    return who_touched_customer_1(audited.session(app))


def test_fetch_from_a_cursor_is_recorded_with_its_subject(
    pg: EmbeddedPostgres, audited: AuditFile
) -> None:
    """Guard (and premise): the FETCH's event carries the DECLARE's tables and the subjects
    of the rows it returned."""
    assert fetch_through_cursor(pg, audited, "wb2-audit-cursor", stale=False) == ["yes"]


def test_cursor_name_reused_in_a_new_transaction_hides_the_fetch(
    pg: EmbeddedPostgres, audited: AuditFile
) -> None:
    """The same gap with SQL cursors, from any client: StatementLog.define keeps the first
    DECLARE of a name ("so does DECLARE (42P03)") although the server dropped that cursor
    when its transaction ended. The second DECLARE is recorded with no rows (so `audit who`
    takes it as proof the subject was not touched), and the FETCH, which read the name, gets
    the old cursor's fields (none) and no event."""
    assert fetch_through_cursor(pg, audited, "wb2-audit-cursor-reused", stale=True) == ["yes"]


# ---- the exit check, and statements analysed under rules that are no longer in force ----------


class Reloadable:
    def __init__(self, proxy: ProxyProcess, rules: Path) -> None:
        self.proxy = proxy
        self.rules = rules
        self.reloads = 0

    def mask_notes(self) -> None:
        """The DBA finds that notes are personal: a rule for them, and SIGHUP."""
        self.rules.write_text(
            RULES.replace(
                "      extra: {mask: json, keys: {dl: partial}}\n",
                "      extra: {mask: json, keys: {dl: partial}}\n      notes: partial\n",
            )
        )
        self.reloads += 1
        self.proxy.signal(signal.SIGHUP)
        deadline = time.monotonic() + 60
        while self.proxy.log().count("rules.reloaded") < self.reloads:
            assert time.monotonic() < deadline, "the rules were not reloaded"
            time.sleep(0.05)
        # in force for new statements
        c = RawClient(self.proxy.port, user=MASKED_TRUST)
        try:
            got = rows(c.query(NOTES))
        finally:
            c.close()
        assert got and NOTES_VALUE not in got, got


@pytest.fixture
def reloadable(pg: EmbeddedPostgres, billing: ProxyProcess, tmp_path: Path) -> Iterator[Reloadable]:
    rules = tmp_path / "rules.yaml"
    rules.write_text(RULES)
    env = {"PGVEIL_TEST_HASH_KEY": HASH_KEY, "PGVEIL_CATALOG_PASSWORD": pg.password}
    with ProxyProcess(
        pg.port, "--upstream-sslmode", "disable", "--rules", str(rules),
        "--catalog-user", pg.superuser, metrics=False, env=env,
    ) as p:  # fmt: skip
        yield Reloadable(p, rules)


def test_the_notes_are_read_raw_directly(pg: EmbeddedPostgres) -> None:
    """The premise of the reload cases: the value the new rule protects."""
    c = RawClient(pg.port, user=MASKED_TRUST)
    try:
        assert NOTES_VALUE in rows(c.query(NOTES))
    finally:
        c.close()


def test_statement_prepared_before_a_rules_reload_reads_raw_without_describe(
    reloadable: Reloadable,
) -> None:
    """A named statement parsed (and described) while notes had no rule; the rules are
    reloaded with one. MaskedFilter re-analyses only new Query and Parse messages; a Bind and
    Execute of the old statement run its old text, and without a Describe the server sends
    no RowDescription, so _check_row_description (the exit check) never sees the raw
    column."""
    c = RawClient(reloadable.proxy.port, user=MASKED_TRUST)
    try:
        c.send_raw(parse(NOTES, name="wb2_s") + describe("S", "wb2_s") + SYNC)
        assert errors_in(c.until_ready()) == []
        c.send_raw(query(f"PREPARE wb2_q AS {NOTES}"))
        assert errors_in(c.until_ready()) == []
        reloadable.mask_notes()
        c.send_raw(bind(stmt="wb2_s") + EXECUTE + SYNC)
        by_protocol = rows(c.until_ready())
        c.send_raw(parse("EXECUTE wb2_q") + bind() + EXECUTE + SYNC)
        by_sql_execute = rows(c.until_ready())
    finally:
        c.close()
    assert NOTES_VALUE not in by_protocol, by_protocol
    assert NOTES_VALUE not in by_sql_execute, by_sql_execute


def test_asyncpg_prepared_statement_reads_raw_after_a_rules_reload(
    pg: EmbeddedPostgres, reloadable: Reloadable
) -> None:
    """The same through a driver: asyncpg describes a statement once, when it prepares it,
    and then only binds and executes it (its statement cache does so for every query a pool
    repeats)."""

    async def run() -> str:
        conn = await asyncpg.connect(
            host="127.0.0.1",
            port=reloadable.proxy.port,
            user=HELPDESK,
            password=HELPDESK_PW,
            database="postgres",
            ssl=False,
            server_settings={"client_encoding": "UTF8"},
        )
        try:
            stmt = await conn.prepare(NOTES)
            before = await stmt.fetchval()
            assert before == NOTES_VALUE.decode()  # no rule yet
            await asyncio.to_thread(reloadable.mask_notes)
            try:
                return str(await stmt.fetchval())
            except asyncpg.InsufficientPrivilegeError as exc:
                # the fix: a statement decided under the old rules is analysed again before
                # it runs, and refused when the new rules decide it otherwise
                return f"refused {exc.sqlstate}: {exc}"
        finally:
            await conn.close()

    after = asyncio.run(run())
    assert after != NOTES_VALUE.decode(), (
        "a cached prepared statement read the new rule's column raw"
    )
    assert after.startswith("refused 42501: pgveil: the masking rules changed"), after


def test_exit_check_closes_a_described_statement_prepared_before_the_reload(
    reloadable: Reloadable,
) -> None:
    """Guard: with a Describe of the portal, the RowDescription would point at the column
    the new rules protect, and the exit check would end the session before any row goes
    out; since the fix, the Bind of the statement decided under the old rules is refused
    first (ERROR 42501, the session goes on), and the exit check stays the last line."""
    c = RawClient(reloadable.proxy.port, user=MASKED_TRUST)
    try:
        c.send_raw(parse(NOTES, name="wb2_s") + SYNC)
        assert errors_in(c.until_ready()) == []
        reloadable.mask_notes()
        c.send_raw(bind(stmt="wb2_s") + describe("P") + EXECUTE + SYNC)
        out = c.until_ready()
        assert errors_in(c.query("SELECT 1")) == []  # the session goes on
    finally:
        c.close()
    assert NOTES_VALUE not in rows(out)
    assert [(e["S"], e["C"]) for e in errors_in(out)] == [("ERROR", "42501")]
    assert "the masking rules changed" in errors_in(out)[0]["M"]


def test_exit_check_closes_sql_execute_of_a_statement_prepared_before_the_reload(
    reloadable: Reloadable,
) -> None:
    """Guard: SQL EXECUTE by a simple Query gets a RowDescription: the exit check would end
    it; since the fix, the EXECUTE of a statement decided under the old rules is refused
    first (ERROR 42501)."""
    c = RawClient(reloadable.proxy.port, user=MASKED_TRUST)
    try:
        c.query(f"PREPARE wb2_q AS {NOTES}")
        reloadable.mask_notes()
        out = c.query("EXECUTE wb2_q")
    finally:
        c.close()
    assert NOTES_VALUE not in rows(out)
    assert [(e["S"], e["C"]) for e in errors_in(out)] == [("ERROR", "42501")]
    assert "the masking rules changed" in errors_in(out)[0]["M"]


@pytest.fixture
def refreshing(
    pg: EmbeddedPostgres, billing: ProxyProcess, tmp_path: Path
) -> Iterator[ProxyProcess]:
    """A pgveil that re-reads the catalog every second, and an administrator's view that
    reads no protected table (yet)."""
    rules = tmp_path / "rules.yaml"
    rules.write_text(RULES)
    pg.psql(
        "CREATE VIEW billing.wb2_labels AS "
        "SELECT i_customer_class, name FROM billing.customer_classes;"
        "GRANT SELECT ON billing.wb2_labels TO cc_staff;"
    )
    env = {"PGVEIL_TEST_HASH_KEY": HASH_KEY, "PGVEIL_CATALOG_PASSWORD": pg.password}
    try:
        with ProxyProcess(
            pg.port, "--upstream-sslmode", "disable", "--rules", str(rules),
            "--catalog-user", pg.superuser, "--catalog-refresh", "1", metrics=False, env=env,
        ) as p:  # fmt: skip
            yield p
    finally:
        pg.psql("DROP VIEW IF EXISTS billing.wb2_labels")


LABEL = "SELECT name FROM billing.wb2_labels WHERE i_customer_class = 1"


def test_statement_prepared_before_a_view_is_redefined_reads_raw_even_described(
    pg: EmbeddedPostgres, refreshing: ProxyProcess
) -> None:
    """The administrator redefines a view so that it reads a personal column (same column
    type). Once pgveil has read the catalog again, new statements on the view are refused
    ("reads protected table ... and has no masking rules of its own"); a statement prepared
    before it is re-planned by the server with the new definition and returns the raw name.
    The exit check cannot help even with a Describe: RowDescription names the view's column
    (the origin stops at the view), and a refused view is in no protection map."""
    c = RawClient(refreshing.port, user=MASKED_TRUST)
    try:
        c.send_raw(parse(LABEL, name="wb2_l") + describe("S", "wb2_l") + SYNC)
        assert errors_in(c.until_ready()) == []
        loaded = refreshing.log().count("catalog.loaded")
        pg.psql(
            "CREATE OR REPLACE VIEW billing.wb2_labels AS SELECT cc.i_customer_class, "
            "(SELECT c.name::text FROM billing.customers c "
            " WHERE c.i_customer_class = cc.i_customer_class ORDER BY c.i_customer LIMIT 1) "
            "AS name FROM billing.customer_classes cc"
        )
        deadline = time.monotonic() + 60
        while refreshing.log().count("catalog.loaded") < loaded + 2:
            assert time.monotonic() < deadline, "the catalog was not read again"
            time.sleep(0.05)
        fresh = RawClient(refreshing.port, user=MASKED_TRUST)
        try:
            assert [e["C"] for e in errors_in(fresh.query(LABEL))] == ["42501"]
        finally:
            fresh.close()
        c.send_raw(bind(stmt="wb2_l") + describe("P") + EXECUTE + SYNC)
        got = rows(c.until_ready())
    finally:
        c.close()
    assert NAME.encode() not in got, got


# ---- the login gate ---------------------------------------------------------------------------


@pytest.mark.parametrize("where", ["direct", "pgveil"])
def test_statement_begun_before_authentication_and_finished_after_login(
    pg: EmbeddedPostgres, billing: ProxyProcess, where: str
) -> None:
    """Guard: the first bytes of a Query travel with the StartupMessage (trust: the server
    authenticates at once), the rest once the login completed. _login_client_data holds the
    partial message; login_classified replays it into the masked filter, which analyses it
    when it is whole."""
    c = RawClient(pg.port if where == "direct" else billing.port, connect=False)
    try:
        startup = StartupMessage(m.PROTOCOL_3_0, {"user": MASKED_TRUST, "database": "postgres"})
        sent = query("SELECT name FROM billing.customers WHERE i_customer = 1")
        c.send_raw(startup.encode() + sent[:9])
        login = c.until_ready()
        assert login[-1][0] == "Z", login
        c.send_raw(sent[9:])
        got = rows(c.until_ready())
    finally:
        c.close()
    if where == "direct":
        assert NAME.encode() in got
    else:
        assert got and NAME.encode() not in got and not leaks(got.decode("latin-1"))


def test_missing_database_under_trust_is_the_servers_answer_byte_for_byte(
    pg: EmbeddedPostgres, billing: ProxyProcess
) -> None:
    """Guard: under trust authentication the server sends AuthenticationOk, then refuses the
    missing database: pgveil relays exactly that (it classifies nothing for a login the
    server refused), so the bytes tell nothing of pgveil or its rules."""
    answers = []
    for port in (pg.port, billing.port):
        c = RawClient(port, connect=False)
        try:
            startup = StartupMessage(
                m.PROTOCOL_3_0, {"user": MASKED_TRUST, "database": "wb2_no_such_db"}
            )
            c.send_raw(startup.encode())
            assert c.closed_by_peer()
            answers.append(c.buf)
        finally:
            c.close()
    assert answers[0] == answers[1] and b"3D000" in answers[0]


def answer_to_a_query_instead_of_a_password(port: int) -> bytes:
    """Before authentication: a StartupMessage for a SCRAM login, then a Query where the
    SASL response belongs; every byte the client gets after the SASL request."""
    c = RawClient(port, connect=False)
    try:
        startup = StartupMessage(m.PROTOCOL_3_0, {"user": HELPDESK, "database": "postgres"})
        c.send_raw(startup.encode())
        typ, _ = c.recv_message()
        assert typ == "R"
        c.send_raw(query("SELECT 1"))
        assert c.closed_by_peer()
        return c.buf
    finally:
        c.close()


def test_a_message_instead_of_a_password_gets_the_servers_answer(
    pg: EmbeddedPostgres, billing: ProxyProcess, proxy: ProxyProcess
) -> None:
    """Before authentication, pgveil should answer as the server does. With rules, a login
    is gated (SessionSettings.classify), and _login_client_data refuses a message other than
    a password while the server waits for one with its own FATAL ("pgveil: expected a
    password message during authentication", no F/L/R fields); without rules the server's
    answer goes through. An unauthenticated client thus learns that a masking pgveil is in
    front (low severity: nothing about roles, databases or what the rules say; the server
    would read only the message type and end the login, so the message could go on)."""
    direct = answer_to_a_query_instead_of_a_password(pg.port)
    assert b"expected SASL response" in direct
    assert answer_to_a_query_instead_of_a_password(proxy.port) == direct  # no rules
    assert answer_to_a_query_instead_of_a_password(billing.port) == direct


# ---- the statement-shape cache ----------------------------------------------------------------


@pytest.mark.parametrize("where", ["direct", "pgveil"])
def test_same_shape_set_config_cannot_turn_standard_conforming_strings_off(
    pg: EmbeddedPostgres, billing: ProxyProcess, where: str
) -> None:
    """Guard: the two set_config calls differ only in literals. Had the first one's analysis
    been reused for the second, standard_conforming_strings would be off, and the server
    would read the last statement as a string followed by a raw read that pgveil's parser
    takes for one long string. The shape of a set_config call is refused (its setting name
    is a placeholder), so each call is analysed as written."""
    c = RawClient(pg.port if where == "direct" else billing.port, user=MASKED_TRUST)
    try:
        c.query("SELECT set_config('application_name', 'off', false)")
        turned = c.query("SELECT set_config('standard_conforming_strings', 'off', false)")
        out = c.query("SELECT 'a\\'' , name FROM billing.customers WHERE i_customer = 1 --'")
    finally:
        c.close()
    if where == "direct":
        assert errors_in(turned) == [] and NAME.encode() in rows(out)
    else:
        assert [e["C"] for e in errors_in(turned)] == ["42501"]
        assert NAME.encode() not in rows(out) and not leaks(texts(out) + repr(rows(out)))
