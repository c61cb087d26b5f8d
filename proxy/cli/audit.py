"""`pgveil audit verify|tail|who`: the compliance team's tools over the audit stream.

Prints event metadata only (the events themselves never hold personal values).
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import datetime as dt
import json
import os
import sys
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping
from decimal import Decimal
from pathlib import Path
from typing import Any

import asyncpg

from audit import kinds as audit_kinds
from audit.anchors import Anchor, is_checkpoint, key_id, load_key, parse_key_ref, read_anchors
from audit.events import load_event
from audit.files import AuditFileError, read_events, read_numbered, rotated_files
from audit.kinds import cannot_carry_data
from audit.sinks import read_table, read_table_rows
from audit.verify import EXIT_BROKEN, EXIT_INTACT, EXIT_UNPROVEN, verify_chain
from proxy.cli.common import DSN_HELP, Parser, Subparsers
from proxy.config import ConfigError
from rules.keys import canonical_number, input_value
from shared.dsn import DsnError
from shared.user_files import UnreadableFile, check_readable

EXIT_ORDER = (EXIT_INTACT, EXIT_UNPROVEN, EXIT_BROKEN)  # the worst of several chains wins


def verify_table(
    dsn: str,
    table: str,
    keys: Mapping[str, bytes],
    anchors: list[Anchor],
    after: str | None,
    chain: str | None,
) -> int:
    """Every chain in the table sink (or one), each on its own."""
    chains = asyncio.run(read_table_rows(dsn, table, chain))
    if not chains:
        print("no events" if chain is None else f"no events in chain {chain}")
        return EXIT_UNPROVEN
    worst = EXIT_INTACT
    for name, rows in chains:
        label = f"table chain {name}"
        report = verify_chain([(label, rows)], label, anchors, keys, after)
        for text in report.lines():
            print(text.replace(f"{label} line ", f"{label} row "))
        worst = max(worst, report.exit_code, key=EXIT_ORDER.index)
    return worst


def verify(
    paths: list[Path],
    keys: Mapping[str, bytes],
    anchors: list[Anchor],
    after: str | None,
) -> int:
    """Audit files as one chain, in the order of their events' sequence numbers."""
    _readable(paths, "audit file")
    ordered = _order(list(dict.fromkeys(paths)))
    parts = [(str(p), read_numbered(p)) for p in ordered]
    report = verify_chain(parts, f"{len(ordered)} file(s)", anchors, keys, after)
    if ordered != paths:
        report.notes.append(
            "files taken in the order of their events: " + " ".join(map(str, ordered))
        )
    if any(f.kind == "begins after a gap" for f in report.findings):
        older = [p for p in rotated_files(ordered[0]) if p not in ordered] if ordered else []
        if older:
            report.notes.append(f"{len(older)} rotated file(s) beside {ordered[0]} were not given")
    for text in report.lines():
        print(text)
    return report.exit_code


def _order(paths: list[Path]) -> list[Path]:
    """By the sequence number of each file's first event; as given when a file has none
    (empty, unreadable, or written before events were numbered)."""
    firsts: list[int] = []
    for p in paths:
        seq = next((e.get("seq") for _n, e in read_numbered(p) if e is not None), None)
        if type(seq) is not int:
            return paths
        firsts.append(seq)
    return [p for _s, _i, p in sorted(zip(firsts, range(len(paths)), paths, strict=True))]


def _keys(refs: list[str] | None) -> dict[str, bytes]:
    if not refs:
        env = os.environ.get("PGVEIL_AUDIT_KEY")
        refs = [env] if env else []
    out = {}
    for text in refs:
        try:
            key = load_key(parse_key_ref(text))
        except ValueError as exc:
            raise ConfigError(f"--key: {exc}") from exc
        out[key_id(key)] = key
    return out


def _anchors(files: list[Path] | None, dsn: str | None, table: str) -> list[Anchor]:
    out: list[Anchor] = []
    _readable(files or [], "--anchor file")
    for path in files or []:
        out += read_anchors(path)
    if dsn is not None:
        for chain, rows in asyncio.run(read_table_rows(dsn, table)):
            out += [
                Anchor(e, f"table chain {chain} row {n}", shared=True)
                for n, e in rows
                if e is not None and is_checkpoint(e)
            ]
    return out


def line(e: Mapping[str, Any]) -> str:
    who = e.get("role", "")
    cls = e.get("classification", "")
    what = e.get("decision") or e.get("reason") or ""
    tables = ",".join(e.get("tables", []) or [])
    result = ""
    if "outcome" in e and "rows" in e:
        result = f"{e['outcome']} {e['rows']} row(s)"
    subjects = e.get("subjects_total") or {}
    touched = ",".join(f"{t}:{n}" for t, n in subjects.items())
    parts = [
        str(e.get("ts", "")),
        str(e.get("type", "")),
        f"{who}({cls})" if cls else who,
        tables,
        what,
        result,
        f"subjects {touched}" if touched else "",
    ]
    return "  ".join(p for p in parts if p)


def tail(path: Path, follow: bool, role: str | None, table: str | None) -> int:
    def wanted(e: Mapping[str, Any]) -> bool:
        if role is not None and e.get("role") != role:
            return False
        return table is None or table in (e.get("tables") or []) or table in (e.get("views") or {})

    _readable([path], "audit file")
    try:
        for e in read_events(path):
            if wanted(e):
                print(line(e), flush=True)  # (a line as soon as it is read: a pipe's reader)
        if not follow:
            return 0
        with path.open("rb") as f:
            f.seek(0, 2)
            while True:
                raw = f.readline()
                if not raw:
                    time.sleep(0.2)
                    continue
                e = load_event(raw)
                if wanted(e):
                    print(line(e), flush=True)
    except AuditFileError as exc:
        sys.stderr.write(f"pgveil: error: {exc}\n")
        return 1
    except KeyboardInterrupt:
        return 0


def load_events(files: list[Path] | None, dsn: str | None, table: str) -> Iterator[dict[str, Any]]:
    """Events from audit files (each with its rotated predecessors, oldest first) or from
    the table sink (every chain)."""
    if dsn is not None:
        for _chain, events in asyncio.run(read_table(dsn, table)):
            yield from events
        return
    for path in files or []:
        for p in rotated_files(path):
            yield from read_events(p)


def who(
    events: Iterable[Mapping[str, Any]],
    table: str,
    subject: str,
    since: str | None,
    until: str | None,
    by_session: bool = False,
) -> Iterator[dict[str, Any]]:
    """Who accessed the data of `subject` in `table`: every access event that lists it,
    every one that read the table without recording its subjects (`possibly`), and the
    subject's erasure, as rows, each as soon as it is settled (events are read once, in
    their order). A table is read by an event that names it, or a view over it
    (`views`); an event that pgveil could not fully analyse (`analysis_complete: false`)
    and a notification delivered on a channel with rules may have read any table, whatever
    tables they name. Statements that can neither return nor change data (audit/kinds.py)
    are left out. `by_session`: an unmasked session's uncertain statements are one row per
    session (`session_row`), given when its `session.end` is read or at the end."""
    forms = subject_forms(subject)
    # rows in the order found; a `running` event's row is held until its complete event
    # (same session and number) is read, which drops it: the running one is shown only
    # when the complete one is not in the report (pgveil stopped, or the window ends
    # between them). Rows behind a held one wait for it.
    slots: deque[list[Any]] = deque()  # [row, "ready" | "held" | "drop"]
    held: dict[tuple[object, object], list[Any]] = {}
    sessions: dict[object, list[dict[str, Any]]] = {}
    for e in events:
        ts = str(e.get("ts", ""))
        if (since is not None and ts < since) or (until is not None and ts >= until):
            continue
        kind = e.get("type")
        if kind == "session.end" and by_session and e.get("session") in sessions:
            slots.append([session_row(sessions.pop(e.get("session"))), "ready"])
        row = _who_of(e, kind, table, subject, forms)
        if kind == "access" and "running" in e:
            key = (e.get("session"), e["running"])
            if e.get("outcome") != "running":
                done = held.pop(key, None)
                if done is not None:
                    done[1] = "drop"
            elif row is not None:
                waiting: list[Any] = [row, "held"]
                held[key] = waiting
                slots.append(waiting)
                row = None
        if row is not None:
            if by_session and _grouped(row):
                sessions.setdefault(row["session"], []).append(row)
            else:
                slots.append([row, "ready"])
        while slots and slots[0][1] != "held":
            first: dict[str, Any] = slots[0][0]
            state = slots.popleft()[1]
            if state == "ready":
                yield first
    for last in slots:
        if last[1] != "drop":
            yield last[0]
    for rows in sessions.values():
        yield session_row(rows)


def _who_of(
    e: Mapping[str, Any], kind: object, table: str, subject: str, forms: frozenset[str]
) -> dict[str, Any] | None:
    """The row of one event in the report, or None."""
    if kind == "erasure":
        if str(e.get("subject")) == subject and table in (e.get("tables") or {table: 0}):
            return _who_row(e, "erased")
        return None
    if kind != "access" or cannot_carry_data(e):
        return None
    tables = e.get("tables") or []
    behind = _behind_view(e, table)
    if table in tables:
        behind = [table]
    elif behind is None:
        if not _anywhere(e):
            return None
        behind = [table]
    subjects = e.get("subjects") or {}
    if any(not forms.isdisjoint(subjects.get(t) or ()) for t in behind):
        return _who_row(e, "yes")
    if _delivered(e) and not all(_excludes(e, t, subjects.get(t)) for t in behind):
        return _who_row(e, "possibly")
    return None


def _grouped(row: Mapping[str, Any]) -> bool:
    """An unmasked statement listed only because pgveil could not tell what it read."""
    return (
        row["touched"] == "possibly"
        and row["classification"] == "unmasked"
        and row["analysis_complete"] is False
        and row["session"] is not None
    )


def session_row(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """One row for an unmasked session's uncertain statements (`rows`, in order): who,
    from where, first and last time, how many, what kinds and why."""
    first, last = rows[0], rows[-1]
    out = dict(first)
    out.update(
        {
            "group": "session",
            "last_ts": last["ts"],
            "statements": len(rows),
            "kinds": sorted({k for r in rows for k in r["kinds"]}),
            "what": sorted({w for r in rows for w in r["what"]}),
            "uncertain": sorted({str(r["uncertain"] or UNRECORDED) for r in rows}),
            "views": sorted({v for r in rows for v in r["views"]}),
            "columns_raw": sorted({c for r in rows for c in r["columns_raw"]}),
            "columns_masked": sorted({c for r in rows for c in r["columns_masked"]}),
            "columns_denied": sorted({c for r in rows for c in r["columns_denied"]}),
            "outcome": ",".join(sorted({str(r["outcome"]) for r in rows})),
            "rows": sum(r["rows"] for r in rows if isinstance(r["rows"], int)),
            "last_id": last["id"],
        }
    )
    return out


UNRECORDED = "not recorded (an event of an older pgveil)"


def subject_forms(subject: str) -> frozenset[str]:
    """The texts an event may record `subject` as: as given, and its canonical text in each
    key type that reads it (events write keys so: `2` for `02` or `+2` of an integer key,
    `2.5` for `2.50` of a numeric one, a uuid in lower case without braces, a char(n) key
    without its padding). `who` does not know the key's type: a form of another type may
    list an event of another subject (never leave one out)."""
    forms = {subject, subject.rstrip(" ")}
    for typ in ("int8", "numeric", "uuid"):
        value = input_value(typ, subject)
        if value is None:
            continue
        if typ == "numeric":
            assert isinstance(value[1], Decimal)
            text = canonical_number(value[1])
        else:
            text = str(value[1])
        if text is not None:
            forms.add(text)
    return frozenset(forms)


def _behind_view(e: Mapping[str, Any], view: str) -> list[str] | None:
    """The tables behind `view` when the event read it (`views`), else None."""
    views = e.get("views")
    if not isinstance(views, dict) or view not in views:
        return None
    return [str(t) for t in views[view] or ()] or [view]


def _anywhere(e: Mapping[str, Any]) -> bool:
    """Whether the event may have read any table: pgveil could not analyse all of it (a
    function, a name it cannot resolve, ...), or it is a notification delivered on a
    channel the rules name (its payload is not tied to a table)."""
    if e.get("analysis_complete") is False:
        return True
    return "notification" in (e.get("kinds") or ()) and e.get("decision") != "withheld"


def _delivered(e: Mapping[str, Any]) -> bool:
    """Whether the statement may have reached data: it completed, or its rows went out
    before it failed (a `running` number, rows counted), or its error or notices may carry
    values, or it was in flight when its session ended (outcome unknown)."""
    outcome = e.get("outcome", "ok")
    return (
        outcome == "ok"
        or outcome == "unknown"
        or "running" in e
        or bool(e.get("rows"))
        or e.get("values_in_messages") is True
    )


def _excludes(e: Mapping[str, Any], table: str, listed: list[str] | None) -> bool:
    """True when the event proves the subject was not touched."""
    if e.get("analysis_complete") is False:
        return False  # (its subjects were judged over tables it may not name)
    if listed is None:
        return e.get("subjects_complete") is True
    total = (e.get("subjects_total") or {}).get(table, len(listed))
    # the list holds every subject when nothing was cut off
    return bool(e.get("subjects_complete")) and total == len(listed)


def _who_row(e: Mapping[str, Any], touched: str) -> dict[str, Any]:
    kinds = e.get("kinds") or [e.get("type")]
    return {
        "ts": e.get("ts"),
        "touched": touched,
        "role": e.get("role"),
        "classification": e.get("classification"),
        "client": e.get("client"),
        "application_name": e.get("application_name"),
        "kinds": kinds,
        # the kinds as a person reads them (`copy out`, `do block`)
        "what": audit_kinds.what([str(k) for k in kinds], e.get("statement")),
        # what the statement read through (views), the channel of a notification, and
        # whether the event is uncertain (why a `possibly` may stand under any table)
        "views": sorted(e.get("views") or {}),
        "channel": e.get("channel"),
        "analysis_complete": e.get("analysis_complete", True),
        "uncertain": e.get("uncertain"),
        "columns_raw": e.get("columns_raw", []),
        "columns_masked": e.get("columns_masked", []),
        "columns_denied": e.get("columns_denied", []),
        "decision": e.get("decision"),
        "rows": e.get("rows"),
        "outcome": e.get("outcome"),
        "session": e.get("session"),
        "id": e.get("id"),
    }


FORMATS = ("table", "json", "csv")
_CSV = (
    "ts", "last_ts", "touched", "role", "classification", "client", "application_name",
    "what", "statements", "raw", "masked", "outcome", "rows", "uncertain", "session", "id",
)  # fmt: skip


def print_who(rows: Iterable[dict[str, Any]], form: str) -> None:
    """The report: JSON lines or CSV rows written (and flushed) one by one as they come;
    a table (for a person) once every row is known, unmasked sessions' uncertain
    statements in a second table."""
    out = sys.stdout
    if form == "json":
        for r in rows:
            out.write(json.dumps(r, ensure_ascii=False) + "\n")
            out.flush()
        return
    if form == "csv":
        writer = csv.writer(out, lineterminator="\n")
        writer.writerow(_CSV)
        out.flush()
        for r in rows:
            flat = {**r, "what": _what(r), "raw": _raw(r), "masked": _masked(r)}
            if isinstance(r.get("uncertain"), list):
                flat["uncertain"] = "; ".join(r["uncertain"])
            writer.writerow(["" if flat.get(c) is None else flat.get(c) for c in _CSV])
            out.flush()
        return
    events: list[dict[str, Any]] = []
    sessions: list[dict[str, Any]] = []
    for r in rows:
        (sessions if r.get("group") == "session" else events).append(r)
    head = ["time (UTC)", "touched", "role", "class", "client", "what", "raw", "masked", "outcome"]
    _aligned(
        head,
        [
            [
                str(r["ts"]),
                r["touched"],
                str(r["role"] or ""),
                str(r["classification"] or ""),
                str(r["client"] or ""),
                _what(r),
                _raw(r),
                _masked(r),
                str(r["outcome"] or "-"),
            ]
            for r in sorted(events, key=lambda r: str(r["ts"]))
        ],
    )
    print(f"({len(events)} event(s))")
    if not sessions:
        return
    print()
    print("possibly, not fully analysed: statements of unmasked sessions pgveil could not follow")
    head = ["first (UTC)", "last (UTC)", "role", "client", "statements", "what", "why"]
    _aligned(
        head,
        [
            [
                str(r["ts"]),
                str(r["last_ts"]),
                str(r["role"] or ""),
                str(r["client"] or ""),
                str(r["statements"]),
                ", ".join(r["what"]),
                "; ".join(r["uncertain"]),
            ]
            for r in sorted(sessions, key=lambda r: str(r["ts"]))
        ],
    )
    print(f"({len(sessions)} session(s), {sum(r['statements'] for r in sessions)} statement(s))")


def _aligned(head: list[str], table: list[list[str]]) -> None:
    widths = [max(len(x) for x in col) for col in zip(head, *table, strict=False)]
    for line_ in [head, *table]:
        print("  ".join(x.ljust(w) for x, w in zip(line_, widths, strict=True)).rstrip())


def _raw(r: Mapping[str, Any]) -> str:
    return ",".join(c.rsplit(".", 1)[-1] for c in r["columns_raw"]) or "-"


def _masked(r: Mapping[str, Any]) -> str:
    return (
        ",".join(
            [c.rsplit(".", 1)[-1] for c in r["columns_masked"]]
            + [c.rsplit(".", 1)[-1] + "(denied)" for c in r["columns_denied"]]
        )
        or "-"
    )


def _what(r: Mapping[str, Any]) -> str:
    what = ",".join(r["what"])
    if r.get("group") == "session":
        return what
    if r.get("channel"):
        what += f" {r['channel']}"
    if r.get("views"):
        what += " via " + ",".join(r["views"])
    if r.get("analysis_complete") is False:
        what += " (uncertain)"
    return what


def add_arguments(sub: Subparsers) -> None:
    a = sub.add_parser("audit", help="read and verify audit files")
    asub = a.add_subparsers(dest="audit_command", metavar="ACTION", parser_class=Parser)
    asub.required = True
    av = asub.add_parser(
        "verify",
        help="check that audit files (in any order) or the table sink's chains are complete "
        "and unchanged; exit 0 intact, 1 broken, 2 usage error, 3 unproven",
    )
    av.add_argument("files", type=Path, nargs="*", metavar="FILE")
    av.add_argument(
        "--key",
        action="append",
        metavar="REF",
        help="the audit key, env:NAME or file:PATH (repeat for older keys; default: the "
        "reference in $PGVEIL_AUDIT_KEY)",
    )
    av.add_argument(
        "--anchor",
        action="append",
        type=Path,
        metavar="FILE",
        help="checkpoints kept outside the chain: the anchor file (a copy shipped elsewhere), "
        "or any JSON-lines file holding them (repeatable)",
    )
    av.add_argument(
        "--after",
        metavar="HASH",
        help="the hash the first event follows, when older files were removed on purpose",
    )
    av.add_argument("--chain", metavar="NAME", help="with --dsn: only this chain")
    _table_source(av, from_env=False)
    aw = asub.add_parser("who", help="who accessed one data subject's personal data, and when")
    aw.add_argument("--table", required=True, metavar="SCHEMA.TABLE", help="protected table")
    aw.add_argument("--subject", required=True, metavar="KEY", help="its subject column's value")
    aw.add_argument("--since", metavar="TIME", help="ISO date or time (UTC unless it says)")
    aw.add_argument("--until", metavar="TIME", help="ISO date or time, exclusive")
    aw.add_argument(
        "--format",
        choices=FORMATS,
        help="table: aligned columns for a person (the default on a terminal); json: one "
        "JSON object a line, written as rows are found (the default otherwise); csv",
    )
    aw.add_argument(
        "--json", dest="format", action="store_const", const="json", help="--format json"
    )
    aw.add_argument("--file", type=Path, action="append", metavar="FILE", help="audit file")
    _table_source(aw)
    at = asub.add_parser("tail", help="print events as lines")
    at.add_argument("file", type=Path, metavar="FILE")
    at.add_argument("--follow", action="store_true")
    at.add_argument("--role")
    at.add_argument("--table")


def _table_source(p: argparse.ArgumentParser, from_env: bool = True) -> None:
    p.add_argument(
        "--dsn",
        nargs="?",
        const="",
        metavar="DSN",
        default=os.environ.get("PGVEIL_AUDIT_TABLE_DSN") if from_env else None,
        help="read the table sink in this database, "
        + DSN_HELP
        + "; --dsn alone: the PG* environment (default"
        + (": " if from_env else " without FILEs: ")
        + "$PGVEIL_AUDIT_TABLE_DSN"
        + ("" if from_env else "; with FILEs, its checkpoints anchor them")
        + ")",
    )
    p.add_argument(
        "--audit-table", default="pgveil.audit_events", metavar="SCHEMA.TABLE", help="its table"
    )


def main(ns: argparse.Namespace) -> int:
    """Dispatch `pgveil audit ACTION`."""
    if ns.audit_command == "tail":
        return _closed_pipe(lambda: tail(ns.file, ns.follow, ns.role, ns.table))
    if ns.audit_command == "verify":
        keys = _keys(ns.key)
        if ns.files:
            if ns.chain is not None:
                raise ConfigError("--chain is for the table sink (--dsn without FILEs)")
            return _from_table(
                lambda: verify(
                    ns.files, keys, _anchors(ns.anchor, ns.dsn, ns.audit_table), ns.after
                )
            )
        dsn = ns.dsn if ns.dsn is not None else os.environ.get("PGVEIL_AUDIT_TABLE_DSN")
        if dsn is None:
            raise ConfigError("give audit files, or --dsn for the table sink")
        return _from_table(
            lambda: verify_table(
                dsn, ns.audit_table, keys, _anchors(ns.anchor, None, ""), ns.after, ns.chain
            )
        )
    if not ns.file and ns.dsn is None:
        raise ConfigError("give --file FILE or --dsn DSN (the table sink)")
    since, until = _utc(ns.since, "--since"), _utc(ns.until, "--until")
    for path in ns.file or []:
        # the file and its rotated predecessors (none at all: the file is missing)
        _readable(rotated_files(path) or [path], "audit file")
    source = None if ns.file else ns.dsn  # files first when both are given

    def report() -> int:
        events = load_events(ns.file, source, ns.audit_table)
        form = ns.format or ("table" if sys.stdout.isatty() else "json")
        print_who(who(events, ns.table, ns.subject, since, until, by_session=True), form)
        return 0

    return _closed_pipe(lambda: _from_table(report))


def _closed_pipe(action: Callable[[], int]) -> int:
    """`action`, ending quietly (exit 0) when the reader of the output goes away (`| head`):
    what is still buffered for it goes nowhere, never to a message at exit."""
    try:
        code = action()
        sys.stdout.flush()
        return code
    except BrokenPipeError:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
        return 0


def _from_table(action: Callable[[], int]) -> int:
    try:
        return action()
    except AuditFileError as exc:
        sys.stderr.write(f"pgveil: error: {exc}\n")
        return 1
    except DsnError as exc:
        raise ConfigError(f"--dsn: {exc}") from exc
    except BrokenPipeError:
        raise  # (the output's reader went away: see _closed_pipe)
    except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
        raise ConfigError(f"the audit table cannot be read: {exc}") from exc


def _readable(paths: Iterable[Path], what: str) -> None:
    """Each file can be read, or a usage error that names it and the problem."""
    for path in paths:
        try:
            check_readable(path, what)
        except UnreadableFile as exc:
            raise ConfigError(str(exc)) from exc


def _utc(text: str | None, flag: str) -> str | None:
    """An ISO date or time as the events' `ts` form, for comparing as text."""
    if text is None:
        return None
    try:
        when = dt.datetime.fromisoformat(text)
    except ValueError as exc:
        raise ConfigError(f"{flag}: not an ISO date or time: {text}") from exc
    if when.tzinfo is not None:
        when = when.astimezone(dt.UTC).replace(tzinfo=None)
    return when.strftime("%Y-%m-%dT%H:%M:%S.%fZ")
