-- Maintenance calls workers make periodically: repair_messages() (no step is stranded without
-- its message), worker_heartbeat() (the tasker.workers row of a running worker) and
-- cleanup_workers() (rows of workers gone for long).

-- Repair

-- How long a re-sent message of an in_progress step stays hidden: its holder, if alive,
-- extends it with its next heartbeat; if it died, the step is reclaimed after this.
CREATE FUNCTION tasker._repair_lease_interval() RETURNS interval
LANGUAGE sql IMMUTABLE AS $$ SELECT interval '5 minutes' $$;

-- A parked step: waiting to start (enqueued or waiting for retry) in a task in error, with no
-- message on purpose (the first claim that met its message deleted it; resume_task sends a
-- new one). Repair must leave it so, or it would undo the parking.
CREATE FUNCTION tasker._is_parked(p_task_state text, p_step_state text, p_msg_id bigint)
RETURNS boolean
LANGUAGE sql IMMUTABLE AS $$
    SELECT p_task_state = 'error' AND p_step_state IN ('enqueued', 'waiting_for_retry')
           AND p_msg_id IS NULL
$$;

-- Re-sends the message of every live step (enqueued, waiting_for_retry, in_progress) that has
-- none, and enqueues every pending step whose parents are all satisfied in a running task:
-- the two ways a step can be stranded (invariant 3 and ready_step_is_enqueued of
-- check_invariants). A re-sent message is visible at once (enqueued), at the step's retry time
-- (waiting_for_retry), or after _repair_lease_interval() (in_progress: the lease is not
-- known), with the task's priority; a missing namespace queue is created again. One row per
-- repaired step: kind message_resent or ready_step_enqueued, and the state it was in.
--
-- Cheap when there is nothing to repair: it reads only live tasks (the partial index
-- tasks_live_idx), their steps (steps_task_name_idx) and one queue probe per live step. Only
-- one session repairs at a time (a transaction advisory lock; a second caller returns no
-- rows at once). Steps another session holds locked are left for the next call.
CREATE FUNCTION tasker.repair_messages()
RETURNS TABLE (kind text, step_uuid uuid, task_uuid uuid, namespace text, step_state text, msg_id bigint)
LANGUAGE plpgsql AS $$
#variable_conflict use_column
DECLARE
    v_now    timestamptz := clock_timestamp();
    v_lost   uuid[];
    v_ready  uuid[];
    v_locked uuid[];
BEGIN
    IF NOT pg_try_advisory_xact_lock(hashtextextended('tasker.repair_messages', 0)) THEN
        RETURN;  -- another session is repairing right now
    END IF;
    -- 1. Find the candidates from a snapshot, starting from the live tasks.
    SELECT array_agg(x.step_uuid) FILTER (WHERE x.lost),
           array_agg(x.step_uuid) FILTER (WHERE NOT x.lost)
      INTO v_lost, v_ready
      FROM (SELECT s.step_uuid, s.state <> 'pending' AS lost
              FROM tasker.tasks t
              JOIN tasker.steps s ON s.task_uuid = t.task_uuid
             WHERE t.completed_at IS NULL
               AND ((s.state IN ('enqueued', 'waiting_for_retry', 'in_progress')
                     AND t.state IN ('pending', 'steps_in_process', 'error')
                     AND NOT tasker._is_parked(t.state, s.state, s.msg_id)
                     AND NOT EXISTS (SELECT 1 FROM tasker.queue_messages m
                                      WHERE m.queue = t.namespace AND m.msg_id = s.msg_id
                                        AND m.message->>'step_uuid' = s.step_uuid::text))
                    OR (s.state = 'pending' AND s.pending_parents <= 0
                        AND t.state IN ('pending', 'steps_in_process')))) x;
    IF v_lost IS NULL AND v_ready IS NULL THEN
        RETURN;
    END IF;

    -- 2. A namespace queue that was dropped is created again (its messages are re-sent below).
    PERFORM tasker.create_queue(ns.namespace)
       FROM (SELECT DISTINCT t.namespace
               FROM tasker.steps s JOIN tasker.tasks t ON t.task_uuid = s.task_uuid
              WHERE s.step_uuid = ANY (v_lost || v_ready)) ns
      WHERE NOT EXISTS (SELECT 1 FROM tasker.queues q WHERE q.queue_name = ns.namespace);

    -- 3. Lock them (they have no message, so the step row is the first lock); a step another
    --    session holds is being changed right now and is left for the next call.
    SELECT array_agg(l.step_uuid) INTO v_locked
      FROM (SELECT s.step_uuid FROM tasker.steps s
             WHERE s.step_uuid = ANY (v_lost || v_ready)
             ORDER BY s.step_uuid
               FOR UPDATE SKIP LOCKED) l;
    IF v_locked IS NULL THEN
        RETURN;
    END IF;

    -- 4. Re-check under the lock (a new snapshot) and re-send the missing messages.
    RETURN QUERY
    WITH fix AS MATERIALIZED (
        SELECT s.step_uuid, s.task_uuid, s.state, t.namespace, t.priority, nextval(q.msg_seq) AS msg_id, s.lane,
               CASE
                   WHEN s.state = 'waiting_for_retry' THEN greatest(v_now, coalesce(s.next_attempt_at, v_now))
                   WHEN s.state = 'in_progress' AND NOT s.continuation THEN v_now + tasker._repair_lease_interval()
                   ELSE v_now
               END AS vt
          FROM tasker.steps s
          JOIN tasker.tasks t ON t.task_uuid = s.task_uuid
          JOIN tasker.queues q ON q.queue_name = t.namespace
         WHERE s.step_uuid = ANY (v_locked) AND s.step_uuid = ANY (v_lost)
           AND s.state IN ('enqueued', 'waiting_for_retry', 'in_progress')
           AND t.state IN ('pending', 'steps_in_process', 'error')
           AND NOT tasker._is_parked(t.state, s.state, s.msg_id)
           AND NOT EXISTS (SELECT 1 FROM tasker.queue_messages m
                            WHERE m.queue = t.namespace AND m.msg_id = s.msg_id
                              AND m.message->>'step_uuid' = s.step_uuid::text)
    ),
    msgs AS (
        INSERT INTO tasker.queue_messages (queue, msg_id, enqueued_at, vt, priority, message, lane)
        SELECT f.namespace, f.msg_id, v_now, f.vt, f.priority,
               jsonb_build_object('step_uuid', f.step_uuid, 'task_uuid', f.task_uuid), f.lane
          FROM fix f
    ),
    upd AS (
        UPDATE tasker.steps s
           SET msg_id = f.msg_id, updated_at = v_now
          FROM fix f
         WHERE s.step_uuid = f.step_uuid
    ),
    audit AS (
        INSERT INTO tasker.step_transitions (step_uuid, task_uuid, from_state, to_state, event, attempt,
                                             error_summary, created_at)
        SELECT f.step_uuid, f.task_uuid, f.state, f.state, 'message_repaired', s.attempts,
               'its queue message was missing; tasker.repair_messages() sent it again', v_now
          FROM fix f JOIN tasker.steps s ON s.step_uuid = f.step_uuid
    )
    SELECT 'message_resent', f.step_uuid, f.task_uuid, f.namespace, f.state, f.msg_id FROM fix f;
    -- the lanes of the messages sent (55_flow.sql)
    PERFORM tasker._note_step_lanes(x.namespace, x.steps)
       FROM (SELECT t.namespace, array_agg(s.step_uuid) AS steps
               FROM tasker.steps s JOIN tasker.tasks t ON t.task_uuid = s.task_uuid
              WHERE s.step_uuid = ANY (v_locked) AND s.step_uuid = ANY (v_lost) AND s.lane IS NOT NULL
              GROUP BY t.namespace ORDER BY t.namespace) x;
    PERFORM pg_notify('tasker_' || ns.namespace, '')
       FROM (SELECT DISTINCT t.namespace FROM tasker.steps s JOIN tasker.tasks t ON t.task_uuid = s.task_uuid
              WHERE s.step_uuid = ANY (v_locked) AND s.step_uuid = ANY (v_lost)) ns;

    -- 5. Enqueue the ready pending steps (_enqueue_ready re-checks state, counter and task).
    v_ready := ARRAY(SELECT r FROM unnest(v_ready) r WHERE r = ANY (v_locked));
    PERFORM tasker._enqueue_ready(v_ready, 'repaired');
    RETURN QUERY
    SELECT 'ready_step_enqueued', s.step_uuid, s.task_uuid, t.namespace, 'pending'::text, s.msg_id
      FROM tasker.steps s JOIN tasker.tasks t ON t.task_uuid = s.task_uuid
     WHERE s.step_uuid = ANY (v_ready) AND s.state IN ('enqueued', 'waiting');  -- pending under our lock until now
END
$$;
COMMENT ON FUNCTION tasker.repair_messages() IS
    'Re-sends the message of every live step that lost it and enqueues ready pending steps; one row per repair.';

-- Workers

-- The bound every text a worker reports is held to.
CREATE FUNCTION tasker._check_worker_text(p_value text, p_name text, p_max integer) RETURNS void
LANGUAGE plpgsql IMMUTABLE AS $$
BEGIN
    IF p_value IS NULL OR p_value = '' OR octet_length(p_value) > p_max THEN
        RAISE EXCEPTION '% must be a non-empty text of at most % bytes, got %', p_name, p_max,
            CASE WHEN p_value IS NULL THEN 'NULL' ELSE octet_length(p_value) || ' bytes' END
            USING ERRCODE = 'TV002';
    END IF;
END
$$;

-- The bound every list a worker reports is held to: at most p_max_items non-empty names of
-- at most p_max_bytes each.
CREATE FUNCTION tasker._check_worker_names(p_value text[], p_name text, p_max_items integer, p_max_bytes integer)
RETURNS void
LANGUAGE plpgsql IMMUTABLE AS $$
BEGIN
    IF p_value IS NULL OR cardinality(p_value) > p_max_items
       OR EXISTS (SELECT 1 FROM unnest(p_value) v WHERE v IS NULL OR v = '' OR octet_length(v) > p_max_bytes) THEN
        RAISE EXCEPTION '% must be a list of at most % non-empty names of at most % bytes each',
            p_name, p_max_items, p_max_bytes USING ERRCODE = 'TV002';
    END IF;
END
$$;

-- A worker's heartbeat row: who it is, what it serves and has, how much it holds, and the
-- handlers it lacked (handler name -> first seen, as an ISO timestamp). Upserts the row of
-- p_worker_id; workers call it at start and then every few seconds. Every argument is
-- bounded (TV002): ids and host 200 bytes, at most 1000 namespaces and 10000 handler names
-- of 500 bytes, in_flight 0..1000000, missing handlers at most 1000 entries.
CREATE FUNCTION tasker.worker_heartbeat(
    p_worker_id text, p_host text, p_pid integer, p_namespaces text[], p_handlers text[],
    p_started_at timestamptz, p_in_flight integer, p_missing_handlers jsonb DEFAULT '{}'
) RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM tasker._check_worker_text(p_worker_id, 'worker_id', 200);
    PERFORM tasker._check_worker_text(p_host, 'host', 200);
    PERFORM tasker._check_worker_names(p_namespaces, 'namespaces', 1000, 200);
    PERFORM tasker._check_worker_names(p_handlers, 'handlers', 10000, 500);
    IF p_pid IS NULL OR p_pid < 0 THEN
        RAISE EXCEPTION 'pid must be an integer >= 0, got %', coalesce(p_pid::text, 'NULL') USING ERRCODE = 'TV002';
    END IF;
    IF p_in_flight IS NULL OR p_in_flight < 0 OR p_in_flight > 1000000 THEN
        RAISE EXCEPTION 'in_flight must be between 0 and 1000000, got %', coalesce(p_in_flight::text, 'NULL')
            USING ERRCODE = 'TV002';
    END IF;
    IF p_started_at IS NULL OR NOT isfinite(p_started_at) THEN
        RAISE EXCEPTION 'started_at must be a finite timestamp' USING ERRCODE = 'TV002';
    END IF;
    IF p_missing_handlers IS NULL OR jsonb_typeof(p_missing_handlers) <> 'object'
       OR (SELECT count(*) FROM jsonb_each(p_missing_handlers)) > 1000
       OR EXISTS (SELECT 1 FROM jsonb_each(p_missing_handlers) e
                   WHERE octet_length(e.key) > 500 OR jsonb_typeof(e.value) <> 'string'
                      OR octet_length(e.value #>> '{}') > 64) THEN
        RAISE EXCEPTION 'missing_handlers must be an object of at most 1000 handler names (500 bytes) to timestamps'
            USING ERRCODE = 'TV002';
    END IF;
    INSERT INTO tasker.workers AS w (worker_id, host, pid, namespaces, handlers, started_at,
                                     last_heartbeat_at, in_flight, missing_handlers)
    VALUES (p_worker_id, p_host, p_pid, p_namespaces, p_handlers, p_started_at, clock_timestamp(),
            p_in_flight, p_missing_handlers)
    ON CONFLICT (worker_id) DO UPDATE
       SET host = EXCLUDED.host, pid = EXCLUDED.pid, namespaces = EXCLUDED.namespaces,
           handlers = EXCLUDED.handlers, started_at = EXCLUDED.started_at,
           last_heartbeat_at = EXCLUDED.last_heartbeat_at, in_flight = EXCLUDED.in_flight,
           -- what release_steps recorded meanwhile is kept; the earliest sighting wins
           missing_handlers = EXCLUDED.missing_handlers || w.missing_handlers;
END
$$;
COMMENT ON FUNCTION tasker.worker_heartbeat(text,text,integer,text[],text[],timestamptz,integer,jsonb) IS
    'A worker''s heartbeat: upserts its tasker.workers row (handlers, in-flight, missing handlers); bounded arguments.';

-- Deletes the rows of workers whose last heartbeat is older than p_older_than (at least one
-- hour, default 7 days); returns how many.
CREATE FUNCTION tasker.cleanup_workers(p_older_than interval DEFAULT interval '7 days') RETURNS integer
LANGUAGE plpgsql AS $$
DECLARE
    v_count integer;
BEGIN
    IF p_older_than IS NULL OR p_older_than < interval '1 hour' THEN
        RAISE EXCEPTION 'older_than must be at least 1 hour, got %', coalesce(p_older_than::text, 'NULL')
            USING ERRCODE = 'TV002';
    END IF;
    DELETE FROM tasker.workers w WHERE w.last_heartbeat_at < clock_timestamp() - p_older_than;
    GET DIAGNOSTICS v_count = ROW_COUNT;
    RETURN v_count;
END
$$;
COMMENT ON FUNCTION tasker.cleanup_workers(interval) IS
    'Deletes tasker.workers rows whose last heartbeat is older than the cut-off (default 7 days).';

-- Workers with the age of their last heartbeat: alive within a minute, stale after (a stopped
-- or stuck worker; its row stays until cleanup_workers).
CREATE VIEW tasker.v_workers AS
SELECT w.worker_id, w.host, w.pid, w.namespaces, w.handlers, w.started_at, w.last_heartbeat_at,
       clock_timestamp() - w.last_heartbeat_at AS heartbeat_age,
       CASE WHEN w.last_heartbeat_at >= clock_timestamp() - interval '1 minute' THEN 'alive' ELSE 'stale' END AS status,
       w.in_flight, w.missing_handlers
  FROM tasker.workers w;
COMMENT ON VIEW tasker.v_workers IS
    'Workers with their heartbeat age and status (alive within a minute, else stale), handlers and missing handlers.';
