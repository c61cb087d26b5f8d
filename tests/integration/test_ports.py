"""The test harness itself when the free port it picked is taken before the server binds it.

CI runs two suites side by side, each starting hundreds of servers and making thousands of
outgoing connections: a port `free_port()` handed out can be taken by the time PostgreSQL
or pgveil binds it (CI once lost 457 tests that way, every one behind a session fixture
whose pgveil found its port in use). Both starters pick another port then, and a port a
foreign process listens on is never taken for the started server's own. Here the collision
is made certain: the first port handed out is one this test listens on.
"""

from __future__ import annotations

import socket
from collections.abc import Iterator

import psycopg
import pytest

import proxy.demo.embedded_pg as embedded_pg
import tests.support as support
from proxy.demo.embedded_pg import EmbeddedPostgres
from tests.support import ProxyProcess, listens


@pytest.fixture
def taken() -> Iterator[socket.socket]:
    """A port this test listens on (and never accepts), handed out first."""
    with socket.create_server(("127.0.0.1", 0)) as s:
        yield s


def hand_out_first(monkeypatch: pytest.MonkeyPatch, module: object, *ports: int) -> list[int]:
    """`module.free_port` hands out `ports` first (in order), then really free ones; the
    list returned holds those not handed out yet."""
    real = embedded_pg.free_port
    handed = list(reversed(ports))
    monkeypatch.setattr(
        module, "free_port", lambda host="127.0.0.1": handed.pop() if handed else real(host)
    )
    return handed


def test_postgres_moves_to_another_port(
    taken: socket.socket, monkeypatch: pytest.MonkeyPatch
) -> None:
    port = taken.getsockname()[1]
    handed = hand_out_first(monkeypatch, embedded_pg, port)
    cluster = EmbeddedPostgres().start()
    try:
        assert not handed and cluster.port != port
        assert cluster.psql("SHOW port").strip() == str(cluster.port)
        assert b"Address already in use" in (cluster.datadir / "server.log").read_bytes()
    finally:
        cluster.cleanup()


def test_postgres_does_not_move_off_a_port_it_was_given(taken: socket.socket) -> None:
    cluster = EmbeddedPostgres(port=taken.getsockname()[1])
    try:
        with pytest.raises(embedded_pg.EmbeddedPostgresError):
            cluster.start()
    finally:
        cluster.cleanup()


def test_pgveil_moves_to_another_port(
    pg: EmbeddedPostgres, taken: socket.socket, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The listener on the taken port accepts connections (into its backlog): a harness
    that only tried to connect would take it for pgveil and hand the test a dead port."""
    port = taken.getsockname()[1]
    handed = hand_out_first(monkeypatch, support, port)
    with ProxyProcess(pg.port, "--upstream-sslmode", "disable") as p:
        assert not handed and p.port != port and listens(p.proc.pid, p.port)
        with psycopg.connect(pg.dsn(port=p.port), sslmode="disable") as conn:
            assert conn.execute("SELECT 1").fetchone() == (1,)


def test_pgveil_moves_its_metrics_port_too(
    pg: EmbeddedPostgres, taken: socket.socket, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The metrics port is bound after the listening port: pgveil listens, then exits."""
    port = taken.getsockname()[1]
    handed = hand_out_first(monkeypatch, support, embedded_pg.free_port(), port)
    with ProxyProcess(pg.port, "--upstream-sslmode", "disable") as p:
        assert not handed and p.metrics_port != port
        assert p.http("/healthz")[0] == 200
