"""libpq DSNs become URIs asyncpg understands (quoting per libpq; URIs pass through)."""

from __future__ import annotations

import urllib.parse

import pytest

from erasure.db import DsnError, dsn_to_uri, parse_dsn


def test_key_value_pairs_with_libpq_quoting() -> None:
    assert parse_dsn("host=db port=5433 dbname=billing user=eraser") == {
        "host": "db",
        "port": "5433",
        "dbname": "billing",
        "user": "eraser",
    }
    assert parse_dsn(r"application_name = 'a b' x='q\'uote\\'") == {
        "application_name": "a b",
        "x": "q'uote\\",
    }
    assert parse_dsn(r"password='a\'b c'")["password"] == "a'b c"
    assert parse_dsn("  ") == {}


def test_uris() -> None:
    uri = "postgresql://eraser@db:5433/billing?sslmode=require"
    assert dsn_to_uri(uri) == uri
    assert dsn_to_uri("") == "postgresql://"
    converted = urllib.parse.urlsplit(dsn_to_uri("host=db dbname=billing password='p w&x'"))
    assert urllib.parse.parse_qs(converted.query) == {
        "host": ["db"],
        "database": ["billing"],
        "password": ["p w&x"],
    }


@pytest.mark.parametrize("dsn", ["host", "host=db 'x'", "=1"])
def test_unreadable(dsn: str) -> None:
    with pytest.raises(DsnError, match="write key=value pairs"):
        dsn_to_uri(dsn)
