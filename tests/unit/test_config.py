"""Configuration: precedence, strictness, and the README reference stays in sync."""

from __future__ import annotations

from pathlib import Path

import pytest

from proxy.config import (
    ConfigError,
    load_config,
    parse_size,
    reference_table,
)
from shared.address import HostPort, parse_host_port


def test_precedence_flags_over_env_over_file(tmp_path: Path) -> None:
    f = tmp_path / "c.yaml"
    f.write_text("listen: 0.0.0.0:1111\nmax_connections: 10\nconnect_timeout: 9\n")
    env = {"PGVEIL_MAX_CONNECTIONS": "20", "PGVEIL_CONNECT_TIMEOUT": "3"}
    cfg = load_config({"connect_timeout": "1.5"}, env, f)
    assert cfg.listen == HostPort("0.0.0.0", 1111)
    assert cfg.max_connections == 20
    assert cfg.connect_timeout == 1.5
    assert cfg.upstream == HostPort("127.0.0.1", 5432)


def test_config_file_from_env_and_proxy_section(tmp_path: Path) -> None:
    f = tmp_path / "c.yaml"
    f.write_text("proxy:\n  max_connections: 7\n")
    assert load_config({}, {"PGVEIL_CONFIG": str(f)}).max_connections == 7


@pytest.mark.parametrize(
    ("text", "error"),
    [
        ("listen: [1, 2]\n", "key 'listen'"),
        ("- a\n", "must be a mapping"),
        ("a: b: c\n", "invalid YAML"),
        ("tcp_keepalive: maybe\n", "expected true or false"),
        ("max_message_size: 12XB\n", "expected a size"),
        # a key given twice is an error, not the last one winning
        ("listen: 0.0.0.0:1\nlisten: 0.0.0.0:2\n", r"c.yaml:2 at 'listen': duplicate key"),
        ("proxy:\n  max_connections: 7\n  max_connections: 8\n", "at 'proxy.max_connections'"),
    ],
)
def test_file_errors(tmp_path: Path, text: str, error: str) -> None:
    f = tmp_path / "c.yaml"
    f.write_text(text)
    with pytest.raises(ConfigError, match=error):
        load_config({}, {}, f)


def test_parsers() -> None:
    assert parse_host_port("[::1]:5432") == HostPort("::1", 5432)
    assert str(HostPort("::1", 1)) == "[::1]:1"
    assert parse_size("64MB") == 64 * 1024 * 1024
    assert parse_size(1000) == 1000
    for bad in ("host", "host:0", ":5432", "h:99999"):
        with pytest.raises(ValueError):
            parse_host_port(bad)


def test_readme_reference_matches_code() -> None:
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    assert reference_table() in readme, (
        "regenerate with: python -c 'from proxy.config import reference_table; print(reference_table())'"
    )
