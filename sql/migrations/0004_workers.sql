-- 0004_workers: the workers table (one row per worker process, written by its heartbeat) and
-- the index that lets tasker.repair_messages() find live tasks without reading every task.
--
-- tasker.workers is written by tasker.worker_heartbeat() at most every few seconds per worker
-- and read by step explanations (which worker lacks a handler, since when) and operators. Rows
-- of stopped workers stay (their last_heartbeat_at ages) until tasker.cleanup_workers()
-- removes those older than its cut-off.
CREATE TABLE tasker.workers (
    worker_id          text PRIMARY KEY,
    host               text NOT NULL,
    pid                integer NOT NULL,
    namespaces         text[] NOT NULL,
    handlers           text[] NOT NULL,         -- handler names the worker has registered
    started_at         timestamptz NOT NULL,
    last_heartbeat_at  timestamptz NOT NULL DEFAULT clock_timestamp(),
    in_flight          integer NOT NULL DEFAULT 0,  -- steps claimed and not yet acknowledged
    -- handler name -> first time this worker claimed a step whose handler it does not have
    missing_handlers   jsonb NOT NULL DEFAULT '{}'
);

COMMENT ON TABLE tasker.workers IS
    'One row per worker (heartbeat at most every few seconds): handlers, in-flight count, missing handlers.';

-- Live tasks (not complete, cancelled or resolved: completed_at is set exactly when a task
-- finishes). repair_messages() walks this small index instead of every task; only the one
-- update that finishes a task changes completed_at, so claims and outcomes stay HOT.
CREATE INDEX tasks_live_idx ON tasker.tasks (task_uuid) WHERE completed_at IS NULL;
