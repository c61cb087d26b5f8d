"""System calls and CPU time per transaction of pgveil's proxy, counted by the kernel's
tracepoints (`perf stat -e syscalls:sys_enter_*`): where the proxy's system time goes.

bench/instructions.py counts user-space instructions and leaves system calls out; this
script counts the other half. It runs `pgbench -S` (scale 10, `pgbench_accounts` protected
with its subject: the audit part's rules) or the helpdesk script through pgveil at 8
clients for a fixed number of transactions, with `perf stat` attached to the proxy for
exactly those transactions (start-up, the catalog read and a warm-up are not counted), and
reads the proxy's user and system CPU time around them from /proc. With --baseline DIR it
does the same for another checkout (a git worktree at an older commit, with its own
`.venv`), interleaved with ours for --reps repetitions against the same embedded
PostgreSQL, and prints both side by side (medians).

Counts depend on timing (at 8 clients, how many answers one read gathers moves with the
load), so compare builds within one run, never across runs. It is a tool for comparing
builds, not a benchmark of pgveil against anything else.

Usage: python bench/syscalls.py [--baseline DIR] [--transactions N] [--reps N]
                                [--mode simple|extended|prepared] [--role unmasked|masked]
                                [--no-audit] [--helpdesk] [--record DIR]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import signal
import statistics
import subprocess
import sys
from pathlib import Path

sys.path.insert(1, str(Path(__file__).resolve().parents[1]))  # (the script's own folder is first)

import instructions

import bench as b

ROOT = Path(__file__).resolve().parents[1]
SYSCALLS = (
    "read", "write", "writev", "recvfrom", "sendto", "recvmsg", "sendmsg",
    "epoll_wait", "epoll_ctl", "futex", "getpid", "newfstatat", "lseek",
    "openat", "close", "fsync", "fdatasync", "getrandom", "clock_gettime", "ioctl",
)  # fmt: skip


def python_of(repo: Path) -> str:
    """The checkout's own interpreter (its venv holds its compiled modules)."""
    venv = repo / ".venv" / "bin" / "python"
    return str(venv) if venv.exists() else sys.executable


def audit_bytes(path: Path) -> int:
    """Bytes in the audit file and its rotated predecessors so far (0 without one)."""
    return sum(f.stat().st_size for f in path.parent.glob(path.name + "*"))


def switches(pid: int) -> tuple[int, int]:
    """(voluntary, involuntary) context switches of process `pid` so far."""
    counts = dict(
        line.split(":", 1)
        for line in Path(f"/proc/{pid}/status").read_text().splitlines()
        if line.endswith(tuple("0123456789")) and "ctxt_switches" in line
    )
    return int(counts["voluntary_ctxt_switches"]), int(counts["nonvoluntary_ctxt_switches"])


def measure(
    db: b.EmbeddedPostgres,
    workdir: Path,
    repo: Path,
    rules: Path,
    script: Path,
    args: argparse.Namespace,
    rep: int,
) -> dict[str, float]:
    """Per transaction: each system call's count, 'all' system calls, and the proxy's
    user and system CPU microseconds, for one run of checkout `repo`."""
    label = f"{repo.name}-{rep}"
    audit_file = workdir / f"audit-{label}.jsonl"
    audit = () if args.no_audit else ("--audit-file", str(audit_file))
    svc, port = b.start_pgveil(db, workdir, rules, audit, label, repo, python_of(repo))
    try:
        svc.wait_port(port, timeout=120)

        def pgbench(transactions: int) -> None:
            workload = ["-f", str(script)] if args.helpdesk else ["-S"]
            instructions.run_pgbench(
                db, port, args.role, workload, 8, transactions, args.mode, label
            )

        pgbench(800)  # warm: the shape cache, the catalog, the first events
        out = workdir / f"perf-{label}.csv"
        events = ["raw_syscalls:sys_enter"] + [f"syscalls:sys_enter_{s}" for s in SYSCALLS]
        perf = subprocess.Popen(
            ["perf", "stat", "-x", ",", "-o", str(out), "-p", str(svc.pid),
             *[x for e in events for x in ("-e", e)]],
            stderr=subprocess.DEVNULL,
        )  # fmt: skip
        if args.record is not None:  # and a profile of where the CPU time goes
            args.record.mkdir(parents=True, exist_ok=True)
            spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
            recorder = subprocess.Popen(
                [spy, "record", "--native", "--format", "raw", "-r", "250",
                 "-o", str(args.record / f"py-spy-{label}.txt"), "-p", str(svc.pid)],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            )  # fmt: skip
        try:
            u0, s0 = b.cpu_times(svc.pid)
            f0, c0 = b.minor_faults(svc.pid), switches(svc.pid)
            a0 = audit_bytes(audit_file)
            pgbench(args.transactions)
            u1, s1 = b.cpu_times(svc.pid)
            f1, c1 = b.minor_faults(svc.pid), switches(svc.pid)
            a1 = audit_bytes(audit_file)
        finally:
            for tool in (perf, recorder) if args.record is not None else (perf,):
                tool.send_signal(signal.SIGINT)  # (both write out what they have on SIGINT)
                tool.wait(60)
    finally:
        if svc.proc is not None and svc.proc.poll() is None:
            os.kill(svc.pid, signal.SIGTERM)
            svc.proc.wait(60)
    tx = args.transactions // 8 * 8  # (what run_pgbench ran)
    result = {"user µs": (u1 - u0) / tx * 1e6, "system µs": (s1 - s0) / tx * 1e6}
    result["page faults"] = (f1 - f0) / tx  # minor: the kernel's work outside system calls
    result["voluntary cs"] = (c1[0] - c0[0]) / tx  # the proxy waited (epoll)
    result["involuntary cs"] = (c1[1] - c0[1]) / tx  # the proxy was preempted
    result["audit bytes"] = (a1 - a0) / tx  # what the audit file's writes carry
    for line in out.read_text().splitlines():
        fields = line.split(",")
        if len(fields) < 3 or not fields[0].strip().isdigit():
            continue
        name = fields[2].removeprefix("syscalls:sys_enter_")
        result["all" if name == "raw_syscalls:sys_enter" else name] = int(fields[0]) / tx
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--baseline", type=Path, help="another checkout (with .venv) to measure too")
    p.add_argument("--transactions", type=int, default=20000)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--mode", choices=("simple", "extended", "prepared"), default="simple")
    p.add_argument("--role", choices=("unmasked", "masked"), default="unmasked")
    p.add_argument("--no-audit", action="store_true", help="run pgveil without auditing")
    p.add_argument("--helpdesk", action="store_true", help="the helpdesk script, not -S")
    p.add_argument(
        "--record",
        type=Path,
        help="also profile the proxy with py-spy (--native: the compiled modules' functions "
        "have names) into this folder: py-spy-<checkout>-<rep>.txt, collapsed stacks",
    )
    args = p.parse_args(argv)
    if shutil.which("perf") is None:
        print("syscalls: perf is not installed (apt-get install linux-perf)", file=sys.stderr)
        return 2
    repos = [ROOT] + ([args.baseline.resolve()] if args.baseline else [])
    runs: dict[Path, list[dict[str, float]]] = {r: [] for r in repos}
    with contextlib.ExitStack() as stack:
        db, workdir, rules, script = instructions.helpdesk_database(stack, "syscalls")
        b.pgbench_init(db, dict(os.environ))
        db.psql(b.PGBENCH_GRANTS.format(roles=f"{b.MASKED_ROLE}, {b.UNMASKED_ROLE}"))
        rules.write_text(b.AUDIT_RULES)
        for rep in range(args.reps):
            for repo in repos:
                runs[repo].append(measure(db, workdir, repo, rules, script, args, rep))
    audit = "without auditing" if args.no_audit else "audited"
    what = "the helpdesk script" if args.helpdesk else "pgbench -S"
    print(f"per transaction, medians of {args.reps} ({args.role}, -M {args.mode}, -c 8, {audit}, "
          f"{args.transactions} transactions of {what}):")  # fmt: skip
    medians = {x: {k: statistics.median(r[k] for r in runs[x]) for k in runs[x][0]} for x in repos}
    print(f"  {'':14}" + "".join(f"{x.name:>14}" for x in repos))
    for k in runs[ROOT][0]:
        if any(medians[x][k] for x in repos):
            print(f"  {k:14}" + "".join(f"{medians[x][k]:14.2f}" for x in repos))
    return 0


if __name__ == "__main__":
    sys.exit(main())
