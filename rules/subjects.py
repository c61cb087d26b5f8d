"""Data subjects a statement names itself: the keys of `subject = k` / `subject IN (...)`
among a write's or a one-table read's top-level AND terms, and an INSERT's VALUES. The audit
records them (the rows returned say the rest; see proxy/session/statements.py).

Pure: no I/O. Keys are kept as the statement spells them (literals or parameter numbers),
integers normalised; they go to the audit stream only, never to logs or error texts.
"""

from __future__ import annotations

from typing import Any

from pglast.enums import A_Expr_Kind, BoolExprType

from rules.catalog import ProtectionMap
from rules.reads import ast, name_of

# (table, keys: literal text or parameter number, whether the key column is an integer)
SubjectKeys = tuple[str, tuple[str | int, ...], bool]


def subject_keys(pmap: ProtectionMap, stmts: Any) -> tuple[SubjectKeys, ...]:
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
    found = pmap.by_name.get((rv.schemaname or "", rv.relname)) if rv.schemaname else None
    if found is None and not rv.schemaname:
        candidates = pmap.by_relname.get(rv.relname, [])
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
    names = [name_of(f) for f in node.fields]
    return names[-1] == subject and (len(names) == 1 or names[-2] == alias)


def _filtered_keys(where: Any, subject: str, alias: str) -> tuple[str | int, ...] | None:
    """Keys from `subject = k` or `subject IN (k, ...)` among the top-level AND terms."""
    terms = [where]
    if isinstance(where, ast.BoolExpr) and where.boolop == BoolExprType.AND_EXPR:
        terms = list(where.args)
    for t in terms:
        if not isinstance(t, ast.A_Expr) or [name_of(n) for n in t.name] != ["="]:
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


def _inserted_keys(node: Any, subject: str) -> tuple[str | int, ...] | None:
    sel = node.selectStmt
    if not node.cols or not isinstance(sel, ast.SelectStmt) or not sel.valuesLists:
        return None
    names = [c.name for c in node.cols]
    if subject not in names:
        return None
    i = names.index(subject)
    keys = [_key_of(row[i]) if len(row) > i else None for row in sel.valuesLists]
    return tuple(k for k in keys if k is not None) if all(k is not None for k in keys) else None
