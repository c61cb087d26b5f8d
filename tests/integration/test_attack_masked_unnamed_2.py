"""White-box attacks on the masked client's unnamed statement, second round (a74721f: the
held ParseComplete and the batch sent again, the "lost" unnamed statement given its text
again, the epoch, Close of pgveil's names). Same harness as test_attack_masked_unnamed.py:
two bare clients in lockstep, one through the pgveil with `masked_prepare` on, one through
the one with it off; every message must be the same byte for byte unless a case says
otherwise. Every case is named after the behaviour it holds pgveil to, whether it found a
problem or not.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from proxy.demo.embedded_pg import EmbeddedPostgres
from proxy.wire import extended
from proxy.wire import messages as m
from tests.integration.test_attack_masked_prepared import _audited
from tests.integration.test_attack_masked_unnamed import (
    CLOSE_P,
    DESCRIBE_P,
    DESCRIBE_S,
    EXECUTE,
    FLUSH,
    JOIN,
    MASKED,
    SYNC,
    Custom,
    Ddl,
    Messages,
    Partial,
    Step,
    _assert_same,
    _audit_session,
    _errors,
    _lockstep,
    _ours,
    _readable,
    _types,
    _warm,
    _without_table_oids,
    atk,
    bind,
    parse,
    run,
)
from tests.support import ProxyProcess, RawClient

__all__ = ["atk"]

FIXED = "pgveil_prep_00000000_1"

SETUP = """
DROP TABLE IF EXISTS public.atk2_r;
DROP DOMAIN IF EXISTS public.atk2_dom, public.atk2_bad;
DROP FUNCTION IF EXISTS public.atk2_note(int), public.atk2_fail(int);
DROP SCHEMA IF EXISTS atk_s CASCADE;
CREATE TABLE public.atk2_r (k int, r regclass, d text);
INSERT INTO public.atk2_r VALUES (1, 'billing.customers', 'pg_class'),
  (2, 'billing.accounts', 'pg_type');
-- built-in functions only (a domain calling another function closes masked sessions):
-- to_tsquery notices a text of stop words only, regclass's input fails with 42P01
CREATE DOMAIN public.atk2_dom AS text CHECK (to_tsquery('english', VALUE) IS NOT NULL);
CREATE DOMAIN public.atk2_bad AS text
  CHECK (to_tsquery('english', VALUE) IS NOT NULL AND VALUE::regclass IS NOT NULL);
GRANT SELECT ON public.atk2_r TO cc_staff;
CREATE SCHEMA atk_s;
CREATE TABLE atk_s.atk_t (k int, v text);
INSERT INTO atk_s.atk_t VALUES (1, '1');
GRANT USAGE ON SCHEMA atk_s TO cc_staff;
GRANT SELECT ON atk_s.atk_t TO cc_staff;
"""
OIDS: dict[str, int] = {}

REG = (
    "SELECT t.k, c.name FROM public.atk2_r t "
    "JOIN billing.customers c ON c.i_customer = t.k WHERE t.r = $1"
)
DOM = (
    "SELECT t.k, c.name FROM public.atk2_r t "
    "JOIN billing.customers c ON c.i_customer = t.k WHERE t.d = $1"
)
ATK_UNQUALIFIED = (
    "SELECT t.k, t.v, c.name FROM atk_t t "
    "JOIN billing.customers c ON c.i_customer = t.k WHERE t.v = $1 ORDER BY t.k"
)


@pytest.fixture(scope="module")
def atk2(pg: EmbeddedPostgres, billing: ProxyProcess, atk: None) -> Iterator[None]:
    pg.psql(SETUP)
    for name in ("atk2_dom", "atk2_bad"):
        OIDS[name] = int(pg.psql(f"SELECT oid FROM pg_type WHERE typname = '{name}'").strip())
    yield
    pg.psql(
        "DROP TABLE IF EXISTS public.atk2_r; DROP DOMAIN IF EXISTS public.atk2_dom, "
        "public.atk2_bad; DROP SCHEMA IF EXISTS atk_s CASCADE"
    )


def _send(client: RawClient, batch: list[bytes]) -> Messages:
    client.send_raw(b"".join(batch))
    out: Messages = []
    for _ in range(sum(1 for x in batch if x[:1] in (b"S", b"Q"))):
        out += client.until_ready()
    return out


def later(build: Callable[[], list[bytes]]) -> Custom:
    """A batch built when the step runs (the domains' OIDs are known by then)."""
    return Custom(lambda client, served: _send(client, build()))


def dom(sql: str, name: str = "atk2_dom") -> Callable[[], bytes]:
    return lambda: parse(sql, (OIDS[name],))


def _bind_ours_after_parse(client: RawClient, served: bool) -> Messages:
    """pgveil's real statement name (the served client's; a name with the prefix for the
    other), then a served Parse and, right after it, a Bind naming pgveil's statement: pgveil
    refuses the Bind (42501); whatever the server says must not make it go again unrefused."""
    found = _ours(client)
    name = found[0] if found else FIXED
    _send(client, run(JOIN, "2"))  # (the unnamed statement is pgveil's again)
    got = _send(client, [parse(JOIN), bind("3", statement=name.encode()), EXECUTE, SYNC])
    return [(t, b.replace(name.encode(), FIXED.encode())) for t, b in got]


def _describe_ours_in_batch(client: RawClient, served: bool) -> Messages:
    found = _ours(client)
    name = found[0] if found else FIXED
    _send(client, run(JOIN, "2"))
    got = _send(
        client,
        [parse(JOIN), bind("3"), extended.describe(b"S", name.encode()), EXECUTE, SYNC],
    )
    return [(t, b.replace(name.encode(), FIXED.encode())) for t, b in got]


def _close_ours_portal_and_statement(client: RawClient, served: bool) -> Messages:
    found = _ours(client)
    name = (found[0] if found else FIXED).encode()
    _send(client, run(JOIN, "2"))
    return _send(
        client,
        [
            parse(JOIN),
            extended.close(b"P", name),
            bind("3"),
            extended.close(b"S", name),
            EXECUTE,
            extended.close(b"S", name),
            DESCRIBE_S,
            bind("4"),
            EXECUTE,
            SYNC,
        ],
    )


# DEALLOCATE ALL run from a named statement after the unnamed statement was served, then
# another session drops the table its text reads
_DEALLOCATED_THEN_DROPPED: list[Step] = [
    [parse("DEALLOCATE ALL", name=b"reset"), SYNC],
    Ddl(
        "DROP TABLE IF EXISTS public.atk2_g; CREATE TABLE public.atk2_g (k int);"
        "INSERT INTO public.atk2_g VALUES (1); GRANT SELECT ON public.atk2_g TO cc_staff"
    ),
    *_warm(
        "SELECT t.k, c.name FROM public.atk2_g t "
        "JOIN billing.customers c ON c.i_customer = t.k WHERE t.k = $1",
        "1",
    ),
    [bind(statement=b"reset"), EXECUTE, SYNC],
    Ddl("DROP TABLE public.atk2_g"),
]


CASES: dict[str, list[Step]] = {
    # ---- the held ParseComplete and the batch sent again ----
    "a Bind naming pgveil's statement right after the served Parse (refused) stays refused": [
        *_warm(JOIN, "1"),
        Custom(_bind_ours_after_parse),
        run(JOIN, "4"),
    ],
    "a Describe naming pgveil's statement in the served batch (refused)": [
        *_warm(JOIN, "1"),
        Custom(_describe_ours_in_batch),
        run(JOIN, "4"),
    ],
    "a genuine class-42 Bind error (regclass input) right after the served Parse": [
        *_warm(REG, "billing.customers"),
        run(REG, "atk2_nosuch"),
        run(REG, "billing.accounts"),
        [parse(REG), bind("atk2_nosuch"), EXECUTE, SYNC, *run(REG, "billing.customers")],
        "BEGIN",
        run(REG, "atk2_nosuch"),
        "ROLLBACK",
    ],
    "a NOTICE raised in the Bind (a domain's check) while the ParseComplete is held": [
        later(lambda: [dom(DOM)(), bind("pg_class"), EXECUTE, SYNC]),
        later(lambda: [dom(DOM)(), bind("pg_class"), EXECUTE, SYNC]),
        later(lambda: [dom(DOM)(), bind("the"), DESCRIBE_P, EXECUTE, SYNC]),
        later(lambda: [dom(DOM)(), bind("pg_type"), EXECUTE, SYNC]),
    ],
    "a genuine class-42 error with a NOTICE before it in the Bind (a domain's check)": [
        later(lambda: [dom(DOM, "atk2_bad")(), bind("pg_class"), EXECUTE, SYNC]),
        later(lambda: [dom(DOM, "atk2_bad")(), bind("pg_class"), EXECUTE, SYNC]),
        later(lambda: [dom(DOM, "atk2_bad")(), bind("the"), EXECUTE, SYNC]),
        later(lambda: [dom(DOM, "atk2_bad")(), bind("pg_type"), EXECUTE, SYNC]),
    ],
    "LISTEN, then a served execution (a notification may come between)": [
        "LISTEN invoice_events",
        *_warm(JOIN, "1"),
        run(JOIN, "2"),
        "UNLISTEN *",
    ],
    # ---- the "lost" unnamed statement ----
    "DEALLOCATE ALL parsed as a named statement, then a Bind of '' in the same batch": [
        *_warm(JOIN, "1"),
        [parse("DEALLOCATE ALL", name=b"reset"), bind("3"), EXECUTE, SYNC],
        [bind("4"), EXECUTE, SYNC],
    ],
    "DEALLOCATE ALL run by a named statement, then a Bind of '' in the same batch": [
        [parse("DEALLOCATE ALL", name=b"reset"), SYNC],
        *_warm(JOIN, "1"),
        [bind(statement=b"reset"), EXECUTE, bind("3"), EXECUTE, SYNC],
        [bind("4"), EXECUTE, SYNC],
    ],
    "DEALLOCATE ALL run, then a Describe and a Bind of '' behind a Flush": [
        [parse("DEALLOCATE ALL", name=b"reset"), SYNC],
        *_warm(JOIN, "1"),
        Partial([bind(statement=b"reset"), EXECUTE, FLUSH], 2),
        Partial([DESCRIBE_S, FLUSH], 2),
        [bind("3"), EXECUTE, SYNC],
    ],
    "DEALLOCATE ALL run, then the table dropped: the text given again fails": [
        *_DEALLOCATED_THEN_DROPPED,
        [bind("1"), EXECUTE, SYNC],
        [bind("1"), EXECUTE, SYNC],
        # (a Describe of it now: see test_describe_of_a_lost_statement_whose_text_fails)
    ],
    "DEALLOCATE ALL run, then a Bind of '' in a failed block": [
        [parse("DEALLOCATE ALL", name=b"reset"), SYNC],
        *_warm(JOIN, "1"),
        [bind(statement=b"reset"), EXECUTE, SYNC],
        "BEGIN",
        "SELECT 1/0",
        [bind("2"), EXECUTE, SYNC],
        "ROLLBACK",
        [bind("2"), EXECUTE, SYNC],
    ],
    "DEALLOCATE ALL run, then a Bind of '' with a wrong parameter count": [
        [parse("DEALLOCATE ALL", name=b"reset"), SYNC],
        *_warm(JOIN, "1"),
        [bind(statement=b"reset"), EXECUTE, SYNC],
        [bind("2", "3"), EXECUTE, SYNC],
        [bind("2"), EXECUTE, SYNC],
    ],
    "DISCARD ALL in a Query between (the unnamed statement dropped by the Query)": [
        *_warm(JOIN, "1"),
        "DISCARD ALL",
        [bind("2"), EXECUTE, SYNC],
        run(JOIN, "2"),
        run(JOIN, "3"),
    ],
    # ---- the epoch: what changes name resolution without SET or DDL ----
    "set_config('search_path') in a SELECT, then Describe of the statement": [
        *_warm(ATK_UNQUALIFIED, "1"),
        "SELECT set_config('search_path', 'atk_s, public', false)",
        [parse(ATK_UNQUALIFIED), DESCRIBE_S, SYNC],
        [parse(ATK_UNQUALIFIED), DESCRIBE_S, bind("1"), EXECUTE, SYNC],
        "RESET search_path",
    ],
    "set_config('search_path') in a SELECT inside a block": [
        *_warm(ATK_UNQUALIFIED, "1"),
        "BEGIN",
        "SELECT set_config('search_path', 'atk_s, public', true)",
        run(ATK_UNQUALIFIED, "1"),
        "ROLLBACK",
        run(ATK_UNQUALIFIED, "1"),
    ],
    "set_config('search_path') through a named extended statement": [
        *_warm(ATK_UNQUALIFIED, "1"),
        [
            parse("SELECT set_config('search_path', 'atk_s, public', false)", name=b"sp"),
            SYNC,
        ],
        run(ATK_UNQUALIFIED, "1"),
        [bind(statement=b"sp"), EXECUTE, SYNC],
        [parse(ATK_UNQUALIFIED), DESCRIBE_S, SYNC],
        "RESET search_path",
    ],
    "SELECT INTO TEMP shadows the name after the statement was kept": [
        "CREATE TEMP TABLE atk_dummy (x int)",
        *_warm(ATK_UNQUALIFIED, "1"),
        "SELECT 1 AS k, 7 AS v INTO TEMP atk_t",
        run(ATK_UNQUALIFIED, "1"),
        run(ATK_UNQUALIFIED, "7"),
        "DROP TABLE atk_t",
    ],
    "SET in an implicit block (Flush), the statement prepared, then rolled back at Sync": [
        *_warm(ATK_UNQUALIFIED, "1"),
        Partial([parse("SET search_path = atk_s, public"), bind(), EXECUTE, FLUSH], 3),
        Partial([parse(ATK_UNQUALIFIED), bind("1"), EXECUTE, FLUSH], 4),
        Partial([parse(ATK_UNQUALIFIED), bind("1"), EXECUTE, FLUSH], 4),
        [parse("SELECT 1/0"), bind(), EXECUTE, SYNC],
        [parse(ATK_UNQUALIFIED), DESCRIBE_S, SYNC],
        run(ATK_UNQUALIFIED, "1"),
    ],
    "SET LOCAL, RESET, SET inside a savepoint rolled back": [
        *_warm(ATK_UNQUALIFIED, "1"),
        "BEGIN",
        "SET LOCAL search_path = atk_s, public",
        run(ATK_UNQUALIFIED, "1"),
        "SAVEPOINT s",
        "SET LOCAL search_path = public",
        run(ATK_UNQUALIFIED, "1"),
        "ROLLBACK TO SAVEPOINT s",
        [parse(ATK_UNQUALIFIED), DESCRIBE_S, bind("1"), EXECUTE, SYNC],
        "COMMIT",
        run(ATK_UNQUALIFIED, "1"),
        "SET search_path = atk_s, public",
        run(ATK_UNQUALIFIED, "1"),
        "RESET ALL",
        run(ATK_UNQUALIFIED, "1"),
    ],
    "PREPARE of set_config run by EXECUTE": [
        *_warm(ATK_UNQUALIFIED, "1"),
        "PREPARE sp AS SELECT set_config('search_path', 'atk_s, public', false)",
        run(ATK_UNQUALIFIED, "1"),
        "EXECUTE sp",
        [parse(ATK_UNQUALIFIED), DESCRIBE_S, SYNC],
        "RESET search_path",
        "DEALLOCATE sp",
    ],
    "DO and CALL between executions": [
        *_warm(ATK_UNQUALIFIED, "1"),
        "DO $$BEGIN PERFORM set_config('search_path', 'atk_s, public', false); END$$",
        [parse(ATK_UNQUALIFIED), DESCRIBE_S, SYNC],
        "RESET search_path",
    ],
    # ---- Close of pgveil's names ----
    "Close of pgveil's name as a portal and as a statement inside a served batch": [
        *_warm(JOIN, "1"),
        Custom(_close_ours_portal_and_statement),
        run(JOIN, "5"),
    ],
    "Close of the unnamed portal and statement in a pipeline with the served Parse": [
        *_warm(JOIN, "1"),
        [parse(JOIN), bind("2"), CLOSE_P, bind("3"), EXECUTE, extended.close(b"S", b""), SYNC],
        [bind("3"), EXECUTE, SYNC],
        [parse(JOIN), extended.close(b"S", b""), parse(JOIN), bind("4"), EXECUTE, SYNC],
    ],
    # ---- pipelines of served Parses ----
    "two served batches in one write, the first's Bind failing": [
        *_warm(JOIN, "1"),
        [*run(JOIN, "abc"), *run(JOIN, "2")],
        [*run(JOIN, "2"), *run(JOIN, "abc"), *run(JOIN, "3")],
    ],
}


def test_describe_of_a_lost_statement_whose_text_fails(
    pg: EmbeddedPostgres, billing: ProxyProcess, text_proxy: ProxyProcess, atk2: None
) -> None:
    """Pinned (README, the catalog window): after DEALLOCATE ALL run from a named statement
    and another session's DROP of a table the unnamed statement reads, a Describe of it gets
    the server's error for the text given again, where the text path's Describe gets the
    ParameterDescription first and then that same error."""
    steps: list[Step] = [
        *_DEALLOCATED_THEN_DROPPED,
        [DESCRIBE_S, SYNC],
    ]
    served, text = _lockstep(pg, billing.port, text_proxy.port, steps)
    missing = [("42P01", 'relation "public.atk2_g" does not exist')]
    assert _errors(served[-1]) == _errors(text[-1]) == missing
    assert [t for t, _ in served[-1]] == ["E", "Z"]
    assert [t for t, _ in text[-1]] == ["t", "E", "Z"]


@pytest.mark.parametrize("case", list(CASES))
def test_same_as_text(
    pg: EmbeddedPostgres,
    billing: ProxyProcess,
    text_proxy: ProxyProcess,
    atk2: None,
    case: str,
) -> None:
    served, text = _lockstep(pg, billing.port, text_proxy.port, CASES[case])
    if "TEMP" in case:
        served, text = _without_table_oids(served), _without_table_oids(text)
    _assert_same(served, text)


# ---- the audit ------------------------------------------------------------------------------

AUDIT_CASES: dict[str, list[Step]] = {
    "a genuine class-42 Bind error sent again": [
        *_warm(REG, "billing.customers"),
        run(REG, "atk2_nosuch"),
        run(REG, "billing.accounts"),
    ],
    "a Bind naming pgveil's statement right after the served Parse": [
        *_warm(JOIN, "1"),
        Custom(_bind_ours_after_parse),
    ],
    "DEALLOCATE ALL parsed, then a Bind of '' in the same batch": [
        *_warm(JOIN, "1"),
        [parse("DEALLOCATE ALL", name=b"reset"), bind("3"), EXECUTE, SYNC],
    ],
    "DEALLOCATE ALL run, then the text given again to a Bind of ''": [
        [parse("DEALLOCATE ALL", name=b"reset"), SYNC],
        *_warm(JOIN, "1"),
        [bind(statement=b"reset"), EXECUTE, SYNC],
        [bind("3"), EXECUTE, SYNC],
        [bind("x"), EXECUTE, SYNC],
    ],
}


@pytest.mark.parametrize("case", list(AUDIT_CASES))
def test_audit_events_are_the_same(
    pg: EmbeddedPostgres, billing: ProxyProcess, atk2: None, tmp_path: Path, case: str
) -> None:
    session = _audit_session(pg, AUDIT_CASES[case])
    served, text = (_audited(pg, tmp_path, setting, session) for setting in ("true", "false"))
    assert served
    assert served == text


# ---- unmasked sessions ------------------------------------------------------------------------


def test_unmasked_session_prepares_nothing(pg: EmbeddedPostgres, billing: ProxyProcess) -> None:
    """An unmasked role's unnamed statement is the server's own: no pgveil statement, the
    same answers each time, DEALLOCATE ALL in a pipeline does nothing to it."""
    client = RawClient(billing.port)
    try:
        first = _send(client, run(JOIN, "1"))
        for _ in range(3):
            assert _send(client, run(JOIN, "1")) == first
        got = _send(client, [parse("DEALLOCATE ALL", name=b"r"), bind("1"), EXECUTE, SYNC])
        assert not _errors(got), _readable(got)
        assert _ours(client) == []
        assert _types(_send(client, run(JOIN, "2")))[-1] == "Z"
    finally:
        client.close()


def test_statement_timeout_while_served(billing: ProxyProcess) -> None:
    """statement_timeout 1ms: timing decides where the timeout lands (the text path's Parse,
    Bind or Execute may get it too), so each answer is either complete or one 57014 where a
    message's answer would be, then ReadyForQuery; the session goes on after RESET."""
    client = RawClient(billing.port, user=MASKED)
    try:
        for _ in range(2):
            _send(client, run(JOIN, "1"))
        client.query("SET statement_timeout = '1ms'")
        for i in range(20):
            got = _types(_send(client, run(JOIN, str(i % 3 + 1))))
            full = ["1", "2", "T", "C", "Z"]
            assert got == full or (got[-2:] == ["E", "Z"] and got[:-2] == full[: len(got) - 2])
        client.query("RESET statement_timeout")
        assert _types(_send(client, run(JOIN, "3"))) == ["1", "2", "T", "C", "Z"]
    finally:
        client.close()


def test_held_parse_complete_with_cancel(billing: ProxyProcess, text_proxy: ProxyProcess) -> None:
    """A CancelRequest sent right after a served batch: the client still gets one answer per
    message and ReadyForQuery, and the session goes on."""
    for port in (billing.port, text_proxy.port):
        client = RawClient(port, user=MASKED)
        try:
            for _ in range(2):
                _send(client, run(JOIN, "1"))
            client.send_raw(b"".join(run(JOIN, "2")))
            assert client.pid is not None and client.key is not None
            cancel = RawClient(port, connect=False)
            cancel.send_raw(struct.pack("!iiii", 16, 80877102, client.pid, client.key))
            cancel.closed_by_peer(5)
            cancel.close()
            got = client.until_ready()
            assert _types(got)[0] == "1" and _types(got)[-1] == "Z", _readable(got)
            assert _types(_send(client, run(JOIN, "3"))) == ["1", "2", "T", "C", "Z"]
        finally:
            client.close()


def test_the_proxy_logged_no_traceback(billing: ProxyProcess, text_proxy: ProxyProcess) -> None:
    """(last: after every case above ran through both)"""
    assert "Traceback" not in billing.log()
    assert "Traceback" not in text_proxy.log()
    assert m.SYNC  # (messages imported for the cases above)
