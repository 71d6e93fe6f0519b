-- Read-only inspection for operators and DBAs: a task's effective state, per-step readiness
-- with the reason in words, execution context counts, and the v_tasks / v_steps views.

-- Inspection

-- The task state as users should see it: a pending task with a claimed step is in process.
CREATE FUNCTION tasker.effective_task_state(p_task uuid, p_state text) RETURNS text
LANGUAGE sql STABLE AS $$
    SELECT CASE
        WHEN p_state = 'pending' AND EXISTS (
            SELECT 1 FROM tasker.steps s WHERE s.task_uuid = p_task AND (s.attempts > 0 OR s.state <> 'pending' AND s.state <> 'enqueued'))
        THEN 'steps_in_process'
        ELSE p_state
    END
$$;
COMMENT ON FUNCTION tasker.effective_task_state(uuid,text) IS
    'A task''s state as users see it: pending shows as steps_in_process once a step was claimed.';

-- Per step of a task: is it ready, and if it is not running, why not, in plain words.
CREATE FUNCTION tasker.step_readiness(p_task uuid)
RETURNS TABLE (
    step_uuid uuid, name text, state text, attempts integer, max_attempts integer,
    dependencies_satisfied boolean, parents_total integer, parents_completed integer,
    retry_eligible boolean, ready boolean, next_attempt_at timestamptz, reason text
)
LANGUAGE plpgsql STABLE ROWS 10 AS $$
#variable_conflict use_column
BEGIN
    IF NOT EXISTS (SELECT 1 FROM tasker.tasks t WHERE t.task_uuid = p_task) THEN
        RAISE EXCEPTION 'task % does not exist', p_task USING ERRCODE = 'TN003';
    END IF;
    RETURN QUERY
    SELECT s.step_uuid, s.name, s.state, s.attempts, s.max_attempts,
           p.total = p.done, p.total, p.done,
           s.retryable AND s.attempts < s.max_attempts,
           -- the same decision claim_steps makes: a checkpoint continuation goes on even while
           -- its task is in error (it was running); nothing else starts then
           (s.state = 'in_progress' AND s.continuation AND t.state IN ('pending', 'steps_in_process', 'error'))
           OR (t.state IN ('pending', 'steps_in_process') AND (
               (s.state = 'enqueued' AND coalesce(m.vt <= clock_timestamp(), false))
               OR (s.state = 'waiting_for_retry' AND coalesce(s.next_attempt_at <= clock_timestamp(), false)))),
           CASE WHEN s.state = 'waiting_for_retry' THEN s.next_attempt_at
                WHEN s.state = 'enqueued' THEN m.vt
                WHEN s.state = 'waiting' THEN wt.deadline END,
           CASE
               WHEN s.state = 'complete' THEN 'complete'
               WHEN s.state = 'resolved_manually' THEN 'resolved manually'
               WHEN s.state = 'cancelled' THEN 'cancelled'
               WHEN s.state = 'error' THEN
                   'failed: ' || coalesce(s.last_error->>'error_type', 'error') || ': ' ||
                   coalesce(s.last_error->>'message', '') || ' (tasker.retry_step or tasker.resolve_step)'
               WHEN t.state = 'cancelled' THEN 'task is cancelled'
               -- durable waits (an emit or a timeout ends them even while the task is in error)
               WHEN s.state = 'waiting' AND wt.kind = 'sleep' THEN
                   'sleeping until ' || to_char(wt.deadline, 'YYYY-MM-DD HH24:MI:SS TZ') || ' (no worker is held)'
               WHEN s.state = 'waiting' AND wt.kind = 'event' THEN
                   format('waiting for event %s with key %s', quote_literal(wt.event_name), quote_literal(wt.event_key)) ||
                   CASE WHEN wt.deadline IS NOT NULL
                        THEN '; times out at ' || to_char(wt.deadline, 'YYYY-MM-DD HH24:MI:SS TZ') ||
                             CASE WHEN ns.wait_config->>'on_timeout' = 'complete' THEN ' and then completes with its default'
                                  ELSE ' and then fails' END
                        ELSE '' END ||
                   CASE WHEN wt.wake_at <= clock_timestamp()
                        THEN '; an event for it may be there: the next tasker.wake_waits() matches it' ELSE '' END ||
                   ' (no worker is held; tasker.emit_event completes it)'
               WHEN s.state = 'waiting' THEN 'waiting, but its wait row is missing (tasker.check_invariants)'
               WHEN t.state = 'error' AND s.state <> 'in_progress' THEN 'task is in error'
               WHEN s.state = 'pending' AND ns.step_type = 'deferred_convergence' AND s.pending_parents > p.total - p.done THEN
                   'waiting for ' || coalesce(p.waiting || ' and ', '') || (s.pending_parents - (p.total - p.done)) ||
                   ' listed step(s) not created yet that may still be (a decision or fan-out to apply)'
               WHEN s.state = 'pending' AND p.total > p.done AND ns.step_type = 'wait_for_event' THEN
                   'waiting for ' || p.waiting || format(', then for event %s keyed by %s', quote_literal(ns.wait_config->>'event'), ns.wait_config->>'key')
               WHEN s.state = 'pending' AND p.total > p.done AND ns.step_type = 'sleep' THEN
                   'waiting for ' || p.waiting || ', then sleeps ' ||
                   coalesce((ns.wait_config->>'duration_seconds') || ' s', 'until ' || (ns.wait_config->>'until'))
               WHEN s.state = 'pending' AND p.total > p.done THEN 'waiting for ' || p.waiting
               WHEN s.state = 'pending' THEN 'dependencies complete, about to be enqueued'
               -- the last claim was handed back by a worker without the step's handler
               WHEN rel.worker_id IS NOT NULL AND s.state IN ('enqueued', 'waiting_for_retry', 'in_progress') THEN
                   'worker ' || rel.worker_id || ' has no handler ' || ns.handler || ' (missing there since ' ||
                   to_char(coalesce(rel.missing_since, rel.created_at), 'YYYY-MM-DD HH24:MI:SS') ||
                   '); released without spending an attempt, ready again at ' ||
                   to_char(coalesce(m.vt, rel.created_at), 'HH24:MI:SS') || ' for a worker that has it'
               -- flow control (55_flow.sql): what holds a step back
               WHEN s.state IN ('enqueued', 'waiting_for_retry') AND fc.running >= ns.concurrency_limit
                    AND coalesce(m.vt <= clock_timestamp(), false) THEN
                   format('held by its concurrency limit: %s of %s steps with %s = %s are in progress; it starts when one of them ends',
                          fc.running, ns.concurrency_limit, ns.concurrency_path, quote_literal(s.concurrency_key))
               WHEN s.state = 'enqueued' AND rl.name IS NOT NULL AND m.vt > clock_timestamp() AND m.vt <= rl.parked_until THEN
                   format('held by rate limit %s (%s per second, burst %s): its token is due at %s',
                          quote_literal(rl.name), rl.per_second, rl.burst, to_char(m.vt, 'HH24:MI:SS.MS'))
               WHEN s.state = 'enqueued' AND m.vt > clock_timestamp() THEN 'scheduled to start at ' || to_char(m.vt, 'HH24:MI:SS')
               WHEN s.state = 'enqueued' AND fl.lane IS NOT NULL THEN
                   format('ready: waiting for a worker (fairness lane %s: %s lane(s) of %s take their turn before it)',
                          quote_literal(s.lane), fl.ahead, t.namespace)
               WHEN s.state = 'enqueued' THEN 'ready: waiting for a worker'
               WHEN s.state = 'waiting_for_retry' THEN
                   'retry at ' || to_char(s.next_attempt_at, 'HH24:MI:SS') || ' (attempt ' || (s.attempts + 1) || ' of ' || s.max_attempts || ')'
               WHEN s.state = 'in_progress' AND s.continuation THEN 'checkpointed: waiting to continue'
               WHEN s.state = 'in_progress' AND m.vt <= clock_timestamp() THEN
                   'lease of ' || coalesce(s.worker_id, '?') || ' expired at ' || to_char(m.vt, 'HH24:MI:SS') ||
                   CASE WHEN s.retryable AND s.attempts < s.max_attempts
                        THEN '; recorded at the next claim, retried after backoff (attempt ' || (s.attempts + 1) || ' of ' || s.max_attempts || ')'
                        ELSE '; no attempts left (' || s.attempts || ' of ' || s.max_attempts || '): the next claim marks it failed'
                   END
               WHEN s.state = 'in_progress' THEN
                   'running on ' || coalesce(s.worker_id, '?') || ' (attempt ' || s.attempts || ' of ' || s.max_attempts || ')'
               ELSE s.state
           END
      FROM tasker.steps s
      JOIN tasker.tasks t ON t.task_uuid = s.task_uuid
      JOIN tasker.named_steps ns ON ns.named_step_id = s.named_step_id
      LEFT JOIN tasker.queue_messages m ON m.queue = t.namespace AND m.msg_id = s.msg_id
      LEFT JOIN tasker.step_waits wt ON wt.step_uuid = s.step_uuid
      -- flow control: the steps of its concurrency key in progress, its rate limit, its lane
      LEFT JOIN LATERAL (
          SELECT count(*)::integer AS running
            FROM tasker.flow_holders h JOIN tasker.steps hs ON hs.step_uuid = h.step_uuid
           WHERE h.queue = t.namespace AND h.concurrency_key = s.concurrency_key AND hs.state = 'in_progress'
      ) fc ON s.concurrency_key IS NOT NULL
      LEFT JOIN tasker.rate_limits rl ON rl.name = s.rate_limit
      LEFT JOIN LATERAL (
          SELECT l.lane, (SELECT count(*) FROM tasker.flow_lanes o
                           WHERE o.queue = l.queue AND (o.vtime, o.lane) < (l.vtime, l.lane)) AS ahead
            FROM tasker.flow_lanes l WHERE l.queue = t.namespace AND l.lane = s.lane
      ) fl ON s.lane IS NOT NULL
      -- the step's last transition, when it is a release by a worker lacking the handler
      LEFT JOIN LATERAL (
          SELECT lt.worker_id, lt.created_at,
                 (SELECT (w.missing_handlers->>ns.handler)::timestamptz
                    FROM tasker.workers w WHERE w.worker_id = lt.worker_id) AS missing_since
            FROM (SELECT tr.event, tr.worker_id, tr.created_at, tr.metadata
                    FROM tasker.step_transitions tr
                   WHERE tr.step_uuid = s.step_uuid
                   ORDER BY tr.transition_id DESC
                   LIMIT 1) lt
           WHERE lt.event = 'released' AND lt.metadata->>'reason' = 'handler_missing'
      ) rel ON true
      CROSS JOIN LATERAL (
          SELECT count(*)::integer AS total,
                 (count(*) FILTER (WHERE ps.state IN ('complete', 'resolved_manually')))::integer AS done,
                 string_agg(ps.name, ', ' ORDER BY ps.name) FILTER (WHERE ps.state NOT IN ('complete', 'resolved_manually')) AS waiting
            FROM tasker.steps ps
           WHERE ps.task_uuid = s.task_uuid
             AND (ps.name = ANY (ns.parent_names)
                  -- a convergence after a fan-out: the workers of the batch_worker it lists
                  OR (cardinality(ns.worker_ancestor_ids) > 0 AND ps.named_step_id = ANY (ns.worker_ancestor_ids)
                      AND (SELECT w.name FROM tasker.named_steps w WHERE w.named_step_id = ps.named_step_id) = ANY (ns.parent_names)))
      ) p
     WHERE s.task_uuid = p_task
     ORDER BY ns.step_index;
    -- Template steps of a conditional or batch workflow that have no row (yet): one row each,
    -- step_uuid NULL, state not_created, saying whether they can still be created and why not.
    IF EXISTS (SELECT 1 FROM tasker.tasks t JOIN tasker.named_steps n ON n.named_task_id = t.named_task_id
                WHERE t.task_uuid = p_task AND n.is_dynamic) THEN
        RETURN QUERY
        WITH possible AS (SELECT tasker._possible_steps(p_task) AS names)
        SELECT NULL::uuid, n.name, 'not_created'::text, 0, n.max_attempts, false, 0, 0, false, false,
               NULL::timestamptz,
               CASE
                   WHEN d.step_type = 'decision' AND ds.state IN ('complete', 'resolved_manually') THEN
                       format('not created: decision `%s` chose [%s]', d.name,
                              coalesce((SELECT string_agg(x, ', ' ORDER BY x)
                                          FROM tasker.steps c JOIN tasker.named_steps cn ON cn.named_step_id = c.named_step_id
                                         CROSS JOIN LATERAL (SELECT c.name AS x) y
                                         WHERE c.task_uuid = p_task AND d.name = ANY (cn.parent_names)), ''))
                   WHEN d.step_type = 'decision' AND n.name = ANY (pos.names)
                       THEN format('not created yet: waits for decision `%s`', d.name)
                   WHEN n.step_type = 'batch_worker' AND n.name = ANY (pos.names)
                       THEN format('not created yet: waits for batchable step `%s`', d.name)
                   -- the batchable step chose another of its batch_worker steps
                   WHEN n.step_type = 'batch_worker' AND ds.state IN ('complete', 'resolved_manually')
                       THEN format('not created: batchable step `%s` created workers of `%s`', d.name,
                                   coalesce((SELECT min(wn.name) FROM tasker.steps w
                                              JOIN tasker.named_steps wn ON wn.named_step_id = w.named_step_id
                                             WHERE w.task_uuid = p_task AND wn.step_type = 'batch_worker'
                                               AND wn.parent_names = ARRAY[d.name]), 'none'))
                   WHEN n.name = ANY (pos.names) AND n.step_type = 'deferred_convergence'
                       THEN 'not created yet: created once a step it lists is created'
                   WHEN n.name = ANY (pos.names)
                       THEN format('not created yet: waits for %s', array_to_string(n.parent_names, ', '))
                   WHEN n.step_type = 'deferred_convergence'
                       THEN 'not created: none of the steps it lists was created'
                   ELSE 'not created: a step it depends on was not created (branch not taken)'
               END
          FROM tasker.tasks t
          JOIN tasker.named_steps n ON n.named_task_id = t.named_task_id
          CROSS JOIN possible pos
          LEFT JOIN LATERAL (SELECT p.name, p.step_type FROM tasker.named_steps p
                              WHERE p.named_task_id = n.named_task_id AND p.name = ANY (n.parent_names)
                                AND p.step_type IN ('decision', 'batchable')
                              ORDER BY p.step_index LIMIT 1) d ON true
          LEFT JOIN tasker.steps ds ON ds.task_uuid = p_task AND ds.name = d.name
         WHERE t.task_uuid = p_task AND n.is_dynamic
           AND NOT EXISTS (SELECT 1 FROM tasker.steps s WHERE s.task_uuid = p_task AND s.named_step_id = n.named_step_id)
         ORDER BY n.step_index;
    END IF;
END
$$;
COMMENT ON FUNCTION tasker.step_readiness(uuid) IS
    'Per step of a task: dependencies, retry eligibility, readiness and, in words, why it is not running.';

-- Counts per step state and what the task is doing as a whole: all_complete |
-- blocked_by_failures | has_ready_steps | processing | waiting_for_retry |
-- waiting_for_event_or_time (a wait_for_event or sleep step waits) | waiting_for_dependencies
-- (cancelled for a cancelled task).
CREATE FUNCTION tasker.task_execution_context(p_task uuid)
RETURNS TABLE (
    task_uuid uuid, state text, total_steps integer, pending_steps integer, enqueued_steps integer,
    in_progress_steps integer, waiting_for_retry_steps integer, complete_steps integer,
    error_steps integer, cancelled_steps integer, resolved_steps integer, ready_steps integer,
    execution_status text, completion_percentage numeric, waiting_steps integer
)
LANGUAGE plpgsql STABLE ROWS 1 AS $$
#variable_conflict use_column
BEGIN
    IF NOT EXISTS (SELECT 1 FROM tasker.tasks t WHERE t.task_uuid = p_task) THEN
        RAISE EXCEPTION 'task % does not exist', p_task USING ERRCODE = 'TN003';
    END IF;
    RETURN QUERY
    WITH c AS (
        SELECT count(*)::integer AS total,
               (count(*) FILTER (WHERE r.state = 'pending'))::integer AS pending,
               (count(*) FILTER (WHERE r.state = 'enqueued'))::integer AS enqueued,
               (count(*) FILTER (WHERE r.state = 'in_progress'))::integer AS in_progress,
               (count(*) FILTER (WHERE r.state = 'waiting_for_retry'))::integer AS waiting,
               (count(*) FILTER (WHERE r.state = 'complete'))::integer AS complete,
               (count(*) FILTER (WHERE r.state = 'error'))::integer AS error,
               (count(*) FILTER (WHERE r.state = 'cancelled'))::integer AS cancelled,
               (count(*) FILTER (WHERE r.state = 'resolved_manually'))::integer AS resolved,
               (count(*) FILTER (WHERE r.ready))::integer AS ready,
               (count(*) FILTER (WHERE r.state = 'waiting'))::integer AS waits
          FROM tasker.step_readiness(p_task) r
         WHERE r.step_uuid IS NOT NULL  -- created steps only
    )
    SELECT t.task_uuid, tasker.effective_task_state(t.task_uuid, t.state), c.total, c.pending, c.enqueued,
           c.in_progress, c.waiting, c.complete, c.error, c.cancelled, c.resolved, c.ready,
           CASE
               WHEN t.state = 'cancelled' THEN 'cancelled'
               WHEN c.complete + c.resolved = c.total THEN 'all_complete'
               WHEN c.error > 0 THEN 'blocked_by_failures'
               WHEN c.ready > 0 THEN 'has_ready_steps'
               WHEN c.in_progress > 0 THEN 'processing'
               WHEN c.waiting > 0 THEN 'waiting_for_retry'
               WHEN c.waits > 0 THEN 'waiting_for_event_or_time'
               ELSE 'waiting_for_dependencies'
           END,
           round(100.0 * (c.complete + c.resolved) / greatest(c.total, 1), 1), c.waits
      FROM tasker.tasks t CROSS JOIN c
     WHERE t.task_uuid = p_task;
END
$$;
COMMENT ON FUNCTION tasker.task_execution_context(uuid) IS
    'Counts of a task''s steps by state and its execution status in one row.';

-- For DBAs: tasks with their progress, no joins needed. `state` is effective_task_state's
-- rule written out: an entry point is SECURITY DEFINER (sql/functions/99_grants.sql), which
-- the planner never inlines, and the view must read steps with its owner's rights (an inlined
-- function's body is checked against the caller's). Keep the two in step.
CREATE VIEW tasker.v_tasks AS
SELECT t.task_uuid, t.namespace, t.name, t.version,
       CASE
           WHEN t.state = 'pending' AND EXISTS (
               SELECT 1 FROM tasker.steps s
                WHERE s.task_uuid = t.task_uuid
                  AND (s.attempts > 0 OR s.state <> 'pending' AND s.state <> 'enqueued'))
           THEN 'steps_in_process'
           ELSE t.state
       END AS state,
       t.total_steps, t.completed_steps, t.error_steps,
       round(100.0 * t.completed_steps / greatest(t.total_steps, 1), 1) AS completion_percentage,
       t.priority, t.initiator, t.source_system, t.reason, t.tags, t.idempotency_key, t.correlation_id,
       t.context, t.created_at, t.updated_at, t.completed_at,
       coalesce(t.completed_at, now()) - t.created_at AS age,
       t.state AS raw_state
  FROM tasker.tasks t;
COMMENT ON VIEW tasker.v_tasks IS
    'Tasks with their effective state (raw_state: the stored one) and step counts, for DBAs.';

-- For DBAs: steps with their task, handler, attempts, timing and last error.
CREATE VIEW tasker.v_steps AS
SELECT s.step_uuid, s.task_uuid, t.namespace, t.name AS task_name, s.name, ns.handler, s.state,
       s.attempts, s.max_attempts, s.retryable, s.pending_parents, s.worker_id,
       s.created_at, s.enqueued_at, s.started_at, s.completed_at, s.next_attempt_at,
       s.completed_at - s.started_at AS last_run_duration,
       CASE WHEN s.state = 'in_progress' THEN m.vt END AS lease_expires_at,
       s.last_error->>'error_type' AS last_error_type,
       s.last_error->>'message' AS last_error_message,
       s.results, s.metadata, s.checkpoint, s.last_error, ns.step_index, ns.parent_names
  FROM tasker.steps s
  JOIN tasker.tasks t ON t.task_uuid = s.task_uuid
  JOIN tasker.named_steps ns ON ns.named_step_id = s.named_step_id
  LEFT JOIN tasker.queue_messages m ON m.queue = t.namespace AND m.msg_id = s.msg_id;
COMMENT ON VIEW tasker.v_steps IS
    'Steps with their task, state, attempts and lease, for DBAs.';
