"""The demo's data files and pure parts: sizes, the recipe's steps, the PDF template, the
audio, the rules and erasure texts, the roles, what the wheel ships, and the --dsn parser
(the database-backed behaviour is in tests/integration/test_demo.py and
test_demo_billing.py)."""

from __future__ import annotations

import datetime as dt
import fnmatch
import re
import tomllib
from pathlib import Path

import pytest

from proxy.config import ConfigError
from proxy.demo import billing as data
from proxy.demo import fixture
from proxy.demo.runner import parse_dsn
from rules.loader import parse_rules

ROOT = Path(__file__).resolve().parents[2]


def test_counts_scale_with_a_floor() -> None:
    assert data.Counts.at_scale(1) == data.Counts(customers=10_000, xdrs=1_000_000)
    assert data.Counts.at_scale(0.5).accounts == 10_000
    small = data.Counts.at_scale(0.0001)
    assert small.customers == 40 and small.xdrs == 100 and small.recordings >= 1


def test_load_steps_follow_the_recipe_and_chunk_the_xdrs() -> None:
    counts = data.Counts.at_scale(0.12)  # 1,200 customers, 120,000 xDRs
    steps = data.load_steps(counts)
    assert [s.label for s in steps][:6] == [
        "staff and partners", "customers", "customers", "customers", "accounts", "accounts",
    ]  # fmt: skip
    xdrs = [s for s in steps if s.label == "xDRs"]
    assert [(s.settings["first"], s.settings["last"]) for s in xdrs] == [
        (1, 50_000), (50_001, 100_000), (100_001, 120_000),
    ]  # fmt: skip
    assert all("pgveil_demo.first" in s.sql for s in xdrs)
    # the xDR chunks' weights add up to the step's: 180 units per million
    assert sum(s.weight for s in xdrs) == pytest.approx(180 * 120_000 / 1_000_000)
    assert steps[-1].label == "statistics" and steps[-1].weight == pytest.approx(10 + 65 * 0.12)
    assert data.load_steps(data.Counts.at_scale(100))[-1].weight == 75  # at most
    recordings = [s for s in steps if s.label == "recordings"]
    assert recordings and all(s.args == (data.data_bytes("silence.wav"),) for s in recordings)
    # every setting a file reads is one the load sets
    read = {m for s in steps for m in re.findall(r"pgveil_demo\.(\w+)", s.sql)}
    given = set(data.settings(counts, dt.datetime.now(dt.UTC))) | {"first", "last"}
    assert read and read <= given, read - given


@pytest.mark.parametrize(
    ("now", "first", "months"),
    [
        # 180 days before: 2025-10-02, so October to March
        (dt.datetime(2026, 3, 31, 23, 59, tzinfo=dt.UTC), dt.date(2025, 10, 1), 6),
        # in UTC already the 1st of April: 2025-10-03 to April
        (
            dt.datetime(2026, 3, 31, 23, 30, tzinfo=dt.timezone(dt.timedelta(hours=-2))),
            dt.date(2025, 10, 1),
            7,
        ),
        (dt.datetime(2026, 12, 15, tzinfo=dt.UTC), dt.date(2026, 6, 1), 7),
        (dt.datetime(2027, 1, 1, tzinfo=dt.UTC), dt.date(2026, 7, 1), 7),
    ],
)
def test_xdr_months_reach_from_the_oldest_xdr_to_now(
    now: dt.datetime, first: dt.date, months: int
) -> None:
    assert data.xdr_months(now) == (first, months)


def test_the_schema_is_the_fixtures_with_the_recipes_parts() -> None:
    now = dt.datetime(2026, 12, 15, tzinfo=dt.UTC)
    sql = data.schema(now)
    assert data.FIXTURE_PARTS == ("demo",)
    assert sql.index("CREATE SCHEMA billing") < sql.index('Part "demo"')
    assert "set_config('pgveil_billing.xdrs_by', 'connect_time', false)" in sql
    assert "set_config('pgveil_billing.first_month', '2026-06-01', false)" in sql
    assert "set_config('pgveil_billing.months', '7', false)" in sql
    marker = data.MARKER.replace("'", "''")
    assert f"set_config('pgveil_billing.demo_marker', '{marker}', false)" in sql
    # every setting the part reads is one the script sets
    read = set(re.findall(r"pgveil_billing\.(\w+)", fixture.data_text("demo.sql")))
    given = set(re.findall(r"set_config\('pgveil_billing\.(\w+)'", sql))
    assert read and read <= given, read - given


def test_pdf_template_offsets_hold_for_fixed_width_fields() -> None:
    template = data.data_text("invoice.pdf.template")
    # the widths invoices.sql pads the fields to, in the template's order
    widths = [int(w) for w in re.findall(r"rpad\(.*, (\d+)\)", data.data_text("load/invoices.sql"))]
    assert widths == [8, 15, 24, 16, 10]
    assert template.count("%s") == len(widths)
    pdf = (template.replace("%%", "\0") % tuple("x" * w for w in widths)).replace("\0", "%")
    xref = int(re.search(r"startxref\n(\d+)\n%%EOF", pdf).group(1))  # type: ignore[union-attr]
    assert pdf[xref:].startswith("xref\n")
    offsets = re.findall(r"^(\d{10}) 00000 n $", pdf, re.M)
    assert len(offsets) == 5
    for i, offset in enumerate(offsets, 1):
        assert pdf[int(offset) :].startswith(f"{i} 0 obj\n")


def test_wav_is_a_riff_file_of_the_stated_length() -> None:
    wav = data.data_bytes("silence.wav")
    assert wav[:4] == b"RIFF" and wav[8:12] == b"WAVE"
    assert int.from_bytes(wav[4:8], "little") == len(wav) - 8
    # PCM, mono, 8000 Hz, 8 bits: half a second of silence (0x80)
    fmt, size = wav[12:36], int.from_bytes(wav[40:44], "little")
    assert fmt[8:10] == b"\x01\x00" and fmt[10:12] == b"\x01\x00"
    assert int.from_bytes(fmt[12:16], "little") == 8000 and fmt[22:24] == b"\x08\x00"
    assert wav[36:40] == b"data" and size == 4000 and wav[44:] == b"\x80" * size


def test_rules_cover_every_demo_table_and_load(tmp_path: Path) -> None:
    key = tmp_path / "odd: #dir" / "hash.key"
    key.parent.mkdir()
    key.write_text("k" * 64)
    policy = parse_rules(data.rules_yaml(str(key)))
    assert policy.masked_roles == {data.HELPDESK_ROLE}
    assert policy.unmasked_roles == {data.ADMIN_ROLE}
    # the fixture's core (xdrs in a DO block's string) and the demo's part
    schema = fixture.data_text("core.sql") + fixture.data_text("demo.sql")
    tables = set(re.findall(r"CREATE TABLE (?:billing\.)?(\w+) \(", schema))
    assert {"customers", "xdrs", "resellers", "invoices"} <= tables
    # every table but the customer classes holds personal data and has rules
    assert {t for _s, t in policy.tables} == tables - {"customer_classes"}
    for name in ("password_hash", "sip_password", "merchant_secret", "totp_secret"):
        specs = [r.columns[name] for r in policy.tables.values() if name in r.columns]
        assert specs and all(s.name == "deny" for s in specs), name


def test_roles_sql_creates_the_recipes_roles() -> None:
    created = re.search(r"FOREACH role IN ARRAY ARRAY\[(.*?)\]", data.ROLES_SQL)
    assert created is not None
    assert tuple(re.findall(r"'(\w+)'", created.group(1))) == data.DEMO_ROLES
    granted = set(re.findall(r"\bTO (\w+)", data.ROLES_SQL))
    assert granted == {data.ADMIN_ROLE, data.HELPDESK_ROLE}  # the catalog role reads no rows


def test_the_erasure_configuration_writes_the_audit_file_it_is_given(tmp_path: Path) -> None:
    from erasure.loader import parse_config

    path = str(tmp_path / "odd: #dir" / "audit.jsonl")
    config = parse_config(data.erasure_yaml(path), "erasure.yaml")
    assert config.audit.file is not None and str(config.audit.file) == path
    assert not config.audit.stdout


def test_the_wheel_ships_every_demo_data_file() -> None:
    """pyproject's package-data globs match every file under proxy/demo/data (an editable
    install reads the tree, so only this shows what a wheel would leave out)."""
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    globs = config["tool"]["setuptools"]["package-data"]["proxy.demo"]
    base = ROOT / "proxy" / "demo"
    found = [p.relative_to(base).as_posix() for p in (base / "data").rglob("*") if p.is_file()]
    assert found
    missing = [f for f in found if not any(fnmatch.fnmatchcase(f, g) for g in globs)]
    assert not missing


@pytest.mark.parametrize(
    ("dsn", "expected"),
    [
        (
            "postgresql://u%40x:p%2Fw@db.example:6543/shop?sslmode=require",
            ("db.example", 6543, "u@x", "p/w", "shop", "require"),
        ),
        (
            "host=db port=5433 user=dba password=secret dbname=billing sslmode=disable",
            ("db", 5433, "dba", "secret", "billing", "disable"),
        ),
        ("postgresql://alice@db", ("db", 5432, "alice", "envpw", "alice", "prefer")),
    ],
)
def test_parse_dsn(dsn: str, expected: tuple[object, ...], monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("PGHOST", "PGPORT", "PGUSER", "PGDATABASE", "PGSSLMODE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("PGPASSWORD", "envpw")
    t = parse_dsn(dsn)
    assert (t.host, t.port, t.user, t.password, t.database, t.sslmode) == expected


@pytest.mark.parametrize("dsn", ["host=a,b", "just-words", "host=db port=five", "hostaddr=1.2.3.4"])
def test_parse_dsn_rejects(dsn: str) -> None:
    with pytest.raises(ConfigError):
        parse_dsn(dsn)
