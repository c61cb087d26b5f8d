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
from erasure.db import JOB_TABLE, LOCK_CLASS, sqlstate_of
from erasure.model import ErasureConfig
from erasure.planner import Plan, Step
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


_JOB_COLUMNS = (
    "subject_key, state, requested, step, owners, owner_pos, last_key, rows, seconds, "
    "batches, longest_batch_ms, attempts, due_at, audit_event"
)
_J = ", ".join(f"j.{c.strip()}" for c in _JOB_COLUMNS.split(","))


def _claim_sql(plan: Plan) -> str:
    """The next job, its subject's advisory lock, and (if it is still to be erased) its
    start, in one statement. A pending job is taken only while its subject is still due
    (terminated, retention over) or was asked for. `l` is referenced twice, so it is
    evaluated once: one lock attempt."""
    assert plan.due_job.dynamic == 4
    return f"""
WITH c AS (
    SELECT j.subject_key, j.state, j.requested FROM {JOB_TABLE} AS j
     WHERE (j.state IN ('running', 'done') OR j.audit_event IS NOT NULL
            OR (j.state = 'pending' AND (j.requested OR EXISTS ({plan.due_job.text}))))
       AND j.due_at <= $1 AND j.subject_key <> ALL($2::text[])
     ORDER BY j.due_at, j.subject_key
     LIMIT 1
       FOR UPDATE OF j SKIP LOCKED
), l AS (
    SELECT c.*, pg_try_advisory_lock({LOCK_CLASS}, hashtext(c.subject_key)) AS locked FROM c
), u AS (
    UPDATE {JOB_TABLE} AS j SET
        state = CASE WHEN j.state = 'pending' OR j.plan_id IS DISTINCT FROM $4 THEN 'running'
                     ELSE j.state END,
        attempts = j.attempts + 1,
        worker = $3,
        started_at = coalesce(j.started_at, clock_timestamp()),
        plan_id = $4,
        step = CASE WHEN j.plan_id IS DISTINCT FROM $4 THEN 0 ELSE j.step END,
        owners = CASE WHEN j.plan_id IS DISTINCT FROM $4 THEN NULL ELSE j.owners END,
        owner_pos = CASE WHEN j.plan_id IS DISTINCT FROM $4 THEN 0 ELSE j.owner_pos END,
        last_key = CASE WHEN j.plan_id IS DISTINCT FROM $4 THEN NULL ELSE j.last_key END,
        updated_at = clock_timestamp()
      FROM l
     WHERE j.subject_key = l.subject_key AND l.locked
       AND l.state IN ('pending', 'running', 'done') AND j.audit_event IS NULL
    RETURNING {_J}
)
SELECT l.subject_key AS claimed, l.locked, u.* FROM l LEFT JOIN u ON true
"""


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
        self._database: str | None = None
        self._sql: dict[tuple[str, int], str] = {}
        self._claim = _claim_sql(plan)
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
        check = self.plan.due_job1
        dropped = await self.conn.execute(
            f"DELETE FROM {JOB_TABLE} AS j WHERE j.state = 'pending' AND NOT j.requested "
            f"AND NOT EXISTS ({check.text})",
            self.clock(),
            *check.consts,
        )
        if dropped != "DELETE 0":
            log.info("erasure.jobs.not_due", dropped=int(str(dropped).rsplit(" ", 1)[-1]))
        due = self.plan.due
        status = await self.conn.execute(
            f"INSERT INTO {JOB_TABLE} (subject_key, due_at) "
            f"SELECT d.subject_key, d.due_at FROM ({due.text}) AS d "
            "ON CONFLICT (subject_key) DO NOTHING",
            self.clock(),
            *due.consts,
        )
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
                job = Job.of(
                    await self.conn.fetchrow(
                        f"SELECT {_JOB_COLUMNS} FROM {JOB_TABLE} WHERE subject_key = $1", key
                    )
                )
                if job.audit_event is not None:
                    return job
                await self._unlock(key)
                continue
            return Job.of(row)

    async def _try_lock(self, key: str) -> bool:
        return bool(
            await self.conn.fetchval(
                "SELECT pg_try_advisory_lock($1, hashtext($2))", LOCK_CLASS, key
            )
        )

    async def _unlock(self, key: str) -> None:
        if not self.conn.is_closed():
            await self.conn.fetchval("SELECT pg_advisory_unlock($1, hashtext($2))", LOCK_CLASS, key)

    async def request(self, key: str) -> Job | None:
        """`erase subject KEY`: a job for KEY due now, restarted if it had ended, resumed if
        not; None when another worker holds it. The caller then holds the subject's lock
        and must `process` the job."""
        if not await self._try_lock(key):
            return None
        try:
            row = await self.conn.fetchrow(
                f"SELECT audit_event FROM {JOB_TABLE} WHERE subject_key = $1", key
            )
            if row is not None and row["audit_event"] is not None:
                await self._deliver(key, row["audit_event"], redelivery=True, unlock=False)
            ended = "j.state IN ('verified', 'failed')"
            restart = {
                "step": "0",
                "owners": "NULL",
                "owner_pos": "0",
                "last_key": "NULL",
                "rows": "'{}'",
                "seconds": "'{}'",
                "batches": "0",
                "longest_batch_ms": "0",
                "failures": "0",
                "erased_at": "NULL",
            }
            sets = ", ".join(
                f"{c} = CASE WHEN {ended} OR j.plan_id IS DISTINCT FROM $4 THEN {v} ELSE j.{c} END"
                for c, v in restart.items()
            )
            row = await self.conn.fetchrow(
                f"""
                INSERT INTO {JOB_TABLE} AS j (subject_key, due_at, requested, state, plan_id,
                                              attempts, worker, started_at)
                VALUES ($1, $2, true, 'running', $4, 1, $3, clock_timestamp())
                ON CONFLICT (subject_key) DO UPDATE SET
                    {sets},
                    state = CASE WHEN {ended} OR j.plan_id IS DISTINCT FROM $4
                                      OR j.state = 'pending' THEN 'running' ELSE j.state END,
                    requested = true, due_at = least(j.due_at, excluded.due_at), plan_id = $4,
                    attempts = j.attempts + 1, worker = $3, error = NULL, remaining = NULL,
                    finished_at = NULL, started_at = coalesce(j.started_at, clock_timestamp()),
                    updated_at = clock_timestamp()
                RETURNING {_J}
                """,
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

    def _progress(self, job: Job, i: int, finished_expr: str, base: int) -> str:
        """The job-progress CTE `p` of a batch statement: `finished_expr` says (in SQL)
        whether the statement finishes its owner; parameters from `$base`: subject, step,
        owner position, number of owners, table, seconds so far, the previous statement's
        milliseconds, number of phases."""
        n = [f"${base + k}" for k in range(8)]
        subject, step, pos, owners, table, seconds, prev_ms, phases = n
        last_owner = f"({finished_expr} AND {pos}::int + 1 >= {owners}::int)"
        new_step = f"(CASE WHEN {last_owner} THEN {step}::int + 1 ELSE {step}::int END)"
        return (
            f"p AS (UPDATE {JOB_TABLE} SET "
            f"step = {new_step}, "
            f"owner_pos = CASE WHEN {last_owner} THEN 0 WHEN {finished_expr} "
            f"THEN {pos}::int + 1 ELSE {pos}::int END, "
            f"last_key = CASE WHEN {finished_expr} THEN NULL ELSE (SELECT hi::text FROM r) END, "
            f"owners = CASE WHEN {last_owner} THEN NULL ELSE owners END, "
            f"rows = jsonb_set(rows, ARRAY[{table}::text], to_jsonb(coalesce((rows ->> "
            f"{table}::text)::bigint, 0) + (SELECT count(*) FROM u))), "
            f"seconds = {seconds}::jsonb, "
            f"batches = batches + 1, "
            f"longest_batch_ms = greatest(longest_batch_ms, {prev_ms}::float8), "
            f"state = CASE WHEN {new_step} >= {phases}::int THEN 'done' ELSE state END, "
            f"erased_at = CASE WHEN {new_step} >= {phases}::int THEN clock_timestamp() "
            "ELSE erased_at END, "
            f"updated_at = clock_timestamp() WHERE subject_key = {subject}::text RETURNING 1)"
        )

    def _batch_sql(self, job: Job, i: int, step: Step, first: bool) -> str:
        sql = step.first_batch if first else step.next_batch
        assert sql is not None
        cache_key = ("first" if first else "next", i)
        if cache_key not in self._sql:
            limit = "$2" if first else "$3"
            finished = f"((SELECT n FROM r) < {limit}::bigint)"
            self._sql[cache_key] = (
                f"{sql.text}, {self._progress(job, i, finished, sql.nparams + 1)} "
                "SELECT (SELECT hi::text FROM r) AS hi, (SELECT n FROM r) AS scanned, "
                "(SELECT count(*) FROM u) AS changed"
            )
        return self._sql[cache_key]

    async def _owners(self, job: Job, i: int, step: Step) -> list[str]:
        """The owners of the step's rows, recorded in the job (so a resumed run walks the
        same list); a step with none is finished at once."""
        if step.owners is None:
            return [job.subject]
        q = step.owners
        phases = self.plan.phases
        owners: list[str] = await self._retrying(
            str(step.table),
            lambda: self.conn.fetchval(
                f"WITH o AS MATERIALIZED ({q.text}), "
                f"a AS (SELECT coalesce(array_agg(o), '{{}}') AS owners FROM o), "
                f"p AS (UPDATE {JOB_TABLE} SET owners = (SELECT owners FROM a), owner_pos = 0, "
                f"last_key = NULL, "
                f"step = CASE WHEN (SELECT cardinality(owners) FROM a) = 0 "
                f"THEN ${q.nparams + 2}::int + 1 ELSE ${q.nparams + 2}::int END, "
                f"state = CASE WHEN (SELECT cardinality(owners) FROM a) = 0 "
                f"AND ${q.nparams + 2}::int + 1 >= ${q.nparams + 3}::int THEN 'done' "
                f"ELSE state END, "
                f"updated_at = clock_timestamp() WHERE subject_key = ${q.nparams + 1}::text "
                "RETURNING 1) "
                "SELECT owners FROM a",
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
            sql = self._batch_sql(job, i, step, first)
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
        base = rest.nparams
        merges = ", ".join(
            f"${base + 2 + k}::text, coalesce((rows ->> ${base + 2 + k}::text)::bigint, 0) "
            f"+ (SELECT count(*) FROM s{k})"
            for k in range(len(tables))
        )
        sql = (
            f"{rest.text}, p AS (UPDATE {JOB_TABLE} SET step = ${base + 2 + len(tables)}::int, "
            f"state = 'done', erased_at = clock_timestamp(), "
            f"rows = rows || jsonb_build_object({merges}), updated_at = clock_timestamp() "
            f"WHERE subject_key = ${base + 1}::text RETURNING 1) SELECT "
            + ", ".join(f"(SELECT count(*) FROM s{k})" for k in range(len(tables)))
        )
        args = [job.subject, *rest.consts, job.subject, *tables, self.plan.phases]
        row, ms = await self._retrying(", ".join(tables), functools.partial(self._timed, sql, args))
        self.batch_ms.append(ms)
        job.longest_batch_ms = max(job.longest_batch_ms, ms)
        for k, table in enumerate(tables):
            job.rows[table] = job.rows.get(table, 0) + int(row[k])
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
            self._database = str(await self.conn.fetchval("SELECT current_database()"))
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
            f"UPDATE {JOB_TABLE} SET state = $2, error = $3, remaining = $4, audit_event = $5, "
            "rows = $6, seconds = $7, longest_batch_ms = greatest(longest_batch_ms, $8), "
            "finished_at = clock_timestamp(), updated_at = clock_timestamp() "
            "WHERE subject_key = $1",
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
            f"WITH c AS (UPDATE {JOB_TABLE} SET audit_event = NULL "
            "WHERE subject_key = ANY($1::text[])) "
            f"SELECT pg_advisory_unlock({LOCK_CLASS}, hashtext(k)) FROM unnest($1::text[]) AS k",
            keys,
        )

    async def _deliver(
        self, key: str, event: dict[str, Any], redelivery: bool, unlock: bool
    ) -> None:
        """Writes the audit event, then clears it from the job (and releases the subject)."""
        await asyncio.to_thread(self.audit.write, event, redelivery)
        clear = f"UPDATE {JOB_TABLE} SET audit_event = NULL WHERE subject_key = $1"
        if unlock:
            await self.conn.fetchval(
                f"WITH c AS ({clear}) SELECT pg_advisory_unlock({LOCK_CLASS}, hashtext($1))", key
            )
        else:
            await self.conn.execute(clear, key)

    async def _release(self, job: Job, error: str) -> Outcome:
        """Back to the queue after lock or statement timeouts; failed after too many."""
        failures = await self.conn.fetchval(
            f"UPDATE {JOB_TABLE} SET failures = failures + 1, error = $2, "
            "updated_at = clock_timestamp() WHERE subject_key = $1 RETURNING failures",
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

    # -- read-only views ----------------------------------------------------------------------

    async def count(self, key: str) -> list[tuple[str, int]]:
        """Dry run: rows each step would change for `key` (one read-only transaction)."""
        out = []
        async with self.conn.transaction(isolation="repeatable_read", readonly=True):
            for step in self.plan.steps:
                n = await self.conn.fetchval(step.count.text, key, *step.count.consts)
                out.append((str(step.table), int(n)))
        return out
