"""How often one timing-dependent driver test fails directly, through pgbouncer and through
pgveil: the runs interleaved, so the machine's load falls on every variant alike.

Made for asyncpg 0.31.0's `tests/test_execute.py::TestExecuteMany::
test_executemany_server_failure_during_writes` (issue 16), which driver_suites.py reported
as lost through pgveil now and then. The test writes 128 rows of 32 KiB with executemany,
the second row violating a unique key, and asserts that asyncpg stopped generating rows
before the end. asyncpg checks for the server's ErrorResponse only between batches of
4 x 32 KiB, and it is never paused by flow control on the way: the kernel autotunes the
client socket's send buffer to tcp_wmem's maximum (4 MiB on Linux by default), about all
that the test writes, so every byte is accepted at once whoever reads at the other end
(measured: no pause_writing in any variant, even with pgveil's buffers cut to 16 KiB). The
test passes only when the error's round trip (server, plus a proxy's two forwards) is
shorter than the 1-3 ms the client takes to encode and write 4 MiB: on a busy 2-core
machine that is a matter of which process gets a CPU first, directly too, and a proxy is
one more process that has to. See bench/README.md for the numbers.

This is a measurement, not a check: it prints the failures of each variant and exits 0.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(1, str(Path(__file__).resolve().parents[1]))  # (the script's own folder is first)

import driver_suites

from bench import DBNAME, HOST, Service, pgbouncer_binary, start_pgbouncer
from proxy.demo.embedded_pg import EmbeddedPostgres

NODE = "tests/test_execute.py::TestExecuteMany::test_executemany_server_failure_during_writes"
VARIANTS = ("direct", "pgbouncer", "relay")


def run_once(python: Path, tests: Path, node: str, port: int, pg: EmbeddedPostgres,
             report: Path) -> bool:  # fmt: skip
    """One pytest run of `node` against `port`: True when it passed."""
    env = {**os.environ, "PGPASSWORD": pg.password}
    for name in ("PGVEIL_PURE_PYTHON", "PYTHONPATH"):
        env.pop(name, None)
    env.update(
        PGHOST=HOST, PGPORT=str(port), PGUSER=pg.superuser, PGDATABASE=DBNAME,
        PGSSLMODE="disable",
    )  # fmt: skip
    report.unlink(missing_ok=True)
    args = [str(python), "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--junitxml={report}"]
    subprocess.run([*args, node], cwd=tests, env=env, stdout=subprocess.DEVNULL,
                   stderr=subprocess.STDOUT)  # fmt: skip
    passed, failed, _ = driver_suites.outcomes(report)
    if len(passed) + len(failed) != 1:
        sys.exit(f"{node}: not one test run (passed {len(passed)}, failed {len(failed)})")
    return bool(passed)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--asyncpg-src", type=Path, required=True,
                    help=f"a checkout of asyncpg at tag v{driver_suites.ASYNCPG}")  # fmt: skip
    ap.add_argument("--test", default=NODE, help="the test's node id under the checkout")
    ap.add_argument("--runs", type=int, default=20, help="runs of each variant")
    ap.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "pgveil-race")
    opts = ap.parse_args()
    work = opts.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    driver_suites.check_source("asyncpg", opts.asyncpg_src)
    python = driver_suites.suite_env(work, "asyncpg")
    tests = driver_suites.tests_copy(work, "asyncpg", opts.asyncpg_src)
    pg = EmbeddedPostgres().start()
    services: list[Service] = []
    try:
        bouncer, bouncer_port = start_pgbouncer(pg, work, pgbouncer_binary())
        services.append(bouncer)
        bouncer.wait_port(bouncer_port)
        # pgveil without rules: asyncpg's tests connect to DBNAME, as through pgbouncer
        veil, veil_port = driver_suites.start_proxy("relay", pg, work)
        ports = {"direct": pg.port, "pgbouncer": bouncer_port, "relay": veil_port}
        failures = dict.fromkeys(VARIANTS, 0)
        try:
            for run in range(1, opts.runs + 1):
                for variant in VARIANTS:
                    report = work / f"race-{variant}.xml"
                    if not run_once(python, tests, opts.test, ports[variant], pg, report):
                        failures[variant] += 1
                counts = "  ".join(f"{v} {failures[v]}/{run}" for v in VARIANTS)
                print(f"run {run}: failed {counts}", flush=True)
        finally:
            veil.terminate()
            veil.wait(30)
    finally:
        for service in services:
            service.stop()
        pg.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
