"""Helpers for the audit delivery tests that speak the wire protocol themselves: a proxy
with an audit file, the events in that file, and raw frontend messages."""

from __future__ import annotations

import asyncio
import contextlib
import json
import resource
import struct
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from proxy.demo.embedded_pg import EmbeddedPostgres
from proxy.wire import messages as m
from proxy.wire.errors import severity_of
from tests.integration.masking_fixture import HASH_KEY, RULES
from tests.support import ProxyProcess, RawClient

Messages = list[tuple[str, bytes]]
SYNC = m.message(ord("S"))


def audit_env(pg: EmbeddedPostgres) -> dict[str, str]:
    return {"PGVEIL_TEST_HASH_KEY": HASH_KEY, "PGVEIL_CATALOG_PASSWORD": pg.password}


def rules_file(tmp: Path) -> Path:
    rules = tmp / "rules.yaml"
    rules.write_text(RULES)
    return rules


def start_audited(pg: EmbeddedPostgres, tmp: Path, *extra: str) -> ProxyProcess:
    """A proxy with the masking fixture's rules and the audit file `tmp/audit.jsonl`."""
    return ProxyProcess(
        pg.port, "--upstream-sslmode", "disable", "--rules", str(rules_file(tmp)),
        "--catalog-user", pg.superuser, "--audit-file", str(tmp / "audit.jsonl"),
        "--log-level", "error", *extra,
        env=audit_env(pg),
    )  # fmt: skip


@contextlib.contextmanager
def audited_proxy(
    pg: EmbeddedPostgres, tmp: Path, *extra: str
) -> Iterator[tuple[ProxyProcess, Path]]:
    """`start_audited` for a module's shared fixture: the proxy and its audit file; the
    proxy must not have logged a traceback by the end."""
    with start_audited(pg, tmp, *extra) as p:
        yield p, tmp / "audit.jsonl"
    assert "Traceback" not in p.log(), p.log()


def all_events(path: Path) -> list[dict[str, Any]]:
    """Complete lines only: a reader may catch a write half done."""
    if not path.exists():
        return []
    data = path.read_bytes()
    lines = data[: data.rfind(b"\n") + 1].splitlines()
    return [json.loads(line) for line in lines if line.strip()]


def events(path: Path, app: str | None = None, kind: str = "access") -> list[dict[str, Any]]:
    return [
        e
        for e in all_events(path)
        if e["type"] == kind and app in (None, e.get("application_name"))
    ]


def wait_for(check: Callable[[], bool], what: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


async def wait_for_async(check: Callable[[], bool], what: str, timeout: float = 60) -> None:
    """`wait_for` inside a running event loop: the loop runs between the checks (a task
    under test makes its progress there)."""
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.02)


def wait_failing(p: ProxyProcess) -> None:
    """Wait until the proxy's audit writer has failed to write a sink (its
    pgveil_audit_failing gauge is 1): from then on it refuses statements that need an event.
    Reading nothing from a client for a while proves only that nothing arrived yet: a
    request sent before the writer has met the failure runs, and its result is withheld."""
    wait_for(lambda: p.metric("pgveil_audit_failing") == 1, "the audit sink to fail")


def query_message(sql: str) -> bytes:
    return m.message(ord("Q"), sql.encode() + b"\0")


def parse(sql: str, name: bytes = b"") -> bytes:
    return m.message(ord("P"), name + b"\0" + sql.encode() + b"\0\0\0")


def bind(portal: bytes = b"", statement: bytes = b"") -> bytes:
    return m.message(ord("B"), portal + b"\0" + statement + b"\0\0\0\0\0\0\0")


def execute(portal: bytes = b"", max_rows: int = 0) -> bytes:
    return m.message(ord("E"), portal + b"\0" + struct.pack("!i", max_rows))


def describe_portal(portal: bytes = b"") -> bytes:
    return m.message(ord("D"), b"P" + portal + b"\0")


def read_until(client: RawClient, readies: int, timeout: float = 10) -> Messages:
    """Messages until `readies` ReadyForQuery (or a FATAL, the end, or the timeout)."""
    client.sock.settimeout(timeout)
    out: Messages = []
    seen = 0
    try:
        while seen < readies:
            typ, body = client.recv_message()
            out.append((typ, body))
            if typ == "Z":
                seen += 1
            if typ == "E" and severity_of(body) == "FATAL":
                break
    except (TimeoutError, ConnectionError, OSError):
        pass
    return out


def limit_file(p: ProxyProcess, size: int | None) -> None:
    """RLIMIT_FSIZE of the proxy: writes past `size` fail with EFBIG (a full disk)."""
    soft = resource.RLIM_INFINITY if size is None else size
    resource.prlimit(p.proc.pid, resource.RLIMIT_FSIZE, (soft, resource.RLIM_INFINITY))


def stop_unlimited(p: ProxyProcess) -> None:
    if p.alive():
        limit_file(p, None)
    p.stop()
