"""`pgveil demo` as a user runs it: a subprocess whose printed psql commands are run with the
real psql, then Ctrl-C. Also the demo on an existing database (`--dsn`), which must never
touch a schema or role it did not create."""

from __future__ import annotations

import base64
import fcntl
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import IO

import pytest

from audit.files import verify_files
from proxy.demo.embedded_pg import EmbeddedPostgres
from tests.integration.audit_wire import all_events

ROOT = Path(__file__).resolve().parents[2]
CUSTOMERS = "SELECT name, email, phone FROM billing.customers ORDER BY i_customer LIMIT 3"
DENIED = "SELECT i_customer, password_hash FROM billing.selfcare_credentials WHERE i_customer = 1"
REFUSED = "SELECT query_to_xml('SELECT * FROM billing.customers', true, true, '')"
PROMPT = "pgveil_demo=> "


def _default_address_lock() -> IO[bytes]:
    """An exclusive lock, across test processes, on the demo's default address (the one
    the README's reader gets: no --listen): CI runs the suite against both implementations
    side by side, and two demos on one address fail with "address already in use". The
    lock file is in the machine's temporary directory (tests/tmpdir_guard.py gives each run
    its own), and held until the demo is closed."""
    root = Path(os.environ.get("PYTEST_DEBUG_TEMPROOT", tempfile.gettempdir()))
    lock = open(root / "pgveil-tests-demo-default-address.lock", "ab")  # noqa: SIM115
    fcntl.flock(lock, fcntl.LOCK_EX)  # waits for the other run's demo to be closed
    return lock


class Demo:
    """`pgveil demo ARGS` in the background; `ready()` parses what it printed. A demo on
    the default address holds `_default_address_lock` while it lives."""

    def __init__(self, *args: str, env: dict[str, str] | None = None) -> None:
        self._port_lock = None if "--listen" in args else _default_address_lock()
        self.err_path = Path(tempfile.mkstemp(prefix="pgveil-demo-test-", suffix=".err")[1])
        self._err = open(self.err_path, "wb")  # noqa: SIM115 - closed in wait()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "proxy.cli", "demo", *args],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=self._err,
            text=True,
            env=env,
        )
        self.out: list[str] = []
        self._ready = threading.Event()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.out.append(line)
            if line.startswith("Press Ctrl-C"):
                self._ready.set()
        self._ready.set()

    def stderr(self) -> str:
        return self.err_path.read_text(errors="replace")

    def ready(self, timeout: float = 90) -> str:
        assert self._ready.wait(timeout), f"demo not ready after {timeout}s: {self.stderr()}"
        text = "".join(self.out)
        assert "Press Ctrl-C" in text, f"demo exited: {self.proc.poll()} {self.stderr()}"
        return text

    def uri(self, role: str) -> str:
        m = re.search(rf'"(postgresql://{role}:[^"]+)"', "".join(self.out))
        assert m, "".join(self.out)
        return m.group(1)

    def psql(self) -> str:
        """The psql the demo told the user to run (a path when none is on the PATH)."""
        m = re.search(r'^    (\S+) "postgresql://admin:', "".join(self.out), re.M)
        assert m, "".join(self.out)
        return m.group(1)

    def field(self, label: str) -> str:
        m = re.search(rf"^  {label}:\s+(\S+)", "".join(self.out), re.M)
        assert m, "".join(self.out)
        return m.group(1)

    def interrupt(self, sig: int = signal.SIGINT, timeout: float = 30) -> int:
        self.proc.send_signal(sig)
        return self.wait(timeout)

    def wait(self, timeout: float = 60) -> int:
        return self.proc.wait(timeout)

    def close(self) -> None:
        """Stop it as a user would (so it removes its PostgreSQL and directory even when a
        test failed half-way); kill only if that does not work."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._err.close()
        self.err_path.unlink(missing_ok=True)
        if self._port_lock is not None:
            self._port_lock.close()  # (closing the file releases the lock)
            self._port_lock = None


def psql(demo: Demo, uri: str, sql: str) -> subprocess.CompletedProcess[str]:
    """The printed command, unaligned, with the SQLSTATE in error messages."""
    return subprocess.run(
        [demo.psql(), uri, "-X", "-At", "-v", "VERBOSITY=verbose", "-c", sql],
        capture_output=True,
        text=True,
        timeout=30,
        env={k: v for k, v in os.environ.items() if not k.startswith("PG")},
    )


def rows(demo: Demo, uri: str, sql: str) -> list[str]:
    r = psql(demo, uri, sql)
    assert r.returncode == 0, r.stderr
    return r.stdout.splitlines()


def closed(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), 1).close()
    except OSError:
        return True
    return False


def pdf_is_consistent(pdf: bytes) -> bool:
    """Every xref offset points at its object and startxref at the table."""
    text = pdf.decode("latin-1")
    xref = int(re.search(r"startxref\n(\d+)\n%%EOF", text).group(1))  # type: ignore[union-attr]
    if not text.startswith("%PDF-") or not text[xref:].startswith("xref\n"):
        return False
    offsets = re.findall(r"^(\d{10}) 00000 n $", text[xref:], re.M)
    length = int(re.search(r"/Length (\d+)", text).group(1))  # type: ignore[union-attr]
    stream = text.split("stream\n", 1)[1].split("\nendstream", 1)[0]
    return len(stream) == length and all(
        text[int(o) :].startswith(f"{i} 0 obj\n") for i, o in enumerate(offsets, 1)
    )


@pytest.fixture
def demo() -> Iterator[Demo]:
    d = Demo("--scale", "0.01")
    yield d
    d.close()


@pytest.fixture
def reader_demo() -> Iterator[Demo]:
    """`pgveil demo` as the README's reader runs it: the default scale."""
    d = Demo()
    yield d
    d.close()


def test_demo_masks_refuses_audits_and_cleans_up(demo: Demo) -> None:
    demo.ready()
    admin, helpdesk = demo.uri("admin"), demo.uri("helpdesk")
    audit = Path(demo.field("audit stream"))
    workdir = audit.parent
    direct = re.search(r'bypasses pgveil\): psql "([^"]+)"', "".join(demo.out))
    assert direct
    pg_port = int(re.search(r"@127\.0\.0\.1:(\d+)/", direct.group(1)).group(1))  # type: ignore[union-attr]
    proxy_port = int(re.search(r":(\d+)/", helpdesk).group(1))  # type: ignore[union-attr]
    assert workdir.is_dir() and (workdir / "rules.yaml").is_file()

    # the same query as the unmasked admin and the masked helpdesk
    assert rows(demo, admin, CUSTOMERS) == [
        "Customer 000001|customer000001@example.invalid|+1-555-0101",
        "Customer 000002|customer000002@example.invalid|+1-555-0102",
        "Customer 000003|customer000003@example.invalid|+1-555-0103",
    ]
    assert rows(demo, helpdesk, CUSTOMERS) == [
        "C*************1|c*************@example.invalid|+********01",
        "C*************2|c*************@example.invalid|+********02",
        "C*************3|c*************@example.invalid|+********03",
    ]
    # a view over both tables is masked from its definition
    assert rows(
        demo, helpdesk, "SELECT name, account_id FROM billing.customer_overview LIMIT 1"
    ) == ["C*************1|+1********01"]
    # credentials are deny: NULL by name and in SELECT * (the admin sees them)
    assert rows(demo, helpdesk, DENIED) == ["1|"]
    assert rows(demo, admin, DENIED)[0].startswith("1|$demo$")
    assert (
        rows(demo, helpdesk, "SELECT * FROM billing.selfcare_credentials LIMIT 1")[0].count("|")
        == 3
    )
    # a function that runs SQL text is refused, with its reason
    r = psql(demo, helpdesk, REFUSED)
    assert r.returncode == 1 and "ERROR:  42501: pgveil:" in r.stderr, r.stderr
    assert "query_to_xml" in r.stderr

    # the invoices are real PDFs (fixed-width fields keep the xref offsets right)
    pdf = base64.b64decode(
        "".join(rows(demo, admin, "SELECT encode(pdf, 'base64') FROM billing.invoices LIMIT 1"))
    )
    assert pdf_is_consistent(pdf) and b"Customer 000001" in pdf
    assert rows(demo, helpdesk, "SELECT pdf IS NULL FROM billing.invoices LIMIT 1") == ["t"]

    # terminated customers past their class's retention: erasure has work
    assert re.search(r"erasure:\s+2 terminated customer", "".join(demo.out))

    # the audit stream recorded both roles and the refusal, without a value
    deadline = time.monotonic() + 60
    while not any(e["type"] == "refused" for e in all_events(audit)):
        assert time.monotonic() < deadline, audit.read_text()
        time.sleep(0.1)
    events = list(all_events(audit))
    refused = [e for e in events if e["type"] == "refused"]
    assert [(e["role"], e["tables"]) for e in refused] == [("helpdesk", [])]
    assert "query_to_xml" in refused[0]["reason"]
    # the deny column's read is recorded as denied, not as masked
    denied = [e for e in events if e.get("columns_denied")]
    assert len(denied) == 2  # by name, and through SELECT *
    assert {(e["role"], tuple(e["columns_denied"])) for e in denied} == {
        ("helpdesk", ("billing.selfcare_credentials.password_hash",))
    }
    assert [e["columns_masked"] for e in denied] == [[], ["billing.selfcare_credentials.login"]]
    access = {(e["role"], e["classification"]) for e in events if e["type"] == "access"}
    assert {("admin", "unmasked"), ("helpdesk", "masked")} <= access
    assert verify_files([audit])[1] is None
    assert "Customer 000001" not in audit.read_text()

    with urllib.request.urlopen(demo.field("metrics"), timeout=10) as resp:
        metrics = resp.read().decode()
    assert re.search(r'^pgveil_masked_statements_total\{decision="refuse"\} [1-9]', metrics, re.M)

    # the demo rules cover every personal column; what check flags is not personal
    check = subprocess.run(
        [sys.executable, "-m", "proxy.cli", "rules", "check", "--rules",
         str(workdir / "rules.yaml"), "--dsn", direct.group(1)],
        cwd=ROOT, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert check.returncode == 0, check.stdout + check.stderr
    warnings = re.findall(r"^warning: (\S+): looks like", check.stdout, re.M)
    assert sorted(warnings) == [
        "billing.customer_classes.name",  # 'Residential': a class, not a person
        "billing.vendors.companyname",  # carriers are companies
        "billing.vendors.name",
    ], check.stdout
    assert "0 error(s)" in check.stdout

    # the printed erasure command erases the customers that are due, and only them
    erase = re.search(
        r'^    pgveil erase run --once --config (\S+) --dsn "([^"]+)"$', "".join(demo.out), re.M
    )
    assert erase, "".join(demo.out)
    done = subprocess.run(
        [sys.executable, "-m", "proxy.cli", "erase", "run", "--once",
         "--config", erase.group(1), "--dsn", erase.group(2)],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    erased = rows(
        demo, admin, "SELECT i_customer FROM billing.customers WHERE name = '[erased]' ORDER BY 1"
    )
    assert len(erased) == 2
    assert rows(
        demo, admin, f"SELECT count(*) FROM billing.xdrs x JOIN billing.accounts a USING "
        f"(i_account) WHERE a.i_customer = {erased[0]} AND (x.cli IS NOT NULL"
        " OR x.account_id IS NOT NULL)"
    ) == ["0"]  # fmt: skip
    erasure_audit = Path(demo.field("erasure audit"))
    assert verify_files([erasure_audit])[1] is None
    # who touched that customer: the helpdesk's reads (subjects not returned: possibly)
    # and the erasure
    who = subprocess.run(
        [sys.executable, "-m", "proxy.cli", "audit", "who", "--table", "billing.customers",
         "--subject", erased[0], "--file", str(audit), "--file", str(erasure_audit), "--json"],
        cwd=ROOT, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert who.returncode == 0, who.stderr
    touched = {(r["role"], r["touched"]) for r in map(json.loads, who.stdout.splitlines())}
    assert ("helpdesk", "possibly") in touched and (None, "erased") in touched

    # Ctrl-C stops the proxy and PostgreSQL and removes the directory
    assert demo.interrupt() == 0, demo.stderr()
    assert not workdir.exists()
    assert closed(pg_port) and closed(proxy_port)
    err = demo.stderr()
    assert "Traceback" not in err and f"removed {workdir}" in err
    # nothing personal in what pgveil printed or logged
    assert "Customer 0" not in err and "example.invalid" not in err


def _tour() -> str:
    readme = (ROOT / "README.md").read_text()
    return readme.split("## Five-minute tour", 1)[1].split("\n## ", 1)[0]


def _blocks(text: str) -> list[list[str]]:
    return [b.split("\n")[1:] for b in text.split("```")[1::2]]


def _statement(block: list[str]) -> str:
    """The statement typed at the prompt, sent as interactive psql sends it (no ';')."""
    (sql,) = [line[len(PROMPT) :] for line in block if line.startswith(PROMPT) and "--" not in line]
    return sql.rstrip(";")


def test_readme_tour_is_what_the_demo_does(reader_demo: Demo) -> None:
    """The tour's outputs and numbers are those of the demo a reader runs (only
    passwords, times and the directory name are elided)."""
    demo = reader_demo
    demo.ready(timeout=600)
    tour = _tour()
    # what it loads, that it says how long that took, and how many customers are due
    loading = re.search(
        r"Loading ([\d,]+) customers\s+and ([\d,]+) xDRs takes about \d+ seconds on a 2-core"
        r"\s+machine; the demo prints how long it\s+took",
        tour,
    )
    assert loading, "the tour's loading sentence"
    err = demo.stderr()
    assert f"loading {loading.group(1)} customers, " in err, err
    assert f" and {loading.group(2)} xDRs (--scale 1)" in err, err
    assert re.search(r"^pgveil demo: loaded in \d+\.\d s$", err, re.M), err
    due = re.search(r"\*\*An erasure\.\*\* ([\d,]+) customers, 40 and 60 among them", tour)
    assert due, "the tour's erasure sentence"
    assert re.search(rf"erasure:\s+{due.group(1)} terminated customer", "".join(demo.out))
    uris = {"admin": demo.uri("admin"), "helpdesk": demo.uri("helpdesk")}
    blocks = _blocks(tour)
    for role, uri in uris.items():
        assert f'psql "postgresql://{role}:…@127.0.0.1:' in tour
        (block,) = [b for b in blocks if f"{PROMPT}-- as {role}" in b]
        r = subprocess.run(
            [demo.psql(), uri, "-X", "-c", _statement(block)],
            capture_output=True, text=True, timeout=30,
        )  # fmt: skip
        assert r.returncode == 0, r.stderr
        shown = [line for line in block if line and not line.startswith(PROMPT)]
        assert [line.rstrip() for line in r.stdout.splitlines() if line] == shown
    # predicates see masked values
    like = re.search(r"`(SELECT count\(\*\) FROM billing\.customers WHERE [^`]+)`", tour)
    counts = re.search(r"counts\s+(\d+) \(admin: (\d+)\)", tour)
    assert like and counts
    assert rows(demo, uris["helpdesk"], like.group(1)) == [counts.group(1)]
    assert rows(demo, uris["admin"], like.group(1)) == [counts.group(2)]
    # a deny column read: NULL
    (block,) = [
        b for b in blocks if any(x.startswith(PROMPT) and "password_hash FROM" in x for x in b)
    ]
    r = subprocess.run(
        [demo.psql(), uris["helpdesk"], "-X", "-c", _statement(block)],
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    shown = [line for line in block if line and not line.startswith(PROMPT)]
    assert [line.rstrip() for line in r.stdout.splitlines() if line] == shown
    # the refused statements (a value written into a deny column; query_to_xml) and their
    # messages
    refused = [b for b in blocks if any(line.startswith("ERROR:") for line in b)]
    assert len(refused) == 2
    for block in refused:
        r = subprocess.run(
            [demo.psql(), uris["helpdesk"], "-X", "-c", _statement(block)],
            capture_output=True, text=True, timeout=30,
        )  # fmt: skip
        assert r.returncode == 1
        assert r.stderr.splitlines()[0] in block
    # the audit lines and the deny read's event
    audit = Path(demo.field("audit stream"))
    deadline = time.monotonic() + 60
    while not any(e["type"] == "refused" for e in all_events(audit)):
        assert time.monotonic() < deadline
        time.sleep(0.1)
    tail = subprocess.run(
        [sys.executable, "-m", "proxy.cli", "audit", "tail", str(audit), "--role", "helpdesk"],
        cwd=ROOT, capture_output=True, text=True, timeout=30,
    ).stdout.splitlines()  # fmt: skip
    (tail_block,) = [b for b in blocks if any("pgveil audit tail" in line for line in b)]
    for line in tail_block[1:]:
        if line:
            assert line.startswith("…  ")
            assert any(t.endswith(line[1:]) for t in tail), (line, tail)
    (event_block,) = [b for b in blocks if b and b[0] == "{"]
    shown_event = json.loads("\n".join(event_block))
    (event,) = [
        e
        for e in all_events(audit)
        if e["type"] == "access" and e["statement"] == shown_event["statement"]
    ]
    for key, value in shown_event.items():
        if key in ("prev", "hash"):
            assert isinstance(event[key], str) and len(event[key]) == 64
        else:
            assert event[key] == value, key
    # who touched customer 40: the helpdesk's lookup, with its subject
    (lookup,) = [b for b in blocks if any("WHERE i_customer = 40" in line for line in b)]
    assert rows(demo, uris["helpdesk"], _statement(lookup))
    while not any(
        "40" in (e.get("subjects") or {}).get("billing.customers", []) for e in all_events(audit)
    ):
        assert time.monotonic() < deadline + 10
        time.sleep(0.1)
    (who_block,) = [b for b in blocks if b and b[0].startswith("$ pgveil audit who")]
    who = subprocess.run(
        [sys.executable, "-m", "proxy.cli", "audit", "who", "--table", "billing.customers",
         "--subject", "40", "--file", str(audit), "--format", "table"],
        cwd=ROOT, capture_output=True, text=True, timeout=30,
    ).stdout.splitlines()  # fmt: skip
    assert who[0].split() == who_block[1].split()  # the header (widths follow the rows)
    shown = who_block[2].split()[1:]  # after the elided time
    assert any(
        len(got := line.split()[1:]) == len(shown)
        and all(
            s == g or (s.endswith("…") and g.startswith(s[:-1]))
            for s, g in zip(shown, got, strict=True)
        )
        for line in who[1:]
    ), (shown, who)
    # the erasure, with the command the demo printed
    (erase_block,) = [b for b in blocks if b and b[0].startswith("$ pgveil erase run")]
    printed = re.search(
        r'^    pgveil erase run --once --config (\S+) --dsn "([^"]+)"$', "".join(demo.out), re.M
    )
    assert printed
    done = subprocess.run(
        [sys.executable, "-m", "proxy.cli", "erase", "run", "--once", "--config",
         printed.group(1), "--dsn", printed.group(2)],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    # (the run's duration, the summary's last field, differs from run to run)
    took = re.compile(r"; [0-9dhms ]+$")
    assert done.returncode == 0, done.stdout
    assert [took.sub("", line) for line in done.stdout.splitlines()] == [
        took.sub("", erase_block[1])
    ], done.stdout
    assert rows(
        demo, uris["admin"], "SELECT name, email IS NULL FROM billing.customers "
        "WHERE i_customer IN (40, 60) ORDER BY 1"
    ) == ["[erased]|t", "[erased]|t"]  # fmt: skip
    assert demo.interrupt() == 0


def _cluster() -> EmbeddedPostgres:
    return EmbeddedPostgres().start()


def _uri(pg: EmbeddedPostgres, db: str) -> str:
    return f"postgresql://postgres:{pg.password}@127.0.0.1:{pg.port}/{db}?sslmode=disable"


def _fails(*args: str) -> str:
    """Run a demo that must refuse to start; its standard error."""
    d = Demo(*args)
    try:
        assert d.wait() == 1
        return d.stderr()
    finally:
        d.close()


def test_demo_on_an_existing_database_touches_only_its_own() -> None:
    pg = _cluster()
    try:
        pg.psql("CREATE DATABASE shop")
        pg.psql("CREATE SCHEMA billing; CREATE TABLE billing.mine (v int)", dbname="shop")
        err = _fails("--dsn", _uri(pg, "shop"))
        assert "schema billing already exists in database shop and was not created" in err

        pg.psql("CREATE ROLE admin")
        assert "role(s) admin already exist" in _fails("--dsn", _uri(pg, "postgres"))
        pg.psql("DROP ROLE admin")

        # a kept demo schema ...
        d = Demo("--dsn", _uri(pg, "postgres"), "--scale", "0.001", "--keep")
        try:
            d.ready()
            assert len(rows(d, d.uri("helpdesk"), CUSTOMERS)) == 3
            assert d.interrupt(signal.SIGTERM) == 0, d.stderr()
            kept = re.search(r"kept (\S+) and schema billing: run again with --reuse", d.stderr())
            assert kept, d.stderr()
            assert (Path(kept.group(1)) / "audit.jsonl").is_file()
            shutil.rmtree(kept.group(1))
        finally:
            d.close()
        assert pg.psql("SELECT count(*) FROM billing.customers").strip() == "40"
        # ... is not loaded over without --reuse, and is reused with it
        assert "add --reuse" in _fails("--dsn", _uri(pg, "postgres"))
        d = Demo("--dsn", _uri(pg, "postgres"), "--reuse")
        try:
            d.ready()
            assert "loading" not in d.stderr()
            assert rows(d, d.uri("helpdesk"), CUSTOMERS)[0].startswith("C*************1|")
            assert rows(d, d.uri("admin"), CUSTOMERS)[0].startswith("Customer 000001|")
            assert d.interrupt() == 0, d.stderr()
        finally:
            d.close()
        # without --keep, the demo's schema and roles are gone; the user's are not
        assert pg.psql("SELECT count(*) FROM pg_namespace WHERE nspname = 'billing'") == "0\n"
        roles = "SELECT count(*) FROM pg_roles WHERE rolname IN ('admin', 'helpdesk', 'pgveil')"
        assert pg.psql(roles) == "0\n"
        assert pg.psql("SELECT count(*) FROM billing.mine", dbname="shop") == "0\n"
    finally:
        pg.cleanup()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--scale", "0"], "--scale: expected a number above 0"),
        (["--reuse"], "--reuse needs --dsn"),
        (["--dsn", "host=a,b"], "the demo uses one server"),
        (["--dsn", "nonsense"], "expected key=value pairs or a URI"),
        (["--listen", "nowhere"], "--listen: expected HOST:PORT"),
    ],
)
def test_demo_usage_errors(args: list[str], message: str) -> None:
    r = subprocess.run(
        [sys.executable, "-m", "proxy.cli", "demo", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert r.returncode == 2 and r.stderr.startswith("pgveil: error:"), r.stderr
    assert message in r.stderr and len(r.stderr.strip().splitlines()) == 1
