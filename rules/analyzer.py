"""The statement analyser of masked (and audited) sessions: parse, rewrite, or refuse.

`Analyzer.analyze` turns one client statement text into a `Decision`: pass it as it is,
send a rewritten text, or refuse it with a reason. The walk and the read rewrite are in
`rules.reads` (closed by construction: every field of every node, by the grammar table in
`rules.grammar`), the write rewrite in `rules.writes`, the data subjects a statement names in
`rules.subjects`, what is never allowed in `rules.denied` (DESIGN.md section 2).

Pure: no I/O, no logging. Reasons never quote literals from the statement.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pglast import parse_sql
from pglast.parser import ParseError, scan
from pglast.stream import RawStream

from rules.catalog import ProtectionMap
from rules.denied import Refusal
from rules.fields import field_columns
from rules.grammar import misread_words
from rules.reads import ast, descendants, name_of, row_uses
from rules.settings import TX_KINDS, SettingOp, settings_of
from rules.subjects import SubjectKeys, statement_subjects
from rules.writes import Rewriter

__all__ = ["NOT_PARSED", "Analyzer", "Decision", "Effect", "Effects", "Refusal", "SubjectKeys"]

NOT_PARSED = "pgveil cannot parse the statement"

# An effect on the session's names or transaction: (kind, name), name "" when it has none.
# kinds: begin, commit, commit_chain, rollback, rollback_chain, prepare_transaction,
# savepoint, release, rollback_to (a savepoint name); declare, declare_hold, close, fetch,
# move (a cursor: the protocol's portals); close_all; prepare, deallocate, execute (a prepared
# statement); deallocate_all, discard_all; copy_in (COPY ... FROM STDIN: the server reads
# the client's messages as copy data); unknown_tx (CALL, DO: code that may end the
# transaction it runs in)
Effect = tuple[str, str]
Effects = tuple[tuple[Effect, ...], ...]


@dataclass(frozen=True)
class Decision:
    action: str  # "pass" (send as is), "rewrite" (send `sql`), "refuse"
    sql: str | None = None
    reason: str | None = None
    kinds: tuple[str, ...] = ()  # select, insert, update, delete, copy, ...
    tables: tuple[str, ...] = ()  # protected relations the statement reads or writes
    columns: tuple[str, ...] = ()  # personal columns read, masked (table.column)
    # those of them that are `deny` (read as NULL; or written, which only NULL may be):
    # the audit lists them as denied, not masked; also on a refusal
    denied: tuple[str, ...] = ()
    uses_hash: bool = False
    # relations the catalog does not know (created since it was read), and temporary
    # relations the statement creates: the session judges those against its own
    unknown_relations: tuple[str, ...] = ()
    temp_relations: tuple[str, ...] = ()
    # data subjects named by the statement itself, where its shape proves that it touches
    # no other (rules.subjects): a write's or a one-table read's `subject = k` /
    # `subject IN (...)` (top-level AND), or an INSERT's VALUES. A key is normalised by
    # the key column's type, or the parameter that carries it.
    subject_keys: tuple[SubjectKeys, ...] = ()
    # tables whose subjects the keys in the rows returned prove (rules.subjects)
    row_subjects: tuple[str, ...] = ()
    # What each statement does to the session's names and transaction, for the statement log
    # (proxy/session/statements.py): one tuple of effects per statement, in order, or () when
    # no statement has any; None when they cannot be known (the text does not parse as the
    # server parses it: an unmasked session's statement that still runs)
    effects: Effects | None = ()
    # the names EXECUTE / FETCH use ("statement:NAME", "portal:NAME"), for the decision made
    # before the statement is sent
    uses: tuple[str, ...] = ()
    # the cursors MOVE positions ("portal:NAME"): it reads no rows but counts them, so a
    # masked session checks what they run as it checks a FETCH's (no access of its own for
    # the audit)
    moves: tuple[str, ...] = ()
    # the statement as audit events show it (see rules.context.redact), and its hash:
    # filled in by the context, once per statement shape
    redacted: str = ""
    fingerprint: str = ""
    # what the statements do to the settings that decide how the server reads later
    # messages (rules.settings), in order; None when the text does not parse as the
    # server's does
    settings: tuple[SettingOp, ...] | None = ()
    # the audit: the views the statement reads, each with the protected tables behind it
    # (which `tables` holds too); every relation name it reads or names, as written
    # ("name", "schema.name"); the views it creates ("schema.name", "name" as written, or
    # "pg_temp.name" for a temporary one), each with the protected tables its query reads
    views: tuple[tuple[str, tuple[str, ...]], ...] = ()
    relations: tuple[str, ...] = ()
    defines: tuple[tuple[str, tuple[str, ...]], ...] = ()
    # a refusal made once the analysis had gone through the whole statement: `tables` are
    # all it reads (a view a masked role may not read, say)
    complete: bool = False
    # whether it may make names denote other relations or functions than the catalog says:
    # it creates or replaces a view that is not temporary or a function, renames or moves
    # a function, renames, moves, alters, drops or rewrites (CREATE RULE) a relation the
    # catalog has, or renames or drops a schema; or it attaches code the server runs
    # unnamed (a trigger, policy or index of a relation the catalog has; a cast, operator,
    # type or domain), which the catalog read must see (rules.subjects)
    moves_names: bool = False
    # the system relations and functions read that show values or statement text
    # (rules.denied.SYSTEM_VIEWS): rewritten for masked roles; an unmasked session reads
    # them raw, and its event cannot name the tables whose values they show
    exposes: tuple[str, ...] = ()
    # the text does not parse with pgveil's parser (a refusal): the masked filter lets the
    # server's raw parser answer it with its own syntax error, in a form that cannot run
    # (proxy/session/masked.py: the syntax probe)
    syntax: bool = False


_KIND = {
    "SelectStmt": "select", "InsertStmt": "insert", "UpdateStmt": "update",
    "DeleteStmt": "delete", "CopyStmt": "copy", "ExplainStmt": "explain",
    "PrepareStmt": "prepare", "ExecuteStmt": "execute", "DeclareCursorStmt": "declare",
    "FetchStmt": "fetch", "CreateTableAsStmt": "create_table_as", "ViewStmt": "create_view",
    "VariableSetStmt": "set", "VariableShowStmt": "show", "TransactionStmt": "transaction",
    "CallStmt": "call", "VacuumStmt": "vacuum",
}  # fmt: skip


def _kind(stmt: Any) -> str:
    if isinstance(stmt, ast.VacuumStmt) and not stmt.is_vacuumcmd:
        return "analyze"
    return _KIND.get(type(stmt).__name__, type(stmt).__name__)


class Analyzer:
    """Decides for one policy x catalog. Thread-compatible; holds no per-session state."""

    def __init__(self, pmap: ProtectionMap) -> None:
        self.pmap = pmap
        self.policy = pmap.policy
        self.catalog = pmap.catalog
        self.misread = misread_words(self.catalog.keywords)

    def analyze(self, sql: str) -> Decision:
        try:
            return self._analyze(sql)
        except RecursionError:
            # nesting deeper than the walk's stack (the server's own limit is higher):
            # refused to masked roles; an unmasked one's is recorded as not analysed
            return Decision(
                "refuse",
                reason="the statement is nested too deeply for pgveil to analyse",
                effects=None,
                settings=None,
            )

    def _analyze(self, sql: str) -> Decision:
        try:
            stmts = parse_sql(sql)
        except ParseError:
            return Decision("refuse", reason=NOT_PARSED, effects=None, settings=None, syntax=True)
        word = self.misread_word(sql)
        if word is not None:
            return Decision(
                "refuse",
                reason=f"the server reads the word {word} differently from pgveil's parser "
                "(a keyword in only one of them); quote it if it is a name",
                effects=None,
                settings=None,
            )
        if not stmts:
            return Decision("pass")
        out: list[str] = []
        kinds: list[str] = []
        rewriter = Rewriter(self)
        rewriter.references, rewriter.qualified = _references(stmts)
        rewriter.defined_names = _defined_names(stmts)
        rewriter.row_uses = row_uses(stmts)
        rewriter.owners = field_columns(stmts, self.catalog, self.catalog.server_version_num)
        rewriter.text = sql
        keys, row_subjects = statement_subjects(self.pmap, stmts)
        effects = _effects(stmts)
        settings = settings_of(stmts, sql)
        uses, moves = _uses(effects)
        if _moves_names(stmts, self.catalog):
            rewriter.moves_names = True
        try:
            changed = False
            for raw in stmts:
                kinds.append(_kind(raw.stmt))
                before = rewriter.changes
                raw.stmt = rewriter.statement(raw.stmt)
                changed = changed or rewriter.changes != before
                out.append(RawStream()(raw.stmt))
        except Refusal as r:
            return Decision(
                "refuse",
                reason=rewriter.deferred or r.reason,
                kinds=tuple(kinds),
                tables=rewriter.tables(),
                effects=effects,
                uses=uses,
                moves=moves,
                settings=settings,
                **_audit_of(rewriter),
            )
        unknown = tuple(sorted(rewriter.unknown - rewriter.temp))
        temp = tuple(sorted(rewriter.temp))
        if rewriter.deferred is not None:
            return Decision(
                "refuse",
                reason=rewriter.deferred,
                kinds=tuple(kinds),
                tables=rewriter.tables(),
                unknown_relations=unknown,
                temp_relations=temp,
                effects=effects,
                uses=uses,
                moves=moves,
                complete=True,
                **_audit_of(rewriter),
            )
        if not changed:
            return Decision(
                "pass",
                kinds=tuple(kinds),
                tables=rewriter.tables(),
                unknown_relations=unknown,
                temp_relations=temp,
                subject_keys=keys,
                row_subjects=row_subjects,
                effects=effects,
                uses=uses,
                moves=moves,
                settings=settings,
                **_audit_of(rewriter),
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
            subject_keys=keys,
            row_subjects=row_subjects,
            effects=effects,
            uses=uses,
            moves=moves,
            settings=settings,
            **_audit_of(rewriter),
        )

    def misread_word(self, sql: str) -> str | None:
        """The first word of `sql` that the server and pgveil's parser read differently
        (see rules.grammar.misread_words), outside quotes, strings and comments."""
        if not self.misread:
            return None
        lowered = sql.lower()
        if not any(w in lowered for w in self.misread):
            return None  # the common case: no need to tokenise
        for token in scan(sql):
            text = sql[token.start : token.end + 1]
            if text[:1] != '"' and text.lower() in self.misread:
                return text.lower()
        return None


def _audit_of(rewriter: Rewriter) -> dict[str, Any]:
    """What the audit keeps of the walk, beyond the tables (see Decision.views)."""
    out: dict[str, Any] = {"moves_names": True} if rewriter.moves_names else {}
    if rewriter.denied:
        out["denied"] = tuple(sorted(rewriter.denied))
    if rewriter.relations:
        out["relations"] = tuple(sorted(rewriter.relations))
    if rewriter.views:
        out["views"] = tuple(sorted(rewriter.views.items()))
    if rewriter.defines:
        out["defines"] = tuple(sorted((k, tuple(sorted(v))) for k, v in rewriter.defines.items()))
    if rewriter.exposes:
        out["exposes"] = tuple(sorted(rewriter.exposes))
    return out


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


def _moves_names(stmts: Any, catalog: Any) -> bool:
    """Whether a statement may make names denote other relations than `catalog` says (see
    Decision.moves_names). A temporary relation, or one the catalog does not have, moves nothing
    the catalog says (a name it does not have is uncertain in any case)."""

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
    return False


_CURSOR_OPT_HOLD = 0x0020  # parsenodes.h


def _effects(stmts: Any) -> Effects:
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


def _uses(effects: Effects) -> tuple[tuple[str, ...], tuple[str, ...]]:
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


def _defined_names(stmts: Any) -> frozenset[str]:
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
