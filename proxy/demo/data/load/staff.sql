INSERT INTO billing.customer_classes VALUES
  (1, 'Residential', '0 days'), (2, 'Business', '30 days'), (3, 'Regulated', '10 years');
INSERT INTO billing.resellers
SELECT g, 'Reseller ' || billing.demo_pad(g, 2),
       'Example Reseller ' || billing.demo_pad(g, 2) || ' Ltd',
       billing.demo_first(g) || ' ' || billing.demo_last(g),
       'reseller' || billing.demo_pad(g, 2) || '@example.invalid',
       billing.demo_phone(g + 50), billing.demo_pad(g * 7, 3) || ' Partner Road',
       billing.demo_city(g), billing.demo_pad(g * 311, 5), 'ZZ',
       'reseller' || billing.demo_pad(g, 2), '$demo$' || md5('reseller' || g)
  FROM generate_series(1, 5) g;
INSERT INTO billing.vendors
SELECT g, 'Vendor ' || billing.demo_pad(g, 2), 'Example Carrier ' || billing.demo_pad(g, 2),
       billing.demo_first(g + 3) || ' ' || billing.demo_last(g + 3),
       'noc@vendor' || billing.demo_pad(g, 2) || '.example.invalid',
       billing.demo_phone(g + 60), billing.demo_pad(g * 13, 3) || ' Carrier Avenue',
       'vendor' || billing.demo_pad(g, 2), 'demo-sip-secret-' || md5('vendor' || g)
  FROM generate_series(1, 8) g;
INSERT INTO billing.representatives
SELECT g, billing.demo_first(g + 5), billing.demo_last(g + 1),
       'rep' || billing.demo_pad(g, 2) || '@example.invalid', billing.demo_phone(g + 70),
       5 + g % 10, 'rep' || billing.demo_pad(g, 2), '$demo$' || md5('rep' || g)
  FROM generate_series(1, 12) g;
INSERT INTO billing.callcentre_staff
SELECT g, billing.demo_first(g + 7), billing.demo_last(g + 2),
       'agent' || billing.demo_pad(g, 2) || '@example.invalid', billing.demo_phone(g + 80),
       '7' || billing.demo_pad(g, 3), (ARRAY['billing', 'support'])[1 + g % 2],
       'agent' || billing.demo_pad(g, 2), '$demo$' || md5('agent' || g)
  FROM generate_series(1, 25) g;
INSERT INTO billing.administrators
SELECT g, 'admin' || billing.demo_pad(g, 2), billing.demo_first(g + 1), billing.demo_last(g + 4),
       'admin' || billing.demo_pad(g, 2) || '@example.invalid', billing.demo_phone(g + 90),
       '$demo$' || md5('admin' || g), upper(substr(md5('totp' || g), 1, 16))
  FROM generate_series(1, 4) g;
INSERT INTO billing.payment_merchants VALUES
  (1, 'ExamplePay', 'merchant-demo-01', 'sk_demo_' || md5('m1')),
  (2, 'DemoGateway', 'merchant-demo-02', 'sk_demo_' || md5('m2')),
  (3, 'TestCard', 'merchant-demo-03', 'sk_demo_' || md5('m3'));
