-- $1: invoice.pdf.template, a one-page PDF as a format() string with one %s per field; the
-- fields are padded to fixed widths (8, 15, 24, 16, 10) so that the template's cross-
-- reference offsets hold for every invoice
INSERT INTO billing.invoices
SELECT g, c.i_customer,
       (current_setting('pgveil_demo.now')::timestamptz - (g % 2) * interval '1 month')::date,
       amt,
       convert_to(format(convert_from($1, 'LATIN1'),
                         rpad((billing.demo_pad(g, 8))::text, 8),
                         rpad((c.name)::text, 15),
                         rpad((c.address)::text, 24),
                         rpad((c.city)::text, 16),
                         rpad((to_char(amt, 'FM999990.00'))::text, 10)), 'LATIN1')
  FROM generate_series(1, current_setting('pgveil_demo.invoices')::int) g
  JOIN billing.customers c ON c.i_customer = (g + 1) / 2,
       LATERAL (SELECT ((g * 7907) % 20000) / 100.0 AS amt) x;
