-- 0012_schedules: cron schedules that create tasks (sql/functions/87_schedules.sql).
--
-- One row per schedule. tasker.fire_due_schedules() creates the task of every slot that is
-- due, through create_or_get_task with the idempotency key schedule:<name>:<slot>, so each slot
-- fires once however many callers race; the row records where the schedule stands (the next
-- slot, the last one handled, the last task). Cron is parsed and the next slot computed in SQL
-- (tasker.cron_next), in the schedule's time zone.
CREATE TABLE tasker.schedules (
    name              text PRIMARY KEY
        CONSTRAINT schedules_name_format CHECK (name ~ '^[A-Za-z][A-Za-z0-9_.-]{0,127}$'),
    namespace         text NOT NULL,
    template_name     text NOT NULL,
    -- NULL: the newest version at each firing
    template_version  text,
    cron              text NOT NULL CONSTRAINT schedules_cron_size CHECK (octet_length(cron) <= 256),
    time_zone         text NOT NULL CONSTRAINT schedules_zone_size CHECK (octet_length(time_zone) <= 64),
    context           jsonb NOT NULL DEFAULT '{}',
    -- skip: no new task while the last one is unfinished; allow: always; cancel_previous:
    -- cancel the last one if unfinished, then create
    overlap           text NOT NULL DEFAULT 'skip'
        CONSTRAINT schedules_overlap CHECK (overlap IN ('skip', 'allow', 'cancel_previous')),
    -- missed slots at most this old are still fired (after downtime); older ones are skipped
    catchup_window    interval NOT NULL DEFAULT interval '1 hour',
    enabled           boolean NOT NULL DEFAULT true,
    -- the next slot to handle (NULL while paused)
    next_fire_at      timestamptz,
    -- the last slot handled (fired, or skipped because of the overlap policy)
    last_slot         timestamptz,
    last_fired_at     timestamptz,
    last_task_uuid    uuid,
    -- why the last firing failed (its template version gone...); NULL after a success
    last_error        text,
    -- the template version whose `schedules:` declared it (NULL: made by create_schedule)
    declared_by       text,
    created_at        timestamptz NOT NULL DEFAULT now(),
    updated_at        timestamptz NOT NULL DEFAULT now()
);
COMMENT ON TABLE tasker.schedules IS
    'Cron schedules: fire_due_schedules creates one task per slot (idempotency key schedule:<name>:<slot>).';

-- fire_due_schedules reads the enabled schedules that are due, oldest slot first.
CREATE INDEX schedules_due_idx ON tasker.schedules (next_fire_at) WHERE enabled;
