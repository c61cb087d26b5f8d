"""The audit chain against a real proxy writing real files (and a real table sink): what
an insider with write access to them can remove, and what `pgveil audit verify` then says;
a file cut while pgveil is down is not resumed silently, but recorded as a gap."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

from audit.files import read_numbered, rotated_files
from proxy.demo.embedded_pg import EmbeddedPostgres
from tests.audit_tamper import drop_lines, events, rebuild
from tests.integration.audit_wire import audit_env, rules_file, wait_for
from tests.integration.masking_fixture import ADMIN, ADMIN_PW, HELPDESK, HELPDESK_PW, dsn
from tests.support import ProxyProcess

AUDIT_KEY = "integration-audit-key-0123456789abcdef"
KEY_ENV = "PGVEIL_TEST_AUDIT_KEY"
PERSONAL = "SELECT i_customer, name FROM billing.customers WHERE i_customer = %s"


def start(
    pg: EmbeddedPostgres, d: Path, *extra: str, env: dict[str, str] | None = None
) -> ProxyProcess:
    return ProxyProcess(
        pg.port, "--upstream-sslmode", "disable", "--rules", str(rules_file(d)),
        "--catalog-user", pg.superuser, "--audit-file", str(d / "audit.jsonl"),
        "--audit-key", f"env:{KEY_ENV}", "--audit-checkpoint-every", "5",
        "--log-level", "info", *extra,
        env={**audit_env(pg), KEY_ENV: AUDIT_KEY, **(env or {})},
    )  # fmt: skip


def work(pg: EmbeddedPostgres, p: ProxyProcess, statements: int) -> None:
    """Statements on personal data by a masked and an unmasked role: access events."""
    with (
        psycopg.connect(dsn(pg, p.port, ADMIN, ADMIN_PW), autocommit=True) as admin,
        psycopg.connect(dsn(pg, p.port, HELPDESK, HELPDESK_PW), autocommit=True) as helpdesk,
    ):
        for i in range(statements):
            (admin if i % 2 else helpdesk).execute(PERSONAL, [i % 3 + 1]).fetchall()


def verify(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "proxy.cli", "audit", "verify", "--key", f"env:{KEY_ENV}", *args],
        capture_output=True,
        text=True,
        timeout=120,
        env={"PATH": "/usr/bin:/bin", KEY_ENV: AUDIT_KEY, **(env or {})},
    )


def files_of(d: Path) -> list[str]:
    return [str(p) for p in rotated_files(d / "audit.jsonl")]


def anchored(d: Path) -> tuple[str, str]:
    return ("--anchor", str(d / "audit.jsonl.anchor"))


@pytest.fixture(scope="module")
def written(
    pg: EmbeddedPostgres, billing: ProxyProcess, tmp_path_factory: pytest.TempPathFactory
) -> Path:
    """A real audit stream: two runs of the proxy (a restart in between), rotated every
    few kilobytes, checkpoints every 5 events, stopped cleanly."""
    d = tmp_path_factory.mktemp("chain")
    for _run in range(2):
        p = start(pg, d, "--audit-rotate-size", "6KB")
        try:
            work(pg, p, 20)
        finally:
            assert p.stop() == 0
        assert "Traceback" not in p.log(), p.log()
    assert len(rotated_files(d / "audit.jsonl")) >= 3
    return d


def copy(written: Path, tmp_path: Path) -> Path:
    d = tmp_path / "copy"
    shutil.copytree(written, d)
    return d


def test_the_untouched_stream_is_intact(written: Path) -> None:
    evs = [e for f in files_of(written) for e in events(Path(f))]
    assert [e["seq"] for e in evs] == list(range(1, len(evs) + 1))
    reasons = [e["reason"] for e in evs if e["type"] == "audit.checkpoint"]
    assert {"count", "rotation", "shutdown", "start"} <= set(reasons), reasons
    assert reasons[-1] == "shutdown"
    r = verify(*files_of(written), *anchored(written))
    assert r.returncode == 0 and r.stdout.startswith("intact: "), r.stdout
    assert f"anchored head: seq {evs[-1]['seq']}" in r.stdout
    # given in any order
    r = verify(*reversed(files_of(written)), *anchored(written))
    assert r.returncode == 0, r.stdout
    # no anchor, no key: nothing proves the end, nor tells a rebuilt chain: not "intact"
    r = verify(*files_of(written))
    assert r.returncode == 3 and r.stdout.startswith("UNPROVEN: ") and "--anchor" in r.stdout
    r = verify(
        *files_of(written), *anchored(written), env={KEY_ENV: "another-key-of-32-bytes-or-more-000"}
    )
    assert r.returncode == 3 and "not given" in r.stdout, r.stdout


def test_first_events_removed(written: Path, tmp_path: Path) -> None:
    d = copy(written, tmp_path)
    drop_lines(Path(files_of(d)[0]), 0, 4)
    r = verify(*files_of(d), *anchored(d))
    assert r.returncode == 1, r.stdout
    assert r.stdout.startswith("BROKEN: begins after a gap") and "4 event(s) (seq 1..4)" in r.stdout


def test_last_events_removed(written: Path, tmp_path: Path) -> None:
    d = copy(written, tmp_path)
    drop_lines(d / "audit.jsonl", -3)
    r = verify(*files_of(d), *anchored(d))
    assert r.returncode == 1 and r.stdout.startswith("BROKEN: truncated after anchor"), r.stdout
    assert "at least 3 event(s) removed from the end" in r.stdout


def test_oldest_rotated_file_removed(written: Path, tmp_path: Path) -> None:
    d = copy(written, tmp_path)
    oldest = Path(files_of(d)[0])
    removed = events(oldest)
    oldest.unlink()
    r = verify(*files_of(d), *anchored(d))
    assert r.returncode == 1 and r.stdout.startswith("BROKEN: begins after a gap"), r.stdout
    assert f"{len(removed)} event(s) (seq 1..{len(removed)})" in r.stdout
    # removed on purpose (retention): the auditor names the last hash it held
    r = verify(*files_of(d), *anchored(d), "--after", removed[-1]["hash"])
    assert r.returncode == 0, r.stdout


def test_an_event_removed_and_the_chain_rebuilt(written: Path, tmp_path: Path) -> None:
    """The insider's script removes one access event and recomputes every `prev`, `hash`
    and `seq` after it, in every file: every link holds again, but the checkpoints'
    seals cannot be recomputed without the key."""
    d = copy(written, tmp_path)
    paths = [Path(f) for f in files_of(d)]
    victim = next(e for e in events(paths[0]) if e["type"] == "access" and e["seq"] > 2)
    rebuild(paths, drop=victim["seq"])
    r = verify(*files_of(d))  # even without the anchor file
    assert r.returncode == 1 and r.stdout.startswith("BROKEN: re-hashed"), r.stdout
    assert "seal does not verify" in r.stdout
    # and with the checkpoints removed too, the anchors and the cadence still show it
    d2 = copy(written, tmp_path / "2")
    paths = [Path(f) for f in files_of(d2)]
    rebuild(paths, drop=victim["seq"], drop_checkpoints=True)
    r = verify(*files_of(d2), *anchored(d2))
    assert r.returncode == 1 and "re-hashed" in r.stdout, r.stdout


def test_a_cut_file_is_not_resumed_silently(
    pg: EmbeddedPostgres, billing: ProxyProcess, tmp_path: Path
) -> None:
    """pgveil is stopped, its file cut by 4 events (the anchor file untouched); at the
    next start it records a gap, serves on, and verify names the hole."""
    p = start(pg, tmp_path)
    try:
        work(pg, p, 8)
    finally:
        p.stop()
    path = tmp_path / "audit.jsonl"
    before = events(path)
    drop_lines(path, -4)
    p = start(pg, tmp_path)
    try:
        work(pg, p, 2)  # it keeps serving, and recording
        wait_for(lambda: "audit.gap" in p.log(), "the gap in the log")
    finally:
        p.stop()
    gaps = [e for e in events(path) if e["type"] == "audit.gap"]
    assert len(gaps) == 1
    gap = gaps[0]
    assert gap["seq"] == before[-1]["seq"] + 1 and gap["prev"] == before[-1]["hash"]
    assert gap["expected"]["seq"] == before[-1]["seq"]
    assert gap["found"]["audit file"]["seq"] == before[-5]["seq"]
    assert set(gap) >= {"mac", "key", "chain"} and "subjects" not in json.dumps(gap)
    log_line = next(json.loads(x) for x in p.log().splitlines() if '"audit.gap"' in x)
    assert log_line["level"] == "error" and AUDIT_KEY not in p.log()
    r = verify(str(path), *anchored(tmp_path))
    assert r.returncode == 1 and r.stdout.startswith("BROKEN: recorded gap"), r.stdout
    lost = f"seq {before[-4]['seq']}..{before[-1]['seq']} (4 event(s)) missing"
    assert lost in r.stdout
    after = [e for e in events(path) if e["seq"] > gap["seq"]]
    assert [e["type"] for e in after if e["type"] == "access"] == ["access", "access"]


def test_proxy_refuses_a_key_given_inline(pg: EmbeddedPostgres, tmp_path: Path) -> None:
    r = subprocess.run(
        [sys.executable, "-m", "proxy.cli", "proxy", "--upstream-sslmode", "disable",
         "--audit-file", str(tmp_path / "a.jsonl"), "--audit-key", AUDIT_KEY,
         "--upstream", f"127.0.0.1:{pg.port}"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert r.returncode == 2 and "never given inline" in r.stderr
    assert AUDIT_KEY not in r.stderr + r.stdout
    assert not (tmp_path / "a.jsonl").exists()


def test_without_a_key_pgveil_says_so(
    pg: EmbeddedPostgres, billing: ProxyProcess, tmp_path: Path
) -> None:
    with ProxyProcess(
        pg.port, "--upstream-sslmode", "disable", "--audit-file", str(tmp_path / "a.jsonl"),
        "--log-level", "warning", metrics=False,
    ) as p:  # fmt: skip
        wait_for(lambda: "audit.unsealed" in p.log(), "the warning")
    line = next(json.loads(x) for x in p.log().splitlines() if "audit.unsealed" in x)
    assert line["level"] == "warning" and "--audit-key" in line["detail"]


# ---- the table sink -------------------------------------------------------------------


@pytest.fixture(scope="module")
def sinkdb() -> Iterator[EmbeddedPostgres]:
    """A second cluster holds the audit table, as in production."""
    cluster = EmbeddedPostgres().start()
    try:
        yield cluster
    finally:
        cluster.cleanup()


def table_rows(sinkdb: EmbeddedPostgres, chain: str) -> list[dict[str, Any]]:
    out = sinkdb.psql(f"SELECT line FROM pgveil.audit_events WHERE chain = '{chain}' ORDER BY seq")
    return [json.loads(x) for x in out.splitlines() if x.strip()]


def clone_chain(sinkdb: EmbeddedPostgres, source: str, target: str) -> None:
    sinkdb.psql(
        "INSERT INTO pgveil.audit_events (ts, id, chain, type, event, line) "
        f"SELECT ts, id, '{target}', type, event, line FROM pgveil.audit_events "
        f"WHERE chain = '{source}' ORDER BY seq"
    )


def test_table_sink_chain_shows_deletions_and_restart_gaps(
    pg: EmbeddedPostgres, billing: ProxyProcess, sinkdb: EmbeddedPostgres, tmp_path: Path
) -> None:
    table = {"PGVEIL_AUDIT_TABLE_DSN": sinkdb.dsn()}
    p = start(pg, tmp_path, "--audit-chain", "inst-1", env=table)
    try:
        work(pg, p, 12)
        wait_for(lambda: p.metric("pgveil_audit_queue_depth") == 0, "the table sink")
    finally:
        p.stop()
    rows = table_rows(sinkdb, "inst-1")
    assert rows == [e for f in files_of(tmp_path) for e in events(Path(f))]  # one chain
    dsn_args = ("--dsn", sinkdb.dsn())
    r = verify(*dsn_args, "--chain", "inst-1", *anchored(tmp_path))
    assert (
        r.returncode == 0 and r.stdout.startswith("intact: ") and "table chain inst-1" in r.stdout
    ), r.stdout
    r = verify(*dsn_args, "--chain", "inst-1")
    assert r.returncode == 3, r.stdout  # the table alone does not anchor its own end
    # the table anchors the file, the file's anchor the table
    r = verify(*files_of(tmp_path), *dsn_args)
    assert r.returncode == 0 and "table chain inst-1 row" in r.stdout, r.stdout

    # first rows removed
    clone_chain(sinkdb, "inst-1", "start-cut")
    sinkdb.psql(
        "DELETE FROM pgveil.audit_events WHERE chain = 'start-cut' AND seq IN "
        "(SELECT seq FROM pgveil.audit_events WHERE chain = 'start-cut' ORDER BY seq LIMIT 3)"
    )
    r = verify(*dsn_args, "--chain", "start-cut", *anchored(tmp_path))
    assert r.returncode == 1 and "begins after a gap" in r.stdout, r.stdout
    # last rows removed
    clone_chain(sinkdb, "inst-1", "end-cut")
    sinkdb.psql(
        "DELETE FROM pgveil.audit_events WHERE chain = 'end-cut' AND seq IN "
        "(SELECT seq FROM pgveil.audit_events WHERE chain = 'end-cut' ORDER BY seq DESC LIMIT 2)"
    )
    r = verify(*dsn_args, "--chain", "end-cut", *anchored(tmp_path))
    assert r.returncode == 1 and "truncated after anchor" in r.stdout, r.stdout
    # a row removed and the rest rebuilt, rewritten in place
    clone_chain(sinkdb, "inst-1", "rebuilt")
    chain_file = tmp_path / "rebuilt.jsonl"
    chain_file.write_text("".join(json.dumps(e) + "\n" for e in rows))
    victim = next(e for e in rows if e["type"] == "access" and e["seq"] > 2)
    rebuild([chain_file], drop=victim["seq"])
    rebuilt = [e for _n, e in read_numbered(chain_file) if e is not None]
    sinkdb.psql("DELETE FROM pgveil.audit_events WHERE chain = 'rebuilt'")
    values = ",".join(
        "(now(), '{}', 'rebuilt', '{}', $j${}$j$::jsonb, $j${}$j$)".format(
            e["id"], e["type"], json.dumps(e), json.dumps(e)
        )
        for e in rebuilt
    )
    sinkdb.psql(
        f"INSERT INTO pgveil.audit_events (ts, id, chain, type, event, line) VALUES {values}"
    )
    r = verify(*dsn_args, "--chain", "rebuilt")
    assert r.returncode == 1 and r.stdout.startswith("BROKEN: re-hashed"), r.stdout

    # the table loses its last rows while pgveil is down: the restart records the gap
    sinkdb.psql(
        "DELETE FROM pgveil.audit_events WHERE chain = 'inst-1' AND seq IN "
        "(SELECT seq FROM pgveil.audit_events WHERE chain = 'inst-1' ORDER BY seq DESC LIMIT 2)"
    )
    p = start(pg, tmp_path, "--audit-chain", "inst-1", env=table)
    try:
        work(pg, p, 1)
        wait_for(lambda: p.metric("pgveil_audit_queue_depth") == 0, "the table sink")
    finally:
        p.stop()
    (gap,) = [e for e in table_rows(sinkdb, "inst-1") if e["type"] == "audit.gap"]
    assert set(gap["found"]) == {"table sink"} and gap["expected"]["from"] != "table sink"
    r = verify(*dsn_args, "--chain", "inst-1", *anchored(tmp_path))
    assert r.returncode == 1 and r.stdout.startswith("BROKEN: recorded gap"), r.stdout
    # the file kept every event: there the gap is a note, and the file is intact
    r = verify(*files_of(tmp_path), *anchored(tmp_path))
    assert r.returncode == 0 and "pgveil recorded at restart" in r.stdout, r.stdout
