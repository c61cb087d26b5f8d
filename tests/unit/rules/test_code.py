"""Which code may move names (rules/code.py): PL/pgSQL and SQL bodies, DO blocks, the
fixpoint over calls and attached code, and the statements that run such code. Code "may"
when it may run DDL; a CALL of a procedure that only reads and writes rows may not."""

from __future__ import annotations

import re
from dataclasses import replace
from pathlib import Path

import pglast.parser
import pytest
from pglast import parse_sql

from rules import code
from rules.code import (
    MAY,
    Routine,
    body_facts,
    do_facts,
    hidden_moving,
    moving_code,
    routine_facts,
    statement_moves,
)
from rules.effects import moves_names
from tests.unit.rules.fixtures import CATALOG


def plpgsql(body: str, returns: str = "void", args: str = "") -> str:
    return f"CREATE FUNCTION s.f({args}) RETURNS {returns} LANGUAGE plpgsql AS $body${body}$body$"


def may(body: str, returns: str = "void", args: str = "") -> bool:
    return body_facts("plpgsql", plpgsql(body, returns, args)).may


@pytest.mark.parametrize(
    "body",
    [
        "BEGIN EXECUTE 'CREATE OR REPLACE VIEW v AS SELECT 1'; END",
        "DECLARE r record; BEGIN FOR r IN EXECUTE 'SELECT 1' LOOP NULL; END LOOP; END",
        "DECLARE c refcursor; BEGIN OPEN c FOR EXECUTE 'SELECT 1'; END",
        "BEGIN ALTER TABLE t RENAME TO u; END",
        "BEGIN CREATE TEMP TABLE pg_stat_activity (x int); END",
        "BEGIN DROP VIEW v; END",
        "BEGIN CREATE TABLE t AS SELECT 1; END",
        "BEGIN SET search_path = evil; END",
        "BEGIN IF true THEN NULL; ELSE DROP TABLE t; END IF; END",
        "BEGIN LOOP EXIT; CREATE INDEX ON t (x); END LOOP; END",
        "BEGIN WHILE false LOOP TRUNCATE t; END LOOP; END",
        "BEGIN BEGIN NULL; EXCEPTION WHEN others THEN DROP TABLE t; END; END",
        "BEGIN BEGIN BEGIN EXECUTE 'x'; END; END; END",  # nested blocks
        "BEGIN CASE 1 WHEN 1 THEN COMMENT ON TABLE t IS 'x'; END CASE; END",
        "DECLARE x int; BEGIN FOR x IN 1..3 LOOP GRANT SELECT ON t TO PUBLIC; END LOOP; END",
        "BEGIN PERFORM dblink_exec('DROP TABLE t'); END",  # another session
        "BEGIN this is not pl/pgsql; END",  # does not parse
    ],
)
def test_plpgsql_that_may_run_ddl(body: str) -> None:
    assert may(body), body


def test_return_query_execute_may() -> None:
    assert may("BEGIN RETURN QUERY EXECUTE 'SELECT 1'; END", "SETOF int")


@pytest.mark.parametrize(
    "body",
    [
        "BEGIN INSERT INTO t VALUES (1); UPDATE t SET x = x + 1; DELETE FROM t; END",
        "BEGIN MERGE INTO t USING u ON t.x = u.x WHEN MATCHED THEN DELETE; END",
        "DECLARE r record; BEGIN SELECT * INTO r FROM t; END",  # a variable, not a table
        "DECLARE r record; BEGIN FOR r IN SELECT * FROM t LOOP PERFORM r.x; END LOOP; END",
        "BEGIN COMMIT; ROLLBACK; END",
        "BEGIN RAISE NOTICE '%', 1; ASSERT true; END",
        "BEGIN BEGIN INSERT INTO t VALUES (1); EXCEPTION WHEN others THEN NULL; END; END",
        "DECLARE c CURSOR FOR SELECT 1; x int; BEGIN OPEN c; FETCH c INTO x; CLOSE c; END",
        "DECLARE x int := 1; BEGIN x := x + 1; WHILE x < 3 LOOP x := x * 2; END LOOP; END",
    ],
)
def test_plpgsql_that_only_reads_and_writes_rows(body: str) -> None:
    assert not may(body), body


def test_calls_are_collected_from_every_position() -> None:
    facts = body_facts(
        "plpgsql",
        plpgsql(
            "DECLARE x int := a(); BEGIN x := b(x); IF c() THEN PERFORM d(); END IF; "
            "FOR i IN e()..3 LOOP INSERT INTO s.t VALUES (f()); END LOOP; "
            "RAISE NOTICE '%', g(); CALL p(1); "
            "BEGIN NULL; EXCEPTION WHEN others THEN x := h(); END; END"
        ),
    )
    assert not facts.may
    names = {n for _s, n in facts.functions}
    assert names >= {"a", "b", "c", "d", "e", "f", "g", "h", "p"}
    assert ("s", "t") in facts.writes


def test_sql_bodies() -> None:
    def sql(body: str) -> bool:
        return body_facts("sql", f"CREATE FUNCTION f() RETURNS void LANGUAGE sql {body}").may

    assert not sql("AS $$ INSERT INTO t VALUES (1); UPDATE t SET x = 2 $$")
    assert not sql("BEGIN ATOMIC INSERT INTO t VALUES (1); END")
    assert sql("AS $$ SELECT 1 INTO new_table $$")  # SELECT INTO creates a table
    assert sql("AS $$ CREATE VIEW v AS SELECT 1 $$")
    assert sql("AS $$ DEALLOCATE ALL $$")  # any utility statement
    assert sql("AS $$ not sql $$")


@pytest.mark.parametrize("language", ["c", "internal", "plpython3u", "plperl"])
def test_another_language_may(language: str) -> None:
    assert body_facts(language, "CREATE FUNCTION f() RETURNS int AS 'x'") is MAY


@pytest.mark.parametrize(
    ("language", "name", "runs_sql_text", "may"),
    [
        ("c", "digest", False, False),  # an extension's C code: trusted as built-ins are
        ("internal", "my_abs", False, False),  # a built-in under another name
        ("internal", "my_query", True, True),  # ... one that runs a query given as text
        ("c", "dblink_exec", False, True),  # runs SQL in another session
        ("c", "pg_background_launch", False, True),
        ("plpython3u", "f", False, True),  # another procedural language: unknown
    ],
)
def test_catalog_routines(language: str, name: str, runs_sql_text: bool, may: bool) -> None:
    definition = "CREATE FUNCTION f() RETURNS int AS 'x'"
    assert routine_facts(language, definition, name, runs_sql_text).may is may


def test_do_blocks() -> None:
    def do(text: str) -> bool:
        return do_facts(parse_sql(text)[0].stmt).may

    assert do("DO $$ BEGIN EXECUTE 'DROP TABLE t'; END $$")
    assert not do("DO $$ BEGIN INSERT INTO t VALUES (1); END $$")
    assert do("DO LANGUAGE plperl $$ 1 $$")
    # the wrapper's quoting holds against a body that spells it
    assert do("DO $x$ BEGIN EXECUTE '$pgveil$'; END $x$")
    assert not do("DO $x$ BEGIN RAISE NOTICE '$pgveil$'; END $x$")


def _routine(oid: int, name: str, body: str, calls: tuple[int, ...] = ()) -> Routine:
    return Routine(oid, "s", name, body_facts("plpgsql", plpgsql(body)), calls)


def test_the_fixpoint_over_calls_and_attached_code() -> None:
    routines = [
        _routine(1, "ddl", "BEGIN EXECUTE 'x'; END"),
        _routine(2, "calls_ddl", "BEGIN PERFORM s.ddl(); END"),
        _routine(3, "calls_it", "BEGIN PERFORM calls_ddl(); END"),
        _routine(4, "rows", "BEGIN INSERT INTO s.plain VALUES (1); END"),
        _routine(5, "writes_trigger", "BEGIN INSERT INTO s.triggered VALUES (1); END"),
        _routine(6, "unknown", "BEGIN PERFORM nobody_has_it(); END"),
        _routine(7, "builtin", "BEGIN PERFORM upper('x'); END"),
        _routine(8, "op", "BEGIN PERFORM 1 ### 2; END"),
        # a query given as text may call any function: "may" since some routine may
        _routine(10, "as_text", "BEGIN PERFORM query_to_xml('SELECT 1', true, false, ''); END"),
        Routine(9, "s", "agg", code.NOTHING, (1,)),  # an aggregate whose support may
    ]
    moving = moving_code(
        routines,
        frozenset({"upper", "query_to_xml"}),
        [("###", 1)],
        [("s", "triggered", 1, False), ("s", "guarded", 1, True)],
        {("s", "over_guarded"): (("s", "guarded"),)},
    )
    names = {n for _s, n in moving.functions}
    assert names == {
        "ddl", "calls_ddl", "calls_it", "writes_trigger", "unknown", "op", "agg", "as_text"
    }  # fmt: skip
    assert moving.operators == {"###"}
    assert moving.reads == {("s", "guarded"), ("s", "over_guarded")}
    assert ("s", "triggered") in moving.writes and ("s", "plain") not in moving.writes


def _catalog() -> object:
    return replace(
        CATALOG,
        moving_functions=frozenset({("billing", "leak")}),
        moving_operators=frozenset({"===="}),
        moving_reads=frozenset({("billing", "customer_view")}),
        moving_writes=frozenset({("billing", "customer_view"), ("public", "notes")}),
    )


@pytest.mark.parametrize(
    ("sql", "expected"),
    [
        ("CALL billing.leak()", True),
        ("SELECT leak()", True),  # unqualified: any schema's
        ("SELECT 1 FROM billing.customers WHERE billing.leak() IS NULL", True),
        ("CALL billing.invoice_total(1)", False),
        ("SELECT billing.invoice_total(1)", False),
        ("SELECT 1 ==== 2", True),
        ("SELECT * FROM billing.customer_view", True),  # a view over code that may
        ("SELECT * FROM public.notes", False),  # its trigger runs on writes only
        ("INSERT INTO notes VALUES (1, 'x')", True),
        ("TRUNCATE public.notes", True),
        ("COPY public.notes FROM STDIN", True),
        ("SELECT query_to_xml('SELECT 1', true, false, '')", True),  # (billing.leak may)
        ("SELECT dblink_exec('x', 'DROP TABLE t')", True),
        ("DO $$ BEGIN INSERT INTO public.notes VALUES (1, 'x'); END $$", True),  # its trigger
        ("DO $$ BEGIN PERFORM billing.invoice_total(1); END $$", False),
        ("DO $$ BEGIN PERFORM billing.leak(); END $$", True),
        ("DO $$ BEGIN PERFORM not_in_the_catalog(); END $$", True),
        ("DO $$ BEGIN NULL; END $$", False),
    ],
)
def test_statements_that_run_code_that_may_move_names(sql: str, expected: bool) -> None:
    catalog = _catalog()
    assert statement_moves(parse_sql(sql), catalog) is expected
    assert moves_names(parse_sql(sql), catalog) is expected


# ---- the parser grows ------------------------------------------------------------------------


def test_every_plpgsql_node_kind_of_the_parser_is_classified() -> None:
    """pglast's PL/pgSQL parse output names its nodes by the C structs (PLpgSQL_stmt_...):
    every name its compiled parser can write must be known to rules.code, which otherwise
    takes a body holding it as "may". A pglast upgrade that adds a statement kind fails
    here until someone has looked at it."""
    binary = Path(pglast.parser.__file__).read_bytes()
    written = {m.decode() for m in re.findall(rb'"(PLpgSQL_[A-Za-z_]+)', binary)}
    assert written, "no PL/pgSQL node names found in pglast's parser"
    known = code.PLPGSQL_STATEMENTS | code.PLPGSQL_DYNAMIC | code.PLPGSQL_NODES
    assert written - known == set(), f"unclassified: {sorted(written - known)}"
    assert known - written == set(), f"no longer written: {sorted(known - written)}"


def test_a_query_given_as_text_moves_names_only_where_some_code_may() -> None:
    """query_to_xml runs its query read-only: only a function the query calls can run DDL."""
    stmts = parse_sql("SELECT query_to_xml('SELECT 1', true, false, '')")
    assert not statement_moves(stmts, CATALOG)
    rows_only = _routine(1, "rows", "BEGIN PERFORM query_to_xml('SELECT 1', true, false, ''); END")
    assert moving_code([rows_only], frozenset({"query_to_xml"}), [], [], {}).functions == set()


def test_an_unknown_plpgsql_node_kind_is_may() -> None:
    found = code._Found()
    code._plpgsql({"PLpgSQL_stmt_something_new": {"lineno": 1}}, found)
    assert found.may


# ---- white-box attacks (tests/integration/test_audit_evasion_code.py) --------------------------


def test_a_call_in_an_assignment_targets_subscript() -> None:
    """`a[f()] := 1` runs f: the target is read as an expression too."""
    facts = body_facts("plpgsql", plpgsql("DECLARE a int[]; BEGIN a[s.f()] := 1; END"))
    assert not facts.may and ("s", "f") in facts.functions
    assert may("DECLARE a int[]; BEGIN a[(SELECT 1 FROM t WHERE x = 1)] := 1; END")


def test_temporary_schemas_code_is_named_by_pg_temp() -> None:
    """The catalog has a session's temporary function and table under pg_temp_N; statements
    and bodies name them pg_temp.x."""
    tswap = Routine(
        1, "pg_temp_3", "tswap", body_facts("plpgsql", plpgsql("BEGIN EXECUTE 'x'; END"))
    )
    caller = _routine(2, "caller", "BEGIN PERFORM pg_temp.lower('x'); END")
    lower = Routine(3, "pg_temp_3", "lower", MAY)
    moving = moving_code(
        [tswap, caller, lower], frozenset({"lower"}), [], [("pg_temp_3", "tt", 1, False)], {}
    )
    assert ("pg_temp", "tswap") in moving.functions
    assert ("s", "caller") in moving.functions  # pg_temp.lower is the temporary one
    assert ("pg_temp", "tt") in moving.writes
    catalog = replace(CATALOG, moving_functions=moving.functions, moving_writes=moving.writes)
    assert statement_moves(parse_sql("SELECT pg_temp.tswap()"), catalog)
    assert statement_moves(parse_sql("INSERT INTO pg_temp.tt VALUES (1)"), catalog)


def test_writes_that_reach_other_relations() -> None:
    """A rule's action, a foreign key's cascade, a partition: a write to the first relation
    runs the second's triggers."""
    ddl = Routine(1, "s", "ddl", MAY)
    moving = moving_code(
        [ddl], frozenset(), [], [("s", "child", 1, False)], {},
        [(("s", "parent"), ("s", "child")), (("s", "grand"), ("s", "parent"))],
    )  # fmt: skip
    assert {("s", "child"), ("s", "parent"), ("s", "grand")} <= moving.writes
    assert ("s", "parent") not in moving.reads


def test_event_triggers_make_ddl_move_names() -> None:
    ddl = Routine(1, "s", "on_ddl", MAY)
    rows = _routine(2, "rows", "BEGIN INSERT INTO s.t VALUES (1); END")
    assert moving_code([ddl], frozenset(), [], [], {}, (), [1]).ddl
    assert not moving_code([ddl, rows], frozenset(), [], [], {}, (), [2]).ddl
    assert moving_code([], frozenset(), [], [], {}, (), [99]).ddl  # (not a user function)
    catalog = replace(CATALOG, moving_ddl=True)
    assert statement_moves(parse_sql("COMMENT ON TABLE billing.customers IS 'x'"), catalog)
    assert statement_moves(parse_sql("CREATE TABLE brand_new (x int)"), catalog)
    assert not statement_moves(parse_sql("SELECT 1"), catalog)
    assert not statement_moves(parse_sql("COMMENT ON TABLE billing.customers IS 'x'"), CATALOG)


def test_hidden_code_that_may_makes_every_expression_move_names() -> None:
    """A cast's, a domain CHECK's or an operator's function that may: which statement runs
    it cannot be told (implicit casts, BETWEEN's operators), so every statement that
    evaluates an expression moves names; an event trigger's counts for DDL only."""
    functions = frozenset({("s", "swap"), ("s", "tok_of")})
    cast = ("cast from text to s.tok", "s", "tok_of")
    assert hidden_moving([cast], functions)
    assert not hidden_moving([("cast from text to s.tok", "s", "rows_only")], functions)
    assert not hidden_moving([("event trigger on_ddl", "s", "swap")], functions)
    catalog = replace(CATALOG, moving_hidden=True)
    for sql in ("SELECT 1", "INSERT INTO billing.customers VALUES (1)", "EXECUTE p"):
        assert statement_moves(parse_sql(sql), catalog), sql
        assert not statement_moves(parse_sql(sql), CATALOG), sql
    for sql in ("BEGIN", "COMMIT", "SET search_path = s", "SHOW search_path", "DEALLOCATE p"):
        assert not statement_moves(parse_sql(sql), catalog), sql


@pytest.mark.parametrize(
    ("sql", "expected"),
    [
        # a trigger attached to a relation the catalog does not have: its function decides
        (
            "CREATE TRIGGER g AFTER INSERT ON brand_new FOR EACH ROW EXECUTE FUNCTION billing.leak()",
            True,
        ),
        (
            "CREATE TRIGGER g AFTER INSERT ON brand_new FOR EACH ROW EXECUTE FUNCTION nobody_has_it()",
            True,
        ),
        (
            "CREATE TRIGGER g AFTER INSERT ON brand_new FOR EACH ROW EXECUTE FUNCTION billing.invoice_total()",
            False,
        ),
        # statements that evaluate index expressions
        ("ANALYZE public.notes", True),
        ("ANALYZE", True),
        ("VACUUM FULL public.notes", True),
        ("REINDEX TABLE public.notes", True),
        ("REINDEX INDEX some_index", True),
        ("CLUSTER public.notes", True),
        ("ANALYZE billing.customers", False),
    ],
)
def test_statements_that_reach_attached_code(sql: str, expected: bool) -> None:
    assert statement_moves(parse_sql(sql), _catalog()) is expected
