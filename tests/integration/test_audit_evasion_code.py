"""White-box attacks on the classification of code pgveil does not see into (rules/code.py):
ways to run DDL that moves names without pgveil noticing, so that a later read is recorded
as certain fact (or not at all) while the server read something else.

Each case has its own pair of views: `wbcode.r_<case>` over the unprotected
billing.customer_classes, and `wbcode.r_<case>_in` over billing.customers. `wbcode.swap(case)`
(which runs EXECUTE: "may" for the classifier) renames the second into the first's name.
A case runs `swap` by some route, then reads `wbcode.r_<case>`: the server then reads
customers, so the read's event must exist and be uncertain (`analysis_complete: false`) or
name customers (once pgveil read the catalog again). Before the fix of a route, the read left
no event at all: an access to customers' names that `audit who` never lists.

The last cases are the other way round: code that only writes rows keeps reads certain.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import asyncpg
import psycopg
import pytest

from proxy.demo.embedded_pg import EmbeddedPostgres
from tests.integration.audit_wire import audited_proxy
from tests.integration.masking_fixture import ADMIN, ADMIN_PW, NAME, dsn
from tests.integration.test_audit_evasion_who import CUSTOMERS, access_events, settled
from tests.support import ProxyProcess

# the cases, each with its pair of views
CASES = [
    "prep_psycopg", "prep_asyncpg", "proto", "cached", "tempfn", "subscript",
    "evt", "fk", "rule", "part", "idx", "tmptrg", "newtrg",
]  # fmt: skip


def swapping(schema: str, cases: list[str], code: str) -> str:
    """The SQL of a module's schema: `schema.swap(case)`, the DDL every route runs
    (`r_<case>` becomes the view over customers, once), then `code`, then each case's pair
    of views."""
    return (
        f"""
DROP SCHEMA IF EXISTS {schema} CASCADE;
CREATE SCHEMA {schema};
GRANT USAGE, CREATE ON SCHEMA {schema} TO billing_admin;
CREATE FUNCTION {schema}.swap(x text) RETURNS int LANGUAGE plpgsql SECURITY DEFINER AS $$
BEGIN
  IF pg_catalog.to_regclass('{schema}.r_' || x || '_in') IS NOT NULL THEN
    EXECUTE format('ALTER VIEW {schema}.%I RENAME TO %I', 'r_' || x, 'r_' || x || '_out');
    EXECUTE format('ALTER VIEW {schema}.%I RENAME TO %I', 'r_' || x || '_in', 'r_' || x);
  END IF;
  RETURN 1;
END $$;
"""
        + code
        + "".join(
            f"CREATE VIEW {schema}.r_{c} AS"
            " SELECT name::text AS name FROM billing.customer_classes;\n"
            f"CREATE VIEW {schema}.r_{c}_in AS SELECT name::text AS name FROM billing.customers;\n"
            for c in cases
        )
        + f"GRANT SELECT ON ALL TABLES IN SCHEMA {schema} TO billing_admin;\n"
    )


@contextmanager
def audited_schema(
    pg: EmbeddedPostgres, sql: str, schema: str, tmp: Path
) -> Iterator[tuple[ProxyProcess, Path]]:
    """An audited pgveil that read the catalog with `sql` in it (dropped after)."""
    pg.psql(sql)
    try:
        with audited_proxy(pg, tmp) as shared:
            yield shared
    finally:
        pg.psql(f"DROP SCHEMA IF EXISTS {schema} CASCADE")


SCHEMA = swapping(
    "wbcode",
    CASES,
    """
CREATE FUNCTION wbcode.swap_trigger() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN PERFORM wbcode.swap(TG_ARGV[0]); RETURN NULL; END $$;
-- an event trigger that calls it when a COMMENT is put on one table
CREATE TABLE wbcode.et_target (x int);
ALTER TABLE wbcode.et_target OWNER TO billing_admin;
CREATE FUNCTION wbcode.on_comment() RETURNS event_trigger LANGUAGE plpgsql AS $$
DECLARE r record;
BEGIN
  FOR r IN SELECT * FROM pg_event_trigger_ddl_commands() LOOP
    IF r.object_identity = 'wbcode.et_target' THEN PERFORM wbcode.swap('evt'); END IF;
  END LOOP;
END $$;
CREATE EVENT TRIGGER wbcode_on_comment ON ddl_command_end WHEN TAG IN ('COMMENT')
  EXECUTE FUNCTION wbcode.on_comment();
-- triggers reached through a write to another table: a foreign key's cascade, a rule, a
-- partition
CREATE TABLE wbcode.parent (id int PRIMARY KEY);
CREATE TABLE wbcode.child (id int REFERENCES wbcode.parent ON DELETE CASCADE);
CREATE TRIGGER child_gone AFTER DELETE ON wbcode.child
  FOR EACH ROW EXECUTE FUNCTION wbcode.swap_trigger('fk');
INSERT INTO wbcode.parent VALUES (1);
INSERT INTO wbcode.child VALUES (1);
CREATE TABLE wbcode.ruled (x int);
CREATE TABLE wbcode.logged (x int);
CREATE TRIGGER logged_swap AFTER INSERT ON wbcode.logged
  FOR EACH ROW EXECUTE FUNCTION wbcode.swap_trigger('rule');
CREATE RULE ruled_log AS ON INSERT TO wbcode.ruled DO ALSO INSERT INTO wbcode.logged VALUES (NEW.x);
CREATE TABLE wbcode.parted (x int) PARTITION BY LIST (x);
CREATE TABLE wbcode.part1 PARTITION OF wbcode.parted FOR VALUES IN (1);
CREATE TRIGGER part_swap AFTER INSERT ON wbcode.part1
  FOR EACH ROW EXECUTE FUNCTION wbcode.swap_trigger('part');
-- an index expression: an immutable function calling the volatile one
CREATE FUNCTION wbcode.idx_key(x int) RETURNS int LANGUAGE plpgsql IMMUTABLE AS $$
BEGIN PERFORM wbcode.swap('idx'); RETURN x; END $$;
CREATE TABLE wbcode.indexed (x int);
CREATE INDEX ON wbcode.indexed (wbcode.idx_key(x));
GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA wbcode TO billing_admin;
""",
)


@pytest.fixture(scope="module")
def coded(
    pg: EmbeddedPostgres, billing: ProxyProcess, tmp_path_factory: Any
) -> Iterator[tuple[ProxyProcess, Path]]:
    """An audited pgveil that read the catalog with the code above in it."""
    with audited_schema(pg, SCHEMA, "wbcode", tmp_path_factory.mktemp("evasion-code")) as shared:
        yield shared


def _connect(pg: EmbeddedPostgres, port: int, app: str) -> psycopg.Connection[Any]:
    conninfo = dsn(pg, port, ADMIN, ADMIN_PW) + f" application_name={app}"
    return psycopg.connect(conninfo, autocommit=True)


def fresh(pg: EmbeddedPostgres, coded: tuple[ProxyProcess, Path], case: str) -> None:
    """Wait until names are certain again (an earlier case may have moved them): the read
    after the route is then uncertain only because of the route itself."""
    proxy, path = coded
    settled(pg, proxy.port, path, f"wbc-{case}-before")


def assert_read_seen(
    pg: EmbeddedPostgres, coded: tuple[ProxyProcess, Path], case: str, schema: str = "wbcode"
) -> None:
    """Read `<schema>.r_<case>` in a new session, after the route ran `swap`: the server
    reads customers (checked: the route did run the DDL), and the event says so or is
    uncertain."""
    proxy, path = coded
    app = f"wbc-{case}-read"
    with _connect(pg, proxy.port, app) as c:
        rows = c.execute(f"SELECT name FROM {schema}.r_{case}").fetchall()
    assert (NAME,) in rows, "the route did not run the DDL"
    reads = access_events(path, app)
    assert reads, "a read of customers through a moved name left no event"
    (read,) = reads
    assert read["analysis_complete"] is False or CUSTOMERS in read["tables"], read


# ---- a statement that runs code later than when pgveil looked at it ---------------------------


async def _asyncpg(port: int, app: str) -> asyncpg.Connection:
    return await asyncpg.connect(
        host="127.0.0.1", port=port, user=ADMIN, password=ADMIN_PW, database="postgres",
        ssl=False, server_settings={"application_name": app},
    )  # fmt: skip


@pytest.mark.parametrize("client", ["psycopg", "asyncpg"])
def test_execute_of_a_prepared_statement_that_may_move_names(
    pg: EmbeddedPostgres, coded: tuple[ProxyProcess, Path], client: str
) -> None:
    """PREPARE names code that may move names but runs nothing; EXECUTE, after pgveil read the
    catalog again, runs it: the EXECUTE moves names as the statement would."""
    proxy, path = coded
    case = f"prep_{client}"
    fresh(pg, coded, case)
    prepare = f"PREPARE p AS SELECT wbcode.swap('{case}')"
    if client == "psycopg":
        with _connect(pg, proxy.port, f"wbc-{case}") as c:
            c.execute(prepare)
            settled(pg, proxy.port, path, f"wbc-{case}-settled")
            c.execute("EXECUTE p")
    else:

        async def go() -> None:
            c = await _asyncpg(proxy.port, f"wbc-{case}")
            try:
                await c.execute(prepare)
                settled(pg, proxy.port, path, f"wbc-{case}-settled")
                await c.fetch("EXECUTE p")
            finally:
                await c.close()

        asyncio.run(go())
    assert_read_seen(pg, coded, case)


def test_a_protocol_statement_executed_again_after_the_catalog_was_read(
    pg: EmbeddedPostgres, coded: tuple[ProxyProcess, Path]
) -> None:
    """asyncpg keeps every statement prepared: the second call of the same text is only a
    Bind and an Execute, which run the code again (here with another argument)."""
    proxy, path = coded
    fresh(pg, coded, "proto")

    async def go() -> None:
        c = await _asyncpg(proxy.port, "wbc-proto")
        try:
            await c.fetch("SELECT wbcode.swap($1)", "nothing")
            settled(pg, proxy.port, path, "wbc-proto-settled")
            await c.fetch("SELECT wbcode.swap($1)", "proto")
        finally:
            await c.close()

    asyncio.run(go())
    assert_read_seen(pg, coded, "proto")


def test_a_cached_statement_executed_after_another_moved_its_names(
    pg: EmbeddedPostgres, coded: tuple[ProxyProcess, Path]
) -> None:
    """A statement prepared while its name denoted a view over an unprotected table, executed
    again after another statement moved the name: the server plans it again and reads
    customers, so its second run is no longer what its Parse was analysed as."""
    proxy, path = coded
    read = "SELECT name FROM wbcode.r_cached"
    fresh(pg, coded, "cached")

    async def go() -> list[Any]:
        c = await _asyncpg(proxy.port, "wbc-cached")
        try:
            await c.fetch(read)
            await c.fetch("SELECT wbcode.swap('cached')")
            return [tuple(r) for r in await c.fetch(read)]
        finally:
            await c.close()

    rows = asyncio.run(go())
    assert (NAME,) in rows
    # (the first run reads the unprotected table: no event; then the swap's)
    events = access_events(path, "wbc-cached")
    (swap,) = [i for i, e in enumerate(events) if "swap" in str(e["statement"])]
    reads = events[swap + 1 :]
    assert reads, "the second run of the read left no event"
    (again,) = reads
    assert again["analysis_complete"] is False or CUSTOMERS in again["tables"], reads


def test_a_cached_statement_stays_certain_once_its_names_are_read_alike(
    pg: EmbeddedPostgres, coded: tuple[ProxyProcess, Path]
) -> None:
    """The other way round: once the catalog read after the move is in and the statement's
    text reads the same under it, its next run is certain again (a pool's cached
    statements are not uncertain for good after every move)."""
    proxy, path = coded
    app = "wbc-cached-alike"
    read = "SELECT i_customer, email FROM billing.customers WHERE i_customer = $1"
    fresh(pg, coded, "cached-alike")

    async def go() -> None:
        c = await _asyncpg(proxy.port, app)
        try:
            await c.fetch(read, 1)
            await c.fetch("SELECT wbcode.swap('nothing')")
            settled(pg, proxy.port, path, f"{app}-settled")
            await c.fetch(read, 1)
        finally:
            await c.close()

    asyncio.run(go())
    reads = [e for e in access_events(path, app) if "customers" in str(e["statement"])]
    assert len(reads) == 2, reads
    assert reads[-1]["analysis_complete"] is True and reads[-1]["tables"] == [CUSTOMERS], reads
    assert reads[-1]["subjects"] == {CUSTOMERS: ["1"]}, reads


# ---- code reached by names pgveil does not match ----------------------------------------------


def test_a_temporary_function_called_by_its_qualified_name(
    pg: EmbeddedPostgres, coded: tuple[ProxyProcess, Path]
) -> None:
    """The catalog has the function in the session's pg_temp_N schema; the statement calls
    it as pg_temp.f."""
    proxy, path = coded
    fresh(pg, coded, "tempfn")
    with _connect(pg, proxy.port, "wbc-tempfn") as c:
        c.execute(
            "CREATE FUNCTION pg_temp.tswap(x text) RETURNS int LANGUAGE plpgsql"
            " AS $$ BEGIN PERFORM wbcode.swap(x); RETURN 1; END $$"
        )
        settled(pg, proxy.port, path, "wbc-tempfn-settled")
        c.execute("SELECT pg_temp.tswap('tempfn')")
    assert_read_seen(pg, coded, "tempfn")


def test_a_call_in_the_subscript_of_a_plpgsql_assignment(
    pg: EmbeddedPostgres, coded: tuple[ProxyProcess, Path]
) -> None:
    """`a[f()] := 1`: the server runs f() of the target's subscript as well."""
    proxy, _path = coded
    fresh(pg, coded, "subscript")
    with _connect(pg, proxy.port, "wbc-subscript") as c:
        c.execute("DO $$ DECLARE a int[] := '{0}'; BEGIN a[wbcode.swap('subscript')] := 1; END $$")
    assert_read_seen(pg, coded, "subscript")


@pytest.mark.parametrize(
    ("case", "statements"),
    [
        # an event trigger fired by DDL that moves no name itself
        ("evt", ("COMMENT ON TABLE wbcode.et_target IS 'x'",)),
        # triggers of a table written because another one is: a foreign key's cascade, a
        # rule's action, the partition a row is routed to
        ("fk", ("DELETE FROM wbcode.parent WHERE id = 1",)),
        ("rule", ("INSERT INTO wbcode.ruled VALUES (1)",)),
        ("part", ("INSERT INTO wbcode.parted VALUES (1)",)),
        # an index expression's function
        ("idx", ("INSERT INTO wbcode.indexed VALUES (1)",)),
        # a trigger attached to a relation the catalog does not have, fired at once
        (
            "tmptrg",
            (
                "CREATE TEMP TABLE tt (x int)",
                "CREATE TRIGGER tt_swap AFTER INSERT ON tt FOR EACH ROW"
                " EXECUTE FUNCTION wbcode.swap_trigger('tmptrg')",
                "INSERT INTO tt VALUES (1)",
            ),
        ),
        (
            "newtrg",
            (
                "CREATE TABLE wbcode.fresh (x int)",
                "CREATE TRIGGER fresh_swap AFTER INSERT ON wbcode.fresh FOR EACH ROW"
                " EXECUTE FUNCTION wbcode.swap_trigger('newtrg')",
                "INSERT INTO wbcode.fresh VALUES (1)",
            ),
        ),
    ],
)
def test_code_run_without_being_named(
    pg: EmbeddedPostgres, coded: tuple[ProxyProcess, Path], case: str, statements: tuple[str, ...]
) -> None:
    proxy, _path = coded
    fresh(pg, coded, case)
    with _connect(pg, proxy.port, f"wbc-{case}") as c:
        for s in statements:
            c.execute(s)
    assert_read_seen(pg, coded, case)


# ---- temporary relations -------------------------------------------------------------------


def test_a_temporary_table_made_by_the_session_shadows_a_catalog_name(
    pg: EmbeddedPostgres, coded: tuple[ProxyProcess, Path]
) -> None:
    """The session's own CREATE TEMP TABLE (no code involved) takes an unqualified name the
    catalog has for an unprotected table: the read of that name reads the temporary table
    (customers' names copied), not billing.customer_classes; its event must not say it read
    the catalog's relation as fact."""
    proxy, path = coded
    app = "wbc-own-temp"
    fresh(pg, coded, "own-temp")
    with _connect(pg, proxy.port, app) as c:
        c.execute("SET search_path = billing, public")
        c.execute(
            "CREATE TEMP TABLE customer_classes AS"
            " SELECT i_customer AS i_customer_class, name FROM billing.customers"
        )
        before = len(access_events(path, app))
        rows = c.execute("SELECT name FROM customer_classes").fetchall()
        assert (NAME,) in rows
    reads = access_events(path, app)[before:]
    assert reads, "the read of the temporary copy left no event"
    assert reads[-1]["analysis_complete"] is False, reads


# ---- what must stay certain ----------------------------------------------------------------


@pytest.mark.parametrize(
    "call",
    [
        "INSERT INTO wbcode.et_target VALUES (1)",  # (its event trigger runs on DDL only)
        "SELECT CAST('plain' AS text)",
    ],
)
def test_writes_without_moving_code_stay_certain(
    pg: EmbeddedPostgres, coded: tuple[ProxyProcess, Path], call: str
) -> None:
    """A write to a table without moving code, and a built-in cast, leave the next read
    certain. (Its subjects are not proved complete: the event trigger above is code the
    server runs without a statement naming it, so no statement's shape proves its subjects,
    by design: rules/subjects.py, `hidden_code`.)"""
    proxy, path = coded
    app = f"wbc-certain-{len(call)}"
    fresh(pg, coded, app)
    with _connect(pg, proxy.port, app) as c:
        c.execute("BEGIN")
        c.execute(call)
        c.execute("SELECT i_customer, email FROM billing.customers WHERE i_customer = 1")
        c.execute("COMMIT")
    read = access_events(path, app)[-1]
    assert read["analysis_complete"] is True, read
    assert read["tables"] == [CUSTOMERS] and read["subjects"] == {CUSTOMERS: ["1"]}, read
