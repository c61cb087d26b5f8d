"""The write rewrite of masked sessions: INSERT, UPDATE and DELETE.

What a write reads of its target (WHERE, SET expressions, RETURNING, ON CONFLICT) is masked;
a new value or an assignment subscript computed from a personal column is refused (it would
copy the raw value somewhere the masks do not cover); writing back the exact masked value the
client was shown keeps the stored original (DESIGN.md section 2).

Pure: no I/O, no logging. Reasons never quote literals from the statement.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pglast.stream import RawStream

from rules.catalog import Protected
from rules.denied import DENY_WRITE_MARKER, SYSTEM_COLUMNS, Refusal
from rules.masks import sql_expr, sql_literal
from rules.nodes import descendants
from rules.reads import ReadRewrite, ast, name_of, parse_one
from shared.quoting import quote_ident

_READS_PERSONAL = "a write whose new values read personal columns is refused"


@dataclass
class Target:
    """The relation a write modifies, as the statement refers to it."""

    protected: Protected
    alias: str
    schema: str | None
    name: str
    # qualifiers that denote the target's row besides its alias: PostgreSQL 18's OLD and
    # NEW in RETURNING
    row_names: tuple[str, ...] = ()

    def denotes(self, qualifier: str) -> bool:
        return qualifier in (self.alias, self.name) or qualifier in self.row_names


class Rewriter(ReadRewrite):
    """The read rewrite plus the write rewrite: what the analyser runs."""

    def write(self, node: Any) -> Any:
        if node.withClause is not None:
            self.with_clause(node.withClause)
        try:
            rv = node.relation
            if not isinstance(rv, ast.RangeVar):
                raise Refusal("pgveil does not expect this as the target of a write")
            self.rule_of(rv)
            self.rest(rv)
            found = self.protected_of(rv, cte_scope=False)  # a write target is never a CTE
            target = None
            if found is not None:
                alias = rv.alias.aliasname if rv.alias is not None else rv.relname
                rows = ("old", "new") if self.server_version >= 180000 else ()
                target = Target(found, alias, rv.schemaname, rv.relname, rows)
            if isinstance(node, ast.InsertStmt):
                self.insert(node, target)
            elif isinstance(node, ast.UpdateStmt):
                self.update(node, target)
            else:
                if node.usingClause:
                    node.usingClause = tuple(self.from_item(i) for i in node.usingClause)
                self.target_exprs(node, "whereClause", target)
            rc = node.returningClause
            if rc is not None:
                self.rule_of(rc)
                if rc.options:
                    raise Refusal(
                        "RETURNING WITH (OLD/NEW AS ...) is not supported for masked roles"
                    )
                self.rest(rc)
                if rc.exprs:
                    rc.exprs = self.returning(rc.exprs, target)
            self.rest(node)
        finally:
            if node.withClause is not None:
                self.ctes.pop()
        return node

    def insert(self, node: Any, target: Target | None) -> None:
        if node.cols:
            # INSERT INTO t (col[subscript], ...): the subscripts decide where values go
            node.cols = tuple(self.assignment(rt, None, insert=True) for rt in node.cols)
        if node.selectStmt is not None:
            before = set(self.masked_columns)
            node.selectStmt = self.statement(node.selectStmt)
            if self.reads_personal(node.selectStmt, before):
                raise Refusal(_READS_PERSONAL)
        if target is not None:
            self.insert_deny(node, target)
        occ = node.onConflictClause
        if occ is not None:
            self.rule_of(occ)
            self.rest(occ)  # the arbiter inference: index expressions, their predicate
            if occ.targetList:
                occ.targetList = tuple(
                    self.assignment(rt, target, excluded_ok=True) for rt in occ.targetList
                )
            self.target_exprs(occ, "whereClause", target)

    def update(self, node: Any, target: Target | None) -> None:
        if node.fromClause:
            node.fromClause = tuple(self.from_item(i) for i in node.fromClause)
        node.targetList = tuple(self.assignment(rt, target) for rt in node.targetList)
        self.target_exprs(node, "whereClause", target)

    def reads_personal(self, node: Any, masked_before: set[str]) -> bool:
        new = self.masked_columns - masked_before
        if not new:
            return False
        personal = {c.rpartition(".")[2] for c in new}
        known = {c.name for p in self.all_touched() for c in p.relation.columns}
        for n in descendants(node):
            if isinstance(n, ast.ColumnRef):
                last = n.fields[-1]
                if isinstance(last, ast.A_Star) or name_of(last) in personal:
                    return True
                if len(n.fields) == 1 and name_of(last) not in known:
                    return True  # may be a whole-row reference to a protected relation
        return False

    def assignment(
        self,
        rt: Any,
        target: Target | None,
        *,
        excluded_ok: bool = False,
        insert: bool = False,
    ) -> Any:
        """One assignment of a write: `col[subscripts].field = value` of UPDATE and
        ON CONFLICT DO UPDATE, or a column of INSERT's list (no value). The value and the
        subscripts are new data: neither may read a personal column."""
        if not isinstance(rt, ast.ResTarget):
            raise Refusal("pgveil does not expect this as an assignment")
        self.rule_of(rt)
        before = set(self.masked_columns)
        parts = (rt.val, rt.indirection)
        if target is not None and any(self.refers_to_personal(p, target) for p in parts):
            raise Refusal(_READS_PERSONAL)
        self.rest(rt)  # the value and the subscripts, walked like reads
        if any(self.reads_personal(p, before) for p in parts):
            raise Refusal(_READS_PERSONAL)
        if insert or target is None or rt.name not in target.protected.masks:
            return rt
        if rt.indirection:
            # SET col[...] / col.field: the write-back would copy the whole stored
            # value into a part of it that the mask may not cover
            raise Refusal("assigning to a part of a personal column is refused")
        if isinstance(rt.val, ast.MultiAssignRef):
            raise Refusal("multiple-column assignment to personal columns is refused")
        if isinstance(rt.val, ast.SetToDefault):
            return rt  # the column's default: no echo to keep, nothing of the client's
        if target.protected.masks[rt.name].name == "deny":
            # only NULL, what the client was shown, may be written: it keeps the original
            keep = f"{quote_ident(target.alias)}.{quote_ident(rt.name)}"
            rt.val = self.deny_guard(target.protected, rt.name, rt.val, keep)
            return rt
        if excluded_ok and _is_excluded(rt.val):
            return rt  # the incoming row's value: no echo to keep
        rt.val = self.write_back(rt.name, rt.val, target)
        return rt

    def deny_guard(self, p: Protected, col: str, value: Any, keep: str) -> Any:
        """The value written into deny column `col`: `keep` (the stored value, or NULL for
        a new row) when the client's value is NULL, else an error that pgveil turns into
        its refusal (proxy/session/masked.py, DENY_WRITE): a masked role may send back the
        NULL it read, never a value of its own.

        v  =>  CASE WHEN CAST((v) AS type) IS NULL THEN keep ELSE <error> END

        The error is a cast of pgveil's marker to an integer, through a stable function so
        that the planner never evaluates it before a row needs it (a constant would fail
        the statement whatever the value)."""
        c = p.relation.column(col)
        assert c is not None
        self.denied.add(f"{p.rule_table}.{col}")
        typ = c.type.formatted
        marker = sql_literal(f"{DENY_WRITE_MARKER} {p.rule_table}.{col}")
        error = (
            f"CASE WHEN CAST(pg_catalog.concat({marker}) AS pg_catalog.int4) IS NULL "
            f"THEN CAST(NULL AS {typ}) END"
        )
        v = RawStream()(value)
        guard = f"CASE WHEN CAST(({v}) AS {typ}) IS NULL THEN {keep} ELSE {error} END"
        self.changes += 1
        return parse_one(f"SELECT {guard}").targetList[0].val

    def insert_deny(self, node: Any, target: Target) -> None:
        """INSERT into a table with deny columns: each value for one of them is guarded (see
        deny_guard); a value that cannot be told (a set operation, `*`) is refused."""
        p = target.protected
        # the INSERT's column list (ResTargets), or without one every column, in order
        names = [c.name for c in (node.cols or p.relation.columns)]
        for rt in node.cols or ():
            spec = p.masks.get(rt.name)
            if rt.indirection and spec is not None and spec.name == "deny":
                # `(doc['k'])` with NULL writes {"k": null}, `(arr[3])` an array of NULLs:
                # the subscripts are the client's, written into the column
                self.denied.add(f"{p.rule_table}.{rt.name}")
                self.defer(
                    f"column {p.rule_table}.{rt.name} is not available to masked roles: a "
                    "part of it cannot be written; leave it out"
                )
        positions = [
            (i, name)
            for i, name in enumerate(names)
            if (spec := p.masks.get(name)) is not None and spec.name == "deny"
        ]
        query = node.selectStmt
        if not positions or query is None:
            return
        if not node.cols:
            # by position: the server maps values to the columns it has now, pgveil to those
            # of its catalog read; a column dropped since would move a value into the deny
            # column. Named, the columns are the ones guarded (or the server says one is gone).
            width = max(
                [len(row) for row in query.valuesLists or ()] or [len(query.targetList or ())]
            )
            columns = p.relation.columns[:width]
            node.cols = tuple(ast.ResTarget(name=c.name) for c in columns)
            self.changes += 1
        for i, name in positions:
            self.denied.add(f"{p.rule_table}.{name}")
            c = p.relation.column(name)
            assert c is not None
            keep = f"CAST(NULL AS {c.type.formatted})"
            if query.valuesLists:
                rows = []
                for row in query.valuesLists:
                    items = list(row)
                    if i < len(items) and not isinstance(items[i], ast.SetToDefault):
                        items[i] = self.deny_guard(p, name, items[i], keep)
                    rows.append(tuple(items))
                query.valuesLists = tuple(rows)
                continue
            targets = list(query.targetList or ())
            stars = any(
                isinstance(rt.val, ast.ColumnRef) and isinstance(rt.val.fields[-1], ast.A_Star)
                for rt in targets[: i + 1]
                if isinstance(rt, ast.ResTarget)
            )
            if query.larg is not None or stars:
                self.defer(
                    f"column {p.rule_table}.{name} is not available to masked roles: pgveil "
                    "cannot tell the values this INSERT writes into it; leave it out"
                )
            elif i < len(targets):
                targets[i].val = self.deny_guard(p, name, targets[i].val, keep)

    def write_back(self, col: str, value: Any, target: Target) -> Any:
        """SET col = v  =>  col = CASE WHEN v IS NOT DISTINCT FROM mask(col) THEN col ELSE v END"""
        c = target.protected.relation.column(col)
        spec = target.protected.masks[col]
        assert c is not None
        ref = f"{quote_ident(target.alias)}.{quote_ident(col)}"
        masked = sql_expr(spec, ref, c.type, self.an.policy.keys)
        self.uses_hash = self.uses_hash or spec.name == "hash"
        v = RawStream()(value)
        case = f"CASE WHEN ({v}) IS NOT DISTINCT FROM {masked} THEN {ref} ELSE ({v}) END"
        expr = parse_one(f"SELECT {case}").targetList[0].val
        self.changes += 1
        return expr

    def refers_to_personal(self, node: Any, target: Target) -> bool:
        return any(self.personal_ref(n, target) is not None for n in descendants(node))

    def personal_ref(self, n: Any, target: Target) -> str | None:
        if not isinstance(n, ast.ColumnRef):
            return None
        names = [name_of(f) for f in n.fields]
        if len(names) == 1 and names[0] in target.protected.masks:
            return names[0]
        if len(names) >= 2 and target.denotes(names[-2]):
            if names[-1] in target.protected.masks:
                return names[-1]
            columns = {c.name for c in target.protected.relation.columns}
            if names[-1] not in columns and names[-1] not in SYSTEM_COLUMNS:
                return "*"  # `c.f`, f no column of c: PostgreSQL reads f(c), the whole row
        if len(names) == 1 and target.denotes(names[0]):
            return "*"  # whole-row reference to the target
        if isinstance(n.fields[-1], ast.A_Star) and (len(names) == 1 or target.denotes(names[-2])):
            return "*"
        return None

    def target_exprs(self, owner: Any, attr: str, target: Target | None) -> None:
        """Mask the target's personal columns where a write reads them (WHERE, ON CONFLICT)."""
        expr = getattr(owner, attr)
        if expr is None:
            return
        expr = self.visit(expr)  # before masking: pgveil's own mask expressions need no checks
        if target is not None:
            expr = self.mask_target_refs(expr, target)
        setattr(owner, attr, expr)

    def mask_target_refs(self, node: Any, target: Target) -> Any:
        if isinstance(node, ast.ColumnRef):
            col = self.personal_ref(node, target)
            if col == "*":
                raise Refusal("a whole-row reference to a protected table in a write is refused")
            if col is not None:
                # at any depth: in `RETURNING (SELECT name)` the name is the target's; where
                # it is really an inner table's, masking it changes a result, never leaks
                # (a deny column reads as NULL of its type, as through a masking subquery)
                return self.masked_target_expr(col, target)
            return node
        if isinstance(node, ast.Node):
            if id(node) in self.generated:
                # pgveil's own masking subquery: its names are its table's, but for the
                # client's TABLESAMPLE arguments moved into it, which may name the target
                sample = self.samples.get(id(node))
                if sample is not None:
                    sample.args = tuple(self.mask_target_refs(a, target) for a in sample.args)
                    if sample.repeatable is not None:
                        sample.repeatable = self.mask_target_refs(sample.repeatable, target)
                return node
            for attr in node:
                value = getattr(node, attr)
                if isinstance(value, ast.Node):
                    setattr(node, attr, self.mask_target_refs(value, target))
                elif isinstance(value, tuple):
                    setattr(node, attr, tuple(self.mask_target_refs(v, target) for v in value))
        return node

    def masked_target_expr(self, col: str, target: Target) -> Any:
        c = target.protected.relation.column(col)
        assert c is not None
        spec = target.protected.masks[col]
        ref = f"{quote_ident(target.alias)}.{quote_ident(col)}"
        self.masked_columns.add(f"{target.protected.rule_table}.{col}")
        if spec.name == "deny":
            self.denied.add(f"{target.protected.rule_table}.{col}")
        self.uses_hash = self.uses_hash or spec.name == "hash"
        self.changes += 1
        return (
            parse_one(f"SELECT {sql_expr(spec, ref, c.type, self.an.policy.keys)}")
            .targetList[0]
            .val
        )

    def returning(self, items: Any, target: Target | None) -> Any:
        out = []
        for rt in items:
            if not isinstance(rt, ast.ResTarget):
                raise Refusal("pgveil does not expect this in RETURNING")
            self.rule_of(rt)
            if target is None:
                self.rest(rt)
                out.append(rt)
                continue
            val = rt.val
            if isinstance(val, ast.ColumnRef) and isinstance(val.fields[-1], ast.A_Star):
                self.rest(rt)  # `*` or `t.*`: every column of the target, the personal masked
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
                name = name_of(val.fields[-1])  # the output column keeps the name it had
            self.rest(rt)
            rt.val = self.mask_target_refs(rt.val, target)
            rt.name = name
            out.append(rt)
        return tuple(out)


def _is_excluded(value: Any) -> bool:
    return (
        isinstance(value, ast.ColumnRef)
        and len(value.fields) == 2
        and name_of(value.fields[0]).lower() == "excluded"
    )
