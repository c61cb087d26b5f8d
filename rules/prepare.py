"""Prepared forms of masked statements: which literals of a rewritten SELECT go to the
server as parameters of a statement it prepares once per connection.

A masked role's statement is sent rewritten (mask expressions around personal columns); the
server would parse, analyse and plan that long text on every execution. Statements that
differ only in literals share one shape (rules/shapes.py); here a shape's rewritten text
becomes a text with `$1..$n` in place of some of its literals, which the masked filter
prepares once per server connection and binds with the literals' values
(proxy/session/masked.py). It must mean exactly what the text with the literals means, so
a literal becomes a parameter only where that is proven to change nothing:

- only an integer constant written as plain decimal digits whose value fits int4: the
  server gives that literal the type int4, and the parameter is declared int4, so operator
  and function resolution are the literal's; its value is the digits' value, which int4
  input reads without fail (Bind cannot fail where the literal could not);
- only in a SELECT's WHERE, FROM (JOIN ... ON, subqueries), WITH queries, set operation
  arms, LIMIT and OFFSET: never where the parser matches one expression with another (the
  target list, GROUP BY, HAVING, ORDER BY, DISTINCT ON, windows: two parameters never
  match where two equal literals do);
- only where nothing can fail or differ when the value is not known at plan time (a
  generic plan evaluates what a custom plan folds into a constant): a direct operand of a
  comparison (`=`, `<>`, `<`, `>`, `<=`, `>=`) with a column, a bound of `col BETWEEN`, an
  element of `col IN (...)`, `LIMIT` and `OFFSET`, and an operand of `+` or `-` whose
  operands are all such constants or columns and whose result is compared so, with both
  constants below 2^30 (their sum and difference fit int4: no overflow error that a
  custom plan would raise at planning and a generic plan perhaps never);
- never anything else: not `ORDER BY 1`, `GROUP BY 1` (column numbers), no string, typed
  (`date '...'`), negative, float or larger literal, no typmod, nothing in a statement
  other than one plain SELECT that writes nothing (kinds ("select",), no INTO, no
  data-modifying WITH).
The choice is verified by construction for every text it makes: the parametrised text is
parsed and its tree must be the tree of the rewritten text with exactly the chosen integer
constants replaced by parameters, in order (positions ignored); anything else and the
statement is sent as text.

The same places decide which rewritten Parses of the client's unnamed statement may run as
a statement the server keeps, with the client's own parameters
(`client_parameters_eligible`): each of them must stand where a literal could become a
parameter, as a direct operand.

Pure: no I/O, no logging. The literal values only go into the parameters returned.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from pglast import ast, parse_sql
from pglast.enums.parsenodes import A_Expr_Kind
from pglast.parser import ParseError

from audit.redaction import PLACEHOLDER_BASE

INT4 = 23  # the type OID the parameters are declared with
_INT4_MAX = 2**31 - 1
_SMALL = 2**30  # an operand of + or - below this: the result fits int4
_COMPARISONS = frozenset(("=", "<>", "!=", "<", ">", "<=", ">="))
_ARITHMETIC = frozenset(("+", "-"))
_BETWEEN = frozenset(
    (
        A_Expr_Kind.AEXPR_BETWEEN,
        A_Expr_Kind.AEXPR_NOT_BETWEEN,
        A_Expr_Kind.AEXPR_BETWEEN_SYM,
        A_Expr_Kind.AEXPR_NOT_BETWEEN_SYM,
    )
)
_WRITES = (ast.InsertStmt, ast.UpdateStmt, ast.DeleteStmt, ast.MergeStmt)
_VERIFIED_PER_SHAPE = 256  # parametrised texts whose verification is kept per shape

# (text with $1..$n, parameter values as int4 text, where each parameter stands in the text
# (start, length of `$k`), the lengths of the literals they replace) -- the last two to move
# an error position from the prepared text to the rewritten text the client's positions
# map from (see `positions`)
Prepared = tuple[str, tuple[bytes, ...], tuple[tuple[int, int], ...], tuple[int, ...]]


def positions(
    tokens: tuple[tuple[int, int], ...], lengths: tuple[int, ...]
) -> tuple[tuple[int, int, int], ...]:
    """Where each parameter stands in a prepared text: (start, length of `$k`, length of the
    literal it replaces)."""
    return tuple(
        (start, token, length) for (start, token), length in zip(tokens, lengths, strict=True)
    )


class ShapeForm:
    """What one shape allows: the literal indices that may become parameters, each with
    None (any int4 value) or, for an operand of `+` or `-`, the index of the other operand's
    literal (-1: a column): then only while both values are below 2^30; and the verdicts on
    the texts made from it so far."""

    __slots__ = ("eligible", "verified")

    def __init__(self, eligible: dict[int, int | None]) -> None:
        self.eligible = eligible
        # the literals left in the text (None: a parameter) -> the text and where its
        # parameters stand, or _FAILED (it does not verify)
        self.verified: dict[tuple[str | None, ...], tuple[str, tuple[tuple[int, int], ...]]] = {}


NOT_PREPARABLE = ShapeForm({})


def shape_form(shape_sql: str, spans: Sequence[tuple[int, int, int]]) -> ShapeForm:
    """The form of a shape's rewritten text (`spans`: where its literal placeholders stand,
    rules.shapes.placeholder_spans): NOT_PREPARABLE when no literal may become a parameter."""
    found = _eligible(shape_sql, PLACEHOLDER_BASE)
    if found is None:
        return NOT_PREPARABLE
    _, eligible = found
    # a literal the rewrite put in more than one place is never a parameter
    seen: dict[int, int] = {}
    for _, _, i in spans:
        seen[i] = seen.get(i, 0) + 1
    eligible = {i: partner for i, partner in eligible.items() if seen.get(i) == 1}
    return ShapeForm(eligible) if eligible else NOT_PREPARABLE


def client_parameters_eligible(rewritten: str) -> bool:
    """Whether a masked Parse's rewritten text may run as a statement the server keeps
    (proxy/session/masked.py: the unnamed statement), with the client's own parameters
    `$1..$n` bound to it as they are. The server plans the client's unnamed statement for
    each Bind with the parameters' values (a custom plan); one it keeps it may plan once
    without them (a generic plan), and the two must not differ in what they compute. So: one plain
    SELECT that writes nothing (as for literals above), and every parameter stands where a
    literal may become one, as a direct operand (a comparison with a column, a bound of
    BETWEEN, an element of IN, LIMIT, OFFSET; never under `+`/`-`, whose overflow a custom
    plan raises while planning and a generic plan perhaps never). A text without parameters
    is planned the same either way. A parameter that stands twice is not taken. (What SQL
    leaves to the plan may still differ between two plans, as between two runs of one
    statement: the README says what.)"""
    found = _eligible(rewritten, 1)
    if found is None:
        return False
    stmt, eligible = found
    numbers = _parameters(stmt)
    # (one parameter in two places, one of them not eligible, would pass a check by number)
    return len(set(numbers)) == len(numbers) and all(
        eligible.get(number - 1, _NOT_ELIGIBLE) is None for number in numbers
    )


def _eligible(sql: str, base: int) -> tuple[Any, dict[int, int | None]] | None:
    """One plain SELECT's tree and the placeholders (`base`: see _placeholder) that stand
    where they may be parameters; None for anything else (see _walk)."""
    try:
        stmts = parse_sql(sql)
    except ParseError:
        return None
    if len(stmts) != 1:
        return None
    stmt = stmts[0].stmt
    if not isinstance(stmt, ast.SelectStmt) or stmt.intoClause is not None:
        return None
    eligible: dict[int, int | None] = {}
    if not _walk(stmt, eligible, base=base):
        return None
    return stmt, eligible


def _parameters(node: Any) -> list[int]:
    """The numbers of every parameter reference under `node`, each time it stands."""
    if isinstance(node, tuple):
        return [n for item in node for n in _parameters(item)]
    if not isinstance(node, ast.Node):
        return []
    if isinstance(node, ast.ParamRef):
        return [int(node.number or 0)]
    return [n for attribute in node for n in _parameters(getattr(node, attribute))]


def _placeholder(node: Any, base: int = PLACEHOLDER_BASE) -> int | None:
    """The literal index of one of pgveil's placeholders (`base`: 1 for the client's own
    parameters, see client_parameters_eligible), else None."""
    if isinstance(node, ast.ParamRef):
        number = node.number
        if number is not None and number >= base:
            return int(number) - base
    return None


def _operator(node: ast.A_Expr) -> str | None:
    name = node.name
    if name and len(name) == 1 and isinstance(name[0], ast.String):
        return str(name[0].sval)
    return None


def _compared(node: Any, eligible: dict[int, int | None], base: int) -> None:
    """`node` is compared with a column: a placeholder there may be a parameter, and so may
    those of `a + b`, `a - b` made of placeholders and columns (small values only)."""
    i = _placeholder(node, base)
    if i is not None:
        eligible.setdefault(i, None)
        return
    if (
        isinstance(node, ast.A_Expr)
        and node.kind == A_Expr_Kind.AEXPR_OP
        and _operator(node) in _ARITHMETIC
        and node.lexpr is not None
        and node.rexpr is not None
    ):
        left, right = _placeholder(node.lexpr, base), _placeholder(node.rexpr, base)
        if left is not None and (right is not None or isinstance(node.rexpr, ast.ColumnRef)):
            eligible[left] = -1 if right is None else right
        if right is not None and (left is not None or isinstance(node.lexpr, ast.ColumnRef)):
            eligible[right] = -1 if left is None else left


# Where in a SELECT a parameter may stand: its WHERE, its FROM (JOIN ... ON, subqueries),
# its WITH queries, the arms of a set operation, LIMIT and OFFSET. Never in what the parser
# matches expressions between (the target list, GROUP BY, HAVING, ORDER BY, DISTINCT ON,
# windows: `SELECT x = 5 ... GROUP BY x = 5` holds one expression twice, which as two
# parameters would not match), nor anything under them.
_OPEN_FIELDS = frozenset(
    ("whereClause", "fromClause", "withClause", "larg", "rarg", "limitCount", "limitOffset")
)


def _walk(
    node: Any, eligible: dict[int, int | None], open_: bool = True, base: int = PLACEHOLDER_BASE
) -> bool:
    """Collect the eligible placeholders under `node` (`open_`: a position where one may
    stand, see _OPEN_FIELDS; `base`: see _placeholder); False when the statement writes."""
    if isinstance(node, tuple):
        return all(_walk(item, eligible, open_, base) for item in node)
    if not isinstance(node, ast.Node):
        return True
    if isinstance(node, _WRITES):
        return False
    if isinstance(node, ast.SelectStmt):
        if node.intoClause is not None:
            return False
        if open_:
            for count in (node.limitCount, node.limitOffset):
                i = _placeholder(count, base)
                if i is not None:
                    eligible.setdefault(i, None)
        return all(
            _walk(getattr(node, attribute), eligible, open_ and attribute in _OPEN_FIELDS, base)
            for attribute in node
        )
    if open_ and isinstance(node, ast.A_Expr):
        kind = node.kind
        column = isinstance(node.lexpr, ast.ColumnRef)
        if kind == A_Expr_Kind.AEXPR_OP and _operator(node) in _COMPARISONS:
            if column:
                _compared(node.rexpr, eligible, base)
            if isinstance(node.rexpr, ast.ColumnRef):
                _compared(node.lexpr, eligible, base)
        elif kind in _BETWEEN and column and isinstance(node.rexpr, tuple):
            for bound in node.rexpr:
                _compared(bound, eligible, base)
        elif kind == A_Expr_Kind.AEXPR_IN and column and isinstance(node.rexpr, tuple):
            for item in node.rexpr:
                i = _placeholder(item, base)
                if i is not None:
                    eligible.setdefault(i, None)
    return all(_walk(getattr(node, attribute), eligible, open_, base) for attribute in node)


_NOT_ELIGIBLE = -2


def _small(literals: Sequence[str], i: int) -> bool:
    """Whether literal `i` is digits below 2^30."""
    if i >= len(literals):
        return False
    literal = literals[i]
    return literal.isascii() and literal.isdigit() and len(literal) <= 10 and int(literal) < _SMALL


def prepared(
    form: ShapeForm,
    shape_sql: str,
    spans: Sequence[tuple[int, int, int]],
    literals: Sequence[str],
    rewritten: str,
) -> Prepared | None:
    """The prepared form of one statement: its shape's rewritten text (`shape_sql`, the
    placeholders at `spans`) with each eligible literal as a parameter and every other one
    put back, the parameters' values, and where they stand; None when no literal becomes a
    parameter or the text fails verification against `rewritten` (the statement's own
    rewritten text, its literals put back). The text is made and verified once per shape
    and literals left in it (`ShapeForm.verified`)."""
    eligible = form.eligible
    count = len(literals)
    values: list[bytes] = []
    numbers: list[int] = []
    kept: list[str | None] = []  # the literals left in the text; None: a parameter
    lengths: list[int] = []  # the parameters' literals' lengths
    for _, _, i in spans:
        if not 0 <= i < count:
            return None
        literal = literals[i]
        partner = eligible.get(i, _NOT_ELIGIBLE)
        # (inline: once per literal of every masked Query)
        if (
            partner != _NOT_ELIGIBLE
            and literal.isascii()
            and literal.isdigit()
            and len(literal) <= 10
        ):
            value = int(literal)
            if partner is None:
                fits = value <= _INT4_MAX
            else:  # an operand of + or -: both must be small (no overflow)
                fits = value < _SMALL and (partner < 0 or _small(literals, partner))
            if fits:
                kept.append(None)
                numbers.append(value)
                values.append(literal.encode() if literal[0] != "0" else str(value).encode())
                lengths.append(len(literal))
                continue
        kept.append(literal)
    if not values:
        return None
    key = tuple(kept)
    made = form.verified.get(key)
    if made is None:
        made = _made(shape_sql, spans, kept)
        if not _verify(made[0], rewritten, numbers):
            made = _FAILED
        if len(form.verified) >= _VERIFIED_PER_SHAPE:
            form.verified.clear()
        form.verified[key] = made
    if made is _FAILED:
        return None
    text, tokens = made
    return (text, tuple(values), tokens, tuple(lengths))


_FAILED: tuple[str, tuple[tuple[int, int], ...]] = ("", ())


def _made(
    shape_sql: str, spans: Sequence[tuple[int, int, int]], kept: Sequence[str | None]
) -> tuple[str, tuple[tuple[int, int], ...]]:
    """The text with `$1..$n` where `kept` has None and the literal elsewhere, and where
    each `$k` stands (start, length)."""
    out: list[str] = []
    tokens: list[tuple[int, int]] = []
    pos = 0
    length = 0
    for (start, end, _), literal in zip(spans, kept, strict=True):
        piece = shape_sql[pos:start]
        out.append(piece)
        length += len(piece)
        if literal is None:
            token = f"${len(tokens) + 1}"
            tokens.append((length, len(token)))
        else:
            token = literal
        out.append(token)
        length += len(token)
        pos = end
    out.append(shape_sql[pos:])
    return "".join(out), tuple(tokens)


def _verify(text: str, rewritten: str, numbers: Sequence[int]) -> bool:
    """Whether `text` parses to the tree of `rewritten` with exactly the integer constants
    `numbers` (in order) replaced by parameters $1..$n."""
    try:
        mine = parse_sql(text)
        theirs = parse_sql(rewritten)
    except ParseError:
        return False
    found: list[int] = []
    if not _same(mine, theirs, numbers, found):
        return False
    return sorted(found) == list(range(1, len(numbers) + 1))


def _same(mine: Any, theirs: Any, numbers: Sequence[int], found: list[int]) -> bool:
    if isinstance(mine, ast.ParamRef):
        k = mine.number
        if k is None or not 1 <= k <= len(numbers) or k in found:
            return False
        if not isinstance(theirs, ast.A_Const) or theirs.isnull:
            return False
        val = theirs.val
        if not isinstance(val, ast.Integer) or val.ival != numbers[k - 1]:
            return False
        found.append(k)
        return True
    if type(mine) is not type(theirs):
        return False
    if isinstance(mine, tuple):
        return len(mine) == len(theirs) and all(
            _same(a, b, numbers, found) for a, b in zip(mine, theirs, strict=True)
        )
    if isinstance(mine, ast.Node):
        ignored = mine._ATTRS_TO_IGNORE_IN_COMPARISON
        for attribute in mine:
            if attribute in ignored:
                continue
            if not _same(getattr(mine, attribute), getattr(theirs, attribute), numbers, found):
                return False
        return True
    return bool(mine == theirs)
