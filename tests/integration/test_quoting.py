"""shared.quoting.quote_ident writes an identifier as the real server's quote_ident() does,
and the server reads what it writes back as exactly the name it was given.

The corpus: every keyword the server knows (pg_get_keywords()) and every keyword of the
grammar pgveil parses with (pglast's, a newer server's), plus names that are upper case,
mixed case, start with a digit or an underscore, hold a quote, a space, a dollar sign, a
dot, non-ASCII letters, or are empty.
"""

from __future__ import annotations

import psycopg
from pglast.keywords import (
    COL_NAME_KEYWORDS,
    RESERVED_KEYWORDS,
    TYPE_FUNC_NAME_KEYWORDS,
    UNRESERVED_KEYWORDS,
)

from shared.quoting import quote_ident

NAMES = [
    "abc", "a_b_9", "_x", "_", "x1", "Abc", "ABC", "aBc", "1a", "9", "a b", " a", "a ",
    'a"b', '"', '""', "a'b", "a$b", "$a", "a.b", "a-b", "café", "ĳssel", "ǅemal", "名前",
    "naïve", "ß", "a\tb", "a\nb", "select", "SELECT", "Select", "user", "name", "xmin",
    "current_user", "between", "authorization", "system_user", "json_table", "merge_action",
    "",
]  # fmt: skip
NEWER_GRAMMAR = RESERVED_KEYWORDS | COL_NAME_KEYWORDS | TYPE_FUNC_NAME_KEYWORDS


def _corpus(conn: psycopg.Connection) -> list[str]:
    server = [r[0] for r in conn.execute("SELECT word FROM pg_catalog.pg_get_keywords()")]
    mine = sorted(NEWER_GRAMMAR | UNRESERVED_KEYWORDS)
    return list(dict.fromkeys([*NAMES, *server, *mine]))


def test_quote_ident_writes_what_the_servers_quote_ident_writes(direct_dsn: str) -> None:
    with psycopg.connect(direct_dsn) as conn:
        conn.execute("SET quote_all_identifiers = off")
        names = _corpus(conn)
        server = dict(
            conn.execute(
                "SELECT n, pg_catalog.quote_ident(n) FROM pg_catalog.unnest(%s::text[]) AS n",
                (names,),
            ).fetchall()
        )
        server_quoted_keywords = {
            r[0]
            for r in conn.execute(
                "SELECT word FROM pg_catalog.pg_get_keywords() WHERE catcode <> 'U'"
            )
        }
    assert len(server) == len(names)
    differ = {n: (quote_ident(n), server[n]) for n in names if quote_ident(n) != server[n]}
    # the only differences: words the server knows as no keyword (or an unreserved one)
    # that pgveil's newer grammar reserves; pgveil quotes them (never the other way round)
    for name, (mine, theirs) in differ.items():
        assert name in NEWER_GRAMMAR and name not in server_quoted_keywords, (name, mine, theirs)
        assert (mine, theirs) == (f'"{name}"', name)
    assert quote_ident("") == '""' == server[""]
    assert quote_ident("select") == '"select"' and quote_ident("name") == "name"


def test_the_server_reads_every_quoted_name_back_as_itself(direct_dsn: str) -> None:
    """Each name as a column alias and as a bare column reference (where a keyword left
    bare would be a syntax error or mean something else, e.g. current_user)."""
    with psycopg.connect(direct_dsn) as conn:
        names = [n for n in _corpus(conn) if n]  # a zero-length identifier is no identifier
        idents = [quote_ident(n) for n in names]
        values = ", ".join(str(i) for i in range(len(names)))
        cur = conn.execute(
            f"SELECT {', '.join(idents)} FROM (SELECT {values}) AS s({', '.join(idents)})"
        )
        assert cur.description is not None
        assert [c.name for c in cur.description] == names
        assert cur.fetchone() == tuple(range(len(names)))
