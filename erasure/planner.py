"""The erasure planner: configuration + catalog -> the ordered SQL that erases one subject.

Pure: builds statements and their constant bind values, runs nothing. Every identifier is
quoted with `quote_ident`; every value (subject keys, owner keys, batch bounds,
placeholders, JSON paths, retention periods, the current time) is a bind parameter.
Keys travel as text and are cast in SQL to the column's type (`$1::text::bigint`), so the
executor can store progress of any key type in its job row.

Order: a table is erased before every table its rows are found through (xDRs and
recordings before accounts, accounts before the customer), so deleting or changing a
parent never loses a child; the columns that find rows are never erased (the loader
refuses that), so a step can be re-run at any time and converges to the same state.

Statement shapes (the executor passes the leading, dynamic parameters):

- `Step.apply`        $1 subject key                      -> status `UPDATE n` / `DELETE n`
- `Step.owners`       $1 subject key                      -> rows (owner key as text), ordered
- `Step.first_batch`  $1 owner key, $2 limit              -> one row (hi, scanned, changed)
- `Step.next_batch`   $1 owner key, $2 last key, $3 limit -> one row (hi, scanned, changed)
- `Step.count`        $1 subject key                      -> rows that would change
- `Step.verify`       $1 subject key                      -> remaining count per column
- `Plan.due`          $1 now                              -> (subject_key, due_at)
- `Plan.due_one`      $1 now, $2 subject key              -> (subject_key, due_at)
- `Plan.exists`       $1 subject key                      -> whether the subject exists
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from erasure.catalog import INTEGER_TYPES, Catalog, Column, Relation
from erasure.model import ColumnAction, ErasureConfig, TableName, TableSpec, quote_ident

Q = quote_ident


class PlanError(Exception):
    """The configuration does not fit the catalog (run `erasure.catalog.check` first)."""


@dataclass(frozen=True)
class Sql:
    text: str
    consts: tuple[object, ...] = ()  # bound after the dynamic parameters


@dataclass(frozen=True)
class Step:
    table: TableName
    action: str  # "update" or "delete"
    columns: tuple[str, ...]  # erased columns (names only)
    batched: bool
    batch_size: int
    apply: Sql
    owners: Sql | None  # None: the owner is the subject itself
    first_batch: Sql | None
    next_batch: Sql | None
    count: Sql
    verify: Sql


@dataclass(frozen=True)
class Plan:
    steps: tuple[Step, ...]
    due: Sql
    due_one: Sql
    exists: Sql
    plan_id: str

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
        sets, needs, consts = self.change(spec, 1)
        if spec.action == "delete":
            apply = Sql(f"DELETE FROM {table} AS t WHERE {owned}")
            count = Sql(f"SELECT count(*) FROM {table} AS t WHERE {owned}")
            verify = Sql(f"SELECT count(*) FROM {table} AS t WHERE {owned}")
        else:
            apply = Sql(f"UPDATE {table} AS t SET {sets} WHERE {owned} AND ({needs})", consts)
            count = Sql(f"SELECT count(*) FROM {table} AS t WHERE {owned} AND ({needs})", consts)
            per_column = []
            vb = _Binder(1)
            for a in spec.columns:
                _, n = self.set_and_needs(spec, a, vb)
                per_column.append(f"count(*) FILTER (WHERE {n})")
            verify = Sql(
                f"SELECT {', '.join(per_column)} FROM {table} AS t WHERE {owned}", tuple(vb.values)
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
            apply=apply,
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
            body = f"u AS (DELETE FROM {table} AS t WHERE {bound} RETURNING 1) "
            consts: tuple[object, ...] = ()
        else:
            sets, needs, consts = self.change(spec, dynamic)
            body = f"u AS (UPDATE {table} AS t SET {sets} WHERE {bound} AND ({needs}) RETURNING 1) "
        tail = (
            "SELECT (SELECT hi::text FROM r) AS hi, (SELECT n FROM r) AS scanned, "
            "(SELECT count(*) FROM u) AS changed"
        )
        return Sql(head + body + tail, consts)

    # -- due subjects -----------------------------------------------------------------------

    def due(self, one: bool) -> Sql:
        subject = self.config.subject
        r = subject.retention
        srel = self.rel(subject.table)
        b = _Binder(2 if one else 1)
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
        if one:
            where += f" AND s.{key} = $2::text::{ktype}"
        return Sql(
            f"SELECT s.{key}::text AS subject_key, ({term} + {retention})::timestamptz AS due_at "
            f"FROM {subject.table.sql} AS s{join} WHERE {where}",
            tuple(b.values),
        )

    def exists(self) -> Sql:
        subject = self.config.subject
        ktype = self.col(subject.table, subject.key).type
        return Sql(
            f"SELECT EXISTS (SELECT 1 FROM {subject.table.sql} AS s "
            f"WHERE s.{Q(subject.key)} = $1::text::{ktype})"
        )

    def plan(self) -> Plan:
        ordered = sorted(enumerate(self.config.tables), key=lambda it: (-self.depth(it[1]), it[0]))
        steps = tuple(self.step(spec) for _, spec in ordered)
        due, due_one, exists = self.due(False), self.due(True), self.exists()
        h = hashlib.sha256()
        for s in steps:
            for sql in (s.apply, s.first_batch, s.next_batch, s.owners):
                if sql is not None:
                    h.update(sql.text.encode() + b"\0" + repr(sql.consts).encode() + b"\0")
            h.update(str(s.batch_size).encode() + b"\1")
        return Plan(steps, due, due_one, exists, h.hexdigest()[:16])


def build_plan(config: ErasureConfig, catalog: Catalog) -> Plan:
    """The plan for every subject of `config` (the subject key is the parameter $1)."""
    return _Planner(config, catalog).plan()
