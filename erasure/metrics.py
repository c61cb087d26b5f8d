"""Prometheus metrics of a running erasure worker (`pgveil erase run --metrics HOST:PORT`).

Read at scrape time from the worker's run summary and its live executors: subjects by
outcome, rows changed per table, batches and the longest batch. Labels are table names
and outcome states only, never a subject key or a value.
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from erasure.worker import RunSummary

STATES = ("verified", "failed", "postponed")


class ErasureCollector(Collector):
    def __init__(self, summary: RunSummary) -> None:
        self.summary = summary

    def collect(self) -> Iterator[CounterMetricFamily | GaugeMetricFamily]:
        s = self.summary
        queued = CounterMetricFamily(
            "pgveil_erasure_subjects_queued", "Subjects found due and queued as jobs"
        )
        queued.add_metric([], s.enqueued)
        yield queued
        done = CounterMetricFamily(
            "pgveil_erasure_subjects", "Erasure jobs finished, by outcome", labels=["state"]
        )
        states = [o.state for o in s.outcomes]
        for state in STATES:
            done.add_metric([state], states.count(state))
        yield done
        rows = CounterMetricFamily(
            "pgveil_erasure_rows", "Rows changed or deleted, by table", labels=["table"]
        )
        per_table: dict[str, int] = {}
        for o in s.outcomes:
            for table, n in o.rows.items():
                per_table[table] = per_table.get(table, 0) + n
        for table, n in sorted(per_table.items()):
            rows.add_metric([table], n)
        yield rows
        batches = s.all_batch_ms()
        count = CounterMetricFamily("pgveil_erasure_batches", "Batch statements run")
        count.add_metric([], len(batches))
        yield count
        longest = GaugeMetricFamily(
            "pgveil_erasure_longest_batch_seconds",
            "The longest batch statement so far (the longest lock the worker held)",
        )
        longest.add_metric([], max(batches, default=0.0) / 1000)
        yield longest


def serve(summary: RunSummary, host: str, port: int) -> None:
    """Serve /metrics from a background thread."""
    registry = CollectorRegistry()
    registry.register(ErasureCollector(summary))
    start_http_server(port, addr=host, registry=registry)
