"""The erasure worker: checks the configuration against the database, then queues due
subjects and erases them (a loop with a poll interval, or once), one subject on request,
a dry run, and the status of the jobs.

Every entry point first reads the catalog and refuses a bad configuration (with every
problem listed) before it changes anything. `clock` gives the time that decides which
subjects are due (injectable for tests); leases and timings use the database's and the
process's own clocks. Connections are the caller's DSN; nothing here prints.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import asyncpg

from erasure.audit import ErasureAudit
from erasure.catalog import check
from erasure.db import (
    ConnectError,
    check_placeholders,
    configured_names,
    connect,
    ensure_job_table,
    job_table_exists,
    read_catalog,
)
from erasure.executor import Clock, Executor, Outcome, Stopped, Vacuumed, worker_name
from erasure.model import ErasureConfig, TableName
from erasure.planner import JOB_TABLE, LOCK_CLASS, Plan, build_plan
from erasure.report import JobLine, error_class
from shared.logs import log


class Refused(Exception):
    """The configuration does not fit the database; nothing was changed."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


class UserError(Exception):
    """A mistake in what was asked (an unknown subject, one being erased elsewhere)."""


@dataclass
class RunSummary:
    enqueued: int = 0
    outcomes: list[Outcome] = field(default_factory=list)
    batch_ms: list[float] = field(default_factory=list)
    live: list[Executor] = field(default_factory=list)  # working now (their batches so far)
    started: bool = False  # the configuration was accepted and the job table is there
    vacuumed: Vacuumed = field(default_factory=Vacuumed)
    rows_before: int = 0  # rows changed by the executors of earlier passes
    # the pass under way, for its progress: jobs to take, outcomes before it, its start
    passes: int = 0
    total: int = 0
    pass_first: int = 0
    pass_rows: int = 0
    pass_started: float = field(default_factory=time.monotonic)
    activity: str = ""  # what the worker does besides jobs (VACUUM), for its progress
    on_change: Callable[[], None] | None = None  # a pass began, a job ended, activity

    def all_batch_ms(self) -> list[float]:
        """Every batch's duration: of finished runs and of the executors working now."""
        return [*self.batch_ms, *(ms for ex in list(self.live) for ms in ex.batch_ms)]

    def rows_changed(self) -> int:
        """Rows changed so far by this process (those of the jobs under way included)."""
        return self.rows_before + sum(ex.rows_changed for ex in list(self.live))

    def progress(self) -> tuple[int, int, int, float]:
        """The pass under way: jobs done, jobs to do in all, rows changed, seconds."""
        done = len(self.outcomes) - self.pass_first
        rows = self.rows_changed() - self.pass_rows
        return done, self.total, rows, time.monotonic() - self.pass_started

    def begin_pass(self, total: int) -> None:
        self.passes += 1
        self.total = total
        self.pass_first = len(self.outcomes)
        self.pass_rows = self.rows_changed()
        self.pass_started = time.monotonic()
        self.changed()

    def add(self, outcome: Outcome) -> None:
        self.outcomes.append(outcome)
        self.changed()

    def changed(self) -> None:
        if self.on_change is not None:
            self.on_change()

    @property
    def failed(self) -> list[Outcome]:
        return [o for o in self.outcomes if o.state in ("failed", "postponed")]


async def _connect(config: ErasureConfig, dsn: str) -> Any:
    w = config.worker
    return await connect(dsn, w.lock_timeout_ms, w.statement_timeout_ms)


async def prepare(conn: Any, config: ErasureConfig) -> Plan:
    """The plan, or `Refused` with every problem of the configuration against the catalog."""
    catalog = await read_catalog(conn, configured_names(config))
    problems = check(config, catalog)
    if not problems:
        problems = await check_placeholders(conn, config, catalog)
    if problems:
        raise Refused(problems)
    return build_plan(config, catalog)


async def run(
    config: ErasureConfig,
    dsn: str,
    clock: Clock,
    once: bool,
    stop: asyncio.Event | None = None,
    summary: RunSummary | None = None,
) -> RunSummary:
    """Queue due subjects and erase them: until `stop` is set, or one pass with `once`.
    Adds to `summary` when one is given (it is then up to date if this raises)."""
    stop = stop or asyncio.Event()
    summary = summary if summary is not None else RunSummary()
    audit = ErasureAudit(config.audit)
    conns: list[Any] = []
    executors: list[Executor] = []
    try:
        conns.append(await _connect(config, dsn))
        plan = await prepare(conns[0], config)
        await ensure_job_table(conns[0])
        summary.started = True
        for _ in range(1, config.worker.concurrency):
            conns.append(await _connect(config, dsn))
        executors += [
            Executor(c, config, plan, audit, clock, worker_name(i), stop)
            for i, c in enumerate(conns)
        ]
        summary.live = executors
        while not stop.is_set():
            summary.enqueued += await executors[0].enqueue_due()
            summary.begin_pass(await executors[0].waiting())
            done: set[str] = set()  # each job at most once per pass
            await asyncio.gather(*(_work(ex, done, summary) for ex in executors))
            if config.worker.vacuum == "run":
                changed = changed_tables(plan, summary.outcomes[summary.pass_first :])
                if changed and stop.is_set():
                    # stopping: a VACUUM of large tables would hold up the shutdown
                    summary.vacuumed.left.extend(str(t) for t in changed)
                    log.info("erasure.vacuum.left", tables=[str(t) for t in changed])
                elif changed:
                    summary.activity = f"VACUUM of {len(changed)} table(s)"
                    summary.changed()
                    try:
                        summary.vacuumed.add(await executors[0].vacuum(changed))
                    finally:
                        summary.activity = ""
            if once or stop.is_set():
                break
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), config.worker.poll_interval_s)
        return summary
    finally:
        summary.live = []
        for ex in executors:
            summary.batch_ms.extend(ex.batch_ms)
            summary.rows_before += ex.rows_changed
        for c in conns:
            with contextlib.suppress(Exception):
                await c.close()


def changed_tables(plan: Plan, outcomes: list[Outcome]) -> list[TableName]:
    """The plan's tables in which these jobs changed rows (what VACUUM is for)."""
    changed = {t for o in outcomes for t, n in o.rows.items() if n}
    return [t for t in plan.tables if str(t) in changed]


async def _work(ex: Executor, done: set[str], summary: RunSummary) -> None:
    try:
        while not ex.stop.is_set():
            job = await ex.claim(done)
            if job is None:
                break
            done.add(job.subject)
            try:
                outcome = await ex.process(job)
            except Stopped:
                log.info("erasure.job.interrupted", subject=job.subject)
                break
            if ex.config.worker.vacuum == "job":
                changed = changed_tables(ex.plan, [outcome])
                if changed:
                    summary.vacuumed.add(await ex.vacuum(changed))
            summary.add(outcome)
    except BaseException:
        # the events already recorded in their jobs are written by whoever comes next
        with contextlib.suppress(Exception):
            await ex.flush()
        raise
    await ex.flush()


async def run_forever(
    config: ErasureConfig,
    dsn: str,
    clock: Clock,
    stop: asyncio.Event,
    summary: RunSummary | None = None,
) -> RunSummary:
    """`run` until `stop`, surviving lost connections, server restarts and an audit file
    that cannot be written for a while (it starts again, with back-off). A configuration
    the database refuses, or a first connection that fails, still ends it."""
    summary = summary if summary is not None else RunSummary()
    delay = 1.0
    while not stop.is_set():
        try:
            return await run(config, dsn, clock, once=False, stop=stop, summary=summary)
        except (
            OSError,
            ConnectError,
            asyncpg.InterfaceError,
            asyncpg.PostgresConnectionError,
        ) as exc:
            if not summary.started:
                raise
            log.error("erasure.interrupted", error=type(exc).__name__, retry_in_s=delay)
        except asyncpg.PostgresError as exc:
            code = getattr(exc, "sqlstate", "") or ""
            if not summary.started or not code.startswith(("08", "57P")):
                raise
            log.error("erasure.interrupted", error=f"SQLSTATE {code}", retry_in_s=delay)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), delay)
        delay = min(delay * 2, 60.0)
    return summary


async def _subject_exists(conn: Any, plan: Plan, key: str, config: ErasureConfig) -> None:
    try:
        found = await conn.fetchval(plan.exists.text, key, *plan.exists.consts)
    except (asyncpg.DataError, asyncpg.InvalidTextRepresentationError) as exc:
        raise UserError(
            f"'{key}' is not a valid key of {config.subject.table}.{config.subject.key}"
        ) from exc
    if not found:
        raise UserError(f"no subject {key} in {config.subject.table}")


async def erase_subject(
    config: ErasureConfig, dsn: str, clock: Clock, key: str
) -> tuple[Outcome, Vacuumed | None]:
    """Erase one subject now, whether due or not (e.g. on the person's request), then
    VACUUM the tables it changed (unless `worker.vacuum` is off: None)."""
    conn = await _connect(config, dsn)
    try:
        plan = await prepare(conn, config)
        await _subject_exists(conn, plan, key, config)
        await ensure_job_table(conn)
        ex = Executor(conn, config, plan, ErasureAudit(config.audit), clock, worker_name())
        job = await ex.request(key)
        if job is None:
            raise UserError(f"subject {key} is being erased by another worker; try again later")
        outcome = await ex.process(job)
        await ex.flush()
        if config.worker.vacuum == "off":
            return outcome, None
        changed = changed_tables(plan, [outcome])
        return outcome, (await ex.vacuum(changed) if changed else Vacuumed())
    finally:
        await conn.close()


DryRun = list[tuple[str, list[tuple[str, int]]]]


async def dry_run(config: ErasureConfig, dsn: str, clock: Clock, key: str | None) -> DryRun:
    """Per subject (the one given, or every due one not yet erased, in the order of the
    subject key's type) and table, the rows an erasure would change. Read-only: it creates
    nothing, not even the job table."""
    conn = await _connect(config, dsn)
    try:
        plan = await prepare(conn, config)
        ex = Executor(conn, config, plan, ErasureAudit(config.audit), clock, worker_name())
        if key is not None:
            await _subject_exists(conn, plan, key, config)
            subjects = [key]
        else:
            subjects = await _due_unfinished(conn, plan, clock())
        return [(s, await ex.count(s)) for s in subjects]
    finally:
        await conn.close()


async def _due_unfinished(conn: Any, plan: Plan, now: datetime) -> list[str]:
    """The due subjects not erased yet, in the order of the subject key's type."""
    due = plan.due
    order = f"d.subject_key::text::{plan.key_type}"
    if await job_table_exists(conn):
        rows = await conn.fetch(
            f"SELECT d.subject_key FROM ({due.text}) AS d WHERE NOT EXISTS (SELECT 1 FROM "
            f"{JOB_TABLE} AS j WHERE j.subject_key = d.subject_key "
            f"AND j.state IN ('verified', 'failed')) ORDER BY {order}",
            now,
            *due.consts,
        )
    else:
        rows = await conn.fetch(
            f"SELECT d.subject_key FROM ({due.text}) AS d ORDER BY {order}",
            now,
            *due.consts,
        )
    return [str(r[0]) for r in rows]


STATUS_LIMIT = 5  # jobs listed per section of `erase status`


@dataclass(frozen=True)
class Status:
    """`erase status`: jobs per state (due subjects with no job yet apart), and the oldest
    pending, the oldest failed and the running jobs (at most `STATUS_LIMIT` each)."""

    counts: dict[str, int]
    not_queued: int
    pending: list[JobLine]
    failed: list[JobLine]
    running: list[JobLine]


async def status(
    config: ErasureConfig, dsn: str, clock: Clock, limit: int = STATUS_LIMIT
) -> Status:
    conn = await _connect(config, dsn)
    try:
        plan = await prepare(conn, config)
        # what each phase of a job erases: a large table, then all the others at once
        names = [str(s.table) for s in plan.batched]
        if plan.rest is not None:
            names.append(", ".join(str(t) for t in plan.rest_tables))
        due = plan.due
        key = f"::text::{plan.key_type}"  # subject keys in the order of their type
        now = clock()
        queued = await job_table_exists(conn)
        unqueued = f"SELECT d.subject_key, d.due_at FROM ({due.text}) AS d"
        if queued:
            unqueued += (
                f" WHERE NOT EXISTS (SELECT 1 FROM {JOB_TABLE} AS j "
                "WHERE j.subject_key = d.subject_key)"
            )
        not_queued = int(
            await conn.fetchval(f"SELECT count(*) FROM ({unqueued}) AS u", now, *due.consts)
        )
        pending_sql = (
            "SELECT u.subject_key, u.due_at, false AS queued, 0 AS attempts, 0 AS failures, "
            f"NULL::text AS error FROM ({unqueued}) AS u"
        )
        counts: dict[str, int] = {}
        failed_rows: list[Any] = []
        running_rows: list[Any] = []
        if queued:
            counts = {
                str(r[0]): int(r[1])
                for r in await conn.fetch(f"SELECT state, count(*) FROM {JOB_TABLE} GROUP BY state")
            }
            pending_sql += (
                " UNION ALL SELECT j.subject_key, j.due_at, true, j.attempts, j.failures, "
                f"j.error FROM {JOB_TABLE} AS j WHERE j.state = 'pending'"
            )
            failed_rows = await conn.fetch(
                "SELECT subject_key, due_at, attempts, error, extract(epoch FROM "
                "clock_timestamp() - coalesce(finished_at, updated_at))::float8 AS age "
                f"FROM {JOB_TABLE} WHERE state = 'failed' "
                f"ORDER BY coalesce(finished_at, updated_at), subject_key{key} LIMIT {limit}"
            )
            running_rows = await conn.fetch(
                f"""
                SELECT j.subject_key, j.due_at, j.attempts, j.step, j.worker,
                       extract(epoch FROM clock_timestamp() - j.updated_at)::float8 AS age,
                       EXISTS (SELECT 1 FROM pg_locks AS l
                                WHERE l.locktype = 'advisory' AND l.granted
                                  AND l.database = (SELECT oid FROM pg_database
                                                     WHERE datname = current_database())
                                  AND l.classid = $1::oid AND l.objsubid = 2
                                  AND l.objid = hashtext(j.subject_key)::oid) AS held
                  FROM {JOB_TABLE} AS j WHERE j.state = 'running'
                 ORDER BY j.due_at, j.subject_key{key} LIMIT {limit}
                """,
                LOCK_CLASS,
            )
        pending_rows = await conn.fetch(
            f"SELECT p.*, extract(epoch FROM $1::timestamptz - p.due_at)::float8 AS age "
            f"FROM ({pending_sql}) AS p ORDER BY p.due_at, p.subject_key{key} LIMIT {limit}",
            now,
            *due.consts,
        )
    finally:
        await conn.close()

    def pending_note(r: Any) -> str:
        if not r["queued"]:
            return "due, not queued yet"
        if r["failures"]:
            return f"postponed {r['failures']} time(s): {error_class(r['error'])}"
        return ""

    def running_note(r: Any) -> str:
        step = int(r["step"])
        table = f" {names[step]}" if step < len(names) else ""
        holder = f"by {r['worker']}" if r["held"] else "interrupted: no worker holds it"
        return f"step {step + 1}/{len(names)}{table}; {holder}"

    def line(r: Any, note: str) -> JobLine:
        return JobLine(r["subject_key"], r["due_at"], float(r["age"]), int(r["attempts"]), note)

    return Status(
        counts=counts,
        not_queued=not_queued,
        pending=[line(r, pending_note(r)) for r in pending_rows],
        failed=[line(r, error_class(r["error"])) for r in failed_rows],
        running=[line(r, running_note(r)) for r in running_rows],
    )


def fixed_clock(at: datetime) -> Callable[[], datetime]:
    return lambda: at
