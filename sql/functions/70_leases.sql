-- Leases held by a worker: extend_leases (heartbeat) and release_steps (graceful shutdown:
-- hand back claims whose handlers never started). Both take fenced claims and lock the claims'
-- messages first, in msg_id order.

-- Leases: heartbeat and graceful hand-back

-- Parses a claim list [{step_uuid, attempt, claim_seq}] (as claim_steps returned them) and
-- refuses a malformed one naming the entry. Shared by extend_leases and release_steps.
CREATE FUNCTION tasker._parse_claims(p_claims jsonb)
RETURNS TABLE (ord integer, step_uuid uuid, attempt integer, claim_seq integer)
-- A worker heartbeats or releases its own claims: a handful to a few hundred rows. Without
-- this estimate the planner assumes 1000 and hash-joins a sequential scan of tasker.steps.
ROWS 10
LANGUAGE plpgsql IMMUTABLE AS $$
#variable_conflict use_column
DECLARE
    v_bad text;
BEGIN
    IF p_claims IS NULL OR jsonb_typeof(p_claims) <> 'array' THEN
        RAISE EXCEPTION 'claims must be a JSON array of {step_uuid, attempt, claim_seq}' USING ERRCODE = 'TV031';
    END IF;
    SELECT format('claim #%s: %s', x.ord, x.problem) INTO v_bad
      FROM (SELECT e.ord,
                   CASE
                       WHEN jsonb_typeof(e.c) <> 'object' THEN 'must be a JSON object'
                       WHEN coalesce(e.c->>'step_uuid', '') !~* '^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$'
                           THEN 'step_uuid must be a uuid'
                       WHEN NOT tasker._is_int_json(e.c->'attempt', 1) THEN 'attempt must be an integer >= 1'
                       WHEN NOT tasker._is_int_json(e.c->'claim_seq', 0)
                           THEN 'claim_seq is required: the integer claim token claim_steps returned for this claim'
                   END AS problem
              FROM jsonb_array_elements(p_claims) WITH ORDINALITY e(c, ord)) x
     WHERE x.problem IS NOT NULL
     ORDER BY x.ord
     LIMIT 1;
    IF v_bad IS NOT NULL THEN
        RAISE EXCEPTION '%', v_bad USING ERRCODE = 'TV031';
    END IF;
    RETURN QUERY
    SELECT e.ord::integer, (e.c->>'step_uuid')::uuid, (e.c->>'attempt')::integer, (e.c->>'claim_seq')::integer
      FROM jsonb_array_elements(p_claims) WITH ORDINALITY e(c, ord);
END
$$;

-- Locks the live messages of the given steps that are still in progress at the given
-- attempts, in lock order: by queue, then msg_id. Each queue's messages are locked by one
-- lookup on that queue alone (queue = $1 AND msg_id = ANY ($2): the primary key, with no join
-- for a plan to order): a join of the messages with the steps, planned once per session on a
-- near-empty queue, walked the whole queue per message or re-read the steps per message.
-- extend_leases and release_steps take their locks here first; complete_and_claim runs the
-- same loop inline (change both together).
--
-- Message lookups joined to a set of steps (a claim's lease, an acknowledgement, a lease
-- extension, a release) also carry `m.msg_id = ANY (ARRAY(SELECT msg_id FROM <the set>))`:
-- the leading column of the primary key bounded by the set, whatever join order a plan made
-- on tiny statistics picks. Without it, a generic plan took `queue = $1` (the primary key's
-- second column, which bounds nothing in a queue's own partition) as its only index condition
-- and joined the set per message: while a snapshot was held, each acknowledgement of 200 steps
-- walked every dead entry of the queue, 60,000 buffers and seconds per call (the xmin bench).
CREATE FUNCTION tasker._lock_step_messages(p_steps uuid[], p_attempts integer[]) RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
    v_queue text;
    v_ids   bigint[];
BEGIN
    FOR v_queue, v_ids IN
        SELECT t.namespace, array_agg(s.msg_id ORDER BY s.msg_id)
          FROM unnest(p_steps, p_attempts) c(step_uuid, attempt)
          JOIN tasker.steps s ON s.step_uuid = c.step_uuid
          JOIN tasker.tasks t ON t.task_uuid = s.task_uuid
         WHERE s.state = 'in_progress' AND s.attempts = c.attempt AND s.msg_id IS NOT NULL
         GROUP BY t.namespace
         ORDER BY t.namespace
    LOOP
        PERFORM 1 FROM tasker.queue_messages m
          WHERE m.queue = v_queue AND m.msg_id = ANY (v_ids)
          ORDER BY m.msg_id
            FOR UPDATE;
    END LOOP;
END
$$;
ALTER FUNCTION tasker._lock_step_messages(uuid[], integer[]) SET plan_cache_mode = force_generic_plan;
ALTER FUNCTION tasker._lock_step_messages(uuid[], integer[]) SET enable_seqscan = off;

-- Locks the messages of the given claims (_lock_step_messages). extend_leases and
-- release_steps then re-check each claim's fence on the step in a new statement (a fence read
-- through a join is not re-checked after waiting for a lock).
CREATE FUNCTION tasker._lock_claim_messages(p_claims jsonb) RETURNS void
LANGUAGE sql AS $$
    SELECT tasker._lock_step_messages(array_agg(c.step_uuid), array_agg(c.attempt))
      FROM tasker._parse_claims(p_claims) c
$$;

-- Heartbeat for many steps in one call: pushes each still-current claim's lease to
-- now + p_lease_seconds. One row per claim, in input order; extended = false means the claim
-- is gone (lease lost and reclaimed, step cancelled, or checkpointed): its outcome will be stale.
CREATE FUNCTION tasker.extend_leases(p_claims jsonb, p_lease_seconds double precision)
RETURNS TABLE (step_uuid uuid, extended boolean, lease_expires_at timestamptz)
LANGUAGE plpgsql AS $$
#variable_conflict use_column
DECLARE
    v_lease timestamptz;
BEGIN
    IF p_lease_seconds IS NULL OR p_lease_seconds <= 0 OR p_lease_seconds > 31536000 THEN
        RAISE EXCEPTION 'lease_seconds must be > 0 and at most a year, got %', p_lease_seconds USING ERRCODE = 'TV002';
    END IF;
    PERFORM tasker._lock_claim_messages(p_claims);
    v_lease := clock_timestamp() + make_interval(secs => p_lease_seconds);
    RETURN QUERY
    WITH c AS (
        SELECT * FROM tasker._parse_claims(p_claims)
    ),
    -- MATERIALIZED: both keys of each message come from one relation (see
    -- _lock_claim_messages)
    current_claims AS MATERIALIZED (
        SELECT c.ord, t.namespace, s.msg_id
          FROM c
          JOIN tasker.steps s ON s.step_uuid = c.step_uuid
          JOIN tasker.tasks t ON t.task_uuid = s.task_uuid
         WHERE s.state = 'in_progress' AND s.attempts = c.attempt
           AND s.claim_seq = c.claim_seq
           AND NOT s.continuation
    ),
    upd AS (
        UPDATE tasker.queue_messages m
           SET vt = v_lease
          FROM current_claims cc
         WHERE m.queue = cc.namespace AND m.msg_id = cc.msg_id
           AND m.msg_id = ANY (ARRAY(SELECT x.msg_id FROM current_claims x))
        RETURNING cc.ord
    )
    SELECT c.step_uuid, upd.ord IS NOT NULL, CASE WHEN upd.ord IS NOT NULL THEN v_lease END
      FROM c LEFT JOIN (SELECT DISTINCT upd.ord FROM upd) upd ON upd.ord = c.ord
     ORDER BY c.ord;
END
$$;
ALTER FUNCTION tasker.extend_leases(jsonb, double precision) SET plan_cache_mode = force_generic_plan;
ALTER FUNCTION tasker.extend_leases(jsonb, double precision) SET enable_seqscan = off;
COMMENT ON FUNCTION tasker.extend_leases(jsonb,double precision) IS
    'Heartbeat: extends the leases of fenced claims still held by the caller.';

-- Hands back claims whose handler never started: at graceful shutdown (reason 'shutdown'),
-- because the worker has no handler for the step (reason 'handler_missing', during a
-- rolling deploy), or because the answer that handed them to the worker was lost (reason
-- 'handoff_lost', from complete_and_claim). The attempt the claim started is given back (a checkpoint continuation goes
-- back to waiting for its continuation) and the message becomes visible after p_delay_seconds
-- (0 to 3600) for another worker. A step handed back for a missing handler again and again
-- (no worker has it) waits twice as long each time, up to 5 minutes (or p_delay_seconds when
-- longer), so a worker without the handler does not churn claims and audit rows. The 'released' transition names the worker and the reason;
-- a handler_missing release also records the handler in the worker's tasker.workers row
-- (first sighting kept), so step_readiness can say who lacked it since when. One row per
-- claim, in input order.
CREATE FUNCTION tasker.release_steps(
    p_claims jsonb, p_delay_seconds double precision DEFAULT 0, p_reason text DEFAULT 'shutdown',
    p_worker_id text DEFAULT NULL
)
RETURNS TABLE (step_uuid uuid, released boolean)
LANGUAGE plpgsql AS $$
#variable_conflict use_column
DECLARE
    v_now timestamptz := clock_timestamp();
    v_vt  timestamptz;
BEGIN
    IF p_delay_seconds IS NULL OR NOT p_delay_seconds BETWEEN 0 AND 3600 THEN
        RAISE EXCEPTION 'delay_seconds must be between 0 and 3600, got %', coalesce(p_delay_seconds::text, 'NULL')
            USING ERRCODE = 'TV002';
    END IF;
    IF p_reason IS NULL OR p_reason NOT IN ('shutdown', 'handler_missing', 'handoff_lost') THEN
        RAISE EXCEPTION 'reason must be shutdown, handler_missing or handoff_lost, got %', coalesce(quote_literal(p_reason), 'NULL')
            USING ERRCODE = 'TV002';
    END IF;
    IF octet_length(p_worker_id) > 200 THEN
        RAISE EXCEPTION 'worker_id must be at most 200 bytes' USING ERRCODE = 'TV002';
    END IF;
    v_vt := v_now + make_interval(secs => p_delay_seconds);
    PERFORM tasker._lock_claim_messages(p_claims);
    RETURN QUERY
    WITH c AS (
        SELECT pc.*,
               CASE WHEN p_reason = 'handler_missing' THEN
                   v_now + make_interval(secs => least(
                       p_delay_seconds * 2 ^ least((SELECT count(*) FROM tasker.step_transitions tr
                                                     WHERE tr.step_uuid = pc.step_uuid AND tr.event = 'released'
                                                       AND tr.metadata->>'reason' = 'handler_missing'), 10),
                       greatest(p_delay_seconds, 300)))
                    ELSE v_vt
               END AS vt
          FROM tasker._parse_claims(p_claims) pc
    ),
    upd AS (
        UPDATE tasker.steps s
           SET attempts = s.attempts - CASE WHEN s.claim_spent_attempt THEN 1 ELSE 0 END,
               state = CASE
                   WHEN NOT s.claim_spent_attempt THEN 'in_progress'
                   WHEN s.attempts - 1 = 0 THEN 'enqueued'
                   ELSE 'waiting_for_retry'
               END,
               continuation = NOT s.claim_spent_attempt,
               claim_spent_attempt = false,
               next_attempt_at = CASE WHEN s.claim_spent_attempt AND s.attempts - 1 > 0 THEN c.vt END,
               worker_id = NULL,
               updated_at = v_now
          FROM c
         WHERE s.step_uuid = c.step_uuid
           AND s.state = 'in_progress' AND s.attempts = c.attempt
           AND s.claim_seq = c.claim_seq
           AND NOT s.continuation
        RETURNING c.ord, s.step_uuid, s.task_uuid, s.state, s.attempts, s.msg_id, s.named_step_id, c.vt
    ),
    -- both keys of each message from one relation (see _lock_claim_messages)
    keys AS MATERIALIZED (
        SELECT t.namespace, upd.msg_id, upd.vt
          FROM upd JOIN tasker.tasks t ON t.task_uuid = upd.task_uuid
    ),
    msgs AS (
        UPDATE tasker.queue_messages m
           SET vt = k.vt
          FROM keys k
         WHERE m.queue = k.namespace AND m.msg_id = k.msg_id
           AND m.msg_id = ANY (ARRAY(SELECT x.msg_id FROM keys x))
        RETURNING m.queue
    ),
    audit AS (
        INSERT INTO tasker.step_transitions (step_uuid, task_uuid, from_state, to_state, event, attempt,
                                             worker_id, error_summary, metadata, created_at)
        SELECT upd.step_uuid, upd.task_uuid, 'in_progress', upd.state, 'released', upd.attempts, p_worker_id,
               CASE WHEN p_reason = 'handler_missing'
                    THEN format('handler_missing: worker %s has no handler %s', coalesce(p_worker_id, '?'), ns.handler) END,
               jsonb_build_object('reason', p_reason, 'handler', ns.handler,
                                  'delay_seconds', round(extract(epoch FROM upd.vt - v_now)::numeric, 3)),
               v_now
          FROM upd JOIN tasker.named_steps ns ON ns.named_step_id = upd.named_step_id
    ),
    missing AS (
        UPDATE tasker.workers w
           SET missing_handlers = h.handlers || w.missing_handlers
          FROM (SELECT jsonb_object_agg(ns.handler, to_jsonb(v_now)) AS handlers
                  FROM upd JOIN tasker.named_steps ns ON ns.named_step_id = upd.named_step_id) h
         WHERE p_reason = 'handler_missing' AND w.worker_id = p_worker_id AND h.handlers IS NOT NULL
    ),
    notified AS (
        SELECT count(pg_notify('tasker_' || q.queue, '')) AS n
          FROM (SELECT DISTINCT msgs.queue FROM msgs) q
         WHERE p_delay_seconds = 0
    )
    SELECT c.step_uuid, upd.ord IS NOT NULL
      FROM c
      LEFT JOIN upd ON upd.ord = c.ord
     CROSS JOIN notified
     ORDER BY c.ord;
END
$$;
ALTER FUNCTION tasker.release_steps(jsonb, double precision, text, text) SET plan_cache_mode = force_generic_plan;
ALTER FUNCTION tasker.release_steps(jsonb, double precision, text, text) SET enable_seqscan = off;
COMMENT ON FUNCTION tasker.release_steps(jsonb,double precision,text,text) IS
    'Hands back fenced claims whose handlers never started (shutdown, or handler_missing after a delay), without spending an attempt.';
