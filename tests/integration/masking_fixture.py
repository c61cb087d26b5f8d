"""The billing fixture (`proxy.demo.fixture`) with its canary personal data, test roles,
rules for it, and a pgveil with them.

The canaries are distinctive strings; `SECRETS` lists, per personal column, the part of the
value that its mask must hide (a partial mask shows the first and last symbol, an e-mail
mask keeps the domain, so those parts are not secrets).
"""

from __future__ import annotations

import base64
import hashlib
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from proxy.demo import fixture
from proxy.demo.embedded_pg import EmbeddedPostgres
from rules.masks import hmac_pads
from tests.support import ProxyProcess

HELPDESK, HELPDESK_PW = "helpdesk", "helpdesk-pw-1"
ADMIN, ADMIN_PW = "billing_admin", "admin-pw-1"
AGENT, AGENT_PW = "cc_agent", "agent-pw-1"  # masked through membership of cc_staff
HASH_KEY = "pgveil-test-hash-key-0123456789"

NAME = "Zebulon Quixotehart"
EMAIL = "zebulonq.private@canary-mail.example"
PHONE = "+420777123456"
CARD = "4111222233334444"
LOGIN = "zq_login_secret"
LICENSE = "DL-98765-XQWV"
IP = "198.51.173.222"
MAC = "0a:1b:2c:3d:4e:5f"

# the hidden cores (what no masked output may contain)
SECRETS = {
    "name": "ebulon Quixotehar",
    "email": "ebulonq.privat",
    "phone": "420777123",
    "card": "411122223333",
    "login": LOGIN,
    "license": "L-98765-XQW",
    "ip": ".51.173.",
    "mac": "1b:2c:3d:4e",
}
FULL_VALUES = [NAME, EMAIL.split("@")[0], PHONE, CARD, LOGIN, LICENSE]

# the canaries as the `canaries` part of the billing fixture reads them
CANARIES = {
    "canary_name": NAME,
    "canary_email": EMAIL,
    "canary_phone": PHONE,
    "canary_card": CARD,
    "canary_login": LOGIN,
    "canary_license": LICENSE,
    "canary_ip": IP,
    "canary_mac": MAC,
}

# the test roles and what they may do with the billing fixture's schema
ROLES = f"""
CREATE ROLE {HELPDESK} LOGIN PASSWORD '{HELPDESK_PW}';
CREATE ROLE {ADMIN} LOGIN PASSWORD '{ADMIN_PW}';
CREATE ROLE cc_staff NOLOGIN;
CREATE ROLE {AGENT} LOGIN PASSWORD '{AGENT_PW}' IN ROLE cc_staff;
CREATE ROLE masked_trust LOGIN IN ROLE cc_staff;
GRANT USAGE ON SCHEMA billing TO {HELPDESK}, {ADMIN}, cc_staff;
GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA billing TO {HELPDESK}, {ADMIN}, cc_staff;
GRANT USAGE ON ALL SEQUENCES IN SCHEMA billing TO {HELPDESK}, {ADMIN}, cc_staff;
GRANT EXECUTE ON ALL FUNCTIONS IN SCHEMA billing TO {HELPDESK}, {ADMIN}, cc_staff;
GRANT pg_read_all_stats TO {HELPDESK};
GRANT CREATE ON SCHEMA public TO {HELPDESK};
"""

# the whole setup as one script (the roles last: a copy without them splits at CREATE ROLE)
SCHEMA = fixture.script(parts=("canaries",), settings=CANARIES) + ROLES

RULES = """
roles:
  unmasked: [billing_admin]
  masked: [helpdesk, cc_staff]
  default: unmasked
keys:
  hash: {env: PGVEIL_TEST_HASH_KEY}
functions:
  allow: [billing.invoice_total]
channels:
  invoice_events: {payload: json, keys: {customer_name: partial, email: email}}
tables:
  billing.customers:
    subject: i_customer
    columns:
      name: partial
      email: email
      phone: {mask: partial, keep_first: 1, keep_last: 2}
      cc_number: deny
      login: hash
      extra: {mask: json, keys: {dl: partial}}
  billing.accounts:
    subject: i_account
    columns:
      ip: partial
      mac: partial
  billing.xdrs:
    columns:
      cli: {mask: partial, keep_first: 1, keep_last: 2}
  billing.customer_contacts:
    columns:
      name: partial
      email: email
"""


# A run of hex digits with a letter among them, 16 or longer: an audit event's id, prev and
# hash, a fingerprint, a hash mask's output. Six digits in a row occur in one by chance (a
# window of the phone or card core matched about once in a hundred audit files), so the
# windows below are not looked for inside them; whole secrets and encodings still are.
_HEX_TOKEN = re.compile(r"[0-9a-fA-F]{16,}")


def _without_hex_tokens(text: str) -> str:
    return _HEX_TOKEN.sub(lambda t: t.group() if t.group().isdigit() else "#", text)


def leaks(text: str) -> list[str]:
    """Every secret (or a transform of it) found in `text`."""
    found = []
    hay = _without_hex_tokens(text)
    for col, core in SECRETS.items():
        # (the ip's core whole: any 6 characters of it, `51.173`, are also a log line's
        # seconds and milliseconds)
        size = len(core) if col == "ip" else 6
        for form in (core, core.upper(), core.lower(), core[::-1]):
            windows = {form[i : i + size] for i in range(max(1, len(form) - size + 1))}
            if form in text or any(w in hay for w in windows):
                found.append(col)
                break
    for v in FULL_VALUES:
        b = v.encode()
        for enc in (b.hex(), base64.b64encode(b).decode(), hashlib.md5(b).hexdigest()):
            if enc in text or enc.upper() in text:
                found.append(f"encoded:{v[:3]}")
    return found


def leaks_or_hash_key(text: str) -> list[str]:
    """leaks() plus pgveil's hash-mask key material (the key, its HMAC inner and outer pads):
    what a masked session must not see of a rewritten statement."""
    found = leaks(text)
    ipad, opad = hmac_pads(HASH_KEY.encode())
    for label, pad in (("hash_ipad", ipad[:16]), ("hash_opad", opad[:16])):
        if pad.hex() in text or pad.hex().upper() in text:
            found.append(label)
    if HASH_KEY in text:
        found.append("hash_key")
    return found


def masking_proxy(
    pg: EmbeddedPostgres, rules: Path, metrics: bool = True, extra: tuple[str, ...] = ()
) -> ProxyProcess:
    """A pgveil with these rules in front of `pg` (reads the catalog as the superuser);
    `extra`: more command-line options."""
    env = {"PGVEIL_TEST_HASH_KEY": HASH_KEY, "PGVEIL_CATALOG_PASSWORD": pg.password}
    p = ProxyProcess(
        pg.port,
        "--upstream-sslmode",
        "disable",
        "--rules",
        str(rules),
        "--catalog-user",
        pg.superuser,
        *extra,
        metrics=metrics,
        env=env,
    )
    p.rules_path = rules  # type: ignore[attr-defined]
    return p


@pytest.fixture(scope="session")
def billing(pg: EmbeddedPostgres) -> Iterator[ProxyProcess]:
    pg.psql(SCHEMA)
    d = Path(tempfile.mkdtemp(prefix="pgveil-rules-"))
    rules = d / "rules.yaml"
    rules.write_text(RULES)
    p = masking_proxy(pg, rules)
    yield p
    p.stop()
    shutil.rmtree(d)


def dsn(pg: EmbeddedPostgres, port: int, user: str = HELPDESK, password: str = HELPDESK_PW) -> str:
    return f"host=127.0.0.1 port={port} user={user} password={password} dbname=postgres sslmode=disable"


@pytest.fixture(scope="module")
def text_proxy(pg: EmbeddedPostgres, billing: ProxyProcess) -> Iterator[ProxyProcess]:
    """A pgveil with `billing`'s rules, `masked_prepare` off: the rewritten text as a Query."""
    rules: Path = billing.rules_path  # type: ignore[attr-defined]
    p = masking_proxy(pg, rules, metrics=False, extra=("--masked-prepare", "false"))
    yield p
    p.stop()
