"""Unmasked clients cannot tell pgveil from the database: same results, same bytes."""

from __future__ import annotations

import asyncio
import subprocess
from decimal import Decimal

import asyncpg
import psycopg
import pytest
from psycopg import sql as psql_sql

from proxy.demo.embedded_pg import EmbeddedPostgres
from tests.conftest import SCRAM_PASSWORD, SCRAM_USER, scram_asyncpg
from tests.support import ProxyProcess, RawClient, normalise_session_bytes

TYPES_QUERY = r"""
SELECT 1::int2 AS i2, 2::int4 AS i4, 9223372036854775807::int8 AS i8,
       123456789.000000001::numeric AS num, 'NaN'::numeric AS nan, 1.5::float4 AS f4,
       -2.25e300::float8 AS f8, true AS b, NULL::text AS null_text, '' AS empty,
       'héllo wörld ✓' AS unicode, E'tab\there\nnewline' AS escaped,
       '2024-02-29 12:34:56.789+02'::timestamptz AS tstz, '2024-02-29'::date AS d,
       '12:00:01'::time AS t, '1 day 02:03:04'::interval AS iv,
       ARRAY[1, NULL, 3]::int[] AS arr, ARRAY[['a','b'],['c','d']] AS arr2,
       '{"a": [1, 2, {"b": null}]}'::json AS js, '{"z": 1, "a": "x"}'::jsonb AS jsb,
       '\xdeadbeef00'::bytea AS by, '192.168.10.1/24'::inet AS ip, '10.0.0.0/8'::cidr AS net,
       '08:00:2b:01:02:03'::macaddr AS mac, 'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11'::uuid AS u,
       ROW(1, 'two', NULL)::record AS rec, (1, 'x')::comp AS comp, 'b'::mood AS enum_v,
       int4range(1, 10) AS rng, '(1,2)'::point AS pt, B'1011'::bit(4) AS bits,
       12.34::money AS cash, 'a & b'::tsquery AS tsq, xmlparse(content '<a>1</a>') AS x
"""


@pytest.fixture(scope="module", autouse=True)
def schema(pg: EmbeddedPostgres) -> None:
    pg.psql(
        """
        DROP TABLE IF EXISTS t_wide, t_copy, t_big;
        DROP TYPE IF EXISTS comp; DROP TYPE IF EXISTS mood;
        CREATE TYPE comp AS (a int, b text);
        CREATE TYPE mood AS ENUM ('a', 'b');
        CREATE TABLE t_wide (id int PRIMARY KEY, a text, b text, c numeric, d timestamptz,
                             e jsonb, f bytea);
        INSERT INTO t_wide
          SELECT g, md5(g::text), repeat('x', g % 50), g * 1.5, '2020-01-01'::timestamptz
                 + g * interval '1 minute', jsonb_build_object('k', g), decode(md5(g::text), 'hex')
          FROM generate_series(1, 100000) g;
        CREATE TABLE t_big (id int PRIMARY KEY, v text, b bytea);
        INSERT INTO t_big VALUES (1, repeat('v', 1024 * 1024), decode(repeat('ab', 1024 * 1024), 'hex'));
        CREATE TABLE t_copy (id int, name text, amount numeric, at timestamptz);
        GRANT ALL ON ALL TABLES IN SCHEMA public TO public;
        """
    )


def _psql(
    port: int, pg: EmbeddedPostgres, *args: str, stdin: bytes | None = None
) -> subprocess.CompletedProcess[bytes]:
    env = {"PGPASSWORD": SCRAM_PASSWORD, "PATH": "/usr/bin:/bin", "PGSSLMODE": "disable"}
    return subprocess.run(
        [
            "psql",
            "-X",
            "-h",
            "127.0.0.1",
            "-p",
            str(port),
            "-U",
            SCRAM_USER,
            "-d",
            "postgres",
            *args,
        ],
        capture_output=True,
        env=env,
        input=stdin,
        timeout=120,
    )


PSQL_SCRIPTS = [
    TYPES_QUERY,
    "SELECT 1; SELECT 'two' AS second; SELECT * FROM t_wide ORDER BY id LIMIT 5",
    "SELECT count(*), sum(c), max(a) FROM t_wide",
    "SELECT 1/0",  # error mid-script
    "BEGIN; SELECT 1; SELECT nope; SELECT 2; ROLLBACK",
    "DO $$ BEGIN RAISE NOTICE 'a notice with % args', 2; RAISE WARNING 'careful'; END $$",
    "SELECT id, a FROM t_wide WHERE id <= 3 \\gx",
    "COPY (SELECT * FROM t_wide WHERE id <= 1000 ORDER BY id) TO STDOUT WITH (FORMAT csv, HEADER)",
    "COPY (SELECT * FROM t_wide WHERE id <= 1000 ORDER BY id) TO STDOUT WITH (FORMAT binary)",
    "SELECT length(v), md5(b) FROM t_big",
    "SELECT generate_series(1, 3) \\; SELECT 'x' \\; SELECT 1/0 \\; SELECT 'never'",
]


@pytest.mark.parametrize("script", PSQL_SCRIPTS, ids=range(len(PSQL_SCRIPTS)))
def test_psql_output_is_byte_identical(
    pg: EmbeddedPostgres, proxy: ProxyProcess, script: str
) -> None:
    direct = _psql(pg.port, pg, "-c", script)
    through = _psql(proxy.port, pg, "-c", script)
    assert through.stdout == direct.stdout
    assert through.stderr == direct.stderr
    assert through.returncode == direct.returncode


def test_psql_copy_from_stdin_all_formats(pg: EmbeddedPostgres, proxy: ProxyProcess) -> None:
    rows = "".join(
        f"{i}\tname {i}\t{i}.5\t2024-01-0{i % 9 + 1} 10:00:00+00\n" for i in range(20000)
    )
    for port in (pg.port, proxy.port):
        pg.psql("TRUNCATE t_copy")
        r = _psql(port, pg, "-c", "COPY t_copy FROM STDIN", stdin=rows.encode())
        assert r.returncode == 0, r.stderr
        csv = _psql(
            port, pg, "-c", "COPY (SELECT * FROM t_copy ORDER BY id) TO STDOUT WITH (FORMAT csv)"
        )
        binary = _psql(
            port, pg, "-c", "COPY (SELECT * FROM t_copy ORDER BY id) TO STDOUT WITH (FORMAT binary)"
        )
        if port == pg.port:
            want_csv, want_bin = csv.stdout, binary.stdout
        else:
            assert csv.stdout == want_csv
            assert binary.stdout == want_bin
        pg.psql("TRUNCATE t_copy")
        r = _psql(port, pg, "-c", "COPY t_copy FROM STDIN WITH (FORMAT csv)", stdin=want_csv)
        assert r.returncode == 0, r.stderr
        assert pg.psql("SELECT count(*) FROM t_copy").strip() == "20000"
    # a COPY that fails half way reports the same error through the proxy
    bad = b"1\tok\t1\t2024-01-01\nnot-a-number\tx\t1\t2024-01-01\n"
    d = _psql(pg.port, pg, "-c", "COPY t_copy FROM STDIN", stdin=bad)
    p = _psql(proxy.port, pg, "-c", "COPY t_copy FROM STDIN", stdin=bad)
    assert (p.returncode, p.stderr) == (d.returncode, d.stderr)


# ---- psycopg ---------------------------------------------------------------------------------


def _fetch_all_ways(dsn: str) -> dict[str, object]:
    out: dict[str, object] = {}
    with psycopg.connect(dsn, autocommit=True) as conn:
        out["text"] = conn.execute(TYPES_QUERY).fetchall()
        out["binary"] = conn.execute(
            "SELECT id, a, c, d, e, f FROM t_wide WHERE id <= 500 ORDER BY id", binary=True
        ).fetchall()
        out["params"] = conn.execute(
            "SELECT %s::int + 1, %s::text || 'x', %s::bytea, %s::jsonb",
            [41, "é", b"\x00\x01", psycopg.types.json.Jsonb({"a": 1})],
        ).fetchall()
        out["prepared"] = [
            conn.execute("SELECT id, b FROM t_wide WHERE id = %s", [i], prepare=True).fetchone()
            for i in range(1, 20)
        ]
        out["big"] = conn.execute("SELECT v, b FROM t_big").fetchone()
        out["rows100k"] = conn.execute("SELECT * FROM t_wide ORDER BY id").fetchall()
        with conn.pipeline():
            curs = [conn.execute("SELECT %s::int * 2", [i]) for i in range(200)]
        out["pipeline"] = [c.fetchone() for c in curs]
        with conn.cursor(name="server_side") as cur, conn.transaction():
            cur.execute("SELECT id, a FROM t_wide ORDER BY id")
            out["named_cursor"] = [cur.fetchmany(1000) for _ in range(5)]
        try:
            conn.execute("SELECT 'abc'::int")
        except psycopg.Error as exc:
            out["error"] = (exc.sqlstate, str(exc), exc.diag.message_primary)
    return out


def test_psycopg_text_binary_pipeline_prepared(direct_dsn: str, proxy_dsn: str) -> None:
    direct = _fetch_all_ways(direct_dsn)
    through = _fetch_all_ways(proxy_dsn)
    assert set(direct) == set(through)
    for key in direct:
        assert repr(through[key]) == repr(direct[key]), key  # repr: NaN != NaN


def test_psycopg_copy_both_ways(direct_dsn: str, proxy_dsn: str, pg: EmbeddedPostgres) -> None:
    results = []
    for dsn in (direct_dsn, proxy_dsn):
        pg.psql("TRUNCATE t_copy")
        with psycopg.connect(dsn, autocommit=True) as conn:
            with conn.cursor().copy(
                "COPY t_copy (id, name, amount) FROM STDIN (FORMAT binary)"
            ) as cp:
                cp.set_types(["int4", "text", "numeric"])
                for i in range(5000):
                    cp.write_row((i, f"n{i}", Decimal(i) / 4))
            chunks = []
            with conn.cursor().copy(
                "COPY (SELECT * FROM t_copy ORDER BY id) TO STDOUT (FORMAT binary)"
            ) as cp:
                for data in cp:
                    chunks.append(bytes(data))
            with conn.cursor().copy("COPY t_copy TO STDOUT (FORMAT csv)") as cp:
                text = b"".join(bytes(d) for d in cp)
            results.append((b"".join(chunks), text))
    assert results[0] == results[1]


def test_notifications_and_backend_pid(proxy_dsn: str, direct_dsn: str) -> None:
    with (
        psycopg.connect(proxy_dsn, autocommit=True) as listener,
        psycopg.connect(direct_dsn, autocommit=True) as sender,
    ):
        pid = listener.execute("SELECT pg_backend_pid()").fetchone()[0]  # type: ignore[index]
        assert listener.info.backend_pid == pid  # BackendKeyData reached the client unchanged
        listener.execute("LISTEN pgveil_chan")
        sender.execute("NOTIFY pgveil_chan, 'payload-1'")
        sender.execute("SELECT pg_notify('pgveil_chan', repeat('p', 7000))")
        got = []
        for n in listener.notifies(timeout=5, stop_after=2):
            got.append((n.channel, n.payload, n.pid))
        sender_pid = sender.info.backend_pid
        assert got == [
            ("pgveil_chan", "payload-1", sender_pid),
            ("pgveil_chan", "p" * 7000, sender_pid),
        ]
        activity = sender.execute(
            "SELECT usename FROM pg_stat_activity WHERE pid = %s", [pid]
        ).fetchone()
        assert activity == (SCRAM_USER,)


# ---- asyncpg ---------------------------------------------------------------------------------


async def _asyncpg_session(port: int) -> dict[str, object]:
    out: dict[str, object] = {}
    conn = await scram_asyncpg(port)
    try:
        out["types"] = [
            tuple(r)
            for r in await conn.fetch(
                "SELECT 1::int2, 2::int8, 1.5::numeric, now()::date - now()::date, "
                "ARRAY[1,2]::int[], '{\"a\":1}'::jsonb, '\\x00ff'::bytea, '10.0.0.1'::inet, "
                "'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11'::uuid, NULL::text, ''::text, (1,'x')::comp"
            )
        ]
        stmt = await conn.prepare(
            "SELECT id, a, c, f FROM t_wide WHERE id > $1 ORDER BY id LIMIT $2"
        )
        out["prepared"] = [tuple(r) for r in await stmt.fetch(10, 50)]
        out["prepared2"] = [tuple(r) for r in await stmt.fetch(99990, 50)]
        out["rows100k"] = len(await conn.fetch("SELECT * FROM t_wide"))
        out["big"] = tuple(await conn.fetchrow("SELECT v, b FROM t_big"))
        async with conn.transaction():
            cur = await conn.cursor("SELECT id, a FROM t_wide ORDER BY id")
            out["cursor"] = [tuple(r) for r in await cur.fetch(500)] + [
                tuple(r) for r in await cur.fetch(10)
            ]
        await conn.execute("TRUNCATE t_copy")
        await conn.copy_records_to_table(
            "t_copy",
            records=[(i, f"n{i}", i, None) for i in range(3000)],
            columns=["id", "name", "amount", "at"],
        )
        import io

        buf = io.BytesIO()
        await conn.copy_from_query("SELECT * FROM t_copy ORDER BY id", output=buf, format="binary")
        out["copy_out"] = buf.getvalue()
        try:
            await conn.fetch("SELECT 'x'::int")
        except asyncpg.PostgresError as exc:
            out["error"] = (exc.sqlstate, str(exc))
        got: list[tuple[int, str, str]] = []
        done = asyncio.Event()

        def on_notify(c: object, pid: int, channel: str, payload: str) -> None:
            got.append((pid, channel, payload))
            done.set()

        await conn.add_listener("apg_chan", on_notify)
        await conn.execute("NOTIFY apg_chan, 'hello'")
        await asyncio.wait_for(done.wait(), 5)
        out["notify"] = [(p == conn.get_server_pid(), ch, pl) for p, ch, pl in got]
    finally:
        await conn.close()
    return out


async def test_asyncpg_binary_prepared_cursors_copy_notify(
    pg: EmbeddedPostgres, proxy: ProxyProcess
) -> None:
    direct = await _asyncpg_session(pg.port)
    through = await _asyncpg_session(proxy.port)
    for key in direct:
        assert through[key] == direct[key], key


# ---- raw protocol ----------------------------------------------------------------------------


def _raw_exchange(port: int) -> list[list[tuple[str, bytes]]]:
    c = RawClient(port)
    try:
        out = []
        # extended protocol, pipelined: two statements, several executes, one Sync
        c.send("P", b"s1\0SELECT $1::int + 1, repeat('z', $1::int)\0\0\0")
        for v in (b"3", b"5"):
            c.send("B", b"\0s1\0\0\0\0\1" + len(v).to_bytes(4, "big") + v + b"\0\0")
            c.send("D", b"P\0")
            c.send("E", b"\0\0\0\0\0")
        c.send("P", b"\0SELECT generate_series(1, 10)\0\0\0")
        c.send("B", b"\0\0\0\0\0\0\0\0")
        c.send("E", b"\0\0\0\0\3")  # max 3 rows: PortalSuspended
        c.send("E", b"\0\0\0\0\0")
        c.send("C", b"Ss1\0")
        c.send("S")
        out.append(c.until_ready())
        # an error in the middle of a pipeline skips to Sync
        c.send("P", b"\0SELECT 1/0\0\0\0")
        c.send("B", b"\0\0\0\0\0\0\0\0")
        c.send("E", b"\0\0\0\0\0")
        c.send("S")
        out.append(c.until_ready())
        # Flush without Sync
        c.send("P", b"fl\0SELECT 1\0\0\0")
        c.send("H")
        out.append([c.recv_message()])
        c.send("S")
        out.append(c.until_ready())
        # FunctionCall: int4pl(40, 2), binary result
        oid = b"\0\0\0\xb1"  # 177 = int4pl
        args = (
            b"\0\1\0\1"
            + b"\0\2"
            + b"\0\0\0\4"
            + (40).to_bytes(4, "big")
            + b"\0\0\0\4"
            + (2).to_bytes(4, "big")
            + b"\0\1"
        )
        c.send("F", oid + args)
        out.append(c.until_ready())
        out.append(c.query(""))  # EmptyQueryResponse
        out.append(
            normalise_session_bytes(c.query("SET application_name = 'x'; SHOW application_name"))
        )
        return out
    finally:
        c.close()


def test_raw_extended_protocol_byte_identical(pg: EmbeddedPostgres, proxy: ProxyProcess) -> None:
    assert _raw_exchange(proxy.port) == _raw_exchange(pg.port)


def test_replication_connection_passes_through(pg: EmbeddedPostgres, proxy: ProxyProcess) -> None:
    dsn = pg.dsn(port=proxy.port) + " sslmode=disable replication=database"
    with psycopg.connect(dsn, autocommit=True) as conn:
        row = conn.execute("IDENTIFY_SYSTEM").fetchone()
    assert row is not None and row[0]


def test_startup_options_pass_through(pg: EmbeddedPostgres, proxy: ProxyProcess) -> None:
    dsn = (
        pg.dsn(SCRAM_USER, SCRAM_PASSWORD, port=proxy.port)
        + " sslmode=disable application_name=helpdesk-ui options='-c search_path=pg_catalog -c work_mem=7MB'"
    )
    with psycopg.connect(dsn) as conn:
        assert conn.execute("SHOW work_mem").fetchone() == ("7MB",)
        assert conn.execute("SHOW application_name").fetchone() == ("helpdesk-ui",)
        assert conn.execute(psql_sql.SQL("SHOW search_path")).fetchone() == ("pg_catalog",)
