-- 0002_engine: the workflow engine's tables: templates, tasks, steps, edges and the audit.
-- PostgreSQL decides everything about a task in the functions of sql/functions/ (20 to 95):
-- which steps are ready, who holds which step, what follows a success or a failure, when a
-- task is finished. Each decision is one function call, one transaction, reachable from psql.
--
-- Lock order, everywhere (so concurrent calls cannot deadlock): queue messages (by queue,
-- msg_id), then the steps those messages are for (by step_uuid), then child steps (by
-- step_uuid), then tasks (by task_uuid). Every writer of a step that has a live message locks
-- that message first, so holding a step's message means owning the step.
--
-- SQLSTATEs of our own: TV0xx bad input, TN0xx not found, TS0xx wrong state.
CREATE TABLE tasker.named_tasks (
    named_task_id  bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    namespace      text NOT NULL,
    name           text NOT NULL,
    version        text NOT NULL,
    -- semantic-version parts, so "newest" means 1.10.0 > 1.9.0 (not text order)
    version_major  integer NOT NULL,
    version_minor  integer NOT NULL,
    version_patch  integer NOT NULL,
    version_pre    text,
    -- sortable form of the pre-release (numeric identifiers by value, below alphanumeric ones)
    version_pre_key text[],
    description    text,
    template       jsonb NOT NULL,  -- the normalised body (every default filled in)
    step_count     integer NOT NULL,
    created_at     timestamptz NOT NULL DEFAULT now(),
    UNIQUE (namespace, name, version)
);

CREATE TABLE tasker.named_steps (
    named_step_id    bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    named_task_id    bigint NOT NULL REFERENCES tasker.named_tasks ON DELETE CASCADE,
    step_index       integer NOT NULL,  -- position in the template's step list
    name             text NOT NULL,
    description      text,
    handler          text NOT NULL,     -- handler.callable
    config           jsonb NOT NULL,    -- handler.initialization
    step_type        text NOT NULL,
    parent_names     text[] NOT NULL,   -- direct dependencies
    -- every transitive dependency, precomputed so a claim hydrates dependency results with
    -- one index probe instead of a recursive query
    ancestor_names   text[] NOT NULL,
    retryable        boolean NOT NULL,
    max_attempts     integer NOT NULL,
    backoff          text NOT NULL CHECK (backoff IN ('exponential', 'linear', 'fixed', 'none')),
    backoff_base_ms  integer NOT NULL,
    max_backoff_ms   integer NOT NULL,
    jitter           double precision NOT NULL,
    timeout_seconds  double precision,
    UNIQUE (named_task_id, step_index),
    UNIQUE (named_task_id, name)
);

-- No index on any column that changes while a task runs (state, counters): updates stay HOT.
CREATE TABLE tasker.tasks (
    task_uuid        uuid PRIMARY KEY,
    named_task_id    bigint NOT NULL,
    namespace        text NOT NULL,
    name             text NOT NULL,
    version          text NOT NULL,
    -- pending           created, no step outcome recorded yet (v_tasks shows steps_in_process
    --                   as soon as a step has been claimed)
    -- steps_in_process  at least one step outcome recorded
    -- complete          every step complete or resolved_manually
    -- error             a step failed permanently; nothing new starts until retry/resolve
    -- cancelled         cancel_task; terminal
    -- resolved_manually terminal, set by an operator
    state            text NOT NULL CHECK (state IN ('pending', 'steps_in_process', 'complete',
                                                    'error', 'cancelled', 'resolved_manually')),
    context          jsonb NOT NULL,
    initiator        text,
    source_system    text,
    reason           text,
    tags             jsonb NOT NULL DEFAULT '[]',
    priority         integer NOT NULL DEFAULT 0,
    idempotency_key  text,
    correlation_id   text,
    -- counters that make finalisation O(1): complete when completed_steps = total_steps
    total_steps      integer NOT NULL,
    completed_steps  integer NOT NULL DEFAULT 0,  -- complete + resolved_manually
    error_steps      integer NOT NULL DEFAULT 0,  -- currently in error
    created_at       timestamptz NOT NULL DEFAULT now(),
    updated_at       timestamptz NOT NULL DEFAULT now(),
    completed_at     timestamptz
) WITH (fillfactor = 70);

CREATE UNIQUE INDEX tasks_idempotency_idx ON tasker.tasks (namespace, name, idempotency_key)
    WHERE idempotency_key IS NOT NULL;

CREATE INDEX tasks_created_at_idx ON tasker.tasks (created_at);

CREATE INDEX tasks_correlation_idx ON tasker.tasks (correlation_id) WHERE correlation_id IS NOT NULL;

CREATE TABLE tasker.steps (
    step_uuid            uuid PRIMARY KEY,
    task_uuid            uuid NOT NULL,
    named_step_id        bigint NOT NULL,
    name                 text NOT NULL,
    -- pending            waiting for parents (pending_parents > 0, or task in error)
    -- enqueued           has a visible message, waiting for a worker
    -- in_progress        claimed by a worker (the message's vt is the lease)
    -- waiting_for_retry  failed retryably; the message becomes visible at next_attempt_at
    -- complete           succeeded (terminal, satisfies children)
    -- error              failed permanently or out of attempts (retry_step: -> enqueued)
    -- cancelled          terminal
    -- resolved_manually  completed by an operator (terminal, satisfies children)
    state                text NOT NULL CHECK (state IN ('pending', 'enqueued', 'in_progress',
                                                        'waiting_for_retry', 'complete', 'error',
                                                        'cancelled', 'resolved_manually')),
    attempts             integer NOT NULL DEFAULT 0,  -- attempts started; the fencing token
    max_attempts         integer NOT NULL,
    retryable            boolean NOT NULL,
    -- increments at every claim, checkpoint continuations included: fences the outcome of one
    -- claim even when two claims share an attempt number
    claim_seq            integer NOT NULL DEFAULT 0,
    claim_spent_attempt  boolean NOT NULL DEFAULT false,  -- did the current claim start an attempt
    continuation         boolean NOT NULL DEFAULT false,  -- checkpointed: next claim continues the attempt
    pending_parents      integer NOT NULL,  -- parents not yet complete/resolved (fan-in counter)
    msg_id               bigint,            -- the live message in the task's namespace queue
    results              jsonb,
    metadata             jsonb,
    last_error           jsonb,
    checkpoint           jsonb,
    inputs               jsonb,
    worker_id            text,
    next_attempt_at      timestamptz,
    created_at           timestamptz NOT NULL DEFAULT now(),
    enqueued_at          timestamptz,
    started_at           timestamptz,
    completed_at         timestamptz,
    updated_at           timestamptz NOT NULL DEFAULT now()
) WITH (fillfactor = 70);

CREATE UNIQUE INDEX steps_task_name_idx ON tasker.steps (task_uuid, name);

-- Parent -> child, per task (the template holds the same shape by step name).
CREATE TABLE tasker.step_edges (
    parent_uuid uuid NOT NULL,
    child_uuid  uuid NOT NULL,
    PRIMARY KEY (parent_uuid, child_uuid)
);

-- Append-only audit: one row per state change, written by the statement that makes the change.
-- One index each and no foreign keys: they are written on every hot-path call.
CREATE TABLE tasker.step_transitions (
    transition_id  bigint GENERATED ALWAYS AS IDENTITY,
    step_uuid      uuid NOT NULL,
    task_uuid      uuid NOT NULL,
    from_state     text,
    to_state       text NOT NULL,
    event          text NOT NULL,
    attempt        integer NOT NULL DEFAULT 0,
    worker_id      text,
    duration_ms    double precision,
    error_summary  text,
    metadata       jsonb,
    created_at     timestamptz NOT NULL DEFAULT clock_timestamp()
);

CREATE INDEX step_transitions_step_idx ON tasker.step_transitions (step_uuid, transition_id);

CREATE TABLE tasker.task_transitions (
    transition_id  bigint GENERATED ALWAYS AS IDENTITY,
    task_uuid      uuid NOT NULL,
    from_state     text,
    to_state       text NOT NULL,
    event          text NOT NULL,
    metadata       jsonb,
    created_at     timestamptz NOT NULL DEFAULT clock_timestamp()
);

CREATE INDEX task_transitions_task_idx ON tasker.task_transitions (task_uuid, transition_id);
