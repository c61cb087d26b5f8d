"""psql as a masked role: the `\\d` family and the other catalog meta-commands, expanded
output, `\\copy ... to stdout`, `\\encoding`, `\\conninfo`, `\\gdesc`, run as a subprocess
through pgveil.

A meta-command reads only the catalog, so the masked role must get exactly what the
unmasked role gets (same text, byte for byte); queries of personal data must show only
masked values, and the same commands as the unmasked role the real ones.
"""

from __future__ import annotations

import pytest

from tests.compat.conftest import MASKED, SIP_PASSWORD, UNMASKED, Compat, assert_masked, assert_real
from tests.integration.masking_fixture import EMAIL, NAME

META_COMMANDS = [
    "\\d", "\\d+", "\\dt", "\\dt+", "\\dt billing.*", "\\d customers", "\\d+ customers",
    "\\d accounts", "\\d+ xdrs", "\\d xdrs_2024_01", "\\d customer_contacts",
    "\\d+ customer_contacts", "\\d customers_pkey", "\\da", "\\dA", "\\dAc", "\\dAf btree",
    "\\dAo brin", "\\dAp brin", "\\db", "\\dc", "\\dC", "\\dd", "\\dD", "\\ddp", "\\dE",
    "\\des", "\\det",
    "\\deu", "\\dew",
    "\\df", "\\df+", "\\df billing.*", "\\dF", "\\dFd",
    "\\dFp", "\\dFt", "\\dg", "\\di", "\\di+", "\\dl", "\\dL", "\\dm", "\\dn", "\\dn+", "\\do",
    "\\dO", "\\dp", "\\dP", "\\dP+", "\\drds", "\\dRp", "\\dRs", "\\ds", "\\dT", "\\dT+",
    "\\du", "\\du+", "\\dv", "\\dx", "\\dX", "\\dy", "\\l", "\\l+", "\\lo_list", "\\z",
    "\\dconfig", "\\sf billing.invoice_total", "\\sv billing.customer_contacts",
]  # fmt: skip


@pytest.mark.parametrize("command", META_COMMANDS)
def test_meta_command(compat: Compat, command: str) -> None:
    rc, masked = compat.psql("-c", command)
    assert rc == 0, masked
    assert "ERROR:" not in masked and "pgveil:" not in masked, masked
    rc, unmasked = compat.psql("-c", command, user=UNMASKED)
    assert rc == 0, unmasked
    assert masked == unmasked
    assert_masked(masked)


def test_describe_lists_the_schema(compat: Compat) -> None:
    """The catalog commands above are not empty: they show the billing schema."""
    _, tables = compat.psql("-c", "\\dt")
    for t in ("accounts", "customer_classes", "customers", "xdrs", "xdrs_2024_01"):
        assert f" billing | {t} " in tables, tables
    _, customers = compat.psql("-c", "\\d+ customers")
    for column in ("cc_number", "extra", "status", "credit_limit"):
        assert f" {column} " in customers, customers
    assert "customers_email_key" in customers and "Referenced by:" in customers


def test_expanded_select(compat: Compat) -> None:
    script = "\\x\nSELECT * FROM customers WHERE i_customer = 1;\nSELECT * FROM accounts ORDER BY i_account LIMIT 2;\n"
    rc, masked = compat.psql("-v", "ON_ERROR_STOP=1", stdin=script)
    assert rc == 0, masked
    assert "-[ RECORD 1 ]" in masked and "name             | Z*****************t" in masked
    assert_masked(masked)
    rc, unmasked = compat.psql("-v", "ON_ERROR_STOP=1", stdin=script, user=UNMASKED)
    assert rc == 0 and SIP_PASSWORD in unmasked
    assert_real(unmasked)


@pytest.mark.parametrize(
    "command",
    [
        "\\copy (SELECT * FROM customers ORDER BY i_customer) to stdout",
        "\\copy customers to stdout",
        "\\copy accounts to stdout with (format csv, header)",
        "\\copy (SELECT c.name, a.ip, x.cli FROM customers c JOIN accounts a USING (i_customer)"
        " JOIN xdrs x USING (i_account)) to stdout",
    ],
)
def test_copy_to_stdout(compat: Compat, command: str) -> None:
    rc, masked = compat.psql("-v", "ON_ERROR_STOP=1", "-c", command)
    assert rc == 0, masked
    assert len(masked.splitlines()) >= 3
    assert_masked(masked)
    rc, unmasked = compat.psql("-v", "ON_ERROR_STOP=1", "-c", command, user=UNMASKED)
    assert rc == 0
    assert NAME in unmasked or SIP_PASSWORD in unmasked


def test_gdesc_and_pset_formats(compat: Compat) -> None:
    script = (
        "SELECT name, email, extra, status, credit_limit FROM customers \\gdesc\n"
        "\\pset format csv\n"
        "SELECT name, email, extra FROM customers ORDER BY i_customer LIMIT 1;\n"
        "\\pset format html\n"
        "SELECT name, email FROM customer_contacts WHERE i_customer = 1;\n"
    )
    rc, masked = compat.psql("-v", "ON_ERROR_STOP=1", stdin=script)
    assert rc == 0, masked
    assert "character varying" in masked and "money_pair" in masked
    assert "z***************@canary-mail.example" in masked
    assert_masked(masked)
    assert EMAIL in compat.psql("-v", "ON_ERROR_STOP=1", stdin=script, user=UNMASKED)[1]


def test_conninfo(compat: Compat) -> None:
    rc, out = compat.psql("-c", "\\conninfo")
    assert rc == 0
    assert f'You are connected to database "compat" as user "{MASKED}"' in out, out


def test_encoding_set_to_the_current_encoding(compat: Compat) -> None:
    rc, out = compat.psql("-v", "ON_ERROR_STOP=1", "-c", "\\encoding UTF8", "-c", "\\encoding")
    assert rc == 0
    assert "invalid encoding" not in out, out
    assert out.strip() == "UTF8"


def test_refusal_is_shown_with_its_sqlstate(compat: Compat) -> None:
    """What a user sees when a statement is refused: psql's ERROR with pgveil's reason and
    SQLSTATE 42501, and the session goes on."""
    script = (
        "\\set VERBOSITY verbose\nDO $$ BEGIN PERFORM 1; END $$;\nSELECT count(*) FROM customers;\n"
    )
    rc, out = compat.psql(stdin=script)
    assert rc == 0
    assert "ERROR:  42501: pgveil: DO blocks are not allowed for masked roles" in out, out
    assert " 30\n" in out
