-- Least-privilege roles (docs/architecture.md, "Roles"). The group roles themselves are
-- cluster-wide and created by `migrate` (tasker_pg/migrations.py); sql/functions/99_grants.sql
-- gives every object of schema tasker to the owner role and grants each role its entry points.
-- This table records the role-name prefix this database was migrated with, so every later
-- migrate (and the grants file, which reads it) uses the same role names: two tasker databases
-- on one server keep their roles apart with different prefixes (acme_tasker_worker, ...).
CREATE TABLE tasker.roles_config (
    singleton    boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    role_prefix  text NOT NULL DEFAULT '' CHECK (role_prefix ~ '^([a-z][a-z0-9_]{0,29})?$'),
    created_at   timestamptz NOT NULL DEFAULT now()
);
COMMENT ON TABLE tasker.roles_config IS
    'The role-name prefix of this database''s group roles (<prefix>tasker_owner, ...); one row.';
