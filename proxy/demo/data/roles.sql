-- the demo's roles (recipe.yaml's roles), created or given a new password, marked with the
-- demo's comment, and granted the schema. Roles that exist already must carry the demo's
-- comment: the demo checks that first. Reads pgveil_demo.marker and
-- pgveil_demo.password_<role>.
DO $do$
DECLARE
    role text;
BEGIN
    FOREACH role IN ARRAY ARRAY['admin', 'helpdesk', 'pgveil'] LOOP
        IF NOT EXISTS (SELECT FROM pg_catalog.pg_roles WHERE rolname = role) THEN
            EXECUTE format('CREATE ROLE %I LOGIN', role);
        END IF;
        EXECUTE format('ALTER ROLE %I LOGIN PASSWORD %L', role,
                       current_setting('pgveil_demo.password_' || role));
        EXECUTE format('COMMENT ON ROLE %I IS %L', role, current_setting('pgveil_demo.marker'));
    END LOOP;
END $do$;
GRANT USAGE ON SCHEMA billing TO admin, helpdesk;
GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA billing TO admin;
GRANT SELECT ON ALL TABLES IN SCHEMA billing TO helpdesk;
GRANT UPDATE ON billing.customers, billing.accounts TO helpdesk;
