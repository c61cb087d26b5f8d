"""White-box attacks on rules reloads under open sessions (README "Rules and catalog
changes under open sessions"): a masked role opens a statement, portal or cursor under
rules that show a column, the rules then protect it, and the role tries to make the old
one run anyway, through a name pgveil's picture has lost or reads otherwise than the
server.

The rules and the scratch table are those of tests/integration/test_rules_change_open_sessions.py:
under rules A `billing.rr_scratch.secret` is shown as stored, under rules B it is masked.
Nothing read under rules B may carry the hidden part of the secret.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from proxy.demo.embedded_pg import EmbeddedPostgres
from proxy.wire import messages as m
from proxy.wire.errors import decode_fields
from tests.integration.audit_wire import SYNC, bind, execute, parse, read_until
from tests.integration.test_rules_change_open_sessions import (
    HIDDEN,
    RULES_A,
    RULES_B,
    SCRATCH,
    SECRET,
    Proxy,
    scratch,  # noqa: F401
)
from tests.support import RawClient

BY_KEY = f"SELECT secret FROM {SCRATCH} WHERE id = 1"
Messages = list[tuple[str, bytes]]


def query(sql: str) -> bytes:
    return m.message(m.QUERY, sql.encode() + b"\0")


def nothing_hidden(got: Messages) -> bool:
    return HIDDEN.encode() not in b"".join(body for _, body in got)


@pytest.fixture
def proxy(pg: EmbeddedPostgres, tmp_path: Path) -> Iterator[Proxy]:
    p = Proxy(pg, tmp_path, RULES_A)
    yield p
    p.close()


@pytest.fixture
def masked_client(proxy: Proxy) -> Iterator[RawClient]:
    c = RawClient(proxy.port, user="masked_trust")
    yield c
    c.close()


def send(c: RawClient, *messages: bytes) -> Messages:
    c.send_raw(b"".join(messages))
    return read_until(c, sum(1 for x in messages if x[0] in (m.SYNC, m.QUERY)))


def test_an_empty_query_keeps_the_unnamed_portal(proxy: Proxy, masked_client: RawClient) -> None:
    """A Query with no statement (`;`) creates no portal: the server keeps the unnamed
    portal bound before it in a transaction block. If pgveil dropped it from its picture,
    an Execute of it after the rules change would meet no name to check, and run the
    statement rewritten under the old rules."""
    c = masked_client
    got = send(c, query("BEGIN"), parse(BY_KEY, b"wb_s"), bind(b"", b"wb_s"), SYNC)
    assert [t for t, _ in got if t == "E"] == []
    assert [t for t, _ in send(c, query(";"))] == ["I", "Z"]  # EmptyQueryResponse
    proxy.reload(RULES_B)
    got = send(c, execute(), SYNC)
    assert nothing_hidden(got), got
    assert SECRET.encode() not in b"".join(body for _, body in got)


def test_a_suspended_fetch_portal_is_checked_against_the_cursor_it_read(
    proxy: Proxy, masked_client: RawClient
) -> None:
    """A portal of `FETCH ALL c` read its cursor at its first Execute and hands out the
    rest at the next ones. Declared anew over nothing after the reload, `c` would pass the
    check of the FETCH's text; the rows come from the old cursor, decided under rules A."""
    c = masked_client
    declare = f"DECLARE wb_c CURSOR FOR SELECT 'first' UNION ALL SELECT secret FROM {SCRATCH}"
    got = send(c, query("BEGIN"), query(declare))
    assert [t for t, _ in got if t == "E"] == []
    got = send(c, parse("FETCH ALL wb_c", b"wb_f"), bind(b"wb_fp", b"wb_f"),
               execute(b"wb_fp", 1), SYNC)  # fmt: skip
    assert [t for t, _ in got] == ["1", "2", "D", "s", "Z"], got
    proxy.reload(RULES_B)
    got = send(c, query("CLOSE wb_c"), query("DECLARE wb_c CURSOR FOR SELECT 'harmless'"))
    assert [t for t, _ in got if t == "E"] == []
    got = send(c, execute(b"wb_fp"), SYNC)
    assert nothing_hidden(got), got
    assert [decode_fields(b)["C"] for t, b in got if t == "E"] == ["42501"]
