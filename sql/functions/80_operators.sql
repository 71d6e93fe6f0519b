-- Operator actions: cancel_task, retry_step, retry_failed, resolve_step. Calls on one task are
-- serialised by a transaction-level advisory lock per task (_lock_task_operations), taken
-- before any message or step lock.

-- Serialises the operator functions (cancel_task, retry_step, resolve_step) of one task. They
-- lock steps in different orders (all steps of the task; a step then its children; a step,
-- the task, then ready steps), so two of them on one task could deadlock; the hot path never
-- takes this lock, so it cannot take part in a cycle with it.
CREATE FUNCTION tasker._lock_task_operations(p_task uuid) RETURNS void
LANGUAGE sql AS $$
    SELECT pg_advisory_xact_lock(hashtextextended('tasker.task_operations:' || p_task::text, 0))
     WHERE p_task IS NOT NULL
$$;

-- Cancels a task: every step not yet finished becomes cancelled and loses its message, so any
-- outcome still coming from a worker is stale. Refuses a task that is already finished.
CREATE FUNCTION tasker.cancel_task(p_task uuid, p_reason text DEFAULT NULL) RETURNS jsonb
LANGUAGE plpgsql AS $$
DECLARE
    v_state text;
    v_ns    text;
    v_count integer;
    v_now   timestamptz := clock_timestamp();
BEGIN
    PERFORM tasker._check_text_size(p_reason, 'max_text_bytes', 'reason');
    SELECT t.state, t.namespace INTO v_state, v_ns FROM tasker.tasks t WHERE t.task_uuid = p_task;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'task % does not exist', p_task USING ERRCODE = 'TN003';
    END IF;
    PERFORM tasker._lock_task_operations(p_task);
    -- Lock order: the task's messages, its steps, then the task.
    PERFORM 1
       FROM tasker.steps s
       JOIN tasker.queue_messages m ON m.queue = v_ns AND m.msg_id = s.msg_id
      WHERE s.task_uuid = p_task
      ORDER BY m.queue, m.msg_id
        FOR UPDATE OF m;
    PERFORM 1 FROM tasker.steps s WHERE s.task_uuid = p_task ORDER BY s.step_uuid FOR UPDATE;
    SELECT t.state INTO v_state FROM tasker.tasks t WHERE t.task_uuid = p_task FOR UPDATE;
    IF NOT FOUND THEN  -- deleted (purge_finished) while we waited for the locks
        RAISE EXCEPTION 'task % does not exist', p_task USING ERRCODE = 'TN003';
    END IF;
    IF v_state IN ('complete', 'cancelled', 'resolved_manually') THEN
        RAISE EXCEPTION 'task % is % and cannot be cancelled', p_task, v_state USING ERRCODE = 'TS001';
    END IF;
    v_state := tasker.effective_task_state(p_task, v_state);

    DELETE FROM tasker.queue_messages m
     USING tasker.steps s
     WHERE s.task_uuid = p_task AND m.queue = v_ns AND m.msg_id = s.msg_id;
    -- waiting steps (wait_for_event, sleep) stop waiting
    DELETE FROM tasker.step_waits w WHERE w.task_uuid = p_task;

    WITH old AS (
        SELECT s.step_uuid, s.state, s.attempts
          FROM tasker.steps s
         WHERE s.task_uuid = p_task AND s.state NOT IN ('complete', 'cancelled', 'resolved_manually')
    ),
    upd AS (
        UPDATE tasker.steps s
           SET state = 'cancelled', msg_id = NULL, continuation = false, completed_at = v_now, updated_at = v_now
          FROM old
         WHERE s.step_uuid = old.step_uuid
        RETURNING s.step_uuid, old.state AS from_state, old.attempts
    ),
    audit AS (
        INSERT INTO tasker.step_transitions (step_uuid, task_uuid, from_state, to_state, event, attempt, metadata, created_at)
        SELECT upd.step_uuid, p_task, upd.from_state, 'cancelled', 'task_cancelled', upd.attempts,
               jsonb_build_object('reason', p_reason), v_now
          FROM upd
    )
    SELECT count(*) INTO v_count FROM upd;
    -- the places its steps held of their concurrency keys are free (55_flow.sql): a step the
    -- limit held back may start now
    DELETE FROM tasker.flow_holders h USING tasker.steps s
     WHERE s.task_uuid = p_task AND h.step_uuid = s.step_uuid;
    IF FOUND THEN
        PERFORM pg_notify('tasker_' || v_ns, '');
    END IF;

    UPDATE tasker.tasks t
       SET state = 'cancelled', error_steps = 0, completed_at = v_now, updated_at = v_now
     WHERE t.task_uuid = p_task;
    INSERT INTO tasker.task_transitions (task_uuid, from_state, to_state, event, metadata, created_at)
    VALUES (p_task, v_state, 'cancelled', 'cancelled', jsonb_build_object('reason', p_reason), v_now);
    PERFORM pg_notify('tasker_task_events', json_build_object(
        'task_uuid', t.task_uuid, 'state', 'cancelled', 'previous_state', v_state,
        'namespace', t.namespace, 'name', t.name)::text)
       FROM tasker.tasks t WHERE t.task_uuid = p_task;
    RETURN jsonb_build_object('task_uuid', p_task, 'previous_state', v_state, 'state', 'cancelled',
                              'cancelled_steps', v_count);
END
$$;
COMMENT ON FUNCTION tasker.cancel_task(uuid,text) IS
    'Operator: cancels a task and every step that has not finished.';

-- Sends steps in error back to the queue: attempts start again from zero, each step gets a
-- new message (visible at once, at its task's priority) and a retry_requested transition
-- (metadata: p_metadata), and each task's error count goes down by its retried steps; a task
-- left with no step in error goes on (_resume_task: steps whose parents completed meanwhile are
-- enqueued, parked steps get their messages back). The shared body of retry_step and
-- retry_failed. The caller holds _lock_task_operations of every task concerned, so no other
-- operator call changes them; the steps (which in error have no message) are locked here in
-- step_uuid order, then _apply_task_deltas locks the tasks in task_uuid order: the lock order of
-- section 7 of docs/architecture.md. Steps not in error are left alone. Returns each task's
-- new state and how many of its steps were retried.
CREATE FUNCTION tasker._retry_error_steps(p_steps uuid[], p_metadata jsonb)
RETURNS TABLE (task_uuid uuid, task_state text, retried integer)
LANGUAGE plpgsql AS $$
#variable_conflict use_column
DECLARE
    v_now     timestamptz := clock_timestamp();
    v_deltas  tasker._task_delta[];
    v_queues  text[];
    v_changed tasker._task_change[];
    v_task    uuid;
    v_waits   uuid[];
    v_wait_deltas tasker._task_delta[];
BEGIN
    PERFORM 1 FROM tasker.steps s WHERE s.step_uuid = ANY (p_steps) ORDER BY s.step_uuid FOR UPDATE;
    -- wait_for_event and sleep steps (a wait that timed out) wait again, without a message
    WITH waits AS MATERIALIZED (
        SELECT s.step_uuid, s.task_uuid, s.attempts, t.namespace
          FROM tasker.steps s
          JOIN tasker.tasks t ON t.task_uuid = s.task_uuid
          JOIN tasker.named_steps n ON n.named_step_id = s.named_step_id
         WHERE s.step_uuid = ANY (p_steps) AND s.state = 'error' AND n.wait_config IS NOT NULL
    ),
    upd AS (
        UPDATE tasker.steps s
           SET state = 'waiting', attempts = 0, completed_at = NULL, started_at = v_now, updated_at = v_now
          FROM waits w
         WHERE s.step_uuid = w.step_uuid
    ),
    audit AS (
        INSERT INTO tasker.step_transitions (step_uuid, task_uuid, from_state, to_state, event, attempt, metadata, created_at)
        SELECT w.step_uuid, w.task_uuid, 'error', 'waiting', 'retry_requested', w.attempts, p_metadata, v_now
          FROM waits w
    )
    SELECT array_agg(w.step_uuid), array_agg(ROW(w.task_uuid, 0, -1)::tasker._task_delta)
      INTO v_waits, v_wait_deltas
      FROM waits w;
    IF v_waits IS NOT NULL THEN
        PERFORM tasker._arm_waits(v_waits);  -- sql/functions/88_waits.sql
    END IF;
    WITH todo AS MATERIALIZED (
        SELECT s.step_uuid, s.task_uuid, s.attempts, t.namespace, t.priority, s.lane,
               nextval(tasker._queue_sequence(t.namespace)) AS msg_id
          FROM tasker.steps s
          JOIN tasker.tasks t ON t.task_uuid = s.task_uuid
         WHERE s.step_uuid = ANY (p_steps) AND s.state = 'error'
         ORDER BY s.step_uuid
    ),
    msgs AS (
        INSERT INTO tasker.queue_messages (queue, msg_id, enqueued_at, vt, priority, message, lane)
        SELECT d.namespace, d.msg_id, v_now, v_now, d.priority,
               jsonb_build_object('step_uuid', d.step_uuid, 'task_uuid', d.task_uuid), d.lane
          FROM todo d
    ),
    upd AS (
        UPDATE tasker.steps s
           SET state = 'enqueued', attempts = 0, claim_spent_attempt = false, continuation = false,
               next_attempt_at = NULL, completed_at = NULL, msg_id = d.msg_id, enqueued_at = v_now,
               updated_at = v_now
          FROM todo d
         WHERE s.step_uuid = d.step_uuid
    ),
    audit AS (
        INSERT INTO tasker.step_transitions (step_uuid, task_uuid, from_state, to_state, event, attempt, metadata, created_at)
        SELECT d.step_uuid, d.task_uuid, 'error', 'enqueued', 'retry_requested', d.attempts, p_metadata, v_now
          FROM todo d
    )
    SELECT array_agg(ROW(x.task_uuid, 0, -x.n)::tasker._task_delta ORDER BY x.task_uuid),
           array_agg(DISTINCT x.namespace) FILTER (WHERE x.queued)
      INTO v_deltas, v_queues
      FROM (SELECT y.task_uuid, min(y.namespace) AS namespace, sum(y.n)::integer AS n, bool_or(y.queued) AS queued
              FROM (SELECT d.task_uuid, d.namespace, 1 AS n, true AS queued FROM todo d
                    UNION ALL
                    SELECT wd.task_uuid, NULL, 1, false FROM unnest(v_wait_deltas) wd) y
             GROUP BY y.task_uuid) x;
    -- the lanes of the messages sent (55_flow.sql)
    PERFORM tasker._note_step_lanes(x.namespace, x.steps)
       FROM (SELECT t.namespace, array_agg(s.step_uuid) AS steps
               FROM tasker.steps s JOIN tasker.tasks t ON t.task_uuid = s.task_uuid
              WHERE s.step_uuid = ANY (p_steps) AND s.lane IS NOT NULL AND s.state = 'enqueued'
              GROUP BY t.namespace ORDER BY t.namespace) x;
    IF v_deltas IS NULL THEN
        RETURN;
    END IF;
    PERFORM pg_notify('tasker_' || q, '') FROM unnest(v_queues) q;

    SELECT array_agg(ROW(d.task_uuid, d.old_state, d.new_state, NULL, NULL)::tasker._task_change ORDER BY d.task_uuid)
      INTO v_changed
      FROM tasker._apply_task_deltas(v_deltas, 'step_retried') d;
    FOR v_task IN SELECT c.task_uuid FROM unnest(v_changed) c
                   WHERE c.new_state IN ('pending', 'steps_in_process') ORDER BY c.task_uuid LOOP
        PERFORM tasker._resume_task(v_task);
    END LOOP;
    RETURN QUERY
        SELECT c.task_uuid, c.new_state, -dl.errors
          FROM unnest(v_changed) c
          JOIN unnest(v_deltas) dl ON dl.task_uuid = c.task_uuid
         ORDER BY c.task_uuid;
END
$$;

-- Retries a step that is in error: attempts start again from zero, the step is enqueued, and
-- its task leaves the error state when no other step is in error (then steps whose parents
-- completed meanwhile are enqueued too). Refuses any other state.
CREATE FUNCTION tasker.retry_step(p_step uuid) RETURNS jsonb
LANGUAGE plpgsql AS $$
DECLARE
    v_step  tasker.steps%ROWTYPE;
    v_task  text;
BEGIN
    PERFORM tasker._lock_task_operations((SELECT s.task_uuid FROM tasker.steps s WHERE s.step_uuid = p_step));
    -- A step in error has no message: its row is the first lock.
    SELECT * INTO v_step FROM tasker.steps s WHERE s.step_uuid = p_step FOR UPDATE;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'step % does not exist', p_step USING ERRCODE = 'TN004';
    END IF;
    IF v_step.state <> 'error' THEN
        RAISE EXCEPTION 'step % (%) is %; only a step in error can be retried', v_step.name, p_step, v_step.state
            USING ERRCODE = 'TS002';
    END IF;
    SELECT r.task_state INTO v_task FROM tasker._retry_error_steps(ARRAY[p_step], NULL) r;
    RETURN jsonb_build_object('step_uuid', p_step,
                              'state', (SELECT s.state FROM tasker.steps s WHERE s.step_uuid = p_step),
                              'task_uuid', v_step.task_uuid,
                              'task_state', v_task);
END
$$;
COMMENT ON FUNCTION tasker.retry_step(uuid) IS
    'Operator: re-enqueues a step in error with its attempts reset.';

-- Bulk redrive of the dead letters of a namespace: the tasks in error (of template p_name when
-- given) that entered error at or after p_since and before p_before (when given), oldest
-- first (then by task_uuid), at most p_limit (1 to 1000: each task's operator lock takes an
-- entry of the shared lock table, sized by max_locks_per_transaction) of them per call; every
-- step in error of each is retried exactly as retry_step does it (_retry_error_steps), with the
-- transition metadata {"operation": "retry_failed", "by": session_user, "reason": p_reason}.
-- The time a task entered error is that of its last task transition into error from another
-- state. The tasks' operator locks (_lock_task_operations) are taken in task_uuid order before
-- any row lock, so two bulk calls, or a bulk call and cancel_task/retry_step/resolve_step, wait
-- for each other rather than deadlock; a task no longer in error once its lock is held (a
-- concurrent cancel or retry) is returned with retried = false. With p_dry_run nothing is
-- locked or changed: the rows say what would be retried. One row per task matched, oldest
-- first: its uuid, template name, when it entered error, its steps in error (names and uuids,
-- by name), whether they were retried, and the task's state afterwards.
CREATE FUNCTION tasker.retry_failed(
    p_namespace text,
    p_name      text DEFAULT NULL,
    p_since     timestamptz DEFAULT NULL,
    p_limit     integer DEFAULT 1000,
    p_dry_run   boolean DEFAULT false,
    p_before    timestamptz DEFAULT NULL,
    p_reason    text DEFAULT NULL
) RETURNS TABLE (task_uuid uuid, name text, failed_at timestamptz, steps text[], step_uuids uuid[],
                 retried boolean, task_state text)
LANGUAGE plpgsql AS $$
#variable_conflict use_column
DECLARE
    v_tasks   uuid[];
    v_names   text[];
    v_failed  timestamptz[];
    v_task    uuid;
    v_steps   uuid[];
    v_done    uuid[] := '{}';
BEGIN
    IF p_namespace IS NULL OR p_namespace !~ '^[a-z][a-z0-9_]{0,46}$' THEN
        RAISE EXCEPTION 'namespace % is invalid: 1 to 47 lowercase letters, digits and _, starting with a letter',
            coalesce(quote_literal(p_namespace), 'NULL') USING ERRCODE = 'TV002';
    END IF;
    IF p_name IS NOT NULL AND p_name !~ '^[A-Za-z][A-Za-z0-9_.-]{0,127}$' THEN
        RAISE EXCEPTION 'template name % is invalid: 1 to 128 letters, digits, _, . and -, starting with a letter',
            quote_literal(left(p_name, 200)) USING ERRCODE = 'TV002';
    END IF;
    IF p_limit IS NULL OR p_limit < 1 OR p_limit > 1000 THEN
        RAISE EXCEPTION 'limit must be between 1 and 1000, got %', coalesce(p_limit::text, 'NULL')
            USING ERRCODE = 'TV002';
    END IF;
    IF p_dry_run IS NULL THEN
        RAISE EXCEPTION 'dry_run must be true or false, got NULL' USING ERRCODE = 'TV002';
    END IF;
    IF p_since IS NOT NULL AND p_before IS NOT NULL AND p_since >= p_before THEN
        RAISE EXCEPTION 'since (%) must be earlier than before (%)', p_since, p_before USING ERRCODE = 'TV002';
    END IF;
    IF p_since IN ('infinity', '-infinity') OR p_before IN ('infinity', '-infinity') THEN
        RAISE EXCEPTION 'since and before must be finite times' USING ERRCODE = 'TV002';
    END IF;
    PERFORM tasker._check_text_size(p_reason, 'max_text_bytes', 'reason');
    IF NOT EXISTS (SELECT 1 FROM tasker.named_tasks nt
                    WHERE nt.namespace = p_namespace AND (p_name IS NULL OR nt.name = p_name)) THEN
        IF p_name IS NULL THEN
            RAISE EXCEPTION 'no template is registered in namespace %', quote_literal(p_namespace)
                USING ERRCODE = 'TN002';
        END IF;
        PERFORM tasker._raise_unknown_template(p_namespace, p_name, NULL);
    END IF;

    -- The candidates, oldest entry into error first. A task in error is live (completed_at
    -- NULL), so only live tasks are read (tasks_live_idx). A decision applied while the task
    -- is in error writes an error -> error transition: not an entry into error.
    SELECT coalesce(array_agg(c.task_uuid ORDER BY c.failed_at, c.task_uuid), '{}'),
           coalesce(array_agg(c.name ORDER BY c.failed_at, c.task_uuid), '{}'),
           coalesce(array_agg(c.failed_at ORDER BY c.failed_at, c.task_uuid), '{}')
      INTO v_tasks, v_names, v_failed
      FROM (SELECT t.task_uuid, t.name, f.failed_at
              FROM tasker.tasks t
             CROSS JOIN LATERAL (
                   SELECT coalesce(max(tt.created_at), t.updated_at) AS failed_at
                     FROM tasker.task_transitions tt
                    WHERE tt.task_uuid = t.task_uuid AND tt.to_state = 'error'
                      AND tt.from_state IS DISTINCT FROM 'error') f
             WHERE t.completed_at IS NULL AND t.state = 'error'
               AND t.namespace = p_namespace AND (p_name IS NULL OR t.name = p_name)
               AND (p_since IS NULL OR f.failed_at >= p_since)
               AND (p_before IS NULL OR f.failed_at < p_before)
             ORDER BY f.failed_at, t.task_uuid
             LIMIT p_limit) c;

    IF NOT p_dry_run THEN
        -- Operator locks in task_uuid order, before any row lock (section 7).
        FOR v_task IN SELECT x FROM unnest(v_tasks) x ORDER BY x LOOP
            PERFORM tasker._lock_task_operations(v_task);
        END LOOP;
    END IF;
    -- Read after the locks (a new snapshot): a task cancelled, retried or resolved meanwhile is
    -- no longer in error and is left alone. Only operator calls change a step in error, and
    -- they are held off now.
    v_steps := ARRAY(SELECT s.step_uuid
                       FROM tasker.tasks t
                       JOIN tasker.steps s ON s.task_uuid = t.task_uuid
                      WHERE t.task_uuid = ANY (v_tasks) AND t.state = 'error' AND s.state = 'error');
    IF NOT p_dry_run THEN
        v_done := ARRAY(SELECT r.task_uuid
                          FROM tasker._retry_error_steps(
                                   v_steps,
                                   jsonb_build_object('operation', 'retry_failed', 'by', session_user::text,
                                                      'reason', p_reason)) r);
    END IF;

    RETURN QUERY
        WITH c AS (
            SELECT u.task_uuid, u.name, u.failed_at, u.ord
              FROM unnest(v_tasks, v_names, v_failed) WITH ORDINALITY u(task_uuid, name, failed_at, ord)
        ),
        st AS (
            SELECT s.task_uuid, array_agg(s.name ORDER BY s.name) AS names,
                   array_agg(s.step_uuid ORDER BY s.name) AS uuids
              FROM tasker.steps s
             WHERE s.step_uuid = ANY (v_steps)
             GROUP BY s.task_uuid
        )
        SELECT c.task_uuid, c.name, c.failed_at, coalesce(st.names, '{}'), coalesce(st.uuids, '{}'),
               c.task_uuid = ANY (v_done), t.state
          FROM c
          JOIN tasker.tasks t ON t.task_uuid = c.task_uuid
          LEFT JOIN st ON st.task_uuid = c.task_uuid
         ORDER BY c.ord;
END
$$;
COMMENT ON FUNCTION tasker.retry_failed(text,text,timestamptz,integer,boolean,timestamptz,text) IS
    'Operator: retries every step in error of the tasks in error of a namespace (and template), oldest first, at most p_limit tasks; p_dry_run changes nothing.';

-- Completes a step by hand (from any unfinished state) with the given result; it satisfies
-- its children like a success. A step in error that is resolved lets its task go on. A
-- decision or batchable step applies a valid outcome found in the result, else counts as
-- no_branches / no_batches.
CREATE FUNCTION tasker.resolve_step(p_step uuid, p_result jsonb DEFAULT NULL) RETURNS jsonb
LANGUAGE plpgsql AS $$
DECLARE
    v_msg    bigint;
    v_ns     text;
    v_task   uuid;
    v_state  text;
    v_cur    bigint;
    v_ready  uuid[];
    v_tstate text;
    v_decider boolean;
    v_now    timestamptz := clock_timestamp();
BEGIN
    PERFORM tasker._check_json_size(p_result, 'max_payload_bytes', 'result');
    PERFORM tasker._lock_task_operations((SELECT s.task_uuid FROM tasker.steps s WHERE s.step_uuid = p_step));
    -- Lock order: the step's message (if it has one), then the step. The message can change
    -- between reading the step and locking it; try again until both agree.
    LOOP
        SELECT s.msg_id, t.namespace, s.task_uuid INTO v_msg, v_ns, v_task
          FROM tasker.steps s JOIN tasker.tasks t ON t.task_uuid = s.task_uuid
         WHERE s.step_uuid = p_step;
        IF NOT FOUND THEN
            RAISE EXCEPTION 'step % does not exist', p_step USING ERRCODE = 'TN004';
        END IF;
        IF v_msg IS NOT NULL THEN
            PERFORM 1 FROM tasker.queue_messages m WHERE m.queue = v_ns AND m.msg_id = v_msg FOR UPDATE;
        END IF;
        SELECT s.state, s.msg_id INTO v_state, v_cur FROM tasker.steps s WHERE s.step_uuid = p_step FOR UPDATE;
        IF NOT FOUND THEN  -- deleted (purge_finished) while we waited for its lock
            RAISE EXCEPTION 'step % does not exist', p_step USING ERRCODE = 'TN004';
        END IF;
        EXIT WHEN v_cur IS NOT DISTINCT FROM v_msg;
    END LOOP;
    IF v_state IN ('complete', 'cancelled', 'resolved_manually') THEN
        RAISE EXCEPTION 'step % is % and cannot be resolved', p_step, v_state USING ERRCODE = 'TS003';
    END IF;
    IF v_msg IS NOT NULL THEN
        DELETE FROM tasker.queue_messages m WHERE m.queue = v_ns AND m.msg_id = v_msg;
    END IF;
    DELETE FROM tasker.step_waits w WHERE w.step_uuid = p_step;  -- a waiting step stops waiting
    UPDATE tasker.steps s
       SET state = 'resolved_manually', results = p_result, msg_id = NULL, continuation = false,
           completed_at = v_now, updated_at = v_now
     WHERE s.step_uuid = p_step;
    INSERT INTO tasker.step_transitions (step_uuid, task_uuid, from_state, to_state, event, created_at)
    SELECT p_step, v_task, v_state, 'resolved_manually', 'resolved', v_now;
    -- the place it held of its concurrency key is free (55_flow.sql)
    DELETE FROM tasker.flow_holders h WHERE h.step_uuid = p_step;
    IF FOUND THEN
        PERFORM pg_notify('tasker_' || v_ns, '');
    END IF;

    -- A decision or batchable step applies the valid outcome found in the result, else counts
    -- as no_branches / no_batches (sql/functions/62_dynamic.sql).
    v_decider := EXISTS (SELECT 1 FROM tasker.steps s JOIN tasker.named_steps n ON n.named_step_id = s.named_step_id
                          WHERE s.step_uuid = p_step AND n.step_type IN ('decision', 'batchable'));
    IF v_decider THEN
        PERFORM tasker._lock_dynamic(ARRAY[v_task]);
        PERFORM tasker._lock_convergences(ARRAY[v_task],
            ARRAY(SELECT e.child_uuid FROM tasker.step_edges e WHERE e.parent_uuid = p_step));
    END IF;
    v_ready := tasker._release_children(ARRAY[p_step]);
    IF v_decider THEN
        PERFORM tasker._apply_dynamic(ARRAY[p_step]);
    END IF;
    SELECT d.new_state INTO v_tstate
      FROM tasker._apply_task_deltas(
               ARRAY[ROW(v_task, 1, CASE WHEN v_state = 'error' THEN -1 ELSE 0 END)::tasker._task_delta],
               'step_resolved') d;
    PERFORM tasker._enqueue_ready(v_ready, 'dependencies_satisfied');
    IF v_state = 'error' AND v_tstate IN ('pending', 'steps_in_process') THEN
        PERFORM tasker._resume_task(v_task);
    END IF;
    RETURN jsonb_build_object('step_uuid', p_step, 'previous_state', v_state, 'state', 'resolved_manually',
                              'task_uuid', v_task, 'task_state', v_tstate);
END
$$;
COMMENT ON FUNCTION tasker.resolve_step(uuid,jsonb) IS
    'Operator: completes a step by hand with the given result, satisfying its dependents.';
