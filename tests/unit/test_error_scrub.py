"""Error scrubbing without sockets: which statement each ErrorResponse and NoticeResponse
belongs to (the statement log's pairing, fed as the engine feeds a masked session), and which
quoted values of it are kept (the values and names that statement spelled out, its parameter
values, the catalog's names)."""

from __future__ import annotations

import struct

from proxy.session.filters import CLIENT_CAPTURE_MASKED, SERVER_CAPTURE_MASKED
from proxy.session.masked import MaskedFilter, _Judge
from proxy.session.statements import Cause, Source
from proxy.wire import messages as m
from proxy.wire.errors import decode_fields, error_response, notice_response
from proxy.wire.framing import MessageScanner
from proxy.wire.simple import ready_for_query
from rules.catalog import Catalog
from rules.context import MaskingContext
from rules.literals import statement_words
from rules.loader import parse_rules
from tests.unit.rules.fixtures import CATALOG, RULES, rel

ECHO = 'invalid input syntax for type integer: "{}"'
TEXT, INT4 = 25, 23


class Session:
    """A masked filter with the engine's scanners; `send` returns the primary messages of
    the errors and notices the client gets for the server's answer."""

    def __init__(self) -> None:
        ctx = MaskingContext(parse_rules(RULES, "r", {"K": "k" * 32}), CATALOG)
        self.filter = MaskedFilter(ctx, "helpdesk")
        self.client = MessageScanner(CLIENT_CAPTURE_MASKED, [0] * 256, 1 << 20)
        self.server = MessageScanner(SERVER_CAPTURE_MASKED, [0] * 256, 1 << 30)

    def send(self, *messages: bytes) -> None:
        self.filter.client(self.client, b"".join(messages))

    def answer(self, *messages: bytes) -> list[str]:
        out = self.filter.server(self.server, b"".join(messages))
        scanner = MessageScanner(SERVER_CAPTURE_MASKED, [0] * 256, 1 << 30)
        return [
            decode_fields(body)["M"]
            for typ, body in scanner.feed(out)
            if typ in (m.ERROR_RESPONSE, m.NOTICE_RESPONSE)
        ]


# ---- frontend messages ------------------------------------------------------------------------


def query(sql: str) -> bytes:
    return m.message(m.QUERY, sql.encode() + b"\0")


def parse(sql: str, name: str = "", types: tuple[int, ...] = ()) -> bytes:
    body = name.encode() + b"\0" + sql.encode() + b"\0"
    return m.message(m.PARSE, body + struct.pack(f"!h{len(types)}I", len(types), *types))


def bind(
    params: tuple[bytes | None, ...] = (), stmt: str = "", portal: str = "", binary: bool = False
) -> bytes:
    body = portal.encode() + b"\0" + stmt.encode() + b"\0"
    body += struct.pack("!hh", 1, 1) if binary else struct.pack("!h", 0)
    body += struct.pack("!h", len(params))
    for p in params:
        body += struct.pack("!i", -1) if p is None else struct.pack("!i", len(p)) + p
    return m.message(m.BIND, body + struct.pack("!h", 0))


def execute(portal: str = "") -> bytes:
    return m.message(m.EXECUTE, portal.encode() + b"\0" + struct.pack("!i", 0))


def describe(kind: str, name: str = "") -> bytes:
    return m.message(m.DESCRIBE, kind.encode() + name.encode() + b"\0")


def close(kind: str, name: str) -> bytes:
    return m.message(m.CLOSE, kind.encode() + name.encode() + b"\0")


SYNC = m.message(m.SYNC)
COPY_DONE = m.message(m.COPY_DONE)


# ---- backend messages -------------------------------------------------------------------------


def complete(tag: str = "SELECT 1") -> bytes:
    return m.message(m.COMMAND_COMPLETE, tag.encode() + b"\0")


def error(text: str, code: str = "22P02") -> bytes:
    return error_response(code, text)


def notice(text: str) -> bytes:
    return notice_response("00000", text)


def parameter_description(*types: int) -> bytes:
    return m.message(m.PARAMETER_DESCRIPTION, struct.pack(f"!h{len(types)}I", len(types), *types))


READY = ready_for_query()
PARSE_COMPLETE = m.message(m.PARSE_COMPLETE)
BIND_COMPLETE = m.message(m.BIND_COMPLETE)
CLOSE_COMPLETE = m.message(m.CLOSE_COMPLETE)
NO_DATA = m.message(m.NO_DATA)
COPY_IN = m.message(m.COPY_IN_RESPONSE, b"\0\0\0")


def echo(value: str) -> bytes:
    return error(ECHO.format(value))


def shown(value: str) -> str:
    return ECHO.format(value)


# ---- pairing: the simple protocol -------------------------------------------------------------


def test_a_query_s_errors_and_notices_belong_to_the_statement_the_server_is_at() -> None:
    s = Session()
    s.send(query("SELECT 'one' AS a; SELECT 'two' AS b; SELECT 'three' AS c"))
    got = s.answer(
        notice('first "one" "two"'),  # during the first statement
        complete(),
        notice('second "one" "two"'),  # during the second
        complete(),
        echo("three"),  # the third fails
        READY,
    )
    assert got == ['first "one" "t*o"', 'second "o*e" "two"', shown("three")]


def test_the_guess_in_another_statement_or_a_comment_is_not_kept() -> None:
    s = Session()
    s.send(query("SELECT 'likes invoices' AS guess; SELECT 1 /* likes invoices */"))
    assert s.answer(complete(), echo("likes invoices"), READY) == [shown("l************s")]
    # and in the statement after the one that fails (never run)
    s.send(query("SELECT 1; SELECT 'likes invoices'"))
    assert s.answer(echo("likes invoices"), READY) == [shown("l************s")]


def test_an_empty_statement_is_no_statement() -> None:
    """The server sends one CommandComplete per statement it parsed: `;;` is none."""
    s = Session()
    s.send(query("SELECT 'a1' AS a;; ; SELECT 'b2' AS b"))
    assert s.answer(complete(), echo("b2"), READY) == [shown("b2")]


def test_an_asynchronous_notice_gets_no_statement() -> None:
    s = Session()
    s.send(query("SELECT 'abc' AS a"))
    assert s.answer(complete(), READY) == []
    # nothing in flight: a notice of the server's own (or one that arrives late)
    assert s.answer(notice('shutting down "abc"')) == ['shutting down "a*c"']


def test_copy_from_stdin_errors_belong_to_the_copy_statement() -> None:
    s = Session()
    s.send(query("SELECT 'abc' AS a; COPY t FROM STDIN WITH (NULL 'nix')"))
    assert s.answer(complete(), COPY_IN) == []
    # the data the client sends is not a statement's: its values are masked
    s.send(m.message(m.COPY_DATA, b"xyz\n"), COPY_DONE)
    assert s.answer(echo("xyz"), READY) == [shown("x*z")]
    s.send(query("SELECT 'abc' AS a; COPY t FROM STDIN WITH (NULL 'nix')"))
    got = s.answer(complete(), COPY_IN, error('null "nix" or "abc"', "22000"), READY)
    assert got == ['null "nix" or "a*c"']


# ---- pairing: the extended protocol -----------------------------------------------------------


def test_parse_errors_belong_to_the_parse() -> None:
    s = Session()
    s.send(parse("SELECT 'abc'::int"), bind(), execute(), parse("SELECT 'xyz'"), SYNC)
    assert s.answer(echo("abc"), READY) == [shown("abc")]
    s.send(parse("SELECT 'abc'"), parse("SELECT 'xyz'::int"), SYNC)
    assert s.answer(PARSE_COMPLETE, echo("abc"), READY) == [shown("a*c")]


def test_bind_and_execute_errors_belong_to_the_portal_s_statement_and_parameters() -> None:
    s = Session()
    s.send(parse("SELECT $1::text || 'lit'", name="s"), SYNC)
    assert s.answer(PARSE_COMPLETE, READY) == []
    s.send(bind((b"abc",), stmt="s", portal="a"), bind((b"xyz",), stmt="s", portal="b"))
    s.send(execute("b"), execute("a"), SYNC)
    got = s.answer(BIND_COMPLETE, BIND_COMPLETE, echo("abc"), READY)
    assert got == [shown("a*c")]  # Execute of "b" failed: its value is xyz
    s.send(bind((b"abc",), stmt="s", portal="a"), bind((b"xyz",), stmt="s", portal="b"))
    s.send(execute("a"), SYNC)
    assert s.answer(BIND_COMPLETE, BIND_COMPLETE, echo("abc"), READY) == [shown("abc")]
    # a Bind's own error: its parameters and its statement's literals
    s.send(bind((b"abc",), stmt="s"), execute(), SYNC)
    assert s.answer(error('"abc" and "lit" and "xyz"'), READY) == ['"abc" and "lit" and "x*z"']


def test_an_error_skips_to_sync_and_the_next_request_pairs_anew() -> None:
    s = Session()
    s.send(parse("SELECT 1"), bind(), execute(), parse("SELECT 'abc'"), bind(), execute())
    s.send(SYNC, parse("SELECT 'abc'::int"), bind(), execute(), SYNC)
    assert s.answer(PARSE_COMPLETE, BIND_COMPLETE, echo("abc"), READY) == [shown("a*c")]
    assert s.answer(PARSE_COMPLETE, BIND_COMPLETE, echo("abc"), READY) == [shown("abc")]


def test_a_sync_s_commit_is_no_statement() -> None:
    s = Session()
    s.send(parse("SELECT 'abc'"), bind(), execute(), SYNC)
    got = s.answer(PARSE_COMPLETE, BIND_COMPLETE, complete(), error('deferred "abc"', "23503"))
    assert got == ['deferred "a*c"'] and s.answer(READY) == []


def test_failed_parse_leaves_the_statement_name_as_it_was() -> None:
    s = Session()
    s.send(parse("SELECT 'first' || $1", name="s"), SYNC)
    assert s.answer(PARSE_COMPLETE, READY) == []
    # the Close and the new Parse are skipped after the error: "s" is still the first
    s.send(parse("SELECT bad"), close("S", "s"), parse("SELECT 'second' || $1", name="s"), SYNC)
    assert s.answer(error('column "bad" does not exist', "42703"), READY) == [
        'column "bad" does not exist'
    ]
    s.send(bind((b"p",), stmt="s"), execute(), SYNC)
    got = s.answer(BIND_COMPLETE, error('"first" "second"'), READY)
    assert got == ['"first" "s****d"']


def test_copy_from_stdin_in_the_extended_protocol() -> None:
    """libpq sends a Sync right after the Execute; the server ignores it during COPY."""
    s = Session()
    s.send(parse("COPY t FROM STDIN WITH (NULL 'nix')"), bind(), execute(), SYNC)
    assert s.answer(PARSE_COMPLETE, BIND_COMPLETE, COPY_IN) == []
    s.send(m.message(m.COPY_DATA, b"x\n"), COPY_DONE, SYNC)
    assert s.answer(error('"nix" "abc"', "22000"), READY) == ['"nix" "a*c"']


def test_binary_parameters_read_by_the_statement_s_types() -> None:
    s = Session()
    # declared in the Parse
    s.send(parse("SELECT $1, $2, $3", types=(TEXT, INT4, 0)))
    s.send(bind((b"abc", struct.pack("!i", 42), b"xyz"), binary=True), execute(), SYNC)
    got = s.answer(PARSE_COMPLETE, error('"abc" "42" "xyz"'), READY)
    assert got == ['"abc" "42" "x*z"']  # the third's type was left to the server
    # resolved by the server: a Describe's ParameterDescription
    s.send(parse("SELECT $1, $2", name="d"), describe("S", "d"), SYNC)
    answer = (PARSE_COMPLETE, parameter_description(TEXT, INT4), NO_DATA, READY)
    assert s.answer(*answer) == []
    s.send(bind((b"abc", struct.pack("!i", 7)), stmt="d", binary=True), execute(), SYNC)
    assert s.answer(error('"abc" "7"'), READY) == ['"abc" "7"']
    # the unnamed statement described, then parsed again to run it (asyncpg): same types
    s.send(parse("SELECT $1::text::int"), describe("S"), SYNC)
    assert s.answer(PARSE_COMPLETE, parameter_description(TEXT), NO_DATA, READY) == []
    s.send(parse("SELECT $1::text::int"), bind((b"abc",), binary=True), execute(), SYNC)
    assert s.answer(PARSE_COMPLETE, echo("abc"), READY) == [shown("abc")]
    # another text parsed under that name: its types are its own (unknown)
    s.send(parse("SELECT $1::text::int + 0"), bind((b"abc",), binary=True), execute(), SYNC)
    assert s.answer(PARSE_COMPLETE, echo("abc"), READY) == [shown("a*c")]


def test_text_parameters_null_and_undecodable() -> None:
    s = Session()
    s.send(parse("SELECT $1, $2, $3"), bind((b"abc", None, b"\xff\xfe")), execute(), SYNC)
    got = s.answer(PARSE_COMPLETE, BIND_COMPLETE, error('"abc" "" "\ufffd"'), READY)
    assert got == ['"abc" "" "*"']
    # the same error at the Parse (before ParseComplete): no parameters yet
    s.send(parse("SELECT $1, $2, $3"), bind((b"abc", None, b"\xff\xfe")), execute(), SYNC)
    assert s.answer(error('"abc"'), READY) == ['"a*c"']


# ---- the judgement ----------------------------------------------------------------------------


CONTEXT = MaskingContext(parse_rules(RULES, "r", {"K": "k" * 32}), CATALOG)


def judge(sql: str, text: str, index: int = 0, sent: str | None = None) -> str:
    return _Judge(CONTEXT, Cause(Source(sql, sent), index)).scrub(text)


def test_literal_values_as_the_server_reads_them_whole() -> None:
    sql = (
        "SELECT 'it''s', E'a\\tb', U&'d\\0061t', U&'d!0061x' UESCAPE '!', $q$dollar$q$, "
        "'adj'\n'oined', 1.50, -3, 12345678901"
    )
    for value in ("it's", "a\tb", "dat", "dax", "dollar", "adjoined", "1.50", "-3", "12345678901"):
        assert judge(sql, f'"{value}"') == f'"{value}"', value
    # not whole: masked
    for value in ("it", "at", "1.5", "3", "adj", "dat dax", "E'a\\tb'", "$q$dollar$q$"):
        assert judge(sql, f'"{value}"') != f'"{value}"', value


def test_names_of_the_statement_and_the_catalog_and_qualified_names_of_them() -> None:
    sql = 'SELECT c.nosuch, "Quoted", Folded, "9" FROM billing.customers c WHERE c.x = \'198\''
    kept = ("nosuch", "Quoted", "folded", "c.nosuch", "c.x", "c.name", "9.name", "name", "balance")
    kept += ("billing.customers", "customers.email", "billing.accounts.ip", "accounts.ip")
    for value in kept:
        assert judge(sql, f'"{value}"') == f'"{value}"', value
    masked = ("Folded", "quoted", "198.51", "d.name", "billing.", "name.customers", "x.d")
    masked += ("billing.customers.zzz", "accounts.email", "accounts.name", "name.name")
    for value in masked:
        assert judge(sql, f'"{value}"') != f'"{value}"', value
    # no statement: the catalog's names only
    assert _Judge(CONTEXT, None).scrub('"name" "nosuch"') == '"name" "n****h"'


def test_comments_are_no_statement_s_words() -> None:
    assert judge("SELECT 1 /* Zebulon */ -- Quixote", '"Zebulon" "Quixote"') == (
        '"Z*****n" "Q*****e"'
    )


def test_a_rewrite_that_does_not_pair_one_to_one_keeps_nothing() -> None:
    sql = "SELECT 'abc' AS a; SELECT 'xyz' AS b"
    assert judge(sql, '"xyz"', index=1, sent=sql) == '"xyz"'
    assert judge(sql, '"xyz"', index=1, sent="SELECT 'abc' AS a") == '"x*z"'
    assert judge(sql, '"xyz"', index=2) == '"x*z"'  # no such statement
    assert judge("SELECT (", '"("') == '"*"'  # the text does not parse


def test_the_trailing_value_is_judged_whole() -> None:
    sql = "SELECT 'a \"b\" c'::int"
    assert judge(sql, ECHO.format('a "b" c')) == ECHO.format('a "b" c')
    assert judge("SELECT 'b'", ECHO.format('a "b" c')) == ECHO.format("a*****c")


def test_hints_are_judged_like_messages() -> None:
    s = Session()
    s.send(query("SELECT 'abc' AS a"))
    err = error_response("42883", 'no "abc"', hint='try "abc" or "xyz"')
    out = s.filter.server(s.server, err + READY)
    fields = decode_fields(out[5 : out.index(b"Z")])
    assert fields["M"] == 'no "abc"' and fields["H"] == 'try "abc" or "x*z"'


def test_statement_words_of_several_statements() -> None:
    words = statement_words("SELECT 'a' AS x; ; EXECUTE p('b')")
    assert [sorted(w.values) for w in words] == [["a"], ["b"]]
    assert [sorted(w.names) for w in words] == [["x"], ["p"]]


class Hook:
    subjects_limit = 100

    def __init__(self) -> None:
        self.events: list[tuple[str, dict[str, object]]] = []

    def ready(self) -> bool:
        return True

    def record(self, event_type: str, fields: dict[str, object]) -> bool:
        self.events.append((event_type, fields))
        return True


def test_an_audited_masked_session_pairs_with_the_same_log() -> None:
    """Auditing attaches to the log the session pairs its errors with: statements already
    in flight stay paired, and completed statements become events."""
    s = Session()
    log = s.filter.statements
    s.send(query("SELECT 'abc' AS a"))
    hook = Hook()
    s.filter.attach_audit(hook)
    assert s.filter.statements is log
    assert s.answer(echo("abc"), READY) == [shown("abc")]
    s.send(query("SELECT name FROM billing.customers WHERE name = 'xyz'"))
    assert s.answer(echo("xyz"), READY) == [shown("xyz")]
    assert [e["outcome"] for _t, e in hook.events] == ["22P02"]


def test_dotted_runs_of_catalog_names_are_no_qualified_name() -> None:
    """A role that may create tables must not make every IPv4 address an error echoes
    readable by naming tables `0` ... `255`: only real catalog paths count."""
    octets = {
        ("public", str(i)): rel(900 + i, "public", str(i), [(str(i), "int4", "integer")])
        for i in (51, 173, 198, 222)
    }
    catalog = Catalog(relations={**CATALOG.relations, **octets})
    ctx = MaskingContext(parse_rules(RULES, "r", {"K": "k" * 32}), catalog)
    cause = Cause(Source("SELECT ip FROM billing.accounts"))
    for value in ("198.51.173.222", "198.51", "198.51.173"):
        assert _Judge(ctx, cause).scrub(f'"{value}"') != f'"{value}"', value
    # the real paths among them still read
    for value in ("198", "public.198", "198.198", "public.198.198"):
        assert _Judge(ctx, cause).scrub(f'"{value}"') == f'"{value}"', value


def test_a_stray_quote_masks_everything_after_it() -> None:
    # a quote inside a value the server printed would shift every pair after it: the
    # client's own E'\'' must not turn pgveil's quoted hex into text "outside quotes"
    sql = "SELECT E'\\'' AS q, 'x'"
    text = "parse: SELECT E'\\'' AS q, '5c5c5c5c' AS a, 'x'"
    got = judge(sql, text)
    assert "5c5c5c5c" not in got and got.startswith("parse: SELECT E")
    assert judge("SELECT 1", 'column "name" of "customers"') == 'column "name" of "customers"'
