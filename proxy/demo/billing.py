"""The demo's billing database: schema, generated fake data and masking rules, as text.

A PortaBilling-style `billing` schema that holds every kind of personal data a billing
system stores, and the SQL that fills it on the server side (`INSERT ... SELECT` over
`generate_series`, so a million xDRs load in seconds). Every value is derived from a row
number and is obviously fake: `Customer 000123`, `customer000123@example.invalid`,
`+1-555-0123`, documentation IP ranges, test IMSIs (MCC 001), locally administered MACs.
Some customers were terminated long ago and some recently, in classes with 0-day, 30-day and
10-year retention, so the erasure worker has work.

Pure: builds SQL and YAML text and a few constant byte strings; it opens no connection,
reads no file and prints nothing. `proxy.demo.runner` runs what it builds.
"""

from __future__ import annotations

import datetime as dt
import itertools
import json
import struct
from dataclasses import dataclass

SCHEMA = "billing"
# COMMENT ON SCHEMA marks a schema the demo created: only such a schema is reused or dropped.
MARKER = "pgveil demo: generated fake data; dropped when the demo stops unless --keep"
ADMIN_ROLE = "admin"
HELPDESK_ROLE = "helpdesk"
CATALOG_ROLE = "pgveil"
DEMO_ROLES = (ADMIN_ROLE, HELPDESK_ROLE, CATALOG_ROLE)

FIRSTNAMES = ("Alice", "Bob", "Carol", "Dave", "Erin", "Frank", "Grace", "Heidi", "Ivan", "Judy")
LASTNAMES = ("Doe", "Roe", "Sample", "Example", "Placeholder", "Testperson", "Mock", "Dummy")
CITIES = ("Springfield", "Shelbyville", "Ogdenville", "North Haverbrook", "Capital City")


@dataclass(frozen=True)
class Counts:
    """How many rows each generated table gets at a scale (1.0: 10,000 customers)."""

    customers: int
    xdrs: int

    @classmethod
    def at_scale(cls, scale: float) -> Counts:
        # at least 40 customers, so every class has terminated customers of both ages
        return cls(customers=max(40, round(10_000 * scale)), xdrs=max(100, round(1e6 * scale)))

    @property
    def accounts(self) -> int:
        return 2 * self.customers

    @property
    def recordings(self) -> int:
        return max(1, self.accounts // 10)

    @property
    def invoices(self) -> int:
        return 2 * self.customers


@dataclass(frozen=True)
class Step:
    """A statement of the load (a script of several when it takes no arguments), with the
    share of the work it stands for (about 10 ms on a 2-core machine per unit)."""

    label: str
    sql: str
    args: tuple[object, ...] = ()
    weight: float = 1.0


def _sql_array(values: tuple[str, ...]) -> str:
    return "ARRAY[" + ", ".join("'" + v.replace("'", "''") + "'" for v in values) + "]"


_FIRST = _sql_array(FIRSTNAMES)
_LAST = _sql_array(LASTNAMES)
_CITY = _sql_array(CITIES)


def _pick(array: str, n: int, expr: str) -> str:
    return f"({array})[1 + ({expr}) % {n}]"


def first(expr: str) -> str:
    return _pick(_FIRST, len(FIRSTNAMES), expr)


def last(expr: str) -> str:
    return _pick(_LAST, len(LASTNAMES), expr)


def city(expr: str) -> str:
    return _pick(_CITY, len(CITIES), expr)


def pad(expr: str, width: int) -> str:
    return f"lpad(({expr})::text, {width}, '0')"


def phone(expr: str) -> str:
    """+1-555-01xx: the range reserved for fictional use."""
    return f"'+1-555-01' || {pad(f'({expr}) % 100', 2)}"


def account_number(expr: str) -> str:
    return f"'+1555' || {pad(expr, 7)}"


DDL = f"""
CREATE SCHEMA {SCHEMA};
COMMENT ON SCHEMA {SCHEMA} IS '{MARKER}';
SET search_path = {SCHEMA}, pg_catalog;

CREATE TABLE customer_classes (
    i_customer_class int PRIMARY KEY,
    name text NOT NULL,
    retention interval NOT NULL  -- personal data kept this long after termination
);

CREATE TABLE resellers (
    i_reseller int PRIMARY KEY,
    name text NOT NULL,
    companyname text,
    contact_name text,
    email text,
    phone1 text,
    address text,
    city text,
    zip text,
    country text,
    login text UNIQUE,
    password_hash text
);

CREATE TABLE customers (
    i_customer bigint PRIMARY KEY,
    i_customer_class int NOT NULL REFERENCES customer_classes,
    i_parent int REFERENCES resellers,
    name text NOT NULL,
    firstname text,
    lastname text,
    companyname text,
    email text,
    phone1 text,
    phone2 text,
    address text,
    city text,
    zip text,
    country text,
    bill_status text NOT NULL DEFAULT 'open',
    balance numeric(12,2) NOT NULL DEFAULT 0,
    credit_limit numeric(12,2),
    created_at timestamptz NOT NULL,
    terminated_at timestamptz,
    custom_fields jsonb,
    notes text
);

CREATE TABLE customer_cards (
    i_card bigint PRIMARY KEY,
    i_customer bigint NOT NULL REFERENCES customers,
    cardholder text,
    number text,
    exp_month int,
    exp_year int,
    billing_zip text
);

CREATE TABLE selfcare_credentials (
    i_customer bigint PRIMARY KEY REFERENCES customers,
    login text UNIQUE,
    password_hash text,
    last_login timestamptz
);

CREATE TABLE accounts (
    i_account bigint PRIMARY KEY,
    i_customer bigint NOT NULL REFERENCES customers,
    id text NOT NULL UNIQUE,  -- the account ID: here the subscriber's phone number
    bill_status text NOT NULL DEFAULT 'open',
    balance numeric(12,2) NOT NULL DEFAULT 0,
    activation_date date,
    subscriber_firstname text,
    subscriber_lastname text,
    subscriber_email text,
    subscriber_address text,
    imsi text,
    msisdn text,
    ip_phone_mac macaddr,
    ip inet,
    sip_password text,
    custom_fields jsonb
);

CREATE TABLE aliases (
    i_alias bigint PRIMARY KEY,
    i_account bigint NOT NULL REFERENCES accounts,
    id text NOT NULL
);

CREATE TABLE phonebook (
    i_phonebook bigint PRIMARY KEY,
    i_account bigint NOT NULL REFERENCES accounts,
    name text,
    phone_number text
);

CREATE TABLE vendors (
    i_vendor int PRIMARY KEY,
    name text NOT NULL,
    companyname text,
    contact_name text,
    email text,
    phone1 text,
    address text,
    sip_login text,
    sip_password text
);

CREATE TABLE representatives (
    i_rep int PRIMARY KEY,
    firstname text,
    lastname text,
    email text,
    phone1 text,
    commission_rate numeric(5,2),
    login text UNIQUE,
    password_hash text
);

CREATE TABLE callcentre_staff (
    i_staff int PRIMARY KEY,
    firstname text,
    lastname text,
    email text,
    phone1 text,
    extension text,
    team text,
    login text UNIQUE,
    password_hash text
);

CREATE TABLE administrators (
    i_admin int PRIMARY KEY,
    login text UNIQUE,
    firstname text,
    lastname text,
    email text,
    phone1 text,
    password_hash text,
    totp_secret text
);

CREATE TABLE payment_merchants (
    i_merchant int PRIMARY KEY,
    processor text NOT NULL,
    merchant_login text,
    merchant_secret text
);

CREATE TABLE xdrs (
    i_xdr bigint NOT NULL,
    i_account bigint NOT NULL,
    cli text,
    cld text,
    ip inet,
    connect_time timestamptz NOT NULL,
    disconnect_time timestamptz,
    duration int,
    charged_amount numeric(12,5)
) PARTITION BY RANGE (connect_time);

CREATE TABLE call_recordings (
    i_recording bigint PRIMARY KEY,
    i_account bigint NOT NULL REFERENCES accounts,
    recorded_at timestamptz NOT NULL,
    duration int,
    audio bytea
);

CREATE TABLE voicemails (
    i_voicemail bigint PRIMARY KEY,
    i_account bigint NOT NULL REFERENCES accounts,
    caller text,
    received_at timestamptz NOT NULL,
    audio bytea,
    transcript text
);

CREATE TABLE invoices (
    i_invoice bigint PRIMARY KEY,
    i_customer bigint NOT NULL REFERENCES customers,
    issue_date date NOT NULL,
    amount numeric(12,2),
    pdf bytea
);

CREATE VIEW customer_overview AS
SELECT c.i_customer, c.name, c.email, c.bill_status, a.i_account, a.id AS account_id,
       a.imsi, a.ip
  FROM customers c JOIN accounts a ON a.i_customer = c.i_customer;

RESET search_path;
"""


def month_starts(base: dt.datetime, days_back: int) -> list[dt.datetime]:
    """First instants (UTC) of every month from `days_back` days before `base` to the month
    after it: the bounds of the xDR partitions."""
    start = (base - dt.timedelta(days=days_back)).replace(
        day=1, hour=0, minute=0, second=0, microsecond=0
    )
    out = [start]
    while out[-1] <= base:
        d = out[-1]
        out.append(d.replace(year=d.year + d.month // 12, month=d.month % 12 + 1))
    return out


XDR_DAYS = 180


def partitions(base: dt.datetime) -> str:
    bounds = month_starts(base, XDR_DAYS)
    parts = []
    for lo, hi in itertools.pairwise(bounds):
        parts.append(
            f"CREATE TABLE {SCHEMA}.xdrs_{lo:%Y%m} PARTITION OF {SCHEMA}.xdrs "
            f"FOR VALUES FROM ('{lo.isoformat()}') TO ('{hi.isoformat()}');"
        )
    return "\n".join(parts)


def wav_silence(seconds: float = 0.5, rate: int = 8000) -> bytes:
    """A valid WAV file (8-bit mono PCM) of silence: the stand-in for recorded speech."""
    n = int(seconds * rate)
    header = b"RIFF" + struct.pack("<I", 36 + n) + b"WAVE"
    fmt = b"fmt " + struct.pack("<IHHIIHH", 16, 1, 1, rate, rate, 1, 8)
    return header + fmt + b"data" + struct.pack("<I", n) + b"\x80" * n


# Fixed-width fields make a PDF whose cross-reference offsets are the same for every invoice:
# the server fills them in with format() and the file stays valid.
_PDF_FIELDS = (("invoice", 8), ("name", 15), ("address", 24), ("city", 16), ("amount", 10))


def pdf_template() -> str:
    """A one-page PDF as a format() string with one %s per field of `_PDF_FIELDS`."""
    marks = {name: f"\x00{i}\x00" for i, (name, _w) in enumerate(_PDF_FIELDS)}
    text = (
        f"BT /F1 16 Tf 72 770 Td (Invoice {marks['invoice']}) Tj "
        f"/F1 11 Tf 0 -30 Td ({marks['name']}) Tj 0 -15 Td ({marks['address']}) Tj "
        f"0 -15 Td ({marks['city']}) Tj 0 -30 Td (Amount due: {marks['amount']}) Tj "
        "0 -30 Td (Generated by pgveil demo: fake data) Tj ET"
    )
    widths = {m: w for (name, w), m in zip(_PDF_FIELDS, marks.values(), strict=True)}
    stream_len = len(text) + sum(w - len(m) for m, w in widths.items())
    objects = [
        "<< /Type /Catalog /Pages 2 0 R >>",
        "<< /Type /Pages /Kids [3 0 R] /Count 1 >>",
        "<< /Type /Page /Parent 2 0 R /MediaBox [0 0 595 842] /Contents 4 0 R "
        "/Resources << /Font << /F1 5 0 R >> >> >>",
        f"<< /Length {stream_len} >>\nstream\n{text}\nendstream",
        "<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>",
    ]
    out = "%PDF-1.4\n"
    offsets = []
    size = len(out)
    for i, body in enumerate(objects, 1):
        offsets.append(size)
        chunk = f"{i} 0 obj\n{body}\nendobj\n"
        out += chunk
        size += len(chunk) + sum((w - len(m)) * chunk.count(m) for m, w in widths.items())
    xref = f"xref\n0 {len(objects) + 1}\n0000000000 65535 f \n"
    xref += "".join(f"{o:010d} 00000 n \n" for o in offsets)
    out += xref + f"trailer\n<< /Size {len(objects) + 1} /Root 1 0 R >>\nstartxref\n{size}\n%%EOF\n"
    out = out.replace("%", "%%")
    for m in marks.values():
        out = out.replace(m, "%s")
    return out


def _pdf_expr(template_param: str, **fields: str) -> str:
    args = ", ".join(f"rpad(({fields[name]})::text, {w})" for name, w in _PDF_FIELDS)
    return f"convert_to(format({template_param}, {args}), 'LATIN1')"


def load_steps(counts: Counts, base: dt.datetime, chunk: int = 50_000) -> list[Step]:
    """The statements that fill the schema, in order. `base` is the load's "now" (UTC)."""
    n_c, n_a = counts.customers, counts.accounts
    b = "$1::timestamptz"
    steps = [
        Step(
            "staff and partners",
            f"""
            INSERT INTO {SCHEMA}.customer_classes VALUES
              (1, 'Residential', '0 days'), (2, 'Business', '30 days'),
              (3, 'Regulated', '10 years');
            INSERT INTO {SCHEMA}.resellers
            SELECT g, 'Reseller ' || {pad("g", 2)}, 'Example Reseller ' || {pad("g", 2)} || ' Ltd',
                   {first("g")} || ' ' || {last("g")},
                   'reseller' || {pad("g", 2)} || '@example.invalid',
                   {phone("g + 50")}, {pad("g * 7", 3)} || ' Partner Road', {city("g")},
                   {pad("g * 311", 5)}, 'ZZ', 'reseller' || {pad("g", 2)},
                   '$demo$' || md5('reseller' || g)
              FROM generate_series(1, 5) g;
            INSERT INTO {SCHEMA}.vendors
            SELECT g, 'Vendor ' || {pad("g", 2)}, 'Example Carrier ' || {pad("g", 2)},
                   {first("g + 3")} || ' ' || {last("g + 3")},
                   'noc@vendor' || {pad("g", 2)} || '.example.invalid',
                   {phone("g + 60")}, {pad("g * 13", 3)} || ' Carrier Avenue',
                   'vendor' || {pad("g", 2)}, 'demo-sip-secret-' || md5('vendor' || g)
              FROM generate_series(1, 8) g;
            INSERT INTO {SCHEMA}.representatives
            SELECT g, {first("g + 5")}, {last("g + 1")},
                   'rep' || {pad("g", 2)} || '@example.invalid', {phone("g + 70")}, 5 + g % 10,
                   'rep' || {pad("g", 2)}, '$demo$' || md5('rep' || g)
              FROM generate_series(1, 12) g;
            INSERT INTO {SCHEMA}.callcentre_staff
            SELECT g, {first("g + 7")}, {last("g + 2")},
                   'agent' || {pad("g", 2)} || '@example.invalid', {phone("g + 80")},
                   '7' || {pad("g", 3)}, (ARRAY['billing', 'support'])[1 + g % 2],
                   'agent' || {pad("g", 2)}, '$demo$' || md5('agent' || g)
              FROM generate_series(1, 25) g;
            INSERT INTO {SCHEMA}.administrators
            SELECT g, 'admin' || {pad("g", 2)}, {first("g + 1")}, {last("g + 4")},
                   'admin' || {pad("g", 2)} || '@example.invalid', {phone("g + 90")},
                   '$demo$' || md5('admin' || g), upper(substr(md5('totp' || g), 1, 16))
              FROM generate_series(1, 4) g;
            INSERT INTO {SCHEMA}.payment_merchants VALUES
              (1, 'ExamplePay', 'merchant-demo-01', 'sk_demo_' || md5('m1')),
              (2, 'DemoGateway', 'merchant-demo-02', 'sk_demo_' || md5('m2')),
              (3, 'TestCard', 'merchant-demo-03', 'sk_demo_' || md5('m3'));
            """,
            weight=1,
        ),
        Step(
            "customers",
            # every 20th customer is terminated: every 40th 400 days ago, the others 10 days ago
            f"""
            INSERT INTO {SCHEMA}.customers
            SELECT g, 1 + g % 3, CASE WHEN g % 10 = 0 THEN 1 + g % 5 END,
                   'Customer ' || {pad("g", 6)}, {first("g")}, {last("g / 10")},
                   CASE WHEN g % 3 = 1 THEN 'Example Trading ' || {pad("g", 6)} END,
                   'customer' || {pad("g", 6)} || '@example.invalid', {phone("g")},
                   CASE WHEN g % 4 = 0 THEN {phone("g + 37")} END,
                   {pad("1 + g % 999", 3)} || ' Example Street', {city("g / 7")},
                   {pad("(g * 7) % 100000", 5)}, 'ZZ',
                   CASE WHEN g % 20 = 0 THEN 'closed' ELSE 'open' END,
                   ((g * 37) % 20000) / 100.0 - 50, 100,
                   {b} - (400 + g % 1000) * interval '1 day',
                   CASE WHEN g % 40 = 0 THEN {b} - interval '400 days'
                        WHEN g % 20 = 0 THEN {b} - interval '10 days' END,
                   jsonb_build_object(
                       'date_of_birth', to_char(date '1950-01-01' + (g * 37) % 18000, 'YYYY-MM-DD'),
                       'passport', 'X' || {pad("g", 8)},
                       'vat_id', 'ZZ' || {pad("(g * 7919) % 1000000000", 9)},
                       'preferred_language', 'en',
                       'marketing_opt_in', g % 2 = 0),
                   CASE WHEN g % 5 = 0
                        THEN 'Prefers e-mail; spouse ' || {first("g + 3")} || ' may call' END
              FROM generate_series(1, {n_c}) g
            """,
            (base,),
            weight=15 * n_c / 10_000,
        ),
        Step(
            "customers",
            f"""
            INSERT INTO {SCHEMA}.customer_cards
            SELECT g / 2, g, 'CUSTOMER ' || {pad("g", 6)},
                   '4111 1111 ' || substr({pad("g", 8)}, 1, 4) || ' '
                       || substr({pad("g", 8)}, 5, 4),
                   1 + g % 12, 2027 + g % 5, {pad("(g * 7) % 100000", 5)}
              FROM generate_series(2, {n_c}, 2) g
            """,
            weight=2 * n_c / 10_000,
        ),
        Step(
            "customers",
            f"""
            INSERT INTO {SCHEMA}.selfcare_credentials
            SELECT g, 'customer' || {pad("g", 6)}, '$demo$' || md5('customer' || g),
                   {b} - (g % 90) * interval '1 day'
              FROM generate_series(1, {n_c}) g
            """,
            (base,),
            weight=2 * n_c / 10_000,
        ),
        Step(
            "accounts",
            f"""
            INSERT INTO {SCHEMA}.accounts
            SELECT g, c, {account_number("g")},
                   CASE WHEN c % 20 = 0 THEN 'closed' ELSE 'open' END,
                   ((g * 53) % 5000) / 100.0, ({b} - (300 + g % 900) * interval '1 day')::date,
                   {first("g + 1")}, {last("c / 10")},
                   'subscriber' || {pad("g", 7)} || '@example.invalid',
                   {pad("1 + c % 999", 3)} || ' Example Street, ' || {city("c / 7")},
                   '00101' || {pad("g", 10)}, '1555' || {pad("g", 7)},
                   -- 02: a locally administered address, never a vendor's
                   ('02' || regexp_replace(substr(md5('mac' || g), 1, 10), '(..)', ':\\1', 'g')
                   )::macaddr,
                   ('198.51.100.' || 1 + g % 254)::inet,
                   'demo-sip-' || substr(md5('a' || g), 1, 12),
                   jsonb_build_object('emergency_address',
                                      {pad("1 + c % 999", 3)} || ' Example Street',
                                      'contact_person', {first("g + 2")} || ' ' || {last("g")})
              FROM generate_series(1, {n_a}) g, LATERAL (SELECT (g + 1) / 2 AS c) x
            """,
            (base,),
            weight=40 * n_a / 20_000,
        ),
        Step(
            "accounts",
            f"""
            INSERT INTO {SCHEMA}.aliases
            SELECT g / 4, g, 'sip:user' || {pad("g", 7)} || '@example.invalid'
              FROM generate_series(4, {n_a}, 4) g;
            INSERT INTO {SCHEMA}.phonebook
            SELECT p, 1 + (p - 1) / 3, {first("p")} || ' ' || {last("p / 3")}, {phone("p * 7")}
              FROM generate_series(1, 3 * {n_a}) p;
            """,
            weight=17 * n_a / 20_000,
        ),
    ]
    done = 0
    while done < counts.xdrs:
        hi = min(counts.xdrs, done + chunk)
        steps.append(
            Step(
                "xDRs",
                # accounts spread by a multiplicative step; times over the last 180 days
                f"""
                INSERT INTO {SCHEMA}.xdrs
                SELECT g, a, {account_number("a")},
                       '+1555' || {pad("(g * 7) % 10000000", 7)},
                       CASE WHEN a % 4 = 0 THEN ('2001:db8::' || to_hex(a))::inet
                            ELSE ('203.0.113.' || 1 + a % 254)::inet END,
                       t, t + d * interval '1 second', d, round(d * 0.0005, 5)
                  FROM generate_series({done + 1}::bigint, {hi}) g,
                       LATERAL (SELECT 1 + (g * 7919) % {n_a} AS a,
                                       {b} - ((g * 104729) % {XDR_DAYS * 86400} + 1)
                                             * interval '1 second' AS t,
                                       ((g * 37) % 3600)::int AS d) x
                """,
                (base,),
                weight=180 * (hi - done) / 1_000_000,
            )
        )
        done = hi
    n_r = counts.recordings
    pdf = _pdf_expr(
        "$2::text",
        invoice=pad("g", 8),
        name="c.name",
        address="c.address",
        city="c.city",
        amount="to_char(amt, 'FM999990.00')",
    )
    steps += [
        Step(
            "recordings",
            f"""
            INSERT INTO {SCHEMA}.call_recordings
            SELECT g, 1 + (g * 13) % {n_a}, {b} - (g % 170) * interval '1 day', 30 + g % 600, $2
              FROM generate_series(1, {n_r}) g
            """,
            (base, wav_silence()),
            weight=3 * n_r / 2_000,
        ),
        Step(
            "recordings",
            f"""
            INSERT INTO {SCHEMA}.voicemails
            SELECT g, 1 + (g * 17) % {n_a}, {phone("g * 3")}, {b} - (g % 60) * interval '1 day',
                   $2, 'Hi, this is ' || {first("g")} || ' ' || {last("g")}
                       || ', please call me back on ' || {phone("g * 3")}
              FROM generate_series(1, {n_r}) g
            """,
            (base, wav_silence()),
            weight=4 * n_r / 2_000,
        ),
        Step(
            "invoices",
            f"""
            INSERT INTO {SCHEMA}.invoices
            SELECT g, c.i_customer, ($1::timestamptz - (g % 2) * interval '1 month')::date,
                   amt, {pdf}
              FROM generate_series(1, {counts.invoices}) g
              JOIN {SCHEMA}.customers c ON c.i_customer = (g + 1) / 2,
                   LATERAL (SELECT ((g * 7907) % 20000) / 100.0 AS amt) x
            """,
            (base, pdf_template()),
            weight=23 * counts.invoices / 20_000,
        ),
        Step(
            "indexes",
            f"""
            CREATE INDEX ON {SCHEMA}.xdrs (i_account, connect_time);
            CREATE INDEX ON {SCHEMA}.xdrs (i_account, i_xdr);
            CREATE INDEX ON {SCHEMA}.accounts (i_customer);
            CREATE INDEX ON {SCHEMA}.customer_cards (i_customer);
            CREATE INDEX ON {SCHEMA}.aliases (i_account);
            CREATE INDEX ON {SCHEMA}.phonebook (i_account);
            CREATE INDEX ON {SCHEMA}.call_recordings (i_account);
            CREATE INDEX ON {SCHEMA}.voicemails (i_account);
            CREATE INDEX ON {SCHEMA}.invoices (i_customer);
            """,
            weight=60 * counts.xdrs / 1_000_000 + 1,
        ),
        Step(
            "statistics",
            f"ANALYZE {SCHEMA}.customers, {SCHEMA}.accounts, {SCHEMA}.xdrs",
            weight=10 + 65 * min(1.0, counts.xdrs / 1_000_000),
        ),
    ]
    return steps


def roles_sql(passwords: dict[str, str]) -> str:
    """Create (or re-password) the demo's roles and grant them the schema. Roles that already
    exist must carry the demo's comment: the caller checks that first."""
    parts = []
    for role in DEMO_ROLES:
        pw = passwords[role].replace("'", "''")
        parts.append(
            "DO $do$ BEGIN IF NOT EXISTS "
            f"(SELECT FROM pg_catalog.pg_roles WHERE rolname = '{role}') "
            f"THEN CREATE ROLE {role} LOGIN; END IF; END $do$;"
            f"\nALTER ROLE {role} LOGIN PASSWORD '{pw}';"
            f"\nCOMMENT ON ROLE {role} IS '{MARKER}';"
        )
    parts.append(
        f"""
        GRANT USAGE ON SCHEMA {SCHEMA} TO {ADMIN_ROLE}, {HELPDESK_ROLE};
        GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA {SCHEMA} TO {ADMIN_ROLE};
        GRANT SELECT ON ALL TABLES IN SCHEMA {SCHEMA} TO {HELPDESK_ROLE};
        GRANT UPDATE ON {SCHEMA}.customers, {SCHEMA}.accounts TO {HELPDESK_ROLE};
        """
    )
    return "\n".join(parts)


DUE_SQL = f"""
SELECT count(*) FROM {SCHEMA}.customers c
  JOIN {SCHEMA}.customer_classes k USING (i_customer_class)
 WHERE c.terminated_at IS NOT NULL AND c.terminated_at + k.retention <= now()
"""


def erasure_yaml(audit_file: str | None) -> str:
    """The demo's erasure configuration (`pgveil erase`): terminated customers lose their
    personal data when their class's retention has passed; customers, accounts, xDRs and
    invoices stay, credentials, cards, aliases, phone books, recordings and voicemails go.
    The audit file's path is written as a JSON string, which YAML reads whatever it holds;
    without one, events go to standard output (deploy/erasure.yaml, for containers)."""
    audit = f"file: {json.dumps(audit_file)}" if audit_file is not None else "stdout: true"
    return f"""\
# pgveil demo erasure: `pgveil erase run --once --config THIS --dsn ...`
subject:
  table: {SCHEMA}.customers
  key: i_customer
  terminated_at: terminated_at
  retention:
    default: 30 days
    class_table: {{table: {SCHEMA}.customer_classes, key: i_customer_class, column: retention}}
tables:
  {SCHEMA}.customers:
    columns:
      name: {{placeholder: "[erased]"}}
      firstname: null
      lastname: null
      companyname: null
      email: null
      phone1: null
      phone2: null
      address: null
      city: null
      zip: null
      custom_fields: null
      notes: null
  {SCHEMA}.customer_cards: {{owner: {{column: i_customer}}, action: delete}}
  {SCHEMA}.selfcare_credentials: {{owner: {{column: i_customer}}, action: delete}}
  {SCHEMA}.invoices: {{owner: {{column: i_customer}}, columns: {{pdf: null}}}}
  {SCHEMA}.accounts:
    owner: {{column: i_customer}}
    key: i_account
    columns:
      id: {{placeholder: "erased-{{key}}"}}
      subscriber_firstname: null
      subscriber_lastname: null
      subscriber_email: null
      subscriber_address: null
      imsi: null
      msisdn: null
      ip_phone_mac: null
      ip: null
      sip_password: null
      custom_fields: null
  {SCHEMA}.aliases: {{owner: {{column: i_account, through: {SCHEMA}.accounts}}, action: delete}}
  {SCHEMA}.phonebook: {{owner: {{column: i_account, through: {SCHEMA}.accounts}}, action: delete}}
  {SCHEMA}.call_recordings:
    owner: {{column: i_account, through: {SCHEMA}.accounts}}
    action: delete
  {SCHEMA}.voicemails: {{owner: {{column: i_account, through: {SCHEMA}.accounts}}, action: delete}}
  {SCHEMA}.xdrs:
    owner: {{column: i_account, through: {SCHEMA}.accounts}}
    large: true
    key: i_xdr
    columns: {{cli: null, cld: null, ip: null}}
audit:
  {audit}
"""


def rules_yaml(hash_key_file: str) -> str:
    """The demo's masking rules: `helpdesk` is masked, `admin` sees everything. The key
    file's path is written as a JSON string, which YAML reads whatever it holds."""
    partial2 = "{mask: partial, keep_first: 1, keep_last: 2}"
    return f"""\
# pgveil demo rules: which columns of the demo's billing schema are personal, and how a
# masked role sees them. `pgveil rules check --rules THIS --dsn ...` checks it.
roles:
  unmasked: [{ADMIN_ROLE}]
  masked: [{HELPDESK_ROLE}]
  default: masked
keys:
  hash: {{file: {json.dumps(hash_key_file)}}}
tables:
  billing.customers:
    subject: i_customer
    columns:
      name: partial
      firstname: partial
      lastname: partial
      companyname: partial
      email: email
      phone1: {partial2}
      phone2: {partial2}
      address: partial
      city: partial
      zip: partial
      country: partial
      notes: redact
      custom_fields:
        mask: json
        keys:
          date_of_birth: {{mask: partial, keep_first: 4, keep_last: 0}}
          passport: partial
          vat_id: partial
  billing.customer_cards:
    subject: i_customer
    columns:
      cardholder: partial
      number: digits
      billing_zip: partial
  billing.selfcare_credentials:
    subject: i_customer
    columns:
      login: hash
      password_hash: deny
  billing.resellers:
    columns:
      name: partial
      companyname: partial
      contact_name: partial
      email: email
      phone1: {partial2}
      address: partial
      city: partial
      zip: partial
      country: partial
      login: hash
      password_hash: deny
  billing.accounts:
    subject: i_account
    columns:
      id: {{mask: partial, keep_first: 2, keep_last: 2}}
      subscriber_firstname: partial
      subscriber_lastname: partial
      subscriber_email: email
      subscriber_address: partial
      imsi: {{mask: partial, keep_first: 5, keep_last: 2}}
      msisdn: {partial2}
      ip_phone_mac: partial
      ip: partial
      sip_password: deny
      custom_fields: {{mask: json, keys: {{emergency_address: partial, contact_person: partial}}}}
  billing.aliases:
    subject: i_account
    columns:
      id: {{mask: partial, keep_first: 4, keep_last: 2}}
  billing.phonebook:
    subject: i_account
    columns:
      name: partial
      phone_number: {partial2}
  billing.xdrs:
    subject: i_account
    columns:
      cli: {partial2}
      cld: {partial2}
      ip: partial
  billing.call_recordings:
    subject: i_account
    columns:
      audio: deny
  billing.voicemails:
    subject: i_account
    columns:
      caller: {partial2}
      audio: deny
      transcript: redact
  billing.invoices:
    subject: i_customer
    columns:
      pdf: 'null'
  billing.vendors:
    columns:
      contact_name: partial
      email: email
      phone1: {partial2}
      address: partial
      sip_login: hash
      sip_password: deny
  billing.representatives:
    columns:
      firstname: partial
      lastname: partial
      email: email
      phone1: {partial2}
      login: hash
      password_hash: deny
  billing.callcentre_staff:
    columns:
      firstname: partial
      lastname: partial
      email: email
      phone1: {partial2}
      login: hash
      password_hash: deny
  billing.administrators:
    columns:
      login: hash
      firstname: partial
      lastname: partial
      email: email
      phone1: {partial2}
      password_hash: deny
      totp_secret: deny
  billing.payment_merchants:
    columns:
      merchant_login: hash
      merchant_secret: deny
"""
