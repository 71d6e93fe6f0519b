-- Templates: register_template validates a template body with the same rules as the Python
-- loader (so SQL-only users are protected too), fills in every default, precomputes each
-- step's ancestor names and stores one row per step in tasker.named_steps.

-- Validates a template body (the same rules the Python loader applies, so SQL-only users are
-- protected too), normalises it (every default filled in) and stores it under
-- (namespace, name, version). The same body again is a no-op; a different body under an
-- existing version is an error. Creates the namespace's queue. Returns named_task_id.
CREATE FUNCTION tasker.register_template(p_template jsonb) RETURNS bigint
LANGUAGE plpgsql AS $$
DECLARE
    v_ns        text;
    v_name      text;
    v_version   text;
    v_parts     text[];
    v_steps     jsonb;
    v_norm      jsonb;
    v_key       text;
    v_id        bigint;
    v_existing  jsonb;
    v_bad       text;
    v_index     jsonb;      -- step name -> 0-based position in v_norm
    v_count     integer;
    v_names     text[];     -- by position (1-based below)
    v_pending   integer[];  -- dependencies not yet placed, by position
    v_child     integer[];  -- child positions, sorted by parent position
    v_parent    integer[];  -- the parent position of each entry of v_child
    v_first     integer[];
    v_order     integer[];  -- positions in topological order
    v_head      integer;
    v_pos       integer;
    v_edge      integer;
    v_kid       integer;
    v_anc       varbit[];   -- by position: its ancestors as bits
    v_list      jsonb[];    -- by position: its ancestors' names
    v_bits      varbit;
    v_zero      varbit;
    v_cycle     text[];
    v_cur       text;
    v_too_big   text;
    v_dynamic   boolean[];  -- by position: not created with the task
    v_init_lim  bigint := tasker._setting_int('max_initialization_bytes');
    v_name_lim  bigint := tasker._setting_int('max_name_bytes');
    v_text_lim  bigint := tasker._setting_int('max_text_bytes');
    v_schedules jsonb;      -- the declared schedules, normalised (87_schedules.sql); NULL: none
    v_flow      jsonb;      -- the template's flow settings (concurrency, fairness, rate_limit), normalised
BEGIN
    IF p_template IS NULL OR jsonb_typeof(p_template) <> 'object' THEN
        RAISE EXCEPTION 'a task template must be a JSON object' USING ERRCODE = 'TV010';
    END IF;
    FOR v_key IN SELECT jsonb_object_keys(p_template) LOOP
        IF v_key NOT IN ('name', 'namespace_name', 'version', 'description', 'metadata', 'steps', 'schedules',
                         'concurrency', 'fairness', 'rate_limit') THEN
            RAISE EXCEPTION 'unknown key % in task template (valid: name, namespace_name, version, description, metadata, steps, schedules, concurrency, fairness, rate_limit)',
                quote_literal(left(v_key, 200)) USING ERRCODE = 'TV010';
        END IF;
    END LOOP;
    FOREACH v_key IN ARRAY ARRAY['name', 'namespace_name', 'version'] LOOP
        IF jsonb_typeof(p_template->v_key) IS DISTINCT FROM 'string' THEN
            RAISE EXCEPTION 'template % % is invalid: a task template needs name, namespace_name and version, each a string',
                v_key, coalesce(left((p_template->v_key)::text, 200), 'NULL') USING ERRCODE = 'TV010';
        END IF;
    END LOOP;
    v_ns := p_template->>'namespace_name';
    v_name := p_template->>'name';
    v_version := p_template->>'version';
    IF v_ns !~ '^[a-z][a-z0-9_]{0,46}$' THEN
        RAISE EXCEPTION 'template namespace_name % is invalid: 1 to 47 lowercase letters, digits and _, starting with a letter',
            quote_literal(left(v_ns, 200)) USING ERRCODE = 'TV010';
    END IF;
    IF v_name !~ '^[A-Za-z][A-Za-z0-9_.-]{0,127}$' THEN
        RAISE EXCEPTION 'template name % is invalid: letters, digits, _, - and ., starting with a letter, at most 128',
            quote_literal(left(v_name, 200)) USING ERRCODE = 'TV010';
    END IF;
    v_parts := tasker._semver_parts(v_version);
    IF v_parts IS NULL THEN
        RAISE EXCEPTION 'template % version % is invalid: expected a semantic version MAJOR.MINOR.PATCH such as 1.0.0 (numbers without leading zeros, each at most 2147483647), optionally with a pre-release such as 1.2.0-rc.1 (dot-separated identifiers of letters, digits and -, none empty, numeric ones without leading zeros); at most 64 characters%',
            v_name, quote_literal(left(v_version, 200)),
            CASE WHEN v_version LIKE '%+%' THEN '; build metadata (+...) is not accepted: semver ignores it when ordering versions, so the newest version would be ambiguous' ELSE '' END
            USING ERRCODE = 'TV010';
    END IF;
    IF jsonb_typeof(p_template->'metadata') NOT IN ('object', 'null') THEN
        RAISE EXCEPTION 'template %: metadata must be an object', v_name USING ERRCODE = 'TV010';
    END IF;
    IF tasker._has_huge_number(p_template->'metadata') THEN
        RAISE EXCEPTION 'template %: metadata holds a number too large for a double (such as 1e400)', v_name
            USING ERRCODE = 'TV010';
    END IF;
    IF jsonb_typeof(p_template->'description') NOT IN ('string', 'null') THEN
        RAISE EXCEPTION 'template %: description must be a string', v_name USING ERRCODE = 'TV010';
    END IF;
    -- Sizes, by the length of each value's text form (limits in tasker.settings): each step's
    -- handler (its initialization is sent to the worker with every claim of the step) and
    -- description, then the template's description and its whole body.
    SELECT format('template %s, step %s: %s is %s bytes, more than the limit of %s bytes (%s in tasker.settings)',
                  v_name, coalesce(quote_literal(left(x.s->>'name', 128)), '#' || x.ord), x.what, x.bytes, x.lim, x.setting)
      INTO v_too_big
      FROM (SELECT e.ord, e.s, v.rank, v.what, v.bytes, v.setting, v.lim
              FROM jsonb_array_elements(CASE WHEN jsonb_typeof(p_template->'steps') = 'array'
                                             THEN p_template->'steps' ELSE '[]' END) WITH ORDINALITY e(s, ord)
              CROSS JOIN LATERAL (VALUES
                  (1, 'handler.initialization', octet_length((e.s->'handler'->'initialization')::text),
                   'max_initialization_bytes', v_init_lim),
                  (2, 'handler.callable', octet_length(e.s->'handler'->>'callable'), 'max_name_bytes', v_name_lim),
                  (3, 'description', octet_length(e.s->>'description'), 'max_text_bytes', v_text_lim)
              ) v(rank, what, bytes, setting, lim)) x
     WHERE x.bytes > x.lim
     ORDER BY x.ord, x.rank
     LIMIT 1;
    IF v_too_big IS NOT NULL THEN
        RAISE EXCEPTION '%', v_too_big USING ERRCODE = 'TV021';
    END IF;
    PERFORM tasker._check_json_size(p_template, 'max_template_bytes', format('template %s', v_name));
    PERFORM tasker._check_text_size(p_template->>'description', 'max_text_bytes', format('template %s: description', v_name));
    v_steps := p_template->'steps';
    IF v_steps IS NULL OR jsonb_typeof(v_steps) <> 'array' OR jsonb_array_length(v_steps) = 0 THEN
        RAISE EXCEPTION 'template % has no steps: steps must be a non-empty list', v_name USING ERRCODE = 'TV010';
    END IF;
    IF jsonb_array_length(v_steps) > 1000 THEN
        RAISE EXCEPTION 'template % has % steps; at most 1000 are allowed', v_name, jsonb_array_length(v_steps)
            USING ERRCODE = 'TV010';
    END IF;

    -- Per-step structure, names and defaults (the first bad step, in declared order, is named).
    SELECT jsonb_agg(tasker._normalise_step(e.step, e.ord::integer, v_name) ORDER BY e.ord) INTO v_norm
      FROM jsonb_array_elements(v_steps) WITH ORDINALITY e(step, ord);
    SELECT jsonb_object_agg(x.name, x.ord - 1) INTO v_index
      FROM (SELECT e.step->>'name' AS name, min(e.ord) AS ord
              FROM jsonb_array_elements(v_norm) WITH ORDINALITY e(step, ord)
             GROUP BY e.step->>'name') x;

    -- Names and dependencies, set-based (a 1000-step template is checked in milliseconds).
    SELECT format('template %s: duplicate step name %L', v_name, x.name) INTO v_bad
      FROM (SELECT e.step->>'name' AS name, e.ord
              FROM jsonb_array_elements(v_norm) WITH ORDINALITY e(step, ord)) x
     WHERE (v_index->>x.name)::integer <> x.ord - 1
     ORDER BY x.ord
     LIMIT 1;
    IF v_bad IS NULL THEN
        SELECT CASE WHEN d.dep = e.step->>'name'
                    THEN format('template %s: step %L depends on itself', v_name, d.dep)
                    ELSE format('template %s: step %L depends on unknown step %L (steps: %s)', v_name,
                                e.step->>'name', left(d.dep, 200),
                                (SELECT string_agg(s->>'name', ', ') FROM jsonb_array_elements(v_norm) s))
               END INTO v_bad
          FROM jsonb_array_elements(v_norm) WITH ORDINALITY e(step, ord)
         CROSS JOIN LATERAL jsonb_array_elements_text(e.step->'dependencies') WITH ORDINALITY d(dep, dord)
         WHERE d.dep = e.step->>'name' OR NOT v_index ? d.dep
         ORDER BY e.ord, d.dord
         LIMIT 1;
    END IF;
    IF v_bad IS NOT NULL THEN
        RAISE EXCEPTION '%', v_bad USING ERRCODE = 'TV010';
    END IF;

    -- Topological pass (Kahn): place the steps whose dependencies are all placed, finding
    -- children through one child list sorted by parent, so the work is linear in steps plus
    -- edges (the old peel-and-rescan loop and per-step scans of every ancestor pair were cubic
    -- in the depth of a chain). Positions are 1-based declared order.
    v_count := jsonb_array_length(v_norm);
    v_names := ARRAY(SELECT e.step->>'name' FROM jsonb_array_elements(v_norm) WITH ORDINALITY e(step, ord) ORDER BY e.ord);
    v_pending := ARRAY(SELECT jsonb_array_length(e.step->'dependencies')
                         FROM jsonb_array_elements(v_norm) WITH ORDINALITY e(step, ord) ORDER BY e.ord);
    SELECT coalesce(array_agg(x.child ORDER BY x.parent, x.child), '{}'),
           coalesce(array_agg(x.parent ORDER BY x.parent, x.child), '{}')
      INTO v_child, v_parent
      FROM (SELECT (v_index->>d)::integer + 1 AS parent, e.ord::integer AS child
              FROM jsonb_array_elements(v_norm) WITH ORDINALITY e(step, ord)
             CROSS JOIN jsonb_array_elements_text(e.step->'dependencies') d) x;
    -- v_first[p] .. v_first[p + 1] - 1: where the children of p are in v_child
    v_first := array_fill(0, ARRAY[v_count + 1]);
    FOREACH v_pos IN ARRAY v_parent LOOP
        v_first[v_pos + 1] := v_first[v_pos + 1] + 1;
    END LOOP;
    v_first[1] := 1;
    FOR v_pos IN 2 .. v_count + 1 LOOP
        v_first[v_pos] := v_first[v_pos - 1] + v_first[v_pos];
    END LOOP;
    -- Ancestors ride along: a step is taken only once every parent is, so its set is final
    -- when its children receive it. v_list holds the names (a single parent's list plus that
    -- parent, copied in C), v_anc the same set as bits (bit p - 1: step p) so that a second
    -- parent adds only the ancestors the child does not have yet.
    v_zero := repeat('0', v_count)::varbit;
    v_anc := array_fill(v_zero, ARRAY[v_count]);
    v_list := array_fill(NULL::jsonb, ARRAY[v_count]);
    v_order := ARRAY(SELECT p.i::integer FROM unnest(v_pending) WITH ORDINALITY p(n, i) WHERE p.n = 0 ORDER BY p.i);
    v_head := 1;
    WHILE v_head <= cardinality(v_order) LOOP
        v_pos := v_order[v_head];
        v_head := v_head + 1;
        FOR v_edge IN v_first[v_pos] .. v_first[v_pos + 1] - 1 LOOP
            v_kid := v_child[v_edge];
            v_bits := set_bit(v_anc[v_pos], v_pos - 1, 1);
            IF v_list[v_kid] IS NULL THEN
                v_list[v_kid] := coalesce(v_list[v_pos], '[]') || to_jsonb(v_names[v_pos]);
                v_anc[v_kid] := v_bits;
            ELSE
                v_bits := v_bits & ~v_anc[v_kid];
                IF v_bits <> v_zero THEN
                    v_list[v_kid] := v_list[v_kid] || (
                        SELECT jsonb_agg(a.name ORDER BY a.i)
                          FROM unnest(v_names, string_to_array(v_bits::text, NULL)) WITH ORDINALITY a(name, bit, i)
                         WHERE a.bit = '1');
                    v_anc[v_kid] := v_anc[v_kid] | v_bits;
                END IF;
            END IF;
            v_pending[v_kid] := v_pending[v_kid] - 1;
            IF v_pending[v_kid] = 0 THEN
                v_order := v_order || v_kid;
            END IF;
        END LOOP;
    END LOOP;

    -- A cycle: the steps never placed lie on or behind one. From the first of them (declared
    -- order) follow the first dependency that is not placed either until a name repeats; that
    -- stretch is a cycle.
    IF cardinality(v_order) < v_count THEN
        v_cur := v_names[array_position(ARRAY(SELECT n > 0 FROM unnest(v_pending) n), true)];
        v_cycle := ARRAY[v_cur];
        LOOP
            SELECT x.d INTO v_cur
              FROM jsonb_array_elements_text(v_norm->((v_index->>v_cur)::integer)->'dependencies') WITH ORDINALITY x(d, o)
             WHERE v_pending[(v_index->>x.d)::integer + 1] > 0
             ORDER BY x.o
             LIMIT 1;
            IF v_cur = ANY (v_cycle) THEN
                v_cycle := v_cycle[array_position(v_cycle, v_cur):] || v_cur;
                EXIT;
            END IF;
            v_cycle := v_cycle || v_cur;
        END LOOP;
        RAISE EXCEPTION 'template %: dependency cycle %', v_name, array_to_string(v_cycle, ' -> ')
            USING ERRCODE = 'TV010';
    END IF;

    -- Step types: the rules of decisions, batches and convergences, and which steps are
    -- dynamic (created at run time, not with the task). Standard-only templates skip this.
    IF EXISTS (SELECT 1 FROM jsonb_array_elements(v_norm) e WHERE e->>'type' <> 'standard') THEN
        v_dynamic := tasker._template_dynamic(v_norm, v_name, v_order);
    ELSE
        v_dynamic := array_fill(false, ARRAY[v_count]);
    END IF;

    v_norm := jsonb_build_object(
        'name', v_name, 'namespace_name', v_ns, 'version', v_version,
        'description', p_template->'description',
        'metadata', coalesce(p_template->'metadata', '{}'::jsonb),
        'steps', v_norm);
    -- schedules: present in the body only when some are declared
    v_schedules := tasker._normalise_schedules(p_template->'schedules', v_name);
    IF v_schedules IS NOT NULL THEN
        v_norm := v_norm || jsonb_build_object('schedules', v_schedules);
    END IF;
    -- flow control declared for every step (a step's own settings replace these, key by key)
    v_flow := tasker._normalise_flow(p_template, format('template %s', v_name));
    v_norm := v_norm || v_flow;
    v_bad := (SELECT format('template %s: rate limit %L (step %L) does not exist: create it first with tasker.set_rate_limit(name, per_second, burst)',
                            v_name, coalesce(e.step->>'rate_limit', v_flow->>'rate_limit'), e.step->>'name')
                FROM jsonb_array_elements(v_norm->'steps') e(step)
               WHERE coalesce(e.step->>'rate_limit', v_flow->>'rate_limit') IS NOT NULL
                 AND e.step->>'type' NOT IN ('wait_for_event', 'sleep')
                 AND NOT EXISTS (SELECT 1 FROM tasker.rate_limits r WHERE r.name = coalesce(e.step->>'rate_limit', v_flow->>'rate_limit'))
               LIMIT 1);
    IF v_bad IS NOT NULL THEN
        RAISE EXCEPTION '%', v_bad USING ERRCODE = 'TV010';
    END IF;

    -- One registration per (namespace, name, version) at a time.
    PERFORM pg_advisory_xact_lock(hashtextextended('tasker.register_template:' || v_ns || '/' || v_name || '/' || v_version, 0));
    SELECT nt.named_task_id, nt.template INTO v_id, v_existing
      FROM tasker.named_tasks nt
     WHERE nt.namespace = v_ns AND nt.name = v_name AND nt.version = v_version;
    IF FOUND THEN
        IF v_existing = v_norm THEN
            PERFORM tasker.create_queue(v_ns);
            RETURN v_id;
        END IF;
        RAISE EXCEPTION 'template %/% version % is already registered with a different body; templates are immutable: register the change as a new version',
            v_ns, v_name, v_version USING ERRCODE = 'TV011';
    END IF;

    INSERT INTO tasker.named_tasks (namespace, name, version, version_major, version_minor, version_patch,
                                    version_pre, version_pre_key, description, template, step_count, has_flow)
    VALUES (v_ns, v_name, v_version, v_parts[1]::integer, v_parts[2]::integer, v_parts[3]::integer,
            v_parts[4], tasker._semver_pre_key(v_parts[4]), p_template->>'description', v_norm,
            -- the steps created with a task
            (SELECT count(*) FILTER (WHERE NOT d) FROM unnest(v_dynamic) d),
            v_flow <> '{}' OR EXISTS (SELECT 1 FROM jsonb_array_elements(v_norm->'steps') e(step)
                                       WHERE e.step ?| ARRAY['concurrency', 'fairness', 'rate_limit']))
    RETURNING named_task_id INTO v_id;

    INSERT INTO tasker.named_steps (named_task_id, step_index, name, description, handler, config, step_type,
                                    parent_names, ancestor_names, retryable, max_attempts, backoff,
                                    backoff_base_ms, max_backoff_ms, jitter, timeout_seconds, is_dynamic,
                                    batch_config, wait_config, concurrency_path, concurrency_limit, lane_path,
                                    rate_limit)
    SELECT v_id, (s.ord - 1)::integer, s.step->>'name', s.step->>'description',
           s.step->'handler'->>'callable', coalesce(s.step->'handler'->'initialization', '{}'), s.step->>'type',
           ARRAY(SELECT jsonb_array_elements_text(s.step->'dependencies')),
           ARRAY(SELECT jsonb_array_elements_text(coalesce(v_list[s.ord], '[]'))),
           (s.step->'retry'->>'retryable')::boolean, (s.step->'retry'->>'max_attempts')::integer,
           s.step->'retry'->>'backoff', (s.step->'retry'->>'backoff_base_ms')::integer,
           (s.step->'retry'->>'max_backoff_ms')::integer, (s.step->'retry'->>'jitter')::double precision,
           (s.step->>'timeout_seconds')::double precision, v_dynamic[s.ord], s.step->'batch_config',
           -- wait steps: their wait settings (sql/functions/88_waits.sql)
           CASE WHEN s.step->>'type' IN ('wait_for_event', 'sleep')
                THEN (SELECT jsonb_object_agg(w.key, w.value) FROM jsonb_each(s.step) w
                       WHERE w.key IN ('event', 'key', 'timeout_seconds', 'on_timeout', 'default', 'duration_seconds', 'until')
                         AND jsonb_typeof(w.value) <> 'null')
           END,
           -- flow control (55_flow.sql): the step's own settings, else the template's; none for
           -- wait steps (they run no handler)
           f.flow->'concurrency'->>'key', (f.flow->'concurrency'->>'limit')::integer,
           coalesce(f.flow->'fairness'->>'key', f.flow->'concurrency'->>'key'), f.flow->>'rate_limit'
      FROM jsonb_array_elements(v_norm->'steps') WITH ORDINALITY s(step, ord)
     CROSS JOIN LATERAL (SELECT CASE WHEN s.step->>'type' IN ('wait_for_event', 'sleep') THEN '{}'::jsonb
                                     ELSE v_flow || (s.step - ARRAY(SELECT k FROM jsonb_object_keys(s.step) k
                                                                    WHERE k NOT IN ('concurrency', 'fairness', 'rate_limit')))
                                END AS flow) f;

    IF EXISTS (SELECT 1 FROM jsonb_array_elements(v_norm->'steps') e WHERE e->>'type' = 'batch_worker') THEN
        UPDATE tasker.named_steps n
           SET worker_ancestor_ids = ARRAY(SELECT w.named_step_id FROM tasker.named_steps w
                                            WHERE w.named_task_id = v_id AND w.step_type = 'batch_worker'
                                              AND w.name = ANY (n.ancestor_names) ORDER BY 1)
         WHERE n.named_task_id = v_id;
    END IF;

    PERFORM tasker._declare_schedules(v_ns, v_name, v_version, v_schedules);
    PERFORM tasker.create_queue(v_ns);
    RETURN v_id;
END
$$;
COMMENT ON FUNCTION tasker.register_template(jsonb) IS
    'Validates, normalises and stores a task template version; creates its namespace queue.';

-- The rules of step types (each TV010 naming the step; the Python loader applies the same
-- ones) and, by position, whether each step is dynamic: a batch_worker; a step depending on a
-- decision; a deferred_convergence all of whose listed steps are dynamic; any other step with
-- a dynamic dependency. p_order: positions (1-based) in topological order.
CREATE FUNCTION tasker._template_dynamic(p_steps jsonb, p_template text, p_order integer[]) RETURNS boolean[]
LANGUAGE plpgsql IMMUTABLE AS $$
DECLARE
    v_bad  text;
    v_type jsonb;  -- step name -> type
    v_dyn  jsonb := '{}';
    v_pos  integer;
    v_step jsonb;
BEGIN
    SELECT jsonb_object_agg(e->>'name', e->>'type') INTO v_type FROM jsonb_array_elements(p_steps) e;
    WITH st AS (
        SELECT x.ord, x.s->>'name' AS name, x.s->>'type' AS type,
               ARRAY(SELECT jsonb_array_elements_text(x.s->'dependencies')) AS deps
          FROM jsonb_array_elements(p_steps) WITH ORDINALITY x(s, ord)
    )
    SELECT format('template %s, step %L: %s', p_template, st.name, p.problem) INTO v_bad
      FROM st
     CROSS JOIN LATERAL (SELECT CASE
           WHEN st.type = 'decision' AND cardinality(st.deps) = 0
               THEN 'a decision step needs at least one dependency (the step whose result it decides on)'
           WHEN st.type <> 'deferred_convergence' AND cardinality(st.deps) > 1
                AND EXISTS (SELECT 1 FROM unnest(st.deps) d WHERE v_type->>d = 'decision')
               THEN 'a step that depends on a decision depends on nothing else (join branches with a deferred_convergence step)'
           WHEN st.type = 'batch_worker' AND (cardinality(st.deps) <> 1 OR v_type->>st.deps[1] <> 'batchable')
               THEN 'a batch_worker step is not downstream of a batchable step: it needs exactly one dependency, a batchable step'
           WHEN st.type = 'batchable' AND NOT EXISTS (
                    SELECT 1 FROM st c WHERE c.type = 'batch_worker' AND st.name = ANY (c.deps))
               THEN 'a batchable step needs at least one batch_worker step depending on it'
           WHEN st.type <> 'deferred_convergence'
                AND EXISTS (SELECT 1 FROM unnest(st.deps) d WHERE v_type->>d = 'batch_worker')
               THEN 'only a deferred_convergence step can depend on a batch_worker step'
           WHEN st.type = 'deferred_convergence' AND cardinality(st.deps) = 0
               THEN 'a deferred_convergence step must list at least one step it may follow'
       END AS problem) p
     WHERE p.problem IS NOT NULL
     ORDER BY st.ord
     LIMIT 1;
    IF v_bad IS NOT NULL THEN
        RAISE EXCEPTION '%', v_bad USING ERRCODE = 'TV010';
    END IF;
    -- dynamic, in topological order (every dependency is decided before its children)
    FOREACH v_pos IN ARRAY p_order LOOP
        v_step := p_steps->(v_pos - 1);
        v_dyn := v_dyn || jsonb_build_object(v_step->>'name',
            CASE
                WHEN v_step->>'type' = 'batch_worker' THEN true
                WHEN EXISTS (SELECT 1 FROM jsonb_array_elements_text(v_step->'dependencies') d
                              WHERE v_type->>d = 'decision') THEN true
                WHEN v_step->>'type' = 'deferred_convergence'
                    THEN NOT EXISTS (SELECT 1 FROM jsonb_array_elements_text(v_step->'dependencies') d
                                      WHERE NOT (v_dyn->d)::boolean)
                ELSE EXISTS (SELECT 1 FROM jsonb_array_elements_text(v_step->'dependencies') d
                              WHERE (v_dyn->d)::boolean)
            END);
    END LOOP;
    RETURN ARRAY(SELECT (v_dyn->(e->>'name'))::boolean
                   FROM jsonb_array_elements(p_steps) WITH ORDINALITY x(e, ord) ORDER BY x.ord);
END
$$;

-- Checks one template step and returns it with every default filled in (used by
-- register_template; errors name the template, the step and the rule).
CREATE FUNCTION tasker._normalise_step(p_step jsonb, p_index integer, p_template text) RETURNS jsonb
LANGUAGE plpgsql IMMUTABLE AS $$
DECLARE
    v_name    text;
    v_key     text;
    v_handler jsonb;
    v_retry   jsonb;
    v_deps    jsonb;
    v_type    text;
    v_max     jsonb;
    v_backoff text;
    v_where   text;
    v_batch   jsonb;
    v_wait    jsonb;
    v_flow    jsonb;
BEGIN
    IF jsonb_typeof(p_step) IS DISTINCT FROM 'object' THEN
        RAISE EXCEPTION 'template %: step #% must be an object', p_template, p_index USING ERRCODE = 'TV010';
    END IF;
    v_name := p_step->>'name';
    -- a JSON true or 12 reads as the text 'true' or '12': the name must be a JSON string
    IF jsonb_typeof(p_step->'name') IS DISTINCT FROM 'string' OR v_name !~ '^[A-Za-z_][A-Za-z0-9_.-]{0,127}$' THEN
        RAISE EXCEPTION 'template %: step #% has an invalid name %: letters, digits, _, - and ., starting with a letter or _',
            p_template, p_index,
            CASE WHEN jsonb_typeof(p_step->'name') = 'string' THEN quote_literal(left(v_name, 200))
                 ELSE coalesce(left((p_step->'name')::text, 200), 'NULL') END USING ERRCODE = 'TV010';
    END IF;
    v_where := format('template %s, step %L', p_template, v_name);
    FOR v_key IN SELECT jsonb_object_keys(p_step) LOOP
        IF v_key NOT IN ('name', 'description', 'handler', 'dependencies', 'depends_on', 'retry', 'timeout_seconds', 'type', 'batch_config',
                         'event', 'key', 'on_timeout', 'default', 'duration_seconds', 'until',
                         'concurrency', 'fairness', 'rate_limit') THEN
            RAISE EXCEPTION '%: unknown key % (valid: name, description, handler, dependencies, retry, timeout_seconds, type, batch_config, event, key, on_timeout, default, duration_seconds, until, concurrency, fairness, rate_limit)',
                v_where, quote_literal(left(v_key, 200)) USING ERRCODE = 'TV010';
        END IF;
    END LOOP;
    v_type := coalesce(p_step->>'type', 'standard');
    IF jsonb_typeof(p_step->'type') NOT IN ('string', 'null')
       OR v_type NOT IN ('standard', 'decision', 'batchable', 'batch_worker', 'deferred_convergence', 'wait_for_event', 'sleep') THEN
        RAISE EXCEPTION '%: step type % is not valid (valid: standard, decision, batchable, batch_worker, deferred_convergence, wait_for_event, sleep)',
            v_where, CASE WHEN jsonb_typeof(p_step->'type') = 'string' THEN quote_literal(left(v_type, 200))
                          ELSE left((p_step->'type')::text, 200) END USING ERRCODE = 'TV010';
    END IF;
    v_batch := tasker._normalise_batch_config(nullif(p_step->'batch_config', 'null'::jsonb), v_type, v_where);
    v_wait := tasker._normalise_wait(p_step, v_type, v_where);
    v_flow := tasker._normalise_flow(p_step, v_where);
    IF v_flow <> '{}' AND v_type IN ('wait_for_event', 'sleep') THEN
        RAISE EXCEPTION '%: a % step runs no handler: concurrency, fairness and rate_limit do not apply to it', v_where, v_type
            USING ERRCODE = 'TV010';
    END IF;
    v_handler := p_step->'handler';
    IF v_type IN ('wait_for_event', 'sleep') THEN
        IF jsonb_typeof(v_handler) IS DISTINCT FROM 'null' AND v_handler IS NOT NULL THEN
            RAISE EXCEPTION '%: a % step runs no handler: remove handler', v_where, v_type USING ERRCODE = 'TV010';
        END IF;
        v_handler := jsonb_build_object('callable', 'x');  -- passes the checks below; stored as null
    END IF;
    IF jsonb_typeof(v_handler) IS DISTINCT FROM 'object' OR jsonb_typeof(v_handler->'callable') IS DISTINCT FROM 'string'
       OR btrim(v_handler->>'callable') = '' OR btrim(v_handler->>'callable') <> v_handler->>'callable' THEN
        RAISE EXCEPTION '%: handler.callable is required (the handler name a worker runs, without surrounding spaces)', v_where USING ERRCODE = 'TV010';
    END IF;
    SELECT k INTO v_key FROM jsonb_object_keys(v_handler) k WHERE k NOT IN ('callable', 'initialization') LIMIT 1;
    IF v_key IS NOT NULL THEN
        RAISE EXCEPTION '%: unknown key % in the handler (valid: callable, initialization)', v_where,
            quote_literal(left(v_key, 200)) USING ERRCODE = 'TV010';
    END IF;
    IF v_handler ? 'initialization' AND jsonb_typeof(v_handler->'initialization') NOT IN ('object', 'null') THEN
        RAISE EXCEPTION '%: handler.initialization must be an object', v_where USING ERRCODE = 'TV010';
    END IF;
    IF tasker._has_huge_number(v_handler->'initialization') THEN
        RAISE EXCEPTION '%: handler.initialization holds a number too large for a double (such as 1e400)', v_where
            USING ERRCODE = 'TV010';
    END IF;
    v_deps := coalesce(p_step->'dependencies', p_step->'depends_on', '[]'::jsonb);
    IF jsonb_typeof(v_deps) = 'null' THEN
        v_deps := '[]';
    END IF;
    IF jsonb_typeof(v_deps) <> 'array' OR EXISTS (SELECT 1 FROM jsonb_array_elements(v_deps) d WHERE jsonb_typeof(d) <> 'string') THEN
        RAISE EXCEPTION '%: dependencies must be a list of step names', v_where USING ERRCODE = 'TV010';
    END IF;
    IF (SELECT count(DISTINCT d) <> count(*) FROM jsonb_array_elements_text(v_deps) d) THEN
        RAISE EXCEPTION '%: a dependency is listed twice', v_where USING ERRCODE = 'TV010';
    END IF;
    v_retry := coalesce(p_step->'retry', '{}'::jsonb);
    IF jsonb_typeof(v_retry) = 'null' THEN
        v_retry := '{}';
    END IF;
    IF jsonb_typeof(v_retry) <> 'object' THEN
        RAISE EXCEPTION '%: retry must be an object', v_where USING ERRCODE = 'TV010';
    END IF;
    FOR v_key IN SELECT jsonb_object_keys(v_retry) LOOP
        IF v_key NOT IN ('retryable', 'max_attempts', 'backoff', 'backoff_base_ms', 'max_backoff_ms', 'jitter') THEN
            RAISE EXCEPTION '%: unknown retry key % (valid: retryable, max_attempts, backoff, backoff_base_ms, max_backoff_ms, jitter)',
                v_where, quote_literal(left(v_key, 200)) USING ERRCODE = 'TV010';
        END IF;
    END LOOP;
    v_max := coalesce(v_retry->'max_attempts', '3');
    IF NOT tasker._is_int_json(v_max, 1) THEN
        RAISE EXCEPTION '%: retry.max_attempts must be an integer >= 1, got % (at most 2147483647)', v_where, left(v_max::text, 100)
            USING ERRCODE = 'TV010';
    END IF;
    v_backoff := coalesce(v_retry->>'backoff', 'exponential');
    IF v_retry ? 'backoff' AND jsonb_typeof(v_retry->'backoff') <> 'string' THEN
        v_backoff := left((v_retry->'backoff')::text, 100);  -- null or a non-string: refused below
    END IF;
    IF v_backoff NOT IN ('exponential', 'linear', 'fixed', 'none') THEN
        RAISE EXCEPTION '%: retry.backoff must be exponential, linear, fixed or none, got %', v_where, quote_literal(left(v_backoff, 200))
            USING ERRCODE = 'TV010';
    END IF;
    IF v_retry ? 'retryable' AND jsonb_typeof(v_retry->'retryable') <> 'boolean' THEN
        RAISE EXCEPTION '%: retry.retryable must be true or false, got %', v_where, left((v_retry->'retryable')::text, 100)
            USING ERRCODE = 'TV010';
    END IF;
    FOREACH v_key IN ARRAY ARRAY['backoff_base_ms', 'max_backoff_ms'] LOOP
        IF v_retry ? v_key AND NOT tasker._is_int_json(v_retry->v_key, 0) THEN
            RAISE EXCEPTION '%: retry.% must be an integer number of milliseconds from 0 to 2147483647, got %',
                v_where, v_key, left((v_retry->v_key)::text, 100) USING ERRCODE = 'TV010';
        END IF;
    END LOOP;
    IF v_retry ? 'jitter' AND (jsonb_typeof(v_retry->'jitter') <> 'number' OR NOT tasker._is_number_json(v_retry->'jitter', 0, 1)) THEN
        RAISE EXCEPTION '%: retry.jitter must be a number from 0 to 1, got %', v_where, left((v_retry->'jitter')::text, 100)
            USING ERRCODE = 'TV010';
    END IF;
    IF coalesce((v_retry->>'max_backoff_ms')::numeric, 60000) < coalesce((v_retry->>'backoff_base_ms')::numeric, 1000) THEN
        RAISE EXCEPTION '%: retry.max_backoff_ms must be >= backoff_base_ms', v_where USING ERRCODE = 'TV010';
    END IF;
    IF p_step ? 'dependencies' AND p_step ? 'depends_on' THEN
        RAISE EXCEPTION '%: give dependencies or depends_on, not both', v_where USING ERRCODE = 'TV010';
    END IF;
    IF jsonb_typeof(p_step->'description') NOT IN ('string', 'null') THEN
        RAISE EXCEPTION '%: description must be a string', v_where USING ERRCODE = 'TV010';
    END IF;
    IF NOT tasker._is_number_json(p_step->'timeout_seconds', 0, 31536000)
       OR jsonb_typeof(p_step->'timeout_seconds') = 'number' AND (p_step->>'timeout_seconds')::numeric = 0 THEN
        RAISE EXCEPTION '%: timeout_seconds must be a number of seconds > 0 and at most 31536000 (a year), got %',
            v_where, left((p_step->'timeout_seconds')::text, 100) USING ERRCODE = 'TV010';
    END IF;
    RETURN jsonb_build_object(
        'name', v_name,
        'description', p_step->'description',
        'handler', CASE WHEN v_wait IS NOT NULL THEN 'null'::jsonb ELSE jsonb_build_object(
            'callable', v_handler->'callable',
            'initialization', coalesce(nullif(v_handler->'initialization', 'null'::jsonb), '{}'::jsonb)) END,
        'dependencies', v_deps,
        'retry', jsonb_build_object(
            'retryable', coalesce(v_retry->'retryable', 'true'::jsonb),
            'max_attempts', v_max,
            'backoff', to_jsonb(v_backoff),
            'backoff_base_ms', coalesce(v_retry->'backoff_base_ms', '1000'::jsonb),
            'max_backoff_ms', coalesce(v_retry->'max_backoff_ms', '60000'::jsonb),
            'jitter', coalesce(v_retry->'jitter', '0'::jsonb)),
        'timeout_seconds', coalesce(p_step->'timeout_seconds', 'null'::jsonb),
        'type', to_jsonb(v_type))
        -- only batch workers carry a batch_config (other steps' bodies are unchanged)
        || CASE WHEN v_type = 'batch_worker' THEN jsonb_build_object('batch_config', v_batch) ELSE '{}' END
        -- only wait steps carry their wait settings (timeout_seconds above is a wait's timeout)
        || coalesce(v_wait - 'timeout_seconds', '{}')
        -- flow control: only the settings given
        || v_flow;
END
$$;

-- The flow control settings of a template or a step (sql/functions/55_flow.sql), normalised: only
-- those given (not null). concurrency: {key: a $.path into the task context, limit: 1 to
-- 1000000}; fairness: {key: a $.path}; rate_limit: the name of a tasker.rate_limits row. The
-- Python loader (tasker_pg/template.py) applies the same rules.
CREATE FUNCTION tasker._normalise_flow(p_obj jsonb, p_where text) RETURNS jsonb
LANGUAGE plpgsql IMMUTABLE AS $$
DECLARE
    v_out  jsonb := '{}';
    v_val  jsonb;
    v_key  text;
    v_path text := '^\$(\.[A-Za-z_][A-Za-z0-9_]*){1,16}$';
BEGIN
    v_val := nullif(p_obj->'concurrency', 'null'::jsonb);
    IF v_val IS NOT NULL THEN
        IF jsonb_typeof(v_val) <> 'object' THEN
            RAISE EXCEPTION '%: concurrency must be an object {key: $.path, limit: n}', p_where USING ERRCODE = 'TV010';
        END IF;
        SELECT k INTO v_key FROM jsonb_object_keys(v_val) k WHERE k NOT IN ('key', 'limit') LIMIT 1;
        IF v_key IS NOT NULL THEN
            RAISE EXCEPTION '%: unknown key % in concurrency (valid: key, limit)', p_where, quote_literal(left(v_key, 200))
                USING ERRCODE = 'TV010';
        END IF;
        IF jsonb_typeof(v_val->'key') IS DISTINCT FROM 'string' OR v_val->>'key' !~ v_path THEN
            RAISE EXCEPTION '%: concurrency.key must be a path into the task context such as $.customer_id (at most 16 names), got %',
                p_where, coalesce(left((v_val->'key')::text, 200), 'nothing') USING ERRCODE = 'TV010';
        END IF;
        IF NOT tasker._is_int_json(v_val->'limit', 1) OR (v_val->>'limit')::numeric > 1000000 THEN
            RAISE EXCEPTION '%: concurrency.limit must be an integer from 1 to 1000000, got %',
                p_where, coalesce(left((v_val->'limit')::text, 100), 'nothing') USING ERRCODE = 'TV010';
        END IF;
        v_out := v_out || jsonb_build_object('concurrency', jsonb_build_object('key', v_val->'key', 'limit', v_val->'limit'));
    END IF;
    v_val := nullif(p_obj->'fairness', 'null'::jsonb);
    IF v_val IS NOT NULL THEN
        IF jsonb_typeof(v_val) <> 'object' THEN
            RAISE EXCEPTION '%: fairness must be an object {key: $.path}', p_where USING ERRCODE = 'TV010';
        END IF;
        SELECT k INTO v_key FROM jsonb_object_keys(v_val) k WHERE k <> 'key' LIMIT 1;
        IF v_key IS NOT NULL THEN
            RAISE EXCEPTION '%: unknown key % in fairness (valid: key)', p_where, quote_literal(left(v_key, 200))
                USING ERRCODE = 'TV010';
        END IF;
        IF jsonb_typeof(v_val->'key') IS DISTINCT FROM 'string' OR v_val->>'key' !~ v_path THEN
            RAISE EXCEPTION '%: fairness.key must be a path into the task context such as $.tenant (at most 16 names), got %',
                p_where, coalesce(left((v_val->'key')::text, 200), 'nothing') USING ERRCODE = 'TV010';
        END IF;
        v_out := v_out || jsonb_build_object('fairness', jsonb_build_object('key', v_val->'key'));
    END IF;
    v_val := nullif(p_obj->'rate_limit', 'null'::jsonb);
    IF v_val IS NOT NULL THEN
        IF jsonb_typeof(v_val) <> 'string' OR v_val #>> '{}' !~ '^[A-Za-z][A-Za-z0-9_.:-]{0,127}$' THEN
            RAISE EXCEPTION '%: rate_limit must be the name of a rate limit (1 to 128 letters, digits, _, ., : and -, starting with a letter), got %',
                p_where, left(v_val::text, 200) USING ERRCODE = 'TV010';
        END IF;
        v_out := v_out || jsonb_build_object('rate_limit', v_val);
    END IF;
    RETURN v_out;
END
$$;

-- A wait_for_event or sleep step's wait settings with every default filled in (NULL for any
-- other type, which must have none of them). wait_for_event: event (1 to 200 letters, digits and
-- _ . : / -), key (a $.path into the task context: $.name or $.a.b), timeout_seconds (optional:
-- the wait's timeout), on_timeout (fail, the default, or complete), default (complete's result,
-- an object; {} when not given). sleep: exactly one of duration_seconds (a number of seconds
-- > 0, at most a year) and until (a $.path to an ISO 8601 timestamp in the task context); no
-- timeout. The Python loader (tasker_pg/template.py) applies the same rules.
CREATE FUNCTION tasker._normalise_wait(p_step jsonb, p_type text, p_where text) RETURNS jsonb
LANGUAGE plpgsql IMMUTABLE AS $$
DECLARE
    v_key  text;
    v_path constant text := '^\$(\.[A-Za-z_][A-Za-z0-9_]*){1,16}$';
BEGIN
    IF p_type NOT IN ('wait_for_event', 'sleep') THEN
        SELECT k INTO v_key FROM unnest(ARRAY['event', 'key', 'on_timeout', 'default', 'duration_seconds', 'until']) k
         WHERE p_step ? k AND jsonb_typeof(p_step->k) <> 'null' LIMIT 1;
        IF v_key IS NOT NULL THEN
            RAISE EXCEPTION '%: % is only for % steps (this step is %)', p_where, v_key,
                CASE WHEN v_key IN ('duration_seconds', 'until') THEN 'sleep' ELSE 'wait_for_event' END, p_type
                USING ERRCODE = 'TV010';
        END IF;
        RETURN NULL;
    END IF;
    IF p_type = 'sleep' THEN
        SELECT k INTO v_key FROM unnest(ARRAY['event', 'key', 'on_timeout', 'default', 'timeout_seconds']) k
         WHERE p_step ? k AND jsonb_typeof(p_step->k) <> 'null' LIMIT 1;
        IF v_key IS NOT NULL THEN
            RAISE EXCEPTION '%: % is only for wait_for_event steps (this step is sleep)', p_where, v_key USING ERRCODE = 'TV010';
        END IF;
        IF (jsonb_typeof(p_step->'duration_seconds') IS NOT NULL AND jsonb_typeof(p_step->'duration_seconds') <> 'null')
           = (jsonb_typeof(p_step->'until') IS NOT NULL AND jsonb_typeof(p_step->'until') <> 'null') THEN
            RAISE EXCEPTION '%: a sleep step needs exactly one of duration_seconds and until', p_where USING ERRCODE = 'TV010';
        END IF;
        IF p_step ? 'duration_seconds' AND jsonb_typeof(p_step->'duration_seconds') <> 'null' THEN
            IF jsonb_typeof(p_step->'duration_seconds') <> 'number'
               OR NOT tasker._is_number_json(p_step->'duration_seconds', 0, 31536000)
               OR (p_step->>'duration_seconds')::numeric = 0 THEN
                RAISE EXCEPTION '%: duration_seconds must be a number of seconds > 0 and at most 31536000 (a year), got %',
                    p_where, left((p_step->'duration_seconds')::text, 100) USING ERRCODE = 'TV010';
            END IF;
            RETURN jsonb_build_object('duration_seconds', p_step->'duration_seconds', 'until', NULL);
        END IF;
        IF jsonb_typeof(p_step->'until') <> 'string' OR p_step->>'until' !~ v_path THEN
            RAISE EXCEPTION '%: until must be a path into the task context such as $.ship_at (at most 16 names), got %',
                p_where, left((p_step->'until')::text, 100) USING ERRCODE = 'TV010';
        END IF;
        RETURN jsonb_build_object('duration_seconds', NULL, 'until', p_step->'until');
    END IF;
    -- wait_for_event
    SELECT k INTO v_key FROM unnest(ARRAY['duration_seconds', 'until']) k
     WHERE p_step ? k AND jsonb_typeof(p_step->k) <> 'null' LIMIT 1;
    IF v_key IS NOT NULL THEN
        RAISE EXCEPTION '%: % is only for sleep steps (this step is wait_for_event)', p_where, v_key USING ERRCODE = 'TV010';
    END IF;
    IF jsonb_typeof(p_step->'event') IS DISTINCT FROM 'string' OR p_step->>'event' !~ '^[A-Za-z0-9_.:/-]{1,200}$' THEN
        RAISE EXCEPTION '%: event must be the event name the step waits for: 1 to 200 letters, digits, _, ., :, / and -; got %',
            p_where, coalesce(left((p_step->'event')::text, 100), 'nothing') USING ERRCODE = 'TV010';
    END IF;
    IF jsonb_typeof(p_step->'key') IS DISTINCT FROM 'string' OR p_step->>'key' !~ v_path THEN
        RAISE EXCEPTION '%: key must be a path into the task context such as $.order_id (at most 16 names), got %',
            p_where, coalesce(left((p_step->'key')::text, 100), 'nothing') USING ERRCODE = 'TV010';
    END IF;
    IF jsonb_typeof(p_step->'on_timeout') NOT IN ('string', 'null') OR p_step->>'on_timeout' NOT IN ('fail', 'complete') THEN
        RAISE EXCEPTION '%: on_timeout must be fail or complete, got %', p_where, left((p_step->'on_timeout')::text, 100)
            USING ERRCODE = 'TV010';
    END IF;
    IF jsonb_typeof(p_step->'default') NOT IN ('object', 'null') THEN
        RAISE EXCEPTION '%: default (the result when the wait times out) must be an object, got %', p_where,
            left((p_step->'default')::text, 100) USING ERRCODE = 'TV010';
    END IF;
    IF jsonb_typeof(p_step->'default') = 'object' AND coalesce(p_step->>'on_timeout', 'fail') <> 'complete' THEN
        RAISE EXCEPTION '%: default is the result of a timeout with on_timeout: complete (this step fails on timeout)', p_where
            USING ERRCODE = 'TV010';
    END IF;
    IF coalesce(p_step->>'on_timeout', 'fail') = 'complete' AND jsonb_typeof(p_step->'timeout_seconds') IS DISTINCT FROM 'number' THEN
        RAISE EXCEPTION '%: on_timeout: complete needs timeout_seconds', p_where USING ERRCODE = 'TV010';
    END IF;
    IF tasker._has_huge_number(p_step->'default') THEN
        RAISE EXCEPTION '%: default holds a number too large for a double (such as 1e400)', p_where USING ERRCODE = 'TV010';
    END IF;
    RETURN jsonb_build_object(
        'event', p_step->'event', 'key', p_step->'key',
        'timeout_seconds', coalesce(p_step->'timeout_seconds', 'null'::jsonb),
        'on_timeout', coalesce(p_step->'on_timeout', '"fail"'::jsonb),
        'default', CASE WHEN coalesce(p_step->>'on_timeout', 'fail') = 'complete'
                        THEN coalesce(nullif(p_step->'default', 'null'::jsonb), '{}'::jsonb) ELSE 'null'::jsonb END);
END
$$;

-- A batch_worker step's batch_config with every default filled in (NULL for any other type,
-- which must not have one). The Python loader (tasker_pg/template.py BatchConfig) applies the
-- same rules.
CREATE FUNCTION tasker._normalise_batch_config(p_config jsonb, p_type text, p_where text) RETURNS jsonb
LANGUAGE plpgsql IMMUTABLE AS $$
DECLARE
    v_key text;
BEGIN
    IF p_type <> 'batch_worker' THEN
        IF p_config IS NOT NULL THEN
            RAISE EXCEPTION '%: batch_config is only for batch_worker steps (this step is %)', p_where, p_type
                USING ERRCODE = 'TV010';
        END IF;
        RETURN NULL;
    END IF;
    p_config := coalesce(p_config, '{}'::jsonb);
    IF jsonb_typeof(p_config) <> 'object' THEN
        RAISE EXCEPTION '%: batch_config must be an object', p_where USING ERRCODE = 'TV010';
    END IF;
    SELECT k INTO v_key FROM jsonb_object_keys(p_config) k
     WHERE k NOT IN ('batch_size', 'parallelism', 'cursor_field', 'failure_strategy') LIMIT 1;
    IF v_key IS NOT NULL THEN
        RAISE EXCEPTION '%: unknown key % in batch_config (valid: batch_size, parallelism, cursor_field, failure_strategy)',
            p_where, quote_literal(left(v_key, 200)) USING ERRCODE = 'TV010';
    END IF;
    IF p_config ? 'batch_size' AND NOT (tasker._is_int_json(p_config->'batch_size', 1)
                                        AND (p_config->>'batch_size')::numeric <= 1000000) THEN
        RAISE EXCEPTION '%: batch_config.batch_size must be an integer from 1 to 1000000, got %', p_where,
            left((p_config->'batch_size')::text, 100) USING ERRCODE = 'TV010';
    END IF;
    IF p_config ? 'parallelism' AND NOT (tasker._is_int_json(p_config->'parallelism', 1)
                                         AND (p_config->>'parallelism')::numeric <= 1000) THEN
        RAISE EXCEPTION '%: batch_config.parallelism must be an integer from 1 to 1000, got %', p_where,
            left((p_config->'parallelism')::text, 100) USING ERRCODE = 'TV010';
    END IF;
    IF p_config ? 'cursor_field' AND (jsonb_typeof(p_config->'cursor_field') <> 'string'
                                      OR char_length(p_config->>'cursor_field') NOT BETWEEN 1 AND 200) THEN
        RAISE EXCEPTION '%: batch_config.cursor_field must be a non-empty string of at most 200 characters, got %',
            p_where, left((p_config->'cursor_field')::text, 100) USING ERRCODE = 'TV010';
    END IF;
    IF p_config ? 'failure_strategy' AND (jsonb_typeof(p_config->'failure_strategy') <> 'string'
            OR p_config->>'failure_strategy' NOT IN ('continue_on_failure', 'fail_fast', 'isolate')) THEN
        RAISE EXCEPTION '%: batch_config.failure_strategy must be continue_on_failure, fail_fast or isolate, got %',
            p_where, left((p_config->'failure_strategy')::text, 100) USING ERRCODE = 'TV010';
    END IF;
    RETURN jsonb_build_object(
        'batch_size', coalesce(p_config->'batch_size', '1000'::jsonb),
        'parallelism', coalesce(p_config->'parallelism', '10'::jsonb),
        'cursor_field', coalesce(p_config->'cursor_field', '"id"'::jsonb),
        'failure_strategy', coalesce(p_config->'failure_strategy', '"continue_on_failure"'::jsonb));
END
$$;
