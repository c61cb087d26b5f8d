"""What `pgveil erase` shows a person: the progress line, the run's summary line, the dry
run's table and the status report, as text.

Pure formatting of counts, table names, subject keys, times and error classes (a
SQLSTATE's exception name and code, the table it happened in): no I/O, no SQL, and never
a value of a row (the worker hands it none).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

from erasure.model import ErasureConfig

# -- progress ------------------------------------------------------------------------------


def duration(seconds: float) -> str:
    """`45s`, `3m 05s`, `2h 07m`, `3d 04h`: two units at most (an age, an ETA)."""
    s = round(seconds)
    if s < 60:
        return f"{s}s"
    m, s = divmod(s, 60)
    if m < 60:
        return f"{m}m {s:02d}s"
    h, m = divmod(m, 60)
    if h < 24:
        return f"{h}h {m:02d}m"
    d, h = divmod(h, 24)
    return f"{d}d {h:02d}h"


def _rate(n: float, seconds: float) -> str:
    per_s = n / seconds if seconds > 0 else 0.0
    return f"{per_s:,.1f}" if per_s < 100 else f"{per_s:,.0f}"


def progress_line(done: int, total: int, rows: int, seconds: float, width: int) -> str:
    """`erasing [#####-----]  120/250 subjects  48%  31,204 rows  8.1 subjects/s  ETA 16s`,
    cut to `width` columns (the bar takes what the numbers leave, at least 10)."""
    total = max(total, done)
    share = done / total if total else 1.0
    eta = "--"
    if done and total > done and seconds > 0:
        eta = duration((total - done) * seconds / done)
    elif total and done >= total:
        eta = "0s"
    numbers = (
        f"  {done:,}/{total:,} subjects  {share:4.0%}  {rows:,} rows  "
        f"{_rate(done, seconds)} subjects/s  {_rate(rows, seconds)} rows/s  ETA {eta}"
    )
    bar_width = max(10, min(40, width - len(numbers) - len("erasing []")))
    filled = int(bar_width * share)
    line = f"erasing [{'#' * filled}{'-' * (bar_width - filled)}]{numbers}"
    return line[: max(width, 20)]


# -- the run's summary ---------------------------------------------------------------------


@dataclass(frozen=True)
class VacuumReport:
    """What VACUUM after erasure did (erasure.executor.Vacuumed's lists, counted)."""

    mode: str  # run, job, off
    done: int
    locked: int
    not_allowed: int
    failed: int
    seconds: float
    left: int = 0  # the worker was stopping


def table_kinds(config: ErasureConfig) -> dict[str, str]:
    """Each configured table's kind, for the summary: `subject` (the subject table's rows,
    kept and anonymised), `deleted`, `kept` (a large table whose rows stay with the
    identifying columns nulled: xDRs and the like), `updated` (other tables)."""
    kinds = {}
    for spec in config.tables:
        if spec.owner is None:
            kind = "subject"
        elif spec.action == "delete":
            kind = "deleted"
        elif spec.large:
            kind = "kept"
        else:
            kind = "updated"
        kinds[str(spec.table)] = kind
    return kinds


def vacuum_text(v: VacuumReport | None) -> str:
    if v is None or v.mode == "off":
        return "no VACUUM (worker.vacuum: off)"
    if not (v.done or v.locked or v.not_allowed or v.failed or v.left):
        return "no VACUUM (nothing changed)"
    parts = [f"VACUUM of {v.done} table(s)"]
    if v.locked:
        parts.append(f"{v.locked} skipped (in use by another VACUUM or DDL)")
    if v.not_allowed:
        parts.append(f"{v.not_allowed} skipped (the role may not vacuum them: owner needed)")
    if v.failed:
        parts.append(f"{v.failed} failed")
    if v.left:
        parts.append(f"{v.left} left to autovacuum (stopping)")
    return ", ".join(parts)


def summary_line(
    config: ErasureConfig,
    enqueued: int,
    states: Sequence[str],
    rows: Iterable[dict[str, int]],
    vacuum: VacuumReport | None,
    seconds: float,
) -> str:
    """One line for a run: subjects by outcome, rows by table kind, VACUUM, duration."""
    kinds = table_kinds(config)
    per_kind = {"subject": 0, "updated": 0, "deleted": 0, "kept": 0}
    kept_tables: list[str] = []
    for r in rows:
        for table, n in r.items():
            kind = kinds.get(table, "updated")
            per_kind[kind] += n
            if kind == "kept" and table not in kept_tables:
                kept_tables.append(table)
    kept = [t for t, k in kinds.items() if k == "kept"]
    row_parts = [
        f"{per_kind['subject']:,} subject rows anonymised",
        f"{per_kind['updated']:,} updated",
        f"{per_kind['deleted']:,} deleted",
    ]
    if kept:
        row_parts.append(f"{per_kind['kept']:,} kept with identifiers nulled ({', '.join(kept)})")
    return (
        f"erasure: {enqueued} subject(s) queued; {states.count('verified')} verified, "
        f"{states.count('failed')} failed, {states.count('postponed')} postponed; "
        f"rows: {', '.join(row_parts)}; {vacuum_text(vacuum)}; {duration(seconds)}"
    )


# -- dry run -------------------------------------------------------------------------------


def _headers(tables: Sequence[str]) -> list[str]:
    """Table names without their schema where that names them unambiguously."""
    short = [t.rpartition(".")[2] for t in tables]
    return [s if short.count(s) == 1 else t for s, t in zip(short, tables, strict=True)]


def dry_run_table(
    config: ErasureConfig, result: Sequence[tuple[str, Sequence[tuple[str, int]]]]
) -> list[str]:
    """The rows an erasure would change: a line per subject (in the order given: the
    subject key's), a column per configured table (in the file's order), a total per line
    and a totals line, then a sentence."""
    tables = [str(t.table) for t in config.tables]
    header = ["SUBJECT", *_headers(tables), "TOTAL"]
    body: list[list[str]] = []
    totals = [0] * (len(tables) + 1)
    for subject, counts in result:
        by_table = dict(counts)
        line = [by_table.get(t, 0) for t in tables]
        line.append(sum(line))
        totals = [a + b for a, b in zip(totals, line, strict=True)]
        body.append([subject, *(str(n) for n in line)])
    lines: list[str] = []
    if body:
        body.append(["TOTAL", *(str(n) for n in totals)])
        widths = [max(len(r[i]) for r in [header, *body]) for i in range(len(header))]

        def fmt(r: list[str]) -> str:
            cells = [r[0].ljust(widths[0])]
            cells += [c.rjust(w) for c, w in zip(r[1:], widths[1:], strict=True)]
            return "  ".join(cells).rstrip()

        lines = [fmt(header), *(fmt(r) for r in body)]
    lines.append(f"dry run: {len(result)} subject(s), {totals[-1]} row(s); nothing was changed")
    return lines


# -- status --------------------------------------------------------------------------------

STATES = ("pending", "running", "done", "verified", "failed")
_SQLSTATE = re.compile(r"\b([A-Za-z]\w*) \(([0-9A-Z]{5})\)")
_REMAINING = re.compile(r"([\w.\"]+): \d+ row\(s\) still hold a value")


def error_class(error: str | None) -> str:
    """A job's stored error, as its class: `verification failed (table.column, ...)` or
    `ExceptionName (SQLSTATE) in table`, `gave up` when it was retried to the end."""
    if not error:
        return ""
    if error.startswith("verification failed"):
        return f"verification failed ({', '.join(_REMAINING.findall(error))})"
    m = _SQLSTATE.search(error)
    if m is None:
        return error.split(":", 1)[0]
    where = error[: m.start()].rstrip(": ")
    text = f"{m.group(1)} ({m.group(2)})" + (f" in {where}" if where else "")
    return text + ("; gave up" if "gave up" in error else "")


@dataclass(frozen=True)
class JobLine:
    """A job as the status report lists it (keys, times, counts, the error's class)."""

    subject: str
    due_at: datetime
    age_s: float  # pending: how long it has been due; failed: since it failed
    attempts: int
    note: str


def _when(t: datetime) -> str:
    return t.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%SZ")


def _age(seconds: float) -> str:
    return duration(seconds) if seconds >= 0 else f"in {duration(-seconds)}"


def status_lines(
    counts: dict[str, int],
    not_queued: int,
    sections: Sequence[tuple[str, int, str, Sequence[JobLine]]],
) -> list[str]:
    """Counts per state, then each section (title, how many there are, what its AGE
    column means, the jobs shown)."""
    pending = counts.get("pending", 0) + not_queued
    parts = []
    for s in STATES:
        n = pending if s == "pending" else counts.get(s, 0)
        extra = f" ({not_queued} due, not queued yet)" if s == "pending" and not_queued else ""
        parts.append(f"{n} {s}{extra}")
    lines = ["jobs: " + ", ".join(parts)]
    for title, count, age, jobs in sections:
        if not count:
            continue
        shown = f"the oldest {len(jobs)} of {count}" if len(jobs) < count else f"{count}"
        lines.append(f"{title} ({shown}):")
        rows = [["SUBJECT", "DUE", age, "ATTEMPTS", "NOTE"]]
        rows += [[j.subject, _when(j.due_at), _age(j.age_s), str(j.attempts), j.note] for j in jobs]
        widths = [max(len(r[i]) for r in rows) for i in range(4)]
        for r in rows:
            cells = [r[0].ljust(widths[0]), r[1].ljust(widths[1]), r[2].rjust(widths[2])]
            cells += [r[3].rjust(widths[3]), r[4]]
            lines.append(("  " + "  ".join(cells)).rstrip())
    return lines
