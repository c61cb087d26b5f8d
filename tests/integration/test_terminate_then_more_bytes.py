"""A Terminate that is not the last message of its chunk. The recording filter now reads
Terminate from the scanner's last type, so a chunk with bytes after its Terminate no longer
closes the session at once. That is safe only if the server never runs what follows a
Terminate: these tests prove it against PostgreSQL in the two states where the server does
not simply exit at a Terminate's arrival. While it skips to Sync after an extended-protocol
error, SocketBackend clears ignore_till_sync for a Terminate (it exits); during COPY FROM
STDIN a Terminate is an 08P01 error and the session ends ("protocol synchronization was
lost"). Either way no row of the query behind it reaches the client, masked or not, and a
split chunk (the Terminate last) ends the session as before.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from proxy.demo.embedded_pg import EmbeddedPostgres
from proxy.wire import messages as m
from proxy.wire.errors import severity_of
from tests.conftest import TRUST_USER
from tests.integration.audit_wire import (
    SYNC,
    audited_proxy,
    events,
    parse,
    query_message,
    read_until,
    wait_for,
)
from tests.integration.masking_fixture import NAME
from tests.support import ProxyProcess, RawClient

MASKED_USER = "masked_trust"  # masked (member of cc_staff), trust authentication
TERMINATE = m.message(ord("X"))
READ = "SELECT name FROM billing.customers ORDER BY i_customer"


@pytest.fixture(scope="module")
def shared(
    pg: EmbeddedPostgres, billing: ProxyProcess, tmp_path_factory: Any
) -> Iterator[tuple[ProxyProcess, Path]]:
    with audited_proxy(pg, tmp_path_factory.mktemp("terminate-more")) as shared_proxy:
        yield shared_proxy


def _send(port: int, user: str, app: str, payload: bytes) -> list[tuple[str, bytes]]:
    c = RawClient(port, user, application_name=app)
    try:
        c.send_raw(payload)
        return read_until(c, 2, timeout=30)
    finally:
        c.close()


def _rows(got: list[tuple[str, bytes]]) -> int:
    return sum(1 for t, _ in got if t == "D")


@pytest.mark.parametrize("split", [False, True])
def test_a_query_after_an_ignored_terminate_is_audited_with_its_rows(
    shared: tuple[ProxyProcess, Path], split: bool
) -> None:
    p, path = shared
    app = f"term-more-{int(split)}"
    head = parse("SELEC 1") + TERMINATE
    tail = SYNC + query_message(READ)
    c = RawClient(p.port, TRUST_USER, application_name=app)
    try:
        if split:  # the Terminate ends its chunk: the session closes after it
            c.send_raw(head)
            c.send_raw(tail)
        else:
            c.send_raw(head + tail)
        got = read_until(c, 2, timeout=30)
    finally:
        c.close()
    rows = _rows(got)
    # PostgreSQL does not skip a Terminate while it skips to Sync: the session ends there
    assert rows == 0 and (split or severity_of(got[-1][1]) == "FATAL"), got
    if rows:
        wait_for(
            lambda: any(e["outcome"] not in ("running",) for e in events(path, app)),
            "the event of the query after the Terminate",
        )
        done = [e for e in events(path, app) if e["outcome"] != "running"]
        assert len(done) == 1, done
        assert done[0]["rows"] == rows, (done, rows)
        assert done[0]["subjects"].get("billing.customers"), done
    else:
        # the session ended at the Terminate: nothing was delivered
        assert all(t != "D" for t, _ in got), got


def test_a_masked_query_after_an_ignored_terminate_gets_no_value(
    shared: tuple[ProxyProcess, Path],
) -> None:
    p, _ = shared
    got = _send(
        p.port,
        MASKED_USER,
        "term-more-masked",
        parse("SELEC 1") + TERMINATE + SYNC + query_message(READ),
    )
    assert NAME.encode() not in b"".join(b for _, b in got), got


def _copy_in(c: RawClient) -> None:
    c.send_raw(query_message("CREATE TEMP TABLE sink (x int)"))
    assert read_until(c, 1)[-1][0] == "Z"
    c.send_raw(query_message("COPY sink FROM STDIN"))
    c.sock.settimeout(30)
    typ, _ = c.recv_message()
    assert typ == "G", typ


@pytest.mark.parametrize("user", [TRUST_USER, MASKED_USER])
def test_a_query_after_a_terminate_during_copy_in_is_audited_or_never_answered(
    shared: tuple[ProxyProcess, Path], user: str
) -> None:
    """During COPY FROM STDIN the server answers a Terminate with an error (08P01,
    unexpected message type) and goes on: the Query behind it in the same chunk runs."""
    p, path = shared
    app = f"term-copy-{user}"
    c = RawClient(p.port, user, application_name=app)
    try:
        _copy_in(c)
        c.send_raw(TERMINATE + query_message(READ))
        got = read_until(c, 2, timeout=30)
    finally:
        c.close()
    rows = _rows(got)
    assert NAME.encode() not in b"".join(b for _, b in got) or user == TRUST_USER
    # PostgreSQL ends the session: "protocol synchronization was lost" after the 08P01
    assert rows == 0 and got and got[-1][0] == "E", got
    assert severity_of(got[-1][1]) == "FATAL", got
    if rows:
        wait_for(
            lambda: any(
                e["outcome"] != "running" and "billing.customers" in e["subjects"]
                for e in events(path, app)
            ),
            "the event of the query after the Terminate",
        )
        done = [
            e
            for e in events(path, app)
            if e["outcome"] != "running" and "billing.customers" in e["subjects"]
        ]
        assert len(done) == 1, done
        assert done[0]["rows"] == rows, (done, rows)
