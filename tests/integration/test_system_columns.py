"""System columns (`xmin`, `xmax`, `cmin`, `cmax`, `ctid`, `tableoid`) of protected tables
are readable by masked roles: they hold no personal data. The masking subquery carries the
ones a statement names; `*` beside them is spelled out so that it keeps its columns, and a
whole-row reference beside them is refused (the row would show them).

`xmin` as an optimistic-concurrency token (EF Core, and others): read it, then update only
while it is unchanged.
"""

from __future__ import annotations

import asyncio
from typing import Any

import asyncpg
import psycopg
import pytest

from proxy.demo.embedded_pg import EmbeddedPostgres
from tests.integration.masking_fixture import HELPDESK, HELPDESK_PW, dsn
from tests.support import ProxyProcess

SYSTEM = "xmin, xmax, cmin, cmax, ctid, tableoid"


def _both(pg: EmbeddedPostgres, port: int, sql: str) -> tuple[Any, Any]:
    """(rows and column names through pgveil, the same directly), as the masked role."""
    out = []
    for p in (port, pg.port):
        with psycopg.connect(dsn(pg, p)) as c:
            cur = c.execute(sql)
            out.append((cur.fetchall(), [d.name for d in cur.description or ()]))
    return out[0], out[1]


def test_system_columns_read_as_on_the_table(
    pg: EmbeddedPostgres, deny_proxy: ProxyProcess
) -> None:
    masked, direct = _both(
        pg,
        deny_proxy.port,
        f"SELECT {SYSTEM}, tableoid::regclass::text, id FROM dn.users ORDER BY id",
    )
    assert masked == direct
    assert [r[-2] for r in masked[0]] == ["dn.users", "dn.users"]
    # qualified, three-part, beside a deny column (NULL) and a masked one
    masked, direct = _both(
        pg,
        deny_proxy.port,
        "SELECT u.xmin, dn.users.ctid FROM dn.users, dn.users u WHERE u.id = dn.users.id ORDER BY u.id",
    )
    assert masked == direct
    with psycopg.connect(dsn(pg, deny_proxy.port)) as c:
        rows = c.execute("SELECT ctid, passcode, login, xmin FROM dn.users ORDER BY id").fetchall()
    assert [(r[1], r[2]) for r in rows] == [(None, "f********r"), (None, "s*********r")]


def test_partitions_show_their_tableoid(pg: EmbeddedPostgres, deny_proxy: ProxyProcess) -> None:
    masked, direct = _both(
        pg,
        deny_proxy.port,
        "SELECT tableoid::regclass::text, id, payload FROM dn.events ORDER BY id",
    )
    assert masked[0] == [("dn.events_1", 1, None), ("dn.events_2", 2, None)]
    assert [r[:2] for r in masked[0]] == [r[:2] for r in direct[0]]


@pytest.mark.parametrize(
    "sql",
    [
        "SELECT u.*, u.ctid FROM dn.users u ORDER BY id",  # DBeaver's rows of a table
        "SELECT *, xmin FROM dn.users ORDER BY id",
        "SELECT ctid, * FROM dn.users ORDER BY id",
        "SELECT dn.users.*, xmin FROM dn.users ORDER BY id",
        "SELECT * FROM (SELECT u.*, u.xmin AS version FROM dn.users u) s ORDER BY id",
    ],
)
def test_star_beside_system_columns_keeps_its_columns(
    pg: EmbeddedPostgres, deny_proxy: ProxyProcess, sql: str
) -> None:
    (rows, names), (direct_rows, direct_names) = _both(pg, deny_proxy.port, sql)
    assert names == direct_names
    assert len(rows) == len(direct_rows) == 2
    for row, raw in zip(rows, direct_rows, strict=True):
        personal = {names.index(c) for c in ("login", "passcode", "pin", "ip", "doc")}
        assert [v for i, v in enumerate(row) if i not in personal] == [
            v for i, v in enumerate(raw) if i not in personal
        ]
        assert [row[names.index(c)] for c in ("passcode", "pin", "ip", "doc")] == [None] * 4


@pytest.mark.parametrize(
    ("sql", "reason"),
    [
        ("SELECT to_json(u), u.xmin FROM dn.users u", "whole row"),
        ("SELECT u, ctid FROM dn.users u", "whole row"),
        ("SELECT row_to_json(u.*), xmin FROM dn.users u", "whole row"),
        ("SELECT xmin FROM dn.users NATURAL JOIN dn.sessions", "whole row"),
        ("SELECT xmin FROM dn.users u(a, b)", "whole row"),
        ("SELECT *, u.xmin FROM dn.users u JOIN dn.sessions s ON s.user_id = u.id", "several"),
    ],
)
def test_whole_rows_beside_system_columns_are_refused(
    pg: EmbeddedPostgres, deny_proxy: ProxyProcess, sql: str, reason: str
) -> None:
    with psycopg.connect(dsn(pg, deny_proxy.port), autocommit=True) as c:
        with pytest.raises(psycopg.errors.InsufficientPrivilege) as info:
            c.execute(sql)
        message = info.value.diag.message_primary or ""
        assert message.startswith("pgveil: system columns of ") and reason in message


def test_xmin_as_a_concurrency_token_psycopg(
    pg: EmbeddedPostgres, deny_proxy: ProxyProcess
) -> None:
    with psycopg.connect(dsn(pg, deny_proxy.port)) as c:
        (version,) = c.execute("SELECT xmin FROM dn.users WHERE id = 2").fetchone()  # type: ignore[misc]
        update = (
            "UPDATE dn.users SET note = %s WHERE id = %s AND xmin = %s::text::xid RETURNING xmin"
        )
        rows = c.execute(update, ["edited once", 2, str(version)]).fetchall()
        assert len(rows) == 1 and rows[0][0] != version
        c.commit()
        # a second writer with the old token: no row, the application reports a conflict
        assert c.execute(update, ["edited twice", 2, str(version)]).fetchall() == []
        assert c.execute(update, ["edited twice", 2, str(rows[0][0])]).fetchall() != []
        c.rollback()
    with psycopg.connect(pg.dsn() + " sslmode=disable") as c:
        assert c.execute("SELECT note FROM dn.users WHERE id = 2").fetchone() == ("edited once",)
        c.execute("UPDATE dn.users SET note = 'note two' WHERE id = 2")


def test_xmin_as_a_concurrency_token_asyncpg(
    pg: EmbeddedPostgres, deny_proxy: ProxyProcess
) -> None:
    async def run() -> None:
        c = await asyncpg.connect(
            host="127.0.0.1", port=deny_proxy.port, user=HELPDESK, password=HELPDESK_PW,
            database="postgres", ssl=False, server_settings={"client_encoding": "UTF8"},
        )  # fmt: skip
        try:
            version = await c.fetchval("SELECT xmin FROM dn.users WHERE id = 1")
            update = "UPDATE dn.users SET note = $1 WHERE id = $2 AND xmin = $3 RETURNING xmin"
            async with c.transaction():
                new = await c.fetchval(update, "edited", 1, version)
                assert new is not None and new != version
                assert await c.fetchval(update, "again", 1, version) is None
                raise _Rollback
        except _Rollback:
            pass
        finally:
            await c.close()

    asyncio.run(run())


class _Rollback(Exception):
    pass
