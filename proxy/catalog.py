"""Reads the live catalog (asyncpg, pgveil's own login, through rules.catalog_read) and
classifies logins.

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
from rules.catalog import Catalog
from rules.catalog_read import (
    read_catalog,
    read_databases,
    read_role_names,
    read_roles,
    read_temp_names,
)
from rules.check import Problem, check_policy
from rules.context import ContextHolder, MaskingContext
from rules.model import Policy
from rules.shapes import CacheCounts
from shared import dsn
from shared.logs import log

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
    def __init__(
        self,
        config: ProxyConfig,
        policy: Policy,
        cache_counts: CacheCounts | None = None,
        refused: dict[str, int] | None = None,
    ) -> None:
        """`cache_counts` and `refused` are counters for the metrics, given by the server
        so that they outlive this manager and the contexts it makes (a reload replaces
        them; a counter never goes down while the process lives)."""
        self.config = config
        self.policy = policy
        self._dbs: dict[str, _Database] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        # every context's decision cache counts its lookups here
        self.cache_counts = cache_counts if cache_counts is not None else CacheCounts()
        # logins refused because the rules do not match, per database
        self.refused: dict[str, int] = refused if refused is not None else {}
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
                policy, old.catalog, roles=db.role_names, database=name, counts=self.cache_counts
            )
            db.roles.clear()  # classification depends on the rules
            self._report(name, db, always=True)
        self._preload = True

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

    async def _read(self, database: str) -> tuple[Catalog, frozenset[str], frozenset[str]]:
        """The catalog, the cluster's role names and the names of the database's temporary
        relations (not part of the catalog: they change with every session that makes one,
        and would replace the context, with its cached decisions, at each read)."""
        conn = await self._connect(database)
        try:
            return (
                await read_catalog(conn.fetch),
                await read_role_names(conn.fetch),
                await read_temp_names(conn.fetch),
            )
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
                catalog, role_names, temp_names = await self._read(database)
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
                    counts=self.cache_counts,
                )
                for warning in context.pmap.drift:
                    log.warning("rules.drift", database=database, detail=warning)
            if current is None:
                current = _Database(ContextHolder(context), time.monotonic(), role_names)
                current.holder.temp_names = temp_names
                self._dbs[database] = current
            else:
                current.holder.context = context
                current.holder.temp_names = temp_names
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
                roles = await read_roles(conn.fetch, user)
            finally:
                await conn.close()
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
        catalog, role_names, _temp = await manager._read(name)
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
            return await read_databases(conn.fetch)
        finally:
            await conn.close()
    assert failure is not None
    raise failure
