-- pgveil demo: a PortaBilling-style billing schema that holds every kind of personal data a
-- billing system stores. Reads pgveil_demo.marker (the schema's comment), pgveil_demo.now
-- and pgveil_demo.xdr_days (the xDR partitions: every month from xdr_days before now to the
-- month after now).
CREATE SCHEMA billing;
DO $do$ BEGIN
    EXECUTE format('COMMENT ON SCHEMA billing IS %L', current_setting('pgveil_demo.marker'));
END $do$;
SET search_path = billing, pg_catalog;

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

-- the xDRs' monthly partitions, named xdrs_YYYYMM, bounds at midnight UTC
DO $do$
DECLARE
    now_utc timestamp := current_setting('pgveil_demo.now')::timestamptz AT TIME ZONE 'UTC';
    lo timestamp := date_trunc(
        'month', now_utc - current_setting('pgveil_demo.xdr_days')::int * interval '1 day');
BEGIN
    WHILE lo <= now_utc LOOP
        EXECUTE format(
            'CREATE TABLE billing.%I PARTITION OF billing.xdrs FOR VALUES FROM (%L) TO (%L)',
            'xdrs_' || to_char(lo, 'YYYYMM'),
            lo AT TIME ZONE 'UTC',
            (lo + interval '1 month') AT TIME ZONE 'UTC');
        lo := lo + interval '1 month';
    END LOOP;
END $do$;
