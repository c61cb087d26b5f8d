"""audit/kinds.py: which statement kinds `audit who` leaves out, walked over every statement
class of the parser (a new class, or a new name the analyser gives one, is never hidden
without a review here), and the kinds as a person reads them."""

from __future__ import annotations

from typing import Any

import pglast.ast
import pytest

from audit import kinds
from audit.redaction import redact
from rules.analyzer import _kind

# reviewed: statements that can neither return nor change a subject's data
REVIEWED = {
    "VariableSetStmt", "VariableShowStmt", "TransactionStmt", "VacuumStmt", "CheckPointStmt",
    "ReindexStmt", "ClusterStmt", "DiscardStmt", "ListenStmt", "UnlistenStmt",
    "DeallocateStmt", "ClosePortalStmt", "LockStmt",
}  # fmt: skip
STATEMENTS = sorted(
    name
    for name in dir(pglast.ast)
    if name.endswith("Stmt") and isinstance(getattr(pglast.ast, name), type)
)


def nodes(name: str) -> list[Any]:
    cls = getattr(pglast.ast, name)
    if name == "VacuumStmt":
        return [cls(is_vacuumcmd=True), cls(is_vacuumcmd=False)]  # VACUUM, ANALYZE
    return [cls()]


def test_the_walk_sees_the_parser_statements() -> None:
    assert len(STATEMENTS) > 100 and {"DoStmt", "SelectStmt", "CopyStmt"} <= set(STATEMENTS)
    assert set(STATEMENTS) >= REVIEWED


@pytest.mark.parametrize("name", STATEMENTS)
def test_only_reviewed_statement_classes_are_left_out(name: str) -> None:
    for node in nodes(name):
        kind = _kind(node)
        hidden = kinds.cannot_carry_data({"kinds": [kind], "analysis_complete": True})
        assert hidden == (name in REVIEWED), (name, kind)


@pytest.mark.parametrize("name", STATEMENTS)
def test_no_kind_reads_as_a_parser_class_name(name: str) -> None:
    for node in nodes(name):
        text = kinds.readable(_kind(node))
        assert text and "Stmt" not in text and text == text.lower(), (name, text)


def test_what_the_recorder_names_is_never_left_out() -> None:
    for kind in ("query", "execute", "call", "function_call", "unknown", "notification", ""):
        assert not kinds.cannot_carry_data({"kinds": [kind]})
    assert not kinds.cannot_carry_data({"kinds": []})
    assert not kinds.cannot_carry_data({})
    assert not kinds.cannot_carry_data({"kinds": "set"})  # (not a list: not an event's)


def test_one_statement_not_on_the_list_keeps_the_event() -> None:
    assert kinds.cannot_carry_data({"kinds": ["set", "transaction", "vacuum"]})
    assert not kinds.cannot_carry_data({"kinds": ["set", "DoStmt"]})
    assert not kinds.cannot_carry_data({"kinds": ["transaction", "select", "transaction"]})


def test_an_event_whose_kinds_may_not_be_what_ran_is_kept() -> None:
    stopped = {"kinds": ["vacuum"], "analysis_complete": False}
    assert kinds.cannot_carry_data({**stopped, "uncertain": kinds.ANALYSIS_STOPPED + "why"})
    assert kinds.cannot_carry_data({**stopped, "uncertain": kinds.UNKNOWN_NAMES})
    for reason in (kinds.NOT_READ, kinds.FUNCTION_CALL, kinds.UNREADABLE, None, "other"):
        assert not kinds.cannot_carry_data({**stopped, "uncertain": reason}), reason
    assert not kinds.cannot_carry_data(stopped)  # (an older event: no reason recorded)


def test_a_message_that_may_carry_values_keeps_the_event() -> None:
    # a deferred foreign key's DETAIL at COMMIT, a NOTICE of an index expression in VACUUM
    assert not kinds.cannot_carry_data({"kinds": ["transaction"], "values_in_messages": True})


@pytest.mark.parametrize(
    ("sql", "expected"),
    [
        ("COPY billing.customers TO STDOUT", ["copy out"]),
        ("COPY billing.customers (name, email) FROM STDIN WITH (FORMAT csv)", ["copy in"]),
        ("COPY (SELECT name FROM billing.customers WHERE i_customer = 1) TO STDOUT", ["copy out"]),
        ("COPY \"to\" FROM '/tmp/x'", ["copy in"]),
        ("COPY a TO STDOUT; COPY b FROM STDIN", ["copy out", "copy in"]),
    ],
)
def test_copy_direction_from_the_redacted_statement(sql: str, expected: list[str]) -> None:
    count = len(expected)
    assert kinds.what(["copy"] * count, redact(sql)) == expected
    assert kinds.what(["copy"] * count) == ["copy"] * count  # no text: no guess


def test_readable_names() -> None:
    assert kinds.what(["DoStmt", "vacuum", "fetch", "function_call", "AlterTableStmt"]) == [
        "do block", "vacuum", "fetch from cursor", "function call", "alter table",
    ]  # fmt: skip
