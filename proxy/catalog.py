"""Reads the live catalog (asyncpg, pgveil's own login) and classifies logins.

`MaskingManager.context_for(user, database)` answers None for an unmasked login and a
`MaskingContext` for a masked one. The catalog of each database is cached and re-read every
`catalog_refresh` seconds and on reload; a read that finds nothing changed keeps the
database's context (its cached decisions), a change makes a new one. When the catalog
cannot be read, the answer is a `MaskingUnavailable` error and the session is refused:
never a guess.

Whenever a catalog is read or the rules are reloaded, the rules are checked against it
(`rules.check`): each problem is logged (`rules.problem`, error level), counted in
`pgveil_rules_problems`, and closes what it must (masked logins and statements on that
database, or logins unmasked only by `roles.default`) until the rules or the database are
fixed; meanwhile that catalog is re-read every few seconds, so a fix takes effect soon.
`check_rules` runs the same check for `pgveil proxy --check-config`.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Any

import asyncpg

from proxy.config import ProxyConfig
from rules.catalog import Catalog, Column, Relation
from rules.check import Problem, check_policy
from rules.context import ContextHolder, MaskingContext
from rules.denied import SYSTEM_FUNCTIONS, SYSTEM_VIEWS
from rules.masks import ColumnType
from rules.model import Policy
from shared import dsn
from shared.logs import log

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
# while the rules do not match a database, its catalog is re-read this often (at most), so
# that sessions resume soon after the rules or the database are fixed
PROBLEM_REFRESH = 5.0
# how long a masked statement that names what the catalog read does not have waits for a
# catalog read that began after it (proxy.session.engine.AwaitCatalog); then it is refused
UNKNOWN_NAME_WAIT = 5.0


class MaskingUnavailable(Exception):
    """The catalog could not be read; the text is safe to show the client."""


class RulesMismatch(MaskingUnavailable):
    """The login is refused because the rules do not match the database (or a masked role
    of the rules does not exist); the text, `pgveil: ...`, names the rule and is safe to
    show the client: names only, never a value."""


async def read_catalog(conn: Any) -> Catalog:
    rows = await conn.fetch(RELATIONS_SQL)
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
    for r in await conn.fetch(INHERITS_SQL):
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
    for r in await conn.fetch(VIEW_SOURCES_SQL):
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
    for r in await conn.fetch(FUNCTIONS_SQL):
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
    shadowing_types = frozenset(r["typname"] for r in await conn.fetch(SHADOWING_TYPES_SQL))
    for r in await conn.fetch(OPERATORS_SQL):
        (builtin_o if r["nspname"] == "pg_catalog" else user_o).add(r["oprname"])
    definitions = {
        (r["nspname"], r["relname"]): r["definition"]
        for r in await conn.fetch(VIEW_DEFINITIONS_SQL)
        if r["definition"]
    }
    system_rows = await conn.fetch(SYSTEM_RELATIONS_SQL)
    system = frozenset(r["relname"] for r in system_rows)
    pg_catalog_relations = frozenset(
        r["relname"] for r in system_rows if r["nspname"] == "pg_catalog"
    )
    keywords = {r["word"]: r["catcode"] for r in await conn.fetch(KEYWORDS_SQL)}
    column_names = frozenset(r[0] for r in await conn.fetch(COLUMN_NAMES_SQL))
    outputs: dict[str, set[str]] = {}
    for r in await conn.fetch(FUNCTION_OUTPUTS_SQL):
        outputs.setdefault(r["proname"], set()).add(r["name"])
    version = int(await conn.fetchval("SELECT pg_catalog.current_setting('server_version_num')"))
    hidden = tuple(
        (r["what"], r["nspname"], r["proname"]) for r in await conn.fetch(HIDDEN_CODE_SQL)
    )
    table_code = tuple(
        (r["what"], r["nspname"], r["proname"]) for r in await conn.fetch(TABLE_CODE_SQL)
    )
    system_columns: dict[tuple[str, str], tuple[tuple[str, str], ...]] = {}
    for r in await conn.fetch(SYSTEM_COLUMNS_SQL, sorted(SYSTEM_VIEWS)):
        view = SYSTEM_VIEWS[r["relname"]]
        if (r["nspname"] == "pg_catalog") != (view.extension == "") or (
            view.extension and r["extname"] != view.extension
        ):
            continue  # another extension's relation of that name: refused by name
        found = (r["nspname"], r["relname"])
        system_columns[found] = (*system_columns.get(found, ()), (r["attname"], r["typ"]))
    function_columns: dict[str, tuple[tuple[str, str], ...]] = {}
    for r in await conn.fetch(FUNCTION_COLUMNS_SQL, sorted(SYSTEM_FUNCTIONS)):
        name = r["proname"]
        function_columns[name] = (*function_columns.get(name, ()), (r["name"], r["typ"]))
    relation_names = frozenset(
        (r["nspname"], r["relname"]) for r in await conn.fetch(RELATION_NAMES_SQL)
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
    )


async def read_role_names(conn: Any) -> frozenset[str]:
    """Every role of the cluster: what the rules' role lists are checked against."""
    return frozenset(r["rolname"] for r in await conn.fetch(ROLE_NAMES_SQL))


@dataclass
class _Database:
    holder: ContextHolder
    loaded: float
    role_names: frozenset[str]
    roles: dict[str, frozenset[str]] = field(default_factory=dict)
    # the problems last logged, and when (see MaskingManager._report)
    reported: tuple[Problem, ...] = ()
    reported_at: float = 0.0


class MaskingManager:
    def __init__(self, config: ProxyConfig, policy: Policy) -> None:
        self.config = config
        self.policy = policy
        self._dbs: dict[str, _Database] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        # logins refused because the rules do not match, per database (a counter)
        self.refused: dict[str, int] = {}
        self._preload = True  # read the catalogs of the rules' `databases` without waiting
        self._read_done = asyncio.Condition()  # notified whenever a catalog read ends

    def reload(self, config: ProxyConfig, policy: Policy) -> None:
        """New rules apply at once, to open sessions too (they hold the holders), and are
        checked against each catalog read so far."""
        self.config = config
        self.policy = policy
        for name, db in self._dbs.items():
            old = db.holder.context
            db.holder.context = MaskingContext(
                policy, old.catalog, roles=db.role_names, database=name
            )
            db.roles.clear()  # classification depends on the rules
            self._report(name, db, always=True)
        self._preload = True

    def contexts(self) -> list[MaskingContext]:
        return [d.holder.context for d in self._dbs.values()]

    def problems(self) -> dict[str, int]:
        """Per database read so far: how many problems of the rules close something."""
        return {
            name: sum(1 for p in db.holder.context.problems if p.effect != "none")
            for name, db in self._dbs.items()
        }

    def _interval(self, db: _Database) -> float:
        refresh = self.config.catalog_refresh
        if any(p.effect != "none" for p in db.holder.context.problems):
            return min(refresh, PROBLEM_REFRESH)
        return refresh

    async def await_read(self, holder: ContextHolder, read: int, timeout: float) -> bool:
        """Wait until `holder` has the result of its catalog read number `read` (asking
        for it), at most `timeout` seconds; whether it has. Reads are made by
        `refresh_forever`, at most one per tick and database, whoever asks."""
        holder.stale = True
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        async with self._read_done:
            while holder.reads_done < read:
                remaining = deadline - loop.time()
                if remaining <= 0:
                    return False
                try:
                    await asyncio.wait_for(self._read_done.wait(), remaining)
                except TimeoutError:
                    return holder.reads_done >= read
        return True

    async def _read_ended(self) -> None:
        async with self._read_done:
            self._read_done.notify_all()

    async def refresh_forever(self, tick: float = 0.5) -> None:
        """Re-read each database's catalog every catalog_refresh seconds, or at once when a
        session met a relation the catalog does not know. Open sessions see the result.
        The databases the rules name (`databases`) are read at start and after a reload,
        so their problems are reported before anyone logs in."""
        while True:
            if self._preload:
                self._preload = False
                for name in self.policy.databases or ():
                    if name not in self._dbs:
                        try:
                            await self._load(name, None)
                        except MaskingUnavailable as exc:
                            log.error("catalog.read_failed", database=name, error=str(exc))
            await asyncio.sleep(tick)
            for name, db in list(self._dbs.items()):
                due = time.monotonic() - db.loaded >= self._interval(db)
                if due or db.holder.stale:
                    try:
                        await self._load(name, db)
                    except MaskingUnavailable as exc:
                        log.error("catalog.refresh_failed", database=name, error=str(exc))
                        db.loaded = time.monotonic()  # keep the last good one; retry later

    async def _connect(self, database: str) -> Any:
        """pgveil's own login to `database`, opened as libpq would (shared.dsn): the
        upstream, catalog user and TLS settings, else the PG* environment, and the password
        file when no password is given. The text of the error is safe to show a client
        (the database and the kind of failure); its cause has the details."""
        c = self.config
        assert c.server is not None, "load_config resolves the server connection"
        try:
            return await dsn.connect(
                c.server,
                dbname=database,
                fallback_application_name="pgveil-catalog",
                timeout=c.connect_timeout,
            )
        except (dsn.ConnectError, dsn.DsnError) as exc:
            kind = type(exc.__cause__ or exc).__name__
            raise MaskingUnavailable(
                f"pgveil cannot read the catalog of database {database} ({kind})"
            ) from exc

    async def _database(self, database: str) -> _Database:
        db = self._dbs.get(database)
        if db is not None and time.monotonic() - db.loaded < self._interval(db):
            return db
        return await self._load(database, db)

    async def _read(self, database: str) -> tuple[Catalog, frozenset[str]]:
        conn = await self._connect(database)
        try:
            return await read_catalog(conn), await read_role_names(conn)
        except asyncpg.PostgresError as exc:
            raise MaskingUnavailable(
                f"pgveil cannot read the catalog ({type(exc).__name__})"
            ) from exc
        finally:
            await conn.close()

    async def _load(self, database: str, db: _Database | None) -> _Database:
        lock = self._locks.setdefault(database, asyncio.Lock())
        async with lock:
            current = self._dbs.get(database)
            if (
                current is not None
                and current is not db
                and time.monotonic() - current.loaded < self._interval(current)
            ):
                return current
            number = 0
            stale = False
            if current is not None:
                # a request for a read made from now on is one this read may not answer
                stale, current.holder.stale = current.holder.stale, False
                current.holder.reads_begun += 1
                number = current.holder.reads_begun
            try:
                catalog, role_names = await self._read(database)
            except MaskingUnavailable:
                if current is not None and stale:
                    current.holder.stale = True  # (asked for still)
                await self._read_ended()
                raise
            old = current.holder.context if current is not None else None
            if (
                old is not None
                and current is not None
                and old.policy is self.policy
                and current.role_names == role_names
                and old.catalog == catalog
            ):
                # nothing it is made of changed: the context stays, with its cached
                # decisions (and what open sessions prepared needs no second look)
                context = old
            else:
                context = MaskingContext(
                    self.policy,
                    catalog,
                    old.pmap if old is not None else None,
                    roles=role_names,
                    database=database,
                )
                for warning in context.pmap.drift:
                    log.warning("rules.drift", database=database, detail=warning)
            if current is None:
                current = _Database(ContextHolder(context), time.monotonic(), role_names)
                self._dbs[database] = current
            else:
                current.holder.context = context
                current.holder.reads_done = max(current.holder.reads_done, number)
                current.loaded = time.monotonic()
                current.role_names = role_names
                current.roles.clear()
            log.info("catalog.loaded", database=database, relations=len(catalog.relations))
            self._report(database, current)
            await self._read_ended()
            return current

    def _report(self, database: str, db: _Database, always: bool = False) -> None:
        """A loud line per problem (what it closes in `closes`), when the rules are checked
        against a catalog: after a reload, whenever the problems change, and otherwise at
        most every catalog_refresh seconds (a broken catalog is re-read more often). Names
        the rule and what is missing, never a value."""
        context = db.holder.context
        now = time.monotonic()
        same = not always and context.problems == db.reported
        if same and (not context.problems or now - db.reported_at < self.config.catalog_refresh):
            return
        if db.reported and not context.problems:
            log.info("rules.matched", database=database, detail="the rules match the database")
        db.reported, db.reported_at = context.problems, now
        closes = {
            "masked": "masked sessions on this database",
            "default": "logins unmasked only by roles.default"
            if context.policy.default == "unmasked"
            else "nothing (roles.default is masked)",
            "none": "nothing",
        }
        for p in context.problems:
            report = log.warning if p.effect == "none" else log.error
            report(
                "rules.problem",
                database=database,
                rule=p.path,
                problem=p.message,
                closes=closes[p.effect],
            )

    async def roles_of(self, user: str, database: str) -> frozenset[str]:
        db = await self._database(database)
        roles = db.roles.get(user)
        if roles is None:
            conn = await self._connect(database)
            try:
                rows = await conn.fetch(ROLES_SQL, user)
            finally:
                await conn.close()
            roles = frozenset(r["rolname"] for r in rows) | {user}
            db.roles[user] = roles
        return roles

    async def holder_for(self, database: str) -> ContextHolder:
        return (await self._database(database)).holder

    async def context_for(self, user: str, database: str) -> ContextHolder | None:
        """None for an unmasked login, the database's holder for a masked one; a
        `RulesMismatch` when the login may not start while the rules do not match."""
        return (await self.admit(user, database))[0]

    async def admit(self, user: str, database: str) -> tuple[ContextHolder | None, frozenset[str]]:
        """`context_for`, and the roles the login was classified with (the session keeps
        them: a rules reload classifies it again with them, see `reclassification`)."""
        roles = await self.roles_of(user, database)
        holder = (await self._database(database)).holder
        classification, refusal = holder.context.admission(roles)
        if refusal is not None:
            self.refused[database] = self.refused.get(database, 0) + 1
            raise RulesMismatch(f"pgveil: {refusal}")
        return (None if classification == "unmasked" else holder), roles

    def reclassification(self, roles: frozenset[str], database: str, masked: bool) -> str | None:
        """Why an open session, masked or not at its login (with these roles), must end
        under the rules in force, or None: they classify it otherwise, or they refuse an
        unmasked login (see MaskingContext.admission). A masked session whose database the
        rules do not match goes on: its statements are refused until they do."""
        db = self._dbs.get(database)
        if db is None:
            return "its database's catalog is not read"
        classification, refusal = db.holder.context.admission(roles)
        if (classification == "masked") != masked:
            return f"the session's role is now {classification}"
        if not masked and refusal is not None:
            return f"the login is now refused: {refusal}"
        return None


async def check_rules(
    config: ProxyConfig, policy: Policy
) -> tuple[list[str], list[tuple[str, Problem]]]:
    """The rules checked against the databases they are for, read as the catalog user
    (what `pgveil proxy --check-config` reports): the databases under `databases`, or
    else every database that user may connect to (the rules are then for all of them).
    Answers the databases checked and the problems, each with its database; the roles'
    problems (the same in every database) come once, with the first database. Raises
    MaskingUnavailable when a catalog cannot be read."""
    manager = MaskingManager(config, policy)
    names = list(policy.databases) if policy.databases is not None else None
    if names is None:
        names = await _connectable(manager)
    out: list[tuple[str, Problem]] = []
    roles_done = False
    for name in names:
        catalog, role_names = await manager._read(name)
        for p in check_policy(policy, catalog, None if roles_done else role_names, name):
            out.append((name, p))
        roles_done = True
    return names, out


async def _connectable(manager: MaskingManager) -> list[str]:
    """The databases the catalog user may connect to, asked of the first of `postgres`
    and `template1` it can log in to (as libpq's tools do)."""
    failure: MaskingUnavailable | None = None
    for maintenance in ("postgres", "template1"):
        try:
            conn = await manager._connect(maintenance)
        except MaskingUnavailable as exc:
            failure = failure or exc
            continue
        try:
            return [r["datname"] for r in await conn.fetch(DATABASES_SQL)]
        finally:
            await conn.close()
    assert failure is not None
    raise failure
