"""Prometheus metrics and the /metrics + /healthz HTTP endpoint.

Counters on the data path are plain integers kept by each session (a list index increment
costs a few tens of nanoseconds; a prometheus_client Counter.inc() takes a lock). A custom
collector adds them up when Prometheus scrapes. Labels are message type names, directions,
SQLSTATE classes and fixed reasons: never a value from a query or a row.

Prometheus's rules: a counter never goes down while the process lives, so every counter
lives in `Stats` (one per process) or in a session (added to `Stats` when it ends), never in
what a reload or a catalog change replaces (the masking manager, its contexts and their
decision caches: they count into `Stats`' objects). A gauge's name is never a counter's
name without `_total` (`pgveil_client_connections_open` beside
`pgveil_client_connections_total`).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Iterable, Iterator
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from proxy import __version__
from proxy.wire.messages import BACKEND_NAMES, FRONTEND_NAMES
from rules.shapes import CacheCounts
from shared.implementation import implementation
from shared.logs import log

if TYPE_CHECKING:
    from audit.writer import AuditWriter
    from proxy.catalog import MaskingManager
    from proxy.session.engine import Session


class Stats:
    """Totals of finished sessions; live sessions are added at scrape time."""

    def __init__(self) -> None:
        self.connections_total = 0
        self.rejected: dict[str, int] = {}
        self.client_bytes = 0
        self.server_bytes = 0
        self.client_counts = [0] * 256
        self.server_counts = [0] * 256
        self.error_classes: dict[str, int] = {}
        self.cancel_requests = 0
        self.tls_handshakes = 0
        self.upstream_connect_failures = 0
        self.masked_sessions = 0
        self.statements = {"pass": 0, "rewrite": 0, "refuse": 0}
        self.notifications_withheld = 0
        self.notices_withheld = 0
        self.exit_check_violations = 0
        # masked Queries sent as statements prepared once per connection, and their Parses
        self.prepared = {"execution": 0, "parse": 0}
        # counted by every decision cache of every masking context (proxy.catalog)
        self.analysis_cache = CacheCounts()
        # logins refused because the rules do not match, per database (proxy.catalog)
        self.rules_refused: dict[str, int] = {}

    def reject(self, reason: str) -> None:
        self.rejected[reason] = self.rejected.get(reason, 0) + 1

    def absorb(self, session: Session, client_bytes: int, server_bytes: int) -> None:
        self.client_bytes += client_bytes
        self.server_bytes += server_bytes
        for total, counts in (
            (self.client_counts, session.client_counts),
            (self.server_counts, session.server_counts),
        ):
            for i, c in enumerate(counts):
                if c:
                    total[i] += c
        for cls, c in session.error_classes.items():
            self.error_classes[cls] = self.error_classes.get(cls, 0) + c
        mc = session.filter.counters
        if mc is not None:
            self.statements["pass"] += mc.passed
            self.statements["rewrite"] += mc.rewritten
            self.statements["refuse"] += mc.refused
            self.notifications_withheld += mc.notifications_withheld
            self.notices_withheld += mc.notices_withheld
            self.exit_check_violations += mc.exit_check_violations
            self.prepared["execution"] += mc.prepared_executions
            self.prepared["parse"] += mc.prepared_parses


class LiveSession:
    """What the collector needs from a live connection (implemented by the shell)."""

    session: Session
    client_bytes: int
    server_bytes: int


class ProxyCollector(Collector):
    def __init__(self, stats: Stats, live: Callable[[], Iterable[LiveSession]]) -> None:
        self.stats = stats
        self.live = live

    def _masking(
        self, live: list[LiveSession]
    ) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        return _masking_families(self.stats, live)

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        s = self.stats
        live = list(self.live())
        info = GaugeMetricFamily(
            "pgveil_build_info",
            "pgveil's version, and which implementation of the data path runs: mypyc "
            "(compiled) or python (PGVEIL_PURE_PYTHON=1, or not built)",
            labels=["version", "implementation"],
        )
        info.add_metric([__version__, implementation()], 1)
        yield info
        yield GaugeMetricFamily(
            "pgveil_client_connections_open", "Client connections open now", value=len(live)
        )
        yield CounterMetricFamily(
            "pgveil_client_connections",
            "Client connections accepted since start",
            value=s.connections_total,
        )
        rejected = CounterMetricFamily(
            "pgveil_client_connections_rejected",
            "Client connections refused, by reason",
            labels=["reason"],
        )
        for reason, c in sorted({"max_connections": 0, **s.rejected}.items()):
            rejected.add_metric([reason], c)
        yield rejected
        client_bytes = s.client_bytes + sum(c.client_bytes for c in live)
        server_bytes = s.server_bytes + sum(c.server_bytes for c in live)
        b = CounterMetricFamily("pgveil_bytes", "Bytes relayed, by direction", labels=["direction"])
        b.add_metric(["client_to_server"], client_bytes)
        b.add_metric(["server_to_client"], server_bytes)
        yield b
        msgs = CounterMetricFamily(
            "pgveil_messages",
            "Protocol messages relayed, by direction and type",
            labels=["direction", "type"],
        )
        for direction, totals, attr, names in (
            ("frontend", s.client_counts, "client_counts", FRONTEND_NAMES),
            ("backend", s.server_counts, "server_counts", BACKEND_NAMES),
        ):
            counts = list(totals)
            for conn in live:
                for i, v in enumerate(getattr(conn.session, attr)):
                    if v:
                        counts[i] += v
            for code, name in names.items():
                if counts[code]:
                    msgs.add_metric([direction, name], counts[code])
        yield msgs
        errors = dict(s.error_classes)
        for conn in live:
            for cls, v in conn.session.error_classes.items():
                errors[cls] = errors.get(cls, 0) + v
        e = CounterMetricFamily(
            "pgveil_server_errors",
            "ErrorResponses from the server, by SQLSTATE class",
            labels=["sqlstate_class"],
        )
        for cls, v in sorted(errors.items()):
            e.add_metric([cls], v)
        yield e
        yield CounterMetricFamily(
            "pgveil_cancel_requests", "CancelRequests forwarded", value=s.cancel_requests
        )
        yield CounterMetricFamily(
            "pgveil_client_tls_handshakes",
            "TLS handshakes completed with clients",
            value=s.tls_handshakes,
        )
        yield from self._masking(live)
        yield CounterMetricFamily(
            "pgveil_upstream_connect_failures",
            "Failed attempts to open an upstream connection",
            value=s.upstream_connect_failures,
        )


def _masking_families(
    s: Stats, live: list[LiveSession]
) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
    statements = dict(s.statements)
    withheld = s.notifications_withheld
    notices = s.notices_withheld
    violations = s.exit_check_violations
    prepared = dict(s.prepared)
    for conn in live:
        c = conn.session.filter.counters
        if c is not None:
            statements["pass"] += c.passed
            statements["rewrite"] += c.rewritten
            statements["refuse"] += c.refused
            withheld += c.notifications_withheld
            notices += c.notices_withheld
            violations += c.exit_check_violations
            prepared["execution"] += c.prepared_executions
            prepared["parse"] += c.prepared_parses
    yield CounterMetricFamily(
        "pgveil_masked_sessions", "Sessions classified as masked", value=s.masked_sessions
    )
    st = CounterMetricFamily(
        "pgveil_masked_statements",
        "Statements of masked sessions, by decision",
        labels=["decision"],
    )
    for decision, v in statements.items():
        st.add_metric([decision], v)
    yield st
    pr = CounterMetricFamily(
        "pgveil_masked_prepared",
        "Masked Queries, and Binds of the unnamed statement, sent as a statement prepared "
        "once per server connection (execution), and the Parses that prepared them (parse)",
        labels=["step"],
    )
    for step, v in prepared.items():
        pr.add_metric([step], v)
    yield pr
    cache = CounterMetricFamily(
        "pgveil_analysis_cache", "Statement analysis cache lookups", labels=["result"]
    )
    cache.add_metric(["hit"], s.analysis_cache.hits)
    cache.add_metric(["miss"], s.analysis_cache.misses)
    yield cache
    yield CounterMetricFamily(
        "pgveil_notifications_withheld",
        "Notifications withheld from masked sessions (channel without rules)",
        value=withheld,
    )
    yield CounterMetricFamily(
        "pgveil_notices_withheld",
        "DEBUG and LOG notices withheld from masked sessions (they echo statement text)",
        value=notices,
    )
    yield CounterMetricFamily(
        "pgveil_exit_check_violations",
        "Results that still carried a raw personal column (session closed)",
        value=violations,
    )


class AuditCollector(Collector):
    """The audit writer's state: queue depth, events written and dropped, failures."""

    def __init__(self, writer: Callable[[], AuditWriter | None]) -> None:
        self.writer = writer

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        w = self.writer()
        yield GaugeMetricFamily(
            "pgveil_audit_queue_depth",
            "Audit events waiting to be written",
            value=w.depth if w else 0,
        )
        yield GaugeMetricFamily(
            "pgveil_audit_failing",
            "1 while an audit sink cannot be written",
            value=1 if w is not None and w.failing else 0,
        )
        yield CounterMetricFamily(
            "pgveil_audit_events_written", "Audit events written", value=w.written if w else 0
        )
        yield CounterMetricFamily(
            "pgveil_audit_events_dropped",
            "Audit events dropped: they found the queue full (with audit_on_failure block, "
            "only events no result waits for: session start and end, refusals)",
            value=w.dropped if w else 0,
        )
        yield CounterMetricFamily(
            "pgveil_audit_write_failures",
            "Failed attempts to write to an audit sink",
            value=w.failures if w else 0,
        )


class RulesCollector(Collector):
    """The rules checked against each database's catalog (labels: database names)."""

    def __init__(self, stats: Stats, manager: Callable[[], MaskingManager | None]) -> None:
        self.stats = stats
        self.manager = manager

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        m = self.manager()
        problems = GaugeMetricFamily(
            "pgveil_rules_problems",
            "Problems of the rules against the database's catalog that refuse sessions",
            labels=["database"],
        )
        for database, n in sorted((m.problems() if m is not None else {}).items()):
            problems.add_metric([database], n)
        yield problems
        refused = CounterMetricFamily(
            "pgveil_rules_refused_sessions",
            "Logins refused because the rules do not match the database",
            labels=["database"],
        )
        for database, n in sorted(self.stats.rules_refused.items()):
            refused.add_metric([database], n)
        yield refused


class Metrics:
    def __init__(
        self,
        stats: Stats,
        live: Callable[[], Iterable[LiveSession]],
        audit: Callable[[], AuditWriter | None] = lambda: None,
        rules: Callable[[], MaskingManager | None] = lambda: None,
    ) -> None:
        self.registry = CollectorRegistry()
        self.registry.register(ProxyCollector(stats, live))
        self.registry.register(AuditCollector(audit))
        self.registry.register(RulesCollector(stats, rules))
        self.session_duration = Histogram(
            "pgveil_session_duration_seconds",
            "Lifetime of client sessions",
            buckets=(0.01, 0.1, 1, 10, 60, 600, 3600, 86400),
            registry=self.registry,
        )

    def render(self) -> bytes:
        return generate_latest(self.registry)


HealthCheck = Callable[[], Awaitable[bool]]


class MetricsServer:
    """A minimal HTTP/1.0 server for GET /metrics and GET /healthz."""

    def __init__(self, metrics: Metrics, health: HealthCheck) -> None:
        self.metrics = metrics
        self.health = health
        self._server: asyncio.Server | None = None

    async def start(self, host: str, port: int) -> None:
        self._server = await asyncio.start_server(self._handle, host, port)

    def close(self) -> None:
        if self._server is not None:
            self._server.close()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            async with asyncio.timeout(5):
                request = await reader.readuntil(b"\r\n\r\n")
            line = request.split(b"\r\n", 1)[0].decode("latin-1")
            parts = line.split()
            path = parts[1].split("?", 1)[0] if len(parts) >= 2 else ""
            if len(parts) < 2 or parts[0] not in ("GET", "HEAD"):
                status, ctype, body = "405 Method Not Allowed", "text/plain", b"GET only\n"
            elif path == "/metrics":
                status, ctype = "200 OK", "text/plain; version=0.0.4; charset=utf-8"
                body = self.metrics.render()
            elif path == "/healthz":
                started = time.monotonic()
                ok = await self.health()
                ms = int((time.monotonic() - started) * 1000)
                status = "200 OK" if ok else "503 Service Unavailable"
                ctype = "application/json"
                body = (
                    f'{{"status":"{"ok" if ok else "upstream unreachable"}",'
                    f'"upstream_reachable":{"true" if ok else "false"},"check_ms":{ms}}}\n'
                ).encode()
            else:
                status, ctype, body = "404 Not Found", "text/plain", b"try /metrics or /healthz\n"
            head = (
                f"HTTP/1.0 {status}\r\nContent-Type: {ctype}\r\n"
                f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
            ).encode()
            writer.write(head if parts and parts[0] == "HEAD" else head + body)
            await writer.drain()
        except (OSError, TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            pass
        except Exception as exc:  # never let a scrape kill the proxy
            log.error("metrics.error", error=type(exc).__name__)
        finally:
            writer.close()
