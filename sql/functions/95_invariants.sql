-- check_invariants(): one row per broken engine invariant; the tests assert it is empty after
-- every test that runs work. It checks that every live step (enqueued, waiting_for_retry,
-- in_progress) has exactly one message, except a parked one (a step waiting to start in a task
-- in error, whose message was taken out of the queue: msg_id NULL and no message), and no
-- other step has one, that fan-in counters
-- (pending_parents) and task counters match the steps they count, that a step whose parents
-- are satisfied in a running task is enqueued, and that no step has started before its
-- parents were satisfied, that a deferred convergence's counter equals its recomputed value
-- (created listed steps not finished plus listed steps that can still be created), and that
-- total_steps counts the created steps, that no step, edge or transition outlives its task
-- or step, and that every message's priority other than 0 is recorded for its queue (windowed
-- claims probe those), and that a step waits (state waiting, a step_waits row) exactly when it
-- is a wait_for_event or sleep step whose wait started, which is never queued or claimed.
-- docs/architecture.md lists the invariants.

-- One row per violation over the whole database; no rows means healthy. Meant for tests and
-- for operators after an incident; it reads everything, so it is not for the hot path.
CREATE FUNCTION tasker.check_invariants() RETURNS TABLE (invariant text, detail text)
LANGUAGE sql STABLE AS $$
    WITH msg AS (
        SELECT (m.message->>'step_uuid')::uuid AS step_uuid, m.queue, m.msg_id
          FROM tasker.queue_messages m
         WHERE m.message->>'step_uuid' ~* '^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$'
    ),
    msg_count AS (
        SELECT msg.step_uuid, count(*) AS n FROM msg GROUP BY msg.step_uuid
    ),
    per_step AS (
        SELECT s.step_uuid, s.name, s.state, s.msg_id, s.pending_parents, t.namespace,
               t.state AS task_state, coalesce(mc.n, 0) AS messages,
               EXISTS (SELECT 1 FROM tasker.queue_messages m
                        WHERE m.queue = t.namespace AND m.msg_id = s.msg_id
                          AND m.message->>'step_uuid' = s.step_uuid::text) AS pointer_ok
          FROM tasker.steps s
          JOIN tasker.tasks t ON t.task_uuid = s.task_uuid
          LEFT JOIN msg_count mc ON mc.step_uuid = s.step_uuid
    ),
    parents AS (
        SELECT s.step_uuid, s.name, s.state, s.pending_parents,
               n.step_type = 'deferred_convergence' AS convergence,
               count(e.parent_uuid) AS total,
               count(e.parent_uuid) FILTER (WHERE p.state IN ('complete', 'resolved_manually')) AS satisfied
          FROM tasker.steps s
          JOIN tasker.named_steps n ON n.named_step_id = s.named_step_id
          LEFT JOIN tasker.step_edges e ON e.child_uuid = s.step_uuid
          LEFT JOIN tasker.steps p ON p.step_uuid = e.parent_uuid
         GROUP BY s.step_uuid, s.name, s.state, s.pending_parents, n.step_type
    ),
    -- deferred convergence steps: their counter also counts listed steps that can still be
    -- created (sql/functions/62_dynamic.sql), so it is recomputed per task
    convergence AS (
        SELECT s.step_uuid, s.name, s.state, s.pending_parents, cp.pending
          FROM (SELECT DISTINCT s.task_uuid
                  FROM tasker.steps s JOIN tasker.named_steps n ON n.named_step_id = s.named_step_id
                 WHERE n.step_type = 'deferred_convergence') ct
         CROSS JOIN LATERAL tasker._convergence_pending(ct.task_uuid) cp
          JOIN tasker.steps s ON s.step_uuid = cp.step_uuid
    ),
    counts AS (
        SELECT t.task_uuid, t.state, t.total_steps, t.completed_steps, t.error_steps,
               count(s.step_uuid) AS steps,
               count(s.step_uuid) FILTER (WHERE s.state IN ('complete', 'resolved_manually')) AS done,
               count(s.step_uuid) FILTER (WHERE s.state = 'error') AS errors
          FROM tasker.tasks t LEFT JOIN tasker.steps s ON s.task_uuid = t.task_uuid
         GROUP BY t.task_uuid
    )
    -- 3. every live step has exactly one message, and steps point at it; only a step waiting
    --    to start in a task in error may be parked instead: no msg_id and no message at all
    SELECT 'live_step_has_one_message',
           format('step %s (%s) is %s with %s messages in %s task', ps.name, ps.step_uuid, ps.state, ps.messages, ps.task_state)
      FROM per_step ps
     WHERE ps.state IN ('enqueued', 'waiting_for_retry', 'in_progress') AND (ps.messages <> 1 OR NOT ps.pointer_ok)
       AND NOT (ps.msg_id IS NULL AND ps.messages = 0 AND ps.state IN ('enqueued', 'waiting_for_retry')
                AND ps.task_state = 'error')
    UNION ALL
    -- 3. no other step has one
    SELECT 'only_live_steps_have_messages',
           format('step %s (%s) is %s but has %s messages', ps.name, ps.step_uuid, ps.state, ps.messages)
      FROM per_step ps
     WHERE ps.state NOT IN ('enqueued', 'waiting_for_retry', 'in_progress') AND ps.messages > 0
    UNION ALL
    -- a step whose parents are all satisfied, in a task that runs, has been enqueued
    SELECT 'ready_step_is_enqueued',
           format('step %s (%s) is pending with no pending parents in %s task', ps.name, ps.step_uuid, ps.task_state)
      FROM per_step ps
     WHERE ps.state = 'pending' AND ps.pending_parents <= 0 AND ps.task_state IN ('pending', 'steps_in_process')
    UNION ALL
    SELECT 'message_has_a_step', format('message %s in queue %s names unknown step %s', msg.msg_id, msg.queue, msg.step_uuid)
      FROM msg WHERE NOT EXISTS (SELECT 1 FROM tasker.steps s WHERE s.step_uuid = msg.step_uuid)
    UNION ALL
    -- 2. a step is enqueued by its dependencies at most once
    SELECT 'fan_in_enqueued_once', format('step %s was enqueued (or started to wait) %s times by its dependencies', st.step_uuid, st.n)
      FROM (SELECT tr.step_uuid, count(*) AS n FROM tasker.step_transitions tr
             WHERE tr.to_state IN ('enqueued', 'waiting') AND tr.event IN ('created', 'dependencies_satisfied', 'task_resumed')
             GROUP BY tr.step_uuid HAVING count(*) > 1) st
    UNION ALL
    -- the fan-in counter equals the parents not yet satisfied
    SELECT 'pending_parents_matches', format('step %s (%s): pending_parents %s, unsatisfied parents %s',
                                              pa.name, pa.step_uuid, pa.pending_parents, pa.total - pa.satisfied)
      FROM parents pa
     WHERE pa.pending_parents <> pa.total - pa.satisfied AND NOT pa.convergence
    UNION ALL
    -- a pending convergence's counter equals the recomputed value; one that started has no
    -- listed step left to wait for
    SELECT 'convergence_pending_matches', format('convergence step %s (%s) is %s: pending_parents %s, recomputed %s',
                                                  cv.name, cv.step_uuid, cv.state, cv.pending_parents, cv.pending)
      FROM convergence cv
     WHERE (cv.state = 'pending' AND cv.pending_parents <> cv.pending)
        OR (cv.state IN ('enqueued', 'in_progress', 'waiting_for_retry', 'complete') AND cv.pending > 0)
    UNION ALL
    -- nothing runs or ran before all of its parents were satisfied
    SELECT 'parents_before_children', format('step %s (%s) is %s with %s of %s parents satisfied',
                                              pa.name, pa.step_uuid, pa.state, pa.satisfied, pa.total)
      FROM parents pa
     WHERE pa.state IN ('enqueued', 'in_progress', 'waiting_for_retry', 'waiting', 'complete') AND pa.satisfied < pa.total
    UNION ALL
    -- task counters and states agree with the steps
    SELECT 'task_counters_match', format('task %s: total %s/%s, completed %s/%s, errors %s/%s',
                                          c.task_uuid, c.total_steps, c.steps, c.completed_steps, c.done, c.error_steps, c.errors)
      FROM counts c
     WHERE c.total_steps <> c.steps OR c.completed_steps <> c.done OR c.error_steps <> c.errors
    UNION ALL
    SELECT 'task_state_matches', format('task %s is %s with %s of %s steps done and %s in error',
                                         c.task_uuid, c.state, c.done, c.steps, c.errors)
      FROM counts c
     WHERE (c.state = 'complete' AND c.done <> c.steps)
        OR (c.state IN ('pending', 'steps_in_process') AND (c.done = c.steps OR c.errors > 0))
        OR (c.state = 'error' AND c.errors = 0)
    UNION ALL
    -- nothing of a task outlives it (the per-task tables have no foreign keys; purge_finished
    -- deletes a task with all of its rows)
    SELECT 'step_has_a_task', format('step %s (%s) belongs to task %s, which does not exist', s.name, s.step_uuid, s.task_uuid)
      FROM tasker.steps s
     WHERE NOT EXISTS (SELECT 1 FROM tasker.tasks t WHERE t.task_uuid = s.task_uuid)
    UNION ALL
    SELECT 'edge_has_its_steps', format('edge %s -> %s names a step that does not exist', e.parent_uuid, e.child_uuid)
      FROM tasker.step_edges e
     WHERE NOT EXISTS (SELECT 1 FROM tasker.steps s WHERE s.step_uuid = e.parent_uuid)
        OR NOT EXISTS (SELECT 1 FROM tasker.steps s WHERE s.step_uuid = e.child_uuid)
    UNION ALL
    SELECT 'transition_has_its_row', format('%s step transitions of step %s, which does not exist', count(*), st.step_uuid)
      FROM tasker.step_transitions st
     WHERE NOT EXISTS (SELECT 1 FROM tasker.steps s WHERE s.step_uuid = st.step_uuid)
     GROUP BY st.step_uuid
    UNION ALL
    SELECT 'transition_has_its_row', format('%s task transitions of task %s, which does not exist', count(*), tt.task_uuid)
      FROM tasker.task_transitions tt
     WHERE NOT EXISTS (SELECT 1 FROM tasker.tasks t WHERE t.task_uuid = tt.task_uuid)
     GROUP BY tt.task_uuid
    UNION ALL
    -- durable waits: a step is waiting exactly when it has a step_waits row (its kind the step's
    -- type), and only wait_for_event and sleep steps wait
    SELECT 'waiting_step_has_its_wait',
           format('step %s (%s) of type %s is %s with %s', s.name, s.step_uuid, n.step_type, s.state,
                  CASE WHEN w.step_uuid IS NULL THEN 'no step_waits row' ELSE 'a ' || w.kind || ' wait row' END)
      FROM tasker.steps s
      JOIN tasker.named_steps n ON n.named_step_id = s.named_step_id
      LEFT JOIN tasker.step_waits w ON w.step_uuid = s.step_uuid
     WHERE (s.state = 'waiting') <> (w.step_uuid IS NOT NULL)
        OR (s.state = 'waiting' AND n.step_type NOT IN ('wait_for_event', 'sleep'))
        OR (w.kind IS DISTINCT FROM CASE n.step_type WHEN 'wait_for_event' THEN 'event' WHEN 'sleep' THEN 'sleep' END
            AND w.step_uuid IS NOT NULL)
    UNION ALL
    SELECT 'waiting_step_has_its_wait', format('wait row of step %s, which does not exist', w.step_uuid)
      FROM tasker.step_waits w
     WHERE NOT EXISTS (SELECT 1 FROM tasker.steps s WHERE s.step_uuid = w.step_uuid)
    UNION ALL
    -- a wait step never holds a worker: it is never sent to a queue nor claimed
    SELECT 'wait_step_never_queued',
           format('%s step %s (%s) is %s%s', n.step_type, s.name, s.step_uuid, s.state,
                  CASE WHEN s.msg_id IS NOT NULL THEN ' with message ' || s.msg_id ELSE '' END)
      FROM tasker.steps s
      JOIN tasker.named_steps n ON n.named_step_id = s.named_step_id
     WHERE n.step_type IN ('wait_for_event', 'sleep')
       AND (s.state IN ('enqueued', 'in_progress', 'waiting_for_retry') OR s.msg_id IS NOT NULL OR s.claim_seq > 0)
    UNION ALL
    -- a windowed claim probes only the priorities recorded for the queue (and 0): a message of
    -- another priority would wait for a claim without a window
    SELECT 'priority_is_recorded', format('%s messages of queue %s have priority %s, which tasker.queue_priorities does not list',
                                          count(*), m.queue, m.priority)
      FROM tasker.queue_messages m
     WHERE m.priority <> 0
       AND NOT EXISTS (SELECT 1 FROM tasker.queue_priorities qp WHERE qp.queue = m.queue AND qp.priority = m.priority)
     GROUP BY m.queue, m.priority
    UNION ALL
    -- flow control (55_flow.sql): a queue with lanes is claimed lane by lane, so a message whose
    -- lane has no row would never be claimed; and a message's lane is its step's
    SELECT 'lane_is_recorded', format('%s messages of queue %s are in lane %s, which tasker.flow_lanes does not list',
                                      count(*), m.queue, quote_literal(m.lane))
      FROM tasker.queue_messages m
     WHERE m.lane IS NOT NULL
       AND NOT EXISTS (SELECT 1 FROM tasker.flow_lanes l WHERE l.queue = m.queue AND l.lane = m.lane)
     GROUP BY m.queue, m.lane
    UNION ALL
    SELECT 'lane_is_recorded', format('queue %s has lanes but no lane %s for its messages without one', l.queue, quote_literal(''))
      FROM (SELECT DISTINCT l.queue FROM tasker.flow_lanes l) l
     WHERE NOT EXISTS (SELECT 1 FROM tasker.flow_lanes k WHERE k.queue = l.queue AND k.lane = '')
    UNION ALL
    SELECT 'message_lane_is_its_steps', format('message %s of step %s is in lane %s, its step in lane %s',
                                               m.msg_id, s.step_uuid, coalesce(quote_literal(m.lane), 'none'),
                                               coalesce(quote_literal(s.lane), 'none'))
      FROM tasker.queue_messages m
      JOIN tasker.steps s ON s.msg_id = m.msg_id AND m.message->>'step_uuid' = s.step_uuid::text
     WHERE m.lane IS DISTINCT FROM s.lane
    UNION ALL
    -- the limit: no more steps of a key in progress than the highest limit among them (each is
    -- admitted while fewer than its own limit run)
    SELECT 'concurrency_limit_kept', format('%s steps with concurrency key %s of queue %s are in progress; the limit is %s',
                                            count(*), quote_literal(h.concurrency_key), h.queue, max(n.concurrency_limit))
      FROM tasker.flow_holders h
      JOIN tasker.steps s ON s.step_uuid = h.step_uuid AND s.state = 'in_progress'
      JOIN tasker.named_steps n ON n.named_step_id = s.named_step_id
     GROUP BY h.queue, h.concurrency_key
    HAVING count(*) > max(n.concurrency_limit)
$$;
COMMENT ON FUNCTION tasker.check_invariants() IS
    'Rows for every broken engine invariant (message per live step, counters, fan-in); empty when healthy.';
