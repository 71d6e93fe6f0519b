-- 0013_waits: durable waits. A wait_for_event step completes when tasker.emit_event names its
-- event and key; a sleep step completes at a time. Neither runs a handler nor gets a queue
-- message: when one becomes ready it goes to the new step state `waiting` with one
-- tasker.step_waits row, and emit_event or tasker.wake_waits() (sleeps, timeouts, rechecks)
-- completes it (sql/functions/88_waits.sql).

-- A wait step runs no handler.
ALTER TABLE tasker.named_steps
    ALTER COLUMN handler DROP NOT NULL,
    -- wait_for_event: {"event", "key" (a $.path into the task context), "timeout_seconds",
    -- "on_timeout" (fail | complete), "default"}; sleep: {"duration_seconds", "until" (a
    -- $.path)}; NULL for every other step type
    ADD COLUMN wait_config jsonb;

-- waiting: a wait_for_event or sleep step whose parents are satisfied; it has a step_waits
-- row and no message.
ALTER TABLE tasker.steps DROP CONSTRAINT steps_state_check;
ALTER TABLE tasker.steps ADD CONSTRAINT steps_state_check CHECK (state IN (
    'pending', 'enqueued', 'in_progress', 'waiting_for_retry', 'waiting', 'complete', 'error',
    'cancelled', 'resolved_manually'));

-- One row per step in state waiting (deleted in the statement that moves the step on). Rows are
-- inserted and deleted, and wake_at changes only when a recheck finds nothing, so the indexes
-- stay cheap.
CREATE TABLE tasker.step_waits (
    step_uuid   uuid PRIMARY KEY,
    task_uuid   uuid NOT NULL,
    kind        text NOT NULL CHECK (kind IN ('event', 'sleep')),
    event_name  text,          -- kind event: the event and the key taken from the task context
    event_key   text,
    deadline    timestamptz,   -- event: when the timeout applies (NULL: none); sleep: when it ends
    -- when wake_waits() must look at the row: a sleep's end, an event's timeout, or now when
    -- the event may already be there (an early event, or an emit that ran concurrently)
    wake_at     timestamptz,
    started_at  timestamptz NOT NULL,
    CHECK ((kind = 'event') = (event_name IS NOT NULL AND event_key IS NOT NULL))
);
CREATE INDEX step_waits_event_idx ON tasker.step_waits (event_name, event_key) WHERE kind = 'event';
CREATE INDEX step_waits_wake_idx ON tasker.step_waits (wake_at) WHERE wake_at IS NOT NULL;

-- Every emitted event, kept until expires_at (emitted_at + event_keep_seconds), so a step that
-- reaches its wait after the event still gets it.
CREATE TABLE tasker.events (
    event_id    bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    name        text NOT NULL,
    key         text NOT NULL,
    payload     jsonb NOT NULL,
    emitted_at  timestamptz NOT NULL,
    expires_at  timestamptz NOT NULL
);
CREATE INDEX events_name_key_idx ON tasker.events (name, key, event_id);
CREATE INDEX events_expires_idx ON tasker.events (expires_at);

ALTER TABLE tasker.settings DROP CONSTRAINT settings_known_name;
ALTER TABLE tasker.settings ADD CONSTRAINT settings_known_name CHECK (name IN (
    'max_payload_bytes', 'max_error_bytes', 'max_text_bytes', 'max_name_bytes',
    'max_template_bytes', 'max_initialization_bytes',
    'max_steps_per_decision', 'max_batch_workers', 'max_claim_dependency_bytes',
    'event_keep_seconds'));
-- event_keep_seconds is a time, from 0 (events are not kept for steps that wait later) to 100
-- years; the other limits keep their ranges.
ALTER TABLE tasker.settings DROP CONSTRAINT settings_sane_value;
ALTER TABLE tasker.settings ADD CONSTRAINT settings_sane_value CHECK (
    CASE WHEN name IN ('max_steps_per_decision', 'max_batch_workers')
         THEN value BETWEEN 1 AND 100000
         WHEN name = 'event_keep_seconds'
         THEN value BETWEEN 0 AND 3153600000
         ELSE value <= 134217728
              AND value >= CASE name
                               WHEN 'max_name_bytes' THEN 256
                               WHEN 'max_error_bytes' THEN 65536
                               ELSE 1024
                           END
    END);

INSERT INTO tasker.settings (name, value, description) VALUES
    ('event_keep_seconds', 604800,
     'seconds an emitted event is kept for wait_for_event steps that reach their wait later (default 7 days)');
