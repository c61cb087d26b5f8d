-- The fake values' building blocks: every value derives from a row number and is obviously
-- fake. Functions of the load only: load/statistics.sql drops them in the same transaction.
CREATE FUNCTION billing.demo_pad(n bigint, width int) RETURNS text
    LANGUAGE sql IMMUTABLE AS $$ SELECT lpad(n::text, width, '0') $$;
CREATE FUNCTION billing.demo_first(n bigint) RETURNS text LANGUAGE sql IMMUTABLE AS $$
    SELECT (ARRAY['Alice', 'Bob', 'Carol', 'Dave', 'Erin', 'Frank', 'Grace', 'Heidi', 'Ivan',
                  'Judy'])[1 + n % 10] $$;
CREATE FUNCTION billing.demo_last(n bigint) RETURNS text LANGUAGE sql IMMUTABLE AS $$
    SELECT (ARRAY['Doe', 'Roe', 'Sample', 'Example', 'Placeholder', 'Testperson', 'Mock',
                  'Dummy'])[1 + n % 8] $$;
CREATE FUNCTION billing.demo_city(n bigint) RETURNS text LANGUAGE sql IMMUTABLE AS $$
    SELECT (ARRAY['Springfield', 'Shelbyville', 'Ogdenville', 'North Haverbrook',
                  'Capital City'])[1 + n % 5] $$;
-- +1-555-01xx: the range reserved for fictional use
CREATE FUNCTION billing.demo_phone(n bigint) RETURNS text LANGUAGE sql IMMUTABLE AS $$
    SELECT '+1-555-01' || lpad((n % 100)::text, 2, '0') $$;
CREATE FUNCTION billing.demo_account_number(n bigint) RETURNS text LANGUAGE sql IMMUTABLE AS $$
    SELECT '+1555' || lpad(n::text, 7, '0') $$;
