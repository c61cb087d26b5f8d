"""The statement analyser of masked (and audited) sessions: parse, rewrite, or refuse.

`Analyzer.analyze` turns one client statement text into a `Decision` (rules.decision): pass
it as it is, send a rewritten text, or refuse it with a reason. This module only puts the
concerns together; each lives in its own module: the walk and the read rewrite in
`rules.reads` (closed by construction: every field of every node, by the grammar table in
`rules.grammar`), the write rewrite in `rules.writes`, the data subjects a statement names in
`rules.subjects`, what is never allowed in `rules.denied` (DESIGN.md section 2), what a
statement does to the session's names and transaction in `rules.effects`. Statement shapes
and the decision cache are in `rules.shapes`.

Pure: no I/O, no logging. Reasons never quote literals from the statement.
"""

from __future__ import annotations

from typing import Any

from pglast import parse_sql
from pglast.parser import ParseError, scan
from pglast.stream import RawStream

from rules.catalog import ProtectionMap
from rules.decision import NOT_PARSED, Decision
from rules.denied import Refusal
from rules.effects import effects_of, moves_names, uses_of
from rules.fields import field_columns
from rules.grammar import misread_words
from rules.reads import ast, names_defined, names_referenced, row_uses
from rules.settings import settings_of
from rules.subjects import statement_subjects
from rules.writes import Rewriter

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
        # every statement's kind, before the walk that may stop at one of them: an event
        # says what all of its statements were (audit/kinds.py trusts them)
        kinds = [_kind(raw.stmt) for raw in stmts]
        rewriter = Rewriter(self)
        rewriter.references, rewriter.qualified = names_referenced(stmts)
        rewriter.defined_names = names_defined(stmts)
        rewriter.row_uses = row_uses(stmts)
        rewriter.owners = field_columns(stmts, self.catalog, self.catalog.server_version_num)
        rewriter.text = sql
        keys, row_subjects = statement_subjects(self.pmap, stmts)
        effects = effects_of(stmts)
        settings = settings_of(stmts, sql)
        uses, moves = uses_of(effects)
        if moves_names(stmts, self.catalog):
            rewriter.moves_names = True
        try:
            changed = False
            for raw in stmts:
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
