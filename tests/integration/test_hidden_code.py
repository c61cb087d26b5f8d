"""User code the server runs without a statement naming it must be on the allow list.

Masked roles may call a user-defined function only when the rules allow it. A cast, a
domain's CHECK, an operator (even one named like a built-in) or an operator class's support
function written in SQL or a procedural language reaches the same code without its name in
any statement, so pgveil treats each as a rules problem: masked sessions on that database are
refused, naming the object and its function, until the function is allowed or dropped.

Everything here lives in a database of its own, so other modules' proxies never see it.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from proxy.demo.embedded_pg import EmbeddedPostgres
from tests.integration.masking_fixture import HASH_KEY, HELPDESK, HELPDESK_PW, dsn, leaks
from tests.support import ProxyProcess

DB = "pgveil_hidden"
SECRET = "Hortensia Privatissima"
RULES = f"""
databases: [{DB}]
roles:
  masked: [{HELPDESK}]
  default: unmasked
functions:
  allow: [{{allow}}]
tables:
  shop.people:
    subject: id
    columns:
      name: partial
"""
# SECURITY DEFINER code of an administrator that reads the raw name: what a masked role
# must never get to run unless the rules allow it
SPY = """
CREATE FUNCTION shop.spy() RETURNS text LANGUAGE sql SECURITY DEFINER
  AS $$ SELECT name FROM shop.people LIMIT 1 $$;
"""
# (objects to create, the function they call, what pgveil names)
CASES = {
    "cast": (
        "CREATE FUNCTION shop.to_int(inet) RETURNS int LANGUAGE sql SECURITY DEFINER "
        "AS $$ SELECT length(shop.spy()) $$;"
        "CREATE CAST (inet AS int) WITH FUNCTION shop.to_int(inet) AS ASSIGNMENT;",
        "shop.to_int",
        "cast from inet to integer",
    ),
    "domain_check": (
        "CREATE FUNCTION shop.ok(int) RETURNS bool LANGUAGE plpgsql SECURITY DEFINER "
        "AS $$ BEGIN PERFORM shop.spy(); RETURN true; END $$;"
        "CREATE DOMAIN shop.checked AS int CHECK (shop.ok(VALUE));",
        "shop.ok",
        "domain shop.checked",
    ),
    "operator_named_like_a_builtin": (
        "CREATE FUNCTION shop.eq(int, text) RETURNS bool LANGUAGE sql SECURITY DEFINER "
        "AS $$ SELECT shop.spy() IS NOT NULL $$;"
        "CREATE OPERATOR shop.= (LEFTARG = int, RIGHTARG = text, FUNCTION = shop.eq);",
        "shop.eq",
        "operator shop.=(integer,text)",
    ),
    "event_trigger": (
        "CREATE FUNCTION shop.on_ddl() RETURNS event_trigger LANGUAGE plpgsql SECURITY DEFINER "
        "AS $$ BEGIN PERFORM shop.spy(); END $$;"
        "CREATE EVENT TRIGGER shop_on_ddl ON ddl_command_end EXECUTE FUNCTION shop.on_ddl();",
        "shop.on_ddl",
        "event trigger shop_on_ddl",
    ),
    "operator_class_support": (
        "CREATE FUNCTION shop.cmp(int2, int2) RETURNS int LANGUAGE sql SECURITY DEFINER "
        "AS $$ SELECT btint2cmp($1, $2) + 0 * length(shop.spy()) $$;"
        "CREATE OPERATOR CLASS shop.int2_ops FOR TYPE int2 USING btree AS "
        "OPERATOR 1 <, OPERATOR 2 <=, OPERATOR 3 =, OPERATOR 4 >=, OPERATOR 5 >, "
        "FUNCTION 1 shop.cmp(int2, int2);",
        "shop.cmp",
        "operator family shop.int2_ops for access method btree",
    ),
}


@pytest.fixture(scope="module")
def database(pg: EmbeddedPostgres, billing: ProxyProcess) -> Iterator[None]:
    # `billing` creates the roles (helpdesk) this module's rules name
    pg.psql(f"DROP DATABASE IF EXISTS {DB}")
    pg.psql(f"CREATE DATABASE {DB}")
    yield
    pg.psql(f"DROP DATABASE IF EXISTS {DB} WITH (FORCE)")


@pytest.fixture
def shop(pg: EmbeddedPostgres, database: None) -> Iterator[None]:
    pg.psql("DROP EVENT TRIGGER IF EXISTS shop_on_ddl", dbname=DB)
    pg.psql(
        "DROP SCHEMA IF EXISTS shop CASCADE; CREATE SCHEMA shop;"
        "CREATE TABLE shop.people (id int PRIMARY KEY, name text);"
        f"INSERT INTO shop.people VALUES (1, '{SECRET}');"
        f"GRANT USAGE ON SCHEMA shop TO {HELPDESK}; GRANT SELECT ON shop.people TO {HELPDESK};"
        + SPY,
        dbname=DB,
    )
    yield
    pg.psql("DROP EVENT TRIGGER IF EXISTS shop_on_ddl", dbname=DB)
    pg.psql("DROP SCHEMA IF EXISTS shop CASCADE", dbname=DB)


def _proxy(pg: EmbeddedPostgres, tmp_path: Path, allow: str) -> ProxyProcess:
    rules = tmp_path / "rules.yaml"
    rules.write_text(RULES.replace("{allow}", allow))
    return ProxyProcess(
        pg.port,
        "--upstream-sslmode", "disable",
        "--rules", str(rules),
        "--catalog-user", pg.superuser,
        env={"PGVEIL_TEST_HASH_KEY": HASH_KEY, "PGVEIL_CATALOG_PASSWORD": pg.password},
    )  # fmt: skip


def _check_config(pg: EmbeddedPostgres, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            sys.executable, "-m", "proxy.cli", "proxy", "--check-config",
            "--upstream", f"127.0.0.1:{pg.port}", "--upstream-sslmode", "disable",
            "--rules", str(tmp_path / "rules.yaml"), "--catalog-user", pg.superuser,
        ],
        capture_output=True, text=True, timeout=120,
        env={**os.environ, "PGVEIL_TEST_HASH_KEY": HASH_KEY,
             "PGVEIL_CATALOG_PASSWORD": pg.password},
    )  # fmt: skip


def _masked_name(pg: EmbeddedPostgres, port: int) -> str:
    with psycopg.connect(dsn(pg, port, HELPDESK, HELPDESK_PW) + f" dbname={DB}") as c:
        row = c.execute("SELECT name FROM shop.people").fetchone()
    assert row is not None
    return str(row[0])


@pytest.mark.parametrize("case", list(CASES))
def test_code_reached_without_its_name_closes_masked_sessions_until_allowed(
    pg: EmbeddedPostgres, tmp_path: Path, shop: None, case: str
) -> None:
    create, function, what = CASES[case]
    pg.psql(create, dbname=DB)
    with _proxy(pg, tmp_path, "shop.spy") as p:
        with pytest.raises(psycopg.OperationalError) as info:
            _masked_name(pg, p.port)
        message = str(info.value)
        assert f"pgveil: the rules do not match database {DB}: functions.allow: " in message
        assert what in message and f"calls function {function}, which is not allowed" in message
        assert not leaks(message) and SECRET not in message + p.log()
    check = _check_config(pg, tmp_path)
    assert check.returncode == 1, check.stdout + check.stderr
    assert f"calls function {function}, which is not allowed" in check.stdout
    # allowed: the DBA has said masked roles may run it
    with _proxy(pg, tmp_path, f"shop.spy, {function}") as p:
        assert _masked_name(pg, p.port) == "H********************a"


def test_a_database_without_such_code_serves_masked_sessions(
    pg: EmbeddedPostgres, tmp_path: Path, shop: None
) -> None:
    # C and internal functions are the server's or an extension's, installed by a
    # superuser: a cast through one is no problem
    pg.psql(
        "CREATE TYPE shop.level AS ENUM ('low', 'high');"
        "CREATE DOMAIN shop.positive AS int CHECK (VALUE > 0);",
        dbname=DB,
    )
    with _proxy(pg, tmp_path, "shop.spy") as p:
        assert _masked_name(pg, p.port) == "H********************a"


def test_code_attached_to_tables_is_reported_not_refused(
    pg: EmbeddedPostgres, tmp_path: Path, shop: None
) -> None:
    """A trigger or a column default runs when a masked role writes the table: part of the
    schema the DBA designed, so it is reported (a warning) and masked sessions go on."""
    pg.psql(
        "CREATE FUNCTION shop.touch() RETURNS trigger LANGUAGE plpgsql "
        "AS $$ BEGIN RETURN NEW; END $$;"
        "CREATE TRIGGER people_touch BEFORE UPDATE ON shop.people "
        "FOR EACH ROW EXECUTE FUNCTION shop.touch();",
        dbname=DB,
    )
    with _proxy(pg, tmp_path, "shop.spy") as p:
        assert _masked_name(pg, p.port) == "H********************a"
    check = _check_config(pg, tmp_path)
    assert check.returncode == 0, check.stdout + check.stderr
    assert (
        "warning: database pgveil_hidden: functions.allow: trigger people_touch on table "
        "shop.people calls function shop.touch, which is not allowed: masked roles' writes "
        "run it" in check.stdout
    )
