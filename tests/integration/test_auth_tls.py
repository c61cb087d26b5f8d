"""Authentication is relayed end to end (trust, password, md5, SCRAM) and TLS works on both
legs: clients to pgveil, pgveil to the server."""

from __future__ import annotations

from collections.abc import Iterator

import asyncpg
import psycopg
import pytest

from proxy.demo.embedded_pg import EmbeddedPostgres
from tests.conftest import (
    CLEAR_PASSWORD,
    CLEAR_USER,
    MD5_PASSWORD,
    MD5_USER,
    SCRAM_PASSWORD,
    SCRAM_USER,
    TRUST_USER,
    Certs,
)
from tests.support import ProxyProcess


@pytest.mark.parametrize(
    ("user", "password"),
    [
        (SCRAM_USER, SCRAM_PASSWORD),
        (MD5_USER, MD5_PASSWORD),
        (CLEAR_USER, CLEAR_PASSWORD),
        (TRUST_USER, None),
    ],
)
def test_every_auth_method_relayed(
    pg: EmbeddedPostgres, proxy: ProxyProcess, user: str, password: str | None
) -> None:
    dsn = pg.dsn(user, password or "", port=proxy.port) + " sslmode=disable"
    with psycopg.connect(dsn) as conn:
        assert conn.execute("SELECT current_user").fetchone() == (user,)


@pytest.mark.parametrize("user", [SCRAM_USER, MD5_USER, CLEAR_USER])
def test_wrong_password_gets_the_servers_error(
    pg: EmbeddedPostgres, proxy: ProxyProcess, user: str
) -> None:
    for port in (pg.port, proxy.port):
        with pytest.raises(psycopg.OperationalError) as info:
            psycopg.connect(pg.dsn(user, "wrong", port=port) + " sslmode=disable")
        assert "password authentication failed" in str(info.value)


def test_tls_from_client_verified_against_test_ca(
    pg: EmbeddedPostgres, proxy: ProxyProcess, certs: Certs
) -> None:
    dsn = (
        pg.dsn(SCRAM_USER, SCRAM_PASSWORD, port=proxy.port)
        + f" sslmode=verify-full sslrootcert={certs.ca}"
    )
    with psycopg.connect(dsn) as conn:
        assert conn.pgconn.ssl_in_use
        assert conn.execute("SELECT count(*) FROM generate_series(1, 50000)").fetchone() == (50000,)
        # the proxy's leg to the server is plain in this fixture
        assert conn.execute(
            "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()"
        ).fetchone() == (False,)


async def test_tls_from_asyncpg(pg: EmbeddedPostgres, proxy: ProxyProcess, certs: Certs) -> None:
    import ssl

    ctx = ssl.create_default_context(cafile=str(certs.ca))
    conn = await asyncpg.connect(
        host="127.0.0.1",
        port=proxy.port,
        user=MD5_USER,
        password=MD5_PASSWORD,
        database="postgres",
        ssl=ctx,
    )
    try:
        assert await conn.fetchval("SELECT 40 + 2") == 42
    finally:
        await conn.close()


def test_no_tls_configured_answers_n(pg: EmbeddedPostgres) -> None:
    with ProxyProcess(pg.port, "--upstream-sslmode", "disable", metrics=False) as p:
        with psycopg.connect(
            pg.dsn(SCRAM_USER, SCRAM_PASSWORD, port=p.port) + " sslmode=prefer"
        ) as conn:
            assert not conn.pgconn.ssl_in_use
        with pytest.raises(psycopg.OperationalError, match="does not support SSL"):
            psycopg.connect(pg.dsn(SCRAM_USER, SCRAM_PASSWORD, port=p.port) + " sslmode=require")


@pytest.fixture(scope="module")
def tls_upstream_proxy(pg: EmbeddedPostgres, certs: Certs) -> Iterator[ProxyProcess]:
    p = ProxyProcess(
        pg.port,
        "--tls-cert",
        str(certs.cert),
        "--tls-key",
        str(certs.key),
        "--upstream-sslmode",
        "verify-full",
        "--upstream-sslrootcert",
        str(certs.ca),
        metrics=False,
    )
    yield p
    p.stop()


@pytest.mark.parametrize("user,password", [(SCRAM_USER, SCRAM_PASSWORD), (MD5_USER, MD5_PASSWORD)])
@pytest.mark.parametrize("binding", ["prefer", "require", "disable"])
def test_tls_both_legs_with_the_servers_certificate_keeps_channel_binding(
    pg: EmbeddedPostgres,
    tls_upstream_proxy: ProxyProcess,
    certs: Certs,
    user: str,
    password: str,
    binding: str,
) -> None:
    # pgveil presents the server's own certificate here, so tls-server-end-point channel
    # binding computed by the client verifies at the server.
    dsn = (
        pg.dsn(user, password, port=tls_upstream_proxy.port)
        + f" sslmode=verify-full sslrootcert={certs.ca}"
    )
    if user == MD5_USER and binding == "require":
        with pytest.raises(psycopg.OperationalError, match="channel binding"):
            psycopg.connect(dsn + " channel_binding=require")
        return
    with psycopg.connect(dsn + f" channel_binding={binding}") as conn:
        assert conn.pgconn.ssl_in_use
        assert conn.execute(
            "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()"
        ).fetchone() == (True,)


def test_tls_both_legs_with_another_certificate_explains_channel_binding(
    pg: EmbeddedPostgres, certs: Certs
) -> None:
    import trustme

    ca = trustme.CA()
    leaf = ca.issue_cert("127.0.0.1")
    cert, key, ca_path = (
        certs.dir / "proxy-only.crt",
        certs.dir / "proxy-only.key",
        certs.dir / "proxy-ca.pem",
    )
    leaf.cert_chain_pems[0].write_to_path(str(cert))
    leaf.private_key_pem.write_to_path(str(key))
    ca.cert_pem.write_to_path(str(ca_path))
    with ProxyProcess(
        pg.port,
        "--tls-cert",
        str(cert),
        "--tls-key",
        str(key),
        "--upstream-sslmode",
        "require",
        metrics=False,
    ) as p:
        dsn = (
            pg.dsn(SCRAM_USER, SCRAM_PASSWORD, port=p.port)
            + f" sslmode=verify-full sslrootcert={ca_path}"
        )
        with pytest.raises(psycopg.OperationalError) as info:
            psycopg.connect(dsn + " channel_binding=prefer")
        assert "pgveil cannot relay SCRAM channel binding" in str(info.value)
        assert "channel_binding=disable" in str(info.value)
        with psycopg.connect(dsn + " channel_binding=disable") as conn:
            assert conn.execute(
                "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()"
            ).fetchone() == (True,)
        # md5 has no channel binding: unaffected
        with psycopg.connect(
            pg.dsn(MD5_USER, MD5_PASSWORD, port=p.port)
            + f" sslmode=verify-full sslrootcert={ca_path}"
        ):
            pass


def test_upstream_verify_full_rejects_wrong_ca(
    pg: EmbeddedPostgres, certs: Certs, tmp_path: object
) -> None:
    import trustme

    other = trustme.CA()
    path = f"{certs.dir}/other-ca.pem"
    other.cert_pem.write_to_path(path)
    with ProxyProcess(
        pg.port, "--upstream-sslmode", "verify-full", "--upstream-sslrootcert", path, metrics=False
    ) as p:
        with pytest.raises(psycopg.OperationalError) as info:
            psycopg.connect(pg.dsn(SCRAM_USER, SCRAM_PASSWORD, port=p.port) + " sslmode=disable")
        assert "TLS handshake failed" in str(info.value)
        assert info.value.sqlstate in (None, "08006")
