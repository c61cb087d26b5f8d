"""What the erasure worker needs to know of the database catalog, and the check of a
configuration against it.

`check` is pure: given an `ErasureConfig` and a `Catalog` snapshot (read by
`erasure.db.read_catalog`), it lists every problem that would make an erasure wrong or
dangerous, each naming the file, the key path and the fix: a table or column that does not
exist, a relation whose columns cannot be compared, a large table without an index on its
batch key, a NOT NULL column set to NULL, a privilege the worker's role lacks. The worker
refuses to start while there is any. No I/O here.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from erasure.model import ErasureConfig, TableName, TableSpec

INTEGER_TYPES = frozenset({"int2", "int4", "int8"})
TEXT_TYPES = frozenset({"text", "varchar", "bpchar"})
TIME_TYPES = frozenset({"date", "timestamp", "timestamptz"})
JSON_TYPES = frozenset({"json", "jsonb"})


@dataclass(frozen=True)
class Column:
    name: str
    type: str  # format_type(): SQL text for casts, e.g. "bigint", "character varying(80)"
    base: str  # pg_type.typname of the base type (domains resolved), e.g. "int8", "jsonb"
    not_null: bool = False


@dataclass(frozen=True)
class Index:
    name: str
    columns: tuple[str | None, ...]  # key columns in order; None for an expression
    unique: bool = False
    partial: bool = False
    method: str = "btree"
    valid: bool = True

    def leads_with(self, cols: tuple[str, ...]) -> bool:
        return (
            self.method == "btree"
            and self.valid
            and not self.partial
            and self.columns[: len(cols)] == cols
        )


@dataclass(frozen=True)
class Relation:
    name: TableName
    kind: str  # pg_class.relkind: r (table), p (partitioned table), ...
    columns: Mapping[str, Column]
    indexes: tuple[Index, ...] = ()
    leaves: tuple[Relation, ...] = ()  # leaf partitions of a partitioned table
    privileges: frozenset[str] = frozenset({"SELECT", "UPDATE", "DELETE"})


@dataclass(frozen=True)
class Catalog:
    relations: Mapping[TableName, Relation]
    role: str = "the worker's role"
    kinds: Mapping[TableName, str] = field(default_factory=dict)  # other relations by kind

    def get(self, name: TableName) -> Relation | None:
        return self.relations.get(name)


def comparable(a: Column, b: Column) -> bool:
    """Whether a relation may match rows by `a = b` (an index can then serve it)."""
    if a.base == b.base:
        return True
    return (a.base in INTEGER_TYPES and b.base in INTEGER_TYPES) or (
        a.base in TEXT_TYPES and b.base in TEXT_TYPES
    )


_KIND_NAMES = {"v": "a view", "m": "a materialized view", "f": "a foreign table", "S": "a sequence"}


class _Problems:
    def __init__(self, config: ErasureConfig, catalog: Catalog) -> None:
        self.config = config
        self.catalog = catalog
        self.items: list[str] = []

    def add(self, path: str, message: str) -> None:
        self.items.append(f"{self.config.where(path)}: {message}")

    def relation(self, name: TableName, path: str, needs: tuple[str, ...]) -> Relation | None:
        rel = self.catalog.get(name)
        if rel is None:
            kind = self.catalog.kinds.get(name)
            if kind is not None:
                self.add(path, f"{name} is {_KIND_NAMES.get(kind, 'not a table')}; name a table")
            else:
                self.add(
                    path,
                    f"table {name} does not exist (or {self.catalog.role} cannot see it); "
                    "correct the name (schema.table, case-sensitive)",
                )
            return None
        missing = [p for p in needs if p not in rel.privileges]
        if missing:
            self.add(
                path,
                f"{self.catalog.role} lacks {', '.join(missing)} on {name}; "
                f"GRANT {', '.join(missing)} ON {name} TO {self.catalog.role}",
            )
        return rel

    def column(self, rel: Relation, col: str, path: str) -> Column | None:
        c = rel.columns.get(col)
        if c is None:
            near = [n for n in rel.columns if n.lower() == col.lower()]
            hint = f" (did you mean {near[0]}?)" if near else ""
            self.add(
                path,
                f"{rel.name} has no column {col}{hint}; columns: {', '.join(rel.columns)}",
            )
        return c


def check(config: ErasureConfig, catalog: Catalog) -> list[str]:
    """Every problem of `config` against `catalog`; empty when the worker may run."""
    p = _Problems(config, catalog)
    subject = config.subject
    srel = p.relation(subject.table, "subject.table", ("SELECT",))
    if srel is not None:
        key = p.column(srel, subject.key, "subject.key")
        if key is not None and not any(
            i.unique and i.leads_with((subject.key,)) and len(i.columns) == 1 for i in srel.indexes
        ):
            p.add(
                "subject.key",
                f"{subject.table}.{subject.key} must identify one row: add a primary key or "
                f"a unique index on ({subject.key})",
            )
        term = p.column(srel, subject.terminated_at, "subject.terminated_at")
        if term is not None and term.base not in TIME_TYPES:
            p.add(
                "subject.terminated_at",
                f"{subject.table}.{subject.terminated_at} is {term.type}; the termination "
                "column must be a date, timestamp or timestamptz",
            )
        _retention(p, config, srel)
    for spec in config.tables:
        _table(p, config, spec)
    return p.items


def _retention(p: _Problems, config: ErasureConfig, srel: Relation) -> None:
    r = config.subject.retention
    path = "subject.retention"
    if r.by_class_column is not None:
        p.column(srel, r.by_class_column, f"{path}.by_class.column")
    if r.class_table is None:
        return
    crel = p.relation(r.class_table, f"{path}.class_table.table", ("SELECT",))
    subject_col = (
        p.column(srel, r.class_subject_column, f"{path}.class_table.subject_column")
        if r.class_subject_column is not None
        else None
    )
    if crel is None:
        return
    ckey = (
        p.column(crel, r.class_key, f"{path}.class_table.key") if r.class_key is not None else None
    )
    if ckey is not None and subject_col is not None and not comparable(ckey, subject_col):
        p.add(
            f"{path}.class_table.key",
            f"{crel.name}.{ckey.name} ({ckey.type}) cannot be matched with "
            f"{srel.name}.{subject_col.name} ({subject_col.type}); name columns of one type",
        )
    ccol = (
        p.column(crel, r.class_column, f"{path}.class_table.column")
        if r.class_column is not None
        else None
    )
    if ccol is not None and ccol.base != "interval" and ccol.base not in INTEGER_TYPES:
        p.add(
            f"{path}.class_table.column",
            f"{crel.name}.{ccol.name} is {ccol.type}; the retention column must be an "
            "interval or a whole number of days",
        )


def _table(p: _Problems, config: ErasureConfig, spec: TableSpec) -> None:
    needs = ("SELECT", "DELETE") if spec.action == "delete" else ("SELECT", "UPDATE")
    rel = p.relation(spec.table, spec.path, needs)
    if rel is None:
        return
    owner_col: Column | None = None
    if spec.owner is not None:
        owner_col = p.column(rel, spec.owner.column, f"{spec.path}.owner.column")
        parent_name = spec.owner.through or config.subject.table
        parent = p.catalog.get(parent_name)
        if parent is not None:
            parent_col = parent.columns.get(spec.owner.key)
            if parent_col is None:
                p.add(
                    f"{spec.path}.owner.key" if spec.owner.through else f"{spec.path}.owner",
                    f"{parent_name} has no column {spec.owner.key}, so {spec.table} cannot "
                    "be related to it; name the column of "
                    f"{parent_name} that {spec.table}.{spec.owner.column} refers to (owner.key)",
                )
            elif owner_col is not None and not comparable(owner_col, parent_col):
                p.add(
                    f"{spec.path}.owner.column",
                    f"{spec.table}.{owner_col.name} ({owner_col.type}) cannot refer to "
                    f"{parent_name}.{parent_col.name} ({parent_col.type}): the types differ; "
                    "name the column that holds the owner's key",
                )
    key_col = (
        p.column(rel, spec.key, f"{spec.path}.key")
        if spec.key is not None and spec.owner is not None
        else None
    )
    if spec.large and spec.owner is not None and owner_col is not None and key_col is not None:
        _batch_index(p, spec, rel, (owner_col.name, key_col.name))
    for action in spec.columns:
        cpath = f"{spec.path}.columns.{action.column}"
        col = p.column(rel, action.column, cpath)
        if col is None:
            continue
        if action.kind == "null" and col.not_null:
            p.add(
                cpath,
                f"{spec.table}.{col.name} is NOT NULL; erase it with {{placeholder: TEXT}} "
                "or drop the NOT NULL constraint",
            )
        if action.kind in ("json_remove", "json_placeholder") and col.base not in JSON_TYPES:
            p.add(cpath, f"{spec.table}.{col.name} is {col.type}; json_keys needs json or jsonb")
        if (
            action.kind == "placeholder"
            and not action.uses_key
            and any(i.unique and i.columns == (col.name,) and not i.partial for i in rel.indexes)
        ):
            p.add(
                cpath,
                f"{spec.table}.{col.name} is unique, so one placeholder for every row "
                "collides; use null, or put {key} in the placeholder",
            )


def _batch_index(p: _Problems, spec: TableSpec, rel: Relation, cols: tuple[str, str]) -> None:
    targets = rel.leaves if rel.kind == "p" else (rel,)
    fix = f"CREATE INDEX ON {spec.table} ({', '.join(cols)})"
    if rel.kind == "p" and not targets:
        return  # a partitioned table without partitions holds no rows
    for target in targets:
        if not any(i.leads_with(cols) for i in target.indexes):
            where = "" if target is rel else f" (partition {target.name} has none)"
            p.add(
                f"{spec.path}.key",
                f"{spec.table} is large and erased in batches by ({', '.join(cols)}), but "
                f"there is no valid btree index starting with those columns{where}; {fix}",
            )
            return
