"""`pgveil erase run|subject|status`: the command line of the erasure worker.

Defines the subcommand's options, runs the worker and
prints results: subject keys, table names, counts and states, never a value. Mistakes
(a bad configuration, a configuration that does not fit the database, an unknown subject,
a bad DSN) print `pgveil: error: ...` lines and exit with status 2; a job that fails or
cannot finish exits with status 1.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TextIO

import asyncpg

from erasure.db import ConnectError, DsnError, sqlstate_of
from erasure.executor import Outcome
from erasure.loader import ErasureConfigError, load_config
from erasure.worker import (
    DryRun,
    JobStatus,
    Refused,
    RunSummary,
    UserError,
    dry_run,
    erase_subject,
    fixed_clock,
    run,
    run_forever,
    status,
)
from proxy.cli.common import DSN_HELP, EXIT_USAGE, Parser, Subparsers

EXIT_FAILED = 1


def add_arguments(subparsers: Subparsers) -> None:
    """The `erase` subcommand's actions and options."""
    parser = subparsers.add_parser("erase", help="erase the personal data of terminated customers")
    common = Parser(add_help=False)
    common.add_argument(
        "--config", type=Path, required=True, metavar="FILE", help="erasure YAML file"
    )
    common.add_argument(
        "--dsn",
        default="",
        metavar="DSN",
        help=f"{DSN_HELP} (default: the PG* environment)",
    )
    common.add_argument(
        "--now",
        metavar="ISO",
        help="the time that decides who is due, e.g. 2026-05-01T00:00:00Z (for tests)",
    )
    sub = parser.add_subparsers(dest="erase_command", metavar="ACTION", parser_class=Parser)
    sub.required = True
    r = sub.add_parser("run", parents=[common], help="erase due subjects, polling for more")
    r.add_argument("--once", action="store_true", help="one pass over the due subjects, then exit")
    r.add_argument(
        "--dry-run", action="store_true", help="print the rows that would change; change nothing"
    )
    r.add_argument(
        "--metrics",
        metavar="HOST:PORT",
        help="serve Prometheus metrics (subjects, rows, batches) on this address",
    )
    s = sub.add_parser("subject", parents=[common], help="erase one subject now (on request)")
    s.add_argument("key", metavar="KEY", help="the subject's key")
    s.add_argument(
        "--dry-run", action="store_true", help="print the rows that would change; change nothing"
    )
    sub.add_parser("status", parents=[common], help="list pending, running, done, failed jobs")


def _error(message: str) -> int:
    for line in message.splitlines() or [""]:
        sys.stderr.write(f"pgveil: error: {line}\n")
    return EXIT_USAGE


def _parse_now(text: str | None) -> datetime:
    if text is None:
        return datetime.now(UTC)
    value = datetime.fromisoformat(text.replace("Z", "+00:00"))
    return value if value.tzinfo is not None else value.replace(tzinfo=UTC)


def main(ns: argparse.Namespace) -> int:
    from shared import logs

    logs.configure("json", "info")
    try:
        config = load_config(ns.config)
    except ErasureConfigError as exc:
        return _error(str(exc))
    try:
        now = _parse_now(ns.now)
    except ValueError:
        return _error(f"--now '{ns.now}' is not an ISO 8601 time, e.g. 2026-05-01T00:00:00Z")
    clock = (lambda: datetime.now(UTC)) if ns.now is None else fixed_clock(now)
    out = sys.stderr if config.audit.stdout else sys.stdout  # stdout carries the events
    try:
        if ns.erase_command == "status":
            _print_status(asyncio.run(status(config, ns.dsn, clock)), out)
            return 0
        if getattr(ns, "dry_run", False):
            key = ns.key if ns.erase_command == "subject" else None
            _print_dry_run(asyncio.run(dry_run(config, ns.dsn, clock, key)), out)
            return 0
        if ns.erase_command == "subject":
            outcome = asyncio.run(erase_subject(config, ns.dsn, clock, ns.key))
            _print_outcome(outcome, out)
            return 0 if outcome.state == "verified" else EXIT_FAILED
        return _run(config, ns, clock, out)
    except Refused as exc:
        return _error(
            "the erasure configuration does not fit the database; nothing was changed:\n"
            + "\n".join(exc.problems)
        )
    except DsnError as exc:
        return _error(f"--dsn: {exc}")
    except (UserError, ConnectError) as exc:
        return _error(str(exc))
    except OSError as exc:
        return _error(f"cannot reach the database: {exc.strerror or type(exc).__name__}")
    except (asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
        sys.stderr.write(f"pgveil: error: database error: {sqlstate_of(exc)}\n")
        return EXIT_FAILED


def _run(config: Any, ns: argparse.Namespace, clock: Any, out: TextIO) -> int:
    summary = RunSummary()
    if ns.metrics:
        from erasure import metrics
        from shared.address import parse_host_port

        try:
            where = parse_host_port(ns.metrics)
        except ValueError as exc:
            raise UserError(f"--metrics: {exc}") from exc
        try:
            metrics.serve(summary, where.host, where.port)
        except OSError as exc:
            raise UserError(f"--metrics: cannot listen on {where}: {exc.strerror}") from exc

    async def main_loop() -> Any:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        if ns.once:
            return await run(config, ns.dsn, clock, once=True, stop=stop, summary=summary)
        return await run_forever(config, ns.dsn, clock, stop, summary)

    asyncio.run(main_loop())
    states = [o.state for o in summary.outcomes]
    out.write(
        f"erasure: {summary.enqueued} subject(s) queued; {states.count('verified')} verified, "
        f"{states.count('failed')} failed, {states.count('postponed')} postponed\n"
    )
    for o in summary.outcomes:
        if o.state != "verified" and o.error:
            out.write(f"  subject {o.subject}: {o.state}: {o.error}\n")
    return EXIT_FAILED if summary.failed else 0


def _print_outcome(o: Outcome, out: TextIO) -> None:
    rows = ", ".join(f"{t} {n}" for t, n in o.rows.items())
    out.write(f"subject {o.subject}: {o.state}; rows changed: {rows or 'none'}\n")
    if o.error:
        out.write(f"  {o.error}\n")


def _print_dry_run(result: DryRun, out: TextIO) -> None:
    total = 0
    for subject, counts in result:
        out.write(f"subject {subject}: would change\n")
        for table, n in counts:
            out.write(f"  {table:<40} {n:>10} row(s)\n")
            total += n
    out.write(f"dry run: {len(result)} subject(s), {total} row(s); nothing was changed\n")


def _print_status(jobs: list[JobStatus], out: TextIO) -> None:
    out.write(f"{'SUBJECT':<14} {'STATE':<9} {'DUE':<20} {'ROWS':>10} {'ATTEMPTS':>8}  NOTE\n")
    counts: dict[str, int] = {}
    for j in jobs:
        counts[j.state] = counts.get(j.state, 0) + 1
        notes = []
        if not j.queued:
            notes.append("due, not queued yet")
        if j.state == "running":
            notes.append(f"step {j.step + 1}/{j.steps} {j.table or ''}".rstrip())
            notes.append(f"by {j.worker}" if j.held else "interrupted: no worker holds it")
        if j.error:
            notes.append(j.error)
        due = j.due_at.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%SZ")
        out.write(
            f"{j.subject:<14} {j.state:<9} {due:<20} {sum(j.rows.values()):>10} "
            f"{j.attempts:>8}  {'; '.join(notes)}\n".rstrip()
            + "\n"
        )
    order = ("pending", "running", "done", "verified", "failed")
    out.write(", ".join(f"{s} {counts.get(s, 0)}" for s in order) + "\n")
