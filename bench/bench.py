"""Throughput and latency overhead of pgveil compared with a direct connection and pgbouncer.

Starts a throwaway PostgreSQL (`proxy.embedded_pg.EmbeddedPostgres`), a pgbouncer in session
mode and pgveil (relay only, no rules) in front of it, all on loopback, then runs the same
client workloads against the three *variants*:

- `pgbench -S -n` (select-only) with `-M simple|extended|prepared`, at `-c 1` and `-c 8 -j 2`;
- a wide result through psql: `SELECT * FROM wide` (unaligned) and `COPY wide TO STDOUT`,
  where `wide` is 200,000 rows of 6 text columns of 20-30 characters.

Variants run interleaved (direct, pgbouncer, pgveil, direct, ...) so each repetition yields a
*paired* sample taken under the same machine noise; the report shows the median value per
variant and the median over repetitions of the per-repetition ratio to direct. For the
`-c 8` rows it also samples the CPU time (utime+stime) of the pgveil and pgbouncer processes
around each run and reports microseconds of proxy CPU per query.

Everything (processes, cluster, temporary directories) is removed on exit, including on
Ctrl-C and SIGTERM. Run it through `bench/run`; see `bench/README.md`.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import pwd
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, NoReturn

from proxy.embedded_pg import EmbeddedPostgres, free_port

REPO = Path(__file__).resolve().parent.parent
OUT_DIR = REPO / "bench" / "out"
HOST = "127.0.0.1"
DBNAME = "postgres"
WIDE_ROWS = 200_000
CLK_TCK = os.sysconf("SC_CLK_TCK")
VARIANTS = ("direct", "pgbouncer", "pgveil")


class BenchError(Exception):
    pass


# ---------------------------------------------------------------------------------------------
# workloads


@dataclass(frozen=True)
class Workload:
    name: str
    kind: Literal["pgbench", "psql"]
    args: tuple[str, ...]  # pgbench options, or psql options + command
    measure_cpu: bool = False


def workloads() -> list[Workload]:
    rows: list[Workload] = []
    for mode in ("simple", "extended", "prepared"):
        rows.append(Workload(f"-M {mode} -c 1", "pgbench", ("-M", mode, "-c", "1", "-j", "1")))
        rows.append(
            Workload(
                f"-M {mode} -c 8 -j 2",
                "pgbench",
                ("-M", mode, "-c", "8", "-j", "2"),
                measure_cpu=True,
            )
        )
    rows.append(Workload("psql SELECT * FROM wide", "psql", ("-At", "-c", "SELECT * FROM wide")))
    rows.append(Workload("psql COPY wide TO STDOUT", "psql", ("-c", "COPY wide TO STDOUT")))
    return rows


# ---------------------------------------------------------------------------------------------
# processes


def cpu_seconds(pid: int) -> float:
    """utime + stime of a whole process (all threads), from /proc/PID/stat."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2 :].split()  # fields[0] is field 3 (state)
    return (int(fields[11]) + int(fields[12])) / CLK_TCK  # fields 14 (utime), 15 (stime)


def _ppid_and_comm(pid: int) -> tuple[int, str]:
    stat = Path(f"/proc/{pid}/stat").read_text()
    comm = stat[stat.index("(") + 1 : stat.rindex(")")]
    return int(stat[stat.rindex(")") + 2 :].split()[1]), comm


def find_child(parent: int, comm: str, timeout: float = 10) -> int:
    """PID of the child of `parent` named `comm` (the program `runuser` forked)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            with contextlib.suppress(OSError, ValueError, IndexError):
                if _ppid_and_comm(int(entry.name)) == (parent, comm):
                    return int(entry.name)
        time.sleep(0.05)
    raise BenchError(f"no child process {comm!r} of pid {parent} appeared")


@dataclass
class Service:
    """A long-running helper process in its own session, logging to a file."""

    name: str
    argv: list[str]
    log_path: Path
    cwd: Path | None = None
    proc: subprocess.Popen[bytes] | None = None
    pid: int = 0  # the process whose CPU time is sampled

    def start(self) -> None:
        with open(self.log_path, "wb") as log:  # the child keeps its own descriptor
            self.proc = subprocess.Popen(
                self.argv,
                cwd=self.cwd,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # Ctrl-C reaches only us; we stop it in order
            )
        self.pid = self.proc.pid

    def wait_port(self, port: int, timeout: float = 30) -> None:
        assert self.proc is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise BenchError(
                    f"{self.name} exited with status {self.proc.returncode}:\n{self.log_tail()}"
                )
            with contextlib.suppress(OSError), socket.create_connection((HOST, port), 1):
                return
            time.sleep(0.1)
        raise BenchError(f"{self.name} did not accept on {HOST}:{port}:\n{self.log_tail()}")

    def log_tail(self, lines: int = 30) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        return "(no log)"

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            # signal the program itself: a wrapper (runuser) then reaps it and exits with it
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)  # its own group: start_new_session
                self.proc.wait(10)
        self.proc = None


def ensure_alive(service: Service) -> None:
    """Fail when a helper died mid-run, instead of benchmarking connection errors."""
    if service.proc is not None and service.proc.poll() is not None:
        raise BenchError(
            f"{service.name} died (status {service.proc.returncode}):\n{service.log_tail()}"
        )


# ---------------------------------------------------------------------------------------------
# setup


def tool(db: EmbeddedPostgres, name: str) -> str:
    candidate = db.bindir / name
    if candidate.is_file():
        return str(candidate)
    found = shutil.which(name)
    if not found:
        raise BenchError(f"{name} not found in {db.bindir} or on PATH")
    return found


def pgbouncer_binary() -> str:
    found = shutil.which("pgbouncer") or (
        "/usr/sbin/pgbouncer" if Path("/usr/sbin/pgbouncer").is_file() else None
    )
    if found:
        return found
    if os.geteuid() != 0:
        raise BenchError("pgbouncer is not installed; run `apt-get install -y pgbouncer` as root")
    print("pgbouncer not found; running apt-get install -y pgbouncer", file=sys.stderr)
    done = subprocess.run(
        ["apt-get", "install", "-y", "pgbouncer"],
        capture_output=True,
        text=True,
        env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"},
    )
    found = shutil.which("pgbouncer") or (
        "/usr/sbin/pgbouncer" if Path("/usr/sbin/pgbouncer").is_file() else None
    )
    if done.returncode or not found:
        raise BenchError(
            "pgbouncer is not installed and `apt-get install -y pgbouncer` failed "
            f"(status {done.returncode}): {done.stderr.strip()[-1000:]}"
        )
    return found


def as_service_user() -> tuple[list[str], int, int] | None:
    """(runuser prefix, uid, gid) when running as root: pgbouncer refuses to run as root."""
    if os.geteuid() != 0:
        return None
    try:
        pw = pwd.getpwnam("postgres")
    except KeyError as exc:
        raise BenchError("running as root needs a 'postgres' OS user for pgbouncer") from exc
    return ["runuser", "-u", "postgres", "--"], pw.pw_uid, pw.pw_gid


def start_pgbouncer(db: EmbeddedPostgres, workdir: Path, binary: str) -> tuple[Service, int]:
    port = free_port(HOST)
    userlist = workdir / "userlist.txt"
    userlist.write_text(f'"{db.superuser}" "{db.password}"\n')
    ini = workdir / "pgbouncer.ini"
    ini.write_text(
        f"""[databases]
{DBNAME} = host={HOST} port={db.port} dbname={DBNAME}

[pgbouncer]
listen_addr = {HOST}
listen_port = {port}
unix_socket_dir =
auth_type = scram-sha-256
auth_file = {userlist}
pool_mode = session
max_client_conn = 100
default_pool_size = 20
log_connections = 0
log_disconnections = 0
log_pooler_errors = 1
"""
    )
    prefix: list[str] = []
    runas = as_service_user()
    if runas is not None:
        prefix, uid, gid = runas
        for path in (workdir, userlist, ini):
            os.chown(path, uid, gid)
    userlist.chmod(0o600)
    service = Service("pgbouncer", [*prefix, binary, str(ini)], workdir / "pgbouncer.log")
    service.start()
    if prefix:
        assert service.proc is not None
        service.pid = find_child(service.proc.pid, "pgbouncer")
    return service, port


def start_pgveil(db: EmbeddedPostgres, workdir: Path) -> tuple[Service, int]:
    port = free_port(HOST)
    argv = [
        sys.executable, "-m", "proxy.cli", "proxy",
        "--listen", f"{HOST}:{port}",
        "--upstream", f"{HOST}:{db.port}",
        "--upstream-sslmode", "disable",
        "--log-level", "warning",
    ]  # fmt: skip
    service = Service("pgveil", argv, workdir / "pgveil.log", cwd=REPO)
    service.start()
    return service, port


def load_data(db: EmbeddedPostgres, env: dict[str, str]) -> None:
    print("pgbench -i -s 10 ...", file=sys.stderr)
    init = subprocess.run(
        [tool(db, "pgbench"), "-i", "-s", "10", "-q",
         "-h", HOST, "-p", str(db.port), "-U", db.superuser, DBNAME],
        capture_output=True, text=True, env=env, timeout=600,
    )  # fmt: skip
    if init.returncode:
        raise BenchError(f"pgbench -i failed: {init.stderr.strip()[-2000:]}")
    print(f"creating wide ({WIDE_ROWS:,} rows x 6 text columns) ...", file=sys.stderr)
    # md5 hex is 32 characters; cut each column to 20-30
    cols = ",\n".join(
        f"  substr(md5(i::text || '{c}'), 1, 20 + (i + {k}) % 11) AS c{k + 1}"
        for k, c in enumerate("abcdef")
    )
    db.psql(f"CREATE TABLE wide AS SELECT\n{cols}\nFROM generate_series(1, {WIDE_ROWS}) AS i")
    db.psql("VACUUM (ANALYZE) wide")
    db.psql("CHECKPOINT")


# ---------------------------------------------------------------------------------------------
# running


@dataclass
class Target:
    name: str
    port: int
    service: Service | None = None  # the proxy in between, if any


TPS_RE = re.compile(r"^tps = ([0-9.]+) \(without initial connection time\)", re.M)
TX_RE = re.compile(r"^number of transactions actually processed: (\d+)", re.M)
FAILED_RE = re.compile(r"^number of failed transactions: (\d+)", re.M)


def run_pgbench(
    db: EmbeddedPostgres,
    env: dict[str, str],
    target: Target,
    args: tuple[str, ...],
    duration: int,
) -> tuple[float, int]:
    """(tps without initial connection time, transactions processed)."""
    argv = [
        tool(db, "pgbench"),
        "-h",
        HOST,
        "-p",
        str(target.port),
        "-U",
        db.superuser,
        "-n",
        "-S",
        *args,
        "-T",
        str(duration),
        DBNAME,
    ]
    done = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=duration + 120)
    tps, tx = TPS_RE.search(done.stdout), TX_RE.search(done.stdout)
    failed = FAILED_RE.search(done.stdout)
    if done.returncode or not tps or not tx or (failed and int(failed.group(1))):
        raise BenchError(
            f"pgbench against {target.name} failed (status {done.returncode}): "
            f"{' '.join(argv)}\n{done.stdout.strip()[-1500:]}\n{done.stderr.strip()[-1500:]}"
        )
    return float(tps.group(1)), int(tx.group(1))


def run_psql(
    db: EmbeddedPostgres, env: dict[str, str], target: Target, args: tuple[str, ...]
) -> float:
    """Wall seconds of one psql run, output discarded."""
    argv = [
        tool(db, "psql"),
        "-X",
        "-v",
        "ON_ERROR_STOP=1",
        "-h",
        HOST,
        "-p",
        str(target.port),
        "-U",
        db.superuser,
        "-d",
        DBNAME,
        *args,
    ]
    start = time.perf_counter()
    done = subprocess.run(
        argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env, timeout=600
    )
    elapsed = time.perf_counter() - start
    if done.returncode:
        raise BenchError(f"psql against {target.name} failed: {done.stderr.strip()[-1500:]}")
    return elapsed


@dataclass
class Results:
    values: dict[str, dict[str, list[float]]] = field(default_factory=dict)  # workload->variant
    cpu_us: dict[str, dict[str, list[float]]] = field(default_factory=dict)  # per query

    def add(self, table: dict[str, dict[str, list[float]]], row: str, var: str, v: float) -> None:
        table.setdefault(row, {}).setdefault(var, []).append(v)


def run_all(
    db: EmbeddedPostgres, env: dict[str, str], targets: list[Target], reps: int, duration: int
) -> Results:
    rows = workloads()
    print("warm-up ...", file=sys.stderr)
    for target in targets:
        run_pgbench(db, env, target, ("-M", "simple", "-c", "8", "-j", "2"), 1)
        run_psql(db, env, target, ("-At", "-c", "SELECT * FROM wide"))
    results = Results()
    for rep in range(1, reps + 1):
        for row in rows:
            shown: list[str] = []
            for target in targets:  # direct, pgbouncer, pgveil: paired within a repetition
                if target.service is not None:
                    ensure_alive(target.service)
                if row.kind == "psql":
                    secs = run_psql(db, env, target, row.args)
                    results.add(results.values, row.name, target.name, secs)
                    shown.append(f"{target.name} {secs:.3f}s")
                    continue
                measure = row.measure_cpu and target.service is not None
                cpu0 = cpu_seconds(target.service.pid) if measure and target.service else 0.0
                tps, tx = run_pgbench(db, env, target, row.args, duration)
                if measure and target.service is not None:
                    us = (cpu_seconds(target.service.pid) - cpu0) / tx * 1e6
                    results.add(results.cpu_us, row.name, target.name, us)
                results.add(results.values, row.name, target.name, tps)
                shown.append(f"{target.name} {tps:.0f} tps")
            print(f"[rep {rep}/{reps}] {row.name}: {', '.join(shown)}", file=sys.stderr)
    return results


# ---------------------------------------------------------------------------------------------
# report


def paired_ratio(num: list[float], den: list[float]) -> str:
    ratios = [n / d for n, d in zip(num, den, strict=True)]
    med = statistics.median(ratios)
    if len(ratios) == 1:
        return f"{med:.2f}"
    return f"{med:.2f} ({min(ratios):.2f}-{max(ratios):.2f})"


def table(results: Results, rows: list[Workload], fmt: str, ratio_note: str) -> list[str]:
    lines = [
        f"| workload | direct | pgbouncer | pgveil | pgbouncer/direct {ratio_note} "
        f"| pgveil/direct {ratio_note} | pgveil/pgbouncer {ratio_note} |",
        "|---|--:|--:|--:|--:|--:|--:|",
    ]
    for row in rows:
        v = results.values[row.name]
        a, b, c = v["direct"], v["pgbouncer"], v["pgveil"]
        med = [format(statistics.median(x), fmt) for x in (a, b, c)]
        lines.append(
            f"| `{row.name}` | {' | '.join(med)} | {paired_ratio(b, a)} | {paired_ratio(c, a)} "
            f"| {paired_ratio(c, b)} |"
        )
    return lines


def command_output(argv: list[str]) -> str:
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        done = subprocess.run(argv, capture_output=True, text=True, timeout=10)
        if done.returncode == 0:
            return done.stdout.strip().splitlines()[0]
    return "unknown"


def report(
    results: Results, db: EmbeddedPostgres, reps: int, duration: int, pgbouncer_bin: str
) -> str:
    rows = workloads()
    commit = command_output(["git", "-C", str(REPO), "describe", "--always", "--dirty"])
    pg_version = db.psql("SHOW server_version").strip()
    lines = [
        "# pgveil benchmark",
        "",
        f"- {time.strftime('%Y-%m-%d %H:%M:%S %Z')}, {os.cpu_count()} CPUs, all on loopback",
        f"- pgveil `{commit}` (relay, no rules); PostgreSQL {pg_version}; "
        f"{command_output([pgbouncer_bin, '--version'])} (session pooling)",
        f"- {reps} repetitions, variants interleaved direct -> pgbouncer -> pgveil; "
        f"pgbench runs of {duration} s",
        "- values: median over repetitions; ratios: median over repetitions of the ratio "
        "measured within the same repetition (min-max in parentheses)",
        "",
        "## pgbench -S -n (select-only, scale 10): tps, higher is better",
        "",
        "Ratio = variant tps / direct tps: 1.00 means no overhead, below 1.00 means slower.",
        "",
        *table(results, [r for r in rows if r.kind == "pgbench"], ".0f", "(tps, higher better)"),
        "",
        f"## Wide result ({WIDE_ROWS:,} rows x 6 text columns) via psql: seconds, lower is better",
        "",
        "Ratio = variant time / direct time: 1.00 means no overhead, above 1.00 means slower.",
        "",
        *table(results, [r for r in rows if r.kind == "psql"], ".3f", "(time, lower better)"),
        "",
        "## Proxy CPU per query (utime+stime of the proxy process / transactions; median)",
        "",
    ]
    for row in rows:
        cpu = results.cpu_us.get(row.name)
        if not cpu:
            continue
        bouncer, veil = statistics.median(cpu["pgbouncer"]), statistics.median(cpu["pgveil"])
        factor = f"{veil / bouncer:.1f}x pgbouncer" if bouncer > 0 else "pgbouncer ~0"
        lines.append(
            f"- `pgbench -S {row.name}`: pgbouncer {bouncer:.1f} us/query, "
            f"pgveil {veil:.1f} us/query ({factor})"
        )
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------
# main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--reps", type=int, default=5, help="repetitions per workload (default 5)")
    p.add_argument("--duration", type=int, default=5, help="seconds per pgbench run (default 5)")
    ns = p.parse_args(argv)
    if ns.reps < 1 or ns.duration < 1:
        p.error("--reps and --duration must be at least 1")
    return ns


def _sigterm(signum: int, frame: object) -> NoReturn:
    raise SystemExit(128 + signum)


@contextlib.contextmanager
def quiet_interrupts() -> Iterator[None]:
    """Let cleanup finish even if Ctrl-C is pressed again."""
    old = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, old)


def main(argv: list[str] | None = None) -> int:
    ns = parse_args(argv)
    signal.signal(signal.SIGTERM, _sigterm)
    services: list[Service] = []
    stack = contextlib.ExitStack()  # cleanups, run in reverse order of registration
    try:
        workdir = Path(tempfile.mkdtemp(prefix="pgveil-bench-"))
        stack.callback(shutil.rmtree, workdir, ignore_errors=True)
        pgbouncer_bin = pgbouncer_binary()

        print("starting PostgreSQL ...", file=sys.stderr)
        db = EmbeddedPostgres(settings={"max_connections": "100"})
        stack.callback(db.cleanup)  # registered first so a half-started cluster goes too
        db.start()
        env = {
            **os.environ,
            "PGPASSWORD": db.password,
            "PGSSLMODE": "disable",
            "PGGSSENCMODE": "disable",
        }

        bouncer, bouncer_port = start_pgbouncer(db, workdir, pgbouncer_bin)
        services.append(bouncer)
        stack.callback(bouncer.stop)
        veil, veil_port = start_pgveil(db, workdir)
        services.append(veil)
        stack.callback(veil.stop)
        bouncer.wait_port(bouncer_port)
        veil.wait_port(veil_port)

        load_data(db, env)
        targets = [
            Target("direct", db.port),
            Target("pgbouncer", bouncer_port, bouncer),
            Target("pgveil", veil_port, veil),
        ]
        results = run_all(db, env, targets, ns.reps, ns.duration)
        text = report(results, db, ns.reps, ns.duration, pgbouncer_bin)
        OUT_DIR.mkdir(parents=True, exist_ok=True)
        (OUT_DIR / "results.md").write_text(text)
        (OUT_DIR / "raw.json").write_text(
            json.dumps(
                {"tps_or_seconds": results.values, "cpu_us_per_query": results.cpu_us}, indent=2
            )
            + "\n"
        )
        print(text, end="")
        print(f"(written to {OUT_DIR / 'results.md'} and raw.json)", file=sys.stderr)
        return 0
    except BenchError as exc:
        print(f"bench: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("bench: interrupted; cleaning up", file=sys.stderr)
        return 130
    except SystemExit:
        print("bench: terminated; cleaning up", file=sys.stderr)
        raise
    except Exception:  # unexpected: show what the helpers said
        for s in services:
            print(f"--- {s.name} log tail ---\n{s.log_tail()}", file=sys.stderr)
        raise
    finally:
        with quiet_interrupts():
            stack.close()


if __name__ == "__main__":
    sys.exit(main())
