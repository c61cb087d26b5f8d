"""The generic walk over pglast's parse trees: a node's child nodes and all its descendants,
by whatever fields the node has (no field is named here, none is skipped).

For the analysis's passes over a statement (rules.reads, rules.writes, rules.settings).
Pure: no I/O; it changes no node.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pglast.ast

# The AST is walked generically (attributes by name, optional everywhere)
ast: Any = pglast.ast


def children(node: Any) -> Iterator[Any]:
    if node is None:
        return
    if isinstance(node, tuple | list):
        for item in node:
            if isinstance(item, ast.Node):
                yield item
            elif isinstance(item, tuple | list):
                yield from children(item)
        return
    if isinstance(node, ast.Node):
        for attr in node:
            value = getattr(node, attr)
            if isinstance(value, ast.Node):
                yield value
            elif isinstance(value, tuple | list):
                yield from children(value)


def descendants(node: Any, skip_selects: bool = False) -> Iterator[Any]:
    stack = list(children(node)) if not isinstance(node, ast.Node) else [node]
    while stack:
        n = stack.pop()
        yield n
        if skip_selects and isinstance(n, ast.SelectStmt):
            continue
        stack.extend(children(n))
