"""Which columns the qualifier of a `t.f` (or `(t).f`) reference has, as the server resolves it.

PostgreSQL reads `t.f` as the function call `f(t)` when f is no column of the FROM item t
(attribute notation; parse_expr.c, transformColumnRef). So a name is safe as a field only
if it is a column of the very item the server binds t to, not merely a column of some
relation. `field_columns` walks a statement with the server's name scopes (parse analysis:
query levels searched innermost first, FROM items visible to LATERAL items and ON clauses
as parse_clause.c makes them, the target of a write, EXCLUDED, RETURNING's old/new from
PostgreSQL 18) and says, for each `t.f`, `s.t.f`, `d.s.t.f` and `(t).f` of the statement,
the columns of the item it names: a catalog relation's (with its system columns where it
has them), a CTE's or subquery's output names where the tree tells them (select list
names, column alias lists, column definition lists).

None for a reference where that cannot be told for sure: the qualifier names a function
item without a column definition list, a relation the catalog does not know, an item
inside a statement this module does not model, several candidates with different columns;
the analyser then keeps its catalog-wide check (rules.reads, field_selection).

Pure: no I/O; nothing of the tree is changed.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

import pglast.ast
import pglast.enums

from rules.catalog import Catalog
from rules.denied import SYSTEM_COLUMNS

ast: Any = pglast.ast

Columns = tuple[str, ...] | None
# id() of a ColumnRef or A_Indirection -> (the node, the columns of the item its qualifier
# names, None when that cannot be told)
Owners = dict[int, tuple[Any, frozenset[str] | None]]

_UNSURE = object()  # a lookup whose answer the walk cannot vouch for
_EXPLICIT_CALL = pglast.enums.CoercionForm.COERCE_EXPLICIT_CALL
_RETURNING_OLD = pglast.enums.ReturningOptionKind.RETURNING_OPTION_OLD


@dataclass
class _Item:
    """A FROM item (or a write's target, EXCLUDED, old/new) as the server's namespace
    holds it: the name it goes by (None: no name, or one this module cannot tell), its
    columns (None: unknown), whether it has system columns, and, for an unaliased
    relation, the (schema, name) pairs a qualified reference `s.t.f` may match."""

    refname: str | None
    columns: Columns
    system: bool = False
    relations: frozenset[tuple[str, str]] = frozenset()
    unnamed: bool = False  # it may go by a name this module does not know
    lateral_only: bool = False  # an earlier item of a FROM list being analysed
    visible: bool = True  # its name may qualify references (not so inside an aliased join)

    def names(self) -> frozenset[str] | None:
        if self.columns is None:
            return None
        return frozenset(self.columns) | (SYSTEM_COLUMNS if self.system else frozenset())


@dataclass
class _Level:
    """One query level: its items, its WITH queries (name -> output columns), and whether
    lookups that reach it cannot be vouched for (a statement not modelled here)."""

    items: list[_Item] = field(default_factory=list)
    ctes: dict[str, Columns] = field(default_factory=dict)
    opaque: bool = False
    lateral_active: bool = False


def field_columns(stmts: Any, catalog: Catalog, server_version: int = 0) -> Owners:
    """See the module docstring; `stmts` is what pglast's parse_sql returns."""
    walk = _Walk(catalog, server_version)
    for raw in stmts:
        walk.node(raw.stmt, [])
    return walk.owners


_MODELLED = ("SelectStmt", "InsertStmt", "UpdateStmt", "DeleteStmt")


@dataclass
class _Walk:
    catalog: Catalog
    server_version: int
    owners: Owners = field(default_factory=dict)

    # ---- generic walk --------------------------------------------------------------------

    def node(self, node: Any, levels: list[_Level]) -> None:
        if isinstance(node, tuple | list):
            for item in node:
                self.node(item, levels)
            return
        if not isinstance(node, ast.Node):
            return
        cls = type(node).__name__
        if cls in _MODELLED:
            self.statement(node, levels)
            return
        if cls.endswith("Stmt"):
            # a statement not modelled: what its names denote is not told here
            levels = [*levels, _Level(opaque=True)]
        elif isinstance(node, ast.ColumnRef):
            self.column_ref(node, levels)
        elif isinstance(node, ast.A_Indirection):
            self.indirection(node, levels)
        for attr in node:
            self.node(getattr(node, attr), levels)

    def column_ref(self, node: Any, levels: list[_Level]) -> None:
        fields = node.fields
        if len(fields) < 2 or not all(isinstance(f, ast.String) for f in fields):
            return
        names = [f.sval for f in fields]
        if len(names) == 2:
            found = self.lookup(levels, None, names[0])
        elif len(names) in (3, 4):
            found = self.lookup(levels, names[-3], names[-2])
        else:
            found = _UNSURE
        self.owners[id(node)] = (node, found.names() if isinstance(found, _Item) else None)

    def indirection(self, node: Any, levels: list[_Level]) -> None:
        """`(t).f`, t a bare name: a column t if any item in scope has one (searched level
        by level, innermost first), else the whole row of the item named t."""
        arg = node.arg
        if not (isinstance(arg, ast.ColumnRef) and len(arg.fields) == 1):
            return
        first = arg.fields[0]
        if not isinstance(first, ast.String):
            return
        name = first.sval
        found: Any = _UNSURE
        for level in reversed(levels):
            if level.opaque:
                break
            items = [i for i in level.items if not i.lateral_only or level.lateral_active]
            if any(i.names() is None for i in items):
                break
            if any(name in (i.names() or ()) for i in items):
                break  # a column: `(c).f` is a field of its value
        else:
            found = self.lookup(levels, None, name)
        self.owners[id(node)] = (node, found.names() if isinstance(found, _Item) else None)

    def lookup(self, levels: list[_Level], schema: str | None, name: str) -> Any:
        """The item `name` (`schema.name`) denotes, searched as refnameNamespaceItem does;
        _UNSURE when it cannot be told."""
        for level in reversed(levels):
            if level.opaque:
                return _UNSURE
            items = [i for i in level.items if not i.lateral_only or level.lateral_active]
            if schema is None:
                hits = [i for i in items if i.visible and i.refname == name]
            else:
                hits = [i for i in items if i.visible and (schema, name) in i.relations]
            if len(hits) == 1:
                return hits[0]
            if hits or any(i.unnamed for i in items):
                return _UNSURE  # (the same name twice: the server refuses, or cannot tell)
        return _UNSURE  # nowhere: the server reports the missing FROM entry

    @staticmethod
    def cte(levels: list[_Level], name: str) -> tuple[bool, Columns]:
        """Whether `name` is a WITH query in scope (True too when a statement not modelled
        here may define one), and its output columns."""
        for level in reversed(levels):
            if level.opaque:
                return True, None
            if name in level.ctes:
                return True, level.ctes[name]
        return False, None

    # ---- statements ----------------------------------------------------------------------

    def statement(self, node: Any, levels: list[_Level]) -> Columns:
        """Walk one modelled statement at a new query level; returns its output columns
        (None: unknown)."""
        if type(node).__name__ not in _MODELLED:
            self.node(node, levels)  # (opaque: see node)
            return None
        level = _Level()
        inner = [*levels, level]
        with_clause = getattr(node, "withClause", None)
        if with_clause is not None:
            self.with_clause(with_clause, inner, level)
        if isinstance(node, ast.SelectStmt):
            return self.select(node, inner, level)
        return self.write(node, inner, level)

    def with_clause(self, clause: Any, inner: list[_Level], level: _Level) -> None:
        ctes = [c for c in clause.ctes or () if isinstance(c, ast.CommonTableExpr)]
        if clause.recursive:
            for c in ctes:
                level.ctes[c.ctename] = None  # (its columns: known once analysed)
        for c in ctes:
            out = self.statement(c.ctequery, inner)
            level.ctes[c.ctename] = _renamed(out, c.aliascolnames)
            self.node(c.search_clause, [*inner, _Level(opaque=True)])
            self.node(c.cycle_clause, [*inner, _Level(opaque=True)])
        if clause.recursive:
            for c in ctes:  # (a recursive query's columns are its non-recursive part's)
                level.ctes[c.ctename] = None

    def select(self, node: Any, inner: list[_Level], level: _Level) -> Columns:
        handled = {"withClause", "fromClause", "targetList", "larg", "rarg", "valuesLists"}
        tops: list[Columns] = []
        for item in node.fromClause or ():
            items, columns = self.from_item(item, inner, level)
            level.items.extend(items)
            tops.append(columns)
        for i in level.items:
            i.lateral_only = False
        out: Columns = None
        if node.larg is not None:
            out = self.statement(node.larg, inner)
            self.statement(node.rarg, inner)
        elif node.valuesLists:
            self.node(node.valuesLists, inner)
            first = node.valuesLists[0]
            out = tuple(f"column{i + 1}" for i in range(len(first)))
        else:
            self.node(node.targetList, inner)
            out = self.outputs(node.targetList, inner, tops)
        for attr in node:
            if attr not in handled:
                self.node(getattr(node, attr), inner)
        return out

    def outputs(self, targets: Any, levels: list[_Level], tops: list[Columns]) -> Columns:
        """The names a select list gives its columns (FigureColname for the forms whose
        name every server version agrees on), None when one is not told."""
        out: list[str] = []
        for rt in targets or ():
            if not isinstance(rt, ast.ResTarget):
                return None
            if rt.name:
                out.append(rt.name)
                continue
            val = rt.val
            if isinstance(val, ast.ColumnRef) and isinstance(val.fields[-1], ast.A_Star):
                if len(val.fields) == 1:
                    if any(t is None for t in tops):
                        return None
                    out.extend(c for t in tops for c in t or ())
                    continue
                found = (
                    self.lookup(levels, None, val.fields[0].sval)
                    if len(val.fields) == 2 and isinstance(val.fields[0], ast.String)
                    else _UNSURE
                )
                if not isinstance(found, _Item) or found.columns is None:
                    return None
                out.extend(found.columns)
                continue
            name = _figured(val)
            if name is None:
                return None
            out.append(name)
        return tuple(out)

    def write(self, node: Any, inner: list[_Level], level: _Level) -> Columns:
        """INSERT, UPDATE, DELETE: the target is no item of an INSERT's source; EXCLUDED
        beside it in ON CONFLICT; FROM / USING items beside it; RETURNING sees it (and
        old/new from PostgreSQL 18)."""
        # (a write's target is never a WITH query)
        target = self.relation_item(node.relation, inner, ctes=False)
        handled = {
            "withClause", "relation", "selectStmt", "onConflictClause", "fromClause",
            "usingClause", "returningClause", "returningList", "cols",
        }  # fmt: skip
        if isinstance(node, ast.InsertStmt):
            self.node(node.selectStmt, inner)  # (the target is in no namespace yet)
            self.node(node.cols, [*inner, _Level(opaque=True)])
            conflict = node.onConflictClause
            if conflict is not None:
                level.items = [target]
                self.node(conflict.infer, inner)
                excluded = _Item("excluded", target.columns, system=target.system)
                level.items = [target, excluded]
                for attr in conflict:
                    if attr != "infer":
                        self.node(getattr(conflict, attr), inner)
            level.items = [target]
            tops: list[Columns] = [target.columns]
        else:
            target.lateral_only = True  # subqueries in FROM cannot use the target
            level.items = [target]
            extra = node.fromClause if isinstance(node, ast.UpdateStmt) else node.usingClause
            tops = [target.columns]
            for item in extra or ():
                items, columns = self.from_item(item, inner, level)
                level.items.extend(items)
                tops.append(columns)
            for i in level.items:
                i.lateral_only = False
        for attr in node:
            if attr not in handled:
                self.node(getattr(node, attr), inner)
        returning = getattr(node, "returningClause", None)
        exprs = returning.exprs if returning is not None else getattr(node, "returningList", None)
        if exprs:
            if self.server_version >= 180000:
                names = {"old": "old", "new": "new"}
                for option in (returning.options if returning is not None else None) or ():
                    kind = "old" if option.option == _RETURNING_OLD else "new"
                    names[kind] = option.value
                level.items = [
                    *level.items,
                    *(_Item(n, target.columns, system=target.system) for n in names.values()),
                ]
            self.node(exprs, inner)
            return self.outputs(exprs, inner, tops)
        return None

    # ---- FROM items ----------------------------------------------------------------------

    def from_item(
        self, item: Any, inner: list[_Level], level: _Level
    ) -> tuple[list[_Item], Columns]:
        """The namespace items a FROM item adds, and its columns as `*` expands them; the
        expressions inside are walked where the server analyses them."""
        if isinstance(item, ast.RangeVar):
            found = self.relation_item(item, inner)
            found.lateral_only = True
            return [found], found.columns
        if isinstance(item, ast.RangeTableSample):
            self.sub_walk(item.args, inner, level, unsure=True)
            self.sub_walk(item.repeatable, inner, level, unsure=True)
            return self.from_item(item.relation, inner, level)
        if isinstance(item, ast.JoinExpr):
            return self.join(item, inner, level)
        if isinstance(item, ast.RangeSubselect):
            before = level.lateral_active
            level.lateral_active = bool(item.lateral)
            try:
                out = self.statement(item.subquery, inner)
            finally:
                level.lateral_active = before
            columns = _renamed(out, item.alias.colnames if item.alias else None)
            if item.alias is None:
                return [_Item(None, columns, unnamed=True, lateral_only=True)], columns
            return [_Item(item.alias.aliasname, columns, lateral_only=True)], columns
        if isinstance(item, ast.RangeFunction):
            self.sub_walk(item.functions, inner, level, unsure=False)
            columns = _function_columns(item)
            alias = item.alias
            if alias is not None:
                found = _Item(alias.aliasname, columns, lateral_only=True)
            else:
                label = _function_label(item)
                found = _Item(label, columns, unnamed=label is None, lateral_only=True)
            return [found], columns
        # XMLTABLE, JSON_TABLE: what their expressions may name is not told here
        self.sub_walk(item, inner, level, unsure=True)
        alias = getattr(item, "alias", None)
        name = alias.aliasname if isinstance(alias, ast.Alias) else None
        return [_Item(name, None, unnamed=name is None, lateral_only=True)], None

    def sub_walk(self, node: Any, inner: list[_Level], level: _Level, *, unsure: bool) -> None:
        """Expressions of a FROM item that may name earlier items (LATERAL)."""
        if unsure:
            self.node(node, [*inner, _Level(opaque=True)])
            return
        before = level.lateral_active
        level.lateral_active = True
        try:
            self.node(node, inner)
        finally:
            level.lateral_active = before

    def join(self, item: Any, inner: list[_Level], level: _Level) -> tuple[list[_Item], Columns]:
        start = len(level.items)
        left, lcols = self.from_item(item.larg, inner, level)
        level.items.extend(left)  # (visible to a LATERAL right side)
        right, rcols = self.from_item(item.rarg, inner, level)
        del level.items[start:]
        both = left + right
        if item.quals is not None:
            # the ON clause sees the join's two sides (and outer levels) only
            on = _Level(items=[replace(i, lateral_only=False) for i in both], ctes=level.ctes)
            self.node(item.quals, [*inner[:-1], on])
        columns = _join_columns(item, lcols, rcols)
        alias = item.alias
        if alias is not None:
            for i in both:
                i.visible = False  # (an aliased join hides its sides' names)
            named = _Item(alias.aliasname, _renamed(columns, alias.colnames), lateral_only=True)
            return [*both, named], columns
        using = item.join_using_alias
        if using is not None:
            names = tuple(name_of(u) for u in item.usingClause or ())
            return [*both, _Item(using.aliasname, names, lateral_only=True)], columns
        return both, columns

    def relation_item(self, rv: Any, levels: list[_Level], ctes: bool = True) -> _Item:
        """A relation named in FROM or as a write's target: a WITH query's, a catalog
        relation's columns, or unknown."""
        name = rv.relname
        alias = rv.alias
        refname = alias.aliasname if alias is not None else name
        colnames = alias.colnames if alias is not None else None
        if ctes and rv.schemaname is None and rv.catalogname is None:
            found, cte = self.cte(levels, name)
            if found:
                return _Item(refname, _renamed(cte, colnames))
        columns, system, keys = self.catalog_columns(rv)
        relations = keys if alias is None else frozenset()
        return _Item(refname, _renamed(columns, colnames), system, relations)

    def catalog_columns(self, rv: Any) -> tuple[Columns, bool, frozenset[tuple[str, str]]]:
        """The columns of the relation `rv` names, whether it has system columns, and the
        (schema, name) it may be; (None, False, ...) when that cannot be told."""
        cat = self.catalog
        name, schema = rv.relname, rv.schemaname
        if schema is not None:
            keys = [(schema, name)]
        else:
            # (pg_catalog comes first unless search_path names it later: either may win)
            keys = [k for k in cat.relations if k[1] == name]
            if name in cat.pg_catalog_relations and ("pg_catalog", name) not in keys:
                keys.append(("pg_catalog", name))
        shapes: set[tuple[Columns, bool]] = set()
        for key in keys:
            rel = cat.relations.get(key)
            if rel is not None:
                shapes.add((tuple(c.name for c in rel.columns), rel.kind != "v"))
            elif key in cat.system_columns and key[0] == "pg_catalog":
                shapes.add((tuple(c for c, _t in cat.system_columns[key]), False))
            else:
                shapes.add((None, False))
        if len(shapes) != 1:
            return None, False, frozenset(keys)
        columns, system = next(iter(shapes))
        return columns, system and columns is not None, frozenset(keys)


def name_of(n: Any) -> str:
    return str(n.sval) if isinstance(n, ast.String) else ""


def _renamed(columns: Columns, colnames: Any) -> Columns:
    """Columns under a column alias list: the first ones renamed, the others kept."""
    if not colnames:
        return columns
    names = tuple(name_of(c) for c in colnames)
    if columns is None:
        return None
    return names + columns[len(names) :]


def _join_columns(item: Any, lcols: Columns, rcols: Columns) -> Columns:
    """A join's columns as `*` and its alias show them: merged USING / NATURAL columns
    first, then the left side's others, then the right side's."""
    if lcols is None or rcols is None:
        return None
    if item.isNatural:
        merged = tuple(c for c in lcols if c in rcols)
    else:
        merged = tuple(name_of(u) for u in item.usingClause or ())
    return (
        merged
        + tuple(c for c in lcols if c not in merged)
        + tuple(c for c in rcols if c not in merged)
    )


def _function_columns(item: Any) -> Columns:
    """A function item's columns where column definition lists give them all."""
    pairs = [p for p in item.functions or () if isinstance(p, tuple | list) and len(p) == 2]
    if len(pairs) != len(item.functions or ()):
        return None
    out: list[str] = []
    if item.coldeflist and len(pairs) == 1 and not item.is_rowsfrom:
        out = [c.colname for c in item.coldeflist]
    elif item.is_rowsfrom and pairs and all(p[1] for p in pairs) and not item.coldeflist:
        out = [c.colname for p in pairs for c in p[1]]
    else:
        return None
    if item.ordinality:
        out.append("ordinality")
    alias = item.alias
    return _renamed(tuple(out), alias.colnames if alias is not None else None)


def _function_label(item: Any) -> str | None:
    """The name an unaliased function item goes by: its function's, for a single call."""
    funcs: tuple[Any, ...] = tuple(item.functions or ())
    if item.is_rowsfrom or len(funcs) != 1:
        return None
    call = funcs[0][0] if isinstance(funcs[0], tuple | list) else None
    if isinstance(call, ast.FuncCall) and call.funcformat == _EXPLICIT_CALL and call.funcname:
        return name_of(call.funcname[-1]) or None
    return None


def _figured(val: Any) -> str | None:
    """The name the server gives an unnamed select-list expression (FigureColname), for the
    forms it is sure of; None otherwise."""
    if isinstance(val, ast.ColumnRef) and isinstance(val.fields[-1], ast.String):
        return str(val.fields[-1].sval)
    if isinstance(val, ast.A_Indirection) and val.indirection:
        last = val.indirection[-1]
        return str(last.sval) if isinstance(last, ast.String) else None
    if isinstance(val, ast.FuncCall) and val.funcformat == _EXPLICIT_CALL and val.funcname:
        return name_of(val.funcname[-1]) or None
    if isinstance(val, ast.TypeCast) and isinstance(val.arg, ast.ColumnRef):
        return _figured(val.arg)
    if isinstance(val, ast.A_Const):
        return "?column?"
    if isinstance(val, ast.CaseExpr):
        return "case"
    return None
