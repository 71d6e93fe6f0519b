-- Completion: complete_steps applies a batch of outcomes (success, failure, checkpoint), each
-- fenced by (step_uuid, attempt, claim_seq) in the WHERE clause of the step row it updates, so
-- a stale outcome (lost lease, cancelled step) changes nothing and is reported back. Lock
-- order: messages, own steps, children (sorted), tasks (sorted).

-- complete_steps
CREATE TYPE tasker._outcome_input AS (
    ord          integer,
    step_uuid    uuid,
    attempt      integer,
    claim_seq    integer,
    kind         text,
    result       jsonb,
    metadata     jsonb,
    error        jsonb,
    checkpoint   jsonb,
    duration_ms  double precision,
    worker_id    text
);

-- A message _enqueue_ready sent (a child complete_and_claim may hand off).
CREATE TYPE tasker._enqueued AS (
    queue      text,
    msg_id     bigint,
    step_uuid  uuid,
    priority   integer
);

-- The children of one queue complete_and_claim hands off (claimed by one _claim_messages call).
CREATE TYPE tasker._handoff_group AS (
    queue       text,
    msg_ids     bigint[],
    step_uuids  uuid[]
);

CREATE TYPE tasker._applied_outcome AS (
    ord        integer,
    step_uuid  uuid,
    task_uuid  uuid,
    queue      text,
    new_state  text,
    step_type  text
);

-- Applies a batch of handler outcomes (success, failure, checkpoint), each fenced by
-- (step_uuid, attempt, claim_seq) in the WHERE clause of the step row it changes: an outcome
-- whose claim is no longer current (lease lost, step cancelled, already applied) is answered
-- 'stale' and changes nothing. Everything that follows from the applied ones commits with
-- them: results, children released and enqueued, messages deleted or moved, task counters
-- and states, audit rows.
--
-- The hand-off: up to p_handoff of the children these outcomes made ready are claimed for
-- p_worker_id in the same transaction, leased for p_lease_seconds, and returned as claim rows
-- (status 'claimed', the columns of claim_steps), so a hop of a workflow costs its worker one
-- round trip and one commit. A child is handed off only when no visible message of a higher
-- priority waits in its queue (it would be claimed first); the rest are notified as usual.
-- A hand-off claim is a claim like any other (fence, lease, audit row 'claimed' with metadata
-- {"handoff": true}). When an outcome is sent again after its answer was lost, it is stale,
-- and the children its first delivery handed to this same worker (which never got them) are
-- released at once (event 'released', reason 'handoff_lost'), not left until their lease ends.
--
-- One row per outcome first (status applied or stale, detail, step_uuid, attempt), in input
-- order, then one row per claim handed off.
CREATE FUNCTION tasker.complete_and_claim(p_outcomes jsonb, p_worker_id text, p_handoff integer,
                                          p_lease_seconds double precision)
RETURNS TABLE (status text, detail text, step_uuid uuid, attempt integer,
    msg_id bigint, task_uuid uuid, step_name text, handler text, config jsonb,
    claim_seq integer, max_attempts integer, retryable boolean, backoff text,
    backoff_base_ms integer, max_backoff_ms integer, jitter double precision,
    timeout_seconds double precision, task_context jsonb, dependency_results jsonb,
    checkpoint jsonb, inputs jsonb, namespace text, task_name text, task_version text,
    lease_expires_at timestamptz, claim_event text, dependency_results_partial boolean,
    template_step text, traceparent text, dependents integer)
LANGUAGE plpgsql AS $$
#variable_conflict use_column
DECLARE
    v_now       timestamptz := clock_timestamp();
    v_limit     bigint;
    v_err_limit bigint;
    v_name_lim  bigint;
    v_code      text;
    v_in        tasker._outcome_input[];
    v_applied   tasker._applied_outcome[];
    v_completed uuid[];
    v_ready     uuid[];
    v_bad       text;
    v_continued boolean;
    v_notified  bigint;
    v_deciders  uuid[];
    v_tasks     uuid[];
    v_sent      tasker._enqueued[];
    v_queue     text;
    v_ids       bigint[];
    v_freed     text[];       -- queues where a step of a concurrency key ended (55_flow.sql)
    v_groups    tasker._handoff_group[];
    v_group     tasker._handoff_group;
    v_rows      bigint;
    v_handed    bigint := 0;
BEGIN
    -- The limits of tasker.settings this call checks, read in one query (not one
    -- _setting_int call each); a missing row is refused by _setting_int, as everywhere.
    SELECT max(s.value) FILTER (WHERE s.name = 'max_payload_bytes'),
           max(s.value) FILTER (WHERE s.name = 'max_error_bytes'),
           max(s.value) FILTER (WHERE s.name = 'max_name_bytes')
      INTO v_limit, v_err_limit, v_name_lim
      FROM tasker.settings s
     WHERE s.name IN ('max_payload_bytes', 'max_error_bytes', 'max_name_bytes');
    IF v_limit IS NULL OR v_err_limit IS NULL OR v_name_lim IS NULL THEN
        v_limit := tasker._setting_int('max_payload_bytes');
        v_err_limit := tasker._setting_int('max_error_bytes');
        v_name_lim := tasker._setting_int('max_name_bytes');
    END IF;
    IF p_outcomes IS NULL OR jsonb_typeof(p_outcomes) <> 'array' THEN
        RAISE EXCEPTION 'outcomes must be a JSON array' USING ERRCODE = 'TV030';
    END IF;
    IF p_handoff IS NULL OR p_handoff NOT BETWEEN 0 AND 1000 THEN
        RAISE EXCEPTION 'handoff must be between 0 and 1000, got %', coalesce(p_handoff::text, 'NULL') USING ERRCODE = 'TV002';
    END IF;
    IF octet_length(p_worker_id) > v_name_lim THEN  -- (_check_text_size with the limit read above)
        PERFORM tasker._raise_too_large('worker_id', octet_length(p_worker_id), 'max_name_bytes', v_name_lim);
    END IF;
    IF p_handoff > 0 THEN
        IF p_worker_id IS NULL THEN
            RAISE EXCEPTION 'a hand-off needs the worker_id to claim for' USING ERRCODE = 'TV002';
        END IF;
        PERFORM tasker._check_lease_seconds(p_lease_seconds);
    END IF;
    -- Refuse a malformed batch before anything changes, naming the first bad entry: TV030, or
    -- TV021 for a value over its limit in tasker.settings (the length of its text form).
    SELECT format('outcome #%s: %s', x.ord, x.problem), CASE WHEN x.problem LIKE '% bytes, more than the limit %' THEN 'TV021' ELSE 'TV030' END
      INTO v_bad, v_code
      FROM (
        SELECT e.ord,
               CASE
                   WHEN jsonb_typeof(e.o) <> 'object' THEN 'must be a JSON object'
                   WHEN coalesce(e.o->>'step_uuid', '') !~* '^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$'
                       THEN 'step_uuid must be a uuid'
                   WHEN NOT tasker._is_int_json(e.o->'attempt', 1) THEN 'attempt must be an integer >= 1'
                   -- required: the attempt number alone repeats (retry_step resets it, a
                   -- checkpoint continuation keeps it), the claim token never does
                   WHEN NOT tasker._is_int_json(e.o->'claim_seq', 0)
                       THEN 'claim_seq is required: the integer claim token claim_steps returned for this claim'
                   WHEN coalesce(e.o->>'kind', '') NOT IN ('success', 'failure', 'checkpoint')
                       THEN 'kind must be success, failure or checkpoint'
                   WHEN e.o->>'kind' = 'failure' AND jsonb_typeof(e.o->'error') IS DISTINCT FROM 'object'
                       THEN 'a failure needs an error object'
                   WHEN e.o->>'kind' = 'checkpoint' AND jsonb_typeof(e.o->'checkpoint') IS DISTINCT FROM 'object'
                       THEN 'a checkpoint needs a checkpoint object'
                   WHEN jsonb_typeof(e.o->'metadata') NOT IN ('object', 'null') THEN 'metadata must be an object'
                   WHEN e.o->>'kind' = 'failure' AND NOT tasker._is_number_json(e.o->'error'->'retry_after', 0, 31536000)
                       THEN 'error.retry_after must be a number of seconds between 0 and a year'
                   WHEN e.o->>'kind' = 'failure' AND jsonb_typeof(e.o->'error'->'retryable') NOT IN ('boolean', 'null')
                       THEN 'error.retryable must be true or false'
                   WHEN NOT tasker._is_number_json(e.o->'duration_ms', 0, 1e15) THEN 'duration_ms must be a number >= 0'
                   WHEN octet_length(e.o->>'worker_id') > v_name_lim
                       THEN format('worker_id is %s bytes, more than the limit of %s bytes (max_name_bytes in tasker.settings)',
                                   octet_length(e.o->>'worker_id'), v_name_lim)
                   WHEN octet_length(e.o->'error'->>'error_type') > v_name_lim
                       THEN format('error.error_type is %s bytes, more than the limit of %s bytes (max_name_bytes in tasker.settings)',
                                   octet_length(e.o->'error'->>'error_type'), v_name_lim)
                   WHEN octet_length(e.o->'error'->>'error_code') > v_name_lim
                       THEN format('error.error_code is %s bytes, more than the limit of %s bytes (max_name_bytes in tasker.settings)',
                                   octet_length(e.o->'error'->>'error_code'), v_name_lim)
                   WHEN octet_length((e.o->'error')::text) > v_err_limit
                       THEN format('error is %s bytes, more than the limit of %s bytes (max_error_bytes in tasker.settings)',
                                   octet_length((e.o->'error')::text), v_err_limit)
                   WHEN octet_length((e.o->'metadata')::text) > v_limit
                       THEN format('metadata is %s bytes, more than the limit of %s bytes (max_payload_bytes in tasker.settings)',
                                   octet_length((e.o->'metadata')::text), v_limit)
               END AS problem
          FROM jsonb_array_elements(p_outcomes) WITH ORDINALITY e(o, ord)
      ) x
     WHERE x.problem IS NOT NULL
     ORDER BY x.ord
     LIMIT 1;
    IF v_bad IS NOT NULL THEN
        RAISE EXCEPTION '%', v_bad USING ERRCODE = v_code;
    END IF;

    -- An oversized result or checkpoint (over max_payload_bytes, by the length of its JSON
    -- text) is not stored: it becomes a permanent failure that says why, so a bad handler
    -- cannot bloat the tables.
    v_in := ARRAY(
        SELECT ROW(e.ord::integer, (e.o->>'step_uuid')::uuid, (e.o->>'attempt')::numeric::integer,
                   (e.o->>'claim_seq')::numeric::integer,
                   CASE WHEN e.too_big THEN 'failure' ELSE e.o->>'kind' END,
                   CASE WHEN e.too_big THEN NULL ELSE e.o->'result' END,
                   nullif(e.o->'metadata', 'null'::jsonb),
                   CASE WHEN e.too_big THEN jsonb_build_object(
                            'message', format('the step''s %s is %s bytes, more than the limit of %s bytes (max_payload_bytes in tasker.settings)',
                                              CASE WHEN e.cbytes > v_limit THEN 'checkpoint' ELSE 'result' END,
                                              CASE WHEN e.cbytes > v_limit THEN e.cbytes ELSE e.rbytes END, v_limit),
                            'error_type', 'result_too_large', 'error_code', 'result_too_large', 'retryable', false)
                        ELSE e.o->'error' END,
                   CASE WHEN e.too_big THEN NULL ELSE e.o->'checkpoint' END,
                   (e.o->>'duration_ms')::double precision, e.o->>'worker_id')::tasker._outcome_input
          FROM (SELECT b.*, coalesce(b.rbytes, 0) > v_limit OR coalesce(b.cbytes, 0) > v_limit AS too_big
                  FROM (SELECT a.o, a.ord, octet_length((a.o->'result')::text) AS rbytes,
                               octet_length((a.o->'checkpoint')::text) AS cbytes
                          FROM jsonb_array_elements(p_outcomes) WITH ORDINALITY a(o, ord)) b) e);

    -- 1. Lock the live messages of the claimed steps first, in (queue, msg_id) order: the lock
    --    order every function follows. A claim racing for the same message skips it. (The
    --    body of _lock_step_messages, inlined: one call and its settings fewer per batch.)
    FOR v_queue, v_ids IN
        SELECT t.namespace, array_agg(s.msg_id ORDER BY s.msg_id)
          FROM unnest(v_in) c
          JOIN tasker.steps s ON s.step_uuid = c.step_uuid
          JOIN tasker.tasks t ON t.task_uuid = s.task_uuid
         WHERE s.state = 'in_progress' AND s.attempts = c.attempt AND s.msg_id IS NOT NULL
         GROUP BY t.namespace
         ORDER BY t.namespace
    LOOP
        PERFORM 1 FROM tasker.queue_messages m
          WHERE m.queue = v_queue AND m.msg_id = ANY (v_ids)
          ORDER BY m.msg_id
            FOR UPDATE;
    END LOOP;

    WITH
    -- 2a. A decision or batchable step's success whose outcome cannot be applied (unknown or
    --     non-child name, missing outcome, bad cursor config, over a limit) becomes a
    --     permanent failure naming the problem. Standard steps skip the check.
    checked AS (
        SELECT i.ord, i.step_uuid, i.attempt, i.claim_seq, i.result, i.metadata, i.checkpoint,
               i.duration_ms, i.worker_id, s.named_step_id, n.step_type,
               CASE WHEN i.kind = 'success' AND n.step_type IN ('decision', 'batchable')
                    THEN tasker._dynamic_outcome_error(s.step_uuid, i.result) END AS dyn_error,
               i.kind AS given_kind, i.error AS given_error,
               n.backoff, n.backoff_base_ms, n.max_backoff_ms, n.jitter
          FROM unnest(v_in) i
          JOIN tasker.steps s ON s.step_uuid = i.step_uuid
          JOIN tasker.named_steps n ON n.named_step_id = s.named_step_id
         WHERE s.state = 'in_progress' AND s.attempts = i.attempt
           AND s.claim_seq = i.claim_seq
           AND NOT s.continuation
    ),
    -- 2. What each outcome means for its step, computed against the current claim.
    prep AS (
        SELECT i.*, s.task_uuid, t.namespace AS queue, s.msg_id, s.claim_seq AS current_claim,
               CASE
                   WHEN i.kind = 'success' THEN 'complete'
                   WHEN i.kind = 'checkpoint' THEN 'in_progress'
                   -- a retry needs a retryable failure, a retryable step, and an attempt left
                   WHEN coalesce((i.error->>'retryable')::boolean, true) AND s.retryable
                        AND s.attempts < s.max_attempts THEN 'waiting_for_retry'
                   ELSE 'error'
               END AS new_state,
               CASE WHEN i.kind = 'failure' THEN
                   v_now + make_interval(secs => coalesce(
                       (i.error->>'retry_after')::double precision,
                       tasker._backoff_seconds(i.backoff, i.backoff_base_ms, i.max_backoff_ms, i.jitter, s.attempts)))
               END AS retry_at
          FROM (SELECT c.ord, c.step_uuid, c.attempt, c.claim_seq,
                       CASE WHEN c.dyn_error IS NOT NULL THEN 'failure' ELSE c.given_kind END AS kind,
                       CASE WHEN c.dyn_error IS NOT NULL THEN NULL ELSE c.result END AS result,
                       c.metadata, coalesce(c.dyn_error, c.given_error) AS error, c.checkpoint,
                       c.duration_ms, c.worker_id, c.step_type, c.backoff, c.backoff_base_ms,
                       c.max_backoff_ms, c.jitter
                  FROM checked c) i
          JOIN tasker.steps s ON s.step_uuid = i.step_uuid
          JOIN tasker.tasks t ON t.task_uuid = s.task_uuid
         WHERE s.state = 'in_progress' AND s.attempts = i.attempt
           AND s.claim_seq = i.claim_seq
           AND NOT s.continuation
    ),
    -- 3. Apply, fenced in the WHERE clause of the row itself (re-checked after a lock wait).
    upd AS (
        UPDATE tasker.steps s
           SET state = p.new_state,
               results = CASE WHEN p.kind = 'success' THEN p.result ELSE s.results END,
               metadata = CASE WHEN p.kind <> 'checkpoint' THEN coalesce(p.metadata, s.metadata) ELSE s.metadata END,
               last_error = CASE WHEN p.kind = 'failure'
                                 THEN p.error || jsonb_build_object('attempt', s.attempts, 'worker_id', p.worker_id, 'at', v_now)
                                 ELSE s.last_error END,
               checkpoint = CASE WHEN p.kind = 'checkpoint' THEN p.checkpoint ELSE s.checkpoint END,
               continuation = (p.kind = 'checkpoint'),
               next_attempt_at = CASE WHEN p.new_state = 'waiting_for_retry' THEN p.retry_at END,
               msg_id = CASE WHEN p.new_state IN ('complete', 'error') THEN NULL ELSE s.msg_id END,
               completed_at = CASE WHEN p.new_state IN ('complete', 'error') THEN v_now ELSE s.completed_at END,
               updated_at = v_now
          FROM prep p
         WHERE s.step_uuid = p.step_uuid
           AND s.state = 'in_progress' AND s.attempts = p.attempt AND s.claim_seq = p.current_claim
           AND NOT s.continuation
        RETURNING p.ord, s.step_uuid, s.task_uuid, p.queue, p.msg_id, p.new_state, p.kind, s.attempts,
                  p.worker_id, p.duration_ms, p.error, p.retry_at, p.step_type
    ),
    -- 4. A finished step's message goes; a retry's becomes visible at its retry time, a
    --    checkpoint continuation's at once. (msg_id = ANY: see _lock_step_messages)
    drop_msgs AS (
        DELETE FROM tasker.queue_messages m USING upd
         WHERE upd.new_state IN ('complete', 'error') AND m.queue = upd.queue AND m.msg_id = upd.msg_id
           AND m.msg_id = ANY (ARRAY(SELECT u.msg_id FROM upd u))
    ),
    move_msgs AS (
        UPDATE tasker.queue_messages m
           SET vt = CASE WHEN upd.new_state = 'waiting_for_retry' THEN upd.retry_at ELSE v_now END
          FROM upd
         WHERE upd.new_state IN ('waiting_for_retry', 'in_progress') AND m.queue = upd.queue AND m.msg_id = upd.msg_id
           AND m.msg_id = ANY (ARRAY(SELECT u.msg_id FROM upd u))
    ),
    audit AS (
        INSERT INTO tasker.step_transitions (step_uuid, task_uuid, from_state, to_state, event, attempt, worker_id,
                                             duration_ms, error_summary, created_at)
        SELECT upd.step_uuid, upd.task_uuid, 'in_progress', upd.new_state,
               CASE upd.kind
                   WHEN 'success' THEN 'succeeded'
                   WHEN 'checkpoint' THEN 'checkpointed'
                   ELSE CASE upd.new_state WHEN 'error' THEN 'failed' ELSE 'retry_scheduled' END
               END,
               upd.attempts, upd.worker_id, upd.duration_ms,
               CASE WHEN upd.kind = 'failure'
                    THEN left(coalesce(upd.error->>'error_type', 'error') || ': ' || coalesce(upd.error->>'message', ''), 500)
               END,
               v_now
          FROM upd
    )
    SELECT array_agg(ROW(upd.ord, upd.step_uuid, upd.task_uuid, upd.queue, upd.new_state, upd.step_type)::tasker._applied_outcome)
      INTO v_applied
      FROM upd;

    IF v_applied IS NOT NULL THEN
        -- 5. Children of completed steps: counters under row lock (children by step_uuid).
        SELECT coalesce(array_agg(a.step_uuid) FILTER (WHERE a.new_state = 'complete'), '{}'),
               coalesce(array_agg(a.step_uuid) FILTER (WHERE a.new_state = 'complete'
                                                       AND a.step_type IN ('decision', 'batchable')), '{}'),
               coalesce(bool_or(a.new_state = 'in_progress'), false)
          INTO v_completed, v_deciders, v_continued
          FROM unnest(v_applied) a;
        IF cardinality(v_deciders) > 0 THEN
            -- a decision or fan-out: serialise with the task's other ones, then lock the
            -- children and the tasks' convergence steps together, in step_uuid order
            v_tasks := ARRAY(SELECT DISTINCT a.task_uuid FROM unnest(v_applied) a WHERE a.step_uuid = ANY (v_deciders));
            PERFORM tasker._lock_dynamic(v_tasks);
            PERFORM tasker._lock_convergences(v_tasks,
                ARRAY(SELECT e.child_uuid FROM tasker.step_edges e WHERE e.parent_uuid = ANY (v_completed)));
        END IF;
        IF cardinality(v_completed) > 0 THEN
            -- _release_children in one statement: lock the children in step_uuid order, then
            -- count down their pending parents under that lock (a child whose lock had to wait
            -- is updated in its newest version: exactly one of two parents completing at once
            -- sees the counter reach zero); the children that reached it while pending are ready.
            WITH d AS (
                SELECT e.child_uuid, count(*)::integer AS n
                  FROM tasker.step_edges e
                 WHERE e.parent_uuid = ANY (v_completed)
                 GROUP BY e.child_uuid
            ),
            locked AS MATERIALIZED (
                SELECT s.step_uuid
                  FROM tasker.steps s
                 WHERE s.step_uuid IN (SELECT e.child_uuid FROM tasker.step_edges e WHERE e.parent_uuid = ANY (v_completed))
                 ORDER BY s.step_uuid
                   FOR UPDATE
            ),
            released AS (
                UPDATE tasker.steps s
                   SET pending_parents = s.pending_parents - d.n
                  FROM locked l
                  JOIN d ON d.child_uuid = l.step_uuid
                 WHERE s.step_uuid = l.step_uuid
                RETURNING s.step_uuid, s.pending_parents, s.state
            )
            SELECT coalesce(array_agg(r.step_uuid), '{}') INTO v_ready
              FROM released r
             WHERE r.pending_parents <= 0 AND r.state = 'pending';
        END IF;
        -- 5b. Create what the decisions and fan-outs chose (total_steps grows before step 6).
        IF cardinality(v_deciders) > 0 THEN
            PERFORM tasker._apply_dynamic(v_deciders);
        END IF;
        -- 6. Tasks: one counter update each, in task_uuid order (_apply_task_deltas with the
        --    event 'step_outcome', in one statement): error while any step is in error,
        --    complete when every step is, otherwise steps_in_process; cancelled and manually
        --    resolved tasks keep their state; each change gets a transition row and a
        --    notification on tasker_task_events (delivered at commit).
        WITH d AS (
            SELECT a.task_uuid,
                   (count(*) FILTER (WHERE a.new_state = 'complete'))::integer AS completed,
                   (count(*) FILTER (WHERE a.new_state = 'error'))::integer AS errors
              FROM unnest(v_applied) a
             GROUP BY a.task_uuid
        ),
        -- lock in task_uuid order; skip tasks with nothing to change
        locked AS MATERIALIZED (
            SELECT t.task_uuid, t.state
              FROM tasker.tasks t
              JOIN d ON d.task_uuid = t.task_uuid
             WHERE d.completed <> 0 OR d.errors <> 0 OR t.state = 'pending'
             ORDER BY t.task_uuid
               FOR UPDATE OF t
        ),
        task_upd AS (
            UPDATE tasker.tasks t
               SET completed_steps = t.completed_steps + d.completed,
                   error_steps = greatest(t.error_steps + d.errors, 0),
                   state = CASE
                       WHEN t.state IN ('cancelled', 'resolved_manually') THEN t.state
                       WHEN t.error_steps + d.errors > 0 THEN 'error'
                       WHEN t.completed_steps + d.completed >= t.total_steps THEN 'complete'
                       ELSE 'steps_in_process'
                   END,
                   completed_at = CASE
                       WHEN t.state NOT IN ('cancelled', 'resolved_manually') AND t.error_steps + d.errors <= 0
                            AND t.completed_steps + d.completed >= t.total_steps THEN v_now
                       ELSE t.completed_at
                   END,
                   updated_at = v_now
              FROM locked l
              JOIN d ON d.task_uuid = l.task_uuid
             WHERE t.task_uuid = l.task_uuid
            RETURNING t.task_uuid, l.state AS old_state, t.state AS new_state, t.namespace, t.name
        ),
        task_audit AS (
            INSERT INTO tasker.task_transitions (task_uuid, from_state, to_state, event, created_at)
            SELECT u.task_uuid, u.old_state, u.new_state, 'step_outcome', v_now
              FROM task_upd u
             WHERE u.old_state <> u.new_state
        )
        SELECT count(pg_notify('tasker_task_events', json_build_object(
                   'task_uuid', u.task_uuid, 'state', u.new_state, 'previous_state', u.old_state,
                   'namespace', u.namespace, 'name', u.name)::text)::text)
          INTO v_notified
          FROM task_upd u
         WHERE u.old_state <> u.new_state;
        -- 7. Enqueue children that became ready (when their task is still running); what is
        --    not handed off below is notified.
        IF cardinality(v_ready) > 0 THEN
            v_sent := ARRAY(SELECT ROW(e.queue, e.msg_id, e.step_uuid, e.priority)::tasker._enqueued
                              FROM tasker._enqueue_ready(v_ready, 'dependencies_satisfied', false) e);
        END IF;
        -- A checkpoint continuation is visible now: wake a worker.
        IF v_continued THEN
            PERFORM pg_notify('tasker_' || q.queue, '')
               FROM (SELECT DISTINCT a.queue FROM unnest(v_applied) a WHERE a.new_state = 'in_progress') q;
        END IF;
        -- A step of a concurrency key ended: its place is free (55_flow.sql), and a step the
        -- limit held back may start now.
        WITH gone AS (
            DELETE FROM tasker.flow_holders h
             USING unnest(v_applied) a
             WHERE h.step_uuid = a.step_uuid AND a.new_state <> 'in_progress'
            RETURNING h.queue
        )
        SELECT array_agg(DISTINCT gone.queue) INTO v_freed FROM gone;
        IF v_freed IS NOT NULL THEN
            PERFORM pg_notify('tasker_' || q, '') FROM unnest(v_freed) q;
        END IF;
    END IF;

    RETURN QUERY
    SELECT CASE WHEN a.ord IS NOT NULL THEN 'applied' ELSE 'stale' END,
           CASE WHEN a.ord IS NOT NULL THEN a.new_state
                ELSE coalesce(
                    (SELECT format('step is %s at attempt %s, claim %s', s.state, s.attempts, s.claim_seq)
                       FROM tasker.steps s WHERE s.step_uuid = i.step_uuid),
                    'no such step')
           END,
           i.step_uuid, i.attempt,
           -- (the claim columns: empty in an outcome's row)
           NULL::bigint, NULL::uuid, NULL::text, NULL::text, NULL::jsonb, NULL::integer, NULL::integer,
           NULL::boolean, NULL::text, NULL::integer, NULL::integer, NULL::double precision,
           NULL::double precision, NULL::jsonb, NULL::jsonb, NULL::jsonb, NULL::jsonb, NULL::text,
           NULL::text, NULL::text, NULL::timestamptz, NULL::text, NULL::boolean, NULL::text, NULL::text,
           NULL::integer
      FROM unnest(v_in) i
      LEFT JOIN unnest(v_applied) a ON a.ord = i.ord
     ORDER BY i.ord;

    -- 8. The hand-off, per queue: the first p_handoff children by priority, then message order,
    --    skipping a queue's priorities below one that has a visible message waiting.
    IF cardinality(v_sent) > 0 THEN
        IF p_handoff > 0 THEN
            IF cardinality(v_sent) = 1 THEN
                -- one child (a hop of a chain): nothing to rank, one probe
                IF NOT tasker._higher_priority_waiting((v_sent[1]).queue, (v_sent[1]).priority, v_now) THEN
                    v_groups := ARRAY[ROW((v_sent[1]).queue, ARRAY[(v_sent[1]).msg_id],
                                          ARRAY[(v_sent[1]).step_uuid])::tasker._handoff_group];
                END IF;
            ELSE
                v_groups := ARRAY(
                    SELECT ROW(h.queue, array_agg(h.msg_id ORDER BY h.msg_id),
                               array_agg(h.step_uuid ORDER BY h.msg_id))::tasker._handoff_group
                      FROM (SELECT e.*, row_number() OVER (ORDER BY e.priority DESC, e.msg_id) AS n
                              FROM unnest(v_sent) e
                             -- one probe per (queue, priority) sent, not per child
                             WHERE (e.queue, e.priority) NOT IN (
                                       SELECT d.queue, d.priority
                                         FROM (SELECT DISTINCT x.queue, x.priority FROM unnest(v_sent) x) d
                                        WHERE tasker._higher_priority_waiting(d.queue, d.priority, v_now))) h
                     WHERE h.n <= p_handoff
                     GROUP BY h.queue);
            END IF;
            FOREACH v_group IN ARRAY coalesce(v_groups, '{}') LOOP
                RETURN QUERY
                SELECT 'claimed'::text, NULL::text, c.step_uuid, c.attempt, c.msg_id, c.task_uuid, c.step_name,
                       c.handler, c.config, c.claim_seq, c.max_attempts, c.retryable, c.backoff,
                       c.backoff_base_ms, c.max_backoff_ms, c.jitter, c.timeout_seconds, c.task_context,
                       c.dependency_results, c.checkpoint, c.inputs, c.namespace, c.task_name, c.task_version,
                       c.lease_expires_at, c.claim_event, c.dependency_results_partial, c.template_step,
                       c.traceparent, c.dependents
                  FROM tasker._claim_messages(v_group.queue, p_worker_id, v_now, v_now + make_interval(secs => p_lease_seconds),
                                              v_group.msg_ids, v_group.step_uuids, true) c;
                GET DIAGNOSTICS v_rows = ROW_COUNT;
                v_handed := v_handed + v_rows;
            END LOOP;
        END IF;
        -- what was not handed off wakes the queue's workers (_claim_messages returns only the
        -- messages it claimed: when it claimed every one sent, nobody is left to wake)
        IF v_handed < cardinality(v_sent) THEN
            PERFORM pg_notify('tasker_' || q.queue, '')
               FROM (SELECT DISTINCT e.queue FROM unnest(v_sent) e
                      WHERE EXISTS (SELECT 1 FROM tasker.steps s
                                     WHERE s.step_uuid = e.step_uuid AND s.state = 'enqueued')) q;
        END IF;
    END IF;

    -- 9. A re-sent outcome (its first delivery committed, the answer was lost): the children
    --    that delivery handed to this worker, which never got them, go back to their queue.
    IF p_worker_id IS NOT NULL AND coalesce(cardinality(v_applied), 0) < cardinality(v_in) THEN
        PERFORM tasker._release_lost_handoffs(v_in, v_applied, p_worker_id);
    END IF;

    -- 10. A hand-off is a turn of its lane too (55_flow.sql: claims take turns by vtime). Last:
    --     a lane row held here (SKIP LOCKED: never waited for) while this transaction went on to
    --     wait for another queue's hand-off (a rate limit row, a task row) would close a cycle
    --     with a claim, which takes its lanes' row locks last (_serve_lanes) after its own.
    IF p_handoff > 0 AND cardinality(v_sent) > 0 THEN
        PERFORM tasker._charge_lanes(x.queue, x.steps)
           FROM (SELECT e.queue, array_agg(e.step_uuid) AS steps
                   FROM unnest(v_sent) e
                   JOIN tasker.steps s ON s.step_uuid = e.step_uuid
                  WHERE s.state = 'in_progress' AND s.worker_id = p_worker_id AND s.started_at = v_now
                  GROUP BY e.queue ORDER BY e.queue) x
          WHERE EXISTS (SELECT 1 FROM tasker.flow_lanes l WHERE l.queue = x.queue);
    END IF;
END
$$;
ALTER FUNCTION tasker.complete_and_claim(jsonb, text, integer, double precision) SET plan_cache_mode = force_generic_plan;
ALTER FUNCTION tasker.complete_and_claim(jsonb, text, integer, double precision) SET enable_seqscan = off;
COMMENT ON FUNCTION tasker.complete_and_claim(jsonb, text, integer, double precision) IS
    'Applies a batch of fenced step outcomes and everything that follows from them, and claims up to handoff of the children they made ready for the worker, in one transaction.';

-- Whether a visible message of a priority above p_priority waits in the queue (a claim would
-- take it before a message of p_priority): one probe per priority recorded above it
-- (tasker.queue_priorities records every priority but 0, which is probed when it is above).
-- Messages with a fairness lane are not looked at: across lanes, turns come before priority.
CREATE FUNCTION tasker._higher_priority_waiting(p_queue text, p_priority integer, p_now timestamptz)
RETURNS boolean
LANGUAGE plpgsql STABLE AS $$
BEGIN
    -- plpgsql, not sql: its plans are kept for the session (a sql function called from a
    -- statement is planned again at every call)
    RETURN EXISTS (
        SELECT 1
          FROM (SELECT qp.priority FROM tasker.queue_priorities qp
                 WHERE qp.queue = p_queue AND qp.priority > p_priority
                UNION ALL
                SELECT 0 WHERE p_priority < 0) hp
         WHERE EXISTS (SELECT 1 FROM tasker.queue_messages m
                        WHERE m.queue = p_queue AND m.lane IS NULL AND m.priority = hp.priority AND m.vt <= p_now));
END
$$;
ALTER FUNCTION tasker._higher_priority_waiting(text, integer, timestamptz) SET enable_seqscan = off;

-- The children an outcome's first delivery handed to p_worker_id, for the outcomes of p_in
-- that were not applied now because that delivery was (sent again after a lost answer): each
-- such child is still in progress under the claim made in that transaction (worker, start
-- time = the parent's completion time), and is released at once (release_steps, reason
-- handoff_lost) instead of waiting for its lease to end.
CREATE FUNCTION tasker._release_lost_handoffs(p_in tasker._outcome_input[], p_applied tasker._applied_outcome[],
                                              p_worker_id text)
RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
    v_claims jsonb;
BEGIN
    SELECT jsonb_agg(jsonb_build_object('step_uuid', c.step_uuid, 'attempt', c.attempts, 'claim_seq', c.claim_seq)
                     ORDER BY c.step_uuid)
      INTO v_claims
      FROM unnest(p_in) i
      JOIN tasker.steps p ON p.step_uuid = i.step_uuid
      JOIN tasker.step_edges e ON e.parent_uuid = p.step_uuid
      JOIN tasker.steps c ON c.step_uuid = e.child_uuid
     WHERE i.kind = 'success'
       AND i.ord NOT IN (SELECT a.ord FROM unnest(p_applied) a)
       AND p.state = 'complete' AND p.attempts = i.attempt AND p.claim_seq = i.claim_seq
       AND c.state = 'in_progress' AND c.worker_id = p_worker_id AND c.started_at = p.completed_at
       AND c.claim_spent_attempt AND NOT c.continuation
       AND EXISTS (SELECT 1 FROM tasker.step_transitions tr
                    WHERE tr.step_uuid = c.step_uuid AND tr.event = 'claimed' AND tr.attempt = c.attempts
                      AND tr.created_at = p.completed_at AND tr.metadata @> '{"handoff": true}');
    IF v_claims IS NOT NULL THEN
        PERFORM tasker.release_steps(v_claims, 0, 'handoff_lost', p_worker_id);
    END IF;
END
$$;
ALTER FUNCTION tasker._release_lost_handoffs(tasker._outcome_input[], tasker._applied_outcome[], text) SET enable_seqscan = off;

-- complete_and_claim without a hand-off: one row per outcome, in input order.
CREATE FUNCTION tasker.complete_steps(p_outcomes jsonb)
RETURNS TABLE (step_uuid uuid, attempt integer, status text, detail text)
LANGUAGE sql AS $$
    SELECT c.step_uuid, c.attempt, c.status, c.detail FROM tasker.complete_and_claim(p_outcomes, NULL, 0, NULL) c
$$;
COMMENT ON FUNCTION tasker.complete_steps(jsonb) IS
    'Applies a batch of fenced step outcomes and everything that follows from them, in one transaction.';
