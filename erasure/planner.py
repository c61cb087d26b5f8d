"""The erasure planner: configuration + catalog -> the ordered SQL that erases one subject.

Pure: builds statements and their constant bind values, runs nothing. Every identifier is
quoted with `quote_ident`; every value (subject keys, owner keys, batch bounds,
placeholders, JSON paths, retention periods, the current time) is a bind parameter.
Keys travel as text and are cast in SQL to the column's type (`$1::text::bigint`), so the
executor can store progress of any key type in its job row.

Order: the configured columns that find rows (keys, owner columns) are never erased and a
table that others are found through is never deleted from (the loader refuses both), so
every step finds the same rows whenever it runs: the steps are idempotent (they change only
rows that still hold a value) and independent of one another. The plan still lists tables
children first (xDRs and recordings before accounts, accounts before the customer). Large
tables are erased in batches, one after the other; all other tables in one statement.

Statement shapes (the executor passes the leading, dynamic parameters; constants follow):

- `Step.owners`       $1 subject key -> rows (owner key as text), ordered
- `Step.first_batch`  $1 owner key, $2 limit               } a WITH prefix defining r (hi, n:
- `Step.next_batch`   $1 owner key, $2 last key, $3 limit  } the batch's last key and size)
                                                             and u (a row per changed row)
- `Plan.rest`         $1 subject key -> a WITH prefix defining s0, s1, ... (a row per row
                                        changed in each of `Plan.rest_tables`)
- `Step.count`        $1 subject key -> rows that would change (dry run)
- `Step.verify`       $1 subject key -> remaining count per column
- `Plan.verify`       $1 subject key -> one row: per step, an array of remaining counts
- `Plan.due`          $1 now -> (subject_key, due_at)
- `Plan.due_one`      $1 now, $2 subject key -> (subject_key, due_at)
- `Plan.due_job`      $1 now, for the job row `j` of the claim statement (constants from $5)
- `Plan.due_job1`     $1 now, for a job row `j` (constants from $2)
- `Plan.exists`       $1 subject key -> whether the subject exists

The job table's statements are built here too (the last section: `claim_sql`,
`batch_sql`, `owners_sql`, `rest_sql`, ...): they append the job's progress to a step's
statement as CTEs (recorded in the same statement, so atomically with the change), with
their parameters after `Sql.nparams`. The executor only binds and runs them.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from erasure.catalog import INTEGER_TYPES, Catalog, Column, Relation
from erasure.model import ColumnAction, ErasureConfig, TableName, TableSpec
from shared.quoting import quote_ident

Q = quote_ident
CLAIM_PARAMS = 4  # the executor's claim statement passes $1 (now) to $4 before `due_job`


class PlanError(Exception):
    """The configuration does not fit the catalog (run `erasure.catalog.check` first)."""


@dataclass(frozen=True)
class Sql:
    text: str
    consts: tuple[object, ...] = ()  # bound after the dynamic parameters
    dynamic: int = 1  # how many leading parameters the executor passes

    @property
    def nparams(self) -> int:
        return self.dynamic + len(self.consts)


@dataclass(frozen=True)
class Step:
    table: TableName
    action: str  # "update" or "delete"
    columns: tuple[str, ...]  # erased columns (names only)
    batched: bool
    batch_size: int
    owners: Sql | None  # None: the owner is the subject itself
    first_batch: Sql | None
    next_batch: Sql | None
    count: Sql
    verify: Sql


@dataclass(frozen=True)
class Plan:
    steps: tuple[Step, ...]  # every configured table, children first
    rest: Sql | None  # the tables that are not batched, in one statement
    rest_tables: tuple[TableName, ...]
    verify: Sql
    due: Sql
    due_one: Sql
    due_job: Sql  # correlated with j.subject_key of the claim; $1 now, constants from $5
    due_job1: Sql  # the same with constants from $2
    exists: Sql
    plan_id: str
    key_type: str  # the subject key's SQL type: subject keys sort in its order

    @property
    def tables(self) -> tuple[TableName, ...]:
        """The tables the plan changes (partitioned ones as the parent), in step order."""
        return tuple(s.table for s in self.steps)

    @property
    def batched(self) -> tuple[Step, ...]:
        """The batched steps, in order; the executor's step i < len(batched) is one of
        them, step len(batched) is `rest`."""
        return tuple(s for s in self.steps if s.batched)

    @property
    def phases(self) -> int:
        return len(self.batched) + (1 if self.rest is not None else 0)

    def step_names(self) -> list[str]:
        return [str(s.table) for s in self.steps]


class _Binder:
    """Numbers constant parameters after the `dynamic` leading ones."""

    def __init__(self, dynamic: int) -> None:
        self.dynamic = dynamic
        self.values: list[object] = []

    def bind(self, value: object, cast: str) -> str:
        self.values.append(value)
        return f"${self.dynamic + len(self.values)}::{cast}"


class _Planner:
    def __init__(self, config: ErasureConfig, catalog: Catalog) -> None:
        self.config = config
        self.catalog = catalog
        self.by_name = {t.table: t for t in config.tables}

    def rel(self, name: TableName) -> Relation:
        rel = self.catalog.get(name)
        if rel is None:
            raise PlanError(f"table {name} is not in the catalog")
        return rel

    def col(self, name: TableName, column: str) -> Column:
        c = self.rel(name).columns.get(column)
        if c is None:
            raise PlanError(f"{name} has no column {column}")
        return c

    def depth(self, spec: TableSpec) -> int:
        n = 0
        cur = spec
        while cur.owner is not None:
            n += 1
            if cur.owner.through is None:
                break
            cur = self.by_name[cur.owner.through]
        return n

    # -- ownership --------------------------------------------------------------------------

    def owned(self, spec: TableSpec, alias: str, level: int = 0) -> str:
        """The condition that a row (`alias`) of `spec` belongs to the subject $1."""
        subject = self.config.subject
        if spec.owner is None:
            ktype = self.col(spec.table, subject.key).type
            return f"{alias}.{Q(subject.key)} = $1::text::{ktype}"
        otype = self.col(spec.table, spec.owner.column).type
        if spec.owner.through is None:
            return f"{alias}.{Q(spec.owner.column)} = $1::text::{otype}"
        parent = self.by_name[spec.owner.through]
        p = f"p{level}"
        return (
            f"{alias}.{Q(spec.owner.column)} IN (SELECT {p}.{Q(spec.owner.key)} "
            f"FROM {parent.table.sql} AS {p} WHERE {self.owned(parent, p, level + 1)})"
        )

    def owners(self, spec: TableSpec) -> Sql | None:
        if spec.owner is None or spec.owner.through is None:
            return None
        parent = self.by_name[spec.owner.through]
        k = Q(spec.owner.key)
        return Sql(
            f"SELECT o::text FROM (SELECT DISTINCT p.{k} AS o FROM {parent.table.sql} AS p "
            f"WHERE {self.owned(parent, 'p', 1)} AND p.{k} IS NOT NULL) AS s ORDER BY o"
        )

    # -- column actions ---------------------------------------------------------------------

    def placeholder(self, spec: TableSpec, a: ColumnAction, b: _Binder) -> str:
        """The placeholder as text (with `{key}` replaced by the row's key)."""
        assert a.placeholder is not None
        text = b.bind(a.placeholder, "text")
        if a.uses_key:
            assert spec.key is not None
            return f"replace({text}, '{{key}}', t.{Q(spec.key)}::text)"
        return text

    def paths(self, a: ColumnAction, b: _Binder) -> list[str]:
        return [b.bind(list(path), "text[]") for path in a.json_paths]

    def set_and_needs(self, spec: TableSpec, a: ColumnAction, b: _Binder) -> tuple[str, str]:
        """(`col = new value`, condition that the row still holds a personal value)."""
        col = self.col(spec.table, a.column)
        c = f"t.{Q(a.column)}"
        target = Q(a.column)
        if a.kind == "null":
            return f"{target} = NULL", f"{c} IS NOT NULL"
        if a.kind == "placeholder":
            value = f"({self.placeholder(spec, a, b)})::{col.type}"
            return f"{target} = {value}", f"{c} IS DISTINCT FROM {value}"
        as_jsonb = c if col.base == "jsonb" else f"{c}::jsonb"
        paths = self.paths(a, b)
        if a.kind == "json_remove":
            expr = as_jsonb
            for p in paths:
                expr = f"({expr} #- {p})"
            needs = " OR ".join(f"({as_jsonb} #> {p}) IS NOT NULL" for p in paths)
        else:
            value = f"pg_catalog.to_jsonb({self.placeholder(spec, a, b)})"
            expr = as_jsonb
            for p in paths:
                expr = f"pg_catalog.jsonb_set({expr}, {p}, {value}, false)"
            needs = " OR ".join(
                f"(({as_jsonb} #> {p}) IS NOT NULL "
                f"AND ({as_jsonb} #> {p}) IS DISTINCT FROM {value})"
                for p in paths
            )
        if col.base != "jsonb":
            expr = f"({expr})::{col.type}"
        return f"{target} = {expr}", f"({needs})"

    # -- steps ------------------------------------------------------------------------------

    def change(self, spec: TableSpec, dynamic: int) -> tuple[str, str, tuple[object, ...]]:
        """(SET list, condition that a row still needs a change, constant bind values)."""
        b = _Binder(dynamic)
        pairs = [self.set_and_needs(spec, a, b) for a in spec.columns]
        sets = ", ".join(s for s, _ in pairs)
        needs = " OR ".join(n for _, n in pairs) if pairs else "true"
        return sets, needs, tuple(b.values)

    def step(self, spec: TableSpec) -> Step:
        table = spec.table.sql
        batched = spec.large and spec.owner is not None
        batch_size = spec.batch_size or self.config.worker.batch_size

        owned = self.owned(spec, "t")
        if spec.action == "delete":
            count = Sql(f"SELECT count(*) FROM {table} AS t WHERE {owned}")
        else:
            _, needs, consts = self.change(spec, 1)
            count = Sql(f"SELECT count(*) FROM {table} AS t WHERE {owned} AND ({needs})", consts)
        vb = _Binder(1)
        verify = Sql(
            f"SELECT {self.remaining(spec, vb)} FROM {table} AS t WHERE {owned}", tuple(vb.values)
        )
        first = nxt = None
        if batched:
            first = self.batch(spec, first=True)
            nxt = self.batch(spec, first=False)
        return Step(
            table=spec.table,
            action=spec.action,
            columns=tuple(a.column for a in spec.columns),
            batched=batched,
            batch_size=batch_size,
            owners=self.owners(spec) if batched else None,
            first_batch=first,
            next_batch=nxt,
            count=count,
            verify=verify,
        )

    def batch(self, spec: TableSpec, *, first: bool) -> Sql:
        """One batch: the next `limit` keys of one owner after the last key, then the change
        of the rows in (last, highest of those keys]: ties at the bound are included, so a
        key that is not unique (a partitioned table cannot enforce it) loses no row."""
        assert spec.owner is not None and spec.key is not None
        table = spec.table.sql
        ocol, key = Q(spec.owner.column), Q(spec.key)
        otype = self.col(spec.table, spec.owner.column).type
        ktype = self.col(spec.table, spec.key).type
        dynamic = 2 if first else 3
        limit = "$2" if first else "$3"
        after = "" if first else f" AND t.{key} > $2::text::{ktype}"
        where = f"t.{ocol} = $1::text::{otype}{after}"
        head = (
            f"WITH b AS (SELECT t.{key} AS k FROM {table} AS t WHERE {where} "
            f"ORDER BY t.{key} LIMIT {limit}), "
            "r AS (SELECT max(k) AS hi, count(*) AS n FROM b), "
        )
        bound = f"{where} AND t.{key} <= (SELECT hi FROM r)"
        if spec.action == "delete":
            body = f"u AS (DELETE FROM {table} AS t WHERE {bound} RETURNING 1)"
            consts: tuple[object, ...] = ()
        else:
            sets, needs, consts = self.change(spec, dynamic)
            body = f"u AS (UPDATE {table} AS t SET {sets} WHERE {bound} AND ({needs}) RETURNING 1)"
        return Sql(head + body, consts, dynamic)

    def remaining(self, spec: TableSpec, b: _Binder) -> str:
        """Aggregates over the subject's rows of `spec` (alias t): per erased column, the
        rows that still hold a value (deleted tables: the rows left)."""
        if spec.action == "delete":
            return "count(*)"
        parts = []
        for a in spec.columns:
            _, n = self.set_and_needs(spec, a, b)
            parts.append(f"count(*) FILTER (WHERE {n})")
        return ", ".join(parts)

    def apply(self, spec: TableSpec, b: _Binder) -> str:
        """The change of every row of the subject in `spec`, as a statement for a CTE."""
        table, owned = spec.table.sql, self.owned(spec, "t")
        if spec.action == "delete":
            return f"DELETE FROM {table} AS t WHERE {owned} RETURNING 1"
        pairs = [self.set_and_needs(spec, a, b) for a in spec.columns]
        sets = ", ".join(x for x, _ in pairs)
        needs = " OR ".join(n for _, n in pairs)
        return f"UPDATE {table} AS t SET {sets} WHERE {owned} AND ({needs}) RETURNING 1"

    def rest(self, specs: list[TableSpec]) -> Sql | None:
        if not specs:
            return None
        b = _Binder(1)
        ctes = ", ".join(f"s{i} AS ({self.apply(spec, b)})" for i, spec in enumerate(specs))
        return Sql("WITH " + ctes, tuple(b.values))

    def verify_all(self, specs: list[TableSpec]) -> Sql:
        b = _Binder(1)
        cols = ", ".join(
            f"(SELECT ARRAY[{self.remaining(spec, b)}]::bigint[] FROM {spec.table.sql} AS t "
            f"WHERE {self.owned(spec, 't')}) AS v{i}"
            for i, spec in enumerate(specs)
        )
        return Sql(f"SELECT {cols}", tuple(b.values))

    # -- due subjects -----------------------------------------------------------------------

    def due(self, one: bool, key_expr: str | None = None, dynamic: int = 0) -> Sql:
        """Due subjects: all; `one` ($2); or, with `key_expr`, the one whose key is that SQL
        expression of an outer query (constants numbered after `dynamic` parameters)."""
        subject = self.config.subject
        r = subject.retention
        srel = self.rel(subject.table)
        dynamic = dynamic or (2 if one else 1)
        b = _Binder(dynamic)
        join = ""
        default = b.bind(r.default, "text::interval")
        if r.by_class_column is not None:
            keys = b.bind([k for k, _ in r.by_class], "text[]")
            periods = b.bind([v for _, v in r.by_class], "text[]")
            col = Q(r.by_class_column)
            retention = (
                f"COALESCE((SELECT m.r::interval FROM unnest({keys}, {periods}) AS m(k, r) "
                f"WHERE m.k = s.{col}::text LIMIT 1), {default})"
            )
        elif r.class_table is not None:
            assert r.class_key and r.class_subject_column and r.class_column
            ccol = self.col(r.class_table, r.class_column)
            value = f"c.{Q(r.class_column)}"
            if ccol.base in INTEGER_TYPES:
                value = f"pg_catalog.make_interval(days => {value}::int)"
            join = (
                f" LEFT JOIN {r.class_table.sql} AS c ON c.{Q(r.class_key)} = "
                f"s.{Q(r.class_subject_column)}"
            )
            retention = f"COALESCE({value}, {default})"
        else:
            retention = default
        key = Q(subject.key)
        term = f"s.{Q(subject.terminated_at)}"
        ktype = srel.columns[subject.key].type
        where = f"{term} IS NOT NULL AND {term} + {retention} <= $1::timestamptz"
        if key_expr is not None:
            where += f" AND s.{key} = ({key_expr})::text::{ktype}"
        elif one:
            where += f" AND s.{key} = $2::text::{ktype}"
        return Sql(
            f"SELECT s.{key}::text AS subject_key, ({term} + {retention})::timestamptz AS due_at "
            f"FROM {subject.table.sql} AS s{join} WHERE {where}",
            tuple(b.values),
            dynamic,
        )

    def exists(self) -> Sql:
        subject = self.config.subject
        ktype = self.col(subject.table, subject.key).type
        return Sql(
            f"SELECT EXISTS (SELECT 1 FROM {subject.table.sql} AS s "
            f"WHERE s.{Q(subject.key)} = $1::text::{ktype})"
        )

    def plan(self) -> Plan:
        ordered = [
            spec
            for _, spec in sorted(
                enumerate(self.config.tables), key=lambda it: (-self.depth(it[1]), it[0])
            )
        ]
        steps = tuple(self.step(spec) for spec in ordered)
        rest_specs = [spec for spec, step in zip(ordered, steps, strict=True) if not step.batched]
        rest = self.rest(rest_specs)
        verify = self.verify_all(ordered)
        due, due_one, exists = self.due(False), self.due(True), self.exists()
        due_job = self.due(False, key_expr="j.subject_key", dynamic=CLAIM_PARAMS)
        due_job1 = self.due(False, key_expr="j.subject_key", dynamic=1)
        h = hashlib.sha256()
        for s in steps:
            for sql in (s.first_batch, s.next_batch, s.owners):
                if sql is not None:
                    h.update(sql.text.encode() + b"\0" + repr(sql.consts).encode() + b"\0")
            h.update(str(s.batch_size).encode() + b"\1")
        if rest is not None:
            h.update(rest.text.encode() + repr(rest.consts).encode())
        return Plan(
            steps=steps,
            rest=rest,
            rest_tables=tuple(spec.table for spec in rest_specs),
            verify=verify,
            due=due,
            due_one=due_one,
            due_job=due_job,
            due_job1=due_job1,
            exists=exists,
            plan_id=h.hexdigest()[:16],
            key_type=self.col(self.config.subject.table, self.config.subject.key).type,
        )


def build_plan(config: ErasureConfig, catalog: Catalog) -> Plan:
    """The plan for every subject of `config` (the subject key is the parameter $1)."""
    return _Planner(config, catalog).plan()


# -- the job table's statements ------------------------------------------------------------
# What the executor runs around a plan: claiming a job, recording progress in the same
# statement as each change (so atomically with it), finishing and releasing it. Built here,
# from the plan, so that the executor only binds parameters and runs them.

JOB_TABLE = "pgveil.erasure_job"
# advisory lock class of erasure jobs: pg_try_advisory_lock(LOCK_CLASS, hashtext(subject key))
LOCK_CLASS = 0x70677665  # "pgve"
SCHEMA_LOCK = 0  # the second key of the lock that serialises creating the job table

JOB_COLUMNS = (
    "subject_key, state, requested, step, owners, owner_pos, last_key, rows, seconds, "
    "batches, longest_batch_ms, attempts, due_at, audit_event"
)
_J = ", ".join(f"j.{c.strip()}" for c in JOB_COLUMNS.split(","))

# $1 subject key -> the job row (JOB_COLUMNS)
JOB_ROW_SQL = f"SELECT {JOB_COLUMNS} FROM {JOB_TABLE} WHERE subject_key = $1"
DATABASE_SQL = "SELECT current_database()"  # (named in the audit event)
# $1 lock class, $2 subject key
TRY_LOCK_SQL = "SELECT pg_try_advisory_lock($1, hashtext($2))"
UNLOCK_SQL = "SELECT pg_advisory_unlock($1, hashtext($2))"
# $1 subject key -> the audit event a finished job still has to write
AUDIT_EVENT_SQL = f"SELECT audit_event FROM {JOB_TABLE} WHERE subject_key = $1"
# $1 subject key: its audit event is written
CLEAR_EVENT_SQL = f"UPDATE {JOB_TABLE} SET audit_event = NULL WHERE subject_key = $1"
# the same, and the subject's lock released
CLEAR_EVENT_UNLOCK_SQL = (
    f"WITH c AS ({CLEAR_EVENT_SQL}) SELECT pg_advisory_unlock({LOCK_CLASS}, hashtext($1))"
)
# $1 subject keys: their audit events are written; their locks released
CLEAR_EVENTS_UNLOCK_SQL = (
    f"WITH c AS (UPDATE {JOB_TABLE} SET audit_event = NULL "
    "WHERE subject_key = ANY($1::text[])) "
    f"SELECT pg_advisory_unlock({LOCK_CLASS}, hashtext(k)) FROM unnest($1::text[]) AS k"
)
# $1 subject key, $2 state, $3 error, $4 remaining, $5 audit event, $6 rows, $7 seconds,
# $8 longest batch (ms)
FINISH_SQL = (
    f"UPDATE {JOB_TABLE} SET state = $2, error = $3, remaining = $4, audit_event = $5, "
    "rows = $6, seconds = $7, longest_batch_ms = greatest(longest_batch_ms, $8), "
    "finished_at = clock_timestamp(), updated_at = clock_timestamp() "
    "WHERE subject_key = $1"
)
# $1 subject key, $2 error -> the job's failures so far (this one included)
RELEASE_SQL = (
    f"UPDATE {JOB_TABLE} SET failures = failures + 1, error = $2, "
    "updated_at = clock_timestamp() WHERE subject_key = $1 RETURNING failures"
)

_ENDED = "j.state IN ('verified', 'failed')"
_RESTART = {
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
_RESTART_SETS = ", ".join(
    f"{c} = CASE WHEN {_ENDED} OR j.plan_id IS DISTINCT FROM $4 THEN {v} ELSE j.{c} END"
    for c, v in _RESTART.items()
)
# `erase subject KEY`: $1 subject key, $2 now, $3 worker, $4 plan id -> the job row (a job
# due now, restarted if it had ended or its plan changed, resumed if not)
REQUEST_SQL = f"""
                INSERT INTO {JOB_TABLE} AS j (subject_key, due_at, requested, state, plan_id,
                                              attempts, worker, started_at)
                VALUES ($1, $2, true, 'running', $4, 1, $3, clock_timestamp())
                ON CONFLICT (subject_key) DO UPDATE SET
                    {_RESTART_SETS},
                    state = CASE WHEN {_ENDED} OR j.plan_id IS DISTINCT FROM $4
                                      OR j.state = 'pending' THEN 'running' ELSE j.state END,
                    requested = true, due_at = least(j.due_at, excluded.due_at), plan_id = $4,
                    attempts = j.attempts + 1, worker = $3, error = NULL, remaining = NULL,
                    finished_at = NULL, started_at = coalesce(j.started_at, clock_timestamp()),
                    updated_at = clock_timestamp()
                RETURNING {_J}
                """


def _claimable(due_job: Sql) -> str:
    """Whether job `j` is one a worker takes now ($1): running or done (interrupted or
    unverified), an audit event still to write, or pending and due (or asked for)."""
    return (
        "(j.state IN ('running', 'done') OR j.audit_event IS NOT NULL "
        f"OR (j.state = 'pending' AND (j.requested OR EXISTS ({due_job.text})))) "
        "AND j.due_at <= $1"
    )


def waiting_sql(plan: Plan) -> Sql:
    """$1 now -> how many jobs workers would take now (a pass's total, for its progress)."""
    return Sql(
        f"SELECT count(*) FROM {JOB_TABLE} AS j WHERE {_claimable(plan.due_job1)}",
        plan.due_job1.consts,
    )


# VACUUM after erasure: the erased values stay in the old row versions until they are
# pruned, and in the column statistics (histogram bounds, most common values) until the
# next ANALYZE. Outside a transaction block (VACUUM refuses one), without the worker's
# statement timeout (a large table takes long, and VACUUM blocks no reader or writer),
# skipping a table it cannot lock at once (another VACUUM, autovacuum or DDL holds it).
VACUUM_SETTINGS_SQL = "SET statement_timeout = 0"
RESET_SETTINGS_SQL = "RESET statement_timeout"


def vacuum_sql(table: TableName) -> str:
    return f"VACUUM (ANALYZE, SKIP_LOCKED) {table.sql}"


def claim_sql(plan: Plan) -> str:
    """The next job, its subject's advisory lock, and (if it is still to be erased) its
    start, in one statement. A pending job is taken only while its subject is still due
    (terminated, retention over) or was asked for. `l` is referenced twice, so it is
    evaluated once: one lock attempt. $1 now, $2 subject keys to skip, $3 worker, $4 plan
    id, then `plan.due_job`'s constants."""
    assert plan.due_job.dynamic == CLAIM_PARAMS
    return f"""
WITH c AS (
    SELECT j.subject_key, j.state, j.requested FROM {JOB_TABLE} AS j
     WHERE {_claimable(plan.due_job)} AND j.subject_key <> ALL($2::text[])
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


def drop_not_due_sql(plan: Plan) -> Sql:
    """$1 now: drops the pending jobs of subjects no longer due (terminated no more, or a
    longer retention), unless they were asked for."""
    check = plan.due_job1
    return Sql(
        f"DELETE FROM {JOB_TABLE} AS j WHERE j.state = 'pending' AND NOT j.requested "
        f"AND NOT EXISTS ({check.text})",
        check.consts,
    )


def enqueue_due_sql(plan: Plan) -> Sql:
    """$1 now: a pending job for every subject that is due and has none."""
    return Sql(
        f"INSERT INTO {JOB_TABLE} (subject_key, due_at) "
        f"SELECT d.subject_key, d.due_at FROM ({plan.due.text}) AS d "
        "ON CONFLICT (subject_key) DO NOTHING",
        plan.due.consts,
    )


def _progress(finished_expr: str, base: int) -> str:
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


def batch_sql(step: Step, first: bool) -> str:
    """A batch of `step` with its progress recorded: the step's first (or next) batch
    statement's parameters, then (subject, step index, owner position, number of owners,
    table, seconds so far, the previous batch's ms, number of phases) -> (hi, scanned,
    changed)."""
    sql = step.first_batch if first else step.next_batch
    assert sql is not None
    limit = "$2" if first else "$3"
    finished = f"((SELECT n FROM r) < {limit}::bigint)"
    return (
        f"{sql.text}, {_progress(finished, sql.nparams + 1)} "
        "SELECT (SELECT hi::text FROM r) AS hi, (SELECT n FROM r) AS scanned, "
        "(SELECT count(*) FROM u) AS changed"
    )


def owners_sql(step: Step) -> str:
    """The owners of the step's rows, recorded in the job (a resumed run walks the same
    list; a step with none is finished at once): `step.owners`' parameters, then the
    subject key, the step index and the number of phases -> the owners (text[])."""
    q = step.owners
    assert q is not None
    return (
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
        "SELECT owners FROM a"
    )


def rest_sql(plan: Plan) -> str:
    """The tables that are not batched, erased with the job done in one statement:
    `plan.rest`'s parameters, then the subject key, each of `plan.rest_tables` (as text)
    and the number of phases -> the rows changed in each table."""
    rest = plan.rest
    assert rest is not None
    count = len(plan.rest_tables)
    base = rest.nparams
    merges = ", ".join(
        f"${base + 2 + k}::text, coalesce((rows ->> ${base + 2 + k}::text)::bigint, 0) "
        f"+ (SELECT count(*) FROM s{k})"
        for k in range(count)
    )
    return (
        f"{rest.text}, p AS (UPDATE {JOB_TABLE} SET step = ${base + 2 + count}::int, "
        f"state = 'done', erased_at = clock_timestamp(), "
        f"rows = rows || jsonb_build_object({merges}), updated_at = clock_timestamp() "
        f"WHERE subject_key = ${base + 1}::text RETURNING 1) SELECT "
        + ", ".join(f"(SELECT count(*) FROM s{k})" for k in range(count))
    )
