"""Reads the PostgreSQL catalog: every query pgveil runs on pg_catalog to learn a
database's schema, and the building of the answers into values. One reader for the proxy
(`read_catalog`: the analyser's `rules.catalog.Catalog`; roles; databases) and the erasure
worker (`read_tables`: the tables an erasure configuration names, with their columns,
indexes, partitions and the worker's privileges).

Sans-I/O: every reader is handed `fetch`, a coroutine function that runs one query with its
parameters and answers its rows (asyncpg's `Connection.fetch` is one), and opens no
connection, imports no driver and keeps no state. Rows are read by column name or position.
What the queries answer is the schema (names, types, definitions), never a row of a table.
"""

from __future__ import annotations

from collections.abc import Awaitable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from rules.catalog import Catalog, Column, Relation
from rules.code import (
    NOTHING,
    SQL_TEXT_FUNCTIONS,
    Routine,
    hidden_moving,
    moving_code,
    routine_facts,
)
from rules.denied import SYSTEM_FUNCTIONS, SYSTEM_VIEWS
from rules.discovery import ForeignKey, Keys
from rules.masks import ColumnType


class Fetch(Protocol):
    """Runs one query with its parameters; answers its rows."""

    def __call__(self, query: str, *args: Any) -> Awaitable[Sequence[Any]]: ...


# -- the proxy: what the analyser reads ------------------------------------------------------

RELATIONS_SQL = """
SELECT c.oid, n.nspname, c.relname, c.relkind::text AS relkind, a.attname, a.attnum,
       coalesce(bt.typname, t.typname) AS typname,
       format_type(coalesce(nullif(t.typbasetype, 0), a.atttypid),
                   CASE WHEN t.typbasetype <> 0 THEN t.typtypmod ELSE a.atttypmod END) AS formatted,
       coalesce(co.collisdeterministic, true) AS deterministic
  FROM pg_catalog.pg_class c
  JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
  JOIN pg_catalog.pg_attribute a ON a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped
  JOIN pg_catalog.pg_type t ON t.oid = a.atttypid
  LEFT JOIN pg_catalog.pg_type bt ON bt.oid = t.typbasetype AND t.typtype = 'd'
  LEFT JOIN pg_catalog.pg_collation co ON co.oid = a.attcollation
 WHERE c.relkind IN ('r', 'p', 'v', 'm', 'f')
   AND n.nspname NOT IN ('pg_catalog', 'information_schema', 'pg_toast')
   AND n.nspname NOT LIKE 'pg_temp%' AND n.nspname NOT LIKE 'pg_toast_temp%'
 ORDER BY c.oid, a.attnum
"""
INHERITS_SQL = "SELECT inhrelid, inhparent FROM pg_catalog.pg_inherits"
VIEW_SOURCES_SQL = """
SELECT DISTINCT r.ev_class AS view, d.refobjid AS source
  FROM pg_catalog.pg_rewrite r
  JOIN pg_catalog.pg_depend d ON d.objid = r.oid
   AND d.classid = 'pg_catalog.pg_rewrite'::pg_catalog.regclass
   AND d.refclassid = 'pg_catalog.pg_class'::pg_catalog.regclass
 WHERE d.refobjid <> r.ev_class
"""
SYSTEM_RELATIONS_SQL = """
SELECT n.nspname, c.relname
  FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
 WHERE n.nspname IN ('pg_catalog', 'information_schema')
"""
KEYWORDS_SQL = "SELECT word, catcode::text AS catcode FROM pg_catalog.pg_get_keywords()"
COLUMN_NAMES_SQL = """
SELECT DISTINCT a.attname FROM pg_catalog.pg_attribute a
  JOIN pg_catalog.pg_class c ON c.oid = a.attrelid
 WHERE a.attnum > 0 AND NOT a.attisdropped AND c.relkind IN ('r', 'p', 'v', 'm', 'f', 'c')
"""
# the output columns that functions declare (OUT, INOUT and TABLE arguments), by function
# name: `FROM pg_partition_tree(c.oid) ppt ... ppt.isleaf` (psql's \dP+) names one. Known
# only as fields of such a function (rules.reads.ReadRewrite.field_selection): elsewhere
# `x.isleaf` calls a function isleaf(x), which may have been created since the catalog read.
FUNCTION_OUTPUTS_SQL = """
SELECT DISTINCT p.proname, arg.name FROM pg_catalog.pg_proc p,
       ROWS FROM (pg_catalog.unnest(p.proargnames), pg_catalog.unnest(p.proargmodes))
         AS arg(name, mode)
 WHERE arg.mode IN ('o', 'b', 't') AND arg.name <> ''
"""
VIEW_DEFINITIONS_SQL = """
SELECT n.nspname, c.relname, pg_catalog.pg_get_viewdef(c.oid) AS definition
  FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
 WHERE c.relkind IN ('v', 'm') AND n.nspname NOT IN ('pg_catalog', 'information_schema')
"""
# (takes_row: its first argument takes a row: `f(c)` may call it rather than read c.f)
FUNCTIONS_SQL = """
SELECT n.nspname, p.proname,
       p.pronargs > 0 AND p.proargtypes[0] IN (
         'pg_catalog.record'::pg_catalog.regtype, 'pg_catalog.anyelement'::pg_catalog.regtype,
         'pg_catalog.anynonarray'::pg_catalog.regtype,
         'pg_catalog.anycompatible'::pg_catalog.regtype,
         'pg_catalog.anycompatiblenonarray'::pg_catalog.regtype,
         'pg_catalog."any"'::pg_catalog.regtype) AS takes_row
  FROM pg_catalog.pg_proc p
  JOIN pg_catalog.pg_namespace n ON n.oid = p.pronamespace
"""
OPERATORS_SQL = """
SELECT n.nspname, o.oprname FROM pg_catalog.pg_operator o
  JOIN pg_catalog.pg_namespace n ON n.oid = o.oprnamespace
"""
# Types outside pg_catalog named like a built-in type (a search path that puts their schema
# first makes `x::int8` mean them)
SHADOWING_TYPES_SQL = """
SELECT DISTINCT t.typname FROM pg_catalog.pg_type t
  JOIN pg_catalog.pg_namespace n ON n.oid = t.typnamespace
 WHERE n.nspname NOT IN ('pg_catalog', 'information_schema')
   AND EXISTS (SELECT 1 FROM pg_catalog.pg_type b
                WHERE b.typname = t.typname
                  AND b.typnamespace = 'pg_catalog'::pg_catalog.regnamespace)
"""
# Functions written in SQL or a procedural language, outside pg_catalog, that the server
# calls without a statement naming them: casts, type support and domain constraints,
# operators (and their estimators), operator class support. C and internal functions are
# server or extension code, installed by a superuser.
HIDDEN_CODE_SQL = """
SELECT DISTINCT
       CASE WHEN d.classid = 'pg_catalog.pg_constraint'::pg_catalog.regclass
            THEN (SELECT 'domain ' || pg_catalog.format_type(c.contypid, NULL) || ' (constraint '
                         || c.conname || ')'
                    FROM pg_catalog.pg_constraint c WHERE c.oid = d.objid)
            ELSE pg_catalog.pg_describe_object(d.classid, d.objid, d.objsubid) END AS what,
       n.nspname, p.proname
  FROM pg_catalog.pg_depend d
  JOIN pg_catalog.pg_proc p ON p.oid = d.refobjid
  JOIN pg_catalog.pg_namespace n ON n.oid = p.pronamespace
  JOIN pg_catalog.pg_language l ON l.oid = p.prolang
 WHERE d.refclassid = 'pg_catalog.pg_proc'::pg_catalog.regclass
   AND n.nspname NOT IN ('pg_catalog', 'information_schema')
   AND l.lanname NOT IN ('c', 'internal')
   AND (d.classid IN ('pg_catalog.pg_cast'::pg_catalog.regclass,
                      'pg_catalog.pg_type'::pg_catalog.regclass,
                      'pg_catalog.pg_operator'::pg_catalog.regclass,
                      'pg_catalog.pg_amproc'::pg_catalog.regclass,
                      'pg_catalog.pg_conversion'::pg_catalog.regclass,
                      'pg_catalog.pg_transform'::pg_catalog.regclass,
                      'pg_catalog.pg_event_trigger'::pg_catalog.regclass)
        OR (d.classid = 'pg_catalog.pg_constraint'::pg_catalog.regclass
            AND EXISTS (SELECT 1 FROM pg_catalog.pg_constraint c
                         WHERE c.oid = d.objid AND c.contypid <> 0)))
 ORDER BY 1, 2, 3
"""
# The same for code attached to tables, which runs when their rows are written: triggers,
# column defaults and generated columns, table CHECK constraints, row security policies
# (which run on reads too), rewrite rules other than views', index expressions and partial
# index predicates, extended statistics' expressions (those two also run when the table is
# analysed). Part of the schema a DBA designed: reported, not refused.
TABLE_CODE_SQL = """
SELECT DISTINCT pg_catalog.pg_describe_object(d.classid, d.objid, d.objsubid) AS what,
       n.nspname, p.proname
  FROM pg_catalog.pg_depend d
  JOIN pg_catalog.pg_proc p ON p.oid = d.refobjid
  JOIN pg_catalog.pg_namespace n ON n.oid = p.pronamespace
  JOIN pg_catalog.pg_language l ON l.oid = p.prolang
 WHERE d.refclassid = 'pg_catalog.pg_proc'::pg_catalog.regclass
   AND n.nspname NOT IN ('pg_catalog', 'information_schema')
   AND l.lanname NOT IN ('c', 'internal')
   AND (d.classid IN ('pg_catalog.pg_trigger'::pg_catalog.regclass,
                      'pg_catalog.pg_attrdef'::pg_catalog.regclass,
                      'pg_catalog.pg_policy'::pg_catalog.regclass,
                      'pg_catalog.pg_statistic_ext'::pg_catalog.regclass)
        OR (d.classid = 'pg_catalog.pg_constraint'::pg_catalog.regclass
            AND EXISTS (SELECT 1 FROM pg_catalog.pg_constraint c
                         WHERE c.oid = d.objid AND c.conrelid <> 0))
        OR (d.classid = 'pg_catalog.pg_rewrite'::pg_catalog.regclass
            AND EXISTS (SELECT 1 FROM pg_catalog.pg_rewrite r
                         WHERE r.oid = d.objid AND r.rulename <> '_RETURN'))
        OR (d.classid = 'pg_catalog.pg_class'::pg_catalog.regclass
            AND EXISTS (SELECT 1 FROM pg_catalog.pg_class i
                         WHERE i.oid = d.objid AND i.relkind IN ('i', 'I'))))
 ORDER BY 1, 2, 3
"""
# The columns of the system relations masked roles read rewritten (rules.denied.SYSTEM_VIEWS):
# pg_catalog's, and those an extension created (with the extension's name, which must be
# the one SYSTEM_VIEWS names). Types as SQL names them, schema-qualified.
SYSTEM_COLUMNS_SQL = """
SELECT n.nspname, c.relname, coalesce(e.extname, '') AS extname, a.attname,
       pg_catalog.quote_ident(tn.nspname) || '.' || pg_catalog.quote_ident(t.typname) AS typ
  FROM pg_catalog.pg_class c
  JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
  JOIN pg_catalog.pg_attribute a ON a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped
  JOIN pg_catalog.pg_type t ON t.oid = a.atttypid
  JOIN pg_catalog.pg_namespace tn ON tn.oid = t.typnamespace
  LEFT JOIN pg_catalog.pg_depend d
    ON d.classid = 'pg_catalog.pg_class'::pg_catalog.regclass AND d.objid = c.oid
   AND d.refclassid = 'pg_catalog.pg_extension'::pg_catalog.regclass AND d.deptype = 'e'
  LEFT JOIN pg_catalog.pg_extension e ON e.oid = d.refobjid
 WHERE c.relname = ANY($1::pg_catalog.text[])
   AND (n.nspname = 'pg_catalog' OR e.extname IS NOT NULL)
 ORDER BY n.nspname, c.relname, a.attnum
"""
# The result columns of the pg_catalog functions in rules.denied.SYSTEM_FUNCTIONS (one
# overload each; a name with several is left out, and masked roles' calls are refused)
FUNCTION_COLUMNS_SQL = """
SELECT p.proname, p.proargnames[i] AS name, pg_catalog.quote_ident(tn.nspname) || '.'
       || pg_catalog.quote_ident(t.typname) AS typ
  FROM pg_catalog.pg_proc p
 CROSS JOIN LATERAL pg_catalog.generate_subscripts(p.proallargtypes, 1) AS i
  JOIN pg_catalog.pg_type t ON t.oid = p.proallargtypes[i]
  JOIN pg_catalog.pg_namespace tn ON tn.oid = t.typnamespace
 WHERE p.pronamespace = 'pg_catalog'::pg_catalog.regnamespace
   AND p.proname = ANY($1::pg_catalog.text[])
   AND p.proargmodes[i] OPERATOR(pg_catalog.=) ANY ('{o,t,b}'::pg_catalog."char"[])
   AND (SELECT pg_catalog.count(*) FROM pg_catalog.pg_proc q
         WHERE q.proname = p.proname AND q.pronamespace = p.pronamespace) = 1
 ORDER BY p.proname, i
"""
# every relation's name, whatever its kind, outside the system and temporary schemas (see
# Catalog.relation_names)
RELATION_NAMES_SQL = """
SELECT n.nspname, c.relname
  FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
 WHERE n.nspname NOT IN ('pg_catalog', 'information_schema')
   AND n.nspname NOT LIKE 'pg_temp%' AND n.nspname NOT LIKE 'pg_toast_temp%'
"""
# The code of the database that may move names when it runs (rules.code): every function
# outside pg_catalog and information_schema with its language and, in SQL or PL/pgSQL, its
# whole CREATE statement (an aggregate: its support functions instead), and whether an
# `internal` one is a built-in that runs a query given as text ($1) under another name;
# user operators' functions; code attached to relations (triggers, defaults, constraints,
# policies, rules, a view's definition), with whether it runs on reads (a policy, a view's
# SELECT rule)
ROUTINES_SQL = """
SELECT p.oid, n.nspname, p.proname, l.lanname,
       CASE WHEN p.prokind IN ('f', 'p') AND l.lanname IN ('sql', 'plpgsql')
            THEN pg_catalog.pg_get_functiondef(p.oid) END AS definition,
       l.lanname = 'internal'
         AND p.prosrc IN (SELECT b.prosrc FROM pg_catalog.pg_proc b
                           WHERE b.pronamespace = 'pg_catalog'::pg_catalog.regnamespace
                             AND b.proname = ANY($1::text[])) AS runs_sql_text,
       CASE WHEN p.prokind = 'a'
            THEN (SELECT ARRAY[a.aggtransfn, a.aggfinalfn, a.aggcombinefn, a.aggserialfn,
                               a.aggdeserialfn, a.aggmtransfn, a.aggminvtransfn,
                               a.aggmfinalfn]::pg_catalog.oid[]
                    FROM pg_catalog.pg_aggregate a WHERE a.aggfnoid = p.oid) END AS support
  FROM pg_catalog.pg_proc p
  JOIN pg_catalog.pg_namespace n ON n.oid = p.pronamespace
  JOIN pg_catalog.pg_language l ON l.oid = p.prolang
 WHERE n.nspname NOT IN ('pg_catalog', 'information_schema')
"""
OPERATOR_CODE_SQL = """
SELECT o.oprname, o.oprcode::pg_catalog.oid AS function
  FROM pg_catalog.pg_operator o JOIN pg_catalog.pg_namespace n ON n.oid = o.oprnamespace
 WHERE n.nspname NOT IN ('pg_catalog', 'information_schema') AND o.oprcode <> 0
"""
ATTACHED_CODE_SQL = """
SELECT rn.nspname, rc.relname, x.function, x.reads
  FROM (SELECT d.refobjid AS function,
               CASE d.classid
                 WHEN 'pg_catalog.pg_trigger'::pg_catalog.regclass
                   THEN (SELECT t.tgrelid FROM pg_catalog.pg_trigger t WHERE t.oid = d.objid)
                 WHEN 'pg_catalog.pg_attrdef'::pg_catalog.regclass
                   THEN (SELECT a.adrelid FROM pg_catalog.pg_attrdef a WHERE a.oid = d.objid)
                 WHEN 'pg_catalog.pg_constraint'::pg_catalog.regclass
                   THEN (SELECT c.conrelid FROM pg_catalog.pg_constraint c WHERE c.oid = d.objid)
                 WHEN 'pg_catalog.pg_policy'::pg_catalog.regclass
                   THEN (SELECT p.polrelid FROM pg_catalog.pg_policy p WHERE p.oid = d.objid)
                 WHEN 'pg_catalog.pg_rewrite'::pg_catalog.regclass
                   THEN (SELECT r.ev_class FROM pg_catalog.pg_rewrite r WHERE r.oid = d.objid)
                 WHEN 'pg_catalog.pg_class'::pg_catalog.regclass
                   THEN (SELECT i.indrelid FROM pg_catalog.pg_index i
                          WHERE i.indexrelid = d.objid)
               END AS rel,
               d.classid = 'pg_catalog.pg_policy'::pg_catalog.regclass
               OR (d.classid = 'pg_catalog.pg_rewrite'::pg_catalog.regclass
                   AND EXISTS (SELECT 1 FROM pg_catalog.pg_rewrite r
                                WHERE r.oid = d.objid AND r.ev_type = '1')) AS reads
          FROM pg_catalog.pg_depend d
         WHERE d.refclassid = 'pg_catalog.pg_proc'::pg_catalog.regclass
           AND d.classid IN ('pg_catalog.pg_trigger'::pg_catalog.regclass,
                             'pg_catalog.pg_attrdef'::pg_catalog.regclass,
                             'pg_catalog.pg_constraint'::pg_catalog.regclass,
                             'pg_catalog.pg_policy'::pg_catalog.regclass,
                             'pg_catalog.pg_rewrite'::pg_catalog.regclass,
                             'pg_catalog.pg_class'::pg_catalog.regclass)) x
  JOIN pg_catalog.pg_class rc ON rc.oid = x.rel
  JOIN pg_catalog.pg_namespace rn ON rn.oid = rc.relnamespace
"""
# Relations that a write to another relation may write too (their triggers, defaults and
# index expressions then run): the relations a rule's action names, the referencing table
# of a foreign key whose action writes it, a partitioned or parent table's partitions and
# children
WRITES_REACH_SQL = """
SELECT sn.nspname AS src_schema, s.relname AS src, tn.nspname AS dst_schema, t.relname AS dst
  FROM (SELECT r.ev_class AS src, d.refobjid AS dst
          FROM pg_catalog.pg_rewrite r
          JOIN pg_catalog.pg_depend d
            ON d.classid = 'pg_catalog.pg_rewrite'::pg_catalog.regclass AND d.objid = r.oid
           AND d.refclassid = 'pg_catalog.pg_class'::pg_catalog.regclass
         WHERE r.ev_type <> '1'
        UNION
        SELECT c.confrelid, c.conrelid FROM pg_catalog.pg_constraint c
         WHERE c.contype = 'f'
           AND (c.confdeltype IN ('c', 'n', 'd') OR c.confupdtype IN ('c', 'n', 'd'))
        UNION
        SELECT i.inhparent, i.inhrelid FROM pg_catalog.pg_inherits i) x
  JOIN pg_catalog.pg_class s ON s.oid = x.src
  JOIN pg_catalog.pg_namespace sn ON sn.oid = s.relnamespace
  JOIN pg_catalog.pg_class t ON t.oid = x.dst
  JOIN pg_catalog.pg_namespace tn ON tn.oid = t.relnamespace
 WHERE x.src <> x.dst
"""
# The functions of the enabled event triggers (they run on DDL that names no code)
EVENT_TRIGGERS_SQL = """
SELECT evtfoid AS function FROM pg_catalog.pg_event_trigger WHERE evtenabled <> 'D'
"""
# The names of the relations in every temporary schema (other sessions' too: pgveil cannot
# tell which server session is which of its own), which the catalog leaves out: a session
# whose code created one may see it where the catalog has another relation of that name
TEMP_NAMES_SQL = """
SELECT DISTINCT c.relname
  FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
 WHERE n.nspname ~ '^pg_temp_[0-9]+$'
"""
ROLE_NAMES_SQL = "SELECT rolname FROM pg_catalog.pg_roles"
DATABASES_SQL = """
SELECT datname FROM pg_catalog.pg_database
 WHERE datallowconn AND NOT datistemplate AND has_database_privilege(oid, 'CONNECT')
 ORDER BY datname
"""
ROLES_SQL = """
WITH RECURSIVE r(oid) AS (
    SELECT oid FROM pg_catalog.pg_roles WHERE rolname = $1
    UNION SELECT m.roleid FROM pg_catalog.pg_auth_members m JOIN r ON m.member = r.oid)
SELECT rolname FROM pg_catalog.pg_roles WHERE oid IN (SELECT oid FROM r)
"""
_SYSTEM = ("pg_catalog", "information_schema")

SERVER_VERSION_SQL = "SELECT pg_catalog.current_setting('server_version_num')"


async def read_catalog(fetch: Fetch) -> Catalog:
    """The analyser's catalog of the database `fetch` runs on (the proxy reads it per
    database, as its own login)."""
    rows = await fetch(RELATIONS_SQL)
    rels: dict[int, dict[str, Any]] = {}
    for r in rows:
        rel = rels.setdefault(
            r["oid"],
            {"schema": r["nspname"], "name": r["relname"], "kind": r["relkind"], "cols": []},
        )
        rel["cols"].append(
            Column(
                r["attname"],
                r["attnum"],
                ColumnType(r["typname"], r["formatted"]),
                r["deterministic"],
            )
        )
    parents: dict[int, list[int]] = {}
    for r in await fetch(INHERITS_SQL):
        parents.setdefault(r["inhrelid"], []).append(r["inhparent"])

    def ancestors(oid: int) -> list[int]:
        out: list[int] = []
        todo = list(parents.get(oid, ()))
        while todo:
            p = todo.pop()
            if p not in out:
                out.append(p)
                todo.extend(parents.get(p, ()))
        return out

    def key(oid: int) -> tuple[str, str] | None:
        r = rels.get(oid)
        return (r["schema"], r["name"]) if r else None

    relations: dict[tuple[str, str], Relation] = {}
    for oid, r in rels.items():
        ps = tuple(k for k in (key(p) for p in ancestors(oid)) if k is not None)
        relations[(r["schema"], r["name"])] = Relation(
            oid, r["schema"], r["name"], r["kind"], tuple(r["cols"]), ps
        )
    sources: dict[int, set[int]] = {}
    for r in await fetch(VIEW_SOURCES_SQL):
        sources.setdefault(r["view"], set()).add(r["source"])

    def closure(oid: int) -> set[int]:
        seen: set[int] = set()
        todo = list(sources.get(oid, ()))
        while todo:
            s = todo.pop()
            if s not in seen:
                seen.add(s)
                todo.extend(sources.get(s, ()))
        return seen

    view_sources = {}
    for oid in sources:
        k = key(oid)
        if k is not None:
            view_sources[k] = tuple(
                sorted(x for x in (key(s) for s in closure(oid)) if x is not None)
            )
    builtin_f: set[str] = set()
    row_f: set[str] = set()
    user_f: set[tuple[str, str]] = set()
    system_f: set[tuple[str, str]] = set()
    for r in await fetch(FUNCTIONS_SQL):
        if r["nspname"] == "pg_catalog":
            builtin_f.add(r["proname"])
            if r["takes_row"]:
                row_f.add(r["proname"])
        elif r["nspname"] not in _SYSTEM:
            user_f.add((r["nspname"], r["proname"]))
        else:
            system_f.add((r["nspname"], r["proname"]))
    builtin_o: set[str] = set()
    user_o: set[str] = set()
    shadowing_types = frozenset(r["typname"] for r in await fetch(SHADOWING_TYPES_SQL))
    for r in await fetch(OPERATORS_SQL):
        (builtin_o if r["nspname"] == "pg_catalog" else user_o).add(r["oprname"])
    definitions = {
        (r["nspname"], r["relname"]): r["definition"]
        for r in await fetch(VIEW_DEFINITIONS_SQL)
        if r["definition"]
    }
    system_rows = await fetch(SYSTEM_RELATIONS_SQL)
    system = frozenset(r["relname"] for r in system_rows)
    pg_catalog_relations = frozenset(
        r["relname"] for r in system_rows if r["nspname"] == "pg_catalog"
    )
    keywords = {r["word"]: r["catcode"] for r in await fetch(KEYWORDS_SQL)}
    column_names = frozenset(r[0] for r in await fetch(COLUMN_NAMES_SQL))
    outputs: dict[str, set[str]] = {}
    for r in await fetch(FUNCTION_OUTPUTS_SQL):
        outputs.setdefault(r["proname"], set()).add(r["name"])
    version = int((await fetch(SERVER_VERSION_SQL))[0][0])
    hidden = tuple((r["what"], r["nspname"], r["proname"]) for r in await fetch(HIDDEN_CODE_SQL))
    table_code = tuple((r["what"], r["nspname"], r["proname"]) for r in await fetch(TABLE_CODE_SQL))
    system_columns: dict[tuple[str, str], tuple[tuple[str, str], ...]] = {}
    for r in await fetch(SYSTEM_COLUMNS_SQL, sorted(SYSTEM_VIEWS)):
        view = SYSTEM_VIEWS[r["relname"]]
        if (r["nspname"] == "pg_catalog") != (view.extension == "") or (
            view.extension and r["extname"] != view.extension
        ):
            continue  # another extension's relation of that name: refused by name
        found = (r["nspname"], r["relname"])
        system_columns[found] = (*system_columns.get(found, ()), (r["attname"], r["typ"]))
    function_columns: dict[str, tuple[tuple[str, str], ...]] = {}
    for r in await fetch(FUNCTION_COLUMNS_SQL, sorted(SYSTEM_FUNCTIONS)):
        name = r["proname"]
        function_columns[name] = (*function_columns.get(name, ()), (r["name"], r["typ"]))
    relation_names = frozenset(
        (r["nspname"], r["relname"]) for r in await fetch(RELATION_NAMES_SQL)
    )
    routines = [
        Routine(
            r["oid"],
            r["nspname"],
            r["proname"],
            NOTHING
            if r["support"] is not None
            else routine_facts(r["lanname"], r["definition"], r["proname"], r["runs_sql_text"]),
            tuple(o for o in r["support"] or () if o),
        )
        for r in await fetch(ROUTINES_SQL, sorted(SQL_TEXT_FUNCTIONS))
    ]
    moving = moving_code(
        routines,
        frozenset(builtin_f),
        [(r["oprname"], r["function"]) for r in await fetch(OPERATOR_CODE_SQL)],
        [
            (r["nspname"], r["relname"], r["function"], r["reads"])
            for r in await fetch(ATTACHED_CODE_SQL)
        ],
        view_sources,
        [
            ((r["src_schema"], r["src"]), (r["dst_schema"], r["dst"]))
            for r in await fetch(WRITES_REACH_SQL)
        ],
        [r["function"] for r in await fetch(EVENT_TRIGGERS_SQL)],
    )
    return Catalog(
        relations=relations,
        relation_names=relation_names,
        system_relations=system,
        pg_catalog_relations=pg_catalog_relations,
        keywords=keywords,
        column_names=column_names,
        function_outputs={name: frozenset(names) for name, names in outputs.items()},
        view_definitions=definitions,
        builtin_functions=frozenset(builtin_f),
        row_functions=frozenset(row_f),
        user_functions=frozenset(user_f),
        system_functions=frozenset(system_f),
        builtin_operators=frozenset(builtin_o),
        user_operators=frozenset(user_o - builtin_o),
        shadowing_operators=frozenset(user_o & builtin_o),
        shadowing_types=shadowing_types,
        view_sources=view_sources,
        server_version_num=version,
        hidden_code=hidden,
        table_code=table_code,
        system_columns=system_columns,
        function_columns=function_columns,
        moving_functions=moving.functions,
        moving_operators=moving.operators,
        moving_reads=moving.reads,
        moving_writes=moving.writes,
        moving_ddl=moving.ddl,
        moving_hidden=hidden_moving(hidden, moving.functions),
    )


async def read_temp_names(fetch: Fetch) -> frozenset[str]:
    """The names of the relations in the database's temporary schemas (see TEMP_NAMES_SQL)."""
    return frozenset(r["relname"] for r in await fetch(TEMP_NAMES_SQL))


async def read_role_names(fetch: Fetch) -> frozenset[str]:
    """Every role of the cluster: what the rules' role lists are checked against."""
    return frozenset(r["rolname"] for r in await fetch(ROLE_NAMES_SQL))


async def read_roles(fetch: Fetch, user: str) -> frozenset[str]:
    """`user` and every role it is a member of, directly or not."""
    return frozenset(r["rolname"] for r in await fetch(ROLES_SQL, user)) | {user}


async def read_databases(fetch: Fetch) -> list[str]:
    """The databases the login may connect to, by name."""
    return [r["datname"] for r in await fetch(DATABASES_SQL)]


# -- the erasure worker: the tables it erases ------------------------------------------------
# (run with search_path = pg_catalog, so that format_type qualifies every other type)

TABLES_SQL = """
SELECT c.oid, n.nspname, c.relname, c.relkind::text,
       has_table_privilege(c.oid, 'SELECT'), has_table_privilege(c.oid, 'UPDATE'),
       has_table_privilege(c.oid, 'DELETE')
  FROM pg_class AS c JOIN pg_namespace AS n ON n.oid = c.relnamespace
 WHERE (n.nspname, c.relname) IN (SELECT * FROM unnest($1::text[], $2::text[]))
"""
LEAVES_SQL = """
SELECT t.relid::oid, n.nspname, c.relname
  FROM pg_partition_tree($1::oid::regclass) AS t
  JOIN pg_class AS c ON c.oid = t.relid JOIN pg_namespace AS n ON n.oid = c.relnamespace
 WHERE t.isleaf ORDER BY n.nspname, c.relname
"""
TABLE_COLUMNS_SQL = """
SELECT a.attrelid, a.attnum, a.attname, format_type(a.atttypid, a.atttypmod), a.atttypid,
       a.attnotnull
  FROM pg_attribute AS a
 WHERE a.attrelid = ANY($1::oid[]) AND a.attnum > 0 AND NOT a.attisdropped
 ORDER BY a.attrelid, a.attnum
"""
TYPES_SQL = "SELECT oid, typname::text, typtype::text, typbasetype FROM pg_type WHERE oid = ANY($1)"
INDEXES_SQL = """
SELECT i.indrelid, ic.relname::text, i.indisunique, i.indpred IS NOT NULL, am.amname::text,
       i.indisvalid, i.indnkeyatts, i.indkey::int2[]
  FROM pg_index AS i JOIN pg_class AS ic ON ic.oid = i.indexrelid
  JOIN pg_am AS am ON am.oid = ic.relam
 WHERE i.indrelid = ANY($1::oid[])
 ORDER BY ic.relname
"""
CURRENT_USER_SQL = "SELECT current_user"


@dataclass(frozen=True)
class TableColumn:
    name: str
    type: str  # format_type(): SQL text for casts, e.g. "bigint", "character varying(80)"
    base: str  # pg_type.typname of the base type (domains resolved), e.g. "int8", "jsonb"
    not_null: bool


@dataclass(frozen=True)
class TableIndex:
    name: str
    columns: tuple[str | None, ...]  # key columns in order; None for an expression
    unique: bool
    partial: bool
    method: str
    valid: bool


@dataclass(frozen=True)
class Table:
    schema: str
    name: str
    kind: str  # pg_class.relkind: r (table) or p (partitioned table)
    columns: tuple[TableColumn, ...]
    indexes: tuple[TableIndex, ...]
    leaves: tuple[Table, ...]  # leaf partitions of a partitioned table
    privileges: frozenset[str]  # of SELECT, UPDATE, DELETE


@dataclass(frozen=True)
class Tables:
    tables: tuple[Table, ...]  # those of the names asked for that are tables
    others: tuple[tuple[str, str, str], ...]  # (schema, name, relkind): the other relations
    role: str  # the login that read them (whose privileges they are)


async def read_tables(fetch: Fetch, names: Iterable[tuple[str, str]]) -> Tables:
    """The relations `names` (schema, name): tables with their columns, indexes, leaf
    partitions and the login's privileges; the kind of every other relation found."""
    wanted = sorted(set(names))
    rows = await fetch(TABLES_SQL, [n[0] for n in wanted], [n[1] for n in wanted])
    role = str((await fetch(CURRENT_USER_SQL))[0][0])
    others: list[tuple[str, str, str]] = []
    tables: list[tuple[int, str, str, str, frozenset[str]]] = []
    for oid, schema, name, kind, sel, upd, dele in rows:
        if kind not in ("r", "p"):
            others.append((schema, name, kind))
            continue
        privs = frozenset(p for p, ok in (("SELECT", sel), ("UPDATE", upd), ("DELETE", dele)) if ok)
        tables.append((oid, schema, name, kind, privs))
    leaves: dict[int, list[tuple[int, str, str]]] = {}
    for oid, _schema, _name, kind, _ in tables:
        if kind == "p":
            leaves[oid] = [(r[0], r[1], r[2]) for r in await fetch(LEAVES_SQL, oid)]
    oids = [t[0] for t in tables] + [oid for ls in leaves.values() for oid, _, _ in ls]
    columns: dict[int, dict[int, tuple[str, str, int, bool]]] = {}
    for relid, attnum, attname, ftype, typid, notnull in await fetch(TABLE_COLUMNS_SQL, oids):
        columns.setdefault(relid, {})[attnum] = (attname, ftype, typid, notnull)
    base = await _base_types(fetch, {c[2] for cols in columns.values() for c in cols.values()})
    indexes: dict[int, list[TableIndex]] = {}
    for relid, iname, unique, partial, am, valid, nkey, keys in await fetch(INDEXES_SQL, oids):
        cols = columns.get(relid, {})
        key_cols = tuple(cols[k][0] if k in cols else None for k in list(keys)[:nkey])
        indexes.setdefault(relid, []).append(
            TableIndex(iname, key_cols, unique, partial, am, valid)
        )

    def table(oid: int, schema: str, name: str, kind: str, privs: frozenset[str]) -> Table:
        return Table(
            schema=schema,
            name=name,
            kind=kind,
            columns=tuple(
                TableColumn(cname, ftype, base[typid], notnull)
                for cname, ftype, typid, notnull in columns.get(oid, {}).values()
            ),
            indexes=tuple(indexes.get(oid, [])),
            leaves=tuple(table(lo, ls, ln, "r", privs) for lo, ls, ln in leaves.get(oid, [])),
            privileges=privs,
        )

    return Tables(tuple(table(*t) for t in tables), tuple(others), role)


def _may_vacuum_sql(server_major: int) -> str:
    """$1 table (SQL text, qualified) -> whether the login may VACUUM it: its owner (a
    superuser is every role's member), the database's owner (the table is not shared), and
    from PostgreSQL 17 on whoever has MAINTAIN on it."""
    maintain = " OR has_table_privilege(c.oid, 'MAINTAIN')" if server_major >= 17 else ""
    return (
        "SELECT pg_has_role(c.relowner, 'USAGE') OR (NOT c.relisshared AND "
        "pg_has_role((SELECT d.datdba FROM pg_database AS d "
        f"WHERE d.datname = current_database()), 'USAGE')){maintain} "
        "FROM pg_class AS c WHERE c.oid = $1::text::regclass"
    )


async def may_vacuum(fetch: Fetch, table: str, server_major: int) -> bool:
    """Whether the login may VACUUM `table` (the erasure worker asks first: the server only
    warns and skips a table it may not)."""
    rows = await fetch(_may_vacuum_sql(server_major), table)
    return bool(rows and rows[0][0])


async def _base_types(fetch: Fetch, oids: set[int]) -> dict[int, str]:
    """typname of each type, domains resolved to their base type."""
    names: dict[int, str] = {}
    pending = {o: o for o in oids}  # start -> current
    for _ in range(16):
        if not pending:
            break
        rows = {r[0]: r for r in await fetch(TYPES_SQL, list(set(pending.values())))}
        nxt: dict[int, int] = {}
        for start, cur in pending.items():
            _, typname, typtype, basetype = rows[cur]
            if typtype == "d":
                nxt[start] = basetype
            else:
                names[start] = typname
        pending = nxt
    for start in pending:
        names[start] = "unknown"
    return names


# primary and foreign keys of user tables, each with its column names in key order
KEYS_SQL = """
SELECT n.nspname, c.relname, con.contype::text,
       ARRAY(SELECT a.attname::text
               FROM unnest(con.conkey) WITH ORDINALITY AS k(attnum, i)
               JOIN pg_catalog.pg_attribute a
                 ON a.attrelid = con.conrelid AND a.attnum = k.attnum
              ORDER BY k.i),
       fn.nspname, f.relname,
       ARRAY(SELECT a.attname::text
               FROM unnest(con.confkey) WITH ORDINALITY AS k(attnum, i)
               JOIN pg_catalog.pg_attribute a
                 ON a.attrelid = con.confrelid AND a.attnum = k.attnum
              ORDER BY k.i)
  FROM pg_catalog.pg_constraint con
  JOIN pg_catalog.pg_class c ON c.oid = con.conrelid
  JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
  LEFT JOIN pg_catalog.pg_class f ON f.oid = con.confrelid
  LEFT JOIN pg_catalog.pg_namespace fn ON fn.oid = f.relnamespace
 WHERE con.contype IN ('p', 'f') AND NOT c.relispartition
   AND n.nspname NOT IN ('pg_catalog', 'information_schema')
   AND n.nspname NOT LIKE 'pg\\_%'
 ORDER BY n.nspname, c.relname, con.conname
"""


async def read_keys(fetch: Fetch) -> Keys:
    """Primary and foreign keys of user tables (what `rules suggest` follows)."""
    primary: dict[tuple[str, str], tuple[str, ...]] = {}
    foreign: dict[tuple[str, str], list[ForeignKey]] = {}
    for schema, table, kind, cols, fschema, ftable, fcols in await fetch(KEYS_SQL):
        if kind == "p":
            primary[(schema, table)] = tuple(cols)
        else:
            foreign.setdefault((schema, table), []).append(
                ForeignKey(tuple(cols), (fschema, ftable), tuple(fcols))
            )
    return Keys(primary, {t: tuple(fks) for t, fks in foreign.items()})
