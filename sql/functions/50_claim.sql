-- Claiming: claim_steps hands out ready steps of one namespace queue with a lease (the
-- message's visibility time) and a new claim_seq, the fence every later write of the claim
-- must carry. A checkpointed step continues its attempt. Messages that cannot be run (an
-- expired lease, task in error, cancelled, malformed) are dealt with in _claim_exceptions so
-- the hot statement stays one CTE.
--
-- The hot functions plan their statements generically from the first call (SET
-- plan_cache_mode below). A custom plan sees the outcome array's real size and the statistics
-- of the moment (right after a bulk create, almost no step is in_progress) and picks
-- sequential scans of tasker.steps that cost hundreds of milliseconds for the first calls of
-- every session; the generic plans are the index plans the plan tests check.
--
-- They also run with enable_seqscan = off. Every statement of the hot path works on a batch
-- (claims, outcomes, children) and finds its rows through a key, so an index probe is right
-- whatever the statistics say; but a plan is made once per session, and a session that starts
-- on near-empty tables (a new database; a queue whose workers keep up has a handful of live
-- rows) would scan sequentially for good, through every dead row a held snapshot keeps.

-- claim_steps
CREATE TYPE tasker._claim_candidate AS (
    msg_id       bigint,
    step_uuid    uuid,
    task_uuid    uuid,
    step_state   text,
    attempts     integer,
    -- run_new | run_resume | skip | dead | park | expire | held (flow control: _flow_admit)
    kind         text,
    -- the step has a concurrency key or a rate limit (sql/functions/55_flow.sql)
    flow         boolean
);

-- Hands out up to p_qty ready steps of a namespace queue, each as one row with everything its
-- handler needs (ids, attempt = fencing token, handler, config, task context, every ancestor's
-- result by step name, checkpoint, retry settings, timeout). The message's visibility timeout
-- becomes the lease. A message whose step's lease expired is not handed out: the lost lease
-- is recorded as a failed attempt (event lease_expired, naming the worker that lost it) and the
-- step waits for its backoff, or goes to error when no attempt is left; messages of finished
-- steps are archived; messages of tasks in error are parked (taken out of the queue).
--
-- p_visible_since (optional) is a visibility window: only messages that became visible at or
-- after it are read (see _lock_visible). The worker passes the time of its last claim that took
-- every visible message, less a margin, and claims without a window now and then; callers that
-- do not keep track leave it NULL and every visible message is a candidate.
CREATE FUNCTION tasker.claim_steps(p_queue text, p_worker_id text, p_qty integer, p_lease_seconds double precision,
                                   p_visible_since timestamptz DEFAULT NULL)
RETURNS TABLE (
    msg_id bigint, step_uuid uuid, task_uuid uuid, step_name text, handler text, config jsonb,
    attempt integer, claim_seq integer, max_attempts integer, retryable boolean, backoff text,
    backoff_base_ms integer, max_backoff_ms integer, jitter double precision,
    timeout_seconds double precision, task_context jsonb, dependency_results jsonb,
    checkpoint jsonb, inputs jsonb, namespace text, task_name text, task_version text,
    lease_expires_at timestamptz, claim_event text, dependency_results_partial boolean,
    template_step text, traceparent text, dependents integer
)
LANGUAGE plpgsql AS $$
#variable_conflict use_column
DECLARE
    v_now   timestamptz := clock_timestamp();
    v_msg_ids   bigint[];
    v_msg_steps uuid[];
    v_lanes     text[];
    v_vtimes    bigint[];
    v_taken     integer[];
    v_open      boolean[];
    v_lane_msgs jsonb[];
BEGIN
    IF p_qty IS NULL OR p_qty < 1 THEN
        RAISE EXCEPTION 'qty must be >= 1, got %', coalesce(p_qty::text, 'NULL') USING ERRCODE = 'TV002';
    END IF;
    PERFORM tasker._check_lease_seconds(p_lease_seconds);
    PERFORM tasker._check_text_size(p_worker_id, 'max_name_bytes', 'worker_id');

    -- 1. Pick and lock visible messages, highest priority first, then the longest visible
    --    (_lock_visible: reads only visible messages, whatever is in flight). SKIP LOCKED:
    --    concurrent claimers pass over each other's rows. This is a statement of its own, before
    --    the ones that read the messages' steps (_claim_messages): _lock_visible's queries take
    --    snapshots of their own, so a message they lock may have been committed after the
    --    calling statement's snapshot was taken; read in that statement, its step would be
    --    invisible and the message taken for one that names no step (archived, the step
    --    stranded). The next statement's snapshot sees every step whose message was picked here.
    IF NOT EXISTS (SELECT 1 FROM tasker.flow_lanes l WHERE l.queue = p_queue) THEN
        SELECT array_agg(m.msg_id ORDER BY m.ord),
               -- a message that does not name a step (not ours) must not stop the queue
               array_agg(CASE WHEN m.message->>'step_uuid' ~* '^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$'
                              THEN (m.message->>'step_uuid')::uuid END ORDER BY m.ord)
          INTO v_msg_ids, v_msg_steps
          FROM tasker._lock_visible(p_queue, p_qty, v_now, p_visible_since) WITH ORDINALITY m(msg_id, message, ord);
    ELSE
        -- a queue with fairness lanes is claimed lane by lane (55_flow.sql)
        SELECT l.o_msg_ids, l.o_messages, l.o_lanes, l.o_vtimes, l.o_taken, l.o_open
          INTO v_msg_ids, v_lane_msgs, v_lanes, v_vtimes, v_taken, v_open
          FROM tasker._lock_lanes(p_queue, p_qty, v_now, p_visible_since) l;
        SELECT array_agg(m.msg_id ORDER BY m.ord),
               array_agg(CASE WHEN m.message->>'step_uuid' ~* '^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$'
                              THEN (m.message->>'step_uuid')::uuid END ORDER BY m.ord)
          INTO v_msg_ids, v_msg_steps
          FROM unnest(v_msg_ids, v_lane_msgs) WITH ORDINALITY m(msg_id, message, ord);
    END IF;
    IF v_msg_ids IS NOT NULL THEN
        RETURN QUERY
        SELECT * FROM tasker._claim_messages(p_queue, p_worker_id, v_now, v_now + make_interval(secs => p_lease_seconds),
                                             v_msg_ids, v_msg_steps, false);
    END IF;
    -- the lanes' turns last: their row locks (and the deletion of idle lanes) must come after
    -- every lock the claim waits for (55_flow.sql, _serve_lanes)
    IF v_lanes IS NOT NULL THEN
        PERFORM tasker._serve_lanes(p_queue, v_lanes, v_vtimes, v_taken, v_open);
    END IF;
    IF v_msg_ids IS NULL THEN
        PERFORM tasker._queue_sequence(p_queue);  -- an unknown queue is an error, not "no work"
    END IF;
END
$$;
ALTER FUNCTION tasker.claim_steps(text, text, integer, double precision, timestamptz) SET plan_cache_mode = force_generic_plan;
ALTER FUNCTION tasker.claim_steps(text, text, integer, double precision, timestamptz) SET enable_seqscan = off;
COMMENT ON FUNCTION tasker.claim_steps(text,text,integer,double precision,timestamptz) IS
    'Claims up to qty ready steps of a namespace for a worker, with a lease and a new claim_seq fence; visible_since limits the messages read to those visible since then.';

-- Refuses a lease length that is not a number of seconds above 0 and at most a year.
CREATE FUNCTION tasker._check_lease_seconds(p_lease_seconds double precision) RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    IF p_lease_seconds IS NULL OR NOT (p_lease_seconds > 0 AND p_lease_seconds <= 31536000) THEN  -- NaN > 0 in SQL
        RAISE EXCEPTION 'lease_seconds must be > 0 and at most a year, got %', coalesce(p_lease_seconds::text, 'NULL') USING ERRCODE = 'TV002';
    END IF;
END
$$;

-- Claims the given messages of one queue, which the caller has locked (claim_steps through
-- _lock_visible; complete_and_claim inserted them itself, in its own transaction): locks their
-- steps, deals with those that cannot run (_claim_exceptions), leases the rest until p_lease
-- and returns them as claim_steps does. p_handoff marks the claims' audit rows as handed to the
-- worker whose outcome made the steps ready.
CREATE FUNCTION tasker._claim_messages(p_queue text, p_worker_id text, p_now timestamptz, p_lease timestamptz,
                                       p_msg_ids bigint[], p_msg_steps uuid[], p_handoff boolean)
RETURNS TABLE (
    msg_id bigint, step_uuid uuid, task_uuid uuid, step_name text, handler text, config jsonb,
    attempt integer, claim_seq integer, max_attempts integer, retryable boolean, backoff text,
    backoff_base_ms integer, max_backoff_ms integer, jitter double precision,
    timeout_seconds double precision, task_context jsonb, dependency_results jsonb,
    checkpoint jsonb, inputs jsonb, namespace text, task_name text, task_version text,
    lease_expires_at timestamptz, claim_event text, dependency_results_partial boolean,
    template_step text, traceparent text, dependents integer
)
LANGUAGE plpgsql AS $$
#variable_conflict use_column
DECLARE
    v_now   timestamptz := p_now;
    v_lease timestamptz := p_lease;
    v_batch tasker._claim_candidate[];
BEGIN
    WITH
    msgs AS MATERIALIZED (
        SELECT p.msg_id, p.step_uuid FROM unnest(p_msg_ids, p_msg_steps) p(msg_id, step_uuid)
    ),
    -- 2. Lock their steps in step_uuid order, skipping any an operator call (cancel, resolve)
    --    holds right now: that message is simply left for a later claim.
    locked_steps AS MATERIALIZED (
        SELECT s.step_uuid, s.task_uuid, s.state, s.attempts, s.max_attempts, s.retryable, s.continuation,
               s.msg_id, s.concurrency_key IS NOT NULL OR s.rate_limit IS NOT NULL AS flow,
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
                   -- in_progress and visible again: the holder's lease expired
                   WHEN ls.state = 'in_progress' THEN 'expire'
                   WHEN ls.task_state = 'error' THEN 'park'
                   ELSE 'run_new'
               END, coalesce(ls.flow, false))::tasker._claim_candidate)
      INTO v_batch
      FROM msgs
      LEFT JOIN locked_steps ls ON ls.step_uuid = msgs.step_uuid;

    IF EXISTS (SELECT 1 FROM unnest(v_batch) b WHERE b.kind IN ('dead', 'park', 'expire')) THEN
        PERFORM tasker._claim_exceptions(p_queue, v_batch);
    END IF;
    -- 3b. Flow control: concurrency limits and rate limits may hold steps back (not leased,
    --     no attempt spent; 55_flow.sql).
    IF EXISTS (SELECT 1 FROM unnest(v_batch) b WHERE b.flow AND b.kind = 'run_new') THEN
        v_batch := tasker._flow_admit(p_queue, v_batch, v_now);
    END IF;

    RETURN QUERY
    WITH
    run AS (
        SELECT b.* FROM unnest(v_batch) b WHERE b.kind IN ('run_new', 'run_resume')
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
    -- 5. The message's visibility timeout is the lease. (msg_id = ANY: see _lock_step_messages)
    lease AS (
        UPDATE tasker.queue_messages m
           SET vt = v_lease, read_ct = m.read_ct + 1
          FROM upd
         WHERE m.queue = p_queue AND m.msg_id = upd.msg_id
           AND m.msg_id = ANY (ARRAY(SELECT u.msg_id FROM upd u))
    ),
    audit AS (
        INSERT INTO tasker.step_transitions (step_uuid, task_uuid, from_state, to_state, event, attempt, worker_id,
                                             metadata, created_at)
        SELECT upd.step_uuid, upd.task_uuid, upd.step_state, 'in_progress',
               CASE upd.kind WHEN 'run_resume' THEN 'resumed' ELSE 'claimed' END,
               upd.attempts, p_worker_id, CASE WHEN p_handoff THEN '{"handoff": true}'::jsonb END, v_now
          FROM upd
    )
    -- 6. Hydrate: the task's context and every ancestor's result (one index probe per step).
    SELECT upd.msg_id, upd.step_uuid, upd.task_uuid, upd.name, ns.handler, ns.config,
           upd.attempts, upd.claim_seq, upd.max_attempts, upd.retryable, ns.backoff,
           ns.backoff_base_ms, ns.max_backoff_ms, ns.jitter, ns.timeout_seconds, t.context,
           CASE WHEN cardinality(ns.ancestor_names) = 0 THEN '{}'::jsonb
                WHEN ns.step_type <> 'batch_worker' AND cardinality(ns.worker_ancestor_ids) = 0
                THEN coalesce((SELECT jsonb_object_agg(a.name, a.results)
                                 FROM tasker.steps a
                                WHERE a.task_uuid = upd.task_uuid AND a.name = ANY (ns.ancestor_names)),
                              '{}'::jsonb)
                -- a batch worker and what follows a fan-out: the analyzer's cursor configs
                -- (one per worker, each worker has its own in its inputs) are left out, so a
                -- fan-out of N workers does not hand every worker all N of them
                ELSE coalesce((SELECT jsonb_object_agg(a.name, a.results #- '{batch_processing_outcome,cursor_configs}')
                                 FROM tasker.steps a
                                WHERE a.task_uuid = upd.task_uuid AND a.name = ANY (ns.ancestor_names)),
                              '{}'::jsonb)
           END || coalesce(wk.results, '{}'::jsonb),
           upd.checkpoint, upd.inputs, t.namespace, t.name, t.version, v_lease,
           CASE upd.kind WHEN 'run_resume' THEN 'resumed' ELSE 'claimed' END,
           coalesce(wk.partial, false),
           -- the template's step (a batch worker `process_batch_001` is `process_batch`'s)
           ns.name,
           -- the trace context the task was created under (step spans are its children)
           t.traceparent,
           -- the steps waiting on this one: how many its success can make ready, which the
           -- worker keeps slots for (complete_and_claim hands them off). The children a
           -- decision or fan-out creates are not counted: they are not handed off
           (SELECT count(*)::integer FROM tasker.step_edges e WHERE e.parent_uuid = upd.step_uuid)
      FROM upd
      JOIN tasker.tasks t ON t.task_uuid = upd.task_uuid
      JOIN tasker.named_steps ns ON ns.named_step_id = upd.named_step_id
      -- batch workers among the ancestors (a convergence after a fan-out and what follows it):
      -- their results by name while the running total of their JSON text stays within
      -- max_claim_dependency_bytes; the rest is fetched lazily (tasker.dependency_results)
      LEFT JOIN LATERAL (
          SELECT jsonb_object_agg(w.name, w.results) FILTER (WHERE w.total <= w.lim) AS results,
                 bool_or(w.total > w.lim) AS partial
            FROM (SELECT a.name, a.results,
                         sum(coalesce(octet_length(a.results::text), 0)) OVER (ORDER BY a.name) AS total,
                         (SELECT st.value FROM tasker.settings st WHERE st.name = 'max_claim_dependency_bytes') AS lim
                    FROM tasker.steps a
                   WHERE cardinality(ns.worker_ancestor_ids) > 0  -- (not scanned for other steps)
                     AND a.task_uuid = upd.task_uuid AND a.named_step_id = ANY (ns.worker_ancestor_ids)) w
      ) wk ON true
     ORDER BY upd.msg_id;
END
$$;
ALTER FUNCTION tasker._claim_messages(text, text, timestamptz, timestamptz, bigint[], uuid[], boolean) SET plan_cache_mode = force_generic_plan;
ALTER FUNCTION tasker._claim_messages(text, text, timestamptz, timestamptz, bigint[], uuid[], boolean) SET enable_seqscan = off;

-- The rare outcomes of a claim (kept out of the hot statement), none of them handed out:
-- - messages of finished steps (and messages that name no step of ours) are archived;
-- - a message of a step waiting to start (enqueued, waiting_for_retry) whose task is in error
--   is parked: deleted, and the step's msg_id cleared. It costs nothing while parked; the
--   step row is the source of truth, and _resume_task gives it a new message when the task
--   goes on. One visit per message, once: nothing re-parks it;
-- - a lost lease (an in_progress step whose message is visible again) is a failed attempt:
--   with an attempt left the step waits for its backoff (the same _backoff_seconds a retryable
--   failure uses; parked if its task is in error), else it goes to error and its task with it.
--   Either way last_error and a lease_expired transition name the worker that lost the lease.
--   The checkpoint is kept: the retry resumes from it.
-- The tasks concerned are locked first (in task_uuid order, after the messages and steps the
-- claim holds: the common lock order), so whether a task is in error is decided against its
-- current row: an operator's resume either commits first (the message is left alone or
-- scheduled) or waits for this claim and then finds the step parked and re-sends its message.
CREATE FUNCTION tasker._claim_exceptions(p_queue text, p_batch tasker._claim_candidate[]) RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
    v_now    timestamptz := clock_timestamp();
    v_errors tasker._task_delta[];
BEGIN
    -- archived rather than deleted, so a message that was not the engine's can be found again
    PERFORM tasker._archive_messages(p_queue, ARRAY(SELECT b.msg_id FROM unnest(p_batch) b WHERE b.kind = 'dead'));

    PERFORM 1 FROM tasker.tasks t
     WHERE t.task_uuid IN (SELECT b.task_uuid FROM unnest(p_batch) b WHERE b.kind IN ('park', 'expire'))
     ORDER BY t.task_uuid
       FOR NO KEY UPDATE;

    -- Park: only while the task is still in error (read after the lock above).
    WITH park AS (
        SELECT b.msg_id, b.step_uuid
          FROM unnest(p_batch) b
          JOIN tasker.tasks t ON t.task_uuid = b.task_uuid
         WHERE b.kind = 'park' AND t.state = 'error'
    ),
    unlink AS (
        UPDATE tasker.steps s SET msg_id = NULL
          FROM park p
         WHERE s.step_uuid = p.step_uuid AND s.msg_id = p.msg_id
    )
    DELETE FROM tasker.queue_messages m USING park p
     WHERE m.queue = p_queue AND m.msg_id = p.msg_id;

    WITH expired AS (
        SELECT b.msg_id, b.step_uuid, t.state AS task_state, m.vt AS lease_end,
               s.retryable AND s.attempts < s.max_attempts AS retry,
               -- the backoff of a retryable failure of this attempt
               v_now + make_interval(secs => tasker._backoff_seconds(
                   n.backoff, n.backoff_base_ms, n.max_backoff_ms, n.jitter, s.attempts)) AS retry_at
          FROM unnest(p_batch) b
          JOIN tasker.steps s ON s.step_uuid = b.step_uuid
          JOIN tasker.named_steps n ON n.named_step_id = s.named_step_id
          JOIN tasker.tasks t ON t.task_uuid = b.task_uuid
          JOIN tasker.queue_messages m ON m.queue = p_queue AND m.msg_id = b.msg_id
         WHERE b.kind = 'expire'
    ),
    upd AS (
        UPDATE tasker.steps s
           SET state = CASE WHEN e.retry THEN 'waiting_for_retry' ELSE 'error' END,
               last_error = jsonb_build_object(
                   'message', format('lease of worker %s expired at %s (attempt %s of %s): it stopped renewing it',
                                     coalesce(s.worker_id, '?'), e.lease_end, s.attempts, s.max_attempts),
                   'error_type', 'lease_expired', 'error_code', 'lease_expired',
                   'retryable', e.retry, 'lease_expired_at', e.lease_end,
                   'attempt', s.attempts, 'worker_id', s.worker_id, 'at', v_now),
               next_attempt_at = CASE WHEN e.retry THEN e.retry_at END,
               -- parked (no message) when its task is in error
               msg_id = CASE WHEN e.retry AND e.task_state <> 'error' THEN s.msg_id END,
               completed_at = CASE WHEN e.retry THEN NULL ELSE v_now END,
               continuation = false,
               claim_spent_attempt = false,
               updated_at = v_now
          FROM expired e
         WHERE s.step_uuid = e.step_uuid
        RETURNING s.step_uuid, s.task_uuid, s.state, s.attempts, e.msg_id, s.msg_id AS kept_msg,
                  s.worker_id, s.next_attempt_at
    ),
    drop_msgs AS (
        DELETE FROM tasker.queue_messages m USING upd
         WHERE upd.kept_msg IS NULL AND m.queue = p_queue AND m.msg_id = upd.msg_id
           AND m.msg_id = ANY (ARRAY(SELECT u.msg_id FROM upd u))
    ),
    retry_msgs AS (
        UPDATE tasker.queue_messages m SET vt = upd.next_attempt_at
          FROM upd
         WHERE upd.kept_msg IS NOT NULL AND m.queue = p_queue AND m.msg_id = upd.msg_id
           AND m.msg_id = ANY (ARRAY(SELECT u.msg_id FROM upd u))
    ),
    audit AS (
        INSERT INTO tasker.step_transitions (step_uuid, task_uuid, from_state, to_state, event, attempt, worker_id, error_summary, created_at)
        SELECT upd.step_uuid, upd.task_uuid, 'in_progress', upd.state, 'lease_expired', upd.attempts, upd.worker_id,
               format('lease_expired: the lease of worker %s expired', coalesce(upd.worker_id, '?')), v_now
          FROM upd
    )
    SELECT array_agg(ROW(upd.task_uuid, 0, 1)::tasker._task_delta) INTO v_errors
      FROM upd WHERE upd.state = 'error';
    IF v_errors IS NOT NULL THEN
        PERFORM tasker._apply_task_deltas(v_errors, 'step_failed');
    END IF;
    -- This claim took messages without handing them out: a worker asking again may find the
    -- ready ones behind them.
    PERFORM pg_notify('tasker_' || p_queue, '');
END
$$;
ALTER FUNCTION tasker._claim_exceptions(text, tasker._claim_candidate[]) SET plan_cache_mode = force_generic_plan;
ALTER FUNCTION tasker._claim_exceptions(text, tasker._claim_candidate[]) SET enable_seqscan = off;

-- Flow control in the claim (the rest of it, and the tables, in 55_flow.sql; here because it
-- takes this file's claim candidates).
-- A claim candidate with flow settings (_flow_admit).
CREATE TYPE tasker._flow_candidate AS (
    ord bigint, step_uuid uuid, msg_id bigint, concurrency_key text, concurrency_limit integer, rate_limit text);

-- Flow control of a claim's candidates (claim_steps and the hand-off): returns p_batch with
-- kind 'held' for each run_new candidate that its concurrency key or rate limit holds back.
-- The admitted steps of a concurrency key are recorded in tasker.flow_holders; a held message
-- of a rate limit is made visible again when its token is due. The caller holds the steps' row
-- locks; this takes, in order, transaction advisory locks of the keys (only tried) and the
-- buckets' rows (in name order).
CREATE FUNCTION tasker._flow_admit(p_queue text, p_batch tasker._claim_candidate[], p_now timestamptz)
RETURNS tasker._claim_candidate[]
LANGUAGE plpgsql AS $$
DECLARE
    v_c      tasker._flow_candidate[];
    v_held   uuid[] := '{}';
    v_keys   text[];
    v_locked text[];
    v_round  integer;
    v_bucket tasker.rate_limits;
    v_name   text;
    v_tokens double precision;
    v_take   integer;
    v_first  timestamptz;
    v_parked integer;
BEGIN
    v_c := ARRAY(
        SELECT ROW(b.ordinality, b.step_uuid, b.msg_id, s.concurrency_key, n.concurrency_limit, s.rate_limit)::tasker._flow_candidate
          FROM unnest(p_batch) WITH ORDINALITY b
          JOIN tasker.steps s ON s.step_uuid = b.step_uuid
          JOIN tasker.named_steps n ON n.named_step_id = s.named_step_id
         WHERE b.kind = 'run_new' AND (s.concurrency_key IS NOT NULL OR s.rate_limit IS NOT NULL)
         ORDER BY b.ordinality);

    -- 1. Concurrency: the keys' locks, tried in key order (a key another claim is admitting
    --    right now: its candidates are held this time, the next claim will see); then, per key
    --    in candidate order, each candidate while fewer than its own limit run. A completion
    --    deletes its step's record; a step that left in_progress otherwise (a lost lease, a
    --    release, an operator) leaves one behind, which counts until a claim that would hold a
    --    step of the key because of it deletes the records of steps no longer in progress.
    v_keys := ARRAY(SELECT DISTINCT c.concurrency_key FROM unnest(v_c) c WHERE c.concurrency_key IS NOT NULL ORDER BY 1);
    IF cardinality(v_keys) > 0 THEN
        v_locked := ARRAY(SELECT k FROM unnest(v_keys) WITH ORDINALITY x(k, o)
                           WHERE pg_try_advisory_xact_lock(tasker._concurrency_lock_key(p_queue, x.k))
                           ORDER BY x.o);
        IF cardinality(v_locked) < cardinality(v_keys) THEN
            -- steps held only because another claim admits their key now: wake a worker to
            -- ask again once this claim commits (the other claim never notifies)
            PERFORM pg_notify('tasker_' || p_queue, '');
        END IF;
        FOR v_round IN 1 .. 2 LOOP
            v_held := ARRAY(
                SELECT x.step_uuid
                  FROM (SELECT c.step_uuid, c.concurrency_key, c.concurrency_limit,
                               row_number() OVER (PARTITION BY c.concurrency_key ORDER BY c.ord) AS n
                          FROM unnest(v_c) c WHERE c.concurrency_key IS NOT NULL) x
                  LEFT JOIN (SELECT h.concurrency_key, count(*) AS running
                               FROM tasker.flow_holders h
                              WHERE h.queue = p_queue AND h.concurrency_key = ANY (v_locked)
                              GROUP BY h.concurrency_key) r ON r.concurrency_key = x.concurrency_key
                 WHERE NOT (x.concurrency_key = ANY (v_locked))
                    OR x.n + coalesce(r.running, 0) > x.concurrency_limit);
            EXIT WHEN v_round = 2 OR NOT EXISTS (
                SELECT 1 FROM tasker.steps s WHERE s.step_uuid = ANY (v_held) AND s.concurrency_key = ANY (v_locked));
            -- something would be held: first drop the records of those keys' steps that moved on
            DELETE FROM tasker.flow_holders h
             WHERE h.queue = p_queue
               AND h.concurrency_key = ANY (ARRAY(SELECT s.concurrency_key FROM tasker.steps s
                                                   WHERE s.step_uuid = ANY (v_held) AND s.concurrency_key = ANY (v_locked)))
               AND NOT EXISTS (SELECT 1 FROM tasker.steps s WHERE s.step_uuid = h.step_uuid AND s.state = 'in_progress');
            EXIT WHEN NOT FOUND;
        END LOOP;
    END IF;

    -- 2. Rate limits, bucket by bucket (name order), for what concurrency admitted.
    FOR v_name IN SELECT DISTINCT c.rate_limit FROM unnest(v_c) c
                   WHERE c.rate_limit IS NOT NULL AND NOT (c.step_uuid = ANY (v_held)) ORDER BY 1 LOOP
        SELECT * INTO v_bucket FROM tasker.rate_limits r WHERE r.name = v_name FOR UPDATE;
        v_tokens := least(v_bucket.burst::double precision,
                          v_bucket.tokens + v_bucket.per_second * greatest(0, extract(epoch FROM p_now - v_bucket.refilled_at)));
        SELECT count(*) INTO v_take FROM unnest(v_c) c WHERE c.rate_limit = v_name AND NOT (c.step_uuid = ANY (v_held));
        v_take := least(v_take, floor(v_tokens + 1e-9)::integer);
        v_tokens := greatest(0, v_tokens - v_take);
        -- the rest wait for their tokens: the first when the bucket next holds a whole one (or
        -- after those held before them), then one per 1/per_second
        v_first := greatest(p_now + make_interval(secs => (1 - v_tokens) / v_bucket.per_second),
                            coalesce(v_bucket.parked_until, p_now));
        WITH late AS (
            SELECT c.step_uuid, c.msg_id, row_number() OVER (ORDER BY c.ord) - 1 - v_take AS n
              FROM unnest(v_c) c
             WHERE c.rate_limit = v_name AND NOT (c.step_uuid = ANY (v_held))
             ORDER BY c.ord
            OFFSET v_take
        ),
        park AS (
            UPDATE tasker.queue_messages m
               SET vt = v_first + make_interval(secs => late.n / v_bucket.per_second)
              FROM late
             WHERE m.queue = p_queue AND m.msg_id = late.msg_id
            RETURNING late.step_uuid
        )
        SELECT v_held || coalesce(array_agg(park.step_uuid), '{}'), count(*) INTO v_held, v_parked FROM park;
        UPDATE tasker.rate_limits r
           SET tokens = v_tokens, refilled_at = p_now,
               parked_until = CASE WHEN v_parked > 0
                                   THEN v_first + make_interval(secs => v_parked / v_bucket.per_second)
                                   ELSE r.parked_until END
         WHERE r.name = v_name;
    END LOOP;

    -- 3. The admitted steps of each key hold one of its places while they run.
    INSERT INTO tasker.flow_holders (step_uuid, queue, concurrency_key, claimed_at)
    SELECT c.step_uuid, p_queue, c.concurrency_key, p_now
      FROM unnest(v_c) c
     WHERE c.concurrency_key IS NOT NULL AND NOT (c.step_uuid = ANY (v_held))
    ON CONFLICT (step_uuid) DO UPDATE SET concurrency_key = EXCLUDED.concurrency_key, claimed_at = EXCLUDED.claimed_at;

    IF cardinality(v_held) = 0 THEN
        RETURN p_batch;
    END IF;
    RETURN ARRAY(
        SELECT ROW(b.msg_id, b.step_uuid, b.task_uuid, b.step_state, b.attempts,
                   CASE WHEN b.step_uuid = ANY (v_held) THEN 'held' ELSE b.kind END, b.flow)::tasker._claim_candidate
          FROM unnest(p_batch) WITH ORDINALITY b
         ORDER BY b.ordinality);
END
$$;
ALTER FUNCTION tasker._flow_admit(text, tasker._claim_candidate[], timestamptz) SET enable_seqscan = off;
