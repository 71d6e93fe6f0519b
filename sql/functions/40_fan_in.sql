-- What follows a step's completion, shared by complete_steps and the operator functions:
-- decrement each child's pending_parents under row lock (fan-in by counter, never by reading
-- "are all parents done?" from a snapshot), enqueue the children that reach zero, apply the
-- per-task counter changes in one update per task (finishing tasks), and wake a task's parked
-- steps when it leaves the error state.

-- Shared pieces of the hot path
CREATE TYPE tasker._task_delta AS (task_uuid uuid, completed integer, errors integer);

CREATE TYPE tasker._task_change AS (task_uuid uuid, old_state text, new_state text, namespace text, name text);

-- Applies step-count changes to tasks, one counter update per task, locking the tasks in
-- task_uuid order (the last link of the lock order), and moves each task's state:
-- error while any step is in error, complete when every step is complete or resolved,
-- otherwise steps_in_process (the first recorded outcome flips pending). Cancelled and
-- manually resolved tasks keep their state. Each state change gets a transition row and a
-- notification on channel tasker_task_events. complete_and_claim (60_complete.sql) runs the
-- same statement inline (one call and its SET clauses fewer per hop): change both together.
CREATE FUNCTION tasker._apply_task_deltas(p_deltas tasker._task_delta[], p_event text)
RETURNS TABLE (task_uuid uuid, old_state text, new_state text)
LANGUAGE plpgsql AS $$
#variable_conflict use_column
DECLARE
    v_now     timestamptz := clock_timestamp();
    v_changes tasker._task_change[];
BEGIN
    WITH d AS (
            SELECT x.task_uuid, sum(x.completed)::integer AS completed, sum(x.errors)::integer AS errors
              FROM unnest(p_deltas) x
             GROUP BY x.task_uuid
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
        upd AS (
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
        audit AS (
            INSERT INTO tasker.task_transitions (task_uuid, from_state, to_state, event, created_at)
            SELECT u.task_uuid, u.old_state, u.new_state, p_event, v_now
              FROM upd u
             WHERE u.old_state <> u.new_state
        )
        SELECT array_agg(ROW(u.task_uuid, u.old_state, u.new_state, u.namespace, u.name)::tasker._task_change)
          INTO v_changes
          FROM upd u;
    -- one notification per changed task, sent in one statement (delivered at commit)
    PERFORM pg_notify('tasker_task_events', json_build_object(
                'task_uuid', c.task_uuid, 'state', c.new_state, 'previous_state', c.old_state,
                'namespace', c.namespace, 'name', c.name)::text)
       FROM unnest(v_changes) c
      WHERE c.old_state <> c.new_state;
    RETURN QUERY SELECT c.task_uuid, c.old_state, c.new_state FROM unnest(v_changes) c;
END
$$;
ALTER FUNCTION tasker._apply_task_deltas(tasker._task_delta[], text) SET plan_cache_mode = force_generic_plan;
ALTER FUNCTION tasker._apply_task_deltas(tasker._task_delta[], text) SET enable_seqscan = off;

-- Decrements the fan-in counter of every child of the given (just satisfied) steps and
-- returns the children that reached zero while pending. Children are locked in step_uuid order
-- first; the counter is changed under that lock, never recomputed from a snapshot, so when two
-- parents complete at the same moment exactly one of them sees it reach zero.
-- complete_and_claim runs the same locking and counting inline, as one statement: change both.
CREATE FUNCTION tasker._release_children(p_parents uuid[]) RETURNS uuid[]
LANGUAGE plpgsql AS $$
DECLARE
    v_ready uuid[];
BEGIN
    PERFORM 1
       FROM tasker.steps s
      WHERE s.step_uuid IN (SELECT e.child_uuid FROM tasker.step_edges e WHERE e.parent_uuid = ANY (p_parents))
      ORDER BY s.step_uuid
        FOR UPDATE;
    WITH d AS (
        SELECT e.child_uuid, count(*)::integer AS n
          FROM tasker.step_edges e
         WHERE e.parent_uuid = ANY (p_parents)
         GROUP BY e.child_uuid
    ),
    upd AS (
        UPDATE tasker.steps s
           SET pending_parents = s.pending_parents - d.n
          FROM d
         WHERE s.step_uuid = d.child_uuid
        RETURNING s.step_uuid, s.pending_parents, s.state
    )
    SELECT array_agg(upd.step_uuid) INTO v_ready
      FROM upd
     WHERE upd.pending_parents <= 0 AND upd.state = 'pending';
    RETURN coalesce(v_ready, '{}');
END
$$;
ALTER FUNCTION tasker._release_children(uuid[]) SET plan_cache_mode = force_generic_plan;
ALTER FUNCTION tasker._release_children(uuid[]) SET enable_seqscan = off;

-- Enqueues the given steps that are (still) pending with every parent satisfied, when their
-- task is running (a task in error starts nothing new): state enqueued, one message each, one
-- notification per queue (unless p_notify is false: complete_and_claim notifies for what it
-- does not hand to its worker); wait_for_event and sleep steps start to wait instead (state
-- waiting, no message: _start_waits). Returns the messages it sent.
-- Raised by _enqueue_ready when a task's namespace queue no longer exists.
CREATE FUNCTION tasker._raise_missing_queue(p_queue text, p_task uuid) RETURNS bigint
LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'queue % of task % does not exist, so its ready steps cannot be enqueued',
        quote_literal(p_queue), p_task
        USING ERRCODE = 'TN001',
              HINT = 'create it again with tasker.create_queue(' || quote_literal(p_queue) || ')';
END
$$;

CREATE FUNCTION tasker._enqueue_ready(p_steps uuid[], p_event text, p_notify boolean DEFAULT true)
RETURNS TABLE (queue text, msg_id bigint, step_uuid uuid, priority integer)
LANGUAGE plpgsql ROWS 10 AS $$
#variable_conflict use_column
DECLARE
    v_now    timestamptz := clock_timestamp();
    v_queues text[];
    v_msgs   bigint[];
    v_steps  uuid[];
    v_prios  integer[];
    v_waits  uuid[];
    v_lanes  text[];
    v_limits integer[];
    v_lane_queues text[];
BEGIN
    IF cardinality(p_steps) = 0 THEN
        RETURN;
    END IF;
    WITH ready AS MATERIALIZED (
        -- a task whose queue was dropped must not leave its ready steps pending in silence;
        -- wait_for_event and sleep steps get no message (they start to wait below)
        SELECT s.step_uuid, s.task_uuid, t.namespace, t.priority, n.wait_config IS NOT NULL AS is_wait, s.lane,
               CASE WHEN n.lane_path = n.concurrency_path THEN n.concurrency_limit END AS lane_limit,
               CASE WHEN n.wait_config IS NULL
                    THEN coalesce(nextval(q.msg_seq), tasker._raise_missing_queue(t.namespace, s.task_uuid)) END AS msg_id
          FROM tasker.steps s
          JOIN tasker.tasks t ON t.task_uuid = s.task_uuid
          JOIN tasker.named_steps n ON n.named_step_id = s.named_step_id
          LEFT JOIN tasker.queues q ON q.queue_name = t.namespace
         WHERE s.step_uuid = ANY (p_steps)
           AND s.state = 'pending' AND s.pending_parents <= 0
           AND t.state IN ('pending', 'steps_in_process')
    ),
    msgs AS (
        INSERT INTO tasker.queue_messages (queue, msg_id, enqueued_at, vt, priority, message, lane)
        SELECT r.namespace, r.msg_id, v_now, v_now, r.priority,
               jsonb_build_object('step_uuid', r.step_uuid, 'task_uuid', r.task_uuid), r.lane
          FROM ready r
         WHERE NOT r.is_wait
    ),
    upd AS (
        UPDATE tasker.steps s
           SET state = 'enqueued', msg_id = r.msg_id, enqueued_at = v_now, updated_at = v_now
          FROM ready r
         WHERE s.step_uuid = r.step_uuid AND NOT r.is_wait
        RETURNING s.step_uuid, s.task_uuid
    ),
    audit AS (
        INSERT INTO tasker.step_transitions (step_uuid, task_uuid, from_state, to_state, event, created_at)
        SELECT upd.step_uuid, upd.task_uuid, 'pending', 'enqueued', p_event, v_now FROM upd
    )
    SELECT array_agg(r.namespace) FILTER (WHERE NOT r.is_wait), array_agg(r.msg_id) FILTER (WHERE NOT r.is_wait),
           array_agg(r.step_uuid) FILTER (WHERE NOT r.is_wait), array_agg(r.priority) FILTER (WHERE NOT r.is_wait),
           array_agg(r.step_uuid) FILTER (WHERE r.is_wait),
           array_agg(r.lane) FILTER (WHERE r.lane IS NOT NULL AND NOT r.is_wait),
           array_agg(r.lane_limit) FILTER (WHERE r.lane IS NOT NULL AND NOT r.is_wait),
           array_agg(r.namespace) FILTER (WHERE r.lane IS NOT NULL AND NOT r.is_wait)
      INTO v_queues, v_msgs, v_steps, v_prios, v_waits, v_lanes, v_limits, v_lane_queues
      FROM ready r;
    IF v_lanes IS NOT NULL THEN  -- the lanes of the messages sent (55_flow.sql)
        PERFORM tasker._note_lanes(x.queue, x.lanes, x.limits)
           FROM (SELECT u.queue, array_agg(u.lane) AS lanes, array_agg(u.lim) AS limits
                   FROM unnest(v_lane_queues, v_lanes, v_limits) u(queue, lane, lim)
                  GROUP BY u.queue ORDER BY u.queue) x;
    END IF;
    IF p_notify THEN
        PERFORM pg_notify('tasker_' || q.queue, '') FROM (SELECT DISTINCT x AS queue FROM unnest(v_queues) x) q;
    END IF;
    IF v_waits IS NOT NULL THEN
        PERFORM tasker._start_waits(v_waits, p_event);  -- sql/functions/88_waits.sql
    END IF;
    RETURN QUERY SELECT * FROM unnest(v_queues, v_msgs, v_steps, v_prios);
END
$$;
ALTER FUNCTION tasker._enqueue_ready(uuid[], text, boolean) SET plan_cache_mode = force_generic_plan;
ALTER FUNCTION tasker._enqueue_ready(uuid[], text, boolean) SET enable_seqscan = off;

-- A task that left the error state goes on: steps whose parents completed meanwhile are
-- enqueued, and the steps parked while it was in error (enqueued or waiting_for_retry with no
-- message, see _claim_exceptions) get a new message from their step row, visible at once or
-- at their retry time. Nothing is skipped: a parked step has no message to be locked, a step
-- whose message was not parked yet keeps it (its visibility time was never moved), and a
-- claim parking a message right now holds the task row, so this caller (which has updated the
-- task) runs after it and sees the step parked.
CREATE FUNCTION tasker._resume_task(p_task uuid) RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
    v_now timestamptz := clock_timestamp();
    v_ns  text;
    v_pri integer;
    v_seq regclass;
BEGIN
    PERFORM tasker._enqueue_ready(
        ARRAY(SELECT s.step_uuid FROM tasker.steps s
               WHERE s.task_uuid = p_task AND s.state = 'pending' AND s.pending_parents <= 0),
        'task_resumed');
    SELECT t.namespace, t.priority INTO v_ns, v_pri FROM tasker.tasks t WHERE t.task_uuid = p_task;
    IF EXISTS (SELECT 1 FROM tasker.steps s
                WHERE s.task_uuid = p_task AND s.state IN ('enqueued', 'waiting_for_retry') AND s.msg_id IS NULL) THEN
        v_seq := tasker._queue_sequence(v_ns);
        WITH unparked AS (
            UPDATE tasker.steps s
               SET msg_id = nextval(v_seq), updated_at = v_now
             WHERE s.task_uuid = p_task AND s.state IN ('enqueued', 'waiting_for_retry') AND s.msg_id IS NULL
            RETURNING s.step_uuid, s.msg_id, s.next_attempt_at, s.lane
        )
        INSERT INTO tasker.queue_messages (queue, msg_id, enqueued_at, vt, priority, message, lane)
        SELECT v_ns, u.msg_id, v_now, greatest(v_now, coalesce(u.next_attempt_at, v_now)), v_pri,
               jsonb_build_object('step_uuid', u.step_uuid, 'task_uuid', p_task), u.lane
          FROM unparked u;
        PERFORM tasker._note_step_lanes(v_ns, ARRAY(
            SELECT s.step_uuid FROM tasker.steps s
             WHERE s.task_uuid = p_task AND s.state IN ('enqueued', 'waiting_for_retry') AND s.lane IS NOT NULL));
    END IF;
    PERFORM pg_notify('tasker_' || v_ns, '');
END
$$;
