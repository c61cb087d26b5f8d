"""`pgveil audit who` as a compliance team runs it, on the events of a real audited pgveil:
what it leaves out (statements that cannot carry data), what it groups (an unmasked
session's statements pgveil could not follow), how it names statements, and its output
formats: JSON lines written as rows are found, a quiet end when the reader of a pipe goes
away (`| head -1`), CSV, and a table on a terminal."""

from __future__ import annotations

import asyncio
import contextlib
import csv
import io
import json
import os
import pty
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import asyncpg
import psycopg
import pytest

from audit import kinds as audit_kinds
from proxy.cli.audit import who
from proxy.demo.embedded_pg import EmbeddedPostgres
from tests.integration.audit_wire import all_events, audited_proxy
from tests.integration.masking_fixture import ADMIN, ADMIN_PW, HELPDESK, HELPDESK_PW, dsn
from tests.integration.test_audit_evasion_who import run_psql, run_psycopg
from tests.support import ProxyProcess

ROOT = Path(__file__).resolve().parents[2]
CUSTOMERS = "billing.customers"


@pytest.fixture(scope="module")
def audited(
    pg: EmbeddedPostgres, billing: ProxyProcess, tmp_path_factory: Any
) -> Iterator[tuple[ProxyProcess, Path]]:
    with audited_proxy(pg, tmp_path_factory.mktemp("who-report")) as shared:
        yield shared


def who_cli(*args: str, stdout: Any = subprocess.PIPE) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "proxy.cli", "audit", "who", *args],
        cwd=ROOT, stdout=stdout, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip


def report(path: Path, subject: str, *args: str) -> list[dict[str, Any]]:
    """`audit who --table billing.customers --subject S --file PATH` as JSON lines (the
    default when the output is not a terminal)."""
    p = who_cli("--table", CUSTOMERS, "--subject", subject, "--file", str(path), *args)
    out, err = p.communicate(timeout=120)
    assert p.returncode == 0 and not err, err
    return [json.loads(line) for line in out.splitlines()]


def mine(rows: list[dict[str, Any]], app: str) -> list[dict[str, Any]]:
    return [r for r in rows if r["application_name"] == app]


def app_events(path: Path, app: str) -> list[dict[str, Any]]:
    return [e for e in all_events(path) if e.get("application_name") == app]


# ---- what is left out --------------------------------------------------------------------


@pytest.mark.parametrize("client", ["psql", "psycopg"])
def test_settings_maintenance_and_transaction_control_are_not_listed(
    pg: EmbeddedPostgres, audited: tuple[ProxyProcess, Path], client: str
) -> None:
    proxy, path = audited
    app = f"who-quiet-{client}"
    statements = (
        "SET client_encoding = 'UTF8'",
        "SET standard_conforming_strings = on",
        "RESET work_mem",
        "SHOW work_mem",
        # (billing_admin does not own the table: the server skips it with a WARNING,
        # which makes the statement one whose messages may carry values; see below)
        "SET client_min_messages = error",
        "VACUUM billing.customers",
        "ANALYZE billing.customers",
        "RESET client_min_messages",
        "BEGIN",
        "LOCK TABLE billing.customers IN SHARE MODE",
        "COMMIT",
        "DISCARD ALL",
        "DO $$ BEGIN PERFORM name FROM billing.customers; END $$",
        "SELECT name FROM billing.customers WHERE i_customer = 1",
    )
    (run_psql if client == "psql" else run_psycopg)(pg, proxy.port, ADMIN, app, statements)
    events = [e for e in app_events(path, app) if e["type"] == "access"]
    recorded = {k for e in events for k in e["kinds"]}
    # the maintenance statements are recorded (they name the table, or pgveil does not
    # analyse them to their end) ...
    assert {"vacuum", "analyze", "DoStmt", "select"} <= recorded, events
    uncertain = [e for e in events if e.get("analysis_complete") is False]
    assert all(e.get("uncertain") for e in uncertain), uncertain
    # ... but only the DO block and the read are listed, each event on its own here
    rows = [r for r in who(all_events(path), CUSTOMERS, "2", None, None)]
    assert [r["kinds"] for r in rows if r["application_name"] == app] == [["DoStmt"]]
    rows = [r for r in who(all_events(path), CUSTOMERS, "1", None, None)]
    assert [r["kinds"] for r in rows if r["application_name"] == app] == [
        ["DoStmt"],
        ["select"],
    ]


def test_maintenance_and_its_messages(
    pg: EmbeddedPostgres, audited: tuple[ProxyProcess, Path]
) -> None:
    """The server's own WARNING that VACUUM skips a table the role does not own names the
    table only: the VACUUM is not listed. A message raised by code while VACUUM runs (an
    index expression's function, with a CONTEXT) may carry values: listed."""
    proxy, path = audited
    app = "who-vacuum-warning"
    pg.psql(
        "CREATE TABLE public.who_vacuumed (i int); "
        "CREATE FUNCTION public.who_noisy(int) RETURNS int LANGUAGE plpgsql IMMUTABLE AS "
        "$$ BEGIN RAISE WARNING 'row %', $1; RETURN $1; END $$; "
        "INSERT INTO public.who_vacuumed VALUES (1); "
        "CREATE INDEX ON public.who_vacuumed (public.who_noisy(i)); "
        "ALTER TABLE public.who_vacuumed OWNER TO billing_admin"
    )
    try:
        run_psql(pg, proxy.port, ADMIN, app, (
            "VACUUM billing.customers",  # (not its owner: skipped, with a WARNING)
            # (the event names the protected table; the other one's expression index
            # raises a WARNING for each row ANALYZE samples)
            "ANALYZE billing.customers, public.who_vacuumed",
        ))  # fmt: skip
    finally:
        pg.psql("DROP TABLE public.who_vacuumed; DROP FUNCTION public.who_noisy(int)")
    vacuum, analyze = [e for e in app_events(path, app) if e["type"] == "access"]
    assert vacuum["kinds"] == ["vacuum"] and "values_in_messages" not in vacuum, vacuum
    assert analyze["kinds"] == ["analyze"] and analyze["values_in_messages"] is True, analyze
    rows = [r for r in who(all_events(path), CUSTOMERS, "1", None, None)]
    assert [r["what"] for r in rows if r["application_name"] == app] == [["analyze"]]


def test_a_setting_sent_with_a_read_keeps_the_read(
    pg: EmbeddedPostgres, audited: tuple[ProxyProcess, Path]
) -> None:
    """One Query of a SET that stops the analysis and a SELECT after it: the event says
    both kinds (the analysis stopped at the first), and is listed."""
    proxy, path = audited
    app = "who-set-then-read"

    async def go() -> None:
        c = await asyncpg.connect(
            host="127.0.0.1", port=proxy.port, user=ADMIN, password=ADMIN_PW,
            database="postgres", ssl=False, server_settings={"application_name": app},
        )  # fmt: skip
        try:
            # (no arguments: one simple-protocol Query)
            await c.execute("SET ROLE billing_admin; SELECT name FROM billing.customers")
        finally:
            await c.close()

    asyncio.run(go())
    (event,) = [e for e in app_events(path, app) if e["type"] == "access"]
    assert event["kinds"] == ["set", "select"] and event["analysis_complete"] is False
    rows = [r for r in who(all_events(path), CUSTOMERS, "1", None, None)]
    assert [r["touched"] for r in rows if r["application_name"] == app] == ["possibly"]


# ---- what is grouped, and how statements are named ------------------------------------------


def test_an_unmasked_sessions_uncertain_statements_are_one_line(
    pg: EmbeddedPostgres, audited: tuple[ProxyProcess, Path]
) -> None:
    proxy, path = audited
    app, other = "who-grouped", "who-grouped-masked"
    run_psql(pg, proxy.port, ADMIN, app, (
        "DO $$ BEGIN PERFORM name FROM billing.customers; END $$",
        "SELECT billing.leak()",
        "SELECT name FROM billing.customers WHERE i_customer = 1",
        "DO $$ BEGIN PERFORM 1; END $$",
    ))  # fmt: skip
    run_psql(pg, proxy.port, HELPDESK, other, ("SELECT name FROM billing.customers",))
    rows = report(path, "1")
    grouped = [r for r in mine(rows, app) if r.get("group") == "session"]
    assert len(grouped) == 1, mine(rows, app)
    (g,) = grouped
    assert g["touched"] == "possibly" and g["role"] == ADMIN and g["statements"] == 3
    assert g["what"] == ["do block", "select"] and g["ts"] < g["last_ts"]
    reasons = " ".join(g["uncertain"])
    assert "DO" in reasons and "leak" in reasons, g["uncertain"]
    # the read of customer 1 stays a row of its own, as the masked role's read does
    assert [(r["touched"], r["what"]) for r in mine(rows, app) if "group" not in r] == [
        ("yes", ["select"])
    ]
    assert [(r["touched"], r["what"]) for r in mine(rows, other)] == [("possibly", ["select"])]
    # the table for a person: the session in a section of its own, with its reasons
    p = who_cli("--table", CUSTOMERS, "--subject", "1", "--file", str(path), "--format", "table")
    out, err = p.communicate(timeout=120)
    assert p.returncode == 0 and not err, err
    sessions = out.partition("possibly, not fully analysed")[2]
    assert "Stmt" not in out
    (line,) = [x for x in sessions.splitlines() if g["ts"] in x]
    assert g["last_ts"] in line and " 3 " in line and "do block, select" in line, line


def test_copy_reads_as_copy_out_and_copy_in(
    pg: EmbeddedPostgres, audited: tuple[ProxyProcess, Path]
) -> None:
    proxy, path = audited
    app = "who-copy"
    conninfo = dsn(pg, proxy.port, HELPDESK, HELPDESK_PW) + f" application_name={app}"
    with psycopg.connect(conninfo, autocommit=True) as c:
        with c.cursor().copy(
            "COPY (SELECT i_customer, name FROM billing.customers) TO STDOUT"
        ) as cp:
            for _row in cp:
                pass
        with c.cursor().copy("COPY billing.customers (name) FROM STDIN"):
            pass  # (no rows: nothing is written, the statement still names the table)
    rows = mine(report(path, "1"), app)
    assert [r["what"] for r in rows] == [["copy out"]], rows
    # the COPY FROM changed nothing (not listed); its event reads as a copy in
    copy_in = [e for e in app_events(path, app) if e["type"] == "access"][-1]
    assert copy_in["kinds"] == ["copy"] and copy_in["rows"] == 0, copy_in
    assert audit_kinds.what(copy_in["kinds"], copy_in["statement"]) == ["copy in"]


# ---- output --------------------------------------------------------------------------------


def test_json_lines_come_as_rows_are_found_and_end_quietly_on_a_closed_pipe(
    pg: EmbeddedPostgres, audited: tuple[ProxyProcess, Path], tmp_path: Path
) -> None:
    """The events go through a FIFO: `who` must write its first row while the FIFO is still
    open (it streams), and end with exit 0 and nothing on stderr when the reader of its
    output has gone away and it writes more (`| head -1`)."""
    proxy, path = audited
    app = "who-stream"
    run_psycopg(pg, proxy.port, HELPDESK, app, ("SELECT name FROM billing.customers",) * 3)
    lines = [
        json.dumps(e) + "\n"
        for e in app_events(path, app)
        if e["type"] == "access" and e.get("outcome") != "running"
    ]
    assert len(lines) == 3
    fifo = tmp_path / "audit.jsonl"
    os.mkfifo(fifo)
    for command in (
        ["who", "--table", CUSTOMERS, "--subject", "1", "--file", str(fifo), "--json"],
        ["tail", str(fifo)],
    ):
        p = subprocess.Popen(
            [sys.executable, "-m", "proxy.cli", "audit", *command],
            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        writer = fifo.open("w")
        try:
            writer.write(lines[0])
            writer.flush()
            first = _line_within(p, 60)
            assert first, p.stderr.read() if p.stderr else ""
            assert p.poll() is None  # (the FIFO is still open: the row came as found)
            assert p.stdout is not None
            p.stdout.close()  # the reader goes away
            with contextlib.suppress(BrokenPipeError):  # (and so, soon, does `who`)
                for line in lines[1:] * 200:
                    writer.write(line)
                writer.close()
        finally:
            with contextlib.suppress(BrokenPipeError):
                writer.close()
        assert p.wait(timeout=120) == 0, command
        assert p.stderr is not None and p.stderr.read() == "", command


def _line_within(p: subprocess.Popen[str], timeout: float) -> str:
    """The first line of `p`'s output ("" if none came: the test fails, not hangs)."""
    got: list[str] = []
    assert p.stdout is not None
    out = p.stdout
    reader = threading.Thread(target=lambda: got.append(out.readline()), daemon=True)
    reader.start()
    reader.join(timeout)
    return got[0] if got else ""


def test_a_shell_pipe_into_head(
    pg: EmbeddedPostgres, audited: tuple[ProxyProcess, Path], tmp_path: Path
) -> None:
    proxy, path = audited
    app = "who-head"
    run_psycopg(pg, proxy.port, HELPDESK, app, ("SELECT name FROM billing.customers",))
    (read,) = [e for e in app_events(path, app) if e["type"] == "access"]
    big = tmp_path / "audit.jsonl"
    big.write_text((json.dumps(read) + "\n") * 2000)  # more than a pipe holds
    command = (
        f"set -o pipefail; {sys.executable} -m proxy.cli audit who --table {CUSTOMERS} "
        f"--subject 1 --file {big} --json | head -1"
    )
    p = subprocess.run(
        ["bash", "-c", command], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert p.returncode == 0 and p.stderr == "", p.stderr
    assert json.loads(p.stdout)["touched"] in ("yes", "possibly")


def test_csv_and_a_table_on_a_terminal(audited: tuple[ProxyProcess, Path]) -> None:
    _proxy, path = audited
    p = who_cli("--table", CUSTOMERS, "--subject", "1", "--file", str(path), "--format", "csv")
    out, err = p.communicate(timeout=120)
    assert p.returncode == 0 and not err, err
    table = list(csv.DictReader(io.StringIO(out)))
    assert table and {r["touched"] for r in table} <= {"yes", "possibly", "erased"}
    assert len(table) == len(report(path, "1"))
    assert all("Stmt" not in r["what"] for r in table)
    # on a terminal the default is the table
    leader, follower = pty.openpty()
    try:
        p = who_cli("--table", CUSTOMERS, "--subject", "1", "--file", str(path), stdout=follower)
        os.close(follower)
        chunks = []
        while True:
            try:
                chunk = os.read(leader, 65536)
            except OSError:
                break  # (EIO: the other end closed)
            if not chunk:
                break
            chunks.append(chunk)
        assert p.wait(timeout=120) == 0
    finally:
        os.close(leader)
    text = b"".join(chunks).decode()
    assert text.startswith("time (UTC)") and "event(s))" in text, text[:200]
