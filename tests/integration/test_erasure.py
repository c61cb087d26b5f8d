"""The erasure worker on a real PostgreSQL with generated billing data (see
erasure_fixture.py): due-ness and retention with an injected time, a pg_dump afterwards,
dry runs, erasure on request, kill -9 at random points and resume, two workers at once,
a partitioned xDR table, lock timeouts, verification failures and bad configurations.
Everything runs through the `pgveil erase` command line, as operators run it."""

from __future__ import annotations

import json
import random
import re
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from audit.files import verify_files
from proxy.demo.embedded_pg import EmbeddedPostgres, free_port
from tests.integration.audit_wire import all_events
from tests.integration.erasure_fixture import (
    ROOT,
    T0,
    Db,
    at,
    config_yaml,
    create,
    drop,
    due,
    dump_rows,
    erase,
    erase_on_terminal,
    marker,
    personal_values,
    rows_by_owner,
    spawn,
)
from tests.support import spawn_listening

CUSTOMERS = 40
XDRS_PER_ACCOUNT = 30
TERMINATED = [c for c in range(1, CUSTOMERS + 1) if c % 4 == 0]

SLOW = """
CREATE FUNCTION billing.slow() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN PERFORM pg_sleep(0.003); RETURN CASE WHEN TG_OP = 'DELETE' THEN OLD ELSE NEW END; END $$;
CREATE TRIGGER slow BEFORE UPDATE ON billing.xdrs FOR EACH ROW EXECUTE FUNCTION billing.slow();
CREATE TRIGGER slow BEFORE DELETE ON billing.call_recordings
    FOR EACH ROW EXECUTE FUNCTION billing.slow();
CREATE TRIGGER slow BEFORE UPDATE ON billing.accounts
    FOR EACH ROW EXECUTE FUNCTION billing.slow();
"""


@pytest.fixture(scope="module")
def base(pg: EmbeddedPostgres) -> Iterator[Db]:
    db = create(pg, "erasure_base", CUSTOMERS, XDRS_PER_ACCOUNT)
    yield db
    drop(pg, db.name)


@pytest.fixture
def db(base: Db, request: pytest.FixtureRequest) -> Iterator[Db]:
    copy = base.copy(f"erasure_{request.node.name[5:40].lower()}")
    yield copy
    drop(copy.pg, copy.name)


def write_config(tmp_path: Path, name: str = "erasure.yaml", **worker: object) -> tuple[Path, Path]:
    audit = tmp_path / f"{name}.audit.jsonl"
    path = tmp_path / name
    path.write_text(config_yaml(audit, **worker))
    return path, audit


def jobs(db: Db) -> dict[str, tuple[str, dict[str, int]]]:
    return {
        str(k): (str(s), dict(r))  # type: ignore[call-overload]
        for k, s, r in db.query("SELECT subject_key, state, rows FROM pgveil.erasure_job")
    }


def events(audit: Path) -> list[dict[str, object]]:
    return all_events(audit)  # complete lines: a worker may be writing


def erased_subjects(db: Db) -> set[int]:
    """Customers whose name is the placeholder."""
    return {
        int(str(r[0]))
        for r in db.query("SELECT i_customer FROM billing.customers WHERE name = '[erased]'")
    }


def assert_only_these_changed(before: str, after: str, erased: set[int]) -> None:
    """Other customers' rows are byte-identical in the dumps; the erased customers' rows
    stay (except deleted recordings) and no longer hold their marker."""
    b, a = rows_by_owner(before), rows_by_owner(after)
    for key in set(b) | set(a):
        table, owner = key
        if owner not in erased:
            assert b.get(key) == a.get(key), f"{table} rows of customer {owner} changed"
            continue
        if table == "billing.call_recordings":
            assert key not in a, f"recordings of customer {owner} remain"
            continue
        assert sum(b[key].values()) == sum(a[key].values()), f"{table} lost rows of {owner}"
        assert not any(marker(owner) in line for line in a[key]), (table, owner)


def billing_rows(dump: str) -> dict[str, list[str]]:
    return {t: rows for t, rows in dump_rows(dump).items() if t.startswith("billing.")}


def xdr_totals(db: Db) -> tuple[object, ...]:
    return db.query("SELECT count(*), sum(charged) FROM billing.xdrs")[0]


def test_immediate_and_retention_delayed_erasure(db: Db, tmp_path: Path) -> None:
    config, audit = write_config(tmp_path)
    dump0 = db.dump()
    totals = xdr_totals(db)
    values = personal_values(db, TERMINATED)
    args = ("--config", str(config), "--dsn", db.dsn)
    expected_total: set[int] = set()
    printed = ""
    for days in (-1, 1, 8, 29, 30):
        r = erase("run", "--once", *args, "--now", at(days))
        assert r.returncode == 0, r.stdout + r.stderr
        printed += r.stdout + r.stderr
        expected = {c for c in TERMINATED if due(c, days, CUSTOMERS)}
        assert erased_subjects(db) == expected, days
        newly = expected - expected_total
        assert f"{len(newly)} subject(s) queued; {len(newly)} verified, 0 failed" in r.stdout
        expected_total = expected
    assert expected_total == set(TERMINATED)  # immediate, 7-day default, 30-day European
    dump = db.dump()
    assert_only_these_changed(dump0, dump, set(TERMINATED))
    for c, vals in values.items():
        assert vals, c
        for v in vals:
            assert v not in dump, f"a personal value of customer {c} is still in the dump"
    assert xdr_totals(db) == totals
    # every partition of the xDR table was erased, and the rows stayed
    per_partition = db.query(
        "SELECT tableoid::regclass::text, count(*), count(cli) FROM billing.xdrs "
        "WHERE i_account / 10 = ANY(%s) GROUP BY 1 ORDER BY 1",
        TERMINATED,
    )
    assert [(p, c > 0, n) for p, c, n in per_partition] == [  # type: ignore[operator]
        (f"billing.xdrs_2026_0{m}", True, 0) for m in (1, 2, 3)
    ]
    state = jobs(db)
    assert set(state) == {str(c) for c in TERMINATED}
    for c in TERMINATED:
        assert state[str(c)] == (
            "verified",
            {
                "billing.xdrs": 60,
                "billing.call_recordings": 4,
                "billing.accounts": 2,
                "billing.customers": 1,
            },
        )
    ev = events(audit)
    assert sorted(int(str(e["subject"])) for e in ev) == TERMINATED
    assert all(e["type"] == "erasure" and e["verified"] is True for e in ev)
    assert verify_files([audit])[1] is None
    text = audit.read_text() + printed  # what was audited, printed and logged
    assert '"event":"erasure.job.verified"' in printed
    for vals in values.values():
        assert not any(v in text for v in vals)
    # a later run finds nothing to do and changes nothing
    r = erase("run", "--once", *args, "--now", at(400))
    assert r.returncode == 0 and "0 subject(s) queued; 0 verified" in r.stdout
    assert billing_rows(db.dump()) == billing_rows(dump)


def test_dry_run_changes_nothing_and_predicts_the_counts(db: Db, tmp_path: Path) -> None:
    config, audit = write_config(tmp_path)
    args = ("--config", str(config), "--dsn", db.dsn, "--now", at(40))
    before = db.checksums()
    r = erase("run", "--dry-run", *args)
    assert r.returncode == 0, r.stderr
    assert db.checksums() == before
    assert db.query("SELECT to_regnamespace('pgveil') IS NULL") == [(True,)]
    assert not audit.exists()
    # a table: a line per subject, in the key's (numeric) order, a column per table in
    # the configuration's order, a total per subject and a totals line
    header, *lines, totals, last = r.stdout.splitlines()
    tables = ["billing.customers", "billing.accounts", "billing.xdrs", "billing.call_recordings"]
    assert header.split() == ["SUBJECT", "customers", "accounts", "xdrs", "call_recordings",
                              "TOTAL"]  # fmt: skip
    predicted = {}
    for line in lines:
        subject, *counts, total = line.split()
        assert sum(map(int, counts)) == int(total)
        predicted[subject] = dict(zip(tables, map(int, counts), strict=True))
    assert list(predicted) == [str(c) for c in TERMINATED]  # 4, 8, 12, ... not 12, 16, ...
    n = len(TERMINATED)
    assert totals.split() == ["TOTAL", str(n), str(2 * n), str(60 * n), str(4 * n), str(67 * n)]
    assert last == f"dry run: {n} subject(s), {67 * n} row(s); nothing was changed"
    r = erase("subject", "5", "--dry-run", *args)
    assert r.returncode == 0 and db.checksums() == before
    assert r.stdout.splitlines()[1].split() == ["5", "1", "2", "60", "4", "67"]
    r = erase("run", "--once", *args)
    assert r.returncode == 0, r.stderr
    assert {k: rows for k, (_, rows) in jobs(db).items()} == predicted
    # after the erasure, a dry run of an erased subject finds nothing left
    r = erase("subject", str(TERMINATED[0]), "--dry-run", *args)
    assert r.returncode == 0 and "dry run: 1 subject(s), 0 row(s)" in r.stdout


def test_erase_one_subject_on_request(db: Db, tmp_path: Path) -> None:
    config, audit = write_config(tmp_path)
    args = ("--config", str(config), "--dsn", db.dsn)
    before = db.dump()
    values = personal_values(db, [5])[5]
    r = erase("subject", "5", *args)  # not terminated: erased because it was asked
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("subject 5: verified; rows changed: billing.xdrs 60,")
    after = db.dump()
    assert_only_these_changed(before, after, {5})
    assert not any(v in after for v in values)
    assert erased_subjects(db) == {5}
    # again: nothing left to change, verified again, audited again
    r = erase("subject", "5", *args)
    assert r.returncode == 0 and "billing.xdrs 0, billing.call_recordings 0" in r.stdout
    assert [e["subject"] for e in events(audit)] == ["5", "5"]
    assert [e["requested"] for e in events(audit)] == [True, True]
    assert billing_rows(db.dump()) == billing_rows(after)
    r = erase("subject", "99999", *args)
    assert r.returncode == 2
    assert r.stderr == "pgveil: error: no subject 99999 in billing.customers\n"
    r = erase("subject", "abc", *args)
    assert r.returncode == 2
    assert "is not a valid key of billing.customers.i_customer" in r.stderr


def wait_backend(db: Db, present: bool, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        n = db.query(
            "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'pgveil-erasure' "
            "AND datname = current_database()"
        )[0][0]
        if (n > 0) == present:  # type: ignore[operator]
            return
        time.sleep(0.02)
    raise AssertionError(f"the worker's backend is {'absent' if present else 'still there'}")


def in_batch(db: Db) -> bool:
    return bool(
        db.query(
            "SELECT count(*) > 0 FROM pg_stat_activity WHERE application_name = "
            "'pgveil-erasure' AND datname = current_database() AND state = 'active' "
            "AND query LIKE 'WITH b AS%%'"
        )[0][0]
    )


def test_kill_9_at_random_points_then_resume(db: Db, tmp_path: Path) -> None:
    db.execute(SLOW)
    twin = db.copy(db.name + "_twin")
    try:
        config, audit = write_config(tmp_path, "a.yaml", batch_size=20)
        twin_config, twin_audit = write_config(tmp_path, "b.yaml", batch_size=20)
        now = at(40)
        r = erase("run", "--once", "--config", str(twin_config), "--dsn", twin.dsn, "--now", now)
        assert r.returncode == 0, r.stderr
        rng = random.Random(20261125)
        mid_batch = anywhere = 0
        for i in range(8):
            p = spawn("run", "--once", "--config", str(config), "--dsn", db.dsn, "--now", now)
            if i == 0:
                time.sleep(0.05)  # during start-up, before it connects
            else:
                wait_backend(db, present=True)
                time.sleep(rng.uniform(0.0, 0.4))
            # two of three kills aim at a batch: the kill follows the query that saw it
            # running (asking again would let a batch end between the two questions)
            landed = in_batch(db)
            deadline = time.monotonic() + 10
            while i % 3 != 2 and i > 0 and p.poll() is None and not landed:
                assert time.monotonic() < deadline  # (each question is a round trip)
                landed = in_batch(db)
            if p.poll() is not None:
                break  # it finished before the kill
            p.send_signal(signal.SIGKILL)
            if landed:
                mid_batch += 1
            else:
                anywhere += 1
            p.communicate()
            wait_backend(db, present=False)
        states = {s for s, _ in jobs(db).values()}
        assert mid_batch + anywhere == 8 and mid_batch >= 4, (mid_batch, anywhere)
        assert "running" in states and "verified" in states
        r = erase("status", "--config", str(config), "--dsn", db.dsn, "--now", now)
        assert r.returncode == 0 and "interrupted: no worker holds it" in r.stdout
        assert "step 1/2 billing.xdrs" in r.stdout or (
            "step 2/2 billing.call_recordings, billing.accounts, billing.customers" in r.stdout
        ), r.stdout
        r = erase("run", "--once", "--config", str(config), "--dsn", db.dsn, "--now", now)
        assert r.returncode == 0, r.stderr
        # the same end state as the run that was never interrupted
        assert db.checksums() == twin.checksums()
        assert jobs(db) == jobs(twin)
        assert all(s == "verified" for s, _ in jobs(db).values())
        # one audit event per subject, chain intact, despite the kills
        assert sorted(int(str(e["subject"])) for e in events(audit)) == TERMINATED
        assert verify_files([audit])[1] is None
        assert len(events(twin_audit)) == len(TERMINATED)
    finally:
        drop(db.pg, twin.name)


def test_two_workers_at_once_do_each_subject_once(db: Db, tmp_path: Path) -> None:
    db.execute(SLOW)
    config, audit = write_config(tmp_path, batch_size=20)
    args = ("--config", str(config), "--dsn", db.dsn, "--now", at(40))
    procs = [spawn("run", "--once", *args) for _ in range(2)]
    outs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    done = [int(o[0].split(" verified")[0].rsplit(" ", 1)[1]) for o in outs]
    assert sum(done) == len(TERMINATED) and min(done) >= 1, outs  # both worked, no overlap
    rows = db.query("SELECT state, attempts, worker FROM pgveil.erasure_job")
    assert len(rows) == len(TERMINATED)
    assert {(s, a) for s, a, _ in rows} == {("verified", 1)}
    assert len({str(w).rsplit(":", 1)[0] for _, _, w in rows}) == 2  # host:pid
    ev = events(audit)
    assert sorted(int(str(e["subject"])) for e in ev) == TERMINATED
    assert verify_files([audit])[1] is None  # both appended to one chain
    assert erased_subjects(db) == set(TERMINATED)


def test_run_polls_until_stopped_and_survives_a_lost_connection(db: Db, tmp_path: Path) -> None:
    config, _ = write_config(tmp_path, poll_interval="200ms")
    log = tmp_path / "worker.log"
    # started as the proxy is (tests.support.spawn_listening): its metrics port taken by
    # another process meanwhile (a second suite on the machine) means another port, not a
    # worker that died at once while this test waited for its erasures (CI, once)
    p, port = spawn_listening(
        lambda port: [
            sys.executable, "-m", "proxy.cli", "erase", "run", "--config", str(config),
            "--dsn", db.dsn, "--now", at(1), "--metrics", f"127.0.0.1:{port}",
        ],
        log,
        stdout=subprocess.PIPE,
        cwd=ROOT,
    )  # fmt: skip
    # a guard against a hang, not a bound on wall time: on a loaded machine the worker's
    # VACUUM after the first pass and its reconnection can take a while (CI once missed
    # a 30 s deadline here while two suites and a driver suite shared two cores); below
    # pytest-timeout's, so that a miss says which step and what the worker wrote
    deadline = time.monotonic() + 240

    def until(done: Callable[[], bool], what: str) -> None:
        while not done():
            if p.poll() is not None or time.monotonic() > deadline:
                state = "exited" if p.returncode is not None else "still runs"
                pytest.fail(f"{what}: not seen, the worker {state}:\n{log.read_text()}")
            time.sleep(0.1)

    metrics = ""

    def verified() -> bool:
        nonlocal metrics
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
            metrics = r.read().decode()
        return 'pgveil_erasure_subjects_total{state="verified"} 4.0' in metrics

    try:
        until(lambda: len(erased_subjects(db)) >= 3, "the first pass")
        assert erased_subjects(db) == {c for c in TERMINATED if due(c, 1, CUSTOMERS)}
        # the connection is cut (a server restart, a DBA): the worker connects again
        killed = db.query(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
            "WHERE application_name = 'pgveil-erasure' AND datname = current_database()"
        )
        assert killed == [(1,)]
        # and still polls: a newly terminated customer is picked up without a restart
        db.execute(
            f"UPDATE billing.customers SET terminated_at = '{T0.isoformat()}' WHERE i_customer = 3"
        )
        until(lambda: 3 in erased_subjects(db), "the customer terminated after the cut")
        # its progress on /metrics (the last job's outcome may still be on its way)
        until(verified, "4 verified subjects on /metrics")
        assert 'pgveil_erasure_rows_total{table="billing.xdrs"}' in metrics
        assert re.search(r"^pgveil_erasure_batches_total [1-9]", metrics, re.M)
        assert "Customer" not in metrics  # table names and states only
    finally:
        p.send_signal(signal.SIGTERM)
        out, _ = p.communicate(timeout=30)
    err = log.read_text()
    assert p.returncode == 0, err
    assert '"event":"erasure.interrupted"' in err
    assert "4 subject(s) queued; 4 verified" in out.decode()


def test_the_rate_limit_paces_batches(db: Db, tmp_path: Path) -> None:
    config, audit = write_config(tmp_path, batch_size=20, rate_limit=300)
    r = erase("run", "--once", "--config", str(config), "--dsn", db.dsn, "--now", at(1))
    assert r.returncode == 0, r.stderr
    ev = events(audit)
    assert len(ev) == 3
    for e in ev:
        # 60 xDRs in 4 batches at 300 rows/s: at least 0.2 s, however fast the machine
        assert e["rows"]["billing.xdrs"] == 60 and e["batches"] == 4  # type: ignore[index]
        assert e["seconds"]["billing.xdrs"] >= 0.199, e["seconds"]  # type: ignore[index]


def test_lock_timeouts_postpone_instead_of_blocking(db: Db, tmp_path: Path) -> None:
    config, _ = write_config(tmp_path, lock_timeout="100ms", retries=1, max_failures=3)
    args = ("--config", str(config), "--dsn", db.dsn)
    with db.connect() as blocker:
        blocker.autocommit = False
        blocker.execute("SELECT * FROM billing.customers WHERE i_customer = 7 FOR UPDATE")
        r = erase("subject", "7", *args)  # blocked, it would wait for the lock until killed
        assert r.returncode == 1
        assert r.stdout == (
            "subject 7: postponed; rows changed: billing.xdrs 60; VACUUM of 1 table(s)\n"
            "  billing.call_recordings, billing.accounts, billing.customers: "
            "LockNotAvailableError (55P03)\n"
        )
        (state,) = db.query("SELECT state, failures, step FROM pgveil.erasure_job")
        assert state == ("running", 1, 1)  # the xDRs are done, the other tables wait
        blocker.rollback()
    r = erase("subject", "7", *args)
    assert r.returncode == 0 and r.stdout.startswith("subject 7: verified"), r.stdout


def test_a_failed_verification_is_reported(db: Db, tmp_path: Path) -> None:
    # a trigger that silently keeps MAC addresses: the erasure must not claim success
    db.execute(
        "CREATE FUNCTION billing.keep_mac() RETURNS trigger LANGUAGE plpgsql AS $$ "
        "BEGIN NEW.mac := OLD.mac; RETURN NEW; END $$; "
        "CREATE TRIGGER keep_mac BEFORE UPDATE ON billing.accounts "
        "FOR EACH ROW EXECUTE FUNCTION billing.keep_mac()"
    )
    config, audit = write_config(tmp_path)
    args = ("--config", str(config), "--dsn", db.dsn, "--now", at(1))
    r = erase("run", "--once", *args)
    assert r.returncode == 1
    assert "3 subject(s) queued; 0 verified, 3 failed" in r.stdout
    assert "verification failed: billing.accounts.mac: 2 row(s) still hold a value" in r.stdout
    (ev, *_) = events(audit)
    assert ev["verified"] is False and ev["remaining"] == {"billing.accounts.mac": 2}
    r = erase("status", *args)
    counts, title, header, *failed = r.stdout.splitlines()
    assert counts == "jobs: 0 pending, 0 running, 0 done, 0 verified, 3 failed"
    assert title == "oldest failed (3):" and header.split()[:3] == ["SUBJECT", "DUE", "FAILED"]
    assert [line.split()[0] for line in failed] == ["12", "24", "36"]
    assert all(line.endswith("  verification failed (billing.accounts.mac)") for line in failed), (
        failed
    )
    # failed jobs are not retried behind the operator's back
    r = erase("run", "--once", *args)
    assert "0 subject(s) queued; 0 verified, 0 failed" in r.stdout


BAD = [
    (
        "unknown table",
        ("billing.call_recordings:", "billing.recordings:"),
        "at 'tables.billing.recordings': table billing.recordings does not exist",
    ),
    (
        "unknown column",
        ("cld: null", "called: null"),
        "at 'tables.billing.xdrs.columns.called': billing.xdrs has no column called",
    ),
    (
        "relation that does not resolve",
        (
            "owner: {column: i_account, through: billing.accounts}\n    action",
            "owner: {column: recorded_at, through: billing.accounts, key: i_account}\n    action",
        ),
        "billing.call_recordings.recorded_at (timestamp with time zone) cannot refer to "
        "billing.accounts.i_account (bigint)",
    ),
    (
        "missing batch index",
        ("    action: delete", "    action: delete\n    large: true\n    key: recorded_at"),
        "billing.call_recordings is large and erased in batches by (i_account, recorded_at), "
        "but there is no valid btree index",
    ),
    (
        "null on a NOT NULL column",
        ('name: {placeholder: "[erased]"}', "name: null"),
        "billing.customers.name is NOT NULL",
    ),
    (
        "placeholder of the wrong type",
        ("      mac: null", "      mac: {placeholder: none}"),
        "at 'tables.billing.accounts.columns.mac.placeholder': the placeholder is not a valid "
        "macaddr value",
    ),
    ("unknown key", ("    large: true", "    huge: true"), "unknown key 'huge'"),
]


@pytest.mark.parametrize(("name", "change", "message"), BAD, ids=[b[0] for b in BAD])
def test_bad_configurations_are_refused_before_any_change(
    db: Db, tmp_path: Path, name: str, change: tuple[str, str], message: str
) -> None:
    config, audit = write_config(tmp_path)
    text = config.read_text()
    assert change[0] in text
    config.write_text(text.replace(change[0], change[1], 1))
    before = db.checksums()
    for action in (["run", "--once"], ["run", "--dry-run"], ["subject", "4"], ["status"]):
        r = erase(*action, "--config", str(config), "--dsn", db.dsn, "--now", at(40))
        assert r.returncode == 2, (action, r.stdout, r.stderr)
        assert message in r.stderr, r.stderr
        assert all(line.startswith("pgveil: error: ") for line in r.stderr.splitlines())
        assert "Traceback" not in r.stderr
    assert db.checksums() == before
    assert db.query("SELECT to_regnamespace('pgveil') IS NULL") == [(True,)]
    assert not audit.exists()


def test_command_line_mistakes(db: Db, tmp_path: Path) -> None:
    config, _ = write_config(tmp_path)
    r = erase("run", "--config", str(config), "--dsn", db.dsn, "--now", "tomorrow")
    assert r.returncode == 2 and r.stderr.startswith("pgveil: error: --now 'tomorrow'")
    r = erase("run", "--config", str(tmp_path / "none.yaml"))
    assert r.returncode == 2 and "cannot read the erasure configuration" in r.stderr
    r = erase("run", "--config", str(config), "--dsn", "host=127.0.0.1 port=1 user=x")
    assert r.returncode == 2 and r.stderr.startswith("pgveil: error: cannot reach the database")
    r = erase("status", "--config", str(config), "--dsn", db.dsn.replace("user=", "user=x"))
    assert r.returncode == 2
    # one line: who was refused, and the server's reason with its SQLSTATE; no password
    assert r.stderr.startswith("pgveil: error: cannot connect to 127.0.0.1:"), r.stderr
    assert "(28P01); " in r.stderr and len(r.stderr.splitlines()) == 1, r.stderr
    assert "as xpostgres:" in r.stderr and db.pg.password not in r.stderr
    assert "user xpostgres (--dsn); set them with --dsn" in r.stderr, r.stderr
    r = erase("subject", "--config", str(config))
    assert r.returncode == 2 and "the following arguments are required: KEY" in r.stderr


def test_erasure_events_in_the_audit_table_and_who(db: Db, tmp_path: Path) -> None:
    """The erasure audit through the proxy's table sink alone: one chain shared by
    successive worker processes, verified by `pgveil audit verify`, and the erasure shows
    in `pgveil audit who` for its subject."""
    import json
    import subprocess
    import sys

    table = "erasure_audit.events"
    audit_dsn = db.pg.dsn()
    db.pg.psql("DROP SCHEMA IF EXISTS erasure_audit CASCADE")
    text = config_yaml(tmp_path / "unused.jsonl")
    text = text.replace(
        f"  file: {tmp_path / 'unused.jsonl'}\n",
        f"  table: {{dsn: '{audit_dsn}', name: {table}}}\n",
    )
    assert "table:" in text and "unused" not in text
    config = tmp_path / "table.yaml"
    config.write_text(text)
    args = ("--config", str(config), "--dsn", db.dsn)
    for key in ("5", "6", "5"):
        r = erase("subject", key, *args)
        assert r.returncode == 0, r.stderr

    def pgveil(*argv: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "proxy.cli", "audit", *argv, "--dsn", audit_dsn,
             "--audit-table", table],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip

    verified = pgveil("verify")
    # the erasure chain links, but carries no sealed checkpoint: unproven, not broken
    assert verified.returncode == 3, verified.stdout
    assert verified.stdout.startswith("UNPROVEN: 3 event(s), seq 1..3, in table chain erasure")
    who = pgveil("who", "--table", "billing.customers", "--subject", "5", "--json")
    assert who.returncode == 0, who.stderr
    rows = [json.loads(line) for line in who.stdout.splitlines()]
    assert [(r["touched"], r["kinds"]) for r in rows] == [("erased", ["erasure"])] * 2


# -- for people: progress, summary, status, connection errors, VACUUM ------------------------

PER_SUBJECT = {"billing.customers": 1, "billing.accounts": 2, "billing.xdrs": 60,
               "billing.call_recordings": 4}  # fmt: skip


def summary_rows(n: int) -> str:
    """The summary line's rows for `n` subjects of the fixture, by table kind."""
    return (
        f"rows: {n} subject rows anonymised, {2 * n} updated, {4 * n} deleted, "
        f"{60 * n} kept with identifiers nulled (billing.xdrs)"
    )


def test_progress_on_a_terminal_json_logs_elsewhere(db: Db, tmp_path: Path) -> None:
    config, _ = write_config(tmp_path)
    n = len(TERMINATED)
    piped, json_tty = db.copy(db.name + "_p"), db.copy(db.name + "_j")
    try:
        status, terminal, out = erase_on_terminal(
            "run", "--once", "--config", str(config), "--dsn", db.dsn, "--now", at(40)
        )
        assert status == 0, terminal + out
        # a progress line redrawn in place: carriage returns, never a new line, no JSON
        assert "\n" not in terminal and '"event"' not in terminal, terminal
        draws = [d.removesuffix("\x1b[K") for d in terminal.split("\r") if d.startswith("eras")]
        assert draws[0].startswith("erasing [" + "-" * 40 + f"]  0/{n} subjects"), draws
        assert any(f"  {n}/{n} subjects  100%  {67 * n:,} rows  " in d for d in draws), draws
        assert all(" subjects/s " in d and " rows/s  ETA " in d for d in draws), draws
        assert terminal.endswith("\r\x1b[K")  # cleared for the summary
        (line,) = out.splitlines()
        assert line.startswith(
            f"erasure: {n} subject(s) queued; {n} verified, 0 failed, 0 postponed; "
            f"{summary_rows(n)}; VACUUM of 4 table(s); "
        ), line
        # not a terminal: today's JSON lines, which tooling reads, and no progress line
        r = erase("run", "--once", "--config", str(config), "--dsn", piped.dsn, "--now", at(40))
        assert r.returncode == 0, r.stderr
        logged = [json.loads(line) for line in r.stderr.splitlines()]
        assert [e["event"] for e in logged].count("erasure.job.verified") == n
        assert "\r" not in r.stderr and r.stdout.startswith(f"erasure: {n} subject(s) queued")
        # asked for: JSON on a terminal
        status, terminal, out = erase_on_terminal(
            "run", "--once", "--config", str(config), "--dsn", json_tty.dsn, "--now", at(40),
            "--log-format", "json",
        )  # fmt: skip
        assert status == 0 and "\r" not in terminal and "erasing" not in terminal, terminal
        logged = [json.loads(line) for line in terminal.splitlines()]
        assert [e["event"] for e in logged].count("erasure.job.verified") == n
        # and text to a pipe: warnings only (none here), no progress line
        r = erase("run", "--once", "--config", str(config), "--dsn", db.dsn, "--now", at(40),
                  "--log-format", "text")  # fmt: skip
        assert r.returncode == 0 and r.stderr == "", r.stderr
        assert r.stdout.startswith("erasure: 0 subject(s) queued; 0 verified")
        assert "no VACUUM (nothing changed)" in r.stdout
    finally:
        drop(db.pg, piped.name)
        drop(db.pg, json_tty.name)


def test_warnings_are_text_lines_above_the_progress_line(db: Db, tmp_path: Path) -> None:
    # a trigger that keeps MAC addresses: three jobs fail verification, logged as errors
    db.execute(
        "CREATE FUNCTION billing.keep_mac() RETURNS trigger LANGUAGE plpgsql AS $$ "
        "BEGIN NEW.mac := OLD.mac; RETURN NEW; END $$; "
        "CREATE TRIGGER keep_mac BEFORE UPDATE ON billing.accounts "
        "FOR EACH ROW EXECUTE FUNCTION billing.keep_mac()"
    )
    config, _ = write_config(tmp_path)
    status, terminal, out = erase_on_terminal(
        "run", "--once", "--config", str(config), "--dsn", db.dsn, "--now", at(1)
    )
    assert status == 1, terminal
    logged = [line.rsplit("\r", 1)[-1].removeprefix("\x1b[K") for line in terminal.split("\n")]
    logged = logged[:-1]  # (after the last new line: the progress line, then cleared)
    assert len(logged) == 3, terminal
    for line in logged:
        assert re.fullmatch(
            r"\S+ \S+ error   erasure\.job\.failed subject=\d+ error=verification failed: "
            r"billing\.accounts\.mac: 2 row\(s\) still hold a value",
            line,
        ), line
    # each log line began on a cleared line, and the progress line came back after it
    assert terminal.count("\r\x1b[K") >= 4 and "erasing [" in terminal.split("\n")[-1]
    assert out.startswith("erasure: 3 subject(s) queued; 0 verified, 3 failed, 0 postponed;")


def test_status_counts_and_the_oldest_jobs(db: Db, tmp_path: Path) -> None:
    config, _ = write_config(tmp_path)
    args = ("--config", str(config), "--dsn", db.dsn, "--now", at(40))
    r = erase("status", *args)
    assert r.returncode == 0, r.stderr
    counts, title, header, *pending = r.stdout.splitlines()
    n = len(TERMINATED)
    assert counts == (
        f"jobs: {n} pending ({n} due, not queued yet), 0 running, 0 done, 0 verified, 0 failed"
    )
    assert title == f"oldest pending (the oldest 5 of {n}):"
    assert header.split() == ["SUBJECT", "DUE", "WAITING", "ATTEMPTS", "NOTE"]
    # due first: class "immediate" (c % 3 == 0) at T0, then the 7-day default; by key
    assert [line.split()[0] for line in pending] == ["12", "24", "36", "8", "20"]
    assert pending[0].split()[1:] == ["2026-03-01", "00:00:00Z", "40d", "00h", "0", "due,",
                                      "not", "queued", "yet"]  # fmt: skip
    assert pending[3].split()[3:5] == ["33d", "00h"]
    # after a run that keeps MAC addresses: failed jobs, with their error's class only
    db.execute(
        "CREATE FUNCTION billing.keep_mac() RETURNS trigger LANGUAGE plpgsql AS $$ "
        "BEGIN NEW.mac := OLD.mac; RETURN NEW; END $$; "
        "CREATE TRIGGER keep_mac BEFORE UPDATE ON billing.accounts "
        "FOR EACH ROW EXECUTE FUNCTION billing.keep_mac()"
    )
    r = erase("subject", "8", *args)
    assert r.returncode == 1
    db.execute("DROP TRIGGER keep_mac ON billing.accounts")
    r = erase("subject", "4", *args)
    assert r.returncode == 0, r.stderr
    r = erase("status", *args)
    counts, *rest = r.stdout.splitlines()
    assert counts == (
        f"jobs: {n - 2} pending ({n - 2} due, not queued yet), 0 running, 0 done, 1 verified, "
        "1 failed"
    )
    failed = rest[rest.index("oldest failed (1):") + 2 :]
    assert len(failed) == 1 and failed[0].split()[0] == "8", rest
    assert failed[0].endswith("  verification failed (billing.accounts.mac)")
    assert marker(8) not in r.stdout


def test_a_connection_failure_names_the_settings_and_how_to_set_them(
    db: Db, tmp_path: Path
) -> None:
    config, _ = write_config(tmp_path)
    port = free_port()
    env = {"PGHOST": "127.0.0.1", "PGPORT": str(port), "PGUSER": "eraser",
           "PGDATABASE": "billing", "PGPASSWORD": "s3cret-pw"}  # fmt: skip
    r = erase("status", "--config", str(config), env=env)
    assert r.returncode == 2
    assert r.stderr == (
        f"pgveil: error: cannot reach the database at 127.0.0.1:{port} (database billing as "
        f"eraser): Connection refused; settings used: host 127.0.0.1 (PGHOST), port {port} "
        "(PGPORT), dbname billing (PGDATABASE), user eraser (PGUSER); set them with --dsn "
        '"host=HOST port=PORT dbname=DATABASE user=USER" (or a postgresql:// URI) or with '
        "PGHOST, PGPORT, PGDATABASE, PGUSER; the password with PGPASSWORD or ~/.pgpass\n"
    )
    # --dsn wins over the environment, and says so; defaults say what they are
    bare = {k: "" for k in env}
    r = erase("run", "--once", "--config", str(config), "--dsn", f"port={port}", env=bare)
    assert r.returncode == 2 and len(r.stderr.splitlines()) == 1, r.stderr
    assert f"port {port} (--dsn)" in r.stderr
    assert "(default: the local Unix socket)" in r.stderr
    assert "(default: the operating system user)" in r.stderr
    assert "Traceback" not in r.stderr and "s3cret" not in r.stderr


# every page of the billing tables (pageinspect reads them as they are): where `value`'s
# bytes first occur in it (-1: nowhere), its free space (pd_lower..pd_upper), and which of
# its row versions (live or dead) hold the value
PAGES = """
SELECT p.rel, position(convert_to(%s, 'UTF8') IN p.page) - 1,
       (page_header(p.page)).lower, (page_header(p.page)).upper,
       (SELECT count(*) FROM heap_page_items(p.page) AS h
         WHERE position(convert_to(%s, 'UTF8') IN h.t_data) > 0)
  FROM (SELECT c.oid::regclass::text AS rel, get_raw_page(c.oid::regclass::text, b::int) AS page
          FROM pg_class AS c JOIN pg_namespace AS n ON n.oid = c.relnamespace,
               generate_series(0, pg_relation_size(c.oid) / 8192 - 1) AS b
         WHERE n.nspname = 'billing' AND c.relkind = 'r') AS p
"""


def row_versions_holding(db: Db, value: str) -> list[str]:
    """A table per row version (live or dead) that holds `value`. A page that holds it in
    no row version may still hold its bytes, in its free space only (VACUUM frees space, it
    does not zero it)."""
    out = []
    for rel, offset, lower, upper, versions in db.query(PAGES, value, value):
        out += [str(rel)] * int(str(versions))
        if not versions and int(str(offset)) >= 0:
            assert int(str(lower)) <= int(str(offset)) < int(str(upper)), (rel, offset)
    return sorted(out)


def test_vacuum_prunes_the_old_row_versions(db: Db, tmp_path: Path) -> None:
    """After an erasure the old row versions, which hold the erased values, are gone from
    the tables' pages (pageinspect, which reads them as they are): the worker VACUUMs the
    tables it changed. With `vacuum: off` a deleted row's version is still there."""
    db.execute("CREATE EXTENSION IF NOT EXISTS pageinspect")
    off = db.copy(db.name + "_off")
    try:
        assert len(row_versions_holding(db, marker(5))) == 67  # every row of customer 5
        config, _ = write_config(tmp_path, "run.yaml")  # the default: vacuum: run
        r = erase("subject", "5", "--config", str(config), "--dsn", db.dsn)
        assert r.returncode == 0 and r.stdout.splitlines()[0].endswith(
            "billing.customers 1; VACUUM of 4 table(s)"
        ), r.stdout
        assert row_versions_holding(db, marker(5)) == []
        # VACUUM (ANALYZE) ran on the changed tables (the xDRs' partitions), not the others
        stats = db.query(
            "SELECT relname, vacuum_count, analyze_count FROM pg_stat_user_tables "
            "WHERE schemaname = 'billing' ORDER BY 1"
        )
        assert stats == [
            ("accounts", 1, 1), ("call_recordings", 1, 1), ("customer_classes", 0, 0),
            ("customers", 1, 1), ("xdrs", 0, 1), ("xdrs_2026_01", 1, 1),
            ("xdrs_2026_02", 1, 1), ("xdrs_2026_03", 1, 1),
        ]  # fmt: skip
        config, _ = write_config(tmp_path, "off.yaml", vacuum="off")
        r = erase("subject", "5", "--config", str(config), "--dsn", off.dsn)
        assert r.returncode == 0 and r.stdout.splitlines()[0].endswith(
            "; no VACUUM (worker.vacuum: off)"
        ), r.stdout
        assert "billing.call_recordings" in row_versions_holding(off, marker(5))
    finally:
        drop(db.pg, off.name)


def test_vacuum_after_each_job_and_without_the_privilege(db: Db, tmp_path: Path) -> None:
    # vacuum: job: one VACUUM per job, on the tables that job changed
    config, _ = write_config(tmp_path, "job.yaml", vacuum="job")
    args = ("--config", str(config), "--dsn", db.dsn, "--now", at(1))
    r = erase("run", "--once", *args)
    assert r.returncode == 0, r.stderr
    vacuums = [e for e in map(json.loads, r.stderr.splitlines()) if e["event"] == "erasure.vacuum"]
    assert len(vacuums) == 3 and all(len(v["tables"]) == 4 for v in vacuums), vacuums
    assert "; VACUUM of 4 table(s); " in r.stdout, r.stdout
    # a role that may erase but does not own the tables: VACUUM is skipped, and said so
    role = f"{db.name}_eraser"
    db.execute(
        f"DROP ROLE IF EXISTS {role}; CREATE ROLE {role} LOGIN PASSWORD 'pw'; "
        f"GRANT USAGE ON SCHEMA billing TO {role}; "
        f"GRANT SELECT, UPDATE, DELETE ON ALL TABLES IN SCHEMA billing TO {role}; "
        f"GRANT ALL ON SCHEMA pgveil TO {role}; GRANT ALL ON ALL TABLES IN SCHEMA pgveil TO {role}"
    )
    try:
        dsn = f"{db.dsn} user={role} password=pw"
        r = erase("run", "--once", "--config", str(config), "--dsn", dsn, "--now", at(8))
        assert r.returncode == 0, r.stderr
        assert (
            "; VACUUM of 0 table(s), 4 skipped (the role may not vacuum them: owner needed); "
        ) in r.stdout, r.stdout
    finally:
        db.execute(f"DROP OWNED BY {role}; DROP ROLE {role}")
