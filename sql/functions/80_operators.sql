-- Operator actions: cancel_task, retry_step, resolve_step. Calls on one task are serialised
-- by a transaction-level advisory lock per task (_lock_task_operations), taken before any
-- message or step lock.

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

-- Retries a step that is in error: attempts start again from zero, the step is enqueued, and
-- its task leaves the error state when no other step is in error (then steps whose parents
-- completed meanwhile are enqueued too). Refuses any other state.
CREATE FUNCTION tasker.retry_step(p_step uuid) RETURNS jsonb
LANGUAGE plpgsql AS $$
DECLARE
    v_step  tasker.steps%ROWTYPE;
    v_ns    text;
    v_prio  integer;
    v_msg   bigint;
    v_task  text;
    v_now   timestamptz := clock_timestamp();
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
    SELECT t.namespace, t.priority INTO v_ns, v_prio FROM tasker.tasks t WHERE t.task_uuid = v_step.task_uuid;
    v_msg := nextval(tasker._queue_sequence(v_ns));
    INSERT INTO tasker.queue_messages (queue, msg_id, enqueued_at, vt, priority, message)
    VALUES (v_ns, v_msg, v_now, v_now, v_prio, jsonb_build_object('step_uuid', p_step, 'task_uuid', v_step.task_uuid));
    UPDATE tasker.steps s
       SET state = 'enqueued', attempts = 0, claim_spent_attempt = false, continuation = false,
           next_attempt_at = NULL, completed_at = NULL, msg_id = v_msg, enqueued_at = v_now, updated_at = v_now
     WHERE s.step_uuid = p_step;
    INSERT INTO tasker.step_transitions (step_uuid, task_uuid, from_state, to_state, event, attempt, created_at)
    VALUES (p_step, v_step.task_uuid, 'error', 'enqueued', 'retry_requested', v_step.attempts, v_now);
    PERFORM pg_notify('tasker_' || v_ns, '');

    SELECT d.new_state INTO v_task
      FROM tasker._apply_task_deltas(ARRAY[ROW(v_step.task_uuid, 0, -1)::tasker._task_delta], 'step_retried') d;
    IF v_task IN ('pending', 'steps_in_process') THEN
        PERFORM tasker._resume_task(v_step.task_uuid);
    END IF;
    RETURN jsonb_build_object('step_uuid', p_step, 'state', 'enqueued', 'task_uuid', v_step.task_uuid,
                              'task_state', v_task);
END
$$;
COMMENT ON FUNCTION tasker.retry_step(uuid) IS
    'Operator: re-enqueues a step in error with its attempts reset.';

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
    UPDATE tasker.steps s
       SET state = 'resolved_manually', results = p_result, msg_id = NULL, continuation = false,
           completed_at = v_now, updated_at = v_now
     WHERE s.step_uuid = p_step;
    INSERT INTO tasker.step_transitions (step_uuid, task_uuid, from_state, to_state, event, created_at)
    SELECT p_step, v_task, v_state, 'resolved_manually', 'resolved', v_now;

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
