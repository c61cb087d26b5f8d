"""The deployment files stay true to the code: their commands parse with pgveil's own
command line, their settings load with its own config loader, and the Grafana dashboard
asks only for metrics that pgveil exports."""

from __future__ import annotations

import configparser
import json
import re
import shlex
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client import CollectorRegistry, generate_latest

from erasure.metrics import ErasureCollector
from erasure.worker import RunSummary
from proxy.cli import build_parser
from proxy.config import BY_NAME, load_config
from proxy.demo.runner import parse_dsn
from proxy.metrics import Metrics, Stats
from rules.loader import load_rules

ROOT = Path(__file__).resolve().parents[2]


def _exported_metric_names() -> set[str]:
    """Sample names of a fresh proxy's /metrics, and the families declared without samples
    yet (labelled counters before their first increment)."""
    text = Metrics(Stats(), lambda: [], lambda: None).render().decode()
    # and the erasure worker's (pgveil erase run --metrics)
    registry = CollectorRegistry()
    registry.register(ErasureCollector(RunSummary()))
    text += generate_latest(registry).decode()
    names = {line.split("{")[0].split(" ")[0] for line in text.splitlines() if line[:1] != "#"}
    for name, kind in re.findall(r"^# TYPE (pgveil_[a-z_]+) (\w+)", text, re.M):
        # the TYPE line names counters with or without _total, by client library version
        names.add(name + "_total" if kind == "counter" and not name.endswith("_total") else name)
    return names


def test_dashboard_queries_only_exported_metrics() -> None:
    dash = json.loads((ROOT / "deploy/grafana-dashboard.json").read_text())
    exprs = [t["expr"] for p in dash["panels"] for t in p.get("targets", [])]
    exprs += [v.get("definition", "") for v in dash["templating"]["list"]]
    used = {m for e in exprs for m in re.findall(r"\bpgveil_[a-z_]+", e)}
    exported = _exported_metric_names()
    assert used and used <= exported, used - exported
    # the families operators watch: connections, throughput, refusals, audit health
    for needed in (
        "pgveil_client_connections_open",
        "pgveil_client_connections_rejected_total",
        "pgveil_bytes_total",
        "pgveil_masked_statements_total",
        "pgveil_audit_queue_depth",
        "pgveil_audit_failing",
        "pgveil_audit_write_failures_total",
        "pgveil_erasure_subjects_total",
        "pgveil_erasure_rows_total",
    ):
        assert needed in used, needed
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))
    for p in dash["panels"]:
        if p["type"] != "row":
            assert p["datasource"]["uid"] == "${datasource}", p["title"]
            assert all('instance=~"$instance"' in t["expr"] for t in p["targets"]), p["title"]


def _compose() -> dict[str, Any]:
    doc = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    assert isinstance(doc, dict)
    return doc


def test_compose_runs_the_demo_and_the_erasure_worker() -> None:
    services = _compose()["services"]
    assert set(services) == {"postgres", "pgveil", "erasure"}
    assert services["postgres"]["image"].startswith("postgres:15")
    pgveil, erasure = services["pgveil"], services["erasure"]
    assert pgveil["build"] == "." and erasure["image"] == pgveil["image"]
    ns = build_parser().parse_args(pgveil["command"])
    assert ns.command == "demo" and ns.keep and ns.reuse
    target = parse_dsn(ns.dsn)
    db_env = services["postgres"]["environment"]
    assert (target.host, target.port, target.database) == ("postgres", 5432, db_env["POSTGRES_DB"])
    assert pgveil["environment"]["PGPASSWORD"] == db_env["POSTGRES_PASSWORD"]
    listen_port = ns.listen.rpartition(":")[2]
    metrics_port = ns.metrics.rpartition(":")[2]
    published = {p.rpartition(":")[2] for p in pgveil["ports"]}
    assert {listen_port, metrics_port} == published
    assert f":{metrics_port}/healthz" in " ".join(pgveil["healthcheck"]["test"])
    command = erasure["command"]
    assert command[:5] == ["erase", "run", "--config", "/etc/pgveil/erasure.yaml", "--dsn"]
    assert parse_dsn(command[5]).database == target.database
    assert any(v.endswith(":/etc/pgveil/erasure.yaml:ro") for v in erasure["volumes"])


def test_dockerfile_copies_every_package_and_runs_the_cli() -> None:
    text = (ROOT / "Dockerfile").read_text()
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    packages = [
        p.rstrip("*") for p in pyproject["tool"]["setuptools"]["packages"]["find"]["include"]
    ]
    for pkg in packages:
        assert re.search(rf"^COPY {pkg} \./{pkg}$", text, re.M), pkg
    assert 'ENTRYPOINT ["pgveil"]' in text
    cmd = json.loads(re.search(r"^CMD (\[.*\])$", text, re.M).group(1))  # type: ignore[union-attr]
    assert build_parser().parse_args(cmd).command == "proxy"


def test_systemd_unit_is_hardened_and_runs_the_proxy() -> None:
    unit = configparser.ConfigParser(strict=False, interpolation=None)
    unit.optionxform = str  # type: ignore[assignment,method-assign]
    unit.read_string((ROOT / "deploy/pgveil.service").read_text())
    svc = unit["Service"]
    argv = shlex.split(svc["ExecStart"])
    assert argv[0].endswith("/pgveil")
    assert build_parser().parse_args(argv[1:]).command == "proxy"
    assert svc["DynamicUser"] == "yes" and svc["NoNewPrivileges"] == "yes"
    assert "audit-key:/etc/pgveil/audit.key" in (ROOT / "deploy/pgveil.service").read_text()
    assert svc["ProtectSystem"] == "strict" and svc["CapabilityBoundingSet"] == ""
    # the stop timeout leaves room for the drain (shutdown_timeout)
    assert float(svc["TimeoutStopSec"]) > float(BY_NAME["shutdown_timeout"].default)
    assert unit["Install"]["WantedBy"] == "multi-user.target"


def test_kubernetes_example_loads_with_pgveil_itself(tmp_path: Path) -> None:
    docs = {d["kind"]: d for d in yaml.safe_load_all((ROOT / "deploy/kubernetes.yaml").read_text())}
    assert set(docs) == {"ConfigMap", "Deployment", "Service", "PodDisruptionBudget"}
    files = docs["ConfigMap"]["data"]
    pod = docs["Deployment"]["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    ns = build_parser().parse_args(container["args"])
    assert ns.command == "proxy" and str(ns.config).startswith("/etc/pgveil/")
    # the ConfigMap's settings and rules are valid for this version of pgveil
    rules = tmp_path / "rules.yaml"
    rules.write_text(files["rules.yaml"])
    settings = yaml.safe_load(files["pgveil.yaml"])
    assert settings["rules"] == "/etc/pgveil/rules.yaml"
    config_file = tmp_path / "pgveil.yaml"
    config_file.write_text(yaml.safe_dump({**settings, "rules": str(rules)}))
    env = {
        "PGVEIL_CATALOG_PASSWORD": "x",
        "PGVEIL_HASH_KEY": "k" * 32,
        "PGVEIL_AUDIT_SEAL_KEY": "a" * 64,
    }
    config = load_config({}, environ=env, config_file=config_file)
    assert config.audit_key is not None and config.audit_key.ref == "PGVEIL_AUDIT_SEAL_KEY"
    assert load_rules(rules, environ=env).masked_roles == {"helpdesk"}
    secret_envs = {e["name"] for e in container["env"]}
    assert {"PGVEIL_CATALOG_PASSWORD", "PGVEIL_HASH_KEY", "PGVEIL_AUDIT_SEAL_KEY"} <= secret_envs
    assert pod["terminationGracePeriodSeconds"] > config.shutdown_timeout
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"postgres": config.listen.port, "metrics": config.metrics.port}  # type: ignore[union-attr]
    targets = {p["targetPort"] for p in docs["Service"]["spec"]["ports"]}
    assert targets <= set(ports)
    assert container["securityContext"]["readOnlyRootFilesystem"] is True


@pytest.mark.parametrize("path", ["docker-compose.yml", "deploy/kubernetes.yaml"])
def test_deploy_files_hold_no_real_looking_secrets(path: str) -> None:
    text = (ROOT / path).read_text()
    for m in re.findall(r"(?i)password\S*:\s*(\S+)", text):
        assert "sandbox" in m or m.startswith(("{", "...")), m


def test_compose_erasure_config_is_the_demo_one_and_loads() -> None:
    from erasure.loader import parse_config
    from proxy.demo.billing import erasure_yaml

    text = (ROOT / "deploy" / "erasure.yaml").read_text()
    assert text.endswith(erasure_yaml(None))
    config = parse_config(text, "deploy/erasure.yaml")
    assert config.audit.stdout and config.audit.file is None


def test_one_metrics_port_everywhere_and_no_exporters(capsys: pytest.CaptureFixture[str]) -> None:
    """The demo's default metrics port is the one every deployment file and the README use,
    and it is outside the ranges Prometheus's "Default port allocations" gives to its own
    components (9090-9099) and to exporters (9100-9999, full, continued above 10000), and
    below Linux's ephemeral ports."""
    from proxy.demo.runner import DEFAULT_METRICS

    port = DEFAULT_METRICS.port
    assert not 9090 <= port < 11000 and 1024 < port < 32768
    for path in ("Dockerfile", "docker-compose.yml", "deploy/kubernetes.yaml",
                 "deploy/pgveil.service", "README.md"):  # fmt: skip
        text = (ROOT / path).read_text()
        assert re.search(rf"\b(127\.0\.0\.1|0\.0\.0\.0):{port}\b", text), path
    with pytest.raises(SystemExit):
        build_parser().parse_args(["demo", "--help"])
    assert f":{port})" in capsys.readouterr().out
