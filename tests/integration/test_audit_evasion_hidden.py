"""White-box attacks through code the server runs without a statement naming it (a cast's
function, a domain's CHECK, the operators BETWEEN uses): when such code may run DDL that
moves names, pgveil cannot tell from a statement's text whether it runs it, so in that
database every statement that evaluates an expression moves names (rules.code.hidden_moving).

Its own module, with its own schema and pgveil: in such a database names are never certain
for long (each statement asks for another catalog read), which the cases of
test_audit_evasion_code.py wait for before each route.

Each case has a pair of views as there: `wbhidden.r_<case>` over the unprotected
billing.customer_classes, `wbhidden.r_<case>_in` over billing.customers; the route's hidden
code runs `wbhidden.swap(case)`, which renames the second into the first's name. A new
session's read of `r_<case>` then reads customers: its event must exist and be uncertain or
name customers. Before the fix, it left no event.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from proxy.demo.embedded_pg import EmbeddedPostgres
from tests.integration.test_audit_evasion_code import (
    _connect,
    assert_read_seen,
    audited_schema,
    swapping,
)
from tests.support import ProxyProcess

CASES = ["cast", "domain", "btw"]

SCHEMA = swapping(
    "wbhidden",
    CASES,
    """
-- a cast and a domain check that call it
CREATE TYPE wbhidden.tok AS (x text);
CREATE FUNCTION wbhidden.tok_of(t text) RETURNS wbhidden.tok LANGUAGE plpgsql AS $$
BEGIN PERFORM wbhidden.swap(t); RETURN ROW(t)::wbhidden.tok; END $$;
CREATE CAST (text AS wbhidden.tok) WITH FUNCTION wbhidden.tok_of(text);
CREATE DOMAIN wbhidden.checked AS text CHECK (wbhidden.swap(VALUE) = 1);
-- operators whose function calls it, used by BETWEEN (whose node names neither)
CREATE FUNCTION wbhidden.tok_cmp(a wbhidden.tok, b wbhidden.tok) RETURNS boolean
  LANGUAGE plpgsql AS $$ BEGIN PERFORM wbhidden.swap(a.x); RETURN true; END $$;
CREATE OPERATOR wbhidden.<= (leftarg = wbhidden.tok, rightarg = wbhidden.tok,
                             function = wbhidden.tok_cmp);
CREATE OPERATOR wbhidden.>= (leftarg = wbhidden.tok, rightarg = wbhidden.tok,
                             function = wbhidden.tok_cmp);
""",
)


@pytest.fixture(scope="module")
def hidden(
    pg: EmbeddedPostgres, billing: ProxyProcess, tmp_path_factory: Any
) -> Iterator[tuple[ProxyProcess, Path]]:
    """An audited pgveil that read the catalog with the code above in it."""
    tmp = tmp_path_factory.mktemp("evasion-hidden")
    with audited_schema(pg, SCHEMA, "wbhidden", tmp) as shared:
        yield shared


@pytest.mark.parametrize(
    ("case", "statements"),
    [
        # a cast's function (pg_cast), and a domain's CHECK, named by no call
        ("cast", ("SELECT CAST('cast' AS text)::wbhidden.tok",)),
        ("domain", ("SELECT CAST('domain' AS wbhidden.checked)",)),
        # the operators BETWEEN uses
        (
            "btw",
            (
                "SET search_path = wbhidden, public",
                "SELECT ROW('btw')::wbhidden.tok"
                " BETWEEN ROW('a')::wbhidden.tok AND ROW('b')::wbhidden.tok",
            ),
        ),
    ],
)
def test_code_the_server_runs_without_a_statement_naming_it(
    pg: EmbeddedPostgres, hidden: tuple[ProxyProcess, Path], case: str, statements: tuple[str, ...]
) -> None:
    proxy, _path = hidden
    with _connect(pg, proxy.port, f"wbc-{case}") as c:
        for s in statements:
            c.execute(s)
    assert_read_seen(pg, hidden, case, "wbhidden")
