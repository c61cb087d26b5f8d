"""pgcli as a masked role: the metadata queries its completer runs at connect (pgcli's own
`PGExecute`: schemata, tables, views, columns, functions, datatypes, foreign keys, search
path, databases) and statements and backslash commands run through `PGExecute.run`, as the
pgcli REPL runs them (with pgspecial for the backslash commands).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from pgcli.pgexecute import PGExecute
from pgspecial.main import PGSpecial

from tests.compat.conftest import DB, MASKED, UNMASKED, Compat, assert_masked, assert_real


def pgexecute(compat: Compat, user: str) -> PGExecute:
    return PGExecute(
        database=DB,
        user=user,
        password=compat.password(user),
        host="127.0.0.1",
        port=compat.port,
        dsn=None,
        sslmode="disable",
    )


@pytest.fixture(scope="module")
def executors(compat: Compat) -> Iterator[dict[str, PGExecute]]:
    e = {"masked": pgexecute(compat, MASKED), "unmasked": pgexecute(compat, UNMASKED)}
    yield e
    for x in e.values():
        x.conn.close()


def metadata(ex: PGExecute) -> dict[str, Any]:
    return {
        "schemata": ex.schemata(),
        "search_path": ex.search_path(),
        "tables": list(ex.tables()),
        "views": list(ex.views()),
        "table_columns": list(ex.table_columns()),
        "view_columns": list(ex.view_columns()),
        "functions": list(ex.functions()),
        "datatypes": list(ex.datatypes()),
        "foreignkeys": list(ex.foreignkeys()),
        "databases": ex.databases(),
        "casing": list(ex.casing()),
        "view_definition": ex.view_definition("billing.customer_contacts"),
        "function_definition": ex.function_definition("billing.invoice_total"),
    }


def test_completion_metadata(executors: dict[str, PGExecute]) -> None:
    masked = metadata(executors["masked"])
    assert masked == metadata(executors["unmasked"])
    assert "billing" in masked["schemata"]
    assert masked["search_path"] == ["pg_catalog", "billing", "public"]
    assert ("billing", "customers") in masked["tables"]
    assert ("billing", "customer_contacts") in masked["views"]
    columns = {(t, c) for s, t, c, *_ in masked["table_columns"] if s == "billing"}
    assert {("customers", "cc_number"), ("accounts", "sip_password")} <= columns
    assert any(f.func_name == "invoice_total" for f in masked["functions"])
    assert ("billing", "money_pair") in masked["datatypes"]
    assert any(fk.childtable == "accounts" for fk in masked["foreignkeys"])
    # (no leak search here: the catalog is the same for both roles, and its thousands of
    # built-in names hold pieces of the canaries, such as `secret`)


def run(ex: PGExecute, sql: str) -> list[tuple[Any, ...]]:
    """What pgcli's REPL gets for `sql`: (title, rows, headers, status) per statement; an
    error is raised (pgcli prints it)."""
    out = []
    for title, cur, headers, status, *_ in ex.run(
        sql, pgspecial=PGSpecial(), exception_formatter=None
    ):
        out.append((title, list(cur) if cur is not None else None, headers, status))
    return out


@pytest.mark.parametrize(
    "sql",
    [
        "SELECT * FROM customers ORDER BY i_customer LIMIT 5",
        "SELECT c.name, c.email, a.ip, a.mac, x.cli FROM customers c "
        "JOIN accounts a USING (i_customer) JOIN xdrs x USING (i_account)",
        "TABLE customer_contacts",
        "\\dt",
        "\\d customers",
        "\\d+ accounts",
        "\\df",
        "\\dT",
        "\\dn",
        "\\l",
    ],
)
def test_run(executors: dict[str, PGExecute], sql: str) -> None:
    masked = run(executors["masked"], sql)
    unmasked = run(executors["unmasked"], sql)
    assert masked and masked[0][1], masked
    assert_masked(repr(masked))
    if sql.startswith("\\"):
        assert masked == unmasked
    else:
        assert_real(repr(unmasked))
