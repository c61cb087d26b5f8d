"""Checks a policy against a catalog, and finds columns that look personal.

Pure: takes the catalog and value samples already read by the caller. Findings name
tables, columns, masks and value *categories*; they never quote a sampled value.
"""

from __future__ import annotations

import json
import re
from collections import deque
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from rules.catalog import Catalog, ProtectionMap, Relation
from rules.check import check_policy
from rules.masks import SUPPORTED, ColumnType, fits, py_mask
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
_CARD = MaskSpec("digits", keep_last=4)  # PCI DSS: at most the last four digits show
_ACCOUNT = MaskSpec("partial", keep_first=2, keep_last=4)
_BIRTH_DATE = MaskSpec("date", truncate="year")
_BIRTH_TEXT = MaskSpec("partial", keep_first=4, keep_last=0)  # '1970-**-**': the year
# an address's first octet (or group) only: keeping the last one too would show an address
# whose middle is zeros (10.0.0.2) whole
_ADDRESS = MaskSpec("partial", keep_first=1, keep_last=0)
_REDACT = MaskSpec("redact")
_DENY = MaskSpec("deny")


def _p(pattern: str, flags: int = 0) -> re.Pattern[str]:
    return re.compile(pattern, flags)


# column-name patterns -> (category, suggested mask), the most specific first: a card
# holder is a name (never `digits`, which shows a name whole), a card number is not a phone.
# Short words match whole words of the name only (`_`-separated, digits after them allowed):
# `i_phonebook` is no phone number, `voicemail` no e-mail, `capacity` no city, `classname`
# no social security number, `private` no VAT number, `hmac` no MAC address.
_W = r"(?:^|_)(?:{})(?:\d*$|_)"


def _words(*words: str) -> str:
    return _W.format("|".join(words))


_NAME_PATTERNS: list[tuple[re.Pattern[str], str, MaskSpec]] = [
    (_p(r"card_?holder|holder_?name|name_on_card"), "name", _PARTIAL),
    (_p(r"passw(or)?d|pass_?phrase|secret|api_?key|credential|totp|otp_?seed|"
        + _words("pass", "pwd", "pin", "token")), "credential", _DENY),
    (_p(_words("e_?mails?", "email_?addr(ess)?")), "e-mail", MaskSpec("email")),
    (_p(r"card_?(number|num|no)$|credit_?card|^(cc|pan)$|^cc_?(number|num|no)$|_pan$"),
     "card number", _CARD),
    (_p(r"iban|bank_?account|account_?(number|num|no)$|swift|" + _words("bic")),
     "bank account", _ACCOUNT),
    (_p(_words("phone", "telephone", "tel", "mobile", "cell", "cellphone", "fax", "msisdn",
               "cli", "cld", "caller", "callee") + r"|calling_?(number|party)|"
        r"called_?(number|party)|phone_?(number|no)"), "phone number", _KEEP_2),
    (_p(_words("imsi", "imei", "iccid")), "SIM or device identifier", _KEEP_2),
    (_p(_words("ip", "ip_?addr(ess)?", "ipv[46]")), "IP address", _ADDRESS),
    (_p(_words("mac", "mac_?addr(ess)?")), "MAC address", _ADDRESS),
    (_p(r"birth|" + _words("dob")), "date of birth", _BIRTH_TEXT),
    (_p(r"login|user_?name"), "login", _PARTIAL),
    (_p(r"(first|last|middle|full|maiden|company|contact|person|given|family)_?name|"
        r"surname|contact_?person|" + _words("name", "holder")), "name", _PARTIAL),
    (_p(r"address|" + _words("street", "city", "zip", "zip_?code", "postal", "post_?code",
                             "postcode", "country", "town")), "postal address", _PARTIAL),
    (_p(r"passport|national_?id|tax_?id|social_?security|driv(er|ing)_?licen[cs]e|"
        r"id_?card|vat_?(id|no|number)|" + _words("ssn", "vat", "dl")),
     "personal identifier", _PARTIAL),
    (_p(_words("notes?", "comments?", "remarks?", "memo", "transcript")), "free text",
     _REDACT),
]  # fmt: skip

# binary columns by name: recordings, pictures, documents
_BINARY_NAMES = _p(
    r"audio|voice|recording|photo|picture|image|avatar|scan|pdf|document|attachment|"
    r"signature|fingerprint|biometric"
)

# a table of payment cards: its bare `number` column is the card number
_CARD_TABLE = _p(r"card")
_CARD_NUMBER_IN_CARD_TABLE = _p(r"^(number|num|no|pan)$")

_VALUE_PATTERNS: list[tuple[re.Pattern[str], str, MaskSpec]] = [
    (_p(r"^[^@\s]+@[^@\s]+\.[a-z]{2,}$", re.I), "e-mail", MaskSpec("email")),
    (_p(r"^\+?[0-9][0-9 ()-]{6,18}[0-9]$"), "phone number", _KEEP_2),
    (_p(r"^([0-9]{1,3}\.){3}[0-9]{1,3}(/[0-9]+)?$"), "IP address", _ADDRESS),
    (_p(r"^([0-9a-f]{2}[:-]){5}[0-9a-f]{2}$", re.I), "MAC address", _ADDRESS),
]  # fmt: skip

_TYPE_CATEGORIES = {
    "inet": "IP address",
    "cidr": "IP address",
    "macaddr": "MAC address",
    "macaddr8": "MAC address",
}

# a JSON key is a field name of the documents (not data) when it looks like an identifier
# and most sampled documents have it; only such keys are ever printed
_JSON_KEY = _p(r"^[A-Za-z_][A-Za-z0-9_]{0,62}$")
JSON_KEY_SHARE = 0.5


def _luhn(digits: str) -> bool:
    total = 0
    for i, d in enumerate(reversed(digits)):
        n = int(d)
        if i % 2:
            n = n * 2 - 9 if n > 4 else n * 2
        total += n
    return total % 10 == 0


def _card_digits(value: str) -> str | None:
    """The digits of a value written like a card number: 13-19 digits, grouped by spaces or
    dashes at most, no leading '+' (a phone number's)."""
    digits = re.sub(r"[ -]", "", value)
    if digits.isdigit() and 13 <= len(digits) <= 19 and not value.startswith("+"):
        return digits
    return None


def value_category(values: Iterable[str]) -> tuple[str, MaskSpec] | None:
    """The category most sampled values fall in (at least 60% of the non-empty ones).
    Card numbers: written like one and passing the Luhn check, or of 16 to 19 digits
    (longer than any phone number: E.164 allows 15)."""
    vals = [v.strip() for v in values if v and v.strip()]
    if len(vals) < 3:
        return None
    counts: dict[str, tuple[int, MaskSpec]] = {}
    for v in vals:
        digits = _card_digits(v)
        if digits is not None and (_luhn(digits) or len(digits) >= 16):
            n, _ = counts.get("card number", (0, _CARD))
            counts["card number"] = (n + 1, _CARD)
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


def name_category(name: str, table: str = "") -> tuple[str, MaskSpec] | None:
    """The category a column (or JSON key) name says, in the context of its table."""
    lname = name.lower()
    if _CARD_TABLE.search(table.lower()) and _CARD_NUMBER_IN_CARD_TABLE.match(lname):
        return "card number", _CARD
    for pattern, category, spec in _NAME_PATTERNS:
        if pattern.search(lname):
            return category, spec
    return None


def hides(spec: MaskSpec, type_name: str, value: str) -> bool:
    """Whether the mask changes this value (the Python form of the mask, on its text).
    `digits` leaves a value without digits whole, `partial` a value that is all `char`."""
    try:
        out = py_mask(spec, value, ColumnType(type_name, type_name), {})
    except (ValueError, KeyError):
        return False
    return out is None or out != value


def _hiding(spec: MaskSpec, type_name: str, values: Iterable[str]) -> MaskSpec:
    """`spec`, or a stronger mask when it would show a sampled value whole."""
    vals = [v for v in values if v]
    for candidate in (spec, _PARTIAL, _REDACT, _DENY):
        if not fits(candidate, type_name):
            continue
        if all(hides(candidate, type_name, v) for v in vals):
            return candidate
    return _DENY


def _json_keys(values: Iterable[str]) -> dict[str, tuple[str, MaskSpec]]:
    """Personal keys of sampled JSON objects (top level, and one level down as `a.b`), by
    the key's name or its values. Keys must look like identifiers and be in at least half
    of the sampled documents: keys that are data (an object keyed by e-mail addresses)
    are never looked at, let alone printed."""
    docs: list[dict[str, Any]] = []
    for v in values:
        try:
            doc = json.loads(v)
        except ValueError:
            continue
        if isinstance(doc, dict):
            docs.append(doc)
    if not docs:
        return {}
    by_path: dict[str, list[str]] = {}
    for doc in docs:
        for key, val in doc.items():
            if isinstance(val, dict):
                for sub, subval in val.items():
                    by_path.setdefault(f"{key}.{sub}", []).append(_scalar(subval))
            else:
                by_path.setdefault(key, []).append(_scalar(val))
    out: dict[str, tuple[str, MaskSpec]] = {}
    for path, vals in sorted(by_path.items()):
        if not all(_JSON_KEY.match(part) for part in path.split(".")):
            continue
        if len(vals) < max(2, JSON_KEY_SHARE * len(docs)):
            continue
        found = name_category(path.rsplit(".", 1)[-1]) or value_category(vals)
        if found is not None:
            category, spec = found
            out[path] = (category, _hiding(spec, "text", vals))
    return out


def _scalar(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value)


def _is_partition_child(catalog: Catalog, rel: Relation) -> bool:
    """A partition (or inheritance child) whose columns all come from a parent that is
    looked at: the parent's rule protects it."""
    for parent in rel.parents:
        p = catalog.relations.get(parent)
        if (
            p is not None
            and p.kind in ("r", "p", "f")
            and all(p.column(c.name) is not None for c in rel.columns)
        ):
            return True
    return False


def discover(
    catalog: Catalog, samples: Mapping[tuple[str, str, str], list[str]]
) -> dict[tuple[str, str, str], tuple[str, MaskSpec]]:
    """(schema, table, column) -> (category, suggested mask) for columns that look personal.
    Partitions and inheritance children are left to their parent. A mask is checked
    against the sampled values: one that would show a value whole is replaced by a
    stronger one."""
    out: dict[tuple[str, str, str], tuple[str, MaskSpec]] = {}
    for (schema, table), rel in catalog.relations.items():
        if rel.kind not in ("r", "p", "f", "m") or _is_partition_child(catalog, rel):
            continue
        for col in rel.columns:
            key = (schema, table, col.name)
            found = _column(table, col.name, col.type.name, col.type.family, samples.get(key))
            if found is not None:
                out[key] = found
    return out


def _column(
    table: str, name: str, type_name: str, family: str, sampled: list[str] | None
) -> tuple[str, MaskSpec] | None:
    values = sampled or []
    if type_name in _TYPE_CATEGORIES:
        return _TYPE_CATEGORIES[type_name], _hiding(_ADDRESS, type_name, values)
    if family == "bytea":
        return ("recording or document", _DENY) if _BINARY_NAMES.search(name.lower()) else None
    if family == "date":
        by_name = name_category(name, table)
        if by_name is not None and by_name[0] == "date of birth":
            return "date of birth", _BIRTH_DATE
        return None
    if family == "json":
        keys = _json_keys(values)
        if not keys:
            return None
        spec = MaskSpec("json", keys={path: s for path, (_c, s) in keys.items()})
        return "JSON with personal keys", spec
    if family not in ("text", "int"):
        return None
    found = name_category(name, table)
    if family == "text":
        # what the values are beats what the name says (an `id` holding phone numbers)
        by_value = value_category(values)
        if by_value is not None and not (found is not None and found[0] == "card number"):
            found = by_value
    if found is None:
        return None
    category, spec = found
    return category, _hiding(spec, type_name, values)


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


@dataclass(frozen=True)
class ForeignKey:
    """A foreign key of a table: its columns reference `target`'s `target_columns`."""

    columns: tuple[str, ...]
    target: tuple[str, str]
    target_columns: tuple[str, ...]


@dataclass(frozen=True)
class Keys:
    """The keys `suggest` follows: each table's primary key and foreign keys (read by the
    caller from pg_constraint)."""

    primary: Mapping[tuple[str, str], tuple[str, ...]] = field(default_factory=dict)
    foreign: Mapping[tuple[str, str], tuple[ForeignKey, ...]] = field(default_factory=dict)


# tables whose rows are people, by name: the data subjects when nobody says otherwise
_SUBJECT_TABLE = _p(
    r"^(customers?|clients?|persons?|people|users?|members?|subscribers?|patients?|"
    r"citizens?|contacts?|account_?holders?|data_?subjects?)$"
)


@dataclass(frozen=True)
class _Edge:
    column: str  # the column of the table the edge leaves
    target: tuple[str, str]
    declared: bool  # a foreign key (else: the column is named like the target's key)


def _edges(
    catalog: Catalog, keys: Keys, tables: Collection[tuple[str, str]]
) -> dict[tuple[str, str], list[_Edge]]:
    """Single-column references between tables: declared foreign keys, and for a column
    without one, a column named exactly like another table's one-column primary key of
    the same type family (legacy schemas often declare no foreign keys: an xDR's
    i_account)."""
    pk_owner: dict[str, list[tuple[tuple[str, str], str]]] = {}
    for t, cols in keys.primary.items():
        rel = catalog.relations.get(t)
        if len(cols) == 1 and rel is not None and rel.column(cols[0]) is not None:
            col = rel.column(cols[0])
            assert col is not None
            pk_owner.setdefault(cols[0], []).append((t, col.type.family))
    out: dict[tuple[str, str], list[_Edge]] = {}
    for t in tables:
        rel = catalog.relations[t]
        edges: list[_Edge] = []
        referenced: set[str] = set()
        for fk in keys.foreign.get(t, ()):
            if len(fk.columns) == 1 and fk.target != t:
                edges.append(_Edge(fk.columns[0], fk.target, True))
                referenced.add(fk.columns[0])
        own = keys.primary.get(t, ())
        for col in rel.columns:
            if col.name in referenced or own == (col.name,):
                continue
            owners = [
                o for o, fam in pk_owner.get(col.name, []) if o != t and fam == col.type.family
            ]
            if len(owners) == 1:
                edges.append(_Edge(col.name, owners[0], False))
        out[t] = edges
    return out


def _subject_tables(
    found: Mapping[tuple[str, str], object], edges: Mapping[tuple[str, str], list[_Edge]]
) -> list[tuple[str, str]]:
    """The tables of data subjects: those named like people (customers, users, ...);
    else the personal table most other personal tables reference directly."""
    named = [t for t in found if _SUBJECT_TABLE.match(t[1].lower())]
    if named:
        return sorted(named)
    inbound: dict[tuple[str, str], int] = {}
    for t, es in edges.items():
        for e in es:
            if e.declared and e.target in found and e.target != t:
                inbound[e.target] = inbound.get(e.target, 0) + 1
    if not inbound:
        return []
    best = max(inbound.values())
    top = [t for t, n in inbound.items() if n == best]
    return top if len(top) == 1 else []


def _path_to_subject(
    start: tuple[str, str],
    subjects: Collection[tuple[str, str]],
    edges: Mapping[tuple[str, str], list[_Edge]],
    declared_only: bool,
) -> list[_Edge] | None:
    """The shortest chain of references from `start` to a subject table (breadth first,
    in column order)."""
    queue: deque[tuple[tuple[str, str], list[_Edge]]] = deque([(start, [])])
    seen = {start}
    while queue:
        table, path = queue.popleft()
        for e in edges.get(table, []):
            if declared_only and not e.declared:
                continue
            if e.target in seen:
                continue
            if e.target in subjects:
                return [*path, e]
            seen.add(e.target)
            queue.append((e.target, [*path, e]))
    return None


def _subject(
    table: tuple[str, str],
    subjects: Collection[tuple[str, str]],
    keys: Keys,
    edges: Mapping[tuple[str, str], list[_Edge]],
) -> tuple[str | None, str]:
    """The subject column of a table and why: the subject table's own key; else the column
    that starts the shortest reference path to a subject table; else its own one-column
    primary key (its rows are people not linked to the subjects: staff, partners)."""
    own = keys.primary.get(table, ())
    if table in subjects:
        if len(own) == 1:
            return own[0], "the data subjects"
        return None, "the data subjects; no one-column primary key to name them by"
    path = _path_to_subject(table, subjects, edges, True) or _path_to_subject(
        table, subjects, edges, False
    )
    if path is not None:
        hops = " -> ".join(f"{s}.{t}" for s, t in (e.target for e in path))
        how = "" if all(e.declared for e in path) else " (partly by column name: no foreign key)"
        return path[0].column, f"-> {hops}{how}"
    subject_names = ", ".join(f"{s}.{t}" for s, t in subjects) or "a subject table"
    if len(own) == 1:
        return own[0], f"its own key: no reference leads to {subject_names}"
    return None, f"no reference leads to {subject_names}, and no one-column primary key"


def suggest(
    catalog: Catalog,
    samples: Mapping[tuple[str, str, str], list[str]],
    keys: Keys | None = None,
    subject_tables: Collection[tuple[str, str]] | None = None,
) -> str:
    """A draft rules file (YAML text) from discovery: one rule per table that looks
    personal (a partitioned table's rule covers its partitions), each column with a mask
    that hides every sampled value, and the subject column that leads to the data
    subjects' table. Names tables, columns, categories and masks; never a sampled value."""
    keys = keys or Keys()
    found = discover(catalog, samples)
    by_table: dict[tuple[str, str], list[tuple[str, str, MaskSpec]]] = {}
    for (schema, table, col), (category, spec) in sorted(found.items()):
        by_table.setdefault((schema, table), []).append((col, category, spec))
    tables = [t for t, rel in catalog.relations.items() if rel.kind in ("r", "p", "f")]
    edges = _edges(catalog, keys, tables)
    subjects = (
        sorted(subject_tables) if subject_tables is not None else _subject_tables(by_table, edges)
    )
    lines = [
        "# Draft pgveil rules from `pgveil rules suggest`: review every line before use.",
        "# Subjects: " + (", ".join(f"{s}.{t}" for s, t in subjects) or "none found")
        + " (the data subjects' table: give --subject-table to choose another)",
        "roles:",
        "  unmasked: []        # roles that see everything",
        "  masked: []          # roles that see masked data",
        "  default: masked",
        "tables:",
    ]  # fmt: skip
    if not by_table:
        lines.append("  {}  # nothing looked personal")
    for (schema, table), cols in by_table.items():
        rel: Relation = catalog.relations[(schema, table)]
        lines.append(f"  {_name(schema)}.{_name(table)}:")
        if rel.kind in ("r", "p", "f"):
            column, why = _subject((schema, table), subjects, keys, edges)
            if column is not None:
                lines.append(f"    subject: {_name(column)}  # {why}")
            else:
                lines.append(f"    # subject: none ({why})")
        lines.append("    columns:")
        for col, category, spec in cols:
            lines.append(f"      {_name(col)}: {_spec_yaml(spec)}  # {category}")
    return "\n".join(lines) + "\n"


def _name(text: str) -> str:
    """A YAML scalar for a catalog name (quoted when YAML would read it otherwise)."""
    if re.fullmatch(r"[A-Za-z_][A-Za-z0-9_$]*", text) and text.lower() not in (
        "y", "n", "yes", "no", "on", "off", "true", "false", "null",
    ):  # fmt: skip
        return text
    return json.dumps(text)


def _spec_yaml(spec: MaskSpec) -> str:
    if spec.name == "partial" and (spec.keep_first, spec.keep_last) != (1, 1):
        return f"{{mask: partial, keep_first: {spec.keep_first}, keep_last: {spec.keep_last}}}"
    if spec.name == "digits":
        return f"{{mask: digits, keep_last: {spec.keep_last}}}"
    if spec.name == "date":
        return f"{{mask: date, truncate: {spec.truncate}}}"
    if spec.name == "json":
        inner = ", ".join(f"{_name(k)}: {_spec_yaml(v)}" for k, v in spec.keys.items())
        return f"{{mask: json, keys: {{{inner}}}}}"
    if spec.name in ("null",):
        return "'null'"
    return spec.name
