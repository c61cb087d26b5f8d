-- two accounts per customer: account g belongs to customer (g + 1) / 2
INSERT INTO billing.accounts
    (i_account, i_customer, id, bill_status, balance, activation_date, subscriber_firstname,
     subscriber_lastname, subscriber_email, subscriber_address, imsi, msisdn, mac, ip,
     sip_password, extra)
SELECT g, c, billing.demo_account_number(g),
       CASE WHEN c % 20 = 0 THEN 'closed' ELSE 'open' END,
       ((g * 53) % 5000) / 100.0, (now_ - (300 + g % 900) * interval '1 day')::date,
       billing.demo_first(g + 1), billing.demo_last(c / 10),
       'subscriber' || billing.demo_pad(g, 7) || '@example.invalid',
       billing.demo_pad(1 + c % 999, 3) || ' Example Street, ' || billing.demo_city(c / 7),
       '00101' || billing.demo_pad(g, 10), '1555' || billing.demo_pad(g, 7),
       -- 02: a locally administered address, never a vendor's
       ('02' || regexp_replace(substr(md5('mac' || g), 1, 10), '(..)', ':\1', 'g'))::macaddr,
       ('198.51.100.' || 1 + g % 254)::inet,
       'demo-sip-' || substr(md5('a' || g), 1, 12),
       jsonb_build_object('emergency_address', billing.demo_pad(1 + c % 999, 3) || ' Example Street',
                          'contact_person', billing.demo_first(g + 2) || ' ' || billing.demo_last(g))
  FROM generate_series(1, current_setting('pgveil_demo.accounts')::int) g,
       LATERAL (SELECT (g + 1) / 2 AS c) x,
       CAST(current_setting('pgveil_demo.now') AS timestamptz) now_;
