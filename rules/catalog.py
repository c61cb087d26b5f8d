"""What the analyser knows of the database: relations with their columns and types,
inheritance, functions and operators. Pure data, built by the shell from the live catalog
(`proxy.catalog`) or by tests from literals.

Also the policy applied to the catalog: which relations are protected and with which column
masks, including partitions and inheritance children of protected tables.

Must not import asyncio, socket or asyncpg.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from rules.masks import ColumnType
from rules.model import MaskSpec, Policy
from rules.views import derive_view_masks, view_code_refusals, view_reads


@dataclass(frozen=True)
class Column:
    name: str
    attnum: int
    type: ColumnType
    # whether its collation is deterministic (equal only when the bytes are): under one that
    # is not, `k = 'ab'` also selects 'AB', and a named key does not say which subject
    deterministic: bool = True


@dataclass(frozen=True)
class Relation:
    oid: int
    schema: str
    name: str
    kind: str  # pg_class.relkind: r, p, v, m, f
    columns: tuple[Column, ...]
    parents: tuple[tuple[str, str], ...] = ()  # inheritance / partition parents, transitively

    @property
    def qualified(self) -> str:
        return f"{self.schema}.{self.name}"

    def column(self, name: str) -> Column | None:
        for c in self.columns:
            if c.name == name:
                return c
        return None


@dataclass(frozen=True)
class Catalog:
    relations: Mapping[tuple[str, str], Relation]
    # pg_catalog function and operator names; names also defined in other schemas
    builtin_functions: frozenset[str] = frozenset()
    # those of them whose first argument takes a row (record, anyelement, "any", ...): the
    # server may call one for `f(c)`, c a whole row, instead of reading the field c.f
    row_functions: frozenset[str] = frozenset()
    user_functions: frozenset[tuple[str, str]] = frozenset()
    # (schema, name) of functions in information_schema (never called unqualified)
    system_functions: frozenset[tuple[str, str]] = frozenset()
    builtin_operators: frozenset[str] = frozenset()
    user_operators: frozenset[str] = frozenset()
    # built-in operator names also defined in another schema (the search path may pick
    # that one: `=` is then not the built-in equality)
    shadowing_operators: frozenset[str] = frozenset()
    # built-in type names also defined in another schema (`x::int8` may then mean that one)
    shadowing_types: frozenset[str] = frozenset()
    # views and materialized views -> the tables they read, transitively
    view_sources: Mapping[tuple[str, str], tuple[tuple[str, str], ...]] = field(
        default_factory=dict
    )
    view_definitions: Mapping[tuple[str, str], str] = field(default_factory=dict)
    # relation names in pg_catalog and information_schema (always known)
    system_relations: frozenset[str] = frozenset()
    pg_catalog_relations: frozenset[str] = frozenset()  # those of them in pg_catalog
    # the server's keywords (pg_get_keywords): word -> category U, C, T or R; empty when
    # unknown (then the parser's keywords are taken to be the server's)
    keywords: Mapping[str, str] = field(default_factory=dict)
    # every column and composite-type field name in the database, system ones included
    column_names: frozenset[str] = frozenset()
    # function name (any schema, any overload) -> the output columns it declares (OUT,
    # INOUT and TABLE arguments): `FROM f(...) x ... x.name` reads one of them
    function_outputs: Mapping[str, frozenset[str]] = field(default_factory=dict)
    by_oid: Mapping[int, Relation] = field(default_factory=dict)
    # the server's server_version_num; 0 when unknown (then syntax that newer servers read
    # differently from older ones is refused, see rules.grammar)
    server_version_num: int = 0
    # (what, schema, function): functions written in SQL or a procedural language that the
    # server calls without a statement naming them (a cast, a type's support function, a
    # domain's CHECK, an operator, an operator class's support function)
    hidden_code: tuple[tuple[str, str, str], ...] = ()
    # (what, schema, function): the same for code attached to tables (triggers, defaults,
    # CHECK constraints, policies, rules, index and statistics expressions), which runs
    # when a masked role writes their rows (or ANALYZEs them)
    table_code: tuple[tuple[str, str, str], ...] = ()
    # the columns, in order, of the system relations masked roles read rewritten
    # (rules.denied.SYSTEM_VIEWS), by (schema, name): pg_catalog's, and those an extension
    # created where SYSTEM_VIEWS names that extension; and of the functions in
    # SYSTEM_FUNCTIONS (their result columns), by name. Each column is (name, its type as
    # SQL names it, schema-qualified: `"pg_catalog"."text"`, `"pg_catalog"."_text"`).
    system_columns: Mapping[tuple[str, str], tuple[tuple[str, str], ...]] = field(
        default_factory=dict
    )
    function_columns: Mapping[str, tuple[tuple[str, str], ...]] = field(default_factory=dict)
    # (schema, name) of every relation of any kind (sequences, indexes, composite types,
    # TOAST tables too) outside pg_catalog, information_schema and temporary schemas: what
    # tells that a name the analyser does not know names nothing (rules.missing); empty
    # when not read
    relation_names: frozenset[tuple[str, str]] = frozenset()
    # code that may move names when it runs (rules.code): functions by (schema, name) (any
    # overload may), user operators by name, relations whose reads (a view's definition, a
    # policy) or writes (a trigger, a default, a rule; and the reads') run such code
    moving_functions: frozenset[tuple[str, str]] = frozenset()
    moving_operators: frozenset[str] = frozenset()
    moving_reads: frozenset[tuple[str, str]] = frozenset()
    moving_writes: frozenset[tuple[str, str]] = frozenset()
    # an enabled event trigger's function may: every DDL statement may move names
    moving_ddl: bool = False
    # a function of `hidden_code` may (a cast's, a domain CHECK's, an operator's): every
    # statement that evaluates an expression may move names (rules.code.hidden_moving)
    moving_hidden: bool = False

    def __post_init__(self) -> None:
        if not self.by_oid:
            object.__setattr__(self, "by_oid", {r.oid: r for r in self.relations.values()})


@dataclass(frozen=True)
class Protected:
    """A relation the policy protects, with the mask of each personal column."""

    relation: Relation
    masks: Mapping[str, MaskSpec]
    rule_table: str  # the rules entry it comes from (itself, or a parent table)
    subject: str | None


class ProtectionMap:
    """Policy x catalog: protected relations by name, and what is refused."""

    def __init__(
        self, policy: Policy, catalog: Catalog, previous: ProtectionMap | None = None
    ) -> None:
        """`previous`: the map of the catalog read before this one. A protected table or
        column renamed since (same OID, same attnum) keeps its mask under its new name, and
        `drift` says so; a column the rules name that no longer exists, with nothing to
        carry over, makes the table `broken`: refused until the rules are fixed."""
        self.policy = policy
        self.catalog = catalog
        self.by_name: dict[tuple[str, str], Protected] = {}
        self.by_relname: dict[str, list[Protected]] = {}
        self.by_oid: dict[int, Protected] = {}
        self.drift: list[str] = []
        self.broken: dict[tuple[str, str], str] = {}
        before = previous.by_oid if previous is not None else {}
        for key, rel in catalog.relations.items():
            rule = policy.tables.get(key)
            if rule is None:
                for parent in rel.parents:
                    rule = policy.tables.get(parent)
                    if rule is not None:
                        break
            prev = before.get(rel.oid)
            if rule is None and (prev is None or rel.kind in ("v", "m")):
                continue  # views without rules are derived below
            masks: dict[str, MaskSpec] = {}
            if rule is not None:
                masks = {c: m for c, m in rule.columns.items() if rel.column(c) is not None}
            if prev is not None:
                by_attnum = {
                    c.attnum: (c.name, prev.masks[c.name])
                    for c in prev.relation.columns
                    if c.name in prev.masks
                }
                for col in rel.columns:
                    old = by_attnum.get(col.attnum)
                    if old is not None and col.name not in masks:
                        masks[col.name] = old[1]
                        self.drift.append(
                            f"{rel.qualified}.{col.name} keeps the mask of "
                            f"{prev.relation.qualified}.{old[0]}: renamed since the rules "
                            "were written; update the rules"
                        )
            if rule is not None:
                carried = set(prev.masks) if prev is not None else set()
                missing = [c for c in rule.columns if rel.column(c) is None and c not in carried]
                if missing:
                    self.broken[key] = (
                        f"the rules mask column {missing[0]} of {rel.qualified}, which does "
                        "not exist; fix the rules"
                    )
                self._add(Protected(rel, masks, rule.qualified, rule.subject))
            else:
                assert prev is not None
                self.drift.append(
                    f"{rel.qualified} was {prev.relation.qualified}: update the rules"
                )
                self._add(Protected(rel, masks, prev.rule_table, prev.subject))
        self._protect_ancestors(catalog)
        # views that call code masked roles may not run (a function not on the allow list,
        # one that runs SQL text): refused whether or not they read protected tables
        self.view_refusals = view_code_refusals(catalog, policy)
        known = {k: dict(p.masks) for k, p in self.by_name.items()}
        self.derived_views = derive_view_masks(catalog, known)
        for key, masks in self.derived_views.items():
            rel = catalog.relations[key]
            self._add(Protected(rel, masks, rel.qualified, None))
        # what reading each view reads (the audit): the tables behind it, and the columns
        # that show their subject keys (by the view's OID: result columns name it)
        self.views = view_reads(catalog, self)
        self.view_keys = {
            catalog.relations[key].oid: reads.keys
            for key, reads in self.views.items()
            if reads.keys
        }

    def _protect_ancestors(self, catalog: Catalog) -> None:
        """A parent of a protected table shows the child's rows (inheritance): it masks the
        columns it shares with its protected descendants as they do, or is refused when
        they mask a column differently."""
        found: dict[tuple[str, str], list[Protected]] = {}
        for p in list(self.by_name.values()):
            for parent in p.relation.parents:
                if parent not in self.by_name:
                    found.setdefault(parent, []).append(p)
        for key, descendants in found.items():
            rel = catalog.relations.get(key)
            if rel is None:
                continue
            masks: dict[str, MaskSpec] = {}
            for d in descendants:
                for col, spec in d.masks.items():
                    if rel.column(col) is None:
                        continue
                    if masks.get(col, spec) != spec:
                        self.broken[key] = (
                            f"{rel.qualified} is a parent of protected tables that mask its "
                            f"column {col} differently; give it rules of its own"
                        )
                    masks[col] = spec
            if masks:
                tables = sorted({d.rule_table for d in descendants})
                rule_table = tables[0] if len(tables) == 1 else rel.qualified
                self._add(Protected(rel, masks, rule_table, None))

    def _add(self, p: Protected) -> None:
        key = (p.relation.schema, p.relation.name)
        self.by_name[key] = p
        self.by_relname.setdefault(p.relation.name, []).append(p)
        self.by_oid[p.relation.oid] = p

    def lookup(self, schema: str | None, name: str) -> list[Protected]:
        """Protected relations a reference may denote: exactly one when qualified; every
        protected relation of that name when not (resolution depends on search_path)."""
        if schema is not None:
            p = self.by_name.get((schema, name))
            return [p] if p is not None else []
        return list(self.by_relname.get(name, ()))

    def personal_column(self, table_oid: int, attnum: int) -> tuple[Protected, Column] | None:
        p = self.by_oid.get(table_oid)
        if p is None:
            return None
        for c in p.relation.columns:
            if c.attnum == attnum and c.name in p.masks:
                return p, c
        return None
