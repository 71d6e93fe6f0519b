-- Engine metrics: what an operator watches, read without scanning a whole table.
--
-- One row per value: (metric, namespace, label, value). Per namespace (an engine queue):
--   ready_steps, in_flight_steps, delayed_steps, retry_waiting_steps, expired_leases: the
--     namespace's live messages (tasker.q_<namespace>, one range of the claim index per
--     priority present), each classified by the state of its step;
--   oldest_ready_age_seconds: how long the longest-visible ready message has been visible
--     (0 when none is);
--   tasks (label: the stored state): live tasks (pending, steps_in_process, error) through
--     tasks_live_idx, read in full (their number is the backlog);
--   tasks_finished_5m (label: the state): tasks finished in the last 5 minutes, through
--     tasks_finished_idx (a range of (namespace, completed_at)); finished tasks are history
--     and are never counted in full.
-- Per table (namespace NULL, label the table): dead_tuples, live_tuples (the statistics
-- collector's estimates, pg_stat_user_tables) of tasks, steps, step_edges, the transition
-- tables, workers and the queue partitions q_<namespace>.
-- Database-wide (namespace NULL): oldest_xmin_age_xids and oldest_xmin_age_seconds, label
-- the holder: backend (pg_stat_activity.backend_xmin; its transaction start is shown only for
-- sessions the schema owner may see), replication_slot (xmin and catalog_xmin),
-- prepared_xact. Vacuum cannot remove a dead row newer than the oldest of them.
--
-- A message's step is read (one primary-key probe) only for messages that were claimed before
-- (read_ct > 0): retries, leases, continuations, released steps. A message never claimed is
-- an enqueued step's: ready once visible, else delayed (delay_seconds, a handler_missing
-- release, a retry re-sent by a resume). The cost of a call therefore grows with the live
-- messages and live tasks, never with the finished history.
CREATE FUNCTION tasker.engine_metrics()
RETURNS TABLE (metric text, namespace text, label text, value double precision)
LANGUAGE plpgsql AS $$
#variable_conflict use_column
DECLARE
    v_now timestamptz := clock_timestamp();
    v_ns  text;
    v_prios integer[];
BEGIN
    FOR v_ns IN
        SELECT q.queue_name FROM tasker.queues q
         WHERE EXISTS (SELECT 1 FROM tasker.named_tasks n WHERE n.namespace = q.queue_name)
         ORDER BY q.queue_name
    LOOP
        -- the priorities the queue's messages may carry (tasker.queue_priorities, plus 0)
        v_prios := ARRAY(SELECT p.priority FROM tasker.queue_priorities p
                          WHERE p.queue = v_ns AND p.priority <> 0) || 0;
        RETURN QUERY
        WITH kinds AS (
            SELECT m.vt,
                   CASE
                       WHEN m.read_ct = 0 THEN CASE WHEN m.vt <= v_now THEN 'ready' ELSE 'delayed' END
                       ELSE (SELECT CASE
                                 WHEN s.state = 'in_progress' AND m.vt > v_now THEN 'in_flight'
                                 WHEN s.state = 'in_progress' AND s.continuation THEN 'ready'
                                 WHEN s.state = 'in_progress' THEN 'expired_lease'
                                 WHEN s.state IN ('enqueued', 'waiting_for_retry') AND m.vt <= v_now THEN 'ready'
                                 WHEN s.state = 'waiting_for_retry' THEN 'retry_waiting'
                                 WHEN s.state = 'enqueued' THEN 'delayed'
                                 ELSE 'other'
                             END
                               FROM tasker.steps s
                              WHERE s.step_uuid = CASE
                                    WHEN m.message->>'step_uuid' ~* '^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$'
                                    THEN (m.message->>'step_uuid')::uuid END)
                   END AS kind
              FROM tasker.queue_messages m
             WHERE m.queue = v_ns AND m.priority = ANY (v_prios)
        ),
        agg AS (
            SELECT count(*) FILTER (WHERE k.kind = 'ready') AS ready,
                   count(*) FILTER (WHERE k.kind = 'in_flight') AS in_flight,
                   count(*) FILTER (WHERE k.kind = 'delayed') AS delayed,
                   count(*) FILTER (WHERE k.kind = 'retry_waiting') AS retry_waiting,
                   count(*) FILTER (WHERE k.kind = 'expired_lease') AS expired,
                   min(k.vt) FILTER (WHERE k.kind = 'ready') AS oldest_ready
              FROM kinds k
        )
        SELECT x.metric, v_ns, NULL::text, x.value
          FROM agg a
         CROSS JOIN LATERAL (VALUES
             ('ready_steps', a.ready::float8),
             ('in_flight_steps', a.in_flight::float8),
             ('delayed_steps', a.delayed::float8),
             ('retry_waiting_steps', a.retry_waiting::float8),
             ('expired_leases', a.expired::float8),
             ('oldest_ready_age_seconds',
              coalesce(greatest(extract(epoch FROM v_now - a.oldest_ready), 0), 0)::float8)
         ) x(metric, value);

        -- live tasks by state (every live state reported, 0 included)
        RETURN QUERY
        SELECT 'tasks', v_ns, st.state, coalesce(c.n, 0)::float8
          FROM unnest(ARRAY['pending', 'steps_in_process', 'error']) st(state)
          LEFT JOIN (SELECT t.state, count(*) AS n
                       FROM tasker.tasks t
                      WHERE t.completed_at IS NULL AND t.namespace = v_ns
                      GROUP BY t.state) c ON c.state = st.state;

        -- durable waits in progress, and the fairness lanes of the namespace (55_flow.sql)
        RETURN QUERY
        SELECT 'waiting_steps', v_ns, NULL::text, count(*)::float8
          FROM tasker.step_waits w JOIN tasker.tasks t ON t.task_uuid = w.task_uuid
         WHERE t.namespace = v_ns;
        RETURN QUERY
        SELECT 'flow_lanes', v_ns, NULL::text, count(*)::float8
          FROM tasker.flow_lanes l WHERE l.queue = v_ns AND l.lane <> '';

        RETURN QUERY
        SELECT 'tasks_finished_5m', v_ns, st.state, coalesce(c.n, 0)::float8
          FROM unnest(ARRAY['complete', 'cancelled', 'resolved_manually']) st(state)
          LEFT JOIN (SELECT t.state, count(*) AS n
                       FROM tasker.tasks t
                      WHERE t.completed_at IS NOT NULL AND t.namespace = v_ns
                        AND t.completed_at >= v_now - interval '5 minutes'
                      GROUP BY t.state) c ON c.state = st.state;
    END LOOP;

    -- the tokens each rate limit holds now (55_flow.sql)
    RETURN QUERY
    SELECT 'rate_limit_tokens', NULL::text, r.name,
           least(r.burst::double precision,
                 r.tokens + r.per_second * greatest(0, extract(epoch FROM v_now - r.refilled_at)))::float8
      FROM tasker.rate_limits r
     ORDER BY r.name;

    RETURN QUERY
    SELECT x.metric, NULL::text, st.relname::text, x.value
      FROM pg_stat_user_tables st
     CROSS JOIN LATERAL (VALUES ('dead_tuples', st.n_dead_tup::float8),
                                ('live_tuples', st.n_live_tup::float8)) x(metric, value)
     WHERE st.schemaname = 'tasker'
       AND (st.relname IN ('tasks', 'steps', 'step_edges', 'step_transitions', 'task_transitions', 'workers')
            OR st.relname LIKE 'q\_%')
     ORDER BY st.relname, x.metric;

    RETURN QUERY
    SELECT x.metric, NULL::text, h.holder, x.value
      FROM (
          SELECT 'backend' AS holder,
                 max(age(a.backend_xmin))::float8 AS xids,
                 max(extract(epoch FROM v_now - a.xact_start))::float8 AS seconds
            FROM pg_stat_activity a
           WHERE a.backend_xmin IS NOT NULL AND a.pid <> pg_backend_pid()
             -- sessions of other databases hold back only the shared catalogs
             AND (a.datname = current_database() OR a.datname IS NULL)
          UNION ALL
          SELECT 'replication_slot',
                 max(greatest(age(r.xmin), age(r.catalog_xmin)))::float8, NULL
            FROM pg_replication_slots r
           WHERE r.xmin IS NOT NULL OR r.catalog_xmin IS NOT NULL
          UNION ALL
          SELECT 'prepared_xact', max(age(p.transaction))::float8,
                 max(extract(epoch FROM v_now - p.prepared))::float8
            FROM pg_prepared_xacts p
      ) h
     CROSS JOIN LATERAL (VALUES ('oldest_xmin_age_xids', coalesce(h.xids, 0)),
                                ('oldest_xmin_age_seconds', CASE WHEN h.xids IS NULL THEN 0 ELSE h.seconds END)
                        ) x(metric, value)
     -- seconds only where known: a slot has no start time, and another role's session shows
     -- its transaction start only to a member of pg_read_all_stats
     WHERE x.value IS NOT NULL;
END
$$;
-- An index read of every statement whatever the statistics say (a queue whose workers keep up
-- looks tiny to the planner).
ALTER FUNCTION tasker.engine_metrics() SET enable_seqscan = off;
COMMENT ON FUNCTION tasker.engine_metrics() IS
    'Per namespace: ready, in-flight, delayed and retry-waiting steps, expired leases, age of the oldest ready step, live tasks by state and tasks finished in the last 5 minutes; per hot table dead and live tuples; the age of the oldest xmin by holder. Index reads only: its cost grows with live work, not with history.';

-- Step durations per namespace, for a live view (`tasker-pg top`): the 50th and 99th percentiles
-- of `completed_at - started_at` (the last claim to completion: the handler's run plus its
-- outcome's flush) of the completed steps of the tasks finished in the last p_seconds, at most
-- the p_max_tasks newest per namespace. Index reads only: the tasks through tasks_finished_idx
-- (a bounded range of (namespace, completed_at)), their steps through steps_task_name_idx.
-- Steps of tasks still running are not counted until their task finishes.
CREATE FUNCTION tasker.step_durations(p_seconds double precision DEFAULT 60,
                                      p_max_tasks integer DEFAULT 500)
RETURNS TABLE (namespace text, steps bigint, p50_seconds double precision, p99_seconds double precision)
LANGUAGE plpgsql STABLE AS $$
#variable_conflict use_column
DECLARE
    v_since timestamptz;
BEGIN
    IF p_seconds IS NULL OR NOT (p_seconds > 0 AND p_seconds <= 86400) THEN  -- NaN > 0 in SQL
        RAISE EXCEPTION 'seconds must be > 0 and at most a day, got %', coalesce(p_seconds::text, 'NULL')
            USING ERRCODE = 'TV002';
    END IF;
    IF p_max_tasks IS NULL OR p_max_tasks < 1 OR p_max_tasks > 10000 THEN
        RAISE EXCEPTION 'max_tasks must be from 1 to 10000, got %', coalesce(p_max_tasks::text, 'NULL')
            USING ERRCODE = 'TV002';
    END IF;
    v_since := clock_timestamp() - make_interval(secs => p_seconds);
    RETURN QUERY
    SELECT q.queue_name, count(d.secs),
           percentile_cont(0.5) WITHIN GROUP (ORDER BY d.secs),
           percentile_cont(0.99) WITHIN GROUP (ORDER BY d.secs)
      FROM tasker.queues q
     CROSS JOIN LATERAL (
         SELECT t.task_uuid FROM tasker.tasks t
          WHERE t.namespace = q.queue_name AND t.completed_at IS NOT NULL
            AND t.completed_at >= v_since
          ORDER BY t.completed_at DESC
          LIMIT p_max_tasks) t
     CROSS JOIN LATERAL (
         SELECT extract(epoch FROM s.completed_at - s.started_at)::float8 AS secs
           FROM tasker.steps s
          WHERE s.task_uuid = t.task_uuid AND s.state = 'complete'
            AND s.started_at IS NOT NULL AND s.completed_at IS NOT NULL) d
     GROUP BY q.queue_name
     ORDER BY q.queue_name;
END
$$;
ALTER FUNCTION tasker.step_durations(double precision, integer) SET enable_seqscan = off;
COMMENT ON FUNCTION tasker.step_durations(double precision, integer) IS
    'Per namespace: p50 and p99 seconds from last claim to completion of the completed steps of the tasks finished in the last p_seconds (at most p_max_tasks newest). Index reads only.';
