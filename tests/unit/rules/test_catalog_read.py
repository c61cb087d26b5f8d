"""One catalog reader: the queries on the schema catalogs (pg_class, pg_attribute, ...)
are written in rules/catalog_read.py only; the proxy and the erasure worker run them
through it (tests/integration/test_catalog_read.py runs both sides on a real server)."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]
SCHEMA_CATALOGS = re.compile(
    r"\bFROM\s+(pg_catalog\.)?pg_(class|attribute|namespace|index|type|proc|depend|constraint"
    r"|inherits|rewrite|operator|auth_members|roles|partition_tree)\b"
)
READER = "rules/catalog_read.py"
# not there: the demo's setup, which asks whether its schema and roles exist (not what the
# analyser or the erasure worker read)
NOT_YET = {"proxy/demo/runner.py"}


def _queries(path: Path) -> list[str]:
    return [
        node.value
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, ast.Constant) and isinstance(node.value, str)
        if SCHEMA_CATALOGS.search(node.value)
    ]


def test_the_schema_catalogs_are_read_in_one_module() -> None:
    readers = {
        str(f.relative_to(ROOT))
        for pkg in ("proxy", "rules", "audit", "erasure", "shared")
        for f in (ROOT / pkg).rglob("*.py")
        if _queries(f)
    }
    assert readers - NOT_YET == {READER}
    assert len(_queries(ROOT / READER)) >= 15
