"""The one billing fixture (`proxy.demo.fixture`): its script refuses what it cannot load,
and no other file in the repository creates the billing tables (the database-backed
behaviour is what the masking, erasure and attack tests load through it)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from proxy.demo import fixture

HERE = Path(__file__).resolve()  # (names the pattern it looks for)
ROOT = HERE.parents[2]
DATA = ROOT / "proxy" / "demo" / "data" / "fixture"
BILLING_TABLE = re.compile(
    r"CREATE\s+(?:UNLOGGED\s+)?TABLE\s+(?:IF\s+NOT\s+EXISTS\s+)?(?:billing\.)?"
    r"(customer_classes|customers|accounts|xdrs)\b",
    re.IGNORECASE,
)


def _creators() -> set[str]:
    out = set()
    for top in ("tests", "bench", "proxy", "rules", "audit", "erasure", "shared"):
        for path in (ROOT / top).rglob("*"):
            if path.suffix not in (".py", ".sql") or DATA in path.parents or path == HERE:
                continue
            if BILLING_TABLE.search(path.read_text(encoding="utf-8")):
                out.add(path.relative_to(ROOT).as_posix())
    return out


def test_only_the_fixture_data_files_create_the_billing_tables() -> None:
    assert BILLING_TABLE.search((DATA / "core.sql").read_text()) is not None  # the pattern works
    # (the test suite, the benchmarks and the demo all load the fixture: a file that creates
    # a billing table of its own is a second billing schema, issue 14's "one billing fixture")
    assert _creators() == set()


def test_the_core_creates_every_billing_table_once() -> None:
    core = (DATA / "core.sql").read_text()
    names = [m.group(1) for m in BILLING_TABLE.finditer(core)]
    # (xdrs in a DO block: its partition key is the load's choice)
    assert names == ["customer_classes", "customers", "accounts", "xdrs"]


def test_the_script_sets_what_the_parts_read_and_runs_them_in_order() -> None:
    sql = fixture.script(fixture.TESTS, ("population", "erasure"), xdrs_by="connect_time")
    assert "set_config('pgveil_billing.customers', '40', false)" in sql
    assert "set_config('pgveil_billing.xdrs_by', 'connect_time', false)" in sql
    assert sql.index("CREATE SCHEMA billing") < sql.index('Part "population"')
    assert sql.index('Part "population"') < sql.index('Part "erasure"')
    quoted = fixture.script(parts=("canaries",), settings={"canary_name": "O'Hara"})
    assert "set_config('pgveil_billing.canary_name', 'O''Hara', false)" in quoted


def test_the_benchmark_scale_means_a_million_xdrs() -> None:
    assert fixture.BENCH.xdrs == 1_000_000
    assert fixture.Scale(customers=10, xdrs_per_account=3).xdrs == 60
    assert fixture.Scale(customers=10, xdrs_per_account=3, xdr_customers=20).xdrs == 60


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"parts": ("nope",)}, "no billing fixture part 'nope'"),
        ({"parts": ("erasure",)}, "the billing fixture part 'erasure' needs 'population'"),
        ({"parts": ("erasure", "population")}, "needs 'population' before it"),
        ({"scale": fixture.TESTS}, "needs the billing fixture part 'population'"),
        ({"xdrs_by": "cli"}, "partitioned by i_xdr or connect_time, not 'cli'"),
        ({"parts": ("canaries", "compat")}, "part 'compat' cannot be loaded with 'canaries'"),
        (
            {"parts": ("population", "demo", "erasure")},
            "part 'demo' cannot be loaded with 'population', 'erasure'",
        ),
        (
            {"scale": fixture.Scale(customers=3), "parts": ("population", "traffic")},
            "part 'traffic' needs 'population' at no customers",
        ),
    ],
)
def test_the_script_refuses_what_it_cannot_load(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        fixture.script(**kwargs)  # type: ignore[arg-type]
