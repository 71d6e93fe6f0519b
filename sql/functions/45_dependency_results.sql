-- Lazy dependency results: what a step's claim row left out. A convergence step after a batch
-- fan-out may depend on up to max_batch_workers workers whose results together are far more
-- than a claim row should carry; the claim then includes them only up to
-- max_claim_dependency_bytes (dependency_results_partial = true) and the worker pages through
-- the rest with this function, on a session of its own (tasker_pg/worker/fetching.py).

-- The results of the finished (complete or resolved_manually) steps of p_step_uuid's task that
-- are its ancestors in the template (by template step: batch workers share their
-- batch_worker template step, so every created worker counts), whose name starts with
-- p_prefix (NULL: any), after p_after (NULL: from the start), ordered by name in byte order
-- (COLLATE "C", the order of Python's str comparison), at most p_limit (1..1000) rows. Steps
-- not created, not finished or not ancestors are never returned. Read-only.
CREATE FUNCTION tasker.dependency_results(p_step_uuid uuid, p_prefix text, p_after text, p_limit integer)
RETURNS TABLE (name text, results jsonb)
LANGUAGE plpgsql STABLE AS $$
#variable_conflict use_column
DECLARE
    v_task       uuid;
    v_named_task bigint;
    v_ancestors  text[];
    v_ids        bigint[];
BEGIN
    IF p_step_uuid IS NULL THEN
        RAISE EXCEPTION 'step_uuid is required' USING ERRCODE = 'TV002';
    END IF;
    IF p_limit IS NULL OR p_limit < 1 OR p_limit > 1000 THEN
        RAISE EXCEPTION 'limit must be between 1 and 1000, got %', coalesce(p_limit::text, 'NULL')
            USING ERRCODE = 'TV002';
    END IF;
    PERFORM tasker._check_text_size(p_prefix, 'max_name_bytes', 'prefix');
    PERFORM tasker._check_text_size(p_after, 'max_name_bytes', 'after');

    SELECT s.task_uuid, ns.named_task_id, ns.ancestor_names
      INTO v_task, v_named_task, v_ancestors
      FROM tasker.steps s
      JOIN tasker.named_steps ns ON ns.named_step_id = s.named_step_id
     WHERE s.step_uuid = p_step_uuid;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'step % does not exist', p_step_uuid USING ERRCODE = 'TN004';
    END IF;
    v_ids := ARRAY(SELECT n.named_step_id FROM tasker.named_steps n
                    WHERE n.named_task_id = v_named_task AND n.name = ANY (v_ancestors));
    IF cardinality(v_ids) = 0 THEN
        RETURN;
    END IF;

    -- The task's steps by the (task_uuid, name) index, sorted in byte order: a task has its
    -- template's static steps plus its dynamic ones (workers bounded by max_batch_workers per
    -- fan-out), so the sort is small. Measured: 1,000 workers' 1 KB results in 11 pages,
    -- about 12 ms a page from the client (ordering by the index's own collation instead
    -- saves about 5 ms a page but makes the order depend on the database's collation).
    RETURN QUERY
    SELECT a.name, a.results
      FROM tasker.steps a
     WHERE a.task_uuid = v_task
       AND a.named_step_id = ANY (v_ids)
       AND a.state IN ('complete', 'resolved_manually')
       AND (p_prefix IS NULL OR starts_with(a.name, p_prefix))
       AND (p_after IS NULL OR a.name COLLATE "C" > p_after COLLATE "C")
     ORDER BY a.name COLLATE "C"
     LIMIT p_limit;
END
$$;
COMMENT ON FUNCTION tasker.dependency_results(uuid, text, text, integer) IS
    'Pages through the results of a step''s finished ancestor steps (name prefix, after a name, up to 1000 rows): what a partial claim row left out.';
