"""The masked filter's errors without sockets: the syntax probe, the wait for a catalog read
before a statement on an unknown name, positions moved to the client's text, and names and
key values in messages (tests/integration/test_masked_errors.py runs the same against the
real server)."""

from __future__ import annotations

import dataclasses

import pytest

from audit.redaction import redact
from proxy.session.filters import CLIENT_CAPTURE_MASKED, SERVER_CAPTURE_MASKED
from proxy.session.masked import (
    _PROBE_LENGTH,
    PARSED_ONLY_BY_SERVER,
    REFUSAL_TOKEN,
    MaskedFilter,
    _client_position,
    _Judge,
)
from proxy.session.statements import Cause, Source
from proxy.wire import messages as m
from proxy.wire.errors import decode_fields
from proxy.wire.extended import parse_message
from proxy.wire.framing import MessageScanner
from proxy.wire.simple import ready_for_query
from rules.context import ContextHolder, MaskingContext
from rules.loader import parse_rules
from tests.unit.rules.fixtures import CATALOG, RULES, rel

POLICY = parse_rules(RULES, "r", {"K": "k" * 32})
# a catalog that lists every relation (what tells that a name names nothing)
LISTED = dataclasses.replace(CATALOG, relation_names=frozenset(CATALOG.relations))


class Session:
    def __init__(self, catalog: object = LISTED, waits: bool = True) -> None:
        self.holder = ContextHolder(MaskingContext(POLICY, catalog))  # type: ignore[arg-type]
        self.filter = MaskedFilter(self.holder, "helpdesk")
        self.filter.waits = waits
        self.client = MessageScanner(CLIENT_CAPTURE_MASKED, [0] * 256, 1 << 20)
        self.server = MessageScanner(SERVER_CAPTURE_MASKED, [0] * 256, 1 << 30)

    def send(self, *messages: bytes) -> bytes:
        return self.filter.client(self.client, b"".join(messages))

    def resume(self) -> bytes:
        return self.filter.resume(self.client)

    def answer(self, *messages: bytes) -> list[dict[str, str]]:
        out = self.filter.server(self.server, b"".join(messages))
        scanner = MessageScanner(SERVER_CAPTURE_MASKED, [0] * 256, 1 << 30)
        return [
            decode_fields(body)
            for typ, body in scanner.feed(out)
            if typ in (m.ERROR_RESPONSE, m.NOTICE_RESPONSE)
        ]


def query(sql: str) -> bytes:
    return m.message(m.QUERY, sql.encode() + b"\0")


def parse(sql: str, name: str = "") -> bytes:
    return m.message(m.PARSE, name.encode() + b"\0" + sql.encode() + b"\0\0\0")


def texts(out: bytes) -> list[str]:
    """The texts of the Queries and Parses in `out`."""
    scanner = MessageScanner(CLIENT_CAPTURE_MASKED, [0] * 256, 1 << 20)
    found = []
    for typ, body in scanner.feed(out):
        if typ == m.QUERY:
            found.append(body[:-1].decode())
        elif typ == m.PARSE:
            found.append(parse_message(body)[1].decode())
    return found


def error(code: str, message: str, position: int | None = None, **more: str) -> bytes:
    fields = {"S": "ERROR", "V": "ERROR", "C": code, "M": message, **more}
    if position is not None:
        fields["P"] = str(position)
    body = b"".join(k.encode() + v.encode() + b"\0" for k, v in fields.items()) + b"\0"
    return m.message(m.ERROR_RESPONSE, body)


READY = ready_for_query()
SYNC = m.message(m.SYNC)


# ---- the syntax probe ------------------------------------------------------------------------


def test_a_syntax_error_is_probed_and_the_servers_error_comes_back() -> None:
    s = Session()
    [sent] = texts(s.send(query("select 1 from t where x = Zebulon Quixotehart")))
    assert sent.startswith(f"SELECT {REFUSAL_TOKEN}") and sent.endswith(
        ";select 1 from t where x = Zebulon Quixotehart"
    )
    assert len(sent) - len("select 1 from t where x = Zebulon Quixotehart") == _PROBE_LENGTH
    [got] = s.answer(
        error("42601", 'syntax error at or near "Quixotehart"', _PROBE_LENGTH + 35), READY
    )
    assert got["C"] == "42601" and got["P"] == "35"
    assert got["M"] == 'syntax error at or near "Quixotehart"'
    assert s.filter.counters.refused == 1


def test_a_token_not_at_the_position_is_masked() -> None:
    """Only the client's own text at the error's position is quoted back as it is."""
    s = Session()
    s.send(query("SELEC 1"))
    [got] = s.answer(error("42601", 'syntax error at or near "Zebulon"', _PROBE_LENGTH + 1), READY)
    assert got["M"] == 'syntax error at or near "Z*****n"'


def test_the_server_parsing_a_probed_query_whole_is_pgveils_refusal() -> None:
    s = Session()
    [sent] = texts(s.send(query("CREATE TEMP TABLE pv (system_user int)")))
    nonce_column = sent[len("SELECT ") : sent.index(";")]
    [got] = s.answer(error("42703", f'column "{nonce_column}" does not exist', 8), READY)
    assert got["C"] == "42501" and got["M"] == f"pgveil: {PARSED_ONLY_BY_SERVER}"


def test_the_server_parsing_a_probed_parse_whole_is_pgveils_refusal() -> None:
    s = Session()
    [sent] = texts(s.send(parse("CREATE TEMP TABLE pv (system_user int)", "s1"), SYNC))
    assert sent.startswith(f"SELECT {REFUSAL_TOKEN}")
    [got] = s.answer(
        error("42601", "cannot insert multiple commands into a prepared statement"),
        READY,
    )
    assert got["C"] == "42501" and got["M"] == f"pgveil: {PARSED_ONLY_BY_SERVER}"


def test_the_same_message_for_a_statement_not_probed_is_the_servers() -> None:
    s = Session()
    s.send(parse("SELECT 1; SELECT 2"), SYNC)
    [got] = s.answer(
        error("42601", "cannot insert multiple commands into a prepared statement"), READY
    )
    assert got["C"] == "42601"


# ---- waiting for a catalog read --------------------------------------------------------------


def test_a_statement_on_an_unknown_relation_waits_with_what_follows() -> None:
    s = Session()
    assert s.send(query("SELECT 1"), query("SELECT * FROM billing.late"), query("SELECT 2")) == (
        query("SELECT 1")
    )
    assert s.filter.take_wait() == 1 and s.filter.take_wait() is None
    assert s.filter.holding and s.holder.stale
    assert s.send(query("SELECT 3")) == b""  # kept, in order
    # the read is in: the relation was created meanwhile, and is read as the rules say
    relations = {**LISTED.relations, ("billing", "late"): rel(200, "billing", "late", [])}
    s.holder.context = MaskingContext(
        POLICY,
        dataclasses.replace(
            LISTED,
            relations=relations,
            relation_names=frozenset(relations),
            by_oid={},
        ),
    )
    s.holder.reads_done = 1
    assert texts(s.resume()) == ["SELECT * FROM billing.late", "SELECT 2", "SELECT 3"]
    assert not s.filter.holding and s.filter.awaiting is None


def test_a_name_the_fresh_read_lacks_gets_the_servers_error() -> None:
    s = Session()
    s.send(query("SELECT * FROM billing.custmers"))
    s.holder.reads_done = s.filter.take_wait() or 0
    [sent] = texts(s.resume())
    assert sent.startswith(REFUSAL_TOKEN)
    [got] = s.answer(error("42601", f'syntax error at or near "{sent}"', 1), READY)
    assert (got["C"], got["M"], got["P"]) == (
        "42P01",
        'relation "billing.custmers" does not exist',
        "15",
    )


def test_a_wait_that_ends_without_a_read_refuses_as_before_and_does_not_wait_again() -> None:
    s = Session()
    s.send(query("SELECT * FROM billing.custmers"), query("SELECT 1"))
    assert s.filter.take_wait() == 1
    sent = texts(s.resume())  # (reads_done is still 0: the time is up)
    assert sent[0].startswith(REFUSAL_TOKEN) and sent[1:] == ["SELECT 1"]
    assert s.filter.take_wait() is None and s.filter.awaiting is None
    [got] = s.answer(error("42601", f'syntax error at or near "{sent[0]}"', 1), READY)
    assert got["M"] == (
        "pgveil: relation billing.custmers is not known to pgveil yet; try again shortly"
    )


def test_each_waiting_statement_waits_for_a_read_of_its_own() -> None:
    s = Session()
    s.send(query("SELECT * FROM n1"), query("SELECT * FROM n2"))
    s.holder.reads_done = s.filter.take_wait() or 0
    assert len(texts(s.resume())) == 1
    assert s.filter.take_wait() is not None  # n2 arrived before the read began, maybe
    s.holder.reads_begun = s.holder.reads_done = 5
    assert len(texts(s.resume())) == 1


def test_without_a_shell_that_waits_the_refusal_is_immediate() -> None:
    s = Session(waits=False)
    [sent] = texts(s.send(query("SELECT * FROM billing.custmers")))
    assert sent.startswith(REFUSAL_TOKEN) and s.filter.take_wait() is None


# ---- positions -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("position", "sent", "sql", "expected"),
    [
        ("5", None, "SELECT 1", "5"),  # sent as it is
        ("8", "SELECT x FROM (SELECT 1) AS t", "SELECT x FROM t", "8"),  # the same beginning
        ("31", "SELECT * FROM (SELECT 1) AS t WHERE z", "SELECT * FROM t WHERE z", "17"),  # end
        ("16", "SELECT * FROM (SELECT 1) AS t WHERE z", "SELECT * FROM t WHERE z", None),
        ("99", "SELECT 1", "SELECT 1", None),  # beyond the text
        ("0", "SELECT 2", "SELECT 1", None),
        ("x", "SELECT 2", "SELECT 1", None),
    ],
)
def test_positions_of_rewritten_statements(
    position: str, sent: str | None, sql: str, expected: str | None
) -> None:
    assert _client_position(position, Source(sql, sent)) == expected


def test_positions_of_probes() -> None:
    source = Source("SELEC 1", probe="0" * 16)
    assert _client_position(str(_PROBE_LENGTH + 1), source) == "1"
    assert _client_position(str(_PROBE_LENGTH), source) is None


# ---- names and key values --------------------------------------------------------------------


def judge(sql: str = "SELECT 1") -> _Judge:
    return _Judge(MaskingContext(POLICY, CATALOG), Cause(Source(sql)))


@pytest.mark.parametrize(
    "text",
    [
        'duplicate key value violates unique constraint "Zebulon Quixotehart"',
        'Perhaps you meant to reference the column "pg_class.relname" or the column '
        '"pg_class.relam".',
        'null value in column "b" of relation "t" violates not-null constraint',
        'update or delete on table "a" violates foreign key constraint "f" on table "b"',
        'currval of sequence "xdrs_i_xdr_seq" is not yet defined in this session',
        'nextval: reached maximum value of sequence "s" (2147483647)',
    ],
)
def test_names_in_the_servers_formats_are_shown(text: str) -> None:
    assert judge().scrub(text) == text


@pytest.mark.parametrize(
    "text",
    [
        # anything else around the names: not the server's format, judged quote by quote
        'duplicate key value violates unique constraint "Zebulon Quixotehart" (x)',
        'x duplicate key value violates unique constraint "Zebulon Quixotehart"',
        'duplicate key value violates unique constraint "Zebulon Quixotehart"\n',
        'duplicate key value violates unique constraint "Zebulon" "Quixotehart"',
    ],
)
def test_other_text_in_a_names_format_is_judged(text: str) -> None:
    assert "Zebulon" not in judge().scrub(text)


@pytest.mark.parametrize(
    ("sql", "detail", "expected"),
    [
        # the values are masked, even where the statement spelled them out: the new row's
        # key may equal a stored one
        (
            "INSERT INTO t VALUES ('ann@x.org')",
            "Key (email)=(ann@x.org) already exists.",
            "Key (email)=(a*******g) already exists.",
        ),
        (
            "DELETE FROM t WHERE email = 'ann@x.org'",
            'Key (email)=(ann@x.org) is still referenced from table "r".',
            'Key (email)=(a*******g) is still referenced from table "r".',
        ),
        (
            "CREATE UNIQUE INDEX ON t (email)",
            "Key (email)=(ann@x.org) is duplicated.",
            "Key (email)=(a*******g) is duplicated.",
        ),
        (
            "INSERT INTO c VALUES (70)",
            'Key (k)=(70) is not present in table "p".',
            'Key (k)=(**) is not present in table "p".',
        ),
        (
            "INSERT INTO t VALUES (1)",
            "Key (lower(email), k)=(ann@x.org, 1) already exists.",
            "Key (lower(email), k)=(a**********1) already exists.",
        ),
        # a value made to look like the end of the columns stays with the values
        (
            "INSERT INTO t SELECT v FROM u",
            "Key (email)=(a)=(secret) already exists.",
            "Key (email)=(a********t) already exists.",
        ),
        (
            "INSERT INTO p VALUES (50)",
            "Partition key of the failing row contains (a) = (50).",
            "Partition key of the failing row contains (a) = (**).",
        ),
        ("INSERT INTO t VALUES (1)", 'Key is not present in table "p".', None),
    ],
)
def test_key_details(sql: str, detail: str, expected: str | None) -> None:
    assert judge(sql).detail(detail) == (detail if expected is None else expected)


@pytest.mark.parametrize(
    "detail",
    [
        "Failing row contains (1, Zebulon Quixotehart).",
        "Key (r)=(1) conflicts with existing key (r)=(1).",
        'Token "Zebulon" is invalid.',
    ],
)
def test_other_details_are_withheld(detail: str) -> None:
    assert judge().detail(detail) is None


# ---- the audit of a text that does not parse -------------------------------------------------


def test_the_audit_of_a_text_that_does_not_parse_shows_reserved_words_only() -> None:
    sql = "select name, x from customers where email = john smith and zone = 'z' limit 1 $1"
    assert redact(sql, names=False) == ("select ? , ? from ? where ? = ? ? and ? = ? limit ? $1")
    d = MaskingContext(POLICY, CATALOG).analyze("select * from customers where a = Ann Smith")
    assert d.action == "refuse" and d.syntax
    assert d.redacted == "select * from ? where ? = ? ?"
