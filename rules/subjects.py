"""Which data subjects a statement touches, as far as its shape proves it.

An access event's subjects are complete only when proved (README "Audit stream"). There are
two proofs, and this module says for each statement which one holds:

* **Named keys**: the statement reads, changes or returns only rows whose key it names. A
  single-table SELECT, UPDATE or DELETE whose WHERE clause has `key = k` or `key IN (...)`
  among its top-level AND terms, or an INSERT's VALUES, with nothing else in the statement
  that reads a protected relation (a subquery, another FROM item, a CTE). The keys are the
  literals (normalised by the key column's type: rules/keys.py) or the parameters that
  carry them (`ParamKey`, read when the statement is bound). Also a SELECT of a single view
  whose WHERE names `col = k` for a view column that shows the key of a table occurring
  once in the view (rules/views.py `ViewReads.sole`): every row's data of that table then
  comes from the row of key k, as far as the catalog pgveil read says; a view can be
  replaced unseen (a DO block's EXECUTE), so these keys are named, never proof that they
  are all (`NamedKeys.complete`).
* **Returned keys** (`rows`): every row returned carries, for table T, the key of the one
  row of T that all its T values come from. So T is read once in the statement, as a plain
  FROM item of the statement itself (or the target of a write with RETURNING), and nothing
  makes a returned row of one T row hold values of another: no window function, no
  grouping, no subquery, CTE, view, function or other FROM item over T, no UPDATE that
  moves the key. Whether the key is in fact returned is up to the rows (their
  RowDescription: proxy/session/statements.py).

Anything this module does not understand proves nothing: a node class it does not know, a
relation the catalog does not know (a temporary table may hold another subject's data), a
function that is not a built-in (it may read any row), a built-in that runs SQL, an operator
of another schema or one that shadows a built-in, a WITH clause.

Pure: no I/O. Keys go to the audit stream only, never to logs or error texts.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, ClassVar, Final

from pglast.enums import A_Expr_Kind, BoolExprType, OnConflictAction, SetOperation

from rules.catalog import Column, Protected, ProtectionMap
from rules.denied import DENIED_FUNCTIONS, DENIED_PREFIXES, DENIED_RELATIONS
from rules.keys import (
    NO_MATCH,
    KeyColumn,
    Value,
    apply,
    assign,
    common_type,
    compare,
    number_literal,
    result_type,
    string_literal,
    token_value,
    type_name,
)
from rules.reads import ast, name_of


@dataclass(frozen=True, slots=True)
class ParamKey:
    """A key a parameter carries: its number, and what is applied to it (casts, by type
    name, and unary "+" / "-"), innermost first."""

    number: int
    ops: tuple[str, ...] = ()


class NamedKeys:
    """The keys a statement names for `table`: normalised texts, and parameters still to be
    bound. `unknown_as`: the type a parameter (or quoted literal) of unknown type is read
    as (the type the server compares in); "" once no parameter is left. `assign`: an
    INSERT's values (assigned, not compared). `complete`: whether the keys are all the
    subjects of `table` the statement touched. Not when they are named through a view:
    pgveil reads the view's definition from a catalog that code it does not see into (a DO
    block, a CALL, a function's EXECUTE) or another connection can replace before it is
    read again, so the keys are named (listed) but not proved.

    A value: never changed after it is made, equal and hashed by its fields. A plain class
    rather than a frozen dataclass because statements with literals make two per key: the
    compiled build constructs this one in 0.1 µs, a frozen dataclass's generated __init__
    took 2 µs (6% of an audited `pgbench -S` statement's instructions)."""

    # (a ClassVar: compiled, a plain class attribute becomes an instance attribute's
    # default, and `case NamedKeys(t, ...)` finds a descriptor where it needs a tuple)
    __match_args__: ClassVar[tuple[str, ...]] = (
        "table",
        "keys",
        "column",
        "unknown_as",
        "assign",
        "complete",
    )

    def __init__(
        self,
        table: str,
        keys: tuple[str | ParamKey, ...],
        column: KeyColumn,
        unknown_as: str = "",
        assign: bool = False,
        complete: bool = True,
    ) -> None:
        self.table: Final = table
        self.keys: Final = keys
        self.column: Final = column
        self.unknown_as: Final = unknown_as
        self.assign: Final = assign
        self.complete: Final = complete

    def __reduce__(self) -> tuple[type[NamedKeys], tuple[Any, ...]]:
        # copy and pickle: compiled, the default calls __init__ without arguments, and
        # @mypyc_attr(serializable=True) leaves Final fields unset (mypyc 1.x)
        return (NamedKeys, self._fields())

    def _fields(self) -> tuple[object, ...]:
        return (self.table, self.keys, self.column, self.unknown_as, self.assign, self.complete)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, NamedKeys):
            return NotImplemented
        return self._fields() == other._fields()

    def __hash__(self) -> int:
        return hash(self._fields())

    def __repr__(self) -> str:
        return (
            f"NamedKeys(table={self.table!r}, keys={self.keys!r}, column={self.column!r}, "
            f"unknown_as={self.unknown_as!r}, assign={self.assign!r}, "
            f"complete={self.complete!r})"
        )


# kept for the analyser's exports
SubjectKeys = NamedKeys

# node classes a statement may hold and still prove its subjects; any other proves nothing
_KNOWN = frozenset(
    {
        "SelectStmt", "InsertStmt", "UpdateStmt", "DeleteStmt", "ResTarget", "ColumnRef",
        "A_Star", "A_Const", "Integer", "Float", "Boolean", "String", "BitString", "ParamRef",
        "A_Expr", "BoolExpr", "NullTest", "BooleanTest", "TypeCast", "TypeName", "FuncCall",
        "WindowDef", "SubLink", "CaseExpr", "CaseWhen", "CoalesceExpr", "MinMaxExpr",
        "A_ArrayExpr", "A_Indices", "A_Indirection", "RowExpr", "SortBy", "RangeVar",
        "JoinExpr", "Alias", "RangeSubselect", "RangeFunction", "RangeTableSample",
        "LockingClause", "OnConflictClause", "InferClause", "IndexElem", "MultiAssignRef",
        "SetToDefault", "CollateClause", "SQLValueFunction", "GroupingSet", "GroupingFunc",
        "CurrentOfExpr", "NamedArgExpr", "ReturningClause",
    }
)  # fmt: skip
# statements that touch no relation themselves (EXECUTE and FETCH: what they name is
# judged when they run, from what that name's statement proves)
_NEUTRAL = frozenset(
    {
        "TransactionStmt", "VariableSetStmt", "VariableShowStmt", "DeallocateStmt",
        "ClosePortalStmt", "DiscardStmt", "ExecuteStmt", "FetchStmt",
    }
)  # fmt: skip
_WRITES = (ast.InsertStmt, ast.UpdateStmt, ast.DeleteStmt)


def statement_subjects(
    pmap: ProtectionMap, stmts: Any
) -> tuple[tuple[NamedKeys, ...], tuple[str, ...]]:
    """The keys the statements name (a text of one statement only), and the tables whose
    subjects the keys in the rows returned prove: those that every statement touching
    them proves so (None of either when a statement cannot be told). Read before the
    rewrite changes the tree."""
    index = _index(pmap)
    if pmap.catalog.hidden_code or _read_code(pmap.catalog.table_code):
        # code the server runs without a statement naming it (a cast, an operator written
        # in SQL, a row security policy's function, which runs for each row a read scans)
        # may read any row and send it (a NOTICE): no statement proves its subjects
        return (), ()
    proven: set[str] = set()
    unproven: set[str] = set()
    named: tuple[NamedKeys, ...] = ()
    for raw in stmts:
        node = raw.stmt
        cls = type(node).__name__
        if cls in _NEUTRAL:
            continue
        if isinstance(node, ast.PrepareStmt | ast.DeclareCursorStmt):
            node = node.query  # what EXECUTE or FETCH will read: judged now
        walk = _Walk(index)
        walk.statement(node)
        if walk.unsure:
            return (), ()
        tables = walk.tables()
        rows = walk.rows()
        proven |= rows
        unproven |= tables - rows
        if len(stmts) == 1 and not isinstance(raw.stmt, ast.PrepareStmt | ast.DeclareCursorStmt):
            named = walk.named()
    return named, tuple(sorted(proven - unproven))


def _read_code(table_code: tuple[tuple[str, str, str], ...]) -> bool:
    """Whether tables have code that runs on their reads too: a row security policy (its
    expression runs for the rows a SELECT scans). Triggers, defaults and indexes run on
    writes only."""
    return any(what.startswith("policy ") for what, _schema, _name in table_code)


# ---- what the catalog says of names --------------------------------------------------------


@dataclass
class _Index:
    """The protection map's names, looked up by the walk (made once per map)."""

    pmap: ProtectionMap
    by_relname: dict[str, list[tuple[str, str]]] = field(default_factory=dict)
    user_functions: frozenset[str] = frozenset()

    def denotes(self, rv: Any) -> tuple[frozenset[str], frozenset[str]] | None:
        """The protected tables (rule tables) a relation reference may read: directly (a
        protected relation of that name) and through views; None when the catalog does not
        know the name (a temporary or new relation may hold anyone's data) or it is a
        relation that exposes column values (pg_stats)."""
        cat = self.pmap.catalog
        schema, name = rv.schemaname, rv.relname
        if rv.catalogname or name in DENIED_RELATIONS:
            return None
        if schema in ("pg_catalog", "information_schema"):
            return frozenset(), frozenset()
        if schema is not None:
            keys = [(schema, name)] if (schema, name) in cat.relations else []
        else:
            keys = self.by_relname.get(name, [])
            if not keys and name in cat.system_relations:
                return frozenset(), frozenset()
        if not keys:
            return None
        direct: set[str] = set()
        via: set[str] = set()
        for key in keys:
            p = self.pmap.by_name.get(key)
            if p is not None:
                direct.add(p.rule_table)
            for source in cat.view_sources.get(key, ()):
                s = self.pmap.by_name.get(source)
                if s is not None:
                    via.add(s.rule_table)
        return frozenset(direct), frozenset(via)

    def relation(self, rv: Any) -> tuple[str, str] | None:
        """The one catalog relation a reference names (None: none, or several of that
        name in schemas the search path chooses among)."""
        if rv.catalogname:
            return None
        if rv.schemaname is not None:
            key = (rv.schemaname, rv.relname)
            return key if key in self.pmap.catalog.relations else None
        found = self.by_relname.get(rv.relname, [])
        return found[0] if len(found) == 1 else None

    def key_masked(self, table: str) -> bool:
        """Whether the rules of `table` (a rule table's name) mask its subject column."""
        return any(
            p.rule_table == table and p.subject is not None and p.subject in p.masks
            for p in self.pmap.by_name.values()
        )

    def protected(self, rv: Any) -> Protected | None:
        """The one protected relation a reference names (None: none, or it depends on the
        search path)."""
        if rv.schemaname is not None:
            return self.pmap.by_name.get((rv.schemaname, rv.relname))
        found = {p.rule_table: p for p in self.pmap.by_relname.get(rv.relname, [])}
        return next(iter(found.values())) if len(found) == 1 else None


_INDEXES: weakref.WeakKeyDictionary[ProtectionMap, _Index] = weakref.WeakKeyDictionary()


def _index(pmap: ProtectionMap) -> _Index:
    found = _INDEXES.get(pmap)
    if found is None:
        found = _Index(pmap)
        for schema, name in pmap.catalog.relations:
            found.by_relname.setdefault(name, []).append((schema, name))
        found.user_functions = frozenset(n for _s, n in pmap.catalog.user_functions)
        _INDEXES[pmap] = found
    return found


# ---- the walk ------------------------------------------------------------------------------


@dataclass
class _Ref:
    rv: Any
    row: bool  # a FROM item of the statement itself (or a write's target): its rows
    direct: frozenset[str]
    via: frozenset[str]


class _Walk:
    """One statement: the relations it reads and where, and whether anything in it makes
    its subjects unprovable (`unsure`) or its rows mix rows of one table (`mixed`)."""

    def __init__(self, index: _Index) -> None:
        self.index = index
        self.catalog = index.pmap.catalog
        self.unsure = False
        self.mixed = False
        self.refs: list[_Ref] = []
        self.defined: set[str] = set()  # output and column alias names of the statement
        self.qualified: list[str] = []  # the last name of each `q.name` reference
        self.node: Any = None

    # -- positions

    def statement(self, node: Any) -> None:
        self.node = node
        if not isinstance(node, ast.SelectStmt | ast.InsertStmt | ast.UpdateStmt | ast.DeleteStmt):
            self.unsure = True
            return
        rows: list[Any] = []
        if isinstance(node, ast.SelectStmt):
            # (a WITH clause is no node class the walk knows: nothing is proved)
            if node.op != SetOperation.SETOP_NONE:
                self.mixed = True
            if node.groupClause or node.havingClause or node.groupDistinct:
                self.mixed = True
            rows = list(node.fromClause or ())
        else:
            if node.withClause is not None or self.catalog.table_code:
                # (triggers, defaults, rules may change the key or write other rows)
                self.unsure = True
                return
            rows = [node.relation]
            rows += list(getattr(node, "fromClause", None) or ())
            rows += list(getattr(node, "usingClause", None) or ())
        row_vars: set[int] = set()
        for item in rows:
            for rv in _row_items(item):
                row_vars.add(id(rv))
        self._walk(node, row_vars)
        columns = self.catalog.column_names
        for name in self.qualified:
            # `c.f` is f(c), a function of the row, when f is no column of c
            if name in self.index.user_functions or (
                columns and name not in columns and name not in self.defined
            ):
                self.unsure = True

    def _walk(self, root: Any, row_vars: set[int]) -> None:
        stack: list[tuple[Any, int]] = [(root, 0)]
        while stack and not self.unsure:
            node, depth = stack.pop()
            cls = type(node).__name__
            if cls not in _KNOWN:
                self.unsure = True
                return
            if isinstance(node, ast.RangeVar):
                self._relation(node, id(node) in row_vars)
                if node.alias is not None:
                    stack.append((node.alias, depth))
                continue
            if isinstance(node, ast.SelectStmt) and node is not root:
                if node.withClause is not None:
                    self.unsure = True
                    return
                depth += 1
            elif isinstance(node, ast.FuncCall):
                self._function(node, depth)
            elif isinstance(node, ast.A_Expr):
                self._operator(node.name)
            elif isinstance(node, ast.SubLink):
                self._operator(node.operName)
            elif isinstance(node, ast.SortBy):
                self._operator(node.useOp)
            elif isinstance(node, ast.ColumnRef):
                self._column(node.fields)
            elif isinstance(node, ast.A_Indirection):
                self.qualified += [name_of(i) for i in node.indirection or () if name_of(i)]
            elif isinstance(node, ast.ResTarget) and node.name:
                self.defined.add(node.name)
            elif isinstance(node, ast.Alias):
                self.defined.add(node.aliasname)
                self.defined.update(name_of(c) for c in node.colnames or ())
            elif isinstance(node, ast.ReturningClause) and node.options:
                self.unsure = True  # RETURNING OLD / NEW: another server's grammar
                return
            for attr in node:
                if isinstance(node, ast.LockingClause) and attr == "lockedRels":
                    continue  # FOR UPDATE OF c names a FROM item, not a relation
                for child in _nodes(getattr(node, attr)):
                    stack.append((child, depth))

    def _relation(self, rv: Any, row: bool) -> None:
        found = self.index.denotes(rv)
        if found is None:
            self.unsure = True
            return
        direct, via = found
        self.refs.append(_Ref(rv, row, direct, via))

    def _function(self, node: Any, depth: int) -> None:
        parts = [name_of(p) for p in node.funcname]
        name = parts[-1]
        if (
            len(parts) > 2
            or (len(parts) == 2 and parts[0] != "pg_catalog")
            or name not in self.catalog.builtin_functions
            or name in DENIED_FUNCTIONS
            or name.startswith(DENIED_PREFIXES)
            or (len(parts) == 1 and name in self.index.user_functions)
        ):
            self.unsure = True  # code that may read any row
        elif node.over is not None and depth == 0:
            self.mixed = True  # a window over other rows

    def _operator(self, names: Any) -> None:
        if not names:
            return
        parts = [name_of(p) for p in names]
        op = parts[-1]
        if (len(parts) == 2 and parts[0] != "pg_catalog") or _shadows(self.catalog, op):
            self.unsure = True

    def _column(self, fields: Any) -> None:
        if len(fields) >= 2 and isinstance(fields[-1], ast.String):
            self.qualified.append(name_of(fields[-1]))

    # -- what it proves

    def tables(self) -> frozenset[str]:
        return frozenset(t for r in self.refs for t in r.direct | r.via)

    def rows(self) -> frozenset[str]:
        """The tables whose subjects the keys in the rows returned prove."""
        node = self.node
        if self.unsure or self.mixed:
            return frozenset()
        if isinstance(node, _WRITES):
            returning = node.returningClause
            if returning is None or not returning.exprs:
                return frozenset()
        moved = self._moved_keys()
        proven = set()
        for table in self.tables():
            refs = [r for r in self.refs if table in r.direct or table in r.via]
            if len(refs) != 1 or not refs[0].row or table in moved:
                continue  # read twice, inside something else, or its key moved
            if table in refs[0].direct and table not in refs[0].via:
                proven.add(table)
        return frozenset(proven)

    def _moved_keys(self) -> set[str]:
        """The tables whose key column an UPDATE (or an upsert's DO UPDATE) may set."""
        node = self.node
        targets: tuple[Any, ...] = ()
        if isinstance(node, ast.UpdateStmt):
            targets = node.targetList or ()
        elif isinstance(node, ast.InsertStmt) and node.onConflictClause is not None:
            targets = node.onConflictClause.targetList or ()
        if not targets:
            return set()
        rv = node.relation
        return {
            p.rule_table
            for p in self.index.pmap.lookup(rv.schemaname, rv.relname)
            if p.subject is None or any(t.name == p.subject for t in targets)
        }

    def named(self) -> tuple[NamedKeys, ...]:
        """The keys the statement names (see the module docstring)."""
        node = self.node
        if self.unsure:
            return ()
        if isinstance(node, ast.SelectStmt):
            items: Any = node.fromClause or ()
            if node.op != SetOperation.SETOP_NONE or len(items) != 1:
                return ()
            rv = items[0]
        elif isinstance(node, ast.UpdateStmt | ast.DeleteStmt):
            if getattr(node, "fromClause", None) or getattr(node, "usingClause", None):
                return ()
            rv = node.relation
        elif isinstance(node, ast.InsertStmt):
            rv = node.relation
        else:
            return ()
        if not isinstance(rv, ast.RangeVar):
            return ()
        if rv.alias is not None and rv.alias.colnames:
            return ()  # `customers c(name, i_customer)`: the names say other columns
        if not self._alone(rv):
            return self._through_view(node, rv) if isinstance(node, ast.SelectStmt) else ()
        p = self.index.protected(rv)
        if p is None or p.subject is None or p.subject in p.masks:
            # (a masked session's `key = k` compares the masked key: it names no subject)
            return ()
        column = p.relation.column(p.subject)
        if column is None:
            return ()
        found = _keys_of(node, rv, p.subject, column, p.rule_table, self.catalog)
        return (found,) if found is not None else ()

    def _through_view(self, node: Any, rv: Any) -> tuple[NamedKeys, ...]:
        """The keys a SELECT names through the view it reads, alone: `key = k` on a view
        column that shows the key of a table occurring once in the view (rules/views.py
        `sole`) names the subjects of that table whose data the rows hold."""
        for r in self.refs:
            if r.rv is not rv and (r.direct or r.via):
                return ()  # something else reads protected data too
        relation = self.index.relation(rv)
        if relation is None:
            return ()
        reads = self.index.pmap.views.get(relation)
        if reads is None or reads.own:
            return ()
        rel = self.catalog.relations[relation]
        derived = self.index.pmap.by_name.get(relation)
        out: list[NamedKeys] = []
        for table, columns in sorted(reads.sole.items()):
            if self.index.key_masked(table):
                continue  # (a masked session compares the masked key)
            for name in columns:
                column = rel.column(name)
                if column is None or (derived is not None and name in derived.masks):
                    continue
                found = _keys_of(node, rv, name, column, table, self.catalog)
                if found is not None:
                    out.append(
                        NamedKeys(found.table, found.keys, found.column, found.unknown_as,
                                  found.assign, complete=False)
                    )  # fmt: skip
                    break
        return tuple(out)

    def _alone(self, rv: Any) -> bool:
        """Whether `rv` is the statement's only reference to a protected relation."""
        for r in self.refs:
            if r.rv is rv:
                if r.via or len(r.direct) != 1:
                    return False
            elif r.direct or r.via:
                return False
        return True


def _keys_of(
    node: Any, rv: Any, name: str, column: Column, table: str, catalog: Any
) -> NamedKeys | None:
    """The keys of `table` that the statement names by the column `name` of its FROM
    item or write target `rv` (`column`: that column of the relation `rv` denotes)."""
    key = key_column(column)
    if isinstance(node, ast.InsertStmt):
        items_found = _inserted(node, name, catalog)
        unknown_as = key.type
    else:
        alias = rv.alias.aliasname if rv.alias is not None else rv.relname
        items_found = _filtered(node.whereClause, name, alias, catalog)
        unknown_as = ""
    if items_found is None:
        return None
    if not unknown_as:
        types = [_type_of(i) for i in items_found]
        found_type = common_type(key.type, types)
        if found_type is None:
            return None
        unknown_as = found_type
    named = NamedKeys(table, (), key, unknown_as, assign=isinstance(node, ast.InsertStmt))
    return _resolve(named, items_found, lambda _p: None)


def key_column(column: Column) -> KeyColumn:
    return KeyColumn(column.type.name, column.type.formatted, column.deterministic)


def _row_items(item: Any) -> Iterator[Any]:
    """The relations whose rows a FROM item returns as they are (joins of them; a
    TABLESAMPLE of one)."""
    stack = [item]
    while stack:
        node = stack.pop()
        if isinstance(node, ast.RangeVar):
            yield node
        elif isinstance(node, ast.RangeTableSample) and isinstance(node.relation, ast.RangeVar):
            yield node.relation
        elif isinstance(node, ast.JoinExpr):
            stack += [node.rarg, node.larg]


def _nodes(value: Any) -> Iterator[Any]:
    if isinstance(value, ast.Node):
        yield value
    elif isinstance(value, tuple | list):
        for v in value:
            yield from _nodes(v)


def _shadows(catalog: Any, op: str) -> bool:
    """An operator named outside pg_catalog (the search path may pick it, even for a
    built-in's name)."""
    return op in catalog.user_operators or op in catalog.shadowing_operators


# ---- keys --------------------------------------------------------------------------------

Item = Value | ParamKey


def _item(node: Any, catalog: Any) -> Item | None:
    """A key expression: a literal, a parameter, with casts and unary signs (read from the
    outside in, without recursion: a statement may nest them deeply)."""
    ops: list[str] = []  # outermost first
    while True:
        if isinstance(node, ast.TypeCast):
            t = node.typeName
            if t.typmods or t.arrayBounds or t.setof or t.pct_type:
                return None
            found = type_name(tuple(name_of(n) for n in t.names), catalog.shadowing_types)
            if found is None:
                return None
            ops.append(found)
            node = node.arg
        elif (
            isinstance(node, ast.A_Expr)
            and node.kind == A_Expr_Kind.AEXPR_OP
            and node.lexpr is None
            and [name_of(n) for n in node.name] in (["+"], ["-"])
            and not _shadows(catalog, name_of(node.name[0]))
        ):
            ops.append(name_of(node.name[0]))
            node = node.rexpr
        else:
            break
    inner = tuple(reversed(ops))  # innermost first, as they apply
    if isinstance(node, ast.ParamRef):
        return ParamKey(int(node.number), inner)
    value = _constant(node)
    return apply(value, inner) if value is not None else None


def _constant(node: Any) -> Value | None:
    """A literal in the type the parser gives it."""
    if not isinstance(node, ast.A_Const) or node.isnull:
        return None
    v = node.val
    if isinstance(v, ast.Integer):
        return ("int4", int(v.ival))
    if isinstance(v, ast.Float):
        return number_literal(str(v.fval))
    if isinstance(v, ast.String):
        return string_literal(str(v.sval))
    if isinstance(v, ast.Boolean):
        return ("bool", bool(v.boolval))
    return None


def _type_of(item: Item) -> str:
    if isinstance(item, ParamKey):
        return result_type("unknown", item.ops)
    return item[0]


def _is_subject(node: Any, subject: str, alias: str) -> bool:
    if not isinstance(node, ast.ColumnRef):
        return False
    names = [name_of(f) for f in node.fields]
    return names[-1] == subject and (len(names) == 1 or names[-2] == alias)


def _conjuncts(where: Any) -> Iterator[Any]:
    """The top-level AND terms, parenthesised ones too (without recursion)."""
    stack = [where]
    while stack:
        node = stack.pop()
        if isinstance(node, ast.BoolExpr) and node.boolop == BoolExprType.AND_EXPR:
            stack.extend(reversed(node.args))
        elif node is not None:
            yield node


def _filtered(where: Any, subject: str, alias: str, catalog: Any) -> list[Item] | None:
    """The keys of `subject = k` or `subject IN (k, ...)` among the top-level AND terms."""
    for t in _conjuncts(where):
        if not isinstance(t, ast.A_Expr) or [name_of(n) for n in t.name] != ["="]:
            continue
        if t.kind == A_Expr_Kind.AEXPR_OP:
            for col, other in ((t.lexpr, t.rexpr), (t.rexpr, t.lexpr)):
                if _is_subject(col, subject, alias):
                    key = _item(other, catalog)
                    if key is not None:
                        return [key]
        elif t.kind == A_Expr_Kind.AEXPR_IN and _is_subject(t.lexpr, subject, alias):
            keys = [_item(x, catalog) for x in t.rexpr]
            if keys and all(k is not None for k in keys):
                return [k for k in keys if k is not None]
    return None


def _inserted(node: Any, subject: str, catalog: Any) -> list[Item] | None:
    """The keys of an INSERT's VALUES rows; None unless every row names its key and an
    upsert can only update the row of that key."""
    sel = node.selectStmt
    if not node.cols or not isinstance(sel, ast.SelectStmt) or not sel.valuesLists:
        return None
    if any(c.indirection for c in node.cols):
        return None
    conflict = node.onConflictClause
    if conflict is not None and conflict.action != OnConflictAction.ONCONFLICT_NOTHING:
        infer = conflict.infer
        elems: Any = infer.indexElems if infer is not None else ()
        if (
            infer is None
            or infer.whereClause is not None
            or infer.conname
            or len(elems or ()) != 1
            or elems[0].name != subject
            or elems[0].expr is not None
            or elems[0].collation
            or elems[0].opclass
        ):
            return None  # DO UPDATE may update the row of another key
    names = [c.name for c in node.cols]
    if subject not in names:
        return None
    i = names.index(subject)
    keys = [_item(row[i], catalog) if len(row) > i else None for row in sel.valuesLists]
    return [k for k in keys if k is not None] if all(k is not None for k in keys) else None


def _resolve(
    named: NamedKeys,
    items: list[Item] | tuple[Item | str, ...],
    value_of: Callable[[ParamKey], Value | None],
) -> NamedKeys | None:
    """`named` with `items` normalised: literals now, parameters when `value_of` reads them
    (it returns None for one still to be bound). None when a key cannot be told."""
    keys: list[str | ParamKey] = []
    for item in items:
        if isinstance(item, str):
            keys.append(item)
            continue
        if isinstance(item, ParamKey):
            value = value_of(item)
            if value is None:
                keys.append(item)
                continue
            value = apply(value, item.ops)
            if value is None:
                return None
        else:
            value = item
        key = (
            assign(named.column, value)
            if named.assign
            else compare(named.column, value, named.unknown_as)
        )
        if key is None:
            return None
        if key is not NO_MATCH and isinstance(key, str) and key not in keys:
            keys.append(key)
    pending = any(isinstance(k, ParamKey) for k in keys)
    return NamedKeys(
        named.table,
        tuple(keys),
        named.column,
        named.unknown_as if pending else "",
        named.assign,
        named.complete,
    )


def literal_keys(named: NamedKeys, token_of: Callable[[int], str | None]) -> NamedKeys | None:
    """`named`, made on a statement's shape (literals replaced by parameter placeholders),
    with the literals put back: `token_of` gives a placeholder number's literal token (None
    for a real parameter). The type the server compares in is found again with the
    literals' own types. None when a literal cannot be read."""
    items: list[Item | str] = []
    types: list[str] = []
    for k in named.keys:
        if isinstance(k, ParamKey):
            token = token_of(k.number)
            if token is not None:
                value = token_value(token)
                value = apply(value, k.ops) if value is not None else None
                if value is None:
                    return None
                items.append(value)
                types.append(value[0])
                continue
            types.append(_type_of(k))
        items.append(k)
    unknown_as = named.unknown_as
    if not named.assign:
        found = common_type(named.column.type, types)
        if found is None:
            return None
        unknown_as = found
    again = NamedKeys(named.table, (), named.column, unknown_as, named.assign, named.complete)
    return _resolve(again, tuple(items), lambda _p: None)


def bound_keys(
    named: NamedKeys, value_of: Callable[[ParamKey], Value | None]
) -> frozenset[str] | None:
    """The keys once every parameter is read (`value_of`: a parameter's value in its type,
    None when it cannot be read); None when a key cannot be told."""
    missing = False

    def read(p: ParamKey) -> Value | None:
        nonlocal missing
        value = value_of(p)
        if value is None:
            missing = True
        return value

    resolved = _resolve(named, named.keys, read)
    if resolved is None or missing:
        return None
    return frozenset(k for k in resolved.keys if isinstance(k, str))
