-- xDRs pgveil_demo.first to pgveil_demo.last: accounts spread by a multiplicative step, times
-- over the last pgveil_demo.xdr_days days
INSERT INTO billing.xdrs
SELECT g, a, billing.demo_account_number(a),
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
                       ((g * 37) % 3600)::int AS d) x;
