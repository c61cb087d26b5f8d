"""The reads an audited session makes through names the catalog pgveil read cannot tell:
views the session created (temporary ones never are in the catalog), and relations created
since the catalog was read (the event is then uncertain, and the catalog is read again)."""

from __future__ import annotations

from dataclasses import replace

from proxy.wire import messages as m
from proxy.wire.simple import ready_for_query
from rules.context import ContextHolder, MaskingContext
from rules.loader import parse_rules
from tests.unit.rules.fixtures import CATALOG, RULES
from tests.unit.test_statement_log import (
    CUSTOMERS,
    TEXT,
    Session,
    complete,
    context,
    data_row,
    row_description,
)

CUSTOMERS_TABLE = "billing.customers"
ROWS = (
    row_description(("name", CUSTOMERS + 1000, 2, TEXT, 0))  # a relation pgveil does not know
    + data_row(b"x")
    + complete(b"SELECT 1")
)
VIEW = "CREATE TEMP VIEW tv AS SELECT i_customer, name FROM billing.customers"


class Recorder(Session):
    def query_silent(self, sql: str, answer: bytes) -> None:
        """A statement whose events (if any) stay in `hook.events`."""
        self.filter.client(self.client, m.message(m.QUERY, sql.encode() + b"\0"))
        self.filter.server(self.server, answer + ready_for_query())


def test_a_read_through_a_temporary_view_is_a_read_of_the_tables_behind_it() -> None:
    s = Recorder()
    made = s.query(VIEW, complete(b"CREATE VIEW"))
    assert made["tables"] == [CUSTOMERS_TABLE] and made["kinds"] == ["create_view"]
    for sql in ("SELECT name FROM tv", "SELECT name FROM pg_temp.tv"):
        event = s.query(sql, ROWS)
        assert event["tables"] == [CUSTOMERS_TABLE]
        assert event["views"] == {"pg_temp.tv": [CUSTOMERS_TABLE]}
        assert event["analysis_complete"] is True
        assert event["subjects_complete"] is False  # its rows name no table pgveil knows


def test_a_view_over_the_sessions_view_reads_what_that_one_reads() -> None:
    s = Recorder()
    s.query(VIEW, complete(b"CREATE VIEW"))
    s.query("CREATE TEMP VIEW outer_v AS SELECT name FROM tv", complete(b"CREATE VIEW"))
    event = s.query("SELECT name FROM outer_v", ROWS)
    assert event["tables"] == [CUSTOMERS_TABLE]


def test_a_temporary_view_shadows_the_catalogs_relation_of_that_name() -> None:
    s = Recorder()
    s.query(
        "CREATE TEMP VIEW notes AS SELECT i_customer AS id, name AS body FROM billing.customers",
        complete(b"CREATE VIEW"),
    )
    event = s.query("SELECT body FROM notes", ROWS)  # (public.notes, unprotected, is known)
    assert event["tables"] == [CUSTOMERS_TABLE] and "pg_temp.notes" in event["views"]


def test_a_view_replaced_in_the_session_reads_what_either_definition_reads() -> None:
    s = Recorder()
    s.query(VIEW, complete(b"CREATE VIEW"))
    s.query(
        "CREATE OR REPLACE TEMP VIEW tv AS SELECT i_account AS i_customer, ip AS name "
        "FROM billing.accounts",
        complete(b"CREATE VIEW"),
    )
    event = s.query("SELECT name FROM tv", ROWS)
    assert event["tables"] == ["billing.accounts", CUSTOMERS_TABLE]


def test_a_temporary_table_of_the_session_is_no_uncertain_read() -> None:
    s = Recorder()
    s.query_silent("CREATE TEMP TABLE scratch (x int)", complete(b"CREATE TABLE"))
    s.query_silent("SELECT x FROM scratch", complete(b"SELECT 0"))
    assert s.hook.events == []


def test_a_relation_pgveil_does_not_know_is_an_uncertain_read() -> None:
    holder = ContextHolder(context())
    s = Recorder(holder)
    event = s.query("SELECT body FROM public.created_later", ROWS)
    assert event["analysis_complete"] is False and event["tables"] == []
    assert event["subjects_complete"] is False
    assert holder.stale  # the catalog is read again soon
    # a permanent view the session created: what it defined it over, and uncertain (the
    # catalog may say otherwise once it is read again)
    s.query(
        "CREATE VIEW public.later AS SELECT name FROM billing.customers",
        complete(b"CREATE VIEW"),
    )
    event = s.query("SELECT name FROM public.later", ROWS)
    assert event["tables"] == [CUSTOMERS_TABLE] and event["analysis_complete"] is False


def test_the_shape_shared_by_sessions_keeps_no_sessions_view() -> None:
    """Audit fields are built once per statement shape and shared: one session's reading
    through its own view must not show in another's event of the same text."""
    ctx = context()
    first, second = Recorder(ctx), Recorder(ctx)
    first.query(VIEW, complete(b"CREATE VIEW"))
    assert first.query("SELECT name FROM tv WHERE i_customer = 1", ROWS)["views"]
    second.query_silent("CREATE TEMP TABLE tv (i_customer int, name text)", complete(b"CREATE"))
    second.query_silent("SELECT name FROM tv WHERE i_customer = 1", ROWS)
    assert second.hook.events == []


def test_after_a_statement_that_moves_names_every_session_is_unsure_until_a_new_read() -> None:
    """A rename (or a view replaced, a relation dropped) by one session: every session's
    statements that name relations are uncertain until the shell has read the catalog in a
    read that began after the rename's transaction ended."""
    holder = ContextHolder(context())
    mover, other = Recorder(holder), Recorder(holder)
    other.query_silent("SELECT body FROM public.notes", ROWS)
    assert other.hook.events == []  # nothing protected, names as the catalog says
    mover.filter.client(
        mover.client, m.message(m.QUERY, b"ALTER VIEW billing.customer_view RENAME TO x\0")
    )
    assert holder.unsure and holder.stale
    holder.reads_begun += 1  # the shell begins a read (before the rename is committed)
    other.query_silent("SELECT body FROM public.notes", ROWS)
    (_, event), *_ = other.hook.events
    assert event["analysis_complete"] is False and event["tables"] == []
    mover.filter.server(mover.server, complete(b"ALTER VIEW") + ready_for_query())
    holder.reads_done = holder.reads_begun  # that read is in: it may not show the rename
    assert holder.unsure
    holder.reads_begun += 1  # a read that began after the rename committed
    holder.reads_done = holder.reads_begun
    assert not holder.unsure
    other.hook.events.clear()
    other.query_silent("SELECT body FROM public.notes", ROWS)
    assert other.hook.events == []


def test_temporary_relations_move_no_names_of_the_catalog() -> None:
    holder = ContextHolder(context())
    s = Recorder(holder)
    s.query_silent("CREATE TEMP TABLE scratch (x int)", complete(b"CREATE TABLE"))
    s.query_silent("DROP TABLE scratch", complete(b"DROP TABLE"))
    s.query_silent("CREATE TEMP VIEW w AS SELECT 1", complete(b"CREATE VIEW"))
    assert not holder.unsure


def test_keys_returned_by_one_occurrence_of_a_table_read_twice_prove_nothing() -> None:
    s = Recorder()
    rows = (
        row_description(("i_customer", CUSTOMERS, 1, TEXT, 0), ("name", CUSTOMERS, 2, TEXT, 0))
        + data_row(b"1", b"x")
        + complete(b"SELECT 1")
    )
    self_join = "SELECT a.i_customer, b.name FROM billing.customers a, billing.customers b"
    event = s.query(self_join, rows)
    assert event["subjects"] == {CUSTOMERS_TABLE: ["1"]}  # (1 was read: its key is there)
    assert event["subjects_complete"] is False
    one = s.query("SELECT i_customer, name FROM billing.customers", rows)
    assert one["subjects_complete"] is True


def test_a_column_of_the_sessions_temporary_table_is_no_unknown_name() -> None:
    names = frozenset(c.name for r in CATALOG.relations.values() for c in r.columns)
    catalog = replace(CATALOG, column_names=names)
    s = Recorder(MaskingContext(parse_rules(RULES, "r", {"K": "k" * 32}), catalog))
    s.query_silent("CREATE TEMP TABLE scratch (foo int)", complete(b"CREATE TABLE"))
    s.query_silent("SELECT s.foo FROM scratch s", complete(b"SELECT 0"))
    assert s.hook.events == []
    # on a relation of the catalog the name is unknown: it may be a function created since
    event = s.query("SELECT n.foo FROM public.notes n", complete(b"SELECT 0"))
    assert event["analysis_complete"] is False


def test_an_unknown_name_asks_for_one_catalog_read_per_catalog() -> None:
    holder = ContextHolder(context())
    s = Recorder(holder)
    s.query("SELECT body FROM public.created_later", ROWS)
    assert holder.stale
    holder.stale = False  # the shell read the catalog: it does not have the name yet
    s.query("SELECT body FROM public.created_later", ROWS)
    assert not holder.stale
    holder.context = context()  # a new catalog, without it still
    s.query("SELECT body FROM public.created_later", ROWS)
    assert holder.stale


def moving_context() -> MaskingContext:
    """The catalog with billing.leak classified as code that may move names (rules.code)."""
    catalog = replace(CATALOG, moving_functions=frozenset({("billing", "leak")}))
    return MaskingContext(parse_rules(RULES, "r", {"K": "k" * 32}), catalog)


def test_only_code_that_may_move_names_makes_every_session_unsure() -> None:
    """A CALL (or any call) of code the catalog read classified as able to run DDL: every
    session is unsure until the catalog is read again. A procedure that only reads and
    writes rows, or a DO block that runs no DDL, leaves every session certain."""
    for sql in (
        "CALL billing.leak()",
        "SELECT billing.leak()",
        "DO $$ BEGIN EXECUTE 'ALTER TABLE public.notes RENAME TO gone'; END $$",
        "DO $$ BEGIN PERFORM billing.leak(); END $$",
    ):
        holder = ContextHolder(moving_context())
        Recorder(holder).query_silent(sql, complete(b"CALL"))
        assert holder.unsure and holder.stale, sql
    for sql in (
        "CALL billing.invoice_total(1)",
        "SELECT billing.invoice_total(1)",
        "DO $$ BEGIN INSERT INTO public.notes VALUES (1, 'x'); END $$",
    ):
        holder = ContextHolder(moving_context())
        Recorder(holder).query_silent(sql, complete(b"CALL"))
        assert not holder.unsure and not holder.stale, sql


def test_in_the_transaction_that_may_have_moved_names_a_catalog_read_settles_nothing() -> None:
    """A catalog read that begins after the CALL but before its transaction ends cannot
    see what the CALL did: that session's statements stay uncertain until it ends (other
    sessions' are certain again: the server shows them the names before the change)."""
    holder = ContextHolder(moving_context())
    mover, other = Recorder(holder), Recorder(holder)
    in_tx = ready_for_query(ord("T"))
    mover.filter.client(mover.client, m.message(m.QUERY, b"BEGIN\0"))
    mover.filter.server(mover.server, complete(b"BEGIN") + in_tx)
    mover.filter.client(mover.client, m.message(m.QUERY, b"CALL billing.leak()\0"))
    mover.filter.server(mover.server, complete(b"CALL") + in_tx)
    holder.reads_begun += 1  # a read begins (and ends) while the transaction is open
    holder.reads_done = holder.reads_begun
    assert not holder.unsure
    other.query_silent("SELECT body FROM public.notes", ROWS)
    assert other.hook.events == []
    mover.hook.events.clear()
    mover.filter.client(mover.client, m.message(m.QUERY, b"SELECT body FROM public.notes\0"))
    mover.filter.server(mover.server, ROWS + in_tx)
    (_, event), *_ = mover.hook.events
    assert event["analysis_complete"] is False


def test_a_temporary_relation_made_by_code_is_found_before_the_catalogs() -> None:
    """Code that may move names (here a DO block) may have created a temporary relation
    that the session's unqualified names find before the catalog's (the temporary schema
    comes first): once the catalog read has the names of the temporary schemas' relations,
    that session's reads of such a name are uncertain; a qualified name, or another
    session that ran no such code, are not."""
    holder = ContextHolder(moving_context())
    mover, other = Recorder(holder), Recorder(holder)
    mover.query_silent(
        "DO $$ BEGIN CREATE TEMP TABLE notes AS SELECT * FROM billing.customers; END $$",
        complete(b"DO"),
    )
    assert holder.unsure
    holder.reads_begun += 1  # a read that began after the DO ended
    holder.reads_done = holder.reads_begun
    holder.temp_names = frozenset({"notes"})
    assert not holder.unsure
    mover.hook.events.clear()
    event = mover.query("SELECT body FROM notes", ROWS)
    assert event["analysis_complete"] is False
    mover.query_silent("SELECT body FROM public.notes", ROWS)
    other.query_silent("SELECT body FROM notes", ROWS)
    assert other.hook.events == [] and len(mover.hook.events) == 1
