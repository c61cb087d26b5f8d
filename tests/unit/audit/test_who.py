"""`audit who` over events as pgveil writes them: what it must list, and what it may leave
out only when the event proves the subject was not read."""

from __future__ import annotations

from typing import Any

from proxy.cli.audit import who

CUSTOMERS = "billing.customers"
ACCOUNTS = "billing.accounts"


def access(**fields: Any) -> dict[str, Any]:
    event: dict[str, Any] = {
        "type": "access",
        "ts": "2026-01-01T00:00:00.000000Z",
        "session": "s1",
        "kinds": ["select"],
        "tables": [CUSTOMERS],
        "outcome": "ok",
        "rows": 1,
        "subjects_complete": True,
        "analysis_complete": True,
    }
    event.update(fields)
    return event


def touched(event: dict[str, Any], table: str = CUSTOMERS, subject: str = "1") -> list[str]:
    return [r["touched"] for r in who([event], table, subject, None, None)]


def test_an_unanalysed_event_is_listed_under_tables_it_does_not_name() -> None:
    partial = access(
        tables=[ACCOUNTS],
        subjects={ACCOUNTS: ["10"]},
        subjects_complete=False,
        analysis_complete=False,
    )
    assert touched(partial, CUSTOMERS, "1") == ["possibly"]
    assert touched(partial, ACCOUNTS, "10") == ["yes"]
    assert touched(partial, ACCOUNTS, "20") == ["possibly"]
    # even one that (wrongly) claims complete subjects: they were judged over its tables
    claims = access(tables=[ACCOUNTS], subjects_complete=True, analysis_complete=False)
    assert touched(claims, CUSTOMERS) == ["possibly"] and touched(claims, ACCOUNTS) == ["possibly"]
    none = access(tables=[], analysis_complete=False, subjects_complete=False)
    assert touched(none, ACCOUNTS, "10") == ["possibly"]


def test_an_analysed_event_on_other_tables_is_not_listed() -> None:
    assert touched(access(tables=[ACCOUNTS], subjects_complete=False)) == []


def test_a_running_event_that_is_uncertain_is_listed_everywhere() -> None:
    running = access(
        tables=[ACCOUNTS], outcome="running", rows=None, running=1, analysis_complete=False
    )
    assert touched(running) == ["possibly"]


def test_an_outcome_pgveil_did_not_see_is_an_access() -> None:
    assert touched(access(outcome="unknown", subjects_complete=False)) == ["possibly"]


def test_reads_through_a_view_count_for_the_tables_behind_it() -> None:
    through = access(
        views={"billing.customer_contacts": [CUSTOMERS]},
        subjects={CUSTOMERS: ["2"]},
        subjects_total={CUSTOMERS: 1},
    )
    assert touched(through, CUSTOMERS, "2") == ["yes"]
    assert touched(through, CUSTOMERS, "1") == []  # the rows were subject 2's only
    # asked by the view's name: the subjects of the tables behind it
    assert touched(through, "billing.customer_contacts", "2") == ["yes"]
    assert touched(through, "billing.customer_contacts", "1") == []
    unkeyed = access(views={"billing.customer_contacts": [CUSTOMERS]}, subjects_complete=False)
    assert touched(unkeyed, "billing.customer_contacts", "1") == ["possibly"]
    assert touched(unkeyed, ACCOUNTS, "1") == []


def test_notifications_are_listed_everywhere_unless_withheld() -> None:
    delivered = access(
        kinds=["notification"], channel="invoice_events", tables=[], decision="passed",
        subjects_complete=False,
    )  # fmt: skip
    assert touched(delivered) == ["possibly"] and touched(delivered, ACCOUNTS) == ["possibly"]
    withheld = {**delivered, "decision": "withheld"}
    assert touched(withheld) == []


def test_the_report_says_through_what_and_how_sure(capsys: Any) -> None:
    from proxy.cli.audit import print_who

    events = [
        access(views={"billing.customer_contacts": [CUSTOMERS]}, subjects={CUSTOMERS: ["1"]}),
        access(tables=[], analysis_complete=False, subjects_complete=False),
        access(
            kinds=["notification"], channel="invoice_events", tables=[], decision="passed",
            subjects_complete=False,
        ),
    ]  # fmt: skip
    print_who(who(events, CUSTOMERS, "1", None, None), "table")
    lines = capsys.readouterr().out.splitlines()
    assert "yes" in lines[1] and "select via billing.customer_contacts" in lines[1]
    assert "possibly" in lines[2] and "select (uncertain)" in lines[2]
    assert "possibly" in lines[3] and "notification invoice_events" in lines[3]
    assert lines[-1] == "(3 event(s))"
