-- 0009_retention: what tasker.purge_finished() (sql/functions/85_retention.sql) needs to delete
-- finished tasks: a retention policy per namespace, the idempotency keys of purged tasks, and an
-- index that finds finished tasks by age.
--
-- No policy row for a namespace means its tasks are kept forever (as before this migration).

CREATE TABLE tasker.retention_policies (
    namespace              text PRIMARY KEY,
    -- finished tasks (complete, cancelled, resolved_manually) are deleted this long after
    -- completed_at
    keep_finished          interval NOT NULL,
    -- tasks left in error are deleted this long after their last change; NULL keeps them
    purge_error_after      interval,
    -- the idempotency key of a deleted task keeps answering with its uuid this long
    keep_idempotency_keys  interval NOT NULL DEFAULT interval '7 days',
    updated_at             timestamptz NOT NULL DEFAULT now()
);
COMMENT ON TABLE tasker.retention_policies IS
    'Per namespace: how long finished tasks (and, optionally, tasks in error) are kept before purge_finished deletes them; no row keeps them forever.';

-- The idempotency key of a task purge_finished deleted: create_task, create_tasks and
-- create_or_get_task answer a repeated key with task_uuid until expires_at (consulted only when
-- no task holds the key). purge_finished deletes expired rows.
CREATE TABLE tasker.idempotency_keys (
    namespace        text NOT NULL,
    name             text NOT NULL,
    idempotency_key  text NOT NULL,
    task_uuid        uuid NOT NULL,
    expires_at       timestamptz NOT NULL,
    PRIMARY KEY (namespace, name, idempotency_key)
);
COMMENT ON TABLE tasker.idempotency_keys IS
    'Idempotency keys of purged tasks: a repeated key returns the purged task''s uuid until expires_at.';

CREATE INDEX idempotency_keys_expires_idx ON tasker.idempotency_keys (expires_at);

-- Finished tasks by namespace and age: purge_finished reads the oldest first. completed_at is
-- written once, by the update that finishes a task, which is already not HOT (it leaves
-- tasks_live_idx); no other update of a task changes namespace or completed_at.
CREATE INDEX tasks_finished_idx ON tasker.tasks (namespace, completed_at) WHERE completed_at IS NOT NULL;
