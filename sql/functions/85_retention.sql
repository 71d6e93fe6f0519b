-- Retention: a policy per namespace (set_retention_policy, clear_retention_policy,
-- retention_policies) and purge_finished(), which deletes, in bounded batches, finished tasks
-- older than their namespace's policy with everything that belongs to them. No policy keeps
-- every task forever. Tables: sql/migrations/0009_retention.sql.

-- Policies

-- A retention interval: NULL only when p_nullable, else at least p_min and at most 100 years.
CREATE FUNCTION tasker._check_retention_interval(p_value interval, p_what text, p_min interval, p_nullable boolean)
RETURNS void
LANGUAGE plpgsql IMMUTABLE AS $$
BEGIN
    IF p_value IS NULL AND p_nullable THEN
        RETURN;
    END IF;
    IF p_value IS NULL OR p_value < p_min OR p_value > interval '100 years' THEN
        RAISE EXCEPTION '% must be an interval from % to 100 years, got %', p_what, p_min,
            coalesce(p_value::text, 'NULL') USING ERRCODE = 'TV002';
    END IF;
END
$$;

-- Sets the retention policy of a namespace (replacing the one it had): finished tasks
-- (complete, cancelled, resolved_manually) are deleted keep_finished after they finished; tasks
-- left in error are deleted purge_error_after after their last change (NULL, the default, keeps
-- them); the idempotency key of a deleted task keeps returning its uuid for
-- keep_idempotency_keys (default 7 days; 0 forgets it with the task). The namespace need not
-- have templates yet. Bounds (TV002): keep_finished and purge_error_after from 1 hour to 100
-- years, keep_idempotency_keys from 0 to 100 years; the namespace follows the queue naming rule
-- (TV001).
CREATE FUNCTION tasker.set_retention_policy(
    p_namespace             text,
    p_keep_finished         interval,
    p_purge_error_after     interval DEFAULT NULL,
    p_keep_idempotency_keys interval DEFAULT interval '7 days'
) RETURNS TABLE (namespace text, keep_finished interval, purge_error_after interval,
                 keep_idempotency_keys interval, updated_at timestamptz)
LANGUAGE plpgsql AS $$
#variable_conflict use_column
BEGIN
    PERFORM tasker._validate_queue_name(p_namespace);
    PERFORM tasker._check_retention_interval(p_keep_finished, 'keep_finished', interval '1 hour', false);
    PERFORM tasker._check_retention_interval(p_purge_error_after, 'purge_error_after', interval '1 hour', true);
    PERFORM tasker._check_retention_interval(p_keep_idempotency_keys, 'keep_idempotency_keys', interval '0', false);
    RETURN QUERY
    INSERT INTO tasker.retention_policies AS r (namespace, keep_finished, purge_error_after, keep_idempotency_keys, updated_at)
    VALUES (p_namespace, p_keep_finished, p_purge_error_after, p_keep_idempotency_keys, clock_timestamp())
    ON CONFLICT (namespace) DO UPDATE
       SET keep_finished = EXCLUDED.keep_finished, purge_error_after = EXCLUDED.purge_error_after,
           keep_idempotency_keys = EXCLUDED.keep_idempotency_keys, updated_at = EXCLUDED.updated_at
    RETURNING r.namespace, r.keep_finished, r.purge_error_after, r.keep_idempotency_keys, r.updated_at;
END
$$;
COMMENT ON FUNCTION tasker.set_retention_policy(text,interval,interval,interval) IS
    'Operator: sets how long a namespace keeps finished tasks (and tasks in error, and the keys of purged tasks).';

-- Removes a namespace's policy: its tasks are kept forever again. False when it had none.
-- The keys of tasks already purged keep their expiry.
CREATE FUNCTION tasker.clear_retention_policy(p_namespace text) RETURNS boolean
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM tasker._validate_queue_name(p_namespace);
    DELETE FROM tasker.retention_policies r WHERE r.namespace = p_namespace;
    RETURN FOUND;
END
$$;
COMMENT ON FUNCTION tasker.clear_retention_policy(text) IS
    'Operator: removes a namespace''s retention policy (its tasks are kept forever again); false when it had none.';

-- Every namespace's policy, by namespace.
CREATE FUNCTION tasker.retention_policies()
RETURNS TABLE (namespace text, keep_finished interval, purge_error_after interval,
               keep_idempotency_keys interval, updated_at timestamptz)
LANGUAGE sql STABLE AS $$
    SELECT r.namespace, r.keep_finished, r.purge_error_after, r.keep_idempotency_keys, r.updated_at
      FROM tasker.retention_policies r
     ORDER BY r.namespace
$$;
COMMENT ON FUNCTION tasker.retention_policies() IS
    'The retention policy of every namespace that has one (namespaces without one keep their tasks forever).';

-- Purge

-- When a task in error last changed: its row, its last task transition, its steps' last
-- transitions (one index probe each).
CREATE FUNCTION tasker._task_last_change(p_task uuid, p_updated_at timestamptz) RETURNS timestamptz
LANGUAGE sql STABLE AS $$
    SELECT greatest(p_updated_at,
                    (SELECT tt.created_at FROM tasker.task_transitions tt
                      WHERE tt.task_uuid = p_task ORDER BY tt.transition_id DESC LIMIT 1),
                    (SELECT max(x.created_at)
                       FROM tasker.steps s
                       CROSS JOIN LATERAL (SELECT st.created_at FROM tasker.step_transitions st
                                            WHERE st.step_uuid = s.step_uuid
                                            ORDER BY st.transition_id DESC LIMIT 1) x
                      WHERE s.task_uuid = p_task))
$$;

-- Deletes one batch of at most p_batch tasks that their namespace's policy no longer keeps,
-- with their steps, edges and both transition tables, and returns the counts. A task is taken
-- when it is finished (complete, cancelled, resolved_manually) and completed_at is older than
-- keep_finished, or, with purge_error_after set, when it is in error, has not changed for that
-- long, and none of its steps is running or holds a queue message. The key of a deleted task
-- with an idempotency_key goes to tasker.idempotency_keys for keep_idempotency_keys.
--
-- It never waits and never deletes a live task: it locks the task rows with SKIP LOCKED and
-- checks them again under that lock, then locks their steps with SKIP LOCKED (a task with a step
-- it could not lock is left: an operator retrying or resolving one of them holds it). Nothing
-- else writes those rows then: a finished task's steps have no message, so no claim, outcome
-- or repair reaches them, a task in error is taken only when none of its steps has one, and an
-- operator call that waited for a step or task row it deleted finds it gone (TN003, TN004). It
-- takes no lock per task in the lock table (no advisory lock), so a large batch cannot exhaust
-- it. It also deletes, per namespace with a policy, archived messages (tasker.a_<namespace>)
-- older than keep_finished, and expired idempotency keys, p_batch of each at most. One purge
-- runs at a time (an advisory lock; a second caller gets a row of zeros at once). more = true
-- when a full batch was deleted: call again (in a new transaction) until it is false.
CREATE FUNCTION tasker.purge_finished(p_batch integer DEFAULT 1000)
RETURNS TABLE (tasks bigint, steps bigint, step_edges bigint, step_transitions bigint,
               task_transitions bigint, archived_messages bigint, idempotency_keys_kept bigint,
               idempotency_keys_expired bigint, more boolean)
LANGUAGE plpgsql AS $$
DECLARE
    v_now     timestamptz := clock_timestamp();
    v_cand    uuid[];
    v_locked  uuid[];
    v_steps   uuid[];
    v_gone    uuid[];
    v_tasks   bigint := 0;
    v_nsteps  bigint := 0;
    v_edges   bigint := 0;
    v_st      bigint := 0;
    v_tt      bigint := 0;
    v_arch    bigint := 0;
    v_kept    bigint := 0;
    v_expired bigint := 0;
BEGIN
    IF p_batch IS NULL OR p_batch < 1 OR p_batch > 100000 THEN
        RAISE EXCEPTION 'batch must be an integer from 1 to 100000, got %', coalesce(p_batch::text, 'NULL')
            USING ERRCODE = 'TV002';
    END IF;
    IF NOT pg_try_advisory_xact_lock(hashtextextended('tasker.purge_finished', 0)) THEN
        RETURN QUERY SELECT 0::bigint, 0::bigint, 0::bigint, 0::bigint, 0::bigint, 0::bigint, 0::bigint, 0::bigint, false;
        RETURN;
    END IF;

    -- 1. Candidates from a snapshot: the oldest finished tasks of each namespace with a policy
    --    (tasks_finished_idx), then tasks in error (tasks_live_idx: live tasks only).
    SELECT array_agg(c.task_uuid ORDER BY c.task_uuid) INTO v_cand
      FROM (SELECT x.task_uuid
              FROM (SELECT f.task_uuid, 0 AS kind, f.completed_at AS age
                      FROM tasker.retention_policies p
                     CROSS JOIN LATERAL (
                           SELECT t.task_uuid, t.completed_at FROM tasker.tasks t
                            WHERE t.namespace = p.namespace AND t.completed_at IS NOT NULL
                              AND t.completed_at < v_now - p.keep_finished
                            ORDER BY t.completed_at
                            LIMIT p_batch) f
                    UNION ALL
                    SELECT e.task_uuid, 1, e.updated_at
                      FROM (SELECT t.task_uuid, t.updated_at, p.purge_error_after
                              FROM tasker.tasks t
                              JOIN tasker.retention_policies p ON p.namespace = t.namespace
                             WHERE t.completed_at IS NULL AND t.state = 'error'
                               AND p.purge_error_after IS NOT NULL
                               AND t.updated_at < v_now - p.purge_error_after) e
                     WHERE tasker._task_last_change(e.task_uuid, e.updated_at) < v_now - e.purge_error_after
                       AND NOT EXISTS (SELECT 1 FROM tasker.steps s
                                        WHERE s.task_uuid = e.task_uuid
                                          AND (s.msg_id IS NOT NULL OR s.state IN ('in_progress', 'waiting')))) x
             ORDER BY x.kind, x.age
             LIMIT p_batch) c;

    IF v_cand IS NOT NULL THEN
        -- 2. The task rows, skipping locked ones, checked again under the lock.
        v_locked := ARRAY(
            SELECT t.task_uuid
              FROM tasker.tasks t
              JOIN tasker.retention_policies p ON p.namespace = t.namespace
             WHERE t.task_uuid = ANY (v_cand)
               AND ((t.state IN ('complete', 'cancelled', 'resolved_manually') AND t.completed_at IS NOT NULL
                     AND t.completed_at < v_now - p.keep_finished)
                    OR (t.state = 'error' AND t.completed_at IS NULL AND p.purge_error_after IS NOT NULL
                        AND t.updated_at < v_now - p.purge_error_after))
             ORDER BY t.task_uuid
               FOR UPDATE OF t SKIP LOCKED);

        -- 3. Their steps, skipping locked ones.
        v_steps := ARRAY(SELECT s.step_uuid FROM tasker.steps s
                          WHERE s.task_uuid = ANY (v_locked)
                          ORDER BY s.step_uuid
                            FOR UPDATE SKIP LOCKED);

        -- 4. Checked again (a new snapshot, the tasks locked): every step locked, and in a task in
        --    error none running or holding a message, and nothing changed for purge_error_after.
        v_gone := ARRAY(
            WITH locked AS MATERIALIZED (
                SELECT l.step_uuid FROM unnest(v_steps) l(step_uuid)
            ),
            left_out AS MATERIALIZED (
                SELECT DISTINCT s.task_uuid
                  FROM tasker.steps s
                  JOIN tasker.tasks t ON t.task_uuid = s.task_uuid
                 WHERE s.task_uuid = ANY (v_locked)
                   AND (NOT EXISTS (SELECT 1 FROM locked l WHERE l.step_uuid = s.step_uuid)
                        OR (t.state = 'error' AND (s.msg_id IS NOT NULL OR s.state IN ('in_progress', 'waiting'))))
            )
            SELECT t.task_uuid
              FROM tasker.tasks t
              JOIN tasker.retention_policies p ON p.namespace = t.namespace
             WHERE t.task_uuid = ANY (v_locked)
               AND NOT EXISTS (SELECT 1 FROM left_out o WHERE o.task_uuid = t.task_uuid)
               AND (t.state <> 'error'
                    OR tasker._task_last_change(t.task_uuid, t.updated_at) < v_now - p.purge_error_after)
             ORDER BY t.task_uuid);

        -- 5. Delete, each table by its index (arrays, so every probe is an index probe). Every
        --    edge joins two steps of one task, so deleting the edges whose parent goes deletes
        --    every edge of the task.
        v_steps := ARRAY(SELECT s.step_uuid FROM tasker.steps s WHERE s.task_uuid = ANY (v_gone));
        WITH del_tasks AS (
            DELETE FROM tasker.tasks t
             WHERE t.task_uuid = ANY (v_gone)
            RETURNING t.task_uuid, t.namespace, t.name, t.idempotency_key
        ),
        del_steps AS (
            DELETE FROM tasker.steps s
             WHERE s.step_uuid = ANY (v_steps)
            RETURNING s.step_uuid
        ),
        -- the places of concurrency keys that steps cancelled or resolved while they ran left
        -- behind (55_flow.sql; a completion deletes its own at once)
        del_holders AS (
            DELETE FROM tasker.flow_holders h
             WHERE h.step_uuid = ANY (v_steps)
        ),
        del_edges AS (
            DELETE FROM tasker.step_edges e
             WHERE e.parent_uuid = ANY (v_steps)
            RETURNING 1
        ),
        del_st AS (
            DELETE FROM tasker.step_transitions st
             WHERE st.step_uuid = ANY (v_steps)
            RETURNING 1
        ),
        del_tt AS (
            DELETE FROM tasker.task_transitions tt
             WHERE tt.task_uuid = ANY (v_gone)
            RETURNING 1
        ),
        keys AS (
            INSERT INTO tasker.idempotency_keys AS k (namespace, name, idempotency_key, task_uuid, expires_at)
            SELECT d.namespace, d.name, d.idempotency_key, d.task_uuid, v_now + p.keep_idempotency_keys
              FROM del_tasks d
              JOIN tasker.retention_policies p ON p.namespace = d.namespace
             WHERE d.idempotency_key IS NOT NULL AND p.keep_idempotency_keys > interval '0'
            ON CONFLICT (namespace, name, idempotency_key) DO UPDATE
               SET task_uuid = EXCLUDED.task_uuid, expires_at = EXCLUDED.expires_at
            RETURNING 1
        )
        SELECT (SELECT count(*) FROM del_tasks), (SELECT count(*) FROM del_steps),
               (SELECT count(*) FROM del_edges), (SELECT count(*) FROM del_st),
               (SELECT count(*) FROM del_tt), (SELECT count(*) FROM keys)
          INTO v_tasks, v_nsteps, v_edges, v_st, v_tt, v_kept;
    END IF;

    -- 6. Archived messages of the namespaces' queues, by age (the engine archives only messages
    --    that named no step of its own or a finished one; tasker.a_<namespace> has no index on
    --    archived_at, and is small).
    WITH old AS (
        SELECT a.queue, a.msg_id
          FROM tasker.retention_policies p
         CROSS JOIN LATERAL (SELECT a.queue, a.msg_id FROM tasker.queue_archive a
                              WHERE a.queue = p.namespace AND a.archived_at < v_now - p.keep_finished
                              LIMIT p_batch) a
         LIMIT p_batch
    ),
    del AS (
        DELETE FROM tasker.queue_archive a USING old
         WHERE a.queue = old.queue AND a.msg_id = old.msg_id
        RETURNING 1
    )
    SELECT count(*) INTO v_arch FROM del;

    -- 7. Expired keys of purged tasks.
    WITH old AS (
        SELECT k.namespace, k.name, k.idempotency_key
          FROM tasker.idempotency_keys k
         WHERE k.expires_at <= v_now
         ORDER BY k.expires_at
         LIMIT p_batch
           FOR UPDATE SKIP LOCKED
    ),
    del AS (
        DELETE FROM tasker.idempotency_keys k USING old
         WHERE k.namespace = old.namespace AND k.name = old.name AND k.idempotency_key = old.idempotency_key
           AND k.expires_at <= v_now
        RETURNING 1
    )
    SELECT count(*) INTO v_expired FROM del;

    RETURN QUERY SELECT v_tasks, v_nsteps, v_edges, v_st, v_tt, v_arch, v_kept, v_expired,
                        (v_tasks > 0 AND cardinality(v_cand) >= p_batch) OR v_arch >= p_batch OR v_expired >= p_batch;
END
$$;
COMMENT ON FUNCTION tasker.purge_finished(integer) IS
    'Deletes one batch of finished (and, by policy, long-errored) tasks older than their namespace''s retention policy, with all their rows; returns counts and whether more remain.';
