"""Operating pgveil: limits, graceful shutdown, reload, metrics, health, the command line."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import psycopg
import pytest

from proxy.demo.embedded_pg import EmbeddedPostgres
from tests.conftest import SCRAM_PASSWORD, SCRAM_USER
from tests.support import ProxyProcess, RawClient, errors_in


def _dsn(pg: EmbeddedPostgres, port: int) -> str:
    return pg.dsn(SCRAM_USER, SCRAM_PASSWORD, port=port) + " sslmode=disable"


def test_max_connections_gives_53300(pg: EmbeddedPostgres) -> None:
    with ProxyProcess(pg.port, "--max-connections", "2", "--upstream-sslmode", "disable") as p:
        a = psycopg.connect(_dsn(pg, p.port))
        b = psycopg.connect(_dsn(pg, p.port))
        raw = RawClient(p.port, connect=False)
        from proxy.wire import messages as m
        from proxy.wire.startup import StartupMessage

        raw.send_raw(StartupMessage(m.PROTOCOL_3_0, {"user": SCRAM_USER}).encode())
        assert [(e["S"], e["C"]) for e in errors_in(raw.until_ready())] == [("FATAL", "53300")]
        with pytest.raises(psycopg.OperationalError, match="too many clients"):
            psycopg.connect(_dsn(pg, p.port))
        a.close()
        _wait_for(lambda: p.metric("pgveil_client_connections_open") == 1)  # a's slot is free
        with psycopg.connect(_dsn(pg, p.port)) as c:
            assert c.execute("SELECT 1").fetchone() == (1,)
        b.close()
        assert p.metric("pgveil_client_connections_rejected_total", reason="max_connections") == 2


def test_graceful_shutdown_lets_transactions_finish(pg: EmbeddedPostgres) -> None:
    pg.psql("CREATE TABLE IF NOT EXISTS t_drain (v int)")
    p = ProxyProcess(pg.port, "--shutdown-timeout", "20", "--upstream-sslmode", "disable")
    idle = psycopg.connect(_dsn(pg, p.port), autocommit=True)
    busy = psycopg.connect(_dsn(pg, p.port))
    busy.execute("INSERT INTO t_drain VALUES (1)")  # transaction open
    p.signal(signal.SIGTERM)
    _wait_for(lambda: '"session.end"' in p.log())  # the idle session's
    # the idle session was ended with 57P01 ...
    with pytest.raises(psycopg.OperationalError) as info:
        idle.execute("SELECT 1")
    assert "terminating connection due to administrator command" in str(info.value)
    # ... new connections are refused ...
    with pytest.raises(psycopg.OperationalError):
        psycopg.connect(_dsn(pg, p.port), connect_timeout=3)
    # ... and the open transaction can finish
    busy.execute("INSERT INTO t_drain VALUES (2)")
    busy.commit()
    assert p.proc.wait(10) == 0
    assert pg.psql("SELECT count(*) FROM t_drain").strip() == "2"
    with pytest.raises(psycopg.OperationalError):
        busy.execute("SELECT 1")
    p.stop()


def test_shutdown_deadline_ends_stuck_sessions(pg: EmbeddedPostgres) -> None:
    p = ProxyProcess(pg.port, "--shutdown-timeout", "1", "--upstream-sslmode", "disable")
    stuck = psycopg.connect(_dsn(pg, p.port))
    stuck.execute("SELECT 1")  # BEGIN implied: in a transaction
    p.signal(signal.SIGINT)
    assert p.proc.wait(60) == 0  # with no deadline it would wait for `stuck` for ever
    with pytest.raises(psycopg.OperationalError):
        stuck.execute("SELECT 1")
    p.stop()


def test_sighup_reloads_and_keeps_old_config_when_broken(
    pg: EmbeddedPostgres, tmp_path: Path
) -> None:
    cfg = tmp_path / "pgveil.yaml"
    cfg.write_text("max_connections: 1\nupstream_sslmode: disable\n")
    with ProxyProcess(pg.port, "--config", str(cfg)) as p:
        with (
            psycopg.connect(_dsn(pg, p.port)),
            pytest.raises(psycopg.OperationalError, match="too many"),
        ):
            psycopg.connect(_dsn(pg, p.port))
        cfg.write_text("max_connections: 5\nupstream_sslmode: disable\n")
        p.signal(signal.SIGHUP)
        _wait_for(lambda: "config.reloaded" in p.log())
        with psycopg.connect(_dsn(pg, p.port)), psycopg.connect(_dsn(pg, p.port)):
            pass
        cfg.write_text("max_connections: 5\nno_such_key: 1\n")
        p.signal(signal.SIGHUP)
        _wait_for(lambda: "config.reload_failed" in p.log())
        assert "unknown key 'no_such_key'" in p.log()
        with psycopg.connect(_dsn(pg, p.port)), psycopg.connect(_dsn(pg, p.port)):
            pass  # old (reloaded) limits still in force
        assert p.alive()


def _wait_for(cond: object, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not cond():  # type: ignore[operator]
        assert time.monotonic() < deadline
        time.sleep(0.05)


def test_metrics_and_health(proxy: ProxyProcess, proxy_dsn: str) -> None:
    with psycopg.connect(proxy_dsn) as conn:
        conn.execute("SELECT 1")
        with pytest.raises(psycopg.errors.DivisionByZero):
            conn.execute("SELECT 1/0")
        conn.rollback()
        status, body = proxy.http("/metrics")
        assert status == 200
        assert proxy.metric("pgveil_client_connections_open") >= 1
    assert proxy.metric("pgveil_client_connections_total") >= 1
    assert proxy.metric("pgveil_messages_total", direction="frontend", type="Query") >= 1
    assert proxy.metric("pgveil_messages_total", direction="backend", type="ReadyForQuery") >= 1
    assert proxy.metric("pgveil_server_errors_total", sqlstate_class="22") >= 1
    assert proxy.metric("pgveil_bytes_total", direction="server_to_client") > 0
    assert proxy.metric("pgveil_session_duration_seconds_count") >= 1
    status, body = proxy.http("/healthz")
    assert status == 200 and json.loads(body)["upstream_reachable"] is True
    assert proxy.http("/nope")[0] == 404


def test_logs_are_json_and_carry_no_query_text(
    pg: EmbeddedPostgres, proxy: ProxyProcess, proxy_dsn: str
) -> None:
    canary = "canary-7f3a9c-personal"
    ended = proxy.log().count('"session.end"')
    with psycopg.connect(proxy_dsn) as conn:
        conn.execute(f"SELECT '{canary}'")
        with pytest.raises(psycopg.Error):
            conn.execute(f"SELECT '{canary}'::int")
    _wait_for(lambda: proxy.log().count('"session.end"') > ended)  # all its lines are out
    log = proxy.log()
    assert canary not in log
    for line in log.splitlines():
        entry = json.loads(line)
        assert {"ts", "level", "event"} <= set(entry)


# ---- command line ----------------------------------------------------------------------------


def _cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    import os

    return subprocess.run(
        [sys.executable, "-m", "proxy.cli", *args],
        capture_output=True,
        text=True,
        timeout=30,
        env={**os.environ, **(env or {})},
    )


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["proxy", "--listen", "nowhere"], "--listen: expected HOST:PORT"),
        (["proxy", "--bogus"], "unrecognized arguments: --bogus"),
        (["proxy", "--max-connections", "-3"], "--max-connections: must be positive"),
        (["proxy", "--upstream-sslmode", "maybe"], "--upstream-sslmode: expected one of"),
        (["proxy", "--rules", "/nonexistent/rules.yaml"], "no such file: /nonexistent/rules.yaml"),
        (["proxy", "--tls-cert", "/etc/hostname"], "tls_cert and tls_key must be given together"),
        (["proxy", "--upstream-sslmode", "verify-full"], "needs a root certificate"),
        (["frobnicate"], "invalid choice: 'frobnicate'"),
    ],
)
def test_user_errors_are_one_line_exit_2(args: list[str], message: str) -> None:
    r = _cli(*args)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("pgveil: error:"), r.stderr
    assert message in lines[0]
    assert "Traceback" not in r.stderr


def test_config_file_errors_name_file_and_key(tmp_path: Path) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text("listen: 127.0.0.1:1\nlisten_adress: x\n")
    r = _cli("proxy", "--config", str(cfg))
    assert r.returncode == 2
    assert f"{cfg}: unknown key 'listen_adress'" in r.stderr
    cfg.write_text("max_connections: lots\n")
    r = _cli("proxy", "--config", str(cfg))
    assert r.returncode == 2 and f"{cfg}: key 'max_connections'" in r.stderr
    r = _cli("proxy", "--config", str(tmp_path / "missing.yaml"))
    assert r.returncode == 2 and "cannot read config file" in r.stderr
    r = _cli("proxy", env={"PGVEIL_CONNECT_TIMEOUT": "soon"})
    assert r.returncode == 2 and "PGVEIL_CONNECT_TIMEOUT" in r.stderr


def test_listen_address_in_use_is_a_clean_error(proxy: ProxyProcess, pg: EmbeddedPostgres) -> None:
    r = _cli("proxy", "--listen", f"127.0.0.1:{proxy.port}", "--upstream", f"127.0.0.1:{pg.port}")
    assert r.returncode == 2
    assert "Traceback" not in r.stderr and "address already in use" in r.stderr.lower()


def test_check_config(pg: EmbeddedPostgres) -> None:
    r = _cli("proxy", "--check-config", "--upstream", f"127.0.0.1:{pg.port}")
    assert r.returncode == 0 and "reachable" in r.stdout
    r = _cli("proxy", "--check-config", "--upstream", "127.0.0.1:1")
    assert r.returncode == 1 and "UNREACHABLE" in r.stdout


def test_version() -> None:
    r = _cli("--version")
    assert r.returncode == 0 and r.stdout.startswith("pgveil ")
