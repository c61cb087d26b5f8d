"""Runs erasure plans against PostgreSQL (asyncpg): claims jobs, erases in short batch
transactions that record their progress, verifies, and audits.

Guarantees, and how:

- *One worker per subject.* A job is claimed in a short transaction that picks the next
  job row with `FOR UPDATE SKIP LOCKED` (concurrent claimers never wait on each other) and
  takes a session advisory lock on the subject key; the lock lives as long as the worker's
  connection, so a job whose worker died (even `kill -9`) is claimable again as soon as the
  server notices the connection is gone, and never while its worker lives.
- *Resumable.* Each batch changes rows and records the job's progress (step, owner, last
  key, counts) in the same transaction; steps are idempotent (they only touch rows that
  still hold a value), so a run interrupted anywhere ends, when resumed, in the state an
  uninterrupted run reaches.
- *Short locks.* Every data transaction sets `lock_timeout` and `statement_timeout`
  (SET LOCAL); lock and statement timeouts are retried with back-off; an optional rate
  limit spaces batches.
- *Verified and audited.* After the last step, every configured column is counted for the
  subject; the job ends `verified` or `failed` (with the tables and columns that still hold
  values). The audit event is stored in the job row in the same transaction as the final
  state and written afterwards (an outbox), so a worker dying in between leaves it to be
  written by the next one, once.

Nothing here logs, stores or audits a personal value: only subject keys, table and column
names, counts, timings and SQLSTATEs.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import re
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
from proxy.logs import log

T = TypeVar("T")

# lock_not_available (lock_timeout), query_canceled (statement_timeout), serialization
# failure, deadlock: worth another try after a pause
TRANSIENT = frozenset({"55P03", "57014", "40001", "40P01"})

# connection exceptions, operator intervention (admin shutdown, crash): not the job's fault
CONNECTION_CLASSES = ("08", "57P")

Clock = Callable[[], datetime]


class Stopped(Exception):
    """The worker was asked to stop; the job stays where it is, to be resumed."""


class _GiveUp(Exception):
    """A batch kept hitting lock or statement timeouts."""

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
class _Progress:
    """What the current job has done in this process and not yet recorded."""

    step_started: float = 0.0
    pending_ms: float = 0.0  # the last batch's duration, recorded with the next update
    scanned: int = 0
    started: float = 0.0


_JOB_COLUMNS = (
    "subject_key, state, requested, plan_id, step, owners, owner_pos, last_key, rows, "
    "seconds, batches, longest_batch_ms, attempts, failures, error, remaining, audit_event, "
    "due_at, started_at"
)
_CLAIM = f"""
SELECT subject_key, state, requested FROM {JOB_TABLE}
 WHERE (state IN ('pending', 'running', 'done') OR audit_event IS NOT NULL)
   AND due_at <= $1 AND subject_key <> ALL($2::text[])
 ORDER BY due_at, subject_key
 LIMIT 1
   FOR UPDATE SKIP LOCKED
"""
_PROGRESS = f"""
UPDATE {JOB_TABLE} SET
    step = $2, owner_pos = $3, last_key = $4,
    owners = CASE WHEN $5 THEN NULL ELSE owners END,
    rows = jsonb_set(rows, ARRAY[$6::text],
                     to_jsonb(coalesce((rows ->> $6::text)::bigint, 0) + $7::bigint)),
    seconds = jsonb_set(seconds, ARRAY[$6::text],
                        to_jsonb(round(coalesce((seconds ->> $6::text)::numeric, 0)
                                       + $8::numeric, 3))),
    batches = batches + $9,
    longest_batch_ms = greatest(longest_batch_ms, $10::float8),
    updated_at = clock_timestamp()
 WHERE subject_key = $1
"""
_STATUS_RE = re.compile(r"^(?:UPDATE|DELETE) (\d+)$")


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
        w = config.worker
        self._begin = (
            f"BEGIN; SET LOCAL lock_timeout = '{int(w.lock_timeout_ms)}ms'; "
            f"SET LOCAL statement_timeout = '{int(w.statement_timeout_ms)}ms'"
        )
        self.batch_ms: list[float] = []  # every batch transaction's duration (for benchmarks)
        self.last_txn_ms = 0.0

    # -- transactions -----------------------------------------------------------------------

    async def _txn(self, body: Callable[[], Awaitable[T]], read_only: bool = False) -> T:
        """`body` in one transaction with the configured timeouts; `last_txn_ms` is how long
        it was open (the longest any of its locks can have been held)."""
        begin = (
            self._begin.replace("BEGIN", "BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY", 1)
            if read_only
            else self._begin
        )
        t0 = time.monotonic()
        await self.conn.execute(begin)
        try:
            result = await body()
            await self.conn.execute("COMMIT")
            self.last_txn_ms = (time.monotonic() - t0) * 1000
            return result
        except BaseException:
            if not self.conn.is_closed() and self.conn.is_in_transaction():
                # a broken connection: the server rolls back by itself
                with contextlib.suppress(asyncpg.PostgresError, asyncpg.InterfaceError, OSError):
                    await self.conn.execute("ROLLBACK")
            raise

    async def _retrying(
        self, table: str, body: Callable[[], Awaitable[T]], read_only: bool = False
    ) -> T:
        retries = self.config.worker.retries
        for attempt in range(retries + 1):
            try:
                return await self._txn(body, read_only)
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

    # -- queue ------------------------------------------------------------------------------

    async def enqueue_due(self) -> int:
        """Creates a pending job for every subject that is due and has none."""
        due = self.plan.due
        status = await self._txn(
            lambda: self.conn.execute(
                f"INSERT INTO {JOB_TABLE} (subject_key, due_at) "
                f"SELECT d.subject_key, d.due_at FROM ({due.text}) AS d "
                "ON CONFLICT (subject_key) DO NOTHING",
                self.clock(),
                *due.consts,
            )
        )
        return int(str(status).rsplit(" ", 1)[-1])

    async def claim(self, skip: set[str]) -> str | None:
        """Takes the next job (pending, interrupted, unverified, or with an audit event still
        to write) and its subject's advisory lock; None when there is none to take."""
        now = self.clock()
        tried = sorted(skip)
        async with self.conn.transaction():
            while True:
                row = await self.conn.fetchrow(_CLAIM, now, tried)
                if row is None:
                    return None
                key, state, requested = row["subject_key"], row["state"], row["requested"]
                tried.append(key)
                if not await self._try_lock(key):
                    continue  # its worker is alive and at it
                try:
                    taken = await self._take(key, state, requested, now)
                except BaseException:
                    await self._unlock(key)
                    raise
                if taken:
                    return str(key)

    async def _take(self, key: str, state: str, requested: bool, now: datetime) -> bool:
        """In the claim transaction, with the subject's lock: start or resume the job."""
        if state in ("verified", "failed"):
            return True  # only the audit event is left to write
        if state == "pending" and not requested:
            due = self.plan.due_one
            if await self.conn.fetchrow(due.text, now, key, *due.consts) is None:
                # terminated no more, or the retention changed: not to be touched
                await self.conn.execute(f"DELETE FROM {JOB_TABLE} WHERE subject_key = $1", key)
                await self._unlock(key)
                log.info("erasure.job.not_due", subject=key)
                return False
        await self._start(key)
        return True

    async def _start(self, key: str) -> None:
        await self.conn.execute(
            f"UPDATE {JOB_TABLE} SET state = CASE WHEN state = 'pending' THEN 'running' "
            "ELSE state END, attempts = attempts + 1, worker = $2, "
            "started_at = coalesce(started_at, clock_timestamp()), "
            "updated_at = clock_timestamp() WHERE subject_key = $1",
            key,
            self.worker,
        )

    async def _try_lock(self, key: str) -> bool:
        return bool(
            await self.conn.fetchval(
                "SELECT pg_try_advisory_lock($1, hashtext($2))", LOCK_CLASS, key
            )
        )

    async def _unlock(self, key: str) -> None:
        if not self.conn.is_closed():
            await self.conn.fetchval("SELECT pg_advisory_unlock($1, hashtext($2))", LOCK_CLASS, key)

    async def request(self, key: str) -> bool:
        """`erase subject KEY`: a job for KEY due now, restarted if it had ended, resumed if
        not; returns False when another worker holds it. On True the caller holds the lock
        and must `process` the job."""
        if not await self._try_lock(key):
            return False
        try:
            job = await self._job(key)
            if job is not None and job["audit_event"] is not None:
                await self._deliver(key, job["audit_event"], redelivery=True)
            await self.conn.execute(
                f"""
                INSERT INTO {JOB_TABLE} AS j (subject_key, due_at, requested)
                VALUES ($1, $2, true)
                ON CONFLICT (subject_key) DO UPDATE SET
                    requested = true,
                    due_at = least(j.due_at, excluded.due_at),
                    state = CASE WHEN j.state IN ('verified', 'failed') THEN 'pending'
                                 ELSE j.state END,
                    step = CASE WHEN j.state IN ('verified', 'failed') THEN 0 ELSE j.step END,
                    owners = CASE WHEN j.state IN ('verified', 'failed') THEN NULL
                                  ELSE j.owners END,
                    owner_pos = CASE WHEN j.state IN ('verified', 'failed') THEN 0
                                     ELSE j.owner_pos END,
                    last_key = CASE WHEN j.state IN ('verified', 'failed') THEN NULL
                                    ELSE j.last_key END,
                    failures = CASE WHEN j.state IN ('verified', 'failed') THEN 0
                                    ELSE j.failures END,
                    rows = CASE WHEN j.state IN ('verified', 'failed') THEN '{{}}'
                                ELSE j.rows END,
                    seconds = CASE WHEN j.state IN ('verified', 'failed') THEN '{{}}'
                                   ELSE j.seconds END,
                    batches = CASE WHEN j.state IN ('verified', 'failed') THEN 0
                                   ELSE j.batches END,
                    longest_batch_ms = CASE WHEN j.state IN ('verified', 'failed') THEN 0
                                            ELSE j.longest_batch_ms END,
                    remaining = NULL,
                    erased_at = CASE WHEN j.state IN ('verified', 'failed') THEN NULL
                                     ELSE j.erased_at END,
                    finished_at = NULL,
                    error = NULL,
                    updated_at = clock_timestamp()
                """,
                key,
                self.clock(),
            )
            await self._start(key)
        except BaseException:
            await self._unlock(key)
            raise
        return True

    # -- a job ------------------------------------------------------------------------------

    async def process(self, key: str) -> Outcome:
        """Works on a job whose lock this connection holds (from `claim` or `request`), then
        releases the lock."""
        try:
            return await self._process(key)
        finally:
            if not self.conn.is_closed():
                await self._unlock(key)

    async def _process(self, key: str) -> Outcome:
        job = await self._job(key)
        if job["audit_event"] is not None:
            await self._deliver(key, job["audit_event"], redelivery=True)
            return Outcome(key, "delivered", dict(job["rows"]), job["error"])
        if job["state"] in ("verified", "failed"):
            return Outcome(key, job["state"], dict(job["rows"]), job["error"])
        started = time.monotonic()
        try:
            if job["state"] == "running":
                log.info("erasure.job.start", subject=key, step=job["step"])
                await self._erase(job)
            remaining = await self._retrying(
                "verification", lambda: self._verify(key), read_only=True
            )
        except _GiveUp as exc:
            return await self._release(key, f"{exc.table}: {sqlstate_of(exc.cause)}")
        except _StepFailed as exc:
            error = f"{exc.table}: {sqlstate_of(exc.cause)}"
            return await self._finish(key, {}, error, started)
        return await self._finish(key, remaining, None, started)

    async def _job(self, key: str) -> Any:
        return await self.conn.fetchrow(
            f"SELECT {_JOB_COLUMNS} FROM {JOB_TABLE} WHERE subject_key = $1", key
        )

    async def _erase(self, job: Any) -> None:
        key = job["subject_key"]
        step_index, owners, pos, last = (
            job["step"],
            job["owners"],
            job["owner_pos"],
            job["last_key"],
        )
        if job["plan_id"] != self.plan.plan_id:
            # another configuration (or a partition added): start over; the steps only
            # touch rows that still hold values, so what was done stays done
            step_index, owners, pos, last = 0, None, 0, None
            await self.conn.execute(
                f"UPDATE {JOB_TABLE} SET plan_id = $2, step = 0, owners = NULL, "
                "owner_pos = 0, last_key = NULL WHERE subject_key = $1",
                key,
                self.plan.plan_id,
            )
        progress = _Progress(started=time.monotonic())
        steps = self.plan.steps
        for i in range(step_index, len(steps)):
            step = steps[i]
            progress.step_started = time.monotonic()
            if step.batched:
                await self._batched(key, i, step, owners if i == step_index else None,
                                    pos if i == step_index else 0,
                                    last if i == step_index else None, progress)  # fmt: skip
            else:
                await self._single(key, i, step, progress)
            log.info("erasure.step.done", subject=key, table=str(step.table))
        await self.conn.execute(
            f"UPDATE {JOB_TABLE} SET state = 'done', erased_at = clock_timestamp(), "
            "longest_batch_ms = greatest(longest_batch_ms, $2::float8), "
            "updated_at = clock_timestamp() WHERE subject_key = $1",
            key,
            progress.pending_ms,
        )

    async def _record(
        self,
        key: str,
        step_index: int,
        pos: int,
        last: str | None,
        clear_owners: bool,
        step: Step,
        changed: int,
        progress: _Progress,
        batches: int,
    ) -> None:
        now = time.monotonic()
        seconds = now - progress.step_started
        progress.step_started = now
        await self.conn.execute(
            _PROGRESS,
            key,
            step_index,
            pos,
            last,
            clear_owners,
            str(step.table),
            changed,
            round(seconds, 6),
            batches,
            progress.pending_ms,
        )

    async def _single(self, key: str, i: int, step: Step, progress: _Progress) -> None:
        async def body() -> None:
            status = await self.conn.execute(step.apply.text, key, *step.apply.consts)
            m = _STATUS_RE.match(str(status))
            changed = int(m.group(1)) if m else 0
            await self._record(key, i + 1, 0, None, True, step, changed, progress, 0)

        self._check_stop()
        await self._retrying(str(step.table), body)

    async def _batched(
        self,
        key: str,
        i: int,
        step: Step,
        owners: list[str] | None,
        pos: int,
        last: str | None,
        progress: _Progress,
    ) -> None:
        assert step.first_batch is not None and step.next_batch is not None
        table = str(step.table)
        if owners is None:
            self._check_stop()
            if step.owners is None:
                owners = [key]
            else:
                q = step.owners
                owners = [
                    r[0]
                    for r in await self._retrying(
                        table, lambda: self.conn.fetch(q.text, key, *q.consts)
                    )
                ]
            await self.conn.execute(
                f"UPDATE {JOB_TABLE} SET owners = $2, owner_pos = 0, last_key = NULL, "
                "updated_at = clock_timestamp() WHERE subject_key = $1",
                key,
                owners,
            )
            pos, last = 0, None
        while pos < len(owners):
            self._check_stop()
            scanned, last = await self._retrying(
                table, functools.partial(self._batch, key, i, step, owners, pos, last, progress)
            )
            self.batch_ms.append(self.last_txn_ms)
            progress.pending_ms = self.last_txn_ms  # recorded with the next update
            if last is None:
                pos += 1
            progress.scanned += scanned
            await self._throttle(progress)
        if not owners:
            await self._txn(lambda: self._record(key, i + 1, 0, None, True, step, 0, progress, 0))

    async def _batch(
        self,
        key: str,
        i: int,
        step: Step,
        owners: list[str],
        pos: int,
        after: str | None,
        progress: _Progress,
    ) -> tuple[int, str | None]:
        """One batch of owner `owners[pos]` after key `after`, and its progress record.
        Returns (rows scanned, the last key done; None when the owner is finished)."""
        limit = step.batch_size
        if after is None:
            sql = step.first_batch
            assert sql is not None
            row = await self.conn.fetchrow(sql.text, owners[pos], limit, *sql.consts)
        else:
            sql = step.next_batch
            assert sql is not None
            row = await self.conn.fetchrow(sql.text, owners[pos], after, limit, *sql.consts)
        hi, scanned, changed = row["hi"], int(row["scanned"]), int(row["changed"])
        # fewer keys than asked for: this owner is done
        npos, nlast = (pos + 1, None) if scanned < limit else (pos, hi)
        finished = npos >= len(owners)
        await self._record(
            key,
            i + 1 if finished else i,
            0 if finished else npos,
            nlast,
            finished,
            step,
            changed,
            progress,
            1,
        )
        return scanned, nlast

    async def _throttle(self, progress: _Progress) -> None:
        rate = self.config.worker.rate_limit
        if rate <= 0:
            return
        ahead = progress.started + progress.scanned / rate - time.monotonic()
        if ahead > 0:
            await asyncio.sleep(ahead)

    def _check_stop(self) -> None:
        if self.stop.is_set():
            raise Stopped

    # -- verification, outcome, audit ---------------------------------------------------------

    async def _verify(self, key: str) -> dict[str, int]:
        """Rows of the subject still holding a personal value, per table.column (or per
        table, for deleted tables); empty when the erasure is complete."""
        remaining: dict[str, int] = {}
        for step in self.plan.steps:
            row = await self.conn.fetchrow(step.verify.text, key, *step.verify.consts)
            if step.action == "delete":
                if row[0]:
                    remaining[str(step.table)] = int(row[0])
                continue
            for col, n in zip(step.columns, row, strict=True):
                if n:
                    remaining[f"{step.table}.{col}"] = int(n)
        return remaining

    async def _finish(
        self, key: str, remaining: dict[str, int], error: str | None, started: float
    ) -> Outcome:
        verified = error is None and not remaining
        if error is None and remaining:
            error = "verification failed: " + ", ".join(
                f"{name}: {n} row(s) still hold a value" for name, n in sorted(remaining.items())
            )
        state = "verified" if verified else "failed"
        job = await self._job(key)
        rows = {t: int(job["rows"][t]) for t in self.plan.step_names() if t in job["rows"]}
        event = {
            "job": uuid.uuid4().hex,
            "subject": key,
            "subject_table": str(self.config.subject.table),
            "database": await self.conn.fetchval("SELECT current_database()"),
            "state": state,
            "verified": verified,
            "tables": self.plan.step_names(),
            "rows": rows,
            "seconds": dict(job["seconds"]),
            "batches": int(job["batches"]),
            "longest_batch_ms": round(float(job["longest_batch_ms"]), 3),
            "attempts": int(job["attempts"]),
            "requested": bool(job["requested"]),
            "due_at": job["due_at"].isoformat(),
            "worker": self.worker,
            "remaining": remaining,
            "error": error,
            "duration_s": round(time.monotonic() - started, 3),
        }
        await self.conn.execute(
            f"UPDATE {JOB_TABLE} SET state = $2, error = $3, remaining = $4, audit_event = $5, "
            "finished_at = clock_timestamp(), updated_at = clock_timestamp() "
            "WHERE subject_key = $1",
            key,
            state,
            error,
            remaining,
            event,
        )
        if verified:
            log.info("erasure.job.verified", subject=key, rows=rows)
        else:
            log.error("erasure.job.failed", subject=key, error=error)
        await self._deliver(key, event, redelivery=False)
        return Outcome(key, state, rows, error)

    async def _deliver(self, key: str, event: dict[str, Any], redelivery: bool) -> None:
        await asyncio.to_thread(self.audit.write, event, redelivery)
        await self.conn.execute(
            f"UPDATE {JOB_TABLE} SET audit_event = NULL WHERE subject_key = $1", key
        )

    async def _release(self, key: str, error: str) -> Outcome:
        """Back to the queue after lock or statement timeouts; failed after too many."""
        row = await self.conn.fetchrow(
            f"UPDATE {JOB_TABLE} SET failures = failures + 1, error = $2, "
            "updated_at = clock_timestamp() WHERE subject_key = $1 RETURNING failures",
            key,
            error,
        )
        if int(row["failures"]) >= self.config.worker.max_failures:
            return await self._finish(
                key, {}, f"{error}; gave up after {row['failures']} attempts", time.monotonic()
            )
        log.warning("erasure.job.postponed", subject=key, error=error)
        job = await self._job(key)
        rows = {t: int(job["rows"][t]) for t in self.plan.step_names() if t in job["rows"]}
        return Outcome(key, "postponed", rows, error)

    # -- read-only views ----------------------------------------------------------------------

    async def count(self, key: str) -> list[tuple[str, int]]:
        """Dry run: rows each step would change for `key` (read-only transaction)."""

        async def body() -> list[tuple[str, int]]:
            out = []
            for step in self.plan.steps:
                n = await self.conn.fetchval(step.count.text, key, *step.count.consts)
                out.append((str(step.table), int(n)))
            return out

        return await self._txn(body, read_only=True)
