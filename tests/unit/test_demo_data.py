"""The demo's pure parts: sizes, partition bounds, the PDF template, the rules text, and the
--dsn parser (the database-backed behaviour is in tests/integration/test_demo.py)."""

from __future__ import annotations

import datetime as dt
import re
from pathlib import Path

import pytest

from proxy.config import ConfigError
from proxy.demo import billing as data
from proxy.demo.runner import parse_dsn
from rules.loader import parse_rules


def test_counts_scale_with_a_floor() -> None:
    assert data.Counts.at_scale(1) == data.Counts(customers=10_000, xdrs=1_000_000)
    assert data.Counts.at_scale(0.5).accounts == 10_000
    small = data.Counts.at_scale(0.0001)
    assert small.customers == 40 and small.xdrs == 100 and small.recordings >= 1


def test_xdr_partitions_cover_the_generated_times() -> None:
    base = dt.datetime(2026, 3, 31, 23, 59, tzinfo=dt.UTC)
    bounds = data.month_starts(base, data.XDR_DAYS)
    assert bounds[0] <= base - dt.timedelta(days=data.XDR_DAYS, seconds=1)
    assert bounds[-1] > base
    assert all(b.day == 1 and b.hour == 0 for b in bounds)
    assert bounds[-1] == dt.datetime(2026, 4, 1, tzinfo=dt.UTC)
    # December rolls over to January
    dec = data.month_starts(dt.datetime(2026, 12, 15, tzinfo=dt.UTC), 20)
    assert dec[-1] == dt.datetime(2027, 1, 1, tzinfo=dt.UTC)
    assert data.partitions(base).count("PARTITION OF billing.xdrs") == len(bounds) - 1


def test_pdf_template_offsets_hold_for_fixed_width_fields() -> None:
    template = data.pdf_template()
    widths = [w for _name, w in data._PDF_FIELDS]
    assert template.count("%s") == len(widths)
    pdf = (template.replace("%%", "\0") % tuple("x" * w for w in widths)).replace("\0", "%")
    xref = int(re.search(r"startxref\n(\d+)\n%%EOF", pdf).group(1))  # type: ignore[union-attr]
    assert pdf[xref:].startswith("xref\n")
    offsets = re.findall(r"^(\d{10}) 00000 n $", pdf, re.M)
    assert len(offsets) == 5
    for i, offset in enumerate(offsets, 1):
        assert pdf[int(offset) :].startswith(f"{i} 0 obj\n")


def test_wav_is_a_riff_file_of_the_stated_length() -> None:
    wav = data.wav_silence(0.25, 8000)
    assert wav[:4] == b"RIFF" and wav[8:12] == b"WAVE"
    assert int.from_bytes(wav[4:8], "little") == len(wav) - 8


def test_rules_cover_every_demo_table_and_load(tmp_path: Path) -> None:
    key = tmp_path / "odd: #dir" / "hash.key"
    key.parent.mkdir()
    key.write_text("k" * 64)
    policy = parse_rules(data.rules_yaml(str(key)))
    assert policy.masked_roles == {data.HELPDESK_ROLE}
    assert policy.unmasked_roles == {data.ADMIN_ROLE}
    tables = set(re.findall(r"^CREATE TABLE (\w+) \(", data.DDL, re.M))
    # every table but the customer classes holds personal data and has rules
    assert {t for _s, t in policy.tables} == tables - {"customer_classes"}
    for name in ("password_hash", "sip_password", "merchant_secret", "totp_secret"):
        specs = [r.columns[name] for r in policy.tables.values() if name in r.columns]
        assert specs and all(s.name == "deny" for s in specs), name


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
