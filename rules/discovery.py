"""Checks a policy against a catalog, and finds columns that look personal.

Pure: takes the catalog and value samples already read by the caller. Findings name
tables, columns, masks and value *categories*; they never quote a sampled value.
"""

from __future__ import annotations

import re
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass

from rules.catalog import Catalog, ProtectionMap, Relation
from rules.check import check_policy
from rules.masks import SUPPORTED, fits
from rules.model import MaskSpec, Policy


@dataclass(frozen=True, order=True)
class Finding:
    level: str  # "error" or "warning"
    where: str  # the rule's key path (tables.schema.table...), or schema.table[.column]
    message: str

    def __str__(self) -> str:
        return f"{self.level}: {self.where}: {self.message}"


_PARTIAL = MaskSpec("partial")
_KEEP_2 = MaskSpec("partial", keep_first=1, keep_last=2)
_LAST_4 = MaskSpec("digits", keep_last=4)


def _p(pattern: str, flags: int = 0) -> re.Pattern[str]:
    return re.compile(pattern, flags)


# column-name patterns -> (category, suggested mask)
_NAME_PATTERNS: list[tuple[re.Pattern[str], str, MaskSpec]] = [
    (_p(r"e_?mail"), "e-mail", MaskSpec("email")),
    (_p(r"phone|mobile|fax|msisdn|^cli$|^cld$|_cli$|_cld$"), "phone number", _KEEP_2),
    (_p(r"card|^cc_|pan$|iban|account_number"), "card or account number", _LAST_4),
    (_p(r"pass(word)?|secret|pin$|token|api_key|credential"), "credential", MaskSpec("deny")),
    (_p(r"imsi|imei|iccid"), "SIM or device identifier", _KEEP_2),
    (_p(r"(^|_)ip(_|$)|ip_?addr|^ip$"), "IP address", _PARTIAL),
    (_p(r"mac(_?addr)?$"), "MAC address", _PARTIAL),
    (_p(r"(first|last|middle|full|maiden|company|contact|person|user)_?name|^name$|surname"),
     "name", _PARTIAL),
    (_p(r"address|street|city|zip|postal|postcode|country"), "postal address", _PARTIAL),
    (_p(r"birth|dob$|ssn|passport|national_id|tax_id|vat"), "personal identifier", _PARTIAL),
    (_p(r"login|username"), "login", _PARTIAL),
]  # fmt: skip

_VALUE_PATTERNS: list[tuple[re.Pattern[str], str, MaskSpec]] = [
    (_p(r"^[^@\s]+@[^@\s]+\.[a-z]{2,}$", re.I), "e-mail", MaskSpec("email")),
    (_p(r"^\+?[0-9][0-9 ()-]{6,18}[0-9]$"), "phone number", _KEEP_2),
    (_p(r"^([0-9]{1,3}\.){3}[0-9]{1,3}(/[0-9]+)?$"), "IP address", _PARTIAL),
    (_p(r"^([0-9a-f]{2}[:-]){5}[0-9a-f]{2}$", re.I), "MAC address", _PARTIAL),
]  # fmt: skip

_TYPE_CATEGORIES = {
    "inet": "IP address",
    "cidr": "IP address",
    "macaddr": "MAC address",
    "macaddr8": "MAC address",
}


def _luhn(digits: str) -> bool:
    total = 0
    for i, d in enumerate(reversed(digits)):
        n = int(d)
        if i % 2:
            n = n * 2 - 9 if n > 4 else n * 2
        total += n
    return total % 10 == 0


def value_category(values: Iterable[str]) -> tuple[str, MaskSpec] | None:
    """The category most sampled values fall in (at least 60% of the non-empty ones)."""
    vals = [v.strip() for v in values if v and v.strip()]
    if len(vals) < 3:
        return None
    counts: dict[str, tuple[int, MaskSpec]] = {}
    for v in vals:
        digits = re.sub(r"[ -]", "", v)
        if digits.isdigit() and 13 <= len(digits) <= 19 and _luhn(digits):
            n, _ = counts.get("card number", (0, MaskSpec("digits", keep_last=4)))
            counts["card number"] = (n + 1, MaskSpec("digits", keep_last=4))
            continue
        for pattern, category, spec in _VALUE_PATTERNS:
            if pattern.match(v):
                n, _ = counts.get(category, (0, spec))
                counts[category] = (n + 1, spec)
                break
    if not counts:
        return None
    category, (n, spec) = max(counts.items(), key=lambda kv: kv[1][0])
    return (category, spec) if n >= 0.6 * len(vals) else None


def discover(
    catalog: Catalog, samples: Mapping[tuple[str, str, str], list[str]]
) -> dict[tuple[str, str, str], tuple[str, MaskSpec]]:
    """(schema, table, column) -> (category, suggested mask) for columns that look personal."""
    out: dict[tuple[str, str, str], tuple[str, MaskSpec]] = {}
    for (schema, table), rel in catalog.relations.items():
        if rel.kind not in ("r", "p", "f", "m"):
            continue
        for col in rel.columns:
            key = (schema, table, col.name)
            lname = col.name.lower()
            if col.type.name in _TYPE_CATEGORIES:
                out[key] = (_TYPE_CATEGORIES[col.type.name], MaskSpec("partial"))
                continue
            if col.type.family not in ("text", "int"):
                continue
            found = value_category(samples.get(key, ()))
            if found is not None:
                out[key] = found
                continue
            if col.type.family == "text":
                for pattern, category, spec in _NAME_PATTERNS:
                    if pattern.search(lname):
                        out[key] = (category, spec)
                        break
    return out


def check(
    policy: Policy,
    catalog: Catalog,
    samples: Mapping[tuple[str, str, str], list[str]] | None = None,
    roles: Collection[str] | None = None,
    database: str | None = None,
) -> list[Finding]:
    """What `pgveil rules check --dsn` reports: the problems the proxy refuses on (from
    `rules.check`, the same check), masks that do not fit their column's type, views over
    protected tables, and columns that look personal but have no rule."""
    findings = [
        Finding(p.level, p.path, p.message) for p in check_policy(policy, catalog, roles, database)
    ]
    if database is not None and not policy.covers(database):
        findings.append(
            Finding(
                "warning",
                "databases",
                f"database {database} is not listed: the rules are not for it, and pgveil "
                "refuses masked roles on it",
            )
        )
    pmap = ProtectionMap(policy, catalog)
    for (schema, table), rule in policy.tables.items():
        rel = catalog.relations.get((schema, table))
        if rel is None:
            continue
        for col, spec in rule.columns.items():
            c = rel.column(col)
            if c is not None and not fits(spec, c.type.name):
                allowed = ", ".join(sorted(SUPPORTED[spec.name] - {"other"}))
                findings.append(
                    Finding(
                        "error",
                        f"tables.{rule.qualified}.columns.{col}",
                        f"mask {spec.name} does not fit type {c.type.formatted} "
                        f"(it fits: {allowed}); masked roles would get NULL",
                    )
                )
    for (schema, view), sources in catalog.view_sources.items():
        rel = catalog.relations.get((schema, view))
        if rel is None or (schema, view) in policy.tables:
            continue
        if (schema, view) in pmap.derived_views:
            masked = ", ".join(sorted(pmap.derived_views[(schema, view)])) or "none"
            findings.append(
                Finding(
                    "info", f"{schema}.{view}", f"masked from its definition (columns: {masked})"
                )
            )
            continue
        protected = [f"{s}.{t}" for s, t in sources if pmap.lookup(s, t)]
        if protected:
            kind = "materialized view" if rel.kind == "m" else "view"
            findings.append(
                Finding(
                    "warning",
                    f"{schema}.{view}",
                    f"{kind} reads protected {', '.join(protected)} and has no rules of its own: "
                    "masked roles are refused; add rules for it",
                )
            )
    for (schema, table, col), (category, _spec) in sorted(discover(catalog, samples or {}).items()):
        p = pmap.by_name.get((schema, table))
        if p is not None and col in p.masks:
            continue
        findings.append(
            Finding("warning", f"{schema}.{table}.{col}", f"looks like {category} but has no rule")
        )
    return sorted(findings)


def suggest(catalog: Catalog, samples: Mapping[tuple[str, str, str], list[str]]) -> str:
    """A draft rules file (YAML text) from discovery."""
    found = discover(catalog, samples)
    by_table: dict[tuple[str, str], list[tuple[str, str, MaskSpec]]] = {}
    for (schema, table, col), (category, spec) in sorted(found.items()):
        by_table.setdefault((schema, table), []).append((col, category, spec))
    lines = [
        "# Draft pgveil rules from `pgveil rules suggest`: review every line before use.",
        "roles:",
        "  unmasked: []        # roles that see everything",
        "  masked: []          # roles that see masked data",
        "  default: masked",
        "tables:",
    ]
    if not by_table:
        lines.append("  {}  # nothing looked personal")
    for (schema, table), cols in by_table.items():
        rel: Relation = catalog.relations[(schema, table)]
        lines.append(f"  {schema}.{table}:")
        key = _guess_subject(rel)
        if key:
            lines.append(f"    subject: {key}")
        lines.append("    columns:")
        for col, category, spec in cols:
            lines.append(f"      {col}: {_spec_yaml(spec)}  # {category}")
    return "\n".join(lines) + "\n"


def _guess_subject(rel: Relation) -> str | None:
    for c in rel.columns:
        if c.attnum == 1 and c.type.family in ("int", "uuid"):
            return c.name
    return None


def _spec_yaml(spec: MaskSpec) -> str:
    if spec.name == "partial" and (spec.keep_first, spec.keep_last) != (1, 1):
        return f"{{mask: partial, keep_first: {spec.keep_first}, keep_last: {spec.keep_last}}}"
    if spec.name == "digits":
        return f"{{mask: digits, keep_last: {spec.keep_last}}}"
    return spec.name
