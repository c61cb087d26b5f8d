"""Attacks on the statement-shape cache, mainly its libpg_query fast path (`fast_normalize`).

A masked statement is cut into a shape (literals replaced by $900000, $900001, ...) and its
literal texts; the shape is analysed once and the literal texts are put back at the
placeholder parameter tokens of the rewritten text. Whatever the literals look like, the
result must mean what the full analysis of the statement means: the same decision (action,
kinds, tables, masked columns, reason) and, for a rewrite, the same parse tree.

The tests are hand-written cases per literal form and neighbourhood (comments, quotes,
operators, escapes, number syntaxes, keyword constants, several statements), the cases the
fast path must leave to the tokenising path, and a generative differential test (fast vs
full analysis) over statements built from the billing fixtures. Some tests pin defects of
the shape machinery (placeholders glued to the preceding word, `char 'x'` reparsed as
char(1), parentheses lost around a subscripted NULL, more than 100000 literals, subject
keys of non-decimal integers); they state the behaviour expected of a correct cache.
"""

from __future__ import annotations

import re

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from pglast import parse_sql
from pglast.parser import ParseError, scan
from pglast.parser import normalize as normalize_literals

from audit.redaction import LITERAL_TOKENS
from rules.context import MaskingContext
from rules.decision import Decision
from rules.loader import parse_rules
from rules.shapes import _PLACEHOLDER, _glues, _shape_text, fast_normalize, literals_of
from tests.unit.rules.fixtures import CATALOG, RULES

_KEYWORD_CONSTANTS = frozenset({"NULL_P", "TRUE_P", "FALSE_P"})
_SLOT = "\x00"  # a literal slot in a generated statement template


def _ctx() -> MaskingContext:
    return MaskingContext(parse_rules(RULES, "r", {"K": "k" * 32}), CATALOG)


@pytest.fixture
def ctx() -> MaskingContext:
    return _ctx()


def _summary(d: Decision) -> tuple[object, ...]:
    return (d.action, d.kinds, d.tables, d.columns, d.reason)


def _assert_agrees(ctx: MaskingContext, sql: str) -> Decision:
    """The cached path's decision for `sql` is the full analysis' decision."""
    cached = ctx.analyze(sql)
    full = ctx.analyzer.analyze(sql)
    assert _summary(cached) == _summary(full), sql
    if full.action == "rewrite":
        assert cached.sql is not None and full.sql is not None
        assert parse_sql(cached.sql) == parse_sql(full.sql), (sql, cached.sql, full.sql)
    return cached


def _assert_sound_normalisation(sql: str, shape: str, literals: list[str]) -> None:
    """What `fast_normalize` returned describes `sql` exactly: the literals put back give
    `sql`, each literal is one literal token, and the shape tokenises as `sql` does with
    each literal token replaced by one parameter token (no placeholder glued to a word)."""
    rebuilt = _PLACEHOLDER.sub(lambda m: literals[int(m.group(1)) - 900_000], shape)
    assert rebuilt == sql
    for lit in literals:
        tokens = scan(lit)
        assert len(tokens) == 1, lit
        assert tokens[0].name in LITERAL_TOKENS | _KEYWORD_CONSTANTS, lit
        assert (tokens[0].start, tokens[0].end) == (0, len(lit) - 1), lit
    original = scan(sql)
    shaped = scan(shape)
    assert len(original) == len(shaped), (sql, shape)
    for o, s in zip(original, shaped, strict=True):
        o_text, s_text = sql[o.start : o.end + 1], shape[s.start : s.end + 1]
        if s.name == "PARAM":
            m = _PLACEHOLDER.fullmatch(s_text)
            assert m is not None and literals[int(m.group(1)) - 900_000] == o_text, sql
        else:
            assert (o.name, o_text) == (s.name, s_text), (sql, shape)


def _fast(sql: str) -> tuple[str, list[str]]:
    norm = fast_normalize(sql)
    assert norm is not None, f"the fast path declined {sql!r}"
    return norm


# ---- the fast path is taken, and agrees ------------------------------------------------

C = "SELECT name, email FROM billing.customers c WHERE"

FAST_CASES = [
    # strings holding comment starters, quotes, statement separators, backslashes
    f"{C} name = '--' AND email = '/*'",
    f"{C} name = '*/' OR email = ';' OR phone = '\\'",
    f"{C} name = 'a''b' AND email = '''' AND phone = ''",
    f"{C} name = '\"' AND email = '\"--'",
    f"{C} name = 'line\nbreak' AND email = 'tab\there'",
    f"{C} name = 'é€𝄞' AND email LIKE '%ß%'",
    # escape strings: \' inside, a trailing backslash, doubled quotes
    f"{C} name = E'\\'' AND email = E'\\\\' AND phone = E'a''b'",
    f"{C} name = e'x\\'--' AND email = E'/*\\n*/'",
    f"{C} name = E'\\x41\\101\\u00e9'",
    f"{C} name = E'a\\\\\nb'",  # an escaped backslash, then a line break
    # bit strings and hex strings
    f"{C} name::bit varying = B'1010' AND email::bytea = X'1F' AND phone = x'ff'",
    # number syntaxes
    f"{C} balance = 1.5 AND balance > .5 AND balance < 1. AND balance <> 1e3",
    f"{C} balance = 1.5E-3 AND balance = 2e+2 AND i_customer = 99999999999999999999",
    f"{C} i_customer IN (0x1F, 0o17, 0b101, 1_000, 007)",
    # keyword constants
    f"{C} name IS DISTINCT FROM NULL AND (email = 'x') IS NOT TRUE AND false",
    f"{C} coalesce(name, null) = 'x' OR True",
    # typed literals (with a space), casts, intervals, arrays
    f"{C} i_customer = int '5' AND balance = numeric '1.5' AND name = text 'x'",
    f"{C} now() - interval '1' day < date '2024-01-01' AND varchar 'x' = name",
    f"{C} i_customer = '5'::int AND name = CAST('x' AS text) AND email = ANY('{{a,b}}'::text[])",
    f"{C} name = ANY (ARRAY['a', 'b']) AND i_customer = ANY ('{{1,2}}')",
    # literals next to operators, without spaces
    f"{C} name||'x'='y' AND balance*2/3%4^5>1 AND name~'^a' AND name!~'b'",
    f"{C} c.extra@>'{{\"dl\": \"x\"}}' AND c.extra->>'dl'='y' AND c.extra#>>'{{dl}}'='z'",
    f"{C} |/ 4 = 2 AND @ 1 = 1 AND ~ 5 = 6 AND 2 ^ 3 = 8",
    f"{C} name=('x') AND (1)=1 AND name IN('a','b') AND substr(name,1,2)='ab'",
    # a literal followed by a keyword, without a space
    f"{C} name = 'x'AND email = 'y'OR phone = 'z'",
    "SELECT 'x'ISNULL, 'y'NOTNULL, name FROM billing.customers",
    "SELECT 'x'AS a, '1'AS b FROM billing.customers",
    "SELECT 'x'e5, name FROM billing.customers",
    # literals beside comments
    f"{C} name = 'x'-- 'y'\n AND email = /* 'z' */ 'w'/**/",
    f"{C} name = 'x' /* -- */ AND email = '-- /*'",
    # statements separated by ;
    "SELECT name FROM billing.customers WHERE name = ';'; SELECT 'a;b', email FROM billing.customers",
    "SELECT body FROM public.notes WHERE id = 5; SELECT phone FROM billing.customers WHERE phone = '--'",
    # writes
    "UPDATE billing.customers SET name = 'x', phone = NULL WHERE i_customer = 5 RETURNING email",
    "INSERT INTO billing.customers (i_customer, name, email) VALUES (5, E'a\\'b', NULL)"
    " RETURNING name",
    "DELETE FROM billing.customers c WHERE c.name = 'x' RETURNING c.email, 'y'",
    "INSERT INTO billing.customers (i_customer, name) VALUES (5, 'x') ON CONFLICT (i_customer)"
    " DO UPDATE SET name = EXCLUDED.name, phone = 'y' WHERE customers.email <> 'z'",
    # clauses
    "SELECT name FROM billing.customers ORDER BY 'x', 1 LIMIT 5",
    "SELECT name FROM billing.customers OFFSET 2 ROWS FETCH FIRST 3 ROWS ONLY",
    "SELECT name, count(*) FROM billing.customers GROUP BY 1, 'x' HAVING count(*) > 1",
    "SELECT name FROM billing.customers TABLESAMPLE bernoulli (50) REPEATABLE (1)",
    "SELECT CASE WHEN name = 'x' THEN 'a' ELSE email END FROM billing.customers",
    "SELECT count(*) FILTER (WHERE name <> 'x') OVER (ORDER BY name ROWS 1 PRECEDING)"
    " FROM billing.customers",
    "SELECT name FROM billing.customers c JOIN billing.accounts a ON a.i_customer ="
    " c.i_customer AND a.ip = '10.0.0.1'",
    "SELECT name FROM billing.customers WHERE EXISTS (SELECT 1 FROM billing.accounts a"
    " WHERE a.ip = '1.2.3.4')",
    "EXPLAIN SELECT name FROM billing.customers WHERE i_customer = 5",
    "DECLARE c CURSOR FOR SELECT name FROM billing.customers WHERE i_customer = 5",
    "COPY (SELECT name FROM billing.customers WHERE email = 'x') TO STDOUT",
    "SELECT xmlelement(name foo, xmlattributes('x' AS bar), name) FROM billing.customers",
    "SELECT json_object('a' : name), name IS JSON FROM billing.customers",
    # refusals and passes decided on the shape
    "SELECT cc_number FROM billing.customers WHERE i_customer = 5",
    "SELECT billing.leak('x') FROM billing.customers",
    "SELECT name FROM billing.customers WHERE name ==== 'x'",
    "SELECT body FROM public.notes WHERE body = 'x' AND id = 5",
    "SELECT set_config('application_name', 'x', false)",
    "SELECT set_config('role', 'x', false)",
]


@pytest.mark.parametrize("sql", FAST_CASES)
def test_fast_path_agrees_with_the_full_analysis(ctx: MaskingContext, sql: str) -> None:
    shape, literals = _fast(sql)
    _assert_sound_normalisation(sql, shape, literals)
    _assert_agrees(ctx, sql)


@pytest.mark.parametrize("sql", FAST_CASES)
def test_a_cached_shape_serves_other_literals(sql: str) -> None:
    """The shape was analysed for other literals first: the cached analysis is reused."""
    ctx = _ctx()
    shape, literals = _fast(sql)
    primer = _PLACEHOLDER.sub(lambda m: _other(literals[int(m.group(1)) - 900_000]), shape)
    assert primer != sql and _fast(primer)[0] == shape
    ctx.analyze(primer)
    hits = ctx.cache_hits
    _assert_agrees(ctx, sql)
    assert ctx.cache_hits == hits + 1


def _other(literal: str) -> str:
    """Another literal of the same kind."""
    if "'" in literal:
        return "'p'" if literal != "'p'" else "'q'"
    if literal[:1].isdigit() or literal[:1] == ".":
        return "7" if literal != "7" else "8"
    return "NULL" if literal.upper() != "NULL" else "TRUE"


# ---- forms the fast path must leave to the tokenising path -----------------------------

DECLINED = [
    # a $ anywhere: parameters, dollar quotes, identifiers, comments
    "SELECT name FROM billing.customers WHERE i_customer = $1 AND name = 'x'",
    "SELECT $$x$$, name FROM billing.customers WHERE i_customer = 5",
    'SELECT name AS "a$900000" FROM billing.customers WHERE i_customer = 5',
    "SELECT name FROM billing.customers WHERE i_customer = 5 -- $900000",
    # signs: a literal put back after an operator must not form a comment
    "SELECT name FROM billing.customers WHERE i_customer = -5",
    "SELECT name FROM billing.customers WHERE i_customer = - 5",
    "SELECT name FROM billing.customers WHERE i_customer = -\n5",
    "SELECT name FROM billing.customers WHERE i_customer = - /* c */ 5",
    "SELECT name FROM billing.customers WHERE i_customer = -(5)",
    "SELECT name FROM billing.customers WHERE i_customer = - -5",
    "SELECT name FROM billing.customers WHERE i_customer -- 5",
    # strings the regular expression cannot read back
    "SELECT name FROM billing.customers WHERE name = U&'d\\0061t'",
    "SELECT name FROM billing.customers WHERE name = U&'d!0061t' UESCAPE '!'",
    "SELECT name FROM billing.customers WHERE name = 'a'\n'b'",
    "SELECT name FROM billing.customers WHERE name = 'a' -- c\n'b'",
    "SELECT name FROM billing.customers WHERE name = E'a\\\nb'",
    # constants the grammar makes of words, and placeholders out of textual order
    "SELECT name FROM billing.customers LIMIT ALL",
    "SELECT name, EXTRACT(year FROM now()) FROM billing.customers",
    "SELECT name, TIMESTAMP '2024-01-01' AT TIME ZONE 'UTC' FROM billing.customers",
    "WITH w AS (SELECT 1) SELECT name FROM billing.customers WHERE i_customer = 2",
    "SELECT name FROM billing.customers LIMIT 5 OFFSET 3",
    "SELECT 'a' || name FROM billing.customers GROUP BY 'b' || name",
    "SET search_path = billing",
    # nothing to replace
    "SELECT name FROM billing.customers ORDER BY 1",
]


@pytest.mark.parametrize("sql", DECLINED)
def test_unsure_forms_take_the_tokenising_path(ctx: MaskingContext, sql: str) -> None:
    assert fast_normalize(sql) is None
    _assert_agrees(ctx, sql)


# ---- generated statements -----------------------------------------------------------------

_SEP = st.sampled_from([" ", "  ", "\n", "\t", " /* c */ ", " -- c\n", "\n\n "])
# after punctuation a literal may follow without any space
_TIGHT = st.sampled_from(["", " ", "\n", "/**/", " -- c\n"])
_COLS = st.sampled_from(
    [
        "name", "email", "phone", "login", "extra", "balance", "i_customer", "c.name",
        "c.email", "c.phone", "c.i_customer", "cc_number",
    ]
)  # fmt: skip
_TYPES = st.sampled_from(
    [
        "int", "bigint", "text", "date", "numeric", "interval", "varchar", "jsonb", "boolean",
        "int[]", "text[]", "real", "timestamp", "bytea",
    ]
)  # fmt: skip
_OPS = st.sampled_from(
    [
        "=", "<>", "<", ">=", "||", "+", "*", "/", "%", "^", "~", "!~", "~~", "LIKE", "ILIKE",
        "IS DISTINCT FROM", "-", "<<", "@>", "->>", "#>>", "&", "|", "#",
    ]
)  # fmt: skip
_BODY = st.text(alphabet="ab '\\\"é€𝄞-/*;\n", max_size=6)


def _quoted(body: str) -> str:
    return "'" + body.replace("'", "''") + "'"


def _escaped(body: str) -> str:
    return "E'" + body.replace("\\", "\\\\").replace("'", "\\'").replace("\n", "\\n") + "'"


_NUMBERS = st.one_of(
    st.integers(0, 10**20).map(str),
    st.integers(0, 10**7).map(lambda n: f"{n:_}"),
    st.integers(0, 2**40).map(hex),
    st.integers(0, 2**20).map(oct),
    st.integers(0, 2**20).map(bin),
    st.integers(0, 999).map(lambda n: f"{n:05d}"),
    st.tuples(st.integers(0, 999), st.integers(0, 999), st.integers(-9, 9)).flatmap(
        lambda t: st.sampled_from(
            [f"{t[0]}.{t[1]}", f".{t[1]}", f"{t[0]}.", f"{t[0]}e{t[2]}", f"{t[0]}.{t[1]}E+3"]
        )
    ),
)
_BASIC = st.one_of(
    _NUMBERS,
    _BODY.map(_quoted),
    _BODY.map(_escaped),
    _BODY.map(lambda b: "e'" + b.replace("\\", "\\\\").replace("'", "''") + "'"),
    st.sampled_from(["B'1010'", "b''", "X'1F'", "x'ff'", "'{1,2}'", "'{\"dl\": 1}'"]),
    st.sampled_from(["NULL", "null", "TRUE", "true", "False", "FALSE"]),
    # fast path declines these: the tokenising path answers
    st.sampled_from(["-5", "- 1.5", "U&'d\\0061t'", "'a'\n'b'"]),
)


@st.composite
def _literals(draw: st.DrawFn) -> str:
    lit: str = draw(_BASIC)
    wrap = draw(st.integers(0, 9))
    if wrap == 0 and lit.startswith("'"):
        # typed literal, with a space: `char`/`bit` and glued forms are pinned separately
        return f"{draw(_TYPES.filter(lambda t: '[' not in t))} {lit}"
    if wrap == 1:
        return f"{lit}::{draw(_TYPES)}"
    if wrap == 2:
        return f"CAST({lit} AS {draw(_TYPES)})"
    if wrap == 3:
        return f"({lit})"
    if wrap == 4 and lit.startswith("'"):
        return f"interval {lit} {draw(st.sampled_from(['day', 'hour', 'minute to second']))}"
    return lit


def _expr(draw: st.DrawFn, depth: int = 0) -> str:
    s, t = draw(_SEP), draw(_TIGHT)
    kind = draw(st.integers(0, 9 if depth < 2 else 1))
    if kind == 0:
        return _SLOT
    if kind == 1:
        return draw(_COLS)
    if kind <= 4:
        return f"{_expr(draw, depth + 1)}{s}{draw(_OPS)}{s}{_expr(draw, depth + 1)}"
    if kind == 5:
        fn = draw(st.sampled_from(["upper", "coalesce", "length", "md5", "format", "lower"]))
        return f"{fn}({t}{_expr(draw, depth + 1)})"
    if kind == 6:
        return f"substr({draw(_COLS)},{t}{_SLOT},{t}{_SLOT})"
    if kind == 7:
        return (
            f"CASE WHEN {_pred(draw, depth + 1)} THEN{s}{_SLOT} ELSE{s}{_expr(draw, depth + 1)} END"
        )
    if kind == 8:
        return f"ARRAY[{t}{_SLOT},{t}{_SLOT}]"
    return f"({t}{_expr(draw, depth + 1)})"


def _pred(draw: st.DrawFn, depth: int = 0) -> str:
    s, t = draw(_SEP), draw(_TIGHT)
    col = draw(_COLS)
    kind = draw(st.integers(0, 9 if depth < 2 else 4))
    if kind == 0:
        return f"{col}{s}{draw(_OPS)}{s}{_SLOT}"
    if kind == 1:
        return f"{_SLOT}{s}={t}{col}"
    if kind == 2:
        return f"{col} IN ({t}{_SLOT},{t}{_SLOT})"
    if kind == 3:
        return f"{col} BETWEEN{s}{_SLOT}{s}AND{s}{_SLOT}"
    if kind == 4:
        return f"{col} LIKE{s}{_SLOT} ESCAPE{s}{_SLOT}"
    if kind == 5:
        return f"{_expr(draw, depth + 1)}{s}={t}{_expr(draw, depth + 1)}"
    if kind == 6:
        return f"{_pred(draw, depth + 1)}{s}AND{s}{_pred(draw, depth + 1)}"
    if kind == 7:
        return f"NOT ({t}{_pred(draw, depth + 1)}) OR{s}{_pred(draw, depth + 1)}"
    if kind == 8:
        return f"EXISTS (SELECT 1 FROM billing.accounts a WHERE a.ip ={t}{_SLOT})"
    return f"c.extra ->>{t}{_SLOT} ={t}{_SLOT}"


def _item(draw: st.DrawFn) -> str:
    kind = draw(st.integers(0, 3))
    if kind == 0:
        return draw(_COLS)
    if kind == 1:
        return f"{_expr(draw)} AS v"
    if kind == 2:
        return _SLOT
    return f"upper({draw(_COLS)})"


def _select(draw: st.DrawFn) -> str:
    s = draw(_SEP)
    items = ", ".join(_item(draw) for _ in range(draw(st.integers(1, 3))))
    tail = draw(
        st.sampled_from(
            [
                "",
                f" LIMIT{s}{_SLOT}",
                f" OFFSET{s}{_SLOT}",
                f" ORDER BY{s}{_SLOT}",
                " ORDER BY 1",
                f" GROUP BY 1, {draw(_COLS)}",
                f" FETCH FIRST{s}{_SLOT} ROWS ONLY",
                " FOR UPDATE",
                f" UNION ALL SELECT{s}{_SLOT}",
            ]
        )
    )
    table = draw(
        st.sampled_from(
            [
                "billing.customers c",
                "billing.customers c JOIN billing.accounts a ON a.i_customer = c.i_customer",
                "billing.customers_eu c",
                "public.notes c",
            ]
        )
    )
    return f"SELECT{s}{items} FROM {table} WHERE{s}{_pred(draw)}{tail}"


@st.composite
def _templates(draw: st.DrawFn) -> str:
    s, t = draw(_SEP), draw(_TIGHT)
    kind = draw(st.integers(0, 8))
    if kind <= 2:
        return _select(draw)
    if kind == 3:
        return (
            f"UPDATE billing.customers c SET name ={t}{_expr(draw)}, phone ={s}{_SLOT}"
            f" WHERE{s}{_pred(draw)} RETURNING{s}{_expr(draw)}"
        )
    if kind == 4:
        return (
            "INSERT INTO billing.customers (i_customer, name, email) VALUES"
            f" ({t}{_SLOT},{t}{_SLOT},{t}{_expr(draw)}) RETURNING email"
        )
    if kind == 5:
        return f"DELETE FROM billing.customers c WHERE{s}{_pred(draw)} RETURNING{s}{_expr(draw)}"
    if kind == 6:
        return f"{_select(draw)};{s}{_select(draw)}"
    if kind == 7:
        return (
            f"WITH w AS (SELECT {_expr(draw)} AS v, name FROM billing.customers c)"
            f" SELECT v, name FROM w WHERE{s}{_pred(draw)}"
        )
    return f"{draw(st.sampled_from(['EXPLAIN', 'DECLARE k CURSOR FOR']))} {_select(draw)}"


def _fill(template: str, literals: list[str]) -> str:
    pieces = template.split(_SLOT)
    out = [pieces[0]]
    for lit, piece in zip(literals, pieces[1:], strict=True):
        out.extend((lit, piece))
    return "".join(out)


@st.composite
def _statement_pairs(draw: st.DrawFn) -> tuple[str, str]:
    """Two statements of one template: same structure, independent literals."""
    template = draw(_templates())
    n = template.count(_SLOT)
    first = draw(st.lists(_literals(), min_size=n, max_size=n))
    second = draw(st.lists(_literals(), min_size=n, max_size=n))
    return _fill(template, first), _fill(template, second)


def _parses(sql: str) -> bool:
    try:
        parse_sql(sql)
    except ParseError:
        return False
    return True


@settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
@given(pair=_statement_pairs())
def test_generated_statements_agree_with_the_full_analysis(pair: tuple[str, str]) -> None:
    """Fast path vs full analysis, the second statement reusing the first one's shape."""
    first, second = pair
    assume(_parses(first) and _parses(second))
    ctx = _ctx()
    for sql in (first, second):
        norm = fast_normalize(sql)
        if norm is not None:
            _assert_sound_normalisation(sql, *norm)
        _assert_agrees(ctx, sql)


# ---- defects of the shape machinery ------------------------------------------------------


@pytest.mark.parametrize(
    "sql",
    [
        # N'...' is NCHAR + a string token: the placeholder lands right after the N
        "SELECT name FROM billing.customers WHERE name = N'Bob'",
        "SELECT name, n'x' FROM billing.customers",
        # a typed literal written without a space
        "SELECT name FROM billing.customers WHERE i_customer = int'5'",
        "SELECT name FROM billing.customers WHERE now() > date'2024-01-01'",
        "SELECT name FROM billing.customers WHERE name = text'x'",
    ],
)
def test_a_literal_glued_to_a_word_keeps_its_meaning(ctx: MaskingContext, sql: str) -> None:
    """`N'Bob'` / `int'5'` become the shape `N$900000` / `int$900000`: one identifier, not a
    word and a parameter. The rewrite then reads a column "n$900000" and the literal is lost
    (and with it the statement's subject keys)."""
    _assert_agrees(ctx, sql)
    assert ctx.analyze(sql).subject_keys == ctx.analyzer.analyze(sql).subject_keys


@pytest.mark.parametrize(
    "sql",
    [
        "SELECT name FROM billing.customers LIMIT'5'",
        "SELECT name FROM billing.customers OFFSET'1'",
    ],
)
def test_a_limit_glued_to_its_literal_is_kept(ctx: MaskingContext, sql: str) -> None:
    """`LIMIT'5'` has the shape `LIMIT$900000`, which parses as a table alias: the rewrite
    drops the LIMIT (every row comes back) and aliases the table "limit$900000"."""
    _assert_agrees(ctx, sql)


@pytest.mark.parametrize(
    "sql",
    [
        "DELETE FROM billing.customers WHERE'f' RETURNING email",
        "UPDATE billing.customers SET name = 'x' FROM public.notes WHERE'f'",
        "SELECT name FROM billing.customers WHERE'f'",
    ],
)
def test_a_where_glued_to_its_literal_keeps_the_filter(ctx: MaskingContext, sql: str) -> None:
    """`WHERE'f'` has the shape `WHERE$900000`, which parses as an alias of the table before
    it: the rewrite has no WHERE at all. A DELETE (or UPDATE) meant to touch no row then
    deletes (or overwrites) every row of billing.customers."""
    _assert_agrees(ctx, sql)


@pytest.mark.parametrize(
    "sql",
    [
        "SELECT name FROM billing.customers WHERE name = N'Bob'",
        "SELECT name FROM billing.customers WHERE i_customer = int'5'",
        "SELECT name FROM billing.customers LIMIT'5'",
        "DELETE FROM billing.customers WHERE'f' RETURNING email",
    ],
)
def test_shapes_never_glue_a_placeholder_to_a_word(sql: str) -> None:
    """Either the fast path declines, or its shape tokenises as the statement does."""
    norm = fast_normalize(sql)
    if norm is not None:
        _assert_sound_normalisation(sql, *norm)


@pytest.mark.parametrize("typed", ["char 'Bob'", "character 'Bob'", "nchar 'Bob'"])
def test_a_char_typed_literal_keeps_its_length(ctx: MaskingContext, typed: str) -> None:
    """`char 'Bob'` is an unconstrained bpchar literal. Its shape `char $900000` is read by
    libpg_query's grammar as CAST($900000 AS char), i.e. char(1): the rewrite compares the
    name with 'B'."""
    _assert_agrees(ctx, f"SELECT name FROM billing.customers WHERE name = {typed}")


@pytest.mark.parametrize("keyword", ["NULL", "TRUE", "false"])
def test_a_subscripted_keyword_constant_keeps_its_parentheses(
    ctx: MaskingContext, keyword: str
) -> None:
    """The fast path also replaces NULL/TRUE/FALSE. `($900000)[$900001]` is deparsed as
    `$900000[$900001]`, and `NULL[1]` put back is a syntax error."""
    _assert_agrees(ctx, f"SELECT ({keyword})[1], name FROM billing.customers")


def test_more_than_100000_literals_are_all_put_back(ctx: MaskingContext) -> None:
    """Placeholder 900000 + 100000 is $1000000, which `_PLACEHOLDER` (9 and five digits)
    does not recognise: that literal never comes back, and the server is sent a statement
    with a parameter nobody binds."""
    sql = "SELECT name FROM billing.customers WHERE i_customer IN (" + "7," * 100_000 + "8)"
    d = ctx.analyze(sql)
    assert d.action == "rewrite" and d.sql is not None
    assert re.search(r"\$\d", d.sql) is None
    assert d.sql.rstrip().endswith("7, 8)")


@pytest.mark.parametrize(
    ("literal", "key"),
    [("0x1F", "31"), ("0o17", "15"), ("0b101", "5"), ("1_000", "1000"), ("007", "7")],
)
def test_subject_keys_name_the_subject(ctx: MaskingContext, literal: str, key: str) -> None:
    """The audit's subject keys of `i_customer = 0x1F` are those of subject 31 (as the full
    analysis says), not the text "0x1F"."""
    sql = f"SELECT name FROM billing.customers WHERE i_customer = {literal}"
    for d in (ctx.analyzer.analyze(sql), ctx.analyze(sql)):
        assert [(n.table, n.keys) for n in d.subject_keys] == [("billing.customers", (key,))]


def _reference(sql: str) -> tuple[str, list[str]] | None:
    """`fast_normalize` as it was before its pattern readers: `literals_of` on every text."""
    if "$" in sql:
        return None
    try:
        normalized = normalize_literals(sql)
    except ParseError:
        return None
    if normalized == sql:
        return None
    literals = literals_of(sql, normalized, glued=_glues)
    if literals is None or len(literals) > 99_999 or any(lit[:1] == "-" for lit in literals):
        return None
    return _shape_text(normalized), literals


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(pair=_statement_pairs())
def test_the_pattern_reader_reads_what_literals_of_reads(pair: tuple[str, str]) -> None:
    """The compiled reader of a normalised text (made by the first statement, reused by the
    second) accepts and returns exactly what the reference reading does."""
    for sql in pair:
        assert fast_normalize(sql) == _reference(sql), sql


@pytest.mark.parametrize("sql", FAST_CASES + DECLINED)
def test_the_pattern_reader_agrees_on_the_known_cases(sql: str) -> None:
    assert fast_normalize(sql) == _reference(sql)
    assert fast_normalize(sql) == _reference(sql)  # the second time from the cached reader


def test_adjacent_literals_are_read_apart_or_declined() -> None:
    for sql in ("SELECT 'a' 'b'", "SELECT 1::int, 'x'||'y'", "SELECT E'a\\'' 'b'"):
        assert fast_normalize(sql) == _reference(sql), sql
    many = "SELECT " + ", ".join(str(i) for i in range(200))
    assert fast_normalize(many) == _reference(many) is not None
