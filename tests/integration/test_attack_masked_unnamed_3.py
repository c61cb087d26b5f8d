"""White-box attacks on the masked client's unnamed statement, third round (f38b74f: the
epoch, `_set_since`, `_ready`): ways in which what names and parameter types resolve to
may change with no statement pgveil reads as changing them (a transaction undone, a SET
bound or executed later than it was parsed, a setting function named otherwise), so that
the statement kept for the unnamed statement would be served under what the server no
longer resolves the client's text to. Same harness as test_attack_masked_unnamed.py: two
bare clients in lockstep, one through the pgveil with `masked_prepare` on, one through the
one with it off; every message must be the same byte for byte. Every case is named after
the behaviour it holds pgveil to, whether it found a problem or not.

Schema atk_s (test_attack_masked_unnamed_2's fixture) holds atk_s.atk_t (k int, v text,
one row (1, '1')), public.atk_t (k int, v int, rows 1..5): `ATK_UNQUALIFIED` reads one or
the other by search_path, and its parameter is text for one, int4 for the other. A kept
statement prepared under the other search_path shows in Describe of the statement
(ParameterDescription) and in the Bind (the server analyses it again with its first
Parse's parameter types: `operator does not exist`).
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from proxy.demo.embedded_pg import EmbeddedPostgres
from proxy.wire import extended
from tests.integration.test_attack_masked_unnamed import (
    DESCRIBE_S,
    EXECUTE,
    FLUSH,
    SYNC,
    Ddl,
    Partial,
    Step,
    _assert_same,
    _lockstep,
    _without_table_oids,
    atk,
    bind,
    parse,
    run,
)
from tests.integration.test_attack_masked_unnamed_2 import ATK_UNQUALIFIED, atk2
from tests.support import ProxyProcess

__all__ = ["atk", "atk2"]

U = ATK_UNQUALIFIED
SP = "SET search_path = atk_s, public"
SP_CONFIG = "SELECT set_config('search_path', 'atk_s, public', false)"
# set_config named by a Unicode-escaped identifier: the server calls set_config, the text
# does not hold the word
SP_ESCAPED = "SELECT U&\"set\\005fconfig\"('search_path', 'atk_s, public', false)"


def probe() -> list[bytes]:
    """Describe of the statement (its parameter types), then a Bind and Execute of it."""
    return [parse(U), DESCRIBE_S, bind("1"), EXECUTE, SYNC]


def served_twice() -> list[Step]:
    """Two executions: the first prepares pgveil's statement, the second is served by it."""
    return [run(U, "1"), run(U, "1")]


def bind_portal(portal: bytes, statement: bytes) -> bytes:
    return extended.bind(portal, statement, (), [], ())


TEMP = "CREATE TEMP TABLE atk_t (k int, v int); INSERT INTO atk_t VALUES (2, 1)"
TEMP_TEXT = "CREATE TEMP TABLE atk_t (k int, v text); INSERT INTO atk_t VALUES (1, '1')"


SETUP = """
ALTER ROLE masked_trust RESET search_path;
DROP VIEW IF EXISTS public.atk3_v;
DROP TABLE IF EXISTS public.atk3_w;
DROP FUNCTION IF EXISTS public.atk3_sp();
CREATE VIEW public.atk3_v AS SELECT set_config('search_path', 'atk_s, public', false) AS sp;
GRANT SELECT ON public.atk3_v TO cc_staff;
CREATE TABLE public.atk3_w (k int);
CREATE FUNCTION public.atk3_sp() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
  PERFORM set_config('search_path', 'atk_s, public', false);
  RETURN NEW;
END$$;
CREATE TRIGGER atk3_sp BEFORE INSERT ON public.atk3_w FOR EACH ROW EXECUTE FUNCTION public.atk3_sp();
GRANT SELECT, INSERT ON public.atk3_w TO cc_staff;
"""


@pytest.fixture(scope="module")
def atk3(pg: EmbeddedPostgres, atk2: None) -> Iterator[None]:
    pg.psql(SETUP)
    yield
    pg.psql(
        "ALTER ROLE masked_trust RESET search_path; DROP VIEW IF EXISTS public.atk3_v;"
        "DROP TABLE IF EXISTS public.atk3_w; DROP FUNCTION IF EXISTS public.atk3_sp()"
    )


CASES: dict[str, list[Step]] = {
    # ---- a transaction ends and undoes a SET after a transaction statement went ----
    "a SET before a SAVEPOINT, the statement kept after it, then ROLLBACK": [
        "BEGIN",
        SP,
        "SAVEPOINT s",
        *served_twice(),
        "ROLLBACK",
        probe(),
        run(U, "2"),
    ],
    "a SET before a SAVEPOINT, then an error (a failed block), then ROLLBACK": [
        "BEGIN",
        SP,
        "SAVEPOINT s",
        *served_twice(),
        "SELECT 1/0",
        "ROLLBACK",
        probe(),
    ],
    "a SET, RELEASE of a savepoint, the statement kept, then ROLLBACK": [
        "BEGIN",
        "SAVEPOINT s",
        SP,
        "RELEASE SAVEPOINT s",
        *served_twice(),
        "ROLLBACK",
        probe(),
    ],
    "a SET, then BEGIN inside the block (a warning), then ROLLBACK": [
        "BEGIN",
        SP,
        "BEGIN",
        *served_twice(),
        "ROLLBACK",
        probe(),
    ],
    "a SET and BEGIN in one Query (the SET joins the block), then ROLLBACK": [
        f"{SP}; BEGIN",
        *served_twice(),
        "ROLLBACK",
        probe(),
    ],
    "a SET and BEGIN as extended statements in one implicit block, then ROLLBACK": [
        [parse(SP), bind(), EXECUTE, parse("BEGIN"), bind(), EXECUTE, SYNC],
        *served_twice(),
        "ROLLBACK",
        probe(),
    ],
    "a SET, a SAVEPOINT, then PREPARE TRANSACTION (disabled: rolled back)": [
        "BEGIN",
        SP,
        "SAVEPOINT s",
        *served_twice(),
        "PREPARE TRANSACTION 'atk3'",
        probe(),
    ],
    # ---- a SET parsed before, run later ----
    "a named SET parsed before BEGIN, bound in the block before anything was kept, ROLLBACK": [
        [parse(SP, name=b"s"), SYNC],
        "BEGIN",
        [bind(statement=b"s"), EXECUTE, SYNC],
        *served_twice(),
        "ROLLBACK",
        probe(),
    ],
    "a named set_config parsed before BEGIN, bound in the block before anything was kept": [
        [parse(SP_CONFIG, name=b"s"), SYNC],
        "BEGIN",
        [bind(statement=b"s"), EXECUTE, SYNC],
        *served_twice(),
        "ROLLBACK",
        probe(),
    ],
    "a named portal of a SET bound before the statement was kept, executed after": [
        "BEGIN",
        [parse(SP, name=b"s"), bind_portal(b"p", b"s"), SYNC],
        *served_twice(),
        [extended.execute(b"p"), SYNC],
        probe(),
        "ROLLBACK",
    ],
    "a named portal of set_config bound before the statement was kept, executed after": [
        "BEGIN",
        [parse(SP_CONFIG, name=b"s"), bind_portal(b"p", b"s"), SYNC],
        *served_twice(),
        [extended.execute(b"p"), SYNC],
        probe(),
        "ROLLBACK",
    ],
    "the unnamed portal of a SET bound before a served Parse, executed after it (Flush)": [
        "BEGIN",
        *served_twice(),
        Partial([parse(SP, name=b"s"), bind(statement=b"s"), FLUSH], 2),
        Partial([parse(U), FLUSH], 1),
        [EXECUTE, SYNC],
        probe(),
        "ROLLBACK",
    ],
    "the unnamed portal of a SET bound before a served Parse, executed after it (idle)": [
        *served_twice(),
        Partial([parse(SP, name=b"s"), bind(statement=b"s"), FLUSH], 2),
        Partial([parse(U), FLUSH], 1),
        [EXECUTE, SYNC],
        probe(),
        "RESET search_path",
    ],
    "PREPARE of set_config outside a block, EXECUTE inside one, then ROLLBACK": [
        f"PREPARE sp AS {SP_CONFIG}",
        "BEGIN",
        "EXECUTE sp",
        *served_twice(),
        "ROLLBACK",
        probe(),
        "DEALLOCATE sp",
    ],
    # ---- set_config named otherwise, or not named at all ----
    "a view whose definition calls set_config": [
        *served_twice(),
        "SELECT sp FROM public.atk3_v",
        probe(),
        "RESET search_path",
    ],
    "a trigger that calls set_config, fired by an INSERT": [
        *served_twice(),
        "INSERT INTO public.atk3_w VALUES (1)",
        probe(),
        "RESET search_path",
    ],
    "set_config called by a Unicode-escaped name": [
        *served_twice(),
        SP_ESCAPED,
        probe(),
        "RESET search_path",
    ],
    "set_config called by a Unicode-escaped name in an extended statement": [
        *served_twice(),
        [parse(SP_ESCAPED), bind(), EXECUTE, SYNC],
        probe(),
        "RESET search_path",
    ],
    # ---- temporary relations undone with their transaction ----
    "a temporary table dropped in a block, the block rolled back": [
        TEMP,
        "BEGIN",
        "DROP TABLE atk_t",
        *served_twice(),
        "ROLLBACK",
        run(U, "1"),
        "DROP TABLE atk_t",
    ],
    "a temporary table dropped as pg_temp.atk_t in a block, the block rolled back": [
        TEMP,
        "BEGIN",
        "DROP TABLE pg_temp.atk_t",
        *served_twice(),
        "ROLLBACK",
        run(U, "1"),
        "DROP TABLE atk_t",
    ],
    "a temporary table dropped, a SAVEPOINT, the block rolled back": [
        TEMP,
        "BEGIN",
        "DROP TABLE atk_t",
        "SAVEPOINT s",
        *served_twice(),
        "ROLLBACK",
        run(U, "1"),
        "DROP TABLE atk_t",
    ],
    "DISCARD TEMP in a block, the block rolled back": [
        TEMP,
        "BEGIN",
        "DISCARD TEMP",
        *served_twice(),
        "ROLLBACK",
        run(U, "1"),
        "DROP TABLE atk_t",
    ],
    "a temporary table created, a SAVEPOINT, the block rolled back": [
        "BEGIN",
        TEMP,
        "SAVEPOINT s",
        *served_twice(),
        "ROLLBACK",
        run(U, "1"),
        run(U, "2"),
    ],
    "a temporary table (v text) created, a SAVEPOINT, the block rolled back": [
        "BEGIN",
        TEMP_TEXT,
        "SAVEPOINT s",
        *served_twice(),
        "ROLLBACK",
        probe(),
    ],
    "a temporary table (v text) ON COMMIT DROP, a SAVEPOINT, then COMMIT": [
        "BEGIN",
        "CREATE TEMP TABLE atk_t (k int, v text) ON COMMIT DROP",
        "INSERT INTO atk_t VALUES (1, '1')",
        "SAVEPOINT s",
        *served_twice(),
        "COMMIT",
        probe(),
    ],
    "a temporary table created in an implicit extended block rolled back by an error": [
        *served_twice(),
        Partial([parse("CREATE TEMP TABLE atk_t (k int, v text)"), bind(), EXECUTE, FLUSH], 3),
        Partial([parse(U), bind("1"), EXECUTE, FLUSH], 3),
        Partial([parse(U), bind("1"), EXECUTE, FLUSH], 3),
        [parse("SELECT 1/0"), bind(), EXECUTE, SYNC],
        probe(),
    ],
    # ---- expected to hold: what the epoch already follows ----
    "a SET in a failed block, then ROLLBACK": [
        "BEGIN",
        SP,
        *served_twice(),
        "SELECT 1/0",
        "ROLLBACK",
        probe(),
    ],
    "ROLLBACK TO SAVEPOINT undoes a SET made after the savepoint": [
        "BEGIN",
        "SAVEPOINT s",
        SP,
        *served_twice(),
        "ROLLBACK TO SAVEPOINT s",
        probe(),
        "COMMIT",
        probe(),
    ],
    "SET LOCAL, then COMMIT AND CHAIN": [
        "BEGIN",
        "SET LOCAL search_path = atk_s, public",
        *served_twice(),
        "COMMIT AND CHAIN",
        probe(),
        "COMMIT",
    ],
    "a SET, then ROLLBACK AND CHAIN": [
        "BEGIN",
        SP,
        *served_twice(),
        "ROLLBACK AND CHAIN",
        probe(),
        "ROLLBACK",
    ],
    "RESET in a block that is rolled back": [
        SP,
        *served_twice(),
        "BEGIN",
        "RESET search_path",
        *served_twice(),
        "ROLLBACK",
        probe(),
        "RESET search_path",
    ],
    "DISCARD ALL after a SET (search_path back to the default)": [
        SP,
        *served_twice(),
        "DISCARD ALL",
        probe(),
    ],
    "a SET and an error in one Query (an implicit block rolled back)": [
        *served_twice(),
        f"{SP}; SELECT 1/0",
        probe(),
    ],
    "a SET and an error in one extended batch, the Parse in the same write": [
        *served_twice(),
        [parse(SP), bind(), EXECUTE, parse("SELECT 1/0"), bind(), EXECUTE, SYNC, *probe()],
        probe(),
    ],
    "a SET and an error in one extended batch, then a served Parse": [
        *served_twice(),
        [parse(SP), bind(), EXECUTE, parse("SELECT 1/0"), bind(), EXECUTE, SYNC],
        probe(),
    ],
    "a named SET bound while a statement is kept, in a block rolled back": [
        [parse(SP, name=b"s"), SYNC],
        *served_twice(),
        "BEGIN",
        [bind(statement=b"s"), EXECUTE, SYNC],
        *served_twice(),
        "ROLLBACK",
        probe(),
    ],
    "a role's search_path set by ALTER ROLE, then RESET and a new session": [
        *served_twice(),
        Ddl("ALTER ROLE masked_trust SET search_path = atk_s, public"),
        "RESET search_path",
        probe(),
        Ddl("ALTER ROLE masked_trust RESET search_path"),
    ],
}


@pytest.mark.parametrize("case", list(CASES))
def test_same_as_text(
    pg: EmbeddedPostgres,
    billing: ProxyProcess,
    text_proxy: ProxyProcess,
    atk3: None,
    case: str,
) -> None:
    served, text = _lockstep(pg, billing.port, text_proxy.port, CASES[case])
    if "temporary" in case or "TEMP" in case:
        served, text = _without_table_oids(served), _without_table_oids(text)
    _assert_same(served, text)


def test_the_proxy_logged_no_traceback(billing: ProxyProcess, text_proxy: ProxyProcess) -> None:
    """(last: after every case above ran through both)"""
    assert "Traceback" not in billing.log()
    assert "Traceback" not in text_proxy.log()
