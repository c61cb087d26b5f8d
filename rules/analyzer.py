"""The statement analyser of masked sessions: parse, rewrite, or refuse.

Every reference to a protected relation in a reading position becomes a subquery with the
same alias and the same columns in which each personal column is replaced by its mask, so
that expressions, predicates, whole-row references and errors only ever see masked values
(DESIGN.md section 2). Writes are rewritten so that what they read of the target is masked,
and a masked value written back keeps the stored original. What cannot be accounted for is
refused with a reason (shown to the client with SQLSTATE 42501).

Pure: no I/O, no logging. Reasons never quote literals from the statement.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import pglast.ast
from pglast import parse_sql
from pglast.enums import A_Expr_Kind, BoolExprType
from pglast.parser import ParseError
from pglast.stream import RawStream

from rules.catalog import Protected, ProtectionMap
from rules.masks import sql_expr

# The AST is walked generically (attributes by name, optional everywhere); typing it node by
# node would cost more casts than it would catch.
ast: Any = pglast.ast

# Built-in functions that read data behind the rewriter's back: they run SQL text, read a
# relation named by a value, read files or large objects, or show query text.
DENIED_FUNCTIONS = frozenset(
    {
        "ts_rewrite", "query_to_xml", "query_to_xml_and_xmlschema", "query_to_xmlschema",
        "table_to_xml", "table_to_xml_and_xmlschema", "table_to_xmlschema",
        "cursor_to_xml", "cursor_to_xmlschema",
        "schema_to_xml", "schema_to_xml_and_xmlschema", "schema_to_xmlschema",
        "database_to_xml", "database_to_xml_and_xmlschema", "database_to_xmlschema",
        "ts_stat", "lo_get", "lo_export", "lo_import", "loread", "lo_open", "lo_put",
        "pg_read_file", "pg_read_binary_file", "pg_stat_file", "pg_ls_dir",
        "current_query", "pg_stat_get_activity", "pg_stat_get_backend_activity",
        "pg_cursor", "pg_prepared_statement", "pg_stat_statements",
        "pg_logical_slot_get_changes", "pg_logical_slot_peek_changes",
        "pg_logical_slot_get_binary_changes", "pg_logical_slot_peek_binary_changes",
        "pg_get_backend_memory_contexts",
    }
)  # fmt: skip
DENIED_PREFIXES = ("dblink",)

# Relations that expose column values or other sessions' query text.
DENIED_RELATIONS = frozenset(
    {
        "pg_stats", "pg_stats_ext", "pg_stats_ext_exprs", "pg_statistic",
        "pg_statistic_ext_data", "pg_stat_activity", "pg_stat_statements",
        "pg_stat_statements_info", "pg_prepared_statements", "pg_cursors",
        "pg_largeobject", "pg_shadow", "pg_authid", "pg_user_mappings",
        "pg_backend_memory_contexts",
    }
)  # fmt: skip

# Settings a masked session may not change: identity, and what would make pgveil's parser
# read a statement differently from the server's.
DENIED_SETTINGS = frozenset(
    {"role", "session_authorization", "standard_conforming_strings", "client_encoding",
     "backslash_quote"}
)  # fmt: skip

# Statements a masked session may run at all (utility statements not listed are refused).
_ALLOWED_UTILITY = frozenset(
    {
        "TransactionStmt", "VariableShowStmt", "DeallocateStmt", "FetchStmt", "ClosePortalStmt",
        "ListenStmt", "UnlistenStmt", "NotifyStmt", "DiscardStmt", "LockStmt", "TruncateStmt",
        "CheckPointStmt", "CreateStmt", "DropStmt", "ConstraintsSetStmt",
    }
)  # fmt: skip


class Refusal(Exception):
    """The statement must not run; `reason` is shown to the client (no literals in it)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


# (table, keys: literal text or parameter number, whether the key column is an integer)
SubjectKeys = tuple[str, tuple[str | int, ...], bool]


@dataclass(frozen=True)
class Decision:
    action: str  # "pass" (send as is), "rewrite" (send `sql`), "refuse"
    sql: str | None = None
    reason: str | None = None
    kinds: tuple[str, ...] = ()  # select, insert, update, delete, copy, ...
    tables: tuple[str, ...] = ()  # protected relations the statement reads or writes
    columns: tuple[str, ...] = ()  # personal columns returned masked (table.column)
    uses_hash: bool = False
    # relations the catalog does not know (created since it was read), and temporary
    # relations the statement creates: the session judges those against its own
    unknown_relations: tuple[str, ...] = ()
    temp_relations: tuple[str, ...] = ()
    # data subjects named by the statement itself: a write's or a one-table read's
    # `subject = k` / `subject IN (...)` (top-level AND), or an INSERT's VALUES. A key is
    # the literal's text, or the number of the parameter that carries it.
    subject_keys: tuple[SubjectKeys, ...] = ()
    # SQL-level names: what PREPARE / DECLARE defines ("prepare:p", "cursor:c"), and what
    # EXECUTE / FETCH uses, so the session can tell which statement an EXECUTE runs
    defines: tuple[str, ...] = ()
    uses: tuple[str, ...] = ()
    drops: tuple[str, ...] = ()
    # the statement as audit events show it (see rules.context.redact), and its hash:
    # filled in by the context, once per statement shape
    redacted: str = ""
    fingerprint: str = ""


def _stmt(sql: str) -> Any:
    """The AST of pgveil's own single-statement SQL."""
    return parse_sql(sql)[0].stmt


def _name(n: Any) -> str:
    return str(n.sval) if isinstance(n, ast.String) else ""


def quote_ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


_KIND = {
    "SelectStmt": "select", "InsertStmt": "insert", "UpdateStmt": "update",
    "DeleteStmt": "delete", "CopyStmt": "copy", "ExplainStmt": "explain",
    "PrepareStmt": "prepare", "ExecuteStmt": "execute", "DeclareCursorStmt": "declare",
    "FetchStmt": "fetch", "CreateTableAsStmt": "create_table_as", "ViewStmt": "create_view",
    "VariableSetStmt": "set", "VariableShowStmt": "show", "TransactionStmt": "transaction",
    "CallStmt": "call",
}  # fmt: skip


class Analyzer:
    """Decides for one policy x catalog. Thread-compatible; holds no per-session state."""

    def __init__(self, pmap: ProtectionMap) -> None:
        self.pmap = pmap
        self.policy = pmap.policy
        self.catalog = pmap.catalog

    def analyze(self, sql: str) -> Decision:
        try:
            stmts = parse_sql(sql)
        except ParseError:
            return Decision("refuse", reason="pgveil cannot parse the statement")
        if not stmts:
            return Decision("pass")
        out: list[str] = []
        kinds: list[str] = []
        rewriter = _Rewriter(self)
        rewriter.references, rewriter.qualified = _references(stmts)
        rewriter.defined_names = _defined_names(stmts)
        subject_keys = self.subject_keys(stmts) if len(stmts) == 1 else ()
        defines, uses, drops = _sql_names(stmts)
        try:
            changed = False
            for raw in stmts:
                kinds.append(_KIND.get(type(raw.stmt).__name__, type(raw.stmt).__name__))
                before = rewriter.changes
                raw.stmt = rewriter.statement(raw.stmt)
                changed = changed or rewriter.changes != before
                out.append(RawStream()(raw.stmt))
        except Refusal as r:
            return Decision("refuse", reason=r.reason, kinds=tuple(kinds), tables=rewriter.tables())
        unknown = tuple(sorted(rewriter.unknown - rewriter.temp))
        temp = tuple(sorted(rewriter.temp))
        if not changed:
            return Decision(
                "pass",
                kinds=tuple(kinds),
                tables=rewriter.tables(),
                unknown_relations=unknown,
                temp_relations=temp,
                subject_keys=subject_keys,
                defines=defines,
                uses=uses,
                drops=drops,
            )
        return Decision(
            "rewrite",
            sql="; ".join(out),
            kinds=tuple(kinds),
            tables=rewriter.tables(),
            columns=tuple(sorted(rewriter.masked_columns)),
            uses_hash=rewriter.uses_hash,
            unknown_relations=unknown,
            temp_relations=temp,
            subject_keys=subject_keys,
            defines=defines,
            uses=uses,
            drops=drops,
        )

    def subject_keys(self, stmts: Any) -> tuple[SubjectKeys, ...]:
        """The subjects a single statement names (see Decision.subject_keys); read before
        the rewrite changes the tree."""
        node = stmts[0].stmt
        if isinstance(node, ast.SelectStmt):
            if not node.fromClause or len(node.fromClause) != 1 or node.withClause:
                return ()
            rv, where = node.fromClause[0], node.whereClause
        elif isinstance(node, ast.UpdateStmt | ast.DeleteStmt):
            rv, where = node.relation, node.whereClause
        elif isinstance(node, ast.InsertStmt):
            rv, where = node.relation, None
        else:
            return ()
        if not isinstance(rv, ast.RangeVar):
            return ()
        found = self.pmap.by_name.get((rv.schemaname or "", rv.relname)) if rv.schemaname else None
        if found is None and not rv.schemaname:
            candidates = self.pmap.by_relname.get(rv.relname, [])
            found = candidates[0] if len(candidates) == 1 else None
        if found is None or found.subject is None:
            return ()
        alias = rv.alias.aliasname if rv.alias is not None else rv.relname
        if isinstance(node, ast.InsertStmt):
            keys = _inserted_keys(node, found.subject)
        else:
            keys = _filtered_keys(where, found.subject, alias)
        if keys is None:
            return ()
        column = found.relation.column(found.subject)
        if column is not None and column.type.name in INTEGER_TYPES:
            # '01' names subject 1 of an integer key, as the rows returned would say it;
            # keys put back or bound later are normalised by whoever resolves them
            keys = tuple(integer_key(k) if isinstance(k, str) else k for k in keys)
            return ((found.rule_table, keys, True),)
        return ((found.rule_table, keys, False),)


def _sql_names(stmts: Any) -> tuple[tuple[str, ...], tuple[str, ...], tuple[str, ...]]:
    """SQL-level names of prepared statements and cursors, which are the protocol's
    statements and portals: (defined, used, dropped), as "statement:NAME" / "portal:NAME"
    ("statement:*" / "portal:*" for DEALLOCATE ALL / CLOSE ALL), over every statement."""
    defined: list[str] = []
    used: list[str] = []
    dropped: list[str] = []
    for raw in stmts:
        node = raw.stmt
        inner = getattr(node, "query", None)
        if isinstance(node, ast.CreateTableAsStmt | ast.ExplainStmt) and isinstance(
            inner, ast.ExecuteStmt
        ):
            node = inner
        if isinstance(node, ast.PrepareStmt):
            defined.append(f"statement:{node.name}")
        elif isinstance(node, ast.DeclareCursorStmt):
            defined.append(f"portal:{node.portalname}")
        elif isinstance(node, ast.ExecuteStmt):
            used.append(f"statement:{node.name}")
        elif isinstance(node, ast.FetchStmt) and not node.ismove:
            used.append(f"portal:{node.portalname}")
        elif isinstance(node, ast.DeallocateStmt):
            dropped.append(
                "statement:*" if node.isall or not node.name else f"statement:{node.name}"
            )
        elif isinstance(node, ast.ClosePortalStmt):
            dropped.append(f"portal:{node.portalname}" if node.portalname else "portal:*")
    return tuple(defined), tuple(used), tuple(dropped)


INTEGER_TYPES = frozenset({"int2", "int4", "int8", "oid"})


def integer_key(text: str) -> str:
    """An integer subject key as its value ('007' and ' +7' name subject 7); other text as
    it is."""
    digits = text.strip().replace("_", "")
    for base in (10, 0):  # decimal (leading zeros allowed), then 0x / 0o / 0b
        try:
            return str(int(digits, base))
        except ValueError:
            pass
    return text


def _key_of(node: Any) -> str | int | None:
    if isinstance(node, ast.ParamRef):
        return int(node.number)
    if isinstance(node, ast.A_Const) and not node.isnull:
        v = node.val
        if isinstance(v, ast.Integer):
            return str(v.ival)
        if isinstance(v, ast.String):
            return str(v.sval)
        if isinstance(v, ast.Float):
            return str(v.fval)
    if isinstance(node, ast.TypeCast):
        return _key_of(node.arg)
    return None


def _is_subject(node: Any, subject: str, alias: str) -> bool:
    if not isinstance(node, ast.ColumnRef):
        return False
    names = [_name(f) for f in node.fields]
    return names[-1] == subject and (len(names) == 1 or names[-2] == alias)


def _filtered_keys(where: Any, subject: str, alias: str) -> tuple[str | int, ...] | None:
    """Keys from `subject = k` or `subject IN (k, ...)` among the top-level AND terms."""
    terms = [where]
    if isinstance(where, ast.BoolExpr) and where.boolop == BoolExprType.AND_EXPR:
        terms = list(where.args)
    for t in terms:
        if not isinstance(t, ast.A_Expr) or [_name(n) for n in t.name] != ["="]:
            continue
        if t.kind == A_Expr_Kind.AEXPR_OP:
            for col, other in ((t.lexpr, t.rexpr), (t.rexpr, t.lexpr)):
                key = _key_of(other)
                if _is_subject(col, subject, alias) and key is not None:
                    return (key,)
        elif t.kind == A_Expr_Kind.AEXPR_IN and _is_subject(t.lexpr, subject, alias):
            keys = [_key_of(x) for x in t.rexpr]
            if keys and all(k is not None for k in keys):
                return tuple(k for k in keys if k is not None)
    return None


def _inserted_keys(node: ast.InsertStmt, subject: str) -> tuple[str | int, ...] | None:
    sel = node.selectStmt
    if not node.cols or not isinstance(sel, ast.SelectStmt) or not sel.valuesLists:
        return None
    names = [c.name for c in node.cols]
    if subject not in names:
        return None
    i = names.index(subject)
    keys = [_key_of(row[i]) if len(row) > i else None for row in sel.valuesLists]
    return tuple(k for k in keys if k is not None) if all(k is not None for k in keys) else None


@dataclass
class _Target:
    """The relation a write modifies, as the statement refers to it."""

    protected: Protected
    alias: str
    schema: str | None
    name: str


@dataclass
class _Rewriter:
    an: Analyzer
    changes: int = 0
    touched: set[str] = field(default_factory=set)
    masked_columns: set[str] = field(default_factory=set)
    uses_hash: bool = False
    ctes: list[set[str]] = field(default_factory=list)
    # (schema, relname) of replaced references -> alias, for 3-part column references
    replaced: dict[tuple[str, str], str] = field(default_factory=dict)
    generated: set[int] = field(default_factory=set)  # id() of pgveil's masking subqueries
    # names the statement mentions (None: it may use every column, e.g. through *)
    references: frozenset[str] | None = None
    qualified: frozenset[tuple[str, str]] = frozenset()  # `q.name` references: (q, name)
    unknown: set[str] = field(default_factory=set)
    temp: set[str] = field(default_factory=set)
    defined_names: frozenset[str] = frozenset()  # output and column aliases of the statement

    def tables(self) -> tuple[str, ...]:
        return tuple(sorted(self.touched))

    # ---- statements --------------------------------------------------------------------

    def statement(self, node: Any) -> Any:
        kind = type(node).__name__
        if isinstance(node, ast.SelectStmt):
            self.select(node)
        elif isinstance(node, ast.InsertStmt | ast.UpdateStmt | ast.DeleteStmt):
            self.write(node)
        elif isinstance(node, ast.MergeStmt):
            raise Refusal("MERGE is not supported for masked roles")
        elif isinstance(node, ast.CopyStmt):
            return self.copy(node)
        elif isinstance(node, ast.ExplainStmt):
            inner = node.query
            if isinstance(inner, ast.CreateTableAsStmt):
                inner = inner.query
            if isinstance(inner, ast.ExecuteStmt):
                # the prepared statement may carry hash masks; its plan would show the key
                raise Refusal("EXPLAIN of a prepared statement is not allowed for masked roles")
            node.query = self.statement(node.query)
            if self.uses_hash:
                raise Refusal("EXPLAIN of a statement that reads hash-masked columns")
        elif isinstance(
            node, ast.PrepareStmt | ast.DeclareCursorStmt | ast.CreateTableAsStmt | ast.ViewStmt
        ):
            node.query = self.statement(node.query)
            if isinstance(node, ast.CreateTableAsStmt):
                self.created(node.into.rel)
            elif isinstance(node, ast.ViewStmt):
                self.created(node.view)
            stores_sql = isinstance(node, ast.ViewStmt) or (
                isinstance(node, ast.CreateTableAsStmt) and node.objtype == 23  # OBJECT_MATVIEW
            )
            if stores_sql and self.uses_hash:
                # the view's stored definition (pg_get_viewdef) would show the mask's key
                raise Refusal("a view over hash-masked columns would expose the masking key")
        elif isinstance(node, ast.ExecuteStmt):
            self.walk(node.params)
        elif isinstance(node, ast.VariableSetStmt):
            self.variable_set(node)
        elif isinstance(node, ast.CallStmt):
            self.visit(node.funccall)  # the procedure itself must pass the allow-list
        elif isinstance(node, ast.DoStmt):
            raise Refusal("DO blocks are not allowed for masked roles")
        elif isinstance(node, ast.CreateStmt):
            self.created(node.relation)
            self.walk(node.tableElts)
            self.walk(node.inhRelations)
        elif kind in _ALLOWED_UTILITY:
            self.walk(node)
        else:
            raise Refusal(f"{_KIND.get(kind, kind)} statements are not allowed for masked roles")
        return node

    def created(self, rv: Any) -> None:
        """A relation the statement creates: temporary ones are the session's own."""
        if rv is None:
            return
        if rv.relpersistence == "t" or rv.schemaname == "pg_temp":
            self.temp.add(rv.relname)
        # a permanent one is unknown to pgveil until the catalog is read again

    def variable_set(self, node: ast.VariableSetStmt) -> None:
        name = (node.name or "").lower()
        if name == "search_path":
            schemas = [
                a.val.sval
                for a in node.args or ()
                if isinstance(a, ast.A_Const) and isinstance(a.val, ast.String)
            ]
            if "pg_temp" in schemas[1:] or any("pg_temp" in x and x != "pg_temp" for x in schemas):
                # temporary relations must win name resolution, as they do by default
                raise Refusal("masked roles may list pg_temp only first in search_path")
        if name in DENIED_SETTINGS or name.startswith("session_authorization"):
            if name == "role" and node.kind == 4:  # RESET role: back to the login, harmless
                return
            raise Refusal(f"masked roles may not change {name}")
        self.walk(node.args)

    def copy(self, node: ast.CopyStmt) -> Any:
        if node.filename is not None or node.is_program:
            raise Refusal(
                "COPY to or from a server file or program is not allowed for masked roles"
            )
        if node.is_from:
            if node.relation is not None:
                self.protected_of(node.relation, record=True, cte_scope=False)
            self.walk(node.whereClause)  # COPY ... FROM ... WHERE can call functions
            return node
        if node.query is not None:
            node.query = self.statement(node.query)
            return node
        rv = node.relation
        found = self.protected_of(rv)
        if found is None:
            return node
        # COPY t [(cols)] TO ...  =>  COPY (SELECT cols FROM t) TO ...
        cols = ", ".join(quote_ident(_name(a)) for a in (node.attlist or ())) or "*"
        query = _stmt(f"SELECT {cols} FROM {self._rv_text(rv)}")
        self.select(query)
        node.relation = None
        node.attlist = None
        node.query = query
        self.changes += 1
        return node

    # ---- reads -------------------------------------------------------------------------

    def with_clause(self, clause: Any) -> None:
        """Rewrite the CTEs of a WITH clause with PostgreSQL's scoping, and push their names
        for the statement's body: a CTE sees the ones before it (all of them under
        RECURSIVE), never itself otherwise, so `WITH t AS (SELECT * FROM t)` reads table t."""
        scope: set[str] = set()
        if clause.recursive:
            scope.update(c.ctename for c in clause.ctes)
        self.ctes.append(scope)
        for cte in clause.ctes:
            cte.ctequery = self.statement(cte.ctequery)
            scope.add(cte.ctename)

    def select(self, node: ast.SelectStmt) -> None:
        pushed = False
        if node.withClause is not None:
            self.with_clause(node.withClause)
            pushed = True
        try:
            if node.fromClause:
                node.fromClause = tuple(self.from_item(i) for i in node.fromClause)
            if node.larg is not None:
                self.select(node.larg)
            if node.rarg is not None:
                self.select(node.rarg)
            if node.intoClause is not None:
                self.created(node.intoClause.rel)
            for attr in (
                "targetList", "whereClause", "groupClause", "havingClause", "windowClause",
                "valuesLists", "sortClause", "limitOffset", "limitCount", "distinctClause",
                "lockingClause",
            ):  # fmt: skip
                self.walk(getattr(node, attr))
        finally:
            if pushed:
                self.ctes.pop()

    def from_item(self, item: Any) -> Any:
        if isinstance(item, ast.RangeVar):
            return self.maybe_mask(item)
        if isinstance(item, ast.JoinExpr):
            item.larg = self.from_item(item.larg)
            item.rarg = self.from_item(item.rarg)
            self.walk(item.quals)
            return item
        if isinstance(item, ast.RangeSubselect):
            item.subquery = self.statement(item.subquery)
            return item
        if isinstance(item, ast.RangeTableSample) and isinstance(item.relation, ast.RangeVar):
            found = self.protected_of(item.relation)
            self.walk(item.args)
            self.walk(item.repeatable)
            if found is None:
                return item
            return self.masking_subquery(found, item.relation, sample=item)
        self.walk(item)
        return item

    def is_cte(self, rv: ast.RangeVar) -> bool:
        return rv.schemaname is None and any(rv.relname in s for s in self.ctes)

    def protected_of(
        self, rv: ast.RangeVar, record: bool = True, cte_scope: bool = True
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
        self.note_unknown(rv)
        rel = self.an.catalog.relations.get((rv.schemaname, name)) if rv.schemaname else None
        if rel is not None and rel.kind in ("v", "m") and rv.schemaname is not None:
            self.check_view(rel.schema, rel.name)
        if rv.schemaname is None:
            for (schema, rname), r in self.an.catalog.relations.items():
                if rname == name and r.kind in ("v", "m"):
                    self.check_view(schema, rname)
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
        cat = self.an.catalog
        schema, name = rv.schemaname, rv.relname
        if schema in ("pg_catalog", "information_schema") or (
            schema is None and name in cat.system_relations
        ):
            return
        if schema is not None:
            if (schema, name) not in cat.relations:
                self.unknown.add(name if schema == "pg_temp" else f"{schema}.{name}")
        elif not any(n == name for _, n in cat.relations):
            self.unknown.add(name)

    def check_view(self, schema: str, name: str) -> None:
        if (schema, name) in self.an.pmap.by_name:
            return  # rules of its own, or masks derived from its definition
        sources = self.an.catalog.view_sources.get((schema, name), ())
        for src in sources:
            if self.an.pmap.lookup(src[0], src[1]):
                raise Refusal(
                    f"view {schema}.{name} reads protected table {src[0]}.{src[1]} and has "
                    "no masking rules of its own"
                )

    def maybe_mask(self, rv: ast.RangeVar) -> Any:
        found = self.protected_of(rv)
        if found is None:
            return rv
        return self.masking_subquery(found, rv)

    def _rv_text(self, rv: ast.RangeVar) -> str:
        parts = [rv.schemaname, rv.relname] if rv.schemaname else [rv.relname]
        return ("" if rv.inh else "ONLY ") + ".".join(quote_ident(p) for p in parts)

    def masking_subquery(
        self, p: Protected, rv: ast.RangeVar, sample: Any = None
    ) -> ast.RangeSubselect:
        keys = self.an.policy.keys
        cols = []
        refs = self.references
        alias_name = rv.alias.aliasname if rv.alias is not None else rv.relname
        # a whole-row reference uses all: `c`, and `c.f` where f is not a column of c
        # (PostgreSQL reads that as f(c), a function of the whole row)
        names = {c.name for c in p.relation.columns} | _SYSTEM_COLUMNS
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
                cols.append(f"{sql_expr(spec, ident, c.type, keys)} AS {ident}")
                self.masked_columns.add(f"{p.rule_table}.{c.name}")
                self.uses_hash = self.uses_hash or spec.name == "hash"
        sub = _stmt(f"SELECT {', '.join(cols)} FROM {self._rv_text(rv)}")
        if sample is not None:
            inner = sub.fromClause[0]
            sample.relation = inner
            sub.fromClause = (sample,)
        alias = rv.alias if rv.alias is not None else ast.Alias(aliasname=rv.relname)
        if rv.alias is None:
            # `billing.customers.name` must keep resolving, also when FROM said `customers`
            self.replaced[(p.relation.schema, rv.relname)] = alias.aliasname
        self.generated.add(id(sub))
        self.changes += 1
        return ast.RangeSubselect(lateral=False, subquery=sub, alias=alias)

    # ---- expressions -------------------------------------------------------------------

    def walk(self, node: Any) -> None:
        for n in _children(node):
            self.visit(n)

    def visit(self, node: Any) -> None:
        if isinstance(node, ast.SelectStmt):
            self.select(node)
            return
        if isinstance(node, ast.FuncCall):
            self.check_function(node.funcname)
            self.pin_builtin(node)
            if _name(node.funcname[-1]).lower() == "set_config":
                self.check_set_config(node.args)
        elif isinstance(node, ast.A_Expr):
            self.check_operator(node.name)
        elif isinstance(node, ast.ColumnRef):
            self.column_ref(node)
            return
        elif isinstance(node, ast.RangeVar):
            self.protected_of(node)
        elif isinstance(node, ast.RangeSubselect | ast.JoinExpr | ast.RangeTableSample):
            self.from_item(node)
            return
        self.walk(node)

    def column_ref(self, node: ast.ColumnRef) -> None:
        fields = node.fields
        names = [_name(f) for f in fields]
        # `t.f` may call f(t) (attribute notation): f must pass the function checks, and a
        # name that is no column pgveil knows may be a function created since it looked
        if len(names) >= 2 and isinstance(fields[-1], ast.String):
            last = names[-1]
            if any(n == last for _, n in self.an.catalog.user_functions):
                self.check_function((ast.String(sval=last),))
            elif (
                self.an.catalog.column_names
                and last not in self.an.catalog.column_names
                and last not in self.defined_names
                and last not in _SYSTEM_COLUMNS
            ):
                self.unknown.add(f"column or function {last}")
        if len(fields) >= 3 and isinstance(fields[-1], ast.String | ast.A_Star):
            key = (names[-3], names[-2])
            alias = self.replaced.get(key)
            if alias is not None:
                node.fields = (ast.String(sval=alias), fields[-1])
                self.changes += 1
        col = names[-1] if names else ""
        if col:
            # by name, whatever the qualifier: an alias may denote any touched relation
            for p in self._all_touched():
                spec = p.masks.get(col)
                if spec is not None and spec.name == "deny":
                    raise Refusal(f"column {p.rule_table}.{col} is not available to masked roles")

    def _all_touched(self) -> Iterator[Protected]:
        for table in self.touched:
            schema, _, name = table.partition(".")
            p = self.an.pmap.by_name.get((schema, name))
            if p is not None:
                yield p

    def check_function(self, funcname: Iterable[Any]) -> None:
        parts = [_name(x) for x in funcname]
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

    def pin_builtin(self, node: Any) -> None:
        """`upper(x)` => `pg_catalog.upper(x)`: an overload created since pgveil read the
        catalog (public.upper(bigint), say) can then never be chosen instead."""
        if len(node.funcname) != 1:
            return
        name = _name(node.funcname[0])
        if name not in self.an.catalog.builtin_functions:
            return
        if any(n == name for _, n in self.an.policy.allowed_functions):
            return  # an allow-listed function of that name may be the one meant
        node.funcname = (ast.String(sval="pg_catalog"), ast.String(sval=name))
        self.changes += 1

    def check_set_config(self, args: Any) -> None:
        first = args[0] if args else None
        setting = None
        if isinstance(first, ast.A_Const) and isinstance(first.val, ast.String):
            setting = first.val.sval.lower()
        if setting is None:
            raise Refusal("set_config with a computed setting name is not allowed for masked roles")
        if setting in DENIED_SETTINGS:
            raise Refusal(f"masked roles may not change {setting}")

    def check_operator(self, opname: Any) -> None:
        if not opname:
            return
        parts = [_name(x) for x in opname]
        if len(parts) >= 2 and parts[-2] != "pg_catalog":
            raise Refusal(
                f"operator {parts[-1]} outside pg_catalog is not allowed for masked roles"
            )
        if parts[-1] in self.an.catalog.user_operators:
            raise Refusal(f"operator {parts[-1]} is not allowed for masked roles")

    # ---- writes ------------------------------------------------------------------------

    def write(self, node: Any) -> None:
        if node.withClause is not None:
            self.with_clause(node.withClause)
        try:
            rv = node.relation
            found = self.protected_of(rv, cte_scope=False)  # a write target is never a CTE
            target = None
            if found is not None:
                alias = rv.alias.aliasname if rv.alias is not None else rv.relname
                target = _Target(found, alias, rv.schemaname, rv.relname)
            if isinstance(node, ast.InsertStmt):
                self.insert(node, target)
            elif isinstance(node, ast.UpdateStmt):
                self.update(node, target)
            else:
                if node.usingClause:
                    node.usingClause = tuple(self.from_item(i) for i in node.usingClause)
                self.target_exprs(node, "whereClause", target)
            rc = node.returningClause
            if rc is not None and rc.exprs:
                rc.exprs = self.returning(rc.exprs, target)
        finally:
            if node.withClause is not None:
                self.ctes.pop()

    def insert(self, node: ast.InsertStmt, target: _Target | None) -> None:
        if node.selectStmt is not None:
            before = set(self.masked_columns)
            node.selectStmt = self.statement(node.selectStmt)
            if self.reads_personal(node.selectStmt, before):
                raise Refusal("a write whose new values read personal columns is refused")
        occ = node.onConflictClause
        if occ is not None:
            self.walk(occ.infer)
            if occ.targetList:
                self.set_list(occ.targetList, target, excluded_ok=True)
            self.target_exprs(occ, "whereClause", target)

    def update(self, node: ast.UpdateStmt, target: _Target | None) -> None:
        if node.fromClause:
            node.fromClause = tuple(self.from_item(i) for i in node.fromClause)
        self.set_list(node.targetList, target)
        self.target_exprs(node, "whereClause", target)

    def reads_personal(self, node: Any, masked_before: set[str]) -> bool:
        new = self.masked_columns - masked_before
        if not new:
            return False
        personal = {c.rpartition(".")[2] for c in new}
        known = {c.name for p in self._all_touched() for c in p.relation.columns}
        for n in _descendants(node):
            if isinstance(n, ast.ColumnRef):
                last = n.fields[-1]
                if isinstance(last, ast.A_Star) or _name(last) in personal:
                    return True
                if len(n.fields) == 1 and _name(last) not in known:
                    return True  # may be a whole-row reference to a protected relation
        return False

    def set_list(self, targets: Any, target: _Target | None, excluded_ok: bool = False) -> None:
        for rt in targets:
            if not isinstance(rt, ast.ResTarget):
                continue
            before = set(self.masked_columns)
            if target is not None and self.refers_to_personal(rt.val, target):
                raise Refusal("a write whose new values read personal columns is refused")
            self.visit(rt.val)
            if self.reads_personal(rt.val, before):
                raise Refusal("a write whose new values read personal columns is refused")
            if target is None or rt.name not in target.protected.masks:
                continue
            if rt.indirection:
                # SET col[...] / col.field: the write-back would copy the whole stored
                # value into a part of it that the mask may not cover
                raise Refusal("assigning to a part of a personal column is refused")
            if isinstance(rt.val, ast.MultiAssignRef):
                raise Refusal("multiple-column assignment to personal columns is refused")
            if excluded_ok and _is_excluded(rt.val):
                continue
            rt.val = self.write_back(rt.name, rt.val, target)

    def write_back(self, col: str, value: Any, target: _Target) -> Any:
        """SET col = v  =>  col = CASE WHEN v IS NOT DISTINCT FROM mask(col) THEN col ELSE v END"""
        c = target.protected.relation.column(col)
        spec = target.protected.masks[col]
        assert c is not None
        ref = f"{quote_ident(target.alias)}.{quote_ident(col)}"
        masked = sql_expr(spec, ref, c.type, self.an.policy.keys)
        self.uses_hash = self.uses_hash or spec.name == "hash"
        v = RawStream()(value)
        case = f"CASE WHEN ({v}) IS NOT DISTINCT FROM {masked} THEN {ref} ELSE ({v}) END"
        expr = _stmt(f"SELECT {case}").targetList[0].val
        self.changes += 1
        return expr

    def refers_to_personal(self, node: Any, target: _Target) -> bool:
        return any(
            self.personal_ref(n, target) is not None for n in _descendants(node, skip_selects=False)
        )

    def personal_ref(self, n: Any, target: _Target) -> str | None:
        if not isinstance(n, ast.ColumnRef):
            return None
        names = [_name(f) for f in n.fields]
        if len(names) == 1 and names[0] in target.protected.masks:
            return names[0]
        if len(names) >= 2 and names[-2] in (target.alias, target.name):
            if names[-1] in target.protected.masks:
                return names[-1]
            columns = {c.name for c in target.protected.relation.columns}
            if names[-1] not in columns and names[-1] not in _SYSTEM_COLUMNS:
                return "*"  # `c.f`, f no column of c: PostgreSQL reads f(c), the whole row
        if len(names) == 1 and names[0] in (target.alias, target.name):
            return "*"  # whole-row reference to the target
        if isinstance(n.fields[-1], ast.A_Star) and (
            len(names) == 1 or names[-2] in (target.alias, target.name)
        ):
            return "*"
        return None

    def target_exprs(self, owner: Any, attr: str, target: _Target | None) -> None:
        """Mask the target's personal columns where a write reads them (WHERE, ON CONFLICT)."""
        expr = getattr(owner, attr)
        if expr is None:
            return
        self.visit(expr)  # before masking: pgveil's own mask expressions need no checks
        if target is not None:
            setattr(owner, attr, self.mask_target_refs(expr, target))

    def mask_target_refs(self, node: Any, target: _Target, depth: int = 0) -> Any:
        if isinstance(node, ast.ColumnRef):
            col = self.personal_ref(node, target)
            if col == "*":
                raise Refusal("a whole-row reference to a protected table in a write is refused")
            if col is not None:
                spec = target.protected.masks[col]
                if spec.name == "deny":
                    table = target.protected.rule_table
                    raise Refusal(f"column {table}.{col} is not available to masked roles")
                # at any depth: in `RETURNING (SELECT name)` the name is the target's; where
                # it is really an inner table's, masking it changes a result, never leaks
                return self.masked_target_expr(col, target)
            return node
        if isinstance(node, ast.Node):
            if id(node) in self.generated:
                return node  # pgveil's own masking subquery: its names are its table's
            for attr in node:
                value = getattr(node, attr)
                d = depth + 1 if isinstance(node, ast.SelectStmt) else depth
                if isinstance(value, ast.Node):
                    setattr(node, attr, self.mask_target_refs(value, target, d))
                elif isinstance(value, tuple):
                    setattr(node, attr, tuple(self.mask_target_refs(v, target, d) for v in value))
        return node

    def masked_target_expr(self, col: str, target: _Target) -> Any:
        c = target.protected.relation.column(col)
        assert c is not None
        spec = target.protected.masks[col]
        ref = f"{quote_ident(target.alias)}.{quote_ident(col)}"
        self.masked_columns.add(f"{target.protected.rule_table}.{col}")
        self.uses_hash = self.uses_hash or spec.name == "hash"
        self.changes += 1
        return _stmt(f"SELECT {sql_expr(spec, ref, c.type, self.an.policy.keys)}").targetList[0].val

    def returning(self, items: Any, target: _Target | None) -> Any:
        if target is None:
            self.walk(items)
            return items
        out = []
        for rt in items:
            val = rt.val
            if isinstance(val, ast.ColumnRef) and isinstance(val.fields[-1], ast.A_Star):
                for c in target.protected.relation.columns:
                    expr: Any = ast.ColumnRef(
                        fields=(ast.String(sval=target.alias), ast.String(sval=c.name))
                    )
                    if c.name in target.protected.masks:
                        expr = self.masked_target_expr(c.name, target)
                    out.append(ast.ResTarget(name=c.name, val=expr))
                self.changes += 1
                continue
            name = rt.name
            if (
                name is None
                and isinstance(val, ast.ColumnRef)
                and isinstance(val.fields[-1], ast.String)
            ):
                name = _name(val.fields[-1])
            self.visit(val)
            new_val = self.mask_target_refs(val, target)
            out.append(ast.ResTarget(name=name, val=new_val))
        return tuple(out)


_SYSTEM_COLUMNS = frozenset({"ctid", "xmin", "xmax", "cmin", "cmax", "tableoid"})


def _defined_names(stmts: Any) -> frozenset[str]:
    """Names the statement itself gives to columns: target aliases, column alias lists,
    CTE column names, column definitions (of temp tables or function results)."""
    names: set[str] = set()
    for n in _descendants(stmts):
        if isinstance(n, ast.ResTarget) and n.name:
            names.add(n.name)
        elif isinstance(n, ast.Alias):
            names.update(_name(c) for c in n.colnames or ())
        elif isinstance(n, ast.CommonTableExpr):
            names.update(_name(c) for c in n.aliascolnames or ())
        elif isinstance(n, ast.ColumnDef) and n.colname:
            names.add(n.colname)
    return frozenset(names)


def _references(
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
    for n in _descendants(stmts):
        if isinstance(n, ast.A_Star):
            return None, frozenset()
        if isinstance(n, ast.JoinExpr):
            if n.isNatural or n.alias is not None:
                # a join alias names the row of the whole join: `j`, `j.f` may read all
                return None, frozenset()
            for u in n.usingClause or ():
                names.add(_name(u))
        elif isinstance(n, ast.ColumnRef):
            fields = n.fields
            names.update(_name(f) for f in (fields[1:] if len(fields) > 1 else fields))
            if len(fields) == 2:
                qualified.add((_name(fields[0]), _name(fields[1])))
        elif isinstance(n, ast.CopyStmt) and n.relation is not None:
            return None, frozenset()  # COPY t TO: every column
    return frozenset(names), frozenset(qualified)


def _is_excluded(value: Any) -> bool:
    return (
        isinstance(value, ast.ColumnRef)
        and len(value.fields) == 2
        and _name(value.fields[0]).lower() == "excluded"
    )


def _children(node: Any) -> Iterator[Any]:
    if node is None:
        return
    if isinstance(node, tuple | list):
        for item in node:
            if isinstance(item, ast.Node):
                yield item
            elif isinstance(item, tuple | list):
                yield from _children(item)
        return
    if isinstance(node, ast.Node):
        for attr in node:
            value = getattr(node, attr)
            if isinstance(value, ast.Node):
                yield value
            elif isinstance(value, tuple | list):
                yield from _children(value)


def _descendants(node: Any, skip_selects: bool = False) -> Iterator[Any]:
    stack = list(_children(node)) if not isinstance(node, ast.Node) else [node]
    while stack:
        n = stack.pop()
        yield n
        if skip_selects and isinstance(n, ast.SelectStmt):
            continue
        stack.extend(_children(n))
