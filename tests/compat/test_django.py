"""Django as a masked role: `inspectdb` on the billing schema, then ORM queries over the
models it wrote (the way a team puts a legacy database under Django: `manage.py inspectdb >
models.py`, `managed = False` models, and queries).

`inspectdb` runs as a subprocess, as users run it; the models it writes are imported into a
Django configured in-process (`settings.configure`) with two databases: `default` is the
masked role through pgveil, `admin` the unmasked role through pgveil. The models the ORM
tests use are inspected as the unmasked role, so that they test the ORM whatever
`inspectdb` does as the masked role (which has a test of its own).
"""

from __future__ import annotations

import decimal
import importlib
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import psycopg
import pytest
from psycopg.rows import dict_row

from tests.compat.conftest import (
    DB,
    MASKED,
    SIP_PASSWORD,
    UNMASKED,
    Compat,
    assert_masked,
    assert_real,
)
from tests.integration.masking_fixture import LOGIN, NAME

APP = "compat_models"


def _settings_text(compat: Compat) -> str:
    def db(user: str) -> dict[str, Any]:
        return {
            "ENGINE": "django.db.backends.postgresql",
            "HOST": "127.0.0.1",
            "PORT": str(compat.port),
            "NAME": DB,
            "USER": user,
            "PASSWORD": compat.password(user),
            "OPTIONS": {"sslmode": "disable"},
        }

    return (
        f"DATABASES = {{'default': {db(MASKED)!r}, 'admin': {db(UNMASKED)!r}}}\n"
        "USE_TZ = True\nSECRET_KEY = 'compat-suite'\nINSTALLED_APPS = []\n"
    )


def inspectdb(settings_dir: Path, database: str) -> subprocess.CompletedProcess[str]:
    """`python -m django inspectdb --database DATABASE`, as a user runs it."""
    env = {
        **os.environ,
        "DJANGO_SETTINGS_MODULE": "compat_settings",
        "PYTHONPATH": str(settings_dir),
    }
    return subprocess.run(
        [sys.executable, "-m", "django", "inspectdb", "--database", database],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )


@pytest.fixture(scope="module")
def django_dir(compat: Compat, tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("django")
    (d / "compat_settings.py").write_text(_settings_text(compat))
    return d


@pytest.fixture(scope="module")
def models(compat: Compat, django_dir: Path) -> Iterator[ModuleType]:
    """The models `inspectdb` wrote (as the unmasked role), imported into a configured Django."""
    out = inspectdb(django_dir, "admin")
    assert out.returncode == 0, out.stderr
    pkg = django_dir / APP
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "models.py").write_text(out.stdout)
    sys.path.insert(0, str(django_dir))

    import django
    from django.conf import settings

    ns: dict[str, Any] = {}
    exec((django_dir / "compat_settings.py").read_text(), ns)
    settings.configure(
        DATABASES=ns["DATABASES"], INSTALLED_APPS=[APP], USE_TZ=True, SECRET_KEY="compat-suite"
    )
    django.setup()
    try:
        yield importlib.import_module(f"{APP}.models")
    finally:
        from django.db import connections

        connections.close_all()
        sys.path.remove(str(django_dir))


def dump(*objs: Any) -> str:
    """Every concrete field of each model instance (and of what it has loaded), as text."""
    lines = []
    for obj in objs:
        fields = {f.attname: getattr(obj, f.attname) for f in obj._meta.concrete_fields}
        lines.append(f"{type(obj).__name__} {fields!r}")
    return "\n".join(lines)


def direct(compat: Compat, sql: str) -> list[tuple[Any, ...]]:
    """Read the stored values directly from PostgreSQL (as its superuser, not through pgveil)."""
    with psycopg.connect(compat.pg.dsn(dbname=DB) + " sslmode=disable") as conn:
        return conn.execute(sql).fetchall()  # type: ignore[arg-type]


def stored_row(compat: Compat, sql: str) -> dict[str, Any]:
    """The one row `sql` reads directly from PostgreSQL, by column name."""
    with psycopg.connect(compat.pg.dsn(dbname=DB) + " sslmode=disable") as conn:
        rows = conn.cursor(row_factory=dict_row).execute(sql).fetchall()  # type: ignore[arg-type]
    assert len(rows) == 1, rows
    return rows[0]


# -- inspectdb ---------------------------------------------------------------------------------


def test_inspectdb_as_unmasked_role_writes_a_model_per_table(models: ModuleType) -> None:
    """The control for the masked `inspectdb` below, and the models the ORM tests use."""
    for name in ("Customers", "Accounts", "Xdrs", "CustomerClasses"):
        assert hasattr(models, name), name
    columns = {f.column for f in models.Customers._meta.concrete_fields}
    assert {"name", "email", "cc_number", "extra", "status"} <= columns
    assert {f.column for f in models.Accounts._meta.concrete_fields} >= {"sip_password", "ip"}


def test_the_inspected_models_pass_djangos_system_checks(models: ModuleType) -> None:
    """The models are ones a team could keep: no error from Django's checks (an xDR id with
    a serial default would be an AutoField outside the primary key, fields.E100)."""
    from django.core import checks

    errors = [e for e in checks.run_checks() if e.level >= checks.ERROR]
    assert not errors, errors


def test_inspectdb_as_masked_role_finds_every_table(models: ModuleType, django_dir: Path) -> None:
    masked = inspectdb(django_dir, "default")
    unmasked = inspectdb(django_dir, "admin")
    assert masked.returncode == 0, masked.stderr
    assert "Unable to inspect" not in masked.stdout, masked.stdout
    assert "class Customers(models.Model)" in masked.stdout
    # the schema is the same for every role: the masked role's models are the same models
    assert masked.stdout == unmasked.stdout


# -- queries -----------------------------------------------------------------------------------


def test_filter_and_order_by(models: ModuleType) -> None:
    def run(db: str) -> list[Any]:
        qs = models.Customers.objects.using(db).filter(i_customer_class=1, balance__gte=3)
        return list(qs.order_by("i_customer"))

    masked, unmasked = run("default"), run("admin")
    assert [c.pk for c in masked] == [c.pk for c in unmasked]
    assert masked[0].pk == 1
    assert_masked(dump(*masked))
    assert_real(dump(*unmasked))
    first = masked[0]
    assert first.cc_number is None  # deny: NULL
    assert first.extra["iban"] is None and first.extra["tier"] == "gold"
    assert first.name != NAME and len(first.name) == len(NAME)


def test_filter_on_a_personal_column_compares_masked_values(models: ModuleType) -> None:
    """A predicate on a masked column sees the masked value, so it cannot probe the real
    one; `count()` and `values_list()` name only the columns they need."""
    customers = models.Customers.objects
    assert customers.using("admin").filter(name__startswith="Zeb").count() == 1
    assert customers.filter(name__startswith="Zeb").count() == 0
    assert list(customers.filter(name__startswith="Z*").values_list("pk", flat=True)) == [1]
    assert customers.filter(email__endswith="@canary-mail.example").count() == 1


def test_join_through_foreign_keys(models: ModuleType) -> None:
    def run(db: str) -> list[Any]:
        qs = models.Accounts.objects.using(db).filter(
            i_customer__i_customer_class__name="European Customers", i_customer__balance__gt=1
        )
        return list(qs.order_by("i_account"))

    masked, unmasked = run("default"), run("admin")
    assert [a.pk for a in masked] == [a.pk for a in unmasked]
    assert masked[0].pk == 10
    assert masked[0].sip_password is None
    assert_masked(dump(*masked))
    assert SIP_PASSWORD in dump(*unmasked)


def test_select_related(models: ModuleType) -> None:
    def run(db: str) -> str:
        qs = models.Xdrs.objects.using(db).select_related("i_account__i_customer")
        xdrs = list(qs.order_by("i_xdr"))
        assert [x.i_xdr for x in xdrs] == [1, 2, 3]
        return dump(*xdrs, *(x.i_account for x in xdrs), *(x.i_account.i_customer for x in xdrs))

    masked = run("default")
    assert_masked(masked)
    assert_real(run("admin"))


def test_prefetch_related(models: ModuleType) -> None:
    def run(db: str) -> str:
        qs = models.Customers.objects.using(db).prefetch_related("accounts_set")
        customers = list(qs.order_by("i_customer")[:3])
        accounts = [a for c in customers for a in c.accounts_set.all()]
        assert [a.pk for a in accounts] == [10, 20, 103]
        return dump(*customers, *accounts)

    assert_masked(run("default"))
    assert_real(run("admin"))


def test_paginator_and_slicing(models: ModuleType) -> None:
    from django.core.paginator import Paginator
    from django.db import connections
    from django.test.utils import CaptureQueriesContext

    qs = models.Customers.objects.order_by("i_customer")
    pages = Paginator(qs, 10)
    assert pages.count == 30 and pages.num_pages == 3
    with CaptureQueriesContext(connections["default"]) as queries:
        first = list(pages.page(1))
        second = list(qs[10:20])
    assert [c.pk for c in first] == list(range(1, 11))
    assert [c.pk for c in second] == list(range(11, 21))
    assert "LIMIT 10 OFFSET 10" in queries.captured_queries[-1]["sql"]
    assert_masked(dump(*first, *second))


def test_paginator_over_a_table_without_deny_columns(models: ModuleType) -> None:
    from django.core.paginator import Paginator

    page = Paginator(models.Xdrs.objects.order_by("i_xdr"), 2).page(1)
    assert [x.i_xdr for x in page] == [1, 2] and page.has_next()
    assert_masked(dump(*page))
    assert all(x.cli.startswith("+*") for x in page)


def test_first_get_and_count(models: ModuleType) -> None:
    customers = models.Customers.objects
    first = customers.order_by("i_customer").first()
    assert first is not None and first.pk == 1
    assert customers.get(email__startswith="a").pk == 2
    assert customers.count() == 30
    assert_masked(dump(first))
    assert_real(dump(customers.using("admin").order_by("i_customer").first()))


def test_values_and_aggregates(models: ModuleType) -> None:
    from django.db.models import Count, Max, Min, Sum

    customers = models.Customers.objects
    rows = list(
        customers.order_by("i_customer").values("i_customer", "name", "email", "phone", "login")
    )
    agg = customers.aggregate(Sum("balance"), Count("i_customer"), Max("name"), Min("email"))
    per_class = list(
        customers.values("i_customer_class")
        .annotate(n=Count("accounts"))
        .order_by("i_customer_class")
    )
    assert rows[0]["i_customer"] == 1 and rows[0]["login"] != LOGIN
    assert agg["i_customer__count"] == 30
    assert agg["balance__sum"] == decimal.Decimal("477.50")
    assert per_class == [{"i_customer_class": 1, "n": 16}, {"i_customer_class": 2, "n": 14}]
    assert_masked(repr(rows) + repr(agg))
    assert_real(repr(list(customers.using("admin").values("name"))))


def test_defer_of_the_deny_columns(models: ModuleType) -> None:
    """What works before deny columns read as NULL: leave them out of the query."""
    customers = list(models.Customers.objects.defer("cc_number").order_by("i_customer")[:2])
    accounts = list(models.Accounts.objects.defer("sip_password").order_by("i_account")[:2])
    assert [c.pk for c in customers] == [1, 2] and [a.pk for a in accounts] == [10, 20]
    text = repr(
        [(c.pk, c.name, c.email, c.phone, c.login, c.extra) for c in customers]
        + [(a.pk, a.id, a.ip, a.mac) for a in accounts]
    )
    assert_masked(text)
    assert customers[0].name.startswith("Z*")


# -- writes ------------------------------------------------------------------------------------


def test_save_with_update_fields(models: ModuleType, compat: Compat) -> None:
    customer = models.Customers.objects.get(pk=3)
    customer.notes = "called back"
    customer.save(update_fields=["notes"])
    stored = direct(compat, "SELECT notes, name FROM billing.customers WHERE i_customer = 3")
    assert stored == [("called back", "Customer 000003")]


def test_save_of_every_field_keeps_the_personal_values(models: ModuleType, compat: Compat) -> None:
    """`save()` without `update_fields` writes every field back as it was read: the masked
    values and the NULL of a deny column must keep what is stored."""
    before = stored_row(compat, "SELECT * FROM billing.accounts WHERE i_account = 104")
    account = models.Accounts.objects.get(pk=104)
    assert account.sip_password is None
    account.balance = decimal.Decimal("9.99")
    account.save()
    after = stored_row(compat, "SELECT * FROM billing.accounts WHERE i_account = 104")
    assert after.pop("balance") == decimal.Decimal("9.99") != before.pop("balance")
    assert after == before  # ip, mac and sip_password (and every other column) as they were

    before = stored_row(compat, "SELECT * FROM billing.customers WHERE i_customer = 4")
    customer = models.Customers.objects.get(pk=4)
    customer.notes = "moved"
    customer.save()
    after = stored_row(compat, "SELECT * FROM billing.customers WHERE i_customer = 4")
    assert after.pop("notes") == "moved" != before.pop("notes")
    assert after == before


def test_save_of_a_model_with_masked_columns_keeps_the_originals(
    models: ModuleType, compat: Compat
) -> None:
    """The same for a table without deny columns: saving an xDR writes back its masked CLI."""
    xdr = models.Xdrs.objects.get(i_xdr=3)
    assert xdr.cli == "+**********00"
    xdr.charged = decimal.Decimal("2.75")
    xdr.save()
    xdr.refresh_from_db()
    assert xdr.charged == decimal.Decimal("2.75")
    stored = direct(compat, "SELECT cli, charged FROM billing.xdrs WHERE i_xdr = 3")
    assert stored == [("+420600000000", decimal.Decimal("2.7500"))]


def test_refresh_from_db(models: ModuleType) -> None:
    account = models.Accounts.objects.get(pk=10)
    models.Accounts.objects.filter(pk=10).update(blocked=True)
    account.refresh_from_db()
    assert account.blocked is True and account.sip_password is None
    models.Accounts.objects.filter(pk=10).update(blocked=False)
    assert_masked(dump(account))
