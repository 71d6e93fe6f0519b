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
    v_step      jsonb;
    v_idx       integer;
    v_names     text[] := '{}';
    v_key       text;
    v_dep       text;
    v_id        bigint;
    v_existing  jsonb;
    v_remaining text[];
    v_done      text[] := '{}';
    v_progress  boolean;
    v_cycle     text[];
    v_cur       text;
    v_deps      jsonb := '{}';  -- step name -> array of dependency names
    v_too_big   text;
    v_init_lim  bigint := tasker._setting_int('max_initialization_bytes');
    v_name_lim  bigint := tasker._setting_int('max_name_bytes');
    v_text_lim  bigint := tasker._setting_int('max_text_bytes');
BEGIN
    IF p_template IS NULL OR jsonb_typeof(p_template) <> 'object' THEN
        RAISE EXCEPTION 'a task template must be a JSON object' USING ERRCODE = 'TV010';
    END IF;
    FOR v_key IN SELECT jsonb_object_keys(p_template) LOOP
        IF v_key NOT IN ('name', 'namespace_name', 'version', 'description', 'metadata', 'steps') THEN
            RAISE EXCEPTION 'unknown key % in task template (valid: name, namespace_name, version, description, metadata, steps)',
                quote_literal(v_key) USING ERRCODE = 'TV010';
        END IF;
    END LOOP;
    v_ns := p_template->>'namespace_name';
    v_name := p_template->>'name';
    v_version := p_template->>'version';
    IF v_ns IS NULL OR v_ns !~ '^[a-z][a-z0-9_]{0,46}$' THEN
        RAISE EXCEPTION 'template namespace_name % is invalid: 1 to 47 lowercase letters, digits and _, starting with a letter',
            coalesce(quote_literal(v_ns), 'NULL') USING ERRCODE = 'TV010';
    END IF;
    IF v_name IS NULL OR v_name !~ '^[A-Za-z][A-Za-z0-9_.-]{0,127}$' THEN
        RAISE EXCEPTION 'template name % is invalid: letters, digits, _, - and ., starting with a letter, at most 128',
            coalesce(quote_literal(v_name), 'NULL') USING ERRCODE = 'TV010';
    END IF;
    v_parts := regexp_match(v_version, '^(0|[1-9][0-9]{0,8})\.(0|[1-9][0-9]{0,8})\.(0|[1-9][0-9]{0,8})(?:-([0-9A-Za-z.-]+))?$');
    IF v_version IS NULL OR v_parts IS NULL OR length(v_version) > 64 THEN
        RAISE EXCEPTION 'template % version % is invalid: expected a semantic version MAJOR.MINOR.PATCH such as 1.0.0',
            v_name, coalesce(quote_literal(v_version), 'NULL') USING ERRCODE = 'TV010';
    END IF;
    IF jsonb_typeof(p_template->'metadata') NOT IN ('object', 'null') THEN
        RAISE EXCEPTION 'template %: metadata must be an object', v_name USING ERRCODE = 'TV010';
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

    -- Per-step structure, names and defaults.
    v_norm := '[]';
    v_idx := 0;
    FOR v_step IN SELECT value FROM jsonb_array_elements(v_steps) LOOP
        v_idx := v_idx + 1;
        v_norm := v_norm || jsonb_build_array(tasker._normalise_step(v_step, v_idx, v_name));
        v_cur := v_norm->(v_idx - 1)->>'name';
        IF v_cur = ANY (v_names) THEN
            RAISE EXCEPTION 'template %: duplicate step name %', v_name, quote_literal(v_cur) USING ERRCODE = 'TV010';
        END IF;
        v_names := v_names || v_cur;
        v_deps := v_deps || jsonb_build_object(v_cur, v_norm->(v_idx - 1)->'dependencies');
    END LOOP;
    FOR v_step IN SELECT value FROM jsonb_array_elements(v_norm) LOOP
        FOR v_dep IN SELECT jsonb_array_elements_text(v_step->'dependencies') LOOP
            IF v_dep = v_step->>'name' THEN
                RAISE EXCEPTION 'template %: step % depends on itself', v_name, quote_literal(v_dep) USING ERRCODE = 'TV010';
            END IF;
            IF NOT v_dep = ANY (v_names) THEN
                RAISE EXCEPTION 'template %: step % depends on unknown step % (steps: %)',
                    v_name, quote_literal(v_step->>'name'), quote_literal(v_dep), array_to_string(v_names, ', ')
                    USING ERRCODE = 'TV010';
            END IF;
        END LOOP;
    END LOOP;

    -- Cycles: peel off steps whose dependencies are all done; whatever is left lies on or
    -- behind a cycle. Walk dependencies from the first leftover step until a name repeats.
    v_remaining := v_names;
    LOOP
        v_progress := false;
        FOREACH v_cur IN ARRAY v_remaining LOOP
            IF NOT EXISTS (SELECT 1 FROM jsonb_array_elements_text(v_deps->v_cur) d WHERE NOT d = ANY (v_done)) THEN
                v_done := v_done || v_cur;
                v_remaining := array_remove(v_remaining, v_cur);
                v_progress := true;
            END IF;
        END LOOP;
        EXIT WHEN NOT v_progress OR cardinality(v_remaining) = 0;
    END LOOP;
    IF cardinality(v_remaining) > 0 THEN
        v_cur := v_remaining[1];
        v_cycle := ARRAY[v_cur];
        LOOP
            SELECT d INTO v_cur FROM jsonb_array_elements_text(v_deps->v_cur) WITH ORDINALITY x(d, o)
             WHERE d = ANY (v_remaining) ORDER BY o LIMIT 1;
            IF v_cur = ANY (v_cycle) THEN
                v_cycle := v_cycle[array_position(v_cycle, v_cur):] || v_cur;
                EXIT;
            END IF;
            v_cycle := v_cycle || v_cur;
        END LOOP;
        RAISE EXCEPTION 'template %: dependency cycle %', v_name, array_to_string(v_cycle, ' -> ')
            USING ERRCODE = 'TV010';
    END IF;

    v_norm := jsonb_build_object(
        'name', v_name, 'namespace_name', v_ns, 'version', v_version,
        'description', p_template->'description',
        'metadata', coalesce(p_template->'metadata', '{}'::jsonb),
        'steps', v_norm);

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
                                    version_pre, version_pre_key, description, template, step_count)
    VALUES (v_ns, v_name, v_version, v_parts[1]::integer, v_parts[2]::integer, v_parts[3]::integer,
            v_parts[4], tasker._semver_pre_key(v_parts[4]), p_template->>'description', v_norm,
            jsonb_array_length(v_norm->'steps'))
    RETURNING named_task_id INTO v_id;

    WITH RECURSIVE
    s AS (
        SELECT (e.ord - 1)::integer AS step_index, e.step
          FROM jsonb_array_elements(v_norm->'steps') WITH ORDINALITY e(step, ord)
    ),
    edge AS (
        SELECT s.step->>'name' AS child, d AS parent
          FROM s CROSS JOIN jsonb_array_elements_text(s.step->'dependencies') d
    ),
    -- every (step, ancestor) pair; UNION (not ALL) removes duplicates from diamonds
    anc(step, ancestor) AS (
        SELECT child, parent FROM edge
        UNION
        SELECT a.step, e.parent FROM anc a JOIN edge e ON e.child = a.ancestor
    )
    INSERT INTO tasker.named_steps (named_task_id, step_index, name, description, handler, config, step_type,
                                    parent_names, ancestor_names, retryable, max_attempts, backoff,
                                    backoff_base_ms, max_backoff_ms, jitter, timeout_seconds)
    SELECT v_id, s.step_index, s.step->>'name', s.step->>'description',
           s.step->'handler'->>'callable', s.step->'handler'->'initialization', s.step->>'type',
           ARRAY(SELECT jsonb_array_elements_text(s.step->'dependencies')),
           ARRAY(SELECT a.ancestor FROM anc a WHERE a.step = s.step->>'name' ORDER BY a.ancestor),
           (s.step->'retry'->>'retryable')::boolean, (s.step->'retry'->>'max_attempts')::integer,
           s.step->'retry'->>'backoff', (s.step->'retry'->>'backoff_base_ms')::integer,
           (s.step->'retry'->>'max_backoff_ms')::integer, (s.step->'retry'->>'jitter')::double precision,
           (s.step->>'timeout_seconds')::double precision
      FROM s;

    PERFORM tasker.create_queue(v_ns);
    RETURN v_id;
END
$$;
COMMENT ON FUNCTION tasker.register_template(jsonb) IS
    'Validates, normalises and stores a task template version; creates its namespace queue.';

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
BEGIN
    IF jsonb_typeof(p_step) IS DISTINCT FROM 'object' THEN
        RAISE EXCEPTION 'template %: step #% must be an object', p_template, p_index USING ERRCODE = 'TV010';
    END IF;
    v_name := p_step->>'name';
    IF v_name IS NULL OR v_name !~ '^[A-Za-z_][A-Za-z0-9_.-]{0,127}$' THEN
        RAISE EXCEPTION 'template %: step #% has an invalid name %: letters, digits, _, - and ., starting with a letter or _',
            p_template, p_index, coalesce(quote_literal(v_name), 'NULL') USING ERRCODE = 'TV010';
    END IF;
    v_where := format('template %s, step %L', p_template, v_name);
    FOR v_key IN SELECT jsonb_object_keys(p_step) LOOP
        IF v_key NOT IN ('name', 'description', 'handler', 'dependencies', 'depends_on', 'retry', 'timeout_seconds', 'type') THEN
            RAISE EXCEPTION '%: unknown key % (valid: name, description, handler, dependencies, retry, timeout_seconds, type)',
                v_where, quote_literal(v_key) USING ERRCODE = 'TV010';
        END IF;
    END LOOP;
    v_type := coalesce(p_step->>'type', 'standard');
    IF v_type <> 'standard' THEN
        RAISE EXCEPTION '%: step type % is not supported yet (only standard)', v_where, quote_literal(v_type)
            USING ERRCODE = 'TV010';
    END IF;
    v_handler := p_step->'handler';
    IF jsonb_typeof(v_handler) IS DISTINCT FROM 'object' OR jsonb_typeof(v_handler->'callable') IS DISTINCT FROM 'string'
       OR btrim(v_handler->>'callable') = '' OR btrim(v_handler->>'callable') <> v_handler->>'callable' THEN
        RAISE EXCEPTION '%: handler.callable is required (the handler name a worker runs, without surrounding spaces)', v_where USING ERRCODE = 'TV010';
    END IF;
    IF v_handler ? 'initialization' AND jsonb_typeof(v_handler->'initialization') NOT IN ('object', 'null') THEN
        RAISE EXCEPTION '%: handler.initialization must be an object', v_where USING ERRCODE = 'TV010';
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
                v_where, quote_literal(v_key) USING ERRCODE = 'TV010';
        END IF;
    END LOOP;
    v_max := coalesce(v_retry->'max_attempts', '3');
    IF NOT tasker._is_int_json(v_max, 1) THEN
        RAISE EXCEPTION '%: retry.max_attempts must be an integer >= 1, got %', v_where, v_max USING ERRCODE = 'TV010';
    END IF;
    v_backoff := coalesce(v_retry->>'backoff', 'exponential');
    IF v_backoff NOT IN ('exponential', 'linear', 'fixed', 'none') THEN
        RAISE EXCEPTION '%: retry.backoff must be exponential, linear, fixed or none, got %', v_where, quote_literal(v_backoff)
            USING ERRCODE = 'TV010';
    END IF;
    IF (v_retry ? 'retryable' AND jsonb_typeof(v_retry->'retryable') <> 'boolean')
       OR (v_retry ? 'backoff_base_ms' AND NOT tasker._is_int_json(v_retry->'backoff_base_ms', 0))
       OR (v_retry ? 'max_backoff_ms' AND NOT tasker._is_int_json(v_retry->'max_backoff_ms', 0))
       OR (v_retry ? 'jitter' AND (jsonb_typeof(v_retry->'jitter') <> 'number' OR NOT tasker._is_number_json(v_retry->'jitter', 0, 1))) THEN
        RAISE EXCEPTION '%: retry settings out of range (retryable a boolean, backoff_base_ms and max_backoff_ms integers >= 0, jitter 0..1)',
            v_where USING ERRCODE = 'TV010';
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
    IF p_step ? 'timeout_seconds' AND jsonb_typeof(p_step->'timeout_seconds') <> 'null'
       AND (jsonb_typeof(p_step->'timeout_seconds') <> 'number' OR (p_step->>'timeout_seconds')::numeric <= 0) THEN
        RAISE EXCEPTION '%: timeout_seconds must be a number > 0', v_where USING ERRCODE = 'TV010';
    END IF;
    RETURN jsonb_build_object(
        'name', v_name,
        'description', p_step->'description',
        'handler', jsonb_build_object(
            'callable', v_handler->'callable',
            'initialization', coalesce(nullif(v_handler->'initialization', 'null'::jsonb), '{}'::jsonb)),
        'dependencies', v_deps,
        'retry', jsonb_build_object(
            'retryable', coalesce(v_retry->'retryable', 'true'::jsonb),
            'max_attempts', v_max,
            'backoff', to_jsonb(v_backoff),
            'backoff_base_ms', coalesce(v_retry->'backoff_base_ms', '1000'::jsonb),
            'max_backoff_ms', coalesce(v_retry->'max_backoff_ms', '60000'::jsonb),
            'jitter', coalesce(v_retry->'jitter', '0'::jsonb)),
        'timeout_seconds', coalesce(p_step->'timeout_seconds', 'null'::jsonb),
        'type', to_jsonb(v_type));
END
$$;
