"""A throwaway PostgreSQL cluster for tests, benchmarks and the demo.

Finds server binaries (`pg_config --bindir`, `/usr/lib/postgresql/*/bin`, then the
`pgserver` package's bundled build), runs initdb into a temporary directory with SCRAM
authentication, starts the server on a free loopback port and removes everything on stop.
When running as root, the server runs as the unprivileged `postgres` OS user (PostgreSQL
refuses to run as root). Failures raise `EmbeddedPostgresError` with the reason; nothing is
silently skipped. Not for production databases.
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path


class EmbeddedPostgresError(Exception):
    pass


def find_bindir() -> Path:
    """Directory holding initdb, pg_ctl and postgres; raises with what was tried."""
    tried: list[str] = []
    candidates: list[Path] = []
    env = os.environ.get("PGVEIL_PG_BINDIR")
    if env:
        candidates.append(Path(env))
    pg_config = shutil.which("pg_config")
    if pg_config:
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            out = subprocess.run(
                [pg_config, "--bindir"], capture_output=True, text=True, check=True, timeout=10
            ).stdout.strip()
            candidates.append(Path(out))
    versions = sorted(
        glob.glob("/usr/lib/postgresql/*/bin"),
        key=lambda p: int(Path(p).parent.name) if Path(p).parent.name.isdigit() else 0,
        reverse=True,
    )
    candidates += [Path(p) for p in versions]
    for c in candidates:
        if _has_server(c):
            return c
        tried.append(str(c))
    try:
        # imported only when needed, and quietly: on hosts without XDG_RUNTIME_DIR its
        # import warns about a directory pgveil never uses
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import pgserver

        bundled = Path(pgserver.__file__).parent / "pginstall" / "bin"
        if _has_server(bundled):
            return bundled
        tried.append(str(bundled))
    except ImportError:
        tried.append("the pgserver package (not installed)")
    raise EmbeddedPostgresError(
        "no PostgreSQL server binaries found (tried: "
        + ", ".join(tried or ["nothing"])
        + "); install PostgreSQL or `pip install pgserver`"
    )


def _has_server(bindir: Path) -> bool:
    return all((bindir / name).is_file() for name in ("initdb", "pg_ctl", "postgres"))


PORT_ATTEMPTS = 5


def address_in_use(output: str) -> bool:
    """Whether a server's output (PostgreSQL's log, pgveil's stderr) says the address it was
    to listen on was in use: the port a free_port() handed out was taken meanwhile."""
    return "address already in use" in output.lower()


def _port_was_taken(log: Path, offset: int) -> bool:
    """Whether the server log, after `offset`, says the listening port was in use."""
    with open(log, "rb") as f:
        f.seek(offset)
        return address_in_use(f.read().decode(errors="replace"))


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


@dataclass
class EmbeddedPostgres:
    """initdb + pg_ctl start/stop in a temporary directory."""

    superuser: str = "postgres"
    password: str = "postgres-test-password"
    port: int = 0
    host: str = "127.0.0.1"
    settings: dict[str, str] = field(default_factory=dict)
    hba: list[str] = field(default_factory=list)  # extra lines, before the SCRAM catch-all
    bindir: Path = field(default_factory=find_bindir)
    base: Path | None = None  # created by start(): a new temporary directory unless given
    _os_user: str | None = None

    @property
    def datadir(self) -> Path:
        assert self.base is not None
        return self.base / "data"

    def _run(self, args: Sequence[str | Path]) -> subprocess.CompletedProcess[str]:
        cmd = [str(a) for a in args]
        if self._os_user:
            cmd = ["runuser", "-u", self._os_user, "--", *cmd]
        try:
            return subprocess.run(cmd, capture_output=True, text=True, check=True, timeout=120)
        except subprocess.CalledProcessError as exc:
            raise EmbeddedPostgresError(
                f"{Path(args[0]).name} failed ({exc.returncode}): {exc.stderr.strip()[-2000:]}"
            ) from exc

    def start(self) -> EmbeddedPostgres:
        if os.geteuid() == 0:
            try:
                pwd.getpwnam("postgres")
            except KeyError as exc:
                raise EmbeddedPostgresError(
                    "running as root needs an unprivileged 'postgres' OS user to run the server"
                ) from exc
            self._os_user = "postgres"
        if self.base is None:
            self.base = Path(tempfile.mkdtemp(prefix="pgveil-pg-"))
        else:
            self.base.mkdir(mode=0o700)  # a directory the caller chose, e.g. the demo's
            if self._os_user and self.base.parent.stat().st_mode & 0o011 != 0o011:
                # the server (another OS user) must pass through it to its data directory
                os.chmod(self.base.parent, self.base.parent.stat().st_mode | 0o011)
        if self._os_user:
            pw = pwd.getpwnam(self._os_user)
            os.chown(self.base, pw.pw_uid, pw.pw_gid)
        pwfile = self.base / "pwfile"
        pwfile.write_text(self.password + "\n")
        if self._os_user:
            os.chown(pwfile, pwd.getpwnam(self._os_user).pw_uid, -1)
        self._run(
            [
                self.bindir / "initdb",
                "-D",
                self.datadir,
                "-U",
                self.superuser,
                "--pwfile",
                pwfile,
                "--auth-local=scram-sha-256",
                "--auth-host=scram-sha-256",
                "-E",
                "UTF8",
                "--locale=C",
                "--no-sync",
            ]
        )
        pwfile.unlink()
        chosen = not self.port  # a port picked here may be taken before the server binds it
        if chosen:
            self.port = free_port(self.host)
        conf = {
            "listen_addresses": f"'{self.host}'",
            "port": str(self.port),
            "unix_socket_directories": f"'{self.base}'",
            "fsync": "off",
            "synchronous_commit": "off",
            "full_page_writes": "off",
            "max_connections": "200",
            "shared_buffers": "128MB",
            "password_encryption": "'scram-sha-256'",
            **self.settings,
        }
        with open(self.datadir / "postgresql.conf", "a") as f:
            f.write("\n# pgveil embedded\n")
            for k, v in conf.items():
                f.write(f"{k} = {v}\n")
        if self.hba:
            hba_path = self.datadir / "pg_hba.conf"
            original = hba_path.read_text()
            hba_path.write_text("\n".join(self.hba) + "\n" + original)
        log = self.datadir / "server.log"
        attempt = 1
        while True:
            logged = log.stat().st_size if log.exists() else 0
            try:
                self._run(
                    [
                        self.bindir / "pg_ctl",
                        "-D",
                        self.datadir,
                        "-l",
                        log,
                        "-w",
                        "-t",
                        "60",
                        "start",
                    ]
                )
                return self
            except EmbeddedPostgresError:
                # between free_port() and the server's bind another process (a client's
                # outgoing connection, a parallel test run) can take the port: pick again
                if not chosen or attempt == PORT_ATTEMPTS or not _port_was_taken(log, logged):
                    raise
            attempt += 1
            self.port = free_port(self.host)
            with open(self.datadir / "postgresql.conf", "a") as f:
                f.write(f"port = {self.port}\n")  # the last setting of a name wins

    def restart(self) -> None:
        self._run(
            [
                self.bindir / "pg_ctl",
                "-D",
                self.datadir,
                "-w",
                "-m",
                "fast",
                "restart",
                "-l",
                self.datadir / "server.log",
            ]
        )

    def stop(self, mode: str = "fast") -> None:
        if self.base is None:
            return
        with contextlib.suppress(EmbeddedPostgresError):
            self._run([self.bindir / "pg_ctl", "-D", self.datadir, "-w", "-m", mode, "stop"])

    def cleanup(self) -> None:
        self.stop("immediate")
        if self.base is not None:
            shutil.rmtree(self.base, ignore_errors=True)
            self.base = None

    def dsn(
        self,
        user: str | None = None,
        password: str | None = None,
        dbname: str = "postgres",
        port: int | None = None,
    ) -> str:
        user = user or self.superuser
        password = self.password if password is None and user == self.superuser else password
        parts = [
            f"host={self.host}",
            f"port={port or self.port}",
            f"user={user}",
            f"dbname={dbname}",
        ]
        if password:
            parts.append(f"password={password}")
        return " ".join(parts)

    def client(self, name: str) -> str:
        """A client program of the server's own major version (psql, pg_dump, pgbench):
        the one beside the server binaries, else the one on PATH; raises if neither."""
        own = self.bindir / name
        found = str(own) if own.is_file() else shutil.which(name)
        if not found:
            raise EmbeddedPostgresError(f"{name} not found in {self.bindir} or on PATH")
        return found

    def psql(self, sql: str, dbname: str = "postgres") -> str:
        env = {**os.environ, "PGPASSWORD": self.password}
        out = subprocess.run(
            [
                self.client("psql"),
                "-X",
                "-q",
                "-v",
                "ON_ERROR_STOP=1",
                "-At",
                "-h",
                self.host,
                "-p",
                str(self.port),
                "-U",
                self.superuser,
                "-d",
                dbname,
                "-c",
                sql,
            ],
            capture_output=True,
            text=True,
            env=env,
            timeout=120,
        )
        if out.returncode:
            raise EmbeddedPostgresError(f"psql failed: {out.stderr.strip()}")
        return out.stdout

    def wait_ready(self, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError), socket.create_connection((self.host, self.port), 1):
                return
            time.sleep(0.1)
        raise EmbeddedPostgresError("server did not accept connections in time")
