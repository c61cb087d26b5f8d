"""The masks: each in two forms that must agree, SQL (built-in functions only, so the
database computes on masked values) and Python (for the exit check and notification
payloads). Both work on a column's type family and keep the column's type.

Python forms take and return PostgreSQL's *text representation* of a value (None for NULL),
so that tests can compare `SELECT mask_sql(col)::text` with `mask_python(col::text)`.

Must not import asyncio, socket or asyncpg. Must not log values. SQL literals built here
never depend on standard_conforming_strings (dollar quoting, hex-decoded bytea).
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import json
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from rules.model import MaskSpec

MASK_NAMES = ("partial", "email", "digits", "null", "redact", "deny", "hash", "date", "json")

# Parameters each mask accepts (the loader rejects the others).
MASK_PARAMS: Mapping[str, frozenset[str]] = {
    "partial": frozenset({"keep_first", "keep_last", "char"}),
    "email": frozenset({"char"}),
    "digits": frozenset({"keep_last", "char"}),
    "null": frozenset(),
    "redact": frozenset({"value"}),
    "deny": frozenset(),
    "hash": frozenset({"key"}),
    "date": frozenset({"truncate"}),
    "json": frozenset({"keys"}),
}

# Type families, from the catalog's type name (of the base type, for domains).
_FAMILIES = {
    "text": "text", "varchar": "text", "bpchar": "text", "name": "text", "citext": "text",
    "int2": "int", "int4": "int", "int8": "int",
    "numeric": "number", "float4": "number", "float8": "number", "money": "number",
    "inet": "inet", "cidr": "cidr",
    "macaddr": "mac", "macaddr8": "mac8",
    "date": "date", "timestamp": "date", "timestamptz": "date",
    "json": "json", "jsonb": "json",
    "uuid": "uuid",
    "bytea": "bytea",
}  # fmt: skip


def family_of(type_name: str) -> str:
    return _FAMILIES.get(type_name, "other")


# Which families each mask has a real (non-NULL) form for. Everything else gets NULL of the
# column's type, and `rules check` reports the misfit.
SUPPORTED: Mapping[str, frozenset[str]] = {
    "partial": frozenset({"text", "int", "inet", "cidr", "mac", "mac8", "uuid"}),
    "email": frozenset({"text"}),
    "digits": frozenset({"text", "int"}),
    "null": frozenset(_FAMILIES.values()) | {"other"},
    "redact": frozenset({"text"}),
    "deny": frozenset(_FAMILIES.values()) | {"other"},
    "hash": frozenset({"text", "int", "uuid"}),
    "date": frozenset({"date"}),
    "json": frozenset({"json"}),
}


def fits(spec: MaskSpec, type_name: str) -> bool:
    return family_of(type_name) in SUPPORTED[spec.name]


@dataclass(frozen=True)
class ColumnType:
    """What a mask needs to know of a column's type."""

    name: str  # base type name, e.g. 'varchar', 'int8', 'jsonb'
    formatted: str  # the declared type with modifiers, for the final cast: 'varchar(80)'

    @property
    def family(self) -> str:
        return family_of(self.name)

    @property
    def length(self) -> int | None:
        """n of varchar(n) / char(n): the cast to the column type cuts (or pads) to it."""
        m = re.search(r"\((\d+)\)$", self.formatted)
        return int(m.group(1)) if m and self.name in ("varchar", "bpchar") else None


# ---- SQL -------------------------------------------------------------------------------------


def sql_literal(text: str) -> str:
    """A dollar-quoted literal, immune to standard_conforming_strings."""
    tag = "pgv"
    while f"${tag}$" in text:
        tag += "x"
    return f"${tag}${text}${tag}$"


# Every function and operator below is qualified with pg_catalog: an unqualified name
# resolves through the session's search_path, and a function of the same name that matches
# the argument types better would be called with the raw value.
_C = "pg_catalog."


def _op(op: str) -> str:
    return f" OPERATOR(pg_catalog.{op}) "


_CAT = _op("||")


def _sql_text_partial(x: str, kf: int, kl: int, char: str) -> str:
    c = sql_literal(char)
    n = f"{_C}char_length({x})"
    tail = f'{_C}"right"({x}, {kl})' if kl else "''"
    return (
        f"CASE WHEN {n}{_op('<=')}{kf + kl} THEN {_C}repeat({c}, {n}) "
        f'ELSE {_C}"left"({x}, {kf}){_CAT}{_C}repeat({c}, {n}{_op("-")}{kf + kl}){_CAT}{tail} END'
    )


def _sql_int_partial(x: str, kf: int, kl: int) -> str:
    a = f"{_C}abs(({x})::pg_catalog.numeric)::pg_catalog.text"
    n = f"{_C}length({a})"
    tail = f'{_C}"right"({a}, {kl})' if kl else "''"
    body = f"{_C}\"left\"({a}, {kf}){_CAT}{_C}repeat('0', {n}{_op('-')}{kf + kl}){_CAT}{tail}"
    return (
        f"CASE WHEN {n}{_op('<=')}{kf + kl} THEN 0 "
        f"ELSE {_C}sign(({x})::pg_catalog.numeric){_op('*')}({body})::pg_catalog.numeric END"
    )


def _sql_email(x: str, char: str) -> str:
    c = sql_literal(char)
    at = f"{_C}strpos({x}, '@')"
    return (
        f'CASE WHEN {at}{_op(">")}2 THEN {_C}"left"({x}, 1){_CAT}{_C}repeat({c}, {at}{_op("-")}2)'
        f"{_CAT}{_C}substr({x}, {at}) "
        f"WHEN {at}{_op('>')}0 THEN {_C}repeat({c}, {at}{_op('-')}1){_CAT}{_C}substr({x}, {at}) "
        f"ELSE {_sql_text_partial(x, 1, 1, char)} END"
    )


def _sql_digits(x: str, keep_last: int, char: str) -> str:
    c = sql_literal(char)
    if not keep_last:
        return f"{_C}regexp_replace({x}, '[0-9]', {c}, 'g')"
    # the prefix before the keep_last-th digit from the end; NULL when there are fewer
    pattern = sql_literal(f"^(.*?)(?:[0-9][^0-9]*){{{keep_last}}}$")
    prefix = f"{_C}substring({x}, {pattern})"
    return (
        f"CASE WHEN {prefix} IS NULL THEN {x} "
        f"ELSE {_C}regexp_replace({prefix}, '[0-9]', {c}, 'g')"
        f"{_CAT}{_C}substr({x}, {_C}char_length({prefix}){_op('+')}1) END"
    )


def _sql_int_digits(x: str, keep_last: int) -> str:
    n = f"({x})::pg_catalog.numeric"
    return f"{_C}sign({n}){_op('*')}({_C}abs({n}){_op('%')}{10**keep_last})"


def _octet_mask(family: str, kf: int, kl: int) -> str:
    if family in ("inet", "cidr"):
        v4 = ".".join("255" if i < kf or i >= 4 - kl else "0" for i in range(4))
        groups = ["ffff" if i < kf or i >= 8 - kl else "0" for i in range(8)]
        v6 = str(ipaddress.IPv6Address(":".join(groups)))
        return f"{v4}|{v6}"
    size = 8 if family == "mac8" else 6
    return ":".join("ff" if i < kf or i >= size - kl else "00" for i in range(size))


def _sql_inet_partial(x: str, family: str, kf: int, kl: int) -> str:
    v4, v6 = _octet_mask(family, kf, kl).split("|")
    host = f"{_C}host({x})::pg_catalog.inet"
    anded = (
        f"CASE {_C}family({x}) WHEN 4 THEN {host}{_op('&')}'{v4}'::pg_catalog.inet "
        f"ELSE {host}{_op('&')}'{v6}'::pg_catalog.inet END"
    )
    # host()::inet drops the cidr display flag that '&' leaves on its result
    masked = f"{_C}set_masklen({_C}host({anded})::pg_catalog.inet, {_C}masklen({x}))"
    return f"{_C}network({masked})" if family == "cidr" else masked


def _sql_uuid_partial(x: str, kf: int, kl: int) -> str:
    h = f"{_C}replace(({x})::pg_catalog.text, '-', '')"
    return f"({_sql_text_partial(h, kf, kl, '0')})::pg_catalog.uuid"


def hmac_pads(key: bytes) -> tuple[bytes, bytes]:
    if len(key) > 64:
        key = hashlib.sha256(key).digest()
    key = key.ljust(64, b"\0")
    return bytes(b ^ 0x36 for b in key), bytes(b ^ 0x5C for b in key)


def _sql_hmac_hex(x: str, key: bytes) -> str:
    ipad, opad = hmac_pads(key)
    text = f"{_C}convert_to(({x})::pg_catalog.text, 'UTF8')"
    inner = f"{_C}sha256({_C}decode('{ipad.hex()}', 'hex'){_CAT}{text})"
    return f"{_C}encode({_C}sha256({_C}decode('{opad.hex()}', 'hex'){_CAT}{inner}), 'hex')"


def _sql_hash(x: str, t: ColumnType, key: bytes) -> str:
    hexed = _sql_hmac_hex(x, key)
    if t.family == "int":
        bits = {"int2": 16, "int4": 32, "int8": 64}[t.name]
        target = "pg_catalog.int8" if bits == 64 else "pg_catalog.int4"
        return f"('x'{_CAT}{_C}\"left\"({hexed}, {bits // 4}))::pg_catalog.bit({bits})::{target}"
    if t.family == "uuid":
        return f'{_C}"left"({hexed}, 32)::pg_catalog.uuid'
    return hexed


def _sql_json(x: str, spec: MaskSpec, keys: Mapping[str, bytes]) -> str:
    expr = f"({x})::pg_catalog.jsonb"
    for path, sub in spec.keys.items():
        arr = "{" + ",".join('"' + p.replace('"', '""') + '"' for p in path.split(".")) + "}"
        p = f"{sql_literal(arr)}::pg_catalog.text[]"
        if sub.name in ("deny", "null"):
            new = "'null'::pg_catalog.jsonb"
        else:
            inner = sql_expr(sub, f"({expr}{_op('#>>')}{p})", ColumnType("text", "text"), keys)
            new = f"COALESCE({_C}to_jsonb({inner}), 'null'::pg_catalog.jsonb)"
        expr = (
            f"(CASE WHEN ({expr}{_op('#>')}{p}) IS NULL THEN {expr} "
            f"ELSE {_C}jsonb_set({expr}, {p}, {new}) END)"
        )
    return expr


def sql_expr(spec: MaskSpec, x: str, t: ColumnType, keys: Mapping[str, bytes]) -> str:
    """An SQL expression of type `t` that masks the column expression `x`."""
    fam = t.family
    name = spec.name
    if name in ("null", "deny") or fam not in SUPPORTED[name]:
        return f"CAST(NULL AS {t.formatted})"
    if name == "partial":
        if fam == "text":
            body = _sql_text_partial(x, spec.keep_first, spec.keep_last, spec.char)
        elif fam == "int":
            body = _sql_int_partial(x, spec.keep_first, spec.keep_last)
        elif fam in ("inet", "cidr"):
            body = _sql_inet_partial(x, fam, spec.keep_first, spec.keep_last)
        elif fam in ("mac", "mac8"):
            mask = _octet_mask(fam, spec.keep_first, spec.keep_last)
            body = f"{x}{_op('&')}'{mask}'::pg_catalog.{t.name}"
        else:
            body = _sql_uuid_partial(x, spec.keep_first, spec.keep_last)
    elif name == "email":
        body = _sql_email(x, spec.char)
    elif name == "digits":
        body = (
            _sql_digits(x, spec.keep_last, spec.char)
            if fam == "text"
            else _sql_int_digits(x, spec.keep_last)
        )
    elif name == "redact":
        body = f"CASE WHEN {x} IS NULL THEN NULL ELSE {sql_literal(spec.value)} END"
    elif name == "hash":
        body = _sql_hash(x, t, keys[spec.key])
    elif name == "date":
        body = f"{_C}date_trunc({sql_literal(spec.truncate)}, {x})"
    else:  # json
        body = _sql_json(x, spec, keys)
    return f"CAST(({body}) AS {t.formatted})"


# ---- Python ----------------------------------------------------------------------------------


def _py_text_partial(s: str, kf: int, kl: int, char: str) -> str:
    n = len(s)
    if n <= kf + kl:
        return char * n
    return s[:kf] + char * (n - kf - kl) + (s[n - kl :] if kl else "")


def _py_int_partial(s: str, kf: int, kl: int) -> str:
    neg = s.startswith("-")
    a = s.lstrip("-")
    if len(a) <= kf + kl:
        return "0"
    body = a[:kf] + "0" * (len(a) - kf - kl) + (a[len(a) - kl :] if kl else "")
    return ("-" if neg else "") + str(int(body))


def _py_email(s: str, char: str) -> str:
    at = s.find("@")
    if at > 1:
        return s[0] + char * (at - 1) + s[at:]
    if at >= 0:
        return char * at + s[at:]
    return _py_text_partial(s, 1, 1, char)


_DIGITS_RE = re.compile(r"[0-9]")


def _py_digits(s: str, keep_last: int, char: str) -> str:
    if not keep_last:
        return _DIGITS_RE.sub(char, s)
    positions = [i for i, ch in enumerate(s) if ch.isascii() and ch.isdigit()]
    if len(positions) < keep_last:
        return s
    cut = positions[-keep_last]
    return _DIGITS_RE.sub(char, s[:cut]) + s[cut:]


def _py_inet(s: str, fam: str, kf: int, kl: int) -> str:
    iface = ipaddress.ip_interface(s)
    v4, v6 = _octet_mask(fam, kf, kl).split("|")
    mask = ipaddress.ip_address(v4 if iface.version == 4 else v6)
    cls = ipaddress.IPv4Address if iface.version == 4 else ipaddress.IPv6Address
    addr = cls(int(iface.ip) & int(mask))
    plen = iface.network.prefixlen
    if fam == "cidr":
        return str(ipaddress.ip_network(f"{addr}/{plen}", strict=False))
    full = 32 if iface.version == 4 else 128
    return str(addr) if plen == full else f"{addr}/{plen}"


def _py_mac(s: str, fam: str, kf: int, kl: int) -> str:
    parts = s.split(":")
    size = len(parts)
    return ":".join(p if i < kf or i >= size - kl else "00" for i, p in enumerate(parts))


def _py_uuid(s: str, kf: int, kl: int) -> str:
    h = _py_text_partial(s.replace("-", ""), kf, kl, "0")
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


def py_hmac_hex(value: str, key: bytes) -> str:
    return hmac.new(key, value.encode(), hashlib.sha256).hexdigest()


def _py_hash(s: str, t: ColumnType, key: bytes) -> str:
    h = py_hmac_hex(s, key)
    if t.family == "int":
        bits = {"int2": 16, "int4": 32, "int8": 64}[t.name]
        v = int(h[: bits // 4], 16)
        return str(v - (1 << bits) if v >= 1 << (bits - 1) else v)
    if t.family == "uuid":
        h = h[:32]
        return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"
    return h


def _py_date(s: str, truncate: str) -> str:
    m = re.match(r"^(\d{4,})-(\d\d)-(\d\d)(.*)$", s)
    if not m:
        return s  # 'infinity' and friends are not truncated by date_trunc either
    year, month, _, rest = m.groups()
    month = month if truncate == "month" else "01"
    if not rest:
        return f"{year}-{month}-01"
    tz = re.search(r"([+-]\d\d(?::\d\d)?)$", rest)
    return f"{year}-{month}-01 00:00:00" + (tz.group(1) if tz else "")


def jsonb_text(value: object) -> str:
    """PostgreSQL's jsonb output format for a Python JSON value."""
    if isinstance(value, dict):
        items = sorted(value.items(), key=lambda kv: (len(kv[0].encode()), kv[0].encode()))
        return (
            "{"
            + ", ".join(f"{json.dumps(k, ensure_ascii=False)}: {jsonb_text(v)}" for k, v in items)
            + "}"
        )
    if isinstance(value, list):
        return "[" + ", ".join(jsonb_text(v) for v in value) + "]"
    return json.dumps(value, ensure_ascii=False)


def mask_json_value(doc: object, spec: MaskSpec, keys: Mapping[str, bytes]) -> object:
    """Apply a json mask's per-path masks to a decoded JSON document."""
    for path, sub in spec.keys.items():
        parts = path.split(".")
        node = doc
        for p in parts[:-1]:
            node = node.get(p) if isinstance(node, dict) else None
        if not isinstance(node, dict) or parts[-1] not in node or node[parts[-1]] is None:
            continue
        current = node[parts[-1]]
        if sub.name in ("deny", "null"):
            node[parts[-1]] = None
            continue
        as_text = current if isinstance(current, str) else jsonb_text(current)
        node[parts[-1]] = py_mask(sub, as_text, ColumnType("text", "text"), keys)
    return doc


def _py_json(s: str, spec: MaskSpec, keys: Mapping[str, bytes]) -> str:
    return jsonb_text(mask_json_value(json.loads(s), spec, keys))


def py_mask(spec: MaskSpec, s: str | None, t: ColumnType, keys: Mapping[str, bytes]) -> str | None:
    """The Python form of `sql_expr`, on text representations."""
    fam = t.family
    name = spec.name
    if s is None or name in ("null", "deny") or fam not in SUPPORTED[name]:
        return None
    handlers: dict[str, Callable[[], str]] = {
        "partial": lambda: _py_partial(s, t, spec),
        "email": lambda: _py_email(s, spec.char),
        "digits": lambda: (
            _py_digits(s, spec.keep_last, spec.char)
            if fam == "text"
            else _py_int_digits(s, spec.keep_last)
        ),
        "redact": lambda: spec.value,
        "hash": lambda: _py_hash(s, t, keys[spec.key]),
        "date": lambda: _py_date(s, spec.truncate),
        "json": lambda: _py_json(s, spec, keys),
    }
    out = handlers[name]()
    n = t.length
    if n is not None:
        out = out[:n].ljust(n) if t.name == "bpchar" else out[:n]
    return out


def _py_int_digits(s: str, keep_last: int) -> str:
    neg = s.startswith("-")
    v = int(s.lstrip("-")) % 10**keep_last
    return str(-v if neg and v else v)


def _py_partial(s: str, t: ColumnType, spec: MaskSpec) -> str:
    fam = t.family
    if fam == "text":
        return _py_text_partial(s, spec.keep_first, spec.keep_last, spec.char)
    if fam == "int":
        return _py_int_partial(s, spec.keep_first, spec.keep_last)
    if fam in ("inet", "cidr"):
        return _py_inet(s, fam, spec.keep_first, spec.keep_last)
    if fam in ("mac", "mac8"):
        return _py_mac(s, fam, spec.keep_first, spec.keep_last)
    return _py_uuid(s, spec.keep_first, spec.keep_last)
