-- terminated customers whose class's retention has passed: what `pgveil erase` erases
SELECT count(*) FROM billing.customers c
  JOIN billing.customer_classes k USING (i_customer_class)
 WHERE c.terminated_at IS NOT NULL AND c.terminated_at + k.retention <= now()
