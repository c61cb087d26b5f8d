INSERT INTO billing.aliases
SELECT g / 4, g, 'sip:user' || billing.demo_pad(g, 7) || '@example.invalid'
  FROM generate_series(4, current_setting('pgveil_demo.accounts')::int, 4) g;
INSERT INTO billing.phonebook
SELECT p, 1 + (p - 1) / 3, billing.demo_first(p) || ' ' || billing.demo_last(p / 3),
       billing.demo_phone(p * 7)
  FROM generate_series(1, 3 * current_setting('pgveil_demo.accounts')::int) p;
