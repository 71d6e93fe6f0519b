-- Claiming: claim_steps hands out ready steps of one namespace queue with a lease (the
-- message's visibility time) and a new claim_seq, the fence every later write of the claim
-- must carry. A reclaimed expired lease is a new attempt; a checkpointed step continues its
-- attempt. Messages that cannot be run (task in error, cancelled, malformed) are dealt with in
-- _claim_exceptions so the hot statement stays one CTE.
--
-- The hot functions plan their statements generically from the first call (SET
-- plan_cache_mode below). A custom plan sees the outcome array's real size and the statistics
-- of the moment (right after a bulk create, almost no step is in_progress) and picks
-- sequential scans of tasker.steps that cost hundreds of milliseconds for the first calls of
-- every session; the generic plans are the index plans the plan tests check.

-- claim_steps
CREATE TYPE tasker._claim_candidate AS (
    msg_id       bigint,
    step_uuid    uuid,
    task_uuid    uuid,
    step_state   text,
    attempts     integer,
    -- run_new | run_resume | run_reclaim | skip | dead | park | park_expire | expire_fail
    kind         text
);

-- Hands out up to p_qty ready steps of a namespace queue, each as one row with everything its
-- handler needs (ids, attempt = fencing token, handler, config, task context, every ancestor's
-- result by step name, checkpoint, retry settings, timeout). The message's visibility timeout
-- becomes the lease. A message whose step's lease expired is reclaimed as a new attempt
-- (event lease_expired), or moves the step to error when no attempt is left; messages of
-- finished steps are deleted; messages of tasks in error are parked.
CREATE FUNCTION tasker.claim_steps(p_queue text, p_worker_id text, p_qty integer, p_lease_seconds double precision)
RETURNS TABLE (
    msg_id bigint, step_uuid uuid, task_uuid uuid, step_name text, handler text, config jsonb,
    attempt integer, claim_seq integer, max_attempts integer, retryable boolean, backoff text,
    backoff_base_ms integer, max_backoff_ms integer, jitter double precision,
    timeout_seconds double precision, task_context jsonb, dependency_results jsonb,
    checkpoint jsonb, inputs jsonb, namespace text, task_name text, task_version text,
    lease_expires_at timestamptz, claim_event text
)
LANGUAGE plpgsql AS $$
#variable_conflict use_column
DECLARE
    v_now   timestamptz := clock_timestamp();
    v_lease timestamptz;
    v_batch tasker._claim_candidate[];
BEGIN
    IF p_qty IS NULL OR p_qty < 1 THEN
        RAISE EXCEPTION 'qty must be >= 1, got %', coalesce(p_qty::text, 'NULL') USING ERRCODE = 'TV002';
    END IF;
    IF p_lease_seconds IS NULL OR p_lease_seconds <= 0 THEN
        RAISE EXCEPTION 'lease_seconds must be > 0, got %', coalesce(p_lease_seconds::text, 'NULL') USING ERRCODE = 'TV002';
    END IF;
    PERFORM tasker._check_text_size(p_worker_id, 'max_name_bytes', 'worker_id');
    v_lease := v_now + make_interval(secs => p_lease_seconds);

    WITH
    -- 1. Pick and lock visible messages, highest priority first, then oldest. The lock sits
    --    in a MATERIALIZED CTE with an explicit ORDER BY ... LIMIT: a bare subquery could be
    --    re-evaluated and lock more rows than the limit. SKIP LOCKED: concurrent claimers pass
    --    over each other's rows.
    msgs AS MATERIALIZED (
        SELECT m.msg_id,
               -- a message that does not name a step (not ours) must not stop the queue
               CASE WHEN m.message->>'step_uuid' ~* '^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$'
                    THEN (m.message->>'step_uuid')::uuid END AS step_uuid
          FROM tasker.queue_messages m
         WHERE m.queue = p_queue AND m.vt <= v_now
         ORDER BY m.priority DESC, m.msg_id
         LIMIT p_qty
           FOR UPDATE SKIP LOCKED
    ),
    -- 2. Lock their steps in step_uuid order, skipping any an operator call (cancel, resolve)
    --    holds right now: that message is simply left for a later claim.
    locked_steps AS MATERIALIZED (
        SELECT s.step_uuid, s.task_uuid, s.state, s.attempts, s.max_attempts, s.retryable, s.continuation,
               s.msg_id,
               -- a scalar subquery (one tasks_pkey probe per row), not a join: a join's plan
               -- depends on the row estimate, and the generic plan guesses LIMIT $n badly
               (SELECT t.state FROM tasker.tasks t WHERE t.task_uuid = s.task_uuid) AS task_state
          FROM tasker.steps s
         WHERE s.step_uuid IN (SELECT msgs.step_uuid FROM msgs)
         ORDER BY s.step_uuid
           FOR UPDATE SKIP LOCKED
    )
    -- 3. Decide what each message means.
    SELECT array_agg(ROW(
               msgs.msg_id, msgs.step_uuid, ls.task_uuid, ls.state, ls.attempts,
               CASE
                   WHEN ls.step_uuid IS NULL THEN
                       CASE WHEN EXISTS (SELECT 1 FROM tasker.steps x WHERE x.step_uuid = msgs.step_uuid)
                            THEN 'skip' ELSE 'dead' END
                   WHEN ls.state NOT IN ('enqueued', 'waiting_for_retry', 'in_progress') THEN 'dead'
                   -- only the step's current message speaks for it (a copy is not a lost lease)
                   WHEN ls.msg_id IS DISTINCT FROM msgs.msg_id THEN 'dead'
                   WHEN ls.task_state IN ('complete', 'cancelled', 'resolved_manually') THEN 'dead'
                   -- a checkpointed step continues its attempt (it was running when it checkpointed)
                   WHEN ls.state = 'in_progress' AND ls.continuation THEN 'run_resume'
                   WHEN ls.task_state = 'error' THEN
                       CASE WHEN ls.state = 'in_progress' THEN 'park_expire' ELSE 'park' END
                   WHEN ls.state IN ('enqueued', 'waiting_for_retry') THEN 'run_new'
                   -- in_progress and visible again: the holder's lease expired
                   WHEN ls.retryable AND ls.attempts < ls.max_attempts THEN 'run_reclaim'
                   ELSE 'expire_fail'
               END)::tasker._claim_candidate)
      INTO v_batch
      FROM msgs
      LEFT JOIN locked_steps ls ON ls.step_uuid = msgs.step_uuid;

    IF v_batch IS NULL THEN
        PERFORM tasker._queue_sequence(p_queue);  -- an unknown queue is an error, not "no work"
        RETURN;
    END IF;
    IF EXISTS (SELECT 1 FROM unnest(v_batch) b WHERE b.kind IN ('dead', 'park', 'park_expire', 'expire_fail')) THEN
        PERFORM tasker._claim_exceptions(p_queue, v_batch);
    END IF;

    RETURN QUERY
    WITH
    run AS (
        SELECT b.* FROM unnest(v_batch) b WHERE b.kind IN ('run_new', 'run_resume', 'run_reclaim')
    ),
    -- 4. The step is now held: a new attempt, unless it continues a checkpoint.
    upd AS (
        UPDATE tasker.steps s
           SET state = 'in_progress',
               attempts = s.attempts + CASE WHEN r.kind = 'run_resume' THEN 0 ELSE 1 END,
               claim_seq = s.claim_seq + 1,
               claim_spent_attempt = (r.kind <> 'run_resume'),
               continuation = false,
               worker_id = p_worker_id,
               next_attempt_at = NULL,
               started_at = v_now,
               updated_at = v_now
          FROM run r
         WHERE s.step_uuid = r.step_uuid
        RETURNING s.step_uuid, s.task_uuid, s.named_step_id, s.name, s.attempts, s.claim_seq,
                  s.max_attempts, s.retryable, s.checkpoint, s.inputs, r.msg_id, r.step_state, r.kind
    ),
    -- 5. The message's visibility timeout is the lease.
    lease AS (
        UPDATE tasker.queue_messages m
           SET vt = v_lease, read_ct = m.read_ct + 1
          FROM upd
         WHERE m.queue = p_queue AND m.msg_id = upd.msg_id
    ),
    audit AS (
        INSERT INTO tasker.step_transitions (step_uuid, task_uuid, from_state, to_state, event, attempt, worker_id, created_at)
        SELECT upd.step_uuid, upd.task_uuid, upd.step_state, 'in_progress',
               CASE upd.kind WHEN 'run_new' THEN 'claimed' WHEN 'run_resume' THEN 'resumed' ELSE 'lease_expired' END,
               upd.attempts, p_worker_id, v_now
          FROM upd
    )
    -- 6. Hydrate: the task's context and every ancestor's result (one index probe per step).
    SELECT upd.msg_id, upd.step_uuid, upd.task_uuid, upd.name, ns.handler, ns.config,
           upd.attempts, upd.claim_seq, upd.max_attempts, upd.retryable, ns.backoff,
           ns.backoff_base_ms, ns.max_backoff_ms, ns.jitter, ns.timeout_seconds, t.context,
           CASE WHEN cardinality(ns.ancestor_names) = 0 THEN '{}'::jsonb
                ELSE coalesce((SELECT jsonb_object_agg(a.name, a.results)
                                 FROM tasker.steps a
                                WHERE a.task_uuid = upd.task_uuid AND a.name = ANY (ns.ancestor_names)),
                              '{}'::jsonb)
           END,
           upd.checkpoint, upd.inputs, t.namespace, t.name, t.version, v_lease,
           CASE upd.kind WHEN 'run_new' THEN 'claimed' WHEN 'run_resume' THEN 'resumed' ELSE 'lease_expired' END
      FROM upd
      JOIN tasker.tasks t ON t.task_uuid = upd.task_uuid
      JOIN tasker.named_steps ns ON ns.named_step_id = upd.named_step_id
     ORDER BY upd.msg_id;
END
$$;
ALTER FUNCTION tasker.claim_steps(text, text, integer, double precision) SET plan_cache_mode = force_generic_plan;
COMMENT ON FUNCTION tasker.claim_steps(text,text,integer,double precision) IS
    'Claims up to qty ready steps of a namespace for a worker, with a lease and a new claim_seq fence.';

-- The rare outcomes of a claim (kept out of the hot statement): messages of finished steps
-- (and messages that name no step of ours) are archived, messages of tasks in error are parked, and a lost lease is charged as an attempt:
-- the step waits to retry (parked if its task is in error) or, out of attempts, goes to error
-- with error type lease_expired, and its task with it.
CREATE FUNCTION tasker._claim_exceptions(p_queue text, p_batch tasker._claim_candidate[]) RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
    v_now    timestamptz := clock_timestamp();
    v_errors tasker._task_delta[];
BEGIN
    -- archived rather than deleted, so a message that was not the engine's can be found again
    PERFORM tasker.archive(p_queue, ARRAY(SELECT b.msg_id FROM unnest(p_batch) b WHERE b.kind = 'dead'));

    UPDATE tasker.queue_messages m
       SET vt = v_now + tasker._park_interval()
      FROM unnest(p_batch) b
     WHERE b.kind = 'park' AND m.queue = p_queue AND m.msg_id = b.msg_id;

    WITH expired AS (
        SELECT b.* FROM unnest(p_batch) b WHERE b.kind IN ('park_expire', 'expire_fail')
    ),
    upd AS (
        UPDATE tasker.steps s
           SET state = CASE WHEN s.retryable AND s.attempts < s.max_attempts THEN 'waiting_for_retry' ELSE 'error' END,
               last_error = jsonb_build_object(
                   'message', format('lease expired: worker %s stopped renewing attempt %s', coalesce(s.worker_id, '?'), s.attempts),
                   'error_type', 'lease_expired', 'error_code', 'lease_expired',
                   'retryable', s.retryable AND s.attempts < s.max_attempts,
                   'attempt', s.attempts, 'worker_id', s.worker_id, 'at', v_now),
               next_attempt_at = CASE WHEN s.retryable AND s.attempts < s.max_attempts THEN v_now END,
               msg_id = CASE WHEN s.retryable AND s.attempts < s.max_attempts THEN s.msg_id END,
               completed_at = CASE WHEN s.retryable AND s.attempts < s.max_attempts THEN NULL ELSE v_now END,
               continuation = false,
               updated_at = v_now
          FROM expired e
         WHERE s.step_uuid = e.step_uuid
        RETURNING s.step_uuid, s.task_uuid, s.state, s.attempts, e.msg_id, s.worker_id
    ),
    drop_msgs AS (
        DELETE FROM tasker.queue_messages m USING upd
         WHERE upd.state = 'error' AND m.queue = p_queue AND m.msg_id = upd.msg_id
    ),
    park_msgs AS (
        UPDATE tasker.queue_messages m SET vt = v_now + tasker._park_interval()
          FROM upd
         WHERE upd.state = 'waiting_for_retry' AND m.queue = p_queue AND m.msg_id = upd.msg_id
    ),
    audit AS (
        INSERT INTO tasker.step_transitions (step_uuid, task_uuid, from_state, to_state, event, attempt, worker_id, error_summary, created_at)
        SELECT upd.step_uuid, upd.task_uuid, 'in_progress', upd.state, 'lease_expired', upd.attempts, upd.worker_id,
               'lease_expired: the worker stopped renewing its lease', v_now
          FROM upd
    )
    SELECT array_agg(ROW(upd.task_uuid, 0, 1)::tasker._task_delta) INTO v_errors
      FROM upd WHERE upd.state = 'error';
    IF v_errors IS NOT NULL THEN
        PERFORM tasker._apply_task_deltas(v_errors, 'step_failed');
    END IF;
END
$$;
ALTER FUNCTION tasker._claim_exceptions(text, tasker._claim_candidate[]) SET plan_cache_mode = force_generic_plan;
