"""What a statement does besides reading and writing rows: to the session's names and
transaction (its effects, for the statement log: proxy/session/statements.py), which names
EXECUTE, FETCH and MOVE use, and whether it may make names denote other relations or
functions than the catalog read says (`moves_names`: the audit then asks for a new read).

Pure: no I/O, no logging. It decides nothing about masking: the analyser puts what it finds
into the decision (rules.decision).
"""

from __future__ import annotations

from typing import Any

from rules.code import statement_moves
from rules.reads import ast, name_of
from rules.settings import TX_KINDS

# An effect on the session's names or transaction: (kind, name), name "" when it has none.
# kinds: begin, commit, commit_chain, rollback, rollback_chain, prepare_transaction,
# savepoint, release, rollback_to (a savepoint name); declare, declare_hold, close, fetch,
# move (a cursor: the protocol's portals); close_all; prepare, deallocate, execute (a prepared
# statement); deallocate_all, discard_all; copy_in (COPY ... FROM STDIN: the server reads
# the client's messages as copy data); unknown_tx (CALL, DO: code that may end the
# transaction it runs in)
Effect = tuple[str, str]
Effects = tuple[tuple[Effect, ...], ...]


# what names a relation (or holds relations) among the objects DDL statements name
_RELATION_OBJECTS = frozenset(
    ("OBJECT_TABLE", "OBJECT_VIEW", "OBJECT_MATVIEW", "OBJECT_FOREIGN_TABLE", "OBJECT_COLUMN")
)
# functions (a new one may be called by a name the catalog gives a built-in)
_FUNCTION_OBJECTS = frozenset(("OBJECT_FUNCTION", "OBJECT_PROCEDURE", "OBJECT_ROUTINE"))
# code the server runs without a statement naming it, attached to a relation (runs on its
# reads or writes) or to a type, cast or operator (anywhere): the catalog read says no
# statement's subjects are proved while such code is there (rules.subjects), so a new one
# must be read at once (an existing function needs no CREATE FUNCTION to be attached)
_RELATION_CODE = (ast.CreateTrigStmt, ast.CreatePolicyStmt, ast.AlterPolicyStmt, ast.IndexStmt)
_HIDDEN_CODE = (
    ast.CreateCastStmt, ast.DefineStmt, ast.CreateDomainStmt, ast.AlterDomainStmt,
    ast.CreateConversionStmt, ast.CreateTransformStmt, ast.CreateEventTrigStmt,
    ast.CreateOpClassStmt, ast.AlterOperatorStmt, ast.CreateRangeStmt,
)  # fmt: skip


def moves_names(stmts: Any, catalog: Any) -> bool:
    """Whether a statement may make names denote other relations than `catalog` says (see
    Decision.moves_names): DDL that does, or code pgveil does not see into that may run
    DDL (rules.code.statement_moves). A temporary relation, or one the catalog does not
    have, moves nothing the catalog says (a name it does not have is uncertain in any
    case)."""

    def known(rv: Any) -> bool:
        if rv is None:
            return True
        if rv.schemaname is not None:
            return (rv.schemaname, rv.relname) in catalog.relations
        return rv.relpersistence != "t" and any(n == rv.relname for _s, n in catalog.relations)

    for raw in stmts:
        node = raw.stmt
        if isinstance(node, ast.ViewStmt):
            rv = node.view
            if rv.relpersistence != "t" and rv.schemaname != "pg_temp":
                return True
        elif isinstance(node, (ast.CreateFunctionStmt, *_HIDDEN_CODE)):
            return True
        elif isinstance(node, _RELATION_CODE):
            policy = isinstance(node, ast.CreatePolicyStmt | ast.AlterPolicyStmt)
            rv = node.table if policy else node.relation
            if known(rv):
                return True
        elif isinstance(node, ast.DropStmt):
            kind = node.removeType.name
            if kind == "OBJECT_SCHEMA":
                return True
            if kind in _RELATION_OBJECTS:
                for obj in node.objects or ():
                    names = [name_of(n) for n in (obj if isinstance(obj, tuple) else (obj,))]
                    schema = names[-2] if len(names) >= 2 else None
                    rel = ast.RangeVar(schemaname=schema, relname=names[-1], relpersistence="p")
                    if known(rel):
                        return True
        elif isinstance(node, ast.RenameStmt):
            kind = node.renameType.name
            if kind == "OBJECT_SCHEMA" or kind in _FUNCTION_OBJECTS:
                return True
            if kind in _RELATION_OBJECTS and known(node.relation):
                return True
        elif isinstance(node, ast.AlterObjectSchemaStmt):
            kind = node.objectType.name
            if kind in _FUNCTION_OBJECTS:
                return True
            if kind in _RELATION_OBJECTS and known(node.relation):
                return True
        elif isinstance(node, ast.RuleStmt | ast.AlterTableStmt) and known(node.relation):
            return True
    return statement_moves(stmts, catalog)


_CURSOR_OPT_HOLD = 0x0020  # parsenodes.h


def effects_of(stmts: Any) -> Effects:
    """What each statement does to the session's names (prepared statements and cursors,
    which are the protocol's statements and portals) and to its transaction; () when none
    does anything (the common case)."""
    found: list[tuple[Effect, ...]] = [_statement_effects(raw.stmt) for raw in stmts]
    return tuple(found) if any(found) else ()


def _statement_effects(node: Any) -> tuple[Effect, ...]:
    # EXPLAIN EXECUTE p, CREATE TABLE t AS EXECUTE p, EXPLAIN ANALYZE CREATE TABLE t AS
    # EXECUTE p: each runs p
    inner = getattr(node, "query", None)
    while isinstance(node, ast.CreateTableAsStmt | ast.ExplainStmt) and isinstance(
        inner, ast.CreateTableAsStmt | ast.ExplainStmt | ast.ExecuteStmt
    ):
        node = inner
        inner = getattr(node, "query", None)
    if isinstance(node, ast.TransactionStmt):
        kind = TX_KINDS.get(node.kind.name)
        if kind is None:
            return ()  # COMMIT PREPARED, ROLLBACK PREPARED: another session's transaction
        if kind in ("commit", "rollback") and node.chain:
            kind += "_chain"
        return ((kind, node.savepoint_name or ""),)
    if isinstance(node, ast.DeclareCursorStmt):
        hold = (node.options or 0) & _CURSOR_OPT_HOLD
        return (("declare_hold" if hold else "declare", node.portalname),)
    if isinstance(node, ast.ClosePortalStmt):
        return (("close", node.portalname),) if node.portalname else (("close_all", ""),)
    if isinstance(node, ast.PrepareStmt):
        return (("prepare", node.name),)
    if isinstance(node, ast.DeallocateStmt):
        if getattr(node, "isall", False) or not node.name:
            return (("deallocate_all", ""),)
        return (("deallocate", node.name),)
    if isinstance(node, ast.DiscardStmt):
        return (("discard_all", ""),) if node.target.name == "DISCARD_ALL" else ()
    if isinstance(node, ast.ExecuteStmt):
        return (("execute", node.name),)
    if isinstance(node, ast.FetchStmt):
        return ((("move" if node.ismove else "fetch"), node.portalname),)
    if isinstance(node, ast.CopyStmt):
        reads_client = node.is_from and node.filename is None and not node.is_program
        return (("copy_in", ""),) if reads_client else ()
    if isinstance(node, ast.CallStmt | ast.DoStmt):
        return (("unknown_tx", ""),)
    return ()


def uses_of(effects: Effects) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """The names EXECUTE and FETCH use, and the cursors MOVE positions, as
    "statement:NAME" / "portal:NAME"."""
    uses: list[str] = []
    moves: list[str] = []
    for statement in effects:
        for kind, name in statement:
            if kind == "execute":
                uses.append(f"statement:{name}")
            elif kind == "fetch":
                uses.append(f"portal:{name}")
            elif kind == "move":
                moves.append(f"portal:{name}")
    return tuple(uses), tuple(moves)
