-- every 20th customer is terminated: every 40th 400 days ago, the others 10 days ago
INSERT INTO billing.customers
    (i_customer, i_customer_class, i_parent, name, firstname, lastname, companyname, email, phone,
     phone2, address, city, zip, country, bill_status, balance, credit_limit, created_at,
     terminated_at, extra, notes)
SELECT g, 1 + g % 3, CASE WHEN g % 10 = 0 THEN 1 + g % 5 END,
       'Customer ' || billing.demo_pad(g, 6), billing.demo_first(g), billing.demo_last(g / 10),
       CASE WHEN g % 3 = 1 THEN 'Example Trading ' || billing.demo_pad(g, 6) END,
       'customer' || billing.demo_pad(g, 6) || '@example.invalid', billing.demo_phone(g),
       CASE WHEN g % 4 = 0 THEN billing.demo_phone(g + 37) END,
       billing.demo_pad(1 + g % 999, 3) || ' Example Street', billing.demo_city(g / 7),
       billing.demo_pad((g * 7) % 100000, 5), 'ZZ',
       CASE WHEN g % 20 = 0 THEN 'closed' ELSE 'open' END,
       ((g * 37) % 20000) / 100.0 - 50, 100,
       now_ - (400 + g % 1000) * interval '1 day',
       CASE WHEN g % 40 = 0 THEN now_ - interval '400 days'
            WHEN g % 20 = 0 THEN now_ - interval '10 days' END,
       jsonb_build_object(
           'date_of_birth', to_char(date '1950-01-01' + (g * 37) % 18000, 'YYYY-MM-DD'),
           'passport', 'X' || billing.demo_pad(g, 8),
           'vat_id', 'ZZ' || billing.demo_pad((g * 7919) % 1000000000, 9),
           'preferred_language', 'en',
           'marketing_opt_in', g % 2 = 0),
       CASE WHEN g % 5 = 0
            THEN 'Prefers e-mail; spouse ' || billing.demo_first(g + 3) || ' may call' END
  FROM generate_series(1, current_setting('pgveil_demo.customers')::int) g,
       CAST(current_setting('pgveil_demo.now') AS timestamptz) now_;
