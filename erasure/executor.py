"""Runs erasure plans against PostgreSQL (asyncpg): claims jobs, erases in short batch
statements that record their own progress, verifies, and audits.

Guarantees, and how:

- *One worker per subject.* A job is claimed by one statement that picks the next job row
  with `FOR UPDATE SKIP LOCKED` (concurrent claimers never wait on each other) and takes a
  session advisory lock on the subject key; the lock lives as long as the worker's
  connection, so a job whose worker died (even `kill -9`) is claimable again as soon as the
  server notices the connection is gone, and never while its worker lives.
- *Resumable.* Each batch is one statement that changes the rows and, in a data-modifying
  CTE of the same statement, records the job's progress (step, owner, last key, counts):
  both happen or neither. Steps only touch rows that still hold a value, so a run
  interrupted anywhere ends, when resumed, in the state an uninterrupted run reaches.
- *Short locks.* The connection's `lock_timeout` and `statement_timeout` bound every
  statement, hence every batch's transaction; lock and statement timeouts are retried with
  back-off, then the job is postponed; an optional rate limit spaces batches.
- *Verified and audited.* After the last step one statement counts, per configured column,
  the subject's rows that still hold a value; the job ends `verified` or `failed` (naming
  what remains). The audit event is stored in the job row by the statement that records
  the outcome and written afterwards (an outbox), so a worker dying in between leaves it
  to the next one, which writes it once.

Every statement it runs is built by the pure planner (erasure.planner: the plan's and the
job table's); this module binds their parameters, runs them and keeps the job in step.

Nothing here logs, stores or audits a personal value: only subject keys, table and column
names, counts, timings and SQLSTATEs.
"""

from __future__ import annotations

import asyncio
import functools
import os
import socket
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, TypeVar

import asyncpg

from erasure.audit import ErasureAudit
from erasure.db import sqlstate_of
from erasure.model import ErasureConfig, TableName
from erasure.planner import (
    AUDIT_EVENT_SQL,
    CLEAR_EVENT_SQL,
    CLEAR_EVENT_UNLOCK_SQL,
    CLEAR_EVENTS_UNLOCK_SQL,
    DATABASE_SQL,
    FINISH_SQL,
    JOB_ROW_SQL,
    LOCK_CLASS,
    RELEASE_SQL,
    REQUEST_SQL,
    RESET_SETTINGS_SQL,
    TRY_LOCK_SQL,
    UNLOCK_SQL,
    VACUUM_SETTINGS_SQL,
    Plan,
    Step,
    batch_sql,
    claim_sql,
    drop_not_due_sql,
    enqueue_due_sql,
    owners_sql,
    rest_sql,
    vacuum_sql,
    waiting_sql,
)
from rules.catalog_read import may_vacuum
from shared.logs import log

T = TypeVar("T")

# lock_not_available (lock_timeout), query_canceled (statement_timeout), serialization
# failure, deadlock: worth another try after a pause
TRANSIENT = frozenset({"55P03", "57014", "40001", "40P01"})
# audit events are written in groups (one fsync): at most this many, at most this late
AUDIT_GROUP = 64
AUDIT_DELAY_S = 1.0
# connection exceptions, operator intervention (admin shutdown, crash): not the job's fault
CONNECTION_CLASSES = ("08", "57P")
# VACUUM (SKIP_LOCKED)'s warning for a table another process holds
LOCK_NOT_AVAILABLE = "55P03"

Clock = Callable[[], datetime]


class Stopped(Exception):
    """The worker was asked to stop; the job stays where it is, to be resumed."""


class _GiveUp(Exception):
    """A statement kept hitting lock or statement timeouts."""

    def __init__(self, table: str, cause: BaseException) -> None:
        super().__init__(table)
        self.table = table
        self.cause = cause


class _StepFailed(Exception):
    def __init__(self, table: str, cause: asyncpg.PostgresError) -> None:
        super().__init__(table)
        self.table = table
        self.cause = cause


def worker_name(index: int = 0) -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{index}"


@dataclass
class Outcome:
    subject: str
    state: str  # verified, failed, postponed (timeouts; claimable again), delivered
    rows: dict[str, int] = field(default_factory=dict)
    error: str | None = None


@dataclass
class Vacuumed:
    """What VACUUM after erasure did: tables vacuumed, skipped because another process held
    them (autovacuum, a VACUUM, DDL), skipped because the worker's role may not vacuum them
    (owner or superuser), failed (with the SQLSTATE), left to autovacuum because the worker
    was stopping, and how long it took."""

    done: list[str] = field(default_factory=list)
    locked: list[str] = field(default_factory=list)
    not_allowed: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    left: list[str] = field(default_factory=list)  # not tried: the worker was stopping
    seconds: float = 0.0

    def add(self, other: Vacuumed) -> None:
        for mine, theirs in (
            (self.done, other.done),
            (self.locked, other.locked),
            (self.not_allowed, other.not_allowed),
            (self.failed, other.failed),
            (self.left, other.left),
        ):
            mine.extend(t for t in theirs if t not in mine)
        self.seconds += other.seconds


@dataclass
class Job:
    """A claimed job, as recorded, kept in step with what this worker records."""

    subject: str
    state: str
    requested: bool
    step: int
    owners: list[str] | None
    owner_pos: int
    last_key: str | None
    rows: dict[str, int]
    seconds: dict[str, float]
    batches: int
    longest_batch_ms: float
    attempts: int
    due_at: datetime
    audit_event: dict[str, Any] | None

    @classmethod
    def of(cls, r: Any) -> Job:
        return cls(
            subject=r["subject_key"],
            state=r["state"],
            requested=r["requested"],
            step=r["step"],
            owners=list(r["owners"]) if r["owners"] is not None else None,
            owner_pos=r["owner_pos"],
            last_key=r["last_key"],
            rows={k: int(v) for k, v in r["rows"].items()},
            seconds={k: float(v) for k, v in r["seconds"].items()},
            batches=int(r["batches"]),
            longest_batch_ms=float(r["longest_batch_ms"]),
            attempts=int(r["attempts"]),
            due_at=r["due_at"],
            audit_event=r["audit_event"],
        )


class Executor:
    """Erasure work on one connection (one job at a time)."""

    def __init__(
        self,
        conn: Any,
        config: ErasureConfig,
        plan: Plan,
        audit: ErasureAudit,
        clock: Clock,
        worker: str,
        stop: asyncio.Event | None = None,
    ) -> None:
        self.conn = conn
        self.config = config
        self.plan = plan
        self.audit = audit
        self.clock = clock
        self.worker = worker
        self.stop = stop or asyncio.Event()
        self.batch_ms: list[float] = []  # every batch statement's duration (for benchmarks)
        self.rows_changed = 0  # by this connection's batches so far (for progress)
        self._database: str | None = None
        self._sql: dict[tuple[str, int], str] = {}
        self._claim = claim_sql(plan)
        self._outbox: list[tuple[str, dict[str, Any]]] = []  # recorded, not yet written
        self._outbox_since = 0.0
        self._next_batch = 0.0  # rate limit: when the next batch may start

    # -- statements -------------------------------------------------------------------------

    async def _retrying(self, table: str, body: Callable[[], Awaitable[T]]) -> T:
        """`body` (one statement, hence one transaction), again after lock or statement
        timeouts; other errors fail the job, lost connections end the worker."""
        retries = self.config.worker.retries
        for attempt in range(retries + 1):
            try:
                return await body()
            except asyncpg.PostgresError as exc:
                code = getattr(exc, "sqlstate", None) or ""
                if code.startswith(CONNECTION_CLASSES):
                    raise  # the connection is gone: the job is resumed by whoever comes next
                if code not in TRANSIENT:
                    raise _StepFailed(table, exc) from exc
                if attempt == retries:
                    raise _GiveUp(table, exc) from exc
                log.warning(
                    "erasure.retry", table=table, error=sqlstate_of(exc), attempt=attempt + 1
                )
                await asyncio.sleep(min(5.0, 0.1 * 2**attempt))
        raise AssertionError("unreachable")  # pragma: no cover

    async def _timed(self, sql: str, args: list[object]) -> tuple[Any, float]:
        """One row of `sql`, and how long the statement (its transaction) took, in ms."""
        t0 = time.monotonic()
        row = await self.conn.fetchrow(sql, *args)
        return row, (time.monotonic() - t0) * 1000

    # -- queue ------------------------------------------------------------------------------

    async def enqueue_due(self) -> int:
        """Creates a pending job for every subject that is due and has none, and drops the
        pending jobs of subjects no longer due (terminated no more, or a longer retention)."""
        drop = drop_not_due_sql(self.plan)
        dropped = await self.conn.execute(drop.text, self.clock(), *drop.consts)
        if dropped != "DELETE 0":
            log.info("erasure.jobs.not_due", dropped=int(str(dropped).rsplit(" ", 1)[-1]))
        due = enqueue_due_sql(self.plan)
        status = await self.conn.execute(due.text, self.clock(), *due.consts)
        return int(str(status).rsplit(" ", 1)[-1])

    async def claim(self, skip: set[str]) -> Job | None:
        """Takes the next job (pending, interrupted, unverified, or with an audit event still
        to write) and its subject's advisory lock; None when there is none to take."""
        now = self.clock()
        tried = sorted(skip)
        while True:
            row = await self.conn.fetchrow(
                self._claim, now, tried, self.worker, self.plan.plan_id, *self.plan.due_job.consts
            )
            if row is None:
                return None
            key = row["claimed"]
            tried.append(key)
            if not row["locked"]:
                continue  # its worker is alive and at it
            if row["subject_key"] is None:  # a finished job: only its audit event is left
                job = Job.of(await self.conn.fetchrow(JOB_ROW_SQL, key))
                if job.audit_event is not None:
                    return job
                await self._unlock(key)
                continue
            return Job.of(row)

    async def _try_lock(self, key: str) -> bool:
        return bool(await self.conn.fetchval(TRY_LOCK_SQL, LOCK_CLASS, key))

    async def _unlock(self, key: str) -> None:
        if not self.conn.is_closed():
            await self.conn.fetchval(UNLOCK_SQL, LOCK_CLASS, key)

    async def request(self, key: str) -> Job | None:
        """`erase subject KEY`: a job for KEY due now, restarted if it had ended, resumed if
        not; None when another worker holds it. The caller then holds the subject's lock
        and must `process` the job."""
        if not await self._try_lock(key):
            return None
        try:
            row = await self.conn.fetchrow(AUDIT_EVENT_SQL, key)
            if row is not None and row["audit_event"] is not None:
                await self._deliver(key, row["audit_event"], redelivery=True, unlock=False)
            row = await self.conn.fetchrow(
                REQUEST_SQL,
                key,
                self.clock(),
                self.worker,
                self.plan.plan_id,
            )
        except BaseException:
            await self._unlock(key)
            raise
        return Job.of(row)

    # -- a job ------------------------------------------------------------------------------

    async def process(self, job: Job) -> Outcome:
        """Works on a job whose lock this connection holds (from `claim` or `request`). The
        lock is released at once, or, for a finished job, when its audit event is written
        (`flush`): until then no other worker may write the event too."""
        held = False
        try:
            if job.audit_event is not None:
                await self._deliver(job.subject, job.audit_event, redelivery=True, unlock=True)
                held = True  # released by _deliver
                ev = job.audit_event
                return Outcome(job.subject, "delivered", dict(ev["rows"]), ev.get("error"))
            outcome = await self._process(job)
            held = outcome.state in ("verified", "failed")
            return outcome
        finally:
            if not held and not self.conn.is_closed():
                await self._unlock(job.subject)

    async def _process(self, job: Job) -> Outcome:
        started = time.monotonic()
        try:
            if job.state == "running":
                log.info("erasure.job.start", subject=job.subject, step=job.step)
                await self._erase(job)
            self._check_stop()
            remaining = await self._retrying("verification", lambda: self._verify(job.subject))
        except _GiveUp as exc:
            return await self._release(job, f"{exc.table}: {sqlstate_of(exc.cause)}")
        except _StepFailed as exc:
            return await self._finish(job, {}, f"{exc.table}: {sqlstate_of(exc.cause)}", started)
        return await self._finish(job, remaining, None, started)

    async def _erase(self, job: Job) -> None:
        batched = self.plan.batched
        for i in range(job.step, len(batched)):
            await self._batched(job, i, batched[i])
            log.info("erasure.step.done", subject=job.subject, table=str(batched[i].table))
        if self.plan.rest is not None and job.step == len(batched):
            self._check_stop()
            await self._rest(job)
            for table in self.plan.rest_tables:
                log.info("erasure.step.done", subject=job.subject, table=str(table))

    def _batch_sql(self, i: int, step: Step, first: bool) -> str:
        cache_key = ("first" if first else "next", i)
        if cache_key not in self._sql:
            self._sql[cache_key] = batch_sql(step, first)
        return self._sql[cache_key]

    async def _owners(self, job: Job, i: int, step: Step) -> list[str]:
        """The owners of the step's rows, recorded in the job (so a resumed run walks the
        same list); a step with none is finished at once."""
        if step.owners is None:
            return [job.subject]
        q = step.owners
        sql = owners_sql(step)
        phases = self.plan.phases
        owners: list[str] = await self._retrying(
            str(step.table),
            lambda: self.conn.fetchval(
                sql,
                job.subject,
                *q.consts,
                job.subject,
                i,
                phases,
            ),
        )
        if not owners:
            job.step = i + 1
            job.owners, job.owner_pos, job.last_key = None, 0, None
        else:
            job.owners, job.owner_pos, job.last_key = owners, 0, None
        return list(owners)

    async def _batched(self, job: Job, i: int, step: Step) -> None:
        table = str(step.table)
        if job.step != i or job.owners is None:
            job.step = i
            owners = await self._owners(job, i, step)
            if not owners:
                return
        owners = job.owners or [job.subject]
        step_started = time.monotonic()
        base_seconds = job.seconds.get(table, 0.0)
        prev_ms = 0.0
        while job.step == i:
            self._check_stop()
            await self._flush_if_due()
            pos, after = job.owner_pos, job.last_key
            first = after is None
            sql = self._batch_sql(i, step, first)
            dynamic: list[object] = [owners[pos]]
            if not first:
                dynamic.append(after)
            dynamic.append(step.batch_size)
            seconds = dict(job.seconds)
            seconds[table] = round(base_seconds + time.monotonic() - step_started, 3)
            args = [
                *dynamic,
                *((step.first_batch if first else step.next_batch).consts),  # type: ignore[union-attr]
                job.subject,
                i,
                pos,
                len(owners),
                table,
                seconds,
                prev_ms,
                self.plan.phases,
            ]
            batch_started = time.monotonic()
            row, ms = await self._retrying(table, functools.partial(self._timed, sql, args))
            self.batch_ms.append(ms)
            prev_ms = ms
            job.longest_batch_ms = max(job.longest_batch_ms, ms)
            scanned, changed = int(row["scanned"]), int(row["changed"])
            job.rows[table] = job.rows.get(table, 0) + changed
            self.rows_changed += changed
            job.seconds = seconds
            job.batches += 1
            if scanned < step.batch_size:
                if pos + 1 >= len(owners):
                    job.step, job.owners, job.owner_pos, job.last_key = i + 1, None, 0, None
                else:
                    job.owner_pos, job.last_key = pos + 1, None
            else:
                job.last_key = row["hi"]
            await self._throttle(batch_started, scanned)
        job.seconds[table] = round(base_seconds + time.monotonic() - step_started, 3)

    async def _rest(self, job: Job) -> None:
        rest = self.plan.rest
        assert rest is not None
        tables = [str(t) for t in self.plan.rest_tables]
        sql = rest_sql(self.plan)
        args = [job.subject, *rest.consts, job.subject, *tables, self.plan.phases]
        row, ms = await self._retrying(", ".join(tables), functools.partial(self._timed, sql, args))
        self.batch_ms.append(ms)
        job.longest_batch_ms = max(job.longest_batch_ms, ms)
        for k, table in enumerate(tables):
            job.rows[table] = job.rows.get(table, 0) + int(row[k])
            self.rows_changed += int(row[k])
            # one statement for all of them: its time is divided equally
            job.seconds[table] = round(job.seconds.get(table, 0.0) + ms / 1000 / len(tables), 3)
        job.step = self.plan.phases
        job.state = "done"

    async def _throttle(self, batch_started: float, rows: int) -> None:
        """Paces batches to `rate_limit` rows per second on this connection: the next batch
        may start once this one's rows are paid for (unused time is not saved up)."""
        rate = self.config.worker.rate_limit
        if rate <= 0:
            return
        self._next_batch = max(self._next_batch, batch_started) + rows / rate
        delay = self._next_batch - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)

    def _check_stop(self) -> None:
        if self.stop.is_set():
            raise Stopped

    # -- verification, outcome, audit ---------------------------------------------------------

    async def _verify(self, key: str) -> dict[str, int]:
        """Rows of the subject still holding a personal value, per table.column (or per
        table, for deleted tables), in one statement (one snapshot); empty when complete."""
        v = self.plan.verify
        row = await self.conn.fetchrow(v.text, key, *v.consts)
        remaining: dict[str, int] = {}
        for step, counts in zip(self.plan.steps, row, strict=True):
            if step.action == "delete":
                if counts[0]:
                    remaining[str(step.table)] = int(counts[0])
                continue
            for col, n in zip(step.columns, counts, strict=True):
                if n:
                    remaining[f"{step.table}.{col}"] = int(n)
        return remaining

    async def _finish(
        self, job: Job, remaining: dict[str, int], error: str | None, started: float
    ) -> Outcome:
        verified = error is None and not remaining
        if error is None and remaining:
            error = "verification failed: " + ", ".join(
                f"{name}: {n} row(s) still hold a value" for name, n in sorted(remaining.items())
            )
        state = "verified" if verified else "failed"
        if self._database is None:
            self._database = str(await self.conn.fetchval(DATABASE_SQL))
        names = self.plan.step_names()
        rows = {t: job.rows.get(t, 0) for t in names}
        event = {
            "job": uuid.uuid4().hex,
            "subject": job.subject,
            "subject_table": str(self.config.subject.table),
            "database": self._database,
            "state": state,
            "verified": verified,
            "tables": names,
            "rows": rows,
            "seconds": {t: round(job.seconds.get(t, 0.0), 3) for t in names},
            "batches": job.batches,
            "longest_batch_ms": round(job.longest_batch_ms, 3),
            "attempts": job.attempts,
            "requested": job.requested,
            "due_at": job.due_at.isoformat(),
            "worker": self.worker,
            "remaining": remaining,
            "error": error,
            "duration_s": round(time.monotonic() - started, 3),
        }
        await self.conn.execute(
            FINISH_SQL,
            job.subject,
            state,
            error,
            remaining,
            event,
            rows,
            event["seconds"],
            job.longest_batch_ms,
        )
        if verified:
            log.info("erasure.job.verified", subject=job.subject, rows=rows)
        else:
            log.error("erasure.job.failed", subject=job.subject, error=error)
        self._outbox.append((job.subject, event))
        if len(self._outbox) == 1:
            self._outbox_since = time.monotonic()
        await self._flush_if_due()
        return Outcome(job.subject, state, rows, error)

    async def _flush_if_due(self) -> None:
        if len(self._outbox) >= AUDIT_GROUP or (
            self._outbox and time.monotonic() - self._outbox_since >= AUDIT_DELAY_S
        ):
            await self.flush()

    async def flush(self) -> None:
        """Writes the finished jobs' audit events (one fsync for the group), clears them from
        the jobs and releases the subjects. Called when the group is full or old enough, and
        whenever the worker pauses or stops."""
        if not self._outbox or self.conn.is_closed():
            return
        keys = [k for k, _ in self._outbox]
        await asyncio.to_thread(self.audit.write_many, [e for _, e in self._outbox], False)
        self._outbox.clear()
        await self.conn.execute(
            CLEAR_EVENTS_UNLOCK_SQL,
            keys,
        )

    async def _deliver(
        self, key: str, event: dict[str, Any], redelivery: bool, unlock: bool
    ) -> None:
        """Writes the audit event, then clears it from the job (and releases the subject)."""
        await asyncio.to_thread(self.audit.write, event, redelivery)
        if unlock:
            await self.conn.fetchval(CLEAR_EVENT_UNLOCK_SQL, key)
        else:
            await self.conn.execute(CLEAR_EVENT_SQL, key)

    async def _release(self, job: Job, error: str) -> Outcome:
        """Back to the queue after lock or statement timeouts; failed after too many."""
        failures = await self.conn.fetchval(
            RELEASE_SQL,
            job.subject,
            error,
        )
        if int(failures) >= self.config.worker.max_failures:
            return await self._finish(
                job, {}, f"{error}; gave up after {failures} attempts", time.monotonic()
            )
        log.warning("erasure.job.postponed", subject=job.subject, error=error)
        rows = {t: job.rows[t] for t in self.plan.step_names() if t in job.rows}
        return Outcome(job.subject, "postponed", rows, error)

    # -- after erasure ------------------------------------------------------------------------

    async def vacuum(self, tables: list[TableName]) -> Vacuumed:
        """VACUUM (ANALYZE) each of `tables` (outside a transaction block: this connection
        has none open between jobs), so that the old row versions that still hold erased
        values are pruned and the column statistics are sampled from what is left. A
        table another process holds is skipped (VACUUM's SKIP_LOCKED: the server warns,
        recognised here by its SQLSTATE, never its text), as is one the worker's role may
        not vacuum."""
        out = Vacuumed()
        warnings: list[str] = []

        def listener(_conn: Any, message: Any) -> None:
            warnings.append(str(getattr(message, "sqlstate", "") or ""))

        started = time.monotonic()
        major = self.conn.get_server_version().major
        self.conn.add_log_listener(listener)
        try:
            await self.conn.execute(VACUUM_SETTINGS_SQL)
            for table in tables:
                warnings.clear()
                try:
                    if not await may_vacuum(self.conn.fetch, table.sql, major):
                        out.not_allowed.append(str(table))
                        continue
                    await self.conn.execute(vacuum_sql(table))
                except asyncpg.PostgresError as exc:
                    code = getattr(exc, "sqlstate", None) or ""
                    if code.startswith(CONNECTION_CLASSES):
                        raise
                    out.failed.append(f"{table}: {sqlstate_of(exc)}")
                    log.warning("erasure.vacuum.failed", table=str(table), error=sqlstate_of(exc))
                    continue
                if LOCK_NOT_AVAILABLE in warnings:
                    out.locked.append(str(table))
                else:
                    out.done.append(str(table))
        finally:
            self.conn.remove_log_listener(listener)
            if not self.conn.is_closed():
                await self.conn.execute(RESET_SETTINGS_SQL)
        out.seconds = time.monotonic() - started
        log.info(
            "erasure.vacuum",
            tables=out.done,
            locked=out.locked,
            not_allowed=out.not_allowed,
            failed=len(out.failed),
            seconds=round(out.seconds, 3),
        )
        return out

    async def waiting(self) -> int:
        """How many jobs workers would take now (a pass's total, for its progress)."""
        w = waiting_sql(self.plan)
        return int(await self.conn.fetchval(w.text, self.clock(), *w.consts))

    # -- read-only views ----------------------------------------------------------------------

    async def count(self, key: str) -> list[tuple[str, int]]:
        """Dry run: rows each step would change for `key` (one read-only transaction)."""
        out = []
        async with self.conn.transaction(isolation="repeatable_read", readonly=True):
            for step in self.plan.steps:
                n = await self.conn.fetchval(step.count.text, key, *step.count.consts)
                out.append((str(step.table), int(n)))
        return out
