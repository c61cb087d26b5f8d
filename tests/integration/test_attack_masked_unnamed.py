"""White-box attacks on the masked client's unnamed statement served by one of pgveil's
prepared statements (issue 15, 5f97876: proxy/session/masked.py "the unnamed statement",
rules/prepare.py `client_parameters_eligible`). Every case is named after the behaviour it
holds pgveil to, whether it found a problem or not.

Differential in lockstep: two bare protocol clients as the masked role, one through the
pgveil with `masked_prepare` on (`billing`), one through the pgveil with it off
(`text_proxy`), in front of the same server; each step goes to both before the next one
(a DDL step runs once, between them, as the superuser), and every message each client gets
must be the same byte for byte. Cases whose expectation is not "the same as the text path"
assert it explicitly.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from proxy.demo.embedded_pg import EmbeddedPostgres
from proxy.wire import extended
from proxy.wire import messages as m
from proxy.wire.errors import decode_fields
from tests.integration.test_attack_masked_prepared import _audited
from tests.support import ProxyProcess, RawClient

MASKED = "masked_trust"  # masked (a member of cc_staff), trust authentication
JOIN = (
    "SELECT c.i_customer, c.name, c.email, c.phone, c.balance, a.i_account, a.id, a.ip "
    "FROM billing.customers c JOIN billing.accounts a ON a.i_customer = c.i_customer "
    "WHERE c.i_customer = $1"
)
C = "SELECT i_customer, name, email, balance FROM billing.customers"
LONG = "SELECT c.name AS " + "n" * 70 + " FROM billing.customers c WHERE c.i_customer = $1"
INT4, INT8, TEXT = 23, 20, 25
SYNC = m.message(m.SYNC, b"")
FLUSH = m.message(m.FLUSH, b"")
DESCRIBE_S = extended.describe(b"S", b"")
DESCRIBE_P = extended.describe(b"P", b"")
CLOSE_S = extended.close(b"S", b"")
CLOSE_P = extended.close(b"P", b"")
EXECUTE = extended.execute(b"")

# the attack's own tables (the superuser makes them; the masked role may read them): joined
# with billing.customers so that the statement is rewritten (a masked column)
ATK = (
    "SELECT t.k, t.v, c.name FROM public.atk_t t "
    "JOIN billing.customers c ON c.i_customer = t.k WHERE t.v = $1 ORDER BY t.k"
)
ATK_DROP = (
    "SELECT t.k, c.name FROM public.atk_gone t "
    "JOIN billing.customers c ON c.i_customer = t.k WHERE t.k = $1"
)
ATK_RESULT = (
    "SELECT t.k, t.w, c.name FROM public.atk_r t "
    "JOIN billing.customers c ON c.i_customer = t.k WHERE t.k = $1"
)
SETUP = """
DROP TABLE IF EXISTS public.atk_t, public.atk_gone, public.atk_r, public.atk_plan;
CREATE TABLE public.atk_t (k int, v int);
INSERT INTO public.atk_t SELECT g, g FROM generate_series(1, 5) g;
CREATE TABLE public.atk_gone (k int);
INSERT INTO public.atk_gone VALUES (1), (2);
CREATE TABLE public.atk_r (k int, w int);
INSERT INTO public.atk_r VALUES (1, 10), (2, 20);
CREATE TABLE public.atk_plan (k int, v int, s text, p text);
INSERT INTO public.atk_plan SELECT g, 1, 'a', 'a' FROM generate_series(1, 9000) g;
INSERT INTO public.atk_plan SELECT 9000 + g, 1 + g, 'a', 'a' FROM generate_series(1, 1000) g;
INSERT INTO public.atk_plan VALUES (20000, 5000, 'a', '(');
CREATE INDEX ON public.atk_plan (v);
ANALYZE public.atk_plan;
GRANT SELECT ON public.atk_t, public.atk_gone, public.atk_r, public.atk_plan TO cc_staff;
"""


def parse(sql: str, types: tuple[int, ...] = (), name: bytes = b"") -> bytes:
    return extended.parse(name, sql.encode(), extended.type_section(types))


def bind(
    *params: str | bytes | None,
    statement: bytes = b"",
    formats: tuple[int, ...] = (),
    results: tuple[int, ...] = (),
) -> bytes:
    values = [p.encode() if isinstance(p, str) else p for p in params]
    return extended.bind(b"", statement, formats, values, results)


def run(sql: str, *params: str | bytes | None, describe: bool = True) -> list[bytes]:
    """The unnamed statement parsed, bound, described and run, as libpq's PQexecParams."""
    out = [parse(sql), bind(*params)]
    if describe:
        out.append(DESCRIBE_P)
    return [*out, EXECUTE, SYNC]


Messages = list[tuple[str, bytes]]


@dataclass(frozen=True)
class Ddl:
    """SQL run once as the superuser between the two clients' steps."""

    sql: str


@dataclass(frozen=True)
class Reread:
    """Both pgveils read the catalog again (see _reread): what pgveil knows after another
    session's DDL once its next catalog read is in (every catalog_refresh seconds, or
    sooner when a statement names what the last read did not have)."""


@dataclass(frozen=True)
class Partial:
    """Messages sent together, then exactly `count` messages read (no Sync: a Flush or
    nothing); 'TIMEOUT' recorded when they do not come within `wait` seconds."""

    messages: list[bytes]
    count: int
    wait: float = 3.0


@dataclass(frozen=True)
class Custom:
    """A step that needs the client (and whether it is the served one): its own reading."""

    act: Callable[[RawClient, bool], Messages]


Step = str | list[bytes] | Ddl | Reread | Partial | Custom


def _reread(client: RawClient) -> Messages:
    """A statement naming a relation pgveil's catalog read does not have: its session waits
    for a catalog read that begins after it (so the proxy reads the catalog now), then the
    client gets the server's error for the name."""
    return client.query("SELECT x FROM atk_reread_probe")


def _syncs(batch: list[bytes]) -> int:
    return sum(1 for message in batch if message[:1] in (b"S", b"Q"))


def _step(client: RawClient, served: bool, step: Step) -> Messages:
    if isinstance(step, str):
        return client.query(step)
    if isinstance(step, Custom):
        return step.act(client, served)
    if isinstance(step, Partial):
        client.send_raw(b"".join(step.messages))
        out: Messages = []
        client.sock.settimeout(step.wait)
        try:
            for _ in range(step.count):
                out.append(client.recv_message())
        except TimeoutError:
            out.append(("TIMEOUT", b""))
        finally:
            client.sock.settimeout(15)
        return out
    assert isinstance(step, list)
    client.send_raw(b"".join(step))
    out = []
    for _ in range(_syncs(step)):
        out += client.until_ready()
    return out


def _lockstep(
    pg: EmbeddedPostgres,
    served_port: int,
    text_port: int,
    steps: list[Step],
) -> tuple[list[Messages], list[Messages]]:
    """Each step's answer, per client (served, text). Both pgveils read the catalog first,
    each in a session of its own: DDL of an earlier case or fixture that one of them
    picked up during this case (its periodic catalog read) and the other did not would
    make their answers differ (a name the session's picture lacks, used under a catalog
    read other than the one it began under, is refused: StatementLog.absent)."""
    for port in (served_port, text_port):
        probe = RawClient(port, user=MASKED)
        try:
            _reread(probe)
        finally:
            probe.close()
    served = RawClient(served_port, user=MASKED)
    text = RawClient(text_port, user=MASKED)
    a: list[Messages] = []
    b: list[Messages] = []
    try:
        for step in steps:
            if isinstance(step, Ddl):
                pg.psql(step.sql)
                continue
            if isinstance(step, Reread):
                a.append(_reread(served))
                b.append(_reread(text))
                continue
            a.append(_step(served, True, step))
            b.append(_step(text, False, step))
    finally:
        served.close()
        text.close()
    return a, b


def _readable(messages: Messages) -> list[str]:
    return [
        f"{t} {decode_fields(b)}" if t in ("E", "N") else f"{t} {b[:60]!r}" for t, b in messages
    ]


def _assert_same(a: list[Messages], b: list[Messages]) -> None:
    for i, (x, y) in enumerate(zip(a, b, strict=True)):
        assert _readable(x) == _readable(y), f"step {i}"
        assert x == y, f"step {i}"


def _without_table_oids(steps: list[Messages]) -> list[Messages]:
    """RowDescriptions with every field's table OID zeroed."""
    out: list[Messages] = []
    for messages in steps:
        kept: Messages = []
        for t, b in messages:
            if t == "T":
                body = bytearray(b)
                pos = 2
                for _ in range(struct.unpack_from("!h", b, 0)[0]):
                    pos = body.index(0, pos) + 1
                    body[pos : pos + 4] = bytes(4)
                    pos += 18
                b = bytes(body)
            kept.append((t, b))
        out.append(kept)
    return out


def _types(messages: Messages) -> list[str]:
    return [t for t, _ in messages if t != "D"]


def _literal_error(client: RawClient) -> Messages:
    """An error quoting the session's own statement name, which the client wrote in a
    literal: the server's words, the name put back as a fixed one (the two sessions' names
    differ); both ask pg_prepared_statements (a Query drops the unnamed statement)."""
    fixed = "pgveil_prep_00000000_1"
    name = (_ours(client) or [fixed])[0]
    got = client.query(f"SELECT '\"{name}\"'::int")
    return [(t, b.replace(name.encode(), fixed.encode())) for t, b in got]


def _errors(messages: Messages) -> list[tuple[str, str]]:
    return [(f["C"], f["M"]) for t, b in messages if t == "E" for f in [decode_fields(b)]]


def _ours(client: RawClient) -> list[str]:
    """pgveil's statements in this session (their names: a masked role sees them)."""
    names = []
    for t, body in client.query(
        "SELECT name FROM pg_prepared_statements WHERE name LIKE 'pgveil\\_prep\\_%' ORDER BY name"
    ):
        if t == "D":
            (n,) = struct.unpack_from("!i", body, 2)
            names.append(body[6 : 6 + n].decode())
    return names


@pytest.fixture(scope="module")
def atk(pg: EmbeddedPostgres, billing: ProxyProcess) -> Iterator[None]:
    pg.psql(SETUP)
    yield
    pg.psql("DROP TABLE IF EXISTS public.atk_t, public.atk_gone, public.atk_r, public.atk_plan")


def _warm(sql: str, *params: str) -> list[Step]:
    """Two executions: the first as text (and pgveil's Parse), the second served."""
    return [run(sql, *params), run(sql, *params)]


# ---- differential cases: the same bytes as the text path -----------------------------------

CASES: dict[str, list[Step]] = {
    # DEALLOCATE ALL parsed as a named statement but never run: nothing was dropped, the
    # client's unnamed statement is still there (the text path runs it)
    "a DEALLOCATE ALL parsed but never executed drops nothing": [
        *_warm(JOIN, "1"),
        [parse("DEALLOCATE ALL", name=b"reset"), SYNC],
        [bind("3"), EXECUTE, SYNC],
        [DESCRIBE_S, SYNC],
    ],
    # DEALLOCATE ALL (and DISCARD ALL) never drop the server's unnamed statement: a Bind of
    # it after them runs it on the text path
    "the unnamed statement survives a DEALLOCATE ALL run by a named statement": [
        *_warm(JOIN, "1"),
        [parse("DEALLOCATE ALL", name=b"reset"), bind(statement=b"reset"), EXECUTE, SYNC],
        [bind("3"), EXECUTE, SYNC],
    ],
    # parsed first (pgveil forgets its statements then), run later, after pgveil prepared
    # again: the server drops pgveil's statement and pgveil does not know
    "a DEALLOCATE ALL parsed early and run later": [
        [parse("DEALLOCATE ALL", name=b"reset"), SYNC],
        *_warm(JOIN, "1"),
        [bind(statement=b"reset"), EXECUTE, SYNC],
        [bind("2"), EXECUTE, SYNC],
        [DESCRIBE_S, SYNC],
        run(JOIN, "3"),
        run(JOIN, "4"),
    ],
    "a DEALLOCATE ALL parsed early and run later, then Describe first": [
        [parse("DEALLOCATE ALL", name=b"reset"), SYNC],
        *_warm(JOIN, "1"),
        [bind(statement=b"reset"), EXECUTE, SYNC],
        [parse(JOIN), DESCRIBE_S, bind("2"), EXECUTE, SYNC],
        run(JOIN, "4"),
    ],
    "DISCARD ALL run from a named statement, Bind after": [
        *_warm(JOIN, "1"),
        [parse("DISCARD ALL", name=b"d"), bind(statement=b"d"), EXECUTE, SYNC],
        [bind("3"), EXECUTE, SYNC],
        run(JOIN, "2"),
        run(JOIN, "3"),
    ],
    # Flush: answers up to it come without Sync
    "Flush pipelines (no Sync between executions)": [
        *_warm(JOIN, "1"),
        Partial([parse(JOIN), bind("2"), DESCRIBE_P, EXECUTE, FLUSH], 5),
        Partial([parse(JOIN), bind("3"), DESCRIBE_P, EXECUTE, FLUSH], 5),
        [SYNC],
        Partial([parse(JOIN), FLUSH], 1),
        Partial([DESCRIBE_S, FLUSH], 2),
        [bind("4"), EXECUTE, SYNC],
        run(JOIN, "5"),
    ],
    "Flush, then the next Parse before any Sync": [
        run(JOIN, "1"),
        Partial([parse(JOIN), bind("1"), EXECUTE, FLUSH], 4),
        [parse(JOIN), bind("2"), EXECUTE, SYNC],
        Partial([parse(JOIN), bind("abc"), EXECUTE, FLUSH], 2),
        [SYNC],
        run(JOIN, "3"),
    ],
    "row limits, portal suspension, a Parse while the portal is open": [
        *_warm(f"{C} WHERE i_customer < $1 ORDER BY i_customer", "10"),
        "BEGIN",
        [
            parse(f"{C} WHERE i_customer < $1 ORDER BY i_customer"),
            bind("10"),
            extended.execute(b"", 2),
            SYNC,
        ],
        [parse(f"{C} WHERE i_customer < $1 ORDER BY i_customer"), SYNC],
        [extended.execute(b"", 2), SYNC],
        [bind("5"), extended.execute(b"", 1), CLOSE_S, extended.execute(b"", 0), SYNC],
        [DESCRIBE_S, SYNC],
        "COMMIT",
        run(f"{C} WHERE i_customer < $1 ORDER BY i_customer", "3"),
    ],
    "extended BEGIN, savepoints, a failed block, ROLLBACK TO": [
        *_warm(JOIN, "1"),
        [parse("BEGIN"), bind(), EXECUTE, SYNC],
        run(JOIN, "2"),
        [parse("SAVEPOINT s"), bind(), EXECUTE, SYNC],
        run(JOIN, "abc"),
        run(JOIN, "2"),  # (in the failed block: 25P02)
        [parse(JOIN), SYNC],
        [bind("2"), EXECUTE, SYNC],
        [parse("ROLLBACK TO SAVEPOINT s"), bind(), EXECUTE, SYNC],
        [bind("2"), EXECUTE, SYNC],
        run(JOIN, "3"),
        [parse("COMMIT"), bind(), EXECUTE, SYNC],
        [bind("4"), EXECUTE, SYNC],
    ],
    "an error in the same batch before the Parse": [
        *_warm(JOIN, "1"),
        [parse(f"{C} WHERE nosuch = $1"), bind("1"), EXECUTE, parse(JOIN), bind("2"), SYNC],
        [bind("2"), EXECUTE, SYNC],
        [parse("SELECT 1/0"), bind(), EXECUTE, SYNC, *run(JOIN, "3")],
    ],
    "declared types: int8, text, unknown (0), too many, too few": [
        *_warm(JOIN, "1"),
        [parse(JOIN, (INT8,)), DESCRIBE_S, bind("3000000000"), EXECUTE, SYNC],
        [parse(JOIN, (INT8,)), DESCRIBE_S, bind("3000000000"), EXECUTE, SYNC],
        [parse(JOIN, (0,)), DESCRIBE_S, bind("2"), EXECUTE, SYNC],
        [parse(JOIN, (0,)), DESCRIBE_S, bind("2"), EXECUTE, SYNC],
        [parse(JOIN, (TEXT,)), DESCRIBE_S, bind("2"), EXECUTE, SYNC],
        [parse(JOIN, (TEXT,)), DESCRIBE_S, bind("2"), EXECUTE, SYNC],
        [parse(JOIN, (INT4, INT4)), DESCRIBE_S, bind("2", "3"), EXECUTE, SYNC],
        [parse(JOIN, (INT4, INT4)), DESCRIBE_S, bind("2", "3"), EXECUTE, SYNC],
        [parse(JOIN), bind("1", "2"), EXECUTE, SYNC],
        [parse(JOIN), bind(), EXECUTE, SYNC],
        [parse(JOIN), bind("1", formats=(1,)), EXECUTE, SYNC],
        [parse(JOIN), bind("1", formats=(0, 0)), EXECUTE, SYNC],
        [parse(JOIN), bind("1", results=(1, 0)), EXECUTE, SYNC],
        [parse(JOIN), bind(struct.pack("!i", 4), formats=(1,), results=(1,)), EXECUTE, SYNC],
    ],
    "a literal naming pgveil's statements in an error": [
        *_warm(JOIN, "1"),
        Custom(lambda client, served: _literal_error(client)),
    ],
    # the unnamed statement served by a statement pgveil closed as least recently used:
    # 64 other texts prepared since
    "eviction: 65 texts, then the first again, and a Bind of it after Sync": [
        *_warm(JOIN, "1"),
        *[run(f"{C} WHERE i_customer = $1 AND {i} = {i}", "1") for i in range(66)],
        run(JOIN, "2"),
        run(JOIN, "3"),
        [bind("4"), EXECUTE, SYNC],
    ],
    "eviction while the unnamed statement is pgveil's, then a Bind of it": [
        *_warm(JOIN, "1"),
        *[
            Partial([parse(f"{C} WHERE i_customer = $1 AND {i} = {i}"), FLUSH], 1)
            for i in range(66)
        ],
        [SYNC],
        [bind("4"), EXECUTE, SYNC],
        run(JOIN, "2"),
        [bind("4"), EXECUTE, SYNC],
    ],
    "a Query in the middle of an extended batch (no Sync before it)": [
        *_warm(JOIN, "1"),
        [parse(JOIN), bind("2"), EXECUTE, m.message(m.QUERY, b"SELECT 1\0")],
        [bind("2"), EXECUTE, SYNC],
        run(JOIN, "3"),
    ],
    # the server's parser notices a long identifier (42622, truncated): a notice of the Parse
    # itself, which the text path gets once per Parse; pgveil's own Parse of the same text
    # (the first time) and its Close in place of the Parse (later) change how many come
    "a notice from parsing the text (a long identifier)": [
        run(LONG, "1"),
        run(LONG, "2"),
        run(LONG, "3"),
        [parse(LONG), SYNC],
    ],
    "COPY TO STDOUT between": [
        *_warm(JOIN, "1"),
        "COPY (SELECT 1) TO STDOUT",
        run(JOIN, "2"),
        [parse("COPY (SELECT 2) TO STDOUT"), bind(), EXECUTE, SYNC],
        run(JOIN, "3"),
        [bind("3"), EXECUTE, SYNC],
    ],
}


@pytest.mark.parametrize("case", list(CASES))
def test_same_as_text(
    pg: EmbeddedPostgres, billing: ProxyProcess, text_proxy: ProxyProcess, atk: None, case: str
) -> None:
    served, text = _lockstep(pg, billing.port, text_proxy.port, CASES[case])
    _assert_same(served, text)


# ---- catalog changes between executions (another session's DDL) ---------------------------

ATK_UNQUALIFIED = (
    "SELECT t.k, t.v, c.name FROM atk_t t "
    "JOIN billing.customers c ON c.i_customer = t.k WHERE t.v = $1 ORDER BY t.k"
)
PLAN = (
    "SELECT t.k, c.name FROM public.atk_plan t JOIN billing.customers c ON c.i_customer = 1 "
    "WHERE t.s ~ t.p AND t.v = $1"
)
RESET_R = Ddl("ALTER TABLE public.atk_r ALTER COLUMN w TYPE int")
WIDEN_R = Ddl("ALTER TABLE public.atk_r ALTER COLUMN w TYPE bigint")
RESET_T = Ddl("ALTER TABLE public.atk_t ALTER COLUMN v TYPE int USING v::int")

# Another session's DDL between executions. The server analyses a statement it keeps again
# with the parameter types of its first Parse, where the text path's Parse infers them
# anew; pgveil prepares anew once its catalog read after the DDL is in (the context changed),
# and until then relies on the server refusing what changed (0A000, 26000, class 42 at the
# Bind: the client's messages go again with the text when the Bind came right after the
# Parse, a Sync ended the batch, nothing followed and no block is open). Each case here
# reads the catalog again after the DDL (`Reread`): from then on the client cannot tell.
# What a client can see inside that window is pinned in test_within_the_catalog_window.
DDL_CASES: dict[str, list[Step]] = {
    "outdated (result type), idle, Bind right after Parse: sent again (no re-read)": [
        RESET_R,
        *_warm(ATK_RESULT, "1"),
        WIDEN_R,
        run(ATK_RESULT, "1"),
        run(ATK_RESULT, "2"),
        RESET_R,
    ],
    "a joined table dropped between executions (no re-read)": [
        *_warm(ATK_DROP, "1"),
        Ddl("DROP TABLE public.atk_gone"),
        run(ATK_DROP, "1"),
        [parse(ATK_DROP), SYNC],
        Ddl(
            "CREATE TABLE public.atk_gone (k int); INSERT INTO public.atk_gone VALUES (2);"
            "GRANT SELECT ON public.atk_gone TO cc_staff"
        ),
        run(ATK_DROP, "2"),
        run(ATK_DROP, "2"),
    ],
    "a joined table dropped and created again with the same name (no re-read)": [
        *_warm(ATK_DROP, "1"),
        Ddl(
            "DROP TABLE public.atk_gone; CREATE TABLE public.atk_gone (k int);"
            "INSERT INTO public.atk_gone VALUES (2); GRANT SELECT ON public.atk_gone TO cc_staff"
        ),
        run(ATK_DROP, "2"),
        run(ATK_DROP, "2"),
    ],
    "privileges revoked between executions (no re-read)": [
        *_warm(ATK_DROP, "1"),
        Ddl("REVOKE SELECT ON public.atk_gone FROM cc_staff"),
        run(ATK_DROP, "1"),
        [parse(ATK_DROP), SYNC],
        Ddl("GRANT SELECT ON public.atk_gone TO cc_staff"),
        run(ATK_DROP, "1"),
    ],
    "outdated, then Flush: the client waits for rows (re-read)": [
        RESET_R,
        *_warm(ATK_RESULT, "1"),
        WIDEN_R,
        Reread(),
        Partial([parse(ATK_RESULT), bind("1"), DESCRIBE_P, EXECUTE, FLUSH], 5),
        [SYNC],
        RESET_R,
    ],
    "outdated, Describe statement before the Bind (JDBC's order) (re-read)": [
        RESET_R,
        *_warm(ATK_RESULT, "1"),
        WIDEN_R,
        Reread(),
        [parse(ATK_RESULT), DESCRIBE_S, bind("1"), DESCRIBE_P, EXECUTE, SYNC],
        run(ATK_RESULT, "2"),
        RESET_R,
    ],
    "outdated, Parse and Sync first, Bind in the next batch (re-read)": [
        RESET_R,
        *_warm(ATK_RESULT, "1"),
        WIDEN_R,
        Reread(),
        [parse(ATK_RESULT), SYNC],
        [bind("1"), DESCRIBE_P, EXECUTE, SYNC],
        RESET_R,
    ],
    "outdated, a long batch (17 messages before the Sync) (re-read)": [
        RESET_R,
        *_warm(ATK_RESULT, "1"),
        WIDEN_R,
        Reread(),
        [parse(ATK_RESULT), bind("1"), DESCRIBE_P, EXECUTE, *[FLUSH] * 14, SYNC],
        RESET_R,
    ],
    "outdated inside a transaction block (re-read)": [
        RESET_R,
        *_warm(ATK_RESULT, "1"),
        "BEGIN",
        WIDEN_R,
        Reread(),
        run(ATK_RESULT, "1"),
        run(ATK_RESULT, "2"),
        "ROLLBACK",
        RESET_R,
    ],
    "outdated, two executions in one write (two Syncs) (re-read)": [
        RESET_R,
        *_warm(ATK_RESULT, "1"),
        WIDEN_R,
        Reread(),
        [*run(ATK_RESULT, "1"), bind("2"), EXECUTE, SYNC],
        RESET_R,
    ],
    "a parameter's inferred type changes (int to bigint) (re-read)": [
        RESET_T,
        *_warm(ATK, "1"),
        Ddl("ALTER TABLE public.atk_t ALTER COLUMN k TYPE int, ALTER COLUMN v TYPE bigint"),
        Reread(),
        [parse(ATK), DESCRIBE_S, bind("3000000000"), DESCRIBE_P, EXECUTE, SYNC],
        [parse(ATK), DESCRIBE_S, bind("3"), EXECUTE, SYNC],
        RESET_T,
    ],
    "a parameter's inferred type changes (int to text) (re-read)": [
        RESET_T,
        *_warm(ATK, "1"),
        Ddl("ALTER TABLE public.atk_t ALTER COLUMN v TYPE text"),
        Reread(),
        [parse(ATK), DESCRIBE_S, bind("3"), DESCRIBE_P, EXECUTE, SYNC],
        [parse(ATK), DESCRIBE_S, bind("03"), DESCRIBE_P, EXECUTE, SYNC],
        RESET_T,
        Ddl("UPDATE public.atk_t SET v = k"),
    ],
    # this session's own DDL and SET: pgveil sees them go (no re-read needed)
    "a temporary table shadows the name after the statement was kept": [
        "CREATE TEMP TABLE atk_dummy (x int)",
        *_warm(ATK_UNQUALIFIED, "1"),
        "CREATE TEMP TABLE atk_t (k int, v int)",
        "INSERT INTO atk_t VALUES (2, 1)",
        run(ATK_UNQUALIFIED, "1"),
        run(ATK_UNQUALIFIED, "1"),
        "DROP TABLE atk_t",
        run(ATK_UNQUALIFIED, "1"),
    ],
    "search_path changed between executions": [
        Ddl(
            "DROP SCHEMA IF EXISTS atk_s CASCADE; CREATE SCHEMA atk_s;"
            "CREATE TABLE atk_s.atk_t (k int, v text); INSERT INTO atk_s.atk_t VALUES (1, '1');"
            "GRANT USAGE ON SCHEMA atk_s TO cc_staff; GRANT SELECT ON atk_s.atk_t TO cc_staff"
        ),
        *_warm(ATK_UNQUALIFIED, "1"),
        "SET search_path = atk_s, public",
        run(ATK_UNQUALIFIED, "1"),
        run(ATK_UNQUALIFIED, "1"),
        "RESET search_path",
        run(ATK_UNQUALIFIED, "1"),
    ],
    "search_path set in a block that is rolled back": [
        Ddl(
            "DROP SCHEMA IF EXISTS atk_s CASCADE; CREATE SCHEMA atk_s;"
            "CREATE TABLE atk_s.atk_t (k int, v text); INSERT INTO atk_s.atk_t VALUES (1, '1');"
            "GRANT USAGE ON SCHEMA atk_s TO cc_staff; GRANT SELECT ON atk_s.atk_t TO cc_staff"
        ),
        *_warm(ATK_UNQUALIFIED, "1"),
        "BEGIN",
        "SET search_path = atk_s, public",
        run(ATK_UNQUALIFIED, "1"),
        run(ATK_UNQUALIFIED, "1"),
        "ROLLBACK",
        run(ATK_UNQUALIFIED, "1"),
        run(ATK_UNQUALIFIED, "1"),
    ],
}


@pytest.mark.parametrize("case", list(DDL_CASES))
def test_same_as_text_across_ddl(
    pg: EmbeddedPostgres, billing: ProxyProcess, text_proxy: ProxyProcess, atk: None, case: str
) -> None:
    served, text = _lockstep(pg, billing.port, text_proxy.port, DDL_CASES[case])
    if "temporary" in case:
        # each session reads its own temporary table: their OIDs differ
        served, text = _without_table_oids(served), _without_table_oids(text)
    _assert_same(served, text)


def test_within_the_catalog_window(
    pg: EmbeddedPostgres, billing: ProxyProcess, text_proxy: ProxyProcess, atk: None
) -> None:
    """What a client can see between another session's DDL and pgveil's next catalog read
    (README: the unnamed statement), pinned: where pgveil cannot send the client's messages
    again, the server's refusal of its statement reaches the client (as it would for a
    statement the client had prepared itself), and a parameter keeps the type inferred at
    its first Parse. After the next catalog read, each of these is as the text path's
    (test_same_as_text_across_ddl)."""
    steps: list[Step] = [
        RESET_R,
        Reread(),  # (no catalog read of an earlier case's is still to come)
        *_warm(ATK_RESULT, "1"),
        WIDEN_R,
        [parse(ATK_RESULT), DESCRIBE_S, bind("1"), DESCRIBE_P, EXECUTE, SYNC],
        RESET_R,
        RESET_T,
        Reread(),
        *_warm(ATK, "1"),
        Ddl("ALTER TABLE public.atk_t ALTER COLUMN k TYPE int, ALTER COLUMN v TYPE bigint"),
        [parse(ATK), DESCRIBE_S, SYNC],
        RESET_T,
    ]
    served, text = _lockstep(pg, billing.port, text_proxy.port, steps)
    outdated, described = served[3], served[7]  # (Ddl steps have no answers)
    assert _errors(outdated) == [("0A000", "cached plan must not change result type")]
    assert not _errors(text[3])
    # ParameterDescription: int4 (23) where the text path's Parse infers int8 (20)
    assert ("t", struct.pack("!hI", 1, 23)) in described
    assert ("t", struct.pack("!hI", 1, 20)) in text[7]


def test_a_generic_plan_may_visit_other_rows(
    pg: EmbeddedPostgres, billing: ProxyProcess, text_proxy: ProxyProcess, atk: None
) -> None:
    """README (the unnamed statement): a statement the server keeps may get a generic plan
    after five executions, which may visit other rows than the text's custom plan; what
    SQL leaves to the plan may then differ: here, whether a condition that fails on a row
    the index scan never reads raises its error (the order of rows without ORDER BY, and
    which tied rows a LIMIT keeps, likewise). Rows that both return are the same."""
    steps: list[Step] = [run(PLAN, "1") for _ in range(8)]
    served, text = _lockstep(pg, billing.port, text_proxy.port, steps)
    assert all(_errors(t) == [("2201B", _errors(t)[0][1])] for t in text)
    assert _errors(served[0]) == _errors(text[0])
    assert any(not _errors(x) for x in served[5:])


# ---- what a client can do with pgveil's statements (their names are readable) --------------


def _close_ours(client: RawClient, served: bool) -> Messages:
    """A Close of each of pgveil's statements, by the name pg_prepared_statements shows (the
    text path's client closes a name that does not exist: CloseComplete all the same). Both
    clients ask pg_prepared_statements: a Query drops the unnamed statement."""
    found = _ours(client)
    assert bool(found) == served
    names = found or ["pgveil_prep_00000000_1"]
    client.send_raw(b"".join(extended.close(b"S", n.encode()) for n in names[:1]) + SYNC)
    return client.until_ready()


CLIENT_CASES: dict[str, list[Step]] = {
    "the client closes pgveil's statement by name, then binds its unnamed statement": [
        *_warm(JOIN, "1"),
        Custom(_close_ours),
        [bind("2"), EXECUTE, SYNC],
        [DESCRIBE_S, SYNC],
        run(JOIN, "3"),
        run(JOIN, "4"),
    ],
    "the client closes pgveil's statement by name, then parses the unnamed statement": [
        *_warm(JOIN, "1"),
        Custom(_close_ours),
        run(JOIN, "2"),
        [parse(JOIN), DESCRIBE_S, bind("3"), EXECUTE, SYNC],
        run(JOIN, "4"),
    ],
}


@pytest.mark.parametrize("case", list(CLIENT_CASES))
def test_same_as_text_when_the_client_closes_pgveils_statement(
    pg: EmbeddedPostgres, billing: ProxyProcess, text_proxy: ProxyProcess, atk: None, case: str
) -> None:
    served, text = _lockstep(pg, billing.port, text_proxy.port, CLIENT_CASES[case])
    _assert_same(served, text)


def test_pgveils_statement_cannot_be_bound_described_or_replaced(billing: ProxyProcess) -> None:
    """By name: Bind and Describe are refused, a Parse or PREPARE of the name, EXECUTE and
    DEALLOCATE of it too; the unnamed statement still runs pgveil's statement after."""
    client = RawClient(billing.port, user=MASKED)
    try:
        for step in _warm(JOIN, "1"):
            assert isinstance(step, list)
            client.send_raw(b"".join(step))
            client.until_ready()
        (name,) = _ours(client)
        for batch in (
            [bind("1", statement=name.encode()), EXECUTE, SYNC],
            [extended.describe(b"S", name.encode()), SYNC],
            [parse("SELECT 1", name=name.encode()), SYNC],
            [parse("SELECT 1", name=name.encode() + b"x"), SYNC],
        ):
            client.send_raw(b"".join(batch))
            got = client.until_ready()
            assert [c for c, _ in _errors(got)] == ["42501"], _readable(got)
        for sql in (
            f"EXECUTE {name}(1)",
            f"DEALLOCATE {name}",
            f'DEALLOCATE "{name}"',
            f"PREPARE {name} AS SELECT 1",
            f"PREPARE {name}x AS SELECT 1",
        ):
            got = client.query(sql)
            assert [c for c, _ in _errors(got)] == ["42501"], (sql, _readable(got))
        assert _ours(client) == [name]
        client.send_raw(b"".join(run(JOIN, "2")))
        assert _types(client.until_ready()) == ["1", "2", "T", "C", "Z"]
    finally:
        client.close()


# ---- the audit ------------------------------------------------------------------------------


def _audit_session(pg: EmbeddedPostgres, steps: list[Step]) -> Callable[[int], None]:
    def go(port: int) -> None:
        client = RawClient(port, user=MASKED)
        try:
            for step in steps:
                if isinstance(step, Ddl):
                    pg.psql(step.sql)
                else:
                    _step(client, True, step)
        finally:
            client.close()

    return go


AUDIT_CASES: dict[str, list[Step]] = {
    "executions, errors, pipelines, Describe, an outdated statement sent again": [
        *[run(JOIN, str(i % 3 + 1)) for i in range(4)],
        run(JOIN, "abc"),
        [*run(JOIN, "1"), *run(JOIN, "2")],
        [parse(JOIN), DESCRIBE_S, bind("2"), EXECUTE, SYNC],
        [bind("3"), EXECUTE, SYNC],
        RESET_R,
        *_warm(ATK_RESULT, "1"),
        WIDEN_R,
        run(ATK_RESULT, "1"),
        RESET_R,
    ],
    "a Bind after a DEALLOCATE ALL that was parsed, not run": [
        *_warm(JOIN, "1"),
        [parse("DEALLOCATE ALL", name=b"reset"), SYNC],
        [bind("3"), EXECUTE, SYNC],
    ],
}


@pytest.mark.parametrize("case", list(AUDIT_CASES))
def test_audit_events_are_the_same(
    pg: EmbeddedPostgres, billing: ProxyProcess, atk: None, tmp_path: Path, case: str
) -> None:
    session = _audit_session(pg, AUDIT_CASES[case])
    served, text = (_audited(pg, tmp_path, setting, session) for setting in ("true", "false"))
    assert served
    assert served == text


def test_the_proxy_logged_no_traceback(billing: ProxyProcess, text_proxy: ProxyProcess) -> None:
    """(last: after every case above ran through both)"""
    assert "Traceback" not in billing.log()
    assert "Traceback" not in text_proxy.log()
