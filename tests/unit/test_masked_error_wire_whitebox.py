"""White-box attack on the ErrorResponse / NoticeResponse that pgveil builds since the wire
modules were split (proxy/wire/errors.py), and on the masked filter's rebuilding of the
server's errors (MaskedFilter._error): field order as at fb826e8, a server message
without its final terminator, a value holding a NUL."""

from __future__ import annotations

import pytest

from proxy.wire import messages as m
from proxy.wire.errors import decode_fields, encode_fields, error_body, error_response
from proxy.wire.simple import ready_for_query
from tests.unit.test_masked_errors import Session


def _body(message: bytes) -> bytes:
    assert message[5:] and len(message) == int.from_bytes(message[1:5], "big") + 1
    return message[5:]


def _query(sql: str) -> bytes:
    return m.message(ord("Q"), sql.encode() + b"\0")


def test_pgveils_own_error_has_the_field_order_it_had_before_the_split() -> None:
    """S, V, C, M, then D and H, then one terminator (fb826e8's messages._fields)."""
    assert error_body("42501", "pgveil: x", detail="d", hint="h") == (
        b"SERROR\0VERROR\0C42501\0Mpgveil: x\0Dd\0Hh\0\0"
    )
    assert _body(error_response("42501", "pgveil: x")) == b"SERROR\0VERROR\0C42501\0Mpgveil: x\0\0"


def test_encoded_fields_keep_their_order_and_end_with_one_terminator() -> None:
    fields = {"M": "m", "S": "ERROR", "C": "XX000", "V": "ERROR"}
    body = _body(encode_fields(m.ERROR_RESPONSE, fields))
    assert body == b"Mm\0SERROR\0CXX000\0VERROR\0\0"
    assert list(decode_fields(body)) == ["M", "S", "C", "V"]


@pytest.mark.parametrize("build", ["encode_fields", "error_body"])
def test_a_value_holding_a_nul_cannot_add_fields_of_its_own(build: str) -> None:
    """A NUL inside a value would end its field early: what follows it would be read by
    the client as fields of their own (a 'D' detail, a second 'M'), or end the message.
    The message must keep exactly the fields it was given."""
    value = "pgveil: x\0Dforged detail\0\0"
    if build == "encode_fields":
        body = _body(encode_fields(m.ERROR_RESPONSE, {"S": "ERROR", "C": "42501", "M": value}))
        expected = ["S", "C", "M"]
    else:
        body = error_body("42501", value)
        expected = ["S", "V", "C", "M"]
    assert body.endswith(b"\0\0") and body.count(b"\0\0") == 1, body
    fields = decode_fields(body)
    assert list(fields) == expected, fields
    assert "forged detail" not in "".join(v for k, v in fields.items() if k != "M")


def test_a_server_error_without_its_final_terminator_reaches_a_masked_client_whole() -> None:
    """The server's ErrorResponse lacks the terminating NUL after its last field (a
    message PostgreSQL never sends, read leniently as before the split): the masked
    client gets a well-formed message with the scrubbed fields."""
    s = Session()
    s.send(_query("SELECT 1"))
    unterminated = m.message(ord("E"), b"SERROR\0VERROR\0C22012\0Mdivision by zero\0")
    out = s.filter.server(s.server, unterminated + ready_for_query(ord("I")))
    assert out.endswith(ready_for_query(ord("I")))
    error = out[: -len(ready_for_query(ord("I")))]
    body = _body(error)
    assert body.endswith(b"\0\0")
    assert decode_fields(body) == {
        "S": "ERROR", "V": "ERROR", "C": "22012", "M": "division by zero"
    }  # fmt: skip


def test_server_error_fields_out_of_order_are_scrubbed_all_the_same() -> None:
    """Fields in another order than PostgreSQL's (M first, D between): the detail is still
    judged (withheld), unknown codes dropped, and the order kept."""
    s = Session()
    s.send(_query("SELECT 1"))
    raw = b"Mduplicate key\0DKey (email)=(secret@example.org) already exists.\0qX\0C23505\0"
    raw += b"SERROR\0VERROR\0\0"
    (fields,) = s.answer(m.message(ord("E"), raw), ready_for_query(ord("I")))
    assert list(fields)[:1] == ["M"] and "q" not in fields
    assert "secret@example.org" not in "".join(fields.values()), fields
