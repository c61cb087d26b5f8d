"""Statistics give a masked role no oracle on personal columns: after it inserts a row
with a guessed value, pg_stats and pg_stats_ext answer a right and a wrong guess
differently when read directly, and alike (no numbers for personal columns) through pgveil.
Pinned settings (client_encoding, standard_conforming_strings, backslash_quote) and the
activity behind the statistics views (pg_stat_get_activity and its relatives, shadowing
names) stay refused.

Each oracle is first shown to answer a right and a wrong guess differently when sent to
PostgreSQL directly as the same role; through pgveil (psycopg and asyncpg) it must not.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import asyncpg
import psycopg
import pytest

from proxy.demo.embedded_pg import EmbeddedPostgres
from tests.integration.attack_clients import Clients, errors_in, open_clients
from tests.integration.masking_fixture import ADMIN, HELPDESK, HELPDESK_PW, dsn
from tests.support import ProxyProcess

LOGIN1 = "first.user"  # dn.users.login of user 1 (partial: shown as f********r)


@pytest.fixture(scope="module")
def clients(pg: EmbeddedPostgres, deny_proxy: ProxyProcess) -> Iterator[Clients]:
    with open_clients(pg, deny_proxy.port) as c:
        yield c


def _super(pg: EmbeddedPostgres) -> psycopg.Connection[Any]:
    return psycopg.connect(pg.dsn() + " sslmode=disable", autocommit=True)


# ---- statistics: numbers of personal columns ----------------------------------------------

STATS = (
    "SELECT attname, null_frac, avg_width, n_distinct, correlation, most_common_freqs::text "
    "FROM pg_stats WHERE schemaname = 'dn' AND tablename IN ('users', 'wb13_users_lower') "
    "ORDER BY tablename, attname"
)
STATS_EXT = (
    "SELECT statistics_name, n_distinct::text, most_common_freqs::text FROM pg_stats_ext "
    "WHERE statistics_schemaname = 'dn' ORDER BY 1"
)
STATS_EXPRS = (
    "SELECT statistics_name, n_distinct, most_common_freqs::text, correlation "
    "FROM pg_stats_ext_exprs WHERE statistics_schemaname = 'dn' ORDER BY 1"
)
# (the masked role owns the table, as an application's role often does: the server shows
# extended and index statistics to owners only, and lets them ANALYZE, which pgveil allows)
STATS_SETUP = f"""
ALTER TABLE dn.users OWNER TO {HELPDESK};
CREATE INDEX wb13_users_lower ON dn.users (lower(login));
CREATE STATISTICS dn.wb13_st (ndistinct, mcv) ON login, note FROM dn.users;
CREATE STATISTICS dn.wb13_st_expr ON (upper(login)) FROM dn.users;
"""
# (the owner's privileges went with the table: helpdesk's grant is made again)
STATS_TEARDOWN = f"""
ALTER TABLE dn.users OWNER TO CURRENT_USER;
GRANT SELECT, INSERT, UPDATE, DELETE ON dn.users TO {HELPDESK}, {ADMIN};
DROP INDEX IF EXISTS dn.wb13_users_lower;
DROP STATISTICS IF EXISTS dn.wb13_st, dn.wb13_st_expr;
DELETE FROM dn.users WHERE id = 700;
ANALYZE dn.users;
"""
# (guess, what it is): one equal to user 1's login, one not; one before it, one after
GUESSES = {"equal": LOGIN1, "unequal": "first.usex", "before": "first.usea"}


def _stats_through(port: int, user: str = HELPDESK, password: str = HELPDESK_PW) -> Any:
    async def run() -> Any:
        conn = await asyncpg.connect(
            host="127.0.0.1",
            port=port,
            user=user,
            password=password,
            database="postgres",
            ssl=False,
            server_settings={"client_encoding": "UTF8"},
        )
        try:
            return [
                [tuple(r) for r in await conn.fetch(q)] for q in (STATS, STATS_EXT, STATS_EXPRS)
            ]
        finally:
            await conn.close()

    return asyncio.run(run())


@pytest.fixture(scope="module")
def guessed_stats(pg: EmbeddedPostgres, deny_proxy: ProxyProcess) -> Iterator[dict[str, Any]]:
    """For each guess: the statistics of dn.users after a masked role inserted a row with
    that login and analysed the table (through pgveil; autovacuum does it unasked too),
    read directly (`direct`) and through pgveil (`psycopg`, `asyncpg`) by the masked role."""
    out: dict[str, Any] = {}
    with _super(pg) as admin:
        admin.execute(STATS_SETUP)
        try:
            for kind, guess in GUESSES.items():
                with psycopg.connect(dsn(pg, deny_proxy.port), autocommit=True) as c:
                    c.execute(
                        "INSERT INTO dn.users (id, login, note) VALUES (700, %s, 'note one')",
                        (guess,),
                    )
                    c.execute("ANALYZE dn.users")
                got: dict[str, Any] = {}
                for client, port in (("direct", pg.port), ("psycopg", deny_proxy.port)):
                    with psycopg.connect(dsn(pg, port), autocommit=True) as c:
                        got[client] = [
                            c.execute(q).fetchall() for q in (STATS, STATS_EXT, STATS_EXPRS)
                        ]
                got["asyncpg"] = _stats_through(deny_proxy.port)
                out[kind] = got
                admin.execute("DELETE FROM dn.users WHERE id = 700")
            yield out
        finally:
            admin.execute(STATS_TEARDOWN)


def _rounded(rows: list[tuple[Any, ...]]) -> list[tuple[Any, ...]]:
    """Rows with their floats to 5 places (float4 in text and in binary differ below)."""
    return [tuple(round(v, 5) if isinstance(v, float) else v for v in r) for r in rows]


def _personal(rows: list[tuple[Any, ...]]) -> list[tuple[Any, ...]]:
    """The rows of pg_stats for dn.users' personal columns and the index expression."""
    return [r for r in rows if r[0] in ("login", "passcode", "pin", "ip", "doc", "lower")]


def test_statistics_answer_guesses_directly(guessed_stats: dict[str, Any]) -> None:
    """n_distinct and the frequencies say whether the inserted login equals a stored one,
    correlation whether it sorts before it: so does the index expression's row, and the
    extended statistics of the table."""
    direct = {kind: got["direct"] for kind, got in guessed_stats.items()}
    login = {kind: [r for r in d[0] if r[0] == "login"] for kind, d in direct.items()}
    assert login["equal"] != login["unequal"] != login["before"], login
    lower = {kind: [r for r in d[0] if r[0] == "lower"] for kind, d in direct.items()}
    assert lower["equal"] != lower["unequal"], lower
    assert direct["equal"][1] != direct["unequal"][1], direct  # pg_stats_ext
    assert direct["equal"][2] != direct["unequal"][2], direct  # pg_stats_ext_exprs


@pytest.mark.parametrize("client", ["psycopg", "asyncpg"])
def test_statistics_of_personal_columns_answer_nothing_through_pgveil(
    guessed_stats: dict[str, Any], client: str
) -> None:
    seen = {kind: got[client] for kind, got in guessed_stats.items()}
    for kind, (stats, ext, exprs) in seen.items():
        personal = _personal(stats)
        assert {r[0] for r in personal} == {"login", "passcode", "pin", "ip", "doc", "lower"}
        assert all(r[1:] == (None,) * 5 for r in personal), (kind, personal)
        assert [r[1:] for r in ext] == [(None, None)] * 2, (kind, ext)
        assert [r[1:] for r in exprs] == [(None, None, None)], (kind, exprs)
        # a column without a mask keeps its numbers, as the server has them
        direct = guessed_stats[kind]["direct"][0]
        kept = [r for r in stats if r[0] in ("id", "note")]
        assert _rounded(kept) == _rounded([r for r in direct if r[0] in ("id", "note")])
        assert len(kept) == 2
        assert kept[0][3] is not None
    assert seen["equal"] == seen["unequal"] == seen["before"]


# ---- pinned settings and the activity behind system views stay refused ------------------


@pytest.mark.parametrize(
    "sql",
    [
        "SET client_encoding TO 'LATIN1'",
        "SET standard_conforming_strings TO off",
        "SET standard_conforming_strings TO 'of'",
        "SET backslash_quote TO on",
        "RESET backslash_quote",
        "SELECT set_config('standard_conforming_strings', 'off', false)",
        "SELECT set_config('client_encoding', 'SQL_ASCII', true)",
        "SELECT pg_stat_get_backend_activity(s) FROM pg_stat_get_backend_idset() s",
        "SELECT (pg_stat_get_activity(NULL)).query",
        "SELECT query FROM pg_temp.pg_stat_activity",
        "WITH pg_stat_activity AS (SELECT 'x' AS query) SELECT query FROM pg_stat_activity",
    ],
)
def test_pinned_settings_and_activity_queries_stay_refused(clients: Clients, sql: str) -> None:
    for client in ("psycopg", "asyncpg"):
        got = clients.run(client, sql)
        assert [e[0] for e in errors_in(got)] == ["42501"], (client, got)
