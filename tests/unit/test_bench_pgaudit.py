"""The pgAudit variant of the audit benchmark (`bench/bench.py`, `--only audit`), in the
parts that need no pgAudit installed (the suite runs where it is not; the bench itself
checks the live server's log after every run): the package name it installs, the arguments,
the rows, the AUDIT-line count on a log as pgAudit writes it through the bench's log
prefix, the refusal to report a run that did not audit, and the audit table with pgAudit's
ratio beside pgveil's."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench import bench

ON, OFF = bench.PGAUDIT_ON_ROLE, bench.PGAUDIT_OFF_ROLE
PREFIX = "2026-12-06 18:19:08.{ms:03d} UTC [{pid}] user={user} "

# lines as the bench's server writes them (log_line_prefix '%m [%p] user=%u '), copied from
# a run: AUDIT lines of both roles, a statement whose text spans lines, the server's own
# lines, and an error whose statement text reads like an AUDIT line
SAMPLE_1 = "\n".join(
    [
        PREFIX.format(ms=1, pid=23844, user="")
        + "LOG:  database system is ready to accept connections",
        PREFIX.format(ms=2, pid=24245, user=ON)
        + 'LOG:  AUDIT: SESSION,1,1,READ,SELECT,,,"SELECT abalance FROM pgbench_accounts '
        'WHERE aid = 7;",<not logged>',
        PREFIX.format(ms=3, pid=24246, user=ON)
        + 'LOG:  AUDIT: SESSION,2,1,READ,SELECT,,,"SELECT i_customer, name\n'
        "FROM billing.customers\n"
        'WHERE i_customer = 1;",<not logged>',
        PREFIX.format(ms=4, pid=24247, user=OFF)
        + 'ERROR:  syntax error at or near "LOG"\n'
        + PREFIX.format(ms=4, pid=24247, user=OFF)
        + "STATEMENT:  SELECT 1 user=x LOG:  AUDIT: SESSION,1,1,READ",
    ]
)
SAMPLE_2 = (
    PREFIX.format(ms=5, pid=24248, user=ON)
    + 'LOG:  AUDIT: SESSION,9,1,READ,SELECT,,,"SELECT 1 FROM pgbench_branches",<not logged>\n'
    + PREFIX.format(ms=6, pid=24249, user="bench_other")
    + 'LOG:  AUDIT: OBJECT,1,1,WRITE,UPDATE,TABLE,public.t,"UPDATE t SET a = 1",<not logged>\n'
)


def test_the_package_is_the_servers_major_versions_pgaudit() -> None:
    assert bench.pgaudit_package("PostgreSQL 15.18 (Debian 15.18-0+deb12u1)") == (
        "postgresql-15-pgaudit"
    )
    assert bench.pgaudit_package("PostgreSQL 16.4") == "postgresql-16-pgaudit"
    with pytest.raises(bench.BenchError, match="major version"):
        bench.pgaudit_package("pg_config: not found")


def test_only_audit_is_accepted_and_the_help_names_pgaudit(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert bench.parse_args(["--only", "audit", "--reps", "1", "--duration", "2"]).only == "audit"
    with pytest.raises(SystemExit):
        bench.parse_args(["--help"])
    assert "pgAudit" in capsys.readouterr().out


def test_the_audit_rows_add_select_only_at_eight_clients_in_the_three_modes() -> None:
    rows = bench.audit_workloads()
    names = [r.name for r in rows]
    helpdesk = [r for r in bench.masked_workloads() if r.kind == "pgbench"]
    assert names[: len(helpdesk)] == [r.name for r in helpdesk]
    select_only = [r for r in rows if r.script == ("-S",)]
    assert [r.args for r in select_only] == [
        ("-M", mode, "-c", "8", "-j", "2") for mode in ("simple", "extended", "prepared")
    ]
    assert all(r.statements == 1 and r.measure_cpu for r in select_only)
    assert all(r.statements == bench.STATEMENTS_PER_TX for r in helpdesk)
    assert rows[-1].kind == "psql"
    # every pgbench -S statement through pgveil is an access: its table is protected
    assert "public.pgbench_accounts:\n    subject: aid" in bench.AUDIT_RULES


def test_the_pgaudit_server_logs_through_the_collector_and_audits_one_role_only() -> None:
    settings = bench.PGAUDIT_SETTINGS
    assert settings["shared_preload_libraries"] == "'pgaudit'"
    assert settings["logging_collector"] == "on"
    assert settings["pgaudit.log"] == "'none'"
    assert f"ALTER ROLE {ON} SET pgaudit.log = 'read, write';" in bench.PGAUDIT_SETUP
    assert f"ALTER ROLE {OFF} SET pgaudit.log = 'none';" in bench.PGAUDIT_SETUP
    assert "CREATE EXTENSION pgaudit;" in bench.PGAUDIT_SETUP


def test_audit_lines_are_counted_by_role_over_all_log_files(tmp_path: Path) -> None:
    (tmp_path / "postgresql-2026-12-06_181841.log").write_text(SAMPLE_1 + "\n")
    (tmp_path / "postgresql-2026-12-06_181934.log").write_text(SAMPLE_2)  # after a rotation
    assert bench.count_audit_lines(tmp_path) == {ON: 3, "bench_other": 1}


def test_a_run_that_did_not_audit_is_refused() -> None:
    ran = {"pgAudit on": 3, "pgAudit off": 5}
    with pytest.raises(bench.BenchError, match="no AUDIT lines"):
        bench.check_pgaudit_log({}, ran)
    with pytest.raises(bench.BenchError, match="fewer than the 3 statements"):
        bench.check_pgaudit_log({ON: 2}, ran)
    with pytest.raises(bench.BenchError, match="the 'off' variant audited"):
        bench.check_pgaudit_log({ON: 3, OFF: 1}, ran)
    note = bench.check_pgaudit_log({ON: 4, "bench_other": 9}, ran)
    assert note.startswith(f"pgAudit wrote 4 AUDIT lines for {ON}")


def _results(rows: list[bench.Workload]) -> bench.Results:
    """Two repetitions: pgveil on/off 0.5 for both roles, pgAudit on/off 0.75 (tps rows),
    seconds doubled by pgveil's audit and up by half by pgAudit's (the psql row)."""
    results = bench.Results()
    for row in rows:
        base = 1000.0 if row.kind == "pgbench" else 0.2
        slow = 0.5 if row.kind == "pgbench" else 2.0
        anchor = 0.75 if row.kind == "pgbench" else 1.5
        for _rep in range(2):
            value = base
            for role in bench.MASKED_VARIANTS:
                results.add(results.values, row.name, f"{role} off", value)
                results.add(results.values, row.name, f"{role} on", value * slow)
            results.add(results.values, row.name, "pgAudit off", value)
            results.add(results.values, row.name, "pgAudit on", value * anchor)
            if row.measure_cpu:
                for role in bench.MASKED_VARIANTS:
                    results.add(results.cpu_us, row.name, f"{role} off", 100.0)
                    results.add(results.cpu_us, row.name, f"{role} on", 130.0)
    return results


def test_the_audit_table_shows_pgaudits_ratio_beside_pgveils_for_every_row() -> None:
    rows = bench.audit_workloads()
    text = bench.report_audit(_results(rows), rows, 2, 5, 1234, "pgAudit wrote 9 AUDIT lines")
    lines = text.splitlines()
    header = next(ln for ln in lines if ln.startswith("| workload |"))
    cells = [c.strip() for c in header.strip("|").split("|")]
    assert cells == [
        "workload", "role", "audit off", "audit on", "on/off", "target", "met",
        "pgAudit off", "pgAudit on", "pgAudit on/off",
    ]  # fmt: skip
    body = [ln for ln in lines if ln.startswith("| ") and not ln.startswith("| workload")]
    assert len(body) == 2 * len(rows)  # one line per row and role
    for row in rows:
        for role in bench.MASKED_VARIANTS:
            line = next(ln for ln in body if ln.startswith(f"| {row.name} | {role} |"))
            cells = [c.strip() for c in line.strip("|").split("|")]
            if row.kind == "pgbench":
                assert cells[2:] == [
                    "1000", "500", "0.50 (0.50-0.50)", ">= 0.80", "**no**",
                    "1000", "750", "0.75 (0.75-0.75)",
                ]  # fmt: skip
            else:
                assert cells[2:] == [
                    "0.200", "0.400", "2.00 (2.00-2.00)", "<= 1.25", "**no**",
                    "0.200", "0.300", "1.50 (1.50-1.50)",
                ]  # fmt: skip
    assert "pgAudit wrote 9 AUDIT lines" in text
    assert "1,234 pgveil audit events" in text
    # CPU per statement: -S runs one statement per transaction, the helpdesk script three
    assert "- `pgbench -S -M prepared -c 8 -j 2` masked: 100 us off, 130 us on " in text
    assert "(auditing adds ~30 us per statement)" in text
    assert "(auditing adds ~10 us per statement)" in text


def test_rows_narrow_the_audit_part_only(capsys: pytest.CaptureFixture[str]) -> None:
    ns = bench.parse_args(["--only", "audit", "--rows", "-S -M extended"])
    assert ns.rows == "-S -M extended"
    assert [r.name for r in bench.audit_workloads() if ns.rows in r.name] == [
        "pgbench -S -M extended -c 8 -j 2"
    ]
    with pytest.raises(SystemExit):
        bench.parse_args(["--rows=extended"])  # (the relay and masked parts: no such rows)
    assert "--rows needs --only audit" in capsys.readouterr().err
