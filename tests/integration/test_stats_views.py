"""Statistics and activity views are rewritten for masked roles, not refused.

A masked role reads pg_stat_activity, pg_stats, pg_stats_ext, pg_stats_ext_exprs,
pg_prepared_statements, pg_cursors, pg_backend_memory_contexts, pg_user_mappings and (where
installed) pg_stat_statements through a subquery in which the columns that may show values or
statement text are NULL of their type and the others are as the server has them
(rules.denied.SYSTEM_VIEWS); a plain FROM call of the functions behind them
(pg_stat_get_activity(...), ...) likewise. Each case here runs through pgveil with psql,
psycopg and asyncpg (it must succeed, return rows and show no secret) and directly as the
same role (it must leak: a case that does not proves nothing). The server's own columns are
checked against the lists, so a server that adds a column fails a test (it would be NULL
meanwhile). pg_statistic, pg_statistic_ext_data, pg_largeobject, pg_shadow and pg_authid stay
refused, and so does a view a DBA defined over any of these relations (its stored definition
reads them raw).
"""

from __future__ import annotations

import asyncio
import os
import tempfile
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import asyncpg
import psycopg
import pytest

from proxy.demo.embedded_pg import EmbeddedPostgres
from rules.denied import SYSTEM_FUNCTIONS, SYSTEM_VIEWS
from rules.masks import hmac_pads
from tests.conftest import TRUST_USER
from tests.integration.attack_clients import CLIENTS, Clients, errors_in, open_clients
from tests.integration.audit_wire import audited_proxy, events, wait_for
from tests.integration.masking_fixture import (
    HASH_KEY,
    HELPDESK,
    HELPDESK_PW,
    NAME,
    RULES,
    SCHEMA,
    SECRETS,
    dsn,
    leaks,
    masking_proxy,
)
from tests.support import ProxyProcess, RawClient

MARK = "canary_stats_activity"
# another session's last statement: a personal value in a comment (which pg_stat_statements
# keeps, as pg_stat_activity does)
SECRET_QUERY = f"SELECT 1 AS {MARK} /* {NAME} */"
_IPAD, _OPAD = hmac_pads(HASH_KEY.encode())


def secrets_in_values(rows: list[tuple[Any, ...]]) -> list[str]:
    """secrets_in() over the rows' text values; numbers (counters, timings) are searched
    for a whole secret core only: a timing's digits are arbitrary, so six of them match a
    six-character window of the card or phone number by chance (a run under load found
    'card' in pg_stat_statements' times), while a number that carries a secret carries all
    of its digits."""
    texts: list[Any] = []
    numbers: list[int | float | Decimal] = []
    for row in rows:
        for value in row:
            if isinstance(value, int | float | Decimal):
                numbers.append(value)
            else:
                texts.append(value)
    found = secrets_in(repr(texts))
    found += [c for c, core in SECRETS.items() for n in numbers if core in str(n)]
    return found


def secrets_in(text: str) -> list[str]:
    """leaks() plus pgveil's hash-mask key pads (its own rewritten statements hold them)."""
    found = leaks(text)
    for label, pad in (("hash_ipad", _IPAD[:16]), ("hash_opad", _OPAD[:16])):
        if pad.hex() in text or pad.hex().upper() in text:
            found.append(label)
    return found


# pg_stats_ext and pg_stats_ext_exprs show the statistics of the tables the role owns: a
# table of helpdesk's own, with a copy of the personal data
SETUP = f"""
CREATE TABLE public.st_people AS SELECT name, email FROM billing.customers;
ALTER TABLE public.st_people OWNER TO {HELPDESK};
CREATE STATISTICS public.st_names (mcv) ON name, email FROM public.st_people;
CREATE STATISTICS public.st_lower ON (lower(name)) FROM public.st_people;
CREATE INDEX st_lower_email ON public.st_people (lower(email));
ANALYZE public.st_people;
CREATE FOREIGN DATA WRAPPER st_fdw;
CREATE SERVER st_server FOREIGN DATA WRAPPER st_fdw;
GRANT USAGE ON FOREIGN SERVER st_server TO {HELPDESK};
CREATE USER MAPPING FOR {HELPDESK} SERVER st_server OPTIONS (user 'x', password '{NAME}');
"""
TEARDOWN = f"""
DROP USER MAPPING IF EXISTS FOR {HELPDESK} SERVER st_server;
DROP SERVER IF EXISTS st_server;
DROP FOREIGN DATA WRAPPER IF EXISTS st_fdw;
DROP TABLE IF EXISTS public.st_people;
"""

# (id, statements): each returns rows through pgveil without a secret, and leaks directly
CASES: list[tuple[str, tuple[str, ...]]] = [
    ("activity_star", ("SELECT * FROM pg_stat_activity",)),
    (
        "activity_other_session",
        (f"SELECT pid, usename, state, query FROM pg_stat_activity WHERE query LIKE '%{MARK}%'",),
    ),
    ("activity_qualified", ("SELECT query FROM pg_catalog.pg_stat_activity",)),
    (
        "activity_three_part_names",
        ("SELECT pg_catalog.pg_stat_activity.query FROM pg_catalog.pg_stat_activity",),
    ),
    ("activity_whole_row", ("SELECT row_to_json(a)::text FROM pg_stat_activity a",)),
    (
        "activity_self_join",
        (
            "SELECT a.query, b.query FROM pg_stat_activity a "
            "JOIN pg_stat_activity b ON a.pid = b.pid",
        ),
    ),
    (
        "activity_subquery_and_cte",
        (
            "WITH a AS (SELECT * FROM pg_stat_activity) SELECT (SELECT string_agg(query, ',') "
            "FROM pg_stat_activity), (SELECT string_agg(query, ',') FROM a)",
        ),
    ),
    (
        "activity_own_row",
        (
            "SELECT name, login FROM billing.customers WHERE name <> 'x' "
            "UNION ALL SELECT query, NULL FROM pg_stat_activity WHERE pid = pg_backend_pid()",
        ),
    ),
    ("get_activity", ("SELECT * FROM pg_stat_get_activity(NULL)",)),
    (
        "get_activity_alias_ordinality",
        (
            "SELECT a.q, a.n FROM pg_catalog.pg_stat_get_activity(NULL) "
            "WITH ORDINALITY AS a(datid, pid, usesysid, application_name, state, q, w1, w2, x1, "
            "x2, x3, x4, ca, ch, cp, bx, bm, bt, s1, s2, s3, s4, s5, s6, s7, g1, g2, g3, lp, qi, n)",
        ),
    ),
    (
        "get_activity_lateral",
        (
            "SELECT x.query FROM pg_stat_activity a, "
            "LATERAL pg_stat_get_activity(a.pid) x WHERE a.pid IS NOT NULL",
        ),
    ),
    (
        "stats_values",
        (
            "SELECT attname, null_frac, most_common_vals::text, histogram_bounds::text "
            "FROM pg_stats WHERE schemaname = 'billing' AND tablename = 'customers'",
        ),
    ),
    ("stats_whole_row", ("SELECT s::text FROM pg_stats s WHERE tablename = 'customers'",)),
    (
        "stats_ext",
        (
            "SELECT statistics_name, most_common_vals::text, most_common_val_nulls FROM pg_stats_ext",
        ),
    ),
    (
        # (not *: asyncpg cannot decode anyarray, directly either)
        "stats_ext_exprs",
        ("SELECT expr, most_common_vals::text, histogram_bounds::text FROM pg_stats_ext_exprs",),
    ),
    (
        "prepared_statements",
        (
            "PREPARE st_p AS SELECT login FROM billing.customers WHERE name <> 'x'",
            "SELECT name, statement, parameter_types::text FROM pg_prepared_statements",
            "SELECT * FROM pg_prepared_statement()",
            "DEALLOCATE st_p",
        ),
    ),
    (
        "cursors",
        (
            "BEGIN",
            "DECLARE st_c CURSOR FOR SELECT login FROM billing.customers",
            "SELECT name, statement FROM pg_cursors",
            "SELECT * FROM pg_cursor()",
            "ROLLBACK",
        ),
    ),
    (
        "memory_contexts",
        (
            "PREPARE st_m AS SELECT login FROM billing.customers",
            "SELECT name, ident FROM pg_backend_memory_contexts",
            "SELECT ident FROM pg_get_backend_memory_contexts()",
            "DEALLOCATE st_m",
        ),
    ),
    ("user_mappings", ("SELECT srvname, usename, umoptions FROM pg_user_mappings",)),
    # ---- white-box: other ways to the same data
    (
        # an expression index's statistics (pg_stats names the index as the table; shown
        # for the indexes of the role's own tables)
        "stats_index_expression",
        (
            "SELECT attname, histogram_bounds::text FROM pg_stats WHERE tablename = 'st_lower_email'",
        ),
    ),
    (
        # the session's own row while it runs: pgveil's text, with the hash key's pads
        "activity_own_active_row",
        (
            "SELECT (SELECT query FROM pg_stat_activity WHERE pid = pg_backend_pid()), "
            "(SELECT string_agg(query, ',') FROM pg_stat_get_activity(pg_backend_pid())), "
            "login FROM billing.customers",
        ),
    ),
    (
        "activity_joined_with_stats",
        (
            "SELECT a.query, s.histogram_bounds::text FROM pg_stat_activity a "
            "CROSS JOIN pg_stats s WHERE s.tablename = 'customers'",
        ),
    ),
]
# proven to leak directly only through pgveil's own text (the hash key's pads): the direct
# session has no pgveil, so those cases are proven by the statement text (a prepared
# statement, a cursor, a memory context naming it) read directly as the same role
KEY_ONLY = {"activity_own_row"}  # (activity_own_active_row leaks directly: login raw)


@pytest.fixture(scope="module")
def stats_env(pg: EmbeddedPostgres, billing: ProxyProcess) -> Iterator[None]:
    pg.psql(SETUP)
    # pgveil shows statistics' numbers only of relations its catalog knows (a table without
    # rules): it reads the catalog again when a statement names one it does not know yet
    with psycopg.connect(dsn(pg, billing.port), autocommit=True) as c:

        def known() -> bool:
            try:
                c.execute("SELECT FROM public.st_people LIMIT 0")
            except psycopg.errors.InsufficientPrivilege as exc:
                assert "not known to pgveil yet" in str(exc), exc
                return False
            return True

        wait_for(known, "pgveil's catalog to know public.st_people")
    other = psycopg.connect(pg.dsn() + " sslmode=disable", autocommit=True)
    other.execute(SECRET_QUERY)
    try:
        yield
    finally:
        other.close()
        pg.psql(TEARDOWN)


@pytest.fixture(scope="module")
def clients(pg: EmbeddedPostgres, billing: ProxyProcess, stats_env: None) -> Iterator[Clients]:
    with open_clients(pg, billing.port) as c:
        yield c


def test_cases_are_well_formed() -> None:
    ids = [cid for cid, _ in CASES]
    assert len(ids) == len(set(ids))
    for cid, sql in CASES:
        assert secrets_in("\n".join(sql)) == [], cid


@pytest.mark.parametrize(
    ("case_id", "sql", "client"),
    [(cid, sql, client) for cid, sql in CASES for client in CLIENTS],
    ids=[f"{cid}-{client}" for cid, _ in CASES for client in CLIENTS],
)
def test_read_rewritten_through_pgveil(
    clients: Clients, case_id: str, sql: tuple[str, ...], client: str
) -> None:
    received = clients.run(client, sql)
    assert errors_in(received) == [], f"{case_id} via {client}:\n{received[:3000]}"
    assert secrets_in(received) == [], f"{case_id} via {client} leaked:\n{received[:3000]}"


@pytest.mark.parametrize(
    ("case_id", "sql"),
    [(cid, sql) for cid, sql in CASES if cid not in KEY_ONLY],
    ids=[cid for cid, _ in CASES if cid not in KEY_ONLY],
)
def test_case_leaks_directly(clients: Clients, case_id: str, sql: tuple[str, ...]) -> None:
    received = clients.run("direct", sql)
    assert leaks(received) != [] or "SELECT login FROM billing.customers" in received, (
        f"{case_id} does not leak without pgveil (a broken case):\n{received[:3000]}"
    )


# ---- exactly what a masked role gets -----------------------------------------------------------


def _direct(pg: EmbeddedPostgres, sql: str) -> list[tuple[Any, ...]]:
    with psycopg.connect(pg.dsn(HELPDESK, HELPDESK_PW) + " sslmode=disable") as c:
        return c.execute(sql).fetchall()


def test_activity_keeps_everything_but_statement_text(
    pg: EmbeddedPostgres, billing: ProxyProcess, stats_env: None
) -> None:
    """The masked session's own row and the other sessions' rows are there, with their
    roles, applications, states and times; `query` is NULL in every row."""
    with psycopg.connect(dsn(pg, billing.port), autocommit=True) as c:
        own = c.execute("SELECT pg_backend_pid()").fetchone()
        rows = c.execute(
            "SELECT pid, usename, application_name, state, backend_type, query, "
            "backend_start IS NOT NULL FROM pg_stat_activity"
        ).fetchall()
        star = c.execute("SELECT * FROM pg_stat_activity LIMIT 1")
        names = [d.name for d in star.description or ()]
        star.fetchall()
    assert own is not None
    assert names == [name for (name,) in _direct(pg, _COLUMNS % "pg_stat_activity")]
    by_pid = {r[0]: r for r in rows}
    assert by_pid[own[0]][1:5] == (HELPDESK, "", "active", "client backend")
    assert by_pid[own[0]][6] is True
    others = [r for r in rows if r[1] == pg.superuser and r[3] == "idle"]
    assert others, rows
    assert all(r[5] is None for r in rows)
    assert any(MARK in (q or "") for (q,) in _direct(pg, "SELECT query FROM pg_stat_activity"))


def test_stats_keep_their_numbers(
    pg: EmbeddedPostgres, billing: ProxyProcess, stats_env: None
) -> None:
    sql = (
        "SELECT attname, null_frac, avg_width, n_distinct, correlation, most_common_vals::text, "
        "histogram_bounds::text, most_common_elems::text, elem_count_histogram::text "
        "FROM pg_stats WHERE schemaname = 'billing' AND tablename = 'customers' ORDER BY attname"
    )
    with psycopg.connect(dsn(pg, billing.port)) as c:
        masked = c.execute(sql).fetchall()
    raw = _direct(pg, sql)
    # the numbers of a column without a mask, as the server has them; a personal column's
    # are NULL (they would answer guesses: tests/integration/test_attack_statistics_whitebox.py)
    plain = ("balance", "i_customer", "i_customer_class", "notes")
    assert [r[:5] for r in masked if r[0] in plain] == [r[:5] for r in raw if r[0] in plain]
    assert [r for r in masked if r[0] not in plain] == [
        (r[0],) + (None,) * 8 for r in raw if r[0] not in plain
    ]
    assert len(raw) == 10 and any(r[3] is not None for r in raw if r[0] not in plain)
    assert all(r[5:] == (None, None, None, None) for r in masked)
    assert any(r[6] is not None for r in raw)  # (histogram bounds: the values)


def test_extended_stats_keep_their_numbers(
    pg: EmbeddedPostgres, billing: ProxyProcess, stats_env: None
) -> None:
    sql = (
        "SELECT statistics_name, kinds::text, most_common_freqs, most_common_vals, "
        "most_common_val_nulls FROM pg_stats_ext ORDER BY 1"
    )
    exprs = "SELECT expr, avg_width, histogram_bounds::text FROM pg_stats_ext_exprs"
    with psycopg.connect(dsn(pg, billing.port)) as c:
        masked, masked_exprs = c.execute(sql).fetchall(), c.execute(exprs).fetchall()
    raw, raw_exprs = _direct(pg, sql), _direct(pg, exprs)
    assert [r[:3] for r in masked] == [r[:3] for r in raw] and len(raw) == 2
    assert [r[3:] for r in masked] == [(None, None), (None, None)]
    assert raw[1][3] is not None  # st_names: its MCV list holds the values
    assert (
        [r[:2] for r in masked_exprs]
        == [r[:2] for r in raw_exprs]
        == [("lower((name)::text)", raw_exprs[0][1])]
    )
    assert masked_exprs[0][2] is None and raw_exprs[0][2] is not None


def test_prepared_statements_and_cursors_keep_names(
    pg: EmbeddedPostgres, billing: ProxyProcess
) -> None:
    async def run() -> tuple[Any, ...]:
        c = await asyncpg.connect(
            host="127.0.0.1", port=billing.port, user=HELPDESK, password=HELPDESK_PW,
            database="postgres", ssl=False,
        )  # fmt: skip
        try:
            await c.execute("PREPARE st_q(bigint) AS SELECT login FROM billing.customers "
                            "WHERE i_customer = $1")  # fmt: skip
            async with c.transaction():
                await c.execute("DECLARE st_k CURSOR FOR SELECT name FROM billing.customers")
                cursors = await c.fetch("SELECT name, statement, is_holdable FROM pg_cursors")
            prepared = await c.fetch(
                "SELECT name, statement, parameter_types::text, from_sql "
                "FROM pg_prepared_statements"
            )
            return [tuple(r) for r in cursors], [tuple(r) for r in prepared]
        finally:
            await c.close()

    cursors, prepared = asyncio.run(run())
    # (asyncpg's own portal, unnamed, is there too)
    assert [r for r in cursors if r[0]] == [("st_k", None, False)]
    assert all(r[1] is None for r in cursors + prepared)
    assert [r for r in prepared if r[3]] == [("st_q", None, "{bigint}", True)]


def test_still_refused(pg: EmbeddedPostgres, billing: ProxyProcess) -> None:
    """Raw statistics, large objects' data and password hashes are never read; the
    functions behind the views anywhere but as a plain FROM item; COPY of a view, which
    the server refuses anyway."""
    cases = [
        ("SELECT * FROM pg_statistic", "pg_statistic exposes column values"),
        ("SELECT * FROM pg_statistic_ext_data", "pg_statistic_ext_data exposes column values"),
        ("SELECT * FROM pg_largeobject", "pg_largeobject exposes column values"),
        ("SELECT * FROM pg_shadow", "pg_shadow exposes column values"),
        ("SELECT * FROM pg_authid", "pg_authid exposes column values"),
        ("SELECT pg_stat_get_activity(NULL)", "function pg_stat_get_activity can read data"),
        ("SELECT (pg_stat_get_activity(NULL)).query", "function pg_stat_get_activity"),
        (
            "SELECT * FROM pg_stat_get_activity(NULL) AS a(datid oid)",
            "function pg_stat_get_activity",
        ),
        (
            "SELECT * FROM ROWS FROM (pg_stat_get_activity(NULL), generate_series(1, 2))",
            "function pg_stat_get_activity",
        ),
        ("SELECT pg_stat_get_backend_activity(1)", "function pg_stat_get_backend_activity"),
        ("SELECT current_query()", "function current_query can read data"),
        ("COPY pg_stats TO STDOUT", "pg_stats exposes column values"),
        ("LOCK pg_stat_activity", "pg_stat_activity exposes column values"),
        ("SELECT * FROM postgres.pg_catalog.pg_stats", "pg_stats exposes column values"),
    ]
    with psycopg.connect(dsn(pg, billing.port), autocommit=True) as c:
        for sql, reason in cases:
            with pytest.raises(psycopg.Error) as exc:
                c.execute(sql)
            assert exc.value.diag.sqlstate == "42501", sql
            assert reason in (exc.value.diag.message_primary or ""), (sql, exc.value)


@pytest.fixture(scope="module")
def namesakes(pg: EmbeddedPostgres, billing: ProxyProcess) -> Iterator[ProxyProcess]:
    """A table of a user's named like a system view, and a DBA's views over pg_stat_activity
    and pg_stats; and a pgveil started after them (its catalog has them)."""
    pg.psql(
        f"CREATE TABLE public.pg_stats (secret text); INSERT INTO public.pg_stats VALUES ('{NAME}');"
        "CREATE VIEW public.st_activity AS SELECT pid, query FROM pg_stat_activity;"
        "CREATE VIEW public.st_stats AS SELECT tablename, histogram_bounds::text AS hb "
        "FROM pg_catalog.pg_stats;"
        f"GRANT SELECT ON public.pg_stats, public.st_activity, public.st_stats TO {HELPDESK}"
    )
    try:
        with masking_proxy(pg, billing.rules_path, metrics=False) as p:  # type: ignore[attr-defined]
            yield p
    finally:
        pg.psql(
            "DROP VIEW IF EXISTS public.st_activity, public.st_stats; DROP TABLE public.pg_stats"
        )


def test_a_relation_of_the_same_name_is_not_the_system_one(
    pg: EmbeddedPostgres, namesakes: ProxyProcess
) -> None:
    """A user's table named like a system view (public.pg_stats) is refused by name, as
    before; while the catalog has one, so is the bare name (search_path may pick either);
    pg_catalog's, named so, is read rewritten."""
    assert leaks(repr(_direct(pg, "TABLE public.pg_stats"))) != []
    with psycopg.connect(dsn(pg, namesakes.port), autocommit=True) as c:
        c.execute("SET search_path = public, pg_catalog")
        for sql in ("SELECT * FROM public.pg_stats", "SELECT * FROM pg_stats", "TABLE pg_stats"):
            with pytest.raises(psycopg.Error) as exc:
                c.execute(sql)
            assert exc.value.diag.sqlstate == "42501", sql
            assert "pg_stats exposes column values" in str(exc.value), sql
        got = c.execute(
            "SELECT attname, histogram_bounds::text FROM pg_catalog.pg_stats "
            "WHERE tablename = 'customers'"
        ).fetchall()
    assert len(got) == 10 and all(h is None for _, h in got)


def test_views_over_them_are_refused(pg: EmbeddedPostgres, namesakes: ProxyProcess) -> None:
    """A view a DBA defined over pg_stat_activity or pg_stats reads their raw columns: a
    masked role is refused, naming the view and what it reads (before, it got the raw
    statement text); directly the same role reads the secret."""
    assert leaks(repr(_direct(pg, "SELECT hb FROM public.st_stats"))) != []
    with psycopg.connect(dsn(pg, namesakes.port), autocommit=True) as c:
        for view, relation in (("st_activity", "pg_stat_activity"), ("st_stats", "pg_stats")):
            with pytest.raises(psycopg.Error) as exc:
                c.execute(f"SELECT * FROM public.{view}")
            assert exc.value.diag.sqlstate == "42501"
            assert exc.value.diag.message_primary == (
                f"pgveil: view public.{view} reads {relation}, which exposes column "
                "values or query text"
            )


# ---- the audit ------------------------------------------------------------------------------------


def test_an_unmasked_read_is_recorded_as_uncertain(
    pg: EmbeddedPostgres, tmp_path: Path, stats_env: None
) -> None:
    """An unmasked session reads the statistics raw: values of protected tables it cannot
    name, so its event says analysis_complete false (`audit who` lists it as possibly
    touching every table), as when masked roles were refused these views; a masked
    session's read shows nothing personal and needs no event."""
    sql = (
        # (qualified: the module's namesake public.pg_stats may exist)
        "SELECT s.histogram_bounds::text, a.query FROM pg_catalog.pg_stats s, "
        "pg_stat_activity a WHERE s.tablename = 'customers' AND s.attname = 'name' LIMIT 1"
    )
    with audited_proxy(pg, tmp_path) as (p, audit):
        for user in (TRUST_USER, "masked_trust"):
            c = RawClient(p.port, user, application_name=f"st-{user}")
            try:
                got = c.query(sql)
                assert not [b for t, b in got if t == "E"], got
                assert (leaks(repr(got)) == []) is (user == "masked_trust")
                c.query("SELECT 1 FROM billing.customers LIMIT 0")  # (an event after it)
            finally:
                c.close()
        wait_for(lambda: len(events(audit, "st-masked_trust")) >= 1, "the masked events")
        wait_for(lambda: len(events(audit, f"st-{TRUST_USER}")) >= 2, "the unmasked events")
        unmasked = events(audit, f"st-{TRUST_USER}")
        assert [e["kinds"] for e in unmasked] == [["select"], ["select"]], unmasked
        assert unmasked[0]["analysis_complete"] is False and unmasked[0]["tables"] == []
        assert unmasked[1]["tables"] == ["billing.customers"]
        assert unmasked[1].get("analysis_complete", True) is True
        masked = events(audit, "st-masked_trust")
        assert [e["tables"] for e in masked] == [["billing.customers"]]


# ---- the server's columns are the lists' -------------------------------------------------------

_COLUMNS = (
    "SELECT a.attname FROM pg_attribute a WHERE a.attrelid = 'pg_catalog.%s'::regclass "
    "AND a.attnum > 0 AND NOT a.attisdropped ORDER BY a.attnum"
)
_RESULT_COLUMNS = (
    "SELECT p.proargnames[i] FROM pg_proc p, generate_subscripts(p.proallargtypes, 1) i "
    "WHERE p.oid = 'pg_catalog.%s'::regproc AND p.proargmodes[i] IN ('o', 't', 'b') ORDER BY i"
)


@pytest.mark.parametrize("name", sorted(n for n, v in SYSTEM_VIEWS.items() if not v.extension))
def test_each_view_column_is_kept_or_nulled(pg: EmbeddedPostgres, name: str) -> None:
    """Each column of the server's relation is either kept or known to show values or text:
    a column a newer server adds fails here (at run time it is NULL until someone looks)."""
    view = SYSTEM_VIEWS[name]
    columns = [r.strip() for r in pg.psql(_COLUMNS % name).splitlines() if r.strip()]
    assert not view.kept & view.nulled
    assert set(columns) == view.kept | view.nulled, name


@pytest.mark.parametrize("name", sorted(SYSTEM_FUNCTIONS))
def test_each_function_column_is_kept_or_nulled(pg: EmbeddedPostgres, name: str) -> None:
    view = SYSTEM_FUNCTIONS[name]
    columns = [r.strip() for r in pg.psql(_RESULT_COLUMNS % name).splitlines() if r.strip()]
    assert not view.kept & view.nulled
    assert set(columns) == view.kept | view.nulled, name


# ---- pg_stat_statements (a cluster of its own: the library must be preloaded) ------------------


@pytest.fixture(scope="module")
def statements_cluster() -> Iterator[tuple[EmbeddedPostgres, ProxyProcess]]:
    cluster = EmbeddedPostgres(
        settings={"shared_preload_libraries": "'pg_stat_statements'"},
        hba=["host all all 127.0.0.1/32 scram-sha-256"],
    ).start()
    d = Path(tempfile.mkdtemp(prefix="pgveil-st-"))
    rules = d / "rules.yaml"
    rules.write_text(RULES)
    try:
        cluster.psql(SCHEMA)
        cluster.psql("CREATE EXTENSION pg_stat_statements")
        with masking_proxy(cluster, rules) as p:
            yield cluster, p
    finally:
        cluster.cleanup()
        os.unlink(rules)
        os.rmdir(d)


def test_pg_stat_statements(statements_cluster: tuple[EmbeddedPostgres, ProxyProcess]) -> None:
    """`query` is NULL, the counters are the server's; the extension's columns are the
    list's; pg_stat_statements_info is read as it is."""
    cluster, p = statements_cluster
    for name in ("pg_stat_statements", "pg_stat_statements_info"):
        view = SYSTEM_VIEWS[name]
        columns = cluster.psql(
            "SELECT a.attname FROM pg_attribute a JOIN pg_class c ON c.oid = a.attrelid "
            f"WHERE c.relname = '{name}' AND a.attnum > 0 ORDER BY a.attnum"
        ).split()
        assert set(columns) == view.kept | view.nulled and not view.kept & view.nulled, name
    admin = psycopg.connect(cluster.dsn() + " sslmode=disable", autocommit=True)
    admin.execute(SECRET_QUERY)
    # a utility statement: PostgreSQL 15 identifies it by a hash of its text, literals and
    # comments included (which would confirm a guess); it stays the session's last
    admin.execute(f"DO $$ BEGIN PERFORM 1; END $$ /* {NAME} */")
    sql = (
        "SELECT query, queryid, calls FROM pg_stat_statements "
        "WHERE dbid IN (SELECT dbid FROM pg_stat_statements WHERE calls > 0) "
        "ORDER BY calls DESC"
    )
    activity = f"SELECT query_id, query FROM pg_stat_activity WHERE pid = {admin.info.backend_pid}"
    direct_dsn = cluster.dsn(HELPDESK, HELPDESK_PW) + " sslmode=disable"
    try:
        with psycopg.connect(direct_dsn) as c:
            raw = c.execute("SELECT query FROM pg_stat_statements").fetchall()
            raw_activity = c.execute(activity).fetchall()
        assert leaks(repr(raw)) != []  # the comment with the name, as the server keeps it
        assert raw_activity[0][0] is not None and leaks(repr(raw_activity)) != []
        with psycopg.connect(dsn(cluster, p.port), autocommit=True) as c:
            rows = c.execute(sql).fetchall()
            star = c.execute("SELECT * FROM public.pg_stat_statements").fetchall()
            info = c.execute("SELECT dealloc FROM pg_stat_statements_info").fetchall()
            masked_activity = c.execute(activity).fetchall()
    finally:
        admin.close()
    assert rows and all(q is None and i is None and n >= 1 for q, i, n in rows)
    assert star and secrets_in_values(star) == []
    assert info == [(0,)]
    assert masked_activity == [(None, None)]
