-- Read-only views for the roles (docs/architecture.md, "Roles"): the least-privilege roles
-- have no table privileges, so what they may read of templates and the audit trail is exposed
-- here (a view runs with its owner's table privileges; sql/functions/99_grants.sql grants
-- SELECT on it per role). v_tasks and v_steps are in 90_inspection.sql.

-- Registered template versions with their bodies: workers read the newest versions of their
-- namespaces at start (handler check), clients and the CLI list them.
CREATE VIEW tasker.v_templates AS
SELECT nt.named_task_id, nt.namespace, nt.name, nt.version, nt.version_major, nt.version_minor,
       nt.version_patch, nt.version_pre, nt.version_pre_key, nt.step_count, nt.description,
       nt.template, nt.created_at
  FROM tasker.named_tasks nt;
COMMENT ON VIEW tasker.v_templates IS
    'Registered template versions with their normalised bodies, read-only.';

-- The step audit trail (tasker.step_transitions), read-only.
CREATE VIEW tasker.v_step_transitions AS
SELECT tr.transition_id, tr.step_uuid, tr.task_uuid, tr.from_state, tr.to_state, tr.event,
       tr.attempt, tr.worker_id, tr.duration_ms, tr.error_summary, tr.metadata, tr.created_at
  FROM tasker.step_transitions tr;
COMMENT ON VIEW tasker.v_step_transitions IS
    'Every state change of every step (the step audit trail), read-only.';

-- The task audit trail (tasker.task_transitions), read-only.
CREATE VIEW tasker.v_task_transitions AS
SELECT tr.transition_id, tr.task_uuid, tr.from_state, tr.to_state, tr.event, tr.metadata,
       tr.created_at
  FROM tasker.task_transitions tr;
COMMENT ON VIEW tasker.v_task_transitions IS
    'Every state change of every task (the task audit trail), read-only.';
