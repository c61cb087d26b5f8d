"""A running pgveil says which implementation of the data path it runs (issue 15): the
start-up log line `proxy.implementation` and the `implementation` label of
`pgveil_build_info`, for the compiled modules (the build's default) and for their Python
source (PGVEIL_PURE_PYTHON=1); and it relays a query either way.
"""

from __future__ import annotations

import json

import psycopg
import pytest

from proxy import __version__
from proxy.demo.embedded_pg import EmbeddedPostgres
from shared.implementation import PURE_ENV
from tests.conftest import SCRAM_PASSWORD, SCRAM_USER
from tests.integration.audit_wire import wait_for
from tests.support import ProxyProcess


def _entries(p: ProxyProcess, event: str) -> list[dict[str, object]]:
    found = []
    for line in p.log().splitlines():
        if line.startswith("{"):
            entry = json.loads(line)
            if entry.get("event") == event:
                found.append(entry)
    return found


@pytest.mark.parametrize(("switch", "implementation"), [("0", "mypyc"), ("1", "python")])
def test_the_proxy_says_which_implementation_runs(
    pg: EmbeddedPostgres, switch: str, implementation: str
) -> None:
    with ProxyProcess(pg.port, "--upstream-sslmode", "disable", env={PURE_ENV: switch}) as p:
        wait_for(lambda: bool(_entries(p, "proxy.listening")), "the proxy.listening log line")
        [said] = _entries(p, "proxy.implementation")
        assert said["implementation"] == implementation and said["version"] == __version__
        info = p.metric("pgveil_build_info", implementation=implementation, version=__version__)
        assert info == 1
        other = "python" if implementation == "mypyc" else "mypyc"
        assert p.metric("pgveil_build_info", implementation=other) == 0
        dsn = pg.dsn(SCRAM_USER, SCRAM_PASSWORD, port=p.port) + " sslmode=disable"
        with psycopg.connect(dsn) as c:
            assert c.execute("SELECT 41 + 1").fetchone() == (42,)
