"""What the server says of a name that does not exist, for a masked role's statement.

A statement that names a relation, or a `t.f` column or function, that pgveil's catalog read
does not have is held until a catalog read that began after it arrived is in (see
proxy/session/masked.py). If that read does not have the name either, the name did not
exist when the read was made, and the client gets the error the server gives such a
statement: `42P01 relation "x" does not exist`, `42703 column c.f does not exist`, `42P01
missing FROM-clause entry for table "c"`, `0A000 cross-database references are not
implemented: "d.s.x"`, with the position of the name in the client's text where the server
gives one. The statement itself never reaches the server: a relation or function created
since the read would be read or run unanalysed.

The name reported is the first one the server's analysis meets: the statement's WITH
queries first, then the relation a write targets, FROM, and the other clauses (see
`_ORDER`). `missing_name` answers None where it cannot say for sure what the server would
say: the name exists, as a relation pgveil does not read (a sequence, an index, a relation
of a temporary schema), or it is not written where a relation or column reference is.
`created_here` tells a relation that an earlier statement of the same text creates
(`CREATE TABLE t ...; SELECT * FROM t`): it will exist when the statement runs, but pgveil
cannot judge a statement on it before it does.

Pure: no I/O. The messages quote only names the client wrote.
"""

from __future__ import annotations

from collections.abc import Collection, Iterator
from dataclasses import dataclass
from typing import Any

import pglast.ast
from pglast import parse_sql
from pglast.parser import ParseError

from rules.catalog import Catalog
from rules.fields import Owners, field_columns

ast: Any = pglast.ast

COLUMN_OR_FUNCTION = "column or function "  # how the analyser names an unknown `t.f`

# The order the server's parse analysis visits the clauses of a statement in
# (parser/analyze.c: transformSelectStmt, transformInsertStmt, transformUpdateStmt, ...);
# the fields of every other node, and those not listed here, follow in declaration order.
_ORDER: dict[str, tuple[str, ...]] = {
    "SelectStmt": (
        "withClause", "larg", "rarg", "fromClause", "targetList", "whereClause",
        "havingClause", "sortClause", "groupClause", "distinctClause", "limitOffset",
        "limitCount", "windowClause", "valuesLists", "lockingClause",
    ),
    "InsertStmt": ("withClause", "relation", "selectStmt", "onConflictClause"),
    "UpdateStmt": ("withClause", "relation", "fromClause", "whereClause", "returningClause"),
    "DeleteStmt": ("withClause", "relation", "usingClause", "whereClause"),
    "MergeStmt": ("withClause", "relation", "sourceRelation", "joinCondition"),
}  # fmt: skip
# statements whose relations the server opens while it analyses a query, with a position;
# a utility statement's (COPY t, TRUNCATE, LOCK, VACUUM) are looked up without one
_QUERIES = (ast.SelectStmt, ast.InsertStmt, ast.UpdateStmt, ast.DeleteStmt, ast.MergeStmt)
_TEMPORARY_SCHEMAS = ("pg_temp_", "pg_toast_temp_")


@dataclass(frozen=True)
class Missing:
    """The server's error for a name that does not exist: SQLSTATE, primary message,
    position (1-based, in characters of the client's text; None: the server gives none),
    detail and hint."""

    code: str
    message: str
    position: int | None
    detail: str | None = None
    hint: str | None = None


def missing_name(
    sql: str, unknown: Collection[str], catalog: Catalog, database: str | None
) -> Missing | None:
    """The error the server gives `sql`, whose names `unknown` (as the analyser records
    them: "schema.name", "name", "column or function f") `catalog` does not have, or None
    when it cannot be said for sure (see the module docstring)."""
    if not catalog.relation_names:
        return None  # (a catalog that does not list every relation cannot tell)
    try:
        statements = parse_sql(sql)
    except ParseError:
        return None
    aliases = _aliases(statements)
    owners = field_columns(statements, catalog, catalog.server_version_num)
    created, keys = _created(statements)
    # (one the text creates will exist when the statement on it runs: see created_here)
    absent = [name for name in unknown if name not in keys]
    for raw in statements:
        for node, at in _walk(raw.stmt, _Place(frozenset(), frozenset(), False)):
            if id(node) in created:
                continue  # a relation the statement creates: no reference
            found = _missing_at(node, at, absent, aliases, owners)
            if found is not None:
                return _checked(found, node, catalog, database)
    return None


def created_here(sql: str, unknown: Collection[str]) -> str | None:
    """The first of the `unknown` relation names that a statement of `sql` creates (see
    the module docstring), None when it creates none of them."""
    try:
        statements = parse_sql(sql)
    except ParseError:
        return None
    _ids, keys = _created(statements)
    return next((key for key in keys if key in unknown), None)


# what a statement creates a relation as: (node class, the path to its RangeVar)
_CREATES = (
    (ast.CreateStmt, ("relation",)),
    (ast.CreateTableAsStmt, ("into", "rel")),
    (ast.ViewStmt, ("view",)),
    (ast.CreateSeqStmt, ("sequence",)),
    (ast.IntoClause, ("rel",)),
)


def _created(statements: Any) -> tuple[set[int], list[str]]:
    """The RangeVars of the relations the statements create (by id), and their names as
    the analyser records unknown ones."""
    ids: set[int] = set()
    keys: list[str] = []
    for raw in statements:
        for node, _at in _walk(raw.stmt, _Place(frozenset(), frozenset(), False)):
            for cls, path in _CREATES:
                if not isinstance(node, cls):
                    continue
                rv = node
                for attr in path:
                    rv = getattr(rv, attr, None)
                if isinstance(rv, ast.RangeVar):
                    ids.add(id(rv))
                    schema = rv.schemaname
                    temporary = schema in (None, "pg_temp")
                    keys.append(rv.relname if temporary else f"{schema}.{rv.relname}")
    return ids, keys


@dataclass(frozen=True, slots=True)
class _Place:
    """Where a node is: the WITH query names visible there, those of its WITH lists that
    are defined later (not visible: `WITH a AS (... b ...), b AS (...)`), and whether it is
    inside a query (see _QUERIES)."""

    scope: frozenset[str]
    later: frozenset[str]
    query: bool


def _missing_at(
    node: Any, at: _Place, unknown: Collection[str], aliases: set[str], owners: Owners
) -> Missing | None:
    """The error for `node` if it is a reference to a name in `unknown` (a `t.f` whose f
    is a column of the item t names, as rules.fields tells, is none)."""
    owner = owners.get(id(node))
    columns = owner[1] if owner is not None and owner[0] is node else None
    if isinstance(node, ast.RangeVar):
        if node.schemaname is None and node.relname in at.scope:
            return None  # a WITH query of the statement
        schema = node.schemaname
        key = node.relname if schema in (None, "pg_temp") else f"{schema}.{node.relname}"
        if key not in unknown:
            return None
        position = node.location + 1 if at.query and node.location >= 0 else None
        written = f"{schema}.{node.relname}" if schema else str(node.relname)
        message = f'relation "{written}" does not exist'
        if schema is None and node.relname in at.later:
            return Missing(
                "42P01",
                message,
                position,
                f'There is a WITH item named "{node.relname}", but it cannot be referenced '
                "from this part of the query.",
                "Use WITH RECURSIVE, or re-order the WITH items to remove forward references.",
            )
        return Missing("42P01", message, position)
    if isinstance(node, ast.ColumnRef):
        fields = node.fields
        if len(fields) < 2 or not all(isinstance(f, ast.String) for f in fields):
            return None
        table, column = fields[-2].sval, fields[-1].sval
        if COLUMN_OR_FUNCTION + column not in unknown or column in (columns or ()):
            return None
        return _column(table, column, node.location, aliases)
    if isinstance(node, ast.A_Indirection):
        arg, parts = node.arg, node.indirection or ()
        if not parts or not isinstance(parts[0], ast.String):
            return None
        field = parts[0].sval
        if COLUMN_OR_FUNCTION + field not in unknown or field in (columns or ()):
            return None
        if isinstance(arg, ast.ColumnRef) and len(arg.fields) == 1:
            first = arg.fields[0]
            if isinstance(first, ast.String) and first.sval in aliases:
                return _column(first.sval, field, arg.location, aliases)
    return None


def _column(table: str, column: str, location: int, aliases: set[str]) -> Missing:
    position = location + 1 if location >= 0 else None
    if table in aliases:
        return Missing("42703", f"column {table}.{column} does not exist", position)
    return Missing("42P01", f'missing FROM-clause entry for table "{table}"', position)


def _checked(found: Missing, node: Any, catalog: Catalog, database: str | None) -> Missing | None:
    """`found`, if the name it reports surely does not exist (a relation of a kind pgveil
    does not read, or in a schema it cannot see, does), with what the server says of
    another database's name and of a forward reference to a WITH query."""
    if not isinstance(node, ast.RangeVar):
        return found
    schema, name = node.schemaname, node.relname
    if node.catalogname is not None and node.catalogname != database:
        written = ".".join((node.catalogname, schema or "", name))
        return Missing(
            "0A000", f'cross-database references are not implemented: "{written}"', found.position
        )
    if schema is None or schema == "pg_temp":
        if any(n == name for _s, n in catalog.relation_names):
            return None
    elif schema.startswith(_TEMPORARY_SCHEMAS) or (schema, name) in catalog.relation_names:
        return None
    return found


def _walk(node: Any, at: _Place) -> Iterator[tuple[Any, _Place]]:
    """The nodes under `node` in the order the server's analysis meets them, each with
    where it is."""
    if isinstance(node, tuple | list):
        for item in node:
            yield from _walk(item, at)
        return
    if not isinstance(node, ast.Node):
        return
    yield node, at
    if isinstance(node, _QUERIES) and not at.query:
        at = _Place(at.scope, at.later, True)
    fields = list(node)
    first = _ORDER.get(type(node).__name__, ())
    ordered = [f for f in first if f in fields] + [f for f in fields if f not in first]
    for name in ordered:
        value = getattr(node, name)
        if name == "withClause" and isinstance(value, ast.WithClause):
            ctes = [c for c in value.ctes or () if isinstance(c, ast.CommonTableExpr)]
            names = [c.ctename for c in ctes]
            for i, cte in enumerate(ctes):
                if value.recursive:
                    place = _Place(at.scope | frozenset(names), at.later, at.query)
                else:
                    visible, later = frozenset(names[:i]), frozenset(names[i + 1 :])
                    place = _Place(at.scope | visible, at.later | later, at.query)
                yield from _walk(cte, place)
            at = _Place(at.scope | frozenset(names), at.later, at.query)
            continue
        yield from _walk(value, at)


def _aliases(statements: Any) -> set[str]:
    """Every name a FROM item of the statements goes by: aliases, and the relation names
    of those without one."""
    found: set[str] = set()
    for raw in statements:
        for node, _at in _walk(raw.stmt, _Place(frozenset(), frozenset(), False)):
            alias = getattr(node, "alias", None)
            if isinstance(alias, ast.Alias):
                found.add(alias.aliasname)
            elif isinstance(node, ast.RangeVar):
                found.add(node.relname)
    return found
