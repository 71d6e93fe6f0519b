-- Task creation: create_task (one task, one statement for its whole DAG) and create_tasks
-- (set-based, many tasks of one template). Both run in the caller's transaction; nothing is
-- visible to workers until it commits. A repeated idempotency key returns the original task,
-- also for a while after purge_finished deleted it (tasker.idempotency_keys).

-- create_task / create_tasks

-- Refuses task options that are not what create_task documents, naming the problem, and
-- option values over their size limit (TV021): reason and the tags list max_text_bytes, the
-- other strings max_name_bytes.
CREATE FUNCTION tasker._check_task_options(p_options jsonb, p_where text) RETURNS void
LANGUAGE plpgsql STABLE AS $$
DECLARE
    v_opt text;
    v_val jsonb;
BEGIN
    IF jsonb_typeof(p_options) <> 'object' THEN
        RAISE EXCEPTION '%options must be a JSON object', p_where USING ERRCODE = 'TV022';
    END IF;
    FOR v_opt, v_val IN SELECT o.key, o.value FROM jsonb_each(p_options) o LOOP
        IF v_opt NOT IN ('initiator', 'source_system', 'reason', 'tags', 'priority', 'idempotency_key',
                         'correlation_id', 'delay_seconds', 'traceparent') THEN
            RAISE EXCEPTION '%unknown option % (valid: initiator, source_system, reason, tags, priority, idempotency_key, correlation_id, delay_seconds, traceparent)',
                p_where, quote_literal(v_opt) USING ERRCODE = 'TV022';
        END IF;
        IF v_opt IN ('reason', 'tags') THEN
            PERFORM tasker._check_text_size(CASE WHEN jsonb_typeof(v_val) = 'string' THEN v_val #>> '{}' ELSE v_val::text END,
                                            'max_text_bytes', p_where || 'option ' || v_opt);
        ELSIF v_opt NOT IN ('priority', 'delay_seconds', 'traceparent') THEN
            PERFORM tasker._check_text_size(CASE WHEN jsonb_typeof(v_val) = 'string' THEN v_val #>> '{}' ELSE v_val::text END,
                                            'max_name_bytes', p_where || 'option ' || v_opt);
        END IF;
    END LOOP;
    IF p_options ? 'priority' AND jsonb_typeof(p_options->'priority') <> 'null'
       AND NOT tasker._is_int_json(p_options->'priority', -2147483647) THEN
        RAISE EXCEPTION '%option priority must be an integer from -2147483647 to 2147483647, got %',
            p_where, left((p_options->'priority')::text, 100) USING ERRCODE = 'TV022';
    END IF;
    IF NOT tasker._is_number_json(p_options->'delay_seconds', 0, 31536000) THEN
        RAISE EXCEPTION '%option delay_seconds must be a number of seconds between 0 and a year, got %',
            p_where, left((p_options->'delay_seconds')::text, 100) USING ERRCODE = 'TV022';
    END IF;
    IF jsonb_typeof(p_options->'tags') NOT IN ('array', 'null') THEN
        RAISE EXCEPTION '%option tags must be a list, got %', p_where, left((p_options->'tags')::text, 100) USING ERRCODE = 'TV022';
    END IF;
    -- W3C trace context, version 00 (the same rule as the column's CHECK, with a clear error)
    IF jsonb_typeof(p_options->'traceparent') NOT IN ('string', 'null')
       OR (jsonb_typeof(p_options->'traceparent') = 'string'
           AND NOT (p_options->>'traceparent' ~ '^00-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}$'
                    AND substr(p_options->>'traceparent', 4, 32) <> repeat('0', 32)
                    AND substr(p_options->>'traceparent', 37, 16) <> repeat('0', 16))) THEN
        RAISE EXCEPTION '%option traceparent must be a W3C trace context: 00-<32 hex trace id>-<16 hex span id>-<2 hex flags>, lowercase, ids not all zeros; got %',
            p_where, left((p_options->'traceparent')::text, 100) USING ERRCODE = 'TV022';
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
    v_limit     bigint := tasker._setting_int('max_payload_bytes');
    v_bad       text;
    v_not_obj   boolean;
    v_count     integer;
    v_per_task  boolean;
    v_ids       uuid[];
    v_waits     uuid[];
    v_flow      boolean;
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
    -- Refuse bad input before anything is written, naming the first bad entry. A context's
    -- size is the length of its JSON text (not its stored, possibly compressed, size).
    SELECT CASE WHEN v_count = 1 THEN 'task context' ELSE 'task context #' || c.ord END ||
           CASE WHEN c.typ <> 'object' THEN ' must be a JSON object, got a JSON ' || c.typ
                ELSE format(' is %s bytes, more than the limit of %s bytes (max_payload_bytes in tasker.settings)',
                            c.bytes, v_limit) END,
           c.typ <> 'object'
      INTO v_bad, v_not_obj
      FROM (SELECT e.ord, jsonb_typeof(e.ctx) AS typ, octet_length(e.ctx::text) AS bytes
              FROM jsonb_array_elements(p_contexts) WITH ORDINALITY e(ctx, ord)) c
     WHERE c.typ <> 'object' OR c.bytes > v_limit
     ORDER BY c.ord LIMIT 1;
    IF v_bad IS NOT NULL THEN
        RAISE EXCEPTION '%', v_bad USING ERRCODE = CASE WHEN v_not_obj THEN 'TV020' ELSE 'TV021' END;
    END IF;
    IF v_per_task THEN
        PERFORM tasker._check_task_options(o.opt, format('options #%s: ', o.ord))
           FROM jsonb_array_elements(p_options) WITH ORDINALITY o(opt, ord);
    ELSE
        PERFORM tasker._check_task_options(p_options, '');
    END IF;
    -- the priorities the tasks' messages will carry, for windowed claims (queue_priorities)
    IF v_per_task THEN
        PERFORM tasker._note_priorities(p_namespace, ARRAY(
            SELECT (o.opt->>'priority')::integer FROM jsonb_array_elements(p_options) o(opt)
             WHERE jsonb_typeof(o.opt->'priority') = 'number'));
    ELSIF jsonb_typeof(p_options->'priority') = 'number' AND (p_options->>'priority')::integer <> 0 THEN
        PERFORM tasker._note_priorities(p_namespace, ARRAY[(p_options->>'priority')::integer]);
    END IF;

    -- The template version: the given one, else the newest by semantic-version order.
    SELECT nt.named_task_id, nt.version, nt.step_count, nt.has_flow INTO v_tpl, v_version, v_total, v_flow
      FROM tasker.named_tasks nt
     WHERE nt.namespace = p_namespace AND nt.name = p_name
       AND (p_version IS NULL OR nt.version = p_version)
     ORDER BY nt.version_major DESC, nt.version_minor DESC, nt.version_patch DESC,
              nt.version_pre IS NULL DESC, nt.version_pre_key DESC
     LIMIT 1;
    IF NOT FOUND THEN
        PERFORM tasker._raise_unknown_template(p_namespace, p_name, p_version);
    END IF;
    IF v_count = 0 THEN
        RETURN;
    END IF;
    -- what the template's wait steps read from each context (event keys, sleep times)
    IF EXISTS (SELECT 1 FROM tasker.named_steps n WHERE n.named_task_id = v_tpl AND n.wait_config IS NOT NULL) THEN
        PERFORM tasker._check_wait_context(v_tpl, c.ctx,
                                           CASE WHEN v_count = 1 THEN 'task context' ELSE 'task context #' || c.ord END)
           FROM jsonb_array_elements(p_contexts) WITH ORDINALITY c(ctx, ord)
          ORDER BY c.ord;
    END IF;
    -- the flow keys (concurrency, fairness) the template's steps read from each context
    IF v_flow THEN
        PERFORM tasker._check_flow_context(v_tpl, c.ctx,
                                           CASE WHEN v_count = 1 THEN 'task context' ELSE 'task context #' || c.ord END)
           FROM jsonb_array_elements(p_contexts) WITH ORDINALITY c(ctx, ord)
          ORDER BY c.ord;
    END IF;

    SELECT q.msg_seq INTO v_seq FROM tasker.queues q WHERE q.queue_name = p_namespace;
    IF NOT FOUND THEN
        PERFORM tasker.create_queue(p_namespace);
        v_seq := tasker._queue_sequence(p_namespace);
    END IF;

    WITH
    -- one row per requested task, with its options
    input AS MATERIALIZED (
        SELECT c.ord, c.ctx, o.opt, tasker._uuid_v7() AS task_uuid,
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
                                  correlation_id, traceparent, total_steps, created_at, updated_at)
        SELECT i.task_uuid, v_tpl, p_namespace, p_name, v_version, 'pending', i.ctx,
               i.opt->>'initiator', i.opt->>'source_system', i.opt->>'reason',
               coalesce(nullif(i.opt->'tags', 'null'::jsonb), '[]'::jsonb), i.priority,
               i.idempotency_key, i.opt->>'correlation_id', i.opt->>'traceparent', v_total, v_now, v_now
          FROM input i
         WHERE i.idempotency_key IS NULL
            OR (NOT EXISTS (SELECT 1 FROM tasker.tasks t
                             WHERE t.namespace = p_namespace AND t.name = p_name
                               AND t.idempotency_key = i.idempotency_key)
                -- the key of a task purge_finished deleted, inside its window
                AND NOT EXISTS (SELECT 1 FROM tasker.idempotency_keys k
                                 WHERE k.namespace = p_namespace AND k.name = p_name
                                   AND k.idempotency_key = i.idempotency_key AND k.expires_at > v_now))
         ORDER BY i.ord
        ON CONFLICT (namespace, name, idempotency_key) WHERE idempotency_key IS NOT NULL DO NOTHING
        RETURNING task_uuid
    ),
    created AS MATERIALIZED (
        SELECT i.* FROM input i JOIN ins_tasks it ON it.task_uuid = i.task_uuid
    ),
    -- every template step of every new task; roots start enqueued with a message, or waiting
    -- without one (wait_for_event and sleep steps: _arm_waits below)
    new_steps AS MATERIALIZED (
        SELECT tasker._uuid_v7() AS step_uuid, c.task_uuid, c.priority, c.delay, n.named_step_id, n.name,
               n.parent_names, n.max_attempts, n.retryable, cardinality(n.parent_names) AS parent_count,
               CASE WHEN v_flow THEN tasker._flow_key(n.lane_path, c.ctx) END AS lane,
               CASE WHEN v_flow THEN tasker._flow_key(n.concurrency_path, c.ctx) END AS concurrency_key,
               n.rate_limit,
               CASE WHEN cardinality(n.parent_names) = 0 AND n.wait_config IS NULL THEN nextval(v_seq) END AS msg_id,
               CASE WHEN cardinality(n.parent_names) > 0 THEN 'pending'
                    WHEN n.wait_config IS NOT NULL THEN 'waiting' ELSE 'enqueued' END AS state
          FROM created c
          CROSS JOIN tasker.named_steps n
         WHERE n.named_task_id = v_tpl AND NOT n.is_dynamic  -- dynamic steps: created at run time
    ),
    ins_steps AS (
        INSERT INTO tasker.steps (step_uuid, task_uuid, named_step_id, name, state, max_attempts, retryable,
                                  pending_parents, msg_id, enqueued_at, started_at, created_at, updated_at,
                                  lane, concurrency_key, rate_limit)
        SELECT s.step_uuid, s.task_uuid, s.named_step_id, s.name, s.state,
               s.max_attempts, s.retryable, s.parent_count, s.msg_id,
               CASE WHEN s.state = 'enqueued' THEN v_now END, CASE WHEN s.state = 'waiting' THEN v_now END,
               v_now, v_now, s.lane, s.concurrency_key, s.rate_limit
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
        INSERT INTO tasker.queue_messages (queue, msg_id, enqueued_at, vt, priority, message, lane)
        SELECT p_namespace, s.msg_id, v_now, v_now + make_interval(secs => s.delay), s.priority,
               jsonb_build_object('step_uuid', s.step_uuid, 'task_uuid', s.task_uuid), s.lane
          FROM new_steps s
         WHERE s.msg_id IS NOT NULL
    ),
    step_audit AS (
        INSERT INTO tasker.step_transitions (step_uuid, task_uuid, from_state, to_state, event, created_at)
        SELECT s.step_uuid, s.task_uuid, NULL, s.state, 'created', v_now
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
                    (SELECT k.task_uuid FROM tasker.idempotency_keys k
                      WHERE k.namespace = p_namespace AND k.name = p_name
                        AND k.idempotency_key = i.idempotency_key AND k.expires_at > v_now),
                    (SELECT c2.task_uuid FROM created c2
                      WHERE c2.idempotency_key = i.idempotency_key ORDER BY c2.ord LIMIT 1))
                     ORDER BY i.ord),
           (SELECT array_agg(s.step_uuid) FROM new_steps s WHERE s.state = 'waiting')
      INTO v_ids, v_waits
      FROM input i
      LEFT JOIN created c ON c.ord = i.ord;
    IF v_waits IS NOT NULL THEN
        PERFORM tasker._arm_waits(v_waits);  -- sql/functions/88_waits.sql
    END IF;
    IF v_flow THEN  -- the lanes of the messages sent (55_flow.sql)
        PERFORM tasker._note_step_lanes(p_namespace, ARRAY(
            SELECT s.step_uuid FROM tasker.steps s WHERE s.task_uuid = ANY (v_ids) AND s.msg_id IS NOT NULL));
    END IF;

    -- A key that another transaction committed while our insert waited on it is not in this
    -- statement's snapshot: look it up again in a new one.
    RETURN QUERY
    SELECT coalesce(x.id,
                    (SELECT t.task_uuid FROM tasker.tasks t
                      WHERE t.namespace = p_namespace AND t.name = p_name
                        AND t.idempotency_key = x.key),
                    (SELECT k.task_uuid FROM tasker.idempotency_keys k
                      WHERE k.namespace = p_namespace AND k.name = p_name
                        AND k.idempotency_key = x.key AND k.expires_at > v_now))
      FROM (SELECT u.id, u.ord,
                   CASE WHEN v_per_task THEN p_options->(u.ord::integer - 1) ELSE p_options END->>'idempotency_key' AS key
              FROM unnest(v_ids) WITH ORDINALITY u(id, ord)) x
     ORDER BY x.ord;

    PERFORM pg_notify('tasker_' || p_namespace, '');
END
$$;
COMMENT ON FUNCTION tasker.create_tasks(text,text,jsonb,text,jsonb) IS
    'Creates many tasks of one template in one statement (per-task options, idempotency keys).';

-- Creates a task from a registered template: the task row, its steps and edges, their first
-- transitions, and a message for each root step, in one statement for the whole DAG. Works in
-- the caller's transaction (workers see nothing before it commits; a rollback leaves nothing).
-- A repeated idempotency_key for the same template returns the original task with
-- created = false, so the caller can tell it from a new one. (create_tasks does the same for
-- many contexts; this one-context path is kept separate because it is about a quarter faster
-- per call, and DBAs call it per row, in triggers too.)
CREATE FUNCTION tasker.create_or_get_task(
    p_namespace text,
    p_name      text,
    p_context   jsonb DEFAULT '{}',
    p_version   text DEFAULT NULL,
    p_options   jsonb DEFAULT '{}',
    OUT task_uuid uuid,
    OUT created   boolean
)
LANGUAGE plpgsql AS $$
#variable_conflict use_column
DECLARE
    v_task      uuid := tasker._uuid_v7();
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
    v_waits     uuid[];
    v_flow      boolean;
BEGIN
    p_context := coalesce(p_context, '{}'::jsonb);
    p_options := coalesce(p_options, '{}'::jsonb);
    IF jsonb_typeof(p_context) <> 'object' THEN
        RAISE EXCEPTION 'task context must be a JSON object, got a JSON %', jsonb_typeof(p_context)
            USING ERRCODE = 'TV020';
    END IF;
    PERFORM tasker._check_json_size(p_context, 'max_payload_bytes', 'task context');
    PERFORM tasker._check_task_options(p_options, '');
    v_key := p_options->>'idempotency_key';
    v_delay := coalesce((p_options->>'delay_seconds')::double precision, 0);
    v_priority := coalesce((p_options->>'priority')::integer, 0);
    IF v_priority <> 0 THEN  -- for windowed claims (queue_priorities)
        PERFORM tasker._note_priorities(p_namespace, ARRAY[v_priority]);
    END IF;
    v_tags := coalesce(nullif(p_options->'tags', 'null'::jsonb), '[]'::jsonb);

    -- The template version: the given one, else the newest by semantic-version order.
    SELECT nt.named_task_id, nt.version, nt.step_count, nt.has_flow INTO v_tpl, v_version, v_total, v_flow
      FROM tasker.named_tasks nt
     WHERE nt.namespace = p_namespace AND nt.name = p_name
       AND (p_version IS NULL OR nt.version = p_version)
     ORDER BY nt.version_major DESC, nt.version_minor DESC, nt.version_patch DESC,
              nt.version_pre IS NULL DESC, nt.version_pre_key DESC
     LIMIT 1;
    IF NOT FOUND THEN
        PERFORM tasker._raise_unknown_template(p_namespace, p_name, p_version);
    END IF;
    -- what the template's wait steps read from the context (event keys, sleep times)
    PERFORM tasker._check_wait_context(v_tpl, p_context, 'task context');
    -- the flow keys (concurrency, fairness) its steps read from it
    IF v_flow THEN
        PERFORM tasker._check_flow_context(v_tpl, p_context, 'task context');
    END IF;

    IF v_key IS NOT NULL THEN
        SELECT t.task_uuid INTO v_existing FROM tasker.tasks t
         WHERE t.namespace = p_namespace AND t.name = p_name AND t.idempotency_key = v_key;
        IF FOUND THEN
            task_uuid := v_existing;
            created := false;
            RETURN;
        END IF;
        -- No task holds the key: a task purge_finished deleted may still own it. Read after
        -- the tasks (in a new snapshot): a purge deletes the task and saves its key in one
        -- commit, so one of the two lookups sees it.
        SELECT k.task_uuid INTO v_existing FROM tasker.idempotency_keys k
         WHERE k.namespace = p_namespace AND k.name = p_name AND k.idempotency_key = v_key
           AND k.expires_at > v_now;
        IF FOUND THEN
            task_uuid := v_existing;
            created := false;
            RETURN;
        END IF;
    END IF;

    INSERT INTO tasker.tasks (task_uuid, named_task_id, namespace, name, version, state, context,
                              initiator, source_system, reason, tags, priority, idempotency_key,
                              correlation_id, traceparent, total_steps, created_at, updated_at)
    VALUES (v_task, v_tpl, p_namespace, p_name, v_version, 'pending', p_context,
            p_options->>'initiator', p_options->>'source_system', p_options->>'reason', v_tags,
            v_priority, v_key, p_options->>'correlation_id', p_options->>'traceparent', v_total, v_now, v_now)
    ON CONFLICT (namespace, name, idempotency_key) WHERE idempotency_key IS NOT NULL DO NOTHING;
    IF NOT FOUND THEN
        -- a concurrent creator with the same key committed first
        SELECT t.task_uuid INTO v_existing FROM tasker.tasks t
         WHERE t.namespace = p_namespace AND t.name = p_name AND t.idempotency_key = v_key;
        task_uuid := v_existing;
        created := false;
        RETURN;
    END IF;

    SELECT q.msg_seq INTO v_seq FROM tasker.queues q WHERE q.queue_name = p_namespace;
    IF NOT FOUND THEN
        PERFORM tasker.create_queue(p_namespace);
        v_seq := tasker._queue_sequence(p_namespace);
    END IF;

    WITH
    -- the template's steps; roots (no dependencies) start enqueued with a message, or waiting
    -- without one (wait_for_event and sleep steps: _arm_waits below)
    ns AS (
        SELECT n.named_step_id, n.name, n.parent_names, n.max_attempts, n.retryable,
               cardinality(n.parent_names) AS parent_count, n.wait_config IS NOT NULL AS is_wait,
               CASE WHEN v_flow THEN tasker._flow_key(n.lane_path, p_context) END AS lane,
               CASE WHEN v_flow THEN tasker._flow_key(n.concurrency_path, p_context) END AS concurrency_key,
               n.rate_limit
          FROM tasker.named_steps n
         WHERE n.named_task_id = v_tpl AND NOT n.is_dynamic  -- dynamic steps: created at run time
    ),
    new_steps AS MATERIALIZED (
        SELECT tasker._uuid_v7() AS step_uuid, ns.*,
               CASE WHEN ns.parent_count = 0 AND NOT ns.is_wait THEN nextval(v_seq) END AS msg_id,
               CASE WHEN ns.parent_count > 0 THEN 'pending' WHEN ns.is_wait THEN 'waiting' ELSE 'enqueued' END AS state
          FROM ns
    ),
    ins_steps AS (
        INSERT INTO tasker.steps (step_uuid, task_uuid, named_step_id, name, state, max_attempts, retryable,
                                  pending_parents, msg_id, enqueued_at, started_at, created_at, updated_at,
                                  lane, concurrency_key, rate_limit)
        SELECT s.step_uuid, v_task, s.named_step_id, s.name, s.state,
               s.max_attempts, s.retryable, s.parent_count, s.msg_id,
               CASE WHEN s.state = 'enqueued' THEN v_now END, CASE WHEN s.state = 'waiting' THEN v_now END,
               v_now, v_now, s.lane, s.concurrency_key, s.rate_limit
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
        INSERT INTO tasker.queue_messages (queue, msg_id, enqueued_at, vt, priority, message, lane)
        SELECT p_namespace, s.msg_id, v_now, v_now + make_interval(secs => v_delay), v_priority,
               jsonb_build_object('step_uuid', s.step_uuid, 'task_uuid', v_task), s.lane
          FROM new_steps s
         WHERE s.msg_id IS NOT NULL
    ),
    ins_audit AS (
        INSERT INTO tasker.step_transitions (step_uuid, task_uuid, from_state, to_state, event, created_at)
        SELECT s.step_uuid, v_task, NULL, s.state, 'created', v_now
          FROM new_steps s
    ),
    task_audit AS (
        INSERT INTO tasker.task_transitions (task_uuid, from_state, to_state, event, metadata, created_at)
        VALUES (v_task, NULL, 'pending', 'created',
                jsonb_build_object('version', v_version, 'initiator', p_options->>'initiator'), v_now)
    )
    SELECT array_agg(s.step_uuid) FILTER (WHERE s.state = 'waiting') INTO v_waits FROM new_steps s;
    IF v_waits IS NOT NULL THEN
        PERFORM tasker._arm_waits(v_waits);  -- sql/functions/88_waits.sql
    END IF;
    IF v_flow THEN  -- the lanes of the messages sent (55_flow.sql)
        PERFORM tasker._note_step_lanes(p_namespace, ARRAY(
            SELECT s.step_uuid FROM tasker.steps s WHERE s.task_uuid = v_task AND s.msg_id IS NOT NULL));
    END IF;

    PERFORM pg_notify('tasker_' || p_namespace, '');
    task_uuid := v_task;
    created := true;
END
$$;
COMMENT ON FUNCTION tasker.create_or_get_task(text,text,jsonb,text,jsonb) IS
    'create_task that also says whether the task was created (false: an idempotency key returned an existing task).';

-- create_or_get_task for callers that want only the uuid (triggers, scripts, psql).
CREATE FUNCTION tasker.create_task(
    p_namespace text,
    p_name      text,
    p_context   jsonb DEFAULT '{}',
    p_version   text DEFAULT NULL,
    p_options   jsonb DEFAULT '{}'
) RETURNS uuid
LANGUAGE sql AS $$
    SELECT c.task_uuid FROM tasker.create_or_get_task(p_namespace, p_name, p_context, p_version, p_options) c
$$;
COMMENT ON FUNCTION tasker.create_task(text,text,jsonb,text,jsonb) IS
    'Creates a task with its steps and edges and enqueues its root steps; returns the task uuid.';

-- Raises "unknown template", naming what does exist so the caller can fix the call.
CREATE FUNCTION tasker._raise_unknown_template(p_namespace text, p_name text, p_version text) RETURNS void
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
