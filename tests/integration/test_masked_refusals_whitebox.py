"""White-box attack on a masked session's refusals after the restructure (one `Masking`
filter chosen at login, protocol parsing in proxy/wire/): every refusal path must still
answer 42501 `pgveil: ...` and run nothing, over the simple and the extended protocol,
in pipelines, with COPY and cursors. Raw wire messages against the real server; where
the answer's shape follows PostgreSQL's own rules (skip until Sync after an error), the
same sequence is sent to PostgreSQL directly with a statement that fails there.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from proxy.demo.embedded_pg import EmbeddedPostgres
from proxy.wire import messages as m
from proxy.wire.errors import decode_fields, sqlstate_of
from tests.integration.audit_wire import (
    SYNC,
    Messages,
    bind,
    describe_portal,
    execute,
    parse,
    query_message,
    read_until,
)
from tests.integration.masking_fixture import leaks
from tests.support import ProxyProcess, RawClient

MASKED = "masked_trust"  # member of cc_staff: masked; trust authentication
REFUSED = "SELECT lo_get(1)"  # a function that reads data pgveil cannot mask
PERSONAL = "SELECT name FROM billing.customers ORDER BY 1"
FAILS_IN_PG = "SELECT * FROM wb14b_no_such_table"  # an error at Parse, directly


def describe_statement(name: bytes = b"") -> bytes:
    return m.message(ord("D"), b"S" + name + b"\0")


def types(got: Messages) -> list[str]:
    return [t for t, _ in got]


def refused(got: Messages) -> None:
    """Exactly pgveil's refusal, then ReadyForQuery: nothing ran, nothing was described."""
    assert types(got) == ["E", "Z"], got
    fields = decode_fields(got[0][1])
    assert fields["C"] == "42501" and fields["M"].startswith("pgveil: "), fields
    assert leaks("".join(b.decode("utf-8", "replace") for _, b in got)) == []


@pytest.fixture
def masked(billing: ProxyProcess) -> Iterator[RawClient]:
    c = RawClient(billing.port, MASKED, application_name="wb14b-refusals")
    yield c
    c.close()


def test_a_refused_named_parse_swallows_its_bind_describe_and_execute(masked: RawClient) -> None:
    masked.send_raw(
        parse(REFUSED, b"s1") + bind(b"p1", b"s1") + describe_portal(b"p1") + execute(b"p1") + SYNC
    )
    refused(read_until(masked, 1))
    # the server never had s1: a later Bind of that name fails there
    masked.send_raw(bind(b"p1", b"s1") + describe_portal(b"p1") + execute(b"p1") + SYNC)
    got = read_until(masked, 1)
    assert types(got) == ["E", "Z"] and sqlstate_of(got[0][1]) == "26000", got


def test_a_refused_unnamed_parse_does_not_run_the_previous_unnamed_statement(
    masked: RawClient,
) -> None:
    """The unnamed statement the server has is an earlier one: Bind/Execute after the
    refused Parse must not reach it (it would run what the client did not ask for)."""
    masked.send_raw(parse(PERSONAL) + SYNC)
    assert types(read_until(masked, 1)) == ["1", "Z"]
    masked.send_raw(parse(REFUSED) + bind() + describe_portal() + execute() + SYNC)
    refused(read_until(masked, 1))
    masked.send_raw(parse(REFUSED) + describe_statement() + SYNC)
    refused(read_until(masked, 1))


def test_a_refused_parse_of_an_existing_name_leaves_the_old_statement(masked: RawClient) -> None:
    masked.send_raw(parse(PERSONAL, b"s5") + SYNC)
    assert types(read_until(masked, 1)) == ["1", "Z"]
    masked.send_raw(parse(REFUSED, b"s5") + bind(b"", b"s5") + execute() + SYNC)
    refused(read_until(masked, 1))
    masked.send_raw(bind(b"", b"s5") + execute() + SYNC)
    got = read_until(masked, 1)
    assert types(got) == ["2", "D", "D", "C", "Z"], got
    assert leaks("".join(b.decode("utf-8", "replace") for _, b in got)) == []


def test_after_a_refused_parse_the_pipeline_is_skipped_until_sync_as_postgresql_does(
    pg: EmbeddedPostgres, masked: RawClient
) -> None:
    """After an error in an extended-protocol pipeline PostgreSQL skips every message,
    a simple Query and an allowed Parse/Bind/Execute included, until Sync. pgveil's
    refusal must leave the same stream: nothing of the rest runs."""
    rest = query_message("SELECT 1") + parse("SELECT 2") + bind() + execute() + SYNC
    direct = RawClient(pg.port, MASKED)
    try:
        direct.send_raw(parse(FAILS_IN_PG) + rest)
        assert types(read_until(direct, 1)) == ["E", "Z"]
        assert types(read_until(direct, 1, timeout=0.5)) == []  # (no second ReadyForQuery)
    finally:
        direct.close()
    masked.send_raw(parse(REFUSED) + rest)
    refused(read_until(masked, 1))
    assert read_until(masked, 1, timeout=0.5) == []
    assert types(masked.query("SELECT 3")) == ["T", "D", "C", "Z"]


@pytest.mark.parametrize(
    "sql",
    [
        REFUSED,
        "SELECT 1; " + REFUSED + "; SELECT 2",
        f"COPY ({REFUSED}) TO STDOUT",
        "SELECT pg_read_file('/etc/hostname')",
        "COPY (SELECT name FROM billing.customers WHERE lo_get(1) IS NULL) TO STDOUT",
    ],
    ids=["function", "multi-statement", "copy-query", "read-file", "copy-where"],
)
def test_simple_query_refusals(masked: RawClient, sql: str) -> None:
    masked.send_raw(query_message(sql))
    refused(read_until(masked, 1))


def test_a_refused_cursor_is_refused_at_declare_and_never_fetched(masked: RawClient) -> None:
    assert masked.query("BEGIN")[-1] == ("Z", b"T")
    masked.send_raw(query_message(f"DECLARE c CURSOR FOR {REFUSED}"))
    got = read_until(masked, 1)
    assert types(got) == ["E", "Z"] and got[-1][1] == b"E", got
    assert decode_fields(got[0][1])["M"].startswith("pgveil: ")
    masked.send_raw(query_message("FETCH c"))
    got = read_until(masked, 1)
    assert types(got) == ["E", "Z"] and sqlstate_of(got[0][1]) == "25P02", got
    assert masked.query("ROLLBACK")[-1] == ("Z", b"I")
    # over the extended protocol, in a transaction block
    masked.send_raw(
        query_message("BEGIN")
        + parse(f"DECLARE c2 CURSOR FOR {REFUSED}")
        + bind()
        + execute()
        + SYNC
    )
    got = read_until(masked, 2)
    assert types(got) == ["C", "Z", "E", "Z"], got
    assert decode_fields(got[2][1])["C"] == "42501"
    assert masked.query("ROLLBACK")[-1] == ("Z", b"I")


def test_copy_of_a_protected_table_is_masked_not_leaked(masked: RawClient) -> None:
    for sql in ("COPY billing.customers TO STDOUT", f"COPY ({PERSONAL}) TO STDOUT"):
        got = masked.query(sql)
        assert types(got)[0] == "H" and types(got)[-1] == "Z", got
        assert leaks("".join(b.decode("utf-8", "replace") for _, b in got)) == [], got


def test_a_refusal_in_a_pipeline_split_into_single_bytes_still_refuses(masked: RawClient) -> None:
    """The splicer (proxy/wire/splice.py) sees the pipeline in pieces as small as TCP
    allows: the refusal and the skip until Sync must not depend on where chunks end."""
    payload = parse(PERSONAL) + SYNC + parse(REFUSED, b"s9") + bind(b"p9", b"s9")
    payload += describe_portal(b"p9") + execute(b"p9") + query_message("SELECT 1") + SYNC
    for i in range(len(payload)):
        masked.sock.sendall(payload[i : i + 1])
    got = read_until(masked, 2)
    assert types(got[:2]) == ["1", "Z"], got
    refused(got[2:])
    assert read_until(masked, 1, timeout=0.5) == []


def test_a_refusal_after_an_allowed_statement_in_one_pipeline_keeps_the_order(
    masked: RawClient,
) -> None:
    """Allowed Parse/Bind/Execute, then a refused Parse, then more, one Sync: the allowed
    statement's (masked) answers first, then the refusal in its place, then nothing."""
    masked.send_raw(
        parse(PERSONAL) + bind() + execute() + parse(REFUSED) + bind() + execute() + SYNC
    )
    got = read_until(masked, 1)
    assert types(got) == ["1", "2", "D", "D", "C", "E", "Z"], got
    assert decode_fields(got[5][1])["C"] == "42501"
    assert leaks("".join(b.decode("utf-8", "replace") for _, b in got)) == []
