"""Test helpers: a pgveil subprocess, a raw protocol client, and small utilities.

Nothing here fakes PostgreSQL: the raw client talks to the real server (directly or through
the proxy) and exists to send byte sequences that ordinary drivers never would.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from proxy.demo.embedded_pg import PORT_ATTEMPTS, address_in_use, free_port
from proxy.wire import messages as m
from proxy.wire.errors import decode_fields, severity_of
from proxy.wire.startup import StartupMessage


def wait_port(
    host: str, port: int, timeout: float = 20.0, proc: subprocess.Popen[bytes] | None = None
) -> None:
    """Wait until something accepts connections on host:port; with `proc`, until that
    process itself listens there (where /proc tells), so that a port another process took
    meanwhile is not mistaken for the one `proc` was told to listen on."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before listening")
        with contextlib.suppress(OSError), socket.create_connection((host, port), 0.5):
            if proc is None or listens(proc.pid, port) is not False:
                return
        time.sleep(0.05)
    raise RuntimeError(f"nothing listening on {host}:{port} after {timeout}s")


def listens(pid: int, port: int) -> bool | None:
    """Whether process `pid` holds a TCP socket listening on `port`; None where /proc does
    not say (not Linux)."""
    inodes: set[str] = set()
    tables = [Path("/proc/net/tcp"), Path("/proc/net/tcp6")]
    if not any(t.exists() for t in tables):
        return None
    for table in tables:
        with contextlib.suppress(OSError):
            for line in table.read_text().splitlines()[1:]:
                fields = line.split()
                # local address is HEXADDR:HEXPORT; state 0A is LISTEN; field 9 the inode
                if fields[3] == "0A" and int(fields[1].rsplit(":", 1)[1], 16) == port:
                    inodes.add(fields[9])
    with contextlib.suppress(OSError):
        for fd in os.listdir(f"/proc/{pid}/fd"):
            with contextlib.suppress(OSError):
                link = os.readlink(f"/proc/{pid}/fd/{fd}")
                if link.startswith("socket:[") and link[8:-1] in inodes:
                    return True
    return False


def spawn_listening(
    args_for: Callable[[int], list[str]], log: Path, **popen: Any
) -> tuple[subprocess.Popen[bytes], int]:
    """Start the process `args_for(port)` on a free port, its standard error to `log`, and
    wait until it listens; if the port was taken before it could bind it, again on another
    (see ProxyProcess). `popen`: further subprocess.Popen arguments."""
    attempt = 1
    while True:
        port = free_port()
        with open(log, "wb") as err:
            proc: subprocess.Popen[bytes] = subprocess.Popen(args_for(port), stderr=err, **popen)
        try:
            wait_port("127.0.0.1", port, proc=proc)
            return proc, port
        except RuntimeError:
            if proc.poll() is None:
                proc.kill()
            proc.wait()
            output = log.read_text(errors="replace")
            if attempt == PORT_ATTEMPTS or not address_in_use(output):
                raise RuntimeError(f"the process did not start: {output}") from None
        attempt += 1


class ProxyProcess:
    """`pgveil proxy` as a real subprocess (the way operators run it)."""

    def __init__(
        self,
        upstream_port: int | None,
        *extra: str,
        metrics: bool = True,
        env: dict[str, str] | None = None,
        inherit_env: bool = True,
    ) -> None:
        """`upstream_port` None: no `--upstream` (pgveil takes it from the environment);
        `inherit_env` False: `env` is the whole environment (the PG* variables tests)."""
        self._upstream = ["--upstream", f"127.0.0.1:{upstream_port}"] if upstream_port else []
        self._extra = extra
        self._metrics = metrics
        self._environment = {**os.environ, **(env or {})} if inherit_env else dict(env or {})
        attempt = 1
        while True:
            self._start()
            try:
                wait_port("127.0.0.1", self.port, proc=self.proc)
                if self.metrics_port:  # bound after the listening port
                    wait_port("127.0.0.1", self.metrics_port, proc=self.proc)
                return
            except RuntimeError:
                self.stop()
                # a port free_port() handed out can be taken before pgveil binds it (by a
                # client's outgoing connection or the other implementation's suite): pick
                # new ports; any other failure to start is the test's business
                if attempt == PORT_ATTEMPTS or not address_in_use(self.log()):
                    raise RuntimeError(f"pgveil did not start: {self.log()}") from None
            attempt += 1

    def _start(self) -> None:
        self.port = free_port()
        self.metrics_port = free_port() if self._metrics else None
        self.log_path = Path(tempfile.mkstemp(prefix="pgveil-log-", suffix=".jsonl")[1])
        args = [
            sys.executable,
            "-m",
            "proxy.cli",
            "proxy",
            "--listen",
            f"127.0.0.1:{self.port}",
            *self._upstream,
            "--log-level",
            "debug",
            *self._extra,
        ]
        if self.metrics_port:
            args += ["--metrics", f"127.0.0.1:{self.metrics_port}"]
        self.args = args
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()
        self._final_log: str | None = None  # the log, kept once stop() removed its file
        self.proc = subprocess.Popen(
            args, stdout=self._log, stderr=subprocess.STDOUT, env=self._environment
        )

    def log(self) -> str:
        """Everything pgveil wrote to stdout and stderr so far (after `stop`, all of it)."""
        if self._final_log is not None:
            return self._final_log
        return self.log_path.read_text(errors="replace")

    def alive(self) -> bool:
        return self.proc.poll() is None

    def signal(self, sig: int) -> None:
        self.proc.send_signal(sig)

    def stop(self, timeout: float = 20) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self._final_log is None:
            self._log.close()
            self._final_log = self.log_path.read_text(errors="replace")
            self.log_path.unlink()  # nothing left in the temporary directory
        return self.proc.returncode

    def http(self, path: str) -> tuple[int, str]:
        assert self.metrics_port
        try:
            with urllib.request.urlopen(
                f"http://127.0.0.1:{self.metrics_port}{path}", timeout=10
            ) as r:
                return r.status, r.read().decode()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read().decode()

    def metric(self, name: str, **labels: str) -> float:
        _, text = self.http("/metrics")
        want = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
        total = 0.0
        for line in text.splitlines():
            if line.startswith("#") or not line.startswith(name):
                continue
            key, _, value = line.rpartition(" ")
            metric, _, label_part = key.partition("{")
            if metric != name:
                continue
            got = ",".join(sorted(label_part.rstrip("}").split(","))) if label_part else ""
            if not want or all(p in got.split(",") for p in want.split(",")):
                total += float(value)
        return total

    def __enter__(self) -> ProxyProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


class RawClient:
    """A bare protocol-3 client over a socket, for users with `trust` authentication."""

    def __init__(
        self,
        port: int,
        user: str = "trust_user",
        database: str = "postgres",
        connect: bool = True,
        **params: str,
    ) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=15)
        self.buf = b""
        self.pid: int | None = None
        self.key: int | None = None
        if connect:
            self.send_raw(
                StartupMessage(
                    m.PROTOCOL_3_0, {"user": user, "database": database, **params}
                ).encode()
            )
            self.until_ready()

    def send_raw(self, data: bytes) -> None:
        self.sock.sendall(data)

    def send(self, typ: str, body: bytes = b"") -> None:
        self.sock.sendall(m.message(ord(typ), body))

    def recv_message(self) -> tuple[str, bytes]:
        while True:
            if len(self.buf) >= 5:
                typ = self.buf[0]
                length = struct.unpack_from("!I", self.buf, 1)[0]
                if len(self.buf) >= length + 1:
                    body = self.buf[5 : length + 1]
                    self.buf = self.buf[length + 1 :]
                    return chr(typ), body
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError("connection closed")
            self.buf += chunk

    def until_ready(self) -> list[tuple[str, bytes]]:
        out = []
        while True:
            typ, body = self.recv_message()
            if typ == "K":
                self.pid, self.key = struct.unpack("!ii", body)
            out.append((typ, body))
            if typ == "Z":
                return out
            if typ == "E" and severity_of(body) == "FATAL":
                return out

    def query(self, sql: str) -> list[tuple[str, bytes]]:
        self.send("Q", sql.encode() + b"\0")
        return self.until_ready()

    def closed_by_peer(self, timeout: float = 10) -> bool:
        self.sock.settimeout(timeout)
        try:
            while True:
                chunk = self.sock.recv(65536)
                if not chunk:
                    return True
                self.buf += chunk
        except (ConnectionResetError, BrokenPipeError):
            return True
        except TimeoutError:
            return False

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()


def errors_in(messages: list[tuple[str, bytes]]) -> list[dict[str, str]]:
    return [decode_fields(body) for typ, body in messages if typ == "E"]


def normalise_session_bytes(messages: list[tuple[str, bytes]]) -> list[tuple[str, bytes]]:
    """Drop what legitimately differs between two connections (backend key data)."""
    return [(t, b) for t, b in messages if t != "K"]


@contextlib.contextmanager
def env_password(password: str) -> Iterator[dict[str, str]]:
    yield {**os.environ, "PGPASSWORD": password}
