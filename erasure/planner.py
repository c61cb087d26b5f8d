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

The executor appends its own CTEs (the job's progress, recorded in the same statement, so
atomically with the change) and parameters after `Sql.nparams`.
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
        )


def build_plan(config: ErasureConfig, catalog: Catalog) -> Plan:
    """The plan for every subject of `config` (the subject key is the parameter $1)."""
    return _Planner(config, catalog).plan()
