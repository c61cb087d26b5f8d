"""What the erasure worker costs: throughput against one bulk UPDATE, the longest lock any
of its batches holds, and what it does to live traffic through pgveil.

Starts a throwaway PostgreSQL (`proxy.demo.embedded_pg.EmbeddedPostgres`) and loads the
billing fixture (`proxy.demo.fixture`: its core with the xDRs partitioned by month, 6
partitions, and the parts `population` at a scale of no customers, `traffic` and
`erasure`): `--subjects` terminated customers with one account and `--rows` xDRs each
(2,000 x 1,000 = 2,000,000 rows to erase by default), as many live customers with
`--live-rows` xDRs each, rows in time order as a switch writes them, indexes on
(i_account, i_xdr) and connect_time. Then, each on an identical copy (CREATE DATABASE ...
TEMPLATE):

1. **bulk**: one `UPDATE billing.xdrs SET account_id = NULL, cli = NULL, cld = NULL,
   ip = NULL WHERE i_account = ANY(...)` over the erased subjects' accounts: rows/s;
2. **worker**: `erasure.worker.run(..., once=True)` over the same subjects (xDRs, accounts
   and customers, verification and audit included): xDR rows/s of the whole run, and the
   duration of every batch transaction (BEGIN to COMMIT: no lock it takes lives longer);
3. **live traffic**: pgbench (a billing script: read an account's last xDRs, insert an xDR,
   update a balance; live customers only) through a `pgveil proxy` subprocess, after a
   warm-up run: idle, while `pgveil erase run --once` erases, idle again; tps while erasing
   / mean idle tps. Once with no rate limit, once with `--rate-limit` rows/s.

Targets: worker >= 0.7x the bulk UPDATE's rows/s; longest batch < 1 s; tps >= 0.8x idle.
Prints Markdown (also written to bench/out/erasure.md). Everything started is removed on
exit, Ctrl-C included. Run: `python bench/erasure.py` from the repository (see README.md).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any, NoReturn

import asyncpg

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from audit.files import read_events  # noqa: E402
from erasure.loader import parse_config  # noqa: E402
from erasure.worker import run  # noqa: E402
from proxy.demo import fixture  # noqa: E402
from proxy.demo.embedded_pg import EmbeddedPostgres, EmbeddedPostgresError, free_port  # noqa: E402

OUT = REPO / "bench" / "out" / "erasure.md"
HOST = "127.0.0.1"
NOW = datetime(2026, 7, 1, tzinfo=UTC)
FIRST_MONTH = date(2026, 1, 1)
MONTHS = 6
TERMINATED_AT = datetime(2026, 6, 30, tzinfo=UTC)  # the subjects' (retention 0: due at NOW)
# the billing fixture's parts: `population` adds the columns (terminated_at) and, at a scale
# of no customers, no rows; `traffic` the benchmark's customers and xDRs; `erasure` (after
# the rows, so its indexes are built, not grown) the indexes the worker's batches use
PARTS = ("population", "traffic", "erasure")


class BenchError(Exception):
    pass


def config_text(audit: Path, batch_size: int, concurrency: int, rate_limit: int) -> str:
    return f"""\
subject:
  table: billing.customers
  key: i_customer
  terminated_at: terminated_at
  retention: 0
tables:
  billing.customers:
    columns: {{name: {{placeholder: "[erased]"}}, email: null, phone: null}}
  billing.accounts:
    owner: {{column: i_customer}}
    key: i_account
    columns: {{id: {{placeholder: "erased-{{key}}"}}, ip: null}}
  billing.xdrs:
    owner: {{column: i_account, through: billing.accounts}}
    large: true
    key: i_xdr
    columns: {{account_id: null, cli: null, cld: null, ip: null}}
worker:
  batch_size: {batch_size}
  concurrency: {concurrency}
  rate_limit: {rate_limit}
  lock_timeout: 1s
  statement_timeout: 60s
audit:
  file: {audit}
"""


PGBENCH_SCRIPT = (
    "\\set c random({first}, {last})\n"
    "BEGIN;\n"
    "SELECT i_xdr, cli, cld, charged FROM billing.xdrs WHERE i_account = :c "
    "ORDER BY i_xdr DESC LIMIT 10;\n"
    "INSERT INTO billing.xdrs (i_account, account_id, cli, cld, charged, connect_time) "
    "VALUES (:c, 'ACC-' || :c, '+420600000000', '+18001234567', 0.1, "
    "timestamptz '2026-06-15 12:00+00');\n"
    "UPDATE billing.customers SET balance = balance + 0.01 WHERE i_customer = :c;\n"
    "END;\n"
)


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


class Cluster:
    def __init__(self, db: EmbeddedPostgres) -> None:
        self.db = db

    def dsn(self, dbname: str) -> str:
        return self.db.dsn(dbname=dbname) + " sslmode=disable"

    async def connect(self, dbname: str) -> Any:
        return await asyncpg.connect(
            host=HOST,
            port=self.db.port,
            user=self.db.superuser,
            password=self.db.password,
            database=dbname,
            ssl=False,
        )

    async def admin(self, sql: str) -> None:
        conn = await self.connect("postgres")
        try:
            await conn.execute(sql)
        finally:
            await conn.close()

    async def copy(self, source: str, target: str) -> None:
        await self.admin("CHECKPOINT")
        await self.admin(f"DROP DATABASE IF EXISTS {target}")
        await self.admin(f"CREATE DATABASE {target} TEMPLATE {source} STRATEGY = FILE_COPY")


def script(ns: argparse.Namespace) -> str:
    """The billing fixture's SQL for the benchmark's database."""
    return fixture.script(
        fixture.Scale(),
        PARTS,
        xdrs_by="connect_time",
        first_month=FIRST_MONTH,
        months=MONTHS,
        terminated_at=TERMINATED_AT,
        settings={
            "subjects": str(ns.subjects),
            "subject_xdrs": str(ns.rows),
            "live_xdrs": str(ns.live_rows),
        },
    )


async def load(cluster: Cluster, name: str, ns: argparse.Namespace) -> None:
    await cluster.admin(f"CREATE DATABASE {name}")
    conn = await cluster.connect(name)
    try:
        t = time.perf_counter()
        await conn.execute(script(ns))  # one transaction, as fixture.load runs it
        log(f"  the billing fixture ... {time.perf_counter() - t:.1f} s")
        t = time.perf_counter()
        await conn.execute("VACUUM ANALYZE")  # (not in a transaction)
        log(f"  VACUUM ANALYZE ... {time.perf_counter() - t:.1f} s")
    finally:
        await conn.close()
    await cluster.admin("CHECKPOINT")


async def bulk(cluster: Cluster, name: str, subjects: int) -> tuple[int, float]:
    conn = await cluster.connect(name)
    try:
        await conn.execute("CHECKPOINT")
        accounts = list(range(1, subjects + 1))
        t = time.perf_counter()
        status = await conn.execute(
            "UPDATE billing.xdrs SET account_id = NULL, cli = NULL, cld = NULL, ip = NULL "
            "WHERE i_account = ANY($1::bigint[])",
            accounts,
        )
        return int(status.split()[-1]), time.perf_counter() - t
    finally:
        await conn.close()


async def worker(
    cluster: Cluster, name: str, workdir: Path, ns: argparse.Namespace, concurrency: int
) -> tuple[int, float, list[float], int]:
    conn = await cluster.connect(name)
    await conn.execute("CHECKPOINT")
    await conn.close()
    audit = workdir / f"{name}.jsonl"
    config = parse_config(config_text(audit, ns.batch_size, concurrency, 0), "bench.yaml")
    t = time.perf_counter()
    summary = await run(config, cluster.dsn(name), lambda: NOW, once=True)
    elapsed = time.perf_counter() - t
    verified = sum(o.state == "verified" for o in summary.outcomes)
    rows = sum(o.rows.get("billing.xdrs", 0) for o in summary.outcomes)
    return rows, elapsed, summary.batch_ms, verified


TPS_RE = re.compile(r"^tps = ([0-9.]+) \(without initial connection time\)", re.M)


def pgbench(cluster: Cluster, port: int, name: str, script: Path, ns: argparse.Namespace) -> float:
    argv = [
        tool(cluster.db, "pgbench"),
        "-h",
        HOST,
        "-p",
        str(port),
        "-U",
        cluster.db.superuser,
        "-n",
        "-f",
        str(script),
        "-c",
        str(ns.clients),
        "-j",
        "2",
        "-T",
        str(ns.duration),
        name,
    ]
    env = {**os.environ, "PGPASSWORD": cluster.db.password, "PGSSLMODE": "disable"}
    done = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=ns.duration + 120)
    m = TPS_RE.search(done.stdout)
    if done.returncode or m is None:
        raise BenchError(f"pgbench failed: {done.stdout[-1500:]}\n{done.stderr[-1500:]}")
    return float(m.group(1))


def tool(db: EmbeddedPostgres, name: str) -> str:
    try:
        return db.client(name)
    except EmbeddedPostgresError as exc:
        raise BenchError(str(exc)) from exc


@contextlib.contextmanager
def process(argv: list[str], log_path: Path, env: dict[str, str] | None = None) -> Iterator[Any]:
    with open(log_path, "wb") as out:
        proc = subprocess.Popen(
            argv,
            cwd=REPO,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env,
            start_new_session=True,
        )
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def wait_port(port: int, proc: Any, timeout: float = 30) -> None:
    import socket

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise BenchError(f"pgveil exited with {proc.returncode}")
        with contextlib.suppress(OSError), socket.create_connection((HOST, port), 1):
            return
        time.sleep(0.1)
    raise BenchError("pgveil did not start")


async def job_running(cluster: Cluster, name: str) -> bool:
    conn = await cluster.connect(name)
    try:
        if not await conn.fetchval("SELECT to_regclass('pgveil.erasure_job') IS NOT NULL"):
            return False
        return bool(
            await conn.fetchval("SELECT count(*) FROM pgveil.erasure_job WHERE state = 'running'")
        )
    finally:
        await conn.close()


async def live_traffic(
    cluster: Cluster, name: str, workdir: Path, ns: argparse.Namespace, rate_limit: int
) -> dict[str, Any]:
    """pgbench through pgveil: idle, while the worker erases, idle again."""
    script = workdir / "billing.sql"
    script.write_text(PGBENCH_SCRIPT.format(first=ns.subjects + 1, last=2 * ns.subjects))
    port = free_port(HOST)
    proxy_argv = [
        sys.executable,
        "-m",
        "proxy.cli",
        "proxy",
        "--listen",
        f"{HOST}:{port}",
        "--upstream",
        f"{HOST}:{cluster.db.port}",
        "--upstream-sslmode",
        "disable",
        "--log-level",
        "warning",
    ]
    audit = workdir / f"live-{rate_limit}.jsonl"
    config = workdir / f"live-{rate_limit}.yaml"
    config.write_text(config_text(audit, ns.batch_size, 1, rate_limit))
    erase_argv = [
        sys.executable,
        "-m",
        "proxy.cli",
        "erase",
        "run",
        "--once",
        "--config",
        str(config),
        "--dsn",
        cluster.dsn(name),
        "--now",
        NOW.isoformat(),
    ]
    with process(proxy_argv, workdir / "pgveil.log") as proxy:
        wait_port(port, proxy)
        log(f"live traffic (rate limit {rate_limit or 'none'}): warm-up, idle ...")
        pgbench(cluster, port, name, script, ns)  # warm-up: caches, plans
        idle1 = pgbench(cluster, port, name, script, ns)
        log(f"  {idle1:.0f} tps; erasing ...")
        t_start = time.perf_counter()
        with process(erase_argv, workdir / "erase.log") as eraser:
            while not await job_running(cluster, name):
                if eraser.poll() is not None:
                    raise BenchError("the worker ended before it started erasing")
                await asyncio.sleep(0.05)
            busy = pgbench(cluster, port, name, script, ns)
            overlapped = eraser.poll() is None
            log(f"  {busy:.0f} tps while erasing; waiting for the worker ...")
            t = time.perf_counter()
            while eraser.poll() is None:
                await asyncio.sleep(0.2)
            worker_s = time.perf_counter() - t_start
            if eraser.returncode:
                raise BenchError(
                    f"the worker failed: {(workdir / 'erase.log').read_text()[-2000:]}"
                )
            log(f"  worker done {time.perf_counter() - t:.0f} s after pgbench; idle again ...")
        idle2 = pgbench(cluster, port, name, script, ns)
        log(f"  {idle2:.0f} tps")
    events = list(read_events(audit))
    rows = sum(int(e["rows"]["billing.xdrs"]) for e in events)
    return {
        "rate_limit": rate_limit,
        "worker_rows_per_s": rows / worker_s,
        "idle": [idle1, idle2],
        "busy": busy,
        "ratio": busy / statistics.mean([idle1, idle2]),
        "overlapped": overlapped,
        "longest_batch_ms": max(float(e["longest_batch_ms"]) for e in events),
        "verified": sum(bool(e["verified"]) for e in events),
    }


def verdict(ok: bool) -> str:
    return "met" if ok else "**not met**"


async def main_async(ns: argparse.Namespace, stack: contextlib.ExitStack) -> str:
    workdir = Path(tempfile.mkdtemp(prefix="pgveil-erasure-bench-"))
    stack.callback(shutil.rmtree, workdir, ignore_errors=True)
    log("starting PostgreSQL ...")
    db = EmbeddedPostgres(
        settings={"max_wal_size": "'8GB'", "checkpoint_timeout": "'1h'", "shared_buffers": "'1GB'"}
    )
    stack.callback(db.cleanup)
    db.start()
    cluster = Cluster(db)
    total = ns.subjects * ns.rows
    log(
        f"generating {total:,} xDRs of {ns.subjects:,} subjects + "
        f"{ns.subjects * ns.live_rows:,} live ones ..."
    )
    t = time.perf_counter()
    await load(cluster, "erasure_src", ns)
    log(f"  loaded in {time.perf_counter() - t:.0f} s")
    results: dict[str, Any] = {}
    log("bulk UPDATE ...")
    await cluster.copy("erasure_src", "erasure_bulk")
    bulk_rows, bulk_s = await bulk(cluster, "erasure_bulk", ns.subjects)
    await cluster.admin("DROP DATABASE erasure_bulk")
    log(f"  {bulk_rows:,} rows in {bulk_s:.1f} s")
    runs = []
    for concurrency in ns.concurrency:
        log(f"worker (concurrency {concurrency}) ...")
        target = f"erasure_w{concurrency}"
        await cluster.copy("erasure_src", target)
        rows, secs, batch_ms, verified = await worker(cluster, target, workdir, ns, concurrency)
        await cluster.admin(f"DROP DATABASE {target}")
        if rows != bulk_rows or verified != ns.subjects:
            raise BenchError(f"the worker erased {rows} rows, verified {verified} subjects")
        log(f"  {rows:,} rows in {secs:.1f} s; longest batch {max(batch_ms):.0f} ms")
        runs.append((concurrency, rows, secs, batch_ms))
    lives = []
    for rate in dict.fromkeys([0, ns.rate_limit]):
        await cluster.copy("erasure_src", "erasure_live")
        lives.append(await live_traffic(cluster, "erasure_live", workdir, ns, rate))
        await cluster.admin("DROP DATABASE erasure_live")
    results = {"bulk": (bulk_rows, bulk_s), "runs": runs, "live": lives}
    return report(ns, db, results)


def report(ns: argparse.Namespace, db: EmbeddedPostgres, r: dict[str, Any]) -> str:
    bulk_rows, bulk_s = r["bulk"]
    bulk_rps = bulk_rows / bulk_s
    commit = subprocess.run(
        ["git", "-C", str(REPO), "describe", "--always", "--dirty"],
        capture_output=True,
        text=True,
        check=False,
    ).stdout.strip()
    version = db.psql("SHOW server_version").strip()
    lines = [
        "# Erasure worker benchmark",
        "",
        f"- {time.strftime('%Y-%m-%d %H:%M:%S %Z')}, {os.cpu_count()} CPUs, PostgreSQL {version}, "
        f"pgveil `{commit}`",
        f"- {ns.subjects:,} subjects x {ns.rows:,} xDRs = {ns.subjects * ns.rows:,} rows to "
        f"erase, among {ns.subjects * (ns.rows + ns.live_rows):,} xDRs in {MONTHS} monthly "
        f"partitions (the billing fixture: {', '.join(PARTS)}); batch size {ns.batch_size:,}",
        "",
        "## Throughput (target: worker >= 0.7x the bulk UPDATE)",
        "",
        "| run | xDR rows | seconds | rows/s | vs bulk | longest batch (ms) | median batch (ms) |",
        "|---|--:|--:|--:|--:|--:|--:|",
        f"| one bulk `UPDATE ... WHERE i_account = ANY(...)` | {bulk_rows:,} | {bulk_s:.1f} | "
        f"{bulk_rps:,.0f} | 1.00 | (one transaction: {bulk_s * 1000:,.0f}) | |",
    ]
    worst = 0.0
    for concurrency, rows, secs, batch_ms in r["runs"]:
        rps = rows / secs
        worst = max(worst, max(batch_ms))
        lines.append(
            f"| worker, concurrency {concurrency} (whole run: xDRs, accounts, customers, "
            f"verification, audit) | {rows:,} | {secs:.1f} | {rps:,.0f} | {rps / bulk_rps:.2f} "
            f"({verdict(rps / bulk_rps >= 0.7)}) | {max(batch_ms):.0f} | "
            f"{statistics.median(batch_ms):.0f} |"
        )
    lives = r["live"]
    worst = max([worst, *(live["longest_batch_ms"] for live in lives)])
    best = max(live["ratio"] for live in lives)
    lines += [
        "",
        f"## Longest lock held by a batch (target < 1 s): {worst:.0f} ms ({verdict(worst < 1000)})",
        "",
        "Every batch is one statement, hence one transaction (its duration as seen by the "
        "worker), so no lock it takes is held longer; the bulk UPDATE holds its row locks for "
        "its whole duration.",
        "",
        f"## Live traffic through pgveil (target >= 0.8x idle): best {best:.2f} "
        f"({verdict(best >= 0.8)})",
        "",
        f"pgbench -c {ns.clients} -j 2 -T {ns.duration} through `pgveil proxy` (relay), a "
        "billing script on live customers (read the last 10 xDRs of an account, insert an xDR, "
        "update a balance), against the database the worker erases (`pgveil erase run "
        "--once`, concurrency 1): after a warm-up run, idle, while erasing, idle again. "
        "tps while erasing / mean idle tps.",
        "",
        "| worker rate limit | idle before (tps) | while erasing (tps) | idle after (tps) | ratio "
        "| worker rows/s meanwhile | erasing all along | longest batch (ms) |",
        "|---|--:|--:|--:|--:|--:|--:|--:|",
    ]
    for live in lives:
        rate = f"{live['rate_limit']:,} rows/s" if live["rate_limit"] else "none"
        lines.append(
            f"| {rate} | {live['idle'][0]:.0f} | {live['busy']:.0f} | {live['idle'][1]:.0f} | "
            f"{live['ratio']:.2f} ({verdict(live['ratio'] >= 0.8)}) | "
            f"{live['worker_rows_per_s']:,.0f} | {live['overlapped']} | "
            f"{live['longest_batch_ms']:.0f} |"
        )
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    p.add_argument("--subjects", type=int, default=2000, help="terminated customers (2000)")
    p.add_argument("--rows", type=int, default=1000, help="xDRs per subject (1000)")
    p.add_argument("--live-rows", type=int, default=250, help="xDRs per live customer (250)")
    p.add_argument("--batch-size", type=int, default=5000, help="worker batch size (5000)")
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 2], help="worker runs (1 2)")
    p.add_argument(
        "--rate-limit",
        type=int,
        default=50_000,
        help="worker rows/s for the second live-traffic run (50000; the first has none)",
    )
    p.add_argument("--duration", type=int, default=15, help="seconds per pgbench run (15)")
    p.add_argument("--clients", type=int, default=4, help="pgbench clients (4)")
    return p.parse_args(argv)


def _sigterm(signum: int, frame: object) -> NoReturn:
    raise SystemExit(128 + signum)


def main(argv: list[str] | None = None) -> int:
    ns = parse_args(argv)
    signal.signal(signal.SIGTERM, _sigterm)
    with contextlib.ExitStack() as stack:
        try:
            text = asyncio.run(main_async(ns, stack))
        except BenchError as exc:
            print(f"bench: error: {exc}", file=sys.stderr)
            return 1
        except KeyboardInterrupt:
            print("bench: interrupted; cleaning up", file=sys.stderr)
            return 130
    OUT.parent.mkdir(exist_ok=True)
    OUT.write_text(text)
    print(text, end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
