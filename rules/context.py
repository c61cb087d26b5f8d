"""What a masked session consults: the analyser with its statement cache, the protection
map, the identifiers that are safe to show in error messages, and the startup checks.

One `MaskingContext` per (policy version, database catalog); shared by the sessions of that
database. Pure: no I/O.
"""

from __future__ import annotations

import json
from collections.abc import Mapping

from rules.analyzer import DENIED_SETTINGS, Analyzer, Decision
from rules.catalog import Catalog, ProtectionMap
from rules.masks import ColumnType, mask_json_value, py_mask
from rules.model import Policy

CACHE_SIZE = 10_000


class MaskingContext:
    def __init__(self, policy: Policy, catalog: Catalog) -> None:
        self.policy = policy
        self.catalog = catalog
        self.pmap = ProtectionMap(policy, catalog)
        self.analyzer = Analyzer(self.pmap)
        self._cache: dict[str, Decision] = {}
        self.cache_hits = 0
        self.cache_misses = 0
        names: set[str] = set()
        for (schema, rel), r in catalog.relations.items():
            names.add(schema)
            names.add(rel)
            names.update(c.name for c in r.columns)
        self.identifiers = frozenset(names)

    def analyze(self, sql: str) -> Decision:
        d = self._cache.get(sql)
        if d is not None:
            self.cache_hits += 1
            return d
        self.cache_misses += 1
        d = self.analyzer.analyze(sql)
        if len(self._cache) >= CACHE_SIZE:
            self._cache.clear()  # simple and bounded; a hot working set refills at once
        self._cache[sql] = d
        return d

    def startup_refusal(self, parameters: Mapping[str, str]) -> str | None:
        """Why a masked login may not start with these startup parameters, if it may not."""
        if parameters.get("replication", "false").lower() not in ("false", "off", "no", "0"):
            return "replication connections are not allowed for masked roles"
        for name, value in parameters.items():
            if name.lower() in DENIED_SETTINGS:
                if name.lower() == "client_encoding" and value.upper().replace("-", "") == "UTF8":
                    continue
                return f"masked roles may not set {name.lower()}"
        options = parameters.get("options", "").lower()
        for denied in DENIED_SETTINGS:
            if denied in options or denied.replace("_", "-") in options:
                return f"masked roles may not set {denied} in the startup options"
        return None

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
        from rules.model import MaskSpec

        masked = mask_json_value(doc, MaskSpec("json", keys=rule.keys), self.policy.keys)
        return json.dumps(masked, ensure_ascii=False, separators=(",", ":"))
