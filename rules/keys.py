"""Subject keys as the server compares them: the value a literal, a parameter or a returned
key column has, in the type the server gives it, and the one text the audit records for it.

The audit's subjects are strings (`audit who --subject 2` looks for "2"), and one subject
must be recorded as one string however a statement spells its key: `= 2`, `= 2.0`, `= 2e0`,
`= '0002'`, `= +2`, `= 2::numeric` all name subject 2 of a bigint key; a uuid key is one
lower-case text whichever case or braces the literal used; `char(n)` keys are compared
without their trailing spaces. So a key is read the way PostgreSQL reads it: a literal takes
its lexical type (an integer `int4`, `int8` or `numeric` by size, a decimal `numeric`, a
quoted string `unknown`), casts and unary signs are applied as the server applies them, the
comparison with the key column is made in the type the server compares in, and the result is
written in the key column type's canonical form (`canonical`).

Only a small set of types is understood: int2, int4, int8, numeric, bool, text, varchar,
bpchar and uuid, without type modifiers. Anything else (float types, whose comparisons with
integers round; types with modifiers, which round or cut; collations that are not
deterministic, under which 'ab' equals 'AB'; a string with a backslash, which the server
reads differently when standard_conforming_strings is off) is `None`: pgveil cannot say
which subject it names, and the event is then not complete. A form the server refuses may be
read here (the statement fails and names no subject); a form the server accepts is never read
as another value.

Pure: no I/O, no parser. Values never leave the audit stream.
"""

from __future__ import annotations

import re
import struct
import uuid
from dataclasses import dataclass
from decimal import ROUND_HALF_UP, Decimal, InvalidOperation

# A typed value: (type name, value): int for int2/int4/int8, Decimal for numeric, bool,
# str for text/varchar/bpchar/unknown (a quoted literal the server types by its context),
# uuid.UUID
Value = tuple[str, object]


class _NoMatch:
    """A key that matches no row of the key column (2.5 for an integer key)."""

    def __repr__(self) -> str:
        return "NO_MATCH"


NO_MATCH = _NoMatch()

INTEGERS = {
    "int2": (-(2**15), 2**15 - 1),
    "int4": (-(2**31), 2**31 - 1),
    "int8": (-(2**63), 2**63 - 1),
}
_INT4_MAX = 2**31 - 1
_INT8_MAX = 2**63 - 1
# more significant decimal digits than any integer type holds (int8: 19). Such a number is
# never made an int from its digits: int() refuses more than 4300 digits (ValueError), and
# an int of 1e1000000 takes 40 s to build, long enough to stop the proxy's event loop
_WIDER = 19
_INT_RANGE = (Decimal(-(2**63) - 1), Decimal(2**63))  # a numeric beyond these fits no integer
STRINGS = frozenset(("text", "varchar", "bpchar"))
TYPES = frozenset((*INTEGERS, "numeric", "bool", *STRINGS, "uuid"))
# parameter and result-column type OIDs (pg_type.dat)
OID_TYPES = {
    16: "bool", 20: "int8", 21: "int2", 23: "int4", 25: "text", 1042: "bpchar",
    1043: "varchar", 1700: "numeric", 2950: "uuid", 705: "unknown",
}  # fmt: skip
# names the grammar gives built-in types (`::int` is pg_catalog.int4) and their aliases
_TYPE_NAMES = {
    "int2": "int2", "smallint": "int2", "int4": "int4", "int": "int4", "integer": "int4",
    "int8": "int8", "bigint": "int8", "numeric": "numeric", "decimal": "numeric",
    "bool": "bool", "boolean": "bool", "text": "text", "varchar": "varchar",
    "bpchar": "bpchar", "uuid": "uuid",
}  # fmt: skip
_SPACE = " \t\n\r\f\v"  # what the server's input functions skip (C isspace)
_INTEGER = re.compile(
    r"[+-]?(?:0[xX](?:_?[0-9a-fA-F])+|0[oO](?:_?[0-7])+|0[bB](?:_?[01])+|[0-9]+(?:_[0-9]+)*)"
)
_NUMERIC = re.compile(r"[+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]+)?")
_SPECIAL = {"nan": "NaN", "infinity": "Infinity", "inf": "Infinity"}
_UUID = re.compile(r"(\{)?((?:[0-9a-fA-F]{4}-?){7}[0-9a-fA-F]{4})(?(1)\})")
_TRUE = frozenset(("t", "tr", "tru", "true", "y", "ye", "yes", "on", "1"))
_FALSE = frozenset(("f", "fa", "fal", "fals", "false", "n", "no", "of", "off", "0"))
_LONGEST = 1000  # digits either side of the point a numeric key may have to be recorded


@dataclass(frozen=True, slots=True)
class KeyColumn:
    """What the comparison of a key needs of its column: the base type's name
    (pg_type.typname), the declared type with modifiers ('character(6)'), and whether its
    collation is deterministic (equal only when the bytes are)."""

    type: str
    formatted: str = ""
    deterministic: bool = True

    @property
    def length(self) -> int | None:
        """n of varchar(n) / char(n)."""
        found = re.search(r"\((\d+)\)$", self.formatted)
        return int(found.group(1)) if found and self.type in ("varchar", "bpchar") else None


def type_name(names: tuple[str, ...], shadowed: frozenset[str] = frozenset()) -> str | None:
    """The built-in type a cast names (`pg_catalog.int4`, `int4`, `uuid`), or None; an
    unqualified name in `shadowed` (a type of that name exists in another schema, which the
    search path may put first) is None too."""
    if not 1 <= len(names) <= 2 or (len(names) == 2 and names[0] != "pg_catalog"):
        return None
    if len(names) == 1 and names[0] in shadowed:
        return None
    return _TYPE_NAMES.get(names[-1])


# ---- input: text as the server's input functions read it ---------------------------------


def input_value(typ: str, text: str) -> Value | None:
    """`text` read by the input function of `typ` (None: not read here, or refused)."""
    if typ in INTEGERS:
        value = _integer(text)
        return (typ, value) if value is not None and _fits(typ, value) else None
    if typ == "numeric":
        number = _numeric(text)
        return ("numeric", number) if number is not None else None
    if typ == "bool":
        word = text.strip(_SPACE).lower()
        if word in _TRUE:
            return ("bool", True)
        return ("bool", False) if word in _FALSE else None
    if typ in STRINGS or typ == "unknown":
        return (typ, text)
    if typ == "uuid":
        found = _UUID.fullmatch(text)
        if found is None:
            return None
        return ("uuid", uuid.UUID(hex=found.group(2).replace("-", "")))
    return None


def _integer(text: str) -> int | None:
    """pg_strtoint16/32/64: spaces around, a sign, decimal digits; from PostgreSQL 16 also
    0x/0o/0b prefixes and underscores between digits (an older server refuses those)."""
    body = text.strip(_SPACE)
    if _INTEGER.fullmatch(body) is None:
        return None
    sign = -1 if body[0] == "-" else 1
    digits = body.lstrip("+-").replace("_", "")
    base = {"x": 16, "o": 8, "b": 2}.get(digits[1:2].lower(), 10) if len(digits) > 1 else 10
    if base == 10 and len(digits) > _WIDER:
        digits = digits.lstrip("0") or "0"  # (int() counts leading zeros against its limit)
        if len(digits) > _WIDER:
            return None  # fits no integer type (number_literal reads it as a numeric)
    return sign * int(digits[2:] if base != 10 else digits, base)


def _numeric(text: str) -> Decimal | None:
    """numeric_in: spaces around, a decimal number with an optional exponent, NaN,
    [+-]Infinity (or inf)."""
    body = text.strip(_SPACE)
    special = _SPECIAL.get(body.lstrip("+-").lower())
    if special is not None:
        if special == "NaN" and body[:1] in "+-":
            return None
        return Decimal("-Infinity" if body[:1] == "-" else special)
    if _NUMERIC.fullmatch(body) is None:
        return None
    try:
        return Decimal(body)
    except InvalidOperation:
        return None


def number_literal(text: str) -> Value | None:
    """A numeric literal of a statement (`2`, `0x1F`, `99999999999`, `2.0`, `2e0`) in the
    type the parser gives it: int4 when it is an integer that fits, int8 when it fits
    that, numeric otherwise."""
    if text != text.strip(_SPACE) or text[:1] == "+":
        return None
    value = _integer(text)
    if value is not None:
        for typ in ("int4", "int8"):
            if _fits(typ, value):
                return (typ, value)
        return ("numeric", Decimal(value))
    number = _numeric(text)
    if number is None or not number.is_finite():
        return None
    return ("numeric", number)


def string_literal(text: str) -> Value | None:
    """A quoted literal's value (unknown type); None when it holds a backslash: with
    standard_conforming_strings off the server reads `'\\x32'` as '2'."""
    return None if "\\" in text else ("unknown", text)


def token_value(token: str) -> Value | None:
    """The value of one literal token of a statement's text, as the scanner wrote it: a
    number, a '...' string, TRUE or FALSE (NULL, E'', U&'', $$...$$ and bit strings: None,
    the full analysis reads those)."""
    if token.isdigit() and token.isascii():  # the common key: decimal digits, no sign
        if len(token) > _WIDER:
            token = token.lstrip("0") or "0"  # (int() counts leading zeros against its limit)
            if len(token) > _WIDER:
                return ("numeric", Decimal(token))  # (never int(): see _WIDER)
        value = int(token)
        if value <= _INT4_MAX:
            return ("int4", value)
        return ("int8", value) if value <= _INT8_MAX else ("numeric", Decimal(value))
    if len(token) >= 2 and token[0] == token[-1] == "'":
        return string_literal(token[1:-1].replace("''", "'"))
    word = token.lower()
    if word in ("true", "false"):
        return ("bool", word == "true")
    if token[:1].isdigit() or token[:1] == ".":
        return number_literal(token)
    return None


# ---- casts and operators -----------------------------------------------------------------


def cast(value: Value, target: str) -> Value | None:
    """`value::target` as the server casts it, for the types understood here."""
    typ, v = value
    if typ == target and typ != "unknown":
        return value
    if typ == "unknown":
        assert isinstance(v, str)
        return input_value(target, v)
    if typ in INTEGERS:
        assert isinstance(v, int)
        if target in INTEGERS:
            return (target, v) if _fits(target, v) else None
        if target == "numeric":
            return ("numeric", Decimal(v))
        if target == "bool":
            return ("bool", v != 0) if typ == "int4" else None  # (int2, int8: no cast)
        return (target, str(v)) if target in STRINGS else None
    if typ == "numeric":
        assert isinstance(v, Decimal)
        if target in INTEGERS:
            if not v.is_finite() or not _INT_RANGE[0] <= v <= _INT_RANGE[1]:
                return None  # (out of every integer type's range: never made an int)
            rounded = int(v.to_integral_value(rounding=ROUND_HALF_UP))  # half away from 0
            return (target, rounded) if _fits(target, rounded) else None
        return None
    if typ == "bool":
        if target == "int4":
            return ("int4", 1 if v else 0)
        return (target, "true" if v else "false") if target in STRINGS else None
    if typ in STRINGS:
        assert isinstance(v, str)
        if typ == "bpchar" and target != "bpchar":
            v = v.rstrip(" ")  # char(n) to text drops the padding
        return (target, v) if target in STRINGS else input_value(target, v)
    if typ == "uuid":
        return (target, str(v)) if target in STRINGS else None
    return None


def operator(op: str, value: Value) -> Value | None:
    """Unary `+value` or `-value`."""
    typ, v = value
    if typ in INTEGERS:
        assert isinstance(v, int)
        result = -v if op == "-" else v
        return (typ, result) if _fits(typ, result) else None
    if typ == "numeric":
        assert isinstance(v, Decimal)
        # (copy_negate: exact. `-v` rounds to the context's 28 digits, another key, and
        # raises Overflow past its exponent, -1e999999999, out of the session's analysis)
        return ("numeric", v.copy_negate() if op == "-" else v)
    return None


def apply(value: Value, ops: tuple[str, ...]) -> Value | None:
    """`value` through `ops` in order: a type name casts to it, "-" and "+" are the unary
    operators."""
    current: Value | None = value
    for op in ops:
        if current is None:
            return None
        current = operator(op, current) if op in ("-", "+") else cast(current, op)
    return current


def result_type(typ: str, ops: tuple[str, ...]) -> str:
    """The type of a `typ` value once `ops` are applied."""
    for op in ops:
        if op not in ("-", "+"):
            typ = op
    return typ


_CATEGORY = {
    **{t: "N" for t in (*INTEGERS, "numeric")},
    **{t: "S" for t in STRINGS},
    "bool": "B",
    "uuid": "U",
}
_RANK = {"int2": 0, "int4": 1, "int8": 2, "numeric": 3}


def common_type(column: str, others: list[str]) -> str | None:
    """The type the server compares a `column` value with the `others` in (select_common_type
    for the types understood here): `unknown` takes the column's type, the numbers the
    widest; None when they do not compare."""
    category = _CATEGORY.get(column)
    if category is None:
        return None
    result = column
    for other in others:
        if other == "unknown":
            continue
        if _CATEGORY.get(other) != category:
            return None
        if category == "N" and _RANK[other] > _RANK[result]:
            result = other
    return result


# ---- keys --------------------------------------------------------------------------------


def compare(column: KeyColumn, value: Value, unknown_as: str) -> str | _NoMatch | None:
    """The key `column = value` selects, in the column type's canonical form; NO_MATCH when
    it selects no row; None when pgveil cannot tell. An `unknown` value is read as
    `unknown_as` (the type the server compares in)."""
    if value[0] == "unknown":
        typed = cast(value, unknown_as)
        if typed is None:
            return None
        value = typed
    typ, v = value
    col = column.type
    if col in INTEGERS:
        if typ in INTEGERS:
            assert isinstance(v, int)
            return str(v) if _fits(col, v) else NO_MATCH
        if typ == "numeric":
            assert isinstance(v, Decimal)
            if not v.is_finite() or v != v.to_integral_value():
                return NO_MATCH
            if not _INT_RANGE[0] <= v <= _INT_RANGE[1]:
                return NO_MATCH  # (never made an int: see _WIDER)
            return str(int(v)) if _fits(col, int(v)) else NO_MATCH
        return None
    if col == "numeric":
        if isinstance(v, int) and typ in INTEGERS:
            return canonical_number(Decimal(v))
        return canonical_number(v) if isinstance(v, Decimal) else None
    if col in STRINGS:
        if not column.deterministic or not isinstance(v, str):
            return None
        if col == "bpchar":
            return v.rstrip(" ") if typ == "bpchar" else None
        return v if typ in ("text", "varchar") else None
    if col == "uuid":
        return str(v) if typ == "uuid" else None
    return None


def assign(column: KeyColumn, value: Value) -> str | None:
    """The key an INSERT stores when it assigns `value` to `column` (assignment casts),
    in the column type's canonical form; None when pgveil cannot tell."""
    typ, v = value
    col = column.type
    if col in INTEGERS:
        if typ in INTEGERS or typ == "numeric" or typ == "unknown":
            typed = cast(value, col)
            return str(typed[1]) if typed is not None else None
        return None
    if col == "numeric":
        if "(" in column.formatted:
            return None  # numeric(p, s) rounds to its scale
        typed = cast(value, "numeric") if typ in INTEGERS or typ == "unknown" else value
        if typed is None or typed[0] != "numeric":
            return None
        assert isinstance(typed[1], Decimal)
        return canonical_number(typed[1])
    if col in STRINGS:
        if typ not in ("unknown", "text", "varchar", "bpchar") or not isinstance(v, str):
            return None
        if typ == "bpchar" or col == "bpchar":
            v = v.rstrip(" ")
        n = column.length
        if n is not None and len(v) > n:
            if col == "bpchar" or v[n:].strip(" "):
                return None  # too long: the server refuses it
            v = v[:n]  # varchar(n) cuts trailing spaces beyond n
        return v
    if col == "uuid" and typ in ("unknown", "uuid"):
        typed = cast(value, "uuid")
        return str(typed[1]) if typed is not None else None
    return None


def canonical_number(number: Decimal) -> str | None:
    """A numeric key's text: no exponent, no trailing zeros (2.50 and 2.5 are one key)."""
    if number.is_nan():
        return "NaN"
    if number.is_infinite():
        return "Infinity" if number > 0 else "-Infinity"
    if number and not -_LONGEST < number.adjusted() < _LONGEST:
        return None
    text = format(number, "f")
    if "." in text:
        text = text.rstrip("0").rstrip(".")
    return "0" if text in ("-0", "") else text


def row_key(typ: str, raw: bytes, fmt: int, encoding: str) -> str | None:
    """A key column's value in a DataRow (text or binary format) in its type's canonical
    form; None when it cannot be read."""
    if fmt == 0:
        try:
            text = raw.decode(encoding)
        except (UnicodeDecodeError, LookupError):
            return None
        if typ == "numeric":
            number = _numeric(text)
            return canonical_number(number) if number is not None else None
        return text.rstrip(" ") if typ == "bpchar" else text
    value = binary_value(typ, raw, encoding)
    if value is None:
        return None
    column = KeyColumn(typ)
    key = compare(column, value, typ)
    return key if isinstance(key, str) else None


def binary_value(typ: str, raw: bytes, encoding: str) -> Value | None:
    """A value in the binary format of `typ` (the send function's output)."""
    if typ in INTEGERS:
        size = {"int2": 2, "int4": 4, "int8": 8}[typ]
        return (typ, int.from_bytes(raw, "big", signed=True)) if len(raw) == size else None
    if typ == "numeric":
        number = _binary_numeric(raw)
        return ("numeric", number) if number is not None else None
    if typ == "bool":
        return ("bool", raw != b"\0") if len(raw) == 1 else None
    if typ in STRINGS or typ == "unknown":
        try:
            return (typ, raw.decode(encoding))
        except (UnicodeDecodeError, LookupError):
            return None
    if typ == "uuid":
        return ("uuid", uuid.UUID(bytes=raw)) if len(raw) == 16 else None
    return None


def parameter_value(typ: str, raw: bytes, fmt: int, encoding: str) -> Value | None:
    """A Bind parameter's value, as the server reads it for a parameter of type `typ`."""
    if fmt == 0:
        try:
            text = raw.decode(encoding)
        except (UnicodeDecodeError, LookupError):
            return None
        return input_value(typ, text)
    return binary_value(typ, raw, encoding)


_SIGNS = {0x0000: 1, 0x4000: -1}
_SPECIALS = {0xC000: "NaN", 0xD000: "Infinity", 0xF000: "-Infinity"}


def _binary_numeric(raw: bytes) -> Decimal | None:
    """numeric_send's format: ndigits, weight, sign, dscale, then base-10000 digits."""
    if len(raw) < 8:
        return None
    ndigits, weight, sign, _dscale = struct.unpack_from("!hhHh", raw)
    if ndigits < 0 or len(raw) != 8 + 2 * ndigits:
        return None
    if sign in _SPECIALS:
        return Decimal(_SPECIALS[sign]) if ndigits == 0 else None
    if sign not in _SIGNS:
        return None
    groups = struct.unpack_from(f"!{ndigits}H", raw, 8)
    if any(g > 9999 for g in groups):
        return None
    digits = tuple(int(c) for c in "".join(f"{g:04d}" for g in groups)) or (0,)
    exponent = 4 * (weight - ndigits + 1) if ndigits else 0
    return Decimal((0 if sign == 0 else 1, digits, exponent))


def _fits(typ: str, value: int) -> bool:
    low, high = INTEGERS[typ]
    return low <= value <= high
