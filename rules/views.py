"""Masks for views and materialized views derived from their definitions.

A view column that is a plain reference to a personal column gets that column's mask; a
column computed from exactly one personal column gets the same mask when it fits the view
column's type; any other column computed from personal data gets NULL. Views whose
definition is not a plain SELECT over tables and views (set operations, CTEs, subqueries in
FROM or in the select list, VALUES, functions in FROM, relations with renamed columns) are
not derived: the analyser refuses them, naming the view. Views that call code masked roles
may not run (a user function not on the allow list, a built-in that runs SQL text), or that
read a relation that exposes values or statement text (pg_stat_activity, pg_stats, ...:
rules.denied.DENIED_RELATIONS; masked roles read those rewritten, a view reads them raw),
are refused whatever else they read (`view_code_refusals`).

What reading a view reads (`view_reads`), for the audit: the protected tables behind it
(through views over views and materialized views, whose rows are a copy of theirs), and
which of its columns show the subject keys of those tables. A column shows a table's keys
only when the view's definition returns each of its rows from rows of that table whose key
it shows: a plain SELECT over tables and views (no set operation, CTE, grouping, window,
or subquery), every occurrence of the table in it with its key column returned as it is.
A self-join that returns one side's key carries the other side's data under it: no column
of such a view is taken to show that table's keys.

Pure: no I/O. Works on the definition text the catalog reader fetched (pg_get_viewdef).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

import pglast.ast
from pglast import parse_sql
from pglast.parser import ParseError

from rules.denied import DENIED_FUNCTIONS, DENIED_PREFIXES, DENIED_RELATIONS
from rules.masks import fits
from rules.model import MaskSpec, Policy

if TYPE_CHECKING:
    from rules.catalog import Catalog, ProtectionMap

ast: Any = pglast.ast

Masks = dict[str, MaskSpec]  # view column -> mask
_NULL = MaskSpec("null")


def derive_view_masks(
    catalog: Catalog, protected: Mapping[tuple[str, str], Masks]
) -> dict[tuple[str, str], Masks]:
    """Masks for every view that reads protected relations and can be derived.

    `protected` holds the masks of tables (and of views with rules of their own). Views over
    views are handled by deriving in rounds until nothing changes.
    """
    known: dict[tuple[str, str], Masks] = dict(protected)
    derived: dict[tuple[str, str], Masks] = {}
    pending = [
        k
        for k, rel in catalog.relations.items()
        if rel.kind in ("v", "m") and k in catalog.view_definitions and k not in protected
    ]
    changed = True
    while changed:
        changed = False
        for key in list(pending):
            sources = catalog.view_sources.get(key, ())
            if not any(s in known for s in sources):
                pending.remove(key)  # reads nothing personal
                continue
            if any(s in pending and s != key for s in sources):
                continue  # wait for the views it reads
            masks = _derive(catalog, key, known)
            pending.remove(key)
            changed = True
            if masks is not None:
                known[key] = masks
                derived[key] = masks
    return derived


def view_code_refusals(catalog: Catalog, policy: Policy) -> dict[tuple[str, str], str]:
    """Why each view (or materialized view) that calls code masked roles may not run is
    refused: a user function not on the allow list, a built-in that reads data behind the
    rewriter's back (`query_to_xml('SELECT ...')`), or a relation that exposes values or
    statement text (`pg_stat_activity`). A view over such a view too."""
    direct: dict[tuple[str, str], str] = {}
    for key, text in catalog.view_definitions.items():
        reason = _code_refusal(text, catalog, policy)
        if reason is not None:
            direct[key] = f"view {key[0]}.{key[1]} {reason}"
    out = dict(direct)
    for key, sources in catalog.view_sources.items():
        if key in out:
            continue
        for src in sources:
            if src in direct:
                out[key] = f"view {key[0]}.{key[1]} reads {direct[src]}"
                break
    return out


def _code_refusal(text: str, catalog: Catalog, policy: Policy) -> str | None:
    try:
        stmts = parse_sql(text)
    except ParseError:
        return "has a definition pgveil cannot parse"
    for n in _nodes(stmts):
        if isinstance(n, ast.RangeVar) and n.relname in DENIED_RELATIONS:
            # its stored definition reads them raw: statement text, statistics' values
            return f"reads {n.relname}, which exposes column values or query text"
        if not isinstance(n, ast.FuncCall):
            continue
        parts = [f.sval for f in n.funcname if isinstance(f, ast.String)]
        name = parts[-1]
        schema = parts[-2] if len(parts) >= 2 else None
        denied = name in DENIED_FUNCTIONS or name.startswith(DENIED_PREFIXES)
        if denied and schema in (None, "pg_catalog"):
            return f"calls {name}, which can read data pgveil cannot mask"
        if schema is not None and schema != "pg_catalog":
            if (schema, name) not in policy.allowed_functions:
                return f"calls function {schema}.{name}, which is not allowed for masked roles"
        elif schema is None:
            defined = {s for s, f in catalog.user_functions if f == name}
            if defined and not all((s, name) in policy.allowed_functions for s in defined):
                return f"calls function {name}, which is not allowed for masked roles"
    return None


def _nodes(root: Any) -> list[Any]:
    out: list[Any] = []
    stack = [root]
    while stack:
        n = stack.pop()
        if isinstance(n, ast.Node):
            out.append(n)
            stack.extend(getattr(n, attr) for attr in n)
        elif isinstance(n, tuple | list):
            stack.extend(n)
    return out


def _derive(
    catalog: Catalog, key: tuple[str, str], known: Mapping[tuple[str, str], Masks]
) -> Masks | None:
    rel = catalog.relations[key]
    try:
        stmts = parse_sql(catalog.view_definitions[key])
    except ParseError:
        return None
    if len(stmts) != 1 or not isinstance(stmts[0].stmt, ast.SelectStmt):
        return None
    sel = stmts[0].stmt
    if sel.withClause is not None or sel.op != 0 or sel.valuesLists:
        return None
    sources: dict[str, tuple[str, str]] = {}  # alias -> relation
    for item in sel.fromClause or ():
        if not _collect_sources(item, sources, catalog):
            return None
    if len(sel.targetList or ()) != len(rel.columns):
        return None
    if any(isinstance(n, ast.SubLink) for n in _nodes(sel.targetList)):
        # a scalar subquery reads relations of its own, resolved in its own scope
        return None
    masks: Masks = {}
    for col, target in zip(rel.columns, sel.targetList, strict=True):
        personal = _personal_refs(target.val, sources, known)
        if not personal:
            continue
        plain = isinstance(target.val, ast.ColumnRef)
        if len(personal) == 1 and (plain or fits(personal[0], col.type.name)):
            masks[col.name] = personal[0]
        else:
            masks[col.name] = _NULL
    return masks


def _collect_sources(item: Any, out: dict[str, tuple[str, str]], catalog: Catalog) -> bool:
    if isinstance(item, ast.RangeVar):
        schema = item.schemaname
        if schema is None:
            matches = [k for k in catalog.relations if k[1] == item.relname]
            if len(matches) != 1:
                return False
            schema = matches[0][0]
        if item.alias is not None and item.alias.colnames:
            return False  # `t(a, b)` renames the columns: names no longer find masks
        alias = item.alias.aliasname if item.alias is not None else item.relname
        out[alias] = (schema, item.relname)
        return True
    if isinstance(item, ast.JoinExpr):
        if item.isNatural:
            return False
        return _collect_sources(item.larg, out, catalog) and _collect_sources(
            item.rarg, out, catalog
        )
    return False


def _personal_refs(
    expr: Any, sources: Mapping[str, tuple[str, str]], known: Mapping[tuple[str, str], Masks]
) -> list[MaskSpec]:
    found: list[MaskSpec] = []
    stack = [expr]
    while stack:
        n = stack.pop()
        if isinstance(n, ast.ColumnRef):
            names = [f.sval for f in n.fields if isinstance(f, ast.String)]
            if isinstance(n.fields[-1], ast.A_Star):
                for src in sources.values():
                    found.extend(known.get(src, {}).values())
                continue
            if len(names) == 1 and names[0] in sources:
                # a whole-row reference (row_to_json(c)): every personal column of it
                found.extend(known.get(sources[names[0]], {}).values())
                found.extend(known.get(sources[names[0]], {}).values())
                continue
            col = names[-1] if names else ""
            srcs = (
                [sources[names[-2]]]
                if len(names) >= 2 and names[-2] in sources
                else list(sources.values())
            )
            for src in srcs:
                spec = known.get(src, {}).get(col)
                if spec is not None:
                    found.append(spec)
            continue
        if isinstance(n, ast.Node):
            for attr in n:
                value = getattr(n, attr)
                if isinstance(value, ast.Node):
                    stack.append(value)
                elif isinstance(value, tuple):
                    stack.extend(v for v in value if isinstance(v, ast.Node | tuple))
        elif isinstance(n, tuple):
            stack.extend(v for v in n if isinstance(v, ast.Node | tuple))
    return found


_TABLES = ("r", "p", "f")  # relations whose rows are their own (tables, partitioned, foreign)
_VIEWS = ("v", "m")
Key = tuple[str, str]


@dataclass(frozen=True)
class ViewReads:
    """What reading a view (or materialized view) reads of protected data."""

    # the protected relations behind it, by the names of their rules (itself among them when
    # `own`), for the audit events' `tables`
    tables: tuple[str, ...]
    # whether the view stands for data of its own: it has rules with a subject column of
    # their own, or no protected table is behind it. Otherwise its rows are the data of the
    # tables behind it, and events name those tables instead of the view.
    own: bool
    # attnum -> the tables whose subject keys the column shows (see the module docstring)
    keys: Mapping[int, tuple[str, ...]]
    # table -> the view's columns that show the key of the one occurrence of that table in
    # the view: every row's data of the table comes from the row whose key the column
    # shows, so a filter on the column names the subjects the rows hold (rules/subjects.py)
    sole: Mapping[str, tuple[str, ...]]


def view_reads(catalog: Catalog, pmap: ProtectionMap) -> dict[Key, ViewReads]:
    """Every view and materialized view with protected data behind it: what reading it
    reads."""
    policy = pmap.policy
    views = [k for k, rel in catalog.relations.items() if rel.kind in _VIEWS]
    base: dict[Key, set[str]] = {}
    for key in views:
        found = set()
        for src in catalog.view_sources.get(key, ()):
            rel = catalog.relations.get(src)
            p = pmap.by_name.get(src)
            if rel is not None and rel.kind in _TABLES and p is not None:
                found.add(p.rule_table)
        base[key] = found

    def own(key: Key) -> bool:
        rule = policy.tables.get(key)
        return not base[key] or (rule is not None and rule.subject is not None)

    tables: dict[Key, set[str]] = {}
    for key in views:
        found = set(base[key])
        for src in catalog.view_sources.get(key, ()):
            rel = catalog.relations.get(src)
            p = pmap.by_name.get(src)
            if rel is not None and rel.kind in _VIEWS and p is not None and own(src):
                found.add(p.rule_table)  # a view with rules of its own behind this one
        p = pmap.by_name.get(key)
        if p is not None and own(key):
            found.add(p.rule_table)
        tables[key] = found
    keyed = _keyed_columns(catalog, pmap, tables)
    single = _keyed_columns(catalog, pmap, tables, sole=True)
    out: dict[Key, ViewReads] = {}
    for key in views:
        if not tables[key]:
            continue
        shown = keyed.get(key, {})
        keys: dict[int, tuple[str, ...]] = {}
        for col in catalog.relations[key].columns:
            carried = tuple(sorted(t for t, names in shown.items() if col.name in names))
            if carried:
                keys[col.attnum] = carried
        sole = {t: tuple(sorted(names)) for t, names in single.get(key, {}).items() if names}
        out[key] = ViewReads(tuple(sorted(tables[key])), own(key), keys, MappingProxyType(sole))
    return out


def _keyed_columns(
    catalog: Catalog, pmap: ProtectionMap, tables: Mapping[Key, set[str]], sole: bool = False
) -> dict[Key, dict[str, set[str]]]:
    """view -> table -> the view's columns that show that table's keys, for each table
    behind the view whose every row in it comes with its key; `sole`: only for a table
    that occurs once in the view (through the views it reads too), the columns that show
    that occurrence's key. Views over views are done after the views they read."""
    known: dict[Key, dict[str, set[str]]] = {}
    pending = [k for k, found in tables.items() if found and k in catalog.view_definitions]
    changed = True
    while pending and changed:
        changed = False
        for key in list(pending):
            if any(s in pending and s != key for s in catalog.view_sources.get(key, ())):
                continue
            pending.remove(key)
            changed = True
            known[key] = _keyed(catalog, pmap, key, tables, known, sole)
    return known  # (a view left pending shows no keys)


def _keyed(
    catalog: Catalog,
    pmap: ProtectionMap,
    key: Key,
    tables: Mapping[Key, set[str]],
    known: Mapping[Key, dict[str, set[str]]],
    sole: bool = False,
) -> dict[str, set[str]]:
    rel = catalog.relations[key]
    sel = _simple_select(catalog.view_definitions[key])
    if sel is None:
        return {}
    sources: dict[str, Key] = {}
    for item in sel.fromClause or ():
        if not _collect_sources(item, sources, catalog):
            return {}
    if len(sel.targetList or ()) != len(rel.columns):
        return {}
    refs: dict[str, tuple[str, str]] = {}  # view column -> (source alias, its column)
    for col, target in zip(rel.columns, sel.targetList, strict=True):
        ref = _plain_ref(target.val, sources, catalog)
        if ref is not None:
            refs[col.name] = ref
    own = pmap.by_name.get(key)
    out: dict[str, set[str]] = {}
    for table in tables[key]:
        if own is not None and own.rule_table == table:
            continue  # its own subject column: the rows say it (rules.catalog by_oid)
        carried: set[str] = set()
        seen = 0
        for alias, src in sources.items():
            shows = _shows(catalog, pmap, src, table, tables, known)
            if shows is None:
                continue
            seen += 1
            exposing = {v for v, (a, c) in refs.items() if a == alias and c in shows}
            if not exposing:
                break  # rows of the table without their key
            carried |= exposing
        else:
            # (sole: one source holds the table's rows, and `known` says the columns of
            # its one occurrence when that source is a view)
            if seen == 1 or (seen and not sole):
                out[table] = carried
    return out


def _shows(
    catalog: Catalog,
    pmap: ProtectionMap,
    src: Key,
    table: str,
    tables: Mapping[Key, set[str]],
    known: Mapping[Key, dict[str, set[str]]],
) -> set[str] | None:
    """The columns of relation `src` that show the keys of `table` for all of its rows of
    that table (empty: it holds such rows, not all with their key); None when it holds
    none."""
    rel = catalog.relations.get(src)
    if rel is None:
        return None
    p = pmap.by_name.get(src)
    if rel.kind in _TABLES:
        if p is None or p.rule_table != table:
            return None
        return {p.subject} if p.subject is not None else set()
    if rel.kind in _VIEWS and table in tables.get(src, ()):
        if p is not None and p.rule_table == table:
            return {p.subject} if p.subject is not None else set()
        return known.get(src, {}).get(table, set())
    return None


def _simple_select(text: str) -> Any:
    """The SELECT of a view's definition when each of its rows comes from one row of each
    relation it reads (see the module docstring), else None."""
    try:
        stmts = parse_sql(text)
    except ParseError:
        return None
    if len(stmts) != 1 or not isinstance(stmts[0].stmt, ast.SelectStmt):
        return None
    sel = stmts[0].stmt
    if (
        sel.withClause is not None
        or sel.op != 0
        or sel.valuesLists
        or sel.groupClause
        or sel.havingClause is not None
        or sel.windowClause
        or sel.intoClause is not None
        or not sel.fromClause
    ):
        return None
    for n in _nodes(stmts):
        if isinstance(n, ast.SubLink | ast.RangeSubselect | ast.RangeFunction):
            return None
        if isinstance(n, ast.FuncCall) and n.over is not None:
            return None  # a window function returns other rows' values
    return sel


def _plain_ref(expr: Any, sources: Mapping[str, Key], catalog: Catalog) -> tuple[str, str] | None:
    """(source alias, column) when `expr` is a plain reference to a source's column."""
    if not isinstance(expr, ast.ColumnRef) or not all(
        isinstance(f, ast.String) for f in expr.fields
    ):
        return None
    names = [f.sval for f in expr.fields]
    if len(names) >= 2:
        return (names[-2], names[-1]) if names[-2] in sources else None
    found = [
        alias
        for alias, src in sources.items()
        if (rel := catalog.relations.get(src)) is not None and rel.column(names[0]) is not None
    ]
    return (found[0], names[0]) if len(found) == 1 else None
