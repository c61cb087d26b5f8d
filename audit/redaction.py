"""What an audit event may show of a statement: its redacted text and fingerprint.

`redact` keeps a statement's tokens and replaces every literal by `?` (comments dropped);
`fingerprint` is the short hash events carry so that statements of one shape group together.
A statement and its shape (rules.shapes: literals replaced by pgveil's own placeholders,
numbered from `PLACEHOLDER_BASE`) redact alike, so the shape cache redacts once per shape;
rules.shapes takes `LITERAL_TOKENS` and `PLACEHOLDER_BASE` from here so that the two agree on
what a literal is.

Pure: no I/O, and no import of `rules` or `proxy` (rules/ imports this module). It must never
return a literal of the statement: a text that cannot be tokenised is not shown at all.
"""

from __future__ import annotations

import hashlib
from typing import Final

from pglast.parser import ParseError, scan

# the scanner's tokens that are literals
LITERAL_TOKENS = frozenset({"SCONST", "ICONST", "FCONST", "BCONST", "XCONST", "USCONST"})
_WORD_TOKENS = frozenset({"IDENT", "UIDENT"})  # names (or, in a text that does not parse, values)
# $900000+: pgveil's literal placeholders (rules.shapes), far above any parameter number a
# client uses
PLACEHOLDER_BASE = 900_000
NOT_SHOWN = "<not shown: cannot be tokenised>"


_COMMENT_TOKENS: Final = frozenset(("C_COMMENT", "SQL_COMMENT"))  # (pglast's scan keeps them)


def redact(sql: str, names: bool = True) -> str:
    """The statement as an audit event may show it: its tokens, every literal replaced by
    `?`, comments dropped. A text that cannot be tokenised is not shown at all. pgveil's own
    literal placeholders (see rules.shapes.normalize) count as literals, so a statement and
    its shape read the same.

    `names` False (a text that does not parse: nothing tells a name from a value typed
    without quotes, `WHERE name = Ann Smith`): only reserved keywords, operators and
    punctuation are shown; every other word is `?` too."""
    try:
        tokens = scan(sql)
    except ParseError:
        return NOT_SHOWN
    out = []
    for t in tokens:
        if t.name in _COMMENT_TOKENS:
            continue  # free text: a client may write anything there (an ORM tag, a name)
        text = sql[t.start : t.end + 1]
        literal = t.name in LITERAL_TOKENS or (t.name == "PARAM" and _is_placeholder(text))
        word = t.name in _WORD_TOKENS or t.kind not in ("RESERVED_KEYWORD", "NO_KEYWORD")
        out.append("?" if literal or (word and not names) else text)
    return " ".join(out)


def fingerprint(text: str) -> str:
    """The fingerprint of a redacted statement text."""
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _is_placeholder(param: str) -> bool:
    return param[1:].isdigit() and int(param[1:]) >= PLACEHOLDER_BASE
