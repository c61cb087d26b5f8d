"""SQL identifiers as PostgreSQL's `quote_ident()` writes them: the one quoter every
package uses for the SQL text it builds (the read and write rewrites, the erasure planner,
the audit table sink, `rules suggest`'s samples).

As the server's `quote_identifier()` (src/backend/utils/adt/ruleutils.c): a name is left
bare only when it is a lower-case identifier (`[a-z_][a-z0-9_]*`, ASCII) that is no
keyword, or an unreserved one; anything else is double-quoted with `"` doubled. The
keywords are those of the grammar pgveil's analyser parses with (pglast's, the newest
server's): a word that became a keyword after the server it talks to is quoted although
that server would leave it bare (always correct: a quoted identifier is that identifier).

This is not `shared.dsn.quote`, which quotes a value of a libpq key=value string. Pure: no
I/O, no state.
"""

from __future__ import annotations

import re

from pglast.keywords import COL_NAME_KEYWORDS, RESERVED_KEYWORDS, TYPE_FUNC_NAME_KEYWORDS

# what quote_identifier() quotes although it is a plain lower-case word
_QUOTED_KEYWORDS = frozenset(RESERVED_KEYWORDS | COL_NAME_KEYWORDS | TYPE_FUNC_NAME_KEYWORDS)
_BARE = re.compile(r"[a-z_][a-z0-9_]*")


def quote_ident(name: str) -> str:
    """`name` as SQL text that the server reads back as exactly `name`."""
    if _BARE.fullmatch(name) and name not in _QUOTED_KEYWORDS:
        return name
    if "\0" in name:
        raise ValueError("identifiers cannot contain NUL")
    return '"' + name.replace('"', '""') + '"'
