"""What each statement of an SQL text spells out itself: the values of its literals, as the
server reads them, and its names.

The masked filter keeps a quoted value in an error or notice only when the statement that
caused it spelled that value out (proxy/session/masked.py). The values come from the
server's own grammar (libpg_query, through pglast), so a string literal is the text after
the server's unescaping: `'it''s'`, `E'\\t'`, `U&'d\\0061t'` with or without UESCAPE, dollar
quotes, and adjacent literals joined across a newline; a numeric literal is kept as it was
written (`1.50`, `-3`). Names are every other word of the parse tree: identifiers (folded to
lower case unless quoted), aliases, cursor and setting names. Comments are not part of any
statement.

Pure: no I/O, and nothing here is logged or leaves the caller.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import pglast
from pglast import ast


class Words(NamedTuple):
    values: frozenset[str]  # the values of its literals
    names: frozenset[str]  # everything else the parse tree holds as text


NO_WORDS = Words(frozenset(), frozenset())


@functools.lru_cache(maxsize=256)
def statement_words(sql: str) -> tuple[Words, ...]:
    """The words of each statement of `sql`, in order (empty statements are not statements,
    for the server as here); () when `sql` does not parse."""
    try:
        raw = pglast.parse_sql(sql)
    except pglast.parser.ParseError:
        return ()
    return tuple(_words(stmt.stmt) for stmt in raw)


def _words(root: ast.Node | None) -> Words:
    values: set[str] = set()
    names: set[str] = set()
    stack: list[object] = [root]
    while stack:
        node = stack.pop()
        if isinstance(node, tuple):
            stack.extend(node)
        elif isinstance(node, ast.A_Const):
            value = node.val
            if isinstance(value, ast.String) and value.sval is not None:
                values.add(value.sval)
            elif isinstance(value, ast.Integer):
                values.add(str(value.ival))
            elif isinstance(value, ast.Float):
                values.add(str(value.fval))
            elif isinstance(value, ast.BitString) and value.bsval is not None:
                values.add(value.bsval[1:])  # b101 / x1F: the digits as written
        elif isinstance(node, ast.Node):
            for attribute in _attributes(node.__class__.__name__):
                item = getattr(node, attribute, None)
                if isinstance(item, str):
                    names.add(item)
                elif isinstance(item, ast.Node | tuple):
                    stack.append(item)
    return Words(frozenset(values), frozenset(names))


@functools.cache
def _attributes(name: str) -> tuple[str, ...]:
    """The fields of a parse-tree node class (its own and inherited slots)."""
    fields: list[str] = []
    for klass in getattr(ast, name).__mro__:
        if klass is ast.Node or klass is object:
            continue
        fields += [name for name in getattr(klass, "__slots__", ()) if name not in fields]
    return tuple(fields)
