"""ErrorResponse and NoticeResponse fields decode to what was encoded."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from proxy.wire import messages as m
from proxy.wire.errors import (
    decode_fields,
    encode_fields,
    error_body,
    error_response,
    notice_response,
    severity_of,
    sqlstate_of,
)
from tests.unit.wire.strategies import body_of, text

code = st.characters(min_codepoint=1, max_codepoint=127)
sqlstate = st.text("0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ", min_size=5, max_size=5)


@given(fields=st.dictionaries(code, text, max_size=12), notice=st.booleans())
def test_fields_round_trip(fields: dict[str, str], notice: bool) -> None:
    typ = m.NOTICE_RESPONSE if notice else m.ERROR_RESPONSE
    assert decode_fields(body_of(encode_fields(typ, fields), typ)) == fields


@given(
    state=sqlstate,
    msg=text,
    severity=st.sampled_from(["ERROR", "FATAL", "PANIC"]),
    detail=st.none() | text.filter(bool),
    hint=st.none() | text.filter(bool),
)
def test_an_error_response_round_trips(
    state: str, msg: str, severity: str, detail: str | None, hint: str | None
) -> None:
    body = body_of(
        error_response(state, msg, severity=severity, detail=detail, hint=hint), m.ERROR_RESPONSE
    )
    assert body == error_body(state, msg, severity=severity, detail=detail, hint=hint)
    expected = {"S": severity, "V": severity, "C": state, "M": msg}
    if detail:
        expected["D"] = detail
    if hint:
        expected["H"] = hint
    assert decode_fields(body) == expected
    assert sqlstate_of(body) == state
    assert severity_of(body) == severity


@given(state=sqlstate, msg=text)
def test_a_notice_response_round_trips(state: str, msg: str) -> None:
    body = body_of(notice_response(state, msg), m.NOTICE_RESPONSE)
    assert decode_fields(body) == {"S": "NOTICE", "V": "NOTICE", "C": state, "M": msg}


def test_sqlstate_of_reads_only_the_code_field() -> None:
    assert sqlstate_of(b"C22012\0Mx\0\0") == "22012"
    assert sqlstate_of(b"Mx\0\0") == ""
