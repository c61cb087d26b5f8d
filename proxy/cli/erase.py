"""`pgveil erase run|subject|status`: the command line of the erasure worker.

Defines the subcommand's options, runs the worker and prints results: subject keys, table
names, counts and states, never a value. For a person at a terminal (`--log-format auto`
with standard error a terminal, or `text`) `erase run` redraws a progress line on
standard error and its log shows warnings and errors only, as text; otherwise (`json`, or
auto with standard error not a terminal) the log is the JSON lines other tooling reads.
Mistakes (a bad configuration, a configuration that does not fit the database, an unknown
subject, a bad DSN, a database that cannot be reached) print `pgveil: error: ...` lines
and exit with status 2; a job that fails or cannot finish exits with status 1.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import io
import os
import signal
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TextIO, cast

import asyncpg

from erasure.db import ConnectError, DsnError, sqlstate_of
from erasure.executor import Outcome, Vacuumed
from erasure.loader import ErasureConfigError, load_config
from erasure.model import ErasureConfig
from erasure.report import (
    VacuumReport,
    dry_run_table,
    progress_line,
    status_lines,
    summary_line,
    vacuum_text,
)
from erasure.worker import (
    DryRun,
    Refused,
    RunSummary,
    Status,
    UserError,
    dry_run,
    erase_subject,
    fixed_clock,
    run,
    run_forever,
    status,
)
from proxy.cli.common import DSN_HELP, EXIT_USAGE, Parser, Subparsers
from shared.dsn import resolve

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
    common.add_argument(
        "--log-format",
        choices=("auto", "text", "json"),
        default="auto",
        help="text: a progress line and warnings for a person; json: JSON log lines for "
        "tools; auto (default): text when standard error is a terminal, else json",
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
    sub.add_parser(
        "status",
        parents=[common],
        help="jobs per state; the oldest pending, the oldest failed and the running jobs",
    )


def _error(message: str) -> int:
    for line in message.splitlines() or [""]:
        sys.stderr.write(f"pgveil: error: {line}\n")
    return EXIT_USAGE


def _parse_now(text: str | None) -> datetime:
    if text is None:
        return datetime.now(UTC)
    value = datetime.fromisoformat(text.replace("Z", "+00:00"))
    return value if value.tzinfo is not None else value.replace(tzinfo=UTC)


class Progress:
    """The progress line of `erase run` on a terminal: redrawn in place (carriage return,
    erase to the end of the line), at most every 0.1 s but at a pass's start and end;
    cleared while a log line is written above it, and at the end."""

    def __init__(self, stream: TextIO, summary: RunSummary) -> None:
        self.stream = stream
        self.summary = summary
        self.shown = False
        self.drawn_at = 0.0

    def width(self) -> int:
        try:
            return os.get_terminal_size(self.stream.fileno()).columns - 1
        except (OSError, ValueError):
            return 99

    def draw(self, force: bool = False) -> None:
        now = time.monotonic()
        if not self.summary.passes or (not force and now - self.drawn_at < 0.1):
            return  # (before the first pass there is nothing to count)
        self.drawn_at = now
        done, total, rows, seconds = self.summary.progress()
        width = self.width()
        line = progress_line(done, total, rows, seconds, width) if total else "erasing: none due"
        if self.summary.activity:
            line = f"{line}  {self.summary.activity}"[:width]
        self.stream.write(f"\r{line}\x1b[K")
        self.stream.flush()
        self.shown = True

    def changed(self) -> None:
        done, total, _, _ = self.summary.progress()
        self.draw(force=done in (0, total) or bool(self.summary.activity))

    def clear(self) -> None:
        if self.shown:
            self.stream.write("\r\x1b[K")
            self.stream.flush()
            self.shown = False

    async def tick(self, stop: asyncio.Event) -> None:
        """Redraws while the run lasts (rows and rates move between jobs too)."""
        while not stop.is_set():
            self.draw()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 0.25)


class _AboveProgress(io.TextIOBase):
    """A log stream that clears the progress line before a log line and redraws it after."""

    def __init__(self, stream: TextIO, progress: Progress | None) -> None:
        self.stream = stream
        self.progress = progress

    def write(self, text: str) -> int:
        if self.progress is not None:
            self.progress.clear()
        self.stream.write(text)
        self.stream.flush()
        if self.progress is not None and text.endswith("\n"):
            self.progress.draw(force=True)
        return len(text)

    def flush(self) -> None:
        self.stream.flush()


def _log_format(choice: str) -> str:
    if choice == "auto":
        return "text" if sys.stderr.isatty() else "json"
    return choice


def main(ns: argparse.Namespace) -> int:
    from shared import logs

    text = _log_format(ns.log_format) == "text"
    summary = RunSummary()
    progress = None
    if text and ns.erase_command == "run" and not ns.dry_run and sys.stderr.isatty():
        progress = Progress(sys.stderr, summary)
        summary.on_change = progress.changed
    if text:
        # a person reads it: what goes wrong; the progress line and summary say the rest
        logs.configure("text", "warning", cast(TextIO, _AboveProgress(sys.stderr, progress)))
    else:
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
            _print_dry_run(config, asyncio.run(dry_run(config, ns.dsn, clock, key)), out)
            return 0
        if ns.erase_command == "subject":
            outcome, vacuumed = asyncio.run(erase_subject(config, ns.dsn, clock, ns.key))
            _print_outcome(config, outcome, vacuumed, out)
            return 0 if outcome.state == "verified" else EXIT_FAILED
        return _run(config, ns, clock, out, summary, progress)
    except Refused as exc:
        return _error(
            "the erasure configuration does not fit the database; nothing was changed:\n"
            + "\n".join(exc.problems)
        )
    except DsnError as exc:
        return _error(f"--dsn: {exc}")
    except ConnectError as exc:
        return _error(f"{exc}; {_connection_settings(ns.dsn)}")
    except UserError as exc:
        return _error(str(exc))
    except OSError as exc:
        return _error(
            f"cannot reach the database: {exc.strerror or type(exc).__name__}; "
            + _connection_settings(ns.dsn)
        )
    except (asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
        sys.stderr.write(f"pgveil: error: database error: {sqlstate_of(exc)}\n")
        return EXIT_FAILED


# what a connection setting defaults to, as libpq decides it (shared.dsn)
_DEFAULT_FROM = {
    "host": "default: the local Unix socket",
    "port": "default",
    "dbname": "default: the user name",
    "user": "default: the operating system user",
}
_ENV = {"host": "PGHOST", "port": "PGPORT", "dbname": "PGDATABASE", "user": "PGUSER"}


def _connection_settings(dsn: str) -> str:
    """Which host, port, database and user were used and where each came from (--dsn, a
    PG* variable, a service file, the default), and how to set them; never a password."""
    try:
        params = resolve(dsn)
        values = {
            "host": ",".join(params.hosts),
            "port": ",".join(params.port_texts),
            "dbname": params.dbname,
            "user": params.user,
        }
    except DsnError:
        return "give the connection with --dsn"
    used = []
    for key, value in values.items():
        origin = params.origins.get(key)
        where = (
            _DEFAULT_FROM[key]
            if origin is None
            else "--dsn"
            if origin == "connection string"
            else origin
        )
        used.append(f"{key} {value} ({where})")
    return (
        f"settings used: {', '.join(used)}; set them with --dsn "
        '"host=HOST port=PORT dbname=DATABASE user=USER" (or a postgresql:// URI) or with '
        f"{', '.join(_ENV.values())}; the password with PGPASSWORD or ~/.pgpass"
    )


def _run(
    config: ErasureConfig,
    ns: argparse.Namespace,
    clock: Any,
    out: TextIO,
    summary: RunSummary,
    progress: Progress | None,
) -> int:
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

    started = time.monotonic()

    async def main_loop() -> Any:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        ended = asyncio.Event()
        ticker = asyncio.create_task(progress.tick(ended)) if progress is not None else None
        try:
            if ns.once:
                return await run(config, ns.dsn, clock, once=True, stop=stop, summary=summary)
            return await run_forever(config, ns.dsn, clock, stop, summary)
        finally:
            ended.set()
            if ticker is not None:
                await ticker
            if progress is not None:
                if summary.total:
                    progress.draw(force=True)  # the last numbers, then the summary
                progress.clear()

    asyncio.run(main_loop())
    out.write(
        summary_line(
            config,
            summary.enqueued,
            [o.state for o in summary.outcomes],
            [o.rows for o in summary.outcomes],
            _vacuum_report(config, summary.vacuumed),
            time.monotonic() - started,
        )
        + "\n"
    )
    for o in summary.outcomes:
        if o.state != "verified" and o.error:
            out.write(f"  subject {o.subject}: {o.state}: {o.error}\n")
    return EXIT_FAILED if summary.failed else 0


def _vacuum_report(config: ErasureConfig, v: Vacuumed) -> VacuumReport:
    counts = (len(v.done), len(v.locked), len(v.not_allowed), len(v.failed))
    return VacuumReport(config.worker.vacuum, *counts, v.seconds, len(v.left))


def _print_outcome(
    config: ErasureConfig, o: Outcome, vacuumed: Vacuumed | None, out: TextIO
) -> None:
    rows = ", ".join(f"{t} {n}" for t, n in o.rows.items())
    report = None if vacuumed is None else _vacuum_report(config, vacuumed)
    out.write(f"subject {o.subject}: {o.state}; rows changed: {rows or 'none'}; ")
    out.write(f"{vacuum_text(report)}\n")
    if o.error:
        out.write(f"  {o.error}\n")


def _print_dry_run(config: ErasureConfig, result: DryRun, out: TextIO) -> None:
    for line in dry_run_table(config, result):
        out.write(line + "\n")


def _print_status(st: Status, out: TextIO) -> None:
    for line in status_lines(
        st.counts,
        st.not_queued,
        [
            ("running", st.counts.get("running", 0), "UPDATED", st.running),
            ("oldest pending", st.counts.get("pending", 0) + st.not_queued, "WAITING", st.pending),
            ("oldest failed", st.counts.get("failed", 0), "FAILED", st.failed),
        ],
    ):
        out.write(line + "\n")
