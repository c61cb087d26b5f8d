"""A pytest plugin for bench/driver_suites.py: writes each test's markers into the JUnit XML
report (a `markers` property), so a test lost through pgveil can be shown with what the
suite's own authors say of it (psycopg marks `flakey` and `timing` tests, which its CI runs
up to three times). It changes nothing in how tests run or what they assert."""

from __future__ import annotations

from typing import Any


def pytest_collection_modifyitems(items: list[Any]) -> None:
    for item in items:
        names = sorted({m.name for m in item.iter_markers()} - {"parametrize", "usefixtures"})
        if names:
            item.user_properties.append(("markers", ",".join(names)))
