"""What a masked session consults: the analyser with its decision cache, the protection
map, the identifiers that are safe to show in error messages, whether a login may start, and
what a notification's payload may show.

One `MaskingContext` per (policy version, database catalog); shared by the sessions of that
database. It also holds the rules checked against that catalog (`rules.check`): while they
do not match, masked logins and every statement of a masked session are refused
(`rules.admission`). The context puts these together; the decision cache and statement
shapes are in `rules.shapes`, the checks of a login's startup packet in `rules.startup`.
Pure: no I/O.
"""

from __future__ import annotations

import json
from collections.abc import Collection, Sequence

from rules.admission import admission, default_refusal, rules_refusal
from rules.analyzer import Analyzer
from rules.catalog import Catalog, ProtectionMap
from rules.check import check_policy
from rules.masks import ColumnType, mask_json_value, py_mask
from rules.model import Classification, MaskSpec, Policy
from rules.shapes import CacheCounts, DecisionCache
from rules.startup import masked_refusal


class ContextHolder:
    """The current MaskingContext of a database. Sessions keep the holder, not the
    context, so a catalog refresh or a rules reload reaches sessions that are already open.
    `stale` asks the shell for an early refresh (a statement named an unknown relation).

    The audit also asks when relation names may no longer denote what the catalog read
    says: a statement that creates or replaces a view, renames, moves or drops relations,
    or runs code that may (a DO block, a procedure or function, or code attached to a
    relation, that may run DDL: rules.code; a CALL of a procedure that only reads and
    writes rows does not) went to the server. Until a catalog read that began after its
    transaction ended is in (`unsure`), every session's statements that name relations are
    recorded as uncertain. The shell counts the reads (`reads_begun`, and `reads_done`: the
    latest one whose result is in `context`). `temp_names`: the names of the relations in
    the database's temporary schemas at the latest read (which the catalog leaves out): a
    session that ran such code may have made one that its unqualified names find first."""

    def __init__(self, context: MaskingContext) -> None:
        self.context = context
        self.stale = False
        self.reads_begun = 0
        self.reads_done = 0
        self.moved_until = 0  # the read that must be in before names are certain again
        self.temp_names: frozenset[str] = frozenset()

    @property
    def unsure(self) -> bool:
        """Whether names may denote what the current catalog does not say (see above)."""
        return self.reads_done < self.moved_until

    def names_moving(self) -> None:
        """A statement that may move names is on its way to the server: unsure until a
        read that begins from now on is in; the session calls `names_moved` once the
        statement's transaction has ended (a read that began before that may not show
        what it did)."""
        self.moved_until = max(self.moved_until, self.reads_begun + 1)
        self.stale = True

    def names_moved(self) -> None:
        """The transaction of a statement that may have moved names ended: unsure until a
        read that begins from now on is in."""
        self.moved_until = max(self.moved_until, self.reads_begun + 1)
        self.stale = True

    @classmethod
    def of(cls, ctx: MaskingContext | ContextHolder) -> ContextHolder:
        return ctx if isinstance(ctx, ContextHolder) else cls(ctx)


class MaskingContext:
    def __init__(
        self,
        policy: Policy,
        catalog: Catalog,
        previous: ProtectionMap | None = None,
        *,
        roles: Collection[str] | None = None,
        database: str | None = None,
        counts: CacheCounts | None = None,
    ) -> None:
        """`roles`: every role name of the cluster (checked against the rules' roles when
        given); `database`: the database `catalog` was read from; `counts`: where the
        decision cache counts its lookups (the proxy's, shared by every context it makes,
        so that the metric outlives this context; its own when not given)."""
        self.policy = policy
        self.catalog = catalog
        self.database = database
        self.pmap = ProtectionMap(policy, catalog, previous)
        # the rules checked against this catalog: while a problem closes masked sessions,
        # every statement of a masked session is refused (open sessions too: they hold the
        # holder, which gets this context), never analysed against rules that protect less
        # than they say
        self.problems = check_policy(policy, catalog, roles, database)
        self.refusal = rules_refusal(policy, self.problems, database)
        self.default_refusal = default_refusal(policy, self.problems)
        self.analyzer = Analyzer(self.pmap)
        self.decisions = DecisionCache(self.analyzer, self.refusal, counts)
        # the decision for a statement text (DecisionCache.analyze): the cache's own method,
        # so that a session's call per statement goes through no layer of the context's
        self.analyze = self.decisions.analyze
        names: set[str] = set()
        for (schema, rel), r in catalog.relations.items():
            names.add(schema)
            names.add(rel)
            names.update(c.name for c in r.columns)
        self.identifiers = frozenset(names)

    @property
    def cache_hits(self) -> int:
        return self.decisions.counts.hits

    @property
    def cache_misses(self) -> int:
        return self.decisions.counts.misses

    def admission(self, roles: frozenset[str]) -> tuple[Classification, str | None]:
        """How a login is classified (`roles`: itself and every role it belongs to,
        transitively), and why it may not log in on this database, if it may not (see
        rules.admission)."""
        return admission(self.policy, roles, self.refusal, self.default_refusal)

    def startup_refusal(self, parameters: Sequence[tuple[str, str]]) -> str | None:
        """Why a masked login may not start with these startup parameters (the packet's
        key/value pairs, in order), if it may not: each setting is judged as the same
        setting made with SET (see rules.startup)."""
        return masked_refusal(parameters, self._set_refusal)

    def _set_refusal(self, sql: str) -> str | None:
        d = self.analyzer.analyze(sql)
        return (d.reason or "refused") if d.action == "refuse" else None

    def notification_payload(self, channel: str, payload: str) -> str | None:
        """The payload a masked session may see, or None to withhold the notification."""
        rule = self.policy.channels.get(channel)
        if rule is None:
            return None
        if rule.payload == "text":
            assert rule.mask is not None
            return py_mask(rule.mask, payload, ColumnType("text", "text"), self.policy.keys)
        try:
            doc = json.loads(payload)
        except ValueError:
            return None
        masked = mask_json_value(doc, MaskSpec("json", keys=rule.keys), self.policy.keys)
        return json.dumps(masked, ensure_ascii=False, separators=(",", ":"))
