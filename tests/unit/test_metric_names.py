"""The names pgveil exports follow Prometheus's rules: no two families share a name they
expose (a gauge named as a counter without `_total` makes the two one family to a scraper
that strips the suffix), and every counter's samples end in `_total`. Over every family of
the proxy's registry and the erasure worker's."""

from __future__ import annotations

from prometheus_client import CollectorRegistry
from prometheus_client.metrics_core import Metric

from erasure.metrics import ErasureCollector
from erasure.worker import RunSummary
from proxy.metrics import Metrics, Stats

# the sample names each type of family exposes besides its own name
SUFFIXES = {
    "counter": ("_total", "_created"),
    "gauge": (),
    "histogram": ("_bucket", "_count", "_sum", "_created"),
    "summary": ("_count", "_sum", "_created"),
    "info": ("_info",),
}


def _families() -> list[Metric]:
    erasure = CollectorRegistry()
    erasure.register(ErasureCollector(RunSummary()))
    proxy = Metrics(Stats(), lambda: []).registry
    return [*proxy.collect(), *erasure.collect()]


def test_no_gauge_is_named_as_a_counter() -> None:
    families = _families()
    counters = {f.name for f in families if f.type == "counter"}
    gauges = {f.name for f in families if f.type == "gauge"}
    assert "pgveil_client_connections" in counters  # (what the test is about)
    assert "pgveil_client_connections_open" in gauges
    assert not gauges & counters, gauges & counters
    assert not {g for g in gauges if g.endswith("_total")}


def test_no_two_families_expose_the_same_name() -> None:
    seen: dict[str, str] = {}
    for family in _families():
        assert family.name.startswith("pgveil_"), family.name
        for name in (family.name, *(family.name + s for s in SUFFIXES[family.type])):
            assert name not in seen, f"{name}: {family.name} and {seen[name]}"
            seen[name] = family.name


def test_counter_samples_end_in_total() -> None:
    for family in _families():
        if family.type == "counter":
            names = {s.name for s in family.samples}
            assert names <= {family.name + "_total", family.name + "_created"}, names
