INSERT INTO billing.selfcare_credentials
SELECT g, 'customer' || billing.demo_pad(g, 6), '$demo$' || md5('customer' || g),
       now_ - (g % 90) * interval '1 day'
  FROM generate_series(1, current_setting('pgveil_demo.customers')::int) g,
       CAST(current_setting('pgveil_demo.now') AS timestamptz) now_;
