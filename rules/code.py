"""Whether code the server runs out of pgveil's sight may move names: a function or procedure
body, a DO block, code attached to relations (triggers, defaults, policies, rules, a view's
definition). Such code "may move names" (make names denote other relations than the catalog
read says, see rules.effects.moves_names) when it may run DDL: it is written in a language
other than SQL or PL/pgSQL (PL/Python, PL/Perl...: unknown; C code, the server's or an
extension's, is trusted as pg_catalog's built-ins are: `routine_facts`), runs SQL text
(PL/pgSQL's EXECUTE in any form, dblink, pg_background; a built-in that runs a query given
as text may call any function, so it is "may" when any code is), runs any statement but SELECT,
INSERT, UPDATE, DELETE and MERGE (a utility statement; `SELECT ... INTO` creates a table),
or calls code that may (a fixpoint over the calls). Allow-list by construction: a PL/pgSQL
statement kind, a PL/pgSQL parse node or a parse-tree node this module does not know, a body
that does not parse and a call it cannot resolve all make the code "may".

`body_facts` and `do_facts` read one body (pglast's SQL and PL/pgSQL parsers); `moving_code`
classifies the database's code once per catalog read (rules.catalog_read);
`statement_moves` says whether a statement runs such code, for the analyser.

Pure: no I/O, no logging (a bounded memo of the bodies read). A body's text never leaves
this module.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import pglast
import pglast.ast
from pglast import parse_sql
from pglast.parser import ParseError, scan

from rules.grammar import ALLOWED
from rules.nodes import descendants

ast: Any = pglast.ast

# Built-ins that run a query given as text (read-only: it may call any function, so they
# may move names when any code of the database may), and functions that run SQL in another
# session of the same database (dblink_exec may run DDL there: always "may")
SQL_TEXT_FUNCTIONS = frozenset(
    {
        "query_to_xml", "query_to_xml_and_xmlschema", "query_to_xmlschema", "ts_rewrite",
        "ts_stat",
    }
)  # fmt: skip
OTHER_SESSION_PREFIXES = ("dblink", "pg_background")

# The statements code may run without moving names (the rest are utility statements)
_DML = (ast.SelectStmt, ast.InsertStmt, ast.UpdateStmt, ast.DeleteStmt, ast.MergeStmt)
_WRITES = (ast.InsertStmt, ast.UpdateStmt, ast.DeleteStmt, ast.MergeStmt)
# parse-tree nodes that may occur inside those statements: those the analyser's grammar
# table allows (rules.grammar: every expression and clause of a read or write) and MERGE's
# own; any other node makes the code "may"
_KNOWN_NODES = frozenset(ALLOWED) | {"MergeStmt", "MergeWhenClause", "ReturnStmt"}

# PL/pgSQL statements that run no SQL of their own beyond their expressions (walked, every
# one of them), and those that run a statement of their own (checked as SQL: `sqlstmt`,
# `expr` of CALL). Dynamic SQL (`dynexecute`, `dynfors`, and a `dynquery` in OPEN ... FOR
# EXECUTE and RETURN QUERY EXECUTE) is "may" wherever it is.
PLPGSQL_STATEMENTS = frozenset(
    {
        "PLpgSQL_stmt_block", "PLpgSQL_stmt_assign", "PLpgSQL_stmt_if", "PLpgSQL_stmt_case",
        "PLpgSQL_stmt_loop", "PLpgSQL_stmt_while", "PLpgSQL_stmt_fori", "PLpgSQL_stmt_fors",
        "PLpgSQL_stmt_forc", "PLpgSQL_stmt_foreach_a", "PLpgSQL_stmt_exit",
        "PLpgSQL_stmt_return", "PLpgSQL_stmt_return_next", "PLpgSQL_stmt_return_query",
        "PLpgSQL_stmt_raise", "PLpgSQL_stmt_assert", "PLpgSQL_stmt_execsql",
        "PLpgSQL_stmt_getdiag", "PLpgSQL_stmt_open", "PLpgSQL_stmt_fetch",
        "PLpgSQL_stmt_close", "PLpgSQL_stmt_perform", "PLpgSQL_stmt_call",
        "PLpgSQL_stmt_commit", "PLpgSQL_stmt_rollback",
    }
)  # fmt: skip
PLPGSQL_DYNAMIC = frozenset({"PLpgSQL_stmt_dynexecute", "PLpgSQL_stmt_dynfors"})
# the other nodes of PL/pgSQL's parse output: the function, its variables, conditions and
# exception handlers, branches (each walked for the expressions and statements it holds)
PLPGSQL_NODES = frozenset(
    {
        "PLpgSQL_function", "PLpgSQL_var", "PLpgSQL_rec", "PLpgSQL_row", "PLpgSQL_recfield",
        "PLpgSQL_type", "PLpgSQL_expr", "PLpgSQL_condition", "PLpgSQL_exception",
        "PLpgSQL_exception_block", "PLpgSQL_if_elsif", "PLpgSQL_case_when",
        "PLpgSQL_raise_option", "PLpgSQL_diag_item",
    }
)  # fmt: skip
# how PL/pgSQL asks the SQL parser to read an expression (parser.h RawParseMode)
_DEFAULT, _TYPE_NAME, _EXPR = 0, 1, 2
_ASSIGN = frozenset({3, 4, 5})

Name = tuple[str | None, str]  # (schema, name) as written: schema None when unqualified


@dataclass(frozen=True)
class Facts:
    """What one body does that decides whether it may move names: `may` when it does so
    itself (see the module docstring); the functions it calls and the operators it uses,
    by name as written; the relations it names, each with whether it writes them (their
    triggers run)."""

    may: bool
    functions: frozenset[Name] = frozenset()
    operators: frozenset[str] = frozenset()
    reads: frozenset[Name] = frozenset()
    writes: frozenset[Name] = frozenset()


MAY = Facts(True)
NOTHING = Facts(False)


class _Found:
    def __init__(self) -> None:
        self.may = False
        self.functions: set[Name] = set()
        self.operators: set[str] = set()
        self.reads: set[Name] = set()
        self.writes: set[Name] = set()

    def facts(self) -> Facts:
        if self.may:
            return MAY
        return Facts(
            False,
            frozenset(self.functions),
            frozenset(self.operators),
            frozenset(self.reads),
            frozenset(self.writes),
        )


def _qualified(parts: Iterable[Any]) -> Name | None:
    names = [p.sval for p in parts if isinstance(p, ast.String)]
    if not names:
        return None
    return (names[-2] if len(names) >= 2 else None), names[-1]


def _temp_schema(schema: str) -> bool:
    """Whether `schema` is a session's temporary schema (pg_temp_N), which a statement
    names `pg_temp`."""
    return schema.startswith("pg_temp_") and schema[8:].isdigit()


def _with_pg_temp(names: Iterable[tuple[str, str]]) -> frozenset[tuple[str, str]]:
    """`names`, with those in a temporary schema also under `pg_temp` (any session's: pgveil
    cannot tell which is the session's own)."""
    out = set(names)
    out.update(("pg_temp", n) for s, n in list(out) if _temp_schema(s))
    return frozenset(out)


def _other_session(function: str) -> bool:
    return function.startswith(OTHER_SESSION_PREFIXES)


def _relation(rv: Any) -> Name:
    return (rv.schemaname, rv.relname)


def _sql(stmts: Iterable[Any], found: _Found) -> None:
    """The facts of SQL statements that code runs (RawStmt or statement nodes)."""
    for raw in stmts:
        node = raw.stmt if isinstance(raw, ast.RawStmt) else raw
        if isinstance(node, ast.ReturnStmt):
            pass  # a SQL function's RETURN expression: walked below
        elif isinstance(node, ast.CallStmt):
            pass  # its call is a FuncCall, walked below
        elif not isinstance(node, _DML) or (
            isinstance(node, ast.SelectStmt) and node.intoClause is not None
        ):
            found.may = True  # a utility statement, or SELECT INTO a new table
            return
        for n in descendants(node):
            cls = type(n).__name__
            if cls not in _KNOWN_NODES:
                found.may = True
                return
            if isinstance(n, ast.IntoClause):
                found.may = True
                return
            if isinstance(n, ast.FuncCall):
                name = _qualified(n.funcname)
                if name is None or _other_session(name[1]):
                    found.may = True
                    return
                found.functions.add(name)
            elif isinstance(n, ast.A_Expr):
                for op in n.name or ():
                    if isinstance(op, ast.String):
                        found.operators.add(op.sval)
            elif isinstance(n, ast.RangeVar):
                found.reads.add(_relation(n))
            if isinstance(n, _WRITES) and n.relation is not None:
                found.writes.add(_relation(n.relation))


def sql_facts(stmts: Iterable[Any]) -> Facts:
    """The facts of parsed SQL statements as code runs them."""
    found = _Found()
    _sql(stmts, found)
    return found.facts()


def _expression(text: str, mode: int, found: _Found) -> None:
    """One PL/pgSQL expression or statement, read as PL/pgSQL asks the SQL parser to."""
    if mode == _TYPE_NAME:
        return
    if mode in _ASSIGN:
        # `target := expr` (or `target = expr`): the expression after the first one, and
        # the target read as an expression: the server evaluates its subscripts too
        # (`a[f()] := 1` calls f)
        for token in scan(text):
            if token.name in ("COLON_EQUALS", "ASCII_61"):
                target, text = text[: token.start], text[token.end + 1 :]
                break
        else:
            found.may = True
            return
        _sql(parse_sql(f"SELECT {target}"), found)
        mode = _EXPR
    sql = f"SELECT {text}" if mode == _EXPR else text
    _sql(parse_sql(sql), found)


def _plpgsql(node: Any, found: _Found) -> None:
    """Walk PL/pgSQL's parse output (JSON made of dicts and lists): every statement kind
    and node must be known, every expression is read as SQL."""
    stack = [node]
    while stack and not found.may:
        n = stack.pop()
        if isinstance(n, list):
            stack.extend(n)
            continue
        if not isinstance(n, dict):
            continue
        for key, value in n.items():
            if key == "dynquery" or key in PLPGSQL_DYNAMIC:
                found.may = True  # SQL text built at run time
                return
            if key.startswith("PLpgSQL_"):
                if key not in PLPGSQL_STATEMENTS and key not in PLPGSQL_NODES:
                    found.may = True  # a kind nobody looked at
                    return
                if key == "PLpgSQL_expr" and isinstance(value, dict):
                    query = value.get("query")
                    if not isinstance(query, str):
                        found.may = True
                        return
                    mode = value.get("parseMode", _DEFAULT)
                    _expression(query, mode if isinstance(mode, int) else -1, found)
                    continue
            if isinstance(value, dict | list):
                stack.append(value)


def plpgsql_facts(definition: str) -> Facts:
    """The facts of a PL/pgSQL function or procedure, from its whole CREATE statement
    (pg_get_functiondef's text): "may" when it does not parse."""
    found = _Found()
    try:
        _plpgsql(pglast.parse_plpgsql(definition), found)
    except (ParseError, RecursionError, ValueError):
        return MAY
    return found.facts()


def _sql_body(definition: str) -> Facts:
    """The facts of a function in SQL from its whole CREATE statement: its body written
    as a string (parsed as the server parses it when it runs) or in SQL (BEGIN ATOMIC,
    RETURN)."""
    try:
        (raw,) = parse_sql(definition)
        node = raw.stmt
        if not isinstance(node, ast.CreateFunctionStmt):
            return MAY
        if node.sql_body is not None:
            body = node.sql_body
            stmts = list(_flat(body)) if isinstance(body, tuple | list) else [body]
            return sql_facts(stmts)
        for option in node.options or ():
            if option.defname == "as":
                texts = [s.sval for s in option.arg if isinstance(s, ast.String)]
                if len(texts) != 1:
                    return MAY
                return sql_facts(parse_sql(texts[0]))
        return MAY
    except (ParseError, RecursionError, ValueError):
        return MAY


def _flat(items: Any) -> Iterator[Any]:
    for item in items:
        if isinstance(item, tuple | list):
            yield from _flat(item)
        elif item is not None:
            yield item


# the facts of the bodies read so far, by (language, definition): a catalog read every
# `catalog_refresh` seconds finds the same bodies again (parsing them all each time would
# hold the proxy's event loop for a while on a database with many functions); bounded
_KNOWN_BODIES: dict[tuple[str, str], Facts] = {}
_KNOWN_BODIES_MAX = 50_000


def body_facts(language: str, definition: str | None) -> Facts:
    """The facts of a function or procedure in `language` from its whole CREATE statement
    (None when the server does not show one: an aggregate's is read from its support
    functions instead)."""
    if definition is None or language not in ("plpgsql", "sql"):
        return MAY  # C, internal, PL/Python...: pgveil cannot tell what it runs
    key = (language, definition)
    facts = _KNOWN_BODIES.get(key)
    if facts is None:
        facts = plpgsql_facts(definition) if language == "plpgsql" else _sql_body(definition)
        if len(_KNOWN_BODIES) >= _KNOWN_BODIES_MAX:
            _KNOWN_BODIES.clear()
        _KNOWN_BODIES[key] = facts
    return facts


def routine_facts(language: str, definition: str | None, name: str, runs_sql_text: bool) -> Facts:
    """The facts of a function of the catalog. C code is the server's or an extension's,
    installed by a superuser, and pgveil treats it as it treats pg_catalog's built-ins: it
    runs no DDL, but for the functions that run SQL in another session (dblink,
    pg_background). An `internal` function is a built-in under another name (its symbol):
    "may" when that built-in runs a query given as text (`runs_sql_text`, from the catalog
    read). Otherwise: `body_facts`. (Without this, every call of pgcrypto's or uuid-ossp's
    functions would make every session uncertain and ask for a catalog read.)"""
    if language in ("c", "internal"):
        return MAY if runs_sql_text or _other_session(name) else NOTHING
    return body_facts(language, definition)


def do_facts(node: Any) -> Facts:
    """The facts of a DO statement's block: in PL/pgSQL (its default), read as the body
    of a function; in another language, "may"."""
    body: str | None = None
    language = "plpgsql"
    for arg in node.args or ():
        if arg.defname == "as" and isinstance(arg.arg, ast.String):
            body = arg.arg.sval
        elif arg.defname == "language" and isinstance(arg.arg, ast.String):
            language = arg.arg.sval
    if body is None or language != "plpgsql":
        return MAY
    tag = "$pgveil$"
    n = 0
    while tag in body:
        n += 1
        tag = f"$pgveil{n}$"
    return plpgsql_facts(
        f"CREATE FUNCTION pg_temp.pgveil_do() RETURNS void LANGUAGE plpgsql AS {tag}{body}{tag}"
    )


@dataclass(frozen=True)
class Routine:
    """A function of the catalog: its OID, where it is, and what its body does (for an
    aggregate: nothing of its own, and its support functions in `calls`)."""

    oid: int
    schema: str
    name: str
    facts: Facts
    calls: tuple[int, ...] = ()


@dataclass(frozen=True)
class Moving:
    """What of the catalog may move names when it runs: functions by (schema, name) (any
    overload may), user operators by name, relations whose reads or writes run such code
    (a temporary schema's also under `pg_temp`), and whether event triggers may."""

    functions: frozenset[tuple[str, str]] = frozenset()
    operators: frozenset[str] = frozenset()
    reads: frozenset[tuple[str, str]] = frozenset()
    writes: frozenset[tuple[str, str]] = frozenset()
    # an event trigger's function may: any DDL statement may then move names
    ddl: bool = False


Relname = tuple[str, str]


def moving_code(
    routines: Iterable[Routine],
    builtin_functions: frozenset[str],
    operators: Iterable[tuple[str, int]],
    attached: Iterable[tuple[str, str, int, bool]],
    view_sources: Mapping[tuple[str, str], tuple[tuple[str, str], ...]],
    writes_reach: Iterable[tuple[Relname, Relname]] = (),
    event_functions: Iterable[int] = (),
) -> Moving:
    """Classify the database's code: `routines` (functions outside pg_catalog and
    information_schema), `operators` (user operator name, its function's OID),
    `attached` ((schema, relation, function OID, whether it runs on reads): triggers,
    defaults, constraints, rules, policies and index expressions; a view's definition),
    `view_sources` (each view's relations, transitively), `writes_reach` ((relation,
    another relation a write to it may write: a rule's action, a foreign key's cascade, a
    partition or child table)), `event_functions` (the functions of enabled event
    triggers: one that is not among `routines`, in pg_catalog, is "may"). A call to a
    name no routine and no built-in has counts as "may"; a built-in that runs a query
    given as text calls every routine."""
    written: dict[Relname, set[Relname]] = {}
    for source, reached in writes_reach:
        written.setdefault(source, set()).add(reached)
    by_oid = {r.oid: r for r in routines}
    by_name: dict[str, list[Routine]] = {}
    for r in by_oid.values():
        by_name.setdefault(r.name, []).append(r)
    op_functions: dict[str, set[int]] = {}
    for name, oid in operators:
        op_functions.setdefault(name, set()).add(oid)
    on_read: dict[tuple[str, str], set[int]] = {}
    on_write: dict[tuple[str, str], set[int]] = {}
    for schema, rel, oid, on_reads in attached:
        on_write.setdefault((schema, rel), set()).add(oid)
        if on_reads:
            on_read.setdefault((schema, rel), set()).add(oid)
    may: set[int] = {r.oid for r in by_oid.values() if r.facts.may}

    def callees(name: Name) -> tuple[bool, list[int]]:
        """(whether the call is "may" by itself: no routine or built-in has the name; the
        routines it may call: any, for a built-in that runs a query given as text)"""
        schema, fn = name
        found = [
            r.oid
            for r in by_name.get(fn, ())
            if schema is None
            or r.schema == schema
            or (schema == "pg_temp" and _temp_schema(r.schema))
        ]
        if not found and fn not in builtin_functions:
            return True, []
        if fn in SQL_TEXT_FUNCTIONS and schema in (None, "pg_catalog"):
            found.extend(by_oid)
        return False, found

    def moving_relations(
        target: dict[tuple[str, str], set[int]], reached: Mapping[Relname, Iterable[Relname]]
    ) -> set[tuple[str, str]]:
        out = {key for key, oids in target.items() if oids & may}
        changed = True
        while changed:  # (views over them; relations whose writes write them)
            changed = False
            for view, sources in view_sources.items():
                if view not in out and any(s in out for s in sources):
                    out.add(view)
                    changed = True
            for rel, others in reached.items():
                if rel not in out and any(o in out for o in others):
                    out.add(rel)
                    changed = True
        return out

    def named(names: frozenset[Name], rels: frozenset[tuple[str, str]]) -> bool:
        return any(_named(name, rels) for name in names)

    changed = True
    while changed:
        changed = False
        # (with their pg_temp names, once per round, not once per routine and name)
        reads = _with_pg_temp(moving_relations(on_read, {}))
        writes = _with_pg_temp(moving_relations(on_write, written)) | reads
        for r in by_oid.values():
            if r.oid in may:
                continue
            f = r.facts
            hit = any(c in may for c in r.calls)
            for call in f.functions:
                if hit:
                    break
                unknown, oids = callees(call)
                hit = unknown or any(o in may for o in oids)
            hit = hit or any(op_functions.get(op, set()) & may for op in f.operators)
            hit = hit or named(f.reads, reads) or named(f.writes, writes)
            if hit:
                may.add(r.oid)
                changed = True
    # (`reads` and `writes` are those of the last round, in which `may` did not grow)
    return Moving(
        functions=_with_pg_temp((by_oid[o].schema, by_oid[o].name) for o in may),
        operators=frozenset(name for name, oids in op_functions.items() if oids & may),
        reads=reads,
        writes=writes,
        ddl=any(oid in may or oid not in by_oid for oid in event_functions),
    )


def hidden_moving(
    hidden: Iterable[tuple[str, str, str]], functions: frozenset[tuple[str, str]]
) -> bool:
    """Whether code the server runs without a statement naming it may move names: a cast's
    or a type's function, a domain's CHECK, an operator's (BETWEEN, IN (subquery), a simple
    CASE, JOIN USING, ORDER BY use one that no node names), an operator class's support
    function (`hidden`: Catalog.hidden_code; `functions`: Moving.functions). An event
    trigger's is not counted: it runs on DDL only (Moving.ddl)."""
    return any(
        (schema, fn) in functions
        for what, schema, fn in hidden
        if not what.startswith("event trigger ")
    )


# statements that evaluate no expression, so run none of the hidden code above
_NO_EXPRESSIONS = (
    ast.TransactionStmt, ast.VariableSetStmt, ast.VariableShowStmt, ast.DeallocateStmt,
    ast.ClosePortalStmt, ast.ListenStmt, ast.UnlistenStmt, ast.DiscardStmt,
    ast.CheckPointStmt, ast.LockStmt,
)  # fmt: skip


def statement_moves(stmts: Any, catalog: Any) -> bool:
    """Whether a statement runs code that may move names: a DO block that may, a call of a
    function that may (CALL or anywhere in an expression, by any overload or, unqualified,
    any schema's; dblink; a built-in that runs a query given as text while any function
    may), a user operator whose function may, a relation whose reads run such code (a
    view, a policy), or a write to one whose writes do (a trigger, a default)."""
    functions = catalog.moving_functions
    operators = catalog.moving_operators
    reads = catalog.moving_reads
    writes = catalog.moving_writes
    if catalog.moving_ddl and any(_fires_event_triggers(raw.stmt) for raw in stmts):
        return True
    if catalog.moving_hidden and any(not isinstance(raw.stmt, _NO_EXPRESSIONS) for raw in stmts):
        # which statement runs a cast, a domain's CHECK or an operator no node names cannot
        # be told from its text (implicit casts and coercions to a domain, BETWEEN's
        # operators): any that evaluates an expression may
        return True
    for n in descendants(stmts):
        if isinstance(n, ast.CreateTrigStmt):
            # a trigger attached to a relation the catalog does not have yet (a temporary
            # or new table) runs before any catalog read could see it
            name = _qualified(n.funcname or ())
            if name is None or _call_may(name, catalog):
                return True
        elif isinstance(n, ast.DoStmt):
            facts = do_facts(n)
            if facts.may or _calls_moving(facts, catalog):
                return True
        elif isinstance(n, ast.FuncCall):
            name = _qualified(n.funcname)
            if name is None:
                continue
            if _other_session(name[1]) or (functions and name[1] in SQL_TEXT_FUNCTIONS):
                return True
            if functions and _named(name, functions):
                return True
        elif isinstance(n, ast.A_Expr) and operators:
            if any(isinstance(op, ast.String) and op.sval in operators for op in n.name or ()):
                return True
        elif (isinstance(n, ast.RangeVar) and reads and _named(_relation(n), reads)) or (
            writes and any(_named(_relation(rv), writes) for rv in _written(n))
        ):
            return True
    return False


# every relation (ANALYZE, VACUUM FULL, CLUSTER, REINDEX with no table named)
_EVERY = ast.RangeVar(schemaname=None, relname="", relpersistence="p")


def _written(n: Any) -> tuple[Any, ...]:
    """The relations a statement node writes (their triggers, defaults and rules run), or
    whose index expressions it evaluates (ANALYZE, VACUUM, CLUSTER, REINDEX, REFRESH);
    `_EVERY` for all of them."""
    if isinstance(n, _WRITES):
        return (n.relation,) if n.relation is not None else ()
    if isinstance(n, ast.CopyStmt):
        return (n.relation,) if n.is_from and n.relation is not None else ()
    if isinstance(n, ast.TruncateStmt):
        return tuple(n.relations or ())
    if isinstance(n, ast.VacuumStmt):
        rels = tuple(r.relation for r in n.rels or () if r.relation is not None)
        return rels or (_EVERY,)
    if isinstance(n, ast.ReindexStmt) and getattr(n.kind, "name", "") != "REINDEX_OBJECT_TABLE":
        return (_EVERY,)  # (an index, a schema, the database: any table's)
    if isinstance(n, ast.ClusterStmt | ast.ReindexStmt | ast.RefreshMatViewStmt):
        return (n.relation,) if n.relation is not None else (_EVERY,)
    return ()


def _named(name: Name, known: frozenset[tuple[str, str]]) -> bool:
    """Whether a name as written may denote one of `known` (unqualified: any schema's)."""
    schema, rel = name
    if rel == "" and schema is None:
        return bool(known)  # (_EVERY)
    if schema is not None:
        return (schema, rel) in known
    return any(n == rel for _s, n in known)


# statements that fire no event trigger (the server fires them for DDL only: utility
# statements but these)
_NO_EVENT_TRIGGERS = (
    *_DML, ast.TransactionStmt, ast.VariableSetStmt, ast.VariableShowStmt, ast.ExplainStmt,
    ast.PrepareStmt, ast.ExecuteStmt, ast.DeallocateStmt, ast.DeclareCursorStmt,
    ast.FetchStmt, ast.ClosePortalStmt, ast.ListenStmt, ast.UnlistenStmt, ast.NotifyStmt,
    ast.DiscardStmt, ast.LockStmt, ast.CopyStmt, ast.CallStmt, ast.DoStmt,
    ast.CheckPointStmt, ast.VacuumStmt, ast.ConstraintsSetStmt,
)  # fmt: skip


def _fires_event_triggers(node: Any) -> bool:
    return not isinstance(node, _NO_EVENT_TRIGGERS)


def _call_may(name: Name, catalog: Any) -> bool:
    """Whether a call of `name` may run code that may move names, as the catalog's
    classification says (a function the catalog does not have: "may")."""
    schema, fn = name
    if fn in SQL_TEXT_FUNCTIONS and catalog.moving_functions:
        return True
    if _named(name, catalog.moving_functions):
        return True
    user = any(
        n == fn and (schema is None or s == schema or (schema == "pg_temp" and _temp_schema(s)))
        for s, n in catalog.user_functions
    )
    return not user and fn not in catalog.builtin_functions


def _calls_moving(facts: Facts, catalog: Any) -> bool:
    """Whether a DO block that runs no DDL itself calls code that may, as the catalog's
    classification says (a call of a function the catalog does not have: "may")."""
    if any(_call_may(name, catalog) for name in facts.functions):
        return True
    if any(op in catalog.moving_operators for op in facts.operators):
        return True
    if any(_named(r, catalog.moving_reads) for r in facts.reads):
        return True
    return any(_named(r, catalog.moving_writes) for r in facts.writes)
