"""In-process microbenchmark: Bind/Execute/Sync of a prepared statement through the session
engine of a masked session, and the server's answer, without sockets or a database.

What it measures is the per-use cost pgveil adds on the masked hot path (the frontend
messages analysed, the answer paired and scrubbed), so that a change to that path can be
compared before and after on the same machine:

    python bench/prepared_micro.py [--seconds 3] [--reps 5]

`--simple` measures a simple-protocol Query of a masked SELECT instead (a new literal each
time: the rewritten shape from the cache), sent as the statement pgveil prepared once on the
server connection (Bind/Describe/Execute/Close/Sync, the answers made a Query's); with
`--text` as the rewritten text (`masked_prepare` off).
`--audited` gives the session an audit hook (events are built, then dropped).
`--refresh N` replaces the database's MaskingContext (as a catalog refresh that changes
nothing does) every N uses, to show what a use that follows a refresh costs.
Prints CPU microseconds per use (median of the repetitions, and min-max).
"""

from __future__ import annotations

import argparse
import statistics
import struct
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from proxy.session.engine import Session, SessionSettings
from proxy.wire import messages as m
from proxy.wire.simple import ready_for_query
from proxy.wire.startup import StartupMessage
from rules.context import ContextHolder, MaskingContext
from rules.loader import parse_rules
from tests.unit.rules.fixtures import CATALOG, RULES

STARTUP = StartupMessage(m.PROTOCOL_3_0, {"user": "helpdesk", "database": "db"})
LOGIN = (
    m.message(m.AUTHENTICATION, b"\0\0\0\0")
    + m.message(m.PARAMETER_STATUS, b"client_encoding\0UTF8\0")
    + m.message(m.PARAMETER_STATUS, b"standard_conforming_strings\0on\0")
    + m.message(m.BACKEND_KEY_DATA, b"\0\0\0\1\0\0\0\2")
    + ready_for_query()
)
SQL = b"SELECT name, email, balance FROM billing.customers WHERE i_customer = $1"


class _Hook:
    """An audit hook that takes every event and keeps none (the events are built)."""

    subjects_limit = 100

    def ready(self) -> bool:
        return True

    def record(self, event_type: str, fields: dict[str, object]) -> bool:
        return True


def _session(
    holder: ContextHolder, audited: bool = False, prepare: bool = True, simple: bool = False
) -> Session:
    s = Session(SessionSettings(classify=lambda: True, masked_prepare=prepare))
    s.client_data(STARTUP.encode())
    s.upstream_connected()
    s.server_data(LOGIN)
    s.login_classified(holder, None, _Hook() if audited else None)
    if simple:
        return s  # (a client that sends only Queries)
    parse = m.message(m.PARSE, b"s1\0" + SQL + b"\0\0\0")
    s.client_data(parse + m.message(m.SYNC))
    s.server_data(m.message(m.PARSE_COMPLETE) + ready_for_query())
    return s


def _bind(key: int) -> bytes:
    value = str(key).encode()
    body = b"\0s1\0" + b"\0\0" + b"\0\1" + struct.pack("!i", len(value)) + value + b"\0\0"
    return m.message(m.BIND, body)


def run(seconds: float, refresh: int, audited: bool) -> float:
    """Microseconds per use (client request and server answer) over `seconds`."""
    policy = parse_rules(RULES, "r", {"K": "k" * 32})
    holder = ContextHolder(MaskingContext(policy, CATALOG))
    s = _session(holder, audited)
    request = _bind(1) + m.message(m.EXECUTE, b"\0\0\0\0\0") + m.message(m.SYNC)
    row = m.message(m.DATA_ROW, b"\0\3\0\0\0\3Z*r\0\0\0\3z*e\0\0\0\x0512.50")
    answer = (
        m.message(m.BIND_COMPLETE)
        + row
        + m.message(m.COMMAND_COMPLETE, b"SELECT 1\0")
        + ready_for_query()
    )
    contexts = [MaskingContext(policy, CATALOG) for _ in range(4)] if refresh else []
    uses = 0
    # CPU time of this process: steadier than wall time on a machine shared with others
    deadline = time.process_time() + seconds
    start = time.process_time()
    while True:
        for _ in range(200):
            if refresh and uses % refresh == 0:
                holder.context = contexts[(uses // refresh) % len(contexts)]
            s.client_data(request)
            s.server_data(answer)
            uses += 1
        now = time.process_time()
        if now >= deadline:
            return (now - start) / uses * 1e6


def _row_description() -> bytes:
    body = bytearray(struct.pack("!h", 3))
    for name, type_oid in ((b"name", 25), (b"email", 25), (b"balance", 1700)):
        body += name + b"\0" + struct.pack("!ihihih", 0, 0, type_oid, -1, -1, 0)
    return m.message(m.ROW_DESCRIPTION, bytes(body))


def run_simple(seconds: float, audited: bool, prepare: bool) -> float:
    """Microseconds per masked Query (client request and server answer) over `seconds`."""
    policy = parse_rules(RULES, "r", {"K": "k" * 32})
    holder = ContextHolder(MaskingContext(policy, CATALOG))
    s = _session(holder, audited, prepare, simple=True)
    sql = "SELECT name, email, balance FROM billing.customers WHERE i_customer = {} LIMIT 20"
    requests = [m.message(m.QUERY, sql.format(k).encode() + b"\0") for k in range(1, 101)]
    row = m.message(m.DATA_ROW, b"\0\3\0\0\0\3Z*r\0\0\0\3z*e\0\0\0\x0512.50")
    result = _row_description() + row + m.message(m.COMMAND_COMPLETE, b"SELECT 1\0")
    if prepare:
        # the first use prepares the statement
        s.client_data(requests[0])
        s.server_data(
            m.message(m.PARSE_COMPLETE) + m.message(m.BIND_COMPLETE) + result + ready_for_query()
        )
        answer = m.message(m.BIND_COMPLETE) + result + ready_for_query()
    else:
        answer = result + ready_for_query()
    uses = 0
    deadline = time.process_time() + seconds
    start = time.process_time()
    counters = s.filter.counters
    assert counters is not None
    executions = counters.prepared_executions
    while True:
        for request in requests:
            s.client_data(request)
            s.server_data(answer)
        uses += len(requests)
        now = time.process_time()
        if now >= deadline:
            # (the path measured is the one named)
            assert counters.prepared_executions - executions == (uses if prepare else 0)
            return (now - start) / uses * 1e6


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--refresh", type=int, default=0)
    parser.add_argument("--audited", action="store_true", help="with an audit hook")
    parser.add_argument("--simple", action="store_true", help="a masked simple Query")
    parser.add_argument("--text", action="store_true", help="--simple, masked_prepare off")
    args = parser.parse_args()
    if args.simple or args.text:
        prepare = not args.text
        runs = [run_simple(args.seconds, args.audited, prepare) for _ in range(args.reps)]
        print(
            ("audited " if args.audited else "")
            + f"masked simple Query ({'prepared' if prepare else 'rewritten text'}): "
            f"{statistics.median(runs):.2f} us per use (min {min(runs):.2f}, "
            f"max {max(runs):.2f}, {args.reps} x {args.seconds} s)"
        )
        return 0
    results = [run(args.seconds, args.refresh, args.audited) for _ in range(args.reps)]
    print(
        ("audited " if args.audited else "")
        + f"masked Bind/Execute/Sync of a prepared statement: {statistics.median(results):.2f} us "
        f"per use (min {min(results):.2f}, max {max(results):.2f}, {args.reps} x {args.seconds} s"
        + (f", context replaced every {args.refresh} uses" if args.refresh else "")
        + ")"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
