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
from erasure.executor import Clock, Executor, Outcome, Stopped, worker_name
from erasure.model import ErasureConfig
from erasure.planner import JOB_TABLE, LOCK_CLASS, Plan, build_plan
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

    def all_batch_ms(self) -> list[float]:
        """Every batch's duration: of finished runs and of the executors working now."""
        return [*self.batch_ms, *(ms for ex in list(self.live) for ms in ex.batch_ms)]

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
            done: set[str] = set()  # each job at most once per pass
            await asyncio.gather(*(_work(ex, done, summary) for ex in executors))
            if once or stop.is_set():
                break
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), config.worker.poll_interval_s)
        return summary
    finally:
        summary.live = []
        for ex in executors:
            summary.batch_ms.extend(ex.batch_ms)
        for c in conns:
            with contextlib.suppress(Exception):
                await c.close()


async def _work(ex: Executor, done: set[str], summary: RunSummary) -> None:
    try:
        while not ex.stop.is_set():
            job = await ex.claim(done)
            if job is None:
                break
            done.add(job.subject)
            try:
                summary.outcomes.append(await ex.process(job))
            except Stopped:
                log.info("erasure.job.interrupted", subject=job.subject)
                break
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


async def erase_subject(config: ErasureConfig, dsn: str, clock: Clock, key: str) -> Outcome:
    """Erase one subject now, whether due or not (e.g. on the person's request)."""
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
        return outcome
    finally:
        await conn.close()


DryRun = list[tuple[str, list[tuple[str, int]]]]


async def dry_run(config: ErasureConfig, dsn: str, clock: Clock, key: str | None) -> DryRun:
    """Per subject (the one given, or every due one not yet erased) and table, the rows an
    erasure would change. Read-only: it creates nothing, not even the job table."""
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
    due = plan.due
    if await job_table_exists(conn):
        rows = await conn.fetch(
            f"SELECT d.subject_key FROM ({due.text}) AS d WHERE NOT EXISTS (SELECT 1 FROM "
            f"{JOB_TABLE} AS j WHERE j.subject_key = d.subject_key "
            "AND j.state IN ('verified', 'failed')) ORDER BY d.due_at, d.subject_key",
            now,
            *due.consts,
        )
    else:
        rows = await conn.fetch(
            f"SELECT d.subject_key FROM ({due.text}) AS d ORDER BY d.due_at, d.subject_key",
            now,
            *due.consts,
        )
    return [str(r[0]) for r in rows]


@dataclass(frozen=True)
class JobStatus:
    subject: str
    state: str  # pending, running, done, verified, failed; "queued" False: due, no job yet
    queued: bool
    due_at: datetime
    step: int
    steps: int
    table: str | None  # the table being erased, while running
    rows: dict[str, int]
    attempts: int
    failures: int
    worker: str | None
    held: bool  # a live worker holds the job
    error: str | None
    updated_at: datetime | None


async def status(config: ErasureConfig, dsn: str, clock: Clock) -> list[JobStatus]:
    conn = await _connect(config, dsn)
    try:
        plan = await prepare(conn, config)
        out: list[JobStatus] = []
        # what each phase of a job erases: a large table, then all the others at once
        names = [str(s.table) for s in plan.batched]
        if plan.rest is not None:
            names.append(", ".join(str(t) for t in plan.rest_tables))
        if await job_table_exists(conn):
            rows = await conn.fetch(
                f"""
                SELECT j.subject_key, j.state, j.due_at, j.step, j.rows, j.attempts,
                       j.failures, j.worker, j.error, j.updated_at,
                       EXISTS (SELECT 1 FROM pg_locks AS l
                                WHERE l.locktype = 'advisory' AND l.granted
                                  AND l.database = (SELECT oid FROM pg_database
                                                     WHERE datname = current_database())
                                  AND l.classid = $1::oid AND l.objsubid = 2
                                  AND l.objid = hashtext(j.subject_key)::oid) AS held
                  FROM {JOB_TABLE} AS j
                 ORDER BY array_position(ARRAY['running', 'pending', 'done', 'failed',
                                               'verified'], j.state), j.due_at, j.subject_key
                """,
                LOCK_CLASS,
            )
            for r in rows:
                step = int(r["step"])
                out.append(
                    JobStatus(
                        subject=r["subject_key"],
                        state=r["state"],
                        queued=True,
                        due_at=r["due_at"],
                        step=step,
                        steps=len(names),
                        table=names[step]
                        if r["state"] == "running" and step < len(names)
                        else None,
                        rows=dict(r["rows"]),
                        attempts=int(r["attempts"]),
                        failures=int(r["failures"]),
                        worker=r["worker"],
                        held=bool(r["held"]),
                        error=r["error"],
                        updated_at=r["updated_at"],
                    )
                )
        known = {s.subject for s in out}
        due = plan.due
        for r in await conn.fetch(
            f"SELECT d.subject_key, d.due_at FROM ({due.text}) AS d ORDER BY d.due_at",
            clock(),
            *due.consts,
        ):
            if r["subject_key"] not in known:
                out.append(
                    JobStatus(
                        subject=r["subject_key"],
                        state="pending",
                        queued=False,
                        due_at=r["due_at"],
                        step=0,
                        steps=len(names),
                        table=None,
                        rows={},
                        attempts=0,
                        failures=0,
                        worker=None,
                        held=False,
                        error=None,
                        updated_at=None,
                    )
                )
        return out
    finally:
        await conn.close()


def fixed_clock(at: datetime) -> Callable[[], datetime]:
    return lambda: at
