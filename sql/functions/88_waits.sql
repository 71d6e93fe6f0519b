-- Durable waits: wait_for_event and sleep steps. Neither is ever sent to a queue, so neither
-- holds a worker slot, a lease or a connection while it waits. When one becomes ready
-- (_enqueue_ready, or create_task for a root) it goes to state `waiting` with one
-- tasker.step_waits row. tasker.emit_event(name, key, payload) completes every step waiting on
-- that event and key at once; tasker.wake_waits(), which workers call every second (one at a
-- time) and pg_cron can call, ends sleeps, applies timeouts and matches events that were
-- already there when a step started to wait. Completions go through the helpers complete_steps
-- uses (_release_children, _apply_task_deltas, _enqueue_ready), with transitions like any.
--
-- Emitting and starting to wait meet on a transaction advisory lock per (event, key): an
-- emitter waits for it; a step starting to wait only tries it (it may hold task rows, which an
-- emitter locks later), and when it cannot get it, or an event is already there, leaves its wait
-- due now for wake_waits, which matches it once it holds the lock. So an event committed before
-- or during the start of a wait is never missed, and no completion locks a step after a task.

-- What wake_waits and emit_event apply to one waiting step.
CREATE TYPE tasker._wait_outcome AS (
    step_uuid uuid, ok boolean, result jsonb, metadata jsonb, error jsonb, event text);

-- The advisory lock key of an event name and key.
CREATE FUNCTION tasker._event_lock_key(p_name text, p_key text) RETURNS bigint
LANGUAGE sql IMMUTABLE AS $$
    SELECT hashtextextended('tasker.event:' || p_name || chr(1) || p_key, 0)
$$;

-- A wait step's event key, read from the task context at its $.path: a string as it is, a
-- number as its JSON text; NULL when the context holds neither there.
CREATE FUNCTION tasker._wait_key(p_config jsonb, p_context jsonb) RETURNS text
LANGUAGE sql IMMUTABLE AS $$
    SELECT CASE jsonb_typeof(v.val) WHEN 'string' THEN v.val #>> '{}' WHEN 'number' THEN v.val::text END
      FROM (SELECT jsonb_path_query_first(p_context, (p_config->>'key')::jsonpath) AS val) v
$$;

-- The time a sleep step ends: now + duration_seconds, or the timestamp at its `until` path in the
-- task context (ISO 8601 with a UTC offset or Z, e.g. 2030-01-01T09:00:00+02:00); NULL when the
-- context holds no such timestamp there.
CREATE FUNCTION tasker._sleep_until(p_config jsonb, p_context jsonb, p_now timestamptz) RETURNS timestamptz
LANGUAGE plpgsql STABLE AS $$
DECLARE
    v_val jsonb;
BEGIN
    IF p_config ? 'duration_seconds' AND jsonb_typeof(p_config->'duration_seconds') = 'number' THEN
        RETURN p_now + make_interval(secs => (p_config->>'duration_seconds')::double precision);
    END IF;
    v_val := jsonb_path_query_first(p_context, (p_config->>'until')::jsonpath);
    IF jsonb_typeof(v_val) IS DISTINCT FROM 'string'
       OR v_val #>> '{}' !~ '^\d{4}-\d{2}-\d{2}[T ]\d{2}:\d{2}(:\d{2}(\.\d{1,6})?)?(Z|[+-]\d{2}(:?\d{2})?)$' THEN
        RETURN NULL;
    END IF;
    RETURN (v_val #>> '{}')::timestamptz;
EXCEPTION WHEN datetime_field_overflow OR invalid_datetime_format THEN
    RETURN NULL;  -- e.g. 2030-02-30
END
$$;

-- Refuses a task context that does not hold what the template's wait steps read from it (an
-- event key as a string or number, a sleep's `until` timestamp), or an event key over
-- max_name_bytes: checked when the task is created, so a wait never starts without its key.
CREATE FUNCTION tasker._check_wait_context(p_tpl bigint, p_context jsonb, p_where text) RETURNS void
LANGUAGE plpgsql STABLE AS $$
DECLARE
    v_step   record;
    v_key    text;
BEGIN
    FOR v_step IN SELECT n.name, n.step_type, n.wait_config FROM tasker.named_steps n
                   WHERE n.named_task_id = p_tpl AND n.wait_config IS NOT NULL ORDER BY n.step_index LOOP
        IF v_step.step_type = 'wait_for_event' THEN
            v_key := tasker._wait_key(v_step.wait_config, p_context);
            IF v_key IS NULL THEN
                RAISE EXCEPTION '%: step % waits for event % keyed by %, which the context does not hold as a string or number',
                    p_where, quote_literal(v_step.name), quote_literal(v_step.wait_config->>'event'),
                    v_step.wait_config->>'key' USING ERRCODE = 'TV020';
            END IF;
            PERFORM tasker._check_text_size(v_key, 'max_name_bytes',
                                            format('%s: the event key of step %L (%s)', p_where, v_step.name, v_step.wait_config->>'key'));
        ELSIF v_step.wait_config ? 'until' AND jsonb_typeof(v_step.wait_config->'until') = 'string'
              AND tasker._sleep_until(v_step.wait_config, p_context, clock_timestamp()) IS NULL THEN
            RAISE EXCEPTION '%: step % sleeps until %, which the context does not hold as an ISO 8601 timestamp with a UTC offset (e.g. 2030-01-01T09:00:00Z)',
                p_where, quote_literal(v_step.name), v_step.wait_config->>'until' USING ERRCODE = 'TV020';
        END IF;
    END LOOP;
END
$$;

-- Writes the step_waits row of each given step that is in state waiting and has none: its
-- event and key, or its end; the timeout's deadline. An event wait whose event is already
-- there, or whose (event, key) lock an emitter holds right now, is left due now for
-- wake_waits (see the top of this file). The caller holds the steps' row locks.
CREATE FUNCTION tasker._arm_waits(p_steps uuid[]) RETURNS integer
LANGUAGE plpgsql AS $$
DECLARE
    v_now   timestamptz := clock_timestamp();
    v_count integer;
    v_name  text;
    v_key   text;
BEGIN
    WITH ins AS (
        INSERT INTO tasker.step_waits (step_uuid, task_uuid, kind, event_name, event_key, deadline, wake_at, started_at)
        SELECT s.step_uuid, s.task_uuid, x.kind,
               CASE WHEN x.kind = 'event' THEN n.wait_config->>'event' END,
               -- create_task checked the context; '' only guards the CHECK of the row
               CASE WHEN x.kind = 'event' THEN coalesce(tasker._wait_key(n.wait_config, t.context), '') END,
               x.deadline, x.deadline, v_now
          FROM tasker.steps s
          JOIN tasker.named_steps n ON n.named_step_id = s.named_step_id
          JOIN tasker.tasks t ON t.task_uuid = s.task_uuid
         CROSS JOIN LATERAL (
             SELECT CASE WHEN n.step_type = 'sleep' THEN 'sleep' ELSE 'event' END AS kind,
                    CASE WHEN n.step_type = 'sleep'
                         THEN coalesce(tasker._sleep_until(n.wait_config, t.context, v_now), v_now)
                         WHEN jsonb_typeof(n.wait_config->'timeout_seconds') = 'number'
                         THEN v_now + make_interval(secs => (n.wait_config->>'timeout_seconds')::double precision)
                    END AS deadline) x
         WHERE s.step_uuid = ANY (p_steps) AND s.state = 'waiting' AND n.wait_config IS NOT NULL
        ON CONFLICT (step_uuid) DO NOTHING
        RETURNING 1
    )
    SELECT count(*) INTO v_count FROM ins;
    -- Each lock taken is an entry of the shared lock table until commit: a batch with many
    -- keys (create_tasks of thousands of orders) leaves all its event waits due instead.
    IF (SELECT count(DISTINCT (w.event_name, w.event_key)) FROM tasker.step_waits w
         WHERE w.step_uuid = ANY (p_steps) AND w.kind = 'event') > 64 THEN
        UPDATE tasker.step_waits w SET wake_at = v_now WHERE w.step_uuid = ANY (p_steps) AND w.kind = 'event';
        RETURN v_count;
    END IF;
    FOR v_name, v_key IN SELECT DISTINCT w.event_name, w.event_key FROM tasker.step_waits w
                          WHERE w.step_uuid = ANY (p_steps) AND w.kind = 'event' ORDER BY 1, 2 LOOP
        IF NOT pg_try_advisory_xact_lock(tasker._event_lock_key(v_name, v_key))
           OR EXISTS (SELECT 1 FROM tasker.events e
                       WHERE e.name = v_name AND e.key = v_key AND e.expires_at > v_now) THEN
            UPDATE tasker.step_waits w SET wake_at = v_now
             WHERE w.step_uuid = ANY (p_steps) AND w.kind = 'event' AND w.event_name = v_name AND w.event_key = v_key;
        END IF;
    END LOOP;
    RETURN v_count;
END
$$;

-- Moves the given ready pending steps (wait_for_event and sleep steps; _enqueue_ready checked
-- readiness and the task) to waiting, with a transition each (event p_event), and arms them.
CREATE FUNCTION tasker._start_waits(p_steps uuid[], p_event text) RETURNS integer
LANGUAGE plpgsql AS $$
DECLARE
    v_now   timestamptz := clock_timestamp();
    v_ids   uuid[];
BEGIN
    WITH upd AS (
        UPDATE tasker.steps s
           SET state = 'waiting', started_at = v_now, updated_at = v_now
         WHERE s.step_uuid = ANY (p_steps) AND s.state = 'pending'
        RETURNING s.step_uuid, s.task_uuid
    ),
    audit AS (
        INSERT INTO tasker.step_transitions (step_uuid, task_uuid, from_state, to_state, event, created_at)
        SELECT upd.step_uuid, upd.task_uuid, 'pending', 'waiting', p_event, v_now FROM upd
    )
    SELECT array_agg(upd.step_uuid) INTO v_ids FROM upd;
    IF v_ids IS NULL THEN
        RETURN 0;
    END IF;
    PERFORM tasker._arm_waits(v_ids);
    RETURN cardinality(v_ids);
END
$$;

-- Applies outcomes to waiting steps the caller has locked (step_uuid order): complete with a
-- result, or error; deletes their step_waits rows, writes the transitions, releases the
-- children of the completed ones, updates each task once (_apply_task_deltas) and enqueues (or
-- starts the waits of) the children that became ready. Steps no longer waiting are left alone.
-- Returns how many were applied.
CREATE FUNCTION tasker._finish_waits(p_outcomes tasker._wait_outcome[]) RETURNS integer
LANGUAGE plpgsql AS $$
DECLARE
    v_now    timestamptz := clock_timestamp();
    v_done   uuid[];
    v_deltas tasker._task_delta[];
    v_count  integer;
    v_ready  uuid[];
BEGIN
    IF coalesce(cardinality(p_outcomes), 0) = 0 THEN
        RETURN 0;
    END IF;
    WITH o AS (
        SELECT * FROM unnest(p_outcomes)
    ),
    upd AS (
        UPDATE tasker.steps s
           SET state = CASE WHEN o.ok THEN 'complete' ELSE 'error' END,
               results = CASE WHEN o.ok THEN o.result ELSE s.results END,
               metadata = o.metadata,
               last_error = CASE WHEN o.ok THEN s.last_error ELSE o.error END,
               completed_at = v_now, updated_at = v_now
          FROM o
         WHERE s.step_uuid = o.step_uuid AND s.state = 'waiting'
        RETURNING s.step_uuid, s.task_uuid, o.ok, o.event, o.error, o.metadata, s.started_at
    ),
    del AS (
        DELETE FROM tasker.step_waits w USING upd WHERE w.step_uuid = upd.step_uuid
    ),
    audit AS (
        INSERT INTO tasker.step_transitions (step_uuid, task_uuid, from_state, to_state, event, duration_ms,
                                             error_summary, metadata, created_at)
        SELECT upd.step_uuid, upd.task_uuid, 'waiting', CASE WHEN upd.ok THEN 'complete' ELSE 'error' END,
               upd.event, extract(epoch FROM v_now - upd.started_at) * 1000,
               upd.error->>'message', upd.metadata, v_now
          FROM upd
    )
    SELECT array_agg(upd.step_uuid ORDER BY upd.step_uuid) FILTER (WHERE upd.ok),
           array_agg(ROW(upd.task_uuid, CASE WHEN upd.ok THEN 1 ELSE 0 END,
                         CASE WHEN upd.ok THEN 0 ELSE 1 END)::tasker._task_delta ORDER BY upd.task_uuid),
           count(*)
      INTO v_done, v_deltas, v_count
      FROM upd;
    IF v_count = 0 THEN
        RETURN 0;
    END IF;
    v_ready := CASE WHEN v_done IS NULL THEN '{}'::uuid[] ELSE tasker._release_children(v_done) END;
    PERFORM tasker._apply_task_deltas(v_deltas, 'step_outcome');
    PERFORM tasker._enqueue_ready(v_ready, 'dependencies_satisfied');
    RETURN v_count;
END
$$;
ALTER FUNCTION tasker._finish_waits(tasker._wait_outcome[]) SET plan_cache_mode = force_generic_plan;

-- Emits an event: every step waiting on (p_name, p_key) completes with p_payload as its result
-- (its dependents read it like a handler's result), in the caller's transaction (a rollback
-- completes nothing), and the event is kept for event_keep_seconds (tasker.settings, 7 days)
-- for steps that reach their wait later. Name and key: non-empty texts within max_name_bytes;
-- payload: any JSON within max_payload_bytes (NULL: {}). Returns the event's id and how many
-- steps it completed.
CREATE FUNCTION tasker.emit_event(p_name text, p_key text, p_payload jsonb DEFAULT '{}')
RETURNS TABLE (event_id bigint, completed_steps integer)
LANGUAGE plpgsql AS $$
#variable_conflict use_column
DECLARE
    v_now   timestamptz := clock_timestamp();
    v_id    bigint;
    v_steps uuid[];
    v_count integer;
BEGIN
    IF p_name IS NULL OR p_name = '' OR p_key IS NULL OR p_key = '' THEN
        RAISE EXCEPTION 'emit_event needs an event name and a key, each a non-empty text' USING ERRCODE = 'TV002';
    END IF;
    PERFORM tasker._check_text_size(p_name, 'max_name_bytes', 'event name');
    PERFORM tasker._check_text_size(p_key, 'max_name_bytes', 'event key');
    p_payload := coalesce(p_payload, '{}'::jsonb);
    PERFORM tasker._check_json_size(p_payload, 'max_payload_bytes', 'event payload');
    -- Waits that start concurrently either see this event once it commits or leave their wait
    -- due for wake_waits; this lock is what they try.
    PERFORM pg_advisory_xact_lock(tasker._event_lock_key(p_name, p_key));
    INSERT INTO tasker.events (name, key, payload, emitted_at, expires_at)
    VALUES (p_name, p_key, p_payload, v_now,
            v_now + make_interval(secs => tasker._setting_int('event_keep_seconds')))
    RETURNING events.event_id INTO v_id;
    -- the waiting steps (no message: the step row is the first lock), in step_uuid order
    SELECT array_agg(l.step_uuid) INTO v_steps
      FROM (SELECT s.step_uuid FROM tasker.steps s
             WHERE s.step_uuid IN (SELECT w.step_uuid FROM tasker.step_waits w
                                    WHERE w.kind = 'event' AND w.event_name = p_name AND w.event_key = p_key)
               AND s.state = 'waiting'
             ORDER BY s.step_uuid
               FOR UPDATE) l;
    v_count := tasker._finish_waits(ARRAY(
        SELECT ROW(x, true, p_payload,
                   jsonb_build_object('event_id', v_id, 'event', p_name, 'key', p_key, 'emitted_at', v_now),
                   NULL, 'event_received')::tasker._wait_outcome
          FROM unnest(coalesce(v_steps, '{}')) x));
    RETURN QUERY SELECT v_id, v_count;
END
$$;
COMMENT ON FUNCTION tasker.emit_event(text,text,jsonb) IS
    'Emits an event: completes every step waiting on (name, key) with the payload as its result; kept for event_keep_seconds for steps that wait later.';

-- Wakes what is due, in one batch of at most p_batch (1..100000) waits: sleeps that ended
-- complete (result {"slept_until": ...}); an event wait that may have its event (it was there, or
-- being emitted, when the wait started) completes with the newest kept event of its name and
-- key; one past its timeout fails (error wait_timeout) or completes with its declared default.
-- Event waits of at most 500 keys are matched per call (the rest stay due: `more`).
-- Then deletes up to p_batch expired events. One session at a time (a transaction advisory lock:
-- a second caller gets zeros at once); steps another session holds are left for the next call.
-- Workers call it every --wake-interval seconds; pg_cron can call it too.
CREATE FUNCTION tasker.wake_waits(p_batch integer DEFAULT 1000)
RETURNS TABLE (completed integer, timed_out integer, rechecked integer, events_deleted integer, more boolean)
LANGUAGE plpgsql AS $$
#variable_conflict use_column
DECLARE
    v_now      timestamptz := clock_timestamp();
    v_due      uuid[];
    v_locked   uuid[];
    v_keys     text[];
    v_name     text;
    v_key      text;
    v_outcomes tasker._wait_outcome[];
    v_done     integer := 0;
    v_timeouts integer := 0;
    v_recheck  integer := 0;
    v_deleted  integer := 0;
    v_capped   boolean := false;
BEGIN
    IF p_batch IS NULL OR p_batch < 1 OR p_batch > 100000 THEN
        RAISE EXCEPTION 'batch must be from 1 to 100000, got %', p_batch USING ERRCODE = 'TV002';
    END IF;
    IF NOT pg_try_advisory_xact_lock(hashtextextended('tasker.wake_waits', 0)) THEN
        RETURN QUERY SELECT 0, 0, 0, 0, false;
        RETURN;
    END IF;
    v_due := ARRAY(SELECT w.step_uuid FROM tasker.step_waits w
                    WHERE w.wake_at <= v_now ORDER BY w.wake_at LIMIT p_batch);
    SELECT array_agg(l.step_uuid) INTO v_locked
      FROM (SELECT s.step_uuid FROM tasker.steps s
             WHERE s.step_uuid = ANY (v_due) AND s.state = 'waiting'
             ORDER BY s.step_uuid
               FOR UPDATE SKIP LOCKED) l;
    v_locked := coalesce(v_locked, '{}');
    -- the (event, key) locks of the event waits; a key an emitter holds is left for next time
    v_keys := '{}';
    FOR v_name, v_key IN SELECT DISTINCT w.event_name, w.event_key FROM tasker.step_waits w
                          WHERE w.step_uuid = ANY (v_locked) AND w.kind = 'event' ORDER BY 1, 2 LOOP
        -- each lock is an entry of the shared lock table until commit: at most 500 keys a call
        IF cardinality(v_keys) >= 500 THEN
            v_capped := true;
            EXIT;
        END IF;
        IF pg_try_advisory_xact_lock(tasker._event_lock_key(v_name, v_key)) THEN
            v_keys := v_keys || (v_name || chr(1) || v_key);
        END IF;
    END LOOP;
    -- a new snapshot: every event committed before the locks were granted is seen
    SELECT array_agg(x.o ORDER BY (x.o).step_uuid) INTO v_outcomes
      FROM (
        SELECT CASE
                   WHEN w.kind = 'sleep' THEN
                       ROW(w.step_uuid, true, jsonb_build_object('slept_until', w.deadline),
                           jsonb_build_object('slept_until', w.deadline), NULL, 'sleep_finished')::tasker._wait_outcome
                   WHEN e.event_id IS NOT NULL THEN
                       ROW(w.step_uuid, true, e.payload,
                           jsonb_build_object('event_id', e.event_id, 'event', e.name, 'key', e.key, 'emitted_at', e.emitted_at),
                           NULL, 'event_received')::tasker._wait_outcome
                   WHEN n.wait_config->>'on_timeout' = 'complete' THEN
                       ROW(w.step_uuid, true, coalesce(n.wait_config->'default', '{}'::jsonb),
                           jsonb_build_object('timed_out_at', v_now, 'event', w.event_name, 'key', w.event_key),
                           NULL, 'wait_timed_out')::tasker._wait_outcome
                   ELSE
                       ROW(w.step_uuid, false, NULL,
                           jsonb_build_object('timed_out_at', v_now, 'event', w.event_name, 'key', w.event_key),
                           jsonb_build_object(
                               'error_type', 'wait_timeout', 'error_code', 'wait_timeout', 'retryable', false,
                               'message', format('no event %s with key %s within %s seconds',
                                                 w.event_name, w.event_key, (n.wait_config->>'timeout_seconds')::double precision)),
                           'wait_timed_out')::tasker._wait_outcome
               END AS o
          FROM tasker.step_waits w
          JOIN tasker.steps s ON s.step_uuid = w.step_uuid
          JOIN tasker.named_steps n ON n.named_step_id = s.named_step_id
          LEFT JOIN LATERAL (
              SELECT ev.event_id, ev.name, ev.key, ev.payload, ev.emitted_at FROM tasker.events ev
               WHERE w.kind = 'event' AND ev.name = w.event_name AND ev.key = w.event_key AND ev.expires_at > v_now
               ORDER BY ev.event_id DESC LIMIT 1) e ON true
         WHERE w.step_uuid = ANY (v_locked)
           AND (w.kind = 'sleep' AND w.deadline <= v_now
                OR w.kind = 'event' AND (w.event_name || chr(1) || w.event_key) = ANY (v_keys)
                   AND (e.event_id IS NOT NULL OR w.deadline <= v_now))) x;
    v_timeouts := coalesce((SELECT count(*) FROM unnest(v_outcomes) o WHERE o.event = 'wait_timed_out'), 0);
    v_done := tasker._finish_waits(coalesce(v_outcomes, '{}'));
    -- rechecked event waits without their event: wait for the timeout (or an emit) again
    WITH r AS (
        UPDATE tasker.step_waits w SET wake_at = w.deadline
         WHERE w.step_uuid = ANY (v_locked) AND w.kind = 'event'
           AND (w.event_name || chr(1) || w.event_key) = ANY (v_keys)
           AND w.wake_at <= v_now AND (w.deadline IS NULL OR w.deadline > v_now)
        RETURNING 1
    )
    SELECT count(*) INTO v_recheck FROM r;
    WITH old AS (
        SELECT e.event_id FROM tasker.events e WHERE e.expires_at <= v_now ORDER BY e.expires_at LIMIT p_batch
    ),
    del AS (
        DELETE FROM tasker.events e USING old WHERE e.event_id = old.event_id RETURNING 1
    )
    SELECT count(*) INTO v_deleted FROM del;
    RETURN QUERY SELECT v_done - v_timeouts, v_timeouts, v_recheck, v_deleted,
                        cardinality(v_due) = p_batch OR v_deleted = p_batch OR v_capped;
END
$$;
COMMENT ON FUNCTION tasker.wake_waits(integer) IS
    'Ends due sleeps, applies wait timeouts, matches events that arrived before their waits, deletes expired events; one caller at a time.';

-- Waiting steps with what each waits for, for psql and dashboards.
CREATE VIEW tasker.v_waits AS
SELECT w.step_uuid, w.task_uuid, s.name AS step_name, t.namespace, t.name AS task_name, w.kind,
       w.event_name, w.event_key, w.deadline, w.wake_at, w.started_at,
       n.wait_config->>'on_timeout' AS on_timeout
  FROM tasker.step_waits w
  JOIN tasker.steps s ON s.step_uuid = w.step_uuid
  JOIN tasker.tasks t ON t.task_uuid = w.task_uuid
  JOIN tasker.named_steps n ON n.named_step_id = s.named_step_id;
COMMENT ON VIEW tasker.v_waits IS
    'Steps waiting for an event or a time: event and key, or the end of the sleep; the timeout''s deadline.';
