"""The walk over a masked role's statement, and the read rewrite.

`ReadRewrite.visit` is the one way into a node: it refuses classes the grammar table
(`rules.grammar`) does not allow, hands classes that need special treatment to their
handler, and walks every other field by the table. A handler treats the fields the table
marks as its own and calls `rest` for the others, so no field is left unvisited by
forgetting: an unknown field, a node where the table says none can be, or a handler that did
not call `rest` is a refusal.

The read rewrite: every protected relation in a reading position (FROM, JOIN, subqueries,
CTEs, COPY t TO, TABLESAMPLE) becomes a subquery with the same alias and columns in which each
personal column is its mask (DESIGN.md section 2). Functions and operators are checked
against the allow-list and built-in calls are pinned to pg_catalog.

Pure: no I/O, no logging. Reasons never quote literals from the statement.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol

import pglast.ast
import pglast.enums
from pglast import parse_sql

from rules import grammar
from rules.catalog import Catalog, Protected, ProtectionMap
from rules.denied import (
    DENIED_FUNCTIONS,
    DENIED_PREFIXES,
    DENIED_RELATIONS,
    DENIED_SETTINGS,
    SYSTEM_COLUMNS,
    SYSTEM_FUNCTIONS,
    SYSTEM_VIEWS,
    Refusal,
    SystemView,
)
from rules.fields import Owners
from rules.masks import sql_expr, sql_literal
from rules.model import Policy
from rules.nodes import descendants
from rules.settings import keeps_pinned, set_config_keeps_pinned
from shared.quoting import quote_ident

# The AST is walked generically (attributes by name, optional everywhere); typing it node by
# node would cost more casts than it would catch.
ast: Any = pglast.ast

_NAME_NODES = (ast.String, ast.A_Star)
_EXPLICIT_CALL = pglast.enums.CoercionForm.COERCE_EXPLICIT_CALL
# Classes that only make sense where a handler puts them (FROM items, clauses of a statement):
# met anywhere else, a statement is not what pgveil thinks it is.
_PLACED = frozenset(
    {
        "RangeVar", "JoinExpr", "RangeSubselect", "RangeFunction", "RangeTableSample",
        "RangeTableFunc", "JsonTable", "WithClause", "CommonTableExpr", "OnConflictClause",
        "ReturningClause", "RawStmt", "IntoClause",
    }
)  # fmt: skip


def parse_one(sql: str) -> Any:
    """The AST of pgveil's own single-statement SQL."""
    return parse_sql(sql)[0].stmt


def name_of(n: Any) -> str:
    return str(n.sval) if isinstance(n, ast.String) else ""


def _defined_name(rv: Any) -> str:
    """The name of a relation a statement creates, as later statements name it:
    "pg_temp.name" for a temporary one, else as written."""
    if rv.relpersistence == "t" or rv.schemaname == "pg_temp":
        return f"pg_temp.{rv.relname}"
    return f"{rv.schemaname}.{rv.relname}" if rv.schemaname else str(rv.relname)


def _server_name(version: int) -> str:
    return f"PostgreSQL {version // 10000}"


@dataclass(frozen=True)
class RowUses:
    """What a statement does with system columns and whole rows, wherever it does it:
    `system`: the system columns it names, each with its qualifier (None when unqualified);
    `singles`: the names it writes alone (a column, or a whole-row reference `c`);
    `qualified`: its two-part names `q.f` (`f(q)` when f is no column of q);
    `loose_star`: a `*` that is not a whole entry of a select or RETURNING list, a NATURAL
    JOIN or a join alias (each may take every column of a relation);
    `functions`: (name, function) of each function FROM item without a column alias list,
    its alias (or the function's name) and each function it calls (the last part of the
    name): `name.f` reads an output column f the function declares."""

    system: frozenset[tuple[str | None, str]] = frozenset()
    singles: frozenset[str] = frozenset()
    qualified: frozenset[tuple[str, str]] = frozenset()
    loose_star: bool = False
    functions: frozenset[tuple[str, str]] = frozenset()


def row_uses(stmts: Any) -> RowUses:
    """See RowUses; no node is changed."""
    system: set[tuple[str | None, str]] = set()
    singles: set[str] = set()
    qualified: set[tuple[str, str]] = set()
    listed: set[int] = set()  # id() of star references that are whole list entries
    loose = False
    functions: set[tuple[str, str]] = set()
    for n in descendants(stmts):
        if isinstance(n, ast.RangeFunction):
            functions |= _function_items(n)
        if isinstance(n, ast.SelectStmt | ast.ReturningClause):
            items = n.targetList if isinstance(n, ast.SelectStmt) else n.exprs
            for rt in items or ():
                if isinstance(rt, ast.ResTarget) and isinstance(rt.val, ast.ColumnRef):
                    listed.add(id(rt.val))
        elif isinstance(n, ast.InsertStmt | ast.UpdateStmt | ast.DeleteStmt):
            # (before PostgreSQL 18's ReturningClause, RETURNING is a list of the statement)
            items = getattr(n, "returningList", None)
            for rt in items or ():
                if isinstance(rt, ast.ResTarget) and isinstance(rt.val, ast.ColumnRef):
                    listed.add(id(rt.val))
        elif isinstance(n, ast.JoinExpr) and (n.isNatural or n.alias is not None):
            loose = True
        elif isinstance(n, ast.ColumnRef):
            fields = n.fields
            last = fields[-1]
            if isinstance(last, ast.A_Star):
                if id(n) not in listed:
                    loose = True
                continue
            name = name_of(last)
            if len(fields) == 1:
                singles.add(name)
            elif len(fields) >= 2:
                qualified.add((name_of(fields[-2]), name))
            if name in SYSTEM_COLUMNS:
                system.add((name_of(fields[-2]) if len(fields) >= 2 else None, name))
    return RowUses(
        frozenset(system), frozenset(singles), frozenset(qualified), loose, frozenset(functions)
    )


def _function_items(item: Any) -> set[tuple[str, str]]:
    """See RowUses.functions."""
    calls = [
        pair[0]
        for pair in item.functions or ()
        if isinstance(pair, tuple | list) and pair and isinstance(pair[0], ast.FuncCall)
    ]
    names = [name_of(c.funcname[-1]) for c in calls if c.funcname]
    alias = item.alias
    if alias is not None and alias.colnames:
        return set()  # the columns are renamed: those names are the statement's own
    if alias is not None:
        label = alias.aliasname
    elif len(names) == 1 and not item.is_rowsfrom:
        label = names[0]
    else:
        return set()
    return {(label, name) for name in names}


def names_defined(stmts: Any) -> frozenset[str]:
    """Names the statement itself gives to columns: target aliases, column alias lists,
    CTE column names, column definitions (of temp tables or function results)."""
    names: set[str] = set()
    for n in descendants(stmts):
        if isinstance(n, ast.ResTarget) and n.name:
            names.add(n.name)
        elif isinstance(n, ast.Alias):
            names.update(name_of(c) for c in n.colnames or ())
        elif isinstance(n, ast.CommonTableExpr):
            names.update(name_of(c) for c in n.aliascolnames or ())
        elif isinstance(n, ast.ColumnDef) and n.colname:
            names.add(n.colname)
    return frozenset(names)


def names_referenced(
    stmts: Any,
) -> tuple[frozenset[str] | None, frozenset[tuple[str, str]]]:
    """Every name the statements mention in column references and USING lists (None when
    they may use columns without naming them: *, NATURAL joins), and the two-part
    references `q.name` as (q, name). `c.name` names the column `name` of `c`, not the
    whole row of `c`, unless `name` is no column of c (see masking_subquery); in `a.b.c`
    the middle part may be a table or a composite column, so only the first part of a
    qualified name is left out of the names."""
    names: set[str] = set()
    qualified: set[tuple[str, str]] = set()
    for n in descendants(stmts):
        if isinstance(n, ast.A_Star):
            return None, frozenset()
        if isinstance(n, ast.JoinExpr):
            if n.isNatural or n.alias is not None:
                # a join alias names the row of the whole join: `j`, `j.f` may read all
                return None, frozenset()
            for u in n.usingClause or ():
                names.add(name_of(u))
        elif isinstance(n, ast.ColumnRef):
            fields = n.fields
            names.update(name_of(f) for f in (fields[1:] if len(fields) > 1 else fields))
            if len(fields) == 2:
                qualified.add((name_of(fields[0]), name_of(fields[1])))
        elif isinstance(n, ast.CopyStmt) and n.relation is not None:
            return None, frozenset()  # COPY t TO: every column
    return frozenset(names), frozenset(qualified)


class Analysis(Protocol):
    """What the walk reads of the analyser that runs it (rules.analyzer.Analyzer): named by
    what it needs, so that this module does not import the analyser that imports it."""

    pmap: ProtectionMap
    policy: Policy
    catalog: Catalog


@dataclass
class ReadRewrite:
    an: Analysis
    changes: int = 0
    touched: set[str] = field(default_factory=set)
    masked_columns: set[str] = field(default_factory=set)
    uses_hash: bool = False
    ctes: list[set[str]] = field(default_factory=list)
    # (schema, relname) of replaced references -> alias, for 3-part column references
    replaced: dict[tuple[str, str], str] = field(default_factory=dict)
    generated: set[int] = field(default_factory=set)  # id() of pgveil's masking subqueries
    # a masking subquery's TABLESAMPLE clause: the client's, moved inside (its arguments may
    # refer to rows outside, which the write rewrite must still see)
    samples: dict[int, Any] = field(default_factory=dict)
    # names the statement mentions (None: it may use every column, e.g. through *)
    references: frozenset[str] | None = None
    qualified: frozenset[tuple[str, str]] = frozenset()  # `q.name` references: (q, name)
    unknown: set[str] = field(default_factory=set)
    temp: set[str] = field(default_factory=set)
    defined_names: frozenset[str] = frozenset()  # output and column aliases of the statement
    rested: set[int] = field(default_factory=set)  # id() of nodes whose fields were walked
    # the audit: views read (qualified name -> the protected tables behind them), those
    # tables, and the views that events name by those tables instead (see ViewReads.own)
    views: dict[str, tuple[str, ...]] = field(default_factory=dict)
    behind: set[str] = field(default_factory=set)
    instead: set[str] = field(default_factory=set)
    # every relation name the statement reads or names, as written ("name", "schema.name")
    relations: set[str] = field(default_factory=set)
    # views the statement creates ("pg_temp.name" when temporary) -> the tables they read
    defines: dict[str, set[str]] = field(default_factory=dict)
    # a refusal for masked roles that leaves the walk going (the tables it reads are still
    # found: an unmasked session records them all); the first one is the reason
    deferred: str | None = None
    moves_names: bool = False  # see Decision.moves_names
    exposes: set[str] = field(default_factory=set)  # see Decision.exposes
    text: str = ""  # the statement text analysed (node locations point into it)
    # deny columns the statement names (read as NULL, or written): the audit says denied
    denied: set[str] = field(default_factory=set)
    # what the statement does with whole rows and system columns (see RowUses)
    row_uses: RowUses = field(default_factory=lambda: RowUses())
    # id() of masking subqueries that carry system columns -> (alias, the table's columns)
    carrying: dict[int, tuple[str, tuple[str, ...]]] = field(default_factory=dict)
    # the columns of the item each `t.f` / `(t).f` of the statement names (rules.fields)
    owners: Owners = field(default_factory=dict)

    def tables(self) -> tuple[str, ...]:
        """The protected tables the statement reads or writes, those behind the views it
        reads included."""
        if not self.views:
            return tuple(sorted(self.touched))
        return tuple(sorted((self.touched - self.instead) | self.behind))

    @property
    def server_version(self) -> int:
        return self.an.catalog.server_version_num

    # ---- the walk ----------------------------------------------------------------------

    def rule_of(self, node: Any) -> grammar.NodeRule:
        """The grammar rule of an allowed node; refuses any other."""
        cls = type(node).__name__
        rule = grammar.ALLOWED.get(cls)
        if rule is None:
            raise Refusal(grammar.refusal_reason(cls))
        if rule.since > self.server_version:
            raise Refusal(
                f"this syntax ({cls}) is read differently by servers older than "
                f"{_server_name(rule.since)}; the server runs an older version"
            )
        return rule

    def statement(self, node: Any) -> Any:
        """A statement, anywhere one can stand (top level, CTE, EXPLAIN, PREPARE, ...)."""
        return self.visit(node)

    def visit(self, node: Any) -> Any:
        """Analyse one node met in an expression or clause position; returns the node to
        stand in its place."""
        cls = type(node).__name__
        rule = self.rule_of(node)
        if cls in _PLACED:
            raise Refusal(f"pgveil does not expect {cls} in this position")
        handler: Callable[[Any], Any] | None = getattr(self, _HANDLERS.get(cls, ""), None)
        if handler is None:
            self.rest(node, rule)
            return node
        result = handler(node)
        if id(node) not in self.rested:
            # a handler that forgot its node's other fields: never pass it unanalysed
            raise Refusal(f"pgveil did not analyse every field of {cls}; the statement is refused")
        return result

    def rest(self, node: Any, rule: grammar.NodeRule | None = None) -> None:
        """Walk every field of `node` that its handler does not treat itself, by the
        grammar table; refuse what the table does not know."""
        if rule is None:
            rule = self.rule_of(node)
        self.rested.add(id(node))
        cls = type(node).__name__
        fields = rule.fields
        for attr in node:
            kind = fields.get(attr)
            value = getattr(node, attr)
            if kind is None:
                if value is None or value == () or value is False:
                    continue  # pglast knows a field the table does not, but it is unset
                raise Refusal(f"pgveil does not know the field {attr} of {cls}")
            if isinstance(kind, grammar.Expr):
                if isinstance(value, ast.Node):
                    setattr(node, attr, self.visit(value))
                elif isinstance(value, tuple | list):
                    setattr(node, attr, self._visit_all(value))
            elif isinstance(kind, grammar.Inert):
                if _holds_node(value):
                    raise Refusal(f"pgveil does not expect an expression in {cls}.{attr}")
            elif isinstance(kind, grammar.Names):
                self.check_names(value, cls, attr)
            elif isinstance(kind, grammar.Relations):
                for rv in _flat(value):
                    self.relation_named(rv)
            # grammar.Handled: the handler's

    def _visit_all(self, items: Iterable[Any]) -> tuple[Any, ...]:
        out = []
        for item in items:
            if isinstance(item, ast.Node):
                out.append(self.visit(item))
            elif isinstance(item, tuple | list):
                out.append(self._visit_all(item))
            else:
                out.append(item)
        return tuple(out)

    @staticmethod
    def check_names(value: Any, cls: str, attr: str) -> None:
        for n in _flat(value):
            if isinstance(n, ast.Node) and not isinstance(n, _NAME_NODES):
                raise Refusal(f"pgveil does not expect an expression in {cls}.{attr}")

    def relation_named(self, rv: Any) -> None:
        """A relation named without its values being read (LOCK, TRUNCATE, a parent)."""
        if not isinstance(rv, ast.RangeVar):
            raise Refusal(f"pgveil does not expect {type(rv).__name__} where a table is named")
        self.rest(rv)
        self.protected_of(rv, cte_scope=False)

    # ---- statements --------------------------------------------------------------------

    def nested_query(self, node: Any) -> Any:
        """PREPARE, DECLARE, CREATE TABLE AS, CREATE VIEW: a query and what it defines."""
        node.query = self.statement(node.query)
        if isinstance(node, ast.CreateTableAsStmt):
            node.into = self.into_clause(node.into)
        elif isinstance(node, ast.ViewStmt):
            self.rest(node.view)
            self.created(node.view)
        stores_sql = isinstance(node, ast.ViewStmt) or (
            isinstance(node, ast.CreateTableAsStmt) and node.objtype == 23  # OBJECT_MATVIEW
        )
        if stores_sql:
            # (the audit: a read of it reads these; the statement's tables so far, a
            # superset when an earlier statement of the same text read others)
            rv = node.view if isinstance(node, ast.ViewStmt) else node.into.rel
            self.defines[_defined_name(rv)] = set(self.tables())
        if stores_sql and self.uses_hash:
            # the view's stored definition (pg_get_viewdef) would show the mask's key
            raise Refusal("a view over hash-masked columns would expose the masking key")
        self.rest(node)
        return node

    def explain(self, node: Any) -> Any:
        inner = node.query
        if isinstance(inner, ast.CreateTableAsStmt):
            inner = inner.query
        if isinstance(inner, ast.ExecuteStmt):
            # the prepared statement may carry hash masks; its plan would show the key
            raise Refusal("EXPLAIN of a prepared statement is not allowed for masked roles")
        node.query = self.statement(node.query)
        if self.uses_hash:
            raise Refusal("EXPLAIN of a statement that reads hash-masked columns")
        self.rest(node)
        return node

    def create_table(self, node: Any) -> Any:
        self.rest(node.relation)
        self.created(node.relation)
        self.rest(node)
        return node

    def into_clause(self, into: Any) -> Any:
        if not isinstance(into, ast.IntoClause):
            raise Refusal("pgveil does not expect this in place of a new table")
        self.rule_of(into)
        self.rest(into.rel)
        self.created(into.rel)
        self.rest(into)
        return into

    def created(self, rv: Any) -> None:
        """A relation the statement creates: temporary ones are the session's own."""
        if rv is None:
            return
        if rv.relpersistence == "t" or rv.schemaname == "pg_temp":
            self.temp.add(rv.relname)
        # a permanent one is unknown to pgveil until the catalog is read again

    def variable_set(self, node: Any) -> Any:
        # search_path is free: unqualified names the catalog does not know are pinned to
        # pg_temp, system relations to pg_catalog, built-in functions to pg_catalog
        name = (node.name or "").lower()
        self.rest(node)
        if name in DENIED_SETTINGS or name.startswith("session_authorization"):
            if name == "role" and node.kind == 4:  # RESET role: back to the login, harmless
                return node
            if keeps_pinned(name, node):
                return node  # the value the session has and must keep: nothing changes
            raise Refusal(f"masked roles may not change {name}")
        return node

    def constraints_set(self, node: Any) -> Any:
        """SET CONSTRAINTS names constraints (as RangeVar nodes); nothing is read."""
        for rv in _flat(node.constraints):
            if not isinstance(rv, ast.RangeVar):
                raise Refusal("pgveil does not expect an expression in SET CONSTRAINTS")
            self.rest(rv)
        self.rest(node)
        return node

    def copy(self, node: Any) -> Any:
        if node.filename is not None or node.is_program:
            raise Refusal(
                "COPY to or from a server file or program is not allowed for masked roles"
            )
        self.rest(node)  # options, and COPY ... FROM ... WHERE (it can call functions)
        if node.is_from:
            if node.relation is not None:
                self.rest(node.relation)
                found = self.protected_of(node.relation, record=True, cte_scope=False)
                if found is not None:
                    self.copy_into_denied(found, node.attlist)
            return node
        if node.query is not None:
            node.query = self.statement(node.query)
            return node
        rv = node.relation
        self.rest(rv)
        found = self.protected_of(rv)  # (COPY of a view: the server refuses it)
        if found is None:
            return node
        # COPY t [(cols)] TO ...  =>  COPY (SELECT cols FROM t) TO ...
        cols = ", ".join(quote_ident(name_of(a)) for a in (node.attlist or ())) or "*"
        query = parse_one(f"SELECT {cols} FROM {self._rv_text(rv)}")
        self.select(query)
        node.relation = None
        node.attlist = None
        node.query = query
        self.changes += 1
        return node

    def copy_into_denied(self, p: Protected, attlist: Any) -> None:
        """COPY ... FROM into deny columns: the rows are data pgveil does not read, so it
        cannot tell that only NULL is written (see Rewriter.deny_guard): refused."""
        named = [name_of(a) for a in attlist or ()] or [c.name for c in p.relation.columns]
        for name in named:
            spec = p.masks.get(name)
            if spec is not None and spec.name == "deny":
                self.denied.add(f"{p.rule_table}.{name}")
                self.defer(
                    f"column {p.rule_table}.{name} is not available to masked roles: COPY "
                    "FROM cannot write it; list the columns without it"
                )

    # ---- reads -------------------------------------------------------------------------

    def with_clause(self, clause: Any) -> None:
        """Rewrite the CTEs of a WITH clause with PostgreSQL's scoping, and push their names
        for the statement's body: a CTE sees the ones before it (all of them under
        RECURSIVE), never itself otherwise, so `WITH t AS (SELECT * FROM t)` reads table t.
        The caller pops the scope when the statement ends."""
        self.rule_of(clause)
        self.rest(clause)
        scope: set[str] = set()
        if clause.recursive:
            scope.update(c.ctename for c in clause.ctes)
        self.ctes.append(scope)
        for cte in clause.ctes:
            if not isinstance(cte, ast.CommonTableExpr):
                raise Refusal("pgveil does not expect this in a WITH clause")
            self.rest(cte)
            cte.ctequery = self.statement(cte.ctequery)
            scope.add(cte.ctename)

    def select(self, node: Any) -> Any:
        pushed = False
        if node.withClause is not None:
            self.with_clause(node.withClause)
            pushed = True
        try:
            if node.fromClause:
                node.fromClause = tuple(self.from_item(i) for i in node.fromClause)
            if node.larg is not None:
                node.larg = self.statement(node.larg)
            if node.rarg is not None:
                node.rarg = self.statement(node.rarg)
            if node.intoClause is not None:
                node.intoClause = self.into_clause(node.intoClause)
            self.rest(node)
            if self.carrying and node.fromClause:
                self.expand_stars(node)
        finally:
            if pushed:
                self.ctes.pop()
        return node

    def locking_clause(self, node: Any) -> Any:
        """FOR UPDATE OF a, b: names of FROM items, not relations read."""
        for rv in _flat(node.lockedRels):
            if not isinstance(rv, ast.RangeVar):
                raise Refusal("pgveil does not expect an expression in FOR UPDATE OF")
            self.rest(rv)
        self.rest(node)
        return node

    def from_item(self, item: Any) -> Any:
        """A FROM (or USING, or JOIN) item; relations read here become masking subqueries."""
        if id(item) in self.generated:
            return item  # pgveil's own masking subquery
        self.rule_of(item)
        if isinstance(item, ast.RangeVar):
            self.rest(item)
            system = self.system_view(item)
            if system is not None:
                return system
            return self.maybe_mask(item)
        if isinstance(item, ast.JoinExpr):
            item.larg = self.from_item(item.larg)
            item.rarg = self.from_item(item.rarg)
            self.rest(item)
            return item
        if isinstance(item, ast.RangeSubselect):
            item.subquery = self.statement(item.subquery)
            self.rest(item)
            return item
        if isinstance(item, ast.RangeTableSample):
            rv = item.relation
            if not isinstance(rv, ast.RangeVar):
                raise Refusal("pgveil does not expect this as the relation of TABLESAMPLE")
            self.rest(rv)
            found = self.protected_of(rv)
            self.rest(item)
            if found is None:
                return item
            return self.masking_subquery(found, rv, sample=item)
        if isinstance(item, ast.RangeFunction):
            system = self.system_function(item)
            if system is not None:
                return system
            self.expand_unnest(item)
            self.rest(item)
            return item
        if isinstance(item, ast.RangeTableFunc | ast.JsonTable):
            self.rest(item)
            return item
        raise Refusal(f"pgveil does not expect {type(item).__name__} in FROM")

    # ---- system relations that show values or statement text ----------------------------

    def system_key(self, rv: Any) -> tuple[str, str] | None:
        """The (schema, name) of the system relation `rv` denotes when it is one of
        SYSTEM_VIEWS that masked roles read rewritten, else None (the walk goes on, and
        refuses the names of DENIED_RELATIONS). pg_catalog's is meant by its qualified name
        or by its bare name when no relation of the catalog has that name (pg_catalog is
        then searched first whatever search_path says, unless the session's temporary
        relations take the name: the rewrite names pg_catalog's); an extension's by its
        schema, or by its bare name when the catalog has no other relation of that name."""
        name = rv.relname
        view = SYSTEM_VIEWS.get(name)
        if view is None or rv.catalogname is not None:
            return None
        schema = rv.schemaname
        if schema is None and self.is_cte(rv):
            return None
        cat = self.an.catalog
        if not view.extension:
            if schema == "pg_catalog":
                return ("pg_catalog", name)
            if schema is None and not any(n == name for _, n in cat.relations):
                return ("pg_catalog", name)
            return None
        if schema is not None:
            key = (schema, name)
            return key if key in cat.system_columns else None
        named = [k for k in cat.relations if k[1] == name]
        if len(named) == 1 and named[0] in cat.system_columns:
            return named[0]
        return None

    def system_view(self, rv: Any) -> Any | None:
        """A read of one of SYSTEM_VIEWS in FROM, as a subquery with the same alias in
        which the columns that may show values or statement text are NULL; None when `rv`
        denotes none of them."""
        key = self.system_key(rv)
        if key is None:
            return None
        view = SYSTEM_VIEWS[key[1]]
        self.exposes.add(key[1])
        source = f"{quote_ident(key[0])}.{quote_ident(key[1])}"
        guarded = bool(view.guarded)
        columns = self._system_columns(
            view, self.an.catalog.system_columns.get(key), key[1], guarded=guarded
        )
        if guarded:
            # the guarded numbers as the server has them only where the row's relation (and
            # column) is one pgveil knows to hold nothing personal
            source = (
                f"(SELECT *, {self.stats_readable(view)} AS {_READABLE} FROM {source}) "
                f"AS {quote_ident(key[1])}"
            )
        sub = parse_one(f"SELECT {columns} FROM {source}")
        self.relations.add(f"{rv.schemaname}.{key[1]}" if rv.schemaname else key[1])
        alias = rv.alias if rv.alias is not None else ast.Alias(aliasname=rv.relname)
        if rv.alias is None:
            # `pg_catalog.pg_stats.attname` must keep resolving
            self.replaced[key] = alias.aliasname
        self.generated.add(id(sub))
        self.changes += 1
        return ast.RangeSubselect(lateral=False, subquery=sub, alias=alias)

    def stats_readable(self, view: SystemView) -> str:
        """SQL that is true in a row of a statistics view (SystemView.keys name its
        relation and column) whose relation pgveil knows to hold nothing personal: a
        pg_catalog or information_schema relation, a table, foreign table or materialized
        view that no rule protects and that reads no protected table, or, where the row
        names a column, a protected relation's column without a mask. False for anything
        else: a personal column, an index (its expressions' statistics), a relation created
        since pgveil read the catalog, a temporary table."""
        cat, pmap = self.an.catalog, self.an.pmap
        tables: list[str] = []
        columns: list[str] = []
        for k, rel in sorted(cat.relations.items()):
            p = pmap.by_name.get(k)
            if p is not None:
                columns += [_stats_key(*k, c.name) for c in rel.columns if c.name not in p.masks]
            elif rel.kind in ("r", "p", "f") or (
                rel.kind == "m" and not any(s in pmap.by_name for s in cat.view_sources.get(k, ()))
            ):
                tables.append(_stats_key(*k))
        schema, table = (quote_ident(c) for c in view.keys[:2])
        key = (
            f"pg_catalog.concat(pg_catalog.length(CAST({schema} AS pg_catalog.text)), '.', "
            f"{schema}, '.', pg_catalog.length(CAST({table} AS pg_catalog.text)), '.', {table}"
        )
        out = [
            f"CAST({schema} AS pg_catalog.text) OPERATOR(pg_catalog.=) ANY "
            "(CAST(ARRAY['pg_catalog', 'information_schema'] AS pg_catalog.text[]))"
        ]
        if tables:
            out.append(f"{key}) OPERATOR(pg_catalog.=) ANY ({_text_array(tables)})")
        if columns and len(view.keys) > 2:
            column = quote_ident(view.keys[2])
            out.append(f"{key}, '.', {column}) OPERATOR(pg_catalog.=) ANY ({_text_array(columns)})")
        return f"COALESCE({' OR '.join(f'({c})' for c in out)}, false)"

    def system_function(self, item: Any) -> Any | None:
        """`FROM pg_stat_get_activity(...) [AS a[(...)]] [WITH ORDINALITY]`: a plain call of
        one of SYSTEM_FUNCTIONS as a FROM item, read like its view (a LATERAL subquery:
        its arguments may name earlier FROM items, as a function's may). None for anything
        else (the walk then refuses the function, as everywhere else)."""
        funcs: tuple[Any, ...] = tuple(item.functions or ())
        if item.is_rowsfrom or item.coldeflist or len(funcs) != 1:
            return None
        pair = funcs[0]
        if not isinstance(pair, tuple | list) or len(pair) != 2 or pair[1]:
            return None
        call = pair[0]
        if not isinstance(call, ast.FuncCall):
            return None
        parts = [name_of(p) for p in call.funcname or ()]
        if not parts or len(parts) > 2 or (len(parts) == 2 and parts[0] != "pg_catalog"):
            return None
        name = parts[-1]
        view = SYSTEM_FUNCTIONS.get(name)
        cat = self.an.catalog
        if view is None or (len(parts) == 1 and any(n == name for _, n in cat.user_functions)):
            return None  # (a function of that name elsewhere: the walk judges it as such)
        for attr in call:
            if attr in ("funcname", "args", "location"):
                continue
            value = getattr(call, attr)
            if attr == "funcformat" and getattr(value, "name", "") == "COERCE_EXPLICIT_CALL":
                continue
            if value is not None and value != () and value is not False:
                return None  # an aggregate's or window's clauses, VARIADIC: not a plain call
        columns = self._system_columns(view, cat.function_columns.get(name), name)
        self.exposes.add(name)
        if item.ordinality:
            columns += ', "ordinality"'
        sub = parse_one(
            f"SELECT {columns} FROM pg_catalog.{quote_ident(name)}() "
            f"{'WITH ORDINALITY ' if item.ordinality else ''}AS {quote_ident(name)}"
        )
        self.rule_of(call)
        self.rested.add(id(call))
        inner = sub.fromClause[0]
        args = self._visit_all(call.args or ())
        inner.functions = (
            (
                ast.FuncCall(
                    funcname=(ast.String(sval="pg_catalog"), ast.String(sval=name)),
                    args=args or None,
                    funcformat=call.funcformat,
                    location=call.location,
                ),
                None,
            ),
        )
        if item.alias is not None:
            self.visit(item.alias)
        alias = item.alias if item.alias is not None else ast.Alias(aliasname=name)
        self.generated.add(id(sub))
        self.changes += 1
        return ast.RangeSubselect(lateral=True, subquery=sub, alias=alias)

    @staticmethod
    def _system_columns(
        view: SystemView,
        columns: tuple[tuple[str, str], ...] | None,
        name: str,
        *,
        guarded: bool = False,
    ) -> str:
        """The select list of a rewritten system relation or function: its columns in the
        server's order, those not kept NULL of their type; with `guarded`, those of
        view.guarded NULL where the source's _READABLE column is not true."""
        if not columns:
            # (the catalog pgveil read lacks it: an older server, or a test catalog)
            raise Refusal(
                f"{name} exposes column values or query text, and pgveil has not read its "
                "columns; it is not available to masked roles"
            )
        out = []
        for column, typ in columns:
            ident = quote_ident(column)
            if column not in view.kept:
                out.append(f"CAST(NULL AS {typ}) AS {ident}")
            elif guarded and column in view.guarded:
                out.append(f"CASE WHEN {_READABLE} THEN {ident} END AS {ident}")
            else:
                out.append(ident)
        return ", ".join(out)

    def system_columns(self, p: Protected, rv: Any, alias_name: str, names: set[str]) -> list[str]:
        """The system columns (`xmin`, `ctid`, ...) the statement reads of the masking
        subquery of `p` named `alias_name`: the subquery carries them under their names
        after the table's columns. They hold no personal data, but they are columns of the
        subquery, so a whole-row reference to it (`c`, `to_json(c)`, `c.*` inside an
        expression, a NATURAL JOIN) would see them too: refused together with them; a
        `*` or `c.*` of a select list is spelled out (see expand_stars)."""
        if p.relation.kind not in ("r", "p", "m"):
            return []  # a view has no system columns: the server says so
        uses = self.row_uses
        wanted = sorted({s for q, s in uses.system if q is None or q == alias_name})
        if not wanted:
            return []
        if (
            uses.loose_star
            or alias_name in uses.singles
            or any(q == alias_name and f not in names for q, f in uses.qualified)
            or (rv.alias is not None and bool(rv.alias.colnames))
        ):
            # (deferred: an unmasked session's audit still gets everything the walk finds)
            self.defer(
                f"system columns of protected table {p.rule_table} cannot be read together "
                "with a reference to its whole row (the row itself, a * inside an "
                "expression, renamed columns, a NATURAL JOIN); name its columns"
            )
            return []
        return wanted

    def expand_stars(self, node: Any) -> None:
        """`*` and `c.*` in the select list of a SELECT whose FROM holds a masking subquery
        that carries system columns: spelled out as that table's columns (what they denote
        on the table itself), so the system columns appear only where they are named."""
        carrying: dict[str, tuple[str, ...]] = {}
        for item in _from_items(node.fromClause):
            found = self.carrying.get(id(getattr(item, "subquery", None)))
            if found is not None:
                carrying[found[0]] = found[1]
        if not carrying:
            return
        out: list[Any] = []
        for rt in node.targetList or ():
            val = rt.val if isinstance(rt, ast.ResTarget) else None
            if not (isinstance(val, ast.ColumnRef) and isinstance(val.fields[-1], ast.A_Star)):
                out.append(rt)
                continue
            if len(val.fields) == 1:
                single = node.fromClause if len(node.fromClause) == 1 else ()
                if not (single and isinstance(single[0], ast.RangeSubselect)):
                    self.defer(
                        "system columns of a protected table cannot be read together with "
                        "* over several relations; name the columns"
                    )
                    out.append(rt)
                    continue
                alias = single[0].alias.aliasname
            else:
                alias = name_of(val.fields[-2])
                if alias not in carrying:
                    out.append(rt)
                    continue
            for column in carrying[alias]:
                ref = ast.ColumnRef(fields=(ast.String(sval=alias), ast.String(sval=column)))
                out.append(ast.ResTarget(val=ref))
            self.changes += 1
        node.targetList = tuple(out)

    def expand_unnest(self, item: Any) -> None:
        """`FROM unnest(a, b, ...)`: the SQL standard's UNNEST of several arrays, which the
        server resolves only when the name is unqualified (parse_clause.c,
        transformRangeFunction: an undecorated `unnest` call in FROM with more than one
        argument), by turning it into `ROWS FROM (pg_catalog.unnest(a), pg_catalog.unnest(b),
        ...)`. pgveil sends exactly that, so the pinned names resolve (pg_catalog.unnest of two
        arrays does not exist) and no function of that name elsewhere is ever run."""
        functions = []
        changed = False
        for pair in item.functions or ():
            call: Any = pair[0] if isinstance(pair, tuple | list) and len(pair) == 2 else None
            coldefs = pair[1] if call is not None else None
            if not _standard_unnest(call) or coldefs:
                functions.append(pair)
                continue
            for arg in call.args:
                one = ast.FuncCall(
                    funcname=(ast.String(sval="pg_catalog"), ast.String(sval="unnest")),
                    args=(arg,),
                    funcformat=call.funcformat,
                    location=call.location,
                )
                functions.append((one, None))
            changed = True
        if changed:
            item.functions = tuple(functions)
            item.is_rowsfrom = True
            self.changes += 1

    def is_cte(self, rv: Any) -> bool:
        return rv.schemaname is None and any(rv.relname in s for s in self.ctes)

    def protected_of(
        self, rv: Any, record: bool = True, cte_scope: bool = True
    ) -> Protected | None:
        """The protected relation `rv` denotes, None when it is not protected; refuses
        relations that are never readable and ambiguous unqualified names."""
        name = rv.relname
        if name in DENIED_RELATIONS:
            raise Refusal(
                f"{name} exposes column values or query text and is not available to masked roles"
            )
        if cte_scope and self.is_cte(rv):
            return None
        self.relations.add(f"{rv.schemaname}.{name}" if rv.schemaname else name)
        self.note_unknown(rv)
        rel = self.an.catalog.relations.get((rv.schemaname, name)) if rv.schemaname else None
        if rel is not None and rel.kind in ("v", "m") and rv.schemaname is not None:
            self.check_view(rel.schema, rel.name, record)
        if rv.schemaname is None:
            for (schema, rname), r in self.an.catalog.relations.items():
                if rname == name and r.kind in ("v", "m"):
                    self.check_view(schema, rname, record)
        candidates = self.an.pmap.lookup(rv.schemaname, name)
        if not candidates:
            return None
        for c in candidates:
            broken = self.an.pmap.broken.get((c.relation.schema, c.relation.name))
            if broken is not None:
                raise Refusal(broken)
        first = candidates[0]
        shape = [(c.name, c.type) for c in first.relation.columns]
        for other in candidates[1:]:
            if [
                (c.name, c.type) for c in other.relation.columns
            ] != shape or other.masks != first.masks:
                raise Refusal(
                    f"the unqualified name {name} may denote several protected tables; "
                    "qualify it with its schema"
                )
        if record:
            self.touched.add(first.rule_table)
        return first

    def note_unknown(self, rv: Any) -> None:
        """Record a relation the catalog does not know, and pin an unqualified name the
        server could resolve to one: to pg_catalog when it is a system relation's name, to
        pg_temp otherwise. Whatever search_path says, the name then denotes the system
        relation or the session's own temporary relation, never one created since pgveil
        read the catalog (a new partition of a protected table, say). Unknown names are
        refused by the session unless they are its temporary relations."""
        cat = self.an.catalog
        schema, name = rv.schemaname, rv.relname
        if schema in ("pg_catalog", "information_schema"):
            return
        if schema == "pg_temp":
            self.unknown.add(name)
            return
        if schema is not None:
            if (schema, name) not in cat.relations:
                self.unknown.add(f"{schema}.{name}")
            return
        if any(n == name for _, n in cat.relations):
            return  # known: the protection map decides, whatever schema wins
        rv.schemaname = "pg_catalog" if name in cat.pg_catalog_relations else "pg_temp"
        self.changes += 1
        if rv.schemaname == "pg_temp":
            self.unknown.add(name)

    def check_view(self, schema: str, name: str, record: bool = True) -> None:
        refusal = self.an.pmap.view_refusals.get((schema, name))
        if refusal is not None:
            raise Refusal(refusal)
        reads = self.an.pmap.views.get((schema, name))
        if reads is not None and record:
            # (the audit: reading it reads the tables behind it)
            self.views[f"{schema}.{name}"] = reads.tables
            self.behind.update(reads.tables)
            if not reads.own:
                self.instead.add(f"{schema}.{name}")
        if (schema, name) in self.an.pmap.by_name:
            return  # rules of its own, or masks derived from its definition
        sources = self.an.catalog.view_sources.get((schema, name), ())
        for src in sources:
            if self.an.pmap.lookup(src[0], src[1]):
                # nothing for a masked role to see: refused, once the walk has found every
                # table the statement reads (its audit event names them)
                self.defer(
                    f"view {schema}.{name} reads protected table {src[0]}.{src[1]} and has "
                    "no masking rules of its own"
                )
                return

    def defer(self, reason: str) -> None:
        """Refuse the statement once the walk is done (the first reason stands)."""
        if self.deferred is None:
            self.deferred = reason

    def maybe_mask(self, rv: Any) -> Any:
        found = self.protected_of(rv)
        if found is None:
            return rv
        return self.masking_subquery(found, rv)

    def _rv_text(self, rv: Any) -> str:
        parts = [rv.schemaname, rv.relname] if rv.schemaname else [rv.relname]
        return ("" if rv.inh else "ONLY ") + ".".join(quote_ident(p) for p in parts)

    def masking_subquery(self, p: Protected, rv: Any, sample: Any = None) -> Any:
        keys = self.an.policy.keys
        cols = []
        refs = self.references
        alias_name = rv.alias.aliasname if rv.alias is not None else rv.relname
        # a whole-row reference uses all: `c`, and `c.f` where f is not a column of c
        # (PostgreSQL reads that as f(c), a function of the whole row)
        names = {c.name for c in p.relation.columns} | SYSTEM_COLUMNS
        everything = (
            refs is None
            or alias_name in refs
            or any(q == alias_name and f not in names for q, f in self.qualified)
            # `c(a, b, ...)` renames the columns: names no longer say which ones are read
            or (rv.alias is not None and bool(rv.alias.colnames))
        )
        for c in p.relation.columns:
            spec = p.masks.get(c.name)
            ident = quote_ident(c.name)
            if spec is None:
                cols.append(ident)
            elif not everything and refs is not None and c.name not in refs:
                # not mentioned: NULL keeps the column list (and the planner's work) small
                cols.append(f"CAST(NULL AS {c.type.formatted}) AS {ident}")
            else:
                # (deny: NULL of the column's type, the audit says denied)
                cols.append(f"{sql_expr(spec, ident, c.type, keys)} AS {ident}")
                self.masked_columns.add(f"{p.rule_table}.{c.name}")
                if spec.name == "deny":
                    self.denied.add(f"{p.rule_table}.{c.name}")
                self.uses_hash = self.uses_hash or spec.name == "hash"
        system = self.system_columns(p, rv, alias_name, names)
        cols.extend(quote_ident(s) for s in system)
        sub = parse_one(f"SELECT {', '.join(cols)} FROM {self._rv_text(rv)}")
        if system:
            self.carrying[id(sub)] = (alias_name, tuple(c.name for c in p.relation.columns))
        if sample is not None:
            inner = sub.fromClause[0]
            sample.relation = inner
            sub.fromClause = (sample,)
        alias = rv.alias if rv.alias is not None else ast.Alias(aliasname=rv.relname)
        if rv.alias is None:
            # `billing.customers.name` must keep resolving, also when FROM said `customers`
            self.replaced[(p.relation.schema, rv.relname)] = alias.aliasname
        self.generated.add(id(sub))
        if sample is not None:
            self.samples[id(sub)] = sample
        self.changes += 1
        return ast.RangeSubselect(lateral=False, subquery=sub, alias=alias)

    # ---- expressions -------------------------------------------------------------------

    def function(self, node: Any) -> Any:
        self.check_names(node.funcname, "FuncCall", "funcname")
        self.check_function(node.funcname)
        field = self.pin_builtin(node)
        if field is not None:
            # a field in function notation: `(c).f`, analysed as such
            self.rested.add(id(node))
            return self.visit(field)
        self.keep_grammar_pin(node)
        if name_of(node.funcname[-1]).lower() == "set_config":
            self.check_set_config(node.args)
        self.rest(node)
        return node

    def operator(self, node: Any) -> Any:
        self.check_names(node.name, "A_Expr", "name")
        self.check_operator(node.name)
        self.rest(node)
        return node

    def sublink(self, node: Any) -> Any:
        """`x op ANY (SELECT ...)`: the operator is checked like any other."""
        self.check_names(node.operName, "SubLink", "operName")
        self.check_operator(node.operName)
        self.rest(node)
        return node

    def sort_by(self, node: Any) -> Any:
        """ORDER BY x USING op: the operator is checked like any other."""
        self.check_names(node.useOp, "SortBy", "useOp")
        self.check_operator(node.useOp)
        self.rest(node)
        return node

    def constraint(self, node: Any) -> Any:
        """A constraint of a table the session creates."""
        for pair in node.exclusions or ():
            # EXCLUDE (element WITH operator, ...): the operator runs on every new row
            if not isinstance(pair, tuple | list) or len(pair) != 2:
                raise Refusal("pgveil does not expect this in an EXCLUDE constraint")
            elem, opname = pair
            self.visit(elem)
            self.check_names(opname, "Constraint", "exclusions")
            self.check_operator(opname)
        if node.pktable is not None:
            self.rest(node.pktable)
            found = self.protected_of(node.pktable, cte_scope=False)
            if found is not None:
                # a row of the new table is accepted only if the key exists there: an oracle
                raise Refusal(
                    f"a foreign key to protected table {found.rule_table} could confirm "
                    "values of its columns"
                )
        self.rest(node)
        return node

    def column_ref(self, node: Any) -> Any:
        fields = node.fields
        self.check_names(fields, "ColumnRef", "fields")
        names = [name_of(f) for f in fields]
        if len(names) >= 2 and isinstance(fields[-1], ast.String):
            columns = self.owner_columns(node)
            call = self.row_function(names[-1], columns, fields[:-1], node.location)
            if call is not None:
                self.rested.add(id(node))
                return self.visit(call)
            self.field_selection(names[-1], self.declared(names[-1], names[-2]), columns)
        if len(fields) >= 3 and isinstance(fields[-1], ast.String | ast.A_Star):
            key = (names[-3], names[-2])
            alias = self.replaced.get(key)
            if alias is not None:
                node.fields = (ast.String(sval=alias), fields[-1])
                self.changes += 1
        # a deny column is no exception here: where a name reads a protected relation's
        # column, the masking subquery (or, for a write's own target, the write rewrite)
        # gives NULL of its type, so predicates, sorting and functions only see NULL
        self.rest(node)
        return node

    def declared(self, name: str, qualifier: str | None = None, call: Any = None) -> bool:
        """Whether `qualifier.name` (or `(call).name`) reads an output column that the
        function of a FROM item named `qualifier` (or the function `call` calls) declares."""
        outputs = self.an.catalog.function_outputs
        if isinstance(call, ast.FuncCall) and call.funcname:
            return name in outputs.get(name_of(call.funcname[-1]), ())
        return qualifier is not None and any(
            label == qualifier and name in outputs.get(function, ())
            for label, function in self.row_uses.functions
        )

    def owner_columns(self, node: Any) -> frozenset[str] | None:
        """The columns of the item the qualifier of `node` (a client's `t.f` or `(t).f`)
        names, None when rules.fields cannot tell (or pgveil wrote the node)."""
        found = self.owners.get(id(node))
        return found[1] if found is not None and found[0] is node else None

    def row_function(
        self, name: str, columns: frozenset[str] | None, qualifier: Any, location: Any
    ) -> Any:
        """`t.f` (`(t).f`) where f is surely no column of t (see field_selection) and a
        built-in that takes a row (`c.to_json`): the server calls f(t). pgveil sends
        `pg_catalog.f(t.*)`, the call the server makes today, so that an overload created
        since the catalog read (`public.to_json(the table's row type)`, a closer match) is
        never the one called. None for anything else."""
        if columns is None or name in columns:
            return None
        cat = self.an.catalog
        if name not in cat.row_functions or any(n == name for _, n in cat.user_functions):
            return None
        if any(n == name for _, n in self.an.policy.allowed_functions):
            return None  # an allow-listed function of that name may be the one meant
        if name in DENIED_FUNCTIONS or name.startswith(DENIED_PREFIXES):
            return None  # (refused by field_selection)
        self.changes += 1
        row = ast.ColumnRef(fields=(*qualifier, ast.A_Star()), location=location)
        return ast.FuncCall(
            funcname=(ast.String(sval="pg_catalog"), ast.String(sval=name)),
            args=(row,),
            funcformat=_EXPLICIT_CALL,
            location=location,
        )

    def field_selection(
        self, name: str, declared: bool = False, columns: frozenset[str] | None = None
    ) -> None:
        """`t.f`, `(x).f`: PostgreSQL reads f(t) when f is no field of t (attribute
        notation), so f must pass the checks of a function call; a name that is no field
        of t may be a function created since pgveil read the catalog: unknown, so the
        statement waits for a catalog read begun after it (then f is judged as the
        function it has become, or the client gets the server's 42703). `columns`: t's
        columns where rules.fields can tell them (a relation's, a CTE's or subquery's
        output names). Where it cannot (a function item without a column definition list,
        `(x).f` of an expression, a relation the catalog does not know), f must be some
        column or field name the catalog has, or `declared`: an output column of the
        function that t (or x) is the result of (see declared)."""
        if name in DENIED_FUNCTIONS or name.startswith(DENIED_PREFIXES):
            raise Refusal(f"function {name} can read data pgveil cannot mask")
        cat = self.an.catalog
        if any(n == name for _, n in cat.user_functions):
            self.check_function((ast.String(sval=name),))
        elif columns is not None:
            if name not in columns:
                self.unknown.add(f"column or function {name}")
        elif (
            cat.column_names
            and name not in cat.column_names
            and name not in self.defined_names
            and name not in SYSTEM_COLUMNS
            and not declared
        ):
            self.unknown.add(f"column or function {name}")

    def indirection(self, node: Any) -> Any:
        """`(x).f`, `(x)[i]`, `(x).*`: a field name may be a function call (see
        field_selection)."""
        parts: tuple[Any, ...] = tuple(node.indirection or ())
        if len(parts) == 1 and isinstance(parts[0], ast.String):
            call = (
                self.row_function(
                    name_of(parts[0]), self.owner_columns(node), node.arg.fields, node.arg.location
                )
                if isinstance(node.arg, ast.ColumnRef)
                else None
            )
            if call is not None:
                self.rested.add(id(node))
                return self.visit(call)
        for i, part in enumerate(node.indirection or ()):
            if isinstance(part, ast.String):
                name = name_of(part)
                # (only the first field is one of t's: a later one is a field of a value)
                columns = self.owner_columns(node) if i == 0 else None
                self.field_selection(name, self.declared(name, call=node.arg), columns)
        if node.indirection:
            node.indirection = self._visit_all(node.indirection)  # subscripts: expressions
        self.rest(node)
        return node

    def all_touched(self) -> Iterator[Protected]:
        for table in self.touched:
            schema, _, name = table.partition(".")
            p = self.an.pmap.by_name.get((schema, name))
            if p is not None:
                yield p

    def check_function(self, funcname: Iterable[Any]) -> None:
        parts = [name_of(x) for x in funcname]
        # exact: the parser already folded unquoted names; "Lower" is not lower
        name = parts[-1]
        schema = parts[-2] if len(parts) >= 2 else None
        cat = self.an.catalog
        if name in DENIED_FUNCTIONS or name.startswith(DENIED_PREFIXES):
            raise Refusal(f"function {name} can read data pgveil cannot mask")
        if name == "set_config":
            return  # its arguments are checked by check_set_config at the call site
        allowed = self.an.policy.allowed_functions
        if schema is not None and schema != "pg_catalog":
            if (schema, name) not in allowed:
                raise Refusal(f"function {schema}.{name} is not allowed for masked roles")
            return
        if schema is None:
            defined = {s for s, n in cat.user_functions if n == name}
            if defined and not all((s, name) in allowed for s in defined):
                raise Refusal(f"function {name} is not allowed for masked roles")
            if not defined and name not in cat.builtin_functions:
                raise Refusal(f"function {name} is not allowed for masked roles")

    def pin_builtin(self, node: Any) -> Any:
        """`upper(x)` => `pg_catalog.upper(x)`: an overload created since pgveil read the
        catalog (public.upper(bigint), say) can then never be chosen instead. Returns what
        stands for a field in function notation instead (see projection), else None."""
        if len(node.funcname) != 1:
            return None
        name = name_of(node.funcname[0])
        if name not in self.an.catalog.builtin_functions:
            return None
        if any(n == name for _, n in self.an.policy.allowed_functions):
            return None  # an allow-listed function of that name may be the one meant
        field = self.projection(node, name)
        if field is not None:
            return field
        node.funcname = (ast.String(sval="pg_catalog"), ast.String(sval=name))
        self.changes += 1
        return None

    def keep_grammar_pin(self, node: Any) -> None:
        """A call pglast's grammar qualified with pg_catalog although the statement wrote it
        as a plain call (`json_object(...)`: PostgreSQL 16's grammar pins it, PostgreSQL
        15's reads a call of whatever `json_object` the search path finds first): pgveil
        sends its own text, where the name is qualified, never the statement's. (Calls in
        the SQL standard's own syntax, `EXTRACT(... FROM ...)`, are pinned by every
        server's grammar; they are built with COERCE_SQL_SYNTAX.)"""
        if len(node.funcname) != 2 or name_of(node.funcname[0]) != "pg_catalog":
            return
        if node.funcformat != _EXPLICIT_CALL:
            return
        at = node.location if isinstance(node.location, int) else -1
        written = self.text[at : at + 12].lower() if 0 <= at < len(self.text) else ""
        if not written.startswith(("pg_catalog", '"pg_catalog"')):
            self.changes += 1  # (the printer writes pg_catalog.name)

    def projection(self, node: Any, name: str) -> Any:
        """`f(c)`, c a whole row (`c.*`, or a name no column has: a FROM item's), f no
        built-in that takes a row: the server reads the field c.f (parse_func.c,
        ParseFuncOrColumn), and only for an unqualified name (`pg_catalog.f(c)` would fail).
        pgveil sends `(c).f`, which reads the field whatever functions exist. None when the
        call is no such projection (then it is pinned)."""
        if len(node.args or ()) != 1 or node.agg_order or node.agg_filter or node.over:
            return None
        if node.agg_star or node.agg_distinct or node.func_variadic:
            return None
        if name in self.an.catalog.row_functions:
            return None  # the built-in takes the row: it is what the server calls, pinned
        arg = node.args[0]
        if not isinstance(arg, ast.ColumnRef):
            return None
        fields = arg.fields
        if isinstance(fields[-1], ast.A_Star):
            row = ast.ColumnRef(fields=fields[:-1]) if len(fields) == 2 else None
        elif len(fields) == 1 and not self.may_be_column(name_of(fields[0])):
            row = arg
        else:
            row = None
        if row is None:
            return None
        self.changes += 1
        return ast.A_Indirection(arg=row, indirection=(ast.String(sval=name),))

    def may_be_column(self, name: str) -> bool:
        """Whether a one-part name may be a column (it then reads as one, before a whole
        row of that name)."""
        cat = self.an.catalog
        return not cat.column_names or name in cat.column_names or name in self.defined_names

    def check_set_config(self, args: Any) -> None:
        first = args[0] if args else None
        setting = None
        if isinstance(first, ast.A_Const) and isinstance(first.val, ast.String):
            setting = first.val.sval.lower()
        if setting is None:
            raise Refusal("set_config with a computed setting name is not allowed for masked roles")
        if setting in DENIED_SETTINGS and not set_config_keeps_pinned(setting, args):
            raise Refusal(f"masked roles may not change {setting}")

    def check_operator(self, opname: Any) -> None:
        if not opname:
            return
        parts = [name_of(x) for x in opname]
        if len(parts) >= 2 and parts[-2] != "pg_catalog":
            raise Refusal(
                f"operator {parts[-1]} outside pg_catalog is not allowed for masked roles"
            )
        if parts[-1] in self.an.catalog.user_operators:
            raise Refusal(f"operator {parts[-1]} is not allowed for masked roles")


# node class -> the ReadRewrite (or subclass) method that handles it in `visit`
_HANDLERS = {
    "SelectStmt": "select",
    "InsertStmt": "write",
    "UpdateStmt": "write",
    "DeleteStmt": "write",
    "CopyStmt": "copy",
    "ExplainStmt": "explain",
    "PrepareStmt": "nested_query",
    "DeclareCursorStmt": "nested_query",
    "CreateTableAsStmt": "nested_query",
    "ViewStmt": "nested_query",
    "VariableSetStmt": "variable_set",
    "CreateStmt": "create_table",
    "ConstraintsSetStmt": "constraints_set",
    "LockingClause": "locking_clause",
    "FuncCall": "function",
    "A_Expr": "operator",
    "SubLink": "sublink",
    "SortBy": "sort_by",
    "Constraint": "constraint",
    "ColumnRef": "column_ref",
    "A_Indirection": "indirection",
}
HANDLERS = dict(_HANDLERS)
"""For the coverage test: which method handles which node class in `visit`."""


def _flat(value: Any) -> Iterator[Any]:
    if isinstance(value, tuple | list):
        for v in value:
            yield from _flat(v)
    elif value is not None:
        yield value


# the column of a rewritten statistics view's inner subquery that says whether its row's
# numbers are shown (see ReadRewrite.stats_readable); no server column has a space
_READABLE = '"pgveil readable"'


def _stats_key(schema: str, table: str, column: str | None = None) -> str:
    """A relation (and column) as ReadRewrite.stats_readable's SQL spells it: each name
    after its length in characters, so that no two differ only in where a dot stands."""
    key = f"{len(schema)}.{schema}.{len(table)}.{table}"
    return key if column is None else f"{key}.{column}"


def _text_array(items: list[str]) -> str:
    return f"CAST(ARRAY[{', '.join(sql_literal(i) for i in items)}] AS pg_catalog.text[])"


def _standard_unnest(call: Any) -> bool:
    """Whether a FROM function is the server's special form of `unnest` with several
    arguments (see ReadRewrite.expand_unnest): the conditions of transformRangeFunction."""
    return (
        isinstance(call, ast.FuncCall)
        and len(call.funcname) == 1
        and name_of(call.funcname[0]) == "unnest"
        and len(call.args or ()) > 1
        and not call.agg_order
        and call.agg_filter is None
        and call.over is None
        and not call.agg_star
        and not call.agg_distinct
        and not call.func_variadic
    )


def _from_items(items: Any) -> Iterator[Any]:
    """The items of a FROM list, those joined in JoinExprs included."""
    for item in items or ():
        if isinstance(item, ast.JoinExpr):
            yield from _from_items((item.larg, item.rarg))
        else:
            yield item


def _holds_node(value: Any) -> bool:
    return any(isinstance(v, ast.Node) for v in _flat(value))
