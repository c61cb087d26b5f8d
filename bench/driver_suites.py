"""psycopg's and asyncpg's own test suites, directly and through pgveil: what a driver's
authors test is what pgveil must be transparent to.

Runs the `tests/` of psycopg 3.3.4 and asyncpg 0.31.0 (from their source repositories at
those tags; see bench/README.md for how to get them) against one throwaway PostgreSQL
(`proxy/demo/embedded_pg.py`), in these variants:

* `direct`: the suite connects to PostgreSQL;
* `relay`: through pgveil without rules (every session relayed);
* `rules`: through pgveil with rules and an audit file: the suites' role is unmasked and
  audited, so every statement goes through the recording filter.

Each suite runs in a virtual environment of its own with the pinned driver (created once in
the work directory), with pytest writing a JUnit XML report. For each run the script prints
passed/failed/skipped, and for each pgveil run the tests that passed directly but did not
through pgveil. Exit status 0 when every pgveil run passed everything that passed directly.

This is a transparency check, not a benchmark: run it under `nice`, not on a quiet machine.
It must not need the network but for the package index (pip) the first time.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import venv
import xml.etree.ElementTree as ET
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from proxy.demo.embedded_pg import EmbeddedPostgres, free_port  # noqa: E402

PSYCOPG = "3.3.4"
ASYNCPG = "0.31.0"
# what each suite's environment installs: the driver pinned, and what its tests import
# (psycopg's `test` extra less mypy and pytest-cov/-randomly: the typing tests then skip in
# every variant alike, and tests run in their file order, the same in every run)
PACKAGES = {
    "psycopg": [f"psycopg[binary,pool]=={PSYCOPG}", "anyio>=4.0", "pproxy>=2.7", "pytest"],
    "asyncpg": [f"asyncpg=={ASYNCPG}", "distro~=1.9.0", "uvloop>=0.22.1", "pytest"],
}
VARIANTS = ("direct", "relay", "rules")
PLUGINS = ROOT / "bench" / "suite_plugins"  # pytest plugins the suites run with
# markers a suite's authors put on tests that may fail without a bug (psycopg's CI runs
# failed tests up to three times for them: tools/ci/ci_test.sh)
UNRELIABLE = frozenset(("flakey", "timing"))
# How often a test lost through pgveil runs again, through the same pgveil, before it
# counts as lost: psycopg's CI runs the failed tests of a run twice more (`pytest --lf`,
# tools/ci/ci_test.sh), so that a test counts as passing there if one of three tries passes.
# The first try's losses are printed too.
RERUNS = 2
DATABASE = "suites"
# The rules of the `rules` variant: one table of their own with a subject and a masked
# column, so pgveil classifies logins and records statements; the suites' role (the
# superuser) is unmasked by default, so it is audited, not masked.
RULES = """\
roles:
  masked: [suite_masked]
  default: unmasked
tables:
  pgveil_suite.people:
    subject: id
    columns:
      name: partial
"""
SETUP_SQL = """\
CREATE ROLE suite_masked NOLOGIN;
CREATE SCHEMA pgveil_suite;
CREATE TABLE pgveil_suite.people (id int PRIMARY KEY, name text);
"""


@dataclasses.dataclass
class Result:
    suite: str
    variant: str
    run: int
    passed: set[str]
    failed: set[str]
    skipped: int
    seconds: float
    returncode: int
    markers: dict[str, str] = dataclasses.field(default_factory=dict)  # test -> its markers
    # tests lost in this run that passed when run again (see RERUNS)
    recovered: set[str] = dataclasses.field(default_factory=set)


def suite_env(work: Path, suite: str) -> Path:
    """The suite's virtual environment (created and filled once): its python."""
    env_dir = work / f"venv-{suite}"
    python = env_dir / "bin" / "python"
    marker = env_dir / ".installed"
    wanted = "\n".join(PACKAGES[suite])
    if marker.exists() and marker.read_text() == wanted:
        return python
    shutil.rmtree(env_dir, ignore_errors=True)
    venv.create(env_dir, with_pip=True)
    subprocess.run([str(python), "-m", "pip", "install", "-q", *PACKAGES[suite]], check=True)
    marker.write_text(wanted)
    return python


def check_source(suite: str, src: Path) -> None:
    """The tests must be the tagged release's: a checkout of another version would test
    what the pinned driver does not have."""
    if not (src / "tests").is_dir():
        sys.exit(f"{src}: no tests/ directory (see bench/README.md for how to get it)")
    if suite == "psycopg":
        text = (src / "psycopg" / "pyproject.toml").read_text()
        ok = f'version = "{PSYCOPG}"' in text or f"psycopg-c == {PSYCOPG}" in text
    else:
        text = (src / "asyncpg" / "_version.py").read_text()
        ok = f"'{ASYNCPG}'" in text or f'"{ASYNCPG}"' in text
    if not ok:
        sys.exit(f"{src} is not {suite} {PSYCOPG if suite == 'psycopg' else ASYNCPG}")


def tests_copy(work: Path, suite: str, src: Path) -> Path:
    """A directory with only the suite's tests and its pytest settings: the driver is the
    installed one, never the repository's source."""
    dest = work / f"tests-{suite}"
    if not dest.exists():
        tmp = Path(tempfile.mkdtemp(dir=work))
        shutil.copytree(src / "tests", tmp / "tests")
        shutil.copy(src / "pyproject.toml", tmp / "pyproject.toml")
        tmp.rename(dest)
    return dest


def run_suite(
    python: Path,
    suite: str,
    tests: Path,
    port: int,
    pg: EmbeddedPostgres,
    report: Path,
    selection: list[str],
) -> int:
    """One run of the suite (the files in `selection`, else all of tests/): pytest's exit."""
    env = {**os.environ, "PGPASSWORD": pg.password}
    env.pop("PGVEIL_PURE_PYTHON", None)
    env["PYTHONPATH"] = str(PLUGINS)  # only the markers plugin, nothing of pgveil's
    args = [str(python), "-m", "pytest", "-q", "-p", "pgveil_suite_markers", f"--junitxml={report}"]
    if suite == "psycopg":
        env["PSYCOPG_TEST_DSN"] = (
            f"host=127.0.0.1 port={port} user={pg.superuser} dbname={DATABASE} sslmode=disable"
        )
        args += selection or ["tests"]  # (its conftest needs pytest's cache: kept in the copy)
        # its conftest marks every session start in that cache and refuses to run any test
        # while the mark is there, which it is after a run that did not end (a segfault, or
        # a run stopped here): each run reports on its own (a crash shows as tests missing
        # from its report), so the mark of an earlier run is cleared
        (tests / ".pytest_cache" / "v" / "segfault").unlink(missing_ok=True)
    else:
        # asyncpg's tests use the running server named by PG* (its `RunningCluster`);
        # those that need a cluster of their own skip
        env.update(
            PGHOST="127.0.0.1", PGPORT=str(port), PGUSER=pg.superuser, PGDATABASE=DATABASE,
            PGSSLMODE="disable",
        )  # fmt: skip
        args += ["-p", "no:cacheprovider", *(selection or ["tests"])]
    log = report.with_suffix(".log")
    with open(log, "wb") as out:
        proc = subprocess.run(args, cwd=tests, env=env, stdout=out, stderr=subprocess.STDOUT)
    return proc.returncode


def outcomes(report: Path) -> tuple[set[str], set[str], int, dict[str, str]]:
    """passed, failed (errors included), the number skipped, and each test's markers (as the
    plugin wrote them), from a JUnit XML report."""
    passed: set[str] = set()
    failed: set[str] = set()
    skipped = 0
    markers: dict[str, str] = {}
    if not report.exists():
        return passed, failed, skipped, markers
    for case in ET.parse(report).getroot().iter("testcase"):
        name = f"{case.get('classname')}::{case.get('name')}"
        kinds = {child.tag for child in case}
        for prop in case.iter("property"):
            if prop.get("name") == "markers":
                markers[name] = prop.get("value") or ""
        if kinds & {"failure", "error"}:
            failed.add(name)
        elif "skipped" in kinds:
            skipped += 1
        else:
            passed.add(name)
    return passed, failed, skipped, markers


def start_proxy(
    variant: str, pg: EmbeddedPostgres, work: Path
) -> tuple[subprocess.Popen[bytes], int]:
    """A `pgveil proxy` of the variant in front of `pg`, and the port it listens on."""
    port = free_port()
    args = [
        sys.executable, "-m", "proxy.cli", "proxy", "--listen", f"127.0.0.1:{port}",
        "--upstream", f"127.0.0.1:{pg.port}", "--upstream-sslmode", "disable",
        "--log-level", "warning",
    ]  # fmt: skip
    env = dict(os.environ)
    if variant == "rules":
        rules = work / "rules.yaml"
        rules.write_text(RULES)
        audit = work / f"audit-{time.time_ns()}.jsonl"
        args += [
            "--rules", str(rules), "--catalog-user", pg.superuser, "--audit-file", str(audit),
        ]  # fmt: skip
        env["PGVEIL_CATALOG_PASSWORD"] = pg.password
    log = open(work / f"pgveil-{variant}-{port}.log", "wb")  # noqa: SIM115 - the process's
    proc = subprocess.Popen(args, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 60
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return proc, port
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                sys.exit(f"pgveil ({variant}) did not start: see {log.name}")
            time.sleep(0.1)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--psycopg-src", type=Path, help=f"a checkout of psycopg at tag {PSYCOPG}")
    ap.add_argument("--asyncpg-src", type=Path, help=f"a checkout of asyncpg at tag v{ASYNCPG}")
    ap.add_argument("--runs", type=int, default=3, help="runs of each pgveil variant")
    ap.add_argument("--variants", default="relay,rules", help="pgveil variants: relay,rules")
    ap.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "pgveil-suites")
    ap.add_argument(
        "--baseline",
        type=Path,
        help="the work directory of an earlier invocation: its direct runs are the baseline "
        "(no direct run now; two invocations can then run variants side by side)",
    )
    ap.add_argument(
        "--psycopg-tests",
        nargs="*",
        default=[],
        help="only these of psycopg's tests (paths under its tests/, e.g. tests/test_copy.py)",
    )
    ap.add_argument("--asyncpg-tests", nargs="*", default=[], help="the same for asyncpg")
    opts = ap.parse_args()
    # stopped with SIGTERM: the finally clauses stop pgveil and PostgreSQL
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    selections = {"psycopg": opts.psycopg_tests, "asyncpg": opts.asyncpg_tests}
    suites = {s: p for s, p in (("psycopg", opts.psycopg_src), ("asyncpg", opts.asyncpg_src)) if p}
    if not suites:
        ap.error("give --psycopg-src and/or --asyncpg-src")
    variants = [v for v in opts.variants.split(",") if v]
    if any(v not in VARIANTS[1:] for v in variants):
        ap.error(f"--variants: choose from {', '.join(VARIANTS[1:])}")
    work = opts.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    prepared = {}
    for suite, src in suites.items():
        check_source(suite, src)
        prepared[suite] = (suite_env(work, suite), tests_copy(work, suite, src))
    pg = EmbeddedPostgres(settings={"max_prepared_transactions": "10"}).start()
    results: list[Result] = []
    try:
        pg.psql(f"CREATE DATABASE {DATABASE}")
        pg.psql(SETUP_SQL, dbname=DATABASE)
        plan = [(v, r) for r in range(1, opts.runs + 1) for v in variants]
        if opts.baseline is None:
            plan.insert(0, ("direct", 1))
        for variant, run in plan:
            proxy = None
            port = pg.port
            if variant != "direct":
                proxy, port = start_proxy(variant, pg, work)
            try:
                for suite, (python, tests) in prepared.items():
                    report = work / f"{suite}-{variant}-{run}.xml"
                    report.unlink(missing_ok=True)
                    started = time.monotonic()
                    rc = run_suite(python, suite, tests, port, pg, report, selections[suite])
                    passed, failed, skipped, markers = outcomes(report)
                    r = Result(suite, variant, run, passed, failed, skipped,
                               time.monotonic() - started, rc, markers)  # fmt: skip
                    if opts.baseline is not None and baseline(r, results) is None:
                        # read when first needed: the earlier invocation may still be running
                        base = opts.baseline / f"{suite}-direct-1.xml"
                        passed, failed, skipped, markers = outcomes(base)
                        if not passed:
                            sys.exit(f"{base}: no direct run of {suite} to compare with")
                        results.append(
                            Result(suite, "direct", 1, passed, failed, skipped, 0, 0, markers)
                        )
                    results.append(r)
                    for attempt in range(2, RERUNS + 2):
                        lost = regressions(r, results)
                        if not lost:
                            break
                        again = work / f"{suite}-{variant}-{run}-try{attempt}.xml"
                        again.unlink(missing_ok=True)
                        ids = [node_id(name) for name in lost]
                        run_suite(python, suite, tests, port, pg, again, ids)
                        r.recovered |= outcomes(again)[0] & set(lost)
                    print(summary(r, results), flush=True)
            finally:
                if proxy is not None:
                    proxy.terminate()
                    proxy.wait(30)
    finally:
        pg.cleanup()
    return 0 if all(not regressions(r, results) for r in results) else 1


def baseline(r: Result, results: list[Result]) -> Result | None:
    return next((b for b in results if b.suite == r.suite and b.variant == "direct"), None)


def regressions(r: Result, results: list[Result]) -> list[str]:
    """The tests that passed directly but not in this run, among the test files this run
    ran tests of (a part of the suite compares with the same part of a whole direct run)."""
    base = baseline(r, results)
    if r.variant == "direct" or base is None:
        return []
    files = {_file(name) for name in r.passed | r.failed}
    lost = base.passed - r.passed - r.recovered
    return sorted(name for name in lost if _file(name) in files)


def node_id(name: str) -> str:
    """pytest's node id of a JUnit test name (`tests.test_copy.Class::test` ->
    `tests/test_copy.py::Class::test`), to run that test again."""
    path, _, test = name.partition("::")
    module = _file(name)
    classes = path[len(module) :].lstrip(".")
    return "::".join(
        [module.replace(".", "/") + ".py", *([classes.replace(".", "::")] if classes else []), test]
    )


def _file(name: str) -> str:
    """The test file of a JUnit test name (`tests.test_copy.Class::test` -> tests.test_copy)."""
    parts = name.split("::")[0].split(".")
    end = next((i for i, p in enumerate(parts) if p.startswith("test_")), len(parts) - 1)
    return ".".join(parts[: end + 1])


def summary(r: Result, results: list[Result]) -> str:
    line = (
        f"{r.suite} {r.variant} run {r.run}: {len(r.passed)} passed, {len(r.failed)} failed, "
        f"{r.skipped} skipped ({r.seconds:.0f} s, pytest exit {r.returncode})"
    )
    if r.variant == "direct":
        return line
    lost = regressions(r, results)
    first = len(lost) + len(r.recovered)
    line += f"; passed directly but not here: {first} at the first try"
    if r.recovered:
        line += f", {len(r.recovered)} of them passed when run again"
        line += "".join(
            f"\n    passed again: {name}" + (f"  [{r.markers[name]}]" if name in r.markers else "")
            for name in sorted(r.recovered)
        )
    line += f"\n  lost after {RERUNS + 1} tries: {len(lost)}"
    marked = [n for n in lost if UNRELIABLE & set(r.markers.get(n, "").split(","))]
    if marked:
        line += f" ({len(marked)} of them marked {'/'.join(sorted(UNRELIABLE))} by the suite)"
    return "\n".join(
        [line, *(f"    {name}" + (f"  [{r.markers[name]}]" if name in r.markers else "")
                 for name in lost)]
    )  # fmt: skip


if __name__ == "__main__":
    sys.exit(main())
