-- the load's helper functions go in the same transaction: the schema holds only the tables
DROP FUNCTION billing.demo_pad, billing.demo_first, billing.demo_last, billing.demo_city,
              billing.demo_phone, billing.demo_account_number;
ANALYZE billing.customers, billing.accounts, billing.xdrs;
