"""A cancel through pgveil has landed when the client sees its cancel connection close.

libpq (PQcancel) and asyncpg send the CancelRequest on a connection of its own and take the
server's close of that connection to mean "the cancel is done": they send the next query
right after. PostgreSQL closes it once it has signalled the backend, and a backend that is
idle then drops the cancel. pgveil used to close the client's cancel connection as soon as
it had started forwarding the request, so a cancel of a statement that had just finished
landed on the next one (issue 16: 11 of 20 times; 0 of 20 directly). Each test cancels an
idle session many times, each time followed at once by a short statement that a late cancel
would kill; directly against PostgreSQL none is killed, through pgveil none may be.
"""

from __future__ import annotations

import asyncio

import psycopg

from proxy.demo.embedded_pg import EmbeddedPostgres
from tests.conftest import SCRAM_PASSWORD, SCRAM_USER
from tests.support import ProxyProcess

ROUNDS = 20
# long enough that a cancel still on its way when it starts lands inside it
NEXT_STATEMENT = "SELECT pg_sleep(0.05), 1"


def test_libpq_cancel_has_landed_before_the_next_query(proxy_dsn: str, proxy: ProxyProcess) -> None:
    before = proxy.metric("pgveil_cancel_requests_total")
    killed = 0
    with psycopg.connect(proxy_dsn, autocommit=True) as conn:
        for _ in range(ROUNDS):
            conn.cancel()  # PQcancel: returns when the cancel connection is closed
            try:
                assert conn.execute(NEXT_STATEMENT).fetchone() == ("", 1)
            except psycopg.errors.QueryCanceled:
                killed += 1
    assert killed == 0, f"{killed} of {ROUNDS} statements were killed by an earlier cancel"
    assert proxy.metric("pgveil_cancel_requests_total") - before == ROUNDS


async def test_asyncpg_cancel_has_landed_before_the_next_query(
    pg: EmbeddedPostgres, proxy: ProxyProcess
) -> None:
    import asyncpg
    from asyncpg import connect_utils

    conn = await asyncpg.connect(
        host="127.0.0.1",
        port=proxy.port,
        user=SCRAM_USER,
        password=SCRAM_PASSWORD,
        database="postgres",
        ssl=False,
    )
    killed = 0
    try:
        for _ in range(ROUNDS):
            # asyncpg's own cancel, as its timeouts send it: it waits for the close
            await connect_utils._cancel(
                loop=asyncio.get_running_loop(),
                addr=conn._addr,
                params=conn._params,
                backend_pid=conn._protocol.backend_pid,
                backend_secret=conn._protocol.backend_secret,
            )
            try:
                assert await conn.fetchval(NEXT_STATEMENT, column=1) == 1
            except asyncpg.QueryCanceledError:
                killed += 1
    finally:
        await conn.close()
    assert killed == 0, f"{killed} of {ROUNDS} statements were killed by an earlier cancel"
