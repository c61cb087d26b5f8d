"""A schema with `deny` columns of several types, rules for it, and a pgveil (with an audit
file) in front of it: for the tests of deny columns read as NULL and of system columns.

The deny columns hold canaries; `denied_leaks` finds any of them (or a common encoding of
one) in what a client received. `dn.users.passcode` has a unique index (writes could confirm a
guess), `dn.sessions` shares column names with `dn.users` (USING, NATURAL JOIN), a view reads
the deny column (its mask is derived), and `dn.events` is partitioned (`tableoid`).
"""

from __future__ import annotations

import base64
import hashlib
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from proxy.demo.embedded_pg import EmbeddedPostgres
from tests.integration.attack_clients import Clients
from tests.integration.masking_fixture import ADMIN, HASH_KEY, HELPDESK
from tests.support import ProxyProcess

SECRET = "S3cr3t-Canary-Value-77"  # dn.users.passcode of user 1
SECRET2 = "Aardvark-Other-Passkey-5"  # of user 2 (sorts before SECRET)
PIN = 73914482  # dn.users.pin of user 1 (int4)
IP = "203.0.113.77"  # dn.users.ip of user 1 (inet)
DOC = "DocCanary99xq"  # in dn.users.doc of user 1 (jsonb)
TOKEN = "6f1d2c3b-4a59-4e68-9d7c-0b1a2c3d4e5f"  # dn.sessions.token (uuid)
CANARIES = (SECRET, SECRET2, str(PIN), IP, DOC, TOKEN)

SCHEMA = f"""
DROP SCHEMA IF EXISTS dn CASCADE;
CREATE SCHEMA dn;
CREATE TABLE dn.users (
    id int PRIMARY KEY,
    login text,
    passcode text UNIQUE,
    pin int,
    ip inet,
    doc jsonb,
    note text
);
CREATE TABLE dn.sessions (id int PRIMARY KEY, user_id int, passcode text, token uuid);
CREATE VIEW dn.user_view AS SELECT id, login, passcode FROM dn.users;
CREATE TABLE dn.events (id int, payload text, at int) PARTITION BY RANGE (at);
CREATE TABLE dn.events_1 PARTITION OF dn.events FOR VALUES FROM (0) TO (100);
CREATE TABLE dn.events_2 PARTITION OF dn.events FOR VALUES FROM (100) TO (200);
CREATE TABLE dn.wb (id int PRIMARY KEY, gone text, passcode text);
INSERT INTO dn.users VALUES
  (1, 'first.user', '{SECRET}', {PIN}, '{IP}', '{{"k": "{DOC}"}}', 'note one'),
  (2, 'second.user', '{SECRET2}', 1234, '198.51.100.9', '{{"k": "other"}}', 'note two');
INSERT INTO dn.sessions VALUES (1, 1, '{SECRET}', '{TOKEN}'), (2, 2, 'session-two', NULL);
INSERT INTO dn.events VALUES (1, '{SECRET}', 5), (2, 'second payload', 150);
GRANT USAGE ON SCHEMA dn TO {HELPDESK}, {ADMIN};
GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA dn TO {HELPDESK}, {ADMIN};
"""

RULES = f"""
roles:
  unmasked: [{ADMIN}]
  masked: [{HELPDESK}]
  default: unmasked
tables:
  dn.users:
    subject: id
    columns:
      login: partial
      passcode: deny
      pin: deny
      ip: deny
      doc: deny
  dn.sessions:
    columns:
      passcode: deny
      token: deny
  dn.events:
    columns:
      payload: deny
  dn.wb:
    columns:
      passcode: deny
"""


# a right and a wrong guess of a deny value (dn.users.passcode of user 1), for oracle cases:
# `{g}` in a case stands for the guess
RIGHT, WRONG = f"'{SECRET}'", "'S3cr3t-Wrong-Guess-00'"


def with_guess(sql: Any, guess: str) -> Any:
    """A case (one statement or a tuple of them) with `{g}` replaced by `guess`."""
    if isinstance(sql, tuple):
        return tuple(s.replace("{g}", guess) for s in sql)
    return str(sql).replace("{g}", guess)


def answer(text: str) -> str:
    """What must be the same for a right and a wrong guess: everything but the guess."""
    return text.replace(RIGHT.strip("'"), "<g>").replace(WRONG.strip("'"), "<g>")


def denied_leaks(text: str) -> list[str]:
    """Every canary of a deny column (or a transform of it) found in `text`."""
    found = []
    for value in CANARIES:
        forms = {value, value.upper(), value.lower(), value[::-1]}
        raw = value.encode()
        forms |= {raw.hex(), base64.b64encode(raw).decode(), hashlib.md5(raw).hexdigest()}
        forms |= {hashlib.sha256(raw).hexdigest()}
        if any(f in text or f.upper() in text for f in forms):
            found.append(value)
    return found


def assert_guesses_differ_directly(clients: Clients, sql: Any) -> None:
    """An oracle case: sent to the server directly, a right and a wrong guess of a deny
    value get different answers (so the case can tell them apart)."""
    right = clients.run("direct", with_guess(sql, RIGHT))
    wrong = clients.run("direct", with_guess(sql, WRONG))
    assert answer(right) != answer(wrong), right


def assert_guesses_alike(clients: Clients, client: str, sql: Any) -> None:
    """An oracle case through pgveil: a right and a wrong guess get the same answer, and
    no deny value shows (the guess itself aside)."""
    right = clients.run(client, with_guess(sql, RIGHT))
    wrong = clients.run(client, with_guess(sql, WRONG))
    assert answer(right) == answer(wrong), (right, wrong)
    assert not denied_leaks(right.replace(SECRET, "")), right


# the deny proxy while it runs: a module that leaves hidden code in database postgres for a
# while waits until this proxy's catalog read no longer sees it (as for `billing`)
LIVE: list[ProxyProcess] = []


@pytest.fixture(scope="session")
def deny_proxy(pg: EmbeddedPostgres, billing: ProxyProcess) -> Iterator[ProxyProcess]:
    """pgveil with the deny rules (and an audit file: `deny_proxy.audit_path`); the
    `billing` fixture made the roles."""
    pg.psql(SCHEMA)
    d = Path(tempfile.mkdtemp(prefix="pgveil-deny-"))
    rules = d / "rules.yaml"
    rules.write_text(RULES)
    audit = d / "audit.jsonl"
    env = {"PGVEIL_TEST_HASH_KEY": HASH_KEY, "PGVEIL_CATALOG_PASSWORD": pg.password}
    p = ProxyProcess(
        pg.port, "--upstream-sslmode", "disable", "--rules", str(rules),
        "--catalog-user", pg.superuser, "--audit-file", str(audit), env=env,
    )  # fmt: skip
    p.audit_path = audit  # type: ignore[attr-defined]
    LIVE.append(p)
    yield p
    LIVE.remove(p)
    p.stop()
    shutil.rmtree(d)
