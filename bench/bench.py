"""Throughput and latency overhead of pgveil: as a relay, and what masking costs on top.

Three parts, all by default; `--only relay|masked|audit` runs one of them.

**relay**: starts a throwaway PostgreSQL (`proxy.demo.embedded_pg.EmbeddedPostgres`), a pgbouncer
in session mode and pgveil (relay only, no rules) in front of it, all on loopback, then runs
the same client workloads against the three *variants*:

- `pgbench -S -n` (select-only) with `-M simple|extended|prepared`, at `-c 1` and `-c 8 -j 2`;
- a wide result through psql: `SELECT * FROM wide` (unaligned) and `COPY wide TO STDOUT`,
  where `wide` is 200,000 rows of 6 text columns of 20-30 characters.

Variants run interleaved (direct, pgbouncer, pgveil, direct, ...) so each repetition yields a
*paired* sample taken under the same machine noise; the report shows the median value per
variant and the median over repetitions of the per-repetition ratio to direct. For the
`-c 8` rows it also samples the CPU time (utime+stime) of the pgveil and pgbouncer processes
around each run and reports microseconds of proxy CPU per query.

**masked**: loads the billing fixture (`proxy.demo.fixture` at its `BENCH` scale: 200,000
customers, 400,000 accounts, 1,000,000 xDRs), starts a second pgveil *with masking rules*
and runs, through that one process, the same workloads as a masked role and as an unmasked
role, interleaved per repetition:

- a pgbench custom script of helpdesk statements (customer with its accounts by key, last 50
  xDRs of an account, search by customer class and balance range) with `-M simple|extended`,
  at `-c 1` and `-c 8 -j 2`: tps, and the paired ratio masked/unmasked (target >= 0.8);
- `SELECT name, email, phone FROM billing.customers` (200,000 rows) through psql: seconds,
  and the paired ratio masked/unmasked (target <= 1.5).

**audit**: the masked part's data and workloads, and `pgbench -S` at 8 clients in the three
query modes, through two pgveil processes with the same rules, one writing the audit file
and one not, for both roles: the paired ratio audit on/off (target: at least 0.8 for tps, at
most 1/0.8 for time). Beside it, the same workloads directly on a second PostgreSQL with
pgAudit (`pgaudit.log = 'read, write'` for one login role, `'none'` for another), all
variants interleaved: pgAudit's on/off ratio; its server log must hold an AUDIT line for
every statement the audited role ran, or nothing is reported.

Everything (processes, cluster, temporary directories) is removed on exit, including on
Ctrl-C and SIGTERM. Run it through `bench/run`; see `bench/README.md`.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
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

from audit.files import rotated_files
from proxy.demo import fixture
from proxy.demo.embedded_pg import (
    EmbeddedPostgres,
    EmbeddedPostgresError,
    find_bindir,
    free_port,
)

REPO = Path(__file__).resolve().parent.parent
OUT_DIR = REPO / "bench" / "out"
HOST = "127.0.0.1"
DBNAME = "postgres"
WIDE_ROWS = 200_000
CLK_TCK = os.sysconf("SC_CLK_TCK")
VARIANTS = ("direct", "pgbouncer", "pgveil")
PARTS = ("relay", "masked", "audit")


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
    script: tuple[str, ...] = ()  # pgbench script options of this row; (): run_all's
    statements: int = 1  # statements per transaction (per psql run: 1)


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


def _stat_fields(pid: int) -> list[str]:
    stat = Path(f"/proc/{pid}/stat").read_text()
    return stat[stat.rindex(")") + 2 :].split()  # fields[0] is field 3 (state)


def cpu_times(pid: int) -> tuple[float, float]:
    """(utime, stime) of a whole process (all threads), from /proc/PID/stat."""
    fields = _stat_fields(pid)
    return int(fields[11]) / CLK_TCK, int(fields[12]) / CLK_TCK  # fields 14, 15


def minor_faults(pid: int) -> int:
    """Minor page faults of a process so far (field 10 of /proc/PID/stat)."""
    return int(_stat_fields(pid)[7])


def cpu_seconds(pid: int) -> float:
    """utime + stime of a whole process (all threads)."""
    return sum(cpu_times(pid))


ZOMBIE = "<exited, not reaped>"  # the title _server_children gives an unreaped child


def _server_children(postmaster: int) -> dict[int, str]:
    """The postmaster's children now: pid -> process title ("postgres: USER DB ..."), or
    ZOMBIE for one that exited and is not reaped yet (its title is gone, and its CPU is in
    neither the postmaster's cutime nor, once read as exited, anywhere)."""
    children: dict[int, str] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError, ValueError, IndexError):
            fields = _stat_fields(int(entry.name))
            if int(fields[1]) == postmaster:
                title = (entry / "cmdline").read_bytes().replace(b"\0", b" ")
                zombie = fields[0] == "Z"
                children[int(entry.name)] = ZOMBIE if zombie else title.decode(errors="replace")
    return children


def server_cpu_times(db: EmbeddedPostgres, user: str | None = None) -> tuple[float, float]:
    """(user, system) CPU seconds of a whole PostgreSQL server so far: the postmaster, the
    children it has reaped (cutime, cstime: every backend that ended) and the children alive
    now (background processes, the logging collector). A difference of two readings is what
    the server spent in between. `user`: first wait (up to 10 s) until no backend of that
    login is left and every exited child is reaped: a backend that exits while it is read
    would be counted neither alive nor reaped (read after the postmaster) or both (read
    before), and one exited but not reaped yet is in neither (measured: 0 µs per statement
    in some repetitions of the pgAudit rows before this wait covered zombies)."""
    postmaster = int((db.datadir / "postmaster.pid").read_text().split("\n", 1)[0])
    if user is not None:
        deadline = time.monotonic() + 10
        prefix = f"postgres: {user} "
        while time.monotonic() < deadline and any(
            title.startswith(prefix) or title is ZOMBIE
            for title in _server_children(postmaster).values()
        ):
            time.sleep(0.01)  # polls for the backends' exit (a condition, not a fixed wait)
    fields = _stat_fields(postmaster)
    cpu_user = (int(fields[11]) + int(fields[13])) / CLK_TCK  # utime + cutime (14, 16)
    cpu_system = (int(fields[12]) + int(fields[14])) / CLK_TCK  # stime + cstime (15, 17)
    for pid in _server_children(postmaster):
        with contextlib.suppress(OSError, ValueError, IndexError):
            child = _stat_fields(pid)
            cpu_user += int(child[11]) / CLK_TCK
            cpu_system += int(child[12]) / CLK_TCK
    return cpu_user, cpu_system


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
    env: dict[str, str] | None = None  # None: inherit ours
    proc: subprocess.Popen[bytes] | None = None
    pid: int = 0  # the process whose CPU time is sampled

    def start(self) -> None:
        with open(self.log_path, "wb") as log:  # the child keeps its own descriptor
            self.proc = subprocess.Popen(
                self.argv,
                cwd=self.cwd,
                env=self.env,
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
    try:
        return db.client(name)
    except EmbeddedPostgresError as exc:
        raise BenchError(str(exc)) from exc


def apt_get_install(package: str, what: str) -> None:
    """Install a Debian package when running as root; else fail with the command to run."""
    command = f"apt-get install -y {package}"
    if os.geteuid() != 0:
        raise BenchError(f"{what} is not installed; run `{command}` as root")
    print(f"{what} not found; running {command}", file=sys.stderr)
    done = subprocess.run(
        command.split(),
        capture_output=True,
        text=True,
        env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"},
    )
    if done.returncode:
        raise BenchError(
            f"{what} is not installed and `{command}` failed "
            f"(status {done.returncode}): {done.stderr.strip()[-1000:]}"
        )


def _pgbouncer_found() -> str | None:
    return shutil.which("pgbouncer") or (
        "/usr/sbin/pgbouncer" if Path("/usr/sbin/pgbouncer").is_file() else None
    )


def pgbouncer_binary() -> str:
    found = _pgbouncer_found()
    if found:
        return found
    apt_get_install("pgbouncer", "pgbouncer")
    found = _pgbouncer_found()
    if not found:
        raise BenchError(
            "`apt-get install -y pgbouncer` succeeded but no pgbouncer binary appeared"
        )
    return found


def pgaudit_package(pg_config_version: str) -> str:
    """The Debian package of pgAudit for a server whose `pg_config --version` says this
    (`PostgreSQL 15.18 (Debian ...)` -> `postgresql-15-pgaudit`)."""
    found = re.match(r"PostgreSQL (\d+)", pg_config_version)
    if not found:
        raise BenchError(f"cannot read the PostgreSQL major version from {pg_config_version!r}")
    return f"postgresql-{found.group(1)}-pgaudit"


def pgaudit_library() -> Path:
    """pgaudit.so in the server's `pg_config --pkglibdir` (the PostgreSQL the bench starts),
    installed with apt-get as for pgbouncer when missing."""
    try:
        bindir = find_bindir()
    except EmbeddedPostgresError as exc:
        raise BenchError(str(exc)) from exc
    pg_config = bindir / "pg_config"
    if not pg_config.is_file():
        raise BenchError(f"no pg_config beside the server binaries in {bindir}")
    out = subprocess.run(
        [str(pg_config), "--pkglibdir", "--version"], capture_output=True, text=True, timeout=10
    )
    lines = out.stdout.strip().splitlines()
    if out.returncode or len(lines) != 2:
        raise BenchError(f"{pg_config} --pkglibdir --version failed: {out.stderr.strip()}")
    library = Path(lines[0]) / "pgaudit.so"
    if not library.is_file():
        package = pgaudit_package(lines[1])
        apt_get_install(package, f"pgAudit ({library})")
        if not library.is_file():
            raise BenchError(f"`apt-get install -y {package}` succeeded but {library} is missing")
    return library


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


def start_pgveil(
    db: EmbeddedPostgres,
    workdir: Path,
    rules: Path | None = None,
    extra: tuple[str, ...] = (),
    label: str = "masked",
    repo: Path = REPO,
    python: str = sys.executable,
) -> tuple[Service, int]:
    """pgveil in front of `db`: a plain relay, or with masking `rules` (reading the catalog
    as the superuser, whose password goes in the environment, not on the command line).
    `repo`: the checkout whose code runs (another one: a baseline, see --baseline), by the
    interpreter `python` (bench/syscalls.py: the checkout's own venv)."""
    port = free_port(HOST)
    argv = [
        python, "-m", "proxy.cli", "proxy",
        "--listen", f"{HOST}:{port}",
        "--upstream", f"{HOST}:{db.port}",
        "--upstream-sslmode", "disable",
        "--log-level", "warning",
    ]  # fmt: skip
    if rules is None:
        service = Service("pgveil", argv, workdir / "pgveil.log", cwd=repo)
    else:
        argv += ["--rules", str(rules), "--catalog-user", db.superuser, *extra]
        env = {**os.environ, "PGVEIL_CATALOG_PASSWORD": db.password}
        log = workdir / f"pgveil-{label}.log"
        service = Service(f"pgveil ({label})", argv, log, cwd=repo, env=env)
    service.start()
    return service, port


def pgbench_init(db: EmbeddedPostgres, env: dict[str, str]) -> None:
    """pgbench's tables at scale 10 (what `pgbench -S` reads), as the superuser of `db`."""
    print("pgbench -i -s 10 ...", file=sys.stderr)
    init = subprocess.run(
        [tool(db, "pgbench"), "-i", "-s", "10", "-q",
         "-h", HOST, "-p", str(db.port), "-U", db.superuser, DBNAME],
        capture_output=True, text=True, env={**env, "PGPASSWORD": db.password}, timeout=600,
    )  # fmt: skip
    if init.returncode:
        raise BenchError(f"pgbench -i failed: {init.stderr.strip()[-2000:]}")


def load_data(db: EmbeddedPostgres, env: dict[str, str]) -> None:
    pgbench_init(db, env)
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
    user: str | None = None  # login; None: the superuser
    password: str | None = None  # its password; None: the superuser's (PGPASSWORD in env)
    server: EmbeddedPostgres | None = None  # the server whose CPU to measure, if any

    def login(self, db: EmbeddedPostgres, env: dict[str, str]) -> tuple[str, dict[str, str]]:
        """(user, environment) for a client of this target."""
        if self.user is None:
            return db.superuser, env
        return self.user, {**env, "PGPASSWORD": self.password or ""}


TPS_RE = re.compile(r"^tps = ([0-9.]+) \(without initial connection time\)", re.M)
TX_RE = re.compile(r"^number of transactions actually processed: (\d+)", re.M)
FAILED_RE = re.compile(r"^number of failed transactions: (\d+)", re.M)


def run_pgbench(
    db: EmbeddedPostgres,
    env: dict[str, str],
    target: Target,
    args: tuple[str, ...],
    duration: int,
    script: tuple[str, ...] = ("-S",),
) -> tuple[float, int]:
    """(tps without initial connection time, transactions processed). `script`: the
    built-in select-only script, or `("-f", path)` for a custom one."""
    user, env = target.login(db, env)
    argv = [
        tool(db, "pgbench"),
        "-h",
        HOST,
        "-p",
        str(target.port),
        "-U",
        user,
        "-n",
        *script,
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
    user, env = target.login(db, env)
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
        user,
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
    # the same split (the proxy's user and system time), and the server's, per transaction
    proxy_user_us: dict[str, dict[str, list[float]]] = field(default_factory=dict)
    proxy_sys_us: dict[str, dict[str, list[float]]] = field(default_factory=dict)
    server_user_us: dict[str, dict[str, list[float]]] = field(default_factory=dict)
    server_sys_us: dict[str, dict[str, list[float]]] = field(default_factory=dict)
    # statements each variant ran in the measured runs (transactions x statements; a psql
    # run: 1): what an in-server audit must have logged at least
    statements: dict[str, int] = field(default_factory=dict)  # variant -> count

    def add(self, table: dict[str, dict[str, list[float]]], row: str, var: str, v: float) -> None:
        table.setdefault(row, {}).setdefault(var, []).append(v)


def run_all(
    db: EmbeddedPostgres,
    env: dict[str, str],
    targets: list[Target],
    reps: int,
    duration: int,
    rows: list[Workload] | None = None,
    script: tuple[str, ...] = ("-S",),
) -> Results:
    """Every row against every target, targets interleaved within each repetition: in the
    order given in odd repetitions and reversed in even ones, so that no target always runs
    right after the same neighbour (whose after-effects, a backlog of audit writes or dirty
    pages, would fall on it alone). `rows` defaults to the relay part's workloads; `script`
    is the pgbench script (see `run_pgbench`) of the rows that name none. The warm-up runs
    each pgbench script and the first psql row (if any) once per target."""
    rows = workloads() if rows is None else rows
    warm_psql = next((row.args for row in rows if row.kind == "psql"), None)
    scripts = list(dict.fromkeys(row.script or script for row in rows if row.kind == "pgbench"))
    print("warm-up ...", file=sys.stderr)
    for target in targets:
        for warm_script in scripts:
            run_pgbench(db, env, target, ("-M", "simple", "-c", "8", "-j", "2"), 1, warm_script)
        if warm_psql is not None:
            run_psql(db, env, target, warm_psql)
    results = Results()
    for rep in range(1, reps + 1):
        order = targets if rep % 2 else targets[::-1]
        for row in rows:
            shown: list[str] = []
            for target in order:  # all variants of a row back to back: paired
                if target.service is not None:
                    ensure_alive(target.service)
                ran = results.statements.get(target.name, 0)
                if row.kind == "psql":
                    secs = run_psql(db, env, target, row.args)
                    results.add(results.values, row.name, target.name, secs)
                    results.statements[target.name] = ran + 1
                    shown.append(f"{target.name} {secs:.3f}s")
                    continue
                proxy = target.service if row.measure_cpu else None
                server = target.server if row.measure_cpu else None
                login = target.login(db, env)[0]
                proxy0 = cpu_times(proxy.pid) if proxy is not None else (0.0, 0.0)
                server0 = server_cpu_times(server, login) if server is not None else (0.0, 0.0)
                tps, tx = run_pgbench(db, env, target, row.args, duration, row.script or script)
                results.statements[target.name] = ran + tx * row.statements
                if proxy is not None:
                    user, system = (
                        b - a for a, b in zip(proxy0, cpu_times(proxy.pid), strict=True)
                    )
                    results.add(results.cpu_us, row.name, target.name, (user + system) / tx * 1e6)
                    results.add(results.proxy_user_us, row.name, target.name, user / tx * 1e6)
                    results.add(results.proxy_sys_us, row.name, target.name, system / tx * 1e6)
                if server is not None:
                    server1 = server_cpu_times(server, login)
                    user, system = (b - a for a, b in zip(server0, server1, strict=True))
                    results.add(results.server_user_us, row.name, target.name, user / tx * 1e6)
                    results.add(results.server_sys_us, row.name, target.name, system / tx * 1e6)
                results.add(results.values, row.name, target.name, tps)
                shown.append(f"{target.name} {tps:.0f} tps")
            print(f"[rep {rep}/{reps}] {row.name}: {', '.join(shown)}", file=sys.stderr)
    return results


# ---------------------------------------------------------------------------------------------
# report


def cpu_split_table(results: Results, rows: list[Workload]) -> list[str]:
    """Where the CPU of a transaction goes, per variant: the proxy's user and system time
    and the server's (all its processes), microseconds per statement (medians). Empty when
    no row measured a server."""
    measured = [row for row in rows if results.server_user_us.get(row.name)]
    if not measured:
        return []
    lines = [
        "CPU per statement, user and system (µs, median over repetitions; the proxy: the "
        "pgveil process, none for pgAudit; the server: the postmaster and all its "
        "processes, backends and logging collector included):",
        "",
        "| workload | variant | proxy user | proxy system | server user | server system | total |",
        "|---|---|--:|--:|--:|--:|--:|",
    ]

    def per_statement(table: dict[str, dict[str, list[float]]], row: Workload, var: str) -> float:
        values = table.get(row.name, {}).get(var)
        return statistics.median(values) / row.statements if values else 0.0

    for row in measured:
        for var in results.server_user_us[row.name]:
            parts = [
                per_statement(t, row, var)
                for t in (results.proxy_user_us, results.proxy_sys_us,
                          results.server_user_us, results.server_sys_us)
            ]  # fmt: skip
            cells = " | ".join(f"{v:.0f}" for v in parts)
            lines.append(f"| `{row.name}` | {var} | {cells} | {sum(parts):.0f} |")
    return ["", *lines]


def cpu_raw(results: Results) -> dict[str, object]:
    """The CPU split for raw.json (microseconds per transaction, every repetition)."""
    return {
        "proxy_user_us_per_transaction": results.proxy_user_us,
        "proxy_system_us_per_transaction": results.proxy_sys_us,
        "server_user_us_per_transaction": results.server_user_us,
        "server_system_us_per_transaction": results.server_sys_us,
    }


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


def pgveil_build() -> str:
    """Which pgveil ran: the commit, and the data path's implementation as the proxy
    processes load it (they run with this interpreter and environment), with the Python."""
    commit = command_output(["git", "-C", str(REPO), "describe", "--always", "--dirty"])
    implementation = command_output(
        [sys.executable, "-c",
         "import proxy; from shared.implementation import implementation; print(implementation())"]
    )  # fmt: skip
    return f"`{commit}` (data path: {implementation}, Python {platform.python_version()})"


def report(
    results: Results, db: EmbeddedPostgres, reps: int, duration: int, pgbouncer_bin: str
) -> str:
    rows = workloads()
    pg_version = db.psql("SHOW server_version").strip()
    lines = [
        "# pgveil benchmark",
        "",
        f"- {time.strftime('%Y-%m-%d %H:%M:%S %Z')}, {os.cpu_count()} CPUs, all on loopback",
        f"- pgveil {pgveil_build()} (relay, no rules); PostgreSQL {pg_version}; "
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
        "## Proxy CPU per query (the proxy process's user and system time / transactions; median)",
        "",
        "| workload | pgbouncer user | pgbouncer system | pgveil user | pgveil system "
        "| pgveil/pgbouncer (total) |",
        "|---|--:|--:|--:|--:|--:|",
    ]
    for row in rows:
        cpu = results.cpu_us.get(row.name)
        if not cpu:
            continue
        bouncer, veil = statistics.median(cpu["pgbouncer"]), statistics.median(cpu["pgveil"])
        factor = f"{veil / bouncer:.2f}" if bouncer > 0 else "pgbouncer ~0"
        split = [
            statistics.median(table[row.name][var])
            for var in ("pgbouncer", "pgveil")
            for table in (results.proxy_user_us, results.proxy_sys_us)
        ]
        cells = " | ".join(f"{v:.1f}" for v in split)
        lines.append(f"| `pgbench -S {row.name}` | {cells} | {factor} |")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------
# masked part: what masking costs, masked role vs unmasked role through one pgveil with rules

MASKED_ROLE, MASKED_PW = "bench_helpdesk", "bench-helpdesk-pw-1"
UNMASKED_ROLE, UNMASKED_PW = "bench_admin", "bench-admin-pw-1"
MASKED_VARIANTS = ("unmasked", "masked")  # run in this order within each repetition
SCALE = fixture.BENCH  # the billing fixture's population at the benchmark's scale
CUSTOMERS = SCALE.customers  # two accounts each: 10c+1 and 10c+2
XDRS = SCALE.xdrs
XDR_CUSTOMERS = SCALE.xdr_customers or CUSTOMERS  # their accounts hold the xDRs: 100 each,
# so LIMIT 50 cuts
CLASSES = 3  # the population's customer classes
TPS_TARGET = 0.8  # masked/unmasked tps, at least
TIME_TARGET = 1.5  # masked/unmasked seconds, at most
PERSONAL_SELECT = "SELECT name, email, phone FROM billing.customers"
STATEMENTS_PER_TX = 3

# The benchmark's roles and indexes on the billing fixture (its schema and data are the
# fixture's: proxy/demo/data/fixture/).
BENCH_SETUP = f"""
CREATE INDEX customers_class_balance ON billing.customers (i_customer_class, balance);
CREATE INDEX accounts_customer ON billing.accounts (i_customer);
CREATE INDEX xdrs_account_time ON billing.xdrs (i_account, connect_time);
CREATE ROLE {MASKED_ROLE} LOGIN PASSWORD '{MASKED_PW}';
CREATE ROLE {UNMASKED_ROLE} LOGIN PASSWORD '{UNMASKED_PW}';
GRANT USAGE ON SCHEMA billing TO {MASKED_ROLE}, {UNMASKED_ROLE};
GRANT SELECT ON ALL TABLES IN SCHEMA billing TO {MASKED_ROLE}, {UNMASKED_ROLE};
"""

MASKING_RULES = f"""\
roles:
  unmasked: [{UNMASKED_ROLE}]
  masked: [{MASKED_ROLE}]
  default: masked
tables:
  billing.customers:
    subject: i_customer
    columns:
      name: partial
      email: email
      phone: {{mask: partial, keep_first: 1, keep_last: 2}}
  billing.accounts:
    subject: i_account
    columns:
      ip: partial
  billing.xdrs:
    columns:
      cli: {{mask: partial, keep_first: 1, keep_last: 2}}
      cld: {{mask: partial, keep_first: 1, keep_last: 2}}
"""

# What a helpdesk agent's screen asks for: a customer by key with its accounts, the last 50
# xDRs of an account, a search by non-personal columns (class and balance range). Personal
# columns are in every result, so every statement is rewritten for the masked role.
HELPDESK_SCRIPT = f"""\
\\set cid random(1, {CUSTOMERS})
\\set aid 10 * random(1, {XDR_CUSTOMERS}) + random(1, 2)
\\set cls random(1, {CLASSES})
\\set lo random(0, 997)
SELECT c.i_customer, c.name, c.email, c.phone, c.balance, a.i_account, a.id, a.ip FROM billing.customers c JOIN billing.accounts a ON a.i_customer = c.i_customer WHERE c.i_customer = :cid;
SELECT x.i_xdr, x.cli, x.cld, x.charged, x.connect_time FROM billing.xdrs x WHERE x.i_account = :aid ORDER BY x.connect_time DESC LIMIT 50;
SELECT i_customer, name, email, balance FROM billing.customers WHERE i_customer_class = :cls AND balance BETWEEN :lo AND :lo + 2 ORDER BY balance LIMIT 20;
"""  # noqa: E501


def masked_workloads() -> list[Workload]:
    rows: list[Workload] = []
    n = STATEMENTS_PER_TX
    for mode in ("simple", "extended"):
        rows.append(
            Workload(f"-M {mode} -c 1", "pgbench", ("-M", mode, "-c", "1", "-j", "1"), statements=n)
        )
        rows.append(
            Workload(
                f"-M {mode} -c 8 -j 2",
                "pgbench",
                ("-M", mode, "-c", "8", "-j", "2"),
                measure_cpu=True,
                statements=n,
            )
        )
    rows.append(Workload(f"psql {PERSONAL_SELECT}", "psql", ("-At", "-c", PERSONAL_SELECT)))
    return rows


def load_billing(db: EmbeddedPostgres) -> None:
    print(
        f"seeding billing ({CUSTOMERS:,} customers, {2 * CUSTOMERS:,} accounts, {XDRS:,} xDRs) ...",
        file=sys.stderr,
    )
    start = time.perf_counter()
    try:
        fixture.load(db, SCALE, ("population",))
        db.psql(BENCH_SETUP)
        db.psql("VACUUM (ANALYZE) billing.customer_classes, billing.customers, billing.accounts")
        db.psql("VACUUM (ANALYZE) billing.xdrs")
        db.psql("CHECKPOINT")
    except EmbeddedPostgresError as exc:
        raise BenchError(f"seeding the billing schema failed: {exc}") from exc
    print(f"seeded in {time.perf_counter() - start:.1f} s", file=sys.stderr)


def psql_output(db: EmbeddedPostgres, env: dict[str, str], target: Target, sql: str) -> str:
    user, env = target.login(db, env)
    argv = [tool(db, "psql"), "-X", "-At", "-v", "ON_ERROR_STOP=1",
            "-h", HOST, "-p", str(target.port), "-U", user, "-d", DBNAME, "-c", sql]  # fmt: skip
    done = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=60)
    if done.returncode:
        raise BenchError(f"psql as {user} via {target.name} failed: {done.stderr.strip()}")
    return done.stdout.strip()


def check_masking(db: EmbeddedPostgres, env: dict[str, str], targets: list[Target]) -> None:
    """Refuse to benchmark a setup that does not mask: the masked role must see other
    values than the unmasked role, in every personal column the script reads."""
    probes = [
        "SELECT name, email, phone FROM billing.customers WHERE i_customer = 1",
        "SELECT ip FROM billing.accounts WHERE i_account = 11",
        "SELECT cli, cld FROM billing.xdrs WHERE i_xdr = 1",
    ]
    by_name = {t.name: t for t in targets}
    for sql in probes:
        plain = psql_output(db, env, by_name["unmasked"], sql)
        masked = psql_output(db, env, by_name["masked"], sql)
        if not plain or not masked:
            raise BenchError(f"no rows for the masking check: {sql}")
        same = [
            f"{a!r}" for a, b in zip(plain.split("|"), masked.split("|"), strict=True) if a == b
        ]
        if same:
            raise BenchError(f"the masked role sees unmasked values ({', '.join(same)}) for: {sql}")
    print(f"masking check: e.g. {plain!r} -> {masked!r}", file=sys.stderr)


def verdict(ratios: list[float], target: float, higher_is_better: bool) -> str:
    med = statistics.median(ratios)
    ok = med >= target if higher_is_better else med <= target
    return "yes" if ok else "**no**"


def masked_table(
    results: Results, rows: list[Workload], fmt: str, note: str, target: float, higher: bool
) -> list[str]:
    sign = ">=" if higher else "<="
    lines = [
        f"| workload | unmasked | masked | masked/unmasked {note} | target | met |",
        "|---|--:|--:|--:|--:|:-:|",
    ]
    for row in rows:
        v = results.values[row.name]
        plain, masked = v["unmasked"], v["masked"]
        ratios = [a / b for a, b in zip(masked, plain, strict=True)]
        medians = f"{statistics.median(plain):{fmt}} | {statistics.median(masked):{fmt}}"
        lines.append(
            f"| `{row.name}` | {medians} "
            f"| {paired_ratio(masked, plain)} | {sign} {target:.1f} "
            f"| {verdict(ratios, target, higher)} |"
        )
    return lines


def report_masked(results: Results, db: EmbeddedPostgres, reps: int, duration: int) -> str:
    rows = masked_workloads()
    pg_version = db.psql("SHOW server_version").strip()
    script_sql = [ln for ln in HELPDESK_SCRIPT.splitlines() if not ln.startswith("\\")]
    lines = [
        "# pgveil benchmark: masking cost",
        "",
        f"- {time.strftime('%Y-%m-%d %H:%M:%S %Z')}, {os.cpu_count()} CPUs, all on loopback",
        f"- pgveil {pgveil_build()} with masking rules; PostgreSQL {pg_version}",
        f"- the same pgveil process for both roles: `{MASKED_ROLE}` (masked) and "
        f"`{UNMASKED_ROLE}` (unmasked, relayed as is)",
        f"- data: the billing fixture, {CUSTOMERS:,} customers, {2 * CUSTOMERS:,} accounts, "
        f"{XDRS:,} xDRs ({XDRS // (2 * XDR_CUSTOMERS)} per account for the accounts of "
        f"customers 1-{XDR_CUSTOMERS:,})",
        f"- {reps} repetitions, unmasked -> masked interleaved; pgbench runs of {duration} s",
        "- values: median over repetitions; ratios: median over repetitions of the ratio "
        "measured within the same repetition (min-max in parentheses)",
        "",
        f"## Helpdesk script (pgbench -n -f, {STATEMENTS_PER_TX} statements per transaction): "
        "tps, higher is better",
        "",
        "Ratio = masked tps / unmasked tps: 1.00 means masking costs nothing.",
        "",
        *masked_table(
            results,
            [r for r in rows if r.kind == "pgbench"],
            ".0f",
            "(tps, higher better)",
            TPS_TARGET,
            higher=True,
        ),
        "",
        "The script (`:cid` random customer, `:aid` random account with xDRs, `:cls` random "
        "class, `:lo` random balance 0-997):",
        "",
        "```sql",
        *script_sql,
        "```",
        "",
        f"## Personal columns, {CUSTOMERS:,} rows via psql: seconds, lower is better",
        "",
        f'`psql -X -At -c "{PERSONAL_SELECT}" > /dev/null`, wall seconds. '
        "Ratio = masked time / unmasked time: 1.00 means masking costs nothing.",
        "",
        *masked_table(
            results,
            [r for r in rows if r.kind == "psql"],
            ".3f",
            "(time, lower better)",
            TIME_TARGET,
            higher=False,
        ),
        "",
        "## pgveil CPU per transaction (utime+stime of the pgveil process / transactions; median)",
        "",
    ]
    for row in rows:
        cpu = results.cpu_us.get(row.name)
        if not cpu:
            continue
        plain, masked = statistics.median(cpu["unmasked"]), statistics.median(cpu["masked"])
        extra = (masked - plain) / STATEMENTS_PER_TX
        lines.append(
            f"- `{row.name}`: unmasked {plain:.0f} us/transaction, masked {masked:.0f} "
            f"us/transaction ({masked / plain:.1f}x; masking adds ~{extra:.0f} us of pgveil "
            "CPU per statement)"
        )
    lines += cpu_split_table(results, rows)
    return "\n".join(lines) + "\n"


def write_helpdesk_files(workdir: Path) -> tuple[Path, Path]:
    """The masking rules and the pgbench helpdesk script, in `workdir`."""
    rules = workdir / "rules.yaml"
    rules.write_text(MASKING_RULES)
    script = workdir / "helpdesk.sql"
    script.write_text(HELPDESK_SCRIPT)
    return rules, script


def run_masked_part(
    db: EmbeddedPostgres,
    env: dict[str, str],
    workdir: Path,
    stack: contextlib.ExitStack,
    services: list[Service],
    reps: int,
    duration: int,
) -> tuple[str, dict[str, object]]:
    """Seed, start pgveil with rules, check it masks, measure: (report, raw numbers)."""
    load_billing(db)
    rules, script = write_helpdesk_files(workdir)
    veil, port = start_pgveil(db, workdir, rules)
    services.append(veil)
    stack.callback(veil.stop)
    veil.wait_port(port)
    targets = [
        Target("unmasked", port, veil, UNMASKED_ROLE, UNMASKED_PW, db),
        Target("masked", port, veil, MASKED_ROLE, MASKED_PW, db),
    ]
    assert tuple(t.name for t in targets) == MASKED_VARIANTS
    check_masking(db, env, targets)
    results = run_all(db, env, targets, reps, duration, masked_workloads(), ("-f", str(script)))
    raw: dict[str, object] = {
        "tps_or_seconds": results.values,
        "cpu_us_per_transaction": results.cpu_us,
        **cpu_raw(results),
    }
    return report_masked(results, db, reps, duration), raw


# ---------------------------------------------------------------------------------------------
# audit part: what auditing costs, the same pgveil and rules with the audit file on and off

AUDIT_TARGET = 0.8  # audited / not audited tps, at least (issue 15; time: at most 1 / 0.8)

# The audit part's rules: the masking part's, and pgbench's accounts as a protected table
# so that every `pgbench -S` statement through pgveil is an access event with its subject,
# as every one is an AUDIT line of pgAudit's (its column `filler` is never read by -S).
AUDIT_RULES = (
    MASKING_RULES
    + """\
  public.pgbench_accounts:
    subject: aid
    columns:
      filler: partial
"""
)
# (pgbench -S reads the scale from pgbench_branches)
PGBENCH_GRANTS = "GRANT SELECT ON pgbench_accounts, pgbench_branches TO {roles}"


def audit_workloads() -> list[Workload]:
    """The helpdesk rows of the masked part, then `pgbench -S` (select-only, scale 10) at 8
    clients in the three query modes, then the masked part's psql row."""
    helpdesk = masked_workloads()
    select_only = [
        Workload(
            f"pgbench -S -M {mode} -c 8 -j 2",
            "pgbench",
            ("-M", mode, "-c", "8", "-j", "2"),
            measure_cpu=True,
            script=("-S",),
        )
        for mode in ("simple", "extended", "prepared")
    ]
    pgbench_rows = [r for r in helpdesk if r.kind == "pgbench"]
    return [*pgbench_rows, *select_only, *(r for r in helpdesk if r.kind == "psql")]


# pgAudit, PostgreSQL's own audit extension, on a second PostgreSQL with the same data,
# clients connecting directly. "On" and "off" are two login roles of that one server with
# `pgaudit.log` set per role (ALTER ROLE ... SET): each session takes its role's setting at
# login, so the interleaved runs need no reload (a SIGHUP reaches the backends
# asynchronously, after `pg_ctl reload` returns) and nothing can run with the other
# variant's setting. "Off" is pgAudit loaded but logging nothing, as a pgAudit user turns
# it off without a restart.
PGAUDIT_ON_ROLE, PGAUDIT_ON_PW = "bench_pgaudit_on", "bench-pgaudit-on-pw-1"
PGAUDIT_OFF_ROLE, PGAUDIT_OFF_PW = "bench_pgaudit_off", "bench-pgaudit-off-pw-1"
PGAUDIT_LOG = "read, write"
PGAUDIT_SETTINGS = {
    "max_connections": "100",
    "shared_preload_libraries": "'pgaudit'",
    "pgaudit.log": "'none'",  # the server's default; the audited role sets its own
    "logging_collector": "on",  # the server log through the collector, as in production
    "log_directory": "'log'",  # (relative: in the data directory)
    "log_line_prefix": "'%m [%p] user=%u '",  # who each AUDIT line is for (the check)
}
PGAUDIT_SETUP = f"""
CREATE EXTENSION pgaudit;
CREATE ROLE {PGAUDIT_ON_ROLE} LOGIN PASSWORD '{PGAUDIT_ON_PW}';
CREATE ROLE {PGAUDIT_OFF_ROLE} LOGIN PASSWORD '{PGAUDIT_OFF_PW}';
ALTER ROLE {PGAUDIT_ON_ROLE} SET pgaudit.log = '{PGAUDIT_LOG}';
ALTER ROLE {PGAUDIT_OFF_ROLE} SET pgaudit.log = 'none';
GRANT USAGE ON SCHEMA billing TO {PGAUDIT_ON_ROLE}, {PGAUDIT_OFF_ROLE};
GRANT SELECT ON ALL TABLES IN SCHEMA billing TO {PGAUDIT_ON_ROLE}, {PGAUDIT_OFF_ROLE};
{PGBENCH_GRANTS.format(roles=f"{PGAUDIT_ON_ROLE}, {PGAUDIT_OFF_ROLE}")};
"""
# pgAudit's line for a statement: the prefix above ("2026-12-06 18:19:08.160 UTC [24245]
# user=NAME "), the level (pgaudit.log_level, LOG by default), then "AUDIT: SESSION,..." (or
# OBJECT, for object auditing). Matched from the start of the line: the continuation lines
# of a multi-line statement text, which carry no prefix, are not counted again.
AUDIT_LINE_RE = re.compile(rb"[^\[\n]*\[\d+\] user=(\S*) [A-Z0-9]+:  AUDIT: (?:SESSION|OBJECT),")


def start_pgaudit_server(
    env: dict[str, str], stack: contextlib.ExitStack
) -> tuple[EmbeddedPostgres, list[Target]]:
    """The pgAudit PostgreSQL, loaded with the audit part's data: (server, [off, on])."""
    print("starting PostgreSQL with pgAudit ...", file=sys.stderr)
    db = EmbeddedPostgres(settings=PGAUDIT_SETTINGS)
    stack.callback(db.cleanup)
    try:
        db.start()
    except EmbeddedPostgresError as exc:
        raise BenchError(f"PostgreSQL with pgAudit did not start: {exc}") from exc
    load_billing(db)
    pgbench_init(db, env)
    db.psql(PGAUDIT_SETUP)
    targets = [
        Target("pgAudit off", db.port, None, PGAUDIT_OFF_ROLE, PGAUDIT_OFF_PW, db),
        Target("pgAudit on", db.port, None, PGAUDIT_ON_ROLE, PGAUDIT_ON_PW, db),
    ]
    for target, want in zip(targets, ("none", PGAUDIT_LOG), strict=True):
        got = psql_output(db, env, target, "SHOW pgaudit.log")
        if got != want:
            raise BenchError(f"{target.user} has pgaudit.log = {got!r}, not {want!r}")
    return db, targets


def count_audit_lines(log_dir: Path) -> dict[str, int]:
    """pgAudit's AUDIT lines in the server log files of `log_dir`, by the user they name."""
    counts: dict[str, int] = {}
    for path in sorted(log_dir.iterdir()):
        with path.open("rb") as f:
            for line in f:
                found = AUDIT_LINE_RE.match(line)
                if found:
                    user = found.group(1).decode(errors="replace")
                    counts[user] = counts.get(user, 0) + 1
    return counts


def check_pgaudit_log(counts: dict[str, int], statements: dict[str, int]) -> str:
    """Refuse a pgAudit variant that did not audit: the audited role must have an AUDIT
    line for at least every statement its measured runs completed (`statements`, by
    variant), the role with auditing off none. Returns the line the report shows."""
    audited, ran = counts.get(PGAUDIT_ON_ROLE, 0), statements.get("pgAudit on", 0)
    if audited == 0:
        raise BenchError(
            f"pgAudit wrote no AUDIT lines for {PGAUDIT_ON_ROLE} (pgaudit.log = "
            f"'{PGAUDIT_LOG}'): it did not audit, so its numbers are not reported"
        )
    if audited < ran:
        raise BenchError(
            f"pgAudit wrote {audited:,} AUDIT lines for {PGAUDIT_ON_ROLE}, fewer than the "
            f"{ran:,} statements it completed: not every statement was audited"
        )
    stray = counts.get(PGAUDIT_OFF_ROLE, 0)
    if stray:
        raise BenchError(
            f"pgAudit wrote {stray:,} AUDIT lines for {PGAUDIT_OFF_ROLE}, whose pgaudit.log "
            "is 'none': the 'off' variant audited"
        )
    return (
        f"pgAudit wrote {audited:,} AUDIT lines for {PGAUDIT_ON_ROLE} ({ran:,} statements "
        f"completed in the measured runs, the rest in warm-up and pgbench's own queries), "
        f"none for {PGAUDIT_OFF_ROLE}"
    )


def report_audit(
    results: Results,
    rows: list[Workload],
    reps: int,
    duration: int,
    events: int,
    pgaudit_note: str,
) -> str:
    lines = [
        "# pgveil benchmark: audit cost",
        "",
        f"- {time.strftime('%Y-%m-%d %H:%M:%S %Z')}, {os.cpu_count()} CPUs, all on loopback",
        f"- pgveil {pgveil_build()}",
        "- two pgveil processes with the same rules, one with `--audit-file` and `--audit-key` "
        "(every statement of the helpdesk script touches personal data, so each one is an "
        "audit event with its data subjects; sealed checkpoints at the default cadence), one "
        "without; data and script as in the masking part, and `pgbench_accounts` "
        "(scale 10) protected too, so every `pgbench -S` statement is an event",
        "- pgAudit: a second PostgreSQL with the same data, `shared_preload_libraries = "
        f"'pgaudit'`, server log through the logging collector; clients connect directly as "
        f"`{PGAUDIT_ON_ROLE}` (`pgaudit.log = '{PGAUDIT_LOG}'`) or `{PGAUDIT_OFF_ROLE}` "
        "(`pgaudit.log = 'none'`), set per role; it has no masked role, so both role lines "
        "show the same pgAudit runs",
        f"- {reps} repetitions, all variants interleaved; pgbench runs of {duration} s; "
        f"{events:,} pgveil audit events written in all; {pgaudit_note}",
        "",
        "| workload | role | audit off | audit on | on/off | target | met "
        "| pgAudit off | pgAudit on | pgAudit on/off |",
        "|---|---|--:|--:|--:|--:|:-:|--:|--:|--:|",
    ]
    for row in rows:
        v = results.values[row.name]
        pgbench = row.kind == "pgbench"
        digits = 0 if pgbench else 3
        anchor_off, anchor_on = v["pgAudit off"], v["pgAudit on"]
        anchor = (
            f"{statistics.median(anchor_off):.{digits}f} "
            f"| {statistics.median(anchor_on):.{digits}f} | {paired_ratio(anchor_on, anchor_off)}"
        )
        for role in MASKED_VARIANTS:
            off, on = v[f"{role} off"], v[f"{role} on"]
            ratios = [a / b for a, b in zip(on, off, strict=True)]
            target = AUDIT_TARGET if pgbench else 1 / AUDIT_TARGET
            sign = ">=" if pgbench else "<="
            lines.append(
                f"| {row.name} | {role} | {statistics.median(off):.{digits}f} "
                f"| {statistics.median(on):.{digits}f} | {paired_ratio(on, off)} "
                f"| {sign} {target:.2f} | {verdict(ratios, target, higher_is_better=pgbench)} "
                f"| {anchor} |"
            )
    lines += [
        "",
        "Ratios: audit on / audit off, tps (higher is better) or seconds for the psql row "
        "(lower is better); pgAudit on/off is the same ratio for PostgreSQL's own audit.",
        "",
        "pgveil CPU per transaction (utime+stime / transactions; median):",
        "",
    ]
    for row in rows:
        cpu = results.cpu_us.get(row.name)
        if not cpu:
            continue
        for role in MASKED_VARIANTS:
            cpu_off = statistics.median(cpu[f"{role} off"])
            cpu_on = statistics.median(cpu[f"{role} on"])
            per_statement = (cpu_on - cpu_off) / row.statements
            lines.append(
                f"- `{row.name}` {role}: {cpu_off:.0f} us off, {cpu_on:.0f} us on "
                f"(auditing adds ~{per_statement:.0f} us per statement)"
            )
    lines += cpu_split_table(results, rows)
    return "\n".join(lines) + "\n"


def run_audit_part(
    db: EmbeddedPostgres,
    env: dict[str, str],
    workdir: Path,
    stack: contextlib.ExitStack,
    services: list[Service],
    reps: int,
    duration: int,
    seeded: bool,
    baseline: Path | None = None,
    only_rows: str | None = None,
) -> tuple[str, dict[str, object]]:
    """The masked part's data and script, and `pgbench -S`, through pgveil with and without
    the audit file, and directly on a PostgreSQL with pgAudit on and off: (report, raw
    numbers). `seeded`: the masked part already loaded the data. `baseline`: another
    checkout whose pgveil runs audited too, interleaved with ours (before/after).
    `only_rows`: only the rows whose name contains it."""
    if not seeded:
        load_billing(db)
    if db.psql("SELECT to_regclass('public.pgbench_accounts') IS NULL").strip() == "t":
        pgbench_init(db, env)  # (the relay part, if it ran, made them)
    db.psql(PGBENCH_GRANTS.format(roles=f"{MASKED_ROLE}, {UNMASKED_ROLE}"))
    _, script = write_helpdesk_files(workdir)
    rules = workdir / "rules-audit.yaml"
    rules.write_text(AUDIT_RULES)
    audit_file = workdir / "audit.jsonl"
    key = workdir / "audit.key"  # checkpoints sealed as in production (default cadence)
    key.write_text(os.urandom(32).hex())
    plain, plain_port = start_pgveil(db, workdir, rules, label="audit-off")
    audited, audited_port = start_pgveil(
        db,
        workdir,
        rules,
        ("--audit-file", str(audit_file), "--audit-key", f"file:{key}"),
        label="audit-on",
    )
    started = [(plain, plain_port), (audited, audited_port)]
    if baseline is not None:
        old_audit = ["--audit-file", str(workdir / "audit-baseline.jsonl")]
        if baseline_has(baseline, "--audit-key"):  # (before the chain was sealed: none)
            old_audit += ["--audit-key", f"file:{key}"]
        started.append(
            start_pgveil(db, workdir, rules, tuple(old_audit), label="baseline", repo=baseline)
        )
    for service, port in started:
        services.append(service)
        stack.callback(service.stop)
        service.wait_port(port)
    pgaudit_db, pgaudit_targets = start_pgaudit_server(env, stack)
    targets = []
    for role, user, pw in (
        ("unmasked", UNMASKED_ROLE, UNMASKED_PW),
        ("masked", MASKED_ROLE, MASKED_PW),
    ):
        targets.append(Target(f"{role} off", plain_port, plain, user, pw, db))
        targets.append(Target(f"{role} on", audited_port, audited, user, pw, db))
        if baseline is not None:
            old, old_port = started[2]
            targets.append(Target(f"{role} baseline", old_port, old, user, pw))
    targets += pgaudit_targets
    rows = [row for row in audit_workloads() if only_rows is None or only_rows in row.name]
    if not rows:
        raise BenchError(f"no audit row's name contains {only_rows!r}")
    results = run_all(db, env, targets, reps, duration, rows, ("-f", str(script)))
    events = 0
    for path in rotated_files(audit_file):  # rotated at 100 MB
        with path.open("rb") as f:
            events += sum(1 for _ in f)
    pgaudit_db.stop()  # the logging collector writes out what it holds before it exits
    counts = count_audit_lines(pgaudit_db.datadir / "log")
    pgaudit_note = check_pgaudit_log(counts, results.statements)
    print(pgaudit_note, file=sys.stderr)
    raw: dict[str, object] = {
        "tps_or_seconds": results.values,
        "cpu_us_per_transaction": results.cpu_us,
        **cpu_raw(results),
        "audit_events": events,
        "pgaudit_audit_lines": counts,
        "statements": results.statements,
    }
    text = report_audit(results, rows, reps, duration, events, pgaudit_note)
    if baseline is not None:
        text += report_baseline(results, baseline)
    return text, raw


def baseline_has(repo: Path, option: str) -> bool:
    """Whether the baseline checkout's `proxy` subcommand takes `option`."""
    done = subprocess.run(
        [sys.executable, "-m", "proxy.cli", "proxy", "--help"],
        cwd=repo,
        capture_output=True,
        text=True,
        timeout=60,
    )
    if done.returncode:
        raise BenchError(f"the baseline in {repo} does not run: {done.stderr.strip()[-800:]}")
    return option in done.stdout


def report_baseline(results: Results, repo: Path) -> str:
    """Audited pgveil against the baseline checkout's, both audited, run interleaved:
    the paired ratio of tps (time: baseline/ours, so above 1 is faster either way)."""
    rev = command_output(["git", "-C", str(repo), "log", "-1", "--format=%h %s"])
    lines = [
        "",
        f"Audited pgveil against the baseline `{rev[:72]}` ({repo}), audited too, interleaved "
        "in every repetition (ours/baseline: above 1 is faster):",
        "",
        "| workload | role | baseline | ours | ours/baseline | on/off baseline | on/off ours |",
        "|---|---|--:|--:|--:|--:|--:|",
    ]
    for row, v in results.values.items():
        pgbench = not row.startswith("psql")
        digits = 0 if pgbench else 3
        for role in MASKED_VARIANTS:
            off, on, old = v[f"{role} off"], v[f"{role} on"], v[f"{role} baseline"]
            faster = paired_ratio(on, old) if pgbench else paired_ratio(old, on)
            lines.append(
                f"| {row} | {role} | {statistics.median(old):.{digits}f} "
                f"| {statistics.median(on):.{digits}f} | {faster} "
                f"| {paired_ratio(old, off)} | {paired_ratio(on, off)} |"
            )
    lines += ["", "pgveil CPU per transaction, audited (median): ", ""]
    for row, cpu in results.cpu_us.items():
        for role in MASKED_VARIANTS:
            lines.append(
                f"- `{row}` {role}: baseline {statistics.median(cpu[f'{role} baseline']):.0f} us, "
                f"ours {statistics.median(cpu[f'{role} on']):.0f} us"
            )
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------
# output: bench/out/results.md and raw.json hold the latest run of each part

PART_MARKER = "<!-- bench part: {} -->"


def split_parts(text: str) -> dict[str, str]:
    """The parts of an earlier results.md; a file without markers is all relay part."""
    marks = re.compile(r"^<!-- bench part: (\w+) -->\n", re.M)
    found = list(marks.finditer(text))
    if not found:
        return {"relay": text} if text.strip() else {}
    parts: dict[str, str] = {}
    for i, mark in enumerate(found):
        end = found[i + 1].start() if i + 1 < len(found) else len(text)
        parts[mark.group(1)] = text[mark.end() : end].strip() + "\n"
    return parts


def write_outputs(texts: dict[str, str], raw: dict[str, dict[str, object]]) -> None:
    """Replace the sections (and raw numbers) of the parts that ran; keep the others."""
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    md_path, raw_path = OUT_DIR / "results.md", OUT_DIR / "raw.json"
    old_md = md_path.read_text() if md_path.exists() else ""
    parts = {**split_parts(old_md), **texts}
    md_path.write_text(
        "\n".join(f"{PART_MARKER.format(p)}\n{parts[p]}" for p in PARTS if p in parts)
    )
    old_raw: dict[str, object] = {}
    with contextlib.suppress(OSError, ValueError):
        loaded = json.loads(raw_path.read_text())
        if isinstance(loaded, dict):
            old_raw = loaded
    if "relay" in raw:
        old_raw.update(raw["relay"])  # top-level keys, as before the masked part existed
    for part in ("masked", "audit"):
        if part in raw:
            old_raw[part] = raw[part]
    raw_path.write_text(json.dumps(old_raw, indent=2) + "\n")


# ---------------------------------------------------------------------------------------------
# main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--reps", type=int, default=5, help="repetitions per workload (default 5)")
    p.add_argument("--duration", type=int, default=5, help="seconds per pgbench run (default 5)")
    p.add_argument(
        "--only",
        choices=PARTS,
        help="run one part: relay (vs direct and pgbouncer), masked (masked vs unmasked "
        "role through pgveil with rules) or audit (audit file on vs off, beside pgAudit on vs "
        "off); default all",
    )
    p.add_argument(
        "--baseline",
        type=Path,
        help="audit part: a checkout of another revision (git worktree) whose pgveil runs "
        "audited too, interleaved with ours: before/after in one run, under the same noise",
    )
    p.add_argument(
        "--rows",
        metavar="TEXT",
        help="audit part: only the rows whose name contains TEXT (e.g. '-S -M extended'), for "
        "a focused before/after with more repetitions",
    )
    ns = p.parse_args(argv)
    if ns.rows is not None and ns.only != "audit":
        p.error("--rows needs --only audit")
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
    parts: tuple[str, ...] = PARTS if ns.only is None else (ns.only,)
    signal.signal(signal.SIGTERM, _sigterm)
    services: list[Service] = []
    stack = contextlib.ExitStack()  # cleanups, run in reverse order of registration
    try:
        workdir = Path(tempfile.mkdtemp(prefix="pgveil-bench-"))
        stack.callback(shutil.rmtree, workdir, ignore_errors=True)
        pgbouncer_bin = pgbouncer_binary() if "relay" in parts else ""
        if "audit" in parts:
            print(f"pgAudit: {pgaudit_library()}", file=sys.stderr)  # before any long setup

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

        texts: dict[str, str] = {}
        raw: dict[str, dict[str, object]] = {}
        if "relay" in parts:
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
            texts["relay"] = report(results, db, ns.reps, ns.duration, pgbouncer_bin)
            raw["relay"] = {
                "tps_or_seconds": results.values,
                "cpu_us_per_query": results.cpu_us,
                "proxy_user_us_per_query": results.proxy_user_us,
                "proxy_system_us_per_query": results.proxy_sys_us,
            }
        if "masked" in parts:
            print("--- masked part ---", file=sys.stderr)
            texts["masked"], raw["masked"] = run_masked_part(
                db, env, workdir, stack, services, ns.reps, ns.duration
            )
        if "audit" in parts:
            print("--- audit part ---", file=sys.stderr)
            texts["audit"], raw["audit"] = run_audit_part(
                db,
                env,
                workdir,
                stack,
                services,
                ns.reps,
                ns.duration,
                "masked" in parts,
                ns.baseline.resolve() if ns.baseline else None,
                ns.rows,
            )
        write_outputs(texts, raw)
        print("\n".join(texts[p] for p in PARTS if p in texts), end="")
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
