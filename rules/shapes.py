"""Statement shapes, and the cache of decisions by statement text and by shape.

A statement's shape is its text with every literal replaced by one of pgveil's placeholders
($900000, $900001, ...: audit.redaction.PLACEHOLDER_BASE): statements that differ only in
literals share one analysis. `fast_normalize` makes the shape from libpg_query's
normalisation (C), reading the literals back with one compiled pattern per shape; `normalize`
tokenises in Python where that cannot be used. `placeholder_spans` finds the placeholders in
a rewritten text so that each statement's own literals are put back. `DecisionCache` holds
one analyser's decisions by exact text and by shape; a new shape is trusted only once it
gives what the statement that made it gives analysed as it is.

Per-statement hot code: keep it free of extra layers. Pure: no I/O, no logging; literals
are only ever put back into the text sent to the server and into subject keys.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

from pglast import parse_sql
from pglast.parser import ParseError, scan
from pglast.parser import normalize as normalize_literals

from audit.redaction import LITERAL_TOKENS, PLACEHOLDER_BASE
from rules import prepare
from rules.analyzer import Analyzer
from rules.decision import Decision, evolve, with_audit_text
from rules.subjects import SubjectKeys, literal_keys

CACHE_SIZE = 10_000
LARGE_STATEMENT = 64 * 1024  # characters; longer statements skip the shape and text caches
_PLACEHOLDER = re.compile(r"\$(9\d{5})(?!\d)")
_FALLBACK = object()
_MAX_LITERALS = 99_999  # placeholders stay $900000-$999999, six digits
_SELECT = ("select",)


def _glues(char: str) -> bool:
    """Whether a placeholder written right after `char` would join it into one token."""
    return char.isalnum() or char in "_$" or ord(char) > 127


def normalize(sql: str) -> tuple[str, list[str]] | None:
    """`sql` with each literal replaced by a parameter placeholder, and the literals' text.

    None when there is nothing to replace or the text cannot be tokenised. (pglast's token
    offsets count characters, inclusive of the end.)
    """
    if _PLACEHOLDER.search(sql):
        # the text itself spells a placeholder (in an identifier, a comment, a parameter):
        # substituting literals back could then land inside it and change the statement
        return None
    try:
        tokens = scan(sql)
    except ParseError:
        return None
    literals: list[str] = []
    out: list[str] = []
    pos = 0
    for t in tokens:
        if t.name in LITERAL_TOKENS:
            if t.start and _glues(sql[t.start - 1]):
                return None  # `WHERE'f'`: the placeholder would join the word
            out.append(sql[pos : t.start])
            out.append(f"${PLACEHOLDER_BASE + len(literals)}")
            literals.append(sql[t.start : t.end + 1])
            pos = t.end + 1
    if not literals or len(literals) > _MAX_LITERALS:
        return None
    out.append(sql[pos:])
    return "".join(out), literals


def _literal_keys(keys: tuple[SubjectKeys, ...], literals: list[str]) -> tuple[SubjectKeys, ...]:
    """Subject keys found on the placeholder text, with the literals put back (a table
    whose literal cannot be read has none: its subjects are then not complete)."""

    def token_of(number: int) -> str | None:
        if number < PLACEHOLDER_BASE:
            return None  # a parameter of the client's
        i = number - PLACEHOLDER_BASE
        return literals[i] if i < len(literals) else ""

    out = []
    for named in keys:
        resolved = literal_keys(named, token_of)
        if resolved is not None:
            out.append(resolved)
    return tuple(out)


def _agree(shaped: Decision, direct: Decision) -> bool:
    """Whether the decision from a shape is the one the statement gets analysed as it is:
    the same action, tables, columns, subjects and settings (`SET client_encoding = $1`
    cannot say which encoding), and a rewrite that parses the same."""
    if (
        shaped.action,
        shaped.tables,
        shaped.columns,
        shaped.denied,
        shaped.subject_keys,
        shaped.row_subjects,
        shaped.settings,
    ) != (
        direct.action,
        direct.tables,
        direct.columns,
        direct.denied,
        direct.subject_keys,
        direct.row_subjects,
        direct.settings,
    ):
        return False
    if shaped.action != "rewrite":
        return True
    try:
        return bool(parse_sql(shaped.sql or "") == parse_sql(direct.sql or ""))
    except ParseError:
        return False


def placeholder_spans(sql: str) -> list[tuple[int, int, int]] | None:
    """Where the literal placeholders stand in pgveil's rewritten text, as real parameter
    tokens: (start, end, literal index). Text that only spells a placeholder (inside a
    quoted identifier, say U&"\0024900000") is not a parameter token and is never
    replaced. None when the text cannot be tokenised."""
    try:
        tokens = scan(sql)
    except ParseError:
        return None
    spans = []
    for t in tokens:
        if t.name == "PARAM":
            m = _PLACEHOLDER.fullmatch(sql[t.start : t.end + 1])
            if m is not None:
                spans.append((t.start, t.end + 1, int(m.group(1)) - PLACEHOLDER_BASE))
    return spans


# a literal as pg_query_normalize replaces it: a string (with an optional E/B/X/N prefix),
# a number with an optional sign, or a keyword constant
_LITERAL_AT = re.compile(
    r"""(?:[eE]'(?:[^'\\]|\\.|'')*'"""
    r"""|[bBxXnN]?'(?:[^']|'')*'"""
    r"""|-?\s*(?:0[xXoObB][0-9a-fA-F_]+|(?:\d[\d_]*\.?[\d_]*|\.\d[\d_]*)(?:[eE][+-]?\d+)?)"""
    r"""|(?i:true|false|null))"""
)
_PG_PLACEHOLDER = re.compile(r"\$(\d+)")


def literals_of(
    sql: str, normalized: str, glued: Callable[[str], bool] | None = None
) -> list[str] | None:
    """The literals of `sql` in order, given libpg_query's normalisation of it (each
    literal replaced by $1, $2, ...), or None when they cannot be told for certain: the
    text holds a `$`, or putting the literals back does not give `sql` exactly."""
    if "$" in sql:
        return None
    out: list[str] = []
    pos = 0  # in sql
    last = 0  # in normalized
    for m in _PG_PLACEHOLDER.finditer(normalized):
        piece = normalized[last : m.start()]
        if sql[pos : pos + len(piece)] != piece:
            return None
        pos += len(piece)
        lit = _LITERAL_AT.match(sql, pos)
        if lit is None or int(m.group(1)) != len(out) + 1:
            return None
        if glued is not None and pos and glued(sql[pos - 1]):
            return None  # `WHERE'f'`, `N'x'`: the placeholder would join the word
        out.append(lit.group(0))
        pos = lit.end()
        last = m.end()
    return out if sql[pos:] == normalized[last:] else None


def fast_normalize(sql: str) -> tuple[str, list[str]] | None:
    """Like `normalize`, from libpg_query's normalisation (C, several times faster than
    tokenising in Python). None when it cannot be used: the text holds a `$` (so not every
    parameter in the result is a literal), the literals cannot be read back exactly, or one
    carries a sign (put back next to an operator it could form a comment: `x-$1` with -3).

    The literals are read back as `literals_of` reads them, by one pattern per normalised
    text (compiled once: statements that differ only in literals normalise alike)."""
    if "$" in sql:
        return None
    try:
        normalized = normalize_literals(sql)
    except ParseError:
        return None
    if normalized == sql:
        return None
    reader = _READERS.get(normalized)
    if reader is None:
        if len(_READERS) >= CACHE_SIZE:
            _READERS.clear()
        reader = _READERS[normalized] = _literal_reader(normalized)
    if reader is _UNREADABLE:
        return None
    if reader is _MANY:
        return _read_literals(sql, normalized)
    shape, pattern, joined = reader
    match = pattern.fullmatch(sql)
    if match is None:
        return None
    literals: list[str] = list(match.groups())
    for lit in literals:
        if lit[:1] == "-":
            return None
    for i in joined:
        # this literal follows the one before it directly: what ends that one must not
        # glue to a placeholder
        if _glues(literals[i - 1][-1]):
            return None
    return shape, literals


# a normalised text's reader: (shape, the pattern that reads its literals from the text it
# came from, the literals that follow another one directly), or _UNREADABLE
_Reader = tuple[str, "re.Pattern[str]", tuple[int, ...]]
_UNREADABLE: Any = object()
_MANY: Any = object()  # more literals than a pattern is worth compiling for (bulk VALUES)
_MANY_LITERALS = 64
_READERS: dict[str, Any] = {}


def _read_literals(sql: str, normalized: str) -> tuple[str, list[str]] | None:
    literals = literals_of(sql, normalized, glued=_glues)
    if literals is None or len(literals) > _MAX_LITERALS or any(lit[:1] == "-" for lit in literals):
        return None
    return _shape_text(normalized), literals


def _shape_text(normalized: str) -> str:
    return _PG_PLACEHOLDER.sub(lambda m: f"${PLACEHOLDER_BASE + int(m.group(1)) - 1}", normalized)


def _literal_reader(normalized: str) -> Any:
    """What `literals_of` checks, turned into a pattern: the text between placeholders
    exactly, and at each placeholder one literal as `_LITERAL_AT.match` reads it (an atomic
    group: no other split of the text is tried). A placeholder after text that would glue
    to it, numbers out of order, or too many literals: unreadable, always."""
    parts: list[str] = []
    joined: list[int] = []
    last = 0
    count = 0
    for m in _PG_PLACEHOLDER.finditer(normalized):
        piece = normalized[last : m.start()]
        if int(m.group(1)) != count + 1:
            return _UNREADABLE
        if piece:
            if _glues(piece[-1]):
                return _UNREADABLE
        elif count:
            joined.append(count)
        parts.append(re.escape(piece))
        parts.append(f"((?>{_LITERAL_AT.pattern}))")
        count += 1
        last = m.end()
        if count > _MANY_LITERALS:
            return _MANY
    if count == 0:
        return _UNREADABLE
    parts.append(re.escape(normalized[last:]))
    return (_shape_text(normalized), re.compile("".join(parts)), tuple(joined))


def _substitute(sql: str, spans: list[tuple[int, int, int]], literals: list[str]) -> str | None:
    """`sql` with the literals put back at the placeholder tokens; None if a placeholder
    does not belong to a literal (then the statement is analysed as sent)."""
    if any(not 0 <= i < len(literals) for _, _, i in spans):
        return None
    out: list[str] = []
    pos = 0
    for start, end, i in spans:
        out.append(sql[pos:start])
        out.append(literals[i])
        pos = end
    out.append(sql[pos:])
    return "".join(out)


def prepared_form(d: Decision) -> prepare.Prepared | None:
    """The prepared form of a rewrite made from its shape (rules/prepare.py), or None."""
    shaped = d.shaped
    if shaped is None or d.sql is None:
        return None
    entry, literals = shaped
    analysed: Decision = entry[0]
    spans: list[tuple[int, int, int]] = entry[1]
    holder: list[prepare.ShapeForm | None] = entry[2]
    form = holder[0]
    if form is None:
        assert analysed.sql is not None
        form = holder[0] = prepare.shape_form(analysed.sql, spans)
    if form is prepare.NOT_PREPARABLE:
        return None
    assert analysed.sql is not None
    return prepare.prepared(form, analysed.sql, spans, literals, d.sql)


class CacheCounts:
    """Lookups in decision caches, for the metrics: `hits` and `misses`. The proxy gives
    every cache it makes the same one, so the counts outlive the caches: a rules reload or
    a catalog change replaces a database's cache, and a Prometheus counter must never go
    down while the process lives."""

    def __init__(self) -> None:
        self.hits = 0
        self.misses = 0


class DecisionCache:
    """The decisions of one analyser, by statement text and by shape (see above), bounded.
    `refusal`: while set (the rules do not match the catalog), every statement that is not
    `audit_only` is refused with it. `counts` counts lookups for the metrics (its own when
    none is given; see CacheCounts)."""

    def __init__(
        self, analyzer: Analyzer, refusal: str | None = None, counts: CacheCounts | None = None
    ) -> None:
        self.analyzer = analyzer
        self.refusal = refusal
        self._cache: dict[str, Decision] = {}
        self._audit_cache: dict[str, Decision] = {}  # audit-only decisions (no rewritten text)
        # normalized text -> (Decision, placeholder spans) or _FALLBACK
        self._shapes: dict[str, object] = {}
        self.counts = counts if counts is not None else CacheCounts()

    def analyze(self, sql: str, *, audit_only: bool = False) -> Decision:
        """The decision for `sql`, from the cache when possible. Statements that differ
        only in literals share one analysis: it is done once on the text with literals
        replaced by placeholders, and the rewritten text gets the literals back. When the
        decision could depend on a literal (the placeholder version is refused), the
        statement is analysed as it is.

        `audit_only`: the caller records the statement and sends it as it is (an unmasked
        session): a rewrite's text is not built, and the decision's `sql` is None.

        While the rules do not match the catalog (`refusal`), every statement that is not
        `audit_only` is refused with that reason."""
        if self.refusal is not None and not audit_only:
            return with_audit_text(Decision("refuse", reason=self.refusal), sql)
        if len(sql) > LARGE_STATEMENT:
            # a bulk statement: analysed as it is, never cached (the caches hold statements
            # by count, and reading literals back compiles a pattern of the whole text)
            self.counts.misses += 1
            return with_audit_text(self.analyzer.analyze(sql), sql)
        d = self._cache.get(sql)
        if d is not None:
            self.counts.hits += 1
            return d
        if audit_only:
            d = self._audit_cache.get(sql)
            if d is not None:
                self.counts.hits += 1
                return d
        norm = fast_normalize(sql) or normalize(sql)
        if norm is not None:
            shape, literals = norm
            entry = self._shapes.get(shape)
            fresh = entry is None
            if entry is None:
                self.counts.misses += 1
                entry = self._shape_entry(shape)
            else:
                self.counts.hits += 1
            if audit_only and not fresh:
                decision = self._from_shape(entry, literals, rewrite=False)
                if decision is not None:
                    self._remember(self._audit_cache, sql, decision)
                    return decision
            decision = self._from_shape(entry, literals)
            if fresh:
                # a new shape is trusted only once it gives what the statement that made it
                # gives analysed as it is (a literal glued to a word, a typed literal whose
                # type reads differently before a parameter: the shape would mean otherwise)
                direct = with_audit_text(self.analyzer.analyze(sql), sql)
                if decision is None or not _agree(decision, direct):
                    entry, decision = _FALLBACK, direct
                self._remember(self._shapes, shape, entry)
            if decision is not None:
                # the exact text too: prepared statements repeat it, skip the tokenizer
                self._remember(self._cache, sql, decision)
                return decision
        self.counts.misses += 1
        d = with_audit_text(self.analyzer.analyze(sql), sql)
        self._remember(self._cache, sql, d)
        return d

    @staticmethod
    def _from_shape(entry: object, literals: list[str], rewrite: bool = True) -> Decision | None:
        """The decision a shape's analysis gives the statement: its literals put back
        (into the rewritten text too, unless `rewrite` is False: then `sql` is None)."""
        if not isinstance(entry, tuple):
            return None
        decision: Decision = entry[0]
        spans: list[tuple[int, int, int]] = entry[1]
        changes: dict[str, Any] = {}
        if decision.action == "rewrite":
            assert decision.sql is not None
            if rewrite:
                rewritten = _substitute(decision.sql, spans, literals)
                if rewritten is None:
                    return None
                changes["sql"] = rewritten
                if decision.kinds == _SELECT:
                    changes["shaped"] = (entry, literals)
            else:
                count = len(literals)
                for _, _, i in spans:  # (a loop, not a generator: once per statement)
                    if not 0 <= i < count:
                        return None  # as _substitute would decline it
                changes["sql"] = None
        if decision.subject_keys:
            changes["subject_keys"] = _literal_keys(decision.subject_keys, literals)
        return evolve(decision, changes) if changes else decision

    def _shape_entry(self, shape: str) -> object:
        # (analysed decision, placeholder spans, [its prepared form, made when first asked])
        analysed = self.analyzer.analyze(shape)
        if analysed.action == "refuse":
            return _FALLBACK
        analysed = with_audit_text(analysed, shape)
        spans: list[tuple[int, int, int]] = []
        if analysed.action == "rewrite":
            assert analysed.sql is not None
            found = placeholder_spans(analysed.sql)
            if found is None:
                return _FALLBACK
            spans = found
        return (analysed, spans, [None])

    @staticmethod
    def _remember(cache: dict[str, Any], key: str, value: object) -> None:
        if len(cache) >= CACHE_SIZE:
            cache.clear()  # simple and bounded; a hot working set refills at once
        cache[key] = value
