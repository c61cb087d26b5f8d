"""`pgveil audit who` over statement outcomes: which failed, unknown and split
events it lists for a subject, and which it leaves out (the events as the statement log
writes them: see tests/integration/test_audit_evasion_outcomes.py for them made by a real
session)."""

from __future__ import annotations

from typing import Any

from proxy.cli.audit import who

TABLE = "billing.customers"


def access(**fields: Any) -> dict[str, Any]:
    event = {
        "type": "access", "ts": "2026-12-01T00:00:00.000000Z", "session": "s", "role": "r",
        "tables": [TABLE], "outcome": "ok", "rows": 0, "subjects_complete": False,
    }  # fmt: skip
    event.update(fields)
    return event


def listed(*events: dict[str, Any], subject: str = "1") -> list[tuple[str, Any]]:
    return [(r["touched"], r["outcome"]) for r in who(events, TABLE, subject, None, None)]


def test_a_failed_statement_is_listed_when_something_may_have_reached_the_client() -> None:
    # failed before anything went out, with an error known to show nothing: not listed
    assert listed(access(outcome="22012", subjects_complete=True)) == []
    # rows sent before the error
    assert listed(access(outcome="22012", rows=1)) == [("possibly", "22012")]
    # an error that may carry values (a cast error, a DETAIL)
    assert listed(access(outcome="22P02", values_in_messages=True)) == [("possibly", "22P02")]
    # in flight when the session ended
    assert listed(access(outcome="unknown", rows=None, may_have_committed=True)) == [
        ("possibly", "unknown")
    ]


def test_subjects_named_by_an_unknown_write_decide_for_or_against_the_subject() -> None:
    event = access(
        outcome="unknown", rows=None, subjects={TABLE: ["2"]}, subjects_total={TABLE: 1},
        subjects_complete=True, may_have_committed=True,
    )  # fmt: skip
    assert listed(event, subject="2") == [("yes", "unknown")]
    assert listed(event, subject="1") == []


def test_both_parts_of_a_split_query_are_listed() -> None:
    committed = access(outcome="ok", rows=1, statements=[1, 2])
    rest = access(outcome="22P02", rows=0, statements=[3, 3], values_in_messages=True)
    assert listed(committed, rest) == [("possibly", "ok"), ("possibly", "22P02")]
