"""What a masked session consults: the analyser with its statement cache, the protection
map, the identifiers that are safe to show in error messages, and the startup checks.

One `MaskingContext` per (policy version, database catalog); shared by the sessions of that
database. It also holds the rules checked against that catalog (`rules.check`): while they
do not match, masked logins and every statement of a masked session are refused.
Pure: no I/O.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from collections.abc import Callable, Collection, Sequence
from typing import Any

from pglast import parse_sql
from pglast.parser import ParseError, scan
from pglast.parser import normalize as normalize_literals

from rules.analyzer import Analyzer, Decision, SubjectKeys
from rules.catalog import Catalog, ProtectionMap
from rules.check import check_policy, summary
from rules.masks import ColumnType, mask_json_value, py_mask
from rules.model import Classification, Policy
from rules.startup import masked_refusal
from rules.subjects import literal_keys

CACHE_SIZE = 10_000
LARGE_STATEMENT = 64 * 1024  # characters; longer statements skip the shape and text caches
_LITERAL_TOKENS = frozenset({"SCONST", "ICONST", "FCONST", "BCONST", "XCONST", "USCONST"})
_WORD_TOKENS = frozenset({"IDENT", "UIDENT"})  # names (or, in a text that does not parse, values)
_PLACEHOLDER_BASE = 900_000  # $900000+: far above any parameter number a client uses
_PLACEHOLDER = re.compile(r"\$(9\d{5})(?!\d)")
_FALLBACK = object()
_MAX_LITERALS = 99_999  # placeholders stay $900000-$999999, six digits


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
        if t.name in _LITERAL_TOKENS:
            if t.start and _glues(sql[t.start - 1]):
                return None  # `WHERE'f'`: the placeholder would join the word
            out.append(sql[pos : t.start])
            out.append(f"${_PLACEHOLDER_BASE + len(literals)}")
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
        if number < _PLACEHOLDER_BASE:
            return None  # a parameter of the client's
        i = number - _PLACEHOLDER_BASE
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
                spans.append((t.start, t.end + 1, int(m.group(1)) - _PLACEHOLDER_BASE))
    return spans


def redact(sql: str, names: bool = True) -> str:
    """The statement as an audit event may show it: its tokens, every literal replaced by
    `?`, comments dropped. A text that cannot be tokenised is not shown at all. pgveil's own
    literal placeholders (see `normalize`) count as literals, so a statement and its shape
    read the same.

    `names` False (a text that does not parse: nothing tells a name from a value typed
    without quotes, `WHERE name = Ann Smith`): only reserved keywords, operators and
    punctuation are shown; every other word is `?` too."""
    try:
        tokens = scan(sql)
    except ParseError:
        return "<not shown: cannot be tokenised>"
    out = []
    for t in tokens:
        text = sql[t.start : t.end + 1]
        literal = t.name in _LITERAL_TOKENS or (t.name == "PARAM" and _is_placeholder(text))
        word = t.name in _WORD_TOKENS or t.kind not in ("RESERVED_KEYWORD", "NO_KEYWORD")
        out.append("?" if literal or (word and not names) else text)
    return " ".join(out)


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
    return _PG_PLACEHOLDER.sub(lambda m: f"${_PLACEHOLDER_BASE + int(m.group(1)) - 1}", normalized)


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


def _is_placeholder(param: str) -> bool:
    return param[1:].isdigit() and int(param[1:]) >= _PLACEHOLDER_BASE


def with_audit_text(d: Decision, analysed: str) -> Decision:
    """`d` with the redacted text of the statement it was made for, and its fingerprint."""
    text = redact(analysed, names=not d.syntax)
    return dataclasses.replace(d, redacted=text, fingerprint=_fingerprint(text))


def _fingerprint(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _evolve(d: Decision, changes: dict[str, Any]) -> Decision:
    """`dataclasses.replace` for the hot path: a copy of the frozen decision's attributes,
    without running __init__ (several times faster; no field here has a post-init)."""
    new: Decision = object.__new__(Decision)
    attributes = new.__dict__
    attributes.update(d.__dict__)
    attributes.update(changes)
    return new


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


class ContextHolder:
    """The current MaskingContext of a database. Sessions keep the holder, not the
    context, so a catalog refresh or a rules reload reaches sessions that are already open.
    `stale` asks the shell for an early refresh (a statement named an unknown relation).

    The audit also asks when relation names may no longer denote what the catalog read
    says: a statement that creates or replaces a view, renames, moves or drops relations,
    or runs code that may (DO, CALL) went to the server. Until a catalog read that began
    after its transaction ended is in (`unsure`), every session's statements that name
    relations are recorded as uncertain. The shell counts the reads (`reads_begun`, and
    `reads_done`: the latest one whose result is in `context`)."""

    def __init__(self, context: MaskingContext) -> None:
        self.context = context
        self.stale = False
        self.reads_begun = 0
        self.reads_done = 0
        self.moved_until = 0  # the read that must be in before names are certain again

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
    ) -> None:
        """`roles`: every role name of the cluster (checked against the rules' roles when
        given); `database`: the database `catalog` was read from."""
        self.policy = policy
        self.catalog = catalog
        self.database = database
        self.pmap = ProtectionMap(policy, catalog, previous)
        # the rules checked against this catalog: while a problem closes masked sessions,
        # every statement of a masked session is refused (open sessions too: they hold the
        # holder, which gets this context), never analysed against rules that protect less
        # than they say
        self.problems = check_policy(policy, catalog, roles, database)
        self.refusal = self._masked_refusal()
        self.default_refusal = self._default_refusal()
        self.analyzer = Analyzer(self.pmap)
        self._cache: dict[str, Decision] = {}
        self._audit_cache: dict[str, Decision] = {}  # audit-only decisions (no rewritten text)
        # normalized text -> (Decision, placeholder spans) or _FALLBACK
        self._shapes: dict[str, object] = {}
        self.cache_hits = 0
        self.cache_misses = 0
        names: set[str] = set()
        for (schema, rel), r in catalog.relations.items():
            names.add(schema)
            names.add(rel)
            names.update(c.name for c in r.columns)
        self.identifiers = frozenset(names)

    def _masked_refusal(self) -> str | None:
        db = self.database
        if db is not None and not self.policy.covers(db):
            listed = ", ".join(self.policy.databases or ())
            return (
                f"the rules are not for database {db} (databases: {listed}); masked roles "
                "may not use it"
            )
        closing = [p for p in self.problems if p.effect == "masked"]
        if not closing:
            return None
        where = f"database {db}" if db is not None else "the database"
        return (
            f"the rules do not match {where}: {summary(closing)}; masked sessions are "
            "refused until the rules are fixed"
        )

    def _default_refusal(self) -> str | None:
        missing = [p for p in self.problems if p.effect == "default"]
        if not missing or self.policy.default != "unmasked":
            return None
        return (
            f"{summary(missing)}; logins that only roles.default makes unmasked are refused "
            "until the rules are fixed"
        )

    def admission(self, roles: frozenset[str]) -> tuple[Classification, str | None]:
        """How a login is classified (`roles`: itself and every role it belongs to,
        transitively), and why it may not log in on this database, if it may not: a
        masked login while the rules do not match the database; a login that is unmasked
        only by `roles.default` while a masked role of the rules does not exist (it may be
        the misspelling of one of its roles). Logins listed as unmasked always go on."""
        classification = self.policy.classify(roles)
        if classification == "masked":
            return classification, self.refusal
        if self.default_refusal is not None and not roles & self.policy.unmasked_roles:
            return classification, self.default_refusal
        return classification, None

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
            self.cache_misses += 1
            return with_audit_text(self.analyzer.analyze(sql), sql)
        d = self._cache.get(sql)
        if d is not None:
            self.cache_hits += 1
            return d
        if audit_only:
            d = self._audit_cache.get(sql)
            if d is not None:
                self.cache_hits += 1
                return d
        norm = fast_normalize(sql) or normalize(sql)
        if norm is not None:
            shape, literals = norm
            entry = self._shapes.get(shape)
            fresh = entry is None
            if entry is None:
                self.cache_misses += 1
                entry = self._shape_entry(shape)
            else:
                self.cache_hits += 1
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
        self.cache_misses += 1
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
            elif any(not 0 <= i < len(literals) for _, _, i in spans):
                return None  # as _substitute would decline it
            else:
                changes["sql"] = None
        if decision.subject_keys:
            changes["subject_keys"] = _literal_keys(decision.subject_keys, literals)
        return _evolve(decision, changes) if changes else decision

    def _shape_entry(self, shape: str) -> object:
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
        return (analysed, spans)

    @staticmethod
    def _remember(cache: dict[str, Any], key: str, value: object) -> None:
        if len(cache) >= CACHE_SIZE:
            cache.clear()  # simple and bounded; a hot working set refills at once
        cache[key] = value

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
        from rules.model import MaskSpec

        masked = mask_json_value(doc, MaskSpec("json", keys=rule.keys), self.policy.keys)
        return json.dumps(masked, ensure_ascii=False, separators=(",", ":"))
