"""White-box cases of a masked session's names after the context was replaced, without
sockets (the sessions of tests/unit/test_prepared_after_rules_change.py): a use of a
statement or portal name that pgveil's picture lacks (Bind, Execute, SQL EXECUTE; a cursor
FETCH may read one an allow-listed function opened, which pgveil never sees).

The server refuses such a use, unless the picture missed what it holds (each way found so
far is fixed and has its case in tests/integration/test_attack_names_whitebox.py and
test_attack_reload_whitebox.py). Where the picture is wrong, the name holds what was
decided under some context since the session began: once that context is replaced, the use
is refused by pgveil (42501) rather than left to a server that may run it.
"""

from __future__ import annotations

from proxy.session.masked import RULES_CHANGED
from proxy.wire import messages as m
from proxy.wire.simple import ready_for_query
from tests.unit.test_prepared_after_rules_change import (
    NOTES,
    RULES_B,
    SYNC,
    Session,
    bind,
    execute,
    missing,
    parse,
    query,
    tokens,
)


def refused(s: Session, token: str, what: str = "prepared statement") -> bool:
    errors = s.answer(missing(token, what), ready_for_query())
    return [(e["C"], e["M"]) for e in errors] == [("42501", f"pgveil: {RULES_CHANGED}")]


def test_before_any_replacement_a_missing_name_is_the_servers_to_answer() -> None:
    s = Session()
    request = bind("wb_none") + execute("wb_nothing") + SYNC
    assert s.send(request) == request
    assert s.send(query("EXECUTE wb_none")) == query("EXECUTE wb_none")


def test_a_bind_of_a_statement_pgveil_does_not_hold_is_refused_after_a_reload() -> None:
    s = Session()
    s.reload(RULES_B)
    out = s.send(bind("wb_none"), execute(), SYNC)
    (token,) = tokens(out)
    assert out[:1] == b"B" and refused(s, token)


def test_an_execute_of_a_portal_pgveil_does_not_hold_is_refused_after_a_reload() -> None:
    s = Session()
    s.reload(RULES_B)
    out = s.send(execute("wb_nothing"), SYNC)
    (token,) = tokens(out)
    assert out[:1] == b"E" and refused(s, token, "portal")


def test_sql_execute_of_a_statement_pgveil_does_not_hold_is_refused_after_a_reload() -> None:
    s = Session()
    s.reload(RULES_B)
    out = s.send(query("EXECUTE wb_none"))
    (token,) = tokens(out)
    assert out == query(token)
    # a cursor pgveil does not hold may be one an allow-listed function opened: the
    # server's to answer
    assert s.send(query("FETCH ALL wb_nothing")) == query("FETCH ALL wb_nothing")


def test_statements_prepared_earlier_in_the_same_text_go_on() -> None:
    """`PREPARE p ...; EXECUTE p` in one Query: the statement is decided with the text,
    under the current context; an EXECUTE before the PREPARE is not."""
    s = Session()
    s.reload(RULES_B)
    sql = "PREPARE wb_p AS SELECT 1; EXECUTE wb_p"
    assert s.send(query(sql)) == query(sql)
    s.answer(m.message(m.COMMAND_COMPLETE, b"PREPARE\0"))
    s.answer(m.message(m.COMMAND_COMPLETE, b"SELECT 1\0"), ready_for_query())
    out = s.send(query("EXECUTE wb_q; PREPARE wb_q AS SELECT 1"))
    assert len(tokens(out)) == 1


def test_names_the_picture_holds_are_checked_as_before() -> None:
    """A statement parsed after the reload is current: its uses go on."""
    s = Session()
    s.reload(RULES_B)
    out = s.send(parse(NOTES, "wb_s"), bind("wb_s"), execute(), SYNC)
    assert not tokens(out) and b"FROM (SELECT" in out
