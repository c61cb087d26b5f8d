"""Instructions per transaction of pgveil's proxy, counted by callgrind: a measure of the
hot path's cost that does not move with the machine's load.

bench/run measures throughput and CPU time, which on a shared 2-core machine move by more
than most changes (two runs of the same build differ by 10-30%). This script runs the
helpdesk pgbench script (-c 1, a fixed number of transactions, a fixed random seed: the
rows per transaction vary with it) through pgveil under `valgrind --tool=callgrind` with
instrumentation switched on only around the measured transactions (start-up, imports, the
catalog read and a warm-up are not counted), for this
checkout and, with --baseline DIR, another one (a git worktree at an older commit), both
against the same embedded PostgreSQL. Counts repeat within about 1%.

It reports user-space instructions only: system calls (the writes of results and audit
lines) cost the same per transaction either way and are not in the number. It is a tool
for comparing builds, not a benchmark of pgveil against anything else, and it must not be
used for timing (callgrind runs the proxy some fifty times slower).

Usage: python bench/instructions.py [--baseline DIR] [--transactions N]
                                    [--mode simple|extended|prepared] [--role unmasked|masked]
                                    [--no-audit] [--select-only] [--clients N] [--keep DIR]
                                    [--script FILE] [--warm N]

`--select-only` counts `pgbench -S` (scale 10, pgbench_accounts protected with its subject:
the audit part's rules) instead of the helpdesk script: one short statement per transaction,
where the per-statement work weighs most.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(1, str(Path(__file__).resolve().parents[1]))  # (the script's own folder is first)

import bench as b

ROOT = Path(__file__).resolve().parents[1]


def missing_valgrind(tool: str) -> bool:
    """Whether a binary the counts need is missing (said on stderr, naming `tool`)."""
    for binary in ("valgrind", "callgrind_control", "callgrind_annotate"):
        if shutil.which(binary) is None:
            print(f"{tool}: {binary} is not installed (apt-get install valgrind)", file=sys.stderr)
            return True
    return False


def helpdesk_database(
    stack: contextlib.ExitStack, tool: str
) -> tuple[b.EmbeddedPostgres, Path, Path, Path]:
    """An embedded PostgreSQL with the billing fixture loaded, a work directory and the
    helpdesk rules and pgbench script in it: (db, workdir, rules, script), all removed when
    `stack` closes."""
    workdir = Path(tempfile.mkdtemp(prefix=f"pgveil-{tool}-"))
    stack.callback(shutil.rmtree, workdir, ignore_errors=True)
    db = b.EmbeddedPostgres(settings={"max_connections": "100"})
    stack.callback(db.cleanup)
    db.start()
    b.load_billing(db)
    rules, script = b.write_helpdesk_files(workdir)
    return db, workdir, rules, script


def run_pgbench(
    db: b.EmbeddedPostgres,
    port: int,
    role: str,
    workload: list[str],
    clients: int,
    transactions: int,
    mode: str,
    label: str,
    extra: list[str] | None = None,
) -> None:
    """pgbench through the proxy on `port` as the `role` (unmasked or masked) login:
    `transactions` divided among `clients`; a BenchError unless all were processed."""
    user, pw = (
        (b.UNMASKED_ROLE, b.UNMASKED_PW) if role == "unmasked" else (b.MASKED_ROLE, b.MASKED_PW)
    )
    per_client = transactions // clients
    done = subprocess.run(
        [b.tool(db, "pgbench"), "-n", "-h", b.HOST, "-p", str(port), "-U", user, *workload,
         "-c", str(clients), "-j", str(min(2, clients)), "-t", str(per_client), "-M", mode,
         *(extra or []), b.DBNAME],
        env={**os.environ, "PGPASSWORD": pw, "PGSSLMODE": "disable"},
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    wanted = f"processed: {per_client * clients}/{per_client * clients}"
    if wanted not in done.stdout:
        raise b.BenchError(f"pgbench through {label}: {done.stdout[-400:]}{done.stderr[-400:]}")


def count(
    db: b.EmbeddedPostgres,
    workdir: Path,
    repo: Path,
    rules: Path,
    script: Path,
    args: argparse.Namespace,
    python: str = sys.executable,
    label: str | None = None,
) -> int:
    """Instructions the proxy of checkout `repo`, run by the interpreter `python`, ran for
    `args.transactions` transactions (bench/interpreters.py passes other interpreters)."""
    label = label or repo.name
    port = b.free_port(b.HOST)
    out = workdir / f"callgrind.{label}.out"
    argv = [
        "valgrind",
        "--tool=callgrind",
        "--instr-atstart=no",
        f"--callgrind-out-file={out}",
        python,
        "-m",
        "proxy.cli",
        "proxy",
        "--listen",
        f"{b.HOST}:{port}",
        "--upstream",
        f"{b.HOST}:{db.port}",
        "--upstream-sslmode",
        "disable",
        "--log-level",
        "warning",
        "--rules",
        str(rules),
        "--catalog-user",
        db.superuser,
    ]
    if not args.no_audit:
        argv += ["--audit-file", str(workdir / f"audit-{label}.jsonl")]
    env = {**os.environ, "PGVEIL_CATALOG_PASSWORD": db.password, "PYTHONPATH": str(repo)}
    svc = b.Service(label, argv, workdir / f"{label}.log", cwd=repo, env=env)
    svc.start()
    try:
        svc.wait_port(port, timeout=600)  # (imports under valgrind take a while)

        def pgbench(transactions: int) -> None:
            workload = ["-S"] if args.select_only else ["-f", str(args.script or script)]
            run_pgbench(db, port, args.role, workload, args.clients, transactions, args.mode,
                        label, ["--random-seed", "1"])  # fmt: skip

        # warm: the shape cache, the catalog, the first events
        pgbench(20 * args.clients if args.warm is None else args.warm)
        subprocess.run(
            ["callgrind_control", "-i", "on", str(svc.pid)], check=True, capture_output=True
        )
        pgbench(args.transactions)
        subprocess.run(
            ["callgrind_control", "-i", "off", str(svc.pid)], check=True, capture_output=True
        )
    finally:
        if svc.proc is not None and svc.proc.poll() is None:
            os.kill(svc.pid, signal.SIGTERM)
            svc.proc.wait(300)
    if args.keep is not None:
        args.keep.mkdir(parents=True, exist_ok=True)
        shutil.copy(out, args.keep / out.name)
    text = subprocess.run(
        ["callgrind_annotate", str(out)], capture_output=True, text=True, check=True
    ).stdout
    found = re.search(r"([\d,]+)(?: \([\d.]+%\))?\s+PROGRAM TOTALS", text)
    if found is None:
        raise b.BenchError(f"no totals in callgrind's output for {label}")
    return int(found.group(1).replace(",", ""))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--baseline", type=Path, help="another checkout to count as well")
    p.add_argument("--transactions", type=int, default=200)
    p.add_argument("--mode", choices=("simple", "extended", "prepared"), default="simple")
    p.add_argument(
        "--clients", type=int, default=1, help="pgbench clients (-c; -t is divided among them)"
    )
    p.add_argument("--role", choices=("unmasked", "masked"), default="unmasked")
    p.add_argument("--no-audit", action="store_true", help="run pgveil without auditing")
    p.add_argument(
        "--select-only", action="store_true", help="pgbench -S instead of the helpdesk script"
    )
    p.add_argument(
        "--script",
        type=Path,
        help="this pgbench script instead of the helpdesk one (e.g. one large SELECT)",
    )
    p.add_argument("--warm", type=int, help="transactions before counting (default: 20 per client)")
    p.add_argument(
        "--keep", type=Path, help="copy callgrind's output files into this folder (to annotate)"
    )
    args = p.parse_args(argv)
    if missing_valgrind("instructions"):
        return 2
    repos = [ROOT] + ([args.baseline.resolve()] if args.baseline else [])
    counts: dict[Path, int] = {}
    with contextlib.ExitStack() as stack:
        db, workdir, rules, script = helpdesk_database(stack, "instructions")
        if args.select_only:
            b.pgbench_init(db, dict(os.environ))
            db.psql(b.PGBENCH_GRANTS.format(roles=f"{b.MASKED_ROLE}, {b.UNMASKED_ROLE}"))
            rules.write_text(b.AUDIT_RULES)
        for repo in repos:
            counts[repo] = count(db, workdir, repo, rules, script, args)
    audit = "without auditing" if args.no_audit else "audited"
    what = "pgbench -S" if args.select_only else args.script or "the helpdesk script"
    print(f"k instructions per transaction ({args.role}, -M {args.mode}, {audit}, "
          f"{args.transactions} transactions of {what}):")  # fmt: skip
    for repo, total in counts.items():
        print(f"  {repo}: {total / args.transactions / 1000:.0f}")
    if args.baseline:
        ours, base = counts[ROOT], counts[repos[1]]
        print(f"  ours/baseline: {ours / base:.3f} (below 1 is cheaper)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
