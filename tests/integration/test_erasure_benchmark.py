"""The erasure benchmark (`bench/erasure.py`) on the billing fixture, at a tiny scale on the
suite's PostgreSQL: the database it loads has the shape it measures (one account per
customer, the subjects terminated, xDRs stored in time order in monthly partitions, the
indexes its statements use), its live-traffic pgbench script runs against that database,
and its bulk UPDATE and the erasure worker erase the same rows. The bench's own functions
do the work, so a change to the fixture that breaks the bench fails here, not in a
benchmark run."""

from __future__ import annotations

from collections.abc import AsyncIterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from bench import erasure as bench
from proxy.demo.embedded_pg import EmbeddedPostgres

SUBJECTS, ROWS, LIVE_ROWS = 100, 20, 5  # (enough accounts to fill the six months)
NS = bench.parse_args(
    [
        *("--subjects", str(SUBJECTS), "--rows", str(ROWS), "--live-rows", str(LIVE_ROWS)),
        *("--batch-size", "70", "--duration", "1", "--clients", "2"),
    ]
)


@pytest.fixture
async def cluster(pg: EmbeddedPostgres) -> AsyncIterator[bench.Cluster]:
    cluster = bench.Cluster(pg)
    await cluster.admin("DROP DATABASE IF EXISTS erasure_bench_src WITH (FORCE)")
    await bench.load(cluster, "erasure_bench_src", NS)
    yield cluster
    await cluster.admin("DROP DATABASE erasure_bench_src WITH (FORCE)")


async def fetch(cluster: bench.Cluster, name: str, sql: str) -> list[Any]:
    conn = await cluster.connect(name)
    try:
        return list(await conn.fetch(sql))
    finally:
        await conn.close()


async def test_the_database_has_one_account_per_customer_and_xdrs_in_time_order(
    cluster: bench.Cluster,
) -> None:
    src = "erasure_bench_src"
    customers = await fetch(
        cluster,
        src,
        "SELECT c.i_customer, c.terminated_at, array_agg(a.i_account ORDER BY a.i_account) AS a"
        "  FROM billing.customers AS c JOIN billing.accounts AS a USING (i_customer)"
        " GROUP BY 1, 2 ORDER BY 1",
    )
    assert [r["i_customer"] for r in customers] == list(range(1, 2 * SUBJECTS + 1))
    assert all(r["a"] == [r["i_customer"]] for r in customers)
    assert [r["terminated_at"] == bench.TERMINATED_AT for r in customers] == [
        c <= SUBJECTS for c in range(1, 2 * SUBJECTS + 1)
    ]
    counts = await fetch(
        cluster, src, "SELECT i_account, count(*) FROM billing.xdrs GROUP BY 1 ORDER BY 1"
    )
    assert [(r[0], r[1]) for r in counts] == [
        (a, ROWS if a <= SUBJECTS else LIVE_ROWS) for a in range(1, 2 * SUBJECTS + 1)
    ]
    months = await fetch(
        cluster,
        src,
        "SELECT tableoid::regclass::text, count(*) FROM billing.xdrs GROUP BY 1 ORDER BY 1",
    )
    assert [r[0] for r in months] == [f"billing.xdrs_2026_0{m}" for m in range(1, 7)]
    # as a switch writes them: i_xdr follows connect_time, each partition stores its rows in
    # that order, and so one account's rows are spread out among the others' (stored in
    # account order, all but an account's first row would follow a row of its own account)
    (order,) = await fetch(
        cluster,
        src,
        "SELECT count(*) FILTER (WHERE connect_time < prev_time) AS against_time,"
        "       count(*) FILTER (WHERE i_xdr < prev_stored) AS against_storage,"
        "       count(DISTINCT i_xdr) AS ids, max(i_xdr) AS last,"
        "       count(*) FILTER (WHERE i_account = prev_account) AS after_own"
        "  FROM (SELECT i_xdr, i_account, connect_time,"
        "               lag(connect_time) OVER (ORDER BY i_xdr) AS prev_time,"
        "               lag(i_xdr) OVER (PARTITION BY tableoid ORDER BY ctid) AS prev_stored,"
        "               lag(i_account) OVER (PARTITION BY tableoid ORDER BY ctid)"
        "                   AS prev_account"
        "          FROM billing.xdrs) AS x",
    )
    total = SUBJECTS * (ROWS + LIVE_ROWS)
    assert tuple(order)[:4] == (0, 0, total, total)
    assert order["after_own"] < total // 2
    indexes = await fetch(
        cluster,
        src,
        "SELECT indexname, indexdef FROM pg_indexes WHERE schemaname = 'billing'"
        " AND indexname IN ('xdrs_account', 'xdrs_time', 'accounts_customer')",
    )
    assert sorted((r[0], r[1].split(" USING btree ")[1]) for r in indexes) == [
        ("accounts_customer", "(i_customer)"),
        ("xdrs_account", "(i_account, i_xdr)"),
        ("xdrs_time", "(connect_time)"),
    ]


async def test_the_live_traffic_script_runs_against_the_database(
    cluster: bench.Cluster, pg: EmbeddedPostgres, tmp_path: Path
) -> None:
    src = "erasure_bench_src"
    script = tmp_path / "billing.sql"
    script.write_text(bench.PGBENCH_SCRIPT.format(first=SUBJECTS + 1, last=2 * SUBJECTS))
    before = (await fetch(cluster, src, "SELECT max(i_xdr), count(*) FROM billing.xdrs"))[0]
    tps = bench.pgbench(cluster, pg.port, src, script, NS)  # directly, not through pgveil
    assert tps > 0
    (added,) = await fetch(
        cluster,
        src,
        f"SELECT count(*), min(i_xdr), count(*) FILTER (WHERE i_account > {SUBJECTS}"
        "       AND tableoid = 'billing.xdrs_2026_06'::regclass),"
        f"       (SELECT sum(balance) FROM billing.customers) - 10 * {2 * SUBJECTS}"
        f"  FROM billing.xdrs WHERE i_xdr > {before[0]}",
    )
    count, first, live_in_june, balance = added
    assert count > 0 and first == before[0] + 1  # the sequence continues after the load
    assert live_in_june == count  # live customers only
    assert balance == count * Decimal("0.01")  # one balance update per inserted xDR


async def test_the_bulk_update_and_the_worker_erase_the_same_rows(
    cluster: bench.Cluster, tmp_path: Path
) -> None:
    await cluster.copy("erasure_bench_src", "erasure_bench_bulk")
    try:
        bulk_rows, _ = await bench.bulk(cluster, "erasure_bench_bulk", SUBJECTS)
    finally:
        await cluster.admin("DROP DATABASE erasure_bench_bulk WITH (FORCE)")
    await cluster.copy("erasure_bench_src", "erasure_bench_w2")
    try:
        rows, _, batch_ms, verified = await bench.worker(
            cluster, "erasure_bench_w2", tmp_path, NS, 2
        )
        left = await fetch(
            cluster,
            "erasure_bench_w2",
            "SELECT i_account, count(cli) FROM billing.xdrs GROUP BY 1 ORDER BY 1",
        )
    finally:
        await cluster.admin("DROP DATABASE erasure_bench_w2 WITH (FORCE)")
    assert bulk_rows == rows == SUBJECTS * ROWS
    assert verified == SUBJECTS
    assert batch_ms  # (the report shows their longest and median)
    assert [(r[0], r[1]) for r in left] == [
        (a, 0 if a <= SUBJECTS else LIVE_ROWS) for a in range(1, 2 * SUBJECTS + 1)
    ]
