"""What `pgveil erase` shows a person (erasure.report): the progress line, the summary line
by table kind, the dry run's table with its totals, the status report and error classes."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from erasure.loader import parse_config
from erasure.report import (
    JobLine,
    VacuumReport,
    dry_run_table,
    duration,
    error_class,
    progress_line,
    status_lines,
    summary_line,
    table_kinds,
)
from tests.unit.erasure.fakes import EXAMPLE

CONFIG = parse_config(EXAMPLE, "erasure.yaml")


@pytest.mark.parametrize(
    ("seconds", "text"),
    [(0, "0s"), (59.4, "59s"), (60, "1m 00s"), (3599, "59m 59s"), (3600, "1h 00m"),
     (90061, "1d 01h")],
)  # fmt: skip
def test_durations(seconds: float, text: str) -> None:
    assert duration(seconds) == text


def test_progress_line() -> None:
    line = progress_line(120, 250, 31_204, 15.0, 200)
    assert line.startswith("erasing [")
    assert "  120/250 subjects   48%  31,204 rows  8.0 subjects/s  2,080 rows/s  ETA 16s" in line
    bar = line[line.index("[") + 1 : line.index("]")]
    assert len(bar) == 40 and bar.count("#") == 19  # 48% of 40, rounded down
    # nothing done yet: no rate to estimate from; done: nothing left
    assert progress_line(0, 250, 0, 3.0, 200).endswith("ETA --")
    assert progress_line(250, 250, 9, 3.0, 200).endswith("ETA 0s")
    assert "[" + "#" * 40 + "]" in progress_line(250, 250, 9, 3.0, 200)
    # a narrow terminal: the bar shrinks to 10, the line is cut to the width
    narrow = progress_line(1, 4, 2, 1.0, 60)
    assert len(narrow) == 60 and "[##--------]" in narrow


def test_summary_line_by_table_kind() -> None:
    assert table_kinds(CONFIG) == {
        "billing.customers": "subject",
        "billing.accounts": "updated",
        "billing.xdrs": "kept",
        "billing.call_recordings": "deleted",
    }
    rows = [
        {"billing.customers": 1, "billing.accounts": 2, "billing.xdrs": 1000,
         "billing.call_recordings": 3},
        {"billing.customers": 1, "billing.accounts": 0, "billing.xdrs": 2000,
         "billing.call_recordings": 0},
    ]  # fmt: skip
    vacuum = VacuumReport("run", done=3, locked=0, not_allowed=1, failed=0, seconds=0.5)
    line = summary_line(CONFIG, 2, ["verified", "failed"], rows, vacuum, 75.2)
    assert line == (
        "erasure: 2 subject(s) queued; 1 verified, 1 failed, 0 postponed; rows: 2 subject "
        "rows anonymised, 2 updated, 3 deleted, 3,000 kept with identifiers nulled "
        "(billing.xdrs); VACUUM of 3 table(s), 1 skipped (the role may not vacuum them: "
        "owner needed); 1m 15s"
    )
    off = VacuumReport("off", 0, 0, 0, 0, 0.0)
    assert "; no VACUUM (worker.vacuum: off); 0s" in summary_line(CONFIG, 0, [], [], off, 0)
    stopping = VacuumReport("run", done=2, locked=1, not_allowed=0, failed=1, seconds=1, left=3)
    assert summary_line(CONFIG, 0, [], [], stopping, 0).endswith(
        "; VACUUM of 2 table(s), 1 skipped (in use by another VACUUM or DDL), 1 failed, "
        "3 left to autovacuum (stopping); 0s"
    )
    idle = VacuumReport("run", 0, 0, 0, 0, 0.0)
    assert "no VACUUM (nothing changed)" in summary_line(CONFIG, 0, [], [], idle, 0)


def test_dry_run_table_has_a_column_per_table_and_totals() -> None:
    result = [
        ("4", [("billing.xdrs", 60), ("billing.call_recordings", 4), ("billing.accounts", 2),
               ("billing.customers", 1)]),
        ("12", [("billing.xdrs", 0), ("billing.call_recordings", 0), ("billing.accounts", 2),
                ("billing.customers", 1)]),
    ]  # fmt: skip
    lines = dry_run_table(CONFIG, result)
    assert [line.split() for line in lines[:-1]] == [
        ["SUBJECT", "customers", "accounts", "xdrs", "call_recordings", "TOTAL"],
        ["4", "1", "2", "60", "4", "67"],
        ["12", "1", "2", "0", "0", "3"],
        ["TOTAL", "2", "4", "60", "4", "70"],
    ]
    assert lines[-1] == "dry run: 2 subject(s), 70 row(s); nothing was changed"
    # numbers right-aligned under their header
    assert len({len(line) for line in lines[:-1]}) == 1
    assert dry_run_table(CONFIG, []) == ["dry run: 0 subject(s), 0 row(s); nothing was changed"]


def test_dry_run_headers_keep_the_schema_where_names_clash() -> None:
    text = EXAMPLE.replace("  billing.call_recordings:", "  archive.xdrs:", 1)
    config = parse_config(text, "e.yaml")
    header = dry_run_table(config, [("1", [])])[0].split()
    assert header == ["SUBJECT", "customers", "accounts", "billing.xdrs", "archive.xdrs", "TOTAL"]


@pytest.mark.parametrize(
    ("error", "cls"),
    [
        (None, ""),
        ("verification failed: billing.accounts.mac: 2 row(s) still hold a value, "
         "billing.xdrs.cli: 5 row(s) still hold a value",
         "verification failed (billing.accounts.mac, billing.xdrs.cli)"),
        ("billing.xdrs: QueryCanceledError (57014)", "QueryCanceledError (57014) in billing.xdrs"),
        ("billing.xdrs: LockNotAvailableError (55P03); gave up after 5 attempts",
         "LockNotAvailableError (55P03) in billing.xdrs; gave up"),
        ("verification: CheckViolationError (23514)",
         "CheckViolationError (23514) in verification"),
    ],
)  # fmt: skip
def test_error_classes(error: str | None, cls: str) -> None:
    assert error_class(error) == cls


def test_status_lines() -> None:
    due = datetime(2026, 3, 1, tzinfo=UTC)
    lines = status_lines(
        {"pending": 1, "verified": 240, "failed": 3},
        2,
        [
            ("running", 0, "UPDATED", []),
            ("oldest pending", 3, "WAITING", [
                JobLine("12", due, 40 * 86400, 0, "due, not queued yet"),
                JobLine("7", due, -3600, 1, ""),
            ]),
            ("oldest failed", 3, "FAILED", [JobLine("24", due, 300, 2, "verification failed")]),
        ],
    )  # fmt: skip
    assert lines == [
        "jobs: 3 pending (2 due, not queued yet), 0 running, 0 done, 240 verified, 3 failed",
        "oldest pending (the oldest 2 of 3):",
        "  SUBJECT  DUE                     WAITING  ATTEMPTS  NOTE",
        "  12       2026-03-01 00:00:00Z    40d 00h         0  due, not queued yet",
        "  7        2026-03-01 00:00:00Z  in 1h 00m         1",
        "oldest failed (the oldest 1 of 3):",
        "  SUBJECT  DUE                   FAILED  ATTEMPTS  NOTE",
        "  24       2026-03-01 00:00:00Z  5m 00s         2  verification failed",
    ]
