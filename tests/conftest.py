"""Session fixtures: one real PostgreSQL cluster (initdb into a temp dir, SCRAM, TLS on, a
free port) and one pgveil proxy in front of it.

If no PostgreSQL can be started the run fails loudly with the reason: integration tests are
never skipped.
"""

from __future__ import annotations

import os
import pwd
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import trustme
from hypothesis import HealthCheck, settings

from proxy.demo.embedded_pg import EmbeddedPostgres, EmbeddedPostgresError
from tests.support import ProxyProcess

pytest_plugins = ["tests.tmpdir_guard"]  # a run leaves nothing in the temporary directory

# no wall-time bound on a hypothesis example or its generation: a loaded machine is slow,
# not wrong (a test's own @settings may still say otherwise)
settings.register_profile("pgveil", deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("pgveil")

SCRAM_USER, SCRAM_PASSWORD = "scram_user", "scram-secret-1"


async def scram_asyncpg(port: int) -> Any:
    """An asyncpg connection as the SCRAM user to `postgres` on `port` (no TLS)."""
    import asyncpg  # (imported where used: most tests never need it)

    return await asyncpg.connect(
        host="127.0.0.1",
        port=port,
        user=SCRAM_USER,
        password=SCRAM_PASSWORD,
        database="postgres",
        ssl=False,
    )


MD5_USER, MD5_PASSWORD = "md5_user", "md5-secret-1"
CLEAR_USER, CLEAR_PASSWORD = "clear_user", "clear-secret-1"
TRUST_USER = "trust_user"


@dataclass
class Certs:
    dir: Path
    ca: Path
    cert: Path
    key: Path


@pytest.fixture(scope="session")
def certs() -> Iterator[Certs]:
    d = Path(tempfile.mkdtemp(prefix="pgveil-certs-"))
    ca = trustme.CA()
    leaf = ca.issue_cert("127.0.0.1", "localhost")
    ca.cert_pem.write_to_path(str(d / "ca.pem"))
    leaf.cert_chain_pems[0].write_to_path(str(d / "server.crt"))
    leaf.private_key_pem.write_to_path(str(d / "server.key"))
    os.chmod(d / "server.key", 0o600)
    if os.geteuid() == 0:
        pw = pwd.getpwnam("postgres")
        os.chmod(d, 0o755)
        os.chown(d / "server.key", pw.pw_uid, pw.pw_gid)
        os.chown(d / "server.crt", pw.pw_uid, pw.pw_gid)
    yield Certs(d, d / "ca.pem", d / "server.crt", d / "server.key")
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(scope="session")
def pg(certs: Certs) -> Iterator[EmbeddedPostgres]:
    hba = [
        f"host all {TRUST_USER} 127.0.0.1/32 trust",
        "host all masked_trust 127.0.0.1/32 trust",
        f"host all {MD5_USER} 127.0.0.1/32 md5",
        f"host all {CLEAR_USER} 127.0.0.1/32 password",
    ]
    settings = {
        "ssl": "on",
        "ssl_cert_file": f"'{certs.cert}'",
        "ssl_key_file": f"'{certs.key}'",
    }
    try:
        cluster = EmbeddedPostgres(settings=settings, hba=hba).start()
    except EmbeddedPostgresError as exc:
        pytest.fail(f"cannot start PostgreSQL for the integration tests: {exc}", pytrace=False)
    try:
        cluster.psql(
            f"""
            CREATE ROLE {TRUST_USER} LOGIN SUPERUSER;
            CREATE ROLE {SCRAM_USER} LOGIN PASSWORD '{SCRAM_PASSWORD}';
            CREATE ROLE {CLEAR_USER} LOGIN PASSWORD '{CLEAR_PASSWORD}';
            SET password_encryption = 'md5';
            CREATE ROLE {MD5_USER} LOGIN PASSWORD '{MD5_PASSWORD}';
            GRANT pg_read_all_data, pg_write_all_data TO {SCRAM_USER}, {MD5_USER}, {CLEAR_USER};
            """
        )
        yield cluster
    finally:
        cluster.cleanup()


@pytest.fixture(scope="session")
def proxy(pg: EmbeddedPostgres, certs: Certs) -> Iterator[ProxyProcess]:
    """pgveil with TLS for clients, plain TCP to the server."""
    p = ProxyProcess(
        pg.port,
        "--tls-cert",
        str(certs.cert),
        "--tls-key",
        str(certs.key),
        "--upstream-sslmode",
        "disable",
    )
    yield p
    p.stop()
    assert "Traceback" not in p.log(), p.log()


@pytest.fixture(scope="session")
def direct_dsn(pg: EmbeddedPostgres) -> str:
    return pg.dsn(SCRAM_USER, SCRAM_PASSWORD) + " sslmode=disable"


@pytest.fixture(scope="session")
def proxy_dsn(pg: EmbeddedPostgres, proxy: ProxyProcess) -> str:
    return pg.dsn(SCRAM_USER, SCRAM_PASSWORD, port=proxy.port) + " sslmode=disable"
