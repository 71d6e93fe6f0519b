-- 0002_engine: the workflow engine. PostgreSQL decides everything about a task here: which
-- steps are ready, who holds which step, what follows a success or a failure, when a task is
-- finished. Each decision is one function call, one transaction, reachable from psql.
--
-- Lock order, everywhere (so concurrent calls cannot deadlock): queue messages (by queue,
-- msg_id), then the steps those messages are for (by step_uuid), then child steps (by
-- step_uuid), then tasks (by task_uuid). Every writer of a step that has a live message locks
-- that message first, so holding a step's message means owning the step.
--
-- SQLSTATEs of our own: TV0xx bad input, TN0xx not found, TS0xx wrong state.

-- --------------------------------------------------------------------------------------------
-- Templates
-- --------------------------------------------------------------------------------------------

CREATE TABLE tasker.named_tasks (
    named_task_id  bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    namespace      text NOT NULL,
    name           text NOT NULL,
    version        text NOT NULL,
    -- semantic-version parts, so "newest" means 1.10.0 > 1.9.0 (not text order)
    version_major  integer NOT NULL,
    version_minor  integer NOT NULL,
    version_patch  integer NOT NULL,
    version_pre    text,
    -- sortable form of the pre-release (numeric identifiers by value, below alphanumeric ones)
    version_pre_key text[],
    description    text,
    template       jsonb NOT NULL,  -- the normalised body (every default filled in)
    step_count     integer NOT NULL,
    created_at     timestamptz NOT NULL DEFAULT now(),
    UNIQUE (namespace, name, version)
);

CREATE TABLE tasker.named_steps (
    named_step_id    bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    named_task_id    bigint NOT NULL REFERENCES tasker.named_tasks ON DELETE CASCADE,
    step_index       integer NOT NULL,  -- position in the template's step list
    name             text NOT NULL,
    description      text,
    handler          text NOT NULL,     -- handler.callable
    config           jsonb NOT NULL,    -- handler.initialization
    step_type        text NOT NULL,
    parent_names     text[] NOT NULL,   -- direct dependencies
    -- every transitive dependency, precomputed so a claim hydrates dependency results with
    -- one index probe instead of a recursive query
    ancestor_names   text[] NOT NULL,
    retryable        boolean NOT NULL,
    max_attempts     integer NOT NULL,
    backoff          text NOT NULL,     -- exponential | linear | fixed | none
    backoff_base_ms  integer NOT NULL,
    max_backoff_ms   integer NOT NULL,
    jitter           double precision NOT NULL,
    timeout_seconds  double precision,
    UNIQUE (named_task_id, step_index),
    UNIQUE (named_task_id, name)
);

-- --------------------------------------------------------------------------------------------
-- Tasks, steps, edges, audit
-- --------------------------------------------------------------------------------------------

-- No index on any column that changes while a task runs (state, counters): updates stay HOT.
CREATE TABLE tasker.tasks (
    task_uuid        uuid PRIMARY KEY,
    named_task_id    bigint NOT NULL,
    namespace        text NOT NULL,
    name             text NOT NULL,
    version          text NOT NULL,
    -- pending           created, no step outcome recorded yet (v_tasks shows steps_in_process
    --                   as soon as a step has been claimed)
    -- steps_in_process  at least one step outcome recorded
    -- complete          every step complete or resolved_manually
    -- error             a step failed permanently; nothing new starts until retry/resolve
    -- cancelled         cancel_task; terminal
    -- resolved_manually terminal, set by an operator
    state            text NOT NULL,
    context          jsonb NOT NULL,
    initiator        text,
    source_system    text,
    reason           text,
    tags             jsonb NOT NULL DEFAULT '[]',
    priority         integer NOT NULL DEFAULT 0,
    idempotency_key  text,
    correlation_id   text,
    -- counters that make finalisation O(1): complete when completed_steps = total_steps
    total_steps      integer NOT NULL,
    completed_steps  integer NOT NULL DEFAULT 0,  -- complete + resolved_manually
    error_steps      integer NOT NULL DEFAULT 0,  -- currently in error
    created_at       timestamptz NOT NULL DEFAULT now(),
    updated_at       timestamptz NOT NULL DEFAULT now(),
    completed_at     timestamptz
) WITH (fillfactor = 70);

CREATE UNIQUE INDEX tasks_idempotency_idx ON tasker.tasks (namespace, name, idempotency_key)
    WHERE idempotency_key IS NOT NULL;
CREATE INDEX tasks_created_at_idx ON tasker.tasks (created_at);
CREATE INDEX tasks_correlation_idx ON tasker.tasks (correlation_id) WHERE correlation_id IS NOT NULL;

CREATE TABLE tasker.steps (
    step_uuid            uuid PRIMARY KEY,
    task_uuid            uuid NOT NULL,
    named_step_id        bigint NOT NULL,
    name                 text NOT NULL,
    -- pending            waiting for parents (pending_parents > 0, or task in error)
    -- enqueued           has a visible message, waiting for a worker
    -- in_progress        claimed by a worker (the message's vt is the lease)
    -- waiting_for_retry  failed retryably; the message becomes visible at next_attempt_at
    -- complete           succeeded (terminal, satisfies children)
    -- error              failed permanently or out of attempts (retry_step: -> enqueued)
    -- cancelled          terminal
    -- resolved_manually  completed by an operator (terminal, satisfies children)
    state                text NOT NULL,
    attempts             integer NOT NULL DEFAULT 0,  -- attempts started; the fencing token
    max_attempts         integer NOT NULL,
    retryable            boolean NOT NULL,
    -- increments at every claim, checkpoint continuations included: fences the outcome of one
    -- claim even when two claims share an attempt number
    claim_seq            integer NOT NULL DEFAULT 0,
    claim_spent_attempt  boolean NOT NULL DEFAULT false,  -- did the current claim start an attempt
    continuation         boolean NOT NULL DEFAULT false,  -- checkpointed: next claim continues the attempt
    pending_parents      integer NOT NULL,  -- parents not yet complete/resolved (fan-in counter)
    msg_id               bigint,            -- the live message in the task's namespace queue
    results              jsonb,
    metadata             jsonb,
    last_error           jsonb,
    checkpoint           jsonb,
    inputs               jsonb,
    worker_id            text,
    next_attempt_at      timestamptz,
    created_at           timestamptz NOT NULL DEFAULT now(),
    enqueued_at          timestamptz,
    started_at           timestamptz,
    completed_at         timestamptz,
    updated_at           timestamptz NOT NULL DEFAULT now()
) WITH (fillfactor = 70);

CREATE UNIQUE INDEX steps_task_name_idx ON tasker.steps (task_uuid, name);

-- Parent -> child, per task (the template holds the same shape by step name).
CREATE TABLE tasker.step_edges (
    parent_uuid uuid NOT NULL,
    child_uuid  uuid NOT NULL,
    PRIMARY KEY (parent_uuid, child_uuid)
);

-- Append-only audit: one row per state change, written by the statement that makes the change.
-- One index each and no foreign keys: they are written on every hot-path call.
CREATE TABLE tasker.step_transitions (
    transition_id  bigint GENERATED ALWAYS AS IDENTITY,
    step_uuid      uuid NOT NULL,
    task_uuid      uuid NOT NULL,
    from_state     text,
    to_state       text NOT NULL,
    event          text NOT NULL,
    attempt        integer NOT NULL DEFAULT 0,
    worker_id      text,
    duration_ms    double precision,
    error_summary  text,
    metadata       jsonb,
    created_at     timestamptz NOT NULL DEFAULT clock_timestamp()
);
CREATE INDEX step_transitions_step_idx ON tasker.step_transitions (step_uuid, transition_id);

CREATE TABLE tasker.task_transitions (
    transition_id  bigint GENERATED ALWAYS AS IDENTITY,
    task_uuid      uuid NOT NULL,
    from_state     text,
    to_state       text NOT NULL,
    event          text NOT NULL,
    metadata       jsonb,
    created_at     timestamptz NOT NULL DEFAULT clock_timestamp()
);
CREATE INDEX task_transitions_task_idx ON tasker.task_transitions (task_uuid, transition_id);

-- --------------------------------------------------------------------------------------------
-- Small helpers
-- --------------------------------------------------------------------------------------------

-- Retry delay in seconds for the attempt that just failed (1-based), from the step's backoff
-- settings: exponential base*2^(n-1), linear base*n, fixed base, none 0; capped; jitter j
-- takes a random share of up to j off the delay (it never exceeds the cap).
CREATE FUNCTION tasker.backoff_seconds(
    p_backoff text, p_base_ms integer, p_cap_ms integer, p_jitter double precision, p_attempt integer
) RETURNS double precision
LANGUAGE sql VOLATILE AS $$
    SELECT (d * (1 - p_jitter * random())) / 1000.0
      FROM (SELECT least(p_cap_ms::double precision,
                   CASE p_backoff
                       WHEN 'exponential' THEN p_base_ms * power(2::double precision, least(greatest(p_attempt, 1) - 1, 60))
                       WHEN 'linear' THEN p_base_ms::double precision * greatest(p_attempt, 1)
                       WHEN 'fixed' THEN p_base_ms::double precision
                       ELSE 0
                   END) AS d) x
$$;

-- Is this JSON value an integer in [p_min, 2^31-1]? (2.0 is not: it is a float in JSON.)
CREATE FUNCTION tasker.is_int_json(p_value jsonb, p_min integer) RETURNS boolean
LANGUAGE sql IMMUTABLE AS $$
    SELECT coalesce(jsonb_typeof(p_value) = 'number'
                    AND p_value::text ~ '^-?[0-9]{1,12}$'
                    AND (p_value::text)::numeric BETWEEN p_min AND 2147483647, false)
$$;

-- Is this JSON value null/absent or a finite number in [p_min, p_max]?
CREATE FUNCTION tasker.is_number_json(p_value jsonb, p_min double precision, p_max double precision) RETURNS boolean
LANGUAGE sql IMMUTABLE AS $$
    SELECT p_value IS NULL OR jsonb_typeof(p_value) = 'null'
           OR coalesce(jsonb_typeof(p_value) = 'number'
                       AND (p_value::text)::numeric BETWEEN p_min::numeric AND p_max::numeric, false)
$$;

-- Sort key of a semantic-version pre-release ('rc.10' -> {'0000000000rc'...}): numeric
-- identifiers compare by value and below alphanumeric ones; a longer list of equal leading
-- identifiers sorts higher, as the semver rules say.
CREATE FUNCTION tasker.semver_pre_key(p_pre text) RETURNS text[]
LANGUAGE sql IMMUTABLE AS $$
    SELECT CASE WHEN p_pre IS NULL THEN NULL ELSE ARRAY(
        SELECT CASE WHEN ident ~ '^[0-9]+$' THEN '0' || lpad(ident, 20, '0') ELSE '1' || ident END
          FROM unnest(string_to_array(p_pre, '.')) WITH ORDINALITY AS x(ident, ord)
         ORDER BY ord) END
$$;

-- The largest task context / step result accepted, in bytes (setting tasker.max_payload_bytes,
-- default 1 MiB; set it per database with ALTER DATABASE ... SET tasker.max_payload_bytes).
CREATE FUNCTION tasker.max_payload_bytes() RETURNS integer
LANGUAGE sql STABLE AS $$
    SELECT coalesce(nullif(current_setting('tasker.max_payload_bytes', true), '')::integer, 1048576)
$$;

-- Visibility delay for messages of a task in error: they wait here until retry_step or
-- resolve_step wakes them; the interval only bounds how long a missed wake-up can last.
CREATE FUNCTION tasker.park_interval() RETURNS interval
LANGUAGE sql IMMUTABLE AS $$ SELECT interval '5 minutes' $$;

-- --------------------------------------------------------------------------------------------
-- register_template
-- --------------------------------------------------------------------------------------------

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
        v_norm := v_norm || jsonb_build_array(tasker.normalise_step(v_step, v_idx, v_name));
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
            v_parts[4], tasker.semver_pre_key(v_parts[4]), p_template->>'description', v_norm,
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

-- Checks one template step and returns it with every default filled in (used by
-- register_template; errors name the template, the step and the rule).
CREATE FUNCTION tasker.normalise_step(p_step jsonb, p_index integer, p_template text) RETURNS jsonb
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
    IF NOT tasker.is_int_json(v_max, 1) THEN
        RAISE EXCEPTION '%: retry.max_attempts must be an integer >= 1, got %', v_where, v_max USING ERRCODE = 'TV010';
    END IF;
    v_backoff := coalesce(v_retry->>'backoff', 'exponential');
    IF v_backoff NOT IN ('exponential', 'linear', 'fixed', 'none') THEN
        RAISE EXCEPTION '%: retry.backoff must be exponential, linear, fixed or none, got %', v_where, quote_literal(v_backoff)
            USING ERRCODE = 'TV010';
    END IF;
    IF (v_retry ? 'retryable' AND jsonb_typeof(v_retry->'retryable') <> 'boolean')
       OR (v_retry ? 'backoff_base_ms' AND NOT tasker.is_int_json(v_retry->'backoff_base_ms', 0))
       OR (v_retry ? 'max_backoff_ms' AND NOT tasker.is_int_json(v_retry->'max_backoff_ms', 0))
       OR (v_retry ? 'jitter' AND (jsonb_typeof(v_retry->'jitter') <> 'number' OR NOT tasker.is_number_json(v_retry->'jitter', 0, 1))) THEN
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

-- --------------------------------------------------------------------------------------------
-- create_task / create_tasks
-- --------------------------------------------------------------------------------------------

-- Refuses task options that are not what create_task documents, naming the problem.
CREATE FUNCTION tasker.check_task_options(p_options jsonb, p_where text) RETURNS void
LANGUAGE plpgsql IMMUTABLE AS $$
DECLARE
    v_opt text;
BEGIN
    IF jsonb_typeof(p_options) <> 'object' THEN
        RAISE EXCEPTION '%options must be a JSON object', p_where USING ERRCODE = 'TV022';
    END IF;
    FOR v_opt IN SELECT jsonb_object_keys(p_options) LOOP
        IF v_opt NOT IN ('initiator', 'source_system', 'reason', 'tags', 'priority', 'idempotency_key',
                         'correlation_id', 'delay_seconds') THEN
            RAISE EXCEPTION '%unknown option % (valid: initiator, source_system, reason, tags, priority, idempotency_key, correlation_id, delay_seconds)',
                p_where, quote_literal(v_opt) USING ERRCODE = 'TV022';
        END IF;
    END LOOP;
    IF p_options ? 'priority' AND jsonb_typeof(p_options->'priority') <> 'null'
       AND NOT tasker.is_int_json(p_options->'priority', -2147483647) THEN
        RAISE EXCEPTION '%option priority must be an integer, got %', p_where, p_options->'priority' USING ERRCODE = 'TV022';
    END IF;
    IF NOT tasker.is_number_json(p_options->'delay_seconds', 0, 31536000) THEN
        RAISE EXCEPTION '%option delay_seconds must be a number of seconds between 0 and a year, got %',
            p_where, p_options->'delay_seconds' USING ERRCODE = 'TV022';
    END IF;
    IF jsonb_typeof(p_options->'tags') NOT IN ('array', 'null') THEN
        RAISE EXCEPTION '%option tags must be a list, got %', p_where, p_options->'tags' USING ERRCODE = 'TV022';
    END IF;
    IF EXISTS (SELECT 1 FROM jsonb_each(p_options) o
                WHERE o.key IN ('initiator', 'source_system', 'reason', 'idempotency_key', 'correlation_id')
                  AND jsonb_typeof(o.value) NOT IN ('string', 'null')) THEN
        RAISE EXCEPTION '%options initiator, source_system, reason, idempotency_key and correlation_id must be strings',
            p_where USING ERRCODE = 'TV022';
    END IF;
END
$$;

-- Creates many tasks of one template in one statement (set-based): for each context, the task
-- row, its steps and edges, their first transitions, and a message for each root step. Returns
-- the task uuids in the order of p_contexts. p_options is one object for every task, or an
-- array with one object per context (per-task idempotency keys). The same rules as
-- create_task: a repeated idempotency_key returns the original task and creates nothing. Works
-- in the caller's transaction (workers see nothing before it commits).
CREATE FUNCTION tasker.create_tasks(
    p_namespace text,
    p_name      text,
    p_contexts  jsonb,
    p_version   text DEFAULT NULL,
    p_options   jsonb DEFAULT '{}'
) RETURNS SETOF uuid
LANGUAGE plpgsql AS $$
DECLARE
    v_tpl       bigint;
    v_version   text;
    v_total     integer;
    v_seq       regclass;
    v_now       timestamptz := clock_timestamp();
    v_limit     integer := tasker.max_payload_bytes();
    v_bad       text;
    v_count     integer;
    v_per_task  boolean;
    v_ids       uuid[];
BEGIN
    IF p_contexts IS NULL OR jsonb_typeof(p_contexts) <> 'array' THEN
        RAISE EXCEPTION 'contexts must be a JSON array of task contexts' USING ERRCODE = 'TV020';
    END IF;
    v_count := jsonb_array_length(p_contexts);
    p_options := coalesce(p_options, '{}'::jsonb);
    v_per_task := jsonb_typeof(p_options) = 'array';
    IF v_per_task AND jsonb_array_length(p_options) <> v_count THEN
        RAISE EXCEPTION 'options must be one object, or an array with one object per context (% contexts, % options)',
            v_count, jsonb_array_length(p_options) USING ERRCODE = 'TV022';
    END IF;
    -- Refuse bad input before anything is written, naming the first bad entry.
    SELECT CASE WHEN v_count = 1 THEN 'task context' ELSE 'task context #' || c.ord END ||
           CASE WHEN jsonb_typeof(c.ctx) <> 'object' THEN ' must be a JSON object, got a JSON ' || jsonb_typeof(c.ctx)
                ELSE format(' is %s bytes, more than the limit of %s bytes (setting tasker.max_payload_bytes)',
                            pg_column_size(c.ctx), v_limit) END
      INTO v_bad
      FROM jsonb_array_elements(p_contexts) WITH ORDINALITY c(ctx, ord)
     WHERE jsonb_typeof(c.ctx) <> 'object' OR pg_column_size(c.ctx) > v_limit
     ORDER BY c.ord LIMIT 1;
    IF v_bad IS NOT NULL THEN
        RAISE EXCEPTION '%', v_bad USING ERRCODE = CASE WHEN v_bad LIKE '%bytes%' THEN 'TV021' ELSE 'TV020' END;
    END IF;
    IF v_per_task THEN
        PERFORM tasker.check_task_options(o.opt, format('options #%s: ', o.ord))
           FROM jsonb_array_elements(p_options) WITH ORDINALITY o(opt, ord);
    ELSE
        PERFORM tasker.check_task_options(p_options, '');
    END IF;

    -- The template version: the given one, else the newest by semantic-version order.
    SELECT nt.named_task_id, nt.version, nt.step_count INTO v_tpl, v_version, v_total
      FROM tasker.named_tasks nt
     WHERE nt.namespace = p_namespace AND nt.name = p_name
       AND (p_version IS NULL OR nt.version = p_version)
     ORDER BY nt.version_major DESC, nt.version_minor DESC, nt.version_patch DESC,
              nt.version_pre IS NULL DESC, nt.version_pre_key DESC
     LIMIT 1;
    IF NOT FOUND THEN
        PERFORM tasker.raise_unknown_template(p_namespace, p_name, p_version);
    END IF;
    IF v_count = 0 THEN
        RETURN;
    END IF;

    SELECT q.msg_seq INTO v_seq FROM tasker.queues q WHERE q.queue_name = p_namespace;
    IF NOT FOUND THEN
        PERFORM tasker.create_queue(p_namespace);
        v_seq := tasker.queue_sequence(p_namespace);
    END IF;

    WITH
    -- one row per requested task, with its options
    input AS MATERIALIZED (
        SELECT c.ord, c.ctx, o.opt, gen_random_uuid() AS task_uuid,
               o.opt->>'idempotency_key' AS idempotency_key,
               coalesce((o.opt->>'priority')::integer, 0) AS priority,
               coalesce((o.opt->>'delay_seconds')::double precision, 0) AS delay
          FROM jsonb_array_elements(p_contexts) WITH ORDINALITY c(ctx, ord)
          CROSS JOIN LATERAL (SELECT CASE WHEN v_per_task THEN p_options->(c.ord::integer - 1) ELSE p_options END AS opt) o
    ),
    -- a repeated idempotency key names an existing task: nothing is created for it
    ins_tasks AS (
        INSERT INTO tasker.tasks (task_uuid, named_task_id, namespace, name, version, state, context,
                                  initiator, source_system, reason, tags, priority, idempotency_key,
                                  correlation_id, total_steps, created_at, updated_at)
        SELECT i.task_uuid, v_tpl, p_namespace, p_name, v_version, 'pending', i.ctx,
               i.opt->>'initiator', i.opt->>'source_system', i.opt->>'reason',
               coalesce(nullif(i.opt->'tags', 'null'::jsonb), '[]'::jsonb), i.priority,
               i.idempotency_key, i.opt->>'correlation_id', v_total, v_now, v_now
          FROM input i
         WHERE i.idempotency_key IS NULL
            OR NOT EXISTS (SELECT 1 FROM tasker.tasks t
                            WHERE t.namespace = p_namespace AND t.name = p_name
                              AND t.idempotency_key = i.idempotency_key)
         ORDER BY i.ord
        ON CONFLICT (namespace, name, idempotency_key) WHERE idempotency_key IS NOT NULL DO NOTHING
        RETURNING task_uuid
    ),
    created AS MATERIALIZED (
        SELECT i.* FROM input i JOIN ins_tasks it ON it.task_uuid = i.task_uuid
    ),
    -- every template step of every new task; roots start enqueued with a message
    new_steps AS MATERIALIZED (
        SELECT gen_random_uuid() AS step_uuid, c.task_uuid, c.priority, c.delay, n.named_step_id, n.name,
               n.parent_names, n.max_attempts, n.retryable, cardinality(n.parent_names) AS parent_count,
               CASE WHEN cardinality(n.parent_names) = 0 THEN nextval(v_seq) END AS msg_id
          FROM created c
          CROSS JOIN tasker.named_steps n
         WHERE n.named_task_id = v_tpl
    ),
    ins_steps AS (
        INSERT INTO tasker.steps (step_uuid, task_uuid, named_step_id, name, state, max_attempts, retryable,
                                  pending_parents, msg_id, enqueued_at, created_at, updated_at)
        SELECT s.step_uuid, s.task_uuid, s.named_step_id, s.name,
               CASE WHEN s.parent_count = 0 THEN 'enqueued' ELSE 'pending' END,
               s.max_attempts, s.retryable, s.parent_count, s.msg_id,
               CASE WHEN s.parent_count = 0 THEN v_now END, v_now, v_now
          FROM new_steps s
    ),
    ins_edges AS (
        INSERT INTO tasker.step_edges (parent_uuid, child_uuid)
        SELECT p.step_uuid, c.step_uuid
          FROM new_steps c
          CROSS JOIN unnest(c.parent_names) pn
          JOIN new_steps p ON p.task_uuid = c.task_uuid AND p.name = pn
    ),
    ins_msgs AS (
        INSERT INTO tasker.queue_messages (queue, msg_id, enqueued_at, vt, priority, message)
        SELECT p_namespace, s.msg_id, v_now, v_now + make_interval(secs => s.delay), s.priority,
               jsonb_build_object('step_uuid', s.step_uuid, 'task_uuid', s.task_uuid)
          FROM new_steps s
         WHERE s.msg_id IS NOT NULL
    ),
    step_audit AS (
        INSERT INTO tasker.step_transitions (step_uuid, task_uuid, from_state, to_state, event, created_at)
        SELECT s.step_uuid, s.task_uuid, NULL, CASE WHEN s.parent_count = 0 THEN 'enqueued' ELSE 'pending' END,
               'created', v_now
          FROM new_steps s
    ),
    task_audit AS (
        INSERT INTO tasker.task_transitions (task_uuid, from_state, to_state, event, metadata, created_at)
        SELECT c.task_uuid, NULL, 'pending', 'created',
               jsonb_build_object('version', v_version, 'initiator', c.opt->>'initiator'), v_now
          FROM created c
    )
    -- the uuids in input order: new tasks, or the original task of a repeated key
    SELECT array_agg(coalesce(c.task_uuid,
                    (SELECT t.task_uuid FROM tasker.tasks t
                      WHERE t.namespace = p_namespace AND t.name = p_name
                        AND t.idempotency_key = i.idempotency_key),
                    (SELECT c2.task_uuid FROM created c2
                      WHERE c2.idempotency_key = i.idempotency_key ORDER BY c2.ord LIMIT 1))
                     ORDER BY i.ord)
      INTO v_ids
      FROM input i
      LEFT JOIN created c ON c.ord = i.ord;

    -- A key that another transaction committed while our insert waited on it is not in this
    -- statement's snapshot: look it up again in a new one.
    RETURN QUERY
    SELECT coalesce(x.id,
                    (SELECT t.task_uuid FROM tasker.tasks t
                      WHERE t.namespace = p_namespace AND t.name = p_name
                        AND t.idempotency_key = CASE WHEN v_per_task THEN p_options->(x.ord::integer - 1)
                                                     ELSE p_options END->>'idempotency_key'))
      FROM unnest(v_ids) WITH ORDINALITY x(id, ord)
     ORDER BY x.ord;

    PERFORM pg_notify('tasker_' || p_namespace, '');
END
$$;

-- Creates a task from a registered template: the task row, its steps and edges, their first
-- transitions, and a message for each root step, in one statement for the whole DAG. Works in
-- the caller's transaction (workers see nothing before it commits; a rollback leaves nothing).
-- A repeated idempotency_key for the same template returns the original task. (create_tasks
-- does the same for many contexts; this one-context path is kept separate because it is about
-- a quarter faster per call, and DBAs call it per row, in triggers too.)
CREATE FUNCTION tasker.create_task(
    p_namespace text,
    p_name      text,
    p_context   jsonb DEFAULT '{}',
    p_version   text DEFAULT NULL,
    p_options   jsonb DEFAULT '{}'
) RETURNS uuid
LANGUAGE plpgsql AS $$
DECLARE
    v_task      uuid := gen_random_uuid();
    v_tpl       bigint;
    v_version   text;
    v_total     integer;
    v_existing  uuid;
    v_key       text;
    v_delay     double precision;
    v_priority  integer;
    v_tags      jsonb;
    v_seq       regclass;
    v_now       timestamptz := clock_timestamp();
    v_size      integer;
BEGIN
    p_context := coalesce(p_context, '{}'::jsonb);
    p_options := coalesce(p_options, '{}'::jsonb);
    IF jsonb_typeof(p_context) <> 'object' THEN
        RAISE EXCEPTION 'task context must be a JSON object, got a JSON %', jsonb_typeof(p_context)
            USING ERRCODE = 'TV020';
    END IF;
    v_size := pg_column_size(p_context);
    IF v_size > tasker.max_payload_bytes() THEN
        RAISE EXCEPTION 'task context is % bytes, more than the limit of % bytes (setting tasker.max_payload_bytes)',
            v_size, tasker.max_payload_bytes() USING ERRCODE = 'TV021';
    END IF;
    PERFORM tasker.check_task_options(p_options, '');
    v_key := p_options->>'idempotency_key';
    v_delay := coalesce((p_options->>'delay_seconds')::double precision, 0);
    v_priority := coalesce((p_options->>'priority')::integer, 0);
    v_tags := coalesce(nullif(p_options->'tags', 'null'::jsonb), '[]'::jsonb);

    -- The template version: the given one, else the newest by semantic-version order.
    SELECT nt.named_task_id, nt.version, nt.step_count INTO v_tpl, v_version, v_total
      FROM tasker.named_tasks nt
     WHERE nt.namespace = p_namespace AND nt.name = p_name
       AND (p_version IS NULL OR nt.version = p_version)
     ORDER BY nt.version_major DESC, nt.version_minor DESC, nt.version_patch DESC,
              nt.version_pre IS NULL DESC, nt.version_pre_key DESC
     LIMIT 1;
    IF NOT FOUND THEN
        PERFORM tasker.raise_unknown_template(p_namespace, p_name, p_version);
    END IF;

    IF v_key IS NOT NULL THEN
        SELECT t.task_uuid INTO v_existing FROM tasker.tasks t
         WHERE t.namespace = p_namespace AND t.name = p_name AND t.idempotency_key = v_key;
        IF FOUND THEN
            RETURN v_existing;
        END IF;
    END IF;

    INSERT INTO tasker.tasks (task_uuid, named_task_id, namespace, name, version, state, context,
                              initiator, source_system, reason, tags, priority, idempotency_key,
                              correlation_id, total_steps, created_at, updated_at)
    VALUES (v_task, v_tpl, p_namespace, p_name, v_version, 'pending', p_context,
            p_options->>'initiator', p_options->>'source_system', p_options->>'reason', v_tags,
            v_priority, v_key, p_options->>'correlation_id', v_total, v_now, v_now)
    ON CONFLICT (namespace, name, idempotency_key) WHERE idempotency_key IS NOT NULL DO NOTHING;
    IF NOT FOUND THEN
        -- a concurrent creator with the same key committed first
        SELECT t.task_uuid INTO v_existing FROM tasker.tasks t
         WHERE t.namespace = p_namespace AND t.name = p_name AND t.idempotency_key = v_key;
        RETURN v_existing;
    END IF;

    SELECT q.msg_seq INTO v_seq FROM tasker.queues q WHERE q.queue_name = p_namespace;
    IF NOT FOUND THEN
        PERFORM tasker.create_queue(p_namespace);
        v_seq := tasker.queue_sequence(p_namespace);
    END IF;

    WITH
    -- the template's steps; roots (no dependencies) start enqueued with a message
    ns AS (
        SELECT n.named_step_id, n.name, n.parent_names, n.max_attempts, n.retryable,
               cardinality(n.parent_names) AS parent_count
          FROM tasker.named_steps n
         WHERE n.named_task_id = v_tpl
    ),
    new_steps AS (
        SELECT gen_random_uuid() AS step_uuid, ns.*,
               CASE WHEN ns.parent_count = 0 THEN nextval(v_seq) END AS msg_id
          FROM ns
    ),
    ins_steps AS (
        INSERT INTO tasker.steps (step_uuid, task_uuid, named_step_id, name, state, max_attempts, retryable,
                                  pending_parents, msg_id, enqueued_at, created_at, updated_at)
        SELECT s.step_uuid, v_task, s.named_step_id, s.name,
               CASE WHEN s.parent_count = 0 THEN 'enqueued' ELSE 'pending' END,
               s.max_attempts, s.retryable, s.parent_count, s.msg_id,
               CASE WHEN s.parent_count = 0 THEN v_now END, v_now, v_now
          FROM new_steps s
        RETURNING step_uuid
    ),
    ins_edges AS (
        INSERT INTO tasker.step_edges (parent_uuid, child_uuid)
        SELECT p.step_uuid, c.step_uuid
          FROM new_steps c
          CROSS JOIN unnest(c.parent_names) pn
          JOIN new_steps p ON p.name = pn
    ),
    ins_msgs AS (
        INSERT INTO tasker.queue_messages (queue, msg_id, enqueued_at, vt, priority, message)
        SELECT p_namespace, s.msg_id, v_now, v_now + make_interval(secs => v_delay), v_priority,
               jsonb_build_object('step_uuid', s.step_uuid, 'task_uuid', v_task)
          FROM new_steps s
         WHERE s.msg_id IS NOT NULL
    ),
    ins_audit AS (
        INSERT INTO tasker.step_transitions (step_uuid, task_uuid, from_state, to_state, event, created_at)
        SELECT s.step_uuid, v_task, NULL, CASE WHEN s.parent_count = 0 THEN 'enqueued' ELSE 'pending' END,
               'created', v_now
          FROM new_steps s
    )
    INSERT INTO tasker.task_transitions (task_uuid, from_state, to_state, event, metadata, created_at)
    VALUES (v_task, NULL, 'pending', 'created',
            jsonb_build_object('version', v_version, 'initiator', p_options->>'initiator'), v_now);

    PERFORM pg_notify('tasker_' || p_namespace, '');
    RETURN v_task;
END
$$;

-- Raises "unknown template", naming what does exist so the caller can fix the call.
CREATE FUNCTION tasker.raise_unknown_template(p_namespace text, p_name text, p_version text) RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
    v_versions text;
    v_names    text;
BEGIN
    SELECT string_agg(nt.version, ', ' ORDER BY nt.version_major, nt.version_minor, nt.version_patch, nt.version_pre_key NULLS LAST)
      INTO v_versions
      FROM tasker.named_tasks nt WHERE nt.namespace = p_namespace AND nt.name = p_name;
    IF v_versions IS NOT NULL THEN
        RAISE EXCEPTION 'template %/% has no version % (registered versions: %)',
            p_namespace, p_name, quote_literal(p_version), v_versions USING ERRCODE = 'TN002';
    END IF;
    SELECT string_agg(DISTINCT nt.name, ', ') INTO v_names FROM tasker.named_tasks nt WHERE nt.namespace = p_namespace;
    RAISE EXCEPTION 'no template %/% is registered (templates in namespace %: %)',
        p_namespace, p_name, quote_literal(p_namespace), coalesce(v_names, 'none')
        USING ERRCODE = 'TN002', HINT = 'register it with tasker.register_template(...) or tasker-pg template register PATH';
END
$$;

-- --------------------------------------------------------------------------------------------
-- Shared pieces of the hot path
-- --------------------------------------------------------------------------------------------

CREATE TYPE tasker.task_delta AS (task_uuid uuid, completed integer, errors integer);
CREATE TYPE tasker.task_change AS (task_uuid uuid, old_state text, new_state text, namespace text, name text);

-- Applies step-count changes to tasks, one counter update per task, locking the tasks in
-- task_uuid order (the last link of the lock order), and moves each task's state:
-- error while any step is in error, complete when every step is complete or resolved,
-- otherwise steps_in_process (the first recorded outcome flips pending). Cancelled and
-- manually resolved tasks keep their state. Each state change gets a transition row and a
-- notification on channel tasker_task_events.
CREATE FUNCTION tasker.apply_task_deltas(p_deltas tasker.task_delta[], p_event text)
RETURNS TABLE (task_uuid uuid, old_state text, new_state text)
LANGUAGE plpgsql AS $$
#variable_conflict use_column
DECLARE
    v_now     timestamptz := clock_timestamp();
    v_changes tasker.task_change[];
BEGIN
    WITH d AS (
            SELECT x.task_uuid, sum(x.completed)::integer AS completed, sum(x.errors)::integer AS errors
              FROM unnest(p_deltas) x
             GROUP BY x.task_uuid
        ),
        -- lock in task_uuid order; skip tasks with nothing to change
        locked AS MATERIALIZED (
            SELECT t.task_uuid, t.state
              FROM tasker.tasks t
              JOIN d ON d.task_uuid = t.task_uuid
             WHERE d.completed <> 0 OR d.errors <> 0 OR t.state = 'pending'
             ORDER BY t.task_uuid
               FOR UPDATE OF t
        ),
        upd AS (
            UPDATE tasker.tasks t
               SET completed_steps = t.completed_steps + d.completed,
                   error_steps = greatest(t.error_steps + d.errors, 0),
                   state = CASE
                       WHEN t.state IN ('cancelled', 'resolved_manually') THEN t.state
                       WHEN t.error_steps + d.errors > 0 THEN 'error'
                       WHEN t.completed_steps + d.completed >= t.total_steps THEN 'complete'
                       ELSE 'steps_in_process'
                   END,
                   completed_at = CASE
                       WHEN t.state NOT IN ('cancelled', 'resolved_manually') AND t.error_steps + d.errors <= 0
                            AND t.completed_steps + d.completed >= t.total_steps THEN v_now
                       ELSE t.completed_at
                   END,
                   updated_at = v_now
              FROM locked l
              JOIN d ON d.task_uuid = l.task_uuid
             WHERE t.task_uuid = l.task_uuid
            RETURNING t.task_uuid, l.state AS old_state, t.state AS new_state, t.namespace, t.name
        ),
        audit AS (
            INSERT INTO tasker.task_transitions (task_uuid, from_state, to_state, event, created_at)
            SELECT u.task_uuid, u.old_state, u.new_state, p_event, v_now
              FROM upd u
             WHERE u.old_state <> u.new_state
        )
        SELECT array_agg(ROW(u.task_uuid, u.old_state, u.new_state, u.namespace, u.name)::tasker.task_change)
          INTO v_changes
          FROM upd u;
    -- one notification per changed task, sent in one statement (delivered at commit)
    PERFORM pg_notify('tasker_task_events', json_build_object(
                'task_uuid', c.task_uuid, 'state', c.new_state, 'previous_state', c.old_state,
                'namespace', c.namespace, 'name', c.name)::text)
       FROM unnest(v_changes) c
      WHERE c.old_state <> c.new_state;
    RETURN QUERY SELECT c.task_uuid, c.old_state, c.new_state FROM unnest(v_changes) c;
END
$$;

-- Decrements the fan-in counter of every child of the given (just satisfied) steps and
-- returns the children that reached zero while pending. Children are locked in step_uuid order
-- first; the counter is changed under that lock, never recomputed from a snapshot, so when two
-- parents complete at the same moment exactly one of them sees it reach zero.
CREATE FUNCTION tasker.release_children(p_parents uuid[]) RETURNS uuid[]
LANGUAGE plpgsql AS $$
DECLARE
    v_ready uuid[];
BEGIN
    PERFORM 1
       FROM tasker.steps s
      WHERE s.step_uuid IN (SELECT e.child_uuid FROM tasker.step_edges e WHERE e.parent_uuid = ANY (p_parents))
      ORDER BY s.step_uuid
        FOR UPDATE;
    WITH d AS (
        SELECT e.child_uuid, count(*)::integer AS n
          FROM tasker.step_edges e
         WHERE e.parent_uuid = ANY (p_parents)
         GROUP BY e.child_uuid
    ),
    upd AS (
        UPDATE tasker.steps s
           SET pending_parents = s.pending_parents - d.n
          FROM d
         WHERE s.step_uuid = d.child_uuid
        RETURNING s.step_uuid, s.pending_parents, s.state
    )
    SELECT array_agg(upd.step_uuid) INTO v_ready
      FROM upd
     WHERE upd.pending_parents <= 0 AND upd.state = 'pending';
    RETURN coalesce(v_ready, '{}');
END
$$;

-- Enqueues the given steps that are (still) pending with every parent satisfied, when their
-- task is running (a task in error starts nothing new): state enqueued, one message each, one
-- notification per queue. Returns how many were enqueued.
CREATE FUNCTION tasker.enqueue_ready(p_steps uuid[], p_event text) RETURNS integer
LANGUAGE plpgsql AS $$
DECLARE
    v_now    timestamptz := clock_timestamp();
    v_queues text[];
    v_count  integer;
BEGIN
    IF cardinality(p_steps) = 0 THEN
        RETURN 0;
    END IF;
    WITH ready AS MATERIALIZED (
        SELECT s.step_uuid, s.task_uuid, t.namespace, t.priority, nextval(q.msg_seq) AS msg_id
          FROM tasker.steps s
          JOIN tasker.tasks t ON t.task_uuid = s.task_uuid
          JOIN tasker.queues q ON q.queue_name = t.namespace
         WHERE s.step_uuid = ANY (p_steps)
           AND s.state = 'pending' AND s.pending_parents <= 0
           AND t.state IN ('pending', 'steps_in_process')
    ),
    msgs AS (
        INSERT INTO tasker.queue_messages (queue, msg_id, enqueued_at, vt, priority, message)
        SELECT r.namespace, r.msg_id, v_now, v_now, r.priority,
               jsonb_build_object('step_uuid', r.step_uuid, 'task_uuid', r.task_uuid)
          FROM ready r
    ),
    upd AS (
        UPDATE tasker.steps s
           SET state = 'enqueued', msg_id = r.msg_id, enqueued_at = v_now, updated_at = v_now
          FROM ready r
         WHERE s.step_uuid = r.step_uuid
        RETURNING s.step_uuid, s.task_uuid
    ),
    audit AS (
        INSERT INTO tasker.step_transitions (step_uuid, task_uuid, from_state, to_state, event, created_at)
        SELECT upd.step_uuid, upd.task_uuid, 'pending', 'enqueued', p_event, v_now FROM upd
    )
    SELECT array_agg(DISTINCT r.namespace), count(*) INTO v_queues, v_count FROM ready r;
    PERFORM pg_notify('tasker_' || q, '') FROM unnest(v_queues) q;
    RETURN v_count;
END
$$;

-- A task that left the error state goes on: steps whose parents completed meanwhile are
-- enqueued, and the messages parked while it was in error become visible again (at their
-- retry time for steps waiting to retry). Messages another session holds are left alone:
-- their holder re-parks or deletes them, and a re-parked one wakes at the next park check.
CREATE FUNCTION tasker.resume_task(p_task uuid) RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
    v_now timestamptz := clock_timestamp();
    v_ns  text;
BEGIN
    PERFORM tasker.enqueue_ready(
        ARRAY(SELECT s.step_uuid FROM tasker.steps s
               WHERE s.task_uuid = p_task AND s.state = 'pending' AND s.pending_parents <= 0),
        'task_resumed');
    WITH parked AS (
        SELECT m.queue, m.msg_id, s.next_attempt_at
          FROM tasker.steps s
          JOIN tasker.tasks t ON t.task_uuid = s.task_uuid
          JOIN tasker.queue_messages m ON m.queue = t.namespace AND m.msg_id = s.msg_id
         WHERE s.task_uuid = p_task
           AND s.state IN ('enqueued', 'waiting_for_retry')
           AND m.vt > v_now
           FOR UPDATE OF m SKIP LOCKED
    )
    UPDATE tasker.queue_messages m
       SET vt = greatest(v_now, coalesce(p.next_attempt_at, v_now))
      FROM parked p
     WHERE m.queue = p.queue AND m.msg_id = p.msg_id;
    SELECT t.namespace INTO v_ns FROM tasker.tasks t WHERE t.task_uuid = p_task;
    PERFORM pg_notify('tasker_' || v_ns, '');
END
$$;

-- --------------------------------------------------------------------------------------------
-- claim_steps
-- --------------------------------------------------------------------------------------------

CREATE TYPE tasker.claim_candidate AS (
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
    v_batch tasker.claim_candidate[];
BEGIN
    IF p_qty IS NULL OR p_qty < 1 THEN
        RAISE EXCEPTION 'qty must be >= 1, got %', coalesce(p_qty::text, 'NULL') USING ERRCODE = 'TV002';
    END IF;
    IF p_lease_seconds IS NULL OR p_lease_seconds <= 0 THEN
        RAISE EXCEPTION 'lease_seconds must be > 0, got %', coalesce(p_lease_seconds::text, 'NULL') USING ERRCODE = 'TV002';
    END IF;
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
               END)::tasker.claim_candidate)
      INTO v_batch
      FROM msgs
      LEFT JOIN locked_steps ls ON ls.step_uuid = msgs.step_uuid;

    IF v_batch IS NULL THEN
        PERFORM tasker.queue_sequence(p_queue);  -- an unknown queue is an error, not "no work"
        RETURN;
    END IF;
    IF EXISTS (SELECT 1 FROM unnest(v_batch) b WHERE b.kind IN ('dead', 'park', 'park_expire', 'expire_fail')) THEN
        PERFORM tasker.claim_exceptions(p_queue, v_batch);
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

-- The rare outcomes of a claim (kept out of the hot statement): messages of finished steps
-- (and messages that name no step of ours) are archived, messages of tasks in error are parked, and a lost lease is charged as an attempt:
-- the step waits to retry (parked if its task is in error) or, out of attempts, goes to error
-- with error type lease_expired, and its task with it.
CREATE FUNCTION tasker.claim_exceptions(p_queue text, p_batch tasker.claim_candidate[]) RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
    v_now    timestamptz := clock_timestamp();
    v_errors tasker.task_delta[];
BEGIN
    -- archived rather than deleted, so a message that was not the engine's can be found again
    PERFORM tasker.archive(p_queue, ARRAY(SELECT b.msg_id FROM unnest(p_batch) b WHERE b.kind = 'dead'));

    UPDATE tasker.queue_messages m
       SET vt = v_now + tasker.park_interval()
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
        UPDATE tasker.queue_messages m SET vt = v_now + tasker.park_interval()
          FROM upd
         WHERE upd.state = 'waiting_for_retry' AND m.queue = p_queue AND m.msg_id = upd.msg_id
    ),
    audit AS (
        INSERT INTO tasker.step_transitions (step_uuid, task_uuid, from_state, to_state, event, attempt, worker_id, error_summary, created_at)
        SELECT upd.step_uuid, upd.task_uuid, 'in_progress', upd.state, 'lease_expired', upd.attempts, upd.worker_id,
               'lease_expired: the worker stopped renewing its lease', v_now
          FROM upd
    )
    SELECT array_agg(ROW(upd.task_uuid, 0, 1)::tasker.task_delta) INTO v_errors
      FROM upd WHERE upd.state = 'error';
    IF v_errors IS NOT NULL THEN
        PERFORM tasker.apply_task_deltas(v_errors, 'step_failed');
    END IF;
END
$$;

-- --------------------------------------------------------------------------------------------
-- complete_steps
-- --------------------------------------------------------------------------------------------

CREATE TYPE tasker.outcome_input AS (
    ord          integer,
    step_uuid    uuid,
    attempt      integer,
    claim_seq    integer,
    kind         text,
    result       jsonb,
    metadata     jsonb,
    error        jsonb,
    checkpoint   jsonb,
    duration_ms  double precision,
    worker_id    text
);

CREATE TYPE tasker.applied_outcome AS (
    ord        integer,
    step_uuid  uuid,
    task_uuid  uuid,
    queue      text,
    new_state  text
);

-- Applies a batch of handler outcomes (success, failure, checkpoint), each fenced by
-- (step_uuid, attempt[, claim_seq]) in the WHERE clause of the step row it changes: an outcome
-- whose claim is no longer current (lease lost, step cancelled, already applied) is answered
-- 'stale' and changes nothing. Everything that follows from the applied ones commits with
-- them: results, children released and enqueued, messages deleted or moved, task counters
-- and states, audit rows.
CREATE FUNCTION tasker.complete_steps(p_outcomes jsonb)
RETURNS TABLE (step_uuid uuid, attempt integer, status text, detail text)
LANGUAGE plpgsql AS $$
#variable_conflict use_column
DECLARE
    v_now       timestamptz := clock_timestamp();
    v_limit     integer := tasker.max_payload_bytes();
    v_in        tasker.outcome_input[];
    v_applied   tasker.applied_outcome[];
    v_completed uuid[];
    v_ready     uuid[];
    v_deltas    tasker.task_delta[];
    v_bad       text;
BEGIN
    IF p_outcomes IS NULL OR jsonb_typeof(p_outcomes) <> 'array' THEN
        RAISE EXCEPTION 'outcomes must be a JSON array' USING ERRCODE = 'TV030';
    END IF;
    -- Refuse a malformed batch before anything changes, naming the first bad entry.
    SELECT format('outcome #%s: %s', x.ord, x.problem) INTO v_bad
      FROM (
        SELECT e.ord,
               CASE
                   WHEN jsonb_typeof(e.o) <> 'object' THEN 'must be a JSON object'
                   WHEN coalesce(e.o->>'step_uuid', '') !~* '^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$'
                       THEN 'step_uuid must be a uuid'
                   WHEN NOT tasker.is_int_json(e.o->'attempt', 1) THEN 'attempt must be an integer >= 1'
                   WHEN jsonb_typeof(e.o->'claim_seq') <> 'null' AND NOT tasker.is_int_json(e.o->'claim_seq', 0)
                       THEN 'claim_seq must be an integer >= 0'
                   WHEN coalesce(e.o->>'kind', '') NOT IN ('success', 'failure', 'checkpoint')
                       THEN 'kind must be success, failure or checkpoint'
                   WHEN e.o->>'kind' = 'failure' AND jsonb_typeof(e.o->'error') IS DISTINCT FROM 'object'
                       THEN 'a failure needs an error object'
                   WHEN e.o->>'kind' = 'checkpoint' AND jsonb_typeof(e.o->'checkpoint') IS DISTINCT FROM 'object'
                       THEN 'a checkpoint needs a checkpoint object'
                   WHEN jsonb_typeof(e.o->'metadata') NOT IN ('object', 'null') THEN 'metadata must be an object'
                   WHEN e.o->>'kind' = 'failure' AND NOT tasker.is_number_json(e.o->'error'->'retry_after', 0, 31536000)
                       THEN 'error.retry_after must be a number of seconds between 0 and a year'
                   WHEN e.o->>'kind' = 'failure' AND jsonb_typeof(e.o->'error'->'retryable') NOT IN ('boolean', 'null')
                       THEN 'error.retryable must be true or false'
                   WHEN NOT tasker.is_number_json(e.o->'duration_ms', 0, 1e15) THEN 'duration_ms must be a number >= 0'
               END AS problem
          FROM jsonb_array_elements(p_outcomes) WITH ORDINALITY e(o, ord)
      ) x
     WHERE x.problem IS NOT NULL
     ORDER BY x.ord
     LIMIT 1;
    IF v_bad IS NOT NULL THEN
        RAISE EXCEPTION '%', v_bad USING ERRCODE = 'TV030';
    END IF;

    -- An oversized result or checkpoint is not stored: it becomes a permanent failure that
    -- says why, so a bad handler cannot bloat the tables.
    v_in := ARRAY(
        SELECT ROW(e.ord::integer, (e.o->>'step_uuid')::uuid, (e.o->>'attempt')::numeric::integer,
                   (e.o->>'claim_seq')::numeric::integer,
                   CASE WHEN e.too_big THEN 'failure' ELSE e.o->>'kind' END,
                   CASE WHEN e.too_big THEN NULL ELSE e.o->'result' END,
                   nullif(e.o->'metadata', 'null'::jsonb),
                   CASE WHEN e.too_big THEN jsonb_build_object(
                            'message', format('the step''s %s is %s bytes, more than the limit of %s bytes (setting tasker.max_payload_bytes)',
                                              CASE WHEN e.o->>'kind' = 'checkpoint' THEN 'checkpoint' ELSE 'result' END,
                                              greatest(pg_column_size(e.o->'result'), pg_column_size(e.o->'checkpoint')), v_limit),
                            'error_type', 'result_too_large', 'error_code', 'result_too_large', 'retryable', false)
                        ELSE e.o->'error' END,
                   CASE WHEN e.too_big THEN NULL ELSE e.o->'checkpoint' END,
                   (e.o->>'duration_ms')::double precision, e.o->>'worker_id')::tasker.outcome_input
          FROM (SELECT a.o, a.ord,
                       coalesce(pg_column_size(a.o->'result'), 0) > v_limit
                       OR coalesce(pg_column_size(a.o->'checkpoint'), 0) > v_limit AS too_big
                  FROM jsonb_array_elements(p_outcomes) WITH ORDINALITY a(o, ord)) e);

    -- 1. Lock the live messages of the claimed steps first, in (queue, msg_id) order: the lock
    --    order every function follows. A claim racing for the same message skips it.
    PERFORM 1
       FROM (SELECT t.namespace, s.msg_id
               FROM unnest(v_in) i
               JOIN tasker.steps s ON s.step_uuid = i.step_uuid
               JOIN tasker.tasks t ON t.task_uuid = s.task_uuid
              WHERE s.state = 'in_progress' AND s.attempts = i.attempt) x
       JOIN tasker.queue_messages m ON m.queue = x.namespace AND m.msg_id = x.msg_id
      ORDER BY m.queue, m.msg_id
        FOR UPDATE OF m;

    WITH
    -- 2. What each outcome means for its step, computed against the current claim.
    prep AS (
        SELECT i.*, s.task_uuid, t.namespace AS queue, s.msg_id, s.claim_seq AS current_claim,
               CASE
                   WHEN i.kind = 'success' THEN 'complete'
                   WHEN i.kind = 'checkpoint' THEN 'in_progress'
                   -- a retry needs a retryable failure, a retryable step, and an attempt left
                   WHEN coalesce((i.error->>'retryable')::boolean, true) AND s.retryable
                        AND s.attempts < s.max_attempts THEN 'waiting_for_retry'
                   ELSE 'error'
               END AS new_state,
               CASE WHEN i.kind = 'failure' THEN
                   v_now + make_interval(secs => coalesce(
                       (i.error->>'retry_after')::double precision,
                       (SELECT tasker.backoff_seconds(n.backoff, n.backoff_base_ms, n.max_backoff_ms, n.jitter, s.attempts)
                          FROM tasker.named_steps n WHERE n.named_step_id = s.named_step_id)))
               END AS retry_at
          FROM unnest(v_in) i
          JOIN tasker.steps s ON s.step_uuid = i.step_uuid
          JOIN tasker.tasks t ON t.task_uuid = s.task_uuid
         WHERE s.state = 'in_progress' AND s.attempts = i.attempt
           AND (i.claim_seq IS NULL OR s.claim_seq = i.claim_seq)
           AND NOT s.continuation
    ),
    -- 3. Apply, fenced in the WHERE clause of the row itself (re-checked after a lock wait).
    upd AS (
        UPDATE tasker.steps s
           SET state = p.new_state,
               results = CASE WHEN p.kind = 'success' THEN p.result ELSE s.results END,
               metadata = CASE WHEN p.kind <> 'checkpoint' THEN coalesce(p.metadata, s.metadata) ELSE s.metadata END,
               last_error = CASE WHEN p.kind = 'failure'
                                 THEN p.error || jsonb_build_object('attempt', s.attempts, 'worker_id', p.worker_id, 'at', v_now)
                                 ELSE s.last_error END,
               checkpoint = CASE WHEN p.kind = 'checkpoint' THEN p.checkpoint ELSE s.checkpoint END,
               continuation = (p.kind = 'checkpoint'),
               next_attempt_at = CASE WHEN p.new_state = 'waiting_for_retry' THEN p.retry_at END,
               msg_id = CASE WHEN p.new_state IN ('complete', 'error') THEN NULL ELSE s.msg_id END,
               completed_at = CASE WHEN p.new_state IN ('complete', 'error') THEN v_now ELSE s.completed_at END,
               updated_at = v_now
          FROM prep p
         WHERE s.step_uuid = p.step_uuid
           AND s.state = 'in_progress' AND s.attempts = p.attempt AND s.claim_seq = p.current_claim
           AND NOT s.continuation
        RETURNING p.ord, s.step_uuid, s.task_uuid, p.queue, p.msg_id, p.new_state, p.kind, s.attempts,
                  p.worker_id, p.duration_ms, p.error, p.retry_at
    ),
    -- 4. A finished step's message goes; a retry's becomes visible at its retry time, a
    --    checkpoint continuation's at once.
    drop_msgs AS (
        DELETE FROM tasker.queue_messages m USING upd
         WHERE upd.new_state IN ('complete', 'error') AND m.queue = upd.queue AND m.msg_id = upd.msg_id
    ),
    move_msgs AS (
        UPDATE tasker.queue_messages m
           SET vt = CASE WHEN upd.new_state = 'waiting_for_retry' THEN upd.retry_at ELSE v_now END
          FROM upd
         WHERE upd.new_state IN ('waiting_for_retry', 'in_progress') AND m.queue = upd.queue AND m.msg_id = upd.msg_id
    ),
    audit AS (
        INSERT INTO tasker.step_transitions (step_uuid, task_uuid, from_state, to_state, event, attempt, worker_id,
                                             duration_ms, error_summary, created_at)
        SELECT upd.step_uuid, upd.task_uuid, 'in_progress', upd.new_state,
               CASE upd.kind
                   WHEN 'success' THEN 'succeeded'
                   WHEN 'checkpoint' THEN 'checkpointed'
                   ELSE CASE upd.new_state WHEN 'error' THEN 'failed' ELSE 'retry_scheduled' END
               END,
               upd.attempts, upd.worker_id, upd.duration_ms,
               CASE WHEN upd.kind = 'failure'
                    THEN left(coalesce(upd.error->>'error_type', 'error') || ': ' || coalesce(upd.error->>'message', ''), 500)
               END,
               v_now
          FROM upd
    )
    SELECT array_agg(ROW(upd.ord, upd.step_uuid, upd.task_uuid, upd.queue, upd.new_state)::tasker.applied_outcome)
      INTO v_applied
      FROM upd;

    IF v_applied IS NOT NULL THEN
        -- 5. Children of completed steps: counters under row lock (children by step_uuid).
        v_completed := ARRAY(SELECT a.step_uuid FROM unnest(v_applied) a WHERE a.new_state = 'complete');
        IF cardinality(v_completed) > 0 THEN
            v_ready := tasker.release_children(v_completed);
        END IF;
        -- 6. Tasks: one counter update each, in task_uuid order.
        v_deltas := ARRAY(
            SELECT ROW(a.task_uuid,
                       count(*) FILTER (WHERE a.new_state = 'complete'),
                       count(*) FILTER (WHERE a.new_state = 'error'))::tasker.task_delta
              FROM unnest(v_applied) a
             GROUP BY a.task_uuid);
        PERFORM tasker.apply_task_deltas(v_deltas, 'step_outcome');
        -- 7. Enqueue children that became ready (when their task is still running).
        IF cardinality(v_ready) > 0 THEN
            PERFORM tasker.enqueue_ready(v_ready, 'dependencies_satisfied');
        END IF;
        -- A checkpoint continuation is visible now: wake a worker.
        PERFORM pg_notify('tasker_' || q.queue, '')
           FROM (SELECT DISTINCT a.queue FROM unnest(v_applied) a WHERE a.new_state = 'in_progress') q;
    END IF;

    RETURN QUERY
    SELECT i.step_uuid, i.attempt,
           CASE WHEN a.ord IS NOT NULL THEN 'applied' ELSE 'stale' END,
           CASE WHEN a.ord IS NOT NULL THEN a.new_state
                ELSE coalesce(
                    (SELECT format('step is %s at attempt %s, claim %s', s.state, s.attempts, s.claim_seq)
                       FROM tasker.steps s WHERE s.step_uuid = i.step_uuid),
                    'no such step')
           END
      FROM unnest(v_in) i
      LEFT JOIN unnest(v_applied) a ON a.ord = i.ord
     ORDER BY i.ord;
END
$$;

-- --------------------------------------------------------------------------------------------
-- Leases: heartbeat and graceful hand-back
-- --------------------------------------------------------------------------------------------

-- Parses a claim list [{step_uuid, attempt, claim_seq}] (as claim_steps returned them) and
-- refuses a malformed one naming the entry. Shared by extend_leases and release_steps.
CREATE FUNCTION tasker.parse_claims(p_claims jsonb)
RETURNS TABLE (ord integer, step_uuid uuid, attempt integer, claim_seq integer)
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
                       WHEN NOT tasker.is_int_json(e.c->'attempt', 1) THEN 'attempt must be an integer >= 1'
                       WHEN e.c->'claim_seq' IS NOT NULL AND jsonb_typeof(e.c->'claim_seq') <> 'null'
                            AND NOT tasker.is_int_json(e.c->'claim_seq', 0) THEN 'claim_seq must be an integer >= 0'
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

-- Locks the messages of the given claims, in lock order. extend_leases and release_steps then
-- re-check each claim's fence on the step in a new statement (a fence read through a join is
-- not re-checked after waiting for a lock).
CREATE FUNCTION tasker.lock_claim_messages(p_claims jsonb) RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM 1
       FROM (SELECT t.namespace, s.msg_id
               FROM tasker.parse_claims(p_claims) c
               JOIN tasker.steps s ON s.step_uuid = c.step_uuid
               JOIN tasker.tasks t ON t.task_uuid = s.task_uuid
              WHERE s.state = 'in_progress' AND s.attempts = c.attempt) x
       JOIN tasker.queue_messages m ON m.queue = x.namespace AND m.msg_id = x.msg_id
      ORDER BY m.queue, m.msg_id
        FOR UPDATE OF m;
END
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
    PERFORM tasker.lock_claim_messages(p_claims);
    v_lease := clock_timestamp() + make_interval(secs => p_lease_seconds);
    RETURN QUERY
    WITH c AS (
        SELECT * FROM tasker.parse_claims(p_claims)
    ),
    current_claims AS (
        SELECT c.ord, t.namespace, s.msg_id
          FROM c
          JOIN tasker.steps s ON s.step_uuid = c.step_uuid
          JOIN tasker.tasks t ON t.task_uuid = s.task_uuid
         WHERE s.state = 'in_progress' AND s.attempts = c.attempt
           AND (c.claim_seq IS NULL OR s.claim_seq = c.claim_seq)
           AND NOT s.continuation
    ),
    upd AS (
        UPDATE tasker.queue_messages m
           SET vt = v_lease
          FROM current_claims cc
         WHERE m.queue = cc.namespace AND m.msg_id = cc.msg_id
        RETURNING cc.ord
    )
    SELECT c.step_uuid, upd.ord IS NOT NULL, CASE WHEN upd.ord IS NOT NULL THEN v_lease END
      FROM c LEFT JOIN (SELECT DISTINCT upd.ord FROM upd) upd ON upd.ord = c.ord
     ORDER BY c.ord;
END
$$;

-- Graceful shutdown: hands back claims whose handler never started. The attempt the claim
-- started is given back (a checkpoint continuation goes back to waiting for its continuation)
-- and the message is visible at once for another worker. One row per claim, in input order.
CREATE FUNCTION tasker.release_steps(p_claims jsonb)
RETURNS TABLE (step_uuid uuid, released boolean)
LANGUAGE plpgsql AS $$
#variable_conflict use_column
DECLARE
    v_now timestamptz := clock_timestamp();
BEGIN
    PERFORM tasker.lock_claim_messages(p_claims);
    RETURN QUERY
    WITH c AS (
        SELECT * FROM tasker.parse_claims(p_claims)
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
               next_attempt_at = CASE WHEN s.claim_spent_attempt AND s.attempts - 1 > 0 THEN v_now END,
               worker_id = NULL,
               updated_at = v_now
          FROM c
         WHERE s.step_uuid = c.step_uuid
           AND s.state = 'in_progress' AND s.attempts = c.attempt
           AND (c.claim_seq IS NULL OR s.claim_seq = c.claim_seq)
           AND NOT s.continuation
        RETURNING c.ord, s.step_uuid, s.task_uuid, s.state, s.attempts, s.msg_id
    ),
    msgs AS (
        UPDATE tasker.queue_messages m
           SET vt = v_now
          FROM upd JOIN tasker.tasks t ON t.task_uuid = upd.task_uuid
         WHERE m.queue = t.namespace AND m.msg_id = upd.msg_id
        RETURNING m.queue
    ),
    audit AS (
        INSERT INTO tasker.step_transitions (step_uuid, task_uuid, from_state, to_state, event, attempt, created_at)
        SELECT upd.step_uuid, upd.task_uuid, 'in_progress', upd.state, 'released', upd.attempts, v_now FROM upd
    ),
    notified AS (
        SELECT count(pg_notify('tasker_' || q.queue, '')) AS n FROM (SELECT DISTINCT msgs.queue FROM msgs) q
    )
    SELECT c.step_uuid, upd.ord IS NOT NULL
      FROM c
      LEFT JOIN upd ON upd.ord = c.ord
     CROSS JOIN notified
     ORDER BY c.ord;
END
$$;

-- --------------------------------------------------------------------------------------------
-- Operator functions
-- --------------------------------------------------------------------------------------------

-- Serialises the operator functions (cancel_task, retry_step, resolve_step) of one task. They
-- lock steps in different orders (all steps of the task; a step then its children; a step,
-- the task, then ready steps), so two of them on one task could deadlock; the hot path never
-- takes this lock, so it cannot take part in a cycle with it.
CREATE FUNCTION tasker.lock_task_operations(p_task uuid) RETURNS void
LANGUAGE sql AS $$
    SELECT pg_advisory_xact_lock(hashtextextended('tasker.task_operations:' || p_task::text, 0))
     WHERE p_task IS NOT NULL
$$;

-- Cancels a task: every step not yet finished becomes cancelled and loses its message, so any
-- outcome still coming from a worker is stale. Refuses a task that is already finished.
CREATE FUNCTION tasker.cancel_task(p_task uuid, p_reason text DEFAULT NULL) RETURNS jsonb
LANGUAGE plpgsql AS $$
DECLARE
    v_state text;
    v_ns    text;
    v_count integer;
    v_now   timestamptz := clock_timestamp();
BEGIN
    SELECT t.state, t.namespace INTO v_state, v_ns FROM tasker.tasks t WHERE t.task_uuid = p_task;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'task % does not exist', p_task USING ERRCODE = 'TN003';
    END IF;
    PERFORM tasker.lock_task_operations(p_task);
    -- Lock order: the task's messages, its steps, then the task.
    PERFORM 1
       FROM tasker.steps s
       JOIN tasker.queue_messages m ON m.queue = v_ns AND m.msg_id = s.msg_id
      WHERE s.task_uuid = p_task
      ORDER BY m.queue, m.msg_id
        FOR UPDATE OF m;
    PERFORM 1 FROM tasker.steps s WHERE s.task_uuid = p_task ORDER BY s.step_uuid FOR UPDATE;
    SELECT t.state INTO v_state FROM tasker.tasks t WHERE t.task_uuid = p_task FOR UPDATE;
    IF v_state IN ('complete', 'cancelled', 'resolved_manually') THEN
        RAISE EXCEPTION 'task % is % and cannot be cancelled', p_task, v_state USING ERRCODE = 'TS001';
    END IF;
    v_state := tasker.effective_task_state(p_task, v_state);

    DELETE FROM tasker.queue_messages m
     USING tasker.steps s
     WHERE s.task_uuid = p_task AND m.queue = v_ns AND m.msg_id = s.msg_id;

    WITH old AS (
        SELECT s.step_uuid, s.state, s.attempts
          FROM tasker.steps s
         WHERE s.task_uuid = p_task AND s.state NOT IN ('complete', 'cancelled', 'resolved_manually')
    ),
    upd AS (
        UPDATE tasker.steps s
           SET state = 'cancelled', msg_id = NULL, continuation = false, completed_at = v_now, updated_at = v_now
          FROM old
         WHERE s.step_uuid = old.step_uuid
        RETURNING s.step_uuid, old.state AS from_state, old.attempts
    ),
    audit AS (
        INSERT INTO tasker.step_transitions (step_uuid, task_uuid, from_state, to_state, event, attempt, metadata, created_at)
        SELECT upd.step_uuid, p_task, upd.from_state, 'cancelled', 'task_cancelled', upd.attempts,
               jsonb_build_object('reason', p_reason), v_now
          FROM upd
    )
    SELECT count(*) INTO v_count FROM upd;

    UPDATE tasker.tasks t
       SET state = 'cancelled', error_steps = 0, completed_at = v_now, updated_at = v_now
     WHERE t.task_uuid = p_task;
    INSERT INTO tasker.task_transitions (task_uuid, from_state, to_state, event, metadata, created_at)
    VALUES (p_task, v_state, 'cancelled', 'cancelled', jsonb_build_object('reason', p_reason), v_now);
    PERFORM pg_notify('tasker_task_events', json_build_object(
        'task_uuid', t.task_uuid, 'state', 'cancelled', 'previous_state', v_state,
        'namespace', t.namespace, 'name', t.name)::text)
       FROM tasker.tasks t WHERE t.task_uuid = p_task;
    RETURN jsonb_build_object('task_uuid', p_task, 'previous_state', v_state, 'state', 'cancelled',
                              'cancelled_steps', v_count);
END
$$;

-- Retries a step that is in error: attempts start again from zero, the step is enqueued, and
-- its task leaves the error state when no other step is in error (then steps whose parents
-- completed meanwhile are enqueued too). Refuses any other state.
CREATE FUNCTION tasker.retry_step(p_step uuid) RETURNS jsonb
LANGUAGE plpgsql AS $$
DECLARE
    v_step  tasker.steps%ROWTYPE;
    v_ns    text;
    v_prio  integer;
    v_msg   bigint;
    v_task  text;
    v_now   timestamptz := clock_timestamp();
BEGIN
    PERFORM tasker.lock_task_operations((SELECT s.task_uuid FROM tasker.steps s WHERE s.step_uuid = p_step));
    -- A step in error has no message: its row is the first lock.
    SELECT * INTO v_step FROM tasker.steps s WHERE s.step_uuid = p_step FOR UPDATE;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'step % does not exist', p_step USING ERRCODE = 'TN004';
    END IF;
    IF v_step.state <> 'error' THEN
        RAISE EXCEPTION 'step % (%) is %; only a step in error can be retried', v_step.name, p_step, v_step.state
            USING ERRCODE = 'TS002';
    END IF;
    SELECT t.namespace, t.priority INTO v_ns, v_prio FROM tasker.tasks t WHERE t.task_uuid = v_step.task_uuid;
    v_msg := nextval(tasker.queue_sequence(v_ns));
    INSERT INTO tasker.queue_messages (queue, msg_id, enqueued_at, vt, priority, message)
    VALUES (v_ns, v_msg, v_now, v_now, v_prio, jsonb_build_object('step_uuid', p_step, 'task_uuid', v_step.task_uuid));
    UPDATE tasker.steps s
       SET state = 'enqueued', attempts = 0, claim_spent_attempt = false, continuation = false,
           next_attempt_at = NULL, completed_at = NULL, msg_id = v_msg, enqueued_at = v_now, updated_at = v_now
     WHERE s.step_uuid = p_step;
    INSERT INTO tasker.step_transitions (step_uuid, task_uuid, from_state, to_state, event, attempt, created_at)
    VALUES (p_step, v_step.task_uuid, 'error', 'enqueued', 'retry_requested', v_step.attempts, v_now);
    PERFORM pg_notify('tasker_' || v_ns, '');

    SELECT d.new_state INTO v_task
      FROM tasker.apply_task_deltas(ARRAY[ROW(v_step.task_uuid, 0, -1)::tasker.task_delta], 'step_retried') d;
    IF v_task IN ('pending', 'steps_in_process') THEN
        PERFORM tasker.resume_task(v_step.task_uuid);
    END IF;
    RETURN jsonb_build_object('step_uuid', p_step, 'state', 'enqueued', 'task_uuid', v_step.task_uuid,
                              'task_state', v_task);
END
$$;

-- Completes a step by hand (from any unfinished state) with the given result; it satisfies
-- its children like a success. A step in error that is resolved lets its task go on.
CREATE FUNCTION tasker.resolve_step(p_step uuid, p_result jsonb DEFAULT NULL) RETURNS jsonb
LANGUAGE plpgsql AS $$
DECLARE
    v_msg    bigint;
    v_ns     text;
    v_task   uuid;
    v_state  text;
    v_cur    bigint;
    v_ready  uuid[];
    v_tstate text;
    v_now    timestamptz := clock_timestamp();
BEGIN
    IF pg_column_size(p_result) > tasker.max_payload_bytes() THEN
        RAISE EXCEPTION 'result is % bytes, more than the limit of % bytes (setting tasker.max_payload_bytes)',
            pg_column_size(p_result), tasker.max_payload_bytes() USING ERRCODE = 'TV021';
    END IF;
    PERFORM tasker.lock_task_operations((SELECT s.task_uuid FROM tasker.steps s WHERE s.step_uuid = p_step));
    -- Lock order: the step's message (if it has one), then the step. The message can change
    -- between reading the step and locking it; try again until both agree.
    LOOP
        SELECT s.msg_id, t.namespace, s.task_uuid INTO v_msg, v_ns, v_task
          FROM tasker.steps s JOIN tasker.tasks t ON t.task_uuid = s.task_uuid
         WHERE s.step_uuid = p_step;
        IF NOT FOUND THEN
            RAISE EXCEPTION 'step % does not exist', p_step USING ERRCODE = 'TN004';
        END IF;
        IF v_msg IS NOT NULL THEN
            PERFORM 1 FROM tasker.queue_messages m WHERE m.queue = v_ns AND m.msg_id = v_msg FOR UPDATE;
        END IF;
        SELECT s.state, s.msg_id INTO v_state, v_cur FROM tasker.steps s WHERE s.step_uuid = p_step FOR UPDATE;
        EXIT WHEN v_cur IS NOT DISTINCT FROM v_msg;
    END LOOP;
    IF v_state IN ('complete', 'cancelled', 'resolved_manually') THEN
        RAISE EXCEPTION 'step % is % and cannot be resolved', p_step, v_state USING ERRCODE = 'TS003';
    END IF;
    IF v_msg IS NOT NULL THEN
        DELETE FROM tasker.queue_messages m WHERE m.queue = v_ns AND m.msg_id = v_msg;
    END IF;
    UPDATE tasker.steps s
       SET state = 'resolved_manually', results = p_result, msg_id = NULL, continuation = false,
           completed_at = v_now, updated_at = v_now
     WHERE s.step_uuid = p_step;
    INSERT INTO tasker.step_transitions (step_uuid, task_uuid, from_state, to_state, event, created_at)
    SELECT p_step, v_task, v_state, 'resolved_manually', 'resolved', v_now;

    v_ready := tasker.release_children(ARRAY[p_step]);
    SELECT d.new_state INTO v_tstate
      FROM tasker.apply_task_deltas(
               ARRAY[ROW(v_task, 1, CASE WHEN v_state = 'error' THEN -1 ELSE 0 END)::tasker.task_delta],
               'step_resolved') d;
    PERFORM tasker.enqueue_ready(v_ready, 'dependencies_satisfied');
    IF v_state = 'error' AND v_tstate IN ('pending', 'steps_in_process') THEN
        PERFORM tasker.resume_task(v_task);
    END IF;
    RETURN jsonb_build_object('step_uuid', p_step, 'previous_state', v_state, 'state', 'resolved_manually',
                              'task_uuid', v_task, 'task_state', v_tstate);
END
$$;

-- --------------------------------------------------------------------------------------------
-- Inspection
-- --------------------------------------------------------------------------------------------

-- The task state as users should see it: a pending task with a claimed step is in process.
CREATE FUNCTION tasker.effective_task_state(p_task uuid, p_state text) RETURNS text
LANGUAGE sql STABLE AS $$
    SELECT CASE
        WHEN p_state = 'pending' AND EXISTS (
            SELECT 1 FROM tasker.steps s WHERE s.task_uuid = p_task AND (s.attempts > 0 OR s.state <> 'pending' AND s.state <> 'enqueued'))
        THEN 'steps_in_process'
        ELSE p_state
    END
$$;

-- Per step of a task: is it ready, and if it is not running, why not, in plain words.
CREATE FUNCTION tasker.step_readiness(p_task uuid)
RETURNS TABLE (
    step_uuid uuid, name text, state text, attempts integer, max_attempts integer,
    dependencies_satisfied boolean, parents_total integer, parents_completed integer,
    retry_eligible boolean, ready boolean, next_attempt_at timestamptz, reason text
)
LANGUAGE plpgsql STABLE ROWS 10 AS $$
#variable_conflict use_column
BEGIN
    IF NOT EXISTS (SELECT 1 FROM tasker.tasks t WHERE t.task_uuid = p_task) THEN
        RAISE EXCEPTION 'task % does not exist', p_task USING ERRCODE = 'TN003';
    END IF;
    RETURN QUERY
    SELECT s.step_uuid, s.name, s.state, s.attempts, s.max_attempts,
           p.total = p.done, p.total, p.done,
           s.retryable AND s.attempts < s.max_attempts,
           -- the same decision claim_steps makes: a checkpoint continuation goes on even while
           -- its task is in error (it was running); nothing else starts then
           (s.state = 'in_progress' AND s.continuation AND t.state IN ('pending', 'steps_in_process', 'error'))
           OR (t.state IN ('pending', 'steps_in_process') AND (
               (s.state = 'enqueued' AND coalesce(m.vt <= clock_timestamp(), false))
               OR (s.state = 'waiting_for_retry' AND coalesce(s.next_attempt_at <= clock_timestamp(), false)))),
           CASE WHEN s.state = 'waiting_for_retry' THEN s.next_attempt_at
                WHEN s.state = 'enqueued' THEN m.vt END,
           CASE
               WHEN s.state = 'complete' THEN 'complete'
               WHEN s.state = 'resolved_manually' THEN 'resolved manually'
               WHEN s.state = 'cancelled' THEN 'cancelled'
               WHEN s.state = 'error' THEN
                   'failed: ' || coalesce(s.last_error->>'error_type', 'error') || ': ' ||
                   coalesce(s.last_error->>'message', '') || ' (tasker.retry_step or tasker.resolve_step)'
               WHEN t.state = 'cancelled' THEN 'task is cancelled'
               WHEN t.state = 'error' AND s.state <> 'in_progress' THEN 'task is in error'
               WHEN s.state = 'pending' AND p.total > p.done THEN 'waiting for ' || p.waiting
               WHEN s.state = 'pending' THEN 'dependencies complete, about to be enqueued'
               WHEN s.state = 'enqueued' AND m.vt > clock_timestamp() THEN 'scheduled to start at ' || to_char(m.vt, 'HH24:MI:SS')
               WHEN s.state = 'enqueued' THEN 'ready: waiting for a worker'
               WHEN s.state = 'waiting_for_retry' THEN
                   'retry at ' || to_char(s.next_attempt_at, 'HH24:MI:SS') || ' (attempt ' || (s.attempts + 1) || ' of ' || s.max_attempts || ')'
               WHEN s.state = 'in_progress' AND s.continuation THEN 'checkpointed: waiting to continue'
               WHEN s.state = 'in_progress' AND m.vt <= clock_timestamp() THEN
                   'lease expired at ' || to_char(m.vt, 'HH24:MI:SS') || '; the next claim retries it'
               WHEN s.state = 'in_progress' THEN
                   'running on ' || coalesce(s.worker_id, '?') || ' (attempt ' || s.attempts || ' of ' || s.max_attempts || ')'
               ELSE s.state
           END
      FROM tasker.steps s
      JOIN tasker.tasks t ON t.task_uuid = s.task_uuid
      JOIN tasker.named_steps ns ON ns.named_step_id = s.named_step_id
      LEFT JOIN tasker.queue_messages m ON m.queue = t.namespace AND m.msg_id = s.msg_id
      CROSS JOIN LATERAL (
          SELECT count(*)::integer AS total,
                 (count(*) FILTER (WHERE ps.state IN ('complete', 'resolved_manually')))::integer AS done,
                 string_agg(ps.name, ', ' ORDER BY ps.name) FILTER (WHERE ps.state NOT IN ('complete', 'resolved_manually')) AS waiting
            FROM tasker.steps ps
           WHERE ps.task_uuid = s.task_uuid AND ps.name = ANY (ns.parent_names)
      ) p
     WHERE s.task_uuid = p_task
     ORDER BY ns.step_index;
END
$$;

-- Counts per step state and what the task is doing as a whole: all_complete |
-- blocked_by_failures | has_ready_steps | processing | waiting_for_retry |
-- waiting_for_dependencies (cancelled for a cancelled task).
CREATE FUNCTION tasker.task_execution_context(p_task uuid)
RETURNS TABLE (
    task_uuid uuid, state text, total_steps integer, pending_steps integer, enqueued_steps integer,
    in_progress_steps integer, waiting_for_retry_steps integer, complete_steps integer,
    error_steps integer, cancelled_steps integer, resolved_steps integer, ready_steps integer,
    execution_status text, completion_percentage numeric
)
LANGUAGE plpgsql STABLE ROWS 1 AS $$
#variable_conflict use_column
BEGIN
    IF NOT EXISTS (SELECT 1 FROM tasker.tasks t WHERE t.task_uuid = p_task) THEN
        RAISE EXCEPTION 'task % does not exist', p_task USING ERRCODE = 'TN003';
    END IF;
    RETURN QUERY
    WITH c AS (
        SELECT count(*)::integer AS total,
               (count(*) FILTER (WHERE r.state = 'pending'))::integer AS pending,
               (count(*) FILTER (WHERE r.state = 'enqueued'))::integer AS enqueued,
               (count(*) FILTER (WHERE r.state = 'in_progress'))::integer AS in_progress,
               (count(*) FILTER (WHERE r.state = 'waiting_for_retry'))::integer AS waiting,
               (count(*) FILTER (WHERE r.state = 'complete'))::integer AS complete,
               (count(*) FILTER (WHERE r.state = 'error'))::integer AS error,
               (count(*) FILTER (WHERE r.state = 'cancelled'))::integer AS cancelled,
               (count(*) FILTER (WHERE r.state = 'resolved_manually'))::integer AS resolved,
               (count(*) FILTER (WHERE r.ready))::integer AS ready
          FROM tasker.step_readiness(p_task) r
    )
    SELECT t.task_uuid, tasker.effective_task_state(t.task_uuid, t.state), c.total, c.pending, c.enqueued,
           c.in_progress, c.waiting, c.complete, c.error, c.cancelled, c.resolved, c.ready,
           CASE
               WHEN t.state = 'cancelled' THEN 'cancelled'
               WHEN c.complete + c.resolved = c.total THEN 'all_complete'
               WHEN c.error > 0 THEN 'blocked_by_failures'
               WHEN c.ready > 0 THEN 'has_ready_steps'
               WHEN c.in_progress > 0 THEN 'processing'
               WHEN c.waiting > 0 THEN 'waiting_for_retry'
               ELSE 'waiting_for_dependencies'
           END,
           round(100.0 * (c.complete + c.resolved) / greatest(c.total, 1), 1)
      FROM tasker.tasks t CROSS JOIN c
     WHERE t.task_uuid = p_task;
END
$$;

-- For DBAs: tasks with their progress, no joins needed.
CREATE VIEW tasker.v_tasks AS
SELECT t.task_uuid, t.namespace, t.name, t.version,
       tasker.effective_task_state(t.task_uuid, t.state) AS state,
       t.total_steps, t.completed_steps, t.error_steps,
       round(100.0 * t.completed_steps / greatest(t.total_steps, 1), 1) AS completion_percentage,
       t.priority, t.initiator, t.source_system, t.reason, t.tags, t.idempotency_key, t.correlation_id,
       t.context, t.created_at, t.updated_at, t.completed_at,
       coalesce(t.completed_at, now()) - t.created_at AS age
  FROM tasker.tasks t;

-- For DBAs: steps with their task, handler, attempts, timing and last error.
CREATE VIEW tasker.v_steps AS
SELECT s.step_uuid, s.task_uuid, t.namespace, t.name AS task_name, s.name, ns.handler, s.state,
       s.attempts, s.max_attempts, s.retryable, s.pending_parents, s.worker_id,
       s.created_at, s.enqueued_at, s.started_at, s.completed_at, s.next_attempt_at,
       s.completed_at - s.started_at AS last_run_duration,
       CASE WHEN s.state = 'in_progress' THEN m.vt END AS lease_expires_at,
       s.last_error->>'error_type' AS last_error_type,
       s.last_error->>'message' AS last_error_message,
       s.results, s.metadata, s.checkpoint, s.last_error
  FROM tasker.steps s
  JOIN tasker.tasks t ON t.task_uuid = s.task_uuid
  JOIN tasker.named_steps ns ON ns.named_step_id = s.named_step_id
  LEFT JOIN tasker.queue_messages m ON m.queue = t.namespace AND m.msg_id = s.msg_id;

-- --------------------------------------------------------------------------------------------
-- Invariant check (DESIGN.md invariants 2 and 3 and the bookkeeping they rest on)
-- --------------------------------------------------------------------------------------------

-- One row per violation over the whole database; no rows means healthy. Meant for tests and
-- for operators after an incident; it reads everything, so it is not for the hot path.
CREATE FUNCTION tasker.check_invariants() RETURNS TABLE (invariant text, detail text)
LANGUAGE sql STABLE AS $$
    WITH msg AS (
        SELECT (m.message->>'step_uuid')::uuid AS step_uuid, m.queue, m.msg_id
          FROM tasker.queue_messages m
         WHERE m.message->>'step_uuid' ~* '^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$'
    ),
    msg_count AS (
        SELECT msg.step_uuid, count(*) AS n FROM msg GROUP BY msg.step_uuid
    ),
    per_step AS (
        SELECT s.step_uuid, s.name, s.state, s.msg_id, t.namespace, coalesce(mc.n, 0) AS messages,
               EXISTS (SELECT 1 FROM tasker.queue_messages m
                        WHERE m.queue = t.namespace AND m.msg_id = s.msg_id
                          AND m.message->>'step_uuid' = s.step_uuid::text) AS pointer_ok
          FROM tasker.steps s
          JOIN tasker.tasks t ON t.task_uuid = s.task_uuid
          LEFT JOIN msg_count mc ON mc.step_uuid = s.step_uuid
    ),
    parents AS (
        SELECT s.step_uuid, s.name, s.state, s.pending_parents,
               count(e.parent_uuid) AS total,
               count(e.parent_uuid) FILTER (WHERE p.state IN ('complete', 'resolved_manually')) AS satisfied
          FROM tasker.steps s
          LEFT JOIN tasker.step_edges e ON e.child_uuid = s.step_uuid
          LEFT JOIN tasker.steps p ON p.step_uuid = e.parent_uuid
         GROUP BY s.step_uuid, s.name, s.state, s.pending_parents
    ),
    counts AS (
        SELECT t.task_uuid, t.state, t.total_steps, t.completed_steps, t.error_steps,
               count(s.step_uuid) AS steps,
               count(s.step_uuid) FILTER (WHERE s.state IN ('complete', 'resolved_manually')) AS done,
               count(s.step_uuid) FILTER (WHERE s.state = 'error') AS errors
          FROM tasker.tasks t LEFT JOIN tasker.steps s ON s.task_uuid = t.task_uuid
         GROUP BY t.task_uuid
    )
    -- 3. every live step has exactly one message, and steps point at it
    SELECT 'live_step_has_one_message',
           format('step %s (%s) is %s with %s messages', ps.name, ps.step_uuid, ps.state, ps.messages)
      FROM per_step ps
     WHERE ps.state IN ('enqueued', 'waiting_for_retry', 'in_progress') AND (ps.messages <> 1 OR NOT ps.pointer_ok)
    UNION ALL
    -- 3. no other step has one
    SELECT 'only_live_steps_have_messages',
           format('step %s (%s) is %s but has %s messages', ps.name, ps.step_uuid, ps.state, ps.messages)
      FROM per_step ps
     WHERE ps.state NOT IN ('enqueued', 'waiting_for_retry', 'in_progress') AND ps.messages > 0
    UNION ALL
    SELECT 'message_has_a_step', format('message %s in queue %s names unknown step %s', msg.msg_id, msg.queue, msg.step_uuid)
      FROM msg WHERE NOT EXISTS (SELECT 1 FROM tasker.steps s WHERE s.step_uuid = msg.step_uuid)
    UNION ALL
    -- 2. a step is enqueued by its dependencies at most once
    SELECT 'fan_in_enqueued_once', format('step %s was enqueued %s times by its dependencies', st.step_uuid, st.n)
      FROM (SELECT tr.step_uuid, count(*) AS n FROM tasker.step_transitions tr
             WHERE tr.to_state = 'enqueued' AND tr.event IN ('created', 'dependencies_satisfied', 'task_resumed')
             GROUP BY tr.step_uuid HAVING count(*) > 1) st
    UNION ALL
    -- the fan-in counter equals the parents not yet satisfied
    SELECT 'pending_parents_matches', format('step %s (%s): pending_parents %s, unsatisfied parents %s',
                                              pa.name, pa.step_uuid, pa.pending_parents, pa.total - pa.satisfied)
      FROM parents pa
     WHERE pa.pending_parents <> pa.total - pa.satisfied
    UNION ALL
    -- nothing runs or ran before all of its parents were satisfied
    SELECT 'parents_before_children', format('step %s (%s) is %s with %s of %s parents satisfied',
                                              pa.name, pa.step_uuid, pa.state, pa.satisfied, pa.total)
      FROM parents pa
     WHERE pa.state IN ('enqueued', 'in_progress', 'waiting_for_retry', 'complete') AND pa.satisfied < pa.total
    UNION ALL
    -- task counters and states agree with the steps
    SELECT 'task_counters_match', format('task %s: total %s/%s, completed %s/%s, errors %s/%s',
                                          c.task_uuid, c.total_steps, c.steps, c.completed_steps, c.done, c.error_steps, c.errors)
      FROM counts c
     WHERE c.total_steps <> c.steps OR c.completed_steps <> c.done OR c.error_steps <> c.errors
    UNION ALL
    SELECT 'task_state_matches', format('task %s is %s with %s of %s steps done and %s in error',
                                         c.task_uuid, c.state, c.done, c.steps, c.errors)
      FROM counts c
     WHERE (c.state = 'complete' AND c.done <> c.steps)
        OR (c.state IN ('pending', 'steps_in_process') AND (c.done = c.steps OR c.errors > 0))
        OR (c.state = 'error' AND c.errors = 0)
$$;

-- The hot functions plan their statements generically from the first call. A custom plan
-- sees the outcome array's real size and the statistics of the moment (right after a bulk
-- create, almost no step is in_progress) and picks sequential scans of tasker.steps that cost
-- hundreds of milliseconds for the first five calls of every session; the generic plans are
-- the index plans the plan tests check.
ALTER FUNCTION tasker.claim_steps(text, text, integer, double precision) SET plan_cache_mode = force_generic_plan;
ALTER FUNCTION tasker.claim_exceptions(text, tasker.claim_candidate[]) SET plan_cache_mode = force_generic_plan;
ALTER FUNCTION tasker.complete_steps(jsonb) SET plan_cache_mode = force_generic_plan;
ALTER FUNCTION tasker.release_children(uuid[]) SET plan_cache_mode = force_generic_plan;
ALTER FUNCTION tasker.apply_task_deltas(tasker.task_delta[], text) SET plan_cache_mode = force_generic_plan;
ALTER FUNCTION tasker.enqueue_ready(uuid[], text) SET plan_cache_mode = force_generic_plan;
ALTER FUNCTION tasker.extend_leases(jsonb, double precision) SET plan_cache_mode = force_generic_plan;
ALTER FUNCTION tasker.release_steps(jsonb) SET plan_cache_mode = force_generic_plan;
ALTER FUNCTION tasker.lock_claim_messages(jsonb) SET plan_cache_mode = force_generic_plan;

-- A namespace queue carries the messages of live steps: purging or dropping it would leave
-- enqueued, running and retrying steps without their message and their tasks unfinished
-- forever. Both refuse while the queue has such steps (cancel the tasks first); queues used
-- on their own behave as before.
CREATE FUNCTION tasker.refuse_if_live_steps(p_queue text, p_action text) RETURNS void
LANGUAGE plpgsql STABLE AS $$
DECLARE
    v_live bigint;
BEGIN
    SELECT count(*) INTO v_live
      FROM tasker.queue_messages m
      JOIN tasker.steps s
        ON s.step_uuid = CASE WHEN m.message->>'step_uuid' ~* '^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$'
                              THEN (m.message->>'step_uuid')::uuid END
       AND s.msg_id = m.msg_id
     WHERE m.queue = p_queue
       AND s.state IN ('enqueued', 'waiting_for_retry', 'in_progress');
    IF v_live > 0 THEN
        RAISE EXCEPTION 'cannot % queue %: it holds the messages of % live workflow steps; cancel their tasks first (tasker.cancel_task)',
            p_action, quote_literal(p_queue), v_live USING ERRCODE = 'TS004';
    END IF;
END
$$;

CREATE OR REPLACE FUNCTION tasker.purge_queue(p_queue text) RETURNS bigint
LANGUAGE plpgsql AS $$
DECLARE
    v_count bigint;
BEGIN
    PERFORM tasker.queue_sequence(p_queue);
    PERFORM tasker.refuse_if_live_steps(p_queue, 'purge');
    DELETE FROM tasker.queue_messages m WHERE m.queue = p_queue;
    GET DIAGNOSTICS v_count = ROW_COUNT;
    RETURN v_count;
END
$$;

CREATE OR REPLACE FUNCTION tasker.drop_queue(p_queue text) RETURNS boolean
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM tasker.validate_queue_name(p_queue);
    IF EXISTS (SELECT 1 FROM tasker.queues WHERE queue_name = p_queue) THEN
        PERFORM tasker.refuse_if_live_steps(p_queue, 'drop');
    END IF;
    DELETE FROM tasker.queues WHERE queue_name = p_queue;
    IF NOT FOUND THEN
        RETURN false;
    END IF;
    EXECUTE format('DROP TABLE IF EXISTS tasker.%I', 'q_' || p_queue);
    EXECUTE format('DROP TABLE IF EXISTS tasker.%I', 'a_' || p_queue);
    EXECUTE format('DROP SEQUENCE IF EXISTS tasker.%I', 'q_' || p_queue || '_seq');
    RETURN true;
END
$$;
