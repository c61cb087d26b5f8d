"""Protocol framing a masked session might use to slip a statement past pgveil's analysis:
the first bytes of a Parse sent with the last SASLResponse (while pgveil is still in its
authentication phase), a Query split across two packets, a Query with a NUL inside its
text, and a Query sent inside a COPY IN stream. Each must leak nothing through pgveil
(the desynchronising Parse is first shown to leak when sent to PostgreSQL directly), and
the proxy keeps serving afterwards.

The protocol cases use raw sockets with a minimal SCRAM client (helpdesk has a SCRAM
password).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import struct
import time
from typing import Any

import psycopg

from proxy.demo.embedded_pg import EmbeddedPostgres
from proxy.wire import messages as m
from proxy.wire.startup import StartupMessage
from tests.integration.masking_fixture import HELPDESK, HELPDESK_PW, dsn, leaks
from tests.support import ProxyProcess, RawClient


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
    """The last SASLResponse is followed, in the same packet, by the first part of a Parse;
    the rest of the Parse follows after ReadyForQuery. The Parse ends in two parameter type
    OIDs chosen so that its last 5 bytes read 'd' + length: a proxy that lost the message
    boundary across the end of authentication would read them as a 'CopyData' header that
    covers the next Query, and pass that Query on unanalysed. What the client got back."""
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
