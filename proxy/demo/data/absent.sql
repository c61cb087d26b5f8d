-- Run in the load's transaction just before the billing fixture's script, which begins by
-- dropping any billing schema: the demo loads only where there is none. The demo checked that
-- before it began; this holds it inside the transaction that loads (a schema created in
-- between is an error here, as CREATE SCHEMA's would be, never dropped).
DO $do$ BEGIN
    IF EXISTS (SELECT FROM pg_catalog.pg_namespace WHERE nspname = 'billing') THEN
        RAISE EXCEPTION USING ERRCODE = 'duplicate_schema',
            MESSAGE = 'schema "billing" already exists: the demo loads only where there is none';
    END IF;
END $do$;
