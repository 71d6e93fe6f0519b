-- Dynamic steps: what a decision or batchable step's outcome creates, inside the transaction
-- that commits the outcome (complete_steps, resolve_step). A decision creates the children it
-- chose and the steps downstream of them all of whose parents exist; a batchable step creates
-- one worker per cursor config ({worker_template}_{batch_id}); every deferred_convergence step
-- that lists a created step is created (once) and depends on the listed steps that exist. A
-- convergence's pending_parents counts its created listed steps not yet complete plus the listed
-- steps not created that can still be created (_convergence_pending); it is recomputed, under
-- the convergence rows' locks and in a statement of its own (a fresh snapshot), whenever a
-- decision or fan-out applies. Applications in one task are serialised by a transaction-level
-- advisory lock (_lock_dynamic), taken after the deciding steps' rows and before any child
-- step: two decisions of one task never compute the same convergence from two snapshots.

-- Serialises the application of decisions and fan-outs per task (in task_uuid order).
CREATE FUNCTION tasker._lock_dynamic(p_tasks uuid[]) RETURNS void
LANGUAGE sql AS $$
    SELECT count(pg_advisory_xact_lock(hashtextextended('tasker.dynamic:' || t::text, 0)))::integer * 0
      FROM (SELECT DISTINCT t FROM unnest(p_tasks) t WHERE t IS NOT NULL ORDER BY 1) x
$$;

-- Why a decision or batchable step's result cannot be applied, as a permanent-failure error
-- object (NULL when it can): error_type invalid_decision_outcome / invalid_batch_outcome, the
-- message naming the offending name or field.
CREATE FUNCTION tasker._dynamic_outcome_error(p_step uuid, p_result jsonb) RETURNS jsonb
LANGUAGE plpgsql STABLE AS $$
DECLARE
    v_task   uuid;
    v_tpl    bigint;
    v_name   text;
    v_type   text;
    v_out    jsonb;
    v_kind   text;
    v_bad    text;
    v_names  text[];
    v_plan   text[];
    v_limit  bigint;
    v_etype  text;
    v_worker text;
BEGIN
    SELECT s.task_uuid, n.named_task_id, n.name, n.step_type INTO v_task, v_tpl, v_name, v_type
      FROM tasker.steps s JOIN tasker.named_steps n ON n.named_step_id = s.named_step_id
     WHERE s.step_uuid = p_step;
    IF v_type = 'decision' THEN
        v_etype := 'invalid_decision_outcome';
        v_out := CASE WHEN jsonb_typeof(p_result) = 'object' THEN p_result->'decision_point_outcome' END;
        v_kind := CASE WHEN jsonb_typeof(v_out) = 'object' THEN v_out->>'type' END;
        IF v_out IS NULL OR jsonb_typeof(v_out) <> 'object' THEN
            v_bad := 'a decision step''s result needs a decision_point_outcome object ({"type": "create_steps", "step_names": [...]} or {"type": "no_branches"})';
        ELSIF v_kind IS DISTINCT FROM 'create_steps' AND v_kind IS DISTINCT FROM 'no_branches' THEN
            v_bad := format('decision_point_outcome.type must be create_steps or no_branches, got %s',
                            left(coalesce((v_out->'type')::text, 'nothing'), 100));
        ELSIF v_kind = 'create_steps' THEN
            IF jsonb_typeof(v_out->'step_names') IS DISTINCT FROM 'array'
               OR EXISTS (SELECT 1 FROM jsonb_array_elements(v_out->'step_names') e WHERE jsonb_typeof(e) <> 'string') THEN
                v_bad := 'decision_point_outcome.step_names must be a list of step names';
            ELSIF jsonb_array_length(v_out->'step_names') = 0 THEN
                v_bad := 'decision_point_outcome.step_names is empty: a decision that takes no branch returns {"type": "no_branches"} instead (decision_no_branches(reason) in Python)';
            ELSE
                v_names := ARRAY(SELECT DISTINCT e FROM jsonb_array_elements_text(v_out->'step_names') e);
                SELECT format('decision_point_outcome.step_names names %s, which is not a step this decision can create (its children: %s)',
                              quote_literal(left(x, 200)),
                              coalesce((SELECT string_agg(c.name, ', ' ORDER BY c.step_index) FROM tasker.named_steps c
                                         WHERE c.named_task_id = v_tpl AND v_name = ANY (c.parent_names)
                                           AND c.step_type <> 'deferred_convergence'), 'none'))
                  INTO v_bad
                  FROM jsonb_array_elements_text(v_out->'step_names') WITH ORDINALITY e(x, ord)
                 WHERE NOT EXISTS (SELECT 1 FROM tasker.named_steps c
                                    WHERE c.named_task_id = v_tpl AND c.name = e.x AND v_name = ANY (c.parent_names)
                                      AND c.step_type <> 'deferred_convergence')
                 ORDER BY e.ord LIMIT 1;
                IF v_bad IS NULL THEN
                    v_plan := tasker._decision_plan(v_task, v_tpl, v_names);
                    v_limit := tasker._setting_int('max_steps_per_decision');
                    IF cardinality(v_plan) > v_limit THEN
                        v_bad := format('the decision would create %s steps, more than the limit of %s (max_steps_per_decision in tasker.settings)',
                                        cardinality(v_plan), v_limit);
                    END IF;
                END IF;
            END IF;
        END IF;
    ELSIF v_type = 'batchable' THEN
        v_etype := 'invalid_batch_outcome';
        v_out := CASE WHEN jsonb_typeof(p_result) = 'object' THEN p_result->'batch_processing_outcome' END;
        v_kind := CASE WHEN jsonb_typeof(v_out) = 'object' THEN v_out->>'type' END;
        IF v_out IS NULL OR jsonb_typeof(v_out) <> 'object' THEN
            v_bad := 'a batchable step''s result needs a batch_processing_outcome object ({"type": "create_batches", ...} or {"type": "no_batches"})';
        ELSIF v_kind IS DISTINCT FROM 'create_batches' AND v_kind IS DISTINCT FROM 'no_batches' THEN
            v_bad := format('batch_processing_outcome.type must be create_batches or no_batches, got %s',
                            left(coalesce((v_out->'type')::text, 'nothing'), 100));
        ELSIF (v_kind = 'create_batches' OR v_out ? 'worker_template_name')
              AND NOT EXISTS (SELECT 1 FROM tasker.named_steps c
                               WHERE c.named_task_id = v_tpl AND c.step_type = 'batch_worker'
                                 AND c.parent_names = ARRAY[v_name]
                                 AND c.name = v_out->>'worker_template_name'
                                 AND jsonb_typeof(v_out->'worker_template_name') = 'string') THEN
            v_bad := format('batch_processing_outcome.worker_template_name %s is not a batch_worker step of this batchable step (its workers: %s)',
                            left(coalesce((v_out->'worker_template_name')::text, 'missing'), 200),
                            coalesce((SELECT string_agg(c.name, ', ' ORDER BY c.step_index) FROM tasker.named_steps c
                                       WHERE c.named_task_id = v_tpl AND c.step_type = 'batch_worker'
                                         AND c.parent_names = ARRAY[v_name]), 'none'));
        ELSIF jsonb_typeof(v_out->'batch_metadata') NOT IN ('object', 'null') THEN
            v_bad := 'batch_processing_outcome.batch_metadata must be an object';
        ELSIF v_kind = 'create_batches' THEN
            v_limit := tasker._setting_int('max_batch_workers');
            IF jsonb_typeof(v_out->'cursor_configs') IS DISTINCT FROM 'array' OR jsonb_array_length(v_out->'cursor_configs') = 0 THEN
                v_bad := 'batch_processing_outcome.cursor_configs must be a non-empty list (use {"type": "no_batches"} for nothing to do)';
            ELSIF jsonb_array_length(v_out->'cursor_configs') > v_limit THEN
                v_bad := format('batch_processing_outcome.cursor_configs has %s entries, more than the limit of %s workers per batchable step (max_batch_workers in tasker.settings)',
                                jsonb_array_length(v_out->'cursor_configs'), v_limit);
            ELSE
                SELECT format('batch_processing_outcome.cursor_configs[%s]: %s', e.ord - 1,
                              CASE WHEN jsonb_typeof(e.c) <> 'object' THEN 'must be an object'
                                   WHEN jsonb_typeof(e.c->'batch_id') IS DISTINCT FROM 'string'
                                        OR e.c->>'batch_id' !~ '^[A-Za-z0-9_-]{1,64}$'
                                       THEN format('batch_id %s must be a string of 1 to 64 letters, digits, _ and -',
                                                   left(coalesce((e.c->'batch_id')::text, 'missing'), 100))
                                   ELSE format('batch_id %s is used twice', quote_literal(e.c->>'batch_id'))
                              END)
                  INTO v_bad
                  FROM (SELECT x.c, x.ord, count(*) OVER (PARTITION BY x.c->>'batch_id') AS uses
                          FROM jsonb_array_elements(v_out->'cursor_configs') WITH ORDINALITY x(c, ord)) e
                 WHERE jsonb_typeof(e.c) <> 'object' OR jsonb_typeof(e.c->'batch_id') IS DISTINCT FROM 'string'
                    OR e.c->>'batch_id' !~ '^[A-Za-z0-9_-]{1,64}$' OR e.uses > 1
                 ORDER BY e.ord LIMIT 1;
            END IF;
        END IF;
        -- A worker is named {worker_template}_{batch_id} (no_batches: _000). A name that is
        -- already a step of the template or of the task would be taken twice (the insert would
        -- skip it): refuse it, naming the step. Only a current claim's outcome gets here (a
        -- resent one is stale), so the workers of this very outcome are never found.
        IF v_bad IS NULL THEN
            -- the worker template _apply_dynamic picks
            SELECT n.name INTO v_worker FROM tasker.named_steps n
             WHERE n.named_task_id = v_tpl AND n.step_type = 'batch_worker' AND n.parent_names = ARRAY[v_name]
             ORDER BY (n.name = v_out->>'worker_template_name') DESC, n.step_index
             LIMIT 1;
            SELECT CASE WHEN x.cfg IS NULL
                        THEN format('the no-op worker of no_batches would be named %s, the name of step %s already in this %s',
                                    quote_literal(x.nm), quote_literal(x.nm), x.place)
                        ELSE format('batch_processing_outcome.cursor_configs[%s]: the worker would be named %s (worker_template_name + ''_'' + batch_id), the name of step %s already in this %s; choose batch_ids that make new names',
                                    x.ord - 1, quote_literal(x.nm), quote_literal(x.nm), x.place)
                   END
              INTO v_bad
              FROM (SELECT w.nm, w.cfg, w.ord,
                           CASE WHEN EXISTS (SELECT 1 FROM tasker.named_steps n WHERE n.named_task_id = v_tpl AND n.name = w.nm)
                                THEN 'template'
                                WHEN EXISTS (SELECT 1 FROM tasker.steps s WHERE s.task_uuid = v_task AND s.name = w.nm)
                                THEN 'task'
                           END AS place
                      FROM (SELECT v_worker || '_' || coalesce(c.cfg->>'batch_id', '000') AS nm, c.cfg, c.ord
                              FROM (SELECT e.c AS cfg, e.ord FROM jsonb_array_elements(v_out->'cursor_configs') WITH ORDINALITY e(c, ord)
                                     WHERE v_kind = 'create_batches'
                                    UNION ALL
                                    SELECT NULL, 1 WHERE v_kind = 'no_batches') c) w) x
             WHERE x.place IS NOT NULL
             ORDER BY x.ord
             LIMIT 1;
        END IF;
    ELSE
        RETURN NULL;
    END IF;
    IF v_bad IS NULL THEN
        RETURN NULL;
    END IF;
    RETURN jsonb_build_object('message', format('step %s: %s', v_name, v_bad), 'error_type', v_etype,
                              'error_code', v_etype, 'retryable', false);
END
$$;

-- The steps a decision choosing p_chosen creates in a task: the chosen ones, then, repeatedly,
-- every standard/decision/batchable template step not created yet all of whose parents exist
-- or are planned (children of decisions only when chosen; convergences and workers apart).
CREATE FUNCTION tasker._decision_plan(p_task uuid, p_named_task bigint, p_chosen text[]) RETURNS text[]
LANGUAGE plpgsql STABLE AS $$
DECLARE
    v_all     text[];
    v_more    text[];
    v_created text[];
BEGIN
    v_created := ARRAY(SELECT s.name FROM tasker.steps s WHERE s.task_uuid = p_task);
    v_all := ARRAY(SELECT c FROM unnest(p_chosen) c WHERE NOT c = ANY (v_created));
    LOOP
        v_more := ARRAY(
            SELECT n.name FROM tasker.named_steps n
             WHERE n.named_task_id = p_named_task
               AND n.step_type IN ('standard', 'decision', 'batchable')
               AND cardinality(n.parent_names) > 0
               AND NOT n.name = ANY (v_all) AND NOT n.name = ANY (v_created)
               AND n.parent_names <@ (v_all || v_created)
               AND n.parent_names && v_all
               AND NOT EXISTS (SELECT 1 FROM tasker.named_steps p
                                WHERE p.named_task_id = p_named_task AND p.name = ANY (n.parent_names)
                                  AND p.step_type = 'decision'));
        EXIT WHEN cardinality(v_more) = 0;
        v_all := v_all || v_more;
    END LOOP;
    RETURN v_all;
END
$$;

-- The template steps of a task that are not created and can still be created: a batch_worker
-- whose batchable step is created and not applied (complete or resolved) or can still be
-- created; a child of a decision likewise of its decision; a deferred_convergence any of whose
-- listed steps is created or possible; any other step all of whose dependencies are.
CREATE FUNCTION tasker._possible_steps(p_task uuid) RETURNS text[]
LANGUAGE plpgsql STABLE AS $$
DECLARE
    v_tpl      bigint;
    v_created  text[];
    v_open     text[];  -- created and not applied
    v_possible text[] := '{}';
    v_more     text[];
BEGIN
    SELECT t.named_task_id INTO v_tpl FROM tasker.tasks t WHERE t.task_uuid = p_task;
    SELECT coalesce(array_agg(DISTINCT n.name), '{}'),
           coalesce(array_agg(DISTINCT n.name) FILTER (WHERE s.state NOT IN ('complete', 'resolved_manually')), '{}')
      INTO v_created, v_open
      FROM tasker.steps s JOIN tasker.named_steps n ON n.named_step_id = s.named_step_id
     WHERE s.task_uuid = p_task;
    LOOP
        v_more := ARRAY(
            SELECT n.name FROM tasker.named_steps n
              LEFT JOIN LATERAL (SELECT p.name FROM tasker.named_steps p
                                  WHERE p.named_task_id = v_tpl AND p.name = ANY (n.parent_names)
                                    AND p.step_type IN ('decision', 'batchable') LIMIT 1) d ON true
             WHERE n.named_task_id = v_tpl
               AND NOT n.name = ANY (v_created) AND NOT n.name = ANY (v_possible)
               AND CASE
                       WHEN n.step_type = 'deferred_convergence'
                           THEN n.parent_names && (v_created || v_possible)
                       -- a worker (of its batchable) or a child of a decision
                       WHEN d.name IS NOT NULL AND (n.step_type = 'batch_worker' OR
                            EXISTS (SELECT 1 FROM tasker.named_steps p WHERE p.named_task_id = v_tpl
                                       AND p.name = d.name AND p.step_type = 'decision'))
                           THEN d.name = ANY (v_open) OR d.name = ANY (v_possible)
                       ELSE n.parent_names <@ (v_created || v_possible)
                   END);
        EXIT WHEN cardinality(v_more) = 0;
        v_possible := v_possible || v_more;
    END LOOP;
    RETURN v_possible;
END
$$;

-- For each deferred_convergence step of a task: the value its pending_parents must have (its
-- created listed steps not complete or resolved, plus its listed steps not created that can
-- still be created).
CREATE FUNCTION tasker._convergence_pending(p_task uuid)
RETURNS TABLE (step_uuid uuid, pending integer)
LANGUAGE plpgsql STABLE AS $$
#variable_conflict use_column
DECLARE
    v_possible text[] := tasker._possible_steps(p_task);
BEGIN
    RETURN QUERY
    SELECT c.step_uuid,
           ((SELECT count(*) FROM tasker.steps s
             WHERE s.task_uuid = p_task
               AND s.named_step_id = ANY (ARRAY(SELECT ln.named_step_id FROM tasker.named_steps ln
                                                 WHERE ln.named_task_id = n.named_task_id AND ln.name = ANY (n.parent_names)))
               AND s.state NOT IN ('complete', 'resolved_manually'))
            + (SELECT count(*) FROM unnest(n.parent_names) pn WHERE pn = ANY (v_possible)))::integer
      FROM tasker.steps c
      JOIN tasker.named_steps n ON n.named_step_id = c.named_step_id
     WHERE c.task_uuid = p_task AND n.step_type = 'deferred_convergence';
END
$$;

-- Locks, in step_uuid order, the existing deferred_convergence steps of the given tasks (and
-- the given other steps): the "child steps" link of the lock order, taken in one statement.
CREATE FUNCTION tasker._lock_convergences(p_tasks uuid[], p_also uuid[]) RETURNS void
LANGUAGE sql AS $$
    SELECT count(*)::integer * 0 FROM (
        SELECT s.step_uuid
          FROM tasker.steps s
         WHERE s.step_uuid = ANY (p_also)
            OR (s.task_uuid = ANY (p_tasks)
                AND s.named_step_id IN (SELECT n.named_step_id FROM tasker.named_steps n
                                         JOIN tasker.tasks t ON t.named_task_id = n.named_task_id
                                        WHERE t.task_uuid = ANY (p_tasks) AND n.step_type = 'deferred_convergence'))
         ORDER BY s.step_uuid
           FOR UPDATE OF s) x
$$;

-- Inserts steps (pending, counters from their parents' states, edges from the parents that
-- exist), ON CONFLICT (task_uuid, name) DO NOTHING so a repeat creates nothing twice. p_new:
-- (named_step_id, name, inputs) as a JSON array. Returns the uuids inserted.
CREATE FUNCTION tasker._insert_dynamic_steps(p_task uuid, p_new jsonb, p_now timestamptz) RETURNS uuid[]
LANGUAGE plpgsql AS $$
DECLARE
    v_ids uuid[];
BEGIN
    WITH ins AS (
        INSERT INTO tasker.steps (step_uuid, task_uuid, named_step_id, name, state, max_attempts, retryable,
                                  pending_parents, inputs, created_at, updated_at, lane, concurrency_key, rate_limit)
        SELECT tasker._uuid_v7(), p_task, n.named_step_id, x.name, 'pending', n.max_attempts, n.retryable,
               -- parents not yet satisfied (a worker's batchable step has just finished; a
               -- convergence is recomputed by the caller)
               (SELECT count(*) FROM unnest(n.parent_names) pn
                 WHERE NOT EXISTS (SELECT 1 FROM tasker.steps p
                                    WHERE p.task_uuid = p_task AND p.name = pn
                                      AND p.state IN ('complete', 'resolved_manually')))::integer,
               x.inputs, p_now, p_now,
               -- flow keys: from the task context (checked when the task was created)
               tasker._flow_key(n.lane_path, (SELECT t.context FROM tasker.tasks t WHERE t.task_uuid = p_task)),
               tasker._flow_key(n.concurrency_path, (SELECT t.context FROM tasker.tasks t WHERE t.task_uuid = p_task)),
               n.rate_limit
          FROM jsonb_to_recordset(p_new) x(named_step_id bigint, name text, inputs jsonb)
          JOIN tasker.named_steps n ON n.named_step_id = x.named_step_id
        ON CONFLICT (task_uuid, name) DO NOTHING
        RETURNING step_uuid
    )
    SELECT coalesce(array_agg(ins.step_uuid), '{}') INTO v_ids FROM ins;
    IF cardinality(v_ids) = 0 THEN
        RETURN v_ids;
    END IF;
    -- edges: from each created parent (workers: from their batchable step). The few distinct
    -- parents are looked up first, by name, and materialised: joined the other way round, a
    -- plan made from the statistics of a table of small tasks walks every step of a large
    -- task once per created step (1,000 workers: a million rows, seconds)
    WITH kids AS MATERIALIZED (
        SELECT c.step_uuid, pn AS parent_name
          FROM tasker.steps c
          JOIN tasker.named_steps n ON n.named_step_id = c.named_step_id
         CROSS JOIN unnest(n.parent_names) pn
         WHERE c.step_uuid = ANY (v_ids) AND n.step_type <> 'deferred_convergence'
    ),
    parents AS MATERIALIZED (
        SELECT p.name, p.step_uuid
          FROM tasker.steps p
         WHERE p.task_uuid = p_task AND p.name IN (SELECT DISTINCT k.parent_name FROM kids k)
    )
    INSERT INTO tasker.step_edges (parent_uuid, child_uuid)
    SELECT parents.step_uuid, kids.step_uuid
      FROM kids JOIN parents ON parents.name = kids.parent_name
    ON CONFLICT DO NOTHING;
    INSERT INTO tasker.step_transitions (step_uuid, task_uuid, from_state, to_state, event, created_at)
    SELECT u, p_task, NULL, 'pending', 'created', p_now FROM unnest(v_ids) u;
    RETURN v_ids;
END
$$;

-- Applies the outcome of decision and batchable steps that just finished (complete, or
-- resolved by an operator), in their transaction: creates the chosen steps or the workers, the
-- steps downstream of them all of whose parents exist and the convergences that list them,
-- recomputes the task's convergence counters under their locks, bumps total_steps by the
-- number of steps created (before the caller's completion check), records the decision or the
-- fan-out in task_transitions, and enqueues what is ready. A result that is not a valid
-- outcome from resolve_step counts as no_branches / no_batches; from complete_steps (which fails
-- such a step before) it is a worker name taken since the check: TV030, the batch refused. The
-- caller holds the deciding steps' rows.
CREATE FUNCTION tasker._apply_dynamic(p_steps uuid[]) RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
    v_now     timestamptz := clock_timestamp();
    r         record;
    v_out     jsonb;
    v_valid   boolean;
    v_names   text[];
    v_new     jsonb;
    v_ids     uuid[];
    v_all     uuid[];
    v_tasks   uuid[];
    v_task    uuid;
    v_more    jsonb;
    v_ready   integer;
    v_meta    jsonb;
    v_worker  record;
    v_counts  jsonb := '{}';  -- task_uuid -> steps created
    v_fresh   text[];
    v_error   jsonb;
BEGIN
    v_tasks := ARRAY(SELECT DISTINCT s.task_uuid FROM tasker.steps s WHERE s.step_uuid = ANY (p_steps) ORDER BY 1);
    PERFORM tasker._lock_dynamic(v_tasks);
    PERFORM tasker._lock_convergences(v_tasks, '{}');
    FOR r IN SELECT s.step_uuid, s.task_uuid, s.name, s.state, s.results, n.step_type, n.named_task_id, t.state AS task_state
               FROM tasker.steps s
               JOIN tasker.named_steps n ON n.named_step_id = s.named_step_id
               JOIN tasker.tasks t ON t.task_uuid = s.task_uuid
              WHERE s.step_uuid = ANY (p_steps) AND n.step_type IN ('decision', 'batchable')
                AND s.state IN ('complete', 'resolved_manually')
              ORDER BY s.task_uuid, s.step_uuid
    LOOP
        v_error := tasker._dynamic_outcome_error(r.step_uuid, r.results);
        v_valid := v_error IS NULL;
        -- complete_steps checked this outcome before it took the task's dynamic lock. What can
        -- have changed since is the task's steps: another outcome of the same batch, or of a
        -- transaction that committed meanwhile, created a worker with one of this outcome's
        -- worker names. Refuse the batch (nothing of it is applied): sent again, alone, the
        -- outcome meets the name taken and becomes the analyzer's permanent failure.
        IF NOT v_valid AND r.state = 'complete' THEN
            RAISE EXCEPTION 'the outcome of step % (%) can no longer be applied: %; send it again on its own',
                r.name, r.step_uuid, v_error->>'message' USING ERRCODE = 'TV030';
        END IF;
        v_all := '{}';
        IF r.step_type = 'decision' THEN
            v_out := CASE WHEN v_valid THEN r.results->'decision_point_outcome' END;
            v_names := CASE WHEN v_out->>'type' = 'create_steps'
                            THEN ARRAY(SELECT DISTINCT e FROM jsonb_array_elements_text(v_out->'step_names') e ORDER BY 1)
                            ELSE '{}' END;
            SELECT coalesce(jsonb_agg(jsonb_build_object('named_step_id', n.named_step_id, 'name', n.name)), '[]')
              INTO v_new
              FROM tasker.named_steps n
             WHERE n.named_task_id = r.named_task_id
               AND n.name = ANY (tasker._decision_plan(r.task_uuid, r.named_task_id, v_names));
            v_meta := jsonb_build_object('step', r.name, 'step_uuid', r.step_uuid, 'chosen', to_jsonb(v_names),
                                         'outcome', coalesce(v_out->>'type', 'no_branches'),
                                         'valid_outcome', v_valid);
        ELSE
            v_out := CASE WHEN v_valid THEN r.results->'batch_processing_outcome' END;
            SELECT n.named_step_id, n.name, n.batch_config INTO v_worker
              FROM tasker.named_steps n
             WHERE n.named_task_id = r.named_task_id AND n.step_type = 'batch_worker' AND n.parent_names = ARRAY[r.name]
             ORDER BY (n.name = v_out->>'worker_template_name') DESC, n.step_index
             LIMIT 1;
            IF v_out->>'type' = 'create_batches' THEN
                SELECT jsonb_agg(jsonb_build_object(
                           'named_step_id', v_worker.named_step_id,
                           'name', v_worker.name || '_' || (c->>'batch_id'),
                           'inputs', jsonb_build_object(
                               'cursor', c,
                               'batch_metadata', coalesce(v_worker.batch_config, '{}') || coalesce(nullif(v_out->'batch_metadata', 'null'), '{}'),
                               'is_no_op', false))
                           ORDER BY e.ord)
                  INTO v_new
                  FROM jsonb_array_elements(v_out->'cursor_configs') WITH ORDINALITY e(c, ord);
            ELSE
                v_new := jsonb_build_array(jsonb_build_object(
                    'named_step_id', v_worker.named_step_id,
                    'name', v_worker.name || '_000',
                    'inputs', jsonb_build_object(
                        'cursor', jsonb_build_object('batch_id', '000', 'start_cursor', 0, 'end_cursor', 0, 'batch_size', 0),
                        'batch_metadata', coalesce(v_worker.batch_config, '{}') || coalesce(nullif(v_out->'batch_metadata', 'null'), '{}'),
                        'is_no_op', true)));
            END IF;
            v_meta := jsonb_build_object('step', r.name, 'step_uuid', r.step_uuid, 'worker_template', v_worker.name,
                                         'workers', jsonb_array_length(v_new),
                                         'outcome', coalesce(v_out->>'type', 'no_batches'),
                                         'total_items', v_out->'total_items', 'valid_outcome', v_valid);
        END IF;
        v_ids := tasker._insert_dynamic_steps(r.task_uuid, v_new, v_now);
        v_all := v_all || v_ids;
        -- what follows from what exists now: convergences listing a created step, and the steps
        -- downstream of them all of whose parents exist, until nothing more is created
        LOOP
            -- the template names of the steps just created, and the deciding step itself: a
            -- convergence listing one of them is created (one that lists a decision is dynamic,
            -- like every step depending on a decision, and is created once the decision applies,
            -- whatever it chose)
            v_fresh := ARRAY(SELECT DISTINCT n.name FROM tasker.steps s JOIN tasker.named_steps n ON n.named_step_id = s.named_step_id
                              WHERE s.step_uuid = ANY (v_ids)) || r.name;
            SELECT jsonb_agg(jsonb_build_object('named_step_id', n.named_step_id, 'name', n.name)) INTO v_more
              FROM tasker.named_steps n
             WHERE n.named_task_id = r.named_task_id
               AND NOT EXISTS (SELECT 1 FROM tasker.steps s WHERE s.task_uuid = r.task_uuid AND s.name = n.name)
               AND CASE WHEN n.step_type = 'deferred_convergence' THEN n.parent_names && v_fresh
                        WHEN n.step_type = 'batch_worker' THEN false
                        ELSE cardinality(n.parent_names) > 0
                             AND NOT EXISTS (SELECT 1 FROM tasker.named_steps p
                                              WHERE p.named_task_id = n.named_task_id AND p.name = ANY (n.parent_names)
                                                AND p.step_type = 'decision')
                             AND NOT EXISTS (SELECT 1 FROM unnest(n.parent_names) pn
                                              WHERE NOT EXISTS (SELECT 1 FROM tasker.steps s
                                                                 WHERE s.task_uuid = r.task_uuid AND s.name = pn))
                   END;
            EXIT WHEN v_more IS NULL;
            v_ids := tasker._insert_dynamic_steps(r.task_uuid, v_more, v_now);
            EXIT WHEN cardinality(v_ids) = 0;
            v_all := v_all || v_ids;
        END LOOP;
        -- a convergence depends on every created step it lists (workers included)
        -- (the task's convergence steps first, then their listed steps: one pass over the task)
        WITH cv AS MATERIALIZED (
            SELECT c.step_uuid,
                   ARRAY(SELECT ln.named_step_id FROM tasker.named_steps ln
                          WHERE ln.named_task_id = n.named_task_id AND ln.name = ANY (n.parent_names)) AS listed
              FROM tasker.steps c
              JOIN tasker.named_steps n ON n.named_step_id = c.named_step_id
             WHERE c.task_uuid = r.task_uuid AND n.step_type = 'deferred_convergence'
        ),
        listed AS MATERIALIZED (
            SELECT p.step_uuid, p.named_step_id FROM tasker.steps p
             WHERE p.task_uuid = r.task_uuid
               AND p.named_step_id IN (SELECT unnest(cv.listed) FROM cv)
        )
        INSERT INTO tasker.step_edges (parent_uuid, child_uuid)
        SELECT l.step_uuid, cv.step_uuid
          FROM cv JOIN listed l ON l.named_step_id = ANY (cv.listed)
        ON CONFLICT DO NOTHING;
        v_counts := v_counts || jsonb_build_object(r.task_uuid::text,
                                                   coalesce((v_counts->>r.task_uuid::text)::integer, 0) + cardinality(v_all));
        INSERT INTO tasker.task_transitions (task_uuid, from_state, to_state, event, metadata, created_at)
        VALUES (r.task_uuid, r.task_state, r.task_state,
                CASE r.step_type WHEN 'decision' THEN 'decision_applied' ELSE 'batches_created' END,
                v_meta || jsonb_build_object('created_steps', cardinality(v_all)), v_now);
    END LOOP;
    -- Convergence counters: every existing convergence of these tasks is locked (above, and the
    -- new ones are ours); recompute in this statement of its own, which sees every decision and
    -- completion committed before the locks were granted.
    FOREACH v_task IN ARRAY v_tasks LOOP
        PERFORM tasker._lock_convergences(ARRAY[v_task], '{}');
        WITH upd AS (
            UPDATE tasker.steps s
               SET pending_parents = cp.pending, updated_at = v_now
              FROM tasker._convergence_pending(v_task) cp
             WHERE s.step_uuid = cp.step_uuid AND s.state = 'pending' AND s.pending_parents <> cp.pending
            RETURNING s.step_uuid
        )
        SELECT count(*) INTO v_ready FROM upd;
    END LOOP;
    -- total_steps counts created steps: bumped before the caller's completion check (tasks are
    -- the last link of the lock order)
    UPDATE tasker.tasks t SET total_steps = t.total_steps + c.value::integer, updated_at = v_now
      FROM jsonb_each_text(v_counts) c
     WHERE t.task_uuid = c.key::uuid AND c.value::integer > 0;
    -- new steps and convergences with nothing to wait for
    PERFORM tasker._enqueue_ready(
        ARRAY(SELECT s.step_uuid FROM tasker.steps s
               WHERE s.task_uuid = ANY (v_tasks) AND s.state = 'pending' AND s.pending_parents <= 0),
        'dependencies_satisfied');
END
$$;

-- Called from complete_steps: index probes whatever the statistics say (a fan-out of 1,000
-- workers into a task the statistics still call small made its edge and convergence lookups
-- walk every step of the task); see 50_claim.sql.
ALTER FUNCTION tasker._lock_dynamic(uuid[]) SET enable_seqscan = off;
ALTER FUNCTION tasker._decision_plan(uuid, bigint, text[]) SET enable_seqscan = off;
ALTER FUNCTION tasker._possible_steps(uuid) SET enable_seqscan = off;
ALTER FUNCTION tasker._convergence_pending(uuid) SET enable_seqscan = off;
ALTER FUNCTION tasker._lock_convergences(uuid[], uuid[]) SET enable_seqscan = off;
ALTER FUNCTION tasker._insert_dynamic_steps(uuid, jsonb, timestamptz) SET enable_seqscan = off;
ALTER FUNCTION tasker._apply_dynamic(uuid[]) SET enable_seqscan = off;
