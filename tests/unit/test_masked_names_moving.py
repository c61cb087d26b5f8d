"""While a statement through pgveil may have made relation names denote something else (a
view replaced, a table renamed: `ContextHolder.names_moving`), a masked session's rewrite
from the catalog pgveil holds could read protected data unmasked: statements that name a
relation are refused (42501) until the catalog has been read again."""

from __future__ import annotations

import re

from proxy.session.engine import SendToClient, SendToServer, Session, SessionSettings
from proxy.wire import messages as m
from rules.context import ContextHolder, MaskingContext
from rules.loader import parse_rules
from tests.unit.rules.fixtures import CATALOG, RULES
from tests.unit.test_engine import LOGIN_OK, STARTUP
from tests.unit.test_statement_log import Hook

READ = "SELECT name FROM billing.customers WHERE i_customer = 1"


def masked() -> tuple[Session, ContextHolder]:
    holder = ContextHolder(MaskingContext(parse_rules(RULES, "r", {"K": "k" * 32}), CATALOG))
    s = Session(SessionSettings(classify=lambda: True))
    s.client_data(STARTUP.encode())
    s.upstream_connected()
    s.server_data(LOGIN_OK)
    s.login_classified(holder, None, Hook())
    return s, holder


def sent_for(s: Session, sql: str) -> bytes:
    actions = s.client_data(m.message(m.QUERY, sql.encode() + b"\0"))
    return b"".join(a.data for a in actions if isinstance(a, SendToServer))


def test_relations_are_not_read_until_the_catalog_is_read_again() -> None:
    s, holder = masked()
    holder.names_moving()  # another session's CREATE OR REPLACE VIEW went to the server
    sent = sent_for(s, READ)
    token = re.search(rb"pgveil_refusal_[0-9a-f]{16}", sent)
    assert token is not None and b"customers" not in sent
    error = m.error_response("42601", f'syntax error at or near "{token.group().decode()}"')
    out = s.server_data(error + m.ready_for_query())
    fields = m.decode_fields(b"".join(a.data for a in out if isinstance(a, SendToClient))[5:])
    assert fields["C"] == "42501" and "pgveil is reading the catalog again" in fields["M"]
    assert holder.stale
    # the catalog read that began after it is in: statements are rewritten again
    holder.reads_begun += 1
    holder.reads_done = holder.reads_begun
    assert not holder.unsure
    assert b"customers" in sent_for(s, READ)


def test_statements_that_name_no_relation_go_on() -> None:
    s, holder = masked()
    holder.names_moving()
    assert sent_for(s, "SELECT 1") == m.message(m.QUERY, b"SELECT 1\0")
