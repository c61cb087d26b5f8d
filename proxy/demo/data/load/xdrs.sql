-- xDRs pgveil_demo.first to pgveil_demo.last: accounts spread by a multiplicative step, times
-- over the last pgveil_demo.xdr_days days; the account's number is the CLI and the account ID
INSERT INTO billing.xdrs
    (i_xdr, i_account, account_id, cli, cld, ip, connect_time, disconnect_time, duration, charged)
SELECT g, a, n, n,
       '+1555' || billing.demo_pad((g * 7) % 10000000, 7),
       CASE WHEN a % 4 = 0 THEN ('2001:db8::' || to_hex(a))::inet
            ELSE ('203.0.113.' || 1 + a % 254)::inet END,
       t, t + d * interval '1 second', d, round(d * 0.0005, 5)
  FROM generate_series(current_setting('pgveil_demo.first')::bigint,
                       current_setting('pgveil_demo.last')::bigint) g,
       LATERAL (SELECT 1 + (g * 7919) % current_setting('pgveil_demo.accounts')::int AS a,
                       current_setting('pgveil_demo.now')::timestamptz
                       - ((g * 104729) % (current_setting('pgveil_demo.xdr_days')::int * 86400) + 1)
                         * interval '1 second' AS t,
                       ((g * 37) % 3600)::int AS d) x,
       LATERAL (SELECT billing.demo_account_number(a) AS n) y;
-- an xDR inserted later without an i_xdr gets the next one
SELECT pg_catalog.setval('billing.xdrs_i_xdr_seq', current_setting('pgveil_demo.last')::bigint);
