"""Attack corpus, round 2: bypasses not covered by test_attack_corpus.py.

SQL cases run through pgveil (psycopg, simple protocol) and must not leak; each must leak when
run directly against PostgreSQL as `helpdesk` (`direct` overrides the statements for the
direct run where pgveil's own rewriting is what creates the leak, e.g. the placeholder
injection: the direct run is then the statement pgveil ends up forwarding).

Cases whose secret is the hash-mask key (HMAC pads) cannot leak directly (the key exists only
in pgveil); for them the direct run is skipped and the leak check looks for the pads.

Protocol cases use raw sockets with a minimal SCRAM client (helpdesk has a SCRAM password).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import struct
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import psycopg
import pytest

from proxy.demo.embedded_pg import EmbeddedPostgres
from proxy.wire import messages as m
from proxy.wire.startup import StartupMessage
from rules.masks import hmac_pads
from tests.integration.attack_clients import PsycopgClient
from tests.integration.masking_fixture import HASH_KEY, HELPDESK, HELPDESK_PW, dsn, leaks
from tests.support import ProxyProcess, RawClient

_IPAD, _OPAD = hmac_pads(HASH_KEY.encode())


def leaks2(text: str) -> list[str]:
    """leaks() plus the hash-mask key material (key, HMAC inner/outer pads)."""
    found = leaks(text)
    for label, b in (("hash_ipad", _IPAD[:16]), ("hash_opad", _OPAD[:16])):
        if b.hex() in text or b.hex().upper() in text:
            found.append(label)
    if HASH_KEY in text:
        found.append("hash_key")
    return found


@dataclass(frozen=True)
class Case:
    id: str
    sql: tuple[str, ...]
    direct: tuple[str, ...] | None = None  # statements proving the leak directly; None: same
    key_only: bool = False  # the secret is pgveil's hash key: no direct proof possible
    note: str = ""


INJECTED = "(SELECT string_agg(name || email || login || cc_number || phone, $$ $$) FROM billing.customers)"

CASES: list[Case] = [
    # ---- literal placeholders of the shape cache substituted inside identifiers ------------
    Case(
        "placeholder_in_quoted_alias",
        (
            'SELECT i_customer AS "$900000" FROM billing.customers '
            f"WHERE '\" , {INJECTED} AS \"' IS NOT NULL",
        ),
        direct=(f"SELECT {INJECTED}",),
        note="normalize() turns literals into $9000NN, _substitute() puts them back by regex, "
        "also inside quoted identifiers: the literal breaks out of the identifier, unanalysed",
    ),
    Case(
        "placeholder_in_unquoted_alias",
        (
            "SELECT i_customer AS x$900000 FROM billing.customers "
            f"WHERE '\" , {INJECTED} AS \"' IS NOT NULL",
        ),
        direct=(f"SELECT {INJECTED}",),
    ),
    Case(
        "placeholder_in_unicode_escaped_alias",
        (
            'SELECT i_customer AS U&"\\0024900000" FROM billing.customers '
            f"WHERE '\" , {INJECTED} AS \"' IS NOT NULL",
        ),
        direct=(f"SELECT {INJECTED}",),
        note='normalize() now refuses texts spelling $9NNNNN, but U&"\\0024..." spells it only '
        'after unescaping: RawStream prints "$900000" and _substitute() fills it in',
    ),
    # ---- the hash-mask key -----------------------------------------------------------------
    Case(
        "hashkey_pg_get_viewdef_temp_view",
        (
            "CREATE TEMP VIEW atk_hv1 AS SELECT login FROM billing.customers",
            "SELECT pg_get_viewdef('atk_hv1')",
        ),
        key_only=True,
        note="the view definition stores pgveil's rewritten SQL with the HMAC pads",
    ),
    Case(
        "hashkey_pg_views_definition",
        (
            "CREATE TEMP VIEW atk_hv2 AS SELECT login || '' AS l FROM billing.customers",
            "SELECT definition FROM pg_views WHERE viewname = 'atk_hv2'",
        ),
        key_only=True,
    ),
    Case(
        "hashkey_explain_verbose_execute",
        (
            "PREPARE atk_hp1 AS SELECT login FROM billing.customers",
            "EXPLAIN (VERBOSE) EXECUTE atk_hp1",
            "DEALLOCATE atk_hp1",
        ),
        key_only=True,
        note="EXPLAIN of a hash-reading statement is refused, EXPLAIN EXECUTE is not",
    ),
    Case(
        "hashkey_explain_verbose_ctas_execute",
        (
            "PREPARE atk_hp4 AS SELECT login FROM billing.customers",
            "EXPLAIN (VERBOSE) CREATE TEMP TABLE atk_ct4 AS EXECUTE atk_hp4",
            "DEALLOCATE atk_hp4",
        ),
        key_only=True,
    ),
    Case(
        "held_matview_over_hash",
        (
            "CREATE MATERIALIZED VIEW public.atk_mvh AS SELECT login FROM billing.customers",
            "SELECT definition FROM pg_matviews WHERE matviewname = 'atk_mvh'",
            "DROP MATERIALIZED VIEW IF EXISTS public.atk_mvh",
        ),
        key_only=True,
    ),
    Case(
        "hashkey_backend_memory_contexts",
        (
            "PREPARE atk_hp2 AS SELECT login FROM billing.customers",
            "SELECT ident FROM pg_backend_memory_contexts WHERE ident LIKE '%decode%'",
            "DEALLOCATE atk_hp2",
        ),
        key_only=True,
        note="pg_get_backend_memory_contexts() is denied, the view over it is not; "
        "helpdesk has pg_read_all_stats",
    ),
    # ---- held in this round (kept as regression cases) --------------------------------------
    Case(
        "held_nth_value_frame",
        (
            "SELECT nth_value(email, 1) OVER (ORDER BY i_customer ROWS BETWEEN UNBOUNDED PRECEDING "
            "AND UNBOUNDED FOLLOWING) FROM billing.customers",
        ),
    ),
    Case(
        "held_grouping_rollup",
        ("SELECT GROUPING(name), name || '' FROM billing.customers GROUP BY ROLLUP (name)",),
    ),
    Case(
        "held_quoted_mixed_case_alias",
        ('SELECT "Customers".name || \'\' FROM billing."customers" AS "Customers"',),
    ),
    Case(
        "held_unicode_uescape_ident",
        ("SELECT U&\"!006Eame\" UESCAPE '!' || '' FROM billing.customers",),
    ),
    Case("held_e_string_backslash_quote", ("SELECT E'\\'' || name FROM billing.customers",)),
    Case("held_odd_dollar_tag", ("SELECT $_a1$<$_a1$ || email FROM billing.customers",)),
    Case(
        "held_any_subquery",
        (
            "SELECT name || '' FROM billing.customers WHERE name = ANY (SELECT name FROM billing.customers)",
        ),
    ),
    Case(
        "held_ts_headline",
        ("SELECT ts_headline('simple', name, to_tsquery('simple', 'x')) FROM billing.customers",),
    ),
    Case(
        "held_xmlserialize",
        ("SELECT xmlserialize(content xmlelement(name a, login) AS text) FROM billing.customers",),
    ),
    Case("held_jsonb_minus_key", ("SELECT (extra - 'tier')::text FROM billing.customers",)),
    Case(
        "held_string_agg_order_by",
        ("SELECT string_agg(phone, ',' ORDER BY email DESC) FROM billing.customers",),
    ),
    Case(
        "held_explain_verbose_execute_no_hash",
        (
            "PREPARE atk_hp3 AS SELECT name, email FROM billing.customers",
            "EXPLAIN (VERBOSE, COSTS OFF) EXECUTE atk_hp3",
            "EXECUTE atk_hp3",
            "DEALLOCATE atk_hp3",
        ),
        direct=(
            "PREPARE atk_hp3 AS SELECT name, email FROM billing.customers",
            "EXECUTE atk_hp3",
            "DEALLOCATE atk_hp3",
        ),
    ),
    Case(
        "held_search_path_pg_temp_first",
        (
            "CREATE TEMP TABLE customers AS SELECT 1 AS i_customer",
            "SET search_path = pg_temp, billing",
            "SELECT name || '' FROM billing.customers",
            "DROP TABLE pg_temp.customers",
        ),
    ),
    Case(
        "held_placeholder_alias_pass",
        (
            "SELECT 'x' AS \"$900000\", (SELECT name || '' FROM billing.customers WHERE i_customer = 1)",
        ),
    ),
    Case(
        "held_write_back_regclass",
        (
            "BEGIN",
            'CREATE TABLE public."+**********56" (x int)',
            "UPDATE billing.customers SET phone = 'public.\"+**********56\"'::regclass "
            "WHERE i_customer = 1",
            "ROLLBACK",
        ),
        direct=(
            "BEGIN",
            "UPDATE billing.customers SET phone = phone::regclass WHERE i_customer = 1",
            "ROLLBACK",
        ),
        note="write-back CASE casts the raw column to regclass: error vs no error depends on "
        "the raw value (equality oracle); the message's quoted value is scrubbed",
    ),
]


@pytest.fixture(scope="module")
def sessions(
    pg: EmbeddedPostgres, billing: ProxyProcess
) -> Iterator[tuple[PsycopgClient, PsycopgClient]]:
    via = PsycopgClient(dsn(pg, billing.port))
    direct = PsycopgClient(
        dsn(pg, pg.port), reset_sql=("ROLLBACK", "DISCARD ALL", "RESET client_encoding")
    )
    try:
        yield via, direct
    finally:
        via.close()
        direct.close()
        pg.psql('DROP TABLE IF EXISTS public."+**********56"')


def test_cases_do_not_carry_secrets() -> None:
    ids = [c.id for c in CASES]
    assert len(ids) == len(set(ids))
    for c in CASES:
        assert leaks2("\n".join(c.sql + (c.direct or ()))) == [], c.id


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_round2_no_leak_through_pgveil(
    sessions: tuple[PsycopgClient, PsycopgClient], case: Case
) -> None:
    received = sessions[0].run(case.sql)
    assert leaks2(received) == [], f"{case.id} leaked through pgveil:\n{received[:3000]}"


@pytest.mark.parametrize(
    "case", [c for c in CASES if not c.key_only], ids=[c.id for c in CASES if not c.key_only]
)
def test_round2_case_leaks_directly(
    sessions: tuple[PsycopgClient, PsycopgClient], case: Case
) -> None:
    received = sessions[1].run(case.direct or case.sql)
    if case.id == "held_write_back_regclass":
        # the oracle: the raw value reaches an error; directly the message shows it
        assert leaks(received) != [], received[:3000]
        return
    assert leaks(received) != [], f"{case.id} does not leak directly:\n{received[:3000]}"


# ---- protocol ---------------------------------------------------------------------------------


def scram_login(port: int, final_suffix: bytes = b"") -> RawClient:
    """Log in as helpdesk with SCRAM-SHA-256; `final_suffix` goes out in the same write as the
    final SASLResponse (i.e. while pgveil is still in its authentication phase)."""
    c = RawClient(port, connect=False)
    c.send_raw(StartupMessage(m.PROTOCOL_3_0, {"user": HELPDESK, "database": "postgres"}).encode())
    typ, body = c.recv_message()
    assert typ == "R" and struct.unpack("!I", body[:4])[0] == 10, (typ, body)
    nonce = base64.b64encode(os.urandom(18)).decode()
    first_bare = f"n=,r={nonce}"
    cf = ("n,," + first_bare).encode()
    c.send("p", b"SCRAM-SHA-256\0" + struct.pack("!i", len(cf)) + cf)
    typ, body = c.recv_message()
    assert typ == "R", (typ, body)
    server_first = body[4:].decode()
    attrs = dict(kv.split("=", 1) for kv in server_first.split(","))
    salted = hashlib.pbkdf2_hmac(
        "sha256", HELPDESK_PW.encode(), base64.b64decode(attrs["s"]), int(attrs["i"])
    )
    ck = hmac.new(salted, b"Client Key", "sha256").digest()
    without = f"c=biws,r={attrs['r']}"
    auth_msg = f"{first_bare},{server_first},{without}".encode()
    sig = hmac.new(hashlib.sha256(ck).digest(), auth_msg, "sha256").digest()
    proof = base64.b64encode(bytes(a ^ b for a, b in zip(ck, sig, strict=True))).decode()
    c.send_raw(m.message(ord("p"), f"{without},p={proof}".encode()) + final_suffix)
    return c


EVIL = b"SELECT string_agg(name || email || login || cc_number, ' ') FROM billing.customers"


def _desync(port: int) -> str:
    """The last SASLResponse is followed, in the same packet, by the first part of a Parse.
    pgveil (authentication phase) captures nothing complete but the password message and
    forwards the whole chunk; at ReadyForQuery it switches to feed_located(), which ignores
    the half-captured Parse and reads the rest of its body as new headers. The Parse ends in
    two parameter type OIDs chosen so that its last 5 bytes read 'd' + length: pgveil skips a
    'CopyData' that covers the next (unanalysed) Query; the server runs that Query."""
    evil = m.message(ord("Q"), EVIL + b"\0")
    parse = m.message(ord("P"), b"\0SELECT 1\0" + struct.pack("!hII", 2, 0x64, 4 + len(evil)))
    cut = len(parse) - 5
    c = scram_login(port, final_suffix=parse[:cut])
    try:
        login = c.until_ready()
        assert login[-1][0] == "Z", login
        c.send_raw(parse[cut:] + evil)
        return repr(c.until_ready())
    finally:
        c.close()


def test_protocol_auth_phase_partial_parse_desync_direct(pg: EmbeddedPostgres) -> None:
    assert leaks(_desync(pg.port)) != []


def test_protocol_auth_phase_partial_parse_desync(billing: ProxyProcess) -> None:
    received = _desync(billing.port)
    assert leaks(received) == [], f"desync leaked: {received[:2000]}"


def _query_in_two_packets(port: int) -> str:
    c = scram_login(port)
    try:
        c.until_ready()
        msg = m.message(ord("Q"), EVIL + b"\0")
        c.send_raw(msg[:20])
        time.sleep(0.3)
        c.send_raw(msg[20:])
        return repr(c.until_ready())
    finally:
        c.close()


def test_protocol_query_split_across_packets(pg: EmbeddedPostgres, billing: ProxyProcess) -> None:
    assert leaks(_query_in_two_packets(pg.port)) != []
    received = _query_in_two_packets(billing.port)
    assert leaks(received) == [], received[:2000]


def _nul_query(port: int) -> str:
    c = scram_login(port)
    try:
        c.until_ready()
        c.send("Q", b"SELECT 1\0; " + EVIL + b"\0")
        return repr(c.until_ready())
    finally:
        c.close()


def test_protocol_query_with_embedded_nul(billing: ProxyProcess) -> None:
    # the server reads to the first NUL and rejects the rest (invalid message format)
    received = _nul_query(billing.port)
    assert leaks(received) == [], received[:2000]


def _copy_in_then_query(port: int) -> str:
    c = scram_login(port)
    try:
        c.until_ready()
        c.query("CREATE TEMP TABLE atk_ci (x text)")
        c.send("Q", b"COPY atk_ci FROM STDIN\0")
        typ, _ = c.recv_message()
        assert typ == "G", typ
        c.send("d", b"a\n")
        c.send("Q", EVIL + b"\0")  # inside the copy stream
        c.send("c")
        out: list[Any] = []
        try:
            c.sock.settimeout(3)
            out += c.until_ready()
            c.sock.settimeout(15)
            out += c.query(EVIL.decode())
        except (TimeoutError, ConnectionError, OSError):
            out.append("[closed]")  # PostgreSQL ends the session on a Query inside COPY IN
        return repr(out)
    finally:
        c.close()


def test_protocol_query_inside_copy_in(billing: ProxyProcess) -> None:
    received = _copy_in_then_query(billing.port)
    assert leaks(received) == [], received[:2000]


def test_proxy_survives(pg: EmbeddedPostgres, billing: ProxyProcess) -> None:
    assert billing.alive()
    with psycopg.connect(dsn(pg, billing.port), autocommit=True) as c:
        assert c.execute("SELECT 1").fetchone() == (1,)
