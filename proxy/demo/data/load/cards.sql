INSERT INTO billing.customer_cards
SELECT g / 2, g, 'CUSTOMER ' || billing.demo_pad(g, 6),
       '4111 1111 ' || substr(billing.demo_pad(g, 8), 1, 4) || ' '
           || substr(billing.demo_pad(g, 8), 5, 4),
       1 + g % 12, 2027 + g % 5, billing.demo_pad((g * 7) % 100000, 5)
  FROM generate_series(2, current_setting('pgveil_demo.customers')::int, 2) g;
